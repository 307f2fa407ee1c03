"""The trained baselines of the paper's Table 1, produced by the same protocol as AETHER.

- :mod:`.location` — CaLLiPer+ (location encoder aligned with POI texts by AETHER's
  InfoNCE) and a Space2Vec-style coordinate encoder (no text);
- :mod:`.cooccur` — Place2Vec and Doc2Vec (gensim) from POI co-occurrence;
- :mod:`.units` — where an encoder is evaluated for a unit (its buffer);
- :mod:`.stage` — the ``baselines`` stage → ``baselines/`` (``evaluate`` reads it).

TF-IDF and LDA need no training and stay in :mod:`aether_scale.evaluate.baselines`.
"""

from .stage import LABELS, build, read_features

__all__ = ["LABELS", "build", "read_features"]
