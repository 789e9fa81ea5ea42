"""Promotion and rollback of the registered policy in the MLflow model registry.

MLflow 3 replaced stages with aliases, so the lifecycle is three aliases on one registered model:

* ``challenger``: the newest version, set by the ``registered_policy`` asset;
* ``champion``: the version serving users (``models:/NAME@champion``);
* ``previous_champion``: the champion before the last promotion, what a rollback restores.

A registered-model tag ``champion_history`` keeps every promotion in order (comma-separated
versions), so repeated rollbacks walk back further than one step.

Promotion compares one evaluation metric recorded as a version tag (``metric.<name>``) and only
when both versions were evaluated on the same evaluation set (tag ``eval.set``: data version,
prompt count, gold scorer and how the answers were sampled):
scores measured on different held-out prompts are not comparable, so that case is refused with
an error instead of silently promoting or not. The challenger must be strictly better.
"""

import json
from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from resources import settings
from resources.tracking import MLflowResource

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
HISTORY_TAG = "champion_history"
LAST_DECISION_TAG = "last_promotion_decision"
# Set on a version a rollback demoted: promotion never picks it again by itself.
ROLLED_BACK_TAG = "rolled_back"
# Every step that moves an alias reads the registry and then writes it: one at a time across
# runs (a lineage's champion_policy and a round's round_champion would otherwise interleave).
# Pools default to a limit of 1 in the shipped dagster.yaml files.
REGISTRY_POOL = "registry"
# Data version, prompt count, gold scorer and sampling (answers per prompt, temperature, length
# cap, seed) of the evaluation, and the held-out reward model's weights when its score decides
# (set by assets/registry.py).
EVAL_SET_TAG = "eval.set"
METRIC_TAG_PREFIX = "metric."
# The metric the registering asset chose for this version: the policy's mean gold reward on
# the held-out prompts when the data has a gold scorer (the bundled task's ground truth), else
# its mean held-out reward-model score (a model PPO never optimised), else its reward-model score.
PROMOTION_METRIC_TAG = "promotion_metric"
# "auto" = the challenger's PROMOTION_METRIC_TAG.
DEFAULT_PROMOTION_METRIC = "auto"


class RegistryError(RuntimeError):
    """The registry is not in a state in which the requested action makes sense."""


class IncomparableEvaluationError(RegistryError):
    """Challenger and champion were evaluated on different evaluation sets."""


@dataclass(frozen=True)
class PromotionDecision:
    """What ``promote`` decided and why (also stored as a registered-model tag)."""

    promoted: bool
    reason: str
    metric: str
    challenger_version: str | None
    champion_version: str | None
    challenger_score: float | None = None
    champion_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RollbackResult:
    """Which version was demoted and which one is champion again."""

    demoted_version: str
    champion_version: str
    previous_champion_version: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_tag(metric: str) -> str:
    """Version tag key under which an evaluation metric is stored."""
    return f"{METRIC_TAG_PREFIX}{metric}"


def version_metric(version: Any, metric: str) -> float:
    """The metric recorded on a model version, with an error naming what is missing."""
    key = metric_tag(metric)
    if key not in version.tags:
        recorded = sorted(
            k.removeprefix(METRIC_TAG_PREFIX) for k in version.tags if k.startswith(METRIC_TAG_PREFIX)
        )
        raise RegistryError(
            f"model '{version.name}' version {version.version} has no tag '{key}'; "
            f"recorded metrics: {recorded or 'none'}. Set the promotion `metric` to one of them."
        )
    try:
        return float(version.tags[key])
    except ValueError as exc:
        raise RegistryError(
            f"model '{version.name}' version {version.version}: tag '{key}'={version.tags[key]!r} is not a number"
        ) from exc


