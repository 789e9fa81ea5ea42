"""Reward model: Bradley-Terry loss on preference pairs.

Reads ``<data_dir>/rm_train.parquet`` and ``rm_eval.parquet`` (columns ``prompt``, ``chosen``,
``rejected``, optional ``margin``) and writes ``<output_dir>/final/``, checkpoints and
``summary.json``. Two kinds (``RewardConfig.kind``):

* ``implicit`` (the default): the SFT causal LM itself, r = beta * (log pi(y|x) - log
  pi_sft(y|x)) summed over the response's tokens (DPO's implicit reward, Rafailov et al. 2023);
  ``final/`` is a causal LM + tokenizer + ``implicit_reward.json`` (beta, reference model).
* ``scalar``: the SFT model's trunk with a new scalar head, r = the head's output at the last
  non-pad token; ``final/`` is an ``AutoModelForSequenceClassification`` dir + tokenizer.

Loss per pair (InstructGPT, Ouyang et al. 2022; margin as Llama 2, Touvron et al. 2023)::

    -(1 - eps) log sigmoid(d) - eps log sigmoid(-d) + center_coef * (r_chosen + r_rejected)^2,
    d = r_chosen - r_rejected - margin

``eps`` is label smoothing (``label_smoothing``: the conservative loss of Mitchell 2023, "A note
on DPO with noisy preferences", TRL's DPO sigmoid loss with ``label_smoothing``). The last term
is the reward-centering auxiliary loss (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
``center_rewards_coefficient``), on by default for a scalar model (``center_coef``).
Normalising scores on reference-policy samples happens in the PPO engine, not here.

    python -m ppo_core.reward --config rm.json
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppo_core.callbacks import Callback, CallbackList, PrefixedCallbacks
from ppo_core.checkpoint import finish_run
from ppo_core.config import ConfigError
from ppo_core.data import (
    EncodedPair,
    collate_pairs,
    encode_pair,
    eval_shards,
    rank_micro_batches,
    read_table,
)
from ppo_core.models import (
    IMPLICIT_REWARD_FILE,
    LORA_TARGETS,
    build_scorer_from_causal_lm,
    implicit_reward_spec,
    last_token_scores,
    load_causal_lm,
    load_tokenizer,
    lora_problems,
    sequence_logprobs,
    training_dropout,
)
from ppo_core.strategy import DeepSpeedStrategy, StrategyConfig, replace_dir
from ppo_core.trainer import StoppingConfig, SupervisedTrainer


REWARD_KINDS = ("scalar", "implicit")
CENTER_COEF = {"scalar": 0.01, "implicit": 0.0}
"""``center_coef`` when None (see its doc)."""
LEARNING_RATE = {"scalar": 5e-4, "implicit": 1e-3}
"""``learning_rate`` when None (see its doc)."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model training on ``prompt`` / ``chosen`` / ``rejected`` pairs."""

    data_dir: str
    """Directory holding the training pairs (``train_file``) and rm_eval.parquet."""
    output_dir: str
    """Where final/, checkpoints/ and summary.json go."""
    model_name_or_path: str
    """The SFT model (save_pretrained dir or hub id); its trunk initialises the reward model."""
    train_file: str = "rm_train.parquet"
    """Training pairs under ``data_dir``: ``rm_train.parquet`` for the reward model PPO optimizes,
    ``rm_heldout.parquet`` (disjoint prompts) for the held-out one its guard scores with."""
    kind: str = "implicit"
    """``implicit``: the SFT causal LM itself, scoring a response by
    ``beta * (log pi(y|x) - log pi_sft(y|x))`` summed over its tokens, trained with the pairwise
    loss on that score (the DPO loss, Rafailov et al. 2023, eq. 5 and 7;
    ``ppo_core.rewards.ImplicitReward``); ``final/`` holds a causal LM and
    ``implicit_reward.json`` (beta, the reference model's path). ``scalar``: a sequence
    classifier, the SFT trunk plus a new scalar head read at the last token (InstructGPT; TRL's
    ``RewardTrainer``, OpenRLHF's ``RewardModel``).
    A fresh head learns one number from pairwise labels; the implicit score moves every response
    token's next-token distribution, which SFT has already shaped. On from-scratch models
    (BENCHMARKS.md, "Implicit reward models") probes agreed with gold better on facts (+0.06 to
    +0.13) and about as well elsewhere (+0.030 +- 0.016 over 11), and whole lineages' PPO won
    more often against SFT on all six compared (+0.093 +- 0.036 gold win rate; recipe
    0.78-0.83 -> 0.86-0.91). Measured on models built from scratch only: a pretrained base
    model keeps ``scalar`` (``assets.models.PRETRAINED_DEFAULTS``)."""
    beta: float = 0.1
    """``implicit``: the scale of the log-ratio (DPO's beta; TRL's ``DPOConfig`` default 0.1). PPO
    normalises the reward on reference samples, so it mostly sets how fast the sigmoid
    saturates in training."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (off: safe default)."""
    max_length: int = 128
    """Max tokens of prompt + response (+EOS) per side; longer pairs are truncated and counted."""
    num_epochs: float = 4.0
    """Passes over the pairs (the TRL recipe issue 11 measured: 4). InstructGPT and OpenRLHF use
    1 epoch for large pretrained models."""
    max_steps: int = 0
    """If > 0, the number of optimizer steps (overrides num_epochs)."""
    batch_size: int = 32
    """Global pairs per optimizer step (= micro_batch_size x world_size x accumulation)."""
    micro_batch_size: int = 32
    """Pairs per forward pass per rank (each pair is two sequences)."""
    learning_rate: float | None = None
    """Peak LR for a reward model on a from-scratch trunk; None: 5e-4 scalar, 1e-3 implicit.
    Scalar, measured on bench/tasks/constraints.py (6,000 pairs, gold-order agreement of the tiny
    model after 4 epochs): 2e-3 0.60, 5e-4 0.69, 2e-4 (6 epochs) 0.70; centering (0.01), weight
    decay or another seed moved it by <= 0.01. Implicit, on eight suite and bundled lineages
    (bench/dpo_probe.py): 1e-3 agreed with gold better than 5e-4 on all eight, by 0.013 on average.
    Use ~9e-6 (OpenRLHF's RM default) for a pretrained hub model; the pipeline's stages do so
    when ``base_model`` is pretrained (``assets.models.PRETRAINED_DEFAULTS``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (HF TrainingArguments default 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (PyTorch / HF TrainingArguments default)."""
    lr_scheduler: str = "cosine"
    """HF scheduler name (cosine with warmup, as OpenRLHF's reward-model trainer)."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warmup (OpenRLHF's default 0.03)."""
    use_margin: bool = True
    """Subtract the data's ``margin`` column inside the sigmoid (Llama 2) when the column exists."""
    mismatched_negatives: float | tuple[float, ...] = 0.5
    """Extra training pairs, as a fraction of the real ones: ``(prompt, its chosen)`` preferred over
    ``(prompt, the chosen response of another prompt)``. They teach that a response must answer its
    own prompt, which pairwise labels on two answers to the same prompt teach slowly, but not on
    every task: gold-order agreement on test pairs (bench/rm_probe.py, 6,000 pairs, last weights)
    went 0 -> 0.5 arithmetic 0.755 -> 0.799, recipe 0.798 -> 0.826 and 0.759 -> 0.834, facts
    0.771 -> 0.721 and 0.784 -> 0.735; 0 -> 1.0 style 0.947 -> 0.928. 0 turns them off; the eval
    split never gets them, so its metrics (and early stopping, when on) see real pairs only.

    Several values, e.g. ``[0.5, 0]``: one reward model per value, from the same SFT trunk with
    the same seed and epochs (a ``max_seconds`` budget is shared out), each in
    ``candidates/mismatched_<value>/``; ``final/`` gets the one
    with the highest accuracy on the eval split (a tie keeps the earlier value), and the
    pipeline's PPO optimises all of them as an ensemble (``ppo_core.rewards.EnsembleReward``).
    Selecting on the eval split alone misleads PPO: on facts the model without them agreed with
    gold 0.86 against 0.70-0.79 but missed answers that leave an asked-for object out, and PPO
    against it alone found that gap (gold win rate 0.68, or refused). Against the default alone
    the ensemble moved PPO's gold win rate by +0.028 +- 0.027 on facts and by -0.061 to +0.011
    on five other tasks, so one value stays the default (BENCHMARKS.md, "Two reward models,
    one objective").
    Each value costs one reward-model training (0 trains on 2/3 of the pairs 0.5 does)."""
    center_coef: float | None = None
    """Reward-centering auxiliary loss coefficient on (r_c + r_r)^2; None: 0.01 for a scalar
    reward model (Eisenstein et al. 2023 and TRL's ``center_rewards_coefficient`` docs use 0.01),
    0 for an implicit one, whose scores start at exactly 0 and stay anchored to the reference
    model; 0 disables it. Pairwise losses leave
    each prompt's score offset free, and with mismatched negatives the offsets grew into noise
    PPO must average away: on the recipe task's policy samples (the guard's, SFT to step 60)
    the variance of the per-prompt mean score was 2.4x the within-prompt variance, uncorrelated
    with gold (-0.06); centered, 0.48x.
    Paired over the suite's lineages (BENCHMARKS.md, "Reward centering"), PPO's gold win rate
    moved by +0.07 to +0.12 on recipe (three seeds), +0.04 and +0.05 on style, -0.02 on
    arithmetic, -0.06 and -0.12 on constraints (whose reward model the policy exploits either
    way; the gold gate refuses both) and -0.035 on bundled: +0.013 +- 0.024 on average."""
    label_smoothing: float = 0.0
    """The weight eps of the reversed label in the loss, for preferences that are noisy: each pair
    counts as "chosen wins" with probability 1 - eps, so no pair's score gap is pushed past
    margin + log((1 - eps) / eps) (Mitchell 2023; TRL's DPO ``label_smoothing``); 0 is the plain
    Bradley-Terry loss. At 0.1 the probes' gold agreement rose on the noisiest suite task (facts,
    +0.034 +- 0.016 over four lineages) and nowhere else (recipe -0.007), not at all with only
    the labelled pairs smoothed, the 900-pair held-out model lost on every facts seed, and PPO's
    gold win rate moved by +0.011 +- 0.015 (six lineages, main model only), so the default is 0
    (BENCHMARKS.md, "Label smoothing")."""
    dropout: float = 0.0
    """Dropout while training on the attention probabilities and on each block's residual update
    (``ppo_core.models.training_dropout``: GPT-2's ``attn_pdrop`` / ``resid_pdrop`` places, for
    every architecture). Off in evaluation and in the saved model. 0 (the default) trains without,
    as TRL's ``RewardConfig(disable_dropout=True)`` does. Dropout 0.1 (per sub-layer, in
    bench/rm_probe.py; this per-block version matched it on the probes compared) lost agreement
    at 4 epochs (-0.017 +- 0.013, 8 probes); with ``num_epochs`` 8 the probes gained
    +0.033 +- 0.012 (16: facts +0.063, recipe +0.006, bundled -0.006), the suite's lineages'
    reward models +0.011 +- 0.014, and PPO's gold win rate moved by +0.020 +- 0.034 over six
    lineages, not beyond noise, for about 120 s more per lineage (BENCHMARKS.md, "Dropout and a
    longer reward-model run")."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (and at the end); 0 = ``stopping.evals_per_epoch`` times per epoch."""
    eval_batch_size: int = 64
    """Pairs per eval forward pass per rank."""
    max_eval_examples: int = 0
    """If > 0, evaluate on the first N eval pairs only."""
    save_steps: int = 100
    """Full checkpoint every N optimizer steps; 0 = none."""
    keep_last_checkpoints: int = 2
    """Older checkpoints are deleted; 0 keeps all."""
    resume_from: str | None = None
    """"latest", a checkpoint path, or null."""
    stop_after_steps: int = 0
    """If > 0, stop after this step (with a checkpoint) without changing the schedule."""
    lora_rank: int = 0
    """0 trains every weight; > 0 trains LoRA adapters of this rank (peft, the ``lora`` extra)
    and saves the merged model."""
    lora_alpha: int = 16
    """LoRA alpha (OpenRLHF's default 16; peft's LoraConfig default is 8)."""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """Modules that get adapters (Llama and GPT-2 attention names; missing names are skipped)."""
    stopping: StoppingConfig = field(default_factory=lambda: StoppingConfig(patience=0, keep_best=False))
    """Early stopping on the eval split, which weights ``final/`` holds, a wall-clock budget.
    A reward model runs its whole epoch budget (the LR decays to 0) and ships the last weights,
    as SFT does: the eval loss turns up once the model grows overconfident on noisy labels,
    while its ranking still improves. Over 15 probes on five tasks (``bench/rm_probe.py``,
    BENCHMARKS.md "Reward models: the last weights"), the last weights agreed with the gold order as
    well as or better than those early stopping on the eval loss kept (patience 3), by up to
    0.04. Set ``{patience: 3, keep_best: true}`` to stop on the eval loss instead."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """DeepSpeed options (ZeRO stage, offload, bf16, clipping, seed)."""

    def __post_init__(self) -> None:
        # the defaults that depend on kind; the stage's saved config records the resolved values
        for name, by_kind in (("center_coef", CENTER_COEF), ("learning_rate", LEARNING_RATE)):
            if getattr(self, name) is None and self.kind in by_kind:
                object.__setattr__(self, name, by_kind[self.kind])
        problems = lora_problems(self.lora_rank, self.strategy.zero_stage)
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is empty: set it to the SFT model directory")
        for name in ("max_length", "batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set num_epochs > 0 or max_steps > 0")
        if self.center_coef is not None and self.center_coef < 0:
            raise ConfigError(f"center_coef={self.center_coef} must be >= 0")
        if self.kind not in REWARD_KINDS:
            raise ConfigError(f"kind={self.kind!r}: one of {', '.join(REWARD_KINDS)}")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} must be > 0")
        if self.kind == "implicit" and len(candidate_fractions(self.mismatched_negatives)) > 1:
            raise ConfigError(f"mismatched_negatives={self.mismatched_negatives}: an implicit reward model "
                              "scores alone in PPO, so train it with one value, or set kind: scalar for "
                              "candidates (PPO optimises their ensemble)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5): at 0.5 every pair "
                              "says nothing, above it the labels are read reversed")
        fractions = candidate_fractions(self.mismatched_negatives)
        if not fractions or min(fractions) < 0 or len({candidate_name(f) for f in fractions}) < len(fractions):
            raise ConfigError(f"mismatched_negatives={self.mismatched_negatives}: one value >= 0 or "
                              "several distinct ones (distinct to 6 significant digits: they name folders)")
        if len(fractions) > 1 and self.resume_from not in (None, "", "latest"):
            raise ConfigError(f"resume_from={self.resume_from!r} names one checkpoint, but mismatched_negatives "
                              f"trains {len(fractions)} reward models: resume with 'latest'")


def reference_path(model_name_or_path: str) -> str:
    """The reference of an implicit reward model trained from ``model_name_or_path``: the start's
    own reference when it is an implicit reward model already (a later round continues it, the
    reward still measured from SFT), else the start itself. A local directory comes back as an
    absolute path (PPO compares it with its own reference), a hub id as written."""
    spec = implicit_reward_spec(model_name_or_path)
    ref = spec["reference_model"] if spec is not None else model_name_or_path
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.is_dir() else ref


def refuse_scalar_start(model_name_or_path: str) -> None:
    """An implicit reward model starts from a causal LM; a scalar reward model's directory (a
    sequence classifier, e.g. an earlier round's) has no trained LM head to start from."""
    config = Path(model_name_or_path).expanduser() / "config.json"
    archs = (json.loads(config.read_text(encoding="utf-8")).get("architectures") or []) if config.is_file() else []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"kind=implicit starts from a causal LM, but {model_name_or_path!r} is a scalar reward "
                          f"model ({archs[0]}): start from the SFT model, or set kind: scalar")


