"""Callbacks: the only way metrics leave the engines (minGPT's trainer style).

Engines call every callback on every rank; a callback that logs somewhere should act on
rank 0 only (``ppo_core.strategy.is_rank_zero()``). ``ProgressPrinter`` is the default.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any


class Callback:
    """No-op base class; override what you need."""

    def on_train_begin(self, stage: str, total_steps: int, config: Mapping[str, Any]) -> None:
        pass

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Per-step training metrics (namespaced, e.g. ``objective/kl``)."""

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        """Held-out metrics (``eval/...``)."""

    def on_checkpoint(self, step: int, path: str) -> None:
        pass

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        pass


class CallbackList(Callback):
    """Fans every event out to several callbacks."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_begin(self, stage: str, total_steps: int, config: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(stage, total_steps, config)

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(step, metrics)

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(step, metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(step, path)

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(summary)


class ProgressPrinter(Callback):
    """One line every ``every`` steps on stderr: step/total, rate, ETA and a few metrics."""

    def __init__(self, every: int = 10, keys: Sequence[str] = ()) -> None:
        self.every, self.keys = every, tuple(keys)
        self.stage, self.total, self.t0 = "", 0, time.monotonic()

    def on_train_begin(self, stage: str, total_steps: int, config: Mapping[str, Any]) -> None:
        self.stage, self.total, self.t0 = stage, total_steps, time.monotonic()

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(step, 1) * max(self.total - step, 0)
        # a key also matches under a prefix (PrefixedCallbacks: ``<candidate>/train/loss``)
        keys = [k for want in self.keys for k in metrics if k == want or k.endswith("/" + want)]
        shown = " ".join(f"{k}={metrics[k]:.4g}" for k in (keys or list(metrics)[:4]))
        print(f"[{self.stage}] step {step}/{self.total} {elapsed:.0f}s eta {eta:.0f}s {shown}",
              file=sys.stderr, flush=True)


class PrefixedCallbacks(Callback):
    """Forwards one sub-run's events: metrics as ``<prefix>/<key>``, the stage as ``<stage>
    <prefix>``. Its ``on_train_end`` goes nowhere: a sub-run's summary is not the stage's (the
    reward model's candidates, ``ppo_core.reward.train_candidates``)."""

    def __init__(self, callbacks: Sequence[Callback], prefix: str) -> None:
        self.inner, self.prefix = CallbackList(callbacks), prefix

    def on_train_begin(self, stage: str, total_steps: int, config: Mapping[str, Any]) -> None:
        self.inner.on_train_begin(f"{stage} {self.prefix}", total_steps, config)

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.inner.on_log(step, {f"{self.prefix}/{k}": v for k, v in metrics.items()})

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        self.inner.on_evaluate(step, {f"{self.prefix}/{k}": v for k, v in metrics.items()})

    def on_checkpoint(self, step: int, path: str) -> None:
        self.inner.on_checkpoint(step, path)
