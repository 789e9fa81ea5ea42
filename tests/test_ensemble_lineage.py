"""A reward model of two members through the whole graph: PPO, evaluation and the registry.

Its own module, so the tiny lineage of ``test_model_assets`` (and its RLHF_HOME) is torn down
before this one sets up.
"""
from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from test_model_assets import _meta, lineage_assets, local_resources, tiny_run_config
from tests.conftest import env_vars


@pytest.fixture(scope="module")
def ensemble_lineage(tmp_path_factory: pytest.TempPathFactory):
    """The tiny graph with ``mismatched_negatives: [0.5, 0]`` on the reward model, then registered."""
    from assets.registry import REGISTRY_ASSETS

    home = tmp_path_factory.mktemp("rlhf_home_ensemble")
    (home / "dagster_home").mkdir()
    run_config = tiny_run_config()
    run_config["ops"]["reward_model"]["config"].update(mismatched_negatives=[0.5, 0.0], kind="scalar")
    with env_vars(RLHF_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home")), \
            dg.instance_for_test(temp_dir=str(home / "dagster_home")) as instance:
        resources = local_resources(home)
        result = dg.materialize(lineage_assets(), instance=instance, resources=resources,
                                run_config=run_config, raise_on_error=False)
        # A tiny PPO need not beat SFT, so the blocking ppo_beats_sft step may fail; nothing else may.
        failed = {e.step_key for e in result.all_events if e.is_step_failure}
        assert failed <= {"evaluation_report_ppo_beats_sft"}, failed
        dg.materialize([*lineage_assets(), *REGISTRY_ASSETS], instance=instance, resources=resources,
                       selection=["registered_policy"])
        yield {"result": result, "home": home, "resources": resources}


def test_an_ensemble_reward_model_runs_through_ppo_evaluation_and_the_registry(ensemble_lineage: dict) -> None:
    """Every member is what PPO optimised, what the report scored with and what got registered."""
    result, home = ensemble_lineage["result"], ensemble_lineage["home"]
    members = json.loads((home / "manifests" / "reward_model.json").read_text())["member_paths"]
    assert [Path(m).parent.name for m in members] == ["mismatched_0.5", "mismatched_0"]
    ppo = json.loads((home / "manifests" / "ppo_policy.json").read_text())
    assert ppo["reward_ensemble"]["paths"] == members  # PPO optimised both, in this order
    client = ensemble_lineage["resources"]["mlflow"].client()
    evaluation = client.get_run(_meta(result, "evaluation_report")["mlflow_run_id"])
    assert all(m in evaluation.data.params["reward_model"] for m in members)
    manifest = json.loads((home / "manifests" / "registered_policy.json").read_text())
    versions = [client.get_model_version(manifest["reward_model_name"], v) for v in manifest["reward_model_versions"]]
    assert [v.tags["source_dir"] for v in versions] == members
    assert [v.tags["ensemble_member"] for v in versions] == ["1/2", "2/2"]
    assert str(manifest["reward_model_version"]) == str(versions[0].version)
    rm_aliases = client.get_registered_model(manifest["reward_model_name"]).aliases
    assert str(rm_aliases["challenger"]) == str(versions[0].version)
    policy = client.get_model_version(manifest["model_name"], manifest["version"])
    assert policy.tags["reward_model.versions"] == ",".join(str(v.version) for v in versions)
