"""Joining: transient stream failures during the startup fetches are retried, real refusals are not."""

import pytest

from node.session import with_retries
from nord.errors import TransportError


def flaky(failures: list[str]):
    calls = []

    def fetch():
        calls.append(1)
        if len(calls) <= len(failures):
            raise TransportError(failures[len(calls) - 1])
        return "snapshot bytes"

    return fetch, calls


def test_a_stream_closed_early_is_tried_again():
    fetch, calls = flaky(["peer AfYS3cUo closed the stream for 'snapshot' (IncompleteReadError)"] * 2)
    assert with_retries("fetching", fetch, delay_s=0) == "snapshot bytes"
    assert len(calls) == 3


def test_retries_stop_after_the_last_attempt():
    fetch, calls = flaky(["peer x closed the stream for 'snapshot' (ConnectionError)"] * 5)
    with pytest.raises(TransportError, match="closed the stream"):
        with_retries("fetching", fetch, attempts=3, delay_s=0)
    assert len(calls) == 3


def test_a_refusal_is_not_retried():
    fetch, calls = flaky(["peer x does not serve 'snapshot': not a Nord peer, or an incompatible release"])
    with pytest.raises(TransportError, match="does not serve"):
        with_retries("fetching", fetch, delay_s=0)
    assert len(calls) == 1
