#!/usr/bin/env python3
"""Time to first token with a real transformer: recompute the prompt's prefix, or load its KV from kvstored.

    python benchmarks/bench_ttft.py [--lengths 1024,4096,8192] [--dtype fp32|bf16]
                                    [--turns 30] [--repeats 2] [--load-repeats 5] [--json out.json] [--markdown out.md]
                                    [--address HOST:PORT]   # an already running daemon

Needs torch and transformers (``.venv/engines/bin/python`` has both; see benchmarks/README.md).

The model: a Hugging Face ``LlamaForCausalLM`` built from a ``LlamaConfig`` with random
weights (``--seed``; no hub access), ``--preset bench`` sized so that a 4k-token prefill
takes seconds on a 2-core CPU. The engine side keeps a paged KV cache in vLLM's flash
layout (per layer ``[2, num_blocks, block_size, kv_heads, head_dim]``, blocks handed out
from a shuffled free list, so block ids are never the token order) and moves blocks in
and out of kvstored with ``kvstore.torch.put_blocks`` / ``get_blocks``; block keys are
``kvstore.keys.chain`` over the token ids with the layout signature and the model in
``extra``.

Part 1, per prompt length (random token ids, one seed per length):

* recompute: one full prefill (``logits_to_keep=1``): TTFT, next-token logits, and the KV
  cache, whose full blocks (all but at least the last token) are then stored in kvstored;
* loaded, over shm and over TCP (``kvstore.Client(..., transport="tcp")``, or ``shm=False``
  with an SDK that has no ``transport``): lookup the block
  chain, ``get_blocks`` into the paged cache, build a ``DynamicCache`` from the blocks,
  prefill only the tokens after the stored prefix: TTFT and next-token logits. The
  client is connected beforehand (an engine keeps its connection).

Checks: the loaded KV equals the stored KV bit for bit; the loaded logits equal the
recomputed ones within the dtype's tolerance (``TOLERANCE``; bitwise equality is not
required, the suffix runs with other matrix shapes than the full prefill, though on the
dev machine's CPU torch they came out bitwise equal) with the same argmax; one
stored object, read back raw, has the documented byte layout; the daemon's Stats
counters (hits, misses, get_bytes, puts, put_bytes) moved exactly as the benchmark
observed. The logits alone would not catch blocks loaded in the wrong order: RoPE
positions are baked into K and attention sums over the keys, so a permuted cache gives
the same logits up to rounding (two swapped blocks: 9e-8); the bit-exact KV check does.
A corrupted block does show in the logits (one block zeroed: 9e-3, beyond the fp32 tolerance).

Part 2, a multi-turn chat replay shaped by the Mooncake conversation trace
(``--trace``; README beside it). Requests are grouped into conversations (a request
continues the earlier one it shares the longest block prefix with, beyond the shared
first block); whole conversations are taken in trace order until ``--turns`` turns.
Each 512-token trace block becomes ``--tokens-per-trace-block`` token ids drawn from
its hash id (equal hash ids, equal tokens, equal keys). Turn by turn: lookup, load the
hit blocks, prefill the rest (TTFT), then store the new full blocks; the store is the
only prefix cache (nothing is kept in the engine between turns). The hits the trace
predicts, the lookup result, the blocks loaded and the daemon's counters must agree.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _i, _p in enumerate((HERE, os.path.join(REPO, "client"), REPO)):
    if _p not in sys.path:
        sys.path.insert(_i, _p)

# torch, transformers and kvstore.torch are imported by _load_modules() once the arguments
# are known to be good: importing them takes seconds (tens on a busy host).
torch = kvstore = kvkeys = KVLayout = get_blocks = put_blocks = None
DynamicCache = LlamaConfig = LlamaForCausalLM = None


def _load_modules() -> None:
    global torch, kvstore, kvkeys, KVLayout, get_blocks, put_blocks, DynamicCache, LlamaConfig, LlamaForCausalLM
    import torch
    import kvstore
    from kvstore import keys as kvkeys
    from kvstore.torch import KVLayout, get_blocks, put_blocks
    try:
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise SystemExit(f"bench_ttft needs transformers ({e}); run it with .venv/engines/bin/python "
                         "(make engines-env) or pip install 'transformers==5.23.0'") from None


# Model presets. "bench": a 4k-token prefill takes ~5 s on the 2-core dev machine (fp32),
# KV is 4 KiB per token (4 layers x K,V x 2 kv heads x 64 x 4 bytes). "tiny": the smoke test.
PRESETS = {
    "bench": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names
ITEMSIZE = {"fp32": 4, "bf16": 2}
# Loaded vs recomputed next-token logits: |a - b| <= atol + rtol * |b| elementwise.
# fp32: the same math over other matrix shapes (blocked reductions in another order), ~1e-6
# relative in practice; bf16 rounds every activation to 8 bits of mantissa, so the suffix-only
# forward drifts by a few bf16 ulps of the logits.
TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-4), "bf16": dict(rtol=5e-2, atol=5e-2)}
COUNTERS = ("hits", "misses", "get_bytes", "puts", "put_bytes")
DEFAULT_TRACE = os.environ.get("KVSTORE_TRACE", "/work/shared/traces/mooncake_conversation_trace.jsonl")
TRACE_BLOCK_TOKENS = 512  # the trace's block size


# =========================================================================== model

def build_model(preset: str, dtype: torch.dtype, seed: int, max_positions: int):
    """A Llama-architecture causal LM with random weights drawn from ``seed``."""
    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def model_geometry(model) -> tuple[int, int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


def prefill(model, tokens: list[int], cache=None):
    """One forward over ``tokens`` after ``cache`` (None: from scratch); the next-token logits
    (only the last position is projected to the vocabulary, as engines do) and the cache."""
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache if cache is not None else DynamicCache(),
                    use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), out.past_key_values


# =========================================================================== paged KV cache

class PagedKV:
    """The engine's paged KV cache: vLLM's flash layout, one tensor per layer
    ``[2, num_blocks, block_size, kv_heads, head_dim]`` (K then V), and a free list.

    transformers' DynamicCache holds per layer K and V as ``[batch=1, kv_heads, seq, head_dim]``;
    block ``b`` of the paged cache holds ``block_size`` consecutive tokens as
    ``[block_size, kv_heads, head_dim]``. ``write`` and ``read`` convert between the two."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int = 0):
        self.block_size = block_size
        self.caches = [torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
                       for _ in range(num_layers)]
        self.layout = KVLayout.vllm(self.caches)
        ids = list(range(num_blocks))
        random.Random(seed).shuffle(ids)  # block ids out of token order, like a warm engine's
        self._free = ids

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"paged cache full: {n} blocks wanted, {len(self._free)} free")
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    def free(self, ids: list[int]) -> None:
        self._free = list(ids) + self._free

    def write(self, cache, ids: list[int], first_token: int = 0) -> None:
        """Tokens ``first_token .. first_token + len(ids) * block_size - 1`` of ``cache`` into
        blocks ``ids`` (block i <- the i-th run of block_size tokens)."""
        n, bs = len(ids), self.block_size
        idx = torch.tensor(ids, dtype=torch.long)
        for layer, paged in zip(_layers(cache), self.caches):
            for j, t in enumerate((layer.keys, layer.values)):
                # [1, H, S, D] -> [S, H, D] -> [n, bs, H, D]
                src = t[0, :, first_token:first_token + n * bs].transpose(0, 1)
                if src.shape[0] != n * bs:
                    raise ValueError(f"cache holds {t.shape[2]} tokens; blocks need {first_token + n * bs}")
                paged[j].index_copy_(0, idx, src.reshape(n, bs, *src.shape[1:]))

    def read(self, ids: list[int]):
        """A DynamicCache holding blocks ``ids`` in that order (len(ids) * block_size tokens)."""
        idx = torch.tensor(ids, dtype=torch.long)
        n, bs = len(ids), self.block_size
        layers = []
        for paged in self.caches:
            kv = []
            for j in range(2):
                blocks = paged[j].index_select(0, idx)  # [n, bs, H, D]
                kv.append(blocks.reshape(n * bs, *blocks.shape[2:]).transpose(0, 1).unsqueeze(0).contiguous())
            layers.append(tuple(kv))
        return DynamicCache(layers)


