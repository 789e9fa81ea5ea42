"""``PPOTrainer.rollout()`` as assembled, on a hand-built batch.

The sampler, the reference, the critic and the reward source are replaced by stubs that return
fixed tensors, so every per-token reward, advantage and return below is computed by hand (in
the comments next to each expectation). A swapped argument (gamma/lam, logprobs/ref_logprobs),
a flipped KL sign, the score on the wrong position or the EOS penalty on the wrong rows changes
at least one of the numbers.
"""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from ppo_core.config import ConfigError
from ppo_core.generation import GenerationOutput
from ppo_core.kl_controller import build_kl_controller
from ppo_core.ppo import PPOConfig, PPOTrainer
from ppo_core.rewards import RewardNormalizer

PAD, EOS = 0, 2
# Two episodes, T = 3 response columns.
#   row 0: response (5, EOS), then padding -> 2 real tokens, ended
#   row 1: response (6, 7, 8), cut by the length limit -> 3 real tokens, no EOS
RESPONSES = torch.tensor([[5, EOS, PAD], [6, 7, 8]])
MASK = torch.tensor([[True, True, False], [True, True, True]])
# the sampler's log-probs (padding holds junk: rollout() must mask it)
LOGPROBS = torch.tensor([[-1.0, -0.5, -9.0], [-0.2, -0.4, -0.6]])
REF_LOGPROBS = torch.tensor([[-1.5, -0.5, -3.0], [-0.2, -0.9, -0.1]])
VALUES = torch.tensor([[0.5, 1.0, 7.0], [1.0, 0.5, 1.5]])
RAW_SCORES = torch.tensor([6.0, 5.0])
# shaping: normalise with mean 1, std 2 -> (2.5, 2.0); row 1 has no EOS: -1 -> (2.5, 1.0);
# clip to +-1.5 -> (1.5, 1.0). (Clipping before the penalty would give row 1 0.5.)
SCORES = [1.5, 1.0]


def _cfg(**over) -> PPOConfig:
    base = dict(policy_path="policy", train_file="train.parquet", output_dir="out",
                reward_function="assets.bundled_task:gold_score_batch", rollout_batch_size=2,
                num_mini_batches=1, kl_coef=0.1, kl_estimator="k1", gamma=0.9, lam=0.5,
                missing_eos_penalty=1.0, reward_clip=1.5, whiten_rewards=False,
                whiten_advantages=False)
    base.update(over)
    return PPOConfig(**base)


def _stub_trainer(cfg: PPOConfig) -> PPOTrainer:
    """A PPOTrainer whose model calls return the fixed tensors above (no model is built)."""
    prompt = torch.tensor([[PAD, 3, 4], [3, 4, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    gen = GenerationOutput(
        sequences=torch.cat([prompt, RESPONSES], 1),
        attention_mask=torch.cat([prompt_mask, MASK.long()], 1),
        responses=RESPONSES, response_mask=MASK, ended=torch.tensor([True, False]),
        logprobs=LOGPROBS.clone(), prompt_length=3)
    ref, critic = object(), SimpleNamespace(module=object())

    def policy_logprobs(model, g, with_entropy=False, layout=None):
        assert model is ref and g is gen and layout == "layout"   # the reference, not the actor
        return REF_LOGPROBS.clone(), None

    def critic_values(model, g, layout=None):
        assert model is critic.module and g is gen and layout == "layout"
        return VALUES.clone()

    def raw_scores(prompts, g, layout=None):
        assert prompts == ["p0", "p1"] and g is gen
        return RAW_SCORES.clone(), ["a", "b"]

    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.cfg = cfg
    trainer.kl_ctl = build_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    trainer.normalizer = RewardNormalizer(mean=1.0, std=2.0)
    trainer.timings = {}
    trainer.ref, trainer.critic = ref, critic
    trainer.next_prompts = lambda: (["p0", "p1"], prompt, prompt_mask)
    trainer.generate = lambda ids, mask: gen
    trainer.layout = lambda g: "layout"
    trainer.policy_logprobs = policy_logprobs
    trainer.critic_values = critic_values
    trainer.raw_scores = raw_scores
    return trainer


def test_rollout_rewards_advantages_returns_by_hand():
    ro = _stub_trainer(_cfg()).rollout()
    assert ro.scores.tolist() == pytest.approx(SCORES)
    assert ro.raw_scores.tolist() == pytest.approx([6.0, 5.0])
    # k1 = logprobs - ref_logprobs on real tokens: row 0 (0.5, 0), row 1 (0, 0.5, -0.5)
    torch.testing.assert_close(ro.kl, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, -0.5]]))
    # rewards = -0.1 * kl, plus the score on the last real token (row 0: t=1, the EOS)
    # row 0: (-0.05, 0 + 1.5, 0); row 1: (0, -0.05, 0.05 + 1.0)
    torch.testing.assert_close(ro.rewards, torch.tensor([[-0.05, 1.5, 0.0], [0.0, -0.05, 1.05]]))
    # GAE, gamma 0.9, lam 0.5 (gamma * lam = 0.45); V after the last real token is 0
    # row 0: t=1 delta = 1.5 - 1.0 = 0.5 -> A = 0.5
    #        t=0 delta = -0.05 + 0.9 * 1.0 - 0.5 = 0.35 -> A = 0.35 + 0.45 * 0.5 = 0.575
    # row 1: t=2 delta = 1.05 - 1.5 = -0.45 -> A = -0.45
    #        t=1 delta = -0.05 + 0.9 * 1.5 - 0.5 = 0.8 -> A = 0.8 + 0.45 * -0.45 = 0.5975
    #        t=0 delta = 0 + 0.9 * 0.5 - 1.0 = -0.55 -> A = -0.55 + 0.45 * 0.5975 = -0.281125
    adv = torch.tensor([[0.575, 0.5, 0.0], [-0.281125, 0.5975, -0.45]])
    torch.testing.assert_close(ro.advantages, adv)
    # returns = A + V on real tokens
    torch.testing.assert_close(ro.returns, torch.tensor([[1.075, 1.5, 0.0], [0.718875, 1.0975, 1.05]]))
    # the stored values and log-probs are masked (padding junk gone)
    torch.testing.assert_close(ro.values, torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.5, 1.5]]))
    torch.testing.assert_close(ro.logprobs, torch.tensor([[-1.0, -0.5, 0.0], [-0.2, -0.4, -0.6]]))
    torch.testing.assert_close(ro.ref_logprobs, torch.tensor([[-1.5, -0.5, 0.0], [-0.2, -0.9, -0.1]]))


