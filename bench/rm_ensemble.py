"""Reward-model ensembles against single members, on the test pairs' gold order (BENCHMARKS.md,
"Ensembles, a PI controller, averaging").

Two ways to combine K reward models trained by ``bench/rm_probe.py`` with different seeds:

* ``scores``: average the members' standardised scores (each member's test-pair scores to mean
  0, std 1), from the probes' ``--dump`` files. This is a prediction ensemble (Coste et al.
  2023): PPO would run every member.
* ``soup``: average the members' weights (WARM, Rame et al. 2024), from the probes' ``--save``
  directories; one model, so PPO would pay nothing extra.

Each prints the members' agreement, the mean over every pair of members, and all K together.

    .venv/bin/python bench/rm_ensemble.py scores 'probe_s*.pt'
    .venv/bin/python bench/rm_ensemble.py soup --home RLHF_HOME --task recipe DIR1 DIR2 ...
"""
from __future__ import annotations

import argparse
import glob
import importlib
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def agreement(chosen: Sequence[float], rejected: Sequence[float], gold_c: Sequence[float],
              gold_r: Sequence[float]) -> float:
    """Fraction of the gold-decided pairs (gold scores differ) the scores order as gold does."""
    decided = [(c > r) == (gc > gr) for c, r, gc, gr in zip(chosen, rejected, gold_c, gold_r) if gc != gr]
    return sum(decided) / len(decided)


def standardised_mean(members: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], list[float]]:
    """Mean over members of each member's (chosen, rejected) scores, standardised on both together."""
    zc, zr = [], []
    for c, r in members:
        both = torch.cat([c, r])
        mu, sd = both.mean(), both.std()
        zc.append((c - mu) / sd)
        zr.append((r - mu) / sd)
    return torch.stack(zc).mean(0).tolist(), torch.stack(zr).mean(0).tolist()


def report(k: int, score: Callable[[Sequence[int]], float]) -> None:
    singles = [score([i]) for i in range(k)]
    pairs = [score(c) for c in itertools.combinations(range(k), 2)]
    print(f"members {[round(x, 3) for x in singles]} mean {fmean(singles):.3f} | "
          f"pairs {[round(x, 3) for x in pairs]} mean {fmean(pairs):.3f} | all {k}: {score(range(k)):.3f}")


def scores_mode(pattern: str, which: str) -> None:
    dumps = [torch.load(f, weights_only=True) for f in sorted(glob.glob(pattern))]
    if len(dumps) < 2:
        raise SystemExit(f"{pattern!r}: need at least 2 dumps, found {len(dumps)}")
    gold_c, gold_r = dumps[0]["gold"]
    report(len(dumps), lambda idx: agreement(*standardised_mean([dumps[i][which] for i in idx]), gold_c, gold_r))


def soup_mode(home: str, task: str, dirs: list[str]) -> None:
    import pandas as pd

    from ppo_core.data import encode_prompt_response, pad_sequences
    from ppo_core.models import last_token_scores, load_sequence_scorer, load_tokenizer

    split = Path(sorted(glob.glob(f"{home}/data/splits/*/manifest.json"))[0]).parent
    test = pd.read_parquet(split / "test_pairs.parquet")
    module, _, func = (task if ":" in task else f"bench.tasks.{task}:gold_score_batch").partition(":")
    gold = getattr(importlib.import_module(module), func)
    gold_c, gold_r = gold(test.prompt.tolist(), test.chosen.tolist()), gold(test.prompt.tolist(), test.rejected.tolist())
    tok = load_tokenizer(dirs[0])
    seqs = {side: [encode_prompt_response(tok, p, t, 128).input_ids for p, t in zip(test.prompt, test[side])]
            for side in ("chosen", "rejected")}
    states = [load_sequence_scorer(d, pad_token_id=tok.pad_token_id).state_dict() for d in dirs]
    model = load_sequence_scorer(dirs[0], pad_token_id=tok.pad_token_id).eval()

    @torch.no_grad()
    def score(idx: Sequence[int]) -> float:
        idx = list(idx)
        model.load_state_dict({k: sum(states[i][k] for i in idx) / len(idx) for k in states[0]})
        out = {}
        for side, rows in seqs.items():
            parts = []
            for start in range(0, len(rows), 64):
                ids, mask = pad_sequences(rows[start:start + 64], tok.pad_token_id)
                parts.append(last_token_scores(model, ids, mask).float())
            out[side] = torch.cat(parts).tolist()
        return agreement(out["chosen"], out["rejected"], gold_c, gold_r)

    report(len(dirs), score)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("scores", help="prediction ensemble of rm_probe.py --dump files")
    s.add_argument("pattern", help="glob of the dump files")
    s.add_argument("--which", default="final", choices=("final", "best", "ema"))
    w = sub.add_parser("soup", help="weight average of rm_probe.py --save directories")
    w.add_argument("--home", required=True)
    w.add_argument("--task", required=True, help="a generality task name or a gold scorer module:function")
    w.add_argument("dirs", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.mode == "scores":
        scores_mode(args.pattern, args.which)
    else:
        soup_mode(args.home, args.task, args.dirs)


if __name__ == "__main__":
    main()
