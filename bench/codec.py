"""Codec benchmark: bytes per parameter, reconstruction error and throughput on a real pseudo-gradient.

The pseudo-gradient is Δ = θ_after − θ_before of a NordLM recipe after a few real AdamW steps on the
Shakespeare corpus. One round, no residual carried in, encoded at round --round with
--warmup-rounds (default: round 0 without a density warm-up, so the 10% and 1.56% rows keep what they
say; with the run default's warm-up round 0 would keep 25%). Each row records the density it asked for and
the fraction the envelope actually sent. Columns:

    bytes/param  wire bytes / parameters (whole envelope for the codec, raw tensors for the baselines)
    rel L2       ‖Δ̂ − Δ‖ / ‖Δ‖ over all parameters (what top-k leaves out stays in the residual)
    kept rel L2  ‖Δ̂_S − Δ_S‖ / ‖Δ_S‖ over the kept coordinates S only (the quantization error)
    encode/decode GB/s = 4 · parameters (the fp32 bytes the envelope represents) / wall seconds,
        median of --repeats. Encode = residual add + top-k + NF4 + index coding + signing;
        decode = decode_envelope (size cap, msgpack, every check, sha256, ed25519) + dequantization.

Example:
    python bench/codec.py --model small --steps 2       # quick
    python bench/codec.py --model base --steps 3
    python bench/codec.py --model small --warmup-rounds 8 --round 0   # what a run's round 0 sends
    python bench/codec.py --model small --value-bits 4,2                # NF4 and 2-bit values side by side
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.codec.payload import parse_payload
from nord.config import TrainConfig
from nord.data import DataConfig, default_data_root, prepare
from nord.identity import Identity
from nord.model import NordLM
from nord.nf4 import NF4_TABLE
from nord.recipes import get_config
from nord.train import make_optimizer, train_steps

DENSITIES = (1.0, 0.1, 64 / 4096)
BASE_HASH = "0" * 64


def pseudo_gradient(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict]:
    """Train `args.steps` AdamW steps from a seeded init; return (θ_after − θ_before, info)."""
    corpus = prepare(DataConfig(vocab_size=args.vocab_size), Path(args.data_root), progress=False)
    torch.manual_seed(0)
    model = NordLM(get_config(args.model, vocab_size=corpus.vocab_size))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len)
    optimizer = make_optimizer(model, train_cfg, "cpu")
    batches = corpus.batches("train", args.batch_size, args.seq_len, seed=0)
    stats = train_steps(model, optimizer, batches, args.steps, grad_clip=1.0, device="cpu")
    delta = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    info = {
        "model": args.model,
        "params": sum(t.numel() for t in delta.values()),
        "tensors": len(delta),
        "steps": args.steps,
        "train_loss": stats.loss,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
    }
    return delta, info


def squared_error(recon: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    return sum(float((recon[n].double() - delta[n].double()).square().sum()) for n in delta)


def norm_sq(delta: dict[str, torch.Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in delta.values())


def int8_blockwise(x: torch.Tensor, block: int = 64) -> tuple[int, torch.Tensor]:
    """Symmetric int8 with one fp16 absmax per `block` values: (bytes, reconstruction)."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    scale = (blocks.abs().amax(dim=1, keepdim=True) / 127).half().float().clamp(min=1e-30)
    recon = (torch.round(blocks / scale).clamp(-127, 127) * scale).reshape(-1)[: flat.numel()]
    return flat.numel() + 2 * blocks.shape[0], recon.view_as(x)


def baselines(delta: dict[str, torch.Tensor]) -> list[dict]:
    n = sum(t.numel() for t in delta.values())
    total = norm_sq(delta)
    rows = [{"method": "dense fp32", "bytes_per_param": 4.0, "rel_l2": 0.0}]
    fp16 = {k: v.half().float() for k, v in delta.items()}
    rows.append(
        {
            "method": "dense fp16",
            "bytes_per_param": 2.0,
            "rel_l2": math.sqrt(squared_error(fp16, delta) / total),
        }
    )
    int8 = {k: int8_blockwise(v) for k, v in delta.items()}
    int8_err = math.sqrt(squared_error({k: r for k, (_, r) in int8.items()}, delta) / total)
    int8_bytes = sum(b for b, _ in int8.values()) / n
    rows.append({"method": "int8 block-64", "bytes_per_param": int8_bytes, "rel_l2": int8_err})
    return rows


