"""One validator per concept that crosses a trust boundary (wire messages, HTTP bodies, config files).

Predicates answer True/False so each caller raises its own error type (CodecError, MergeError,
ConfigError, an HTTP 400) with its own wording; the rules themselves live only here. Pure: no imports
beyond the standard library, so `nord.config` and `nord.codec` can both use it without importing each
other.
"""

from __future__ import annotations

import re
from typing import Any

RUN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
HEX64_PATTERN = re.compile(r"[0-9a-f]{64}")
PUBLIC_KEY_BYTES = 32
MAX_REASON_CHARS = 500  # why a contribution was removed or a peer banned: signed and stored in full
FINGERPRINT_MIN_HEX = 16  # shortest authority fingerprint a user may pin (64 bits of the key)
FINGERPRINT_HEX = 20  # what Nord prints (80 bits): second-preimage grinding of ed25519 keys is out of reach
MAX_NAME_CHARS = 32  # a volunteer's display name (`nord-node join --name`)


def is_run_id(value: Any) -> bool:
    """1-64 of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit."""
    return isinstance(value, str) and RUN_ID_PATTERN.fullmatch(value) is not None


def is_hex64(value: Any) -> bool:
    """64 lowercase hex digits: a sha256 (contribution id, weights hash) or an ed25519 key in hex."""
    return isinstance(value, str) and HEX64_PATTERN.fullmatch(value) is not None


is_hex_key = is_hex64  # an ed25519 public key written as hex is the same 64 lowercase digits


def is_key_bytes(value: Any) -> bool:
    """A raw ed25519 public key."""
    return isinstance(value, bytes) and len(value) == PUBLIC_KEY_BYTES


def is_reason(value: Any) -> bool:
    """A non-blank string of at most MAX_REASON_CHARS characters."""
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_REASON_CHARS


def is_count(value: Any) -> bool:
    """A non-negative int (not a bool): rounds, sizes."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_display_name(value: Any) -> bool:
    """1-MAX_NAME_CHARS printable characters (no control or line-breaking ones), not blank, no edge spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_NAME_CHARS
        and value == value.strip()
        and value.isprintable()
    )


def fingerprint(key_hex: str) -> str:
    """What users compare and pin for an authority key: its first FINGERPRINT_HEX hex digits."""
    return key_hex[:FINGERPRINT_HEX]


def is_fingerprint(value: Any) -> bool:
    """A pinnable fingerprint: FINGERPRINT_MIN_HEX..64 lowercase hex digits (a prefix of the key)."""
    return (
        isinstance(value, str)
        and FINGERPRINT_MIN_HEX <= len(value) <= 64
        and re.fullmatch(r"[0-9a-f]+", value) is not None
    )


def matches_fingerprint(key_hex: str, pinned: str) -> bool:
    return is_hex64(key_hex) and is_fingerprint(pinned) and key_hex.startswith(pinned)


def host_port(value: Any) -> tuple[str, int] | None:
    """`HOST:PORT` (an IPv6 host in brackets) as (host, port 0-65535); None if it is not one."""
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]"), int(port)
