"""aether_scale: distributed, out-of-core AETHER (AlphaEarth × POI alignment)."""

__version__ = "0.1.0"
