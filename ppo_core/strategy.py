"""The one DeepSpeed strategy: distributed setup, config building, engines, saving (OpenRLHF style).

Everything DeepSpeed-specific lives here, so the engines (SFT, reward model, PPO) read as plain
PyTorch loops. The same code runs in one process on a CPU (gloo backend; the rank/world
variables are set here when no launcher set them) and under ``torchrun`` or the ``deepspeed``
launcher with N ranks (nccl on GPUs).

Batch vocabulary (DeepSpeed's): ``train_batch_size`` is the global number of examples per
optimizer step = ``micro_batch_size`` x ``world_size`` x ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from ppo_core.config import ConfigError
from ppo_core.models import is_partitioned, unwrap

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at first use; without CUDA it must be told "cpu" or it
    # guesses wrong on some machines. setdefault keeps an operator's explicit choice.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@dataclass(frozen=True)
class StrategyConfig:
    """DeepSpeed options shared by every stage (the ``strategy`` block of a stage config)."""

    zero_stage: int = 0
    """ZeRO stage 0-3 (0 = plain data parallel). Default 0 for every stage: ZeRO partitions
    optimizer states and gradients over the ranks, so on one rank it saves no memory and only adds
    bookkeeping (the recipe task, one thread, stage 0 against 2: SFT 28.7 s against 32.2 s for
    300 steps, the implicit reward model 54.3 s against 56.2 s for 200, the same losses). Use 2
    (DeepSpeed-Chat's training default) or 3 under torchrun when optimizer states do not fit."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO-Offload); needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-Infinity); needs zero_stage == 3."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights (DeepSpeed ``bf16.enabled``)."""
    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value; 0 disables. 1.0 as OpenRLHF, DeepSpeed-Chat and
    TRL's SFT/reward trainers (TRL's PPO loop clips only under DeepSpeed; on CPU it never does,
    and turning ours off changed the benchmark's gold gain by -0.021 +- 0.048 over 40 seeds)."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` = nccl with CUDA, gloo otherwise."""
    seed: int = 42
    """Seed for python/numpy/torch RNGs (42: TRL's and HF Trainer's default)."""
    cpu_threads: int | None = None
    """torch intra-op threads per rank when training on CPU. None (auto): the CPUs this process
    may run on, shared out among the ranks on this node (``auto_cpu_threads``), unless
    ``OMP_NUM_THREADS`` is set, which torch then follows; 0 keeps torch's default. Ranks must
    not oversubscribe the cores (measured: 2 threads per process on a 2-core machine busy with
    a second process made a step 5x slower), but one rank alone should use them all (measured:
    200 SFT steps of the recipe task's model took 15 s with 1 thread, 10 s with 2)."""


def auto_cpu_threads() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset limits)
    divided by the ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // ranks)


def resolve_cpu_threads(setting: int | None) -> int:
    """The intra-op thread count ``setup_distributed`` applies for ``cpu_threads`` (0: leave
    torch's own, which follows ``OMP_NUM_THREADS`` when a launcher or the operator set it)."""
    if setting is not None:
        return setting
    return 0 if os.environ.get("OMP_NUM_THREADS") else auto_cpu_threads()


