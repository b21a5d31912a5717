"""`nord-node pull`: fetch a run's latest sealed weights as a model checkpoint `nord generate` can read.

    --from http(s)://coordinator[:port]   GET /checkpoints/latest.safetensors (its weights hash in the
                                          X-Nord-Weights-Hash header, its round in X-Nord-Round), the seal
                                          that produced it (/checkpoints/<round>.seal), the run config
                                          (/api/run-config) and the tokenizer (/tokenizer.json)
    --from /ip4/.../p2p/<peer id> --run RUN   the peer's sealed snapshot over P2P (its seal travels in the
                                          snapshot's metadata), the run config and the tokenizer

Either way the run config must be signed by its authority, and by the pinned one: `--authority HEX`,
or the fingerprint a worker's `--state-dir` stored at its first join; with neither, the source is
trusted on first use and the fingerprint printed to check. The tensors are hashed again here
(`weights_hash`) and must equal the stated hash and the weights hash of an authority seal: signed by one
of the run config's authority keys, for this run, for round N - 1 of checkpoint N; checkpoint 0 must
be the genesis weights the signed config records. Nothing is written on a mismatch. The tokenizer is
saved beside the checkpoint (sha256 checked against the run config) and recorded in it, so
`nord generate OUT` needs no --tokenizer.

Rounds: checkpoint N holds the weights round N trains on, i.e. those sealed at the end of round N - 1
(checkpoint 0: the run's initial weights). Both ways report it in those words.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import TypeVar

from node.peers import PeerNames
from node.session import announce_trust, fetch_run, find_run, peer_ids, start_transport, with_retries
from node.state import StateDir
from nord.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from nord.config import RunConfig, check_fingerprint
from nord.crdt import Seal
from nord.errors import CheckpointError, ConfigError, MergeError, TransportError
from nord.fsutil import atomic_write_bytes
from nord.gossip import fetch_snapshot, fetch_tokenizer, snapshot_max_bytes

log = logging.getLogger(__name__)

HASH_HEADER = "X-Nord-Weights-Hash"
ROUND_HEADER = "X-Nord-Round"
TOKENIZER_HASH_HEADER = "X-Nord-Tokenizer-Sha256"
MAX_SMALL_BYTES = 64 << 20  # run config, seal, tokenizer
T = TypeVar("T")


def pull(args) -> int:
    source = args.source
    pinned = pull_pin(args.authority, args.state_dir)
    if source.startswith(("http://", "https://")):
        digest, rnd = pull_http(source, Path(args.out), timeout_s=args.timeout_s, pinned=pinned)
    elif source.startswith("/"):
        if not args.run:
            raise ConfigError("pulling over P2P needs --run RUN")
        digest, rnd = pull_p2p(args, Path(args.out), pinned)
    else:
        raise ConfigError(
            f"--from {source!r}: give the coordinator's http(s):// URL or a peer's /ip4/.../p2p/<id>"
        )
    print(f"wrote {args.out}: {describe_round(rnd)}, weights {digest}")
    return 0


def pull_pin(authority: str | None, state_dir: str | None) -> str | None:
    """The fingerprint to require: --authority, else the one a worker's --state-dir pinned."""
    if authority:
        return check_fingerprint(authority, "--authority")
    if state_dir is None:
        return None
    path = Path(state_dir).expanduser()
    pinned = StateDir(path).pinned_authority() if path.is_dir() else None
    if pinned is None:
        raise ConfigError(f"--state-dir {path} has pinned no authority (it never joined a run)")
    return pinned


def check_genesis(digest: str, run: RunConfig, where: str) -> None:
    """Checkpoint 0 must be the genesis weights the (signed) run config records."""
    if digest != run.genesis_hash:
        raise CheckpointError(f"{where}: the initial weights are not the run's genesis weights")


def describe_round(checkpoint_round: int) -> str:
    """What checkpoint N holds, in words (the same for both pull paths)."""
    if checkpoint_round == 0:
        return "the run's initial weights (no round sealed yet)"
    return f"weights sealed in round {checkpoint_round - 1} (the base of round {checkpoint_round})"


