"""Tokenizers and models: the embedded tiny default and loading from hub ids or local paths.

* Policy / reference: any ``AutoModelForCausalLM``.
* Reward model / critic: ``AutoModelForSequenceClassification`` with ``num_labels=1`` on a
  causal-LM trunk. :func:`token_values` returns the head's output at *every* position (the
  critic's values); :func:`last_token_scores` picks the one at the last non-pad token (a
  scalar reward model's score). Both use the attention mask, not ``pad_token_id``, so a tokenizer whose
  pad token equals its EOS token still scores at the EOS.
* Implicit reward model: a causal LM saved with :data:`IMPLICIT_REWARD_FILE` (its beta and
  reference model) beside the weights; :func:`sequence_logprobs` gives the log-probs it needs.
* The embedded default: :func:`build_base_model` trains a byte-level BPE tokenizer on the
  task's texts and builds a tiny Llama-style model from a config, then ``save_pretrained``\\ s
  both. Every later stage loads it by path, exactly like a hub model.

Safe defaults: safetensors on save, ``trust_remote_code=False`` unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from ppo_core.config import ConfigError
from ppo_core.ppo_utils import last_token_index, logprobs_from_logits, position_ids_from_mask

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"  # GPT-2's EOS spelling, so hub-trained habits read naturally
BOS_TOKEN = "<|startoftext|>"

# Model sizes for build_tiny_causal_lm. "tiny" is sized for the bundled task on a 2-core CPU:
# a full SFT run over ~3200 examples takes well under a minute, yet it learns the task's
# grammar and the reward model on top of it ranks held-out pairs correctly (see the report).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256},
    "small": {"n_layer": 4, "n_embd": 256, "n_head": 8, "n_positions": 512},
}

# Sizes "auto" picks from, smallest first, with the training tokens (SFT and reward-model texts)
# each starts at. Depth did not buy quality at 100k-300k tokens: 4x128 instead of 2x128 through
# the whole user path on seven suite runs (6,000-8,000 pairs; BENCHMARKS.md, "Model size at the
# current recipe") lowered reward-model agreement on six (style by 0.13) and PPO's gold win
# rate by 0.02 on average, and took recipe's lineage from 306 s to 834 s. Larger models start
# where the data can feed them (Hoffmann et al. 2022: ~20 tokens per parameter for one pass).
AUTO_SIZES: tuple[tuple[int, dict[str, int]], ...] = (
    (0, {"n_layer": 2, "n_embd": 128, "n_head": 4}),
    (1_000_000, {"n_layer": 4, "n_embd": 192, "n_head": 6}),
    (4_000_000, {"n_layer": 6, "n_embd": 256, "n_head": 8}),
)


def auto_size(n_tokens: int) -> dict[str, int]:
    """The largest of ``AUTO_SIZES`` whose token threshold ``n_tokens`` reaches."""
    chosen = AUTO_SIZES[0][1]
    for threshold, size in AUTO_SIZES:
        if n_tokens >= threshold:
            chosen = size
    return dict(chosen)


# Config attributes that hold dropout probabilities across GPT-2, Llama, Mistral, OPT, ...
_DROPOUT_ATTRS = (
    "dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "resid_pdrop",
    "embd_pdrop", "attn_pdrop", "summary_first_dropout", "classifier_dropout", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "layerdrop",
)


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the path and the fix."""


