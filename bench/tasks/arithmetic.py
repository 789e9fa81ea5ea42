"""Generality task "arithmetic": correctness that length cannot buy.

* Prompts ask for a sum or a difference of two numbers from 0 to ``MAX_OPERAND`` (differences
  are never negative) in one of several phrasings: ``"what is 3 plus 4 ?"``,
  ``"compute 12 minus 5 please ?"``; about 3,900 distinct prompts over 392 facts.
* The answer template is ``"the answer is 7 ."``.
* :func:`gold_reward`: for the first number of the response ``+3`` when it is right, otherwise
  partial credit ``1.5 - 0.5 * |error|`` floored at ``-1`` (off by one 1.0, by two 0.5, by five
  or more -1), so the reward model can learn "closer is better"; ``-2`` when there is no number
  at all (malformed); ``-1.5`` per further number (hedging, ``"7 or 8"``); ``-0.5`` per word of
  the template missing and per word beyond it (``"i think"``); ``-1`` without the final period.
  Best: ``"the answer is <right number> ."``, 3. Every extra token costs, so length cannot buy
  reward, and no single answer is right for many prompts.
* The labeller (:func:`sample_response`) is right ``P_RIGHT`` of the time, off by one or two
  most of the rest, and often leaves the template (``"it is 7 ."``, ``"i think the answer is 7 ."``).

Shape, against the other tasks: the reward depends on a computation over the prompt, not on
copying or on style; responses are short and nearly all the same length.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from bench.tasks.common import preference_pairs

MAX_OPERAND = 15
OPERATIONS: dict[str, int] = {"plus": 1, "minus": -1}
OPENERS: tuple[str, ...] = ("what is", "compute", "how much is", "calculate", "tell me")
CLOSERS: tuple[str, ...] = ("?", "please ?")
TEMPLATE: tuple[str, ...] = ("the", "answer", "is")
# Gold reward terms (see the module docstring).
RIGHT_REWARD = 3.0
PARTIAL_BASE = 1.5        # credit of a wrong number: PARTIAL_BASE - PARTIAL_SLOPE * |error| ...
PARTIAL_SLOPE = 0.5
PARTIAL_FLOOR = -1.0      # ... but never below this
NO_NUMBER_PENALTY = 2.0
EXTRA_NUMBER_PENALTY = 1.5
WORD_PENALTY = 0.5        # per template word missing and per word beyond the template
MISSING_PERIOD_PENALTY = 1.0
# Calibrated so that ~7% of the pairs whose gold differs are mislabelled (tests/test_tasks.py).
BT_TEMPERATURE = 0.5
# Labeller: right a third of the time, nearly right often.
P_RIGHT = 0.35
P_OFF_BY_ONE = 0.3
P_OFF_BY_TWO = 0.15       # otherwise a random number in 0 .. 2 * MAX_OPERAND
FORMATS: tuple[tuple[str, float], ...] = (
    ("the answer is {x} .", 0.5),
    ("it is {x} .", 0.15),
    ("{x} .", 0.08),
    ("the answer is {x} i think .", 0.08),
    ("i think the answer is {x} .", 0.07),
    ("the answer is {x} or {y} .", 0.06),
    ("the answer is {x} . the answer is {x} .", 0.04),
    ("the answer is .", 0.02),
)
P_NO_PERIOD = 0.05

_FORMAT_P = np.array([p for _, p in FORMATS]) / sum(p for _, p in FORMATS)


def make_prompt(a: int, op: str, b: int, opener: str = OPENERS[0], closer: str = CLOSERS[0]) -> str:
    return f"{opener} {a} {op} {b} {closer}"


def parse_prompt(prompt: str) -> int | None:
    """The right answer to a prompt of this task (None when the prompt is not of this task)."""
    tokens = prompt.split()
    for i, t in enumerate(tokens[1:-1], start=1):
        if t in OPERATIONS and tokens[i - 1].isdigit() and tokens[i + 1].isdigit():
            return int(tokens[i - 1]) + OPERATIONS[t] * int(tokens[i + 1])
    return None


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    answer = parse_prompt(prompt)
    text = response.strip()
    ended = text.endswith(".")
    score = 0.0 if ended else -MISSING_PERIOD_PENALTY
    tokens = [t for t in text.split() if t != "."]
    numbers = [int(t) for t in tokens if t.isdigit()]
    words = Counter(t for t in tokens if not t.isdigit())
    if not numbers:
        score -= NO_NUMBER_PENALTY
    else:
        error = abs(numbers[0] - answer) if answer is not None else None
        if error == 0:
            score += RIGHT_REWARD
        elif error is not None:
            score += max(PARTIAL_FLOOR, PARTIAL_BASE - PARTIAL_SLOPE * error)
        else:
            score += PARTIAL_FLOOR
        score -= EXTRA_NUMBER_PENALTY * (len(numbers) - 1)
    template = Counter(TEMPLATE)
    missing = sum((template - words).values())
    extra = sum((words - template).values())
    score -= WORD_PENALTY * (missing + extra)
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched gold reward, the ``module:function`` signature of ``evaluation_report.gold_scorer``."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward for ``prompt``."""
    return f"the answer is {parse_prompt(prompt)} ."


def best_possible_reward(prompt: str) -> float:
    return gold_reward(prompt, best_response(prompt))


def sample_prompt(rng: np.random.Generator) -> tuple[str, int]:
    op = tuple(OPERATIONS)[int(rng.integers(len(OPERATIONS)))]
    a, b = (int(x) for x in rng.integers(0, MAX_OPERAND + 1, size=2))
    if op == "minus" and b > a:
        a, b = b, a
    opener = OPENERS[int(rng.integers(len(OPENERS)))]
    closer = CLOSERS[int(rng.integers(len(CLOSERS)))]
    return make_prompt(a, op, b, opener, closer), a + OPERATIONS[op] * b


def sample_response(answer: int, rng: np.random.Generator) -> str:
    """The labeller policy: often nearly right, often off-template (see the module docstring)."""
    u, sign = rng.random(), (1 if rng.random() < 0.5 else -1)
    if u < P_RIGHT:
        x = answer
    elif u < P_RIGHT + P_OFF_BY_ONE:
        x = answer + sign
    elif u < P_RIGHT + P_OFF_BY_ONE + P_OFF_BY_TWO:
        x = answer + 2 * sign
    else:
        x = int(rng.integers(0, 2 * MAX_OPERAND + 1))
    x = abs(x)  # answers are never negative; "-1" would not parse as a number
    y = x + 1 if rng.random() < 0.5 else abs(x - 1)
    fmt = FORMATS[int(rng.choice(len(FORMATS), p=_FORMAT_P))][0]
    text = fmt.format(x=x, y=y)
    if rng.random() < P_NO_PERIOD:
        text = text.removesuffix(" .")
    return text


def generate_pairs(n_pairs: int, seed: int = 0, noise_temperature: float = BT_TEMPERATURE) -> pd.DataFrame:
    """Seeded preference pairs (``prompt``, ``chosen``, ``rejected``) labelled with Bradley-Terry noise."""
    return preference_pairs(n_pairs, seed, noise_temperature, sample_prompt, sample_response, gold_reward)
