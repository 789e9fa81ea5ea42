"""The Dagster UI in headless Chromium: the asset graph shows every asset, a materialization shows.

Starts ``dagster-webserver`` on a free port against a temporary DAGSTER_HOME in which the data
assets were materialized first. Screenshots go to ``tests/artifacts/ui_*.png``.
Needs Debian's ``chromium`` (``.ci/run`` installs it); Playwright never downloads a browser.
"""

import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from pipelines.cli import setup_embedded_env, start_in_own_session, stop_session

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ASSETS = ["raw_preferences", "preference_pairs", "quarantined_pairs", "dataset_splits", "base_model",
          "sft_model", "reward_model", "ppo_policy", "evaluation_report", "registered_policy"]
# Loading the code location imports torch, transformers and mlflow: slow on a busy 2-core box.
SERVER_START_TIMEOUT = 300.0
UI_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"dagster-webserver did not answer within {SERVER_START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def dismiss_welcome_dialog(page) -> None:
    """A fresh Dagster home greets the first visitor with a newsletter dialog over the page."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=5000)
    except Exception:  # playwright's TimeoutError: no dialog this time
        return
    skip.click()


@pytest.fixture
def materialized_home(rlhf_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A temporary Dagster home in which the data assets were materialized once."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{rlhf_home / 'mlflow' / 'mlflow.db'}")
    setup_embedded_env()
    from pipelines.definitions import ASSETS, ASSET_CHECKS, default_resources

    config = {"ops": {"raw_preferences": {"config": {"n_pairs": 200}}}}
    # Fresh resources: `defs` may have been imported by an earlier test under another RLHF_HOME.
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            [*ASSETS, *ASSET_CHECKS], selection=dg.AssetSelection.groups("data"), instance=instance,
            resources=default_resources(), run_config=config,
        )
    assert result.success
    manifest = json.loads((rlhf_home / "manifests" / "raw_preferences.json").read_text())
    return {"run_id": result.run_id, "content_hash": manifest["content_hash"]}


@pytest.fixture
def webserver(materialized_home: dict, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    command = [str(Path(sys.executable).parent / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
               "-w", str(REPO_ROOT / "workspace.yaml")]
    with log.open("w") as out:
        proc = start_in_own_session(command, os.environ, REPO_ROOT, stdout=out, stderr=out)
    try:
        wait_for_server(url, proc, log)
        yield url
    finally:
        stop_session(proc)


def test_asset_graph_and_materialization_appear(webserver: str, materialized_home: dict) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        # A fresh profile per run (persistent context = our own --user-data-dir).
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1800, "height": 1000},
        )
        page = browser.new_page()
        try:
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{webserver}/asset-groups", wait_until="networkidle")
            page.get_by_text("registry", exact=True).last.wait_for()
            dismiss_welcome_dialog(page)
            # Groups start collapsed; the graph settings menu expands them all.
            page.locator('button:has([aria-label="settings"])').last.click()
            page.locator("text=Expand all groups >> visible=true").first.click()
            page.keyboard.press("Escape")
            page.get_by_text("registered_policy", exact=True).last.wait_for()
            page.locator("text=Collapse all groups >> visible=true").first.wait_for(state="hidden")
            page.wait_for_load_state("networkidle")  # materialization statuses colour the nodes
            page.wait_for_timeout(1500)  # let the edge animation settle, for a readable screenshot
            graph_text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "ui_asset_graph.png"))
            missing = [a for a in ASSETS if a not in graph_text]
            assert not missing, f"asset graph does not show {missing}"

            page.goto(f"{webserver}/assets/raw_preferences", wait_until="networkidle")
            page.get_by_text(materialized_home["content_hash"]).first.wait_for()
            asset_text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "ui_materialization.png"), full_page=True)
            assert "Latest materialization" in asset_text
            assert "Never materialized" not in asset_text

            page.goto(f"{webserver}/runs/{materialized_home['run_id']}", wait_until="networkidle")
            page.get_by_text("RUN_SUCCESS").first.wait_for()
            page.screenshot(path=str(ARTIFACTS / "ui_run.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "ui_failure.png"))
            raise
        finally:
            browser.close()
