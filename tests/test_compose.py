"""Docker cannot run here: docker-compose.yml and its deploy/ files are checked against the code
(every path, module, command and config they name exists; ports, hosts and variables agree)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DEPLOY_INSTANCE = yaml.safe_load((REPO_ROOT / "deploy" / "dagster.yaml").read_text())
IMAGE_SERVICES = ("mlflow", "user_code", "webserver", "daemon")


def dockerfile_cmd() -> list[str]:
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    line = [ln for ln in text.splitlines() if ln.startswith("CMD ")][-1]
    return yaml.safe_load(line.removeprefix("CMD "))


def command_of(name: str) -> list[str]:
    return SERVICES[name].get("command") or dockerfile_cmd()


def env_of(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[name].get("environment") or {}).items()}


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def mounts(name: str) -> dict[str, str]:
    """Container path -> source (a ./ host path or a named volume)."""
    out = {}
    for volume in SERVICES[name].get("volumes") or []:
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_topology() -> None:
    assert set(SERVICES) == {"postgres", "mlflow", "user_code", "webserver", "daemon"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    for name in IMAGE_SERVICES:  # one image, built from the project's Dockerfile
        assert SERVICES[name]["build"]["context"] == "." and (REPO_ROOT / "Dockerfile").is_file()
        assert SERVICES[name]["image"] == "rlhf-pipeline:latest"


def test_every_host_path_exists_and_every_named_volume_is_declared() -> None:
    for name in SERVICES:
        for target, source in mounts(name).items():
            if source.startswith("./"):
                assert (REPO_ROOT / source).is_file(), f"{name}: {source} does not exist"
            elif not source.startswith("/"):
                assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"


def test_build_args_are_declared_in_the_dockerfile_and_extras_exist() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg, value in SERVICES["user_code"]["build"]["args"].items():
        assert re.search(rf"^ARG {arg}\b", dockerfile, flags=re.M), f"build arg {arg} not in the Dockerfile"
        if arg == "EXTRAS":
            assert set(value.split(",")) <= set(extras), value
            assert any(d.startswith("dagster-docker==") for d in extras["docker"])  # DockerRunLauncher
            assert any(d.startswith("dagster-postgres==") for d in extras["postgres"])


def test_commands_are_installed_and_modules_exist() -> None:
    bin_dir = Path(sys.executable).parent
    for name in IMAGE_SERVICES:
        command = command_of(name)
        assert (bin_dir / command[0]).exists() or shutil.which(command[0]), f"{name}: {command[0]} not installed"
        if "-m" in command:
            module = option(command, "-m")
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"


def test_workspace_reaches_the_user_code_server() -> None:
    grpc_cmd = command_of("user_code")
    port = int(option(grpc_cmd, "-p"))
    assert re.search(rf"^EXPOSE {port}$", (REPO_ROOT / "Dockerfile").read_text(), flags=re.M)
    for name in ("webserver", "daemon"):
        workspace_path = option(command_of(name), "-w")
        source = mounts(name)[workspace_path]
        workspace = yaml.safe_load((REPO_ROOT / source).read_text())
        (entry,) = workspace["load_from"]
        assert entry["grpc_server"]["host"] == "user_code" and entry["grpc_server"]["port"] == port
    for name in ("user_code", "webserver", "daemon"):  # one instance for all three
        assert mounts(name)[env_of(name)["DAGSTER_HOME"] + "/dagster.yaml"] == "./deploy/dagster.yaml"
        assert mounts(name)[env_of(name)["RLHF_HOME"]] == "rlhf-home"


def test_mlflow_server_matches_what_the_code_is_told() -> None:
    command = command_of("mlflow")
    port = option(command, "--port")
    assert f"{port}:{port}" in SERVICES["mlflow"]["ports"]
    assert "--serve-artifacts" in command
    artifacts = option(command, "--artifacts-destination")
    assert mounts("mlflow")[artifacts] in COMPOSE["volumes"]
    backend = option(command, "--backend-store-uri")
    # psycopg2 explicitly: SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, not installed
    assert backend.startswith("postgresql+psycopg2://") and "@postgres:5432/mlflow" in backend
    assert DEPLOY_INSTANCE["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert "CREATE DATABASE mlflow" in (REPO_ROOT / "deploy" / "postgres-init.sql").read_text()
    allowed = option(command, "--allowed-hosts").split(",")
    for name in ("user_code", "webserver", "daemon"):
        uri = env_of(name)["MLFLOW_TRACKING_URI"]
        assert uri == f"http://mlflow:{port}", (name, uri)
        assert f"mlflow:{port}" in allowed  # the Host header the other containers send


def test_dagster_instance_matches_postgres_and_the_launcher() -> None:
    from pipelines.cli import DEFAULT_DAGSTER_YAML

    postgres = SERVICES["postgres"]["environment"]
    db = DEPLOY_INSTANCE["storage"]["postgres"]["postgres_db"]
    assert db["username"] == postgres["POSTGRES_USER"] and db["db_name"] == postgres["POSTGRES_DB"]
    assert db["hostname"] == {"env": "DAGSTER_PG_HOST"} and db["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    for name in ("user_code", "webserver", "daemon"):
        assert env_of(name)["DAGSTER_PG_HOST"] == "postgres"
        assert env_of(name)["DAGSTER_PG_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert DEPLOY_INSTANCE["run_monitoring"] == DEFAULT_DAGSTER_YAML["run_monitoring"]
    launcher = DEPLOY_INSTANCE["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    config = launcher["config"]
    assert config["network"] == COMPOSE["networks"]["default"]["name"]
    for var in config["env_vars"]:  # forwarded from the daemon's environment into each run
        assert var in env_of("daemon"), var
    for volume in config["container_kwargs"]["volumes"]:
        source, target = volume.split(":")[:2]
        named = {v.get("name") for v in COMPOSE["volumes"].values() if v}
        assert source in named and target == env_of("daemon")["RLHF_HOME"]
    # the run containers are of the user-code image
    assert env_of("user_code")["DAGSTER_CURRENT_IMAGE"] == SERVICES["user_code"]["image"]


def test_deploy_instance_is_valid_dagster_config(tmp_path: Path) -> None:
    """Dagster's own schema accepts the compose instance (the launcher aside: dagster-docker is
    only installed in that deployment)."""
    from dagster._core.instance.config import dagster_instance_config

    pytest.importorskip("dagster_postgres")
    config = {k: v for k, v in DEPLOY_INSTANCE.items() if k != "run_launcher"}
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    validated, _ = dagster_instance_config(str(tmp_path))
    assert validated["storage"]["postgres"]["postgres_db"]["db_name"] == "dagster"
