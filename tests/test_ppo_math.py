"""PPO math against values computed by hand (see the comments next to each expectation)."""

from __future__ import annotations

import math

import pytest
import torch

from ppo_core import ppo_utils as U


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_masked_mean_and_var_ignore_padding():
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert U.masked_mean(x, m).item() == pytest.approx(2.0)
    # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1
    assert U.masked_var(x, m).item() == pytest.approx(1.0)
    assert U.masked_var(x, m, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert U.masked_mean(t([[1.0, 3.0], [5.0, 7.0]]), t([[1, 0], [1, 1]]), dim=1).tolist() == [1.0, 6.0]


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        U.masked_var(t([[1.0, 2.0]]), t([[1, 0]]))


def test_whitening():
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    # mean 2, var 1 -> (-1, 0, 1); padding zeroed
    assert U.masked_whiten(x, m).tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # shift_mean=False keeps the mean: (-1, 0, 1) + 2
    assert U.masked_whiten(x, m, shift_mean=False).tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_gae_full_mask():
    values, rewards, mask = t([[1.0, 2.0, 3.0]]), t([[0.0, 0.0, 1.0]]), t([[1, 1, 1]])
    adv, ret = U.gae_advantages(values, rewards, mask, gamma=1.0, lam=0.5)
    # t=2: delta = 1 + 0 - 3 = -2 -> A=-2; t=1: delta = 0 + 3 - 2 = 1 -> A = 1 + .5*-2 = 0
    # t=0: delta = 0 + 2 - 1 = 1 -> A = 1 + .5*0 = 1; returns = A + V
    assert adv.tolist()[0] == pytest.approx([1.0, 0.0, -2.0])
    assert ret.tolist()[0] == pytest.approx([2.0, 2.0, 1.0])


def test_gae_padding_and_discount():
    values, rewards, mask = t([[1.0, 2.0, 9.0]]), t([[0.0, 1.0, 5.0]]), t([[1, 1, 0]])
    adv, ret = U.gae_advantages(values, rewards, mask, gamma=1.0, lam=0.5)
    # padding value/reward ignored: t=1: delta = 1 + 0 - 2 = -1; t=0: 0 + 2 - 1 = 1 -> 1 - .5
    assert adv.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.5, 1.0, 0.0])
    adv, _ = U.gae_advantages(t([[0.0, 0.0]]), t([[0.0, 1.0]]), t([[1, 1]]), gamma=0.5, lam=1.0)
    # discounted return of a reward one step later: 0.5 * 1
    assert adv.tolist()[0] == pytest.approx([0.5, 1.0])


def test_policy_loss_clips_both_signs():
    new, old, m = t([[math.log(1.5), math.log(0.5)]]), t([[0.0, 0.0]]), t([[1, 1]])
    loss, stats = U.policy_loss(new, old, t([[1.0, 1.0]]), m, clip_range=0.2)
    # ratio (1.5, 0.5): unclipped (-1.5, -0.5), clipped (-1.2, -0.8); max (-1.2, -0.5)
    assert loss.item() == pytest.approx(-0.85)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    loss, stats = U.policy_loss(new, old, t([[-1.0, -1.0]]), m, clip_range=0.2)
    # unclipped (1.5, 0.5), clipped (1.2, 0.8); max (1.5, 0.8)
    assert loss.item() == pytest.approx(1.15)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_policy_loss_gradient_zero_when_clipped():
    new = t([[math.log(1.5)]]).requires_grad_()
    loss, _ = U.policy_loss(new, t([[0.0]]), t([[1.0]]), t([[1]]))
    loss.backward()
    assert new.grad.item() == 0.0


def test_value_loss_clipped():
    v, old, ret, m = t([[1.0, 1.0]]), t([[0.0, 0.5]]), t([[1.0, 0.0]]), t([[1, 1]])
    loss, stats = U.value_loss(v, old, ret, m, clip_range=0.2)
    # row 1: clipped v = 0.2 -> max(0, 0.64) = 0.64; row 2: clipped 0.7 -> max(1, 0.49) = 1
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_kl_estimators():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    # log_r = log(0.25/0.5) = -log 2
    assert U.kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert U.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert U.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    assert U.kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1"):
        U.kl_estimate(logp, ref, "k9")  # type: ignore[arg-type]


def test_score_placed_at_last_response_token():
    kl_rewards = t([[-0.1, -0.1, -0.1], [-0.2, -0.2, -0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = U.place_score_at_last_token(kl_rewards, t([1.0, 2.0]), mask)
    assert out.tolist() == [pytest.approx([-0.1, 0.9, 0.0]), pytest.approx([-0.2, -0.2, 1.8])]


def test_truncate_at_eos_and_missing_eos_penalty():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    trunc, mask, ended = U.truncate_at_eos(responses, eos_token_id=2, pad_token_id=0)
    assert trunc.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert ended.tolist() == [True, False, True]
    scores = t([3.0, 3.0, 3.0])
    assert U.apply_missing_eos_penalty(scores, ended, 1.0).tolist() == [3.0, 2.0, 3.0]
    assert U.apply_missing_eos_penalty(scores, ended, None).tolist() == [3.0, 3.0, 3.0]


def test_short_responses_score_below_every_other_response():
    scores = t([2.0, -0.5, 1.5, 0.25])
    # the first (2.0, the best) and third are shorter than the data's shortest response: each
    # gets min(own, -0.5 = the worst other) - 1
    short = torch.tensor([True, False, True, False])
    assert U.floor_short_responses(scores, short, 1.0).tolist() == [-1.5, -0.5, -1.5, 0.25]
    # a short response already below the others keeps its own score, less the penalty
    assert U.floor_short_responses(t([-3.0, 1.0]), torch.tensor([True, False]), 0.5).tolist() == [-3.5, 1.0]
    # none short: unchanged (a copy); all short: nothing to compare, only the penalty
    none = torch.zeros(4, dtype=torch.bool)
    out = U.floor_short_responses(scores, none, 1.0)
    assert out.tolist() == scores.tolist() and out is not scores
    assert U.floor_short_responses(scores, ~none, 1.0).tolist() == [1.0, -1.5, 0.5, -0.75]


def test_logprobs_with_temperature_and_entropy():
    logits = t([[[0.0, math.log(3.0)]]])
    # temperature 1: p(token 1) = 3/4; temperature 2: logits/2 -> p = sqrt3 / (1 + sqrt3)
    assert U.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    s3 = math.sqrt(3.0)
    assert U.logprobs_from_logits(logits, torch.tensor([[1]]), 2.0).item() == pytest.approx(math.log(s3 / (1 + s3)))
    assert U.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


def test_explained_variance():
    ret, m = t([[1.0, 2.0, 3.0]]), t([[1, 1, 1]])
    assert U.explained_variance(ret, ret, m) == pytest.approx(1.0)
    # V = 0 explains nothing
    assert U.explained_variance(torch.zeros_like(ret), ret, m) == pytest.approx(0.0)
