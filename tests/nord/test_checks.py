"""nord.checks: the one HOST:PORT parser (`nord demo --http`, `nord-coordinator serve --http`)."""

from __future__ import annotations

import pytest

from nord.checks import host_port


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_host_port_parses_what_a_user_writes(value, parsed):
    assert host_port(value) == parsed


@pytest.mark.parametrize(
    "value", ["localhost", ":8080", "h:", "h:65536", "h:-1", "h:8O", "h:²", "h:٠", 8080, None]
)
def test_host_port_refuses_anything_else(value):
    assert host_port(value) is None
