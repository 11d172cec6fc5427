"""A fleet end to end on a real mosquitto: an aggregator process and three daemons on the tiny model.

Each box learns its own samples (FFA-LoRA: A frozen from the fleet seed the round announces) and
uploads through its outbox; the round closes on quorum; every box verifies the signed global and
runs it through its own gate. Box 3 is cut off the network (a TCP relay) while it learns: its
upload waits in SQLite and arrives, once, after the aggregator was killed -9 and restarted. Forged
globals (unsigned, foreign key, altered, tampered bytes) are refused by every box, whose active
adapter stays.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from agent.fed.signing import generate_keys, load_private_key, sign_manifest
from agent.fed.topics import FleetTopics
from agent.fed.wire import canonical_json, split_blob
from tests.integration.conftest import InProcessAgent, Peer, query, wait_until, write_agent_config
from tests.integration.fleet import FLEET, fleet_section, write_hq_config
from tests.integration.netproxy import NetProxy
from tests.tiny import keyword_samples

T = FleetTopics(FLEET)
SITE = "plant-t"
LEARNING = {
    "enabled": True,
    "min_new_samples": 150,
    "min_interval_s": 0,
    "epochs": 6,
    "learning_rate": 5e-3,
    "max_cpu_percent": 100,
    "min_free_memory_mb": 0,
    "max_inference_p99_ms": 100000,
}
SYNC = {"enabled": True, "min_examples": 50, "upload_interval_s": 0, "resend_after_s": 2}


def box_topic(device: str, suffix: str) -> str:
    return f"edge/{SITE}/{device}/{suffix}"


@pytest.fixture
def fleet(broker, tiny_bundle, tmp_path, spawn_agent):
    private, public = generate_keys(tmp_path / "keys")
    hq_conf = write_hq_config(
        tmp_path / "hq.toml", broker, tiny_bundle, tmp_path / "hq", private, min_uploads=2
    )
    hq = spawn_agent(hq_conf, command=("aggregator", "run")).wait_ready()
    proxy = NetProxy(broker.host, broker.port)
    boxes: dict[str, InProcessAgent] = {}
    for device in ("box-1", "box-2", "box-3"):
        config = write_agent_config(
            tmp_path / f"{device}.toml",
            broker,
            tiny_bundle,
            tmp_path / device,
            extra=fleet_section(public),
            device=device,
            port=proxy.port if device == "box-3" else None,
        )
        boxes[device] = InProcessAgent(config).wait_connected()
    peer = Peer(broker).subscribe(
        "fed/#", f"edge/{SITE}/+/sync", f"edge/{SITE}/+/learner", f"edge/{SITE}/+/config/state"
    )
    yield {
        "hq": hq,
        "hq_conf": hq_conf,
        "boxes": boxes,
        "proxy": proxy,
        "peer": peer,
        "private": private,
        "tmp": tmp_path,
    }
    for box in boxes.values():
        if not box.app.stop_event.is_set():
            box.stop()
    peer.close()
    proxy.close()


def test_a_fleet_round_with_an_offline_box_a_killed_aggregator_and_forged_globals(
    fleet, spawn_agent, tiny_bundle
):
    peer, boxes, proxy = fleet["peer"], fleet["boxes"], fleet["proxy"]
    peer.expect(T.round, lambda m: m["round"] == 1 and m["lora_seed"] == 7)
    for device in boxes:
        peer.publish(
            box_topic(device, "config"), {"version": 1, "learning": LEARNING, "sync": SYNC}, retain=True
        )
        peer.expect(
            box_topic(device, "config/state"), lambda m: m["status"] == "accepted" and m["version"] == 1
        )
    for seed, device in enumerate(boxes, start=20):
        for i, (text, label) in enumerate(keyword_samples(250, seed=seed)):
            peer.publish(box_topic(device, "samples"), {"id": f"{device}-{i}", "text": text, "label": label})
    db3 = boxes["box-3"].app.boot.db_path
    wait_until(
        lambda: query(db3, "SELECT count(*) FROM samples")[0][0] == 250, timeout=30, what="box-3's samples"
    )
    proxy.cut()  # box-3 learns offline from here on

    # Round 1 closes on boxes 1 and 2; both verify the global and judge it with their own gate.
    manifest = json.loads(peer.expect(T.global_manifest, timeout=240).payload)
    assert manifest["round"] == 1 and manifest["participants"] == 2 and manifest["strategy"] == "ffa_lora"
    for device in ("box-1", "box-2"):
        peer.expect(
            box_topic(device, "sync"), lambda m: m["event"] == "upload_acknowledged" and m["round"] == 1
        )
        peer.expect(
            box_topic(device, "sync"),
            lambda m: m["event"] == "global_verified" and m["version"] == manifest["version"],
        )
        gated = peer.expect(
            box_topic(device, "learner"),
            lambda m: m["event"] == "round_finished" and m.get("origin") == "fleet",
            timeout=120,
        ).json
        assert gated["version"] == manifest["version"] and gated["status"] in ("promoted", "rejected")
        if gated["status"] == "promoted":
            wait_until(lambda d=device: boxes[d].app.engine.adapter_version == manifest["version"])

    # box-3 trained meanwhile; its upload waits in its outbox.
    wait_until(
        lambda: boxes["box-3"].app.sync.status()["outbox"]["queued"] == 1, timeout=180, what="box-3 queued"
    )
    assert (
        boxes["box-3"].app.learner.version_info(boxes["box-3"].app.learner.active_version())["origin"]
        == "local"
    )

    # The aggregator dies mid-round 2 and comes back: the round goes on from SQLite.
    peer.expect(T.round, lambda m: m["round"] == 2)
    fleet["hq"].kill()
    hq = spawn_agent(fleet["hq_conf"], command=("aggregator", "run")).wait_ready()

    proxy.restore()
    res = peer.expect(
        box_topic("box-3", "sync"), lambda m: m["event"] == "upload_acknowledged", timeout=60
    ).json
    assert res["round"] == 2 and res["late"] is True
    peer.expect(
        box_topic("box-3", "sync"),
        lambda m: m["event"] == "global_verified" and m["version"] == manifest["version"],
    )
    peer.expect(
        box_topic("box-3", "learner"),
        lambda m: m["event"] == "round_finished" and m.get("origin") == "fleet",
        timeout=120,
    )
    assert boxes["box-3"].app.sync.status()["outbox"]["queued"] == 0
    with sqlite3.connect(fleet["tmp"] / "hq" / "aggregator.db") as c:
        rows = c.execute("SELECT round_id, late FROM uploads WHERE device = 'box-3'").fetchall()
        opened = c.execute("SELECT id, status FROM rounds ORDER BY id").fetchall()
    assert rows == [(2, 1)]  # exactly once, in the round after the one it missed
    assert opened == [(1, "closed"), (2, "open")]  # the restarted aggregator resumed round 2

    # Forged globals: every box refuses them and keeps its adapter.
    active = {d: b.app.engine.adapter_version for d, b in boxes.items()}
    real_key = load_private_key(fleet["private"])
    other_key = load_private_key(generate_keys(fleet["tmp"] / "other")[0])
    forged = {k: v for k, v in manifest.items() if k not in ("key_id", "signature")}
    forged.update(version="fleet-f1-r99", round=99)
    blob = b"\x00" * 100
    forged.update(
        sha256=__import__("hashlib").sha256(blob).hexdigest(), size=len(blob), chunks=1, blob="fleet-f1-r99"
    )
    cases = {
        "unsigned": forged,
        "unknown_key": sign_manifest(forged, other_key),
        "bad_signature": {**sign_manifest(forged, real_key), "round": 98},
    }
    for code, body in cases.items():
        peer.publish(T.global_manifest, canonical_json(body), retain=True)
        for device in boxes:
            peer.expect(
                box_topic(device, "sync"), lambda m, c=code: m["event"] == "global_refused" and m["code"] == c
            )
    # Signed by the real key, but the bytes on the chunk topic are not the signed ones.
    signed = sign_manifest(forged, real_key)
    (frame,) = split_blob("fleet-f1-r99", b"\x01" * 100, {"version": "fleet-f1-r99", "round": 99}, 4096)
    peer.publish(T.global_chunk(0), frame, retain=True)
    peer.publish(T.global_manifest, canonical_json(signed), retain=True)
    for device in boxes:
        peer.expect(
            box_topic(device, "sync"),
            lambda m: m["event"] == "global_refused" and m["code"] == "hash_mismatch",
        )
    for device, box in boxes.items():
        assert box.app.engine.adapter_version == active[device]
        assert box.app.sync.status()["global_version"] == manifest["version"]
        assert box.app.counters.snapshot()["sync_refused"]["global:unsigned"] >= 1
    hq.terminate()
    assert hq.wait() == 0
