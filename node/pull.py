"""`nord-node pull`: fetch a run's latest sealed weights as a model checkpoint `nord generate` can read.

    --from http(s)://coordinator[:port]   GET /checkpoints/latest.safetensors; the coordinator states the
                                          sealed weights hash in the X-Nord-Weights-Hash header
    --from /ip4/.../p2p/<peer id> --run RUN   the peer's sealed snapshot over P2P; the hash the peer states
                                          for its sealed tip (hello) must match

Either way the tensors are hashed again here (`weights_hash`) and must equal the stated hash before the
file is renamed into place; nothing is written on a mismatch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from node.session import fetch_run, find_run, peer_ids, start_transport
from nord.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from nord.errors import CheckpointError, ConfigError, TransportError
from nord.fsutil import atomic_path, atomic_write_bytes
from nord.gossip import fetch_snapshot, fetch_tokenizer, hello

log = logging.getLogger(__name__)

HASH_HEADER = "X-Nord-Weights-Hash"
ROUND_HEADER = "X-Nord-Round"


def pull(args) -> int:
    source = args.source
    if source.startswith(("http://", "https://")):
        digest, rnd = pull_http(source, Path(args.out), timeout_s=args.timeout_s)
    elif source.startswith("/"):
        if not args.run:
            raise ConfigError("pulling over P2P needs --run RUN")
        digest, rnd = pull_p2p(args, Path(args.out))
    else:
        raise ConfigError(
            f"--from {source!r}: give the coordinator's http(s):// URL or a peer's /ip4/.../p2p/<id>"
        )
    print(f"wrote {args.out}: round {rnd}, weights {digest}")
    return 0


def checkpoint_url(source: str) -> str:
    return (
        source if source.endswith(".safetensors") else source.rstrip("/") + "/checkpoints/latest.safetensors"
    )


def pull_http(source: str, out: Path, *, timeout_s: float) -> tuple[str, str]:
    url = checkpoint_url(source)
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as e:
        raise TransportError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TransportError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    with response:
        stated = response.headers.get(HASH_HEADER)
        if not stated:
            raise TransportError(
                f"{url} did not state the weights hash ({HASH_HEADER}): not a Nord coordinator?"
            )
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
            tensors, meta = load_checkpoint(tmp)  # checks the file against its own recorded hash
            if weights_hash(tensors) != stated:
                raise CheckpointError(
                    f"{url}: downloaded weights do not match the sealed hash {stated[:16]}…"
                )
        return stated, response.headers.get(ROUND_HEADER) or meta.get("round", "?")


def pull_p2p(args, out: Path) -> tuple[str, str]:
    args.initial_peers = [args.source, *(args.initial_peers or ())]
    transport = start_transport(args, None)
    try:
        peer = find_run(transport, peer_ids((args.source,)), args.run)
        run, _ = fetch_run(transport, peer, args.run)
        before = hello(transport, peer, args.run)["base_hash"]
        with tempfile.TemporaryDirectory(prefix="nord-pull-") as tmp:
            path = fetch_snapshot(transport, peer, args.run, Path(tmp) / "snapshot.safetensors")
            tensors, meta = load_checkpoint(path)
        digest = weights_hash(tensors)
        after = hello(transport, peer, args.run)["base_hash"]  # a seal may have landed in between
        if digest not in (before, after):
            raise CheckpointError(f"peer {peer[-8:]} sent weights that do not match its sealed hash")
        extra = {
            "model_config": dataclasses.asdict(run.model),
            "run_id": run.run_id,
            "round": meta.get("base_round"),
        }
        save_checkpoint(out, tensors, {**extra, **_pull_tokenizer(transport, peer, run, out.parent)})
        return digest, meta.get("base_round", "?")
    finally:
        transport.shutdown()


def _pull_tokenizer(transport, peer: str, run, directory: Path) -> dict[str, str]:
    """Save the run's tokenizer.json beside the checkpoint (hash-checked) so `nord generate` finds it."""
    try:
        data = bytes(fetch_tokenizer(transport, peer, run.run_id))
    except TransportError as e:
        log.warning("no tokenizer from peer %s (%s); pass --tokenizer to nord generate", peer[-8:], e)
        return {}
    digest = hashlib.sha256(data).hexdigest()
    if run.data.tokenizer_sha256 and digest != run.data.tokenizer_sha256:
        raise TransportError(f"peer {peer[-8:]} sent a tokenizer that is not the run's (sha256 differs)")
    path = directory / "tokenizer.json"
    atomic_write_bytes(path, data)
    return {"tokenizer_path": str(path.resolve()), "tokenizer_sha256": digest}
