"""The daemon in this process against a real mosquitto, real SQLite and the real engine (tiny bundle)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from agent.messages import MAX_PAYLOAD_BYTES
from agent.topics import Kind
from tests.integration.conftest import BASE, Peer, db_path, query, wait_until, write_agent_config
from tests.integration.mosquitto import Mosquitto
from tests.tiny import TINY_LABELS

# ---- inference ----------------------------------------------------------------------------------


def test_request_response(start_agent, peer):
    start_agent()
    peer.publish("infer/req", {"id": "r1", "text": "motor M4 overheating, thermal relay tripped"})
    res = peer.expect("infer/res", lambda m: m["id"] == "r1").json
    (pred,) = res["predictions"]
    assert pred["label"] in TINY_LABELS and 0 <= pred["score"] <= 1
    assert [lab for lab, _ in pred["top_k"]][0] == pred["label"] and len(pred["top_k"]) == 3
    assert res["adapter_version"] is None and res["latency_ms"] > 0

    texts = ["oil leak under HU-1", "encoder signal lost", "PLC1 cycle complete"]
    peer.publish("infer/req", {"id": "r2", "texts": texts})
    res = peer.expect("infer/res", lambda m: m["id"] == "r2").json
    assert len(res["predictions"]) == 3


def test_mqtt5_response_topic_and_correlation_data(start_agent, peer):
    start_agent()
    peer.publish(
        "infer/req",
        {"id": "r9", "text": "fan failed"},
        response_topic="reply/client-7",
        correlation_data=b"\x01corr",
    )
    r = peer.expect("reply/client-7")
    assert r.json["id"] == "r9" and r.correlation_data == b"\x01corr"
    assert not [m for m in peer.on("infer/res") if m.json.get("id") == "r9"]
    # a response topic with wildcards cannot be published to: the default topic answers instead
    peer.publish("infer/req", {"id": "r10", "text": "fan failed"}, response_topic="reply/+/x")
    assert peer.expect("infer/res", lambda m: m["id"] == "r10").json["predictions"]


def test_events_are_classified_published_and_stored(start_agent, peer, agent_config):
    start_agent()
    peer.publish(
        "events", {"id": "ev-1", "text": "pneumatic valve V12 sticking", "source": "plc3", "ts": 1.7e9}
    )
    peer.publish("events", {"text": "no id here"})
    p1 = peer.expect("predictions", lambda m: m["id"] == "ev-1").json
    assert p1["label"] in TINY_LABELS and p1["source"] == "plc3" and p1["ts"] == 1.7e9
    p2 = peer.expect("predictions", lambda m: m["id"].startswith("e-")).json
    rows = query(
        db_path(agent_config),
        "SELECT id, text, text_sha256, label, score, adapter_version FROM predictions ORDER BY id",
    )
    assert [r[0] for r in rows] == sorted(["ev-1", p2["id"]])
    ev1 = next(r for r in rows if r[0] == "ev-1")
    assert ev1[1] == "pneumatic valve V12 sticking"
    assert ev1[2] == hashlib.sha256(b"pneumatic valve V12 sticking").hexdigest()
    assert (ev1[3], ev1[4], ev1[5]) == (p1["label"], p1["score"], None)

    # the same event again (a redelivery): published again, stored once
    peer.publish(
        "events", {"id": "ev-1", "text": "pneumatic valve V12 sticking", "source": "plc3", "ts": 1.7e9}
    )
    wait_until(
        lambda: len([m for m in peer.on("predictions") if m.json["id"] == "ev-1"]) == 2, what="republish"
    )
    assert query(db_path(agent_config), "SELECT count(*) FROM predictions")[0][0] == 2


def test_store_text_off_keeps_only_the_hash(start_agent, peer, agent_config):
    start_agent()
    peer.publish("config", {"version": 1, "store": {"store_text": False}}, retain=True)
    peer.expect("config/state", lambda m: m["status"] == "accepted")
    peer.publish("events", {"id": "ev-2", "text": "secret recipe 42"})
    peer.expect("predictions", lambda m: m["id"] == "ev-2")
    wait_until(lambda: query(db_path(agent_config), "SELECT count(*) FROM predictions")[0][0] == 1)
    assert query(db_path(agent_config), "SELECT text, text_sha256 FROM predictions") == [
        (None, hashlib.sha256(b"secret recipe 42").hexdigest())
    ]


# ---- samples and feedback -----------------------------------------------------------------------


def test_samples_are_stored_once_and_split(start_agent, peer, agent_config):
    agent = start_agent()
    for i in range(40):
        peer.publish("samples", {"id": f"s{i}", "text": f"sample text {i}", "label": TINY_LABELS[i % 4]})
    peer.publish("samples", {"id": "s3", "text": "sample text 3", "label": TINY_LABELS[3]})  # duplicate
    wait_until(lambda: agent.app.counters.get("duplicates", "samples") == 1, what="duplicate seen")
    db = db_path(agent_config)
    assert query(db, "SELECT count(*), count(DISTINCT sample_id) FROM samples") == [(40, 40)]
    # 10 per label, holdout fraction 0.1: one holdout sample per label
    assert query(
        db, "SELECT label, count(*) FROM samples WHERE split = 'holdout' GROUP BY label ORDER BY label"
    ) == [(lab, 1) for lab in sorted(TINY_LABELS)]
    assert agent.app.counters.get("stored", "samples") == 40


def test_feedback(start_agent, peer, agent_config):
    start_agent()
    peer.publish("events", {"id": "ev-9", "text": "belt worn"})
    peer.expect("predictions", lambda m: m["id"] == "ev-9")
    peer.publish("feedback", {"prediction_id": "ev-9", "label": "mechanical"})
    peer.publish("feedback", {"prediction_id": "ev-9", "label": "mechanical"})  # duplicate
    peer.publish("feedback", {"id": "f-2", "prediction_id": "nope", "label": "mechanical"})
    err = peer.expect("feedback/res").json
    assert (
        err["id"] == "f-2" and err["prediction_id"] == "nope" and err["error"]["code"] == "unknown_prediction"
    )
    wait_until(
        lambda: (
            query(db_path(agent_config), "SELECT prediction_id, label FROM feedback")
            == [("ev-9", "mechanical")]
        )
    )


# ---- runtime config -----------------------------------------------------------------------------


def test_config_accepted_applied_live_and_reported(start_agent, peer, broker):
    agent = start_agent()
    peer.publish(
        "config", {"version": 3, "inference": {"top_k": 2, "low_confidence_threshold": 1.0}}, retain=True
    )
    state = peer.expect("config/state", lambda m: m["version"] == 3)
    assert state.json["status"] == "accepted" and state.json["active_version"] == 3
    late = Peer(broker).subscribe(BASE + "config/state")  # the reported state is retained
    try:
        assert late.expect("config/state").json["version"] == 3
        assert late.received[0].retain
    finally:
        late.close()
    peer.publish("infer/req", {"id": "k2", "text": "fan failed"})
    (pred,) = peer.expect("infer/res", lambda m: m["id"] == "k2").json["predictions"]
    assert len(pred["top_k"]) == 2 and pred["uncertain"] is True
    assert agent.app.runtime.version == 3


def test_rejected_config_changes_nothing(start_agent, peer, agent_config):
    agent = start_agent()
    peer.publish("config", {"version": 2, "inference": {"top_k": 1}}, retain=True)
    peer.expect("config/state", lambda m: m["version"] == 2 and m["status"] == "accepted")
    bad = {"version": 5, "inference": {"top_k": 0, "max_batch": "8"}, "colour": "red"}
    peer.publish("config", bad, retain=True)
    state = peer.expect("config/state", lambda m: m["version"] == 5).json
    assert state["status"] == "rejected" and state["active_version"] == 2
    assert sorted(e.split(":")[0] for e in state["errors"]) == [
        "colour",
        "inference.max_batch",
        "inference.top_k",
    ]
    # stale and conflicting versions are rejected too
    peer.publish("config", {"version": 1}, retain=True)
    assert peer.expect("config/state", lambda m: m["version"] == 1).json["code"] == "stale_version"
    peer.publish("config", {"version": 2, "inference": {"top_k": 3}}, retain=True)
    assert peer.expect("config/state", lambda m: m.get("code") == "version_conflict").json["version"] == 2
    peer.publish("config", b"{oops", retain=True)
    assert peer.expect("config/state", lambda m: m.get("code") == "invalid_json").json["status"] == "rejected"
    # still version 2, still top_k 1
    assert agent.app.runtime.version == 2
    peer.publish("infer/req", {"id": "q", "text": "fan failed"})
    assert len(peer.expect("infer/res", lambda m: m["id"] == "q").json["predictions"][0]["top_k"]) == 1
    statuses = query(db_path(agent_config), "SELECT version, status FROM config_versions ORDER BY id")
    assert statuses[0] == (2, "accepted") and all(s == "rejected" for _, s in statuses[1:])
    assert agent.app.counters.snapshot()["rejected_by_topic"]["config"] == 4


def test_last_good_config_survives_restart_without_broker(start_agent, peer, broker, agent_config):
    agent = start_agent()
    peer.publish(
        "config", {"version": 7, "inference": {"top_k": 1}, "telemetry": {"interval_s": 5}}, retain=True
    )
    peer.expect("config/state", lambda m: m["version"] == 7 and m["status"] == "accepted")
    peer.publish("config", {"version": 8, "inference": {"top_k": -1}}, retain=True)  # rejected, retained
    peer.expect("config/state", lambda m: m["version"] == 8)
    agent.stop()
    peer.close()
    broker.stop()
    again = start_agent(connect=False)  # the broker is down
    assert not again.app.transport.wait_connected(0.5)
    assert again.app.runtime.version == 7
    assert again.app.engine.config.top_k == 1
    # the broker comes back: the retained (rejected) v8 is re-delivered and rejected again
    broker.start()
    again.wait_connected(15)
    wait_until(lambda: again.app.counters.get("rejected_by_topic", "config") >= 1, what="v8 rejected again")
    assert again.app.runtime.version == 7


# ---- commands -----------------------------------------------------------------------------------


def test_commands(start_agent, peer, agent_config, tmp_path):
    start_agent()
    peer.publish("cmd", {"id": "c1", "cmd": "status"})
    status = peer.expect("cmd/res", lambda m: m["id"] == "c1").json
    assert (
        status["ok"]
        and status["result"]["state"] == "online"
        and status["result"]["labels"] == sorted(TINY_LABELS)
    )
    # The outage the shipped broker config is sized for, and what the broker queued or dropped.
    mqtt = status["result"]["mqtt"]
    assert mqtt["shipped_broker_queue"]["covered_outage_s"] == 3600 and mqtt["sessions_new"] == 1

    peer.publish("cmd", {"id": "c2", "cmd": "snapshot"})
    snap = peer.expect("cmd/res", lambda m: m["id"] == "c2").json
    assert snap["ok"]
    with sqlite3.connect(snap["result"]["path"]) as copy:
        assert copy.execute("SELECT count(*) FROM commands").fetchone()[0] >= 1

    peer.publish("cmd", {"id": "n0", "cmd": "sync_now"})
    res = peer.expect("cmd/res", lambda m: m["id"] == "n0").json
    assert (
        not res["ok"]
        and res["error"]["code"] == "not_available"
        and "not available" in res["error"]["message"]
    )
    # The learner is there, but has nothing to do yet: it says why.
    for i, (name, why) in enumerate(
        [("train_now", "no new labeled samples"), ("rollback", "no promoted adapter")]
    ):
        peer.publish("cmd", {"id": f"l{i}", "cmd": name})
        res = peer.expect("cmd/res", lambda m, i=i: m["id"] == f"l{i}").json
        assert not res["ok"] and why in res["error"]["message"]

    peer.publish("cmd", {"id": "c3", "cmd": "explode"})
    assert peer.expect("cmd/res", lambda m: m["id"] == "c3").json["error"]["code"] == "unknown_command"

    peer.publish("cmd", {"id": "c4", "cmd": "reload_config"})
    reload = peer.expect("cmd/res", lambda m: m["id"] == "c4").json
    assert reload["ok"] and reload["result"]["restart_required"] == []

    # a redelivered command is answered from the audit, not run again
    peer.publish("cmd", {"id": "c2", "cmd": "snapshot"})
    wait_until(lambda: len([m for m in peer.on("cmd/res") if m.json["id"] == "c2"]) == 2)
    again = [m.json for m in peer.on("cmd/res") if m.json["id"] == "c2"][1]
    assert again == snap
    assert len(list((tmp_path / "data" / "snapshots").glob("*.db"))) == 1


# ---- telemetry and status -----------------------------------------------------------------------


def test_status_and_telemetry(start_agent, peer, broker):
    start_agent()
    late = Peer(broker).subscribe(BASE + "status")
    try:
        status = late.expect("status", lambda m: m["state"] == "online")
    finally:
        late.close()
    assert (
        status.retain and status.json["model"]["precision"] == "fp32" and status.json["config_version"] == 0
    )
    peer.publish("config", {"version": 1, "telemetry": {"interval_s": 1}}, retain=True)
    peer.publish("samples", b"not json")
    peer.expect("samples/res")
    peer.publish("infer/req", {"id": "t", "text": "x"})
    t = peer.expect(
        "telemetry", lambda m: m["config_version"] == 1 and m["inference"]["requests"] >= 1, timeout=15
    ).json
    assert {"cpu_percent", "memory", "disk", "temperatures_c", "process", "gpu"} <= set(t["system"])
    assert t["system"]["process"]["rss_mb"] > 0
    assert {"p50_ms", "p99_ms", "throughput_per_s", "queue_depth"} <= set(t["inference"])
    assert {"writer", "control", "engine", "inference_inflight"} <= set(t["queues"])
    assert t["counters"]["rejected"]["invalid_json"] == 1
    assert t["model"]["name"] and "adapter_version" in t and t["connected"] is True


# ---- bad input ----------------------------------------------------------------------------------

BAD_INPUTS = [
    ("invalid_json", b'{"id": "x", "text": '),
    ("invalid_utf8", b'{"id": "x", "text": "\xc3\x28"}'),
    ("invalid_payload", b'{"id": "x", "text": 12, "label": ["a"], "prediction_id": 5}'),
    ("invalid_json", b'{"id": "x", "text": "a", "label": "normal", "prediction_id": "p", "ts": NaN}'),
]


@pytest.mark.parametrize("kind", [Kind.INFER, Kind.EVENT, Kind.SAMPLE, Kind.FEEDBACK, Kind.COMMAND])
def test_bad_input_on_every_topic(start_agent, peer, agent_config, kind):
    agent = start_agent()
    res_topic = {
        Kind.INFER: "infer/res",
        Kind.EVENT: "events/res",
        Kind.SAMPLE: "samples/res",
        Kind.FEEDBACK: "feedback/res",
        Kind.COMMAND: "cmd/res",
    }[kind]
    cases = [*BAD_INPUTS, ("oversize", b"x" * (MAX_PAYLOAD_BYTES[kind] + 1))]
    if kind is Kind.SAMPLE:
        cases.append(("unknown_label", b'{"id": "x", "text": "a", "label": "nope"}'))
    if kind is Kind.FEEDBACK:
        cases.append(("unknown_label", b'{"id": "x", "prediction_id": "p", "label": "nope"}'))
        cases.append(("unknown_prediction", b'{"id": "x", "prediction_id": "never", "label": "normal"}'))
    for _code, payload in cases:
        peer.publish(str(kind), payload)
    wait_until(lambda: len(peer.on(res_topic)) >= len(cases), what=f"{len(cases)} errors on {res_topic}")
    errors = [m.json for m in peer.on(res_topic)]
    assert [e["error"]["code"] for e in errors] == [c for c, _ in cases]
    assert all(e["error"]["message"] for e in errors)
    rejected = agent.app.counters.snapshot()["rejected"]
    assert sum(rejected.values()) == len(cases)
    # no state change, and the agent still serves
    db = db_path(agent_config)
    assert query(
        db,
        "SELECT (SELECT count(*) FROM samples) + (SELECT count(*) FROM feedback) + (SELECT count(*) FROM predictions)",
    ) == [(0,)]
    peer.publish("infer/req", {"id": "alive", "text": "still there?"})
    peer.expect("infer/res", lambda m: m["id"] == "alive")


def test_bad_input_on_the_config_topic(start_agent, peer):
    agent = start_agent()
    peer.publish("config", {"version": 2, "inference": {"top_k": 1}}, retain=True)
    peer.expect("config/state", lambda m: m["status"] == "accepted")
    cases = [
        ("invalid_json", b'{"version": 3, "inference": '),
        ("invalid_utf8", b'{"version": 3, "site": "\xff"}'),
        ("invalid_payload", b'{"version": 3, "inference": {"top_k": "2"}}'),
        ("invalid_json", b'{"version": 3, "inference": {"max_wait_ms": NaN}}'),
        ("oversize", b'{"version": 3, "pad": "' + b"x" * MAX_PAYLOAD_BYTES[Kind.CONFIG] + b'"}'),
    ]
    for _code, payload in cases:
        peer.publish("config", payload, retain=True)
    wait_until(
        lambda: len([m for m in peer.on("config/state") if m.json["status"] == "rejected"]) == len(cases)
    )
    rejected = [m.json for m in peer.on("config/state") if m.json["status"] == "rejected"]
    assert [r["code"] for r in rejected] == [c for c, _ in cases]
    assert all(r["errors"] and r["active_version"] == 2 for r in rejected)
    assert agent.app.runtime.version == 2 and agent.app.engine.config.top_k == 1
    assert sum(agent.app.counters.snapshot()["rejected"].values()) == len(cases)


def test_only_the_config_is_taken_retained(start_agent, peer, agent_config):
    peer.publish(
        "samples", {"id": "stale", "text": "left retained by mistake", "label": "normal"}, retain=True
    )
    peer.publish("config", {"version": 4}, retain=True)
    agent = start_agent()
    wait_until(lambda: agent.app.runtime.version == 4, what="retained config applied")
    peer.publish("samples", {"id": "live", "text": "a live sample", "label": "normal"})
    wait_until(lambda: agent.app.counters.get("stored", "samples") == 1)
    assert query(db_path(agent_config), "SELECT sample_id FROM samples") == [("live",)]


def test_message_on_an_unknown_subtopic_is_ignored(start_agent, peer):
    agent = start_agent()
    peer.publish(BASE + "samples/extra", {"text": "a", "label": "normal"})
    peer.publish("infer/req", {"id": "after", "text": "x"})
    peer.expect("infer/res", lambda m: m["id"] == "after")
    assert agent.app.counters.snapshot().get("rejected", {}) == {}


# ---- storage failures ---------------------------------------------------------------------------


def agent_on_a_locked_store(start_agent, broker, tiny_bundle, tmp_path, broker_extra: str = ""):
    """An agent whose database another writer holds locked: (agent, db path, the blocker)."""
    config = write_agent_config(
        tmp_path / "locked.toml",
        broker,
        tiny_bundle,
        tmp_path / "data",
        extra="[store]\nbusy_timeout_ms = 50\n",
        broker_extra=broker_extra,
    )
    agent = start_agent(config)
    db = db_path(config)
    blocker = sqlite3.connect(db)
    blocker.execute("BEGIN IMMEDIATE")
    return agent, db, blocker


def test_locked_database_keeps_samples_unacked_then_commits(start_agent, peer, broker, tiny_bundle, tmp_path):
    agent, db, blocker = agent_on_a_locked_store(start_agent, broker, tiny_bundle, tmp_path)
    try:
        for i in range(5):
            peer.publish("samples", {"id": f"L{i}", "text": f"locked {i}", "label": "normal"})
        err = peer.expect("samples/res", lambda m: m["error"]["code"] == "storage_error").json
        assert err["retrying"] is True and err["reason"] == "locked"
        assert agent.app.writer.storage_error is not None
        status = agent.app.reporter.status()
        assert status["storage_error"] and status["counters"]["storage_errors"]["locked"] >= 1
    finally:
        blocker.rollback()
        blocker.close()
    wait_until(
        lambda: query(db, "SELECT count(*) FROM samples")[0][0] == 5, what="samples committed after unlock"
    )
    wait_until(lambda: agent.app.writer.storage_error is None)


def test_samples_held_by_a_failing_store_do_not_block_requests(
    start_agent, peer, broker, tiny_bundle, tmp_path
):
    """Samples wait unacked while the store cannot commit and fill the broker's in-flight window to
    the box (here 10); requests and commands (QoS 0) still get through, a config once it can be
    recorded."""
    agent, db, blocker = agent_on_a_locked_store(
        start_agent, broker, tiny_bundle, tmp_path, broker_extra="receive_maximum = 10\n"
    )
    try:
        for i in range(40):
            peer.publish("samples", {"id": f"H{i}", "text": f"held {i}", "label": "normal"})
        peer.expect("samples/res", lambda m: m["error"]["code"] == "storage_error")
        peer.publish("infer/req", {"id": "through", "text": "breaker tripped"})
        assert peer.expect("infer/res", lambda m: m["id"] == "through", timeout=10).json["predictions"]
        peer.publish("cmd", {"id": "st", "cmd": "status"})
        status = peer.expect("cmd/res", lambda m: m["id"] == "st", timeout=10).json["result"]
        assert status["storage_error"] and status["counters"]["storage_errors"]["locked"] >= 1
        # A config (QoS 1, retained) waits in line with the samples: it could not be recorded now.
        peer.publish("config", {"version": 3, "inference": {"top_k": 1}}, retain=True)
    finally:
        blocker.rollback()
        blocker.close()
    peer.expect("config/state", lambda m: m["version"] == 3 and m["status"] == "accepted", timeout=20)
    wait_until(lambda: query(db, "SELECT count(*) FROM samples")[0][0] == 40, what="all 40 committed later")


# ---- broker restart -----------------------------------------------------------------------------


def test_agent_reconnects_after_broker_restart(start_agent, broker, agent_config):
    agent = start_agent()
    broker.restart(down_for=0.5)
    assert agent.app.transport.wait_connected(15)
    p = Peer(broker).subscribe(BASE + "#")
    try:
        p.publish("infer/req", {"id": "back", "text": "after restart"})
        p.expect("infer/res", lambda m: m["id"] == "back")
    finally:
        p.close()


# ---- TLS, passwords, ACL ------------------------------------------------------------------------

ACL = f"""user box-1
topic readwrite {BASE}#

