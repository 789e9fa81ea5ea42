"""Iterated RLHF rounds (group ``rounds``, one dynamic partition per round).

A round is step 4 of the InstructGPT recipe run again, as Llama 2's iterative rounds and
Anthropic's iterated online RLHF do it:

1. ``round_preferences``: new pairs on the current champion's own samples -- labelled files
   from the landing folder, or the simulated annotator (:mod:`assets.annotation`) when the
   task has a gold scorer -- validated, and joined with the base ``rm_train`` pairs and every
   earlier round's pairs;
2. ``round_reward_model``: the reward model refreshed on those cumulative pairs, warm-started
   from the latest reward model (the previous round's, else ``reward_model``), evaluated on the fixed RM eval split;
3. ``round_policy``: PPO from the champion, against the refreshed reward model. The frozen
   reference stays the SFT model (``reference: sft``): the KL penalty and the KL budget then
   measure the total drift from SFT across rounds, so rounds cannot walk away from it one
   small step at a time. ``reference: champion`` restarts the KL at every round instead;
   ``heldout_reward_model`` (never retrained, prompts disjoint) guards every round;
4. ``round_evaluation``: challenger and champion on the fixed evaluation set (the base
   ``test_prompts``, same sampling seed), scored by gold when there is a gold scorer, else by
   the refreshed reward model, with the KL to SFT of both;
5. ``round_champion``: the challenger is registered (alias ``challenger``) and the ``champion``
   alias moves only when it is strictly better on that paired evaluation
   (``ops.registry.decide_promotion``, the same rule as ``promote_champion_job``); the next
   annotation batch (the champion's samples, preference empty) is written for a labeller.

A round needs a finished lineage and a champion (``rlhf run``); the landing sensor, the weekly
schedule and ``rlhf rounds`` start rounds (``pipelines/automation.py``, ``pipelines/cli.py``).
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import dagster as dg
import pandas as pd
from pydantic import Field

from assets import annotation
from assets.evaluation import SamplingConfig
from assets.ingest import IngestError, content_hash, load_preferences
from assets.models import (TRAINING_POOL, PPOPolicyConfig, RewardModelConfig, reward_accuracy_result, reward_model_paths,
                           train_stage, with_min_response_length)
from assets.plots import png_markdown, rounds_plot
from assets.preflight import gold_scorer_error
from assets.schemas import validate_pairs
from ops.registry import REGISTRY_POOL
from ppo_core.lengths import MIN_RESPONSE_LENGTH, recorded_length
from ppo_core.models import implicit_reward_spec
from resources import settings
from resources.launcher import TrainingLauncher
from resources.mlflow_models import EVAL, TRAINING, log_datasets, model_metrics, split_inputs
from resources.notify import Notifier
from resources.tracking import MLflowResource

GROUP = "rounds"
ROUNDS = dg.DynamicPartitionsDefinition(name="rlhf_round")
ROUND_PREFIX = "round-"
REFERENCES = ("sft", "champion")


def round_key(index: int) -> str:
    return f"{ROUND_PREFIX}{index:04d}"


def next_round_key(existing: list[str]) -> str:
    """The key after the highest ``round-NNNN`` so far (other keys are ignored)."""
    numbers = [int(k.removeprefix(ROUND_PREFIX)) for k in existing
               if k.startswith(ROUND_PREFIX) and k.removeprefix(ROUND_PREFIX).isdigit()]
    return round_key(max(numbers, default=0) + 1)


def rounds_root() -> Path:
    return settings.rlhf_home() / "rounds"


def outbox_dir() -> Path:
    """Annotation batches waiting for a labeller (labelled copies go to the landing folder)."""
    return settings.rlhf_home() / "annotation" / "outbox"


# ---------------------------------------------------------------- registry side
def champion_version(client: Any, name: str) -> Any:
    from ops.registry import CHAMPION, alias_version

    try:
        version = alias_version(client, name, CHAMPION)
    except Exception as exc:  # MlflowException: the registered model does not exist
        raise dg.Failure(description=f"no registered model {name!r}: run the lineage first (`rlhf run`), "
                         "a round starts from its champion", allow_retries=False) from exc
    if version is None:
        raise dg.Failure(description=f"registered model {name!r} has no 'champion' alias: promote a version "
                         "first (`rlhf run` or promote_champion_job)", allow_retries=False)
    return version


def version_model_dir(client: Any, version: Any, dest: Path, tracking_uri: str) -> str:
    """A local save_pretrained directory of a registered version: the folder it was registered
    from when this machine has it, else the logged model downloaded from the tracking server."""
    local = version.tags.get("source_dir")
    if local and (Path(local) / "config.json").is_file():
        return local
    import mlflow

    from resources.mlflow_models import process_uris

    target = dest / f"{version.name}-v{version.version}"
    if not (target / "config.json").is_file():
        with process_uris(tracking_uri):
            loaded = mlflow.transformers.load_model(f"models:/{version.name}/{version.version}",
                                                    return_type="components")
        loaded["model"].save_pretrained(target, safe_serialization=True)
        loaded["tokenizer"].save_pretrained(target)
    return str(target)


def crown_sft_baseline(mlflow: MLflowResource, name: str, sft_manifest: dict) -> str:
    """Register the SFT model as ``name``'s first champion (tag ``rlhf.baseline=sft``).

    For a task where the lineage's PPO did not pass its gates: rounds then start from SFT, and
    their labels on its samples and on the refused challengers' are what can teach the reward
    model its blind spots. An operator's choice (``rlhf rounds --start-from-sft``), never implicit.
    """
    from assets.registry import register_version, registrable_model_uri
    from ops.registry import PromotionDecision, alias_version, apply_promotion

    from mlflow.exceptions import MlflowException

    client = mlflow.client()
    try:
        existing = alias_version(client, name, "champion")
    except MlflowException:  # no registered model yet
        existing = None
    if existing is not None:
        raise ValueError(f"registered model {name!r} already has a champion (v{existing.version})")
    sft_dir = str(sft_manifest["model_path"])
    run_id = sft_manifest.get("mlflow_run_id")
    if not sft_manifest.get("mlflow_model_id"):  # SFT logged no model: log it in a run of its own
        run_id = client.create_run(mlflow.experiment_id(), tags={"rlhf.baseline": "sft"},
                                   run_name="sft-baseline").info.run_id
    uri = registrable_model_uri(mlflow, str(run_id), sft_manifest.get("mlflow_model_id"), sft_dir, "policy",
                                "text-generation")
    if not sft_manifest.get("mlflow_model_id"):
        client.set_terminated(str(run_id), status="FINISHED")
    version = register_version(client, name, uri, run_id, {"source_dir": sft_dir, "rlhf.baseline": "sft"}, alias=None)
    decision = PromotionDecision(True, "SFT baseline: rounds start from the SFT policy (rlhf rounds --start-from-sft)",
                                 "none", str(version.version), None)
    apply_promotion(client, name, decision, None, version)
    return str(version.version)


# ---------------------------------------------------------------- earlier rounds
def earlier_partitions(context: dg.AssetExecutionContext) -> list[str]:
    """Round keys added before this one, oldest first."""
    keys = context.instance.get_dynamic_partitions(ROUNDS.name)
    here = context.partition_key
    return keys[: keys.index(here)] if here in keys else [k for k in keys if k < here]


def partition_metadata(context: dg.AssetExecutionContext, asset: str, partition: str) -> dict[str, Any] | None:
    """Metadata of the latest materialization of ``asset`` for ``partition`` (None if never)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1)
    if not records.records:
        return None
    mat = records.records[0].asset_materialization
    return {k: v.value for k, v in (mat.metadata or {}).items()} if mat else None


