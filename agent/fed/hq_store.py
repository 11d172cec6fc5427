"""The aggregator's state in SQLite: rounds, chunks in transit, uploads, answers, globals, the leader lease.

Every worker of a share group opens the same database (WAL; ``BEGIN IMMEDIATE`` serializes
writers), so any worker may receive any chunk of an upload and whichever commits the last one
assembles it. Everything a restarted worker needs is here: the open round, the uploads it holds,
a global that was built but not yet published. A chunk is acked to the broker only after its
commit, so a worker killed at any point loses nothing the broker handed it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

migrations = Migrations("edge-aggregator")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE rounds (
            id INTEGER PRIMARY KEY,            -- the round number announced
            strategy TEXT NOT NULL,
            base_hash TEXT NOT NULL,
            lora_seed INTEGER,
            min_uploads INTEGER NOT NULL,
            opened_at REAL NOT NULL,
            deadline REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
            closed_at REAL,
            result TEXT                        -- JSON: participants, excluded, seconds
        );
        CREATE TABLE chunks (
            upload_id TEXT NOT NULL,
            idx INTEGER NOT NULL,
            count INTEGER NOT NULL,
            device TEXT NOT NULL,
            size INTEGER NOT NULL,             -- of the whole upload, as each chunk's header says
            sha256 TEXT NOT NULL,              -- likewise
            data BLOB NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (upload_id, idx)
        );
        CREATE TABLE uploads (
            id INTEGER PRIMARY KEY,
            upload_id TEXT NOT NULL UNIQUE,
            device TEXT NOT NULL,
            round_id INTEGER NOT NULL,         -- the round it counts in (late ones: the next open one)
            requested_round INTEGER,
            late INTEGER NOT NULL,
            adapter_version TEXT NOT NULL,
            num_examples INTEGER NOT NULL,
            norm REAL NOT NULL,
            tensors BLOB NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('accepted', 'superseded', 'excluded', 'aggregated')),
            reason TEXT,
            received_at REAL NOT NULL
        );
        CREATE INDEX uploads_round ON uploads (round_id, status);
        CREATE TABLE answers (                 -- what each upload was told: resent for a re-sent upload
            upload_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE globals (
            round_id INTEGER PRIMARY KEY,
            version TEXT NOT NULL,
            manifest TEXT NOT NULL,            -- JSON, signed
            blob BLOB NOT NULL,
            created_at REAL NOT NULL,
            published_at REAL
        );
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
        """
    )


