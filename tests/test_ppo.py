"""PPO engine: smoke runs, resume equivalence, bad configs, function rewards, 2-rank ZeRO-2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from assets import bundled_task as bt
from ppo_core.callbacks import Callback
from ppo_core.config import ConfigError, from_dict
from ppo_core.data import pad_sequences
from ppo_core.models import build_scorer_from_causal_lm, build_tiny_causal_lm, load_tokenizer, train_tokenizer
from ppo_core import ppo_utils as U
from ppo_core.generation import GenerationOutput
from ppo_core.ppo import (PPOConfig, PPOTrainer, Rollout, _select, main,
                          plan_length_groups, train)
from ppo_core.strategy import DeepSpeedStrategy, free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny tokenizer + policy + reward model and prompt files (random weights)."""
    root = tmp_path_factory.mktemp("ppo")
    prompts = bt.all_prompts()
    texts = prompts + [f"the {t} is {a} ." for t in bt.TOPICS for a in bt.ADJECTIVE_QUALITY]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=128)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rm = build_scorer_from_causal_lm(root / "policy", seed=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    pd.DataFrame({"prompt": prompts[:48]}).to_parquet(root / "train.parquet")
    pd.DataFrame({"prompt": prompts[300:308]}).to_parquet(root / "eval.parquet")
    return {"policy_path": str(root / "policy"), "reward_model_path": str(root / "rm"),
            "train_file": str(root / "train.parquet"), "eval_file": str(root / "eval.parquet"),
            "root": str(root)}


def small_cfg(tiny_run: dict[str, str], out: Path, **over) -> PPOConfig:
    base = {k: v for k, v in tiny_run.items() if k != "root"}
    base.update(output_dir=str(out), num_steps=2, rollout_batch_size=8, num_mini_batches=2,
                ppo_epochs=2, response_length=8, reward_norm_samples=8, save_every=0,
                strategy={"zero_stage": 0, "cpu_threads": 1})
    base.update(over)
    return from_dict(PPOConfig, base)


class Recorder(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.checkpoints: list[str] = []

    def on_log(self, step, metrics):
        self.logs.append(dict(metrics))

    def on_evaluate(self, step, metrics):
        self.evals.append(dict(metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append(path)


TRL_METRICS = ("objective/kl", "objective/entropy", "objective/scores", "policy/approxkl_avg",
               "policy/clipfrac_avg", "val/ratio", "eps", "val/explained_variance",
               "val/ended_frac", "time/generation", "time/scoring", "time/training")


def test_headroom_without_a_guard_widens_from_the_first_rollout(tiny_run, tmp_path):
    # no guard: the first rollout's KL (the starting policy, ~0 here) is the starting KL, so a
    # 0.5-nat ceiling with 1 nat of headroom becomes 1 + that KL; the controller aims 10% under
    rec = Recorder()
    cfg = small_cfg(tiny_run, tmp_path / "out", save_every=2, kl_ceiling=0.5, kl_ceiling_headroom=1.0)
    train(cfg, [rec])
    widened = [log["objective/kl_ceiling"] for log in rec.logs if "objective/kl_ceiling" in log]
    assert widened == [pytest.approx(1.0 + rec.logs[0]["objective/kl"])]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["extra"]["kl_controller"]["target"] == pytest.approx(0.9 * widened[0])


def test_smoke_run_logs_metrics_and_saves(tiny_run, tmp_path):
    rec = Recorder()
    cfg = small_cfg(tiny_run, tmp_path / "out", save_every=1)
    summary = train(cfg, [rec])
    assert len(rec.logs) == 2
    for key in TRL_METRICS:
        assert key in rec.logs[-1], key
        assert rec.logs[-1][key] == rec.logs[-1][key] or key == "val/explained_variance", key
    # a fraction of the rollout's 8 episodes (tests/test_ppo_rollout.py checks it by hand)
    assert rec.logs[-1]["val/ended_frac"] * 8 == rec.logs[-1]["val/num_eos_tokens"]
    # gradient norms are measured at every ZeRO stage (DeepSpeed reports none at stage 0)
    assert rec.logs[-1]["policy/grad_norm"] > 0 and rec.logs[-1]["val/grad_norm"] > 0
    # first step: policy == reference and logprobs come from the same weights
    assert abs(rec.logs[0]["objective/kl"]) < 1e-3
    assert rec.evals and "eval/scores" in rec.evals[-1]
    final = Path(summary["final_dir"])
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["step"] == 2
    assert [Path(p).name for p in rec.checkpoints] == ["step_1", "step_2"]
    state = json.loads((Path(rec.checkpoints[-1]) / "trainer_state.json").read_text())
    assert state["stage"] == "ppo" and state["step"] == 2
    assert {"kl_controller", "reward_normalizer", "generators_by_rank"} <= set(state["extra"])
    assert not list((tmp_path / "out" / "checkpoints").glob("*.tmp-*"))
    # weights moved away from the initial policy
    before = load_file(Path(tiny_run["policy_path"]) / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _ragged_rollout(trainer: PPOTrainer, seed: int = 0) -> Rollout:
    """A rollout whose prompts and responses have very different lengths (random tokens and
    stored statistics: the test compares two ways of computing the same losses)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 8, 12
    prompts = [trainer.prompt_ids[i][: 2 + 3 * (i % 4)] for i in range(B)]
    ids, mask = pad_sequences(prompts, trainer.pad_id, side="left")
    lengths = torch.tensor([1, 12, 3, 5, 2, 9, 4, 6])
    response_mask = torch.arange(T)[None, :] < lengths[:, None]
    responses = torch.randint(3, 200, (B, T), generator=g).masked_fill(~response_mask, trainer.pad_id)
    gen = GenerationOutput(sequences=torch.cat([ids, responses], 1),
                           attention_mask=torch.cat([mask, response_mask.long()], 1),
                           responses=responses, response_mask=response_mask,
                           ended=lengths < T, logprobs=None, prompt_length=ids.shape[1])
    m = response_mask.float()
    stats = [torch.randn(B, T, generator=g) * m for _ in range(4)]
    logprobs = -torch.rand(B, T, generator=g) * m
    return Rollout(gen, logprobs, logprobs, stats[0], torch.zeros(B), torch.zeros(B),
                   torch.zeros(B, T), stats[1], stats[2], stats[3])


def _losses(trainer: PPOTrainer, ro: Rollout, idx: torch.Tensor, trim: bool) -> dict[str, torch.Tensor]:
    """Policy and value loss of mini-batch ``idx`` and their gradients (flattened)."""
    b = _select(ro, idx, trim=trim)
    actor, critic = trainer.actor.module, trainer.critic.module
    for model in (actor, critic):
        model.zero_grad(set_to_none=True)
    logp, ent = trainer.policy_logprobs(actor, b.gen, with_entropy=True)
    pg, _ = U.policy_loss(logp, b.logprobs, b.advantages, b.gen.response_mask)
    vf, _ = U.value_loss(trainer.critic_values(critic, b.gen), b.values, b.returns, b.gen.response_mask)
    (pg + vf).backward()
    grads = torch.cat([p.grad.flatten() for m in (actor, critic) for p in m.parameters()
                       if p.grad is not None])
    return {"pg": pg.detach(), "vf": vf.detach(), "grads": grads,
            "entropy": U.masked_mean(ent, b.gen.response_mask)}


def test_packed_trimmed_and_grouped_forwards_equal_one_padded_forward(tiny_run, tmp_path):
    """Losses, gradients, entropy, reference log-probs and RM scores are the same whether a
    batch runs as one padded forward, trimmed, in length groups or packed."""
    cfg = small_cfg(tiny_run, tmp_path / "t", normalize_reward=False)
    trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
    assert trainer.packing                    # the tiny Llama passes supports_packing
    ro = _ragged_rollout(trainer)
    idx = torch.tensor([0, 2, 4, 6])      # short responses: trimming drops columns
    b = _select(ro, idx)
    assert b.gen.responses.shape[1] == 4 < ro.gen.responses.shape[1]
    assert b.gen.sequences.shape[1] < ro.gen.sequences.shape[1]
    trainer.packing, trainer.max_forward_groups = False, 1
    full = _losses(trainer, ro, idx, trim=False)
    trimmed = _losses(trainer, ro, idx, trim=True)
    trainer.max_forward_groups, trainer.forward_overhead_positions = 4, 1
    assert len(trainer.length_groups(ro.gen)) > 1    # the whole ragged batch is split
    everything = torch.arange(8)
    grouped_full = _losses(trainer, ro, everything, trim=True)
    grouped_scores = [trainer.raw_scores([], ro.gen)[0],
                     trainer.policy_logprobs(trainer.ref, ro.gen)[0] * ro.gen.response_mask]
    trainer.max_forward_groups = 1
    single_full = _losses(trainer, ro, everything, trim=False)
    single_scores = [trainer.raw_scores([], ro.gen)[0],
                     trainer.policy_logprobs(trainer.ref, ro.gen)[0] * ro.gen.response_mask]
    trainer.packing = True
    packed_full = _losses(trainer, ro, everything, trim=True)
    packed_scores = [trainer.raw_scores([], ro.gen)[0],
                     trainer.policy_logprobs(trainer.ref, ro.gen)[0] * ro.gen.response_mask]
    assert trainer.layout(ro.gen).positions < ro.gen.attention_mask.numel()
    for a, b_ in ((full, trimmed), (single_full, grouped_full), (single_full, packed_full)):
        for key in a:
            torch.testing.assert_close(a[key], b_[key], atol=1e-5, rtol=1e-5)
    for a, b_ in zip(single_scores + single_scores, grouped_scores + packed_scores):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


def test_parallel_critic_gives_the_same_run(tiny_run, tmp_path):
    over = dict(num_steps=2, eval_file=None)
    runs = {}
    for parallel in (False, True):
        rec = Recorder()
        summary = train(small_cfg(tiny_run, tmp_path / str(parallel), parallel_critic=parallel,
                                  **over), [rec])
        runs[parallel] = (load_file(Path(summary["final_dir"]) / "model.safetensors"), rec.logs)
    (seq, seq_logs), (par, par_logs) = runs[False], runs[True]
    for k in seq:
        torch.testing.assert_close(seq[k], par[k], rtol=0, atol=0)
    for key in ("loss/value_avg", "val/clipfrac_avg", "loss/policy_avg", "objective/scores"):
        assert seq_logs[-1][key] == par_logs[-1][key], key


def test_parallel_critic_refused_under_torchrun(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="parallel_critic needs a single process"):
        small_cfg(tiny_run, tmp_path / "p", parallel_critic=True)


def test_strategy_seed_is_refused_because_ppo_seeds_from_its_own(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="strategy.seed .7. is not read by PPO"):
        small_cfg(tiny_run, tmp_path / "s", strategy={"zero_stage": 0, "cpu_threads": 1, "seed": 7})
    assert small_cfg(tiny_run, tmp_path / "s", seed=7).seed == 7


def test_plan_length_groups_covers_rows_and_separates_outliers():
    prompts = [4] * 8
    responses = [2, 3, 2, 60, 3, 2, 61, 2]
    groups = plan_length_groups(prompts, responses, max_groups=4, overhead_positions=16)
    rows = torch.cat(groups).tolist()
    assert sorted(rows) == list(range(8))
    assert any(set(g.tolist()) == {3, 6} for g in groups)   # the two long rows together
    # equal lengths: one forward is cheapest
    assert len(plan_length_groups([5] * 6, [7] * 6)) == 1
    with pytest.raises(ValueError, match="same non-zero number"):
        plan_length_groups([1, 2], [3])


class StopAt(Callback):
    """Simulates a crash right after a checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_checkpoint(self, step, path):
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_the_same_trajectory(tiny_run, tmp_path):
    over = dict(num_steps=4, save_every=2, kl_target=0.5, eval_file=None)
    straight = train(small_cfg(tiny_run, tmp_path / "a", **over), [Recorder()])
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tiny_run, tmp_path / "b", **over), [StopAt(2)])
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(small_cfg(tiny_run, tmp_path / "b", resume_from="latest", **over), [Recorder()])
    a = load_file(Path(straight["final_dir"]) / "model.safetensors")
    b = load_file(Path(resumed["final_dir"]) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert resumed["objective/kl_coef"] == pytest.approx(straight["objective/kl_coef"])
    assert resumed["episode"] == straight["episode"] == 32
    assert resumed["resumed_from_step"] == 2 and "resumed_from_step" not in straight


def test_a_resumed_guard_pairs_only_the_same_prompts(tiny_run, tmp_path):
    """A resume with the same held-out prompts keeps the per-response values (the points still
    pair); one with the prompts reordered drops the earlier points' values."""
    over = dict(num_steps=4, save_every=2, eval_file=tiny_run["eval_file"], guard_every=1, guard_prompts=8,
                guard_reward_model_path=tiny_run["reward_model_path"], guard_patience=0)
    for name, reorder in (("same", False), ("reordered", True)):
        out = tmp_path / name
        with pytest.raises(KeyboardInterrupt):
            train(small_cfg(tiny_run, out, **over), [StopAt(2)])
        eval_file = tiny_run["eval_file"]
        if reorder:
            eval_file = str(tmp_path / "eval_reordered.parquet")
            pd.read_parquet(tiny_run["eval_file"]).iloc[::-1].to_parquet(eval_file)
        cfg = small_cfg(tiny_run, out, resume_from="latest", **{**over, "eval_file": eval_file})
        trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
        try:
            trainer.load_checkpoint(str(out / "checkpoints" / "step_2"))
            points = trainer.guard.points
        finally:
            trainer.close()
        assert [p.step for p in points] == [0, 1, 2]
        assert all(len(p.heldout_values) == (0 if reorder else 8) for p in points)


def test_function_reward_and_critic_from_policy(tiny_run, tmp_path, monkeypatch):
    rollouts: list[Rollout] = []
    real_rollout = PPOTrainer.rollout
    monkeypatch.setattr(PPOTrainer, "rollout",
                        lambda self: rollouts.append(real_rollout(self)) or rollouts[-1])
    rec = Recorder()
    cfg = small_cfg(tiny_run, tmp_path / "f", reward_model_path=None,
                    reward_function="assets.bundled_task:gold_score_batch", kl_estimator="k3",
                    lora_rank=4)
    summary = train(cfg, [rec])
    assert len(rollouts) == len(rec.logs) == 2
    for ro, log in zip(rollouts, rec.logs):
        m = ro.gen.response_mask
        # k3 of the run's own log-probs: exp(log_r) - 1 - log_r, log_r = ref - policy
        # (relative tolerance only: after a few LoRA steps the per-token KL is ~1e-6)
        log_r = (ro.ref_logprobs - ro.logprobs) * m
        torch.testing.assert_close(ro.kl, (torch.expm1(log_r) - log_r) * m, rtol=1e-5, atol=1e-12)
        assert log["objective/kl"] == pytest.approx(float(ro.kl.sum(1).mean()), rel=1e-6, abs=1e-9)
        # scores: the summary's normalisation, then the missing-EOS penalty 1.0, clip +-10
        norm = (ro.raw_scores - summary["reward_norm/mean"]) / summary["reward_norm/std"]
        torch.testing.assert_close(ro.scores, (norm - (~ro.gen.ended).float()).clamp(-10, 10))
    # the first rollout samples the reference itself (LoRA adapters start at zero); the
    # second one a policy that moved, so the comparison above was not between zeros
    assert rollouts[0].kl.abs().max() < 1e-5 and rollouts[1].kl.max() > 0
    assert (Path(summary["final_dir"]) / "model.safetensors").is_file()


def test_cpu_threads_applied_once(tiny_run, tmp_path):
    """``strategy.cpu_threads`` is the one thread setting: the first ``setup_distributed`` (the
    trainer's) applies it, and later calls (``prepare_train`` / ``prepare_eval``) must not undo
    a count set in between."""
    before = torch.get_num_threads()
    try:
        cfg = small_cfg(tiny_run, tmp_path / "n", strategy={"zero_stage": 0, "cpu_threads": 2})
        trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        trainer.strategy.setup_distributed()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"num_mini_batches": 3}, "not divisible by num_mini_batches"),
        ({"reward_function": "assets.bundled_task:gold_score_batch"}, "exactly one of"),
        ({"reward_model_path": None}, "exactly one of"),
        ({"reward_model_path": None, "reward_function": "no_colon"}, "module:function"),
        ({"temperature": 0.0}, "temperature"),
        ({"clip_range": -1.0}, "clip_range"),
        ({"pack_capacity": -1}, "pack_capacity=-1: set it >= 1"),
    ],
)
def test_bad_config_fails_before_training(tiny_run, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        small_cfg(tiny_run, tmp_path / "x", **over)


def test_main_reports_bad_files_and_keys(tiny_run, tmp_path, capsys):
    cfg = {k: v for k, v in tiny_run.items() if k != "root"}
    cfg.update(output_dir=str(tmp_path / "o"), train_file=str(tmp_path / "missing.parquet"))
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path)]) == 2
    assert "missing.parquet" in capsys.readouterr().err
    cfg.update(train_file=tiny_run["train_file"], learning_rte=1.0)
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path)]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_bad_reward_function_module_named(tiny_run, tmp_path):
    cfg = small_cfg(tiny_run, tmp_path / "r", reward_model_path=None,
                    reward_function="no_such_module_xyz:score")
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        train(cfg, [Recorder()])


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to python")
@pytest.mark.parametrize("stage", [2, 3])
def test_torchrun_two_ranks(tiny_run, tmp_path, stage):
    """2 ranks under torchrun. ZeRO-3 shards every model, so its forwards are collective:
    ranks whose responses end at different steps must still run the same forwards."""
    cfg = {k: v for k, v in tiny_run.items() if k != "root"}
    cfg.update(output_dir=str(tmp_path / "ddp"), num_steps=2, rollout_batch_size=4,
               num_mini_batches=1, ppo_epochs=1, response_length=6, reward_norm_samples=8,
               save_every=2, strategy={"zero_stage": stage, "cpu_threads": 1})
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    port = str(free_port())  # torchrun passes --master-port 0 to the workers verbatim
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m",
                           "ppo_core.ppo", "--config", str(path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["episode"] == 2 * 4 * 2   # 2 steps x 4 x 2 ranks
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == stage
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("heldout, se, kl, select, kept", [
    # a clear peak at step 2 (SE 0.01): the best-scoring checkpoint is kept
    ({0: 0.0, 1: 0.2, 2: 0.5, 3: 0.1, 4: 0.0}, 0.01, None, "latest", 2),
    # step 1 scores 0.4, within one SE (0.2) of step 2's 0.5, at half its KL: the
    # one-standard-error rule keeps step 1; the band's latest is step 2 itself
    ({0: 0.0, 1: 0.4, 2: 0.5, 3: 0.1, 4: 0.0}, 0.2, {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}, "least_kl", 1),
    ({0: 0.0, 1: 0.4, 2: 0.5, 3: 0.1, 4: 0.0}, 0.2, {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}, "latest", 2),
])
def test_guard_keeps_the_heldout_selected_checkpoint(tiny_run, tmp_path, monkeypatch, heldout, se, kl, select,
                                                     kept):
    """The guard's real evaluation runs (samples, KL, both reward models); its held-out means
    (and, in the second case, KLs) are then replaced by a scripted curve, so the kept checkpoint
    is known: final/ must hold exactly the weights of a plain run of that many steps (constant
    LR, same seed). Both curves stop at step 4: steps 3 and 4 fall more than one SE of the
    difference below the best (patience 2)."""
    import dataclasses

    real = PPOTrainer.guard_point

    def scripted(self):
        point, rows = real(self)
        # the real point carries every response's values, in the rows' order
        assert list(point.heldout_values) == [r["heldout"] for r in rows] and len(rows) == 8
        assert list(point.kl_values) == [r["kl"] for r in rows]
        # scripted means come without values: the guard then compares them as independent
        over = {"kl": kl[point.step], "kl_se": 0.1, "kl_values": ()} if kl else {}
        return dataclasses.replace(point, heldout=heldout[point.step], heldout_se=se, heldout_values=(),
                                   **over), rows

    monkeypatch.setattr(PPOTrainer, "guard_point", scripted)
    over = dict(lr_scheduler="constant", eval_file=tiny_run["eval_file"], guard_prompts=8)
    rec = Recorder()
    guarded = train(small_cfg(tiny_run, tmp_path / "g", num_steps=6, guard_every=1, guard_patience=2,
                              guard_select=select, guard_reward_model_path=tiny_run["reward_model_path"],
                              **over), [rec])
    assert guarded["step"] == 4 and guarded["kept_step"] == kept
    assert guarded["stopped_reason"] in ("overoptimization", "decline")
    assert guarded["guard/kept_step"] == kept and guarded["guard/best_step"] == 2
    assert guarded["guard/improved"] == 1.0
    assert guarded["guard/heldout_gain"] == pytest.approx(heldout[kept])
    points = [e for e in rec.evals if "guard/heldout" in e]
    assert [p["guard/heldout"] for p in points] == [heldout[s] for s in range(5)]
    if kl is None:
        # step 0 samples the reference itself: the KL to it is zero up to float error
        assert points[0]["guard/kl_per_response"] == pytest.approx(0.0, abs=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "g" / "guard_samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 3, 4] and len(rows) == 5 * 8
    assert not (tmp_path / "g" / "best").exists()

    monkeypatch.setattr(PPOTrainer, "guard_point", real)
    plain = train(small_cfg(tiny_run, tmp_path / "p", num_steps=kept, **over), [Recorder()])
    a = load_file(Path(guarded["final_dir"]) / "model.safetensors")
    b = load_file(Path(plain["final_dir"]) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_standardized_mean_by_hand():
    from ppo_core.rewards import standardized_mean

    raw = torch.tensor([[1.0, 3.0], [10.0, 30.0]])
    # member 0: (1 - 2) / 1, (3 - 2) / 1; member 1: (10 - 20) / 10, (30 - 20) / 10 -> both -1, 1
    out = standardized_mean(raw, torch.tensor([2.0, 20.0]), torch.tensor([1.0, 10.0]))
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]))
    out = standardized_mean(raw, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 10.0]))
    torch.testing.assert_close(out, torch.tensor([(1 + 1) / 2, (3 + 3) / 2]))


