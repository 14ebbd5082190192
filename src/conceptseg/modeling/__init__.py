"""Networks built from configs: the diffusion-model presets (`diffusion`) and the segmenter."""

from conceptseg.modeling.diffusion import PRESETS, build_components, build_scheduler

__all__ = ["PRESETS", "build_components", "build_scheduler"]
