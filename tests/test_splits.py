"""Splits: deterministic by prompt hash, prompt-disjoint, and written exactly per the data contract."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from assets import bundled_task
from assets.ingest import load_preferences
from assets.schemas import validate_pairs
from assets.splits import (
    DEFAULT_SPLIT_SEED,
    MANIFEST,
    SPLIT_FILES,
    SplitSettings,
    assign_split,
    is_heldout,
    prompt_bucket,
    read_split_prompts,
    split_pairs,
    write_splits,
)

CONTRACT_COLUMNS = {
    "sft_train": ["prompt", "completion"], "sft_eval": ["prompt", "completion"],
    "rm_train": ["prompt", "chosen", "rejected"], "rm_eval": ["prompt", "chosen", "rejected"],
    "ppo_train": ["prompt"], "ppo_eval": ["prompt"],
    "test_pairs": ["prompt", "chosen", "rejected"], "test_prompts": ["prompt"],
}


@pytest.fixture(scope="module")
def bundled_pairs() -> pd.DataFrame:
    return validate_pairs(load_preferences("bundled", n_pairs=1500, seed=0).frame).valid


def test_files_and_columns_match_the_contract(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    manifest = write_splits(bundled_pairs, tmp_path)
    split_dir = tmp_path / manifest["data_version"]
    assert sorted(p.name for p in split_dir.iterdir()) == sorted([f"{n}.parquet" for n in SPLIT_FILES] + [MANIFEST])
    for name, columns in CONTRACT_COLUMNS.items():
        table = pd.read_parquet(split_dir / f"{name}.parquet")
        assert list(table.columns) == columns, name
        assert len(table) == manifest["counts"][name] > 0
    on_disk = json.loads((split_dir / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["fractions"] == {"train": 0.8, "eval": 0.1, "test": 0.1}
    assert manifest["seed"] == DEFAULT_SPLIT_SEED
    assert manifest["counts"]["sft_train"] + manifest["counts"]["sft_eval"] + manifest["counts"]["test_pairs"] \
        == len(bundled_pairs)


def test_sft_is_prompt_plus_chosen_and_ppo_prompts_unique(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    split_dir = tmp_path / write_splits(bundled_pairs, tmp_path)["data_version"]
    sft = pd.read_parquet(split_dir / "sft_train.parquet")
    rm = pd.read_parquet(split_dir / "rm_train.parquet")
    held = pd.read_parquet(split_dir / "rm_heldout.parquet")
    # the training pairs are cut by prompt into the main reward model's and the held-out one's
    guard = sft["prompt"].map(is_heldout).astype(bool)
    assert sft.loc[~guard, "prompt"].tolist() == rm["prompt"].tolist()
    assert sft.loc[~guard, "completion"].tolist() == rm["chosen"].tolist()
    assert sft.loc[guard, "prompt"].tolist() == held["prompt"].tolist()
    assert sft.loc[guard, "completion"].tolist() == held["chosen"].tolist()
    assert not set(rm["prompt"]) & set(held["prompt"])
    share = held["prompt"].nunique() / sft["prompt"].nunique()
    assert 0.12 < share < 0.28, share   # SplitSettings.heldout = 0.2 of the training prompts
    for name in ("ppo_train", "ppo_eval", "test_prompts"):
        prompts = pd.read_parquet(split_dir / f"{name}.parquet")["prompt"]
        assert prompts.is_unique, name
    assert set(pd.read_parquet(split_dir / "ppo_train.parquet")["prompt"]) == set(rm["prompt"]) | set(held["prompt"])


def test_heldout_zero_leaves_rm_heldout_empty(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    manifest = write_splits(bundled_pairs, tmp_path, SplitSettings(heldout=0.0))
    assert manifest["counts"]["rm_heldout"] == 0
    assert manifest["counts"]["rm_train"] == manifest["counts"]["sft_train"]
    with pytest.raises(ValueError, match="heldout=1.0"):
        SplitSettings(heldout=1.0)


def test_no_prompt_in_two_splits(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    prompts = read_split_prompts(tmp_path / write_splits(bundled_pairs, tmp_path)["data_version"])
    assert not prompts["train"] & prompts["eval"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["eval"] & prompts["test"]


def test_every_bundled_topic_in_every_split(bundled_pairs: pd.DataFrame) -> None:
    for split, frame in split_pairs(bundled_pairs).items():
        topics = {bundled_task.prompt_topic(p) for p in frame["prompt"]}
        assert topics == set(bundled_task.TOPICS), split
    # over all 360 prompts, not just those the sample happened to draw
    covered = {(bundled_task.prompt_topic(p), assign_split(p)) for p in bundled_task.all_prompts()}
    assert len(covered) == len(bundled_task.TOPICS) * 3


def test_deterministic_across_runs_and_row_order(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    first = write_splits(bundled_pairs, tmp_path / "a")
    second = write_splits(bundled_pairs.copy(), tmp_path / "b")
    assert first["data_version"] == second["data_version"]
    for name in SPLIT_FILES:
        a = pd.read_parquet(tmp_path / "a" / first["data_version"] / f"{name}.parquet")
        b = pd.read_parquet(tmp_path / "b" / second["data_version"] / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b)
    # the split of a prompt does not depend on the other rows or their order
    shuffled = bundled_pairs.sample(frac=1.0, random_state=7).reset_index(drop=True)
    before = {p: s for s, f in split_pairs(bundled_pairs).items() for p in f["prompt"]}
    after = {p: s for s, f in split_pairs(shuffled).items() for p in f["prompt"]}
    assert before == after
    assert write_splits(shuffled, tmp_path / "c")["data_version"] != first["data_version"]


def test_data_version_changes_with_content_and_settings(bundled_pairs: pd.DataFrame, tmp_path: Path) -> None:
    base = write_splits(bundled_pairs, tmp_path)["data_version"]
    fewer = write_splits(bundled_pairs.iloc[:-1], tmp_path)["data_version"]
    reseeded = write_splits(bundled_pairs, tmp_path, SplitSettings(seed=DEFAULT_SPLIT_SEED + 1))["data_version"]
    assert len({base, fewer, reseeded}) == 3
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3  # nothing overwritten


def test_fractions_follow_settings() -> None:
    prompts = [f"prompt number {i}" for i in range(20_000)]
    settings = SplitSettings(0.6, 0.3, 0.1)
    labels = pd.Series([assign_split(p, settings) for p in prompts]).value_counts(normalize=True)
    # binomial std at n=20000 is < 0.004; 0.02 is a loose, non-flaky bound
    assert abs(labels["train"] - 0.6) < 0.02
    assert abs(labels["eval"] - 0.3) < 0.02
    assert abs(labels["test"] - 0.1) < 0.02
    assert 0.0 <= prompt_bucket("x") < 1.0
    assert prompt_bucket("x", seed=0) != prompt_bucket("x", seed=1)


def test_margin_kept_in_reward_model_files_when_present(tmp_path: Path) -> None:
    prompts = [f"prompt {i}" for i in range(200)]
    pairs = pd.DataFrame({"prompt": prompts, "chosen": ["good"] * 200, "rejected": ["bad"] * 200,
                          "margin": [float(i) for i in range(200)]})
    split_dir = tmp_path / write_splits(pairs, tmp_path)["data_version"]
    rm = pd.read_parquet(split_dir / "rm_train.parquet")
    assert list(rm.columns) == ["prompt", "chosen", "rejected", "margin"]
    expected = dict(zip(pairs["prompt"], pairs["margin"]))
    assert all(expected[p] == m for p, m in zip(rm["prompt"], rm["margin"]))
    assert list(pd.read_parquet(split_dir / "test_pairs.parquet").columns) == ["prompt", "chosen", "rejected"]


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_rejected(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="split fractions must be >= 0 and sum to 1"):
        SplitSettings(*fractions)
