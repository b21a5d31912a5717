"""Parallel-in-time scan of h_t = exp(log_a_t)·h_{t−1} + x_t (same contract as `naive.py`), and the in-place
scans the dynamic-decay neuron builds on.

Inside, the scan works on the decays a_t = exp(log_a_t) ∈ [0, 1] and overwrites its input with the states.
Two plans, chosen from the shape (`_plan_is_sequential`):
- sequential: T in-place steps h_t += a_t·h_{t−1} on (B, D) slices: one pass over the data, T Python
  steps. Best while a step's B·D elements outweigh its ~5 µs of dispatch (short T, wide batches).
- chunked: cut the sequence into N = ⌊T/C⌋ chunks of C steps (the T mod C left over run sequentially after);
  with P_t = Π a_s over the chunk up to t,
      h_t = local_t + P_t · h_start,      local_t = the recurrence run from 0 inside the chunk.
  `local` (in place) and P for all chunks at once in C vectorised steps over strided (B, N, D) slices; the
  chunk ends are themselves a linear recurrence with decay P_C, solved by the same function in place
  (O(log_C T) levels); one pass adds P_t·h_start. ~2C Python steps per level, two extra passes.
Only products of decays in [0, 1] are ever formed (never exp of a difference of cumulative sums), so values
can underflow to 0 but never overflow, however strong the decay or long the sequence.

Why not the C×C decay matrix exp(L_t − L_s) of chunked linear attention: the decay here is per channel,
so that matrix is (B, T, C, D) — C times the work and memory of the scan, with no matmul to share it.

Backward is the same scan run backwards in time (adjoint of a diagonal linear recurrence):
    g_t = dh_t + a_{t+1} · g_{t+1},   dx_t = g_t,   dlog_a_t = g_t · a_t · h_{t−1},   dh0 = a_0 · g_0
so only h and a are kept for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nord.neurons.naive import check_scan_inputs

# A Python step costs ~5 µs of dispatch on a CPU, about one elementwise pass over 2^12 float32 elements;
# the chunked plan's two extra passes cost more than the steps it saves once B·D reaches that
# (bench/neurons.py). A CUDA launch is worth ~10^6 elements: there chunks pay off beyond one chunk.
_CPU_SEQUENTIAL_MIN_WIDTH = 2**12


def _plan_is_sequential(h: Tensor, chunk_size: int) -> bool:
    B, T, D = h.shape
    return T <= 2 * chunk_size or (h.device.type == "cpu" and B * D >= _CPU_SEQUENTIAL_MIN_WIDTH)


def _sequential_(h: Tensor, a: Tensor, reverse: bool) -> None:
    steps, decays = h.unbind(1), a.unbind(1)  # unbind: one view per step, no per-step slicing cost
    if reverse:
        for t in range(h.shape[1] - 2, -1, -1):
            steps[t].addcmul_(decays[t], steps[t + 1])
    else:
        for t in range(1, h.shape[1]):
            steps[t].addcmul_(decays[t], steps[t - 1])


def _chunked_(h: Tensor, a: Tensor, chunk_size: int, reverse: bool) -> None:
    B, T, D = h.shape
    C = chunk_size
    N = T // C
    # the N·C steps that divide into chunks; reversed, the leftover steps come first in time
    whole = slice(T - N * C, T) if reverse else slice(0, N * C)
    x, decay_in = h[:, whole].view(B, N, C, D), a[:, whole].view(B, N, C, D)
    decay = torch.empty_like(decay_in)  # P: the product of a over the chunk up to each step
    order = range(C - 1, -1, -1) if reverse else range(C)
    first, last = order[0], order[-1]
    decay[:, :, first] = decay_in[:, :, first]
    for prev, t in zip(order[:-1], order[1:], strict=True):
        x[:, :, t].addcmul_(decay_in[:, :, t], x[:, :, prev])
        torch.mul(decay_in[:, :, t], decay[:, :, prev], out=decay[:, :, t])
    ends = x[:, :, last]  # (B, N, D) view: each chunk's local end, then (in place) its true end
    scan_(ends, decay[:, :, last], chunk_size=C, reverse=reverse)
    if N > 1:  # every step but the end: + P_t · the true end of the chunk before (in scan direction)
        if reverse:
            x[:, :-1, 1:].addcmul_(decay[:, :-1, 1:], ends[:, 1:].unsqueeze(2))
        else:
            x[:, 1:, :-1].addcmul_(decay[:, 1:, :-1], ends[:, :-1].unsqueeze(2))
    if N * C < T:  # the leftover steps, continuing from the nearest true state
        rest = slice(0, T - N * C + 1) if reverse else slice(N * C - 1, T)
        _sequential_(h[:, rest], a[:, rest], reverse)


def scan_(
    h: Tensor, a: Tensor, h0: Tensor | None = None, *, chunk_size: int = 64, reverse: bool = False
) -> Tensor:
    """In place: h (B, T, D) holds x on entry and h_t = a_t·h_{t−1} + x_t from h_{−1} = h0 on return.

    `reverse` runs h_t = a_t·h_{t+1} + x_t from t = T−1 down, with h0 as the state after the end. Any
    strides along T work (views of a larger tensor included). Returns h.
    """
    if h0 is not None:
        edge = -1 if reverse else 0
        h[:, edge].addcmul_(a[:, edge], h0)
    if _plan_is_sequential(h, chunk_size):
        _sequential_(h, a, reverse)
    else:
        _chunked_(h, a, chunk_size, reverse)
    return h


def adjoint_scan(
    dh: Tensor, dh_final: Tensor | None, a: Tensor, dtype: torch.dtype, chunk_size: int
) -> Tensor:
    """g_t = dh_t + a_{t+1}·g_{t+1} (g_{T−1} = dh_{T−1} + dh_final): the gradient reaching each state h_t."""
    g = dh.to(dtype, copy=True)
    if dh_final is not None:
        g[:, -1] += dh_final
    if g.shape[1] > 1:  # index t of g[:, :-1] takes a_{t+1} from a[:, 1:]
        scan_(g[:, :-1], a[:, 1:], g[:, -1], chunk_size=chunk_size, reverse=True)
    return g


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, log_a: Tensor, h0: Tensor | None, chunk_size: int):
        a = log_a.float().exp()
        h0_32 = None if h0 is None else h0.float()
        h = scan_(x.to(torch.float32, copy=True), a, h0_32, chunk_size=chunk_size)
        ctx.save_for_backward(h, a, h0_32)
        ctx.chunk_size, ctx.dtypes = chunk_size, (x.dtype, log_a.dtype, None if h0 is None else h0.dtype)
        return h, h[:, -1].clone()

    @staticmethod
    def backward(ctx, dh: Tensor, dh_final: Tensor):
        h, a, h0 = ctx.saved_tensors
        g = adjoint_scan(dh, dh_final, a, torch.float32, ctx.chunk_size)
        dlog_a = torch.empty_like(g)  # g_t · a_t · h_{t−1}
        torch.mul(g[:, 1:], h[:, :-1], out=dlog_a[:, 1:])
        dlog_a[:, 0] = 0 if h0 is None else g[:, 0] * h0
        dlog_a.mul_(a)
        x_dtype, log_a_dtype, h0_dtype = ctx.dtypes
        dh0 = None if h0 is None else (g[:, 0] * a[:, 0]).to(h0_dtype)
        return g.to(x_dtype), dlog_a.to(log_a_dtype), dh0, None


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
        chunk_size: C ≥ 2 of the chunked plan (about 2C·log_C(T) Python steps); short or wide inputs run
            the sequential plan whatever C is.
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
