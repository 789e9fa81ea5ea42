"""Each reward-model candidate of a finished lineage against gold (BENCHMARKS.md, "Mismatched
negatives chosen on the eval split").

A reward model trained with several ``mismatched_negatives`` values keeps one model per value
under ``<output_dir>/candidates/`` and ships the one with the best eval-split accuracy
(``ppo_core.reward.train_candidates``). This prints, for ``reward_model`` and
``heldout_reward_model`` of the lineage in ``--home``, every candidate's eval accuracy (the
selection's signal, from its summary) beside its agreement with the gold order on the test
pairs (the evaluation report's ``pair_metrics``), and which one shipped; the last line is JSON.

    .venv/bin/python bench/rm_candidates.py --home RLHF_HOME --task facts

``--task`` is a generality task name or a gold scorer ``module:function``.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from assets.evaluation import load_gold_scorer, pair_metrics  # noqa: E402


def scorer_spec(task: str) -> str:
    return task if ":" in task else f"bench.tasks.{task}:gold_score_batch"


def one_dir(pattern: str) -> Path:
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{pattern}: expected one match, found {len(found)}")
    return Path(found[0])


def candidates(stage_dir: Path, pairs: pd.DataFrame, gold) -> list[dict]:
    """One row per candidate of the reward model in ``stage_dir`` (one row without candidates)."""
    summary = json.loads((stage_dir / "summary.json").read_text())
    listed = summary.get("candidates") or [{"mismatched_negatives": None, "output_dir": str(stage_dir),
                                            "eval/accuracy": summary["eval/accuracy"]}]
    rows = []
    for c in listed:
        m = pair_metrics(str(Path(c["output_dir"]) / "final"), pairs, gold, batch_size=64)
        rows.append({"mismatched_negatives": c["mismatched_negatives"], "eval_accuracy": c["eval/accuracy"],
                     "gold_agreement": m["rm/gold_agreement"], "gold_agreement_se": m["rm/gold_agreement_se"],
                     "shipped": c["mismatched_negatives"] == summary.get("mismatched_negatives")})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True, help="the lineage's RLHF_HOME")
    p.add_argument("--task", required=True, help="generality task name or gold scorer module:function")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    home = Path(args.home)
    pairs = pd.read_parquet(one_dir(f"{home}/data/splits/*/test_pairs.parquet"))
    gold = load_gold_scorer(scorer_spec(args.task))
    report = {}
    print(f"{'model':<22} {'mismatched':>10} {'eval acc':>9} {'gold agreement':>16}  shipped")
    for stage in ("reward_model", "heldout_reward_model"):
        rows = candidates(one_dir(f"{home}/models/{stage}/*/"), pairs, gold)
        for r in rows:
            print(f"{stage:<22} {r['mismatched_negatives']!s:>10} {r['eval_accuracy']:>9.3f} "
                  f"{r['gold_agreement']:>8.3f} +- {r['gold_agreement_se']:.3f}  {'yes' if r['shipped'] else ''}")
        report[stage] = rows
    print(json.dumps({"home": str(home), "task": args.task, **report}))


if __name__ == "__main__":
    main()
