"""A server that is up and stuck: it accepts TCP connections and never
answers. The fault tests stand it in for Redis, Pushpin's control port or
PostgreSQL."""

from __future__ import annotations

import socket
import threading

from liveservers.processes import LOOPBACK


class BlackHole:
    """Listens on ``port`` (any free one by default), accepts every
    connection and holds it open without a byte in reply."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server((LOOPBACK, port))
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()
