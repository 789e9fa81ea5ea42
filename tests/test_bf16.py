"""PPO with ``strategy.bf16``: bf16 engines with fp32 master weights, bf16 frozen models, and
every log-prob, value and advantage in float32 (tiny random models on CPU).

DeepSpeed's bf16 on one CPU rank: the engine casts its module to bf16 and its optimizer
steps fp32 copies of the weights (stage 0: ``FP16_UnfusedOptimizer`` with one fp32 tensor per
weight; ZeRO-1/2: ``DeepSpeedZeroOptimizer`` with one flat fp32 partition per group), writing
them back to the module rounded to bf16 after every step.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppo_core import fast_decode as fd
from ppo_core.generation import sample
from ppo_core.models import load_causal_lm
from ppo_core.ppo import PPOConfig, PPOTrainer, train
from ppo_core.ppo_utils import entropy_from_logits, logprobs_from_logits
from ppo_core.strategy import DeepSpeedStrategy
from test_generation import PAD, PROMPTS, VOCAB, left_padded, tiny_llama, tiny_llama_doubled
from test_ppo import Recorder, small_cfg, tiny_run  # noqa: F401  (tiny_run is a fixture)

# bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-8 of itself
BF16_ROUNDING = 2.0**-8


def bf16_cfg(tiny_run: dict[str, str], out: Path, stage: int, **over) -> PPOConfig:
    return small_cfg(tiny_run, out, strategy={"zero_stage": stage, "bf16": True}, **over)


def master_and_module_weights(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 master copy, bf16 module weight) pairs of a DeepSpeed bf16 engine on one rank."""
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2: flat partitions
        return [(master, flat[:master.numel()])
                for master, flat in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups_flat)]
    return [(master, weight) for masters, weights in zip(opt.fp32_groups, opt.fp16_groups)
            for master, weight in zip(masters, weights)]


# ---------------------------------------------------------------------------------------------
# float32 arithmetic on bf16 logits
# ---------------------------------------------------------------------------------------------
def test_logprobs_and_entropy_of_bf16_logits_are_computed_in_float32():
    """The temperature division and the normalisation run in float32: the result equals the
    float32 computation on the upcast bf16 logits, not a bf16-rounded one."""
    g = torch.Generator().manual_seed(0)
    logits = (8 * torch.randn(4, 6, 50, generator=g)).to(torch.bfloat16)  # LM-sized logits
    tokens = torch.randint(0, 50, (4, 6), generator=g)
    T = 0.7
    want = torch.log_softmax(logits.float() / T, -1)                    # (4, 6, 50)
    got = logprobs_from_logits(logits, tokens, T)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.gather(-1, tokens[..., None])[..., 0], atol=1e-5, rtol=0)
    ent = entropy_from_logits(logits, T)
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent, -(want.exp() * want).sum(-1), atol=1e-5, rtol=0)
    # what dividing in bf16 first would have given: off by far more than that
    rounded = torch.log_softmax((logits / T).float(), -1).gather(-1, tokens[..., None])[..., 0]
    assert (rounded - want.gather(-1, tokens[..., None])[..., 0]).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# the fast decoder on a bf16 model
# ---------------------------------------------------------------------------------------------
def test_fast_decoder_is_verified_in_the_models_dtype(monkeypatch, caplog):
    """A bf16 Llama decodes with the fast decoder, checked in bf16 to 4 bf16 ulps: the same
    tokens and log-probs as the Hugging Face path; a decoder one ulp off on every logit (another
    kernel's summation order) passes, a model rescaling its logits (doubled) does not."""
    from ppo_core.ppo_utils import verification_tolerance

    assert verification_tolerance(torch.float32) == 1e-4
    assert verification_tolerance(torch.bfloat16) == 4 * 2.0**-7
    model = tiny_llama().to(torch.bfloat16)
    assert fd.fast_decode_problem(model) is None
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=6, eos_token_id=VOCAB + 1, pad_token_id=PAD, temperature=0.9)
    runs = {fast: sample(model, ids, mask, fast=fast, generator=torch.Generator().manual_seed(1), **kw)
            for fast in (False, True)}
    assert torch.equal(runs[False].responses, runs[True].responses)
    assert runs[True].logprobs.dtype == torch.float32
    torch.testing.assert_close(runs[True].logprobs, runs[False].logprobs, atol=1e-5, rtol=0)

    step = fd.FastDecoder.step

    def one_ulp_up(self, *args, **kwargs):
        logits = step(self, *args, **kwargs)                         # (B, V) bf16
        return torch.nextafter(logits, torch.full_like(logits, math.inf))

    monkeypatch.setattr(fd.FastDecoder, "step", one_ulp_up)
    assert fd.fast_decode_problem(tiny_llama().to(torch.bfloat16)) is None  # a 1e-4 check fails it
    monkeypatch.setattr(fd.FastDecoder, "step", step)

    monkeypatch.setattr(fd, "_LOGGED", set())
    caplog.set_level(logging.WARNING, logger="ppo_core.fast_decode")
    doubled = tiny_llama_doubled().to(torch.bfloat16)
    problem = fd.fast_decode_problem(doubled)
    assert problem is not None and "bfloat16" in problem and "3.1e-02" in problem
    assert [r.levelno for r in caplog.records if r.name == "ppo_core.fast_decode"] == [logging.WARNING]


