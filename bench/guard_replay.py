"""Replay recorded PPO runs through the guard's selection rules (BENCHMARKS.md, guard).

A guarded PPO run writes ``guard_samples.jsonl``: at every guard evaluation, the same held-out
prompts sampled with the same random numbers, with each response's proxy score, held-out
score and KL. The stop rule does not depend on which checkpoint is *kept*, so every selection
rule can be replayed on one recorded run: this script feeds the recorded points to
``ppo_core.guard.OveroptimizationGuard`` at each ``select_z`` (and band rule, ``prefer``) and
scores the checkpoint each rule keeps (each ``select_z`` under each KL budget) with the task's
gold scorer: mean gold, and the win rate over the reference's sample for the same prompt
(step 0 samples the reference with the same random numbers).

    .venv/bin/python bench/guard_replay.py --z 0,0.5,1 RUN [RUN ...]
    .venv/bin/python bench/guard_replay.py --z 1k,1 --kl-budget 5 --references RUN [RUN ...]

A ``--z`` token is ``select_z`` with optional letters: ``k`` keeps the least-KL checkpoint of
the band (``prefer="least_kl"``, the one-standard-error rule) instead of the latest (the
engine's default), ``u`` compares points as independent means instead of paired.

``RUN`` is ``TASK=PATH``: a generality task name or a gold scorer ``module:function``, and a
``guard_samples.jsonl`` (or a directory searched for them). Prints one row per run and the
mean paired difference of each rule against the first one, with its standard error.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ppo_core.guard import GuardPoint, OveroptimizationGuard, SelectRule, without_values  # noqa: E402

GoldFn = Callable[[list[str], list[str]], list[float]]


def gold_scorer(task: str) -> GoldFn:
    module, name = task.split(":") if ":" in task else (f"bench.tasks.{task}", "gold_score_batch")
    return getattr(importlib.import_module(module), name)


def load_run(path: Path) -> dict[int, list[dict]]:
    """Rows of one ``guard_samples.jsonl`` by step, in the order they were sampled."""
    by_step: dict[int, list[dict]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]].append(row)
    return dict(sorted(by_step.items()))


def guard_points(by_step: dict[int, list[dict]]) -> list[GuardPoint]:
    """The points the trainer handed the guard (means, standard errors, per-response values)."""
    points = []
    for step, rows in by_step.items():
        held, kl = [r["heldout"] for r in rows], [r["kl"] for r in rows]
        points.append(GuardPoint(step=step, proxy=statistics.fmean(r["proxy"] for r in rows),
                                 heldout=statistics.fmean(held), heldout_se=statistics.stdev(held) / len(held) ** 0.5,
                                 kl=statistics.fmean(kl), kl_se=statistics.stdev(kl) / len(kl) ** 0.5,
                                 heldout_values=tuple(held), kl_values=tuple(kl)))
    return points


def kept_step(points: list[GuardPoint], select_z: float, patience: int, stop_z: float,
              kl_budget: float | None, budget_stops: bool = False, prefer: SelectRule = "latest") -> int:
    """The step a guard with these settings ships (the last evaluated one when nothing beat the
    reference, as ``ppo_core.ppo.train`` does). ``budget_stops`` as the engine sets it: False
    for a run under a KL ceiling (the default), whose points over the budget are never kept
    but do not count towards stopping; True for a run with a fixed beta."""
    guard = OveroptimizationGuard(kl_budget, patience, stop_z=stop_z, select_z=select_z,
                                  budget_stops=budget_stops, prefer=prefer)
    for p in points:
        if guard.update(p).stop:
            break
    kept = guard.kept
    return guard.points[-1].step if kept is None else kept.step


# A rule: (select_z, KL budget, paired, prefer). --references adds two pseudo-rules of the same
# shape: select_z nan is the last step, inf the best gold within the budget (dict keys by identity).
Rule = tuple[float, Optional[float], bool, SelectRule]
LAST: Rule = (float("nan"), None, True, "latest")


def parse_z(token: str, budget: float | None) -> Rule:
    """``"1"``: z=1 on paired differences, the latest checkpoint of the band (the engine's
    guard); ``"1k"``: the least-KL one (the guard before the fourteenth session); ``"1u"``:
    comparing points as independent means (the guard before the twelfth)."""
    token = token.strip().lower()
    number = token.rstrip("ku")
    letters = token[len(number):]
    if len(set(letters)) != len(letters):
        raise SystemExit(f"--z {token!r}: each of the letters k and u at most once")
    try:
        z = float(number)
    except ValueError:
        raise SystemExit(f"--z {token!r}: select_z must be a number, then optionally k and u") from None
    if not math.isfinite(z) or z < 0:
        raise SystemExit(f"--z {token!r}: select_z must be a finite number >= 0")
    return (z, budget, "u" not in letters, "least_kl" if "k" in letters else "latest")


def name(select_z: float, kl_budget: float | None, paired: bool = True, prefer: SelectRule = "latest") -> str:
    if select_z != select_z:
        return "last step"
    if select_z == float("inf"):
        return "best gold (oracle)" + ("" if kl_budget is None else f",kl<={kl_budget:g}")
    return (f"z={select_z:g}" + (" least-KL" if prefer == "least_kl" else "")
            + ("" if paired else " unpaired") + ("" if kl_budget is None else f",kl<={kl_budget:g}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="TASK=PATH")
    ap.add_argument("--z", default="0,1", help="comma-separated select_z values; the first is the baseline; "
                    "a trailing k (1k) keeps the band's least-KL checkpoint instead of its latest, "
                    "a trailing u (1u) compares points as independent means instead of paired")
    ap.add_argument("--patience", type=int, default=3, help="guard_patience of the runs (engine default 3)")
    ap.add_argument("--stop-z", type=float, default=1.0, help="guard_stop_z of the runs (engine default 1)")
    ap.add_argument("--kl-budget", default="none",
                    help="comma-separated guard_kl_budget values (nats/response; 'none': no budget)")
    ap.add_argument("--references", action="store_true",
                    help="also score two references: the last evaluated step and the step with the best "
                         "gold win rate within the first KL budget (an oracle no rule can match)")
    ap.add_argument("--budget-stops", action="store_true",
                    help="points over the KL budget count towards stopping, as in a run without a "
                         "KL ceiling; by default they do not, as under the engine's default ceiling")
    args = ap.parse_args(argv)
    budgets = [None if b.strip().lower() == "none" else float(b) for b in args.kl_budget.split(",")]
    rules = [parse_z(z, b) for b in budgets for z in args.z.split(",")]
    oracle: Rule = (float("inf"), budgets[0], True, "latest")
    results: dict[Rule, list[tuple[float, float]]] = {r: [] for r in rules}
    for spec in args.runs:
        task, _, where = spec.partition("=")
        root = Path(where)
        files = sorted(root.rglob("guard_samples.jsonl")) if root.is_dir() else [root]
        gold = gold_scorer(task)
        for f in files:
            by_step = load_run(f)
            g = {s: gold([r["prompt"] for r in rows], [r["response"] for r in rows]) for s, rows in by_step.items()}
            points = guard_points(by_step)
            unpaired = [without_values(p) for p in points]   # the guard before the twelfth session

            def win_at(step: int) -> float:
                return statistics.fmean((a > b) + 0.5 * (a == b) for a, b in zip(g[step], g[0]))
            steps = {rule: kept_step(points if rule[2] else unpaired, rule[0], args.patience, args.stop_z,
                                     rule[1], args.budget_stops, rule[3]) for rule in rules}
            if args.references:
                within = [p.step for p in points if p.step > 0 and (budgets[0] is None or p.kl <= budgets[0])]
                steps[LAST] = points[-1].step
                steps[oracle] = max(within, key=win_at) if within else points[-1].step
            cells = []
            for rule, step in steps.items():
                win = win_at(step)
                kl = next(p.kl for p in points if p.step == step)
                results.setdefault(rule, []).append((win, kl))
                gold_mean = statistics.fmean(g[step])
                cells.append(f"{name(*rule)}: step {step:3d} gold {gold_mean:6.2f} win {win:.3f} KL {kl:5.2f}")
            print(f"{task:12s} {' | '.join(cells)}  {f}")
    base = results[rules[0]]
    n = len(base)
    print(f"\n{n} runs; paired difference against {name(*rules[0])} (mean +- standard error):")
    for rule in [r for r in results if r != rules[0]]:
        dw = [a[0] - b[0] for a, b in zip(results[rule], base)]
        dk = [a[1] - b[1] for a, b in zip(results[rule], base)]
        se = (lambda d: statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan"))
        print(f"  {name(*rule)}: win rate over the reference {statistics.fmean(dw):+.4f} +- {se(dw):.4f}, "
              f"KL {statistics.fmean(dk):+.2f} +- {se(dk):.2f} nats/response")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
