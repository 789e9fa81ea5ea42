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

from ppo_core.data import encode_prompt, encode_prompt_response, mask_from_starts, pad_sequences
from ppo_core.models import load_tokenizer
from ppo_core.rewards import ImplicitReward

_LOADED: list = []


def score(prompts: list[str], responses: list[str]) -> list[float]:
    if not _LOADED:
        tok = load_tokenizer(os.environ["IMP_RM"])
        pol = AutoModelForCausalLM.from_pretrained(os.environ["IMP_RM"])
        ref = AutoModelForCausalLM.from_pretrained(os.environ["IMP_REF"])
        _LOADED.extend([tok, ImplicitReward(pol, ref, float(os.environ.get("IMP_BETA", "0.1")))])
    tok, reward = _LOADED
    seqs = [encode_prompt_response(tok, p, r, 160).input_ids for p, r in zip(prompts, responses)]
    ids, mask = pad_sequences(seqs, tok.pad_token_id)
    starts = torch.tensor([len(encode_prompt(tok, p)) for p in prompts])
    return reward(prompts, responses, ids, mask, response_mask=mask_from_starts(starts, mask)).tolist()
