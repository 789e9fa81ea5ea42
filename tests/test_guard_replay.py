"""bench/guard_replay.py: a recorded guard run replayed through the selection rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.guard_replay import guard_points, kept_step, load_run, main


def words(prompts: list[str], responses: list[str]) -> list[float]:
    """A gold scorer for the test: the number of words."""
    return [float(len(r.split())) for r in responses]


def write_run(path: Path) -> Path:
    # two prompts per evaluation; (response, held-out score, KL) per row
    steps = {0: [("a", 0.0, 0.0), ("a", 0.0, 0.0)],
             5: [("a b", 0.35, 1.0), ("a b", 0.55, 1.0)],       # mean 0.45, KL 1
             10: [("a", 0.6, 2.0), ("a b c", 0.4, 2.0)]}        # mean 0.50 (the best), SE 0.1, KL 2
    # paired, step 5 - step 10: held-out (-0.25, +0.15), mean -0.05, SE 0.2; KL (-1, -1), SE 0
    lines = [json.dumps({"prompt": f"p{i}", "response": r, "step": s, "proxy": float(s), "heldout": h, "kl": kl})
             for s, rows in steps.items() for i, (r, h, kl) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_points_and_kept_steps_by_hand(tmp_path: Path) -> None:
    points = guard_points(load_run(write_run(tmp_path / "guard_samples.jsonl")))
    assert [p.step for p in points] == [0, 5, 10]
    assert points[2].heldout == pytest.approx(0.5) and points[2].heldout_se == pytest.approx(0.1)
    assert points[1].kl == 1.0 and points[1].kl_se == 0.0 and points[2].proxy == 10.0
    assert kept_step(points, 0.0, patience=3, stop_z=1.0, kl_budget=None) == 10
    # 0.45 is within one SE of the paired difference (0.2) of 0.50, at a KL lower by 1 (SE 0):
    # the one-SE rule keeps it; the latest of the band is the best itself
    assert kept_step(points, 1.0, patience=3, stop_z=1.0, kl_budget=None, prefer="least_kl") == 5
    assert kept_step(points, 1.0, patience=3, stop_z=1.0, kl_budget=None) == 10
    # a 0.5-nat budget rules out every trained checkpoint: the last one is shipped, as train() does
    assert kept_step(points, 1.0, patience=0, stop_z=1.0, kl_budget=0.5) == 10


def test_main_prints_each_rule_and_the_paired_difference(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "guard_samples.jsonl")
    assert main(["--z", "0,1k,1", f"test_guard_replay:words={run}"]) == 0
    out = capsys.readouterr().out
    # z=0 keeps step 10: p0 ties (1 vs 1 word), p1 wins (3 vs 1) -> 0.75; z=1 least-KL keeps
    # step 5: both win; z=1 latest keeps step 10, the band's last
    assert "z=0: step  10 gold   2.00 win 0.750 KL  2.00" in out
    assert "z=1 least-KL: step   5 gold   2.00 win 1.000 KL  1.00" in out
    assert "z=1: step  10 gold   2.00 win 0.750 KL  2.00" in out
    assert "z=1 least-KL: win rate over the reference +0.2500" in out and "KL -1.00" in out
    assert "z=1: win rate over the reference +0.0000" in out


def test_main_replays_each_kl_budget(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "guard_samples.jsonl")
    assert main(["--z", "0", "--kl-budget", "none,1.5", f"test_guard_replay:words={run}"]) == 0
    out = capsys.readouterr().out
    # without a budget the best (step 10, KL 2) is kept; a 1.5-nat budget leaves step 5 (KL 1)
    assert "z=0: step  10 gold   2.00 win 0.750 KL  2.00" in out
    assert "z=0,kl<=1.5: step   5 gold   2.00 win 1.000 KL  1.00" in out
    assert "z=0,kl<=1.5: win rate over the reference +0.2500" in out


def test_points_over_the_budget_stop_a_replay_only_without_a_ceiling() -> None:
    from ppo_core.guard import GuardPoint
    pts = [GuardPoint(step=0, proxy=0.0, heldout=0.0, heldout_se=0.05, kl=0.0, kl_se=0.0),
           GuardPoint(step=5, proxy=1.0, heldout=0.45, heldout_se=0.05, kl=1.0, kl_se=0.1),
           GuardPoint(step=10, proxy=2.0, heldout=0.9, heldout_se=0.05, kl=3.0, kl_se=0.1),
           GuardPoint(step=15, proxy=2.5, heldout=0.9, heldout_se=0.05, kl=3.0, kl_se=0.1),
           GuardPoint(step=20, proxy=2.5, heldout=0.8, heldout_se=0.05, kl=1.5, kl_se=0.1)]
    # budget 2 nats, patience 2: steps 10 and 15 are over it. A fixed-beta run stops there and
    # ships step 5; under a KL ceiling (the engine's default) they never count, and step 20 wins
    assert kept_step(pts, 0.0, patience=2, stop_z=1.0, kl_budget=2.0, budget_stops=True) == 5
    assert kept_step(pts, 0.0, patience=2, stop_z=1.0, kl_budget=2.0) == 20


def test_references_score_the_last_step_and_the_gold_oracle(tmp_path: Path, capsys) -> None:
    run = write_run(tmp_path / "guard_samples.jsonl")
    assert main(["--z", "0", "--references", f"test_guard_replay:words={run}"]) == 0
    out = capsys.readouterr().out
    # the last step is 10 (win 0.75); the best gold win rate is step 5's (1.0)
    assert "last step: step  10 gold   2.00 win 0.750 KL  2.00" in out
    assert "best gold (oracle): step   5 gold   2.00 win 1.000 KL  1.00" in out
    assert "best gold (oracle): win rate over the reference +0.2500" in out


def test_paired_and_unpaired_rules_differ_where_the_prompts_spread_is_shared(tmp_path: Path, capsys) -> None:
    # four prompts with very different held-out scores; step 10 beats step 5 on every prompt
    base = [-2.0, -1.0, 1.0, 2.0]
    held = {0: base, 5: [x + 0.2 for x in base], 10: [x + d for x, d in zip(base, (0.4, 0.5, 0.5, 0.6))]}
    kl = {0: 0.0, 5: 1.0, 10: 2.0}
    path = tmp_path / "guard_samples.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "a " * (1 + s // 5), "step": s,
                                        "proxy": float(s), "heldout": h, "kl": kl[s]}) + "\n"
                            for s, hs in held.items() for i, h in enumerate(hs)))
    assert main(["--z", "1ku,1k", f"test_guard_replay:words={path}"]) == 0
    out = capsys.readouterr().out
    # as independent means (SE ~0.9) step 5 is in the band at half the KL; paired (SE 0.04) it is not
    assert "z=1 least-KL unpaired: step   5" in out and "z=1 least-KL: step  10" in out
    assert "z=1 least-KL: win rate over the reference +0.0000" in out  # both beat step 0's one word on every prompt


def test_rule_tokens() -> None:
    from bench.guard_replay import name, parse_z
    assert parse_z("1", 5.0) == (1.0, 5.0, True, "latest") and parse_z(" 1U ", None) == (1.0, None, False, "latest")
    assert parse_z("1k", None) == (1.0, None, True, "least_kl") == parse_z("1K", None)
    assert parse_z("2uk", None) == (2.0, None, False, "least_kl")
    assert name(*parse_z("0.5u", 4.0)) == "z=0.5 unpaired,kl<=4"
    assert name(*parse_z("0.5ku", 4.0)) == "z=0.5 least-KL unpaired,kl<=4"
    assert name(*parse_z("0k", None)) == "z=0 least-KL" and name(*parse_z("0", None)) == "z=0"
    for bad in ("inf", "nan", "-1", "1kk", "k", "1x"):
        with pytest.raises(SystemExit):
            parse_z(bad, None)
