"""Proof that a lock is free during a slow step: events, not timings."""

from __future__ import annotations

import threading
from types import ModuleType

import pytest

FREE_LOCK_WAIT_S = 30.0  # a free lock is taken at once; generous for a loaded machine


def probe_lock_during(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str, lock) -> list[bool]:
    """Make every call of `module.name` (a slow step) first take `lock` from another thread, as a peer's
    request handler would; the returned list says, per call, whether that thread got it (within
    FREE_LOCK_WAIT_S: a step that holds the lock keeps it out until then)."""
    original = getattr(module, name)
    served: list[bool] = []

    def probed(*args, **kwargs):
        taken = threading.Event()

        def handler():
            with lock:
                taken.set()

        threading.Thread(target=handler, daemon=True).start()
        served.append(taken.wait(FREE_LOCK_WAIT_S))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, probed)
    return served
