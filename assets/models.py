"""Model assets: ``base_model`` -> ``sft_model`` -> ``reward_model`` -> ``ppo_policy``, and their checks.

The training assets are thin: map the operator's ``dg.Config`` onto the ppo_core config
dataclass (``core_config``, the one place that mapping lives), write it to a JSON file, open
one MLflow run, launch the stage out of process through ``TrainingLauncher`` (torchrun +
Dagster Pipes), then log plots and the model to MLflow and return a JSON manifest
(``model_path`` = the ``save_pretrained`` directory) with metadata for the Dagster UI.

Every output goes to ``settings.models_root()/<asset>/<dagster run id>/``, so no
materialization overwrites another. All three training assets share the ``training``
concurrency pool: with a pool limit of 1 only one training step runs at a time on a machine.
"""


import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.plots import png_markdown, training_plots
from pipelines import settings
from pipelines.resources import MLflowResource, TrainingLauncher

TRAINING_POOL = "training"
STAGE_CONFIG_CLASSES = {"sft": ("ppo_core.sft", "SFTConfig"),
                        "reward": ("ppo_core.reward", "RewardConfig"),
                        "ppo": ("ppo_core.ppo", "PPOConfig")}
BUILT_SIZES = ("auto", "tiny", "small")


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
    arch: str = Field(default="llama", description="Architecture of a model built from scratch: 'llama' "
                      "(rotary positions) or 'gpt2' (learned positions).")
    n_layer: int = Field(default=0, description="Layers of a model built from scratch; 0 = chosen for the data.")
    n_embd: int = Field(default=0, description="Width of a model built from scratch; 0 = chosen for the data.")
    n_head: int = Field(default=0, description="Attention heads of a model built from scratch (must divide "
                        "n_embd); 0 = chosen for the data.")
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub repo; only for sources you trust."
    )


class StageConfig(dg.Config):
    """What an operator changes in a training stage; ``FIELD_MAP`` says where each field lands."""

    steps: int = Field(default=0, description="Training steps (max_steps / num_steps); 0 keeps the ppo_core default.")
    learning_rate: float = Field(default=0.0, description="Peak learning rate; 0 keeps the ppo_core default.")
    max_seconds: float = Field(
        default=0.0, description="Wall-clock budget of the training loop in seconds; when it runs out the "
        "stage keeps its best evaluated weights and ends. 0: no budget (epochs / early stopping decide).")
    seed: int = Field(default=0, description="Seed of data order, init and sampling.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other field of the ppo_core config dataclass, by name (checked against it).",
    )
    log_model_to_mlflow: bool = Field(
        default=True, description="Copy the final save_pretrained directory into the MLflow run."
    )


class SFTModelConfig(StageConfig):
    """sft_model: maps onto ``ppo_core.sft.SFTConfig``."""


class RewardModelConfig(StageConfig):
    """reward_model: maps onto ``ppo_core.reward.RewardConfig``."""


class PPOPolicyConfig(StageConfig):
    """ppo_policy: maps onto ``ppo_core.ppo.PPOConfig``."""


# ---------------------------------------------------------------- config mapping (the one place)
def core_config_class(stage: str) -> type:
    module, name = STAGE_CONFIG_CLASSES[stage]
    return getattr(importlib.import_module(module), name)


# Where each operator-facing field of ``StageConfig`` lands in each stage's ppo_core config.
# A dotted name is a field of a nested config (SFT keeps its seed in the DeepSpeed strategy).
FIELD_MAP: dict[str, dict[str, str]] = {
    "sft": {"steps": "max_steps", "learning_rate": "learning_rate", "seed": "strategy.seed",
            "max_seconds": "stopping.max_seconds"},
    "reward": {"steps": "max_steps", "learning_rate": "learning_rate", "seed": "strategy.seed",
               "max_seconds": "stopping.max_seconds"},
    "ppo": {"steps": "num_steps", "learning_rate": "learning_rate", "seed": "seed",
            "max_seconds": "max_seconds"},
}


def _nested_default(cls: type, name: str) -> dict[str, Any]:
    """The default of a nested dataclass field as a dict, so a partial override keeps the rest."""
    from ppo_core.config import to_dict

    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise ValueError(f"{cls.__name__} has no field {name!r}; fields: {[x.name for x in dataclasses.fields(cls)]}")
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    return to_dict(default) if dataclasses.is_dataclass(default) else {}


