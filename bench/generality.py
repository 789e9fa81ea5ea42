"""Generality suite: the documented user path against a plain TRL 1.12 pipeline, per task (issue 11, item 6).

For each task of ``bench/tasks`` (default: all) and each seed:

* **ours**: write the task as a user file (``bench.tasks.write_task``: ``pairs.jsonl`` and a
  copy of ``configs/user_dataset.yaml`` with only ``source`` and ``gold_scorer`` changed), then
  ``rlhf run --config <that file>`` with a fresh ``RLHF_HOME``, timed from outside.
* **TRL**: in its own subprocess, ``trl.SFTTrainer`` (prompt-completion, completion-only loss)
  -> ``trl.RewardTrainer`` (from the SFT model, ``AutoModelForSequenceClassification``,
  ``num_labels=1``) -> ``trl.experimental.ppo.PPOTrainer`` (policy and reference = SFT, reward
  and value model = RM), on the split files our run wrote and from the base model it built
  (same tokenizer, same architecture and size, same untrained weights). Budgets: the TRL
  script of the issue (:class:`TRLRecipe`).
* **evaluation, one function for both** (:func:`evaluate_pipeline`, built on
  ``assets/evaluation.py``): RM agreement with the gold ordering on the test pairs, mean gold
  reward of SFT and PPO samples on the test prompts, gold win rate PPO vs SFT (ties half),
  KL(PPO || SFT) in nats per response on PPO's samples. Sampling settings are those of the
  config's ``evaluation_report`` (temperature 0.7, samples per prompt, ``max_new_tokens``).

One table per task (ours, TRL, ours/TRL, and ours' own ``summary.json`` as a cross-check),
and a JSON report. Per-stage output goes to log files under ``--work-dir``; the terminal gets
one line per task and stage.

    .venv/bin/python bench/generality.py --out bench/results/generality.json
    .venv/bin/python bench/generality.py --tasks arithmetic --seeds 0,1,2 --out /tmp/arith.json
    .venv/bin/python bench/generality.py --tiny --tasks style --out /tmp/tiny.json   # smoke run, ~3 min

``--set OP.FIELD=VALUE`` changes one setting of our run config (``ops.OP.config.FIELD``; VALUE
is YAML, 1e-3 included; a dotted FIELD reaches into a nested mapping such as ``overrides``),
for A/B runs of the user path: ``--set base_model.n_layer=4 --set reward_model.center_coef=0``.
TRL's side follows only what our run hands it (splits, base model), so it runs again when
those change. A second training seed for one cell: ``--set OP.seed=1`` for each of our stages and
``--trl-seed 1`` for TRL's three trainers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from bench.tasks import TASKS, write_task

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
DEFAULT_WORK_DIR = REPO_ROOT / "bench" / "results" / "generality"
# Inherited variables that would point our run at other state (an outer RLHF_HOME's Dagster or
# MLflow store) or at another process group's torch.distributed rendezvous.
SCRUB_ENV = ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RLHF_LANDING_DIR",
             "RLHF_MLFLOW_ARTIFACT_ROOT", "RLHF_METRICS_FILE", "MASTER_ADDR", "MASTER_PORT", "RANK",
             "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
METRICS: tuple[tuple[str, str], ...] = (
    ("rm_gold_agreement", "RM gold agreement (test pairs)"),
    ("gold_sft", "gold reward SFT"),
    ("gold_ppo", "gold reward PPO"),
    ("gold_gain", "gold gain PPO - SFT"),
    ("gold_win_rate", "gold win rate PPO vs SFT"),
    ("kl_nats_per_response", "KL(PPO || SFT) nats/response"),
    ("wall_s", "wall time s"),
)
# ours' summary.json keys for the cross-check column (KL per response only if the run writes it)
SUMMARY_KEYS = {"rm_gold_agreement": "reward_model_gold_agreement", "gold_sft": "gold_reward_sft",
                "gold_ppo": "gold_reward_ppo", "gold_win_rate": "gold_win_rate",
                "kl_nats_per_response": "kl_to_sft_per_response"}


@dataclass(frozen=True)
class TRLRecipe:
    """The TRL side: the issue's TRL script ("SFTTrainer 10 epochs, RewardTrainer 4 epochs,
    PPOTrainer 6,144 episodes"), with learning rates for a model trained from scratch."""

    sft_epochs: float = 10.0
    """SFTTrainer epochs over sft_train (the issue's TRL script)"""
    rm_epochs: float = 4.0
    """RewardTrainer epochs over rm_train (the issue's TRL script)"""
    ppo_episodes: int = 6144
    """PPOTrainer total_episodes (the issue's TRL script)"""
    sft_max_steps: int = -1
    """caps SFT steps when > 0 (the --tiny smoke run)"""
    rm_max_steps: int = -1
    """caps RM steps when > 0 (the --tiny smoke run)"""
    batch_size: int = 32
    """per-device batch of SFT and RM; the same as ppo_core's SFT / RM default"""
    sft_learning_rate: float = 1e-3
    """TRL's 2e-5 fine-tunes pretrained models; a from-scratch 0.6M-parameter model needs ~1e-3
    (configs/user_dataset.yaml's SFT LR)"""
    rm_learning_rate: float = 5e-4
    """ppo_core's RewardConfig default for a scalar reward model (TRL's RewardTrainer trains one),
    for the same reason"""
    ppo_learning_rate: float = 1e-4
    """one AdamW for policy and value model; ppo_core's policy LR default (TRL's 3e-6 is tuned
    for 1B-parameter models)"""
    ppo_batch_size: int = 64
    """episodes per PPO iteration (per_device_train_batch_size; ppo_core's rollout_batch_size default)"""
    num_mini_batches: int = 2
    """optimizer steps per PPO epoch (ppo_core's default; TRL's is 1)"""
    num_ppo_epochs: int = 4
    """TRL default"""
    kl_coef: float = 0.05
    """TRL default (and ppo_core's for a scalar reward model, which TRL's side trains)"""
    missing_eos_penalty: float = 1.0
    """TRL's PPO example script"""
    response_length: int = 32
    """max new tokens in PPO; replaced by our run's PPO response_length"""
    temperature: float = 0.7
    """rollout temperature; replaced by our run's PPO temperature"""
    max_length: int = 128
    """SFT / RM sequence cap (ppo_core's default)"""
    seed: int = 0
    """training seed; 0 as the stages of our run (StageConfig.seed default)"""


