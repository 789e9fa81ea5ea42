"""Data assets (group ``data``): raw preferences -> validated pairs + quarantine -> splits.

Each asset writes Parquet under ``settings.data_root()`` in a content-addressed folder (a new
content never overwrites an old one) and returns a small JSON manifest for the IO manager.
The blocking check ``quarantine_fraction_below_threshold`` stops the splits (and everything
trained on them) when too much of the input was quarantined.
"""

# No `from __future__ import annotations` here: Dagster reads the Config parameter types from
# the live annotations and cannot resolve them as strings.
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.ingest import IngestError, content_hash, load_preferences, read_raw, write_raw
from assets.schemas import DEFAULT_MAX_CHARS, QuarantineReason, validate_pairs
from assets.splits import DEFAULT_SPLIT_SEED, SplitSettings, read_split_prompts, write_splits
from resources import settings

GROUP = "data"
# Code versions (every asset of the project has one): bump an asset's constant by hand when a
# change to its logic changes what it writes for the same inputs and config; Dagster then shows
# it, and everything downstream, as stale ("code version changed"). A change that keeps the
# output (refactor, logging) keeps the version. Data versions are the content hashes below, so a
# re-materialization that writes the same content leaves downstream assets fresh.
RAW_PREFERENCES_VERSION = "1"
VALIDATED_PREFERENCES_VERSION = "1"
DATASET_SPLITS_VERSION = "1"
PREVIEW_ROWS = 5
PREVIEW_CHARS = 80


class RawPreferencesConfig(dg.Config):
    """Where the preference data comes from."""

    source: str = Field(
        default="bundled",
        description="'bundled' (the seeded generator), a path to a JSONL/JSON/Parquet/CSV file or a "
        "folder of them, 'hf_disk:<path>' (datasets save_to_disk folder) or 'hf:<owner/name>' (hub)",
    )
    format: str = Field(default="auto", description="'auto', 'trl' (prompt/chosen/rejected) or 'hh' (HH-RLHF dialogues)")
    n_pairs: int = Field(default=8000, description="bundled generator: number of pairs (enough for the tiny reward model to reach 0.85+ gold-order agreement)")
    seed: int = Field(default=0, description="bundled generator: random seed")
    corrupt_fraction: float = Field(
        default=0.02, description="bundled generator: fraction of rows damaged on purpose to exercise quarantine"
    )
    hf_split: str = Field(default="train", description="split to read from a DatasetDict or hub dataset")


class PreferencePairsConfig(dg.Config):
    """How strict validation is."""

    max_chars: int = Field(default=DEFAULT_MAX_CHARS, description="longest allowed prompt / chosen / rejected, in characters")


class QuarantineCheckConfig(dg.Config):
    """Gate on the share of input rows that failed validation."""

    max_quarantine_fraction: float = Field(
        default=0.05, description="the check fails when quarantined / input rows is above this (5%: issue 2)"
    )


class DatasetSplitsConfig(dg.Config):
    """Split fractions (of prompts, by hash) and the hash seed."""

    # 80 / 10 / 10: the project default of issue 2.
    train_fraction: float = Field(default=0.8, description="fraction of prompts in train")
    eval_fraction: float = Field(default=0.1, description="fraction of prompts in eval")
    test_fraction: float = Field(default=0.1, description="fraction of prompts in test")
    seed: int = Field(default=DEFAULT_SPLIT_SEED, description="salt of the prompt hash (see assets.splits.DEFAULT_SPLIT_SEED)")
    heldout_fraction: float = Field(
        default=SplitSettings.heldout,
        description="share of the training prompts whose pairs train the held-out reward model "
        "(PPO's over-optimization guard) instead of the main one; 0 turns the guard off")


def _preview(frame: pd.DataFrame) -> dg.MetadataValue:
    """The first rows as a markdown table, long text cut so the UI stays readable."""
    head = frame.head(PREVIEW_ROWS).astype(object).map(
        lambda v: (s[:PREVIEW_CHARS] + "...") if len(s := str(v)) > PREVIEW_CHARS else s
    )
    head = head.map(lambda s: s.replace("\n", "\\n").replace("|", "\\|"))
    return dg.MetadataValue.md(head.to_markdown(index=False))


