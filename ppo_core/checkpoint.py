"""Full, self-describing, atomic checkpoints (nanoGPT's self-describing dict, on disk).

Layout of ``<output_dir>/checkpoints/step_<N>/``::

    trainer_state.json          step, stage, data position, config, world size, versions,
                                engine names, and any engine extras (e.g. the KL controller)
    <engine name>/state/...     DeepSpeed engine state: model, optimizer, LR scheduler
    rng_state_rank<R>.pt        torch (and CUDA) RNG states of rank R (torch.save of tensors only,
                                read back with weights_only=True)
    rng_state_rank<R>.json      python ``random`` and numpy RNG states of rank R

Every rank writes into ``step_<N>.tmp-<id>`` (the id is chosen on rank 0 and broadcast); after
a barrier rank 0 renames it to ``step_<N>``. A crash mid-write leaves only a ``.tmp-`` dir,
which :func:`find_latest_checkpoint` ignores.
"""

from __future__ import annotations

import json
import platform
import random
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppo_core.strategy import DeepSpeedStrategy, replace_dir

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor states for torch.save, JSON-able python/numpy states) of this process."""
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    strategy: DeepSpeedStrategy,
    root: str | Path,
    step: int,
    engines: Mapping[str, Any],
    *,
    stage: str,
    config: Mapping[str, Any],
    data_position: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``<root>/step_<step>`` atomically; every rank must call it. Returns the path.

    ``engines``: trainable DeepSpeed engines by name (``{"model": engine}`` or ``{"actor": ...,
    "critic": ...}``). ``data_position``: what the sampler needs to resume (JSON-able).
    ``extra``: other JSON-able state (e.g. ``{"kl_controller": {...}}``). ``keep_last``: prune
    older ``step_*`` dirs to this many (None keeps all).
    """
    root = Path(root)
    final = root / f"step_{step}"
    tmp = Path(strategy.broadcast_object(str(root / f"step_{step}.tmp-{uuid.uuid4().hex[:8]}")))
    if strategy.is_rank_zero():
        tmp.mkdir(parents=True, exist_ok=False)
    strategy.barrier()
    for name, engine in engines.items():
        strategy.save_engine_state(engine, tmp / name)
    tensors, plain = capture_rng_state()
    rank = strategy.rank
    torch.save(tensors, tmp / f"rng_state_rank{rank}.pt")
    (tmp / f"rng_state_rank{rank}.json").write_text(json.dumps(plain), encoding="utf-8")
    if strategy.is_rank_zero():
        state = {
            "format_version": FORMAT_VERSION,
            "stage": stage,
            "step": step,
            "data_position": dict(data_position),
            "engines": sorted(engines),
            "world_size": strategy.world_size,
            "zero_stage": strategy.cfg.zero_stage,
            "config": dict(config),
            "extra": dict(extra or {}),
            "versions": _versions(),
            "created_unix": time.time(),
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    strategy.barrier()
    if strategy.is_rank_zero():
        replace_dir(tmp, final)
        if keep_last is not None:
            prune_checkpoints(root, keep_last)
    strategy.barrier()
    return final


def load_checkpoint(strategy: DeepSpeedStrategy, path: str | Path, engines: Mapping[str, Any]) -> dict[str, Any]:
    """Restore engines and this rank's RNG states from ``path``; returns ``trainer_state.json``.

    Must be called after the engines are built with the same shapes and world size.
    """
    path = Path(path)
    state = read_trainer_state(path)
    if state["world_size"] != strategy.world_size:
        raise ValueError(
            f"checkpoint {path} was written with world_size={state['world_size']}, this run has "
            f"{strategy.world_size}: resume with the same number of ranks or set resume_from to null"
        )
    # each ZeRO stage has its own on-disk layout (stage 3 also partitions the weights per rank),
    # which DeepSpeed cannot read under another stage
    saved_stage = state.get("zero_stage")
    if saved_stage is not None and saved_stage != strategy.cfg.zero_stage:
        raise ValueError(
            f"checkpoint {path} was written with zero_stage={saved_stage}, this run has "
            f"{strategy.cfg.zero_stage}: resume with the same ZeRO stage or set resume_from to null"
        )
    missing = sorted(set(engines) - set(state["engines"]))
    if missing:
        raise ValueError(f"checkpoint {path} has no state for {missing}; it holds {state['engines']}")
    for name, engine in engines.items():
        strategy.load_engine_state(engine, path / name)
    rank = strategy.rank
    tensors = torch.load(path / f"rng_state_rank{rank}.pt", weights_only=True)
    plain = json.loads((path / f"rng_state_rank{rank}.json").read_text(encoding="utf-8"))
    restore_rng_state(tensors, plain)
    return state


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint dir, with a clear error when it is not one."""
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {TRAINER_STATE} is missing")
    return json.loads(file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- discovery


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete ``step_<N>`` dirs under ``root``, oldest first (``.tmp-`` dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume_from: str | None, checkpoint_root: str | Path) -> Path | None:
    """Turn a ``resume_from`` config value into a checkpoint dir (or None = start fresh).

    ``None``/``""``: fresh. ``"latest"``: newest complete checkpoint under ``checkpoint_root``,
    fresh when there is none. Anything else: a checkpoint path that must exist.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        return find_latest_checkpoint(checkpoint_root)
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(
            f"resume_from={resume_from!r} is not a checkpoint directory (no {TRAINER_STATE}); "
            f"use 'latest', null, or a path like <output_dir>/checkpoints/step_<N>"
        )
    return path


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    ckpts = list_checkpoints(root)
    for p in ckpts[: max(len(ckpts) - max(keep_last, 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)


def _versions() -> dict[str, str]:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency of the engines
        pass
    return versions


def finish_run(strategy: DeepSpeedStrategy, out_dir: Path, summary: dict[str, Any], callbacks: Any) -> dict[str, Any]:
    """Write ``<out_dir>/summary.json`` on rank 0, wait for every rank, then fire
    ``on_train_end``; returns the summary (the stages' common last step)."""
    if strategy.is_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    strategy.barrier()
    callbacks.on_train_end(summary)
    return summary
