"""Jobs: the whole lineage as one asset job, plus the registry op jobs (defined in ops/registry.py)."""

import dagster as dg

from ops.registry import promote_champion_job, prune_versions_job, rollback_champion_job

LINEAGE_JOB_NAME = "rlhf_lineage"
DATA_JOB_NAME = "preference_data"

# Every asset with its checks: data -> models -> evaluation -> registered_policy. The blocking
# checks (quarantine fraction, reward-model accuracy, ppo_beats_sft) stop the run at their gate.
rlhf_lineage_job = dg.define_asset_job(
    name=LINEAGE_JOB_NAME,
    selection=dg.AssetSelection.all(),
    description="Materialize the whole lineage: preference data, SFT, reward model, PPO, evaluation, registry.",
    tags={"rlhf/kind": "lineage"},
)

# Only the data group, for checking a new source without training anything.
preference_data_job = dg.define_asset_job(
    name=DATA_JOB_NAME,
    selection=dg.AssetSelection.groups("data"),
    description="Ingest, validate and split preference data (no training).",
)

ALL_JOBS = [rlhf_lineage_job, preference_data_job, promote_champion_job, rollback_champion_job,
            prune_versions_job]
