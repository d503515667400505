"""Elle-style transactional consistency checker (Kingsbury & Alvaro, VLDB 2020), pure Python.

``check(ops, workload="rw-register" | "list-append", models=("strict-serializable",))``
-> :class:`ElleResult`.  See :mod:`.core` for the theory of operation,
:mod:`.rw_register` and :mod:`.list_append` for the version-order inference,
:mod:`.consistency` for the anomaly -> model tables.
"""

from .consistency import ANOMALY_NAMES, MODEL_NAMES, boundary
from .core import INVALID, UNKNOWN_VERDICT, VALID, WORKLOADS, ElleResult, check, classify
from .txn import ElleError

__all__ = ["check", "ElleResult", "ElleError", "WORKLOADS", "MODEL_NAMES", "ANOMALY_NAMES", "VALID", "INVALID",
           "UNKNOWN_VERDICT", "boundary", "classify"]