@migrations()
def m002_bundle_releases(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE releases (
            release INTEGER PRIMARY KEY,       -- increasing; boxes take a newer one than they serve
            bundle_hash TEXT NOT NULL UNIQUE,
            dir TEXT NOT NULL,                 -- the files headquarters serves chunks from
            manifest TEXT NOT NULL,            -- JSON, signed, as last published (its rollout stage)
            stage TEXT NOT NULL,
            created_at REAL NOT NULL,
            published_at REAL                  -- NULL: the leader publishes it at its next step
        );
        CREATE TABLE release_reports (
            release INTEGER NOT NULL,
            device TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            gate TEXT,
            ts REAL NOT NULL,
            PRIMARY KEY (release, device)
        );
        """
    )


@dataclass(frozen=True)
class Round:
    id: int
    strategy: str
    base_hash: str
    lora_seed: int | None
    min_uploads: int
    opened_at: float
    deadline: float
    status: str


class HqStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = Database(self._conn())
        db.enable_wal()
        migrations.apply(db)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: workers queue here, never interleave)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- settings and lease ----------------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        rows = self.read("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_setting(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def take_lease(self, name: str, holder: str, ttl_s: float, now: float | None = None) -> bool:
        """Hold ``name`` for ``ttl_s`` if it is free, expired, or ours already: one round leader."""
        now = time.time() if now is None else now
        with self.tx() as conn:
            row = conn.execute("SELECT holder, expires_at FROM lease WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now:
                return False
            conn.execute(
                "INSERT INTO lease (name, holder, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at",
                (name, holder, now + ttl_s),
            )
        return True

    def release_lease(self, name: str, holder: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM lease WHERE name = ? AND holder = ?", (name, holder))

    # ---- rounds ----------------------------------------------------------------------------
    def open_round(self) -> Round | None:
        rows = self.read(
            "SELECT id, strategy, base_hash, lora_seed, min_uploads, opened_at, deadline, status FROM rounds "
            "WHERE status = 'open' ORDER BY id DESC LIMIT 1"
        )
        return Round(*rows[0]) if rows else None

    def last_round_id(self) -> int:
        return int(self.read("SELECT coalesce(max(id), 0) FROM rounds")[0][0])

    def add_round(self, r: Round) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO rounds (id, strategy, base_hash, lora_seed, min_uploads, opened_at, deadline, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'open')",
                (r.id, r.strategy, r.base_hash, r.lora_seed, r.min_uploads, r.opened_at, r.deadline),
            )

    def extend_round(self, round_id: int, deadline: float) -> None:
        with self.tx() as conn:
            conn.execute("UPDATE rounds SET deadline = ? WHERE id = ?", (deadline, round_id))

    def abandon_round(self, round_id: int, why: str) -> None:
        """Close a round without a global (its base is no longer the fleet's); ``result`` says why."""
        with self.tx() as conn:
            conn.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, result = ? WHERE id = ? AND status = 'open'",
                (time.time(), json.dumps({"abandoned": why}), round_id),
            )

    def fleet_release(self) -> tuple[int, str] | None:
        """(release, directory) of the newest release rolled out to the whole fleet, if any."""
        rows = self.read(
            "SELECT release, dir FROM releases WHERE stage = 'all' ORDER BY release DESC LIMIT 1"
        )
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def round_norms(self, round_id: int) -> list[tuple[str, str, float]]:
        """(upload id, device, update norm) of the round's accepted uploads: cheap, no tensors."""
        rows = self.read(
            "SELECT upload_id, device, norm FROM uploads WHERE round_id = ? AND status = 'accepted' ORDER BY id",
            (round_id,),
        )
        return [(r[0], r[1], float(r[2])) for r in rows]

    def iter_round_uploads(self, round_id: int, batch: int = 128) -> Iterator[list[dict[str, Any]]]:
        """The round's accepted uploads with their tensors, ``batch`` at a time (memory stays bounded)."""
        keys = ("upload_id", "device", "num_examples", "tensors")
        last = 0
        while True:
            rows = self.read(
                "SELECT id, upload_id, device, num_examples, tensors FROM uploads "
                "WHERE round_id = ? AND status = 'accepted' AND id > ? ORDER BY id LIMIT ?",
                (round_id, last, batch),
            )
            if not rows:
                return
            last = rows[-1][0]
            yield [dict(zip(keys, r[1:], strict=True)) for r in rows]

    def count_uploads(self, round_id: int) -> int:
        return int(
            self.read("SELECT count(*) FROM uploads WHERE round_id = ? AND status = 'accepted'", (round_id,))[
                0
            ][0]
        )

    def close_round(
        self,
        round_id: int,
        result: dict[str, Any],
        version: str,
        manifest: dict[str, Any],
        blob: bytes,
        excluded: dict[str, str],
    ) -> None:
        """The round's global and its bookkeeping in one transaction: a crash leaves all or none."""
        now = time.time()
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO globals (round_id, version, manifest, blob, created_at) VALUES (?, ?, ?, ?, ?)",
                (round_id, version, json.dumps(manifest), blob, now),
            )
            conn.execute(
                "UPDATE rounds SET status = 'closed', closed_at = ?, result = ? WHERE id = ?",
                (now, json.dumps(result), round_id),
            )
            for upload_id, reason in excluded.items():
                conn.execute(
                    "UPDATE uploads SET status = 'excluded', reason = ? WHERE upload_id = ?",
                    (reason, upload_id),
                )
            conn.execute(
                "UPDATE uploads SET status = 'aggregated' WHERE round_id = ? AND status = 'accepted'",
                (round_id,),
            )
            # What went into a global is in the global: keep the rows, drop the tensors.
            conn.execute("UPDATE uploads SET tensors = x'' WHERE round_id = ?", (round_id,))

    def unpublished_globals(self) -> list[tuple[int, dict[str, Any], bytes]]:
        rows = self.read(
            "SELECT round_id, manifest, blob FROM globals WHERE published_at IS NULL ORDER BY round_id"
        )
        return [(r[0], json.loads(r[1]), r[2]) for r in rows]

    def latest_global(self) -> tuple[int, dict[str, Any], bytes] | None:
        rows = self.read("SELECT round_id, manifest, blob FROM globals ORDER BY round_id DESC LIMIT 1")
        return (rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    def mark_published(self, round_id: int) -> None:
        with self.tx() as conn:
            conn.execute("UPDATE globals SET published_at = ? WHERE round_id = ?", (time.time(), round_id))

    # ---- answers ---------------------------------------------------------------------------
    def answer_of(self, upload_id: str) -> dict[str, Any] | None:
        rows = self.read("SELECT payload FROM answers WHERE upload_id = ?", (upload_id,))
        return json.loads(rows[0][0]) if rows else None

    @staticmethod
    def put_answer(conn: sqlite3.Connection, upload_id: str, device: str, payload: dict[str, Any]) -> None:
        conn.execute(
            "INSERT INTO answers (upload_id, device, payload, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(upload_id) DO UPDATE SET payload = excluded.payload",
            (upload_id, device, json.dumps(payload), time.time()),
        )

    def stats(self) -> dict[str, Any]:
        by_status = dict(self.read("SELECT status, count(*) FROM uploads GROUP BY status"))
        return {
            "rounds_closed": int(self.read("SELECT count(*) FROM rounds WHERE status = 'closed'")[0][0]),
            "uploads": by_status,
            "chunks_in_transit": int(self.read("SELECT count(*) FROM chunks")[0][0]),
        }
