"""Benchmark: what checking stream input costs, against the hop it guards. One thread.

    python benchmarks/bench_validation.py [--streams 64] [--rounds 5]

Prints a markdown table: microseconds per call of ``Stream.process`` (160 samples, NSNet2 at
P = 50) and of the check alone (``_validate_chunk``), and of ``StreamBatch.process`` with
``--streams`` streams and its check alone (``_validate_hops``). Each row is the median over
``--rounds`` interleaved rounds of the median of many calls, so the ratios come from one run.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from npdgru import Enhancer  # noqa: E402
from npdgru.streaming import _validate_chunk, _validate_hops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def median_us(f, n: int) -> float:
    ts = []
    for i in range(n):
        t0 = time.perf_counter()
        f(i)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    enh = Enhancer(REPO / "weights" / "nsnet2.safetensors", update_percent=50)
    x = (0.1 * np.random.default_rng(0).standard_normal(160 * 2000)).astype(np.float32)
    hop = lambda i: x[(i % 1900) * 160 : (i % 1900 + 1) * 160]  # noqa: E731
    s = enh.stream()
    sb = enh.stream_batch()
    ids = [sb.add() for _ in range(args.streams)]
    hops = {sid: hop(k) for k, sid in enumerate(ids)}
    for i in range(50):  # compile and warm up
        s.process(hop(i))
    sb.process(hops)
    rows = {
        "Stream.process, 160 samples": lambda: median_us(lambda i: s.process(hop(i)), 300),
        "  its check (_validate_chunk)": lambda: median_us(lambda i: _validate_chunk(hop(i)), 300),
        f"StreamBatch.process, {args.streams} streams": lambda: median_us(lambda i: sb.process(hops), 30),
        "  its check (_validate_hops)": lambda: median_us(lambda i: _validate_hops(hops, {sid: r for r, sid in enumerate(ids)}), 300),
    }
    got = {k: [] for k in rows}
    for _ in range(args.rounds):
        for k, f in rows.items():
            got[k].append(f())
    med = {k: float(np.median(v)) for k, v in got.items()}
    names = list(rows)
    print("| call | us / call (median) | share of its call |")
    print("|---|---:|---:|")
    for k in names:
        share = ""
        if k.startswith("  "):
            parent = names[names.index(k) - 1]
            share = f"{100 * med[k] / med[parent]:.1f} %"
        print(f"| {k.strip()} | {med[k]:.1f} | {share} |")


if __name__ == "__main__":
    main()
