"""The ``rlhf`` command: ``rlhf run`` (the whole lineage + promotion + summary), ``rlhf rounds``
and ``rlhf ui``.

``rlhf run`` sets up the embedded default (``DAGSTER_HOME`` under ``RLHF_HOME`` with a
``dagster.yaml``, MLflow on a local SQLite file), materializes the ``rlhf_lineage`` job (which
ends with the ``champion_policy`` promotion gate) in this process against that Dagster instance
(so the run shows in the UI afterwards), prints a summary and writes it to
``$RLHF_HOME/summary.json``.

``rlhf rounds -n N`` runs N RLHF rounds (``assets/rounds.py``), each a new partition of the
``rlhf_round`` job, from the current champion (running the lineage first when there is none),
and prints a table of gold, reward-model agreement and KL per round.

``rlhf ui`` starts ``dagster dev`` (127.0.0.1:3000) and ``mlflow server`` (127.0.0.1:5000) on
the same stores, each in its own session, and stops both on Ctrl-C.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from assets.preflight import gold_scorer_errors
from pipelines.io_managers import manifest_path
from resources import settings
from resources.redact import strip_credentials

LINEAGE_JOB = "rlhf_lineage"
# The embedded default instance. One training step at a time (the "training" pool of
# assets/models.py) and one run at a time: a 2-core machine has no room for two.
DEFAULT_DAGSTER_YAML = {
    "telemetry": {"enabled": False},
    "concurrency": {"pools": {"default_limit": 1}, "runs": {"max_concurrent_runs": 1}},
    "run_monitoring": {
        # A run worker killed -9 (OOM) is marked failed by its code server, but the pool slot
        # its step claimed is only freed by the monitoring daemon (`dagster dev` runs it):
        # without it one dead run blocks the "training" pool for good.
        "enabled": True,
        "start_timeout_seconds": 180,             # a run whose worker never started is failed
        "poll_interval_seconds": 30,              # a local SQLite instance: cheap to poll often
        "free_slots_after_run_end_seconds": 60,   # slots still held 60 s after a run ended
    },
}
STOP_TIMEOUT_SECONDS = 20.0


# ---------------------------------------------------------------- environment
def setup_embedded_env(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> dict[str, str]:
    """Export RLHF_HOME / DAGSTER_HOME / MLFLOW_TRACKING_URI and create the folders they name.

    Variables already set are kept (the production profile sets them); a ``dagster.yaml`` is
    written only when the Dagster home has none.
    """
    environ.setdefault("RLHF_HOME", str(settings.rlhf_home()))
    environ.setdefault("DAGSTER_HOME", str(settings.dagster_home()))
    environ.setdefault("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri())
    home = Path(environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(
            "# Embedded default written by `rlhf run`; see README (production profile) to replace it.\n"
            + yaml.safe_dump(DEFAULT_DAGSTER_YAML, sort_keys=False)
        )
    uri = environ["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    settings.landing_dir().mkdir(parents=True, exist_ok=True)
    return {k: environ[k] for k in ("RLHF_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI")}


def load_run_config(path: str | None) -> dict[str, Any]:
    """A Dagster run config (YAML or JSON) for the lineage job, e.g. to use your own dataset."""
    if not path:
        return {}
    file = settings.config_file(path)  # a shipped config by name works outside the checkout
    if not file.is_file():
        raise SystemExit(f"rlhf run --config: {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"rlhf run --config: {file} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"rlhf run --config: {file} must hold a mapping with an 'ops' key")
    return data


def refuse_unimportable(run_config: Mapping[str, Any], command: str) -> bool:
    """Print why and return True when a gold scorer the config names does not import
    (:func:`assets.preflight.gold_scorer_errors`)."""
    errors = gold_scorer_errors(run_config)
    for error in errors:
        print(f"{command}: {error}", file=sys.stderr)
    if errors:
        print(f"{command}: nothing was run", file=sys.stderr)
    return bool(errors)


# ---------------------------------------------------------------- summary
def read_manifest(asset: str, run_id: str | None = None) -> dict[str, Any] | None:
    """The JSON manifest an asset wrote (for ``run_id`` when given, else the latest)."""
    path = manifest_path(settings.manifests_root(), [asset], run_id=run_id)
    return json.loads(path.read_text()) if path.is_file() else None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def registry_state(tracking_uri: str, name: str) -> dict[str, Any]:
    """Aliases and the last promotion decision of a registered model (empty when not registered)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ops.registry import LAST_DECISION_TAG

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {}
    decision = model.tags.get(LAST_DECISION_TAG)
    return {"aliases": {k: str(v) for k, v in model.aliases.items()},
            "last_promotion": json.loads(decision) if decision else None}


