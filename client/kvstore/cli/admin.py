"""Node and cluster commands: status, stats, nodes, drain, policy ls/set/rm, reload."""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from .. import errors
from ..client import Client
from .common import (EXIT_ERROR, EXIT_OK, PROG, Progress, emit_json, fields, human_age,
                     human_size, one_line, table, tls_config)

# `nodes` asks every member for its own repair progress: an unreachable member costs at
# most this long (the members are asked in parallel)
PROBE_TIMEOUT = 3.0
# `drain --wait`: how often the draining node is polled, and how long by default
DRAIN_POLL_SECONDS = 0.5
DRAIN_WAIT_TIMEOUT = 600.0


def cmd_status(c: Client, args) -> int:
    info = c.info(refresh=True)
    h = c.health()
    # Info and Health need no token (a probe without one still learns whether the node
    # serves); only the NVMe line comes from Stats, which does
    try:
        nvme, denied = next((t for t in c.stats().tiers if t.name == "nvme"), None), ""
    except errors.PermissionDenied as e:
        nvme, denied = None, e.message
    transport, why = _data_transport(c)
    doc = {
        "node_id": info.node_id, "version": info.version,
        "control_address": args.address, "data_address": f"{info.data_host}:{info.data_port}",
        "live": h.live, "ready": h.ready, "status": h.status, "uptime_seconds": h.uptime_seconds,
        "wire_version": info.wire_version, "checksum_algorithm": info.checksum_algorithm,
        "shm_socket": info.shm_socket or None, "shm_reachable": _shm_reachable(info.shm_socket),
        "cli_transport": transport, "cli_transport_reason": why or None,
        # the NVMe tier's I/O backend and, after a fallback, why io_uring is not used
        "nvme_io_backend": nvme.io_backend if nvme is not None else None,
        "nvme_io_backend_reason": (nvme.io_backend_reason or None) if nvme is not None else None,
        "stats_denied": denied or None,  # why the NVMe fields are unknown (no or a weak token)
        "limits": {"max_value_size": info.max_value_size,
                   "max_control_value_size": info.max_control_value_size,
                   "max_key_length": info.max_key_length, "max_batch_keys": info.max_batch_keys},
    }
    if args.json:
        emit_json(doc)
        return EXIT_OK
    state = ", ".join(("live" if h.live else "not live", "ready" if h.ready else "not ready"))
    print(fields([
        ("node", info.node_id),
        ("version", info.version),
        ("control", args.address),
        ("data", f"{info.data_host}:{info.data_port} (wire v{info.wire_version}, "
                 f"{info.checksum_algorithm} checksums)"),
        ("shm", _shm_text(info.shm_socket, args.shm)),
        ("transport", (f"{transport}: {why}" if transport in ("refused", "unreachable")
                       else f"{transport} (RDMA not used: {why})" if why else transport)),
        ("health", f"{h.status} ({state})"),
        ("nvme io", f"unknown (Stats refused: {denied})" if denied else _nvme_io_text(nvme)),
        ("uptime", human_age(h.uptime_seconds)),
        ("max value", f"{human_size(info.max_value_size)} data path, "
                      f"{human_size(info.max_control_value_size)} control path"),
        ("max key", f"{info.max_key_length} bytes"),
        ("max batch", f"{info.max_batch_keys} keys"),
    ]))
    return EXIT_OK


def _data_transport(c: Client) -> tuple[str, str]:
    """The data path this CLI's commands use, and why RDMA is not (kvstore.rdma)."""
    try:
        t = c.transport
    except errors.PermissionDenied as e:  # reachable, but the token does not open it
        return "refused", e.message
    except errors.KVStoreError as e:
        return "unreachable", e.message
    return t, "" if t in ("rdma", "shm") else c.transport_reason


def _nvme_io_text(nvme) -> str:
    if nvme is None:
        return "no NVMe tier"
    if nvme.io_backend_reason:
        return f"{nvme.io_backend} (FALLBACK: {nvme.io_backend_reason})"
    return nvme.io_backend or "unknown"


