"""Reward models against gold on PPO's own samples (BENCHMARKS.md, generality suite).

Scores every response in a PPO run's ``guard_samples.jsonl`` (the guard's prompts at each
evaluated checkpoint) with each reward model given, and prints the agreement with the gold
scorer over all pairs of samples for the same prompt whose gold differs (and over the pairs
that include a step-0, i.e. SFT, sample). It also splits each model's scores (and gold) into
the variance of the per-prompt means and the mean within-prompt variance: pairwise losses
leave a per-prompt offset free, and a large between / within ratio that does not follow
gold's prompt means is noise PPO's critic has to learn away (BENCHMARKS.md, "Reward centering").

    .venv/bin/python bench/rm_on_policy.py GUARD_SAMPLES TASK RM_DIR [RM_DIR ...]

``TASK`` is a generality task name or a gold scorer ``module:function``.
"""
import collections, importlib, itertools, json, statistics, sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ppo_core.data import encode_prompt_response, pad_sequences
from ppo_core.models import last_token_scores, load_sequence_scorer, load_tokenizer

path, task, rms = sys.argv[1], sys.argv[2], sys.argv[3:]
module, name = task.split(":") if ":" in task else (f"bench.tasks.{task}", "gold_score_batch")
gold_fn = getattr(importlib.import_module(module), name)
rows = [json.loads(line) for line in open(path)]
gold = gold_fn([r["prompt"] for r in rows], [r["response"] for r in rows])
torch.set_num_threads(1)


def variance_split(values: list[float]) -> tuple[float, float, dict[str, float]]:
    """(variance of the per-prompt means, mean within-prompt variance, the means by prompt)."""
    by: dict[str, list[float]] = collections.defaultdict(list)
    for r, v in zip(rows, values):
        by[r["prompt"]].append(v)
    means = {p: statistics.fmean(v) for p, v in by.items()}
    return (statistics.pvariance(means.values()),
            statistics.fmean(statistics.pvariance(v) for v in by.values()), means)


gold_between, gold_within, gold_means = variance_split(gold)
print(f"gold: {len(rows)} samples of {len(gold_means)} prompts, variance between prompts "
      f"{gold_between:.2f}, within {gold_within:.2f}")
for rm in rms:
    tok, model = load_tokenizer(rm), load_sequence_scorer(rm).eval()
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), 128):
            seqs = [encode_prompt_response(tok, r["prompt"], r["response"].strip(), 160).input_ids
                    for r in rows[i:i + 128]]
            ids, mask = pad_sequences(seqs, tok.pad_token_id)
            scores += last_token_scores(model, ids, mask).tolist()
    by_prompt = collections.defaultdict(list)
    for r, g, s in zip(rows, gold, scores):
        by_prompt[r["prompt"]].append((g, s, r["step"]))
    n = ok = n0 = ok0 = 0
    for samples in by_prompt.values():
        for a, b in itertools.combinations(samples, 2):
            if a[0] == b[0]:
                continue
            agree = (a[1] > b[1]) == (a[0] > b[0])
            n, ok = n + 1, ok + agree
            if 0 in (a[2], b[2]):
                n0, ok0 = n0 + 1, ok0 + agree
    print(f"{rm}: {n} within-prompt pairs, agreement {ok / n:.3f}; pairs with a step-0 sample {ok0 / max(n0, 1):.3f}")
    between, within, means = variance_split(scores)
    prompts = list(means)
    r_means = statistics.correlation([means[p] for p in prompts], [gold_means[p] for p in prompts])
    r_within = statistics.correlation([s - means[r["prompt"]] for r, s in zip(rows, scores)],
                                      [g - gold_means[r["prompt"]] for r, g in zip(rows, gold)])
    print(f"  variance between prompts {between:.2f}, within {within:.2f} (ratio {between / within:.2f}); "
          f"correlation with gold: prompt means {r_means:.2f}, within prompts {r_within:.2f}")
