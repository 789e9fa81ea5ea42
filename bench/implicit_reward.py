"""A PPO reward function (``reward_function: "bench.implicit_reward:score"``) that scores a
response with an implicit (DPO) reward model: beta * (log pi(y|x) - log pi_ref(y|x)) summed over
the response's tokens and its EOS, pi in ``$IMP_RM`` (``bench/dpo_probe.py --save``) and pi_ref
in ``$IMP_REF`` (the SFT model it started from), beta ``$IMP_BETA`` (default 0.1; PPO's reward
normaliser rescales it anyway). Each response is re-encoded from its text as the probe encoded
its pairs (prompt + response + EOS).
"""
from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from ppo_core.data import encode_prompt, encode_prompt_response, pad_sequences
from ppo_core.models import load_tokenizer

_LOADED: list = []


def response_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                   prompt_lens: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded prompt + response ids -> (B,) summed log-probs of the response tokens."""
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    t = torch.arange(1, ids.shape[1])[None]
    resp = (t >= prompt_lens[:, None]) & mask[:, 1:].bool()
    return (lp * resp).sum(1)


def score(prompts: list[str], responses: list[str]) -> list[float]:
    if not _LOADED:
        tok = load_tokenizer(os.environ["IMP_RM"])
        pol = AutoModelForCausalLM.from_pretrained(os.environ["IMP_RM"]).eval()
        ref = AutoModelForCausalLM.from_pretrained(os.environ["IMP_REF"]).eval()
        _LOADED.extend([tok, pol, ref, float(os.environ.get("IMP_BETA", "0.1"))])
    tok, pol, ref, beta = _LOADED
    seqs = [encode_prompt_response(tok, p, r, 160).input_ids for p, r in zip(prompts, responses)]
    pls = torch.tensor([len(encode_prompt(tok, p)) for p in prompts])
    ids, mask = pad_sequences(seqs, tok.pad_token_id)
    with torch.no_grad():
        return (beta * (response_logps(pol, ids, mask, pls) - response_logps(ref, ids, mask, pls))).tolist()
