"""An older revision of this repository beside the working tree, for benchmarks that compare the two in
one run: a temporary `git worktree`, removed afterwards whatever happens."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def older_tree(ref: str | None, *, carry: tuple[str, ...] = ()) -> Iterator[Path | None]:
    """A checkout of `ref` (None when `ref` is empty); `carry`: paths of this tree copied into it, so that the
    same script (an attacker, a victim, a server) runs on the older library."""
    if not ref:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="nord-bench-ref-"))
    tree = tmp / "tree"
    try:
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(tree), ref], check=True)
        for path in carry:
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / path, tree / path)
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def print_side_by_side(results: dict[str, dict], key_width: int, column_width: int) -> None:
    """One row per measured key, one column per tree."""
    print(f"\n{'':<{key_width}}" + "".join(f"{name:>{column_width}}" for name in results))
    for key in next(iter(results.values())):
        cells = "".join(f"{str(r[key])[: column_width - 2]:>{column_width}}" for r in results.values())
        print(f"{key:<{key_width}}" + cells)
