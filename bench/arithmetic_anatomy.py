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
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.tasks.arithmetic import MAX_OPERAND, gold_reward, sample_prompt  # noqa: E402
from ppo_core.data import IGNORE_INDEX, encode_prompt_response, pad_sequences  # noqa: E402
from ppo_core.models import (  # noqa: E402
    implicit_reward_spec,
    load_causal_lm,
    load_sequence_scorer,
    load_tokenizer,
    sequence_logprobs,
)
from ppo_core.rewards import ImplicitReward, ModelReward  # noqa: E402

OFFSETS = (0, 1, 2, 5)
NUMBERS = range(0, 2 * MAX_OPERAND + 1)


def prompts(n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    return [sample_prompt(rng) for _ in range(n)]


def wrong(answer: int, offset: int) -> int:
    """``answer - offset``, or ``answer + offset`` where that would be negative."""
    return answer + offset if answer - offset < 0 else answer - offset


def encode(tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (b, t), attention mask (b, t) and response-token mask (b, t) of ``pairs``."""
    enc = [encode_prompt_response(tok, p, " " + r, 128) for p, r in pairs]
    ids, mask = pad_sequences([e.input_ids for e in enc], tok.pad_token_id)
    labels, _ = pad_sequences([e.labels for e in enc], IGNORE_INDEX)
    return ids, mask, (labels != IGNORE_INDEX) & mask.bool()


def load_reward(model_dir: str) -> ImplicitReward | ModelReward:
    """A scalar reward model, or an implicit one with the reference model it names."""
    spec = implicit_reward_spec(model_dir)
    if spec:
        return ImplicitReward(load_causal_lm(model_dir), load_causal_lm(spec["reference_model"]), spec["beta"])
    return ModelReward(load_sequence_scorer(model_dir))


@torch.no_grad()
def rm_view(model_dir: str, n: int, seed: int) -> None:
    tok, reward = load_tokenizer(model_dir), load_reward(model_dir)
    items = prompts(n, seed)
    cases = {off: [(p, f"the answer is {wrong(a, off)} .") for p, a in items] for off in OFFSETS}
    scores = {}
    for off, pairs in cases.items():
        ids, mask, response = encode(tok, pairs)
        scores[off] = reward([p for p, _ in pairs], [r for _, r in pairs], ids, mask, response).float()  # (n,)
    print(f"{model_dir} ({n} prompts)\n  {'answer':16s} {'gold':>6s} {'RM':>8s} {'right scores higher':>20s}")
    for off in OFFSETS:
        gold = statistics.fmean(gold_reward(p, r) for p, r in cases[off])
        above = "" if off == 0 else f"{float((scores[0] > scores[off]).float().mean()):.3f}"
        print(f"  {'right' if off == 0 else f'off by {off}':16s} {gold:+6.2f} {float(scores[off].mean()):+8.3f} {above:>20s}")


@torch.no_grad()
def policy_view(model_dir: str, n: int, seed: int) -> None:
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    items = prompts(n, seed)
    p_right, top = [], []
    for p, a in items:
        ids, mask, response = encode(tok, [(p, f"the answer is {x} .") for x in NUMBERS])
        logp = sequence_logprobs(model, ids, mask, response)             # (numbers,)
        probs = torch.softmax(logp, dim=0)
        p_right.append(float(probs[a]))
        top.append(int(probs.argmax()) == a)
    print(f"{model_dir} ({n} prompts): P(right number | template) {statistics.fmean(p_right):.3f}, "
          f"right number most likely {statistics.fmean(top):.3f}")


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