def _shm_reachable(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def _shm_text(path: str, used: bool) -> str:
    """What `status` says of the same-host shared-memory path and which one the CLI takes."""
    if not path:
        return "not offered by the daemon (data commands use TCP)"
    if not _shm_reachable(path):
        return f"{path} (not reachable from here; data commands use TCP)"
    return f"{path} (reachable; data commands use {'it: --shm' if used else 'TCP unless --shm'})"


def _is_bytes_counter(name: str) -> bool:
    return name.endswith("_bytes") or name in ("dram_capacity", "dram_prefaulted", "dram_used",
                                               "slab_size")


def cmd_stats(c: Client, args) -> int:
    s = c.stats()
    tiers = [{"name": t.name, "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
              "objects": t.objects, "counters": dict(sorted(t.counters.items())),
              **({"io_backend": t.io_backend, "io_backend_reason": t.io_backend_reason}
                 if t.io_backend else {})} for t in s.tiers]
    doc = {"uptime_seconds": s.uptime_seconds, "connections": s.connections,
           "counters": dict(sorted(s.counters.items())),
           "namespaces": dict(sorted(s.namespaces.items())), "tiers": tiers}
    if args.json:
        emit_json(doc)
        return EXIT_OK
    print(fields([("uptime", human_age(s.uptime_seconds)), ("connections", s.connections)]))
    print()
    rows = []
    for t in tiers:
        tc = t["counters"]
        pct = 100.0 * t["used_bytes"] / t["capacity_bytes"] if t["capacity_bytes"] else 0.0
        # demotions/promotions/bytes written exist for lower tiers; "-" where a tier has none
        rows.append([t["name"], human_size(t["capacity_bytes"]), human_size(t["used_bytes"]),
                     f"{pct:.1f}%", t["objects"], tc.get("hits", 0), tc.get("misses", 0),
                     tc.get("evictions", tc.get("regions_reclaimed", 0)),
                     tc.get("demotions", "-"), tc.get("promotions", "-"),
                     human_size(tc["bytes_written"]) if "bytes_written" in tc else "-",
                     tc.get("checksum_failures", 0)])
    print(table(["TIER", "CAPACITY", "USED", "USED%", "OBJECTS", "HITS", "MISSES", "EVICTIONS",
                 "DEMOTED", "PROMOTED", "WRITTEN", "CSUM_FAIL"], rows, right=range(1, 12)))
    print()
    if doc["namespaces"]:
        print(table(["NAMESPACE", "OBJECTS"], list(doc["namespaces"].items()), right=[1]))
    else:
        print("no namespaces (the store is empty)")
    print()
    print(table(["COUNTER", "VALUE"],
                [[k, human_size(v) if _is_bytes_counter(k) else v] for k, v in doc["counters"].items()],
                right=[1]))
    return EXIT_OK


def _member_client(args, address: str, timeout: float) -> Client:
    """A client for another member's control address, with this invocation's token and TLS."""
    return Client(address, namespace=args.namespace, timeout=timeout, tls=tls_config(args),
                  token=args.token)


def _repair_doc(r) -> dict:
    return {"state": r.state, "passes": r.passes, "scanned": r.scanned, "total": r.total,
            "records_written": r.records_written, "bytes_written": r.bytes_written,
            "verified": r.verified, "dropped": r.dropped, "removed": r.removed,
            "failures": r.failures, "last_pass_seconds": r.last_pass_seconds,
            "pending": r.pending, "pass_seconds": r.pass_seconds, "rate": r.rate,
            "eta_seconds": r.eta_seconds, "pace": r.pace, "yield_seconds": r.yield_seconds}


def _probe_member(c: Client, args, member) -> dict:
    """Repair progress and unverified count from the member itself (its own Members and
    Stats), or {"reachable": False, "error": ...}."""
    own = None
    try:
        if member.self:
            own = c  # the address the user gave: the advertised one may not be reachable here
        else:
            own = _member_client(args, member.control_address, min(args.timeout, PROBE_TIMEOUT))
        r = own.members()
        counters = own.stats().counters
        return {"reachable": True, "error": None, "repair": _repair_doc(r.repair),
                "unverified": counters.get("unverified", 0), "objects": counters.get("objects")}
    except errors.Unavailable as e:
        return {"reachable": False, "error": f"unreachable ({one_line(e.message)})",
                "repair": None, "unverified": None, "objects": None}
    except errors.KVStoreError as e:
        return {"reachable": False, "error": f"{e.name}: {one_line(e.message)}",
                "repair": None, "unverified": None, "objects": None}
    finally:
        if own is not None and own is not c:
            own.close()


def repair_line(rep: dict, unverified: int | None = None) -> str:
    """``idle, pass 3, 120/500 scanned, 12 written (48.0 MiB), 0 pending, 2 dropped stale,
    0 failures``; just ``off`` on a node without a repair loop."""
    if rep["state"] == "off":
        text = "off"
    else:
        text = (f"{rep['state']}, pass {rep['passes']}, {rep['scanned']}/{rep['total']} scanned, "
                f"{rep['records_written']} written ({human_size(rep['bytes_written'])}), "
                f"{rep['pending']} pending, {rep['dropped']} dropped stale, "
                f"{rep['failures']} failures")
        if rep["state"] == "scanning" and rep.get("pass_seconds"):  # progress of this pass
            text += (f", {human_size(rep.get('rate', 0))}/s for {rep['pass_seconds']:.0f}s"
                     + (f", ETA {rep['eta_seconds']:.0f}s" if rep.get("eta_seconds") else ""))
            if 0 < rep.get("pace", 1) < 1:  # (0: a node of an earlier version)
                text += f", yielding to clients (pace {rep['pace']:.2f})"
    if unverified:
        text += f", {unverified} unverified"
    return text


def _policies_text(policies: dict) -> str:
    if not policies:
        return "none set"
    items = sorted(policies.items(), key=lambda kv: (kv[0] != "*", kv[0]))
    return ", ".join(f"{'* (default)' if ns == '*' else ns}={p}" for ns, p in items)


def cmd_nodes(c: Client, args) -> int:
    r = c.members()
    # each member's repair loop is its own: ask every member, in parallel, briefly
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(r.members)))) as pool:
        probes = list(pool.map(lambda m: _probe_member(c, args, m), r.members))
    nodes = [{"node_id": m.node_id, "self": m.self, "control_address": m.control_address,
              "data_address": m.data_address, "shm_socket": m.shm_socket,
              "dram_capacity_bytes": m.dram_capacity_bytes,
              "nvme_capacity_bytes": m.nvme_capacity_bytes, "failure_domain": m.failure_domain,
              "version": m.version, "started_at": m.started_at, "health": m.health,
              "last_seen_seconds_ago": m.last_seen_seconds_ago,
              "draining": m.draining, "placement": m.placement,
              "reachable": p["reachable"], "probe_error": p["error"], "repair": p["repair"],
              "unverified": p["unverified"], "objects": p["objects"]}
             for m, p in zip(r.members, probes)]
    doc = {"source": r.source, "cluster": r.cluster, "node_id": r.node_id,
           "degraded": r.degraded, "detail": r.detail, "epoch": r.epoch,
           "epoch_hex": f"0x{r.epoch:08x}", "policies": dict(sorted(r.policies.items())),
           "nodes": nodes}
    if args.json:
        emit_json(doc)
        return EXIT_OK
    view = f"{r.source} membership" + (f", cluster {r.cluster!r}" if r.cluster else "")
    if r.degraded:
        view += f", DEGRADED ({r.detail or 'not registered'})"
    print(f"{len(nodes)} node(s) as seen by {r.node_id} ({view})")
    rows = [[("* " if n["self"] else "  ") + n["node_id"], n["control_address"],
             n["data_address"] or "-", n["failure_domain"] or "-",
             human_size(n["dram_capacity_bytes"]) if n["dram_capacity_bytes"] else "-",
             human_size(n["nvme_capacity_bytes"]) if n["nvme_capacity_bytes"] else "-",
             n["health"], "-" if n["self"] else human_age(n["last_seen_seconds_ago"]),
             ",".join(f for f, on in (("draining", n["draining"]), ("placement", n["placement"]))
                      if on) or "-"]
            for n in nodes]
    print(table(["NODE", "CONTROL", "DATA", "DOMAIN", "DRAM", "NVME", "HEALTH", "SEEN", "FLAGS"],
                rows, right=[4, 5]))
    print()
    print(fields([("epoch", doc["epoch_hex"]), ("policies", _policies_text(doc["policies"]))]))
    if nodes:
        print()
        w = max(len(n["node_id"]) for n in nodes)
        for n in nodes:
            state = repair_line(n["repair"], n["unverified"]) if n["reachable"] else n["probe_error"]
            print(f"{n['node_id']:<{w}}  repair: {state}")
    return EXIT_OK


