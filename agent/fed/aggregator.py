"""``edge-agent aggregator run --config hq.toml``: federated rounds at headquarters.

Every worker takes uploads from the shared subscription ``$share/{group}/fed/{fleet}/up/+`` (the
broker, or a broker cluster, gives each message to one worker), commits each chunk to the shared
SQLite database (``agent.fed.hq_store``) before acking it, and whichever worker commits an
upload's last chunk checks and records it, then answers the box on ``fed/{fleet}/res/{device}``.

One worker at a time leads the rounds (a lease row in the same database; another takes over when
it lapses): it announces the round (retained), and on quorum (``min_uploads``) or at the deadline
aggregates the round's uploads with the round's strategy, signs the global's manifest (Ed25519),
commits the global and the round's end together, publishes the global (retained chunks, then the
retained manifest) and opens the next round. A worker killed at any point resumes from the
database: uploads it acked are there, a global built but not published is published, an open
round goes on.

What an upload must be: for this fleet, from the device its topic names, on the fleet's base with
its labels, in the round's strategy, with exactly the tensors and shapes of the fleet's adapter
spec, finite, and (``rounds.max_update_norm``) not absurdly large. Anything else is refused with
a reason the box reads. A re-sent upload is answered again, not counted again; a late one counts
in the round that is open when it arrives; a box's second upload to one round replaces its first.
"""

from __future__ import annotations

import logging
import math
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent import clock, exit_codes
from agent.bundle import load_manifest
from agent.config import ConfigError
from agent.fed import lora_tensors, partial_sums, strategies, update_batch
from agent.fed.bundle_server import BundleServer
from agent.fed.hq_config import HqConfig, load_hq_config
from agent.fed.hq_store import HqStore, Round
from agent.fed.protocol import (
    GlobalManifest,
    ProtocolError,
    RoundAnnouncement,
    UploadMeta,
    UploadResult,
    validate,
)
from agent.fed.signing import load_private_key, sign_manifest
from agent.fed.spec import AdapterSpec, SpecError
from agent.fed.topics import FleetTopics
from agent.fed.wire import (
    WireError,
    canonical_json,
    parse_chunk,
    sha256_hex,
    split_blob,
    tensors_from_bytes,
    tensors_to_bytes,
)
from agent.health import Counters, sd_notify, status_file_path, supervise
from agent.mqtt import InboundMessage, MqttClient, Will

log = logging.getLogger(__name__)

LEASE = "round-leader"
LEASE_TTL_S = 10.0
TICK_S = 0.5
STATUS_EVERY_S = 2.0


