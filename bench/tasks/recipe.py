"""Generality task "recipe": use the prompt's ingredients, each once, in the best manner.

* Prompts name a dish and two or three ingredients:
  ``"make a stew with leek , tofu and corn please ."``; about 5,900 distinct prompts in 6,000 pairs.
* A response is short sentences ``"<verb> the <ingredient> <manner> ."``, the shape of the
  bundled task's answers: ``"chop the leek gently . stir the tofu carefully . add the corn slowly ."``.
* :func:`gold_reward`, per sentence: ``+1 + quality(manner)`` for the first use of an
  ingredient the prompt names (each manner has a hidden quality in [-1, 1],
  ``MANNER_QUALITY``), ``-1`` for a repeated ingredient, ``-1.5`` for an ingredient the prompt
  never mentions, ``-2`` for a malformed sentence; then ``-0.5`` per repeated manner, ``-1`` per
  named ingredient never used and ``-1`` without the final period. Best: each named
  ingredient once with the best distinct manners (5.6 for three ingredients).
* The labeller (:func:`sample_response`) writes one sentence too few to two too many; each
  sentence takes the next unused named ingredient ``P_NEXT`` of the time, any named one
  ``P_ANY_NAMED`` of the time (so repeats happen) and another one otherwise, and rarely uses good manners (weight
  ``exp(-MANNER_SKEW * quality)``).

Shape, against the other tasks: the bundled task's sentence lists with a hidden quality per
word, plus copying from the prompt, so a reward model has to learn both which words are good
and which ingredients the prompt allows. Listing ingredients the prompt never mentioned is
the exploit it invites.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.tasks.common import preference_pairs

INGREDIENTS: tuple[str, ...] = (
    "rice", "beans", "corn", "leek", "carrot", "onion", "garlic", "tomato", "pepper", "lentils",
    "spinach", "potato", "mushroom", "cheese", "egg", "tofu", "noodles", "ginger", "lemon",
    "basil", "squash", "peas", "olives", "cabbage",
)
DISHES: tuple[str, ...] = ("soup", "stew", "salad", "curry", "pie", "bowl")
OPENERS: tuple[str, ...] = ("make a", "cook a", "prepare a", "help me make a")
CLOSERS: tuple[str, ...] = (".", "please .", "tonight .")
VERBS: tuple[str, ...] = ("add", "chop", "stir", "toss")
# Hidden manner quality in [-1, 1]; the labeller samples good ones rarely.
MANNER_QUALITY: dict[str, float] = {
    "gently": 1.0, "carefully": 0.9, "slowly": 0.7, "evenly": 0.5, "lightly": 0.3,
    "briefly": 0.1, "quickly": 0.0, "roughly": -0.3, "loosely": -0.5, "carelessly": -0.7,
    "hastily": -0.85, "sloppily": -1.0,
}
# Gold reward terms (see the module docstring).
USE_REWARD = 1.0
REPEAT_INGREDIENT_PENALTY = 1.0
UNLISTED_PENALTY = 1.5
MALFORMED_PENALTY = 2.0
REPEAT_MANNER_PENALTY = 0.5
UNUSED_PENALTY = 1.0
MISSING_PERIOD_PENALTY = 1.0
# Calibrated so that ~7% of the pairs whose gold differs are mislabelled (tests/test_tasks.py).
BT_TEMPERATURE = 0.33
# Labeller: mostly mediocre answers.
EXTRA_SENTENCES = (-1, 0, 1, 2)
EXTRA_PROBS = (0.2, 0.4, 0.25, 0.15)
P_NEXT = 0.7
P_ANY_NAMED = 0.15
MANNER_SKEW = 1.5
P_MALFORMED = 0.04        # per sentence: "chop the leek ." (no manner)
P_NO_PERIOD = 0.05

_MANNERS = tuple(MANNER_QUALITY)
_MANNER_WEIGHTS = np.array([math.exp(-MANNER_SKEW * q) for q in MANNER_QUALITY.values()])
_MANNER_WEIGHTS /= _MANNER_WEIGHTS.sum()


def make_prompt(dish: str, ingredients: list[str], opener: str = OPENERS[0], closer: str = CLOSERS[0]) -> str:
    listed = " , ".join(ingredients[:-1]) + f" and {ingredients[-1]}"
    return f"{opener} {dish} with {listed} {closer}"


def parse_prompt(prompt: str) -> list[str]:
    """The ingredients a prompt of this task names, in order."""
    return [t for t in prompt.split() if t in INGREDIENTS]


def _sentences(response: str) -> tuple[list[str], bool]:
    text = response.strip()
    ended = text.endswith(".")
    return [s.strip() for s in text.split(".") if s.strip()], ended


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    named = parse_prompt(prompt)
    sentences, ended = _sentences(response)
    score = 0.0 if ended else -MISSING_PERIOD_PENALTY
    used: set[str] = set()
    manners: set[str] = set()
    for sentence in sentences:
        words = sentence.split()
        if len(words) != 4 or words[0] not in VERBS or words[1] != "the" or words[2] not in INGREDIENTS \
                or words[3] not in MANNER_QUALITY:
            score -= MALFORMED_PENALTY
            continue
        ingredient, manner = words[2], words[3]
        if manner in manners:
            score -= REPEAT_MANNER_PENALTY
        manners.add(manner)
        if ingredient not in named:
            score -= UNLISTED_PENALTY
        elif ingredient in used:
            score -= REPEAT_INGREDIENT_PENALTY
        else:
            used.add(ingredient)
            score += USE_REWARD + MANNER_QUALITY[manner]
    score -= UNUSED_PENALTY * len(set(named) - used)
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched gold reward, the ``module:function`` signature of ``evaluation_report.gold_scorer``."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward for ``prompt``."""
    best = sorted(MANNER_QUALITY, key=MANNER_QUALITY.get, reverse=True)
    return " ".join(f"{VERBS[0]} the {ing} {m} ." for ing, m in zip(parse_prompt(prompt), best))