def candidate_fractions(value: float | Sequence[float]) -> tuple[float, ...]:
    """``mismatched_negatives`` as the tuple of values to train: (0.5,) for 0.5."""
    return (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def candidate_name(fraction: float) -> str:
    """The candidate's folder under ``candidates/`` and its metrics' prefix: ``mismatched_0.5``."""
    return f"mismatched_{fraction:g}"


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss ``-(1 - eps) logsigmoid(d) - eps logsigmoid(-d) + coef * (r_c + r_r)^2`` with
    ``d = r_c - r_r - m``: (b,) -> (b,)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def mismatched_pairs(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Up to ``round(fraction * len(rows))`` pairs ``(prompt_i, chosen_i) > (prompt_i, chosen_j)``.

    ``i`` runs over a seeded permutation of the rows (a fresh one per pass when ``fraction`` > 1);
    ``j`` is the first row, walking a second permutation from the same position, whose prompt and
    chosen text both differ from ``i``'s, so every pair is a real mismatch. A row without such a
    partner gives none, and a pass that finds no pair at all ends the search. Margins are 0.
    """
    n = len(rows)
    rng = np.random.default_rng(seed)

    def draw_pass(left: int) -> Iterable[tuple[int, Iterable[int]]]:
        first, second = rng.permutation(n), rng.permutation(n)
        return ((i, (second[(k + step) % n] for step in range(n))) for k, i in enumerate(first[:left]))

    return pairs_from_partners(rows, round(fraction * n), draw_pass)


def pairs_from_partners(rows: list[dict[str, Any]], n_out: int,
                        draw_pass: Callable[[int], Iterable[tuple[int, Iterable[int]]]]) -> list[dict[str, Any]]:
    """Up to ``n_out`` pairs ``(prompt_i, chosen_i) > (prompt_i, chosen_j)``, margin 0.

    Each pass calls ``draw_pass(pairs still missing)`` for rows ``i``, each with its partner
    candidates ``j`` in order of preference; the first ``j`` whose prompt and chosen text both
    differ from ``i``'s is taken. A pass that finds no pair at all ends the search.
    """
    out: list[dict[str, Any]] = []
    while len(out) < n_out:
        found = len(out)
        for i, partners in draw_pass(n_out - len(out)):
            a = rows[i]
            for j in partners:
                b = rows[j]
                if b["prompt"] != a["prompt"] and b["chosen"] != a["chosen"]:
                    out.append({"prompt": a["prompt"], "chosen": a["chosen"], "rejected": b["chosen"],
                                "margin": 0.0})
                    break
        if len(out) == found:  # no row has a partner: more passes would find none either
            break
    return out


class RewardTrainer(SupervisedTrainer):
    """The reward-model loop; ``train()`` is the public entry point."""

    stage = "reward"
    lora_task = "SEQ_CLS"
    example_name = "pairs"

    cfg: RewardConfig

    def _encode(self, rows: list[dict[str, Any]]) -> list[EncodedPair]:
        use_margin = self.cfg.use_margin
        return [
            encode_pair(self.tokenizer, r["prompt"], r["chosen"], r["rejected"], self.cfg.max_length,
                        float(r.get("margin") or 0.0) if use_margin else 0.0)
            for r in rows
        ]

    def setup(self) -> None:
        cfg, s = self.cfg, self.strategy
        data = Path(cfg.data_dir)
        cols = ("prompt", "chosen", "rejected")
        train_rows = read_table(data / cfg.train_file, cols, ("margin",), text_columns=cols)
        eval_rows = read_table(data / "rm_eval.parquet", cols, ("margin",), text_columns=cols)
        if cfg.max_eval_examples > 0:
            eval_rows = eval_rows[: cfg.max_eval_examples]
        fractions = candidate_fractions(cfg.mismatched_negatives)
        if len(fractions) != 1:
            raise ConfigError(f"RewardTrainer trains one mismatched_negatives value, got {fractions}: "
                              "ppo_core.reward.train selects among several")
        extra = mismatched_pairs(train_rows, fractions[0], cfg.strategy.seed)
        self.data_counts = {"train_preference_pairs": len(train_rows), "train_mismatched_pairs": len(extra)}
        train_rows = train_rows + extra
        s.setup_distributed()
        s.set_seed()
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        self.ref: torch.nn.Module | None = None
        with s.partitioned_loading():  # ZeRO-3: each rank allocates only its shards
            if cfg.kind == "implicit":
                refuse_scalar_start(cfg.model_name_or_path)
                self.lora_task = "CAUSAL_LM"
                model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
                self.ref = s.prepare_eval(load_causal_lm(reference_path(cfg.model_name_or_path),
                                                         trust_remote_code=cfg.trust_remote_code))
            else:
                model = build_scorer_from_causal_lm(
                    cfg.model_name_or_path, pad_token_id=self.tokenizer.pad_token_id,
                    trust_remote_code=cfg.trust_remote_code, seed=cfg.strategy.seed,
                )
        training_dropout(model, cfg.dropout)
        self.train_data, self.eval_data = self._encode(train_rows), self._encode(eval_rows)
        if self.ref is not None:
            self._precompute_reference()
        self.prepare(model)

    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """The frozen reference's log-probs of every pair's answers, once (TRL's DPO
        ``precompute_ref_log_probs``): each step then runs one model instead of two, and the
        reference is freed before training starts. Every rank scores every pair in the same
        batches, so ZeRO-3's collective forwards line up."""
        assert self.ref is not None
        pad, size = self.tokenizer.pad_token_id, self.cfg.eval_batch_size
        for data in (self.train_data, self.eval_data):
            for start in range(0, len(data), size):
                chunk = data[start:start + size]
                batch = {k: v.to(self.strategy.device) for k, v in collate_pairs(chunk, pad).items()}
                logps = sequence_logprobs(self.ref, batch["input_ids"], batch["attention_mask"],
                                          batch["response_mask"]).tolist()  # (2b,)
                for k, pair in enumerate(chunk):
                    pair.ref_logps = (logps[k], logps[len(chunk) + k])
        destroy = getattr(self.ref, "destroy", None)  # a ZeRO-3 engine holds partitions
        if destroy is not None:
            destroy()
        self.ref = None
        gc.collect()

    def _scores(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen scores (b,), rejected scores (b,), margins (b,)) from one forward pass."""
        s = self.strategy
        batch = {k: v.to(s.device) for k, v in collate_pairs(pairs, self.tokenizer.pad_token_id).items()}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.cfg.kind == "implicit":  # beta x the answer's log-ratio to the reference (DPO)
            ref = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],  # type: ignore[index]
                               device=s.device)
            scores = self.cfg.beta * (sequence_logprobs(self.engine, ids, mask, batch["response_mask"]) - ref)
        else:
            scores = last_token_scores(self.engine, ids, mask)  # (2b,)
        b = len(pairs)
        return scores[:b], scores[b:], batch["margin"]

    def saved_files(self) -> dict[str, str]:
        if self.cfg.kind != "implicit":
            return {}
        spec = {"beta": self.cfg.beta, "reference_model": reference_path(self.cfg.model_name_or_path)}
        return {IMPLICIT_REWARD_FILE: json.dumps(spec, indent=1)}

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; the loss is the mean over the global batch's pairs (see SFT)."""
        cfg, s, engine = self.cfg, self.strategy, self.engine
        indices = self.sampler.batch(step)
        scale = self.grad_accum * s.world_size / len(indices)
        engine.train()
        lr = s.current_lr(engine)
        loss_sum, correct, gap_sum = 0.0, 0.0, 0.0
        grad_norm = float("nan")  # before clipping, of the step that ends the batch
        for mb in rank_micro_batches(indices, s.rank, s.world_size, cfg.micro_batch_size):
            rc, rr, margin = self._scores([self.train_data[i] for i in mb])
            loss = bradley_terry_loss(rc, rr, margin, cfg.center_coef, cfg.label_smoothing).sum()
            s.backward(loss * scale, engine)
            norm = s.step(engine)
            grad_norm = grad_norm if norm is None else norm
            loss_sum += float(loss.detach())
            correct += float((rc > rr).sum())
            gap_sum += float((rc - rr).detach().sum())
        n = len(indices)
        return {"train/loss": s.all_reduce_sum(loss_sum) / n, "train/accuracy": s.all_reduce_sum(correct) / n,
                "train/margin_mean": s.all_reduce_sum(gap_sum) / n, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/epoch": (step + 1) / self.sampler.steps_per_epoch}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (chosen scored above rejected), mean score gap, loss, score stats."""
        cfg, s = self.cfg, self.strategy
        self.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # n, correct, gap, loss, score sum, score^2 sum
        for idx in eval_shards(len(self.eval_data), s.rank, s.world_size, cfg.eval_batch_size):
            rows = [self.eval_data[i] for i in idx] or [self.eval_data[0]]  # same forward count (ZeRO-3)
            rc, rr, margin = self._scores(rows)
            if not idx:
                continue
            both = torch.cat([rc, rr]).double()
            sums += torch.tensor([
                len(idx), float((rc > rr).sum()), float((rc - rr).sum()),
                float(bradley_terry_loss(rc, rr, margin).sum()), float(both.sum()), float((both**2).sum()),
            ], dtype=torch.float64)
        sums = s.all_reduce_sum(sums)
        n = max(float(sums[0]), 1.0)
        mean = float(sums[4]) / (2 * n)
        var = max(float(sums[5]) / (2 * n) - mean**2, 0.0)
        return {"eval/accuracy": float(sums[1]) / n, "eval/margin_mean": float(sums[2]) / n,
                "eval/loss": float(sums[3]) / n, "eval/score_mean": mean, "eval/score_std": var**0.5}


SELECT_METRIC = "eval/accuracy"
"""What picks among candidates: accuracy on the eval split's real pairs ranks reward models the
way gold agreement does; the eval loss also grows with confidence on noisy labels (see
``stopping``)."""


def train(cfg: RewardConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the reward model; returns the summary (incl. ``eval/accuracy``), also in summary.json.
    Several ``mismatched_negatives`` values train one model each and ship the best
    (:func:`train_candidates`)."""
    fractions = candidate_fractions(cfg.mismatched_negatives)
    if len(fractions) > 1:
        return train_candidates(cfg, callbacks)
    return RewardTrainer(replace(cfg, mismatched_negatives=fractions[0]), callbacks).train()


def finished_summary(out_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished candidate an earlier attempt left in ``out_dir`` (None: train it);
    the pipeline's resume asks the same (``assets.models.finished_candidates``)."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary.get("completed") and (out_dir / "final").is_dir() else None


def train_candidates(cfg: RewardConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """One reward model per ``mismatched_negatives`` value, in order, under
    ``candidates/<candidate_name>/``; the one with the highest ``SELECT_METRIC`` is copied to
    ``final/`` and its summary becomes the stage's, with every candidate's score beside it.

    Candidates share a wall-clock budget (each gets an even share of what is left). With
    ``resume_from: latest`` a finished candidate is not trained again and the unfinished one
    resumes from its newest checkpoint. ``stop_after_steps`` stops inside the first candidate
    that reaches it, as the single-model stage does.
    """
    out, fractions = Path(cfg.output_dir), candidate_fractions(cfg.mismatched_negatives)
    strategy = DeepSpeedStrategy(cfg.strategy)
    strategy.setup_distributed()  # the rank checks below need the process group
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    for k, fraction in enumerate(fractions):
        name = candidate_name(fraction)
        sub_out = out / "candidates" / name
        # rank 0's answer for all: a rank that skipped alone would leave the others in collectives
        done = strategy.broadcast_object(finished_summary(sub_out) if cfg.resume_from else None)
        if done is None:
            stopping = cfg.stopping
            if stopping.max_seconds:
                left = max(stopping.max_seconds - (time.monotonic() - t0), 1.0)
                stopping = replace(stopping, max_seconds=left / (len(fractions) - k))
            sub = replace(cfg, output_dir=str(sub_out), mismatched_negatives=fraction, stopping=stopping)
            trainer = RewardTrainer(sub, [PrefixedCallbacks(callbacks, name)])
            done = trainer.train()
            # free this candidate's engine (weights, optimizer state) before the next one trains
            destroy = getattr(trainer.engine, "destroy", None)
            if destroy is not None:
                destroy()
            del trainer
            gc.collect()
            if not done["completed"]:  # stop_after_steps: resumable, nothing to select yet
                return finish_run(strategy, out, {**done, "output_dir": str(out), "candidate": name},
                                  CallbackList(callbacks))
        results.append({"mismatched_negatives": fraction, **done})
    # max() keeps the first of equal scores: a tie goes to the earlier value
    best = max(results, key=lambda r: float(r[SELECT_METRIC]))
    if strategy.is_rank_zero():
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best["final_model_dir"], tmp)
        replace_dir(tmp, out / "final")
    strategy.barrier()
    scores = {f"{candidate_name(r['mismatched_negatives'])}/{SELECT_METRIC}": float(r[SELECT_METRIC])
              for r in results}
    summary = {
        **best, "output_dir": str(out), "final_model_dir": str(out / "final"),
        "runtime_s": sum(float(r["runtime_s"]) for r in results),
        "candidate_metric": SELECT_METRIC, "candidate_dir": str(Path(best["output_dir"])),
        "candidates": [{k: r[k] for k in ("mismatched_negatives", SELECT_METRIC, "eval/loss", "output_dir",
                                          "runtime_s", "stopped_reason")} for r in results],
        **scores,
    }
    return finish_run(strategy, out, summary, CallbackList(callbacks))


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """``python -m ppo_core.reward --config FILE``; progress lines on rank 0's stderr."""
    from ppo_core.cli import run_stage

    return run_stage(RewardConfig, train, argv, callbacks, "python -m ppo_core.reward",
                     ("train/loss", "train/accuracy"))


if __name__ == "__main__":
    from ppo_core.strategy import exit_after_shutdown

    exit_after_shutdown(main())
