"""RLHF rounds end to end on the tiny configs: `rlhf rounds` bootstraps the lineage, runs rounds
as partitions of `rlhf_round`, promotes only a better challenger, keeps a refused one registered."""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from pipelines import cli
from tests.conftest import env_vars

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory):
    """The tiny lineage, two rounds, then a round whose gate cannot be met (min_improvement 1e6)."""
    home = tmp_path_factory.mktemp("rounds_home")
    with env_vars(RLHF_HOME=str(home), DAGSTER_HOME=None, MLFLOW_TRACKING_URI=None, RLHF_LANDING_DIR=None):
        cli.setup_embedded_env()
        round_cfg = yaml.safe_load((REPO / "configs" / "tiny_round.yaml").read_text())
        lineage_cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        code = cli.run_rounds(2, round_cfg, lineage_cfg)
        first = json.loads((home / "rounds_summary.json").read_text())
        refuse = {**round_cfg, "ops": {**round_cfg["ops"], "round_champion": {
            "config": {**round_cfg["ops"]["round_champion"]["config"], "min_improvement": 1e6}}}}
        refused_code = cli.run_rounds(1, refuse, lineage_cfg)
        refused = json.loads((home / "rounds_summary.json").read_text())
        yield {"home": home, "code": code, "first": first, "refused_code": refused_code, "refused": refused}


def test_rounds_bootstrap_then_each_champion_is_at_least_the_previous(rounds: dict) -> None:
    assert rounds["code"] == 0
    first = rounds["first"]
    assert first["seconds_lineage"] is not None  # no champion at the start: the lineage ran first
    rows = first["rounds"]
    assert [r["round"] for r in rows] == ["round-0001", "round-0002"]
    assert all(r["status"] == "succeeded" for r in rows)
    # the fixed evaluation set: the champion a round starts from scores exactly what it scored
    # when it was challenger (same prompts, same sampling seed), so the rounds chain
    for before, after in zip(rows, rows[1:]):
        carried = before["challenger_gold"] if before["promoted"] else before["champion_gold"]
        assert after["champion_gold"] == pytest.approx(carried, abs=1e-9)
    for r in rows:
        assert r["promoted"] == (r["challenger_gold"] > r["champion_gold"])


def test_a_refused_challenger_is_registered_but_the_champion_stays(rounds: dict) -> None:
    from mlflow import MlflowClient

    assert rounds["refused_code"] == 0  # refusing is a decision, not a failure
    [row] = rounds["refused"]["rounds"]
    assert row["round"] == "round-0003" and row["promoted"] is False
    assert rounds["refused"]["seconds_lineage"] is None  # a champion existed: no lineage
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], registry_uri=os.environ["MLFLOW_TRACKING_URI"])
    model = client.get_registered_model("rlhf-policy")
    before = rounds["first"]["rounds"][-1]["champion_version_after"]
    assert str(model.aliases["champion"]) == before == row["champion_version_after"]
    assert str(model.aliases["challenger"]) == row["challenger_version"] != before
    decision = json.loads(model.tags["last_promotion_decision"])
    # refused by the strictly-better rule, or by the 1e6 margin when it was better
    assert decision["promoted"] is False
    assert "min_improvement" in decision["reason"] or "not strictly better" in decision["reason"]
    alerts = [json.loads(p.read_text()) for p in (rounds["home"] / "alerts").glob("*promotion_refused*.json")]
    assert any("round-0003" in a["message"] for a in alerts)
    version = client.get_model_version("rlhf-policy", row["challenger_version"])
    assert version.tags["rlhf.round"] == "round-0003"
    assert version.tags["parent_champion"] == before


def test_each_round_is_a_partition_with_its_own_lineage_and_cumulative_pairs(rounds: dict) -> None:
    home = rounds["home"]
    instance = dg.DagsterInstance.get()
    keys = instance.get_dynamic_partitions("rlhf_round")
    assert keys == ["round-0001", "round-0002", "round-0003"]
    for asset in ("round_preferences", "round_reward_model", "round_policy", "round_evaluation", "round_champion"):
        done = instance.get_materialized_partitions(dg.AssetKey(asset))
        assert done == set(keys), asset
    base = pd.read_parquet(Path(json.loads((home / "manifests" / "dataset_splits.json").read_text())["split_dir"])
                           / "rm_train.parquet")
    new = {k: pd.read_parquet(home / "rounds" / k / "new_pairs.parquet") for k in keys}
    for i, k in enumerate(keys):
        cumulative = pd.read_parquet(home / "rounds" / k / "rm_train.parquet")
        assert len(cumulative) == len(base) + sum(len(new[j]) for j in keys[: i + 1])
    # a round's reward model is versioned by the weights it shipped, as every training asset is
    from assets.models import model_dir_version

    for k in keys:
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("round_reward_model"), asset_partitions=[k]), limit=1).records[0]
        manifest = json.loads((home / "manifests" / "round_reward_model" / "partitions" / f"{k}.json").read_text())
        assert (record.asset_materialization.tags["dagster/data_version"]
                == model_dir_version(Path(manifest["model_path"])))
        # the default implicit reward model, warm-started round after round: its reward is
        # still measured from SFT, not from the previous round's model
        spec = json.loads((Path(manifest["model_path"]) / "implicit_reward.json").read_text())
        sft = json.loads((home / "manifests" / "sft_model.json").read_text())["model_path"]
        assert spec["reference_model"] == str(Path(sft).resolve())
    # every round's simulated labels come from the champion the round started from
    meta = json.loads((home / "manifests" / "round_preferences" / "partitions" / "round-0002.json").read_text())
    assert meta["champion_version"] == rounds["first"]["rounds"][0]["champion_version_after"]
    assert "simulated annotator" in meta["origin"]
    assert meta["counts"]["rows_read"] == meta["counts"]["new"] + meta["counts"]["quarantined"] > 0


