"""The use cases the CLI and the napari docks both call: slide to bag, cross-validated training,
prediction, ..."""
