"""The SQLite store: labeled samples, feedback, predictions, config versions, command audit, outbox.

sqlite-utils ``Migrations`` run at open; the database is in WAL mode and every thread gets its own
connection. Inbound messages are written in groups, one ``BEGIN IMMEDIATE`` transaction each, and
acked by the caller only after ``write`` returns: a failed write raises ``StorageError`` and leaves
nothing half-done.

Samples are split into ``train`` and ``holdout`` as they arrive, stratified by label (each label
keeps ``holdout_fraction`` of its samples in the holdout; a token-classification box's span samples
all carry the label ``ENTITY_SAMPLE_LABEL``, one stratum, their spans in ``entities``). Retention
removes the oldest training samples first; the holdout gives up rows only where it is over its share
of the limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

from agent import clock

log = logging.getLogger(__name__)

TRAIN = "train"
HOLDOUT = "holdout"
KEEP_CONFIG_VERSIONS = 200
KEEP_COMMANDS = 1000
KEEP_OUTBOX_ACKED = 200
# An unacknowledged upload is resent at most this far apart (the backoff's ceiling): the broker
# keeps the first copy for an absent aggregator; what a broker restart without persistence loses
# is resent at once on the new session (agent.fed.client), not after this.
OUTBOX_MAX_RESEND_S = 6 * 3600.0
DELETE_CHUNK = 5000
# The label column of span rows (a token-classification box's samples and predictions): span
# samples share one holdout stratum; the learner tells them apart by ``entities IS NOT NULL``.
ENTITY_SAMPLE_LABEL = "entities"

migrations = Migrations("edge-agent")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE samples (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,          -- de-duplication key: sample id or content hash
            sample_id TEXT,
            text TEXT NOT NULL,
            label TEXT NOT NULL,
            split TEXT NOT NULL CHECK (split IN ('train', 'holdout')),
            source TEXT NOT NULL DEFAULT 'sample',
            bytes INTEGER NOT NULL,
            ts REAL,
            received_at REAL NOT NULL
        );
        CREATE INDEX samples_split ON samples (split, id);
        CREATE INDEX samples_label ON samples (label, split);
        CREATE TABLE predictions (
            id TEXT PRIMARY KEY,
            text TEXT,                         -- NULL when store.store_text is false
            text_sha256 TEXT NOT NULL,
            label TEXT NOT NULL,
            score REAL NOT NULL,
            top_k TEXT NOT NULL,
            adapter_version TEXT,
            source TEXT,
            ts REAL,
            created_at REAL NOT NULL
        );
        CREATE INDEX predictions_created ON predictions (created_at);
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            feedback_id TEXT,
            prediction_id TEXT NOT NULL,
            label TEXT NOT NULL,
            received_at REAL NOT NULL
        );
        CREATE INDEX feedback_prediction ON feedback (prediction_id);
        CREATE TABLE config_versions (
            id INTEGER PRIMARY KEY,
            version INTEGER NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
            errors TEXT,
            received_at REAL NOT NULL
        );
        CREATE INDEX config_versions_status ON config_versions (status, id);
        CREATE TABLE commands (
            id INTEGER PRIMARY KEY,
            command_id TEXT NOT NULL UNIQUE,
            cmd TEXT NOT NULL,
            args TEXT NOT NULL,
            received_at REAL NOT NULL,
            finished_at REAL,
            ok INTEGER,
            result TEXT
        );
        -- store-and-forward queue for the sync issue: rows leave only once the broker acked them
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            qos INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_attempt_at REAL,
            sent_at REAL
        );
        CREATE INDEX outbox_pending ON outbox (sent_at, id);
        """
    )


@migrations()
def m002_outbox_for_uploads(db: Database) -> None:
    # The first outbox (never used) acked rows on the broker's PUBACK; an upload counts only once
    # the aggregator has said so, so rows now wait for that answer, keyed by the upload id.
    db.executescript(
        """
        DROP TABLE IF EXISTS outbox;
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,            -- delivery order
            kind TEXT NOT NULL,                -- what the far side acknowledges, e.g. 'upload'
            key TEXT NOT NULL UNIQUE,          -- its idempotency key (upload id)
            topic TEXT NOT NULL,
            meta TEXT NOT NULL,                -- JSON
            payload BLOB NOT NULL,
            bytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_attempt_at REAL,
            acked_at REAL,                     -- the far side's answer arrived
            result TEXT                        -- JSON: that answer
        );
        CREATE INDEX outbox_pending ON outbox (acked_at, id);
        CREATE TABLE sync_state (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """
    )


