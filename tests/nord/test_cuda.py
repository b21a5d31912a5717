"""The GPU path: the same neuron and model code under CUDA, fp16 autocast and bitsandbytes' 8-bit AdamW
(what a T4 worker runs). Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nord.config import TrainConfig
from nord.model import NordLM
from nord.neurons import DynamicDecayNeuron, DynamicDecayState, dynamic_decay_chunk, dynamic_decay_naive
from nord.recipes import get_config
from nord.train import make_optimizer, train_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def relative_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12))


@pytest.mark.parametrize("T", [1, 63, 200, 3000])
def test_cuda_scan_matches_the_naive_loop_on_the_cpu(T):
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(2, T, 33, generator=gen)
    log_a = torch.nn.functional.logsigmoid(torch.randn(2, T, 33, generator=gen) * 2 + 1)
    h0 = torch.randn(2, 33, generator=gen)
    upstream = torch.randn(2, T, 33, generator=gen)
    results = []
    for fn, device in ((dynamic_decay_naive, "cpu"), (dynamic_decay_chunk, CUDA)):
        inputs = [t.to(device).requires_grad_() for t in (x, log_a, h0)]
        h, final = fn(*inputs, return_final=True)
        grads = torch.autograd.grad((h * upstream.to(device)).sum() + final.sum(), inputs)
        results.append((h, final, *grads))
    for name, ref, got in zip(["h", "h_final", "dx", "dlog_a", "dh0"], *results, strict=True):
        assert relative_rms(ref, got) < 1e-4, name


def test_cuda_neuron_under_fp16_autocast_matches_fp32_on_the_cpu():
    torch.manual_seed(0)
    neuron = DynamicDecayNeuron(64, chunk_size=16)
    x = torch.randn(3, 300, 64)
    window, h0 = torch.randn(3, 3, 64), torch.randn(3, 64)
    _, ref_h, ref_state = neuron(x, DynamicDecayState(h0, window))
    neuron.to(CUDA)
    with torch.autocast("cuda", dtype=torch.float16):
        spikes, h, state = neuron(x.to(CUDA).half(), DynamicDecayState(h0.to(CUDA), window.to(CUDA)))
    assert spikes.dtype == torch.float16 and h.dtype == torch.float32 and state.h.dtype == torch.float32
    assert relative_rms(ref_h, h) < 1e-3  # the inputs were rounded to fp16, the recurrence ran in fp32
    assert relative_rms(ref_state.h, state.h) < 1e-3


def test_cuda_model_steps_equal_the_whole_sequence_under_fp16_autocast():
    torch.manual_seed(0)
    model = NordLM(get_config("tiny")).to(CUDA).eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 40), device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        whole = model(idx).logits.float()
        state, stepped = model.init_state(2, CUDA), []
        for t in range(idx.shape[1]):
            logits, state, _ = model.step(idx[:, t], state)
            stepped.append(logits.float())
    assert relative_rms(whole, torch.stack(stepped, 1)) < 1e-2


def test_cuda_training_with_fp16_autocast_and_8bit_adamw_lowers_the_loss():
    pytest.importorskip("bitsandbytes")
    cfg = dataclasses.replace(get_config("tiny"), vocab_size=256)
    torch.manual_seed(0)
    model = NordLM(cfg).to(CUDA)
    train_cfg = TrainConfig(batch_size=4, seq_len=64, lr=3e-3)
    optimizer = make_optimizer(model, train_cfg, CUDA, eight_bit=True)
    assert type(optimizer).__name__ == "AdamW8bit"
    tokens = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    batch = (tokens[:, :-1], tokens[:, 1:])  # one fixed batch: the loss must fall as it is memorised

    def batches():
        while True:
            yield batch

    stream, scaler = batches(), torch.amp.GradScaler("cuda")
    common = {"scaler": scaler, "grad_clip": train_cfg.grad_clip, "device": CUDA, "progress": False}
    first = train_steps(model, optimizer, stream, 1, **common)
    later = train_steps(model, optimizer, stream, 30, **common)
    last = train_steps(model, optimizer, stream, 1, **common)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert later.tokens == 30 * batch[0].numel()
    assert last.loss < first.loss - 0.5, (first.loss, last.loss)
