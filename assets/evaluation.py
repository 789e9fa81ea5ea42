"""``evaluation_report``: SFT against PPO on held-out prompts, and the ``ppo_beats_sft`` gate.

Both policies answer every prompt of ``test_prompts.parquet`` (sampled, same seed). Each
answer is scored by the reward model, by the held-out reward model (trained on pairs PPO never
saw, the guard's signal), by the gold scorer when the data has one, against the
``chosen`` response of ``test_pairs.parquet`` (ROUGE-L F1), and by length and whether it ended
with EOS. KL to the reference is the per-token mean of ``logp_ppo - logp_sft`` on PPO's own
samples (SFT is PPO's reference policy), the same estimator PPO's KL penalty uses
(Ziegler et al. 2019; TRL's ``objective/kl``).

Win rates, the reward model's gold agreement and the KL carry standard errors (``<metric>_se``)
that count the answers (or pairs) of one prompt as one cluster: on a small test split the
prompts, not the samples, are what the numbers average over.
"""


import functools
import json
import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.ingest import content_hash
from assets.models import model_dir_version
from assets.plots import guard_plot, png_markdown
from resources import settings
from resources.mlflow_models import EVAL, SplitInput, log_datasets, model_metrics, split_inputs
from resources.tracking import MLflowResource

BUNDLED_GOLD_SCORER = "assets.bundled_task:gold_score_batch"
# Bumped by hand when a change here changes the report for the same inputs (see assets/data.py).
EVALUATION_REPORT_VERSION = "7"
GoldScorer = Callable[[list[str], list[str]], list[float]]


# ---------------------------------------------------------------- pure metrics
@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer  # imports nltk (~1 s): only when a report needs it

    # no stemming: rouge-score's own default (use_stemmer=False)
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) exactly as Google's ``rouge-score`` computes it: its tokenizer
    lower-cases, turns every non-alphanumeric character into a space and splits on whitespace
    (so "Nice." and "nice" match); LCS precision and recall, F with beta = 1."""
    return float(_rouge_l_scorer().score(reference, candidate)["rougeL"].fmeasure)


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of items where ``a`` beats ``b``; a tie counts half (AlpacaEval's convention)."""
    if len(a) != len(b):
        raise ValueError(f"win_rate: {len(a)} scores against {len(b)}")
    if not a:
        return float("nan")
    return sum(wins(a, b)) / len(a)


def mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else float("nan")


def load_gold_scorer(spec: str) -> GoldScorer:
    """``"package.module:function"`` -> the function ``(prompts, responses) -> list[float]``.

    The same loader as PPO's rule-based rewards (``ppo_core.rewards.load_function``)."""
    from ppo_core.rewards import load_function

    try:
        return load_function(spec)
    except ValueError as exc:
        raise ValueError(f"gold_scorer: {exc} (e.g. '{BUNDLED_GOLD_SCORER}')") from exc


def resolve_gold_scorer(configured: str, data_source: str | None) -> str | None:
    """The scorer to use: the configured one, ``none`` for none, else the bundled one on bundled data."""
    spec = configured.strip()
    if spec.lower() == "none":
        return None
    if spec:
        return spec
    return BUNDLED_GOLD_SCORER if (data_source or "").strip().lower() == "bundled" else None


def policy_metrics(
    responses: Sequence[str],
    rm_scores: Sequence[float],
    lengths: Sequence[int],
    ended: Sequence[bool],
    references: Sequence[str | None],
    gold: Sequence[float] | None,
    heldout: Sequence[float] | None = None,
) -> dict[str, float]:
    """Headline numbers of one policy's answers."""
    refs = [(r, ref) for r, ref in zip(responses, references) if ref is not None]
    out = {
        "rm_score_mean": mean(rm_scores),
        "length_mean": mean(lengths),
        "ended_eos_frac": mean([1.0 if e else 0.0 for e in ended]),
        "rouge_l_mean": mean([rouge_l(r, ref) for r, ref in refs]) if refs else float("nan"),
    }
    if heldout is not None:
        out["heldout_score_mean"] = mean(heldout)
    if gold is not None:
        out["gold_mean"] = mean(gold)
    return out


