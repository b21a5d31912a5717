from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nord.cli import main
from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.crdt import MergeConfig, Replica
from nord.errors import ConfigError
from nord.evaluate import sha256_file
from nord.generate import generate
from nord.identity import Identity
from nord.model import ModelConfig, NordLM, save_model
from nord.recipes import get_config
from nord.ttfs import (
    TTFSConstraints,
    Windows,
    calibrate,
    collect_stats,
    configure,
    fire_events,
    quantize_weights,
    relu_twin,
    ttfs_layers,
    ttfs_mlp,
)

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 10


def random_mlp(n: int, d: int, f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(f, d, generator=g, dtype=torch.float64) / d**0.5
    threshold = torch.rand(f, generator=g, dtype=torch.float64) - 0.2
    w_out = torch.randn(d, f, generator=g, dtype=torch.float64) / f**0.5
    return h, w_in, threshold, w_out


@pytest.mark.parametrize("n,d,f", [(37, 33, 47), (64, 128, 512)], ids=["N37-D33-F47", "N64-D128-F512"])
def test_event_simulation_equals_the_relu_mlp_and_only_positive_neurons_fire(n, d, f):
    h, w_in, threshold, w_out = random_mlp(n, d, f)
    y, z = relu_twin(h, w_in, threshold, w_out)
    for engine in ("events", "closed"):
        result = ttfs_mlp(h, w_in, threshold, w_out, engine=engine)
        torch.testing.assert_close(result.y, y, rtol=0, atol=1e-10)
        assert torch.equal(torch.isfinite(result.hidden_times), z > 0)  # one spike or none per neuron
        t0, t1 = result.windows
        fired = result.hidden_times[z > 0]
        torch.testing.assert_close(t0 + t1 - fired, z[z > 0], rtol=0, atol=1e-10)  # t_max − t = ReLU(z)
        assert result.saturated == 0
        # each encoder pair sends one spike (the sign's channel), plus the bias spike
        assert int(torch.isfinite(result.input_times).sum()) == int((h != 0).sum()) + n


def test_event_simulation_matches_a_time_stepped_membrane_with_inputs_inside_the_window():
    """Event-driven spike times against the membrane evaluated on a fine clock, some inputs arriving
    after the window opened (then the slope changes mid-window and the crossing is in a middle segment)."""
    g = torch.Generator().manual_seed(3)
    n, k, f, t_open, t_close = 6, 9, 11, 1.0, 2.0
    times = torch.rand(n, k, generator=g, dtype=torch.float64) * 1.8
    times[torch.rand(n, k, generator=g) < 0.2] = float("inf")
    weights = torch.randn(k, f, generator=g, dtype=torch.float64) * 0.8
    threshold = 0.6
    spikes, _ = fire_events(times, weights, t_open=t_open, t_close=t_close, threshold=threshold)
    clock = torch.linspace(t_open, t_close, 20001, dtype=torch.float64)[:-1]  # (S,)
    live = torch.isfinite(times)
    x = torch.where(live, times, 0.0)
    early = (live & (x <= t_open)).double()  # arrived before the window: integrate up to t_open, then slope 1
    late = (live & (x > t_open)).double()  # arrives inside: its PSP adds slope W from t_j on
    v_open = ((t_open - x) * early) @ weights  # (N, F)
    ramp = (clock[None, :, None] - x[:, None, :]).clamp_min(0) * late[:, None, :]  # (N, S, K)
    v = v_open[:, None, :] + (clock - t_open)[None, :, None] + ramp @ weights  # (N, S, F)
    above = v >= threshold
    first = torch.where(above.any(dim=1), clock[above.double().argmax(dim=1)], float("inf"))
    assert torch.equal(torch.isfinite(first), torch.isfinite(spikes))
    fired = torch.isfinite(first)
    assert (spikes[fired] - first[fired]).abs().max() <= (t_close - t_open) / 20000 + 1e-12
    assert (late.sum() > 0) and fired.any() and (~fired).any()


def test_a_window_shorter_than_the_activation_saturates_and_is_counted():
    h, w_in, threshold, w_out = random_mlp(40, 16, 24)
    _, z = relu_twin(h, w_in, threshold, w_out)
    windows = Windows(h.abs().max().item(), 0.5 * z.max().item())
    result = ttfs_mlp(h, w_in, threshold, w_out, windows=windows)
    assert result.saturated == int((z > windows.hidden).sum()) > 0
    torch.testing.assert_close(result.y, z.clamp(0, windows.hidden) @ w_out.t(), rtol=0, atol=1e-10)


def test_constrained_simulation_equals_the_constrained_twin():
    h, w_in, threshold, w_out = random_mlp(200, 32, 64, seed=1)
    _, z = relu_twin(h, w_in, threshold, w_out)
    windows = Windows(h.abs().max().item(), z.max().item())
    c = TTFSConstraints(time_bits=4, weight_bits=4)
    y_twin, _ = relu_twin(h, w_in, threshold, w_out, windows=windows, constraints=c)
    exact = ttfs_mlp(h, w_in, threshold, w_out, windows=windows).y
    for engine in ("events", "closed"):
        y = ttfs_mlp(h, w_in, threshold, w_out, windows=windows, constraints=c, engine=engine).y
        torch.testing.assert_close(y, y_twin, rtol=0, atol=1e-9)
        assert (y - exact).abs().max() > 1e-2  # the constraints do change the output


def test_spike_times_sit_on_the_clock_and_jitter_stays_in_the_window():
    h, w_in, threshold, w_out = random_mlp(50, 16, 32, seed=2)
    windows = Windows(4.0, 8.0)
    clocked = ttfs_mlp(h, w_in, threshold, w_out, windows=windows, constraints=TTFSConstraints(time_bits=3))
    t = clocked.hidden_times[torch.isfinite(clocked.hidden_times)]
    ticks = (t - windows.input) / (windows.hidden / 8)
    torch.testing.assert_close(ticks, ticks.round(), rtol=0, atol=1e-9)
    assert ((ticks >= 0) & (ticks < 8)).all()
    noisy = TTFSConstraints(jitter=0.05)
    runs = [
        ttfs_mlp(
            h,
            w_in,
            threshold,
            w_out,
            windows=windows,
            constraints=noisy,
            generator=torch.Generator().manual_seed(s),
        )  # fmt: skip
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0].y, runs[1].y) and not torch.equal(runs[0].y, runs[2].y)
    t = runs[0].hidden_times[torch.isfinite(runs[0].hidden_times)]
    assert ((t >= windows.input) & (t <= windows.input + windows.hidden)).all()


