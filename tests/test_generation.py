"""The KV-cache sampler against Hugging Face generate and a full recompute (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ppo_core.generation import filter_logits, sample
from ppo_core.ppo_utils import logprobs_from_logits, position_ids_from_mask

PAD, VOCAB = 0, 64


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


class DoubledLlama(LlamaForCausalLM):
    """Rescales its logits inside forward, as soft-capping models do."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def tiny_llama_doubled() -> DoubledLlama:
    config = tiny_llama().config
    torch.manual_seed(0)
    return DoubledLlama(config).eval()


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def test_position_ids_skip_left_padding():
    _, mask = left_padded([[5, 6, 7], [8]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama, tiny_llama_doubled])
def test_greedy_matches_hf_generate(factory):
    model = factory()
    ids, mask = left_padded(PROMPTS)
    # eos id that no row emits, so both run the full length
    out = sample(model, ids, mask, max_new_tokens=8, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                 temperature=0.0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(out.responses, ref[:, ids.shape[1]:])
    assert out.response_mask.all() and not out.ended.any()


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_left_padding_does_not_change_a_row(factory):
    model = factory()
    ids, mask = left_padded(PROMPTS)
    batched = sample(model, ids, mask, max_new_tokens=6, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                     temperature=0.0)
    alone_ids, alone_mask = left_padded([PROMPTS[1]])
    alone = sample(model, alone_ids, alone_mask, max_new_tokens=6, eos_token_id=VOCAB + 1,
                   pad_token_id=PAD, temperature=0.0)
    assert torch.equal(batched.responses[1], alone.responses[0])
    torch.testing.assert_close(batched.logprobs[1], alone.logprobs[0], atol=1e-5, rtol=1e-5)


def test_logprobs_match_full_forward_with_temperature():
    model = tiny_gpt2()
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(1)
    out = sample(model, ids, mask, max_new_tokens=7, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                 temperature=0.7)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=out.attention_mask,
                       position_ids=position_ids_from_mask(out.attention_mask)).logits
    P = out.prompt_length
    recomputed = logprobs_from_logits(logits[:, P - 1:-1], out.responses, temperature=0.7)
    torch.testing.assert_close(out.logprobs, recomputed, atol=1e-5, rtol=1e-5)
    # the temperature matters: without it the log-probs differ
    assert not torch.allclose(out.logprobs, logprobs_from_logits(logits[:, P - 1:-1], out.responses))


def test_stops_each_row_at_eos_and_pads_after():
    model = tiny_gpt2()
    ids, mask = left_padded(PROMPTS)
    free = sample(model, ids, mask, max_new_tokens=8, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                  temperature=0.0)
    eos = int(free.responses[0, 2])  # row 0 emits this token at step 2: call it EOS
    out = sample(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD,
                 temperature=0.0)
    for row in range(len(PROMPTS)):
        hits = (free.responses[row] == eos).nonzero()
        cut = int(hits[0]) + 1 if len(hits) else free.responses.shape[1]
        assert out.response_mask[row].sum().item() == cut
        assert out.ended[row].item() == bool(len(hits))
        assert torch.equal(out.responses[row, :cut], free.responses[row, :cut])
        assert (out.responses[row, cut:] == PAD).all()
        assert (out.logprobs[row, cut:] == 0).all()
    assert out.attention_mask[:, ids.shape[1]:].bool().equal(out.response_mask)


def test_dropping_ended_rows_changes_nothing(monkeypatch):
    import ppo_core.generation as generation

    compactions: list[bool] = []
    should = generation._should_compact
    monkeypatch.setattr(generation, "_should_compact",
                        lambda *a: compactions.append(should(*a)) or compactions[-1])
    model = tiny_llama()   # the random tiny GPT-2 repeats one token per row under greedy
    ids, mask = left_padded(PROMPTS + [[7, 8], [20, 21, 22, 23, 24], [30]])
    kw = dict(max_new_tokens=8, pad_token_id=PAD, temperature=0.0)
    free = sample(model, ids, mask, eos_token_id=VOCAB + 1, **kw)
    # call EOS the token that ends the most rows before the last step
    early = free.responses[:, :-1]
    eos = max(range(VOCAB), key=lambda v: int((early == v).any(1).sum()))
    kept = sample(model, ids, mask, eos_token_id=eos, compact=False, **kw)
    dropped = sample(model, ids, mask, eos_token_id=eos, compact=True, **kw)
    lengths = kept.response_mask.sum(1)
    assert lengths.min() < lengths.max() and any(compactions)   # compaction ran
    for name in ("sequences", "attention_mask", "responses", "response_mask", "ended"):
        assert torch.equal(getattr(kept, name), getattr(dropped, name)), name
    torch.testing.assert_close(kept.logprobs, dropped.logprobs, atol=1e-5, rtol=1e-5)


def test_stops_early_when_every_row_ended():
    model = tiny_gpt2()
    ids, mask = left_padded(PROMPTS)
    first = sample(model, ids, mask, max_new_tokens=1, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                   temperature=0.0)
    if len(set(first.responses[:, 0].tolist())) != 1:
        ids, mask = left_padded([PROMPTS[0], PROMPTS[0]])
        first = sample(model, ids, mask, max_new_tokens=1, eos_token_id=VOCAB + 1,
                       pad_token_id=PAD, temperature=0.0)
    out = sample(model, ids, mask, max_new_tokens=10, eos_token_id=int(first.responses[0, 0]),
                 pad_token_id=PAD, temperature=0.0)
    assert out.responses.shape[1] == 1 and out.ended.all()


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_gpt2()
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=6, eos_token_id=VOCAB + 1, pad_token_id=PAD, temperature=1.0)
    a = sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.responses, b.responses)
    greedy = sample(model, ids, mask, max_new_tokens=6, eos_token_id=VOCAB + 1, pad_token_id=PAD,
                    temperature=0.0)
    top1 = sample(model, ids, mask, top_k=1, **kw)
    assert torch.equal(top1.responses, greedy.responses)


