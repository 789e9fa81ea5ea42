"""The over-optimization guard: keep the PPO checkpoint a held-out reward signal likes best.

A policy optimized against a learned reward model eventually exploits it: the proxy reward
keeps rising while the true reward peaks and falls (Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", fig. 1; the peak comes at a KL that grows with RM size and
data). The gold reward is unknown in practice, but a reward model trained on *other* pairs
makes errors of its own, so a policy that exploits the proxy's errors does not please it
(the reason reward-model ensembles resist over-optimization, Coste et al. 2023).

Every ``guard_every`` PPO steps the trainer samples the same held-out prompts with the same
random numbers and hands this module one :class:`GuardPoint`: the mean proxy score, the mean
held-out score and the KL to the reference per response, with the per-response values. Two
points are compared on their paired differences, response by response: with common random
numbers the prompt-to-prompt spread is shared and cancels, so the standard error of a
difference is that of the paired differences, not of two independent means (which
overstated it, and on the ``facts`` task kept checkpoints from the first fifth of a run whose
gold kept rising; BENCHMARKS.md). :class:`OveroptimizationGuard` then

* finds the checkpoint with the best held-out score among those within the KL budget
  (step 0, the starting policy, is the baseline every checkpoint must beat); the checkpoints
  whose score is within ``select_z`` standard errors of the difference from that best are
  its band, and ``prefer`` picks one of them:

  - ``"latest"``: the last one. The held-out model is a weak judge (it learned from a
    smaller, disjoint share of the pairs), so a score inside the band says only that PPO's
    later steps are not measurably worse; a checkpoint is given up only for a measurable
    decline, the same evidence the stop rule asks for. Replayed on 67 recorded runs of six
    tasks, it won 0.020 +- 0.006 more gold win rate than ``"least_kl"`` (0.056 +- 0.018 on
    ``facts``, whose held-out model agrees with gold about 0.7 of the time), at 0.21 +- 0.05
    nats more KL (BENCHMARKS.md, "The guard's band");
  - ``"least_kl"``: the one with the *least KL*, provided its KL is lower than the best's by
    more than ``select_z`` standard errors of the difference: the one-standard-error rule of
    model selection (Breiman et al. 1984, "Classification and Regression Trees", sec. 3.4.3;
    Hastie et al., "Elements of Statistical Learning", sec. 7.10), which reads a plateau as
    noise and buys KL with it.

  ``select_z = 0`` keeps the best-scoring one under either rule;
* stops the run once ``patience`` evaluations in a row fell clearly below the best (by more
  than ``stop_z`` standard errors of the difference, so a plateau's noise does not end a run
  that is still climbing slowly) or left the KL budget; the reason says whether the proxy
  still rose meanwhile (``overoptimization``: Gao et al.'s signature), the KL budget was
  exceeded (``kl_budget``), or neither (``decline``). With ``budget_stops=False`` (PPO under a
  KL ceiling, whose controller pulls the KL back) a point over the budget can never be kept
  but does not count towards stopping.

Pure Python, no torch: the decision rule is unit-tested on hand-made curves.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args


SelectRule = Literal["latest", "least_kl"]
SELECT_RULES: tuple[str, ...] = get_args(SelectRule)


@dataclass(frozen=True)
class GuardPoint:
    """One held-out evaluation of the policy."""

    step: int
    """PPO iterations done when it was measured (0: the starting policy, which is the KL
    reference unless PPO starts from another policy, as an RLHF round from the champion does)"""
    proxy: float
    """mean normalized score of the reward model PPO optimizes"""
    heldout: float
    """mean normalized score of the held-out reward model (the policy never trains on it)"""
    heldout_se: float
    """standard error of ``heldout`` over the evaluated responses"""
    kl: float
    """mean KL(policy || reference) per response, nats (sum over its tokens)"""
    kl_se: float = 0.0
    """standard error of ``kl`` over the evaluated responses"""
    heldout_values: tuple[float, ...] = ()
    """the held-out score of each evaluated response, in prompt order (the same order at every
    evaluation); empty when unknown, and comparisons then treat two points as independent"""
    kl_values: tuple[float, ...] = ()
    """the KL of each evaluated response, in the same order"""


def paired(a: GuardPoint, b: GuardPoint, field: str) -> bool:
    """Both points carry the same number (> 1) of per-response ``<field>_values``."""
    return len(getattr(a, f"{field}_values")) == len(getattr(b, f"{field}_values")) > 1


def without_values(p: GuardPoint) -> GuardPoint:
    """``p`` without its per-response values: compared as an independent mean from then on."""
    return replace(p, heldout_values=(), kl_values=())


def diff_se(a: GuardPoint, b: GuardPoint, field: str) -> float:
    """Standard error of ``a.<field> - b.<field>`` (``field``: ``"heldout"`` or ``"kl"``).

    Paired, from the per-response differences, when both points carry them (the same prompts
    and random numbers); else as for independent means, the root of the summed squared
    standard errors."""
    if paired(a, b, field):
        d = [u - v for u, v in zip(getattr(a, f"{field}_values"), getattr(b, f"{field}_values"))]
        return statistics.stdev(d) / math.sqrt(len(d))
    return math.hypot(getattr(a, f"{field}_se"), getattr(b, f"{field}_se"))


@dataclass(frozen=True)
class GuardDecision:
    keep: bool
    """this point may be the one kept in the end: save its weights"""
    drop: tuple[int, ...]
    """steps whose saved weights can no longer be kept (the best rose past them): delete them"""
    stop: bool
    """end the run now"""
    reason: str
    """why it stops ('' while running)"""


class OveroptimizationGuard:
    """Best-checkpoint selection and early stopping on a held-out reward signal."""

    def __init__(self, kl_budget: float | None, patience: int, min_delta: float = 0.0,
                 stop_z: float = 1.0, select_z: float = 0.0, budget_stops: bool = True,
                 prefer: SelectRule = "latest") -> None:
        if prefer not in SELECT_RULES:
            raise ValueError(f"prefer must be one of {SELECT_RULES}, got {prefer!r}")
        self.prefer = prefer
        self.kl_budget = kl_budget
        self.budget_stops = budget_stops
        self.patience = patience
        self.min_delta = min_delta
        self.stop_z = stop_z
        self.select_z = select_z
        self.points: list[GuardPoint] = []
        self.saved: set[int] = set()
        """steps whose weights were saved and not dropped: the only ones that can be kept"""
        self.best: GuardPoint | None = None
        self.bad_evals = 0
        self.reason = ""

    def within_budget(self, p: GuardPoint) -> bool:
        return self.kl_budget is None or p.kl <= self.kl_budget

    def candidate(self, p: GuardPoint) -> bool:
        """``p`` could be kept: a trained checkpoint within the KL budget that beats the reference
        and whose held-out score is within ``select_z`` standard errors of its difference from
        the best's (without per-response values: of the best's own score, Breiman's rule)."""
        if not (self.best is not None and self.best.step > 0 and p.step > 0 and self.within_budget(p)
                and p.heldout > self.points[0].heldout + self.min_delta):
            return False
        band = diff_se(p, self.best, "heldout") if paired(p, self.best, "heldout") else self.best.heldout_se
        return p.heldout >= self.best.heldout - self.select_z * band

    def update(self, p: GuardPoint) -> GuardDecision:
        """Record one evaluation; the first one is the baseline (the starting policy)."""
        self.points.append(p)
        if self.best is None:
            self.best = p
            return GuardDecision(keep=False, drop=(), stop=False, reason="")
        if self.within_budget(p) and p.heldout > self.best.heldout + self.min_delta:
            self.best, self.bad_evals = p, 0
            drop = tuple(sorted(s for s in self.saved if not self.candidate(self.point(s))))
            self.saved = (self.saved - set(drop)) | {p.step}
            return GuardDecision(keep=True, drop=drop, stop=False, reason="")
        keep = self.candidate(p)
        if keep:
            self.saved.add(p.step)
        fell = p.heldout < self.best.heldout - self.stop_z * diff_se(p, self.best, "heldout")
        # within the noise band of the best: neither a new best nor a step towards stopping
        over = self.budget_stops and not self.within_budget(p)
        self.bad_evals = self.bad_evals + 1 if fell or over else 0
        if self.patience and self.bad_evals >= self.patience:
            if over:
                self.reason = "kl_budget"
            elif p.proxy > self.best.proxy:
                self.reason = "overoptimization"
            else:
                self.reason = "decline"
            return GuardDecision(keep=keep, drop=(), stop=True, reason=self.reason)
        return GuardDecision(keep=keep, drop=(), stop=False, reason="")

    def forget_values(self) -> None:
        """Drop the per-response values of the points so far (they no longer line up with the
        next evaluations' responses): comparisons with them fall back to independent means."""
        self.points = [without_values(p) for p in self.points]
        if self.best is not None:
            self.best = self.point(self.best.step)

    def point(self, step: int) -> GuardPoint:
        return next(p for p in self.points if p.step == step)

    @property
    def kept(self) -> GuardPoint | None:
        """The checkpoint to ship, or None when no trained checkpoint beat the reference: the
        last candidate (``prefer="latest"``), or the least-KL one (the earliest on a tie) when
        its KL is measurably below the best's, else the best (``"least_kl"``)."""
        # a point that entered the band only later (a new best with a wider SE) was never saved
        cands = [p for p in self.points if p.step in self.saved and self.candidate(p)]
        if not cands or self.best is None:
            return None
        if self.prefer == "latest":
            return max(cands, key=lambda p: p.step)
        low = min(cands, key=lambda p: (p.kl, p.step))
        closer = low.kl < self.best.kl - self.select_z * diff_se(low, self.best, "kl")
        return low if closer or low.kl == self.best.kl else self.best

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
        b, base = self.kept or self.best, self.baseline
        return {
            "guard/kept_step": float(b.step), "guard/improved": float(self.improved),
            "guard/best_step": float(self.best.step), "guard/heldout_best": self.best.heldout,
            "guard/heldout_kept": b.heldout, "guard/heldout_reference": base.heldout,
            "guard/heldout_gain": b.heldout - base.heldout,
            "guard/heldout_gain_se": diff_se(b, base, "heldout"),
            "guard/proxy_kept": b.proxy, "guard/kl_kept": b.kl, "guard/evaluations": float(len(self.points)),
            **({} if self.kl_budget is None else {"guard/kl_budget": float(self.kl_budget)}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"points": [asdict(p) for p in self.points], "saved": sorted(self.saved),
                "best_step": None if self.best is None else self.best.step,
                "bad_evals": self.bad_evals, "reason": self.reason, "kl_budget": self.kl_budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points = [GuardPoint(**{**p, "heldout_values": tuple(p.get("heldout_values", ())),
                                     "kl_values": tuple(p.get("kl_values", ()))}) for p in state["points"]]
        self.best = next((p for p in self.points if p.step == state["best_step"]), None)
        # states written before candidates were tracked saved only the best
        self.saved = set(state.get("saved", [] if self.best is None or self.best.step == 0 else [self.best.step]))
        self.bad_evals, self.reason = int(state["bad_evals"]), str(state["reason"])
        self.kl_budget = state.get("kl_budget", self.kl_budget)   # a widened ceiling survives a resume
