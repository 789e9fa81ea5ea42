"""Which fast paths each architecture uses: packing (ppo_core.packing) and the fast decoder
(ppo_core.fast_decode), as decided by their own checks on tiny models built from each config
class (random weights, 1 layer, width 32), with the reason wherever a fast path is not used.

    .venv/bin/python bench/arch_matrix.py

Prints a markdown table (pasted into BENCHMARKS.md). SFT, the reward model and PPO on the
packed and padded paths run for the same architectures in tests/test_arch_matrix.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from ppo_core import fast_decode  # noqa: E402
from ppo_core.models import ARCHITECTURES, build_tiny_causal_lm, train_tokenizer  # noqa: E402
from ppo_core.packing import packing_problem  # noqa: E402

TEXTS = [f"the {t} is {a} ." for t in ("river", "robot", "garden", "city") for a in ("nice", "lovely", "bad")]


def decoder_problem(model: torch.nn.Module) -> str | None:
    """Why the fast decoder is not used for ``model`` (None: it is), from ppo_core.fast_decode's
    own decision."""
    explain = getattr(fast_decode, "fast_decode_problem", None)
    if explain is not None:
        return explain(model)
    return None if fast_decode.supports_fast_decode(model) else "check failed"


def rows(n_layer: int, n_embd: int, n_head: int) -> list[dict[str, str]]:
    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    pad = tok.pad_token_id
    out = []
    for arch in ARCHITECTURES:
        lm = build_tiny_causal_lm(tok, arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                  n_positions=128)
        config = copy.deepcopy(lm.config)
        config.num_labels = 1
        scorer = AutoModelForSequenceClassification.from_config(config)
        problems = {"packing (policy, reference)": packing_problem(lm, "lm", pad),
                    "packing (reward model, critic)": packing_problem(scorer, "scorer", pad),
                    "fast decoder": decoder_problem(lm)}
        row = {"arch": arch, "model class": type(lm).__name__}
        row.update({k: "yes" if v is None else "no" for k, v in problems.items()})
        row["why not"] = "; ".join(f"{k}: {v}" for k, v in problems.items() if v is not None) or "-"
        out.append(row)
    return out


def markdown(table: list[dict[str, str]]) -> str:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--n-embd", type=int, default=32)
    ap.add_argument("--n-head", type=int, default=2)
    args = ap.parse_args(argv)
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}; "
          f"{args.n_layer} layer(s), width {args.n_embd}, {args.n_head} heads, random weights\n")
    print(markdown(rows(args.n_layer, args.n_embd, args.n_head)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
