"""Model assets: ``base_model`` -> ``sft_model`` -> ``reward_model`` -> ``ppo_policy``, and their checks.

The training assets are thin: map the operator's ``dg.Config`` onto the ppo_core config
dataclass (``core_config``, the one place that mapping lives), write it to a JSON file, open
one MLflow run, launch the stage out of process through ``TrainingLauncher`` (torchrun +
Dagster Pipes), then log plots and the model (a LoggedModel) to MLflow and return a JSON manifest
(``model_path`` = the ``save_pretrained`` directory) with metadata for the Dagster UI. The run
also records the split files it read as dataset inputs and the node's system metrics while
the stage ran.

Every output goes to ``settings.models_root()/<asset>/<dagster run id>/``, so no
materialization overwrites another; a training step uses the root run id (``resume_dir``), so
a retry or a re-execution from failure resumes from the checkpoints the failed attempt left
(``TRAINING_RETRY_POLICY``), unless they were trained from other inputs (``attempt_dir``).
All three training assets share the ``training``
concurrency pool: with a pool limit of 1 only one training step runs at a time on a machine.
"""


import dataclasses
import hashlib
import importlib
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.plots import png_markdown, training_plots
from assets.preflight import fail_on_unimportable_gold_scorers
from resources import settings
from resources.mlflow_models import (
    EVAL,
    STAGE_TASKS,
    TRAINING,
    SplitInput,
    log_datasets,
    log_transformers_model,
    logged_model_id,
    split_inputs,
)
from resources.launcher import TrainingLauncher
from resources.tracking import MLflowResource

TRAINING_POOL = "training"
# A training step killed from outside (OOM killer, lost node, a dead torchrun worker) is
# retried and resumes from its latest checkpoint (``resume_dir``). Two retries cover a
# transient fault without looping on a deterministic one; the delay lets the dead process's
# memory and devices be released first. Configuration errors raise ``dg.Failure(allow_retries
# =False)`` and are not retried.
TRAINING_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=10)
STAGE_CONFIG_CLASSES = {"sft": ("ppo_core.sft", "SFTConfig"),
                        "reward": ("ppo_core.reward", "RewardConfig"),
                        "ppo": ("ppo_core.ppo", "PPOConfig")}
BUILT_SIZES = ("auto", "tiny", "small")
# Code versions, bumped by hand as described in assets/data.py. A training asset's logic
# includes its ppo_core engine: bump the stage's constant when a change to ppo_core/<stage>.py
# (or to the shared trainer / strategy) changes the weights it produces for the same inputs.
BASE_MODEL_VERSION = "4"
SFT_MODEL_VERSION = "3"
REWARD_MODEL_VERSION = "7"  # reward_model and heldout_reward_model (same engine)
PPO_POLICY_VERSION = "8"


# ---------------------------------------------------------------- configs an operator changes
class BaseModelConfig(dg.Config):
    """Where the starting weights and tokenizer come from."""

    source: str = Field(
        default="auto",
        description="'auto': a model built from scratch on the training texts, sized for their token count "
        "(ppo_core.models.AUTO_SIZES) unless n_layer / n_embd / n_head say otherwise; 'tiny' or 'small': "
        "fixed sizes built the same way; otherwise a local save_pretrained directory or a hub id (needs "
        "network access at run time).",
    )
    arch: str = Field(default="llama", description="Architecture of a model built from scratch (random "
                      "weights from its transformers config class, ppo_core.models.ARCHITECTURES): 'llama', "
                      "'mistral', 'qwen2' (rotary positions, Llama layout), 'gpt_neox' (partial rotary), "
                      "'gpt2' or 'opt' (learned positions). Ignored for a pretrained source.")
    n_layer: int = Field(default=0, description="Layers of a model built from scratch; 0 = chosen for the data.")
    n_embd: int = Field(default=0, description="Width of a model built from scratch; 0 = chosen for the data.")
    n_head: int = Field(default=0, description="Attention heads of a model built from scratch (must divide "
                        "n_embd); 0 = chosen for the data.")
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repo; only for sources you trust."
    )
    pretrained: Optional[bool] = Field(
        default=None, description="Whether the source's weights are trained: then SFT, the reward models and "
        "PPO default to fine-tuning learning rates and epochs (PRETRAINED_DEFAULTS). None: a hub id or a "
        "local folder is, a model built here is not; set false for a local folder of untrained weights.")


class StageConfig(dg.Config):
    """What an operator changes in a training stage; ``FIELD_MAP`` says where each field lands.

    Convention of the typed fields: the default (0, or None where 0 is a meaningful value)
    keeps the ppo_core default, which that engine documents with its source; ``seed`` is the
    exception (``ALWAYS_APPLIED``: the lineage pins 0 for every stage).
    """

    steps: int = Field(default=0, description="Training steps (max_steps / num_steps); 0 keeps the ppo_core default.")
    learning_rate: float = Field(default=0.0, description="Peak learning rate; 0 keeps the ppo_core default.")
    max_seconds: float = Field(
        default=0.0, description="Wall-clock budget of the training loop in seconds; when it runs out the "
        "stage ships the weights it would have shipped at the end (the last ones for SFT and reward models, "
        "PPO's guard-kept checkpoint) and ends. 0: no budget.")
    seed: int = Field(default=0, description="Seed of data order, init and sampling.")
    zero_stage: Optional[int] = Field(
        default=None, description="DeepSpeed ZeRO stage 0-3 (strategy.zero_stage); None keeps the engine "
        "default (0 for every stage: plain data parallel; 2 or 3 shard optimizer states over ranks).")
    lora_rank: int = Field(
        default=0, description="Rank of LoRA adapters (peft) instead of training every weight; the merged "
        "model is saved. 0 keeps the engine default (every weight trained).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other field of the ppo_core config dataclass, by name (checked against it); "
        "a field that also has a typed field above belongs there (setting it both ways is an error).",
    )
    log_model_to_mlflow: bool = Field(
        default=True, description="Log the final save_pretrained directory as an MLflow LoggedModel of the "
        "run (transformers flavor); registered_policy registers it. False: registered_policy logs it itself."
    )


class SupervisedStageConfig(StageConfig):
    """The typed fields shared by the supervised engines (SFT and reward model)."""

    epochs: float = Field(
        default=0.0, description="Passes over the training data (num_epochs; the engines' stopping "
        "settings can end sooner); ignored when steps > 0. 0 keeps the engine default.")
    batch_size: int = Field(
        default=0, description="Examples (pairs for a reward model) per optimizer step, all ranks together; "
        "a multiple of micro_batch_size x ranks. 0 keeps the engine default.")
    micro_batch_size: int = Field(
        default=0, description="Examples per forward pass per rank (gradient accumulation makes up the "
        "rest of batch_size). 0 keeps the engine default.")
    max_length: int = Field(
        default=0, description="Most tokens of prompt + response per sequence; longer ones are truncated "
        "and counted. 0 keeps the engine default.")