def test_rounds_export_a_batch_to_label_and_plot_the_rounds(rounds: dict) -> None:
    home = rounds["home"]
    batches = sorted((home / "annotation" / "outbox").glob("after-round-*.jsonl"))
    assert len(batches) == 3
    rows = [json.loads(line) for line in batches[-1].read_text().splitlines()]
    assert len(rows) == 8 and all(r["preference"] is None and r["response_a"] is not None for r in rows)
    instance = dg.DagsterInstance.get()
    event = instance.get_latest_materialization_event(dg.AssetKey("round_champion"))
    meta = event.asset_materialization.metadata
    table = meta["rounds"].value
    assert all(k in table for k in ("round-0001", "round-0002", "round-0003"))
    assert "plot_rounds" in meta and (home / "rounds" / "round-0003" / "rounds.png").stat().st_size > 1000


def test_each_round_is_one_mlflow_parent_run_with_its_stage_runs(rounds: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], registry_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("rlhf-pipeline")
    parents = client.search_runs([exp.experiment_id], "tags.`rlhf.parent` = 'true' and tags.`rlhf.round` = 'round-0002'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    names = {c.data.tags["dagster.asset_key"] for c in children}
    assert {"round_reward_model", "round_policy", "round_evaluation", "round_champion"} <= names


# ---------------------------------------------------------------- the loop under `rlhf ui`
RUN_TIMEOUT = 600.0


@pytest.fixture(scope="module")
def ui(rounds: dict, tmp_path_factory: pytest.TempPathFactory):
    """`rlhf ui` (dagster dev + mlflow server) on the rounds' home, the sensor ticking every 5 s
    and automated rounds on the tiny budgets (RLHF_ROUND_CONFIG)."""
    import subprocess
    import sys
    import urllib.request

    from tests.test_ui import free_port

    log = tmp_path_factory.mktemp("ui") / "rlhf_ui.log"
    dagster_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "RLHF_SENSOR_INTERVAL_SECONDS": "5",
           "RLHF_ROUND_CONFIG": str(REPO / "configs" / "tiny_round.yaml")}
    with log.open("w") as out:
        proc = cli.start_in_own_session(
            [str(Path(sys.executable).parent / "rlhf"), "ui", "--dagster-port", str(dagster_port),
             "--mlflow-port", str(mlflow_port)], env, REPO, stdout=out, stderr=subprocess.STDOUT)
    urls = {"dagster": f"http://127.0.0.1:{dagster_port}", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    try:
        deadline = time.monotonic() + 300
        pending = dict(urls)
        while pending and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            for name, url in list(pending.items()):
                try:
                    with urllib.request.urlopen(f"{url}/{'server_info' if name == 'dagster' else 'health'}",
                                                timeout=5) as r:
                        if r.status == 200:
                            pending.pop(name)
                except OSError:
                    pass
            time.sleep(2)
        assert not pending, f"{sorted(pending)} did not start:\n{log.read_text()[-3000:]}"
        yield {**urls, "log": log}
    finally:
        assert cli.stop_session(proc) is not None


def _label(batch: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in batch.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["preference"] = "a" if i % 2 == 0 else "b"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    old = time.time() - 60  # older than the sensor's "still being copied" window
    os.utime(out, (old, old))
    return out


def test_a_labelled_file_in_the_landing_folder_starts_one_round_under_rlhf_ui(rounds: dict, ui: dict) -> None:
    home = rounds["home"]
    instance = dg.DagsterInstance.get()
    before = {r.run_id for r in instance.get_runs()}
    batch = sorted((home / "annotation" / "outbox").glob("after-round-0003*.jsonl"))[-1]
    landed = _label(batch, home / "landing" / "labelled-round-0003.jsonl")
    deadline = time.monotonic() + RUN_TIMEOUT
    run = None
    while time.monotonic() < deadline:
        new = [r for r in instance.get_runs() if r.run_id not in before]
        if new and new[0].is_finished:
            run = new[0]
            break
        time.sleep(3)
    assert run is not None, f"no round finished within {RUN_TIMEOUT}s:\n{ui['log'].read_text()[-3000:]}"
    assert len([r for r in instance.get_runs() if r.run_id not in before]) == 1  # exactly one run
    assert run.job_name == "rlhf_round" and run.tags["rlhf/trigger"] == "landing", run.tags
    assert run.status == dg.DagsterRunStatus.SUCCESS, ui["log"].read_text()[-3000:]
    key = run.tags["dagster/partition"]
    assert key == "round-0004"
    made = json.loads((home / "manifests" / "round_champion" / "partitions" / f"{key}.json").read_text())
    assert isinstance(made["decision"]["promoted"], bool) and made["decision"]["reason"]
    prefs = json.loads((home / "manifests" / "round_preferences" / "partitions" / f"{key}.json").read_text())
    assert prefs["origin"] == f"files: {landed.name}"
    assert prefs["counts"]["new"] + prefs["counts"]["quarantined"] == 8  # every labelled row accounted for


def _new_raw_data() -> None:
    """raw_preferences re-materialized on other data: its dependents become stale."""
    from pipelines.definitions import ASSETS, default_resources

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(ASSETS, selection=dg.AssetSelection.assets("raw_preferences"), instance=instance,
                                resources=default_resources(),
                                run_config={"ops": {"raw_preferences": {"config": {"n_pairs": 123}}}})
    assert result.success


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_the_uis_show_rounds_staleness_and_the_registered_lineage(rounds: dict, ui: dict) -> None:
    from tests.test_ui import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS, dismiss_welcome_dialog

    sync_api = pytest.importorskip("playwright.sync_api")
    import tempfile

    from mlflow import MlflowClient

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"], registry_uri=os.environ["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("rlhf-policy", "champion")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1800, "height": 1100})
        page = browser.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            # the rounds: one partition per round, each materialized
            page.goto(f"{ui['dagster']}/assets/round_champion?view=partitions", wait_until="networkidle")
            dismiss_welcome_dialog(page)
            page.get_by_text("round-0003").first.wait_for()
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "ui_rounds_partitions.png"), full_page=True)
            assert "round-0001" in text and "round-0002" in text
            # staleness: new raw data makes everything downstream of it stale, with the reason
            _new_raw_data()
            page.goto(f"{ui['dagster']}/assets/preference_pairs", wait_until="networkidle")
            page.get_by_text("Unsynced").first.wait_for()  # Dagster 1.13's word for stale
            page.screenshot(path=str(ARTIFACTS / "ui_stale_asset.png"), full_page=True)
            page.goto(f"{ui['dagster']}/asset-groups", wait_until="networkidle")
            page.locator('button:has([aria-label="settings"])').last.click()
            page.locator("text=Expand all groups >> visible=true").first.click()
            page.keyboard.press("Escape")
            page.get_by_text("round_champion", exact=True).last.wait_for()
            page.wait_for_timeout(2000)  # the graph marks unsynced assets with a dot at this zoom
            page.screenshot(path=str(ARTIFACTS / "ui_asset_graph_rounds.png"))
            # MLflow: the champion version page names its source run (the PPO training run)
            page.goto(f"{ui['mlflow']}/#/models/rlhf-policy/versions/{champion.version}", wait_until="load")
            page.get_by_text(f"Version {champion.version}").first.wait_for()
            page.wait_for_timeout(2000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_champion_version.png"), full_page=True)
            assert champion.run_id and client.get_run(champion.run_id).data.tags["dagster.asset_key"] in ("round_policy", "ppo_policy")
            # and that run lists its datasets (the cumulative pairs' data version as digest)
            run = client.get_run(champion.run_id)
            page.goto(f"{ui['mlflow']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
                      wait_until="load")  # the MLflow UI polls: the network never idles
            page.get_by_text("ppo_train").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "mlflow_training_run.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "ui_rounds_failure.png"))
            raise
        finally:
            browser.close()


def test_a_round_whose_gold_scorer_does_not_import_trains_nothing(rounds: dict) -> None:
    """Labelled files need no scorer, but round_evaluation scores with it after both round models
    trained: round_preferences imports it first, so the round fails before any training. (Last in
    this file: the failed round must not shift the round keys the tests above expect.)"""
    home = rounds["home"]
    config = yaml.safe_load((REPO / "configs" / "tiny_round.yaml").read_text())
    config["ops"]["round_preferences"]["config"]["gold_scorer"] = "no_such_scorer_module:score"
    labelled = str(REPO / "configs" / "examples" / "user_pairs.jsonl")
    assert cli.run_rounds(1, config, {}, files=[labelled]) == 1
    (row,) = json.loads((home / "rounds_summary.json").read_text())["rounds"]
    assert row["status"] != "succeeded"
    errors = " ".join(row["errors"])
    assert "round_preferences.gold_scorer: reward function 'no_such_scorer_module:score': cannot import" in errors
    assert "nothing of this round was trained" in errors
    for asset in ("round_preferences", "round_reward_model", "round_policy"):
        assert not (home / "manifests" / asset / "partitions" / f"{row['round']}.json").exists()
