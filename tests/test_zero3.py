"""PPO under ZeRO-3 with two ranks (issue 13): models load partitioned, and a rollout gathers
the policy's weights once instead of once per decoded token.

The pytest side builds a tiny tokenizer, policy and reward model, then runs this same file as
a 2-rank ``torchrun`` worker (gloo on CPU) that loads, generates and trains, and writes what
it measured per rank to JSON; the tests assert on those files. One worker run serves all the
tests of the module (a DeepSpeed process start costs several seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"

# Wide enough that every projection and the embedding exceed DeepSpeed's default
# stage3_param_persistence_threshold (1e5 elements: 384 x 384 = 147,456): smaller tensors
# stay whole on every rank after deepspeed.initialize and would never be gathered at all.
WIDTH = 384
SHORT, LONG = 2, 8   # response lengths of the two counted rollouts


# --------------------------------------------------------------------------- worker (torchrun)


class GatherCounter:
    """Counts the all-gather collectives DeepSpeed issues (every variant its comm backend
    has), by wrapping the methods of ``deepspeed.comm``'s backend object in place."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")

    def __init__(self) -> None:
        import deepspeed.comm.comm as ds_comm

        self.calls = 0
        self.elements = 0   # elements received: the size of the gathered outputs
        backend = ds_comm.cdb
        for name in self.NAMES:
            original = getattr(backend, name)

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.calls += 1
                out = kwargs.get("output_tensor", kwargs.get("output_tensors",
                                 kwargs.get("tensor_list", args[0] if args else None)))
                self.elements += sum(t.numel() for t in out) if isinstance(out, (list, tuple)) \
                    else int(out.numel())
                return _original(*args, **kwargs)

            setattr(backend, name, counted)

    def during(self, fn: Any) -> tuple[Any, int, int]:
        """``fn()``, and the all-gather calls and elements it caused."""
        calls, elements = self.calls, self.elements
        result = fn()
        return result, self.calls - calls, self.elements - elements


