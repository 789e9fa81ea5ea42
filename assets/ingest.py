"""Read preference data from any supported source into one normalized table.

Sources (the ``source`` string of :func:`load_preferences`):

* ``"bundled"``: the seeded generator of :mod:`assets.bundled_task` (the embedded default);
* a path to a ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.json.gz`` / ``.parquet`` / ``.csv`` /
  ``.csv.gz`` file, or to a folder of them (a landing folder; files starting with ``.`` or ``_``
  are in-flight and skipped, other unsupported files are reported, never read);
* ``"hf_disk:<path>"`` (or a folder written by ``datasets.Dataset.save_to_disk``): a Hugging Face
  ``datasets`` dataset on disk;
* ``"hf:<owner/name>"``: a hub dataset id, where the network allows.

Formats (``fmt``):

* ``"trl"``: TRL's explicit-prompt preference format (``prompt`` / ``chosen`` / ``rejected``, see
  TRL ``docs/source/dataset_formats.md``), each value a plain string or a conversational list of
  ``{"role", "content"}`` messages;
* ``"hh"``: Anthropic HH-RLHF transcripts (TRL's implicit-prompt format): ``chosen`` and
  ``rejected`` are whole dialogues; their shared prefix up to the last ``Assistant:`` becomes
  the prompt and the rest of each dialogue the response;
* ``"labels"``: an annotation batch (:mod:`assets.annotation`): ``prompt``, ``response_a``,
  ``response_b`` and the annotator's ``preference`` (``a`` or ``b``); the preferred response
  becomes ``chosen``. A row left unlabelled or labelled otherwise is kept and quarantined;
* ``"auto"``: ``"labels"`` when ``preference``/``response_a``/``response_b`` columns exist,
  else ``"trl"`` when a ``prompt`` column exists, else ``"hh"``.

Conversations are rendered to text with the HH-RLHF template so that HH and conversational
data look the same to the model::

    "\\n\\nHuman: <user text>\\n\\nAssistant: <assistant text>\\n\\nHuman: ...\\n\\nAssistant:"

The prompt always ends with ``"\\n\\nAssistant:"`` and each response starts with the space
that follows it, so ``prompt + response`` reproduces the transcript exactly.

Nothing is dropped here: a row whose values cannot be turned into text keeps the original
value (the validation schema then quarantines it as ``wrong_type``), and rows the parser can
already judge (a malformed JSON line, a dialogue without an assistant turn) carry a reason code
in the ``ingest_issue`` column.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from assets import bundled_task
from assets.schemas import OPTIONAL_COLUMNS, PAIR_COLUMNS, QuarantineReason

FORMATS: tuple[str, ...] = ("auto", "trl", "hh", "labels")
LABEL_COLUMNS: tuple[str, ...] = ("prompt", "response_a", "response_b", "preference")
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".csv.gz",
)
HF_DISK_PREFIX = "hf_disk:"
HUB_PREFIX = "hf:"
# Files a `datasets` save_to_disk folder always contains (Dataset / DatasetDict).
HF_DISK_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json", "dataset_dict.json")

# HH-RLHF transcript tags (Anthropic, "Training a Helpful and Harmless Assistant", 2022).
HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
ASSISTANT_MARKER = "Assistant:"
ROLE_TAGS: dict[str, str] = {"user": HUMAN_TAG, "assistant": ASSISTANT_TAG, "system": "\n\nSystem:"}

NORMALIZED_COLUMNS: tuple[str, ...] = (*PAIR_COLUMNS, "ingest_issue")
# Suffix of the extra Parquet column that holds JSON for values Arrow cannot store in a
# string column (wrong types must survive the raw table to be quarantined downstream).
JSON_SUFFIX = "__json"


class IngestError(ValueError):
    """A source that cannot be read at all: missing, unreadable, or with the wrong columns."""


@dataclass
class IngestResult:
    """A normalized table plus where it came from."""

    frame: pd.DataFrame
    """columns ``NORMALIZED_COLUMNS``; one row per input record, in input order"""
    source: str
    """the source string as configured"""
    format: str
    """the format actually used (``"trl"`` or ``"hh"``)"""
    files: list[str] = field(default_factory=list)
    """files read (empty for the bundled generator and hub datasets)"""
    ignored_columns: list[str] = field(default_factory=list)
    """input columns that are not part of the pair contract (reported, not kept)"""
    skipped_files: list[str] = field(default_factory=list)
    """files in a source folder that have no supported suffix (reported, not read)"""


# ---------------------------------------------------------------------------------------------
# Entry point


def load_preferences(
    source: str = "bundled",
    fmt: str = "auto",
    *,
    n_pairs: int = 4000,
    seed: int = 0,
    corrupt_fraction: float = 0.02,
    hf_split: str = "train",
) -> IngestResult:
    """Read ``source`` in format ``fmt`` into one normalized table (see the module docstring)."""
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if source == "bundled":
        raw = bundled_task.generate_preferences(n_pairs, seed, corrupt_fraction)
        frame, used, ignored = normalize(raw, fmt, origin="bundled")
        return IngestResult(frame, source, used, ignored_columns=ignored)
    if source.startswith(HUB_PREFIX):
        raw = _read_hub(source[len(HUB_PREFIX):], hf_split)
        frame, used, ignored = normalize(raw, fmt, origin=source)
        return IngestResult(frame, source, used, ignored_columns=ignored)
    if source.startswith(HF_DISK_PREFIX):
        path = Path(source[len(HF_DISK_PREFIX):]).expanduser()
        return _from_hf_disk(path, fmt, hf_split, source)
    path = Path(source).expanduser()
    if not path.exists():
        raise IngestError(
            f"source {str(path)!r} does not exist: give 'bundled', an existing file or folder, "
            f"'{HF_DISK_PREFIX}<path>' or '{HUB_PREFIX}<owner/name>'"
        )
    if path.is_dir():
        if _is_hf_disk(path):
            return _from_hf_disk(path, fmt, hf_split, source)
        return _from_folder(path, fmt, source)
    frame, used, ignored = normalize(read_file(path), fmt, origin=path.name, where=str(path))
    return IngestResult(frame, source, used, files=[str(path)], ignored_columns=ignored)


def _from_folder(folder: Path, fmt: str, source: str) -> IngestResult:
    try:
        files, skipped = list_data_files(folder)
    except OSError as exc:
        raise IngestError(f"cannot list folder {str(folder)!r}: {exc}") from exc
    if not files:
        raise IngestError(
            f"folder {str(folder)!r} has no data files: expected {', '.join(SUPPORTED_SUFFIXES)}"
            + (f" (found only {', '.join(skipped)})" if skipped else "")
        )
    frames, used_formats, ignored = [], set(), set()
    for path in files:
        frame, used, ign = normalize(read_file(path), fmt, origin=path.name, where=str(path))
        frames.append(frame)
        used_formats.add(used)
        ignored.update(ign)
    frame = pd.concat(frames, ignore_index=True)
    return IngestResult(frame, source, "+".join(sorted(used_formats)), [str(p) for p in files],
                        sorted(ignored), skipped)


def _from_hf_disk(path: Path, fmt: str, split: str, source: str) -> IngestResult:
    raw = _read_hf_disk(path, split)
    frame, used, ignored = normalize(raw, fmt, origin=path.name, where=str(path))
    return IngestResult(frame, source, used, files=[str(path)], ignored_columns=ignored)


# ---------------------------------------------------------------------------------------------
# Readers: each returns the file's records as a DataFrame of plain Python values.


def list_data_files(folder: Path) -> tuple[list[Path], list[str]]:
    """Supported files of ``folder`` (sorted, not recursive) and the names of the others."""
    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith((".", "_")) or path.is_dir():
            continue
        (files if path.name.lower().endswith(SUPPORTED_SUFFIXES) else skipped).append(path)
    return files, [p.name for p in skipped]


def read_file(path: Path) -> pd.DataFrame:
    """Records of one data file; raises :class:`IngestError` naming the file on failure."""
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(path)
        if name.endswith((".json", ".json.gz")):
            return read_json(path)
        if name.endswith(".parquet"):
            return _plain(pd.read_parquet(path))
        if name.endswith((".csv", ".csv.gz")):
            return read_csv(path)
    except IngestError:
        raise
    except (OSError, EOFError, ValueError, UnicodeError) as exc:  # pyarrow errors are ValueErrors
        raise IngestError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    raise IngestError(
        f"cannot read {str(path)!r}: unsupported file type, expected {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def read_jsonl(path: Path) -> pd.DataFrame:
    """One record per non-blank line. A line that is not a JSON object becomes a row with
    ``ingest_issue = malformed_record`` (its text shown as the prompt of the quarantined row),
    so it is quarantined rather than lost. Bytes that are not UTF-8 are replaced by U+FFFD and flagged downstream."""
    records: list[dict[str, Any]] = []
    for line in _read_bytes(path).decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            rec = {"ingest_issue": QuarantineReason.MALFORMED_RECORD.value, "raw_line": line}
        records.append(_clean(rec))
    if not records:
        raise IngestError(f"cannot read {str(path)!r}: the file has no records")
    return pd.DataFrame.from_records(records)


def read_json(path: Path) -> pd.DataFrame:
    """A JSON array of records, a dict of equal-length columns, or ``{"<key>": [records]}``."""
    text = _read_bytes(path).decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestError(f"cannot read {str(path)!r}: invalid JSON ({exc})") from exc
    wrapped = next(iter(data.values())) if isinstance(data, dict) and len(data) == 1 else None
    if isinstance(wrapped, list) and wrapped and isinstance(wrapped[0], dict):  # {"data": [records]}
        data = wrapped
    if isinstance(data, list):
        records = [
            _clean(rec) if isinstance(rec, dict)
            else {"ingest_issue": QuarantineReason.MALFORMED_RECORD.value, "raw_line": json.dumps(rec)}
            for rec in data
        ]
        if not records:
            raise IngestError(f"cannot read {str(path)!r}: the file has no records")
        return pd.DataFrame.from_records(records)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise IngestError(f"cannot read {str(path)!r}: columns have different lengths {sorted(lengths)}")
        return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in data.items()})
    raise IngestError(
        f"cannot read {str(path)!r}: expected a JSON array of records or a dict of columns, "
        f"got {type(data).__name__}"
    )


def _clean(value: Any) -> Any:
    """Replace lone surrogates (from JSON escapes such as ``"\\ud800"``) by U+FFFD.

    Arrow cannot store them, and U+FFFD is what the schema reports as ``undecodable_text``.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def read_csv(path: Path) -> pd.DataFrame:
    """Every cell as text (empty cells are missing); ``margin`` is parsed later, per cell."""
    frame = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""],
                        encoding_errors="replace")
    return frame.astype(object).where(frame.notna(), None)


