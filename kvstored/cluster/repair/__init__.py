"""The repair agent: brings every record this node holds to where the layout wants it.

One job per module:

* ``agent.py``: the loop (when a pass runs, which objects it looks at, Heads of their
  slots) and the progress it reports;
* ``decide.py``: what to do with one object, a pure function (verify, rebuild, move);
* ``execute.py``: the actions of a batch carried out in bulk (reads, rebuilds and
  writes batched per peer, every peer at once);
* ``peers.py``: calls to other nodes (Heads, batch_get, batch_put), one client per peer;
* ``local.py``: the store calls repair makes, run on the daemon's event loop;
* ``rebuild.py``: records rebuilt from sources (pyeclib reconstruct, re-indexed copies);
* ``throttle.py``: the token bucket of ``cluster.repair_rate``;
* ``pace.py``: yielding to this node's clients while they wait (``cluster.repair_yield_lag``);
* ``steps.py``: CPU and wall time per step of a pass (logged when a pass ends).

Namespaces repair by the cluster's policy (``kvstore-cli policy set`` / cluster.policies).
EC records are self-describing, so they are repaired in namespaces without a policy too;
replicated records in such namespaces are left alone (their copy count is not known).
"""
from __future__ import annotations

from .agent import RepairAgent, RepairSettings
from .local import LocalStore
from .pace import NodeLoad

# The daemon builds the agent from the narrow things it uses (kvstored/node.py):
#   RepairAgent(node_id, LocalStore(store, loop), membership, RepairSettings.from_config(c),
#               NodeLoad(loop_lag, data_server))
__all__ = ["LocalStore", "NodeLoad", "RepairAgent", "RepairSettings"]
