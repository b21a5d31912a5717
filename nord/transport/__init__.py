"""Transport: a hivemind peer (p2pd + DHT node) behind a small blocking API; the only hivemind importer.

One `Transport` owns one p2pd daemon and one `DHTNode`, both driven by an asyncio loop in a background
thread ("async inside, blocking outside"). It offers three things:

1. Request/reply over libp2p binary streams, for payloads of any size (envelopes, run config, snapshots,
   tokenizer). Every message is one frame (frames.py)::

       magic b"NORD" | version u16 | kind u8 | 0 u8 | length u64 | body (1 MiB writes) | sha256(body)

   The receiver checks magic, protocol version and its size cap before reading the body, and the sha256
   before handing the body on; a peer of another `PROTOCOL_VERSION` gets (or reports) one clear line.
   Replies are frames of kind OK (the handler's bytes) or ERROR (a UTF-8 line).

   Every remote party is a stranger, so what it can make this peer spend is bounded (inbound.py): the
   body buffer grows only with bytes that arrived; each read and write must progress within
   `idle_timeout_s`; at most `max_streams_per_peer` / `max_streams` inbound streams are served at once
   (more get an ERROR frame); at most `max_inbound_bytes` of requests are held at once; handlers run in
   HANDLER_THREADS threads, at most HANDLER_CALLS_PER_PEER for one peer; a request that times out is
   cancelled (its stream closed, its task ended).

2. Small DHT records (`store_record` / `get_records`): contribution id, round, size, holder — never payloads
   (hivemind's DHT drops messages > 4 MiB silently and its store hangs above ~16 KiB; values are capped at
   MAX_RECORD_BYTES = 4 KiB).

3. Process hygiene (daemon.py): a persistent peer identity (`identity_path`, created atomically, locked
   against a second node using it), loopback-only options for tests (`local_only`: no UPnP / NAT-PMP /
   AutoNAT / relays), a watchdog that ends p2pd and removes its sockets if the process dies without
   `shutdown()` (even SIGKILL), `install_signal_handlers()` for SIGINT/SIGTERM, and p2pd's failures
   (port in use, identity taken, bootstrap unreachable, slow start) as one line each.

Public API (stable):
    PROTOCOL_VERSION, MAX_RECORD_BYTES, HANDLER_PREFIX
    TransportConfig(initial_peers, host_maddrs, announce_maddrs, client_mode, identity_path, local_only,
                    startup_timeout_s, request_timeout_s, idle_timeout_s, max_streams_per_peer,
                    max_streams, max_inbound_bytes)
    peer_id_of(multiaddr) -> str                  the /p2p/<id> part (ConfigError if missing)
    Transport.start(config) -> Transport          (also a context manager; `shutdown()` is idempotent)
        .peer_id: str                             base58 libp2p peer id
        .visible_maddrs() -> list[str]            full multiaddrs (with /p2p/<id>) other peers can dial
        .add_handler(name, fn, max_request_bytes=N)
                                                  fn(peer_id: str, body: bytes-like) -> bytes, run in a
                                                  thread; a NordError raised by fn reaches the caller as
                                                  its one line, anything else as "internal error"
        .request(peer_id, name, body, timeout_s=None, max_reply_bytes=...) -> bytes-like (TransportError)
        .store_record(key, subkey, value, ttl_s) -> bool    value msgpack-able, <= MAX_RECORD_BYTES
        .get_records(key) -> dict[subkey, value]
        .connected_peers() -> list[str]
        .bytes_sent, .bytes_received: int         stream traffic so far (as caller and as server)
        .inbound.open, .inbound.refused: int      inbound streams served now / refused over a cap so far
        .inbound.held_bytes: int                  request bytes held now (at most max_inbound_bytes)
        .install_signal_handlers()                SIGINT/SIGTERM -> shutdown(), then KeyboardInterrupt
        .stopped_by_signal: int | None            which signal stopped it, if one did
        .shutdown()
    Errors: TransportError (nord.errors) for everything a user must fix, as one line.

Example:
    with Transport.start(TransportConfig(local_only=True)) as a, Transport.start(
        TransportConfig(initial_peers=tuple(a.visible_maddrs()), local_only=True)
    ) as b:
        a.add_handler("echo", lambda peer, body: bytes(body), max_request_bytes=1024)
        assert b.request(a.peer_id, "echo", b"hi") == b"hi"

Files: config.py (TransportConfig, peer_id_of), frames.py (the frame), inbound.py (stream caps),
daemon.py (process hygiene), peer.py (Transport).
"""

from nord.transport.config import TransportConfig, peer_id_of
from nord.transport.frames import PROTOCOL_VERSION
from nord.transport.peer import HANDLER_PREFIX, MAX_RECORD_BYTES, Transport

__all__ = [
    "HANDLER_PREFIX",
    "MAX_RECORD_BYTES",
    "PROTOCOL_VERSION",
    "Transport",
    "TransportConfig",
    "peer_id_of",
]
