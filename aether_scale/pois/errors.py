"""The POI stage's input error: a source that cannot be used as configured.

Kept in its own module so every part of :mod:`aether_scale.pois` (readers, text
cleaning, templates, the stage) can raise it without importing one another.
"""

from __future__ import annotations

__all__ = ["PoiInputError"]


class PoiInputError(ValueError):
    """A POI source that cannot be used as configured; the message says which file,
    which config key and how to fix it."""
