from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.store import (
    ENTITY_SAMPLE_LABEL,
    HOLDOUT,
    TRAIN,
    NewFeedback,
    NewPrediction,
    NewSample,
    Outcome,
    RetentionLimits,
    StorageError,
    Store,
    holdout_target,
    retention_plan,
)

LIMITS = RetentionLimits(
    max_samples=1_000_000,
    max_sample_bytes=1 << 30,
    holdout_fraction=0.1,
    max_predictions=1_000_000,
    prediction_retention_days=30,
    max_feedback=1_000_000,
)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "data" / "edge-agent.db", busy_timeout_ms=100).open()
    yield s
    s.close()


def sample(i: int, label: str = "a", text: str | None = None) -> NewSample:
    return NewSample(key=f"id:s{i}", sample_id=f"s{i}", text=text or f"text {i}", label=label)


def prediction(pid: str, text: str = "t") -> NewPrediction:
    return NewPrediction(
        id=pid, text=text, text_sha256="h", label="a", score=0.9, top_k=[("a", 0.9), ("b", 0.1)]
    )


def rows(store: Store, sql: str, params=()):
    return store.db.conn.execute(sql, params).fetchall()


# ---- schema -------------------------------------------------------------------------------------


def test_open_migrates_once_and_uses_wal(tmp_path):
    path = tmp_path / "x.db"
    s = Store(path).open()
    tables = set(s.db.table_names())
    assert {"samples", "feedback", "predictions", "config_versions", "commands", "outbox"} <= tables
    assert rows(s, "PRAGMA journal_mode")[0][0] == "wal"
    s.close()
    s2 = Store(path).open()  # second open: nothing pending, nothing re-created
    assert [r[0] for r in rows(s2, "SELECT name FROM _sqlite_migrations")] == [
        "m001_initial",
        "m002_outbox_for_uploads",
        "m003_prediction_latency",
        "m004_bundle_chunks",
        "m005_entities",
    ]
    s2.close()


def test_open_fails_cleanly_on_an_unusable_path(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StorageError):
        Store(tmp_path / "f" / "x.db").open()
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError) as e:
        Store(bad).open()
    assert e.value.reason == "corrupt"


def test_one_connection_per_thread(store):
    seen = []
    t = threading.Thread(target=lambda: seen.append(store.db))
    t.start()
    t.join()
    assert seen[0] is not store.db
    assert seen[0].conn is not store.db.conn


# ---- writes -------------------------------------------------------------------------------------


def test_samples_are_stored_once(store):
    assert store.write([sample(1), sample(2)], 0.1) == [Outcome.STORED, Outcome.STORED]
    assert store.write([sample(1), sample(3), sample(3)], 0.1) == [
        Outcome.DUPLICATE,
        Outcome.STORED,
        Outcome.DUPLICATE,
    ]
    assert rows(store, "SELECT count(*) FROM samples")[0][0] == 3
    assert store.totals()["samples"] == 3


def test_feedback_needs_a_known_prediction(store):
    fb = NewFeedback(key="prediction:p1:b", prediction_id="p1", label="b")
    assert store.write([fb], 0.1) == [Outcome.UNKNOWN_PREDICTION]
    # the prediction earlier in the same transaction counts
    assert store.write([prediction("p1"), fb, fb], 0.1) == [Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE]
    assert rows(store, "SELECT prediction_id, label FROM feedback") == [("p1", "b")]
    assert store.write([prediction("p1")], 0.1) == [Outcome.DUPLICATE]


def test_prediction_without_text(store):
    p = NewPrediction(id="p", text=None, text_sha256="abc", label="a", score=0.5, top_k=[("a", 0.5)])
    store.write([p], 0.1)
    assert rows(store, "SELECT text, text_sha256, top_k FROM predictions") == [(None, "abc", '[["a", 0.5]]')]


def test_m005_adds_nullable_entities_to_a_database_that_has_rows(tmp_path):
    from sqlite_utils import Database

    from agent.store import migrations

    path = tmp_path / "old.db"
    old = Store(path)
    migrations.apply(old.db, stop_before="m005_entities")  # a box from before entities
    old.db.conn.execute(
        "INSERT INTO samples (key, text, label, split, bytes, received_at) VALUES ('k', 't', 'a', 'train', 2, 0)"
    )
    old.db.conn.commit()
    assert "entities" not in Database(old.db.conn)["samples"].columns_dict
    old.close()
    s = Store(path).open()
    try:
        for table in ("samples", "predictions"):
            info = {r[1]: (r[2], r[3]) for r in rows(s, f"PRAGMA table_info({table})")}
            assert info["entities"] == ("TEXT", 0)  # nullable
        assert rows(s, "SELECT label, entities FROM samples") == [("a", None)]
        assert s.totals()["samples"] == 1
    finally:
        s.close()