class SFTModelConfig(SupervisedStageConfig):
    """sft_model: maps onto ``ppo_core.sft.SFTConfig``."""


class RewardStageConfig(SupervisedStageConfig):
    """The typed fields of both reward models."""

    kind: Optional[str] = Field(
        default=None, description="'scalar' (the SFT trunk plus a scalar head read at the last token) or "
        "'implicit' (the SFT language model itself, scoring beta x the response's log-probability ratio "
        "to SFT, trained with the DPO loss); None keeps the engine default.")
    beta: Optional[float] = Field(
        default=None, description="An implicit reward model's beta (the scale of its log-ratio); None "
        "keeps the engine default (0.1).")
    mismatched_negatives: Optional[list[float]] = Field(
        default=None, description="Extra training pairs, as a fraction of the real ones, that prefer a "
        "prompt's chosen response over another prompt's chosen response (a response must answer its own "
        "prompt). One value: train with it ([0] turns them off). Several, e.g. [0.5, 0]: one reward model "
        "per value; PPO optimises their ensemble (each standardised on SFT samples, averaged) and final/ "
        "holds the one with the best eval-split accuracy. None keeps the engine default (0.5).")
    center_coef: Optional[float] = Field(
        default=None, description="Reward-centering loss weight on (r_chosen + r_rejected)^2, which keeps "
        "each prompt's score offset near 0 so PPO is not fed per-prompt noise; None keeps the engine "
        "default (0.01 for a scalar reward model, 0 for an implicit one), 0 turns it off.")
    label_smoothing: Optional[float] = Field(
        default=None, description="Weight of the reversed label in the loss, for noisy preferences (each "
        "pair counts as 'chosen wins' with probability 1 - this); None keeps the engine default, 0 is the "
        "plain Bradley-Terry loss.")
    dropout: Optional[float] = Field(
        default=None, description="Dropout while training, on the attention probabilities and on each "
        "block's residual update (off in evaluation and in the saved model); None keeps the engine "
        "default, 0 trains without.")


class RewardModelConfig(RewardStageConfig):
    """reward_model: maps onto ``ppo_core.reward.RewardConfig``."""


class PPOPolicyConfig(StageConfig):
    """ppo_policy: maps onto ``ppo_core.ppo.PPOConfig``."""

    kl_coef: Optional[float] = Field(
        default=None, description="KL penalty coefficient beta (the initial one when kl_target is set); "
        "None keeps the engine default (0.1 against an implicit reward model, 0.05 otherwise), 0 turns the "
        "penalty (and the KL ceiling) off.")
    kl_target: Optional[float] = Field(
        default=None, description="Adapt beta so the KL per episode approaches this value (adaptive "
        "controller, Ziegler et al. 2019); None keeps the engine default (no target: a fixed beta that "
        "rises only above the KL ceiling).")
    kl_ceiling: Optional[float] = Field(
        default=None, description="Raise beta above kl_coef only while the KL per response (PPO's objective/kl, "
        "nats) is above this, and keep only checkpoints under it; None keeps the engine default, 0 turns "
        "the ceiling off.")
    kl_ceiling_headroom: Optional[float] = Field(
        default=None, description="Raise the KL ceiling to at least the starting policy's own KL to the "
        "reference (the guard's step-0 measurement) plus this many nats, for PPO from an already-trained "
        "policy; None keeps the engine default (a fixed ceiling).")
    response_length: int = Field(default=0, description="Most new tokens per sampled response; 0 keeps the "
                                 "engine default.")
    temperature: float = Field(default=0.0, description="Sampling temperature of the rollouts; 0 keeps the "
                               "engine default.")
    rollout_batch_size: int = Field(default=0, description="Episodes sampled per PPO iteration per rank; 0 "
                                    "keeps the engine default.")
    ppo_epochs: int = Field(default=0, description="Optimisation passes over each rollout; 0 keeps the "
                            "engine default.")
    guard_every: int = Field(
        default=0, description="PPO steps between evaluations of the over-optimization guard (held-out "
        "reward model on held-out prompts); 0 keeps the engine default.")
    guard_prompts: int = Field(default=0, description="Responses scored per guard evaluation; 0 keeps the "
                               "engine default.")
    guard_kl_budget: Optional[float] = Field(
        default=None, description="Largest KL to the reference (nats per response) a kept checkpoint may "
        "have; None keeps the engine default (the KL ceiling, or no budget without one).")
    guard_select_z: Optional[float] = Field(
        default=None, description="The guard's band: checkpoints whose held-out score is within this many "
        "standard errors of the best one's; 0 keeps the best-scoring checkpoint; None keeps the engine "
        "default (1.0).")
    guard_select: Optional[str] = Field(
        default=None, description="Which checkpoint of the band is kept: 'latest' (given up only for a "
        "measurable decline of the held-out score) or 'least_kl' (the one-standard-error rule: the "
        "checkpoint closest to SFT); None keeps the engine default ('latest').")


# ---------------------------------------------------------------- config mapping (the one place)
def core_config_class(stage: str) -> type:
    module, name = STAGE_CONFIG_CLASSES[stage]
    return getattr(importlib.import_module(module), name)


# Where each typed field of a stage's config lands in its ppo_core config dataclass.
# A dotted name is a field of a nested config (SFT keeps its seed in the DeepSpeed strategy).
_COMMON = {"learning_rate": "learning_rate", "zero_stage": "strategy.zero_stage", "lora_rank": "lora_rank"}
_SUPERVISED = {**_COMMON, "steps": "max_steps", "seed": "strategy.seed", "max_seconds": "stopping.max_seconds",
               "epochs": "num_epochs", "batch_size": "batch_size", "micro_batch_size": "micro_batch_size",
               "max_length": "max_length"}
FIELD_MAP: dict[str, dict[str, str]] = {
    "sft": _SUPERVISED,
    "reward": {**_SUPERVISED, "mismatched_negatives": "mismatched_negatives", "center_coef": "center_coef",
               "label_smoothing": "label_smoothing", "dropout": "dropout", "kind": "kind", "beta": "beta"},
    "ppo": {**_COMMON, "steps": "num_steps", "seed": "seed", "max_seconds": "max_seconds",
            "kl_coef": "kl_coef", "kl_target": "kl_target", "kl_ceiling": "kl_ceiling",
            "kl_ceiling_headroom": "kl_ceiling_headroom", "response_length": "response_length",
            "temperature": "temperature", "rollout_batch_size": "rollout_batch_size",
            "ppo_epochs": "ppo_epochs", "guard_every": "guard_every", "guard_prompts": "guard_prompts",
            "guard_kl_budget": "guard_kl_budget", "guard_select_z": "guard_select_z",
            "guard_select": "guard_select"},
}
# Applied even at its default: the lineage pins seed 0 for every stage, whatever an engine's own
# default seed (SFTConfig's strategy seed is 42), so runs of the pipeline are comparable.
ALWAYS_APPLIED = frozenset({"seed"})


