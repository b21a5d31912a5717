"""The coordinator's HTTP API against a real SQLite history and real checkpoint files."""

from __future__ import annotations

import hashlib
import threading

import pytest
from conftest import PEERS, T0
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from coordinator.api import ApiContext, create_app, join_command
from coordinator.history import HistoryReader
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
LAST_HEARD = T0 + 60 * 7 + 5  # the seeded peers' latest contribution arrived at LAST_HEARD + peer index


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(seeded, tmp_path):
    history, ckpt = seeded
    admin = RecordingAdmin()
    (tmp_path / "tokenizer.json").write_bytes(TOKENIZER)
    reader = HistoryReader(history.path)
    clock = Clock(LAST_HEARD + 10)
    app = create_app(
        ApiContext(
            history=reader,
            run_config=RUN_CONFIG,
            checkpoint_dir=ckpt,
            model={"name": "tiny", "parameters": 1_022_208, "layers": 4},
            admin=admin,
            admin_token="s3cret",
            live=lambda: {"multiaddrs": [MADDR]},
            seal_bytes=SEAL_OF_ROUND.get,
            tokenizer_path=tmp_path / "tokenizer.json",
            clock=clock,
        )
    )
    with TestClient(app) as c:
        c.admin, c.clock = admin, clock
        yield c
    reader.close()


def test_summary_reports_round_tokens_hash_and_join_command(client, seeded):
    history, _ = seeded
    s = client.get("/api/summary").json()
    assert s["run_id"] == "api-test" and s["round"] == 8 and s["sealed_rounds"] == 8
    assert s["parameters"] == 1_022_208
    assert s["tokens_seen"] == history.tokens_seen() > 0
    assert s["weights_hash"] == history.latest_checkpoint()["weights_hash"]
    assert s["join_command"] == f"nord-node join --initial-peers {MADDR} --run api-test"  # no key known


def test_the_join_command_pins_the_runs_authority():
    key = "ab" * 32
    command = join_command([MADDR], "api-test", key)
    assert command == f"nord-node join --initial-peers {MADDR} --run api-test --authority {key[:20]}"


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
        ("/checkpoints/3.bin", 404, "bad checkpoint name"),
        ("/checkpoints/%C2%B2.safetensors", 404, "bad checkpoint name"),  # '²' passes str.isdigit
        ("/checkpoints/%D9%A0.safetensors", 404, "bad checkpoint name"),  # Arabic-Indic 0: int() reads 0
        ("/checkpoints/99999999999999999999.safetensors", 404, "bad checkpoint name"),  # over SQLite's int
        ("/checkpoints/" + "7" * 5000 + ".safetensors", 404, "bad checkpoint name"),
        ("/checkpoints/007.safetensors", 404, "bad checkpoint name"),
    ],
    ids=[
        "seal-not-held",
        "no-seal-for-round-0",
        "unknown-round",
        "bad-name",
        "bad-extension",
        "superscript-two",
        "arabic-indic-zero",
        "20-digits",
        "5000-digits",
        "leading-zeros",
    ],  # fmt: skip
)
def test_bad_checkpoint_requests_get_a_json_error(client, path, status, words):
    r = client.get(path)
    assert r.status_code == status and words in r.json()["error"]


def test_metrics_are_valid_prometheus_exposition(client):
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(r.text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), "a family is split (interleaved) or written twice"
    assert all(f.type in ("gauge", "counter") for f in families), "a sample outside its typed family"
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    by_name = {f.name: f for f in families}
    assert [s.value for s in by_name["nord_round"].samples] == [8]
    assert [s.value for s in by_name["nord_sealed_rounds"].samples] == [8]
    rejected = {s.labels["peer"]: s.value for s in by_name["nord_peer_contributions_rejected"].samples}
    assert rejected == {PEERS[0]: 0, PEERS[1]: 0, PEERS[2]: 0, PEERS[3]: 3}
    rates = by_name["nord_firing_rate"].samples
    assert {s.labels["layer"] for s in rates} == {f"layer{i}" for i in range(4)}
    assert all(s.labels["run"] == "api-test" for f in families for s in f.samples)


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
    reader = HistoryReader(history.path)
    app = create_app(ApiContext(history=reader, run_config=RUN_CONFIG, checkpoint_dir=ckpt, model={}))
    with TestClient(app) as c:
        r = c.post(f"/api/admin/ban/{PEERS[0]}", headers={"Authorization": "Bearer x"})
    reader.close()
    assert r.status_code == 403 and "NORD_ADMIN_TOKEN" in r.json()["error"]