def _merge(cls: type, values: dict[str, Any], updates: dict[str, Any]) -> None:
    """Apply ``updates`` (dotted names or nested mappings) onto ``values`` in place."""
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest or isinstance(value, dict):
            nested = values.get(head) or _nested_default(cls, head)
            nested = {**nested, **({rest: value} if rest else value)}
            values[head] = nested
        else:
            values[key] = value


def core_config(stage: str, cfg: StageConfig, **paths: Any) -> Any:
    """The ppo_core config of ``stage`` from the asset config plus the paths the asset resolved.

    Zero ``steps`` / ``learning_rate`` keep the engine's default (its source is documented
    there). ``overrides`` set any other field (nested ones as mappings, e.g. ``strategy``);
    ppo_core's strict loader rejects an unknown name or a wrong type, naming the valid ones.
    """
    from ppo_core.config import from_dict

    cls = core_config_class(stage)
    mapping = FIELD_MAP[stage]
    values: dict[str, Any] = {}
    chosen = {"seed": cfg.seed, "steps": cfg.steps, "learning_rate": cfg.learning_rate,
              "max_seconds": cfg.max_seconds}
    # 0 for steps / learning_rate / max_seconds means "the engine's default"; the seed always applies.
    _merge(cls, values, {mapping[k]: v for k, v in chosen.items() if k == "seed" or v > 0})
    _merge(cls, values, dict(cfg.overrides))
    _merge(cls, values, paths)
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
) -> dg.MaterializeResult:
    """Configure, launch, log and describe one training stage (the body of every training asset)."""
    out = run_dir(asset, context)
    core = core_config(stage, cfg, output_dir=str(out), **paths)
    config_path = write_stage_config(core, out / "stage_config.json")
    metrics_file = out / "metrics.jsonl"
    with mlflow.run(context, asset, {"data_version": data_version, "stage": stage}) as run:
        run_id = run.info.run_id
        mlflow.log_params(run_id, dataclasses.asdict(core))
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
        if not model_path.is_dir():
            raise FileNotFoundError(f"{model_path}: the {stage} stage wrote no final save_pretrained directory")
        if cfg.log_model_to_mlflow:
            mlflow.log_artifacts(run_id, model_path, "model")
        url = mlflow.run_url(run)
    numbers = _numbers(summary)
    manifest = {
        "stage": stage, "model_path": str(model_path), "output_dir": str(out),
        "config_path": str(config_path), "metrics_file": str(metrics_file),
        "mlflow_run_id": run_id, "data_version": data_version, "summary": numbers,
        "plots": {k: str(v) for k, v in plots.items()},
    }
    metadata: dict[str, Any] = {
        **pipes_meta,
        "mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": run_id,
        "model_path": dg.MetadataValue.path(str(model_path)),
        "data_version": data_version,
        "summary": dg.MetadataValue.md(
            "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v:.4g} |" for k, v in numbers.items())),
        **kept,
    }
    for name, png in plots.items():
        metadata[f"plot_{name}"] = dg.MetadataValue.md(png_markdown(png, name))
    return dg.MaterializeResult(value=manifest, metadata=metadata)


def _kept_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    """Which step's weights the stage shipped and why it stopped (the UI's first question)."""
    out: dict[str, Any] = {}
    if "stopped_reason" in summary:
        out["stopped_reason"] = str(summary["stopped_reason"])
    kept = summary.get("kept_step", summary.get("best_step"))
    if isinstance(kept, (int, float)):
        out["kept_step"] = int(kept)
        out["trained_steps"] = int(summary.get("step", kept))
    if "best_metric_name" in summary:
        out["selected_on"] = f"{summary['best_metric_name']} on the eval split (best {summary['best_metric']:.4g})"
    elif "guard/kept_step" in summary:
        out["selected_on"] = ("held-out reward model score on held-out prompts "
                              f"(gain {summary['guard/heldout_gain']:+.3f} +- {summary['guard/heldout_gain_se']:.3f} "
                              f"over SFT, at {summary['guard/kl_kept']:.2f} nats/response KL)")
    return out


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


