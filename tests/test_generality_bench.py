"""The generality benchmark runs end to end (issue 11, item 6), so it cannot rot.

A ``--tiny`` run of ``bench/generality.py`` on one task in a subprocess: the documented user
path (``rlhf run``) and the TRL pipeline on the same splits, both evaluated by one function.
The test checks the report's structure and that every number is finite and in range. No
timing assertions, and no quality assertions: a tiny run trains for a handful of steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_bench_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "generality.py"
TASK = "arithmetic"

pytest.importorskip("trl.experimental.ppo", reason="the bench extra (trl==1.12.0) is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("generality")
    out = tmp / "tiny.json"
    # RLHF_HOME / DAGSTER_HOME of a test fixture must not leak into the benchmark's runs
    # --set reaches the run: a one-layer model (auto size otherwise), which TRL's side starts from too
    proc = run_bench_script(
        [str(SCRIPT), "--tiny", "--tasks", TASK, "--work-dir", str(tmp / "work"), "--out", str(out),
         "--set", "base_model.source=auto", "--set", "base_model.n_layer=1"],
        timeout=900, drop=("RLHF_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI"))
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert out.exists(), "the script did not write the --out JSON"
    data = json.loads(out.read_text())
    data["_stdout"] = proc.stdout
    return data


def test_report_structure(report: dict) -> None:
    for key in ("command", "commit", "machine", "tiny", "n_pairs", "seeds", "trl_recipe", "tasks", "errors"):
        assert key in report, f"report lacks {key!r}"
    assert report["tiny"] is True and "--tiny" in report["command"]
    assert report["errors"] == {}
    assert list(report["tasks"]) == [TASK]
    block = report["tasks"][TASK]
    assert [r["seed"] for r in block["runs"]] == [0]
    metrics = [row["metric"] for row in block["table"]]
    assert metrics == ["rm_gold_agreement", "gold_sft", "gold_ppo", "gold_gain", "gold_win_rate",
                       "kl_nats_per_response", "wall_s"]


def test_both_sides_ran_on_the_same_data(report: dict) -> None:
    run = report["tasks"][TASK]["runs"][0]
    ours, trl = run["ours"], run["trl"]
    # the user path: rlhf run on the written task config, which points at the task's scorer
    assert "rlhf" in ours["command"] and "run --config" in ours["command"]
    assert ours["summary"]["status"] in ("succeeded", "failed")
    for side in (ours, trl):
        for key in ("sft", "rm", "ppo"):
            assert Path(side["paths"][key], "config.json").is_file(), f"{key} model missing"
    # TRL started from the base model and splits our run wrote
    assert Path(ours["paths"]["split_dir"], "test_pairs.parquet").is_file()
    # TRL's PPO generated as long as ours did
    stage = json.loads(Path(ours["paths"]["ppo_stage_config"]).read_text())
    assert trl["recipe"]["response_length"] == stage["response_length"]
    assert set(trl["stage_s"]) == {"sft_s", "rm_s", "ppo_s"}
    # the --set settings reached our run, and TRL started from the same one-layer base model
    assert report["sets"] == ["base_model.source=auto", "base_model.n_layer=1"]
    assert run["config"].endswith("config_set.yaml")
    base = json.loads(Path(ours["paths"]["base"], "config.json").read_text())
    assert base["num_hidden_layers"] == 1
    for side in (ours, trl):
        assert json.loads(Path(side["paths"]["ppo"], "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize("side", ["ours", "trl"])
def test_numbers_finite_and_in_range(report: dict, side: str) -> None:
    ev = report["tasks"][TASK]["runs"][0][side]["eval"]
    for key in ("rm_gold_agreement", "rm_pair_accuracy"):
        assert 0.0 <= ev[key] <= 1.0, f"{side}.{key} = {ev[key]!r}"
    # the win rate and the means, recomputed from the per-sample gold scores the report keeps
    # (the i-th SFT and PPO answers are to the same prompt; a tie counts half)
    sft, ppo = ev["gold_sft_scores"], ev["gold_ppo_scores"]
    assert len(sft) == len(ppo) == ev["n_samples"] > 0
    wins = sum(p > s for p, s in zip(ppo, sft)) + 0.5 * sum(p == s for p, s in zip(ppo, sft))
    assert ev["gold_win_rate"] == pytest.approx(wins / len(sft))
    assert ev["gold_sft"] == pytest.approx(sum(sft) / len(sft))
    assert ev["gold_ppo"] == pytest.approx(sum(ppo) / len(ppo))
    for key in ("gold_sft", "gold_ppo", "gold_gain", "kl_nats_per_response", "kl_per_token"):
        assert isinstance(ev[key], float) and math.isfinite(ev[key]), f"{side}.{key} = {ev[key]!r}"
    assert ev["gold_gain"] == pytest.approx(ev["gold_ppo"] - ev["gold_sft"])
    assert 0 < ev["ppo_response_tokens"] <= report["tasks"][TASK]["runs"][0]["evaluation"]["max_new_tokens"]
    assert report["tasks"][TASK]["runs"][0][side]["wall_s"] > 0


def test_cross_check_and_table(report: dict) -> None:
    block = report["tasks"][TASK]
    rows = {r["metric"]: r for r in block["table"]}
    run = block["runs"][0]
    # one seed: the table is that seed's numbers, the ratio ours / TRL
    assert rows["gold_ppo"]["ours"] == pytest.approx(run["ours"]["eval"]["gold_ppo"])
    assert rows["wall_s"]["ratio"] == pytest.approx(run["ours"]["wall_s"] / run["trl"]["wall_s"])
    # the shared evaluation reproduces our run's own evaluation: same prompts, seed and sampler
    summary = run["ours"]["summary"]
    assert rows["gold_sft"]["ours_summary"] == pytest.approx(summary["gold_reward_sft"])
    assert run["ours"]["eval"]["gold_sft"] == pytest.approx(summary["gold_reward_sft"], abs=1e-6)
    assert run["ours"]["eval"]["rm_gold_agreement"] == pytest.approx(
        summary["reward_model_gold_agreement"], abs=1e-6)
    for row in block["table"]:
        assert f"| {row['label']} |" in report["_stdout"]


def test_trl_side_reused_only_from_the_same_inputs(tmp_path: Path) -> None:
    """--reuse-trl takes TRL's side from a report only when splits, base model and recipe match."""
    import sys

    sys.path.insert(0, str(REPO))
    from bench.generality import TRLRecipe, reusable_trl, trl_inputs

    split, base = tmp_path / "splits" / "abc123", tmp_path / "base"
    split.mkdir(parents=True)
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    inputs = trl_inputs(str(split), str(base), TRLRecipe())
    trl_side = {"eval": {"gold_win_rate": 0.7}, "stage_s": {"sft_s": 1, "rm_s": 1, "ppo_s": 1}}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"tasks": {TASK: {"runs": [
        {"seed": 0, "trl_inputs": inputs, "trl": trl_side, "ours": {"paths": {}}}]}}}))

    assert reusable_trl(str(report), TASK, 0, inputs) == trl_side
    assert reusable_trl(str(report), TASK, 1, inputs) is None          # another seed
    assert reusable_trl(str(report), "style", 0, inputs) is None       # another task
    assert reusable_trl("", TASK, 0, inputs) is None                   # no report given
    (base / "model.safetensors").write_bytes(b"other weights")         # another base model
    assert reusable_trl(str(report), TASK, 0, trl_inputs(str(split), str(base), TRLRecipe())) is None
    (base / "model.safetensors").write_bytes(b"weights")
    longer = TRLRecipe(response_length=TRLRecipe().response_length + 1)  # another recipe
    assert reusable_trl(str(report), TASK, 0, trl_inputs(str(split), str(base), longer)) is None


