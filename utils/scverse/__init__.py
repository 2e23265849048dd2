"""The scverse conventions of TriHRGE's outputs: the storage keys (keys.py), the downscaled H&E and
scale factors of `uns['spatial']` (spatial.py) and the optional SpatialData export (spatialdata.py)."""
