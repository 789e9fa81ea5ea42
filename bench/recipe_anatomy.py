"""What a recipe reward model knows, and what PPO's samples get wrong (BENCHMARKS.md, "Twelfth
session").

``rm DIR [DIR ...]``: each reward model's mean score on canonical answers of the recipe task:
the same three-sentence answer with the first sentence's manner varied (gold quality -1 to 1),
and the right answer against one with a repeated ingredient, an unnamed one, one left out or
one sentence too many. A model that scores "repeat" as high as "correct" cannot see the
error that costs gold most.

``samples GUARD_SAMPLES``: the gold reward of a PPO run's guard samples split into its terms,
per evaluated step (means per response): sentences, first uses of named ingredients, their
manner quality, unnamed ingredients, repeated ingredients and manners, malformed sentences,
named ingredients never used, missing final period.

    .venv/bin/python bench/recipe_anatomy.py rm RLHF_HOME/models/reward_model/RUN/final
    .venv/bin/python bench/recipe_anatomy.py samples RLHF_HOME/models/ppo_policy/RUN/guard_samples.jsonl
"""
from __future__ import annotations

import collections
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.tasks.recipe import (INGREDIENTS, MANNER_QUALITY, VERBS, gold_reward, make_prompt,  # noqa: E402
                                parse_prompt)
from ppo_core.data import encode_prompt_response, pad_sequences  # noqa: E402
from ppo_core.models import last_token_scores, load_sequence_scorer, load_tokenizer  # noqa: E402

BEST = ("slowly", "gently", "carefully")


def canonical_cases(n: int = 60, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """``name -> [(prompt, response)]``: the manner ladder and the structural errors."""
    rng = random.Random(seed)
    cases: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for _ in range(n):
        ing = rng.sample(INGREDIENTS, 4)
        prompt = make_prompt("stew", ing[:3])
        others = rng.sample(["quickly", "briefly", "lightly"], 2)
        for manner in MANNER_QUALITY:
            cases[f"manner {manner}"].append(
                (prompt, f" add the {ing[0]} {manner} . chop the {ing[1]} {others[0]} . stir the {ing[2]} {others[1]} ."))

        def three(a: str, b: str, c: str) -> str:
            return f" add the {a} {BEST[0]} . chop the {b} {BEST[1]} . stir the {c} {BEST[2]} ."
        cases["correct"].append((prompt, three(*ing[:3])))
        cases["repeat (2nd names the 1st)"].append((prompt, three(ing[0], ing[0], ing[2])))
        cases["unnamed (3rd)"].append((prompt, three(ing[0], ing[1], ing[3])))
        cases["left out (3rd)"].append((prompt, f" add the {ing[0]} {BEST[0]} . chop the {ing[1]} {BEST[1]} ."))
        cases["extra sentence, repeat"].append((prompt, three(*ing[:3]) + f" toss the {ing[1]} lightly ."))
        cases["extra sentence, unnamed"].append((prompt, three(*ing[:3]) + f" toss the {ing[3]} lightly ."))
    return cases


@torch.no_grad()
def rm_view(model_dir: str) -> None:
    tok, rm = load_tokenizer(model_dir), load_sequence_scorer(model_dir).eval()
    print(f"{model_dir}\n  {'case':28s} {'gold':>6s} {'RM':>7s}")
    for name, pairs in canonical_cases().items():
        enc = [encode_prompt_response(tok, p, r, 128).input_ids for p, r in pairs]
        ids, mask = pad_sequences(enc, tok.pad_token_id)
        rm_mean = float(last_token_scores(rm, ids, mask).mean())
        gold = statistics.fmean(gold_reward(p, r) for p, r in pairs)
        print(f"  {name:28s} {gold:+6.2f} {rm_mean:+7.3f}")


TERMS = ("gold", "sentences", "uses", "manner_quality", "unnamed", "repeated", "repeated_manner",
         "malformed", "unused", "no_period")


def gold_terms(prompt: str, response: str) -> dict[str, float]:
    """:func:`bench.tasks.recipe.gold_reward`'s terms, counted (the same rules, in the same order)."""
    named = parse_prompt(prompt)
    text = response.strip()
    t = dict.fromkeys(TERMS, 0.0)
    t["no_period"] = float(not text.endswith("."))
    used: set[str] = set()
    manners: set[str] = set()
    for sentence in (s.strip() for s in text.split(".")):
        if not sentence:
            continue
        t["sentences"] += 1
        w = sentence.split()
        if len(w) != 4 or w[0] not in VERBS or w[1] != "the" or w[2] not in INGREDIENTS or w[3] not in MANNER_QUALITY:
            t["malformed"] += 1
            continue
        t["repeated_manner"] += w[3] in manners
        manners.add(w[3])
        if w[2] not in named:
            t["unnamed"] += 1
        elif w[2] in used:
            t["repeated"] += 1
        else:
            used.add(w[2])
            t["uses"] += 1
            t["manner_quality"] += MANNER_QUALITY[w[3]]
    t["unused"] = float(len(set(named) - used))
    t["gold"] = gold_reward(prompt, response)
    return t


def samples_view(path: str) -> None:
    by_step: dict[int, list[dict[str, float]]] = collections.defaultdict(list)
    for line in open(path):
        row = json.loads(line)
        by_step[row["step"]].append(gold_terms(row["prompt"], row["response"]))
    print("step " + " ".join(f"{t:>15s}" for t in TERMS))
    for step, rows in sorted(by_step.items()):
        print(f"{step:4d} " + " ".join(f"{statistics.fmean(r[t] for r in rows):15.3f}" for t in TERMS))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("rm", "samples"):
        print(__doc__)
        return 2
    for target in argv[1:]:
        (rm_view if argv[0] == "rm" else samples_view)(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
