"""Evaluation metrics against hand-computed values, gold-scorer loading, and the ppo_beats_sft gate."""

import math
from pathlib import Path

import pandas as pd
import pytest

from assets.evaluation import (
    BUNDLED_GOLD_SCORER,
    compare,
    kl_per_token,
    load_gold_scorer,
    policy_metrics,
    ppo_beats_sft_result,
    resolve_gold_scorer,
    rouge_l,
    samples_markdown,
    win_rate,
)


def test_lcs_and_rouge_l_hand_computed() -> None:
    # rouge-score's tokens: lower-cased, punctuation dropped. "the river is nice" (4) against
    # "the garden is very ugly" (5): LCS "the is" = 2, P = 2/4, R = 2/5, F = 2PR / (P + R)
    assert rouge_l("the river is nice .", "the garden is very ugly") == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    # "the river is" (3) against "the garden is ugly" (4): LCS 2, P = 2/3, R = 1/2
    assert rouge_l("the river is .", "the garden is ugly .") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # case and attached punctuation do not matter: "Nice." is the token "nice"
    assert rouge_l("The river is NICE.", "the river is nice") == pytest.approx(1.0)
    assert rouge_l("Same Text .", "same text .") == pytest.approx(1.0)
    assert rouge_l("", "anything") == 0.0


