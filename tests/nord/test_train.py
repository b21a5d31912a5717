from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from nord.config import TrainConfig
from nord.errors import ConfigError, DataError
from nord.model import NordLM
from nord.recipes import get_config
from nord.train import cosine_lr, make_optimizer, stream_batches, train_steps


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
    assert 0.0 < first.firing_rate < 1.0 and first.reg_loss >= 0.0 and 0.0 < first.memory_share < 1.0
    assert opt.param_groups[0]["lr"] == 1e-3


def test_train_steps_say_when_batches_run_out():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(), "cpu")
    with pytest.raises(DataError, match="ran out after 2 of 5"):
        train_steps(model, opt, itertools.islice(fixed_batches(), 2), 5, grad_clip=1.0, device="cpu")


def test_stream_batches_continue_each_row_and_wrap_at_the_end():
    tokens = np.arange(50, dtype=np.uint16)
    first = list(itertools.islice(stream_batches(tokens, 3, 8, seed=1), 10))
    again = list(itertools.islice(stream_batches(tokens, 3, 8, seed=1), 10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))  # seeded
    for (x, y), (x_next, _) in itertools.pairwise(first):
        assert x.shape == (3, 8) and x.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x_next[:, 0], y[:, -1])  # row b goes on
    rows = torch.cat([x for x, _ in first], 1)  # 80 tokens per row from a 50-token stream: it wrapped
    assert torch.equal(rows, (rows[:, :1] + torch.arange(80)) % 50)
    with pytest.raises(ConfigError, match="seq_len"):
        next(stream_batches(tokens, 2, 50))


def test_train_steps_carry_the_state_from_one_step_to_the_next():
    """With carry_state the second window's loss is the one read after the first (lr 0: no update)."""
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint16)
    (x1, y1), (x2, y2) = itertools.islice(stream_batches(tokens, 2, 64), 2)
    with torch.no_grad():
        first = model(x1, y1)
        carried, fresh = model(x2, y2, state=first.state).loss.item(), model(x2, y2).loss.item()
    assert abs(carried - fresh) > 1e-4  # the check below can tell them apart
    opt = make_optimizer(model, TrainConfig(), "cpu")
    for carry, second in ((True, carried), (False, fresh)):
        stats = train_steps(model, opt, stream_batches(tokens, 2, 64), 2, grad_clip=1.0, device="cpu",
                            lr_fn=lambda step: 0.0, progress=False, carry_state=carry)  # fmt: skip
        assert stats.loss == pytest.approx((first.loss.item() + second) / 2, rel=1e-6)


# --- nord train, end to end on a real prepared corpus ------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A real corpus: this repository's docs (English prose), prepared with a small BPE."""
    from pathlib import Path

    from nord.data import DataConfig, prepare

    root = tmp_path_factory.mktemp("corpus")
    docs = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
    text = root / "docs.txt"
    text.write_text(docs.read_text(encoding="utf-8") * 3, encoding="utf-8")
    cfg = DataConfig(source=str(text), vocab_size=300, val_fraction=0.1)
    return prepare(cfg, root / "prepared", progress=False).path


def train_argv(corpus_dir, out, *extra):
    return ["train", "--model", "tiny", "--data", str(corpus_dir), "--out", str(out), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "3", "--eval-batches", "2", "--warmup", "2", "--device", "cpu",
            *extra]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_nord_train_writes_checkpoint_curve_and_resumes(corpus_dir, tmp_path, capsys):
    from nord.checkpoint import read_metadata
    from nord.cli import main
    from nord.evaluate import sha256_file

    out = tmp_path / "run"
    assert main(train_argv(corpus_dir, out, "--steps", "6")) == 0
    printed = capsys.readouterr().out
    assert "step      3" in printed and "step      6" in printed and "ppl" in printed
    meta = read_metadata(out / "model.safetensors")
    assert meta["step"] == "6" and json.loads(meta["model_config"])["vocab_size"] == 300
    assert meta["tokenizer_sha256"] == sha256_file(meta["tokenizer_path"])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["weights_hash"] == meta["weights_hash"]

    assert main(train_argv(corpus_dir, out, "--steps", "6")) == 2  # would overwrite: refused
    assert "--resume" in one_error_line(capsys)

    assert main(train_argv(corpus_dir, out, "--steps", "9", "--resume")) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 9 and state["history"]["step"] == [3, 6, 9]
    assert state["optimizer"]["state"][0]["step"].item() == 9  # AdamW moments carried over


@pytest.mark.parametrize("problem", ["other-model", "corrupt-state", "nothing", "unknown-recipe"])
def test_nord_train_rejects_bad_resume_and_config_with_one_line(corpus_dir, tmp_path, capsys, problem):
    from nord.cli import main

    out = tmp_path / "run"
    if problem in ("other-model", "corrupt-state"):
        assert main(train_argv(corpus_dir, out, "--steps", "3")) == 0
        capsys.readouterr()
    if problem == "corrupt-state":
        (out / "train_state.pt").write_bytes(b"not a torch file")
    argv = train_argv(corpus_dir, out, "--steps", "6", "--resume")
    if problem == "other-model":
        argv[argv.index("tiny")] = "small"
    if problem == "unknown-recipe":
        argv[argv.index("tiny")] = "gigantic"
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert {"other-model": "another config", "corrupt-state": "corrupt", "nothing": "nothing to resume",
            "unknown-recipe": "tiny, small"}[problem] in line  # fmt: skip


def test_evaluate_reads_the_whole_validation_split(corpus_dir):
    from nord.data import load_corpus
    from nord.train import evaluate

    corpus = load_corpus(corpus_dir)
    model = NordLM(dataclasses.replace(get_config("tiny"), vocab_size=corpus.vocab_size))
    result = evaluate(model, corpus, seq_len=32)
    assert result.tokens == len(corpus.val) - 1
    assert result.loss == pytest.approx(math.log(corpus.vocab_size), rel=0.1)  # untrained: near uniform


def test_nord_train_cpu_precision_reaches_the_step(corpus_dir, tmp_path):
    """The flag reaches the step: same seed and data, other numerics, still a finite loss; auto is
    bf16 exactly where the CPU computes it natively."""
    from nord.checkpoint import read_metadata
    from nord.cli import main
    from nord.train import cpu_bf16_default

    hashes = {}
    for precision in ("fp32", "bf16", "auto"):
        out = tmp_path / precision
        assert main(train_argv(corpus_dir, out, "--steps", "3", "--cpu-precision", precision)) == 0
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert all(math.isfinite(v) for v in state["history"]["val_loss"])
        hashes[precision] = read_metadata(out / "model.safetensors")["weights_hash"]
    assert hashes["fp32"] != hashes["bf16"]
    assert hashes["auto"] == hashes["bf16" if cpu_bf16_default() else "fp32"]
