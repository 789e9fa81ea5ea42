"""Generality task "facts": state what you know, say so when you do not.

Written after every default of the pipeline was fixed, and never used to choose one: it is the
suite's held-out task (BENCHMARKS.md, "A task no default was tuned on").

* Prompts ask for the colour of one to three objects: ``"what colour are the kite and the
  drum ?"``; about 3,700 distinct prompts in 6,000 pairs.
* Each object has one hidden true colour (``TRUE_COLOUR``), which no prompt states: the reward
  model and the policy can only learn the facts from which answers the labeller preferred.
* A response is short sentences, ``"the kite is red ."`` or ``"no idea about the kite ."``.
* :func:`gold_reward`, per sentence about an object the prompt asked for, the first time:
  ``+2`` for its true colour, ``-1.5`` for another colour, ``-0.5`` for saying it does not
  know (better than a wrong guess, worse than the fact); ``-1`` for an asked object mentioned
  again, ``-1.5`` for each sentence about an object the prompt did not ask about, ``-2`` for a malformed sentence; then ``-1``
  per asked object never addressed and ``-1`` without the final period. Best: every asked
  object with its true colour (2 per object).
* The labeller (:func:`sample_response`) shares a common misconception about every object
  (``MYTH``, a wrong colour): it states the myth ``P_MYTH`` of the time and the fact only
  ``P_KNOW``; otherwise it guesses a colour or, less often, says it does not know. It
  sometimes skips an asked object, adds one nobody asked about, or breaks a sentence. So the
  most likely answer in the data, which SFT learns, is the myth; the preferences, which favour
  the fact, are the only way to the truth.

Shape, against the other tasks: correctness is memorised knowledge (a hidden table of 30
facts) that imitation gets wrong, and abstaining is worth more than a confident error, so
neither length, copying nor a single good word buys reward.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.tasks.common import preference_pairs

COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
# The hidden facts: 30 objects, each with one colour (a fixed, arbitrary table).
TRUE_COLOUR: dict[str, str] = {
    "kite": "red", "drum": "blue", "boat": "white", "lamp": "yellow", "chair": "green",
    "shoe": "black", "hat": "purple", "door": "orange", "cup": "blue", "ball": "red",
    "book": "green", "car": "black", "bell": "yellow", "coat": "purple", "fence": "white",
    "flag": "orange", "glove": "red", "jar": "green", "key": "yellow", "mug": "black",
    "rope": "orange", "sock": "purple", "tent": "blue", "train": "red", "vase": "white",
    "wagon": "green", "whistle": "yellow", "box": "orange", "sled": "blue", "tray": "black",
}
OBJECTS: tuple[str, ...] = tuple(TRUE_COLOUR)
# The labeller's misconception about each object: the next colour of COLOURS after the true one.
MYTH: dict[str, str] = {o: COLOURS[(COLOURS.index(c) + 1) % len(COLOURS)] for o, c in TRUE_COLOUR.items()}
OPENERS_ONE: tuple[str, ...] = ("what colour is the {x} ?", "tell me the colour of the {x} .",
                                "which colour is the {x} ?")
OPENERS_MANY: tuple[str, ...] = ("what colour are {xs} ?", "tell me the colours of {xs} .",
                                 "which colours are {xs} ?")
# Gold reward terms (see the module docstring).
RIGHT_REWARD = 2.0
WRONG_PENALTY = 1.5
UNKNOWN_PENALTY = 0.5
REPEAT_PENALTY = 1.0
UNASKED_PENALTY = 1.5
MALFORMED_PENALTY = 2.0
UNADDRESSED_PENALTY = 1.0
MISSING_PERIOD_PENALTY = 1.0
# Calibrated so that ~7% of the pairs whose gold differs are mislabelled (tests/test_tasks.py).
BT_TEMPERATURE = 0.55
# Labeller.
P_KNOW = 0.2
P_MYTH = 0.6
P_ABSTAIN = 0.25          # of the answers that are neither
P_SKIP = 0.08             # per asked object: not addressed at all
P_EXTRA = 0.15            # per response: a sentence about an object nobody asked about
P_MALFORMED = 0.03        # per sentence stating a colour: "the kite is ." instead
P_NO_PERIOD = 0.05


def _join(objects: list[str]) -> str:
    named = [f"the {o}" for o in objects]
    return named[0] if len(named) == 1 else " , ".join(named[:-1]) + f" and {named[-1]}"


def make_prompt(objects: list[str], style: int = 0) -> str:
    if len(objects) == 1:
        return OPENERS_ONE[style % len(OPENERS_ONE)].format(x=objects[0])
    return OPENERS_MANY[style % len(OPENERS_MANY)].format(xs=_join(objects))


def parse_prompt(prompt: str) -> list[str]:
    """The objects a prompt of this task asks about, in order."""
    return [t for t in prompt.split() if t in TRUE_COLOUR]


def _sentence(words: list[str]) -> tuple[str, str | None] | None:
    """``(object, colour)`` for "the X is C", ``(object, None)`` for "no idea about the X"."""
    if len(words) == 4 and words[0] == "the" and words[1] in TRUE_COLOUR and words[2] == "is" \
            and words[3] in COLOURS:
        return words[1], words[3]
    if len(words) == 5 and words[:4] == ["no", "idea", "about", "the"] and words[4] in TRUE_COLOUR:
        return words[4], None
    return None


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    asked = parse_prompt(prompt)
    text = response.strip()
    score = 0.0 if text.endswith(".") else -MISSING_PERIOD_PENALTY
    addressed: set[str] = set()
    for part in (p.strip() for p in text.split(".")):
        if not part:
            continue
        parsed = _sentence(part.split())
        if parsed is None:
            score -= MALFORMED_PENALTY
            continue
        obj, colour = parsed
        if obj not in asked:
            score -= UNASKED_PENALTY
        elif obj in addressed:
            score -= REPEAT_PENALTY
        else:
            addressed.add(obj)
            if colour is None:
                score -= UNKNOWN_PENALTY
            elif colour == TRUE_COLOUR[obj]:
                score += RIGHT_REWARD
            else:
                score -= WRONG_PENALTY
    score -= UNADDRESSED_PENALTY * len(set(asked) - addressed)
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched gold reward, the ``module:function`` signature of ``evaluation_report.gold_scorer``."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_response(prompt: str) -> str:
    """A response with the highest gold reward for ``prompt``."""
    return " ".join(f"the {o} is {TRUE_COLOUR[o]} ." for o in dict.fromkeys(parse_prompt(prompt)))


def best_possible_reward(prompt: str) -> float:
    return gold_reward(prompt, best_response(prompt))


def sample_prompt(rng: np.random.Generator) -> tuple[str, list[str]]:
    k = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects = [OBJECTS[i] for i in rng.choice(len(OBJECTS), size=k, replace=False)]
    return make_prompt(objects, int(rng.integers(3))), objects


def sample_response(asked: list[str], rng: np.random.Generator) -> str:
    """The labeller: the myth most often, the fact less often, a guess or "no idea" otherwise."""
    sentences = []
    for obj in asked:
        if rng.random() < P_SKIP:
            continue
        u = rng.random()
        if u < P_KNOW:
            colour: str | None = TRUE_COLOUR[obj]
        elif u < P_KNOW + P_MYTH:
            colour = MYTH[obj]
        elif rng.random() < P_ABSTAIN:
            colour = None
        else:
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
        if colour is None:
            sentences.append(f"no idea about the {obj} .")
        elif rng.random() < P_MALFORMED:
            sentences.append(f"the {obj} is .")
        else:
            sentences.append(f"the {obj} is {colour} .")
    if rng.random() < P_EXTRA or not sentences:
        others = [o for o in OBJECTS if o not in asked]
        extra = others[int(rng.integers(len(others)))]
        at = int(rng.integers(len(sentences) + 1))
        sentences.insert(at, f"the {extra} is {COLOURS[int(rng.integers(len(COLOURS)))]} .")
    text = " ".join(sentences)
    return text[:-2] if rng.random() < P_NO_PERIOD else text


def generate_pairs(n_pairs: int, seed: int = 0, noise_temperature: float = BT_TEMPERATURE) -> pd.DataFrame:
    """Seeded preference pairs (``prompt``, ``chosen``, ``rejected``) labelled with Bradley-Terry noise."""
    return preference_pairs(n_pairs, seed, noise_temperature, sample_prompt, sample_response, gold_reward)
