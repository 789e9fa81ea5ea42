"""Validation: every quarantine reason, one reason per row, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import pytest

from assets.ingest import load_preferences
from assets.schemas import (
    PAIR_COLUMNS,
    QUARANTINE_COLUMNS,
    PreferencePairs,
    QuarantineReason,
    pair_schema,
    validate_pairs,
)

GOOD = {"prompt": "describe the river .", "chosen": "the river is lovely .", "rejected": "the river is dull ."}


def _line(id_: str, **fields: object) -> str:
    return json.dumps({"id": id_, **{**GOOD, "prompt": f"prompt {id_}"}, **fields})


@pytest.fixture
def one_row_per_reason(tmp_path: Path) -> Path:
    """A JSONL file with rows that each fail for one known reason, plus two good rows.

    Written as bytes so it can hold a line that is not valid UTF-8."""
    lines = [
        _line("good1").encode(),
        b"{this is not json",
        _line("missing", rejected=None).encode(),
        json.dumps({"id": "absent", "prompt": "p absent", "chosen": "c"}).encode(),  # no rejected key
        _line("type", chosen=5).encode(),
        _line("margin_type", margin="big").encode(),
        # the byte 0xff is never valid UTF-8
        _line("bytes", chosen="PLACEHOLDER").encode().replace(b"PLACEHOLDER", b"caf\xff"),
        _line("surrogate").replace('"the river is dull ."', '"bad \\ud800 text"').encode(),
        _line("noturn", chosen=[{"role": "user", "content": "hi"}]).encode(),
        _line("empty", chosen="").encode(),
        _line("blank", rejected=" \n\t ").encode(),
        _line("long", chosen="x" * 500).encode(),
        _line("same", chosen="same answer .", rejected="same answer .").encode(),
        _line("good2").encode(),
        _line("good2").encode(),  # exact duplicate of the previous row
    ]
    path = tmp_path / "reasons.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED = {
    "missing": QuarantineReason.MISSING_FIELD,
    "absent": QuarantineReason.MISSING_FIELD,
    "type": QuarantineReason.WRONG_TYPE,
    "margin_type": QuarantineReason.WRONG_TYPE,
    "bytes": QuarantineReason.UNDECODABLE_TEXT,
    "surrogate": QuarantineReason.UNDECODABLE_TEXT,
    "noturn": QuarantineReason.NO_ASSISTANT_TURN,
    "empty": QuarantineReason.EMPTY_TEXT,
    "blank": QuarantineReason.EMPTY_TEXT,
    "long": QuarantineReason.TOO_LONG,
    "same": QuarantineReason.IDENTICAL_PAIR,
    "good2": QuarantineReason.DUPLICATE,
}


def test_every_reason_is_detected(one_row_per_reason: Path) -> None:
    frame = load_preferences(str(one_row_per_reason)).frame
    result = validate_pairs(frame, max_chars=200)
    q = result.quarantined
    assert len(result.valid) + len(q) == len(frame) == 15
    assert result.valid["id"].tolist() == ["good1", "good2"]  # the first of the duplicates stays
    by_id = dict(zip(q["id"], q["reason"]))
    for id_, reason in EXPECTED.items():
        assert by_id[id_] == reason.value, id_
    malformed = q[q["reason"] == QuarantineReason.MALFORMED_RECORD.value]
    assert len(malformed) == 1 and malformed["prompt"].iloc[0] == "{this is not json"
    # every reason of the enum is exercised by this fixture, except the two that only an
    # annotation batch (format "labels") can have: tests/test_annotation.py covers those
    labels_only = {QuarantineReason.UNLABELLED.value, QuarantineReason.INVALID_LABEL.value}
    assert set(q["reason"]) == {r.value for r in QuarantineReason} - labels_only
    assert list(q.columns) == list(QUARANTINE_COLUMNS)


def test_quarantine_names_the_field(one_row_per_reason: Path) -> None:
    q = validate_pairs(load_preferences(str(one_row_per_reason)).frame, max_chars=200).quarantined
    fields = dict(zip(q["id"], q["field"]))
    assert fields["type"] == "chosen"
    assert fields["margin_type"] == "margin"
    assert fields["blank"] == "rejected"
    assert fields["same"] == "chosen,rejected"
    # the wrong-typed value stays visible in the quarantine table
    assert q.set_index("id").loc["type", "chosen"] == "5"


def test_one_reason_per_row_uses_priority() -> None:
    # empty AND identical AND too long: the first in QuarantineReason order wins
    frame = pd.DataFrame([{"id": "x", "prompt": "y" * 50, "chosen": "", "rejected": "", "margin": None,
                           "source": "t", "ingest_issue": None}])
    q = validate_pairs(frame, max_chars=10).quarantined
    assert q["reason"].tolist() == [QuarantineReason.EMPTY_TEXT.value]


def test_length_limit_is_configurable() -> None:
    frame = pd.DataFrame([{"id": "x", **GOOD, "margin": None, "source": "t", "ingest_issue": None}])
    assert len(validate_pairs(frame, max_chars=len(GOOD["chosen"])).valid) == 1
    too_short = validate_pairs(frame, max_chars=len(GOOD["chosen"]) - 1)
    assert too_short.quarantined["reason"].tolist() == [QuarantineReason.TOO_LONG.value]
    with pytest.raises(ValueError, match="max_chars must be >= 1"):
        pair_schema(0)


def test_bundled_default_invariant_and_typed_output() -> None:
    frame = load_preferences("bundled", n_pairs=600, seed=1).frame
    result = validate_pairs(frame)
    assert len(result.valid) + len(result.quarantined) == len(frame)
    # the generator damages ~2% of rows in three ways; all of them are caught
    assert set(result.quarantined["reason"]) == {
        QuarantineReason.EMPTY_TEXT.value, QuarantineReason.IDENTICAL_PAIR.value, QuarantineReason.DUPLICATE.value,
    }
    assert 0 < result.quarantine_fraction < 0.05
    assert sum(result.reason_counts.values()) == len(result.quarantined)
    PreferencePairs.validate(result.valid)  # the output satisfies the contract as-is
    assert list(result.valid.columns) == list(PAIR_COLUMNS)
    assert not result.valid[["prompt", "chosen", "rejected"]].duplicated().any()


def test_schema_rejects_extra_columns_and_wrong_dtypes() -> None:
    good = pd.DataFrame([{"id": "a", **GOOD, "margin": 1.0, "source": "s"}])
    PreferencePairs.validate(good)
    with pytest.raises((pa.errors.SchemaError, pa.errors.SchemaErrors)):
        PreferencePairs.validate(good.assign(extra=1))
    with pytest.raises((pa.errors.SchemaError, pa.errors.SchemaErrors)):
        PreferencePairs.validate(good.assign(chosen=[3]))


def test_unknown_ingest_issue_is_an_error() -> None:
    frame = pd.DataFrame([{"id": "a", **GOOD, "margin": None, "source": "s", "ingest_issue": "cosmic_rays"}])
    with pytest.raises(ValueError, match="unknown ingest_issue codes \\['cosmic_rays'\\]"):
        validate_pairs(frame)