def test_rollout_floors_responses_shorter_than_the_data():
    """min_response_length 3: row 0 (2 tokens, EOS included) is shorter than any response in
    the data. Normalised it scores 2.5, above row 1's 1.0 (after row 1's missing-EOS penalty);
    floored it gets min(2.5, 1.0) - 1 = 0.0. Row 1 (3 tokens) is unchanged, and the metrics
    count one short response of two."""
    trainer = _stub_trainer(_cfg(min_response_length=3))
    ro = trainer.rollout()
    assert ro.scores.tolist() == pytest.approx([0.0, 1.0])
    # the score lands on row 0's last real token (the EOS, t=1) beside its KL reward
    torch.testing.assert_close(ro.rewards, torch.tensor([[-0.05, 0.0, 0.0], [0.0, -0.05, 1.05]]))
    assert trainer.rollout_metrics(ro)["val/short_frac"] == 0.5
    # the default (1) never floors: a response has at least one token
    assert _stub_trainer(_cfg()).rollout().scores.tolist() == pytest.approx(SCORES)


def test_rollout_metrics_by_hand():
    trainer = _stub_trainer(_cfg())
    m = trainer.rollout_metrics(trainer.rollout())
    assert m["objective/kl"] == pytest.approx((0.5 + 0.0) / 2)            # summed per response
    assert m["objective/non_score_reward"] == pytest.approx((-0.05 + 0.0) / 2)
    assert m["objective/rlhf_reward"] == pytest.approx((-0.05 + 1.5 + 0.0 + 1.0) / 2)
    assert m["objective/scores"] == pytest.approx(1.25)
    assert m["objective/raw_scores"] == pytest.approx(5.5)
    assert m["objective/entropy"] == pytest.approx((1.5 + 1.2) / 2)       # -sum of log-probs
    assert m["val/ended_frac"] == 0.5 and m["val/num_eos_tokens"] == 1.0
    assert m["val/response_length"] == pytest.approx(2.5)
    assert m["val/short_frac"] == 0.0


def test_rollout_k3_estimator():
    ro = _stub_trainer(_cfg(kl_estimator="k3")).rollout()
    # log_r = ref - logprobs: row 0 (-0.5, 0), row 1 (0, -0.5, 0.5); k3 = e^log_r - 1 - log_r
    k_neg, k_pos = math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5   # 0.10653, 0.14872
    kl = torch.tensor([[k_neg, 0.0, 0.0], [0.0, k_neg, k_pos]])
    torch.testing.assert_close(ro.kl, kl)
    torch.testing.assert_close(ro.rewards, torch.tensor(
        [[-0.1 * k_neg, 1.5, 0.0], [0.0, -0.1 * k_neg, -0.1 * k_pos + 1.0]]))


