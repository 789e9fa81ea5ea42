"""Mismatched negatives from *similar* prompts: a probe of the reward-model recipe (BENCHMARKS.md,
"Eleventh session"), not an engine option.

``ppo_core.reward.mismatched_pairs`` pairs a prompt's chosen response against the chosen response
of a random other prompt. Here the other prompt is one of the ``k`` most similar ones, so the
losing response differs from a fitting one only in the few words the prompt asks for (a hard
negative). ``python -m bench.hard_negatives TASK PAIRS.jsonl`` prints, for random and similar
partners and for the repeated-segment negatives of ``bench.repeat_negatives``, how often the
task's gold scorer (a generality task name or ``module:function``) ranks the synthetic pair
the other way round; ``bench/rm_probe.py --partner similar`` trains a reward model with them.
"""
from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import sparse

from bench.repeat_negatives import repeated_segment_pairs
from ppo_core.reward import mismatched_pairs, pairs_from_partners


def nearest_prompts(prompts: Sequence[str], k: int, seed: int, chunk: int = 1024) -> np.ndarray:
    """``(n, k)`` indices of each prompt's ``k`` most similar other prompts.

    Similarity is the cosine of the prompts' word sets weighted by inverse document frequency
    (scikit-learn's smoothed idf), so shared rare words (the items a prompt names) count more
    than shared template words. Rows with the same prompt text rank last (a row's own text
    appears only when ``k`` exceeds the other distinct prompts); similarities within 1e-4 of
    each other are ties, broken at random (``seed``). Memory: a few ``chunk x n`` arrays.
    """
    n = len(prompts)
    vocab: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(prompts):
        for w in set(p.lower().split()):
            rows.append(i)
            cols.append(vocab.setdefault(w, len(vocab)))
    x = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, len(vocab)))
    df = np.asarray(x.sum(0)).ravel()
    x = x @ sparse.diags((np.log((1 + n) / (1 + df)) + 1).astype(np.float32))
    norm = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel()).clip(min=1e-12)
    x = (sparse.diags(1 / norm) @ x).tocsr()
    ids = np.unique(np.asarray(prompts, dtype=object), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    k = min(k, n - 1)
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        c = min(chunk, n - s)
        sim = (x[s:s + c] @ x.T).toarray() + rng.uniform(0, 1e-4, (c, n))   # (c, n)
        sim[ids[s:s + c, None] == ids[None, :]] = -np.inf
        out[s:s + c] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return out


def similar_mismatched_pairs(rows: list[dict[str, Any]], fraction: float, seed: int,
                             k: int = 8) -> list[dict[str, Any]]:
    """Up to ``round(fraction * len(rows))`` pairs ``(prompt_i, chosen_i) > (prompt_i, chosen_j)``
    with ``j`` drawn from the ``k`` prompts nearest to ``i`` (:func:`nearest_prompts`) whose
    prompt and chosen text differ from ``i``'s (``ppo_core.reward.pairs_from_partners``, the
    engine's own loop). Margins are 0."""
    n_out = round(fraction * len(rows))
    if n_out == 0 or len(rows) < 2:
        return []
    near = nearest_prompts([r["prompt"] for r in rows], k, seed)
    rng = np.random.default_rng(seed)

    def draw_pass(left: int) -> Iterable[tuple[int, Iterable[int]]]:
        return ((i, rng.permutation(near[i])) for i in rng.permutation(len(rows))[:left])

    return pairs_from_partners(rows, n_out, draw_pass)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", help="a generality task name or a gold scorer module:function")
    p.add_argument("pairs", help="its pairs.jsonl")
    p.add_argument("--n", type=int, default=4800, help="use the first N pairs (about a lineage's RM split)")
    args = p.parse_args()
    module, name = args.task.split(":") if ":" in args.task else (f"bench.tasks.{args.task}", "gold_score_batch")
    gold = getattr(importlib.import_module(module), name)
    with open(args.pairs) as f:
        rows = [json.loads(line) for line in f][: args.n]

    def wrong_order(pairs: list[dict[str, Any]]) -> tuple[float, float]:
        prompts = [r["prompt"] for r in pairs]
        c = np.array(gold(prompts, [r["chosen"] for r in pairs]))
        r = np.array(gold(prompts, [r["rejected"] for r in pairs]))
        return float((c < r).mean()), float((c == r).mean())

    print(f"| {args.task} | gold ranks the pair the other way | gold tie |")
    print("|---|---:|---:|")
    for name, pairs in [("labelled pairs", rows), ("mismatched, random partner", mismatched_pairs(rows, 0.5, 0)),
                        ("mismatched, 1 of 8 nearest", similar_mismatched_pairs(rows, 0.5, 0, 8)),
                        ("mismatched, 1 of 32 nearest", similar_mismatched_pairs(rows, 0.5, 0, 32)),
                        ("one segment repeated", repeated_segment_pairs(rows, 1.0, 0))]:
        if not pairs:   # one-sentence answers have no segment to repeat
            print(f"| {name} | - | - |")
            continue
        w, t = wrong_order(pairs)
        print(f"| {name} | {w:.3f} | {t:.3f} |")


if __name__ == "__main__":
    main()