def _second_rm(tiny_run) -> str:
    path = Path(tiny_run["root"]) / "rm2"
    if not path.is_dir():
        rm = build_scorer_from_causal_lm(tiny_run["policy_path"], seed=2)
        rm.save_pretrained(path)
        load_tokenizer(tiny_run["policy_path"]).save_pretrained(path)
    return str(path)


def test_an_ensemble_standardises_each_member_on_reference_samples(tiny_run, tmp_path):
    """Two copies of one reward model score exactly as it does once both are normalised; a
    second model enters through its own reference mean and std."""
    rm, rm2 = tiny_run["reward_model_path"], _second_rm(tiny_run)
    trainers = []
    for name, paths in (("one", rm), ("two", [rm, rm]), ("pair", [rm, rm2])):
        cfg = small_cfg(tiny_run, tmp_path / name, reward_model_path=paths)
        trainers.append(PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy)))
        trainers[-1].fit_normalizer()
    single, twice, pair = trainers
    ro = _ragged_rollout(single)
    raw = single.raw_scores([], ro.gen)[0]
    ended = torch.ones_like(raw, dtype=torch.bool)
    # standardising a member, then normalising the result, is normalising it once
    lengths = ro.gen.response_mask.sum(1)
    torch.testing.assert_close(twice.shape_scores(twice.raw_scores([], ro.gen)[0], ended, lengths),
                               single.shape_scores(raw, ended, lengths), atol=1e-5, rtol=1e-5)
    members = pair.member_scores(ro.gen)                                 # (2, B)
    torch.testing.assert_close(members[0], raw)
    mean, std = pair.reward.mean.float(), pair.reward.std.float()
    torch.testing.assert_close(mean[0], torch.tensor(single.normalizer.mean, dtype=torch.float32))
    expected = ((members - mean[:, None]) / std[:, None]).mean(0)
    torch.testing.assert_close(pair.raw_scores([], ro.gen)[0], expected, atol=1e-5, rtol=1e-5)
    assert len(pair.reward_members()) == 2 and len(single.reward_members()) == 1


