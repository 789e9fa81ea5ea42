"""SFT engine: tiny smoke runs, exact resume, bad configurations, a 2-rank torchrun ZeRO-2 run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from assets.bundled_task import generate_preferences
from ppo_core.callbacks import Callback
from ppo_core.config import ConfigError, from_dict
from ppo_core.models import ModelLoadError, build_tiny_causal_lm, load_causal_lm, train_tokenizer
from ppo_core.sft import SFTConfig, main, response_correct, response_nll, train
from ppo_core.strategy import free_port

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


class Recorder(Callback):
    """Keeps every callback event for assertions."""

    def __init__(self) -> None:
        self.begin: list[tuple[str, int]] = []
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.end: list[dict[str, Any]] = []

    def on_train_begin(self, stage, total_steps, config) -> None:
        self.begin.append((stage, total_steps))

    def on_log(self, step, metrics) -> None:
        self.logs.append((step, dict(metrics)))

    def on_evaluate(self, step, metrics) -> None:
        self.evals.append((step, dict(metrics)))

    def on_checkpoint(self, step, path) -> None:
        self.checkpoints.append((step, path))

    def on_train_end(self, summary) -> None:
        self.end.append(dict(summary))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sft_*.parquet from the bundled task (completion = chosen)."""
    out = tmp_path_factory.mktemp("sft_data")
    df = generate_preferences(80, seed=1, corrupt_fraction=0.0)
    sft = df[["prompt"]].assign(completion=df["chosen"])
    sft.iloc[:64].to_parquet(out / "sft_train.parquet")
    sft.iloc[64:].to_parquet(out / "sft_eval.parquet")
    return out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 1-layer, 32-dim model: the smallest thing that still runs every code path."""
    import pandas as pd

    out = tmp_path_factory.mktemp("base")
    df = pd.read_parquet(data_dir / "sft_train.parquet")
    tok = train_tokenizer(list(df.prompt) + list(df.completion), out, vocab_size=300)
    build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=128).save_pretrained(out)
    return out


def _cfg(data_dir: Path, out: Path, base: Path, **kw: Any) -> SFTConfig:
    fields = {"data_dir": str(data_dir), "output_dir": str(out), "model_name_or_path": str(base),
              "batch_size": 16, "micro_batch_size": 8, "learning_rate": 5e-3, "num_epochs": 2,
              "eval_steps": 4, "save_steps": 0, "strategy": {"zero_stage": 2}}
    fields.update(kw)
    return from_dict(SFTConfig, fields)


def test_response_nll_counts_only_response_tokens() -> None:
    # vocab 4; logit log 3 on one token gives it 3/6 = 1/2 and every other token 1/6.
    # Position 1 favours token 3, position 2 favours token 0; the others are uniform (1/4).
    logits = torch.zeros(1, 5, 4)
    logits[0, 1, 3] = logits[0, 2, 0] = math.log(3.0)
    labels = torch.tensor([[-100, -100, 3, 1, -100]])
    nll, n = response_nll(logits, labels)
    assert int(n) == 2  # positions 1 and 2 predict the labelled tokens 3 and 1
    # position 1 -> token 3: -log(1/2); position 2 -> token 1: -log(1/6). Without the shift
    # (position i scoring label i) it would be -log(1/6) - log(1/4) = log 24 instead.
    assert math.isclose(float(nll), math.log(2.0) + math.log(6.0), rel_tol=1e-6)


def test_response_correct_counts_argmax_hits_on_response_tokens() -> None:
    # position 1 predicts token 3 (label 3: hit), position 2 predicts 0 (label 1: miss),
    # position 0 predicts 2 but its target is a prompt token (ignored)
    logits = torch.zeros(1, 5, 4)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 0] = 1.0
    labels = torch.tensor([[-100, 2, 3, 1, -100]])
    labels[0, 1] = -100
    assert int(response_correct(logits, labels)) == 1
    labels[0, 3] = 0  # now position 2's argmax is right too
    assert int(response_correct(logits, labels)) == 2


def test_sft_default_runs_its_epochs_and_ships_the_last_weights() -> None:
    cfg = SFTConfig(data_dir="d", output_dir="o", model_name_or_path="m")
    assert cfg.stopping.patience == 0 and not cfg.stopping.keep_best
    assert (cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_ratio) == (1e-3, "linear", 0.0)


def test_sft_smoke_run_writes_final_and_reports(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    rec = Recorder()
    summary = train(_cfg(data_dir, tmp_path / "run", base_model, save_steps=4, warmup_ratio=0.25), [rec])
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval/loss"] == summary["eval/loss"]
    assert rec.begin == [("sft", 8)] and [s for s, _ in rec.logs] == list(range(1, 9))
    assert {"train/loss", "train/lr", "train/epoch"} <= set(rec.logs[0][1])
    lrs = [m["train/lr"] for _, m in rec.logs]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(5e-3) and lrs[-1] < max(lrs)  # warmup, then cosine
    assert [s for s, _ in rec.evals] == [4, 8]
    last_eval = rec.evals[-1][1]
    assert math.isclose(last_eval["eval/perplexity"], math.exp(last_eval["eval/loss"]), rel_tol=1e-9)
    assert last_eval["eval/loss"] < rec.evals[0][1]["eval/loss"]  # it learns
    assert rec.logs[-1][1]["train/loss"] < rec.logs[0][1]["train/loss"]
    assert [s for s, _ in rec.checkpoints] == [4]
    assert (Path(rec.checkpoints[0][1]) / "trainer_state.json").is_file()
    assert rec.end and rec.end[0]["completed"] is True


def test_stop_and_resume_continues_the_same_trajectory(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    """K steps straight == K/2 steps, stop, resume from the checkpoint, K/2 steps."""
    straight = train(_cfg(data_dir, tmp_path / "straight", base_model, eval_steps=0))
    first = train(_cfg(data_dir, tmp_path / "split", base_model, eval_steps=0, stop_after_steps=4))
    assert first["completed"] is False and first["step"] == 4
    assert (tmp_path / "split" / "checkpoints" / "step_4" / "trainer_state.json").is_file()
    assert not (tmp_path / "split" / "final").exists()
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["data_position"]["examples_seen"] == 4 * 16 and state["stage"] == "sft"
    resumed = train(_cfg(data_dir, tmp_path / "split", base_model, eval_steps=0, stop_after_steps=4,
                         resume_from="latest"))
    assert resumed["completed"] is True and resumed["step"] == 8
    assert resumed["resumed_from_step"] == 4 and "resumed_from_step" not in straight
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert math.isclose(straight["eval/loss"], resumed["eval/loss"], rel_tol=1e-5)


def test_keep_last_checkpoints_zero_keeps_them_all(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    # 8 steps, a checkpoint every 2 before the end (which writes final/): 0 keeps all three
    # (as in PPO), 2 keeps the newest two
    for keep, expected in ((0, ["step_2", "step_4", "step_6"]), (2, ["step_4", "step_6"])):
        out = tmp_path / f"keep{keep}"
        train(_cfg(data_dir, out, base_model, eval_steps=0, save_steps=2, keep_last_checkpoints=keep))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == expected


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def test_bad_configs_fail_before_training(tmp_path: Path, data_dir: Path, base_model: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = {"data_dir": str(data_dir), "output_dir": str(tmp_path / "o"), "model_name_or_path": str(base_model)}
    cases = {
        "unknown key": ({**base, "learning_rte": 1e-3}, "unknown key(s) ['learning_rte']"),
        "batch split": ({**base, "batch_size": 10, "micro_batch_size": 4},
                        "batch_size=10 is not divisible by micro_batch_size x world_size"),
        "offload at stage 0": ({**base, "strategy": {"zero_stage": 0, "offload_optimizer": True}},
                               "set strategy.zero_stage to 2"),
        "unknown model path": ({**base, "model_name_or_path": str(tmp_path / "missing")}, "does not exist"),
        "no model": ({k: v for k, v in base.items() if k != "model_name_or_path"},
                     "set exactly one of model_name_or_path"),
    }
    for name, (cfg, message) in cases.items():
        rc = main(["--config", str(_write(tmp_path / f"{name}.json", cfg))])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert message in err, (name, err)
        assert not (tmp_path / "o" / "final").exists()


def test_tokenizer_without_eos_fails_before_training(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from ppo_core.models import load_causal_lm, load_tokenizer

    bad = tmp_path / "no_eos"
    load_causal_lm(base_model).save_pretrained(bad)
    tok = load_tokenizer(base_model)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token).save_pretrained(bad)
    with pytest.raises(ModelLoadError, match="no EOS token"):
        train(_cfg(data_dir, tmp_path / "o", bad))
    assert not (tmp_path / "o" / "final").exists()


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match="build_base_model='huge'"):
        SFTConfig(data_dir="d", output_dir="o", build_base_model="huge")


def test_torchrun_two_ranks_zero2(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    """The same module under torchrun with 2 ranks and ZeRO-2 (gloo on CPU)."""
    cfg = _write(tmp_path / "sft.json", {
        "data_dir": str(data_dir), "output_dir": str(tmp_path / "run"), "model_name_or_path": str(base_model),
        "batch_size": 8, "micro_batch_size": 2, "max_steps": 3, "eval_steps": 0, "save_steps": 2,
        "learning_rate": 5e-3, "strategy": {"zero_stage": 2},
    })
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # this pytest process may have set them for its own in-process runs
    port = str(free_port())  # torchrun's --master-port 0 is not resolved for the env rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "ppo_core.sft", "--config", str(cfg)]
    # Own process group, so a hang kills the workers too, not only the torchrun agent.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is True and summary["step"] == 3
    assert math.isfinite(summary["eval/loss"])
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    ckpt_files = {p.name for p in (final.parent / "checkpoints" / "step_2").iterdir()}
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= ckpt_files


def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path: Path, data_dir: Path,
                                                       base_model: Path) -> None:
    """lora_rank > 0: only the adapted projections change, final/ is a plain model, and the
    run still learns."""
    rec = Recorder()
    train(_cfg(data_dir, tmp_path / "lora", base_model, lora_rank=4, learning_rate=2e-2,
               strategy={"zero_stage": 0}), [rec])
    before = load_file(base_model / "model.safetensors")
    after = load_file(tmp_path / "lora" / "final" / "model.safetensors")
    assert set(after) == set(before)                     # merged: no adapter tensors left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
                           for k in changed)             # the MLP, norms and embeddings are frozen
    assert rec.evals[-1][1]["eval/loss"] < rec.evals[0][1]["eval/loss"]
    assert load_causal_lm(tmp_path / "lora" / "final") is not None


def test_lora_refused_under_zero3(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    with pytest.raises(ConfigError, match="lora_rank > 0 with strategy.zero_stage 3"):
        _cfg(data_dir, tmp_path / "z3", base_model, lora_rank=4, strategy={"zero_stage": 3})


def test_early_stopping_ships_the_best_evaluated_weights(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    """An LR far too high makes the eval loss climb after the first steps: the run stops after
    ``patience`` worse evaluations and final/ holds the weights of the best one, which score
    exactly the best eval loss when evaluated again."""
    rec = Recorder()
    summary = train(_cfg(data_dir, tmp_path / "run", base_model, learning_rate=0.3, num_epochs=20,
                         eval_steps=1, warmup_ratio=0.0, lr_scheduler="constant",
                         stopping={"patience": 2, "min_delta": 0.0, "keep_best": True}), [rec])
    losses = [m["eval/loss"] for _, m in rec.evals]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert summary["stopped_reason"] == "early_stopping"
    assert len(losses) == best + 3               # the best, then exactly `patience` worse ones
    assert summary["best_step"] == rec.evals[best][0] < summary["step"]
    assert summary["eval/loss"] == pytest.approx(losses[best]) == pytest.approx(summary["best_metric"])
    assert summary["last_eval/loss"] == pytest.approx(losses[-1]) and losses[-1] > losses[best]
    # evaluate final/ from scratch: a 0-step "run" (max_steps 1 would train) is not possible, so
    # compute the response NLL of the eval split directly
    from ppo_core.data import collate_sft, encode_prompt_response, read_table
    from ppo_core.models import load_tokenizer, position_ids_from_mask

    final = tmp_path / "run" / "final"
    tok, model = load_tokenizer(str(final)), load_causal_lm(str(final)).eval()
    rows = read_table(data_dir / "sft_eval.parquet", ("prompt", "completion"), text_columns=("prompt", "completion"))
    batch = collate_sft([encode_prompt_response(tok, r["prompt"], r["completion"], 128) for r in rows],
                        tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"])).logits
    nll, n = response_nll(logits, batch["labels"])
    assert float(nll) / int(n) == pytest.approx(losses[best], rel=1e-4)
    assert not (tmp_path / "run" / "best").exists()


def test_time_budget_stops_the_loop_and_keeps_the_best(tmp_path: Path, data_dir: Path, base_model: Path) -> None:
    summary = train(_cfg(data_dir, tmp_path / "run", base_model, num_epochs=50, stopping={"max_seconds": 1e-9}))
    assert summary["stopped_reason"] == "time_budget" and summary["step"] == 1
    assert summary["completed"] and (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_best_tracker_relative_min_delta_and_patience() -> None:
    from ppo_core.trainer import BestTracker, StoppingConfig

    t = BestTracker(StoppingConfig(patience=2, min_delta=0.01))
    assert t.update(10, {"eval/loss": 2.0})          # the first evaluation is the best so far
    assert not t.update(20, {"eval/loss": 1.99})     # 0.5% better: below the 1% bar
    assert t.update(30, {"eval/loss": 1.97})         # 1.5% better than 2.0: new best, counter reset
    assert not t.update(40, {"eval/loss": 1.96}) and not t.exhausted
    assert not t.update(50, {"eval/loss": 2.5}) and t.exhausted
    assert (t.best, t.best_step, t.best_metrics) == (1.97, 30, {"eval/loss": 1.97})
    acc = BestTracker(StoppingConfig(metric="eval/accuracy", greater_is_better=True, min_delta=0.0))
    assert acc.update(1, {"eval/accuracy": 0.6}) and acc.update(2, {"eval/accuracy": 0.7})
    assert not acc.update(3, {"eval/accuracy": 0.7})
    with pytest.raises(KeyError, match="choose one of"):
        acc.update(4, {"eval/loss": 1.0})
