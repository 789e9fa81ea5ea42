"""Shared pieces of the PPO benchmark: the tiny fixture, the gold evaluation, the CPU peak.

Both stacks under test (ours and TRL's) start from the same files written here: one
tokenizer, one SFT'd policy (also the reference) and one reward model (also the critic's
initial weights). Everything is evaluated by one function, :func:`evaluate_policy`, so the
quality columns of the table compare like with like.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assets.bundled_task import all_prompts, generate_preferences, gold_score_batch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "bench" / "results" / "fixtures"


@dataclass(frozen=True)
class ModelSize:
    """Shape of the tiny policy / reward model (``ppo_core.models.build_tiny_causal_lm``, Llama)."""

    n_layer: int = 2
    """depth (``MODEL_SIZES["tiny"]`` of ppo_core.models, the pipeline's embedded default)"""
    n_embd: int = 128
    """width; a 2-core CPU shared with other jobs SFTs this in about a minute"""
    n_head: int = 4
    """heads (as ``MODEL_SIZES["tiny"]``)"""
    vocab_size: int = 512
    """byte-level BPE: 256 byte symbols + 3 specials + merges; the task has ~60 words"""
    sft_steps: int = 200
    """SFT steps on the bundled chosen responses ("a few hundred")"""
    rm_steps: int = 150
    """Bradley-Terry steps for the reward model"""


TINY_SIZE = ModelSize(n_layer=1, n_embd=64, n_head=2, sft_steps=40, rm_steps=30)

# The second benchmark scale (issue 13, ``bench/ppo_vs_trl.py --scale 20m``): the same Llama
# architecture (MLP 4x wide, tied embeddings) at 6 layers x width 512 x 8 heads, 25.4M
# parameters with the task's 458-token vocabulary, where matrix multiplies dominate. Only
# speed is compared at this size, so the fixture is trained very briefly: 40 SFT steps (the
# policy learns the answer format and to stop) and 20 reward-model steps.
SCALE_20M = ModelSize(n_layer=6, n_embd=512, n_head=8, sft_steps=40, rm_steps=20)


@dataclass(frozen=True)
class Fixture:
    """Paths of the shared starting point (all ``save_pretrained`` directories)."""

    tokenizer_dir: str
    policy_dir: str
    reward_dir: str
    n_params_policy: int
    n_params_reward: int
    rm_pair_accuracy: float


def set_seed(seed: int) -> None:
    """Seed torch and numpy so both stacks see the same sampling stream where they can."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def format_example(prompt: str, response: str) -> str:
    """Model input text: prompt then response (the data contract's ``prompt + response``)."""
    return f"{prompt} {response}"


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Fixture: tokenizer, SFT policy, reward model
# ---------------------------------------------------------------------------------------


def _fixture_key(size: ModelSize, seed: int) -> str:
    blob = json.dumps({"size": asdict(size), "seed": seed, "v": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_fixture(size: ModelSize, seed: int = 0, cache_dir: Path = DEFAULT_CACHE) -> Fixture:
    """Tokenizer + SFT'd policy + BT reward model for the bundled task, cached on disk.

    The cache key is the model size and seed, so a changed size never reuses stale weights.
    """
    out = Path(cache_dir) / _fixture_key(size, seed)
    meta_path = out / "fixture.json"
    if meta_path.exists():
        return Fixture(**json.loads(meta_path.read_text()))
    from ppo_core.models import build_scorer_from_causal_lm, build_tiny_causal_lm, train_tokenizer

    set_seed(seed)
    pairs = generate_preferences(n_pairs=3000, seed=seed, corrupt_fraction=0.0)
    texts = [format_example(p, c) for p, c in zip(pairs.prompt, pairs.chosen)]
    texts += [format_example(p, r) for p, r in zip(pairs.prompt, pairs.rejected)]
    tok = train_tokenizer(texts, out / "tokenizer", vocab_size=size.vocab_size)
    policy = build_tiny_causal_lm(tok, n_layer=size.n_layer, n_embd=size.n_embd,
                                  n_head=size.n_head, seed=seed)
    _sft(policy, tok, list(pairs.prompt), list(pairs.chosen), size.sft_steps, seed)
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")

    # The RM trunk starts from the SFT policy, the usual initialisation (Ouyang et al. 2022).
    reward = build_scorer_from_causal_lm(out / "policy", pad_token_id=tok.pad_token_id, seed=seed)
    acc = _train_reward(reward, tok, pairs, size.rm_steps, seed)
    reward.save_pretrained(out / "reward")
    tok.save_pretrained(out / "reward")

    fx = Fixture(str(out / "tokenizer"), str(out / "policy"), str(out / "reward"),
                 n_params(policy), n_params(reward), acc)
    meta_path.write_text(json.dumps(asdict(fx), indent=1))
    return fx


def untrained_policy_dir(fx: Fixture, seed: int = 0) -> str:
    """A randomly initialised policy of the fixture's shape, saved next to it (cached).

    It almost never samples EOS (about 1 / vocab per token), so every response runs to the
    length limit: the scaling sweep then measures step time at the configured response
    length, not at the ~17 tokens where the SFT policy stops.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(fx.policy_dir).parent / "policy_untrained"
    if not (out / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(fx.policy_dir))
        model.save_pretrained(out)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(fx.policy_dir).save_pretrained(out)
    return str(out)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=batch_size, replace=False) for _ in range(steps)]


def _sft(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
         responses: list[str], steps: int, seed: int, batch_size: int = 32, lr: float = 1e-3) -> None:
    """Response-only causal-LM loss; a high LR is fine for a 1M-parameter model and few steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for idx in _batches(len(prompts), batch_size, steps, seed):
        ids, labels = [], []
        for i in idx:
            p = tok(prompts[i])["input_ids"]
            r = tok(responses[i])["input_ids"] + [tok.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])  # (b, t)
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        out = model(input_ids=x, attention_mask=(torch.arange(width)[None] < torch.tensor(
            [len(s) for s in ids])[:, None]).long(), labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()


def _score_texts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding=True, return_tensors="pt")
    return model(**enc).logits.squeeze(-1)  # (b,)


def _train_reward(model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs, steps: int,
                  seed: int, batch_size: int = 32, lr: float = 5e-4) -> float:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected); returns held-out pair accuracy."""
    tok.padding_side = "right"
    n_train = int(0.9 * len(pairs))
    chosen = [format_example(p, c) for p, c in zip(pairs.prompt, pairs.chosen)]
    rejected = [format_example(p, r) for p, r in zip(pairs.prompt, pairs.rejected)]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for idx in _batches(n_train, batch_size, steps, seed + 1):
        r = _score_texts(model, tok, [chosen[i] for i in idx] + [rejected[i] for i in idx])
        loss = -F.logsigmoid(r[: len(idx)] - r[len(idx):]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        held = range(n_train, len(pairs))
        rc = _score_texts(model, tok, [chosen[i] for i in held])
        rr = _score_texts(model, tok, [rejected[i] for i in held])
    return float((rc > rr).float().mean())


# ---------------------------------------------------------------------------------------
# Shared evaluation: gold reward and KL to the reference
# ---------------------------------------------------------------------------------------


def eval_prompts(n: int, seed: int = 1234) -> list[str]:
    """A fixed, seeded subset of the task's prompts used to score every policy.

    The bundled task has 360 prompts. Up to that many, a seeded subset without repeats; beyond
    it, the seeded order of all 360 cycled (each prompt sampled ``n / 360`` times), so a
    quality comparison can average more samples than there are prompts.
    """
    prompts = all_prompts()
    rng = np.random.default_rng(seed)
    order = [prompts[i] for i in rng.choice(len(prompts), size=min(n, len(prompts)), replace=False)]
    return [order[i % len(order)] for i in range(n)] if n > len(order) else order


def _left_pad(tok: PreTrainedTokenizerBase, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (b, p) prompt ids and mask, encoded as the engines encode prompts."""
    from ppo_core.data import encode_prompt, pad_sequences

    return pad_sequences([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, side="left")


def _response_logprobs(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor,
                       prompt_len: int, temperature: float) -> torch.Tensor:
    """log pi(token) of every response token under temperature-scaled logits; (b, r)."""
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits = logits[:, prompt_len - 1 : -1].float() / temperature  # (b, r, v)
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


@torch.no_grad()
def evaluate_policy(policy: PreTrainedModel, ref: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    prompts: Sequence[str], response_length: int, temperature: float,
                    seed: int, batch_size: int = 64) -> dict[str, float]:
    """Mean gold reward of sampled responses (and its standard error) and KL(policy || ref).

    KL is the k1 estimate sum_t [log pi - log ref] over the response tokens up to and
    including EOS, averaged over prompts; both models use the sampling temperature, as the
    trainers do when they compute their KL penalty.
    """
    policy.eval()
    ref.eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    golds, kls, lens = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids, mask = _left_pad(tok, chunk)
        out = policy.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
            top_k=0, top_p=1.0, max_new_tokens=response_length,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        resp = out[:, ids.shape[1]:]  # (b, r)
        is_eos = resp == tok.eos_token_id
        # keep tokens up to and including the first EOS
        keep = (is_eos.cumsum(1) - is_eos.long()) == 0
        full_mask = torch.cat([mask, keep.long()], 1)
        lp = _response_logprobs(policy, out, full_mask, ids.shape[1], temperature)
        lr = _response_logprobs(ref, out, full_mask, ids.shape[1], temperature)
        kls.extend(((lp - lr) * keep).sum(1).tolist())
        lens.extend(keep.sum(1).tolist())
        texts = [tok.decode(r[k], skip_special_tokens=True) for r, k in zip(resp, keep)]
        golds.extend(gold_score_batch(chunk, texts))
    return {"gold": float(np.mean(golds)), "kl": float(np.mean(kls)),
            "gold_se": float(np.std(golds, ddof=1) / math.sqrt(len(golds))),
            "kl_se": float(np.std(kls, ddof=1) / math.sqrt(len(kls))),
            "response_tokens": float(np.mean(lens))}


# ---------------------------------------------------------------------------------------
# Statistics over seeds
# ---------------------------------------------------------------------------------------


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (0.5 < p < 1) of Student's t with ``df`` degrees of freedom.

    Bisection on the CDF, itself Simpson's rule over the density from 0 (no SciPy in the
    project's dependencies); accurate to ~1e-6 for df >= 1 (t_{0.975} is 12.706 at df 1,
    2.776 at df 4, 2.262 at df 9).
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x: float, n: int = 2000) -> float:  # P(0 < T < x), Simpson, n even
        h = x / n
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf_above_half(hi) < p - 0.5:   # bracket: the df=1 tail needs hi ~ 64 at 0.995
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_above_half(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, standard error and the two-sided t confidence interval of ``values`` (n >= 2).

    For paired differences (one value per seed: ours - TRL on the same fixture and data) this
    is the paired t-interval; ``decisive`` says whether it excludes 0.
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"mean_ci needs >= 2 values, got {n}")
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(n))
    half = t_quantile(0.5 + level / 2, n - 1) * se
    return {"n": n, "mean": mean, "se": se, "level": level, "lo": mean - half, "hi": mean + half,
            "decisive": bool(mean - half > 0 or mean + half < 0)}


