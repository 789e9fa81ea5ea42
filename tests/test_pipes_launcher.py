"""The out-of-process launch path: callback -> MLflow/metrics file, and torchrun + Dagster Pipes end to end.

The end-to-end test launches a stand-in stage module (same ``main(argv, callbacks)`` contract as
``ppo_core.sft``) so it checks the wiring in seconds, independent of training speed.
"""


import json
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest

from pipelines.pipes_launcher import PipesMlflowCallback, stage_module, summary_metadata
from resources.launcher import TrainingLauncher
from resources.tracking import MLflowResource, code_version, flatten, redact_params

FAKE_STAGE = textwrap.dedent('''
    """A stand-in training stage: logs a loss that halves each step, then writes its summary."""
    import argparse, json, os
    from pathlib import Path

    def main(argv=None, callbacks=()):
        p = argparse.ArgumentParser()
        p.add_argument("--config", required=True)
        args = p.parse_args(argv)
        cfg = json.loads(Path(args.config).read_text())
        steps, out = cfg["max_steps"], Path(cfg["output_dir"])
        for cb in callbacks:
            cb.on_train_begin("fake", steps, cfg)
        for step in range(1, steps + 1):
            for cb in callbacks:
                cb.on_log(step, {"train/loss": 2.0 ** -step, "objective/kl": 0.1 * step,
                                 "objective/scores": float(step)})
        for cb in callbacks:
            cb.on_evaluate(steps, {"eval/loss": 0.5})
            cb.on_checkpoint(steps, str(out / "checkpoints" / f"step_{steps}"))
        summary = {"train/loss": 2.0 ** -steps, "output_dir": str(out), "world_size":
                   int(os.environ.get("WORLD_SIZE", "1")), "rank": int(os.environ.get("RANK", "0"))}
        if summary["world_size"] > 1:  # the ranks really form one process group: sum of rank + 1
            import torch, torch.distributed as dist
            dist.init_process_group("gloo")
            total = torch.tensor([summary["rank"] + 1.0])
            dist.all_reduce(total)
            summary["rank_sum"] = total.item()
            dist.destroy_process_group()
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary))
        for cb in callbacks:
            cb.on_train_end(summary)
        return 0
''')


@pytest.fixture()
def mlflow_res(tmp_path: Path) -> MLflowResource:
    return MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_root=(tmp_path / "artifacts").as_uri(), experiment_name="test")


def test_stage_module_maps_names_and_rejects_unknown() -> None:
    assert stage_module("ppo") == "ppo_core.ppo"
    assert stage_module("my.pkg.stage") == "my.pkg.stage"
    with pytest.raises(SystemExit, match="unknown stage 'dpo'"):
        stage_module("dpo")


def test_params_are_flattened_and_secrets_redacted() -> None:
    flat = flatten({"a": {"b": 1, "hf_token": "xyz"}, "lr": 0.1})
    assert flat == {"a.b": 1, "a.hf_token": "xyz", "lr": 0.1}
    red = redact_params(flat)
    assert red["a.hf_token"] != "xyz" and red["a.b"] == "1" and red["lr"] == "0.1"
    # secrets inside values, under names that do not look secret
    red = redact_params({"headers.Authorization": "Bearer sk-1", "model": "https://alice:pw@host/m",
                         "note": "use bearer abc.def please", "plain": "https://host/m"})
    assert red == {"headers.Authorization": "***redacted***", "model": "https://***redacted***@host/m",
                   "note": "use bearer ***redacted*** please", "plain": "https://host/m"}
    assert code_version()  # a git sha here, else the package version


