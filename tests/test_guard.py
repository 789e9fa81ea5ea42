"""The over-optimization guard's decision rule (ppo_core.guard) on hand-made curves."""

from __future__ import annotations

import json
import math

import pytest

from ppo_core.guard import GuardPoint, OveroptimizationGuard


def pt(step: int, proxy: float, heldout: float, kl: float, se: float = 0.1) -> GuardPoint:
    return GuardPoint(step=step, proxy=proxy, heldout=heldout, heldout_se=se, kl=kl)


def run(guard: OveroptimizationGuard, points: list[GuardPoint]) -> list[tuple[bool, bool, str]]:
    return [(d.keep, d.stop, d.reason) for d in map(guard.update, points)]


def test_keeps_the_peak_and_stops_when_heldout_falls_while_proxy_rises() -> None:
    # Gao et al.'s picture: proxy climbs all along, held-out peaks at step 10 then falls
    g = OveroptimizationGuard(kl_budget=None, patience=2)
    out = run(g, [pt(0, 0.0, 0.0, 0.0), pt(5, 0.5, 0.3, 1.0), pt(10, 1.0, 0.6, 2.0),
                  pt(15, 1.5, 0.4, 3.0), pt(20, 2.0, 0.1, 4.0)])
    assert out == [(False, False, ""), (True, False, ""), (True, False, ""),
                   (False, False, ""), (False, True, "overoptimization")]
    assert g.best is not None and g.best.step == 10 and g.improved
    s = g.summary()
    assert s["guard/kept_step"] == 10.0
    assert s["guard/heldout_gain"] == pytest.approx(0.6)
    assert s["guard/heldout_gain_se"] == pytest.approx(math.hypot(0.1, 0.1))
    assert s["guard/kl_kept"] == 2.0 and s["guard/evaluations"] == 5.0


def test_kl_budget_excludes_points_and_names_the_reason() -> None:
    # the best held-out score (step 10) is over the 1.5-nat budget: step 5 is kept instead
    g = OveroptimizationGuard(kl_budget=1.5, patience=2)
    out = run(g, [pt(0, 0.0, 0.0, 0.0), pt(5, 0.4, 0.2, 1.0), pt(10, 0.8, 0.9, 2.0), pt(15, 1.0, 1.0, 2.5)])
    assert out[-1] == (False, True, "kl_budget")
    assert g.best is not None and g.best.step == 5


def test_under_a_kl_ceiling_a_point_over_the_budget_waits_instead_of_stopping() -> None:
    # step 10 overshoots the 1-nat budget; the controller pulls the KL back and step 15, in
    # budget, beats step 5. Counting the overshoot (budget_stops, the default) ends the run at
    # step 10 with patience 1 instead.
    points = [pt(0, 0.0, 0.0, 0.0), pt(5, 0.4, 0.5, 0.5), pt(10, 0.9, 0.9, 3.0), pt(15, 0.8, 0.7, 0.8)]
    waiting = OveroptimizationGuard(kl_budget=1.0, patience=1, budget_stops=False)
    assert run(waiting, points) == [(False, False, ""), (True, False, ""), (False, False, ""), (True, False, "")]
    assert waiting.kept is not None and waiting.kept.step == 15
    stopping = OveroptimizationGuard(kl_budget=1.0, patience=1)
    assert run(stopping, points[:3])[-1] == (False, True, "kl_budget")


def test_never_beating_the_reference_is_not_an_improvement() -> None:
    g = OveroptimizationGuard(kl_budget=None, patience=3)
    out = run(g, [pt(0, 0.0, 0.0, 0.0), pt(5, 0.2, -0.5, 1.0), pt(10, 0.1, -0.3, 1.5), pt(15, -0.1, -0.4, 1.6)])
    # each point is more than 1 SE of the difference (hypot(0.1, 0.1) = 0.14) below the
    # baseline; the proxy at step 15 (-0.1) is below the baseline's (0.0): a decline, not
    # over-optimization
    assert out[-1] == (False, True, "decline")
    assert g.best is not None and g.best.step == 0 and not g.improved
    assert g.summary()["guard/improved"] == 0.0


