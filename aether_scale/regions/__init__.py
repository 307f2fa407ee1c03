"""The ``regions`` stage: AE and every AETHER field pooled around the label units.

:mod:`.units` (LUC points and SDM units, read and checked), :mod:`.bags` (the POI
bags of the POI-only baselines) and :mod:`.stage` (pooling and the registered stage).
The output, one GeoParquet file per task, is :mod:`aether_scale.stores.regions`.
"""

from .bags import poi_bags, poi_token_matrix
from .stage import build_regions, method_of, region_features
from .units import load_luc_units, load_sdm_units, read_sdm_table

__all__ = ["build_regions", "load_luc_units", "load_sdm_units", "method_of", "poi_bags",
           "poi_token_matrix", "read_sdm_table", "region_features"]