def test_launcher_command_and_env(tmp_path: Path) -> None:
    launcher = TrainingLauncher(nproc_per_node=2, ds_accelerator="cpu", extra_env={"FOO": "1"})
    cmd = launcher.command("sft", tmp_path / "c.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-3:] == ["sft", "--config", str(tmp_path / "c.json")] and "pipelines.pipes_launcher" in cmd
    env = launcher.env("sqlite:///x.db", "run123", tmp_path / "m.jsonl")
    assert env["MLFLOW_RUN_ID"] == "run123" and env["DS_ACCELERATOR"] == "cpu" and env["FOO"] == "1"
    with pytest.raises(ValueError, match="nproc_per_node"):
        TrainingLauncher(nproc_per_node=0).command("sft", "c.json")


def _flags(cmd: list[str]) -> list[str]:
    """The torchrun flags of a launch command (between the module name and ``-m`` of the stage)."""
    return cmd[3:cmd.index("pipelines.pipes_launcher") - 1]


def test_one_node_is_standalone_by_default() -> None:
    assert _flags(TrainingLauncher().command("ppo", "c.json")) == ["--standalone", "--nproc-per-node", "1"]
    assert _flags(TrainingLauncher(nproc_per_node=2).command("ppo", "c.json")) == [
        "--standalone", "--nproc-per-node", "2"]


def test_several_nodes_use_a_static_rendezvous_with_this_machine_as_node_0() -> None:
    launcher = TrainingLauncher(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29500")
    rendezvous = ["--nnodes", "2", "--rdzv-backend", "static", "--rdzv-endpoint", "10.0.0.1:29500"]
    node0 = launcher.command("ppo", "/shared/c.json")
    assert _flags(node0) == [*rendezvous[:2], "--node-rank", "0", *rendezvous[2:], "--nproc-per-node", "8"]
    assert "--standalone" not in node0 and node0[0] == sys.executable
    node1 = launcher.command("ppo", "/shared/c.json", node_rank=1, python="python")
    assert node1[0] == "python" and _flags(node1) == [*rendezvous[:2], "--node-rank", "1", *rendezvous[2:],
                                                      "--nproc-per-node", "8"]
    with pytest.raises(ValueError, match="node_rank=2: choose 0 to 1"):
        launcher.command("ppo", "c.json", node_rank=2)
    # what another node runs: its environment and its own python, quoted for a shell
    line = launcher.node_command("ppo", "/shared/my config.json", 1)
    assert line.startswith("RLHF_HOME=") and "DS_ACCELERATOR=" in line
    assert "python -m torch.distributed.run --nnodes 2 --node-rank 1 --rdzv-backend static" in line
    assert line.endswith("pipelines.pipes_launcher ppo --config '/shared/my config.json'")
    # the line is logged: a secret in extra_env goes by reference, for that node's shell to fill in
    secret = TrainingLauncher(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29500",
                              extra_env={"HF_TOKEN": "hf_SECRET123", "FOO": "a b"})
    line = secret.node_command("ppo", "/shared/c.json", 1)
    assert "hf_SECRET123" not in line
    assert ' HF_TOKEN="$HF_TOKEN" ' in line and " 'FOO=a b' " in line


def test_c10d_rendezvous_on_one_node_names_its_id() -> None:
    launcher = TrainingLauncher(nproc_per_node=2, rdzv_backend="c10d", rdzv_endpoint="localhost:29400")
    assert _flags(launcher.command("sft", "c.json")) == [
        "--nnodes", "1", "--node-rank", "0", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:29400",
        "--rdzv-id", "sft", "--nproc-per-node", "2"]
    launcher = TrainingLauncher(rdzv_backend="c10d", rdzv_endpoint="localhost:29400", rdzv_id="job7")
    assert _flags(launcher.command("sft", "c.json"))[-3:] == ["job7", "--nproc-per-node", "1"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"nnodes": 0}, "nnodes must be >= 1"),
    ({"nnodes": 2}, "nnodes=2 needs rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "node0"}, "write host:port"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:http"}, "write host:port"),
    ({"rdzv_endpoint": ":29500"}, "write host:port"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:29500", "rdzv_backend": "c10d"}, "use rdzv_backend 'static'"),
    ({"rdzv_backend": "c10d"}, "c10d' needs rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:29500", "rdzv_id": "x"}, "c10d backend only"),
])
def test_bad_rendezvous_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainingLauncher(**settings).command("ppo", "c.json")


