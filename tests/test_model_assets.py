"""Model assets: config mapping, checks passing and failing, plots, and the whole graph on a tiny config.

The whole-graph tests run the real lineage (data -> base -> SFT -> RM -> PPO -> evaluation)
with a few steps per stage in a temporary DAGSTER_HOME / RLHF_HOME and MLflow store.
"""

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.models import (
    FIELD_MAP,
    PPOPolicyConfig,
    SFTModelConfig,
    core_config,
    ppo_kl_result,
    reward_accuracy_result,
)
from assets.plots import png_markdown, read_metrics, training_plots
from tests.conftest import env_vars


def test_sft_config_mapping_puts_seed_in_strategy_and_keeps_defaults(tmp_path: Path) -> None:
    cfg = SFTModelConfig(steps=7, seed=3, overrides={"batch_size": 8, "strategy": {"zero_stage": 0}})
    core = core_config("sft", cfg, data_dir=str(tmp_path), output_dir=str(tmp_path / "o"),
                       model_name_or_path=str(tmp_path))
    assert core.max_steps == 7 and core.batch_size == 8
    assert core.strategy.seed == 3 and core.strategy.zero_stage == 0
    assert core.learning_rate > 0  # 0 in the asset config keeps the engine's default
    assert FIELD_MAP["sft"]["steps"] == "max_steps"


def test_ppo_config_mapping_keeps_nested_defaults(tmp_path: Path) -> None:
    import pandas as pd

    from ppo_core.ppo import PPOConfig

    for name in ("train.parquet", "eval.parquet"):
        pd.DataFrame({"prompt": ["a b"]}).to_parquet(tmp_path / name)
    (tmp_path / "m").mkdir()
    paths = dict(policy_path=str(tmp_path / "m"), reward_model_path=str(tmp_path / "m"),
                 train_file=str(tmp_path / "train.parquet"), eval_file=str(tmp_path / "eval.parquet"),
                 output_dir=str(tmp_path / "o"))
    cfg = PPOPolicyConfig(steps=5, learning_rate=1e-5, seed=4, overrides={"strategy": {"offload_optimizer": False}})
    core = core_config("ppo", cfg, **paths)
    assert isinstance(core, PPOConfig) and core.num_steps == 5 and core.learning_rate == 1e-5 and core.seed == 4
    # A partial nested override keeps PPO's own strategy default (ZeRO-0), not StrategyConfig's.
    assert core.strategy.zero_stage == PPOConfig.__dataclass_fields__["strategy"].default_factory().zero_stage
    with pytest.raises(ValueError, match="eval_file"):  # the engine's input check runs in the asset
        core_config("ppo", cfg, **{**paths, "eval_file": str(tmp_path / "missing.parquet")})


def test_unknown_override_is_a_clear_error(tmp_path: Path) -> None:
    cfg = SFTModelConfig(overrides={"learning_rte": 0.1})
    with pytest.raises(ValueError, match="learning_rte"):
        core_config("sft", cfg, data_dir=str(tmp_path), output_dir=str(tmp_path), model_name_or_path="x")


# ---------------------------------------------------------------- typed stage fields (Launchpad)
# A value other than the default for every typed field of each stage.
SUPERVISED_VALUES = {"steps": 7, "learning_rate": 1e-3, "max_seconds": 30.0, "seed": 5, "zero_stage": 0,
                     "lora_rank": 4, "epochs": 3.0, "batch_size": 8, "micro_batch_size": 4, "max_length": 64}
TYPED_VALUES = {
    "sft": SUPERVISED_VALUES,
    "reward": {**SUPERVISED_VALUES, "mismatched_negatives": [0.25, 0.0], "center_coef": 0.0,
               "label_smoothing": 0.2, "dropout": 0.15, "kind": "scalar", "beta": 0.3},
    "ppo": {"steps": 3, "learning_rate": 2e-5, "max_seconds": 30.0, "seed": 5, "zero_stage": 2, "lora_rank": 8,
            "kl_coef": 0.0, "kl_target": 6.0, "response_length": 16, "temperature": 1.0,
            "rollout_batch_size": 8, "ppo_epochs": 2, "guard_every": 3, "guard_prompts": 16,
            "guard_kl_budget": 10.0, "guard_select_z": 0.5, "guard_select": "least_kl", "kl_ceiling": 0.0,
            "kl_ceiling_headroom": 1.5},
}


def stage_case(stage: str, tmp_path: Path) -> tuple[type, dict]:
    """The asset config class of ``stage`` and the paths its asset would resolve."""
    import pandas as pd

    from assets.models import RewardModelConfig

    if stage != "ppo":
        paths = dict(data_dir=str(tmp_path), output_dir=str(tmp_path / "o"), model_name_or_path=str(tmp_path))
        return (SFTModelConfig if stage == "sft" else RewardModelConfig), paths
    for name in ("train.parquet", "eval.parquet"):
        pd.DataFrame({"prompt": ["a b"]}).to_parquet(tmp_path / name)
    paths = dict(policy_path=str(tmp_path), reward_model_path=str(tmp_path), output_dir=str(tmp_path / "o"),
                 train_file=str(tmp_path / "train.parquet"), eval_file=str(tmp_path / "eval.parquet"))
    return PPOPolicyConfig, paths


