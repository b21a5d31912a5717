"""Length generalisation and memory use: models trained on T=512 windows generate and read 30,000 tokens.

1. Generation: one token at a time with `NordLM.step` (O(1) state), sampling at --temperature; after each
   token the largest |H| of every layer's mixer membrane is recorded. H_t = a_t·H_{t−1} + (1−a_t)·X_t is a
   convex combination of past inputs, so it must stay within the inputs' range however long the run.
2. Validation loss by position: rows of --eval-len consecutive validation tokens are read in windows of
   the training length with the neuron state carried across windows (exactly one long forward pass),
   and the per-token cross-entropy is averaged in position buckets 0–512, 512–1k, 1k–2k, 2k–4k, ...
   Control: the same tokens with the state reset at every window (context ≤ the training length). Buckets
   hold different text, so "carried − reset" per bucket is what isolates the effect of running past 512;
   over the whole rows, exp(reset − carried) − 1 is what the carried state is worth in perplexity, and
   "reset" alone is the fresh-window validation loss.

Arms (--arms, trained one after the other from the same seed on the same batches, side by side in one run):
    old       the mixer neurons' initial decays σ(b) linear in [0.5, 0.98] (τ = 1/(1 − σ(b)) ≈ 2–50 tokens,
              median 3.8), set by this script over the model's own init
    log       b linear in [0, 6.9]: τ = 1 + e^b log-spaced from 2 to ~1,000 tokens (median 32), likewise
    default   the model's initial decays as they are in nord/neurons/dynamic.py
    +carry    suffix: train on row-continuous batches with the state carried between steps
              (`train_steps(carry_state=True)`, `stream_batches`) instead of fresh random windows

3. With --cache, how much long-range repetition the text offers at all: each row's tokens are also scored
   by a mixture (1 − λ)·p_model + λ·p_cache, p_cache the decayed counts of the tokens read so far
   (c ← γ·c + onehot(token), a unigram cache in the manner of Grave et al.'s neural cache), kept over the
   whole row (with the carried model) or restarted at every window (with the reset model). λ and γ are
   picked on the first row (carried) and reported on the others, so --eval-rows must be at least 2.

The model is a checkpoint written by `nord train` (--checkpoint, one arm) or trained here (--model).

    python bench/length.py [--quick] [--model tiny --train-steps 300 --arms old,log,old+carry |
                            --checkpoint runs/x/model.safetensors]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nord.config import TrainConfig
from nord.data import DataConfig, prepare
from nord.model import NordLM, load_model, save_model
from nord.neurons import DynamicDecayNeuron
from nord.recipes import RECIPES, get_config
from nord.train import cosine_lr, make_optimizer, stream_batches, train_steps

INITS = ("old", "log", "default")
CARRY = "carry"


def set_decay_init(model: NordLM, init: str) -> None:
    """Overwrite every mixer neuron's decay bias b with the `init` spread across its channels."""
    for m in model.modules():
        if isinstance(m, DynamicDecayNeuron):
            if init == "old":  # σ(b) linear in [0.5, 0.98]: τ = 1/(1 − σ(b)) from 2 to 50 tokens
                m.conv_bias.data.copy_(torch.logit(torch.linspace(0.5, 0.98, m.dim)))
            else:  # "log": b linear in [0, 6.9], τ = 1 + e^b log-spaced from 2 to ~1,000 tokens
                m.conv_bias.data.copy_(torch.linspace(0.0, 6.9, m.dim))


def decay_time_constants(model: NordLM) -> torch.Tensor:
    """1 / (1 − σ(b)) of every mixer channel (the time constant without the input-dependent term)."""
    biases = [m.conv_bias.detach() for m in model.modules() if isinstance(m, DynamicDecayNeuron)]
    return 1 / (1 - torch.sigmoid(torch.cat(biases)).double())