def _layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"this transformers' {type(cache).__name__} has no .layers (need transformers 5.x)")
    return layers


def expected_object(cache, block: int, block_size: int) -> bytes:
    """The bytes kvstore.torch documents for one paged block: for each layer, K then V, each
    ``[block_size, kv_heads, head_dim]`` row-major. Built from the DynamicCache directly,
    not through PagedKV, so that it checks the conversion."""
    s = slice(block * block_size, (block + 1) * block_size)
    parts = []
    for layer in _layers(cache):
        for t in (layer.keys, layer.values):
            parts.append(t[0, :, s].permute(1, 0, 2).contiguous().view(torch.uint8).reshape(-1))
    return _tensor_bytes(torch.cat(parts))


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # through a bytearray, not numpy: the benchmark must not need numpy
    out = bytearray(t.numel())
    torch.frombuffer(out, dtype=torch.uint8).copy_(t)
    return bytes(out)


# =========================================================================== store side

def counters(client) -> dict[str, int]:
    c = client.stats().counters
    return {k: int(c.get(k, 0)) for k in COUNTERS}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in COUNTERS}


def block_keys(tokens: list[int], block_size: int, namespace: str, extra: bytes) -> list[bytes]:
    return kvkeys.chain(tokens, block_size, namespace=namespace, extra=extra)