def _merge(values: dict[str, Any], updates: dict[str, Any]) -> None:
    """Apply ``updates`` (dotted names or nested mappings) onto ``values`` in place. A nested
    mapping stays partial: ``ppo_core.config.from_dict`` fills the rest from the field's default."""
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest or isinstance(value, dict):
            nested = {**(values.get(head) or {}), **({rest: value} if rest else value)}
            values[head] = nested
        else:
            values[key] = value


def _flatten(updates: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"strategy": {"zero_stage": 0}}`` -> ``{"strategy.zero_stage": 0}`` (dotted keys kept)."""
    flat: dict[str, Any] = {}
    for key, value in updates.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unset_value(cls: type, name: str) -> Any:
    """The "engine default" sentinel of a typed field: its default where it is first declared.
    A subclass may give it a real default (a round's reward model trains one epoch), which then
    counts as set."""
    for base in reversed(cls.__mro__):
        fields = base.__dict__.get("__pydantic_fields__") or {}
        if name in fields:
            return fields[name].default
    return type(None)


def _is_set(cfg: StageConfig, name: str) -> bool:
    return getattr(cfg, name) != _unset_value(type(cfg), name)


def typed_values(stage: str, cfg: StageConfig) -> dict[str, Any]:
    """Core field -> value of every typed field the operator set (a value other than its default)."""
    mapping = FIELD_MAP[stage]
    missing = sorted(set(mapping) - set(type(cfg).model_fields))
    if missing:
        raise TypeError(f"{type(cfg).__name__} has no typed field(s) {missing} that FIELD_MAP[{stage!r}] maps")
    return {core: getattr(cfg, name) for name, core in mapping.items()
            if name in ALWAYS_APPLIED or _is_set(cfg, name)}


def _check_no_conflict(stage: str, cfg: StageConfig) -> None:
    """A field set both typed and in ``overrides`` is ambiguous: say which, instead of picking one."""
    by_core = {core: name for name, core in FIELD_MAP[stage].items()}
    overridden = _flatten(dict(cfg.overrides))
    clashes = [f"{by_core[core]}={getattr(cfg, by_core[core])!r} and overrides {core}={overridden[core]!r}"
               for core in overridden if core in by_core and _is_set(cfg, by_core[core])]
    if clashes:
        raise ValueError(f"{stage} stage config sets a field twice ({'; '.join(clashes)}): keep the typed "
                         "field and remove it from overrides")


# Which of base_model's measured sequence lengths (ppo_core.lengths) each stage takes.
LENGTH_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("max_length",), "reward": ("max_length",), "ppo": ("max_prompt_length", "response_length", "min_response_length"),
}


def length_defaults(stage: str, seq: dict[str, int] | None) -> dict[str, int]:
    """The data's lengths for ``stage`` (none for a manifest written before they were measured)."""
    return {k: int(seq[k]) for k in LENGTH_FIELDS[stage] if k in seq} if seq else {}


# The engines' learning rates and epochs are fitted to models built from scratch here (SFT at
# 1e-3 for 10 epochs); on a pretrained base model they would overwrite what it learned. A
# pretrained base_model therefore gets the fine-tuning defaults of the peers, each from its source.
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"learning_rate": 2e-5,            # TRL SFTConfig.learning_rate
            "num_epochs": 3.0},               # transformers TrainingArguments.num_train_epochs (TRL keeps it)
    "reward": {"learning_rate": 9e-6,         # OpenRLHF train_rm examples (--learning_rate 9e-6
               "num_epochs": 1.0,             # --max_epochs 1), as DeepSpeed-Chat step 2's one epoch
               "kind": "scalar"},             # the peers' reward model; implicit was measured from scratch only
    "ppo": {"learning_rate": 3e-6,            # TRL PPOConfig.learning_rate (trl.experimental.ppo)
            "critic_learning_rate": 9e-6},    # OpenRLHF train_ppo examples' --critic_learning_rate
}                                             # (their actor runs at 5e-7; TRL's value head shares 3e-6)
# With LoRA (lora_rank) these full-fine-tuning rates are low: set learning_rate for the adapters.


def start_defaults(stage: str, start: dict[str, Any] | None) -> dict[str, Any]:
    """What the starting model's manifest (``base_model``'s, or ``sft_model``'s for the stages
    after SFT) changes in ``stage``'s engine defaults: the data's sequence lengths, and the
    fine-tuning learning rates and epochs when the base model is pretrained. Typed fields and
    ``overrides`` still win (:func:`core_config`)."""
    start = start or {}
    return {**length_defaults(stage, start.get("lengths")),
            **(PRETRAINED_DEFAULTS[stage] if is_pretrained(start) else {})}


def is_pretrained(start: dict[str, Any]) -> bool:
    """A manifest's ``pretrained`` (or base_model's setting); unset, a ``source`` other than a
    built size is pretrained: so base_model decides, and its manifests from before the flag
    existed are read (a stage manifest without it trained with the from-scratch defaults)."""
    if start.get("pretrained") is not None:
        return bool(start["pretrained"])
    return bool(start.get("source")) and start["source"] not in BUILT_SIZES


def core_config(stage: str, cfg: StageConfig, defaults: dict[str, Any] | None = None, **paths: Any) -> Any:
    """The ppo_core config of ``stage`` from the asset config plus the paths the asset resolved.

    ``defaults`` (the data's sequence lengths and a pretrained base model's fine-tuning
    settings, :func:`start_defaults`) replace the engine's defaults; typed fields the operator
    set and ``overrides`` win over them. Typed fields at their default (0 / None) keep that
    default: the engine's (its source is documented there), or the one ``defaults`` put in its
    place.
    ``overrides`` set any other field (nested ones as mappings, e.g. ``strategy``); ppo_core's
    strict loader rejects an unknown name or a wrong type, naming the valid ones.
    """
    from ppo_core.config import from_dict
    from ppo_core.lengths import shortest_or_off

    cls = core_config_class(stage)
    _check_no_conflict(stage, cfg)
    values: dict[str, Any] = {}
    _merge(values, dict(defaults or {}))
    _merge(values, typed_values(stage, cfg))
    _merge(values, dict(cfg.overrides))
    if "min_response_length" in values and "min_response_length" not in _flatten(dict(cfg.overrides)):
        # the data's shortest answer must fit under the response_length the operator may have
        # lowered; when it does not, the floor is off rather than the stage refused
        default = next(f.default for f in dataclasses.fields(cls) if f.name == "response_length")
        values["min_response_length"] = shortest_or_off(int(values["min_response_length"]),
                                                        int(values.get("response_length", default)))
    _merge(values, paths)
    core = from_dict(cls, values, where=f"{stage} stage config (asset config + resolved paths)")
    check = getattr(importlib.import_module(STAGE_CONFIG_CLASSES[stage][0]), "check_inputs", None)
    if check is not None:
        check(core)  # fail here, with the engine's message, rather than inside the launched process
    return core


