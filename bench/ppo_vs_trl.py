"""PPO speed, ours against TRL's ``trl.experimental.ppo.PPOTrainer``, on the same work (issue 5).

Both stacks get the same tokenizer, the same initial policy / reference / critic / reward
weights (loaded from one set of safetensors files), the same prompts and the same
hyperparameters, and run the same number of iterations, each in its own subprocess (so peak
RSS is per stack and neither inherits the other's allocator state; ``--tiny`` runs them in
one process to fit the test budget). Then one table:
episodes/s, generated tokens/s, time split, peak RSS, gold-reward gain and KL to the
reference, with a ratio column. Extra sections: our sampler against ``model.generate``,
training FLOP/s against the measured matmul peak, step time against response length and
batch size.

    .venv/bin/python bench/ppo_vs_trl.py --out bench/results/latest.json
    .venv/bin/python bench/ppo_vs_trl.py --tiny --out /tmp/tiny.json     # ~1 min, for tests

A second scale (issue 13): the same comparison on a 6-layer width-512 Llama (25.4M parameters)
where matrix multiplies dominate, speed only, both stacks per round in ABBA order, episodes/s
median / mean +- standard error over rounds, the ratio ours/TRL per round and the share of the
matmul peak each stack's iteration reaches (FLOP accounting: :data:`FLOP_FORMULA`; ~13 min,
plus ~8 min to build and cache its fixture the first time):

    .venv/bin/python bench/ppo_vs_trl.py --scale 20m --out bench/results/scale20m.json

Quality mode (no speed sections): gold gain and KL of both stacks over N seeds, each seed with
its own fixture, and the paired difference ours - TRL with a 95% t-interval (~2 min a seed):

    .venv/bin/python bench/ppo_vs_trl.py --quality-seeds 40 --out bench/results/quality.json
    # A/B an option of ours on the same seeds, reusing TRL's runs:
    .venv/bin/python bench/ppo_vs_trl.py --quality-seeds 40 --ours-set strategy.gradient_clipping=0 \
        --reuse-trl bench/results/quality.json --out bench/results/quality_noclip.json

TRL is timed from outside: its module-level ``batch_generation``, ``forward`` (no-grad calls
only) and ``get_reward`` are wrapped with timers; training time is the rest of each
iteration (PPO epochs, GAE, logging), measured by a ``TrainerCallback``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.common import (
    REPO_ROOT,
    SCALE_20M,
    TINY_SIZE,
    Fixture,
    ModelSize,
    build_fixture,
    eval_prompts,
    evaluate_policy,
    forward_backward_flops,
    layer_matmul_rate,
    matmul_params,
    matmul_peak_flops,
    mean_ci,
    n_params,
    peak_rss_mb,
    ppo_iteration_flops,
    set_seed,
    training_flops,
    untrained_policy_dir,
)

# Targets of issue 5.
TARGET_SPEEDUP = 3.0
TARGET_PEAK_FRACTION = 0.40
# Step time may grow at most this much faster than the response length before we call it
# super-linear; 10% absorbs timing noise on a shared CPU.
LINEAR_TOLERANCE = 1.10


@dataclass(frozen=True)
class RunSpec:
    """Everything one PPO run needs; identical for both stacks except ``stack``."""

    stack: str
    """"ours" or "trl\""""
    fixture: dict[str, Any]
    """:class:`bench.common.Fixture` as a dict"""
    iterations: int
    """PPO iterations (rollout + update)"""
    batch_size: int
    """episodes per iteration (rollout batch)"""
    response_length: int
    """max new tokens per response"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch; TRL PPOConfig default"""
    num_mini_batches: int = 2
    """optimizer steps per PPO epoch; 2 so the minibatch path is exercised (TRL default is 1)"""
    kl_coef: float = 0.05
    """fixed KL penalty coefficient; TRL PPOConfig default"""
    kl_estimator: str = "k1"
    """per-token KL estimator; TRL PPOConfig default"""
    temperature: float = 0.7
    """sampling temperature; TRL PPOConfig default"""
    learning_rate: float = 5e-5
    """AdamW LR for policy and critic. TRL's 3e-6 is tuned for 1B-parameter models; 5e-5 (the
    transformers TrainingArguments default) moves a 0.6M-parameter policy within a few steps"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response without EOS; TRL's PPO example uses 1.0"""
    cliprange: float = 0.2
    """policy ratio clip; Schulman et al. 2017, TRL default"""
    cliprange_value: float = 0.2
    """value clip; TRL default"""
    vf_coef: float = 0.1
    """value-loss weight; TRL default"""
    gamma: float = 1.0
    """discount; TRL default"""
    lam: float = 0.95
    """GAE lambda; TRL default"""
    seed: int = 0
    """seed for data order and sampling"""
    threads: int = 1
    """torch threads (same for both stacks)"""
    parallel_critic: bool = False
    """ours only: the critic's update on a second Python thread (``PPOConfig.parallel_critic``),
    each of the two threads with ``threads // 2`` torch threads, so both stacks use
    ``threads`` cores"""
    n_prompts: int = 360
    """training prompts (the bundled task has 360)"""
    eval_prompts: int = 96
    """prompts for the gold / KL evaluation"""
    evaluate: bool = True
    """score the final policy with the gold reward (off for the scaling sweep)"""
    sweep: tuple[tuple[int, int], ...] = ()
    """(batch_size, response_length) pairs: run ours once per pair, without the gold evaluation"""
    peak_n: int = 2048
    """matrix size of the matmul peak each run measures right after its training"""
    probe: bool = True
    """measure the matmul peak and the forward + backward alone after training (off in the
    quality mode, which times nothing)"""
    ours_overrides: tuple[tuple[str, Any], ...] = ()
    """ours only: (field, value) pairs set on ``ppo_core.ppo.PPOConfig`` after the benchmark's
    own settings (``strategy.<field>`` for ``StrategyConfig``), for A/B runs of an option"""
    scale_probe: bool = False
    """the second scale (``--scale 20m``): instead of the toy probe, measure after training the
    matmul peak and the model's own matmul shapes (one layer's matmuls at a training
    mini-batch's tokens and at a decode step's rows); no forward + backward alone"""
    out: str = ""
    """JSON file the worker writes its result to"""


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other
    processes competing for the same cores."""
    t = os.times()
    return t.user + t.system


class PhaseTimer:
    """Accumulates wall time per named phase (phases must not nest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# shared model loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(fx: Fixture):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx.tokenizer_dir)
    tok.padding_side = "left"  # generation needs left padding (TRL's collator pads this way too)
    return tok


def load_policy(fx: Fixture):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fx.policy_dir)


def load_scorer(fx: Fixture):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(fx.reward_dir)


def train_prompts(n: int) -> list[str]:
    from assets.bundled_task import all_prompts

    return all_prompts()[:n]


def _finish(spec: RunSpec, timer: PhaseTimer, step_times: list[float], cpu_s: float,
            gen_tokens: int, policy, n_params_policy: int, n_params_critic: int,
            train_tokens: int, padded_tokens: int) -> dict:
    """Common summary of one run (both stacks)."""
    fx = Fixture(**spec.fixture)
    total = sum(step_times)
    gen, score = timer.seconds["generation"], timer.seconds["scoring"]
    train = max(total - gen - score, 0.0)
    result = {
        "stack": spec.stack,
        "iterations": spec.iterations,
        "batch_size": spec.batch_size,
        "response_length": spec.response_length,
        "episodes": spec.iterations * spec.batch_size,
        "wall_s": total,
        "step_s": step_times,
        "median_step_s": statistics.median(step_times),
        "episodes_per_s": spec.iterations * spec.batch_size / total,
        "cpu_s": cpu_s,
        "episodes_per_cpu_s": spec.iterations * spec.batch_size / cpu_s,
        "generated_tokens": gen_tokens,
        "generated_tokens_per_s": gen_tokens / gen if gen > 0 else float("nan"),
        "generation_s": gen,
        "scoring_s": score,
        "training_s": train,
        "train_tokens": train_tokens,
        # positions the update's forwards computed, padding included
        "train_tokens_padded": padded_tokens,
        "training_flops": training_flops(n_params_policy, n_params_critic, train_tokens),
        "peak_rss_mb": peak_rss_mb(),
    }
    if spec.scale_probe:
        result.update(_scale_probe(spec, fx, train_tokens))
    elif not spec.sweep and spec.probe:
        result.update(_probe(spec, fx, train_tokens, alone=spec.stack == "ours"))
    if spec.evaluate:
        tok = load_tokenizer(fx)
        ref = load_policy(fx)
        ev = evaluate_policy(policy, ref, tok, eval_prompts(spec.eval_prompts), spec.response_length,
                             spec.temperature, seed=spec.seed + 7)
        result.update({"gold_after": ev["gold"], "gold_after_se": ev["gold_se"],
                       "kl_to_ref": ev["kl"], "kl_to_ref_se": ev["kl_se"],
                       "eval_response_tokens": ev["response_tokens"]})
    return result


# Per-iteration training metrics each stack logs under the same (TRL) name; kept per run as
# ``train_curve`` to see where two runs part ways.
CURVE_KEYS = ("objective/scores", "objective/kl", "policy/approxkl_avg", "policy/clipfrac_avg",
              "val/clipfrac_avg", "loss/value_avg", "policy/entropy_avg")


