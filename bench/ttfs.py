"""TTFS MLPs on a trained model: perplexity and spikes, exact and under hardware constraints.

One run, side by side, at equal training tokens:
    1. a `mlp="ttfs"` model trained --steps steps as its ReLU twin, then --finetune-steps more with the
       hardware constraints in the loop (straight-through twin, windows calibrated on a training batch);
    2. the binary spiking MLP model (`mlp="spiking"`) trained --steps + --finetune-steps steps.
Rows: the dense ReLU twin; the TTFS network exact (no constraints); constrained (--time-bits spike-time
clock, --weight-bits weights, --jitter) before and after the fine-tuning; the binary spiking MLP.
Perplexity on the same validation windows, simulated with the closed-form engine; spikes and synaptic
events from the event-driven simulation of the first --stats-tokens validation tokens, whose logits are
checked against the closed form (max |Δ logit| column).

    python bench/ttfs.py --model small --steps 300 --finetune-steps 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch

from nord.config import TrainConfig
from nord.data import DataConfig, prepare
from nord.model import NordLM
from nord.recipes import RECIPES, get_config
from nord.train import cosine_lr, evaluate, make_optimizer, train_steps
from nord.ttfs import TTFSConstraints, calibrate, collect_stats, configure, ttfs_layers


def train(model, corpus, args, steps: int, *, seed: int, lr_fn) -> float:
    cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=seed)
    optimizer = make_optimizer(model, cfg, "cpu")
    batches = iter(corpus.batches("train", args.batch_size, args.seq_len, seed=seed))
    start = time.perf_counter()
    train_steps(model, optimizer, batches, steps, grad_clip=cfg.grad_clip, lr_fn=lr_fn, device="cpu")
    return time.perf_counter() - start


def perplexity(model, corpus, args) -> float:
    return evaluate(model, corpus, seq_len=args.seq_len, max_batches=args.eval_windows, batch_size=8).ppl


@torch.no_grad()
def ttfs_row(name: str, model, corpus, args, stats_idx) -> dict:
    """Perplexity with the closed form; spikes, events and agreement from the event-driven simulation."""
    configure(model, engine="closed")
    ppl = perplexity(model, corpus, args)
    closed = model(stats_idx).logits
    configure(model, engine="events")
    collect_stats(model)
    events = model(stats_idx).logits
    stats = collect_stats(model)
    configure(model, engine="relu")
    return {
        "row": name,
        "ppl": ppl,
        "spikes_per_neuron": stats.spikes_per_neuron,
        "spikes_per_neuron_with_encoders": stats.spikes_per_neuron_all,
        "events_per_token": stats.synaptic_events / stats.tokens,
        "dense_macs_per_token": stats.dense_macs / stats.tokens,
        "events_per_mac": stats.events_per_mac,
        "saturated": stats.saturated,
        "max_abs_logit_diff_events_vs_closed": (events - closed).abs().max().item(),
    }


@torch.no_grad()
def mlp_activity(model, idx) -> float:
    """Share of MLP hidden units that are non-zero per token (spikes of a binary MLP, ReLU's active units)."""
    seen = []
    hooks = [
        b.ttfs.register_forward_hook(lambda m, a, out: seen.append(out[1]))  # the twin's z > 0
        if b.ttfs is not None
        else b.mlp_out.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # binary spikes
        for b in model.blocks
    ]
    model.eval()
    model(idx)
    for hook in hooks:
        hook.remove()
    return sum(float((s != 0).float().mean()) for s in seen) / len(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=list(RECIPES))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--time-bits", type=int, default=4, help="spike times on 2^b ticks per window")
    p.add_argument("--weight-bits", type=int, default=4)
    p.add_argument("--jitter", type=float, default=0.0, help="spike-time noise std (fraction of the window)")
    p.add_argument("--eval-windows", type=int, default=8, help="validation windows of 8 × seq-len tokens")
    p.add_argument("--stats-tokens", type=int, default=64, help="tokens simulated event by event")
    p.add_argument("--skip-spiking", action="store_true", help="leave out the binary spiking MLP row")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a loaded machine)")
    p.add_argument("--out", default="bench/results/ttfs.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    corpus = prepare(DataConfig(vocab_size=args.vocab_size))
    base = dataclasses.replace(get_config(args.model, corpus.vocab_size), max_seq_len=args.seq_len)
    val = torch.from_numpy(corpus.val[: args.stats_tokens].astype("int64"))[None]  # (1, S)
    total = args.steps + args.finetune_steps

    def schedule(steps: int):
        return cosine_lr(args.lr, warmup_steps=min(50, steps // 10), total_steps=steps)

    rows, seconds = [], {}

    torch.manual_seed(0)
    model = NordLM(dataclasses.replace(base, mlp="ttfs"))
    seconds["train_ttfs"] = train(model, corpus, args, args.steps, seed=0, lr_fn=schedule(args.steps))
    twin_ppl = perplexity(model, corpus, args)
    rows.append({"row": "dense ReLU twin", "ppl": twin_ppl, "active_share": mlp_activity(model, val)})
    rows.append(ttfs_row("TTFS exact", model, corpus, args, val))

    constraints = TTFSConstraints(time_bits=args.time_bits, weight_bits=args.weight_bits, jitter=args.jitter)
    calib = next(iter(corpus.batches("train", args.batch_size, args.seq_len, seed=99)))[0]
    calibrate(model, calib)
    for layer in ttfs_layers(model):
        layer.constraints = constraints
        layer.generator = torch.Generator().manual_seed(1)
    label = f"TTFS {args.time_bits}-bit times, {args.weight_bits}-bit weights, jitter {args.jitter:g}"
    rows.append(ttfs_row(f"{label}, before fine-tuning", model, corpus, args, val))
    seconds["finetune"] = train(
        model, corpus, args, args.finetune_steps, seed=1, lr_fn=lambda step: args.finetune_lr
    )
    rows.append(ttfs_row(f"{label}, after {args.finetune_steps} fine-tuning steps", model, corpus, args, val))

    if not args.skip_spiking:
        torch.manual_seed(0)
        spiking = NordLM(dataclasses.replace(base, mlp="spiking"))
        seconds["train_spiking"] = train(spiking, corpus, args, total, seed=0, lr_fn=schedule(total))
        ppl = perplexity(spiking, corpus, args)
        rate = mlp_activity(spiking, val)
        rows.append({"row": "binary spiking MLP", "ppl": ppl, "spikes_per_neuron": rate})

    per_step = args.batch_size * args.seq_len
    tokens = {"twin": args.steps * per_step, "fine-tuned and spiking": total * per_step}
    print(f"\n{args.model}: training tokens {tokens}; eval {args.eval_windows} × 8 × {args.seq_len} tokens")
    print(f"| {'row':70s} | {'ppl':>8s} | spikes/neuron/token | events/token (÷ dense MACs) | saturated |")
    print(f"|{'-' * 72}|{'-' * 10}|{'-' * 21}|{'-' * 29}|{'-' * 11}|")
    for r in rows:
        rate = r.get("spikes_per_neuron", r.get("active_share"))
        rate_text = f"{rate:.3f}" + (" (active)" if "active_share" in r else "")
        events = (
            f"{r['events_per_token']:,.0f} ({r['events_per_mac']:.3f})" if "events_per_token" in r else "—"
        )
        print(
            f"| {r['row']:70s} | {r['ppl']:8.2f} | {rate_text:>19s} | {events:>27s} | "
            f"{r.get('saturated', '—')!s:>9s} |"
        )
    result = {
        "args": vars(args),
        "tokens": tokens,
        "seconds": seconds,
        "rows": rows,
        "machine": f"{platform.machine()} {platform.processor()} torch {torch.__version__}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}; seconds {json.dumps({k: math.floor(v) for k, v in seconds.items()})}")


if __name__ == "__main__":
    main()
