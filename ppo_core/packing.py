"""Padding-free forwards: many episodes packed into a few rows with a block-diagonal mask.

A PPO batch mixes 5-token and 64-token responses behind prompts of different lengths. A
padded forward computes every row to the longest one; here each episode's real tokens
(prompt then response) are laid end to end in rows of at most ``capacity`` positions, each
episode restarts its position ids at 0, and a block-diagonal causal mask keeps episodes
from attending to each other. Every episode's outputs equal those of its own unpadded
forward (tests check logits, values and gradients), while the linear layers run on one
large matrix of real tokens: TRL's ``padding_free`` SFT and OpenRLHF's ``packing_samples``
do the same on GPUs with flash-attention's variable-length kernels; on CPU the mask is an
explicit (rows, 1, W, W) tensor for SDPA / eager attention.

The attention of a packed row costs W^2 instead of the sum of the episodes' squared lengths,
so rows are capped at ``capacity`` positions (``PPOConfig.pack_capacity``, 128: on the
benchmark's width-128 model rows of 96-160 positions measured fastest, BENCHMARKS.md).

Everything here is pure tensor bookkeeping; which model runs it is the caller's business
(:mod:`ppo_core.ppo`). :func:`supports_packing` checks a model once against its own padded
forward, in the model's dtype, before any packed forward is trusted.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ppo_core.generation import GenerationOutput
from ppo_core.models import score_head, trunk_of, unwrap
from ppo_core.ppo_utils import position_ids_from_mask, verification_tolerance

# attention implementations that take an explicit 4D mask (flash-attention kernels need the
# variable-length API instead, so models using them keep the padded path)
PACKABLE_ATTENTION = ("sdpa", "eager")

log = logging.getLogger(__name__)
# (model class, kind, reason) triples already logged: each fallback is reported once per process
_LOGGED: set[tuple[str, str, str]] = set()


@dataclass
class PackedEpisodes:
    """B episodes of a :class:`GenerationOutput` packed into R rows of width W.

    Flat indices below index the (R * W) positions in row-major order.
    """

    input_ids: torch.Tensor
    """(R, W) long; pad id after a row's last episode"""
    position_ids: torch.Tensor
    """(R, W) long; 0 at each episode's first token"""
    allowed: torch.Tensor
    """(R, 1, W, W) bool; query i may attend key j (same episode, j <= i; padding sees itself)"""
    before: torch.Tensor
    """(N,) flat position whose output predicts each real response token (the critic's value
    before it); N = real response tokens of the batch, ordered by (episode, step)"""
    episode: torch.Tensor
    """(N,) episode of each response token"""
    step: torch.Tensor
    """(N,) index of each response token within its response"""
    targets: torch.Tensor
    """(N,) the response tokens"""
    last: torch.Tensor
    """(B,) flat position of each episode's last real token (where a reward model scores)"""
    batch_size: int
    response_width: int
    """T of the source GenerationOutput"""
    tokens: int
    """real tokens packed (prompt + response)"""

    @property
    def positions(self) -> int:
        """positions a forward computes, padding included"""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> PackedEpisodes:
        """The same packing with its tensors on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return PackedEpisodes(**moved)

    def to_response_grid(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per response token -> (B, T), 0 on padding; differentiable."""
        out = values.new_zeros(self.batch_size, self.response_width)
        return out.index_put((self.episode, self.step), values)

    def attention_mask(self, dtype: torch.dtype, implementation: str) -> torch.Tensor:
        """The mask a model's attention takes: SDPA reads booleans; eager attention adds the
        mask to its scores, so it gets 0 / dtype-min floats."""
        if implementation == "sdpa":
            return self.allowed
        return torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device).masked_fill(
            ~self.allowed, torch.finfo(dtype).min)


