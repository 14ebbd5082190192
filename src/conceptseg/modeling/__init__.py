"""Networks built from configs, with random weights: every family's diffusion-model presets
(`presets`; SD 1.x/2.x's in `sd`) and the segmenter (`segmenter`)."""

__all__ = ["PRESETS", "build_components", "build_scheduler"]  # SD 1.x/2.x's (`sd`)


def __getattr__(name: str):
    # imported on first use: applying a segmenter (conceptseg.modeling.segmenter) needs no diffusers
    if name in __all__:
        from conceptseg.modeling import sd

        return getattr(sd, name)
    raise AttributeError(f"module 'conceptseg.modeling' has no attribute {name!r}")