def _probe(spec: RunSpec, fx: Fixture, train_tokens: int, alone: bool) -> dict:
    """This CPU's speed right after a run's training, in the same process, on ``threads``
    torch threads: the matmul peak and (``alone``) the policy's forward + backward alone at
    one mini-batch's real tokens and at 8x. The machine's speed drifts by up to 40% within
    minutes, so a run's FLOP rate is only comparable with rates measured next to it; each
    rate is the best of three, interleaved."""
    torch.set_num_threads(spec.threads)
    updates = spec.iterations * spec.num_ppo_epochs * spec.num_mini_batches
    mb = max(1, round(train_tokens / updates))
    peak, rates = 0.0, ({mb: 0.0, 8 * mb: 0.0} if alone else {})
    policy = load_policy(fx) if alone else None
    for _ in range(3):
        peak = max(peak, matmul_peak_flops(spec.peak_n))
        for n in rates:
            rates[n] = max(rates[n], forward_backward_flops(policy, n))
    return {"probe_peak_flops": peak,
            "probe_alone": [{"positions": n, "flops": v} for n, v in sorted(rates.items())]}


def _scale_probe(spec: RunSpec, fx: Fixture, train_tokens: int) -> dict:
    """The matmul rates of this CPU right after a run's training, in its process, on
    ``threads`` torch threads, best of three, interleaved: the ``peak_n``^2 fp32 ``torch.mm``
    peak, and one Llama layer's matmuls (:func:`bench.common.layer_matmul_rate`) at one
    training mini-batch's real tokens and at ``batch_size`` rows (a decode step)."""
    from transformers import AutoConfig

    torch.set_num_threads(spec.threads)
    cfg = AutoConfig.from_pretrained(fx.policy_dir)
    updates = spec.iterations * spec.num_ppo_epochs * spec.num_mini_batches
    mb = max(1, round(train_tokens / updates))
    best = {"peak": 0.0, "layer_train": 0.0, "layer_decode": 0.0}
    for _ in range(3):
        best["peak"] = max(best["peak"], matmul_peak_flops(spec.peak_n))
        best["layer_train"] = max(best["layer_train"], layer_matmul_rate(
            mb, cfg.hidden_size, cfg.intermediate_size))
        best["layer_decode"] = max(best["layer_decode"], layer_matmul_rate(
            spec.batch_size, cfg.hidden_size, cfg.intermediate_size))
    return {"probe_peak_flops": best["peak"], "probe_layer_train_tokens": mb,
            "probe_layer_train_flops": best["layer_train"],
            "probe_layer_decode_rows": spec.batch_size,
            "probe_layer_decode_flops": best["layer_decode"]}


