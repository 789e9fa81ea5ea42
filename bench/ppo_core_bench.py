"""Per-iteration cost of ``ppo_core``'s PPO: generation, scoring, training, throughput, memory.

Builds a random tiny Llama policy (and a reward model / critic on the same trunk) of the given
size, then runs ``--iterations`` PPO iterations of :class:`ppo_core.ppo.PPOTrainer` and
prints one row per iteration:

    iter  gen_s  score_s  train_s  step_s  gen_tok/s  eps  train_%peak  peak_rss_MiB

``train_%peak`` is the training phase's FLOP rate (6 x params x tokens per forward+backward,
Kaplan et al. 2020, for policy and critic) over the best fp32 ``torch.mm`` rate measured at
the same thread count. A random model rarely emits EOS, so every response runs to
``--response-length``: the worst case, and the right one to check linear scaling.

It also times ``model.generate`` against ``ppo_core.generation.sample`` on the same batch,
to show the per-token overhead the custom sampler removes.

    python bench/ppo_core_bench.py --response-length 32 --iterations 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from assets.bundled_task import ADJECTIVE_QUALITY, TOPICS, all_prompts  # noqa: E402
from bench.common import matmul_peak_flops, peak_rss_mb  # noqa: E402
from ppo_core.config import from_dict  # noqa: E402
from ppo_core.generation import sample  # noqa: E402
from ppo_core.models import build_scorer_from_causal_lm, build_tiny_causal_lm, train_tokenizer  # noqa: E402
from ppo_core.ppo import PPOConfig, PPOTrainer  # noqa: E402
from ppo_core.strategy import DeepSpeedStrategy  # noqa: E402


def build_models(root: Path, n_layer: int, n_embd: int, n_head: int, vocab: int) -> dict[str, str]:
    """Tokenizer + random policy + scorer (reward model and critic init) under ``root``."""
    texts = all_prompts() + [f"the {t} is {a} ." for t in TOPICS for a in ADJECTIVE_QUALITY]
    tok = train_tokenizer(texts, vocab_size=vocab)
    model = build_tiny_causal_lm(tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=512)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rm = build_scorer_from_causal_lm(root / "policy", seed=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    pd.DataFrame({"prompt": all_prompts()}).to_parquet(root / "train.parquet")
    return {"policy_path": str(root / "policy"), "reward_model_path": str(root / "rm"),
            "train_file": str(root / "train.parquet")}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_generate_vs_sample(trainer: PPOTrainer, repeats: int = 2) -> dict[str, float]:
    """Seconds per batch: HF ``generate`` (sampling, same length) vs the KV-cache sampler."""
    _, ids, mask = trainer.next_prompts()
    model, T = trainer.actor.module, trainer.cfg.response_length
    kw = dict(max_new_tokens=T, eos_token_id=trainer.eos_id, pad_token_id=trainer.pad_id)
    hf, ours = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, min_new_tokens=T, **kw)
        hf = min(hf, time.perf_counter() - t0)
        t0 = time.perf_counter()
        sample(model, ids, mask, temperature=1.0, **kw)
        ours = min(ours, time.perf_counter() - t0)
    return {"hf_generate_s": hf, "ppo_core_sample_s": ours, "speedup": hf / ours}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops(1024)
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp), args.n_layer, args.n_embd, args.n_head, args.vocab)
        cfg = from_dict(PPOConfig, {
            **paths, "output_dir": str(Path(tmp) / "out"), "num_steps": args.iterations,
            "rollout_batch_size": args.batch, "num_mini_batches": args.mini_batches,
            "ppo_epochs": args.ppo_epochs, "response_length": args.response_length,
            "normalize_reward": False, "save_every": 0, "seed": 0})
        trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
        n_policy, n_critic = n_params(trainer.actor.module), n_params(trainer.critic.module)
        gen_cmp = time_generate_vs_sample(trainer)
        rows = []
        header = (f"{'iter':>4} {'gen_s':>7} {'score_s':>7} {'train_s':>7} {'step_s':>7} "
                  f"{'gen_tok/s':>9} {'eps':>7} {'train_%peak':>11} {'peak_rss_MiB':>12}")
        print(f"model: {args.n_layer} layers x {args.n_embd} wide, vocab {args.vocab}, "
              f"{n_policy / 1e6:.2f}M policy params; batch {args.batch}, response "
              f"{args.response_length}, {args.ppo_epochs} epochs x {args.mini_batches} mini-batches, "
              f"{args.threads} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
        print(f"generation, one batch: HF generate {gen_cmp['hf_generate_s']:.3f}s, "
              f"ppo_core sample {gen_cmp['ppo_core_sample_s']:.3f}s ({gen_cmp['speedup']:.1f}x)")
        print(header)
        for it in range(1, args.iterations + 1):
            m = trainer.train_step()
            # real prompt+response tokens of every PPO-epoch forward/backward (the engine
            # counts them; padding positions are not useful work)
            flops = 6 * (n_policy + n_critic) * m["perf/train_forward_tokens"]
            row = {"iter": it, "gen_s": m["time/generation"], "score_s": m["time/scoring"],
                   "train_s": m["time/training"], "step_s": m["time/step"],
                   "gen_tok_per_s": m["perf/generated_tokens_per_s"], "eps": m["eps"],
                   "train_pct_peak": 100 * flops / m["time/training"] / peak,
                   "peak_rss_mib": peak_rss_mb()}
            rows.append(row)
            print(f"{it:>4} {row['gen_s']:>7.3f} {row['score_s']:>7.3f} {row['train_s']:>7.3f} "
                  f"{row['step_s']:>7.3f} {row['gen_tok_per_s']:>9.0f} {row['eps']:>7.1f} "
                  f"{row['train_pct_peak']:>10.1f}% {row['peak_rss_mib']:>12.0f}")
    return {"args": vars(args), "matmul_peak_flops": peak, "n_params_policy": n_policy,
            "generation_comparison": gen_cmp, "iterations": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="episodes per iteration")
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
