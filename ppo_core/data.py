"""Tokenization, padding, batching and a resumable deterministic sampler.

The model input is ``prompt + response``: both are tokenized *separately* and concatenated,
then EOS is appended to the response, so the prompt/response boundary is a token boundary and
generation after a prompt sees exactly the prompt tokens SFT saw. Every stage (SFT, reward
model, PPO, evaluation) encodes prompts with :func:`encode_prompt` for the same reason.

Special tokens as the tokenizer defines them:

* BOS: a tokenizer whose own encoding (``add_special_tokens=True``) starts a text with BOS
  (Llama, Mistral) gets it prepended to the prompt exactly once (:func:`bos_ids`); one that
  adds none (GPT-2, Qwen2, the tokenizer :func:`ppo_core.models.train_tokenizer` builds) gets
  none. The text itself is tokenized without special tokens, so no EOS lands mid-sequence.
* Chat templates: the stored data keeps one tokenizer-independent format, the HH-RLHF
  transcript ``assets/ingest.py`` renders conversations to (``"\\n\\nHuman: ...\\n\\nAssistant:"``).
  The template belongs to the tokenizer, so it is applied here, at encoding time: when the
  tokenizer has a ``chat_template`` and the prompt is such a transcript, the transcript is
  parsed back into messages and rendered with ``apply_chat_template(...,
  add_generation_prompt=True)``, and the response's leading whitespace (the space after
  ``Assistant:``) is dropped, as the template's assistant header ends the prompt. Plain-text
  prompts and tokenizers without a template are encoded as they are.
* Pad and EOS may be the same id (:func:`ppo_core.models.check_tokenizer` uses EOS as pad when
  a tokenizer has none): padding is always marked by the attention mask and ``IGNORE_INDEX``
  labels, never found by comparing ids with ``pad_token_id``, so the EOS that ends a response
  is still a label (SFT), the scored token (reward model) and a sampled action (PPO).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label of tokens without loss (prompt and padding); PyTorch's cross_entropy default."""


# --------------------------------------------------------------------------- files


def read_table(
    path: str | Path, required: Sequence[str], optional: Sequence[str] = (), text_columns: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Rows of a Parquet file as dicts, with clear errors for a missing file, missing columns or
    empty/null text. Nothing is dropped silently: a bad row is an error that names it."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; check data_dir in the config")
    table = pq.read_table(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; it has {table.column_names}, needs {list(required)}"
        )
    keep = list(required) + [c for c in optional if c in table.column_names]
    rows = table.select(keep).to_pylist()
    if not rows:
        raise ValueError(f"{path}: no rows")
    for col in text_columns:
        bad = [i for i, r in enumerate(rows) if not isinstance(r[col], str) or not r[col].strip()]
        if bad:
            raise ValueError(
                f"{path}: column {col!r} is empty or null in {len(bad)} row(s) (first row indices "
                f"{bad[:5]}); the validated splits should never contain these, re-run validation"
            )
    return rows


# --------------------------------------------------------------------------- encoding


# HH-RLHF transcript tags, as assets/ingest.py writes them (its ROLE_TAGS; ppo_core does not
# import the pipeline): Anthropic, "Training a Helpful and Harmless Assistant", 2022.
HH_ROLES: dict[str, str] = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant",
                            "\n\nSystem:": "system"}
_HH_SPLIT = re.compile("(" + "|".join(re.escape(tag) for tag in HH_ROLES) + ")")
_BOS_CACHE: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's own encoding starts a text with BOS, else ``[]``.

    Detected by encoding a one-character text with and without special tokens (a Llama
    tokenizer gives ``[bos, a]`` and ``[a]``; GPT-2's gives ``[a]`` both times), once per
    tokenizer object.
    """
    try:
        return list(_BOS_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    if bos is not None:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
        if with_special[:1] == [bos] and plain[:1] != [bos]:
            ids = [int(bos)]
    try:
        _BOS_CACHE[tokenizer] = ids
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return list(ids)


def hh_messages(prompt: str) -> list[dict[str, str]] | None:
    """The messages of an HH transcript prompt (``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman:
    bye\\n\\nAssistant:"``), or None when ``prompt`` is not one: it must start with a tag and
    end with the empty ``Assistant:`` turn the response continues."""
    parts = _HH_SPLIT.split(prompt)  # ["", tag, text, tag, text, ..., "\n\nAssistant:", ""]
    if len(parts) < 5 or parts[0] != "" or parts[-2] != "\n\nAssistant:" or parts[-1].strip():
        return None
    return [{"role": HH_ROLES[tag], "content": text.strip()}
            for tag, text in zip(parts[1:-2:2], parts[2:-2:2])]


def uses_chat_template(tokenizer: Any, prompt: str) -> bool:
    """True when ``prompt`` is rendered with the tokenizer's chat template (see module doc)."""
    return bool(getattr(tokenizer, "chat_template", None)) and hh_messages(prompt) is not None


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The text a prompt is tokenized from: its chat-template rendering when
    :func:`uses_chat_template`, else the prompt itself."""
    if not uses_chat_template(tokenizer, prompt):
        return prompt
    return str(tokenizer.apply_chat_template(hh_messages(prompt), tokenize=False,
                                             add_generation_prompt=True))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids as every stage sees them before the response: :func:`bos_ids` (unless
    the text already starts with BOS, as a chat template that writes it does), then
    :func:`prompt_text` tokenized without special tokens."""
    ids = list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])
    bos = bos_ids(tokenizer)
    return ids if ids[:1] == bos else bos + ids


