"""Generality task "constraints": copy the items the prompt asks for, add nothing else.

* Prompts name 2-4 required items (``ITEMS``: fruit, animals, objects) and sometimes one
  forbidden item: ``"make a list of apple , tiger and lamp ."``,
  ``"mention otter and spoon but not lemon please ."``. Tens of thousands of distinct
  prompts, so the policy must learn to copy, not to memorise answers.
* A response is a list of items, ``"apple , tiger and lamp ."`` (commas, optionally ``and``
  before the last item, a final period).
* :func:`gold_reward`, per list segment in order: ``+1.5`` for a required item (first mention),
  ``-1`` for an item the prompt does not name (hallucinated extra), ``-2`` for the forbidden
  item, ``-1`` for any repeated item, ``-2`` for a malformed segment (empty, two words, not an
  item). Then ``+0.5`` when every required item is present in the prompt's order, and ``-1``
  without the final period. Best: exactly the required items in order, ``1.5 k + 0.5``
  (3.5 / 5.0 / 6.5 for k = 2 / 3 / 4). Length cannot buy reward: every extra segment costs.
* The labeller (:func:`sample_response`) copies each required item with probability
  ``P_COPY``, adds 0-2 extras, sometimes the forbidden item, a repeat, a malformed segment,
  shuffles half the time and drops the period now and then: chosen responses are better than
  rejected ones but far from the best.

Shape, against the bundled task: the target is in the prompt (copying, not a hidden
adjective ranking), the length of the best answer varies with the prompt, and order matters.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from bench.tasks.common import preference_pairs

ITEMS: tuple[str, ...] = (
    "apple", "banana", "carrot", "lemon", "mango", "onion", "pepper", "grape",
    "tiger", "horse", "rabbit", "camel", "eagle", "otter", "zebra", "whale",
    "lamp", "chair", "clock", "spoon", "brush", "kettle", "pillow", "ladder",
)
OPENERS: tuple[str, ...] = ("make a list of", "write a list with", "list", "name", "mention", "include")
CLOSERS: tuple[str, ...] = (".", "please .")
# Gold reward terms (see the module docstring).
REQUIRED_REWARD = 1.5
EXTRA_PENALTY = 1.0
FORBIDDEN_PENALTY = 2.0
REPEAT_PENALTY = 1.0
MALFORMED_PENALTY = 2.0
ORDER_BONUS = 0.5
MISSING_PERIOD_PENALTY = 1.0
# Calibrated so that ~7% of the pairs whose gold differs are mislabelled (tests/test_tasks.py).
BT_TEMPERATURE = 0.5
# Labeller: mostly mediocre lists.
FORBIDDEN_PROB = 0.4      # a prompt has a "but not" item
P_COPY = 0.6              # each required item is copied
EXTRA_COUNTS = (0, 1, 2)  # hallucinated extras ...
EXTRA_PROBS = (0.45, 0.35, 0.2)  # ... and their probabilities
P_FORBIDDEN = 0.35        # the forbidden item is mentioned anyway
P_REPEAT = 0.1
P_SHUFFLE = 0.5
P_MALFORMED = 0.04        # per segment
P_NO_PERIOD = 0.06
P_AND = 0.7               # "a , b and c" rather than "a , b , c"

_SEP = re.compile(r"\s*(?:,|\band\b)\s*")
_ITEM_SET = frozenset(ITEMS)


def join_items(items: list[str], use_and: bool = True) -> str:
    """``["a", "b", "c"]`` -> ``"a , b and c"`` (or ``"a , b , c"``)."""
    if len(items) <= 1 or not use_and:
        return " , ".join(items)
    return " , ".join(items[:-1]) + " and " + items[-1]


def make_prompt(required: list[str], forbidden: str | None = None, opener: str = OPENERS[0],
                closer: str = CLOSERS[0]) -> str:
    text = f"{opener} {join_items(required)}"
    if forbidden:
        text += f" but not {forbidden}"
    return f"{text} {closer}"


def parse_prompt(prompt: str) -> tuple[list[str], list[str]]:
    """(required items in prompt order, forbidden items) of a prompt of this task."""
    head, _, tail = prompt.partition(" but not ")
    required = [w for w in head.split() if w in _ITEM_SET]
    forbidden = [w for w in tail.split() if w in _ITEM_SET]
    return required, forbidden


def segments(response: str) -> tuple[list[str], bool]:
    """The list segments of a response (stripped) and whether it ends with a period."""
    text = response.strip()
    ended = text.endswith(".")
    body = text[:-1] if ended else text
    return [s.strip() for s in _SEP.split(body.strip())], ended


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    required, forbidden = parse_prompt(prompt)
    parts, ended = segments(response)
    score = 0.0 if ended else -MISSING_PERIOD_PENALTY
    seen: list[str] = []
    for part in parts:
        if part not in _ITEM_SET:  # empty, several words, or not an item at all
            score -= MALFORMED_PENALTY
        elif part in seen:
            score -= REPEAT_PENALTY
        elif part in required:
            score += REQUIRED_REWARD
        elif part in forbidden:
            score -= FORBIDDEN_PENALTY
        else:
            score -= EXTRA_PENALTY
        if part in _ITEM_SET and part not in seen:
            seen.append(part)
    copied = [w for w in seen if w in required]
    if copied == required:  # all present, first mentions in the prompt's order
        score += ORDER_BONUS
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched gold reward, the ``module:function`` signature of ``evaluation_report.gold_scorer``."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward for ``prompt``."""
    return join_items(parse_prompt(prompt)[0]) + " ."


