"""Data: synthetic and real video sources, transforms, packing, grain pipelines."""
