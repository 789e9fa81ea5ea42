"""Pure tensor helpers for PPO: masks, whitening, GAE, clipped losses, KL estimators.

Conventions shared by every function here (and by :mod:`ppo_core.ppo`):

* ``B`` is the number of episodes, ``T`` the number of response positions.
* A response ``mask`` (B, T) is 1 on real response tokens (the EOS token included) and 0 on
  the right padding after EOS; it may be bool or float.
* Per-token quantities (log-probs, values, rewards, advantages) are aligned with the response
  token they belong to: ``logprobs[:, t]`` is log pi(response[:, t] | prompt, response[:, :t])
  and ``values[:, t]`` is the critic's estimate *before* emitting ``response[:, t]``.

The math follows TRL's ``trl/experimental/ppo/ppo_trainer.py`` (metric names, whitening,
clipped losses) and OpenRLHF's ``openrlhf/models/utils.py`` / ``trainer/ppo_utils`` (GAE over
the action mask, KL estimators), which in turn follow Schulman et al. 2017 (PPO), Schulman et
al. 2016 (GAE) and J. Schulman, "Approximating KL divergence" (2020) for k1/k2/k3.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; Bessel-corrected by default as in TRL's ``masked_var``.

    Raises ValueError when fewer than two entries are unmasked and ``unbiased`` is set (the
    correction would divide by zero): use a larger mini-batch.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.to(values.dtype).sum()
        if n < 2:
            raise ValueError(
                f"masked_var: {int(n.item())} unmasked value(s); the unbiased variance needs at "
                "least 2 - increase rollout_batch_size / mini-batch size")
        var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (TRL's ``masked_whiten``).

    With ``shift_mean=False`` the mean is added back, so only the scale changes (used for
    rewards, whose sign matters). Masked-out positions are set to 0 in the result.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------------------------
# log-probs and entropy
# ---------------------------------------------------------------------------------------------
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at ``tokens``.

    logits (B, T, V), tokens (B, T) -> (B, T). Dividing by the sampling temperature makes the
    log-probs those of the distribution the tokens were actually drawn from (TRL and OpenRLHF
    both do this; without it the PPO ratio compares against the wrong policy).

    Computed in float32 whatever the model's dtype: a bf16 policy (``strategy.bf16``) gives
    bf16 logits, and bf16 keeps 8 significant bits, so dividing by the temperature or
    normalising in bf16 would shift log-probs by ~|logit| x 2^-8. OpenRLHF's actor casts its
    logits to float32 before ``log_probs_from_logits`` divides them for the same reason
    (``openrlhf/models/actor.py``, PR #634). The sampler (:mod:`ppo_core.generation`) casts
    before dividing too, so the rollout's old log-probs and these recomputed ones round alike
    and the ratio exp(new - old) is not bf16-rounded.
    """
    logits = logits.float()  # before the division: see above
    if temperature != 1.0:
        logits = logits / temperature
    # gather-then-logsumexp avoids materialising the full (B, T, V) log-softmax tensor
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T), in float32
    whatever the logits' dtype (as :func:`logprobs_from_logits`)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------
# KL and rewards
# ---------------------------------------------------------------------------------------------
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020).

    With ``log_r = ref_logprobs - logprobs``:
    ``k1 = -log_r`` (unbiased, can be negative), ``k2 = log_r**2 / 2`` (biased, low variance),
    ``k3 = exp(log_r) - 1 - log_r`` (unbiased and always >= 0). TRL's ``kl_estimator``
    offers k1 (default) and k3.
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a mask, right *or* left padded: (B, T) -> (B,);
    0 for empty rows. Reward models read their score there; PPO puts the score there."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return (positions * mask.to(torch.long)).argmax(-1)


