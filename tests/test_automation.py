"""Schedule and sensors evaluated with Dagster's test contexts (no daemon, no training)."""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.automation import (
    landed_files,
    lineage_run_config,
    new_files,
    new_preference_files,
    parse_cursor,
    record_run_failure,
    round_run_config,
    weekly_retraining,
)
from resources.notify import Notifier
from resources.tracking import MLflowResource

OLD = time.time() - 3600  # mtime an hour ago: the file is complete


def land(folder: Path, name: str, mtime: float = OLD) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    os.utime(path, (mtime, mtime))
    return path


def mlflow_store(home: Path) -> MLflowResource:
    return MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                          artifact_root=(home / "artifacts").as_uri())


def crown_a_champion(mlflow: MLflowResource, name: str = "rlhf-policy") -> None:
    client = mlflow.client()
    client.create_registered_model(name)
    version = client.create_model_version(name, source=(Path(mlflow.artifact_root.removeprefix("file://"))).as_uri())
    client.set_registered_model_alias(name, "champion", version.version)


def evaluate(cursor: str | None, instance: dg.DagsterInstance | None = None,
             mlflow: MLflowResource | None = None) -> dg.SensorResult:
    mlflow = mlflow or mlflow_store(Path(os.environ["RLHF_HOME"]))
    if instance is not None:
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mlflow": mlflow}) as context:
            return new_preference_files(context)
    with dg.instance_for_test(temp_dir=os.environ["DAGSTER_HOME"]) as instance, \
            dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mlflow": mlflow}) as context:
        return new_preference_files(context)


def test_sensor_triggers_once_per_file_and_points_raw_preferences_at_the_landing_folder(
    rlhf_home: Path,
) -> None:
    landing = rlhf_home / "landing"
    first = evaluate(None)
    assert not first.run_requests and "no new preference files" in first.skip_reason.skip_message

    land(landing, "batch1.jsonl")
    land(landing, "notes.txt")  # unsupported suffix: never triggers
    result = evaluate(None)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.run_config == lineage_run_config(landing)
    assert request.tags["rlhf/new_files"] == "batch1.jsonl"
    assert set(json.loads(result.cursor)) == {"batch1.jsonl"}

    again = evaluate(result.cursor)
    assert not again.run_requests

    land(landing, "batch2.jsonl")
    second = evaluate(result.cursor)
    assert [r.tags["rlhf/new_files"] for r in second.run_requests] == ["batch2.jsonl"]
    assert second.run_requests[0].run_key != request.run_key
    assert set(json.loads(second.cursor)) == {"batch1.jsonl", "batch2.jsonl"}

    land(landing, "batch1.jsonl", mtime=OLD + 60)  # rewritten: one more run
    third = evaluate(second.cursor)
    assert [r.tags["rlhf/new_files"] for r in third.run_requests] == ["batch1.jsonl"]


def test_sensor_waits_for_files_still_being_written(rlhf_home: Path) -> None:
    land(rlhf_home / "landing", "fresh.jsonl", mtime=time.time())
    result = evaluate(None)
    assert not result.run_requests


def test_new_files_and_cursor_parsing() -> None:
    now = int(time.time() * 1e9)
    current = {"a.jsonl": 1, "b.jsonl": 2, "c.jsonl": now}
    assert new_files(current, {"a.jsonl": 1}, now) == {"b.jsonl": 2}
    assert parse_cursor(None) == {}
    assert parse_cursor('{"a.jsonl": 5}') == {"a.jsonl": 5}
    with pytest.raises(ValueError, match="cursor is not JSON"):
        parse_cursor("not json")
    assert landed_files(Path("/nonexistent/landing")) == {}


def test_with_a_champion_new_files_start_a_round_with_exactly_those_files(rlhf_home: Path) -> None:
    landing = rlhf_home / "landing"
    mlflow = mlflow_store(rlhf_home)
    crown_a_champion(mlflow)
    land(landing, "labels1.jsonl")
    with dg.instance_for_test(temp_dir=os.environ["DAGSTER_HOME"]) as instance:
        result = evaluate(None, instance, mlflow)
        [request] = result.run_requests
        assert request.job_name == "rlhf_round" and request.partition_key == "round-0001"
        assert request.run_config == round_run_config([str(landing / "labels1.jsonl")])
        [add] = result.dynamic_partitions_requests
        assert add.partitions_def_name == "rlhf_round" and list(add.partition_keys) == ["round-0001"]
        instance.add_dynamic_partitions("rlhf_round", ["round-0001"])
        land(landing, "labels2.jsonl")
        second = evaluate(result.cursor, instance, mlflow)
        # the next round number, and only the new file (earlier rounds' pairs join in the round)
        assert second.run_requests[0].partition_key == "round-0002"
        assert second.run_requests[0].run_config == round_run_config([str(landing / "labels2.jsonl")])


