"""2-bit values (CodecConfig(value_bits=2)): sign and one magnitude bit per value, one fp16 absmax per block.

For a block with absmax s, value x is sent as TABLE2[code] · s, code = the nearest of

    TABLE2 = [-1, -A, +A, +1],   A = 0.6

Top-k keeps a chunk's largest values, so a block's |x| / s mostly lies in [0.5, 1]; A = 0.6 is about
the mean-squared-error optimum for top-k of Gaussian values between 25% and 1.56% density (0.50 at 25%,
0.70 at 1.56%). There is no zero code: what a level misses stays in the error-feedback residual and is
sent in a later round. Four codes share a byte, the first in the top two bits; unused bits of the last
byte are 0. Dequantization is numpy on the CPU, the same bits on every replica (as `nord.nf4`).
"""

from __future__ import annotations

import numpy as np
import torch

A = 0.6
TABLE2 = np.array([-1.0, -A, A, 1.0], dtype=np.float32)
_MIDPOINTS = np.array([-(1 + A) / 2, 0.0, (1 + A) / 2], dtype=np.float32)
_SHIFTS = np.array([6, 4, 2, 0], dtype=np.uint8)


def quantize_2bit(x: torch.Tensor, blocksize: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 of length ceil(n/4), absmax float32 of length ceil(n/blocksize)) of flat `x`."""
    flat = x.detach().reshape(-1).float().cpu().numpy()
    n = len(flat)
    blocks = np.pad(flat, (0, -n % blocksize)).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    scaled = (blocks / np.maximum(absmax, np.float32(1e-38))[:, None]).reshape(-1)[:n]
    codes = np.searchsorted(_MIDPOINTS, scaled).astype(np.uint8)  # nearest level, ties to the lower one
    codes = np.pad(codes, (0, -n % 4)).reshape(-1, 4)
    return np.bitwise_or.reduce(codes << _SHIFTS, axis=1).astype(np.uint8), absmax


def unpack_codes2(packed: np.ndarray, n: int) -> np.ndarray:
    """The first `n` 2-bit codes of `packed` (uint8, top bits first)."""
    return ((np.asarray(packed, dtype=np.uint8)[:, None] >> _SHIFTS) & 3).reshape(-1)[:n]


def dequantize_2bit(packed: np.ndarray, absmax: np.ndarray, n: int, blocksize: int = 64) -> np.ndarray:
    """2-bit codes back to float32: TABLE2[code] · absmax of the code's block."""
    scales = np.repeat(np.asarray(absmax, dtype=np.float32), blocksize)[:n]
    return TABLE2[unpack_codes2(packed, n)] * scales
