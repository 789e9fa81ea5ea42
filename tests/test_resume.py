"""Resume after a crash (issue 12): a killed training step resumes from its checkpoint, and a
killed run worker does not keep its ``training`` pool slot.

``test_killed_ppo_step_resumes_from_its_checkpoint`` kills -9 the torchrun worker of a real
``ppo_policy`` materialization once a checkpoint exists; the asset's RetryPolicy retry must
resume from it and ship the weights of an uninterrupted run. ``test_monitoring_frees_the_slot_
of_a_killed_run`` runs ``dagster-daemon`` on the embedded ``dagster.yaml`` (pipelines/cli.py),
kills -9 a run worker that holds the pool slot, and waits for the run to fail and the slot
to be freed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DAGSTER_BIN = Path(sys.executable).parent


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2) -> object:
    """Poll ``condition`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------------- run monitoring frees the pool slot
SLOT_HOLDER = '''
import os, time
from pathlib import Path
import dagster as dg

@dg.asset(pool="training")
def hold_training_slot() -> None:
    # the pid of the run worker (in-process executor): the test kills it -9
    Path(os.environ["SLOT_HOLDER_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(600)

defs = dg.Definitions(assets=[hold_training_slot], jobs=[dg.define_asset_job(
    "hold_slot", selection=[hold_training_slot], executor_def=dg.in_process_executor)])
'''


def _claimed(instance: dg.DagsterInstance) -> list:
    return list(instance.event_log_storage.get_concurrency_info("training").claimed_slots)


def test_monitoring_frees_the_slot_of_a_killed_run(rlhf_home: Path, tmp_path: Path) -> None:
    from pipelines import cli

    env = cli.setup_embedded_env(dict(os.environ))
    config_file = Path(env["DAGSTER_HOME"]) / "dagster.yaml"
    config = yaml.safe_load(config_file.read_text())
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    # the shipped intervals, shortened so the test takes seconds, not minutes
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=1)
    config_file.write_text(yaml.safe_dump(config))
    code = tmp_path / "slot_holder.py"
    code.write_text(textwrap.dedent(SLOT_HOLDER))
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, **env, "SLOT_HOLDER_PID_FILE": str(pid_file)}
    dg.DagsterInstance.get().dispose()  # create the SQLite storage before two processes race to
    daemon = subprocess.Popen([str(DAGSTER_BIN / "dagster-daemon"), "run", "-f", str(code)], env=env,
                              cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # queued (the embedded instance queues runs); the daemon launches it in its code server
        launch = subprocess.run([str(DAGSTER_BIN / "dagster"), "job", "launch", "-f", str(code), "-j", "hold_slot"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert launch.returncode == 0, launch.stderr[-3000:]
        with dg.DagsterInstance.get() as instance:
            assert instance.run_monitoring_enabled
            wait_for(lambda: pid_file.is_file() and _claimed(instance), 180, "the run to claim the slot")
            (run,) = instance.get_runs()
            assert [s.run_id for s in _claimed(instance)] == [run.run_id]
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            wait_for(lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE,
                     60, "the killed run to be marked FAILURE")
            wait_for(lambda: not _claimed(instance), 60, "the monitoring daemon to free the slot")
            messages = [e.message for e in instance.all_logs(run.run_id)]
            assert any("terminated by signal 9" in (m or "") for m in messages), messages
    finally:
        os.killpg(daemon.pid, signal.SIGINT)  # dagster-daemon stops on SIGINT, not SIGTERM
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


# ---------------------------------------------------------------- a killed PPO step resumes
PPO_STEPS = 6


def resume_run_config(ops: Callable[[str], bool]) -> dict:
    """configs/tiny.yaml, only the ``ops`` of the job, with a PPO that checkpoints every step
    and runs a few more steps."""
    from test_model_assets import tiny_run_config

    config = tiny_run_config()
    config["ops"] = {k: v for k, v in config["ops"].items() if ops(k)}
    ppo = config["ops"]["ppo_policy"]["config"]
    ppo["steps"] = PPO_STEPS
    ppo.setdefault("overrides", {})["save_every"] = 1
    return config


def _training_workers() -> list[psutil.Process]:
    """The torchrun workers (not torchrun itself) of this test process: what an OOM kill hits."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "pipelines.pipes_launcher" in cmd and "torch.distributed.run" not in cmd:
            found.append(proc)
    return found


def kill_at_first_checkpoint(ppo_root: Path, skip: Path, killed: dict, stop: threading.Event) -> None:
    """Kill -9 the PPO worker once a complete checkpoint exists in a folder other than ``skip``."""
    from ppo_core.checkpoint import find_latest_checkpoint

    while not stop.is_set():
        for out in ppo_root.glob("*/"):
            latest = find_latest_checkpoint(out / "checkpoints") if out != skip else None
            workers = _training_workers() if latest is not None else []
            if workers:
                for proc in workers:
                    proc.send_signal(signal.SIGKILL)
                killed.update(step=int(latest.name.removeprefix("step_")), pids=[p.pid for p in workers])
                return
        time.sleep(0.05)


def materialize_lineage(selection: object, run_config: dict, home: Path,
                        instance: dg.DagsterInstance) -> dg.ExecuteInJobResult:
    """``selection`` of the lineage with the tests' local resources and ``run_config``."""
    from test_model_assets import lineage_assets, local_resources

    return dg.materialize(lineage_assets(), selection=selection, instance=instance,
                          resources=local_resources(home), run_config=run_config)


def _materialize(selection: object, ops: Callable[[str], bool], home: Path,
                 instance: dg.DagsterInstance) -> dg.ExecuteInJobResult:
    return materialize_lineage(selection, resume_run_config(ops), home, instance)


def test_killed_ppo_step_resumes_from_its_checkpoint(rlhf_home: Path) -> None:
    from resources import settings

    ppo_root = settings.models_root() / "ppo_policy"
    with dg.DagsterInstance.get() as instance:
        # uninterrupted: the whole lineage up to ppo_policy (its SFT / RM outputs are reused below)
        upstream = dg.AssetSelection.assets("ppo_policy").upstream().required_multi_asset_neighbors()
        straight = _materialize(upstream, lambda op: not op.startswith("evaluation_report"), rlhf_home, instance)
        straight_dir = ppo_root / straight.run_id
        assert (straight_dir / "checkpoints" / f"step_{PPO_STEPS}").is_dir()  # save_every 1 wrote them
        killed: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=kill_at_first_checkpoint, args=(ppo_root, straight_dir, killed, stop))
        killer.start()
        try:
            resumed = _materialize(["ppo_policy"], lambda op: op.startswith("ppo_policy"), rlhf_home, instance)
        finally:
            stop.set()
            killer.join()
        assert killed, "the PPO worker was never killed"
        events = instance.all_logs(resumed.run_id)

    assert resumed.success
    # the kill failed the first attempt; the RetryPolicy retried the step in the same run
    kinds = [e.dagster_event.event_type for e in events if e.dagster_event]
    assert dg.DagsterEventType.STEP_UP_FOR_RETRY in kinds and dg.DagsterEventType.STEP_RESTARTED in kinds
    resuming = [e.user_message for e in events if "resuming ppo_policy from checkpoint step" in e.user_message]
    assert len(resuming) == 1, resuming
    step = int(resuming[0].rsplit(" ", 1)[1])
    # the retry resumes from the newest checkpoint, written no earlier than the one seen at the kill
    assert 0 < killed["step"] <= step < PPO_STEPS
    out = ppo_root / resumed.run_id
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["step"] == PPO_STEPS
    mat = resumed.asset_materializations_for_node("ppo_policy")[-1]
    assert mat.metadata["resumed_from_step"].value == step
    manifest = resumed.output_for_node("ppo_policy")
    import mlflow

    tags = mlflow.MlflowClient(f"sqlite:///{rlhf_home / 'mlflow.db'}").get_run(manifest["mlflow_run_id"]).data.tags
    assert tags["rlhf.resumed_from_step"] == str(step)
    # the resumed run ships the weights of the uninterrupted one (as tests/test_ppo.py checks
    # at engine level: same tolerance)
    import torch
    from safetensors.torch import load_file

    a = load_file(straight_dir / "final" / "model.safetensors")
    b = load_file(Path(manifest["model_path"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the pieces, without training
def _context(run_id: str, root_run_id: str | None, partition: str | None = None) -> object:
    from types import SimpleNamespace

    warnings: list[str] = []
    return SimpleNamespace(run=SimpleNamespace(run_id=run_id, root_run_id=root_run_id),
                           has_partition_key=partition is not None, partition_key=partition,
                           log=SimpleNamespace(warning=warnings.append), warnings=warnings)


def test_resume_dir_is_stable_across_reexecution_and_per_partition(rlhf_home: Path) -> None:
    from assets.models import resume_dir
    from resources import settings

    root = settings.models_root() / "ppo_policy"
    assert resume_dir("ppo_policy", _context("r1", None)) == root / "r1"
    # "re-execute from failure": a new run whose root is the original
    assert resume_dir("ppo_policy", _context("r2", "r1")) == root / "r1"
    assert resume_dir("ppo_policy", _context("r2", "r1", "round/3")) == root / "r1" / "round_3"
    assert (root / "r1" / "round_3").is_dir()


def test_training_assets_retry_but_not_on_a_bad_config(tmp_path: Path) -> None:
    from assets import models

    for asset in (models.sft_model, models.reward_model, models.heldout_reward_model, models.ppo_policy):
        assert asset.op.retry_policy == models.TRAINING_RETRY_POLICY
    assert models.TRAINING_RETRY_POLICY.max_retries >= 1
    with pytest.raises(dg.Failure, match="learning_rte") as info:
        models.stage_core_config("sft", models.SFTModelConfig(overrides={"learning_rte": 0.1}),
                                 data_dir=str(tmp_path), output_dir=str(tmp_path), model_name_or_path="x")
    assert info.value.allow_retries is False


def test_prepare_attempt_drops_stale_results(tmp_path: Path) -> None:
    from assets.models import prepare_attempt

    def leave_attempt(out: Path) -> Path:
        (out / "final").mkdir(parents=True)
        (out / "checkpoints" / "step_2").mkdir(parents=True)
        (out / "summary.json").write_text("{}")
        metrics = out / "metrics.jsonl"
        metrics.write_text("".join(f'{{"kind": "train", "step": {s}}}\n' for s in (1, 2, 3)))
        return metrics

    metrics = leave_attempt(tmp_path / "resumed")
    prepare_attempt(tmp_path / "resumed", metrics, resumed=2, operator_resume=False)
    assert not (tmp_path / "resumed" / "summary.json").exists()     # never read as this attempt's
    assert (tmp_path / "resumed" / "checkpoints" / "step_2").is_dir()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2]  # step 3 is redone by the resumed run
    metrics = leave_attempt(tmp_path / "fresh")
    prepare_attempt(tmp_path / "fresh", metrics, resumed=None, operator_resume=False)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_a_reward_model_with_candidates_resumes_its_unfinished_one(tmp_path: Path) -> None:
    """Candidate mismatched_0.5 finished (at step 9), mismatched_0 checkpointed step 4 of its run."""
    from assets.models import latest_checkpoint_step, prepare_attempt

    out = tmp_path / "rm"
    assert latest_checkpoint_step(out) is None
    done, running = out / "candidates" / "mismatched_0.5", out / "candidates" / "mismatched_0"
    for c, step in ((done, 8), (running, 4)):
        (c / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (c / "checkpoints" / f"step_{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    (done / "summary.json").write_text('{"completed": true}')
    (done / "final").mkdir()  # a finished candidate has shipped its weights
    # the finished candidate's checkpoint (8) is not where this attempt resumes
    assert latest_checkpoint_step(out) == 4
    metrics = out / "metrics.jsonl"
    rows = [("mismatched_0.5", s) for s in (4, 8, 9)] + [("mismatched_0", s) for s in (4, 5)]
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s, f"{c}/train/loss": 1.0}) + "\n"
                               for c, s in rows))
    prepare_attempt(out, metrics, resumed=4, operator_resume=False)
    kept = [(next(k for k in r if "/" in k).split("/")[0], r["step"]) for r in map(json.loads, metrics.read_text().splitlines())]
    assert kept == rows[:4]  # only the unfinished candidate's step 5 is redone
    # a finished candidate and none checkpointed yet: resume from step 0, keeping the finished one
    shutil.rmtree(running)
    assert latest_checkpoint_step(out) == 0


def test_checkpoints_of_other_inputs_are_neither_resumed_nor_overwritten(rlhf_home: Path, tmp_path: Path) -> None:
    from assets.models import INPUTS_FILE, attempt_dir, stage_inputs
    from ppo_core.reward import RewardConfig
    from resources import settings

    model = tmp_path / "sft_final"
    model.mkdir()
    (model / "config.json").write_text('{"n_layer": 2}')
    paths = {"model_name_or_path": str(model), "data_dir": str(tmp_path)}
    cfg = RewardConfig(model_name_or_path=str(model), data_dir=str(tmp_path), output_dir="")
    inputs = stage_inputs(cfg, "dv1", paths)
    assert set(inputs["models"]) == {"model_name_or_path"}  # the data dir is covered by the data version
    # where it writes and how it starts are not inputs
    assert stage_inputs(RewardConfig(**{**vars(cfg), "output_dir": "/x", "resume_from": "latest"}),
                        "dv1", paths) == inputs
    assert stage_inputs(RewardConfig(**{**vars(cfg), "learning_rate": 2e-3}), "dv1", paths)["config"] != inputs["config"]
    assert stage_inputs(cfg, "dv2", paths)["data_version"] == "dv2"

    root = settings.models_root() / "reward_model"
    first = _context("r1", None)
    assert attempt_dir("reward_model", first, inputs) == root / "r1"  # nothing recorded yet
    (root / "r1" / INPUTS_FILE).write_text(json.dumps(inputs))
    # a retry, or a re-execution of r1 with the same inputs, resumes in r1's folder
    assert attempt_dir("reward_model", first, inputs) == root / "r1"
    assert attempt_dir("reward_model", _context("r2", "r1"), inputs) == root / "r1"
    # the upstream model changed (same path, other weights): r2 trains in a folder of its own
    (model / "config.json").write_text('{"n_layer": 4}')
    changed = stage_inputs(cfg, "dv1", paths)
    assert changed["models"] != inputs["models"]
    again = _context("r2", "r1")
    assert attempt_dir("reward_model", again, changed) == root / "r2"
    assert again.warnings == [f"reward_model: the checkpoints in {root / 'r1'} were trained from other inputs "
                              f"(models differ); training afresh in {root / 'r2'}"]
    assert json.loads((root / "r1" / INPUTS_FILE).read_text()) == inputs  # r1's folder untouched
    # within r1 itself other inputs cannot appear; if its record says so, refuse rather than guess
    with pytest.raises(dg.Failure, match="other inputs") as info:
        attempt_dir("reward_model", _context("r1", None), changed)
    assert info.value.allow_retries is False
