"""Generality task "style": answer in exactly the requested number of words, in the requested register.

* Prompts ask for a count (one to four) of words of a register (``formal`` or ``casual``)
  about a place or event: ``"review the harbor in three formal words please ."``;
  1,280 distinct prompts.
* A response is the words separated by ``;`` with a final period: ``"refined ; orderly ; esteemed ."``.
* :func:`gold_reward`: ``+2`` when the number of ``;``-segments equals the requested count,
  otherwise ``-1`` per segment too many or too few. For each of the first ``count`` segments:
  ``+1`` for a word of the requested register, ``0`` for a neutral word, ``-1`` for a word of
  the other register; ``-1`` for a repeated word anywhere, ``-2`` for a malformed segment (empty,
  two words, a comma-separated list, an unknown word), ``-1`` without the final period.
  Best: ``count`` distinct words of the register, ``2 + count`` (3 to 6). Length cannot buy
  reward: past the requested count every segment costs 1; the topic does not matter.
* The labeller (:func:`sample_response`) gets the count right ``P_RIGHT_COUNT`` of the time,
  picks the requested register 40% of the time, the other one 25%, a neutral word otherwise
  (with replacement, so repeats happen), and sometimes uses commas instead of ``;``.

Shape, against the bundled task and the constraints task: a format / style preference that
is a function of the prompt's instructions (count and register), not of its content words.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.tasks.common import preference_pairs

TOPICS: tuple[str, ...] = (
    "harbor", "meeting", "garden", "market", "concert", "museum", "village", "station",
    "kitchen", "festival", "bridge", "castle", "office", "island", "school", "theater",
    "valley", "hotel", "park", "lake",
)
REGISTERS: dict[str, tuple[str, ...]] = {
    "formal": ("distinguished", "exemplary", "commendable", "refined", "dignified", "esteemed",
               "orderly", "courteous"),
    "casual": ("cool", "awesome", "chill", "neat", "fun", "comfy", "cozy", "handy"),
}
NEUTRAL: tuple[str, ...] = ("good", "nice", "fine", "big", "small", "busy")
COUNTS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
OPENERS: tuple[str, ...] = ("describe", "sum up", "review", "rate")
CLOSERS: tuple[str, ...] = (".", "please .")
SEPARATOR = ";"
# Gold reward terms (see the module docstring).
COUNT_BONUS = 2.0
COUNT_PENALTY = 1.0       # per segment too many or too few
REGISTER_REWARD = 1.0     # +1 requested register, -1 the other one
REPEAT_PENALTY = 1.0
MALFORMED_PENALTY = 2.0
MISSING_PERIOD_PENALTY = 1.0
# Calibrated so that ~7% of the pairs whose gold differs are mislabelled (tests/test_tasks.py).
BT_TEMPERATURE = 0.7
# Labeller: mostly mediocre answers.
P_RIGHT_COUNT = 0.45
COUNT_ERRORS = (-2, -1, 1, 2)
COUNT_ERROR_PROBS = (0.15, 0.35, 0.35, 0.15)
P_REQUESTED = 0.4         # a word of the requested register ...
P_OTHER = 0.25            # ... of the other register; neutral otherwise
P_MALFORMED = 0.03        # per segment
P_COMMAS = 0.05           # commas instead of ";" in the whole answer
P_NO_PERIOD = 0.05

_REGISTER_OF = {w: r for r, words in REGISTERS.items() for w in words}
_KNOWN = frozenset(_REGISTER_OF) | frozenset(NEUTRAL)


def make_prompt(topic: str, count: int, register: str, opener: str = OPENERS[0],
                closer: str = CLOSERS[0]) -> str:
    word = next(w for w, n in COUNTS.items() if n == count)
    noun = "word" if count == 1 else "words"
    return f"{opener} the {topic} in {word} {register} {noun} {closer}"


def parse_prompt(prompt: str) -> tuple[int, str]:
    """(requested count, requested register) of a prompt of this task."""
    tokens = prompt.split()
    count = next((COUNTS[t] for t in tokens if t in COUNTS), 1)
    register = next((t for t in tokens if t in REGISTERS), "formal")
    return count, register


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    count, register = parse_prompt(prompt)
    text = response.strip()
    ended = text.endswith(".")
    body = text[:-1] if ended else text
    parts = [p.strip() for p in body.split(SEPARATOR)]
    score = 0.0 if ended else -MISSING_PERIOD_PENALTY
    score += COUNT_BONUS if len(parts) == count else -COUNT_PENALTY * abs(len(parts) - count)
    seen: set[str] = set()
    for i, part in enumerate(parts):
        if part not in _KNOWN:
            score -= MALFORMED_PENALTY
            continue
        if part in seen:
            score -= REPEAT_PENALTY
            continue
        seen.add(part)
        if i < count and part in _REGISTER_OF:
            score += REGISTER_REWARD if _REGISTER_OF[part] == register else -REGISTER_REWARD
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched gold reward, the ``module:function`` signature of ``evaluation_report.gold_scorer``."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward for ``prompt``."""
    count, register = parse_prompt(prompt)
    return f" {SEPARATOR} ".join(REGISTERS[register][:count]) + " ."


def best_possible_reward(prompt: str) -> float:
    return gold_reward(prompt, best_response(prompt))


def sample_prompt(rng: np.random.Generator) -> tuple[str, tuple[int, str]]:
    t, c, r, o, e = rng.integers(0, [len(TOPICS), len(COUNTS), len(REGISTERS), len(OPENERS), len(CLOSERS)])
    count, register = int(c) + 1, tuple(REGISTERS)[int(r)]
    return make_prompt(TOPICS[t], count, register, OPENERS[o], CLOSERS[e]), (count, register)


def _word(register: str, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < P_REQUESTED:
        pool = REGISTERS[register]
    elif u < P_REQUESTED + P_OTHER:
        pool = REGISTERS["casual" if register == "formal" else "formal"]
    else:
        pool = NEUTRAL
    return pool[int(rng.integers(len(pool)))]


def sample_response(spec: tuple[int, str], rng: np.random.Generator) -> str:
    """The labeller policy: roughly the right count, a mix of registers (see the module docstring)."""
    count, register = spec
    n = count if rng.random() < P_RIGHT_COUNT else count + int(rng.choice(COUNT_ERRORS, p=COUNT_ERROR_PROBS))
    n = max(1, n)
    words = []
    for _ in range(n):
        w = _word(register, rng)
        if rng.random() < P_MALFORMED:
            w = f"{w} {_word(register, rng)}"  # two words in one segment
        words.append(w)
    sep = " , " if rng.random() < P_COMMAS else f" {SEPARATOR} "
    text = sep.join(words)
    if rng.random() >= P_NO_PERIOD:
        text += " ."
    return text


def generate_pairs(n_pairs: int, seed: int = 0, noise_temperature: float = BT_TEMPERATURE) -> pd.DataFrame:
    """Seeded preference pairs (``prompt``, ``chosen``, ``rejected``) labelled with Bradley-Terry noise."""
    return preference_pairs(n_pairs, seed, noise_temperature, sample_prompt, sample_response, gold_reward)
