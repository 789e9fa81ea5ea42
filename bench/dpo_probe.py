"""Implicit (DPO) reward-model probe on a finished lineage's splits.

The reward of a response is beta * (log pi(y|x) - log pi_ref(y|x)) summed over its tokens
(Rafailov et al. 2023, "Direct Preference Optimization", eq. 5), where pi starts as the lineage's
SFT model and pi_ref is that SFT model frozen; pi is trained with the Bradley-Terry loss on
``rm_train.parquet`` (the DPO loss). The scalar reward model of ``bench/rm_probe.py`` learns one
number at the last token from a fresh head; this one learns through every response token's
next-token distribution, which SFT has already shaped. Prints, twice per epoch, the eval-split
loss and accuracy and the gold-order agreement on ``test_pairs.parquet``; the last line is a
JSON summary, the same keys as ``rm_probe``'s for ``/tmp``-style tables.

    .venv/bin/python bench/dpo_probe.py --home RLHF_HOME --task facts --mismatch 0.5 --beta 0.1

``--dump F`` writes the test pairs' scores for ``bench/rm_ensemble.py scores``. ``--norm mean`` divides each sequence's log-ratio by its response length; ``--ref-free`` drops
pi_ref (SimPO, Meng et al. 2024, with ``--norm mean``).
"""
import argparse, json, math, sys, time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ppo_core.data import mask_from_starts, pad_sequences
from ppo_core.models import load_tokenizer, sequence_logprobs, training_dropout
from ppo_core.reward import mismatched_pairs
from bench.guard_replay import gold_scorer
from bench.probe_data import encoded_sets, gold_agreement, lineage_dirs

p = argparse.ArgumentParser()
p.add_argument("--home", required=True)
p.add_argument("--task", required=True)
p.add_argument("--epochs", type=float, default=4)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--beta", type=float, default=0.1)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--bs", type=int, default=32)
p.add_argument("--mismatch", type=float, default=0.0)
p.add_argument("--norm", choices=("sum", "mean"), default="sum")
p.add_argument("--ref-free", action="store_true")
p.add_argument("--sft-coef", type=float, default=0.0, help="NLL on the chosen response (RPO, Pang et al. 2024)")
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--train-file", default="rm_train.parquet")
p.add_argument("--save", default="", help="save the trained policy here (save_pretrained), for bench/implicit_reward.py")
p.add_argument("--dump", default="", help="write the test pairs' scores (final and at the best eval loss) here, .pt, for bench/rm_ensemble.py scores")
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(args.seed)
split, sft = lineage_dirs(args.home)
gold = gold_scorer(args.task)
tok = load_tokenizer(sft)
train = pd.read_parquet(split / args.train_file)
records = train[["prompt", "chosen", "rejected"]].to_dict("records")
if args.mismatch > 0:
    extra = mismatched_pairs(records, args.mismatch, args.seed)
    train = pd.concat([train, pd.DataFrame(extra)[["prompt", "chosen", "rejected"]]], ignore_index=True)
print("train pairs", len(train), flush=True)
tr, evd, ted, g_c, g_r = encoded_sets(tok, split, train, gold)
policy = AutoModelForCausalLM.from_pretrained(sft)
ref = AutoModelForCausalLM.from_pretrained(sft).eval().requires_grad_(False)
if args.dropout > 0:
    training_dropout(policy, args.dropout)


def seq_logps(model, batch):  # -> (2b,) summed (or mean) response log-probs, chosen then rejected
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    ids, mask = pad_sequences(seqs, tok.pad_token_id)  # (2b, t)
    resp = mask_from_starts(torch.tensor([b[2] for b in batch] * 2), mask)
    s = sequence_logprobs(model, ids, mask, resp)
    return s / resp[:, 1:].sum(1) if args.norm == "mean" else s


@torch.no_grad()
def ref_logps(data):
    if args.ref_free:
        return torch.zeros(2 * len(data))
    out = [seq_logps(ref, data[i:i + 64]) for i in range(0, len(data), 64)]
    b = [o.shape[0] // 2 for o in out]
    return torch.cat([o[:k] for o, k in zip(out, b)] + [o[k:] for o, k in zip(out, b)])  # chosen all, then rejected all


t0 = time.time()
ref_tr, ref_ev, ref_te = ref_logps(tr), ref_logps(evd), ref_logps(ted)
print(f"reference log-probs ({time.time()-t0:.0f}s)", flush=True)


@torch.no_grad()
def rewards(data, refs):
    policy.eval()
    out = [seq_logps(policy, data[i:i + 64]) for i in range(0, len(data), 64)]
    policy.train()
    b = [o.shape[0] // 2 for o in out]
    pol = torch.cat([o[:k] for o, k in zip(out, b)] + [o[k:] for o, k in zip(out, b)])
    r = args.beta * (pol - refs)
    n = len(data)
    return r[:n], r[n:]


def agreement(c, r):
    return gold_agreement(c.tolist(), r.tolist(), g_c, g_r)


bs = args.bs
steps_per_epoch = len(tr) // bs
total = int(steps_per_epoch * args.epochs)
opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
sched = get_cosine_schedule_with_warmup(opt, int(0.03 * total), total)
g = torch.Generator().manual_seed(args.seed)
n_tr = len(tr)
best, hist, step = (float("inf"), None), [], 0
policy.train()
for ep in range(math.ceil(args.epochs)):
    perm = torch.randperm(n_tr, generator=g).tolist()
    for k in range(steps_per_epoch):
        if step >= total:
            break
        idx = perm[k * bs:(k + 1) * bs]
        s = seq_logps(policy, [tr[i] for i in idx])
        b = len(idx)
        it = torch.tensor(idx)
        rc = args.beta * (s[:b] - ref_tr[it])
        rr = args.beta * (s[b:] - ref_tr[n_tr + it])
        loss = -F.logsigmoid(rc - rr).mean()
        if args.sft_coef > 0:  # NLL per token of the chosen response
            loss = loss - args.sft_coef * s[:b].mean() / (1 if args.norm == "mean" else 16)
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step(); sched.step(); step += 1
        if step % max(1, steps_per_epoch // 2) == 0 or step == total:
            c, r = rewards(evd, ref_ev)
            el = float(-F.logsigmoid(c - r).mean()); ea = float((c > r).float().mean())
            tc, trr = rewards(ted, ref_te)
            ag = agreement(tc, trr)
            last_scores = (tc, trr)
            hist.append((step, round(el, 4), round(ea, 3), round(ag, 3)))
            print(f"step {step} eval_loss {el:.4f} eval_acc {ea:.3f} gold_agree {ag:.3f} ({time.time()-t0:.0f}s)", flush=True)
            if el < best[0]:
                best = (el, (step, ag))
                best_scores = (tc, trr)
print(json.dumps({"kind": "dpo", "beta": args.beta, "lr": args.lr, "norm": args.norm, "ref_free": args.ref_free,
                  "mismatch": args.mismatch, "seed": args.seed, "epochs": args.epochs, "sft_coef": args.sft_coef,
                  "dropout": args.dropout, "best_step": best[1][0], "gold_agree_at_best": best[1][1],
                  "final": hist[-1][3]}))
if args.dump:
    torch.save({"best": best_scores, "final": last_scores, "gold": (g_c, g_r)}, args.dump)
if args.save:
    policy.save_pretrained(args.save); tok.save_pretrained(args.save)
