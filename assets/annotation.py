"""Annotation batches: the policies' own samples, paired for a labeller.

A batch is a JSONL file with one row per prompt and the columns of ingest's ``labels`` format
(``prompt``, ``response_a``, ``response_b``, ``preference``), the preference left empty. The two
responses come from the two policies of the latest comparison (the champion and the challenger
it kept or beat), as Llama 2 pairs responses of different model variants: a reward model that
favoured a refused challenger's exploit then sees that exploit labelled. A
person fills ``preference`` with ``a`` or ``b`` and drops the file into the landing folder;
the next round reads it like any preference file (an empty or unknown label is quarantined
with its reason, never dropped).

For tasks with a gold scorer, :func:`simulate_labels` is the labeller: a Bradley-Terry
annotator who prefers ``a`` with probability ``sigmoid((gold_a - gold_b) / temperature)``
(Bradley & Terry 1952; the noise model the reward model itself assumes), so the loop can run
unattended and the label noise is a known quantity.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from assets.ingest import LABEL_COLUMNS

Scorer = Callable[[list[str], list[str]], list[float]]


def pick_prompts(prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` distinct prompts (all when fewer), a different draw for every seed."""
    unique = sorted(set(str(p) for p in prompts))
    rng = random.Random(seed)
    return unique if n <= 0 or n >= len(unique) else rng.sample(unique, n)


def batch_frame(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
                batch_id: str) -> pd.DataFrame:
    """The rows a labeller sees: two responses to each prompt, preference empty."""
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"annotation batch: {len(prompts)} prompts, {len(responses_a)} and "
                         f"{len(responses_b)} responses")
    return pd.DataFrame({
        "id": [f"{batch_id}:{i}" for i in range(len(prompts))],
        "prompt": list(prompts), "response_a": list(responses_a), "response_b": list(responses_b),
        "preference": [None] * len(prompts), "source": batch_id,
    })


def paired_batch(prompts: Sequence[str], first: Sequence[str], second: Sequence[str], batch_id: str,
                 seed: int) -> pd.DataFrame:
    """Answers of two policies side by side, each row's order drawn at random (seeded), so the
    position of a response says nothing about which policy wrote it. ``policy_a`` /
    ``policy_b`` record it (0 = ``first``)."""
    rng = random.Random(seed)
    swap = [rng.random() < 0.5 for _ in prompts]
    a = [s if flip else f for f, s, flip in zip(first, second, swap)]
    b = [f if flip else s for f, s, flip in zip(first, second, swap)]
    frame = batch_frame(prompts, a, b, batch_id)
    frame["policy_a"] = [1 if flip else 0 for flip in swap]
    frame["policy_b"] = [0 if flip else 1 for flip in swap]
    return frame


def write_batch(frame: pd.DataFrame, path: Path) -> Path:
    """JSONL with the ``labels`` columns first; never overwrites an existing batch."""
    if path.exists():
        raise FileExistsError(f"{path} exists: an annotation batch is written once")
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"annotation batch lacks columns {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # dot-prefixed: the landing sensor skips it
    columns = [*LABEL_COLUMNS, *[c for c in frame.columns if c not in LABEL_COLUMNS]]
    with tmp.open("w") as f:
        for rec in frame[columns].to_dict(orient="records"):
            f.write(json.dumps(rec) + "\n")
    tmp.replace(path)
    return path


def bt_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """P(a preferred) under Bradley-Terry on gold scores; temperature 0 = a noiseless labeller."""
    diff = gold_a - gold_b
    if temperature <= 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    z = max(-60.0, min(60.0, diff / temperature))
    return 1.0 / (1.0 + math.exp(-z))


def simulate_labels(frame: pd.DataFrame, scorer: Scorer, temperature: float, seed: int) -> pd.DataFrame:
    """Fill ``preference`` with a simulated annotator's labels (Bradley-Terry on gold)."""
    prompts = frame["prompt"].astype(str).tolist()
    gold_a = [float(x) for x in scorer(prompts, frame["response_a"].astype(str).tolist())]
    gold_b = [float(x) for x in scorer(prompts, frame["response_b"].astype(str).tolist())]
    rng = random.Random(seed)
    labels = ["a" if rng.random() < bt_probability(a, b, temperature) else "b"
              for a, b in zip(gold_a, gold_b)]
    out = frame.copy()
    out["preference"], out["gold_a"], out["gold_b"] = labels, gold_a, gold_b
    return out
