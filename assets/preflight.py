"""Gold scorers named in a run config, imported before any model trains.

A gold scorer is first called by ``evaluation_report`` (and ``round_evaluation``), after every
training stage. A typo in its ``module:function``, or a module that fails while importing,
would otherwise fail a run minutes in, with every model trained and none evaluated. ``rlhf run``
and ``rlhf rounds`` check before they launch; every training asset checks again as its first
step, which covers runs launched from the Dagster UI or a schedule, where no code of ours runs
before the first step. ``round_preferences`` checks the scorer a round will use, which may come
from the lineage's evaluation rather than the round's run config.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import dagster as dg


def gold_scorer_specs(run_config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(where, spec)`` for every gold scorer (``"module:function"``) the run config names, e.g.
    ``("evaluation_report.gold_scorer", "my_scorer:score")``; ``''`` and ``none`` name none.
    (PPO's rule-based ``reward_function`` is not a lineage option: its stages always optimise a
    trained reward model.)"""
    found = []
    for op, entry in ((run_config or {}).get("ops") or {}).items():
        config = entry.get("config") if isinstance(entry, Mapping) else None
        spec = config.get("gold_scorer") if isinstance(config, Mapping) else None
        if isinstance(spec, str) and spec.strip() and spec.strip().lower() != "none":
            found.append((f"{op}.gold_scorer", spec.strip()))
    return found


def gold_scorer_error(where: str, spec: str) -> str | None:
    """Import one ``module:function``; None when it loads, else why not, prefixed with ``where``.

    Only when the scorer's own module (or a package above it) is missing does the error say
    whether the working directory is on the import path: a dependency the module imports, or a
    syntax error in it, is a fault of the module, not of where it was looked for."""
    from ppo_core.rewards import load_function

    try:
        load_function(spec)
    except ValueError as exc:
        cause, module = exc.__cause__, spec.partition(":")[0]
        if isinstance(cause, ModuleNotFoundError) and cause.name and (
                module == cause.name or module.startswith(cause.name + ".")):
            return (f"{where}: {exc}; the working directory ({os.getcwd()}) is "
                    f"{'' if _cwd_importable() else 'not '}on the import path")
        if isinstance(cause, ImportError):
            return f"{where}: importing {spec!r} raised {type(cause).__name__}: {cause}"
        return f"{where}: {exc}"
    except Exception as exc:  # the module is found but fails while it runs: a syntax error, a raise at import
        return f"{where}: importing {spec!r} raised {type(exc).__name__}: {exc}"
    return None


def gold_scorer_errors(run_config: Mapping[str, Any] | None) -> list[str]:
    """Import every gold scorer the run config names; one line per scorer that does not import."""
    errors = (gold_scorer_error(where, spec) for where, spec in gold_scorer_specs(run_config))
    return [e for e in errors if e]


def _cwd_importable() -> bool:
    """Whether ``module:function`` specs are looked up in the working directory (``rlhf run`` puts
    it on ``sys.path``; a Dagster step process started elsewhere may not have it)."""
    cwd = os.path.realpath(os.getcwd())
    return any(os.path.realpath(entry or os.curdir) == cwd for entry in sys.path)


def fail_on_unimportable_gold_scorers(context: dg.AssetExecutionContext) -> None:
    """Fail this step, before it trains and without retries, when the run config names a gold
    scorer that does not import (a retry would import the same module again)."""
    errors = gold_scorer_errors(context.run.run_config)
    if errors:
        raise dg.Failure(
            description="this run's config names a gold scorer that does not import, so nothing was "
                        "trained: " + "; ".join(errors),
            metadata={"errors": errors}, allow_retries=False)
