"""A new base model from headquarters: fetched, verified, tried, switched to, reversible.

Headquarters publishes a signed ``BundleRelease`` (retained on ``fed/{fleet}/bundle``): the file
list of a bundle with sizes and sha256, its base hash and labels, the lowest agent version that
can serve it, and who takes it now (``rollout``: a canary group or a share of the fleet first,
then all; or halted). A box in the release's stage, on a newer release than the one it serves:

1. **fetches** the files into ``data_dir/bundles/.staging-{hash}`` within ``fleet.max_bundle_bytes``
   (and the disk's free space), asking for the chunks it lacks on ``bundle/req/{device}`` and
   writing each one at its offset; what is on disk is recorded in SQLite once fsynced, so a
   download killed at any point resumes with what is missing;
2. **verifies** every file's size and sha256, the release's signature (the same keys as globals)
   and that the bundle's own manifest names the released base hash and labels;
3. **tries** it: opens an engine on it (the precision trial on the box's own holdout texts) and
   answers the holdout with it;
4. under ``sync.bundle_policy``: ``train_first`` (default) trains a first adapter for the new base
   from every stored sample and switches only when the new bundle with it passes the learner's
   gate against the serving bundle and adapter; ``switch_now`` switches at once (the new base
   serves without an adapter until one is learned);
5. **switches** the engine between two requests (in-flight ones finish on the old one; none
   fails), keeps the previous bundle and adapter for ``cmd`` ``rollback_model``, and reports each
   step on ``bundle/report/{device}`` (and the box's ``sync`` events, status, telemetry).

A bad, partial or refused release never replaces the running bundle; an adapter trained on the
old base is never applied to the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import __version__
from agent.bundle import check_bundle, load_manifest
from agent.fed.protocol import (
    BundleFile,
    BundleRelease,
    BundleReport,
    BundleRequest,
    ProtocolError,
    parse_json,
)
from agent.fed.signing import SignatureError, verify_manifest
from agent.fed.topics import FleetTopics
from agent.fed.wire import WireError, canonical_json, parse_chunk
from agent.health import Counters, LogThrottle

log = logging.getLogger(__name__)

WINDOW = 64  # chunks asked for and not yet here, per box
REASK_S = 10.0  # a chunk asked for this long ago and not here is asked for again
FLUSH_EVERY_S = 1.0
MAX_FAILURES = 30
MAX_FILE_BYTES = 2**34  # one file of a bundle (the quota bounds the whole)
MAX_FILE_CHUNKS = 2**20


def bundle_hash(files: list[BundleFile]) -> str:
    """The release's identity: sha256 over its canonical file list (paths, sizes, hashes)."""
    listing = [f.model_dump() for f in sorted(files, key=lambda f: f.path)]
    return hashlib.sha256(canonical_json(listing)).hexdigest()


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def in_stage(release: BundleRelease, device: str) -> bool:
    """Whether ``device`` takes ``release`` now: every box once it is rolled out to all; in the
    canary stage the named canaries and a stable share of the fleet by device hash."""
    r = release.rollout
    if r.stage == "all":
        return True
    if r.stage == "halted":
        return False
    if device in r.canary:
        return True
    digest = hashlib.sha256(f"{release.bundle_hash}/{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0 < r.percent


class BundleUpdater:
    def __init__(
        self,
        *,
        boot: Any,
        store: Any,
        transport: Any,
        live: Any,
        engine: Any,  # agent.daemon.serving.SwitchableEngine
        learner: Any,
        counters: Counters,
        keys: dict,
        open_engine: Any,  # (bundle_dir, calibration_texts, adapter_dir) -> an open InferenceEngine
        on_switched: Any,  # (bundle_dir) -> None: the rest of the daemon follows the new base
        event: Any,  # (event, **body) -> None: the box's sync events
    ):
        assert boot.fleet is not None
        self.fleet = boot.fleet
        self.device = boot.device
        self.topics = FleetTopics(self.fleet.id)
        self.store, self.transport, self.live, self.engine, self.learner = (
            store,
            transport,
            live,
            engine,
            learner,
        )
        self.counters, self.keys = counters, keys
        self.open_engine, self.on_switched, self.event = open_engine, on_switched, event
        self.root = boot.data_dir / "bundles"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._throttle = LogThrottle()
        self._release: BundleRelease | None = None  # the one being fetched, tried or trained for
        self._state = "idle"  # idle | fetching | trying | training | switching
        self._asked: dict[tuple[str, int], float] = {}
        self._written: list[tuple[str, int]] = []  # written, not yet fsynced and recorded
        self._open_files: dict[str, int] = {}
        self._have: dict[str, set[int]] = {}
        self._done_files: set[str] = set()
        self._last_flush = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-trial")
        self._trial: Future | None = None
        self._waiting_engine: Any = None  # tried, waiting for its first adapter
        # A transfer that keeps going wrong (chunks that disagree with the release, files whose
        # sha256 never matches) is given up after these many failures: tampered or truncated at
        # the source, it would never complete.
        self._failures = 0
        self._last_bad = ""
        saved = store.sync_state("bundle.work")
        if saved:
            try:
                self._take(BundleRelease.model_validate_json(saved), resumed=True)
            except ValueError:
                log.warning("stored bundle release no longer validates; waiting for the broker's")

    # ---- what is served -------------------------------------------------------------------------
    def active_release(self) -> int:
        return int(self.store.sync_state("bundle.release") or 0)

    def refused(self, bundle_hash: str) -> str | None:
        return self.store.sync_state(f"bundle.refused.{bundle_hash}")

    def staging_dir(self, r: BundleRelease) -> Path:
        return self.root / f".staging-{r.bundle_hash[:16]}"

    def final_dir(self, r: BundleRelease) -> Path:
        return self.root / r.bundle_hash[:16]

    # ---- paho's thread ---------------------------------------------------------------------------
    def on_release(self, payload: bytes) -> None:
        if self.live().sync.bundle_policy == "never":
            return
        try:
            r = parse_json(payload, BundleRelease)
            verify_manifest(json.loads(payload), self.keys)
        except (ProtocolError, SignatureError) as e:
            self._refuse(None, e.code, f"bundle release refused: {e}")
            return
        problem = self._problem(r)
        if problem is not None:
            if problem[0] not in ("current", "not_in_stage", "older"):
                self._refuse(r, *problem)
            elif (
                problem[0] == "not_in_stage"
                and self._release is not None
                and self._release.bundle_hash == r.bundle_hash
            ):
                self._abandon(
                    f"rollout {r.rollout.stage}: {r.rollout.reason or 'this box is not in its stage'}"
                )
            return
        with self._lock:
            if self._release is not None and self._release.bundle_hash == r.bundle_hash:
                self._release = r  # a new stage of the same release
                return
        self._take(r)

    def _problem(self, r: BundleRelease) -> tuple[str, str] | None:
        if r.fleet != self.fleet.id:
            return "wrong_fleet", f"release for fleet {r.fleet}"
        if bundle_hash(r.files) != r.bundle_hash:
            return "bad_listing", "bundle_hash does not match the file list"
        if r.bundle_hash[:16] == self.serving_hash():
            return "current", "serving it"
        if r.release <= self.active_release():
            return "older", f"release {r.release} is not newer than {self.active_release()}"
        if self.refused(r.bundle_hash):
            return "refused_before", f"refused before: {self.refused(r.bundle_hash)}"
        if version_tuple(r.min_agent_version) > version_tuple(__version__):
            return "agent_too_old", f"needs agent {r.min_agent_version}, this is {__version__}"
        size = sum(f.size for f in r.files)
        if size > self.fleet.max_bundle_bytes:
            return "over_quota", f"{size} bytes > fleet.max_bundle_bytes {self.fleet.max_bundle_bytes}"
        if shutil.disk_usage(self.root).free < size + 64 * 2**20:
            return "disk_full", f"{size} bytes do not fit the free disk space"
        if not in_stage(r, self.device):
            return "not_in_stage", f"rollout stage {r.rollout.stage}"
        return None

    def serving_hash(self) -> str:
        return Path(self.engine.bundle_dir).name

    def on_data(self, payload: bytes) -> None:
        try:
            c = parse_chunk(payload, max_size=MAX_FILE_BYTES, max_chunks=MAX_FILE_CHUNKS)
        except WireError as e:
            self._refuse(self._release, e.code, f"bundle chunk refused: {e}")
            return
        r = self._release
        path = str(c.meta.get("path", ""))
        if r is None or self._state != "fetching" or c.blob != f"{r.bundle_hash}:{path}":
            return  # a chunk of a release no longer wanted
        spec = next((f for f in r.files if f.path == path), None)
        if (
            spec is None
            or c.size != spec.size
            or c.sha256 != spec.sha256
            or c.count != _chunks(spec, r.chunk_bytes)
        ):
            self._bad_chunk(f"chunk of {path} disagrees with the signed release")
            return
        if len(c.data) != min(r.chunk_bytes, spec.size - c.index * r.chunk_bytes):
            self._bad_chunk(f"chunk {c.index} of {path}: {len(c.data)} bytes")
            return
        with self._lock:
            fd = self._open_files.get(path)
            if fd is None:
                target = self.staging_dir(r) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = self._open_files[path] = os.open(target, os.O_RDWR | os.O_CREAT, 0o640)
            os.pwrite(fd, c.data, c.index * r.chunk_bytes)
            self._written.append((path, c.index))
            self._have.setdefault(path, set()).add(c.index)
            self._asked.pop((path, c.index), None)

    # ---- control thread ------------------------------------------------------------------------
    def tick(self) -> None:
        r = self._release
        if r is None or not self.live().sync.enabled:
            return
        if self._state == "fetching":
            if self._failures >= MAX_FAILURES:
                # Given up here, on the control thread, not in the MQTT callback that counted them.
                self._fail(r, "bad_transfer", self._last_bad or "too many bad chunks")
                return
            self._flush()
            self._verify_complete_files(r)
            if len(self._done_files) == len(r.files):
                self._fetched(r)
            else:
                self._ask(r)
        elif self._state == "trying" and self._trial is not None and self._trial.done():
            self._tried(r)

    def _take(self, r: BundleRelease, resumed: bool = False) -> None:
        with self._lock:
            self._release, self._state, self._failures = r, "fetching", 0
            self._asked.clear()
            self._have = {f.path: set() for f in r.files}
            for path, idx in self.store.db.conn.execute(
                "SELECT path, idx FROM bundle_chunks WHERE bundle_hash = ?", (r.bundle_hash,)
            ).fetchall():
                self._have.setdefault(path, set()).add(idx)
            self._done_files = set()
        self.store.set_sync_state("bundle.work", r.model_dump_json())
        have = sum(len(v) for v in self._have.values())
        total = sum(_chunks(f, r.chunk_bytes) for f in r.files)
        log.info(
            "bundle release %d (%s): %s, %d of %d chunks here",
            r.release,
            r.name,
            "resumed" if resumed else "fetching",
            have,
            total,
        )
        self._report(r, "downloading", progress={"chunks": have, "of": total})

    def _ask(self, r: BundleRelease) -> None:
        if not self.transport.connected:
            return
        now = time.monotonic()
        outstanding = sum(1 for t in self._asked.values() if now - t < REASK_S)
        budget = WINDOW - outstanding
        for f in r.files:
            if budget <= 0:
                break
            missing = [
                i
                for i in range(_chunks(f, r.chunk_bytes))
                if i not in self._have.get(f.path, set())
                and now - self._asked.get((f.path, i), -1e9) >= REASK_S
            ][: min(budget, 256)]
            if not missing:
                continue
            req = BundleRequest(bundle_hash=r.bundle_hash, path=f.path, chunks=missing)
            self.transport.publish(self.topics.bundle_request(self.device), req.model_dump())
            for i in missing:
                self._asked[(f.path, i)] = now
            budget -= len(missing)

    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_flush < FLUSH_EVERY_S:
            return
        self._last_flush = time.monotonic()
        r = self._release
        with self._lock:
            written, self._written = self._written, []
            fds = list(self._open_files.values())
        if not written or r is None:
            return
        for fd in fds:
            os.fsync(fd)  # on disk first, then recorded: a crash never records a chunk it lost
        with self.store.db.atomic() as db:
            db.conn.executemany(
                "INSERT OR IGNORE INTO bundle_chunks (bundle_hash, path, idx) VALUES (?, ?, ?)",
                [(r.bundle_hash, p, i) for p, i in written],
            )

    def _verify_complete_files(self, r: BundleRelease) -> None:
        for f in r.files:
            if f.path in self._done_files or len(self._have.get(f.path, ())) < _chunks(f, r.chunk_bytes):
                continue
            target = self.staging_dir(r) / f.path
            with self._lock:
                fd = self._open_files.pop(f.path, None)
            if fd is not None:
                os.ftruncate(fd, f.size)
                os.fsync(fd)
                os.close(fd)
            elif not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()  # an empty file has no chunks to fetch
            digest = _sha256_file(target)
            if digest != f.sha256 or target.stat().st_size != f.size:
                # A chunk got corrupted on the way or on disk: fetch the file again.
                self._throttle.log(
                    log,
                    logging.WARNING,
                    "bundle_hash",
                    "bundle file %s: sha256 mismatch; fetching it again",
                    f.path,
                )
                self.counters.inc("bundle_refused", "file_hash")
                self._failures += MAX_FAILURES // 3
                if self._failures >= MAX_FAILURES:
                    self._fail(
                        r,
                        "file_hash",
                        f"{f.path}: its bytes never match the signed sha256 (tampered at the source?)",
                    )
                    return
                with self.store.db.atomic() as db:
                    db.execute(
                        "DELETE FROM bundle_chunks WHERE bundle_hash = ? AND path = ?",
                        (r.bundle_hash, f.path),
                    )
                self._have[f.path] = set()
                target.unlink(missing_ok=True)
                continue
            self._done_files.add(f.path)

    def _fetched(self, r: BundleRelease) -> None:
        staging, final = self.staging_dir(r), self.final_dir(r)
        problems = check_bundle(staging)
        m = None if problems else load_manifest(staging)
        if m is not None and (m.base_hash != r.base_hash or list(m.labels) != list(r.labels)):
            problems.append("the bundle's manifest does not name the released base hash and labels")
        if problems:
            self._fail(r, "bad_bundle", "; ".join(problems))
            return
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        with self.store.db.atomic() as db:
            db.execute("DELETE FROM bundle_chunks WHERE bundle_hash = ?", (r.bundle_hash,))
        self._report(r, "verified")
        self._state = "trying"
        texts = self.store.recent_holdout_texts(256)
        self._trial = self._pool.submit(self._try, final, texts)

    def _try(self, bundle_dir: Path, texts: list[str]) -> Any:
        """In the trial thread: open an engine on the new bundle and answer the holdout with it."""
        engine = self.open_engine(bundle_dir, texts or None, None)
        try:
            preds = engine.predict(texts or ["trial"], timeout=600)
            if len(preds) != max(1, len(texts)) or not all(p.label in engine.labels for p in preds):
                raise ValueError("the new bundle's answers do not fit its labels")
        except Exception:
            engine.close()
            raise
        return engine

    def _tried(self, r: BundleRelease) -> None:
        assert self._trial is not None
        try:
            engine = self._trial.result()
        except Exception as e:  # noqa: BLE001 - whatever the trial hit, the old bundle stays
            self._fail(r, "trial_failed", f"{type(e).__name__}: {e}")
            return
        self._trial = None
        self._report(r, "trial", gate={"precision": engine.precision, "provider": engine.provider})
        if self.live().sync.bundle_policy == "switch_now" or self.learner is None:
            self._switch(r, engine, None)
            return
        self._state = "training"
        self._waiting_engine = engine
        self.learner.train_for_bundle(self.final_dir(r), lambda outcome: self._trained(r, outcome))

    def _trained(self, r: BundleRelease, outcome: Any) -> None:
        """The learner judged a first adapter for the new base (on the control thread)."""
        engine, self._waiting_engine = self._waiting_engine, None
        if not outcome.promote:
            engine.close()
            shutil.rmtree(outcome.candidate_dir, ignore_errors=True)
            self._refuse(
                r,
                "gate",
                "new base with its first adapter regresses: " + "; ".join(outcome.reasons),
                metrics=outcome.metrics,
            )
            self._done(r, refused=True)
            return
        try:
            engine.activate_adapter(outcome.candidate_dir)
        except Exception as e:  # noqa: BLE001
            engine.close()
            self._fail(r, "adapter_failed", f"first adapter does not activate on the new base: {e}")
            return
        self._switch(r, engine, outcome)

    def _switch(self, r: BundleRelease, engine: Any, outcome: Any) -> None:
        previous: dict[str, Any] = {
            "dir": str(self.engine.bundle_dir),
            "adapter": self.learner.active_version() if self.learner is not None else None,
            "release": self.active_release(),
        }
        final = self.final_dir(r)
        self.engine.switch(engine, final)
        if self.learner is not None:
            if outcome is not None:
                self.learner.adopt_bundle(final, outcome)
            else:
                self.learner.adopt_base_only(final)
        self.store.set_sync_state("bundle.previous", json.dumps(previous))
        self.store.set_sync_state("bundle.active_dir", str(final))
        self.store.set_sync_state("bundle.active_hash", r.bundle_hash)
        self.store.set_sync_state("bundle.release", str(r.release))
        self.on_switched(final)
        self.counters.inc("bundle", "switched")
        log.info("bundle release %d switched in: %s (base %s)", r.release, r.name, r.base_hash[:12])
        self._report(r, "switched", gate=outcome.metrics if outcome is not None else None)
        self._done(r)
        self._prune(keep={final.name, Path(previous["dir"]).name})

    def rollback(self) -> dict[str, Any]:
        """``cmd`` ``rollback_model``: back to the bundle (and adapter) served before the last switch."""
        saved = self.store.sync_state("bundle.previous")
        if not saved:
            return {"ok": False, "error": "no earlier bundle to go back to"}
        previous = json.loads(saved)
        prev_dir = Path(previous["dir"])
        if check_bundle(prev_dir, verify_hash=False):
            return {"ok": False, "error": f"the earlier bundle {prev_dir} is gone or broken"}
        adapter = previous.get("adapter")
        adapter_dir = self.learner.adapters_dir / adapter if (self.learner is not None and adapter) else None
        engine = self.open_engine(prev_dir, self.store.recent_holdout_texts(256) or None, adapter_dir)
        self.engine.switch(engine, prev_dir)
        if self.learner is not None:
            self.learner.rollback_bundle(prev_dir, adapter)
        active_hash = self.store.sync_state("bundle.active_hash")
        if active_hash:  # not offered again: it was rolled back for a reason
            self.store.set_sync_state(f"bundle.refused.{active_hash}", "rolled back by command")
        self.store.set_sync_state("bundle.active_hash", "")
        self.store.set_sync_state("bundle.active_dir", str(prev_dir))
        self.store.set_sync_state("bundle.release", str(previous.get("release") or 0))
        self.store.set_sync_state("bundle.previous", "")
        self.on_switched(prev_dir)
        self.counters.inc("bundle", "rolled_back")
        self.event("bundle_rolled_back", to=str(prev_dir), adapter=adapter)
        return {"ok": True, "bundle": str(prev_dir), "adapter": adapter}

    def _bad_chunk(self, why: str) -> None:
        """A chunk that cannot be part of the signed file: counted, dropped and asked for again;
        after MAX_FAILURES the control thread gives the release up (tick)."""
        self._failures += 1
        self._last_bad = why
        self.counters.inc("bundle_refused", "bad_chunk")
        self._throttle.log(log, logging.WARNING, "bundle:bad_chunk", "bundle: %s", why)

    # ---- endings ---------------------------------------------------------------------------------
    def _abandon(self, why: str) -> None:
        r = self._release
        if r is None or self._state in ("switching",):
            return
        log.warning("bundle release %d abandoned: %s", r.release, why)
        self._done(r)
        shutil.rmtree(self.staging_dir(r), ignore_errors=True)

    def _fail(self, r: BundleRelease, code: str, why: str) -> None:
        self._refuse(r, code, why)
        self._done(r, refused=True)
        shutil.rmtree(self.staging_dir(r), ignore_errors=True)
        shutil.rmtree(self.final_dir(r), ignore_errors=True)

    def _done(self, r: BundleRelease, refused: bool = False) -> None:
        with self._lock:
            for fd in self._open_files.values():
                os.close(fd)
            self._open_files.clear()
            self._release, self._state, self._trial = None, "idle", None
        self.store.set_sync_state("bundle.work", "")
        if refused:
            self.store.set_sync_state(f"bundle.refused.{r.bundle_hash}", "refused")

    def _prune(self, keep: set[str]) -> None:
        for p in self.root.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _refuse(self, r: BundleRelease | None, code: str, why: str, metrics: dict | None = None) -> None:
        self.counters.inc("bundle_refused", code)
        self._throttle.log(log, logging.WARNING, f"bundle:{code}", "bundle: %s", why)
        self.event("bundle_refused", qos=0, code=code, reason=why, release=r.release if r else None)
        if r is not None:
            self._report(r, "refused" if code == "gate" else "failed", reason=f"{code}: {why}", gate=metrics)

    def _report(
        self, r: BundleRelease, status: str, reason: str | None = None, gate: dict | None = None, **extra: Any
    ) -> None:
        body = BundleReport(
            device=self.device,
            release=r.release,
            bundle_hash=r.bundle_hash,
            status=status,  # type: ignore[arg-type]  # one of the Literal's values, checked by pydantic
            reason=reason,
            gate=gate,
            ts=time.time(),
        ).model_dump()
        if self.transport.connected:
            self.transport.publish(self.topics.bundle_report(self.device), {**body, **extra})
        self.event(f"bundle_{status}", release=r.release, name=r.name, reason=reason, **extra)

    def status(self) -> dict[str, Any]:
        r = self._release
        return {
            "serving": str(self.engine.bundle_dir),
            "release": self.active_release(),
            "work": None
            if r is None
            else {
                "release": r.release,
                "name": r.name,
                "state": self._state,
                "chunks": sum(len(v) for v in self._have.values()),
                "of": sum(_chunks(f, r.chunk_bytes) for f in r.files),
            },
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _chunks(f: BundleFile, chunk_bytes: int) -> int:
    return max(1, -(-f.size // chunk_bytes)) if f.size else 0


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