def encode_response(tokenizer: Any, prompt: str, response: str) -> list[int]:
    """Response token ids followed by EOS (no other special tokens); after a chat-templated
    prompt the response's leading whitespace is dropped (see module doc)."""
    text = response.lstrip() if uses_chat_template(tokenizer, prompt) else response
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    """One prompt+response sequence."""

    input_ids: list[int]
    labels: list[int]
    """``input_ids`` with prompt tokens set to IGNORE_INDEX (response-only loss)."""
    truncated: bool


def encode_prompt_response(tokenizer: Any, prompt: str, response: str, max_length: int) -> Encoded:
    """``prompt + response + EOS`` with the prompt masked in ``labels``.

    Over ``max_length``: the prompt is cut from the left (its end, next to the response,
    matters most) down to half the budget at most, keeping a leading BOS, then the response is
    cut from the right (losing the EOS). ``truncated`` reports it so the engine can count it.
    """
    p = encode_prompt(tokenizer, prompt)
    r = encode_response(tokenizer, prompt, response)
    truncated = len(p) + len(r) > max_length
    if truncated:
        bos = bos_ids(tokenizer) if p[:1] == bos_ids(tokenizer) else []
        keep_prompt = max(max_length - len(r), max_length // 2) - len(bos)
        p = bos + p[len(bos):][-keep_prompt:] if keep_prompt > 0 else bos
        r = r[: max_length - len(p)]
    return Encoded(input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r, truncated=truncated)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest: (b, t) long ids and (b, t) long attention mask.

    ``side="left"`` for generation (every prompt ends at the last column), ``"right"`` for training.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: choose 'left' or 'right'")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_sft(examples: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (pad = IGNORE_INDEX)."""
    ids, mask = pad_sequences([e.input_ids for e in examples], pad_token_id)
    labels, _ = pad_sequences([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class EncodedPair:
    """One preference pair: prompt+chosen and prompt+rejected, plus the BT margin."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float
    truncated: bool
    prompt_lengths: tuple[int, int] = (0, 0)
    """prompt tokens at the start of ``chosen_ids`` and of ``rejected_ids`` (truncation can cut
    the two prompts differently)"""
    ref_logps: tuple[float, float] | None = None
    """a frozen reference model's summed log-probs of the chosen and the rejected answer (an
    implicit reward model's trainer fills them in once)"""


def encode_pair(
    tokenizer: Any, prompt: str, chosen: str, rejected: str, max_length: int, margin: float = 0.0
) -> EncodedPair:
    c = encode_prompt_response(tokenizer, prompt, chosen, max_length)
    r = encode_prompt_response(tokenizer, prompt, rejected, max_length)
    return EncodedPair(c.input_ids, r.input_ids, float(margin), c.truncated or r.truncated,
                       (c.labels.count(IGNORE_INDEX), r.labels.count(IGNORE_INDEX)))


def mask_from_starts(starts: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) bool, True on each row's real tokens from column ``starts[i]`` on: in right-padded
    prompt + response rows whose prompts are ``starts`` long, the response tokens (EOS included)."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (columns[None, :] >= starts.to(attention_mask.device)[:, None]) & attention_mask.bool()


def collate_pairs(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch, so one forward scores both.

    ``input_ids``/``attention_mask``: (2b, t); rows [0, b) chosen, [b, 2b) rejected.
    ``response_mask``: (2b, t) bool, True on response tokens (EOS included). ``margin``: (b,) float.
    """
    seqs = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    ids, mask = pad_sequences(seqs, pad_token_id)
    starts = torch.tensor([p.prompt_lengths[0] for p in pairs] + [p.prompt_lengths[1] for p in pairs])
    response = mask_from_starts(starts, mask)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response, "margin": margin}


# --------------------------------------------------------------------------- sampling


class StepSampler:
    """Deterministic global batches addressed by optimizer step, so resuming needs only the step.

    Epoch ``e`` is a permutation of ``range(n)`` drawn from ``torch.Generator`` seeded with
    ``seed + e``; step ``s`` takes slice ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.
    The incomplete last batch of an epoch is skipped (as ``drop_last=True``) so that every
    optimizer step has exactly ``batch_size`` examples and splits evenly across ranks; the
    skipped examples differ from epoch to epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < batch_size:
            raise ValueError(
                f"the training data has {n} rows, fewer than batch_size={batch_size}: lower batch_size"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

    def batch(self, step: int) -> list[int]:
        """Global example indices of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.batch_size : (k + 1) * self.batch_size].tolist()

    def position(self, step: int) -> dict[str, int]:
        """JSON-able data position before step ``step`` (stored in checkpoints)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch_in_epoch": k, "examples_seen": step * self.batch_size,
                "seed": self.seed, "n": self.n, "batch_size": self.batch_size}

    def check_position(self, position: dict[str, Any], where: str) -> None:
        """A resumed run must see the same data in the same order."""
        for key in ("seed", "n", "batch_size"):
            if key in position and position[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: checkpoint was written with {key}={position[key]}, this run has "
                    f"{getattr(self, key)}; resume with the same data and batch settings or start fresh"
                )


def rank_micro_batches(indices: Sequence[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank = len(indices) // world_size
    mine = list(indices[rank * per_rank : (rank + 1) * per_rank])
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def eval_shards(n: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's eval batches; every rank gets the same *number* of batches (ZeRO-3 needs the
    same number of forward passes on all ranks), the last ones possibly empty."""
    mine = list(range(rank, n, world_size))
    n_batches = math.ceil(math.ceil(n / world_size) / batch_size)
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
