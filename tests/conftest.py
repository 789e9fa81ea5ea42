"""Shared pytest fixtures: an isolated RLHF_HOME / DAGSTER_HOME and the data fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# `pytest` (unlike `python -m pytest`) does not put the checkout on sys.path.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_HH_FILE = Path("data") / "hh-rlhf" / "harmless-base-test-first1500.jsonl.gz"


def _find_hh_sample() -> Path:
    """The real HH-RLHF sample in the read-only ``shared/`` folder beside the checkout
    (``RLHF_SHARED_DIR`` overrides; /work/shared is where this workplace keeps it)."""
    import os

    candidates = [Path(os.environ["RLHF_SHARED_DIR"])] if os.environ.get("RLHF_SHARED_DIR") else []
    candidates += [REPO_ROOT.parent / "shared", Path("/work/shared")]
    for root in candidates:
        if (root / _HH_FILE).is_file():
            return root / _HH_FILE
    return candidates[0] / _HH_FILE


HH_SAMPLE = _find_hh_sample()


@pytest.fixture
def rlhf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh RLHF_HOME (and DAGSTER_HOME inside it) so tests never touch the real state."""
    home = tmp_path / "rlhf_home"
    (home / "dagster_home").mkdir(parents=True)
    monkeypatch.setenv("RLHF_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster_home"))
    monkeypatch.delenv("RLHF_LANDING_DIR", raising=False)
    return home


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def hh_sample() -> Path:
    if not HH_SAMPLE.exists():
        pytest.skip(f"HH-RLHF sample not found at {HH_SAMPLE}")
    return HH_SAMPLE


# An engine test earlier in the session sets the single-process rendezvous variables
# (MASTER_PORT ...) in os.environ and still listens on that port; a benchmark started as a
# fresh top-level run must pick its own.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run_bench_script(args: Sequence[str], timeout: int, drop: Sequence[str] = (),
                     **env: str) -> subprocess.CompletedProcess:
    """``python <args>`` from the checkout with the rendezvous variables (and ``drop``) removed
    from the environment, TRL's experimental warning and tokenizer threads silenced, ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k not in drop}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        env={**clean, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", **env})


@pytest.fixture(autouse=True)
def _dagster_contexts_are_closed() -> Iterator[None]:
    """Fail the test that leaves a Dagster instance entered.

    Entering a ``DagsterInstance`` sets its defs-state storage in a context variable, and a
    ``build_*_context(instance=...)`` used without ``with`` enters one that is never exited.
    When the garbage collector later closes it, the variable is reset to the storage that was
    current when it was entered, whose instance is gone by then, and the next Definitions
    load in this process fails with "Attempted to resolve undefined DagsterInstance weakref",
    in whichever test happens to be running. So every entry made during a test must be exited
    by its end: use ``with dg.build_sensor_context(...) as context:``. A failing test's
    entries are exited here, last first, so the leak cannot surface in a later test."""
    from dagster._core.storage.defs_state import base

    enter = base.set_defs_state_storage
    open_entries: list[Tracked] = []

    class Tracked:
        """``set_defs_state_storage(storage)``, exited at most once (here or by its owner)."""

        def __init__(self, storage: object) -> None:
            self.inner = enter(storage)

        def __enter__(self) -> None:
            self.inner.__enter__()
            open_entries.append(self)

        def __exit__(self, *exc: object) -> None:
            if self in open_entries:
                open_entries.remove(self)
                self.inner.__exit__(*exc)

    token = base._current_storage.set(base._current_storage.get())
    base.set_defs_state_storage = Tracked  # DagsterInstance.__enter__ imports it at each call
    try:
        yield
    finally:
        base.set_defs_state_storage = enter
        leaked = len(open_entries)
        for entry in reversed(list(open_entries)):
            entry.__exit__(None, None, None)
        base._current_storage.reset(token)
    assert not leaked, (f"{leaked} Dagster instance(s) entered and never exited: "
                        "build the context with `with dg.build_..._context(...) as context:`")


@contextmanager
def env_vars(**values: str | None) -> Iterator[None]:
    """Set (None: unset) environment variables, then restore them: for module-scoped fixtures,
    which cannot use ``monkeypatch``."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
