from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nord.cli import main
from nord.evaluate import sha256_file
from nord.generate import generate
from nord.model import NordLM, save_model
from nord.recipes import get_config

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tokenizer.json"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    vocab = Tokenizer.from_file(str(tokenizer)).get_vocab_size()
    return NordLM(dataclasses.replace(get_config("tiny"), vocab_size=vocab)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer):
    path = tokenizer.parent / "model.safetensors"
    save_model(path, model, {"tokenizer_path": str(tokenizer), "tokenizer_sha256": sha256_file(tokenizer)})
    return path


def test_greedy_generation_with_carried_state_equals_rerunning_the_prefix(model, tokenizer):
    tok = Tokenizer.from_file(str(tokenizer))
    result = generate(model, tok, "To be, or", max_tokens=12, temperature=0)
    ids = tok.encode("To be, or").ids
    with torch.no_grad():
        for _ in range(12):  # the slow way: the whole prefix through forward for every token
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert result.token_ids == ids[-12:]
    assert result.text == tok.decode(result.token_ids)
    assert 0.0 < result.firing_rate < 1.0


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model, tokenizer):
    tok = Tokenizer.from_file(str(tokenizer))
    a = generate(model, tok, "whether", max_tokens=15, temperature=1.0, seed=3)
    b = generate(model, tok, "whether", max_tokens=15, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids
    greedy = generate(model, tok, "whether", max_tokens=15, temperature=0)
    assert generate(model, tok, "whether", max_tokens=15, temperature=2.0, top_k=1, seed=9).token_ids == (
        greedy.token_ids
    )


def test_raster_records_every_neuron_of_the_layer_per_generated_token(model, tokenizer):
    tok = Tokenizer.from_file(str(tokenizer))
    result = generate(model, tok, "the question", max_tokens=9, temperature=0, record_layer=1)
    cfg = model.cfg
    assert result.raster.shape == (cfg.d_model + cfg.n_memory_slots + cfg.d_mlp, 9)
    assert set(result.raster.unique().tolist()) <= {0.0, 1.0}


def test_generate_cli_prints_text_rate_and_writes_a_raster(checkpoint, tmp_path, capsys):
    raster = tmp_path / "raster.png"
    argv = ["generate", str(checkpoint), "--prompt", "To be", "--tokens", "8", "--seed", "1"]
    assert main([*argv, "--raster", str(raster), "--raster-layer", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and "firing rate" in out
    assert raster.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompt", ""], "no tokens"),
        (["--prompt", "x", "--raster", "r.png", "--raster-layer", "9"], "layer"),
        (["--prompt", "x", "--top-k", "0"], "top-k"),
        (["--prompt", "x", "--device", "abacus"], "device"),
    ],
    ids=["empty-prompt", "bad-layer", "bad-top-k", "bad-device"],
)
def test_generate_cli_rejects_bad_input_with_one_line(checkpoint, capsys, extra, needle):
    assert main(["generate", str(checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_generate_cli_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope.safetensors"), "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err