def balanced_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows (lists of item indices) of total length <= ``capacity`` (or the longest item) that
    minimise what a packed forward computes: rows x the fullest row's length.

    For each row count from the fewest possible up, items go longest-first into the emptiest
    row (LPT scheduling, within 4/3 of the best fullest row); the cheapest row count wins.
    Many short items share rows, while a batch of long items (over half the capacity each)
    gets one row per item rather than rows padded out to the capacity.
    """
    if not lengths:
        return []
    longest = max(lengths)
    cap = max(capacity, longest)
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    best: tuple[int, list[list[int]]] | None = None
    for n_rows in range(max(1, math.ceil(sum(lengths) / cap)), len(lengths) + 1):
        if best is not None and n_rows * longest >= best[0]:
            break  # every later row count computes at least this much
        heap = [(0, r) for r in range(n_rows)]
        bins: list[list[int]] = [[] for _ in range(n_rows)]
        for i in order:
            load, r = heapq.heappop(heap)
            bins[r].append(i)
            heapq.heappush(heap, (load + lengths[i], r))
        width = max(load for load, _ in heap)
        if width <= cap and (best is None or n_rows * width < best[0]):
            best = (n_rows * width, bins)
    assert best is not None  # one item per row always fits
    return best[1]


def pack_episodes(gen: GenerationOutput, capacity: int, pad_token_id: int) -> PackedEpisodes:
    """Pack every episode of ``gen`` (left-padded prompt, right-padded response)."""
    P = gen.prompt_length
    B, T = gen.responses.shape
    sequences, responses = gen.sequences.cpu(), gen.responses.cpu()
    response_mask = gen.response_mask.cpu()
    prompt_len = gen.attention_mask[:, :P].sum(1).tolist()
    resp_len = response_mask.sum(1).tolist()
    if min(prompt_len, default=1) < 1:
        # the first response token is predicted from the last prompt token
        raise ValueError("pack_episodes: every episode needs at least one prompt token")
    lengths = [int(p + r) for p, r in zip(prompt_len, resp_len)]
    bins = balanced_bins(lengths, capacity)
    W = max(sum(lengths[i] for i in members) for members in bins)
    R = len(bins)
    input_ids = torch.full((R, W), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, W), dtype=torch.long)
    segment = torch.full((R, W), -1, dtype=torch.long)
    start = [0] * B  # flat position of each episode's first token
    for r, members in enumerate(bins):
        offset = 0
        for b in members:
            p, n = int(prompt_len[b]), lengths[b]
            input_ids[r, offset:offset + p] = sequences[b, P - p:P]
            input_ids[r, offset + p:offset + n] = responses[b, :n - p]
            position_ids[r, offset:offset + n] = torch.arange(n)
            segment[r, offset:offset + n] = b
            start[b] = r * W + offset
            offset += n
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal & (segment[:, :, None] >= 0)
    allowed |= torch.eye(W, dtype=torch.bool)  # a padding query sees itself: no all-masked row
    episode, step = response_mask.nonzero(as_tuple=True)  # (N,) each, row-major
    first = torch.tensor(start, dtype=torch.long)
    p_len = torch.tensor(prompt_len, dtype=torch.long)
    before = first[episode] + p_len[episode] - 1 + step
    last = first + torch.tensor(lengths, dtype=torch.long) - 1
    return PackedEpisodes(
        input_ids=input_ids, position_ids=position_ids, allowed=allowed[:, None],
        before=before, episode=episode, step=step, targets=responses[episode, step],
        last=last, batch_size=B, response_width=T, tokens=sum(lengths))


def _implementation(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def trunk_hidden(model: nn.Module, packed: PackedEpisodes) -> torch.Tensor:
    """The transformer trunk (no head) on the packed rows: (R * W, H) hidden states.

    ``model`` is an HF causal LM or sequence scorer, or a DeepSpeed engine around one
    (calling the submodules directly keeps ZeRO-3's per-module parameter gathering).
    """
    inner = unwrap(model)
    dtype = next(inner.parameters()).dtype
    hidden = trunk_of(inner)(
        input_ids=packed.input_ids, position_ids=packed.position_ids,
        attention_mask=packed.attention_mask(dtype, _implementation(inner)),
        use_cache=False,
    ).last_hidden_state  # (R, W, H)
    return hidden.reshape(-1, hidden.shape[-1])


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on selected hidden states: (N, H) -> (N, V)."""
    return unwrap(model).get_output_embeddings()(hidden)


def scalar_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A scorer's head on selected hidden states: (N, H) -> (N,) float."""
    return score_head(model)(hidden).squeeze(-1).float()


def supports_packing(model: nn.Module, kind: str, pad_token_id: int) -> bool:
    """Whether packed forwards of ``model`` reproduce its padded ones
    (:func:`packing_problem` is None)."""
    return packing_problem(model, kind, pad_token_id) is None


@torch.no_grad()
def packing_problem(model: nn.Module, kind: str, pad_token_id: int) -> str | None:
    """Why packed forwards of ``model`` cannot be trusted (None when they reproduce its padded
    ones). The first time a (model class, kind, reason) triple is met, the fallback to padded
    forwards is logged at WARNING, naming the reason.

    ``kind`` is "lm" (compare log-softmax of the model's own ``forward`` logits) or "scorer"
    (compare per-token head values). Runs two short left-padded episodes through both paths
    once; a model that rescales or soft-caps logits inside ``forward``, ignores
    ``position_ids`` or uses an attention kernel without 4D masks fails here and keeps the
    padded path.
    """
    problem = _packing_problem(model, kind, pad_token_id)
    key = (type(unwrap(model)).__name__, kind, problem or "")
    if problem is not None and key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("packing not used for %s (%s): %s; PPO scores and trains on padded "
                    "batches instead", key[0], kind, problem)
    return problem


def _packing_problem(model: nn.Module, kind: str, pad_token_id: int) -> str | None:
    inner = unwrap(model)
    implementation = _implementation(inner)
    if implementation not in PACKABLE_ATTENTION:
        return (f"attention implementation {implementation!r} takes no 4D mask (packing needs "
                f"one of {', '.join(PACKABLE_ATTENTION)})")
    if kind == "lm" and inner.get_output_embeddings() is None:
        return "the model has no output embeddings (LM head)"
    device = next(inner.parameters()).device
    # two episodes: prompts of 3 and 5 tokens, responses of 4 and 2 (ids clear of specials)
    vocab = int(inner.config.vocab_size)
    ids = (torch.arange(2 * 9).reshape(2, 9) * 7 + 11) % max(vocab - 4, 1) + 3
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0, 0]])
    ids = ids.masked_fill(mask == 0, pad_token_id)
    gen = GenerationOutput(
        sequences=ids, attention_mask=mask, responses=ids[:, 5:],
        response_mask=mask[:, 5:].bool(), ended=torch.tensor([False, False]), logprobs=None,
        prompt_length=5)
    packed = pack_episodes(gen, capacity=64, pad_token_id=pad_token_id).to(device)
    try:
        hidden = trunk_hidden(model, packed)
        pos = position_ids_from_mask(mask)
        if kind == "lm":
            got = lm_logits(model, hidden[packed.before]).float().log_softmax(-1)
            full = inner(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=pos.to(device), use_cache=False).logits.float()
            want = full[:, 4:8][packed.episode, packed.step].log_softmax(-1)
        else:
            got = scalar_head(model, hidden[packed.before])
            full = trunk_of(inner)(input_ids=ids.to(device), attention_mask=mask.to(device),
                         position_ids=pos.to(device), use_cache=False).last_hidden_state
            want = scalar_head(model, full)[:, 4:8][packed.episode, packed.step]
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        return f"the packed forward raised {type(exc).__name__}: {exc}"
    got, want = got.cpu(), want.cpu()
    dtype = next(inner.parameters()).dtype
    tol = verification_tolerance(dtype)  # 1e-4 in float32; 4 ulps of a bf16 model's dtype
    if got.shape != want.shape or not torch.allclose(got, want, atol=tol, rtol=tol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        return (f"packed outputs differ from the padded forward (max abs difference {diff:.1e}, "
                f"tolerance {tol:.1e} for {dtype})")
    return None
