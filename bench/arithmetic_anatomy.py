"""What an arithmetic reward model knows about the number, and whether PPO moved it (BENCHMARKS.md,
"The suite at the current defaults", twentieth session).

``rm DIR [DIR ...]``: on ``--prompts`` prompts of ``bench/tasks/arithmetic.py``, the template answer
``"the answer is X ."`` with X the right number and X off by 1, 2 and 5; each reward model (scalar,
or implicit with its reference model) scores them. Prints the mean score per case and how often,
within one prompt, the right number scores above each wrong one (gold: every time).

``policy DIR [DIR ...]``: each causal LM's probability of the right number among 0 .. 30 in that
template (the template's log-likelihood with each number, normalised over the numbers), mean
over the prompts, and how often the right number is its most likely one. SFT against PPO shows
whether PPO moved the number at all.

    .venv/bin/python bench/arithmetic_anatomy.py rm RLHF_HOME/models/reward_model/RUN/final
    .venv/bin/python bench/arithmetic_anatomy.py policy RLHF_HOME/models/sft_model/RUN/final <ppo model_path>
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from assets.evaluation import rm_scores, sequence_logprobs  # noqa: E402
from bench.tasks.arithmetic import MAX_OPERAND, gold_reward, sample_prompt  # noqa: E402
from ppo_core.data import encode_response  # noqa: E402
from ppo_core.models import load_tokenizer  # noqa: E402

OFFSETS = (0, 1, 2, 5)
NUMBERS = range(0, 2 * MAX_OPERAND + 1)
BATCH = 256  # sequences per forward pass: the template answers are under 20 tokens


def prompts(n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    return [sample_prompt(rng) for _ in range(n)]


def wrong(answer: int, offset: int) -> int:
    """``answer - offset``, or ``answer + offset`` where that would be negative."""
    return answer + offset if answer - offset < 0 else answer - offset


def response_ids(model_dir: str, pairs: list[tuple[str, str]]) -> list[list[int]]:
    """Each response's token ids and EOS, as the stages encode a response (``ppo_core.data``)."""
    tok = load_tokenizer(model_dir)
    return [encode_response(tok, p, r) for p, r in pairs]


def rm_view(model_dir: str, n: int, seed: int) -> None:
    items = prompts(n, seed)
    cases = {off: [(p, f"the answer is {wrong(a, off)} .") for p, a in items] for off in OFFSETS}
    pairs = [pair for off in OFFSETS for pair in cases[off]]
    # scored as the evaluation report scores, scalar or implicit, in one load of the model(s)
    flat = torch.tensor(rm_scores(model_dir, [p for p, _ in pairs], response_ids(model_dir, pairs), BATCH))
    scores = dict(zip(OFFSETS, flat.view(len(OFFSETS), n)))                    # offset -> (n,)
    print(f"{model_dir} ({n} prompts)\n  {'answer':16s} {'gold':>6s} {'RM':>8s} {'right scores higher':>20s}")
    for off in OFFSETS:
        gold = statistics.fmean(gold_reward(p, r) for p, r in cases[off])
        above = "" if off == 0 else f"{float((scores[0] > scores[off]).float().mean()):.3f}"
        print(f"  {'right' if off == 0 else f'off by {off}':16s} {gold:+6.2f} {float(scores[off].mean()):+8.3f} {above:>20s}")


def policy_view(model_dir: str, n: int, seed: int) -> None:
    items = prompts(n, seed)
    pairs = [(p, f"the answer is {x} .") for p, _ in items for x in NUMBERS]
    per_token = sequence_logprobs(model_dir, [p for p, _ in pairs], response_ids(model_dir, pairs), BATCH)
    logp = torch.tensor([sum(t) for t in per_token]).view(n, len(NUMBERS))    # (prompts, numbers)
    probs = torch.softmax(logp, dim=1)
    right = torch.tensor([a for _, a in items])
    p_right = float(probs[torch.arange(n), right].mean())
    top = float((probs.argmax(dim=1) == right).float().mean())
    print(f"{model_dir} ({n} prompts): P(right number | template) {p_right:.3f}, right number most likely {top:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("view", choices=("rm", "policy"))
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    for d in args.dirs:
        (rm_view if args.view == "rm" else policy_view)(d, args.prompts, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
