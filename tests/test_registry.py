"""Registry: register a tiny model as challenger, promote only a strictly better one, roll back,
and load ``models:/NAME@champion`` as a pipeline that generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mlflow = pytest.importorskip("mlflow")

from assets.registry import evaluation_tags, register_version  # noqa: E402
from ops.registry import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    IncomparableEvaluationError,
    RegistryError,
    alias_version,
    promote,
    promote_champion_job,
    prune,
    rollback,
    rollback_champion_job,
)
from resources.mlflow_models import log_transformers_model, version_model_id  # noqa: E402
from resources.tracking import MLflowResource  # noqa: E402

NAME = "test-policy"
WORDS = "the river garden robot is lovely dull nice . tell me about please".split()


def tiny_model_dir(out: Path) -> Path:
    """A 1-layer GPT-2 and a word-level tokenizer, saved as a save_pretrained directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=32, n_positions=64,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An MLflow SQLite store with one logged tiny policy (logged once, registered many times)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    resource = MLflowResource(tracking_uri=uri, artifact_root=(root / "artifacts").as_uri(),
                              experiment_name="test-registry")
    client = resource.client()
    run = client.create_run(resource.experiment_id())
    model_uri = log_transformers_model(uri, run.info.run_id, tiny_model_dir(root / "model"), "policy",
                                       "text-generation")
    return {"uri": uri, "client": client, "model_uri": model_uri, "run_id": run.info.run_id,
            "resource": resource}


def report(gold: float, data_version: str = "dv1") -> dict:
    """An evaluation_report manifest as assets/evaluation.py writes it."""
    return {"data_version": data_version, "gold_scorer": "assets.bundled_task:gold_score_batch",
            "sampling": "k=4,T=0.7,len=32,seed=0",
            "metrics": {"ppo/gold_mean": gold, "sft/gold_mean": gold - 1.0, "win_rate_gold": 0.7,
                        "ppo/rm_score_mean": 0.1, "n_prompts": 16.0}}


def add_challenger(store: dict, name: str, gold: float, data_version: str = "dv1") -> str:
    v = register_version(store["client"], name, store["model_uri"], store["run_id"],
                         evaluation_tags(report(gold, data_version)))
    return str(v.version)


def aliases(store: dict, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in store["client"].get_registered_model(name).aliases.items()}


def test_evaluation_tags_record_metrics_eval_set_and_promotion_metric() -> None:
    tags = evaluation_tags(report(2.5))
    assert float(tags["metric.ppo/gold_mean"]) == 2.5
    assert tags["eval.data_version"] == "dv1"
    assert tags["promotion_metric"] == "ppo/gold_mean"
    no_gold = report(1.0)
    no_gold["metrics"]["ppo/gold_mean"] = None
    assert evaluation_tags(no_gold)["promotion_metric"] == "ppo/rm_score_mean"
    assert evaluation_tags(no_gold)["eval.set"] == "dv1|n=16|gold=assets.bundled_task:gold_score_batch|k=4,T=0.7,len=32,seed=0"
    # with held-out scores they decide, and the held-out weights join the evaluation set
    held = {**no_gold, "metrics": {**no_gold["metrics"], "ppo/heldout_score_mean": 0.3},
            "heldout_reward_model_version": "abc123"}
    tags = evaluation_tags(held)
    assert tags["promotion_metric"] == "ppo/heldout_score_mean"
    assert tags["eval.set"] == "dv1|n=16|gold=assets.bundled_task:gold_score_batch|k=4,T=0.7,len=32,seed=0|heldout=abc123"
    with pytest.raises(ValueError, match="heldout_reward_model_version"):
        evaluation_tags({**held, "heldout_reward_model_version": None})
    # gold still decides when there is one, and then the held-out weights do not matter
    with_gold = evaluation_tags({**report(1.0), "heldout_reward_model_version": "x"})
    assert with_gold["eval.set"].endswith("seed=0")
    # answers drawn another way (here: a longer length cap) are another evaluation set
    longer = evaluation_tags({**report(1.0), "sampling": "k=4,T=0.7,len=96,seed=0"})
    assert longer["eval.set"] != evaluation_tags(report(1.0))["eval.set"]
    with pytest.raises(ValueError, match="sampling"):
        evaluation_tags({**report(1.0), "sampling": None})
    with pytest.raises(ValueError, match="data_version"):
        evaluation_tags({"metrics": {"a": 1.0}})