TINY_RECIPE = TRLRecipe(sft_max_steps=6, rm_max_steps=6, ppo_episodes=16, batch_size=16,
                        ppo_batch_size=8, response_length=12)


# ---------------------------------------------------------------------------------------------
# configs and paths
# ---------------------------------------------------------------------------------------------


def tiny_config(config_path: Path, out_path: Path) -> Path:
    """The task config with every stage budget, evaluation size and check threshold of
    ``configs/tiny.yaml`` (its ``raw_preferences`` is the bundled generator, so it is not taken)."""
    config = yaml.safe_load(config_path.read_text())
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    for op, body in tiny["ops"].items():
        if op == "raw_preferences":
            continue
        base = (config["ops"].get(op) or {}).get("config") or {}
        config["ops"][op] = {"config": {**base, **((body or {}).get("config") or {})}}
    out_path.write_text(f"# {config_path.name} with the budgets of configs/tiny.yaml (bench/generality.py --tiny)\n"
                        + yaml.safe_dump(config, sort_keys=False))
    return out_path


def evaluation_settings(config: dict) -> dict[str, Any]:
    """The evaluation_report settings of a run config (EvaluationConfig fields only)."""
    from assets.evaluation import EvaluationConfig

    given = ((config.get("ops") or {}).get("evaluation_report") or {}).get("config") or {}
    return EvaluationConfig(**{k: v for k, v in given.items() if k in EvaluationConfig.model_fields}).model_dump()


def read_run_manifest(home: Path, asset: str, run_id: str) -> dict[str, Any]:
    path = home / "manifests" / asset / "runs" / f"{run_id}.json"
    if not path.is_file():
        raise FileNotFoundError(f"our run materialized no {asset} ({path} is missing)")
    return json.loads(path.read_text())


