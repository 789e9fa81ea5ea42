"""The preference-pair contract (one pandera ``DataFrameModel``) and the quarantine logic.

Validation is lazy: every failing row is found in one pass, each gets exactly one reason
(the first in :class:`QuarantineReason` order, i.e. the first thing an operator has to fix),
and ``len(valid) + len(quarantined) == len(input)`` is enforced, never assumed.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

TEXT_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
PAIR_COLUMNS: tuple[str, ...] = ("id", "prompt", "chosen", "rejected", "margin", "source")
OPTIONAL_COLUMNS: tuple[str, ...] = ("id", "margin", "source")
QUARANTINE_COLUMNS: tuple[str, ...] = (*PAIR_COLUMNS, "reason", "field")
# Per text field. Far above any real turn (the HH-RLHF harmless-base test sample peaks at
# ~3.8k characters per dialogue), low enough to stop scraped pages or binary blobs.
DEFAULT_MAX_CHARS = 16_000


class QuarantineReason(str, enum.Enum):
    """Why a row was quarantined. Declaration order is priority order (one reason per row)."""

    MALFORMED_RECORD = "malformed_record"
    """a line or element of the file is not a JSON object"""
    UNLABELLED = "unlabelled"
    """an annotation row (format ``labels``) whose ``preference`` is empty"""
    INVALID_LABEL = "invalid_label"
    """an annotation row whose ``preference`` is neither ``a`` nor ``b``"""
    MISSING_FIELD = "missing_field"
    """prompt, chosen or rejected is absent or null"""
    WRONG_TYPE = "wrong_type"
    """a text field is not text (nor a renderable message list), or margin is not a number"""
    UNDECODABLE_TEXT = "undecodable_text"
    """text holds bytes that were not valid UTF-8 (U+FFFD) or lone surrogates"""
    NO_ASSISTANT_TURN = "no_assistant_turn"
    """a dialogue or message list without an assistant turn to use as the response"""
    EMPTY_TEXT = "empty_text"
    """a text field is empty or whitespace only"""
    TOO_LONG = "too_long"
    """a text field is longer than the configured ``max_chars``"""
    IDENTICAL_PAIR = "identical_pair"
    """chosen == rejected: no preference signal"""
    DUPLICATE = "duplicate"
    """same prompt, chosen and rejected as an earlier row (the first one is kept)"""


REASON_ORDER: dict[str, int] = {r.value: i for i, r in enumerate(QuarantineReason)}


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _decodable(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    if "\ufffd" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a lossy decode upstream
        return False
    return True


def _text_flags(series: pd.Series, predicate: Any) -> pd.Series:
    """Element-wise predicate that ignores values of other types (each check owns one reason)."""
    return pd.Series([predicate(v) for v in series.tolist()], index=series.index, dtype=bool)


class PreferencePairs(pa.DataFrameModel):
    """A validated preference pair: TRL's explicit-prompt format, rendered to text.

    Each check is named after the :class:`QuarantineReason` it reports.
    """

    id: Series[str] = pa.Field(nullable=False, description="row id (from the source or generated)")
    prompt: Series[str] = pa.Field(nullable=False, description="full text fed to the model")
    chosen: Series[str] = pa.Field(nullable=False, description="preferred response text")
    rejected: Series[str] = pa.Field(nullable=False, description="dispreferred response text")
    margin: Optional[Series[float]] = pa.Field(nullable=True, description="optional preference strength")
    source: Series[str] = pa.Field(nullable=False, description="where the row came from")

    @pa.check("prompt", "chosen", "rejected", name=QuarantineReason.WRONG_TYPE.value)
    def _text_type(cls, series: pd.Series) -> pd.Series:
        return _text_flags(series, _is_text)

    @pa.check("margin", name=QuarantineReason.WRONG_TYPE.value)
    def _margin_type(cls, series: pd.Series) -> pd.Series:
        return _text_flags(series, lambda v: isinstance(v, float) and not isinstance(v, bool))

    @pa.check("prompt", "chosen", "rejected", name=QuarantineReason.UNDECODABLE_TEXT.value)
    def _undecodable(cls, series: pd.Series) -> pd.Series:
        return _text_flags(series, _decodable)

    @pa.check("prompt", "chosen", "rejected", name=QuarantineReason.EMPTY_TEXT.value)
    def _not_blank(cls, series: pd.Series) -> pd.Series:
        return _text_flags(series, lambda v: not isinstance(v, str) or bool(v.strip()))

    @pa.dataframe_check(name=QuarantineReason.IDENTICAL_PAIR.value)
    def _distinct_responses(cls, df: pd.DataFrame) -> pd.Series:
        return pd.Series(
            [not (isinstance(c, str) and c == r) for c, r in zip(df["chosen"], df["rejected"])],
            index=df.index, dtype=bool,
        )

    @pa.dataframe_check(name=QuarantineReason.DUPLICATE.value)
    def _first_occurrence(cls, df: pd.DataFrame) -> pd.Series:
        # repr() makes unhashable wrong-typed values comparable instead of crashing the check.
        keys = df[list(TEXT_COLUMNS)].map(repr)
        return ~keys.duplicated(keep="first")

    class Config:
        strict = True
        coerce = False


def pair_schema(max_chars: int = DEFAULT_MAX_CHARS) -> pa.DataFrameSchema:
    """:class:`PreferencePairs` with the configurable length limit on each text column."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    schema = PreferencePairs.to_schema()
    too_long = pa.Check(
        lambda s: _text_flags(s, lambda v: not isinstance(v, str) or len(v) <= max_chars),
        name=QuarantineReason.TOO_LONG.value,
    )
    return schema.update_columns(
        {c: {"checks": [*schema.columns[c].checks, too_long]} for c in TEXT_COLUMNS}
    )