def store_blocks(client, paged: PagedKV, cache, keys: list[bytes], first_block: int, namespace: str) -> int:
    """Store blocks ``first_block..`` of ``cache`` under ``keys`` (one per block); how many were new."""
    if not keys:
        return 0
    ids = paged.alloc(len(keys))
    try:
        paged.write(cache, ids, first_token=first_block * paged.block_size)
        return sum(put_blocks(client, paged.layout, keys, ids, namespace=namespace))
    finally:
        paged.free(ids)


@dataclass
class Loaded:
    ttft: float
    logits: torch.Tensor
    cache: object
    hit_blocks: int  # what lookup said and get_blocks loaded
    load_s: float = 0.0
    prefill_s: float = 0.0


def ttft_from_store(model, client, paged: PagedKV, tokens: list[int], keys: list[bytes],
                    namespace: str) -> Loaded:
    """The TTFT path with kvstored: lookup, load the prefix blocks, prefill the rest.
    At least one token is always computed (its logits are the first token)."""
    t0 = time.perf_counter()
    usable = keys[:(len(tokens) - 1) // paged.block_size]
    hit = client.lookup(usable, namespace=namespace) if usable else 0
    ids = paged.alloc(hit)
    try:
        cache = None
        if hit:
            get_blocks(client, paged.layout, usable[:hit], ids, namespace=namespace)
            cache = paged.read(ids)
        t1 = time.perf_counter()
        logits, cache = prefill(model, tokens[hit * paged.block_size:], cache)
        t2 = time.perf_counter()
    finally:
        paged.free(ids)
    return Loaded(t2 - t0, logits, cache, hit, load_s=t1 - t0, prefill_s=t2 - t1)


def connect(address: str, namespace: str, transport: str):
    """A connected client on ``transport`` ("shm" or "tcp"), or (None, why not)."""
    # transport= where the SDK has it: there shm=False alone means "anything but shm" (RDMA first)
    choice = {"transport": transport} if "transport" in inspect.signature(kvstore.Client).parameters \
        else {"shm": transport == "shm"}
    try:
        c = kvstore.Client(address, namespace=namespace, **choice)
        c.ping()
    except kvstore.KVStoreError as e:
        return None, f"{transport} unavailable: {e}"
    if c.transport != transport:
        c.close()
        return None, f"asked for {transport}, got {c.transport}"
    return c, ""


# =========================================================================== part 1: lengths

def compare_logits(loaded: torch.Tensor, ref: torch.Tensor, dtype_name: str) -> dict:
    tol = TOLERANCE[dtype_name]
    diff = (loaded - ref).abs()
    ok = bool(torch.allclose(loaded, ref, **tol)) and int(loaded.argmax()) == int(ref.argmax())
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / ref.abs().clamp_min(1e-6)).max()),
            "logits_ok": ok, "argmax_equal": int(loaded.argmax()) == int(ref.argmax())}