def _find_member(c: Client, name: str, parser: argparse.ArgumentParser):
    """NODE (a node id or control address, as `nodes` lists them) in the member list of the
    node we are connected to; a usage error naming the known ids when there is none."""
    r = c.members()
    for m in r.members:
        if name in (m.node_id, m.control_address):
            return m
    known = ", ".join(m.node_id for m in r.members) or "(none)"
    parser.error(f"unknown node {name!r}; known nodes (as seen by {r.node_id}): {known}")


def cmd_drain(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.cancel and args.wait:
        parser.error("--wait waits for a drain to finish; it makes no sense with --cancel")
    m = _find_member(c, args.node, parser)
    target = c if m.self else _member_client(args, m.control_address, args.timeout)
    log = sys.stderr if args.json else sys.stdout  # --json: stdout carries one document only
    try:
        try:
            r = target.drain(cancel=args.cancel)
        except errors.Unavailable as e:
            if target is c:
                raise
            # Drain is asked of the node itself: one that is down cannot be drained (it
            # leaves the member list once its lease runs out; repair re-homes its records)
            raise errors.Unavailable(
                f"cannot reach {m.node_id} at {m.control_address} to drain it "
                f"({one_line(e.message)}); a node that is down leaves the member list "
                "within cluster.lease_ttl and repair rebuilds its records") from None
        doc = {"node_id": m.node_id, "control_address": m.control_address,
               "draining": r.draining, "objects_left": r.objects_left, "detail": r.detail,
               "waited": False, "objects": r.objects_left, "safe_to_stop": False}
        if args.cancel:
            if args.json:
                emit_json(doc)
            else:
                print(f"{m.node_id}: drain cancelled; the node takes new placements again "
                      f"({r.objects_left} objects on it)")
            return EXIT_OK
        print(f"{m.node_id}: draining, {r.objects_left} objects left; its records move to their "
              "new homes", file=log)
        objects = r.objects_left
        if args.wait and objects:
            doc["waited"] = True
            start = time.monotonic()
            deadline = start + args.wait_timeout
            progress = Progress(args.progress)
            try:
                while True:
                    counters = target.stats().counters
                    objects = counters.get("objects", 0)
                    if objects == 0:
                        break
                    rep = repair_line(_repair_doc(target.members().repair),
                                      counters.get("unverified"))
                    now = time.monotonic()
                    progress.update(f"{m.node_id}: {objects} objects left after "
                                    f"{now - start:.0f}s; repair: {rep}")
                    if now >= deadline:
                        progress.done()
                        doc["objects"] = objects
                        if args.json:
                            emit_json(doc)
                        print(f"{PROG}: drain: {m.node_id} still holds {objects} objects after "
                              f"{args.wait_timeout:g}s; the drain goes on (re-run with --wait to "
                              "keep waiting); do not stop the node yet", file=sys.stderr)
                        return EXIT_ERROR
                    time.sleep(DRAIN_POLL_SECONDS)
            finally:
                progress.done()
        doc["objects"] = objects
        doc["safe_to_stop"] = objects == 0
        if args.json:
            emit_json(doc)
        elif objects == 0:
            print(f"{m.node_id} holds no objects: it is safe to stop the node now")
        else:
            print(f"not safe to stop {m.node_id} yet: wait until it holds no objects "
                  f"(kvstore-cli drain {m.node_id} --wait)")
        return EXIT_OK
    finally:
        if target is not c:
            target.close()


def cmd_policy_set(c: Client, args) -> int:
    from ..layout import Policy
    policy = str(Policy.parse(args.policy))  # a malformed policy never reaches the daemon
    return _policy_change(c, args, policy, f"{_ns_shown(args.policy_namespace)}: {policy}")


def cmd_policy_rm(c: Client, args) -> int:
    ns = args.policy_namespace
    before = c.members().policies.get(ns)

    # what the change did, not what was asked: a namespace may have had no policy of its
    # own, or keep one from the nodes' config (cluster.policies), which only etcd's hide
    def what(after: dict) -> str:
        if before is None:
            return f"{_ns_shown(ns)}: had no policy of its own; nothing removed"
        if ns not in after:
            return f"{_ns_shown(ns)}: policy removed"
        return (f"{_ns_shown(ns)}: {after[ns]} from the nodes' config (cluster.policies) is in "
                "force; policy rm removes only what policy set put in etcd")
    return _policy_change(c, args, "", what)


def _ns_shown(ns: str) -> str:
    return "* (default)" if ns == "*" else repr(ns)


def _policy_change(c: Client, args, policy: str, what) -> int:
    """``what``: the line to print, or a function of the policies in force after."""
    policies = c.set_policy(args.policy_namespace, policy)
    if args.json:
        emit_json({"namespace": args.policy_namespace, "policy": policy or None,
                   "policies": dict(sorted(policies.items()))})
    else:
        print(what(policies) if callable(what) else what)
        print(f"policies in force: {_policies_text(policies)}")
    return EXIT_OK


def cmd_policy_ls(c: Client, args) -> int:
    r = c.members()
    policies = dict(sorted(r.policies.items(), key=lambda kv: (kv[0] != "*", kv[0])))
    if args.json:
        emit_json({"cluster": r.cluster, "source": r.source, "policies": policies})
        return EXIT_OK
    if not policies:
        where = "this node is not in a cluster" if r.source == "standalone" else f"cluster {r.cluster!r}"
        print(f"no redundancy policies set ({where})")
        return EXIT_OK
    print(table(["NAMESPACE", "POLICY"], [[_ns_shown(ns).strip("'"), p] for ns, p in policies.items()]))
    return EXIT_OK


def cmd_reload(c: Client, args) -> int:
    changed = c.reload()
    if args.json:
        emit_json({"changed": changed})
    else:
        print("\n".join(changed) if changed else "reloaded: nothing changed")
    return EXIT_OK