def test_packing_is_verified_in_the_models_dtype(monkeypatch):
    """Packed forwards of a bf16 model are checked against its padded forward in bf16: a packed
    LM head one bf16 ulp off passes (another GEMM shape may round so), doubled logits do not."""
    from ppo_core import packing as pk

    model = tiny_llama().to(torch.bfloat16)
    assert pk.packing_problem(model, "lm", PAD) is None
    head = pk.lm_logits

    def one_ulp_up(m: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        logits = head(m, hidden)                                       # (N, V) bf16
        return torch.nextafter(logits, torch.full_like(logits, math.inf))

    monkeypatch.setattr(pk, "lm_logits", one_ulp_up)
    assert pk.packing_problem(model, "lm", PAD) is None  # a 1e-4 check fails it
    monkeypatch.setattr(pk, "lm_logits", lambda m, h: 2 * head(m, h))
    problem = pk.packing_problem(model, "lm", PAD)
    assert problem is not None and "bfloat16" in problem


# ---------------------------------------------------------------------------------------------
# PPO on bf16 engines
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_trainer_keeps_fp32_masters_and_float32_statistics(tiny_run, tmp_path, stage):
    """bf16 engines with fp32 master weights, bf16 frozen models, float32 rollout tensors; the
    rollout's old log-probs (bf16 decoding) match a float32 forward of the same bf16 weights."""
    cfg = bf16_cfg(tiny_run, tmp_path / "out", stage)
    trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
    try:
        for t in (trainer.actor, trainer.critic):
            assert {p.dtype for p in t.module.parameters()} == {torch.bfloat16}
            pairs = master_and_module_weights(t.engine)
            assert pairs and all(m.dtype == torch.float32 and w.dtype == torch.bfloat16 for m, w in pairs)
            # the optimizer steps the fp32 copies (what AdamW's state is kept for)
            stepped = {p.dtype for g in t.engine.optimizer.optimizer.param_groups for p in g["params"]}
            assert stepped == {torch.float32}
        assert {p.dtype for p in trainer.ref.parameters()} == {torch.bfloat16}
        assert {p.dtype for p in trainer.reward.model.parameters()} == {torch.bfloat16}

        ro = trainer.rollout()
        for name in ("logprobs", "ref_logprobs", "values", "scores", "raw_scores", "kl", "rewards",
                     "advantages", "returns"):
            assert getattr(ro, name).dtype == torch.float32, name
        m = ro.gen.response_mask
        with torch.no_grad():
            fp32_policy = copy.deepcopy(trainer.actor.module).float()
            full, _ = trainer.policy_logprobs(fp32_policy, ro.gen)
            new, _ = trainer.policy_logprobs(trainer.actor.module, ro.gen)
        # The bf16 forward rounds activations to 8 bits: on this model (|logits / T| < 3) that
        # moves log-probs by ~1e-3. 2^-8 nats is above it and below a bf16 rounding of the
        # log-probs themselves (|log p| ~ 5.7 has a bf16 spacing of 2^-5), so a log-softmax
        # taken in bf16 could not pass.
        assert ((full - ro.logprobs) * m).abs().max() < BF16_ROUNDING
        # the first ratio exp(new - old) of the update: the same weights, so 1 up to that noise
        assert ((new - ro.logprobs) * m).abs().max() < BF16_ROUNDING
        assert ro.values.abs().sum() > 0 and torch.isfinite(ro.advantages).all()

        trainer.train_on(ro)
        for t in (trainer.actor, trainer.critic):
            # after a step the bf16 weights are the fp32 masters rounded
            for master, weight in master_and_module_weights(t.engine):
                assert torch.equal(master.to(torch.bfloat16), weight)
    finally:
        trainer.close()


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_ppo_run_completes_and_its_model_loads(tiny_run, tmp_path, stage):
    rec = Recorder()
    summary = train(bf16_cfg(tiny_run, tmp_path / "out", stage), [rec])
    assert len(rec.logs) == 2
    for key in ("objective/kl", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg",
                "policy/grad_norm", "val/grad_norm"):
        assert math.isfinite(rec.logs[-1][key]), key
    # step 1: policy == reference, both bf16; the KL is the bf16 noise between the decoding
    # and the scoring forward (< 2^-8 per token, test above) summed over <= 8 tokens
    assert abs(rec.logs[0]["objective/kl"]) < 8 * BF16_ROUNDING
    final = Path(summary["final_dir"])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["step"] == 2
    saved = load_file(final / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # the engine's bf16 weights
    before = load_file(Path(tiny_run["policy_path"]) / "model.safetensors")
    assert any(not torch.equal(before[k].to(torch.bfloat16), saved[k]) for k in before)
    model = load_causal_lm(final)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits.float()).all()