@dataclass
class ValidationResult:
    valid: pd.DataFrame
    """rows that pass :class:`PreferencePairs` (columns ``PAIR_COLUMNS``, typed)"""
    quarantined: pd.DataFrame
    """the other rows as text, plus ``reason`` and ``field`` (columns ``QUARANTINE_COLUMNS``)"""

    @property
    def reason_counts(self) -> dict[str, int]:
        counts = self.quarantined["reason"].value_counts()
        return {r.value: int(counts.get(r.value, 0)) for r in QuarantineReason}

    @property
    def quarantine_fraction(self) -> float:
        total = len(self.valid) + len(self.quarantined)
        return len(self.quarantined) / total if total else 0.0


def _reason_of_check(check: str) -> str:
    if check == "not_nullable":
        return QuarantineReason.MISSING_FIELD.value
    if check.startswith("dtype("):
        return QuarantineReason.WRONG_TYPE.value
    if check in REASON_ORDER:
        return check
    raise RuntimeError(f"preference schema failed check {check!r}, which maps to no quarantine reason")


def row_failures(frame: pd.DataFrame, max_chars: int = DEFAULT_MAX_CHARS) -> pd.DataFrame:
    """One (index, reason, field) row per failing input row: its highest-priority failure."""
    try:
        pair_schema(max_chars).validate(frame, lazy=True)
        return pd.DataFrame(columns=["index", "reason", "field"])
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    table_level = cases[cases["index"].isna()]
    # A whole-column dtype failure is implied by the per-row wrong_type check; anything else
    # at table level (a column missing, a check crashing) is a bug, not a data problem.
    unexpected = table_level[~table_level["check"].astype(str).str.startswith("dtype(")]
    if len(unexpected):
        raise RuntimeError(f"preference schema failed at table level:\n{unexpected.to_string()}")
    cases = cases[cases["index"].notna()].copy()
    cases["reason"] = cases["check"].astype(str).map(_reason_of_check)
    cases["rank"] = cases["reason"].map(REASON_ORDER)
    is_frame_check = cases["schema_context"] == "DataFrameSchema"
    cases["field"] = cases["column"].astype(str).where(~is_frame_check, "")
    cases.loc[is_frame_check & (cases["reason"] == QuarantineReason.IDENTICAL_PAIR.value), "field"] = "chosen,rejected"
    cases.loc[is_frame_check & (cases["reason"] == QuarantineReason.DUPLICATE.value), "field"] = ",".join(TEXT_COLUMNS)
    cases = cases.sort_values(["index", "rank", "field"], kind="stable")
    first = cases.drop_duplicates("index", keep="first")
    return first[["index", "reason", "field"]].reset_index(drop=True)


def _display(value: Any) -> Any:
    """Quarantined values as text for people to read; non-text kept visible as JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:
        return None
    return json.dumps(value, default=repr, ensure_ascii=False)


def validate_pairs(frame: pd.DataFrame, max_chars: int = DEFAULT_MAX_CHARS) -> ValidationResult:
    """Split a normalized table (``assets.ingest.NORMALIZED_COLUMNS``) into valid and quarantined.

    Rows with an ``ingest_issue`` are quarantined with that reason; the rest are validated
    lazily against :func:`pair_schema`. The valid part is re-validated eagerly, so it is
    guaranteed to satisfy the contract.
    """
    missing = [c for c in PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"validate_pairs needs columns {list(PAIR_COLUMNS)}; missing {missing}")
    frame = frame.reset_index(drop=True)
    issues = frame["ingest_issue"] if "ingest_issue" in frame.columns else pd.Series(None, index=frame.index)
    has_issue = issues.notna() & (issues.astype(object) != "")
    unknown = sorted(set(issues[has_issue]) - set(REASON_ORDER))
    if unknown:
        raise ValueError(f"unknown ingest_issue codes {unknown}: expected {list(REASON_ORDER)}")

    candidates = frame.loc[~has_issue, list(PAIR_COLUMNS)].astype(object)
    failures = row_failures(candidates, max_chars)
    reasons = pd.Series(None, index=frame.index, dtype=object)
    fields = pd.Series("", index=frame.index, dtype=object)
    reasons[has_issue] = issues[has_issue]
    reasons[failures["index"].astype(int).to_numpy()] = failures["reason"].to_numpy()
    fields[failures["index"].astype(int).to_numpy()] = failures["field"].to_numpy()

    bad = reasons.notna()
    valid = frame.loc[~bad, list(PAIR_COLUMNS)].copy()
    for col in ("id", *TEXT_COLUMNS, "source"):
        valid[col] = valid[col].astype(str)
    valid["margin"] = pd.to_numeric(valid["margin"], errors="raise").astype(float)
    valid = pair_schema(max_chars).validate(valid.reset_index(drop=True), lazy=False)

    quarantined = frame.loc[bad, list(PAIR_COLUMNS)].astype(object).map(_display)
    quarantined["reason"] = reasons[bad].astype(str)
    quarantined["field"] = fields[bad].astype(str)
    quarantined = quarantined.reset_index(drop=True)[list(QUARANTINE_COLUMNS)]
    if len(valid) + len(quarantined) != len(frame):
        raise RuntimeError(
            f"validation lost rows: {len(valid)} valid + {len(quarantined)} quarantined != {len(frame)}"
        )
    return ValidationResult(valid, quarantined)
