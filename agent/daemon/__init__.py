"""``edge-agent run``: the daemon. One app object that starts things in order and stops them in reverse.

Where each part lives (one module per inbound topic, so a topic's code is in one place):

| module            | what                                                                   |
|-------------------|------------------------------------------------------------------------|
| ``main``          | the process: signals, sd_notify READY/WATCHDOG/STOPPING, exit codes     |
| ``app``           | ``EdgeAgent``: builds the parts (``init_*``), starts them, stops them   |
| ``dispatcher``    | paho's thread: topic -> schema -> handler                               |
| ``inference``     | ``infer/req`` -> ``infer/res``, ``events`` -> ``predictions``          |
| ``ingest``        | ``samples``, ``feedback``: label check, group commit, ack after commit  |
| ``runtime_config``| ``config`` -> ``config/state``: validate, apply live, persist, report   |
| ``commands``      | ``cmd`` -> ``cmd/res``: the command table and its audit                 |
| ``control``       | the thread that runs configs, commands and the learner/sync steps       |
| ``reports``       | ``status`` and ``telemetry``                                            |
| ``replies``       | result topics, rejections, in-flight count                              |
| ``settings``      | the runtime config in the services' own terms                           |

Threads: paho's network thread (the dispatcher), the ingest writer, control, telemetry, and the
main thread (signals, systemd notification and watchdog pings).
"""

from agent.daemon.app import EdgeAgent
from agent.daemon.main import add_commands, init_app, main, run

__all__ = ["EdgeAgent", "add_commands", "init_app", "main", "run"]
