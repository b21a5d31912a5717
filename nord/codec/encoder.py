"""Sparsify + quantize a pseudo-gradient with error feedback.

Per tensor, each round:

    a      = Δ + ef_decay · r            (r: the residual carried from the previous rounds)
    S      = top-k |a| per chunk          (k = ceil(d(round) · chunk); d: CodecConfig's warm-up schedule),
             or with mask="shared" the round's shared random-k mask (nord.codec.mask; no indices travel)
    â_S    = dequantize(quantize(a_S))    (NF4, or 2-bit with value_bits=2: what every replica will add)
    r     ← a − scatter(S, â_S)           (unsent values and quantization error, sent later)

so Σ_rounds sent = Σ_rounds Δ − r_now: the sent sum tracks the true sum up to one bounded residual.
The residual does not depend on k, so the density may change from round to round (warm-up).
The residual is part of the worker's state (`state_dict`), so a restart keeps it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from nord.codec.config import CodecConfig, density_for_round
from nord.codec.envelope import Envelope, seal_envelope
from nord.codec.indices import SHARED, encode_indices, encode_seed
from nord.codec.mask import mask_base, shared_mask
from nord.codec.payload import FP16_MAX, pack_payload
from nord.codec.twobit import dequantize_2bit, quantize_2bit
from nord.errors import CodecError
from nord.identity import Identity
from nord.nf4 import ZERO_CODE, dequantize_nf4, quantize


def top_k_indices(
    values: torch.Tensor, cfg: CodecConfig, density: float | None = None
) -> tuple[torch.Tensor, int, int, int, int]:
    """Sorted flat indices of the largest |values| per chunk at `density` (default cfg.density): single
    values, or whole blocks of cfg.block values ranked by their sum of squares where the block divides
    the tensor and its chunk; also (chunk, k, k_last, block)."""
    n = values.numel()
    chunk = min(cfg.chunk_size, n)
    block = cfg.block if n % cfg.block == 0 and chunk % cfg.block == 0 else 1
    full = n - n % chunk
    k = cfg.keep(chunk, density, block)
    k_last = cfg.keep(n - full, density, block) if n > full else 0
    if k == chunk and k_last == n - full:  # density 1: everything, no selection needed
        return torch.arange(n, device=values.device), chunk, k, k_last, 1
    score = values.abs() if block == 1 else values.square().view(-1, block).sum(dim=1)  # one per block
    picked = _top_per_row(score[: full // block].view(-1, chunk // block), k // block)
    if k_last:
        tail = _top_per_row(score[full // block :].unsqueeze(0), k_last // block) + full // block
        picked = torch.cat([picked, tail])
    if block > 1:
        picked = (picked.unsqueeze(1) * block + torch.arange(block, device=values.device)).reshape(-1)
    return picked, chunk, k, k_last, block


def _top_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions (row-major, sorted) of each row's k largest scores."""
    rows, width = score.shape
    picked = torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values
    return (picked + torch.arange(rows, device=score.device).unsqueeze(1) * width).reshape(-1)


def shared_indices(
    numel: int, cfg: CodecConfig, density: float, key: tuple[str, int, str]
) -> tuple[torch.Tensor, int, int, int]:
    """The shared mask of one tensor (key: run_id, round, name) at `density`, as every decoder derives
    it; also (chunk, k, k_last) as `top_k_indices`."""
    chunk = min(cfg.chunk_size, numel)
    k, k_last = cfg.keep(chunk, density), (cfg.keep(numel % chunk, density) if numel % chunk else 0)
    base = mask_base(*key, seed=cfg.mask_seed)
    return torch.from_numpy(shared_mask(base, numel, chunk, k, k_last)), chunk, k, k_last


