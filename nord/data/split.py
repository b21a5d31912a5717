"""The deterministic train/val split: it depends on nothing but the text.

Each document is cut into consecutive blocks of about
    target = clamp(total_chars · val_fraction / 16, 256, 4096) characters,
ending at blank lines where possible (long paragraphs are cut at line ends). Walking all blocks in corpus
order, block b (n_b characters) goes to validation iff
    val_chars + n_b / 2 < val_fraction · seen_chars      (seen_chars includes b),
i.e. error diffusion: validation stays within half a block of the requested fraction at every point, is
spread evenly through the corpus (every ~20th block at 0.05), and depends on nothing but the text. The
target shrinks for small corpora, so a one-document source still gets ~16 validation blocks.
"""

from __future__ import annotations

import re

from nord.errors import DataError


def split_blocks(text: str, target: int) -> list[str]:
    """Consecutive blocks of >= `target` characters ending at blank lines where possible; joined = text."""
    parts = re.split(r"(\n[ \t]*\n+)", text)
    paragraphs = [a + b for a, b in zip(parts[0::2], parts[1::2] + [""], strict=True)]
    pieces = []
    for p in paragraphs:
        pieces.extend(p.splitlines(keepends=True) if len(p) > 2 * target else [p])
    blocks, current = [], ""
    for piece in pieces:
        current += piece
        if len(current) >= target:
            blocks.append(current)
            current = ""
    if current:
        blocks.append(current)
    return blocks


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Per document, (its training text, its validation text), by the error-diffusion rule above."""
    total = sum(len(d) for d in docs)
    target = int(min(4096, max(256, total * val_fraction / 16)))
    train, val = [], []
    val_chars = seen = 0
    for doc in docs:
        parts: tuple[list[str], list[str]] = ([], [])
        for block in split_blocks(doc, target):
            seen += len(block)
            to_val = val_chars + len(block) / 2 < val_fraction * seen
            val_chars += len(block) if to_val else 0
            parts[to_val].append(block)
        train.append("".join(parts[0]))
        val.append("".join(parts[1]))
    if val_chars == 0 or val_chars == total:
        raise DataError(f"corpus too small to split: {total} characters (need a few KB of text)")
    return train, val
