"""A worker's state directory: everything `nord-node join` needs to resume after a crash or a reset.

    p2p.key        libp2p private key: the peer id (nord.transport)
    identity.key   ed25519 key that signs contributions (nord.identity)
    run.json       the run's RunConfig as fetched from the run's peers (signed by its authority)
    authority      the authority fingerprint pinned at the first join: a config signed by anyone else is
                   refused from then on (`nord-node pull --state-dir` checks against it too)
    replica/       the CRDT replica: snapshot + append-only log (nord.crdt)
    replica.new/   a verified replacement being swapped in (`swap_replica`); gone once it is `replica/`
    worker.pt      error-feedback residual, optimizer state, inner steps done, and the last contribution
    status.json    the last round's status (what the status line shows), for scripts and tests; `loss`
                   and `firing_rate` stay those of the last round this worker trained (`loss_round`)
                   while the next round trains and waits

Every file is written atomically (temporary file, fsync, rename), so a kill at any instant leaves either
the previous or the new version. The last contribution is saved *before* it is added to the replica or
sent, so a restart re-sends that same envelope instead of training a second one for the round.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nord.config import RunConfig, check_fingerprint
from nord.errors import ConfigError
from nord.fsutil import atomic_write_bytes, fsync_dir

FORMAT_VERSION = 1
TRAINING_KEYS = ("loss", "firing_rate")  # a round's training numbers, kept until the next trained round


class StateDir:
    """Paths and atomic reads/writes of one worker's state directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.path.mkdir(parents=True, exist_ok=True)
        self.p2p_key = self.path / "p2p.key"
        self.identity_key = self.path / "identity.key"
        self.run_json = self.path / "run.json"
        self.replica_dir = self.path / "replica"
        self.incoming_replica_dir = self.path / "replica.new"
        self.old_replica_dir = self.path / "replica.old"
        self.authority_file = self.path / "authority"
        self.worker_file = self.path / "worker.pt"
        self.status_file = self.path / "status.json"

    def check_run(self, run_json: str) -> None:
        """Remember the run's config; refuse a state directory that belongs to another run config.

        Configs are compared after parsing (defaults filled in), so state written before a config field
        with a default existed still resumes; the file is then rewritten in the current form. Signatures
        are not compared: whoever fetches a config verifies its signature.
        """
        if self.run_json.is_file():
            stored = self.run_json.read_text(encoding="utf-8")
            try:
                old = RunConfig.from_json(stored)
            except ConfigError as e:
                raise ConfigError(
                    f"{self.run_json} is not a run config this version reads ({e}); "
                    "use another --state-dir, or delete that one to start over"
                ) from None
            new = RunConfig.from_json(run_json)
            if dataclasses.replace(old, signature="") != dataclasses.replace(new, signature=""):
                raise ConfigError(
                    f"{self.path} holds state of another run config (run {old.run_id!r}); "
                    "use another --state-dir, or delete that one to start over"
                )
            if stored == run_json:
                return
        atomic_write_bytes(self.run_json, run_json.encode("utf-8"))

    def pinned_authority(self) -> str | None:
        """The authority fingerprint stored at the first join (None before it)."""
        if not self.authority_file.is_file():
            return None
        return check_fingerprint(self.authority_file.read_text(encoding="utf-8"), str(self.authority_file))

    def pin_authority(self, pinned: str) -> None:
        if self.pinned_authority() != pinned:
            atomic_write_bytes(self.authority_file, (pinned + "\n").encode("utf-8"))

    def swap_replica(self) -> None:
        """Make the verified replica in `incoming_replica_dir` the replica: replica → replica.old,
        replica.new → replica, then drop replica.old. A crash anywhere leaves one complete replica
        that `recover_replica` finds (the new one only once it was completely written)."""
        shutil.rmtree(self.old_replica_dir, ignore_errors=True)
        if self.replica_dir.exists():
            os.replace(self.replica_dir, self.old_replica_dir)
        os.replace(self.incoming_replica_dir, self.replica_dir)
        fsync_dir(self.path)
        shutil.rmtree(self.old_replica_dir, ignore_errors=True)

    def recover_replica(self) -> None:
        """Finish or undo a `swap_replica` a crash interrupted; drop an incomplete replacement."""
        if not self.replica_dir.exists() and self.incoming_replica_dir.exists():
            os.replace(self.incoming_replica_dir, self.replica_dir)
        elif not self.replica_dir.exists() and self.old_replica_dir.exists():
            os.replace(self.old_replica_dir, self.replica_dir)
        shutil.rmtree(self.incoming_replica_dir, ignore_errors=True)
        shutil.rmtree(self.old_replica_dir, ignore_errors=True)

    def save_worker(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"format_version": FORMAT_VERSION, **state}, buf)
        atomic_write_bytes(self.worker_file, buf.getvalue())

    def load_worker(self) -> dict[str, Any] | None:
        if not self.worker_file.is_file():
            return None
        try:
            state = torch.load(io.BytesIO(self.worker_file.read_bytes()), weights_only=True)
        except Exception as e:  # torch raises many kinds on a damaged pickle
            raise ConfigError(
                f"{self.worker_file} is damaged ({type(e).__name__}); delete it to start fresh"
            ) from None
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{self.worker_file} has an unknown format; delete it to start fresh")
        return state

    def write_status(self, status: dict[str, Any]) -> None:
        """Write `status`; training numbers it lacks (or gives as None) carry over from the last trained
        round, with `loss_round` naming that round."""
        status = dict(status)
        if any(status.get(k) is not None for k in TRAINING_KEYS):
            status["loss_round"] = status.get("round")
        else:
            previous = self.read_status() or {}
            for key in (*TRAINING_KEYS, "loss_round"):
                if previous.get(key) is not None:
                    status[key] = previous[key]
        atomic_write_bytes(self.status_file, json.dumps(status, sort_keys=True).encode("utf-8"))

    def read_status(self) -> dict[str, Any] | None:
        if not self.status_file.is_file():
            return None
        try:
            status = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # only ever written atomically; a hand-edited file is just not carried over
        return status if isinstance(status, dict) else None
