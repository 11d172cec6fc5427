"""On-box learning with real parts: SQLite store, spawned torch+peft learner, ORT engine, tiny BERT."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest

from agent.engine import EngineConfig, InferenceEngine
from agent.learner import policy
from agent.learner.manager import LearnerManager, LearnerSettings
from agent.store import NewSample, Store
from tests.tiny import keyword_samples


def make_samples(n: int, seed: int, shuffle_labels: bool = False) -> list[NewSample]:
    pairs = keyword_samples(n, seed, shuffle_labels)
    return [NewSample(key=f"s{seed}-{i}", text=t, label=lab) for i, (t, lab) in enumerate(pairs)]


def wait_round(manager: LearnerManager, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    manager.tick()
    while manager.status()["running"] and time.time() < deadline:
        time.sleep(0.2)
        manager.tick()
    assert manager.status()["running"] is None, "round did not finish in time"


@pytest.fixture
def setup(tmp_path, tiny_bundle):
    store = Store(tmp_path / "edge-agent.db").open()
    engine = InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32", cache_size=0))
    settings = LearnerSettings(
        triggers=policy.TriggerPolicy(min_new_samples=150),
        limits=policy.ResourceLimits(max_cpu_percent=100, min_free_memory_mb=0, max_inference_p99_ms=1e9),
        gate=policy.GatePolicy(epsilon=0.01, delta=0.1),
        epochs=8,
        lr=5e-3,
        min_interval_s=0,
        threads=1,
        anchor_lambda=1e-4,
    )
    events = []
    manager = LearnerManager(
        db_path=store.path,
        bundle_dir=tiny_bundle,
        data_dir=tmp_path,
        engine=engine,
        settings=settings,
        publish=lambda e, b: events.append((e, b)),
    )
    yield store, engine, manager, events
    manager.stop()
    engine.close()
    store.close()


def holdout_accuracy(store, engine) -> float:
    rows = store.db.conn.execute("SELECT text, label FROM samples WHERE split='holdout'").fetchall()
    preds = engine.predict([t for t, _ in rows])
    return sum(p.label == lab for p, (_, lab) in zip(preds, rows, strict=True)) / len(rows)


def test_learns_promotes_refuses_bad_candidate_and_rolls_back(setup):
    store, engine, manager, events = setup
    store.write(make_samples(400, seed=1), holdout_fraction=0.2)
    base_acc = holdout_accuracy(store, engine)
    before = engine.predict(["breaker tripped on machine M3 line 2"])[0]

    wait_round(manager)  # 400 new samples >= 150: the data trigger starts a round
    first = manager.active_version()
    assert first is not None, events
    assert engine.adapter_version == first
    learned_acc = holdout_accuracy(store, engine)
    assert learned_acc > base_acc + 0.2 and learned_acc > 0.7
    after = engine.predict(["breaker tripped on machine M3 line 2"])[0]
    assert after.adapter_version == first and after.label == "electrical" and before.adapter_version is None
    assert [e for e, _ in events] == ["round_started", "round_finished"]
    # The fast learner was fit beside the adapter and lives in its directory; the gate's choice of
    # what serves is recorded in the registry, the event, the status and the answers.
    unit = manager.adapters_dir / first
    assert (unit / "linear_model.safetensors").exists() and (unit / "serving.json").exists()
    serving = json.loads(manager.version_info(first)["metrics"])["serving"]
    assert set(serving["all"]) == {"transformer", "linear", "combined"}
    assert serving["model"] == engine.serving_model == manager.status()["serving_model"]
    assert events[-1][1]["serving_model"] == serving["model"] == after.model
    assert serving["linear"]["samples"] > 0 and 0.0 <= serving["linear"]["weight"] <= 1.0

    # A candidate trained on shuffled labels must be refused; the active adapter stays. Replay
    # and the lambda pull are off so that the bad data really damages the candidate.
    manager.settings.replay_fraction, manager.settings.anchor_lambda, manager.settings.lr = 0.0, 0.0, 2e-2
    store.write(make_samples(400, seed=2, shuffle_labels=True), holdout_fraction=0.2)
    assert manager.train_now()["ok"]
    wait_round(manager)
    assert manager.active_version() == first and engine.adapter_version == first
    rejected = [v for v in manager.versions() if v["status"] == "rejected"]
    assert len(rejected) == 1 and "older" in rejected[0]["reason"]
    assert events[-1][1]["status"] == "rejected"
    # The refused round's samples are not dropped: the trigger counts from after them, but the
    # next round trains on (and the gate's "recent" slice is) everything after the active's data.
    promoted = next(v for v in manager.versions() if v["version"] == first)
    assert rejected[0]["data_from_id"] == promoted["data_to_id"] < rejected[0]["data_to_id"]
    assert manager._active_data_through_id() == promoted["data_to_id"]
    assert manager._since_id() == rejected[0]["data_to_id"]

    # Rollback to the base, then forward again to the kept version.
    assert manager.rollback()["to"] == "base"
    assert engine.adapter_version is None and manager.active_version() is None
    assert engine.serving_model == "transformer"
    assert manager.rollback(first)["ok"]
    assert engine.adapter_version == first and manager.active_version() == first
    assert engine.serving_model == serving["model"]  # the linear model came back with the adapter
    assert manager.rollback("no-such-version")["ok"] is False


def test_learner_killed_mid_round_leaves_adapter_and_db_intact(setup, tmp_path):
    store, engine, manager, events = setup
    store.write(make_samples(300, seed=3), holdout_fraction=0.2)
    wait_round(manager)
    active = manager.active_version()
    assert active is not None
    store.write(make_samples(300, seed=4), holdout_fraction=0.2)
    assert manager.train_now()["ok"]
    time.sleep(3.0)  # inside torch import or training
    os.kill(manager._proc.pid, signal.SIGKILL)
    wait_round(manager, timeout=30)
    assert manager.counters["failed"] == 1
    assert manager.active_version() == active and engine.adapter_version == active
    assert engine.predict(["fuse blown on machine M1 line 1"])[0].adapter_version == active
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 600
    # The next round still sees the 300 samples the killed one never finished with.
    assert manager.train_now()["ok"]
    wait_round(manager)
    assert manager.counters["promoted"] + manager.counters["rejected"] == 2


def test_restart_restores_the_promoted_adapter(setup, tiny_bundle, tmp_path):
    store, engine, manager, _ = setup
    store.write(make_samples(300, seed=5), holdout_fraction=0.2)
    wait_round(manager)
    active = manager.active_version()
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32")) as fresh:
        again = LearnerManager(db_path=store.path, bundle_dir=tiny_bundle, data_dir=tmp_path, engine=fresh)
        assert again.restore_active() == active and fresh.adapter_version == active


def test_restart_with_a_corrupt_active_adapter_serves_the_newest_intact_one(setup, tiny_bundle, tmp_path):
    import shutil

    store, engine, manager, _ = setup
    store.write(make_samples(300, seed=6), holdout_fraction=0.2)
    wait_round(manager)
    first = manager.active_version()
    assert first is not None
    # A second promotion on top of it (its files a copy of the first's), then a torn write of its
    # weights: what a power cut in the middle of copying files can leave behind.
    second = first + "-next"
    shutil.copytree(manager.adapters_dir / first, manager.adapters_dir / second)
    con = sqlite3.connect(store.path)
    with con:
        (created,) = con.execute(
            "SELECT created_at FROM adapter_versions WHERE version = ?", (first,)
        ).fetchone()
        con.execute("UPDATE adapter_versions SET status = 'retired' WHERE version = ?", (first,))
        con.execute(
            "INSERT INTO adapter_versions (version, parent, path, status, created_at, promoted_at) VALUES (?,?,?,?,?,?)",
            (second, first, str(manager.adapters_dir / second), "promoted", created + 1, time.time()),
        )
        con.execute("UPDATE learner_state SET value = ? WHERE key = 'active'", (second,))
    weights = manager.adapters_dir / second / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with InferenceEngine.open(tiny_bundle, EngineConfig(precision="fp32")) as fresh:
        events = []
        again = LearnerManager(
            db_path=store.path,
            bundle_dir=tiny_bundle,
            data_dir=tmp_path,
            engine=fresh,
            publish=lambda e, b: events.append((e, b)),
        )
        assert again.restore_active() == first and fresh.adapter_version == first
        assert again.active_version() == first
        status = {v["version"]: v["status"] for v in again.versions()}
        assert status == {first: "promoted", second: "rolled_back"}
        assert events[-1][0] == "rollback" and events[-1][1]["from"] == second


def test_fast_learner_refresh_between_rounds(setup):
    """50 new samples after a round: the fast learner alone is refit (seconds, no training), gated,
    and served as a new version on the same LoRA weights; the LoRA trigger still counts them."""
    store, engine, manager, events = setup
    manager.settings.linear_refresh_samples, manager.settings.linear_refresh_interval_s = 50, 0.0
    store.write(make_samples(300, seed=7), holdout_fraction=0.2)
    wait_round(manager)
    first = manager.active_version()
    assert first is not None and manager.counters["refreshes"] == 0
    since = manager._since_id()
    wait_round(manager)  # nothing new: no refresh, no round
    assert manager.counters["refreshes"] == 0 and manager.active_version() == first

    store.write(make_samples(80, seed=8), holdout_fraction=0.2)  # ~64 train rows: >= 50, < 150
    wait_round(manager)
    assert [e for e, _ in events[-2:]] == ["refresh_started", "refresh_finished"], events
    assert events[-1][1]["status"] == "promoted", events[-1]
    refreshed = manager.active_version()
    assert refreshed != first and engine.adapter_version == refreshed
    assert manager.counters["rounds"] == 1 and manager.counters["refreshes_promoted"] == 1
    info = manager.version_info(refreshed)
    assert info["parent"] == first and info["origin"] == "local"
    assert json.loads(info["metrics"])["serving"]["linear"]["torch_imported"] is False
    assert manager.lora_version(refreshed) == first  # federation uploads the round's LoRA once
    old, new = manager.adapters_dir / first, manager.adapters_dir / refreshed
    assert (old / "adapter_model.safetensors").read_bytes() == (
        new / "adapter_model.safetensors"
    ).read_bytes()
    n_old = json.loads((old / "linear_config.json").read_text())["num_examples"]
    assert json.loads((new / "linear_config.json").read_text())["num_examples"] > n_old
    # The refresh does not consume the LoRA trigger or move the data lineage.
    assert manager._since_id() == since
    assert info["data_to_id"] == manager.version_info(first)["data_to_id"]
    answer = engine.predict(["breaker tripped on machine M3 line 2"])[0]
    assert answer.adapter_version == refreshed and answer.model == engine.serving_model

    # Below the refresh threshold nothing starts; a rollback returns to the round's unit.
    wait_round(manager)
    assert manager.counters["refreshes"] == 1
    assert manager.rollback()["to"] == first and engine.adapter_version == first

    # A rollback while a refresh runs: the refresh was judged against what no longer serves and
    # is refused, whatever its holdout figures.
    store.write(make_samples(80, seed=9), holdout_fraction=0.2)
    manager.tick()
    assert manager.status()["running"] is not None and events[-1][0] == "refresh_started"
    assert manager.rollback("base")["ok"] and engine.adapter_version is None
    wait_round(manager)
    assert events[-1][0] == "refresh_finished" and events[-1][1]["status"] == "rejected"
    assert "active adapter changed" in events[-1][1]["reasons"][0]
    assert manager.active_version() is None and engine.adapter_version is None
