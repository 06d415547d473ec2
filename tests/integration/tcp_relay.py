"""A TCP relay on loopback that a test can cut, to take Kafka away from everyone and give it
back (a network outage or a broker that is down, without losing the broker's data).

The broker must advertise the relay's address (``EmbeddedBroker(advertised_port=...)``), or
clients would reach it directly after bootstrapping. ``cut()`` closes every relayed
connection and stops listening (new connections are refused, as by a host that is down);
``restore()`` listens again on the same port. ``freeze()`` is a silent outage (a host powered
off, a network partition): connections stay open but no byte passes and no new connection is
served, so clients see no error until their own timeouts; ``thaw()`` lets the bytes flow on.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

from recorder.broker import free_loopback_port


class TcpRelay:
    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_loopback_port()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections = 0  # accepted so far

    def start(self) -> TcpRelay:
        self._listen()
        self._thread = threading.Thread(target=self._pump, name="tcp-relay", daemon=True)
        self._thread.start()
        return self

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pairs, self._pairs = self._pairs, []
        if listener is not None:
            listener.close()
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def restore(self) -> None:
        self._listen()

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
        if self._thread is not None:
            self._thread.join(5)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.setblocking(False)
        with self._lock:
            self._listener = sock

    def _pump(self) -> None:
        """One thread: accept, and copy bytes both ways, polling every 50 ms."""
        while not self._stop.is_set():
            if self._frozen.is_set():
                self._stop.wait(0.05)
                continue
            with self._lock:
                listener = self._listener
                pairs = list(self._pairs)
            sel = selectors.DefaultSelector()
            try:
                if listener is not None:
                    sel.register(listener, selectors.EVENT_READ, None)
                for a, b in pairs:
                    sel.register(a, selectors.EVENT_READ, b)
                    sel.register(b, selectors.EVENT_READ, a)
            except (OSError, ValueError):  # a socket closed by cut() meanwhile
                sel.close()
                continue
            try:
                ready = sel.select(0.05)
            except (OSError, ValueError):
                ready = []
            for key, _ in ready:
                if key.data is None:
                    self._accept(key.fileobj)  # type: ignore[arg-type]
                else:
                    self._copy(key.fileobj, key.data)  # type: ignore[arg-type]
            sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(True)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._listener is None:  # cut meanwhile
                client.close()
                upstream.close()
                return
            self._pairs.append((client, upstream))
            self.connections += 1

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(1 << 16)
            if data:
                dst.sendall(data)
                return
        except OSError:
            pass
        with self._lock:  # EOF or error: drop the pair
            pair = next((p for p in self._pairs if src in p), None)
            if pair is not None:
                self._pairs.remove(pair)
        if pair is not None:
            for s in pair:
                s.close()
