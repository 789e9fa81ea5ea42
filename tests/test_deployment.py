"""What a deployment changes: settings bound as dg.EnvVar (read when a run starts), MLflow links that
follow the tracking server, the code version and configs of an installed package (no checkout), and
the launcher's Pipes client (subprocess here; docker / k8s where their packages are deployed)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from resources import settings
from resources.launcher import TrainingLauncher
from resources.tracking import MLflowResource, code_version, git_version

REPO_ROOT = Path(__file__).resolve().parent.parent


def fake_run(experiment_id: str = "3", run_id: str = "abc") -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(experiment_id=experiment_id, run_id=run_id))


# ---------------------------------------------------------------- MLflow links
@pytest.mark.parametrize(("tracking_uri", "expected"), [
    ("http://127.0.0.1:5001", "http://127.0.0.1:5001/#/experiments/3/runs/abc"),
    ("https://user:secret@mlflow.internal/base/", "https://mlflow.internal/base/#/experiments/3/runs/abc"),
    ("sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000/#/experiments/3/runs/abc"),
])
def test_run_url_follows_the_tracking_server(tracking_uri: str, expected: str) -> None:
    assert MLflowResource(tracking_uri=tracking_uri).run_url(fake_run()) == expected


def test_explicit_ui_url_wins() -> None:
    res = MLflowResource(tracking_uri="http://mlflow:5000", ui_url="http://localhost:5000/")
    assert res.run_url(fake_run()) == "http://localhost:5000/#/experiments/3/runs/abc"


def test_a_tracking_server_keeps_its_own_artifact_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLHF_MLFLOW_ARTIFACT_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert settings.mlflow_artifact_root() == ""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert settings.mlflow_artifact_root().startswith("file://")


# ---------------------------------------------------------------- dg.EnvVar
def _seen_tracking_uri(resources: dict) -> str:
    @dg.asset
    def probe(mlflow: MLflowResource) -> str:
        return mlflow.tracking_uri

    with dg.instance_for_test() as instance:
        result = dg.materialize([probe], instance=instance, resources={"mlflow": resources["mlflow"]})
        return result.output_for_node("probe")


def test_tracking_uri_is_an_env_var_read_when_the_run_starts(rlhf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.definitions import default_resources

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://first:5000")
    resources = default_resources()
    assert isinstance(resources["mlflow"].tracking_uri, dg.EnvVar)
    # changed after the definitions were built (code server) and before the run (run worker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://at-launch:5000")
    assert _seen_tracking_uri(resources) == "http://at-launch:5000"


def test_without_the_variable_the_embedded_default_still_works(rlhf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.definitions import default_resources

    for var in ("MLFLOW_TRACKING_URI", "RLHF_MLFLOW_ARTIFACT_ROOT", "RLHF_MLFLOW_UI_URL"):
        monkeypatch.delenv(var, raising=False)
    resources = default_resources()
    assert not isinstance(resources["mlflow"].tracking_uri, dg.EnvVar)
    assert _seen_tracking_uri(resources) == f"sqlite:///{rlhf_home / 'mlflow' / 'mlflow.db'}"


# ---------------------------------------------------------------- code version
def test_code_version_prefers_the_build_time_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    code_version.cache_clear()
    monkeypatch.setenv("RLHF_CODE_VERSION", "build-1234")
    try:
        assert code_version() == "build-1234"
    finally:
        code_version.cache_clear()


def test_code_version_without_a_checkout_is_the_package_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    code_version.cache_clear()
    monkeypatch.delenv("RLHF_CODE_VERSION", raising=False)
    monkeypatch.setattr(settings, "source_checkout", lambda: None)
    try:
        assert code_version() == metadata.version("rlhf-pipeline")
    finally:
        code_version.cache_clear()


def test_git_version_of_a_folder_outside_any_repository(tmp_path: Path) -> None:
    assert git_version(tmp_path) is None
    assert git_version(REPO_ROOT)  # the checkout has one


def test_shipped_configs_resolve_by_name_from_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert settings.config_file("configs/tiny.yaml") == REPO_ROOT / "configs" / "tiny.yaml"
    assert settings.config_file("tiny.yaml") == REPO_ROOT / "configs" / "tiny.yaml"
    assert not settings.config_file("nope.yaml").is_file()
    monkeypatch.setenv("RLHF_CONFIGS_DIR", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("ops: {}\n")
    monkeypatch.chdir(REPO_ROOT)
    assert settings.config_file("mine.yaml") == tmp_path / "mine.yaml"


def test_workspace_of_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import cli

    assert cli.workspace_args() == ["-w", str(REPO_ROOT / "workspace.yaml")]
    monkeypatch.setattr(settings, "source_checkout", lambda: None)
    assert cli.workspace_args() == ["-m", "pipelines.definitions"]


INSTALLED_PROBE = textwrap.dedent("""
    import json, os, sys
    import pipelines, resources.settings as settings
    from pipelines import cli
    from resources.tracking import code_version
    from pipelines.definitions import defs
    repo = defs.get_repository_def()
    print(json.dumps({
        "pipelines": pipelines.__file__,
        "checkout": str(settings.source_checkout()),
        "tiny": str(settings.config_file("tiny.yaml")),
        "rlhf_home": str(settings.rlhf_home()),
        "code_version": code_version(),
        "workspace": cli.workspace_args(),
        "jobs": sorted(j.name for j in repo.get_all_jobs()),
    }))
