"""The learner's side in the daemon: triggers, resource guard, spawning rounds, the gate,
promotion, rollback and the adapter registry. No torch here: training runs in a child process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent.adapters import AdapterError
from agent.bundle import load_manifest
from agent.learner import policy
from agent.learner.round import RoundSpec, report_from_dict, run_round_process
from agent.linear import LINEAR_CONFIG, write_serving

log = logging.getLogger(__name__)

REGISTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapter_versions (
    version TEXT PRIMARY KEY,
    parent TEXT,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'promoted', 'rejected', 'rolled_back', 'retired')),
    reason TEXT,
    metrics TEXT,                 -- JSON: candidate and active evaluation per holdout slice
    data_from_id INTEGER,         -- sample id range the round trained on
    data_to_id INTEGER,
    n_new INTEGER, n_replay INTEGER,
    created_at REAL NOT NULL,
    promoted_at REAL,
    origin TEXT NOT NULL DEFAULT 'local'  -- 'local' (trained here) or 'fleet' (a global adapter)
);
CREATE TABLE IF NOT EXISTS learner_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class BundleRoundOutcome:
    """What a round for a new base model found: its adapter passes the gate against the serving
    bundle and adapter (``promote``), or why not."""

    version: str
    promote: bool
    reasons: list[str]
    candidate_dir: Path
    metrics: dict[str, Any]
    base_hash: str
    max_sample_id: int
    n_new: int


@dataclass
class LearnerSettings:
    enabled: bool = True
    triggers: policy.TriggerPolicy = field(default_factory=policy.TriggerPolicy)
    limits: policy.ResourceLimits = field(default_factory=policy.ResourceLimits)
    gate: policy.GatePolicy = field(default_factory=policy.GatePolicy)
    rollback: policy.RollbackPolicy = field(default_factory=policy.RollbackPolicy)
    schedule: list[str] = field(default_factory=list)  # "HH:MM" UTC
    epochs: int = 8
    lr: float = 1e-3
    lr_frozen_a: float = 1e-2  # with the fleet's frozen A (FFA-LoRA): B and the head only
    batch_size: int = 16
    anchor_lambda: float = 1e-3
    distill_weight: float = 1.0
    replay_fraction: float = 0.5
    max_train_samples: int = 4000
    time_budget_s: float = 600.0
    threads: int = 1
    keep_versions: int = 5
    min_interval_s: float = 60.0  # between two rounds, whatever triggers
    # Fit the fast linear learner beside each LoRA round; the gate then chooses per box among
    # transformer, linear and combined (agent.linear, policy.serving_choice).
    linear: bool = True
    # Between rounds, the fast learner alone is refit once this many new train samples arrived
    # (0: only with rounds), at most every ``linear_refresh_interval_s``: a refresh is seconds,
    # a round minutes, and a drifted stream's new words reach the answers 50 samples later.
    linear_refresh_samples: int = 50
    linear_refresh_interval_s: float = 30.0


class LearnerManager:
    def __init__(
        self,
        *,
        db_path: Path,
        bundle_dir: Path,
        data_dir: Path,
        engine: Any,
        settings: LearnerSettings | None = None,
        publish: Callable[[str, dict[str, Any]], None] | None = None,
        anchor_dir: Callable[[], Path | None] | None = None,
        frozen_a_seed: Callable[[], int | None] | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ):
        self.db_path = Path(db_path)
        self.bundle_dir = Path(bundle_dir)
        self.adapters_dir = Path(data_dir) / "adapters"
        self.work_dir = Path(data_dir) / "learner"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.settings = settings or LearnerSettings()
        self.publish = publish or (lambda event, body: None)
        # The fleet's say in local training (agent.fed.client): theta* and the distillation
        # teacher are the fleet's global adapter when there is one; with FFA-LoRA, A is frozen.
        self.anchor_dir = anchor_dir or (lambda: None)
        self.frozen_a_seed = frozen_a_seed or (lambda: None)
        # Called with each learner's pid right after it starts (its own cgroup: agent.ops.cgroup).
        self.on_spawn = on_spawn
        self._offer: tuple[Path, str, str] | None = None  # (dir, version, origin) to evaluate next
        # A new base model waiting for its first adapter: (bundle dir, called with the outcome).
        self._bundle_job: tuple[Path, Callable[[BundleRoundOutcome], None]] | None = None
        self._proc: Any = None
        self._spec: RoundSpec | None = None
        self._origin = "local"
        self._manual = False
        self._last_round_end = 0.0
        self._last_refresh_end = 0.0
        self._last_refusal: str | None = None
        self._last_schedule_key: str | None = None
        self.counters = {
            "rounds": 0,
            "promoted": 0,
            "rejected": 0,
            "failed": 0,
            "cancelled": 0,
            "rollbacks": 0,
            # Fast-learner refreshes between rounds (not counted in the round counters above).
            "refreshes": 0,
            "refreshes_promoted": 0,
            "refreshes_failed": 0,
        }
        with self._db() as con:
            con.executescript(REGISTRY_SCHEMA)
            columns = {r["name"] for r in con.execute("PRAGMA table_info(adapter_versions)")}
            if "origin" not in columns:  # a registry from before federation
                con.execute("ALTER TABLE adapter_versions ADD COLUMN origin TEXT NOT NULL DEFAULT 'local'")
        self._pause_file = self.work_dir / "pause"
        self._cancel_file = self.work_dir / "cancel"
        self._pause_file.unlink(missing_ok=True)
        self._cancel_file.unlink(missing_ok=True)

    # ---- registry ---------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        return con

    def _state(self, key: str, default: str | None = None) -> str | None:
        with self._db() as con:
            row = con.execute("SELECT value FROM learner_state WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def _set_state(self, con: sqlite3.Connection, key: str, value: str) -> None:
        con.execute(
            "INSERT INTO learner_state(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def versions(self) -> list[dict[str, Any]]:
        with self._db() as con:
            rows = con.execute("SELECT * FROM adapter_versions ORDER BY created_at DESC").fetchall()
        return [dict(r) for r in rows]

    def active_version(self) -> str | None:
        return self._state("active")

    def version_info(self, version: str | None) -> dict[str, Any] | None:
        """The registry row of ``version`` (None for the base or an unknown version)."""
        if version is None:
            return None
        with self._db() as con:
            row = con.execute("SELECT * FROM adapter_versions WHERE version = ?", (version,)).fetchone()
        return dict(row) if row else None

    def lora_version(self, version: str | None) -> str | None:
        """The version whose LoRA weights ``version`` serves: itself, or for a fast-learner refresh
        the round it refreshed (federation uploads each LoRA once, whatever refreshed it since)."""
        info = self.version_info(version)
        if info is None or not info.get("metrics"):
            return version
        try:
            return json.loads(info["metrics"]).get("lora_of") or version
        except (ValueError, AttributeError):
            return version

    def restore_active(self) -> str | None:
        """After a restart: activate the promoted adapter recorded in SQLite if its files are
        intact; if they are not (a corrupt or missing file), the newest earlier version that is,
        recorded as such; the base when none is."""
        version = self.active_version()
        if version is None:
            return None
        try:
            self.engine.activate_adapter(self.adapters_dir / version)
            return version
        except (AdapterError, OSError) as e:
            log.error("recorded active adapter %s cannot be activated: %s", version, e)
            broken = f"files failed their check at start: {e}"
        with self._db() as con:
            rows = con.execute(
                "SELECT version FROM adapter_versions WHERE status IN ('retired', 'rolled_back') AND version != ?"
                " ORDER BY promoted_at DESC",
                (version,),
            ).fetchall()
        for row in rows:
            try:
                self.engine.activate_adapter(self.adapters_dir / row["version"])
            except (AdapterError, OSError) as e:
                log.warning("earlier adapter %s cannot be activated either: %s", row["version"], e)
                continue
            self._record_fallback(version, row["version"], broken)
            return row["version"]
        self._record_fallback(version, None, broken)
        return None

    def _record_fallback(self, broken: str, target: str | None, reason: str) -> None:
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute(
                "UPDATE adapter_versions SET status='rolled_back', reason=? WHERE version=?", (reason, broken)
            )
            if target is None:
                con.execute("DELETE FROM learner_state WHERE key='active'")
            else:
                con.execute("UPDATE adapter_versions SET status='promoted' WHERE version=?", (target,))
                self._set_state(con, "active", target)
            con.execute("COMMIT")
        self.counters["rollbacks"] += 1
        log.error("serving %s instead of the broken adapter %s", target or "the base", broken)
        self.publish("rollback", {"from": broken, "to": target or "base", "reason": reason})

    # ---- the periodic step ---------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Called from the daemon's main loop every second or so."""
        now = now if now is not None else time.time()
        if self._proc is not None:
            self._update_pause()
            if not self._proc.is_alive():
                self._finish_round()
            return
        if self._offer is not None:
            # An offered candidate (the fleet's global) is judged before any new training, and
            # whether or not this box trains itself.
            self._start_round("offered", evaluate=self._offer)
            self._offer = None
            return
        if self._bundle_job is not None:
            self._start_round("new base model", bundle=self._bundle_job[0])
            return
        if not self.settings.enabled and not self._manual:
            return
        self._check_rollback()
        reason = self._training_reason(now)
        if (
            reason is not None
            and not self._manual
            and now - self._last_round_end < self.settings.min_interval_s
        ):
            reason = None
        refresh = None if reason is not None else self._refresh_reason(now)
        if reason is None and refresh is None:
            return
        refusal = policy.resource_refusal(self._resources(), self.settings.limits)
        if refusal and not self._manual:
            if refusal != self._last_refusal:
                log.info("learner waits: %s", refusal)
                self._last_refusal = refusal
            return
        if reason is not None:
            self._start_round(reason)
        elif refresh is not None:
            self._start_refresh(refresh)

    def train_now(self) -> dict[str, Any]:
        if self._proc is not None:
            return {
                "ok": False,
                "error": f"round {self._spec.version if self._spec else '?'} already running",
            }
        self._manual = True
        self.tick()
        self._manual = False
        return {
            "ok": self._proc is not None,
            "version": self._spec.version if self._spec else None,
            "error": None if self._proc is not None else "no new labeled samples",
        }

    def offer_candidate(self, adapter_dir: Path, version: str, origin: str = "fleet") -> bool:
        """Judge an adapter trained elsewhere with the same gate as a local candidate, at the next
        tick with no round running (a newer offer replaces one not yet started). False when that
        version is already in the registry."""
        if self.version_info(version) is not None:
            return False
        self._offer = (Path(adapter_dir), version, origin)
        return True

    def train_for_bundle(self, bundle_dir: Path, on_done: Callable[[BundleRoundOutcome], None]) -> None:
        """Train a first adapter for a new base model from every stored sample, at the next tick with
        no round running, and judge it (on the new bundle) against the serving bundle and adapter
        with the usual gate. ``on_done`` gets the outcome; nothing is promoted here: switching
        the base is the caller's (``adopt_bundle``)."""
        self._bundle_job = (Path(bundle_dir), on_done)

    def adopt_bundle(self, bundle_dir: Path, outcome: BundleRoundOutcome) -> None:
        """The box now serves ``bundle_dir`` with the outcome's adapter: register it as the active
        version (its lineage starts here), train on this bundle from now on."""
        now = time.time()
        final_dir = self.adapters_dir / outcome.version
        if outcome.candidate_dir != final_dir:
            os.replace(outcome.candidate_dir, final_dir)
        active = self.active_version()
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute(
                "INSERT INTO adapter_versions(version, parent, path, status, reason, metrics, data_from_id, data_to_id,"
                " n_new, n_replay, created_at, promoted_at, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    outcome.version,
                    active,
                    str(final_dir),
                    "promoted",
                    f"first adapter of base {outcome.base_hash[:12]}",
                    json.dumps(outcome.metrics),
                    0,
                    outcome.max_sample_id,
                    outcome.n_new,
                    0,
                    now,
                    now,
                    "bundle",
                ),
            )
            if active is not None:
                con.execute(
                    "UPDATE adapter_versions SET status='retired' WHERE version=? AND status='promoted'",
                    (active,),
                )
            self._set_state(con, "active", outcome.version)
            self._set_state(con, "promoted_at", str(now))
            self._set_state(con, "trained_through_id", str(max(self._since_id(), outcome.max_sample_id)))
            con.execute("COMMIT")
        self.bundle_dir = Path(bundle_dir)
        log.info("adapter %s promoted with the new base %s", outcome.version, bundle_dir)

    def adopt_base_only(self, bundle_dir: Path) -> None:
        """The box serves ``bundle_dir`` without an adapter (``sync.bundle_policy`` switch_now)."""
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            active = self.active_version()
            if active is not None:
                con.execute("UPDATE adapter_versions SET status='retired' WHERE version=?", (active,))
            con.execute("DELETE FROM learner_state WHERE key='active'")
            con.execute("COMMIT")
        self.bundle_dir = Path(bundle_dir)

    def rollback_bundle(self, bundle_dir: Path, version: str | None) -> None:
        """Back on an earlier base with the adapter it served (``cmd`` ``rollback_model``)."""
        current = self.active_version()
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            if current is not None:
                con.execute(
                    "UPDATE adapter_versions SET status='rolled_back', reason='model rolled back' WHERE version=?",
                    (current,),
                )
            if version is None:
                con.execute("DELETE FROM learner_state WHERE key='active'")
            else:
                con.execute("UPDATE adapter_versions SET status='promoted' WHERE version=?", (version,))
                self._set_state(con, "active", version)
            self._set_state(con, "promoted_at", str(time.time()))
            con.execute("COMMIT")
        self.bundle_dir = Path(bundle_dir)
        self.counters["rollbacks"] += 1
        self.publish("rollback", {"from": current, "to": version or "base", "reason": "model rolled back"})

    def cancel(self) -> dict[str, Any]:
        if self._proc is None:
            return {"ok": False, "error": "no round running"}
        self._cancel_file.touch()
        return {"ok": True, "version": self._spec.version if self._spec else None}

    def rollback(self, version: str | None = None, reason: str = "command") -> dict[str, Any]:
        """Activate ``version`` (default: the active adapter's parent, or the base when it has none)."""
        active = self.active_version()
        if active is None and version is None:
            return {"ok": False, "error": "no promoted adapter to roll back from; name a version to activate"}
        with self._db() as con:
            if version is None:
                row = con.execute(
                    "SELECT parent FROM adapter_versions WHERE version = ?", (active,)
                ).fetchone()
                target = row["parent"] if row else None
            else:
                row = con.execute(
                    "SELECT version FROM adapter_versions WHERE version = ?", (version,)
                ).fetchone()
                if row is None and version != "base":
                    return {"ok": False, "error": f"unknown adapter version {version!r}"}
                target = None if version == "base" else version
        try:
            if target is None:
                self.engine.deactivate_adapter()
            else:
                self.engine.activate_adapter(self.adapters_dir / target)
        except (AdapterError, OSError) as e:
            return {"ok": False, "error": f"cannot activate {target}: {e}"}
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            if active is not None:
                con.execute(
                    "UPDATE adapter_versions SET status='rolled_back', reason=? WHERE version=?",
                    (reason, active),
                )
            if target is not None:
                con.execute(
                    "UPDATE adapter_versions SET status='promoted', promoted_at=? WHERE version=?",
                    (time.time(), target),
                )
                self._set_state(con, "active", target)
            else:
                con.execute("DELETE FROM learner_state WHERE key='active'")
            self._set_state(con, "promoted_at", str(time.time()))
            con.execute("COMMIT")
        self.counters["rollbacks"] += 1
        log.warning("rolled back from %s to %s (%s)", active, target or "base", reason)
        self.publish("rollback", {"from": active, "to": target or "base", "reason": reason})
        return {"ok": True, "from": active, "to": target or "base"}

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active_version(),
            "serving_model": getattr(self.engine, "serving_model", "transformer"),
            "running": self._spec.version if self._proc is not None and self._spec else None,
            "last_refusal": self._last_refusal,
            **self.counters,
        }

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel a running round and wait for the child; the active adapter is untouched."""
        if self._proc is None:
            return
        self._cancel_file.touch()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None
        self._cancel_file.unlink(missing_ok=True)

    # ---- internals ----------------------------------------------------------------------------
    def _since_id(self) -> int:
        """Newest sample id a round has seen, promoted or not: the trigger counts samples after it,
        so a refused candidate does not re-trigger on the same data at once."""
        return int(self._state("trained_through_id", "0") or 0)

    def _active_data_through_id(self) -> int:
        """Newest sample id the active adapter learned from (0 for the base). A round trains on,
        and the gate's "recent" slice is, everything after it: data of a refused round is not
        dropped but learned again with the next round's, with more evidence (measured by the
        learning benchmark: refused early rounds otherwise lose the first drifted samples)."""
        active = self.active_version()
        if active is None:
            return 0
        with self._db() as con:
            row = con.execute("SELECT data_to_id FROM adapter_versions WHERE version=?", (active,)).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _training_reason(self, now: float) -> str | None:
        since = self._since_id()
        with self._db() as con:
            new = con.execute(
                "SELECT COUNT(*) FROM samples WHERE split='train' AND id > ?", (since,)
            ).fetchone()[0]
        acc, n_fb = self._live_accuracy(self.active_version())
        accepted = self._promoted_accuracy(self.lora_version(self.active_version()))
        inputs = policy.TriggerInputs(
            new_samples=new,
            feedback_accuracy=acc,
            feedback_count=n_fb,
            accepted_accuracy=accepted,
            label_psi=self._label_psi() if self.settings.triggers.drift_enabled else None,
            scheduled_due=self._schedule_due(now),
            manual=self._manual,
        )
        return policy.training_reason(inputs, self.settings.triggers)

    def _schedule_due(self, now: float) -> bool:
        if not self.settings.schedule:
            return False
        t = time.gmtime(now)
        key = f"{t.tm_year}-{t.tm_yday}-{t.tm_hour:02d}:{t.tm_min:02d}"
        if f"{t.tm_hour:02d}:{t.tm_min:02d}" in self.settings.schedule and key != self._last_schedule_key:
            self._last_schedule_key = key
            return True
        return False

    def _family(self, version: str | None) -> list[str | None]:
        """``version`` and every fast-learner refresh of its LoRA weights: one unit for the live
        accuracy and rollback (a refresh every 50 samples would otherwise restart the feedback
        window before it could ever hold ``min_feedback`` answers)."""
        lora = self.lora_version(version)
        if lora is None:
            return [None]
        with self._db() as con:
            rows = con.execute(
                "SELECT version FROM adapter_versions WHERE version = ? OR json_extract(metrics, '$.lora_of') = ?",
                (lora, lora),
            ).fetchall()
        return sorted({lora, *(r["version"] for r in rows)})

    def _live_accuracy(self, version: str | None, window: int = 500) -> tuple[float | None, int]:
        """Accuracy of live predictions by ``version``'s family (its LoRA and the refreshes of it)
        that received feedback since its round was promoted (latest ``window``)."""
        promoted_at = float(self._state("promoted_at", "0") or 0)
        family = self._family(version)
        named = [v for v in family if v is not None]
        where = (
            "p.adapter_version IS NULL"
            if not named
            else f"p.adapter_version IN ({','.join('?' * len(named))})"
        )
        with self._db() as con:
            rows = con.execute(
                "SELECT p.label = f.label AS ok FROM feedback f JOIN predictions p ON p.id = f.prediction_id "
                f"WHERE {where} AND f.received_at >= ? ORDER BY f.id DESC LIMIT ?",
                (*named, promoted_at, window),
            ).fetchall()
        if not rows:
            return None, 0
        return sum(r["ok"] for r in rows) / len(rows), len(rows)

    def _promoted_accuracy(self, version: str | None) -> float | None:
        if version is None:
            return None
        with self._db() as con:
            row = con.execute("SELECT metrics FROM adapter_versions WHERE version=?", (version,)).fetchone()
        if row is None or not row["metrics"]:
            return None
        return json.loads(row["metrics"]).get("candidate", {}).get("all", {}).get("accuracy")

    def _label_psi(self, window: int = 1000) -> float | None:
        with self._db() as con:
            rows = con.execute(
                "SELECT label FROM predictions ORDER BY created_at DESC LIMIT ?", (2 * window,)
            ).fetchall()
        if len(rows) < 2 * min(window, 100):
            return None
        half = len(rows) // 2
        recent: dict[str, int] = {}
        ref: dict[str, int] = {}
        for i, r in enumerate(rows):
            bucket = recent if i < half else ref
            bucket[r["label"]] = bucket.get(r["label"], 0) + 1
        return policy.population_stability_index(ref, recent)

    def _check_rollback(self) -> None:
        active = self.active_version()
        if active is None:
            return
        acc, n = self._live_accuracy(active)
        lora = self.lora_version(active)
        reason = policy.rollback_reason(acc, n, self._promoted_accuracy(lora), self.settings.rollback)
        if reason:
            # Behind the LoRA the family came with, not to a sibling refresh of the same weights.
            parent = (self.version_info(lora) or {}).get("parent")
            self.rollback(parent or "base", reason=f"auto: {reason}")

    def _resources(self) -> policy.Resources:
        temps: list[float] = []
        try:
            for entries in (psutil.sensors_temperatures() or {}).values():
                temps += [e.current for e in entries if e.current]
        except (AttributeError, OSError):
            pass
        stats = self.engine.stats()
        return policy.Resources(
            cpu_percent=psutil.cpu_percent(interval=None),
            free_memory_mb=psutil.virtual_memory().available / 2**20,
            max_temperature_c=max(temps) if temps else None,
            inference_p99_ms=float(stats.get("p99_ms", 0.0)),
            inference_queue=int(stats.get("queue_depth", 0)),
        )

    def _update_pause(self) -> None:
        busy = int(self.engine.stats().get("queue_depth", 0)) > 0
        if busy:
            self._pause_file.touch()
        else:
            self._pause_file.unlink(missing_ok=True)

    def _refresh_reason(self, now: float) -> str | None:
        """Why the active unit's fast learner is refit now, or None: enough new train samples since
        the last fit (a round's or a refresh's), the interval passed, and a unit with a linear
        model to refresh (the first round makes one)."""
        s = self.settings
        if not s.linear or s.linear_refresh_samples <= 0:
            return None
        if now - self._last_refresh_end < s.linear_refresh_interval_s:
            return None
        active = self.active_version()
        if active is None or not (self.adapters_dir / active / LINEAR_CONFIG).exists():
            return None
        since = int(self._state("linear_through_id", "0") or 0)
        with self._db() as con:
            new = con.execute(
                "SELECT COUNT(*) FROM samples WHERE split='train' AND id > ?", (since,)
            ).fetchone()[0]
        return f"new_samples:{new}" if new >= s.linear_refresh_samples else None

    def _start_refresh(self, reason: str) -> None:
        """The active unit again with a refit fast learner, judged by the gate like a round's
        candidate (``round.run_linear_refresh``); its registry origin is its parent's, since its
        LoRA weights are."""
        active = self.active_version()
        assert active is not None
        info = self.version_info(active) or {}
        self.counters["refreshes"] += 1
        version = f"v{int(time.time())}-f{self.counters['refreshes']}"
        self._start_round(
            reason,
            evaluate=(self.adapters_dir / active, version, str(info.get("origin") or "local")),
            refresh=True,
        )

    def _start_round(
        self,
        reason: str,
        evaluate: tuple[Path, str, str] | None = None,
        bundle: Path | None = None,
        refresh: bool = False,
    ) -> None:
        """A training round; with ``evaluate`` = (dir, version, origin) an evaluation-only one (with
        ``refresh``, of the active unit with a refit fast learner); with ``bundle`` a first adapter
        for that new base, judged against the serving bundle and adapter."""
        active = self.active_version()
        version = evaluate[1] if evaluate else f"v{int(time.time())}-{self.counters['rounds'] + 1}"
        origin = evaluate[2] if evaluate else ("bundle" if bundle is not None else "local")
        active_dir = str(self.adapters_dir / active) if active else None
        s = self.settings
        frozen_a_seed = self.frozen_a_seed()
        anchor = self.anchor_dir()
        out_dir = self.work_dir / f"candidate-{version}"
        if evaluate is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
            shutil.copytree(evaluate[0], out_dir)
        spec = RoundSpec(
            db_path=str(self.db_path),
            bundle_dir=str(bundle or self.bundle_dir),
            out_dir=str(out_dir),
            result_path=str(self.work_dir / f"result-{version}.json"),
            version=version,
            # A new base starts LoRA afresh (adapters of the old base do not fit it) on all data.
            parent_dir=None if bundle is not None else active_dir,
            anchor_dir=str(anchor) if anchor and bundle is None else None,
            precision=self.engine.precision if self.engine.precision in ("fp32", "int8") else "fp32",
            max_train_samples=s.max_train_samples,
            replay_fraction=s.replay_fraction,
            since_sample_id=0 if bundle is not None else self._active_data_through_id(),
            epochs=s.epochs,
            lr=s.lr if frozen_a_seed is None else s.lr_frozen_a,
            batch_size=s.batch_size,
            anchor_lambda=s.anchor_lambda,
            distill_weight=s.distill_weight,
            time_budget_s=s.time_budget_s,
            threads=s.threads,
            pause_file=str(self._pause_file),
            cancel_file=str(self._cancel_file),
            frozen_a_seed=frozen_a_seed,
            evaluate_only=evaluate is not None,
            active_bundle_dir=str(self.bundle_dir) if bundle is not None else None,
            active_dir=active_dir if bundle is not None else None,
            linear=s.linear,
            linear_refresh=refresh,
        )
        self._cancel_file.unlink(missing_ok=True)
        proc = mp.get_context("spawn").Process(
            target=run_round_process, args=(json.dumps(asdict(spec)),), name=f"learner-{version}", daemon=True
        )
        proc.start()
        if self.on_spawn is not None and proc.pid is not None:
            try:
                self.on_spawn(proc.pid)
            except OSError as e:
                log.warning("learner %s keeps the daemon's cgroup: %s", proc.pid, e)
        self._proc, self._spec, self._manual = proc, spec, False
        # The round shares the box's cores: the engine serves on fewer threads until it ends.
        self.engine.set_background_load(True)
        self._origin = origin
        event = "refresh" if refresh else "round"
        if not refresh:
            self.counters["rounds"] += 1
        log.info("learner %s %s started (%s), parent %s, pid %s", event, version, reason, active, proc.pid)
        self.publish(
            f"{event}_started", {"version": version, "reason": reason, "parent": active, "origin": origin}
        )

    def _finish_round(self) -> None:
        proc, spec = self._proc, self._spec
        assert proc is not None and spec is not None
        proc.join(1)
        self._proc, self._spec = None, None
        self.engine.set_background_load(False)
        refresh = spec.linear_refresh
        event = "refresh" if refresh else "round"
        if refresh:
            self._last_refresh_end = time.time()
        else:
            self._last_round_end = time.time()
        self._pause_file.unlink(missing_ok=True)
        self._cancel_file.unlink(missing_ok=True)
        result_path = Path(spec.result_path)
        candidate_dir = Path(spec.out_dir)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            result = {
                "status": "failed",
                "message": f"learner exited with code {proc.exitcode} and no result",
            }
        result_path.unlink(missing_ok=True)
        status = result.get("status")
        fit_through = (result.get("linear") or {}).get("max_sample_id")
        if fit_through:  # the fast learner saw samples up to here: refreshes count after it
            with self._db() as con:
                self._set_state(con, "linear_through_id", str(int(fit_through)))
        if status != "trained":
            key = {"cancelled": "cancelled", "no_data": "cancelled"}.get(status, "failed")
            if not refresh:
                self.counters[key] += 1
            elif key == "failed":
                self.counters["refreshes_failed"] += 1
            shutil.rmtree(candidate_dir, ignore_errors=True)
            if self._origin == "bundle" and self._bundle_job is not None:
                _, on_done = self._bundle_job
                self._bundle_job = None
                on_done(
                    BundleRoundOutcome(
                        spec.version,
                        False,
                        [f"round {status}: {result.get('message', '')}"],
                        candidate_dir,
                        {},
                        "",
                        0,
                        0,
                    )
                )
            log.warning("learner %s %s: %s %s", event, spec.version, status, result.get("message", ""))
            self.publish(
                f"{event}_finished",
                {"version": spec.version, "status": status, "message": result.get("message")},
            )
            return
        serving = self._choose_serving(result, candidate_dir)
        candidate = {k: report_from_dict(v) for k, v in result["candidate"].items()}
        active = {k: report_from_dict(v) for k, v in result["active"].items()}
        gate_slices = {k: v for k, v in candidate.items() if k in ("older", "recent")}
        decision = policy.promotion_decision(gate_slices, active, self.settings.gate)
        metrics = {
            "candidate": result["candidate"],
            "active": result["active"],
            "serving": serving,
            "steps": result.get("steps"),
            "seconds": result.get("seconds"),
            "peak_rss_mb": result.get("peak_rss_mb"),
        }
        if refresh and spec.parent_dir:
            metrics["lora_of"] = self.lora_version(Path(spec.parent_dir).name)
        if self._origin == "bundle" and self._bundle_job is not None:
            _, on_done = self._bundle_job
            self._bundle_job = None
            outcome = BundleRoundOutcome(
                version=spec.version,
                promote=decision.promote,
                reasons=decision.reasons,
                candidate_dir=candidate_dir,
                metrics=metrics,
                base_hash=load_manifest(Path(spec.bundle_dir)).base_hash,
                max_sample_id=int(result.get("max_sample_id") or 0),
                n_new=int(result.get("n_new") or 0),
            )
            log.info(
                "first adapter %s for the new base: %s %s",
                spec.version,
                "passes" if decision.promote else "refused",
                "; ".join(decision.reasons),
            )
            on_done(outcome)
            self.publish(
                "round_finished",
                {
                    "version": spec.version,
                    "origin": "bundle",
                    "status": "promoted" if decision.promote else "rejected",
                    "reasons": decision.reasons,
                },
            )
            return
        started_on = Path(spec.parent_dir).name if spec.parent_dir else None
        if decision.promote and started_on != self.active_version():
            # A rollback (or another promotion) while it ran: it was judged against what no longer
            # serves, and a refresh or a round continued from the rolled-back unit must not return it.
            decision = policy.GateDecision(
                False, [f"the active adapter changed from {started_on or 'base'} while it ran"]
            )
        decision = self._register(spec, result, decision, metrics, candidate_dir)
        self.publish(
            f"{event}_finished",
            {
                "version": spec.version,
                "origin": self._origin,
                "status": "promoted" if decision.promote else "rejected",
                "reasons": decision.reasons,
                "candidate_accuracy": candidate.get("all", policy.EvalReport(0, {}, 0)).accuracy,
                "active_accuracy": active.get("all", policy.EvalReport(0, {}, 0)).accuracy,
                # What the two figures are: "accuracy", or "entity_f1" for an entity model.
                "metric": result.get("metric", "accuracy"),
                "serving_model": serving["model"],
            },
        )

    def _choose_serving(self, result: dict[str, Any], candidate_dir: Path) -> dict[str, Any]:
        """The gate's choice among the candidate's transformer, linear and combined models, written
        into its directory (``serving.json``) so it swaps and rolls back with it; the chosen model's
        reports become the candidate's for the promotion gate."""
        models = result.get("candidate_models") or {}
        if not models:
            return {"model": "transformer", "reasons": ["no linear model"], "all": {}}
        reports = {m: {k: report_from_dict(v) for k, v in r.items()} for m, r in models.items()}
        choice = policy.serving_choice(reports, self.settings.gate)
        write_serving(candidate_dir, choice.model, choice.reasons)
        result["candidate"] = models[choice.model]
        log.info("candidate %s serves %s: %s", result.get("version"), choice.model, "; ".join(choice.reasons))
        return {
            "model": choice.model,
            "reasons": choice.reasons,
            "all": {m: r.get("all", {}).get("accuracy") for m, r in models.items()},
            "linear": result.get("linear") or {},
        }

    def _register(
        self,
        spec: RoundSpec,
        result: dict[str, Any],
        decision: policy.GateDecision,
        metrics: dict[str, Any],
        candidate_dir: Path,
    ) -> policy.GateDecision:
        now = time.time()
        final_dir = self.adapters_dir / spec.version
        parent = Path(spec.parent_dir).name if spec.parent_dir else None
        if decision.promote:
            os.replace(candidate_dir, final_dir)
            try:
                self.engine.activate_adapter(final_dir)
            except AdapterError as e:
                decision = policy.GateDecision(False, [f"activation failed: {e}"])
        status = "promoted" if decision.promote else "rejected"
        seen = max(self._since_id(), int(result.get("max_sample_id") or 0))
        # An adapter not trained here stands, in the box's data lineage, where the active one did:
        # the next local round trains on what came after it.
        data_to = spec.since_sample_id if spec.evaluate_only else result.get("max_sample_id")
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute(
                "INSERT INTO adapter_versions(version, parent, path, status, reason, metrics, data_from_id, data_to_id,"
                " n_new, n_replay, created_at, promoted_at, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    spec.version,
                    parent,
                    str(final_dir),
                    status,
                    "; ".join(decision.reasons) or None,
                    json.dumps(metrics),
                    spec.since_sample_id,
                    data_to,
                    result.get("n_new"),
                    result.get("n_replay"),
                    now,
                    now if decision.promote else None,
                    self._origin,
                ),
            )
            # Samples seen by this round count as trained, promoted or not: a refused candidate
            # must not re-trigger on the same data forever.
            self._set_state(con, "trained_through_id", str(seen))
            if decision.promote:
                if parent:
                    con.execute(
                        "UPDATE adapter_versions SET status='retired' WHERE version=? AND status='promoted'",
                        (parent,),
                    )
                self._set_state(con, "active", spec.version)
                if not spec.linear_refresh:  # the family's feedback window runs on (_family)
                    self._set_state(con, "promoted_at", str(now))
            con.execute("COMMIT")
        if decision.promote:
            self.counters["refreshes_promoted" if spec.linear_refresh else "promoted"] += 1
            log.info("adapter %s promoted (parent %s)", spec.version, parent)
            self._prune()
        else:
            if not spec.linear_refresh:
                self.counters["rejected"] += 1
            shutil.rmtree(candidate_dir, ignore_errors=True)
            if final_dir.exists() and not decision.promote:
                shutil.rmtree(final_dir, ignore_errors=True)
            log.warning("adapter %s rejected by the gate: %s", spec.version, "; ".join(decision.reasons))
        return decision

    def _prune(self) -> None:
        """Bounded history: keep the newest ``keep_versions`` retired or rolled-back rounds on disk,
        and as many fast-learner refreshes apart (they come every few dozen samples: counted with
        the rounds they would leave a rollback minutes deep instead of rounds deep)."""
        active = self.active_version()
        with self._db() as con:
            rows = con.execute(
                "SELECT version, path, json_extract(metrics, '$.lora_of') IS NOT NULL AS refresh"
                " FROM adapter_versions WHERE status IN ('retired','rolled_back') ORDER BY created_at DESC"
            ).fetchall()
        for kind in (0, 1):
            for row in [r for r in rows if r["refresh"] == kind][self.settings.keep_versions :]:
                if row["version"] != active:
                    shutil.rmtree(row["path"], ignore_errors=True)
