"""The one ``dg.Definitions`` of the project: assets, checks, jobs, schedules, sensors, resources.

Resources are the embedded default, resolved from ``resources/settings.py`` (``RLHF_HOME``,
``MLFLOW_TRACKING_URI``), never from ``DAGSTER_HOME``: the same code runs against the local
SQLite Dagster home or a Postgres-backed production instance. The production profile changes
environment variables only (see the README). Those a deployment sets are bound as ``dg.EnvVar``,
so Dagster reads them when a run starts (in the run worker, e.g. a DockerRunLauncher container)
and the UI shows the variable's name rather than its value; unset, the embedded default applies.
"""

import os

import dagster as dg

from assets.data import DATA_ASSETS, DATA_CHECKS
from assets.evaluation import EVAL_ASSETS, EVAL_CHECKS
from assets.models import MODEL_ASSETS, MODEL_CHECKS
from assets.promotion import PROMOTION_ASSETS, PROMOTION_CHECKS
from assets.registry import REGISTRY_ASSETS
from assets.rounds import ROUND_ASSETS, ROUND_CHECKS
from pipelines.automation import SCHEDULES, SENSORS
from pipelines.io_managers import JsonManifestIOManager
from pipelines.jobs import ALL_JOBS
from resources import settings
from resources.launcher import TrainingLauncher
from resources.notify import Notifier
from resources.tracking import MLflowResource


# MLflowResource field <- environment variable a deployment may set.
MLFLOW_ENV_FIELDS = {
    "tracking_uri": "MLFLOW_TRACKING_URI",
    "artifact_root": "RLHF_MLFLOW_ARTIFACT_ROOT",
    "ui_url": "RLHF_MLFLOW_UI_URL",
}


# TrainingLauncher field <- environment variable: a GPU node's ranks and, on several nodes, the
# rendezvous (README, "Several ranks and nodes"); a run config (configs/gpu.yaml) still wins.
LAUNCHER_ENV_FIELDS = {
    "nproc_per_node": "RLHF_NPROC_PER_NODE",
    "nnodes": "RLHF_NNODES",
    "rdzv_endpoint": "RLHF_RDZV_ENDPOINT",
}
INT_FIELDS = frozenset({"nproc_per_node", "nnodes"})


def env_fields(fields: dict[str, str]) -> dict[str, dg.EnvVar]:
    """``dg.EnvVar`` for each field whose variable is set now (``EnvVar.int`` for the integer
    ones). An EnvVar of an unset variable fails the run at launch, so unset ones keep the field's
    default (the embedded profile)."""
    return {field: dg.EnvVar.int(var) if field in INT_FIELDS else dg.EnvVar(var)
            for field, var in fields.items() if os.environ.get(var)}


def default_resources() -> dict[str, object]:
    """Resources of the embedded default (every path under ``RLHF_HOME``), deployment settings
    from the environment (``MLFLOW_ENV_FIELDS``, ``LAUNCHER_ENV_FIELDS``)."""
    return {
        "io_manager": JsonManifestIOManager(base_dir=str(settings.manifests_root())),
        "mlflow": MLflowResource(**env_fields(MLFLOW_ENV_FIELDS)),
        "launcher": TrainingLauncher(**env_fields(LAUNCHER_ENV_FIELDS)),
        "notifier": Notifier(),
    }


ASSETS = [*DATA_ASSETS, *MODEL_ASSETS, *EVAL_ASSETS, *REGISTRY_ASSETS, *PROMOTION_ASSETS, *ROUND_ASSETS]
ASSET_CHECKS = [*DATA_CHECKS, *MODEL_CHECKS, *EVAL_CHECKS, *PROMOTION_CHECKS, *ROUND_CHECKS]

def build_defs() -> dg.Definitions:
    """The project's Definitions with resources resolved now: ``rlhf run`` / ``rlhf rounds``
    call it after setting up the environment, so a process that changed ``RLHF_HOME`` since
    this module was imported (a test, a notebook) never writes to the earlier home."""
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=ASSET_CHECKS,
        jobs=ALL_JOBS,
        schedules=SCHEDULES,
        sensors=SENSORS,
        resources=default_resources(),
    )


defs = build_defs()
