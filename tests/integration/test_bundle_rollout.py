"""A new base model rolled out over MQTT, on a real mosquitto with an aggregator process and boxes on
tiny models: published at headquarters, fetched in chunks, verified, tried, switched under load
(canary first, then the rest), rolled back; and every way a release can go wrong refused while
the old bundle serves on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from agent.fed.signing import generate_keys
from agent.fed.topics import FleetTopics
from tests.integration.conftest import ROOT, InProcessAgent, Peer, query, wait_until, write_agent_config
from tests.integration.fleet import FLEET, fleet_section, write_hq_config
from tests.tiny import keyword_samples

T = FleetTopics(FLEET)
SITE = "plant-t"
LEARNING = {
    "enabled": True,
    "min_new_samples": 100000,  # no local rounds: only the new base's first adapter trains
    "epochs": 6,
    "learning_rate": 5e-3,
    "max_cpu_percent": 100,
    "min_free_memory_mb": 0,
    "max_inference_p99_ms": 100000,
}
SYNC = {"enabled": True, "bundle_policy": "train_first"}


def topic(device: str, suffix: str) -> str:
    return f"edge/{SITE}/{device}/{suffix}"


def publish(hq_conf, bundle, *extra: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "model",
            "publish",
            str(bundle),
            "--config",
            str(hq_conf),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


class Asker:
    """Keeps asking a box while it switches; every answer must be a prediction."""

    def __init__(self, peer: Peer, device: str):
        self.peer, self.device = peer, device
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peer.client.publish(
                topic(self.device, "infer/req"),
                f'{{"id": "a{self.sent}", "text": "fuse blown line {self.sent % 5}"}}',
                qos=1,
            )
            self.sent += 1
            time.sleep(0.05)

    def finish(self) -> tuple[int, list[dict]]:
        self.stop.set()
        self.thread.join(5)
        wait_until(lambda: len(self.answers()) >= self.sent, timeout=30, what=f"{self.sent} answers")
        return self.sent, [a for a in self.answers() if "error" in a]

    def answers(self) -> list[dict]:
        return [
            r.json
            for r in list(self.peer.received)
            if r.topic == topic(self.device, "infer/res") and r.json["id"].startswith("a")
        ]


@pytest.fixture
def fleet(broker, tiny_bundle, tmp_path, spawn_agent):
    private, public = generate_keys(tmp_path / "keys")
    hq_conf = write_hq_config(
        tmp_path / "hq.toml", broker, tiny_bundle, tmp_path / "hq", private, min_uploads=99
    )
    hq = spawn_agent(hq_conf, command=("aggregator", "run")).wait_ready()
    peer = Peer(broker).subscribe(f"edge/{SITE}/#", "fed/#")
    boxes = {}
    for i, device in enumerate(("box-1", "box-2")):
        config = write_agent_config(
            tmp_path / f"{device}.toml",
            broker,
            tiny_bundle,
            tmp_path / device,
            extra=fleet_section(public),
            device=device,
        )
        box = boxes[device] = InProcessAgent(config).wait_connected()
        peer.publish(topic(device, "config"), {"version": 1, "learning": LEARNING, "sync": SYNC}, retain=True)
        peer.expect(topic(device, "config/state"), lambda m: m["version"] == 1 and m["status"] == "accepted")
        for j, (text, label) in enumerate(keyword_samples(300, seed=40 + i)):
            peer.publish(topic(device, "samples"), {"id": f"{device}-{j}", "text": text, "label": label})
        wait_until(
            lambda b=box: query(b.app.boot.db_path, "SELECT count(*) FROM samples")[0][0] == 300,
            what="samples",
        )
    yield {"hq": hq, "hq_conf": hq_conf, "boxes": boxes, "peer": peer, "tmp": tmp_path, "public": public}
    for box in boxes.values():
        if not box.app.stop_event.is_set():
            box.stop()
    peer.close()


def test_a_release_goes_to_the_canary_then_to_all_switches_under_load_and_rolls_back(
    fleet, tiny_bundle, tiny_bundles
):
    peer, boxes = fleet["peer"], fleet["boxes"]
    new = tiny_bundles(1)
    old_base = boxes["box-1"].app.engine.manifest.base_hash
    askers = {d: Asker(peer, d) for d in boxes}
    out = publish(fleet["hq_conf"], new, "--canary", "box-1")
    assert "release 1" in out and "stage canary" in out

    # The canary first: fetched in chunks, verified, tried, a first adapter trained, switched.
    for event in ("bundle_downloading", "bundle_verified", "bundle_trial"):
        peer.expect(topic("box-1", "sync"), lambda m, e=event: m["event"] == e, timeout=120)
    peer.expect(topic("box-1", "sync"), lambda m: m["event"] == "bundle_switched", timeout=240)
    one = boxes["box-1"].app
    assert one.engine.manifest.base_hash != old_base and one.engine.bundle_dir.name != tiny_bundle.name
    adapter = one.engine.adapter_version
    assert adapter is not None and one.learner.version_info(adapter)["origin"] == "bundle"
    # box-2 waited for the canary; now headquarters rolls it out to all and box-2 follows.
    assert not [
        r for r in peer.received if r.topic == topic("box-2", "sync") and r.json["event"] == "bundle_switched"
    ]
    manifest = peer.expect(T.bundle, lambda m: m["rollout"]["stage"] == "all", timeout=30).json
    assert manifest["release"] == 1
    peer.expect(topic("box-2", "sync"), lambda m: m["event"] == "bundle_switched", timeout=240)
    assert boxes["box-2"].app.engine.manifest.base_hash == one.engine.manifest.base_hash
    # The fleet federates on the new base from now on: the open round on the old one is abandoned.
    new_base = one.engine.manifest.base_hash
    assert peer.expect(T.round, lambda m: m["base_hash"] == new_base, timeout=30).json["round"] >= 2
    for device, asker in askers.items():
        sent, failed = asker.finish()
        assert sent > 50 and failed == [], (device, failed[:3])

    # Back to the old base and the adapter it served (none).
    peer.publish(topic("box-1", "cmd"), {"id": "rb", "cmd": "rollback_model"})
    res = peer.expect(topic("box-1", "cmd/res"), lambda m: m["id"] == "rb").json
    assert res["ok"], res
    assert one.engine.manifest.base_hash == old_base and one.engine.adapter_version is None
    peer.publish(topic("box-1", "infer/req"), {"id": "after-rb", "text": "fuse blown"})
    assert "predictions" in peer.expect(topic("box-1", "infer/res"), lambda m: m["id"] == "after-rb").json


def test_forged_tampered_truncated_releases_are_refused_and_a_canary_failure_halts_the_rollout(
    fleet, tiny_bundles
):
    import json

    from agent.fed.bundle_server import register_release
    from agent.fed.hq_store import HqStore
    from agent.fed.signing import load_private_key, sign_manifest
    from agent.fed.wire import canonical_json

    peer, boxes = fleet["peer"], fleet["boxes"]
    serving = {d: (b.app.engine.bundle_dir, b.app.engine.manifest.base_hash) for d, b in boxes.items()}
    hq_dir = fleet["tmp"] / "hq"
    key = load_private_key(fleet["tmp"] / "keys" / "fleet.key")

    def refused(device: str, code: str) -> dict:
        return peer.expect(
            topic(device, "sync"),
            lambda m: m["event"] == "bundle_refused" and m.get("code") == code,
            timeout=180,
        ).json

    # Signed by a key the boxes do not trust: refused before anything is fetched.
    other = load_private_key(generate_keys(fleet["tmp"] / "other")[0])
    store = HqStore(hq_dir / "aggregator.db")
    forged = register_release(store, hq_dir, FLEET, tiny_bundles(2), key, chunk_bytes=65536)
    body = sign_manifest(forged.model_dump(exclude={"key_id", "signature"}), other)
    with store.tx() as conn:  # the leader must not publish the real one: this test does the publishing
        conn.execute("UPDATE releases SET published_at = 0 WHERE release = ?", (forged.release,))
    peer.publish(T.bundle, canonical_json(body), retain=True)
    for device in boxes:
        refused(device, "unknown_key")

    # Tampered at the source (the bytes headquarters sends no longer match what it signed), to
    # the canary: the canary refuses it after fetching it three times, and the rollout halts.
    tampered = register_release(
        store, hq_dir, FLEET, tiny_bundles(3), key, canary=["box-1"], chunk_bytes=65536
    )
    target = next(p for p in (hq_dir / "bundles").glob(f"{tampered.bundle_hash[:16]}/model.fp32.onnx"))
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    refused("box-1", "file_hash")
    halted = peer.expect(
        T.bundle, lambda m: m["release"] == tampered.release and m["rollout"]["stage"] == "halted", timeout=30
    ).json
    assert "box-1" in halted["rollout"]["reason"]

    # Truncated at the source: the chunks come short and the transfer is given up.
    truncated = register_release(store, hq_dir, FLEET, tiny_bundles(4), key, chunk_bytes=65536)
    target = hq_dir / "bundles" / truncated.bundle_hash[:16] / "model.int8.onnx"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    for device in boxes:
        peer.expect(
            topic(device, "sync"),
            lambda m: (
                m["event"] == "bundle_refused"
                and m.get("code") in ("bad_transfer", "file_hash")
                and m.get("release") == truncated.release
            ),
            timeout=180,
        )
    store.close()
    for device, box in boxes.items():  # the old bundle serves on, everywhere
        assert (box.app.engine.bundle_dir, box.app.engine.manifest.base_hash) == serving[device]
        peer.publish(topic(device, "infer/req"), {"id": f"still-{device}", "text": "fuse blown"})
        assert (
            "predictions"
            in peer.expect(topic(device, "infer/res"), lambda m, d=device: m["id"] == f"still-{d}").json
        )
        assert box.app.counters.snapshot()["bundle_refused"]
    assert json.loads(json.dumps(boxes["box-2"].app.bundles.status()))["work"] is None


def test_a_download_killed_9_resumes_where_it_stopped(
    broker, tiny_bundle, tiny_bundles, tmp_path, spawn_agent
):
    private, public = generate_keys(tmp_path / "keys")
    hq_conf = write_hq_config(
        tmp_path / "hq.toml", broker, tiny_bundle, tmp_path / "hq", private, min_uploads=99
    )
    spawn_agent(hq_conf, command=("aggregator", "run")).wait_ready()
    peer = Peer(broker).subscribe(f"edge/{SITE}/#")
    config = write_agent_config(
        tmp_path / "box.toml",
        broker,
        tiny_bundle,
        tmp_path / "box",
        extra=fleet_section(public),
        device="box-9",
    )
    box = spawn_agent(config).wait_ready()
    peer.publish(
        topic("box-9", "config"), {"version": 1, "sync": {**SYNC, "bundle_policy": "switch_now"}}, retain=True
    )
    peer.expect(topic("box-9", "config/state"), lambda m: m["version"] == 1 and m["status"] == "accepted")
    new = tiny_bundles(5)
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "model", "publish", str(new), "--config", str(hq_conf), "--chunk-bytes", "4096"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    db = tmp_path / "box" / "edge-agent.db"
    wait_until(
        lambda: query(db, "SELECT count(*) FROM bundle_chunks")[0][0] > 300,
        timeout=120,
        what="part of the download",
    )
    box.kill()
    have = query(db, "SELECT count(*) FROM bundle_chunks")[0][0]
    again = spawn_agent(config).wait_ready()
    wait_until(lambda: "resumed" in again.log(), timeout=30, what="the resume")
    resumed_with = int(again.log().split("resumed, ")[1].split(" of ")[0])
    assert resumed_with >= have > 300  # nothing it had recorded is fetched again
    peer.expect(topic("box-9", "sync"), lambda m: m["event"] == "bundle_switched", timeout=180)
    peer.publish(topic("box-9", "cmd"), {"id": "st", "cmd": "status"})
    status = peer.expect(topic("box-9", "cmd/res"), lambda m: m["id"] == "st").json["result"]
    assert status["bundle"]["release"] == 1 and status["model"]["base_hash"] != load_base(tiny_bundle)
    peer.close()


def load_base(bundle) -> str:
    from agent.bundle import load_manifest

    return load_manifest(bundle).base_hash
