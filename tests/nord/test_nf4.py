"""nord.nf4: the plain-torch NF4 equals bitsandbytes bit for bit (codes, nibble order, absmax)."""

from __future__ import annotations

import logging

import pytest
import torch

from nord.nf4 import NF4_TABLE, ZERO_CODE, dequantize_nf4, quantize, quantize_nf4, unpack_codes


@pytest.fixture(scope="module")
def bnb():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return pytest.importorskip("bitsandbytes.functional")


def awkward_values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    x[::7] = 0.0
    if n >= 128:
        x[64:128] = 0.0  # an all-zero block: absmax 0
        x[5] = x[6].abs() * 1e4  # one outlier dominating its block
    return x


@pytest.mark.parametrize(
    ("n", "blocksize"),
    [(1, 64), (2, 64), (63, 64), (64, 64), (129, 64), (4097, 64), (1000, 128)],
    ids=lambda v: str(v),
)
def test_quantize_nf4_matches_bitsandbytes_bit_for_bit(bnb, n, blocksize):
    x = awkward_values(n, seed=n)
    ref_packed, ref_state = bnb.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    packed, absmax = quantize_nf4(x, blocksize)
    assert packed.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert torch.equal(packed, ref_packed.reshape(-1))  # codes and nibble order
    assert torch.equal(absmax, ref_state.absmax)
    ref_values = bnb.dequantize_4bit(ref_packed, ref_state).reshape(-1)
    assert torch.equal(
        torch.from_numpy(dequantize_nf4(packed.numpy(), absmax.numpy(), n, blocksize)), ref_values
    )


def test_first_value_is_in_the_high_nibble():
    packed, absmax = quantize_nf4(torch.tensor([-1.0, 1.0, 0.0]), 64)
    assert packed.tolist() == [0x0F, ZERO_CODE << 4 | ZERO_CODE]
    assert unpack_codes(packed.numpy(), 3).tolist() == [0, 15, ZERO_CODE]
    assert absmax.tolist() == [1.0]


def test_dequantize_is_table_times_absmax():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = codes[0::2] << 4 | codes[1::2]
    absmax = torch.tensor([0.37], dtype=torch.float32)
    expected = NF4_TABLE * absmax
    assert torch.equal(torch.from_numpy(dequantize_nf4(packed.numpy(), absmax.numpy(), 16, 64)), expected)


def test_quantize_on_cpu_is_the_torch_implementation():
    x = awkward_values(300, seed=1)
    for a, b in zip(quantize(x, 64), quantize_nf4(x, 64), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quantize_agrees_with_cpu():
    x = awkward_values(10_000, seed=2)
    packed, absmax = quantize(x.cuda(), 64)
    cpu_packed, cpu_absmax = quantize_nf4(x, 64)
    assert torch.equal(absmax.cpu(), cpu_absmax)
    # bitsandbytes' CUDA kernel may round a value sitting exactly on a midpoint the other way
    assert (packed.cpu() != cpu_packed).float().mean() < 1e-3
