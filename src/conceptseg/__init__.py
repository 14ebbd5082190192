"""conceptseg: foreground/background segmentation of a named concept, distilled from a text-to-image diffusion model."""

__version__ = "0.1.0"
