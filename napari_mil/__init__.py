"""napari-mil: whole-slide images, multiple-instance learning and attention maps in napari.

Importing this package imports neither torch nor Qt and never touches the network;
the heavy parts live in submodules that are imported on use.
"""

__version__ = "0.1.0"
