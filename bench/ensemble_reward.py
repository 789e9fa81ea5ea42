"""A PPO reward function (``reward_function: "bench.ensemble_reward:score"``) that averages
several reward models' raw scores: the directories in ``$ENS_RM``, colon-separated. Each
response is re-encoded from its text (prompt + response + EOS, as the reward models were
trained). For the ensemble comparison in BENCHMARKS.md; the engine itself runs one model.
"""
from __future__ import annotations

import os

import torch

from ppo_core.data import encode_prompt_response, pad_sequences
from ppo_core.models import last_token_scores, load_sequence_scorer, load_tokenizer

_LOADED: list = []


def score(prompts: list[str], responses: list[str]) -> list[float]:
    if not _LOADED:
        dirs = os.environ["ENS_RM"].split(":")
        tok = load_tokenizer(dirs[0])
        _LOADED.extend([tok, [load_sequence_scorer(d, pad_token_id=tok.pad_token_id).eval() for d in dirs]])
    tok, models = _LOADED
    seqs = [encode_prompt_response(tok, p, r, 160).input_ids for p, r in zip(prompts, responses)]
    ids, mask = pad_sequences(seqs, tok.pad_token_id)
    with torch.no_grad():
        return torch.stack([last_token_scores(m, ids, mask).float() for m in models]).mean(0).tolist()
