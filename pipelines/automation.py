"""Automation: weekly retraining, retraining when preference files land, and a run-failure record.

* ``weekly_retraining`` runs the whole lineage every Monday 03:00 UTC, on the landing folder's
  data when it holds preference files, else on the configured default source.
* ``new_preference_files`` watches ``settings.landing_dir()``; its cursor maps each file name to
  the mtime already seen, so a file triggers exactly one run (again only when it is rewritten).
  The run reads the whole landing folder: retraining uses everything that has landed so far.
* ``record_run_failure`` logs every failed run of this code location and writes
  ``$RLHF_HOME/failures/<run_id>.json`` (job, error, failed steps) for later inspection.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import dagster as dg

from assets.ingest import list_data_files
from pipelines import settings
from pipelines.jobs import rlhf_lineage_job

WEEKLY_CRON = "0 3 * * 1"
# A file younger than this may still be being copied in; it is picked up on a later tick.
MIN_FILE_AGE_SECONDS = 10.0
SENSOR_INTERVAL_SECONDS = 30


def lineage_run_config(source: str | Path) -> dict[str, Any]:
    """Run config of the lineage job that points ``raw_preferences`` at ``source``."""
    return {"ops": {"raw_preferences": {"config": {"source": str(source)}}}}


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
    job=rlhf_lineage_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrain the whole lineage when new preference files land in the landing folder.",
)
def new_preference_files(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = settings.landing_dir()
    seen = parse_cursor(context.cursor)
    fresh = new_files(landed_files(folder), seen, time.time_ns())
    if not fresh:
        return dg.SensorResult(skip_reason=f"no new preference files in {folder}")
    names = sorted(fresh)
    # Same files with the same mtimes => same run key, so Dagster never launches it twice.
    key = hashlib.sha256(json.dumps(sorted(fresh.items())).encode()).hexdigest()[:16]
    context.log.info(f"new preference files in {folder}: {names}")
    request = dg.RunRequest(
        run_key=f"landing-{key}",
        run_config=lineage_run_config(folder),
        tags={"rlhf/trigger": "landing", "rlhf/new_files": ",".join(names)[:200]},
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps({**seen, **fresh}, sort_keys=True))


@dg.schedule(
    job=rlhf_lineage_job,
    cron_schedule=WEEKLY_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Weekly retraining of the whole lineage (landing-folder data when present).",
)
def weekly_retraining(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    folder = settings.landing_dir()
    tick = context.scheduled_execution_time
    stamp = tick.strftime("%Y-%m-%d") if tick else "manual"
    if landed_files(folder):
        return dg.RunRequest(run_key=f"weekly-{stamp}", run_config=lineage_run_config(folder),
                             tags={"rlhf/trigger": "weekly", "rlhf/source": str(folder)})
    # No landed data: the assets' own default source (the bundled task unless configured).
    return dg.RunRequest(run_key=f"weekly-{stamp}", run_config={},
                         tags={"rlhf/trigger": "weekly", "rlhf/source": "default"})


def failures_dir() -> Path:
    return settings.rlhf_home() / "failures"


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
    description="Log every failed run and write $RLHF_HOME/failures/<run_id>.json.",
)
def record_run_failure(context: dg.RunFailureSensorContext) -> None:
    failed_steps = [e.step_key for e in context.get_step_failure_events() if e.step_key]
    message = context.failure_event.message if context.failure_event else None
    record = failure_record(context.dagster_run, message, failed_steps)
    out = failures_dir() / f"{record['run_id']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    context.log.error(
        f"run {record['run_id']} of job {record['job_name']} failed "
        f"(steps {failed_steps or 'none'}): {message}; record at {out}"
    )


SCHEDULES = [weekly_retraining]
SENSORS = [new_preference_files, record_run_failure]
