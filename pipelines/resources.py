"""Resources the model assets use: the MLflow tracking store and the out-of-process launcher.

``MLflowResource`` owns one MLflow run per materialization, tagged so that an MLflow run
leads back to the Dagster run, asset, data version and code version that made it; the runs of
one Dagster run are nested under one parent run (see ``MLflowResource``).
``TrainingLauncher`` runs a ppo_core stage under ``torchrun`` through Dagster Pipes, so the
asset code is the same on this CPU (``nproc_per_node=1``) and on a multi-GPU node.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from pipelines import settings

# MLflow's limits for one log_batch call (mlflow.utils.validation.MAX_METRICS_PER_BATCH etc.).
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
REDACTED = "***redacted***"
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
    """Stringified params with secret-looking keys masked (kept, so nothing silently disappears)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        text = REDACTED if _SECRET_KEY.search(key) else str(value)
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
        description="MLflow tracking URI; default from pipelines/settings.py (env MLFLOW_TRACKING_URI).",
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
        # logging a transformers model sets (pipelines.mlflow_models), maybe to another store
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


def _default_accelerator() -> str:
    import torch

    # DeepSpeed picks CUDA when it sees no override; on a CPU-only machine that fails to import.
    return "cuda" if torch.cuda.is_available() else "cpu"


PipesClientKind = Literal["subprocess", "docker", "k8s"]
RdzvBackend = Literal["static", "c10d"]
# Where each remote Pipes client lives: (module, class, pip package). Imported on first use only,
# so the default deployment needs neither package.
REMOTE_PIPES_CLIENTS: dict[str, tuple[str, str, str]] = {
    "docker": ("dagster_docker", "PipesDockerClient", "dagster-docker"),
    "k8s": ("dagster_k8s", "PipesK8sClient", "dagster-k8s"),
}
# What a container or pod gets of the launch environment: the run's own variables and the
# tracking server's credentials (it logs metrics there), nothing else of this machine.
RUN_ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RLHF_METRICS_FILE", "DS_ACCELERATOR",
                "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "RLHF_HOME",
                "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def remote_pipes_client_class(kind: str) -> type:
    """The Dagster Pipes client class of ``kind`` ("docker" / "k8s"), with a clear error when its
    package is not installed (it is only needed where that deployment is used)."""
    module_name, class_name, package = REMOTE_PIPES_CLIENTS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise dg.DagsterInvariantViolationError(
            f"TrainingLauncher(pipes_client={kind!r}) needs the {package} package where the Dagster "
            f"code runs: pip install {package}=={integration_version(dg.__version__)} (the release "
            f"that matches dagster {dg.__version__})"
        ) from exc
    return getattr(module, class_name)


def integration_version(dagster_version: str) -> str:
    """Dagster's integration libraries version as 0.(minor+16).patch: dagster 1.13.27 <-> 0.29.27."""
    major, minor, patch = dagster_version.split(".")[:3]
    return f"0.{int(minor) + 16}.{patch}" if major == "1" else dagster_version


