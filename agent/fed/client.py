"""The box's side of federation: uploads through a durable outbox, signed globals verified and gated.

Uploads. When a round is open (``fed/{fleet}/round``, retained) and the active adapter is one this
box trained itself, not yet uploaded, on enough examples and in the round's mode (FFA-LoRA: with
the fleet's frozen A), its tensors (without A when the strategy freezes it) are put in the SQLite
outbox under a deterministic upload id. The outbox sends them in chunks whenever the broker is
reachable and again every ``sync.resend_after_s`` until the aggregator answers on
``fed/{fleet}/res/{device}``: store-and-forward through agent restarts and week-long outages,
within a disk quota (``fleet.max_outbox_bytes``), in order.

Globals. The signed manifest (``fed/{fleet}/global``) is checked first: signature against the
bootstrap file's public keys, fleet, base hash. Its bytes come as chunks (``global/chunk/{i}``) and
are used only when whole and matching the manifest's sha256; then shapes, labels and finiteness.
A verified global is written under ``data_dir/fleet/`` and becomes the anchor of local training
(θ* of the λ pull, the distillation teacher; with FFA-LoRA its seed fixes A). It is promoted only
through the learner's gate, on this box's own holdout, like any candidate. Anything that fails a
check is refused with a reason on ``edge/{site}/{device}/sync`` and a counter; the active adapter
stays.

paho's thread only parses and records; writing files, the learner and the outbox run on the
daemon's control thread (``tick``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from agent import clock
from agent.adapters import META, WEIGHTS, AdapterMeta
from agent.config import BootstrapConfig, RuntimeConfig
from agent.fed import lora_tensors, strategies
from agent.fed.protocol import (
    GlobalManifest,
    ProtocolError,
    RoundAnnouncement,
    UploadMeta,
    UploadResult,
    parse_json,
)
from agent.fed.signing import SignatureError, load_public_keys, verify_manifest
from agent.fed.spec import AdapterSpec, SpecError, write_adapter_dir
from agent.fed.topics import FleetTopics
from agent.fed.wire import (
    Reassembler,
    WireError,
    parse_chunk,
    split_blob,
    tensors_from_bytes,
    tensors_to_bytes,
)
from agent.health import Counters, LogThrottle
from agent.mqtt import InboundMessage, MqttClient
from agent.store import StorageError, Store
from agent.topics import Topics

log = logging.getLogger(__name__)

KEEP_GLOBALS = 3


def no_fleet_check(config: RuntimeConfig) -> list[str]:
    """For a box without ``[fleet]``: sync cannot be switched on over MQTT."""
    if config.sync.enabled:
        return [
            "sync.enabled: this box has no [fleet] section in its bootstrap file (fleet id and trusted keys)"
        ]
    return []


def participates(round_id: int, device: str, share: float) -> bool:
    """Whether ``device`` takes part in ``round_id`` at participation ``share``: a stable draw, so a
    restarted box decides the same, and different boxes sit out different rounds."""
    if share >= 1.0:
        return True
    digest = hashlib.sha256(f"{round_id}/{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


class SyncClient:
    def __init__(
        self,
        *,
        boot: BootstrapConfig,
        store: Store,
        transport: MqttClient,
        live: Any,  # agent.daemon.runtime_config.LiveConfig (callable: the config in force)
        learner: Any,  # agent.learner.manager.LearnerManager | None
        engine: Any,
        counters: Counters,
        box_topics: Topics,
    ):
        assert boot.fleet is not None
        self.fleet = boot.fleet
        self.device = boot.device
        self.topics = FleetTopics(self.fleet.id)
        self.box_topics = box_topics
        self.store = store
        self.transport = transport
        self.live = live
        self.learner = learner
        self.counters = counters
        self.keys = load_public_keys(self.fleet.public_key_paths())
        if not self.keys:
            raise ValueError(
                "fleet: no trusted public key could be read (public_key_credential outside systemd?)"
            )
        self.spec = AdapterSpec.from_manifest(engine.manifest)
        self.fleet_dir = boot.data_dir / "fleet"
        self.fleet_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._throttle = LogThrottle()
        self._reassembler = Reassembler(max_blobs=4)
        self._manifest: GlobalManifest | None = None  # verified, waiting for its bytes
        self._blobs: dict[str, tuple[str, bytes]] = {}  # version -> (sha256, bytes) of a whole blob
        self._ready: tuple[GlobalManifest, bytes] | None = None  # waiting for the control thread
        self._round: RoundAnnouncement | None = None
        self._send_now = False
        self._sessions_new: int | None = None  # new (not resumed) MQTT sessions seen so far
        self.bundles: Any = None  # agent.fed.bundles.BundleUpdater: base-model releases
        self._last_skip: str | None = None
        saved = store.sync_state("round")
        if saved:
            try:
                self._round = RoundAnnouncement.model_validate_json(saved)
            except ValueError:
                log.warning("stored round announcement no longer validates; waiting for the broker's")
        live.add_check(self._config_problems)
        if learner is not None:
            learner.anchor_dir = self.anchor_dir
            learner.frozen_a_seed = self.frozen_a_seed

    # ---- what the learner asks ---------------------------------------------------------------
    def anchor_dir(self) -> Path | None:
        """The newest verified global: θ* and the distillation teacher of local training."""
        version = self.store.sync_state("global_version")
        path = self.fleet_dir / version if version else None
        return path if path is not None and (path / WEIGHTS).is_file() else None

    def frozen_a_seed(self) -> int | None:
        """The fleet's seed when its strategy freezes A: local rounds then train B only."""
        r = self._round
        if not self.live().sync.enabled or r is None or r.lora_seed is None:
            return None
        spec = strategies.STRATEGIES.get(r.strategy)
        return r.lora_seed if spec is not None and spec.freezes_a else None

    def _config_problems(self, config: RuntimeConfig) -> list[str]:
        s = config.sync.strategy
        if s is not None and s not in strategies.STRATEGIES:
            return [f"sync.strategy: unknown strategy {s!r}; known: {sorted(strategies.STRATEGIES)}"]
        return []

    # ---- paho's thread ---------------------------------------------------------------------------
    def on_message(self, msg: InboundMessage) -> None:
        topic = msg.topic
        try:
            if not msg.payload:
                pass  # a cleared retained message: nothing to do
            elif topic == self.topics.round:
                self._on_round(msg.payload)
            elif topic == self.topics.global_manifest:
                self._on_manifest(msg.payload)
            elif topic.startswith(self.topics.global_manifest + "/chunk/"):
                self._on_chunk(msg.payload)
            elif topic == self.topics.result(self.device):
                self._on_result(msg.payload)
            elif topic == self.topics.bundle and self.bundles is not None:
                self.bundles.on_release(msg.payload)
            elif topic == self.topics.bundle_data(self.device) and self.bundles is not None:
                self.bundles.on_data(msg.payload)
            else:
                log.debug("fleet topic %s not for this box", topic)
        except StorageError as e:
            # Not recorded, so not acked: the broker delivers it again.
            log.error("sync: %s on %s; left unacked", e, topic)
            return
        self.transport.ack(msg)

    def _on_round(self, payload: bytes) -> None:
        try:
            r = parse_json(payload, RoundAnnouncement)
        except ProtocolError as e:
            self._refuse("round", e.code, str(e))
            return
        if r.fleet != self.fleet.id:
            self._refuse(
                "round", "wrong_fleet", f"round for fleet {r.fleet!r}, this box is in {self.fleet.id!r}"
            )
            return
        if self._round is None or r.round != self._round.round:
            log.info(
                "fleet %s: round %d open (%s, %d uploads, deadline %.0f)",
                r.fleet,
                r.round,
                r.strategy,
                r.min_uploads,
                r.deadline,
            )
        self._round = r
        self.store.set_sync_state("round", r.model_dump_json())

    def _on_manifest(self, payload: bytes) -> None:
        try:
            m = parse_json(payload, GlobalManifest)
            verify_manifest(json.loads(payload), self.keys)
        except (ProtocolError, SignatureError) as e:
            self._refuse("global", e.code, f"global manifest refused: {e}")
            return
        if m.fleet != self.fleet.id or m.base_hash != self.spec.base_hash:
            self._refuse(
                "global",
                "wrong_base" if m.fleet == self.fleet.id else "wrong_fleet",
                f"global {m.version} is for fleet {m.fleet} base {m.base_hash[:12]}; this box is "
                f"{self.fleet.id} base {self.spec.base_hash[:12]}",
            )
            return
        if self.store.sync_state("global_version") == m.version:
            return  # the retained global again (reconnect): installed already
        with self._lock:
            self._manifest = m
            self._match()

    def _on_chunk(self, payload: bytes) -> None:
        try:
            whole = self._reassembler.add(parse_chunk(payload))
        except WireError as e:
            self._refuse("global", e.code, f"global chunk refused: {e}")
            return
        if whole is None:
            return
        meta, data = whole
        with self._lock:
            # Keyed by the version the chunks claim; only the signed manifest's sha256 makes them good.
            self._blobs[str(meta.get("version"))] = (hashlib.sha256(data).hexdigest(), data)
            while len(self._blobs) > 2:
                self._blobs.pop(next(iter(self._blobs)))
            self._match()

    def _match(self) -> None:
        m = self._manifest
        if m is None or m.version not in self._blobs:
            return
        digest, data = self._blobs.pop(m.version)
        self._manifest = None
        if digest != m.sha256:
            self._refuse(
                "global", "hash_mismatch", f"global {m.version}: its bytes do not match the signed sha256"
            )
            return
        self._ready = (m, data)

    def _on_result(self, payload: bytes) -> None:
        try:
            res = parse_json(payload, UploadResult)
        except ProtocolError as e:
            self._refuse("result", e.code, str(e))
            return
        settled = self.store.outbox_ack(res.upload_id, res.model_dump())
        if res.status == "refused":
            # Also after an earlier "accepted": the aggregator may leave an outlier out of the round.
            self.counters.inc("sync_uploads", "refused")
            log.warning("upload %s refused by the aggregator: %s: %s", res.upload_id, res.code, res.reason)
            self._event("upload_refused", upload_id=res.upload_id, code=res.code, reason=res.reason)
        elif settled:  # not the answer to a re-sent upload, already settled
            self.counters.inc("sync_uploads", "late" if res.late else res.status)
            log.info(
                "upload %s %s for round %s%s",
                res.upload_id,
                res.status,
                res.round,
                " (late)" if res.late else "",
            )
            self._event("upload_acknowledged", upload_id=res.upload_id, round=res.round, late=res.late)

    # ---- control thread ---------------------------------------------------------------------------
    def follow_bundle(self, bundle_dir: Path) -> None:
        """The box switched base models: uploads and globals are checked against the new one."""
        from agent.bundle import load_manifest

        self.spec = AdapterSpec.from_manifest(load_manifest(bundle_dir))

    def event(self, event: str, qos: int = 1, **body: Any) -> None:
        """A sync event on the box's ``sync`` topic (also for the bundle updater)."""
        self._event(event, qos=qos, **body)

    def tick(self) -> None:
        if not self.live().sync.enabled:
            return
        if self.bundles is not None:
            self.bundles.tick()
        sessions = self.transport.stats().get("sessions_new", 0)
        if self._sessions_new is not None and sessions > self._sessions_new:
            # A new session (not resumed): the broker lost what it held for us, and possibly the
            # uploads it had not yet passed on. Send every unacknowledged one again now.
            self._send_now = True
        self._sessions_new = sessions
        self._install_ready()
        self._maybe_upload()
        if self.transport.connected:
            self._send_due()

    def sync_now(self) -> dict[str, Any]:
        """``cmd`` ``sync_now``: upload what is due and resend what waits, now."""
        if not self.live().sync.enabled:
            return {"enabled": False, "queued": self.store.outbox_stats()}
        self._send_now = True
        self.tick()
        return {
            "enabled": True,
            "round": self._round.round if self._round else None,
            "outbox": self.store.outbox_stats(),
        }

    def _install_ready(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is None:
            return
        m, data = ready
        try:
            tensors = tensors_from_bytes(data)
            self.spec.check_tensors(tensors, sorted(self.spec.shapes))
        except (WireError, SpecError) as e:
            self._refuse("global", e.code, f"global {m.version} refused: {e}")
            return
        if tuple(m.labels) != self.spec.labels:
            self._refuse(
                "global", "wrong_labels", f"global {m.version} labels {m.labels} differ from the bundle's"
            )
            return
        path = self.fleet_dir / m.version
        meta = AdapterMeta(
            version=m.version,
            base_hash=m.base_hash,
            labels=list(m.labels),
            num_examples=m.num_examples,
            round=m.round,
            metrics={"fleet": m.fleet, "strategy": m.strategy, "participants": m.participants},
            signature=m.signature,
        )
        write_adapter_dir(path, data, self.spec, meta)
        self.store.set_sync_state("global_version", m.version)
        self._prune_globals(keep=m.version)
        self.counters.inc("sync_globals", "verified")
        log.info(
            "global %s verified (round %d, %d boxes, %s)", m.version, m.round, m.participants, m.strategy
        )
        offered = False
        if self.learner is not None and self.live().sync.adopt_global:
            offered = self.learner.offer_candidate(path, m.version, origin="fleet")
        self._event("global_verified", version=m.version, round=m.round, offered_to_gate=offered)

    def _prune_globals(self, keep: str) -> None:
        dirs = sorted(
            (p for p in self.fleet_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
        )
        for p in dirs[:-KEEP_GLOBALS]:
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)

    def _maybe_upload(self) -> None:
        r, sync = self._round, self.live().sync
        if r is None or self.learner is None:
            return
        why = self._upload_blocker(r, sync)
        if why is not None:
            if why != self._last_skip:
                log.info("sync: no upload for round %d: %s", r.round, why)
                self._last_skip = why
            return
        version = self.learner.active_version()
        adapter_dir = self.learner.adapters_dir / version
        meta = json.loads((adapter_dir / META).read_text())
        tensors = load_file(str(adapter_dir / WEIGHTS))
        spec = strategies.STRATEGIES[r.strategy]
        if spec.freezes_a:
            try:
                lora_tensors.with_frozen_a(tensors, lora_tensors.frozen_lora_a_for(tensors, r.lora_seed or 0))
            except lora_tensors.StrategyError:
                self._skip_once(
                    r,
                    f"adapter {version} was trained with its own A; the fleet freezes A (the next round trains so)",
                )
                return
        body = tensors_to_bytes(strategies.upload_tensors(tensors, r.strategy))
        upload_id = hashlib.sha256(f"{self.device}/{version}/{r.round}".encode()).hexdigest()[:32]
        upload = UploadMeta(
            fleet=self.fleet.id,
            device=self.device,
            upload_id=upload_id,
            round=r.round,
            base_hash=self.spec.base_hash,
            strategy=r.strategy,
            adapter_version=version,
            num_examples=int(meta.get("num_examples") or 1),
            labels=list(self.spec.labels),
            created=time.time(),
        )
        try:
            dropped = self.store.outbox_put(
                "upload",
                upload_id,
                self.topics.upload(self.device),
                upload.model_dump(),
                body,
                self.fleet.max_outbox_bytes,
            )
        except ValueError as e:
            self._skip_once(r, str(e))
            return
        for key in dropped:
            self.counters.inc("sync_outbox_dropped", "quota")
            log.warning("outbox over its quota: upload %s dropped unsent", key)
        self.store.set_sync_state("uploaded_version", self.learner.lora_version(version))
        self.store.set_sync_state("last_upload_at", str(clock.time()))
        self.counters.inc("sync_uploads", "queued")
        log.info(
            "upload %s queued: adapter %s for round %d (%d bytes)", upload_id, version, r.round, len(body)
        )
        self._event(
            "upload_queued", upload_id=upload_id, adapter_version=version, round=r.round, bytes=len(body)
        )

    def _upload_blocker(self, r: RoundAnnouncement, sync: Any) -> str | None:
        """Why the active adapter is not uploaded for round ``r`` now, or None to upload it."""
        if r.base_hash != self.spec.base_hash:
            return f"the round is for base {r.base_hash[:12]}, this box serves {self.spec.base_hash[:12]}"
        if r.strategy not in strategies.STRATEGIES:
            return f"unknown strategy {r.strategy!r} (an older agent?)"
        if sync.strategy is not None and sync.strategy != r.strategy:
            return f"round strategy {r.strategy} is not sync.strategy {sync.strategy}"
        if not participates(r.round, self.device, sync.participation):
            return f"sits this round out (participation {sync.participation})"
        version = self.learner.active_version()
        info = self.learner.version_info(version)
        if info is None or info.get("origin") != "local":
            return "no adapter trained on this box since the last global"
        lora = self.learner.lora_version(version)
        if self.store.sync_state("uploaded_version") == lora:
            # A fast-learner refresh keeps its round's LoRA weights: they went up once already.
            return f"adapter {version} was uploaded already" + (
                f" (its LoRA is {lora}'s)" if lora != version else ""
            )
        last = float(self.store.sync_state("last_upload_at") or 0)
        if not self._send_now and clock.time() - last < sync.upload_interval_s:
            return f"last upload {clock.time() - last:.0f}s ago (sync.upload_interval_s {sync.upload_interval_s})"
        meta = json.loads((self.learner.adapters_dir / version / META).read_text())
        if int(meta.get("num_examples") or 0) < sync.min_examples:
            return f"adapter {version} learned from {meta.get('num_examples')} examples < sync.min_examples {sync.min_examples}"
        return None

    def _skip_once(self, r: RoundAnnouncement, why: str) -> None:
        if why != self._last_skip:
            log.warning("sync: no upload for round %d: %s", r.round, why)
            self.counters.inc("sync_skipped", "upload")
            self._last_skip = why

    def _send_due(self) -> None:
        resend = 0.0 if self._send_now else self.live().sync.resend_after_s
        self._send_now = False
        for row in self.store.outbox_due(resend):
            for frame in split_blob(row["key"], row["payload"], row["meta"], self.fleet.chunk_bytes):
                self.transport.publish(row["topic"], frame)
            self.store.outbox_attempted(row["id"])
            if row["attempts"]:
                self.counters.inc("sync_uploads", "resent")

    # ---- reporting ---------------------------------------------------------------------------------
    def _refuse(self, what: str, code: str, message: str) -> None:
        self.counters.inc("sync_refused", f"{what}:{code}")
        self._throttle.log(log, logging.WARNING, f"{what}:{code}", "sync: %s", message)
        self._event(f"{what}_refused", qos=0, code=code, reason=message)

    def _event(self, event: str, qos: int = 1, **body: Any) -> None:
        if self.transport.connected:
            self.transport.publish(
                self.box_topics.sync, {"event": event, "ts": round(time.time(), 3), **body}, qos=qos
            )

    def status(self) -> dict[str, Any]:
        r = self._round
        return {
            "fleet": self.fleet.id,
            "enabled": self.live().sync.enabled,
            "round": {"id": r.round, "strategy": r.strategy, "deadline": r.deadline} if r else None,
            "global_version": self.store.sync_state("global_version"),
            "uploaded_version": self.store.sync_state("uploaded_version"),
            "outbox": self.store.outbox_stats(),
            "last_skip": self._last_skip,
        }
