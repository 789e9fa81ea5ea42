"""Reward-model engine: Bradley-Terry loss values, a tiny smoke run, margins, bad configurations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from assets.bundled_task import generate_preferences
from ppo_core.callbacks import Callback
from ppo_core.config import ConfigError, from_dict
from ppo_core.data import encode_prompt_response, pad_sequences
from ppo_core.models import (
    ModelLoadError,
    build_tiny_causal_lm,
    last_token_scores,
    load_sequence_scorer,
    load_tokenizer,
    train_tokenizer,
)
from ppo_core.reward import RewardConfig, bradley_terry_loss, main, mismatched_pairs, train

torch.set_num_threads(1)


class Recorder(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []

    def on_log(self, step, metrics) -> None:
        self.logs.append(dict(metrics))

    def on_evaluate(self, step, metrics) -> None:
        self.evals.append(dict(metrics))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rm_*.parquet from the bundled task; the train split carries a margin column."""
    out = tmp_path_factory.mktemp("rm_data")
    df = generate_preferences(96, seed=2, corrupt_fraction=0.0)[["prompt", "chosen", "rejected"]]
    df.iloc[:64].assign(margin=0.0).to_parquet(out / "rm_train.parquet")
    df.iloc[64:].to_parquet(out / "rm_eval.parquet")
    return out


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Stands in for an SFT output: a tiny causal LM + tokenizer save_pretrained dir."""
    import pandas as pd

    out = tmp_path_factory.mktemp("sft_model")
    df = pd.read_parquet(data_dir / "rm_train.parquet")
    tok = train_tokenizer(list(df.prompt) + list(df.chosen) + list(df.rejected), out, vocab_size=300)
    build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=128).save_pretrained(out)
    return out


def _cfg(data_dir: Path, out: Path, model: Path, **kw: Any) -> RewardConfig:
    fields = {"data_dir": str(data_dir), "output_dir": str(out), "model_name_or_path": str(model),
              "batch_size": 16, "micro_batch_size": 8, "learning_rate": 3e-3, "num_epochs": 3,
              "eval_steps": 6, "save_steps": 0, "strategy": {"zero_stage": 2}, "mismatched_negatives": 0.0,
              "kind": "scalar"}
    fields.update(kw)
    return from_dict(RewardConfig, fields)


def test_bradley_terry_loss_matches_hand_computation() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2
    expected = torch.tensor([math.log(1 + math.exp(-1)), math.log(2)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)
    # A margin of 1 on the first pair moves it to -log sigmoid(0).
    with_margin = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(with_margin, torch.tensor([math.log(2), math.log(2)]))
    # Centering adds coef * (r_c + r_r)^2 = 0.5 * 9 on the first pair.
    centered = bradley_terry_loss(chosen, rejected, center_coef=0.5)
    torch.testing.assert_close(centered, expected + torch.tensor([4.5, 0.0]))
    # Label smoothing 0.25: 3/4 of the loss on the label, 1/4 on the reverse, -log sigmoid(-1) =
    # log(1 + e); a tie costs log 2 either way.
    smoothed = bradley_terry_loss(chosen, rejected, label_smoothing=0.25)
    torch.testing.assert_close(smoothed, torch.tensor(
        [0.75 * math.log(1 + math.exp(-1)) + 0.25 * math.log(1 + math.e), math.log(2)]))


def test_reward_smoke_run(tmp_path: Path, data_dir: Path, sft_model: Path) -> None:
    rec = Recorder()
    summary = train(_cfg(data_dir, tmp_path / "rm", sft_model, center_coef=0.01), [rec])
    final = tmp_path / "rm" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    on_disk = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert on_disk["eval/accuracy"] == summary["eval/accuracy"]
    assert len(rec.logs) == 12 and {"train/loss", "train/accuracy", "train/lr"} <= set(rec.logs[0])
    assert {"eval/accuracy", "eval/margin_mean", "eval/loss"} <= set(rec.evals[-1])
    first, last = rec.logs[:3], rec.logs[-3:]
    assert sum(m["train/loss"] for m in last) < sum(m["train/loss"] for m in first)  # it learns
    # The saved model reloads as a sequence scorer and reproduces the reported eval margin.
    gap = _eval_gaps(final, data_dir)
    assert math.isclose(float(gap.mean()), summary["eval/margin_mean"], rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(float((gap > 0).float().mean()), summary["eval/accuracy"], abs_tol=1e-9)


def test_dropout_is_live_in_training_only(tmp_path: Path, data_dir: Path, sft_model: Path) -> None:
    """Same init, same first batch: the first step's loss differs only if dropout is live.
    The eval metrics equal those of the saved model reloaded (dropout off), so neither the
    evaluation nor final/ carries it."""
    plain, dropped = Recorder(), Recorder()
    train(_cfg(data_dir, tmp_path / "plain", sft_model, num_epochs=1, eval_steps=0), [plain])
    summary = train(_cfg(data_dir, tmp_path / "rm", sft_model, num_epochs=1, eval_steps=0, dropout=0.3), [dropped])
    assert plain.logs[0]["train/loss"] != dropped.logs[0]["train/loss"]
    final = tmp_path / "rm" / "final"
    assert json.loads((final / "config.json").read_text())["attention_dropout"] == 0.0
    gap = _eval_gaps(final, data_dir)
    assert math.isclose(float(gap.mean()), summary["eval/margin_mean"], rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(float((gap > 0).float().mean()), summary["eval/accuracy"], abs_tol=1e-9)


def test_implicit_reward_model_saves_an_lm_that_scores_as_it_trained(tmp_path: Path, data_dir: Path,
                                                                      sft_model: Path) -> None:
    """kind implicit: the SFT LM trains on beta x its log-ratio to SFT; final/ is that LM plus
    implicit_reward.json, and the report's scorer (assets.evaluation.rm_scores, as PPO scores)
    reproduces the eval margin and accuracy the run reported. Before any step every score is 0
    (the model is its own reference; the reference's log-probs are computed once, in other
    batches, so to float precision), so the first step's loss is log 2."""
    import pandas as pd

    from assets.evaluation import rm_scores
    from ppo_core.data import encode_response

    cfg = _cfg(data_dir, tmp_path / "rm", sft_model, kind="implicit", beta=0.5, learning_rate=None,
               center_coef=None, num_epochs=2, eval_steps=0)
    assert (cfg.learning_rate, cfg.center_coef) == (1e-3, 0.0)  # the implicit defaults
    assert (_cfg(data_dir, tmp_path, sft_model, learning_rate=None, center_coef=None).learning_rate,
            _cfg(data_dir, tmp_path, sft_model, center_coef=None).center_coef) == (5e-4, 0.01)
    rec = Recorder()
    summary = train(cfg, [rec])
    assert abs(rec.logs[0]["train/margin_mean"]) < 1e-5
    final = tmp_path / "rm" / "final"
    assert json.loads((final / "implicit_reward.json").read_text()) == {
        "beta": 0.5, "reference_model": str(sft_model.resolve())}
    assert json.loads((final / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")
    tok = load_tokenizer(final)
    df = pd.read_parquet(data_dir / "rm_eval.parquet")
    prompts = df.prompt.tolist()

    def scores(col: str) -> torch.Tensor:
        ids = [encode_response(tok, p, r) for p, r in zip(prompts, df[col])]
        return torch.tensor(rm_scores(str(final), prompts, ids, 16))

    gap = scores("chosen") - scores("rejected")
    assert math.isclose(float(gap.mean()), summary["eval/margin_mean"], rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(float((gap > 0).float().mean()), summary["eval/accuracy"], abs_tol=1e-9)
    assert rec.logs[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # every gap 0
    assert sum(m["train/loss"] for m in rec.logs[-3:]) < sum(m["train/loss"] for m in rec.logs[:3])


def test_an_implicit_reward_model_continues_from_another_with_its_reference(tmp_path: Path, data_dir: Path,
                                                                           sft_model: Path) -> None:
    """A later round starts from the previous implicit reward model: the reward is still measured
    from SFT. A scalar reward model is no start for an implicit one (no trained LM head)."""
    first = train(_cfg(data_dir, tmp_path / "a", sft_model, kind="implicit", max_steps=2, eval_steps=0))
    second = _cfg(data_dir, tmp_path / "b", first["final_model_dir"], kind="implicit", max_steps=2, eval_steps=0)
    train(second)
    spec = json.loads((tmp_path / "b" / "final" / "implicit_reward.json").read_text())
    assert spec["reference_model"] == str(sft_model.resolve())
    scalar = train(_cfg(data_dir, tmp_path / "s", sft_model, max_steps=2, eval_steps=0))
    with pytest.raises(ConfigError, match="is a scalar reward model"):
        train(_cfg(data_dir, tmp_path / "c", scalar["final_model_dir"], kind="implicit", max_steps=2))


def test_mismatched_pairs_pair_each_prompt_with_another_prompts_chosen() -> None:
    rows = [{"prompt": p, "chosen": c, "rejected": "r"} for p, c in
            [("p1", "a"), ("p1", "b"), ("p2", "c"), ("p3", "c"), ("p4", "d")]]
    out = mismatched_pairs(rows, 1.0, seed=0)
    assert len(out) == 5  # round(1.0 * 5)
    for pair in out:
        own = [r for r in rows if r["prompt"] == pair["prompt"] and r["chosen"] == pair["chosen"]]
        assert own and pair["margin"] == 0.0
        # the rejected side is another prompt's chosen text, never this prompt's nor the same text
        assert pair["rejected"] in {r["chosen"] for r in rows if r["prompt"] != pair["prompt"]}
        assert pair["rejected"] != pair["chosen"]
    # every real row is used once at fraction 1 (a permutation), more than once above it
    assert sorted((p["prompt"], p["chosen"]) for p in out) == sorted((r["prompt"], r["chosen"]) for r in rows)
    assert len(mismatched_pairs(rows, 2.5, seed=0)) == 12 and len(mismatched_pairs(rows, 0.4, seed=0)) == 2
    assert mismatched_pairs(rows, 1.0, seed=0) == out  # seeded
    assert mismatched_pairs(rows[:2], 1.0, seed=0) == []  # one prompt: nothing to mismatch
    # two prompts with the same chosen text: no real mismatch exists, and the search ends
    assert mismatched_pairs(rows[2:4], 3.0, seed=0) == []
    # p2 and p3 share the text "c", so each can only be paired with p4's "d"
    three = mismatched_pairs(rows[2:], 1.0, seed=0)
    assert len(three) == 3
    assert {(p["prompt"], p["rejected"]) for p in three} == {("p2", "d"), ("p3", "d"), ("p4", "c")}
    assert mismatched_pairs(rows, 0.0, seed=0) == []


def test_mismatched_negatives_are_added_to_training_and_counted(tmp_path: Path, data_dir: Path,
                                                                sft_model: Path) -> None:
    rec = Recorder()
    summary = train(_cfg(data_dir, tmp_path / "rm", sft_model, mismatched_negatives=0.5, eval_steps=0), [rec])
    # 64 real pairs + round(0.5 * 64) = 96 pairs; batch 16, 3 epochs -> 18 steps
    assert (summary["train_preference_pairs"], summary["train_mismatched_pairs"], summary["train_pairs"]) == (
        64, 32, 96)
    assert summary["total_steps"] == 18 and summary["eval_pairs"] == 32  # the eval split gets none
    with pytest.raises(ConfigError, match="mismatched_negatives"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", mismatched_negatives=-0.5)


def test_candidates_train_each_value_and_ship_the_best_on_the_eval_split(
        tmp_path: Path, data_dir: Path, sft_model: Path) -> None:
    class Ends(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.ends: list[dict] = []

        def on_train_end(self, summary) -> None:
            self.ends.append(dict(summary))

    rec, out = Ends(), tmp_path / "rm"
    summary = train(_cfg(data_dir, out, sft_model, mismatched_negatives=[0.5, 0.0], eval_steps=0), [rec])
    subs = {f: json.loads((out / "candidates" / f"mismatched_{f:g}" / "summary.json").read_text()) for f in (0.5, 0.0)}
    # each candidate trained with its own value: 64 + 32 pairs and 64 pairs
    assert (subs[0.5]["train_pairs"], subs[0.0]["train_pairs"]) == (96, 64)
    best = 0.5 if subs[0.5]["eval/accuracy"] >= subs[0.0]["eval/accuracy"] else 0.0
    assert summary["mismatched_negatives"] == best
    assert summary["eval/accuracy"] == subs[best]["eval/accuracy"]
    assert summary["mismatched_0/eval/accuracy"] == subs[0.0]["eval/accuracy"]
    assert summary["final_model_dir"] == str(out / "final") and summary["output_dir"] == str(out)
    shipped = (out / "final" / "model.safetensors").read_bytes()
    assert shipped == (out / "candidates" / f"mismatched_{best:g}" / "final" / "model.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["mismatched_negatives"] == best
    # metrics arrive under each candidate's prefix; the stage ends once, with the selection
    assert {k.split("/")[0] for log in rec.logs for k in log} == {"mismatched_0.5", "mismatched_0"}
    assert [e["mismatched_negatives"] for e in rec.ends] == [best]


def test_candidate_selection_by_hand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accuracies 0.6, 0.7, 0.7 for values 0.5, 0, 1: the first of the two 0.7s is shipped."""
    from ppo_core import reward

    accuracy = {0.5: 0.6, 0.0: 0.7, 1.0: 0.7}
    budgets: list[float] = []
    clock = [0.0]  # each fake candidate takes 100 s of this clock

    def fake_train(self) -> dict:
        out, f = Path(self.cfg.output_dir), self.cfg.mismatched_negatives
        budgets.append(self.cfg.stopping.max_seconds)
        clock[0] += 100.0
        (out / "final").mkdir(parents=True)
        (out / "final" / "weights").write_text(str(f))
        summary = {"completed": True, "output_dir": str(out), "final_model_dir": str(out / "final"),
                   "eval/accuracy": accuracy[f], "eval/loss": 1.0, "runtime_s": 2.0, "stopped_reason": "completed"}
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    def fake_init(self, cfg, cbs=()) -> None:
        self.cfg, self.engine = cfg, None  # no DeepSpeed engine to free

    monkeypatch.setattr(reward.RewardTrainer, "__init__", fake_init)
    monkeypatch.setattr(reward.RewardTrainer, "train", fake_train)
    monkeypatch.setattr(reward, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    cfg = RewardConfig(data_dir="d", output_dir=str(tmp_path / "rm"), model_name_or_path="m", kind="scalar",
                       mismatched_negatives=(0.5, 0.0, 1.0), stopping=from_dict(
                           reward.StoppingConfig, {"patience": 0, "keep_best": False, "max_seconds": 3000}))
    summary = train(cfg)
    assert summary["mismatched_negatives"] == 0.0 and summary["eval/accuracy"] == 0.7
    assert (tmp_path / "rm" / "final" / "weights").read_text() == "0.0"
    assert summary["runtime_s"] == 6.0 and summary["candidate_dir"] == str(tmp_path / "rm" / "candidates" / "mismatched_0")
    assert [c["eval/accuracy"] for c in summary["candidates"]] == [0.6, 0.7, 0.7]
    # the budget is shared: a third of 3000 s, then half of the 2900 s left, then all of 2800 s
    assert budgets == [1000.0, 1450.0, 2800.0]


def test_candidates_resume_without_training_a_finished_one_again(tmp_path: Path, data_dir: Path,
                                                                 sft_model: Path) -> None:
    out = tmp_path / "rm"
    first = train(_cfg(data_dir, out, sft_model, mismatched_negatives=[0.5, 0.0], eval_steps=0,
                       save_steps=3, stop_after_steps=3))
    assert first["completed"] is False and first["candidate"] == "mismatched_0.5"
    assert not (out / "candidates" / "mismatched_0").exists()
    rec = Recorder()
    done = train(_cfg(data_dir, out, sft_model, mismatched_negatives=[0.5, 0.0], eval_steps=0,
                      resume_from="latest"), [rec])
    sub = json.loads((out / "candidates" / "mismatched_0.5" / "summary.json").read_text())
    assert sub["resumed_from_step"] == 3 and done["completed"] is True
    assert min(log["mismatched_0.5/train/epoch"] for log in rec.logs if "mismatched_0.5/train/epoch" in log) > 3 / 6
    # everything finished: a resume trains nothing and ships the same choice
    again = Recorder()
    (out / "summary.json").unlink()
    redo = train(_cfg(data_dir, out, sft_model, mismatched_negatives=[0.5, 0.0], eval_steps=0,
                      resume_from="latest"), [again])
    assert again.logs == [] and redo["mismatched_negatives"] == done["mismatched_negatives"]


def test_candidate_values_are_checked() -> None:
    for bad in ((), (0.5, 0.5), (0.5, -1.0), (0.1, 0.1000001)):  # the last two name one folder
        with pytest.raises(ConfigError, match="mismatched_negatives"):
            RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", mismatched_negatives=bad,
                         kind="scalar")
    with pytest.raises(ConfigError, match="resume with 'latest'"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", mismatched_negatives=(0.5, 0.0),
                     resume_from="o/checkpoints/step_3", kind="scalar")
    assert from_dict(RewardConfig, {"data_dir": "d", "output_dir": "o", "model_name_or_path": "m",
                                    "mismatched_negatives": 0.25}).mismatched_negatives == 0.25


def _eval_gaps(final: Path, data_dir: Path) -> torch.Tensor:
    """score(chosen) - score(rejected) of the saved scorer on every rm_eval pair."""
    import pandas as pd

    scorer = load_sequence_scorer(final)
    tok = load_tokenizer(final)
    df = pd.read_parquet(data_dir / "rm_eval.parquet")

    def scores(col: str) -> torch.Tensor:
        seqs = [encode_prompt_response(tok, p, r, 128).input_ids for p, r in zip(df.prompt, df[col])]
        ids, mask = pad_sequences(seqs, tok.pad_token_id)
        with torch.no_grad():
            return last_token_scores(scorer, ids, mask)

    return scores("chosen") - scores("rejected")


def test_margin_column_is_used(tmp_path: Path, data_dir: Path, sft_model: Path) -> None:
    """A large margin on every pair pushes chosen scores further above rejected ones."""
    import pandas as pd

    big = tmp_path / "data"
    big.mkdir()
    pd.read_parquet(data_dir / "rm_train.parquet").assign(margin=3.0).to_parquet(big / "rm_train.parquet")
    pd.read_parquet(data_dir / "rm_eval.parquet").to_parquet(big / "rm_eval.parquet")
    plain = train(_cfg(data_dir, tmp_path / "plain", sft_model, eval_steps=0))
    margin = train(_cfg(big, tmp_path / "margin", sft_model, eval_steps=0))
    assert margin["train/loss"] > plain["train/loss"]  # the same scores cost more with a margin
    ignored = train(_cfg(big, tmp_path / "ignored", sft_model, eval_steps=0, use_margin=False))
    assert math.isclose(ignored["train/loss"], plain["train/loss"], rel_tol=1e-6)


def test_bad_configs_fail_before_training(tmp_path: Path, data_dir: Path, sft_model: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = {"data_dir": str(data_dir), "output_dir": str(tmp_path / "o"), "model_name_or_path": str(sft_model)}
    cases = {
        "batch split": ({**base, "batch_size": 12, "micro_batch_size": 8}, "not divisible"),
        "params offload at stage 2": ({**base, "strategy": {"zero_stage": 2, "offload_params": True}},
                                      "offload_params=true needs ZeRO stage 3"),
        "unknown model": ({**base, "model_name_or_path": str(tmp_path / "nope")}, "does not exist"),
        "typo": ({**base, "center_coeff": 0.1}, "unknown key(s) ['center_coeff']"),
    }
    for name, (cfg, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert main(["--config", str(path)]) == 2, name
        assert message in capsys.readouterr().err, name
    assert not (tmp_path / "o" / "final").exists()
    with pytest.raises(ConfigError, match="center_coef"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", center_coef=-1.0)
    with pytest.raises(ConfigError, match=r"label_smoothing=0.5 must be in \[0, 0.5\)"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="label_smoothing=-0.1"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", label_smoothing=-0.1)
    with pytest.raises(ConfigError, match=r"dropout=1.0 must be in \[0, 1\)"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", dropout=1.0)
    with pytest.raises(ConfigError, match="kind='dpo': one of scalar, implicit"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", kind="dpo")
    with pytest.raises(ConfigError, match="beta=0.0 must be > 0"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", kind="implicit", beta=0.0)
    with pytest.raises(ConfigError, match="implicit reward model scores alone"):
        RewardConfig(data_dir="d", output_dir="o", model_name_or_path="m", kind="implicit",
                     mismatched_negatives=(0.5, 0.0))


def test_missing_column_names_the_file(tmp_path: Path, data_dir: Path, sft_model: Path) -> None:
    import pandas as pd

    bad = tmp_path / "data"
    bad.mkdir()
    pd.read_parquet(data_dir / "rm_train.parquet").drop(columns=["rejected"]).to_parquet(bad / "rm_train.parquet")
    pd.read_parquet(data_dir / "rm_eval.parquet").to_parquet(bad / "rm_eval.parquet")
    with pytest.raises(ValueError, match=r"rm_train.parquet: missing column\(s\) \['rejected'\]"):
        train(_cfg(bad, tmp_path / "o", sft_model))
    with pytest.raises(ModelLoadError):
        train(_cfg(data_dir, tmp_path / "o", tmp_path / "missing_model"))


def test_lora_reward_model_trains_head_and_adapters(tmp_path: Path, data_dir: Path,
                                                     sft_model: Path) -> None:
    """lora_rank > 0 on the RM: the score head (kept trainable by PEFT) and the adapted
    projections change, everything else keeps the SFT weights; final/ reloads as a scorer."""
    from safetensors.torch import load_file

    summary = train(_cfg(data_dir, tmp_path / "lora", sft_model, lora_rank=4,
                         strategy={"zero_stage": 0}))
    final = tmp_path / "lora" / "final"
    sft = load_file(sft_model / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert "score.weight" in after and not any("lora" in k for k in after)
    trunk = {k.removeprefix("model."): v for k, v in after.items() if k.startswith("model.")}
    changed = {k for k in trunk if not torch.equal(trunk[k], sft["model." + k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
                           for k in changed)
    # final/ reloads as a scorer whose held-out accuracy is the reported one
    gap = _eval_gaps(final, data_dir)
    assert math.isclose(float((gap > 0).float().mean()), summary["eval/accuracy"], abs_tol=1e-9)