def verification_tolerance(dtype: torch.dtype) -> float:
    """atol = rtol for checking that a faster path (:mod:`ppo_core.fast_decode`, packed
    forwards in :mod:`ppo_core.packing`) reproduces a model's own forward in ``dtype``.

    1e-4 in float32 (room for another summation order, far below the O(1) logit errors of a
    wrong mask, rotary table or weight layout that the checks exist to catch). A bf16 model
    rounds every activation to 8 significant bits, so two correct kernels that sum in another
    order (a fused q/k/v matmul, GPU GEMMs picking another split) differ by an ulp or more:
    4 ulps of the dtype (bf16 4 x 2^-7 = 0.031, fp16 0.0039), still far below those errors.
    """
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, L) mask -> (B, L) with 0 at the first real token.

    Real tokens get the positions TRL's ``forward`` gives them; padded slots get 0 on the left
    and repeat the last position on the right (TRL counts on), which no masked-out slot reads.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def place_score_at_last_token(token_rewards: torch.Tensor, scores: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """Add the sequence score ``scores`` (B,) to the last response token of each row.

    token_rewards (B, T) are usually ``-kl_coef * kl``; the result is zero on padding.
    OpenRLHF (``compute_reward``) and DeepSpeed-Chat put the score on the last real token.
    TRL puts it one position later (inside the padding); we keep it on a token the policy
    actually emitted so the padding never carries signal.
    """
    rewards = token_rewards * mask.to(token_rewards.dtype)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def truncate_at_eos(responses: torch.Tensor, eos_token_id: int,
                    pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS (kept) and pad the rest.

    responses (B, T) -> (truncated (B, T), mask (B, T) bool, ended (B,) bool). ``ended`` is
    True for rows that contain an EOS; the others were cut by the length limit. Same rule as
    TRL's ``truncate_response``.
    """
    is_eos = responses == eos_token_id
    # number of EOS strictly before position t; a token is kept while that count is 0
    eos_before = torch.cumsum(is_eos.to(torch.long), dim=-1) - is_eos.to(torch.long)
    mask = eos_before == 0
    truncated = responses.masked_fill(~mask, pad_token_id)
    return truncated, mask, is_eos.any(-1)


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor,
                              penalty: float | None) -> torch.Tensor:
    """``scores - penalty`` for responses that hit the length limit without EOS (TRL's
    ``missing_eos_penalty``); ``None`` leaves the scores unchanged. Returns a new tensor."""
    if penalty is None:
        return scores.clone()
    return scores - penalty * (~ended).to(scores.dtype)


def floor_short_responses(scores: torch.Tensor, short: torch.Tensor, penalty: float) -> torch.Tensor:
    """``short`` responses (B,) bool, shorter than any in the preference data, score no more
    than the lowest score of the others, less ``penalty``; the rest are unchanged. A reward
    model never saw such a response, so its score is extrapolation: an implicit (DPO) reward
    model rates the empty answer above the policy's real ones once its training has moved
    probability off the answers it saw, and PPO learns to answer nothing. Against the batch's
    own worst answer, never a constant, so the floor is in the scores' current units. With
    every response short there is nothing to compare: the scores only lose ``penalty``.
    Returns a new tensor."""
    if not bool(short.any()):
        return scores.clone()
    floor = scores[~short].min() if bool((~short).any()) else scores.max()
    return torch.where(short, torch.minimum(scores, floor) - penalty, scores)


# ---------------------------------------------------------------------------------------------
# advantages and losses
# ---------------------------------------------------------------------------------------------
def gae_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                   gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    values, rewards, mask: (B, T). Returns (advantages, returns), both (B, T) and zero on
    padding; ``returns = advantages + values`` is the critic's target. The value after the
    last real token is 0 (episode end), as in OpenRLHF's ``get_advantages_and_returns``.
    Defaults gamma=1, lam=0.95 are TRL's and OpenRLHF's.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = values.size(1)
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    # T is the response length (tens of steps): a short Python loop of (B,) ops is cheap
    for t in range(T - 1, -1, -1):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * m
    return advantages, (advantages + values) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), averaged over response tokens.

    Returns (loss, stats) with stats ``clipfrac`` (fraction of tokens where the clipped
    branch is active), ``approxkl`` (``0.5 * mean(log_ratio**2)``, TRL's
    ``policy/approxkl_avg``) and ``ratio`` (mean ratio). clip_range 0.2 is the paper's.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "ratio": masked_mean(ratio.detach(), mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (clip(v, v_old +- c) - R)^2))``.

    As in TRL (``cliprange_value`` 0.2) and OpenAI's baselines PPO2. Returns (loss, stats)
    with ``clipfrac`` (fraction of tokens where the clipped branch is larger).
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over masked tokens (CleanRL's debug variable); nan if Var(R)=0."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r.item() == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, unbiased=False) / var_r)
