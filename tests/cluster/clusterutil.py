"""Helpers of the cluster tests and benchmarks: waiting, and checking an object's records."""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import kvstore
from kvstore import errors
from kvstore.layout import Policy, lap_key, parse_record, placement_key, slots

MIB = 1 << 20
# the fanned-out put and get tests' namespaces -> policies, and their object sizes (a
# byte, a page, small, EC-sized with a ragged tail, a block, over 2 MiB)
FANOUT_POLICIES = {"plain": "none", "rep": "replicas:2", "ec": "ec:3+2"}
FANOUT_SIZES = [1, 4096, 65_536, 300_001, MIB, 2 * MIB + 7]


def node_config(tmp: Path, etcd, name: str, cluster: str, policies: dict[str, str], *,
                repair_interval: float, cluster_extra: str = "", nvme: bool = False) -> tuple[str, ...]:
    """``--config`` args of a cluster node under ``etcd`` (lease_ttl 2, repair_delay 0.5):
    ``cluster_extra`` lines go in its [cluster] table; ``nvme`` gives it a 64 MiB tier file
    beside the config."""
    cfg = tmp / f"{name}.toml"
    pols = ", ".join(f"{ns}={p}" for ns, p in policies.items())
    text = (f'[node]\nid = "{name}"\n[cluster]\nenabled = true\nlease_ttl = 2\nname = "{cluster}"\n'
            f'etcd_endpoints = "{etcd.endpoint}"\nrepair_delay = 0.5\nrepair_interval = {repair_interval}\n'
            f'policies = "{pols}"\n{cluster_extra}')
    if nvme:
        text += f'[nvme]\npath = "{tmp / (name + ".nvme")}"\nsize = "64MiB"\nregion_size = "16MiB"\n'
    cfg.write_text(text)
    return ("--config", str(cfg))


@contextlib.contextmanager
def store_on_loop(limits):
    """(store, loop, LocalStore): a real engine Store whose repair calls run on an asyncio
    loop in another thread, as in the daemon (repair's own thread hops onto the loop)."""
    from kvstored.cluster.repair.local import LocalStore
    from kvstored.engine.store import Store
    store = Store(limits)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    t.start()
    try:
        yield store, loop, LocalStore(store, loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()
        store.close()


def fanout_cluster(nodes, **kw):
    """A ClusterClient over ``nodes`` with FANOUT_POLICIES, over TCP (as between hosts)."""
    from kvstore.cluster import ClusterClient
    kw.setdefault("node_timeout", 5.0)
    kw.setdefault("down_s", 60.0)
    kw.setdefault("shm", False)
    return ClusterClient([d.control for d in nodes], policy=dict(FANOUT_POLICIES), **kw)


def random_objects(prefix: str, n: int, sizes=FANOUT_SIZES) -> dict[bytes, bytes]:
    return {f"{prefix}-{i}".encode(): os.urandom(sizes[i % len(sizes)]) for i in range(n)}


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    """Poll ``pred`` until it returns something truthy (a kvstore error counts as "not
    yet"); TimeoutError naming ``what`` and the last value otherwise."""
    from kvstore import errors
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except errors.KVStoreError as e:
            last = e
        if last is True or (last and not isinstance(last, Exception)):
            return last
        time.sleep(step)
    raise TimeoutError(f"{what} not within {timeout}s (last: {last!r})")


# etcd drops a dead member's key once its lease runs out (TTL + up to 0.5 s of etcd's expiry
# tick) and the revoke is on its disk: on a loaded CI disk that took several seconds more,
# so this bound only catches "never"; what our nodes control is counted from etcd's delete
ETCD_LEAVE_S = 25.0


def wait_left(etcd, cluster: str, node_id: str, nodes, in_placement, within: float, what: str) -> None:
    """Wait until etcd has dropped ``node_id``'s member key (the lease ran out or was
    revoked: etcd's latency, bounded by ETCD_LEAVE_S), then until every node in ``nodes``
    has it out of placement (``in_placement(node) -> set of ids``) ``within`` seconds of
    that: the watch, or a resync every TTL, does it."""
    from etcdutil import etcd_keys
    key = f"/kvstored/{cluster}/members/{node_id}".encode()

    def dropped() -> bool:
        try:
            return key not in etcd_keys(etcd, key)
        except OSError:  # etcd slow to answer its gateway: not yet
            return False
    wait_for(dropped, ETCD_LEAVE_S, f"etcd dropping {what}", step=0.1)
    wait_for(lambda: all(node_id not in in_placement(d) for d in nodes), within, what, step=0.1)


def placement(d) -> set[str]:
    """The node ids in ``d``'s placement set (its Members RPC)."""
    with kvstore.Client(d.control, timeout=5) as c:
        return {m.node_id for m in c.members().members if m.placement}


def placement_members(d) -> list:
    """``d``'s placement members as ``kvstore.placement.Member``s."""
    from kvstore.placement import Member
    with kvstore.Client(d.control, timeout=5) as c:
        return [Member(m.node_id, m.control_address, m.failure_domain)
                for m in c.members().members if m.placement]


def missing_redundancy(members: list, ns: str, p: Policy, objs: dict, min_ec_size: int = 256 << 10,
                       client_kw: dict | None = None) -> list:
    """Objects whose slots over ``members`` do not hold a complete, valid set of records
    (every copy; every EC index, or M+1 whole copies below ``min_ec_size``): [] when the
    cluster is at full redundancy. ``client_kw``: more kvstore.Client arguments (tls, token)."""
    clients = {m.node_id: kvstore.Client(m.address, namespace=ns, timeout=5, shm=False, **(client_kw or {}))
               for m in members}
    bad = []
    try:
        for k, v in objs.items():
            pk = placement_key(k, p)
            sl = slots(pk, members, p, ns)
            if p.kind != "ec":
                for m, _ in sl:
                    try:
                        ok = clients[m.node_id].get(k) == v
                    except errors.KVStoreError:
                        ok = False
                    if not ok:
                        bad.append((k, m.node_id))
                continue
            need = p.m + 1 if len(v) < min_ec_size else p.n
            idx = set()
            for m, lap in sl[:need]:
                try:
                    r = parse_record(clients[m.node_id].get(lap_key(pk, lap)))
                except errors.KVStoreError:
                    r = None
                if r is not None and r[0][8] == len(v):
                    idx.add(r[0][3])
            if len(idx) != need:
                bad.append((k, sorted(idx)))
    finally:
        for c in clients.values():
            c.close()
    return bad


def start_nodes(start_daemon, tmp: Path, etcd, prefix: str, n: int, policies: str,
                lease_ttl: int = 2, cluster_extra: str = "") -> list:
    """``n`` cluster nodes (ids prefix0..) on ``etcd`` with ``cluster.policies`` (and the
    [cluster] lines ``cluster_extra``), returned once the first sees all of them in placement."""
    cfgs = []
    for i in range(n):
        cfg = tmp / f"{prefix}{i}.toml"
        cfg.write_text(f'[node]\nid = "{prefix}{i}"\n[cluster]\nenabled = true\nlease_ttl = {lease_ttl}\n'
                       f'etcd_endpoints = "{etcd.endpoint}"\npolicies = "{policies}"\n{cluster_extra}\n')
        cfgs.append(("--config", str(cfg)))
    ds = start_daemon.many(*cfgs)  # launched at once: their imports and prefaults overlap
    with kvstore.Client(ds[0].control, timeout=5) as c:
        wait_for(lambda: sum(m.placement for m in c.members().members) == n, 20, f"{n} members")
    return ds
