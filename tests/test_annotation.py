"""Annotation batches, the simulated annotator, the ``labels`` ingest format and the round
promotion rule, on hand-computed values (no model)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from assets import annotation
from assets.ingest import load_preferences
from assets.rounds import next_round_key, paired_tags, round_decision, round_metrics
from assets.schemas import QuarantineReason, validate_pairs


def test_bradley_terry_probability_by_hand() -> None:
    assert annotation.bt_probability(2.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert annotation.bt_probability(0.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(2.0)))
    assert annotation.bt_probability(1.0, 0.0, 0.0) == 1.0  # noiseless labeller
    assert annotation.bt_probability(0.0, 1.0, 0.0) == 0.0
    assert annotation.bt_probability(3.0, 3.0, 0.0) == 0.5


def test_simulated_annotator_follows_gold_and_its_noise() -> None:
    scorer = lambda prompts, responses: [float(len(r)) for r in responses]  # gold = length
    batch = annotation.batch_frame(["p"] * 4000, ["aaaa"] * 4000, ["a"] * 4000, "b1")
    exact = annotation.simulate_labels(batch.head(10), scorer, temperature=0.0, seed=0)
    assert exact["preference"].tolist() == ["a"] * 10 and exact["gold_a"].tolist() == [4.0] * 10
    noisy = annotation.simulate_labels(batch, scorer, temperature=2.0, seed=1)
    # P(a) = sigmoid(3 / 2) = 0.818; 4,000 draws: standard error 0.006
    assert (noisy["preference"] == "a").mean() == pytest.approx(1 / (1 + math.exp(-1.5)), abs=0.025)
    again = annotation.simulate_labels(batch, scorer, temperature=2.0, seed=1)
    assert again["preference"].tolist() == noisy["preference"].tolist()


def test_batch_is_written_once_and_read_back_as_labels(tmp_path: Path) -> None:
    frame = annotation.batch_frame(["p1", "p2", "p3", "p4"], ["a1", "a2", "a3", "a4"],
                                   ["b1", "b2", "b3", "b4"], "batch")
    path = annotation.write_batch(frame, tmp_path / "batch.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(rows[0])[:4] == ["prompt", "response_a", "response_b", "preference"]
    assert all(r["preference"] is None for r in rows)
    with pytest.raises(FileExistsError):
        annotation.write_batch(frame, path)

    # a labeller fills two rows, mislabels one, leaves one empty
    for row, label in zip(rows, ["a", "B", "", "maybe"]):
        row["preference"] = label
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_preferences(str(labelled), "auto")
    assert result.format == "labels"
    checked = validate_pairs(result.frame)
    assert len(checked.valid) + len(checked.quarantined) == 4
    assert checked.valid[["prompt", "chosen", "rejected"]].values.tolist() == [["p1", "a1", "b1"],
                                                                               ["p2", "b2", "a2"]]
    counts = {k: v for k, v in checked.reason_counts.items() if v}
    assert counts == {QuarantineReason.UNLABELLED.value: 1, QuarantineReason.INVALID_LABEL.value: 1}


def test_pick_prompts_is_a_seeded_distinct_draw() -> None:
    prompts = [f"p{i}" for i in range(50)] * 2
    a, b = annotation.pick_prompts(prompts, 10, 1), annotation.pick_prompts(prompts, 10, 2)
    assert len(set(a)) == 10 and a == annotation.pick_prompts(prompts, 10, 1) and a != b
    assert len(annotation.pick_prompts(prompts, 0, 1)) == 50


def test_round_keys_count_up() -> None:
    assert next_round_key([]) == "round-0001"
    assert next_round_key(["round-0001", "round-0003", "manual-x"]) == "round-0004"


def _report(champion_gold: float, challenger_gold: float) -> dict:
    metrics = {"champion/gold_mean": champion_gold, "challenger/gold_mean": challenger_gold,
               "champion/rm_score_mean": 0.1, "challenger/rm_score_mean": 0.2, "n_prompts": 8.0}
    return {"metrics": metrics, "data_version": "dv1", "gold_scorer": "m:f", "sampling": "k=1,T=0.7,len=32,seed=0"}


def _version(version: str, tags: dict) -> SimpleNamespace:
    return SimpleNamespace(name="rlhf-policy", version=version, tags=tags)


def test_round_promotion_uses_the_paired_scores_of_the_round() -> None:
    # the champion's registered tag (5.0, an older evaluation) is not what decides: this round's is
    champion = _version("1", {"metric.ppo/gold_mean": "5.0", "eval.set": "dv1|n=8|gold=m:f"})
    better = _report(champion_gold=1.0, challenger_gold=1.5)
    challenger = _version("2", paired_tags(better, "challenger"))
    assert challenger.tags["metric.ppo/gold_mean"] == repr(1.5)
    decision = round_decision(challenger, champion, better, min_improvement=0.0)
    assert decision.promoted and decision.champion_score == 1.0 and decision.challenger_score == 1.5
    assert not round_decision(challenger, champion, better, min_improvement=0.5).promoted
    worse = _report(champion_gold=1.0, challenger_gold=0.9)
    refused = round_decision(_version("3", paired_tags(worse, "challenger")), champion, worse, 0.0)
    assert not refused.promoted and refused.challenger_score == 0.9


def test_without_gold_a_round_is_judged_by_the_heldout_reward_model() -> None:
    # the challenger games the refreshed reward model (0.9 > 0.1) but loses on the held-out one
    metrics = {"champion/rm_score_mean": 0.1, "challenger/rm_score_mean": 0.9, "champion/heldout_score_mean": 0.4,
               "challenger/heldout_score_mean": 0.3, "n_prompts": 8.0}
    report = {"metrics": metrics, "data_version": "dv1", "gold_scorer": None, "heldout_reward_model_version": "h",
              "sampling": "k=1,T=0.7,len=32,seed=0"}
    champion = _version("1", {"eval.set": "dv1|n=8|gold=none|heldout=h"})
    challenger = _version("2", paired_tags(report, "challenger"))
    assert challenger.tags["promotion_metric"] == "ppo/heldout_score_mean"
    decision = round_decision(challenger, champion, report, min_improvement=0.0)
    assert not decision.promoted and (decision.challenger_score, decision.champion_score) == (0.3, 0.4)


def test_round_metrics_rename_the_two_sides() -> None:
    m = round_metrics({"metrics": {"sft/gold_mean": 1.0, "ppo/gold_mean": 2.0, "ppo/kl_to_ref": 0.3,
                                   "win_rate_gold": 0.6}}, kl_champion=1.5)
    assert m == {"champion/gold_mean": 1.0, "challenger/gold_mean": 2.0, "challenger/kl_to_champion": 0.3,
                 "win_rate_gold": 0.6, "champion/kl_to_sft_per_response": 1.5}


def test_a_subclass_default_of_a_typed_field_counts_as_set(tmp_path: Path) -> None:
    from pydantic import Field

    from assets.models import core_config
    from assets.rounds import RoundRewardModelConfig
    from ppo_core.reward import RewardConfig

    class OneEpoch(RoundRewardModelConfig):
        epochs: float = Field(default=1.0)

    paths = {"model_name_or_path": "m", "data_dir": str(tmp_path), "output_dir": str(tmp_path / "o")}
    # a subclass's default (1 epoch) is a choice, not the "engine default" sentinel (0)
    assert core_config("reward", OneEpoch(), **paths).num_epochs == 1.0
    assert core_config("reward", OneEpoch(epochs=0), **paths).num_epochs == RewardConfig.num_epochs
    assert core_config("reward", RoundRewardModelConfig(), **paths).num_epochs == 1.0
    assert core_config("reward", RoundRewardModelConfig(epochs=0), **paths).num_epochs == RewardConfig.num_epochs
    assert core_config("reward", RoundRewardModelConfig(epochs=2.5), **paths).num_epochs == 2.5


def test_paired_batch_hides_which_policy_wrote_which_answer() -> None:
    prompts = [f"p{i}" for i in range(200)]
    first, second = [f"champion{i}" for i in range(200)], [f"other{i}" for i in range(200)]
    frame = annotation.paired_batch(prompts, first, second, "b", seed=3)
    for _, row in frame.iterrows():
        i = int(row["prompt"][1:])
        by_policy = {row["policy_a"]: row["response_a"], row["policy_b"]: row["response_b"]}
        assert by_policy == {0: f"champion{i}", 1: f"other{i}"}  # nothing lost or mixed up
    share = (frame["policy_a"] == 0).mean()
    assert 0.35 < share < 0.65  # the champion is not always "a" (binomial sd 0.035 at n=200)
    again = annotation.paired_batch(prompts, first, second, "b", seed=3)
    assert again["policy_a"].tolist() == frame["policy_a"].tolist()


def test_sft_baseline_becomes_the_first_champion_once(tmp_path: Path) -> None:
    from assets.rounds import crown_sft_baseline
    from resources.tracking import MLflowResource
    from tests.test_registry import tiny_model_dir

    mlflow = MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            artifact_root=(tmp_path / "artifacts").as_uri())
    sft = {"model_path": str(tiny_model_dir(tmp_path / "sft")), "mlflow_run_id": None, "mlflow_model_id": None}
    version = crown_sft_baseline(mlflow, "rlhf-policy", sft)
    client = mlflow.client()
    model = client.get_registered_model("rlhf-policy")
    assert str(model.aliases["champion"]) == version == "1"
    assert client.get_model_version("rlhf-policy", version).tags["rlhf.baseline"] == "sft"
    assert json.loads(model.tags["last_promotion_decision"])["promoted"] is True
    with pytest.raises(ValueError, match="already has a champion"):
        crown_sft_baseline(mlflow, "rlhf-policy", sft)