def train_arm(arm: str, recipe: str, corpus, args: argparse.Namespace) -> tuple[NordLM, dict]:
    init, _, carry = arm.partition("+")
    cfg = dataclasses.replace(get_config(recipe, vocab_size=corpus.vocab_size), max_seq_len=args.seq_len)
    torch.manual_seed(args.seed)
    model = NordLM(cfg)
    if init != "default":
        set_decay_init(model, init)
    tau = decay_time_constants(model)
    train_cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
    optimizer = make_optimizer(model, train_cfg, "cpu")
    lr_fn = cosine_lr(args.lr, warmup_steps=max(1, args.train_steps // 10), total_steps=args.train_steps)
    if carry:
        batches = stream_batches(corpus.train, args.batch_size, args.seq_len, seed=args.seed)
    else:
        batches = iter(corpus.batches("train", args.batch_size, args.seq_len, seed=args.seed))
    stats = train_steps(model, optimizer, batches, args.train_steps, grad_clip=train_cfg.grad_clip,
                        lr_fn=lr_fn, device="cpu", carry_state=bool(carry))  # fmt: skip
    trained_tau = decay_time_constants(model)
    info = {"arm": arm, "recipe": recipe, "train_steps": args.train_steps, "train_tokens": stats.tokens,
            "train_loss": stats.loss, "train_firing_rate": stats.firing_rate, "train_s": stats.seconds,
            "init_tau_min_median_max": [tau.min().item(), tau.median().item(), tau.max().item()],
            "trained_tau_min_median_max": [trained_tau.min().item(), trained_tau.median().item(),
                                           trained_tau.max().item()],
            "trained_share_tau_over_100": (trained_tau > 100).double().mean().item()}  # fmt: skip
    return model, info


@torch.inference_mode()
def generate_and_watch(model: NordLM, n_tokens: int, temperature: float, seed: int, bucket: int) -> dict:
    """Sample `n_tokens` one at a time; per layer, the largest |H| in each bucket of `bucket` tokens."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    idx = torch.zeros(1, dtype=torch.long)
    n_layers = len(model.blocks)
    max_h = torch.zeros(math.ceil(n_tokens / bucket), n_layers)
    rate_sum, ids = 0.0, []
    start = time.perf_counter()
    for t in tqdm(range(n_tokens), desc="generate", unit="tok", mininterval=2):
        logits, state, rates = model.step(idx, state)
        peaks = torch.stack([s.h.abs().max() for s in state])  # (L,)
        max_h[t // bucket] = torch.maximum(max_h[t // bucket], peaks)
        rate_sum += rates["overall"].item()
        idx = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=gen)[:, 0]
        ids.append(int(idx))
    seconds = time.perf_counter() - start
    finite = all(torch.isfinite(s.h).all() for s in state)
    return {"tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds, "bucket": bucket,
            "max_abs_h": max_h.tolist(), "firing_rate": rate_sum / n_tokens, "finite": bool(finite),
            "ids": ids}  # fmt: skip


@torch.no_grad()
def loss_by_position(
    model: NordLM, corpus, eval_len: int, rows: int, window: int, cache: bool = False
) -> dict:
    """Mean cross-entropy in position buckets [0, w), [w, 2w), [2w, 4w), ... over `rows` long rows."""
    model.eval()
    rows = min(rows, (len(corpus.val) - 1) // eval_len)
    if rows < 1:
        raise SystemExit(
            f"--eval-len {eval_len} is longer than the validation split ({len(corpus.val)} tokens)"
        )
    tokens = torch.from_numpy(corpus.val[: rows * eval_len + 1].astype("int64"))
    x = tokens[:-1].view(rows, eval_len)
    y = tokens[1:].view(rows, eval_len)
    carried_nll, reset_nll, state = [], [], None
    for start in tqdm(range(0, eval_len, window), desc="eval by position", unit="window"):
        xs, ys = x[:, start : start + window], y[:, start : start + window]
        out = model(xs, state=state)
        state = out.state
        carried_nll.append(F.cross_entropy(out.logits.float().transpose(1, 2), ys, reduction="none"))
        fresh = model(xs).logits.float().transpose(1, 2)
        reset_nll.append(F.cross_entropy(fresh, ys, reduction="none"))
    per_token = {
        "carried": torch.cat(carried_nll, 1).mean(0),
        "reset": torch.cat(reset_nll, 1).mean(0),
    }  # (eval_len,)
    edges = [0, window]
    while edges[-1] < eval_len:
        edges.append(min(2 * edges[-1], eval_len))
    buckets = [{"start": a, "end": b, **{k: v[a:b].mean().item() for k, v in per_token.items()}}
               for a, b in zip(edges[:-1], edges[1:], strict=True)]  # fmt: skip
    carried, reset = per_token["carried"].mean().item(), per_token["reset"].mean().item()
    result = {"rows": rows, "eval_len": eval_len, "buckets": buckets, "carried": carried, "reset": reset,
              "carried_ppl_gain": math.exp(reset - carried) - 1}  # fmt: skip
    if cache:
        nll = {"carried": torch.cat(carried_nll, 1), "reset": torch.cat(reset_nll, 1)}
        result["cache"] = cache_probe(nll, x.numpy(), y.numpy(), model.cfg.vocab_size, window)
    return result


CACHE_DECAYS = (0.99, 0.995, 0.999, 1.0)
CACHE_WEIGHTS = (0.02, 0.05, 0.1)


def cache_hits(x: np.ndarray, y: np.ndarray, vocab: int, decay: float, window: int | None) -> np.ndarray:
    """p_cache(y_t) from the decayed counts of x_0..x_t (restarted every `window` tokens if given)."""
    counts, out = np.zeros(vocab), np.empty(len(x))
    total, weight = 0.0, 1.0  # counts are stored scaled by decay^-t, so nothing decays in place
    for t in range(len(x)):
        if window and t % window == 0:
            counts[:], total, weight = 0.0, 0.0, 1.0
        weight /= decay
        if weight > 1e200:  # rescale before float64 overflows
            counts, total, weight = counts / weight, total / weight, 1.0
        counts[x[t]] += weight
        total += weight
        out[t] = counts[y[t]] / total
    return out


def cache_probe(nll: dict, x: np.ndarray, y: np.ndarray, vocab: int, window: int) -> dict:
    """Mixture loss (1 − λ)·p_model + λ·p_cache with (λ, γ) picked on row 0, reported on rows 1..."""
    if x.shape[0] < 2:
        raise SystemExit("--cache needs --eval-rows >= 2 (one row picks the mixture, the others report it)")

    def mixed(row: int, mode: str, weight: float, decay: float) -> float:
        hits = cache_hits(x[row], y[row], vocab, decay, window if mode == "reset" else None)
        p = (1 - weight) * np.exp(-nll[mode][row].double().numpy()) + weight * hits
        return float(-np.log(p).mean())

    grid = [(mixed(0, "carried", w, d), w, d) for d in CACHE_DECAYS for w in CACHE_WEIGHTS]
    _, weight, decay = min(grid)
    rows = range(1, x.shape[0])
    loss = {
        mode: float(np.mean([mixed(r, mode, weight, decay) for r in rows])) for mode in ("carried", "reset")
    }
    model_only = {mode: float(nll[mode][1:].double().mean()) for mode in ("carried", "reset")}
    return {"weight": weight, "decay": decay, "report_rows": len(rows), "model_only": model_only,
            "with_cache": loss, "carried_ppl_gain": math.exp(loss["reset"] - loss["carried"]) - 1,
            "gain_over_fresh_model": math.exp(model_only["reset"] - loss["carried"]) - 1}  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        gen, by_pos = r["generation"], r["loss_by_position"]
        max_h = torch.tensor(gen["max_abs_h"]).amax(1)  # (buckets,) over layers
        left.plot([(j + 1) * gen["bucket"] for j in range(len(max_h))], max_h, label=r["model"]["arm"])
        gaps = [b["carried"] - b["reset"] for b in by_pos["buckets"]]
        right.bar([j + (i - (len(results) - 1) / 2) * width for j in range(len(gaps))], gaps, width,
                  label=r["model"]["arm"])  # fmt: skip
    left.set_xlabel("generated tokens")
    left.set_ylabel("max |H| over layers per 1,000 tokens")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    buckets = results[0]["loss_by_position"]["buckets"]
    right.set_xticks(range(len(buckets)), [f"{b['start']}–{b['end']}" for b in buckets])
    right.axhline(0, color="black", lw=0.5)
    right.legend(fontsize=8)
    right.set_xlabel("token position")
    right.set_ylabel("carried − reset val loss (nats)")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: dict) -> None:
    gen, by_pos = result["generation"], result["loss_by_position"]
    print(f"\nmodel: {result['model']}")
    max_h = torch.tensor(gen["max_abs_h"])
    print(f"generated {gen['tokens']} tokens at {gen['tokens_per_s']:.0f} tok/s, "
          f"firing {gen['firing_rate']:.3f}, state finite: {gen['finite']}")  # fmt: skip
    print(f"{'layer':>5} | {'max|H| 1st 1k':>13} {'max|H| last 1k':>14} {'max|H| overall':>14}")
    for layer in range(max_h.shape[1]):
        col = max_h[:, layer]
        print(f"{layer:>5} | {col[0]:13.3f} {col[-1]:14.3f} {col.max():14.3f}")
    print(f"{'positions':>12} | {'carried':>8} {'reset':>8} {'carried−reset':>13}   (val loss, nats/token)")
    for b in by_pos["buckets"]:
        gap = b["carried"] - b["reset"]
        print(f"{b['start']:>5}–{b['end']:<6} | {b['carried']:8.4f} {b['reset']:8.4f} {gap:+13.4f}")
    print(f"{'all':>12} | {by_pos['carried']:8.4f} {by_pos['reset']:8.4f} "
          f"{by_pos['carried'] - by_pos['reset']:+13.4f}   carried state worth "
          f"{by_pos['carried_ppl_gain']:+.2%} perplexity")  # fmt: skip
    if "cache" in by_pos:
        c = by_pos["cache"]
        print(f"unigram cache (λ {c['weight']}, γ {c['decay']}, picked on row 0; rows 1..): carried "
              f"{c['with_cache']['carried']:.4f}, reset {c['with_cache']['reset']:.4f} → carried state "
              f"worth {c['carried_ppl_gain']:+.2%}; {c['gain_over_fresh_model']:+.2%} over the fresh "
              f"windows without a cache ({c['model_only']['reset']:.4f})")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.safetensors from `nord train`")
    parser.add_argument("--model", default="tiny", choices=sorted(RECIPES), help="recipe to train here")
    parser.add_argument("--arms", default="old,log", help="comma-separated: old, log, default; +carry suffix")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="training window (the length to exceed)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gen-tokens", type=int, default=30_000)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-len", type=int, default=30_000, help="length of each validation row")
    parser.add_argument("--eval-rows", type=int, default=8, help="rows (at most what the split holds)")
    parser.add_argument(
        "--cache", action="store_true", help="also score with a unigram cache (module doc, 3.)"
    )
    parser.add_argument("--save", type=Path, default=None, help="directory for the models trained here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 2,000 tokens, 2k rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results/length.json"))
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.gen_tokens, args.eval_len, args.eval_rows = 20, 2000, 2048, 2
    arms = args.arms.split(",")
    if bad := [a for a in arms if a.partition("+")[0] not in INITS or a.partition("+")[2] not in ("", CARRY)]:
        parser.error(f"unknown arms {bad}: each is one of {INITS}, optionally with +carry")
    torch.set_num_threads(args.threads)
    corpus = prepare(DataConfig(source="shakespeare"), progress=False)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
            "machine": platform.machine()}  # fmt: skip
    results = []
    for arm in ["checkpoint"] if args.checkpoint is not None else arms:
        if args.checkpoint is not None:
            model, ckpt = load_model(args.checkpoint)
            window = model.cfg.max_seq_len
            model_info = {"arm": arm, "checkpoint": str(args.checkpoint), "step": ckpt.get("step"),
                          "seq_len": window}  # fmt: skip
        else:
            model, model_info = train_arm(arm, args.model, corpus, args)
            window = args.seq_len
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                tokenizer = {"tokenizer_sha256": corpus.tokenizer_hash}
                save_model(args.save / f"{arm}.safetensors", model, tokenizer)
        model_info["params"] = model.num_params()
        gen = generate_and_watch(model, args.gen_tokens, args.temperature, args.seed, bucket=1000)
        by_pos = loss_by_position(model, corpus, args.eval_len, args.eval_rows, window, args.cache)
        sample = corpus.decode(gen.pop("ids")[:300])
        results.append({"model": model_info, "generation": gen, "loss_by_position": by_pos, "sample": sample})
        report(results[-1])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))  # after every arm
    print(f"\n{'arm':<16} {'train loss':>10} {'val loss (fresh)':>16} {'carried':>8} {'carried gain':>12} "
          f"{'τ>100 share':>11}")  # fmt: skip
    for r in results:
        m, b = r["model"], r["loss_by_position"]
        share = m.get("trained_share_tau_over_100", float("nan"))
        print(f"{m['arm']:<16} {m.get('train_loss', float('nan')):>10.4f} {b['reset']:>16.4f} "
              f"{b['carried']:>8.4f} {b['carried_ppl_gain']:>+12.2%} {share:>11.1%}")  # fmt: skip
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