class DeltaEncoder:
    """Turns a worker's weight deltas into signed Envelopes, keeping what it could not send."""

    def __init__(self, cfg: CodecConfig, spec: Mapping[str, tuple[int, ...]]) -> None:
        self.cfg = cfg
        self.spec = {name: tuple(shape) for name, shape in spec.items()}
        self._residual: dict[str, torch.Tensor] = {}  # name -> flat float32

    def encode(
        self,
        delta: Mapping[str, torch.Tensor],
        *,
        run_id: str,
        round: int,
        base_hash: str,
        identity: Identity,
    ) -> Envelope:
        """Compress `delta` (new − old weights, any subset of the spec) into a signed Envelope.

        Values are kept at the density of `round` (`density_for_round`), halved (never below the final
        density) while the envelope would be over `max_payload_bytes`: a warm-up round of a large model
        sends what fits and leaves the rest in the residual. The residual is updated only once the
        envelope is built: a failed encode changes nothing.
        """
        names = tuple(name for name in self.spec if name in delta)
        self._check(delta, names)
        density = density_for_round(self.cfg, round)
        while True:
            entries, residuals = self._compress(delta, names, density, (run_id, round))
            envelope = seal_envelope(
                run_id=run_id,
                round=round,
                base_hash=base_hash,
                names=names,
                shapes=tuple(self.spec[name] for name in names),
                payload=pack_payload(self.cfg.blocksize, entries, self.cfg.value_bits),
                identity=identity,
            )
            if envelope.nbytes <= self.cfg.max_payload_bytes or density <= self.cfg.density:
                break
            # a warm-up round of a large model: send less now, the residual keeps the rest
            density = max(self.cfg.density, density / 2)
        if envelope.nbytes > self.cfg.max_payload_bytes:
            raise CodecError(
                f"envelope of {envelope.nbytes} bytes is over codec.max_payload_bytes "
                f"({self.cfg.max_payload_bytes}) at density {density:.4g}: peers would reject it; "
                "lower codec.density or train fewer parameters per worker (shards)"
            )
        self._residual.update(residuals)
        return envelope

    def _compress(self, delta, names, density: float, key: tuple[str, int]) -> tuple[list, dict]:
        """Payload entries and the new residuals of `names` at `density`; changes no state.
        `key` (run_id, round) picks the shared masks."""
        entries, residuals = [], {}
        for name in names:
            acc = delta[name].detach().reshape(-1).float().clone()
            if name in self._residual:
                acc += self.cfg.ef_decay * self._residual[name].to(acc.device)
            if self.cfg.mask == "shared":
                indices, chunk, k, k_last = shared_indices(acc.numel(), self.cfg, density, (*key, name))
                indices, block = indices.to(acc.device), 1
            else:
                indices, chunk, k, k_last, block = top_k_indices(acc, self.cfg, density)
            shared = self.cfg.mask == "shared" and len(indices) < acc.numel()  # else FULL: no bytes
            packed, scales, sent = self._quantize(acc[indices])
            acc[indices] -= torch.from_numpy(sent).to(acc.device)
            residuals[name] = acc
            if shared:
                index_kind, index_bytes = SHARED, encode_seed(self.cfg.mask_seed)
            else:
                index_kind, index_bytes = encode_indices(indices.cpu().numpy(), acc.numel(), chunk, block)
            entries.append([chunk, k, k_last, index_kind, index_bytes, packed.tobytes(), scales.tobytes()])
        return entries, residuals

    def _quantize(self, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(packed codes, fp16 scales, the float32 values every replica will decode) of `values`."""
        n, blocksize = values.numel(), self.cfg.blocksize
        if self.cfg.value_bits == 2:
            packed, absmax = quantize_2bit(values, blocksize)
            scales = np.minimum(absmax, FP16_MAX).astype("<f2")
            return packed, scales, dequantize_2bit(packed, scales.astype(np.float32), n, blocksize)
        packed, absmax = quantize(values, blocksize)
        packed = packed.cpu().numpy()
        if n % 2:  # the pad nibble is 0.0's code (CUDA kernels may leave another there)
            packed[-1] = (packed[-1] & 0xF0) | ZERO_CODE
        scales = absmax.clamp(max=FP16_MAX).half().cpu().numpy().astype("<f2")
        return packed, scales, dequantize_nf4(packed, scales.astype(np.float32), n, blocksize)

    def residual_norm(self) -> float:
        """L2 norm of everything not yet sent."""
        return float(sum(float(r.double().square().sum()) for r in self._residual.values()) ** 0.5)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> residual (CPU float32, the tensor's shape)."""
        return {name: r.detach().cpu().reshape(self.spec[name]).clone() for name, r in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore residuals saved by `state_dict` (names and shapes must be in the spec)."""
        loaded = {}
        for name, tensor in state.items():
            if name not in self.spec:
                raise CodecError(f"residual {name!r} is not in this run's model")
            if tuple(tensor.shape) != self.spec[name]:
                raise CodecError(
                    f"residual {name!r} has shape {list(tensor.shape)}, expected {list(self.spec[name])}"
                )
            loaded[name] = tensor.detach().float().reshape(-1).clone()
        self._residual = loaded

    def _check(self, delta: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> None:
        unknown = sorted(set(delta) - set(self.spec))
        if unknown:
            raise CodecError(f"delta tensor {unknown[0]!r} is not in this run's model")
        if not names:
            raise CodecError("delta has no tensors")
        for name in names:
            t = delta[name]
            if tuple(t.shape) != self.spec[name]:
                raise CodecError(
                    f"delta {name!r} has shape {list(t.shape)}, expected {list(self.spec[name])}"
                )
            if t.numel() == 0:
                raise CodecError(f"delta {name!r} has no values")
            if not torch.isfinite(t).all():
                raise CodecError(f"delta {name!r} has NaN or infinite values")
