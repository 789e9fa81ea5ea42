"""Reward sources for PPO and their normalization.

Four kinds, one interface (:class:`RewardSource`):

* :class:`ModelReward` - a trained sequence scorer (the reward model): the score of a response
  is the scorer head's output at its last real token, as in TRL's ``get_reward`` and
  OpenRLHF's ``RewardModel``.
* :class:`ImplicitReward` - an implicit reward model, a causal LM trained with the DPO loss:
  the score of a response is beta times its log-probability ratio to the reference model.
* :class:`EnsembleReward` - several reward models, each standardised on reference-policy
  samples, averaged (the mean objective of Coste et al. 2023).
* :class:`FunctionReward` - a user function given as ``"module:function"`` with signature
  ``(prompts: list[str], responses: list[str]) -> list[float]`` (rule-based rewards, as
  OpenRLHF's ``--remote_rm_url`` and veRL's ``custom_reward_function`` allow).

:class:`RewardNormalizer` maps raw scores to mean 0, std 1 over samples of the *reference*
policy, measured once before PPO (Ziegler et al. 2019, section 2.2 normalise the reward model
"to have mean 0 and variance 1" on samples of the initial policy), so ``kl_coef`` means the
same thing whatever the scorer's scale.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ppo_core.models import last_token_scores, sequence_logprobs


class RewardSource(Protocol):
    """Scores a batch of finished episodes -> (B,) float32 tensor on CPU or the batch device.
    ``response_mask`` (B, T) bool marks each row's response tokens in ``sequences``; only
    :class:`ImplicitReward` reads it."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 sequences: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor: ...


class ModelReward:
    """A trained reward model (``AutoModelForSequenceClassification``, 1 label) scoring at the
    last real token; it must share the policy's tokenizer (``ppo.py`` checks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        model.eval()  # a DeepSpeed engine's eval() returns None, not the engine
        self.model = model

    @torch.no_grad()  # not inference_mode: see ppo_core.generation (ZeRO-3 gathering)
    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 sequences: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        # sequences are left-padded prompts + right-padded responses; the mask finds the end
        return last_token_scores(self.model, sequences, attention_mask).float()


class ImplicitReward:
    """An implicit reward model: ``beta * (log pi(y|x) - log pi_ref(y|x))`` summed over the
    response's tokens (Rafailov et al. 2023, "Direct Preference Optimization", eq. 5), ``pi``
    the causal LM ``model`` that ``ppo_core.reward`` trained with the Bradley-Terry loss on
    this score (the DPO loss) and ``pi_ref`` the model it started from. A scalar head learns
    one number at the last token from a fresh init; this score moves every response token's
    next-token distribution, which SFT has already shaped.

    Both models read the same token ids, so they must share the policy's tokenizer."""

    def __init__(self, model: torch.nn.Module, ref: torch.nn.Module, beta: float) -> None:
        model.eval()
        ref.eval()
        self.model, self.ref, self.beta = model, ref, float(beta)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 sequences: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        if response_mask is None:
            raise ValueError("an implicit reward model scores the response tokens: pass response_mask")
        ratio = (sequence_logprobs(self.model, sequences, attention_mask, response_mask)
                 - sequence_logprobs(self.ref, sequences, attention_mask, response_mask))
        return self.beta * ratio


def standardized_mean(raw: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Member scores (M, B) -> (B,): each member's row minus its mean over its std (M,), averaged."""
    return ((raw - mean[:, None]) / std[:, None]).mean(0)


class EnsembleReward:
    """Several reward models scored together: each member's score is standardised with its own
    mean and std on reference-policy samples (:meth:`fit`, before PPO starts), then averaged, so
    every member weighs the same whatever its scale (Coste et al. 2023, "Reward Model Ensembles
    Help Mitigate Overoptimization", the mean objective).

    Members trained on different data make different mistakes, and PPO drifts into the mistakes
    of the model it optimises. On ``bench/tasks/facts.py`` a reward model trained without
    mismatched negatives agreed with the gold order better (0.86 against 0.70-0.79) but missed
    answers that leave out an asked-for object, and PPO against it alone found that (gold win
    rate 0.68, or refused); with the ensemble of it and the default model PPO won +0.028 +-
    0.027 over the default alone (seven runs), and -0.061 to +0.011 on five other tasks
    (BENCHMARKS.md, "Two reward models, one objective")."""

    def __init__(self, models: Sequence[torch.nn.Module]) -> None:
        self.members = [ModelReward(m) for m in models]
        self.mean = torch.zeros(len(self.members), dtype=torch.float64)
        self.std = torch.ones(len(self.members), dtype=torch.float64)

    def member_scores(self, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw scores of every member: (M, B)."""
        return torch.stack([m([], [], sequences, attention_mask) for m in self.members])

    def fit(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Set each member's reference mean and std (M,), measured on reference-policy samples."""
        self.mean, self.std = mean.double().cpu(), std.double().cpu().clamp_min(eps)

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """(M, B) member scores -> (B,) ensemble score."""
        return standardized_mean(raw.double(), self.mean.to(raw.device), self.std.to(raw.device)).float()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 sequences: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.combine(self.member_scores(sequences, attention_mask))

    def state_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        if len(state["mean"]) != len(self.members):
            raise ValueError(f"the checkpoint's reward ensemble has {len(state['mean'])} members, "
                             f"this run {len(self.members)}")
        self.fit(torch.tensor(state["mean"]), torch.tensor(state["std"]))


def load_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """Import ``"package.module:function"``; errors say which part is wrong."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"reward function {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} "
                         f"({exc}); check the name and that it is on PYTHONPATH") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable "
                         f"{func_name!r}")
    return func


class FunctionReward:
    """A rule-based reward ``(prompts, responses) -> list[float]`` loaded from ``module:function``."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.func = load_function(spec)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 sequences: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor | None = None) -> torch.Tensor:
        values = self.func(list(prompts), list(responses))
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reward function {self.spec!r} must return a list of floats; got "
                             f"{type(values).__name__} ({exc})") from exc
        if len(values) != len(prompts):
            raise ValueError(f"reward function {self.spec!r} returned {len(values)} scores for "
                             f"{len(prompts)} responses")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward function {self.spec!r} returned non-finite scores at "
                             f"positions {bad[:10]}")
        return torch.tensor(values, dtype=torch.float32)


@dataclass
class RewardNormalizer:
    """``(score - mean) / std``, fitted on reference-policy samples (Ziegler et al. 2019)."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, scores: torch.Tensor, eps: float = 1e-6) -> RewardNormalizer:
        """From raw scores of reference samples; needs at least two."""
        if scores.numel() < 2:
            raise ValueError("reward normalization needs at least 2 reference samples; raise "
                             "reward_norm_samples")
        return cls(mean=float(scores.mean()), std=max(float(scores.std()), eps))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}