def worker(out_dir: str, policy: str, reward: str, train_file: str) -> None:
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from ppo_core.config import from_dict
    from ppo_core.fast_decode import fast_decode_problem
    from ppo_core.models import build_scorer_from_causal_lm, load_causal_lm, score_head
    from ppo_core.ppo import PPOConfig, PPOTrainer
    from ppo_core.strategy import DeepSpeedStrategy, StrategyConfig

    import deepspeed

    strategy = DeepSpeedStrategy(StrategyConfig(zero_stage=3, seed=0))
    strategy.setup_distributed()
    torch.set_num_threads(1)
    rank = strategy.rank
    report: dict[str, Any] = {"rank": rank}

    # ---- 1. loading: partitioned at creation, and the values are the checkpoint's
    with strategy.partitioned_loading():
        lm = load_causal_lm(policy)
        scorer = build_scorer_from_causal_lm(policy, seed=3)
    # (getattr: a model loaded whole has no ZeRO-3 attributes; the test then fails, not this)
    report["partitioned"] = [
        {"name": n, "local_numel": p.numel(), "ds_numel": int(getattr(p, "ds_numel", p.numel())),
         "shard_numel": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()}
        for n, p in lm.named_parameters()]
    saved = load_file(str(Path(policy) / "model.safetensors"))
    with deepspeed.zero.GatheredParameters(list(lm.parameters())):
        report["max_abs_diff_to_checkpoint"] = max(
            float((p.detach() - saved[n]).abs().max()) for n, p in lm.named_parameters() if n in saved)
    head = score_head(scorer)
    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        report["head_weight_sum"] = float(head.weight.double().sum())
        report["head_weight_std"] = float(head.weight.std())
    del lm, scorer

    # ---- 2. generation: all-gathers per rollout with the option on and off
    cfg = from_dict(PPOConfig, {
        "policy_path": policy, "reward_model_path": reward, "train_file": train_file,
        "output_dir": str(Path(out_dir) / "run"), "num_steps": 1, "rollout_batch_size": 4,
        "num_mini_batches": 1, "ppo_epochs": 1, "response_length": LONG, "save_every": 0,
        "normalize_reward": False, "seed": 0, "strategy": {"zero_stage": 3, "cpu_threads": 1}})
    trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
    counter = GatherCounter()
    _, ids, mask = trainer.next_prompts()
    report["fast_outside_gather"] = fast_decode_problem(trainer.actor.engine)
    with trainer.strategy.generation_model(trainer.actor.engine) as m:
        report["fast_inside_gather"] = fast_decode_problem(m)
    # the weights a forward must gather: all but the small ones DeepSpeed keeps whole
    # ("persistent", below stage3_param_persistence_threshold: here the norms)
    report["partitioned_numel"] = sum(int(p.ds_numel) for p in trainer.actor.module.parameters()
                                      if not p.ds_persist)
    rollouts: dict[str, Any] = {}
    for gather in (False, True):
        trainer.cfg = dataclasses.replace(cfg, ds3_gather_for_generation=gather)
        # one rollout first: DeepSpeed records its prefetch trace on the first forwards after
        # a change of mode (per-submodule fetches), later ones run on the recorded trace
        trainer.generate(ids, mask, generator=torch.Generator().manual_seed(1))
        for length in (SHORT, LONG):
            trainer.cfg = dataclasses.replace(trainer.cfg, response_length=length)
            gen, calls, elements = counter.during(lambda: trainer.generate(
                ids, mask, generator=torch.Generator().manual_seed(100 + rank)))
            rollouts[f"{gather}-{length}"] = {
                "all_gather_calls": calls, "gathered_elements": elements,
                "steps": gen.responses.shape[1],
                "sequences": gen.sequences.tolist(), "logprobs": gen.logprobs.tolist()}
    report["rollouts"] = rollouts

    # ---- 3. after the gathered rollout the engine's hooks are back: a PPO step trains
    trainer.cfg = cfg
    before = strategy.full_state_dict(trainer.actor.engine)
    metrics = trainer.train_step()
    after = strategy.full_state_dict(trainer.actor.engine)
    report["train_step_ok"] = bool(metrics["val/num_eos_tokens"] >= 0)
    if rank == 0:
        assert before is not None and after is not None
        report["policy_changed"] = max(float((after[k].float() - before[k].float()).abs().max())
                                       for k in before)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed next to python")
    import pandas as pd

    from assets import bundled_task as bt
    from ppo_core.models import build_scorer_from_causal_lm, build_tiny_causal_lm, train_tokenizer
    from ppo_core.strategy import free_port

    root = tmp_path_factory.mktemp("zero3")
    prompts = bt.all_prompts()
    tok = train_tokenizer(prompts + [f"the {t} is {a} ." for t in bt.TOPICS for a in bt.ADJECTIVE_QUALITY],
                          vocab_size=300)
    model = build_tiny_causal_lm(tok, n_layer=1, n_embd=WIDTH, n_head=4, n_positions=64)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rm = build_scorer_from_causal_lm(root / "policy", seed=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    pd.DataFrame({"prompt": prompts[:16]}).to_parquet(root / "train.parquet")
    out = root / "out"
    out.mkdir()
    port = str(free_port())  # torchrun passes --master-port 0 to the workers verbatim
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", port, __file__, "--worker",
         str(out), str(root / "policy"), str(root / "rm"), str(root / "train.parquet")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    shutil.rmtree(root, ignore_errors=True)
    return reports


def test_models_load_partitioned(zero3_run):
    """Loaded under ZeRO-3, no rank holds a whole weight: every parameter's local data is
    empty, each rank's shard is half of it (rounded up), and gathered they are the
    checkpoint's values."""
    for report in zero3_run:
        for p in report["partitioned"]:
            assert p["local_numel"] == 0, p
            assert p["shard_numel"] == -(-p["ds_numel"] // 2), p
        assert report["max_abs_diff_to_checkpoint"] == 0.0
    held = sum(p["shard_numel"] for p in zero3_run[0]["partitioned"])
    total = sum(p["ds_numel"] for p in zero3_run[0]["partitioned"])
    assert held < 0.51 * total


def test_scorer_head_initialised_once_for_all_ranks(zero3_run):
    """The critic's new head is re-initialised on gathered weights (rank 0's values reach
    every shard): the same weights on both ranks, at std 1/sqrt(hidden + 1)."""
    a, b = zero3_run
    assert a["head_weight_sum"] == b["head_weight_sum"]
    assert a["head_weight_std"] == pytest.approx((WIDTH + 1) ** -0.5, rel=0.2)


def test_rollout_gathers_once_not_per_token(zero3_run):
    """With ds3_gather_for_generation (default) a rollout gathers the partitioned weights once,
    whatever its length; without it every decoded token gathers all of them again."""
    for report in zero3_run:
        r, model = report["rollouts"], report["partitioned_numel"]
        for gather in (True, False):
            assert r[f"{gather}-{SHORT}"]["steps"] == SHORT and r[f"{gather}-{LONG}"]["steps"] == LONG
        on_short, on_long = r[f"True-{SHORT}"], r[f"True-{LONG}"]
        off_short, off_long = r[f"False-{SHORT}"], r[f"False-{LONG}"]
        # on: the same collectives for 2 and 8 tokens, and one model's worth of elements
        assert on_short["all_gather_calls"] == on_long["all_gather_calls"] > 0
        assert on_short["gathered_elements"] == on_long["gathered_elements"]
        assert model <= on_long["gathered_elements"] < 1.1 * model
        # off: each of the 6 extra forwards gathers again, the whole model each time
        extra = LONG - SHORT
        assert off_long["all_gather_calls"] - off_short["all_gather_calls"] >= extra
        assert off_long["gathered_elements"] - off_short["gathered_elements"] >= extra * model
        assert off_long["gathered_elements"] >= LONG * model


def test_gathered_rollout_samples_the_same_tokens(zero3_run):
    """Same seed, same tokens and log-probs whether the weights are gathered once or per token
    (the gathered rollout also uses the fast decoder, which is partitioned-out otherwise)."""
    for report in zero3_run:
        r = report["rollouts"]
        for length in (SHORT, LONG):
            on, off = r[f"True-{length}"], r[f"False-{length}"]
            assert on["sequences"] == off["sequences"]
            flat = [x for row in on["logprobs"] for x in row]
            assert flat == pytest.approx([x for row in off["logprobs"] for x in row], abs=1e-4)
        assert report["fast_inside_gather"] is None
        assert "ZeRO-3 partitioned" in report["fast_outside_gather"]


def test_training_works_after_gathered_generation(zero3_run):
    """The engine's ZeRO-3 hooks come back after the gathered rollout: a full PPO step
    (rollout, scoring, update) runs on both ranks and changes the policy."""
    assert all(r["train_step_ok"] for r in zero3_run)
    assert zero3_run[0]["policy_changed"] > 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    from ppo_core.strategy import exit_after_shutdown

    worker(*sys.argv[2:6])
    # as every engine's __main__ does: a rank leaving through interpreter finalization can
    # abort there ("terminate called without an active exception"; CI34 did)
    exit_after_shutdown(0)