def clustered_se(values: Sequence[float], groups: Sequence[Hashable]) -> float:
    """Standard error of ``mean(values)`` when values of one group (the answers to one prompt,
    the pairs of one prompt) are correlated: the cluster-robust CR1 estimator (Cameron & Miller
    2015, "A Practitioner's Guide to Cluster-Robust Inference", eq. 11),
    ``sqrt(G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2) / n`` over ``G`` groups and ``n``
    values. One value per group gives the usual ``s / sqrt(n)``. NaN under two groups."""
    if len(values) != len(groups):
        raise ValueError(f"clustered_se: {len(values)} values against {len(groups)} groups")
    sums: dict[Hashable, float] = {}
    m = mean(values)
    for v, g in zip(values, groups):
        sums[g] = sums.get(g, 0.0) + float(v) - m
    n_groups = len(sums)
    if n_groups < 2:
        return float("nan")
    return math.sqrt(n_groups / (n_groups - 1) * sum(d * d for d in sums.values())) / len(values)


def wins(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per item: 1 where ``a`` beats ``b``, 0.5 on a tie, 0 otherwise (``win_rate`` is their mean)."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def compare(sft: dict[str, list], ppo: dict[str, list], prompts: Sequence[str] | None = None) -> dict[str, float]:
    """PPO-against-SFT win rates: by RM score and, when present, by held-out RM and gold score.
    With ``prompts`` (the prompt of each answer), each win rate gets its standard error
    (``<name>_se``), answers to the same prompt counted as one cluster."""
    out: dict[str, float] = {}
    for key in ("rm", "heldout", "gold"):
        if ppo.get(key) is None or sft.get(key) is None:
            continue
        out[f"win_rate_{key}"] = win_rate(ppo[key], sft[key])
        if prompts is not None:
            out[f"win_rate_{key}_se"] = clustered_se(wins(ppo[key], sft[key]), prompts)
    return out


def samples_markdown(df: pd.DataFrame, n: int) -> str:
    """A markdown table of the first ``n`` samples (cells shortened, pipes escaped)."""
    def cell(v: Any) -> str:
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 120 else text[:117] + "..."

    cols = [c for c in ("prompt", "sft_response", "ppo_response", "sft_rm", "ppo_rm", "sft_heldout", "ppo_heldout",
                        "sft_gold", "ppo_gold")
            if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row[c]) for c in cols) + " |" for _, row in df.head(n).iterrows()]
    return "\n".join(lines)


def json_safe(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in d.items()}



# ---------------------------------------------------------------- model side
def generate(model_dir: str, prompts: list[str], cfg: "EvaluationConfig") -> dict[str, list]:
    """Sample one answer per prompt; returns responses, token ids, lengths and whether EOS ended them."""
    import torch

    from ppo_core import generation, models
    from ppo_core.data import encode_prompt, pad_sequences

    tok = models.load_tokenizer(model_dir)
    model = models.load_causal_lm(model_dir).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, list] = {"responses": [], "lengths": [], "ended": [], "ids": []}
    for i in range(0, len(prompts), cfg.batch_size):
        # prompts encoded as SFT and PPO encode them (BOS / chat template as the tokenizer
        # defines them, ppo_core.data), left-padded as generation.sample takes them
        prompt_ids, prompt_mask = pad_sequences(
            [encode_prompt(tok, p) for p in prompts[i : i + cfg.batch_size]], tok.pad_token_id, side="left")
        res = generation.sample(
            model, prompt_ids, prompt_mask, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            temperature=cfg.temperature, generator=gen, return_logprobs=False,
        )
        for row, mask, ended in zip(res.responses.tolist(), res.response_mask.tolist(), res.ended.tolist()):
            ids = [t for t, m in zip(row, mask) if m]  # up to and including the first EOS
            out["ids"].append(ids)
            out["lengths"].append(len(ids))
            out["ended"].append(bool(ended))
            out["responses"].append(tok.decode(ids, skip_special_tokens=True).strip())
    return out


def _prompt_response_batches(tok: Any, prompts: list[str], response_ids: list[list[int]], batch_size: int):
    """Yield right-padded ``(ids (b, t), mask (b, t), prompt lengths, sequence lengths)`` batches."""
    import torch

    from ppo_core.data import encode_prompt

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(prompts), batch_size):
        seqs, starts = [], []
        for p, r in zip(prompts[i : i + batch_size], response_ids[i : i + batch_size]):
            p_ids = encode_prompt(tok, p)  # as every stage encodes prompts (ppo_core.data)
            seqs.append(p_ids + list(r))
            starts.append(len(p_ids))
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        yield ids, mask, starts, [len(s) for s in seqs]


