"""Re-run only PPO of a finished lineage, one setting changed, and evaluate it as the report does
(BENCHMARKS.md: the PPO-only comparisons of the seventh and eighth sessions).

Reads ``<RLHF_HOME>/models/ppo_policy/*/stage_config.json`` (the exact config the lineage's PPO
ran with: its SFT, reward models, splits; ``--stage-config`` names another, e.g. a round's
``round_policy/<run>/<round>/stage_config.json``), applies ``key=JSON`` overrides, runs
``python -m ppo_core.ppo`` into ``--out``, and evaluates ``--out/final`` against the lineage's
SFT (``--against``: the config's ``policy_path``, e.g. a round's champion) with
``bench.generality.evaluate_pipeline`` on the test split: 96 prompts x 4 samples at
temperature 0.7, the config's reward model on the test pairs. Prints one JSON line.

    .venv/bin/python bench/ppo_rerun.py --home RLHF_HOME --task recipe --out /tmp/r seed=1 kl_ceiling=6.5
    .venv/bin/python bench/ppo_rerun.py --home RLHF_HOME --task assets.bundled_task:gold_score_batch \\
        --stage-config RLHF_HOME/models/round_policy/RUN/round-0001/stage_config.json --against start \\
        --out /tmp/r1 kl_ceiling_headroom=null
    ENS_RM=rm1:rm2 .venv/bin/python bench/ppo_rerun.py ... reward_model_path=null \\
        'reward_function="bench.ensemble_reward:score"' 'critic_path="rm1"'
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def one(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{pattern}: expected one match, found {len(found)}")
    return found[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True, help="RLHF_HOME of a finished lineage")
    p.add_argument("--task", required=True, help="a generality task name or a gold scorer module:function")
    p.add_argument("--out", required=True, help="PPO output directory (its config goes to <out>.json)")
    p.add_argument("--stage-config", default="", help="a PPO stage_config.json (default: the lineage's)")
    p.add_argument("--against", choices=("sft", "start"), default="sft",
                   help="compare with the lineage's SFT model or with the run's starting policy (policy_path)")
    p.add_argument("overrides", nargs="*", help="key=JSON, e.g. seed=1 or 'reward_function=\"m:f\"'")
    args = p.parse_args()
    home = args.home.rstrip("/")
    cfg = json.loads(Path(args.stage_config or one(f"{home}/models/ppo_policy/*/stage_config.json")).read_text())
    cfg.update(output_dir=args.out, resume_from=None)
    if "num_threads" in cfg:  # older stage configs: strategy.cpu_threads is the thread setting now
        threads = cfg.pop("num_threads")
        if threads:
            cfg.setdefault("strategy", {})["cpu_threads"] = threads
        print(f"stage config: num_threads={threads} -> strategy.cpu_threads "
              f"{cfg.get('strategy', {}).get('cpu_threads')} (PPOConfig's one thread setting)", file=sys.stderr)
    from dataclasses import fields

    from ppo_core.ppo import PPOConfig

    known = {f.name for f in fields(PPOConfig)}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"override {item!r}: expected key=JSON with a field of ppo_core.ppo.PPOConfig")
        cfg[key] = json.loads(value)
    config_path = Path(f"{args.out}.json")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(cfg, indent=1))
    start = time.time()
    with open(f"{args.out}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "ppo_core.ppo", "--config", str(config_path)], cwd=REPO,
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    ppo_s = time.time() - start
    summary = json.loads(Path(args.out, "summary.json").read_text())

    import pandas as pd

    from bench.generality import evaluate_pipeline
    from bench.guard_replay import gold_scorer

    split = Path(one(f"{home}/data/splits/*/manifest.json")).parent
    settings = dict(max_prompts=96, samples_per_prompt=4, max_new_tokens=cfg["response_length"],
                    temperature=0.7, seed=0)
    baseline = one(f"{home}/models/sft_model/*/final") if args.against == "sft" else cfg["policy_path"]
    ev = evaluate_pipeline(baseline, f"{args.out}/final", cfg["reward_model_path"] or one(f"{home}/models/reward_model/*/final"),
                           pd.read_parquet(split / "test_pairs.parquet"),
                           pd.read_parquet(split / "test_prompts.parquet")["prompt"].tolist(),
                           gold_scorer(args.task), settings, rm_stats=summary.get("reward_ensemble"))
    keep = ("rm_gold_agreement", "gold_sft", "gold_ppo", "gold_win_rate", "gold_win_rate_se", "kl_nats_per_response")
    print(json.dumps({"out": args.out, "overrides": args.overrides, "against": args.against, "ppo_s": round(ppo_s),
                      "kept_step": summary.get("kept_step"), "stopped": summary.get("stopped_reason"),
                      **{k: round(ev[k], 3) for k in keep}}), flush=True)


if __name__ == "__main__":
    main()
