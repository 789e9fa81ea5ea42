"""KL controllers against hand-computed updates (Ziegler et al. 2019, eq. 2)."""

from __future__ import annotations

import pytest

from ppo_core.kl_controller import AdaptiveKLController, CeilingKLController, FixedKLController, build_kl_controller


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


def test_ceiling_controller_by_hand():
    # ceiling 4 nats, horizon 128: 64 episodes move beta by at most 0.2 * 64 / 128 = 10%
    ctl = CeilingKLController(0.05, ceiling=4.0, horizon=128)
    ctl.update(2.0, 64)                      # under the ceiling: the floor holds it at 0.05
    assert ctl.value == 0.05
    for kl, expected in [(8.0, 0.055), (8.0, 0.0605), (4.4, 0.0605 * 1.05),   # error 1 -> +0.2; 0.1
                         (0.0, 0.0605 * 1.05 * 0.9), (0.0, 0.0605 * 1.05 * 0.81), (0.0, 0.05)]:
        ctl.update(kl, 64)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    other = CeilingKLController(1.0, 1.0, 1.0)
    ctl.update(8.0, 64)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon, other.floor) == (pytest.approx(0.055), 4.0, 128.0, 0.05)
    assert ctl.state_dict()["kind"] == "ceiling"


def test_builder_picks_the_ceiling_and_refuses_both():
    assert isinstance(build_kl_controller(0.05, None, 10000, ceiling=6.0), CeilingKLController)
    assert build_kl_controller(0.05, None, 10000, ceiling=6.0, ceiling_horizon=256).horizon == 256.0
    with pytest.raises(ValueError, match="not both"):
        build_kl_controller(0.05, 6.0, 10000, ceiling=6.0)


def test_kl_limits_of_a_ppo_config():
    from ppo_core.ppo import PPOConfig, kl_limits

    base = dict(policy_path="p", train_file="t", output_dir="o", reward_function="m:f")
    # the controller aims 10% under the 5-nat ceiling; the guard's budget is the ceiling
    assert kl_limits(PPOConfig(**base)) == (pytest.approx(4.5), 5.0)
    assert kl_limits(PPOConfig(**base, kl_ceiling=8.0, kl_ceiling_margin=0.25)) == (6.0, 8.0)
    assert kl_limits(PPOConfig(**base, guard_kl_budget=7.0)) == (pytest.approx(4.5), 7.0)
    assert kl_limits(PPOConfig(**base, kl_ceiling=0.0)) == (None, None)
    assert kl_limits(PPOConfig(**base, kl_coef=0.0)) == (None, None)     # no penalty to raise
    # a tracked target replaces the ceiling; an explicit guard budget still holds
    assert kl_limits(PPOConfig(**base, kl_target=3.0)) == (None, None)
    assert kl_limits(PPOConfig(**base, kl_target=3.0, guard_kl_budget=6.0)) == (None, 6.0)


def test_ceiling_headroom_widens_the_ceiling_from_the_starting_kl():
    from types import SimpleNamespace

    from ppo_core.config import ConfigError
    from ppo_core.guard import OveroptimizationGuard
    from ppo_core.ppo import PPOConfig, PPOTrainer

    base = dict(policy_path="p", train_file="t", output_dir="o", reward_function="m:f",
                guard_reward_model_path="g", eval_file="e")
    cfg = PPOConfig(**base, kl_ceiling_headroom=2.0)   # ceiling 5, aim 4.5, budget 5

    def trainer(c: PPOConfig) -> SimpleNamespace:
        return SimpleNamespace(cfg=c, kl_ctl=CeilingKLController(0.05, 4.5, 128),
                               guard=OveroptimizationGuard(5.0, patience=3))

    # a round's champion starts 4.98 nats from SFT: ceiling 6.98, aim 0.9 x 6.98, budget 6.98
    t = trainer(cfg)
    assert PPOTrainer.widen_ceiling(t, 4.98) == pytest.approx(6.98)
    assert t.kl_ctl.target == pytest.approx(6.282) and t.guard.kl_budget == pytest.approx(6.98)
    # a start from the reference itself (KL 0) keeps the configured ceiling
    t = trainer(cfg)
    assert PPOTrainer.widen_ceiling(t, 0.0) == 5.0 and t.kl_ctl.target == pytest.approx(4.5)
    # an explicit guard budget is the operator's and stays; without a headroom nothing moves
    t = trainer(PPOConfig(**base, kl_ceiling_headroom=2.0, guard_kl_budget=5.0))
    PPOTrainer.widen_ceiling(t, 4.98)
    assert t.guard.kl_budget == 5.0 and t.kl_ctl.target == pytest.approx(6.282)
    t = trainer(PPOConfig(**base))
    assert PPOTrainer.widen_ceiling(t, 4.98) is None and t.kl_ctl.target == 4.5
    # the widened budget survives a checkpoint of the guard (a resumed run keeps it)
    g = OveroptimizationGuard(6.98, patience=3)
    restored = OveroptimizationGuard(5.0, patience=3)
    restored.load_state_dict(g.state_dict())
    assert restored.kl_budget == 6.98
    # no ceiling in force (a tracked target instead): the headroom has nothing to widen
    t = trainer(PPOConfig(**base, kl_ceiling_headroom=2.0, kl_target=3.0))
    assert PPOTrainer.widen_ceiling(t, 4.98) is None and t.guard.kl_budget == 5.0
    with pytest.raises(ConfigError, match="kl_ceiling_headroom must be > 0"):
        PPOConfig(**base, kl_ceiling_headroom=0.0)