def test_admin_token_is_checked_before_the_body_is_read(client):
    garbage = {"Content-Type": "application/json"}
    r = client.post(f"/api/admin/ban/{PEERS[0]}", content=b"{not json", headers=garbage)
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    assert r.headers["connection"] == "close"
    r = client.post(
        f"/api/admin/ban/{PEERS[0]}", content=b"x" * 70_000, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert client.admin.calls == []


def test_rounds_and_metrics_are_paged_with_a_link_to_older_ones(client):
    r = client.get("/api/rounds?limit=3")
    assert [x["round"] for x in r.json()] == [6, 7, 8]
    assert r.links["next"]["url"] == "/api/rounds?before=6&limit=3"
    older = client.get(r.links["next"]["url"])
    assert [x["round"] for x in older.json()] == [3, 4, 5]
    assert [x["round"] for x in client.get("/api/rounds?before=2&limit=3").json()] == [0, 1]
    assert "link" not in client.get("/api/rounds?before=2&limit=3").headers
    assert [m["round"] for m in client.get("/api/metrics?limit=2").json()] == [6, 7]


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "before=-1",
        "before=%C2%B2",
        "before=%D9%A0",
        "before=" + "9" * 30,
        "limit=1.5",
    ],
)
def test_bad_page_parameters_get_a_json_422(client, query):
    r = client.get(f"/api/rounds?{query}")
    assert r.status_code == 422 and r.json()["error"].startswith("bad request: query.")


def test_unknown_paths_and_methods_get_json_errors(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = client.delete("/api/summary")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/api/admin/revoke/" + "Z" * 64, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 400 and "64 lowercase hex" in r.json()["error"]


def test_a_peer_is_online_only_while_heard_from_within_the_window(client):
    """Online means heard from within 60 s, whatever the history still holds of it."""
    client.clock.now = LAST_HEARD + 3 + 59.5  # 59.5 s after the latest peer last contributed
    peers = {p["peer"]: p for p in client.get("/api/peers").json()}
    assert [peers[p]["online"] for p in PEERS] == [False, False, False, True]
    assert peers[PEERS[3]]["last_seen"] == LAST_HEARD + 3
    summary = client.get("/api/summary").json()
    assert (summary["peers_online"], summary["peers_total"], summary["online_window_s"]) == (1, 4, 60.0)
    client.clock.now = LAST_HEARD + 3 + 61
    assert not any(p["online"] for p in client.get("/api/peers").json())
    assert client.get("/api/summary").json()["peers_online"] == 0


def test_openapi_documents_errors_and_checkpoint_content_types(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    checkpoint = paths["/checkpoints/{name}"]["get"]["responses"]
    assert "application/octet-stream" in checkpoint["200"]["content"]
    assert checkpoint["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    for path in ("/api/admin/ban/{peer}", "/api/admin/revoke/{contribution_id}"):
        assert {"400", "401", "403", "413", "422"} <= set(paths[path]["post"]["responses"])
    assert "404" in paths["/api/admin/revoke/{contribution_id}"]["post"]["responses"]
    assert "422" in paths["/api/rounds"]["get"]["responses"]
    assert "application/json" in paths["/tokenizer.json"]["get"]["responses"]["200"]["content"]


def test_no_api_page_loads_scripts_from_a_cdn(client):
    """The schema is served as JSON; no Swagger page that pulls its scripts from a CDN (blank offline)."""
    assert client.get("/api/docs").status_code == 404
    assert client.get("/api/openapi.json").status_code == 200


def test_api_reads_never_wait_for_the_authoritys_lock(client, seeded):
    """While the authority holds the history's lock mid-transaction, pages still answer, from the last
    commit (the API reads on its own WAL connections)."""
    history, _ = seeded
    answers: list[dict] = []
    with history._lock:  # what History._tx holds while the authority writes
        history._conn.execute("BEGIN IMMEDIATE")
        history._conn.execute("UPDATE rounds SET sealed_at = 1.0 WHERE round = 8")  # not committed
        reader = threading.Thread(target=lambda: answers.append(client.get("/api/summary").json()))
        reader.start()
        reader.join(timeout=60)
        history._conn.execute("ROLLBACK")
    assert answers and answers[0]["sealed_rounds"] == 8, "the page waited for the writer's lock"
