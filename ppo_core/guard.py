"""The over-optimization guard: keep the PPO checkpoint a held-out reward signal likes best.

A policy optimized against a learned reward model eventually exploits it: the proxy reward
keeps rising while the true reward peaks and falls (Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", fig. 1; the peak comes at a KL that grows with RM size and
data). The gold reward is unknown in practice, but a reward model trained on *other* pairs
makes errors of its own, so a policy that exploits the proxy's errors does not please it
(the reason reward-model ensembles resist over-optimization, Coste et al. 2023).

Every ``guard_every`` PPO steps the trainer samples the same held-out prompts with the same
random numbers and hands this module one :class:`GuardPoint`: the mean proxy score, the mean
held-out score and the KL to the reference per response. :class:`OveroptimizationGuard` then

* keeps the checkpoint with the best held-out score among those within the KL budget
  (step 0, the reference itself, is the baseline every checkpoint must beat);
* stops the run once ``patience`` evaluations in a row fell clearly below the best (by more
  than ``stop_z`` standard errors of the difference, so a plateau's noise does not end a run
  that is still climbing slowly) or left the KL budget; the reason says whether the proxy
  still rose meanwhile (``overoptimization``: Gao et al.'s signature), the KL budget was
  exceeded (``kl_budget``), or neither (``decline``).

Pure Python, no torch: the decision rule is unit-tested on hand-made curves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GuardPoint:
    """One held-out evaluation of the policy."""

    step: int
    """PPO iterations done when it was measured (0: the reference policy)"""
    proxy: float
    """mean normalized score of the reward model PPO optimizes"""
    heldout: float
    """mean normalized score of the held-out reward model (the policy never trains on it)"""
    heldout_se: float
    """standard error of ``heldout`` over the evaluated responses"""
    kl: float
    """mean KL(policy || reference) per response, nats (sum over its tokens)"""


@dataclass(frozen=True)
class GuardDecision:
    keep: bool
    """this point is the new best: save its weights"""
    stop: bool
    """end the run now"""
    reason: str
    """why it stops ('' while running)"""


class OveroptimizationGuard:
    """Best-checkpoint selection and early stopping on a held-out reward signal."""

    def __init__(self, kl_budget: float | None, patience: int, min_delta: float = 0.0,
                 stop_z: float = 1.0) -> None:
        self.kl_budget = kl_budget
        self.patience = patience
        self.min_delta = min_delta
        self.stop_z = stop_z
        self.points: list[GuardPoint] = []
        self.best: GuardPoint | None = None
        self.bad_evals = 0
        self.reason = ""

    def within_budget(self, p: GuardPoint) -> bool:
        return self.kl_budget is None or p.kl <= self.kl_budget

    def update(self, p: GuardPoint) -> GuardDecision:
        """Record one evaluation; the first one is the baseline (the reference policy)."""
        self.points.append(p)
        if self.best is None:
            self.best = p
            return GuardDecision(keep=False, stop=False, reason="")
        if self.within_budget(p) and p.heldout > self.best.heldout + self.min_delta:
            self.best, self.bad_evals = p, 0
            return GuardDecision(keep=True, stop=False, reason="")
        fell = p.heldout < self.best.heldout - self.stop_z * math.hypot(p.heldout_se, self.best.heldout_se)
        # within the noise band of the best: neither a new best nor a step towards stopping
        self.bad_evals = self.bad_evals + 1 if fell or not self.within_budget(p) else 0
        if self.patience and self.bad_evals >= self.patience:
            if not self.within_budget(p):
                self.reason = "kl_budget"
            elif p.proxy > self.best.proxy:
                self.reason = "overoptimization"
            else:
                self.reason = "decline"
            return GuardDecision(keep=False, stop=True, reason=self.reason)
        return GuardDecision(keep=False, stop=False, reason="")

    @property
    def baseline(self) -> GuardPoint | None:
        return self.points[0] if self.points else None

    @property
    def improved(self) -> bool:
        """A checkpoint beat the reference on the held-out signal."""
        return self.best is not None and self.best.step > 0

    def summary(self) -> dict[str, float]:
        """Flat metrics for the run summary (``guard/...``)."""
        if self.best is None or self.baseline is None:
            return {}
        b, base = self.best, self.baseline
        return {
            "guard/kept_step": float(b.step), "guard/improved": float(self.improved),
            "guard/heldout_kept": b.heldout, "guard/heldout_reference": base.heldout,
            "guard/heldout_gain": b.heldout - base.heldout,
            "guard/heldout_gain_se": math.hypot(b.heldout_se, base.heldout_se),
            "guard/proxy_kept": b.proxy, "guard/kl_kept": b.kl, "guard/evaluations": float(len(self.points)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"points": [asdict(p) for p in self.points],
                "best_step": None if self.best is None else self.best.step,
                "bad_evals": self.bad_evals, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [GuardPoint(**p) for p in state["points"]]
        self.best = next((p for p in self.points if p.step == state["best_step"]), None)
        self.bad_evals, self.reason = int(state["bad_evals"]), str(state["reason"])