def _is_hf_disk(path: Path) -> bool:
    return any((path / marker).exists() for marker in HF_DISK_MARKERS)


def _read_hf_disk(path: Path, split: str) -> pd.DataFrame:
    import datasets  # heavy import, only when this source is used

    if not path.exists():
        raise IngestError(f"hf_disk source {str(path)!r} does not exist")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid ...
        raise IngestError(
            f"cannot read {str(path)!r} as a datasets save_to_disk folder: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise IngestError(
                f"{str(path)!r} has splits {sorted(ds)}, not {split!r}: set hf_split to one of them"
            )
        ds = ds[split]
    return pd.DataFrame.from_records(ds.to_list(), columns=ds.column_names)


def _read_hub(dataset_id: str, split: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # network, auth, missing split: all end the same way for the user
        raise IngestError(
            f"cannot load hub dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: {exc}. "
            f"Without network access, save it elsewhere with save_to_disk and use "
            f"'{HF_DISK_PREFIX}<path>'"
        ) from exc
    return pd.DataFrame.from_records(ds.to_list(), columns=ds.column_names)


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Arrow list columns arrive as numpy arrays; turn every cell into plain Python values."""
    return frame.astype(object).map(_to_python)


def _to_python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


# ---------------------------------------------------------------------------------------------
# Normalization: any supported format -> prompt / chosen / rejected text


def resolve_format(columns: list[str], fmt: str, where: str) -> str:
    """The concrete format of a table with ``columns``; raises naming ``where`` on a mismatch."""
    have = set(columns)
    detected = ""
    if fmt == "auto":
        if {"preference", "response_a", "response_b"} <= have:
            fmt = "labels"
        else:
            fmt = "trl" if "prompt" in have else "hh"
        detected = " (auto-detected: no 'prompt' column)" if fmt == "hh" else " (auto-detected)"
    required = {"trl": ("prompt", "chosen", "rejected"), "labels": LABEL_COLUMNS}.get(fmt, ("chosen", "rejected"))
    missing = [c for c in required if c not in have]
    if missing:
        raise IngestError(
            f"{where}: wrong columns for format {fmt!r}{detected}: missing {missing}, found {sorted(have)}. "
            "Expected prompt/chosen/rejected (TRL) or chosen/rejected dialogues (HH-RLHF)"
        )
    return fmt


def normalize(
    raw: pd.DataFrame, fmt: str, origin: str, where: str | None = None
) -> tuple[pd.DataFrame, str, list[str]]:
    """Turn one source table into ``NORMALIZED_COLUMNS``.

    Returns the table, the concrete format and the input columns that were not kept.
    ``origin`` labels rows without a ``source`` and prefixes generated ids.
    """
    where = where or origin
    data_columns = [c for c in raw.columns if c not in ("ingest_issue", "raw_line")]
    if data_columns or "ingest_issue" not in raw.columns:
        fmt = resolve_format(list(raw.columns), fmt, where)
    elif fmt == "auto":  # a file whose every line is malformed: nothing to detect from
        fmt = "trl"
    kept = {"prompt", "chosen", "rejected", *OPTIONAL_COLUMNS, "ingest_issue", "raw_line"}
    if fmt == "hh":
        kept.discard("prompt")
    if fmt == "labels":
        kept |= set(LABEL_COLUMNS)
    ignored = sorted(str(c) for c in raw.columns if c not in kept)
    row_fn = {"trl": _trl_row, "labels": _labels_row}.get(fmt, _hh_row)
    rows = [
        _normalize_row(rec, i, row_fn, origin)
        for i, rec in enumerate(raw.to_dict(orient="records"))
    ]
    frame = pd.DataFrame.from_records(rows, columns=list(NORMALIZED_COLUMNS))
    return frame, fmt, ignored


RowParser = Callable[[dict[str, Any]], tuple[Any, Any, Any, str | None]]


def _normalize_row(rec: dict[str, Any], i: int, row_fn: RowParser, origin: str) -> dict[str, Any]:
    rec = {k: (None if _is_missing(v) else _to_python(v)) for k, v in rec.items()}
    issue = rec.get("ingest_issue")
    if issue:
        prompt = chosen = rejected = None
        if rec.get("raw_line") is not None:
            prompt = rec["raw_line"]  # keep the unparseable text visible in the quarantine table
    else:
        prompt, chosen, rejected, issue = row_fn(rec)
    source = rec.get("source")
    rid = rec.get("id")
    return {
        "id": str(rid) if rid is not None else f"{origin}:{i}",
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": _margin(rec.get("margin")),
        "source": source if isinstance(source, str) else origin,
        "ingest_issue": issue,
    }


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _margin(value: Any) -> Any:
    """A float, None, or the original value when it is not a number (quarantined as wrong_type)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        and m["role"] in ROLE_TAGS
        for m in value
    )