def test_first_challenger_becomes_champion_and_worse_one_is_not_promoted(store: dict) -> None:
    name = f"{NAME}-worse"
    v1 = add_challenger(store, name, gold=2.0)
    first = promote(store["client"], name)
    assert first.promoted and aliases(store, name)[CHAMPION] == v1

    v2 = add_challenger(store, name, gold=1.5)
    decision = promote(store["client"], name)
    assert not decision.promoted
    assert decision.challenger_version == v2 and decision.champion_version == v1
    assert aliases(store, name)[CHAMPION] == v1
    assert aliases(store, name)[CHALLENGER] == v2

    add_challenger(store, name, gold=2.0)  # a tie is not strictly better
    assert not promote(store["client"], name).promoted
    assert aliases(store, name)[CHAMPION] == v1


def no_gold_report(rm: float, heldout: float, heldout_version: str = "h1") -> dict:
    """An evaluation of data without a gold scorer: reward-model and held-out scores only."""
    return {"data_version": "dv1", "gold_scorer": None, "heldout_reward_model_version": heldout_version,
            "sampling": "k=4,T=0.7,len=32,seed=0",
            "metrics": {"ppo/gold_mean": None, "ppo/rm_score_mean": rm, "ppo/heldout_score_mean": heldout,
                        "n_prompts": 16.0}}


def test_without_gold_the_heldout_score_decides_and_a_gamed_reward_model_does_not(store: dict) -> None:
    name = f"{NAME}-heldout"
    v1 = str(register_version(store["client"], name, store["model_uri"], store["run_id"],
                              evaluation_tags(no_gold_report(rm=0.5, heldout=0.4))).version)
    assert promote(store["client"], name).promoted
    # a challenger that games the reward model (1.5 > 0.5) but loses on the held-out one (0.2 < 0.4)
    register_version(store["client"], name, store["model_uri"], store["run_id"],
                     evaluation_tags(no_gold_report(rm=1.5, heldout=0.2)))
    decision = promote(store["client"], name)
    assert not decision.promoted and decision.metric == "ppo/heldout_score_mean"
    assert (decision.challenger_score, decision.champion_score) == (0.2, 0.4)
    assert aliases(store, name)[CHAMPION] == v1
    # scores under another held-out model's weights are not comparable
    register_version(store["client"], name, store["model_uri"], store["run_id"],
                     evaluation_tags(no_gold_report(rm=0.1, heldout=0.9, heldout_version="h2")))
    with pytest.raises(IncomparableEvaluationError, match="heldout=h2"):
        promote(store["client"], name)
    assert aliases(store, name)[CHAMPION] == v1


def test_better_challenger_is_promoted_then_rolled_back(store: dict) -> None:
    name = f"{NAME}-rollback"
    v1 = add_challenger(store, name, gold=1.0)
    promote(store["client"], name)
    v2 = add_challenger(store, name, gold=2.0)
    assert promote(store["client"], name).promoted
    v3 = add_challenger(store, name, gold=3.0)
    assert promote(store["client"], name).promoted
    assert aliases(store, name)[CHAMPION] == v3 and aliases(store, name)[PREVIOUS_CHAMPION] == v2

    back = rollback(store["client"], name)
    assert (back.demoted_version, back.champion_version) == (v3, v2)
    assert aliases(store, name)[CHAMPION] == v2 and aliases(store, name)[PREVIOUS_CHAMPION] == v1
    assert store["client"].get_model_version(name, v3).tags["rolled_back"] == "true"

    # v3 still holds the challenger alias: promoting again must not undo the rollback
    again = promote(store["client"], name)
    assert not again.promoted and "rolled back" in again.reason
    assert aliases(store, name)[CHAMPION] == v2

    rollback(store["client"], name)
    assert aliases(store, name)[CHAMPION] == v1
    assert PREVIOUS_CHAMPION not in aliases(store, name)
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(store["client"], name)


def test_promoting_a_given_version_ignores_where_the_challenger_alias_moved(store: dict) -> None:
    name = f"{NAME}-version"
    v1 = add_challenger(store, name, gold=3.0)
    promote(store["client"], name)
    mine = add_challenger(store, name, gold=3.4)   # this run's version
    add_challenger(store, name, gold=3.2)          # another run registers after it and takes the alias
    decision = promote(store["client"], name, version=mine)
    assert (decision.promoted, decision.challenger_version, decision.champion_version) == (True, mine, v1)
    assert decision.challenger_score == 3.4
    assert aliases(store, name)[CHAMPION] == mine


def test_different_eval_sets_are_refused(store: dict) -> None:
    name = f"{NAME}-evalset"
    add_challenger(store, name, gold=1.0, data_version="dv1")
    promote(store["client"], name)
    add_challenger(store, name, gold=5.0, data_version="dv2")
    with pytest.raises(IncomparableEvaluationError, match="not comparable"):
        promote(store["client"], name)
    forced = promote(store["client"], name, allow_different_eval_sets=True)
    assert forced.promoted


