"""A TCP relay between an SDK client and a real kvstored, for tests that alter the daemon's
bytes in flight (a flipped bit, a cut stream, a rewritten header). Subclasses say what
happens to each direction (``up``: client -> daemon, ``down``: daemon -> client); by
default both are passed through. Bounded: socket timeouts, a stop event, and ``close``
shuts every socket down (which wakes a pump blocked in recv) and joins every thread."""
from __future__ import annotations

import socket
import threading


class Relay:
    def __init__(self, target: tuple[str, int], timeout: float = 10.0):
        self.target = target
        self.timeout = timeout
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except (socket.timeout, OSError):
                continue
            s = socket.create_connection(self.target, timeout=5)
            for x in (c, s):
                x.settimeout(self.timeout)
            self._socks += [c, s]
            self.accepted += 1
            for fn, args in self.pumps(c, s):
                t = threading.Thread(target=fn, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    def pumps(self, client: socket.socket, daemon: socket.socket) -> list:
        """(function, args) of the threads that move one connection's bytes."""
        return [(self.up, (client, daemon)), (self.down, (daemon, client))]

    def up(self, src: socket.socket, dst: socket.socket) -> None:
        self.pass_through(src, dst)

    def down(self, src: socket.socket, dst: socket.socket) -> None:
        self.pass_through(src, dst)

    def pass_through(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self.shut(src, dst)

    @staticmethod
    def shut(*socks) -> None:
        for x in socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            self.shut(s)  # wakes a pump blocked in recv (close alone does not)
            s.close()
        self.lsock.close()
        for t in self._threads:
            t.join(5)
        assert not any(t.is_alive() for t in self._threads)