def write_stage_config(core_cfg: Any, path: Path) -> Path:
    from ppo_core.config import save_config

    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(core_cfg, path)
    return path


# ---------------------------------------------------------------- shared training flow
def run_dir(asset: str, context: dg.AssetExecutionContext) -> Path:
    out = settings.models_root() / asset / context.run.run_id
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_dir(asset: str, context: dg.AssetExecutionContext, run_id: str | None = None) -> Path:
    """Output folder of a training step, the same for every attempt at it.

    A retry runs in the same Dagster run and "re-execute from failure" starts a run whose
    ``root_run_id`` is the original's, so ``<asset>/<root run id>[/<partition>]`` is where the
    earlier attempts left their checkpoints; a partitioned asset keeps one folder per key.
    ``run_id`` names another run's folder instead (:func:`attempt_dir`).
    """
    run_id = run_id or context.run.root_run_id or context.run.run_id
    out = settings.models_root() / asset / run_id
    if context.has_partition_key:
        # a partition key is free text: keep it one safe path component
        out = out / re.sub(r"[^A-Za-z0-9._=-]", "_", context.partition_key)
    out.mkdir(parents=True, exist_ok=True)
    return out


INPUTS_FILE = "inputs.json"
# Fields of a stage config that name where this attempt writes or how it starts, not what it trains on.
_ATTEMPT_FIELDS = ("output_dir", "resume_from")


def stage_inputs(core: Any, data_version: str, paths: dict[str, Any]) -> dict[str, Any]:
    """What a training step's checkpoints were trained from: its config (without where it writes),
    the split data version and the content version of every model directory it reads."""
    values = {k: v for k, v in dataclasses.asdict(core).items() if k not in _ATTEMPT_FIELDS}
    config = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
    dirs = [(k, v) for k, v in paths.items() if isinstance(v, str)]
    dirs += [(f"{k}[{i}]", d) for k, v in paths.items() if isinstance(v, (list, tuple)) for i, d in enumerate(v)]
    models = {k: model_dir_version(Path(v)) for k, v in sorted(dirs) if (Path(v) / "config.json").is_file()}
    return {"config": config, "data_version": data_version, "models": models}


def attempt_dir(asset: str, context: dg.AssetExecutionContext, inputs: dict[str, Any]) -> Path:
    """The folder this attempt trains in: the step's resume folder (:func:`resume_dir`) unless an
    earlier run left checkpoints there from other inputs (a re-execution after the config, the
    data or an upstream model changed). Those are never resumed nor overwritten, since a
    registered version's files may be there; this run gets a folder of its own."""
    out = resume_dir(asset, context)
    recorded_file = out / INPUTS_FILE
    if not recorded_file.is_file():
        return out
    recorded = json.loads(recorded_file.read_text())
    if recorded == inputs:
        return out
    changed = sorted(k for k in {*recorded, *inputs} if recorded.get(k) != inputs.get(k))
    own = resume_dir(asset, context, run_id=context.run.run_id)
    if own == out:
        raise dg.Failure(description=f"{asset}: {out} holds checkpoints of other inputs ({', '.join(changed)} "
                         f"differ) from this same run; remove {recorded_file} to retrain there",
                         allow_retries=False)
    context.log.warning(f"{asset}: the checkpoints in {out} were trained from other inputs "
                        f"({', '.join(changed)} differ); training afresh in {own}")
    own_file = own / INPUTS_FILE
    if own_file.is_file() and json.loads(own_file.read_text()) != inputs:
        raise dg.Failure(description=f"{asset}: {own} holds checkpoints of other inputs", allow_retries=False)
    return own


def latest_checkpoint_step(out: Path) -> int | None:
    """Step of the newest complete checkpoint an earlier attempt left in ``out`` (None: none).

    A reward model with several candidates (``ppo_core.reward.train_candidates``) resumes too
    when a candidate finished before the unfinished one saved a checkpoint: step 0 then.
    """
    from ppo_core.checkpoint import find_latest_checkpoint, read_trainer_state

    roots = [out / "checkpoints", *(c / "checkpoints" for c in unfinished_candidates(out))]
    steps = [int(read_trainer_state(latest)["step"]) for latest in map(find_latest_checkpoint, roots)
             if latest is not None]
    if steps:
        return max(steps)
    return 0 if finished_candidates(out) else None


def _candidate_dirs(out: Path) -> list[Path]:
    root = out / "candidates"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def finished_candidates(out: Path) -> list[str]:
    """Names of the reward-model candidates under ``out`` the engine will not train again."""
    from ppo_core.reward import finished_summary

    return [c.name for c in _candidate_dirs(out) if finished_summary(c) is not None]


def unfinished_candidates(out: Path) -> list[Path]:
    done = set(finished_candidates(out))
    return [c for c in _candidate_dirs(out) if c.name not in done]


def resume_step(context: dg.AssetExecutionContext, asset: str, cfg: StageConfig, out: Path) -> int | None:
    """The checkpoint step this attempt resumes from, logged; None: a fresh start.

    An operator's own ``resume_from`` (in ``overrides``, even null) wins over the automatic one.
    """
    if "resume_from" in cfg.overrides:
        return None
    step = latest_checkpoint_step(out)
    if step is not None:
        context.log.info(f"resuming {asset} from checkpoint step {step}")
    return step


def prepare_attempt(out: Path, metrics_file: Path, resumed: int | None, operator_resume: bool) -> None:
    """Clear what an earlier attempt left in ``out`` that this one must not report as its own.

    A fresh start keeps nothing (an attempt without a checkpoint left nothing reusable, and
    files such as PPO's guard samples are appended to). A resume keeps the checkpoints and
    ``best/`` weights but deletes ``summary.json``, which the engines write last, after
    ``final/``: the asset then reads only this attempt's summary, never an earlier attempt's
    beside a ``final/`` this attempt did not write. Metric rows after the checkpoint are
    redone by the resumed run, so they go too.
    """
    if resumed is None and not operator_resume:
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return
    (out / "summary.json").unlink(missing_ok=True)
    if resumed is not None and metrics_file.is_file():
        # a finished candidate's rows stay whatever their step: only the unfinished one is redone
        done = tuple(f"{name}/" for name in finished_candidates(out))

        def kept(row: dict[str, Any]) -> bool:
            return row.get("step", 0) <= resumed or (bool(done) and any(k.startswith(done) for k in row))

        keep = [line for line in metrics_file.read_text().splitlines() if line.strip() and kept(json.loads(line))]
        metrics_file.write_text("".join(line + "\n" for line in keep))


