"""One-token decode steps for Llama-layout models without the Hugging Face module stack.

In a PPO rollout the policy decodes a batch one token at a time, and on small models each
step's cost is mostly Python: module calls, cache bookkeeping, mask building and RoPE tables
recomputed per step (``bench/ppo_core_bench.py`` and BENCHMARKS.md measure it). This decoder
runs the same arithmetic from the model's own weights:

* q/k/v and gate/up projections as one matmul each (weights concatenated once per rollout),
* a preallocated KV cache written in place (the prompt's keys/values come from one ordinary
  Hugging Face prefill forward, :class:`HFDecoder`, so prompt handling stays the model's own),
* RoPE cos/sin looked up from a table built once by the model's own rotary module.

It covers decoders laid out like Llama (Llama, Mistral, Qwen2, ...): RMSNorm, rotary
attention with optional q/k/v biases and grouped KV heads, a gated MLP, no logit soft-capping
or sliding windows. :func:`supports_fast_decode` checks a model once against its own
forward, in the model's dtype (logits to 1e-4 in float32, to 4 ulps of the dtype in bf16:
:func:`ppo_core.ppo_utils.verification_tolerance`, as
:func:`ppo_core.packing.supports_packing` does for training);
anything else (GPT-2, LoRA-wrapped projections, ZeRO-3 weights that are partitioned at the
time, i.e. not gathered for generation) keeps the Hugging Face path in
:func:`ppo_core.generation.sample`.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ppo_core.models import unwrap
from ppo_core.ppo_utils import position_ids_from_mask, verification_tolerance

# rope variants whose tables depend only on the position (dynamic / longrope rescale with the
# running sequence length, so a table built once would differ from the model's own per-step one)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    norm1: nn.Module
    w_qkv: torch.Tensor
    """(n_heads * d + 2 * n_kv * d, hidden)"""
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    norm2: nn.Module
    w_gate_up: torch.Tensor
    """(2 * intermediate, hidden)"""
    w_down: torch.Tensor
    act: nn.Module
    scaling: float


def _structure_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not a plain Llama-layout causal LM (None when it is)."""
    cfg = getattr(model, "config", None)
    trunk = getattr(model, "model", None)
    if cfg is None or trunk is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return "no .model trunk or .lm_head Linear"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None):
            return f"{name} is set"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return "sliding-window layers"
    elif getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"  # Mistral-style: every layer windowed
    for rope_type in _rope_types(cfg):
        if rope_type not in STATIC_ROPE:
            return f"rope_type {rope_type!r}"
    if not all(hasattr(trunk, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "trunk lacks embed_tokens / layers / norm / rotary_emb"
    for layer in trunk.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        # exactly nn.Linear: PEFT's LoRA layers carry adapters their .weight does not include
        if any(type(m) is not nn.Linear for m in linears):
            return "projections are not plain nn.Linear (LoRA?)"
        if (getattr(attn, "q_norm", None) is not None or not hasattr(attn, "scaling")
                or not hasattr(layer, "post_attention_layernorm")):
            return "attention or norm layout differs from Llama's"
    return None


def _rope_types(cfg: object) -> list[str]:
    """The RoPE variant(s) a config asks for, under either transformers' field names.

    transformers 5 keeps them in ``rope_parameters`` (one dict, or one per layer type such as
    ``{"full_attention": {...}, "sliding_attention": {...}}``); transformers 4.x in
    ``rope_scaling`` (None for plain RoPE, ``rope_type`` or the older ``type`` key) next to
    ``rope_theta``. No entry means the default, position-only table.
    """
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return [str(rope)]
    per_layer_type = [v for v in rope.values() if isinstance(v, dict)]
    dicts = per_layer_type if per_layer_type and len(per_layer_type) == len(rope) else [rope]
    return [str(d.get("rope_type", d.get("type", "default"))) for d in dicts]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


class HFDecoder:
    """Decode state through the model's own forward and Hugging Face KV cache: the prompt
    prefill for every model, and the decode steps for those :class:`FastDecoder` does not
    cover. Same step interface as :class:`FastDecoder`."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        """One forward over (B, P) left-padded prompts; ``first_logits`` (B, V) are the last
        position's."""
        self.model = model
        self.keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=True, **self.keep)
        self.cache, self.first_logits = out.past_key_values, out.logits[:, -1, :]

    @property
    def can_drop_rows(self) -> bool:
        return hasattr(self.cache, "batch_select_indices")

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int,
             mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`FastDecoder.step` (``slot`` is implied by the cache here)."""
        out = self.model(input_ids=tokens[:, None], attention_mask=mask,
                         position_ids=positions[:, None], past_key_values=self.cache,
                         use_cache=True, **self.keep)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]


class FastDecoder:
    """Decode state of one batch: prefilled KV cache plus the model's fused weights.

    Build it with :meth:`after` from the prompts' :class:`HFDecoder` prefill, then call
    :meth:`step` once per new token; :meth:`keep_rows` drops finished rows.
    """

    can_drop_rows = True

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        inner = unwrap(model)
        cfg, trunk = inner.config, inner.model
        self.lm_head, self.trunk = inner.lm_head, trunk
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.layers: list[_Layer] = []
        for layer in trunk.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = (a.q_proj, a.k_proj, a.v_proj)
            biases = [p.bias for p in qkv]
            b_qkv = None
            if any(b is not None for b in biases):
                b_qkv = torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=p.weight.dtype,
                                                                       device=p.weight.device)
                                   for b, p in zip(biases, qkv)])
            if a.o_proj.bias is not None or any(p.bias is not None for p in (m.gate_proj, m.up_proj,
                                                                              m.down_proj)):
                raise ValueError("FastDecoder: biases on o_proj or the MLP are not supported")
            self.layers.append(_Layer(
                norm1=layer.input_layernorm, w_qkv=torch.cat([p.weight for p in qkv]), b_qkv=b_qkv,
                w_o=a.o_proj.weight, norm2=layer.post_attention_layernorm,
                w_gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                w_down=m.down_proj.weight, act=m.act_fn, scaling=float(a.scaling)))
        self.intermediate = self.layers[0].w_down.shape[1] if self.layers else 0
        weight = inner.lm_head.weight
        shape = (len(self.layers), batch, self.n_kv, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros_like(self.keys)
        # cos/sin for every position a row can reach, from the model's own rotary module
        positions = torch.arange(max_len, device=weight.device)[None]
        probe = torch.zeros(1, 1, int(cfg.hidden_size), dtype=weight.dtype, device=weight.device)
        cos, sin = trunk.rotary_emb(probe, positions)  # (1, max_len, d) each
        self.cos, self.sin = cos[0], sin[0]

    @classmethod
    def after(cls, model: nn.Module, prefill: HFDecoder, max_len: int) -> FastDecoder:
        """The decoder continuing ``prefill`` (the prompts' Hugging Face forward): its
        keys/values copied into a cache of ``max_len`` positions."""
        layers = prefill.cache.layers
        B, _, P, _ = layers[0].keys.shape
        dec = cls(model, B, max_len)
        for i, layer in enumerate(layers):
            dec.keys[i, :, :, :P] = layer.keys
            dec.values[i, :, :, :P] = layer.values
        return dec

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (the still-generating ones) in the cache."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int,
             mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding ``tokens`` (B,) at ``positions`` (B,) into cache column
        ``slot``; ``mask`` (B, slot + 1), 0/1 or bool, says which cache columns each row
        attends to."""
        B, nh, nkv, d = tokens.shape[0], self.n_heads, self.n_kv, self.head_dim
        x = self.trunk.embed_tokens(tokens[:, None])                  # (B, 1, H)
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # (B,1,1,d)
        allowed = mask.bool()[:, None, None, :]                        # (B, 1, 1, slot+1)
        for i, L in enumerate(self.layers):
            qkv = F.linear(L.norm1(x), L.w_qkv, L.b_qkv).view(B, 1, nh + 2 * nkv, d).transpose(1, 2)
            q, k, v = qkv.split((nh, nkv, nkv), dim=1)                 # (B, heads, 1, d)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            self.keys[i, :, :, slot] = k[:, :, 0]
            self.values[i, :, :, slot] = v[:, :, 0]
            o = F.scaled_dot_product_attention(
                q, self.keys[i, :, :, :slot + 1], self.values[i, :, :, :slot + 1],
                attn_mask=allowed, scale=L.scaling, enable_gqa=nh != nkv)  # (B, nh, 1, d)
            x = x + F.linear(o.transpose(1, 2).reshape(B, 1, nh * d), L.w_o)
            gate, up = F.linear(L.norm2(x), L.w_gate_up).split(self.intermediate, dim=-1)
            x = x + F.linear(L.act(gate) * up, L.w_down)
        return self.lm_head(self.trunk.norm(x))[:, -1]


# per model object: None when FastDecoder reproduces it, else why the HF path is used
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()
# (model class, reason) pairs already logged: each fallback is reported once per process
_LOGGED: set[tuple[str, str]] = set()


@torch.no_grad()
def fast_decode_problem(model: nn.Module) -> str | None:
    """Why :class:`FastDecoder` does not decode ``model`` (None when it reproduces the model's
    own decode logits). Checked once per model object: structure, then three decode steps of
    two left-padded prompts. The first time a (class, reason) pair is met the fallback to the
    Hugging Face forward is logged: at INFO for a layout the decoder does not cover (GPT-2,
    LoRA, ZeRO-3 ...), at WARNING when a Llama-layout model fails the check or raises."""
    inner = unwrap(model)
    if _partitioned_now(inner):
        # not cached: the same model decodes fast inside a gather (ppo_core.strategy's
        # generation_model), where its weights are whole
        problem = "ZeRO-3 partitioned weights (gather them for generation: ds3_gather_for_generation)"
        _log_once(inner, problem, logging.INFO)
        return problem
    if inner in _VERIFIED:
        return _VERIFIED[inner]
    problem = _structure_problem(inner)
    level = logging.INFO
    if problem is None:
        level = logging.WARNING
        try:
            dtype = inner.lm_head.weight.dtype
            tol = verification_tolerance(dtype)
            diff = _max_difference_from_hf(model, inner, tol)
            if diff is not None:
                problem = (f"its decode logits differ from the model's own forward by {diff:.1e}, "
                           f"more than {tol:.1e} ({dtype})")
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            problem = f"the check raised {type(exc).__name__}: {exc}"
    _VERIFIED[inner] = problem
    if problem is not None:
        _log_once(inner, problem, level)
    return problem


def _partitioned_now(model: nn.Module) -> bool:
    """True when some ZeRO-3 parameter holds only its local shard at this moment (``ds_numel``
    is its full size; inside ``deepspeed.zero.GatheredParameters`` the data is whole)."""
    return any(hasattr(p, "ds_id") and p.numel() != p.ds_numel for p in model.parameters())


def _log_once(model: nn.Module, problem: str, level: int) -> None:
    key = (type(model).__name__, problem)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, "fast decoder not used for %s (%s); decoding with the Hugging Face "
                "forward instead", type(model).__name__, problem)


def supports_fast_decode(model: nn.Module) -> bool:
    """Whether :class:`FastDecoder` reproduces ``model``'s own decode logits
    (:func:`fast_decode_problem` is None)."""
    return fast_decode_problem(model) is None


def _max_difference_from_hf(model: nn.Module, inner: nn.Module, tol: float) -> float | None:
    """None when three decode steps of two left-padded prompts give the model's own logits to
    ``tol`` (atol = rtol), else the largest absolute difference. Both run in the model's dtype
    (a bf16 policy decodes in bf16) and are compared in float32."""
    device = next(inner.parameters()).device
    vocab = int(inner.config.vocab_size)
    ids = (torch.arange(10, device=device).reshape(2, 5) * 7 + 3) % max(vocab - 1, 1) + 1
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], device=device)
    new = (torch.arange(6, device=device).reshape(2, 3) * 5 + 2) % max(vocab - 1, 1) + 1
    hf = HFDecoder(model, ids, mask)
    dec = FastDecoder.after(model, hf, max_len=5 + 3)
    full_mask, pos = mask, mask.sum(1)
    for t in range(3):
        full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], 1)
        ref = hf.step(new[:, t], pos + t, 5 + t, full_mask).float()
        got = dec.step(new[:, t], pos + t, 5 + t, full_mask).float()
        if not torch.allclose(got, ref, atol=tol, rtol=tol):
            return float((got - ref).abs().max())
    return None