def test_rollout_whitens_advantages_but_not_returns():
    ro = _stub_trainer(_cfg(whiten_advantages=True)).rollout()
    raw = [0.575, 0.5, -0.281125, 0.5975, -0.45]               # the 5 real tokens, from above
    mu, sd = statistics.mean(raw), statistics.stdev(raw)        # TRL: unbiased variance
    want = [[(raw[0] - mu) / sd, (raw[1] - mu) / sd, 0.0],
            [(raw[2] - mu) / sd, (raw[3] - mu) / sd, (raw[4] - mu) / sd]]
    torch.testing.assert_close(ro.advantages, torch.tensor(want), atol=1e-5, rtol=1e-5)
    # the critic's targets come from the raw advantages
    torch.testing.assert_close(ro.returns, torch.tensor([[1.075, 1.5, 0.0], [0.718875, 1.0975, 1.05]]))


@pytest.mark.parametrize("over", [{"top_k": 5}, {"top_p": 0.9}])
def test_filtered_sampling_refused(over):
    """The rollout's log-probs and every recomputed one are those of the unfiltered
    distribution: top-k / nucleus sampling would bias the ratio and the KL."""
    with pytest.raises(ConfigError, match="top_k 0, top_p 1.0"):
        _cfg(**over)
    _cfg(top_k=0, top_p=1.0)   # the defaults stay valid (stored stage configs carry them)


def test_guard_point_floors_responses_shorter_than_the_data():
    """The guard judges a short response as PPO's reward does. Three guard prompts, the batch
    above plus a row: row 0 (2 tokens) is short at min_response_length 3. Held-out raw scores
    (4, 1, 2) normalise with mean 1, std 2 to (1.5, 0, 0.5); row 0 floors to min(1.5, 0) - 1 =
    -1. Proxy raw (6, 5, 3) normalise to (2.5, 2, 1); row 0 floors to min(2.5, 1) - 1 = 0."""
    responses = torch.tensor([[5, EOS, PAD], [6, 7, 8], [6, 7, EOS]])
    mask = torch.tensor([[True, True, False], [True] * 3, [True] * 3])
    prompt = torch.tensor([[PAD, 3, 4], [3, 4, 4], [3, 4, 4]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    gen = GenerationOutput(
        sequences=torch.cat([prompt, responses], 1),
        attention_mask=torch.cat([prompt_mask, mask.long()], 1),
        responses=responses, response_mask=mask, ended=torch.tensor([True, False, True]),
        logprobs=torch.zeros(3, 3), prompt_length=3)
    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.cfg = _cfg(min_response_length=3, guard_prompts=3, rollout_batch_size=3)
    trainer.normalizer = RewardNormalizer(mean=1.0, std=2.0)
    trainer.guard_normalizer = RewardNormalizer(mean=1.0, std=2.0)
    trainer.strategy = SimpleNamespace(device=torch.device("cpu"))
    trainer.rank, trainer.world, trainer.step = 0, 1, 5
    trainer.eval_ids, trainer.eval_prompts = [[3, 4]] * 3, ["p0", "p1", "p2"]
    trainer.prompt_batch = lambda ids: (prompt, prompt_mask)
    trainer.generate = lambda ids, mask, generator=None: gen
    trainer.layout = lambda g: "layout"
    trainer.policy_logprobs = lambda model, g, layout=None: (torch.zeros(3, 3), None)
    trainer.ref = object()
    trainer.raw_scores = lambda prompts, g, layout=None: (torch.tensor([6.0, 5.0, 3.0]), ["a", "b", "c"])
    trainer.guard_rm = lambda *args, **kw: torch.tensor([4.0, 1.0, 2.0])
    point, rows = trainer.guard_point()
    assert point.heldout_values == pytest.approx((-1.0, 0.0, 0.5))
    assert point.heldout == pytest.approx(-0.5 / 3)
    assert [r["proxy"] for r in rows] == pytest.approx([0.0, 2.0, 1.0])
    assert point.proxy == pytest.approx(1.0)
    # without the floor (the default, 1) the same samples score as the models say
    trainer.cfg = _cfg(guard_prompts=3, rollout_batch_size=3)
    point, rows = trainer.guard_point()
    assert point.heldout_values == pytest.approx((1.5, 0.0, 0.5))
    assert [r["proxy"] for r in rows] == pytest.approx([2.5, 2.0, 1.0])
