"""The metrics HTTP endpoint on the daemon's event loop: ``/metrics`` (text or
OpenMetrics by ``Accept``, gzip when asked), ``/healthz`` (200 while the process is
alive), ``/readyz`` (200 when serving, 503 while starting, warming or draining) and
``/config`` (the running configuration as TOML, credentials redacted).

One request per connection, on the loop the Store lives on: the collectors read the
Store, which has no locks (prometheus_client's thread-per-request server is ruled out).
"""
from __future__ import annotations

import asyncio
import gzip
import logging
import time
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

if TYPE_CHECKING:
    from kvstored.status import NodeStatus

log = logging.getLogger("kvstored.metrics")

HEAD_LIMIT = 16 << 10  # request line + headers
REQUEST_TIMEOUT = 10.0
# A scrape runs every collector on the loop that serves the data plane (~5-30 ms): a flood
# of scrapes (8 clients in a loop) took a good client's put+get from 0.4 ms to 22 ms. At
# most COLLECTS_PER_S bodies are made a second (Prometheus scrapes every 10-60 s); a scrape
# over that waits for its turn, up to QUEUE_S (then 503 + Retry-After), and is always a
# fresh body: an earlier body sent again made quick before/after reads of a counter (a
# test, a script polling a metric) see no change. At most MAX_CONNECTIONS connections are
# served at once (more are closed on accept), so at most that many scrapes wait.
COLLECTS_PER_S = 5
QUEUE_S = 5.0
MAX_CONNECTIONS = 64


class MetricsServer:
    """HTTP/1.1 (one request per connection) on the daemon's loop: /metrics /healthz /readyz."""

    def __init__(self, registry: CollectorRegistry, status: "NodeStatus",
                 config_text: Callable[[], str] | None = None):
        self.registry = registry
        self.status = status
        self.config_text = config_text  # /config: the running config as TOML (redacted)
        self.server: asyncio.base_events.Server | None = None
        self.open = 0  # connections being served
        self.refused = 0  # connections closed at MAX_CONNECTIONS, scrapes over COLLECTS_PER_S
        self._collects: list[float] = []  # when the last bodies were made

    async def start(self, host: str, port: int) -> int:
        self.server = await asyncio.start_server(self._handle, host, port, limit=HEAD_LIMIT,
                                                 reuse_address=True)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _respond(self, method: str, path: str, query: str, headers: dict[str, str]):
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"live\n", []
        if path == "/readyz":
            ok = self.status.ready
            return (200 if ok else 503), "text/plain; charset=utf-8", \
                f"{'ready' if ok else 'not ready'}: {self.status.readiness()}\n".encode(), []
        if path == "/config" and self.config_text is not None:
            return 200, "text/plain; charset=utf-8", self.config_text().encode(), []
        if path in ("/metrics", "/"):
            return self._scrape(query, headers)
        return 404, "text/plain; charset=utf-8", \
            b"not found: try /metrics, /healthz, /readyz, /config\n", []

    async def _turn(self) -> bool:
        """Wait until fewer than COLLECTS_PER_S bodies were made in the last second (False
        after QUEUE_S: answer 503), and take the turn."""
        deadline = time.monotonic() + QUEUE_S
        while True:
            now = time.monotonic()
            self._collects = [t for t in self._collects if now - t < 1.0]
            if len(self._collects) < COLLECTS_PER_S:
                self._collects.append(now)
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(min(deadline - now, 1.0 - (now - self._collects[0]) + 0.001))

    def _scrape(self, query: str, headers: dict[str, str]):
        """/metrics: a body made now (its turn taken by ``_turn``)."""
        gz = gzip_accepted(headers.get("accept-encoding", ""))
        encoder, ctype = choose_encoder(headers.get("accept", ""))
        registry = self.registry
        params = parse_qs(query)
        if "name[]" in params:
            registry = registry.restricted_registry(params["name[]"])
        body = encoder(registry)
        extra = []
        if gz:
            body = gzip.compress(body, compresslevel=1)
            extra.append(("Content-Encoding", "gzip"))
        return 200, ctype, body, extra

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            self.refused += 1
            log.warning("metrics port: %d connections open, closing a new one", MAX_CONNECTIONS)
            writer.transport.abort()
            return
        self.open += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                    ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split()
            if len(parts) != 3:
                status, ctype, body, extra = 400, "text/plain", b"bad request\n", []
                method = "GET"
            else:
                method, target, _version = parts
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                if method not in ("GET", "HEAD"):
                    status, ctype, body, extra = (405, "text/plain", b"use GET\n",
                                                  [("Allow", "GET, HEAD")])
                else:
                    url = urlsplit(target)
                    status = None
                    if url.path in ("/metrics", "/") and not await self._turn():
                        self.refused += 1
                        log.warning("metrics scrapes over %d a second waited %.0f s: answered 503",
                                    COLLECTS_PER_S, QUEUE_S)
                        status, ctype, body, extra = (503, "text/plain; charset=utf-8",
                                                      b"too many scrapes: retry in 1s\n",
                                                      [("Retry-After", "1")])
                    t0 = time.perf_counter()
                    try:
                        if status is None:
                            status, ctype, body, extra = self._respond(method, url.path, url.query,
                                                                       headers)
                    except Exception:
                        log.exception("metrics scrape failed")
                        status, ctype, body, extra = 500, "text/plain", b"internal error\n", []
                    if time.perf_counter() - t0 > 0.1:
                        log.info("slow metrics scrape", extra={
                            "seconds": round(time.perf_counter() - t0, 3)})
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                      405: "Method Not Allowed", 500: "Internal Server Error",
                      503: "Service Unavailable"}[status]
            out = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
                   f"Content-Length: {len(body)}", "Connection: close",
                   *(f"{k}: {v}" for k, v in extra)]
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self.open -= 1
            writer.close()