# --------------------------------------------------------------------------- tokenizers


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) with pad, EOS and BOS special tokens.

    Byte-level BPE never produces an unknown token, so any text round-trips. ``add_prefix_space``
    is on so that a word is the same token at the start of a prompt or response as in the
    middle of a text (prompt and response are tokenized separately, see ``ppo_core.data``).
    The result is a normal Hugging Face ``PreTrainedTokenizerFast``; when ``out_dir`` is given it
    is saved there with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN,
        padding_side="right",
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Require an EOS token (responses end with it); use EOS as pad when there is no pad token.

    Using EOS as pad is what TRL and OpenRLHF do for tokenizers that lack a pad token; scores
    and losses here are masked by the attention mask, so it is safe.
    """
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"tokenizer at {source!r} has no EOS token: responses must end with EOS. Add one "
            f"(tokenizer.add_special_tokens({{'eos_token': '{EOS_TOKEN}'}}) and save_pretrained) "
            f"or point model_name_or_path at a tokenizer that has one."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    path_or_id: str | Path, *, trust_remote_code: bool = False, revision: str | None = None
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or a hub id; it must have an EOS token."""
    source = _resolve_source(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure(path_or_id, "tokenizer", exc)) from exc
    return check_tokenizer(tok, str(path_or_id))


# --------------------------------------------------------------------------- models


# Architectures build_tiny_causal_lm builds from their transformers config class (random
# weights, no hub access). Each covers a family of hub checkpoints: Llama (Llama 2/3, TinyLlama),
# Mistral, Qwen2 (Qwen1.5/2/2.5), GPT-2, GPT-NeoX (Pythia, GPT-NeoX-20B), OPT.
ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "qwen2", "mistral", "gpt_neox", "opt")


def tiny_config(arch: str, common: Mapping[str, Any], *, n_layer: int, n_embd: int, n_head: int,
                n_positions: int) -> PretrainedConfig:
    """The ``arch`` config at the given size; ``common`` holds vocab, special ids and tying.

    The MLP is ``4 * n_embd`` wide in every architecture (GPT-2's, OPT's and Pythia's ratio,
    kept for the gated Llama-family MLPs too, as this module always built them), every head
    has its own keys/values (no grouped-query attention) and every dropout is 0. Other fields
    keep their config class defaults, except:

    * Mistral: ``sliding_window=None`` (full attention, as the Mistral-7B v0.2/v0.3 configs
      ship; a window wider than ``n_positions`` would compute the same thing).
    * OPT: ``word_embed_proj_dim = n_embd`` (no projection, as OPT-125m..: the config's
      default 768 only fits the 125m width) and pre-LayerNorm (``do_layer_norm_before``).
    """
    mlp = 4 * n_embd
    if arch == "llama":
        return LlamaConfig(
            hidden_size=n_embd, intermediate_size=mlp, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=n_positions, attention_dropout=0.0, **common)
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=n_embd, intermediate_size=mlp, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=n_positions, use_sliding_window=False, attention_dropout=0.0,
            **common)
    if arch == "mistral":
        return MistralConfig(
            hidden_size=n_embd, intermediate_size=mlp, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=n_positions, sliding_window=None, attention_dropout=0.0,
            **common)
    if arch == "gpt2":
        return GPT2Config(
            n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=n_embd, intermediate_size=mlp, num_hidden_layers=n_layer,
            num_attention_heads=n_head, max_position_embeddings=n_positions,
            hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0, **common)
    if arch == "opt":
        return OPTConfig(
            hidden_size=n_embd, ffn_dim=mlp, num_hidden_layers=n_layer, num_attention_heads=n_head,
            max_position_embeddings=n_positions, word_embed_proj_dim=n_embd,
            do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            layerdrop=0.0, **common)
    raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for CPU tests and the bundled task.

    ``arch``: one of :data:`ARCHITECTURES` (default ``"llama"``: rotary positions, so left
    padding only needs correct ``position_ids``, no learned position table); see
    :func:`tiny_config`. Dropout is 0 in all: RLHF stages disable it anyway (see
    :func:`disable_dropout`), and the tiny models do not overfit the generated data within the
    default epochs.
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,  # halves the parameters of a model whose vocab dominates
    }
    config = tiny_config(arch, common, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                         n_positions=n_positions)
    torch.manual_seed(seed)
    # the configs above set every dropout to 0; disable_dropout also zeroes the copies the
    # modules took at construction, so a config edited later cannot bring dropout back
    return disable_dropout(AutoModelForCausalLM.from_config(config))