def test_span_samples_and_entity_predictions_are_stored_with_their_json(store):
    spans = '[[0,8,"ACTION"],[9,16,"PART"]]'
    span_rows = [
        NewSample(
            key=f"id:n{i}",
            sample_id=f"n{i}",
            text="replaced bearing",
            label=ENTITY_SAMPLE_LABEL,
            entities=spans,
        )
        for i in range(20)
    ]
    assert store.write([*span_rows, sample(99, "a"), span_rows[0]], 0.1) == [Outcome.STORED] * 21 + [
        Outcome.DUPLICATE
    ]
    got = rows(store, "SELECT label, entities, bytes FROM samples WHERE entities IS NOT NULL")
    assert len(got) == 20 and {g[:2] for g in got} == {(ENTITY_SAMPLE_LABEL, spans)}
    # the entities JSON counts against the byte quota
    assert {g[2] for g in got} == {len("replaced bearing") + len(ENTITY_SAMPLE_LABEL) + len(spans)}
    assert store.totals()["sample_bytes"] == sum(g[2] for g in got) + len("text 99") + 1
    # span samples are one stratum: 10 % of their 20 in the holdout (the learner's query)
    assert rows(
        store, "SELECT count(*) FROM samples WHERE entities IS NOT NULL AND split = ?", (HOLDOUT,)
    ) == [(2,)]
    assert rows(store, "SELECT label, entities FROM samples WHERE sample_id = 's99'") == [("a", None)]

    found = '[[20,30,"ASSET",0.5]]'
    p = NewPrediction(
        id="ev", text="t", text_sha256="h", label=ENTITY_SAMPLE_LABEL, score=0.5, top_k=[], entities=found
    )
    assert store.write([p, prediction("plain")], 0.1) == [Outcome.STORED, Outcome.STORED]
    assert rows(store, "SELECT id, label, score, top_k, entities FROM predictions ORDER BY id") == [
        ("ev", ENTITY_SAMPLE_LABEL, 0.5, "[]", found),
        ("plain", "a", 0.9, '[["a", 0.9], ["b", 0.1]]', None),
    ]


def test_failed_write_is_all_or_nothing(store, tmp_path):
    store.write([sample(1)], 0.1)
    other = sqlite3.connect(store.path)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with pytest.raises(StorageError) as e:
            store.write([sample(2), sample(3)], 0.1)
        assert e.value.reason == "locked"
    finally:
        other.rollback()
        other.close()
    assert store.totals()["samples"] == 1  # counters untouched by the failed write
    assert store.write([sample(2), sample(3)], 0.1) == [Outcome.STORED, Outcome.STORED]
    assert rows(store, "SELECT count(*) FROM samples")[0][0] == 3


def test_disk_full_is_reported_and_rolled_back(store):
    store.write([sample(0)], 0.1)
    pages = rows(store, "PRAGMA page_count")[0][0]
    store.db.conn.execute(f"PRAGMA max_page_count = {pages}")  # no room for one more page
    with pytest.raises(StorageError) as e:
        store.write([sample(i, text="x" * 3000) for i in range(1, 50)], 0.1)
    assert e.value.reason == "disk_full"
    assert rows(store, "SELECT count(*) FROM samples")[0][0] == 1


# ---- holdout ------------------------------------------------------------------------------------


def test_holdout_target_rounds_to_nearest():
    assert [holdout_target(n, 0.1) for n in (0, 1, 4, 5, 14, 15, 100)] == [0, 0, 0, 1, 1, 2, 10]
    assert holdout_target(10, 0.0) == 0