def stage_core_config(stage: str, cfg: StageConfig, defaults: dict[str, Any] | None = None, **paths: Any) -> Any:
    """``core_config`` with a bad configuration as a non-retryable failure: retrying cannot fix it."""
    try:
        return core_config(stage, cfg, defaults, **paths)
    except ValueError as exc:  # ppo_core.config.ConfigError is a ValueError
        raise dg.Failure(description=f"{stage} stage config: {exc}", allow_retries=False) from exc


def _summary(output_dir: Path) -> dict[str, Any]:
    path = output_dir / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the training stage finished without writing its summary")
    return json.loads(path.read_text())


def _numbers(summary: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def train_stage(
    context: dg.AssetExecutionContext,
    *,
    asset: str,
    stage: str,
    cfg: StageConfig,
    mlflow: MLflowResource,
    launcher: TrainingLauncher,
    data_version: str,
    paths: dict[str, Any],
    datasets: list[SplitInput] | None = None,
    start: dict[str, Any] | None = None,
) -> dg.MaterializeResult:
    """Configure, launch, log and describe one training stage (the body of every training asset).

    ``datasets``: the split files the stage reads, logged as the run's dataset inputs. ``start``:
    the manifest of the model the lineage started from (base_model's, or sft_model's, which
    carries them on): its measured sequence lengths and whether it is pretrained
    (:func:`start_defaults`); this stage's manifest carries both on to the stages after it.
    """
    fail_on_unimportable_gold_scorers(context)
    start = start or {}
    seq, pretrained = start.get("lengths"), is_pretrained(start)
    if pretrained:
        context.log.info(f"pretrained base model: {stage} defaults to fine-tuning settings "
                         f"{PRETRAINED_DEFAULTS[stage]} (typed fields and overrides win)")
    # the folder is chosen from the inputs, so the config is built before it is known; where
    # it writes is not an input (stage_inputs leaves output_dir out)
    core = stage_core_config(stage, cfg, start_defaults(stage, start),
                             output_dir=str(settings.models_root() / asset), **paths)
    inputs = stage_inputs(core, data_version, paths)
    out = attempt_dir(asset, context, inputs)
    metrics_file = out / "metrics.jsonl"
    resumed = resume_step(context, asset, cfg, out)
    prepare_attempt(out, metrics_file, resumed, operator_resume="resume_from" in cfg.overrides)
    (out / INPUTS_FILE).write_text(json.dumps(inputs, indent=1, sort_keys=True))
    resume = {} if resumed is None else {"resume_from": "latest"}
    core = dataclasses.replace(core, output_dir=str(out), **resume)
    config_path = write_stage_config(core, out / "stage_config.json")
    with mlflow.run(context, asset, {"data_version": data_version, "stage": stage}) as run:
        run_id = run.info.run_id
        mlflow.log_params(run_id, dataclasses.asdict(core))
        if resumed is not None:
            mlflow.set_tags(run_id, {"rlhf.resumed_from_step": resumed})
        log_datasets(mlflow.client(), run_id, datasets or [])
        with mlflow.system_metrics(run_id):
            invocation = launcher.launch(
                context, stage, config_path, mlflow_tracking_uri=mlflow.tracking_uri,
                mlflow_run_id=run_id, metrics_file=metrics_file,
            )
        pipes_meta = dict(invocation.get_materialize_result().metadata or {})
        summary = _summary(out)
        kept = _kept_metadata(summary)
        plots = training_plots(metrics_file, out / "plots", kept_step=kept.get("kept_step"))
        for png in plots.values():
            mlflow.log_artifact(run_id, png, "plots")
        # which weights were shipped and why the loop ended, beside the run's metrics
        mlflow.set_tags(run_id, {f"rlhf.{k}": v for k, v in kept.items()})
        mlflow.log_artifact(run_id, config_path)
        model_path = out / "final"
        if summary.get("completed") is False or not model_path.is_dir():
            # a final/ without this attempt's "completed" summary may be an earlier attempt's
            raise FileNotFoundError(f"{model_path}: the {stage} stage wrote no final save_pretrained directory")
        model_id = None
        if cfg.log_model_to_mlflow:
            # a LoggedModel of this run: the registry registers it, evaluation metrics attach to it
            model_id = logged_model_id(log_transformers_model(
                mlflow.tracking_uri, run_id, model_path, asset, STAGE_TASKS[stage]))
        url = mlflow.run_url(run)
    numbers = _numbers(summary)
    members = [str(Path(c["output_dir"]) / "final") for c in summary.get("candidates") or []]
    manifest = {
        "stage": stage, "model_path": str(model_path), "output_dir": str(out),
        # a reward model trained as several candidates: PPO optimises all of them (reward_model_paths)
        **({"member_paths": members} if len(members) > 1 else {}),
        # PPO with several reward models: each member's reference mean and std (the report's weights)
        **({"reward_ensemble": summary["reward_ensemble"]} if "reward_ensemble" in summary else {}),
        "config_path": str(config_path), "metrics_file": str(metrics_file),
        "mlflow_run_id": run_id, "mlflow_model_id": model_id, "data_version": data_version,
        "summary": numbers, "plots": {k: str(v) for k, v in plots.items()}, "lengths": seq,
        "pretrained": pretrained,
    }
    metadata: dict[str, Any] = {
        **pipes_meta,
        "mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": run_id,
        "mlflow_model_id": model_id or "not logged (log_model_to_mlflow: false)",
        "model_path": dg.MetadataValue.path(str(model_path)),
        "data_version": data_version,
        "summary": dg.MetadataValue.md(
            "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4g} |" for k, v in numbers.items())),
        **kept,
        **({} if resumed is None else {"resumed_from_step": resumed}),
    }
    for name, png in plots.items():
        metadata[f"plot_{name}"] = dg.MetadataValue.md(png_markdown(png, name))
    version = "+".join(model_dir_version(Path(p)) for p in members) if len(members) > 1 else \
        model_dir_version(model_path)
    return dg.MaterializeResult(value=manifest, metadata=metadata, data_version=dg.DataVersion(version))


