"""Code and data versions: Dagster tells which assets are stale and why.

The data assets are materialized into a temporary instance, then their inputs or code versions
change and the stale status is read the way the UI reads it (``CachingStaleStatusResolver``).
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from assets.data import DATA_ASSETS, dataset_splits
from pipelines.io_managers import JsonManifestIOManager

DATA_KEYS = ("raw_preferences", "preference_pairs", "quarantined_pairs", "dataset_splits")
DATA_VERSION_TAG = "dagster/data_version"


def materialize(home: Path, instance: dg.DagsterInstance, selection: str | list[str] = "*",
                seed: int | None = 0) -> Any:
    """Materialize the data assets (all, or ``selection``) from a small bundled data set made
    with ``seed``; None when raw_preferences is not selected (it then takes no config)."""
    raw = {"source": "bundled", "n_pairs": 300, "seed": seed}
    return dg.materialize(
        DATA_ASSETS, instance=instance, selection=selection,
        resources={"io_manager": JsonManifestIOManager(base_dir=str(home / "manifests"))},
        run_config={"ops": {} if seed is None else {"raw_preferences": {"config": raw}}},
    )


def status(instance: dg.DagsterInstance, assets: list = DATA_ASSETS) -> dict[str, tuple[StaleStatus, set]]:
    """Stale status of every data asset and the (category, reason, upstream) of each cause."""
    resolver = get_stale_status_resolver(instance, assets)
    out = {}
    for name in DATA_KEYS:
        key = dg.AssetKey(name)
        causes = {(c.category, c.reason, c.dependency_asset_key.to_user_string() if c.dependency else None)
                  for c in resolver.get_stale_causes(key)}
        out[name] = (resolver.get_status(key), causes)
    return out


def data_version(result: Any, asset: str) -> str:
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset))
    return event.materialization.tags[DATA_VERSION_TAG]


def test_every_asset_has_a_code_version(rlhf_home: Path) -> None:
    from pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    missing = [k.to_user_string() for k in graph.materializable_asset_keys if not graph.get(k).code_version]
    assert missing == []


def test_data_versions_are_content_hashes_and_drive_staleness(rlhf_home: Path) -> None:
    with dg.instance_for_test(temp_dir=str(rlhf_home / "dagster_home")) as instance:
        first = materialize(rlhf_home, instance)
        splits = first.output_for_node("dataset_splits")
        assert data_version(first, "dataset_splits") == splits["data_version"]
        assert data_version(first, "raw_preferences") == first.output_for_node("raw_preferences")["content_hash"]
        assert all(s == StaleStatus.FRESH for s, _ in status(instance).values())

        # The same content written again is the same data: nothing downstream goes stale.
        again = materialize(rlhf_home, instance, selection="raw_preferences")
        assert data_version(again, "raw_preferences") == data_version(first, "raw_preferences")
        assert all(s == StaleStatus.FRESH for s, _ in status(instance).values())

        # Another code version of dataset_splits: it is stale for its code, its inputs are not.
        bumped = dataset_splits.map_asset_specs(lambda spec: spec.replace_attributes(code_version="bumped"))
        graph = [a for a in DATA_ASSETS if a is not dataset_splits] + [bumped]
        by_name = status(instance, graph)
        assert by_name["dataset_splits"] == (
            StaleStatus.STALE, {(StaleCauseCategory.CODE, "has a new code version", None)})
        assert by_name["preference_pairs"][0] == StaleStatus.FRESH

        # New input data: the validated pairs are stale because raw_preferences has a new data version.
        changed = materialize(rlhf_home, instance, selection="raw_preferences", seed=1)
        assert data_version(changed, "raw_preferences") != data_version(first, "raw_preferences")
        by_name = status(instance)
        assert by_name["raw_preferences"][0] == StaleStatus.FRESH
        for name in ("preference_pairs", "quarantined_pairs"):
            assert by_name[name] == (StaleStatus.STALE, {
                (StaleCauseCategory.DATA, "has a new dependency data version", "raw_preferences")}), name
        # Dagster judges an asset by its direct inputs' data versions: the splits go stale only once
        # the pairs they read have new content (re-validating the same pairs would leave them fresh).
        assert by_name["dataset_splits"][0] == StaleStatus.FRESH
        materialize(rlhf_home, instance, selection=["preference_pairs", "quarantined_pairs"], seed=None)
        assert status(instance)["dataset_splits"] == (StaleStatus.STALE, {
            (StaleCauseCategory.DATA, "has a new dependency data version", "preference_pairs")})


@pytest.mark.parametrize("changed", [False, True])
def test_model_dir_version_follows_the_files(tmp_path: Path, changed: bool) -> None:
    from assets.models import model_dir_version

    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "model.safetensors").write_bytes(b"\x00\x01weights")
        (tmp_path / name / "sub" / "tokenizer.json").write_text("{}")
    if changed:
        (tmp_path / "b" / "model.safetensors").write_bytes(b"\x00\x02weights")
    assert (model_dir_version(tmp_path / "a") != model_dir_version(tmp_path / "b")) is changed
