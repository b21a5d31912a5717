"""Validation perplexity at equal training tokens: spiking NordLM vs its dense twin vs a GPT of equal size.

    spiking  NordLM(recipe): binary spikes, firing-rate regulariser (target ≤ 10% overall firing)
    dense    the same network with SiLU in place of every spike (`ModelConfig(spiking=False)`)
    gpt      a small GPT defined here: causal softmax attention, learned positions, GELU MLP, same width,
             depth, tokenizer and tied embedding; its MLP width is chosen to match the spiking model's
             parameter count

All three train on the same batches (same seed) with the same optimizer and schedule
(`nord.train.make_optimizer`, `cosine_lr`, `train_steps`) for the same number of tokens, once per
learning rate in --lr; each model keeps the lr with the lowest loss on the *selection* windows (the
first --eval-batches validation batches) and is reported on the next --eval-batches batches, which no
choice saw. Reported:
  windows  independent windows of seq_len tokens (every model sees the same context)
  carried  the recurrent models read the same tokens as rows whose final neuron state starts the next
           window (`nord.evaluate.evaluate_tokens`): their natural, unbounded context
Without --steps, the number of steps is chosen from --budget-min after timing one step of each model,
so the default run (recipe `small`) fits the budget on the machine it runs on.

    python bench/quality.py [--quick] [--model small] [--budget-min 18] [--steps N] [--lr 3e-3 1e-3]
                            [--models spiking dense gpt]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nord.config import TrainConfig
from nord.data import DataConfig, prepare
from nord.evaluate import evaluate_tokens
from nord.model import LMOutput, NordLM, RMSNorm
from nord.recipes import RECIPES, get_config
from nord.train import cosine_lr, make_optimizer, train_steps


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, d_mlp, bias=False), nn.GELU(), nn.Linear(d_mlp, d_model, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """nanoGPT-style baseline; returns `LMOutput` so that Nord's training loop and evaluation run it as is."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_mlp: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "mlp.2.weight")) else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, state=None) -> LMOutput:
        B, T = idx.shape
        x = self.embed(idx) + self.pos(torch.arange(T, device=idx.device))  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        zero = torch.zeros((), device=idx.device)
        return LMOutput(logits=logits, loss=loss, reg_loss=zero, state=None, rates={"overall": zero},
                        memory_share=zero)  # fmt: skip

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def matched_gpt(cfg, target_params: int, seq_len: int) -> TinyGPT:
    """Same width, depth and vocabulary as `cfg`; MLP width solved so the parameter count matches."""
    d, L = cfg.d_model, cfg.n_layers
    n_heads = max(1, d // 64)
    fixed = cfg.vocab_size * d + seq_len * d + L * (4 * d * d + 2 * d) + d  # all but the MLPs
    d_mlp = max(1, round((target_params - fixed) / (2 * d * L)))
    return TinyGPT(cfg.vocab_size, d, L, n_heads, d_mlp, seq_len)


@torch.no_grad()
def window_eval(model: nn.Module, corpus, seq_len: int, batch_size: int, batches: range) -> dict:
    """Mean validation cross-entropy over independent windows (no carried state) and the firing rate,
    over the validation batches numbered `batches`."""
    model.eval()
    nats, count, rates = 0.0, 0, []
    for i, (x, y) in enumerate(corpus.batches("val", batch_size, seq_len)):
        if i not in batches:
            if i >= batches.stop:
                break
            continue
        out = model(x, y)
        nats += out.loss.item() * y.numel()
        count += y.numel()
        rates.append(out.rates["overall"].item())
    model.train()
    loss = nats / count
    return {"loss": loss, "ppl": math.exp(loss), "firing_rate": sum(rates) / len(rates), "tokens": count}


MODELS = ("spiking", "dense", "gpt")


def build_models(recipe: str, vocab_size: int, seq_len: int) -> dict[str, nn.Module]:
    cfg = dataclasses.replace(get_config(recipe, vocab_size=vocab_size), max_seq_len=seq_len)
    torch.manual_seed(0)
    spiking = NordLM(cfg)
    torch.manual_seed(0)
    dense = NordLM(dataclasses.replace(cfg, spiking=False))
    torch.manual_seed(0)
    return {"spiking": spiking, "dense": dense, "gpt": matched_gpt(cfg, spiking.num_params(), seq_len)}


def seconds_per_step(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int) -> float:
    """One timed forward + backward (after one warm-up) on random tokens, without an optimizer step."""
    x = torch.randint(0, vocab_size, (batch_size, seq_len))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = model(x, x)
        (out.loss + out.reg_loss).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return times[-1]


def train(model: nn.Module, corpus, args, lr: float, steps: int, desc: str) -> tuple[list, float]:
    """Train `model` for `steps` on the shared batches at peak `lr`; the loss curve and seconds taken."""
    train_cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=lr)
    optimizer = make_optimizer(model, train_cfg, "cpu")
    lr_fn = cosine_lr(lr, warmup_steps=max(1, min(50, steps // 10)), total_steps=steps)
    batches = iter(corpus.batches("train", args.batch_size, args.seq_len, seed=0))
    log_every, tokens_per_step = max(1, steps // 20), args.batch_size * args.seq_len
    curve, start, done = [], time.perf_counter(), 0
    for _ in tqdm(range(0, steps, log_every), desc=desc):
        n = min(log_every, steps - done)
        stats = train_steps(model, optimizer, batches, n, grad_clip=train_cfg.grad_clip, lr_fn=lr_fn,
                            start_step=done, device="cpu", progress=False)  # fmt: skip
        done += n
        curve.append((done * tokens_per_step, stats.loss))
    return curve, time.perf_counter() - start


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: budget)")
    parser.add_argument("--budget-min", type=float, default=18.0, help="training time for all runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3], help="peak lrs to try per model")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="which to train")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches to pick, then report")
    parser.add_argument("--carried-rows", type=int, default=4, help="rows read with carried state")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny recipe, 12 steps of 4×64")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.batch_size, args.seq_len, args.eval_batches = "tiny", 12, 4, 64, 2
    torch.set_num_threads(args.threads)
    corpus = prepare(DataConfig(source="shakespeare"), progress=False)
    built = build_models(args.model, corpus.vocab_size, args.seq_len)
    models = {n: m for n, m in built.items() if n in args.models}

    step_seconds = {
        n: seconds_per_step(m, args.batch_size, args.seq_len, corpus.vocab_size) for n, m in models.items()
    }
    seconds = 1.15 * len(args.lr) * sum(step_seconds.values())
    steps = args.steps or max(1, int(args.budget_min * 60 / seconds))
    tokens_per_step = args.batch_size * args.seq_len
    print(f"{args.model}: {steps} steps × {tokens_per_step} tokens per model and lr; s/step {step_seconds}")

    n = args.eval_batches
    select, report = range(0, n), range(n, 2 * n)
    results, curves = {}, {}
    for name, initial in models.items():
        runs = {}
        for lr in args.lr:
            model = copy.deepcopy(initial)
            curve, train_s = train(model, corpus, args, lr, steps, desc=f"{name} lr {lr:g}")
            chosen = window_eval(model, corpus, args.seq_len, args.batch_size, select)["loss"]
            runs[lr] = (chosen, model, curve, train_s)
            curves[f"{name} lr {lr:g}"] = curve
        lr = min(runs, key=lambda k: runs[k][0])
        _, model, curve, train_s = runs[lr]
        windows = window_eval(model, corpus, args.seq_len, args.batch_size, report)
        row = {"params": model.num_params(), "train_tokens": steps * tokens_per_step, "train_s": train_s,
               "lr": lr, "selection_loss_by_lr": {k: v[0] for k, v in runs.items()},
               "final_train_loss": curve[-1][1], "val_windows": windows}  # fmt: skip
        if isinstance(model, NordLM):
            # the same tokens as the reported windows, read as --carried-rows long rows
            first, width = report.start * args.batch_size * args.seq_len, n * args.batch_size * args.seq_len
            val = torch.from_numpy(corpus.val[first : first + width + 1].astype("int64"))
            carried = evaluate_tokens(model, val, corpus.decode, seq_len=args.seq_len,
                                      batch_size=args.carried_rows)  # fmt: skip
            row["val_carried"] = {"loss": carried.loss, "ppl": carried.ppl, "tokens": carried.tokens}
        results[name] = row

    header = f"{'model':8} {'params':>8} {'tokens':>8} {'train s':>8} | {'val loss':>8} {'val ppl':>8} "
    header += f"{'ppl/gpt':>7} | {'carried ppl':>11} | {'firing':>6}"
    print(header)
    print("-" * len(header))
    gpt_ppl = results["gpt"]["val_windows"]["ppl"] if "gpt" in results else math.nan
    for name, r in results.items():
        w = r["val_windows"]
        carried = f"{r['val_carried']['ppl']:11.1f}" if "val_carried" in r else f"{'-':>11}"
        firing = f"{w['firing_rate']:6.3f}" if name == "spiking" else f"{'-':>6}"
        size = f"{r['params'] / 1e6:7.2f}M {r['train_tokens']:>8} {r['train_s']:8.0f}"
        print(
            f"{name:8} {size} | {w['loss']:8.4f} {w['ppl']:8.1f} {w['ppl'] / gpt_ppl:7.2f} | "
            f"{carried} | {firing}"
        )
    for name, r in results.items():
        tried = ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in r["selection_loss_by_lr"].items())
        print(f"{name:8} lr {r['lr']:g} picked by selection-window loss ({tried})")
    if "spiking" in results:
        rate = results["spiking"]["val_windows"]["firing_rate"]
        print(f"spiking firing rate {rate:.1%} ({'meets' if rate <= 0.10 else 'misses'} the ≤ 10% target)")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": steps, "torch": torch.__version__,
            "machine": platform.machine(), "step_seconds": step_seconds}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results, "curves": curves}, indent=2))
    plot_curves(curves, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
