"""The architecture matrix: GPT-2, Llama, Qwen2, GPT-NeoX and OPT built from their config
classes (random weights, 1 layer, width 32) through SFT, the reward model and PPO on the packed
and the padded paths; the builder behind the Dagster ``base_model`` asset for each
architecture; dropout off in the built modules."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from assets import bundled_task as bt
from ppo_core import models as M
from ppo_core.callbacks import Callback
from ppo_core.config import from_dict
from ppo_core.data import collate_pairs, encode_pair
from ppo_core.fast_decode import supports_fast_decode
from ppo_core.packing import packing_problem
from ppo_core.ppo import PPOConfig
from ppo_core.ppo import train as ppo_train
from ppo_core.reward import RewardConfig
from ppo_core.reward import train as rm_train
from ppo_core.sft import SFTConfig
from ppo_core.sft import train as sft_train

torch.set_num_threads(1)

MATRIX = ("gpt2", "llama", "qwen2", "gpt_neox", "opt")
# fast paths each architecture is verified for (bench/arch_matrix.py prints the same table):
# packing everywhere (every model here takes position_ids and a 4D mask); the fast decoder
# only for the Llama layout (RMSNorm, rotary, gated MLP: ppo_core.fast_decode)
FAST_DECODE = {"gpt2": False, "llama": True, "qwen2": True, "gpt_neox": False, "opt": False,
               "mistral": True}
MODEL_TYPE = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gpt_neox": "gpt_neox",
              "opt": "opt", "mistral": "mistral"}
DIMS = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128}


class Recorder(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, step, metrics) -> None:
        self.logs.append(dict(metrics))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SFT, RM and PPO files of the bundled task and one tokenizer for every architecture."""
    root = tmp_path_factory.mktemp("matrix_data")
    df = bt.generate_preferences(48, seed=3, corrupt_fraction=0.0)
    df[["prompt"]].assign(completion=df["chosen"]).iloc[:32].to_parquet(root / "sft_train.parquet")
    df[["prompt"]].assign(completion=df["chosen"]).iloc[32:].to_parquet(root / "sft_eval.parquet")
    df[["prompt", "chosen", "rejected"]].iloc[:32].to_parquet(root / "rm_train.parquet")
    df[["prompt", "chosen", "rejected"]].iloc[32:].to_parquet(root / "rm_eval.parquet")
    pd.DataFrame({"prompt": bt.all_prompts()[:32]}).to_parquet(root / "ppo_train.parquet")
    texts = list(df.prompt) + list(df.chosen) + list(df.rejected) + bt.all_prompts()
    tok = M.train_tokenizer(texts, root / "tokenizer", vocab_size=300)
    return {"root": root, "tok": tok}