# ---------------------------------------------------------------- 1. preferences
class RoundPreferencesConfig(dg.Config):
    """Where this round's new preference pairs come from."""

    files: list[str] = Field(
        default_factory=list,
        description="Labelled files of this round (annotation batches with 'preference' filled, or any "
        "TRL / HH preference file); set by the landing sensor. Empty: the simulated annotator labels "
        "the champion's samples (needs a gold scorer).")
    n_prompts: int = Field(default=512, description="Training prompts the champion answers twice for the "
                           "simulated annotator (a new draw every round).")
    max_new_tokens: int = Field(default=0, description="Answer length cap of those samples; 0 = the one the "
                                "lineage's evaluation sampled with (PPO's response_length).")
    temperature: float = Field(default=1.0, description="Sampling temperature of those samples: 1.0, the "
                               "policy's own distribution, so the pairs differ (Llama 2 samples its "
                               "annotation pairs at varied temperatures).")
    annotator_temperature: float = Field(
        default=1.0, description="Bradley-Terry noise of the simulated annotator: P(a preferred) = "
        "sigmoid((gold_a - gold_b) / T); 0 = noiseless.")
    gold_scorer: str = Field(default="", description="'module:function'; '' = evaluation_report's (the bundled "
                             "task's on bundled data), 'none' = no gold scorer (then labelled files are required).")
    policy_name: str = Field(default_factory=settings.policy_name, description="Registered model whose champion "
                             "is sampled (default: RLHF_POLICY_NAME, else rlhf-policy).")
    max_quarantine_fraction: float = Field(default=0.5, description="Fail the round when more of the new "
                                           "rows than this were quarantined (unlabelled, invalid, ...).")
    seed: int = Field(default=0, description="Base seed; the round number is added, so rounds differ.")


def _round_index(key: str) -> int:
    tail = key.removeprefix(ROUND_PREFIX)
    return int(tail) if tail.isdigit() else int(hashlib.sha256(key.encode()).hexdigest()[:6], 16)


def sample_pairs(champion_dir: str, other_dir: str, prompts: list[str], max_new_tokens: int, temperature: float,
                 seed: int, batch_id: str) -> pd.DataFrame:
    """One answer of the champion and one of ``other_dir`` per prompt (two of the champion when
    they are the same policy), in random order."""
    from assets.evaluation import EvaluationConfig, generate

    cfg = EvaluationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if other_dir == champion_dir:
        both = generate(champion_dir, [p for p in prompts for _ in range(2)], cfg)["responses"]
        first, second = both[0::2], both[1::2]
    else:
        first = generate(champion_dir, prompts, cfg)["responses"]
        second = generate(other_dir, prompts, cfg)["responses"]
    return annotation.paired_batch(prompts, first, second, batch_id, seed)


