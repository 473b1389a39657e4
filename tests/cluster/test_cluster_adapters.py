"""The engine adapters' client factory pointed at a cluster: a ClusterClient that answers
everything the LMCache / SGLang / vLLM adapters call (real etcd, three real nodes)."""
from __future__ import annotations

import os

import pytest
from clusterutil import start_nodes
from etcdutil import TTL, needs_etcd

pytest.importorskip("pyeclib")

import kvstore
from kvstore.cluster import ClusterClient
from kvstore.integrations import ClientOptions, client_from_options, lookup_prefix

pytestmark = [needs_etcd, pytest.mark.timeout(120)]


def test_adapter_options_give_a_cluster_client(etcd, start_daemon, tmp_path):
    ds = start_nodes(start_daemon, tmp_path, etcd, "a", 3, "ad=ec:2+1", lease_ttl=TTL)
    opts, rest = ClientOptions.from_mapping(
        {"address": f"kvstore+cluster://{ds[0].control},{ds[1].control}", "namespace": "ad"})
    assert opts.cluster and rest == {} and "cluster" in opts.describe()
    with client_from_options(opts) as cc:
        assert isinstance(cc, ClusterClient) and str(cc.policy()) == "ec:2+1"
        keys = [f"chunk-{i}".encode() for i in range(6)]
        vals = [os.urandom(300_000 + i) for i in range(6)]
        cc.batch_put(list(zip(keys[:4], vals[:4])))
        assert lookup_prefix(cc, keys, batch=2) == 4
        bufs = [bytearray(400_000) for _ in range(4)]
        assert cc.batch_get_into(keys[:4], bufs) == [len(v) for v in vals[:4]]
        assert all(bytes(b[:len(v)]) == v for b, v in zip(bufs, vals))
        small = bytearray(10)
        with pytest.raises(kvstore.InvalidArgument, match="does not fit"):
            cc.get_into(keys[0], small)
        assert cc.pin(keys[:2], ttl=30) == 2 * 3  # every record of each: 2 data + 1 parity
        assert cc.unpin(keys[:2]) == 2 * 3
        assert 0 < cc.ping() < 5
        assert cc.delete_all() == 4 * 3 and cc.exists(keys) == [False] * 6
    with pytest.raises(kvstore.InvalidArgument, match="data_address"):
        client_from_options(ClientOptions(address=ds[0].control, cluster=True, data_address="x:1"))
