"""Where the embedded default keeps its state; every location can be overridden by env vars.

Embedded default: everything under one git-ignored folder, ``RLHF_HOME`` (``<repo>/.rlhf`` in
a source checkout, ``~/.rlhf`` for an installed package).
Production profile: set ``DAGSTER_HOME`` to a folder whose ``dagster.yaml`` points at
Postgres, and ``MLFLOW_TRACKING_URI`` to a tracking server (see the README).

Nothing here may assume the source checkout exists: the Docker image installs the project into
site-packages, where ``REPO_ROOT`` is site-packages itself (see ``source_checkout``).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
# `rlhf ui` serves the embedded MLflow store here (pipelines/cli.py); the UI link of a
# SQLite-backed store can only point at that local server.
LOCAL_MLFLOW_UI_URL = "http://127.0.0.1:5000"


def source_checkout() -> Path | None:
    """The checkout the code runs from, None when the package is installed (site-packages has no
    pyproject.toml beside ``pipelines/``)."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else None


def rlhf_home() -> Path:
    default = (source_checkout() or Path.home()) / ".rlhf"
    return Path(os.environ.get("RLHF_HOME", default)).resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", rlhf_home() / "dagster_home")).resolve()


def mlflow_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{rlhf_home() / 'mlflow' / 'mlflow.db'}"


def policy_name() -> str:
    """Registered model of the PPO policy: ``RLHF_POLICY_NAME``, default ``rlhf-policy``. The one
    name the lineage registers under, rounds start from, the landing sensor and the weekly
    schedule look for a champion of, and the CLI reports; the assets' and jobs' ``policy_name`` /
    ``model_name`` config fields default to it."""
    return os.environ.get("RLHF_POLICY_NAME") or "rlhf-policy"


def reward_model_name() -> str:
    """Registered model of the reward model: ``RLHF_REWARD_MODEL_NAME``, default ``rlhf-reward-model``."""
    return os.environ.get("RLHF_REWARD_MODEL_NAME") or "rlhf-reward-model"


def is_tracking_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def mlflow_artifact_root() -> str:
    """Artifact root of new experiments; empty for a tracking server, which then uses its own
    (``--artifacts-destination``): a local file:// root would put a server's artifacts on the
    client's disk, out of reach of every other machine."""
    if "RLHF_MLFLOW_ARTIFACT_ROOT" in os.environ:
        return os.environ["RLHF_MLFLOW_ARTIFACT_ROOT"]
    if is_tracking_server(mlflow_tracking_uri()):
        return ""
    return (rlhf_home() / "mlflow" / "artifacts").as_uri()


def mlflow_ui_url(tracking_uri: str) -> str:
    """Base URL of the MLflow UI for links: the server itself (without credentials) when the
    tracking URI is one, else the local `rlhf ui` server on the embedded store."""
    if not is_tracking_server(tracking_uri):
        return LOCAL_MLFLOW_UI_URL
    parts = urlsplit(tracking_uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def configs_dir() -> Path:
    """The shipped run configs: ``RLHF_CONFIGS_DIR``, else the ``configs`` package (a folder of
    the checkout, package data once installed)."""
    if os.environ.get("RLHF_CONFIGS_DIR"):
        return Path(os.environ["RLHF_CONFIGS_DIR"]).resolve()
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "configs"  # an editable install does not map the new package
    import configs

    return Path(configs.__file__).resolve().parent


def config_file(name: str | Path) -> Path:
    """``name`` as a path when it exists, else the shipped config of that name
    (``rlhf run --config tiny.yaml`` or ``configs/tiny.yaml`` from any directory)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = configs_dir() / (path.name if path.parent == Path("configs") else path)
    return shipped if shipped.is_file() else path


def data_root() -> Path:
    return rlhf_home() / "data"


def landing_dir() -> Path:
    return Path(os.environ.get("RLHF_LANDING_DIR", rlhf_home() / "landing")).resolve()


def models_root() -> Path:
    return rlhf_home() / "models"


def manifests_root() -> Path:
    """Where the JSON manifests that assets hand each other live (``pipelines.io_managers``)."""
    return rlhf_home() / "manifests"
