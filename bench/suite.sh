#!/bin/sh
# The full side-by-side run: raftkv vs etcd 3.4 (JSON gateway and gRPC) vs Redis (whichever are on PATH),
# every workload at 1 and 32 clients, redis-benchmark, then failover and scale.  Writes bench/results/*.json
# and bench/results/suite.png.
# Usage: bench/suite.sh [DURATION_S]   (installs nothing; peers missing from PATH are reported and skipped)
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
D=${1:-10}
mkdir -p bench/results
$PY -m raftkv bench --workload all --clients 1,32 --duration "$D" --peers etcd,etcd-grpc,redis \
    --json bench/results/suite.json --png bench/results/suite.png
$PY -m raftkv bench failover --trials 10 --json bench/results/failover.json
$PY -m raftkv bench scale --duration "$D" --json bench/results/scale.json