def test_trl_seed_reaches_the_recipe_and_reruns_trl(tmp_path: Path) -> None:
    """--trl-seed changes only TRL's training seed, and a report from another seed is not reused."""
    import sys

    sys.path.insert(0, str(REPO))
    from bench.generality import TINY_RECIPE, TRLRecipe, build_parser, reusable_trl, trl_inputs, trl_recipe

    assert trl_recipe(build_parser().parse_args([])) == TRLRecipe()
    assert trl_recipe(build_parser().parse_args(["--tiny"])) == TINY_RECIPE
    seeded = trl_recipe(build_parser().parse_args(["--trl-seed", "2"]))
    assert seeded.seed == 2 and seeded == TRLRecipe(seed=2)
    assert trl_recipe(build_parser().parse_args(["--tiny", "--trl-seed", "3"])).ppo_episodes == TINY_RECIPE.ppo_episodes

    split, base = tmp_path / "splits" / "abc123", tmp_path / "base"
    split.mkdir(parents=True)
    base.mkdir()
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"tasks": {TASK: {"runs": [
        {"seed": 0, "trl_inputs": trl_inputs(str(split), str(base), TRLRecipe()), "trl": {"eval": {}},
         "ours": {"paths": {}}}]}}}))
    assert reusable_trl(str(report), TASK, 0, trl_inputs(str(split), str(base), seeded)) is None
    assert reusable_trl(str(report), TASK, 0, trl_inputs(str(split), str(base), TRLRecipe())) is not None


def test_set_writes_one_field_per_item() -> None:
    import sys

    sys.path.insert(0, str(REPO))
    from bench.generality import apply_sets

    config = {"ops": {"base_model": {"config": {"source": "auto"}}, "sft_model": {"config": {}},
                      "reward_model": None}}
    out = apply_sets(config, ["base_model.n_layer=4", "sft_model.overrides.stopping.patience=3",
                              "reward_model.center_coef=0", "sft_model.learning_rate=1e-3"])
    assert out["ops"]["base_model"]["config"] == {"source": "auto", "n_layer": 4}
    assert out["ops"]["sft_model"]["config"] == {"overrides": {"stopping": {"patience": 3}}, "learning_rate": 0.001}
    assert out["ops"]["reward_model"]["config"] == {"center_coef": 0}
    assert config["ops"]["base_model"]["config"] == {"source": "auto"}     # the input is left alone
    for bad, says in (("base_modl.n_layer=4", "no op 'base_modl'"), ("base_model.n_layer", "OP.FIELD=VALUE"),
                      ("base_model=4", "OP.FIELD=VALUE"), ("base_model.source.x=1", "'source' is not a mapping")):
        with pytest.raises(SystemExit, match=says):
            apply_sets(config, [bad])
