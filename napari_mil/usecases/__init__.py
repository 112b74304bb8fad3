"""The use cases that the CLI and the napari docks both call."""
