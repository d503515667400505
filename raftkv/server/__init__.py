"""The node: a RESP server over the shard replicas it hosts (see ``raftkv.server.node``)."""

from raftkv.server.api import Faults, Limits, Timing
from raftkv.server.node import Node, run_node

__all__ = ["Faults", "Limits", "Node", "Timing", "run_node"]
