from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from nord.config import TrainConfig
from nord.errors import ConfigError, DataError
from nord.model import NordLM
from nord.recipes import get_config
from nord.train import cosine_lr, make_optimizer, train_steps


def tiny_model(seed: int = 0) -> NordLM:
    torch.manual_seed(seed)
    return NordLM(dataclasses.replace(get_config("tiny"), vocab_size=256))


def fixed_batches(batch: int = 4, seq: int = 32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return itertools.repeat((tokens[:, :-1], tokens[:, 1:]))


def test_cosine_lr_warms_up_then_decays_to_the_floor():
    lr = cosine_lr(1.0, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_optimizer_decays_matrices_only_and_8bit_needs_cuda():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="CUDA"):
        make_optimizer(model, TrainConfig(), "cpu", eight_bit=True)


def test_train_steps_lower_the_loss_and_report_honest_stats():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0), "cpu")
    batches = fixed_batches()
    first = train_steps(model, opt, batches, 10, grad_clip=1.0, device="cpu", progress=False)
    second = train_steps(
        model, opt, batches, 10, grad_clip=1.0, device="cpu", progress=False, start_step=10,
        lr_fn=lambda step: 1e-3 if step >= 10 else 0.0,
    )  # fmt: skip
    assert second.loss < first.loss - 0.3
    assert first.tokens == 10 * 4 * 32 and first.seconds > 0
    assert 0.0 < first.firing_rate < 1.0 and first.reg_loss >= 0.0
    assert opt.param_groups[0]["lr"] == 1e-3


def test_train_steps_say_when_batches_run_out():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(), "cpu")
    with pytest.raises(DataError, match="ran out after 2 of 5"):
        train_steps(model, opt, itertools.islice(fixed_batches(), 2), 5, grad_clip=1.0, device="cpu")