@dg.asset(group_name="models", kinds={"pytorch"},
          description="Tokenizer and starting weights: built tiny from the training texts, or a hub id / local path.")
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, dataset_splits: dict) -> dg.MaterializeResult:
    from ppo_core import models

    out = run_dir("base_model", context)
    source = config.source.strip()
    dims = {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head}
    if source in BUILT_SIZES:
        texts = _training_texts(dataset_splits)
        size: Any = dims if source == "auto" else source
        context.log.info(f"building a {source} model and tokenizer from {len(texts)} training texts")
        models.build_base_model(texts, str(out / "final"), size=size, arch=config.arch)
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
    manifest = {"model_path": str(out / "final"), "source": source,
                "data_version": _data_version(dataset_splits), "n_params": n_params, **arch}
    return dg.MaterializeResult(value=manifest, metadata={
        "model_path": dg.MetadataValue.path(str(out / "final")), "source": source, "n_params": n_params, **arch})


def _architecture(model_dir: Path) -> dict[str, Any]:
    """Depth, width and heads from config.json (names differ between architectures)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    pick = {"n_layer": ("num_hidden_layers", "n_layer", "num_layers"),
            "n_embd": ("hidden_size", "n_embd", "d_model"),
            "n_head": ("num_attention_heads", "n_head")}
    found = {k: next((cfg[n] for n in names if isinstance(cfg.get(n), int)), None) for k, names in pick.items()}
    return {"model_type": str(cfg.get("model_type", "")), **{k: v for k, v in found.items() if v is not None}}


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          description="Supervised fine-tuning of base_model on (prompt, chosen) pairs.")
def sft_model(context: dg.AssetExecutionContext, config: SFTModelConfig, mlflow: MLflowResource,
              launcher: TrainingLauncher, dataset_splits: dict, base_model: dict) -> dg.MaterializeResult:
    return train_stage(
        context, asset="sft_model", stage="sft", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": base_model["model_path"],
               "data_dir": _split_dir(dataset_splits, ("sft_train.parquet", "sft_eval.parquet"))},
    )


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          description="Bradley-Terry reward model on preference pairs, initialised from sft_model.")
def reward_model(context: dg.AssetExecutionContext, config: RewardModelConfig, mlflow: MLflowResource,
                 launcher: TrainingLauncher, dataset_splits: dict, sft_model: dict) -> dg.MaterializeResult:
    # InstructGPT (Ouyang et al. 2022, sec. 3.5) starts the reward model from the SFT model.
    return train_stage(
        context, asset="reward_model", stage="reward", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": sft_model["model_path"],
               "data_dir": _split_dir(dataset_splits, ("rm_train.parquet", "rm_eval.parquet"))},
    )


class HeldoutRewardModelConfig(StageConfig):
    """heldout_reward_model: maps onto ``ppo_core.reward.RewardConfig`` (``train_file`` = rm_heldout)."""


def _heldout_pairs(splits: dict) -> int:
    return int(splits.get("counts", {}).get("rm_heldout", 0))


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          description="Reward model on the held-out pairs (rm_heldout, prompts disjoint from reward_model's): "
          "the signal PPO's over-optimization guard selects checkpoints with; the policy never trains on it.")
def heldout_reward_model(context: dg.AssetExecutionContext, config: HeldoutRewardModelConfig,
                         mlflow: MLflowResource, launcher: TrainingLauncher, dataset_splits: dict,
                         sft_model: dict) -> dg.MaterializeResult:
    if _heldout_pairs(dataset_splits) == 0:
        context.log.warning("rm_heldout is empty (dataset_splits heldout_fraction 0): PPO runs without "
                            "its over-optimization guard and keeps its last step")
        return dg.MaterializeResult(value={"model_path": None, "summary": {}},
                                    metadata={"guard": "off: no held-out pairs"})
    return train_stage(
        context, asset="heldout_reward_model", stage="reward", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=_data_version(dataset_splits),
        paths={"model_name_or_path": sft_model["model_path"], "train_file": "rm_heldout.parquet",
               "data_dir": _split_dir(dataset_splits, ("rm_heldout.parquet", "rm_eval.parquet"))},
    )


@dg.asset(group_name="models", kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
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
               "reward_model_path": reward_model["model_path"],
               **({"guard_reward_model_path": guard} if guard else {}),
               "train_file": _split(dataset_splits, "ppo_train.parquet"),
               "eval_file": _split(dataset_splits, "ppo_eval.parquet")},
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
    return dg.AssetCheckResult(
        passed=acc >= min_accuracy,
        description=f"held-out accuracy {acc:.3f} (needs >= {min_accuracy})",
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
