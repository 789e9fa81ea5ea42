"""Assets hand each other small JSON manifests (paths, versions, counts), never pickles.

Data and models live in files (Parquet, ``save_pretrained`` directories); the asset's
output value is a JSON-serialisable dict pointing at them. This IO manager stores that
dict as ``<base_dir>/<asset key>.json`` (a partition of a partitioned asset, e.g. one RLHF
round, as ``<asset key>/partitions/<key>.json``) and also keeps one copy per run under
``<asset key>/runs/<run_id>.json`` so earlier materializations stay inspectable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg


def manifest_path(base_dir: str | Path, key: Sequence[str], partition: str | None = None,
                  run_id: str | None = None) -> Path:
    """Where the manifest of asset ``key`` lives: the latest, one partition's, or one run's copy."""
    root = Path(base_dir).joinpath(*key)
    if partition is not None:
        return root / "partitions" / f"{partition}.json"
    if run_id is not None:
        return root / "runs" / f"{run_id}.json"
    return root.with_suffix(".json")


class JsonManifestIOManager(dg.ConfigurableIOManager):
    base_dir: str

    def _path(self, context: dg.OutputContext | dg.InputContext, partition: str | None = None,
              run_id: str | None = None) -> Path:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return manifest_path(self.base_dir, key, partition, run_id)

    @staticmethod
    def _partition(context: dg.OutputContext | dg.InputContext) -> str | None:
        return context.asset_partition_key if context.has_asset_partitions else None

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if not isinstance(obj, dict):
            raise TypeError(
                f"{context.asset_key.to_user_string()}: assets must return a JSON manifest "
                f"(dict of paths and values), got {type(obj).__name__}"
            )
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        path = self._path(context, self._partition(context))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        history = self._path(context, run_id=context.run_id)
        history.parent.mkdir(parents=True, exist_ok=True)
        history.write_text(text)

    def load_input(self, context: dg.InputContext) -> dict:
        upstream = context.upstream_output
        assert upstream is not None
        path = self._path(upstream, self._partition(context))
        if not path.exists():
            raise FileNotFoundError(
                f"no manifest for {upstream.asset_key.to_user_string()} at {path}: "
                "materialize that asset first"
            )
        return json.loads(path.read_text())
