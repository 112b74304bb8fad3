"""Patch features: the extraction pipeline and the HDF5 feature store."""