class TrainingLauncher(dg.ConfigurableResource):
    """Runs ``torchrun --nproc-per-node N -m pipelines.pipes_launcher STAGE --config FILE`` via Pipes.

    ``pipes_client`` chooses where: ``subprocess`` (default) on this machine, ``docker`` in a
    container of ``image`` (dagster-docker's PipesDockerClient), ``k8s`` in a pod of ``image``
    (dagster-k8s's PipesK8sClient). The launched process gets the Dagster run id and the stage
    config as Pipes extras, so a container without this machine's files still has its config;
    ``RLHF_HOME`` (checkpoints, data) must be a volume both sides mount at the same path.

    Ranks: one node (``nnodes: 1``, no ``rdzv_endpoint``) uses ``--standalone``, a private
    rendezvous on a free port. Several nodes use torchrun's static rendezvous: Dagster launches
    node 0 here, and ``launch`` logs the command every other node runs (``node_command``). Node 0
    must be the Dagster side because global rank 0 reports through Pipes and logs to MLflow
    (ppo_core fires callbacks on rank 0 only); torchrun's ``c10d`` backend orders nodes by host
    name, so it is accepted for one node only.
    """

    nproc_per_node: int = Field(default=1, description="Processes (one per GPU) on each node.")
    nnodes: int = Field(
        default=1, description="Nodes taking part (torchrun --nnodes); > 1 needs rdzv_endpoint, and every "
        "other node runs the command the training step logs, with RLHF_HOME on a shared filesystem.")
    rdzv_endpoint: str = Field(
        default="", description="host:port of the rendezvous on node 0 (this machine), reachable from "
        "every node (torchrun --rdzv-endpoint); empty on one node = --standalone.")
    rdzv_backend: RdzvBackend = Field(
        default="static", description="torchrun --rdzv-backend: static (node ranks as given: node 0 is "
        "this machine) or c10d (one node only: it ranks nodes by host name).")
    rdzv_id: str = Field(
        default="", description="torchrun --rdzv-id of the c10d backend; empty = the stage's name.")
    ds_accelerator: str = Field(
        default="", description="DS_ACCELERATOR for DeepSpeed; empty = cuda when visible, else cpu."
    )
    omp_num_threads: int = Field(
        default=0, description="OMP_NUM_THREADS for each process; 0 leaves torch's own choice."
    )
    extra_env: dict[str, str] = Field(default_factory=dict, description="More env vars for the run.")
    pipes_client: PipesClientKind = Field(
        default="subprocess", description="Where training runs: subprocess (this machine), docker "
        "(dagster-docker PipesDockerClient) or k8s (dagster-k8s PipesK8sClient).",
    )
    image: str = Field(default="", description="Image of the training container/pod (docker, k8s); "
                       "the project's Dockerfile builds one.")
    k8s_namespace: str = Field(default="", description="Namespace of the training pod (k8s; empty = "
                               "the client's default).")
    k8s_base_pod_spec: dict[str, Any] = Field(
        default_factory=dict, description="Pod spec merged under the training pod (k8s): GPU resources, "
        "volumes (RLHF_HOME), node selectors.",
    )
    docker_container_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Arguments of docker's containers.create (docker): volumes "
        "(RLHF_HOME), device_requests for GPUs, network.",
    )

    def check(self) -> None:
        """Refuse a combination torchrun would reject, or one whose rank 0 could miss Pipes."""
        if self.nproc_per_node < 1:
            raise ValueError(f"TrainingLauncher.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"TrainingLauncher.nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"TrainingLauncher.nnodes={self.nnodes} needs rdzv_endpoint: host:port of this machine "
                "(node 0) that every node can reach, e.g. 10.0.0.1:29500")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"TrainingLauncher.rdzv_endpoint={self.rdzv_endpoint!r}: write host:port, "
                                 "e.g. 10.0.0.1:29500")
        if self.rdzv_backend == "c10d" and self.nnodes > 1:
            raise ValueError(
                f"TrainingLauncher.rdzv_backend='c10d' with nnodes={self.nnodes}: c10d ranks the nodes by "
                "host name, so global rank 0 (which reports to Dagster and MLflow) may land on another "
                "node; use rdzv_backend 'static', where this machine is node 0")
        if self.rdzv_backend == "c10d" and not self.rdzv_endpoint:
            raise ValueError("TrainingLauncher.rdzv_backend='c10d' needs rdzv_endpoint (host:port); "
                             "leave both unset for --standalone")
        if self.rdzv_id and self.rdzv_backend != "c10d":
            raise ValueError(f"TrainingLauncher.rdzv_id={self.rdzv_id!r} is read by the c10d backend only "
                             f"(rdzv_backend is {self.rdzv_backend!r}): remove it")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.check()  # a bad launcher fails the run when it sets up resources, before any launch

    def rendezvous_args(self, stage: str, node_rank: int = 0) -> list[str]:
        """torchrun's rendezvous flags for ``node_rank``: ``--standalone`` on one node without an
        endpoint, else ``--nnodes --node-rank --rdzv-backend --rdzv-endpoint [--rdzv-id]``."""
        self.check()
        if not 0 <= node_rank < self.nnodes:
            raise ValueError(f"node_rank={node_rank}: choose 0 to {self.nnodes - 1} (nnodes={self.nnodes})")
        if self.nnodes == 1 and not self.rdzv_endpoint:
            # --standalone: a private rendezvous on a free port, so parallel runs never collide.
            return ["--standalone"]
        args = ["--nnodes", str(self.nnodes), "--node-rank", str(node_rank),
                "--rdzv-backend", self.rdzv_backend, "--rdzv-endpoint", self.rdzv_endpoint]
        if self.rdzv_backend == "c10d":
            args += ["--rdzv-id", self.rdzv_id or stage]
        return args

    def command(self, stage: str, config_path: str | Path, node_rank: int = 0,
                python: str | None = None) -> list[str]:
        """The launch command of ``node_rank`` (0: the one Dagster runs); ``python -m
        torch.distributed.run`` is ``torchrun`` from this venv (from the image's or the other
        node's ``python`` otherwise)."""
        if python is None:
            python = sys.executable if self.pipes_client == "subprocess" else "python"
        return [
            python, "-m", "torch.distributed.run", *self.rendezvous_args(stage, node_rank),
            "--nproc-per-node", str(self.nproc_per_node),
            "-m", "pipelines.pipes_launcher", stage, "--config", str(config_path),
        ]

    def node_command(self, stage: str, config_path: str | Path, node_rank: int) -> str:
        """The shell line another node runs to join a launch: its environment (the run's, minus
        what only rank 0 uses) and ``command`` with that node's rank and its own ``python``."""
        env = {"RLHF_HOME": str(settings.rlhf_home()),
               "DS_ACCELERATOR": self.ds_accelerator or _default_accelerator(),
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               **({"OMP_NUM_THREADS": str(self.omp_num_threads)} if self.omp_num_threads > 0 else {}),
               **self.extra_env}
        words = [f"{k}={v}" for k, v in env.items()]
        words += self.command(stage, config_path, node_rank=node_rank, python="python")
        return " ".join(shlex.quote(w) for w in words)

    def env(self, mlflow_tracking_uri: str, mlflow_run_id: str, metrics_file: str | Path) -> dict[str, str]:
        """Environment of the launched processes (inherits this process's, plus what the run needs)."""
        env = dict(os.environ)
        checkout = settings.source_checkout()
        if checkout is not None:  # an installed package is importable without it
            root = str(checkout)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update({
            "MLFLOW_TRACKING_URI": mlflow_tracking_uri,
            "MLFLOW_RUN_ID": mlflow_run_id,
            "RLHF_METRICS_FILE": str(metrics_file),
            "RLHF_HOME": str(settings.rlhf_home()),
            "DS_ACCELERATOR": self.ds_accelerator or _default_accelerator(),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        if self.omp_num_threads > 0:
            env["OMP_NUM_THREADS"] = str(self.omp_num_threads)
        env.update(self.extra_env)
        return env

    def remote_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """What a container gets: the run's own variables and ``extra_env``, never this machine's
        whole environment (its PATH, venv and secrets mean nothing there)."""
        keep = {k: env[k] for k in RUN_ENV_KEYS if k in env}
        return {**keep, **self.extra_env}

    def extras(self, context: dg.AssetExecutionContext, stage: str, config_path: str | Path,
               mlflow_run_id: str) -> dict[str, Any]:
        """Pipes extras of a launch: the Dagster run id, the stage and its config (read from
        ``config_path`` when it exists here)."""
        path = Path(config_path)
        config = json.loads(path.read_text()) if path.suffix == ".json" and path.is_file() else None
        return {"dagster_run_id": context.run.run_id, "stage": stage, "stage_config_path": str(path),
                "stage_config": config, "mlflow_run_id": mlflow_run_id}

    def launch(
        self,
        context: dg.AssetExecutionContext,
        stage: str,
        config_path: str | Path,
        *,
        mlflow_tracking_uri: str,
        mlflow_run_id: str,
        metrics_file: str | Path,
        extras: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run the stage and return the completed Pipes invocation (raises when it fails)."""
        command = self.command(stage, config_path)
        env = self.env(mlflow_tracking_uri, mlflow_run_id, metrics_file)
        all_extras = {**self.extras(context, stage, config_path, mlflow_run_id), **(extras or {})}
        context.log.info(f"launching {stage} ({self.pipes_client}): {' '.join(command)}")
        for node in range(1, self.nnodes):
            context.log.info(f"node {node} of {self.nnodes}: waiting for it to join; run there, with "
                             f"the same RLHF_HOME mounted: {self.node_command(stage, config_path, node)}")
        if self.pipes_client == "subprocess":
            cwd = settings.source_checkout() or Path.cwd()
            return dg.PipesSubprocessClient(cwd=str(cwd)).run(
                context=context, command=command, extras=all_extras, env=env)
        if not self.image:
            raise dg.DagsterInvariantViolationError(
                f"TrainingLauncher(pipes_client={self.pipes_client!r}) needs `image`: the training image "
                "(the project's Dockerfile builds one)")
        client = remote_pipes_client_class(self.pipes_client)()
        if self.pipes_client == "docker":
            return client.run(context=context, image=self.image, command=command, env=self.remote_env(env),
                              extras=all_extras, container_kwargs=self.docker_container_kwargs or None)
        return client.run(context=context, image=self.image, command=command, env=self.remote_env(env),
                          extras=all_extras, namespace=self.k8s_namespace or None,
                          base_pod_spec=self.k8s_base_pod_spec or None)
