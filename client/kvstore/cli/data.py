"""Data commands: put, get, exists, lookup, pin, unpin, rm, ls, delete-all."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from .. import errors
from ..client import Client
from .common import (EXIT_OK, arg_keys, emit_json, human_age, human_duration, human_size,
                     key_doc, parse_key, show_key, table)


def cmd_put(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.file == "-":
        if args.key is None:
            parser.error("--key is required when FILE is - (stdin)")
        data = sys.stdin.buffer.read()
        key = parse_key(args.key, args.hex)
    else:
        # the default key is the file's name as text, even with --hex: a hex file name is rare
        key = parse_key(args.key, args.hex) if args.key is not None else parse_key(
            os.path.basename(args.file), False)
        with open(args.file, "rb") as f:
            # refuse before reading: a multi-GiB file should not be slurped just to be rejected
            size, limit = os.fstat(f.fileno()).st_size, c.info().max_value_size
            if size > limit:
                raise errors.InvalidArgument(
                    f"{args.file} is {human_size(size)} ({size} bytes); the daemon's "
                    f"max_value_size is {human_size(limit)}")
            data = f.read()
    shown = show_key(key, args.hex)
    t0 = time.perf_counter()
    try:
        stored = c.put(key, data, overwrite=args.overwrite)
    except errors.Conflict as e:
        raise errors.Conflict(f"{shown!r}: {e.message} (pass --overwrite to replace it)") from None
    elapsed = time.perf_counter() - t0
    transport = c.transport  # the connection the put used: no new connection here
    if args.json:
        emit_json({**key_doc(key), "namespace": c.namespace, "size": len(data), "stored": stored,
                   "deduplicated": not stored, "elapsed_seconds": elapsed, "transport": transport})
    elif stored:
        print(f"stored {shown!r} ({human_size(len(data))}) in namespace {c.namespace!r} over "
              f"{transport}, {human_duration(elapsed)}")
    else:
        print(f"already stored {shown!r} ({human_size(len(data))}, identical bytes) in namespace "
              f"{c.namespace!r} over {transport}, {human_duration(elapsed)}")
    return EXIT_OK


def cmd_get(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if args.output == "-" and args.json:
        parser.error("--json cannot share stdout with -o - (the object's bytes)")
    key = parse_key(args.key, args.hex)
    shown = show_key(key, args.hex)
    t0 = time.perf_counter()
    try:
        data = c.get(key)
    except errors.NotFound:
        # one wording whatever the daemon's (whose key text may be cut or hex)
        raise errors.NotFound(f"no key {shown!r} in namespace {c.namespace!r}") from None
    elapsed = time.perf_counter() - t0
    if args.output == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    # written only after the whole object arrived: a failed get never leaves a partial file
    with open(args.output, "wb") as f:
        f.write(data)
    transport = c.transport
    if args.json:
        emit_json({**key_doc(key), "namespace": c.namespace, "size": len(data), "file": args.output,
                   "elapsed_seconds": elapsed, "transport": transport})
    else:
        print(f"wrote {shown!r} ({human_size(len(data))}) to {args.output} over {transport} in "
              f"{human_duration(elapsed)}")
    return EXIT_OK


def cmd_exists(c: Client, args) -> int:
    keys = arg_keys(args)
    found = c.exists(keys)
    if args.json:
        emit_json({"namespace": c.namespace, "found": sum(found), "total": len(keys),
                   "results": [{**key_doc(k), "exists": e} for k, e in zip(keys, found)]})
    else:
        print(table(["EXISTS", "KEY"], [["yes" if e else "no", show_key(k, args.hex)]
                                         for k, e in zip(keys, found)]))
        print(f"{sum(found)}/{len(keys)} exist in namespace {c.namespace!r}")
    return EXIT_OK


def cmd_lookup(c: Client, args) -> int:
    keys = arg_keys(args)
    hit = c.lookup(keys)
    missing = keys[hit] if hit < len(keys) else None
    if args.json:
        emit_json({"namespace": c.namespace, "hit": hit, "total": len(keys),
                   "first_missing": key_doc(missing) if missing is not None else None})
    else:
        tail = f"; first missing: {show_key(missing, args.hex)!r}" if missing is not None else ""
        print(f"prefix hit {hit}/{len(keys)} in namespace {c.namespace!r}{tail}")
    return EXIT_OK


def _count_cmd(verb: str, call: Callable[[Client, list[bytes], argparse.Namespace], int]):
    """pin / unpin / rm: a count of the keys affected; keys that are absent are not an error,
    because the end state the user asked for (not pinned, not stored...) already holds."""
    def run(c: Client, args) -> int:
        keys = arg_keys(args)
        n = call(c, keys, args)
        if args.json:
            doc = {"namespace": c.namespace, verb: n, "total": len(keys)}
            if verb == "pinned":
                doc["ttl_seconds"] = args.ttl
            emit_json(doc)
        else:
            extra = f" for {args.ttl:g}s" if verb == "pinned" else ""
            print(f"{verb} {n}/{len(keys)} keys in namespace {c.namespace!r}{extra}")
        return EXIT_OK
    return run


cmd_pin = _count_cmd("pinned", lambda c, keys, args: c.pin(keys, ttl=args.ttl))
cmd_unpin = _count_cmd("unpinned", lambda c, keys, args: c.unpin(keys))
cmd_rm = _count_cmd("deleted", lambda c, keys, args: c.delete(keys))


def cmd_delete_all(c: Client, args, parser: argparse.ArgumentParser) -> int:
    if not args.yes:
        parser.error("delete-all deletes every object of the namespace: add --yes")
    ns = "" if args.all_namespaces else c.namespace
    n = c.delete_all(namespace=ns)
    where = "all namespaces" if args.all_namespaces else f"namespace {c.namespace!r}"
    if args.json:
        emit_json({"namespace": None if args.all_namespaces else c.namespace, "deleted": n})
    else:
        print(f"deleted {n} objects in {where}")
    return EXIT_OK


def cmd_ls(c: Client, args) -> int:
    # Client.list: "" means every namespace; pass ours explicitly otherwise
    r = c.list(namespace="" if args.all_namespaces else c.namespace, limit=args.limit)
    where = "all namespaces" if args.all_namespaces else f"namespace {c.namespace!r}"
    if args.json:
        emit_json({"namespace": None if args.all_namespaces else c.namespace, "total": r.total,
                   "entries": [{"namespace": e.namespace, **key_doc(e.key), "size": e.size,
                                "checksum": e.checksum, "pinned": e.pinned, "tier": e.tier,
                                "age_seconds": e.age_seconds} for e in r.entries]})
        return EXIT_OK
    if not r.entries:
        print(f"no objects in {where}")
        return EXIT_OK
    header = ["KEY", "SIZE", "PINNED", "TIER", "AGE"]
    rows = [[show_key(e.key, args.hex), human_size(e.size), "yes" if e.pinned else "no",
             e.tier, human_age(e.age_seconds)] for e in r.entries]
    right = [1, 4]
    if args.all_namespaces:
        header = ["NAMESPACE"] + header
        rows = [[e.namespace] + row for e, row in zip(r.entries, rows)]
        right = [2, 5]
    print(table(header, rows, right=right))
    # the daemon samples: say so, so nobody mistakes this for a complete listing
    print(f"{len(r.entries)} shown of {r.total} objects in {where} (a sample, not a snapshot)")
    return EXIT_OK
