"""Ask the field in words: phrases → similarity rasters, top locations and maps.

AETHER aligns AE pixels and POI text in one space, so the trained text projector turns
any phrase into a vector comparable with every field pixel. :func:`query` (and
``aether-scale query``) encodes phrases with the run's own text encoder, computes the
cosine similarity with every pixel in one chunked pass over the field, and writes
per-query rasters, the top locations (GeoParquet, GeoJSON) and PNG maps.
"""

from .encode import QueryError, check_phrases, encode_phrases
from .run import QueryResult, query
from .search import block_peaks, block_similarity, top_locations

__all__ = ["QueryError", "QueryResult", "block_peaks", "block_similarity", "check_phrases",
           "encode_phrases", "query", "top_locations"]