def check_seal(seal_data: bytes, run: RunConfig, checkpoint_round: int, digest: str, where: str) -> None:
    """`seal_data` must be an authority's valid seal of round checkpoint_round - 1 yielding `digest`."""
    try:
        seal = Seal.from_bytes(seal_data)  # checks the signature against the key it names
    except MergeError as e:
        raise CheckpointError(f"{where}: the seal is not valid ({e})") from None
    if seal.authority.hex() not in run.authorities:
        raise CheckpointError(
            f"{where}: the seal is signed by {seal.authority.hex()[:16]}…, not a run authority"
        )
    if seal.run_id != run.run_id or seal.round != checkpoint_round - 1:
        raise CheckpointError(
            f"{where}: the seal is for run {seal.run_id!r} round {seal.round}, "
            f"not run {run.run_id!r} round {checkpoint_round - 1}"
        )
    if seal.weights_hash != digest:
        raise CheckpointError(f"{where}: the weights are not the ones the authority sealed")


# ---- HTTP -------------------------------------------------------------------------------------------


def checkpoint_url(source: str) -> str:
    return (
        source if source.endswith(".safetensors") else source.rstrip("/") + "/checkpoints/latest.safetensors"
    )


def base_url(source: str) -> str:
    """The coordinator's root URL from `--from` (a root URL or a /checkpoints/<round>.safetensors URL)."""
    if source.endswith(".safetensors") and "/checkpoints/" in source:
        return source.rsplit("/checkpoints/", 1)[0]
    return source.rstrip("/")