def other_policy(context: dg.AssetExecutionContext, champion_dir: str) -> tuple[str, str]:
    """The policy the champion was last compared with: the previous round's challenger when it
    was refused, the champion it replaced when it won; the champion itself in the first round."""
    for key in reversed(earlier_partitions(context)):
        meta = partition_metadata(context, "round_champion", key)
        if meta is None:
            continue
        other = meta.get("other_policy_dir")
        if other and Path(str(other)).is_dir() and str(other) != champion_dir:
            return str(other), f"{'refused challenger' if not meta.get('promoted') else 'previous champion'} of {key}"
        break
    return champion_dir, "the champion (two samples)"


def _simulated_pairs(config: RoundPreferencesConfig, champion_dir: str, other_dir: str, splits: dict,
                     scorer_spec: str, key: str, max_new_tokens: int) -> tuple[pd.DataFrame, Path]:
    from assets.evaluation import load_gold_scorer

    seed = config.seed + _round_index(key)
    prompts = annotation.pick_prompts(pd.read_parquet(Path(splits["split_dir"]) / "ppo_train.parquet")["prompt"],
                                      config.n_prompts, seed)
    batch = sample_pairs(champion_dir, other_dir, prompts, max_new_tokens, config.temperature, seed,
                         f"{key}-simulated")
    labelled = annotation.simulate_labels(batch, load_gold_scorer(scorer_spec), config.annotator_temperature, seed)
    out = rounds_root() / key / "annotation_simulated.jsonl"
    out.unlink(missing_ok=True)  # a retried round relabels the same samples (same seed)
    annotation.write_batch(labelled, out)
    return labelled, out


@dg.asset(
    group_name=GROUP, partitions_def=ROUNDS, kinds={"parquet"}, code_version="1",
    description="This round's preference pairs (landed labelled files, or the simulated annotator on the "
    "champion's samples), validated, joined with the base rm_train pairs and every earlier round's pairs.",
)
def round_preferences(context: dg.AssetExecutionContext, config: RoundPreferencesConfig, mlflow: MLflowResource,
                      raw_preferences: dict, dataset_splits: dict, evaluation_report: dict) -> dg.MaterializeResult:
    from assets.evaluation import resolve_gold_scorer

    key = context.partition_key
    out = rounds_root() / key
    out.mkdir(parents=True, exist_ok=True)
    client = mlflow.client()
    champion = champion_version(client, config.policy_name)
    champion_dir = version_model_dir(client, champion, rounds_root() / "champions", mlflow.tracking_uri)
    # the lineage's yardstick unless the round names its own: rounds and lineage compare alike
    scorer = resolve_gold_scorer(config.gold_scorer, raw_preferences.get("source"))
    if scorer is None and not config.gold_scorer.strip():
        scorer = evaluation_report.get("gold_scorer")
    # round_evaluation scores with it after both round models trained, labelled files or not;
    # a sensor's run may start elsewhere than the lineage whose evaluation named it
    error = scorer and gold_scorer_error(
        "round_preferences.gold_scorer" if config.gold_scorer.strip() else "evaluation_report's gold scorer", scorer)
    if error:
        raise dg.Failure(description=f"{error}; nothing of this round was trained", allow_retries=False)
    if config.files:
        try:
            raw = pd.concat([load_preferences(f, "auto").frame for f in config.files], ignore_index=True)
        except IngestError as exc:
            raise dg.Failure(description=f"round_preferences: {exc}", allow_retries=False) from exc
        origin = f"files: {', '.join(Path(f).name for f in config.files)}"
    elif scorer:
        other_dir, other = other_policy(context, champion_dir)
        context.log.info(f"simulated annotator: champion v{champion.version} against {other}")
        length = config.max_new_tokens or recorded_length(evaluation_report, "max_new_tokens")
        labelled, batch_path = _simulated_pairs(config, champion_dir, other_dir, dataset_splits, scorer, key, length)
        raw = load_preferences(str(batch_path), "labels").frame
        origin = (f"simulated annotator (T={config.annotator_temperature}) on champion v{champion.version} "
                  f"against {other}")
    else:
        raise dg.Failure(description="round_preferences: no labelled files for this round and no gold scorer for "
                         "a simulated annotator; label an annotation batch (outbox) and drop it in the landing "
                         "folder", allow_retries=False)
    checked = validate_pairs(raw)
    n_new, n_bad = len(checked.valid), len(checked.quarantined)
    if len(raw) and n_bad / len(raw) > config.max_quarantine_fraction:
        raise dg.Failure(description=f"round_preferences: {n_bad} of {len(raw)} new rows quarantined "
                         f"({checked.reason_counts}); more than {config.max_quarantine_fraction:.0%}",
                         allow_retries=False)
    new = checked.valid[["prompt", "chosen", "rejected"]].assign(round=key)
    new.to_parquet(out / "new_pairs.parquet", index=False)
    checked.quarantined.to_parquet(out / "quarantined_pairs.parquet", index=False)
    base = pd.read_parquet(Path(dataset_splits["split_dir"]) / "rm_train.parquet")[["prompt", "chosen", "rejected"]]
    earlier = [rounds_root() / k / "new_pairs.parquet" for k in earlier_partitions(context)]
    earlier = [p for p in earlier if p.is_file()]
    cumulative = pd.concat([base.assign(round="base"), *[pd.read_parquet(p) for p in earlier], new],
                           ignore_index=True)
    cumulative[["prompt", "chosen", "rejected"]].to_parquet(out / "rm_train.parquet", index=False)
    # the fixed RM eval split of the base lineage: agreement stays comparable across rounds
    (out / "rm_eval.parquet").write_bytes((Path(dataset_splits["split_dir"]) / "rm_eval.parquet").read_bytes())
    version = content_hash(cumulative, {"base": dataset_splits["data_version"]})
    # rows read == new + quarantined: nothing of the labelled batch is dropped silently
    counts = {"rows_read": len(raw), "new": n_new, "quarantined": n_bad, "earlier_rounds": len(earlier),
              "cumulative": len(cumulative), "base": len(base)}
    context.log.info(f"{key}: {n_new} new pairs ({origin}), {n_bad} quarantined, {len(cumulative)} cumulative")
    manifest = {"split_dir": str(out), "data_version": version, "counts": counts, "origin": origin,
                "champion_version": str(champion.version), "champion_dir": champion_dir,
                "gold_scorer": scorer, "reason_counts": checked.reason_counts,
                "eval_data_version": dataset_splits["data_version"]}
    return dg.MaterializeResult(value=manifest, data_version=dg.DataVersion(version), metadata={
        **{f"n_{k}": v for k, v in counts.items()}, "origin": origin,
        "champion_version": str(champion.version), "data_version": version,
        "new_pairs": dg.MetadataValue.path(str(out / "new_pairs.parquet")),
        "reason_counts": dg.MetadataValue.json(checked.reason_counts)})


