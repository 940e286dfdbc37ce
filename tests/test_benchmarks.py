"""The op benchmark still runs end to end (tiny shape, one repeat) and writes its table files.
Times are never asserted: benchmarks are not tests."""
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ops_tiny(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--shape", "tiny", "--repeats", "1",
           "--objects", "3", "--backends", "reference", "cpu", "--out", str(tmp_path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert "| box_pool | 3 | cpu |" in out and "| normalized_mse | - | cpu |" in out
    with open(tmp_path / "ops_cpu_tiny_float32.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["op"], r["backend"]) for r in rows} == {
        (op, b) for op in ("box_pool", "box_fill", "normalized_mse") for b in ("reference", "cpu")}
    assert all(float(r["fwdbwd_ms"]) > 0 and float(r["fwdbwd_peak_mb"]) >= 0 for r in rows)
    assert json.loads((tmp_path / "ops_cpu_tiny_float32.json").read_text())[0]["device"]
    assert "| normalized_mse | - | cpu |" in (tmp_path / "ops_cpu_tiny_float32.md").read_text()