def sequence_logprobs(model_dir: str, prompts: list[str], response_ids: list[list[int]],
                      batch_size: int) -> list[list[float]]:
    """Per-token log-probabilities of ``response_ids`` given each prompt, under the model at ``model_dir``."""
    import torch

    from ppo_core import models

    tok = models.load_tokenizer(model_dir)
    model = models.load_causal_lm(model_dir).eval()
    result: list[list[float]] = []
    for ids, mask, starts, lengths in _prompt_response_batches(tok, prompts, response_ids, batch_size):
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (b, t, v)
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, t-1)
        for b, (start, n) in enumerate(zip(starts, lengths)):
            result.append(logp[b, start - 1 : n - 1].tolist())  # token j is predicted at j - 1
    return result


def rm_scores(rm_dir: str, prompts: list[str], response_ids: list[list[int]], batch_size: int) -> list[float]:
    """Reward-model score of each prompt + response as PPO reads it: a scalar model's at the last
    real token, an implicit model's log-ratio to its reference over the response tokens."""
    import torch

    from ppo_core import models, rewards
    from ppo_core.data import mask_from_starts

    tok = models.load_tokenizer(rm_dir)
    spec = models.implicit_reward_spec(rm_dir)
    scorer: rewards.ModelReward | rewards.ImplicitReward
    if spec is None:
        scorer = rewards.ModelReward(models.load_sequence_scorer(rm_dir))
    else:  # beta x the response's log-ratio to its reference model, as PPO scores it
        scorer = rewards.ImplicitReward(models.load_causal_lm(rm_dir),
                                        models.load_causal_lm(spec["reference_model"]), spec["beta"])
    out: list[float] = []
    for ids, mask, starts, _ in _prompt_response_batches(tok, prompts, response_ids, batch_size):
        n = ids.size(0)
        response = mask_from_starts(torch.tensor(starts), mask)
        with torch.inference_mode():
            # the models read the token ids only; the text arguments serve function rewards
            out += scorer([""] * n, [""] * n, ids, mask, response_mask=response).tolist()
    return [float(x) for x in out]


MemberStats = list[tuple[float, float]]
"""Each ensemble member's (mean, std) on the baseline policy's answers."""


def member_stats(members: Sequence[Sequence[float]]) -> MemberStats:
    """(mean, std) of each member's scores; PPO standardises on its reference policy's samples
    (``ppo_core.rewards.EnsembleReward``), the report on the baseline's answers."""
    out = []
    for scores in members:
        m = mean(scores)
        var = sum((x - m) ** 2 for x in scores) / max(len(scores) - 1, 1)
        out.append((m, max(math.sqrt(var), 1e-6)))
    return out


def recorded_stats(recorded: dict | None, rm_dirs: Sequence[str]) -> MemberStats | None:
    """PPO's member statistics (its summary's ``reward_ensemble``) when they are for exactly these
    members in this order; None otherwise."""
    if not recorded or [str(p) for p in recorded.get("paths", [])] != [str(d) for d in rm_dirs]:
        return None
    return [(float(m), float(s)) for m, s in zip(recorded["mean"], recorded["std"])]


def ensemble_stats(rm_dirs: Sequence[str], recorded: dict | None,
                   baseline_scores: Callable[[], list[list[float]]]) -> tuple[MemberStats | None, str | None]:
    """How an ensemble's members are weighted, and from what: PPO's own statistics when it
    optimised exactly these members (``recorded_stats``), else each member standardised on the
    baseline's answers (``baseline_scores()``, each member's scores of them, computed only
    then). One reward model: ``(None, None)``."""
    if len(rm_dirs) == 1:
        return None, None
    stats = recorded_stats(recorded, rm_dirs)
    if stats is not None:
        return stats, "ppo_reference_samples"
    return member_stats(baseline_scores()), "baseline_answers"


def as_dirs(rm_dir: str | Sequence[str]) -> list[str]:
    """One reward model's directory, or an ensemble's, as a list."""
    return [rm_dir] if isinstance(rm_dir, str) else list(rm_dir)


def combine_members(members: Sequence[Sequence[float]], stats: MemberStats | None) -> list[float]:
    """One model's scores as they are; several models' standardised with ``stats``, averaged."""
    if len(members) == 1:
        return [float(x) for x in members[0]]
    assert stats is not None and len(stats) == len(members)
    return [mean([(x - m) / sd for x, (m, sd) in zip(column, stats)]) for column in zip(*members)]