def test_errors_name_the_missing_piece(store: dict) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        promote(store["client"], "never-registered")
    name = f"{NAME}-metric"
    add_challenger(store, name, gold=1.0)
    with pytest.raises(RegistryError, match="no tag 'metric.eval/accuracy'"):
        promote(store["client"], name, metric="eval/accuracy")


def test_prune_keeps_aliased_and_recent_versions(store: dict) -> None:
    name = f"{NAME}-prune"
    v1 = add_challenger(store, name, gold=1.0)
    promote(store["client"], name)
    for gold in (0.1, 0.2, 0.3):
        add_challenger(store, name, gold=gold)
    deleted = prune(store["client"], name, keep_last=1)
    remaining = {str(v.version) for v in store["client"].search_model_versions(f"name='{name}'")}
    assert deleted == ["3", "2"]
    assert remaining == {v1, "4"}


def test_promote_and_rollback_jobs_move_aliases(store: dict) -> None:
    name = f"{NAME}-jobs"
    resources = {"mlflow": store["resource"]}
    v1 = add_challenger(store, name, gold=1.0)
    cfg = {"ops": {"promote_champion": {"config": {"model_name": name}}}}
    assert promote_champion_job.execute_in_process(run_config=cfg, resources=resources).success
    v2 = add_challenger(store, name, gold=2.0)
    result = promote_champion_job.execute_in_process(run_config=cfg, resources=resources)
    assert result.success and aliases(store, name)[CHAMPION] == v2
    rb = {"ops": {"rollback_champion": {"config": {"model_name": name}}}}
    assert rollback_champion_job.execute_in_process(run_config=rb, resources=resources).success
    assert aliases(store, name)[CHAMPION] == v1
    failed = rollback_champion_job.execute_in_process(run_config=rb, resources=resources, raise_on_error=False)
    assert not failed.success
    failure = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "no previous champion" in str(failure.event_specific_data.error)


