"""A TCP relay between one client and the broker that a test can cut and restore: a network outage
for one box while the rest of the fleet stays connected."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from tests.integration.mosquitto import free_port


class NetProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server((self.host, self.port))
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept_loop, name="netproxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (the client sees a dead network)."""
        self._up.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(2)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while self._up.is_set() and not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
