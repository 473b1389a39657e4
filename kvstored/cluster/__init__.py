"""Cluster support. For now membership only (kvstored/cluster/membership.py): who is in the
cluster, where they listen, what they hold. Placement lives client-side (kvstore.placement)."""
from kvstored.cluster.membership import MemberInfo, Membership

__all__ = ["MemberInfo", "Membership"]