def pair_metrics(rm_dir: str | Sequence[str], pairs: pd.DataFrame, scorer: GoldScorer | None,
                 batch_size: int, stats: MemberStats | None = None) -> dict[str, float]:
    """The reward model on held-out pairs: accuracy against the (noisy) labels and, with a gold
    scorer, agreement with the noiseless gold ordering (pairs whose gold scores tie are left out).
    Both get a standard error (``_se``) with the pairs of one prompt counted as one cluster.
    Several ``rm_dir``: the ensemble PPO optimised, each member standardised with ``stats``."""
    from ppo_core import models
    from ppo_core.data import encode_response

    if pairs.empty:
        return {}
    rm_dirs = as_dirs(rm_dir)
    tok = models.load_tokenizer(rm_dirs[0])
    prompts = pairs["prompt"].astype(str).tolist()
    # responses are scored as PPO scores them: response tokens followed by EOS (ppo_core.data)
    encode = lambda texts: [encode_response(tok, p, t) for p, t in zip(prompts, texts)]
    chosen, rejected = pairs["chosen"].astype(str).tolist(), pairs["rejected"].astype(str).tolist()
    s_c = combine_members([rm_scores(d, prompts, encode(chosen), batch_size) for d in rm_dirs], stats)
    s_r = combine_members([rm_scores(d, prompts, encode(rejected), batch_size) for d in rm_dirs], stats)
    correct = [1.0 if c > r else 0.0 for c, r in zip(s_c, s_r)]
    out = {"rm/pair_accuracy": mean(correct), "rm/pair_accuracy_se": clustered_se(correct, prompts),
           "rm/n_pairs": float(len(prompts))}
    if scorer is not None:
        g_c, g_r = scorer(prompts, chosen), scorer(prompts, rejected)
        decided = [(1.0 if (c > r) == (gc > gr) else 0.0, p)
                   for c, r, gc, gr, p in zip(s_c, s_r, g_c, g_r, prompts) if gc != gr]
        out["rm/gold_agreement"] = mean([d for d, _ in decided])
        out["rm/gold_agreement_se"] = clustered_se([d for d, _ in decided], [p for _, p in decided])
        out["rm/gold_label_agreement"] = mean(
            [1.0 if gc > gr else 0.0 for gc, gr in zip(g_c, g_r) if gc != gr])
    return out


def kl_per_token(logp_policy: list[list[float]], logp_ref: list[list[float]]) -> float:
    """Mean over all response tokens of ``logp_policy - logp_ref`` (a Monte-Carlo KL estimate)."""
    diffs = [a - b for pa, pr in zip(logp_policy, logp_ref) for a, b in zip(pa, pr)]
    return mean(diffs)


def response_kls(logp_policy: list[list[float]], logp_ref: list[list[float]]) -> list[float]:
    """``sum_t (logp_policy - logp_ref)`` of each response, in nats."""
    return [sum(a - b for a, b in zip(pa, pr)) for pa, pr in zip(logp_policy, logp_ref)]


def kl_per_response(logp_policy: list[list[float]], logp_ref: list[list[float]]) -> float:
    """Mean over responses of ``sum_t (logp_policy - logp_ref)``: KL in nats per response, the
    sequence-level figure TRL's ``objective/kl`` and Gao et al. 2022 report."""
    return mean(response_kls(logp_policy, logp_ref))


def guard_curve(samples_file: Path, scorer: GoldScorer | None) -> list[dict[str, float]]:
    """Per guard evaluation of PPO (``guard_samples.jsonl``): step, mean KL per response, mean
    proxy and held-out scores, and the gold score of the same samples when a scorer is given.
    """
    if not samples_file.is_file():
        return []
    by_step: dict[int, list[dict]] = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_step.setdefault(int(row["step"]), []).append(row)
    points = []
    for step, rows in sorted(by_step.items()):
        point = {"step": step, "kl": mean([r["kl"] for r in rows]), "proxy": mean([r["proxy"] for r in rows]),
                 "heldout": mean([r["heldout"] for r in rows])}
        if scorer is not None:
            point["gold"] = mean([float(x) for x in scorer([r["prompt"] for r in rows],
                                                           [r["response"] for r in rows])])
        points.append(point)
    return points