def build_base_model(
    texts: Iterable[str], out_dir: str | Path, size: str | Mapping[str, int] = "tiny", *,
    vocab_size: int = 1024, arch: str = "llama", seed: int = 0, n_positions: int | None = None,
) -> Path:
    """Train a tokenizer on ``texts``, build the ``size`` model, ``save_pretrained`` both.

    ``size``: a name of ``MODEL_SIZES``, ``"auto"`` (:func:`auto_size` of the texts' token
    count), or a mapping of ``n_layer`` / ``n_embd`` / ``n_head`` (missing or 0 entries are
    filled from the automatic choice); the sizes are the same for every ``arch`` of
    :data:`ARCHITECTURES`. ``n_positions`` sets the context (default: the size's, 256 for
    built sizes); the ``base_model`` asset raises it for data whose sequences need more
    (``ppo_core.lengths.context_for``). This is the embedded default base model (the Dagster
    ``base_model`` asset calls it in-process); SFT then loads ``out_dir`` like any hub model.
    Returns ``out_dir``.
    """
    if isinstance(size, str) and size != "auto" and size not in MODEL_SIZES:
        raise ValueError(f"size={size!r}: choose 'auto' or one of {sorted(MODEL_SIZES)}")
    if arch not in ARCHITECTURES:  # before the tokenizer is trained
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    texts = list(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, None, vocab_size=vocab_size)
    if isinstance(size, str) and size in MODEL_SIZES:
        dims = dict(MODEL_SIZES[size])
    else:
        n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        dims = {"n_positions": 256, **auto_size(n_tokens),
                **({k: int(v) for k, v in size.items() if v} if not isinstance(size, str) else {})}
    if n_positions is not None:
        dims["n_positions"] = n_positions
    model = build_tiny_causal_lm(tokenizer, arch=arch, seed=seed, **dims)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


# Weights load in fp32 whatever the checkpoint holds (transformers 5 keeps the checkpoint's
# dtype by default, bf16 for most hub models): an optimizer stepping bf16 weights directly
# rounds small updates away (a 1e-4 Adam step on a weight of 0.05 does not change its bf16
# value). With ``strategy.bf16`` DeepSpeed casts the trained models to bf16 and keeps fp32
# master weights, and ``prepare_eval`` casts the frozen ones.
LOAD_DTYPE = torch.float32


def load_causal_lm(
    path_or_id: str | Path, *, dtype: torch.dtype | None = LOAD_DTYPE, trust_remote_code: bool = False,
    revision: str | None = None, dropout: bool = False,
) -> PreTrainedModel:
    """Load an ``AutoModelForCausalLM`` (policy / reference) in ``dtype`` (None: the checkpoint's);
    dropout off unless ``dropout``."""
    source = _resolve_source(path_or_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure(path_or_id, "causal LM", exc)) from exc
    return model if dropout else disable_dropout(model)


def load_sequence_scorer(
    path_or_id: str | Path, *, pad_token_id: int | None = None, dtype: torch.dtype | None = LOAD_DTYPE,
    trust_remote_code: bool = False, revision: str | None = None, dropout: bool = False,
) -> PreTrainedModel:
    """Load a scalar scorer (reward model / critic): ``AutoModelForSequenceClassification``, 1 label.

    Loading a plain causal-LM checkpoint this way keeps the trunk and adds a new, randomly
    initialised ``score`` head; prefer :func:`build_scorer_from_causal_lm` for that, which
    initialises the head small. ``pad_token_id`` is written to the config because the HF head
    needs it to pool (our :func:`last_token_scores` uses the attention mask instead).
    """
    source = _resolve_source(path_or_id)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = config.eos_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure(path_or_id, "sequence scorer", exc)) from exc
    return model if dropout else disable_dropout(model)


