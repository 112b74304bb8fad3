"""Synthetic H&E whole-slide images with known ground truth, for demos, tests and benchmarks.

- ``cartoon``: drawn slides (stroma, tumour, pen, debris) that every model separates;
- ``semireal``: mosaics of the real CMU-1 slide's H&E with subtle nuclear-atypia lesions, stain
  variation and mimics, for learning that is not trivial;
- ``files``: what both write: the pyramidal TIFF, the ground-truth masks and JSON
  (``SyntheticSlide``), a cohort's labels CSV; ``fields``: the random fields both draw with.
"""

from napari_mil.synthetic.cartoon import make_cohort, make_synthetic_slide
from napari_mil.synthetic.files import MASK_DOWNSAMPLE, SyntheticSlide

__all__ = ["MASK_DOWNSAMPLE", "SyntheticSlide", "make_cohort", "make_synthetic_slide"]
