"""Entry point of every training process: ``torchrun ... -m pipelines.pipes_launcher STAGE --config FILE``.

It runs in the launched processes, outside Dagster. On rank 0 it opens Dagster Pipes, and
its callback sends per-step metrics to the MLflow run named by ``MLFLOW_RUN_ID`` (batched:
one ``log_batch`` per ``flush_every`` steps is far cheaper than a ``log_metric`` per value),
appends them to ``RLHF_METRICS_FILE`` (JSON lines, read back for the plots), streams progress
lines to the Dagster event log, and reports the final summary as materialization metadata.
Other ranks run the stage with no callback of their own. ppo_core never sees Dagster or MLflow.

``STAGE`` is ``sft``, ``reward`` or ``ppo`` (module ``ppo_core.<stage>``) or a dotted module
path with the same ``main(argv, callbacks)`` contract.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ppo_core.callbacks import Callback

STAGES = ("sft", "reward", "ppo")
# MLflow accepts at most 1000 metrics per log_batch (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000


def stage_module(stage: str) -> str:
    """``sft`` -> ``ppo_core.sft``; a dotted name is taken as given."""
    if "." in stage:
        return stage
    if stage not in STAGES:
        raise SystemExit(f"pipes_launcher: unknown stage {stage!r}; use one of {STAGES} or a module path")
    return f"ppo_core.{stage}"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class PipesMlflowCallback(Callback):
    """Rank-0 bridge from ppo_core callbacks to MLflow, a metrics file and Dagster Pipes.

    Every sink is optional (None = off), so the callback is usable and testable on its own.
    """

    def __init__(
        self,
        pipes: Any | None = None,
        mlflow_client: Any | None = None,
        mlflow_run_id: str | None = None,
        metrics_file: str | Path | None = None,
        flush_every: int = 20,
        progress_every: int = 0,
        launch_metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.pipes, self.client, self.run_id = pipes, mlflow_client, mlflow_run_id
        self.launch_metadata = dict(launch_metadata or {})
        self.metrics_file = Path(metrics_file) if metrics_file else None
        self.flush_every, self.progress_every = max(1, flush_every), progress_every
        self.stage, self.total, self.t0, self.n_logs = "", 0, time.monotonic(), 0
        self._pending: list[Any] = []
        self.last_metrics: dict[str, float] = {}
        self.checkpoints: list[str] = []

    # ---- sinks
    def _info(self, text: str) -> None:
        if self.pipes is not None:
            self.pipes.log.info(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def _record(self, kind: str, step: int, metrics: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.metrics_file is not None:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        if self.client is not None and self.run_id:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            # NaN/inf are logged as they are, so a diverging run shows in MLflow instead of hiding.
            self._pending.extend(Metric(k, v, now, step) for k, v in clean.items())

    def flush(self) -> None:
        if self.client is None or not self._pending:
            return
        for i in range(0, len(self._pending), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + MAX_METRICS_PER_BATCH])
        self._pending = []

    # ---- callback events
    def on_train_begin(self, stage: str, total_steps: int, config: Mapping[str, Any]) -> None:
        self.stage, self.total, self.t0 = stage, int(total_steps), time.monotonic()
        if self.metrics_file is not None:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        if self.progress_every <= 0:
            # About 20 progress lines per stage: enough to follow, few enough to read.
            self.progress_every = max(1, self.total // 20)
        self._info(f"[{stage}] starting: {self.total} steps")

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._record("train", step, metrics)
        self.last_metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        self.n_logs += 1
        if self.n_logs % self.flush_every == 0:
            self.flush()
        if step % self.progress_every == 0 or step == self.total:
            self._info(self.progress_line(step, metrics))

    def progress_line(self, step: int, metrics: Mapping[str, float]) -> str:
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(step, 1) * max(self.total - step, 0)
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in list(metrics.items())[:5]
                         if isinstance(v, (int, float)))
        return f"[{self.stage}] step {step}/{self.total} {elapsed:.0f}s eta {eta:.0f}s {shown}"

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        self._record("eval", step, metrics)
        self.last_metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        self.flush()
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self._info(f"[{self.stage}] eval at step {step}: {shown}")

    def on_checkpoint(self, step: int, path: str) -> None:
        self.checkpoints.append(str(path))
        self._info(f"[{self.stage}] checkpoint at step {step}: {path}")

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        self.flush()
        self._info(f"[{self.stage}] finished in {time.monotonic() - self.t0:.0f}s")
        if self.pipes is not None and self.pipes.is_asset_step:
            self.pipes.report_asset_materialization(
                metadata={**summary_metadata(summary, self.checkpoints), **self.launch_metadata})


def summary_metadata(summary: Mapping[str, Any], checkpoints: Sequence[str] = ()) -> dict[str, Any]:
    """Pipes metadata from a stage summary: finite numbers as floats, strings as text."""
    meta: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        if isinstance(value, str):
            meta[f"summary/{key}"] = {"raw_value": value, "type": "text"}
        elif math.isfinite(float(value)):
            meta[f"summary/{key}"] = {"raw_value": float(value), "type": "float"}
    if checkpoints:
        meta["last_checkpoint"] = {"raw_value": checkpoints[-1], "type": "path"}
    return meta


@contextmanager
def _open_pipes() -> Iterator[Any | None]:
    """Dagster Pipes on rank 0 when launched by Dagster; None otherwise (plain CLI use, other ranks)."""
    if rank() != 0 or "DAGSTER_PIPES_CONTEXT" not in os.environ:
        with nullcontext():
            yield None
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield pipes


def pipes_extras() -> dict[str, Any]:
    """The Pipes extras of this launch (``TrainingLauncher.extras``: Dagster run id, stage config).

    Read from the Pipes context parameters themselves rather than from an opened session, so
    every rank has them, not only rank 0.
    """
    if "DAGSTER_PIPES_CONTEXT" not in os.environ:
        return {}
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader

    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return dict(data.get("extras") or {})


def ensure_config(path: str | Path, extras: Mapping[str, Any]) -> None:
    """Write the stage config the extras carry when ``path`` does not exist on this machine (a
    container or pod launched by a remote Pipes client); each rank writes its own temporary file
    and renames it, so concurrent ranks never see half a file."""
    target = Path(path)
    config = extras.get("stage_config")
    if target.is_file() or config is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config))
    os.replace(tmp, target)


def launch_metadata(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Materialization metadata naming the Dagster run this process was launched for."""
    run_id = extras.get("dagster_run_id")
    return {"launched_for_run": {"raw_value": str(run_id), "type": "text"}} if run_id else {}