def test_an_ensemble_run_resumes_with_its_member_statistics(tiny_run, tmp_path):
    rms = [tiny_run["reward_model_path"], _second_rm(tiny_run)]
    over = dict(num_steps=4, save_every=2, eval_file=None, reward_model_path=rms)
    straight = train(small_cfg(tiny_run, tmp_path / "a", **over), [Recorder()])
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tiny_run, tmp_path / "b", **over), [StopAt(2)])
    resumed = train(small_cfg(tiny_run, tmp_path / "b", resume_from="latest", **over), [Recorder()])
    a = load_file(Path(straight["final_dir"]) / "model.safetensors")
    b = load_file(Path(resumed["final_dir"]) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the summary carries the members' weights for the evaluation report, the same after a resume
    assert straight["reward_ensemble"]["paths"] == rms
    assert straight["reward_ensemble"]["std"] == pytest.approx(resumed["reward_ensemble"]["std"])
    assert all(s > 0 for s in straight["reward_ensemble"]["std"])
    # the checkpoint carries the members' statistics: one saved without them cannot resume an ensemble
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(tiny_run, tmp_path / "c", **{**over, "reward_model_path": rms[0]}), [StopAt(2)])
    with pytest.raises(ConfigError, match="without a reward ensemble"):
        train(small_cfg(tiny_run, tmp_path / "c", resume_from="latest", **over), [Recorder()])
    # and one trained against these members in this order resumes only with them, and only as an ensemble
    with pytest.raises(ConfigError, match="trained against a reward ensemble"):
        train(small_cfg(tiny_run, tmp_path / "b", resume_from="latest",
                        **{**over, "reward_model_path": rms[0]}), [Recorder()])
    with pytest.raises(ConfigError, match="trained against the reward ensemble"):
        train(small_cfg(tiny_run, tmp_path / "b", resume_from="latest",
                        **{**over, "reward_model_path": rms[::-1]}), [Recorder()])
    with pytest.raises(ConfigError, match="empty list"):
        small_cfg(tiny_run, tmp_path / "d", reward_model_path=[])


