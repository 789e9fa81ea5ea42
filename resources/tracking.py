"""The MLflow tracking store as a Dagster resource.

``MLflowResource`` owns one MLflow run per materialization, tagged so that an MLflow run
leads back to the Dagster run, asset, data version and code version that made it; the runs of
one Dagster run are nested under one parent run (see ``MLflowResource``).
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from resources import settings
from resources.redact import REDACTED, is_secret_key, redact_text

# MLflow's limits for one log_batch call (mlflow.utils.validation.MAX_METRICS_PER_BATCH etc.).
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
PARENT_TAG = "rlhf.parent"
ROUND_TAG = "rlhf.round"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID


CODE_VERSION_ENV = "RLHF_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``RLHF_CODE_VERSION`` (the image sets it at build time), else the git sha of the source
    checkout (``-dirty`` with local changes), else the installed package version.

    Only a checkout is asked for its sha: an installed package lives in site-packages, which may
    sit inside some unrelated repository whose sha would be a lie.
    """
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    checkout = settings.source_checkout()
    sha = git_version(checkout) if checkout is not None else None
    if sha:
        return sha
    try:
        return importlib_metadata.version("rlhf-pipeline")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def git_version(root: Path) -> str | None:
    """Short sha of the repository at ``root`` (``-dirty`` with tracked changes), None without git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def redact_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Stringified params with secrets masked (kept, so nothing silently disappears): the value of
    a secret-looking key, and credentials or bearer tokens inside any value."""
    out: dict[str, str] = {}
    for key, value in params.items():
        text = REDACTED if is_secret_key(key) else redact_text(str(value))
        out[key] = text[:MAX_PARAM_VALUE_LENGTH]
    return out


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def partition_key(context: dg.AssetExecutionContext) -> str | None:
    """The run's partition key (a round of the round asset group), None for an unpartitioned run."""
    key = context.run.tags.get("dagster/partition")
    if key:
        return key
    return context.partition_key if getattr(context, "has_partition_key", False) else None


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class MLflowResource(dg.ConfigurableResource):
    """The MLflow tracking store: a local SQLite file by default, a server in production.

    Every materialization's run is a child (tag ``mlflow.parentRunId``) of one parent run per
    Dagster run: the lineage, or a round when the Dagster run is partitioned (then the parent is
    named after the partition key and tagged ``rlhf.round``). The first asset that opens a run
    creates the parent; later ones, possibly in other processes, find it by its tags
    (``dagster.run_id`` + ``rlhf.parent=true``).

    Parent status follows its children: RUNNING while any child runs; when a child ends and no
    sibling is still running, FINISHED, or FAILED when any child failed (an asset retried in the
    Dagster run counts by its last attempt). A later step of the same Dagster run
    (registered_policy after evaluation_report, say) sets it RUNNING again and settles it when
    it ends, so once the Dagster run is over the parent shows the outcome and end time of all
    its MLflow steps, whichever subset of assets was selected. A step killed before it could end
    its run leaves both RUNNING, which is what the UI should then show.
    """

    tracking_uri: str = Field(
        default_factory=settings.mlflow_tracking_uri,
        description="MLflow tracking URI; default from resources/settings.py (env MLFLOW_TRACKING_URI).",
    )
    artifact_root: str = Field(
        default_factory=settings.mlflow_artifact_root,
        description="Where new experiments store artifacts (a file:// URI for the local store); empty = "
        "the tracking server's own artifact root.",
    )
    experiment_name: str = Field(default="rlhf-pipeline", description="MLflow experiment of every run.")
    ui_url: str = Field(
        default="",
        description="Base URL of the MLflow UI for the run links shown in Dagster; empty = the tracking "
        "server itself (http(s) tracking URI), else the local `rlhf ui` server (http://127.0.0.1:5000).",
    )
    log_system_metrics: bool = Field(
        default=True, description="Record CPU / memory / disk / network (and GPU) use on training runs "
        "(MLflow's psutil-based system metrics, keys system/*).",
    )
    system_metrics_interval: float = Field(
        default=10.0, description="Seconds between system-metric samples (MLflow's default).",
    )

    def client(self) -> Any:
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # registry_uri explicitly: MLflow otherwise takes the process-wide registry URI, which
        # logging a transformers model sets (resources.mlflow_models), maybe to another store
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        """Id of ``experiment_name``, created with ``artifact_root`` when it does not exist yet."""
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        if not self.artifact_root:  # a tracking server's own root (--artifacts-destination)
            return client.create_experiment(self.experiment_name)
        if self.artifact_root.startswith("file://"):
            Path(self.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        location = f"{self.artifact_root.rstrip('/')}/{self.experiment_name}"
        return client.create_experiment(self.experiment_name, artifact_location=location)

    def start_run(
        self,
        context: dg.AssetExecutionContext,
        asset_key: str,
        tags: Mapping[str, str] | None = None,
    ) -> Any:
        """Create the MLflow run of one materialization and return it (an ``mlflow.entities.Run``).

        Tags: ``dagster.run_id``, ``dagster.asset_key``, ``code_version``, the parent run
        (``mlflow.parentRunId``) and whatever ``tags`` adds (the assets pass ``data_version``).
        """
        all_tags = {
            "dagster.run_id": context.run.run_id,
            "dagster.job": context.run.job_name,
            "dagster.asset_key": asset_key,
            "code_version": code_version(),
            "mlflow.runName": f"{asset_key}-{context.run.run_id[:8]}",
            PARENT_RUN_ID_TAG: self.parent_run_id(context),
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        return self.client().create_run(self.experiment_id(), tags=all_tags,
                                        run_name=all_tags["mlflow.runName"])

    @contextmanager
    def run(
        self, context: dg.AssetExecutionContext, asset_key: str, tags: Mapping[str, str] | None = None
    ) -> Iterator[Any]:
        """``start_run`` that ends the run FINISHED, or FAILED when the body raises (and settles the parent)."""
        run = self.start_run(context, asset_key, tags)
        parent_id = run.data.tags[PARENT_RUN_ID_TAG]
        try:
            yield run
        except BaseException:
            self.client().set_terminated(run.info.run_id, status="FAILED")
            self.settle_parent(parent_id)
            raise
        self.client().set_terminated(run.info.run_id, status="FINISHED")
        self.settle_parent(parent_id)

    # ---- the parent run of a Dagster run
    def _parents(self, dagster_run_id: str) -> list[Any]:
        """Parent runs of a Dagster run, oldest first (more than one only after a creation race)."""
        query = f"tags.`dagster.run_id` = '{_quoted(dagster_run_id)}' and tags.`{PARENT_TAG}` = 'true'"
        runs = self.client().search_runs([self.experiment_id()], filter_string=query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def parent_run_id(self, context: dg.AssetExecutionContext) -> str:
        """Id of the Dagster run's parent run, created when this is its first MLflow step.

        Found by tags rather than remembered, because steps may run in separate processes. Two
        steps creating it at once both keep the oldest and the other one is deleted.
        """
        client = self.client()
        parents = self._parents(context.run.run_id)
        if not parents:
            mine = self._create_parent(context)
            parents = self._parents(context.run.run_id)
            keep = parents[0].info.run_id if parents else mine
            if keep != mine:
                client.delete_run(mine)
            return keep
        parent = parents[0]
        if parent.info.status != "RUNNING":
            client.update_run(parent.info.run_id, status="RUNNING")
        return parent.info.run_id

    def _create_parent(self, context: dg.AssetExecutionContext) -> str:
        job = context.run.job_name
        key = partition_key(context)
        label = (key if key.startswith("round") else f"round-{key}") if key else ("lineage" if job.startswith("__") else job)
        name = f"{label}-{context.run.run_id[:8]}"
        tags = {"dagster.run_id": context.run.run_id, "dagster.job": job, "code_version": code_version(),
                PARENT_TAG: "true", "mlflow.runName": name, **({ROUND_TAG: key} if key else {})}
        return self.client().create_run(self.experiment_id(), tags=tags, run_name=name).info.run_id

    def settle_parent(self, parent_id: str) -> None:
        """FINISHED (FAILED if a child failed) once no child of ``parent_id`` is running.

        An asset retried within the Dagster run counts by its last attempt: a retry that
        succeeded makes the run a success, whatever the failed attempt left behind.
        """
        client = self.client()
        children = client.search_runs([self.experiment_id()], max_results=1000,
                                      filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{_quoted(parent_id)}'")
        last: dict[str, Any] = {}
        for child in sorted(children, key=lambda r: (r.info.start_time, r.info.run_id)):
            last[child.data.tags.get("dagster.asset_key", child.info.run_id)] = child
        statuses = {c.info.status for c in last.values()}
        if "RUNNING" in statuses or "SCHEDULED" in statuses:
            return
        failed = statuses & {"FAILED", "KILLED"}
        client.set_terminated(parent_id, status="FAILED" if failed else "FINISHED")

    @contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """Sample this machine's CPU, memory, disk, network (and GPU) into ``run_id`` while the body runs.

        The launched training processes run on the same node, so the node's figures are theirs.
        MLflow's monitor only logs full sampling windows; the last, partial one is logged on exit
        so that a stage shorter than one interval still leaves a sample.
        """
        if not self.log_system_metrics:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=self.system_metrics_interval,
                                       tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            if partial := monitor.aggregate_metrics():
                monitor.publish_metrics(partial)
                monitor.mlflow_logger.flush()

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Flattened, redacted params, in batches within MLflow's per-call limit."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in redact_params(flatten(params)).items()]
        client = self.client()
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client().log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_tag(run_id, k, str(v))

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client().log_artifact(run_id, str(local_path), artifact_path)

    def ui_base_url(self) -> str:
        return (self.ui_url or settings.mlflow_ui_url(self.tracking_uri)).rstrip("/")

    def run_url(self, run: Any) -> str:
        """Link to the run in the MLflow UI that serves ``tracking_uri`` (see ``ui_url``)."""
        return f"{self.ui_base_url()}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
