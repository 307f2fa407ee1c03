"""The ``evaluate`` stage: the paper's Table 1 protocol on the region features → ``report/``.

:mod:`.protocol` (splits, heads, metrics, five seeds), :mod:`.baselines` (TF-IDF and
LDA over the POI bags), :mod:`.report` (``report.md``, plots) and :mod:`.stage` (the
registered stage).
"""

from .baselines import BASELINE_NAMES, bags_to_matrix, lda_features, tfidf_features
from .protocol import (
    KL_EPS,
    METRICS,
    Split,
    evaluate_task,
    luc_metrics,
    make_split,
    sdm_metrics,
    standardize,
    train_head,
)
from .report import format_table, write_report

__all__ = ["BASELINE_NAMES", "KL_EPS", "METRICS", "Split", "bags_to_matrix", "evaluate_task",
           "format_table", "lda_features", "luc_metrics", "make_split", "sdm_metrics",
           "standardize", "tfidf_features", "train_head", "write_report"]
