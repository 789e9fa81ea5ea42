"""Dagster wiring of the data assets: definitions load, materialization in a temporary
DAGSTER_HOME, the blocking quarantine check really stops the splits, broken sources fail cleanly."""

from __future__ import annotations

import importlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from assets.data import DATA_ASSETS, DATA_CHECKS, RawPreferencesConfig
from assets.schemas import QuarantineReason
from assets.splits import SPLIT_FILES
from pipelines.io_managers import JsonManifestIOManager

ASSET_KEYS = {"raw_preferences", "preference_pairs", "quarantined_pairs", "dataset_splits"}
CHECK_OP = "preference_pairs_quarantine_fraction_below_threshold"


def _defs(home: Path) -> dg.Definitions:
    return dg.Definitions(
        assets=DATA_ASSETS, asset_checks=DATA_CHECKS,
        resources={"io_manager": JsonManifestIOManager(base_dir=str(home / "manifests"))},
    )


def _run(home: Path, ops_config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:
    """Materialize every data asset and check in one run, on the SQLite instance of the
    temporary DAGSTER_HOME that the ``rlhf_home`` fixture sets."""
    job = _defs(home).resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.get() as instance:
        assert Path(instance.root_directory) == home / "dagster_home"
        result = job.execute_in_process(
            run_config={"ops": {op: {"config": cfg} for op, cfg in (ops_config or {}).items()}},
            instance=instance, raise_on_error=False,
        )
        assert instance.get_run_by_id(result.run_id) is not None  # recorded in that home
        return result


def _materialization(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    events = [m for m in result.get_asset_materialization_events()
              if m.asset_key == dg.AssetKey(key)]
    assert len(events) == 1, key
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def test_definitions_load() -> None:
    defs = dg.Definitions(assets=DATA_ASSETS, asset_checks=DATA_CHECKS,
                          resources={"io_manager": JsonManifestIOManager(base_dir="/unused")})
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSET_KEYS
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == {
        ("preference_pairs", "quarantine_fraction_below_threshold"),
        ("dataset_splits", "splits_are_prompt_disjoint"),
    }
    for key in ASSET_KEYS:
        assert graph.get(dg.AssetKey(key)).group_name == "data"


def test_project_definitions_include_data_assets() -> None:
    if not (Path(__file__).resolve().parent.parent / "pipelines" / "definitions.py").exists():
        pytest.skip("pipelines/definitions.py not written yet")
    module = importlib.import_module("pipelines.definitions")
    defs = next(v for v in vars(module).values() if isinstance(v, dg.Definitions))
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert ASSET_KEYS <= keys


def test_materialize_bundled_default(rlhf_home: Path) -> None:
    start = time.perf_counter()
    result = _run(rlhf_home)
    seconds = time.perf_counter() - start
    assert result.success
    print(f"bundled default raw -> splits (with checks, in-process Dagster): {seconds:.1f}s")

    raw = _materialization(result, "raw_preferences")
    pairs = _materialization(result, "preference_pairs")
    splits = _materialization(result, "dataset_splits")
    # the generator appends duplicate rows on top of the configured number of pairs
    assert raw["n_rows"] == pairs["n_input"] > RawPreferencesConfig().n_pairs
    assert pairs["n_valid"] + pairs["n_quarantined"] == pairs["n_input"]
    assert sum(pairs["reason_counts"].values()) == pairs["n_quarantined"] > 0
    assert "| id " in raw["preview"]

    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    gate = evaluations["quarantine_fraction_below_threshold"]
    assert gate.passed
    assert gate.metadata["quarantine_fraction"].value == pytest.approx(pairs["quarantine_fraction"])
    assert gate.metadata["threshold"].value == 0.05
    assert evaluations["splits_are_prompt_disjoint"].passed

    # files and manifests are where the data contract says
    manifest_dir = rlhf_home / "manifests"
    split_manifest = json.loads((manifest_dir / "dataset_splits.json").read_text())
    split_dir = Path(split_manifest["split_dir"])
    assert split_dir == rlhf_home / "data" / "splits" / splits["data_version"]
    assert split_manifest["data_version"] == splits["data_version"]
    assert json.loads((split_dir / "manifest.json").read_text())["counts"] == splits["counts"]
    for name in SPLIT_FILES:
        assert len(pd.read_parquet(split_dir / f"{name}.parquet")) == splits["counts"][name] > 0
    pairs_manifest = json.loads((manifest_dir / "preference_pairs.json").read_text())
    quarantine_manifest = json.loads((manifest_dir / "quarantined_pairs.json").read_text())
    assert Path(pairs_manifest["path"]).parent == Path(quarantine_manifest["path"]).parent
    quarantine = pd.read_parquet(quarantine_manifest["path"])
    assert len(quarantine) == pairs["n_quarantined"]
    assert set(quarantine["reason"]) <= {r.value for r in QuarantineReason}

    # same content again: same content-addressed folders, nothing new written
    again = _run(rlhf_home)
    assert again.success
    assert _materialization(again, "dataset_splits")["data_version"] == splits["data_version"]
    assert len(list((rlhf_home / "data" / "raw").iterdir())) == 1


def test_blocking_check_stops_splits(rlhf_home: Path) -> None:
    # the bundled generator quarantines ~2%: a 1% threshold must fail and block the splits
    result = _run(rlhf_home, {"raw_preferences": {"n_pairs": 800},
                              CHECK_OP: {"max_quarantine_fraction": 0.01}})
    assert not result.success
    gate = next(e for e in result.get_asset_check_evaluations()
                if e.check_name == "quarantine_fraction_below_threshold")
    assert not gate.passed
    assert gate.metadata["threshold"].value == 0.01
    assert gate.metadata["quarantine_fraction"].value > 0.01
    assert gate.metadata[f"reason/{QuarantineReason.DUPLICATE.value}"].value > 0
    materialized = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert materialized == {"raw_preferences", "preference_pairs", "quarantined_pairs"}
    assert not (rlhf_home / "data" / "splits").exists()
    assert not (rlhf_home / "manifests" / "dataset_splits.json").exists()


def test_materialize_real_hh_sample(rlhf_home: Path, hh_sample: Path) -> None:
    result = _run(rlhf_home, {"raw_preferences": {"source": str(hh_sample)}})
    assert result.success
    raw = _materialization(result, "raw_preferences")
    assert raw["format"] == "hh" and raw["n_rows"] == 1500
    pairs = _materialization(result, "preference_pairs")
    assert pairs["n_valid"] + pairs["n_quarantined"] == 1500
    split_dir = Path(json.loads((rlhf_home / "manifests" / "dataset_splits.json").read_text())["split_dir"])
    sft = pd.read_parquet(split_dir / "sft_train.parquet")
    assert sft["prompt"].str.endswith("\n\nAssistant:").all()


def test_materialize_landing_folder_with_quarantine(rlhf_home: Path, fixtures_dir: Path) -> None:
    landing = rlhf_home / "landing"
    landing.mkdir()
    for name in ("trl_pairs.jsonl", "pairs.csv", "pairs.json", "conversational.jsonl"):
        shutil.copy(fixtures_dir / name, landing / name)
    # 11 rows, 2 broken (an empty CSV cell, a conversation without an assistant turn): the
    # default 5% threshold fails, a 25% one passes and the splits are written
    failed = _run(rlhf_home, {"raw_preferences": {"source": str(landing)}})
    assert not failed.success
    result = _run(rlhf_home, {"raw_preferences": {"source": str(landing)},
                              CHECK_OP: {"max_quarantine_fraction": 0.25}})
    assert result.success
    pairs = _materialization(result, "preference_pairs")
    assert (pairs["n_input"], pairs["n_quarantined"]) == (11, 2)
    assert pairs["reason_counts"][QuarantineReason.MISSING_FIELD.value] == 1
    assert pairs["reason_counts"][QuarantineReason.NO_ASSISTANT_TURN.value] == 1


@pytest.mark.parametrize(
    ("source", "fmt", "message"),
    [
        ("{tmp}/missing.jsonl", "auto", "does not exist"),
        ("{fixtures}/wrong_columns.csv", "auto", "wrong_columns.csv: wrong columns"),
        ("{fixtures}/trl_pairs.jsonl", "alpaca", "unknown format 'alpaca'"),
    ],
)
def test_broken_source_fails_with_named_error(
    rlhf_home: Path, fixtures_dir: Path, source: str, fmt: str, message: str
) -> None:
    source = source.format(tmp=rlhf_home, fixtures=fixtures_dir)
    result = _run(rlhf_home, {"raw_preferences": {"source": source, "format": fmt}})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "raw_preferences"
    assert message in failure.step_failure_data.error.message or \
        message in (failure.step_failure_data.user_failure_data.description or "")
    assert not result.get_asset_materialization_events()


def test_real_hh_dialogues_get_sequence_lengths_that_fit_them(rlhf_home: Path, hh_sample: Path, tmp_path: Path) -> None:
    """HH-RLHF prompts are whole dialogues: PPO's default prompt limit (64 tokens) refuses them;
    the lengths base_model measures fit every prompt, and a model built for them has the positions."""
    from assets.models import data_lengths, with_min_response_length
    from ppo_core import lengths, models
    from ppo_core.config import ConfigError
    from ppo_core.ppo import encode_prompts

    assert _run(rlhf_home, {"raw_preferences": {"source": str(hh_sample)}}).success
    splits = json.loads((rlhf_home / "manifests" / "dataset_splits.json").read_text())
    sft = pd.read_parquet(Path(splits["split_dir"]) / "sft_train.parquet")
    model_dir = models.build_base_model((sft["prompt"] + sft["completion"]).tolist()[:400], tmp_path / "m", size="tiny")
    seq = data_lengths(splits, model_dir)
    assert seq["longest_prompt"] > lengths.MIN_PROMPT_LENGTH
    assert seq["max_prompt_length"] == lengths.round_up(seq["longest_prompt"])
    assert seq["longest_response"] >= seq["response_p99"] and seq["response_length"] >= lengths.MIN_RESPONSE_LENGTH
    # every HH answer has a token and its EOS; the shortest is what PPO floors below
    assert 2 <= seq["min_response_length"] <= seq["response_p99"]
    # an SFT manifest from before it was measured gets it measured for PPO; others are kept
    older = {"model_path": str(model_dir), "lengths": {k: v for k, v in seq.items() if k != "min_response_length"}}
    assert with_min_response_length(older, splits)["lengths"] == seq
    current = {"model_path": str(model_dir), "lengths": seq}
    assert with_min_response_length(current, splits) is current
    assert with_min_response_length({"model_path": str(model_dir)}, splits) == {"model_path": str(model_dir)}
    tok = models.load_tokenizer(str(model_dir))
    prompts = pd.read_parquet(Path(splits["split_dir"]) / "ppo_train.parquet")["prompt"].tolist()
    with pytest.raises(ConfigError, match="exceed max_prompt_length=64"):
        encode_prompts(tok, prompts, lengths.MIN_PROMPT_LENGTH, "ppo_train")
    assert len(encode_prompts(tok, prompts, seq["max_prompt_length"], "ppo_train")) == len(prompts)
    assert lengths.context_for(seq) > 256    # a built model would get more positions than its default
