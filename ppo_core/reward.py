"""Reward model: Bradley-Terry loss on preference pairs, score at the last non-pad token.

Reads ``<data_dir>/rm_train.parquet`` and ``rm_eval.parquet`` (columns ``prompt``, ``chosen``,
``rejected``, optional ``margin``), initialises the model from the SFT model's trunk with a new
scalar head, writes ``<output_dir>/final/`` (an ``AutoModelForSequenceClassification``
save_pretrained dir + tokenizer), checkpoints and ``summary.json``.

Loss per pair (InstructGPT, Ouyang et al. 2022; margin as Llama 2, Touvron et al. 2023)::

    -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

The second term is the reward-centering auxiliary loss (Eisenstein et al. 2023, "Helping or
Herding?"; TRL's ``center_rewards_coefficient``), on by default (``center_coef``).
Normalising scores on reference-policy samples happens in the PPO engine, not here.

    python -m ppo_core.reward --config rm.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppo_core.callbacks import Callback
from ppo_core.config import ConfigError
from ppo_core.data import (
    EncodedPair,
    collate_pairs,
    encode_pair,
    eval_shards,
    rank_micro_batches,
    read_table,
)
from ppo_core.models import (
    LORA_TARGETS,
    build_scorer_from_causal_lm,
    last_token_scores,
    load_tokenizer,
    lora_problems,
)
from ppo_core.strategy import StrategyConfig
from ppo_core.trainer import StoppingConfig, SupervisedTrainer


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model training on ``prompt`` / ``chosen`` / ``rejected`` pairs."""

    data_dir: str
    """Directory holding the training pairs (``train_file``) and rm_eval.parquet."""
    output_dir: str
    """Where final/, checkpoints/ and summary.json go."""
    model_name_or_path: str
    """The SFT model (save_pretrained dir or hub id); its trunk initialises the reward model."""
    train_file: str = "rm_train.parquet"
    """Training pairs under ``data_dir``: ``rm_train.parquet`` for the reward model PPO optimizes,
    ``rm_heldout.parquet`` (disjoint prompts) for the held-out one its guard scores with."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (off: safe default)."""
    max_length: int = 128
    """Max tokens of prompt + response (+EOS) per side; longer pairs are truncated and counted."""
    num_epochs: float = 4.0
    """Passes over the pairs (the TRL recipe issue 11 measured: 4). InstructGPT and OpenRLHF use
    1 epoch for large pretrained models."""
    max_steps: int = 0
    """If > 0, the number of optimizer steps (overrides num_epochs)."""
    batch_size: int = 32
    """Global pairs per optimizer step (= micro_batch_size x world_size x accumulation)."""
    micro_batch_size: int = 32
    """Pairs per forward pass per rank (each pair is two sequences)."""
    learning_rate: float = 5e-4
    """Peak LR for a reward model on a from-scratch trunk. Measured on bench/tasks/constraints.py
    (6,000 pairs, gold-order agreement of the tiny model after 4 epochs): 2e-3 0.60, 5e-4 0.69,
    2e-4 (6 epochs) 0.70; centering (0.01), weight decay or another seed moved it by <= 0.01.
    Use ~9e-6 (OpenRLHF's RM default) for a pretrained hub model; the pipeline's stages do so
    when ``base_model`` is pretrained (``assets.models.PRETRAINED_DEFAULTS``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (HF TrainingArguments default 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (PyTorch / HF TrainingArguments default)."""
    lr_scheduler: str = "cosine"
    """HF scheduler name (cosine with warmup, as OpenRLHF's reward-model trainer)."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warmup (OpenRLHF's default 0.03)."""
    use_margin: bool = True
    """Subtract the data's ``margin`` column inside the sigmoid (Llama 2) when the column exists."""
    mismatched_negatives: float = 0.5
    """Extra training pairs, as a fraction of the real ones: ``(prompt, its chosen)`` preferred over
    ``(prompt, the chosen response of another prompt)``. They teach that a response must answer its
    own prompt, which pairwise labels on two answers to the same prompt teach slowly. Gold-order
    agreement on test pairs (bench/rm_probe.py, 6,000 pairs, last weights): 0 -> 0.5 arithmetic
    0.755 -> 0.799, constraints 0.734 -> 0.730; 0 -> 1.0 style 0.947 -> 0.928, bundled 0.811 ->
    0.846. Through the whole lineage (BENCHMARKS.md, two seeds) PPO's gold win rate rose on
    arithmetic and style and fell on constraints, where repeating prompt items then paid more.
    0 turns them off; the eval split never gets them, so its metrics (and early stopping, when
    on) see real pairs only."""
    center_coef: float = 0.01
    """Reward-centering auxiliary loss coefficient on (r_c + r_r)^2 (Eisenstein et al. 2023 and
    TRL's ``center_rewards_coefficient`` docs use 0.01); 0 disables it. Pairwise losses leave
    each prompt's score offset free, and with mismatched negatives the offsets grew into noise
    PPO must average away: on the recipe task's policy samples (the guard's, SFT to step 60)
    the variance of the per-prompt mean score was 2.4x the within-prompt variance, uncorrelated
    with gold (-0.06); centered, 0.48x.
    Paired over the suite's lineages (BENCHMARKS.md, "Reward centering"), PPO's gold win rate
    moved by +0.07 to +0.12 on recipe (three seeds), +0.04 and +0.05 on style, -0.02 on
    arithmetic, -0.06 and -0.12 on constraints (whose reward model the policy exploits either
    way; the gold gate refuses both) and -0.035 on bundled: +0.013 +- 0.024 on average."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (and at the end); 0 = ``stopping.evals_per_epoch`` times per epoch."""
    eval_batch_size: int = 64
    """Pairs per eval forward pass per rank."""
    max_eval_examples: int = 0
    """If > 0, evaluate on the first N eval pairs only."""
    save_steps: int = 100
    """Full checkpoint every N optimizer steps; 0 = none."""
    keep_last_checkpoints: int = 2
    """Older checkpoints are deleted; 0 keeps all."""
    resume_from: str | None = None
    """"latest", a checkpoint path, or null."""
    stop_after_steps: int = 0
    """If > 0, stop after this step (with a checkpoint) without changing the schedule."""
    lora_rank: int = 0
    """0 trains every weight; > 0 trains LoRA adapters of this rank (peft, the ``lora`` extra)
    and saves the merged model."""
    lora_alpha: int = 16
    """LoRA alpha (OpenRLHF's default 16; peft's LoraConfig default is 8)."""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """Modules that get adapters (Llama and GPT-2 attention names; missing names are skipped)."""
    stopping: StoppingConfig = field(default_factory=lambda: StoppingConfig(patience=0, keep_best=False))
    """Early stopping on the eval split, which weights ``final/`` holds, a wall-clock budget.
    A reward model runs its whole epoch budget (the LR decays to 0) and ships the last weights,
    as SFT does: the eval loss turns up once the model grows overconfident on noisy labels,
    while its ranking still improves. Over 15 probes on five tasks (``bench/rm_probe.py``,
    BENCHMARKS.md "Reward models: the last weights"), the last weights agreed with the gold order as
    well as or better than those early stopping on the eval loss kept (patience 3), by up to
    0.04. Set ``{patience: 3, keep_best: true}`` to stop on the eval loss instead."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """DeepSpeed options (ZeRO stage, offload, bf16, clipping, seed)."""

    def __post_init__(self) -> None:
        problems = lora_problems(self.lora_rank, self.strategy.zero_stage)
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is empty: set it to the SFT model directory")
        for name in ("max_length", "batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set num_epochs > 0 or max_steps > 0")
        if self.center_coef < 0:
            raise ConfigError(f"center_coef={self.center_coef} must be >= 0")
        if self.mismatched_negatives < 0:
            raise ConfigError(f"mismatched_negatives={self.mismatched_negatives} must be >= 0")


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Per-pair loss ``-logsigmoid(r_c - r_r - m) + coef * (r_c + r_r)^2``: (b,) -> (b,)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


def mismatched_pairs(rows: list[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """Up to ``round(fraction * len(rows))`` pairs ``(prompt_i, chosen_i) > (prompt_i, chosen_j)``.

    ``i`` runs over a seeded permutation of the rows (a fresh one per pass when ``fraction`` > 1);
    ``j`` is the first row, walking a second permutation from the same position, whose prompt and
    chosen text both differ from ``i``'s, so every pair is a real mismatch. A row without such a
    partner gives none, and a pass that finds no pair at all ends the search. Margins are 0.
    """
    n = len(rows)
    rng = np.random.default_rng(seed)

    def draw_pass(left: int) -> Iterable[tuple[int, Iterable[int]]]:
        first, second = rng.permutation(n), rng.permutation(n)
        return ((i, (second[(k + step) % n] for step in range(n))) for k, i in enumerate(first[:left]))

    return pairs_from_partners(rows, round(fraction * n), draw_pass)


def pairs_from_partners(rows: list[dict[str, Any]], n_out: int,
                        draw_pass: Callable[[int], Iterable[tuple[int, Iterable[int]]]]) -> list[dict[str, Any]]:
    """Up to ``n_out`` pairs ``(prompt_i, chosen_i) > (prompt_i, chosen_j)``, margin 0.

    Each pass calls ``draw_pass(pairs still missing)`` for rows ``i``, each with its partner
    candidates ``j`` in order of preference; the first ``j`` whose prompt and chosen text both
    differ from ``i``'s is taken. A pass that finds no pair at all ends the search.
    """
    out: list[dict[str, Any]] = []
    while len(out) < n_out:
        found = len(out)
        for i, partners in draw_pass(n_out - len(out)):
            a = rows[i]
            for j in partners:
                b = rows[j]
                if b["prompt"] != a["prompt"] and b["chosen"] != a["chosen"]:
                    out.append({"prompt": a["prompt"], "chosen": a["chosen"], "rejected": b["chosen"],
                                "margin": 0.0})
                    break
        if len(out) == found:  # no row has a partner: more passes would find none either
            break
    return out


class RewardTrainer(SupervisedTrainer):
    """The reward-model loop; ``train()`` is the public entry point."""

    stage = "reward"
    lora_task = "SEQ_CLS"
    example_name = "pairs"

    cfg: RewardConfig

    def _encode(self, rows: list[dict[str, Any]]) -> list[EncodedPair]:
        use_margin = self.cfg.use_margin
        return [
            encode_pair(self.tokenizer, r["prompt"], r["chosen"], r["rejected"], self.cfg.max_length,
                        float(r.get("margin") or 0.0) if use_margin else 0.0)
            for r in rows
        ]

    def setup(self) -> None:
        cfg, s = self.cfg, self.strategy
        data = Path(cfg.data_dir)
        cols = ("prompt", "chosen", "rejected")
        train_rows = read_table(data / cfg.train_file, cols, ("margin",), text_columns=cols)
        eval_rows = read_table(data / "rm_eval.parquet", cols, ("margin",), text_columns=cols)
        if cfg.max_eval_examples > 0:
            eval_rows = eval_rows[: cfg.max_eval_examples]
        extra = mismatched_pairs(train_rows, cfg.mismatched_negatives, cfg.strategy.seed)
        self.data_counts = {"train_preference_pairs": len(train_rows), "train_mismatched_pairs": len(extra)}
        train_rows = train_rows + extra
        s.setup_distributed()
        s.set_seed()
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        with s.partitioned_loading():  # ZeRO-3: each rank allocates only its shards
            model = build_scorer_from_causal_lm(
                cfg.model_name_or_path, pad_token_id=self.tokenizer.pad_token_id,
                trust_remote_code=cfg.trust_remote_code, seed=cfg.strategy.seed,
            )
        self.train_data, self.eval_data = self._encode(train_rows), self._encode(eval_rows)
        self.prepare(model)

    def _scores(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen scores (b,), rejected scores (b,), margins (b,)) from one forward pass."""
        s = self.strategy
        batch = {k: v.to(s.device) for k, v in collate_pairs(pairs, self.tokenizer.pad_token_id).items()}
        scores = last_token_scores(self.engine, batch["input_ids"], batch["attention_mask"])  # (2b,)
        b = len(pairs)
        return scores[:b], scores[b:], batch["margin"]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step; the loss is the mean over the global batch's pairs (see SFT)."""
        cfg, s, engine = self.cfg, self.strategy, self.engine
        indices = self.sampler.batch(step)
        scale = self.grad_accum * s.world_size / len(indices)
        engine.train()
        lr = s.current_lr(engine)
        loss_sum, correct, gap_sum = 0.0, 0.0, 0.0
        grad_norm = float("nan")  # before clipping, of the step that ends the batch
        for mb in rank_micro_batches(indices, s.rank, s.world_size, cfg.micro_batch_size):
            rc, rr, margin = self._scores([self.train_data[i] for i in mb])
            loss = bradley_terry_loss(rc, rr, margin, cfg.center_coef).sum()
            s.backward(loss * scale, engine)
            norm = s.step(engine)
            grad_norm = grad_norm if norm is None else norm
            loss_sum += float(loss.detach())
            correct += float((rc > rr).sum())
            gap_sum += float((rc - rr).detach().sum())
        n = len(indices)
        return {"train/loss": s.all_reduce_sum(loss_sum) / n, "train/accuracy": s.all_reduce_sum(correct) / n,
                "train/margin_mean": s.all_reduce_sum(gap_sum) / n, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/epoch": (step + 1) / self.sampler.steps_per_epoch}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (chosen scored above rejected), mean score gap, loss, score stats."""
        cfg, s = self.cfg, self.strategy
        self.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # n, correct, gap, loss, score sum, score^2 sum
        for idx in eval_shards(len(self.eval_data), s.rank, s.world_size, cfg.eval_batch_size):
            rows = [self.eval_data[i] for i in idx] or [self.eval_data[0]]  # same forward count (ZeRO-3)
            rc, rr, margin = self._scores(rows)
            if not idx:
                continue
            both = torch.cat([rc, rr]).double()
            sums += torch.tensor([
                len(idx), float((rc > rr).sum()), float((rc - rr).sum()),
                float(bradley_terry_loss(rc, rr, margin).sum()), float(both.sum()), float((both**2).sum()),
            ], dtype=torch.float64)
        sums = s.all_reduce_sum(sums)
        n = max(float(sums[0]), 1.0)
        mean = float(sums[4]) / (2 * n)
        var = max(float(sums[5]) / (2 * n) - mean**2, 0.0)
        return {"eval/accuracy": float(sums[1]) / n, "eval/margin_mean": float(sums[2]) / n,
                "eval/loss": float(sums[3]) / n, "eval/score_mean": mean, "eval/score_std": var**0.5}


def train(cfg: RewardConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train the reward model; returns the summary (incl. ``eval/accuracy``), also in summary.json."""
    return RewardTrainer(cfg, callbacks).train()


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """``python -m ppo_core.reward --config FILE``; progress lines on rank 0's stderr."""
    from ppo_core.cli import run_stage

    return run_stage(RewardConfig, train, argv, callbacks, "python -m ppo_core.reward",
                     ("train/loss", "train/accuracy"))


if __name__ == "__main__":
    from ppo_core.strategy import exit_code_after_shutdown

    sys.exit(exit_code_after_shutdown(main()))
