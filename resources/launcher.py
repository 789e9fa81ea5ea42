"""The out-of-process training launcher as a Dagster resource.

``TrainingLauncher`` runs a ppo_core stage under ``torchrun`` through Dagster Pipes, so the
asset code is the same on this CPU (``nproc_per_node=1``) and on a multi-GPU node.
"""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from resources import settings
from resources.redact import is_secret_key


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
        what only rank 0 uses) and ``command`` with that node's rank and its own ``python``.

        The line is logged, so a secret-looking ``extra_env`` variable (``HF_TOKEN``, ...) is
        passed by reference (``HF_TOKEN="$HF_TOKEN"``): that node's shell supplies its value."""
        env = {"RLHF_HOME": str(settings.rlhf_home()),
               "DS_ACCELERATOR": self.ds_accelerator or _default_accelerator(),
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               **({"OMP_NUM_THREADS": str(self.omp_num_threads)} if self.omp_num_threads > 0 else {}),
               **self.extra_env}
        words = [f'{k}="${k}"' if is_secret_key(k) and k.isidentifier() else shlex.quote(f"{k}={v}")
                 for k, v in env.items()]
        words += [shlex.quote(w) for w in self.command(stage, config_path, node_rank=node_rank, python="python")]
        return " ".join(words)

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
