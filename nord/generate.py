"""Text generation one token at a time with the carried neuron state (O(1) per token, prefix never re-run).

    p(next) ∝ softmax(logits / temperature), restricted to the top-k logits; temperature 0 = greedy

`nord generate CHECKPOINT --prompt TEXT` prints the continuation and the firing rate of the generated
tokens; `--raster FILE.png` draws one layer's spikes (neurons × generated tokens).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from nord.errors import ConfigError, DataError
from nord.evaluate import load_tokenizer
from nord.fsutil import atomic_path
from nord.model import NordLM, load_model, resolve_device
from nord.ttfs import collect_stats, configure


@dataclass(frozen=True, kw_only=True)
class Generation:
    text: str  # the continuation only
    token_ids: list[int]
    firing_rate: float  # overall firing rate while generating
    raster: torch.Tensor | None  # (neurons, generated tokens) activations of the recorded layer


@torch.no_grad()
def generate(
    model: NordLM,
    tokenizer,
    prompt: str,
    *,
    max_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    record_layer: int | None = None,
) -> Generation:
    """Continue `prompt` by `max_tokens` tokens; `tokenizer` is a HF `tokenizers.Tokenizer`."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top-k must be >= 1, got {top_k}")
    if record_layer is not None and not 0 <= record_layer < model.cfg.n_layers:
        raise ConfigError(f"raster layer must be in 0..{model.cfg.n_layers - 1}, got {record_layer}")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise DataError(f"the prompt {prompt!r} has no tokens")
    model.eval()
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, P)
    out = model(prompt_ids[:, :-1], state=None) if len(ids) > 1 else None
    state = out.state if out is not None else model.init_state(1, device)
    token = prompt_ids[:, -1]  # (1,)
    generated, rates, columns = [], [], []
    for _ in range(max_tokens):
        # Column t of the raster: the layer's activity while reading token t-1 and predicting token t.
        record: dict[str, torch.Tensor] | None = {} if record_layer is not None else None
        logits, state, step_rates = model.step(token, state, spikes_out=record)  # (1, V)
        if record is not None:
            columns.append(record[f"layers.{record_layer}"][0].cpu())
        rates.append(step_rates["overall"].item())
        token = _sample(logits[0].float().cpu(), temperature, top_k, generator).to(device).view(1)
        generated.append(int(token))
    raster = torch.stack(columns, dim=1) if columns else None
    return Generation(
        text=tokenizer.decode(generated),
        token_ids=generated,
        firing_rate=sum(rates) / max(1, len(rates)),
        raster=raster,
    )


def _sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator
) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax()
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


def save_raster(raster: torch.Tensor, path: str | Path, *, cfg, layer: int) -> None:
    """PNG of a layer's spikes (neurons × generated tokens), mixer / memory gate / MLP bands marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    ax.imshow(raster.numpy(), aspect="auto", interpolation="nearest", cmap="Greys")
    for boundary in (cfg.d_model, cfg.d_model + cfg.n_memory_slots):
        ax.axhline(boundary - 0.5, color="tab:red", linewidth=0.8)
    ax.set_xlabel("generated token")
    ax.set_ylabel(f"neuron (mixer 0–{cfg.d_model - 1} | memory gate | MLP)")
    ax.set_title(f"layer {layer} spikes, firing rate {raster.float().mean().item():.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint", description=__doc__.splitlines()[0]
    )
    p.add_argument("checkpoint", help="model checkpoint (.safetensors) written by `nord train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raster", metavar="FILE.png", help="write a spike raster of --raster-layer")
    p.add_argument("--raster-layer", type=int, default=0)
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer.json if it moved")
    p.add_argument(
        "--ttfs",
        action="store_true",
        help="run the MLPs as event-driven TTFS networks (a model trained with mlp=ttfs); "
        "print their spikes per neuron and synaptic events per token",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1:
        raise ConfigError("--tokens must be >= 1")
    args.device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device=args.device)
    tokenizer = load_tokenizer(meta, args.tokenizer)
    if args.ttfs:
        configure(model, engine="events")  # ConfigError if the model has no TTFS MLPs
    result = generate(
        model,
        tokenizer,
        args.prompt,
        max_tokens=args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        device=args.device,
        record_layer=args.raster_layer if args.raster else None,
    )
    print(args.prompt + result.text)
    print(f"\n[{len(result.token_ids)} tokens, firing rate {result.firing_rate:.3f}]")
    if args.ttfs:
        print(f"[prompt and generated tokens, {collect_stats(model).summary()}]")
    if args.raster and result.raster is not None:
        save_raster(result.raster, args.raster, cfg=model.cfg, layer=args.raster_layer)
        print(f"[spike raster of layer {args.raster_layer}: {args.raster}]")
    return 0