# ---------------------------------------------------------------- 2. reward model
class RoundRewardModelConfig(RewardModelConfig):
    """round_reward_model: ``ppo_core.reward.RewardConfig`` on the cumulative pairs."""

    init: str = Field(default="previous", description="'previous': warm start from the latest reward model "
                      "(the previous round's, else reward_model); 'sft': "
                      "from the SFT model, the full recipe (slower).")
    min_accuracy: float = Field(default=0.6, description="Gate: pairwise accuracy on the RM eval split the "
                                "refreshed model must reach (chance is 0.5).")
    epochs: float = Field(default=1.0, description="Epochs over the cumulative pairs; the last weights are "
                          "shipped, as reward_model does; 0: the engine's 4 (1 after a pretrained base model). "
                          "One epoch, as InstructGPT and OpenRLHF train reward models, suffices for a warm start; "
                          "with the engine's 4 it took 117 of a round's 208 s on the embedded default (README, "
                          "rounds).")


def _latest_reward_model(context: dg.AssetExecutionContext, base: dict) -> tuple[str, str]:
    for key in reversed(earlier_partitions(context)):
        meta = partition_metadata(context, "round_reward_model", key)
        path = (meta or {}).get("model_path")
        if path and Path(str(path)).is_dir():
            return str(path), f"round_reward_model[{key}]"
    return str(base["model_path"]), "reward_model"


# Checks of partitioned assets run inside the asset (check_specs): a separate @asset_check is
# not partitioned and cannot load one round's manifest.
@dg.asset(group_name=GROUP, partitions_def=ROUNDS, kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          code_version="5", description="The reward model refreshed on the cumulative pairs of this round.",
          check_specs=[dg.AssetCheckSpec("round_reward_model_accuracy", asset="round_reward_model", blocking=True,
                                         description="The refreshed reward model keeps its accuracy on the fixed "
                                         "RM eval split (blocks PPO on a broken reward model).")])
def round_reward_model(context: dg.AssetExecutionContext, config: RoundRewardModelConfig, mlflow: MLflowResource,
                       launcher: TrainingLauncher, round_preferences: dict, sft_model: dict,
                       reward_model: dict) -> Iterator[dg.Output | dg.AssetCheckResult]:
    if config.init not in ("previous", "sft"):
        raise dg.Failure(description=f"round_reward_model: init {config.init!r}: expected 'previous' or 'sft'",
                         allow_retries=False)
    init, init_from = ((str(sft_model["model_path"]), "sft_model") if config.init == "sft"
                       else _latest_reward_model(context, reward_model))
    if config.init == "previous" and config.kind is None:
        # a warm start continues the model it starts from: the kind comes with it
        config = config.model_copy(update={"kind": "implicit" if implicit_reward_spec(init) is not None
                                           else "scalar"})
    context.log.info(f"round reward model from {init_from} (kind {config.kind or 'the default'})")
    result = train_stage(context, asset="round_reward_model", stage="reward", cfg=config, mlflow=mlflow,
                         launcher=launcher, data_version=round_preferences["data_version"],
                         paths={"model_name_or_path": init, "data_dir": round_preferences["split_dir"]},
                         datasets=split_inputs(round_preferences, {"rm_train": TRAINING, "rm_eval": EVAL}),
                         start=sft_model)
    result.value["init_from"] = init_from
    check = reward_accuracy_result(result.value, config.min_accuracy)
    # Output + check result (not MaterializeResult): an asset with check_specs has several outputs
    # the shipped weights' content version, as every training asset's: a retrained model is new
    yield dg.Output(result.value, metadata={**(result.metadata or {}), "init_from": init_from},
                    data_version=result.data_version)
    yield dg.AssetCheckResult(check_name="round_reward_model_accuracy", passed=check.passed,
                              description=check.description, metadata=check.metadata)


