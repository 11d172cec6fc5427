"""``edge-agent run``: the daemon as a process. Signals, systemd notification, exit codes.

SIGTERM: stop taking work (new messages stay unacked, so the broker keeps them for the next run),
finish in-flight inference, commit and ack what was received, publish a clean ``offline`` status,
disconnect, exit 0. SIGHUP re-reads the bootstrap file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from agent import exit_codes
from agent.config import ConfigError, json_schema, load_bootstrap, validate_config_file
from agent.daemon.app import EdgeAgent
from agent.health import sd_notify, status_file_path, supervise
from agent.store import StorageError

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps the time itself.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("agent.mqtt.paho").setLevel(max(logging.getLevelName(level), logging.INFO))


def run(config_path: Path, log_level: str | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns an exit code (agent.exit_codes)."""
    try:
        boot = load_bootstrap(Path(config_path))
    except ConfigError as e:
        setup_logging(log_level or "INFO")
        for line in e.errors:
            log.error("config: %s", line)
        return exit_codes.CONFIG_ERROR
    setup_logging(log_level or boot.log_level)
    stop = threading.Event()
    app = EdgeAgent(boot, config_path=Path(config_path))
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: app.request_reload())

    sd_notify("STATUS=starting: store, engine, broker")
    code = init_app(app)
    if code != exit_codes.OK:
        return code
    try:
        app.start()
    except Exception:
        log.exception("start failed")
        return exit_codes.FAILURE
    sd_notify("READY=1", f"STATUS={_status_line(app)}")
    supervise(
        stop,
        app.healthy,
        lambda: _status_line(app),
        status_file_path(boot.data_dir),
        lambda: {
            "state": "online" if app.transport.connected else "connecting",
            "connected": app.transport.connected,
            "broker_error": app.transport.last_error,
            "adapter_version": app.engine.adapter_version,
            "config_version": app.runtime.version,
        },
    )
    sd_notify("STOPPING=1", "STATUS=stopping: finishing in-flight work")
    try:
        app.stop()
    except Exception:
        log.exception("stop failed")
        return exit_codes.FAILURE
    return exit_codes.OK


def init_app(app: EdgeAgent) -> int:
    """``init_*`` in order, each failure mapped to its exit code."""
    try:
        app.init_store()
        app.init_runtime_config()
    except StorageError as e:
        log.error("store %s: %s", app.boot.db_path, e)
        return exit_codes.STORE_ERROR
    try:
        app.init_engine()
    except (ValueError, OSError) as e:  # BundleError and AdapterError are ValueErrors
        log.error("bundle %s: %s", app.boot.bundle, e)
        app.store.close()
        return exit_codes.BUNDLE_ERROR
    except Exception:
        log.exception("engine failed to start")
        app.store.close()
        return exit_codes.FAILURE
    try:
        app.init_transport()
    except (OSError, ValueError) as e:  # password file, TLS files
        log.error("broker settings: %s", e)
        app.engine.close()
        app.store.close()
        return exit_codes.CONFIG_ERROR
    app.init_learner()
    app.init_workers()
    try:
        app.init_sync()
    except (OSError, ValueError) as e:  # trusted keys unreadable or not Ed25519
        log.error("fleet settings: %s", e)
        app.engine.close()
        app.store.close()
        return exit_codes.CONFIG_ERROR
    return exit_codes.OK


def _status_line(app: EdgeAgent) -> str:
    broker = f"{app.boot.broker.host}:{app.boot.broker.port}"
    if app.transport.connected:
        conn = f"connected to {broker}"
    else:
        # Why it is still waiting (refused login, TLS), so `systemctl status` says it at once.
        error = app.transport.last_error
        conn = f"waiting for broker {broker}" + (f": {error}" if error else "")
    err = f"; STORE: {app.writer.storage_error.reason}" if app.writer.storage_error else ""
    return f"{conn}; config v{app.runtime.version}; adapter {app.engine.adapter_version}{err}"


def cmd_run(args: argparse.Namespace) -> int:
    """``edge-agent run --config PATH [--log-level LEVEL]``."""
    return run(Path(args.config), getattr(args, "log_level", None))


def cmd_validate_config(args: argparse.Namespace) -> int:
    """``edge-agent validate-config PATH``: every error with its key path; exit CONFIG_ERROR if any."""
    path = Path(args.path)
    errors = validate_config_file(path)
    for line in errors:
        print(f"{path}: {line}", file=sys.stderr)
    if errors:
        print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    print(f"{path}: OK")
    return exit_codes.OK


def cmd_config_schema(args: argparse.Namespace) -> int:
    """``edge-agent config-schema [--bootstrap]``: JSON Schema of the runtime (or bootstrap) config."""
    print(json.dumps(json_schema("bootstrap" if getattr(args, "bootstrap", False) else "runtime"), indent=2))
    return exit_codes.OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The daemon's subcommands, for a CLI that wants them as they are."""
    r = sub.add_parser("run", help="run the agent daemon")
    r.add_argument("--config", required=True, help="bootstrap TOML file")
    r.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override the file's log_level"
    )
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate-config", help="check a config file (TOML bootstrap, or JSON runtime config)")
    v.add_argument("path")
    v.set_defaults(func=cmd_validate_config)
    s = sub.add_parser("config-schema", help="print the JSON Schema of the runtime config")
    s.add_argument("--bootstrap", action="store_true", help="the bootstrap file's schema instead")
    s.set_defaults(func=cmd_config_schema)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.daemon")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