def _mlflow_client() -> Any | None:
    if rank() != 0 or not os.environ.get("MLFLOW_RUN_ID"):
        return None
    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="pipes_launcher", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="sft | reward | ppo | a dotted module path")
    parser.add_argument("--config", required=True, help="stage config file (JSON or YAML)")
    parser.add_argument("--flush-every", type=int, default=20, help="steps per MLflow log_batch")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    module = importlib.import_module(stage_module(args.stage))
    extras = pipes_extras()
    ensure_config(args.config, extras)
    if not Path(args.config).is_file():
        raise SystemExit(f"pipes_launcher: config file {args.config} does not exist")
    with _open_pipes() as pipes:
        bridge = None
        if rank() == 0:
            bridge = PipesMlflowCallback(
                pipes=pipes, mlflow_client=_mlflow_client(), mlflow_run_id=os.environ.get("MLFLOW_RUN_ID"),
                metrics_file=os.environ.get("RLHF_METRICS_FILE"), flush_every=args.flush_every,
                launch_metadata=launch_metadata(extras),
            )
        try:
            code = module.main(["--config", args.config, *rest], callbacks=[bridge] if bridge else [])
        finally:
            if bridge is not None:
                bridge.flush()  # metrics up to a crash still reach MLflow
        if code:
            raise SystemExit(f"pipes_launcher: {module.__name__}.main exited with code {code}; "
                             "its error message is printed above")
    return 0


if __name__ == "__main__":
    from ppo_core.strategy import exit_after_shutdown

    exit_after_shutdown(main())