def build_summary(
    run_id: str,
    status: str,
    checks: Mapping[str, bool],
    failed_steps: Sequence[str],
    elapsed_seconds: float,
    registry: Mapping[str, Any],
) -> dict[str, Any]:
    """The headline numbers of one lineage run and where to look for the rest."""
    from assets.models import PPO_KL_KEYS, RM_ACCURACY_KEYS, first_metric

    rm = read_manifest("reward_model", run_id) or {}
    ppo = read_manifest("ppo_policy", run_id) or {}
    report = read_manifest("evaluation_report", run_id) or {}
    registered = read_manifest("registered_policy", run_id) or {}
    metrics = report.get("metrics") or {}
    rm_acc = first_metric(rm.get("summary", {}), RM_ACCURACY_KEYS)
    train_kl = first_metric(ppo.get("summary", {}), PPO_KL_KEYS)
    home = settings.rlhf_home()
    tracking = os.environ.get("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri())
    model_name = registered.get("model_name")
    return {
        "dagster_run_id": run_id,
        "status": status,
        "failed_steps": list(failed_steps),
        "elapsed_seconds": round(elapsed_seconds, 1),
        "data_version": report.get("data_version") or ppo.get("data_version"),
        "reward_model_accuracy": rm_acc[1] if rm_acc else None,
        "reward_model_test_accuracy": _num(metrics.get("rm/pair_accuracy")),
        "reward_model_gold_agreement": _num(metrics.get("rm/gold_agreement")),
        "reward_model_gold_agreement_se": _num(metrics.get("rm/gold_agreement_se")),
        "gold_reward_sft": _num(metrics.get("sft/gold_mean")),
        "gold_reward_ppo": _num(metrics.get("ppo/gold_mean")),
        "gold_win_rate": _num(metrics.get("win_rate_gold")),
        "gold_win_rate_se": _num(metrics.get("win_rate_gold_se")),
        "rm_win_rate": _num(metrics.get("win_rate_rm")),
        "heldout_win_rate": _num(metrics.get("win_rate_heldout")),
        "kl_to_sft": _num(metrics.get("ppo/kl_to_ref")),
        "kl_to_sft_per_response": _num(metrics.get("ppo/kl_to_ref_per_response")),
        "kl_to_sft_per_response_se": _num(metrics.get("ppo/kl_to_ref_per_response_se")),
        "ppo_kept_step": _num(ppo.get("summary", {}).get("kept_step")),
        "ppo_heldout_gain": _num(ppo.get("summary", {}).get("guard/heldout_gain")),
        "ppo_best_step": _num(ppo.get("summary", {}).get("guard/best_step")),
        "ppo_train_kl": train_kl[1] if train_kl else None,
        "ppo_ended_eos_frac": _num(metrics.get("ppo/ended_eos_frac")),
        "checks": dict(checks),
        "registered_model": model_name,
        "registered_version": registered.get("version"),
        "aliases": registry.get("aliases", {}),
        "promotion": registry.get("last_promotion"),
        "where": {
            "summary": str(home / "summary.json"),
            "rlhf_home": str(home),
            "dagster_home": os.environ.get("DAGSTER_HOME", str(settings.dagster_home())),
            "mlflow_tracking_uri": strip_credentials(tracking),
            "evaluation_report": report.get("report_path"),
            "samples": report.get("samples_path"),
            "policy_dir": report.get("ppo_model_path") or ppo.get("model_path"),
            "ui": ("rlhf ui  (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000)"
                   if not settings.is_tracking_server(tracking) else f"MLflow {settings.mlflow_ui_url(tracking)}"),
            "dagster_run": f"http://127.0.0.1:3000/runs/{run_id}",
            "load_champion": (f"mlflow.transformers.load_model('models:/{model_name}@champion')"
                              if model_name else None),
        },
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable summary (the JSON file has the same content)."""
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else ("n/a" if value is None else str(value))

    def step(value: Any) -> str:  # steps travel as floats through the metric summaries
        return "n/a" if value is None else str(int(value))

    def pm(key: str) -> str:  # a measure and its standard error, when the report has one
        se = summary.get(f"{key}_se")
        return fmt(summary.get(key)) + (f" +- {se:.3f}" if isinstance(se, float) else "")

    aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(summary["aliases"].items())) or "none"
    promotion = summary.get("promotion") or {}
    lines = [
        f"rlhf run {summary['status']} in {summary['elapsed_seconds']:.0f}s "
        f"(Dagster run {summary['dagster_run_id']})",
        f"  reward-model accuracy (eval split)     : {fmt(summary['reward_model_accuracy'])}",
        f"  reward-model accuracy (test pairs)     : {fmt(summary.get('reward_model_test_accuracy'))}",
        f"  RM agreement with gold ordering (test) : {pm('reward_model_gold_agreement')}",
        f"  gold reward SFT -> PPO                 : "
        f"{fmt(summary['gold_reward_sft'])} -> {fmt(summary['gold_reward_ppo'])}",
        f"  gold win rate PPO vs SFT               : {pm('gold_win_rate')}",
        f"  RM win rate PPO vs SFT                 : {fmt(summary['rm_win_rate'])}",
        f"  held-out RM win rate PPO vs SFT        : {fmt(summary.get('heldout_win_rate'))}",
        f"  KL(PPO || SFT) held-out, per response  : {pm('kl_to_sft_per_response')} nats "
        f"({fmt(summary['kl_to_sft'])} per token)",
        f"  PPO step kept by the guard             : {step(summary.get('ppo_kept_step'))} "
        f"(held-out reward gain over SFT {fmt(summary.get('ppo_heldout_gain'))} std; "
        f"best held-out score at step {step(summary.get('ppo_best_step'))})",
        f"  PPO responses ended with EOS           : {fmt(summary['ppo_ended_eos_frac'])}",
        f"  registered                             : {summary['registered_model'] or 'not registered'}"
        + (f" v{summary['registered_version']}" if summary["registered_version"] else ""),
        f"  aliases                                : {aliases}",
    ]
    if promotion:
        lines.append(f"  promotion                              : "
                     f"{'promoted' if promotion.get('promoted') else 'not promoted'} ({promotion.get('reason')})")
    failed_checks = [name for name, ok in summary["checks"].items() if not ok]
    if failed_checks:
        lines.append(f"  FAILED checks                          : {', '.join(failed_checks)}")
    if summary["failed_steps"]:
        lines.append(f"  FAILED steps                           : {', '.join(summary['failed_steps'])}")
    lines.append("where to look:")
    lines += [f"  {k:<19}: {v}" for k, v in summary["where"].items() if v]
    return "\n".join(lines)


# ---------------------------------------------------------------- rlhf run
def _check_results(result: Any) -> dict[str, bool]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": bool(e.passed)
            for e in result.get_asset_check_evaluations()}


def _failures(result: Any) -> tuple[list[str], list[str]]:
    events = result.get_step_failure_events()
    steps = [e.step_key for e in events if e.step_key]
    errors = [f"{e.step_key}: {e.event_specific_data.error.message.strip()}" for e in events
              if e.event_specific_data and e.event_specific_data.error]
    return steps, errors


def promotion_of(run_id: str, errors: list[str]) -> dict[str, Any] | None:
    """The decision of the run's ``champion_policy`` step (the lineage's promotion gate)."""
    made = read_manifest("champion_policy", run_id)
    if made is not None:
        return made["decision"]
    refused = [e for e in errors if e.startswith("champion_policy")]
    return {"promoted": False, "reason": "refused: " + "; ".join(refused)} if refused else None


def run_lineage(run_config: Mapping[str, Any], promote: bool = True) -> int:
    """Materialize the lineage, promote, summarise; returns the process exit code.

    The terminal gets one line per asset step and the summary; the full Dagster event log and
    everything the stages print go to ``$RLHF_HOME/logs/<run_id>.log`` (``pipelines.run_output``).
    """
    import dagster as dg
    from dagster._core.utils import make_new_run_id

    from pipelines import run_output

    run_output.quiet_environment()  # before transformers / huggingface_hub are imported
    from pipelines.automation import with_op_config
    from pipelines.definitions import build_defs

    instance = dg.DagsterInstance.get()
    start = time.monotonic()
    run_id = make_new_run_id()
    log = run_output.log_file(run_id)
    print(f"rlhf run {run_id}: full Dagster log in {log}", flush=True)
    job = build_defs().resolve_job_def(LINEAGE_JOB)
    with run_output.output_to_log(log) as terminal:
        lines = run_output.StepLines(run_output.asset_steps(job), terminal)
        loggers = run_output.run_loggers(log, lines)
        if not promote:  # register only: the champion_policy gate records that it did not run
            run_config = with_op_config(dict(run_config), "champion_policy", {"promote": False})
        result = job.with_logger_defs(loggers).execute_in_process(
            instance=instance, run_config=run_output.with_loggers(run_config, loggers), raise_on_error=False,
            tags={"rlhf/trigger": "cli"}, run_id=run_id,
        )
        lines.finish()
        failed_steps, errors = _failures(result)
        checks = _check_results(result)
        registered = read_manifest("registered_policy", result.run_id)
        name = (registered or {}).get("model_name") or settings.policy_name()
        if result.success and not registered:
            errors.append("registered_policy was not materialized: a blocking check failed (see checks)")
        promotion = promotion_of(result.run_id, errors) if registered else None
        status = "succeeded" if result.success and registered else "failed"
        registry = dict(registry_state(os.environ["MLFLOW_TRACKING_URI"], name))
    registry["last_promotion"] = promotion
    summary = build_summary(result.run_id, status, checks, failed_steps, time.monotonic() - start, registry)
    summary["where"]["log"] = str(log)
    out = settings.rlhf_home() / "summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"full Dagster log: {log}")
    return 0 if status == "succeeded" else 1


# ---------------------------------------------------------------- rlhf rounds
ROUND_JOB = "rlhf_round"

def run_round(defs: Any, instance: Any, run_config: Mapping[str, Any], files: Sequence[str] = ()) -> dict[str, Any]:
    """One round as a new partition of ``rlhf_round``, run in this process; returns its table row."""
    from dagster._core.utils import make_new_run_id

    from assets.rounds import ROUNDS, next_round_key
    from pipelines import run_output
    from pipelines.automation import with_op_config

    key = next_round_key(instance.get_dynamic_partitions(ROUNDS.name))
    instance.add_dynamic_partitions(ROUNDS.name, [key])
    config = with_op_config(dict(run_config), "round_preferences", {"files": list(files)}) if files else dict(run_config)
    run_id = make_new_run_id()
    log = run_output.log_file(run_id)
    job = defs.resolve_job_def(ROUND_JOB)
    start = time.monotonic()
    print(f"{key} (run {run_id}): full Dagster log in {log}", flush=True)
    with run_output.output_to_log(log) as terminal:
        lines = run_output.StepLines(run_output.asset_steps(job), terminal)
        loggers = run_output.run_loggers(log, lines)
        result = job.with_logger_defs(loggers).execute_in_process(
            instance=instance, run_config=run_output.with_loggers(config, loggers), partition_key=key,
            raise_on_error=False, tags={"rlhf/trigger": "cli", "rlhf/round": key}, run_id=run_id)
        lines.finish()
    _, errors = _failures(result)
    made = read_manifest_partition("round_champion", key)
    row: dict[str, Any] = {"round": key, "run_id": run_id, "seconds": round(time.monotonic() - start, 1),
                           "status": "succeeded" if result.success else "failed", "log": str(log)}
    if made is not None and result.success:
        row.update(made["row"])  # round_champion's table row (assets.rounds.ROUND_COLUMNS)
        row["decision"] = made["decision"]["reason"]
        row["challenger_version"] = made["challenger_version"]
    else:
        row["errors"] = errors
    return row


def read_manifest_partition(asset: str, partition: str) -> dict[str, Any] | None:
    path = manifest_path(settings.manifests_root(), [asset], partition=partition)
    return json.loads(path.read_text()) if path.is_file() else None


def format_rounds(rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)
    head = ("round", "champion_gold", "challenger_gold", "rm_gold_agreement", "challenger_kl_to_sft",
            "promoted", "champion_version_after", "seconds")
    widths = [max(len(h), *(len(cell(r.get(h))) for r in rows)) for h in head]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(cell(r.get(h)).ljust(w) for h, w in zip(head, widths)) for r in rows]
    return "\n".join(out)


def run_rounds(n: int, round_config: Mapping[str, Any], lineage_config: Mapping[str, Any],
               files: Sequence[str] = (), start_from_sft: bool = False) -> int:
    """``n`` rounds from the current champion (the lineage first when there is none)."""
    import dagster as dg

    from pipelines import run_output

    run_output.quiet_environment()
    from pipelines.automation import has_champion
    from pipelines.definitions import build_defs
    from resources.tracking import MLflowResource

    start = time.monotonic()
    bootstrap = None
    if not has_champion(MLflowResource()):
        if refuse_unimportable(lineage_config, "rlhf rounds --lineage-config"):
            return 2
        print("no champion yet: running the lineage first (rlhf run)", flush=True)
        code = run_lineage(lineage_config)
        bootstrap = round(time.monotonic() - start, 1)
        if not has_champion(MLflowResource()) and start_from_sft and read_manifest("sft_model"):
            from assets.rounds import crown_sft_baseline

            version = crown_sft_baseline(MLflowResource(), settings.policy_name(), read_manifest("sft_model") or {})
            print(f"the lineage made no champion (exit {code}); the SFT model is champion v{version} "
                  "(--start-from-sft)", flush=True)
        if not has_champion(MLflowResource()):
            print("error: the lineage made no champion; rounds start from one (--start-from-sft starts them "
                  "from the SFT model)", file=sys.stderr)
            return 1
    instance = dg.DagsterInstance.get()
    defs = build_defs()
    rows = []
    for i in range(n):
        row = run_round(defs, instance, round_config, files if i == 0 else ())
        rows.append(row)
        verdict = ("promoted" if row.get("promoted") else "refused") if row["status"] == "succeeded" else "FAILED"
        print(f"{row['round']}: {verdict} in {row['seconds']:.0f} s"
              + (f" ({row['decision']})" if row.get("decision") else "")
              + (f": {'; '.join(row.get('errors', []))}" if row["status"] != "succeeded" else ""), flush=True)
        if row["status"] != "succeeded":
            break
    total = round(time.monotonic() - start, 1)
    summary = {"rounds": rows, "seconds_total": total, "seconds_lineage": bootstrap,
               "seconds_rounds": round(sum(r["seconds"] for r in rows), 1)}
    out = settings.rlhf_home() / "rounds_summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(format_rounds(rows))
    print(f"{len(rows)} round(s) in {summary['seconds_rounds']:.0f} s"
          + (f" after the lineage ({bootstrap:.0f} s)" if bootstrap is not None else "") + f"; summary in {out}")
    return 0 if all(r["status"] == "succeeded" for r in rows) else 1


def export_annotation_batch(n_prompts: int, seed: int, name: str) -> int:
    """``rlhf annotate``: the champion's samples on the latest splits' training prompts."""
    from assets.rounds import export_batch
    from resources.tracking import MLflowResource
    from ppo_core.lengths import recorded_length

    splits = read_manifest("dataset_splits")
    if splits is None:
        raise SystemExit("rlhf annotate: no dataset_splits yet; run the lineage first (rlhf run)")
    import dagster as dg

    mlflow = MLflowResource()
    try:
        # PPO's answer length for this data (base_model measured it), as the rounds sample
        seq = (read_manifest("base_model") or {}).get("lengths") or {}
        path = export_batch(mlflow.client(), mlflow.tracking_uri, name, splits["split_dir"], n_prompts, seed,
                            f"annotate-seed{seed}",
                            max_new_tokens=recorded_length(seq, "response_length"))
    except dg.Failure as exc:
        raise SystemExit(f"rlhf annotate: {exc.description}") from exc
    print(f"annotation batch: {path}\nfill 'preference' with a or b on each line, then move the file into "
          f"{settings.landing_dir()} to start a round")
    return 0


# ---------------------------------------------------------------- rlhf ui
def _executable(name: str) -> str:
    """A console script of this venv (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"rlhf ui: `{name}` is not installed in this environment (pip install -e .)")
    return found


def _default_signals() -> None:
    # Runs in the child before exec: a parent that ignores SIGINT must not pass that on,
    # otherwise `dagster dev` cannot be stopped with SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_in_own_session(
    command: Sequence[str], env: Mapping[str, str], cwd: Path, stdout: Any = None, stderr: Any = None
) -> subprocess.Popen:
    """Start a server in its own session so a stop signal reaches all its children."""
    return subprocess.Popen(list(command), env=dict(env), cwd=str(cwd), start_new_session=True,
                            preexec_fn=_default_signals, stdout=stdout, stderr=stderr)


