"""Ingestion: every source kind and format reaches the same normalized table, broken sources
fail with an error naming the file and the problem."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from assets import bundled_task
from assets.ingest import (
    ASSISTANT_TAG,
    NORMALIZED_COLUMNS,
    IngestError,
    content_hash,
    load_preferences,
    read_raw,
    render_messages,
    split_transcripts,
    write_raw,
)
from assets.schemas import QuarantineReason, validate_pairs

PAIRS = [
    {"id": "a", "prompt": "describe the river .", "chosen": "the river is lovely .", "rejected": "the river is dull ."},
    {"id": "b", "prompt": "describe the city .", "chosen": "the city is nice .", "rejected": "the city is ugly ."},
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- sources -----------------------------------------------------------------------------------


def test_bundled_source_matches_generator() -> None:
    result = load_preferences("bundled", n_pairs=50, seed=3, corrupt_fraction=0.0)
    expected = bundled_task.generate_preferences(50, 3, 0.0)
    assert result.format == "trl"
    assert list(result.frame.columns) == list(NORMALIZED_COLUMNS)
    assert result.frame["prompt"].tolist() == expected["prompt"].tolist()
    assert result.frame["chosen"].tolist() == expected["chosen"].tolist()
    assert result.frame["id"].tolist() == expected["id"].tolist()
    assert set(result.frame["source"]) == {"bundled"}
    assert result.frame["ingest_issue"].isna().all()


def test_jsonl_keeps_optional_columns(fixtures_dir: Path) -> None:
    result = load_preferences(str(fixtures_dir / "trl_pairs.jsonl"))
    frame = result.frame
    assert result.format == "trl" and len(frame) == 3
    assert frame["id"].tolist() == ["t1", "t2", "t3"]
    assert frame["margin"].tolist()[:2] == [1.5, 0.5] and pd.isna(frame["margin"].tolist()[2])
    # rows without a source column value are labelled with the file they came from
    assert frame["source"].tolist() == ["unit", "unit", "trl_pairs.jsonl"]
    assert result.files == [str(fixtures_dir / "trl_pairs.jsonl")]


def test_jsonl_gz(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in PAIRS).encode()))
    frame = load_preferences(str(path)).frame
    assert frame["prompt"].tolist() == [r["prompt"] for r in PAIRS]


def test_csv_source_parses_margin_and_empty_cells(fixtures_dir: Path) -> None:
    frame = load_preferences(str(fixtures_dir / "pairs.csv")).frame
    assert frame["id"].tolist() == ["c1", "c2", "c3"]
    assert frame["margin"].tolist()[0] == 2.0 and frame["margin"].tolist()[2] == 1.0
    assert pd.isna(frame["margin"].tolist()[1])
    assert pd.isna(frame["chosen"].tolist()[2])  # empty CSV cell = missing field, quarantined later


def test_json_array_and_columnar(fixtures_dir: Path, tmp_path: Path) -> None:
    frame = load_preferences(str(fixtures_dir / "pairs.json")).frame
    assert frame["id"].tolist() == ["j1", "j2"]
    columnar = tmp_path / "columns.json"
    columnar.write_text(json.dumps({k: [r[k] for r in PAIRS] for k in PAIRS[0]}))
    assert load_preferences(str(columnar)).frame["chosen"].tolist() == [r["chosen"] for r in PAIRS]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": PAIRS}))
    assert len(load_preferences(str(wrapped)).frame) == 2


def test_parquet_with_conversational_lists(tmp_path: Path) -> None:
    path = tmp_path / "conv.parquet"
    pd.DataFrame({
        "prompt": [[{"role": "user", "content": "Hi?"}]],
        "chosen": [[{"role": "assistant", "content": "Hello."}]],
        "rejected": [[{"role": "assistant", "content": "Go away."}]],
    }).to_parquet(path)
    frame = load_preferences(str(path)).frame
    assert frame.loc[0, "prompt"] == "\n\nHuman: Hi?\n\nAssistant:"
    assert frame.loc[0, "chosen"] == " Hello."
    assert frame.loc[0, "rejected"] == " Go away."


def test_folder_of_mixed_files_reports_skipped(tmp_path: Path, fixtures_dir: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copy(fixtures_dir / "trl_pairs.jsonl", landing / "a.jsonl")
    shutil.copy(fixtures_dir / "pairs.csv", landing / "b.csv")
    pd.DataFrame(PAIRS).to_parquet(landing / "c.parquet")
    (landing / "notes.txt").write_text("not data")
    (landing / ".partial.jsonl").write_text("{")  # in-flight upload: not read
    result = load_preferences(str(landing))
    assert len(result.frame) == 3 + 3 + 2
    assert [Path(f).name for f in result.files] == ["a.jsonl", "b.csv", "c.parquet"]
    assert result.skipped_files == ["notes.txt"]
    assert result.frame["id"].tolist()[-2:] == ["a", "b"]


def test_hf_save_to_disk_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({k: [r[k] for r in PAIRS] for k in PAIRS[0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    frame = load_preferences(f"hf_disk:{tmp_path / 'ds'}").frame
    assert frame["prompt"].tolist() == [r["prompt"] for r in PAIRS]
    # the folder is also recognised without the prefix
    assert load_preferences(str(tmp_path / "ds")).frame["id"].tolist() == ["a", "b"]


def test_hf_dataset_dict_split_selection(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_dict({k: [PAIRS[0][k]] for k in PAIRS[0]})
    two = datasets.Dataset.from_dict({k: [r[k] for r in PAIRS] for k in PAIRS[0]})
    datasets.DatasetDict({"train": two, "test": one}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_preferences(f"hf_disk:{tmp_path / 'dd'}", hf_split="test").frame) == 1
    with pytest.raises(IngestError, match=r"splits \['test', 'train'\], not 'validation'"):
        load_preferences(f"hf_disk:{tmp_path / 'dd'}", hf_split="validation")


def test_hub_source_without_network_names_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # The offline flags are read at import time, so set the parsed constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(IngestError, match="cannot load hub dataset 'no-such-owner/no-such-dataset'.*hf_disk:"):
        load_preferences("hf:no-such-owner/no-such-dataset")


# --- formats -----------------------------------------------------------------------------------


def test_hh_fixture_prompt_is_shared_prefix(fixtures_dir: Path) -> None:
    result = load_preferences(str(fixtures_dir / "hh_dialogues.jsonl"))
    frame = result.frame
    assert result.format == "hh"
    assert frame.loc[0, "prompt"] == "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert (frame.loc[0, "chosen"], frame.loc[0, "rejected"]) == (" 4.", " 5.")
    # multi-turn: the prompt ends at the last assistant tag, earlier turns included
    assert frame.loc[1, "prompt"].endswith("Tell me a joke.\n\nAssistant:")
    assert frame.loc[1, "prompt"].count(ASSISTANT_TAG) == 2
    assert frame.loc[2, "ingest_issue"] == QuarantineReason.NO_ASSISTANT_TURN.value


def test_split_transcripts_identical_dialogues_give_identical_responses() -> None:
    text = "\n\nHuman: a\n\nAssistant: b"
    prompt, chosen, rejected, issue = split_transcripts(text, text)
    assert (prompt, chosen, rejected, issue) == ("\n\nHuman: a\n\nAssistant:", " b", " b", None)


def test_real_hh_sample_round_trips(hh_sample: Path) -> None:
    result = load_preferences(str(hh_sample))
    raw = pd.read_json(hh_sample, lines=True)
    frame = result.frame
    assert result.format == "hh" and len(frame) == len(raw) == 1500
    # prompt + response reproduces each original dialogue exactly
    assert (frame["prompt"] + frame["chosen"]).tolist() == raw["chosen"].tolist()
    assert (frame["prompt"] + frame["rejected"]).tolist() == raw["rejected"].tolist()
    assert frame["prompt"].str.endswith("Assistant:").all()
    assert frame["prompt"].str.startswith("\n\nHuman:").all()
    checked = validate_pairs(frame)
    assert len(checked.valid) + len(checked.quarantined) == 1500
    # the public sample is clean apart from a few empty final responses
    assert len(checked.quarantined) < 15
    assert set(checked.quarantined["reason"]) <= {QuarantineReason.EMPTY_TEXT.value}
    empty = checked.quarantined
    assert ((empty["chosen"].str.strip() == "") | (empty["rejected"].str.strip() == "")).all()


def test_conversational_trl_rendering(fixtures_dir: Path) -> None:
    frame = load_preferences(str(fixtures_dir / "conversational.jsonl")).frame
    assert frame.loc[0, "prompt"] == "\n\nHuman: What color is the sky?\n\nAssistant:"
    assert frame.loc[0, "chosen"] == " It is blue."
    assert frame.loc[1, "prompt"] == (
        "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant:"
    )
    assert frame.loc[2, "ingest_issue"] == QuarantineReason.NO_ASSISTANT_TURN.value


def test_conversational_implicit_prompt(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Pick a number."}
    path = _write_jsonl(tmp_path / "implicit.jsonl", [{
        "chosen": [user, {"role": "assistant", "content": "7"}],
        "rejected": [user, {"role": "assistant", "content": "no"}],
    }])
    frame = load_preferences(str(path)).frame
    assert frame.loc[0, "prompt"] == render_messages([user]) + ASSISTANT_TAG
    assert (frame.loc[0, "chosen"], frame.loc[0, "rejected"]) == (" 7", " no")


def test_explicit_format_overrides_detection(fixtures_dir: Path) -> None:
    # as "hh", a prompt column is not part of the contract: reported as ignored, not used
    result = load_preferences(str(fixtures_dir / "trl_pairs.jsonl"), "hh")
    assert result.format == "hh" and result.ignored_columns == ["prompt"]
    assert result.frame["ingest_issue"].eq(QuarantineReason.NO_ASSISTANT_TURN.value).all()


# --- broken sources ----------------------------------------------------------------------------


def test_missing_path_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(IngestError, match=f"source '{missing}' does not exist"):
        load_preferences(str(missing))


def test_unreadable_parquet_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(IngestError, match=f"cannot read '{path}'"):
        load_preferences(str(path))


def test_corrupt_gzip_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(IngestError, match=f"cannot read '{path}'"):
        load_preferences(str(path))


def test_invalid_json_file_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a",')
    with pytest.raises(IngestError, match=f"cannot read '{path}': invalid JSON"):
        load_preferences(str(path))


def test_wrong_columns_error_names_file(fixtures_dir: Path) -> None:
    path = fixtures_dir / "wrong_columns.csv"
    with pytest.raises(IngestError, match=r"wrong_columns\.csv: wrong columns .*missing \['chosen', 'rejected'\]"):
        load_preferences(str(path))


def test_wrong_columns_in_one_folder_file_names_that_file(tmp_path: Path, fixtures_dir: Path) -> None:
    shutil.copy(fixtures_dir / "trl_pairs.jsonl", tmp_path / "good.jsonl")
    shutil.copy(fixtures_dir / "wrong_columns.csv", tmp_path / "bad.csv")
    with pytest.raises(IngestError, match=r"bad\.csv: wrong columns"):
        load_preferences(str(tmp_path))


def test_trl_format_requires_prompt(fixtures_dir: Path) -> None:
    with pytest.raises(IngestError, match=r"hh_dialogues\.jsonl: wrong columns for format 'trl': missing \['prompt'\]"):
        load_preferences(str(fixtures_dir / "hh_dialogues.jsonl"), "trl")


def test_unknown_format_error(fixtures_dir: Path) -> None:
    with pytest.raises(IngestError, match="unknown format 'alpaca': expected one of auto, trl, hh"):
        load_preferences(str(fixtures_dir / "trl_pairs.jsonl"), "alpaca")


def test_unsupported_file_type_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(IngestError, match=f"cannot read '{path}': unsupported file type"):
        load_preferences(str(path))


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(IngestError, match=r"has no data files.*found only readme\.md"):
        load_preferences(str(tmp_path))


def test_empty_file_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(IngestError, match=f"cannot read '{path}': the file has no records"):
        load_preferences(str(path))


# --- raw storage -------------------------------------------------------------------------------


def test_raw_parquet_round_trip_keeps_wrong_types(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "id": ["a", "b", "c"], "prompt": ["p", 5, None], "chosen": ["x", ["l", 1], "y"],
        "rejected": ["z", "w", {"k": 1}], "margin": [1.0, None, "big"], "source": ["s"] * 3,
        "ingest_issue": [None, None, None],
    }, dtype=object)
    write_raw(frame, tmp_path / "raw.parquet")
    back = read_raw(tmp_path / "raw.parquet")
    assert back["prompt"].tolist() == ["p", 5, None]
    assert back["chosen"].tolist() == ["x", ["l", 1], "y"]
    assert back["rejected"].tolist()[2] == {"k": 1}
    assert back["margin"].tolist() == [1.0, None, "big"]
    assert content_hash(back) == content_hash(frame)


def test_content_hash_sensitive_to_values_and_order() -> None:
    a = pd.DataFrame(PAIRS)
    assert content_hash(a) == content_hash(pd.DataFrame(PAIRS))
    assert content_hash(a) != content_hash(a.iloc[::-1].reset_index(drop=True))
    changed = a.copy()
    changed.loc[0, "chosen"] = "the river is nice ."
    assert content_hash(changed) != content_hash(a)
