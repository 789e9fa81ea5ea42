"""The shared ``python -m ppo_core.<stage> --config FILE`` entry point."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ppo_core.callbacks import Callback, ProgressPrinter
from ppo_core.config import ConfigError, parse_cli
from ppo_core.models import ModelLoadError
from ppo_core.strategy import is_rank_zero

C = TypeVar("C")


def configure_logging() -> None:
    """ppo_core's own INFO messages (which fast path a model falls back from, and why) on
    stderr, when the caller has set up no logging; other libraries stay at WARNING."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("ppo_core").setLevel(logging.INFO)


def run_stage(
    cls: type[C], train: Callable[[C, Sequence[Callback]], Any], argv: list[str] | None,
    callbacks: Sequence[Callback], prog: str, progress_keys: Sequence[str],
) -> int:
    """Parse ``--config``, train with a progress printer on rank 0; 0 on success, 2 (and the
    message on stderr) on a bad configuration or an unloadable model, before any training."""
    configure_logging()
    try:
        cfg = parse_cli(cls, argv, prog=prog)
        progress = [ProgressPrinter(every=10, keys=progress_keys)] if is_rank_zero() else []
        train(cfg, [*progress, *callbacks])
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
