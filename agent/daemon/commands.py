"""``cmd`` → ``cmd/res``: named commands, each audited in SQLite so a redelivered one is answered, not rerun.

Parts of the agent register their own commands (the learner its ``train_now``/``rollback``, the
sync client its ``sync_now``); until they do, a command answers ``not_available`` with the part it
needs. Commands run on the control thread, one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.daemon.replies import Replier
from agent.health import Counters
from agent.messages import Command, ErrorCode
from agent.mqtt import InboundMessage
from agent.store import StorageError, Store
from agent.topics import Kind

log = logging.getLogger(__name__)


class CommandError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


CommandFn = Callable[[dict[str, Any]], dict[str, Any]]


def not_available(name: str, part: str) -> CommandFn:
    """The answer for commands whose part of the agent is not running (learner, sync)."""

    def handler(args: dict[str, Any]) -> dict[str, Any]:
        raise CommandError(ErrorCode.NOT_AVAILABLE, f"{name} is not available: it needs the {part}")

    return handler


class Commands:
    """The command table and its audit; ``run`` is called from the control thread."""

    def __init__(self, store: Store, replier: Replier, counters: Counters):
        self.store = store
        self.replier = replier
        self.counters = counters
        self.table: dict[str, CommandFn] = {
            "train_now": not_available("train_now", "learner"),
            "rollback": not_available("rollback", "learner"),
            "cancel_training": not_available("cancel_training", "learner"),
            "sync_now": not_available("sync_now", "fedsync client (sync.enabled and a [fleet] section)"),
        }

    def register(self, name: str, fn: CommandFn) -> None:
        self.table[name] = fn

    def run(self, cmd: Command, msg: InboundMessage | None) -> dict[str, Any]:
        try:
            previous = self.store.begin_command(cmd.id, cmd.cmd, cmd.args)
        except StorageError as e:
            log.warning("command %s (%s) not audited: %s", cmd.id, cmd.cmd, e)
            previous = None
        if previous is not None:
            log.info("command %s (%s) redelivered: answering from the audit", cmd.id, cmd.cmd)
            result = previous
        else:
            result = self._execute(cmd)
            try:
                self.store.finish_command(cmd.id, bool(result.get("ok")), result)
            except StorageError as e:
                log.warning("command %s result not audited: %s", cmd.id, e)
        self.replier.reply(Kind.COMMAND, msg, result)
        if msg is not None:
            self.replier.transport.ack(msg)
        return result

    def _execute(self, cmd: Command) -> dict[str, Any]:
        fn = self.table.get(cmd.cmd)
        base = {"id": cmd.id, "cmd": cmd.cmd}
        try:
            if fn is None:
                raise CommandError(
                    ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd.cmd!r}; known: {sorted(self.table)}"
                )
            result = fn(dict(cmd.args))
        except CommandError as e:
            self.counters.inc("command_errors", str(e.code))
            log.warning("command %s (%s) failed: %s", cmd.id, cmd.cmd, e.message)
            return {**base, "ok": False, "error": {"code": str(e.code), "message": e.message}}
        except Exception as e:
            self.counters.inc("command_errors", str(ErrorCode.INTERNAL))
            log.exception("command %s (%s) crashed", cmd.id, cmd.cmd)
            return {**base, "ok": False, "error": {"code": str(ErrorCode.INTERNAL), "message": str(e)}}
        log.info("command %s (%s) done", cmd.id, cmd.cmd)
        return {**base, "ok": True, "result": result}
