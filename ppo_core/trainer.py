"""The loop SFT and the reward model share (PPO has its own: rollouts, two trained models).

A stage subclasses :class:`SupervisedTrainer` and supplies its data and model (``setup``,
which ends with :meth:`SupervisedTrainer.prepare`), one optimizer step (``train_step``) and
its evaluation (``evaluate``). This class owns everything else: the DeepSpeed engine with
its optimizer, LR schedule and optional LoRA, the data position, periodic evaluation and
checkpoints, stop-and-resume, the final ``save_pretrained`` and the summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ppo_core.callbacks import Callback, CallbackList
from ppo_core.checkpoint import finish_run, load_checkpoint, resolve_resume, save_checkpoint
from ppo_core.config import to_dict
from ppo_core.data import StepSampler
from ppo_core.models import add_lora
from ppo_core.strategy import DeepSpeedStrategy


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
        self.start_step = 0
        if self.resume_path is not None:
            state = load_checkpoint(s, self.resume_path, {"model": self.engine})
            self.sampler.check_position(state["data_position"], str(self.resume_path))
            self.start_step = int(state["step"])

    def _checkpoint(self, step: int) -> None:
        path = save_checkpoint(
            self.strategy, self.out / "checkpoints", step, {"model": self.engine}, stage=self.stage,
            config=to_dict(self.cfg), data_position=self.sampler.position(step),
            keep_last=self.cfg.keep_last_checkpoints,
        )
        self.cb.on_checkpoint(step, str(path))

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        self.setup()
        self.cb.on_train_begin(self.stage, self.total_steps, to_dict(cfg))
        last, metrics = self.start_step, {}
        for step in range(self.start_step, self.total_steps):
            metrics = self.train_step(step)
            last = step + 1
            self.cb.on_log(last, metrics)
            if cfg.eval_steps and last % cfg.eval_steps == 0 and last < self.total_steps:
                self.cb.on_evaluate(last, self.evaluate())
            saved = bool(cfg.save_steps and last % cfg.save_steps == 0 and last < self.total_steps)
            if saved:
                self._checkpoint(last)
            if cfg.stop_after_steps and last == cfg.stop_after_steps and last < self.total_steps:
                if not saved:
                    self._checkpoint(last)
                return self._finish(last, metrics, {}, t0, final=False)
        eval_metrics = self.evaluate()
        self.cb.on_evaluate(last, eval_metrics)
        self.strategy.save_pretrained(self.engine, self.tokenizer, self.out / "final")
        return self._finish(last, metrics, eval_metrics, t0, final=True)

    def _finish(self, step: int, train_metrics: dict[str, float], eval_metrics: dict[str, float],
                t0: float, final: bool) -> dict[str, Any]:
        name = self.example_name
        summary: dict[str, Any] = {
            "stage": self.stage, "output_dir": str(self.out), "step": step, "total_steps": self.total_steps,
            "completed": final, "final_model_dir": str(self.out / "final") if final else "",
            f"train_{name}": len(self.train_data), f"eval_{name}": len(self.eval_data),
            "train_truncated": sum(e.truncated for e in self.train_data), "runtime_s": time.monotonic() - t0,
            **train_metrics, **eval_metrics,
        }
        return finish_run(self.strategy, self.out, summary, self.cb)
