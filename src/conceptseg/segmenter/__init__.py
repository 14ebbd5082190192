"""Stage 5: the downstream segmenter, trained on (images, masks) and applied to new images."""

from conceptseg.segmenter.predict import Segmenter, load_segmenter

__all__ = ["Segmenter", "load_segmenter"]