""")


def test_installed_project_works_outside_the_source_tree(tmp_path: Path) -> None:
    """`pip install --no-deps --target` the project, then load the definitions from another
    directory: configs, workspace and code version come from the installed package."""
    from test_dockerfile import copy_sources

    # exactly what the Dockerfile copies (a build in the checkout would write build/ into it)
    source = tmp_path / "src"
    for name in copy_sources():
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "configs" / "tiny.yaml").is_file() and (target / "configs" / "examples").is_dir()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "DAGSTER_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(target), HOME=str(work), RLHF_CODE_VERSION="image-42")
    probe = subprocess.run([sys.executable, "-c", INSTALLED_PROBE], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["pipelines"].startswith(str(target)), seen  # not the checkout's copy
    assert seen["checkout"] == "None"
    assert seen["tiny"] == str(target / "configs" / "tiny.yaml")
    assert seen["rlhf_home"] == str(work / ".rlhf")
    assert seen["code_version"] == "image-42"
    assert seen["workspace"] == ["-m", "pipelines.definitions"]
    assert "rlhf_lineage" in seen["jobs"]


# ---------------------------------------------------------------- the launcher's Pipes client
FAKE_STAGE = textwrap.dedent('''
    """A stand-in stage: reads its config, reports one step and a summary."""
    import argparse, json
    from pathlib import Path

    def main(argv=None, callbacks=()):
        p = argparse.ArgumentParser()
        p.add_argument("--config", required=True)
        cfg = json.loads(Path(p.parse_args(argv).config).read_text())
        for cb in callbacks:
            cb.on_train_begin("fake", 1, cfg)
            cb.on_log(1, {"train/loss": 0.5})
            cb.on_train_end({"marker": cfg["marker"]})
        return 0
''')


def test_run_id_and_stage_config_arrive_as_pipes_extras(tmp_path: Path) -> None:
    """The stage config exists only in the extras (as on another machine): the launched process
    writes it where the command says, runs, and reports the Dagster run it was launched for."""
    (tmp_path / "fake_stage_pkg").mkdir()
    (tmp_path / "fake_stage_pkg" / "__init__.py").write_text("")
    (tmp_path / "fake_stage_pkg" / "stage.py").write_text(FAKE_STAGE)
    remote_config = tmp_path / "remote" / "stage_config.json"  # absent when the launch starts
    launcher = TrainingLauncher(omp_num_threads=1, ds_accelerator="cpu",
                                extra_env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"})

    @dg.asset
    def fake(context: dg.AssetExecutionContext, launcher: TrainingLauncher) -> dg.MaterializeResult:
        extras = launcher.extras(context, "fake_stage_pkg.stage", remote_config, "mlflow-run")
        assert extras["stage_config"] is None and extras["dagster_run_id"] == context.run.run_id
        inv = launcher.launch(context, "fake_stage_pkg.stage", remote_config, mlflow_tracking_uri="",
                              mlflow_run_id="", metrics_file=tmp_path / "metrics.jsonl",
                              extras={"stage_config": {"marker": "from-extras"}})
        return inv.get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([fake], instance=instance, resources={"launcher": launcher})
        assert result.success
        meta = result.asset_materializations_for_node("fake")[0].metadata
    assert meta["launched_for_run"].value == result.run_id
    assert meta["summary/marker"].value == "from-extras"
    assert json.loads(remote_config.read_text()) == {"marker": "from-extras"}


def test_extras_carry_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "stage_config.json"
    config.write_text(json.dumps({"max_steps": 3}))
    context = SimpleNamespace(run=SimpleNamespace(run_id="r-1"))
    extras = TrainingLauncher().extras(context, "sft", config, "m-1")
    assert extras == {"dagster_run_id": "r-1", "stage": "sft", "stage_config_path": str(config),
                      "stage_config": {"max_steps": 3}, "mlflow_run_id": "m-1"}


@pytest.mark.parametrize(("kind", "package"), [("docker", "dagster-docker"), ("k8s", "dagster-k8s")])
def test_remote_clients_need_their_package_and_an_image(kind: str, package: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from resources.launcher import REMOTE_PIPES_CLIENTS, remote_pipes_client_class

    module = REMOTE_PIPES_CLIENTS[kind][0]
    monkeypatch.setitem(sys.modules, module, None)  # as where the package is not installed
    with pytest.raises(dg.DagsterInvariantViolationError, match=f"pip install {package}==0.29.27"):
        remote_pipes_client_class(kind)
    launcher = TrainingLauncher(pipes_client=kind)
    assert launcher.command("ppo", "/c.json")[0] == "python"  # the image's interpreter
    context = SimpleNamespace(run=SimpleNamespace(run_id="r"), log=SimpleNamespace(info=lambda *_: None))
    with pytest.raises(dg.DagsterInvariantViolationError, match="needs `image`"):
        launcher.launch(context, "ppo", "/nonexistent.json", mlflow_tracking_uri="", mlflow_run_id="",
                        metrics_file="/m")


def test_remote_client_gets_run_env_and_extras_not_this_machines_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for PipesDockerClient records what the launcher hands it."""
    calls: list[dict] = []

    class FakeDockerClient:
        def run(self, **kwargs):
            calls.append(kwargs)
            return "done"

    monkeypatch.setitem(sys.modules, "dagster_docker", SimpleNamespace(PipesDockerClient=FakeDockerClient))
    monkeypatch.setenv("SOME_LOCAL_SECRET", "x")
    launcher = TrainingLauncher(pipes_client="docker", image="rlhf-pipeline:latest", ds_accelerator="cpu",
                                docker_container_kwargs={"volumes": ["rlhf-home:/var/lib/rlhf"]})
    context = SimpleNamespace(run=SimpleNamespace(run_id="r-9"), log=SimpleNamespace(info=lambda *_: None))
    assert launcher.launch(context, "ppo", "/x/stage_config.json", mlflow_tracking_uri="http://mlflow:5000",
                           mlflow_run_id="m-9", metrics_file="/x/metrics.jsonl") == "done"
    (call,) = calls
    assert call["image"] == "rlhf-pipeline:latest" and call["extras"]["dagster_run_id"] == "r-9"
    assert call["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and call["env"]["MLFLOW_RUN_ID"] == "m-9"
    assert "SOME_LOCAL_SECRET" not in call["env"] and "PATH" not in call["env"]
    assert call["container_kwargs"] == {"volumes": ["rlhf-home:/var/lib/rlhf"]}
    assert call["command"][-3:] == ["ppo", "--config", "/x/stage_config.json"]
