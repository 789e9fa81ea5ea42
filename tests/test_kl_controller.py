"""KL controllers against hand-computed updates (Ziegler et al. 2019, eq. 2)."""

from __future__ import annotations

import pytest

from ppo_core.kl_controller import AdaptiveKLController, FixedKLController, build_kl_controller


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 64 / 10000)),   # error 1.0 clipped to +0.2
        (3.0, 0.1 * (1 - 0.2 * 64 / 10000)),    # error -0.5 clipped to -0.2
        (6.6, 0.1 * (1 + 0.1 * 64 / 10000)),    # error 0.1 inside the clip
        (6.0, 0.1),                              # on target: unchanged
    ],
)
def test_adaptive_update(kl: float, expected: float):
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=kl, n_steps=64)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_state_roundtrip_and_builder():
    ctl = build_kl_controller(0.2, target=1.0, horizon=100)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(5.0, 10)
    other = AdaptiveKLController(1.0, 2.0, 3.0)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon) == (ctl.value, 1.0, 100.0)
    assert isinstance(build_kl_controller(0.2, None, 100), FixedKLController)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, 0.0, 100)