def test_champion_loads_and_generates(store: dict) -> None:
    name = f"{NAME}-load"
    add_challenger(store, name, gold=1.0)
    promote(store["client"], name)
    assert alias_version(store["client"], name, CHAMPION) is not None
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    pipe = mlflow.transformers.load_model(f"models:/{name}@{CHAMPION}")
    prompt = "tell me about the river"
    out = pipe(prompt, max_new_tokens=5, do_sample=False, return_full_text=False)
    assert isinstance(out, list) and isinstance(out[0]["generated_text"], str)
    generated = pipe(prompt, max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert generated.startswith(prompt) and len(generated.split()) > len(prompt.split())


def test_version_registers_the_logged_model_of_its_run(store: dict) -> None:
    """A ``models:/<model_id>`` source links both ways: the version records the LoggedModel and
    the run that logged it, the LoggedModel lists the version."""
    import json

    name = f"{NAME}-link"
    model_id = store["model_uri"].removeprefix("models:/")
    assert model_id.startswith("m-")
    version = register_version(store["client"], name, store["model_uri"], None, {})
    assert version_model_id(version) == model_id and version.run_id == store["run_id"]
    assert version.source == store["model_uri"]  # what the MLflow UI reads as the source model
    logged = store["client"].get_logged_model(model_id)
    assert logged.source_run_id == store["run_id"] and str(logged.status) == "READY"
    # filed with its run, not in the Default experiment (whose artifacts would land in ./mlruns)
    experiment = store["client"].get_experiment(logged.experiment_id)
    assert experiment.name == "test-registry" and logged.artifact_location.startswith(experiment.artifact_location)
    assert {"name": name, "version": str(version.version)} in json.loads(logged.tags["mlflow.modelVersions"])
    # logging the model into the run did not end it (its asset still logs to it afterwards)
    assert store["client"].get_run(store["run_id"]).info.status == "RUNNING"


def test_without_a_logged_model_the_registry_logs_the_weights_itself(store: dict, tmp_path: Path) -> None:
    """A stage trained with log_model_to_mlflow false has no LoggedModel: registered_policy logs
    the directory into its own run; with one, it reuses it and logs nothing."""
    from assets.registry import registrable_model_uri

    resource, client = store["resource"], store["client"]
    registering = client.create_run(resource.experiment_id()).info.run_id
    reused = registrable_model_uri(resource, registering, "m-from-training", str(tmp_path / "unused"), "policy",
                        "text-generation")
    assert reused == "models:/m-from-training"
    assert not client.get_run(registering).outputs.model_outputs
    logged = registrable_model_uri(resource, registering, None, str(tiny_model_dir(tmp_path / "m")), "policy",
                        "text-generation")
    assert client.get_logged_model(logged.removeprefix("models:/")).source_run_id == registering


def test_an_earlier_registration_is_found_by_its_tags(store: dict) -> None:
    from assets.registry import registered_with

    name = f"{NAME}-round"
    client = store["client"]
    same = {"rlhf.round": "round-0001", "evaluation.mlflow_run_id": "eval-a"}
    assert registered_with(client, name, same) is None  # no such model yet
    first = register_version(client, name, store["model_uri"], store["run_id"], same)
    register_version(client, name, store["model_uri"], store["run_id"], {**same, "rlhf.round": "round-0002"})
    register_version(client, name, store["model_uri"], store["run_id"], {**same, "evaluation.mlflow_run_id": "b"})
    found = registered_with(client, name, same)
    assert found is not None and str(found.version) == str(first.version)
    assert registered_with(client, name, {**same, "rlhf.round": "round-0003"}) is None


def test_each_member_of_a_reward_ensemble_is_registered_once(store: dict, tmp_path: Path) -> None:
    """PPO optimised two reward models: both become versions, in PPO's order, logged into the
    registering run (the stage's LoggedModel is final/, which is neither path); a second attempt
    takes them back. One model reuses the stage's LoggedModel."""
    from assets.registry import register_reward_models, reward_lineage

    resource, client = store["resource"], store["client"]
    name = f"{NAME}-rm-ensemble"
    run_id = client.create_run(resource.experiment_id()).info.run_id
    members = [str(tiny_model_dir(tmp_path / f"mismatched_{v}" / "final")) for v in ("0.5", "0")]
    manifest = {"model_path": str(tmp_path / "final"), "member_paths": members, "mlflow_model_id": "m-final"}
    match = {"evaluation.mlflow_run_id": "eval-ensemble"}
    first = register_reward_models(client, resource, name, run_id, manifest, match, {**match, "k": "v"})
    assert [v.tags["source_dir"] for v in first] == members
    assert [v.tags["ensemble_member"] for v in first] == ["1/2", "2/2"]
    # 'challenger' names the first member (the critic's start), not whichever was registered last
    assert str(client.get_registered_model(name).aliases["challenger"]) == str(first[0].version)
    assert {client.get_logged_model(version_model_id(v)).source_run_id for v in first} == {run_id}
    assert reward_lineage(first) == {"reward_model.version": str(first[0].version),
                                     "reward_model.versions": f"{first[0].version},{first[1].version}"}
    again = register_reward_models(client, resource, name, run_id, manifest, match, match)
    assert [v.version for v in again] == [v.version for v in first]
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    single = {"model_path": members[0], "mlflow_model_id": version_model_id(first[0])}
    [one] = register_reward_models(client, resource, f"{name}-single", run_id, single, match, match)
    assert version_model_id(one) == single["mlflow_model_id"] and "ensemble_member" not in one.tags
    assert reward_lineage([one]) == {"reward_model.version": str(one.version)}
    assert reward_lineage([]) == {}
    # the registry asset's metadata line (MLflow returns versions as numbers or strings)
    from assets.registry import reward_versions_text
    assert reward_versions_text({"reward_model_version": 3, "reward_model_versions": [3, 4]}) == "3, 4"
    assert reward_versions_text({"reward_model_version": "7"}) == "7"
    assert reward_versions_text({"reward_model_version": None}) == "not registered"
    with pytest.raises(FileNotFoundError, match="missing"):
        register_reward_models(client, resource, name, run_id, {"model_path": str(tmp_path / "missing")}, match, match)


def test_an_implicit_reward_model_is_logged_as_a_causal_lm_with_its_spec(store: dict, tmp_path: Path) -> None:
    """An implicit reward model (ppo_core.models.IMPLICIT_REWARD_FILE beside the weights) is a
    causal LM: it is logged for text generation, and its beta and reference model travel in the
    logged model's metadata, since scoring with it needs both."""
    import mlflow

    from assets.registry import register_reward_models
    from resources.mlflow_models import process_uris

    resource, client = store["resource"], store["client"]
    run_id = client.create_run(resource.experiment_id()).info.run_id
    rm = tiny_model_dir(tmp_path / "implicit" / "final")
    spec = {"beta": 0.1, "reference_model": "/models/sft/final"}
    (rm / "implicit_reward.json").write_text(json.dumps(spec))
    [version] = register_reward_models(client, resource, f"{NAME}-implicit", run_id, {"model_path": str(rm)},
                                       {"evaluation.mlflow_run_id": "eval-implicit"}, {})
    with process_uris(store["uri"]):
        info = mlflow.models.get_model_info(f"models:/{version_model_id(version)}")
    assert info.flavors["transformers"]["task"] == "text-generation"
    assert info.metadata == {"implicit_reward": spec}