def decide_promotion(
    challenger: Any,
    champion: Any | None,
    metric: str = DEFAULT_PROMOTION_METRIC,
    higher_is_better: bool = True,
    allow_different_eval_sets: bool = False,
) -> PromotionDecision:
    """Pure decision: promote only a strictly better challenger measured on the same eval set."""
    if metric == "auto":
        if PROMOTION_METRIC_TAG not in challenger.tags:
            raise RegistryError(
                f"model '{challenger.name}' version {challenger.version} has no '{PROMOTION_METRIC_TAG}' "
                "tag; set the promotion `metric` explicitly (e.g. ppo/gold_mean)"
            )
        metric = challenger.tags[PROMOTION_METRIC_TAG]
    challenger_score = version_metric(challenger, metric)
    new = str(challenger.version)
    if champion is None:
        return PromotionDecision(True, "no champion yet: the first challenger becomes champion", metric,
                                 new, None, challenger_score, None)
    current = str(champion.version)
    if current == new:
        return PromotionDecision(False, f"version {new} is already the champion", metric,
                                 new, current, challenger_score, challenger_score)
    if challenger.tags.get(ROLLED_BACK_TAG) == "true":
        return PromotionDecision(False, f"version {new} was rolled back (tag {ROLLED_BACK_TAG}); register a "
                                 "new version, or delete the tag to make it eligible again", metric,
                                 new, current, challenger_score, None)
    champion_score = version_metric(champion, metric)
    eval_challenger = challenger.tags.get(EVAL_SET_TAG)
    eval_champion = champion.tags.get(EVAL_SET_TAG)
    if (eval_challenger is None or eval_challenger != eval_champion) and not allow_different_eval_sets:
        raise IncomparableEvaluationError(
            f"model '{challenger.name}': challenger v{new} was evaluated on eval set "
            f"{EVAL_SET_TAG}={eval_challenger!r}, champion v{current} on {eval_champion!r}; "
            "their scores are not comparable. Re-evaluate the champion on the new evaluation set, or run "
            "promote_champion with allow_different_eval_sets=true to promote on the recorded scores anyway."
        )
    better = challenger_score > champion_score if higher_is_better else challenger_score < champion_score
    direction = ">" if higher_is_better else "<"
    if better:
        reason = f"{metric}: challenger {challenger_score:.4f} {direction} champion {champion_score:.4f}"
    else:
        word = "better" if higher_is_better else "lower"
        reason = (f"{metric}: challenger {challenger_score:.4f} is not strictly {word} "
                  f"than champion {champion_score:.4f}")
    return PromotionDecision(better, reason, metric, new, current, challenger_score, champion_score)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version carrying ``alias``, or None when no version has it."""
    aliases = client.get_registered_model(name).aliases
    if alias not in aliases:
        return None
    return client.get_model_version(name, aliases[alias])


def champion_history(client: Any, name: str) -> list[str]:
    """Versions that were champion, oldest first (from the ``champion_history`` tag)."""
    text = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in text.split(",") if v]


def _set_history(client: Any, name: str, history: list[str]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))


def _require_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(
            f"registered model '{name}' does not exist in the MLflow registry; "
            "materialize the registered_policy asset first"
        ) from exc


def promote(
    client: Any,
    name: str | None = None,
    metric: str = DEFAULT_PROMOTION_METRIC,
    higher_is_better: bool = True,
    allow_different_eval_sets: bool = False,
    version: str | None = None,
) -> PromotionDecision:
    """Move ``champion`` to the challenger when it is strictly better; record the decision.

    ``name``: the registered model (None: ``settings.policy_name()``).

    The challenger is ``version`` when given (the lineage promotes the version its own run
    registered, even if another run has moved the ``challenger`` alias since), else the
    version the ``challenger`` alias names.
    """
    name = name or settings.policy_name()
    _require_model(client, name)
    if version is not None:
        challenger = client.get_model_version(name, str(version))
    else:
        challenger = alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"registered model '{name}' has no '{CHALLENGER}' alias; materialize registered_policy first"
        )
    champion = alias_version(client, name, CHAMPION)
    decision = decide_promotion(challenger, champion, metric, higher_is_better, allow_different_eval_sets)
    apply_promotion(client, name, decision, champion, challenger)
    return decision


def apply_promotion(client: Any, name: str, decision: PromotionDecision, champion: Any | None,
                    challenger: Any) -> None:
    """Carry out ``decision``: aliases, champion history and the ``last_promotion_decision`` tag."""
    if decision.promoted:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(champion.version))
        client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
        history = champion_history(client, name)
        if champion is not None and (not history or history[-1] != str(champion.version)):
            # A champion set by hand (outside promote) still belongs in the history.
            history.append(str(champion.version))
        _set_history(client, name, [*history, str(challenger.version)])
    client.set_registered_model_tag(name, LAST_DECISION_TAG, json.dumps(decision.to_dict()))


def rollback(client: Any, name: str | None = None) -> RollbackResult:
    """Restore the champion before the current one; repeated calls walk further back."""
    name = name or settings.policy_name()
    _require_model(client, name)
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"registered model '{name}' has no '{CHAMPION}' alias: nothing to roll back")
    history = champion_history(client, name)
    if not history or history[-1] != str(champion.version):
        previous = alias_version(client, name, PREVIOUS_CHAMPION)
        history = ([str(previous.version)] if previous is not None else []) + [str(champion.version)]
    if len(history) < 2:
        raise RegistryError(
            f"registered model '{name}': version {champion.version} is the only champion so far; "
            "there is no previous champion to roll back to"
        )
    history.pop()
    restored = history[-1]
    client.set_registered_model_alias(name, CHAMPION, restored)
    before = history[-2] if len(history) >= 2 else None
    if before is None:
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    else:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, before)
    client.set_model_version_tag(name, str(champion.version), ROLLED_BACK_TAG, "true")
    _set_history(client, name, history)
    return RollbackResult(str(champion.version), restored, before)


def prune(client: Any, name: str | None = None, keep_last: int = 5) -> list[str]:
    """Delete versions that no alias or champion history names, except the newest ``keep_last``."""
    if keep_last < 0:
        raise ValueError(f"prune: keep_last must be >= 0, got {keep_last}")
    name = name or settings.policy_name()
    _require_model(client, name)
    keep = {str(v) for v in client.get_registered_model(name).aliases.values()} | set(champion_history(client, name))
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True)
    keep |= {str(v.version) for v in versions[:keep_last]}
    deleted = [str(v.version) for v in versions if str(v.version) not in keep]
    for version in deleted:
        client.delete_model_version(name, version)
    return deleted


class PromoteConfig(dg.Config):
    """What an operator may change when promoting."""

    model_name: str = Field(default_factory=settings.policy_name, description="Registered model to act on "
                            "(default: RLHF_POLICY_NAME, else rlhf-policy).")
    metric: str = Field(
        default=DEFAULT_PROMOTION_METRIC,
        description="Evaluation metric (version tag metric.<name>) that decides the promotion; "
        "'auto' = the one the challenger recorded (gold mean reward, else the held-out reward "
        "model's score, else the reward model's).",
    )
    higher_is_better: bool = Field(default=True, description="False for metrics to minimise.")
    allow_different_eval_sets: bool = Field(
        default=False,
        description="Compare scores measured on different evaluation sets (normally refused).",
    )


class RollbackConfig(dg.Config):
    model_name: str = Field(default_factory=settings.policy_name, description="Registered model to act on "
                            "(default: RLHF_POLICY_NAME, else rlhf-policy).")


class PruneConfig(dg.Config):
    model_name: str = Field(default_factory=settings.policy_name, description="Registered model to act on "
                            "(default: RLHF_POLICY_NAME, else rlhf-policy).")
    keep_last: int = Field(default=5, description="Newest versions kept even without an alias.")


def _failure(exc: RegistryError) -> dg.Failure:
    return dg.Failure(description=str(exc), allow_retries=False)


@dg.op(out=dg.Out(dg.Nothing), tags={"kind": "mlflow"}, pool=REGISTRY_POOL)
def promote_champion(context: dg.OpExecutionContext, config: PromoteConfig, mlflow: MLflowResource):
    """Move the ``champion`` alias to the challenger when it is strictly better on the same eval set."""
    try:
        decision = promote(mlflow.client(), config.model_name, config.metric, config.higher_is_better,
                           config.allow_different_eval_sets)
    except RegistryError as exc:
        raise _failure(exc) from exc
    context.log.info(f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}")
    yield dg.Output(None, metadata={k: v for k, v in decision.to_dict().items() if v is not None})


@dg.op(out=dg.Out(dg.Nothing), tags={"kind": "mlflow"}, pool=REGISTRY_POOL)
def rollback_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MLflowResource):
    """Give the ``champion`` alias back to the previous champion."""
    try:
        result = rollback(mlflow.client(), config.model_name)
    except RegistryError as exc:
        raise _failure(exc) from exc
    context.log.info(f"rolled back: v{result.demoted_version} -> v{result.champion_version}")
    yield dg.Output(None, metadata={k: v for k, v in result.to_dict().items() if v is not None})


@dg.op(out=dg.Out(dg.Nothing), tags={"kind": "mlflow"}, pool=REGISTRY_POOL)
def prune_versions(context: dg.OpExecutionContext, config: PruneConfig, mlflow: MLflowResource):
    """Delete old versions that no alias or champion history refers to."""
    try:
        deleted = prune(mlflow.client(), config.model_name, config.keep_last)
    except RegistryError as exc:
        raise _failure(exc) from exc
    context.log.info(f"deleted versions: {deleted or 'none'}")
    yield dg.Output(None, metadata={"deleted_versions": ", ".join(deleted) or "none"})


@dg.job(description="Promote the registered policy's challenger to champion when it is strictly better.")
def promote_champion_job() -> None:
    promote_champion()


@dg.job(description="Restore the previous champion of the registered policy.")
def rollback_champion_job() -> None:
    rollback_champion()


@dg.job(description="Delete old registered-policy versions that nothing refers to.")
def prune_versions_job() -> None:
    prune_versions()
