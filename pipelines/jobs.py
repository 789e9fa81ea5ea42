"""Jobs: the whole lineage, one RLHF round, the data group, and the registry op jobs
(defined in ops/registry.py)."""

import dagster as dg

from assets.rounds import GROUP as ROUNDS_GROUP
from assets.rounds import ROUNDS
from ops.registry import promote_champion_job, prune_versions_job, rollback_champion_job

LINEAGE_JOB_NAME = "rlhf_lineage"
ROUND_JOB_NAME = "rlhf_round"
DATA_JOB_NAME = "preference_data"

# Every asset with its checks: data -> models -> evaluation -> registered_policy. The blocking
# checks (quarantine fraction, reward-model accuracy, ppo_beats_sft) stop the run at their gate.
rlhf_lineage_job = dg.define_asset_job(
    name=LINEAGE_JOB_NAME,
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups(ROUNDS_GROUP),
    description="Materialize the whole lineage: preference data, SFT, reward model, PPO, evaluation, registry, "
    "promotion.",
    tags={"rlhf/kind": "lineage"},
)

# One round (one partition of the rounds group): new pairs -> refreshed RM -> PPO from the
# champion -> paired evaluation -> registration and gated promotion.
rlhf_round_job = dg.define_asset_job(
    name=ROUND_JOB_NAME,
    selection=dg.AssetSelection.groups(ROUNDS_GROUP),
    partitions_def=ROUNDS,
    description="One RLHF round from the current champion (run it for a new partition of 'rlhf_round').",
    tags={"rlhf/kind": "round"},
)

# Only the data group, for checking a new source without training anything.
preference_data_job = dg.define_asset_job(
    name=DATA_JOB_NAME,
    selection=dg.AssetSelection.groups("data"),
    description="Ingest, validate and split preference data (no training).",
)

ALL_JOBS = [rlhf_lineage_job, rlhf_round_job, preference_data_job, promote_champion_job, rollback_champion_job,
            prune_versions_job]
