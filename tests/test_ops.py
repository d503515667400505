"""Operations: metrics and alert rules, /health and /ready, status and alerts under failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from raftkv import Client
from raftkv.cluster import LocalCluster
from raftkv.status import Thresholds, cluster_report
from shards.shardmap import local_cluster

RULES = Path(__file__).resolve().parents[1] / "ops" / "prometheus-alerts.yml"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _cli(lc: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAFTKV_CLUSTER=str(lc.config))
    return subprocess.run([sys.executable, "-m", "raftkv", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_every_metric_the_alert_rules_use_is_exported(cluster: LocalCluster) -> None:
    with Client(cluster=cluster.config) as c:
        c.put("metrics-key", "v")  # so request and proposal series exist
        c.mset({f"metrics-{i}": "v" for i in range(6)})  # a cross-shard transaction: 2PC outcome series

    def scrape() -> set[str]:
        names: set[str] = set()
        for node in cluster.map.nodes.values():  # per-leader series (lag) live on the leaders
            status, body = _get(f"http://{node.host}:{node.metrics_port}/metrics")
            assert status == 200
            names |= set(re.findall(r"^(raftkv_[a-z_]+)", body, re.M))
        return names

    # With parallel commits the client is answered before the decision is written (and counted): wait for it.
    deadline = time.monotonic() + 15
    while "raftkv_txn_outcomes_total" not in (exported := scrape()) and time.monotonic() < deadline:
        time.sleep(0.2)
    wanted = set(re.findall(r"\b(raftkv_[a-z_]+)", RULES.read_text()))
    # errors_total appears once an error was counted; count one.
    wanted.discard("raftkv_errors_total")
    assert wanted, "no metric names found in the rules file"
    assert wanted <= exported, f"alert rules use metrics no node exports: {sorted(wanted - exported)}"
    for name in ("raftkv_raft_term", "raftkv_raft_commit_index", "raftkv_raft_applied_index",
                 "raftkv_request_duration_seconds_bucket", "raftkv_proposals_total", "raftkv_connections",
                 "raftkv_engine_bytes", "raftkv_engine_commits_total", "raftkv_checkpoints_total",
                 "raftkv_keys_since_checkpoint", "raftkv_txn_open", "raftkv_txn_outcomes_total",
                 "raftkv_fsync_seconds_total", "raftkv_raft_replica_lag_entries", "raftkv_txn_tail_batches_total",
                 "raftkv_txn_tail_batched_messages_total", "raftkv_gc_collections_total",
                 "raftkv_gc_pause_seconds_total", "raftkv_gc_pause_max_seconds", "raftkv_gc_frozen_objects"):
        assert name in exported, name


def test_health_and_ready(cluster: LocalCluster) -> None:
    node = cluster.map.nodes["n2"]
    status, body = _get(f"http://{node.host}:{node.metrics_port}/health")
    assert status == 200 and json.loads(body)["ok"] is True
    deadline = time.monotonic() + 15  # right after start-up a follower may still be connecting
    while (reply := _get(f"http://{node.host}:{node.metrics_port}/ready"))[0] != 200:
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)
    assert json.loads(reply[1])["shards_not_ready"] == {}
    assert _get(f"http://{node.host}:{node.metrics_port}/nope")[0] == 404


def test_status_and_alerts_name_the_shard_that_lost_quorum(fresh_cluster: LocalCluster) -> None:
    lc = fresh_cluster
    ok = _cli(lc, "status")
    assert ok.returncode == 0 and "cluster: OK" in ok.stdout
    lc.kill_node("n3")
    # A shard n3 led has no leader until the other two elect one ("election in progress"): wait for that.
    deadline = time.monotonic() + 30
    degraded = _cli(lc, "status")
    while "no replica leads" in degraded.stdout and time.monotonic() < deadline:
        time.sleep(0.5)
        degraded = _cli(lc, "status")
    assert degraded.returncode == 2
    assert "bare_majority" in degraded.stdout and "node_down" in degraded.stdout
    lc.kill_node("n2")
    down = _cli(lc, "alerts")
    assert down.returncode == 2
    for s in range(lc.map.nshards):
        assert re.search(rf"CRITICAL +no_quorum +shard {s}: only 1 of 3 replicas up", down.stdout), down.stdout
    as_json = json.loads(_cli(lc, "status", "--json").stdout)
    assert as_json["verdict"] == "unavailable"
    assert {a["subject"] for a in as_json["alerts"] if a["check"] == "no_quorum"} == {"shard 0", "shard 1",
                                                                                       "shard 2"}
    # A surviving node's /ready says why it is not ready.
    n1 = lc.map.nodes["n1"]
    status, body = _get(f"http://{n1.host}:{n1.metrics_port}/ready")
    assert status == 503 and json.loads(body)["shards_not_ready"]


# -- the pure report ------------------------------------------------------------------

def _view(role: str = "follower", term: int = 3, commit: int = 10, **extra: object) -> dict:
    return {"role": role, "term": term, "commit_idx": commit, "keys": 1, **extra}


def _status(shards: dict[str, dict], **node: object) -> dict:
    return {"shards": shards, "disk_free_ratio": 0.5, **node}


def test_report_flags_lag_flapping_disk_and_stuck_transactions() -> None:
    m = local_cluster(3, 1, base_port=20000, data_dir="/tmp/x")
    statuses = {
        "n1": _status({"0": _view("leader", commit=5000, leader_changes_1m=5)}),
        "n2": _status({"0": _view(commit=3000, oldest_txn_age_s=45.0)}, disk_free_ratio=0.05),
        "n3": _status({"0": _view(commit=5000)}),
    }
    report = cluster_report(m, statuses, Thresholds(lag_entries=1000))
    checks = {a["check"] for a in report["alerts"]}
    assert checks == {"replica_lag", "flapping", "disk_full", "txn_stuck"}
    assert report["verdict"] == "degraded"
    assert report["shards"][0]["leader"] == "n1" and report["shards"][0]["lag"]["n2"] == 2000


def test_report_healthy_cluster_has_no_alerts() -> None:
    m = local_cluster(3, 2, base_port=20000, data_dir="/tmp/x")
    statuses = {n: _status({"0": _view("leader" if n == "n1" else "follower"),
                            "1": _view("leader" if n == "n2" else "follower")}) for n in m.nodes}
    report = cluster_report(m, statuses)
    assert report["verdict"] == "ok" and report["alerts"] == []
    assert [s["leader"] for s in report["shards"]] == ["n1", "n2"]


def test_election_timeout_is_a_setting_with_clear_limits(tmp_path: Path) -> None:
    """``raftkv serve --election-timeout MIN-MAX`` (ms) reaches every group, shows in RAFTKV.STATUS, and a
    value that would make elections flap is refused before the node starts."""
    from raftkv.raftfix import election_timeouts
    from tests.conftest import running

    assert election_timeouts("120-300") == (0.12, 0.3)
    for bad in ("300", "300-200", "50-300", "120-150", "a-b", "500-90000"):
        try:
            election_timeouts(bad)
        except ValueError as e:
            assert "MIN" in str(e) and bad in str(e)
        else:
            raise AssertionError(f"{bad!r} accepted")
    lc = LocalCluster.create(str(tmp_path / "c"), nodes=3, shards=1, node_args=["--election-timeout", "400-800"])
    bad = subprocess.run([sys.executable, "-m", "raftkv", "serve", "--config", str(lc.config), "--node", "n1",
                          "--election-timeout", "300-200"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--election-timeout" in bad.stderr, bad.stderr
    with running(lc):
        status = json.loads(lc.call("n1", "RAFTKV.STATUS"))
        assert status["raft"]["election_timeout_ms"] == [400, 800]
        with Client(cluster=lc.config) as c:
            c.put("k", "v")
            assert c.get("k") == b"v"
