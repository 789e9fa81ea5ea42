"""Each reward-model candidate of a finished lineage against gold (BENCHMARKS.md, "Two reward
models, one objective").

A reward model trained with several ``mismatched_negatives`` values keeps one model per value
under ``<output_dir>/candidates/`` and ships the one with the best eval-split accuracy
(``ppo_core.reward.train_candidates``). This prints, for ``reward_model`` and
``heldout_reward_model`` of the lineage in ``--home``, every candidate's eval accuracy (the
selection's signal, from its summary) beside its agreement with the gold order on the test
pairs (the evaluation report's ``pair_metrics``), which one ``final/`` holds, and the
agreement of what PPO optimised (the evaluation report's: with several candidates, their
ensemble, ``ppo_core.rewards.EnsembleReward``); the last line is JSON.

    .venv/bin/python bench/rm_candidates.py --home RLHF_HOME --task facts [--extra RM_DIR ...]

``--extra`` adds reward models (a ``save_pretrained`` dir each) as further members of the
reward model, e.g. one trained by ``python -m ppo_core.reward`` beside a lineage that trained
one model; the ensemble row then covers them too.

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
from assets.evaluation import (EvaluationConfig, ensemble_stats, generate, pair_metrics,  # noqa: E402
                               rm_scores)
from bench.guard_replay import gold_scorer  # noqa: E402
from bench.ppo_rerun import one  # noqa: E402


def one_dir(pattern: str) -> Path:
    return Path(one(pattern))


def candidates(stage_dir: Path, pairs: pd.DataFrame, gold, extra: list[str] = ()) -> list[dict]:
    """One row per candidate of the reward model in ``stage_dir`` (one row without candidates),
    then one per ``extra`` model (its summary.json's eval accuracy, when it has one)."""
    summary = json.loads((stage_dir / "summary.json").read_text())
    listed = summary.get("candidates") or [{"mismatched_negatives": summary.get("mismatched_negatives"),
                                            "output_dir": str(stage_dir), "eval/accuracy": summary["eval/accuracy"]}]
    rows = []
    for c in listed:
        rows.append({"dir": str(Path(c["output_dir"]) / "final"), "mismatched_negatives": c["mismatched_negatives"],
                     "eval_accuracy": c["eval/accuracy"],
                     "shipped": c["mismatched_negatives"] == summary.get("mismatched_negatives")})
    for d in extra:
        own = Path(d).parent / "summary.json"
        rows.append({"dir": d, "mismatched_negatives": f"extra:{Path(d).parent.name}", "shipped": False,
                     "eval_accuracy": json.loads(own.read_text())["eval/accuracy"] if own.is_file() else float("nan")})
    for r in rows:
        m = pair_metrics(r["dir"], pairs, gold, batch_size=64)
        r.update(gold_agreement=m["rm/gold_agreement"], gold_agreement_se=m["rm/gold_agreement_se"])
    return rows


def ensemble_row(home: Path, dirs: list[str], pairs: pd.DataFrame, gold) -> dict:
    """Gold agreement of the members' ensemble as the evaluation report scores it: weighted by
    the lineage's PPO statistics when its PPO optimised exactly these members, else each member
    standardised on the SFT model's answers to the test prompts (report settings), averaged."""
    sft = str(one_dir(f"{home}/models/sft_model/*/final"))
    prompts = pd.read_parquet(one_dir(f"{home}/data/splits/*/test_prompts.parquet"))["prompt"].astype(str).tolist()
    reports = glob.glob(f"{home}/models/evaluation_report/*/report.json")
    if reports:  # the lineage's own sampling settings
        cfg = EvaluationConfig(**json.loads(Path(reports[0]).read_text())["config"])
    else:  # a lineage stopped before its report: the report's defaults at PPO's response length
        ppo = json.loads(one_dir(f"{home}/models/ppo_policy/*/stage_config.json").read_text())
        cfg = EvaluationConfig(max_new_tokens=ppo["response_length"])
    ppo = glob.glob(f"{home}/models/ppo_policy/*/summary.json")
    recorded = json.loads(Path(ppo[0]).read_text()).get("reward_ensemble") if ppo else None

    def sft_scores() -> list[list[float]]:  # the prompts as evaluate() expands them
        asked = prompts[: cfg.max_prompts] if cfg.max_prompts > 0 else prompts
        asked = [p for p in asked for _ in range(max(1, cfg.samples_per_prompt))]
        ids = generate(sft, asked, cfg)["ids"]
        return [rm_scores(d, asked, ids, cfg.batch_size) for d in dirs]

    stats, source = ensemble_stats(dirs, recorded, sft_scores)
    weights = "PPO's reference samples" if source == "ppo_reference_samples" else "SFT answers"
    m = pair_metrics(dirs, pairs, gold, cfg.batch_size, stats)
    return {"members": dirs, "standardised_on": weights, "gold_agreement": m["rm/gold_agreement"],
            "gold_agreement_se": m["rm/gold_agreement_se"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True, help="the lineage's RLHF_HOME")
    p.add_argument("--task", required=True, help="generality task name or gold scorer module:function")
    p.add_argument("--extra", action="append", default=[], help="another reward model dir (repeatable)")
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    home = Path(args.home)
    pairs = pd.read_parquet(one_dir(f"{home}/data/splits/*/test_pairs.parquet"))
    gold = gold_scorer(args.task)
    report = {}
    print(f"{'model':<22} {'mismatched':>10} {'eval acc':>9} {'gold agreement':>16}  in final/")
    for stage in ("reward_model", "heldout_reward_model"):
        rows = candidates(one_dir(f"{home}/models/{stage}/*/"), pairs, gold,
                          args.extra if stage == "reward_model" else [])
        for r in rows:
            print(f"{stage:<22} {r['mismatched_negatives']!s:>10} {r['eval_accuracy']:>9.3f} "
                  f"{r['gold_agreement']:>8.3f} +- {r['gold_agreement_se']:.3f}  {'yes' if r['shipped'] else ''}")
        report[stage] = rows
        if len(rows) > 1 and stage == "reward_model":
            ens = ensemble_row(home, [r["dir"] for r in rows], pairs, gold)
            print(f"{stage:<22} {'ensemble':>10} {'':>9} {ens['gold_agreement']:>8.3f} +- {ens['gold_agreement_se']:.3f}"
                  f"  (members standardised on {ens['standardised_on']})")
            report["ensemble"] = ens
    print(json.dumps({"home": str(home), "task": args.task, **report}))


if __name__ == "__main__":
    main()
