"""The bundled task: a seeded preference-data generator with a known gold reward.

Real RLHF data has no ground truth, so nothing downstream of the reward model can be
measured. This task has one. It is the embedded default of the pipeline and the yardstick
for every stage:

* Prompts ask about one of ``TOPICS`` in one of many phrasings (``OPENERS`` x ``CLOSERS``),
  e.g. ``"describe the river please ."``; 360 distinct prompts, so hash splits keep every
  topic in every split while no prompt text is shared between splits.
* Responses are 1-5 short sentences ``"the <topic> is <adjective> ."`` (sometimes about
  another topic), written by a noisy "labeller" policy ``sample_response``.
* :func:`gold_reward` scores a response. Each adjective has a hidden quality in [-1, 1]
  (``ADJECTIVE_QUALITY``). Per sentence (the first ``MAX_USEFUL_SENTENCES`` only):
  ``+1 + quality`` when it is about the prompt's topic, ``-1`` when it is off topic.
  Then ``-1`` per repeated adjective, ``-0.5`` per sentence past ``MAX_USEFUL_SENTENCES``,
  ``-2`` per malformed sentence and ``-1`` when the text does not end with ``"."``.
  The best response is three on-topic sentences with the three best distinct adjectives
  (gold 5.85); length alone or any single token does not buy reward.
* Preferences are sampled from the gold reward with Bradley-Terry noise:
  ``P(a preferred over b) = sigmoid((gold(a) - gold(b)) / BT_TEMPERATURE)``.
* The labeller rarely uses good adjectives (sampling weight falls with quality), so the
  ``chosen`` responses are better than average but far from the best: SFT on ``chosen``
  leaves headroom that only the reward model and PPO can recover.
* About 4% of the labeller's sentences are broken (``"the river is ."``); the gold reward
  charges -2 for each, so the reward model learns what malformed text is worth.
* A small fraction of rows are corrupted the way scraped data is (empty text, identical
  pair, exact duplicate) so the quarantine path runs on the default too.

The gold function is for evaluation only: no training stage imports it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

TOPICS: tuple[str, ...] = (
    "river", "garden", "robot", "coffee", "ocean", "library",
    "forest", "city", "train", "winter", "music", "mountain",
)
# Hidden adjective quality in [-1, 1]; the generator samples good ones rarely.
ADJECTIVE_QUALITY: dict[str, float] = {
    "wonderful": 1.0, "brilliant": 0.95, "delightful": 0.9, "gorgeous": 0.85,
    "lovely": 0.7, "charming": 0.6, "pleasant": 0.45, "nice": 0.3,
    "fine": 0.15, "okay": 0.0, "plain": -0.1, "ordinary": -0.2,
    "quiet": -0.25, "small": -0.3, "old": -0.35, "busy": -0.4,
    "cold": -0.5, "dull": -0.6, "boring": -0.7, "messy": -0.75,
    "ugly": -0.85, "awful": -0.9, "terrible": -0.95, "horrible": -1.0,
}
MAX_USEFUL_SENTENCES = 3
BT_TEMPERATURE = 0.35
OPENERS: tuple[str, ...] = (
    "tell me about", "describe", "what do you think of", "say something about",
    "give me your view of", "talk about",
)
CLOSERS: tuple[str, ...] = (".", "please .", "today .", "for me .", "briefly .")
# Sampling weight of an adjective falls with its quality: exp(-ADJ_SKEW * quality).
ADJ_SKEW = 1.5
ON_TOPIC_PROB = 0.75
# Labellers sometimes write broken sentences ("the river is .", "the river nice ."); the gold
# reward punishes them, so the reward model learns to as well and PPO cannot drift into them.
MALFORMED_PROB = 0.04

_SENTENCE = re.compile(r"^the (\w+) is (\w+)$")
_PROMPT = re.compile(r"\bthe (\w+)\b")


def make_prompt(topic: str, opener: str = "tell me about", closer: str = ".") -> str:
    return f"{opener} the {topic} {closer}"


def all_prompts() -> list[str]:
    """Every distinct prompt of the task (360)."""
    return [make_prompt(t, o, c) for t in TOPICS for o in OPENERS for c in CLOSERS]


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about, or None when the prompt is not of this task."""
    m = _PROMPT.search(prompt)
    return m.group(1) if m and m.group(1) in TOPICS else None