# ---------------------------------------------------------------- 3. policy
class RoundPolicyConfig(PPOPolicyConfig):
    """round_policy: ``ppo_core.ppo.PPOConfig`` from the champion."""

    reference: str = Field(default="sft", description="Frozen KL reference: 'sft' (the KL and its budget count "
                           "the whole drift from SFT across rounds) or 'champion' (KL restarts each round).")
    guard_select_z: Optional[float] = Field(
        default=0.0, description="The guard keeps the best-scoring checkpoint (0), not the least-KL one within "
        "this many standard errors of it: a round's gain over the champion is small next to the held-out "
        "score's standard error, so the one-standard-error rule kept the round's first checkpoint and lost "
        "0.06 +- 0.03 win rate over the champion on six recorded rounds (BENCHMARKS.md, guard; measured with "
        "the unpaired standard errors the guard used before, which overstated the noise).")
    kl_ceiling_headroom: Optional[float] = Field(
        default=2.0, description="Nats per response a round may add to the champion's own KL to SFT: the "
        "KL ceiling becomes at least the champion's KL (the guard's step-0 measurement) plus this. The "
        "champion left the lineage near the 5-nat ceiling, so without it a round could only be pulled "
        "back towards SFT (two rounds on the embedded default lost to the champion, 0.43 and 0.49 gold "
        "win rate; README, rounds). None: the fixed ceiling.")


@dg.asset(group_name=GROUP, partitions_def=ROUNDS, kinds={"pytorch", "mlflow"}, pool=TRAINING_POOL,
          code_version="7", description="PPO from the current champion against the refreshed reward model; "
          "heldout_reward_model guards it.")
def round_policy(context: dg.AssetExecutionContext, config: RoundPolicyConfig, mlflow: MLflowResource,
                 launcher: TrainingLauncher, dataset_splits: dict, round_preferences: dict, round_reward_model: dict,
                 sft_model: dict, heldout_reward_model: dict) -> dg.MaterializeResult:
    if config.reference not in REFERENCES:
        raise dg.Failure(description=f"round_policy: reference {config.reference!r}: expected one of {REFERENCES}",
                         allow_retries=False)
    champion_dir = round_preferences["champion_dir"]
    ref = sft_model["model_path"] if config.reference == "sft" else champion_dir
    guard = heldout_reward_model.get("model_path")
    split = Path(dataset_splits["split_dir"])
    return train_stage(
        context, asset="round_policy", stage="ppo", cfg=config, mlflow=mlflow, launcher=launcher,
        data_version=round_preferences["data_version"],
        paths={"policy_path": champion_dir, "ref_model_path": ref,
               "reward_model_path": reward_model_paths(round_reward_model),
               **({"guard_reward_model_path": guard} if guard else {}),
               "train_file": str(split / "ppo_train.parquet"), "eval_file": str(split / "ppo_eval.parquet")},
        datasets=split_inputs(dataset_splits, {"ppo_train": TRAINING, "ppo_eval": EVAL}),
        start=with_min_response_length(sft_model, dataset_splits))


# ---------------------------------------------------------------- 4. evaluation
class RoundEvaluationConfig(SamplingConfig):
    """The fixed evaluation set: evaluation_report's sampling settings, so scores compare with the
    champion's registered ones."""


def round_metrics(report: dict[str, Any], kl_champion: float) -> dict[str, float | None]:
    """``evaluate``'s sft/ppo names -> champion/challenger, plus the KL of both to SFT."""
    m = report["metrics"]
    out: dict[str, float | None] = {}
    for k, v in m.items():
        name = k.replace("sft/", "champion/", 1) if k.startswith("sft/") else k.replace("ppo/", "challenger/", 1)
        out[name.replace("kl_to_ref", "kl_to_champion")] = v
    out["champion/kl_to_sft_per_response"] = kl_champion
    return out


@dg.asset(group_name=GROUP, partitions_def=ROUNDS, kinds={"pytorch", "mlflow"}, code_version="3",
          description="Challenger against champion on the fixed evaluation set: gold (when given) and reward-model "
          "scores, win rate, KL to SFT, and the refreshed reward model's agreement with gold.")
