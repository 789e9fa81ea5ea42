"""The generality suite: preference tasks of different shapes, each with a known gold reward.

Each task module (``constraints``, ``style``, ``arithmetic``, ``recipe``, ``facts``; see their
docstrings) is a seeded generator of TRL-format pairs labelled with Bradley-Terry noise on a
gold reward:

    generate_pairs(n_pairs, seed=0, noise_temperature=BT_TEMPERATURE) -> DataFrame  # prompt, chosen, rejected
    gold_score_batch(prompts, responses) -> list[float]   # the evaluation_report.gold_scorer signature

:func:`write_task` writes a task the way a user brings their own data: a JSONL file and a copy
of ``configs/user_dataset.yaml`` pointing at it. ``bench/generality.py`` runs the suite.

    python -m bench.tasks constraints --out /tmp/constraints    # then: rlhf run --config /tmp/constraints/config.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import yaml

from bench.tasks import arithmetic, constraints, facts, recipe, style

REPO_ROOT = Path(__file__).resolve().parents[2]
USER_CONFIG = REPO_ROOT / "configs" / "user_dataset.yaml"
TASKS: dict[str, ModuleType] = {"constraints": constraints, "style": style, "arithmetic": arithmetic,
                                "recipe": recipe, "facts": facts}


def gold_scorer_spec(name: str) -> str:
    """The ``module:function`` string of a task's gold scorer (importable with the repo on PYTHONPATH)."""
    return f"bench.tasks.{name}:gold_score_batch"


def task_config(name: str, source: Path, base_config: Path = USER_CONFIG) -> dict:
    """``base_config`` with only ``raw_preferences.source`` and ``evaluation_report.gold_scorer`` changed."""
    config = yaml.safe_load(base_config.read_text())
    ops = config["ops"]
    ops["raw_preferences"].setdefault("config", {})["source"] = str(source)
    ops["evaluation_report"].setdefault("config", {})["gold_scorer"] = gold_scorer_spec(name)
    return config


def write_task(name: str, out_dir: str | Path, n_pairs: int = 6000, seed: int = 0,
               base_config: Path = USER_CONFIG) -> Path:
    """Write ``<out_dir>/pairs.jsonl`` and ``<out_dir>/config.yaml``; returns the config's path.

    The config is ``configs/user_dataset.yaml`` as it is now (its budgets change over time),
    with ``source`` set to the absolute path of the pairs and ``gold_scorer`` to the task's:
    the two values a new user edits.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pairs = TASKS[name].generate_pairs(n_pairs, seed=seed)
    source = out / "pairs.jsonl"
    with source.open("w") as f:
        for row in pairs.to_dict(orient="records"):
            f.write(json.dumps(row) + "\n")
    config_path = out / "config.yaml"
    header = (f"# {base_config.name} with source and gold_scorer set for the generality task {name!r}\n"
              f"# ({n_pairs} pairs, seed {seed}); written by bench.tasks.write_task.\n")
    config_path.write_text(header + yaml.safe_dump(task_config(name, source, base_config), sort_keys=False))
    return config_path