# ---------------------------------------------------------------------------------------
# CPU peak and FLOP accounting
# ---------------------------------------------------------------------------------------


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 ``torch.mm`` throughput (FLOP/s) at the current thread count.

    An n x n by n x n product costs 2 n^3 FLOPs (one multiply and one add per term).
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: first call pays for allocation and thread-pool start
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def training_flops(n_params_policy: int, n_params_critic: int, tokens: int) -> float:
    """FLOPs of the PPO update: 6 * N * tokens for forward + backward of each trained model.

    The 6N rule (2N forward, 4N backward per token) is from Kaplan et al. 2020, sec. 2.1;
    it ignores attention's O(t^2) term, which is negligible at these sequence lengths.
    """
    return 6.0 * (n_params_policy + n_params_critic) * tokens


def forward_backward_flops(model: PreTrainedModel, positions: int, episode_len: int = 20,
                           row_width: int = 128, repeats: int = 5) -> float:
    """FLOP/s (6N rule, as :func:`training_flops`) of one causal LM's forward + backward
    alone: no PPO losses, no optimizer, no second model.

    ``positions`` tokens of random ids are packed as ``ppo_core.packing`` packs episodes:
    episodes of ``episode_len`` tokens in rows of ``row_width`` positions, position ids
    restarting per episode, a block-diagonal causal mask; the LM head runs on every position
    and the loss is the mean log-sum-exp. Best of ``repeats`` at the current thread count.
    This is what eager PyTorch reaches on this model and CPU with no engine around it: run at
    the PPO mini-batch's size it is the engine's own floor, run at several times that size
    the model's ceiling once per-call overhead is amortised.
    ``model`` is a causal LM with SDPA or eager attention (both take the 4D mask).
    """
    width = min(row_width, positions)
    rows = math.ceil(positions / width)
    col = torch.arange(width)
    position_ids = (col % episode_len).repeat(rows, 1)                   # (R, W)
    segment = col // episode_len
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    mask = allowed.expand(rows, 1, width, width)                         # (R, 1, W, W)
    ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        hidden = model.model(input_ids=ids, position_ids=position_ids, attention_mask=mask,
                             use_cache=False).last_hidden_state
        model.lm_head(hidden).logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return 6.0 * n_params(model) * rows * width / best


