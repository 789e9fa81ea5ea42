"""ppo_core is a library: importing every module must not pull in dagster, mlflow or pandera."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import ppo_core

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("dagster", "dagster_pipes", "mlflow", "pandera")


def test_ppo_core_never_imports_orchestration_packages() -> None:
    modules = sorted(f"ppo_core.{m.name}" for m in pkgutil.iter_modules(ppo_core.__path__))
    assert {"ppo_core.sft", "ppo_core.reward", "ppo_core.strategy", "ppo_core.models"} <= set(modules)
    # A fresh interpreter: this pytest process may already have dagster loaded by other tests.
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    leaked = json.loads(proc.stdout.strip().splitlines()[-1])
    assert leaked == [], f"ppo_core imported {leaked}"