def test_a_bad_launcher_fails_the_run_before_any_step(tmp_path: Path) -> None:
    """Checked when the run sets up its resources (``setup_for_execution``), so a launcher
    misconfigured by run config fails before any training process starts."""
    ran = []

    @dg.asset
    def uses_launcher(launcher: TrainingLauncher) -> None:
        ran.append(1)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.materialize([uses_launcher], instance=instance, raise_on_error=False,
                                resources={"launcher": TrainingLauncher()},
                                run_config={"resources": {"launcher": {"config": {"nnodes": 2}}}})
    assert not result.success and not ran
    failure = next(e for e in result.all_events if e.is_failure)
    assert "needs rdzv_endpoint" in str(failure.event_specific_data)


def test_callback_batches_metrics_into_mlflow_and_file(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    client = mlflow_res.client()
    run = client.create_run(mlflow_res.experiment_id())
    cb = PipesMlflowCallback(mlflow_client=client, mlflow_run_id=run.info.run_id,
                             metrics_file=tmp_path / "m.jsonl", flush_every=4)
    cb.on_train_begin("sft", 10, {})
    for step in range(1, 11):
        cb.on_log(step, {"train/loss": 1.0 / step, "lr": 0.1})
    cb.on_train_end({"train/loss": 0.1})
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[0]["kind"] == "train"


def test_summary_metadata_keeps_finite_numbers_and_text() -> None:
    meta = summary_metadata({"loss": 0.5, "bad": float("nan"), "output_dir": "/x", "flag": True}, ["/c/1"])
    assert meta["summary/loss"]["raw_value"] == 0.5 and meta["summary/output_dir"]["raw_value"] == "/x"
    assert "summary/bad" not in meta and "summary/flag" not in meta
    assert meta["last_checkpoint"]["raw_value"] == "/c/1"


def test_torchrun_pipes_end_to_end(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    """A real torchrun launch through Pipes: metrics reach MLflow, logs and metadata reach Dagster."""
    (tmp_path / "fake_pkg").mkdir()
    (tmp_path / "fake_pkg" / "__init__.py").write_text("")
    (tmp_path / "fake_pkg" / "stage.py").write_text(FAKE_STAGE)
    out = tmp_path / "out"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_steps": 6, "output_dir": str(out)}))
    launcher = TrainingLauncher(extra_env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"})

    @dg.asset
    def fake_model(context: dg.AssetExecutionContext, mlflow: MLflowResource,
                   launcher: TrainingLauncher) -> dg.MaterializeResult:
        run = mlflow.start_run(context, "fake_model", {"data_version": "dv1"})
        inv = launcher.launch(context, "fake_pkg.stage", config, mlflow_tracking_uri=mlflow.tracking_uri,
                              mlflow_run_id=run.info.run_id, metrics_file=tmp_path / "metrics.jsonl")
        result = inv.get_materialize_result()
        return dg.MaterializeResult(metadata={**result.metadata, "mlflow_run_id": run.info.run_id})

    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        res = dg.materialize([fake_model], instance=instance,
                             resources={"mlflow": mlflow_res, "launcher": launcher})
        assert res.success
        meta = res.asset_materializations_for_node("fake_model")[0].metadata
        assert meta["summary/train/loss"].value == pytest.approx(2.0 ** -6)
        assert meta["summary/world_size"].value == 1
        assert meta["last_checkpoint"].value.endswith("step_6")
        messages = [e.user_message for e in instance.all_logs(res.run_id)]
        assert any("[fake] step 6/6" in m for m in messages), "progress lines reach the event log"
        run_id = meta["mlflow_run_id"].value
    client = mlflow_res.client()
    run = client.get_run(run_id)
    assert run.data.tags["dagster.run_id"] == res.run_id and run.data.tags["data_version"] == "dv1"
    assert run.data.tags["dagster.asset_key"] == "fake_model" and run.data.tags["code_version"]
    assert len(client.get_metric_history(run_id, "objective/kl")) == 6
    assert client.get_metric_history(run_id, "eval/loss")[0].value == 0.5


def test_two_nodes_static_rendezvous_end_to_end(tmp_path: Path, mlflow_res: MLflowResource) -> None:
    """Two "nodes" on this machine: Dagster launches node 0, the test runs the line the step logs
    for node 1. They meet at the static rendezvous; global rank 0 is on the Dagster side, so its
    summary (world size 2) arrives through Pipes."""
    import os
    import subprocess

    from ppo_core.strategy import free_port

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "fake_pkg").mkdir()
    (tmp_path / "fake_pkg" / "__init__.py").write_text("")
    (tmp_path / "fake_pkg" / "stage.py").write_text(FAKE_STAGE)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"max_steps": 3, "output_dir": str(tmp_path / "out")}))
    port = free_port()
    launcher = TrainingLauncher(nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", omp_num_threads=1,
                                extra_env={"PYTHONPATH": f"{tmp_path}:{repo}"})

    @dg.asset
    def fake_model(context: dg.AssetExecutionContext, mlflow: MLflowResource,
                   launcher: TrainingLauncher) -> dg.MaterializeResult:
        run = mlflow.start_run(context, "fake_model")
        inv = launcher.launch(context, "fake_pkg.stage", config, mlflow_tracking_uri=mlflow.tracking_uri,
                              mlflow_run_id=run.info.run_id, metrics_file=tmp_path / "metrics.jsonl")
        return inv.get_materialize_result()

    line = launcher.node_command("fake_pkg.stage", config, 1)
    # node 1 waits at the rendezvous until node 0 hosts it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    node1 = subprocess.Popen(["bash", "-c", line], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        (tmp_path / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
            res = dg.materialize([fake_model], instance=instance,
                                 resources={"mlflow": mlflow_res, "launcher": launcher})
            messages = [e.user_message for e in instance.all_logs(res.run_id)]
        node1_output, _ = node1.communicate(timeout=120)
    finally:
        if node1.poll() is None:
            node1.kill()
    assert res.success and node1.returncode == 0, node1_output[-3000:]
    meta = res.asset_materializations_for_node("fake_model")[0].metadata
    assert meta["summary/world_size"].value == 2 and meta["summary/rank"].value == 0
    assert meta["summary/rank_sum"].value == 1 + 2  # one process group over both nodes
    assert any(line in m for m in messages), "the step logs the command of node 1"


