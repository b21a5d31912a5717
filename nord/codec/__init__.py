"""Masked 4-bit sparse weight deltas with error feedback, in signed envelopes.

    config.py    CodecConfig (a section of RunConfig), density_for_round (the density warm-up)
    encoder.py   DeltaEncoder: residual + delta → top-k per chunk (or per block) → NF4 or 2-bit →
                 Envelope; keeps the residual
    payload.py   the payload layout, its validation and deterministic dequantization (SparseTensor)
    twobit.py    2-bit values (CodecConfig(value_bits=2)): sign + one magnitude bit per value
    indices.py   index codes: bitmap, chunk-local offsets, LEB128 gaps, Golomb-Rice gaps, full — shortest
                 per tensor — or blocks (CodecConfig(block=B)) or shared (mask.py: CodecConfig(mask="shared")
                 keeps a random-k mask every replica derives from run, round, tensor and seed, so only the
                 values travel)
    envelope.py  Envelope (msgpack wire format, ed25519 signature, contribution id), decode_envelope

Bytes at the default 64/4096 density: ≈ 7.5 bits of index + 4 bits of value per kept value + one fp16
scale per 64 kept values ≈ 0.023 bytes per parameter (docs/benchmarks/codec.md). The default density
warm-up sends more in the first 8 rounds (25% in round 0, ≈ 0.24 bytes per parameter), once per run.
"""

from nord.codec.config import CodecConfig, density_for_round
from nord.codec.encoder import DeltaEncoder
from nord.codec.envelope import FORMAT_VERSION, Envelope, decode_envelope
from nord.codec.payload import SparseTensor

__all__ = [
    "FORMAT_VERSION",
    "CodecConfig",
    "DeltaEncoder",
    "Envelope",
    "SparseTensor",
    "decode_envelope",
    "density_for_round",
]
