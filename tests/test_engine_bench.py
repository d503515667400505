"""bench/engine_bench.py in a tiny mode (0.2 s, a few thousand keys): every metric is produced and
written to the JSON.  No speed checks.  RocksDB only when rocksdict (the ``bench`` extra) is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("engine_bench", os.path.join(ROOT, "bench", "engine_bench.py"))
engine_bench = importlib.util.module_from_spec(_spec)
sys.modules["engine_bench"] = engine_bench  # its measurements run in spawned children, which import it by name
_spec.loader.exec_module(engine_bench)

METRICS = [
    *(f"group_commit_G{g}_{m}" for g in (1, 6) for m in ("ticks_per_s", "entries_per_s", "p50_ms", "p99_ms",
                                                                 "disk_bytes_per_entry")),
    "apply_sync_keys_per_s", "apply_nosync_keys_per_s",
    "prefix_delete_ms", "prefix_delete_next_seek_ms",
    "bulk_load_keys_per_s", "bulk_load_disk_mb", "bulk_load_rss_mb", "bulk_load_rss_anon_mb",
    "bulk_load_rss_before_mb", "point_reads_per_s", "scan_keys_per_s",
    "after_reads_rss_mb", "after_reads_rss_anon_mb",
]


def tiny(tmp_path, engine: str) -> dict:
    out = tmp_path / "r.json"
    lines: list[str] = []
    engine_bench.main(["--engines", engine, "--duration", "0.2", "--reps", "1", "--groups", "1,6",
                       "--keys", "4000", "--shards", "4", "--batch", "500", "--log-entries", "2000",
                       "--dir", str(tmp_path), "--json", str(out)], out=lines.append)
    doc = json.loads(out.read_text())
    assert doc["machine"]["nproc"] and doc["machine"]["fdatasync_200B_p50_ms"] > 0
    res = doc["results"][engine]
    for m in METRICS:
        assert m in res, m
        assert res[m]["min"] <= res[m]["median"] <= res[m]["max"], m
        if not m.endswith(("_ms", "disk_bytes_per_entry")):  # /proc/self/io may count nothing (tmpfs)
            assert res[m]["median"] > 0, m
        assert f"| {m} |" in "\n".join(lines), m
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".engine-bench-")], "temp dirs left behind"
    return res


def test_lmdb_tiny(tmp_path) -> None:
    tiny(tmp_path, "lmdb")


def test_rocksdb_tiny(tmp_path) -> None:
    pytest.importorskip("rocksdict", reason="rocksdict is only in the 'bench' extra")
    tiny(tmp_path, "rocksdb")


def test_help_and_bad_options(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        engine_bench.parse_args(["--help"])
    assert e.value.code == 0
    assert "--duration" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        engine_bench.parse_args(["--engines", "sqlite"])
    assert e.value.code == 2