def stop_session(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
    """SIGINT to the process group (servers shut down cleanly on it), SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def ui_commands(host: str, dagster_port: int, mlflow_port: int) -> dict[str, list[str]]:
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    mlflow_cmd = [_executable("mlflow"), "server", "--host", host, "--port", str(mlflow_port),
                  "--backend-store-uri", tracking, "--workers", "1"]
    if tracking.startswith("sqlite:"):
        mlflow_cmd += ["--default-artifact-root", settings.mlflow_artifact_root()]
    return {
        "dagster": [_executable("dagster"), "dev", "-h", host, "-p", str(dagster_port), *workspace_args()],
        "mlflow": mlflow_cmd,
    }


def workspace_args() -> list[str]:
    """The checkout's workspace.yaml; an installed package (no checkout) names its module instead."""
    checkout = settings.source_checkout()
    if checkout is not None and (checkout / "workspace.yaml").is_file():
        return ["-w", str(checkout / "workspace.yaml")]
    return ["-m", "pipelines.definitions"]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_ui(host: str, dagster_port: int, mlflow_port: int) -> int:
    """Start both UIs; return when Ctrl-C (or SIGTERM) arrives or one of them exits."""
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM
    # (a service manager's stop) must stop the servers too, not orphan them.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, command in ui_commands(host, dagster_port, mlflow_port).items():
            procs[name] = start_in_own_session(command, os.environ, settings.source_checkout() or Path.cwd())
        print(f"Dagster UI: http://{host}:{dagster_port}   MLflow UI: http://{host}:{mlflow_port}   "
              "(Ctrl-C stops both)", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1.0)
        exited = [n for n, p in procs.items() if p.poll() is not None]
        print(f"rlhf ui: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlhf ui: stopping the Dagster and MLflow servers", file=sys.stderr, flush=True)
        return 0
    finally:
        # A second Ctrl-C must not abandon half-stopped servers; stop_session escalates itself.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        for proc in procs.values():
            stop_session(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole lineage, promote, print the summary")
    run.add_argument("--config", help="run config (YAML/JSON) of the rlhf_lineage job, e.g. your dataset")
    run.add_argument("--no-promote", action="store_true", help="register the challenger but do not promote")
    rounds = sub.add_parser("rounds", help="run RLHF rounds from the champion (the lineage first if none)")
    rounds.add_argument("-n", "--rounds", type=int, default=3, help="how many rounds (default 3)")
    rounds.add_argument("--config", help="run config (YAML/JSON) of the rlhf_round job")
    rounds.add_argument("--lineage-config", help="run config of the lineage, when it has to run first")
    rounds.add_argument("--files", nargs="*", default=[], help="labelled files for the first round "
                        "(default: the simulated annotator)")
    rounds.add_argument("--start-from-sft", action="store_true", help="when the lineage makes no champion "
                        "(its PPO failed a gate), register the SFT model as the first champion and start there")
    annotate = sub.add_parser("annotate", help="write the champion's samples as a batch to label (outbox)")
    annotate.add_argument("-n", "--prompts", type=int, default=256, help="prompts answered twice (default 256)")
    annotate.add_argument("--seed", type=int, default=0)
    annotate.add_argument("--model-name", default=settings.policy_name(),
                          help="registered policy (default: RLHF_POLICY_NAME, else rlhf-policy)")
    ui = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI on localhost")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_embedded_env()
    # a console script's sys.path starts at its bin/ folder; the documented promise is that a
    # gold scorer or reward function "module:function" imports from the working directory,
    # as with `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "run":
        config = load_run_config(args.config)
        if refuse_unimportable(config, "rlhf run"):
            return 2
        return run_lineage(config, promote=not args.no_promote)
    if args.command == "annotate":
        return export_annotation_batch(args.prompts, args.seed, args.model_name)
    if args.command == "rounds":
        if args.rounds < 1:
            raise SystemExit("rlhf rounds: --rounds must be >= 1")
        config, lineage_config = load_run_config(args.config), load_run_config(args.lineage_config)
        if refuse_unimportable(config, "rlhf rounds --config"):
            return 2
        return run_rounds(args.rounds, config, lineage_config,
                          [str(Path(f).resolve()) for f in args.files], args.start_from_sft)
    return run_ui(args.host, args.dagster_port, args.mlflow_port)


if __name__ == "__main__":
    sys.exit(main())
