"""ppo_core.models, ppo_core.config and ppo_core.data: tokenizer, tiny models, loading, scoring."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from ppo_core.config import ConfigError, from_dict, load_config, save_config, to_dict
from ppo_core.data import (
    IGNORE_INDEX,
    StepSampler,
    collate_pairs,
    encode_pair,
    encode_prompt,
    encode_prompt_response,
    eval_shards,
    pad_sequences,
    rank_micro_batches,
)
from ppo_core.models import (
    IMPLICIT_REWARD_FILE,
    ModelLoadError,
    build_base_model,
    build_scorer_from_causal_lm,
    build_tiny_causal_lm,
    disable_dropout,
    implicit_reward_spec,
    last_token_index,
    last_token_scores,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    position_ids_from_mask,
    sequence_logprobs,
    token_values,
    train_tokenizer,
    training_dropout,
)

torch.set_num_threads(1)

TEXTS = [
    "tell me about the river .", "the river is nice .", "describe the garden please .",
    "the garden is lovely . the robot is old .", "what do you think of the coffee today .",
    "the coffee is awful .",
] * 5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny save_pretrained dir built the way the base_model asset builds it."""
    out = tmp_path_factory.mktemp("base")
    return build_base_model(TEXTS, out, size="tiny", vocab_size=300)


