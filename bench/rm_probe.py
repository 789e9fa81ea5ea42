"""Reward-model recipe probes on a finished lineage's splits (BENCHMARKS.md, generality suite).

Trains one reward model with a plain PyTorch loop (our recipe: AdamW, LR 5e-4, cosine with 3%
warmup, batch 32, 4 epochs, head std 1/sqrt(h+1)) from an SFT model on ``rm_train.parquet`` and
prints, twice per epoch, the eval-split loss and accuracy and the gold-order agreement on
``test_pairs.parquet``; the last line is a JSON summary (agreement at the best eval loss and at
the end). Options change one thing at a time: ``--pool sum|mean`` (score pooled over the
response instead of the last token), ``--lm-coef`` (an LM loss on the chosen response),
``--gold-labels`` (training pairs put in gold order), ``--extra N`` (N more generated pairs),
``--all-pairs`` (the held-out RM's pairs too), ``--sft DIR`` (another SFT start),
``--mismatch F`` (F x the pairs more, from ``ppo_core.reward.mismatched_pairs``; with
``--partner similar`` from ``bench.hard_negatives``), ``--center C``
(the engine's centering loss, ``RewardConfig.center_coef``), ``--ema D`` (also the agreement of
an exponential moving average of the weights), ``--init-seed S`` (the new head's init seed,
apart from the data order's), ``--bs N`` (pairs per step), ``--smooth E`` (label smoothing,
``RewardConfig.label_smoothing``; ``--smooth-on real|mismatched`` smooths the labelled pairs or
the mismatched negatives only), ``--dropout P`` (the engine's
``training_dropout``), ``--attn-drop`` / ``--resid-drop`` /
``--head-drop P`` (dropout on the attention probabilities / on each attention and MLP output
before the residual add / on the hidden state the score head reads), ``--save DIR`` (the final model, save_pretrained) and ``--dump F``
(the test pairs' scores, for ``bench/rm_ensemble.py``).

    .venv/bin/python bench/rm_probe.py --home RLHF_HOME --task constraints [--pool sum]

``--task`` is a generality task name or a gold scorer ``module:function``.
"""
import argparse, importlib, json, math, sys, time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ppo_core.data import pad_sequences
from ppo_core.models import build_scorer_from_causal_lm, load_tokenizer, trunk_of, score_head, set_attention_dropout, training_dropout
from ppo_core.reward import bradley_terry_loss, mismatched_pairs
from bench.guard_replay import gold_scorer
from bench.probe_data import encoded_sets, gold_agreement, lineage_dirs
from bench.repeat_negatives import repeated_segment_pairs


p = argparse.ArgumentParser()
p.add_argument("--home", required=True)
p.add_argument("--task", required=True)
p.add_argument("--pool", default="last")
p.add_argument("--all-pairs", action="store_true")
p.add_argument("--epochs", type=float, default=4)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--init-seed", type=int, default=None, help="seed of the new head's init (default: --seed)")
p.add_argument("--sft", default="")
p.add_argument("--extra", type=int, default=0)
p.add_argument("--train-file", default="rm_train.parquet")
p.add_argument("--lm-coef", type=float, default=0.0)
p.add_argument("--gold-labels", action="store_true")
p.add_argument("--mismatch", type=float, default=0.0)
p.add_argument("--partner", choices=("random", "similar"), default="random",
               help="mismatched partner: random (the engine's) or similar (bench.hard_negatives)")
p.add_argument("--partner-k", type=int, default=8, help="similar: the partner is one of this many nearest prompts")
p.add_argument("--repeat", type=float, default=0.0,
               help="F x the real pairs more, a chosen answer over itself with one segment repeated "
                    "(bench.repeat_negatives)")
p.add_argument("--center", type=float, default=0.0, help="centering loss coefficient on (r_c + r_r)^2")
p.add_argument("--trunk-lr-mult", type=float, default=1.0,
               help="the trunk's LR is this times --lr (the score head keeps --lr); 0 freezes the trunk")
p.add_argument("--ema", type=float, default=0.0, help="also report the agreement of an EMA of the weights (decay)")
p.add_argument("--save", default="", help="save the final reward model here (save_pretrained)")
p.add_argument("--bs", type=int, default=32, help="pairs per optimizer step")
p.add_argument("--smooth", type=float, default=0.0,
               help="label smoothing (the engine's RewardConfig.label_smoothing)")
p.add_argument("--smooth-on", choices=("all", "real", "mismatched"), default="all",
               help="which pairs --smooth applies to: all, the labelled ones (whose labels are noisy) or the "
                    "mismatched negatives")
p.add_argument("--attn-drop", type=float, default=0.0,
               help="attention-probability dropout while training (ppo_core.models.set_attention_dropout)")
