"""The status file the container's HEALTHCHECK reads: atomic writes, freshness, the CLI's exit code."""

from __future__ import annotations

import json
import threading
import time

import pytest

from agent.health import STATUS_FILE_NAME, check_status_file, status_file_path, write_status_file


def test_write_then_check_fresh_and_healthy(tmp_path):
    path = status_file_path(tmp_path)
    assert path.name == STATUS_FILE_NAME
    write_status_file(path, True, {"state": "online", "connected": True})
    status = json.loads(path.read_text())
    assert status["healthy"] is True and status["state"] == "online" and status["connected"] is True
    assert abs(status["ts"] - time.time()) < 5 and isinstance(status["pid"], int)
    check = check_status_file(path, max_age_s=30)
    assert check.ok and "online" in check.reason
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_FILE_NAME]  # no temp file left


def test_payload_cannot_fake_health_or_time(tmp_path):
    path = tmp_path / "s.json"
    write_status_file(path, False, {"healthy": True, "ts": time.time() + 1e6, "state": "stopping"})
    status = json.loads(path.read_text())
    assert status["healthy"] is False and status["ts"] < time.time() + 5
    check = check_status_file(path)
    assert not check.ok and "unhealthy" in check.reason and "stopping" in check.reason


@pytest.mark.parametrize(
    ("content", "age", "reason"),
    [
        (None, 0, "does not exist"),
        ("{not json", 0, "unreadable"),
        ('{"healthy": true}', 0, "no timestamp"),
        ("[1, 2]", 0, "no timestamp"),
        ("healthy", 31, "31 s old"),
        ("healthy", -31, "-31 s old"),  # a clock that jumped back: the file looks from the future
    ],
)
def test_check_refuses(tmp_path, content, age, reason):
    path = tmp_path / "s.json"
    now = 1_000_000.0
    if content == "healthy":
        path.write_text(json.dumps({"healthy": True, "ts": now - age}))
    elif content is not None:
        path.write_text(content)
    check = check_status_file(path, max_age_s=30, now=now)
    assert not check.ok and reason in check.reason, check.reason


def test_boundary_age_is_fresh(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"healthy": True, "ts": 100.0}))
    assert check_status_file(path, max_age_s=30, now=130.0).ok
    assert not check_status_file(path, max_age_s=30, now=130.5).ok


def test_reader_never_sees_half_a_file(tmp_path):
    path = tmp_path / "s.json"
    write_status_file(path, True, {"state": "online"})
    stop = threading.Event()
    bad: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            write_status_file(path, True, {"state": "online", "padding": "x" * (i % 5000)})
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < deadline:
            check = check_status_file(path)
            reads += 1
            if not check.ok:
                bad.append(check.reason)
    finally:
        stop.set()
        t.join()
    assert reads > 50 and bad == []


def test_healthcheck_command_exit_codes(tmp_path, capsys):
    from agent.cli import main

    path = tmp_path / "status.json"
    assert main(["healthcheck", "--file", str(path)]) == 1
    assert "does not exist" in capsys.readouterr().out
    write_status_file(path, True, {"state": "online"})
    assert main(["healthcheck", "--file", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: healthy (state online)")
    write_status_file(path, False, {"state": "stopping"})
    assert main(["healthcheck", "--file", str(path)]) == 1
    path.write_text(json.dumps({"healthy": True, "ts": time.time() - 100}))
    assert main(["healthcheck", "--file", str(path), "--max-age", "120"]) == 0
    assert main(["healthcheck", "--file", str(path), "--max-age", "60"]) == 1
    assert "stopped writing it" in capsys.readouterr().out


def test_healthcheck_finds_the_file_from_the_bootstrap_config(tmp_path, capsys):
    from agent.cli import main

    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "s"\ndevice = "d"\ndata_dir = "{data}"\nbundle = "{tmp_path}"\n[broker]\nhost = "127.0.0.1"\n'
    )
    assert main(["healthcheck", "--config", str(config)]) == 1
    write_status_file(status_file_path(data), True, {"state": "online"})
    assert main(["healthcheck", "--config", str(config)]) == 0


def test_sd_notify_never_blocks_on_a_socket_nobody_reads(tmp_path, monkeypatch):
    import socket

    from agent.health import sd_notify

    path = tmp_path / "notify.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))  # bound, never read: its queue fills after a few hundred datagrams
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        sent = [sd_notify("WATCHDOG=1", f"STATUS=tick {i}") for i in range(5000)]
    finally:
        reader.close()
    assert sent[0] is True and sent[-1] is False  # the full queue dropped pings instead of waiting