@migrations()
def m003_prediction_latency(db: Database) -> None:
    # Per prediction, so `edge-agent report` can draw latency percentiles over any time window.
    db.execute("ALTER TABLE predictions ADD COLUMN latency_ms REAL")


@migrations()
def m004_bundle_chunks(db: Database) -> None:
    # Chunks of a base-model release written to the staging directory and fsynced: a download
    # killed at any point resumes by asking for what is not here.
    db.executescript(
        """
        CREATE TABLE bundle_chunks (
            bundle_hash TEXT NOT NULL,
            path TEXT NOT NULL,
            idx INTEGER NOT NULL,
            PRIMARY KEY (bundle_hash, path, idx)
        );
        """
    )


@migrations()
def m005_entities(db: Database) -> None:
    # Token-classification boxes: a span sample's entities as JSON [[start, end, label], ...], an
    # entity event's spans as [[start, end, label, score], ...]; NULL on a classifier's rows.
    db.execute("ALTER TABLE samples ADD COLUMN entities TEXT")
    db.execute("ALTER TABLE predictions ADD COLUMN entities TEXT")


# ---- errors ---------------------------------------------------------------------------------


class StorageError(Exception):
    """A write that did not happen. ``reason`` names why, for counters and the error topic."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_REASONS = {
    5: "locked",  # SQLITE_BUSY
    6: "locked",  # SQLITE_LOCKED
    8: "read_only",  # SQLITE_READONLY
    10: "io_error",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "disk_full",  # SQLITE_FULL
    14: "cannot_open",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}


def storage_error(e: sqlite3.Error) -> StorageError:
    code = getattr(e, "sqlite_errorcode", None)
    reason = _REASONS.get(code & 0xFF, "sqlite_error") if isinstance(code, int) else "sqlite_error"
    return StorageError(reason, f"{reason.replace('_', ' ')}: {e}")


# ---- rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewSample:
    key: str
    text: str
    label: str
    sample_id: str | None = None
    ts: float | None = None
    source: str = "sample"
    entities: str | None = None  # a span sample: JSON [[start, end, label], ...], label ENTITY_SAMPLE_LABEL


@dataclass(frozen=True)
class NewFeedback:
    key: str
    prediction_id: str
    label: str
    feedback_id: str | None = None


@dataclass(frozen=True)
class NewPrediction:
    id: str
    text: str | None
    text_sha256: str
    label: str
    score: float
    top_k: list[tuple[str, float]]
    adapter_version: str | None = None
    source: str | None = None
    ts: float | None = None
    latency_ms: float | None = None  # message received -> prediction made
    entities: str | None = None  # an entity event: JSON [[start, end, label, score], ...]


NewRow = NewSample | NewFeedback | NewPrediction


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    UNKNOWN_PREDICTION = "unknown_prediction"


@dataclass(frozen=True)
class RetentionLimits:
    max_samples: int
    max_sample_bytes: int
    holdout_fraction: float
    max_predictions: int
    prediction_retention_days: float
    max_feedback: int


def holdout_target(n_after: int, fraction: float) -> int:
    """Holdout rows a label should have once it has ``n_after`` samples (rounded to nearest)."""
    return math.floor(n_after * fraction + 0.5)


def retention_plan(n: int, holdout: int, limit: int, fraction: float) -> tuple[int, int]:
    """How many (train, holdout) rows to delete to get ``n`` rows down to ``limit``.

    Training rows go first. The holdout keeps ``ceil(fraction * limit)`` rows (or all it has, if
    fewer); it gives up rows only above that share, or when no training rows are left.
    """
    if n <= limit:
        return 0, 0
    train = n - holdout
    share = math.ceil(fraction * limit)
    keep_holdout = min(holdout, max(share, limit - train))
    drop_holdout = holdout - keep_holdout
    drop_train = (n - limit) - drop_holdout
    return drop_train, drop_holdout


# ---- the store ------------------------------------------------------------------------------


class Store:
    def __init__(self, path: Path, *, synchronous: str = "full", busy_timeout_ms: int = 2000):
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        # Every thread's connection, with its thread: close() closes them all, and a connection
        # whose thread has ended is closed when the next thread connects (the list would otherwise
        # keep it, and its file descriptors, open for as long as the daemon runs: the chaos soak's
        # fds grew 13 -> 85 on the database in 5 minutes of rounds).
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        # Writer-thread state, kept in step with the table by write() and enforce_retention().
        self._label_counts: dict[str, list[int]] = {}
        self._totals: dict[str, int] = {}

    # ---- connections -------------------------------------------------------------------------
    @property
    def db(self) -> Database:
        """This thread's connection (SQLite connections must not be shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self._busy_timeout_ms / 1000.0, check_same_thread=False
                )
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.Error as e:
                raise storage_error(e) from e
            db = Database(conn)
            self._local.db = db
            with self._conns_lock:
                self._close_ended_threads_connections()
                self._conns.append((threading.current_thread(), conn))
        return db

    def _close_ended_threads_connections(self) -> None:
        ended = [conn for thread, conn in self._conns if not thread.is_alive()]
        self._conns = [(t, c) for t, c in self._conns if t.is_alive()]
        for conn in ended:
            try:
                conn.close()
            except sqlite3.Error:
                log.warning("store: closing an ended thread's connection failed", exc_info=True)

    def open(self) -> Store:
        """Create the directory, switch to WAL, run pending migrations, load counters."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError("cannot_open", f"cannot create {self.path.parent}: {e}") from e
        try:
            db = self.db
            db.enable_wal()
            pending = [m.name for m in migrations.pending(db)]
            migrations.apply(db)
            if pending:
                log.info("store %s: applied migrations %s", self.path, ", ".join(pending))
            self._load_totals()
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return self

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = [c for _, c in self._conns], []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                log.warning("store: closing a connection failed", exc_info=True)
        self._local = threading.local()

    def _load_totals(self) -> None:
        conn = self.db.conn
        n, h, b = conn.execute(
            "SELECT count(*), coalesce(sum(split = 'holdout'), 0), coalesce(sum(bytes), 0) FROM samples"
        ).fetchone()
        self._totals = {
            "samples": n,
            "holdout": h,
            "sample_bytes": b,
            "predictions": conn.execute("SELECT count(*) FROM predictions").fetchone()[0],
            "feedback": conn.execute("SELECT count(*) FROM feedback").fetchone()[0],
        }
        self._label_counts = {}

    def totals(self) -> dict[str, int]:
        """Row counts kept by the writer (no table scan): samples, holdout, sample_bytes, ..."""
        return dict(self._totals)

    def file_bytes(self) -> int:
        size = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                size += os.stat(f"{self.path}{suffix}").st_size
        return size

    def recent_holdout_texts(self, limit: int) -> list[str]:
        """The newest holdout texts: the plant's own words, for checks that need realistic input."""
        try:
            rows = self.db.conn.execute(
                "SELECT text FROM samples WHERE split = 'holdout' ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return [r[0] for r in rows]

    # ---- inbound writes ----------------------------------------------------------------------
    def write(
        self, rows: Sequence[NewRow], holdout_fraction: float, now: float | None = None
    ) -> list[Outcome]:
        """Insert ``rows`` in one transaction; one outcome per row. Raises StorageError, all or nothing."""
        now = time.time() if now is None else now
        conn = self.db.conn
        counts = {k: list(v) for k, v in self._label_counts.items()}
        totals = dict(self._totals)
        outcomes: list[Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    if isinstance(row, NewSample):
                        outcomes.append(self._insert_sample(conn, row, holdout_fraction, counts, totals, now))
                    elif isinstance(row, NewFeedback):
                        outcomes.append(self._insert_feedback(conn, row, totals, now))
                    else:
                        outcomes.append(self._insert_prediction(conn, row, totals, now))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise storage_error(e) from e
        self._label_counts = counts
        self._totals = totals
        return outcomes

    def _label_count(self, conn: sqlite3.Connection, label: str, counts: dict[str, list[int]]) -> list[int]:
        c = counts.get(label)
        if c is None:
            n, h = conn.execute(
                "SELECT count(*), coalesce(sum(split = 'holdout'), 0) FROM samples WHERE label = ?", (label,)
            ).fetchone()
            c = counts[label] = [n, h]
        return c

    def _insert_sample(
        self,
        conn: sqlite3.Connection,
        row: NewSample,
        fraction: float,
        counts: dict[str, list[int]],
        totals: dict[str, int],
        now: float,
    ) -> Outcome:
        c = self._label_count(conn, row.label, counts)
        split = HOLDOUT if c[1] < holdout_target(c[0] + 1, fraction) else TRAIN
        size = len(row.text.encode()) + len(row.label.encode()) + len((row.entities or "").encode())
        cur = conn.execute(
            "INSERT OR IGNORE INTO samples (key, sample_id, text, label, split, source, bytes, ts, received_at,"
            " entities) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.key, row.sample_id, row.text, row.label, split, row.source, size, row.ts, now, row.entities),
        )
        if cur.rowcount == 0:
            return Outcome.DUPLICATE
        c[0] += 1
        totals["samples"] += 1
        totals["sample_bytes"] += size
        if split == HOLDOUT:
            c[1] += 1
            totals["holdout"] += 1
        return Outcome.STORED

    def _insert_feedback(
        self, conn: sqlite3.Connection, row: NewFeedback, totals: dict[str, int], now: float
    ) -> Outcome:
        if conn.execute("SELECT 1 FROM predictions WHERE id = ?", (row.prediction_id,)).fetchone() is None:
            return Outcome.UNKNOWN_PREDICTION
        cur = conn.execute(
            "INSERT OR IGNORE INTO feedback (key, feedback_id, prediction_id, label, received_at) VALUES (?, ?, ?, ?, ?)",
            (row.key, row.feedback_id, row.prediction_id, row.label, now),
        )
        if cur.rowcount == 0:
            return Outcome.DUPLICATE
        totals["feedback"] += 1
        return Outcome.STORED

    def _insert_prediction(
        self, conn: sqlite3.Connection, row: NewPrediction, totals: dict[str, int], now: float
    ) -> Outcome:
        cur = conn.execute(
            "INSERT OR IGNORE INTO predictions (id, text, text_sha256, label, score, top_k, adapter_version,"
            " source, ts, created_at, latency_ms, entities) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.text,
                row.text_sha256,
                row.label,
                row.score,
                json.dumps(row.top_k),
                row.adapter_version,
                row.source,
                row.ts,
                now,
                row.latency_ms,
                row.entities,
            ),
        )
        if cur.rowcount == 0:
            return Outcome.DUPLICATE
        totals["predictions"] += 1
        return Outcome.STORED

    # ---- retention ---------------------------------------------------------------------------
    def enforce_retention(self, limits: RetentionLimits, now: float | None = None) -> dict[str, int]:
        """Delete what is over the limits; returns rows deleted per kind. Raises StorageError."""
        now = time.time() if now is None else now
        db = self.db
        deleted = {"train": 0, "holdout": 0, "predictions": 0, "feedback": 0}
        try:
            t = self._totals
            limit = min(limits.max_samples, self._rows_within_bytes(limits.max_sample_bytes))
            drop_train, drop_holdout = retention_plan(
                t["samples"], t["holdout"], limit, limits.holdout_fraction
            )
            deleted["train"] = self._delete_oldest(db, "samples", drop_train, "split = 'train'", "id")
            deleted["holdout"] = self._delete_oldest(db, "samples", drop_holdout, "split = 'holdout'", "id")
            cutoff = now - limits.prediction_retention_days * 86400.0
            with db.atomic():
                deleted["predictions"] = db.execute(
                    "DELETE FROM predictions WHERE created_at < ?", (cutoff,)
                ).rowcount
            self._totals["predictions"] -= deleted["predictions"]
            over = self._totals["predictions"] - limits.max_predictions
            deleted["predictions"] += self._delete_oldest(db, "predictions", over, "1", "created_at")
            over = self._totals["feedback"] - limits.max_feedback
            deleted["feedback"] = self._delete_oldest(db, "feedback", over, "1", "id")
            with db.atomic():
                db.execute(
                    "DELETE FROM config_versions WHERE id <= (SELECT max(id) FROM config_versions) - ?",
                    (KEEP_CONFIG_VERSIONS,),
                )
                db.execute(
                    "DELETE FROM commands WHERE id <= (SELECT max(id) FROM commands) - ?", (KEEP_COMMANDS,)
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e
        finally:
            if any(deleted.values()):
                self._load_totals()
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{k}={v}" for k, v in deleted.items() if v))
        return deleted

    def _rows_within_bytes(self, max_bytes: int) -> int:
        """How many of the newest samples fit in ``max_bytes`` (all of them when under the limit)."""
        if self._totals["sample_bytes"] <= max_bytes:
            return self._totals["samples"]
        row = self.db.conn.execute(
            "SELECT count(*) FROM (SELECT sum(bytes) OVER (ORDER BY id DESC) AS c FROM samples) WHERE c <= ?",
            (max_bytes,),
        ).fetchone()
        return int(row[0])

    def _delete_oldest(self, db: Database, table: str, count: int, where: str, order: str) -> int:
        # In chunks, so a big clean-up never holds the write lock long enough to stall ingest.
        done = 0
        while done < count:
            n = min(DELETE_CHUNK, count - done)
            with db.atomic():
                cur = db.execute(
                    f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {where} ORDER BY {order} LIMIT ?)",
                    (n,),
                )
            if cur.rowcount <= 0:
                break
            done += cur.rowcount
            self._totals[table] -= cur.rowcount
        return done

    # ---- config versions ---------------------------------------------------------------------
    def save_config(
        self, version: int, body: dict[str, Any], accepted: bool, errors: Iterable[str] = ()
    ) -> None:
        try:
            with self.db.atomic() as db:
                db.execute(
                    "INSERT INTO config_versions (version, body, status, errors, received_at) VALUES (?, ?, ?, ?, ?)",
                    (
                        version,
                        json.dumps(body, sort_keys=True),
                        "accepted" if accepted else "rejected",
                        json.dumps(list(errors)) if not accepted else None,
                        time.time(),
                    ),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e

    def last_accepted_config(self) -> dict[str, Any] | None:
        """The newest accepted config as a dict with its ``version``, or None."""
        try:
            row = self.db.conn.execute(
                "SELECT version, body FROM config_versions WHERE status = 'accepted' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        except sqlite3.Error as e:
            raise storage_error(e) from e
        if row is None:
            return None
        return {"version": row[0], **json.loads(row[1])}

    # ---- command audit -----------------------------------------------------------------------
    def begin_command(self, command_id: str, cmd: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """Record a command; for a redelivered one, return the stored result (None if unfinished)."""
        try:
            with self.db.atomic() as db:
                cur = db.execute(
                    "INSERT OR IGNORE INTO commands (command_id, cmd, args, received_at) VALUES (?, ?, ?, ?)",
                    (command_id, cmd, json.dumps(args), time.time()),
                )
                if cur.rowcount == 1:
                    return None
                row = db.execute("SELECT result FROM commands WHERE command_id = ?", (command_id,)).fetchone()
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return json.loads(row[0]) if row and row[0] else None

    def finish_command(self, command_id: str, ok: bool, result: dict[str, Any]) -> None:
        try:
            with self.db.atomic() as db:
                db.execute(
                    "UPDATE commands SET finished_at = ?, ok = ?, result = ? WHERE command_id = ?",
                    (time.time(), int(ok), json.dumps(result), command_id),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e

    # ---- outbox (store-and-forward to headquarters) ------------------------------------------
    def outbox_put(
        self, kind: str, key: str, topic: str, meta: dict[str, Any], payload: bytes, max_bytes: int
    ) -> list[str]:
        """Queue ``payload`` for delivery under ``key`` (a second put of the same key is a no-op).

        The queue is bounded by ``max_bytes`` of unacknowledged payloads: the oldest give way to
        the new one. Returns the keys dropped for it. Raises StorageError, or ValueError when the
        payload alone exceeds the quota.
        """
        if len(payload) > max_bytes:
            raise ValueError(f"{len(payload)} bytes exceed the outbox quota of {max_bytes}")
        dropped: list[str] = []
        try:
            with self.db.atomic() as db:
                conn = db.conn
                if conn.execute("SELECT 1 FROM outbox WHERE key = ?", (key,)).fetchone():
                    return []
                queued = conn.execute(
                    "SELECT coalesce(sum(bytes), 0) FROM outbox WHERE acked_at IS NULL"
                ).fetchone()[0]
                for row_id, old_key, size in conn.execute(
                    "SELECT id, key, bytes FROM outbox WHERE acked_at IS NULL ORDER BY id"
                ).fetchall():
                    if queued + len(payload) <= max_bytes:
                        break
                    conn.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                    queued -= size
                    dropped.append(old_key)
                conn.execute(
                    "INSERT INTO outbox (kind, key, topic, meta, payload, bytes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (kind, key, topic, json.dumps(meta), payload, len(payload), clock.time()),
                )
                # Acknowledged rows are kept a while for status and audits, not forever.
                conn.execute(
                    "DELETE FROM outbox WHERE acked_at IS NOT NULL AND id <= (SELECT max(id) FROM outbox) - ?",
                    (KEEP_OUTBOX_ACKED,),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return dropped

    def outbox_due(
        self,
        resend_after_s: float,
        now: float | None = None,
        limit: int = 16,
        max_resend_after_s: float = OUTBOX_MAX_RESEND_S,
    ) -> list[dict[str, Any]]:
        """Unacknowledged rows never sent, or due again, oldest first.

        A row is due ``resend_after_s`` after its first send, then twice as long after each
        further one, up to ``max_resend_after_s``: the broker keeps the first copy for an absent
        aggregator, so a week-long outage costs a few dozen resends, not twenty thousand.
        """
        now = clock.time() if now is None else now
        try:
            rows = self.db.conn.execute(
                "SELECT id, kind, key, topic, meta, payload, attempts FROM outbox WHERE acked_at IS NULL"
                " AND (last_attempt_at IS NULL"
                "      OR last_attempt_at + min(? * (1 << min(max(attempts - 1, 0), 20)), ?) <= ?)"
                " ORDER BY id LIMIT ?",
                (resend_after_s, max(resend_after_s, max_resend_after_s), now, limit),
            ).fetchall()
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return [
            {
                "id": r[0],
                "kind": r[1],
                "key": r[2],
                "topic": r[3],
                "meta": json.loads(r[4]),
                "payload": r[5],
                "attempts": r[6],
            }
            for r in rows
        ]

    def outbox_attempted(self, row_id: int, now: float | None = None) -> None:
        try:
            with self.db.atomic() as db:
                db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ? WHERE id = ?",
                    (clock.time() if now is None else now, row_id),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e

    def outbox_ack(self, key: str, result: dict[str, Any]) -> bool:
        """Record the far side's answer; True when it settled a row that was still waiting."""
        try:
            with self.db.atomic() as db:
                cur = db.execute(
                    "UPDATE outbox SET acked_at = ?, result = ? WHERE key = ? AND acked_at IS NULL",
                    (clock.time(), json.dumps(result), key),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e
        return cur.rowcount == 1

    def outbox_find(self, key: str) -> dict[str, Any] | None:
        row = self.db.conn.execute(
            "SELECT key, meta, attempts, created_at, acked_at, result FROM outbox WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return {
            "key": row[0],
            "meta": json.loads(row[1]),
            "attempts": row[2],
            "created_at": row[3],
            "acked_at": row[4],
            "result": json.loads(row[5]) if row[5] else None,
        }

    def outbox_stats(self, now: float | None = None) -> dict[str, Any]:
        """What is queued for headquarters: count, bytes, age of the oldest (for telemetry)."""
        now = clock.time() if now is None else now
        n, size, oldest = self.db.conn.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), min(created_at) FROM outbox WHERE acked_at IS NULL"
        ).fetchone()
        acked = self.db.conn.execute("SELECT count(*) FROM outbox WHERE acked_at IS NOT NULL").fetchone()[0]
        return {
            "queued": n,
            "queued_bytes": size,
            "oldest_queued_age_s": round(now - oldest, 1) if oldest is not None else None,
            "acked_kept": acked,
        }

    # ---- sync state (the fleet client's small facts: last round seen, global installed) --------
    def sync_state(self, key: str) -> str | None:
        row = self.db.conn.execute("SELECT value FROM sync_state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_sync_state(self, key: str, value: str) -> None:
        try:
            with self.db.atomic() as db:
                db.execute(
                    "INSERT INTO sync_state (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )
        except sqlite3.Error as e:
            raise storage_error(e) from e

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self, dest_dir: Path) -> Path:
        """A consistent copy of the database (``VACUUM INTO``), written under a temp name, then renamed."""
        dest_dir = Path(dest_dir)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        final = dest_dir / f"edge-agent-{stamp}.db"
        n = 1
        while final.exists():
            final = dest_dir / f"edge-agent-{stamp}-{n}.db"
            n += 1
        tmp = final.with_name(final.name + ".tmp")
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            self.db.conn.execute("VACUUM INTO ?", (str(tmp),))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except sqlite3.Error as e:
            tmp.unlink(missing_ok=True)
            raise storage_error(e) from e
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError("io_error", f"snapshot failed: {e}") from e
        return final
