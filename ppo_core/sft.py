"""Supervised fine-tuning: causal-LM loss on the response tokens only.

Reads ``<data_dir>/sft_train.parquet`` and ``sft_eval.parquet`` (columns ``prompt``,
``completion``), writes ``<output_dir>/final/`` (save_pretrained, safetensors + tokenizer),
``<output_dir>/checkpoints/step_<N>/`` and ``<output_dir>/summary.json``.

    python -m ppo_core.sft --config sft.json
    torchrun --nproc-per-node 2 -m ppo_core.sft --config sft.json
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ppo_core.callbacks import Callback
from ppo_core.config import ConfigError
from ppo_core.data import (
    IGNORE_INDEX,
    Encoded,
    collate_sft,
    encode_prompt_response,
    eval_shards,
    rank_micro_batches,
    read_table,
)
from ppo_core.models import (
    LORA_TARGETS,
    MODEL_SIZES,
    build_base_model,
    load_causal_lm,
    load_tokenizer,
    lora_problems,
    position_ids_from_mask,
)
from ppo_core.strategy import StrategyConfig
from ppo_core.trainer import StoppingConfig, SupervisedTrainer


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on ``prompt`` -> ``completion``."""

    data_dir: str
    """Directory holding sft_train.parquet and sft_eval.parquet (columns prompt, completion)."""
    output_dir: str
    """Where final/, checkpoints/ and summary.json go."""
    model_name_or_path: str = ""
    """Base model: a hub id or a save_pretrained directory. Empty => build_base_model must be set."""
    build_base_model: str | None = None
    """Build the embedded tiny base model ("tiny" or "small") into <output_dir>/base from the
    training texts (tokenizer trained on them) instead of loading model_name_or_path."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (off: safe default)."""
    max_length: int = 128
    """Max tokens of prompt + response (+EOS); longer examples are truncated and counted."""
    num_epochs: float = 10.0
    """Passes over the training data (``stopping`` can end the run sooner). 10 is the TRL SFT
    recipe issue 11 measured; on a 6,000-pair task from outside the project (bench/tasks/constraints.py) the tiny
    model's eval loss still fell after 2 epochs (1.70) up to ~9 (1.37), and the reward model
    initialised from it agreed more with the gold ordering (0.62 -> 0.69)."""
    max_steps: int = 0
    """If > 0, the number of optimizer steps (overrides num_epochs)."""
    batch_size: int = 32
    """Global examples per optimizer step (= micro_batch_size x world_size x accumulation)."""
    micro_batch_size: int = 32
    """Examples per forward pass per rank."""
    learning_rate: float = 1e-3
    """Peak LR for a model trained from scratch (nanoGPT's shakespeare_char uses 1e-3 for a 10M
    model). Measured with ``lr_scheduler`` below over 10 epochs, gold reward of the SFT samples
    (96 test prompts x 4, temperature 0.7), 1e-3 linear / 2e-3 cosine: bench/tasks/constraints.py
    1.69 / 1.03, style 1.98 / 1.84, arithmetic 1.59 / 1.52; on the bundled task 0.41 against two
    early-stopped 2e-3 cosine runs at 0.17 and 0.42 (36 prompts there: within its noise). Use
    ~2e-5 (TRL SFTConfig's default) for a pretrained hub model; the pipeline's stages do so when
    ``base_model`` is pretrained (``assets.models.PRETRAINED_DEFAULTS``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (HF TrainingArguments default 0)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (PyTorch / HF TrainingArguments default)."""
    lr_scheduler: str = "linear"
    """HF scheduler name; linear decay to 0, HF TrainingArguments' and TRL SFTConfig's default."""
    warmup_ratio: float = 0.0
    """Fraction of steps of linear warmup (HF TrainingArguments' default 0)."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (and at the end); 0 = ``stopping.evals_per_epoch`` times per epoch."""
    eval_batch_size: int = 64
    """Examples per eval forward pass per rank."""
    max_eval_examples: int = 0
    """If > 0, evaluate on the first N eval rows only (faster periodic evals)."""
    save_steps: int = 100
    """Full checkpoint every N optimizer steps; 0 = none."""
    keep_last_checkpoints: int = 2
    """Older checkpoints are deleted, so disk stays bounded on long runs; 0 keeps all."""
    resume_from: str | None = None
    """"latest" (newest checkpoint under output_dir, or fresh), a checkpoint path, or null."""
    stop_after_steps: int = 0
    """If > 0, stop once step N is reached (with a checkpoint) without changing the schedule, so a
    later run with resume_from continues the same trajectory. For pre-emptible jobs and tests."""
    lora_rank: int = 0
    """0 trains every weight; > 0 trains LoRA adapters of this rank (peft, the ``lora`` extra)
    and saves the merged model."""
    lora_alpha: int = 16
    """LoRA alpha (OpenRLHF's default 16; peft's LoraConfig default is 8)."""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """Modules that get adapters (Llama and GPT-2 attention names; missing names are skipped)."""
    stopping: StoppingConfig = field(default_factory=lambda: StoppingConfig(patience=0, keep_best=False))
    """Early stopping on the eval split, which weights ``final/`` holds, a wall-clock budget.
    SFT runs its whole epoch budget and ships the last weights, as TRL's SFTTrainer does: the
    eval loss picks checkpoints that generate worse. On bench/tasks/constraints.py the run
    early-stopped on it (patience 3) kept step 888 of 1,490 at eval loss 1.344, whose samples
    score gold 0.96; the last step, at 1.348, scores 1.69. Set ``{patience: 3, keep_best:
    true}`` to stop on the eval loss instead."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """DeepSpeed options (ZeRO stage, offload, bf16, clipping, seed)."""

    def __post_init__(self) -> None:
        problems = lora_problems(self.lora_rank, self.strategy.zero_stage)
        if problems:
            raise ConfigError("; ".join(problems))
        if bool(self.model_name_or_path) == bool(self.build_base_model):
            raise ConfigError(
                "set exactly one of model_name_or_path (hub id or local directory) and "
                f"build_base_model ({' or '.join(MODEL_SIZES)})"
            )
        if self.build_base_model and self.build_base_model not in MODEL_SIZES:
            raise ConfigError(f"build_base_model={self.build_base_model!r}: choose one of {sorted(MODEL_SIZES)}")
        for name in ("max_length", "batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set num_epochs > 0 or max_steps > 0")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate} must be > 0")


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over labelled (response) tokens and their count.

    ``logits``: (b, t, V); ``labels``: (b, t) with IGNORE_INDEX on prompt and padding.
    """
    shift_logits = logits[:, :-1].float()  # (b, t-1, V): position i predicts token i+1
    shift_labels = labels[:, 1:]  # (b, t-1)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll, (shift_labels != IGNORE_INDEX).sum()