def _write_once(frame: pd.DataFrame, path: Path) -> None:
    """Parquet written atomically; an existing file of the same content address is kept."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=RAW_PREFERENCES_VERSION)
def raw_preferences(context: dg.AssetExecutionContext, config: RawPreferencesConfig) -> dg.Output[dict]:
    """Preference data from the configured source, normalized to prompt / chosen / rejected text."""
    try:
        result = load_preferences(
            config.source, config.format, n_pairs=config.n_pairs, seed=config.seed,
            corrupt_fraction=config.corrupt_fraction, hf_split=config.hf_split,
        )
    except IngestError as exc:  # a clean message in the UI instead of a stack trace
        raise dg.Failure(description=f"raw_preferences: {exc}") from exc
    version = content_hash(result.frame)
    path = settings.data_root() / "raw" / version / "raw_preferences.parquet"
    if not path.exists():
        write_raw(result.frame, path)
    issues = int(result.frame["ingest_issue"].notna().sum())
    if result.ignored_columns or result.skipped_files:
        context.log.warning(
            f"raw_preferences: ignored columns {result.ignored_columns}, skipped files {result.skipped_files}"
        )
    manifest = {
        "path": str(path), "n_rows": len(result.frame), "content_hash": version,
        "source": result.source, "format": result.format, "files": result.files,
        "ignored_columns": result.ignored_columns, "skipped_files": result.skipped_files,
    }
    metadata = {
        "n_rows": len(result.frame), "source": result.source, "format": result.format,
        "content_hash": version, "path": dg.MetadataValue.path(str(path)),
        "rows_with_ingest_issue": issues, "files": dg.MetadataValue.json(result.files),
        "ignored_columns": dg.MetadataValue.json(result.ignored_columns),
        "skipped_files": dg.MetadataValue.json(result.skipped_files),
        "preview": _preview(result.frame),
    }
    return dg.Output(manifest, metadata=metadata, data_version=dg.DataVersion(version))


@dg.multi_asset(
    outs={
        "preference_pairs": dg.AssetOut(
            group_name=GROUP, kinds={"parquet"}, code_version=VALIDATED_PREFERENCES_VERSION,
            description="pairs that satisfy assets.schemas.PreferencePairs",
        ),
        "quarantined_pairs": dg.AssetOut(
            group_name=GROUP, kinds={"parquet"}, code_version=VALIDATED_PREFERENCES_VERSION,
            description="pairs that failed validation, one reason (assets.schemas.QuarantineReason) per row",
        ),
    },
    ins={"raw_preferences": dg.AssetIn()},
)
def validated_preferences(
    context: dg.AssetExecutionContext, config: PreferencePairsConfig, raw_preferences: dict
) -> Iterator[dg.Output]:
    """Validate raw rows lazily; valid ones and quarantined ones are stored side by side."""
    if config.max_chars < 1:
        raise dg.Failure(description=f"validated_preferences config: max_chars must be >= 1, got {config.max_chars}")
    frame = read_raw(Path(raw_preferences["path"]))
    result = validate_pairs(frame, config.max_chars)
    version = content_hash(result.valid, {"raw": raw_preferences["content_hash"], "max_chars": config.max_chars})
    out_dir = settings.data_root() / "validated" / version
    pairs_path = out_dir / "preference_pairs.parquet"
    quarantine_path = out_dir / "quarantined_pairs.parquet"
    _write_once(result.valid, pairs_path)
    _write_once(result.quarantined, quarantine_path)
    counts = result.reason_counts
    n_valid, n_quarantined = len(result.valid), len(result.quarantined)
    context.log.info(f"{n_valid} valid, {n_quarantined} quarantined of {len(frame)}: {counts}")
    common = {
        "n_input": len(frame), "n_valid": n_valid, "n_quarantined": n_quarantined,
        "quarantine_fraction": result.quarantine_fraction, "max_chars": config.max_chars,
    }
    yield dg.Output(
        {"path": str(pairs_path), "n_rows": n_valid, "content_hash": version,
         "raw_content_hash": raw_preferences["content_hash"], "reason_counts": counts, **common},
        output_name="preference_pairs", data_version=dg.DataVersion(version),
        metadata={**common, "content_hash": version, "path": dg.MetadataValue.path(str(pairs_path)),
                  "reason_counts": dg.MetadataValue.json(counts), "preview": _preview(result.valid)},
    )
    yield dg.Output(
        {"path": str(quarantine_path), "n_rows": n_quarantined, "reason_counts": counts, **common},
        output_name="quarantined_pairs", data_version=dg.DataVersion(content_hash(result.quarantined)),
        metadata={**common, "path": dg.MetadataValue.path(str(quarantine_path)),
                  "reason_counts": dg.MetadataValue.json(counts),
                  **{f"reason/{r}": n for r, n in counts.items()},
                  "preview": _preview(result.quarantined)},
    )


@dg.asset_check(asset="preference_pairs", blocking=True)
def quarantine_fraction_below_threshold(
    config: QuarantineCheckConfig, preference_pairs: dict
) -> dg.AssetCheckResult:
    """Fails (and blocks downstream assets in the run) when too many rows were quarantined."""
    fraction = float(preference_pairs["quarantine_fraction"])
    threshold = config.max_quarantine_fraction
    counts = preference_pairs["reason_counts"]
    return dg.AssetCheckResult(
        passed=fraction <= threshold,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"quarantined {fraction:.2%} of {preference_pairs['n_input']} rows (threshold {threshold:.2%})",
        metadata={
            "quarantine_fraction": fraction, "threshold": threshold,
            "n_input": preference_pairs["n_input"], "n_quarantined": preference_pairs["n_quarantined"],
            "reason_counts": dg.MetadataValue.json(counts),
            **{f"reason/{r.value}": int(counts.get(r.value, 0)) for r in QuarantineReason},
        },
    )


@dg.asset(group_name=GROUP, kinds={"parquet"}, code_version=DATASET_SPLITS_VERSION)
def dataset_splits(
    context: dg.AssetExecutionContext, config: DatasetSplitsConfig, preference_pairs: dict
) -> dg.Output[dict]:
    """Prompt-disjoint train / eval / test files (SFT, reward model, PPO, test) per the data contract."""
    try:
        split_settings = SplitSettings(config.train_fraction, config.eval_fraction, config.test_fraction, config.seed,
                                       config.heldout_fraction)
    except ValueError as exc:
        raise dg.Failure(description=f"dataset_splits config: {exc}") from exc
    pairs = pd.read_parquet(preference_pairs["path"])
    manifest = write_splits(pairs, settings.data_root() / "splits", split_settings)
    split_dir = settings.data_root() / "splits" / manifest["data_version"]
    empty = [name for name, n in manifest["counts"].items() if n == 0]
    if empty:
        context.log.warning(f"dataset_splits: empty split files {empty}")
    value = {"split_dir": str(split_dir), **manifest}
    metadata: dict[str, Any] = {
        "data_version": manifest["data_version"], "split_dir": dg.MetadataValue.path(str(split_dir)),
        "counts": dg.MetadataValue.json(manifest["counts"]),
        "n_prompts": dg.MetadataValue.json(manifest["n_prompts"]),
        "fractions": dg.MetadataValue.json(manifest["fractions"]), "seed": manifest["seed"],
        **{f"count/{name}": n for name, n in manifest["counts"].items()},
    }
    return dg.Output(value, metadata=metadata, data_version=dg.DataVersion(manifest["data_version"]))


@dg.asset_check(asset="dataset_splits", blocking=True)
def splits_are_prompt_disjoint(dataset_splits: dict) -> dg.AssetCheckResult:
    """Re-reads the split files: no prompt in two splits, and train / eval are not empty."""
    prompts = read_split_prompts(Path(dataset_splits["split_dir"]))
    overlaps = {
        f"{a}&{b}": len(prompts[a] & prompts[b])
        for a, b in (("train", "eval"), ("train", "test"), ("eval", "test"))
    }
    empty = [s for s in ("train", "eval") if not prompts[s]]
    return dg.AssetCheckResult(
        passed=not any(overlaps.values()) and not empty,
        metadata={"shared_prompts": dg.MetadataValue.json(overlaps), "empty_splits": dg.MetadataValue.json(empty),
                  **{f"prompts/{s}": len(p) for s, p in prompts.items()}},
    )


DATA_ASSETS: list[dg.AssetsDefinition] = [raw_preferences, validated_preferences, dataset_splits]
DATA_CHECKS: list[dg.AssetChecksDefinition] = [quarantine_fraction_below_threshold, splits_are_prompt_disjoint]
