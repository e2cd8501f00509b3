"""Smoke run of benchmarks/bench_memory.py (peak RSS of ``npdgru enhance`` on a long file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_memory_smoke(tmp_path):
    """A 7 s file, in blocks and whole: exits 0 (each output as long as its input) and prints a
    row per run with a peak RSS in MB."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--hours", "0.002", "--whole", "--tmp", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row[0].strip() for row in rows] == ["npdgru enhance (blocks)", "whole file in memory"], r.stdout
    assert all(float(row[3]) > 10 for row in rows), r.stdout  # MB: at least the interpreter
