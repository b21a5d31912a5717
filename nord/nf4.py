"""NF4: 4-bit NormalFloat blockwise quantization, bit-compatible with bitsandbytes.

For each block of `blocksize` values x_1..x_B with absmax s = max_i |x_i|:

    code_i = argmin_c |TABLE[c] - x_i / s|        (ties to the lower code: bucketize over midpoints)
    x̂_i   = TABLE[code_i] · s                      (fp32 multiply: the same bits on every device)

Two codes share a byte, the first in the high nibble; an odd count pads the last low nibble
with the code of 0.0 (7), as bitsandbytes does.
`quantize_nf4` is a plain-torch copy of bitsandbytes' own reference kernel (same reciprocal-multiply
for full blocks, division for the tail block, clamp and midpoints), so its codes, nibble order and
absmax equal `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")` bit for bit (tests check).
On CUDA `quantize` calls bitsandbytes itself. Dequantization is always this module's numpy
table lookup on the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

# bitsandbytes' NF4 code book (bitsandbytes/backends/utils.py), quantiles of N(0, 1) scaled to [-1, 1].
NF4_TABLE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
ZERO_CODE = 7  # NF4_TABLE[7] == 0.0
_MIDPOINTS = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
_TABLE_NP = NF4_TABLE.numpy()
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def quantize_nf4(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor to packed NF4 in plain torch (any device).

    Args:
        x: values, any shape (flattened), cast to float32.
        blocksize: values per absmax scale.
    Returns:
        (packed uint8 of length ceil(n/2), absmax float32 of length ceil(n/blocksize)).
    Example:
        packed, absmax = quantize_nf4(torch.randn(100))
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0] if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n > full:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, _MIDPOINTS.to(scaled.device), out_int32=True).to(torch.uint8)
    packed = (codes[::2] << 4) | codes[1::2]
    return packed, absmax


def quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_nf4`, through bitsandbytes' kernel on CUDA (same contract, same result format)."""
    if x.device.type != "cuda" or x.numel() == 0:
        return quantize_nf4(x, blocksize)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf  # lazy: it imports torch._dynamo (+2-3 s)

    packed, state = bnbf.quantize_4bit(x.reshape(-1).float(), blocksize=blocksize, quant_type="nf4")
    return packed.reshape(-1), state.absmax.float()


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The first `n` 4-bit codes of `packed` (uint8, high nibble first) as uint8."""
    codes = np.empty(2 * len(packed), dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n]


def dequantize_nf4(packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int = 64) -> np.ndarray:
    """NF4 codes back to float32: TABLE[code] · absmax of the code's block.

    numpy on the CPU for every caller — encoder (for its residual) and every replica — so the
    bits cannot depend on a device or a thread count (and small torch CPU ops are slower here).

    Args:
        packed: uint8, ceil(n/2) bytes. absmax: float32, ceil(n/blocksize) scales. n: value count.
    Returns:
        float32 array of length n.
    """
    codes = unpack_codes(np.asarray(packed, dtype=np.uint8), n)
    scales = np.repeat(np.asarray(absmax, dtype=np.float32), blocksize)[:n]
    return _TABLE_NP[codes] * scales
