"""Chunked parallel scan of h_t = exp(log_a_t)·h_{t−1} + x_t (same contract as `naive.py`).

The sequence is cut into chunks of C steps. With L_t the cumulative log-decay inside a chunk,
    h_t = Σ_{s ≤ t in chunk} exp(L_t − L_s) · x_s + exp(L_t) · h_start
The C×C decay matrix exp(L_t − L_s) is built from differences of cumsums with s > t masked to −∞
*before* the exp, so every exponent is ≤ 0 and nothing overflows. The chunk-start states h_start are
themselves a linear recurrence over the T/C chunk ends (decay = the chunk's total log-decay), solved by
the same function recursively, so the Python-level work is O(log_C T) vectorised passes.

Backward is the same scan run backwards in time (adjoint of a diagonal linear recurrence):
    g_t = dh_t + a_{t+1} · g_{t+1},   dx_t = g_t,   dlog_a_t = g_t · a_t · h_{t−1},   dh0 = a_0 · g_0
so only h and log_a are kept for backward, never the C×C matrices.

Log-decays below −60 are treated as −60 inside the scan (e^−60 ≈ 1e−26: zero next to any O(1) state);
this keeps the cumsums small enough that their differences stay exact to ~1e−4 over a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nord.neurons.naive import check_scan_inputs

MIN_LOG_DECAY = -60.0
# Elements of one (B, chunks, C, C, D) decay block; larger inputs are processed in slices of chunks.
_BLOCK_ELEMENTS = 1 << 24


def _intra_chunk(x: Tensor, cum: Tensor) -> Tensor:
    """h_t = Σ_{s≤t} exp(cum_t − cum_s)·x_s within each chunk; x, cum: (B, N, C, D)."""
    B, N, C, D = x.shape
    later_or_same = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()  # [t, s]: s ≤ t
    per_chunk = max(1, _BLOCK_ELEMENTS // max(1, B * C * C * D))
    out = []
    for start in range(0, N, per_chunk):
        c = cum[:, start : start + per_chunk]
        decay = c.unsqueeze(3) - c.unsqueeze(2)  # (B, n, C_t, C_s, D)
        decay.masked_fill_(~later_or_same[:, :, None], float("-inf")).exp_()
        out.append(decay.mul_(x[:, start : start + per_chunk].unsqueeze(2)).sum(3))
    return torch.cat(out, 1)


def _scan(x: Tensor, log_a: Tensor, h0: Tensor | None, chunk_size: int) -> Tensor:
    """The forward recurrence for float32 (B, T, D) inputs, no autograd; returns h (B, T, D)."""
    B, T, D = x.shape
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # x = 0, log_a = 0 after the end: h stays at h_{T−1}
        x, log_a = F.pad(x, (0, 0, 0, pad)), F.pad(log_a, (0, 0, 0, pad))
    x = x.reshape(B, N, C, D)
    cum = log_a.clamp_min(MIN_LOG_DECAY).reshape(B, N, C, D).cumsum(2)
    h = _intra_chunk(x, cum)
    if N > 1 or h0 is not None:
        if N == 1:
            starts = h0.unsqueeze(1)
        else:
            ends = _scan(h[:, :, -1].contiguous(), cum[:, :, -1].contiguous(), h0, chunk_size)
            first = h0 if h0 is not None else x.new_zeros(B, D)
            starts = torch.cat([first.unsqueeze(1), ends[:, :-1]], 1)  # (B, N, D)
        h = h + cum.exp() * starts.unsqueeze(2)
    return h.reshape(B, N * C, D)[:, :T]


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, log_a: Tensor, h0: Tensor | None, chunk_size: int):
        log_a32 = log_a.float()
        h0_32 = None if h0 is None else h0.float()
        h = _scan(x.float(), log_a32, h0_32, chunk_size)
        ctx.save_for_backward(h, log_a32, h0_32)
        ctx.chunk_size, ctx.dtypes = chunk_size, (x.dtype, log_a.dtype, None if h0 is None else h0.dtype)
        return h, h[:, -1].clone()

    @staticmethod
    def backward(ctx, dh: Tensor, dh_final: Tensor):
        h, log_a, h0 = ctx.saved_tensors
        next_log_a = torch.cat([log_a[:, 1:], torch.zeros_like(log_a[:, :1])], 1)
        g = _scan(dh.float().flip(1), next_log_a.flip(1), dh_final.float(), ctx.chunk_size).flip(1)
        a = log_a.exp()
        h_prev = torch.cat([torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1), h[:, :-1]], 1)
        x_dtype, log_a_dtype, h0_dtype = ctx.dtypes
        dh0 = None if h0 is None else (g[:, 0] * a[:, 0]).to(h0_dtype)
        return g.to(x_dtype), (g * a * h_prev).to(log_a_dtype), dh0, None


def dynamic_decay_chunk(
    x: Tensor,
    log_a: Tensor,
    h0: Tensor | None = None,
    return_final: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Parallel h_t = exp(log_a_t)·h_{t−1} + x_t over the whole sequence, in float32.

    Args:
        x: (B, T, D) input, already scaled by (1 − a_t); any T ≥ 1.
        log_a: (B, T, D) log-decays.
        h0: (B, D) initial state, zeros if None.
        return_final: also return h_{T−1}.
        chunk_size: C; work and memory grow with C, Python passes shrink with it (≥ 2).
    Returns:
        h: (B, T, D) float32; h_final: (B, D) float32 or None. Matches `dynamic_decay_naive`.

    Example: `h, hT = dynamic_decay_chunk((1 - a) * X, F.logsigmoid(z), return_final=True)`.
    """
    check_scan_inputs(x, log_a, h0)
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        h, h_final = _ChunkScan.apply(x, log_a, h0, chunk_size)
    return h, (h_final if return_final else None)