# ---------------------------------------------------------------- asset
class SamplingConfig(dg.Config):
    """How both policies answer the test prompts; ``evaluation_report`` and ``round_evaluation``
    share it, so a round's scores compare with the registered ones."""

    max_prompts: int = Field(default=96, description="Held-out prompts evaluated (0 = all).")
    samples_per_prompt: int = Field(
        default=4, description="Answers sampled per prompt and policy; win rates compare the i-th answers "
        "of SFT and PPO to the same prompt. More samples, less noise on a small test split.")
    max_new_tokens: int = Field(
        default=0, description="Answer length cap, in tokens; 0 = the PPO stage's response_length (measured "
        "on the data by base_model), so 'ended with EOS' is measured under the limit PPO trained with.")
    temperature: float = Field(
        default=0.7, description="Sampling temperature; 0.7 = ppo_core's PPO default, the distribution PPO "
        "optimised (0 = greedy)."
    )
    batch_size: int = Field(default=32, description="Prompts per generation / scoring batch.")
    seed: int = Field(default=0, description="Sampling seed, the same for both policies.")


class EvaluationConfig(SamplingConfig):
    """What an operator tunes in the evaluation."""

    gold_scorer: str = Field(
        default="",
        description="'module:function' scoring (prompts, responses); '' = the bundled task's on "
        "bundled data, 'none' = no gold scores.",
    )
    n_table_samples: int = Field(default=8, description="Rows of the samples table in the metadata.")


def sampling_key(cfg: SamplingConfig) -> str:
    """How the answers were drawn, as the registry's ``eval.set`` tag records it: scores of answers
    drawn with another count per prompt, temperature, length cap or seed do not compare."""
    return f"k={cfg.samples_per_prompt},T={cfg.temperature:g},len={cfg.max_new_tokens},seed={cfg.seed}"


def response_length(max_new_tokens: int, stage_manifest: dict) -> int:
    """``max_new_tokens``, or when it is 0 the ``response_length`` the PPO stage behind
    ``stage_manifest`` sampled with (its stage_config.json), else the data's measured one."""
    if max_new_tokens > 0:
        return max_new_tokens
    path = stage_manifest.get("config_path")
    if path and Path(path).is_file():
        return int(json.loads(Path(path).read_text())["response_length"])
    seq = stage_manifest.get("lengths") or {}
    if "response_length" in seq:
        return int(seq["response_length"])
    raise ValueError("max_new_tokens 0 means the PPO stage's response_length, but the policy's manifest names no "
                     "stage config and no measured lengths; set max_new_tokens")


def _read_split(splits: dict, name: str) -> pd.DataFrame:
    path = Path(splits["split_dir"]) / name
    if not path.is_file():
        raise FileNotFoundError(f"evaluation_report: {path} is missing; re-materialize dataset_splits")
    return pd.read_parquet(path)


def _model_dir(manifest: dict, asset: str) -> str:
    path = manifest.get("model_path")
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"evaluation_report: {asset} manifest has no existing model_path ({path!r})")
    return str(path)


def _reward_dirs(manifest: dict) -> str | list[str]:
    """What PPO optimised (``assets.models.reward_model_paths``), each path checked."""
    from assets.models import reward_model_paths

    paths = reward_model_paths(manifest)
    for path in as_dirs(paths):
        _model_dir({"model_path": path}, "reward_model")
    return paths


