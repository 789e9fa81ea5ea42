"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2), in the shape of OpenRLHF's ``openrlhf/trainer/ppo_utils/
kl_controller.py``.

The PPO reward is ``score - beta * KL``. A fixed beta is simplest; the adaptive controller
moves beta so the measured KL tracks a target, which makes runs less sensitive to the
initial beta.
"""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller on log-space KL error (Ziegler et al. 2019, eq. 2).

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    The clip at +-0.2 and the update rule are the paper's and OpenRLHF's; ``n_steps`` is
    the number of episodes since the last update (OpenRLHF passes the rollout batch size).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController needs init_kl_coef >= 0, target > 0, horizon > 0; got "
                f"{init_kl_coef}, {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target,
                "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


KLController = FixedKLController | AdaptiveKLController


def build_kl_controller(kl_coef: float, target: float | None,
                        horizon: float) -> FixedKLController | AdaptiveKLController:
    """Adaptive when a KL ``target`` is given, fixed otherwise (OpenRLHF's rule)."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
