"""Automation: rounds when preference files land, a weekly round, and failure alerts.

* ``new_preference_files`` watches ``settings.landing_dir()``; its cursor maps each file name to
  the mtime already seen, so a file triggers exactly one run (again only when it is rewritten).
  Once a champion exists, new files start one RLHF **round** (a new partition of
  ``rlhf_round``) whose new pairs are exactly those files; before that (a fresh install), they
  start the whole lineage on the landing folder, which makes the first champion.
* ``weekly_retraining`` starts one round every Monday 03:00 UTC (the simulated annotator labels
  the champion's samples when the task has a gold scorer; otherwise label the outbox batch and
  drop it in the landing folder); it skips while there is no champion yet.
* ``record_run_failure`` writes ``$RLHF_HOME/failures/<run_id>.json`` (job, error, failed
  steps) for every failed run -- a failed gate (blocking check) fails its run -- and sends the
  alert through the ``notifier`` resource (a file record; Slack / e-mail where configured).
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg

from assets.ingest import list_data_files
from assets.rounds import ROUND_PREFIX, ROUNDS, next_round_key
from ops.registry import CHAMPION
from pipelines.jobs import rlhf_lineage_job, rlhf_round_job
from resources import settings
from resources.notify import Notifier
from resources.tracking import MLflowResource

WEEKLY_CRON = "0 3 * * 1"
# A file younger than this may still be being copied in; it is picked up on a later tick.
MIN_FILE_AGE_SECONDS = 10.0
SENSOR_INTERVAL_SECONDS = int(os.environ.get("RLHF_SENSOR_INTERVAL_SECONDS", "30"))


def lineage_run_config(source: str | Path) -> dict[str, Any]:
    """Run config of the lineage job (the operator's, ``RLHF_LINEAGE_CONFIG``) that points
    ``raw_preferences`` at ``source``."""
    return with_op_config(operator_run_config(LINEAGE_CONFIG_ENV), "raw_preferences", {"source": str(source)})


# Run configs (YAML, the Launchpad's shape) that automated runs start from: the operator's
# budgets for sensor- and schedule-started rounds and lineages.
ROUND_CONFIG_ENV = "RLHF_ROUND_CONFIG"
LINEAGE_CONFIG_ENV = "RLHF_LINEAGE_CONFIG"


def operator_run_config(env: str) -> dict[str, Any]:
    """The run config file named by environment variable ``env`` (empty when unset)."""
    import yaml

    path = os.environ.get(env, "")
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{env}={path}: no such run config file")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{env}={path}: a run config must be a mapping with an 'ops' key")
    return data


def with_op_config(run_config: dict[str, Any], op: str, values: dict[str, Any]) -> dict[str, Any]:
    """``run_config`` with ``values`` set in ``ops.<op>.config`` (other keys kept)."""
    ops = dict(run_config.get("ops") or {})
    entry = dict(ops.get(op) or {})
    entry["config"] = {**dict(entry.get("config") or {}), **values}
    ops[op] = entry
    return {**run_config, "ops": ops}


def round_run_config(files: list[str] | None = None) -> dict[str, Any]:
    """Run config of a round: the operator's (``RLHF_ROUND_CONFIG``), its new pairs ``files``
    (none: the simulated annotator)."""
    return with_op_config(operator_run_config(ROUND_CONFIG_ENV), "round_preferences", {"files": list(files or [])})


def has_champion(mlflow: MLflowResource, name: str | None = None) -> bool:
    """Whether the registered policy (``settings.policy_name()``) has a champion (rounds start from it)."""
    from mlflow.exceptions import MlflowException

    try:
        return CHAMPION in mlflow.client().get_registered_model(name or settings.policy_name()).aliases
    except MlflowException:
        return False


def round_request(instance: Any, files: list[str] | None, trigger: str, run_key: str,
                  key: str | None = None, tags: dict[str, str] | None = None) -> tuple[str, dg.RunRequest]:
    """The round's partition key (default: the next one) and its run request."""
    key = key or next_round_key(instance.get_dynamic_partitions(ROUNDS.name))
    tags = {**(tags or {}), "rlhf/trigger": trigger, "rlhf/round": key}
    if files:
        tags["rlhf/new_files"] = ",".join(Path(f).name for f in files)[:200]
    return key, dg.RunRequest(run_key=run_key, job_name=rlhf_round_job.name, partition_key=key,
                              run_config=round_run_config(files), tags=tags)


def landed_files(folder: Path) -> dict[str, int]:
    """Supported data files of the landing folder -> mtime in nanoseconds (empty if no folder)."""
    if not folder.is_dir():
        return {}
    files, _ = list_data_files(folder)
    return {p.name: p.stat().st_mtime_ns for p in files}


def parse_cursor(cursor: str | None) -> dict[str, int]:
    """The sensor cursor: JSON ``{file name: mtime_ns}`` of files that already triggered a run."""
    if not cursor:
        return {}
    try:
        seen = json.loads(cursor)
    except json.JSONDecodeError as exc:
        raise ValueError(f"new_preference_files: cursor is not JSON ({exc}); reset the sensor cursor") from exc
    if not isinstance(seen, dict):
        raise ValueError("new_preference_files: cursor must be a JSON object {file: mtime_ns}; reset it")
    return {str(k): int(v) for k, v in seen.items()}


def new_files(current: dict[str, int], seen: dict[str, int], now_ns: int,
              min_age_seconds: float = MIN_FILE_AGE_SECONDS) -> dict[str, int]:
    """Files not seen yet (or rewritten since), old enough to be complete."""
    cutoff = now_ns - int(min_age_seconds * 1e9)
    return {n: m for n, m in current.items() if seen.get(n) != m and m <= cutoff}


@dg.sensor(
    jobs=[rlhf_round_job, rlhf_lineage_job],
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="New preference files in the landing folder start one RLHF round with them "
    "(the whole lineage on the landing folder while there is no champion yet).",
)
def new_preference_files(context: dg.SensorEvaluationContext, mlflow: MLflowResource) -> dg.SensorResult:
    folder = settings.landing_dir()
    seen = parse_cursor(context.cursor)
    fresh = new_files(landed_files(folder), seen, time.time_ns())
    if not fresh:
        return dg.SensorResult(skip_reason=f"no new preference files in {folder}")
    names = sorted(fresh)
    # Same files with the same mtimes => same run key, so Dagster never launches it twice.
    digest = hashlib.sha256(json.dumps(sorted(fresh.items())).encode()).hexdigest()[:16]
    cursor = json.dumps({**seen, **fresh}, sort_keys=True)
    if has_champion(mlflow):
        key, request = round_request(context.instance, [str(folder / n) for n in names], "landing",
                                     f"landing-round-{digest}")
        context.log.info(f"new preference files in {folder}: {names}: starting {key}")
        return dg.SensorResult(run_requests=[request], cursor=cursor,
                               dynamic_partitions_requests=[ROUNDS.build_add_request([key])])
    context.log.info(f"new preference files in {folder}: {names}; no champion yet: the whole lineage")
    request = dg.RunRequest(
        run_key=f"landing-{digest}", job_name=rlhf_lineage_job.name,
        run_config=lineage_run_config(folder),
        tags={"rlhf/trigger": "landing", "rlhf/new_files": ",".join(names)[:200]},
    )
    return dg.SensorResult(run_requests=[request], cursor=cursor)


@dg.schedule(
    job=rlhf_round_job,
    cron_schedule=WEEKLY_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="A weekly RLHF round from the champion (the simulated annotator on tasks with a gold scorer).",
)
def weekly_retraining(context: dg.ScheduleEvaluationContext, mlflow: MLflowResource) -> dg.RunRequest | dg.SkipReason:
    if not has_champion(mlflow):
        return dg.SkipReason("no champion yet: a round starts from one; materialize the lineage first "
                             "(`rlhf run`, or drop preference files in the landing folder)")
    tick = context.scheduled_execution_time
    stamp = tick.strftime("%Y-%m-%d") if tick else "manual"
    instance = context.instance
    started = instance.get_runs(dg.RunsFilter(tags={"rlhf/weekly_tick": stamp}), limit=1)
    if started:
        return dg.SkipReason(f"the {stamp} tick already started {started[0].tags.get('rlhf/round')} "
                             f"(run {started[0].run_id})")
    # A schedule cannot return partition requests as a sensor can, so it adds the round's
    # partition itself. An evaluation that launched nothing (the UI's "Test schedule", a tick
    # evaluated again after a crash) leaves that partition without a run: the next one reuses it.
    key = unused_round(instance)
    if key is None:
        key = next_round_key(instance.get_dynamic_partitions(ROUNDS.name))
        instance.add_dynamic_partitions(ROUNDS.name, [key])
    _, request = round_request(instance, None, "weekly", f"weekly-round-{stamp}", key, {"rlhf/weekly_tick": stamp})
    return request


def unused_round(instance: Any) -> str | None:
    """The newest round partition when no run has ever targeted it, else None."""
    keys = [k for k in instance.get_dynamic_partitions(ROUNDS.name) if k.startswith(ROUND_PREFIX)]
    if not keys:
        return None
    newest = max(keys, key=lambda k: (len(k), k))
    return None if instance.get_runs_count(dg.RunsFilter(tags={"dagster/partition": newest})) else newest


def failures_dir() -> Path:
    return settings.rlhf_home() / "failures"


def root_cause(error: Any) -> str:
    """The innermost message of a Dagster error chain (the wrapper only names the op)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return str(error.message).strip()


def failure_record(run: Any, error: str | None, failed_steps: list[str]) -> dict[str, Any]:
    """What is kept about a failed run (the Dagster UI has the full logs)."""
    return {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "tags": dict(run.tags),
        "failed_steps": failed_steps,
        "error": error,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every failed run (a failed gate fails its run): $RLHF_HOME/failures/<run_id>.json and an "
    "alert through the notifier.",
)
def record_run_failure(context: dg.RunFailureSensorContext, notifier: Notifier) -> None:
    events = context.get_step_failure_events()
    failed_steps = [e.step_key for e in events if e.step_key]
    # the step's own error says what to fix; the run-level message only lists the steps
    step_errors = [f"{e.step_key}: {root_cause(e.event_specific_data.error)}" for e in events
                   if e.event_specific_data is not None and e.event_specific_data.error is not None]
    message = "; ".join(step_errors) or (context.failure_event.message if context.failure_event else None)
    record = failure_record(context.dagster_run, message, failed_steps)
    out = failures_dir() / f"{record['run_id']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    text = f"run {record['run_id']} of job {record['job_name']} failed (steps {failed_steps or 'none'}): {message}"
    alert = notifier.notify("run_failure", text, {"run_id": record["run_id"], "failed_steps": failed_steps,
                                                  "record": str(out)})
    context.log.error(f"{text}; record at {out}, alert at {alert}")


SCHEDULES = [weekly_retraining]
SENSORS = [new_preference_files, record_run_failure]