def _kept_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """Which step's weights the stage shipped and why it stopped (the UI's first question)."""
    out: dict[str, Any] = {}
    if "stopped_reason" in summary:
        out["stopped_reason"] = str(summary["stopped_reason"])
    kept = summary.get("kept_step", summary.get("best_step"))
    if isinstance(kept, (int, float)):
        out["kept_step"] = int(kept)
        out["trained_steps"] = int(summary.get("step", kept))
    if summary.get("candidates"):
        metric, shipped = summary["candidate_metric"], summary["mismatched_negatives"]
        others = "; ".join(f"{c['mismatched_negatives']:g}: {c[metric]:.3f}" for c in summary["candidates"]
                           if c["mismatched_negatives"] != shipped)
        out["mismatched_negatives"] = f"{shipped:g} ({metric} {summary[metric]:.3f}; {others})"
    if "best_metric_name" in summary:
        out["selected_on"] = f"{summary['best_metric_name']} on the eval split (best {summary['best_metric']:.4g})"
    elif "guard/kept_step" in summary:
        best = summary.get("guard/best_step", summary["guard/kept_step"])
        # summaries from before guard_select existed were written under the least-KL rule
        latest = summary.get("guard_select", "least_kl") == "latest"
        rule = ("" if best == summary["guard/kept_step"] else
                f"; the best score was at step {int(best)}, the kept one is "
                + ("the last within guard_select_z standard errors of it" if latest else
                   "within guard_select_z standard errors of it at measurably lower KL"))
        out["selected_on"] = ("held-out reward model score on held-out prompts "
                              f"(gain {summary['guard/heldout_gain']:+.3f} +- {summary['guard/heldout_gain_se']:.3f} "
                              f"over SFT, at {summary['guard/kl_kept']:.2f} nats/response KL{rule})")
        if "guard/kl_budget" in summary:
            out["kl_budget"] = (f"{summary['guard/kl_budget']:g} nats/response: checkpoints over it are never kept"
                                + (f"; KL coefficient at the end {summary['objective/kl_coef']:.3g}"
                                   if "objective/kl_coef" in summary else ""))
    return out


def reward_model_paths(manifest: dict) -> str | list[str]:
    """What PPO scores with: every member of a reward model trained as several candidates (an
    ensemble, ``ppo_core.rewards.EnsembleReward``), else its one model."""
    members = manifest.get("member_paths") or []
    return list(members) if len(members) > 1 else str(manifest["model_path"])


def _split(splits: dict, name: str) -> str:
    path = Path(splits["split_dir"]) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from dataset_splits; re-materialize dataset_splits")
    return str(path)


def _split_dir(splits: dict, required: tuple[str, ...]) -> str:
    for name in required:
        _split(splits, name)
    return str(splits["split_dir"])


def _data_version(splits: dict) -> str:
    return str(splits.get("data_version", "unknown"))


# ---------------------------------------------------------------- assets
def _training_texts(splits: dict) -> list[str]:
    """Texts the tiny tokenizer is trained on: prompts and responses of the training splits only."""
    texts: list[str] = []
    sft = pd.read_parquet(_split(splits, "sft_train.parquet"))
    texts += (sft["prompt"] + " " + sft["completion"]).astype(str).tolist()
    rm = pd.read_parquet(_split(splits, "rm_train.parquet"))
    texts += rm["chosen"].astype(str).tolist() + rm["rejected"].astype(str).tolist()
    return texts


# Split files whose prompts / responses set the sequence lengths (ppo_core.lengths): every
# prompt PPO and the evaluation will see, every response SFT and the reward models train on.
_PROMPT_SPLITS = ("sft_train.parquet", "ppo_train.parquet", "ppo_eval.parquet", "test_prompts.parquet")
_RESPONSE_SPLITS = {"sft_train.parquet": ("completion",), "rm_train.parquet": ("chosen", "rejected"),
                    "rm_heldout.parquet": ("chosen", "rejected")}


def model_context(model_dir: Path) -> int | None:
    """Positions a model attends over, from its config.json (None when it does not say)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return next((int(cfg[k]) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if isinstance(cfg.get(k), int)), None)


def data_lengths(splits: dict, model_dir: Path) -> dict[str, int]:
    """``ppo_core.lengths.length_settings`` of the split files under ``model_dir``'s tokenizer
    (each distinct prompt and response counted once)."""
    from ppo_core import lengths, models

    tok = models.load_tokenizer(str(model_dir))
    prompts: set[str] = set()
    owned: dict[str, str] = {}   # response -> a prompt it answers (the chat-template rule needs one)
    for name in _PROMPT_SPLITS:
        path = Path(splits["split_dir"]) / name
        if path.is_file():
            prompts.update(pd.read_parquet(path, columns=["prompt"])["prompt"].astype(str))
    for name, cols in _RESPONSE_SPLITS.items():
        path = Path(splits["split_dir"]) / name
        if path.is_file():
            frame = pd.read_parquet(path, columns=["prompt", *cols]).astype(str)
            for col in cols:
                owned.update(zip(frame[col], frame["prompt"]))
    p, r = lengths.token_lengths(tok, sorted(prompts), list(owned), list(owned.values()))
    return lengths.length_settings(p, r)


def with_min_response_length(start: dict, splits: dict) -> dict:
    """``start`` (the SFT manifest PPO starts from) with ``lengths.min_response_length`` measured
    on the splits when the manifest was written before base_model measured it, so PPO's
    short-answer floor (``ppo_core.lengths``) is on for lineages trained before it existed too.
    A manifest without measured lengths keeps the engine's defaults, as before."""
    seq = start.get("lengths")
    if not seq or "min_response_length" in seq:
        return start
    measured = data_lengths(splits, Path(start["model_path"]))["min_response_length"]
    return {**start, "lengths": {**seq, "min_response_length": measured}}


