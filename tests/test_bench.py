"""The PPO-vs-TRL benchmark runs end to end (issue 5), so it cannot rot.

A ``--tiny`` run of ``bench/ppo_vs_trl.py`` in a subprocess writes its JSON report; the test
checks the report's structure and that every measured number is finite and positive where it
must be. No timing assertions: speed is what the benchmark reports, not what a test enforces.
The second scale (``--scale 20m``, issue 13) is checked by its parameter count and FLOP formula
against hand-computed values, and by a ``--tiny --scale 20m`` run whose stored FLOP accounting
is recomputed from its token counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_bench_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "ppo_vs_trl.py"

pytest.importorskip("trl.experimental.ppo", reason="the bench extra (trl==1.12.0) is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = run_bench_script([str(SCRIPT), "--tiny", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert out.exists(), "the script did not write the --out JSON"
    data = json.loads(out.read_text())
    data["_stdout"] = proc.stdout
    return data


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_report_has_every_section(report: dict) -> None:
    for key in ("command", "config", "fixture", "machine", "gold_before", "ours", "trl",
                "comparison", "generation", "flops", "scaling", "missed"):
        assert key in report, f"report lacks {key!r}"
    assert "--tiny" in report["command"]
    # the same work on both sides
    for side in ("ours", "trl"):
        run = report[side]
        assert run["iterations"] == report["config"]["iterations"]
        assert run["batch_size"] == report["config"]["batch_size"]
        assert run["episodes"] == run["iterations"] * run["batch_size"]


@pytest.mark.parametrize("side", ["ours", "trl"])
def test_run_numbers_are_positive_and_finite(report: dict, side: str) -> None:
    run = report[side]
    for key in ("wall_s", "episodes_per_s", "episodes_per_cpu_s", "generated_tokens",
                "generated_tokens_per_s", "generation_s", "scoring_s", "training_s",
                "train_tokens", "training_flops", "peak_rss_mb"):
        assert _positive(run[key]), f"{side}.{key} = {run[key]!r}"
    assert len(run["step_s"]) == run["iterations"] and all(map(_positive, run["step_s"]))
    # the phases partition the wall time
    assert run["generation_s"] + run["scoring_s"] + run["training_s"] == pytest.approx(
        run["wall_s"], rel=1e-6)
    for key in ("gold_after", "kl_to_ref"):
        assert math.isfinite(run[key])
    # responses are never longer than the configured limit
    assert 0 < run["eval_response_tokens"] <= report["config"]["response_length"]
    assert run["generated_tokens"] <= run["episodes"] * report["config"]["response_length"]


def test_comparison_table_rows(report: dict) -> None:
    rows = {r["metric"]: r for r in report["comparison"]}
    assert "episodes/s" in rows and rows["episodes/s"]["status"] in ("MET", "MISSED")
    gain = [r for r in report["comparison"] if r["metric"].startswith("gold-reward gain")]
    assert len(gain) == 1 and gain[0]["status"].split()[0] in ("MET", "MISSED")
    eps = rows["episodes/s"]
    assert eps["ratio"] == pytest.approx(eps["ours"] / eps["trl"])
    # the printed table carries the same rows, and a MISSED target is spelled out
    for metric in rows:
        assert f"| {metric} |" in report["_stdout"]
    missed_rows = [r for r in report["comparison"] if r["status"].startswith("MISSED")]
    assert len(report["missed"]) >= len(missed_rows)


def test_generation_flops_and_scaling_sections(report: dict) -> None:
    g = report["generation"]
    for key in ("ours_s", "hf_generate_s", "ours_tokens_per_s", "hf_generate_tokens_per_s",
                "speedup"):
        assert _positive(g[key]), f"generation.{key} = {g[key]!r}"
    f = report["flops"]
    assert "6 x" in f["formula"]
    for key in ("peak_gflops", "ours_gflops", "trl_gflops", "ours_fraction"):
        assert _positive(f[key]), f"flops.{key} = {f[key]!r}"
    assert f["ours_fraction"] == pytest.approx(f["ours_gflops"] / f["peak_gflops"])
    # the policy's forward + backward alone, at a mini-batch's tokens and at 8x
    sizes = [a["positions"] for a in f["alone"]]
    assert len(sizes) == 2 and sizes[1] == 8 * sizes[0]
    for a in f["alone"]:
        assert _positive(a["gflops"]) and a["fraction"] == pytest.approx(a["gflops"] / f["peak_gflops"])
        assert f"policy forward + backward alone, {a['positions']} packed positions" in report["_stdout"]
    # the zero-overhead bound: training at that rate, generation and scoring as measured
    o = report["ours"]
    assert f["zero_overhead_training_s"] == pytest.approx(o["training_flops"] / (f["alone"][0]["gflops"] * 1e9))
    assert f["zero_overhead_episodes_per_s"] == pytest.approx(
        o["episodes"] / (o["generation_s"] + o["scoring_s"] + f["zero_overhead_training_s"]))
    s = report["scaling"]
    lengths = [r["response_length"] for r in s["by_response_length"]]
    assert len(lengths) >= 3 and lengths == sorted(lengths)
    assert len({r["batch_size"] for r in s["by_batch_size"]}) == 2
    assert len(s["growth_vs_linear"]) == len(lengths) - 1
    for r in s["by_response_length"] + s["by_batch_size"]:
        assert _positive(r["step_s"])
        assert r["generated_tokens_per_episode"] <= r["response_length"]
    assert s["status"] in ("MET", "MISSED")


# ---------------------------------------------------------------------------------------------
# quality mode (issue 11, item 5): gold gain over seeds with a paired confidence interval
# ---------------------------------------------------------------------------------------------


def test_t_interval_against_hand_computed_values() -> None:
    from bench.common import mean_ci, t_quantile

    # Student t quantiles from tables: t_{0.975} at df 1, 2, 4, 9; t_{0.995} at df 1
    for p, df, expected in ((0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764),
                            (0.975, 9, 2.2622), (0.995, 1, 63.6567)):
        assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    # [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3); half-width 4.3027 / sqrt(3) = 2.4841
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci["mean"] == pytest.approx(2.0) and ci["se"] == pytest.approx(1 / math.sqrt(3))
    assert (ci["lo"], ci["hi"]) == (pytest.approx(2 - 2.48414, abs=1e-4), pytest.approx(2 + 2.48414, abs=1e-4))
    assert not ci["decisive"]
    # [1.0, 1.2, 0.8, 1.1]: mean 1.025, sd 0.17078, se 0.08539; half-width 3.1824 * se = 0.27175
    ci = mean_ci([1.0, 1.2, 0.8, 1.1])
    assert ci["lo"] == pytest.approx(1.025 - 0.27175, abs=1e-4) and ci["decisive"]
    with pytest.raises(ValueError, match=">= 2"):
        mean_ci([1.0])


@pytest.fixture(scope="module")
def quality_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quality.json"
    proc = run_bench_script(
        [str(SCRIPT), "--tiny", "--quality-seeds", "2", "--quality-prompts", "24",
         "--ours-set", "strategy.gradient_clipping=0", "--out", str(out)],
        timeout=600, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, f"quality mode failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["_stdout"] = proc.stdout
    return data


def test_quality_mode_rows_and_interval(quality_report: dict) -> None:
    q = quality_report["quality"]
    assert quality_report["mode"] == "quality" and "--quality-seeds" in quality_report["command"]
    assert q["n_seeds"] == 2 and [r["seed"] for r in q["seeds"]] == [0, 1]
    assert q["eval_responses"] == 24
    assert q["ours_overrides"] == [["strategy.gradient_clipping", 0]]
    for r in q["seeds"]:
        before = r["gold_before"]["gold"]
        assert math.isfinite(before)
        for side in ("ours", "trl"):
            run = r[side]
            for key in ("gold_after", "kl_to_ref", "kl_to_ref_se", "gain"):
                assert math.isfinite(run[key]), f"seed {r['seed']} {side}.{key} = {run[key]!r}"
            # gain = after - before on the same prompts
            assert run["gain"] == pytest.approx(run["gold_after"] - before)
            assert 0 < run["eval_response_tokens"] <= quality_report["quality"]["response_length"]
            assert len(run["train_curve"]["objective/scores"]) == q["iterations"]
        assert r["diff"] == pytest.approx(r["ours"]["gain"] - r["trl"]["gain"])
    for c in (q["gain"]["ours"], q["gain"]["trl"], q["kl"]["ours"], q["kl"]["trl"], q["diff"],
              q["kl_diff"]):
        assert all(math.isfinite(c[k]) for k in ("mean", "se", "lo", "hi"))
        assert c["lo"] <= c["mean"] <= c["hi"] and c["n"] == 2
        assert c["decisive"] == (c["lo"] > 0 or c["hi"] < 0)
    assert q["diff"]["mean"] == pytest.approx(sum(r["diff"] for r in q["seeds"]) / 2)
    # the printed report carries the per-seed rows and the verdict
    out = quality_report["_stdout"]
    assert "| seed | gold before |" in out and "ours - TRL (paired)" in out
    assert "DECISIVE" in out


def test_quality_ab_reuses_trl(quality_report: dict, tmp_path: Path) -> None:
    """``--reuse-trl``: TRL's runs and the gold before come from the earlier report, ours runs
    again (here without the override) and is compared with the earlier ours seed by seed."""
    first = tmp_path / "first.json"
    first.write_text(json.dumps({k: v for k, v in quality_report.items() if k != "_stdout"}))
    out = tmp_path / "ab.json"
    proc = run_bench_script(
        [str(SCRIPT), "--tiny", "--quality-seeds", "2", "--quality-prompts", "24",
         "--reuse-trl", str(first), "--out", str(out)],
        timeout=600, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, f"A/B run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    q, old = json.loads(out.read_text())["quality"], quality_report["quality"]
    for new_row, old_row in zip(q["seeds"], old["seeds"]):
        assert new_row["trl"]["gold_after"] == old_row["trl"]["gold_after"]
        assert new_row["gold_before"] == old_row["gold_before"]
        assert new_row["reused_ours"]["gain"] == pytest.approx(old_row["ours"]["gain"])
    ab = q["ab"]
    assert ab["seeds"] == [0, 1] and ab["gain_diff"]["n"] == 2
    diffs = [n["ours"]["gain"] - o["ours"]["gain"] for n, o in zip(q["seeds"], old["seeds"])]
    assert ab["gain_diff"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert ab["gain_diff"]["lo"] <= ab["gain_diff"]["mean"] <= ab["gain_diff"]["hi"]
    assert "A/B against ours in" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the second scale (issue 13): --scale 20m, FLOP accounting and parameter counts
# ---------------------------------------------------------------------------------------------


def _llama_params(n_layer: int, width: int, mlp: int, vocab: int) -> tuple[int, int]:
    """(all parameters, weights in matmuls) of the fixture's Llama causal LM, by hand: per
    layer q, k, v, o (width^2 each), gate, up, down (width x mlp each) and two RMSNorms; a
    final norm; the embedding, tied to the LM head (one tensor, but a matmul per token)."""
    layer_mm = 4 * width * width + 3 * width * mlp
    total = n_layer * (layer_mm + 2 * width) + width + vocab * width
    return total, n_layer * layer_mm + vocab * width


def test_20m_config_parameter_count() -> None:
    from transformers import AutoModelForCausalLM

    from bench.common import SCALE_20M, matmul_params, n_params
    from ppo_core.models import tiny_config

    assert (SCALE_20M.n_layer, SCALE_20M.n_embd, SCALE_20M.n_head) == (6, 512, 8)
    # the task's byte-level BPE tokenizer has 458 tokens (the toy policy's 583,552 parameters
    # = 2 x 262,400 + 128 + 458 x 128)
    vocab = 458
    config = tiny_config("llama", {"vocab_size": vocab, "tie_word_embeddings": True},
                         n_layer=SCALE_20M.n_layer, n_embd=SCALE_20M.n_embd,
                         n_head=SCALE_20M.n_head, n_positions=256)
    model = AutoModelForCausalLM.from_config(config)
    # 6 x (4 x 512^2 + 3 x 512 x 2048 + 2 x 512) + 512 + 458 x 512
    assert n_params(model) == 25_406_976 == _llama_params(6, 512, 2048, vocab)[0]
    # 6 x (4 x 512^2 + 3 x 512 x 2048) + 458 x 512: the tied LM head counted once, norms not
    assert matmul_params(model) == 25_400_320 == _llama_params(6, 512, 2048, vocab)[1]


def test_ppo_iteration_flops_hand_computed() -> None:
    from bench.common import ppo_iteration_flops

    # policy 100 matmul weights, critic = reward model 80; 50 real tokens, 4 PPO epochs
    f = ppo_iteration_flops(100, 80, 80, real_tokens=50, train_tokens=200)
    assert f["generation"] == 2 * 100 * 50 == 10_000
    assert f["scoring"] == 2 * (100 + 80 + 80) * 50 == 26_000
    assert f["training"] == 6 * (100 + 80) * 200 == 216_000
    assert f["total"] == 252_000


@pytest.fixture(scope="module")
def scale_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "scale.json"
    proc = run_bench_script([str(SCRIPT), "--tiny", "--scale", "20m", "--out", str(out)],
                            timeout=600)
    assert proc.returncode == 0, f"--scale failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["_stdout"] = proc.stdout
    return data


def test_scale_path_rounds_and_flop_accounting(scale_report: dict) -> None:
    from bench.common import ppo_iteration_flops

    r = scale_report
    assert r["mode"] == "scale" and r["scale"] == "20m" and "--scale 20m" in r["command"]
    # --tiny: the 1-layer width-64 model, 2 rounds interleaved (TRL first, then ours first)
    m = r["models"]
    assert (m["n_layer"], m["width"], m["mlp"]) == (1, 64, 256)
    assert (m["policy_params"], m["policy_matmul_params"]) == _llama_params(1, 64, 256, m["vocab"])
    # the scorer: no LM head, a 64 -> 1 score head
    assert m["reward_matmul_params"] == 4 * 64 * 64 + 3 * 64 * 256 + 64
    assert f"policy {m['policy_params']:,} parameters" in r["_stdout"]
    assert [x["order"] for x in r["rounds"]] == [["trl", "ours"], ["ours", "trl"]]
    epochs = r["config"]["num_ppo_epochs"]
    ratios = []
    for row in r["rounds"]:
        for side in ("ours", "trl"):
            run, fl = row[side], row[f"{side}_flops"]
            assert run["episodes"] == r["config"]["iterations"] * r["config"]["batch_size"]
            assert "gold_after" not in run  # speed only at this scale
            # training covers every episode once per PPO epoch; the rest is prompt tokens
            real = run["train_tokens"] / epochs
            assert real == int(real) and real - run["generated_tokens"] >= run["episodes"]
            expect = ppo_iteration_flops(m["policy_matmul_params"], m["reward_matmul_params"],
                                         m["reward_matmul_params"], real, run["train_tokens"])
            assert fl["flops"] == pytest.approx(expect)
            assert fl["gflops"]["total"] == pytest.approx(expect["total"] / run["wall_s"] / 1e9)
            assert fl["gflops"]["training"] == pytest.approx(
                expect["training"] / run["training_s"] / 1e9)
            assert fl["fraction"]["total"] == pytest.approx(
                fl["gflops"]["total"] / (run["probe_peak_flops"] / 1e9))
        ratios.append(row["ours"]["episodes_per_s"] / row["trl"]["episodes_per_s"])
    s = r["summary"]
    assert s["ratio"]["median"] == pytest.approx(sum(ratios) / 2)  # two rounds
    assert s["ratio"]["se"] == pytest.approx(abs(ratios[0] - ratios[1]) / 2)
    assert s["ours"]["episodes_per_s"]["min"] == min(x["ours"]["episodes_per_s"] for x in r["rounds"])
    for metric in ("episodes/s, median", "share of matmul peak, whole iteration, median",
                   "share of matmul peak, training phase, median"):
        assert f"| {metric} |" in r["_stdout"]
