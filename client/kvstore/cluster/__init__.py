"""ClusterClient: one logical store over many kvstored nodes, placement done client-side.

One job per module: ``api.py`` the class and its life cycle; ``view.py`` the member list,
per-node clients and slots; ``writes.py`` the put path; ``reads.py`` the get paths (into
the caller's buffers too); ``control.py`` exists, delete, pin, ping.

No master on the data path: every object's homes come from rendezvous hashing over the
member list (see ``kvstore.layout``), and this client talks to those nodes directly (one
``kvstore.Client`` per node, created lazily), fanning batches out per node in parallel.

Member list: a static list, a callable, or the cluster itself (``ClusterClient.from_cluster``
reads the Members RPC of any node, which watches etcd, together with the cluster's
namespace policies). Every put and get carries the list's epoch; a node with another
list answers Redirect and this client refreshes its list and re-sends (bounded), so a
client with an old list is redirected, not failed.

Redundancy is a per-namespace policy:

* ``none``: one copy, on the object's first node.
* ``replicas:N``: N copies on N nodes (distinct failure domains first). A put is
  acknowledged only when all copies are stored; a get reads the first healthy replica
  and falls back to the next on NotFound / Unavailable / ChecksumMismatch.
* ``ec:K+M``: Reed-Solomon through pyeclib (ISA-L). A put is acknowledged only when all
  K+M records are stored; each record is sent as two buffers, header and fragment,
  gathered (no copy of the fragment). Healthy gets fetch the first K slots in parallel (concatenated
  when they hold data fragments 0..K-1, decoded otherwise); a missing, slow
  (``fragment_timeout``) or corrupt record turns the read into a degraded one that
  fetches the other slots too and decodes; get_into / batch_get_into assemble into the
  caller's buffer. Objects smaller than ``min_ec_size`` are
  stored whole on the first M+1 slots.

A node that does not answer a put is marked down for ``down_s`` (1 s: a dead node
refuses connections, so finding out again costs milliseconds, and a node that is back
gets its writes within a second) and the put is written again over the other nodes: its records land on the slots the layout gives without that
node, which is where they belong once etcd drops it (and where repair moves them back
from, should it return). Fewer live nodes than the policy spreads over: writes go on (EC slots wrap around, replicas
are written to every live node) while the loss of one more node would still leave the
object readable (``Policy.min_live``), and the nodes' repair loop restores full
redundancy when nodes come back or join. A policy larger than the biggest cluster seen is
refused (InvalidArgument) when it is this client's own; the cluster's policies were
checked against the member count when they were set.

Partial failure of a put: the records this call newly stored are deleted best effort
(but those of an object a node held already: writes.py) and the error is raised;
objects are immutable and a repeated put of the same bytes is a no-op, so retrying is
idempotent.
"""
from __future__ import annotations

from ..layout import DEFAULT_MIN_EC_SIZE, FRAG_HEADER, Policy, fragment_key
from ..placement import Member
from .api import ClusterClient
from .view import ClusterView, view_from_members_response

__all__ = ["DEFAULT_MIN_EC_SIZE", "FRAG_HEADER", "ClusterClient", "ClusterView", "Member", "Policy",
           "fragment_key", "view_from_members_response"]