def _count_until_eos(responses: torch.Tensor, eos_token_id: int) -> int:
    """Generated tokens per row up to and including the first EOS, summed. (B, T) -> int."""
    is_eos = responses == eos_token_id
    before = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return int(before.sum())


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def run_trl(spec: RunSpec) -> dict:
    """TRL's PPOTrainer on the fixture, timed by wrapping its module-level functions."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    fx = Fixture(**spec.fixture)
    tok = load_tokenizer(fx)
    timer = PhaseTimer()
    gen_tokens = [0]
    train_tokens = [0]
    padded_tokens = [0]

    orig_generation, orig_forward, orig_reward = (trl_ppo.batch_generation, trl_ppo.forward,
                                                  trl_ppo.get_reward)

    context = [0]

    def timed_generation(model, queries, *args, **kwargs):
        with timer.phase("generation"):
            query_responses, logits = orig_generation(model, queries, *args, **kwargs)
        context[0] = queries.shape[1]
        gen_tokens[0] += _count_until_eos(query_responses[:, queries.shape[1]:], tok.eos_token_id)
        return query_responses, logits

    def timed_forward(model, query_responses, pad_token_id):
        if torch.is_grad_enabled():  # the PPO update's forward: counted in training
            # real tokens only (prompt + response through EOS), as for ours
            P = context[0]
            train_tokens[0] += int((query_responses[:, :P] != pad_token_id).sum())
            train_tokens[0] += _count_until_eos(query_responses[:, P:], tok.eos_token_id)
            padded_tokens[0] += query_responses.numel()
            return orig_forward(model, query_responses, pad_token_id)
        with timer.phase("scoring"):  # reference log-probs in the rollout
            return orig_forward(model, query_responses, pad_token_id)

    def timed_reward(*args, **kwargs):
        with timer.phase("scoring"):  # critic values and reward-model scores
            return orig_reward(*args, **kwargs)

    trl_ppo.batch_generation, trl_ppo.forward, trl_ppo.get_reward = (
        timed_generation, timed_forward, timed_reward)

    step_times: list[float] = []
    cpu = [0.0]

    curve: dict[str, list[float]] = defaultdict(list)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t, self.cpu0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_times.append(now - self.t)
            self.t = now
            cpu[0] = cpu_seconds() - self.cpu0

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in CURVE_KEYS:
                if logs and key in logs:
                    curve[key].append(float(logs[key]))

    prompts = train_prompts(spec.n_prompts)
    dataset = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = PPOConfig(
            output_dir=out_dir,
            # rollout batch = per_device_train_batch_size x accumulation; with accumulation 1
            # TRL's micro-batch loop runs once per minibatch and steps the optimizer
            # num_mini_batches times per PPO epoch, like ours
            per_device_train_batch_size=spec.batch_size,
            gradient_accumulation_steps=1,
            num_mini_batches=spec.num_mini_batches,
            total_episodes=spec.iterations * spec.batch_size,
            num_ppo_epochs=spec.num_ppo_epochs,
            local_rollout_forward_batch_size=spec.batch_size,
            response_length=spec.response_length,
            temperature=spec.temperature,
            kl_coef=spec.kl_coef,
            kl_estimator=spec.kl_estimator,
            missing_eos_penalty=spec.missing_eos_penalty,
            stop_token="eos",
            learning_rate=spec.learning_rate,
            lr_scheduler_type="constant",
            cliprange=spec.cliprange,
            cliprange_value=spec.cliprange_value,
            vf_coef=spec.vf_coef,
            gamma=spec.gamma,
            lam=spec.lam,
            seed=spec.seed,
            # CPU, fp32, nothing but training: no eval, no saving, no reporting
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            report_to="none", save_strategy="no", eval_strategy="no",
            num_sample_generations=0, logging_steps=1, disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=cfg, processing_class=tok, model=load_policy(fx), ref_model=load_policy(fx),
            reward_model=load_scorer(fx), value_model=load_scorer(fx),
            train_dataset=dataset, eval_dataset=dataset.select(range(spec.batch_size)),
            callbacks=[StepClock()],
        )
        trainer.train()
    # accelerate wraps the model in DDP when torch.distributed is up (a --tiny run in the
    # process where our engine started it)
    wrapper = getattr(trainer.model, "module", trainer.model)
    policy = wrapper.policy
    result = _finish(spec, timer, step_times, cpu[0], gen_tokens[0], policy,
                     sum(p.numel() for p in policy.parameters()),
                     sum(p.numel() for p in wrapper.value_model.parameters()), train_tokens[0],
                     padded_tokens[0])
    result["train_curve"] = dict(curve)
    return result


# ---------------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------------


def run_ours(spec: RunSpec) -> dict:
    """Our ``ppo_core.ppo`` engine on the fixture, configured to do exactly TRL's work.

    Phase times come from the engine's own ``time/generation`` / ``time/scoring`` metrics;
    training is the rest of each iteration, as for TRL. Training tokens and positions come
    from the engine's ``perf/train_forward_tokens`` / ``perf/train_forward_positions``.
    """
    import pandas as pd

    from ppo_core import ppo
    from ppo_core.callbacks import Callback

    fx = Fixture(**spec.fixture)
    timer = PhaseTimer()
    step_times: list[float] = []
    cpu = [0.0]
    gen_tokens = [0.0]
    train_tokens = [0]
    padded_tokens = [0]
    curve: dict[str, list[float]] = defaultdict(list)

    class StepClock(Callback):
        def on_train_begin(self, stage, total_steps, config):
            self.t, self.cpu0 = time.perf_counter(), cpu_seconds()

        def on_log(self, step, metrics):
            for key in (*CURVE_KEYS, "policy/grad_norm", "val/grad_norm", "val/ended_frac"):
                if key in metrics:
                    curve[key].append(float(metrics[key]))
            now = time.perf_counter()
            step_times.append(now - self.t)
            self.t = now
            cpu[0] = cpu_seconds() - self.cpu0
            timer.seconds["generation"] += metrics["time/generation"]
            timer.seconds["scoring"] += metrics["time/scoring"]
            gen_tokens[0] += metrics["val/response_length"] * spec.batch_size
            # the engine counts the positions of the update's policy forwards itself (they run
            # in length groups, each cut to its own width)
            train_tokens[0] += int(metrics["perf/train_forward_tokens"])
            padded_tokens[0] += int(metrics["perf/train_forward_positions"])

    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "ppo_train.parquet"
        pd.DataFrame({"prompt": train_prompts(spec.n_prompts)}).to_parquet(train_file)
        settings: dict[str, Any] = dict(
            policy_path=fx.policy_dir, reward_model_path=fx.reward_dir, critic_path=fx.reward_dir,
            train_file=str(train_file), output_dir=str(Path(tmp) / "out"),
            num_steps=spec.iterations, rollout_batch_size=spec.batch_size,
            num_mini_batches=spec.num_mini_batches, ppo_epochs=spec.num_ppo_epochs,
            response_length=spec.response_length, temperature=spec.temperature,
            kl_coef=spec.kl_coef, kl_estimator=spec.kl_estimator,
            missing_eos_penalty=spec.missing_eos_penalty,
            # TRL's PPOTrainer has one AdamW (eps 1e-8, transformers default) for policy and
            # critic, a constant LR here, and no reward normalisation or clipping
            learning_rate=spec.learning_rate, critic_learning_rate=spec.learning_rate,
            adam_eps=1e-8, lr_scheduler="constant", normalize_reward=False, reward_clip=None,
            clip_range=spec.cliprange, value_clip_range=spec.cliprange_value,
            vf_coef=spec.vf_coef, gamma=spec.gamma, lam=spec.lam, seed=spec.seed,
            save_every=0, parallel_critic=spec.parallel_critic,
            strategy={"cpu_threads": max(1, spec.threads // 2) if spec.parallel_critic else spec.threads},
        )
        cfg = ppo.PPOConfig(**apply_overrides(settings, spec.ours_overrides))
        summary = ppo.train(cfg, callbacks=[StepClock()])
        policy = load_policy(replace(fx, policy_dir=summary["final_dir"]))
        result = _finish(spec, timer, step_times, cpu[0], int(round(gen_tokens[0])), policy,
                         fx.n_params_policy, fx.n_params_reward, train_tokens[0], padded_tokens[0])
    result["train_curve"] = dict(curve)
    return result


def apply_overrides(settings: dict[str, Any], overrides: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """``settings`` (PPOConfig keyword arguments) with each (field, value) of ``overrides``
    set; ``strategy.<field>`` sets a ``StrategyConfig`` field. Unknown fields are an error."""
    from dataclasses import fields

    from ppo_core.ppo import PPOConfig
    from ppo_core.strategy import StrategyConfig

    out = dict(settings)
    known = {f.name for f in fields(PPOConfig)}
    strategy = {"zero_stage": 0, **out.pop("strategy", {})}
    for key, value in overrides:
        if key.startswith("strategy."):
            name = key.split(".", 1)[1]
            if name not in {f.name for f in fields(StrategyConfig)}:
                raise ValueError(f"--ours-set {key}: StrategyConfig has no field {name!r}")
            strategy[name] = value
        elif key in known:
            out[key] = value
        else:
            raise ValueError(f"--ours-set {key}: PPOConfig has no field {key!r}")
    if len(strategy) > 1:
        out["strategy"] = StrategyConfig(**strategy)
    return out


# ---------------------------------------------------------------------------------------------
# extra sections
# ---------------------------------------------------------------------------------------------


def compare_generation(fx: Fixture, batch_size: int, response_length: int, temperature: float,
                       seed: int, repeats: int = 7) -> dict:
    """Our sampler (``ppo_core.generation.sample``) against plain ``model.generate``.

    Same model, same left-padded batch, same sampling settings, both stop at EOS. Each call is
    reseeded, so every repeat of a sampler draws the same tokens (the two samplers consume
    random numbers differently, hence tokens/s). After one warm-up call each, the two
    alternate ``repeats`` times and each keeps its best time (the least disturbed one; the
    alternation exposes both to the same drift of this machine's speed).
    """
    from bench.common import _left_pad
    from ppo_core.generation import sample

    tok, policy = load_tokenizer(fx), load_policy(fx)
    policy.eval()
    ids, mask = _left_pad(tok, train_prompts(360)[:batch_size])

    def ours() -> int:
        out = sample(policy, ids, mask, max_new_tokens=response_length, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, temperature=temperature)
        return int(out.response_mask.sum())

    @torch.no_grad()
    def hf() -> int:
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                              temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=response_length, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        return _count_until_eos(out[:, ids.shape[1]:], tok.eos_token_id)

    samplers = {"ours": ours, "hf_generate": hf}
    best = dict.fromkeys(samplers, math.inf)
    tokens: dict[str, set[int]] = {name: set() for name in samplers}
    for name, fn in samplers.items():  # warm-up
        set_seed(seed)
        fn()
    for _ in range(repeats):
        for name, fn in samplers.items():
            set_seed(seed)
            t0 = time.perf_counter()
            tokens[name].add(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    result: dict[str, Any] = {"batch_size": batch_size, "response_length": response_length,
                              "repeats": repeats}
    for name in samplers:
        assert len(tokens[name]) == 1, f"{name}: reseeded repeats sampled different lengths"
        result[f"{name}_s"] = best[name]
        result[f"{name}_tokens"] = tokens[name].pop()
        result[f"{name}_tokens_per_s"] = result[f"{name}_tokens"] / best[name]
    result["speedup"] = result["ours_tokens_per_s"] / result["hf_generate_tokens_per_s"]
    return result


# ---------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------


QUALITY_KEYS = ("gold_after", "gold_after_se", "kl_to_ref", "eval_response_tokens")


def best_of(results: list[dict]) -> dict:
    """One stack's runs merged: the timings of its fastest run (episodes/s), the quality of
    the first (the same seeds give the same training, so every run should agree; the
    per-round list keeps each run's numbers to show it)."""
    fastest = max(results, key=lambda r: r["episodes_per_s"])
    merged = {**fastest, **{k: results[0][k] for k in QUALITY_KEYS if k in results[0]}}
    merged["rounds"] = [{k: r.get(k) for k in ("episodes_per_s", "episodes_per_cpu_s", "wall_s",
                                               "training_s", "probe_peak_flops", *QUALITY_KEYS)}
                        for r in results]
    return merged


def run_worker(spec: RunSpec, log_dir: Path, suffix: str = "") -> dict:
    """Run one stack in a fresh interpreter; returns its result dict."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{spec.stack}_b{spec.batch_size}_r{spec.response_length}_n{spec.iterations}"
    tag += "_sweep" if spec.sweep else suffix
    spec = replace(spec, out=str(log_dir / f"{tag}.json"))
    spec_path = log_dir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    log_path = log_dir / f"{tag}.log"
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"  running {tag} ...", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{spec.stack} run failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(Path(spec.out).read_text())


def execute(spec: RunSpec) -> dict:
    """Run one stack (or our sweep) in this process."""
    # Both stacks import DeepSpeed lazily (accelerate's unwrap_model in TRL's first rollout,
    # ppo_core.strategy at set-up), ~8 s with its mlflow import; pay it here, outside the clocks.
    import deepspeed  # noqa: F401

    torch.set_num_threads(spec.threads)
    set_seed(spec.seed)
    runner: Callable[[RunSpec], dict] = {"ours": run_ours, "trl": run_trl}[spec.stack]
    if spec.sweep:  # one process for the whole sweep: interpreter start-up is paid once
        return {"sweep": [runner(replace(spec, batch_size=b, response_length=r, sweep=(),
                                         evaluate=False))
                          for b, r in spec.sweep]}
    return runner(spec)


def worker_main(spec_path: str) -> int:
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    spec = replace(spec, sweep=tuple(tuple(p) for p in spec.sweep),
                   ours_overrides=tuple(tuple(p) for p in spec.ours_overrides))
    Path(spec.out).write_text(json.dumps(execute(spec), indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# quality mode: gold gain per episode over several seeds (issue 11, item 5)
# ---------------------------------------------------------------------------------------------


def _comparable(spec: dict) -> dict:
    """The parts of a TRL run's spec that decide its result (not where it writes), as they
    read back from JSON (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in spec.items()
                                  if k not in ("out", "ours_overrides", "stack", "scale_probe")}))