def build_scorer_from_causal_lm(
    path_or_id: str | Path, *, pad_token_id: int | None = None, trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """A reward model / critic initialised from an (SFT) causal LM: its trunk plus a new scalar head.

    The head is re-initialised with std ``1/sqrt(hidden_size + 1)`` and zero bias, as
    lm-human-preferences (Ziegler et al. 2019) initialises its reward and value heads
    (OpenRLHF uses std ``1/(hidden_size + 1)``), so initial scores are near zero.
    """
    torch.manual_seed(seed)
    model = load_sequence_scorer(
        path_or_id, pad_token_id=pad_token_id, trust_remote_code=trust_remote_code
    )
    head = score_head(model)
    hidden = head.in_features
    with torch.no_grad(), _whole_for_init(head):
        nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
        if head.bias is not None:
            head.bias.zero_()
    return model


def _whole_for_init(module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Whole weights of ``module`` to initialise in place. For a model loaded ZeRO-3-partitioned
    (``DeepSpeedStrategy.partitioned_loading``) each rank holds an empty shard: gather it, and
    on exit rank 0's values are partitioned to every rank (``modifier_rank=0``, DeepSpeed's
    documented way to initialise a partitioned parameter). A no-op for ordinary modules."""
    if not is_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0: ``nn.Dropout`` modules, the probabilities modules
    copied from the config at construction, and the config.

    RLHF needs the log-probs of the acting policy and of the trained policy to agree on the
    same weights; dropout breaks that (TRL's and OpenRLHF's PPO disable it the same way).
    Zeroing the config alone is not enough: Llama/Qwen2/Mistral/GPT-NeoX attention keeps
    ``self.attention_dropout`` and OPT keeps ``self.dropout`` / ``self.layerdrop`` as plain
    floats taken from the config in ``__init__``, and applies them in ``train()`` mode.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            # float attributes named like a dropout rate (dropout, attention_dropout,
            # activation_dropout, layerdrop, attn_pdrop, ...); bools and submodules are skipped
            if "drop" in attr and type(value) is float:
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)
    return model


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the first ``nn.ModuleList`` of ``num_hidden_layers`` entries in the
    trunk (``model.layers`` in Llama/Qwen2/Mistral, ``transformer.h`` in GPT-2,
    ``gpt_neox.layers``, OPT's ``decoder.layers``)."""
    n = getattr(getattr(unwrap(model), "config", None), "num_hidden_layers", None)
    for module in trunk_of(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no ModuleList of num_hidden_layers={n} blocks in {type(model).__name__}")


def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Set the attention-probability dropout rate to ``p`` wherever the architecture keeps it
    (read in ``train()`` mode only); returns how many attention modules were set."""
    modules = set()
    for name, module in model.named_modules():
        if type(vars(module).get("attention_dropout")) is float:  # Llama, Qwen2, Mistral, GPT-NeoX
            module.attention_dropout = p
            modules.add(name)
        if type(module).__name__.endswith("Attention") and type(vars(module).get("dropout")) is float:
            module.dropout = p  # OPT's attention
            modules.add(name)
        if isinstance(module, nn.Dropout) and name.rsplit(".", 1)[-1] == "attn_dropout":
            module.p = p  # GPT-2
            modules.add(name)
    return len(modules)


def training_dropout(model: nn.Module, p: float) -> int:
    """Dropout with probability ``p``, active only in ``train()`` mode, on the attention
    probabilities and on each block's update to the residual stream: the two places GPT-2
    drops (``attn_pdrop``, ``resid_pdrop``; the block's attention and MLP updates share one
    mask here), for every architecture, including Llama-family configs, which have no residual
    dropout. Model construction leaves every dropout at 0 (:func:`disable_dropout`); call this on
    a model that is trained alone (a reward model), never on a PPO policy. Returns the number
    of blocks hooked; the hooks live as long as the model (a second call is refused).
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout={p} must be in [0, 1)")
    if p == 0:
        return 0
    if getattr(model, "_dropout_hooks", None):
        raise ValueError("training_dropout was already applied to this model: a second call would drop twice")
    if getattr(getattr(unwrap(model), "config", None), "do_layer_norm_before", True) is False:
        # OPT-350m's blocks return LN(x + update): output - input is not the update
        raise ValueError("dropout on the residual update needs pre-LayerNorm blocks; this model's config has "
                         "do_layer_norm_before=False")
    blocks = decoder_blocks(model)
    set_attention_dropout(model, p)

    def drop_update(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not block.training:
            return out  # x + (y - x) would round differently from y
        x = args[0] if args else kwargs["hidden_states"]  # (b, t, h): the block's input
        y = out[0] if isinstance(out, tuple) else out
        y = x + nn.functional.dropout(y - x, p)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    model._dropout_hooks = [block.register_forward_hook(drop_update, with_kwargs=True) for block in blocks]
    return len(blocks)


# --------------------------------------------------------------------------- LoRA

# Attention projections of Llama/Mistral/Qwen (q/k/v/o_proj) and GPT-2 (c_attn, c_proj): the
# modules the LoRA paper adapts (Hu et al. 2021, section 7.1); names absent from a model are
# skipped.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")


def lora_problems(rank: int, zero_stage: int) -> list[str]:
    """What is wrong with a stage's LoRA options (for the stages' config validation)."""
    errors = []
    if rank < 0:
        errors.append(f"lora_rank must be >= 0 (0 = full fine-tuning), got {rank}")
    if rank > 0 and zero_stage == 3:
        errors.append("lora_rank > 0 with strategy.zero_stage 3 is not supported (the final merge "
                      "needs whole weights): use zero_stage 2 or lora_rank 0")
    return errors


def add_lora(model: nn.Module, rank: int, alpha: int, target_modules: Iterable[str],
             task_type: str) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters; only they (and, for ``SEQ_CLS``, the score
    head, which PEFT keeps trainable) get gradients. The strategy merges them on save, so
    every stage's ``final/`` is a plain model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # optional dependency
        raise ConfigError("lora_rank > 0 needs peft: pip install 'rlhf-pipeline[lora]'") from exc
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    wanted = list(target_modules)
    targets = [t for t in wanted if t in names]
    if not targets:
        raise ConfigError(f"lora_target_modules {wanted} match no module of "
                          f"{type(model).__name__}; pick from e.g. {sorted(names)[:20]}")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        task_type=task_type)
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- scoring helpers


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DeepSpeed engine (or the module itself). Safe to call twice:
    under ZeRO-3 the HF model itself carries a ``module`` attribute that is None."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def is_partitioned(model: nn.Module) -> bool:
    """True when ZeRO-3 manages ``model``'s weights (created under ``deepspeed.zero.Init``, e.g.
    in ``DeepSpeedStrategy.partitioned_loading``, or wrapped by a stage-3 engine): DeepSpeed
    tags each such parameter with a ``ds_id``."""
    return any(hasattr(p, "ds_id") for p in unwrap(model).parameters())


def score_head(model: nn.Module) -> nn.Module:
    """The head of a sequence-classification model (``score`` in GPT-2/Llama/Mistral): a
    Linear, or PEFT's trainable wrapper around it under LoRA."""
    model = unwrap(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) or (
                isinstance(head, nn.Module) and isinstance(getattr(head, "original_module", None), nn.Linear)):
            return head
    raise TypeError(f"{type(model).__name__} has no linear 'score' head")


def trunk_of(model: nn.Module) -> nn.Module:
    """The decoder stack without head (``LlamaModel`` of a ``LlamaFor...``); ``get_decoder``
    also sees through PEFT wrappers, where ``base_model_prefix`` would name the wrapped model."""
    inner = unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    return get_decoder() if callable(get_decoder) else getattr(inner, inner.base_model_prefix)



def token_values(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The scalar head at every position: (b, t) float. Critic values; RM scores via the last one.

    Calls the trunk (``base_model``) and the head directly instead of the HF forward, which
    pools at ``pad_token_id`` and so cannot return per-token values. Works on a DeepSpeed
    engine's module too (ZeRO-3 gathers parameters in each submodule's forward hook).
    """
    inner = unwrap(model)
    hidden = trunk_of(inner)(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask), use_cache=False,
    ).last_hidden_state  # (b, t, h)
    return score_head(inner)(hidden).squeeze(-1).float()  # (b, t)



def last_token_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reward-model score at the last non-pad token: (b,) float."""
    values = token_values(model, input_ids, attention_mask)  # (b, t)
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def sequence_logprobs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_mask: torch.Tensor,
) -> torch.Tensor:
    """Summed log-probs of the tokens ``score_mask`` marks, each given the tokens before it: (b,).

    ``input_ids`` / ``attention_mask`` / ``score_mask``: (b, t), any padding side. A token counts
    when it and the token before it are real and ``score_mask`` is True on it (a response's
    tokens: the first real token has nothing to be predicted from). The LM head runs only from
    the first scored column on (``logits_to_keep``): with a large vocabulary the logits of the
    prompts would dominate memory.
    """
    columns = score_mask.bool().any(0).nonzero()
    t = input_ids.shape[1]
    if len(columns) == 0:
        return torch.zeros(input_ids.shape[0], device=input_ids.device)
    first = max(int(columns[0]), 1)  # the first scored token; it is predicted at first - 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   logits_to_keep=t - first + 1).logits[:, :-1]  # (b, t - first, V)
    logp = logprobs_from_logits(logits, input_ids[:, first:])  # token j predicted at j - 1
    keep = score_mask[:, first:].bool() & attention_mask[:, first:].bool() & attention_mask[:, first - 1:-1].bool()
    return (logp * keep).sum(1)


IMPLICIT_REWARD_FILE = "implicit_reward.json"
"""Beside an implicit reward model's weights: ``{"beta": float, "reference_model": path}``."""


def implicit_reward_spec(path_or_id: str | Path) -> dict[str, Any] | None:
    """The beta and reference model of the implicit reward model in ``path_or_id``, or None when
    it is a scalar reward model (no :data:`IMPLICIT_REWARD_FILE`; a hub id is never implicit)."""
    file = Path(os.path.expanduser(str(path_or_id))) / IMPLICIT_REWARD_FILE
    if not file.is_file():
        return None
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        beta, ref = float(spec["beta"]), str(spec["reference_model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{file}: expected {{\"beta\": > 0, \"reference_model\": a path}} ({exc})") from exc
    if not beta > 0 or not ref:
        raise ModelLoadError(f"{file}: beta must be > 0 and reference_model set, got {spec}")
    return {"beta": beta, "reference_model": ref}


# --------------------------------------------------------------------------- internals


def _resolve_source(path_or_id: str | Path) -> str:
    """Local directories load as themselves; something that looks like a path but does not
    exist fails now, with a message, instead of after a hub lookup."""
    text = str(path_or_id)
    if not text:
        raise ModelLoadError("model_name_or_path is empty: set it to a local directory or a hub id")
    path = Path(os.path.expanduser(text))
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {text!r} is a file; point it at a save_pretrained directory")
        return str(path)
    looks_local = text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local:
        raise ModelLoadError(
            f"model path {text!r} does not exist. Set model_name_or_path to an existing "
            f"save_pretrained directory or to a hub id such as 'gpt2'."
        )
    return text


def _load_failure(path_or_id: str | Path, what: str, exc: Exception) -> str:
    return (
        f"cannot load {what} from {str(path_or_id)!r}: it is not a local directory and could not "
        f"be loaded as a hub id ({type(exc).__name__}: {exc}). Check model_name_or_path (and "
        f"network access / HF_HOME cache for hub ids)."
    )