def round_evaluation(context: dg.AssetExecutionContext, config: RoundEvaluationConfig, mlflow: MLflowResource,
                     raw_preferences: dict, dataset_splits: dict, round_preferences: dict, round_policy: dict,
                     round_reward_model: dict, sft_model: dict, heldout_reward_model: dict) -> dg.MaterializeResult:
    from assets.evaluation import (EvaluationConfig, evaluate, json_safe, kl_per_response, response_length,
                                   sampling_key, sequence_logprobs)

    key = context.partition_key
    out = settings.models_root() / "round_evaluation" / key / context.run.run_id
    sampling = {**config.model_dump(), "max_new_tokens": response_length(config.max_new_tokens, round_policy)}
    cfg = EvaluationConfig(**sampling, gold_scorer=round_preferences.get("gold_scorer") or "none")
    champion_dir, challenger_dir = round_preferences["champion_dir"], round_policy["model_path"]
    sft_dir, rm_dir = sft_model["model_path"], reward_model_paths(round_reward_model)
    with mlflow.run(context, "round_evaluation", {"data_version": dataset_splits["data_version"], "rlhf.round": key}) as run:
        # champion as the baseline ("sft" side of evaluate): win rates are challenger vs champion
        result = evaluate(dataset_splits, champion_dir, challenger_dir, rm_dir, cfg, out,
                          data_source=raw_preferences.get("source"), log=context.log.info,
                          heldout_rm_dir=heldout_reward_model.get("model_path") or None,
                          rm_stats=round_policy.get("reward_ensemble"))
        # KL to SFT of both policies, each on its own samples (per response, as users read it)
        prompts = result["samples"]["prompt"].astype(str).tolist()
        kls = {}
        for who, side, policy_dir in (("challenger", "ppo", challenger_dir), ("champion", "sft", champion_dir)):
            ids = result["ids"][side]
            kls[who] = kl_per_response(sequence_logprobs(policy_dir, prompts, ids, cfg.batch_size),
                                       sequence_logprobs(sft_dir, prompts, ids, cfg.batch_size))
        metrics = round_metrics(result["report"], kls["champion"])
        metrics["challenger/kl_to_sft_per_response"] = kls["challenger"]
        metrics = json_safe({k: v for k, v in metrics.items() if v is not None})
        test_set = split_inputs(dataset_splits, {"test_prompts": EVAL, "test_pairs": EVAL})
        log_datasets(mlflow.client(), run.info.run_id, test_set)
        logged = {k: v for k, v in metrics.items() if v is not None}
        model_id = round_policy.get("mlflow_model_id")
        if model_id:  # on the challenger's model page too, measured on the fixed test prompts
            mlflow.client().log_batch(run.info.run_id, metrics=model_metrics(logged, str(model_id), test_set[0]))
        else:
            mlflow.log_metrics(run.info.run_id, logged)
        mlflow.log_artifacts(run.info.run_id, out, "evaluation")
        url = mlflow.run_url(run)
    report = {"metrics": metrics, "data_version": dataset_splits["data_version"],
              "gold_scorer": result["report"]["gold_scorer"], "mlflow_run_id": run.info.run_id,
              "heldout_reward_model_version": result["report"]["heldout_reward_model_version"],
              "max_new_tokens": cfg.max_new_tokens, "sampling": sampling_key(cfg),
              "challenger_model_path": challenger_dir, "champion_model_path": champion_dir,
              "challenger_model_id": round_policy.get("mlflow_model_id"),
              "champion_version": round_preferences["champion_version"], "report_path": str(out / "report.json")}
    shown = ("challenger/gold_mean", "champion/gold_mean", "win_rate_gold", "win_rate_gold_se",
             "challenger/heldout_score_mean", "champion/heldout_score_mean", "win_rate_heldout",
             "win_rate_heldout_se", "challenger/rm_score_mean",
             "champion/rm_score_mean", "win_rate_rm", "rm/gold_agreement", "rm/pair_accuracy",
             "challenger/kl_to_sft_per_response", "champion/kl_to_sft_per_response")
    return dg.MaterializeResult(value=report, metadata={
        **{k: metrics[k] for k in shown if metrics.get(k) is not None},
        "mlflow_run": dg.MetadataValue.url(url), "champion_version": round_preferences["champion_version"]})


# ---------------------------------------------------------------- 5. promotion
class RoundChampionConfig(dg.Config):
    """Registration and the promotion gate of a round."""

    policy_name: str = Field(default_factory=settings.policy_name, description="Registered model of the policy "
                             "(default: RLHF_POLICY_NAME, else rlhf-policy).")
    reward_model_name: str = Field(default_factory=settings.reward_model_name, description="Registered model of the "
                                   "reward model (default: RLHF_REWARD_MODEL_NAME, else rlhf-reward-model).")
    min_improvement: float = Field(default=0.0, description="The challenger's promotion metric must exceed the "
                                   "champion's by more than this (0: strictly better, as promote_champion_job).")
    n_annotation_prompts: int = Field(default=256, description="Prompts of the next annotation batch written to "
                                      "the outbox for a human labeller (0: none).")
    seed: int = Field(default=0, description="Seed of the annotation batch's prompt draw and sampling.")


