"""Networks built from configs: the diffusion-model presets (`diffusion`) and the segmenter."""

__all__ = ["PRESETS", "build_components", "build_scheduler"]


def __getattr__(name: str):
    # imported on first use: applying a segmenter (conceptseg.modeling.segmenter) needs no diffusers
    if name in __all__:
        from conceptseg.modeling import diffusion

        return getattr(diffusion, name)
    raise AttributeError(f"module 'conceptseg.modeling' has no attribute {name!r}")
