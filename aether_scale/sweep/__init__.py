"""``aether-scale sweep``: the paper's one-factor sensitivity studies (§4.6).

λ (Figure 3), the pooling radii (Table 2), the training fraction (Figure 4) and any list
of config overrides, each point a variant of the train stage in its own workspace under
``sweeps/<name>/`` that borrows every parent output it does not change
(:mod:`.run`), evaluated by the Table 1 protocol, summarised by :mod:`.report`.
"""

from .points import Point, plan_points
from .run import SweepError, run_point, sweep, sweep_config

__all__ = ["Point", "SweepError", "plan_points", "run_point", "sweep", "sweep_config"]
