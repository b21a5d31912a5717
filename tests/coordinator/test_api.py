"""The coordinator's HTTP API against a real SQLite history and real checkpoint files."""

from __future__ import annotations

import hashlib

import pytest
from conftest import PEERS
from fastapi.testclient import TestClient

from coordinator.api import ApiContext, create_app
from nord.checkpoint import load_checkpoint, weights_hash

RUN_CONFIG = {"run_id": "api-test", "rounds": {"quorum": 3, "deadline_s": 300.0}}
MADDR = "/ip4/127.0.0.1/tcp/4001/p2p/QmYzFp3zZR4fytk5YBwxxnmgQYCbJ7RjwyjHiTs28VkTku"


class RecordingAdmin:
    """Stands in for the authority only in the auth tests, which check who may call it, not what it does
    (tests/coordinator/test_authority.py drives the real revoke and ban)."""

    def __init__(self):
        self.calls = []

    def revoke(self, contribution_id, *, reason, by):
        self.calls.append(("revoke", contribution_id, reason, by))

    def ban(self, peer, *, reason, by):
        self.calls.append(("ban", peer, reason, by))


TOKENIZER = b'{"model": {"type": "BPE"}}'
SEAL_OF_ROUND = {8: b"seal of round 7"}  # stands in for the replica's lookup; the bytes are served as is


@pytest.fixture
def client(seeded, tmp_path):
    history, ckpt = seeded
    admin = RecordingAdmin()
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER)
    app = create_app(
        ApiContext(
            history=history,
            run_config=RUN_CONFIG,
            checkpoint_dir=ckpt,
            model={"name": "tiny", "parameters": 1_022_208, "layers": 4},
            admin=admin,
            admin_token="s3cret",
            live=lambda: {"multiaddrs": [MADDR]},
            seal_bytes=SEAL_OF_ROUND.get,
            tokenizer_path=tmp_path / "tokenizer.json",
        )
    )
    with TestClient(app) as c:
        c.admin = admin
        yield c


def test_summary_reports_round_tokens_hash_and_join_command(client, seeded):
    history, _ = seeded
    s = client.get("/api/summary").json()
    assert s["run_id"] == "api-test" and s["round"] == 8 and s["sealed_rounds"] == 8
    assert s["parameters"] == 1_022_208
    assert s["tokens_seen"] == history.tokens_seen() > 0
    assert s["weights_hash"] == history.latest_checkpoint()["weights_hash"]
    assert s["join_command"] == f"nord-node join --initial-peers {MADDR} --run api-test"


def test_peers_rounds_and_metrics_lists(client):
    peers = client.get("/api/peers").json()
    assert {p["peer"] for p in peers} == set(PEERS)
    flaky = next(p for p in peers if p["peer"] == PEERS[3])
    assert flaky["rejected"] == 3 and flaky["accepted"] == 5
    rounds = client.get("/api/rounds").json()
    assert [r["round"] for r in rounds] == list(range(9))
    metrics = client.get("/api/metrics").json()
    assert len(metrics) == 8 and metrics[0]["val_loss"] > metrics[-1]["val_loss"]
    assert "firing_rate/layer0" in metrics[0] and metrics[1]["rejected"] == 1


def test_checkpoint_download_carries_its_weights_hash(client, tmp_path):
    listed = client.get("/api/checkpoints").json()
    assert [c["round"] for c in listed] == list(range(9))
    r = client.get("/checkpoints/latest.safetensors")
    assert r.status_code == 200 and r.headers["x-nord-round"] == "8"
    out = tmp_path / "dl.safetensors"
    out.write_bytes(r.content)
    tensors, _ = load_checkpoint(out)
    assert weights_hash(tensors) == r.headers["x-nord-weights-hash"] == listed[-1]["weights_hash"]
    assert (
        client.get("/checkpoints/3.safetensors").headers["x-nord-weights-hash"] == listed[3]["weights_hash"]
    )