def best_possible_reward(prompt: str) -> float:
    return gold_reward(prompt, best_response(prompt))


def sample_prompt(rng: np.random.Generator) -> tuple[str, tuple[list[str], str | None]]:
    k = int(rng.integers(2, 5))
    picks = [ITEMS[i] for i in rng.choice(len(ITEMS), size=k + 1, replace=False)]
    required, forbidden = picks[:k], (picks[k] if rng.random() < FORBIDDEN_PROB else None)
    opener = OPENERS[int(rng.integers(len(OPENERS)))]
    closer = CLOSERS[int(rng.integers(len(CLOSERS)))]
    return make_prompt(required, forbidden, opener, closer), (required, forbidden)


def _malformed(word: str, rng: np.random.Generator) -> str:
    kind = int(rng.integers(3))
    if kind == 0:
        return ""  # an empty segment: "apple , , lamp"
    if kind == 1:
        return f"{word} {ITEMS[int(rng.integers(len(ITEMS)))]}"  # two items without a separator
    return ("thing", "stuff", "the")[int(rng.integers(3))]  # not an item


def sample_response(spec: tuple[list[str], str | None], rng: np.random.Generator) -> str:
    """The labeller policy: a partial, noisy copy of the required items (see the module docstring)."""
    required, forbidden = spec
    words = [w for w in required if rng.random() < P_COPY]
    others = [w for w in ITEMS if w not in required and w != forbidden]
    n_extra = int(rng.choice(EXTRA_COUNTS, p=EXTRA_PROBS))
    inserts = [others[i] for i in rng.choice(len(others), size=n_extra, replace=False)]
    if forbidden and rng.random() < P_FORBIDDEN:
        inserts.append(forbidden)
    if words and rng.random() < P_REPEAT:
        inserts.append(words[int(rng.integers(len(words)))])
    for w in inserts:
        words.insert(int(rng.integers(len(words) + 1)), w)
    if not words:
        words = [ITEMS[int(rng.integers(len(ITEMS)))]]
    if rng.random() < P_SHUFFLE:
        words = [words[i] for i in rng.permutation(len(words))]
    words = [_malformed(w, rng) if rng.random() < P_MALFORMED else w for w in words]
    text = join_items(words, use_and=rng.random() < P_AND)
    if rng.random() >= P_NO_PERIOD:
        text += " ."
    return " ".join(text.split())  # an empty segment leaves a double space


def generate_pairs(n_pairs: int, seed: int = 0, noise_temperature: float = BT_TEMPERATURE) -> pd.DataFrame:
    """Seeded preference pairs (``prompt``, ``chosen``, ``rejected``) labelled with Bradley-Terry noise."""
    return preference_pairs(n_pairs, seed, noise_temperature, sample_prompt, sample_response, gold_reward)