def core_value(core: object, dotted: str) -> object:
    for part in dotted.split("."):
        core = getattr(core, part)
    return core


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_every_typed_field_lands_on_the_core_config(stage: str, tmp_path: Path) -> None:
    cls, paths = stage_case(stage, tmp_path)
    values = TYPED_VALUES[stage]
    assert set(values) == set(FIELD_MAP[stage])  # a new typed field needs a case here
    core = core_config(stage, cls(**values), **paths)
    landed = {name: core_value(core, FIELD_MAP[stage][name]) for name in values}
    assert landed == {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # lists land as tuples
    assert all(cls.model_fields[name].description for name in values), "the Launchpad shows descriptions"


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_default_typed_fields_keep_the_engine_defaults(stage: str, tmp_path: Path) -> None:
    from ppo_core.config import to_dict

    from assets.models import core_config_class

    cls, paths = stage_case(stage, tmp_path)
    core = to_dict(core_config(stage, cls(), **paths))
    engine = to_dict(core_config_class(stage)(**paths))
    # the one exception: the lineage pins seed 0 for every stage (assets.models.ALWAYS_APPLIED)
    seed_path = FIELD_MAP[stage]["seed"].split(".")
    for values in (core, engine):
        parent = values
        for part in seed_path[:-1]:
            parent = parent[part]
        parent.pop(seed_path[-1])
    assert core == engine


@pytest.mark.parametrize("stage, typed, overrides", [
    ("sft", {"zero_stage": 3}, {"strategy": {"zero_stage": 0}}),
    ("reward", {"batch_size": 16}, {"batch_size": 8}),
    ("ppo", {"kl_coef": 0.0}, {"kl_coef": 0.1}),
    ("ppo", {"zero_stage": 0}, {"strategy.zero_stage": 2}),
])
def test_a_field_set_typed_and_in_overrides_is_an_error(stage: str, typed: dict, overrides: dict,
                                                          tmp_path: Path) -> None:
    cls, paths = stage_case(stage, tmp_path)
    name = next(iter(typed))
    with pytest.raises(ValueError, match=rf"sets a field twice \({name}=.*overrides {FIELD_MAP[stage][name]}="):
        core_config(stage, cls(**typed, overrides=overrides), **paths)
    # overrides alone (typed field at its default) still set the same field
    assert core_value(core_config(stage, cls(overrides=overrides), **paths), FIELD_MAP[stage][name]) != typed[name]


@pytest.mark.parametrize("acc, passed", [(0.9, True), (0.6, True), (0.55, False)])
def test_reward_accuracy_check(acc: float, passed: bool) -> None:
    result = reward_accuracy_result({"summary": {"eval/accuracy": acc}}, min_accuracy=0.6)
    assert result.passed is passed and result.metadata["accuracy"].value == acc


def test_reward_accuracy_check_fails_when_metric_missing() -> None:
    result = reward_accuracy_result({"summary": {"eval/loss": 0.3}}, 0.6)
    assert result.passed is False and "eval/loss" in result.metadata["summary_keys"].value


@pytest.mark.parametrize("kl, passed", [(1.0, True), (30.0, False)])
def test_ppo_kl_check_warns(kl: float, passed: bool) -> None:
    result = ppo_kl_result({"summary": {"objective/kl": kl}}, max_kl=25.0)
    assert result.passed is passed and result.severity == dg.AssetCheckSeverity.WARN


def test_training_plots_from_metrics_file(tmp_path: Path) -> None:
    rows = [{"kind": "train", "step": s, "train/loss": 1 / s, "objective/kl": 0.1 * s,
             "objective/scores": s ** 0.5, "objective/kl_coef": 0.05} for s in range(1, 11)]
    rows.append({"kind": "eval", "step": 10, "eval/loss": 0.2})
    metrics = tmp_path / "m.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    assert len(read_metrics(metrics)) == 11
    plots = training_plots(metrics, tmp_path / "plots")
    assert set(plots) == {"loss", "reward", "kl", "frontier"}
    for png in plots.values():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_markdown(plots["kl"], "kl").startswith("![kl](data:image/png;base64,iVBOR")
    assert training_plots(tmp_path / "missing.jsonl", tmp_path / "none") == {}
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 1"):
        read_metrics(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- the whole graph, tiny config
REPO = Path(__file__).resolve().parents[1]


def lineage_assets() -> list:
    from assets.data import DATA_ASSETS, DATA_CHECKS
    from assets.evaluation import EVAL_ASSETS, EVAL_CHECKS
    from assets.models import MODEL_ASSETS, MODEL_CHECKS

    return [*DATA_ASSETS, *DATA_CHECKS, *MODEL_ASSETS, *MODEL_CHECKS, *EVAL_ASSETS, *EVAL_CHECKS]


def local_resources(home: Path) -> dict:
    from pipelines.io_managers import JsonManifestIOManager
    from resources.launcher import TrainingLauncher
    from resources.tracking import MLflowResource

    return {
        "io_manager": JsonManifestIOManager(base_dir=str(home / "manifests")),
        "mlflow": MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                 artifact_root=(home / "artifacts").as_uri()),
        # One thread per process: several test suites share this machine's two cores.
        "launcher": TrainingLauncher(omp_num_threads=1),
    }


def tiny_run_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory):
    """One tiny materialization of the whole graph, shared by the tests below."""
    home = tmp_path_factory.mktemp("rlhf_home")
    (home / "dagster_home").mkdir()
    with env_vars(RLHF_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home")), \
            dg.instance_for_test(temp_dir=str(home / "dagster_home")) as instance:
        result = dg.materialize(lineage_assets(), instance=instance, resources=local_resources(home),
                                run_config=tiny_run_config(), raise_on_error=False)
        yield {"result": result, "instance": instance, "home": home}


def test_whole_graph_materializes_with_mlflow_runs(lineage: dict) -> None:
    result, home = lineage["result"], lineage["home"]
    # A tiny PPO need not beat SFT, so the blocking ppo_beats_sft step may fail; nothing else may.
    failed = {e.step_key for e in result.all_events if e.is_step_failure}
    assert failed <= {"evaluation_report_ppo_beats_sft"}, [
        e.event_specific_data for e in result.all_events if e.is_step_failure]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert {"base_model", "sft_model", "reward_model", "ppo_policy", "evaluation_report"} <= materialized
    client = local_resources(home)["mlflow"].client()
    for asset in ("sft_model", "reward_model", "ppo_policy"):
        meta = result.asset_materializations_for_node(asset)[0].metadata
        model_path = Path(meta["model_path"].value)
        assert model_path.parent.name == result.run_id and model_path.parts[-3] == asset
        assert list(model_path.glob("*.safetensors")), f"{asset}: no safetensors weights"
        run = client.get_run(meta["mlflow_run_id"].value)
        assert run.data.tags["dagster.run_id"] == result.run_id
        assert run.data.tags["dagster.asset_key"] == asset and run.data.tags["data_version"]
        assert run.data.metrics, f"{asset}: no metrics reached MLflow"
        assert any(k.startswith("plot_") for k in meta), f"{asset}: no plot in the metadata"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "plots" in artifacts  # the weights are the run's LoggedModel (test_mlflow_lineage_...)
    ppo_meta = result.asset_materializations_for_node("ppo_policy")[0].metadata
    assert "plot_frontier" in ppo_meta and "summary/objective/kl" in ppo_meta
    # the guard (configs/tiny.yaml: every step, 8 responses) plotted proxy and held-out
    # against sqrt(KL) and says which step was kept and why, in Dagster and on the MLflow run
    assert "plot_guard" in ppo_meta and ppo_meta["stopped_reason"].value
    kept = ppo_meta["kept_step"].value
    assert 0 <= kept <= ppo_meta["trained_steps"].value
    ppo_run = client.get_run(ppo_meta["mlflow_run_id"].value)
    assert ppo_run.data.tags["rlhf.kept_step"] == str(kept)
    assert "guard/heldout" in ppo_run.data.metrics and "guard/kl_per_response" in ppo_run.data.metrics
    sft_meta = result.asset_materializations_for_node("sft_model")[0].metadata
    assert sft_meta["selected_on"].value.startswith("eval/loss on the eval split")
    held = result.asset_materializations_for_node("heldout_reward_model")[0].metadata
    assert Path(held["model_path"].value).is_dir()


def test_evaluation_report_and_checks_in_the_graph(lineage: dict) -> None:
    from assets.evaluation import ppo_beats_sft_result

    result = lineage["result"]
    meta = result.asset_materializations_for_node("evaluation_report")[0].metadata
    report = json.loads(Path(meta["report_path"].value).read_text())
    m = report["metrics"]
    assert report["gold_scorer"] == "assets.bundled_task:gold_score_batch"  # bundled data => bundled gold
    for key in ("sft/gold_mean", "ppo/gold_mean", "win_rate_gold", "win_rate_rm", "ppo/kl_to_ref",
                "ppo/ended_eos_frac", "ppo/rouge_l_mean", "sft/length_mean"):
        assert m[key] is not None, key
    assert m["n_prompts"] == 8 and "| prompt |" in meta["samples"].value
    assert m["ppo/kl_to_ref_per_response"] is not None
    # the guard's samples scored by gold after the fact, one row per evaluation (steps 0, 1, 2)
    assert meta["guard_curve"].value.count("\n| ") == 3 and "plot_guard" in meta
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert {"reward_model_accuracy", "ppo_kl_within_bound", "ppo_beats_sft"} <= set(checks)
    assert checks["reward_model_accuracy"].passed  # threshold 0 in configs/tiny.yaml
    assert checks["ppo_beats_sft"].passed == ppo_beats_sft_result(m, 0.0).passed


def test_failing_blocking_rm_check_stops_ppo(lineage: dict) -> None:
    """The reward-model gate re-evaluated with an unreachable threshold keeps PPO from running."""
    ops = tiny_run_config()["ops"]
    rc = {"ops": {"ppo_policy": ops["ppo_policy"],
                  "reward_model_reward_model_accuracy": {"config": {"min_accuracy": 1.01}}}}
    check_key = dg.AssetCheckKey(dg.AssetKey("reward_model"), "reward_model_accuracy")
    selection = dg.AssetSelection.checks(check_key) | dg.AssetSelection.assets("ppo_policy")
    selection = selection - dg.AssetSelection.checks_for_assets("ppo_policy")
    result = dg.materialize(lineage_assets(), instance=lineage["instance"],
                            resources=local_resources(lineage["home"]), run_config=rc,
                            selection=selection, raise_on_error=False)
    assert not result.success
    check = result.get_asset_check_evaluations()[0]
    assert check.check_name == "reward_model_accuracy" and check.passed is False
    assert result.get_asset_materialization_events() == []  # ppo_policy never ran


@pytest.mark.parametrize("name", ["tiny.yaml", "bundled.yaml", "user_dataset.yaml"])
def test_config_files_are_valid_run_config_for_the_lineage(name: str) -> None:
    """Every config file in configs/ is accepted by Dagster for the whole lineage."""
    import yaml

    from assets.evaluation import load_gold_scorer
    from pipelines.io_managers import JsonManifestIOManager
    from resources.launcher import TrainingLauncher
    from resources.tracking import MLflowResource

    config = yaml.safe_load((REPO / "configs" / name).read_text())
    job = dg.define_asset_job("lineage", selection=dg.AssetSelection.all())
    defs = dg.Definitions(assets=lineage_assets(), jobs=[job], resources={
        "io_manager": JsonManifestIOManager(base_dir="/nonexistent"),
        "mlflow": MLflowResource(), "launcher": TrainingLauncher()})
    dg.validate_run_config(defs.resolve_job_def("lineage"), config)
    ops = config["ops"]
    source = ops["raw_preferences"]["config"]["source"]
    if source != "bundled":
        from assets.ingest import load_preferences

        frame = load_preferences(str(REPO / source), "trl").frame
        assert {"prompt", "chosen", "rejected"} <= set(frame.columns) and len(frame) >= 1000
    spec = ops.get("evaluation_report", {}).get("config", {}).get("gold_scorer")
    if spec:
        assert load_gold_scorer(spec)(["describe the river ."], ["the river is lovely ."]) == [1.7]


def test_heldout_gain_check_gates_on_the_guard() -> None:
    from assets.models import heldout_gain_result

    summary = {"guard/improved": 1.0, "guard/heldout_gain": 0.4, "guard/heldout_gain_se": 0.1,
               "guard/kept_step": 20.0, "guard/kl_kept": 1.7}
    ok = heldout_gain_result({"summary": summary})
    assert ok.passed and ok.metadata["kept_step"].value == 20
    assert not heldout_gain_result({"summary": summary}, min_gain=0.5).passed
    worse = {**summary, "guard/improved": 0.0, "guard/heldout_gain": 0.0, "guard/kept_step": 0.0}
    refused = heldout_gain_result({"summary": worse})
    assert not refused.passed and "not registered" in refused.description
    assert heldout_gain_result({"summary": worse}, min_gain=-1.0).passed   # smoke-test setting
    off = heldout_gain_result({"summary": {"objective/kl": 1.0}})
    assert off.passed and off.severity == dg.AssetCheckSeverity.WARN


# ---------------------------------------------------------------- MLflow lineage of the tiny run
TRAINING_ASSETS = ("sft_model", "reward_model", "heldout_reward_model", "ppo_policy")


def _meta(result, asset: str) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def test_mlflow_lineage_parent_datasets_logged_models_and_system_metrics(lineage: dict) -> None:
    result = lineage["result"]
    res = local_resources(lineage["home"])["mlflow"]
    client = res.client()
    runs = client.search_runs([res.experiment_id()], filter_string=f"tags.`dagster.run_id` = '{result.run_id}'")
    [parent] = [r for r in runs if r.data.tags.get("rlhf.parent") == "true"]
    children = {r.data.tags["dagster.asset_key"]: r for r in runs if r is not parent}
    assert {*TRAINING_ASSETS, "evaluation_report"} <= set(children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"  # every MLflow step of the Dagster run ended well
    data_version = _meta(result, "sft_model")["data_version"]
    for asset in TRAINING_ASSETS:
        run, meta = children[asset], _meta(result, asset)
        model = client.get_logged_model(meta["mlflow_model_id"])
        assert model.source_run_id == run.info.run_id and model.name == asset
        # filed with its run (not the Default experiment, whose artifacts would land in ./mlruns)
        assert model.experiment_id == run.info.experiment_id
        assert model.artifact_location.startswith((lineage["home"] / "artifacts").as_uri())
        assert model.model_id in {o.model_id for o in run.outputs.model_outputs}
        # MLflow's system metrics, sampled while the stage ran
        assert "system/cpu_utilization_percentage" in run.data.metrics, asset
    inputs = {(i.dataset.name, i.dataset.digest) for i in children["sft_model"].inputs.dataset_inputs}
    assert inputs == {("sft_train", data_version), ("sft_eval", data_version)}
    ppo_inputs = {i.dataset.name for i in children["ppo_policy"].inputs.dataset_inputs}
    assert ppo_inputs == {"ppo_train", "ppo_eval"}
    eval_inputs = {i.dataset.name for i in children["evaluation_report"].inputs.dataset_inputs}
    assert eval_inputs == {"test_prompts", "test_pairs"}
    # the evaluation metrics are on the PPO policy's LoggedModel, measured on test_prompts
    ppo_model = client.get_logged_model(_meta(result, "ppo_policy")["mlflow_model_id"])
    on_model = {m.key: m for m in ppo_model.metrics or []}
    report = json.loads(Path(_meta(result, "evaluation_report")["report_path"]).read_text())["metrics"]
    assert {k for k, v in report.items() if v is not None} <= set(on_model)
    assert on_model["ppo/gold_mean"].value == pytest.approx(report["ppo/gold_mean"])
    assert (on_model["win_rate_rm"].dataset_name, on_model["win_rate_rm"].dataset_digest) == (
        "test_prompts", data_version)


def test_registered_versions_are_the_training_runs_logged_models(lineage: dict) -> None:
    """registered_policy on the tiny run's manifests registers the PPO and reward-model LoggedModels."""
    from assets.registry import REGISTRY_ASSETS
    from resources.mlflow_models import version_model_id

    result, home = lineage["result"], lineage["home"]
    resources = local_resources(home)
    registry = dg.materialize([*lineage_assets(), *REGISTRY_ASSETS], instance=lineage["instance"],
                              resources=resources, selection=["registered_policy"])
    assert registry.success
    client = resources["mlflow"].client()
    manifest = json.loads((home / "manifests" / "registered_policy.json").read_text())
    policy = client.get_model_version(manifest["model_name"], manifest["version"])
    ppo = _meta(result, "ppo_policy")
    assert version_model_id(policy) == ppo["mlflow_model_id"] == manifest["mlflow_model_id"]
    assert policy.run_id == ppo["mlflow_run_id"]  # the PPO training run, not the registering one
    rm = client.get_model_version(manifest["reward_model_name"], manifest["reward_model_version"])
    assert version_model_id(rm) == _meta(result, "reward_model")["mlflow_model_id"]
    linked = json.loads(client.get_logged_model(ppo["mlflow_model_id"]).tags["mlflow.modelVersions"])
    assert {"name": manifest["model_name"], "version": str(policy.version)} in linked
    registering = client.get_run(manifest["mlflow_run_id"])
    assert not registering.outputs or not registering.outputs.model_outputs  # nothing logged twice
    parent = client.get_run(registering.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["dagster.run_id"] == registry.run_id and parent.info.status == "FINISHED"
    # the same evaluation registered again (a retry, a second materialization): no new versions
    count = {n: len(client.search_model_versions(f"name='{n}'"))
             for n in (manifest["model_name"], manifest["reward_model_name"])}
    again = dg.materialize([*lineage_assets(), *REGISTRY_ASSETS], instance=lineage["instance"],
                           resources=resources, selection=["registered_policy"])
    assert again.success
    second = json.loads((home / "manifests" / "registered_policy.json").read_text())
    assert (second["version"], second["reward_model_version"]) == (manifest["version"], manifest["reward_model_version"])
    assert count == {n: len(client.search_model_versions(f"name='{n}'")) for n in count}
    assert str(client.get_registered_model(manifest["model_name"]).aliases["challenger"]) == str(manifest["version"])



def test_kept_metadata_says_when_the_guard_kept_a_step_other_than_the_best() -> None:
    from assets.models import _kept_metadata

    summary = {"stopped_reason": "completed", "kept_step": 25.0, "step": 60.0, "guard/kept_step": 25.0,
               "guard/best_step": 45.0, "guard/heldout_gain": 1.5, "guard/heldout_gain_se": 0.1,
               "guard/kl_kept": 6.25}
    meta = _kept_metadata(summary)
    assert meta["kept_step"] == 25 and meta["trained_steps"] == 60
    assert meta["selected_on"] == ("held-out reward model score on held-out prompts (gain +1.500 +- 0.100 over "
                                   "SFT, at 6.25 nats/response KL; the best score was at step 45, the kept one "
                                   "is within guard_select_z standard errors of it at measurably lower KL)")
    later = _kept_metadata({**summary, "guard/best_step": 15.0, "guard_select": "latest"})["selected_on"]
    assert later.endswith("the best score was at step 15, the kept one is the last within guard_select_z "
                          "standard errors of it)")
    assert "best score" not in _kept_metadata({**summary, "guard/best_step": 25.0})["selected_on"]
    assert "kl_budget" not in meta
    budget = _kept_metadata({**summary, "guard/kl_budget": 5.0, "objective/kl_coef": 0.0712})["kl_budget"]
    assert budget == "5 nats/response: checkpoints over it are never kept; KL coefficient at the end 0.0712"


def test_core_config_takes_the_data_lengths_below_typed_fields_and_overrides(tmp_path: Path) -> None:
    from assets.models import length_defaults

    seq = {"max_prompt_length": 104, "response_length": 200, "max_length": 304, "longest_prompt": 101,
           "min_response_length": 3}
    assert length_defaults("ppo", seq) == {"max_prompt_length": 104, "response_length": 200, "min_response_length": 3}
    assert length_defaults("sft", seq) == {"max_length": 304} == length_defaults("reward", seq)
    assert length_defaults("ppo", None) == {}        # a manifest from before lengths were measured
    _, paths = stage_case("ppo", tmp_path)
    core = core_config("ppo", PPOPolicyConfig(), length_defaults("ppo", seq), **paths)
    assert (core.max_prompt_length, core.response_length, core.min_response_length) == (104, 200, 3)
    typed = core_config("ppo", PPOPolicyConfig(response_length=16), length_defaults("ppo", seq), **paths)
    assert (typed.max_prompt_length, typed.response_length, typed.min_response_length) == (104, 16, 3)
    # an operator's response_length at or below the data's shortest answer turns the floor
    # off instead of refusing the stage; set by the operator, it is theirs (and validated)
    assert core_config("ppo", PPOPolicyConfig(response_length=3), length_defaults("ppo", seq),
                       **paths).min_response_length == 1
    assert core_config("ppo", PPOPolicyConfig(overrides={"response_length": 2}), length_defaults("ppo", seq),
                       **paths).min_response_length == 1
    assert core_config("ppo", PPOPolicyConfig(overrides={"min_response_length": 5}), length_defaults("ppo", seq),
                       **paths).min_response_length == 5
    from ppo_core.config import ConfigError
    with pytest.raises(ConfigError, match="min_response_length 5 >= response_length 4"):
        core_config("ppo", PPOPolicyConfig(response_length=4, overrides={"min_response_length": 5}),
                    length_defaults("ppo", seq), **paths)
    over = core_config("ppo", PPOPolicyConfig(overrides={"max_prompt_length": 128}), length_defaults("ppo", seq),
                       **paths)
    assert over.max_prompt_length == 128
    sft = core_config("sft", SFTModelConfig(), length_defaults("sft", seq), data_dir=str(tmp_path),
                      output_dir=str(tmp_path / "s"), model_name_or_path="x")
    assert sft.max_length == 304


# the engines' from-scratch defaults (ppo_core.sft / reward / ppo) and what a pretrained start turns them into
SCRATCH = {"sft": {"learning_rate": 1e-3, "num_epochs": 10.0},
           "reward": {"learning_rate": 1e-3, "num_epochs": 4.0, "kind": "implicit"},
           "ppo": {"learning_rate": 1e-4, "critic_learning_rate": 3e-4}}
PRETRAINED = {"sft": {"learning_rate": 2e-5, "num_epochs": 3.0},
              "reward": {"learning_rate": 9e-6, "num_epochs": 1.0, "kind": "scalar"},
              "ppo": {"learning_rate": 3e-6, "critic_learning_rate": 9e-6}}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_a_pretrained_start_fine_tunes_below_typed_fields_and_overrides(stage: str, tmp_path: Path) -> None:
    """A hub model must not be trained at the from-scratch learning rates; an operator still decides."""
    from assets.models import length_defaults, start_defaults

    cls, paths = stage_case(stage, tmp_path)
    seq = {"max_prompt_length": 72, "response_length": 40, "max_length": 120}

    def core(cfg: object, start: dict | None) -> dict:
        c = core_config(stage, cfg, start_defaults(stage, start), **paths)
        return {k: getattr(c, k) for k in PRETRAINED[stage]}

    assert core(cls(), None) == SCRATCH[stage]
    assert core(cls(), {"lengths": seq, "pretrained": False}) == SCRATCH[stage]
    assert core(cls(), {"lengths": seq, "pretrained": True}) == PRETRAINED[stage]
    # the lengths still come along with the pretrained settings
    assert start_defaults(stage, {"lengths": seq, "pretrained": True}) == {
        **length_defaults(stage, seq), **PRETRAINED[stage]}
    # a base_model manifest from before the flag existed: its source decides
    assert core(cls(), {"source": "Qwen/Qwen2.5-0.5B"}) == PRETRAINED[stage]
    assert core(cls(), {"source": "auto"}) == SCRATCH[stage]
    assert core(cls(learning_rate=5e-5), {"pretrained": True})["learning_rate"] == 5e-5
    other = next(k for k in PRETRAINED[stage] if k != "learning_rate")
    assert core(cls(overrides={other: 2.0}), {"pretrained": True})[other] == 2.0


def test_sft_from_a_local_pretrained_folder_runs_with_fine_tuning_defaults(tmp_path: Path) -> None:
    """base_model counts a local save_pretrained folder (here a GPT-2 built from its real config,
    standing in for a trained one) as pretrained unless told otherwise, and sft_model's stage
    config, the one the engine ran with, has TRL's settings."""
    import pandas as pd

    from assets.models import base_model, sft_model
    from ppo_core.models import build_base_model

    rows = [{"prompt": f"say {w} .", "completion": f"{w} {w} .", "chosen": f"{w} .", "rejected": "no"}
            for w in ["red", "blue", "green", "gold", "pink", "gray", "teal", "rust"] * 4]
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for name in ("sft_train", "sft_eval"):
        pd.DataFrame(rows)[["prompt", "completion"]].to_parquet(split_dir / f"{name}.parquet")
    pd.DataFrame(rows)[["prompt", "chosen", "rejected"]].to_parquet(split_dir / "rm_train.parquet")
    pd.DataFrame(rows)[["prompt"]].to_parquet(split_dir / "ppo_train.parquet")
    hub = build_base_model([r["prompt"] + " " + r["completion"] for r in rows], tmp_path / "hub", arch="gpt2")

    @dg.asset(name="dataset_splits")
    def splits_stub() -> dict:
        return {"split_dir": str(split_dir), "data_version": "dv"}

    home = tmp_path / "home"
    with env_vars(RLHF_HOME=str(home)):
        result = dg.materialize([splits_stub, base_model, sft_model], resources=local_resources(home),
                                run_config={"ops": {"base_model": {"config": {"source": str(hub)}},
                                                    "sft_model": {"config": {"steps": 2}}}})
    assert result.success
    manifests = home / "manifests"
    assert json.loads((manifests / "base_model.json").read_text())["pretrained"] is True
    pretrained_version = result.asset_materializations_for_node("base_model")[0].tags["dagster/data_version"]
    assert pretrained_version.endswith("+pretrained")     # the same weights marked untrained are other data
    sft = json.loads((manifests / "sft_model.json").read_text())
    assert sft["pretrained"] is True                    # carried on to the stages after SFT
    ran = json.loads(Path(sft["config_path"]).read_text())
    assert (ran["learning_rate"], ran["num_epochs"], ran["max_steps"]) == (2e-5, 3.0, 2)

    # a local folder of untrained weights says so, and trains with the from-scratch defaults
    home = tmp_path / "home2"
    with env_vars(RLHF_HOME=str(home)):
        result = dg.materialize([splits_stub, base_model, sft_model], resources=local_resources(home),
                                run_config={"ops": {"base_model": {"config": {"source": str(hub), "pretrained": False}},
                                                    "sft_model": {"config": {"steps": 2}}}})
    assert result.success
    untrained_version = result.asset_materializations_for_node("base_model")[0].tags["dagster/data_version"]
    assert untrained_version + "+pretrained" == pretrained_version
    sft = json.loads((home / "manifests" / "sft_model.json").read_text())
    assert sft["pretrained"] is False
    ran = json.loads(Path(sft["config_path"]).read_text())
    assert (ran["learning_rate"], ran["num_epochs"]) == (1e-3, 10.0)


def test_base_model_measures_the_data_and_widens_a_built_models_context(tmp_path: Path) -> None:
    """Prompts and answers of ~150 words: a built model needs more than its 256 positions."""
    import random

    import pandas as pd

    from assets.models import base_model, model_context
    from pipelines.io_managers import JsonManifestIOManager
    from ppo_core import lengths

    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    rows = [{"prompt": text(150), "chosen": text(140), "rejected": text(160)} for _ in range(40)]
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    frame = pd.DataFrame(rows)
    frame.rename(columns={"chosen": "completion"})[["prompt", "completion"]].to_parquet(split_dir / "sft_train.parquet")
    frame.to_parquet(split_dir / "rm_train.parquet")
    frame[["prompt"]].to_parquet(split_dir / "ppo_train.parquet")

    @dg.asset(name="dataset_splits")
    def splits_stub() -> dict:
        return {"split_dir": str(split_dir), "data_version": "dv"}

    home = tmp_path / "home"
    with env_vars(RLHF_HOME=str(home)):
        result = dg.materialize([splits_stub, base_model], resources={
            "io_manager": JsonManifestIOManager(base_dir=str(home / "manifests"))},
            run_config={"ops": {"base_model": {"config": {"source": "tiny"}}}})
    manifest = json.loads((home / "manifests" / "base_model.json").read_text())
    seq = manifest["lengths"]
    assert seq["longest_prompt"] > 64 and seq["response_length"] > 32 and seq["max_length"] > 128
    assert seq["max_prompt_length"] == lengths.round_up(seq["longest_prompt"])
    positions = model_context(Path(manifest["model_path"]))
    assert positions == lengths.context_for(seq, floor=0) > 256
    assert result.asset_materializations_for_node("base_model")[0].metadata["context"].value == positions


@pytest.mark.parametrize("config, message", [
    # n_layer with source 'tiny' would be ignored (tiny is 2 x 128)
    ({"source": "tiny", "n_layer": 4}, "source 'tiny' has a fixed size"),
    # a built model has random weights: fine-tuning them at 2e-5 would barely train them
    ({"source": "auto", "pretrained": True}, "builds a model with random weights"),
])
def test_base_model_refuses_a_setting_it_would_otherwise_ignore(config: dict, message: str, tmp_path: Path) -> None:
    from assets.models import base_model
    from pipelines.io_managers import JsonManifestIOManager

    @dg.asset(name="dataset_splits")
    def splits_stub() -> dict:
        return {"split_dir": str(tmp_path), "data_version": "dv"}

    home = tmp_path / "home"
    with env_vars(RLHF_HOME=str(home)):
        result = dg.materialize([splits_stub, base_model], raise_on_error=False, resources={
            "io_manager": JsonManifestIOManager(base_dir=str(home / "manifests"))},
            run_config={"ops": {"base_model": {"config": config}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert message in str(failure.event_specific_data.error)
    assert not (home / "manifests" / "base_model.json").exists()


def test_kept_metadata_names_the_shipped_reward_model_candidate() -> None:
    from assets.models import _kept_metadata

    summary = {"stopped_reason": "completed", "best_step": 700, "step": 700, "best_metric_name": "eval/loss",
               "best_metric": 0.56, "mismatched_negatives": 0.0, "candidate_metric": "eval/accuracy",
               "eval/accuracy": 0.722, "candidates": [{"mismatched_negatives": 0.5, "eval/accuracy": 0.678},
                                                      {"mismatched_negatives": 0.0, "eval/accuracy": 0.722}]}
    assert _kept_metadata(summary)["mismatched_negatives"] == "0 (eval/accuracy 0.722; 0.5: 0.678)"
    assert "mismatched_negatives" not in _kept_metadata({k: v for k, v in summary.items() if k != "candidates"})


def test_the_heldout_reward_model_takes_one_value() -> None:
    import dagster as dg

    from assets.models import HeldoutRewardModelConfig, heldout_reward_model

    with dg.build_asset_context() as context, pytest.raises(dg.Failure, match="one value") as info:
        heldout_reward_model(context, config=HeldoutRewardModelConfig(mismatched_negatives=[0.5, 0.0]),
                             mlflow=None, launcher=None, dataset_splits={}, sft_model={})
    assert info.value.allow_retries is False


def test_ppo_scores_with_every_member_of_a_reward_model_with_candidates(tmp_path: Path) -> None:
    from assets.models import reward_model_paths, stage_inputs
    from ppo_core.reward import RewardConfig

    assert reward_model_paths({"model_path": "rm/final"}) == "rm/final"
    assert reward_model_paths({"model_path": "rm/final", "member_paths": ["a/final", "b/final"]}) == [
        "a/final", "b/final"]
    # each member's weights are an input of PPO's checkpoints: a changed member is a new input
    members = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(f'{{"name": "{name}"}}')
        members.append(str(tmp_path / name))
    cfg = RewardConfig(model_name_or_path=members[0], data_dir=str(tmp_path), output_dir="")
    inputs = stage_inputs(cfg, "dv1", {"reward_model_path": members})
    assert set(inputs["models"]) == {"reward_model_path[0]", "reward_model_path[1]"}
    (tmp_path / "b" / "config.json").write_text('{"name": "changed"}')
    assert stage_inputs(cfg, "dv1", {"reward_model_path": members})["models"] != inputs["models"]