def test_the_seal_of_a_checkpoint_is_served_with_its_hash_and_round(client):
    r = client.get("/checkpoints/latest.seal")
    assert r.status_code == 200 and r.content == SEAL_OF_ROUND[8]
    assert r.headers["x-nord-round"] == "8"
    assert r.headers["x-nord-weights-hash"] == client.get("/api/checkpoints").json()[-1]["weights_hash"]
    assert client.get("/checkpoints/8.seal").content == SEAL_OF_ROUND[8]


def test_the_runs_tokenizer_is_served_with_its_sha256(client, tmp_path):
    r = client.get("/tokenizer.json")
    assert r.status_code == 200 and r.content == TOKENIZER
    assert r.headers["x-nord-tokenizer-sha256"] == hashlib.sha256(TOKENIZER).hexdigest()
    (tmp_path / "tokenizer.json").unlink()
    r = client.get("/tokenizer.json")
    assert r.status_code == 404 and "no tokenizer.json" in r.json()["error"]


@pytest.mark.parametrize(
    "path, status, words",
    [
        ("/checkpoints/3.seal", 404, "seal of checkpoint 3 is no longer held"),
        ("/checkpoints/0.seal", 404, "initial weights: no seal"),
        ("/checkpoints/99.safetensors", 404, "no checkpoint for round 99"),
        ("/checkpoints/abc.safetensors", 404, "bad checkpoint name"),
        ("/checkpoints/3.bin", 404, "no such file"),
    ],
    ids=["seal-not-held", "no-seal-for-round-0", "unknown-round", "bad-name", "bad-extension"],
)
def test_bad_checkpoint_requests_get_a_json_error(client, path, status, words):
    r = client.get(path)
    assert r.status_code == status and words in r.json()["error"]


def test_prometheus_text_has_run_and_peer_series(client):
    text = client.get("/metrics").text
    assert 'nord_round{run="api-test"} 8' in text
    assert f'nord_peer_contributions_rejected{{run="api-test",peer="{PEERS[3]}"}} 3' in text
    assert 'nord_firing_rate{run="api-test",layer="layer0"}' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_run_config_and_dashboard_are_served(client):
    assert client.get("/api/run-config").json() == RUN_CONFIG
    page = client.get("/")
    assert page.status_code == 200 and "Join this run" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_admin_needs_the_bearer_token(client):
    cid = client.get("/api/revocations").json()["revocations"][0]["contribution_id"]
    assert client.post(f"/api/admin/revoke/{cid}").status_code == 401
    assert (
        client.post(f"/api/admin/revoke/{cid}", headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    assert client.admin.calls == []
    ok = client.post(
        f"/api/admin/revoke/{cid}", headers={"Authorization": "Bearer s3cret"}, json={"reason": "spam"}
    )
    assert ok.status_code == 200 and client.admin.calls == [("revoke", cid, "spam", "admin")]


def test_admin_rejects_bad_input_with_a_clear_message(client):
    auth = {"Authorization": "Bearer s3cret"}
    r = client.post("/api/admin/revoke/" + "ab" * 32, headers=auth)
    assert r.status_code == 404 and "unknown contribution" in r.json()["error"]
    r = client.post("/api/admin/ban/not-a-key", headers=auth)
    assert r.status_code == 400 and "64-digit" in r.json()["error"]
    r = client.post(f"/api/admin/ban/{PEERS[0]}", headers=auth, json={"reason": ""})
    assert r.status_code == 400 and "reason" in r.json()["error"]
    assert client.admin.calls == []


def test_admin_is_disabled_without_a_token(seeded):
    history, ckpt = seeded
    app = create_app(ApiContext(history=history, run_config=RUN_CONFIG, checkpoint_dir=ckpt, model={}))
    with TestClient(app) as c:
        r = c.post(f"/api/admin/ban/{PEERS[0]}", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "NORD_ADMIN_TOKEN" in r.json()["error"]
