"""Gold scorers are imported before any model trains: by ``rlhf run`` / ``rlhf rounds``
(tests/test_cli.py) and by every training asset, for runs launched from the Dagster UI."""

import json
from pathlib import Path

import dagster as dg

from assets.preflight import gold_scorer_errors, gold_scorer_specs
from tests.conftest import env_vars
from tests.test_model_assets import lineage_assets, local_resources, tiny_run_config


def test_specs_list_every_gold_scorer_the_config_names() -> None:
    config = {"ops": {
        "evaluation_report": {"config": {"gold_scorer": " my_scorer:score ", "max_prompts": 96}},
        "round_preferences": {"config": {"gold_scorer": "other.mod:gold"}},
        "round_evaluation": {"config": {"gold_scorer": "none"}},
        "ppo_policy": {"config": {"overrides": {"reward_function": "rules:reward"}}},
        "sft_model": {"config": None}, "reward_model": None, "base_model": "tiny",
    }}
    assert gold_scorer_specs(config) == [("evaluation_report.gold_scorer", "my_scorer:score"),
                                         ("round_preferences.gold_scorer", "other.mod:gold")]
    assert gold_scorer_specs({}) == [] and gold_scorer_specs(None) == []
    assert gold_scorer_errors({"ops": {"evaluation_report": {"config": {"gold_scorer": ""}}}}) == []


def test_errors_say_what_failed_and_whether_the_working_directory_is_importable(tmp_path: Path,
                                                                              monkeypatch) -> None:
    (tmp_path / "my_scorer_mod.py").write_text("def score(prompts, responses):\n    return [0.0] * len(prompts)\n")
    (tmp_path / "broken_scorer_mod.py").write_text("def score(:\n")
    (tmp_path / "dep_scorer_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = {"ops": {"evaluation_report": {"config": {"gold_scorer": "my_scorer_mod:score"}}}}
    assert gold_scorer_errors(config) == []

    def error(spec: str) -> str:
        config["ops"]["evaluation_report"]["config"]["gold_scorer"] = spec
        (only,) = gold_scorer_errors(config)
        assert only.startswith("evaluation_report.gold_scorer: ")
        return only

    # only a missing module (or package above it) is a question of where Python looks
    assert error("not_a_scorer_module:score").endswith(f"the working directory ({tmp_path}) is on the import path")
    assert error("not_a_scorer_pkg.sub:score").endswith("is on the import path")
    missing_callable = error("my_scorer_mod:scor")
    assert "has no callable 'scor'" in missing_callable and "working directory" not in missing_callable
    assert error("broken_scorer_mod:score").startswith(
        "evaluation_report.gold_scorer: importing 'broken_scorer_mod:score' raised SyntaxError: ")
    assert error("dep_scorer_mod:score") == ("evaluation_report.gold_scorer: importing 'dep_scorer_mod:score' "
                                             "raised ModuleNotFoundError: No module named 'no_such_dependency_xyz'")
    assert "must look like 'package.module:function'" in error("no_colon")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert error("not_a_scorer_module:score").endswith(f"the working directory ({elsewhere}) is not on the import path")


def test_a_run_from_the_ui_fails_at_its_first_training_step_without_retrying(tmp_path: Path) -> None:
    """A lineage run whose evaluation_report names a scorer that does not import: the data and
    the base model materialize, sft_model fails once (no retry) before it trains, and nothing
    downstream runs. Without the check it would fail in evaluation_report, every model trained."""
    home = tmp_path / "home"
    (home / "dagster_home").mkdir(parents=True)
    run_config = tiny_run_config()
    run_config["ops"]["evaluation_report"]["config"]["gold_scorer"] = "no_such_scorer_module:score"
    with env_vars(RLHF_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home")), \
            dg.instance_for_test(temp_dir=str(home / "dagster_home")) as instance:
        result = dg.materialize(lineage_assets(), instance=instance, resources=local_resources(home),
                                run_config=run_config, raise_on_error=False)
    assert not result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "base_model" in materialized
    assert not materialized & {"sft_model", "reward_model", "heldout_reward_model", "ppo_policy", "evaluation_report"}
    (failure,) = result.get_step_failure_events()
    assert failure.step_key == "sft_model"
    message = failure.event_specific_data.error.message
    assert "nothing was trained" in message
    assert "evaluation_report.gold_scorer: reward function 'no_such_scorer_module:score': cannot import module" in message
    assert not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert not (home / "models" / "sft_model").exists()
    assert not (home / "manifests" / "sft_model.json").exists()
    assert json.loads((home / "manifests" / "base_model.json").read_text())["model_path"]
