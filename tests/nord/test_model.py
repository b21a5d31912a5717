from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nord.checkpoint import save_checkpoint
from nord.errors import CheckpointError, ConfigError
from nord.model import ModelConfig, NordLM, load_model, save_model
from nord.recipes import RECIPES, get_config


def tiny(**overrides) -> ModelConfig:
    return dataclasses.replace(get_config("tiny"), **overrides)


def build(seed: int = 0, **overrides) -> NordLM:
    torch.manual_seed(seed)
    return NordLM(tiny(**overrides)).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, get_config("tiny").vocab_size, (2, 45), generator=g)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"spiking": False}, {"spike_mode": "integer"}],
    ids=["spiking", "dense", "integer-spikes"],
)
def test_step_by_step_logits_equal_whole_sequence(tokens, overrides):
    model = build(**overrides)
    with torch.no_grad():
        whole = model(tokens)
    state = model.init_state(tokens.shape[0])
    stepped = []
    for t in range(tokens.shape[1]):
        logits, state, _ = model.step(tokens[:, t], state)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), whole.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spiking", [True, False], ids=["spiking", "dense"])
def test_split_sequence_with_carried_state_equals_unsplit(tokens, spiking):
    model = build(spiking=spiking)
    with torch.no_grad():
        whole = model(tokens)
        first = model(tokens[:, :19])  # 19: not a multiple of the chunk
        second = model(tokens[:, 19:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, atol=1e-4, rtol=0)


def test_rates_count_every_spiking_neuron(tokens):
    cfg = tiny()
    model = build()
    with torch.no_grad():
        out = model(tokens)
    spikes = {name: [] for name in out.rates if name != "overall"}
    state = model.init_state(tokens.shape[0])
    for t in range(tokens.shape[1]):
        record: dict[str, torch.Tensor] = {}
        _, state, _ = model.step(tokens[:, t], state, spikes_out=record)
        for name in spikes:
            spikes[name].append(record[name])
    total = 0.0
    for name, per_token in spikes.items():
        s = torch.stack(per_token)  # (T, B, neurons)
        assert s.shape[-1] == cfg.d_model + cfg.n_memory_slots + cfg.d_mlp
        assert set(s.unique().tolist()) <= {0.0, 1.0}  # binary spikes everywhere
        assert 0.0 < out.rates[name].item() < 1.0
        torch.testing.assert_close(out.rates[name], s.mean(), atol=1e-3, rtol=0)
        total += s.sum().item()
    assert len(spikes) == cfg.n_layers
    expected_overall = total / (tokens.numel() * cfg.n_layers * cfg.neurons_per_layer)
    assert out.rates["overall"].item() == pytest.approx(expected_overall, abs=1e-3)
    assert 0.0 <= out.memory_share.item() <= 1.0


def test_loss_decreases_on_a_tiny_overfit_batch(tokens):
    model = build().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.reg_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_rate_regulariser_pulls_firing_toward_target(tokens):
    model = build().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(tokens).rates["overall"].item()
    for _ in range(15):
        out = model(tokens)
        out.reg_loss.backward()
        opt.step()
        opt.zero_grad()
    last = model(tokens).rates["overall"].item()
    target = model.cfg.target_rate
    assert abs(last - target) < 0.5 * abs(first - target), (first, last)


def test_dense_twin_has_the_same_parameters_and_no_regulariser(tokens):
    spiking, dense = build(), build(spiking=False)
    assert spiking.param_spec() == dense.param_spec()
    out = dense(tokens, tokens)
    assert out.reg_loss.item() == 0.0
    assert out.rates["overall"].item() > 0.9  # SiLU activations are almost never exactly zero


def test_param_spec_follows_state_dict_and_counts_tied_weights_once():
    model = build()
    spec = model.param_spec()
    assert list(spec) == list(model.state_dict())
    assert sum(torch.Size(s).numel() for s in spec.values()) == model.num_params()
    untied = build(tie_embeddings=False)
    assert untied.num_params() == model.num_params() + model.cfg.vocab_size * model.cfg.d_model


@pytest.mark.parametrize(
    "name, low, high",
    [("tiny", 0.8e6, 1.3e6), ("small", 10e6, 20e6), ("base", 130e6, 170e6), ("nord-1b", 1.077e9, 1.099e9)],
)
def test_recipes_have_their_advertised_parameter_counts(name, low, high):
    with torch.device("meta"):
        model = NordLM(get_config(name))
    assert low <= model.num_params() <= high


def test_recipe_vocab_override_and_unknown_name():
    assert get_config("small", vocab_size=4096).vocab_size == 4096
    with pytest.raises(ConfigError, match="tiny, small, base, nord-1b"):
        get_config("huge")
    assert set(RECIPES) == {"tiny", "small", "base", "nord-1b"}


@pytest.mark.parametrize(
    "bad",
    [
        {"d_model": 0},
        {"spike_mode": "ternary"},
        {"target_rate": 1.5},
        {"rate_weight": -1.0},
        {"n_memory_slots": -1},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        tiny(**bad)


def test_config_round_trips_through_json():
    cfg = tiny(spiking=False)
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_model_without_memory_slots_still_works(tokens):
    out = build(n_memory_slots=0)(tokens, tokens)
    assert out.memory_share.item() == 0.0 and torch.isfinite(out.loss)


def test_load_model_round_trips_and_rejects_another_config(tmp_path, tokens):
    model = build()
    path = tmp_path / "m.safetensors"
    save_model(path, model, {"step": 3})
    loaded, meta = load_model(path)
    assert meta["step"] == "3"
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)
    with pytest.raises(CheckpointError, match="another config"):
        load_model(path, expect=tiny(d_model=64))
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, build(d_model=64).state_dict(), {"model_config": dataclasses.asdict(tiny())})
    with pytest.raises(CheckpointError, match="shape"):
        load_model(other)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokens):
    plain = build().train()
    saver = build().train()
    saver.activation_checkpointing = True
    grads = []
    for model in (plain, saver):
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.reg_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_cpu_bf16_autocast_keeps_the_head_in_fp32(tokens):
    """bf16 logits (8 bits of mantissa) cost validation loss; under CPU autocast the head runs in fp32."""
    model = build()
    x, y = tokens[:, :-1], tokens[:, 1:]
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("x", o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, y).logits
    assert logits.dtype == torch.float32
    head = model.head.weight if model.head is not None else model.embed.weight
    torch.testing.assert_close(logits, hidden["x"].float() @ head.t(), rtol=1e-5, atol=1e-5)
