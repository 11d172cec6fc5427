"""Headquarters' side of a base-model release: register, serve chunks, stage the rollout.

``edge-agent model publish BUNDLE --config hq.toml [--canary A,B] [--percent P]`` copies the bundle
into the aggregator's data directory and records a signed ``BundleRelease`` in its database; the
leading aggregator worker publishes it (retained, ``fed/{fleet}/bundle``). Any worker answers the
boxes' chunk requests (``bundle/req/{device}``, a shared subscription) from the files on disk, so
a box that reconnects simply asks for what it still lacks. Boxes report each step
(``bundle/report/{device}``). A release starts in its canary stage (named devices and/or a share
of the fleet); once every named canary (or, with a share only, at least one box) has switched
with its gate passed and none refused or failed, the leader republishes it to all; a canary that
refuses it or fails halts the rollout, with the canary's reason in the release.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from agent import __version__
from agent.fed.bundles import bundle_hash
from agent.fed.hq_store import HqStore
from agent.fed.protocol import (
    BundleFile,
    BundleRelease,
    BundleReport,
    BundleRequest,
    ProtocolError,
    Rollout,
    parse_json,
)
from agent.fed.signing import sign_manifest
from agent.fed.topics import FleetTopics
from agent.fed.wire import canonical_json, frame

log = logging.getLogger(__name__)


def list_files(bundle_dir: Path) -> list[BundleFile]:
    """Every file of a bundle directory with its size and sha256 (what a box must end up with)."""
    from agent.bundle import sha256_file

    files = []
    for p in sorted(Path(bundle_dir).rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(bundle_dir).parts):
            files.append(
                BundleFile(
                    path=p.relative_to(bundle_dir).as_posix(), size=p.stat().st_size, sha256=sha256_file(p)
                )
            )
    return files


def register_release(
    store: HqStore,
    data_dir: Path,
    fleet: str,
    bundle_dir: Path,
    key: Any,
    *,
    canary: list[str] | None = None,
    percent: float = 0.0,
    min_agent_version: str = __version__,
    chunk_bytes: int = 256 * 1024,
) -> BundleRelease:
    """Copy ``bundle_dir`` under ``data_dir/bundles/`` and record its signed release (unpublished)."""
    from agent.bundle import check_bundle, load_manifest

    problems = check_bundle(bundle_dir)
    if problems:
        raise ValueError(f"{bundle_dir}: {'; '.join(problems)}")
    m = load_manifest(bundle_dir)
    files = list_files(bundle_dir)
    digest = bundle_hash(files)
    target = Path(data_dir) / "bundles" / digest[:16]
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle_dir, tmp)
        os.replace(tmp, target)
    stage: Literal["canary", "all"] = "canary" if (canary or percent) else "all"
    release = BundleRelease(
        fleet=fleet,
        release=int(store.read("SELECT coalesce(max(release), 0) FROM releases")[0][0]) + 1,
        bundle_hash=digest,
        name=m.name,
        base_hash=m.base_hash,
        labels=list(m.labels),
        min_agent_version=min_agent_version,
        files=files,
        chunk_bytes=chunk_bytes,
        rollout=Rollout(stage=stage, canary=canary or [], percent=percent),
        created=time.time(),
    )
    signed = sign_manifest(release.model_dump(exclude={"key_id", "signature"}), key)
    with store.tx() as conn:
        if conn.execute("SELECT 1 FROM releases WHERE bundle_hash = ?", (digest,)).fetchone():
            raise ValueError(f"bundle {digest[:16]} was released before")
        conn.execute(
            "INSERT INTO releases (release, bundle_hash, dir, manifest, stage, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (release.release, digest, str(target), json.dumps(signed), stage, time.time()),
        )
    log.info("release %d registered: %s (%d files, stage %s)", release.release, m.name, len(files), stage)
    return BundleRelease.model_validate(signed)


class BundleServer:
    def __init__(self, fleet: str, store: HqStore, transport: Any, key: Any, counters: Any):
        self.topics = FleetTopics(fleet)
        self.store, self.transport, self.key, self.counters = store, transport, key, counters

    def subscriptions(self, group: str) -> dict[str, bool]:
        return {
            self.topics.shared(group, "bundle/req/+"): False,
            self.topics.shared(group, "bundle/report/+"): False,
        }

    # ---- paho's thread ---------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> bool:
        """Handles bundle requests and reports; False for any other topic."""
        device = self.topics.device_after("bundle/req", topic)
        if device is not None:
            self._serve(device, payload)
            return True
        device = self.topics.device_after("bundle/report", topic)
        if device is not None:
            self._record(device, payload)
            return True
        return False

    def _serve(self, device: str, payload: bytes) -> None:
        try:
            req = parse_json(payload, BundleRequest)
        except ProtocolError as e:
            self.counters.inc("bundle_requests_refused", e.code)
            return
        rows = self.store.read("SELECT dir, manifest FROM releases WHERE bundle_hash = ?", (req.bundle_hash,))
        if not rows:
            self.counters.inc("bundle_requests_refused", "unknown_bundle")
            return
        release = BundleRelease.model_validate(json.loads(rows[0][1]))
        f = next((x for x in release.files if x.path == req.path), None)
        if f is None:
            self.counters.inc("bundle_requests_refused", "unknown_file")
            return
        count = -(-f.size // release.chunk_bytes)
        with open(Path(rows[0][0]) / f.path, "rb") as fh:
            for i in sorted(set(req.chunks)):
                if not 0 <= i < count:
                    continue
                data = os.pread(fh.fileno(), release.chunk_bytes, i * release.chunk_bytes)
                meta = {"path": f.path, "release": release.release}
                self.transport.publish(
                    self.topics.bundle_data(device),
                    frame(f"{release.bundle_hash}:{f.path}", i, count, f.size, f.sha256, meta, data),
                )
                self.counters.inc("bundle_chunks", "sent")

    def _record(self, device: str, payload: bytes) -> None:
        try:
            rep = parse_json(payload, BundleReport)
        except ProtocolError as e:
            self.counters.inc("bundle_reports_refused", e.code)
            return
        if rep.device != device:
            self.counters.inc("bundle_reports_refused", "spoofed")
            return
        with self.store.tx() as conn:
            conn.execute(
                "INSERT INTO release_reports (release, device, status, reason, gate, ts) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(release, device) DO UPDATE SET status = excluded.status, reason = excluded.reason, "
                "gate = excluded.gate, ts = excluded.ts",
                (
                    rep.release,
                    device,
                    rep.status,
                    rep.reason,
                    json.dumps(rep.gate) if rep.gate else None,
                    rep.ts,
                ),
            )
        log.info(
            "release %d on %s: %s%s",
            rep.release,
            device,
            rep.status,
            f" ({rep.reason})" if rep.reason else "",
        )

    # ---- the leader ------------------------------------------------------------------------------
    def step(self) -> None:
        """Publish what is unpublished; move canary releases on (all) or stop them (halted)."""
        for release_id, manifest in self.store.read(
            "SELECT release, manifest FROM releases WHERE published_at IS NULL ORDER BY release"
        ):
            if self.transport.publish_and_wait(
                self.topics.bundle, canonical_json(json.loads(manifest)), retain=True, timeout=10
            ):
                with self.store.tx() as conn:
                    conn.execute(
                        "UPDATE releases SET published_at = ? WHERE release = ?", (time.time(), release_id)
                    )
                log.info("release %d published", release_id)
        for release_id, manifest in self.store.read(
            "SELECT release, manifest FROM releases WHERE stage = 'canary'"
        ):
            r = BundleRelease.model_validate(json.loads(manifest))
            reports = {d: (s, why) for d, s, why in self.store.read(
                "SELECT device, status, reason FROM release_reports WHERE release = ?", (release_id,)
            )}  # fmt: skip
            bad = {d: why for d, (s, why) in reports.items() if s in ("refused", "failed", "rolled_back")}
            switched = {d for d, (s, _) in reports.items() if s == "switched"}
            if bad:
                device, why = next(iter(bad.items()))
                self._restage(
                    r,
                    Rollout(
                        **{**r.rollout.model_dump(), "stage": "halted", "reason": f"canary {device}: {why}"}
                    ),
                )
            elif (r.rollout.canary and set(r.rollout.canary) <= switched) or (
                not r.rollout.canary and switched
            ):
                self._restage(r, Rollout(**{**r.rollout.model_dump(), "stage": "all"}))

    def _restage(self, r: BundleRelease, rollout: Rollout) -> None:
        body = r.model_dump(exclude={"key_id", "signature"})
        body["rollout"] = rollout.model_dump()
        signed = sign_manifest(body, self.key)
        with self.store.tx() as conn:
            conn.execute(
                "UPDATE releases SET manifest = ?, stage = ?, published_at = NULL WHERE release = ?",
                (json.dumps(signed), rollout.stage, r.release),
            )
        self.counters.inc("releases", rollout.stage)
        log.warning(
            "release %d: rollout %s%s",
            r.release,
            rollout.stage,
            f" ({rollout.reason})" if rollout.reason else "",
        )

    def status(self) -> list[dict[str, Any]]:
        rows = self.store.read(
            "SELECT release, stage, bundle_hash FROM releases ORDER BY release DESC LIMIT 5"
        )
        return [{"release": r, "stage": s, "bundle": h[:16]} for r, s, h in rows]