def kv_equal(loaded_cache, ref_cache, tokens: int) -> bool:
    for a, b in zip(_layers(loaded_cache), _layers(ref_cache)):
        if not (torch.equal(a.keys[:, :, :tokens], b.keys[:, :, :tokens])
                and torch.equal(a.values[:, :, :tokens], b.values[:, :, :tokens])):
            return False
    return True


def run_length(model, clients: dict, paged: PagedKV, length: int, args, extra: bytes, seed: int) -> dict:
    bs = args.block_size
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (length,), generator=gen).tolist()
    keys = block_keys(tokens, bs, args.namespace, extra)
    n_prefix = (length - 1) // bs
    any_client = next(iter(clients.values()))
    row = {"tokens": length, "prefix_tokens": n_prefix * bs, "blocks": n_prefix,
           "kv_bytes": n_prefix * paged.layout.block_nbytes}

    recompute = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref_logits, ref_cache = prefill(model, tokens)
        recompute.append(time.perf_counter() - t0)
    row["recompute_s"] = recompute

    before = counters(any_client)
    t0 = time.perf_counter()
    new = store_blocks(any_client, paged, ref_cache, keys[:n_prefix], 0, args.namespace)
    row["store_s"] = time.perf_counter() - t0
    d = delta(counters(any_client), before)
    problems = []
    if d["puts"] != new or d["put_bytes"] != new * paged.layout.block_nbytes:
        problems.append(f"store: {new} new blocks but Stats moved {d}")

    # the documented object layout, read raw (the first and the last prefix block)
    for b in (0, n_prefix - 1):
        raw = bytes(any_client.get(keys[b], namespace=args.namespace))
        if raw != expected_object(ref_cache, b, bs):
            problems.append(f"object of block {b} is not [layer][K,V][token][head][dim] of the model's KV")
    row["layout_ok"] = not any("object of block" in p for p in problems)

    for transport, client in clients.items():
        times, loads = [], []
        for _ in range(args.load_repeats):
            before = counters(client)
            r = ttft_from_store(model, client, paged, tokens, keys, args.namespace)
            d = delta(counters(client), before)
            times.append(r.ttft)
            loads.append(r.load_s)
            want = {"hits": r.hit_blocks, "misses": 0, "get_bytes": r.hit_blocks * paged.layout.block_nbytes,
                    "puts": 0, "put_bytes": 0}
            if d != want:
                problems.append(f"{transport}: loaded {r.hit_blocks} blocks but Stats moved {d}")
            if r.hit_blocks != n_prefix:
                problems.append(f"{transport}: lookup found {r.hit_blocks} of {n_prefix} stored blocks")
        row[f"{transport}_s"] = times
        row[f"{transport}_load_s"] = loads
        row[f"{transport}_kv_bitexact"] = kv_equal(r.cache, ref_cache, n_prefix * bs)
        if not row[f"{transport}_kv_bitexact"]:
            problems.append(f"{transport}: loaded KV differs from the stored KV")
        cmp = compare_logits(r.logits, ref_logits, args.dtype)
        row[f"{transport}_logits"] = cmp
        if not cmp["logits_ok"]:
            problems.append(f"{transport}: logits differ beyond {TOLERANCE[args.dtype]} "
                            f"(max abs {cmp['max_abs_diff']:.3g}, argmax equal {cmp['argmax_equal']})")
    row["problems"] = problems
    return row