def gold_reward(prompt: str, response: str) -> float:
    """Ground-truth score of ``response`` to ``prompt`` (see the module docstring)."""
    topic = prompt_topic(prompt)
    text = response.strip()
    score = 0.0
    if not text.endswith("."):
        score -= 1.0
    parts = [p.strip() for p in text.split(".")]
    parts = [p for p in parts if p]
    seen: set[str] = set()
    for i, part in enumerate(parts):
        m = _SENTENCE.match(part)
        if m is None or m.group(2) not in ADJECTIVE_QUALITY:
            score -= 2.0
            continue
        noun, adj = m.groups()
        if adj in seen:
            score -= 1.0
        seen.add(adj)
        if i >= MAX_USEFUL_SENTENCES:
            score -= 0.5
            continue
        score += (1.0 + ADJECTIVE_QUALITY[adj]) if noun == topic else -1.0
    return score


def gold_score_batch(prompts: list[str], responses: list[str]) -> list[float]:
    """Batched form with the ``module:function`` signature the pipeline uses for scorers."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses)]


def best_possible_reward() -> float:
    top = sorted(ADJECTIVE_QUALITY.values(), reverse=True)[:MAX_USEFUL_SENTENCES]
    return sum(1.0 + q for q in top)


_ADJECTIVES: tuple[str, ...] = tuple(ADJECTIVE_QUALITY)
# Cumulative sampling weights, computed once: inverse-CDF sampling with searchsorted is ~50x
# cheaper than rng.choice(p=...) per draw, which dominated data generation.
_ADJ_CDF = np.cumsum([math.exp(-ADJ_SKEW * ADJECTIVE_QUALITY[a]) for a in _ADJECTIVES])
_ADJ_CDF /= _ADJ_CDF[-1]


_MALFORMED = ("the {noun} is .", "the {noun} {adj} .", "the {noun} is {adj} {adj} .", "{adj} the {noun} is .")


def sample_response(topic: str, rng: np.random.Generator) -> str:
    """The labeller policy: 1-5 sentences, mostly on topic, adjectives skewed to mediocre."""
    n = int(rng.integers(1, 6))
    u = rng.random((n, 5))
    sentences = []
    for on_topic, other, pick, broken, how in u:
        noun = topic if on_topic < ON_TOPIC_PROB else TOPICS[int(other * len(TOPICS))]
        adj = _ADJECTIVES[min(int(np.searchsorted(_ADJ_CDF, pick, side="right")), len(_ADJECTIVES) - 1)]
        if broken < MALFORMED_PROB:
            sentences.append(_MALFORMED[int(how * len(_MALFORMED))].format(noun=noun, adj=adj))
        else:
            sentences.append(f"the {noun} is {adj} .")
    return " ".join(sentences)


def generate_preferences(
    n_pairs: int = 4000, seed: int = 0, corrupt_fraction: float = 0.02
) -> pd.DataFrame:
    """Seeded preference pairs in TRL's explicit format.

    Columns: ``id``, ``prompt``, ``chosen``, ``rejected``, ``source``. Labels come from a
    Bradley-Terry draw on the gold reward, so some pairs are (realistically) mislabelled.
    ``corrupt_fraction`` of the rows are damaged on purpose (empty ``chosen``, identical
    pair, or an exact duplicate row) to exercise validation; 0 disables it.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs):
        t, o, c = rng.integers(0, [len(TOPICS), len(OPENERS), len(CLOSERS)])
        topic = TOPICS[t]
        prompt = make_prompt(topic, OPENERS[o], CLOSERS[c])
        a, b = sample_response(topic, rng), sample_response(topic, rng)
        while b == a:
            b = sample_response(topic, rng)
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / BT_TEMPERATURE))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        rows.append({"id": f"bundled-{seed}-{i:06d}", "prompt": prompt, "chosen": chosen,
                     "rejected": rejected, "source": "bundled"})
    n_bad = int(round(corrupt_fraction * n_pairs))
    for j, idx in enumerate(rng.choice(n_pairs, size=n_bad, replace=False)):
        kind = j % 3
        if kind == 0:
            rows[idx]["chosen"] = "   "
        elif kind == 1:
            rows[idx]["rejected"] = rows[idx]["chosen"]
        else:
            dup = dict(rows[int(rng.integers(n_pairs))])
            rows.append(dup)
    return pd.DataFrame(rows, columns=["id", "prompt", "chosen", "rejected", "source"])