def _implicit_rm(tiny_run, reference: str) -> str:
    """An implicit reward model: another tiny LM on the policy's tokenizer, whose
    implicit_reward.json names ``reference`` and beta 0.5."""
    path = Path(tiny_run["root"]) / f"implicit_{Path(reference).name}"
    if not path.is_dir():
        tok = load_tokenizer(tiny_run["policy_path"])
        torch.manual_seed(3)
        build_tiny_causal_lm(tok, n_layer=1, n_embd=32, n_head=2, n_positions=128).save_pretrained(path)
        tok.save_pretrained(path)
        (path / "implicit_reward.json").write_text(json.dumps({"beta": 0.5, "reference_model": reference}))
    return str(path)


def test_kl_coef_default_follows_the_reward_model_kind(tiny_run, tmp_path):
    """Left unset, kl_coef is TRL's 0.05 for a scalar reward model or a reward function and 0.1
    for an implicit one; a value the user sets is kept whatever the kind."""
    implicit = _implicit_rm(tiny_run, str(Path(tiny_run["policy_path"]).resolve()))
    assert small_cfg(tiny_run, tmp_path / "s").kl_coef == 0.05
    assert small_cfg(tiny_run, tmp_path / "i", reward_model_path=implicit).kl_coef == 0.1
    assert small_cfg(tiny_run, tmp_path / "l", reward_model_path=[implicit]).kl_coef == 0.1
    assert small_cfg(tiny_run, tmp_path / "u", reward_model_path=implicit, kl_coef=0.02).kl_coef == 0.02
    assert small_cfg(tiny_run, tmp_path / "z", reward_model_path=implicit, kl_coef=0.0).kl_coef == 0.0
    assert small_cfg(tiny_run, tmp_path / "f", reward_model_path=None,
                     reward_function="assets.bundled_task:gold_score_batch").kl_coef == 0.05


