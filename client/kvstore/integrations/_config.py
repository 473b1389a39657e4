"""Options shared by every adapter: where kvstored is and how to talk to it.

Engines hand their plugins configuration as flat string maps (LMCache's
``extra_config``, SGLang's ``--hicache-storage-backend-extra-config`` JSON,
vLLM's ``kv_connector_extra_config``), so values may arrive as strings and are
converted here. Unknown options are reported (a typo must not silently leave a
default in force).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from .. import errors
from .._common import TLSConfig
from ..client import Client

log = logging.getLogger("kvstore.integrations")

DEFAULT_ADDRESS = "127.0.0.1:7070"


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise errors.InvalidArgument(f"not a boolean: {v!r}")


@dataclasses.dataclass
class ClientOptions:
    """How an adapter reaches kvstored.

    ``address`` is the control (gRPC) address ``host:port``; a ``kvstore://host:port``
    URL is accepted too. ``cluster`` (or a ``kvstore+cluster://a:7070,b:7070`` URL): the
    addresses are seeds of a kvstored cluster and the adapter gets a ClusterClient. ``token`` may also come from ``token_file`` or the
    ``KVSTORE_TOKEN`` environment variable (so that it need not sit in an engine's
    config). ``tls_*`` turn TLS on (``tls_ca_file`` alone: server authentication;
    with ``tls_cert_file``/``tls_key_file``: mutual TLS).
    """

    address: str = DEFAULT_ADDRESS
    namespace: str = "default"
    token: str | None = None
    token_file: str | None = None
    # seconds for one call; short, since an engine waits on it (a refused connection
    # fails at once whatever this is; it bounds a daemon that accepts and hangs)
    timeout: float = 5.0
    data_address: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_name: str | None = None
    tcp_congestion: str = ""
    verify_checksums: bool = True
    # a cluster: ``address`` is then one or more comma-separated node addresses (seeds);
    # members and namespace policies come from the nodes (ClusterClient.from_cluster)
    cluster: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, *, prefix: str = "",
                     defaults: Mapping[str, Any] | None = None,
                     ignore: Iterable[str] = ()) -> tuple["ClientOptions", dict[str, Any]]:
        """Build options from ``values`` (keys ``prefix + field``).

        Returns the options and a dict of the remaining ``prefix``-ed keys (without the
        prefix) that are not client options: the adapter's own settings. Keys without
        the prefix are not looked at.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = dict(defaults or {})
        rest: dict[str, Any] = {}
        skip = set(ignore)
        for k, v in (values or {}).items():
            if not isinstance(k, str) or not k.startswith(prefix):
                continue
            name = k[len(prefix):]
            if name in skip:
                continue
            if name in fields:
                kw[name] = v
            else:
                rest[name] = v
        out: dict[str, Any] = {}
        for name, v in kw.items():
            if v is None:
                out[name] = None
                continue
            t = fields[name].type
            try:
                if t in ("float",):
                    out[name] = float(v)
                elif t in ("bool",):
                    out[name] = _to_bool(v)
                else:
                    out[name] = str(v)
            except (TypeError, ValueError) as e:
                raise errors.InvalidArgument(f"kvstore option {prefix}{name}: {e}") from None
        opts = cls(**out)
        for scheme, cluster in (("kvstore://", False), ("kvstore+cluster://", True)):
            if opts.address.startswith(scheme):
                opts.address = opts.address[len(scheme):].split("/", 1)[0]
                opts.cluster = opts.cluster or cluster
        if opts.timeout <= 0:
            raise errors.InvalidArgument(f"kvstore option {prefix}timeout must be positive")
        return opts, rest

    def resolved_token(self) -> str | None:
        if self.token:
            return self.token
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    return f.read().strip() or None
            except OSError as e:
                raise errors.InvalidArgument(f"kvstore token_file {self.token_file}: {e.strerror}") from None
        return os.environ.get("KVSTORE_TOKEN") or None

    def tls_config(self) -> TLSConfig | None:
        if not (self.tls or self.tls_ca_file or self.tls_cert_file):
            return None
        return TLSConfig(ca_file=self.tls_ca_file, cert_file=self.tls_cert_file,
                         key_file=self.tls_key_file, server_name=self.tls_server_name)

    def describe(self) -> str:
        """One line for logs (never the token)."""
        tls = "tls" if self.tls_config() else "plaintext"
        auth = "token" if self.resolved_token() else "no token"
        what = "kvstored cluster via" if self.cluster else "kvstored"
        return f"{what} {self.address} namespace={self.namespace} ({tls}, {auth})"


def client_from_options(opts: ClientOptions):
    """A blocking :class:`kvstore.Client` for ``opts`` (thread-safe; one data
    connection per calling thread, opened on first use), or with ``cluster`` a
    :class:`kvstore.cluster.ClusterClient` over the nodes ``address`` lists."""
    if opts.cluster:
        from ..cluster import ClusterClient
        if opts.data_address:
            raise errors.InvalidArgument("kvstore option data_address does not apply to a cluster "
                                         "(each node's data address comes from the member list)")
        seeds = [a.strip() for a in opts.address.split(",") if a.strip()]
        return ClusterClient.from_cluster(
            seeds, namespace=opts.namespace, node_timeout=opts.timeout,
            verify_checksums=opts.verify_checksums, tcp_congestion=opts.tcp_congestion,
            tls=opts.tls_config(), token=opts.resolved_token())
    return Client(opts.address, namespace=opts.namespace, timeout=opts.timeout,
                  verify_checksums=opts.verify_checksums, data_address=opts.data_address,
                  tcp_congestion=opts.tcp_congestion, tls=opts.tls_config(),
                  token=opts.resolved_token())


def lookup_prefix(client: Client, keys: Sequence[bytes], *, batch: int = 4096) -> int:
    """How many of ``keys`` are stored counting from the first (``Client.lookup``),
    in rounds of at most ``batch`` keys so a long prompt never exceeds the daemon's
    ``max_batch_keys``."""
    hit = 0
    for start in range(0, len(keys), batch):
        part = keys[start:start + batch]
        n = client.lookup(part)
        hit += n
        if n < len(part):
            break
    return hit
