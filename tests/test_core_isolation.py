"""ppo_core is a library: importing every module must not pull in dagster, mlflow or pandera."""

from __future__ import annotations

import ast
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


def _project_imports(package: str) -> dict[str, set[str]]:
    """Top-level project packages each module of ``package`` imports, lazy imports included."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names & set(LAYERS)
    return found


# Each layer imports only the layers after it: the wiring (Definitions, jobs, automation, CLI)
# imports assets, ops and resources; assets and ops share settings and resources through
# ``resources``; ``ppo_core`` imports none of them.
LAYERS = ("pipelines", "assets", "ops", "resources", "ppo_core")
ALLOWED = {
    "assets": {"assets", "ops", "resources", "ppo_core"},
    "ops": {"ops", "resources", "ppo_core"},
    "resources": {"resources", "ppo_core"},
    "ppo_core": {"ppo_core"},
}


def test_layers_import_only_downwards() -> None:
    offenders = {
        module: sorted(names - ALLOWED[package])
        for package in ALLOWED
        for module, names in _project_imports(package).items()
        if names - ALLOWED[package]
    }
    assert offenders == {}
    # The scan sees what the layers really import (guards against a scan that finds nothing).
    assert "resources" in _project_imports("assets")["assets/models.py"]
    assert "ops" in _project_imports("pipelines")["pipelines/automation.py"]
