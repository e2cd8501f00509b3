"""Smoke run of benchmarks/bench_banded.py (the banded D-GRU step of DPRNN, split into pieces)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_banded_smoke():
    """A few steps, one repeat: exits 0 (its selections agreed with NumPy before timing) and prints
    both tables: 12 piece rows (3 + 3 per P < 100) and the layer at the four P."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_banded.py"), "--frames", "3", "--repeats", "1"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith(("| piece", "| P "))]
    assert len(rows) == 12 + 4, r.stdout
    assert "MISMATCH" not in r.stdout + r.stderr
    layer = [line.split("|")[1].strip() for line in rows[-4:]]
    assert layer == ["100", "75", "50", "25"], r.stdout
    assert all(line.count(",") == 2 for line in rows[-3:]), r.stdout  # P < 100: one-pass and fixed-set columns