def run_quality(args: argparse.Namespace, size: ModelSize) -> dict:
    """For each seed: the fixture built with that seed (tokenizer, SFT policy, reward model:
    the initial weights and data), then ours and TRL trained on it with the same budget and
    seed, then one evaluation of each final policy on ``--quality-prompts`` sampled responses.

    Gold gain = gold after - gold before, both on the same prompts with the same sampling
    seed; the per-seed paired difference ours - TRL is then after_ours - after_trl (the
    "before" is common and cancels), and a t-interval over seeds bounds it.
    """
    log_dir = args.out.parent / (args.out.stem + "_logs")
    run: Callable[..., dict] = (
        (lambda spec, suffix="": execute(spec)) if args.tiny
        else lambda spec, suffix="": run_worker(spec, log_dir, suffix))
    reuse: dict[int, dict] = {}
    if args.reuse_trl:
        old = json.loads(Path(args.reuse_trl).read_text())["quality"]
        reuse = {r["seed"]: r for r in old["seeds"]}
    overrides = tuple(args.ours_set)
    seeds = list(range(args.seed, args.seed + args.quality_seeds))
    rows = []
    for seed in seeds:
        print(f"[quality seed {seed}] fixture ...", file=sys.stderr, flush=True)
        fx = build_fixture(size, seed=seed)
        spec = RunSpec(stack="trl", fixture=asdict(fx), iterations=args.iterations,
                       batch_size=args.batch_size, response_length=args.response_length,
                       seed=seed, threads=args.threads, eval_prompts=args.quality_prompts,
                       probe=False)
        old = reuse.get(seed)
        reused = old is not None and old["trl_spec"] == _comparable(asdict(spec))
        if reused:
            print(f"[quality seed {seed}] TRL and gold before reused from {args.reuse_trl}",
                  file=sys.stderr, flush=True)
            before, trl = old["gold_before"], old["trl"]
        else:
            from transformers import AutoModelForCausalLM

            initial = AutoModelForCausalLM.from_pretrained(fx.policy_dir)
            torch.set_num_threads(args.threads)
            before = evaluate_policy(initial, initial, load_tokenizer(fx),
                                     eval_prompts(spec.eval_prompts), spec.response_length,
                                     spec.temperature, seed=spec.seed + 7)
            trl = run(spec, suffix=f"_quality_seed{seed}")
        ours = run(replace(spec, stack="ours", ours_overrides=overrides),
                   suffix=f"_quality_seed{seed}")
        keep = ("gold_after", "gold_after_se", "kl_to_ref", "kl_to_ref_se",
                "eval_response_tokens", "wall_s", "train_curve")
        row = {"seed": seed, "fixture": fx.policy_dir, "rm_pair_accuracy": fx.rm_pair_accuracy,
               "gold_before": before, "trl_spec": _comparable(asdict(spec)),
               "ours": {k: ours[k] for k in keep if k in ours},
               "trl": {k: trl[k] for k in keep if k in trl}}
        for side in ("ours", "trl"):
            row[side]["gain"] = row[side]["gold_after"] - before["gold"]
        row["diff"] = row["ours"]["gain"] - row["trl"]["gain"]
        if reused:
            row["reused_ours"] = old["ours"]   # the A arm of an A/B (the run reused)
        rows.append(row)
        print(f"[quality seed {seed}] gold before {before['gold']:.3f}; gain ours "
              f"{row['ours']['gain']:+.3f} (KL {row['ours']['kl_to_ref']:.2f}), TRL "
              f"{row['trl']['gain']:+.3f} (KL {row['trl']['kl_to_ref']:.2f})",
              file=sys.stderr, flush=True)
    quality = quality_section(rows, overrides, args)
    if args.reuse_trl:
        quality["ab"] = ab_section(rows, str(args.reuse_trl))
    return quality


def ab_section(rows: list[dict], reused: str) -> dict | None:
    """Ours in this run (B) against ours in the reused run (A) on the seeds whose TRL result
    was reused: paired differences of gold gain and KL (same fixtures, seeds and evaluation)."""
    pairs = [(r["ours"], r["reused_ours"]) for r in rows if "reused_ours" in r]
    if len(pairs) < 2:
        return None
    gain = [b["gain"] - a["gain"] for b, a in pairs]
    kl = [b["kl_to_ref"] - a["kl_to_ref"] for b, a in pairs]
    return {"reused": reused, "seeds": [r["seed"] for r in rows if "reused_ours" in r],
            "gain_diff": mean_ci(gain), "kl_diff": mean_ci(kl)}


def quality_section(rows: list[dict], overrides: Sequence[Sequence[Any]],
                    args: argparse.Namespace) -> dict:
    """Per-seed rows plus the statistics over seeds: each side's gain and KL (mean, se, CI)
    and the paired differences ours - TRL (t-interval; decisive when it excludes 0)."""
    level = 0.95
    gains = {side: [r[side]["gain"] for r in rows] for side in ("ours", "trl")}
    kls = {side: [r[side]["kl_to_ref"] for r in rows] for side in ("ours", "trl")}
    return {
        "seeds": rows,
        "n_seeds": len(rows),
        "eval_responses": args.quality_prompts,
        "iterations": args.iterations, "batch_size": args.batch_size,
        "response_length": args.response_length,
        "ours_overrides": [list(o) for o in overrides],
        "gain": {side: mean_ci(v, level) for side, v in gains.items()},
        "kl": {side: mean_ci(v, level) for side, v in kls.items()},
        "diff": mean_ci([o - t for o, t in zip(gains["ours"], gains["trl"])], level),
        "kl_diff": mean_ci([o - t for o, t in zip(kls["ours"], kls["trl"])], level),
        # robust to the heavy tails (runs that collapse to one-token answers)
        "median_diff": statistics.median(r["diff"] for r in rows),
        "ours_ahead": sum(r["diff"] > 0 for r in rows),
    }