def render_messages(messages: list[dict[str, str]]) -> str:
    """Messages as an HH-style transcript: ``"\\n\\nHuman: hi\\n\\nAssistant: hello"``."""
    return "".join(f"{ROLE_TAGS[m['role']]} {m['content']}" for m in messages)


def render_prompt(value: Any) -> Any:
    """A prompt as text. Message lists end with the assistant tag the response follows."""
    if _is_messages(value) and value:
        return render_messages(value) + ASSISTANT_TAG
    return value


def render_response(value: Any) -> tuple[Any, str | None]:
    """A response as text, plus an issue code. A message list must start with an assistant
    turn; later turns (if any) are rendered with the transcript template."""
    if not _is_messages(value):
        return value, None
    if not value or value[0]["role"] != "assistant":
        return render_messages(value) if value else value, QuarantineReason.NO_ASSISTANT_TURN.value
    return " " + value[0]["content"] + render_messages(value[1:]), None


def _field_issue(*values: Any) -> str | None:
    """Missing before wrong type: the first thing an operator has to fix."""
    if any(v is None for v in values):
        return QuarantineReason.MISSING_FIELD.value
    return None


def _trl_row(rec: dict[str, Any]) -> tuple[Any, Any, Any, str | None]:
    prompt = render_prompt(rec.get("prompt"))
    chosen, issue_c = render_response(rec.get("chosen"))
    rejected, issue_r = render_response(rec.get("rejected"))
    return prompt, chosen, rejected, issue_c or issue_r


