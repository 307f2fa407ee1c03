"""The stage graph as code: every stage and artifact declared once.

:data:`ARTIFACTS` names what a workspace holds; :data:`STAGES` says, for each stage in
data-flow order, which artifacts it reads and writes, its config section, which of its
keys are runtime-only (never a reason to rerun) or name external inputs (fingerprinted
by content, not by path), whether it runs dask work on a cluster, and the function that
builds it. The CLI, ``run``, the demo, ``status`` and ``stages`` read this registry;
nothing else lists stages or their inputs.

A stage's **key** hashes what determines its outputs: the stage and its format
version, its config section without runtime keys and input paths, the fingerprints of
its inputs (workspace artifacts: derived from the key of the stage that wrote them, so
keys chain; external files: their content) and the names of its outputs. A stage whose
manifest records the same key is current.

**Variants** belong to train: ``train.variants`` lists the extra models (the paper's
"AETHER w/o aug" by default), written as ``model_<name>/``. infer, regions and evaluate
follow the models that exist: one ``field_<name>.zarr`` per model, one feature column
``AETHER_<name>`` per field.
"""

from .keys import (
    Available,
    Input,
    StagePlan,
    available,
    external_input,
    flatten,
    learned_config,
    plan,
    runtime_config,
)
from .registry import (
    ARTIFACTS,
    KEY_FORMAT,
    STAGES,
    Artifact,
    Stage,
    artifact_of,
    is_complete,
    producer,
    stage,
    stage_names,
    train_variants,
)
from .run import StageContext, check_ready, is_current, run_stage, run_stages
from .status import StageStatus, status

__all__ = [
    "ARTIFACTS",
    "KEY_FORMAT",
    "STAGES",
    "Artifact",
    "Available",
    "Input",
    "Stage",
    "StageContext",
    "StagePlan",
    "StageStatus",
    "artifact_of",
    "available",
    "check_ready",
    "external_input",
    "flatten",
    "is_complete",
    "is_current",
    "learned_config",
    "plan",
    "producer",
    "run_stage",
    "run_stages",
    "runtime_config",
    "stage",
    "stage_names",
    "status",
    "train_variants",
]
