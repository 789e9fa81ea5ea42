"""Sequence-length settings that follow the data instead of one task's constants.

PPO refuses a prompt longer than ``max_prompt_length``, samples at most ``response_length``
tokens per answer (an answer cut there has no EOS and is penalised), and SFT and the reward
models truncate a prompt + response past ``max_length``. Fixed values fit the data they were
chosen on; :func:`length_settings` derives all three from the token lengths of the data:

* every prompt fits (PPO would refuse a longer one);
* a response gets the 99th percentile of the data's response lengths, EOS included
  (``RESPONSE_QUANTILE``): the reward model has seen almost nothing longer, so sampling past
  it is scored out of distribution, and leaving the top 1% out stops one outlier from setting
  the cost of every rollout (the few longer responses are truncated in SFT and the reward
  models, which count them);
* ``max_length`` holds the longest prompt and that response;
* PPO's ``response_length`` stops at ``MAX_RESPONSE_LENGTH`` even when the data's answers run
  longer: every rollout pays for every sampled token, while SFT and the reward models still
  train on the whole 99th percentile;
* PPO's ``min_response_length`` is the data's shortest response, EOS included: the reward
  models have never scored a shorter one, so PPO does not trust their score for it
  (``ppo_core.ppo_utils.floor_short_responses``). It is not rounded and has no floor; when
  it does not fit under ``response_length`` (every answer of the data longer than PPO may
  sample) it is 1, off: otherwise every answer that ends would count as short.

Each is rounded up to a multiple of 8 and never set below the engines' own defaults (the
``MIN_*`` floors, the values of ``PPOConfig`` and ``SFTConfig``/``RewardConfig``), so data
that fits those keeps them and only longer data moves a setting. :func:`fit_context` then
makes them fit a model's positions, shortening the response first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# The engines' defaults (ppo_core.ppo.PPOConfig, ppo_core.sft.SFTConfig, ppo_core.reward.
# RewardConfig; tests/test_lengths.py checks they still agree).
MIN_PROMPT_LENGTH = 64
MIN_RESPONSE_LENGTH = 32
MIN_MAX_LENGTH = 128
MAX_RESPONSE_LENGTH = 512
"""cap on PPO's sampled tokens per answer: rollout time grows linearly with it (OpenRLHF's
``generate_max_len`` default is 1024, TRL's ``response_length`` 53)"""
RESPONSE_QUANTILE = 0.99
MIN_RESPONSE_ROOM = 8
"""fewest answer tokens a context must leave after the longest prompt"""


def recorded_length(record: Mapping[str, Any] | None, key: str) -> int:
    """The answer length a manifest recorded under ``key`` (an evaluation's ``max_new_tokens``,
    ``base_model``'s ``lengths.response_length``); ``MIN_RESPONSE_LENGTH`` for a manifest written
    before lengths were measured, which sampled with the engine default."""
    return int((record or {}).get(key) or MIN_RESPONSE_LENGTH)


def round_up(n: int, k: int = 8) -> int:
    return -(-n // k) * k


def quantile(values: Sequence[int], q: float) -> int:
    """The smallest value with at least a fraction ``q`` of ``values`` at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def token_lengths(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                  response_prompts: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Prompt lengths as every stage encodes them (BOS, chat template) and response lengths
    with their EOS. ``response_prompts[i]`` is the prompt of ``responses[i]`` (it decides the
    chat-template whitespace rule); default: the first prompt."""
    from ppo_core.data import encode_prompt, encode_response  # torch: only when measuring

    owners = response_prompts if response_prompts is not None else [prompts[0]] * len(responses)
    return ([len(encode_prompt(tokenizer, p)) for p in prompts],
            [len(encode_response(tokenizer, p, r)) for p, r in zip(owners, responses)])


def length_settings(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> dict[str, int]:
    """``max_prompt_length`` / ``response_length`` / ``min_response_length`` (PPO) and
    ``max_length`` (SFT, reward models) for data with these token lengths (see the module
    docstring for the rules)."""
    if not prompt_lengths or not response_lengths:
        raise ValueError("length_settings: no prompts or no responses to measure")
    prompt = max(prompt_lengths)
    response = quantile(response_lengths, RESPONSE_QUANTILE)
    response_cap = min(MAX_RESPONSE_LENGTH, max(MIN_RESPONSE_LENGTH, round_up(response)))
    return {
        "max_prompt_length": max(MIN_PROMPT_LENGTH, round_up(prompt)),
        "response_length": response_cap,
        "max_length": max(MIN_MAX_LENGTH, round_up(prompt + response)),
        "min_response_length": shortest_or_off(min(response_lengths), response_cap),
        "longest_prompt": prompt,
        "response_p99": response,
        "longest_response": max(response_lengths),
    }


def shortest_or_off(shortest: int, response_length: int) -> int:
    """PPO's ``min_response_length``: the data's shortest response when it is below
    ``response_length``, else 1 (off)."""
    return shortest if shortest < response_length else 1


def fit_context(settings: dict[str, int], context: int) -> dict[str, int]:
    """``settings`` made to fit a model with ``context`` positions: the answer gives way first."""
    out = dict(settings)
    # the prompt limit's slack above the longest prompt goes before any answer token does
    slack = min(out["max_prompt_length"], context - out["response_length"])
    out["max_prompt_length"] = max(out["longest_prompt"], slack)
    room = context - out["max_prompt_length"]
    if room < MIN_RESPONSE_ROOM:
        raise ValueError(f"the longest prompt has {out['longest_prompt']} tokens: a model with {context} positions "
                         f"leaves fewer than {MIN_RESPONSE_ROOM} for the answer; use a model with a longer context")
    out["response_length"] = min(out["response_length"], room)
    if "min_response_length" in out:
        out["min_response_length"] = shortest_or_off(out["min_response_length"], out["response_length"])
    out["max_length"] = min(out["max_length"], context)
    return out


def context_for(settings: dict[str, int], floor: int = 256) -> int:
    """Positions a model built from scratch needs for ``settings`` (a multiple of 64, at least
    ``floor``, the builder's default)."""
    return max(floor, round_up(max(settings["max_prompt_length"] + settings["response_length"],
                                   settings["max_length"]), 64))