def _labels_row(rec: dict[str, Any]) -> tuple[Any, Any, Any, str | None]:
    """An annotated pair: ``preference`` ``a`` / ``b`` (any case) names the better response."""
    label = rec.get("preference")
    label = str(label).strip().lower() if label is not None else ""
    a, b = rec.get("response_a"), rec.get("response_b")
    prompt = render_prompt(rec.get("prompt"))
    if label not in ("a", "b"):
        reason = QuarantineReason.UNLABELLED if not label else QuarantineReason.INVALID_LABEL
        return prompt, a, b, reason.value
    chosen, rejected = (a, b) if label == "a" else (b, a)
    return prompt, chosen, rejected, None


def _hh_row(rec: dict[str, Any]) -> tuple[Any, Any, Any, str | None]:
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return split_transcripts(chosen, rejected)
    if _is_messages(chosen) and _is_messages(rejected):
        return split_conversations(chosen, rejected)
    # Cannot find a prompt: keep the values so the schema names the problem (missing / type).
    issue = _field_issue(chosen, rejected) or QuarantineReason.WRONG_TYPE.value
    return None, chosen, rejected, issue


def split_transcripts(chosen: str, rejected: str) -> tuple[Any, Any, Any, str | None]:
    """Split two HH transcripts into (prompt, chosen response, rejected response, issue).

    The prompt is the shared prefix of both dialogues up to and including the last
    ``Assistant:`` in it (as in TRL's ``examples/datasets/hh-rlhf-helpful-base.py``); each
    response is the rest of its dialogue.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        return None, chosen, rejected, QuarantineReason.NO_ASSISTANT_TURN.value
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:], None


def split_conversations(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[Any, Any, Any, str | None]:
    """Conversational form of :func:`split_transcripts`: the prompt is the shared message
    prefix before the last assistant turn the two conversations both have at that position."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    k = min(n, len(chosen) - 1, len(rejected) - 1)
    while k >= 0 and not (chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"):
        k -= 1
    if k < 0:
        return None, render_messages(chosen), render_messages(rejected), \
            QuarantineReason.NO_ASSISTANT_TURN.value
    prompt = render_messages(chosen[:k]) + ASSISTANT_TAG
    return prompt, render_response(chosen[k:])[0], render_response(rejected[k:])[0], None


# ---------------------------------------------------------------------------------------------
# Raw storage and content hashing


def content_hash(frame: pd.DataFrame, extra: dict[str, Any] | None = None) -> str:
    """A stable hash of a table's values (row order included) and of ``extra`` settings.

    Hashes a canonical JSON rendering rather than file bytes, so it does not change with the
    Parquet writer's version.
    """
    h = hashlib.sha256()
    h.update(json.dumps(list(map(str, frame.columns))).encode())
    for row in frame.itertuples(index=False, name=None):
        h.update(json.dumps([_canonical(v) for v in row], default=repr, ensure_ascii=False).encode())
        h.update(b"\n")
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if _is_missing(value):
        return None
    return _to_python(value)


def write_raw(frame: pd.DataFrame, path: Path) -> None:
    """Write a normalized table to Parquet without losing wrongly-typed values.

    A column holding anything but text (or only floats for ``margin``) gets a companion
    ``<column>__json`` column with those values as JSON, so :func:`read_raw` restores them.
    """
    out = pd.DataFrame(index=frame.index)
    for col in frame.columns:
        values = frame[col].tolist()
        plain_type = float if col == "margin" else str
        odd = [not _is_missing(v) and not isinstance(v, plain_type) for v in values]
        out[col] = pd.Series([None if o or _is_missing(v) else v for v, o in zip(values, odd)],
                             index=frame.index, dtype=float if col == "margin" else object)
        if any(odd):
            out[col + JSON_SUFFIX] = [json.dumps(v, default=repr) if o else None
                                      for v, o in zip(values, odd)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(path)


def read_raw(path: Path) -> pd.DataFrame:
    """Inverse of :func:`write_raw`."""
    stored = pd.read_parquet(path)
    frame = pd.DataFrame(index=stored.index)
    for col in stored.columns:
        if col.endswith(JSON_SUFFIX):
            continue
        values = stored[col].astype(object).where(stored[col].notna(), None).tolist()
        if col + JSON_SUFFIX in stored.columns:
            encoded = stored[col + JSON_SUFFIX].tolist()
            values = [v if _is_missing(e) else json.loads(e) for v, e in zip(values, encoded)]
        frame[col] = pd.Series(values, index=stored.index, dtype=object)
    return frame