def test_weights_quantise_to_symmetric_levels_with_a_straight_through_gradient():
    w = torch.randn(8, 50, requires_grad=True)
    q = quantize_weights(w, 4)
    levels = q.detach() / (w.detach().abs().amax(dim=1, keepdim=True) / 7)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert all(len(row.round().unique()) <= 15 for row in levels)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(
    "bad", [{"time_bits": 1}, {"weight_bits": 40}, {"time_bits": 3.0}, {"jitter": -0.1}, {"jitter": 1.5}]
)
def test_constraints_reject_bad_values(bad):
    with pytest.raises(ConfigError):
        TTFSConstraints(**bad)


def test_model_config_validates_the_mlp_kind_and_keeps_the_parameters():
    with pytest.raises(ConfigError):
        ModelConfig(mlp="relu6")
    spiking = NordLM(get_config("tiny"))
    ttfs = NordLM(dataclasses.replace(get_config("tiny"), mlp="ttfs"))
    assert ttfs.param_spec() == spiking.param_spec()
    with pytest.raises(ConfigError):
        configure(spiking, engine="events")
    with pytest.raises(ConfigError):
        configure(ttfs, engine="analog")


# --- a trained tiny TTFS model -----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads make a tiny step ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_path(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("ttfs") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return tok


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny TTFS model trained 30 steps as its ReLU twin on the text."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config("tiny"), vocab_size=tokenizer.get_vocab_size(), mlp="ttfs")
    model = NordLM(cfg)
    ids = torch.tensor(tokenizer.encode(TEXT).ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        starts = torch.randint(0, ids.numel() - 33, (8,))
        x = torch.stack([ids[s : s + 32] for s in starts])
        y = torch.stack([ids[s + 1 : s + 33] for s in starts])
        out = model(x, y)
        (out.loss + out.reg_loss).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first - 1.0
    return model.eval(), ids


def test_trained_model_runs_exactly_as_a_ttfs_network(trained):
    model, ids = trained
    x = ids[:64].view(2, 32)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: inputs.append(a)) for layer in ttfs_layers(model)]
    with torch.no_grad():
        reference = model(x).logits
        configure(model, engine="events")
        collect_stats(model)
        simulated = model(x)
        stats = collect_stats(model)
        configure(model, engine="relu")
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(simulated.logits, reference, rtol=0, atol=2e-4)
    pre = [h @ w_in.t() - th for h, w_in, th, _ in inputs[len(inputs) // 2 :]]
    margin = 1e-6  # a pre-activation within float32 rounding of 0 may go either way in another matmul order
    surely, possibly = (sum(int((v > bound).sum()) for v in pre) for bound in (margin, -margin))
    assert surely <= stats.hidden_spikes <= possibly  # the neurons with a positive pre-activation fire
    assert stats.tokens == x.numel() and stats.hidden_neuron_tokens == x.numel() * 512 * 4
    assert stats.saturated == 0 and 0 < stats.spikes_per_neuron < 1
    assert 0 < stats.events_per_mac < 1


def test_greedy_generation_with_ttfs_mlps_gives_the_relu_twins_tokens(trained, tokenizer):
    model, _ = trained
    twin = generate(model, tokenizer, "To be, or", max_tokens=12, temperature=0)
    configure(model, engine="events")
    try:
        collect_stats(model)
        spiking = generate(model, tokenizer, "To be, or", max_tokens=12, temperature=0)
        stats = collect_stats(model)
    finally:
        configure(model, engine="relu")
    assert spiking.token_ids == twin.token_ids
    assert stats.tokens > 12 and stats.hidden_spikes > 0


def test_calibrated_windows_cover_their_data_and_constraints_fine_tune_through_the_twin(trained):
    model, ids = trained
    x, y = ids[:129][:-1].view(4, 32), ids[1:129].view(4, 32)
    windows = calibrate(model, x, margin=1.1)
    assert len(windows) == 4 and all(w.input > 0 and w.hidden > 0 for w in windows)
    constrained = TTFSConstraints(time_bits=4, weight_bits=4)
    try:
        configure(model, engine="events", constraints=constrained)
        with torch.no_grad():
            simulated = model(x).logits
        configure(model, engine="relu")
        twin = model(x, y)  # the constrained twin, with gradients (straight-through)
        twin.loss.backward()
    finally:
        configure(model, engine="relu", constraints=TTFSConstraints())
        for layer in ttfs_layers(model):
            layer.windows = None
    grads = [b.mlp_in.weight.grad for b in model.blocks]
    model.zero_grad()
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert (simulated - twin.logits.detach()).abs().max() < 1e-3
    assert collect_stats(model).saturated == 0


def test_ttfs_model_deltas_merge_bit_identically_in_any_delivery_order(trained):
    model, _ = trained
    spec = model.param_spec()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    peers = [Identity.from_private_bytes(bytes([40 + i]) * 32) for i in range(3)]
    codec = CodecConfig(chunk_size=4096, density=64 / 4096)
    g = torch.Generator().manual_seed(5)

    def replica() -> Replica:
        return Replica(
            run_id="ttfs", spec=spec, base=base, merge=MergeConfig(), authorities=[peers[0].public_key]
        )

    base_hash = replica().base_hash
    wire = []
    for peer in peers:
        delta = {name: torch.randn(*shape, generator=g) * 1e-3 for name, shape in spec.items()}
        env = DeltaEncoder(codec, spec).encode(
            delta, run_id="ttfs", round=0, base_hash=base_hash, identity=peer
        )
        wire.append(env.to_bytes())
    a, b = replica(), replica()
    for data in wire:
        a.add(decode_envelope(data, spec, run_id="ttfs"))
    for data in reversed(wire):
        b.add(decode_envelope(data, spec, run_id="ttfs"))
    assert a.weights_hash() == b.weights_hash() != replica().weights_hash()
    merged = NordLM(model.cfg)
    merged.load_state_dict(a.weights())
    assert merged.blocks[0].ttfs is not None
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        twin = merged(x).logits
        configure(merged, engine="events")
        torch.testing.assert_close(merged(x).logits, twin, rtol=0, atol=2e-4)


def test_generate_cli_prints_ttfs_statistics_and_refuses_a_model_without_ttfs_mlps(
    trained, tokenizer_path, capsys
):
    model, _ = trained
    meta = {"tokenizer_path": str(tokenizer_path), "tokenizer_sha256": sha256_file(tokenizer_path)}
    ttfs_path, plain_path = (
        tokenizer_path.parent / "ttfs.safetensors",
        tokenizer_path.parent / "plain.safetensors",
    )
    save_model(ttfs_path, model, meta)
    save_model(plain_path, NordLM(dataclasses.replace(model.cfg, mlp="spiking")), meta)
    argv = ["--prompt", "To be", "--tokens", "4", "--temperature", "0", "--ttfs"]
    assert main(["generate", str(ttfs_path), *argv]) == 0
    out = capsys.readouterr().out
    assert "spikes per hidden neuron per token" in out and "synaptic events per token" in out
    assert main(["generate", str(plain_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mlp='ttfs'" in err[0]
