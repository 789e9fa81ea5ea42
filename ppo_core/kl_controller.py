"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2), in the shape of OpenRLHF's ``openrlhf/trainer/ppo_utils/
kl_controller.py``.

The PPO reward is ``score - beta * KL``. A fixed beta is simplest; the adaptive controller
moves beta so the measured KL tracks a target, which makes runs less sensitive to the
initial beta. The ceiling controller is the adaptive rule with the initial beta as a floor:
a run whose KL stays under the ceiling is the fixed-beta run, step for step, and one that
passes it is pulled back.
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


class CeilingKLController(AdaptiveKLController):
    """The adaptive rule towards ``ceiling``, never below the initial coefficient.

    Under the ceiling beta stays at ``init_kl_coef``; above it beta grows by up to
    ``0.2 * n_steps / horizon`` per update and shrinks back towards ``init_kl_coef`` once the
    KL is under the ceiling again.
    """

    def __init__(self, init_kl_coef: float, ceiling: float, horizon: float) -> None:
        super().__init__(init_kl_coef, ceiling, horizon)
        self.floor = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        super().update(current_kl, n_steps)
        self.value = max(self.value, self.floor)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kind": "ceiling", "floor": self.floor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.floor = float(state.get("floor", self.floor))


KLController = FixedKLController | AdaptiveKLController | CeilingKLController


def build_kl_controller(kl_coef: float, target: float | None, horizon: float, ceiling: float | None = None,
                        ceiling_horizon: float = 128) -> KLController:
    """Adaptive when a KL ``target`` is given (OpenRLHF's rule), a ceiling controller when a
    ``ceiling`` is, fixed otherwise."""
    if target is not None and ceiling is not None:
        raise ValueError("set kl_target or kl_ceiling, not both")
    if ceiling is not None:
        return CeilingKLController(kl_coef, ceiling, ceiling_horizon)
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
