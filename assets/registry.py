"""``registered_policy``: the PPO policy (and its reward model, or each member of a reward
ensemble) in the MLflow model registry.

The versions are registered from the LoggedModels the training runs logged (transformers
flavor, ``task="text-generation"`` for the policy), so a version's ``model_id`` and ``run_id``
lead to the PPO training run and the model page that carries the evaluation metrics; a stage
trained with ``log_model_to_mlflow: false`` has no LoggedModel, and then this asset logs the
weights into its own run first. ``mlflow.transformers.load_model("models:/rlhf-policy@champion")``
returns a pipeline that generates.

Each new version gets the evaluation metrics as tags (``metric.<name>``), the evaluation set it
was measured on (``eval.data_version``, ``eval.set``) and the ``challenger`` alias;
``ops/registry.py`` decides whether it becomes ``champion``.

Registration runs after ``evaluation_report`` and, in the same run, only when the blocking
``ppo_beats_sft`` check passed (Dagster skips downstream assets of a failed blocking check).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from ops.registry import (
    CHALLENGER,
    EVAL_SET_TAG,
    PROMOTION_METRIC_TAG,
    REGISTRY_POOL,
    metric_tag,
)
from resources import settings
from resources.mlflow_models import (
    link_version_to_model,
    log_transformers_model,
    logged_model_id,
    process_tracking_uri,
    version_model_id,
)
from resources.tracking import MLflowResource

EVAL_DATA_VERSION_TAG = "eval.data_version"
# Gold reward is the ground truth when the data has a gold scorer; otherwise the only score
# left is the reward model's (metric names from assets/evaluation.py).
GOLD_METRIC = "ppo/gold_mean"
# Without a gold scorer the held-out reward model decides: PPO never optimised it, so a policy
# that games the reward model does not win on it (the reward model's own score would prefer it).
HELDOUT_METRIC = "ppo/heldout_score_mean"
RM_METRIC = "ppo/rm_score_mean"
PROMOTION_METRICS = (GOLD_METRIC, HELDOUT_METRIC, RM_METRIC)
# Bumped by hand when a change here changes what is registered (see assets/data.py).
REGISTERED_POLICY_VERSION = "3"


def registered_with(client: Any, name: str, tags: Mapping[str, str]) -> Any | None:
    """The newest version of ``name`` carrying all of ``tags``, or None (also when ``name`` is not
    registered yet): how a retried or re-run registration finds what an earlier attempt
    registered from the same evaluation, instead of registering the same weights twice."""
    from mlflow.exceptions import MlflowException

    query = " and ".join([f"name='{name}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    try:
        found = client.search_model_versions(query)
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register_version(
    client: Any,
    name: str,
    model_uri: str,
    run_id: str | None,
    tags: Mapping[str, Any],
    alias: str | None = CHALLENGER,
) -> Any:
    """Create a version of ``name`` (creating the registered model when new), tag it, set ``alias``.

    A ``models:/<model_id>`` URI registers that LoggedModel: the version's source is that URI
    (``version_model_id`` reads it back), its run the one that logged the model (``run_id`` is
    then ignored), and the model lists the version.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Created by the rlhf pipeline (registered_policy).")
    model_id = logged_model_id(model_uri)
    if model_id is not None:
        run_id = client.get_logged_model(model_id).source_run_id or run_id
    with process_tracking_uri(client):
        version = client.create_model_version(
            name=name, source=model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
            model_id=model_id,
        )
    if model_id is not None:
        link_version_to_model(client, name, version.version, model_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def evaluation_tags(report: Mapping[str, Any]) -> dict[str, str]:
    """Version tags from an ``evaluation_report`` manifest: metrics, eval set, promotion metric."""
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("registered_policy: the evaluation_report manifest has no 'metrics'; "
                         "re-materialize evaluation_report")
    data_version = report.get("data_version")
    if not data_version:
        raise ValueError("registered_policy: the evaluation_report manifest has no 'data_version'; "
                         "promotion cannot tell which evaluation set the scores belong to")
    tags = {metric_tag(k): repr(float(v)) for k, v in metrics.items() if v is not None}
    n_prompts = int(metrics.get("n_prompts") or 0)
    promotion_metric = next((m for m in PROMOTION_METRICS if metrics.get(m) is not None), RM_METRIC)
    sampling = report.get("sampling")
    if not sampling:
        raise ValueError("registered_policy: the evaluation_report manifest has no 'sampling'; "
                         "re-materialize evaluation_report")
    # Same data, prompt count, gold scorer and sampling => the same held-out questions, answered
    # the same way, on the same yardstick.
    eval_set = f"{data_version}|n={n_prompts}|gold={report.get('gold_scorer') or 'none'}|{sampling}"
    if promotion_metric == HELDOUT_METRIC:
        # a held-out score is comparable only under the same held-out reward model's weights
        heldout = report.get("heldout_reward_model_version")
        if not heldout:
            raise ValueError("registered_policy: the evaluation has held-out reward-model scores but no "
                             "'heldout_reward_model_version'; re-materialize evaluation_report")
        eval_set += f"|heldout={heldout}"
    tags.update({
        EVAL_DATA_VERSION_TAG: str(data_version),
        EVAL_SET_TAG: eval_set,
        PROMOTION_METRIC_TAG: promotion_metric,
    })
    return tags


class RegistryConfig(dg.Config):
    """Names under which the models are registered."""

    policy_name: str = Field(default_factory=settings.policy_name, description="Registered model of the PPO "
                             "policy (default: RLHF_POLICY_NAME, else rlhf-policy).")
    reward_model_name: str = Field(
        default_factory=settings.reward_model_name, description="Registered model of the reward model "
        "(default: RLHF_REWARD_MODEL_NAME, else rlhf-reward-model)."
    )
    register_reward_model: bool = Field(
        default=True, description="Also register the reward model (text-classification; an implicit one "
        "as text-generation, its beta and reference model in the logged model's metadata)."
    )


def registrable_model_uri(mlflow: MLflowResource, run_id: str, model_id: Any, model_dir: str, name: str,
               task: str) -> str:
    """The training run's LoggedModel, else (stage trained with log_model_to_mlflow false) the
    weights logged into this run now."""
    if model_id:
        return f"models:/{model_id}"
    return log_transformers_model(mlflow.tracking_uri, run_id, model_dir, name, task)


def register_reward_models(client: Any, mlflow: MLflowResource, name: str, run_id: str,
                           reward_model: Mapping[str, Any], match: Mapping[str, str],
                           tags: Mapping[str, Any]) -> list[Any]:
    """Versions of ``name`` for what PPO optimised: the reward model, or each member of an
    ensemble (``member_paths``, the order PPO averaged them in). A member an earlier attempt
    registered with ``match`` is taken back. The reward model's LoggedModel is its ``final/``,
    so an ensemble's members are logged into ``run_id`` first."""
    from assets.evaluation import as_dirs
    from assets.models import reward_model_paths

    paths = as_dirs(reward_model_paths(reward_model))
    versions = []
    for i, path in enumerate(paths):
        member = {} if len(paths) == 1 else {"ensemble_member": f"{i + 1}/{len(paths)}"}
        version = registered_with(client, name, {**match, "source_dir": path})
        if version is None:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"reward model {path!r} (what PPO optimised) is missing; "
                                        "re-materialize the reward model")
            uri = registrable_model_uri(mlflow, run_id, None if member else reward_model.get("mlflow_model_id"), path,
                                        f"reward_model_{i + 1}" if member else "reward_model", "text-classification")
            # 'challenger' names one version: the first member (a scalar one's weights are the critic's start)
            version = register_version(client, name, uri, run_id, {**tags, **member, "source_dir": path},
                                       alias=CHALLENGER if i == 0 else None)
        versions.append(version)
    return versions


