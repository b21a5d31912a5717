from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nord.cli import main
from nord.evaluate import evaluate_tokens, sha256_file
from nord.model import NordLM, save_model
from nord.recipes import get_config

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
    "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. "
) * 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A real byte-level BPE tokenizer, a tiny model checkpoint that records it, and a text file."""
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tok.save(str(root / "tokenizer.json"))
    cfg = dataclasses.replace(get_config("tiny"), vocab_size=tok.get_vocab_size(), max_seq_len=16)
    torch.manual_seed(0)
    meta = {
        "tokenizer_path": str(root / "tokenizer.json"),
        "tokenizer_sha256": sha256_file(root / "tokenizer.json"),
    }
    save_model(root / "model.safetensors", NordLM(cfg), meta)
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    return root


def test_state_carried_across_windows_equals_one_long_window(workdir):
    tok = Tokenizer.from_file(str(workdir / "tokenizer.json"))
    model = NordLM(dataclasses.replace(get_config("tiny"), vocab_size=tok.get_vocab_size())).eval()
    ids = torch.tensor(tok.encode(TEXT[:300]).ids)
    short = evaluate_tokens(model, ids, tok.decode, seq_len=7, batch_size=1)
    long = evaluate_tokens(model, ids, tok.decode, seq_len=10_000, batch_size=1)
    with torch.no_grad():
        out = model(ids[None, :-1], ids[None, 1:])
    assert short.tokens == long.tokens == ids.numel() - 1
    assert short.loss == pytest.approx(long.loss, abs=1e-4)
    assert long.loss == pytest.approx(out.loss.item(), abs=1e-4)


def test_rows_cover_every_token_and_bits_per_byte_is_nats_over_bytes(workdir):
    tok = Tokenizer.from_file(str(workdir / "tokenizer.json"))
    model = NordLM(dataclasses.replace(get_config("tiny"), vocab_size=tok.get_vocab_size())).eval()
    ids = torch.tensor(tok.encode(TEXT).ids)
    r = evaluate_tokens(model, ids, tok.decode, seq_len=16, batch_size=3)
    assert r.tokens == ids.numel() - 1
    first = len(tok.decode(ids[:1].tolist()).encode())
    assert abs(r.bytes - (len(TEXT.encode()) - first)) <= 3  # row boundaries may split a multi-byte char
    assert r.bits_per_byte == pytest.approx(r.loss * r.tokens / (math.log(2) * r.bytes))
    assert r.ppl == pytest.approx(math.exp(r.loss))


def test_eval_cli_prints_json_for_each_file(workdir, capsys):
    assert (
        main(["eval", str(workdir / "model.safetensors"), "--text", str(workdir / "text.txt"), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)[str(workdir / "text.txt")]
    assert result["tokens"] > 100 and result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert 0 < result["bits_per_byte"] < 20


def test_eval_cli_finds_a_moved_tokenizer_with_override(workdir, tmp_path, capsys):
    moved = tmp_path / "tok.json"
    moved.write_bytes((workdir / "tokenizer.json").read_bytes())
    args = ["eval", str(workdir / "model.safetensors"), "--text", str(workdir / "text.txt"), "--tokenizer"]
    assert main([*args, str(moved)]) == 0
    other = tmp_path / "other.json"
    other.write_text((workdir / "tokenizer.json").read_text() + " ")  # same tokenizer, other bytes
    assert main([*args, str(other)]) == 2
    assert "sha256" in capsys.readouterr().err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("kind", ["missing", "binary", "empty", "not-utf8"])
def test_eval_cli_rejects_bad_text_files_with_one_line(workdir, tmp_path, capsys, kind):
    path = tmp_path / "bad.txt"
    if kind == "binary":
        path.write_bytes(b"abc\x00\x01\x02")
    elif kind == "empty":
        path.write_text("  \n")
    elif kind == "not-utf8":
        path.write_bytes(b"caf\xe9 latin-1")
    assert main(["eval", str(workdir / "model.safetensors"), "--text", str(path)]) == 2
    assert str(path) in one_error_line(capsys)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-config", "missing"])
def test_eval_cli_rejects_bad_checkpoints_with_one_line(workdir, tmp_path, capsys, damage):
    data = (workdir / "model.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif damage == "other-config":
        from nord.checkpoint import load_checkpoint, save_checkpoint

        tensors, meta = load_checkpoint(workdir / "model.safetensors")
        cfg = json.loads(meta["model_config"])
        save_checkpoint(bad, tensors, {"model_config": {**cfg, "d_mlp": cfg["d_mlp"] * 2}})
    assert main(["eval", str(bad), "--text", str(workdir / "text.txt")]) == 2
    one_error_line(capsys)