def test_an_implicit_reward_model_scores_the_response_log_ratio(tiny_run, tmp_path):
    """PPO scores beta x (log p_rm - log p_ref) over each response's own tokens, row by row as
    an unpadded forward computes it; the reference is PPO's own when the paths agree, and the
    critic starts from the policy (there is no scalar head to start from)."""
    from ppo_core.models import load_causal_lm
    from ppo_core.rewards import ImplicitReward

    policy = tiny_run["policy_path"]
    rm = _implicit_rm(tiny_run, str(Path(policy).resolve()))
    cfg = small_cfg(tiny_run, tmp_path / "i", reward_model_path=rm, guard_reward_model_path=rm)
    trainer = PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))
    assert isinstance(trainer.reward, ImplicitReward) and trainer.reward.ref is trainer.ref
    assert isinstance(trainer.guard_rm, ImplicitReward) and trainer.reward_members() == []
    head = [v for k, v in trainer.critic.module.state_dict().items() if k.startswith("score")][0]
    assert head.std() < 1.5 / 32 ** 0.5  # a fresh head (std 1/sqrt(h+1)), not a trained one
    ro = _ragged_rollout(trainer)
    raw, _ = trainer.raw_scores(["p"] * 8, ro.gen)
    lm, ref = load_causal_lm(rm).eval(), load_causal_lm(policy).eval()
    expected = []
    for row in range(8):
        real = ro.gen.sequences[row][ro.gen.attention_mask[row].bool()]
        n_resp = int(ro.gen.response_mask[row].sum())
        with torch.no_grad():
            lp = [torch.log_softmax(m(real[None]).logits[0, :-1], -1).gather(1, real[1:, None])[-n_resp:].sum()
                  for m in (lm, ref)]
        expected.append(0.5 * float(lp[0] - lp[1]))
    torch.testing.assert_close(raw, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # another reference directory: a model of its own
    other = Path(tiny_run["root"]) / "ref_copy"
    if not other.is_dir():
        shutil.copytree(policy, other)
    cfg = small_cfg(tiny_run, tmp_path / "o", reward_model_path=_implicit_rm(tiny_run, str(other)))
    assert PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy)).reward.ref is not None
    with pytest.raises(ConfigError, match="scores alone"):
        cfg = small_cfg(tiny_run, tmp_path / "e", reward_model_path=[rm, tiny_run["reward_model_path"]])
        PPOTrainer(cfg, DeepSpeedStrategy(cfg.strategy))


def test_an_implicit_reward_run_trains_and_guards(tiny_run, tmp_path):
    rm = _implicit_rm(tiny_run, str(Path(tiny_run["policy_path"]).resolve()))
    summary = train(small_cfg(tiny_run, tmp_path / "r", reward_model_path=rm, guard_reward_model_path=rm,
                              guard_every=1, guard_prompts=8))
    assert summary["step"] == 2 and (Path(summary["final_dir"]) / "model.safetensors").is_file()
    assert summary["reward_norm/std"] > 0 and summary["guard/evaluations"] == 3  # steps 0, 1, 2