def timed(fn, repeats: int, sync: bool = False) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def codec_row(
    delta: dict[str, torch.Tensor],
    density: float,
    value_bits: int,
    args: argparse.Namespace,
    identity: Identity,
) -> dict:
    spec = {k: tuple(v.shape) for k, v in delta.items()}
    n = sum(t.numel() for t in delta.values())
    cfg = CodecConfig(  # 100% of `base` is over the 64 MiB default payload cap
        density=density, warmup_rounds=args.warmup_rounds, max_payload_bytes=2**31, value_bits=value_bits
    )

    def encode(d):
        return DeltaEncoder(cfg, spec).encode(
            d, run_id="bench", round=args.round, base_hash=BASE_HASH, identity=identity
        )

    enc_s, env = timed(lambda: encode(delta), args.repeats)
    data = env.to_bytes()
    dec_s, decoded = timed(lambda: decode_envelope(data, spec, max_bytes=len(data)).delta(), args.repeats)
    recon, kept_err, kept_norm = {}, 0.0, 0.0
    for name, sparse in decoded.items():
        dense = torch.zeros(delta[name].numel())
        dense[sparse.indices] = sparse.values
        recon[name] = dense.view_as(delta[name])
    _, entries = parse_payload(env.payload, env.names, env.shapes)
    for name, entry in entries.items():
        truth = delta[name].reshape(-1)[torch.from_numpy(entry.indices)].double()
        kept_err += float(
            (recon[name].reshape(-1)[torch.from_numpy(entry.indices)].double() - truth).square().sum()
        )
        kept_norm += float(truth.square().sum())
    sent = sum(len(entry.indices) for entry in entries.values()) / n
    row = {
        "method": f"nord codec {density:.2%}" + (" 2-bit" if value_bits == 2 else ""),
        "density": density,
        "value_bits": value_bits,
        "round": args.round,
        "warmup_rounds": args.warmup_rounds,
        "sent_density": sent,
        "bytes_per_param": len(data) / n,
        "rel_l2": math.sqrt(squared_error(recon, delta) / norm_sq(delta)),
        "kept_rel_l2": math.sqrt(kept_err / kept_norm),
        "encode_cpu_gbps": 4 * n / enc_s / 1e9,
        "decode_cpu_gbps": 4 * n / dec_s / 1e9,
        "index_codes": _index_code_counts(env.payload),
        "scales": scale_storage(entries, delta, cfg.blocksize) if value_bits == 4 else None,
    }
    if torch.cuda.is_available():
        on_gpu = {k: v.cuda() for k, v in delta.items()}
        row["encode_cuda_gbps"] = 4 * n / timed(lambda: encode(on_gpu), args.repeats, sync=True)[0] / 1e9
    return row


def _index_code_counts(payload: bytes) -> dict[str, int]:
    import msgpack

    from nord.codec.indices import KIND_NAMES

    counts: dict[str, int] = {}
    for entry in msgpack.unpackb(payload, raw=False)[1]:
        counts[KIND_NAMES[entry[3]]] = counts.get(KIND_NAMES[entry[3]], 0) + 1
    return counts


