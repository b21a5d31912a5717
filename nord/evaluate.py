"""Held-out evaluation: loss, perplexity and bits per byte, with neuron state carried across windows.

    loss = total nats / predicted tokens        ppl = exp(loss)
    bits per byte = total nats / (ln 2 · UTF-8 bytes of the predicted text)   (tokenizer-independent)

The token stream is cut into `batch_size` contiguous rows, and each row is read in windows of the
training length whose final neuron state starts the next window: every token is predicted with its
row's whole prefix as context, in O(window) memory. `nord eval CHECKPOINT --text FILE...` runs this on
any UTF-8 text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nord.errors import CheckpointError, DataError
from nord.model import NordLM, load_model, resolve_device


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    loss: float  # nats per predicted token
    ppl: float
    bits_per_byte: float
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted text


@torch.no_grad()
def evaluate_tokens(
    model: NordLM,
    tokens: torch.Tensor,
    decode: Callable[[list[int]], str],
    *,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Evaluate `model` on a 1-D stream of token ids; `decode` turns ids back into text (for bytes)."""
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise DataError("evaluation needs at least 2 tokens of text")
    device = torch.device(device)
    n = tokens.numel() - 1  # predictions: tokens[i] -> tokens[i + 1]
    rows = min(batch_size, n)
    width = math.ceil(n / rows)
    pad = rows * width - n
    x = F.pad(tokens[:-1].long(), (0, pad), value=0).view(rows, width)  # (R, W)
    y = F.pad(tokens[1:].long(), (0, pad), value=-1).view(rows, width)  # -1: padding, not scored
    windows = math.ceil(width / seq_len)
    if max_windows is not None:
        windows = min(windows, max_windows)
    was_training = model.training
    model.eval()
    state, nats, counted = None, 0.0, 0
    for w in tqdm(range(windows), desc="eval", unit="window", disable=not progress, leave=False):
        xs = x[:, w * seq_len : (w + 1) * seq_len].to(device)
        ys = y[:, w * seq_len : (w + 1) * seq_len].to(device)
        out = model(xs, state=state)
        state = out.state
        logits = out.logits.float().reshape(-1, out.logits.shape[-1])
        nats += F.cross_entropy(logits, ys.reshape(-1), ignore_index=-1, reduction="sum").item()
        counted += int((ys >= 0).sum())
    model.train(was_training)
    scored = y[:, : windows * seq_len]
    n_bytes = sum(len(decode(row[row >= 0].tolist()).encode("utf-8")) for row in scored)
    loss = nats / counted
    return EvalResult(
        loss=loss,
        ppl=math.exp(min(loss, 700.0)),
        bits_per_byte=nats / (math.log(2) * max(n_bytes, 1)),
        tokens=counted,
        bytes=n_bytes,
    )


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(meta: dict[str, str], override: str | os.PathLike | None = None):
    """The tokenizer a checkpoint was trained with: its recorded path (or `override`), hash-checked."""
    from tokenizers import Tokenizer

    path = Path(override) if override is not None else Path(meta.get("tokenizer_path", ""))
    if override is None and not meta.get("tokenizer_path"):
        raise CheckpointError("the checkpoint records no tokenizer; pass --tokenizer FILE")
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path} (pass --tokenizer FILE if it moved)")
    expected = meta.get("tokenizer_sha256")
    if expected and sha256_file(path) != expected:
        raise DataError(f"tokenizer {path} is not the one this checkpoint was trained with (sha256 differs)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"tokenizer {path} cannot be read ({e})") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; DataError if missing, empty, binary or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file not found: {p}")
    data = p.read_bytes()
    if b"\x00" in data:
        raise DataError(f"{p} looks binary (NUL bytes), not UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{p} is empty")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a checkpoint on UTF-8 text files",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("checkpoint", help="model checkpoint (.safetensors) written by `nord train`")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s) to score")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the training length)")
    p.add_argument("--batch-size", type=int, default=8, help="contiguous rows read in parallel")
    p.add_argument("--tokenizer", default=None, metavar="FILE", help="tokenizer.json if it moved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    texts = [read_text(f) for f in args.text]
    args.device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device=args.device)
    tokenizer = load_tokenizer(meta, args.tokenizer)
    seq_len = args.seq_len or model.cfg.max_seq_len
    if seq_len < 1 or args.batch_size < 1:
        raise DataError("--seq-len and --batch-size must be >= 1")
    results = {}
    for name, text in zip(args.text, texts, strict=True):
        ids = tokenizer.encode(text).ids
        if len(ids) < 2:
            raise DataError(f"{name} has fewer than 2 tokens")
        results[name] = evaluate_tokens(
            model,
            torch.tensor(ids, dtype=torch.long),
            tokenizer.decode,
            seq_len=seq_len,
            batch_size=args.batch_size,
            device=args.device,
            progress=True,
        )
    if args.json:
        print(json.dumps({name: asdict(r) for name, r in results.items()}, indent=2))
    else:
        for name, r in results.items():
            print(f"{name}: loss {r.loss:.4f}  ppl {r.ppl:.2f}  bpb {r.bits_per_byte:.4f}  tokens {r.tokens}")
    return 0
