"""The loop SFT and the reward model share (PPO has its own: rollouts, two trained models).

A stage subclasses :class:`SupervisedTrainer` and supplies its data and model (``setup``,
which ends with :meth:`SupervisedTrainer.prepare`), one optimizer step (``train_step``) and
its evaluation (``evaluate``). This class owns everything else: the DeepSpeed engine with
its optimizer, LR schedule and optional LoRA, the data position, periodic evaluation and
checkpoints, stop-and-resume, the final ``save_pretrained`` and the summary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ppo_core.callbacks import Callback, CallbackList
from ppo_core.checkpoint import finish_run, load_checkpoint, resolve_resume, save_checkpoint
from ppo_core.config import ConfigError, to_dict
from ppo_core.data import StepSampler
from ppo_core.models import add_lora
from ppo_core.strategy import DeepSpeedStrategy


@dataclass(frozen=True)
class StoppingConfig:
    """When a supervised stage stops and which weights it ships (HF Trainer's
    ``load_best_model_at_end`` + ``EarlyStoppingCallback``): the budget is a number of epochs,
    the run ends early once the eval metric stops improving, and ``final/`` holds the best
    evaluated weights, not the last."""

    patience: int = 3
    """evaluations without an improvement of at least ``min_delta`` before stopping (HF
    ``early_stopping_patience``; 3 = 1.5 epochs at two evaluations per epoch); 0 never stops early"""
    min_delta: float = 0.0
    """smallest improvement that counts, relative to the best value so far (|best| x min_delta;
    HF's ``early_stopping_threshold`` is the absolute form, default 0, as here). A loss that is
    mostly the data's own entropy falls by well under 1% per evaluation while the model still
    learns: with 1%, SFT stopped after 2.5 of 10 epochs on bench/tasks/style.py and the reward
    model trained from it agreed with the gold ordering 0.80, against 0.91 from 10 epochs"""
    metric: str = "eval/loss"
    """evaluation metric that selects the kept weights (HF ``metric_for_best_model`` default: the
    eval loss; for the reward model a smoother signal than accuracy on noisy labels)"""
    greater_is_better: bool = False
    """True when a larger ``metric`` is better (e.g. ``eval/accuracy``)"""
    evals_per_epoch: int = 2
    """evaluations per epoch when ``eval_steps`` is 0 (two give early stopping half-epoch
    resolution at the cost of two passes over the eval split per epoch)"""
    max_seconds: float = 0.0
    """wall-clock budget of the training loop in seconds (0: none); on expiry the run evaluates,
    ships its weights (the best evaluated or the last, per ``keep_best``) and ends as if early-stopped"""
    keep_best: bool = True
    """ship the best evaluated weights in ``final/`` (False: the last step's weights)"""

    def __post_init__(self) -> None:
        if self.patience < 0 or self.evals_per_epoch < 1 or self.max_seconds < 0:
            raise ConfigError(f"stopping: patience >= 0, evals_per_epoch >= 1 and max_seconds >= 0 "
                              f"required, got {self.patience}, {self.evals_per_epoch}, {self.max_seconds}")


class BestTracker:
    """The best value of one metric so far and how many evaluations since it improved."""

    def __init__(self, cfg: StoppingConfig) -> None:
        self.cfg = cfg
        self.best = -math.inf if cfg.greater_is_better else math.inf
        self.best_step = -1
        self.bad_evals = 0
        self.best_metrics: dict[str, float] = {}
        """every evaluation metric at the best step (what the kept weights scored)"""

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record one evaluation; True when it is the new best."""
        if self.cfg.metric not in metrics:
            raise KeyError(f"stopping.metric {self.cfg.metric!r} is not an evaluation metric; "
                           f"choose one of {sorted(metrics)}")
        value = float(metrics[self.cfg.metric])
        gain = value - self.best if self.cfg.greater_is_better else self.best - value
        if self.best_step < 0 or gain > self.cfg.min_delta * abs(self.best):
            self.best, self.best_step, self.bad_evals = value, step, 0
            self.best_metrics = {k: float(v) for k, v in metrics.items()}
            return True
        self.bad_evals += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "best_metrics": self.best_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])
        self.best_metrics = dict(state.get("best_metrics", {}))


class SupervisedTrainer:
    """One supervised stage: ``train()`` is the public entry point."""

    stage = ""
    """the stage name in checkpoints, callbacks and the summary"""
    lora_task = ""
    """PEFT task type of the trained model (``CAUSAL_LM`` or ``SEQ_CLS``)"""
    example_name = "examples"
    """what one training row is, in the summary's counts (``train_<name>``, ``eval_<name>``)"""

    def __init__(self, cfg: Any, callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        self.cb = CallbackList(callbacks)
        self.out = Path(cfg.output_dir)
        self.strategy = DeepSpeedStrategy(cfg.strategy)
        # Fail on an impossible batch split before touching data or models.
        self.grad_accum = self.strategy.gradient_accumulation_steps(cfg.batch_size, cfg.micro_batch_size)
        self.resume_path = resolve_resume(cfg.resume_from, self.out / "checkpoints")
        self.train_data: list[Any] = []
        self.eval_data: list[Any] = []
        # counts a stage adds to its summary (how many rows it synthesised, for example)
        self.data_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ stage hooks

    def setup(self) -> None:
        """Load data and model, set ``tokenizer``, ``train_data``, ``eval_data``, then
        call :meth:`prepare` with the model."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch of ``step``; its metrics."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics on the eval split (all ranks)."""
        raise NotImplementedError

    def saved_files(self) -> dict[str, str]:
        """Extra files (name -> text) saved beside the weights in ``best/`` and ``final/``."""
        return {}

    # ------------------------------------------------------------------ shared

    def prepare(self, model: nn.Module) -> None:
        """LoRA (if asked), the step sampler, AdamW + LR schedule, the DeepSpeed engine, and
        the state of ``resume_path`` when resuming."""
        cfg, s = self.cfg, self.strategy
        if cfg.lora_rank > 0:
            model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                             task_type=self.lora_task)
        self.sampler = StepSampler(len(self.train_data), cfg.batch_size, cfg.strategy.seed)
        self.total_steps = cfg.max_steps or max(1, int(cfg.num_epochs * self.sampler.steps_per_epoch))
        optimizer = s.create_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.adam_betas)
        scheduler = s.create_scheduler(optimizer, cfg.lr_scheduler, self.total_steps, warmup_ratio=cfg.warmup_ratio)
        self.engine = s.prepare_train(model, optimizer, scheduler, train_batch_size=cfg.batch_size,
                                      micro_batch_size=cfg.micro_batch_size)
        # eval_steps 0: evaluate evals_per_epoch times per epoch (early stopping's resolution)
        self.eval_every = cfg.eval_steps or max(1, self.sampler.steps_per_epoch // cfg.stopping.evals_per_epoch)
        self.tracker = BestTracker(cfg.stopping)
        self.start_step = 0
        if self.resume_path is not None:
            state = load_checkpoint(s, self.resume_path, {"model": self.engine})
            self.sampler.check_position(state["data_position"], str(self.resume_path))
            self.start_step = int(state["step"])
            if (state.get("extra") or {}).get("best") is not None:
                self.tracker.load_state_dict(state["extra"]["best"])

    def _checkpoint(self, step: int) -> None:
        path = save_checkpoint(
            self.strategy, self.out / "checkpoints", step, {"model": self.engine}, stage=self.stage,
            config=to_dict(self.cfg), data_position=self.sampler.position(step),
            extra={"best": self.tracker.state_dict()}, keep_last=self.cfg.keep_last_checkpoints or None,
        )
        self.cb.on_checkpoint(step, str(path))

    @property
    def best_dir(self) -> Path:
        return self.out / "best"

    def _evaluate_and_track(self, step: int) -> dict[str, float]:
        """Evaluate, report, and save the weights when they are the best so far (all ranks)."""
        metrics = self.evaluate()
        self.cb.on_evaluate(step, metrics)
        if self.tracker.update(step, metrics) and self.cfg.stopping.keep_best:
            self.strategy.save_pretrained(self.engine, self.tokenizer, self.best_dir, self.saved_files())
        return metrics

    def _out_of_time(self, t0: float) -> bool:
        """The wall-clock budget is spent (rank 0 decides, so every rank stops at the same step)."""
        limit = self.cfg.stopping.max_seconds
        if not limit:
            return False
        return bool(self.strategy.broadcast_object(time.monotonic() - t0 >= limit))

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        self.setup()
        self.cb.on_train_begin(self.stage, self.total_steps, to_dict(cfg))
        last, metrics, eval_metrics, reason = self.start_step, {}, {}, "completed"
        for step in range(self.start_step, self.total_steps):
            metrics = self.train_step(step)
            last = step + 1
            self.cb.on_log(last, metrics)
            if last % self.eval_every == 0 and last < self.total_steps:
                eval_metrics = self._evaluate_and_track(last)
                if self.tracker.exhausted:
                    reason = "early_stopping"
                    break
            saved = bool(cfg.save_steps and last % cfg.save_steps == 0 and last < self.total_steps)
            if saved:
                self._checkpoint(last)
            if cfg.stop_after_steps and last == cfg.stop_after_steps and last < self.total_steps:
                if not saved:
                    self._checkpoint(last)
                return self._finish(last, metrics, {}, t0, final=False, reason="stop_after_steps")
            if self._out_of_time(t0):
                reason = "time_budget"
                break
        if reason != "early_stopping":  # the last step's weights are a candidate too
            eval_metrics = self._evaluate_and_track(last)
        kept = self.tracker.best_step if cfg.stopping.keep_best else last
        # rank 0's answer for all: its move_dir can rename best/ before another rank looks, which
        # would send that rank alone into save_pretrained's ZeRO-3 gather (a hang)
        has_best = bool(self.strategy.broadcast_object(cfg.stopping.keep_best and self.best_dir.is_dir()))
        if has_best:
            # best/ holds the kept evaluation's weights (the last step's too when it was the best)
            self.strategy.move_dir(self.best_dir, self.out / "final")
        else:
            self.strategy.save_pretrained(self.engine, self.tokenizer, self.out / "final", self.saved_files())
        # the summary's eval/* describe the shipped weights; the last evaluation keeps a prefix
        shipped = self.tracker.best_metrics if kept != last else eval_metrics
        report = {**{f"last_{k}": v for k, v in eval_metrics.items()}, **shipped,
                  "best_metric": self.tracker.best, "best_step": kept, "best_metric_name": cfg.stopping.metric}
        return self._finish(last, metrics, report, t0, final=True, reason=reason)

    def _finish(self, step: int, train_metrics: dict[str, float], eval_metrics: dict[str, Any],
                t0: float, final: bool, reason: str) -> dict[str, Any]:
        name = self.example_name
        summary: dict[str, Any] = {
            "stage": self.stage, "output_dir": str(self.out), "step": step, "total_steps": self.total_steps,
            "completed": final, "final_model_dir": str(self.out / "final") if final else "",
            "stopped_reason": reason, "epochs": step / self.sampler.steps_per_epoch,
            **({"resumed_from_step": self.start_step} if self.resume_path is not None else {}),
            f"train_{name}": len(self.train_data), f"eval_{name}": len(self.eval_data),
            "train_truncated": sum(e.truncated for e in self.train_data), **self.data_counts,
            "runtime_s": time.monotonic() - t0,
            **train_metrics, **eval_metrics,
        }
        return finish_run(self.strategy, self.out, summary, self.cb)
