"""Deterministic train / eval / test splits by a hash of the prompt, written per the data contract.

A pair's split depends only on its prompt text (and the split seed), so every pair with the
same prompt lands in the same split: no prompt is shared between train, eval and test, and
adding rows never moves an existing prompt to another split. The files and their columns are
exactly those of ``docs/ARCHITECTURE.md`` ("Data contract"):

    <root>/<data_version>/sft_train.parquet  sft_eval.parquet    prompt, completion
                          rm_train.parquet   rm_eval.parquet     prompt, chosen, rejected[, margin]
                          rm_heldout.parquet                     prompt, chosen, rejected[, margin]
                          ppo_train.parquet  ppo_eval.parquet    prompt (unique)
                          test_pairs.parquet                     prompt, chosen, rejected
                          test_prompts.parquet                   prompt (unique)
                          manifest.json

``data_version`` is a content hash of the split tables and the split settings, so the same
pairs and settings always give the same directory and different ones never overwrite it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from assets.ingest import content_hash

SPLITS: tuple[str, ...] = ("train", "eval", "test")
SPLIT_FILES: tuple[str, ...] = (
    "sft_train", "sft_eval", "rm_train", "rm_eval", "rm_heldout", "ppo_train", "ppo_eval",
    "test_pairs", "test_prompts",
)
MANIFEST = "manifest.json"
# A hash split is random per prompt: with 30 phrasings per bundled topic and 10% eval / test,
# a topic misses a split for some salts (salt 0 leaves "library" out of eval). 7 is the
# smallest salt that puts all 12 bundled topics in all three splits (tests/test_splits.py).
DEFAULT_SPLIT_SEED = 7


@dataclass(frozen=True)
class SplitSettings:
    """How pairs are assigned to splits."""

    train: float = 0.8
    """fraction of prompts for training (project default 80/10/10, issue 2)"""
    eval: float = 0.1
    """fraction of prompts for evaluation during training (early stopping, metrics)"""
    test: float = 0.1
    """fraction of prompts held out for the final evaluation only"""
    seed: int = DEFAULT_SPLIT_SEED
    """salt of the prompt hash: another seed gives another (still prompt-disjoint) split"""
    heldout: float = 0.2
    """fraction of the training prompts whose pairs go to ``rm_heldout`` instead of
    ``rm_train``: the held-out reward model PPO's over-optimization guard scores with is
    trained on them, so the policy is never trained on that signal. 0 leaves ``rm_heldout``
    empty (no guard)"""

    def __post_init__(self) -> None:
        fractions = (self.train, self.eval, self.test)
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions must be >= 0 and sum to 1, got train={self.train}, "
                f"eval={self.eval}, test={self.test}"
            )
        if not 0 <= self.heldout < 1:
            raise ValueError(f"heldout={self.heldout}: the guard's share of the training prompts "
                             "must be in [0, 1)")


def prompt_bucket(prompt: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) from the SHA-256 of ``seed`` and the prompt text."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(prompt: str, settings: SplitSettings = SplitSettings()) -> str:
    """``"train"``, ``"eval"`` or ``"test"`` for ``prompt``; depends on nothing else."""
    u = prompt_bucket(prompt, settings.seed)
    if u < settings.train:
        return "train"
    if u < settings.train + settings.eval:
        return "eval"
    return "test"


def is_heldout(prompt: str, settings: SplitSettings = SplitSettings()) -> bool:
    """Whether a training prompt's pairs train the held-out (guard) reward model; an
    independent hash (salt + 1), so the share is ``settings.heldout`` of the training prompts."""
    return prompt_bucket(prompt, settings.seed + 1) < settings.heldout


def split_pairs(pairs: pd.DataFrame, settings: SplitSettings = SplitSettings()) -> dict[str, pd.DataFrame]:
    """The pairs of each split, in input order (each prompt hashed once)."""
    buckets = {p: assign_split(p, settings) for p in pairs["prompt"].unique()}
    labels = pairs["prompt"].map(buckets)
    return {s: pairs[labels == s].reset_index(drop=True) for s in SPLITS}


def _unique_prompts(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"prompt": frame["prompt"].drop_duplicates().tolist()}, dtype=str)


def build_split_tables(
    pairs: pd.DataFrame, settings: SplitSettings = SplitSettings()
) -> dict[str, pd.DataFrame]:
    """Every file of the data contract as a table (``SPLIT_FILES`` -> DataFrame)."""
    by_split = split_pairs(pairs, settings)
    rm_cols = ["prompt", "chosen", "rejected"]
    if "margin" in pairs.columns and pairs["margin"].notna().any():
        rm_cols.append("margin")

    def sft(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"prompt": frame["prompt"], "completion": frame["chosen"]})

    train = by_split["train"]
    heldout = train["prompt"].map(lambda p: is_heldout(p, settings)).astype(bool)
    return {
        "sft_train": sft(train),
        "sft_eval": sft(by_split["eval"]),
        "rm_train": train.loc[~heldout, rm_cols].reset_index(drop=True),
        "rm_eval": by_split["eval"][rm_cols].copy(),
        "rm_heldout": train.loc[heldout, rm_cols].reset_index(drop=True),
        "ppo_train": _unique_prompts(by_split["train"]),
        "ppo_eval": _unique_prompts(by_split["eval"]),
        "test_pairs": by_split["test"][["prompt", "chosen", "rejected"]].copy(),
        "test_prompts": _unique_prompts(by_split["test"]),
    }


def write_splits(
    pairs: pd.DataFrame, root: Path, settings: SplitSettings = SplitSettings()
) -> dict[str, Any]:
    """Write the split files to ``root/<data_version>/`` and return the manifest.

    Writing goes to a temporary folder renamed into place, so a reader never sees half a
    version; an existing version is left untouched (same hash, same content).
    """
    tables = build_split_tables(pairs, settings)
    h = hashlib.sha256()
    for name in SPLIT_FILES:
        h.update(f"{name}:{content_hash(tables[name])}".encode())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    data_version = h.hexdigest()[:16]
    split_dir = root / data_version
    manifest = {
        "data_version": data_version,
        "counts": {name: len(tables[name]) for name in SPLIT_FILES},
        "fractions": {s: getattr(settings, s) for s in SPLITS},
        "seed": settings.seed,
        "n_pairs": len(pairs),
        "n_prompts": {s: int(tables[f].shape[0]) for s, f in
                      zip(SPLITS, ("ppo_train", "ppo_eval", "test_prompts"))},
        "files": {name: f"{name}.parquet" for name in SPLIT_FILES},
    }
    if (split_dir / MANIFEST).exists():
        return json.loads((split_dir / MANIFEST).read_text())
    tmp = root / f".{data_version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SPLIT_FILES:
        tables[name].to_parquet(tmp / f"{name}.parquet", index=False)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    try:
        tmp.replace(split_dir)
    except OSError:  # another run wrote the same version first: identical content, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (split_dir / MANIFEST).exists():
            raise
    return manifest


def read_split_prompts(split_dir: Path) -> dict[str, set[str]]:
    """The prompt set of each split as stored on disk (for leakage checks)."""
    files = {"train": ("sft_train", "rm_train", "ppo_train"),
             "eval": ("sft_eval", "rm_eval", "ppo_eval"),
             "test": ("test_pairs", "test_prompts")}
    return {
        split: set().union(*(set(pd.read_parquet(split_dir / f"{n}.parquet")["prompt"]) for n in names))
        for split, names in files.items()
    }
