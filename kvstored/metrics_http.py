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
# most COLLECTS_PER_S fresh bodies are made a second (Prometheus scrapes every 10-60 s);
# past that a body made for the same request within CACHE_S is sent again, else 503 +
# Retry-After; and at most MAX_CONNECTIONS connections are served at once (more are
# closed on accept).
CACHE_S = 1.0
CACHE_ENTRIES = 8
COLLECTS_PER_S = 5
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
        self._cache: dict[tuple, tuple[float, tuple]] = {}  # request -> (when, response)
        self._collects: list[float] = []  # when the last fresh bodies were made

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

    def _scrape(self, query: str, headers: dict[str, str]):
        """/metrics: a fresh body while fewer than COLLECTS_PER_S were made in the last
        second; past that (a flood) the body made for the same request within CACHE_S,
        else 503 + Retry-After."""
        gz = gzip_accepted(headers.get("accept-encoding", ""))
        key = (headers.get("accept", ""), query, gz)
        now = time.monotonic()
        self._collects = [t for t in self._collects if now - t < 1.0]
        if len(self._collects) >= COLLECTS_PER_S:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < CACHE_S:
                return hit[1]
            self.refused += 1
            log.warning("metrics scrapes over %d a second: answered 503", COLLECTS_PER_S)
            return 503, "text/plain; charset=utf-8", b"too many scrapes: retry in 1s\n", \
                [("Retry-After", "1")]
        self._collects.append(now)
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
        response = 200, ctype, body, extra
        if key not in self._cache and len(self._cache) >= CACHE_ENTRIES:
            self._cache.pop(min(self._cache, key=lambda k: self._cache[k][0]))
        self._cache[key] = (now, response)
        return response

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
                    t0 = time.perf_counter()
                    try:
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
