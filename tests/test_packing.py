"""ppo_core.packing: row balancing, bookkeeping, and the check that guards packed forwards."""

from __future__ import annotations

import pytest
import torch

from ppo_core import packing
from ppo_core.generation import GenerationOutput
from ppo_core.models import build_scorer_from_causal_lm, build_tiny_causal_lm, train_tokenizer
from ppo_core.packing import balanced_bins, pack_episodes, supports_packing

torch.set_num_threads(1)
PAD = 0


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the river is calm .", "describe the old garden ."] * 10, None, vocab_size=280)


def _gen() -> GenerationOutput:
    """Three episodes: left-padded prompts of 2, 4, 3 tokens; responses of 3, 1, 1 tokens."""
    seq = torch.tensor([[PAD, PAD, 11, 12, 21, 22, 23],
                        [13, 14, 15, 16, 24, PAD, PAD],
                        [PAD, 17, 18, 19, 25, PAD, PAD]])
    mask = (seq != PAD).long()
    return GenerationOutput(sequences=seq, attention_mask=mask, responses=seq[:, 4:],
                            response_mask=mask[:, 4:].bool(), ended=torch.tensor([False] * 3),
                            logprobs=None, prompt_length=4)


def test_balanced_bins_cover_every_item_within_capacity() -> None:
    lengths = [30, 7, 22, 15, 15, 4, 40, 9]
    bins = balanced_bins(lengths, capacity=50)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 50 and len(bins) == 3          # 142 tokens: the fewest rows of 50
    assert max(loads) - min(loads) <= 15                 # about equally full
    assert balanced_bins([70, 5], capacity=50) == [[0], [1]]   # a long item gets its own row
    # items over half the capacity: one per row beats rows padded to the capacity
    assert len(balanced_bins([140, 135, 138, 120], capacity=256)) == 4
    assert balanced_bins([], 8) == []


def test_pack_episodes_bookkeeping() -> None:
    gen = _gen()
    p = pack_episodes(gen, capacity=64, pad_token_id=PAD)
    flat = p.input_ids.flatten()
    assert p.tokens == 5 + 5 + 4 and p.input_ids.shape == (1, 14) and p.positions == 14
    # the token at `before` is the one each response token follows; `last` is the last token
    assert p.targets.tolist() == [21, 22, 23, 24, 25]
    assert flat[p.before].tolist() == [12, 21, 22, 16, 19]
    assert flat[p.last].tolist() == [23, 24, 25]
    # positions restart at 0 per episode; no attention across episodes
    seg = torch.full((14,), -1)
    for b, n in enumerate((5, 5, 4)):
        first = int(p.last[b]) - n + 1
        assert p.position_ids.flatten()[first:first + n].tolist() == list(range(n))
        seg[first:first + n] = b
    allowed = p.allowed[0, 0]
    assert torch.equal(allowed, (seg[:, None] == seg[None, :]) & torch.ones(14, 14).tril().bool())
    grid = p.to_response_grid(torch.arange(1.0, 6.0))
    assert grid.tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0]]
    # capacity 9: three rows of 5 (15 positions) beat two of 9 (18); the 4-token episode's
    # row ends in one padding position, which attends only to itself
    p2 = pack_episodes(gen, capacity=9, pad_token_id=PAD)
    assert p2.input_ids.shape == (3, 5) and p2.tokens == 14
    pad_row, pad_col = (p2.input_ids == PAD).nonzero()[0].tolist()
    assert p2.allowed[pad_row, 0, pad_col].nonzero().flatten().tolist() == [pad_col]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_supported_architectures_pass_the_check(tok, arch: str) -> None:
    lm = build_tiny_causal_lm(tok, arch=arch, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    assert supports_packing(lm, "lm", tok.pad_token_id)
    lm.config._attn_implementation = "eager"
    assert supports_packing(lm, "lm", tok.pad_token_id)


def test_check_refuses_what_packing_would_get_wrong(tok, tmp_path, monkeypatch) -> None:
    lm = build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    scorer = build_scorer_from_causal_lm(tmp_path / "lm", seed=0)
    assert supports_packing(scorer, "scorer", tok.pad_token_id)
    # a model that rescales its logits inside forward (Gemma-2 style soft-capping) differs
    # from trunk + head: refused
    plain_forward = type(lm).forward

    def capped(self, *args, **kwargs):
        out = plain_forward(self, *args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    monkeypatch.setattr(type(lm), "forward", capped)
    assert not supports_packing(lm, "lm", tok.pad_token_id)
    monkeypatch.undo()
    # an attention kernel without 4D masks (flash-attention) is refused without a forward
    monkeypatch.setattr(packing, "_implementation", lambda model: "flash_attention_2")
    assert not supports_packing(lm, "lm", tok.pad_token_id)