def _get(url: str, timeout_s: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = json.loads(e.read(4096).decode("utf-8")).get("error", "")
        except (ValueError, AttributeError, OSError):
            pass
        raise TransportError(f"{url}: HTTP {e.code} {e.reason}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TransportError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def _get_small(url: str, timeout_s: float) -> tuple[bytes, Message]:
    with _get(url, timeout_s) as response:
        data = _read(response, url, lambda: response.read(MAX_SMALL_BYTES + 1))
        if len(data) > MAX_SMALL_BYTES:
            raise TransportError(f"{url}: more than {MAX_SMALL_BYTES} bytes")
        return data, response.headers


def _read(response, url: str, read: Callable[[], T]) -> T:
    """`read()` of a response body, with a cut connection as one line."""
    try:
        return read()
    except (http.client.HTTPException, OSError) as e:
        raise TransportError(f"{url}: the download broke off ({type(e).__name__})") from None


def pull_http(source: str, out: Path, *, timeout_s: float, pinned: str | None) -> tuple[str, int]:
    """Download, verify (signed config, stated hash, seal or genesis, tokenizer) and write the
    checkpoint; (weights hash, round)."""
    url, base = checkpoint_url(source), base_url(source)
    try:
        run = RunConfig.from_json(_get_small(f"{base}/api/run-config", timeout_s)[0].decode("utf-8"))
    except (ConfigError, UnicodeDecodeError) as e:
        raise TransportError(f"{base}/api/run-config is not a Nord run config ({e})") from None
    announce_trust(run.verify(pinned), pinned, base)
    with tempfile.TemporaryDirectory(prefix="nord-pull-") as tmp:
        with _get(url, timeout_s) as response:
            stated = response.headers.get(HASH_HEADER)
            if not stated:
                raise TransportError(
                    f"{url} did not state the weights hash ({HASH_HEADER}): not a Nord coordinator?"
                )
            raw_round = response.headers.get(ROUND_HEADER, "")
            if not raw_round.isdigit():
                raise TransportError(f"{url} did not state the checkpoint's round ({ROUND_HEADER})")
            rnd = int(raw_round)
            path = Path(tmp) / "checkpoint.safetensors"
            with open(path, "wb") as f:
                _read(response, url, lambda: shutil.copyfileobj(response, f, length=1 << 20))
        tensors, meta = load_checkpoint(path)  # checks the file against its own recorded hash
        digest = weights_hash(tensors)
        if digest != stated:
            raise CheckpointError(f"{url}: downloaded weights do not match the sealed hash {stated[:16]}…")
        if rnd == 0:
            check_genesis(digest, run, url)
        else:
            _check_http_seal(
                f"{base}/checkpoints/{rnd}.seal",
                run,
                rnd,
                digest,
                latest=url.endswith("/latest.safetensors"),
                timeout_s=timeout_s,
            )
        tokenizer = _http_tokenizer(base, run, timeout_s)
    kept = {k: v for k, v in meta.items() if k not in ("format_version", "weights_hash")}
    extra = {"model_config": dataclasses.asdict(run.model), "run_id": run.run_id, "round": rnd}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, tensors, {**kept, **extra, **_save_tokenizer(tokenizer, out.parent)})
    return digest, rnd


def _check_http_seal(
    url: str, run: RunConfig, rnd: int, digest: str, *, latest: bool, timeout_s: float
) -> None:
    """The latest checkpoint's seal must be served; an older one's may be gone from the coordinator's
    replica (compacted), which only a warning reports."""
    try:
        seal, _ = _get_small(url, timeout_s)
    except TransportError as e:
        if latest or "HTTP 404" not in str(e):
            raise
        log.warning("checkpoint %d is not checked against a seal: %s", rnd, e)
        return
    check_seal(seal, run, rnd, digest, url)


def _http_tokenizer(base: str, run: RunConfig, timeout_s: float) -> bytes | None:
    url = f"{base}/tokenizer.json"
    try:
        data, headers = _get_small(url, timeout_s)
    except TransportError as e:
        log.warning("no tokenizer from %s (%s); pass --tokenizer to nord generate", url, e)
        return None
    stated = headers.get(TOKENIZER_HASH_HEADER)
    if stated is not None and stated != hashlib.sha256(data).hexdigest():
        raise TransportError(f"{url}: the tokenizer does not match its stated sha256 (damaged download)")
    return _run_tokenizer(data, run, url)


def _run_tokenizer(data: bytes, run: RunConfig, where: str) -> bytes:
    """`data`, if it is the run's tokenizer (the run config pins its sha256)."""
    if run.data.tokenizer_sha256 and hashlib.sha256(data).hexdigest() != run.data.tokenizer_sha256:
        raise TransportError(f"{where} sent a tokenizer that is not the run's (sha256 differs)")
    return data


def _save_tokenizer(data: bytes | None, directory: Path) -> dict[str, str]:
    """Save tokenizer.json beside the checkpoint; the metadata that lets `nord generate` find it."""
    if data is None:
        return {}
    path = directory / "tokenizer.json"
    atomic_write_bytes(path, data)
    return {"tokenizer_path": str(path.resolve()), "tokenizer_sha256": hashlib.sha256(data).hexdigest()}


# ---- P2P --------------------------------------------------------------------------------------------


def pull_p2p(args, out: Path, pinned: str | None) -> tuple[str, int]:
    args.initial_peers = [args.source, *(args.initial_peers or ())]
    transport = start_transport(args, None)
    try:
        names = PeerNames(args.run)
        peer = find_run(transport, peer_ids((args.source,)), args.run, names)
        run, _, signer = fetch_run(transport, peer, args.run, pinned, names)
        announce_trust(signer, pinned, names(peer))
        with tempfile.TemporaryDirectory(prefix="nord-pull-") as tmp:
            target = Path(tmp) / "snapshot.safetensors"
            budget = snapshot_max_bytes(run.model)
            path = with_retries(
                "fetching the snapshot",
                lambda: fetch_snapshot(transport, peer, args.run, target, max_bytes=budget),
            )
            tensors, meta = load_checkpoint(path)
        digest = weights_hash(tensors)
        rnd = int(meta.get("base_round", 0))
        where = names(peer)
        if rnd > 0:
            try:
                seal = bytes.fromhex(meta.get("seal", ""))
            except ValueError:
                raise CheckpointError(f"{where} sent a snapshot whose seal is not hex") from None
            check_seal(seal, run, rnd, digest, where)
        else:
            check_genesis(digest, run, where)
        try:
            tokenizer = bytes(fetch_tokenizer(transport, peer, run.run_id))
        except TransportError as e:
            log.warning("no tokenizer from %s (%s); pass --tokenizer to nord generate", where, e)
            tokenizer = None
        if tokenizer is not None:
            _run_tokenizer(tokenizer, run, where)
        extra = {"model_config": dataclasses.asdict(run.model), "run_id": run.run_id, "round": rnd}
        save_checkpoint(out, tensors, {**extra, **_save_tokenizer(tokenizer, out.parent)})
        return digest, rnd
    finally:
        transport.shutdown()
