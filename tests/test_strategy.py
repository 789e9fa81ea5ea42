"""ppo_core.strategy and ppo_core.checkpoint: config validation, engines, saving, atomic checkpoints."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_core.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from ppo_core.config import ConfigError
from ppo_core.models import build_tiny_causal_lm, load_causal_lm, train_tokenizer
from ppo_core.strategy import DeepSpeedStrategy, StrategyConfig, exit_after_shutdown, free_port, resolve_cpu_threads

torch.set_num_threads(1)


def test_offload_needs_a_zero_stage() -> None:
    with pytest.raises(ConfigError, match="offload_optimizer=true needs ZeRO stage 1, 2 or 3"):
        DeepSpeedStrategy(StrategyConfig(zero_stage=0, offload_optimizer=True))
    with pytest.raises(ConfigError, match="offload_params=true needs ZeRO stage 3.*set strategy.zero_stage to 3"):
        DeepSpeedStrategy(StrategyConfig(zero_stage=2, offload_params=True))
    with pytest.raises(ConfigError, match="zero_stage=5"):
        DeepSpeedStrategy(StrategyConfig(zero_stage=5))


@pytest.mark.parametrize(
    ("setting", "cpus", "local_ranks", "omp", "expected"),
    [
        (None, 4, None, None, 4),   # one process alone: every CPU it may run on
        (None, 4, "2", None, 2),    # two ranks share them
        (None, 2, "8", None, 1),    # never below one
        (None, 4, None, "3", 0),    # OMP_NUM_THREADS set: torch's own count follows it
        (1, 4, None, None, 1),      # an explicit count wins
        (0, 4, None, None, 0),
    ],
)
def test_cpu_threads_auto_shares_the_cpus_among_ranks(monkeypatch: pytest.MonkeyPatch, setting,
                                                      cpus, local_ranks, omp, expected) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    for name, value in (("LOCAL_WORLD_SIZE", local_ranks), ("OMP_NUM_THREADS", omp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert resolve_cpu_threads(setting) == expected


def test_negative_cpu_threads_is_refused() -> None:
    with pytest.raises(ConfigError, match="cpu_threads=-1: must be >= 0"):
        DeepSpeedStrategy(StrategyConfig(cpu_threads=-1))


def test_impossible_batch_split_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # as if launched with 2 ranks, whatever torch.distributed state earlier tests left behind
    monkeypatch.setattr(DeepSpeedStrategy, "world_size", property(lambda self: 2))
    strategy = DeepSpeedStrategy(StrategyConfig())
    with pytest.raises(ConfigError, match=r"batch_size=10 is not divisible by .* 4 x 2 = 8.*multiple of 8"):
        strategy.gradient_accumulation_steps(10, 4)
    assert strategy.gradient_accumulation_steps(16, 4) == 2


def test_train_config_carries_every_option() -> None:
    strategy = DeepSpeedStrategy(StrategyConfig(zero_stage=3, offload_optimizer=True, offload_params=True,
                                                bf16=True, gradient_clipping=0.5))
    cfg = strategy.train_ds_config(train_batch_size=8, micro_batch_size=2)
    assert cfg["gradient_accumulation_steps"] == 8 // (2 * strategy.world_size)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": True} and cfg["gradient_clipping"] == 0.5
    assert strategy.eval_ds_config()["zero_optimization"]["stage"] == 3
    assert DeepSpeedStrategy(StrategyConfig(zero_stage=2)).eval_ds_config()["zero_optimization"]["stage"] == 0


def test_rng_state_roundtrip() -> None:
    tensors, plain = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(tensors, plain)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def _tiny_model() -> torch.nn.Module:
    tok = train_tokenizer(["the river is nice .", "describe the garden ."] * 5, None, vocab_size=280)
    return build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=32, seed=0), tok


def _train_steps(strategy: DeepSpeedStrategy, engine, n: int) -> None:
    ids = torch.arange(2 * 8).reshape(2, 8) % 50 + 3
    for _ in range(n):
        loss = engine(input_ids=ids, labels=ids).loss
        strategy.backward(loss, engine)
        strategy.step(engine)


@pytest.mark.parametrize("stage,bf16", [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)])
def test_engine_checkpoint_resume_and_save_pretrained(tmp_path: Path, stage: int, bf16: bool) -> None:
    """2 steps, checkpoint, 2 more == restore the checkpoint into a fresh engine, 2 more. The
    engine state is read with torch.load(weights_only=True) (it fails on a file that needs more)."""
    strategy = DeepSpeedStrategy(StrategyConfig(zero_stage=stage, bf16=bf16))
    strategy.setup_distributed()

    def fresh_engine():
        model, tok = _tiny_model()
        opt = strategy.create_optimizer(model, lr=1e-2)
        sched = strategy.create_scheduler(opt, "cosine", total_steps=4, warmup_steps=1)
        return strategy.prepare_train(model, opt, sched, train_batch_size=2, micro_batch_size=2), tok

    engine, tok = fresh_engine()
    _train_steps(strategy, engine, 2)
    ckpt = save_checkpoint(strategy, tmp_path / "ckpts", 2, {"model": engine}, stage="test",
                           config={"x": 1}, data_position={"step": 2}, extra={"kl": {"value": 0.1}})
    _train_steps(strategy, engine, 2)
    straight = strategy.full_state_dict(engine)

    engine2, _ = fresh_engine()
    state = load_checkpoint(strategy, ckpt, {"model": engine2})
    assert state["step"] == 2 and state["extra"] == {"kl": {"value": 0.1}} and state["stage"] == "test"
    _train_steps(strategy, engine2, 2)
    resumed = strategy.full_state_dict(engine2)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k])

    out = strategy.save_pretrained(engine2, tok, tmp_path / "final")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = load_causal_lm(out).state_dict()
    for k, v in resumed.items():
        if k in reloaded:
            torch.testing.assert_close(reloaded[k], v.to(reloaded[k].dtype))


class _Planted:
    """What a planted checkpoint could carry: an object whose unpickling runs code."""

    def __reduce__(self):
        return (Path.touch, (Path(_PLANTED_MARKER),))


_PLANTED_MARKER = ""


def test_engine_state_with_code_in_it_is_refused(tmp_path: Path) -> None:
    global _PLANTED_MARKER
    strategy = DeepSpeedStrategy(StrategyConfig(zero_stage=0))
    strategy.setup_distributed()
    model, _ = _tiny_model()
    opt = strategy.create_optimizer(model, lr=1e-2)
    engine = strategy.prepare_train(model, opt, None, train_batch_size=2, micro_batch_size=2)
    strategy.save_engine_state(engine, tmp_path / "ckpt")
    [states] = list((tmp_path / "ckpt" / "state").glob("*model_states.pt"))
    _PLANTED_MARKER = str(tmp_path / "code_ran")
    torch.save({"module": _Planted()}, states)
    with pytest.raises(Exception, match="Weights only load failed"):
        strategy.load_engine_state(engine, tmp_path / "ckpt")
    assert not (tmp_path / "code_ran").exists()
    torch.load(states, weights_only=False)  # what DeepSpeed's own loader would have done
    assert (tmp_path / "code_ran").exists()


def test_checkpoint_discovery_ignores_partial_writes(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_10", "step_12.tmp-abcd"):
        (root / name).mkdir(parents=True)
    (root / "step_2" / "trainer_state.json").write_text('{"step": 2}')
    (root / "step_10" / "trainer_state.json").write_text('{"step": 10}')
    (root / "step_12.tmp-abcd" / "trainer_state.json").write_text('{"step": 12}')
    assert [p.name for p in list_checkpoints(root)] == ["step_2", "step_10"]
    assert find_latest_checkpoint(root) == root / "step_10"
    assert resolve_resume("latest", root) == root / "step_10"
    assert resolve_resume(None, root) is None
    assert resolve_resume("latest", tmp_path / "none") is None
    assert read_trainer_state(root / "step_2")["step"] == 2
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), root)


def test_all_reduce_in_one_process() -> None:
    strategy = DeepSpeedStrategy(StrategyConfig())
    assert strategy.all_reduce_mean(3.0) == 3.0
    t = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(strategy.all_reduce_sum(t), t)
    assert strategy.broadcast_object({"a": 1}) == {"a": 1}
    assert strategy.is_rank_zero()


@pytest.mark.parametrize("stage", [0, 2])
def test_step_clips_like_torch_and_reports_the_norm(stage: int) -> None:
    """One engine step == clip_grad_norm_ + AdamW step in plain torch, at stage 0 (where the
    strategy clips itself) and stage 2 (where DeepSpeed does); the returned norm is the
    norm before clipping."""
    strategy = DeepSpeedStrategy(StrategyConfig(zero_stage=stage, gradient_clipping=0.05))
    strategy.setup_distributed()
    assert strategy.clips_itself == (stage == 0)
    assert strategy.train_ds_config(2, 2)["gradient_clipping"] == (0.0 if stage == 0 else 0.05)
    model, _ = _tiny_model()
    twin, _ = _tiny_model()
    engine = strategy.prepare_train(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                    train_batch_size=2, micro_batch_size=2)
    if stage == 0:  # one rank has nothing to all-reduce
        assert engine.enable_backward_allreduce is (strategy.world_size > 1)
    opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    ids = torch.arange(2 * 8).reshape(2, 8) % 50 + 3
    for _ in range(2):
        strategy.backward(engine(input_ids=ids, labels=ids).loss, engine)
        norm = strategy.step(engine)
        twin(input_ids=ids, labels=ids).loss.backward()
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
        assert norm == pytest.approx(float(expected), rel=1e-4) and float(expected) > 0.05
    full = strategy.full_state_dict(engine)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-4, atol=1e-6)


def test_exit_after_shutdown_returns_the_code_of_a_failed_stage() -> None:
    """A failed stage exits with its code and no teardown (no barrier peers may never reach)."""
    with pytest.raises(SystemExit) as exc:
        exit_after_shutdown(2)
    assert exc.value.code == 2


def test_exit_after_shutdown_skips_finalization_and_loses_no_output(tmp_path: Path) -> None:
    """Two gloo ranks (plain processes, so stdout is a block-buffered pipe, as under launchers
    that do not pass ``-u``) leave through ``os._exit``: what each printed without a newline
    and logged still arrives, while atexit handlers, where finalization aborts start, do not
    run, and neither does code after the call."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import atexit, logging, sys
        import torch.distributed as dist
        from ppo_core.strategy import exit_after_shutdown

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        logging.basicConfig(filename=f"{sys.argv[1]}.{rank}", level=logging.INFO)
        logging.info("logged by rank %d", rank)
        atexit.register(print, "<finalized>")
        print(f"<printed by rank {rank}>", end="")
        exit_after_shutdown(0)
        print("<after the exit>")
    """))
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2")
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, str(script), str(log)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, err[-3000:]
        assert out == f"<printed by rank {rank}>"
        assert f"logged by rank {rank}" in Path(f"{log}.{rank}").read_text()
