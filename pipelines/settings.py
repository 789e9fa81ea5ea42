"""Where the embedded default keeps its state; every location can be overridden by env vars.

Embedded default: everything under one git-ignored folder, ``RLHF_HOME`` (``<repo>/.rlhf``).
Production profile: set ``DAGSTER_HOME`` to a folder whose ``dagster.yaml`` points at
Postgres, and ``MLFLOW_TRACKING_URI`` to a tracking server (see the README).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def rlhf_home() -> Path:
    return Path(os.environ.get("RLHF_HOME", REPO_ROOT / ".rlhf")).resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", rlhf_home() / "dagster_home")).resolve()


def mlflow_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{rlhf_home() / 'mlflow' / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return os.environ.get("RLHF_MLFLOW_ARTIFACT_ROOT", (rlhf_home() / "mlflow" / "artifacts").as_uri())


def data_root() -> Path:
    return rlhf_home() / "data"


def landing_dir() -> Path:
    return Path(os.environ.get("RLHF_LANDING_DIR", rlhf_home() / "landing")).resolve()


def models_root() -> Path:
    return rlhf_home() / "models"
