"""raftkv: a sharded, Raft-replicated, strongly consistent key-value store."""

from raftkv.client import Client, IndeterminateError, RaftKVError, UnavailableError

__all__ = ["Client", "IndeterminateError", "RaftKVError", "UnavailableError"]
__version__ = "0.1.0"