def test_noise_band_neither_improves_nor_stops() -> None:
    # after the peak (0.5) the held-out score wobbles within 1 SE (0.14): the run goes on;
    # one clear fall (0.2) is forgiven by the next point back in the band
    g = OveroptimizationGuard(kl_budget=None, patience=2)
    out = run(g, [pt(0, 0, 0.0, 0), pt(5, 1, 0.5, 1), pt(10, 2, 0.4, 2), pt(15, 3, 0.2, 3),
                  pt(20, 4, 0.45, 4), pt(25, 5, 0.2, 5), pt(30, 6, 0.1, 6)])
    assert [stop for _, stop, _ in out] == [False] * 6 + [True]
    assert out[-1][2] == "overoptimization" and g.best is not None and g.best.step == 5


def test_min_delta_and_patience_zero() -> None:
    g = OveroptimizationGuard(kl_budget=None, patience=0, min_delta=0.05)
    out = run(g, [pt(0, 0, 0.0, 0), pt(5, 1, 0.04, 1), pt(10, 2, 0.10, 2)] + [pt(15 + i, 3, -1.0, 3) for i in range(5)])
    assert [k for k, _, _ in out] == [False, False, True] + [False] * 5   # +0.04 is below min_delta
    assert not any(stop for _, stop, _ in out)                          # patience 0 never stops


def test_state_round_trip_resumes_the_same_decisions() -> None:
    points = [pt(0, 0, 0, 0), pt(5, 1, 0.5, 1), pt(10, 2, 0.3, 2)]
    g = OveroptimizationGuard(kl_budget=None, patience=2)
    run(g, points)
    h = OveroptimizationGuard(kl_budget=None, patience=2)
    h.load_state_dict(g.state_dict())
    assert h.best == g.best and h.bad_evals == 1
    assert h.update(pt(15, 3, 0.2, 3)).stop and g.update(pt(15, 3, 0.2, 3)).stop


def test_one_se_rule_keeps_the_least_kl_checkpoint_near_the_best() -> None:
    # plateau: 0.45 (KL 1), 0.50 (KL 2, the best), 0.48 (KL 3). With SE 0.1 and select_z 1
    # the band is >= 0.40: all three qualify, step 5 has the least KL
    pts = [pt(0, 0, 0.0, 0.0), pt(5, 1, 0.45, 1.0), pt(10, 2, 0.50, 2.0), pt(15, 3, 0.48, 3.0)]
    g = OveroptimizationGuard(kl_budget=None, patience=2, select_z=1.0, prefer="least_kl")
    decisions = [g.update(p) for p in pts]
    assert [d.keep for d in decisions] == [False, True, True, True]   # every candidate is saved
    assert all(d.drop == () for d in decisions)
    assert g.best is not None and g.best.step == 10
    assert g.kept is not None and g.kept.step == 5
    s = g.summary()
    assert s["guard/kept_step"] == 5.0 and s["guard/best_step"] == 10.0
    assert s["guard/heldout_gain"] == pytest.approx(0.45) and s["guard/kl_kept"] == 1.0
    # select_z = 0 is the plain best-score rule: step 15 (0.48 < 0.50) is not saved
    h = OveroptimizationGuard(kl_budget=None, patience=2, select_z=0.0)
    assert [h.update(p).keep for p in pts] == [False, True, True, False]
    assert h.kept is not None and h.kept.step == 10


def test_a_checkpoint_not_measurably_closer_to_the_reference_does_not_replace_the_best() -> None:
    # step 5 is within one SE of the best (0.45 vs 0.50) but its KL (1.9 +- 0.1) is not lower
    # than the best's (2.0 +- 0.1) by more than one SE of the difference (0.14): step 10 is kept.
    # At KL 1.8 it is (0.2 > 0.14), and step 5 is kept.
    def kept(kl5: float) -> int:
        g = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
        for p in [GuardPoint(0, 0, 0.0, 0.1, 0.0, 0.0), GuardPoint(5, 1, 0.45, 0.1, kl5, 0.1),
                  GuardPoint(10, 2, 0.50, 0.1, 2.0, 0.1)]:
            g.update(p)
        assert g.kept is not None
        return g.kept.step
    assert kept(1.9) == 10 and kept(1.8) == 5