class DeepSpeedStrategy:
    """Builds DeepSpeed configs and engines; rank-aware saving and collectives.

    Typical use::

        strategy = DeepSpeedStrategy(cfg.strategy)
        strategy.setup_distributed()
        strategy.validate_batch(cfg.batch_size, cfg.micro_batch_size)   # before loading models
        engine = strategy.prepare_train(model, optimizer, scheduler,
                                        train_batch_size=..., micro_batch_size=...)
        loss = ...; strategy.backward(loss, engine); strategy.step(engine)
        strategy.save_pretrained(engine, tokenizer, out_dir)
    """

    def __init__(self, cfg: StrategyConfig | None = None) -> None:
        self.cfg = cfg or StrategyConfig()
        self.validate()
        self._threads_applied = False

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Reject option combinations the chosen ZeRO stage cannot do, saying what to change."""
        c = self.cfg
        if c.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"strategy.zero_stage={c.zero_stage}: choose 0, 1, 2 or 3")
        if c.offload_optimizer and c.zero_stage == 0:
            raise ConfigError(
                "strategy.offload_optimizer=true needs ZeRO stage 1, 2 or 3 (zero_stage is 0): "
                "set strategy.zero_stage to 2 (or 3), or set offload_optimizer to false"
            )
        if c.offload_params and c.zero_stage != 3:
            raise ConfigError(
                f"strategy.offload_params=true needs ZeRO stage 3 (zero_stage is {c.zero_stage}): "
                f"set strategy.zero_stage to 3, or set offload_params to false"
            )
        if c.gradient_clipping < 0:
            raise ConfigError(f"strategy.gradient_clipping={c.gradient_clipping}: must be >= 0 (0 disables)")
        if c.cpu_threads is not None and c.cpu_threads < 0:
            raise ConfigError(f"strategy.cpu_threads={c.cpu_threads}: must be >= 0 (0 = torch "
                              f"default) or null (auto)")
        if c.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"strategy.backend={c.backend!r}: choose 'auto', 'gloo' or 'nccl'")
        if c.backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("strategy.backend='nccl' needs CUDA; set it to 'auto' or 'gloo' on a CPU machine")

    def gradient_accumulation_steps(self, train_batch_size: int, micro_batch_size: int) -> int:
        """Accumulation steps for a global batch; ValueError when the split is impossible."""
        world = self.world_size
        if micro_batch_size < 1 or train_batch_size < 1:
            raise ConfigError(
                f"batch_size={train_batch_size} and micro_batch_size={micro_batch_size} must be >= 1"
            )
        per_step = micro_batch_size * world
        if train_batch_size % per_step:
            lower = max(per_step, train_batch_size // per_step * per_step)
            raise ConfigError(
                f"batch_size={train_batch_size} is not divisible by micro_batch_size x world_size = "
                f"{micro_batch_size} x {world} = {per_step}; set batch_size to a multiple of {per_step} "
                f"(e.g. {lower} or {lower + per_step}) or change micro_batch_size"
            )
        return train_batch_size // per_step

    validate_batch = gradient_accumulation_steps

    # ------------------------------------------------------------------ distributed

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def setup_distributed(self) -> None:
        """Initialise torch.distributed through DeepSpeed (idempotent).

        Without a launcher, the env variables a launcher would set are filled in for a world of
        one, so ``python -m ppo_core.sft`` and ``torchrun -m ppo_core.sft`` run the same code.
        ``cpu_threads`` is applied on the first call only: ``prepare_train``/``prepare_eval``
        call this again, and must not undo a thread count the caller set in between.
        """
        if not self._threads_applied:
            self._threads_applied = True
            threads = resolve_cpu_threads(self.cfg.cpu_threads)
            if threads > 0 and not torch.cuda.is_available():
                torch.set_num_threads(threads)
        if dist.is_initialized():
            return
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        backend = self.cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)

    def set_seed(self, seed: int | None = None, per_rank: bool = False) -> None:
        """Seed python, numpy and torch; ``per_rank`` adds the rank (for sampling diversity)."""
        import random

        import numpy as np

        s = (self.cfg.seed if seed is None else seed) + (self.rank if per_rank else 0)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_reduce_mean(self, value: float | torch.Tensor) -> Any:
        """Mean over ranks; returns a float for a float, a tensor for a tensor."""
        return self._all_reduce(value, mean=True)

    def all_reduce_sum(self, value: float | torch.Tensor) -> Any:
        """Sum over ranks; returns a float for a float, a tensor for a tensor."""
        return self._all_reduce(value, mean=False)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s value of a picklable object on every rank."""
        if not dist.is_initialized() or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def _all_reduce(self, value: float | torch.Tensor, mean: bool) -> Any:
        is_tensor = isinstance(value, torch.Tensor)
        t = value.detach().clone().double() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
        if dist.is_initialized() and self.world_size > 1:
            backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            t = t.to(backend_device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if mean:
                t = t / self.world_size
        return t.to(value.device).to(value.dtype) if is_tensor else float(t.item())

    # ------------------------------------------------------------------ configs

    def train_ds_config(self, train_batch_size: int, micro_batch_size: int) -> dict[str, Any]:
        """DeepSpeed config for a trainable model (as DeepSpeed-Chat's ``get_train_ds_config``)."""
        c = self.cfg
        zero: dict[str, Any] = {"stage": c.zero_stage}
        if c.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if c.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if c.zero_stage == 3:
            # Gather full weights on save so save_pretrained on rank 0 writes real tensors.
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {
            "train_batch_size": train_batch_size,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps(train_batch_size, micro_batch_size),
            # fp32 stage 0: :meth:`step` clips itself (one foreach norm that it also reports)
            "gradient_clipping": 0.0 if self.clips_itself else c.gradient_clipping,
            "zero_optimization": zero,
            "bf16": {"enabled": c.bf16},
            # A plain torch optimizer with ZeRO-Offload (DeepSpeed's CPU-Adam would JIT-compile first).
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,  # progress goes through callbacks, not DeepSpeed's logger
            "wall_clock_breakdown": False,
        }

    @property
    def clips_itself(self) -> bool:
        """Whether :meth:`step` clips the gradients instead of DeepSpeed.

        At fp32 stage 0 DeepSpeed clips with a per-parameter Python loop plus an all-reduce
        of the norm, and reports no norm; the full gradients sit on the parameters there
        (already all-reduced by ``engine.backward``), so one ``torch.nn.utils.clip_grad_norm_``
        (foreach kernels) gives the same clipping and the norm to log. ZeRO 1-3 and bf16 own
        their gradient partitions, so DeepSpeed keeps clipping there.
        """
        return self.cfg.zero_stage == 0 and not self.cfg.bf16

    def eval_ds_config(self, micro_batch_size: int = 1) -> dict[str, Any]:
        """DeepSpeed config for a frozen model (as DeepSpeed-Chat's ``get_eval_ds_config``):
        ZeRO-3 sharding (and parameter offload) only when training uses stage 3."""
        c = self.cfg
        zero: dict[str, Any] = {"stage": 3 if c.zero_stage == 3 else 0}
        if c.zero_stage == 3 and c.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        return {
            "train_batch_size": micro_batch_size * self.world_size,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "zero_optimization": zero,
            "bf16": {"enabled": c.bf16},
            "steps_per_print": 10**9,
        }

    # ------------------------------------------------------------------ engines

    def create_optimizer(
        self, model: nn.Module, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> torch.optim.Optimizer:
        """torch AdamW; biases and norm weights get no weight decay (DeepSpeed-Chat's grouping).

        A torch optimizer, not DeepSpeed's FusedAdam/CPU-Adam, which JIT-compile on first use.
        """
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            # a ZeRO-3 partitioned parameter is a flat shard locally; ds_shape is its real shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)

    @staticmethod
    def create_scheduler(
        optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """An HF ``get_scheduler`` schedule (``cosine``, ``linear``, ``constant_with_warmup`` ...)."""
        from transformers import get_scheduler

        warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)  # HF TrainingArguments rounds up
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))

    def prepare_train(
        self, model: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
        train_batch_size: int, micro_batch_size: int,
    ) -> Any:
        """Wrap a trainable model as a DeepSpeed engine; the engine steps the scheduler."""
        import deepspeed

        self.setup_distributed()
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=self.train_ds_config(train_batch_size, micro_batch_size), dist_init_required=False,
        )
        if self.cfg.zero_stage == 0 and self.world_size == 1:
            # One rank has nothing to all-reduce; DeepSpeed would still bucket, flatten and
            # copy every gradient through a gloo all-reduce after each backward.
            engine.enable_backward_allreduce = False
        return engine

    def prepare_eval(self, model: nn.Module, micro_batch_size: int = 1) -> Any:
        """A frozen model for inference: a ZeRO-3 engine under stage 3, else the module itself
        on the device (no DeepSpeed overhead for a model that never steps)."""
        model.requires_grad_(False)
        model.eval()
        if self.cfg.bf16 and not is_partitioned(model):  # zero.Init created them in bf16
            model = model.to(torch.bfloat16)
        if self.cfg.zero_stage != 3:
            return model.to(self.device)
        import deepspeed

        self.setup_distributed()
        engine, *_ = deepspeed.initialize(
            model=model, config=self.eval_ds_config(micro_batch_size), dist_init_required=False
        )
        engine.eval()
        return engine

    @contextmanager
    def partitioned_loading(self) -> Iterator[None]:
        """Models loaded (``from_pretrained``) or built (``from_config``) inside come out
        ZeRO-3-partitioned under stage 3: each rank allocates only its shard of every weight,
        instead of the whole model that ``deepspeed.initialize`` would partition afterwards.
        A no-op below stage 3.

        This is transformers' "non-Trainer DeepSpeed integration": an ``HfDeepSpeedConfig``
        that is alive while the model is created makes ``is_deepspeed_zero3_enabled()`` true,
        and ``from_pretrained`` / ``from_config`` then construct the model inside
        ``deepspeed.zero.Init`` and load the checkpoint shard by shard. transformers keeps
        only a weak reference to the object (``transformers.integrations.deepspeed``), so it
        must be held for as long as models are loaded; it is dropped on exit, so code after
        the context (saving, ``tiny`` models built for a new base) sees no ZeRO-3 state.
        The partitioning options (``offload_param``, bf16) are :meth:`eval_ds_config`'s, the
        same as the engines' later.
        """
        if self.cfg.zero_stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self.setup_distributed()  # zero.Init partitions over the initialised process group
        keep_alive = HfDeepSpeedConfig(self.eval_ds_config())
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del keep_alive

    @contextmanager
    def generation_model(self, model: Any, gather: bool = True) -> Iterator[nn.Module]:
        """The model to call for a whole rollout's token-by-token generation.

        * Below ZeRO-3: the plain module (weights are whole on every rank; the engine's own
          per-forward bookkeeping would be paid once per generated token).
        * ZeRO-3 with ``gather`` (the default): the partitioned weights are all-gathered
          *once* for the whole context (``deepspeed.zero.GatheredParameters``) and the
          engine's per-submodule fetch/release hooks are removed while it lasts, so each
          decode step is a plain local forward (and :mod:`ppo_core.fast_decode` applies).
          As TRL's ``unwrap_model_for_generation(..., gather_deepspeed3_params=True)``
          (``trl/models/utils.py``) and DeepSpeed's own
          ``deepspeed.runtime.zero.unwrap_model_for_generation``. Costs one whole copy of
          the model per rank for the duration.
        * ZeRO-3 without ``gather``: the engine itself; every forward of every decoded token
          all-gathers each layer's weights again (collective: all ranks must step together,
          see ``sync_ranks`` of :func:`ppo_core.generation.sample`). For models whose full
          weights do not fit on one rank.

        Every rank must enter and leave it together (the gather and the re-partitioning on
        exit are collectives).
        """
        if self.cfg.zero_stage != 3 or not is_partitioned(model):
            yield unwrap(model)
            return
        if not gather:
            yield model
            return
        import deepspeed

        offload = _zero3_parameter_offload(model)
        with deepspeed.zero.GatheredParameters(list(unwrap(model).parameters())):
            # what TRL's remove_hooks does: forget which submodules were mid-forward, then
            # drop the fetch (pre-forward) / release (post-forward) and backward hooks
            for p in unwrap(model).parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield unwrap(model)
            finally:
                # DeepSpeed's unwrap_model_for_generation re-adds them this way (it also
                # invalidates the recorded prefetch trace, which the generation forwards
                # would not match anyway)
                offload._register_deepspeed_module(offload.module)

    @staticmethod
    def backward(loss: torch.Tensor, engine: Any) -> None:
        """Backward through the engine (it scales the loss for gradient accumulation)."""
        engine.backward(loss)

    def step(self, engine: Any) -> float | None:
        """Optimizer + scheduler step at an accumulation boundary (``engine.step`` only counts
        micro-batches elsewhere). Returns the global gradient norm before clipping when it
        stepped (NaN where DeepSpeed does not report one), None between boundaries."""
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        norm: float | None = None
        if self.clips_itself:
            grads = [p for p in unwrap(engine).parameters() if p.grad is not None]
            clip = self.cfg.gradient_clipping
            norm = float(torch.nn.utils.clip_grad_norm_(grads, clip, foreach=True) if clip > 0
                         else torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=True))
        engine.step()
        if norm is None:
            reported = engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else float("nan")
        return norm

    @staticmethod
    def current_lr(engine: Any) -> float:
        return float(engine.optimizer.param_groups[0]["lr"]) if engine.optimizer is not None else 0.0

    # ------------------------------------------------------------------ saving

    def full_state_dict(self, model: Any) -> dict[str, torch.Tensor] | None:
        """The unsharded state dict on rank 0 (``None`` elsewhere). Call it on every rank:
        under ZeRO-3 it is a collective that gathers the partitioned parameters."""
        if self.cfg.zero_stage == 3 and hasattr(model, "_zero3_consolidated_16bit_state_dict"):
            sd = model._zero3_consolidated_16bit_state_dict()
            return sd if self.is_rank_zero() else None
        if not self.is_rank_zero():
            return None
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}

    def save_pretrained(self, model: Any, tokenizer: Any, out_dir: str | Path,
                        extra_files: Mapping[str, str] | None = None) -> Path:
        """``save_pretrained`` (safetensors) of model + tokenizer on rank 0, atomically; LoRA
        adapters are merged into the saved weights. ``extra_files`` (name -> text) are written
        beside them, inside the same atomic rename.

        All ranks must call it (ZeRO-3 gathers). The directory is written under a temporary
        name and renamed, so a crash never leaves a half-written model behind.
        """
        out = Path(out_dir)
        module = unwrap(model)
        lora = hasattr(module, "merge_and_unload")  # PEFT: stages refuse it under ZeRO-3
        state = None if lora else self.full_state_dict(model)
        if self.is_rank_zero():
            tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            if lora:  # adapters merged into a copy: a plain model anyone can load
                merged = copy.deepcopy(module).merge_and_unload()
                merged.save_pretrained(str(tmp), safe_serialization=True)
            else:
                module.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            replace_dir(tmp, out)
        self.barrier()
        return out

    def move_dir(self, src: str | Path, dst: str | Path) -> Path:
        """Rank 0 moves the directory ``src`` over ``dst`` (atomically, :func:`replace_dir`), e.g.
        a kept checkpoint's ``save_pretrained`` folder to ``final/``; every rank waits for it."""
        if self.is_rank_zero():
            replace_dir(Path(src), Path(dst))
        self.barrier()
        return Path(dst)

    @staticmethod
    def save_engine_state(engine: Any, ckpt_dir: str | Path) -> None:
        """Model, optimizer and scheduler states of a training engine (DeepSpeed's format,
        sharded per rank under ZeRO). Every rank calls it."""
        engine.save_checkpoint(str(ckpt_dir), tag="state", save_latest=False)

    @staticmethod
    def load_engine_state(engine: Any, ckpt_dir: str | Path) -> None:
        """Restore what :meth:`save_engine_state` wrote (model, optimizer, scheduler).

        DeepSpeed's own checkpoint engine unpickles with ``weights_only=False``, which runs
        whatever code a planted checkpoint carries; these files are read with the restricted
        unpickler instead (tensors, containers and numbers only)."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
            def load(self, path: str, map_location: Any = None) -> Any:
                # the plain data types DeepSpeed writes into its state files besides tensors
                # and containers (an enum, the loss scaler's fields, bf16 fragment offsets),
                # found by resuming ZeRO 0-3 and bf16 engines (tests/test_strategy.py)
                with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
                    return torch.load(path, map_location=map_location, weights_only=True)

        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
        path, _ = engine.load_checkpoint(
            str(ckpt_dir), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine state under {ckpt_dir}")


def exit_after_shutdown(code: int) -> NoReturn:
    """Exit with ``code``, tearing down torch.distributed first when the stage succeeded.

    The ``__main__`` of every engine ends here. A rank that leaves without
    ``destroy_process_group`` can abort in interpreter finalization while gloo's worker threads
    still hold tensors ("terminate called without an active exception", pytorch/pytorch#190489).
    Tearing down is not enough on its own: tests/test_ppo.py's 2-rank ZeRO-3 PPO run, looped on a
    loaded machine, still aborted so in 3 of about 67 runs, after both ranks had passed
    ``destroy_process_group`` (the project's CI lost a run to it); with ``os._exit``, 0 of 100.
    So a successful rank of a multi-rank run flushes its streams and logs and leaves with
    ``os._exit``, skipping the C++ static destructors. By then its outputs are on disk, and the
    Pipes launcher has closed its Dagster Pipes context and flushed its MLflow metrics.
    Teardown runs only after success: a rank that failed would wait in the barrier for peers
    that may never arrive (torchtitan #1342 does the same).
    """
    if code == 0 and dist.is_available() and dist.is_initialized():
        multi_rank = dist.get_world_size() > 1
        dist.barrier()
        dist.destroy_process_group()
        if multi_rank:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    sys.exit(code)


def get_rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_rank_zero() -> bool:
    """True on the process that logs and writes shared files (callbacks use this)."""
    return get_rank() == 0


def _zero3_parameter_offload(engine: Any) -> Any:
    """The object owning a ZeRO-3 engine's parameter hooks (``DeepSpeedZeRoOffload``): the
    stage-3 optimizer's ``parameter_offload`` for a trained engine, the engine's optimizer
    slot itself for a frozen one (DeepSpeed puts a ``DeepSpeedZeRoOffload`` there)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise TypeError(f"{type(engine).__name__} is not a ZeRO-3 DeepSpeed engine: no parameter "
                        "offload hooks to remove for generation")
    return offload


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` (rename is atomic;
    an existing target is first renamed aside, because rename(2) cannot replace a non-empty dir)."""
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it): the single-process rendezvous
    uses it, and so do the tests that launch ranks themselves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