@dg.asset(group_name="models", kinds={"pytorch"}, code_version=BASE_MODEL_VERSION,
          description="Tokenizer and starting weights: built tiny from the training texts, or a hub id / local path; "
          "the sequence lengths the stages use, measured on the data.")
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, dataset_splits: dict) -> dg.MaterializeResult:
    from ppo_core import lengths, models

    out = run_dir("base_model", context)
    source = config.source.strip()
    dims = {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head}
    seq: dict[str, int] | None = None
    if source in BUILT_SIZES:
        if config.arch not in models.ARCHITECTURES:
            raise dg.Failure(description=f"base_model: arch={config.arch!r} is not one the builder knows; "
                             f"choose one of {', '.join(models.ARCHITECTURES)}")
        if config.pretrained:
            raise dg.Failure(description=f"base_model: pretrained: true, but source {source!r} builds a model "
                             "with random weights: leave pretrained unset (or false)", allow_retries=False)
        if source != "auto" and any(dims.values()):
            raise dg.Failure(description=f"base_model: n_layer / n_embd / n_head size an 'auto' model; source "
                             f"{source!r} has a fixed size ({models.MODEL_SIZES[source]}): set source: auto")
        texts = _training_texts(dataset_splits)
        size: Any = dims if source == "auto" else source
        context.log.info(f"building a {source} {config.arch} model and tokenizer from {len(texts)} training texts")
        models.build_base_model(texts, str(out / "final"), size=size, arch=config.arch)
        # the tokenizer is trained on the texts alone: a rebuild with more positions keeps it
        seq = data_lengths(dataset_splits, out / "final")
        need = lengths.context_for(seq, floor=0)
        if need > (model_context(out / "final") or need):
            context.log.info(f"rebuilding with {need} positions: the data's sequences need them")
            models.build_base_model(texts, str(out / "final"), size=size, arch=config.arch, n_positions=need)
    elif any(dims.values()):
        raise dg.Failure(description=f"base_model: n_layer / n_embd / n_head size a model built from scratch; "
                         f"source {source!r} is a pretrained model whose size is fixed: set them to 0")
    else:
        # Copy into this run's folder so downstream assets always read a local, immutable directory.
        context.log.info(f"loading base model {source!r}")
        tok = models.load_tokenizer(source, trust_remote_code=config.trust_remote_code)
        model = models.load_causal_lm(source, trust_remote_code=config.trust_remote_code)
        tok.save_pretrained(out / "final")
        model.save_pretrained(out / "final", safe_serialization=True)
    n_params = _count_params(out / "final")
    arch = _architecture(out / "final")
    seq = seq or data_lengths(dataset_splits, out / "final")
    positions = model_context(out / "final")
    if positions is not None:
        try:
            seq = lengths.fit_context(seq, positions)
        except ValueError as exc:
            raise dg.Failure(description=f"base_model: {exc}", allow_retries=False) from exc
    context.log.info(f"sequence lengths for this data: {seq}")
    pretrained = is_pretrained({"source": source, "pretrained": config.pretrained})
    manifest = {"model_path": str(out / "final"), "source": source, "pretrained": pretrained,
                "data_version": _data_version(dataset_splits), "n_params": n_params, **arch, "lengths": seq}
    # the flag changes every stage's defaults, so flipping it on the same weights is new data
    version = model_dir_version(out / "final") + ("+pretrained" if pretrained else "")
    return dg.MaterializeResult(value=manifest, data_version=dg.DataVersion(version),
                                metadata={"model_path": dg.MetadataValue.path(str(out / "final")), "source": source,
                                          "pretrained": pretrained,
                                          "n_params": n_params, **arch, "context": positions or "unknown",
                                          "lengths": dg.MetadataValue.json(seq)})


def _architecture(model_dir: Path) -> dict[str, Any]:
    """Depth, width and heads from config.json (names differ between architectures)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    pick = {"n_layer": ("num_hidden_layers", "n_layer", "num_layers"),
            "n_embd": ("hidden_size", "n_embd", "d_model"),
            "n_head": ("num_attention_heads", "n_head")}
    found = {k: next((cfg[n] for n in names if isinstance(cfg.get(n), int)), None) for k, names in pick.items()}
    return {"model_type": str(cfg.get("model_type", "")), **{k: v for k, v in found.items() if v is not None}}


def model_dir_version(model_dir: Path) -> str:
    """Data version of a save_pretrained directory: a hash of every file's name and bytes.

    The shipped weights, config and tokenizer are what downstream assets read, so the same
    files (a deterministic re-run, a resumed retry) leave them fresh and any change makes them
    stale. Hashing costs about a second per GB, small beside the training that wrote them.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(model_dir).as_posix()}\0".encode())
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRY_POLICY, code_version=SFT_MODEL_VERSION,
          description="Supervised fine-tuning of base_model on (prompt, chosen) pairs.")
def sft_model(context: dg.AssetExecutionContext, config: SFTModelConfig, mlflow: MLflowResource,
              launcher: TrainingLauncher, dataset_splits: dict, base_model: dict) -> dg.MaterializeResult:
    return train_stage(
        context, asset="sft_model", stage="sft", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": base_model["model_path"],
               "data_dir": _split_dir(dataset_splits, ("sft_train.parquet", "sft_eval.parquet"))},
        datasets=split_inputs(dataset_splits, {"sft_train": TRAINING, "sft_eval": EVAL}),
        start=base_model,
    )


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRY_POLICY, code_version=REWARD_MODEL_VERSION,
          description="Bradley-Terry reward model on preference pairs, initialised from sft_model.")
def reward_model(context: dg.AssetExecutionContext, config: RewardModelConfig, mlflow: MLflowResource,
                 launcher: TrainingLauncher, dataset_splits: dict, sft_model: dict) -> dg.MaterializeResult:
    # InstructGPT (Ouyang et al. 2022, sec. 3.5) starts the reward model from the SFT model.
    return train_stage(
        context, asset="reward_model", stage="reward", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": sft_model["model_path"],
               "data_dir": _split_dir(dataset_splits, ("rm_train.parquet", "rm_eval.parquet"))},
        datasets=split_inputs(dataset_splits, {"rm_train": TRAINING, "rm_eval": EVAL}),
        start=sft_model,
    )


class HeldoutRewardModelConfig(RewardStageConfig):
    """heldout_reward_model: maps onto ``ppo_core.reward.RewardConfig`` (``train_file`` = rm_heldout)."""


def _heldout_pairs(splits: dict) -> int:
    return int(splits.get("counts", {}).get("rm_heldout", 0))


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRY_POLICY, code_version=REWARD_MODEL_VERSION,
          description="Reward model on the held-out pairs (rm_heldout, prompts disjoint from reward_model's): "
          "the signal PPO's over-optimization guard selects checkpoints with; the policy never trains on it.")
def heldout_reward_model(context: dg.AssetExecutionContext, config: HeldoutRewardModelConfig,
                         mlflow: MLflowResource, launcher: TrainingLauncher, dataset_splits: dict,
                         sft_model: dict) -> dg.MaterializeResult:
    if config.mismatched_negatives and len(config.mismatched_negatives) > 1:
        raise dg.Failure(description=f"heldout_reward_model: mismatched_negatives={config.mismatched_negatives}: "
                         "the guard scores with one model, so give one value", allow_retries=False)
    if _heldout_pairs(dataset_splits) == 0:
        context.log.warning("rm_heldout is empty (dataset_splits heldout_fraction 0): PPO runs without "
                            "its over-optimization guard and keeps its last step")
        return dg.MaterializeResult(value={"model_path": None, "summary": {}},
                                    metadata={"guard": "off: no held-out pairs"},
                                    data_version=dg.DataVersion("guard-off"))
    return train_stage(
        context, asset="heldout_reward_model", stage="reward", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": sft_model["model_path"], "train_file": "rm_heldout.parquet",
               "data_dir": _split_dir(dataset_splits, ("rm_heldout.parquet", "rm_eval.parquet"))},
        datasets=split_inputs(dataset_splits, {"rm_heldout": TRAINING, "rm_eval": EVAL}),
        start=sft_model,
    )


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          retry_policy=TRAINING_RETRY_POLICY, code_version=PPO_POLICY_VERSION,
          description="PPO policy: sft_model optimised against reward_model with a KL penalty to sft_model; "
          "the checkpoint kept is the one heldout_reward_model scores best on held-out prompts.")
