"""``champion_policy``: the promotion gate as the last asset of the lineage.

Every path that materializes the lineage (``rlhf run``, the UI, a sensor or schedule) ends with
the same decision as ``promote_champion_job``: the ``challenger`` that ``registered_policy`` just
registered becomes ``champion`` only when it is strictly better on the same evaluation set
(``ops.registry.promote``). A refused challenger stays registered; the refusal is the asset
check ``challenger_promoted`` (a warning in the UI) and an alert through the ``notifier``.
Scores from different evaluation sets fail the step with the registry's explanation.
"""

import dagster as dg
from pydantic import Field

from ops.registry import DEFAULT_PROMOTION_METRIC, REGISTRY_POOL, RegistryError, promote
from resources.notify import Notifier
from resources.tracking import MLflowResource


class ChampionConfig(dg.Config):
    """The promotion gate of the lineage."""

    promote: bool = Field(default=True, description="False: register only; the champion alias does not move "
                          "(`rlhf run --no-promote`).")
    metric: str = Field(default=DEFAULT_PROMOTION_METRIC, description="Version tag metric.<name> that decides; "
                        "'auto' = the challenger's promotion_metric: gold mean, else the held-out reward model's "
                        "score, else the reward model's.")
    allow_different_eval_sets: bool = Field(default=False, description="Compare scores from different "
                                            "evaluation sets (normally refused).")


@dg.asset(group_name="registry", kinds={"mlflow"}, code_version="2", pool=REGISTRY_POOL,
          description="Moves the 'champion' alias to the new challenger when it beats the champion.")
def champion_policy(context: dg.AssetExecutionContext, config: ChampionConfig, mlflow: MLflowResource,
                    notifier: Notifier, registered_policy: dict) -> dg.MaterializeResult:
    name = str(registered_policy["model_name"])
    if not config.promote:
        reason = "promotion switched off (promote: false); the challenger stays registered"
        context.log.info(reason)
        decision = {"promoted": False, "reason": reason, "challenger_version": str(registered_policy["version"])}
        return dg.MaterializeResult(value={"model_name": name, "decision": decision, "skipped": True},
                                    metadata={"decision": reason})
    try:
        made = promote(mlflow.client(), name, config.metric, True, config.allow_different_eval_sets,
                       version=str(registered_policy["version"]))
    except RegistryError as exc:
        notifier.notify("promotion_failed", f"{name}: {exc}", {"model_name": name})
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    verdict = "promoted" if made.promoted else "not promoted"
    context.log.info(f"{name} v{made.challenger_version} {verdict}: {made.reason}")
    if not made.promoted:
        notifier.notify("promotion_refused", f"{name} v{made.challenger_version} not promoted: {made.reason}",
                        made.to_dict())
    return dg.MaterializeResult(
        value={"model_name": name, "decision": made.to_dict(), "skipped": False},
        metadata={k: v for k, v in made.to_dict().items() if v is not None})


@dg.asset_check(asset=champion_policy, description="The new challenger was promoted (warns when the gate kept "
                "the current champion).")
def challenger_promoted(champion_policy: dict) -> dg.AssetCheckResult:
    d = champion_policy["decision"]
    return dg.AssetCheckResult(passed=bool(d["promoted"]), severity=dg.AssetCheckSeverity.WARN,
                               description=d["reason"], metadata={k: v for k, v in d.items() if v is not None})


PROMOTION_ASSETS = [champion_policy]
PROMOTION_CHECKS = [challenger_promoted]