def paired_tags(report: dict[str, Any], side: str) -> dict[str, str]:
    """Registry version tags of one side (``challenger``/``champion``) of a round's evaluation,
    under the lineage's metric names (``ppo/gold_mean`` ...) so promotion compares like with like."""
    from assets.registry import evaluation_tags

    metrics = {k.replace(f"{side}/", "ppo/", 1): v for k, v in report["metrics"].items() if k.startswith(f"{side}/")}
    metrics["n_prompts"] = report["metrics"].get("n_prompts")
    return evaluation_tags({"metrics": metrics, "data_version": report["data_version"],
                            "gold_scorer": report.get("gold_scorer"), "sampling": report.get("sampling"),
                            "heldout_reward_model_version": report.get("heldout_reward_model_version")})


def round_decision(challenger: Any, champion: Any, report: dict[str, Any], min_improvement: float) -> Any:
    """The promotion rule of ``ops.registry`` on the paired scores of this round's evaluation."""
    from ops.registry import PromotionDecision, decide_promotion, version_metric

    champion_now = SimpleNamespace(name=champion.name, version=champion.version,
                                   tags={**champion.tags, **paired_tags(report, "champion")})
    decision = decide_promotion(challenger, champion_now)
    if decision.promoted and min_improvement > 0:
        gain = version_metric(challenger, decision.metric) - version_metric(champion_now, decision.metric)
        if gain <= min_improvement:
            return PromotionDecision(False, f"gain {gain:+.4f} on {decision.metric} is not above min_improvement "
                                     f"{min_improvement}", decision.metric, decision.challenger_version,
                                     decision.champion_version, decision.challenger_score, decision.champion_score)
    return decision


