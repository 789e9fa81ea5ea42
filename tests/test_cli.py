"""The `rlhf` CLI without training: embedded env, run config, summary, server start/stop."""

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import cli


def test_setup_writes_dagster_yaml_once_and_keeps_existing_env(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    env = {"RLHF_HOME": str(home)}
    monkeypatch.setenv("RLHF_HOME", str(home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = cli.setup_embedded_env(env)
    assert out["DAGSTER_HOME"] == str(home / "dagster_home")
    assert out["MLFLOW_TRACKING_URI"] == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    config = yaml.safe_load((home / "dagster_home" / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert (home / "landing").is_dir()

    custom = {"RLHF_HOME": str(home), "DAGSTER_HOME": str(tmp_path / "prod"),
              "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"}
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "dagster.yaml").write_text("storage: {}\n")
    assert cli.setup_embedded_env(custom)["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert (tmp_path / "prod" / "dagster.yaml").read_text() == "storage: {}\n"


def test_load_run_config_errors_name_the_file(tmp_path: Path) -> None:
    assert cli.load_run_config(None) == {}
    with pytest.raises(SystemExit, match="does not exist"):
        cli.load_run_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SystemExit, match="must hold a mapping"):
        cli.load_run_config(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("ops: {raw_preferences: {config: {n_pairs: 10}}}\n")
    assert cli.load_run_config(str(good))["ops"]["raw_preferences"]["config"]["n_pairs"] == 10


def test_rlhf_run_refuses_an_unimportable_gold_scorer_before_anything_runs(rlhf_home: Path, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"ops": {
        "raw_preferences": {"config": {"source": "bundled", "n_pairs": 300}},
        "evaluation_report": {"config": {"gold_scorer": "no_such_scorer_module:score"}},
    }}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the working directory on it
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("rlhf run: evaluation_report.gold_scorer: reward function 'no_such_scorer_module:score': "
                             "cannot import module 'no_such_scorer_module'")
    assert f"the working directory ({tmp_path}) is on the import path" in err[0]
    assert err[1:] == ["rlhf run: nothing was run"]
    assert not (rlhf_home / "logs").exists() and not (rlhf_home / "summary.json").exists()


def write_manifest(home: Path, asset: str, run_id: str, value: dict) -> None:
    path = home / "manifests" / asset / "runs" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_summary_reads_this_runs_manifests(rlhf_home: Path) -> None:
    run_id = "run-1"
    write_manifest(rlhf_home, "reward_model", run_id, {"summary": {"eval/accuracy": 0.91}})
    write_manifest(rlhf_home, "ppo_policy", run_id, {"summary": {"objective/kl": 1.5, "kept_step": 45.0,
                                                                 "guard/best_step": 50.0}, "model_path": "/m"})
    write_manifest(rlhf_home, "evaluation_report", run_id, {
        "data_version": "dv1", "report_path": "/r/report.json",
        "metrics": {"sft/gold_mean": 1.0, "ppo/gold_mean": 2.5, "win_rate_gold": 0.8, "win_rate_gold_se": 0.05,
                    "win_rate_rm": 0.9, "ppo/kl_to_ref": 0.3, "ppo/ended_eos_frac": 0.95}})
    write_manifest(rlhf_home, "registered_policy", run_id, {"model_name": "rlhf-policy", "version": "3"})
    registry = {"aliases": {"champion": "3", "challenger": "3"},
                "last_promotion": {"promoted": True, "reason": "better"}}
    summary = cli.build_summary(run_id, "succeeded", {"evaluation_report:ppo_beats_sft": True}, [], 12.0,
                                registry)
    assert summary["reward_model_accuracy"] == 0.91
    assert (summary["gold_reward_sft"], summary["gold_reward_ppo"]) == (1.0, 2.5)
    assert summary["gold_win_rate"] == 0.8 and summary["kl_to_sft"] == 0.3
    assert summary["registered_version"] == "3" and summary["aliases"]["champion"] == "3"
    assert summary["where"]["summary"] == str(rlhf_home / "summary.json")
    text = cli.format_summary(summary)
    assert "1.000 -> 2.500" in text and "champion=v3" in text and "promoted (better)" in text
    assert ": 45 (held-out" in text and "best held-out score at step 50)" in text  # steps, not 45.000
    assert summary["gold_win_rate_se"] == 0.05 and "0.800 +- 0.050" in text
    assert summary["reward_model_gold_agreement_se"] is None   # not in the report: no "+-"


def test_summary_of_a_run_that_stopped_early(rlhf_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.internal:5000")
    summary = cli.build_summary("run-2", "failed", {"reward_model:reward_model_accuracy": False},
                                ["reward_model"], 3.0, {})
    # summary.json and the terminal never carry the tracking server's credentials
    assert summary["where"]["mlflow_tracking_uri"] == "https://mlflow.internal:5000"
    assert "s3cret" not in json.dumps(summary) and "s3cret" not in cli.format_summary(summary)
    assert summary["gold_reward_ppo"] is None and summary["registered_version"] is None
    text = cli.format_summary(summary)
    assert "FAILED checks" in text and "reward_model_accuracy" in text and "not registered" in text


def test_server_in_own_session_stops_on_sigint_even_when_parent_ignores_it(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(120)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored dispositions are inherited
    try:
        proc = cli.start_in_own_session([sys.executable, "-c", script], {}, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None
    code = cli.stop_session(proc, timeout=10)
    # Terminated by SIGINT (KeyboardInterrupt, exit 1 / -SIGINT), not escalated to SIGKILL.
    assert code in (1, -signal.SIGINT, 128 + signal.SIGINT)
    assert cli.stop_session(proc) == code


# ---------------------------------------------------------------- what `rlhf run` shows
REPO = Path(__file__).resolve().parents[1]


def test_output_to_log_sends_this_and_child_processes_output_to_the_file(tmp_path: Path, capfd) -> None:
    import subprocess

    from pipelines.run_output import output_to_log

    log = tmp_path / "run.log"
    child = "import sys; print('child stdout'); print('child stderr', file=sys.stderr)"
    with output_to_log(log) as terminal:
        subprocess.run([sys.executable, "-c", child], check=True)
        print("python print")
        terminal.write("[ 1/1] step .... done\n")
    captured = capfd.readouterr()
    assert captured.out == "[ 1/1] step .... done\n" and captured.err == ""
    text = log.read_text()
    assert all(s in text for s in ("child stdout", "child stderr", "python print"))
    print("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


def test_rlhf_run_prints_one_line_per_asset_and_logs_everything_to_a_file(tmp_path: Path) -> None:
    """A real `rlhf run` that stops at the blocking quarantine check (no training: ~15 s)."""
    import os
    import subprocess

    from pipelines.definitions import defs
    from pipelines.run_output import asset_steps

    home = tmp_path / "home"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"ops": {
        "raw_preferences": {"config": {"source": "bundled", "n_pairs": 300}},
        "preference_pairs_quarantine_fraction_below_threshold": {"config": {"max_quarantine_fraction": 0.0}},
    }}))
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)],
                          cwd=REPO, env={**env, "RLHF_HOME": str(home)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr  # the check failed on purpose
    out = proc.stdout.splitlines()
    steps = asset_steps(defs.resolve_job_def(cli.LINEAGE_JOB))
    step_lines = [line for line in out if line.startswith("[")]
    assert [re.match(r"\[ *[-\d]+/\d+\] (\S+) ", line).group(1) for line in step_lines] == steps  # each once
    assert step_lines[0].startswith(f"[ 1/{len(steps)}] raw_preferences ") and " done in " in step_lines[0]
    assert "not run" in next(line for line in step_lines if " dataset_splits " in line)
    assert "DEBUG" not in proc.stdout + proc.stderr
    assert all(line.startswith("error: ") or line.startswith("preference_pairs")
               for line in proc.stderr.splitlines()), proc.stderr
    log = Path(out[0].rsplit(" ", 1)[-1])
    assert log.parent == home / "logs" and out[-1] == f"full Dagster log: {log}"
    text = log.read_text()
    run_id = log.stem
    for event in ("RUN_START", "STEP_START", "ASSET_MATERIALIZATION", "STEP_SUCCESS", "ASSET_CHECK_EVALUATION",
                  "RUN_FAILURE"):
        assert event in text, event
    assert text.count(run_id) > 20 and "DEBUG" in text
    assert json.loads((home / "summary.json").read_text())["where"]["log"] == str(log)


def test_manifest_paths_are_the_io_managers_layout(tmp_path: Path) -> None:
    from pipelines.io_managers import manifest_path

    assert manifest_path(tmp_path, ["ppo_policy"]) == tmp_path / "ppo_policy.json"
    assert manifest_path(tmp_path, ["ppo_policy"], run_id="r1") == tmp_path / "ppo_policy" / "runs" / "r1.json"
    assert (manifest_path(tmp_path, ["round_policy"], partition="round-0001")
            == tmp_path / "round_policy" / "partitions" / "round-0001.json")