def ppo_policy(context: dg.AssetExecutionContext, config: PPOPolicyConfig, mlflow: MLflowResource,
               launcher: TrainingLauncher, dataset_splits: dict, sft_model: dict,
               reward_model: dict, heldout_reward_model: dict) -> dg.MaterializeResult:
    guard = heldout_reward_model.get("model_path")
    return train_stage(
        context, asset="ppo_policy", stage="ppo", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"policy_path": sft_model["model_path"],
               "reward_model_path": reward_model_paths(reward_model),
               **({"guard_reward_model_path": guard} if guard else {}),
               "train_file": _split(dataset_splits, "ppo_train.parquet"),
               "eval_file": _split(dataset_splits, "ppo_eval.parquet")},
        datasets=split_inputs(dataset_splits, {"ppo_train": TRAINING, "ppo_eval": EVAL}),
        start=with_min_response_length(sft_model, dataset_splits),
    )


# ---------------------------------------------------------------- checks
RM_ACCURACY_KEYS = ("eval/accuracy", "eval_accuracy", "accuracy")
# the kept checkpoint's KL (guard, held-out prompts) first, else the last rollout's
PPO_KL_KEYS = ("guard/kl_kept", "objective/kl", "kl")


def first_metric(summary: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, float] | None:
    for k in keys:
        if isinstance(summary.get(k), (int, float)):
            return k, float(summary[k])
    return None


class RewardAccuracyCheckConfig(dg.Config):
    min_accuracy: float = Field(
        default=0.6, description="Held-out pairwise accuracy the reward model must reach (chance is 0.5)."
    )


def reward_accuracy_result(manifest: dict, min_accuracy: float) -> dg.AssetCheckResult:
    found = first_metric(manifest.get("summary", {}), RM_ACCURACY_KEYS)
    if found is None:
        return dg.AssetCheckResult(
            passed=False, description=f"reward_model summary has none of {RM_ACCURACY_KEYS}",
            metadata={"summary_keys": sorted(manifest.get("summary", {}))})
    key, acc = found
    hint = ("" if acc >= min_accuracy else
            "; PPO would optimise noise: more pairs, or a larger or pretrained base_model (a small model "
            "built from scratch separates real dialogue data such as HH-RLHF barely better than chance)")
    return dg.AssetCheckResult(
        passed=acc >= min_accuracy,
        description=f"held-out accuracy {acc:.3f} (needs >= {min_accuracy}){hint}",
        metadata={"metric": key, "accuracy": acc, "min_accuracy": min_accuracy},
    )


@dg.asset_check(asset=reward_model, blocking=True,
                description="Reward-model pairwise accuracy on held-out pairs reaches the threshold.")
def reward_model_accuracy(config: RewardAccuracyCheckConfig, reward_model: dict) -> dg.AssetCheckResult:
    return reward_accuracy_result(reward_model, config.min_accuracy)


class PPOKLCheckConfig(dg.Config):
    max_kl: float = Field(
        default=25.0,
        description="Bound on the final per-sequence KL to the reference (nats); beyond it the policy has "
        "drifted far enough that reward-model over-optimisation is likely (Gao et al. 2022).",
    )


def ppo_kl_result(manifest: dict, max_kl: float) -> dg.AssetCheckResult:
    found = first_metric(manifest.get("summary", {}), PPO_KL_KEYS)
    if found is None:
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.WARN,
            description=f"ppo_policy summary has none of {PPO_KL_KEYS}",
            metadata={"summary_keys": sorted(manifest.get("summary", {}))})
    key, kl = found
    return dg.AssetCheckResult(
        passed=kl <= max_kl, severity=dg.AssetCheckSeverity.WARN,
        description=f"KL to the reference ({key}) {kl:.3f} nats per response (bound {max_kl})",
        metadata={"metric": key, "kl": kl, "max_kl": max_kl},
    )


@dg.asset_check(asset=ppo_policy, description="PPO's KL to the SFT reference stays within a bound (warns).")
def ppo_kl_within_bound(config: PPOKLCheckConfig, ppo_policy: dict) -> dg.AssetCheckResult:
    return ppo_kl_result(ppo_policy, config.max_kl)


class HeldoutGainCheckConfig(dg.Config):
    min_gain: float = Field(
        default=0.0, description="Held-out reward gain over SFT (in the held-out model's standard deviations "
        "on SFT samples) the kept checkpoint must exceed; a negative value lets any run pass (smoke tests).")


def heldout_gain_result(manifest: dict, min_gain: float = 0.0) -> dg.AssetCheckResult:
    """Pass when the kept checkpoint beats the SFT policy on the held-out reward model."""
    summary = manifest.get("summary", {})
    if "guard/improved" not in summary:
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN,
            description="no over-optimization guard ran (no held-out pairs): nothing to check",
            metadata={"guard": "off"})
    gain, se = float(summary["guard/heldout_gain"]), float(summary["guard/heldout_gain_se"])
    improved = min_gain < 0 or (bool(summary["guard/improved"]) and gain > min_gain)
    return dg.AssetCheckResult(
        passed=improved,
        description=(f"kept step {int(summary['guard/kept_step'])}: held-out reward {gain:+.3f} +- {se:.3f} "
                     f"(std units) over SFT at {summary['guard/kl_kept']:.2f} nats/response KL"
                     if improved else
                     "no PPO checkpoint scored above the SFT policy on the held-out reward model: "
                     "the policy is not registered"),
        metadata={"heldout_gain": gain, "heldout_gain_se": se, "kept_step": int(summary["guard/kept_step"]),
                  "kl_per_response_kept": float(summary["guard/kl_kept"])},
    )


@dg.asset_check(asset=ppo_policy, blocking=True,
                description="The kept PPO checkpoint beats SFT on the held-out reward model (gates registration).")
def ppo_beats_sft_heldout(config: HeldoutGainCheckConfig, ppo_policy: dict) -> dg.AssetCheckResult:
    return heldout_gain_result(ppo_policy, config.min_gain)


MODEL_ASSETS = [base_model, sft_model, reward_model, heldout_reward_model, ppo_policy]
MODEL_CHECKS = [reward_model_accuracy, ppo_kl_within_bound, ppo_beats_sft_heldout]