# =========================================================================== part 2: chat replay

def load_conversations(path: str, turns: int, max_trace_blocks: int, scan: int = 4000) -> list[dict]:
    """Whole conversations of the trace, in trace order, until ``turns`` turns."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= scan:
                break
            rows.append(json.loads(line))
    prefix_owner: dict[tuple, int] = {}
    conv_of: list[int] = []
    for i, r in enumerate(rows):
        h = r["hash_ids"]
        parent = None
        for j in range(len(h), 1, -1):  # longest shared prefix beyond the first (shared) block
            if tuple(h[:j]) in prefix_owner:
                parent = prefix_owner[tuple(h[:j])]
                break
        conv_of.append(conv_of[parent] if parent is not None else i)
        for j in range(1, len(h) + 1):
            prefix_owner.setdefault(tuple(h[:j]), i)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(conv_of):
        members.setdefault(c, []).append(i)
    chosen: list[int] = []
    for c in sorted(members):
        m = members[c]
        if len(m) < 2 or any(len(rows[i]["hash_ids"]) > max_trace_blocks for i in m):
            continue
        chosen += m
        if len(chosen) >= turns:
            break
    chosen.sort()
    return [dict(rows[i], trace_index=i, conversation=conv_of[i]) for i in chosen]


def turn_tokens(req: dict, per_block: int, vocab: int, seed: int) -> list[int]:
    """Token ids for a trace request: each trace block's ids come from its hash id."""
    out: list[int] = []
    for h in req["hash_ids"]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(h))
        out += torch.randint(0, vocab, (per_block,), generator=g).tolist()
    n = min(len(out), max(1, math.ceil(req["input_length"] * per_block / TRACE_BLOCK_TOKENS)))
    return out[:n]


