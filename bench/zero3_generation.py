"""Rollout generation under 2-rank ZeRO-3: weights gathered per decoded token vs once per rollout.

Under ZeRO-3 each rank holds a shard of every weight. Generating with the DeepSpeed engine
all-gathers each layer's weights at every forward, i.e. at every decoded token; with
``ds3_gather_for_generation`` (the default, as TRL's) ``PPOTrainer.generate`` gathers them
once for the rollout and decodes locally (:meth:`ppo_core.strategy.DeepSpeedStrategy.generation_model`).
This script times ``PPOTrainer.generate`` on one batch in three ways, interleaved, ``--repeats``
times each, on every rank of a ``torchrun`` world:

* ``per_token``: ``ds3_gather_for_generation=False`` (the engine; the code before issue 13),
* ``once_hf``: gathered once, decoded with the Hugging Face forward (``sample(fast=False)``),
  to separate the gain of gathering from that of the fast decoder,
* ``once``: gathered once, as PPO now does (the fast decoder applies to Llama layouts).

A rollout's time is the slowest rank's (generation ends with a collective). The policy is a
random tiny Llama, which rarely emits EOS, so every rollout runs ``--response-length`` tokens.
Its width must put the projections above DeepSpeed's ``stage3_param_persistence_threshold``
(1e5 elements; 384 x 384 is the smallest multiple of 128 above it) or ZeRO-3 keeps them whole.

    python bench/zero3_generation.py --repeats 7            # launches torchrun --nproc-per-node 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("per_token", "once_hf", "once")


def worker(args: argparse.Namespace) -> None:
    """One rank: build the PPO trainer under ZeRO-3, time the modes, rank 0 writes the JSON."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from ppo_core.config import from_dict
    from ppo_core.generation import sample
    from ppo_core.ppo import PPOConfig, PPOTrainer
    from ppo_core.strategy import DeepSpeedStrategy

    paths = json.loads(Path(args.paths).read_text())
    cfg = from_dict(PPOConfig, {
        **paths, "output_dir": str(Path(args.paths).parent / "out"), "num_steps": 1,
        "rollout_batch_size": args.batch, "num_mini_batches": 1, "ppo_epochs": 1,
        "response_length": args.response_length, "normalize_reward": False, "save_every": 0,
        "seed": 0, "strategy": {"zero_stage": 3, "cpu_threads": args.threads}})
    trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
    _, ids, mask = trainer.next_prompts()
    per_token = dataclasses.replace(cfg, ds3_gather_for_generation=False)

    def rollout(mode: str) -> int:
        rng = torch.Generator().manual_seed(1000 + trainer.rank)
        if mode == "once_hf":
            with trainer.strategy.generation_model(trainer.actor.engine) as m:
                gen = sample(m, ids, mask, max_new_tokens=cfg.response_length, eos_token_id=trainer.eos_id,
                             pad_token_id=trainer.pad_id, temperature=cfg.temperature, generator=rng,
                             fast=False)
        else:
            trainer.cfg = per_token if mode == "per_token" else cfg
            gen = trainer.generate(ids, mask, generator=rng)
        return int(gen.response_mask.sum())

    for mode in MODES:  # warm-up: DeepSpeed records its prefetch trace, the fast decoder its check
        rollout(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            dist.barrier()
            t0 = time.perf_counter()
            tokens[mode] = rollout(mode)
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[mode].append(float(elapsed))
    if trainer.rank == 0:
        n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainer.actor.module.parameters())
        Path(args.out).write_text(json.dumps({
            "times": times, "tokens_rank0": tokens, "n_params": n_params,
            "world_size": trainer.world, "args": {k: v for k, v in vars(args).items()
                                                  if k not in ("paths", "out", "worker")}}))


def launch(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, run this file under ``torchrun --nproc-per-node 2``, read rank 0's JSON."""
    from bench.ppo_core_bench import build_models

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), args.n_layer, args.n_embd, args.n_head, args.vocab)
        (Path(tmp) / "paths.json").write_text(json.dumps(paths))
        out = Path(tmp) / "result.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", port, __file__, "--worker",
               "--paths", str(Path(tmp) / "paths.json"), "--out", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("n_layer", "n_embd", "n_head", "vocab", "response_length", "batch", "repeats",
                           "threads")]]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(proc.returncode)
        return json.loads(out.read_text())


def table(result: dict[str, Any]) -> str:
    """Median, min-max and the median's speed-up over ``per_token``, one row per mode."""
    a = result["args"]
    lines = [f"{result['n_params'] / 1e6:.2f}M-param Llama ({a['n_layer']} x {a['n_embd']}), "
             f"{result['world_size']} ranks ZeRO-3, batch {a['batch']} per rank, "
             f"{a['response_length']} tokens, {a['repeats']} repeats, {a['threads']} thread(s) per rank",
             f"{'mode':<10} {'median_s':>9} {'min_s':>7} {'max_s':>7} {'tok/s/rank':>10} {'speedup':>8}"]
    base = statistics.median(result["times"]["per_token"])
    for mode in MODES:
        t = result["times"][mode]
        med = statistics.median(t)
        lines.append(f"{mode:<10} {med:>9.3f} {min(t):>7.3f} {max(t):>7.3f} "
                     f"{result['tokens_rank0'][mode] / med:>10.0f} {base / med:>7.1f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="prompts per rank")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", type=Path, default=None, help="also write the raw times here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = launch(args)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from ppo_core.strategy import exit_after_shutdown

    exit_after_shutdown(main())