class Aggregator:
    def __init__(self, config: HqConfig):
        self.config = config
        self.worker = config.worker
        self.topics = FleetTopics(config.fleet)
        self.key = load_private_key(config.signing_key_path())
        self.store = HqStore(config.db_path)
        # The base the fleet federates on: hq.toml's bundle until a release reaches every box
        # (its rollout stage "all"); then that release's (follow_rollout).
        self.spec = AdapterSpec.from_manifest(load_manifest(config.bundle))
        self.base_release = 0
        self.counters = Counters()
        self.stop_event = threading.Event()
        self.leader = False
        self._announced: int | None = None
        self._thread: threading.Thread | None = None
        self._frozen_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self.last_aggregate_s: float | None = None
        self.bundles = BundleServer(config.fleet, self.store, self, self.key, self.counters)
        self.transport = MqttClient(
            config.broker,
            f"edge-aggregator-{config.fleet}-{self.worker}",
            will=Will(self.topics.worker_status(self.worker), {"state": "offline", "worker": self.worker}),
            subscriptions={
                self.topics.shared_uploads(config.share_group): False,
                **self.bundles.subscriptions(config.share_group),
            },
            on_message=self.on_message,
        )

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._round_loop, name="rounds", daemon=True)
        self._thread.start()
        self.transport.start()
        log.info(
            "aggregator %s for fleet %s started (%s)",
            self.worker,
            self.config.fleet,
            self.config.rounds.strategy,
        )

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.leader:
            self.store.release_lease(LEASE, self.worker)
        if self.transport.connected:
            self._publish_status("offline", wait=True)
        self.transport.stop()
        self.store.close()
        log.info("aggregator %s stopped", self.worker)

    def healthy(self) -> bool:
        return self.transport.alive and self._thread is not None and self._thread.is_alive()

    # ---- uploads (paho's thread) ---------------------------------------------------------------
    # The bundle server publishes through the aggregator's transport (made after it).
    def publish(self, topic: str, payload: Any, **kw: Any) -> None:
        self.transport.publish(topic, payload, **kw)

    def publish_and_wait(self, topic: str, payload: Any, **kw: Any) -> bool:
        return self.transport.publish_and_wait(topic, payload, **kw)

    def on_message(self, msg: InboundMessage) -> None:
        device = self.topics.device_of_upload(msg.topic)
        if device is None:
            self.bundles.on_message(msg.topic, msg.payload)
            self.transport.ack(msg)
            return
        answer = self._take_chunk(device, msg.payload)
        if answer is not None:
            self.transport.publish(self.topics.result(device), answer)
        # Only now: the chunk (and the upload, when it was the last one) is committed.
        self.transport.ack(msg)

    def _take_chunk(self, device: str, payload: bytes) -> dict[str, Any] | None:
        """Record one chunk; the answer to publish to ``device`` (None while an upload is incomplete)."""
        self.counters.inc("chunks", "received")
        try:
            chunk = parse_chunk(payload)
        except WireError as e:
            # Not even an upload id to answer to: the box's own encoder never sends this.
            return self._refused("unknown", e.code, f"from {device}: {e}")
        try:
            meta: UploadMeta = validate(chunk.meta, UploadMeta)
        except ProtocolError as e:
            return self._refused(chunk.blob, e.code, f"upload meta: {e}")
        if meta.device != device or meta.upload_id != chunk.blob or meta.fleet != self.config.fleet:
            return self._refused(
                meta.upload_id,
                "spoofed",
                f"upload names device {meta.device} / fleet {meta.fleet} but came on {device}'s topic",
            )
        previous = self.store.answer_of(meta.upload_id)
        if previous is not None:
            if chunk.index != 0:
                return None  # answer a re-sent upload once, not once per chunk
            self.counters.inc("duplicates", "upload")
            return {**previous, "status": "duplicate" if previous["status"] != "refused" else "refused"}
        with self.store.tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO chunks (upload_id, idx, count, device, size, sha256, data, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    meta.upload_id,
                    chunk.index,
                    chunk.count,
                    device,
                    chunk.size,
                    chunk.sha256,
                    chunk.data,
                    time.time(),
                ),
            )
            rows = conn.execute(
                "SELECT idx, count, size, sha256, data FROM chunks WHERE upload_id = ? ORDER BY idx",
                (meta.upload_id,),
            ).fetchall()
            if len(rows) < chunk.count:
                return None
            conn.execute("DELETE FROM chunks WHERE upload_id = ?", (meta.upload_id,))
            answer = self._accept(conn, meta, rows)
            self.store.put_answer(conn, meta.upload_id, device, answer)
        return answer

    def _accept(self, conn: Any, meta: UploadMeta, rows: list[tuple]) -> dict[str, Any]:
        """Check a whole upload and record it (inside the chunk's transaction); its answer."""
        if len({(r[1], r[2], r[3]) for r in rows}) != 1 or [r[0] for r in rows] != list(range(rows[0][1])):
            return self._refused(
                meta.upload_id, "mixed_chunks", "chunks of this upload disagree on its size or hash"
            )
        data = b"".join(r[4] for r in rows)
        if len(data) != rows[0][2] or sha256_hex(data) != rows[0][3]:
            return self._refused(
                meta.upload_id, "bad_hash", "the joined chunks do not match the upload's sha256"
            )
        open_round = self.store.open_round()
        if open_round is not None and open_round.base_hash != self.spec.base_hash:
            open_round = None  # on the old base, about to be abandoned: this one waits for the next
        round_id = open_round.id if open_round else self.store.last_round_id() + 1
        strategy = open_round.strategy if open_round else self.config.rounds.strategy
        if meta.base_hash != self.spec.base_hash:
            return self._refused(
                meta.upload_id,
                "wrong_base",
                f"trained on base {meta.base_hash[:12]}, the fleet's is {self.spec.base_hash[:12]}",
            )
        if tuple(meta.labels) != self.spec.labels:
            return self._refused(
                meta.upload_id,
                "wrong_labels",
                f"labels {meta.labels} differ from the fleet's {list(self.spec.labels)}",
            )
        if meta.strategy != strategy:
            return self._refused(
                meta.upload_id,
                "wrong_strategy",
                f"trained for {meta.strategy}; round {round_id} aggregates with {strategy}",
            )
        freezes_a = strategies.STRATEGIES[strategy].freezes_a
        try:
            tensors = tensors_from_bytes(data)
            self.spec.check_tensors(tensors, self.spec.upload_keys(freezes_a))
            full = lora_tensors.with_frozen_a(tensors, self._frozen_a()) if freezes_a else tensors
            norm = update_batch.update_norm(full)
        except (WireError, SpecError) as e:
            return self._refused(meta.upload_id, e.code, str(e))
        except lora_tensors.StrategyError as e:
            return self._refused(meta.upload_id, "bad_tensors", str(e))
        limit = self.config.rounds.max_update_norm
        if limit is not None and not norm <= limit:
            return self._refused(
                meta.upload_id,
                "outlier_norm",
                f"update norm {norm:.3g} exceeds the fleet's bound {limit:.3g}",
            )
        late = meta.round is not None and meta.round < round_id
        conn.execute(
            "UPDATE uploads SET status = 'superseded', reason = ? WHERE device = ? AND round_id = ? AND status = 'accepted'",
            (f"replaced by {meta.upload_id}", meta.device, round_id),
        )
        conn.execute(
            "INSERT INTO uploads (upload_id, device, round_id, requested_round, late, adapter_version, num_examples, "
            "norm, tensors, status, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
            (
                meta.upload_id,
                meta.device,
                round_id,
                meta.round,
                int(late),
                meta.adapter_version,
                meta.num_examples,
                norm,
                data,
                time.time(),
            ),
        )
        self.counters.inc("uploads", "late" if late else "accepted")
        log.info(
            "upload %s from %s accepted for round %d%s (%d examples, norm %.3g)",
            meta.upload_id,
            meta.device,
            round_id,
            " (late)" if late else "",
            meta.num_examples,
            norm,
        )
        return UploadResult(
            upload_id=meta.upload_id, status="accepted", round=round_id, late=late
        ).model_dump()

    def _refused(self, upload_id: str, code: str, reason: str) -> dict[str, Any]:
        self.counters.inc("refused", code)
        log.warning("upload %s refused: %s: %s", upload_id, code, reason)
        return UploadResult(upload_id=upload_id, status="refused", code=code, reason=reason).model_dump()

    # ---- rounds (the leader) -------------------------------------------------------------------
    def _round_loop(self) -> None:
        last_status = 0.0
        while not self.stop_event.wait(TICK_S):
            if time.monotonic() - last_status >= STATUS_EVERY_S and self.transport.connected:
                last_status = time.monotonic()
                self._publish_status("online")
            try:
                self.follow_rollout()
                was = self.leader
                self.leader = self.store.take_lease(LEASE, self.worker, LEASE_TTL_S)
                if self.leader and not was:
                    log.info("worker %s leads the rounds of fleet %s", self.worker, self.config.fleet)
                    self._announced = None
                if self.leader and self.transport.connected:
                    self.step()
            except Exception:
                log.exception("round step failed; retrying")

    def step(self, now: float | None = None) -> None:
        """One look at the round: publish what is pending, open, aggregate or extend."""
        now = clock.time() if now is None else now
        self.bundles.step()
        for round_id, manifest, blob in self.store.unpublished_globals():
            self._publish_global(round_id, manifest, blob)
        r = self.store.open_round()
        if r is not None and r.base_hash != self.spec.base_hash:
            # Its uploads were trained on a base the fleet has left: no global of theirs would serve.
            why = f"the fleet moved to base {self.spec.base_hash[:12]} (release {self.base_release})"
            self.store.abandon_round(r.id, why)
            log.warning("round %d abandoned: %s", r.id, why)
            r = None
        if r is None:
            r = self._open_round(now)
        if self._announced != r.id:
            self._announce(r)
        n = self.store.count_uploads(r.id)
        if n >= r.min_uploads or (now >= r.deadline and n >= 1):
            self._aggregate(r)
            self._announce(self._open_round(clock.time()))
        elif now >= r.deadline:
            self.store.extend_round(r.id, now + self.config.rounds.duration_s)
            log.info("round %d: no upload by its deadline; extended", r.id)
            self._announced = None

    def follow_rollout(self) -> None:
        """Federate on the newest release rolled out to all: every worker checks (it validates
        uploads against the spec), the leader abandons a round still open on the old base."""
        found = self.store.fleet_release()
        if found is None or found[0] == self.base_release:
            return
        release, bundle_dir = found
        try:
            spec = AdapterSpec.from_manifest(load_manifest(Path(bundle_dir)))
        except Exception as e:  # noqa: BLE001 - a release whose copy is gone keeps the current base
            log.error(
                "release %d: its bundle at %s does not load (%s); the fleet stays on its base",
                release,
                bundle_dir,
                e,
            )
            self.base_release = release
            return
        if spec.base_hash != self.spec.base_hash:
            log.info(
                "fleet %s federates on release %d (base %s)", self.config.fleet, release, spec.base_hash[:12]
            )
        self.spec, self.base_release, self._frozen_cache = spec, release, None

    def _seed(self) -> int:
        if self.config.rounds.lora_seed is not None:
            return self.config.rounds.lora_seed
        saved = self.store.setting("lora_seed")
        if saved is None:
            with self.store.tx() as conn:
                saved = self.store.setting("lora_seed") or str(secrets.randbelow(2**62))
                self.store.set_setting(conn, "lora_seed", saved)
        return int(saved)

    def _frozen_a(self) -> dict[str, np.ndarray]:
        cached = self._frozen_cache
        seed = self._seed()
        if cached is None or cached[0] != seed:
            shapes = {k: self.spec.shapes[k] for k in self.spec.a_keys}
            cached = (seed, lora_tensors.frozen_lora_a_for(shapes, seed))
            self._frozen_cache = cached
        return cached[1]

    def _open_round(self, now: float) -> Round:
        cfg = self.config.rounds
        r = Round(
            id=self.store.last_round_id() + 1,
            strategy=cfg.strategy,
            base_hash=self.spec.base_hash,
            lora_seed=self._seed() if strategies.STRATEGIES[cfg.strategy].freezes_a else None,
            min_uploads=cfg.min_uploads,
            opened_at=now,
            deadline=now + cfg.duration_s,
            status="open",
        )
        self.store.add_round(r)
        log.info("round %d opened: %s, %d uploads or %.0fs", r.id, r.strategy, r.min_uploads, cfg.duration_s)
        return r

    def _announce(self, r: Round) -> None:
        current = self.store.open_round()
        deadline = current.deadline if current is not None and current.id == r.id else r.deadline
        body = RoundAnnouncement(
            fleet=self.config.fleet,
            round=r.id,
            base_hash=r.base_hash,
            strategy=r.strategy,
            lora_seed=r.lora_seed,
            deadline=deadline,
            min_uploads=r.min_uploads,
            opened_at=r.opened_at,
        )
        if self.transport.publish_and_wait(self.topics.round, body.model_dump(), retain=True, timeout=10):
            self._announced = r.id

    def _aggregate(self, r: Round) -> None:
        norms = self.store.round_norms(r.id)
        excluded: dict[str, str] = {}
        factor = self.config.rounds.outlier_factor
        if factor is not None and len(norms) >= 3:
            median = float(np.median([n for _, _, n in norms]))
            for upload_id, _, norm in norms:
                if norm > factor * median:
                    excluded[upload_id] = f"norm {norm:.3g} > {factor} x the round's median {median:.3g}"
        t0 = time.perf_counter()
        tensors, participants, num_examples = self._combine(r, excluded)
        seconds = time.perf_counter() - t0
        self.spec.check_tensors(tensors, sorted(self.spec.shapes))
        blob = tensors_to_bytes(tensors)
        version = f"fleet-{self.config.fleet}-r{r.id}"
        manifest = GlobalManifest(
            fleet=self.config.fleet,
            round=r.id,
            version=version,
            base_hash=r.base_hash,
            strategy=r.strategy,
            lora_seed=r.lora_seed,
            labels=list(self.spec.labels),
            num_examples=num_examples,
            participants=len(participants),
            blob=version,
            sha256=sha256_hex(blob),
            size=len(blob),
            chunks=max(1, math.ceil(len(blob) / self.config.chunk_bytes)),
            created=time.time(),
        )
        signed = sign_manifest(manifest.model_dump(exclude={"key_id", "signature"}), self.key)
        result = {
            "participants": participants,
            "excluded": excluded,
            "num_examples": num_examples,
            "aggregate_s": round(seconds, 4),
        }
        self.store.close_round(r.id, result, version, signed, blob, excluded)
        self.last_aggregate_s = seconds
        self.counters.inc("rounds", "closed")
        log.info(
            "round %d aggregated: %d uploads (%d left out) in %.3fs -> %s",
            r.id,
            len(participants),
            len(excluded),
            seconds,
            version,
        )
        for upload_id, device, _ in norms:
            if upload_id in excluded:
                answer = self._refused(upload_id, "outlier_norm", excluded[upload_id])
                self.transport.publish(self.topics.result(device), answer)
        self._publish_global(r.id, signed, blob)

    def _combine(self, r: Round, excluded: dict[str, str]) -> tuple[dict[str, np.ndarray], list[str], int]:
        """The round's global tensors, the devices in it and their examples. Weighted-mean strategies
        stream the uploads through partial sums (one adapter's worth of memory, whatever the fleet's
        size); median and trimmed mean need every upload at once."""
        spec = strategies.STRATEGIES[r.strategy]
        cfg = self.config.rounds
        frozen = self._frozen_a() if spec.freezes_a else None
        participants: list[str] = []
        num_examples = 0

        def updates(batch: list[dict[str, Any]]) -> list[lora_tensors.ClientUpdate]:
            nonlocal num_examples
            out = []
            for row in batch:
                if row["upload_id"] in excluded:
                    continue
                participants.append(row["device"])
                num_examples += int(row["num_examples"])
                out.append(
                    lora_tensors.ClientUpdate(tensors_from_bytes(row["tensors"]), int(row["num_examples"]))
                )
            return out

        rank = (cfg.rank or self.spec.rank) if spec.takes_rank else None
        if spec.associative and cfg.clip_median_factor is None:
            parts = []
            for batch in self.store.iter_round_uploads(r.id):
                ups = updates(batch)
                if ups:
                    parts.append(partial_sums.partial_sum(ups, r.strategy, frozen_a=frozen))
            return (
                partial_sums.finalize(partial_sums.merge(*parts), r.strategy, rank=rank),
                participants,
                num_examples,
            )
        every = [u for batch in self.store.iter_round_uploads(r.id) for u in updates(batch)]
        params: dict[str, Any] = {}
        if frozen is not None:
            params["frozen_a"] = frozen
        if rank is not None:
            params["rank"] = rank
        if spec.combine == "trimmed_mean":
            params["trim_fraction"] = cfg.trim_fraction
        if cfg.clip_median_factor is not None:
            params["clip_median_factor"] = cfg.clip_median_factor
        return strategies.aggregate(r.strategy, every, **params), participants, num_examples

    def _publish_global(self, round_id: int, manifest: dict[str, Any], blob: bytes) -> None:
        frames = split_blob(
            manifest["blob"],
            blob,
            {"version": manifest["version"], "round": round_id},
            self.config.chunk_bytes,
        )
        ok = all(
            self.transport.publish_and_wait(self.topics.global_chunk(i), f, retain=True, timeout=30)
            for i, f in enumerate(frames)
        )
        previous = int(self.store.setting("published_chunks", "0") or 0)
        for i in range(len(frames), previous):  # a shorter global: clear the old tail
            ok = (
                self.transport.publish_and_wait(self.topics.global_chunk(i), b"", retain=True, timeout=10)
                and ok
            )
        ok = ok and self.transport.publish_and_wait(
            self.topics.global_manifest, canonical_json(manifest), retain=True, timeout=10
        )
        if not ok:
            log.warning("global of round %d not yet published; retrying", round_id)
            return
        with self.store.tx() as conn:
            self.store.set_setting(conn, "published_chunks", str(len(frames)))
        self.store.mark_published(round_id)
        log.info("global %s published (%d chunks, %d bytes)", manifest["version"], len(frames), len(blob))

    def status_line(self) -> str:
        """systemd's STATUS= line."""
        r = self.store.open_round()
        conn = "connected" if self.transport.connected else "waiting for the broker"
        role = "leads the rounds" if self.leader else "takes uploads"
        return f"{conn}; {role}; round {r.id if r else '-'}"

    def _publish_status(self, state: str, wait: bool = False) -> None:
        """Retained on ``fed/{fleet}/hq/{worker}``: what this worker does (the last will says offline)."""
        body = {"state": state, "ts": round(time.time(), 3), **self.status()}
        if wait:
            self.transport.publish_and_wait(self.topics.worker_status(self.worker), body, retain=True)
        else:
            self.transport.publish(self.topics.worker_status(self.worker), body, retain=True)

    def status(self) -> dict[str, Any]:
        r = self.store.open_round()
        return {
            "worker": self.worker,
            "leader": self.leader,
            "round": r.id if r else None,
            "uploads_in_round": self.store.count_uploads(r.id) if r else 0,
            "last_aggregate_s": self.last_aggregate_s,
            **self.store.stats(),
            "releases": self.bundles.status(),
            "counters": self.counters.snapshot(),
        }


# ---- the process ---------------------------------------------------------------------------------


def run(config_path: Path) -> int:
    from agent.daemon.main import setup_logging

    try:
        config = load_hq_config(config_path)
    except ConfigError as e:
        setup_logging("INFO")
        for line in e.errors:
            log.error("config: %s", line)
        return exit_codes.CONFIG_ERROR
    setup_logging(config.log_level)
    try:
        agg = Aggregator(config)
    except (OSError, ValueError) as e:
        log.error("aggregator set-up: %s", e)
        return exit_codes.CONFIG_ERROR
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    agg.start()
    sd_notify("READY=1", f"STATUS=aggregator {agg.worker} for fleet {config.fleet}")
    supervise(
        stop,
        agg.healthy,
        agg.status_line,
        status_file_path(config.data_dir),
        lambda: {"state": "online" if agg.transport.connected else "connecting", "leader": agg.leader},
    )
    sd_notify("STOPPING=1")
    agg.stop()
    return exit_codes.OK