def response_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labelled (response) tokens are the argmax of the previous position's logits:
    (b, t, V), (b, t) -> () long. TRL's SFTTrainer logs the same as ``mean_token_accuracy``."""
    shift_labels = labels[:, 1:]  # (b, t-1)
    hit = (logits[:, :-1].argmax(-1) == shift_labels) & (shift_labels != IGNORE_INDEX)
    return hit.sum()


class SFTTrainer(SupervisedTrainer):
    """The SFT loop; ``train()`` is the public entry point."""

    stage = "sft"
    lora_task = "CAUSAL_LM"

    cfg: SFTConfig

    # ------------------------------------------------------------------ setup

    def _model_source(self, train_rows: list[dict[str, Any]]) -> str:
        if self.cfg.model_name_or_path:
            return self.cfg.model_name_or_path
        base = self.out / "base"
        if self.strategy.is_rank_zero() and not (base / "config.json").is_file():
            texts = [r["prompt"] for r in train_rows] + [r["completion"] for r in train_rows]
            build_base_model(texts, base, size=str(self.cfg.build_base_model), seed=self.cfg.strategy.seed)
        self.strategy.barrier()
        return str(base)

    def _encode(self, rows: list[dict[str, Any]]) -> list[Encoded]:
        return [encode_prompt_response(self.tokenizer, r["prompt"], r["completion"], self.cfg.max_length) for r in rows]

    def setup(self) -> None:
        cfg, s = self.cfg, self.strategy
        data = Path(cfg.data_dir)
        cols = ("prompt", "completion")
        train_rows = read_table(data / "sft_train.parquet", cols, text_columns=cols)
        eval_rows = read_table(data / "sft_eval.parquet", cols, text_columns=cols)
        if cfg.max_eval_examples > 0:
            eval_rows = eval_rows[: cfg.max_eval_examples]
        s.setup_distributed()
        s.set_seed()
        source = self._model_source(train_rows)
        self.tokenizer = load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
        with s.partitioned_loading():  # ZeRO-3: each rank allocates only its shards
            model = load_causal_lm(source, trust_remote_code=cfg.trust_remote_code)
        self.train_data, self.eval_data = self._encode(train_rows), self._encode(eval_rows)
        self.prepare(model)

    # ------------------------------------------------------------------ loop

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch of ``step``; returns its metrics.

        The loss is the mean over all response tokens of the *global* batch: each micro-batch's
        summed NLL is divided by the global token count and multiplied by accumulation x world
        size, which undoes DeepSpeed's averaging over micro-batches and ranks.
        """
        s, engine = self.strategy, self.engine
        indices = self.sampler.batch(step)
        global_tokens = sum(sum(1 for x in self.train_data[i].labels[1:] if x != IGNORE_INDEX) for i in indices)
        scale = self.grad_accum * s.world_size / max(global_tokens, 1)
        engine.train()
        lr = s.current_lr(engine)  # the LR this step uses (the scheduler moves it after the step)
        nll_sum = 0.0
        grad_norm = float("nan")  # before clipping, of the step that ends the batch
        for mb in rank_micro_batches(indices, s.rank, s.world_size, self.cfg.micro_batch_size):
            batch = {k: v.to(s.device) for k, v in collate_sft([self.train_data[i] for i in mb],
                                                                 self.tokenizer.pad_token_id).items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
            nll, _ = response_nll(logits, batch["labels"])
            s.backward(nll * scale, engine)
            norm = s.step(engine)
            grad_norm = grad_norm if norm is None else norm
            nll_sum += float(nll.detach())
        loss = s.all_reduce_sum(nll_sum) / max(global_tokens, 1)
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/epoch": (step + 1) / self.sampler.steps_per_epoch}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean response NLL on the eval split, its perplexity and the share of response
        tokens that are the argmax prediction (all ranks)."""
        s, engine = self.strategy, self.engine
        engine.eval()
        nll_sum, tokens, correct = 0.0, 0, 0
        for idx in eval_shards(len(self.eval_data), s.rank, s.world_size, self.cfg.eval_batch_size):
            # An empty shard still runs a forward (ZeRO-3 needs the same count on every rank).
            rows = [self.eval_data[i] for i in idx] or [self.eval_data[0]]
            batch = {k: v.to(s.device) for k, v in collate_sft(rows, self.tokenizer.pad_token_id).items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
            nll, n = response_nll(logits, batch["labels"])
            if idx:
                nll_sum, tokens = nll_sum + float(nll), tokens + int(n)
                correct += int(response_correct(logits, batch["labels"]))
        nll_sum, tokens = s.all_reduce_sum(nll_sum), s.all_reduce_sum(float(tokens))
        loss = nll_sum / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
                "eval/token_accuracy": s.all_reduce_sum(float(correct)) / max(tokens, 1.0)}


def train(cfg: SFTConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run SFT; returns the summary (final metrics, ``output_dir``), also in summary.json."""
    return SFTTrainer(cfg, callbacks).train()


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """``python -m ppo_core.sft --config FILE``; progress lines on rank 0's stderr."""
    from ppo_core.cli import run_stage

    return run_stage(SFTConfig, train, argv, callbacks, "python -m ppo_core.sft", ("train/loss", "train/lr"))


if __name__ == "__main__":
    from ppo_core.strategy import exit_after_shutdown

    exit_after_shutdown(main())
