"""bench/length.py's unigram-cache probe: the cache probabilities it mixes in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import length  # noqa: E402


def test_cache_hits_are_decayed_counts_of_the_tokens_read_so_far():
    x = np.array([3, 1, 3, 2, 3, 1])
    y = np.array([1, 3, 2, 3, 1, 1])
    np.testing.assert_allclose(
        length.cache_hits(x, y, vocab=4, decay=1.0, window=None), [0, 1 / 2, 0, 2 / 4, 1 / 5, 2 / 6]
    )
    # a restart every 3 tokens forgets the first window; decay 0.5 weighs the last token 1, the one before ½
    np.testing.assert_allclose(
        length.cache_hits(x, y, vocab=4, decay=1.0, window=3), [0, 1 / 2, 0, 0, 0, 1 / 3]
    )
    np.testing.assert_allclose(length.cache_hits(x[:2], y[:2], vocab=4, decay=0.5, window=None), [0, 1 / 3])


def test_cache_probe_picks_on_the_first_row_and_reports_the_others():
    """Text that repeats with a period of 32 tokens, read in 16-token windows: only a cache kept across
    windows has seen the next token, so it beats a uniform model and the restarted cache does not."""
    vocab, rows, n = 64, 2, 256
    stream = np.tile(np.arange(32), rows * n // 32 + 1)
    x, y = stream[: rows * n].reshape(rows, n), stream[1 : rows * n + 1].reshape(rows, n)
    nll = {mode: torch.full((rows, n), float(np.log(vocab))) for mode in ("carried", "reset")}
    probe = length.cache_probe(nll, x, y, vocab, window=16)
    assert probe["weight"] == max(length.CACHE_WEIGHTS) and probe["report_rows"] == 1
    assert probe["with_cache"]["carried"] < probe["model_only"]["reset"] < probe["with_cache"]["reset"]
    assert probe["carried_ppl_gain"] > 0
    with pytest.raises(SystemExit, match="eval-rows >= 2"):
        length.cache_probe({k: v[:1] for k, v in nll.items()}, x[:1], y[:1], vocab, window=16)