p.add_argument("--resid-drop", type=float, default=0.0,
               help="dropout on each attention and MLP output before the residual add (GPT-2's resid_pdrop; "
                    "Llama family only: hooks trunk.layers[i].self_attn / .mlp)")
p.add_argument("--dropout", type=float, default=0.0,
               help="the engine's dropout (ppo_core.models.training_dropout): attention probabilities and "
                    "each block's residual update")
p.add_argument("--head-drop", type=float, default=0.0,
               help="dropout on the last hidden state before the score head (HF's classifier_dropout)")
p.add_argument("--dump", default="", help="write the test pairs' scores (final and at the best eval loss) here, .pt")
args = p.parse_args()
if args.smooth_on == "mismatched" and not args.mismatch > 0:
    p.error("--smooth-on mismatched smooths the mismatched negatives: set --mismatch F > 0")
torch.set_num_threads(1)
split, sft = lineage_dirs(args.home)
sft = args.sft or sft
gold = gold_scorer(args.task)
tok = load_tokenizer(sft)
train = pd.read_parquet(split / args.train_file)
if args.all_pairs:
    train = pd.concat([train, pd.read_parquet(split / "rm_heldout.parquet")], ignore_index=True)
if args.extra:
    gen = importlib.import_module(f"bench.tasks.{args.task}").generate_pairs(args.extra, seed=99)
    train = pd.concat([train, gen[["prompt", "chosen", "rejected"]]], ignore_index=True)
if args.gold_labels:
    _g = getattr(importlib.import_module(f"bench.tasks.{args.task}"), "gold_score_batch")
    gc, gr = _g(train.prompt.tolist(), train.chosen.tolist()), _g(train.prompt.tolist(), train.rejected.tolist())
    flip = [a < b for a, b in zip(gc, gr)]
    c2 = [r if f else c for c, r, f in zip(train.chosen, train.rejected, flip)]
    r2 = [c if f else r for c, r, f in zip(train.chosen, train.rejected, flip)]
    train = train.assign(chosen=c2, rejected=r2)
records = train[["prompt", "chosen", "rejected"]].to_dict("records")
n_real = len(records)
if args.repeat > 0:
    rep = repeated_segment_pairs(records, args.repeat, args.seed + 1)
    print("repeated-segment pairs added", len(rep), flush=True)
if args.mismatch > 0:  # the engine's own pairs (ppo_core.reward.mismatched_pairs)
    if args.partner == "similar":
        from bench.hard_negatives import similar_mismatched_pairs
        extra = similar_mismatched_pairs(records, args.mismatch, args.seed, k=args.partner_k)
    else:
        extra = mismatched_pairs(records, args.mismatch, args.seed)
    train = pd.concat([train, pd.DataFrame(extra)[["prompt", "chosen", "rejected"]]], ignore_index=True)
    print("mismatched pairs added", len(extra), flush=True)
n_mismatched = len(train) - n_real
if args.repeat > 0:
    train = pd.concat([train, pd.DataFrame(rep)[["prompt", "chosen", "rejected"]]], ignore_index=True)
print("train pairs", len(train), flush=True)
tr, evd, ted, g_c, g_r = encoded_sets(tok, split, train, gold)
if args.lm_coef > 0:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(sft)
    hsz = model.config.hidden_size
    model.score = torch.nn.Linear(hsz, 1)
    torch.nn.init.normal_(model.score.weight, std=1.0 / (hsz + 1) ** 0.5); torch.nn.init.zeros_(model.score.bias)
    trunk, head = model.model, model.score
else:
    model = build_scorer_from_causal_lm(sft, pad_token_id=tok.pad_token_id,
                                        seed=args.seed if args.init_seed is None else args.init_seed)
    trunk, head = trunk_of(model), score_head(model)
if args.dropout > 0:
    print("dropout on blocks", training_dropout(model, args.dropout), flush=True)
if args.attn_drop > 0:
    assert set_attention_dropout(model, args.attn_drop), "no module has an attention-dropout rate"
if args.resid_drop > 0:
    def _drop_out(mod, inp, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], args.resid_drop, mod.training),) + tuple(out[1:])
        return F.dropout(out, args.resid_drop, mod.training)
    n_res = 0
    for layer in trunk.layers:
        layer.self_attn.register_forward_hook(_drop_out); layer.mlp.register_forward_hook(_drop_out); n_res += 2
    print("residual dropout hooks", n_res, flush=True)
LM = {}
EMA: dict = {}
model.train()