def run_replay(model, client, paged: PagedKV, args, extra: bytes) -> dict:
    reqs = load_conversations(args.trace, args.turns, args.max_trace_blocks)
    bs = args.block_size
    ns = args.namespace + "-chat"
    known: set[bytes] = set()  # what this replay has stored: the trace's prediction of hits
    rows, problems = [], []
    for t, req in enumerate(reqs):
        tokens = turn_tokens(req, args.tokens_per_trace_block, model.config.vocab_size, args.seed)
        keys = block_keys(tokens, bs, ns, extra)
        usable = keys[:(len(tokens) - 1) // bs]
        predicted = 0
        while predicted < len(usable) and usable[predicted] in known:
            predicted += 1
        before = counters(client)
        r = ttft_from_store(model, client, paged, tokens, keys, ns)
        d_get = delta(counters(client), before)
        full = len(tokens) // bs
        stored = store_blocks(client, paged, r.cache, keys[r.hit_blocks:full], r.hit_blocks, ns)
        d_all = delta(counters(client), before)
        known.update(keys[:full])
        want = {"hits": r.hit_blocks, "misses": 0, "get_bytes": r.hit_blocks * paged.layout.block_nbytes,
                "puts": 0, "put_bytes": 0}
        agree = d_get == want and r.hit_blocks == predicted and d_all["puts"] == stored \
            and d_all["put_bytes"] == stored * paged.layout.block_nbytes
        if not agree:
            problems.append(f"turn {t}: predicted {predicted}, lookup/loaded {r.hit_blocks}, stored {stored}, "
                            f"Stats during the load {d_get}, after the store {d_all}")
        extra_cols = {}
        if args.replay_recompute:  # the same turn without the store; leaves the store untouched
            t0 = time.perf_counter()
            ref_logits, _ = prefill(model, tokens)
            extra_cols["recompute_s"] = time.perf_counter() - t0
            cmp = compare_logits(r.logits, ref_logits, args.dtype)
            extra_cols["max_abs_diff"] = cmp["max_abs_diff"]
            if not cmp["logits_ok"]:
                problems.append(f"turn {t}: logits differ beyond {TOLERANCE[args.dtype]} "
                                f"(max abs {cmp['max_abs_diff']:.3g}, argmax equal {cmp['argmax_equal']})")
        rows.append({**extra_cols, "turn": t, "trace_index": req["trace_index"], "conversation": req["conversation"],
                     "tokens": len(tokens), "predicted_hit_blocks": predicted, "hit_blocks": r.hit_blocks,
                     "computed_tokens": len(tokens) - r.hit_blocks * bs, "ttft_s": r.ttft,
                     "load_s": r.load_s, "stored_blocks": stored, "stats_hits": d_get["hits"],
                     "stats_misses": d_get["misses"], "stats_puts": d_all["puts"], "agree": agree})
    total_usable = sum((row["tokens"] - 1) // bs for row in rows)
    total_hits = sum(row["hit_blocks"] for row in rows)
    return {"turns": rows, "problems": problems, "namespace": ns, "transport": client.transport,
            "ttft_total_s": sum(row["ttft_s"] for row in rows),
            "recompute_total_s": sum(row["recompute_s"] for row in rows) if args.replay_recompute else None,
            "hit_ratio": total_hits / total_usable if total_usable else 0.0,
            "conversations": len({row["conversation"] for row in rows})}


# =========================================================================== report

def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def render(result: dict) -> str:
    a = result["args"]
    lines = [f"Model: LlamaForCausalLM preset `{a['preset']}` ({result['model']}), {a['dtype']}, "
             f"random weights seed {a['seed']}; torch {result['torch']}, transformers "
             f"{result['transformers']}, {result['threads']} threads; block {a['block_size']} tokens = "
             f"{result['block_nbytes'] // 1024} KiB; median of {a['repeats']} recomputes and "
             f"{a['load_repeats']} loads; load average before "
             f"{result['loadavg_before']}, after {result['loadavg_after']}.", "",
             "| prompt tokens | stored prefix | KV MiB | recompute TTFT ms | shm TTFT ms (load ms) "
             "| tcp TTFT ms (load ms) | recompute / shm | recompute / tcp | max abs logit diff "
             "(shm, tcp) | KV bit-exact |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["lengths"]:
        rc = statistics.median(r["recompute_s"])
        cells = []
        ratios = []
        for t in ("shm", "tcp"):
            if f"{t}_s" in r:
                m = statistics.median(r[f"{t}_s"])
                cells.append(f"{_ms(m)} ({_ms(statistics.median(r[f'{t}_load_s']))})")
                ratios.append(f"{rc / m:.1f}x")
            else:
                cells.append("-")
                ratios.append("-")
        diffs = ", ".join(f"{r[f'{t}_logits']['max_abs_diff']:.2g}" for t in ("shm", "tcp") if f"{t}_logits" in r)
        exact = all(r.get(f"{t}_kv_bitexact", True) for t in ("shm", "tcp"))
        lines.append(f"| {r['tokens']} | {r['prefix_tokens']} | {r['kv_bytes'] / 2**20:.1f} | {_ms(rc)} | "
                     f"{cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} | {diffs} | {'yes' if exact else 'NO'} |")
    lines += ["", f"Logit tolerance ({a['dtype']}): {TOLERANCE[a['dtype']]}, and the same argmax."]
    rep = result.get("replay")
    if rep:
        lines += ["", f"Chat replay: {len(rep['turns'])} turns of {rep['conversations']} conversations "
                  f"(trace {os.path.basename(a['trace'])}, {a['tokens_per_trace_block']} tokens per 512-token "
                  f"trace block), {rep['transport']}; block hit ratio {rep['hit_ratio']:.2f}; TTFT summed over "
                  f"the turns {rep['ttft_total_s']:.2f} s with the store"
                  + (f", {rep['recompute_total_s']:.2f} s recomputing every prompt" if rep["recompute_total_s"] else "")
                  + ".", "",
                  "| turn | trace req | conv | tokens | predicted hits | lookup = loaded | Stats hits / misses "
                  "| computed tokens | TTFT ms | recompute TTFT ms | stored blocks | Stats puts | agree |",
                  "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for t in rep["turns"]:
            rc = _ms(t["recompute_s"]) if "recompute_s" in t else "-"
            lines.append(f"| {t['turn']} | {t['trace_index']} | {t['conversation']} | {t['tokens']} | "
                         f"{t['predicted_hit_blocks']} | {t['hit_blocks']} | {t['stats_hits']} / {t['stats_misses']} | "
                         f"{t['computed_tokens']} | {_ms(t['ttft_s'])} | {rc} | {t['stored_blocks']} | "
                         f"{t['stats_puts']} | {'yes' if t['agree'] else 'NO'} |")
    if result["target"]:
        lines += ["", result["target"]]
    probs = result["problems"]
    lines += ["", "Checks: " + ("all passed." if not probs else "FAILED:\n- " + "\n- ".join(probs))]
    return "\n".join(lines)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# =========================================================================== main

def run(args) -> dict:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()] if args.lengths else []
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    replay_tokens = args.max_trace_blocks * args.tokens_per_trace_block if args.turns > 0 else 0
    max_tokens = max(lengths + [replay_tokens]) + args.block_size
    model = build_model(args.preset, dtype, args.seed, max_positions=max_tokens + 64)
    layers, kv_heads, head_dim = model_geometry(model)
    paged = PagedKV(layers, max_tokens // args.block_size + 8, args.block_size, kv_heads, head_dim, dtype,
                    seed=args.seed)
    # which model and layout produced the bytes: never share keys with another one
    extra = paged.layout.signature + f"/llama-random/{args.preset}/seed{args.seed}".encode()
    result = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "transformers": __import__("transformers").__version__, "machine": platform.machine(),
              "model": f"{layers} layers, hidden {model.config.hidden_size}, {model.config.num_attention_heads} "
                       f"heads, {kv_heads} KV heads x {head_dim}, "
                       f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params",
              "block_nbytes": paged.layout.block_nbytes, "loadavg_before": loadavg(), "lengths": [],
              "problems": [], "target": ""}
    with torch.inference_mode():
        prefill(model, list(range(min(64, model.config.vocab_size))))  # warm-up: first-call costs out of TTFT

    clients, why = {}, []
    for t in args.transports.split(","):
        c, reason = connect(args.address, args.namespace, t)
        if c is None:
            why.append(reason)
        else:
            clients[t] = c
    if not clients:
        raise SystemExit("no transport to kvstored: " + "; ".join(why))
    result["skipped_transports"] = why
    try:
        for i, n in enumerate(lengths):
            print(f"length {n} ...", file=sys.stderr, flush=True)
            row = run_length(model, clients, paged, n, args, extra, seed=args.seed + 1 + i)
            result["lengths"].append(row)
            result["problems"] += [f"{n} tokens: {p}" for p in row["problems"]]
        if args.turns > 0:
            print(f"chat replay, {args.turns} turns ...", file=sys.stderr, flush=True)
            client = clients.get(args.replay_transport) or next(iter(clients.values()))
            result["replay"] = run_replay(model, client, paged, args, extra)
            result["problems"] += [f"replay: {p}" for p in result["replay"]["problems"]]
    finally:
        for c in clients.values():
            c.close()
    result["loadavg_after"] = loadavg()
    if lengths:
        r = result["lengths"][-1]
        rc = statistics.median(r["recompute_s"])
        parts = [f"{t} {rc / statistics.median(r[f'{t}_s']):.1f}x" for t in ("shm", "tcp") if f"{t}_s" in r]
        ok = all(rc / statistics.median(r[f"{t}_s"]) >= 5 for t in ("shm", "tcp") if f"{t}_s" in r)
        result["target"] = (f"Target (KV from kvstored >= 5x lower TTFT than recompute at {r['tokens']} tokens): "
                            f"{'met' if ok else 'NOT met'} ({', '.join(parts)}).")
    return result


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096,8192", help="prompt lengths in tokens ('' = none)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16, help="tokens per paged KV block (vLLM's default)")
    ap.add_argument("--repeats", type=int, default=2, help="timed full prefills per length (median reported)")
    ap.add_argument("--load-repeats", type=int, default=5,
                    help="timed runs of each loaded path per length (median reported; they are cheap)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0 = torch's default). 1 by default: on a busy "
                         "2-core host every parallel region waits for a descheduled sibling thread "
                         "(a 16-token forward took 0.4-1 s with 2 threads, 0.05 s with 1)")
    ap.add_argument("--transports", default="shm,tcp")
    ap.add_argument("--namespace", default="ttft")
    ap.add_argument("--turns", type=int, default=30, help="chat replay turns (0 = no replay)")
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--tokens-per-trace-block", type=int, default=32,
                    help="model tokens per 512-token trace block (the scale-down)")
    ap.add_argument("--max-trace-blocks", type=int, default=64,
                    help="only conversations whose requests have at most this many trace blocks")
    ap.add_argument("--replay-transport", default="shm")
    ap.add_argument("--no-replay-recompute", dest="replay_recompute", action="store_false",
                    help="do not also time each turn recomputed from scratch (nor compare its logits)")
    ap.add_argument("--address", help="a running kvstored's control address (default: start one); "
                    "nothing else may use it during the run, since its Stats counters are checked")
    ap.add_argument("--daemon-python", default=None,
                    help="interpreter for the daemon (default: the repo's .venv, else this one)")
    ap.add_argument("--json", help="write the full result here ('-' = a JSON line on stdout)")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    if args.block_size < 1 or args.repeats < 1 or args.load_repeats < 1:
        ap.error("--block-size, --repeats and --load-repeats must be positive")
    if args.turns > 0 and (args.tokens_per_trace_block < 1 or args.tokens_per_trace_block % args.block_size):
        ap.error("--tokens-per-trace-block must be a positive multiple of --block-size")
    if args.lengths and any(int(x) <= args.block_size for x in args.lengths.split(",")):
        ap.error("every length must exceed --block-size (a prefix block plus one computed token)")
    if args.turns > 0 and not os.path.exists(args.trace):
        ap.error(f"no trace at {args.trace} (--trace, or --turns 0)")
    return args


