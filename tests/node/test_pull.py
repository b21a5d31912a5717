"""`nord-node pull` over HTTP: the checkpoint is written only if its weights match the stated hash and an
authority's seal, and the run's tokenizer is saved beside it so `nord generate` needs no --tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from node.pull import base_url, checkpoint_url, describe_round, pull_http, pull_pin
from node.state import StateDir
from nord.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from nord.config import RunConfig
from nord.crdt import Seal
from nord.data import DataConfig
from nord.errors import CheckpointError, ConfigError, TransportError
from nord.evaluate import load_tokenizer
from nord.identity import Identity
from nord.recipes import get_config

TOKENIZER = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str().encode()
ROUND = 7  # the checkpoint's round: weights sealed at the end of round 6
GENESIS = "9" * 64  # the run's round-0 weights hash (the tests' checkpoints are of round ROUND)


class Server:
    """A real HTTP server on 127.0.0.1 serving `routes`: path -> (status, headers, body)."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.paths.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b'{"error": "not here"}'))
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


class Coordinator:
    """What a coordinator serves for one sealed checkpoint; each test breaks one piece."""

    def __init__(self, tmp_path: Path) -> None:
        self.authority = Identity.generate()
        self.tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5)}
        self.digest = save_checkpoint(tmp_path / "src.safetensors", self.tensors, {"round": ROUND})
        self.body = (tmp_path / "src.safetensors").read_bytes()
        self.run = RunConfig(
            run_id="pull-test",
            model=get_config("tiny"),
            data=DataConfig(vocab_size=get_config("tiny").vocab_size, tokenizer_sha256=sha(TOKENIZER)),
            authorities=(self.authority.public_hex,),
            genesis_hash=GENESIS,
        ).signed(self.authority)
        self.seal = self.seal_of(self.authority, ROUND - 1, self.digest)
        self.headers = {"X-Nord-Weights-Hash": self.digest, "X-Nord-Round": str(ROUND)}
        self.tokenizer = TOKENIZER

    def seal_of(self, identity: Identity, rnd: int, digest: str) -> bytes:
        return Seal.create(
            run_id="pull-test",
            round=rnd,
            prev_hash="0" * 64,
            contribution_ids=[],
            weights_hash=digest,
            window_hash="0" * 64,
            identity=identity,
        ).to_bytes()

    def routes(self) -> dict[str, tuple[int, dict[str, str], bytes]]:
        return {
            "/api/run-config": (200, {}, self.run.to_json().encode()),
            "/checkpoints/latest.safetensors": (200, self.headers, self.body),
            f"/checkpoints/{ROUND}.seal": (200, {}, self.seal),
            "/tokenizer.json": (200, {"X-Nord-Tokenizer-Sha256": sha(self.tokenizer)}, self.tokenizer),
        }

    def pull(self, out: Path, url_suffix: str = "", *, pinned: str | None | bool = True):
        """Pull from a server of `routes()`; pinned=True pins this coordinator's own fingerprint."""
        server = Server(self.routes())
        pin = self.authority.fingerprint if pinned is True else pinned
        try:
            return pull_http(server.url + url_suffix, out, timeout_s=10, pinned=pin)
        finally:
            server.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def coordinator(tmp_path) -> Coordinator:
    return Coordinator(tmp_path)


def test_pull_writes_the_checkpoint_and_the_tokenizer_generate_finds(tmp_path, coordinator):
    out = tmp_path / "out" / "model.safetensors"
    assert coordinator.pull(out) == (coordinator.digest, ROUND)
    tensors, meta = load_checkpoint(out)
    assert weights_hash(tensors) == coordinator.digest
    assert meta["round"] == str(ROUND) and meta["run_id"] == "pull-test"
    assert (out.parent / "tokenizer.json").read_bytes() == TOKENIZER
    assert load_tokenizer(meta).get_vocab() == {
        "a": 0,
        "[UNK]": 1,
    }  # what `nord generate OUT` does without --tokenizer
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_pull_refuses_weights_that_are_not_the_sealed_ones(tmp_path, coordinator):
    coordinator.headers["X-Nord-Weights-Hash"] = weights_hash({"w": torch.zeros(1)})
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    with pytest.raises(CheckpointError, match="do not match the sealed hash"):
        coordinator.pull(out)
    assert list(out.parent.iterdir()) == []  # neither the file nor a temporary one


@pytest.mark.parametrize(
    "breakage, words",
    [
        ("stranger", "not a run authority"),
        ("other-weights", "not the ones the authority sealed"),
        ("other-round", "round 5, not run 'pull-test' round 6"),
        ("forged", "the seal is not valid"),
    ],
)
def test_pull_checks_the_weights_against_an_authority_seal(tmp_path, coordinator, breakage, words):
    """A coordinator that states a matching hash still cannot hand out weights no authority sealed."""
    if breakage == "stranger":
        coordinator.seal = coordinator.seal_of(Identity.generate(), ROUND - 1, coordinator.digest)
    elif breakage == "other-weights":
        coordinator.seal = coordinator.seal_of(coordinator.authority, ROUND - 1, "1" * 64)
    elif breakage == "other-round":
        coordinator.seal = coordinator.seal_of(coordinator.authority, ROUND - 2, coordinator.digest)
    else:
        coordinator.seal = coordinator.seal[:-1] + bytes([coordinator.seal[-1] ^ 1])
    out = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError, match=words):
        coordinator.pull(out)
    assert not out.exists()


