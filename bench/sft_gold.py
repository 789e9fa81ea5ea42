"""Mean gold reward of SFT models' samples: the first 96 test prompts x 4 samples at
temperature 0.7, up to 32 new tokens, one seed for every model (BENCHMARKS.md, generality
suite, "What changed: the SFT recipe").

    .venv/bin/python bench/sft_gold.py RLHF_HOME bench.tasks.constraints:gold_score_batch SFT_DIR [SFT_DIR ...]
"""
import glob, sys, importlib
from pathlib import Path
import pandas as pd, torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ppo_core.data import encode_prompt, pad_sequences
from ppo_core.models import load_causal_lm, load_tokenizer
from ppo_core.generation import sample
torch.set_num_threads(1)
home, spec = sys.argv[1], sys.argv[2]
m, f = spec.split(":"); gold = getattr(importlib.import_module(m), f)
split = Path(glob.glob(f"{home}/data/splits/*/manifest.json")[0]).parent
prompts = pd.read_parquet(split / "test_prompts.parquet")["prompt"].astype(str).tolist()[:96]
for d in sys.argv[3:]:
    tok = load_tokenizer(d); model = load_causal_lm(d).eval()
    g = torch.Generator().manual_seed(0); scores = []
    for rep in range(4):
        for i in range(0, len(prompts), 48):
            ps = prompts[i:i+48]
            ids, mask = pad_sequences([encode_prompt(tok, p) for p in ps], tok.pad_token_id, side="left")
            with torch.no_grad():
                out = sample(model, ids, mask, max_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0.7, generator=g)
            texts = tok.batch_decode(out.responses.masked_fill(~out.response_mask, tok.pad_token_id), skip_special_tokens=True)
            scores += gold(ps, texts)
    print(d, round(sum(scores)/len(scores), 3))
