"""The generality tasks (bench/tasks): gold rewards against hand-computed values, seeded
generation, Bradley-Terry label noise in its band, headroom above the labeller, and
``write_task`` / ``python -m bench.tasks`` writing what a new user would."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.tasks import TASKS, USER_CONFIG, gold_scorer_spec, write_task
from bench.tasks import arithmetic, constraints, facts, recipe, style
from bench.tasks.__main__ import main as tasks_cli
from bench.tasks.common import bt_preference, label_stats

N_PAIRS = 3000


@pytest.fixture(scope="module", params=sorted(TASKS))
def task(request: pytest.FixtureRequest):
    module = TASKS[request.param]
    return request.param, module, module.generate_pairs(N_PAIRS, seed=0)


# ---------------------------------------------------------------- gold rewards, by hand
LIST_PROMPT = "make a list of apple , tiger and lamp ."
NOT_PROMPT = "mention otter and spoon but not lemon please ."


@pytest.mark.parametrize("prompt, response, expected", [
    # 3 required x 1.5 + 0.5 in prompt order
    (LIST_PROMPT, "apple , tiger and lamp .", 5.0),
    (LIST_PROMPT, "apple , tiger , lamp .", 5.0),
    # a hallucinated extra costs 1; the required items are still in order
    (LIST_PROMPT, "apple , tiger , lamp and zebra .", 4.0),
    # out of order: no bonus
    (LIST_PROMPT, "tiger , apple and lamp .", 4.5),
    # apple +1.5, repeated apple -1, tiger +1.5, lamp missing (no bonus), no period -1
    (LIST_PROMPT, "apple , apple and tiger", 1.0),
    # "apple tiger" is one malformed segment (-2); lamp +1.5
    (LIST_PROMPT, "apple tiger , lamp .", -0.5),
    # not an item: malformed
    (LIST_PROMPT, "apple , tiger , lamp and stuff .", 3.0),
    # the forbidden item costs 2
    (NOT_PROMPT, "otter , lemon and spoon .", 1.5),
    (NOT_PROMPT, "otter and spoon .", 3.5),
    # empty answer: one empty (malformed) segment, no period
    (NOT_PROMPT, "", -3.0),
])
def test_constraints_gold(prompt: str, response: str, expected: float) -> None:
    assert constraints.gold_reward(prompt, response) == pytest.approx(expected)


FORMAL3 = "review the harbor in three formal words ."


@pytest.mark.parametrize("prompt, response, expected", [
    # right count +2, three formal words +3
    (FORMAL3, "refined ; orderly ; esteemed .", 5.0),
    # one segment too many: -1, and the fourth word earns nothing
    (FORMAL3, "refined ; orderly ; esteemed ; dignified .", 2.0),
    # formal +1, casual -1, neutral 0
    (FORMAL3, "refined ; cool ; good .", 2.0),
    # commas: one malformed segment (-2), count 1 of 3 (-2)
    (FORMAL3, "refined , orderly , esteemed .", -4.0),
    # no period -1, count +2, refined +1, repeat -1, orderly +1
    (FORMAL3, "refined ; refined ; orderly", 2.0),
    # two segments: -1, both formal +2
    (FORMAL3, "refined ; orderly .", 1.0),
    ("rate the lake in one casual word please .", "cozy .", 3.0),
    ("rate the lake in one casual word please .", "refined .", 1.0),
])
def test_style_gold(prompt: str, response: str, expected: float) -> None:
    assert style.gold_reward(prompt, response) == pytest.approx(expected)


SUM = "what is 3 plus 4 ?"


@pytest.mark.parametrize("prompt, response, expected", [
    (SUM, "the answer is 7 .", 3.0),
    # off by one 1.5 - 0.5
    (SUM, "the answer is 8 .", 1.0),
    (SUM, "the answer is 5 .", 0.5),
    # off by five: floored at -1
    (SUM, "the answer is 12 .", -1.0),
    # right, but "the" and "answer" missing (-1) and "it" extra (-0.5)
    (SUM, "it is 7 .", 1.5),
    # a second number -1.5, "or" -0.5
    (SUM, "the answer is 7 or 8 .", 1.0),
    (SUM, "the answer is 7", 2.0),
    # no number at all
    (SUM, "the answer is .", -2.0),
    # repetition: a second number and three extra words
    (SUM, "the answer is 7 . the answer is 7 .", 0.0),
    ("compute 12 minus 5 please ?", "the answer is 7 .", 3.0),
])
def test_arithmetic_gold(prompt: str, response: str, expected: float) -> None:
    assert arithmetic.gold_reward(prompt, response) == pytest.approx(expected)


STEW = "make a stew with leek , tofu and corn ."


@pytest.mark.parametrize("prompt, response, expected", [
    # each named ingredient once, the three best distinct manners: 2.0 + 1.9 + 1.7
    (STEW, "add the leek gently . chop the tofu carefully . stir the corn slowly .", 5.6),
    # leek +2; leek again -1; tofu and corn never used -2
    (STEW, "add the leek gently . add the leek carefully .", -1.0),
    # leek +2; rice is not named (-1.5) and repeats "gently" (-0.5); tofu +1; corn +0
    (STEW, "add the leek gently . add the rice gently . add the tofu quickly . add the corn sloppily .", 1.0),
    # no manner: malformed (-2, leek unused -1); tofu +1.7; corn +2; no final period -1
    (STEW, "add the leek . stir the tofu slowly . add the corn gently", -0.3),
    # nothing: no period, three named ingredients unused
    (STEW, "", -4.0),
])
def test_recipe_gold(prompt: str, response: str, expected: float) -> None:
    assert recipe.gold_reward(prompt, response) == pytest.approx(expected)
    assert recipe.parse_prompt(prompt) == ["leek", "tofu", "corn"]


KITE_DRUM = "what colour are the kite and the drum ?"   # kite is red, drum is blue


@pytest.mark.parametrize("prompt, response, expected", [
    (KITE_DRUM, "the kite is red . the drum is blue .", 4.0),
    # a wrong colour (-1.5) costs more than saying so (-0.5)
    (KITE_DRUM, "the kite is red . the drum is green .", 0.5),
    (KITE_DRUM, "the kite is red . no idea about the drum .", 1.5),
    # kite +2; kite again -1; an object nobody asked about -1.5; drum never addressed -1
    (KITE_DRUM, "the kite is red . the kite is red . the boat is white .", -1.5),
    # malformed (-2, and the kite then unaddressed -1); drum +2; no final period -1
    (KITE_DRUM, "the kite is . the drum is blue", -2.0),
    ("tell me the colour of the boat .", "", -2.0),
])
def test_facts_gold(prompt: str, response: str, expected: float) -> None:
    assert facts.gold_reward(prompt, response) == pytest.approx(expected)
    assert facts.best_possible_reward(prompt) == pytest.approx(2.0 * len(facts.parse_prompt(prompt)))


def test_bt_preference() -> None:
    assert bt_preference(1.0, 1.0, 0.5) == pytest.approx(0.5)
    assert bt_preference(1.0, 0.0, 0.5) == pytest.approx(1 / (1 + 2.718281828459045 ** -2))
    assert bt_preference(-500.0, 500.0, 0.1) == pytest.approx(0.0)  # no overflow


# ---------------------------------------------------------------- generation
def test_seeded(task) -> None:
    name, module, pairs = task
    again = module.generate_pairs(N_PAIRS, seed=0)
    pd.testing.assert_frame_equal(pairs, again)
    assert not pairs.equals(module.generate_pairs(N_PAIRS, seed=1))
    assert list(pairs.columns) == ["prompt", "chosen", "rejected"]


def test_nothing_for_validation_to_quarantine(task) -> None:
    _, _, pairs = task
    assert (pairs["chosen"] != pairs["rejected"]).all()
    assert not pairs.duplicated().any()
    assert (pairs["prompt"].str.strip() != "").all()


def test_many_prompts_and_diverse_short_texts(task) -> None:
    _, _, pairs = task
    assert pairs["prompt"].nunique() >= 300
    responses = pd.concat([pairs["chosen"], pairs["rejected"]], ignore_index=True)
    assert responses.nunique() >= 300
    # sized for a tiny model: prompts < ~40 tokens, responses < ~32 (a word is 1-3 BPE tokens);
    # recipe answers reach 25 words, as the bundled task's do (five five-word sentences)
    assert pairs["prompt"].str.split().str.len().max() <= 20
    assert responses.str.split().str.len().max() <= 25


def test_label_noise_in_band(task) -> None:
    _, _, pairs = task
    stats = label_stats(pairs, task[1].gold_score_batch)
    assert 0.04 <= stats["mislabelled_frac"] <= 0.10, stats


def test_headroom(task) -> None:
    """Chosen beats rejected on average, but SFT on chosen would imitate text far below the best."""
    _, module, pairs = task
    stats = label_stats(pairs, module.gold_score_batch)
    best = sum(module.best_possible_reward(p) for p in pairs["prompt"]) / len(pairs)
    assert stats["chosen_gold_mean"] > stats["rejected_gold_mean"] + 1.0, stats
    assert stats["chosen_gold_mean"] < best - 1.5, (stats, best)


def test_best_response_is_best(task) -> None:
    _, module, pairs = task
    head = pairs.head(500)
    for prompt, c, r in head.itertuples(index=False):
        best = module.best_possible_reward(prompt)
        assert module.gold_reward(prompt, c) <= best and module.gold_reward(prompt, r) <= best


def test_gold_score_batch_is_deterministic(task) -> None:
    _, module, pairs = task
    prompts, responses = pairs["prompt"].tolist()[:200], pairs["chosen"].tolist()[:200]
    scores = module.gold_score_batch(prompts, responses)
    assert scores == module.gold_score_batch(prompts, responses)
    assert all(isinstance(s, float) for s in scores)


# ---------------------------------------------------------------- write_task / CLI
def _without_changed(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    del config["ops"]["raw_preferences"]["config"]["source"]
    del config["ops"]["evaluation_report"]["config"]["gold_scorer"]
    return config


def test_write_task(tmp_path: Path) -> None:
    config_path = write_task("arithmetic", tmp_path / "arith", n_pairs=40, seed=3)
    pairs_path = tmp_path / "arith" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows == arithmetic.generate_pairs(40, seed=3).to_dict(orient="records")
    config = yaml.safe_load(config_path.read_text())
    assert config["ops"]["raw_preferences"]["config"]["source"] == str(pairs_path.resolve())
    assert config["ops"]["evaluation_report"]["config"]["gold_scorer"] == gold_scorer_spec("arithmetic")
    # every other value is the user config's as it is now
    assert _without_changed(config) == _without_changed(yaml.safe_load(USER_CONFIG.read_text()))


def test_write_task_follows_the_base_config(tmp_path: Path) -> None:
    base = yaml.safe_load(USER_CONFIG.read_text())
    base["ops"]["sft_model"]["config"]["steps"] = 7
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base))
    config = yaml.safe_load(write_task("style", tmp_path / "s", n_pairs=10, base_config=base_path).read_text())
    assert config["ops"]["sft_model"]["config"]["steps"] == 7


def test_write_task_rejects_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        write_task("poetry", tmp_path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tasks_cli(["constraints", "--out", str(tmp_path / "c"), "--n-pairs", "25", "--seed", "2"]) == 0
    assert len((tmp_path / "c" / "pairs.jsonl").read_text().splitlines()) == 25
    assert (tmp_path / "c" / "config.yaml").is_file()
    assert "rlhf run --config" in capsys.readouterr().out