def test_weekly_schedule_starts_a_round_only_when_a_champion_exists(rlhf_home: Path) -> None:
    import datetime as dt

    tick = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.timezone.utc)
    mlflow = mlflow_store(rlhf_home)
    with dg.instance_for_test(temp_dir=os.environ["DAGSTER_HOME"]) as instance, \
            dg.build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                      resources={"mlflow": mlflow}) as ctx:
        skipped = weekly_retraining(ctx)
        assert isinstance(skipped, dg.SkipReason) and "no champion" in skipped.skip_message
        crown_a_champion(mlflow)
        request = weekly_retraining(ctx)
        assert request.partition_key == "round-0001" and request.run_key == "weekly-round-2026-11-23"
        assert request.run_config == round_run_config(None)  # the simulated annotator
        assert instance.get_dynamic_partitions("rlhf_round") == ["round-0001"]
        # evaluated again before anything ran ("Test schedule", a retried tick): no new partition
        again = weekly_retraining(ctx)
        assert again.partition_key == "round-0001" and again.run_key == request.run_key
        assert instance.get_dynamic_partitions("rlhf_round") == ["round-0001"]
        # once the tick's run exists, the tick is done; the next tick starts the next round

        @dg.op
        def noop() -> None:
            pass

        @dg.job(partitions_def=dg.DynamicPartitionsDefinition(name="rlhf_round"))
        def stand_in() -> None:
            noop()

        stand_in.execute_in_process(instance=instance, partition_key="round-0001", tags=request.tags)
        done = weekly_retraining(ctx)
        assert isinstance(done, dg.SkipReason) and "already started round-0001" in done.skip_message
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=tick + dt.timedelta(days=7),
                                       resources={"mlflow": mlflow}) as later:
            assert weekly_retraining(later).partition_key == "round-0002"
        assert instance.get_dynamic_partitions("rlhf_round") == ["round-0001", "round-0002"]
    assert weekly_retraining.cron_schedule == "0 3 * * 1"


def test_automation_and_the_assets_share_the_registered_model_name(rlhf_home: Path, monkeypatch) -> None:
    from assets.registry import RegistryConfig
    from assets.rounds import RoundChampionConfig, RoundPreferencesConfig
    from ops.registry import PromoteConfig
    from pipelines.automation import has_champion

    mlflow = mlflow_store(rlhf_home)
    crown_a_champion(mlflow)  # of rlhf-policy
    monkeypatch.setenv("RLHF_POLICY_NAME", "team-policy")
    assert not has_champion(mlflow)  # the sensor and the schedule now watch team-policy
    assert (RegistryConfig().policy_name == RoundPreferencesConfig().policy_name
            == RoundChampionConfig().policy_name == PromoteConfig().model_name == "team-policy")
    monkeypatch.delenv("RLHF_POLICY_NAME")
    assert has_champion(mlflow) and RegistryConfig().policy_name == "rlhf-policy"


def test_run_failure_sensor_writes_a_record(rlhf_home: Path) -> None:
    @dg.op
    def explode() -> None:
        raise ValueError("boom: bad preference file")

    @dg.job
    def failing_job() -> None:
        explode()

    with dg.instance_for_test(temp_dir=os.environ["DAGSTER_HOME"]) as instance:
        result = failing_job.execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        with dg.build_run_status_sensor_context(
                sensor_name="record_run_failure", dagster_instance=instance,
                dagster_run=result.dagster_run, dagster_event=result.get_run_failure_event(),
                resources={"notifier": Notifier()}) as status, status.for_run_failure() as ctx:
            record_run_failure(ctx)
    record = json.loads((rlhf_home / "failures" / f"{result.run_id}.json").read_text())
    [alert] = [json.loads(p.read_text()) for p in (rlhf_home / "alerts").glob("*.json")]
    assert alert["kind"] == "run_failure" and "boom: bad preference file" in alert["message"]
    assert alert["delivered"] == {}  # no Slack / e-mail configured here
    assert record["job_name"] == "failing_job"
    assert record["failed_steps"] == ["explode"]
    assert record["run_id"] == result.run_id


def test_a_failing_alert_channel_is_recorded_without_its_secret(rlhf_home: Path, monkeypatch) -> None:
    # a webhook URL without a scheme: urllib's error message quotes the whole URL
    monkeypatch.setenv("RLHF_SLACK_WEBHOOK_URL", "hooks.slack.com/services/T000/B000/XXXXSECRET")
    path = Notifier().notify("promotion_refused", "v3 not promoted")
    record = json.loads(path.read_text())
    assert record["delivered"]["slack"].startswith("failed: ValueError: unknown url type")
    assert "XXXXSECRET" not in path.read_text() and "***redacted***" in record["delivered"]["slack"]
