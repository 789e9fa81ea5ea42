"""PPO for language models: actor, critic, frozen reference and a reward source.

One PPO iteration ("step"):

1. **rollout** - sample ``rollout_batch_size`` responses per rank with the KV-cache sampler
   (:mod:`ppo_core.generation`), which also returns the old-policy log-probs, so there is no
   separate old-policy forward;
2. **scoring** - one batched forward each of the reference (log-probs on response positions
   only), the critic (values) and the reward model (score at the last token), or the user's
   ``module:function``; per-token KL folded into the reward, score at the last token, GAE and
   whitened advantages;
3. **training** - ``ppo_epochs`` passes over ``num_mini_batches`` shuffled mini-batches with
   the clipped policy and value losses and gradient clipping; separate AdamW optimizers and
   LR schedules (stepped per optimizer step) for actor and critic, as OpenRLHF does.

Speed without changing the arithmetic: the scoring and training forwards pack each batch's
episodes into rows of ``pack_capacity`` real tokens with a block-diagonal mask
(:mod:`ppo_core.packing`), so no padding position is computed and the linear layers see one
large matrix; models whose attention takes no 4D mask fall back to up to
``MAX_FORWARD_GROUPS`` padded groups of similar length (:func:`plan_length_groups`).
``parallel_critic`` runs the critic's scoring forward and update on a second thread.
``bench/ppo_vs_trl.py`` measures all of it against TRL.

Defaults reproduce TRL's ``PPOConfig`` (``trl/experimental/ppo/ppo_config.py``) where the two
agree with the bundled task's budget; every default names its source. Metrics use TRL's names.

Run: ``python -m ppo_core.ppo --config FILE`` or ``torchrun --nproc-per-node N -m ppo_core.ppo
--config FILE`` with ``strategy: {zero_stage: 2}`` (DeepSpeed ZeRO through
:mod:`ppo_core.strategy`; every rank samples its own ``rollout_batch_size`` episodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ppo_core import checkpoint as ckpt
from ppo_core import ppo_utils as U
from ppo_core.callbacks import Callback, CallbackList, ProgressPrinter
from ppo_core.config import ConfigError, parse_cli, to_dict
from ppo_core.data import encode_prompt, pad_sequences
from ppo_core.generation import GenerationOutput, sample
from ppo_core.guard import SELECT_RULES, GuardPoint, OveroptimizationGuard, SelectRule
from ppo_core.kl_controller import build_kl_controller
from ppo_core.models import (
    LORA_TARGETS,
    ModelLoadError,
    add_lora,
    build_scorer_from_causal_lm,
    disable_dropout,
    implicit_reward_spec,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    lora_problems,
    token_values,
    unwrap,
)
from ppo_core.packing import (
    PackedEpisodes,
    lm_logits,
    pack_episodes,
    scalar_head,
    supports_packing,
    trunk_hidden,
)
from ppo_core.rewards import (
    EnsembleReward,
    FunctionReward,
    ImplicitReward,
    ModelReward,
    RewardNormalizer,
    RewardSource,
)
from ppo_core.strategy import DeepSpeedStrategy, StrategyConfig

log = logging.getLogger(__name__)

# How the forwards over a batch lay out its episodes: packed rows (ppo_core.packing) or
# length groups of padded rows (row-index tensors, plan_length_groups).
Layout = PackedEpisodes | list[torch.Tensor]


# Forwards over a rollout or mini-batch run in at most this many groups of similar length.
MAX_FORWARD_GROUPS = 4
# Fixed cost of one more forward(+backward), in padded positions: on the benchmark's 2-layer
# width-128 model a forward+backward costs ~100 us per position plus ~6 ms per call
# (measured with bench/ppo_core_bench.py's model on one thread).
FORWARD_OVERHEAD_POSITIONS = 64
# PPOConfig.kl_coef's default: TRL's for a scalar reward, twice that for an implicit one
# (measured; the field's docstring says where).
KL_COEF_SCALAR = 0.05
KL_COEF_IMPLICIT = 0.1


# =============================================================================================
# configuration
# =============================================================================================
@dataclass(frozen=True)
class PPOConfig:
    """Everything a PPO run needs; loadable from JSON/YAML with ``ppo_core.config.load_config``."""

    # ---- inputs / outputs ----
    policy_path: str = ""
    """SFT output (``<sft_out>/final``): initial policy and frozen reference; also the tokenizer"""
    ref_model_path: str | None = None
    """frozen reference of the KL penalty when it differs from the initial policy (None: the
    policy_path model). Iterated rounds start from the current champion and keep the SFT model
    as reference, so the KL measures the whole drift from SFT (InstructGPT's penalty)"""
    train_file: str = ""
    """Parquet file with a ``prompt`` column (``ppo_train.parquet``)"""
    output_dir: str = ""
    """where ``final/``, ``checkpoints/`` and ``summary.json`` go"""
    reward_model_path: str | tuple[str, ...] | None = None
    """trained reward model (``<rm_out>/final``); exactly one of this and ``reward_function``.
    Several paths: PPO optimises their ensemble, each member standardised on reference-policy
    samples, then averaged (``ppo_core.rewards.EnsembleReward``); the critic starts from the first.
    An implicit reward model (``RewardConfig.kind: implicit``) scores alone, with its reference
    model (PPO's own when it is the same path)"""
    reward_function: str | None = None
    """``module:function`` taking (prompts, responses) -> list[float] (rule-based rewards, as
    OpenRLHF and veRL allow), used instead of a reward model"""
    eval_file: str | None = None
    """optional Parquet ``prompt`` file scored every ``eval_every`` steps and at the end"""
    critic_path: str | None = None
    """critic initialisation; default: the reward model (OpenRLHF and DeepSpeed-Chat initialise
    the critic from the RM), or the policy with a fresh head when rewards come from a function
    or an implicit reward model"""

    # ---- budget ----
    num_steps: int = 60
    """most PPO iterations (rollout + update); the over-optimization guard usually keeps an
    earlier step or stops sooner. 60 x 64 = 3,840 episodes: on the generality tasks
    (bench/tasks) the proxy and held-out scores were flat after ~30-40 steps"""
    rollout_batch_size: int = 64
    """episodes sampled per iteration per rank (TRL's ``local_batch_size``; TRL's default is
    per_device_train_batch_size 8 x grad-accum; 64 gives stable advantages on the tiny task)"""
    num_mini_batches: int = 2
    """mini-batches per PPO epoch (TRL default 1; 2 doubles the updates per rollout)"""
    ppo_epochs: int = 4
    """passes over each rollout (TRL ``num_ppo_epochs`` 4; OpenRLHF default 1)"""
    seed: int = 0
    """seeds weights of new heads, sampling, shuffling and the data order"""

    # ---- generation ----
    response_length: int = 32
    """maximum new tokens per response (TRL default 53; the bundled task's best answer is ~20
    tokens)"""
    max_prompt_length: int = 64
    """prompts longer than this many tokens are an error (never silently cut)"""
    temperature: float = 0.7
    """sampling temperature, TRL's PPOConfig default; log-probs are divided by it, so the ratio
    and the KL are those of the distribution actually sampled. On the bundled task 0.7 keeps the
    tiny SFT model's junk-token tail out of the rollouts, which 1.0 lets PPO drift into."""
    top_k: int = 0
    """must stay 0 (top-k off, as TRL samples): the trainer's log-probs, the ratio and the KL
    are those of the unfiltered softmax(logits / temperature), so filtered sampling would bias
    PPO; any other value is a ConfigError"""
    top_p: float = 1.0
    """must stay 1.0 (nucleus sampling off, as TRL samples), for the same reason as ``top_k``"""
    ds3_gather_for_generation: bool = True
    """under ZeRO-3, gather the policy's (and, for reward normalisation, the reference's)
    weights once per rollout and generate with the whole model on each rank, instead of
    all-gathering every layer at every decoded token. TRL's GRPO/RLOO option of the same name
    and default (``trl/trainer/grpo_config.py``: "disabling this option allows training models
    that exceed the VRAM capacity of a single GPU, albeit at the cost of slower generation").
    The samples do not depend on it (same tokens for the same seed, tests/test_zero3.py);
    no effect below stage 3"""

    # ---- optimisation ----
    learning_rate: float = 1e-4
    """policy Adam LR; TRL's 3e-6 is for pretrained 100M+ models (the pipeline's stages use it when
    ``base_model`` is pretrained, ``assets.models.PRETRAINED_DEFAULTS``), the tiny task model needs more"""
    critic_learning_rate: float = 3e-4
    """critic Adam LR (OpenRLHF uses a separate, larger critic LR: 9e-6 vs 5e-7 actor)"""
    lr_scheduler: Literal["linear", "constant", "cosine"] = "linear"
    """LR decay to 0 over all optimizer steps (TRL's ``lr_scheduler_type`` default linear);
    gradient clipping is ``strategy.gradient_clipping`` (1.0)"""
    warmup_steps: int = 0
    """linear warm-up steps (TRL default 0)"""
    adam_eps: float = 1e-5
    """Adam epsilon (CleanRL / OpenAI baselines PPO use 1e-5)"""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL default 0)"""

    # ---- PPO ----
    clip_range: float = 0.2
    """policy ratio clip (Schulman et al. 2017; TRL ``cliprange`` 0.2)"""
    value_clip_range: float = 0.2
    """value clip around the rollout values (TRL ``cliprange_value`` 0.2)"""
    vf_coef: float = 0.1
    """value-loss weight (TRL ``vf_coef`` 0.1); scales the critic's loss before clipping"""
    gamma: float = 1.0
    """discount (TRL and OpenRLHF default 1.0)"""
    lam: float = 0.95
    """GAE lambda (TRL and OpenRLHF default 0.95)"""
    whiten_advantages: bool = True
    """normalise advantages over the batch (TRL and OpenRLHF always do)"""
    whiten_rewards: bool = False
    """scale per-token rewards to unit variance (TRL ``whiten_rewards`` default False)"""

    # ---- KL ----
    kl_coef: float | None = None
    """initial KL penalty beta; None: 0.05 (TRL ``kl_coef``) for a scalar reward model or a
    reward function, 0.1 when ``reward_model_path`` is an implicit reward model. Its score is
    itself a log-ratio to the reference, and at 0.05 PPO against it ran to 2.5-3.9 nats on the
    style task and kept early checkpoints. Eight PPO reruns on five suite tasks (BENCHMARKS.md,
    "A KL coefficient for implicit reward models") at 0.1 against 0.05 gained +0.032 +- 0.013
    gold win rate, lost on none, and had equal or less KL on every one."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """per-token KL estimator (TRL ``kl_estimator`` default k1; k3 is unbiased and >= 0)"""
    kl_target: float | None = None
    """if set, adapt beta to this KL per episode (Ziegler et al. 2019 adaptive controller)"""
    kl_horizon: int = 10000
    """adaptive controller horizon in episodes (Ziegler et al. 2019 / OpenRLHF 10000)"""
    kl_ceiling: float | None = 5.0
    """keep the KL per episode (nats per response, the unit of ``objective/kl``) under this:
    beta rises above ``kl_coef`` only while the rollouts' KL is over ``(1 - kl_ceiling_margin)``
    of it, and the guard keeps only checkpoints under it (unless ``guard_kl_budget`` says
    otherwise); a run that stays under is the fixed-beta run. 0 or None: no ceiling, nor with
    ``kl_coef`` 0; a ``kl_target`` replaces it (the adaptive controller tracks that KL instead). 5 is measured
    (BENCHMARKS.md, "KL ceiling"): PPO's rollouts on style and arithmetic stay under it (they
    peak at 4.6 and 0.85 nats); on the bundled task and on recipe it kept the same gold win
    rate at half to three quarters of the KL, and on constraints, where PPO exploits the
    reward model, it lost less gold. 6 did no better anywhere"""
    kl_ceiling_margin: float = 0.1
    """how far below the ceiling the controller aims, as a fraction: beta holds the rollouts'
    KL near its aim give or take ~0.5 nats, so aiming at the ceiling itself left half the
    checkpoints over it (BENCHMARKS.md: recipe's win rate was 0.753 aiming at 5, 0.785 at 4.5)"""
    kl_ceiling_horizon: int = 128
    """the ceiling controller's horizon in episodes: up to +-10% of beta per 64-episode rollout.
    OpenRLHF's 10000 moves beta by at most 8% over a whole 3,840-episode run of this engine"""
    kl_ceiling_headroom: float | None = None
    """nats per response a run may add to its starting policy's own KL: the ceiling (the
    controller's aim and the guard's budget) becomes at least the starting KL plus this. The
    starting KL is the guard's step-0 measurement, or without a guard the first rollout's
    ``objective/kl`` (the same policy, before any update). For PPO from an already-trained
    policy that keeps SFT as its reference (an RLHF round from the champion), which otherwise
    starts near or over the ceiling and can only be pulled back towards SFT. None: the ceiling
    is fixed; no effect without a ceiling"""

    # ---- reward shaping ----
    normalize_reward: bool = True
    """rescale scores to mean 0 / std 1 on reference-policy samples before PPO (Ziegler et al.
    2019, section 2.2)"""
    reward_norm_samples: int = 256
    """reference samples used for that normalisation"""
    missing_eos_penalty: float | None = 1.0
    """subtracted from the score of responses cut without EOS (TRL option; its PPO example
    script uses 1.0)"""
    min_response_length: int = 1
    """responses with fewer tokens (EOS included) score no more than the worst other response
    of the rank's rollout, less ``missing_eos_penalty`` (:func:`ppo_utils.floor_short_responses`).
    The lineage sets it to the data's shortest response (``ppo_core.lengths``): a reward
    model's score for a shorter one, such as an empty answer, is extrapolation, and PPO finds
    it. 1 (the default) is off; it must stay below ``response_length``"""
    reward_clip: float | None = 10.0
    """clip the (normalised) score to +-this (OpenRLHF ``reward_clip_range`` (-10, 10)); None off"""

    # ---- LoRA ----
    lora_rank: int = 0
    """0 trains all policy weights; >0 trains LoRA adapters of this rank (peft)"""
    lora_alpha: int = 16
    """LoRA alpha (OpenRLHF's default 16; peft's LoraConfig default is 8)"""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """modules that get adapters (Llama and GPT-2 attention names; missing names are skipped)"""

    # ---- over-optimization guard (ppo_core.guard) ----
    guard_reward_model_path: str | None = None
    """a reward model the policy is never trained on (the lineage trains it on the disjoint
    ``rm_heldout`` pairs); with ``eval_file`` it scores held-out samples every ``guard_every``
    steps, a checkpoint within ``guard_select_z`` standard errors of the best score is kept
    (``guard_select`` says which), and the run stops once the score falls. None: no guard, the
    last step is kept"""
    guard_every: int = 5
    """steps between guard evaluations (each samples ``guard_prompts`` responses, four
    rollouts' worth at the defaults, and scores them with both reward models; on recipe's
    lineage the 13 evaluations and their checkpoints took 18 s of PPO's 122 s)"""
    guard_prompts: int = 256
    """responses per guard evaluation, one per ``eval_file`` prompt (cycling through them when
    there are fewer); the same prompts and random numbers every time, so successive points
    differ by the policy only. 256 puts the held-out mean's standard error near 0.06 (it is in
    units of the held-out model's spread on SFT samples)"""
    guard_kl_budget: float | None = None
    """largest KL to the reference (nats per response) a kept checkpoint may have; None: any,
    or ``kl_ceiling`` when that is set"""
    guard_select_z: float = 1.0
    """the guard's band: checkpoints whose held-out score is within this many standard errors
    of its difference from the best one's (paired differences: the guard's prompts and random
    numbers are the same at every evaluation); 0 keeps the best-scoring checkpoint"""
    guard_select: SelectRule = "latest"
    """which checkpoint of the band is kept: ``"latest"``, the last one (a checkpoint is given
    up only for a measurable decline), or ``"least_kl"``, the one closest to the reference when
    its KL is lower by more than ``guard_select_z`` standard errors of the difference (the
    one-standard-error rule, Breiman et al. 1984). ``"latest"``: on 67 recorded runs of six
    tasks, 0.020 +- 0.006 more gold win rate than ``"least_kl"`` at 0.21 +- 0.05 nats more KL
    (``ppo_core.guard``; BENCHMARKS.md, "The guard's band")"""
    guard_patience: int = 3
    """guard evaluations in a row clearly below the best (see ``guard_stop_z``) before the run
    stops (0: never stop early); without a ``kl_ceiling``, evaluations over the KL budget count
    too (under a ceiling its controller pulls the KL back, so they are only never kept)"""
    guard_stop_z: float = 1.0
    """an evaluation counts towards stopping when its held-out score is more than this many
    standard errors of the (paired) difference below the best, so a plateau's noise alone does
    not stop a run. Replayed on 33 recorded runs (BENCHMARKS.md, "Paired comparisons"), the
    paired rule stopped 5 early (four of them 120-step runs, at steps 40-90) where the
    unpaired one ran on, at the same gold win rate over the runs"""
    max_seconds: float = 0.0
    """wall-clock budget of the PPO loop in seconds (0: none); the run then ends as if
    ``num_steps`` were reached"""

    # ---- checkpoints / logging ----
    save_every: int = 20
    """full resumable checkpoint every N steps (0: only the final model)"""
    keep_last_checkpoints: int = 2
    """older checkpoints are deleted (as the SFT and RM stages do); 0 keeps all"""
    resume_from: str | None = None
    """checkpoint directory, or ``"latest"`` for the newest one under ``output_dir`` (fresh
    start when there is none)"""
    eval_every: int = 0
    """score ``eval_file`` every N steps (0: only at the end)"""
    log_every: int = 1
    """progress line every N steps on stderr"""
    pack_capacity: int = 128
    """positions per packed row in the scoring and training forwards (:mod:`ppo_core.packing`);
    0 turns packing off (padded length groups instead). A row's attention costs capacity^2:
    on the benchmark's width-128 model rows of 96-160 measured fastest (BENCHMARKS.md); wider
    models, where attention is a smaller share, can afford longer rows. A longer episode gets
    a row of its own"""
    parallel_critic: bool = False
    """run the critic on a second Python thread: its scoring forward while the reference and
    reward model score, its update while the actor's runs (torch ops release the GIL, so this
    uses a second core; each model's arithmetic is unchanged).
    Single process only; on tiny models one more core does more this way than as a second
    intra-op thread. Off by default: it doubles the cores a run takes"""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """DeepSpeed options (ZeRO stage, offload, clipping, bf16; ``StrategyConfig.zero_stage`` says
    why stage 0 is the default).
    ``bf16: true`` is OpenRLHF's and DeepSpeed-Chat's ``--bf16``: actor and critic are DeepSpeed
    bf16 engines (bf16 weights, fp32 master copies in the optimizer), the reference, reward and
    guard models are cast to bf16, and log-probs, entropies, values, scores, rewards and
    advantages are computed in float32 (logits are upcast before the temperature,
    :func:`ppo_core.ppo_utils.logprobs_from_logits`). Saved models hold the bf16 weights"""

    def __post_init__(self) -> None:
        if self.kl_coef is None:  # resolved here, so the stage's saved config records the value
            paths = as_paths(self.reward_model_path)  # a one-element list is the single model too
            implicit = len(paths) == 1 and implicit_reward_spec(paths[0]) is not None
            object.__setattr__(self, "kl_coef", KL_COEF_IMPLICIT if implicit else KL_COEF_SCALAR)
        errors = _validate(self)
        if errors:
            raise ConfigError("invalid PPOConfig:\n  - " + "\n  - ".join(errors))


def kl_limits(cfg: PPOConfig) -> tuple[float | None, float | None]:
    """(the KL the ceiling controller aims under, the guard's KL budget): none of either when a
    ``kl_target`` is tracked instead, the ceiling is 0, or ``kl_coef`` is 0 (no penalty to
    raise: the controller scales beta); ``guard_kl_budget`` wins when set."""
    ceiling = None if cfg.kl_target is not None or cfg.kl_coef == 0 else (cfg.kl_ceiling or None)
    aim = None if ceiling is None else ceiling * (1.0 - cfg.kl_ceiling_margin)
    return aim, (cfg.guard_kl_budget if cfg.guard_kl_budget is not None else ceiling)


def _validate(cfg: PPOConfig) -> list[str]:
    """Every problem at once, each saying what to change."""
    e: list[str] = []
    if not cfg.policy_path:
        e.append("policy_path is empty: set it to the SFT output's final/ directory")
    if not cfg.train_file:
        e.append("train_file is empty: set it to ppo_train.parquet (column 'prompt')")
    if not cfg.output_dir:
        e.append("output_dir is empty: set a directory for final/, checkpoints/ and summary.json")
    if cfg.pack_capacity < 0:
        e.append(f"pack_capacity={cfg.pack_capacity}: set it >= 1 (positions per packed row) or "
                 "0 to turn packing off")
    if (cfg.reward_model_path is None) == (cfg.reward_function is None):
        e.append("set exactly one of reward_model_path (a trained RM) and reward_function "
                 "('module:function')")
    if cfg.reward_model_path is not None and not reward_model_paths(cfg):
        e.append("reward_model_path is an empty list: give one reward model or several")
    if cfg.reward_function is not None and ":" not in cfg.reward_function:
        e.append(f"reward_function {cfg.reward_function!r} must look like 'package.module:function'")
    for name in ("num_steps", "rollout_batch_size", "num_mini_batches", "ppo_epochs",
                 "response_length", "max_prompt_length", "kl_horizon", "kl_ceiling_horizon", "log_every",
                 "min_response_length"):
        if getattr(cfg, name) < 1:
            e.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.min_response_length > 1 and cfg.min_response_length >= cfg.response_length:
        e.append(f"min_response_length {cfg.min_response_length} >= response_length {cfg.response_length}: "
                 "every response that ends would count as too short; lower it, or 1 turns it off")
    if cfg.num_mini_batches >= 1 and cfg.rollout_batch_size % cfg.num_mini_batches:
        e.append(f"rollout_batch_size {cfg.rollout_batch_size} is not divisible by num_mini_batches "
                 f"{cfg.num_mini_batches}: change one so each mini-batch has the same size")
    elif cfg.num_mini_batches >= 1 and cfg.rollout_batch_size // cfg.num_mini_batches < 2:
        e.append("each mini-batch needs >= 2 episodes: raise rollout_batch_size or lower "
                 "num_mini_batches")
    for name in ("learning_rate", "critic_learning_rate", "adam_eps", "clip_range",
                 "value_clip_range"):
        if not getattr(cfg, name) > 0:
            e.append(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.temperature < 0:
        e.append(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.temperature == 0:
        e.append("temperature 0 (greedy) gives PPO no exploration and undefined ratios: use > 0")
    if cfg.top_k != 0 or cfg.top_p != 1.0:
        # the sampler's log-probs and every recomputed one (actor, reference) are those of the
        # unfiltered softmax(logits / T): filtered samples would make the ratio and KL biased
        e.append(f"top_k={cfg.top_k}, top_p={cfg.top_p}: PPO samples from the full "
                 "distribution (top_k 0, top_p 1.0) because its log-probs, ratio and KL are "
                 "those of the unfiltered softmax(logits / temperature); use temperature to "
                 "sharpen sampling instead")
    if not 0 <= cfg.gamma <= 1 or not 0 <= cfg.lam <= 1:
        e.append(f"gamma and lam must be in [0, 1], got {cfg.gamma}, {cfg.lam}")
    if cfg.kl_coef < 0 or cfg.vf_coef <= 0:
        e.append(f"kl_coef must be >= 0 and vf_coef > 0, got {cfg.kl_coef}, {cfg.vf_coef}")
    if cfg.kl_target is not None and cfg.kl_target <= 0:
        e.append(f"kl_target must be > 0 or null, got {cfg.kl_target}")
    if cfg.kl_ceiling is not None and cfg.kl_ceiling < 0:
        e.append(f"kl_ceiling must be > 0, or 0 / null for none, got {cfg.kl_ceiling}")
    if not 0 <= cfg.kl_ceiling_margin < 1:
        e.append(f"kl_ceiling_margin must be in [0, 1), got {cfg.kl_ceiling_margin}")
    if (cfg.normalize_reward or len(reward_model_paths(cfg)) > 1) and cfg.reward_norm_samples < 2:
        e.append("reward_norm_samples must be >= 2 when normalize_reward is true or with several reward models")
    if cfg.reward_clip is not None and cfg.reward_clip <= 0:
        e.append(f"reward_clip must be > 0 or null, got {cfg.reward_clip}")
    e.extend(lora_problems(cfg.lora_rank, cfg.strategy.zero_stage))
    if cfg.guard_reward_model_path is not None and not cfg.eval_file:
        e.append("guard_reward_model_path needs eval_file: the guard scores held-out prompts")
    if cfg.guard_every < 1 or cfg.guard_prompts < 1 or cfg.guard_patience < 0 or cfg.max_seconds < 0:
        e.append("guard_every and guard_prompts must be >= 1, guard_patience and max_seconds >= 0")
    if cfg.guard_select not in SELECT_RULES:
        e.append(f"guard_select must be one of {', '.join(SELECT_RULES)}, got {cfg.guard_select!r}")
    if cfg.guard_select_z < 0 or cfg.guard_stop_z < 0:
        e.append(f"guard_select_z and guard_stop_z must be >= 0, got {cfg.guard_select_z}, {cfg.guard_stop_z}")
    if cfg.kl_ceiling_headroom is not None and cfg.kl_ceiling_headroom <= 0:
        e.append(f"kl_ceiling_headroom must be > 0 or null, got {cfg.kl_ceiling_headroom}")
    if cfg.guard_kl_budget is not None and cfg.guard_kl_budget <= 0:
        e.append(f"guard_kl_budget must be > 0 or null, got {cfg.guard_kl_budget}")
    if min(cfg.save_every, cfg.eval_every, cfg.warmup_steps, cfg.keep_last_checkpoints) < 0:
        e.append("save_every, eval_every, warmup_steps and keep_last_checkpoints must be >= 0")
    if cfg.strategy.seed != StrategyConfig.seed:
        e.append(f"strategy.seed ({cfg.strategy.seed}) is not read by PPO, which seeds everything from "
                 "its own `seed`: set that instead")
    if cfg.parallel_critic and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        e.append("parallel_critic needs a single process (two threads would issue the actor's "
                 "and the critic's collectives in a different order on each rank): set it to "
                 "false under torchrun")
    return e


def same_dir(a: str, b: str) -> bool:
    """Whether two model paths name the same directory (hub ids compare as written)."""
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def reward_model_paths(cfg: PPOConfig) -> tuple[str, ...]:
    """``reward_model_path`` as a tuple: () with a reward function, one path, or the ensemble's."""
    return as_paths(cfg.reward_model_path)


def as_paths(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A ``reward_model_path`` value (also one read back from a checkpoint's config) as a tuple."""
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def check_inputs(cfg: PPOConfig) -> None:
    """File-system checks that need no model: fail before any training starts."""
    problems = []
    paths = [(name, getattr(cfg, name)) for name in ("policy_path", "ref_model_path", "critic_path",
                                                       "guard_reward_model_path")]
    paths += [("reward_model_path", path) for path in reward_model_paths(cfg)]
    for name, value in paths:
        if value and value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            problems.append(f"{name} {value!r} is not a directory (expected a save_pretrained dir)")
    for name in ("train_file", "eval_file"):
        value = getattr(cfg, name)
        if value and not Path(value).is_file():
            problems.append(f"{name} {value!r} does not exist (expected a Parquet file with a "
                            "'prompt' column)")
    if problems:
        raise ConfigError("invalid PPOConfig:\n  - " + "\n  - ".join(problems))


# =============================================================================================
# distributed helpers (plain torch.distributed; DeepSpeed wraps the models when enabled)
# =============================================================================================
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_across_ranks(strategy: DeepSpeedStrategy, values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank calls it); one all-reduce for all of them,
    on the device the backend needs (``DeepSpeedStrategy.all_reduce_mean``)."""
    if strategy.world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = strategy.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))


# =============================================================================================
# data
# =============================================================================================
def read_prompts(path: str, column: str = "prompt") -> list[str]:
    """The ``prompt`` column of a Parquet file; empty or non-string rows are an error."""
    import pandas as pd  # only needed here; keeps import of the module light

    df = pd.read_parquet(path)
    if column not in df.columns:
        raise ConfigError(f"{path}: no '{column}' column (columns: {list(df.columns)}); PPO "
                          "reads prompts from ppo_train.parquet / ppo_eval.parquet")
    prompts = df[column].tolist()
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ConfigError(f"{path}: {len(bad)} empty or non-string '{column}' value(s), first at "
                          f"rows {bad[:5]}; fix or drop them upstream")
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_len: int, where: str) -> list[list[int]]:
    """Token ids per prompt, as SFT saw them (``ppo_core.data.encode_prompt``: BOS when the
    tokenizer adds one, the chat template when it has one)."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if too_long:
        longest = max(len(ids[i]) for i in too_long)
        raise ConfigError(f"{where}: {len(too_long)} prompt(s) exceed max_prompt_length="
                          f"{max_len} tokens (longest {longest}, first at row {too_long[0]}); "
                          "raise max_prompt_length")
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ConfigError(f"{where}: prompt(s) at rows {empty[:5]} tokenize to nothing")
    return ids



class PromptStream:
    """Endless shuffled prompt order: epoch ``e`` is ``randperm(n)`` seeded with seed + e.

    The position is two integers (``epoch``, ``index``), so a checkpoint restores it exactly.
    Each global batch is ``world * batch`` prompts; rank ``r`` takes its contiguous slice.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_indices(self) -> list[int]:
        want, out = self.batch * self.world, []
        while len(out) < want:
            order = self._order(self.epoch)
            take = order[self.index: self.index + want - len(out)]
            out.extend(take)
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out[self.rank * self.batch: (self.rank + 1) * self.batch]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise ConfigError(f"checkpoint was taken with {state['n']} training prompts, the "
                              f"train_file now has {self.n}: resume with the same data")
        self.epoch, self.index = state["epoch"], state["index"]


# =============================================================================================
# models being trained: plain torch or DeepSpeed
# =============================================================================================
class Trainee:
    """A trained model as a DeepSpeed engine with its AdamW optimizer and LR schedule."""

    def __init__(self, strategy: DeepSpeedStrategy, model: torch.nn.Module, lr: float,
                 cfg: PPOConfig) -> None:
        mb = cfg.rollout_batch_size // cfg.num_mini_batches
        total = cfg.num_steps * cfg.ppo_epochs * cfg.num_mini_batches
        grouped = strategy.create_optimizer(model, lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        # same decay grouping, but the fused kernel: torch's default on CPU is a per-tensor
        # Python loop, a visible share of a tiny model's update time
        optimizer = torch.optim.AdamW(
            [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in grouped.param_groups],
            lr=lr, eps=cfg.adam_eps, fused=True)
        scheduler = strategy.create_scheduler(optimizer, cfg.lr_scheduler, total, cfg.warmup_steps)
        # one mini-batch per optimizer step on each rank: no gradient accumulation
        self.strategy = strategy
        self.engine = strategy.prepare_train(model, optimizer, scheduler,
                                             train_batch_size=mb * strategy.world_size,
                                             micro_batch_size=mb)

    @property
    def module(self) -> torch.nn.Module:
        return unwrap(self.engine)

    def backward_and_step(self, loss: torch.Tensor) -> float:
        """Backward, clip, step, zero grads; the global grad norm before clipping."""
        self.engine.backward(loss)
        norm = self.strategy.step(self.engine)
        assert norm is not None, "PPO steps at every mini-batch (no gradient accumulation)"
        return norm

    def lr(self) -> float:
        return DeepSpeedStrategy.current_lr(self.engine)


# =============================================================================================
# the engine
# =============================================================================================
@dataclass
class Rollout:
    """One batch of scored episodes; response-aligned tensors are (B, T)."""

    gen: GenerationOutput
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor         # (B,) after normalisation, EOS penalty and clipping
    raw_scores: torch.Tensor     # (B,) straight from the reward source
    kl: torch.Tensor             # (B, T) per-token estimator, 0 on padding
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    texts: list[str] = field(default_factory=list)


class PPOTrainer:
    """Owns the models, optimizers, KL controller, data position and RNGs of one PPO run."""

    def __init__(self, cfg: PPOConfig, strategy: DeepSpeedStrategy) -> None:
        self.cfg = cfg
        self.strategy = strategy
        strategy.setup_distributed()
        self.rank, self.world = _world()
        self.step = 0
        self.episodes = 0

        self.tokenizer = load_tokenizer(cfg.policy_path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        prompts = read_prompts(cfg.train_file)
        self.prompts = prompts
        self.prompt_ids = encode_prompts(self.tokenizer, prompts, cfg.max_prompt_length, cfg.train_file)
        self.eval_prompts = read_prompts(cfg.eval_file) if cfg.eval_file else []
        self.eval_ids = (encode_prompts(self.tokenizer, self.eval_prompts, cfg.max_prompt_length,
                                        cfg.eval_file) if cfg.eval_file else [])
        self.stream = PromptStream(len(prompts), cfg.rollout_batch_size, cfg.seed, self.rank, self.world)

        torch.manual_seed(cfg.seed)
        if cfg.ref_model_path:
            self._check_same_tokenizer(cfg.ref_model_path)
        rm_paths = reward_model_paths(cfg)
        for other in (*rm_paths, cfg.critic_path):
            if other is not None:
                self._check_same_tokenizer(other)
        # under ZeRO-3 every model is created already partitioned: no rank ever holds a
        # whole one (a no-op at lower stages)
        with strategy.partitioned_loading():
            policy = load_causal_lm(cfg.policy_path)
            self.ref = strategy.prepare_eval(load_causal_lm(cfg.ref_model_path or cfg.policy_path))
            self.reward: RewardSource
            implicit = [path for path in rm_paths if implicit_reward_spec(path) is not None]
            if implicit and len(rm_paths) > 1:
                raise ConfigError(f"reward_model_path: {implicit[0]!r} is an implicit reward model, which "
                                  "scores alone; give it as the only reward model")
            if implicit:
                self.reward = self._implicit_reward(rm_paths[0])
            else:
                rms = [strategy.prepare_eval(load_sequence_scorer(path, pad_token_id=self.pad_id))
                       for path in rm_paths]
                if len(rms) > 1:
                    self.reward = EnsembleReward(rms)
                elif rms:
                    self.reward = ModelReward(rms[0])
                else:
                    self.reward = FunctionReward(cfg.reward_function or "")
            critic_src = cfg.critic_path or (rm_paths[0] if rm_paths and not implicit else None)
            if critic_src is not None:
                critic = load_sequence_scorer(critic_src, pad_token_id=self.pad_id)
            else:
                critic = build_scorer_from_causal_lm(cfg.policy_path, pad_token_id=self.pad_id,
                                                     seed=cfg.seed)
        if cfg.lora_rank > 0:
            policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                              task_type="CAUSAL_LM")
        policy.config.use_cache = True
        # dropout stays off for good: eval() mode everywhere, gradients still flow
        for m in (policy, critic):
            disable_dropout(m).eval()
        self.actor = Trainee(strategy, policy, cfg.learning_rate, cfg)
        self.critic = Trainee(strategy, critic, cfg.critic_learning_rate, cfg)
        for t in (self.actor, self.critic):
            t.engine.eval()
        aim, budget = kl_limits(cfg)
        self.kl_ctl = build_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, aim, cfg.kl_ceiling_horizon)
        self.normalizer: RewardNormalizer | None = None
        self.guard_rm: ModelReward | ImplicitReward | None = None
        # under a KL ceiling the guard keeps only checkpoints within it, and waits while the
        # controller pulls an overshoot back instead of stopping the run
        self.guard = OveroptimizationGuard(budget, cfg.guard_patience, stop_z=cfg.guard_stop_z,
                                           select_z=cfg.guard_select_z, budget_stops=aim is None,
                                           prefer=cfg.guard_select)
        self.guard_normalizer: RewardNormalizer | None = None
        if cfg.guard_reward_model_path is not None:
            self._check_same_tokenizer(cfg.guard_reward_model_path)
            with strategy.partitioned_loading():
                if implicit_reward_spec(cfg.guard_reward_model_path) is not None:
                    self.guard_rm = self._implicit_reward(cfg.guard_reward_model_path)
                else:
                    held = load_sequence_scorer(cfg.guard_reward_model_path, pad_token_id=self.pad_id)
                    self.guard_rm = ModelReward(strategy.prepare_eval(held))
        # sampling draws on the device the model runs on (multinomial needs its generator there)
        self.sample_rng = torch.Generator(device=strategy.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.shuffle_rng = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + self.rank)
        self.timings: dict[str, float] = {}
        # positions (padding included) and real tokens of the update's policy forwards
        self.forward_positions: dict[str, int] = {"train_positions": 0, "train_tokens": 0}
        # ZeRO-3 forwards are collective: every rank must run the same number of them, and
        # the grouping depends on each rank's own lengths
        zero3_multi = cfg.strategy.zero_stage == 3 and self.world > 1
        self.max_forward_groups = 1 if zero3_multi else MAX_FORWARD_GROUPS
        self.forward_overhead_positions = FORWARD_OVERHEAD_POSITIONS
        # packing is one forward per model and batch on every rank (ZeRO-3 safe); it is
        # used only when each model reproduces its padded forward packed (checked once here)
        scorers = [self.critic.module, *(m.model for m in self.reward_members())]
        self.packing = cfg.pack_capacity > 0 and all(
            [supports_packing(m, "lm", self.pad_id) for m in (self.actor.module, self.ref)]
            + [supports_packing(m, "scorer", self.pad_id) for m in scorers])
        self._critic_pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- setup helpers
    def _implicit_reward(self, path: str) -> ImplicitReward:
        """The implicit reward model in ``path`` with its reference: PPO's reference model when
        both are the same directory (the usual case, the SFT model), else its own copy."""
        spec = implicit_reward_spec(path)
        assert spec is not None
        ref_path = spec["reference_model"]
        if same_dir(ref_path, self.cfg.ref_model_path or self.cfg.policy_path):
            ref = self.ref
        else:
            self._check_same_tokenizer(ref_path)
            ref = self.strategy.prepare_eval(load_causal_lm(ref_path))
        return ImplicitReward(self.strategy.prepare_eval(load_causal_lm(path)), ref, spec["beta"])

    def _check_same_tokenizer(self, path: str) -> None:
        try:
            other = load_tokenizer(path)
        except ModelLoadError:
            # a model dir without tokenizer files: the vocabulary size is all there is to compare
            vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size") \
                if (Path(path) / "config.json").is_file() else None
            if vocab is not None and vocab < len(self.tokenizer):
                raise ConfigError(f"{path!r} has vocab_size {vocab}, smaller than policy_path's tokenizer "
                                  f"({len(self.tokenizer)} tokens); PPO scores token ids directly")
            log.warning("%s has no tokenizer files: cannot check that it shares policy_path's tokenizer "
                        "(vocab_size %s); PPO scores token ids directly", path, vocab)
            return
        if other.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(f"{path!r} uses a different tokenizer from policy_path "
                              f"{self.cfg.policy_path!r}; PPO scores token ids directly, so the "
                              "reference and reward model must share the SFT/base tokenizer")

    # ---------------------------------------------------------------- rollout
    def next_prompts(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        idx = self.stream.next_indices()
        ids, mask = self.prompt_batch([self.prompt_ids[i] for i in idx])
        return [self.prompts[i] for i in idx], ids, mask

    def prompt_batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask (B, P) on the device the models run on."""
        ids, mask = pad_sequences(prompts, self.pad_id, side="left")
        return ids.to(self.strategy.device), mask.to(self.strategy.device)

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, model: torch.nn.Module | None = None,
                 temperature: float | None = None, generator: torch.Generator | None = None,
                 ) -> GenerationOutput:
        """Sample responses to left-padded prompts (B, P) with ``model`` (default: the policy
        being trained; an engine or a module). Under ZeRO-3 the weights are gathered once for
        the whole call unless ``ds3_gather_for_generation`` is off (see
        :meth:`DeepSpeedStrategy.generation_model`); below it the plain module is called."""
        with self.strategy.generation_model(self.actor.engine if model is None else model,
                                            gather=self.cfg.ds3_gather_for_generation) as m:
            return sample(m, ids, mask,
                          max_new_tokens=self.cfg.response_length, eos_token_id=self.eos_id,
                          pad_token_id=self.pad_id,
                          temperature=self.cfg.temperature if temperature is None else temperature,
                          top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                          generator=self.sample_rng if generator is None else generator)

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(responses.masked_fill(~mask, self.pad_id),
                                           skip_special_tokens=True)

    def reward_members(self) -> list[ModelReward]:
        """The scalar reward models PPO scores with: one, an ensemble's members, or none (a
        function or an implicit reward model)."""
        if isinstance(self.reward, EnsembleReward):
            return self.reward.members
        return [self.reward] if isinstance(self.reward, ModelReward) else []

    def raw_scores(self, prompts: list[str], gen: GenerationOutput,
                   layout: Layout | None = None) -> tuple[torch.Tensor, list[str]]:
        """Reward-source scores (B,) and the decoded responses; a scalar reward model scores in
        ``layout`` (the score at each episode's last token), a function or an implicit reward
        model gets the whole batch."""
        texts = self.decode(gen.responses, gen.response_mask)
        if not self.reward_members():
            # a function scores on the CPU; the rollout's tensors live on the model's device.
            # An implicit reward model scores here too, in one padded forward per model
            scores = self.reward(prompts, texts, gen.sequences, gen.attention_mask,
                                 response_mask=gen.sequence_response_mask)
            return scores.float().to(gen.sequences.device), texts
        raw = self.member_scores(gen, layout)
        return (self.reward.combine(raw) if isinstance(self.reward, EnsembleReward) else raw[0]), texts

    def member_scores(self, gen: GenerationOutput, layout: Layout | None = None) -> torch.Tensor:
        """Raw scores (M, B) of each reward model (M = 1 without an ensemble) in ``layout``: the
        score at each episode's last token."""
        models = [m.model for m in self.reward_members()]
        layout = self.layout(gen) if layout is None else layout
        if isinstance(layout, PackedEpisodes):
            with torch.no_grad():
                return torch.stack([scalar_head(rm, trunk_hidden(rm, layout)[layout.last]) for rm in models])
        # a reward model reads only the token tensors, so it can score group by group
        scores = self._grouped(gen, layout, lambda sub: tuple(
            m([], [], sub.sequences, sub.attention_mask).float() for m in self.reward_members()))
        return torch.stack([t for t in scores if t is not None])

    def shape_scores(self, raw: torch.Tensor, ended: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalise, penalise missing EOS, floor responses shorter than the data's, clip (in
        that order, so the penalties are in units of the normalised score as in TRL, where RM
        scores are ~unit scale). ``lengths``: (B,) response tokens, EOS included."""
        scores = self.normalizer(raw) if self.normalizer is not None else raw.clone()
        scores = U.apply_missing_eos_penalty(scores, ended, self.cfg.missing_eos_penalty)
        scores = U.floor_short_responses(scores, lengths < self.cfg.min_response_length,
                                         self.cfg.missing_eos_penalty or 0.0)
        if self.cfg.reward_clip is not None:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        return scores

    def layout(self, gen: GenerationOutput) -> Layout:
        """How the forwards over ``gen`` run: packed rows, or padded length groups."""
        if self.packing:
            return pack_episodes(gen, self.cfg.pack_capacity, self.pad_id).to(self.strategy.device)
        return self.length_groups(gen)

    def _count_train_positions(self, positions: int, tokens: int) -> None:
        if torch.is_grad_enabled():  # the update's forwards: what the padding share counts
            self.forward_positions["train_positions"] += positions
            self.forward_positions["train_tokens"] += tokens

    def length_groups(self, gen: GenerationOutput) -> list[torch.Tensor]:
        """Row groups of similar length for the forwards over ``gen`` (one group: no split)."""
        if self.max_forward_groups <= 1 or gen.responses.shape[0] < 2:
            return [torch.arange(gen.responses.shape[0])]
        P = gen.prompt_length
        return plan_length_groups(gen.attention_mask[:, :P].sum(1).tolist(),
                                  gen.response_mask.sum(1).tolist(), self.max_forward_groups,
                                  self.forward_overhead_positions)

    def _grouped(self, gen: GenerationOutput, groups: list[torch.Tensor] | None,
                 fn: Callable[[GenerationOutput], tuple[torch.Tensor | None, ...]],
                 ) -> tuple[torch.Tensor | None, ...]:
        """``fn`` on each length group of ``gen`` (each cut to its own width), results put back
        in row order. (b, T_g) outputs are zero-padded to (b, T); (b,) outputs are stacked.

        A padded forward costs in proportion to rows x width; one rollout mixes 5-token and
        64-token responses, so splitting it into groups of similar length computes far fewer
        padding positions. Every row's result is the same as in one big forward (position ids
        and masks are per row), so the losses and their gradients do not change.
        """
        groups = self.length_groups(gen) if groups is None else groups
        if len(groups) == 1 and groups[0].numel() == gen.responses.shape[0]:
            return fn(gen)
        T = gen.responses.shape[1]
        parts = [fn(_rows(gen, rows)) for rows in groups]
        order = torch.cat(groups)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        merged: list[torch.Tensor | None] = []
        for k in range(len(parts[0])):
            outs = [part[k] for part in parts]
            if outs[0] is None:
                merged.append(None)
                continue
            outs = [F.pad(o, (0, T - o.shape[1])) if o.dim() == 2 else o for o in outs]
            merged.append(torch.cat(outs)[inverse])
        return tuple(merged)

    def policy_logprobs(self, model: torch.nn.Module, gen: GenerationOutput,
                        with_entropy: bool = False, layout: Layout | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Temperature-corrected log-probs of the response tokens (B, T), and the entropy
        (B, T) if asked; 0 on padding. The LM head runs on response positions only."""
        layout = self.layout(gen) if layout is None else layout
        if isinstance(layout, PackedEpisodes):
            self._count_train_positions(layout.positions, layout.tokens)
            logits = lm_logits(model, trunk_hidden(model, layout)[layout.before])  # (N, V)
            logp = U.logprobs_from_logits(logits, layout.targets, self.cfg.temperature)
            ent = None
            if with_entropy:
                with torch.no_grad():
                    ent = layout.to_response_grid(
                        U.entropy_from_logits(logits.detach(), self.cfg.temperature))
            return layout.to_response_grid(logp), ent
        logp, ent = self._grouped(gen, layout,
                                  lambda sub: self._policy_logprobs_dense(model, sub, with_entropy))
        assert logp is not None
        return logp, ent

    def _policy_logprobs_dense(self, model: torch.nn.Module, gen: GenerationOutput,
                               with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward whose LM head runs on the response positions only (``logits_to_keep``)."""
        T = gen.responses.shape[1]
        self._count_train_positions(gen.attention_mask.numel(), int(gen.attention_mask.sum()))
        logits = model(input_ids=gen.sequences, attention_mask=gen.attention_mask,
                       position_ids=U.position_ids_from_mask(gen.attention_mask),
                       logits_to_keep=T + 1, use_cache=False).logits[:, :-1]   # (B, T, V)
        logp = U.logprobs_from_logits(logits, gen.responses, self.cfg.temperature)
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = U.entropy_from_logits(logits.detach(), self.cfg.temperature)
        return logp, ent

    def critic_values(self, model: torch.nn.Module, gen: GenerationOutput,
                      layout: Layout | None = None) -> torch.Tensor:
        """V before each response token: the head at positions P-1 .. P+T-2. (B, T)"""
        layout = self.layout(gen) if layout is None else layout
        if isinstance(layout, PackedEpisodes):
            hidden = trunk_hidden(model, layout)[layout.before]
            return layout.to_response_grid(scalar_head(model, hidden))

        def dense(sub: GenerationOutput) -> tuple[torch.Tensor]:
            P, T = sub.prompt_length, sub.responses.shape[1]
            return (token_values(model, sub.sequences, sub.attention_mask)[:, P - 1: P + T - 1],)

        (values,) = self._grouped(gen, layout, dense)
        assert values is not None
        return values

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg = self.cfg
        prompts, ids, mask = self.next_prompts()
        t0 = time.perf_counter()
        gen = self.generate(ids, mask)
        t1 = time.perf_counter()
        m = gen.response_mask
        logprobs = gen.logprobs * m
        layout = self.layout(gen)
        # parallel_critic: the critic's forward meanwhile on its thread (grad mode is
        # per thread, hence the explicit no_grad there)
        critic = (self._critic_thread().submit(torch.no_grad()(self.critic_values),
                                               self.critic.module, gen, layout)
                  if cfg.parallel_critic else None)
        ref_logprobs, _ = self.policy_logprobs(self.ref, gen, layout=layout)
        ref_logprobs = ref_logprobs * m
        raw, texts = self.raw_scores(prompts, gen, layout)
        values = (critic.result() if critic else self.critic_values(self.critic.module, gen, layout)) * m
        scores = self.shape_scores(raw, gen.ended, m.sum(1))
        kl = U.kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator) * m
        rewards = U.place_score_at_last_token(-self.kl_ctl.value * kl, scores, m)
        if cfg.whiten_rewards:
            rewards = U.masked_whiten(rewards, m, shift_mean=False)
        advantages, returns = U.gae_advantages(values, rewards, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = U.masked_whiten(advantages, m)
        t2 = time.perf_counter()
        self.timings.update({"time/generation": t1 - t0, "time/scoring": t2 - t1})
        return Rollout(gen, logprobs, ref_logprobs, values, scores, raw, kl, rewards, advantages,
                       returns, texts)

    # ---------------------------------------------------------------- update
    def train_on(self, ro: Rollout) -> dict[str, float]:
        cfg = self.cfg
        B = ro.gen.responses.shape[0]
        mb = B // cfg.num_mini_batches
        stats: dict[str, list[float]] = {k: [] for k in (
            "approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio",
            "grad_norm", "critic_grad_norm")}
        t0 = time.perf_counter()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle_rng)
            for start in range(0, B, mb):
                b = _select(ro, order[start:start + mb])
                layout = self.layout(b.gen)
                # the two models' updates are independent: the critic's may run meanwhile
                critic = (self._critic_thread().submit(self._critic_update, b, layout)
                          if cfg.parallel_critic else None)
                for key, value in self._actor_update(b, layout).items():
                    stats[key].append(value)
                critic_stats = critic.result() if critic else self._critic_update(b, layout)
                for key, value in critic_stats.items():
                    stats[key].append(value)
        self.timings["time/training"] = time.perf_counter() - t0
        ratio = torch.tensor(stats["ratio"])
        return {
            "policy/approxkl_avg": float(np.mean(stats["approxkl"])),
            "policy/clipfrac_avg": float(np.mean(stats["clipfrac"])),
            "policy/entropy_avg": float(np.mean(stats["entropy"])),
            "loss/policy_avg": float(np.mean(stats["pg_loss"])),
            "loss/value_avg": float(np.mean(stats["vf_loss"])),
            "val/clipfrac_avg": float(np.mean(stats["vf_clipfrac"])),
            "val/ratio": float(ratio.mean()),
            "val/ratio_var": float(ratio.var()) if ratio.numel() > 1 else 0.0,
            "policy/grad_norm": float(np.mean(stats["grad_norm"])),
            "val/grad_norm": float(np.mean(stats["critic_grad_norm"])),
        }

    def _actor_update(self, b: MiniBatch, layout: Layout) -> dict[str, float]:
        """Clipped policy loss on mini-batch ``b``, one optimizer step; scalar statistics."""
        m = b.gen.response_mask
        new_logp, ent = self.policy_logprobs(self.actor.engine, b.gen, with_entropy=True,
                                             layout=layout)
        pg_loss, pg = U.policy_loss(new_logp, b.logprobs, b.advantages, m, self.cfg.clip_range)
        assert ent is not None
        return {"grad_norm": self.actor.backward_and_step(pg_loss),
                "approxkl": float(pg["approxkl"]), "clipfrac": float(pg["clipfrac"]),
                "ratio": float(pg["ratio"]), "pg_loss": float(pg_loss.detach()),
                "entropy": float(U.masked_mean(ent, m))}

    def _critic_update(self, b: MiniBatch, layout: Layout) -> dict[str, float]:
        """Clipped value loss on mini-batch ``b``, one optimizer step; scalar statistics."""
        vpred = self.critic_values(self.critic.engine, b.gen, layout)
        vf_loss, vf = U.value_loss(vpred, b.values, b.returns, b.gen.response_mask,
                                   self.cfg.value_clip_range)
        return {"critic_grad_norm": self.critic.backward_and_step(self.cfg.vf_coef * vf_loss),
                "vf_loss": float(vf_loss.detach()), "vf_clipfrac": float(vf["clipfrac"])}

    def _critic_thread(self) -> ThreadPoolExecutor:
        """The one worker thread of ``parallel_critic`` (created on first use)."""
        if self._critic_pool is None:
            self._critic_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic")
        return self._critic_pool

    def close(self) -> None:
        """Stop the ``parallel_critic`` worker thread, if any."""
        if self._critic_pool is not None:
            self._critic_pool.shutdown(wait=True)
            self._critic_pool = None

    def rollout_metrics(self, ro: Rollout) -> dict[str, float]:
        m = ro.gen.response_mask
        kl_sum = ro.kl.sum(1)
        non_score = (-self.kl_ctl.value * ro.kl).sum(1)
        lengths = m.sum(1).float()
        return {
            "objective/kl": float(kl_sum.mean()),
            "objective/entropy": float((-ro.logprobs * m).sum(1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((non_score + ro.scores).mean()),
            "objective/scores": float(ro.scores.mean()),
            "objective/raw_scores": float(ro.raw_scores.mean()),
            "objective/kl_coef": float(self.kl_ctl.value),
            "val/explained_variance": U.explained_variance(ro.values, ro.returns, m),
            "val/num_eos_tokens": float(ro.gen.ended.sum()),
            "val/ended_frac": float(ro.gen.ended.float().mean()),
            "val/response_length": float(lengths.mean()),
            "val/short_frac": float((lengths < self.cfg.min_response_length).float().mean()),
        }

    def train_step(self) -> dict[str, float]:
        """One PPO iteration; returns the metrics of this step (averaged over ranks)."""
        t0 = time.perf_counter()
        self.forward_positions = {"train_positions": 0, "train_tokens": 0}
        ro = self.rollout()
        metrics = self.rollout_metrics(ro)
        metrics.update(self.train_on(ro))
        metrics["lr"] = self.actor.lr()
        # the KL controller sees the rollout's mean KL over all ranks' episodes
        mean_kl = _mean_across_ranks(self.strategy, {"kl": metrics["objective/kl"]})["kl"]
        self.kl_ctl.update(mean_kl, self.cfg.rollout_batch_size * self.world)
        self.step += 1
        self.episodes += self.cfg.rollout_batch_size * self.world
        elapsed = time.perf_counter() - t0
        tokens = float(ro.gen.response_mask.sum())
        metrics.update(self.timings)
        metrics.update({
            "episode": float(self.episodes),
            "eps": self.cfg.rollout_batch_size / elapsed,
            "time/step": elapsed,
            "perf/generated_tokens_per_s": tokens / max(self.timings["time/generation"], 1e-9),
            # 0: the fast decoder fell back to the model's own forward (why: logged once at setup)
            "perf/fast_decode": float(ro.gen.fast_decode),
            "perf/sequence_tokens": float(ro.gen.attention_mask.numel()),
            "perf/train_forward_positions": float(self.forward_positions["train_positions"]),
            "perf/train_forward_tokens": float(self.forward_positions["train_tokens"]),
        })
        metrics = _mean_across_ranks(self.strategy, metrics)
        metrics["eps"] *= self.world
        return metrics

    # ---------------------------------------------------------------- reward normalisation
    @torch.no_grad()
    def fit_normalizer(self) -> None:
        """Score ``reward_norm_samples`` reference-policy samples; mean/std over all ranks. An
        ensemble first gets each member's mean/std from them, then the normaliser its score's."""
        cfg = self.cfg
        n_local = max(2, math.ceil(cfg.reward_norm_samples / self.world))
        rng = torch.Generator(device=self.strategy.device).manual_seed(cfg.seed * 1000 + 900 + self.rank)
        order = torch.randperm(len(self.prompts), generator=rng, device=rng.device).tolist()
        chosen = [order[i % len(order)] for i in range(n_local)]
        ensemble = self.reward if isinstance(self.reward, EnsembleReward) else None
        rows = []  # (M, b) per batch: an ensemble's member scores, else the reward's (1, b)
        for start in range(0, n_local, cfg.rollout_batch_size):
            idx = chosen[start:start + cfg.rollout_batch_size]
            ids, mask = self.prompt_batch([self.prompt_ids[i] for i in idx])
            gen = self.generate(ids, mask, model=self.ref, generator=rng)
            rows.append(self.member_scores(gen) if ensemble is not None
                        else self.raw_scores([self.prompts[i] for i in idx], gen)[0][None])
        x = torch.cat(rows, dim=1)                                                          # (M, n_local)
        if ensemble is not None:
            ensemble.fit(*self._mean_std_across_ranks(x))   # each member's own, then the ensemble's
            x = ensemble.combine(x)[None]
            if not cfg.normalize_reward:
                return
        mean, std = self._mean_std_across_ranks(x)
        self.normalizer = RewardNormalizer(mean=float(mean[0]), std=max(float(std[0]), 1e-6))

    def _mean_std_across_ranks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample standard deviation (R,) of each row of ``x`` (R, n_local) over every
        rank's columns."""
        x = x.double()
        sums = self.strategy.all_reduce_sum(torch.stack([x.sum(1), (x * x).sum(1), torch.full_like(x[:, 0], x.shape[1])]))
        n = sums[2]
        mean = sums[0] / n
        return mean, ((sums[1] / n - mean * mean).clamp_min(0) * n / (n - 1).clamp_min(1)).sqrt()

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy responses of the current policy on ``eval_file``: normalised scores (no EOS
        penalty or clipping) and EOS rate."""
        if not self.eval_ids:
            return {}
        bs = self.cfg.rollout_batch_size
        mine = list(range(self.rank, len(self.eval_ids), self.world))
        # every rank runs the same number of batches (ZeRO-3 forwards are collective); a
        # rank with fewer prompts repeats one and leaves the repeats out of the sums
        per_rank = math.ceil(len(self.eval_ids) / self.world)
        padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
        total = {"score": 0.0, "ended": 0.0, "n": 0.0}
        for start in range(0, per_rank, bs):
            idx = padded[start:start + bs]
            valid = max(0, min(len(mine) - start, len(idx)))
            ids, mask = self.prompt_batch([self.eval_ids[i] for i in idx])
            gen = self.generate(ids, mask, temperature=0.0)
            raw, _ = self.raw_scores([self.eval_prompts[i] for i in idx], gen)
            scores = self.normalizer(raw) if self.normalizer else raw
            total["score"] += float(scores[:valid].sum())
            total["ended"] += float(gen.ended[:valid].float().sum())
            total["n"] += valid
        total = _mean_across_ranks(self.strategy, total)   # the means of sums keep the ratio right
        n = max(total["n"], 1e-9)
        return {"eval/scores": total["score"] / n, "eval/ended_frac": total["ended"] / n}

    # ---------------------------------------------------------------- over-optimization guard
    @torch.no_grad()
    def guard_point(self) -> tuple[GuardPoint, list[dict[str, Any]]]:
        """Sample the guard's held-out prompts once with the current policy; their proxy and
        held-out scores and KL per response, and the samples (rank 0 gets every rank's)."""
        cfg = self.cfg
        assert self.guard_rm is not None
        n = cfg.guard_prompts
        # common random numbers: the same draws at every evaluation, so two points differ by
        # the policy, not by the sampler's luck
        rng = torch.Generator(device=self.strategy.device).manual_seed(cfg.seed * 1000 + 700 + self.rank)
        mine = [i % len(self.eval_ids) for i in range(self.rank, n, self.world)]
        per_rank = math.ceil(n / self.world)   # same batch count on every rank (ZeRO-3)
        padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
        proxy, held, kl, lengths, rows = [], [], [], [], []
        for start in range(0, per_rank, cfg.rollout_batch_size):
            idx = padded[start:start + cfg.rollout_batch_size]
            valid = max(0, min(len(mine) - start, len(idx)))
            prompts = [self.eval_prompts[i] for i in idx]
            ids, mask = self.prompt_batch([self.eval_ids[i] for i in idx])
            gen = self.generate(ids, mask, generator=rng)
            layout = self.layout(gen)
            m = gen.response_mask
            ref_logprobs, _ = self.policy_logprobs(self.ref, gen, layout=layout)
            seq_kl = ((gen.logprobs - ref_logprobs) * m).sum(1)   # (B,) k1, summed per response
            raw, texts = self.raw_scores(prompts, gen, layout)
            scores = self.normalizer(raw) if self.normalizer is not None else raw
            held_raw = self.guard_rm([], [], gen.sequences, gen.attention_mask,
                                     response_mask=gen.sequence_response_mask)
            proxy += scores[:valid].tolist()
            held += held_raw[:valid].tolist()
            kl += seq_kl[:valid].tolist()
            lengths += m.sum(1)[:valid].tolist()
            rows += [{"prompt": p, "response": t} for p, t in zip(prompts[:valid], texts[:valid])]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, (proxy, held, kl, lengths, rows))
            proxy, held, kl, lengths, rows = ([x for g in gathered for x in g[i]] for i in range(5))
        held_t = torch.tensor(held, dtype=torch.float64)
        if self.guard_normalizer is None:
            # the held-out model's scale is its own: measure it on the first point's samples,
            # the starting policy's (Ziegler et al. 2019). The proxy's normaliser samples the
            # reference, which is the same policy unless PPO starts from another one (a round
            # from the champion): then guard/proxy and guard/heldout are on different scales
            self.guard_normalizer = RewardNormalizer.fit(held_t)
        # a response shorter than the data's is floored as in PPO's reward (shape_scores; here
        # without its EOS penalty and clip): the held-out model is an implicit one too, and
        # rates the empty answer as highly
        short = torch.tensor(lengths) < cfg.min_response_length
        penalty = cfg.missing_eos_penalty or 0.0
        held_n = U.floor_short_responses(self.guard_normalizer(held_t), short, penalty)
        proxy = U.floor_short_responses(torch.tensor(proxy, dtype=torch.float64), short, penalty).tolist()
        for row, p, h, k in zip(rows, proxy, held_n.tolist(), kl):
            row.update({"step": self.step, "proxy": p, "heldout": h, "kl": k})
        point = GuardPoint(step=self.step, proxy=float(np.mean(proxy)), heldout=float(held_n.mean()),
                           heldout_se=float(held_n.std() / math.sqrt(max(len(held), 1))),
                           kl=float(np.mean(kl)), kl_se=float(np.std(kl, ddof=1) / math.sqrt(len(kl)))
                           if len(kl) > 1 else 0.0,
                           heldout_values=tuple(held_n.tolist()), kl_values=tuple(float(k) for k in kl))
        return point, rows

    def best_dir(self, step: int | None = None) -> Path:
        """Where the guard's candidate checkpoints are saved (one directory per step)."""
        root = Path(self.cfg.output_dir) / "best"
        return root if step is None else root / f"step-{step:06d}"

    def run_guard(self, samples_file: Path) -> tuple[GuardPoint, bool]:
        """One guard evaluation: record it, save the weights if they may be kept and delete those
        that no longer can; returns the point and whether the run should stop."""
        point, rows = self.guard_point()
        decision = self.guard.update(point)
        if self.rank == 0:
            samples_file.parent.mkdir(parents=True, exist_ok=True)
            with samples_file.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        if decision.keep:
            self.strategy.save_pretrained(self.actor.engine, self.tokenizer, self.best_dir(point.step))
        if self.rank == 0:
            for step in decision.drop:
                shutil.rmtree(self.best_dir(step), ignore_errors=True)
        return point, decision.stop

    def widen_ceiling(self, start_kl: float) -> float | None:
        """``kl_ceiling_headroom``: raise the ceiling to at least ``start_kl`` + headroom (the
        controller's aim follows, and the guard's budget unless ``guard_kl_budget`` is set);
        returns the ceiling in force, None without a headroom."""
        cfg = self.cfg
        if cfg.kl_ceiling_headroom is None or kl_limits(cfg)[0] is None:
            return None
        ceiling = max(float(cfg.kl_ceiling), start_kl + cfg.kl_ceiling_headroom)
        self.kl_ctl.target = ceiling * (1.0 - cfg.kl_ceiling_margin)
        if cfg.guard_kl_budget is None:
            self.guard.kl_budget = ceiling
        return ceiling

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state beyond engines and global RNGs (per-rank generators included)."""
        gens = {"sample_rng": self.sample_rng.get_state().tolist(),
                "shuffle_rng": self.shuffle_rng.get_state().tolist()}
        all_gens = [gens]
        if self.world > 1:
            all_gens = [None] * self.world
            dist.all_gather_object(all_gens, gens)
        ensemble = self.reward.state_dict() if isinstance(self.reward, EnsembleReward) else None
        return {"kl_controller": self.kl_ctl.state_dict(),
                "reward_normalizer": self.normalizer.state_dict() if self.normalizer else None,
                "reward_ensemble": ensemble,
                "guard": self.guard.state_dict(), "guard_samples_key": self.guard_samples_key(),
                "guard_normalizer": self.guard_normalizer.state_dict() if self.guard_normalizer else None,
                "episodes": self.episodes, "generators_by_rank": all_gens}

    def guard_samples_key(self) -> str:
        """What fixes the order of the guard's responses (its prompts, their count, the seed and
        the ranks): points pair response by response only when it is unchanged."""
        key = json.dumps([self.eval_prompts, self.cfg.guard_prompts, self.cfg.seed, self.world])
        return hashlib.sha256(key.encode()).hexdigest()

    def save_checkpoint(self) -> Path:
        """Full checkpoint: actor/critic engines (weights, optimizer, scheduler), RNGs, KL
        controller, reward normalisation, data position, step; atomic (tmp dir + rename)."""
        return ckpt.save_checkpoint(
            self.strategy, self.checkpoint_dir(), self.step,
            {"actor": self.actor.engine, "critic": self.critic.engine},
            stage="ppo", config=to_dict(self.cfg), data_position=self.stream.state_dict(),
            extra=self.extra_state(), keep_last=self.cfg.keep_last_checkpoints or None)

    def load_checkpoint(self, path: Path) -> None:
        state = ckpt.load_checkpoint(self.strategy, path,
                                     {"actor": self.actor.engine, "critic": self.critic.engine})
        if state.get("stage") != "ppo":
            raise ConfigError(f"resume_from {str(path)!r} is a {state.get('stage')!r} checkpoint, "
                              "not a PPO one")
        extra = state["extra"]
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data_position"])
        self.kl_ctl.load_state_dict(extra["kl_controller"])
        norm = extra.get("reward_normalizer")
        self.normalizer = RewardNormalizer(**norm) if norm else None
        if isinstance(self.reward, EnsembleReward):
            if not extra.get("reward_ensemble"):
                raise ConfigError(f"{str(path)!r} was saved without a reward ensemble; resume it with "
                                  "the reward_model_path it was trained with")
            saved = [str(Path(p).resolve()) for p in as_paths((state.get("config") or {}).get("reward_model_path"))]
            members = reward_model_paths(self.cfg)
            if saved and saved != [str(Path(p).resolve()) for p in members]:
                # each member's mean and std belong to that model, in that order
                raise ConfigError(f"{str(path)!r} was trained against the reward ensemble {saved}; "
                                  f"this run has {list(members)}")
            self.reward.load_state_dict(extra["reward_ensemble"])
        elif extra.get("reward_ensemble"):
            raise ConfigError(f"{str(path)!r} was trained against a reward ensemble; resume it with the "
                              "reward_model_path list it was trained with")
        if extra.get("guard") is not None:
            self.guard.load_state_dict(extra["guard"])
            if extra.get("guard_samples_key") != self.guard_samples_key():
                # another eval_file (or order, count, seed, world): earlier responses do not line
                # up with the next ones, so those points compare as independent means
                self.guard.forget_values()
                log.warning("resumed guard: its held-out prompts differ from the checkpoint's; "
                            "earlier evaluations are compared as independent means")
        gnorm = extra.get("guard_normalizer")
        self.guard_normalizer = RewardNormalizer(**gnorm) if gnorm else None
        samples = Path(self.cfg.output_dir) / "guard_samples.jsonl"
        if self.rank == 0 and samples.is_file():
            # evaluations after the checkpoint are redone by this run: drop their samples
            kept = [line for line in samples.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            samples.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.episodes = int(extra["episodes"])
        gens = extra["generators_by_rank"][self.rank]
        self.sample_rng.set_state(torch.tensor(gens["sample_rng"], dtype=torch.uint8))
        self.shuffle_rng.set_state(torch.tensor(gens["shuffle_rng"], dtype=torch.uint8))
        for t in (self.actor, self.critic):
            t.engine.eval()

    def save_final(self) -> Path:
        """``<output_dir>/final``: the policy (LoRA merged) + tokenizer, safetensors, atomic."""
        return self.strategy.save_pretrained(self.actor.engine, self.tokenizer,
                                             Path(self.cfg.output_dir) / "final")


@dataclass
class MiniBatch:
    """Rows ``idx`` of a rollout, cut to the columns where at least one of them is real.

    ``gen`` spans ``P' + T'`` columns: the prompt columns from the first one any row of the
    mini-batch uses (left padding shared by all rows is dropped) and the response columns up
    to the longest response in the mini-batch (right padding shared by all rows is dropped).
    The (B', T') tensors are the rollout's stored values on the same response columns.
    Position ids come from the attention mask and every dropped column is masked out for
    every row, so the losses equal the untrimmed ones (``tests/test_ppo.py`` checks).
    """

    gen: GenerationOutput
    logprobs: torch.Tensor      # (B', T') old-policy log-probs
    values: torch.Tensor        # (B', T') rollout values
    advantages: torch.Tensor    # (B', T')
    returns: torch.Tensor       # (B', T')


def _rows(gen: GenerationOutput, idx: torch.Tensor, trim: bool = True) -> GenerationOutput:
    """Rows ``idx`` of ``gen``; with ``trim``, only the columns where one of them is real.

    Prompts are left-padded and never empty, so the prompt columns in use are a suffix; a
    response is right-padded and has >= 1 real token (the first is never padding). Dropped
    columns are masked out for every kept row and position ids come from the mask, so each
    row's forward result is unchanged.
    """
    P = gen.prompt_length
    attention_mask, response_mask = gen.attention_mask[idx], gen.response_mask[idx]
    first, T = 0, response_mask.shape[1]
    if trim:
        first = int(attention_mask[:, :P].any(0).to(torch.long).argmax())
        T = max(int(response_mask.sum(1).max()), 1)
    return GenerationOutput(
        sequences=gen.sequences[idx, first:P + T], attention_mask=attention_mask[:, first:P + T],
        responses=gen.responses[idx, :T], response_mask=response_mask[:, :T],
        ended=gen.ended[idx], logprobs=None, prompt_length=P - first)


def _select(ro: Rollout, idx: torch.Tensor, trim: bool = True) -> MiniBatch:
    """Mini-batch ``idx`` of ``ro``; ``trim=False`` keeps the rollout's full width.

    A rollout's width is set by its longest prompt and longest response; the columns that
    are padding for every row of the mini-batch are dropped here, and the stored (B, T)
    tensors are cut to the same response columns.
    """
    gen = _rows(ro.gen, idx, trim)
    T = gen.responses.shape[1]
    return MiniBatch(gen, ro.logprobs[idx, :T], ro.values[idx, :T], ro.advantages[idx, :T],
                     ro.returns[idx, :T])


def plan_length_groups(prompt_lengths: Sequence[int], response_lengths: Sequence[int],
                       max_groups: int = 4,
                       overhead_positions: int = FORWARD_OVERHEAD_POSITIONS) -> list[torch.Tensor]:
    """Split rows into <= ``max_groups`` groups that minimise the positions padded forwards
    compute: sum over groups of rows x (longest prompt + longest response) plus
    ``overhead_positions`` per extra forward (its fixed cost in units of positions).

    Rows are ordered by response length (then prompt length) and cut into contiguous runs by
    dynamic programming. Returns the groups as index tensors (together: every row once).
    """
    n = len(prompt_lengths)
    if n != len(response_lengths) or n == 0:
        raise ValueError(f"plan_length_groups: {n} prompt lengths vs {len(response_lengths)} "
                         "response lengths; need the same non-zero number")
    order = sorted(range(n), key=lambda i: (response_lengths[i], prompt_lengths[i]))
    p = [int(prompt_lengths[i]) for i in order]
    r = [int(response_lengths[i]) for i in order]
    inf = float("inf")
    # best[g][j]: least cost of the first j ordered rows in g groups; cut[g][j]: last group start
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        widest_prompt = 0
        for i in range(j - 1, -1, -1):      # the last group is ordered rows i .. j-1
            widest_prompt = max(widest_prompt, p[i])
            cost = (j - i) * (widest_prompt + r[j - 1]) + overhead_positions
            for g in range(1, max_groups + 1):
                if best[g - 1][i] + cost < best[g][j]:
                    best[g][j], cut[g][j] = best[g - 1][i] + cost, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while g > 0:
        i = cut[g][j]
        groups.append(torch.tensor(order[i:j], dtype=torch.long))
        j, g = i, g - 1
    return groups[::-1]


# =============================================================================================
# entry points
# =============================================================================================
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: PPOConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run PPO as configured; returns (and writes to ``summary.json``) the final metrics."""
    check_inputs(cfg)
    strategy = DeepSpeedStrategy(cfg.strategy)
    _seed_everything(cfg.seed)
    trainer = PPOTrainer(cfg, strategy)
    default = [ProgressPrinter(every=cfg.log_every, keys=(
        "objective/scores", "objective/kl", "val/ended_frac", "eps"))] if trainer.rank == 0 else []
    cb = CallbackList(list(callbacks) or default)
    try:
        resume = ckpt.resolve_resume(cfg.resume_from, trainer.checkpoint_dir())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    resumed: dict[str, int] = {}
    if resume is not None:
        trainer.load_checkpoint(resume)
        resumed["resumed_from_step"] = trainer.step   # the summary says the run continued one
    elif cfg.normalize_reward or isinstance(trainer.reward, EnsembleReward):
        trainer.fit_normalizer()  # an ensemble's members are standardised even without it
    cb.on_train_begin("ppo", cfg.num_steps, to_dict(cfg))
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    samples_file = Path(cfg.output_dir) / "guard_samples.jsonl"
    guarded = trainer.guard_rm is not None
    reason = "completed"

    def guard_eval() -> bool:
        point, stop = trainer.run_guard(samples_file)
        cb.on_evaluate(trainer.step, {
            "guard/proxy": point.proxy, "guard/heldout": point.heldout, "guard/heldout_se": point.heldout_se,
            "guard/kl_per_response": point.kl, "guard/sqrt_kl": math.sqrt(max(point.kl, 0.0))})
        return stop

    def widen(start_kl: float) -> None:
        ceiling = trainer.widen_ceiling(start_kl)
        if ceiling is not None:
            cb.on_log(trainer.step, {"objective/kl_ceiling": ceiling})

    try:
        if guarded and not trainer.guard.points:
            guard_eval()   # step 0: the reference policy, the baseline to beat
            widen(trainer.guard.points[0].kl)
        while trainer.step < cfg.num_steps:
            metrics = trainer.train_step()
            cb.on_log(trainer.step, metrics)
            if not guarded and trainer.step == 1:
                widen(metrics["objective/kl"])   # rollout 1 sampled the starting policy
            if cfg.eval_every and trainer.step % cfg.eval_every == 0 and trainer.step < cfg.num_steps:
                cb.on_evaluate(trainer.step, trainer.evaluate())
            if guarded and trainer.step % cfg.guard_every == 0 and guard_eval():
                reason = trainer.guard.reason
                break
            if cfg.save_every and trainer.step % cfg.save_every == 0:
                path = trainer.save_checkpoint()
                cb.on_checkpoint(trainer.step, str(path))
            if cfg.max_seconds and bool(trainer.strategy.broadcast_object(
                    time.perf_counter() - t0 >= cfg.max_seconds)):
                reason = "time_budget"
                break
        if guarded and trainer.guard.points[-1].step != trainer.step:
            guard_eval()   # the last weights are a candidate too
    finally:
        trainer.close()
    kept = trainer.step
    kept_point = trainer.guard.kept if guarded else None
    if kept_point is not None and kept_point.step != trainer.step:
        # ship the kept checkpoint's saved weights, not the last step's; eval_file is not
        # re-scored for them (the guard's own measurement of that step is under guard/*)
        kept = kept_point.step
        final = trainer.strategy.move_dir(trainer.best_dir(kept), Path(cfg.output_dir) / "final")
        eval_metrics: dict[str, float] = {}
    else:
        eval_metrics = trainer.evaluate()
        if eval_metrics:
            cb.on_evaluate(trainer.step, eval_metrics)
        final = trainer.save_final()
    if trainer.rank == 0:
        shutil.rmtree(trainer.best_dir(), ignore_errors=True)
    summary: dict[str, Any] = {**metrics, **eval_metrics, "step": trainer.step, "kept_step": kept,
                               "stopped_reason": reason, **resumed, **trainer.guard.summary(),
                               "train_seconds": time.perf_counter() - t0,
                               "output_dir": str(Path(cfg.output_dir)), "final_dir": str(final)}
    if guarded:
        summary["guard_samples_file"] = str(samples_file)
        summary["guard_select"] = cfg.guard_select
    if trainer.normalizer is not None:
        summary.update({"reward_norm/mean": trainer.normalizer.mean,
                        "reward_norm/std": trainer.normalizer.std})
    if isinstance(trainer.reward, EnsembleReward):
        # each member's reference mean and std: the report scores with the same weighting
        summary["reward_ensemble"] = {"paths": list(reward_model_paths(cfg)), **trainer.reward.state_dict()}
    if trainer.rank == 0:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    cb.on_train_end(summary)
    return summary


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """``python -m ppo_core.ppo --config FILE``; 0 on success, 2 on a bad configuration."""
    from ppo_core.cli import configure_logging

    configure_logging()
    try:
        cfg = parse_cli(PPOConfig, argv, prog="python -m ppo_core.ppo")
        check_inputs(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(cfg, callbacks)
    return 0


if __name__ == "__main__":
    from ppo_core.strategy import exit_after_shutdown

    exit_after_shutdown(main())
