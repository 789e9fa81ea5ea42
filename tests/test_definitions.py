"""The one Definitions object loads and wires every asset, check, job, schedule and sensor."""

from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent

ASSETS = {
    "raw_preferences", "preference_pairs", "quarantined_pairs", "dataset_splits", "base_model",
    "sft_model", "reward_model", "heldout_reward_model", "ppo_policy", "evaluation_report",
    "registered_policy", "champion_policy",
}
ROUND_ASSETS = {"round_preferences", "round_reward_model", "round_policy", "round_evaluation", "round_champion"}
CHECKS = {
    ("preference_pairs", "quarantine_fraction_below_threshold"),
    ("dataset_splits", "splits_are_prompt_disjoint"),
    ("reward_model", "reward_model_accuracy"),
    ("ppo_policy", "ppo_kl_within_bound"),
    ("ppo_policy", "ppo_beats_sft_heldout"),
    ("evaluation_report", "ppo_beats_sft"),
    ("champion_policy", "challenger_promoted"),
    ("round_reward_model", "round_reward_model_accuracy"),
    ("round_champion", "round_challenger_promoted"),
}
JOBS = {"rlhf_lineage", "rlhf_round", "preference_data", "promote_champion_job", "rollback_champion_job",
        "prune_versions_job"}


def repository() -> dg.RepositoryDefinition:
    from pipelines.definitions import defs

    return defs.get_repository_def()


def test_every_asset_and_check_is_defined(rlhf_home: Path) -> None:
    graph = repository().asset_graph
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS | ROUND_ASSETS
    assert {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys} == CHECKS


def test_blocking_gates_guard_registration(rlhf_home: Path) -> None:
    from assets.evaluation import ppo_beats_sft
    from assets.registry import registered_policy

    from assets.models import ppo_beats_sft_heldout

    spec = next(iter(ppo_beats_sft.check_specs))
    assert spec.blocking
    assert next(iter(ppo_beats_sft_heldout.check_specs)).blocking
    upstream = {k.to_user_string() for k in registered_policy.dependency_keys}
    assert "evaluation_report" in upstream


def test_every_step_that_moves_an_alias_shares_one_pool(rlhf_home: Path) -> None:
    # champion_policy (lineage) and round_champion (rounds) read then write the aliases: one at a time
    repo = repository()
    pools = {step.name: step.definition.pool for job in ("rlhf_lineage", "rlhf_round", "promote_champion_job",
                                                 "rollback_champion_job", "prune_versions_job")
             for step in repo.get_job(job).nodes}
    moving = {"registered_policy", "champion_policy", "round_champion", "promote_champion", "rollback_champion",
              "prune_versions"}
    assert {name: pools[name] for name in moving} == {name: "registry" for name in moving}
    assert pools["ppo_policy"] == "training"


def test_jobs_schedules_sensors_and_resources(rlhf_home: Path) -> None:
    repo = repository()
    assert JOBS <= {j.name for j in repo.get_all_jobs()}
    lineage = repo.get_job("rlhf_lineage")
    assert {k.to_user_string() for k in lineage.asset_layer.executable_asset_keys} == ASSETS
    rounds = repo.get_job("rlhf_round")
    assert {k.to_user_string() for k in rounds.asset_layer.executable_asset_keys} == ROUND_ASSETS
    assert rounds.partitions_def.name == "rlhf_round"  # a dynamic partition per round
    assert {s.name for s in repo.schedule_defs} == {"weekly_retraining"}
    assert {s.name for s in repo.sensor_defs} == {"new_preference_files", "record_run_failure"}
    # automated retraining runs rounds, not rebuilds
    assert repo.get_schedule_def("weekly_retraining").job_name == "rlhf_round"
    assert {"io_manager", "mlflow", "launcher", "notifier"} <= set(repo.get_top_level_resources())


def test_resources_follow_rlhf_home_not_dagster_home(rlhf_home: Path, monkeypatch) -> None:
    from pipelines.definitions import default_resources

    monkeypatch.setenv("DAGSTER_HOME", "/elsewhere/dagster")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resources = default_resources()
    assert Path(resources["io_manager"].base_dir) == rlhf_home / "manifests"
    assert resources["mlflow"].tracking_uri == f"sqlite:///{rlhf_home / 'mlflow' / 'mlflow.db'}"


def test_workspace_and_pyproject_point_at_the_definitions() -> None:
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    modules = [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert modules == ["pipelines.definitions"]
    assert 'module_name = "pipelines.definitions"' in (REPO_ROOT / "pyproject.toml").read_text()


def test_registry_jobs_fail_with_a_clear_message_on_an_empty_registry(
    rlhf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.definitions import default_resources

    # `defs` pins its resources to the RLHF_HOME of its first import (maybe the developer's own
    # .rlhf with a real registry); resolve them again under this test's empty home.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = repository().get_job("promote_champion_job")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False,
                                        resources=default_resources())
    assert not result.success
    failure = result.get_step_failure_events()[0]
    assert "materialize the registered_policy asset first" in str(failure.event_specific_data.error)