def evaluate(splits: dict, sft_dir: str, ppo_dir: str, rm_dir: str | Sequence[str], cfg: EvaluationConfig,
             out_dir: Path, data_source: str | None = None,
             log: Callable[[str], None] = print, heldout_rm_dir: str | None = None,
             rm_stats: dict | None = None) -> dict[str, Any]:
    """Run the whole comparison; writes ``report.json`` and ``samples.parquet`` under ``out_dir``.
    ``heldout_rm_dir``: the held-out reward model, scored beside the reward model (None: skipped).
    Several ``rm_dir``: an ensemble (:func:`combine_members`) weighted as PPO weighted it
    (``rm_stats``: the PPO summary's ``reward_ensemble``); without them each member is
    standardised on the baseline's answers, and the report says so."""
    rm_dirs = as_dirs(rm_dir)
    prompts_df = _read_split(splits, "test_prompts.parquet")
    pairs = _read_split(splits, "test_pairs.parquet")
    prompts = [str(p) for p in prompts_df["prompt"].tolist()]
    if cfg.max_prompts > 0:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise ValueError(f"evaluation_report: {splits['split_dir']}/test_prompts.parquet has no prompts")
    prompts = [p for p in prompts for _ in range(max(1, cfg.samples_per_prompt))]
    chosen = dict(zip(pairs["prompt"].astype(str), pairs["chosen"].astype(str)))
    refs = [chosen.get(p) for p in prompts]
    scorer_spec = resolve_gold_scorer(cfg.gold_scorer, data_source)
    scorer = load_gold_scorer(scorer_spec) if scorer_spec else None

    per: dict[str, dict[str, list]] = {}
    for name, model_dir in (("sft", sft_dir), ("ppo", ppo_dir)):
        log(f"evaluation: sampling {len(prompts)} answers from {name}")
        gen = generate(model_dir, prompts, cfg)
        log(f"evaluation: scoring {name} answers with the reward model"
            + (f" ({len(rm_dirs)} members)" if len(rm_dirs) > 1 else ""))
        gen["rm_members"] = [rm_scores(d, prompts, gen["ids"], cfg.batch_size) for d in rm_dirs]
        gen["heldout"] = rm_scores(heldout_rm_dir, prompts, gen["ids"], cfg.batch_size) if heldout_rm_dir else None
        gen["gold"] = [float(x) for x in scorer(prompts, gen["responses"])] if scorer else None
        if gen["gold"] is not None and len(gen["gold"]) != len(prompts):
            raise ValueError(f"gold_scorer {scorer_spec}: returned {len(gen['gold'])} scores for "
                             f"{len(prompts)} responses")
        per[name] = gen
    stats, stats_from = ensemble_stats(rm_dirs, rm_stats, lambda: per["sft"]["rm_members"])
    if stats_from == "baseline_answers":
        log("evaluation: no PPO statistics for these reward models: each is standardised on the "
            "baseline's answers, which weights them a little differently from PPO")
    for gen in per.values():
        gen["rm"] = combine_members(gen.pop("rm_members"), stats)
    log(f"evaluation: reward model on {len(pairs)} held-out preference pairs")
    metrics_rm = pair_metrics(rm_dirs, pairs, scorer, cfg.batch_size, stats)
    log("evaluation: KL of PPO to the SFT reference on PPO samples")
    lp_ppo = sequence_logprobs(ppo_dir, prompts, per["ppo"]["ids"], cfg.batch_size)
    lp_ref = sequence_logprobs(sft_dir, prompts, per["ppo"]["ids"], cfg.batch_size)

    metrics: dict[str, float] = {}
    for name, gen in per.items():
        pm = policy_metrics(gen["responses"], gen["rm"], gen["lengths"], gen["ended"], refs, gen["gold"],
                            gen["heldout"])
        metrics.update({f"{name}/{k}": v for k, v in pm.items()})
    metrics.update(compare(per["sft"], per["ppo"], prompts))
    metrics["ppo/kl_to_ref"] = kl_per_token(lp_ppo, lp_ref)
    metrics["ppo/kl_to_ref_per_response"] = kl_per_response(lp_ppo, lp_ref)
    metrics["ppo/kl_to_ref_per_response_se"] = clustered_se(response_kls(lp_ppo, lp_ref), prompts)
    metrics.update(metrics_rm)
    metrics["n_prompts"] = float(len(set(prompts)))
    metrics["n_samples"] = float(len(prompts))

    samples = pd.DataFrame({
        "prompt": prompts, "chosen": [r or "" for r in refs],
        "sft_response": per["sft"]["responses"], "ppo_response": per["ppo"]["responses"],
        "sft_rm": per["sft"]["rm"], "ppo_rm": per["ppo"]["rm"],
        "sft_ended_eos": per["sft"]["ended"], "ppo_ended_eos": per["ppo"]["ended"],
    })
    if heldout_rm_dir:
        samples["sft_heldout"], samples["ppo_heldout"] = per["sft"]["heldout"], per["ppo"]["heldout"]
    if scorer:
        samples["sft_gold"], samples["ppo_gold"] = per["sft"]["gold"], per["ppo"]["gold"]
    out_dir.mkdir(parents=True, exist_ok=True)
    samples.to_parquet(out_dir / "samples.parquet", index=False)
    report = {
        "metrics": metrics, "gold_scorer": scorer_spec, "data_version": splits.get("data_version"),
        "sft_model": sft_dir, "ppo_model": ppo_dir, "reward_model": rm_dirs[0] if len(rm_dirs) == 1 else rm_dirs,
        "heldout_reward_model": heldout_rm_dir,
        **({"reward_ensemble_stats": {"from": stats_from, "mean_std": stats}} if stats else {}),
        # the weights' hash: promotion compares held-out scores only under the same model
        "heldout_reward_model_version": model_dir_version(Path(heldout_rm_dir)) if heldout_rm_dir else None,
        "config": cfg.model_dump(), "samples_path": str(out_dir / "samples.parquet"),
    }
    # NaN is not JSON: a metric that does not apply (no gold scorer) is written as null.
    report["metrics"] = json_safe(metrics)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=False))
    return {"report": report, "samples": samples, "ids": {name: gen["ids"] for name, gen in per.items()}}


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    code_version=EVALUATION_REPORT_VERSION,
    description="SFT against PPO on held-out prompts: RM and gold scores, win rates, KL, length, ROUGE-L.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    mlflow: MLflowResource,
    raw_preferences: dict,
    dataset_splits: dict,
    sft_model: dict,
    reward_model: dict,
    heldout_reward_model: dict,
    ppo_policy: dict,
) -> dg.MaterializeResult:
    out_dir = settings.models_root() / "evaluation_report" / context.run.run_id
    config = config.model_copy(update={"max_new_tokens": response_length(config.max_new_tokens, ppo_policy)})
    with mlflow.run(context, "evaluation_report",
                    {"data_version": str(dataset_splits.get("data_version", ""))}) as run:
        run_id = run.info.run_id
        rm_dirs = _reward_dirs(reward_model)  # every member of an ensemble: what PPO optimised
        mlflow.log_params(run_id, {"eval": config.model_dump(), "sft_model": sft_model.get("model_path"),
                                   "ppo_model": ppo_policy.get("model_path"),
                                   "reward_model": rm_dirs,
                                   "heldout_reward_model": heldout_reward_model.get("model_path")})
        test_set, test_pairs = split_inputs(dataset_splits, {"test_prompts": EVAL, "test_pairs": EVAL})
        log_datasets(mlflow.client(), run_id, [test_set, test_pairs])
        result = evaluate(
            dataset_splits, _model_dir(sft_model, "sft_model"), _model_dir(ppo_policy, "ppo_policy"),
            rm_dirs, config, out_dir,
            data_source=raw_preferences.get("source"), log=context.log.info,
            heldout_rm_dir=heldout_reward_model.get("model_path") or None,
            rm_stats=ppo_policy.get("reward_ensemble"),
        )
        metrics = result["report"]["metrics"]  # json-safe: None where a metric does not apply
        _log_report_metrics(mlflow, run_id, {k: v for k, v in metrics.items() if v is not None},
                            ppo_policy.get("mlflow_model_id"), test_set)
        guard_meta = _guard_section(ppo_policy, result["report"]["gold_scorer"], out_dir)
        for point in guard_meta.pop("points", []):
            mlflow.log_metrics(run_id, {f"guard/{k}": v for k, v in point.items() if k != "step"},
                               step=int(point["step"]))
        if "plot_path" in guard_meta:
            mlflow.log_artifact(run_id, guard_meta["plot_path"], "plots")
        mlflow.log_artifacts(run_id, out_dir, "evaluation")
        url = mlflow.run_url(run)
    table = samples_markdown(result["samples"], config.n_table_samples)
    manifest = {
        "report_path": str(out_dir / "report.json"), "samples_path": str(out_dir / "samples.parquet"),
        "metrics": metrics,
        "gold_scorer": result["report"]["gold_scorer"], "mlflow_run_id": run_id,
        "heldout_reward_model_version": result["report"]["heldout_reward_model_version"],
        "max_new_tokens": config.max_new_tokens, "sampling": sampling_key(config),
        "data_version": dataset_splits.get("data_version"), "ppo_model_path": ppo_policy.get("model_path"),
        "sft_model_path": sft_model.get("model_path"),
        "ppo_model_id": ppo_policy.get("mlflow_model_id"),
    }
    return dg.MaterializeResult(
        value=manifest,
        # the samples and metrics, not report.json: that names this run's folders
        data_version=dg.DataVersion(content_hash(result["samples"], {"metrics": metrics})),
        metadata={
            "mlflow_run": dg.MetadataValue.url(url), "mlflow_run_id": run_id,
            "report_path": dg.MetadataValue.path(str(out_dir / "report.json")),
            **{k: v for k, v in metrics.items() if v is not None},
            "samples": dg.MetadataValue.md(table),
            **{k: v for k, v in guard_meta.items() if k != "plot_path"},
        },
    )


