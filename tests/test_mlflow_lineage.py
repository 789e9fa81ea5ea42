"""MLflow lineage without training: one parent run per Dagster run (per round when partitioned),
its status following the children, split files as dataset inputs, system metrics on a run.

The same links on the real lineage (logged models, registered versions, evaluation metrics on
the model) are checked in tests/test_model_assets.py, which trains the tiny lineage once.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation of the assets
# defined below at definition time and cannot resolve it as a string.
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from resources.mlflow_models import EVAL, TRAINING, log_datasets, split_inputs
from resources.tracking import PARENT_RUN_ID_TAG, PARENT_TAG, ROUND_TAG, MLflowResource

ROUNDS = dg.DynamicPartitionsDefinition(name="test_round")


@pytest.fixture
def mlflow_res(tmp_path: Path) -> MLflowResource:
    return MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_root=(tmp_path / "artifacts").as_uri(), experiment_name="test-lineage")


def _children(res: MLflowResource, parent_id: str) -> list:
    return res.client().search_runs([res.experiment_id()],
                                    filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_id}'")


def _parents(res: MLflowResource, dagster_run_id: str) -> list:
    return res._parents(dagster_run_id)


def _assets(partitioned: bool, fail_second: bool = False) -> list:
    partitions = ROUNDS if partitioned else None

    @dg.asset(partitions_def=partitions)
    def first(context: dg.AssetExecutionContext, mlflow: MLflowResource) -> dict:
        with mlflow.run(context, "first") as run:
            # the parent is RUNNING while a child runs
            parent = mlflow.client().get_run(run.data.tags[PARENT_RUN_ID_TAG])
            assert parent.info.status == "RUNNING"
        return {"run_id": run.info.run_id}

    @dg.asset(partitions_def=partitions)
    def second(context: dg.AssetExecutionContext, mlflow: MLflowResource, first: dict) -> dict:
        with mlflow.run(context, "second") as run:
            if fail_second:
                raise RuntimeError("second failed on purpose")
        return {"run_id": run.info.run_id}

    return [first, second]


def _materialize(tmp_path: Path, res: MLflowResource, assets: list, partition: str | None = None):
    from pipelines.io_managers import JsonManifestIOManager

    (tmp_path / "dagster_home").mkdir(exist_ok=True)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        if partition is not None:
            instance.add_dynamic_partitions(ROUNDS.name, [partition])
        return dg.materialize(assets, instance=instance, partition_key=partition, raise_on_error=False,
                              resources={"mlflow": res,
                                         "io_manager": JsonManifestIOManager(base_dir=str(tmp_path / "m"))})


def test_one_parent_per_dagster_run_with_every_asset_run_nested(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    result = _materialize(tmp_path, mlflow_res, _assets(partitioned=False))
    assert result.success
    [parent] = _parents(mlflow_res, result.run_id)
    assert parent.data.tags[PARENT_TAG] == "true" and ROUND_TAG not in parent.data.tags
    assert parent.info.run_name == f"lineage-{result.run_id[:8]}"
    children = _children(mlflow_res, parent.info.run_id)
    assert {c.data.tags["dagster.asset_key"] for c in children} == {"first", "second"}
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None

    again = _materialize(tmp_path, mlflow_res, _assets(partitioned=False))
    [other] = _parents(mlflow_res, again.run_id)
    assert other.info.run_id != parent.info.run_id  # another Dagster run, another parent


def test_partitioned_run_is_a_round_parent_and_a_failed_child_fails_it(tmp_path: Path,
                                                                        mlflow_res: MLflowResource) -> None:
    result = _materialize(tmp_path, mlflow_res, _assets(partitioned=True, fail_second=True), partition="r7")
    assert not result.success
    [parent] = _parents(mlflow_res, result.run_id)
    assert parent.data.tags[ROUND_TAG] == "r7"
    assert parent.info.run_name == f"round-r7-{result.run_id[:8]}"
    statuses = {c.data.tags["dagster.asset_key"]: c.info.status for c in _children(mlflow_res, parent.info.run_id)}
    assert statuses == {"first": "FINISHED", "second": "FAILED"}
    assert parent.info.status == "FAILED"


def test_parent_created_twice_keeps_the_oldest(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    """Two processes that both found no parent: both settle on the oldest, the other is deleted."""
    class Ctx:  # the part of an AssetExecutionContext parent_run_id reads
        class run:  # noqa: N801
            run_id, job_name, tags = "d" * 36, "__ASSET_JOB", {}
        has_partition_key = False

    first = mlflow_res._create_parent(Ctx())
    assert mlflow_res.parent_run_id(Ctx()) == first   # found, not created again
    time.sleep(0.01)
    late = mlflow_res._create_parent(Ctx())           # the other process's, created a moment later
    assert mlflow_res.parent_run_id(Ctx()) == first
    assert [p.info.run_id for p in _parents(mlflow_res, Ctx.run.run_id)] == [first, late]


def test_split_files_are_dataset_inputs_with_the_data_version_as_digest(tmp_path: Path,
                                                                          mlflow_res: MLflowResource) -> None:
    split_dir = tmp_path / "splits" / "0123456789abcdef"
    split_dir.mkdir(parents=True)
    pd.DataFrame({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]}).to_parquet(split_dir / "sft_train.parquet")
    pd.DataFrame({"prompt": ["d"], "completion": ["w"]}).to_parquet(split_dir / "sft_eval.parquet")
    splits = {"split_dir": str(split_dir), "data_version": "0123456789abcdef"}
    client = mlflow_res.client()
    run_id = client.create_run(mlflow_res.experiment_id()).info.run_id
    log_datasets(client, run_id, split_inputs(splits, {"sft_train": TRAINING, "sft_eval": EVAL}))
    inputs = client.get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"sft_train", "sft_eval"}
    assert {i.dataset.digest for i in inputs} == {"0123456789abcdef"}
    assert str(split_dir / "sft_train.parquet") in by_name["sft_train"].dataset.source
    assert '"num_rows": 3' in by_name["sft_train"].dataset.profile
    contexts = {n: {t.key: t.value for t in i.tags}["mlflow.data.context"] for n, i in by_name.items()}
    assert contexts == {"sft_train": "training", "sft_eval": "eval"}


def test_system_metrics_cover_a_stage_shorter_than_one_interval(mlflow_res: MLflowResource) -> None:
    client = mlflow_res.client()
    run_id = client.create_run(mlflow_res.experiment_id()).info.run_id
    with mlflow_res.system_metrics(run_id):
        sum(i * i for i in range(200_000))  # far shorter than the 10 s sampling interval
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics

    off = MLflowResource(tracking_uri=mlflow_res.tracking_uri, artifact_root=mlflow_res.artifact_root,
                         experiment_name=mlflow_res.experiment_name, log_system_metrics=False)
    quiet = client.create_run(mlflow_res.experiment_id()).info.run_id
    with off.system_metrics(quiet):
        pass
    assert not client.get_run(quiet).data.metrics


def test_a_retry_that_succeeds_leaves_the_parent_finished(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=1))
    def flaky(context: dg.AssetExecutionContext, mlflow: MLflowResource) -> dict:
        with mlflow.run(context, "flaky"):
            if context.retry_number == 0:
                raise RuntimeError("first attempt fails on purpose")
        return {}

    result = _materialize(tmp_path, mlflow_res, [flaky])
    assert result.success
    [parent] = _parents(mlflow_res, result.run_id)
    attempts = sorted(c.info.status for c in _children(mlflow_res, parent.info.run_id))
    assert attempts == ["FAILED", "FINISHED"] and parent.info.status == "FINISHED"



def test_process_wide_uris_are_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging a model must not leave MLFLOW_*_URI exported for every later subprocess."""
    import os

    from resources.mlflow_models import process_uris

    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    with process_uris(f"sqlite:///{tmp_path / 'other.db'}"):
        assert os.environ["MLFLOW_REGISTRY_URI"].endswith("other.db")
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("mine.db")