def _rounds_table(context: dg.AssetExecutionContext, current: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per round so far (from the materialization metadata), this one last."""
    rows = []
    for key in [*earlier_partitions(context), context.partition_key]:
        meta = current if key == context.partition_key else partition_metadata(context, "round_champion", key)
        if meta:
            rows.append({"round": key, **{k: meta.get(k) for k in ROUND_COLUMNS}})
    return rows


ROUND_COLUMNS = ("champion_gold", "challenger_gold", "rm_gold_agreement", "challenger_kl_to_sft",
                 "champion_score", "challenger_score", "promoted", "champion_version_after")


def _table_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v)
    head = ["round", *ROUND_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in head) + " |" for r in rows]
    return "\n".join(lines)


@dg.asset(group_name=GROUP, partitions_def=ROUNDS, kinds={"mlflow"}, code_version="3", pool=REGISTRY_POOL,
          description="Registers the round's challenger and reward model, then moves 'champion' only when the "
          "challenger beats the champion on the paired evaluation; writes the next annotation batch.",
          check_specs=[dg.AssetCheckSpec("round_challenger_promoted", asset="round_champion",
                                         description="The round's challenger beat the champion and was promoted "
                                         "(warns when the gate refused it; the champion stays).")])
def round_champion(context: dg.AssetExecutionContext, config: RoundChampionConfig, mlflow: MLflowResource,
                   notifier: Notifier, round_evaluation: dict, round_reward_model: dict,
                   dataset_splits: dict) -> Iterator[dg.Output | dg.AssetCheckResult]:
    from assets.registry import (register_reward_models, register_version, registered_with,
                                 registrable_model_uri, reward_lineage)
    from ops.registry import apply_promotion

    key = context.partition_key
    client = mlflow.client()
    evaluation_id = str(round_evaluation["mlflow_run_id"])
    # an earlier attempt at this step may have registered (and promoted) already: a retry
    # picks its versions up instead of registering twice or refusing its own promotion
    same = {"rlhf.round": key, "evaluation.mlflow_run_id": evaluation_id}
    earlier = registered_with(client, config.policy_name, same)
    champion = champion_version(client, config.policy_name)
    evaluated = str(round_evaluation["champion_version"])
    promoted_before = earlier is not None and str(champion.version) == str(earlier.version)
    if str(champion.version) != evaluated:
        if not promoted_before:
            raise dg.Failure(description=f"{key}: the champion moved to v{champion.version} during the round "
                             f"(evaluated against v{evaluated}); start a new round", allow_retries=False)
        champion = client.get_model_version(config.policy_name, evaluated)  # the champion it was judged against
    tags = paired_tags(round_evaluation, "challenger")
    lineage = {"dagster.run_id": context.run.run_id, "rlhf.round": key, "parent_champion": str(champion.version),
               "evaluation.mlflow_run_id": evaluation_id}
    with mlflow.run(context, "round_champion", {"data_version": round_evaluation["data_version"], "rlhf.round": key}) as run:
        run_id = run.info.run_id
        # the LoggedModels of the training runs (logged here only when a stage skipped logging)
        rm_versions = register_reward_models(client, mlflow, config.reward_model_name, run_id,
                                             round_reward_model, same, lineage)
        challenger = earlier
        if challenger is None:
            uri = registrable_model_uri(mlflow, run_id, round_evaluation.get("challenger_model_id"),
                                        round_evaluation["challenger_model_path"], "policy", "text-generation")
            challenger = register_version(client, config.policy_name, uri, run_id, {
                **tags, **lineage, "source_dir": round_evaluation["challenger_model_path"],
                **reward_lineage(rm_versions)})
        decision = round_decision(challenger, champion, round_evaluation, config.min_improvement)
        if not promoted_before:
            apply_promotion(client, config.policy_name, decision, champion, challenger)
        m = round_evaluation["metrics"]
        row = {"champion_gold": m.get("champion/gold_mean"), "challenger_gold": m.get("challenger/gold_mean"),
               "rm_gold_agreement": m.get("rm/gold_agreement"),
               "challenger_kl_to_sft": m.get("challenger/kl_to_sft_per_response"),
               "champion_score": decision.champion_score, "challenger_score": decision.challenger_score,
               "promoted": bool(decision.promoted),
               "champion_version_after": str(challenger.version if decision.promoted else champion.version)}
        rows = _rounds_table(context, row)
        (rounds_root() / key).mkdir(parents=True, exist_ok=True)
        png = rounds_plot(rows, rounds_root() / key / "rounds.png")
        if png is not None:
            mlflow.log_artifact(run_id, png, "plots")
        mlflow.log_metrics(run_id, {k: float(v) for k, v in row.items() if isinstance(v, (int, float))})
        url = mlflow.run_url(run)
    verdict = "promoted" if decision.promoted else "refused"
    context.log.info(f"{key}: challenger v{challenger.version} {verdict}: {decision.reason}")
    if not decision.promoted:
        notifier.notify("promotion_refused", f"{key}: challenger v{challenger.version} of {config.policy_name} "
                        f"not promoted: {decision.reason}", {"round": key, **decision.to_dict()})
    # the policy the champion was just compared with: next round's pairs put the two side by side
    other_dir = (round_evaluation["champion_model_path"] if decision.promoted
                 else round_evaluation["challenger_model_path"])
    batch = _next_batch(context, config, client, dataset_splits, mlflow.tracking_uri, other_dir,
                        recorded_length(round_evaluation, "max_new_tokens"))
    metadata: dict[str, Any] = {**{k: v for k, v in row.items() if v is not None}, "decision": decision.reason,
                                "other_policy_dir": dg.MetadataValue.path(other_dir),
                                "challenger_version": str(challenger.version), "metric": decision.metric,
                                "rounds": dg.MetadataValue.md(_table_markdown(rows)),
                                "mlflow_run": dg.MetadataValue.url(url)}
    if png is not None:
        metadata["plot_rounds"] = dg.MetadataValue.md(png_markdown(png, "rounds"))
    if batch is not None:
        metadata["annotation_batch"] = dg.MetadataValue.path(str(batch))
    value = {"decision": decision.to_dict(), "challenger_version": str(challenger.version),
             "reward_model_version": str(rm_versions[0].version), "row": row,
             **({"reward_model_versions": [str(v.version) for v in rm_versions]} if len(rm_versions) > 1 else {}),
             "annotation_batch": str(batch) if batch else None}
    check = dg.AssetCheckResult(check_name="round_challenger_promoted", passed=bool(decision.promoted),
                                severity=dg.AssetCheckSeverity.WARN, description=decision.reason,
                                metadata={k: v for k, v in decision.to_dict().items() if v is not None})
    yield dg.Output(value, metadata=metadata)
    yield check


def export_batch(client: Any, tracking_uri: str, policy_name: str, split_dir: str, n_prompts: int,
                 seed: int, tag: str, other_dir: str | None = None, max_new_tokens: int = MIN_RESPONSE_LENGTH) -> Path:
    """A batch for a labeller: the champion's answer and ``other_dir``'s (another champion
    answer when None) to ``n_prompts`` training prompts, ``preference`` empty, in
    ``outbox_dir()/<tag>-v<champion>.jsonl``."""
    champion = champion_version(client, policy_name)
    model_dir = version_model_dir(client, champion, rounds_root() / "champions", tracking_uri)
    prompts = annotation.pick_prompts(pd.read_parquet(Path(split_dir) / "ppo_train.parquet")["prompt"], n_prompts, seed)
    name = f"{tag}-v{champion.version}"
    # temperature 1: the policies' own distributions, so two answers of one policy differ
    frame = sample_pairs(model_dir, other_dir or model_dir, prompts, max_new_tokens, 1.0, seed, name)
    path = outbox_dir() / f"{name}.jsonl"
    path.unlink(missing_ok=True)  # the same tag and champion write the same batch again
    return annotation.write_batch(frame, path)


def _next_batch(context: dg.AssetExecutionContext, config: RoundChampionConfig, client: Any,
                splits: dict, tracking_uri: str, other_dir: str, max_new_tokens: int) -> Path | None:
    """The next round's batch for a human labeller: the champion against ``other_dir``."""
    if config.n_annotation_prompts <= 0:
        return None
    return export_batch(client, tracking_uri, config.policy_name, splits["split_dir"], config.n_annotation_prompts,
                        config.seed + 7919 * _round_index(context.partition_key), f"after-{context.partition_key}",
                        other_dir, max_new_tokens)


ROUND_ASSETS = [round_preferences, round_reward_model, round_policy, round_evaluation, round_champion]
ROUND_CHECKS: list = []  # in the assets' check_specs
