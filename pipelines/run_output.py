"""What ``rlhf run`` shows in the terminal: one line per asset step; everything else in a log file.

Dagster's console logger prints every event at DEBUG and the training processes print weight-
loading and progress bars: useful in a log, unreadable as the terminal view of a 10-step run.
``rlhf run`` therefore runs the job with two loggers of its own instead of the console one:
``rlhf_file`` writes the full Dagster event log to ``$RLHF_HOME/logs/<run_id>.log`` and
``rlhf_steps`` turns step events into lines such as

    [ 5/10] sft_model ................ done in 84 s (kept step 120, stopped: early_stopping)

While the job runs, file descriptors 1 and 2 of this process (which the launched training
processes inherit) point at the same log file, so nothing else reaches the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import dagster as dg
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.log_manager import get_log_record_event, has_log_record_event

from resources import settings

# Progress bars and info chatter of transformers / huggingface_hub / tqdm, in this process and
# in the training processes (they inherit the environment). setdefault: a user's choice wins.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
NAME_WIDTH = 26
# Materialization metadata worth a word on the step's line, with how to say it.
DETAILS: tuple[tuple[str, str], ...] = (
    ("n_rows", "{} rows"), ("n_valid", "{} valid"), ("n_quarantined", "{} quarantined"),
    ("count/sft_train", "{} SFT train pairs"), ("n_params", "{:,} parameters"),
    ("kept_step", "kept step {}"), ("stopped_reason", "stopped: {}"),
    ("mismatched_negatives", "mismatched negatives {}"),
    ("win_rate_gold", "gold win rate {:.2f}"), ("win_rate_heldout", "held-out RM win rate {:.2f}"),
    ("win_rate_rm", "RM win rate {:.2f}"),
    ("version", "version {}"), ("guard", "guard {}"),
)


def quiet_environment(environ: Any = os.environ) -> None:
    for key, value in QUIET_ENV.items():
        environ.setdefault(key, value)


def log_file(run_id: str) -> Path:
    path = settings.rlhf_home() / "logs" / f"{run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def asset_steps(job: dg.JobDefinition) -> list[str]:
    """Step keys of the job's asset steps in dependency order (a multi-asset is one step)."""
    layer = job.asset_layer
    graph = layer.asset_graph
    names = [graph.get(key).assets_def.node_def.name
             for key in graph.toposorted_asset_keys if key in layer.executable_asset_keys]
    return list(dict.fromkeys(names))


def _metadata_value(value: Any) -> Any:
    return getattr(value, "value", value)


def describe(metadata: Mapping[str, Any]) -> list[str]:
    """The few words of ``DETAILS`` that this metadata has."""
    words = []
    for key, template in DETAILS:
        if key in metadata:
            try:
                words.append(template.format(_metadata_value(metadata[key])))
            except (TypeError, ValueError):  # a value of another type than usual: show it plainly
                words.append(f"{key} {_metadata_value(metadata[key])}")
    return words


