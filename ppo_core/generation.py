"""Batched sampling with a KV cache for left-padded prompts.

A lean replacement for ``model.generate`` in the PPO rollout. ``generate`` runs a stack of
logits processors, stopping criteria and cache bookkeeping per token; on the tiny models of
this project that Python overhead is a large share of the step (``bench/ppo_core_bench.py``
measures both). Here one token costs one forward plus a handful of tensor ops, all buffers
are preallocated, and the log-probs of the sampled tokens come for free from the logits the
sampler already has (so PPO needs no extra forward for the old-policy log-probs).

Works with any Hugging Face causal LM that accepts ``position_ids``, ``past_key_values`` and
``logits_to_keep`` (GPT-2, Llama, Qwen, ...) and with a DeepSpeed engine wrapping one (under
ZeRO-3 that engine all-gathers the weights at every forward; ``DeepSpeedStrategy.generation_model``
gathers them once for the whole call instead). For
Llama-layout models the decode steps skip the module stack altogether
(:mod:`ppo_core.fast_decode`, verified once per model against its own forward, in the
model's dtype). A bf16 model decodes in bf16; the sampling and the log-probs are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ppo_core.fast_decode import FastDecoder, HFDecoder, fast_decode_problem, supports_fast_decode


@dataclass
class GenerationOutput:
    """Result of :func:`sample`. ``T`` is the number of steps actually run (<= max_new_tokens)."""

    sequences: torch.Tensor
    """(B, P + T) left-padded prompt followed by the right-padded response"""
    attention_mask: torch.Tensor
    """(B, P + T) long, 1 on real prompt and response tokens"""
    responses: torch.Tensor
    """(B, T) response tokens, ``pad_token_id`` after the first EOS"""
    response_mask: torch.Tensor
    """(B, T) bool, True on response tokens up to and including the first EOS"""
    ended: torch.Tensor
    """(B,) bool, True when the response contains EOS (False = cut by the length limit)"""
    logprobs: torch.Tensor | None
    """(B, T) float32 log-probs of the sampled tokens under softmax(logits / temperature),
    0 on padding; None unless requested"""
    prompt_length: int
    """P, the padded prompt width"""
    fast_decode: bool = False
    """whether :class:`~ppo_core.fast_decode.FastDecoder` ran the decode steps (False: the
    model's own forward, e.g. for a layout it does not cover; the reason is logged once)"""

    @property
    def sequence_response_mask(self) -> torch.Tensor:
        """(B, P + T) bool: ``response_mask`` placed in ``sequences`` (False on the prompt)."""
        return torch.cat([self.response_mask.new_zeros(self.response_mask.shape[0], self.prompt_length),
                          self.response_mask], dim=1)



def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering; removed entries become -inf. (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first is always kept)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample_step(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from (B, V) float logits -> (tokens (B,), logprobs (B,)).

    The log-prob is taken under softmax(logits / temperature) *before* top-k/top-p, which is
    the distribution the trainer recomputes; with filtering on, the tokens come from another
    distribution than these log-probs describe, so PPO refuses top_k/top_p (``PPOConfig``).
    """
    if temperature <= 0.0:  # greedy decoding, for evaluation
        logp = F.log_softmax(logits, dim=-1)
        tokens = logp.argmax(-1)
    else:
        logp = F.log_softmax(logits / temperature, dim=-1)
        filtered = filter_logits(logp, top_k, top_p) if (top_k > 0 or top_p < 1.0) else logp
        tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# Compact the decode batch once more than this share of its rows has ended: a forward costs
# in proportion to its rows, and each compaction copies the KV cache once.
COMPACT_FRACTION = 0.25


def _should_compact(finished: torch.Tensor, decoder: HFDecoder | FastDecoder) -> bool:
    """True when enough rows ended, some are still live, and the cache can drop rows."""
    n_done = int(finished.sum())
    return (n_done > COMPACT_FRACTION * finished.numel() and n_done < finished.numel()
            and decoder.can_drop_rows)


def _all_finished(finished: torch.Tensor, sync_ranks: bool) -> bool:
    """True when every row (on every rank, if ``sync_ranks``) has emitted EOS.

    Called with a ZeRO-3 engine, each forward all-gathers parameters collectively, so all
    ranks must run the same number of forwards: a rank that is done keeps stepping until all
    are. With the weights gathered once for the rollout (``DeepSpeedStrategy.generation_model``)
    the forwards are local, but the lockstep is kept: it is one 1-element all-reduce per
    token, and it makes the response width and the random stream (a finished rank still draws
    for its rows) the same whether or not the weights were gathered.
    """
    done = torch.tensor([int(bool(finished.all()))], device=finished.device)
    if sync_ranks:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    return_logprobs: bool = True,
    sync_ranks: bool | None = None,
    compact: bool = True,
    fast: bool | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` per left-padded prompt, stopping each row at EOS.

    input_ids, attention_mask: (B, P), left-padded. ``temperature <= 0`` is greedy.
    ``sync_ranks`` (default: when torch.distributed has more than one rank) keeps all ranks
    in lockstep so ZeRO-3 collective forwards match (see :func:`_all_finished`). Stops early
    once every row has ended. Under ZeRO-3 pass the module from
    ``DeepSpeedStrategy.generation_model`` (weights gathered once per call, not per token).
    ``compact`` drops ended rows from the batch and the KV cache (see ``COMPACT_FRACTION``);
    the sampled distribution is the same, the random stream (fewer rows per draw) is not.
    ``fast`` picks :class:`~ppo_core.fast_decode.FastDecoder` for the decode steps (default
    None: when :func:`~ppo_core.fast_decode.supports_fast_decode` verified it for this model;
    True insists on it, False keeps the Hugging Face forward).
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, P); got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if sync_ranks is None:
        sync_ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    device = input_ids.device
    B, P = input_ids.shape
    T = max_new_tokens
    attention_mask = attention_mask.to(torch.long)

    mask = torch.zeros(B, P + T, dtype=torch.long, device=device)    # (B, P+T), grows per step
    mask[:, :P] = attention_mask
    tokens = torch.full((B, T), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, T, dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    next_position = attention_mask.sum(-1)                           # (B,)
    prompt_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    if fast is None:
        fast = supports_fast_decode(model)
    elif fast and (problem := fast_decode_problem(model)) is not None:
        raise ValueError(f"sample(fast=True): FastDecoder does not reproduce "
                         f"{type(model).__name__}'s forward: {problem} (see ppo_core.fast_decode)")

    # rows[i] is the output row of batch row i: finished rows leave the batch (and the KV
    # cache) once they are more than COMPACT_FRACTION of it, so late steps run on the rows
    # still generating; None until the first compaction (then plain slices are used)
    rows: torch.Tensor | None = None
    # no_grad, not inference_mode: ZeRO-3 gathers parameters inside this forward and keeps
    # the small ones gathered; gathered as inference tensors, the next backward refuses them
    with torch.no_grad():
        prefill = HFDecoder(model, prompt_ids, attention_mask)
        logits = prefill.first_logits
        decoder = FastDecoder.after(model, prefill, P + T) if fast else prefill
        del prefill  # the fast decoder copied its cache
        steps = 0
        for t in range(T):
            # float32 before the temperature, as the trainer's recomputation
            # (ppo_utils.logprobs_from_logits): a bf16 policy's logits keep 8 bits
            tok, lp = _sample_step(logits.float(), temperature, top_k, top_p, generator)
            tok = tok.masked_fill(finished, pad_token_id)
            at = slice(None) if rows is None else rows
            tokens[at, t] = tok
            logprobs[at, t] = lp.masked_fill(finished, 0.0)
            mask[at, P + t] = (~finished).long()
            finished |= tok == eos_token_id
            steps = t + 1
            if t == T - 1 or _all_finished(finished, sync_ranks):
                break
            if compact and _should_compact(finished, decoder):
                live = (~finished).nonzero().squeeze(1)
                decoder.keep_rows(live)
                rows = live if rows is None else rows[live]
                tok, finished, next_position = tok[live], finished[live], next_position[live]
            step_mask = mask[:, : P + t + 1] if rows is None else mask[rows, : P + t + 1]
            logits = decoder.step(tok, next_position + t, P + t, step_mask)
        del decoder, logits  # free the KV cache before the caller's scoring forwards

    # buffers were written outside inference mode, so the results are ordinary tensors that
    # the trainer may use in autograd (inference tensors cannot be saved for backward)
    responses, response_mask = tokens[:, :steps], mask[:, P:P + steps].bool()
    return GenerationOutput(
        sequences=torch.cat([prompt_ids, responses], 1),
        attention_mask=mask[:, : P + steps].clone(),
        responses=responses.clone(),
        response_mask=response_mask.clone(),
        ended=(responses == eos_token_id).any(-1),
        logprobs=logprobs[:, :steps].clone() if return_logprobs else None,
        prompt_length=P,
        fast_decode=bool(fast),
    )
