"""Repeated-segment negatives: a probe of the reward-model recipe (BENCHMARKS.md, "Twelfth
session"), not an engine option.

On recipe, the reward model scores an answer that names one ingredient twice (and so leaves
another unused) as high as the right answer, and PPO's samples keep that error. These pairs
put it in the training data without a task-specific rule: a prompt's chosen response beats
itself with one segment (sentence, or clause when there is one sentence) overwritten by a copy
of another. ``python -m bench.hard_negatives TASK PAIRS.jsonl`` prints how often the task's
gold scorer orders such a pair the other way round; ``bench/rm_probe.py --repeat F`` trains a
reward model with them.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[.!?;\n])")
_CLAUSE_END = re.compile(r"(?<=,)")


def segments(text: str) -> list[str]:
    """``text`` cut after each sentence end (``. ! ? ;`` or a newline), or after each comma when
    that gives fewer than two pieces; ``"".join(segments(t)) == t``, empty pieces dropped."""
    pieces = [s for s in _SENTENCE_END.split(text) if s]
    if len(pieces) < 2:
        pieces = [s for s in _CLAUSE_END.split(text) if s]
    return pieces


def duplicate_segment(text: str, source: int, target: int) -> str:
    """``text`` with segment ``target`` overwritten by a copy of segment ``source``; the target's
    leading whitespace and ending (its delimiter, or none) stay, so only the content repeats."""
    pieces = segments(text)
    src, dst = pieces[source].strip(), pieces[target]
    lead = dst[:len(dst) - len(dst.lstrip())]
    end = dst.rstrip()[-1:]
    body = src[:-1].rstrip() if src[-1:] in ".!?;," else src
    pieces[target] = lead + body + (" " + end if end in (".", "!", "?", ";", ",") else "") \
        + dst[len(dst.rstrip()):]
    return "".join(pieces)


def repeated_segment_pairs(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Up to ``round(fraction * len(rows))`` pairs ``(prompt, chosen) > (prompt, chosen with one
    segment overwritten by a copy of another)``, margin 0.

    Rows are visited in a seeded permutation (a fresh one per pass when ``fraction`` > 1); a
    chosen response with fewer than two :func:`segments`, or that the copy leaves unchanged,
    gives none.
    """
    n_out = round(fraction * len(rows))
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n_out:
        found = len(out)
        for i in rng.permutation(len(rows)):
            if len(out) >= n_out:
                break
            chosen = rows[i]["chosen"]
            k = len(segments(chosen))
            if k < 2:
                continue
            source, target = (int(x) for x in rng.choice(k, size=2, replace=False))
            repeated = duplicate_segment(chosen, source, target)
            if repeated.strip() != chosen.strip():
                out.append({"prompt": rows[i]["prompt"], "chosen": chosen, "rejected": repeated, "margin": 0.0})
        if len(out) == found:  # no row can give one: more passes would find none either
            break
    return out