def test_launcher_settings_from_the_environment_and_run_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment sets the node's ranks and rendezvous by environment (pipelines/definitions.py
    LAUNCHER_ENV_FIELDS); a run config (configs/gpu.yaml) still overrides them per run."""
    from pipelines.definitions import build_defs

    def launcher_config(run_config: dict) -> dict:
        job = build_defs().resolve_job_def("rlhf_lineage")
        return dg.validate_run_config(job, run_config)["resources"]["launcher"]["config"]

    assert launcher_config({})["nproc_per_node"] == 1 and launcher_config({})["nnodes"] == 1
    monkeypatch.setenv("RLHF_NPROC_PER_NODE", "8")
    monkeypatch.setenv("RLHF_NNODES", "2")
    monkeypatch.setenv("RLHF_RDZV_ENDPOINT", "10.0.0.1:29500")
    config = launcher_config({})
    assert (config["nproc_per_node"], config["nnodes"], config["rdzv_endpoint"]) == (8, 2, "10.0.0.1:29500")
    override = {"resources": {"launcher": {"config": {"nproc_per_node": 4}}}}
    assert launcher_config(override)["nproc_per_node"] == 4
    launcher = TrainingLauncher(**config)
    assert _flags(launcher.command("ppo", "c.json"))[:4] == ["--nnodes", "2", "--node-rank", "0"]