@pytest.fixture(scope="module")
def stages(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per architecture (built on first use): base dir, SFT and RM summaries and first-step logs."""
    cache: dict[str, dict[str, Any]] = {}

    def run(arch: str) -> dict[str, Any]:
        if arch in cache:
            return cache[arch]
        out = tmp_path_factory.mktemp(arch)
        M.build_tiny_causal_lm(data["tok"], arch=arch, **DIMS).save_pretrained(out / "base")
        data["tok"].save_pretrained(out / "base")
        common = {"data_dir": str(data["root"]), "max_steps": 2, "batch_size": 8,
                  "micro_batch_size": 8, "eval_batch_size": 8, "save_steps": 0,
                  "strategy": {"zero_stage": 2}}
        sft_rec, rm_rec = Recorder(), Recorder()
        sft = sft_train(from_dict(SFTConfig, {**common, "output_dir": str(out / "sft"),
                                              "model_name_or_path": str(out / "base")}), [sft_rec])
        rm = rm_train(from_dict(RewardConfig, {**common, "output_dir": str(out / "rm"), "kind": "scalar",
                                               "model_name_or_path": sft["final_model_dir"]}), [rm_rec])
        cache[arch] = {"base": out / "base", "sft": sft, "rm": rm, "sft_logs": sft_rec.logs,
                       "rm_logs": rm_rec.logs, "out": out}
        return cache[arch]

    return run  # type: ignore[return-value]


@pytest.mark.parametrize("arch", MATRIX)
def test_sft_and_reward_model_train_each_architecture(arch: str, stages, data) -> None:
    run = stages(arch)
    vocab = len(data["tok"])
    # random init (std 0.02 weights): near-uniform next-token distribution, loss ~ ln(V)
    assert run["sft"]["completed"] and run["sft"]["step"] == 2
    assert abs(run["sft_logs"][0]["train/loss"] - math.log(vocab)) < 0.05
    assert run["rm"]["completed"] and run["rm"]["step"] == 2
    # the shipped reward model, reloaded: the Bradley-Terry loss of its eval pairs recomputed
    # here is the summary's eval/loss, and our score (trunk + head at the last real token, as
    # PPO reads it) is the Hugging Face sequence-classification forward's own pooled logit
    final = Path(run["rm"]["final_model_dir"])
    rm, tok = M.load_sequence_scorer(final), M.load_tokenizer(final)
    assert rm.config.model_type == MODEL_TYPE[arch]
    rows = pd.read_parquet(data["root"] / "rm_eval.parquet")
    pairs = [encode_pair(tok, p, c, r, 128) for p, c, r in zip(rows.prompt, rows.chosen, rows.rejected)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        ours = M.last_token_scores(rm, batch["input_ids"], batch["attention_mask"])
        hf = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(ours, hf.float(), atol=1e-5, rtol=1e-5)
    b = len(pairs)
    loss = float(-torch.nn.functional.logsigmoid(ours[:b] - ours[b:]).mean())
    assert loss == pytest.approx(run["rm"]["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("arch", MATRIX)
def test_implicit_reward_model_trains_each_architecture(arch: str, stages, data) -> None:
    """``kind: implicit`` on each architecture: the shipped LM, reloaded with its reference as
    PPO scores with it, gives the eval loss the run reported."""
    from ppo_core.rewards import ImplicitReward

    run = stages(arch)
    rm = rm_train(from_dict(RewardConfig, {
        "data_dir": str(data["root"]), "max_steps": 2, "batch_size": 8, "micro_batch_size": 8,
        "eval_batch_size": 8, "save_steps": 0, "strategy": {"zero_stage": 2}, "kind": "implicit",
        "output_dir": str(run["out"] / "implicit"), "model_name_or_path": run["sft"]["final_model_dir"]}))
    final = Path(rm["final_model_dir"])
    spec = M.implicit_reward_spec(final)
    assert spec is not None and Path(spec["reference_model"]) == Path(run["sft"]["final_model_dir"]).resolve()
    scorer = ImplicitReward(M.load_causal_lm(final), M.load_causal_lm(spec["reference_model"]), spec["beta"])
    assert scorer.model.config.model_type == MODEL_TYPE[arch]
    tok = M.load_tokenizer(final)
    rows = pd.read_parquet(data["root"] / "rm_eval.parquet")
    batch = collate_pairs([encode_pair(tok, p, c, r, 128) for p, c, r in zip(rows.prompt, rows.chosen, rows.rejected)],
                          tok.pad_token_id)
    s = scorer([], [], batch["input_ids"], batch["attention_mask"], response_mask=batch["response_mask"])
    b = len(rows)
    assert s.abs().max() > 0  # two steps moved it off its reference
    loss = float(-torch.nn.functional.logsigmoid(s[:b] - s[b:]).mean())
    assert loss == pytest.approx(rm["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("arch", MATRIX)
def test_ppo_packed_equals_padded_on_each_architecture(arch: str, stages, data,
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ppo_core import packing

    monkeypatch.setattr(packing, "_LOGGED", set())  # a fallback is logged once per process
    run = stages(arch)
    logs = {}
    for pack in (128, 0):
        rec = Recorder()
        cfg = from_dict(PPOConfig, {
            "policy_path": run["sft"]["final_model_dir"], "reward_model_path": run["rm"]["final_model_dir"],
            "train_file": str(data["root"] / "ppo_train.parquet"), "output_dir": str(run["out"] / f"ppo{pack}"),
            "num_steps": 2, "rollout_batch_size": 8, "num_mini_batches": 2, "ppo_epochs": 1,
            "response_length": 6, "reward_norm_samples": 8, "save_every": 0,
            "strategy": {"cpu_threads": 1}, "pack_capacity": pack})
        with caplog.at_level(logging.INFO):
            summary = ppo_train(cfg, [rec])
        assert summary["step"] == 2 and Path(summary["final_dir"], "model.safetensors").is_file()
        logs[pack] = rec.logs
    assert "packing not used" not in caplog.text  # packing verified for every model of the run
    first_packed, first_padded = logs[128][0], logs[0][0]
    # step 1: the policy is the reference, so the KL of its own samples is 0; the random-init
    # policy is near uniform, so a response of 6 sampled tokens carries ~6 ln(V) nats of entropy
    assert abs(first_packed["objective/kl"]) < 1e-5
    assert abs(first_packed["objective/entropy"] - 6 * math.log(len(data["tok"]))) < 0.5
    # the same samples (same seed, same sampler) scored (reward model, critic) and trained
    # (policy and value losses, gradient norms) packed or padded agree
    for key in ("objective/scores", "objective/entropy", "loss/policy_avg", "loss/value_avg",
                "policy/approxkl_avg", "policy/grad_norm", "val/grad_norm"):
        assert first_packed[key] == pytest.approx(first_padded[key], rel=1e-3, abs=1e-6), key
    assert first_packed["val/ended_frac"] == first_padded["val/ended_frac"]


@pytest.mark.parametrize("arch", MATRIX)
def test_fast_paths_each_architecture_is_verified_for(arch: str, data) -> None:
    model = M.build_tiny_causal_lm(data["tok"], arch=arch, **DIMS)
    pad = data["tok"].pad_token_id
    assert packing_problem(model, "lm", pad) is None
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    scorer = AutoModelForSequenceClassification.from_config(config)
    assert packing_problem(scorer, "scorer", pad) is None
    assert supports_fast_decode(model) is FAST_DECODE[arch]


def test_packing_fallback_is_logged_once_with_its_reason(data, caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ppo_core import packing

    monkeypatch.setattr(packing, "_LOGGED", set())  # other tests may have logged these already
    model = M.build_tiny_causal_lm(data["tok"], arch="gpt2", **DIMS)
    pad = data["tok"].pad_token_id
    with caplog.at_level(logging.WARNING, logger="ppo_core.packing"):
        # an attention kernel without 4D masks (flash-attention): refused before any forward
        with monkeypatch.context() as m:
            m.setattr(packing, "_implementation", lambda model: "flash_attention_2")
            kernel = [packing_problem(model, "lm", pad) for _ in range(3)][-1]
        # logits soft-capped inside forward (Gemma-2 style): packed != padded
        plain_forward = type(model).forward

        def capped(self, *args, **kwargs):
            out = plain_forward(self, *args, **kwargs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

        monkeypatch.setattr(type(model), "forward", capped)
        differ = [packing_problem(model, "lm", pad) for _ in range(2)][-1]
    assert kernel == ("attention implementation 'flash_attention_2' takes no 4D mask (packing needs "
                      "one of sdpa, eager)")
    assert differ is not None and differ.startswith("packed outputs differ from the padded forward")
    lines = [r.getMessage() for r in caplog.records if "packing not used" in r.getMessage()]
    assert lines == [f"packing not used for GPT2LMHeadModel (lm): {reason}; PPO scores and trains "
                     "on padded batches instead" for reason in (kernel, differ)]


# --------------------------------------------------------------------------- the builder


@pytest.mark.parametrize("arch", [*MATRIX, "mistral"])
def test_build_base_model_builds_each_architecture(arch: str, tmp_path: Path) -> None:
    texts = [f"the {t} is {a} ." for t in bt.TOPICS for a in bt.ADJECTIVE_QUALITY]
    out = M.build_base_model(texts, tmp_path, size={"n_layer": 1, "n_embd": 32, "n_head": 2},
                             vocab_size=300, arch=arch)
    model, tok = M.load_causal_lm(out), M.load_tokenizer(out)
    cfg = model.config
    assert cfg.model_type == MODEL_TYPE[arch]
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 32 and cfg.num_attention_heads == 2
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id != tok.eos_token_id
    ids = torch.tensor([tok("the river is nice .", add_special_tokens=False)["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_build_base_model_refuses_an_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch='bert': choose one of llama, gpt2, qwen2"):
        M.build_base_model(["a b c"], tmp_path, arch="bert")


def test_base_model_asset_builds_a_non_llama_architecture(rlhf_home: Path, data) -> None:
    import dagster as dg

    from assets.models import BaseModelConfig, base_model

    assert all(f"'{a}'" in BaseModelConfig.model_fields["arch"].description for a in M.ARCHITECTURES)

    @dg.asset(name="dataset_splits")
    def splits() -> dict:
        return {"split_dir": str(data["root"]), "data_version": "test"}

    result = dg.materialize(
        [splits, base_model], instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"base_model": {"config": {
            "source": "auto", "arch": "qwen2", "n_layer": 1, "n_embd": 32, "n_head": 2}}}})
    assert result.success
    manifest = result.output_for_node("base_model")
    assert (manifest["model_type"], manifest["n_layer"], manifest["n_embd"], manifest["n_head"]) == \
        ("qwen2", 1, 32, 2)
    assert M.load_causal_lm(manifest["model_path"]).config.model_type == "qwen2"


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("arch", [*MATRIX, "mistral"])
def test_dropout_is_off_in_the_modules_not_only_the_config(arch: str, data, tmp_path: Path) -> None:
    """Built with every dropout at 0.1, saved and loaded the way every stage loads: two
    forwards in train() mode agree exactly (attention dropout is a float the attention module
    copied from the config, and OPT's layers keep dropout and layerdrop the same way)."""
    tok = data["tok"]
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True}
    config = M.tiny_config(arch, common, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    for attr in M._DROPOUT_ATTRS:
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.1)
    torch.manual_seed(0)
    raw = AutoModelForCausalLM.from_config(config).train()
    ids = torch.tensor([tok("the river is nice . the robot is lovely .", add_special_tokens=False)["input_ids"]])
    assert not torch.equal(raw(input_ids=ids).logits, raw(input_ids=ids).logits)  # dropout is live
    raw.save_pretrained(tmp_path)
    loaded = M.load_causal_lm(tmp_path).train()
    torch.testing.assert_close(loaded(input_ids=ids).logits, loaded(input_ids=ids).logits, rtol=0, atol=0)
    disabled = M.disable_dropout(raw).train()
    torch.testing.assert_close(disabled(input_ids=ids).logits, disabled(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", [*MATRIX, "mistral"])
def test_training_dropout_reaches_each_architecture(arch: str, data) -> None:
    """The reward model's ``dropout``: one hook per block, the attention rate set where the
    architecture keeps it, live in train() mode and gone in eval()."""
    tok = data["tok"]
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = M.disable_dropout(AutoModelForCausalLM.from_config(
        M.tiny_config(arch, common, n_layer=2, n_embd=32, n_head=2, n_positions=64)))
    ids = torch.tensor([tok("the river is nice . the robot is lovely .", add_special_tokens=False)["input_ids"]])
    before = model.eval()(input_ids=ids).logits
    assert M.training_dropout(model, 0.25) == 2
    rates = [v for m in model.modules() for k, v in vars(m).items()
             if k in ("attention_dropout", "dropout") and type(v) is float and type(m).__name__.endswith("Attention")]
    rates += [m.p for n, m in model.named_modules() if n.endswith("attn_dropout")]
    assert rates == [0.25, 0.25]  # one attention per block
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, before, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    trunk = M.trunk_of(model)
    blocks = trunk.h if arch == "gpt2" else trunk.layers  # OPT's trunk is its decoder
    assert M.decoder_blocks(model) is blocks
    M.disable_dropout(model)  # attention dropout off: the residual hooks alone still drop
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