def reward_lineage(versions: list[Any]) -> dict[str, str]:
    """The policy version's tags naming the reward model versions it was trained against."""
    if not versions:
        return {}
    tags = {"reward_model.version": str(versions[0].version)}
    if len(versions) > 1:
        tags["reward_model.versions"] = ",".join(str(v.version) for v in versions)
    return tags


def _model_path(manifest: Mapping[str, Any], asset: str) -> str:
    path = manifest.get("model_path")
    if not path or not Path(str(path)).is_dir():
        raise FileNotFoundError(
            f"registered_policy: the {asset} manifest has no existing 'model_path' ({path!r}); "
            f"re-materialize {asset}"
        )
    return str(path)


@dg.asset(
    group_name="registry",
    kinds={"mlflow"},
    code_version=REGISTERED_POLICY_VERSION,
    pool=REGISTRY_POOL,
    deps=["ppo_policy"],
    description="PPO policy (and reward model) registered in MLflow with alias 'challenger'.",
)
def registered_policy(
    context: dg.AssetExecutionContext,
    config: RegistryConfig,
    mlflow: MLflowResource,
    evaluation_report: dict,
    reward_model: dict,
) -> dg.Output[dict]:
    # Model paths come from the evaluation report so the registered weights are exactly the
    # evaluated ones, even when ppo_policy was re-materialized in between.
    ppo_dir = _model_path({"model_path": evaluation_report.get("ppo_model_path")}, "ppo_policy")
    tags = evaluation_tags(evaluation_report)
    client = mlflow.client()
    with mlflow.run(context, "registered_policy", {"data_version": tags[EVAL_DATA_VERSION_TAG]}) as run:
        run_id = run.info.run_id
        lineage = {
            "dagster.run_id": context.run.run_id,
            "evaluation.mlflow_run_id": str(evaluation_report.get("mlflow_run_id", "")),
            "registry.mlflow_run_id": run_id,
            "source_dir": ppo_dir,
        }
        # the same evaluation registered once: a re-run (retry, re-execution, a second
        # materialization) takes the versions registered from it back, as challenger again
        same = {"evaluation.mlflow_run_id": lineage["evaluation.mlflow_run_id"], "source_dir": ppo_dir}
        reward_versions = []
        if config.register_reward_model:
            reward_versions = register_reward_models(
                client, mlflow, config.reward_model_name, run_id, reward_model, same,
                {**lineage, EVAL_DATA_VERSION_TAG: tags[EVAL_DATA_VERSION_TAG]})
        lineage.update(reward_lineage(reward_versions))
        version = registered_with(client, config.policy_name, same)
        if version is None:
            policy_uri = registrable_model_uri(mlflow, run_id, evaluation_report.get("ppo_model_id"), ppo_dir,
                                               "policy", "text-generation")
            version = register_version(client, config.policy_name, policy_uri, run_id, {**tags, **lineage})
        else:
            context.log.info(f"{config.policy_name} v{version.version} was registered from this evaluation "
                             "already: making it the challenger again")
            client.set_registered_model_alias(config.policy_name, CHALLENGER, version.version)
        url = mlflow.run_url(run)
    context.log.info(f"registered {config.policy_name} v{version.version} as '{CHALLENGER}'")
    manifest = {
        "model_name": config.policy_name,
        "version": version.version,
        "alias": CHALLENGER,
        "model_uri": f"models:/{config.policy_name}/{version.version}",
        "eval_set": tags[EVAL_SET_TAG],
        "promotion_metric": tags[PROMOTION_METRIC_TAG],
        "mlflow_run_id": run_id,
        "mlflow_model_id": version_model_id(version),
        "reward_model_name": config.reward_model_name if reward_versions else None,
        "reward_model_version": reward_versions[0].version if reward_versions else None,
        # an ensemble: every member, in PPO's order (the first is reward_model_version)
        **({"reward_model_versions": [v.version for v in reward_versions]} if len(reward_versions) > 1 else {}),
    }
    return dg.Output(
        manifest,
        data_version=dg.DataVersion(manifest["model_uri"]),  # a new registry version is new data
        metadata={
            "model_uri": manifest["model_uri"],
            "version": int(version.version),
            "alias": CHALLENGER,
            "eval_set": tags[EVAL_SET_TAG],
            "mlflow_run": dg.MetadataValue.url(url),
            "mlflow_model_id": version_model_id(version) or "none",
            "reward_model_version": reward_versions_text(manifest),
        },
    )


def reward_versions_text(manifest: Mapping[str, Any]) -> str:
    """The registered reward model versions a policy was trained against, for the asset metadata."""
    versions = manifest.get("reward_model_versions") or [manifest.get("reward_model_version")]
    return ", ".join(str(v) for v in versions if v is not None) or "not registered"


REGISTRY_ASSETS = [registered_policy]
