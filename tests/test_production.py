"""The production profile for real: PostgreSQL + an MLflow tracking server on loopback, the lineage
(configs/tiny.yaml) materialized against them, promoted, and the champion read back from the server.

The commands are the README's "Production profile" shell block, run as written (with this test's
own folder and ports), so the README cannot drift from what works. Skipped only when the PostgreSQL
server binaries are absent (.ci/run installs them).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
SCRIPT = "deploy/local_production.sh"
PG_BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
# Every step of the lineage on the tiny config, with the server round trips, in a few minutes.
STEP_TIMEOUT = 1200


def readme_production_commands() -> list[str]:
    """The command lines of the shell block in the README's "Production profile" section."""
    text = README.read_text()
    start = text.index("### Production profile")
    later = re.search(r"\n#{2,3} ", text[start + 1:])
    section = text[start:] if later is None else text[start:start + 1 + later.start()]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the production section needs exactly one shell block"
    return [line.strip() for line in blocks[0].splitlines() if line.strip() and not line.strip().startswith("#")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readme_block_is_the_script_lifecycle() -> None:
    commands = readme_production_commands()
    assert all(c.startswith(SCRIPT + " ") for c in commands), commands
    verbs = [c.split()[1] for c in commands]
    assert verbs[0] == "up" and verbs[-1] == "down" and "run" in verbs and "champion" in verbs, verbs
    assert (REPO_ROOT / SCRIPT).is_file() and os.access(REPO_ROOT / SCRIPT, os.X_OK)


@pytest.fixture(scope="module")
def production() -> Iterator[dict]:
    """Runs the README's block up to (not including) ``down``; ``down`` runs at teardown."""
    if not PG_BINARIES:
        pytest.skip("PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin): apt-get install -y postgresql")
    # The postgres user must reach the data folder: a world-searchable folder of its own in /tmp
    # (pytest's tmp_path is private to root).
    prod_dir = Path(tempfile.mkdtemp(prefix="rlhf-prod-"))
    prod_dir.chmod(0o755)
    env = {**os.environ, "RLHF_PROD_DIR": str(prod_dir), "RLHF_PG_PORT": str(free_port()),
           "RLHF_MLFLOW_PORT": str(free_port()), "RLHF_BIN": str(Path(sys.executable).parent)}
    for var in ("DAGSTER_HOME", "RLHF_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RLHF_MLFLOW_ARTIFACT_ROOT"):
        env.pop(var, None)  # the script sets them; a developer's own must not leak in
    commands = readme_production_commands()
    teardown = [c for c in commands if c.split()[1] == "down"]
    outputs: dict[str, subprocess.CompletedProcess] = {}
    try:
        for command in commands[: commands.index(teardown[0])]:
            done = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True,
                                  text=True, timeout=STEP_TIMEOUT)
            outputs[command.split()[1]] = done
            assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield {"dir": prod_dir, "env": env, "outputs": outputs}
    finally:
        for command in teardown:
            subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, timeout=120)
        shutil.rmtree(prod_dir, ignore_errors=True)


def _env_of(production: dict) -> dict[str, str]:
    """The variables ``local_production.sh env`` prints."""
    lines = production["outputs"]["env"].stdout.splitlines()
    return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))


def test_dagster_yaml_is_postgres_with_the_embedded_run_monitoring(production: dict) -> None:
    from pipelines.cli import DEFAULT_DAGSTER_YAML

    config = yaml.safe_load((production["dir"] / "dagster_home" / "dagster.yaml").read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["hostname"] == "127.0.0.1" and db["port"] == int(production["env"]["RLHF_PG_PORT"])
    assert db["password"] == {"env": "DAGSTER_PG_PASSWORD"}  # never written in clear
    assert config["run_monitoring"] == DEFAULT_DAGSTER_YAML["run_monitoring"]
    assert config["concurrency"] == DEFAULT_DAGSTER_YAML["concurrency"]


def test_lineage_run_is_stored_in_postgres(production: dict) -> None:
    import json

    import psycopg2

    env = _env_of(production)
    summary = json.loads((Path(env["RLHF_HOME"]) / "summary.json").read_text())
    assert summary["status"] == "succeeded", production["outputs"]["run"].stdout[-3000:]
    conn = psycopg2.connect(host="127.0.0.1", port=int(production["env"]["RLHF_PG_PORT"]), user="rlhf",
                            password=env["DAGSTER_PG_PASSWORD"], dbname="dagster")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_id = %s", (summary["dagster_run_id"],))
            rows = cur.fetchall()
            cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (summary["dagster_run_id"],))
            n_events = cur.fetchone()[0]
    finally:
        conn.close()
    assert rows == [("SUCCESS",)]
    assert n_events > 50  # the event log is in Postgres too, not in a SQLite file
    assert not list((Path(env["DAGSTER_HOME"])).glob("**/*.db")), "no SQLite storage beside the yaml"


def test_champion_is_promoted_on_the_server_and_generates(production: dict) -> None:
    import mlflow

    env = _env_of(production)
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://127.0.0.1:")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    model = client.get_registered_model("rlhf-policy")
    assert "champion" in model.aliases
    version = client.get_model_version_by_alias("rlhf-policy", "champion")
    run = client.get_run(version.run_id)
    # artifacts went through the server into its --artifacts-destination, not to a client path
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert any((production["dir"] / "mlflow-artifacts").rglob("*.safetensors"))
    assert run.data.tags["dagster.run_id"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        pipe = mlflow.transformers.load_model("models:/rlhf-policy@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    prompt = "describe the river please ."
    generated = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert generated.startswith(prompt) and len(generated) > len(prompt)
    # the README's `champion` step did the same from its own process
    assert production["outputs"]["champion"].stdout.strip().startswith(prompt)


def test_dagster_instance_reads_postgres_and_links_follow_the_server(
    production: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance of that DAGSTER_HOME holds the materializations, and their MLflow links point
    at the tracking server (not at a fixed http://127.0.0.1:5000)."""
    import dagster as dg

    env = _env_of(production)
    for var in ("DAGSTER_HOME", "DAGSTER_PG_PASSWORD"):
        monkeypatch.setenv(var, env[var])
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        event = instance.get_latest_materialization_event(dg.AssetKey("ppo_policy"))
    assert event is not None
    url = event.asset_materialization.metadata["mlflow_run"].value
    assert url.startswith(env["MLFLOW_TRACKING_URI"] + "/#/experiments/"), url