def ours_paths(home: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Where our run put its splits and models (from the per-run asset manifests)."""
    run_id = summary["dagster_run_id"]
    paths = {"split_dir": read_run_manifest(home, "dataset_splits", run_id)["split_dir"]}
    from assets.models import reward_model_paths

    for asset, key in (("base_model", "base"), ("sft_model", "sft"), ("ppo_policy", "ppo")):
        paths[key] = read_run_manifest(home, asset, run_id)["model_path"]
    paths["rm"] = reward_model_paths(read_run_manifest(home, "reward_model", run_id))  # PPO's reward
    ppo = read_run_manifest(home, "ppo_policy", run_id)
    paths["rm_stats"] = ppo.get("reward_ensemble")
    paths["ppo_stage_config"] = ppo.get("config_path", "")
    return paths


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def _rlhf_executable() -> str:
    local = Path(sys.executable).parent / "rlhf"
    found = str(local) if local.exists() else shutil.which("rlhf")
    if not found:
        raise SystemExit("bench/generality.py: the `rlhf` command is not installed (pip install -e .)")
    return found


def say(line: str) -> None:
    print(line, flush=True)


@contextmanager
def output_to(log_path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so progress bars and
    warnings of C extensions too) to ``log_path`` for the duration of the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


# ---------------------------------------------------------------------------------------------
# ours: the user path
# ---------------------------------------------------------------------------------------------


def run_ours(config_path: Path, home: Path, log_path: Path, threads: int) -> dict[str, Any]:
    """``rlhf run --config <config_path>`` with ``RLHF_HOME=home``; wall time around the command.

    A failed gate (e.g. PPO not beating SFT) makes ``rlhf run`` exit 1 but leaves every model
    and the evaluation in place: that is a result, not an error. Missing models are an error.
    """
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    extra = {"RLHF_HOME": str(home)}
    if threads > 0:
        extra["OMP_NUM_THREADS"] = str(threads)
    command = [_rlhf_executable(), "run", "--config", str(config_path)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ RLHF_HOME={home} PYTHONPATH={REPO_ROOT} {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.run(command, cwd=REPO_ROOT, env=clean_env(**extra), stdout=log,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    summary_path = home / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"rlhf run exited {proc.returncode} without {summary_path}; log {log_path}:\n"
                           f"{_tail(log_path)}")
    summary = json.loads(summary_path.read_text())
    try:
        paths = ours_paths(home, summary)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{exc}; rlhf run status {summary.get('status')}, failed steps "
                           f"{summary.get('failed_steps')}; log {log_path}:\n{_tail(log_path)}") from exc
    return {"command": shlex.join(command), "returncode": proc.returncode, "status": summary.get("status"),
            "checks": summary.get("checks"), "wall_s": wall, "summary": summary, "paths": paths,
            "log": str(log_path)}


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def _trl_common_args(out_dir: Path, recipe: TRLRecipe) -> dict[str, Any]:
    # CPU, fp32 (TRL 1.12 defaults to bf16 and gradient checkpointing), no saving, no reporting
    return {"output_dir": str(out_dir), "use_cpu": True, "bf16": False, "fp16": False,
            "gradient_checkpointing": False, "report_to": "none", "save_strategy": "no",
            "eval_strategy": "no", "logging_steps": 10, "disable_tqdm": True, "seed": recipe.seed}


def trl_pipeline(split_dir: str, base_dir: str, out_dir: str, recipe: TRLRecipe) -> dict[str, Any]:
    """SFT -> RM -> PPO with TRL 1.12 on our splits and base model; returns the three model dirs
    and each stage's seconds. Runs in the worker process (:func:`trl_worker_main`)."""
    import pandas as pd
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    splits, out = Path(split_dir), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)

    def read(name: str) -> pd.DataFrame:
        return pd.read_parquet(splits / f"{name}.parquet")

    def space(texts: pd.Series) -> list[str]:
        # TRL tokenizes prompt + completion as one string; the leading space makes its tokens
        # those of ppo_core's separate encodings (the tokenizer adds a prefix space to each text)
        return (" " + texts.astype(str)).tolist()

    dirs = {k: out / k / "final" for k in ("sft", "rm", "ppo")}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    sft_train = read("sft_train")
    sft_data = Dataset.from_dict({"prompt": sft_train["prompt"].astype(str).tolist(),
                                  "completion": space(sft_train["completion"])})
    sft_args = SFTConfig(**_trl_common_args(out / "sft", recipe), num_train_epochs=recipe.sft_epochs,
                         max_steps=recipe.sft_max_steps, per_device_train_batch_size=recipe.batch_size,
                         learning_rate=recipe.sft_learning_rate, max_length=recipe.max_length,
                         completion_only_loss=True, packing=False)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base_dir), args=sft_args,
                     train_dataset=sft_data, processing_class=tok)
    sft.train()
    sft.model.save_pretrained(dirs["sft"])
    tok.save_pretrained(dirs["sft"])
    seconds["sft_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm_train = read("rm_train")
    rm_data = Dataset.from_dict({"prompt": rm_train["prompt"].astype(str).tolist(),
                                 "chosen": space(rm_train["chosen"]),
                                 "rejected": space(rm_train["rejected"])})
    rm_args = RewardConfig(**_trl_common_args(out / "rm", recipe), num_train_epochs=recipe.rm_epochs,
                           max_steps=recipe.rm_max_steps, per_device_train_batch_size=recipe.batch_size,
                           learning_rate=recipe.rm_learning_rate, max_length=recipe.max_length)
    scorer = AutoModelForSequenceClassification.from_pretrained(
        dirs["sft"], num_labels=1, pad_token_id=tok.pad_token_id)
    rm = RewardTrainer(model=scorer, args=rm_args, train_dataset=rm_data, processing_class=tok)
    rm.train()
    rm.model.save_pretrained(dirs["rm"])
    tok.save_pretrained(dirs["rm"])
    seconds["rm_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok.padding_side = "left"  # PPOTrainer generates from left-padded prompts

    def prompts(name: str) -> Dataset:
        return Dataset.from_dict({"input_ids": [tok(p, add_special_tokens=False)["input_ids"]
                                                for p in read(name)["prompt"].astype(str)]})

    ppo_args = PPOConfig(
        **_trl_common_args(out / "ppo", recipe),
        per_device_train_batch_size=recipe.ppo_batch_size, gradient_accumulation_steps=1,
        num_mini_batches=recipe.num_mini_batches, total_episodes=recipe.ppo_episodes,
        num_ppo_epochs=recipe.num_ppo_epochs, local_rollout_forward_batch_size=recipe.ppo_batch_size,
        response_length=recipe.response_length, temperature=recipe.temperature,
        kl_coef=recipe.kl_coef, missing_eos_penalty=recipe.missing_eos_penalty, stop_token="eos",
        learning_rate=recipe.ppo_learning_rate, num_sample_generations=0,
    )

    def load_scorer() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(dirs["rm"], num_labels=1)

    ppo = PPOTrainer(
        args=ppo_args, processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(dirs["sft"]),
        ref_model=AutoModelForCausalLM.from_pretrained(dirs["sft"]),
        reward_model=load_scorer(), value_model=load_scorer(),
        train_dataset=prompts("ppo_train"), eval_dataset=prompts("ppo_eval"),
    )
    ppo.train()
    policy = getattr(ppo.model, "module", ppo.model).policy  # accelerate may wrap it in DDP
    policy.save_pretrained(dirs["ppo"])
    tok.padding_side = "right"
    tok.save_pretrained(dirs["ppo"])
    seconds["ppo_s"] = time.perf_counter() - t0
    return {"dirs": {k: str(v) for k, v in dirs.items()}, "stage_s": seconds}


def trl_worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"] > 0:
        import torch

        torch.set_num_threads(spec["threads"])
    result = trl_pipeline(spec["split_dir"], spec["base_dir"], spec["out_dir"], TRLRecipe(**spec["recipe"]))
    Path(spec["result"]).write_text(json.dumps(result, indent=1))
    return 0


def run_trl(split_dir: str, base_dir: str, out_dir: Path, recipe: TRLRecipe, log_path: Path,
            threads: int) -> dict[str, Any]:
    """The TRL pipeline in a subprocess with its own log; wall time around it."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = {"split_dir": split_dir, "base_dir": base_dir, "out_dir": str(out_dir), "threads": threads,
            "recipe": asdict(recipe), "result": str(out_dir / "result.json")}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    extra = {"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path)],
                              cwd=REPO_ROOT, env=clean_env(**extra), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL pipeline failed (exit {proc.returncode}); log {log_path}:\n{_tail(log_path)}")
    result = json.loads((out_dir / "result.json").read_text())
    return {"wall_s": wall, "stage_s": result["stage_s"], "paths": result["dirs"], "log": str(log_path),
            "recipe": asdict(recipe)}


# ---------------------------------------------------------------------------------------------
# evaluation: one function for both sides
# ---------------------------------------------------------------------------------------------


def evaluate_pipeline(sft_dir: str, ppo_dir: str, rm_dir: str | list[str], test_pairs, test_prompts: list[str],
                      gold_scorer, settings: dict[str, Any], rm_stats: dict | None = None) -> dict[str, Any]:
    """The same numbers for any (SFT, PPO, RM) triple, with ``assets/evaluation.py``'s helpers.
    Several ``rm_dir``: the ensemble weighted as PPO weighted it (``rm_stats``, its summary's
    ``reward_ensemble``), else each member standardised on the SFT answers, as the report does.

    ``settings`` are ``EvaluationConfig`` fields (max_prompts, samples_per_prompt,
    max_new_tokens, temperature, batch_size, seed). Both policies sample the same prompts with
    the same seed; the i-th answers of SFT and PPO to a prompt meet in the win rate. KL is
    ``sum over response tokens of (logp_ppo - logp_sft)`` on PPO's samples, averaged over
    samples (nats per response; its per-token mean is also returned).
    """
    from assets.evaluation import (
        EvaluationConfig,
        as_dirs,
        clustered_se,
        generate,
        kl_per_response,
        kl_per_token,
        mean,
        ensemble_stats,
        pair_metrics,
        rm_scores,
        sequence_logprobs,
        win_rate,
        wins,
    )

    cfg = EvaluationConfig(**settings)
    prompts = test_prompts[: cfg.max_prompts] if cfg.max_prompts > 0 else list(test_prompts)
    prompts = [p for p in prompts for _ in range(max(1, cfg.samples_per_prompt))]
    sft, ppo = generate(sft_dir, prompts, cfg), generate(ppo_dir, prompts, cfg)
    gold_sft = [float(x) for x in gold_scorer(prompts, sft["responses"])]
    gold_ppo = [float(x) for x in gold_scorer(prompts, ppo["responses"])]
    rm_dirs = as_dirs(rm_dir)
    stats, _ = ensemble_stats(rm_dirs, rm_stats,
                              lambda: [rm_scores(d, prompts, sft["ids"], cfg.batch_size) for d in rm_dirs])
    rm = pair_metrics(rm_dirs, test_pairs, gold_scorer, cfg.batch_size, stats)
    lp_ppo = sequence_logprobs(ppo_dir, prompts, ppo["ids"], cfg.batch_size)
    lp_sft = sequence_logprobs(sft_dir, prompts, ppo["ids"], cfg.batch_size)
    return {
        "rm_gold_agreement": rm.get("rm/gold_agreement", float("nan")),
        "rm_gold_agreement_se": rm.get("rm/gold_agreement_se", float("nan")),
        "rm_pair_accuracy": rm.get("rm/pair_accuracy", float("nan")),
        "gold_sft": mean(gold_sft),
        "gold_ppo": mean(gold_ppo),
        "gold_gain": mean(gold_ppo) - mean(gold_sft),
        "gold_win_rate": win_rate(gold_ppo, gold_sft),
        # this run's sampling noise, answers to one prompt as one cluster (the tables' +- is over seeds)
        "gold_win_rate_se": clustered_se(wins(gold_ppo, gold_sft), prompts),
        "kl_nats_per_response": kl_per_response(lp_ppo, lp_sft),
        "kl_per_token": kl_per_token(lp_ppo, lp_sft),
        "ppo_response_tokens": mean(ppo["lengths"]),
        "sft_response_tokens": mean(sft["lengths"]),
        "n_samples": float(len(prompts)),
        # per-sample gold scores, i-th SFT and PPO answer to the same prompt: the win rate and
        # both means can be recomputed from the report
        "gold_sft_scores": gold_sft,
        "gold_ppo_scores": gold_ppo,
    }


def evaluate_side(paths: dict[str, str], split_dir: str, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    split = Path(split_dir)
    pairs = pd.read_parquet(split / "test_pairs.parquet")
    prompts = pd.read_parquet(split / "test_prompts.parquet")["prompt"].astype(str).tolist()
    return evaluate_pipeline(paths["sft"], paths["ppo"], paths["rm"], pairs, prompts,
                             TASKS[task].gold_score_batch, settings, rm_stats=paths.get("rm_stats"))


# ---------------------------------------------------------------------------------------------
# one task, one seed
# ---------------------------------------------------------------------------------------------


def _ppo_stage_settings(path: str) -> dict[str, Any]:
    """response_length and temperature of our run's PPO stage (TRL's PPO gets the same)."""
    if not path or not Path(path).is_file():
        return {}
    stage = json.loads(Path(path).read_text())
    return {k: stage[k] for k in ("response_length", "temperature") if k in stage}


def trl_inputs(split_dir: str, base_dir: str, recipe: TRLRecipe) -> dict[str, Any]:
    """What TRL's side is a function of: the splits (their folder is named by the data
    version), the base model's files (sha256) and the recipe."""
    digest = hashlib.sha256()
    for path in sorted(Path(base_dir).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return {"data_version": Path(split_dir).name, "base_sha256": digest.hexdigest(), "recipe": asdict(recipe)}


def reusable_trl(report_path: str, task: str, seed: int, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """TRL's side of ``task``/``seed`` from an earlier report when it was computed from the same
    inputs (:func:`trl_inputs`); None otherwise, and then TRL runs again. TRL's side does not
    depend on our code, so a change to ours is measured against the same TRL numbers."""
    if not report_path:
        return None
    report = json.loads(Path(report_path).read_text())
    for run in report.get("tasks", {}).get(task, {}).get("runs", []):
        if run["seed"] != seed or "eval" not in run.get("trl", {}):
            continue
        earlier = run.get("trl_inputs")
        if earlier is None and Path(run["ours"]["paths"]["base"]).is_dir():  # reports before trl_inputs
            earlier = trl_inputs(run["ours"]["paths"]["split_dir"], run["ours"]["paths"]["base"],
                                 TRLRecipe(**run["trl"]["recipe"]))
        if earlier == inputs:
            return run["trl"]
        say(f"[{task} seed {seed}] TRL: {report_path} was computed from other inputs; running TRL again")
    return None


def run_task(task: str, seed: int, args: argparse.Namespace, recipe: TRLRecipe) -> dict[str, Any]:
    root = Path(args.work_dir).resolve() / task / f"seed{seed}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tag = f"[{task} seed {seed}]"
    config_path = write_task(task, root / "data", n_pairs=args.n_pairs, seed=seed)
    if args.tiny:
        config_path = tiny_config(config_path, root / "data" / "config_tiny.yaml")
    config = yaml.safe_load(config_path.read_text())
    if args.set:
        config = apply_sets(config, args.set)
        config_path = root / "data" / "config_set.yaml"
        config_path.write_text(f"# the task's config with --set {' --set '.join(args.set)} (bench/generality.py)\n"
                               + yaml.safe_dump(config, sort_keys=False))
    settings = evaluation_settings(config)
    result: dict[str, Any] = {"task": task, "seed": seed, "n_pairs": args.n_pairs, "config": str(config_path),
                              "evaluation": settings}

    say(f"{tag} ours: rlhf run --config {config_path} (log {root / 'ours.log'})")
    ours = run_ours(config_path, root / "rlhf_home", root / "ours.log", args.threads)
    failed = [name for name, ok in (ours["checks"] or {}).items() if not ok]
    say(f"{tag} ours: {ours['status']} in {ours['wall_s']:.0f}s"
        + (f" (failed checks: {', '.join(failed)}; models and evaluation are in place)" if failed else ""))
    result["ours"] = ours

    recipe = replace(recipe, **_ppo_stage_settings(ours["paths"]["ppo_stage_config"]))
    if not settings["max_new_tokens"]:   # 0: our PPO's response_length, as evaluation_report resolves it
        settings["max_new_tokens"] = recipe.response_length
    result["trl_inputs"] = trl_inputs(ours["paths"]["split_dir"], ours["paths"]["base"], recipe)
    reused = reusable_trl(args.reuse_trl, task, seed, result["trl_inputs"])
    if reused is not None:
        say(f"{tag} TRL: reused from {args.reuse_trl} (same splits, base model and recipe)")
        result["trl"] = {**reused, "reused_from": args.reuse_trl}
        sides: tuple[str, ...] = ("ours",)
    else:
        say(f"{tag} TRL: SFT -> RM -> PPO on the same splits and base model (log {root / 'trl.log'})")
        trl = run_trl(ours["paths"]["split_dir"], ours["paths"]["base"], root / "trl", recipe,
                      root / "trl.log", args.threads)
        say(f"{tag} TRL: done in {trl['wall_s']:.0f}s "
            f"(SFT {trl['stage_s']['sft_s']:.0f}s, RM {trl['stage_s']['rm_s']:.0f}s, PPO {trl['stage_s']['ppo_s']:.0f}s)")
        result["trl"] = trl
        sides = ("ours", "trl")

    for side in sides:
        say(f"{tag} evaluating {side}: {settings['max_prompts']} test prompts x "
            f"{settings['samples_per_prompt']} samples, up to {settings['max_new_tokens']} tokens "
            f"(log {root / 'eval.log'})")
        t0 = time.perf_counter()
        with output_to(root / "eval.log"):
            result[side]["eval"] = evaluate_side(result[side]["paths"], ours["paths"]["split_dir"], task,
                                                 settings)
        result[side]["eval_s"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (NaN with one value); NaN when no value is finite."""
    vals = [float(v) for v in values if _finite(v)]
    if not vals:
        return float("nan"), float("nan")
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    return statistics.fmean(vals), se


def side_value(run: dict[str, Any], side: str, key: str) -> float:
    if key == "wall_s":
        return run[side]["wall_s"]
    return run[side]["eval"].get(key, float("nan"))


def summary_value(run: dict[str, Any], key: str) -> float:
    name = SUMMARY_KEYS.get(key)
    value = run["ours"]["summary"].get(name) if name else None
    if key == "gold_gain":
        s = run["ours"]["summary"]
        a, b = s.get("gold_reward_ppo"), s.get("gold_reward_sft")
        value = a - b if _finite(a) and _finite(b) else None
    if key == "wall_s":
        value = run["ours"]["summary"].get("elapsed_seconds")
    return float(value) if _finite(value) else float("nan")


def task_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: mean and standard error over seeds for ours, TRL, the ratio and
    ours' summary.json cross-check."""
    rows = []
    for key, label in METRICS:
        ours = [side_value(r, "ours", key) for r in runs]
        trl = [side_value(r, "trl", key) for r in runs]
        ratios = [o / t if _finite(o) and _finite(t) and t != 0 else float("nan") for o, t in zip(ours, trl)]
        row = {"metric": key, "label": label}
        for name, values in (("ours", ours), ("trl", trl), ("ratio", ratios),
                             ("ours_summary", [summary_value(r, key) for r in runs])):
            m, se = mean_se(values)
            row[name], row[f"{name}_se"], row[f"{name}_values"] = m, se, values
        rows.append(row)
    return rows


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (NaN is not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(x: float, se: float = float("nan")) -> str:
    if not _finite(x):
        return "n/a"
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 10 else f"{x:.3f}"
    return text + (f" ± {se:.3f}" if _finite(se) else "")


def render_task(name: str, block: dict[str, Any]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in block["runs"])
    lines = [f"### {name} ({block['n_pairs']} pairs; seed{'s' if len(block['runs']) > 1 else ''} {seeds}"
             + (", mean ± standard error" if len(block["runs"]) > 1 else "") + ")", "",
             "| metric | ours | TRL | ours/TRL | ours (summary.json) |", "|---|---:|---:|---:|---:|"]
    for r in block["table"]:
        lines.append(f"| {r['label']} | {_fmt(r['ours'], r['ours_se'])} | {_fmt(r['trl'], r['trl_se'])} | "
                     f"{_fmt(r['ratio'], r['ratio_se'])} | {_fmt(r['ours_summary'], r['ours_summary_se'])} |")
    status = sorted({str(r["ours"]["status"]) for r in block["runs"]})
    lines += ["", f"ours: `rlhf run` {'/'.join(status)}; TRL stage seconds (SFT / RM / PPO): "
              + "; ".join(f"{r['trl']['stage_s']['sft_s']:.0f} / {r['trl']['stage_s']['rm_s']:.0f} / "
                          f"{r['trl']['stage_s']['ppo_s']:.0f}" for r in block["runs"])]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import torch
    import trl
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "trl": trl.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(), "platform": platform.platform()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def apply_sets(config: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """``config`` (a run config) with each ``OP.FIELD=VALUE`` of ``sets`` written into
    ``ops.OP.config``; VALUE is parsed as YAML. An op the config does not have is an error, so
    a typo cannot run the defaults under another name."""
    out = json.loads(json.dumps(config))
    for item in sets:
        key, sep, raw = item.partition("=")
        op, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"--set {item!r}: expected OP.FIELD=VALUE, e.g. base_model.n_layer=4")
        if op not in out.get("ops", {}):
            raise SystemExit(f"--set {item!r}: the run config has no op {op!r}; ops: {sorted(out.get('ops', {}))}")
        body = out["ops"][op] = out["ops"][op] or {}
        if not isinstance(body.get("config"), dict):
            body["config"] = {}
        node = body["config"]
        *parents, last = field.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {item!r}: {name!r} is not a mapping in ops.{op}.config")
        value = yaml.safe_load(raw)
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        node[last] = value
    return out


def trl_recipe(args: argparse.Namespace) -> TRLRecipe:
    """TRL's budgets for this run: the smoke budgets with ``--tiny``, the issue's otherwise,
    at ``--trl-seed`` when given."""
    recipe = TINY_RECIPE if args.tiny else TRLRecipe()
    return recipe if args.trl_seed is None else replace(recipe, seed=args.trl_seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--seeds", default="0", help="comma-separated data seeds; >1 seed reports mean ± standard error")
    p.add_argument("--n-pairs", type=int, default=None, help="pairs per task (default 6000; 300 with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke run: 300 pairs, configs/tiny.yaml budgets, tiny TRL budgets")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS / torch threads for every process (0 = torch's choice)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="task data, RLHF_HOMEs, models, logs")
    p.add_argument("--out", default="", help="JSON report")
    p.add_argument("--reuse-trl", default="", metavar="REPORT",
                   help="take TRL's side from an earlier --out report where its splits, base model and "
                        "recipe are the same (TRL runs again where they are not)")
    p.add_argument("--set", action="append", default=[], metavar="OP.FIELD=VALUE",
                   help="change one setting of our run config (repeatable), e.g. base_model.n_layer=4")
    p.add_argument("--trl-seed", type=int, default=None,
                   help="training seed of TRL's three trainers (default: TRLRecipe.seed, 0); with --set "
                        "OP.seed=N on our side, a second training seed per cell")
    p.add_argument("--trl-worker", default="", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trl_worker:
        return trl_worker_main(args.trl_worker)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.n_pairs is None:
        args.n_pairs = 300 if args.tiny else 6000
    recipe = trl_recipe(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "bench/generality.py", *(argv or sys.argv[1:])]),
        "commit": git_commit(), "machine": machine_info(), "tiny": args.tiny, "n_pairs": args.n_pairs,
        "seeds": seeds, "sets": args.set, "trl_recipe": asdict(recipe), "tasks": {}, "errors": {},
    }
    rendered = []
    for task in tasks:
        runs = []
        for seed in seeds:
            try:
                runs.append(run_task(task, seed, args, recipe))
            except RuntimeError as exc:  # one failed pipeline must not cost the other tasks
                say(f"[{task} seed {seed}] FAILED: {str(exc).splitlines()[0]}")
                report["errors"][f"{task}/seed{seed}"] = str(exc)
        if not runs:
            continue
        block = {"n_pairs": args.n_pairs, "runs": runs, "table": task_rows(runs)}
        report["tasks"][task] = block
        rendered.append(render_task(task, block))
        say("\n" + rendered[-1] + "\n")
    report["markdown"] = "\n\n".join(rendered)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        # a metric that did not apply (NaN) is written as null
        Path(args.out).write_text(json.dumps(json_safe(report), indent=1, default=str, allow_nan=False))
        say(f"report: {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
