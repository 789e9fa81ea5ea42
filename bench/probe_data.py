"""What the reward-model probes (``bench/rm_probe.py``, ``bench/dpo_probe.py``) read from a
finished lineage, and how they score a probe against the gold order."""
from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def lineage_dirs(home: str | Path) -> tuple[Path, str]:
    """The lineage's split folder and its SFT model's ``final/`` under ``RLHF_HOME``."""
    split = Path(glob.glob(str(Path(home) / "data/splits/*/manifest.json"))[0]).parent
    return split, glob.glob(str(Path(home) / "models/sft_model/*/final"))[0]


def encode_triples(tok: Any, df: pd.DataFrame, max_length: int = 128) -> list[tuple[list[int], list[int], int]]:
    """(prompt + chosen ids, prompt + rejected ids, prompt length) per pair, as the engine encodes."""
    from ppo_core.data import encode_prompt, encode_prompt_response

    return [(encode_prompt_response(tok, r.prompt, r.chosen, max_length).input_ids,
             encode_prompt_response(tok, r.prompt, r.rejected, max_length).input_ids,
             len(encode_prompt(tok, r.prompt))) for r in df.itertuples()]


def gold_agreement(chosen: Sequence[float], rejected: Sequence[float],
                   gold_chosen: Sequence[float], gold_rejected: Sequence[float]) -> float:
    """Share of the pairs gold orders (ties left out) that the scores order the same way."""
    n = ok = 0
    for a, b, ga, gb in zip(chosen, rejected, gold_chosen, gold_rejected):
        if ga == gb:
            continue
        n += 1
        ok += (a > b) == (ga > gb)
    return ok / n


def encoded_sets(tok: Any, split: Path, train: pd.DataFrame, gold: Any) -> tuple[list, list, list, list, list]:
    """The encoded training pairs, ``rm_eval`` and ``test_pairs``, and gold's scores of the test
    pairs' chosen and rejected answers."""
    ev, test = pd.read_parquet(split / "rm_eval.parquet"), pd.read_parquet(split / "test_pairs.parquet")
    prompts = test.prompt.tolist()
    return (encode_triples(tok, train), encode_triples(tok, ev), encode_triples(tok, test),
            gold(prompts, test.chosen.tolist()), gold(prompts, test.rejected.tolist()))