def scale_storage(entries: dict, delta: dict[str, torch.Tensor], blocksize: int) -> dict:
    """fp16 absmax (what the codec stores) vs bitsandbytes' 8-bit double quantization of the absmax
    (quantize_blockwise(absmax − mean, blocksize=256) + an fp32 mean and fp32 scale per 256 absmax)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    table = NF4_TABLE.numpy()
    out = {"fp16_bytes": 0, "dq8_bytes": 0, "fp16_sq_err": 0.0, "dq8_sq_err": 0.0}
    for name, entry in entries.items():
        count = len(entry.indices)
        codes = np.empty(2 * len(entry.codes), dtype=np.uint8)
        raw = np.frombuffer(entry.codes, dtype=np.uint8)
        codes[0::2], codes[1::2] = raw >> 4, raw & 15
        unit = table[codes[:count]]
        scales = torch.from_numpy(entry.scales.astype(np.float32))
        mean = scales.mean()
        q, state = bnbf.quantize_blockwise(scales - mean, blocksize=256)
        dq = (bnbf.dequantize_blockwise(q, state) + mean).numpy()
        truth = delta[name].reshape(-1).numpy()[entry.indices].astype(np.float64)
        for key, s in (("fp16", scales.numpy()), ("dq8", dq)):
            values = unit * np.repeat(s, blocksize)[:count]
            out[f"{key}_sq_err"] += float(np.square(values - truth).sum())
        out["fp16_bytes"] += 2 * len(scales)
        out["dq8_bytes"] += len(scales) + 4 * math.ceil(len(scales) / 256) + 4
    n = sum(t.numel() for t in delta.values())
    total = norm_sq(delta)
    return {
        "fp16_bytes_per_param": out["fp16_bytes"] / n,
        "dq8_bytes_per_param": out["dq8_bytes"] / n,
        "fp16_kept_rel_l2_vs_total": math.sqrt(out["fp16_sq_err"] / total),
        "dq8_kept_rel_l2_vs_total": math.sqrt(out["dq8_sq_err"] / total),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base", help="recipe: tiny, small, base (default), nord-1b")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps making the pseudo-gradient")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--vocab-size", type=int, default=8192, help="tokenizer vocabulary (replaces the recipe's)"
    )
    p.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    p.add_argument("--round", type=int, default=0, help="round the envelope is encoded at")
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=0,
        help="codec density warm-up (0: none, every row sends its density; the run default is "
        f"{CodecConfig().warmup_rounds})",
    )
    p.add_argument(
        "--value-bits", default="4", help="comma-separated CodecConfig.value_bits per density (4, 2)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--data-root", default=str(default_data_root()))
    p.add_argument("--out", default="bench/results/codec.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    delta, info = pseudo_gradient(args)
    identity = Identity.from_private_bytes(bytes(32))
    rows = baselines(delta)
    for density in (float(d) for d in args.densities.split(",")):
        for bits in (int(b) for b in args.value_bits.split(",")):
            rows.append(codec_row(delta, density, bits, args, identity))

    print(
        f"\n{info['model']}: {info['params']:,} parameters in {info['tensors']} tensors, Δ after "
        f"{info['steps']} AdamW steps (loss {info['train_loss']:.3f}), {args.threads} CPU threads; "
        f"encoded at round {args.round} with warmup_rounds={args.warmup_rounds}"
    )
    header = f"{'method':<22}{'sent':>8}{'bytes/param':>12}{'rel L2':>9}{'kept L2':>9}"
    header += f"{'enc GB/s':>10}{'dec GB/s':>10}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        extra = "".join(
            f"{r[k]:>{w}.3f}" if k in r else " " * (w - 1) + "-"
            for k, w in (("kept_rel_l2", 9), ("encode_cpu_gbps", 10), ("decode_cpu_gbps", 10))
        )
        sent = f"{r['sent_density']:>8.2%}" if "sent_density" in r else f"{'-':>8}"
        print(f"{r['method']:<22}{sent}{r['bytes_per_param']:>12.4f}{r['rel_l2']:>9.4f}{extra}")
    for r in rows:
        if "index_codes" in r:
            print(f"{r['method']}: index codes {r['index_codes']}")
        if r.get("scales"):
            s = r["scales"]
            print(
                f"{r['method']}: scales fp16 "
                f"{s['fp16_bytes_per_param']:.5f} B/param (kept err {s['fp16_kept_rel_l2_vs_total']:.5f}) vs "
                f"8-bit DQ {s['dq8_bytes_per_param']:.5f} (kept err {s['dq8_kept_rel_l2_vs_total']:.5f})"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "cpu_threads": args.threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    info.update(round=args.round, warmup_rounds=args.warmup_rounds)
    result = {"info": info, "machine": machine, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