def test_a_higher_best_drops_checkpoints_that_left_the_band() -> None:
    # step 5 (0.2) is a candidate until step 10 scores 0.6: the band becomes >= 0.5, so the
    # step-5 weights are dropped; step 15 (0.55, KL 1.5) is then kept over step 10 (KL 2)
    g = OveroptimizationGuard(kl_budget=None, patience=2, select_z=1.0, prefer="least_kl")
    d = [g.update(p) for p in [pt(0, 0, 0.0, 0.0), pt(5, 1, 0.2, 1.0), pt(10, 2, 0.6, 2.0), pt(15, 3, 0.55, 1.5)]]
    assert [(x.keep, x.drop) for x in d] == [(False, ()), (True, ()), (True, (5,)), (True, ())]
    assert g.kept is not None and g.kept.step == 15


def test_one_se_rule_respects_the_kl_budget_and_never_keeps_the_reference() -> None:
    # step 5 is within the band but over the 1.5-nat budget; the reference (step 0) is within
    # one SE of the best (0.05 >= 0.08 - 0.1) but is never a candidate
    g = OveroptimizationGuard(kl_budget=1.5, patience=0, select_z=1.0, prefer="least_kl")
    for p in [pt(0, 0, 0.05, 0.0), pt(5, 1, 0.07, 2.0), pt(10, 2, 0.08, 1.2)]:
        g.update(p)
    assert g.kept is not None and g.kept.step == 10
    # after the best (step 5: 0.08, KL 1.2), step 10 (0.02, KL 0.5) is within one SE of it but
    # below the reference (0.05): it is neither saved nor kept, so the kept checkpoint always
    # beats the reference on the held-out score
    r = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
    decisions = [r.update(p) for p in [pt(0, 0, 0.05, 0.0), pt(5, 1, 0.08, 1.2), pt(10, 2, 0.02, 0.5)]]
    assert [d.keep for d in decisions] == [False, True, False]
    assert r.kept is not None and r.kept.step == 5
    # no trained checkpoint beat the reference: nothing is kept
    n = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
    for p in [pt(0, 0, 0.3, 0.0), pt(5, 1, 0.25, 1.0)]:
        n.update(p)
    assert n.kept is None and not n.improved


def test_a_point_that_enters_the_band_later_was_never_saved_and_is_not_kept() -> None:
    # best 0.50 +- 0.05: step 10 (0.44, KL 0.5) is outside the band (>= 0.45) and not saved.
    # The next best, 0.51 +- 0.10, widens the band to >= 0.41: step 10 would qualify, but its
    # weights are gone, so the kept one is chosen among the saved steps (5 and 15)
    g = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
    decisions = [g.update(p) for p in [GuardPoint(0, 0, 0.0, 0.05, 0.0), GuardPoint(5, 1, 0.50, 0.05, 1.0),
                                       GuardPoint(10, 2, 0.44, 0.05, 0.5), GuardPoint(15, 3, 0.51, 0.10, 2.0)]]
    assert [d.keep for d in decisions] == [False, True, False, True]
    assert g.saved == {5, 15}
    assert g.kept is not None and g.kept.step == 5
    # the saved set survives a resume
    h = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
    h.load_state_dict(g.state_dict())
    assert h.saved == {5, 15} and h.kept is not None and h.kept.step == 5


def paired_pt(step: int, heldout: list[float], kl: list[float]) -> GuardPoint:
    """A point with per-response values; its means and independent SEs computed from them."""
    n = len(heldout)

    def mean_se(x: list[float]) -> tuple[float, float]:
        m = sum(x) / n
        return m, math.sqrt(sum((u - m) ** 2 for u in x) / (n - 1) / n)
    (h, hse), (k, kse) = mean_se(heldout), mean_se(kl)
    return GuardPoint(step=step, proxy=float(step), heldout=h, heldout_se=hse, kl=k, kl_se=kse,
                      heldout_values=tuple(heldout), kl_values=tuple(kl))