def _log_report_metrics(mlflow: MLflowResource, run_id: str, metrics: dict[str, float],
                        ppo_model_id: str | None, test_set: SplitInput) -> None:
    """The report's metrics on the run and, linked to the test split, on the PPO policy's
    LoggedModel (the candidate the report judges), so its model page shows them; a policy
    trained without a LoggedModel (log_model_to_mlflow false) gets them on the run only."""
    if not ppo_model_id:
        mlflow.log_metrics(run_id, metrics)
        return
    if batch := model_metrics(metrics, str(ppo_model_id), test_set):
        mlflow.client().log_batch(run_id, metrics=batch)


def _guard_section(ppo_policy: dict, scorer_spec: str | None, out_dir: Path) -> dict[str, Any]:
    """PPO's over-optimization guard curve with gold beside it (when a gold scorer exists):
    gold never selected anything, it shows whether the held-out signal picked well."""
    samples = Path(str(ppo_policy.get("output_dir", ""))) / "guard_samples.jsonl"
    points = guard_curve(samples, load_gold_scorer(scorer_spec) if scorer_spec else None)
    if not points:
        return {}
    kept = ppo_policy.get("summary", {}).get("guard/kept_step")
    kept = int(kept) if kept is not None else None
    png = guard_plot(points, out_dir / "guard_vs_sqrt_kl.png", kept)
    table = "| step | KL/response | proxy | held-out | gold |\n|---:|---:|---:|---:|---:|\n" + "\n".join(
        f"| {p['step']}{' (kept)' if p['step'] == kept else ''} | {p['kl']:.2f} | {p['proxy']:.3f} | "
        f"{p['heldout']:.3f} | {p.get('gold', float('nan')):.3f} |" for p in points)
    meta: dict[str, Any] = {"points": points, "guard_curve": dg.MetadataValue.md(table)}
    if png is not None:
        meta["plot_path"] = png
        meta["plot_guard"] = dg.MetadataValue.md(png_markdown(png, "guard"))
    return meta


