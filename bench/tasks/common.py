"""What the generality tasks share: the Bradley-Terry labeller and the seeded pair loop.

Each task supplies three functions: ``sample_prompt(rng) -> (prompt, spec)`` (``spec`` is the
task's parsed form of the prompt), ``sample_response(spec, rng) -> str`` (its noisy labeller)
and ``gold_reward(prompt, response) -> float``. :func:`preference_pairs` draws two labeller
responses per prompt and labels them as ``assets/bundled_task.py`` does:
``P(a preferred over b) = sigmoid((gold(a) - gold(b)) / temperature)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ["prompt", "chosen", "rejected"]
# Redraws allowed for one pair before giving up: a pair is redrawn when its two responses are
# identical or the (prompt, responses) triple already exists, which validation would quarantine.
MAX_REDRAWS = 100


def bt_preference(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley-Terry probability that ``a`` is preferred: ``sigmoid((gold_a - gold_b) / temperature)``."""
    z = (gold_a - gold_b) / temperature
    # the two branches avoid overflow of exp for large |z|
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def preference_pairs(
    n_pairs: int,
    seed: int,
    temperature: float,
    sample_prompt: Callable[[np.random.Generator], tuple[str, Any]],
    sample_response: Callable[[Any, np.random.Generator], str],
    gold_reward: Callable[[str, str], float],
) -> pd.DataFrame:
    """``n_pairs`` seeded pairs in TRL's explicit-prompt format (columns ``prompt``, ``chosen``, ``rejected``).

    No row is an identical pair or a duplicate of another row, so the pipeline's validation
    quarantines nothing (its gate allows 5%).
    """
    if temperature <= 0:
        raise ValueError(f"noise_temperature must be > 0, got {temperature}")
    rng = np.random.default_rng(seed)
    seen: set[tuple[str, str, str]] = set()
    rows = []
    for _ in range(n_pairs):
        for _ in range(MAX_REDRAWS):
            prompt, spec = sample_prompt(rng)
            a, b = sample_response(spec, rng), sample_response(spec, rng)
            key = (prompt, *sorted((a, b)))
            if a != b and key not in seen:
                break
        else:
            raise RuntimeError(f"no new distinct pair after {MAX_REDRAWS} draws; the task is too small "
                               f"for {n_pairs} pairs")
        seen.add(key)
        p_a = bt_preference(gold_reward(prompt, a), gold_reward(prompt, b), temperature)
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        rows.append((prompt, chosen, rejected))
    return pd.DataFrame(rows, columns=COLUMNS)


def label_stats(pairs: pd.DataFrame, gold_score_batch: Callable[[list[str], list[str]], list[float]]) -> dict[str, float]:
    """Gold means of ``chosen`` / ``rejected`` and the mislabelled share among pairs whose gold differs."""
    prompts = pairs["prompt"].tolist()
    g_c = np.asarray(gold_score_batch(prompts, pairs["chosen"].tolist()))
    g_r = np.asarray(gold_score_batch(prompts, pairs["rejected"].tolist()))
    decided = g_c != g_r
    return {
        "chosen_gold_mean": float(g_c.mean()),
        "rejected_gold_mean": float(g_r.mean()),
        "mislabelled_frac": float((g_c[decided] < g_r[decided]).mean()),
        "tied_frac": float(1.0 - decided.mean()),
        "n_prompts": float(pairs["prompt"].nunique()),
    }
