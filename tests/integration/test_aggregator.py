"""The aggregator as a process on a real mosquitto, fed by uploads as boxes send them: refusals with
reasons, a re-sent upload counted once, kill -9 mid-round resumed from SQLite, an exact FFA-LoRA
global signed and published, and two workers sharing the uploads through a shared subscription."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from agent.fed.signing import generate_keys, load_public_keys, verify_manifest
from agent.fed.topics import FleetTopics
from agent.fed.wire import Reassembler, parse_chunk, tensors_from_bytes
from tests.integration.conftest import Peer, wait_until
from tests.integration.fleet import FLEET, box_tensors, upload_frames, write_hq_config

T = FleetTopics(FLEET)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "keys")


@pytest.fixture
def hq(broker, tiny_bundle, tmp_path, keys, spawn_agent):
    def start(worker: str = "hq-1", **rounds):
        config = write_hq_config(
            tmp_path / f"hq-{worker}.toml", broker, tiny_bundle, tmp_path / "hq", keys[0], worker, **rounds
        )
        return spawn_agent(config, command=("aggregator", "run")).wait_ready()

    return start


def publish(peer: Peer, device: str, frames: list[bytes]) -> None:
    for f in frames:
        peer.publish(T.upload(device), f)


def answers(peer: Peer, device: str) -> list[dict]:
    return [r.json for r in peer.received if r.topic == T.result(device)]


def answer(peer: Peer, device: str, upload_id: str, status: str | None = None, timeout: float = 20) -> dict:
    return peer.expect(
        T.result(device),
        lambda m: m["upload_id"] == upload_id and (status is None or m["status"] == status),
        timeout,
    ).json


def read_global(peer: Peer, public_key: Path, timeout: float = 30) -> tuple[dict, dict[str, np.ndarray]]:
    manifest = json.loads(peer.expect(T.global_manifest, timeout=timeout).payload)
    verify_manifest(manifest, load_public_keys([public_key]))
    r = Reassembler()
    whole = None
    for m in [x for x in peer.received if x.topic.startswith(T.global_manifest + "/chunk/")]:
        whole = r.add(parse_chunk(m.payload)) or whole
    assert whole is not None and whole[0]["version"] == manifest["version"]
    return manifest, tensors_from_bytes(whole[1])


def uploads_in_db(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "hq" / "aggregator.db") as c:
        return c.execute(
            "SELECT upload_id, device, round_id, status, late FROM uploads ORDER BY id"
        ).fetchall()


def test_bad_uploads_are_refused_with_reasons(hq, broker, tiny_bundle):
    hq(max_update_norm=50.0)
    peer = Peer(broker).subscribe(T.base + "#")
    peer.expect(T.round, lambda m: m["round"] == 1)
    good = box_tensors(tiny_bundle, 1)
    cases = {
        "wrong_base": upload_frames(tiny_bundle, "b1", good, upload_id="u-base", base_hash="0" * 64),
        "wrong_strategy": upload_frames(tiny_bundle, "b1", good, upload_id="u-strat", strategy="product_svd"),
        "wrong_keys": upload_frames(tiny_bundle, "b1", dict(list(good.items())[1:]), upload_id="u-keys"),
        "wrong_shape": upload_frames(
            tiny_bundle,
            "b1",
            {k: np.zeros((3, 3), np.float32) if "classifier.weight" in k else v for k, v in good.items()},
            upload_id="u-shape",
        ),
        "non_finite": upload_frames(
            tiny_bundle,
            "b1",
            {k: np.full_like(v, np.nan) if "lora_B" in k else v for k, v in good.items()},
            upload_id="u-nan",
        ),
        "outlier_norm": upload_frames(
            tiny_bundle, "b1", box_tensors(tiny_bundle, 1, scale=100.0), upload_id="u-big"
        ),
        "spoofed": upload_frames(tiny_bundle, "b2", good, upload_id="u-spoof"),  # says b2, sent on b1's topic
    }
    for frames in cases.values():
        publish(peer, "b1", frames)
    for code, frames in cases.items():
        upload_id = parse_chunk(frames[0]).blob
        res = answer(peer, "b1", upload_id, "refused")
        assert res["code"] == code, res
        assert res["reason"]
    publish(peer, "b1", [b"\x00garbage"])
    assert answer(peer, "b1", "unknown", "refused")["code"] == "bad_frame"
    # None of them counts: the round still waits.
    assert json.loads(peer.expect(T.round).payload)["round"] == 1
    res = None
    publish(peer, "b1", upload_frames(tiny_bundle, "b1", good, upload_id="u-ok"))
    res = answer(peer, "b1", "u-ok")
    assert res["status"] == "accepted" and res["round"] == 1


def test_kill_9_mid_round_resumes_counts_resends_once_and_aggregates_exactly(
    hq, broker, tiny_bundle, tmp_path, keys
):
    proc = hq(min_uploads=3)
    peer = Peer(broker).subscribe(T.base + "#")
    peer.expect(T.round, lambda m: m["round"] == 1)
    tensors = {d: box_tensors(tiny_bundle, seed) for seed, d in enumerate(["b1", "b2", "b3"], start=1)}
    weights = {"b1": 100, "b2": 300, "b3": 50}
    for d in ("b1", "b2"):
        publish(
            peer, d, upload_frames(tiny_bundle, d, tensors[d], upload_id=f"u-{d}", num_examples=weights[d])
        )
        assert answer(peer, d, f"u-{d}")["status"] == "accepted"
    proc.kill()  # mid-round: two of three uploads in
    proc = hq(min_uploads=3)
    # b1 re-sends (it never saw an answer, say), late b3 arrives: the round ends with three.
    publish(peer, "b1", upload_frames(tiny_bundle, "b1", tensors["b1"], upload_id="u-b1", num_examples=100))
    assert answer(peer, "b1", "u-b1", "duplicate")["round"] == 1
    publish(peer, "b3", upload_frames(tiny_bundle, "b3", tensors["b3"], upload_id="u-b3", num_examples=50))
    assert answer(peer, "b3", "u-b3")["status"] == "accepted"
    manifest, glob = read_global(peer, keys[1])
    assert manifest["round"] == 1 and manifest["participants"] == 3 and manifest["num_examples"] == 450
    assert [u[0] for u in uploads_in_db(tmp_path)] == ["u-b1", "u-b2", "u-b3"]
    # FFA-LoRA: B and the head are the example-weighted mean, A is the fleet's frozen A.
    total = sum(weights.values())
    for key, value in glob.items():
        if ".lora_A." in key:
            continue
        expected = sum(weights[d] * tensors[d][key].astype(np.float64) for d in tensors) / total
        assert np.abs(value - expected).max() < 1e-6, key
    peer.expect(T.round, lambda m: m["round"] == 2)
    # An upload for round 1 now is late: it counts in round 2, once.
    publish(peer, "b2", upload_frames(tiny_bundle, "b2", tensors["b2"], upload_id="u-b2-again", round_id=1))
    res = answer(peer, "b2", "u-b2-again")
    assert res["status"] == "accepted" and res["round"] == 2 and res["late"] is True
    proc.terminate()
    assert proc.wait() == 0


def test_two_workers_share_the_uploads(hq, broker, tiny_bundle, tmp_path, keys):
    a, b = hq("hq-a", min_uploads=6), hq("hq-b", min_uploads=6)
    peer = Peer(broker).subscribe(T.base + "#")
    peer.expect(T.round, lambda m: m["round"] == 1)
    devices = [f"b{i}" for i in range(6)]
    for i, d in enumerate(devices):
        publish(
            peer,
            d,
            upload_frames(tiny_bundle, d, box_tensors(tiny_bundle, i), upload_id=f"u-{d}", chunk_bytes=1024),
        )
    for d in devices:
        assert answer(peer, d, f"u-{d}")["status"] == "accepted"
    manifest, _ = read_global(peer, keys[1])
    assert manifest["participants"] == 6
    rows = uploads_in_db(tmp_path)
    assert sorted(r[0] for r in rows) == sorted(f"u-{d}" for d in devices)  # each once

    # Both workers took chunks (mosquitto spreads a shared subscription's messages round-robin).
    def chunks_taken(worker: str) -> int:
        msgs = [r.json for r in peer.received if r.topic == T.worker_status(worker)]
        return msgs[-1]["counters"].get("chunks", {}).get("received", 0) if msgs else 0

    wait_until(lambda: chunks_taken("hq-a") + chunks_taken("hq-b") >= 6 * 3, timeout=10, what="worker status")
    assert chunks_taken("hq-a") > 0 and chunks_taken("hq-b") > 0
    for p in (a, b):
        p.terminate()
        assert p.wait() == 0


def test_an_outlier_is_left_out_of_a_robust_round_and_told_why(hq, broker, tiny_bundle, keys):
    hq(strategy="ffa_lora_trimmed_mean", min_uploads=4)
    peer = Peer(broker).subscribe(T.base + "#")
    peer.expect(T.round, lambda m: m["round"] == 1 and m["strategy"] == "ffa_lora_trimmed_mean")
    for i in range(4):
        d = f"b{i}"
        t = box_tensors(tiny_bundle, i, scale=100.0 if i == 3 else 1.0, strategy="ffa_lora_trimmed_mean")
        publish(
            peer, d, upload_frames(tiny_bundle, d, t, upload_id=f"u-{d}", strategy="ffa_lora_trimmed_mean")
        )
        assert answer(peer, d, f"u-{d}")["status"] == "accepted"  # no absolute bound configured
    manifest, glob = read_global(peer, keys[1])
    assert manifest["participants"] == 3
    res = answer(peer, "b3", "u-b3", "refused")
    assert res["code"] == "outlier_norm" and "median" in res["reason"]
    assert all(np.isfinite(v).all() and np.abs(v).max() < 1.0 for v in glob.values())