def test_train_tokenizer_has_special_tokens_and_roundtrips(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, tmp_path, vocab_size=300)
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    text = "the robot is lovely ."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]).strip() == text
    # Reloads as a normal HF tokenizer with the same special tokens.
    again = load_tokenizer(tmp_path)
    assert isinstance(again, PreTrainedTokenizerFast)
    assert (again.pad_token, again.eos_token) == (tok.pad_token, tok.eos_token)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_build_tiny_causal_lm_forward_and_save_load(tmp_path: Path, arch: str) -> None:
    tok = train_tokenizer(TEXTS, None, vocab_size=300)
    model = build_tiny_causal_lm(tok, arch=arch, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    ids = torch.tensor([tok("the river is nice .")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_causal_lm(tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, logits)


def test_build_tiny_rejects_bad_heads() -> None:
    tok = train_tokenizer(TEXTS, None, vocab_size=300)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_causal_lm(tok, n_embd=30, n_head=4)


def test_scorer_from_causal_lm_scores_last_real_token(base_dir: Path) -> None:
    tok = load_tokenizer(base_dir)
    scorer = build_scorer_from_causal_lm(base_dir, pad_token_id=tok.pad_token_id)
    seqs = [encode_prompt_response(tok, "tell me about the river .", r, 64).input_ids
            for r in ("the river is nice .", "the river is nice . the coffee is awful .")]
    right_ids, right_mask = pad_sequences(seqs, tok.pad_token_id, side="right")
    left_ids, left_mask = pad_sequences(seqs, tok.pad_token_id, side="left")
    right = last_token_scores(scorer, right_ids, right_mask)
    left = last_token_scores(scorer, left_ids, left_mask)
    # Left/right padding must give the same scores (positions come from the mask).
    torch.testing.assert_close(right, left, atol=1e-5, rtol=1e-4)
    # And equal the score of each sequence alone, unpadded.
    alone = torch.stack([last_token_scores(scorer, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                         for s in seqs])
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)
    values = token_values(scorer, right_ids, right_mask)
    assert values.shape == right_ids.shape


def test_scorer_saves_and_reloads_as_sequence_classifier(base_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(base_dir)
    scorer = build_scorer_from_causal_lm(base_dir, pad_token_id=tok.pad_token_id)
    scorer.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    again = load_sequence_scorer(tmp_path)
    ids = torch.tensor([encode_prompt(tok, "the river is nice .")])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(last_token_scores(again, ids, mask), last_token_scores(scorer, ids, mask))
    assert again.config.num_labels == 1


def test_a_bf16_checkpoint_loads_in_fp32_for_training(base_dir: Path, tmp_path: Path) -> None:
    # most hub checkpoints are bf16; transformers 5 would keep that dtype, and Adam steps of
    # 1e-4 on bf16 weights round away: the optimizer must see fp32 (DeepSpeed casts for bf16 runs)
    tok = load_tokenizer(base_dir)
    load_causal_lm(base_dir).to(torch.bfloat16).save_pretrained(tmp_path / "lm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "lm")
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["dtype"] == "bfloat16"
    lm = load_causal_lm(tmp_path / "lm")
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    assert {p.dtype for p in load_sequence_scorer(tmp_path / "lm", pad_token_id=tok.pad_token_id).parameters()} == {
        torch.float32}
    assert {p.dtype for p in load_causal_lm(tmp_path / "lm", dtype=None).parameters()} == {torch.bfloat16}
    # what fp32 loading avoids: the same Adam step moves an fp32 weight and leaves a bf16 one
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.nn.Parameter(torch.full((4,), 0.05, dtype=dtype))
        before = w.detach().clone()
        opt = torch.optim.AdamW([w], lr=1e-4, weight_decay=0.0)
        w.grad = torch.ones_like(w)
        opt.step()
        changed[dtype] = bool((w.detach() != before).any())
    assert changed == {torch.float32: True, torch.bfloat16: False}


def test_position_ids_and_last_index() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert last_token_index(mask).tolist() == [4, 2]


def test_disable_dropout_zeroes_modules_and_config(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, None, vocab_size=300)
    model = build_tiny_causal_lm(tok, arch="gpt2", n_layer=1, n_embd=32, n_head=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    model.config.resid_pdrop = 0.3
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.resid_pdrop == 0.0


class _AddOne(torch.nn.Module):
    """A block whose update to the residual stream is all ones."""

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (hidden_states + 1.0,)


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"num_hidden_layers": 1})()
        self.layers = torch.nn.ModuleList([_AddOne()])

    def get_decoder(self) -> torch.nn.Module:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)[0]


def test_training_dropout_drops_the_block_update_not_the_stream() -> None:
    """p = 0.5 on an update of ones: each element gets 0 or 1 / (1 - 0.5) = 2 added in train(),
    exactly 1 in eval(); the input itself (3.0) is never dropped."""
    model = _Blocks()
    assert training_dropout(model, 0.5) == 1
    x = torch.full((4, 64), 3.0)
    torch.manual_seed(0)
    out = model.train()(x)
    assert set(out.unique().tolist()) == {3.0, 5.0}
    assert 0.3 < float((out == 5.0).float().mean()) < 0.7  # 256 draws of p = 0.5
    torch.testing.assert_close(model.eval()(x), torch.full((4, 64), 4.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        training_dropout(_Blocks(), 1.0)
    assert training_dropout(_Blocks(), 0.0) == 0
    with pytest.raises(ValueError, match="already applied"):
        training_dropout(model, 0.5)
    post_ln = _Blocks()
    post_ln.config.do_layer_norm_before = False
    with pytest.raises(ValueError, match="pre-LayerNorm"):
        training_dropout(post_ln, 0.1)


def test_unknown_model_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(missing))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(missing))


def test_tokenizer_without_eos_is_rejected(tmp_path: Path) -> None:
    tok = train_tokenizer(TEXTS, None, vocab_size=300)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token)
    no_eos.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no EOS token"):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- data


def test_prompt_is_masked_and_eos_appended(base_dir: Path) -> None:
    tok = load_tokenizer(base_dir)
    enc = encode_prompt_response(tok, "tell me about the river .", "the river is nice .", 64)
    n_prompt = len(encode_prompt(tok, "tell me about the river ."))
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tok.eos_token_id and not enc.truncated
    short = encode_prompt_response(tok, "tell me about the river .", "the river is nice . " * 10, 12)
    assert len(short.input_ids) == 12 and short.truncated


def test_pad_sequences_sides() -> None:
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_value=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_pairs_stacks_chosen_then_rejected(base_dir: Path) -> None:
    tok = load_tokenizer(base_dir)
    pairs = [encode_pair(tok, "describe the garden .", "the garden is lovely .", "the garden is ugly .", 64, 0.5)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["margin"].tolist() == [0.5]
    assert batch["input_ids"][0, : len(pairs[0].chosen_ids)].tolist() == pairs[0].chosen_ids


def test_collate_pairs_marks_each_sides_response(base_dir: Path) -> None:
    """The response mask starts after each side's own prompt: over the budget, the longer side's
    prompt is cut further from the left (ppo_core.data.encode_prompt_response)."""
    tok = load_tokenizer(base_dir)
    prompt = "describe the garden please ."
    p_len = len(encode_prompt(tok, prompt))
    short, long = "the river .", "the garden is lovely and the river is nice ."
    pairs = [encode_pair(tok, prompt, short, long, 64), encode_pair(tok, prompt, long, short, 16)]
    assert pairs[0].prompt_lengths == (p_len, p_len)
    cut = [encode_prompt_response(tok, prompt, text, 16).labels.count(IGNORE_INDEX) for text in (long, short)]
    assert pairs[1].prompt_lengths == tuple(cut) and cut[0] < cut[1] <= p_len
    batch = collate_pairs(pairs, tok.pad_token_id)
    resp, width = batch["response_mask"], batch["input_ids"].shape[1]
    assert resp.dtype == torch.bool and resp.shape == batch["input_ids"].shape
    rows = [(pairs[0].chosen_ids, p_len), (pairs[1].chosen_ids, cut[0]),
            (pairs[0].rejected_ids, p_len), (pairs[1].rejected_ids, cut[1])]
    for row, (ids, start) in zip(resp.tolist(), rows):
        assert row == [False] * start + [True] * (len(ids) - start) + [False] * (width - len(ids))


class _ConstantLM(torch.nn.Module):
    """Every position predicts the same distribution, softmax(``logits``)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_: object) -> object:
        from types import SimpleNamespace

        self.kept = logits_to_keep
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], logits_to_keep or input_ids.shape[1], -1))


def test_sequence_logprobs_by_hand() -> None:
    """p = (1/4, 1/4, 1/2) at every position. A token counts when the score mask marks it and it
    and the token before it are real: a left-padded row's first real token never counts."""
    import math

    lm = _ConstantLM([0.0, 0.0, math.log(2)])
    ids = torch.tensor([[1, 2, 2, 0], [0, 1, 1, 2], [0, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]])
    score = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    expected = [2 * math.log(0.5),                      # row 0: tokens 2, 2 (the pad is not real)
                math.log(0.25) + math.log(0.5),         # row 1: tokens 1, 2
                2 * math.log(0.5)]                      # row 2: the first real token is skipped
    torch.testing.assert_close(sequence_logprobs(lm, ids, mask, score), torch.tensor(expected))
    assert lm.kept == 4  # the first scored column is 1: logits of positions 0-3
    # scoring from column 2 on: the head runs on positions 1-3 only, the sums are those of columns 2-3
    late = score & (torch.arange(4) >= 2)
    expected = [math.log(0.5), math.log(0.25) + math.log(0.5), 2 * math.log(0.5)]  # row 0: column 2 only
    torch.testing.assert_close(sequence_logprobs(lm, ids, mask, late), torch.tensor(expected))
    assert lm.kept == 3
    assert sequence_logprobs(lm, ids, mask, torch.zeros_like(score)).tolist() == [0.0, 0.0, 0.0]


def test_implicit_reward_by_hand_and_its_spec(tmp_path: Path) -> None:
    """ImplicitReward = beta x sum over response tokens of log p_model - log p_ref; the spec
    file says which directories hold one."""
    import math

    from ppo_core.rewards import ImplicitReward

    model, ref = _ConstantLM([0.0, 0.0, math.log(2)]), _ConstantLM([0.0, 0.0, 0.0])
    ids, mask = torch.tensor([[0, 1, 2, 2]]), torch.ones(1, 4, dtype=torch.long)
    response = torch.tensor([[False, False, True, True]])
    # tokens 2, 2: (log 1/2 - log 1/3) twice
    torch.testing.assert_close(ImplicitReward(model, ref, beta=0.5)([], [], ids, mask, response_mask=response),
                               torch.tensor([0.5 * 2 * math.log(1.5)]))
    torch.testing.assert_close(ImplicitReward(ref, ref, beta=0.5)([], [], ids, mask, response_mask=response),
                               torch.zeros(1))
    with pytest.raises(ValueError, match="response_mask"):
        ImplicitReward(model, ref, beta=0.5)([], [], ids, mask)
    assert implicit_reward_spec(tmp_path) is None and implicit_reward_spec("gpt2") is None
    (tmp_path / IMPLICIT_REWARD_FILE).write_text(json.dumps({"beta": 0.1, "reference_model": "/m/sft"}))
    assert implicit_reward_spec(tmp_path) == {"beta": 0.1, "reference_model": "/m/sft"}
    (tmp_path / IMPLICIT_REWARD_FILE).write_text(json.dumps({"beta": 0, "reference_model": "/m/sft"}))
    with pytest.raises(ModelLoadError, match="beta must be > 0"):
        implicit_reward_spec(tmp_path)
    (tmp_path / IMPLICIT_REWARD_FILE).write_text(json.dumps({"beta": 0.1}))
    with pytest.raises(ModelLoadError, match="reference_model"):
        implicit_reward_spec(tmp_path)


def test_step_sampler_is_deterministic_and_covers_each_epoch() -> None:
    sampler = StepSampler(n=10, batch_size=3, seed=7)
    assert sampler.steps_per_epoch == 3
    epoch0 = [i for s in range(3) for i in sampler.batch(s)]
    assert len(set(epoch0)) == 9  # one example dropped per epoch (drop_last)
    assert StepSampler(10, 3, 7).batch(4) == sampler.batch(4)  # a fresh sampler (resume) agrees
    assert sampler.batch(3) != sampler.batch(0)  # epochs reshuffle
    with pytest.raises(ValueError, match="fewer than batch_size"):
        StepSampler(n=2, batch_size=3, seed=0)


def test_rank_micro_batches_and_eval_shards() -> None:
    idx = list(range(8))
    assert rank_micro_batches(idx, rank=1, world_size=2, micro_batch_size=2) == [[4, 5], [6, 7]]
    shards = [eval_shards(5, r, 2, batch_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # same forward count on every rank
    assert sorted(i for s in shards for b in s for i in b) == list(range(5))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _Inner:
    stage: int = 2
    """a nested field"""
    seed: int = 42
    """another"""


@dataclass(frozen=True)
class _Cfg:
    path: str
    """required"""
    lr: float = 1e-3
    """a float"""
    betas: tuple[float, float] = (0.9, 0.999)
    """a tuple"""
    resume: str | None = None
    """optional"""
    inner: _Inner = field(default_factory=_Inner)
    """nested"""
    own: _Inner = field(default_factory=lambda: _Inner(stage=0))
    """nested, with a default of its own"""


def test_load_config_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"path": "x", "lr": 1, "inner": {"stage": 3}}))
    cfg = load_config(_Cfg, tmp_path / "c.json")
    assert cfg == _Cfg(path="x", lr=1.0, inner=_Inner(stage=3)) and isinstance(cfg.lr, float)
    (tmp_path / "c.yaml").write_text("path: y\nbetas: [0.8, 0.9]\nresume: latest\n")
    cfg = load_config(_Cfg, tmp_path / "c.yaml")
    assert cfg.betas == (0.8, 0.9) and cfg.resume == "latest"
    save_config(cfg, tmp_path / "round.json")
    assert load_config(_Cfg, tmp_path / "round.json") == cfg
    assert to_dict(cfg)["inner"] == {"stage": 2, "seed": 42}


def test_a_partial_nested_mapping_keeps_the_fields_own_default() -> None:
    """PPOConfig's strategy defaults to ZeRO-0 while StrategyConfig's own default is ZeRO-2:
    ``{"cpu_threads": 1}`` must change the threads only."""
    assert from_dict(_Cfg, {"path": "x", "own": {"seed": 1}}).own == _Inner(stage=0, seed=1)
    assert from_dict(_Cfg, {"path": "x", "inner": {"seed": 1}}).inner == _Inner(stage=2, seed=1)
    from ppo_core.ppo import PPOConfig

    cfg = from_dict(PPOConfig, {"policy_path": "p", "train_file": "t", "output_dir": "o",
                                "reward_model_path": "r", "strategy": {"cpu_threads": 1}})
    assert (cfg.strategy.zero_stage, cfg.strategy.cpu_threads) == (0, 1)


def test_load_config_rejects_unknown_and_mistyped_keys(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"path": "x", "learning_rte": 0.1}))
    with pytest.raises(ConfigError, match=r"bad.json.*unknown key.*learning_rte"):
        load_config(_Cfg, tmp_path / "bad.json")
    with pytest.raises(ConfigError, match=r"inner.*unknown key.*stag"):
        from_dict(_Cfg, {"path": "x", "inner": {"stag": 1}})
    with pytest.raises(ConfigError, match="lr: expected a number"):
        from_dict(_Cfg, {"path": "x", "lr": "fast"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(_Cfg, tmp_path / "missing.json")


def test_auto_size_follows_the_token_count(tmp_path: Path) -> None:
    from ppo_core.models import AUTO_SIZES, auto_size, build_base_model

    assert auto_size(0) == {"n_layer": 2, "n_embd": 128, "n_head": 4}
    assert auto_size(999_999) == auto_size(0)
    assert auto_size(1_000_000) == {"n_layer": 4, "n_embd": 192, "n_head": 6}
    assert auto_size(10**9) == AUTO_SIZES[-1][1]
    texts = ["the river is nice .", "the mountain is old ."] * 20
    # a partial mapping: the given entries win, the rest come from the automatic choice
    build_base_model(texts, tmp_path / "m", size={"n_layer": 3, "n_embd": 0, "n_head": 0}, vocab_size=300)
    import json as _json

    cfg = _json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (3, 128, 4)
    with pytest.raises(ValueError, match="choose 'auto'"):
        build_base_model(texts, tmp_path / "x", size="huge")