# ---------------------------------------------------------------------------------------
# FLOPs of a whole PPO iteration (the second benchmark scale, issue 13)
# ---------------------------------------------------------------------------------------


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that take part in a matrix multiply per token: every ``nn.Linear`` weight,
    the LM head included even when it is tied to the input embedding (the embedding lookup
    itself is a gather, no FLOPs; norms and biases are element-wise). The ``N`` of the FLOP
    count of :func:`ppo_iteration_flops`."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in seen:
            seen.add(id(module))
            total += module.weight.numel()
    return total


def ppo_iteration_flops(n_policy: int, n_critic: int, n_reward: int, real_tokens: int,
                        train_tokens: int) -> dict[str, float]:
    """FLOPs of PPO rollouts and updates, by phase, from the tokens they processed.

    ``real_tokens``: prompt + response tokens (through EOS, no padding) of all episodes;
    ``train_tokens``: the same summed over every PPO-epoch forward of the update (= PPO epochs
    x ``real_tokens``). ``n_*``: :func:`matmul_params` of each model (the reference is the
    policy's shape). A forward costs 2 N FLOPs per token, a forward + backward 6 N (Kaplan et
    al. 2020, sec. 2.1); attention's O(t^2) term is left out (at width 512 and ~50-token
    episodes it adds about t / 6d ~ 2%).

    * generation: 2 N_policy per prompt token (prefill) and per generated token (decode)
    * scoring (no grad): 2 (N_reference + N_critic + N_reward) per token
    * training: 6 (N_policy + N_critic) per token of every PPO-epoch forward
    """
    generation = 2.0 * n_policy * real_tokens
    scoring = 2.0 * (n_policy + n_critic + n_reward) * real_tokens
    training = 6.0 * (n_policy + n_critic) * train_tokens
    return {"generation": generation, "scoring": scoring, "training": training,
            "total": generation + scoring + training}


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 FLOP/s of an (m x k) @ (k x n) ``torch.mm`` (2 m k n FLOPs) at
    the current thread count, after one warm-up call."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def layer_matmul_rate(tokens: int, width: int, mlp: int, repeats: int = 5) -> float:
    """FLOP/s of one Llama layer's forward matmuls at ``tokens`` rows, one after the other:
    q, k, v, o (width x width each), gate and up (width x mlp) and down (mlp x width); best of
    ``repeats``. The ceiling of a forward at that many tokens if everything but the matmuls
    were free."""
    x = torch.randn(tokens, width)
    h = torch.randn(tokens, mlp)
    sq = [torch.randn(width, width) for _ in range(4)]
    up = [torch.randn(width, mlp) for _ in range(2)]
    down = torch.randn(mlp, width)

    def layer() -> None:
        for w in sq:
            torch.mm(x, w)
        for w in up:
            torch.mm(x, w)
        torch.mm(h, down)

    layer()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * tokens * (4 * width * width + 3 * width * mlp) / best