def scores(batch):
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    pls = [b[2] for b in batch] * 2
    ids, mask = pad_sequences(seqs, tok.pad_token_id)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    h = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    v = head(F.dropout(h, args.head_drop, model.training)).squeeze(-1)  # (2b, t)
    if args.lm_coef > 0 and model.training:
        b = len(batch)
        logits = model.lm_head(h[:b, :-1])
        tgt = ids[:b, 1:].clone()
        t_ = torch.arange(1, ids.shape[1])[None]
        keep = (t_ >= torch.tensor(pls[:b])[:, None]) & mask[:b, 1:].bool()
        tgt[~keep] = -100
        LM["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    if args.pool == "last":
        idx = mask.sum(1) - 1
        s = v.gather(1, idx[:, None]).squeeze(1)
    else:
        t = torch.arange(ids.shape[1])[None]
        resp = (t >= torch.tensor(pls)[:, None]) & mask.bool()
        s = (v * resp).sum(1)
        if args.pool == "mean":
            s = s / resp.sum(1)
        elif args.pool == "sumlast":
            idx = mask.sum(1) - 1
            s = s + v.gather(1, idx[:, None]).squeeze(1)
    b = len(batch)
    return s[:b], s[b:]


@torch.no_grad()
def evaluate(data):
    model.eval()
    cs, rs = [], []
    for i in range(0, len(data), 64):
        c, r = scores(data[i:i + 64]); cs.append(c); rs.append(r)
    model.train()
    return torch.cat(cs), torch.cat(rs)


def agreement(c, r):
    return gold_agreement(c.tolist(), r.tolist(), g_c, g_r)


bs = args.bs
steps_per_epoch = len(tr) // bs
total = int(steps_per_epoch * args.epochs)
head_ids = {id(q) for q in head.parameters()}
groups = [{"params": [q for q in model.parameters() if id(q) in head_ids], "lr": args.lr},
          {"params": [q for q in model.parameters() if id(q) not in head_ids], "lr": args.lr * args.trunk_lr_mult}]
opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
sched = get_cosine_schedule_with_warmup(opt, int(0.03 * total), total)
g = torch.Generator().manual_seed(args.seed)
best = (float("inf"), None)
hist = []
t0 = time.time()
step = 0
for ep in range(math.ceil(args.epochs)):
    perm = torch.randperm(len(tr), generator=g).tolist()
    for k in range(steps_per_epoch):
        if step >= total:
            break
        idx = perm[k * bs:(k + 1) * bs]
        batch = [tr[i] for i in idx]
        c, r = scores(batch)
        # --smooth on the pairs --smooth-on picks; the table's rows are n_real labelled pairs, then
        # n_mismatched mismatched ones, then repeats
        picked = torch.tensor([args.smooth_on == "all" or (i < n_real if args.smooth_on == "real"
                                                           else n_real <= i < n_real + n_mismatched) for i in idx])
        loss = torch.cat([bradley_terry_loss(c[picked], r[picked], center_coef=args.center, label_smoothing=args.smooth),
                          bradley_terry_loss(c[~picked], r[~picked], center_coef=args.center)]).mean()  # the engine's
        if args.lm_coef > 0:
            loss = loss + args.lm_coef * LM["loss"]
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); step += 1
        if args.ema > 0:
            with torch.no_grad():
                if not EMA:
                    EMA.update({k: v.detach().clone() for k, v in model.state_dict().items()})
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        EMA[k].mul_(args.ema).add_(v, alpha=1 - args.ema)
        if step % max(1, steps_per_epoch // 2) == 0 or step == total:
            c, r = evaluate(evd)
            el = float(-F.logsigmoid(c - r).mean()); ea = float((c > r).float().mean())
            tc, trr = evaluate(ted)
            ag = agreement(tc, trr)
            hist.append((step, round(el, 4), round(ea, 3), round(ag, 3)))
            print(f"step {step} eval_loss {el:.4f} eval_acc {ea:.3f} gold_agree {ag:.3f} ({time.time()-t0:.0f}s)", flush=True)
            if el < best[0]:
                best = (el, (step, ag))
                best_scores = (tc, trr)
            last_scores = (tc, trr)
ema_agree = None
if EMA:
    model.load_state_dict(EMA)
    ema_scores = evaluate(ted)
    ema_agree = agreement(*ema_scores)
print(json.dumps({"center": args.center, "ema": args.ema, "ema_final": ema_agree, "lm_coef": args.lm_coef, "extra": args.extra, "gold_labels": args.gold_labels, "pool": args.pool, "mismatch": args.mismatch, "repeat": args.repeat, "all_pairs": args.all_pairs, "lr": args.lr, "seed": args.seed, "bs": args.bs, "smooth": args.smooth, "smooth_on": args.smooth_on,
                  "dropout": args.dropout, "attn_drop": args.attn_drop, "resid_drop": args.resid_drop, "head_drop": args.head_drop,
                  "best_step": best[1][0], "gold_agree_at_best": best[1][1], "final": hist[-1][3]}))
if args.dump:  # bench/rm_ensemble.py averages several probes' dumps
    torch.save({"best": best_scores, "final": last_scores, "ema": ema_scores if EMA else None, "gold": (g_c, g_r)}, args.dump)
if args.save:
    model.save_pretrained(args.save); tok.save_pretrained(args.save)
