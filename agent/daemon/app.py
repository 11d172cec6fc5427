"""The app object: ``init_*`` builds the parts in order, ``start`` starts them, ``stop`` ends them in reverse.

It wires and orders; the work is elsewhere, one module per inbound topic (``inference``,
``ingest``, ``runtime_config``, ``commands``; the fleet's topics in ``agent.fed.client``), routed by
``dispatcher``, with state changes serialized on the ``control`` thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import BootstrapConfig, ConfigError, RuntimeConfig, load_bootstrap, parse_runtime
from agent.daemon.commands import CommandError, Commands
from agent.daemon.control import ControlLoop
from agent.daemon.dispatcher import Dispatcher
from agent.daemon.inference import InferenceHandler
from agent.daemon.ingest import IngestWriter, KnownLabels, LabeledHandler
from agent.daemon.replies import Inflight, Replier
from agent.daemon.reports import Reporter, TelemetryLoop
from agent.daemon.runtime_config import LiveConfig, RuntimeConfigHandler
from agent.daemon.serving import SwitchableEngine
from agent.daemon.settings import (
    EngineLike,
    engine_config,
    learner_settings,
    open_engine,
    problems_on_this_box,
)
from agent.health import Counters, SystemProbe
from agent.learner.manager import LearnerManager
from agent.messages import Command, ErrorCode, MessageError
from agent.mqtt import InboundMessage, MqttClient, Will
from agent.store import StorageError, Store
from agent.topics import Kind, Topics

log = logging.getLogger(__name__)

# Requests are answered now or not at all, so the box subscribes to them at QoS 0. The broker lets
# only ``broker.receive_maximum`` QoS 1 messages be in flight to a connection before it waits for
# acks, and samples, feedback and events are acked only after their commit: while the store cannot
# commit (a full disk) they fill that window, and a QoS 1 request behind them would wait until the
# disk had room again (the chaos suite's disk_full found it). QoS 0 messages pass a full window.
# A request sent while the box is offline is not queued for it (queue_qos0_messages false): its
# sender times out and asks again, instead of getting a late answer after a reconnect.
REQUEST_KINDS = frozenset({Kind.INFER, Kind.ENTITIES, Kind.COMMAND})

# Seconds SIGTERM waits for in-flight inference and the last commit.
DRAIN_TIMEOUT_S = 10.0
# The writer must have looped this recently for the watchdog to be fed.
WRITER_STALL_S = 60.0


class ConfigTopic:
    """``config`` messages go to the control thread; an empty retained message clears nothing."""

    kinds = (Kind.CONFIG,)

    def __init__(self, handler: RuntimeConfigHandler, control: ControlLoop):
        self.handler = handler
        self.control = control

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        self.control.submit("config", lambda: self.handler.apply(model, msg))

    def reject_message(self, kind: Kind, msg: InboundMessage, err: MessageError) -> None:
        self.control.submit("config_error", lambda: self.handler.reject(err, msg))

    def on_empty(self, msg: InboundMessage) -> None:
        log.info("retained desired config cleared; keeping version %d", self.handler.live.current.version)
        self.handler.transport.ack(msg)


class CommandTopic:
    kinds = (Kind.COMMAND,)

    def __init__(self, commands: Commands, control: ControlLoop):
        self.commands = commands
        self.control = control

    def handle(self, kind: Kind, model: Any, msg: InboundMessage) -> None:
        assert isinstance(model, Command)
        self.control.submit("cmd", lambda: self.commands.run(model, msg))


class EdgeAgent:
    """The daemon: ``init_*`` builds, ``start`` starts in order, ``stop`` ends in reverse."""

    def __init__(
        self,
        boot: BootstrapConfig,
        *,
        config_path: Path | None = None,
        engine_factory: Callable[[BootstrapConfig, RuntimeConfig], EngineLike] = open_engine,
        engine_config_factory: Callable[[BootstrapConfig, RuntimeConfig], Any] = engine_config,
    ):
        self.boot = boot
        self.config_path = config_path
        self.topics = Topics(boot.site, boot.device)
        self.counters = Counters()
        self.inflight = Inflight()
        self.live = LiveConfig()
        self.draining = False
        self.stop_event = threading.Event()
        self.control = ControlLoop(self.stop_event)
        self._engine_factory = engine_factory
        self._engine_config = engine_config_factory
        self._threads: list[threading.Thread] = []
        self.store: Store
        self.engine: SwitchableEngine  # delegates to the InferenceEngine serving now
        self.learner: LearnerManager | None = None
        self.learner_cgroup: Any = None  # agent.ops.cgroup.LearnerCgroup under systemd with Delegate=
        self.sync: Any = None  # agent.fed.client.SyncClient when the bootstrap file has [fleet]
        self.bundles: Any = None  # agent.fed.bundles.BundleUpdater, likewise
        self.transport: MqttClient
        self.replier: Replier
        self.dispatcher: Dispatcher
        self.commands: Commands
        self.writer: IngestWriter
        self.reporter: Reporter
        self.probe: SystemProbe

    @property
    def runtime(self) -> RuntimeConfig:
        """The runtime config in force."""
        return self.live.current

    # ---- init ----------------------------------------------------------------------------------
    def init_store(self) -> None:
        self.store = Store(
            self.boot.db_path,
            synchronous=self.boot.store.synchronous,
            busy_timeout_ms=self.boot.store.busy_timeout_ms,
        ).open()

    def init_runtime_config(self) -> None:
        """The last accepted config from SQLite: in force even when the broker is unreachable."""
        saved = self.store.last_accepted_config()
        if saved is None:
            log.info("runtime config: built-in defaults (version 0)")
            return
        try:
            self.live.set(parse_runtime(saved))
        except ConfigError as e:
            log.error(
                "stored config version %s no longer validates (%s); using defaults", saved.get("version"), e
            )
            return
        log.info("runtime config: version %d from the store", self.runtime.version)

    def init_engine(self) -> None:
        bundle = self.served_bundle()
        if self._engine_factory is open_engine:
            # The INT8-vs-fp32 trial is judged on this plant's own texts when it has some.
            engine = open_engine(self.boot, self.runtime, self.store.recent_holdout_texts(256), bundle)
        else:
            engine = self._engine_factory(self.boot, self.runtime)
        # Replaceable as a whole when headquarters releases a new base model (agent.fed.bundles).
        self.engine = SwitchableEngine(engine, bundle)

    def served_bundle(self) -> Path:
        """The bundle to serve: the last base model switched to from headquarters, while its files
        are intact; the bootstrap file's otherwise."""
        from agent.bundle import check_bundle

        released = self.store.sync_state("bundle.active_dir")
        if released and self.boot.fleet is not None:
            problems = check_bundle(Path(released), verify_hash=False)
            if not problems:
                return Path(released)
            log.error(
                "released bundle %s is not usable (%s); serving %s",
                released,
                "; ".join(problems),
                self.boot.bundle,
            )
        return self.boot.bundle

    def init_transport(self) -> None:
        subscriptions = {t: kind is Kind.CONFIG for t, kind in self.topics.inbound().items()}
        if self.boot.fleet is not None:
            from agent.fed.topics import FleetTopics

            subscriptions.update(FleetTopics(self.boot.fleet.id).box_subscriptions(self.boot.device))
        self.transport = MqttClient(
            self.boot.broker,
            self.boot.client_id,
            will=Will(self.topics.status, {"state": "offline", "clean": False, "device": self.boot.device}),
            # Only the desired config (and the fleet's round and global) is meant to be retained; a
            # retained request or sample left on the broker by mistake would otherwise be served
            # again after every reconnect.
            subscriptions=subscriptions,
            on_message=lambda msg: self.dispatcher.on_message(msg),
            on_connection_change=self._on_connection_change,
            qos0_topics=frozenset(t for t, kind in self.topics.inbound().items() if kind in REQUEST_KINDS),
        )
        self.replier = Replier(self.transport, self.topics, self.counters)
        self.dispatcher = Dispatcher(self.topics, self.replier, self.counters, lambda: self.draining)
        self.commands = Commands(self.store, self.replier, self.counters)

    def init_learner(self) -> None:
        """The learner needs an engine that can swap adapters; it restores the promoted one."""
        if not hasattr(self.engine, "activate_adapter"):
            return
        from agent.ops.cgroup import LearnerCgroup

        # Under systemd with Delegate=, the learner gets limits of its own (None elsewhere: logged).
        self.learner_cgroup = LearnerCgroup.for_this_process()
        if self.learner_cgroup is not None:
            try:
                self.learner_cgroup.setup()
            except OSError as e:
                log.warning("learner cgroup not set up (%s); service-wide limits only", e)
                self.learner_cgroup = None
        cgroup = self.learner_cgroup
        self.learner = LearnerManager(
            db_path=self.boot.db_path,
            bundle_dir=self.engine.bundle_dir,
            data_dir=self.boot.data_dir,
            engine=self.engine,
            settings=learner_settings(self.runtime),
            publish=self._learner_event,
            on_spawn=cgroup.add if cgroup is not None else None,
        )
        if self.runtime.learning.fast_learner:
            from agent.linear import preload

            preload()
        restored = self.learner.restore_active()
        if restored:
            log.info("adapter %s restored from the registry", restored)
        learner = self.learner
        self.live.listen(lambda config: setattr(learner, "settings", learner_settings(config)))
        self.control.every_idle("learner tick", learner.tick)
        self.commands.register("train_now", lambda args: _ok_or_raise(learner.train_now()))
        self.commands.register(
            "rollback", lambda args: _ok_or_raise(learner.rollback(args.get("version"), reason="command"))
        )
        self.commands.register("cancel_training", lambda args: _ok_or_raise(learner.cancel()))

    def _learner_event(self, event: str, body: dict[str, Any]) -> None:
        if self.transport.connected:
            self.transport.publish(self.topics.learner, {"event": event, "ts": round(time.time(), 3), **body})

    def init_workers(self) -> None:
        self.writer = IngestWriter(
            self.store,
            self.replier,
            self.counters,
            self.live,
            commit_window_ms=self.boot.store.commit_window_ms,
            max_batch=self.boot.store.max_batch,
        )
        self.live.add_check(problems_on_this_box)
        config_handler = RuntimeConfigHandler(
            self.live,
            self.store,
            self.engine,
            self.replier,
            self.counters,
            lambda config: self._engine_config(self.boot, config),
        )
        self.dispatcher.register(
            InferenceHandler(self.engine, self.replier, self.writer, self.inflight, self.counters, self.live)
        )
        self.dispatcher.register(LabeledHandler(self.writer, self.replier, KnownLabels(self.engine)))
        self.dispatcher.register(ConfigTopic(config_handler, self.control))
        self.dispatcher.register(CommandTopic(self.commands, self.control))
        self.probe = SystemProbe(self.boot.data_dir)
        self.reporter = Reporter(
            self.boot,
            self.live,
            self.engine,
            self.store,
            self.writer,
            self.transport,
            self.counters,
            self.probe,
            self._queues,
            lambda: self.draining,
        )
        learner = self.learner
        self.reporter.add_section("learner", lambda: learner.status() if learner is not None else None)
        if self.learner_cgroup is not None:
            self.reporter.add_section("learner_cgroup", self.learner_cgroup.learner_memory)
        # What the broker queued while the agent was away, what it dropped, the outage it is sized for.
        self.reporter.add_section("mqtt", self.transport.stats)
        self.commands.register("status", lambda args: self.reporter.status())
        self.commands.register("reload_config", lambda args: self.reload_config())
        self.commands.register("snapshot", lambda args: self.snapshot())

    def init_sync(self) -> None:
        """The fleet's sync client, when the bootstrap file names a fleet (``[fleet]``). Raises
        OSError/ValueError for unreadable trusted keys (a config error)."""
        from agent.fed.client import SyncClient, no_fleet_check

        if self.boot.fleet is None:
            self.live.add_check(no_fleet_check)
            return
        self.sync = SyncClient(
            boot=self.boot,
            store=self.store,
            transport=self.transport,
            live=self.live,
            learner=self.learner,
            engine=self.engine,
            counters=self.counters,
            box_topics=self.topics,
        )
        self.dispatcher.route(self.sync.topics.is_fleet_topic, self.sync.on_message)
        self.control.every_idle("sync tick", self.sync.tick)
        self.reporter.add_section("sync", self.sync.status)
        self.commands.register("sync_now", lambda args: self.sync.sync_now())
        from agent.fed.bundles import BundleUpdater

        sync = self.sync
        self.bundles = BundleUpdater(
            boot=self.boot,
            store=self.store,
            transport=self.transport,
            live=self.live,
            engine=self.engine,
            learner=self.learner,
            counters=self.counters,
            keys=sync.keys,
            open_engine=lambda bundle, texts, adapter: open_engine(
                self.boot, self.runtime, texts, bundle, adapter
            ),
            on_switched=sync.follow_bundle,
            event=sync.event,
        )
        sync.bundles = self.bundles
        self.reporter.add_section("bundle", self.bundles.status)
        self.commands.register("rollback_model", lambda args: _ok_or_raise(self.bundles.rollback()))

    # ---- start / stop --------------------------------------------------------------------------
    def start(self) -> None:
        self.writer.start()
        self.control.start()
        telemetry = TelemetryLoop(
            self.reporter, self.transport, self.topics.telemetry, self.live, self.stop_event
        )
        telemetry.start()
        self._threads = [self.control, telemetry]
        # Last: no message arrives before every handler is ready.
        self.transport.start()
        log.info(
            "edge-agent %s started: %s/%s, broker %s:%d, config v%d",
            __version__,
            self.boot.site,
            self.boot.device,
            self.boot.broker.host,
            self.boot.broker.port,
            self.runtime.version,
        )

    def stop(self) -> None:
        """Reverse order; the transport goes last because acks and replies still need it."""
        log.info("stopping: no new work; %d requests in flight", self.inflight.count)
        self.draining = True
        if not self.inflight.wait_idle(DRAIN_TIMEOUT_S):
            log.warning("%d inference requests unanswered after %.0fs", self.inflight.count, DRAIN_TIMEOUT_S)
        self.writer.stop(DRAIN_TIMEOUT_S)
        self.stop_event.set()
        self.control.wake_to_stop()
        for t in self._threads:
            t.join(5.0)
        if self.transport.connected:
            self.transport.publish_and_wait(
                self.topics.status, self.reporter.status_payload("offline", clean=True), retain=True
            )
        if self.learner is not None:
            self.learner.stop()
        if self.bundles is not None:
            self.bundles.close()
        self.transport.stop()
        self.engine.close()
        self.probe.close()
        self.store.close()
        log.info("stopped cleanly")

    def healthy(self) -> bool:
        """Fed to the watchdog: our threads alive and the writer looping."""
        threads_ok = (
            self.transport.alive and self.writer.is_alive() and all(t.is_alive() for t in self._threads)
        )
        return threads_ok and time.monotonic() - self.writer.heartbeat < WRITER_STALL_S

    # ---- what the parts report and a few commands of the app's own --------------------------------
    def _queues(self) -> dict[str, int]:
        return {
            "writer": self.writer.queue.qsize(),
            "control": self.control.qsize(),
            "inference_inflight": self.inflight.count,
        }

    def _on_connection_change(self, connected: bool) -> None:
        if connected and not self.draining:
            self.transport.publish(self.topics.status, self.reporter.status_payload("online"), retain=True)

    def snapshot(self) -> dict[str, Any]:
        try:
            path = self.store.snapshot(self.boot.data_dir / "snapshots")
        except StorageError as e:
            raise CommandError(ErrorCode.STORAGE, str(e)) from e
        return {"path": str(path), "bytes": path.stat().st_size}

    def reload_config(self) -> dict[str, Any]:
        """Re-read the bootstrap file (log level applies live, the rest on restart); re-fetch the
        retained runtime config from the broker."""
        result: dict[str, Any] = {"runtime_version": self.runtime.version, "restart_required": []}
        if self.config_path is not None:
            try:
                new = load_bootstrap(self.config_path)
            except ConfigError as e:
                raise CommandError(
                    ErrorCode.INVALID_PAYLOAD, f"bootstrap file invalid: {'; '.join(e.errors)}"
                ) from e
            old_dump, new_dump = self.boot.model_dump(mode="json"), new.model_dump(mode="json")
            result["restart_required"] = sorted(
                k for k in new_dump if k != "log_level" and new_dump[k] != old_dump[k]
            )
            if new.log_level != self.boot.log_level:
                logging.getLogger().setLevel(new.log_level)
                self.boot = self.boot.model_copy(update={"log_level": new.log_level})
            result["log_level"] = new.log_level
        self.transport.resubscribe(self.topics.config)
        return result

    def request_reload(self) -> None:
        self.control.submit("reload", self.reload_config)


def _ok_or_raise(result: dict[str, Any]) -> dict[str, Any]:
    """The learner answers ``{"ok": False, "error": ...}`` for what it cannot do now."""
    if not result.get("ok"):
        raise CommandError(ErrorCode.NOT_AVAILABLE, str(result.get("error")))
    return result