user operator
topic readwrite edge/#
"""


def test_tls_with_password_and_acl(tmp_path, tiny_bundle, start_agent):
    broker = Mosquitto.secured(
        tmp_path / "tls-broker", {"box-1": "box-secret", "operator": "op-secret"}, ACL
    ).start()
    try:
        (tmp_path / "pw").write_text("box-secret\n")
        tls = f'username = "box-1"\npassword_file = "{tmp_path / "pw"}"\n[broker.tls]\nca_file = "{broker.tls_ca}"\n'
        config = write_agent_config(
            tmp_path / "tls.toml", broker, tiny_bundle, tmp_path / "data", broker_extra=tls
        )
        agent = start_agent(config)
        op = Peer(broker, username="operator", password="op-secret").subscribe(BASE + "infer/res")
        try:
            op.publish("infer/req", {"id": "tls-1", "text": "over TLS"})
            assert op.expect("infer/res", lambda m: m["id"] == "tls-1").json["predictions"]
        finally:
            op.close()
        agent.stop()

        (tmp_path / "pw").write_text("wrong\n")
        refused = start_agent(config, connect=False)
        wait_until(lambda: "refused" in (refused.app.transport.last_error or ""), what="refusal logged")
        assert not refused.app.transport.connected
    finally:
        broker.stop()


def test_a_flood_of_requests_is_answered_rate_limited_and_a_config_that_would_starve_the_box_is_refused(
    start_agent, peer
):
    agent = start_agent()
    peer.publish("config", {"version": 1, "inference": {"max_requests_per_s": 2}}, retain=True)
    peer.expect("config/state", lambda m: m["version"] == 1 and m["status"] == "accepted")
    for i in range(12):
        peer.publish("infer/req", {"id": f"f{i}", "text": f"flood {i}"})
    answers = [peer.expect("infer/res", lambda m, i=i: m["id"] == f"f{i}").json for i in range(12)]
    limited = [a for a in answers if "error" in a]
    assert 5 <= len(limited) <= 10, answers  # a burst of 2, then 2/s while the flood lasts
    assert {a["error"]["code"] for a in limited} == {"rate_limited"}
    assert agent.app.counters.get("rejected", "rate_limited") == len(limited)

    peer.publish("config", {"version": 2, "learning": {"threads": 64}}, retain=True)
    state = peer.expect("config/state", lambda m: m["version"] == 2).json
    assert state["status"] == "rejected" and "learning.threads" in state["errors"][0]
    assert agent.app.runtime.version == 1
