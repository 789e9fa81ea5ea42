"""The reward-model probes behind BENCHMARKS.md's negative results give the numbers they claim:
similar-prompt partners (``bench/hard_negatives.py``), repeated-segment negatives
(``bench/repeat_negatives.py``) and the conservative ensemble rewards
(``bench/ensemble_reward.py``), checked on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from bench.ensemble_reward import combine
from bench.hard_negatives import nearest_prompts, similar_mismatched_pairs
from bench.repeat_negatives import duplicate_segment, repeated_segment_pairs, segments

PROMPTS = [
    "make a soup with leek and corn .",    # 0
    "make a soup with leek and tofu .",    # 1: shares soup, leek with 0 (and with 3)
    "make a stew with beef and rice .",    # 2
    "make a soup with leek and corn .",    # 3: the same text as 0, never its neighbour
    "make a stew with beef and lamb .",    # 4: shares stew, beef with 2
]


def test_nearest_prompt_shares_the_rare_words_and_is_never_the_same_text() -> None:
    near = nearest_prompts(PROMPTS, k=1, seed=0)
    assert near.shape == (5, 1)
    assert near[[0, 2, 3, 4], 0].tolist() == [1, 4, 1, 2]
    assert near[1, 0] in (0, 3)          # 0 and 3 are the same text: an exact tie, broken at random
    two = nearest_prompts(PROMPTS, k=2, seed=0)
    assert sorted(two[1].tolist()) == [0, 3]
    assert 3 not in two[0] and 0 not in two[3]


def test_idf_weighting_lets_one_rare_word_beat_two_template_words() -> None:
    """Unweighted word-set cosine ranks "make a corn" nearest to "make a leek" (2/3 against
    1/sqrt(6) for "leek tart"); with twenty more "make a ..." prompts the template words weigh
    ln(24/23) + 1 ~ 1.04 each and "leek" ln(24/3) + 1 ~ 3.08, which puts "leek tart" first
    (cosine ~ 0.60 against ~ 0.17)."""
    prompts = ["make a leek", "make a corn", "leek tart"] + [f"make a w{i}" for i in range(20)]
    assert nearest_prompts(prompts, k=1, seed=0)[0, 0] == 2


def test_similar_partners_answer_a_nearest_other_prompt() -> None:
    rows = [{"prompt": p, "chosen": f"answer {i}", "rejected": "no"} for i, p in enumerate(PROMPTS)]
    pairs = similar_mismatched_pairs(rows, fraction=1.0, seed=0, k=1)
    assert len(pairs) == 5
    got = {p["chosen"]: p["rejected"] for p in pairs}
    assert {k: got[k] for k in ("answer 0", "answer 2", "answer 3", "answer 4")} == {
        "answer 0": "answer 1", "answer 2": "answer 4", "answer 3": "answer 1", "answer 4": "answer 2"}
    assert got["answer 1"] in ("answer 0", "answer 3")
    assert all(p["margin"] == 0.0 for p in pairs)
    assert similar_mismatched_pairs(rows, fraction=0.0, seed=0) == []


def test_ensemble_rewards_by_hand() -> None:
    raw = torch.tensor([[1.0, 3.0], [10.0, 30.0]])   # (members, batch)
    assert combine(raw, "mean", 1.0, []).tolist() == [5.5, 16.5]
    # each member standardised with its own first-call mean and std (1.414...): both give -0.707, 0.707
    stats: list[torch.Tensor] = []
    z = 1 / 2 ** 0.5
    assert combine(raw, "min", 1.0, stats).tolist() == pytest.approx([-z, z])
    assert combine(raw, "lcb", 1.0, stats).tolist() == pytest.approx([-z, z])   # members agree: std 0
    # later calls reuse the first call's statistics (means 2 and 20, stds 2**0.5 and 200**0.5):
    # member 1 now says 4, member 2 says 10
    later = torch.tensor([[4.0], [10.0]])
    z1, z2 = (4.0 - 2.0) / 2 ** 0.5, (10.0 - 20.0) / 200 ** 0.5
    assert combine(later, "min", 1.0, stats).tolist() == pytest.approx([min(z1, z2)])
    mean, std = (z1 + z2) / 2, abs(z1 - z2) / 2 ** 0.5
    assert combine(later, "lcb", 2.0, stats).tolist() == pytest.approx([mean - 2.0 * std])
    with pytest.raises(ValueError, match="ENS_MODE"):
        combine(raw, "max", 1.0, [])
    with pytest.raises(ValueError, match="at least two"):
        combine(torch.tensor([[1.0], [2.0]]), "lcb", 1.0, [])


RECIPE = "add the leek gently . chop the tofu carefully . add the corn slowly ."


def test_segments_are_sentences_or_else_clauses_and_rejoin_to_the_text() -> None:
    assert segments(RECIPE) == ["add the leek gently .", " chop the tofu carefully .", " add the corn slowly ."]
    items = "tiger , brush , pepper and clock ."
    assert segments(items) == ["tiger ,", " brush ,", " pepper and clock ."]
    assert "".join(segments(items)) == items and segments("4 .") == ["4 ."]


def test_a_copied_segment_keeps_the_targets_place_and_ending() -> None:
    assert duplicate_segment(RECIPE, 0, 2) == "add the leek gently . chop the tofu carefully . add the leek gently ."
    assert duplicate_segment("tiger , brush , pepper and clock .", 2, 0) == \
        "pepper and clock , brush , pepper and clock ."
    # a text without its final period keeps it missing: only the content repeats
    assert duplicate_segment("add the a x . add the b y", 0, 1) == "add the a x . add the a x"


def test_repeated_segment_pairs_skip_single_segments_and_reach_the_fraction() -> None:
    rows = [{"prompt": "p", "chosen": RECIPE}, {"prompt": "q", "chosen": "4 ."}]
    pairs = repeated_segment_pairs(rows, 1.5, seed=0)      # 3 pairs, all from the one row that has them
    assert len(pairs) == 3
    for pair in pairs:
        assert pair["prompt"] == "p" and pair["chosen"] == RECIPE and pair["margin"] == 0.0
        kept = segments(pair["rejected"])
        assert len(kept) == 3 and len({s.strip() for s in kept}) == 2   # one segment now repeats
    assert repeated_segment_pairs([rows[1]], 1.0, seed=0) == []


@pytest.mark.parametrize("response", [
    "add the leek gently . add the rice gently . add the tofu quickly . add the corn sloppily .",
    "add the leek . stir the tofu slowly . add the corn gently",
    "add the leek gently . chop the leek carefully .",
    "",
])
def test_recipe_anatomy_terms_add_up_to_gold(response: str) -> None:
    from bench.recipe_anatomy import gold_terms
    t = gold_terms("make a stew with leek , tofu and corn .", response)
    rebuilt = (t["uses"] + t["manner_quality"] - 1.5 * t["unnamed"] - t["repeated"] - 0.5 * t["repeated_manner"]
               - 2.0 * t["malformed"] - t["unused"] - t["no_period"])
    assert rebuilt == pytest.approx(t["gold"])


def test_recipe_anatomy_counts_by_hand() -> None:
    from bench.recipe_anatomy import gold_terms
    t = gold_terms("make a stew with leek , tofu and corn .",
                   "add the leek gently . chop the leek carefully . add the rice gently")
    assert (t["sentences"], t["uses"], t["repeated"], t["unnamed"], t["repeated_manner"]) == (3, 1, 1, 1, 1)
    assert (t["unused"], t["no_period"], t["manner_quality"]) == (2, 1, 1.0)
    # +2 (leek gently) -1 (leek again) -1.5 (rice) -0.5 (gently again) -2 (tofu, corn) -1 (period)
    assert t["gold"] == pytest.approx(-4.0)


def test_gold_agreement_by_hand() -> None:
    """Pairs gold ties are left out; a score tie counts as the wrong order."""
    from bench.probe_data import gold_agreement

    # pair 1 agrees, pair 2 disagrees, pair 3 is a gold tie (left out), pair 4 a score tie where
    # gold prefers the chosen answer (wrong order)
    assert gold_agreement([2, 0, 5, 1], [1, 1, 0, 1], [1, 2, 3, 2], [0, 1, 3, 1]) == 1 / 3


def test_arithmetic_anatomy_cases_are_the_offsets_gold_prices() -> None:
    """The probe's wrong answers are off by exactly the offset and never negative, and gold prices
    the template at 3 (right), 1 (off by 1), 0.5 (off by 2) and -1 (off by 5)."""
    from bench.arithmetic_anatomy import OFFSETS, prompts, wrong
    from bench.tasks.arithmetic import gold_reward

    assert [wrong(7, k) for k in OFFSETS] == [7, 6, 5, 2]
    assert [wrong(1, k) for k in OFFSETS] == [1, 0, 3, 6]      # below the offset: moved up instead
    items = prompts(50, seed=0)
    assert len(items) == 50 and items == prompts(50, seed=0)
    for prompt, answer in items:
        golds = [gold_reward(prompt, f"the answer is {wrong(answer, k)} .") for k in OFFSETS]
        assert golds == [3.0, 1.0, 0.5, -1.0]
        assert all(wrong(answer, k) >= 0 and abs(wrong(answer, k) - answer) == k for k in OFFSETS)