def test_diff_se_is_paired_when_both_points_carry_values() -> None:
    from ppo_core.guard import diff_se
    a = paired_pt(5, [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    b = paired_pt(10, [1.5, 2.5, 3.5, 4.0], [2.0, 2.0, 2.0, 2.0])
    # differences a - b: (-0.5, -0.5, -0.5, 0.0), mean -0.375, sd 0.25, SE 0.125
    assert diff_se(a, b, "heldout") == pytest.approx(0.125)
    assert diff_se(a, b, "kl") == 0.0
    # one side without values: as independent means, sqrt(se_a^2 + se_b^2)
    bare = GuardPoint(10, 10.0, b.heldout, b.heldout_se, b.kl, b.kl_se)
    assert diff_se(a, bare, "heldout") == pytest.approx(math.hypot(a.heldout_se, b.heldout_se))


def test_paired_differences_keep_a_later_checkpoint_the_prompts_spread_hid() -> None:
    # four prompts whose held-out scores differ by a lot (the spread every evaluation shares);
    # step 10 is better than step 5 on every prompt by 0.3 +- 0.1
    base = [-2.0, -1.0, 1.0, 2.0]
    s5 = [x + 0.2 for x in base]
    s10 = [x + d for x, d in zip(base, (0.4, 0.5, 0.5, 0.6))]
    points = [paired_pt(0, base, [0.0] * 4), paired_pt(5, s5, [1.0] * 4), paired_pt(10, s10, [2.0] * 4)]
    # as independent means the SE is ~0.9: step 5 sits in the band and, at less KL, is kept
    g = OveroptimizationGuard(kl_budget=None, patience=3, select_z=1.0, prefer="least_kl")
    for p in [GuardPoint(p.step, p.proxy, p.heldout, p.heldout_se, p.kl, p.kl_se) for p in points]:
        g.update(p)
    assert g.kept is not None and g.kept.step == 5
    # paired, step 5 trails by 0.3 with an SE of 0.041: clearly worse, the best (step 10) is kept
    g = OveroptimizationGuard(kl_budget=None, patience=3, select_z=1.0, prefer="least_kl")
    for p in points:
        g.update(p)
    assert g.kept is not None and g.kept.step == 10
    assert g.summary()["guard/heldout_gain_se"] == pytest.approx(0.0408248, rel=1e-5)
    # the values survive a checkpoint round trip (JSON-like state), so a resumed run decides alike
    h = OveroptimizationGuard(kl_budget=None, patience=3, select_z=1.0, prefer="least_kl")
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.points == g.points and h.kept == g.kept


def test_latest_keeps_the_last_checkpoint_the_held_out_score_does_not_measurably_reject() -> None:
    # the plateau of the one-SE test: 0.45 (KL 1), 0.50 (the best, KL 2), 0.48 (KL 3), SE 0.1,
    # so the band is >= 0.50 - hypot(0.1, 0.1) = 0.359. All three are in it: "latest" keeps
    # step 15 where "least_kl" keeps step 5. Step 20 (0.30) falls out of the band: it is
    # neither saved nor kept, and step 15 stays the kept one
    pts = [pt(0, 0, 0.0, 0.0), pt(5, 1, 0.45, 1.0), pt(10, 2, 0.50, 2.0), pt(15, 3, 0.48, 3.0),
           pt(20, 4, 0.30, 4.0)]
    g = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0)
    assert g.prefer == "latest"   # the default
    assert [g.update(p).keep for p in pts] == [False, True, True, True, False]
    assert g.best is not None and g.best.step == 10
    assert g.kept is not None and g.kept.step == 15
    s = g.summary()
    assert (s["guard/kept_step"], s["guard/best_step"], s["guard/kl_kept"]) == (15.0, 10.0, 3.0)
    assert s["guard/heldout_gain"] == pytest.approx(0.48)
    least = OveroptimizationGuard(kl_budget=None, patience=0, select_z=1.0, prefer="least_kl")
    for p in pts:
        least.update(p)
    assert least.kept is not None and least.kept.step == 5
    # the band and the budget bound "latest" too: step 15 over a 2.5-nat budget is not kept
    b = OveroptimizationGuard(kl_budget=2.5, patience=0, select_z=1.0)
    for p in pts:
        b.update(p)
    assert b.kept is not None and b.kept.step == 10
    # select_z 0: the band is the best alone, whatever the rule
    z0 = OveroptimizationGuard(kl_budget=None, patience=0, select_z=0.0)
    for p in pts:
        z0.update(p)
    assert z0.kept is not None and z0.kept.step == 10
    with pytest.raises(ValueError, match="prefer must be one of"):
        OveroptimizationGuard(kl_budget=None, patience=0, prefer="newest")  # type: ignore[arg-type]
