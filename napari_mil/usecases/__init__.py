"""The use cases that the CLI and the napari docks both call: slide to bag, cross-validated
training with out-of-fold test predictions, and prediction of a bag to an attention map.
Each is a plain function with progress callbacks and a cancel flag; none imports Qt."""
