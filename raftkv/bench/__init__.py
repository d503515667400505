"""The raftkv benchmarks: raftkv side by side with etcd and Redis, failover, and scale (``raftkv bench``).

Not part of the store: nothing in raftkv's product modules imports this package.

Modules, one concept each:

* ``workloads`` — workload names, which ones write, key and value generation;
* ``hist`` — the mergeable log-bucketed latency histogram;
* ``etcd_http`` — etcd's v3 HTTP/JSON gateway: requests, the incremental response parser, one blocking call,
  the leader lookup;
* ``etcd_grpc`` — etcd's native gRPC API: a hand-written protobuf codec for the fields used, the channel;
* ``systems`` — the systems under test as processes (raftkv, etcd — through either API —, Redis) and which
  peers are on PATH;
* ``load`` — the closed-loop, multi-process, event-driven load generator (asyncio and gRPC for etcd-grpc);
* ``preload`` — loading the key space before measuring;
* ``report`` — machine description, result lines, the Markdown table and the chart;
* ``suite``, ``failover``, ``scale``, ``watch`` — the four benchmarks (``watch``: change-feed delivery to one
  watcher);
* ``cli`` — ``raftkv bench`` (click).

Blocking RESP calls go through ``raftkv.connection.Connection`` like everywhere else.
"""