def render_quality(q: dict) -> str:
    """The quality tables (markdown) and a one-line verdict."""
    pct = f"{q['diff']['level']:.0%}"
    opts = (" (ours with " + ", ".join(f"{k}={v}" for k, v in q["ours_overrides"]) + ")"
            if q["ours_overrides"] else "")
    lines = [
        f"PPO quality, ours vs TRL{opts} -- {q['n_seeds']} seeds (fixture, data order and "
        f"sampling seeded per seed), {q['iterations']} iterations x {q['batch_size']} episodes, "
        f"response length {q['response_length']}; gold and KL on {q['eval_responses']} sampled "
        "responses per policy",
        "",
        "| seed | gold before | ours gain | TRL gain | ours - TRL | ours KL | TRL KL | ours tokens | TRL tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in q["seeds"]:
        o, t = r["ours"], r["trl"]
        lines.append(f"| {r['seed']} | {r['gold_before']['gold']:.3f} | {o['gain']:+.3f} | "
                     f"{t['gain']:+.3f} | {r['diff']:+.3f} | {o['kl_to_ref']:.2f} | "
                     f"{t['kl_to_ref']:.2f} | {o['eval_response_tokens']:.1f} | "
                     f"{t['eval_response_tokens']:.1f} |")

    def cell(c: dict, sign: str = "+") -> str:
        return f"{c['mean']:{sign}.3f} ± {c['se']:.3f}"

    def ci(c: dict) -> str:
        return f"[{c['lo']:+.3f}, {c['hi']:+.3f}]"

    lines += [
        "",
        f"| over seeds (mean ± se, {pct} t-interval) | ours | TRL | ours - TRL (paired) |",
        "|---|---:|---:|---:|",
        f"| gold gain | {cell(q['gain']['ours'])} | {cell(q['gain']['trl'])} | {cell(q['diff'])} |",
        f"| gold gain {pct} CI | {ci(q['gain']['ours'])} | {ci(q['gain']['trl'])} | {ci(q['diff'])} |",
        f"| KL to reference, nats/response | {cell(q['kl']['ours'], '')} | {cell(q['kl']['trl'], '')} "
        f"| {cell(q['kl_diff'])} |",
        f"| KL {pct} CI | {ci(q['kl']['ours'])} | {ci(q['kl']['trl'])} | {ci(q['kl_diff'])} |",
        "",
        quality_verdict(q),
    ]
    ab = q.get("ab")
    if ab:
        g, k = ab["gain_diff"], ab["kl_diff"]
        lines += ["", f"A/B against ours in {ab['reused']} ({g['n']} paired seeds): gold gain "
                      f"{g['mean']:+.3f} ± {g['se']:.3f}, {g['level']:.0%} CI [{g['lo']:+.3f}, "
                      f"{g['hi']:+.3f}] ({'decisive' if g['decisive'] else 'not decisive'}); KL "
                      f"{k['mean']:+.2f} nats, CI [{k['lo']:+.2f}, {k['hi']:+.2f}]"]
    return "\n".join(lines)


def quality_verdict(q: dict) -> str:
    d, k = q["diff"], q["kl_diff"]
    pct = f"{d['level']:.0%}"
    if d["decisive"]:
        who = "ours gains more" if d["mean"] > 0 else "ours gains less"
        head = f"DECISIVE: {who} gold per episode than TRL"
    else:
        head = "NOT DECISIVE: the gold-gain difference is within noise"
    kl = ("KL differs decisively" if k["decisive"] else "KL not decisively different")
    return (f"{head}: ours - TRL = {d['mean']:+.3f}, {pct} CI [{d['lo']:+.3f}, {d['hi']:+.3f}] "
            f"over {d['n']} seeds (median {q['median_diff']:+.3f}; ours ahead on "
            f"{q['ours_ahead']} of {d['n']}); {kl} (ours - TRL {k['mean']:+.2f} nats, {pct} CI "
            f"[{k['lo']:+.2f}, {k['hi']:+.2f}]).")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _status(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def steady_steps(result: dict) -> list[float]:
    """Step times without the first iteration (warm-up: allocator, thread pools)."""
    steps = result["step_s"]
    return steps[1:] or steps


def steady_step_s(result: dict) -> float:
    """Mean steady step time."""
    return statistics.fmean(steady_steps(result))


def comparison_rows(ours: dict, trl: dict, gold_before: float) -> list[dict]:
    """The main table: one row per metric with ours / TRL / ratio / target / status."""
    rows = []

    def add(metric: str, key: str | None = None, o: float | None = None, t: float | None = None,
            target: str = "", status: str = "", higher_is_better: bool = True) -> None:
        o = ours[key] if key else o
        t = trl[key] if key else t
        rows.append({"metric": metric, "ours": o, "trl": t, "ratio": _ratio(o, t),
                     "higher_is_better": higher_is_better, "target": target, "status": status})

    speedup = _ratio(ours["episodes_per_s"], trl["episodes_per_s"])
    add("episodes/s", "episodes_per_s", target=f">= {TARGET_SPEEDUP:g}x TRL",
        status=_status(speedup >= TARGET_SPEEDUP))
    add("episodes per CPU-second (contention-robust)", "episodes_per_cpu_s")
    add("generated tokens/s (generation phase)", "generated_tokens_per_s")
    add("step time s (steady, mean)", o=steady_step_s(ours), t=steady_step_s(trl),
        higher_is_better=False)
    for phase in ("generation", "scoring", "training"):
        add(f"{phase} s (total)", f"{phase}_s", higher_is_better=False)
    for phase in ("generation", "scoring", "training"):
        add(f"{phase} share of wall time", o=ours[f"{phase}_s"] / ours["wall_s"],
            t=trl[f"{phase}_s"] / trl["wall_s"], higher_is_better=False)
    add("peak RSS MiB", "peak_rss_mb", higher_is_better=False)
    add("padding share of training forward positions",
        o=1 - ours["train_tokens"] / ours["train_tokens_padded"],
        t=1 - trl["train_tokens"] / trl["train_tokens_padded"], higher_is_better=False)
    add("training GFLOP/s (6N rule)", o=ours["training_flops"] / ours["training_s"] / 1e9,
        t=trl["training_flops"] / trl["training_s"] / 1e9)
    gain_o, gain_t = ours["gold_after"] - gold_before, trl["gold_after"] - gold_before
    kl_matched = ours["kl_to_ref"] <= 1.5 * trl["kl_to_ref"] + 0.1
    gain_ok = gain_o >= gain_t and kl_matched
    note = "" if kl_matched else " (KL not matched)"
    add("gold reward after", "gold_after")
    add(f"gold-reward gain (from {gold_before:.3f})", o=gain_o, t=gain_t,
        target=">= TRL at matched KL", status=_status(gain_ok) + note)
    add("KL to reference (nats/response)", "kl_to_ref", higher_is_better=False,
        target="matched: ours <= 1.5 x TRL + 0.1", status=_status(kl_matched))
    add("eval response tokens", "eval_response_tokens")
    return rows


def scaling_section(sweep: list[dict], batch_size: int, response_length: int) -> dict:
    """Step time against response length (at ``batch_size``) and against batch size."""
    by_len = sorted((r for r in sweep if r["batch_size"] == batch_size),
                    key=lambda r: r["response_length"])
    by_batch = sorted((r for r in sweep if r["response_length"] == response_length),
                      key=lambda r: r["batch_size"])

    def row(r: dict) -> dict:
        # the fastest steady step: one slow moment of this machine must not decide linearity
        return {"batch_size": r["batch_size"], "response_length": r["response_length"],
                "step_s": min(steady_steps(r)),
                "generated_tokens_per_episode": r["generated_tokens"] / r["episodes"],
                "generation_s_per_step": r["generation_s"] / r["iterations"],
                "scoring_s_per_step": r["scoring_s"] / r["iterations"],
                "training_s_per_step": r["training_s"] / r["iterations"]}

    lengths = [row(r) for r in by_len]
    # super-linear = the step-time ratio between two lengths exceeds the length ratio
    growth = [(b["step_s"] / a["step_s"]) / (b["response_length"] / a["response_length"])
              for a, b in zip(lengths, lengths[1:])]
    return {"by_response_length": lengths, "by_batch_size": [row(r) for r in by_batch],
            "growth_vs_linear": growth,
            "status": _status(all(g <= LINEAR_TOLERANCE for g in growth))}


def _fmt(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def render(report: dict) -> str:
    """The report as Markdown (printed, and pasted into BENCHMARKS.md)."""
    cfg = report["config"]
    lines = [
        f"PPO, ours vs TRL {report['machine']['trl']} -- {cfg['iterations']} iterations x "
        f"{cfg['batch_size']} episodes, response length {cfg['response_length']}, "
        f"{cfg['num_ppo_epochs']} PPO epochs x {cfg['num_mini_batches']} minibatches, "
        f"kl_coef {cfg['kl_coef']}, temperature {cfg['temperature']}, "
        f"policy {report['fixture']['n_params_policy']:,} params, "
        f"{report['machine']['threads']} threads"
        + (" (ours: critic on a second Python thread)" if cfg.get("parallel_critic") else ""),
        "",
        "| metric | ours | TRL | ours/TRL | target | status |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in report["comparison"]:
        lines.append(f"| {r['metric']} | {_fmt(r['ours'])} | {_fmt(r['trl'])} | "
                     f"{_fmt(r['ratio'])} | {r['target']} | {r['status']} |")
    rounds = [f"TRL {_fmt(t['episodes_per_s'])} / ours {_fmt(o['episodes_per_s'])} = "
              f"{_fmt(o['episodes_per_s'] / t['episodes_per_s'])}x"
              for o, t in zip(report["ours"]["rounds"], report["trl"]["rounds"])]
    if len(rounds) > 1:
        agree = all(r.get("gold_after") == report[s]["rounds"][0].get("gold_after")
                    for s in ("ours", "trl") for r in report[s]["rounds"])
        lines += ["", f"Episodes/s of each round (ABBA order; the table compares each stack's "
                      f"fastest run): {'; '.join(rounds)}. Gold reward of every run of a stack "
                      f"{'identical' if agree else 'NOT identical'} (same seeds, same training)."]
    g = report["generation"]
    lines += [
        "",
        f"Generation, batch {g['batch_size']}, up to {g['response_length']} new tokens (best of "
        f"{g['repeats']}, alternating, each repeat reseeded):",
        "",
        "| sampler | s | tokens | tokens/s |",
        "|---|---:|---:|---:|",
        f"| ours (ppo_core.generation.sample) | {_fmt(g['ours_s'])} | {g['ours_tokens']} | "
        f"{_fmt(g['ours_tokens_per_s'])} |",
        f"| model.generate | {_fmt(g['hf_generate_s'])} | {g['hf_generate_tokens']} | "
        f"{_fmt(g['hf_generate_tokens_per_s'])} |",
        f"| speed-up | | | {_fmt(g['speedup'])}x |",
    ]
    f = report["flops"]
    lines += [
        "",
        f"Training FLOP/s: {f['formula']}",
        "",
        "| | GFLOP/s | share of peak | target | status |",
        "|---|---:|---:|---|---|",
        f"| matmul peak ({f['peak_matmul_n']}^2 fp32 torch.mm, after our fastest run's "
        f"training) | {_fmt(f['peak_gflops'])} | 1.00 | | |",
        f"| ours, training phase | {_fmt(f['ours_gflops'])} | {_fmt(f['ours_fraction'])} | "
        f">= {TARGET_PEAK_FRACTION:.0%} | {f['status']} |",
        f"| TRL, training phase (against the peak after its own run: "
        f"{_fmt(f['trl_peak_gflops'])}) | {_fmt(f['trl_gflops'])} | {_fmt(f['trl_fraction'])} | | |",
        *(f"| policy forward + backward alone, {a['positions']} packed positions | "
          f"{_fmt(a['gflops'])} | {_fmt(a['fraction'])} | | |" for a in f["alone"]),
    ]
    s = report["scaling"]
    lines += [
        "",
        f"Scaling (ours, untrained policy so responses run to the limit; step s = the fastest "
        f"of the steady steps, phase columns = means per step; growth = step-time ratio / "
        f"length ratio, <= {LINEAR_TOLERANCE} is linear or better): {s['status']}",
        "",
        "| batch | response length | step s | gen tokens/episode | gen s | scoring s | training s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in s["by_response_length"] + s["by_batch_size"]:
        if (r["batch_size"], r["response_length"]) in seen:
            continue
        seen.add((r["batch_size"], r["response_length"]))
        lines.append(f"| {r['batch_size']} | {r['response_length']} | {_fmt(r['step_s'])} | "
                     f"{_fmt(r['generated_tokens_per_episode'])} | {_fmt(r['generation_s_per_step'])} | "
                     f"{_fmt(r['scoring_s_per_step'])} | {_fmt(r['training_s_per_step'])} |")
    lines.append(f"\ngrowth vs linear between consecutive lengths: "
                 f"{', '.join(_fmt(x) for x in s['growth_vs_linear'])}")
    if report["missed"]:
        lines += ["", "MISSED: " + "; ".join(report["missed"])]
    return "\n".join(lines)


def closing_notes(report: dict) -> list[str]:
    """One line per missed target, naming the measured bottleneck."""
    missed = []
    rows = {r["metric"]: r for r in report["comparison"]}
    eps = rows["episodes/s"]
    if eps["status"] != "MET":
        o, t = report["ours"], report["trl"]
        phases = {p: o[f"{p}_s"] / max(t[f"{p}_s"], 1e-9) for p in ("generation", "scoring", "training")}
        worst = max(phases, key=lambda p: o[f"{p}_s"])
        missed.append(
            f"episodes/s is {eps['ratio']:.2f}x TRL (target {TARGET_SPEEDUP:g}x); our largest "
            f"phase is {worst} ({o[worst + '_s'] / o['wall_s']:.0%} of wall time); phase time "
            "ours/TRL: " + ", ".join(f"{p} {v:.2f}x" for p, v in phases.items())
            + f"; per CPU-second {o['episodes_per_cpu_s'] / t['episodes_per_cpu_s']:.2f}x")
    gain = next(r for r in report["comparison"] if r["metric"].startswith("gold-reward gain"))
    if gain["status"] != "MET":
        o, t = report["ours"], report["trl"]
        # both gains share gold_before, so the difference's noise is that of the two "after"s
        se = math.hypot(o["gold_after_se"], t["gold_after_se"])
        noise = ("within" if abs(gain["ours"] - gain["trl"]) <= 2 * se else "outside")
        missed.append(f"gold-reward gain {gain['ours']:.3f} vs TRL {gain['trl']:.3f} "
                      f"({gain['status']}); the difference is {noise} 2 standard errors "
                      f"({2 * se:.3f}) of the evaluation")
    f = report["flops"]
    if f["status"] != "MET":
        missed.append(f"training phase at {f['ours_fraction']:.1%} of the matmul peak (target "
                      f"{TARGET_PEAK_FRACTION:.0%}): {f['ours_gflops']:.2f} of {f['peak_gflops']:.1f} "
                      f"GFLOP/s; {rows['padding share of training forward positions']['ours']:.0%} "
                      "of the computed positions are padding, and attention, element-wise ops, "
                      "optimizer steps and per-call overhead are outside the 6N count; the "
                      "policy's own forward + backward with nothing around it reaches "
                      + ", ".join(f"{a['fraction']:.1%} at {a['positions']} positions"
                                  for a in f["alone"]))
    if eps["status"] != "MET":
        missed.append(f"bound: if our whole training phase ran at the rate of the policy's "
                      f"forward + backward alone at one mini-batch's size ({f['alone'][0]['positions']} "
                      f"positions: no losses, optimizer or bookkeeping), training would take "
                      f"{f['zero_overhead_training_s']:.2f} s and ours would reach "
                      f"{f['zero_overhead_episodes_per_s']:.1f} episodes/s = "
                      f"{f['zero_overhead_ratio']:.2f}x TRL")
    if report["scaling"]["status"] != "MET":
        missed.append("step time grows faster than the response length: growth factors "
                      + ", ".join(f"{g:.2f}" for g in report["scaling"]["growth_vs_linear"]))
    return missed


def build_report(args: argparse.Namespace, size: ModelSize, fx: Fixture, base: RunSpec,
                 gold_before: dict, ours: dict, trl: dict, sweep: list[dict], generation: dict,
) -> dict:
    import transformers
    import trl as trl_pkg

    train_s = {"ours": ours["training_s"], "trl": trl["training_s"]}
    flops = {
        "formula": "6 x (N_policy + N_critic) x training tokens / training-phase seconds; tokens = "
                   "real (non-pad) prompt + response tokens in every PPO-epoch forward; 6N = 2N "
                   "forward + 4N backward per token (Kaplan et al. 2020)",
        "peak_matmul_n": base.peak_n,
        # each stack's rate against the peak its own process measured right after training
        "peak_gflops": ours["probe_peak_flops"] / 1e9,
        "trl_peak_gflops": trl["probe_peak_flops"] / 1e9,
        "ours_gflops": ours["training_flops"] / train_s["ours"] / 1e9,
        "trl_gflops": trl["training_flops"] / train_s["trl"] / 1e9,
    }
    # the same model's forward + backward with nothing around it (bench/common.py), measured
    # in the process of our fastest run right after its training
    flops["alone"] = [{"positions": a["positions"], "gflops": a["flops"] / 1e9,
                       "fraction": a["flops"] / ours["probe_peak_flops"]}
                      for a in ours["probe_alone"]]
    flops["ours_fraction"] = flops["ours_gflops"] / flops["peak_gflops"]
    # an engine with zero cost around the forward/backward: both models' training at the
    # rate of the policy's forward + backward alone at one mini-batch's size
    floor = flops["alone"][0]["gflops"]
    bound_train_s = ours["training_flops"] / (floor * 1e9)
    flops["zero_overhead_training_s"] = bound_train_s
    flops["zero_overhead_episodes_per_s"] = ours["episodes"] / (
        ours["generation_s"] + ours["scoring_s"] + bound_train_s)
    flops["zero_overhead_ratio"] = flops["zero_overhead_episodes_per_s"] / trl["episodes_per_s"]
    flops["trl_fraction"] = flops["trl_gflops"] / flops["trl_peak_gflops"]
    flops["status"] = _status(flops["ours_fraction"] >= TARGET_PEAK_FRACTION)
    report = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/ppo_vs_trl.py",
                                                     *sys.argv[1:]]),
        "config": {k: v for k, v in asdict(base).items()
                   if k not in ("fixture", "stack", "out", "sweep", "evaluate", "scale_probe")},
        "size": asdict(size),
        "fixture": asdict(fx),
        "machine": {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl_pkg.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
        "gold_before": gold_before,
        "ours": ours,
        "trl": trl,
        "comparison": comparison_rows(ours, trl, gold_before["gold"]),
        "generation": generation,
        "flops": flops,
        "scaling": scaling_section(sweep, args.batch_size, args.response_length),
    }
    report["missed"] = closing_notes(report)
    return report


# ---------------------------------------------------------------------------------------------
# the second scale (issue 13): about 20M parameters, where matrix multiplies dominate
# ---------------------------------------------------------------------------------------------


# iterations, batch size, response length, rounds of each --scale (and of --tiny)
SCALE_DEFAULTS = {"toy": (16, 32, 64, 4), "20m": (3, 32, 64, 6)}
TINY_DEFAULTS = {"toy": (2, 4, 16, 1), "20m": (1, 4, 16, 2)}

FLOP_FORMULA = (
    "FLOPs of each run from the tokens it processed, N = weights in matrix multiplies "
    "(every nn.Linear, the tied LM head included; bench.common.matmul_params), T = real "
    "prompt + response tokens of all episodes (= training tokens / PPO epochs): generation "
    "2 N_policy T (prefill and one decode step per token), scoring 2 (N_reference + N_critic "
    "+ N_reward) T (no-grad forwards), training 6 (N_policy + N_critic) x training tokens "
    "(forward + backward of every PPO-epoch forward; Kaplan et al. 2020); attention's "
    "O(t^2) term left out. Achieved GFLOP/s = FLOPs / seconds of the phase (whole: wall "
    "time); share of peak = against the fp32 torch.mm peak (--scale 20m: 2048^2) measured "
    "in the same process right after the run's training, at the same thread count")


def model_counts(fx: Fixture) -> dict[str, Any]:
    """Shape and parameter counts of the fixture's models (critic = reward model's weights)."""
    policy, scorer = load_policy(fx), load_scorer(fx)
    cfg = policy.config
    return {"n_layer": cfg.num_hidden_layers, "width": cfg.hidden_size,
            "n_head": cfg.num_attention_heads, "mlp": cfg.intermediate_size,
            "vocab": cfg.vocab_size, "tied_embeddings": bool(cfg.tie_word_embeddings),
            "policy_params": n_params(policy), "reward_params": n_params(scorer),
            "policy_matmul_params": matmul_params(policy),
            "reward_matmul_params": matmul_params(scorer)}


def run_flop_rates(result: dict, counts: dict, epochs: int) -> dict:
    """One run's FLOPs by phase (:func:`bench.common.ppo_iteration_flops`), its GFLOP/s per
    phase and whole, and each as a share of the matmul peak its own process measured."""
    real = result["train_tokens"] / epochs
    flops = ppo_iteration_flops(counts["policy_matmul_params"], counts["reward_matmul_params"],
                                counts["reward_matmul_params"], real, result["train_tokens"])
    seconds = {"generation": result["generation_s"], "scoring": result["scoring_s"],
               "training": result["training_s"], "total": result["wall_s"]}
    gflops = {k: flops[k] / seconds[k] / 1e9 if seconds[k] > 0 else float("nan") for k in flops}
    peak = result["probe_peak_flops"] / 1e9
    return {"real_tokens": real, "flops": flops, "gflops": gflops, "peak_gflops": peak,
            "fraction": {k: v / peak for k, v in gflops.items()}}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, range, mean and standard error (NaN with one value) of per-round numbers."""
    vals = [float(v) for v in values]
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    return {"n": len(vals), "median": statistics.median(vals), "min": min(vals),
            "max": max(vals), "mean": statistics.fmean(vals), "se": se}


def scale_summary(rounds: list[dict], batch_size: int) -> dict:
    """Statistics over rounds: episodes/s of each stack, the per-round ratio ours/TRL (the two
    runs of a round are adjacent in time, so the ratio is the paired comparison), phase
    seconds per iteration, GFLOP/s and shares of the peak."""
    def per_round(fn: Callable[[dict], float]) -> dict[str, float]:
        return spread([fn(r["ours"]) / fn(r["trl"]) for r in rounds])

    # the machine's ceiling: the highest peak any run's process measured (a run's own peak
    # can be caught in a slow moment of the shared CPU)
    best_peak = max(r[f"{side}_flops"]["peak_gflops"] for r in rounds for side in ("ours", "trl"))
    out: dict[str, Any] = {
        "ratio": per_round(lambda x: x["episodes_per_s"]),
        # contention-robust: CPU time moves less than wall time when other jobs share the cores
        "ratio_cpu": per_round(lambda x: x["episodes_per_cpu_s"]),
        # work-normalised: the stacks' responses (hence tokens per episode) can differ
        "ratio_gflops": spread([r["ours_flops"]["gflops"]["total"] / r["trl_flops"]["gflops"]["total"]
                                for r in rounds]),
        # both: the FLOPs each stack's tokens cost, per CPU-second
        "ratio_gflops_cpu": spread([(r["ours_flops"]["flops"]["total"] / r["ours"]["cpu_s"])
                                    / (r["trl_flops"]["flops"]["total"] / r["trl"]["cpu_s"])
                                    for r in rounds]),
        "best_peak_gflops": best_peak,
    }
    for side in ("ours", "trl"):
        runs = [r[side] for r in rounds]
        rates = [r[f"{side}_flops"] for r in rounds]
        per_cpu = [f["flops"]["total"] / x["cpu_s"] / 1e9 for f, x in zip(rates, runs)]
        out[side] = {
            "episodes_per_s": spread([x["episodes_per_s"] for x in runs]),
            "episodes_per_cpu_s": spread([x["episodes_per_cpu_s"] for x in runs]),
            "steady_step_s": spread([steady_step_s(x) for x in runs]),
            "generated_tokens_per_episode": spread([x["generated_tokens"] / x["episodes"]
                                                    for x in runs]),
            "real_tokens_per_episode": spread([f["real_tokens"] / x["episodes"]
                                               for f, x in zip(rates, runs)]),
            **{f"{p}_s_per_iteration": spread([x[f"{p}_s"] / x["iterations"] for x in runs])
               for p in ("generation", "scoring", "training")},
            "gflops": {k: spread([f["gflops"][k] for f in rates]) for k in rates[0]["gflops"]},
            "fraction": {k: spread([f["fraction"][k] for f in rates]) for k in rates[0]["fraction"]},
            "peak_gflops": spread([f["peak_gflops"] for f in rates]),
            "fraction_of_best_peak": {k: spread([f["gflops"][k] / best_peak for f in rates])
                                      for k in ("total", "training")},
            "gflops_per_cpu_s": spread(per_cpu),
            "cpu_fraction_of_best_peak": spread([g / best_peak for g in per_cpu]),
            "layer_train_gflops": spread([x["probe_layer_train_flops"] / 1e9 for x in runs]),
            "layer_decode_gflops": spread([x["probe_layer_decode_flops"] / 1e9 for x in runs]),
            "layer_train_tokens": runs[0]["probe_layer_train_tokens"],
            "peak_rss_mb": spread([x["peak_rss_mb"] for x in runs]),
        }
    out["layer_decode_rows"] = batch_size
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scale_main(args: argparse.Namespace, t_start: float) -> int:
    """``--scale 20m``: ours and TRL on a 6-layer width-512 model, interleaved over rounds
    (ABBA: TRL, ours, ours, TRL, ...), with the FLOP accounting of :data:`FLOP_FORMULA`.
    Speed only: the fixture is trained very briefly (``bench.common.SCALE_20M``) and no
    gold evaluation runs. ``--tiny`` runs the same path on the 1-layer width-64 model, in
    this process (the test)."""
    import transformers
    import trl as trl_pkg

    size = TINY_SIZE if args.tiny else SCALE_20M
    print(f"fixture ({'tiny' if args.tiny else args.scale}) ...", file=sys.stderr, flush=True)
    fx = build_fixture(size, seed=args.seed)
    counts = model_counts(fx)
    print(f"policy: {counts['policy_params']:,} parameters ({counts['n_layer']} layers x width "
          f"{counts['width']} x {counts['n_head']} heads, MLP {counts['mlp']}, vocabulary "
          f"{counts['vocab']}); critic / reward model {counts['reward_params']:,}",
          file=sys.stderr, flush=True)
    base = RunSpec(stack="ours", fixture=asdict(fx), iterations=args.iterations,
                   batch_size=args.batch_size, response_length=args.response_length,
                   seed=args.seed, threads=args.threads, parallel_critic=args.parallel_critic,
                   evaluate=False, probe=False, scale_probe=True,
                   peak_n=512 if args.tiny else 2048)
    log_dir = args.out.parent / (args.out.stem + "_logs")
    run: Callable[..., dict] = (
        (lambda spec, suffix="": execute(spec)) if args.tiny
        else lambda spec, suffix="": run_worker(spec, log_dir, suffix))
    rounds = []
    for r in range(args.rounds):
        order = ("trl", "ours") if r % 2 == 0 else ("ours", "trl")
        results = {stack: run(replace(base, stack=stack), suffix=f"_{args.scale}_round{r + 1}")
                   for stack in order}
        row = {"round": r + 1, "order": list(order), **results}
        for side in ("ours", "trl"):
            row[f"{side}_flops"] = run_flop_rates(results[side], counts, base.num_ppo_epochs)
        rounds.append(row)
        print(f"  round {r + 1}: ours {results['ours']['episodes_per_s']:.3f}, TRL "
              f"{results['trl']['episodes_per_s']:.3f} episodes/s", file=sys.stderr, flush=True)
    report = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/ppo_vs_trl.py",
                                                     *sys.argv[1:]]),
        "mode": "scale", "scale": args.scale, "tiny": args.tiny, "commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "config": {k: v for k, v in asdict(base).items()
                   if k not in ("fixture", "stack", "out", "sweep", "evaluate")},
        "rounds_n": args.rounds,
        "size": asdict(size), "fixture": asdict(fx), "models": counts,
        "machine": {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl_pkg.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
        "flop_formula": FLOP_FORMULA,
        "rounds": rounds,
        "summary": scale_summary(rounds, args.batch_size),
    }
    report["total_bench_s"] = time.perf_counter() - t_start
    print(render_scale(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['total_bench_s']:.0f}s)", file=sys.stderr)
    return 0


def render_scale(report: dict) -> str:
    """The ``--scale`` report as Markdown."""
    cfg, m, s = report["config"], report["models"], report["summary"]
    o, t = s["ours"], s["trl"]

    def med(c: dict, pct: bool = False) -> str:
        if pct:
            return f"{c['median']:.1%} [{c['min']:.1%}, {c['max']:.1%}]"
        return f"{_fmt(c['median'])} [{_fmt(c['min'])}, {_fmt(c['max'])}]"

    def mse(c: dict) -> str:
        return f"{_fmt(c['mean'])} ± {_fmt(c['se'])}"

    lines = [
        f"PPO at --scale {report['scale']}, ours vs TRL {report['machine']['trl']} -- policy "
        f"{m['policy_params']:,} parameters ({m['n_layer']} layers x width {m['width']} x "
        f"{m['n_head']} heads, MLP {m['mlp']}, vocabulary {m['vocab']}, tied embeddings: "
        f"{m['policy_matmul_params']:,} in matmuls), critic = reward model "
        f"{m['reward_params']:,} ({m['reward_matmul_params']:,} in matmuls); "
        f"{cfg['iterations']} iterations x {cfg['batch_size']} episodes per run, response length "
        f"{cfg['response_length']}, {cfg['num_ppo_epochs']} PPO epochs x "
        f"{cfg['num_mini_batches']} minibatches, {report['machine']['threads']} threads, "
        f"{report['rounds_n']} rounds (each: both stacks, ABBA order)",
        "",
        "| round | order | ours episodes/s | TRL episodes/s | ours/TRL | ours GFLOP/s | "
        "TRL GFLOP/s | ours share of peak | TRL share of peak | peak GFLOP/s (ours / TRL run) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rounds"]:
        fo, ft = r["ours_flops"], r["trl_flops"]
        lines.append(
            f"| {r['round']} | {', '.join(r['order'])} | {_fmt(r['ours']['episodes_per_s'])} | "
            f"{_fmt(r['trl']['episodes_per_s'])} | "
            f"{_fmt(r['ours']['episodes_per_s'] / r['trl']['episodes_per_s'])} | "
            f"{_fmt(fo['gflops']['total'])} | {_fmt(ft['gflops']['total'])} | "
            f"{fo['fraction']['total']:.1%} | {ft['fraction']['total']:.1%} | "
            f"{_fmt(fo['peak_gflops'])} / {_fmt(ft['peak_gflops'])} |")
    r = s["ratio"]
    lines += [
        "",
        "| over rounds: median [min, max]; mean ± standard error | ours | TRL | ours/TRL (per round) |",
        "|---|---:|---:|---:|",
        f"| episodes/s, median | {med(o['episodes_per_s'])} | {med(t['episodes_per_s'])} | "
        f"{med(r)} |",
        f"| episodes/s, mean | {mse(o['episodes_per_s'])} | {mse(t['episodes_per_s'])} | "
        f"{mse(r)} |",
        f"| episodes per CPU-second, median | {med(o['episodes_per_cpu_s'])} | "
        f"{med(t['episodes_per_cpu_s'])} | {med(s['ratio_cpu'])} |",
        f"| step time s (steady), median | {med(o['steady_step_s'])} | {med(t['steady_step_s'])} | |",
        f"| generated tokens per episode | {_fmt(o['generated_tokens_per_episode']['mean'])} | "
        f"{_fmt(t['generated_tokens_per_episode']['mean'])} | |",
        f"| prompt + response tokens per episode | {_fmt(o['real_tokens_per_episode']['mean'])} | "
        f"{_fmt(t['real_tokens_per_episode']['mean'])} | |",
        *(f"| {p} s per iteration, median | {med(o[f'{p}_s_per_iteration'])} | "
          f"{med(t[f'{p}_s_per_iteration'])} | |" for p in ("generation", "scoring", "training")),
        f"| GFLOP/s, whole iteration, median | {med(o['gflops']['total'])} | "
        f"{med(t['gflops']['total'])} | {med(s['ratio_gflops'])} |",
        f"| GFLOP per CPU-second, whole iteration, median | {med(o['gflops_per_cpu_s'])} | "
        f"{med(t['gflops_per_cpu_s'])} | {med(s['ratio_gflops_cpu'])} |",
        f"| share of matmul peak, whole iteration, median | {med(o['fraction']['total'], True)} | "
        f"{med(t['fraction']['total'], True)} | |",
        *(f"| share of matmul peak, {p} phase, median | {med(o['fraction'][p], True)} | "
          f"{med(t['fraction'][p], True)} | |" for p in ("generation", "scoring", "training")),
        f"| matmul peak GFLOP/s ({cfg['peak_n']}^2 fp32 torch.mm, in each run's process) | "
        f"{med(o['peak_gflops'])} | {med(t['peak_gflops'])} | |",
        f"| share of the highest peak of all runs ({_fmt(s['best_peak_gflops'])} GFLOP/s), whole "
        f"iteration, median | {med(o['fraction_of_best_peak']['total'], True)} | "
        f"{med(t['fraction_of_best_peak']['total'], True)} | |",
        f"| share of the highest peak, training phase, median | "
        f"{med(o['fraction_of_best_peak']['training'], True)} | "
        f"{med(t['fraction_of_best_peak']['training'], True)} | |",
        f"| share of the highest peak per CPU-second, whole iteration, median | "
        f"{med(o['cpu_fraction_of_best_peak'], True)} | {med(t['cpu_fraction_of_best_peak'], True)} | |",
        f"| one layer's matmuls at a training mini-batch's tokens ({o['layer_train_tokens']} / "
        f"{t['layer_train_tokens']}), GFLOP/s | {med(o['layer_train_gflops'])} | "
        f"{med(t['layer_train_gflops'])} | |",
        f"| one layer's matmuls at {s['layer_decode_rows']} rows (a decode step), GFLOP/s | "
        f"{med(o['layer_decode_gflops'])} | {med(t['layer_decode_gflops'])} | |",
        f"| peak RSS MiB, median | {med(o['peak_rss_mb'])} | {med(t['peak_rss_mb'])} | |",
        "",
        report["flop_formula"] + ".",
    ]
    return "\n".join(lines)


def _override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> (field, value); the value as JSON (numbers, true/false, null) if it
    parses, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=None,
                    help="PPO iterations per stack (16: 8 leave the gold gain within its noise; tiny 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="episodes per iteration (32; tiny 4)")
    ap.add_argument("--response-length", type=int, default=None, help="max new tokens (64; tiny 16)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "latest.json",
                    help="where to write the JSON report")
    ap.add_argument("--tiny", action="store_true",
                    help="seconds-long run on a 2-layer width-64 model (the test uses it)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both stacks and the matmul peak (default 1: on a shared "
                         "machine one thread per process gives the steadiest numbers)")
    ap.add_argument("--parallel-critic", action="store_true",
                    help="ours: update the critic on a second Python thread (use with --threads 2, "
                         "so each stack gets two cores)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs per stack in ABBA order, the fastest of each compared (4; tiny 1)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the fixture and both runs; in the quality mode the first seed")
    ap.add_argument("--scale", choices=tuple(SCALE_DEFAULTS), default="toy",
                    help="toy: the 0.58M-parameter benchmark above (default); 20m: a 6-layer "
                         "width-512 model (25.4M parameters) where matmuls dominate, ours vs "
                         "TRL over interleaved rounds with episodes/s, the ratio and the share "
                         "of the matmul peak only (defaults 3 iterations x 32 episodes, "
                         "response length 64, 6 rounds; with --tiny: the tiny model, 1 "
                         "iteration x 4 episodes, 2 rounds)")
    q = ap.add_argument_group("quality mode (instead of the speed benchmark)")
    q.add_argument("--quality-seeds", type=int, default=0,
                   help="N >= 2: gold gain of ours and TRL on seeds --seed .. --seed+N-1, each "
                        "with its own fixture, and the paired ours - TRL difference with a 95%% "
                        "t-interval; no speed sections")
    q.add_argument("--quality-prompts", type=int, default=None,
                   help="sampled responses per evaluation (1440: the task's 360 prompts x 4; tiny 24)")
    q.add_argument("--ours-set", action="append", default=[], metavar="FIELD=VALUE",
                   type=_override,
                   help="ours only, repeatable: set a PPOConfig field (strategy.FIELD for the "
                        "StrategyConfig), VALUE parsed as JSON, else a string; for A/B runs")
    q.add_argument("--reuse-trl", type=Path, default=None,
                   help="quality JSON of an earlier run: reuse its TRL result and gold before for "
                        "every seed whose TRL settings match (A/B of an option of ours)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quality_prompts is None:
        args.quality_prompts = 24 if args.tiny else 1440
    if args.quality_seeds == 1 or args.quality_seeds < 0:
        ap.error("--quality-seeds must be >= 2 (a confidence interval over seeds needs two)")
    if (args.ours_set or args.reuse_trl) and not args.quality_seeds:
        ap.error("--ours-set and --reuse-trl belong to the quality mode (--quality-seeds N)")
    if args.quality_seeds and args.scale != "toy":
        ap.error("the quality mode runs at --scale toy only")
    defaults = (TINY_DEFAULTS if args.tiny else SCALE_DEFAULTS)[args.scale]
    for name, d in zip(("iterations", "batch_size", "response_length", "rounds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, d)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.iterations < 1 or args.batch_size < 4 or args.batch_size % 2:
        ap.error("--iterations must be >= 1 and --batch-size an even number >= 4 (2 minibatches "
                 "of >= 2 episodes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    torch.set_num_threads(args.threads)
    size = TINY_SIZE if args.tiny else ModelSize()
    t_start = time.perf_counter()
    if args.scale != "toy":
        return scale_main(args, t_start)
    if args.quality_seeds:
        return quality_main(args, size, t_start)
    lengths = (8, 16, 32) if args.tiny else (32, 64, 128)
    print(f"fixture ({'tiny' if args.tiny else 'full'}) ...", file=sys.stderr, flush=True)
    fx = build_fixture(size, seed=args.seed)
    base = RunSpec(stack="ours", fixture=asdict(fx), iterations=args.iterations,
                   batch_size=args.batch_size, response_length=args.response_length,
                   seed=args.seed, threads=args.threads, parallel_critic=args.parallel_critic,
                   eval_prompts=16 if args.tiny else 192, peak_n=512 if args.tiny else 2048)

    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(fx)
    initial = AutoModelForCausalLM.from_pretrained(fx.policy_dir)
    gold_before = evaluate_policy(initial, initial, tok, eval_prompts(base.eval_prompts),
                                  base.response_length, base.temperature, seed=base.seed + 7)
    log_dir = args.out.parent / (args.out.stem + "_logs")
    # --tiny runs in this process (the test's time budget cannot pay three interpreter
    # start-ups); its peak RSS is then the whole benchmark's, not per stack
    run: Callable[..., dict] = (
        (lambda spec, suffix="": execute(spec)) if args.tiny
        else lambda spec, suffix="": run_worker(spec, log_dir, suffix))
    # ABBA order (TRL, ours, ours, TRL, ...): drift in the machine's speed over the run hits
    # both stacks alike; each stack's fastest run is the one least disturbed by other jobs
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for r in range(args.rounds):
        for stack in ("trl", "ours") if r % 2 == 0 else ("ours", "trl"):
            runs[stack].append(run(replace(base, stack=stack), suffix=f"_round{r + 1}"))
    trl, ours = best_of(runs["trl"]), best_of(runs["ours"])
    pairs = [(args.batch_size, n) for n in sorted({*lengths, args.response_length})]
    pairs.append((2 * args.batch_size, args.response_length))
    # the untrained policy runs every response to the limit (see untrained_policy_dir)
    sweep_fx = replace(fx, policy_dir=untrained_policy_dir(fx, args.seed))
    sweep = run(replace(base, fixture=asdict(sweep_fx), iterations=1 if args.tiny else 4,
                        evaluate=False, sweep=tuple(pairs)))["sweep"]
    print("  generation vs model.generate, matmul peak ...", file=sys.stderr, flush=True)
    generation = compare_generation(fx, args.batch_size, args.response_length, base.temperature,
                                    args.seed)
    report = build_report(args, size, fx, base, gold_before, ours, trl, sweep, generation)
    report["total_bench_s"] = time.perf_counter() - t_start
    text = render(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['total_bench_s']:.0f}s)", file=sys.stderr)
    return 0


def quality_main(args: argparse.Namespace, size: ModelSize, t_start: float) -> int:
    import transformers
    import trl as trl_pkg

    quality = run_quality(args, size)
    report = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/ppo_vs_trl.py",
                                                     *sys.argv[1:]]),
        "mode": "quality",
        "size": asdict(size),
        "machine": {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl_pkg.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
        "quality": quality,
        "total_bench_s": time.perf_counter() - t_start,
    }
    print(render_quality(quality))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out} ({report['total_bench_s']:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