class StepLines:
    """Prints one line per asset step from Dagster step events, as the run goes."""

    def __init__(self, steps: Sequence[str], out: TextIO) -> None:
        self.steps, self.out = list(steps), out
        self.started: dict[str, float] = {}
        self.ended: set[str] = set()
        self.details: dict[str, list[str]] = {}
        self.retries: dict[str, int] = {}
        self.failed_checks: list[str] = []
        self.open_line: str | None = None

    def _prefix(self, step: str, started: bool = True) -> str:
        """``[ 3/10] sft_model ....`` (the index is the order of starting; ``-`` never started)."""
        index = str(list(self.started).index(step) + 1 if step in self.started else len(self.started) + 1)
        width = len(str(len(self.steps)))
        return f"[{(index if started else '-'):>{width}}/{len(self.steps)}] {(step + ' ').ljust(NAME_WIDTH, '.')} "

    def _end(self, step: str, status: str) -> None:
        if step in self.ended:
            return
        self.ended.add(step)
        prefix = "" if self.open_line == step else self._prefix(step, started=step in self.started)
        words = list(dict.fromkeys(self.details.get(step, [])))
        if self.retries.get(step):
            words.append(f"retried {self.retries[step]}x")
        self.out.write(prefix + status + (f" ({', '.join(words)})" if words else "") + "\n")
        self.out.flush()
        self.open_line = None

    def _elapsed(self, step: str) -> str:
        return f"{time.monotonic() - self.started.get(step, time.monotonic()):.0f} s"

    def handle(self, event: DagsterEvent) -> None:
        step, kind = event.step_key, event.event_type
        if kind == DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.event_specific_data
            if data is not None and not data.passed:
                self.failed_checks.append(f"{data.asset_key.to_user_string()}:{data.check_name}")
            return
        if step not in self.steps:
            return
        if kind == DagsterEventType.STEP_START and step not in self.started:
            self.started[step] = time.monotonic()
            self.out.write(self._prefix(step))  # the line ends when the step does
            self.out.flush()
            self.open_line = step
        elif kind == DagsterEventType.ASSET_MATERIALIZATION:
            meta = event.event_specific_data.materialization.metadata
            self.details.setdefault(step, []).extend(describe(meta))
        elif kind == DagsterEventType.STEP_UP_FOR_RETRY:
            self.retries[step] = self.retries.get(step, 0) + 1
        elif kind == DagsterEventType.STEP_SUCCESS:
            self._end(step, f"done in {self._elapsed(step)}")
        elif kind == DagsterEventType.STEP_FAILURE:
            error = event.event_specific_data.error if event.event_specific_data else None
            reason = error.message.strip().splitlines()[0] if error and error.message.strip() else "see the log"
            self._end(step, f"FAILED after {self._elapsed(step)}: {reason[:160]}")
        elif kind == DagsterEventType.STEP_SKIPPED:
            self._end(step, "skipped (an upstream step or blocking check failed)")

    def finish(self) -> None:
        """A line for every asset step that ended without a step event of its own."""
        for step in self.steps:
            if step not in self.ended:
                self._end(step, "interrupted" if step in self.started
                          else "not run (an upstream step or blocking check failed)")
        if self.failed_checks:
            self.out.write(f"failed checks: {', '.join(self.failed_checks)}\n")
            self.out.flush()


class _EventHandler(logging.Handler):
    def __init__(self, lines: StepLines) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        if has_log_record_event(record):
            self.lines.handle(get_log_record_event(record))


def _logger(name: str, handler: logging.Handler) -> dg.LoggerDefinition:
    logger = logging.getLogger(f"rlhf.run.{name}")
    for old in logger.handlers:  # a previous run's in this process
        old.close()
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # nothing of the run reaches the root logger's console handler
    return dg.LoggerDefinition(lambda _: logger, description=f"rlhf run: {name}")


def run_loggers(path: Path, lines: StepLines | None = None) -> dict[str, dg.LoggerDefinition]:
    """Loggers of an ``rlhf run`` job: the full event log to ``path``, step lines to ``lines``."""
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    loggers = {"rlhf_file": _logger("file", file_handler)}
    if lines is not None:
        loggers["rlhf_steps"] = _logger("steps", _EventHandler(lines))
    return loggers


def with_loggers(run_config: Mapping[str, Any], loggers: Mapping[str, dg.LoggerDefinition]) -> dict[str, Any]:
    """``run_config`` that switches ``loggers`` on: Dagster starts only the loggers the run config
    names (none named: its console logger)."""
    return {**run_config, "loggers": {**run_config.get("loggers", {}), **{name: {} for name in loggers}}}


def _terminal(stream: TextIO) -> TextIO:
    """A stream to where ``stream`` writes now, that survives fd 1 / 2 being redirected."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (pytest's capsys): keep it
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


@contextmanager
def output_to_log(path: Path, stream: TextIO | None = None) -> Iterator[TextIO]:
    """Point fds 1 and 2 (this process's and its children's output) at ``path``; yield a stream
    to the terminal. Both are restored on the way out, so a real error still reaches stderr."""
    target = stream or sys.stdout
    terminal = _terminal(target)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_streams, saved_fds = (sys.stdout, sys.stderr), [os.dup(1), os.dup(2)]
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # Python-level writes too: sys.stdout need not be fd 1 (an IDE, pytest's capture).
    log_stream = os.fdopen(os.dup(log_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = sys.stderr = log_stream
        yield terminal
    finally:
        sys.stdout, sys.stderr = saved_streams
        log_stream.close()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in (*saved_fds, log_fd):
            os.close(fd)
        if terminal is not target:  # our duplicate of the terminal's fd
            terminal.close()
