"""ppo_core.lengths: sequence-length settings from the data's token lengths, hand-computed."""

from __future__ import annotations

import dataclasses

import pytest

from ppo_core import lengths as L


def test_engine_defaults_are_the_floors() -> None:
    from ppo_core.ppo import PPOConfig
    from ppo_core.reward import RewardConfig
    from ppo_core.sft import SFTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    assert (defaults["max_prompt_length"], defaults["response_length"]) == (L.MIN_PROMPT_LENGTH, L.MIN_RESPONSE_LENGTH)
    for cls in (SFTConfig, RewardConfig):
        assert next(f.default for f in dataclasses.fields(cls) if f.name == "max_length") == L.MIN_MAX_LENGTH


def test_recorded_length_falls_back_to_the_engine_default() -> None:
    assert L.recorded_length({"max_new_tokens": 48}, "max_new_tokens") == 48
    # manifests written before lengths were measured: no key, a null, or no manifest at all
    for record in ({}, {"max_new_tokens": None}, None):
        assert L.recorded_length(record, "max_new_tokens") == L.MIN_RESPONSE_LENGTH == 32


def test_short_data_keeps_the_engine_defaults() -> None:
    # prompts of 10-11 tokens, responses of 6-28 (the bundled task's shape)
    s = L.length_settings([10, 11, 11], list(range(6, 29)))
    assert (s["max_prompt_length"], s["response_length"], s["max_length"]) == (64, 32, 128)
    assert (s["longest_prompt"], s["longest_response"]) == (11, 28)
    assert s["min_response_length"] == 6          # the shortest response, EOS included


def test_long_data_moves_every_setting() -> None:
    # 200 responses of 1..200 tokens: the 99th percentile is the 198th value, 198 tokens
    responses = list(range(1, 201))
    assert L.quantile(responses, 0.99) == 198
    s = L.length_settings([70, 95, 101], responses)
    assert s["max_prompt_length"] == 104          # 101 rounded up to a multiple of 8
    assert s["response_length"] == 200            # 198 -> 200
    assert s["max_length"] == 304                 # 101 + 198 = 299 -> 304
    assert s["response_p99"] == 198 and s["longest_response"] == 200
    # a very long tail is capped: rollouts cost time per sampled token; with every answer
    # longer than the cap, the short-answer floor is off
    capped = L.length_settings([5], [4000] * 10)
    assert (capped["response_length"], capped["min_response_length"]) == (L.MAX_RESPONSE_LENGTH, 1)
    assert L.length_settings([5], [40, 600])["min_response_length"] == 40


def test_fit_context_shortens_the_answer_first() -> None:
    s = L.length_settings([70, 95, 101], list(range(1, 201)))
    assert L.context_for(s) == 320               # max(104 + 200, 304) = 304 -> 320
    fitted = L.fit_context(s, 256)
    # the prompt limit keeps the longest prompt (101), the answer gets the rest (155)
    assert (fitted["max_prompt_length"], fitted["response_length"], fitted["max_length"]) == (101, 155, 256)
    assert L.fit_context(s, 1024) == s           # room enough: nothing changes
    # a shortest response that no longer fits under the answer's room turns the floor off (1):
    # else every answer that ends would count as short
    assert L.fit_context({**s, "min_response_length": 150}, 256)["min_response_length"] == 150
    assert L.fit_context({**s, "min_response_length": 180}, 256)["min_response_length"] == 1
    assert fitted["min_response_length"] == 1
    with pytest.raises(ValueError, match="longer context"):
        L.fit_context(s, 105)                     # 101-token prompts leave 4 < 8 tokens


def test_token_lengths_count_bos_and_eos_as_the_stages_encode_them(tmp_path) -> None:
    from ppo_core.data import encode_prompt, encode_response
    from ppo_core.models import train_tokenizer

    texts = ["the river is calm .", "tell me about the river .", "the garden is nice ."]
    tok = train_tokenizer(texts, None, vocab_size=300)
    prompts, responses = ["tell me about the river ."], [" the river is calm .", " the garden is nice ."]
    p, r = L.token_lengths(tok, prompts, responses)
    assert p == [len(encode_prompt(tok, prompts[0]))]
    assert r == [len(encode_response(tok, prompts[0], x)) for x in responses]
    assert encode_response(tok, prompts[0], responses[0])[-1] == tok.eos_token_id   # EOS counted
