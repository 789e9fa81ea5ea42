"""A PPO reward function (``reward_function: "bench.ensemble_reward:score"``) that combines
several reward models' scores: the directories in ``$ENS_RM``, colon-separated. Each
response is re-encoded from its text (prompt + response + EOS, as the reward models were
trained). For the ensemble comparisons in BENCHMARKS.md; the engine's own ensemble is
``ppo_core.rewards.EnsembleReward`` (``reward_model_path`` as a list), standardised on all
of ``reward_norm_samples`` reference samples.

``$ENS_MODE``: ``mean`` (default) averages the raw scores; ``lcb`` and ``min`` are the
conservative objectives of Coste et al. 2023 ("Reward Model Ensembles Help Mitigate
Overoptimization"): each member's scores are standardised with the mean and std of the first
call in the process (with ``normalize_reward``, PPO's default, the first batch of reference
samples its reward normaliser draws; a resumed run refits them on its own first batch), then
``lcb`` returns mean - ``$ENS_LAMBDA`` (default 1) x std over members and ``min`` the lowest
member.
"""
from __future__ import annotations

import os

import torch

from ppo_core.data import encode_prompt_response, pad_sequences
from ppo_core.models import last_token_scores, load_sequence_scorer, load_tokenizer

_LOADED: list = []
_STATS: list = []


def score(prompts: list[str], responses: list[str]) -> list[float]:
    if not _LOADED:
        dirs = os.environ["ENS_RM"].split(":")
        tok = load_tokenizer(dirs[0])
        _LOADED.extend([tok, [load_sequence_scorer(d, pad_token_id=tok.pad_token_id).eval() for d in dirs]])
    tok, models = _LOADED
    seqs = [encode_prompt_response(tok, p, r, 160).input_ids for p, r in zip(prompts, responses)]
    ids, mask = pad_sequences(seqs, tok.pad_token_id)
    with torch.no_grad():
        raw = torch.stack([last_token_scores(m, ids, mask).float() for m in models])   # (members, b)
    return combine(raw, os.environ.get("ENS_MODE", "mean"), float(os.environ.get("ENS_LAMBDA", "1")), _STATS).tolist()


def combine(raw: torch.Tensor, mode: str, lam: float, stats: list[torch.Tensor]) -> torch.Tensor:
    """(members, b) raw scores -> (b,) rewards. ``stats`` (each member's mean and std) is filled
    from ``raw`` on the first conservative call and reused after."""
    if mode == "mean":
        return raw.mean(0)
    if mode not in ("lcb", "min"):
        raise ValueError(f"ENS_MODE={mode!r}: mean, lcb or min")
    if not stats:
        if raw.shape[1] < 2:
            raise ValueError(f"ENS_MODE={mode!r} standardises on its first call, which needs at least two "
                             f"responses (got {raw.shape[1]})")
        stats.extend([raw.mean(1, keepdim=True), raw.std(1, keepdim=True).clamp(min=1e-6)])
    z = (raw - stats[0]) / stats[1]
    return z.min(0).values if mode == "min" else z.mean(0) - lam * z.std(0)
