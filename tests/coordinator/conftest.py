"""Shared fixtures for coordinator tests: a real SQLite history filled the way a run fills it."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from coordinator.history import History
from nord.checkpoint import save_checkpoint

T0 = 1_700_000_000.0
PEERS = [hashlib.sha256(f"peer{i}".encode()).hexdigest() for i in range(4)]


def seed_history(history: History, checkpoint_dir: Path, *, rounds: int = 8, now: float = T0) -> None:
    """Fill `history` with `rounds` sealed rounds of 4 peers, one rejection and one revocation per few rounds,
    and real checkpoint files for every round."""
    history.touch_peer(PEERS[0], mode="public", device="cuda:Tesla T4", at=now)
    history.touch_peer(PEERS[1], mode="client", device="cuda:Tesla T4", at=now)
    history.touch_peer(PEERS[2], mode="public", device="cpu", at=now)
    history.touch_peer(PEERS[3], mode="client", device="mps", at=now)
    gen = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(64, 64, generator=gen), "b": torch.zeros(64)}
    base = save_checkpoint(checkpoint_dir / "0.safetensors", weights, {"round": 0})
    history.record_checkpoint(
        0,
        file="0.safetensors",
        weights_hash=base,
        nbytes=(checkpoint_dir / "0.safetensors").stat().st_size,
        at=now,
    )
    for r in range(rounds):
        t = now + 60 * r
        history.open_round(r, base_hash=base, at=t)
        sealed = []
        for i, peer in enumerate(PEERS):
            cid = hashlib.sha256(f"{peer}{r}".encode()).hexdigest()
            history.record_contribution(
                cid, round=r, peer=peer, nbytes=40_000 + 1000 * i, tokens=40_960, at=t + 5 + i
            )
            if peer == PEERS[3] and r % 3 == 1:
                history.set_verdict(
                    cid,
                    "rejected",
                    reason="loss rose by 0.81 nats on the held-out batch",
                    loss_before=5.0,
                    loss_after=5.81,
                    norm=1.0,
                )
                history.record_revocation(
                    cid, reason="loss rose by 0.81 nats on the held-out batch", by="validator", at=t + 30
                )
            else:
                history.set_verdict(cid, "accepted", loss_before=5.0, loss_after=4.9, norm=0.8)
                sealed.append(cid)
        weights = {k: v + 0.01 for k, v in weights.items()}
        f = f"{r + 1}.safetensors"
        base = save_checkpoint(checkpoint_dir / f, weights, {"round": r + 1})
        loss = 7.0 * math.exp(-0.15 * r) + 2.5
        metrics = {"val_loss": loss, "val_ppl": math.exp(loss)}
        for layer in range(4):
            metrics[f"firing_rate/layer{layer}"] = 0.3 * math.exp(-0.2 * r) + 0.05 + 0.01 * layer
        history.mark_sealed(sealed, r)
        history.seal_round(r, weights_hash=base, reason="quorum", metrics=metrics, at=t + 40)
        history.record_checkpoint(
            r + 1, file=f, weights_hash=base, nbytes=(checkpoint_dir / f).stat().st_size, at=t + 41
        )
    history.open_round(rounds, base_hash=base, at=now + 60 * rounds)


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[History, Path]:
    history = History.open(tmp_path / "history.sqlite")
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    seed_history(history, ckpt)
    yield history, ckpt
    history.close()
