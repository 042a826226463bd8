"""A loopback TCP proxy that cuts connections the way networks do.

``cut()`` resets the client's side (SO_LINGER 0, so an RST and never a FIN)
and leaves the server's side open and unread: the server learns nothing and
keeps writing into a socket until its buffers fill, as it does behind a
dropped Wi-Fi or a sleeping laptop. ``accepting`` holds new connections
(the client is away) until it is set again. While ``answers_muted`` is set,
what the server sends is dropped and what the client sends still arrives:
a request the server runs and whose answer never comes.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass, field

from liveservers.processes import LOOPBACK


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    cut: bool = False
    ended: int = 0
    pumps: list[threading.Thread] = field(default_factory=list)


class CuttingProxy:
    """Forwards loopback TCP connections to ``upstream_port``, until ``cut()``."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepting = threading.Event()
        self.accepting.set()
        self.answers_muted = threading.Event()
        self._pairs: list[_Pair] = []
        self._zombies: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        # While paused, a new connection waits here: the client is away.
        while not self.accepting.wait(0.05):
            if self._closed:
                client.close()
                return
        try:
            upstream = socket.create_connection((LOOPBACK, self.upstream_port), timeout=10)
        except OSError:
            # The server is gone (stopped, restarting): the client sees a close.
            client.close()
            return
        pair = _Pair(client, upstream)
        with self._lock:
            self._pairs.append(pair)
        for src, dst in ((client, upstream), (upstream, client)):
            pump = threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True)
            pair.pumps.append(pump)
            pump.start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not pair.cut:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready or pair.cut:
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # a clean close travels on
                    break
                if not (src is pair.upstream and self.answers_muted.is_set()):
                    dst.sendall(data)
        except OSError:
            pass
        if pair.cut:
            return
        with self._lock:
            pair.ended += 1
            done = pair.ended == 2 or src is pair.upstream
            if done and pair in self._pairs:
                self._pairs.remove(pair)
        if done:
            pair.client.close()
            pair.upstream.close()

    def cut(self) -> int:
        """Drop every live connection without a FIN: the client side is reset,
        the server side stays open and is never read again. How many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.cut = True
            for pump in pair.pumps:
                pump.join(5)
            pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            pair.client.close()
            self._zombies.append(pair.upstream)
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.cut = True
            self._zombies.extend([pair.client, pair.upstream])
        for sock in self._zombies:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