def block_nbytes(args) -> int:
    """One paged block's object size, from the preset (no torch needed)."""
    p = PRESETS[args.preset]
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    return p["num_hidden_layers"] * 2 * args.block_size * p["num_key_value_heads"] * head_dim * ITEMSIZE[args.dtype]


def preflight(args) -> None:
    """Refuse a block the daemon at --address cannot hold, before importing torch and
    building the model (exit 2, like an argument error)."""
    import kvstore as sdk  # the SDK alone: no torch

    need = block_nbytes(args)
    try:
        with sdk.Client(args.address, namespace=args.namespace, timeout=10.0) as c:
            limit = c.info().max_value_size
    except sdk.KVStoreError as e:
        raise SystemExit(f"bench_ttft: kvstored at {args.address} unreachable: {e}") from None
    if need > limit:
        print(f"bench_ttft: one KV block is {need} bytes ({args.preset}, {args.dtype}, --block-size "
              f"{args.block_size}) but the daemon at {args.address} takes at most {limit} "
              f"(--max-value-size): use a smaller --block-size", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.address:
        preflight(args)
        _load_modules()
        result = run(args)
    else:
        _load_modules()
        from bench_tcp import KvstoredDaemon
        py = args.daemon_python or next(
            (p for p in (os.path.join(REPO, ".venv", "bin", "python"),) if os.path.exists(p)), sys.executable)
        limit = max(8 << 20, -(-block_nbytes(args) // (1 << 20)) << 20)  # whole MiB, room for one block
        with KvstoredDaemon("", dram_size="1GiB", max_value_size=limit, slab_size=limit, python=py) as d:
            args.address = d.address
            result = run(args)
    report = render(result)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    if args.json == "-":
        print(json.dumps(result, default=str))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