def test_filter_logits_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    # 0.5 < 0.7 so the second token is needed; 0.8 >= 0.7 so the rest go
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3)).sum().item() == 3


def test_bad_shapes_rejected():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3), max_new_tokens=0,
               eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"\(B, P\)"):
        sample(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4), max_new_tokens=2,
               eos_token_id=2, pad_token_id=PAD)


# ------------------------------------------------------------------ fast decode (Llama layout)

def tiny_qwen2_gqa():
    """Grouped KV heads and q/k/v biases: the Llama-layout variants FastDecoder covers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2_gqa])
def test_fast_decode_samples_what_the_hf_path_samples(factory):
    from ppo_core.fast_decode import supports_fast_decode

    model = factory()
    assert supports_fast_decode(model)
    ids, mask = left_padded(PROMPTS + [[7, 8], [20, 21, 22, 23, 24], [30]])
    kw = dict(max_new_tokens=10, pad_token_id=PAD, temperature=0.9)
    free = sample(model, ids, mask, eos_token_id=VOCAB + 1, fast=False, **kw)
    eos = int(free.responses[0, 3])  # ends some rows early, so rows are dropped mid-way
    runs = {}
    for fast in (False, True):
        runs[fast] = sample(model, ids, mask, eos_token_id=eos, fast=fast,
                            generator=torch.Generator().manual_seed(3), **kw)
    hf, fast = runs[False], runs[True]
    assert hf.response_mask.sum(1).min() < hf.response_mask.sum(1).max()
    for name in ("sequences", "attention_mask", "responses", "response_mask", "ended"):
        assert torch.equal(getattr(hf, name), getattr(fast, name)), name
    torch.testing.assert_close(fast.logprobs, hf.logprobs, atol=1e-5, rtol=1e-5)


def test_fast_decode_refuses_models_it_does_not_reproduce():
    from peft import LoraConfig, get_peft_model

    from ppo_core.fast_decode import _structure_problem, supports_fast_decode

    assert not supports_fast_decode(tiny_gpt2())
    assert "LoRA" in _structure_problem(get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).get_base_model())
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    assert "sliding" in _structure_problem(windowed)
    # Llama-shaped but rescaling its logits: only the numeric check can tell (it still
    # samples like model.generate through the HF path: test_greedy_matches_hf_generate)
    doubled = tiny_llama_doubled()
    assert _structure_problem(doubled) is None and not supports_fast_decode(doubled)
    with pytest.raises(ValueError, match="does not reproduce DoubledLlama"):
        sample(doubled, *left_padded(PROMPTS), max_new_tokens=2, eos_token_id=VOCAB + 1,
               pad_token_id=PAD, fast=True)


def test_fast_decode_fallback_is_logged_once_with_its_reason(caplog, monkeypatch):
    """A failing check falls back to the HF path, logged once per (class, reason) at WARNING
    with the exception; an uncovered layout (GPT-2) is logged once at INFO."""
    import logging

    from ppo_core import fast_decode as fd

    monkeypatch.setattr(fd, "_LOGGED", set())

    def broken(cls, *args, **kwargs):
        raise RuntimeError("cache layout changed")

    monkeypatch.setattr(fd.FastDecoder, "after", classmethod(broken))
    caplog.set_level(logging.INFO, logger="ppo_core.fast_decode")
    first, second = tiny_llama(), tiny_llama()
    assert not fd.supports_fast_decode(first) and not fd.supports_fast_decode(second)
    assert not fd.supports_fast_decode(first)
    records = [r for r in caplog.records if r.name == "ppo_core.fast_decode"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "LlamaForCausalLM" in records[0].getMessage()
    assert "RuntimeError: cache layout changed" in records[0].getMessage()
    # the sampler still runs (HF path); insisting on the fast path names the reason
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=2, eos_token_id=VOCAB + 1, pad_token_id=PAD, temperature=0.0)
    assert sample(first, ids, mask, **kw).responses.shape == (3, 2)
    with pytest.raises(ValueError, match="cache layout changed"):
        sample(first, ids, mask, fast=True, **kw)

    caplog.clear()
    assert not fd.supports_fast_decode(tiny_gpt2()) and not fd.supports_fast_decode(tiny_gpt2())
    records = [r for r in caplog.records if r.name == "ppo_core.fast_decode"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "GPT2LMHeadModel" in records[0].getMessage()
    assert "no .model trunk" in records[0].getMessage()


def test_fast_decode_rope_check_reads_transformers_4_and_5_fields():
    """transformers 5 names the RoPE variant in ``rope_parameters``, 4.x in ``rope_scaling``
    (``rope_type``, or ``type`` in older configs); a dynamic variant must be refused in both."""
    from types import SimpleNamespace

    from ppo_core.fast_decode import _rope_types, _structure_problem

    assert _rope_types(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4})) == ["default"]
    assert _rope_types(SimpleNamespace(rope_theta=1e4, rope_scaling=None)) == ["default"]
    assert _rope_types(SimpleNamespace(rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0})) == ["dynamic"]
    per_layer = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "longrope"}}
    assert _rope_types(SimpleNamespace(rope_parameters=per_layer)) == ["default", "longrope"]
    # a Llama whose config has the transformers 4.x fields only
    model = tiny_llama()
    model.config = SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert _structure_problem(model) == "rope_type 'dynamic'"
    model.config = SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert _structure_problem(model) is None
