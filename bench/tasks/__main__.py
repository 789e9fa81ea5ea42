"""``python -m bench.tasks NAME --out DIR [--n-pairs N] [--seed S]``: write a task's pairs and config."""

from __future__ import annotations

import argparse
import sys

from bench.tasks import TASKS, write_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tasks", description=__doc__)
    parser.add_argument("name", choices=sorted(TASKS), help="the task")
    parser.add_argument("--out", required=True, help="folder for pairs.jsonl and config.yaml")
    parser.add_argument("--n-pairs", type=int, default=6000, help="preference pairs to generate")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    config = write_task(args.name, args.out, n_pairs=args.n_pairs, seed=args.seed)
    print(f"wrote {config.parent / 'pairs.jsonl'} and {config}")
    print(f"run it: PYTHONPATH=. rlhf run --config {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
