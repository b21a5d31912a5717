"""`nord data prepare | info`: build (or reuse) a tokenized corpus, or describe one."""

from __future__ import annotations

import time
from pathlib import Path

import nord.data
from nord.data.corpus import MAX_VOCAB, MIN_VOCAB, Corpus, DataConfig, load_corpus, prepare


def summary(corpus: Corpus) -> str:
    i = corpus.info
    return "\n".join(
        [
            f"corpus:     {corpus.path}",
            f"source:     {corpus.meta['config']['source']}",
            f"documents:  {i['documents']:,}   bytes: {i['bytes']:,}",
            f"tokens:     train {i['train_tokens']:,}   val {i['val_tokens']:,}",
            f"val bytes/token: {i['val_bytes_per_token']:.3f}",
            f"tokenizer:  vocab {corpus.vocab_size:,}   sha256 {corpus.tokenizer_hash}",
        ]
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare and inspect corpora", description=nord.data.__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = sub.add_parser("prepare", help="build (or reuse) a tokenized corpus")
    prep.add_argument(
        "--source",
        default=DataConfig.source,
        help="shakespeare | PATH (.txt/.jsonl, folder) | hf:NAME[:CONFIG][:SPLIT]",
    )
    prep.add_argument(
        "--vocab-size",
        type=int,
        default=DataConfig.vocab_size,
        help=f"BPE vocabulary, {MIN_VOCAB}..{MAX_VOCAB}",
    )
    prep.add_argument(
        "--val-fraction", type=float, default=DataConfig.val_fraction, help="share of text held out"
    )
    prep.add_argument("--tokenizer-sha256", default="", help="fail unless tokenizer.json has this sha256")
    prep.add_argument(
        "--root", type=Path, default=None, help="corpora directory (default $NORD_DATA_DIR or ~/.nord/data)"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.set_defaults(func=run)
    info = sub.add_parser("info", help="describe a prepared corpus")
    info.add_argument("dir", type=Path, help="a directory written by `nord data prepare`")
    info.set_defaults(func=run)


def run(args) -> int:
    if args.data_command == "info":
        print(summary(load_corpus(args.dir)))
        return 0
    cfg = DataConfig(
        source=args.source,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        tokenizer_sha256=args.tokenizer_sha256,
    )
    t0 = time.perf_counter()
    corpus = prepare(cfg, args.root, progress=not args.no_progress)
    print(summary(corpus))
    print(f"ready in {time.perf_counter() - t0:.1f} s")
    return 0