@pytest.mark.parametrize("cand, ref", [
    ("the river is nice .", "the river is lovely . the river is nice ."),
    ("a b c d e", "e d c b a"),
    ("the cat sat", "the cat sat on the mat"),
    ("The River, it is NICE!", "the river is nice."),
    ("well... it's fine, I think.", "It's fine; I think so"),
    ("don't stop-believing", "dont stop believing"),
    ("!!! ...", "nothing here"),
])
def test_rouge_l_agrees_with_rouge_score_package(cand: str, ref: str) -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert rouge_l(cand, ref) == pytest.approx(scorer.score(ref, cand)["rougeL"].fmeasure)


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([3, 1, 2, 5], [1, 1, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError, match="3 scores against 2"):
        win_rate([1, 2, 3], [1, 2])


def test_kl_per_token_is_mean_over_all_tokens() -> None:
    # two sequences of different length: mean over the 3 tokens, not over sequences
    assert kl_per_token([[-1.0, -2.0], [-0.5]], [[-1.5, -2.0], [-1.5]]) == pytest.approx((0.5 + 0 + 1.0) / 3)


def test_policy_metrics_and_compare() -> None:
    m = policy_metrics(["the river is nice .", "x"], [1.0, 3.0], [6, 2], [True, False],
                       ["the river is nice .", None], [2.0, -1.0])
    assert m == {"rm_score_mean": 2.0, "length_mean": 4.0, "ended_eos_frac": 0.5,
                 "rouge_l_mean": 1.0, "gold_mean": 0.5}
    c = compare({"rm": [1.0, 2.0], "gold": [0.0, 0.0]}, {"rm": [2.0, 1.0], "gold": [1.0, 0.0]})
    assert c == {"win_rate_rm": 0.5, "win_rate_gold": 0.75}
    assert "win_rate_gold" not in compare({"rm": [1.0], "gold": None}, {"rm": [2.0], "gold": None})
    # the held-out reward model's scores: PPO 1 win, 1 loss, 1 tie out of 3 -> (1 + 0.5) / 3
    c = compare({"rm": [0.0] * 3, "heldout": [1.0, 2.0, 0.5]}, {"rm": [1.0] * 3, "heldout": [2.0, 1.0, 0.5]})
    assert c == {"win_rate_rm": 1.0, "win_rate_heldout": 0.5}
    m = policy_metrics(["a", "b"], [1.0, 3.0], [1, 1], [True, True], [None, None], None, heldout=[-1.0, 2.0])
    assert m["heldout_score_mean"] == 0.5 and "gold_mean" not in m
    # with the answers' prompts each win rate gets its standard error: wins [1, 0] on two
    # prompts -> s / sqrt(n) = sqrt(0.5) / sqrt(2) = 0.5
    c = compare({"rm": [1.0, 2.0]}, {"rm": [2.0, 1.0]}, prompts=["p", "q"])
    assert c == {"win_rate_rm": 0.5, "win_rate_rm_se": pytest.approx(0.5)}


def test_clustered_se_by_hand() -> None:
    from assets.evaluation import clustered_se

    # mean 0.75; per-prompt sums of deviations: a 0.25 - 0.75 = -0.5, b 0.25, c 0.25;
    # squares 0.375, times G / (G - 1) = 1.5 -> 0.5625, sqrt 0.75, over n = 4 -> 0.1875
    assert clustered_se([1.0, 0.0, 1.0, 1.0], ["a", "a", "b", "c"]) == pytest.approx(0.1875)
    # the same values on four prompts: variance (3 x 0.0625 + 0.5625) / 3 = 0.25, s / sqrt(4) = 0.25
    assert clustered_se([1.0, 0.0, 1.0, 1.0], ["a", "b", "c", "d"]) == pytest.approx(0.25)
    assert math.isnan(clustered_se([1.0, 0.0], ["a", "a"]))   # one cluster: no estimate
    with pytest.raises(ValueError, match="2 values against 1 groups"):
        clustered_se([1.0, 0.0], ["a"])


def test_gold_scorer_resolution_and_loading() -> None:
    assert resolve_gold_scorer("", "bundled") == BUNDLED_GOLD_SCORER
    assert resolve_gold_scorer("", "/data/mine.jsonl") is None
    assert resolve_gold_scorer("none", "bundled") is None
    assert resolve_gold_scorer(" pkg.mod:fn ", None) == "pkg.mod:fn"
    gold = load_gold_scorer(BUNDLED_GOLD_SCORER)
    assert gold(["tell me about the river ."], ["the river is wonderful ."]) == [2.0]
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        load_gold_scorer("assets.bundled_task.gold_score_batch")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_gold_scorer("no_such_mod:f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_gold_scorer("assets.bundled_task:nope")


def test_samples_markdown_escapes_and_truncates() -> None:
    df = pd.DataFrame({"prompt": ["a|b"], "sft_response": ["x" * 200], "ppo_response": ["y"],
                       "sft_rm": [0.123456], "ppo_rm": [1.0]})
    md = samples_markdown(df, 5)
    lines = md.splitlines()
    assert lines[0] == "| prompt | sft_response | ppo_response | sft_rm | ppo_rm |"
    assert "a\\|b" in lines[2] and "x" * 117 + "..." in lines[2] and "0.123" in lines[2]


@pytest.mark.parametrize("ppo_gold, win, expected", [(2.0, 0.7, True), (2.0, 0.4, False), (0.5, 0.9, False)])
def test_ppo_beats_sft_gate_on_gold(ppo_gold: float, win: float, expected: bool) -> None:
    metrics = {"ppo/gold_mean": ppo_gold, "sft/gold_mean": 1.0, "win_rate_gold": win,
               "ppo/rm_score_mean": 0.0, "sft/rm_score_mean": 9.0, "win_rate_rm": 0.0}
    result = ppo_beats_sft_result(metrics, min_win_rate=0.5)
    assert result.passed is expected
    assert result.metadata["basis"].value == "gold"  # gold decides when present, not the RM


def test_ppo_beats_sft_gate_without_gold_uses_the_heldout_reward_model() -> None:
    # the reward model PPO optimised says PPO wins; the held-out one says it got worse
    hacked = {"ppo/rm_score_mean": 2.0, "sft/rm_score_mean": 0.0, "win_rate_rm": 0.95, "win_rate_gold": None,
              "ppo/heldout_score_mean": -0.2, "sft/heldout_score_mean": 0.0, "win_rate_heldout": 0.4}
    result = ppo_beats_sft_result(hacked, 0.5)
    assert result.passed is False and result.metadata["basis"].value == "heldout"
    assert "heldout_score_mean -0.200 vs SFT 0.000" in result.description
    better = {**hacked, "ppo/heldout_score_mean": 0.3, "win_rate_heldout": 0.6, "win_rate_heldout_se": 0.04}
    assert ppo_beats_sft_result(better, 0.5).passed
    assert "win rate (heldout) 0.600 +- 0.040" in ppo_beats_sft_result(better, 0.5).description
    assert ppo_beats_sft_result(better, 0.5).metadata["win_rate_se"].value == 0.04
    assert ppo_beats_sft_result(better, 0.7).passed is False


def test_ppo_beats_sft_gate_falls_back_to_rm_and_fails_without_numbers() -> None:
    rm_only = {"ppo/rm_score_mean": 1.0, "sft/rm_score_mean": 0.0, "win_rate_rm": 0.8, "win_rate_gold": None,
               "win_rate_heldout": None}
    assert ppo_beats_sft_result(rm_only, 0.5).passed
    assert ppo_beats_sft_result(rm_only, 0.5).metadata["basis"].value == "rm"
    assert ppo_beats_sft_result(rm_only, 0.9).passed is False
    assert ppo_beats_sft_result({}, 0.5).passed is False


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny causal LM (as SFT and PPO) and a scorer built on it, plus bundled-task splits."""
    import torch

    from assets.bundled_task import generate_preferences
    from assets.splits import write_splits
    from ppo_core import models

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    pairs = generate_preferences(300, seed=1, corrupt_fraction=0.0)
    manifest = write_splits(pairs, root / "splits")
    texts = (pairs["prompt"] + " " + pairs["chosen"]).tolist()
    lm = models.build_base_model(texts, root / "lm", size="tiny", vocab_size=300)
    scorer = models.build_scorer_from_causal_lm(lm)
    scorer.save_pretrained(root / "rm")
    models.load_tokenizer(lm).save_pretrained(root / "rm")
    return {"splits": {"split_dir": str(root / "splits" / manifest["data_version"]), **manifest},
            "lm": str(lm), "rm": str(root / "rm"), "root": root}


def test_evaluate_same_policy_twice_gives_zero_kl_and_even_win_rates(tiny_models: dict) -> None:
    from assets.evaluation import EvaluationConfig, evaluate

    cfg = EvaluationConfig(max_prompts=6, max_new_tokens=8, batch_size=4, n_table_samples=3)
    out_dir = tiny_models["root"] / "report"
    result = evaluate(tiny_models["splits"], tiny_models["lm"], tiny_models["lm"], tiny_models["rm"], cfg,
                      out_dir, data_source="bundled", log=lambda _: None)
    metrics = result["report"]["metrics"]
    # Same weights and the same sampling seed: identical answers, so no KL and only ties.
    assert metrics["ppo/kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["win_rate_gold"] == 0.5 and metrics["win_rate_rm"] == 0.5
    assert metrics["n_prompts"] == 6 and result["report"]["gold_scorer"] == BUNDLED_GOLD_SCORER
    samples = pd.read_parquet(out_dir / "samples.parquet")
    # lengths count response tokens up to and including EOS; a response ended with EOS exactly
    # when its last token is EOS
    from ppo_core.models import load_tokenizer

    eos = load_tokenizer(tiny_models["lm"]).eos_token_id
    ppo_ids = result["ids"]["ppo"]
    assert metrics["ppo/length_mean"] == pytest.approx(sum(map(len, ppo_ids)) / len(ppo_ids))
    assert samples["ppo_ended_eos"].tolist() == [ids[-1] == eos for ids in ppo_ids]
    assert metrics["ppo/ended_eos_frac"] == pytest.approx(samples["ppo_ended_eos"].mean())
    # samples_per_prompt answers per prompt (default 4), all identical between the two policies
    assert list(samples["sft_response"]) == list(samples["ppo_response"]) and len(samples) == 6 * 4
    assert metrics["n_samples"] == 24
    # the reward model on held-out pairs (the arithmetic: test_pair_metrics_hand_computed)
    assert {"rm/pair_accuracy", "rm/gold_agreement", "rm/gold_label_agreement"} <= set(metrics)
    assert metrics["rm/n_pairs"] == len(pd.read_parquet(Path(tiny_models["splits"]["split_dir"]) / "test_pairs.parquet"))
    assert samples["sft_gold"].tolist() == load_gold_scorer(BUNDLED_GOLD_SCORER)(
        samples["prompt"].tolist(), samples["sft_response"].tolist())
    import json

    on_disk = json.loads((out_dir / "report.json").read_text())
    assert on_disk["metrics"]["ppo/gold_mean"] == pytest.approx(metrics["ppo/gold_mean"])


def test_evaluate_without_gold_scorer_reports_rm_only(tiny_models: dict) -> None:
    from assets.evaluation import EvaluationConfig, evaluate

    cfg = EvaluationConfig(max_prompts=3, max_new_tokens=4, batch_size=4, gold_scorer="none")
    result = evaluate(tiny_models["splits"], tiny_models["lm"], tiny_models["lm"], tiny_models["rm"], cfg,
                      tiny_models["root"] / "report_rm", log=lambda _: None)
    metrics = result["report"]["metrics"]
    assert "win_rate_gold" not in metrics and "ppo/gold_mean" not in metrics
    assert "win_rate_heldout" not in metrics  # no held-out reward model given
    assert math.isfinite(metrics["ppo/rm_score_mean"]) and metrics["win_rate_rm"] == 0.5


def test_evaluate_scores_with_the_heldout_reward_model(tiny_models: dict) -> None:
    from assets.evaluation import EvaluationConfig, evaluate, rm_scores

    cfg = EvaluationConfig(max_prompts=3, max_new_tokens=4, batch_size=4, gold_scorer="none")
    out_dir = tiny_models["root"] / "report_heldout"
    # the same scorer as both: held-out scores must equal the RM's, sample for sample
    result = evaluate(tiny_models["splits"], tiny_models["lm"], tiny_models["lm"], tiny_models["rm"], cfg,
                      out_dir, log=lambda _: None, heldout_rm_dir=tiny_models["rm"])
    metrics, samples = result["report"]["metrics"], pd.read_parquet(out_dir / "samples.parquet")
    assert samples["ppo_heldout"].tolist() == samples["ppo_rm"].tolist()
    assert metrics["ppo/heldout_score_mean"] == pytest.approx(samples["ppo_heldout"].mean())
    assert metrics["win_rate_heldout"] == 0.5  # identical policies: all ties
    prompts = samples["prompt"].tolist()
    assert samples["sft_heldout"].tolist() == pytest.approx(
        rm_scores(tiny_models["rm"], prompts, result["ids"]["sft"], 4))
    assert result["report"]["heldout_reward_model"] == tiny_models["rm"]
    # promotion compares held-out scores only under the same weights: their hash is recorded
    from assets.models import model_dir_version
    assert result["report"]["heldout_reward_model_version"] == model_dir_version(Path(tiny_models["rm"]))


def test_pair_metrics_hand_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """RM accuracy against the labels and agreement with the gold ordering, on fixed scores."""
    import assets.evaluation as ev
    from ppo_core import models

    class Tok:
        eos_token_id = 2

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
            return {"input_ids": [len(text)]}

    monkeypatch.setattr(models, "load_tokenizer", lambda path: Tok())
    rm = {"c1": 1.0, "r1": 0.0, "c2": 0.0, "r2": 2.0, "c3": 5.0, "r3": 4.0, "c4": 1.0, "r4": 1.0}
    gold = {"c1": 1.0, "r1": 0.0, "c2": 0.0, "r2": 1.0, "c3": 3.0, "r3": 3.0, "c4": 2.0, "r4": 1.0}
    calls: list[list[list[int]]] = []

    def rm_scores(rm_dir, prompts, response_ids, batch_size):
        calls.append(response_ids)
        col = "chosen" if len(calls) == 1 else "rejected"
        return [rm[t] for t in pairs[col]]

    monkeypatch.setattr(ev, "rm_scores", rm_scores)
    pairs = pd.DataFrame({"prompt": ["p"] * 4, "chosen": ["c1", "c2", "c3", "c4"],
                          "rejected": ["r1", "r2", "r3", "r4"]})
    out = ev.pair_metrics("rm", pairs, lambda p, r: [gold[t] for t in r], batch_size=2)
    assert len(calls) == 2   # chosen, then rejected
    # RM prefers chosen on pair 1 and 3 (pair 4 ties: not a win) -> 2/4
    assert out["rm/pair_accuracy"] == 0.5 and out["rm/n_pairs"] == 4.0
    # gold decides pairs 1, 2, 4 (3 ties); RM agrees on 1 (c>r both), 2 (r>c both), not 4
    assert out["rm/gold_agreement"] == pytest.approx(2 / 3)
    # the labels (chosen) agree with gold on pairs 1 and 4 of the 3 decided -> 2/3
    assert out["rm/gold_label_agreement"] == pytest.approx(2 / 3)
    # every pair has the same prompt: one cluster, so no standard error
    assert math.isnan(out["rm/gold_agreement_se"]) and math.isnan(out["rm/pair_accuracy_se"])


def test_member_stats_and_combine_by_hand() -> None:
    import assets.evaluation as ev

    # member a: mean 2, sample std 1 over (1, 2, 3); member b: mean 20, std 10
    stats = ev.member_stats([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    assert stats == [(2.0, 1.0), (20.0, 10.0)]
    # (3 - 2) / 1 = 1 with (10 - 20) / 10 = -1, and (1 - 2) / 1 = -1 with (30 - 20) / 10 = 1: both 0
    assert ev.combine_members([[3.0, 1.0], [10.0, 30.0]], stats) == [0.0, 0.0]
    assert ev.combine_members([[3.0, 1.0]], None) == [3.0, 1.0]


def test_recorded_stats_apply_only_to_the_same_members_in_order() -> None:
    import assets.evaluation as ev

    recorded = {"paths": ["a", "b"], "mean": [1.0, 2.0], "std": [0.5, 4.0]}
    assert ev.recorded_stats(recorded, ["a", "b"]) == [(1.0, 0.5), (2.0, 4.0)]
    assert ev.recorded_stats(recorded, ["b", "a"]) is None   # swapped members: not PPO's weights
    assert ev.recorded_stats(None, ["a", "b"]) is None


def test_an_ensemble_is_weighted_by_ppo_else_on_the_baselines_answers() -> None:
    import assets.evaluation as ev

    recorded = {"paths": ["a", "b"], "mean": [1.0, 2.0], "std": [0.5, 4.0]}
    asked: list[int] = []

    def baseline() -> list[list[float]]:
        asked.append(1)
        return [[1.0, 3.0], [0.0, 0.0]]     # member a: mean 2, sample std sqrt(2); b: constant

    assert ev.ensemble_stats(["a"], recorded, baseline) == (None, None)
    assert ev.ensemble_stats(["a", "b"], recorded, baseline) == ([(1.0, 0.5), (2.0, 4.0)], "ppo_reference_samples")
    assert not asked  # PPO's statistics need no scoring
    stats, source = ev.ensemble_stats(["b", "a"], recorded, baseline)
    assert source == "baseline_answers" and asked == [1]
    assert stats == [(2.0, pytest.approx(2 ** 0.5)), (0.0, 1e-6)]


def test_pair_metrics_of_an_ensemble_combine_standardised_members(monkeypatch: pytest.MonkeyPatch) -> None:
    """Member a ranks pair 1 right by 1 (one of its std), member b pair 1 wrong by 5 (half of its):
    standardised, a's vote wins; raw, b's would."""
    import assets.evaluation as ev
    from ppo_core import models

    monkeypatch.setattr(models, "load_tokenizer", lambda path: type("T", (), {"eos_token_id": 2})())
    monkeypatch.setattr("ppo_core.data.encode_response", lambda tok, p, t: [0])
    scores = {("a", "c"): 1.0, ("a", "r"): 0.0, ("b", "c"): 0.0, ("b", "r"): 5.0}
    calls: list[str] = []

    def rm_scores(rm_dir, prompts, response_ids, batch_size):
        side = "c" if sum(1 for c in calls if c == rm_dir) == 0 else "r"
        calls.append(rm_dir)
        return [scores[(rm_dir, side)]]

    monkeypatch.setattr(ev, "rm_scores", rm_scores)
    pairs = pd.DataFrame({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]})
    out = ev.pair_metrics(["a", "b"], pairs, None, batch_size=1, stats=[(0.0, 1.0), (0.0, 10.0)])
    assert out["rm/pair_accuracy"] == 1.0   # (1 + 0) / 2 = 0.5 > (0 + 0.5) / 2 = 0.25


def test_kl_per_response_sums_tokens_then_averages_responses() -> None:
    from assets.evaluation import kl_per_response

    policy = [[-1.0, -0.5], [-0.2, -0.2, -0.2]]
    ref = [[-2.0, -1.0], [-0.2, -0.7, -0.1]]
    # response 1: (1.0 + 0.5) = 1.5; response 2: (0 + 0.5 - 0.1) = 0.4; mean 0.95
    assert kl_per_response(policy, ref) == pytest.approx(0.95)
    # the per-token figure of the same samples: (1 + .5 + 0 + .5 - .1) / 5
    assert kl_per_token(policy, ref) == pytest.approx(0.38)


def test_guard_curve_groups_by_step_and_adds_gold(tmp_path: Path) -> None:
    import json

    from assets.evaluation import guard_curve

    rows = [{"step": 0, "prompt": "p", "response": "aa", "proxy": 0.0, "heldout": 0.0, "kl": 0.0},
            {"step": 0, "prompt": "p", "response": "a", "proxy": 1.0, "heldout": -1.0, "kl": 0.0},
            {"step": 5, "prompt": "p", "response": "aaaa", "proxy": 2.0, "heldout": 0.5, "kl": 3.0}]
    f = tmp_path / "guard_samples.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = lambda prompts, responses: [float(len(r)) for r in responses]  # a toy gold
    points = guard_curve(f, lengths)
    assert points == [{"step": 0, "kl": 0.0, "proxy": 0.5, "heldout": -0.5, "gold": 1.5},
                      {"step": 5, "kl": 3.0, "proxy": 2.0, "heldout": 0.5, "gold": 4.0}]
    assert "gold" not in guard_curve(f, None)[0]
    assert guard_curve(tmp_path / "missing.jsonl", None) == []


def test_max_new_tokens_zero_samples_with_the_ppo_stages_response_length(tmp_path: Path) -> None:
    import json as _json

    from assets.evaluation import response_length

    stage = tmp_path / "stage_config.json"
    stage.write_text(_json.dumps({"response_length": 72}))
    assert response_length(24, {"config_path": str(stage)}) == 24              # set: kept
    assert response_length(0, {"config_path": str(stage)}) == 72               # 0: what PPO sampled with
    assert response_length(0, {"lengths": {"response_length": 40}}) == 40      # else the measured length
    with pytest.raises(ValueError, match="set max_new_tokens"):
        response_length(0, {})
