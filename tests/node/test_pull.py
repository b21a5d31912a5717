"""`nord-node pull` over HTTP: the checkpoint is written only if its weights match the stated sealed hash."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch

from node.pull import checkpoint_url, pull_http
from nord.checkpoint import save_checkpoint, weights_hash
from nord.errors import CheckpointError, TransportError


class Server:
    """A real HTTP server on 127.0.0.1 serving one file with the headers the coordinator sends."""

    def __init__(self, body: bytes, headers: dict[str, str], status: int = 200) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.paths.append(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.paths: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def checkpoint(tmp_path) -> tuple[bytes, str]:
    tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
    digest = save_checkpoint(tmp_path / "src.safetensors", tensors, {"round": 7})
    return (tmp_path / "src.safetensors").read_bytes(), digest


def test_pull_writes_the_checkpoint_when_the_hash_matches(tmp_path, checkpoint):
    body, digest = checkpoint
    server = Server(body, {"X-Nord-Weights-Hash": digest, "X-Nord-Round": "7"})
    try:
        got, rnd = pull_http(server.url, tmp_path / "out" / "model.safetensors", timeout_s=10)
    finally:
        server.close()
    assert (got, rnd) == (digest, "7")
    assert server.paths == ["/checkpoints/latest.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == body


def test_pull_refuses_weights_that_are_not_the_sealed_ones(tmp_path, checkpoint):
    body, _ = checkpoint
    other = weights_hash({"w": torch.zeros(1)})
    server = Server(body, {"X-Nord-Weights-Hash": other})
    out = tmp_path / "out" / "model.safetensors"
    try:
        with pytest.raises(CheckpointError, match="do not match the sealed hash"):
            pull_http(server.url, out, timeout_s=10)
    finally:
        server.close()
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary one


def test_pull_refuses_a_truncated_download(tmp_path, checkpoint):
    body, digest = checkpoint
    server = Server(body[: len(body) // 2], {"X-Nord-Weights-Hash": digest})
    try:
        with pytest.raises((CheckpointError, TransportError)):
            pull_http(server.url, tmp_path / "model.safetensors", timeout_s=10)
    finally:
        server.close()
    assert not (tmp_path / "model.safetensors").exists()


def test_pull_needs_the_hash_header_and_reports_http_errors(tmp_path, checkpoint):
    body, _ = checkpoint
    server = Server(body, {})
    try:
        with pytest.raises(TransportError, match="did not state the weights hash"):
            pull_http(server.url, tmp_path / "a.safetensors", timeout_s=10)
    finally:
        server.close()
    server = Server(b'{"error": "no checkpoint saved yet"}', {}, status=404)
    try:
        with pytest.raises(TransportError, match="HTTP 404"):
            pull_http(server.url + "/checkpoints/3.safetensors", tmp_path / "a.safetensors", timeout_s=10)
    finally:
        server.close()
    with pytest.raises(TransportError, match="cannot reach"):
        pull_http("http://127.0.0.1:1", tmp_path / "a.safetensors", timeout_s=5)


def test_checkpoint_url_accepts_a_base_or_a_file_url():
    assert checkpoint_url("http://h:8000/") == "http://h:8000/checkpoints/latest.safetensors"
    assert checkpoint_url("http://h/checkpoints/4.safetensors") == "http://h/checkpoints/4.safetensors"
    assert Path(checkpoint_url("https://h")).name == "latest.safetensors"