@given(
    labels=st.lists(st.sampled_from("abc"), min_size=1, max_size=300),
    fraction=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_holdout_is_stratified_by_label(tmp_path_factory, labels, fraction):
    s = Store(tmp_path_factory.mktemp("h") / "x.db").open()
    try:
        # in several transactions, as the writer would
        for start in range(0, len(labels), 7):
            s.write([sample(i, lab) for i, lab in enumerate(labels) if start <= i < start + 7], fraction)
        per_label = Counter(labels)
        got = dict(rows(s, "SELECT label, sum(split = 'holdout') FROM samples GROUP BY label"))
        for label, n in per_label.items():
            assert got[label] == holdout_target(n, fraction)
        assert s.totals()["holdout"] == sum(got.values())
    finally:
        s.close()


# ---- retention ----------------------------------------------------------------------------------


@given(
    n=st.integers(0, 500),
    h=st.integers(0, 500),
    limit=st.integers(1, 400),
    fraction=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_retention_plan_properties(n, h, limit, fraction):
    h = min(h, n)
    drop_train, drop_holdout = retention_plan(n, h, limit, fraction)
    assert 0 <= drop_train <= n - h and 0 <= drop_holdout <= h
    if n <= limit:
        assert (drop_train, drop_holdout) == (0, 0)
        return
    assert drop_train + drop_holdout == n - limit
    share = -(-fraction * limit // 1)
    # the holdout is never cut below its share while training rows remain
    if drop_holdout > 0:
        assert h - drop_holdout >= min(h, share) or drop_train == n - h


def test_retention_drops_oldest_training_samples_first(store):
    store.write([sample(i, "ab"[i % 2]) for i in range(200)], 0.1)
    holdout = [r[0] for r in rows(store, "SELECT id FROM samples WHERE split = ? ORDER BY id", (HOLDOUT,))]
    assert len(holdout) == 20
    # the holdout's share of 150 rows is 15: it gives up its 5 oldest, training rows the other 45
    deleted = store.enforce_retention(RetentionLimits(**{**LIMITS.__dict__, "max_samples": 150}))
    assert (deleted["train"], deleted["holdout"]) == (45, 5)
    assert [
        r[0] for r in rows(store, "SELECT id FROM samples WHERE split = ? ORDER BY id", (HOLDOUT,))
    ] == holdout[5:]
    train_ids = [r[0] for r in rows(store, "SELECT id FROM samples WHERE split = ? ORDER BY id", (TRAIN,))]
    assert len(train_ids) == 135 and train_ids[0] > 45
    assert store.totals()["samples"] == 150 and store.totals()["holdout"] == 15


def test_retention_never_cuts_the_holdout_below_its_share(store):
    store.write([sample(i, "ab"[i % 2]) for i in range(200)], 0.1)
    # an operator raised the share to 0.2: 30 of 150 rows, more than the 20 there are
    deleted = store.enforce_retention(
        RetentionLimits(**{**LIMITS.__dict__, "max_samples": 150, "holdout_fraction": 0.2})
    )
    assert (deleted["train"], deleted["holdout"]) == (50, 0)
    assert rows(store, "SELECT count(*) FROM samples WHERE split = ?", (HOLDOUT,))[0][0] == 20


def test_retention_trims_holdout_only_above_its_share(store):
    store.write([sample(i) for i in range(300)], 0.1)  # 30 holdout
    limits = RetentionLimits(**{**LIMITS.__dict__, "max_samples": 100})
    deleted = store.enforce_retention(limits)
    assert deleted == {"train": 180, "holdout": 20, "predictions": 0, "feedback": 0}
    assert rows(store, "SELECT split, count(*) FROM samples GROUP BY split ORDER BY split") == [
        (HOLDOUT, 10),
        (TRAIN, 90),
    ]


def test_retention_by_bytes(store):
    store.write([sample(i, text="x" * 1000) for i in range(100)], 0.0)
    limits = RetentionLimits(**{**LIMITS.__dict__, "max_sample_bytes": 50 * 1001})
    store.enforce_retention(limits)
    assert rows(store, "SELECT count(*), min(id) FROM samples")[0] == (50, 51)
    assert store.totals()["sample_bytes"] <= 50 * 1001


def test_retention_of_predictions_and_feedback(store):
    store.write([prediction(f"old{i}") for i in range(5)], 0.1, now=1000.0)
    store.write([prediction(f"new{i}") for i in range(10)], 0.1, now=10 * 86400.0)
    store.write([NewFeedback(key=f"k{i}", prediction_id=f"new{i}", label="a") for i in range(10)], 0.1)
    limits = RetentionLimits(
        **{**LIMITS.__dict__, "prediction_retention_days": 5, "max_predictions": 8, "max_feedback": 4}
    )
    deleted = store.enforce_retention(limits, now=11 * 86400.0)
    assert deleted["predictions"] == 5 + 2 and deleted["feedback"] == 6
    assert [r[0] for r in rows(store, "SELECT id FROM predictions ORDER BY id")] == [
        f"new{i}" for i in range(2, 10)
    ]
    assert [r[0] for r in rows(store, "SELECT key FROM feedback ORDER BY id")] == ["k6", "k7", "k8", "k9"]


# ---- config, commands, outbox, snapshot ---------------------------------------------------------


def test_config_versions(store):
    assert store.last_accepted_config() is None
    store.save_config(1, {"inference": {"top_k": 2}}, accepted=True)
    store.save_config(2, {"inference": {"top_k": 0}}, accepted=False, errors=["inference.top_k: too small"])
    assert store.last_accepted_config() == {"version": 1, "inference": {"top_k": 2}}
    assert rows(store, "SELECT status, errors FROM config_versions WHERE version = 2") == [
        ("rejected", '["inference.top_k: too small"]')
    ]


def test_command_audit_answers_redelivery_from_the_record(store):
    assert store.begin_command("c1", "status", {}) is None
    assert store.begin_command("c1", "status", {}) is None  # not finished yet
    store.finish_command("c1", True, {"ok": True, "result": {"x": 1}})
    assert store.begin_command("c1", "status", {}) == {"ok": True, "result": {"x": 1}}


def test_outbox_waits_for_the_far_side_and_keeps_to_its_quota(store):
    meta = {"upload_id": "u1"}
    assert store.outbox_put("upload", "u1", "fed/f/up/d", meta, b"\x00" * 600, max_bytes=1000) == []
    assert (
        store.outbox_put("upload", "u1", "fed/f/up/d", meta, b"again", max_bytes=1000) == []
    )  # same key: no-op
    assert [r["key"] for r in store.outbox_due(resend_after_s=30)] == ["u1"]
    (row,) = store.outbox_due(resend_after_s=30)
    store.outbox_attempted(row["id"])
    assert store.outbox_due(resend_after_s=30) == []  # sent moments ago: not due
    assert [r["key"] for r in store.outbox_due(resend_after_s=30, now=time.time() + 31)] == ["u1"]
    # Each resend doubles the wait, up to the ceiling: a week away costs a few dozen resends.
    t = time.time()
    for attempt, wait in enumerate([30, 60, 120, 240], start=1):
        store.db.conn.execute("UPDATE outbox SET attempts = ?, last_attempt_at = ?", (attempt, t))
        assert store.outbox_due(resend_after_s=30, now=t + wait - 1) == []
        assert len(store.outbox_due(resend_after_s=30, now=t + wait + 1)) == 1
    store.db.conn.execute("UPDATE outbox SET attempts = 40, last_attempt_at = ?", (t,))
    assert len(store.outbox_due(resend_after_s=30, now=t + 3601, max_resend_after_s=3600)) == 1
    # A second upload that does not fit beside the first pushes it out (oldest first).
    assert store.outbox_put("upload", "u2", "fed/f/up/d", {}, b"\x01" * 600, max_bytes=1000) == ["u1"]
    assert store.outbox_stats()["queued"] == 1 and store.outbox_stats()["queued_bytes"] == 600
    with pytest.raises(ValueError):
        store.outbox_put("upload", "u3", "fed/f/up/d", {}, b"\x02" * 2000, max_bytes=1000)
    assert store.outbox_ack("u2", {"status": "accepted"}) is True
    assert store.outbox_ack("u2", {"status": "accepted"}) is False  # already settled
    assert store.outbox_due(resend_after_s=0, now=time.time() + 1e6) == []
    assert store.outbox_find("u2")["result"] == {"status": "accepted"}
    assert store.outbox_stats()["queued"] == 0


def test_snapshot_is_a_consistent_copy(store, tmp_path):
    store.write([sample(i) for i in range(10)], 0.1)
    path = store.snapshot(tmp_path / "snaps")
    path2 = store.snapshot(tmp_path / "snaps")
    assert path != path2 and path.exists() and path2.exists()
    copy = sqlite3.connect(path)
    assert copy.execute("SELECT count(*) FROM samples").fetchone()[0] == 10
    copy.close()
    assert not list((tmp_path / "snaps").glob("*.tmp"))


def test_recent_holdout_texts_are_newest_first(tmp_path):
    from agent.store import NewSample, Store

    store = Store(tmp_path / "s.db").open()
    store.write([NewSample(key=f"k{i}", text=f"t{i}", label="a") for i in range(40)], holdout_fraction=0.5)
    texts = store.recent_holdout_texts(5)
    assert len(texts) == 5 and all(t.startswith("t") for t in texts)
    ids = [int(t[1:]) for t in texts]
    assert ids == sorted(ids, reverse=True)
    store.close()


def _open_fds_on(path: Path) -> int:
    fds = Path("/proc/self/fd")
    n = 0
    for fd in fds.iterdir():
        try:
            n += os.readlink(fd).startswith(str(path))
        except OSError:
            continue
    return n


def test_connections_of_ended_threads_are_closed(store):
    """Each thread gets its own connection; one whose thread ended must not stay open for good."""
    before = _open_fds_on(store.path)

    def read() -> None:
        store.db.execute("SELECT count(*) FROM samples").fetchone()

    for _ in range(30):
        t = threading.Thread(target=read)
        t.start()
        t.join()
    # Only the last thread's connection is still open (closed when the next one connects).
    assert _open_fds_on(store.path) - before <= 3  # its database, -wal and -shm