def best_possible_reward(prompt: str) -> float:
    return gold_reward(prompt, best_response(prompt))


def sample_prompt(rng: np.random.Generator) -> tuple[str, list[str]]:
    k = int(rng.integers(2, 4))
    ingredients = [INGREDIENTS[i] for i in rng.choice(len(INGREDIENTS), size=k, replace=False)]
    d, o, c = rng.integers(0, [len(DISHES), len(OPENERS), len(CLOSERS)])
    return make_prompt(DISHES[d], ingredients, OPENERS[o], CLOSERS[c]), ingredients


def sample_response(named: list[str], rng: np.random.Generator) -> str:
    """The labeller policy: about the right length, mostly the prompt's ingredients, poor manners."""
    n = max(1, len(named) + int(rng.choice(EXTRA_SENTENCES, p=EXTRA_PROBS)))
    others = [i for i in INGREDIENTS if i not in named]
    unused = list(named)
    sentences = []
    for _ in range(n):
        u = rng.random()
        pool = [unused[0]] if u < P_NEXT and unused else named if u < P_NEXT + P_ANY_NAMED else others
        ingredient = pool[int(rng.integers(len(pool)))]
        if ingredient in unused:
            unused.remove(ingredient)
        verb = VERBS[int(rng.integers(len(VERBS)))]
        if rng.random() < P_MALFORMED:
            sentences.append(f"{verb} the {ingredient} .")
        else:
            sentences.append(f"{verb} the {ingredient} {_MANNERS[rng.choice(len(_MANNERS), p=_MANNER_WEIGHTS)]} .")
    text = " ".join(sentences)
    return text[:-2] if rng.random() < P_NO_PERIOD else text


def generate_pairs(n_pairs: int, seed: int = 0, noise_temperature: float = BT_TEMPERATURE) -> pd.DataFrame:
    """Seeded preference pairs (``prompt``, ``chosen``, ``rejected``) labelled with Bradley-Terry noise."""
    return preference_pairs(n_pairs, seed, noise_temperature, sample_prompt, sample_response, gold_reward)