class PPOBeatsSFTConfig(dg.Config):
    min_win_rate: float = Field(
        default=0.5, description="PPO's win rate over SFT must reach this (by gold when the data has a gold "
        "scorer, else by the held-out reward model, else by the reward model)."
    )


def ppo_beats_sft_result(metrics: dict[str, float | None], min_win_rate: float) -> dg.AssetCheckResult:
    """Pass when PPO's mean score is above SFT's and its win rate reaches ``min_win_rate``.

    Gold scores decide when the data has a gold scorer. Otherwise the held-out reward model
    does: PPO never optimised it, while it drove the reward model's score up whether or not the
    policy got better. Only without a held-out reward model (``heldout_fraction`` 0) does the
    reward model itself decide.
    """
    basis = next((b for b in ("gold", "heldout") if metrics.get(f"win_rate_{b}") is not None), "rm")
    key = {"gold": "gold_mean", "heldout": "heldout_score_mean", "rm": "rm_score_mean"}[basis]
    ppo, sft = metrics.get(f"ppo/{key}"), metrics.get(f"sft/{key}")
    rate = metrics.get(f"win_rate_{basis}")
    if ppo is None or sft is None or rate is None:
        return dg.AssetCheckResult(passed=False, description=f"report has no {key} / win rate to compare")
    kl = metrics.get("ppo/kl_to_ref_per_response")
    se = metrics.get(f"win_rate_{basis}_se")
    passed = ppo > sft and rate >= min_win_rate
    return dg.AssetCheckResult(
        passed=bool(passed),
        description=f"PPO {key} {ppo:.3f} vs SFT {sft:.3f}; win rate ({basis}) {rate:.3f}"
        + (f" +- {se:.3f}" if se is not None else "") + f" (needs > SFT and >= {min_win_rate})"
        + (f" at KL {kl:.2f} nats per response" if kl is not None else ""),
        metadata={"basis": basis, f"ppo_{key}": ppo, f"sft_{key}": sft, "win_rate": rate,
                  "min_win_rate": min_win_rate, **({"win_rate_se": se} if se is not None else {}),
                  **({"kl_to_sft_per_response": kl} if kl is not None else {})},
    )


@dg.asset_check(asset=evaluation_report, blocking=True,
                description="Gate before registration: PPO beats SFT on held-out prompts.")
def ppo_beats_sft(config: PPOBeatsSFTConfig, evaluation_report: dict) -> dg.AssetCheckResult:
    return ppo_beats_sft_result(evaluation_report["metrics"], config.min_win_rate)


EVAL_ASSETS = [evaluation_report]
EVAL_CHECKS = [ppo_beats_sft]