def test_pull_refuses_a_tokenizer_that_is_not_the_runs(tmp_path, coordinator):
    coordinator.tokenizer = TOKENIZER + b" "
    with pytest.raises(TransportError, match="not the run's"):
        coordinator.pull(tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "tokenizer.json").exists()


def test_pull_refuses_a_truncated_download(tmp_path, coordinator):
    coordinator.body = coordinator.body[: len(coordinator.body) // 2]
    with pytest.raises((CheckpointError, TransportError)):
        coordinator.pull(tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_pull_needs_the_hash_header_and_reports_http_errors(tmp_path, coordinator):
    del coordinator.headers["X-Nord-Weights-Hash"]
    with pytest.raises(TransportError, match="did not state the weights hash"):
        coordinator.pull(tmp_path / "a.safetensors")
    with pytest.raises(TransportError, match="HTTP 404 Not Found: not here"):
        coordinator.pull(tmp_path / "a.safetensors", "/checkpoints/3.safetensors")
    with pytest.raises(TransportError, match="cannot reach"):
        pull_http("http://127.0.0.1:1", tmp_path / "a.safetensors", timeout_s=5, pinned=None)


def test_urls_and_round_wording():
    assert checkpoint_url("http://h:8000/") == "http://h:8000/checkpoints/latest.safetensors"
    assert checkpoint_url("http://h/checkpoints/4.safetensors") == "http://h/checkpoints/4.safetensors"
    assert Path(checkpoint_url("https://h")).name == "latest.safetensors"
    assert base_url("http://h/checkpoints/4.safetensors") == base_url("http://h/") == "http://h"
    assert describe_round(1) == "weights sealed in round 0 (the base of round 1)"
    assert describe_round(0) == "the run's initial weights (no round sealed yet)"


def test_the_latest_checkpoint_needs_its_seal_an_older_one_only_warns(tmp_path, coordinator, caplog):
    routes = coordinator.routes()
    del routes[f"/checkpoints/{ROUND}.seal"]  # compacted away on the coordinator
    routes[f"/checkpoints/{ROUND}.safetensors"] = routes["/checkpoints/latest.safetensors"]
    server = Server(routes)
    try:
        with pytest.raises(TransportError, match="HTTP 404"):
            pull_http(server.url, tmp_path / "latest.safetensors", timeout_s=10, pinned=None)
        assert not (tmp_path / "latest.safetensors").exists()
        url = f"{server.url}/checkpoints/{ROUND}.safetensors"
        assert pull_http(url, tmp_path / "old.safetensors", timeout_s=10, pinned=None) == (
            coordinator.digest,
            ROUND,
        )
    finally:
        server.close()
    assert f"checkpoint {ROUND} is not checked against a seal" in caplog.text


def test_a_server_that_signs_its_own_weights_is_refused_against_the_pinned_authority(tmp_path, coordinator):
    """The man in the middle of #17: a server that serves a config naming its own key, and seals made
    with it, passed before (the keys came from the same server); the pinned fingerprint refuses it."""
    genuine = coordinator.authority.fingerprint
    impostor = Identity.generate()
    coordinator.run = coordinator.run.with_authorities((impostor.public_hex,)).signed(impostor)
    coordinator.seal = coordinator.seal_of(impostor, ROUND - 1, coordinator.digest)
    out = tmp_path / "model.safetensors"
    with pytest.raises(
        ConfigError, match=f"signed by authority {impostor.fingerprint}, not the pinned {genuine}"
    ):
        coordinator.pull(out, pinned=genuine)
    assert not out.exists()


def test_without_a_pin_pull_says_it_trusts_the_server_on_first_use(tmp_path, coordinator, capsys):
    assert coordinator.pull(tmp_path / "model.safetensors", pinned=None) == (coordinator.digest, ROUND)
    said = capsys.readouterr().out
    assert "on first use" in said and f"--authority {coordinator.authority.fingerprint}" in said


def test_an_unsigned_run_config_is_refused(tmp_path, coordinator):
    coordinator.run = coordinator.run.with_authorities(coordinator.run.authorities)  # drops the signature
    with pytest.raises(ConfigError, match="not signed"):
        coordinator.pull(tmp_path / "model.safetensors", pinned=None)


def test_checkpoint_zero_must_be_the_genesis_weights(tmp_path, coordinator):
    """Round 0 carries no seal: before, any weights the server stated a hash for were taken."""
    coordinator.headers["X-Nord-Round"] = "0"
    with pytest.raises(CheckpointError, match="not the run's genesis weights"):
        coordinator.pull(tmp_path / "model.safetensors")
    coordinator.run = dataclasses.replace(coordinator.run, genesis_hash=coordinator.digest).signed(
        coordinator.authority
    )
    assert coordinator.pull(tmp_path / "model.safetensors") == (coordinator.digest, 0)


def test_pull_pins_the_authority_a_workers_state_dir_stored(tmp_path):
    state = StateDir(tmp_path / "worker")
    with pytest.raises(ConfigError, match="pinned no authority"):
        pull_pin(None, str(state.path))
    state.pin_authority("ab" * 10)
    assert pull_pin(None, str(state.path)) == "ab" * 10
    assert pull_pin("CD" * 8, str(state.path)) == "cd" * 8  # --authority wins
    with pytest.raises(ConfigError, match="16-64 hex digits"):
        pull_pin("abc", None)
