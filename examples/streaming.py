"""Simulated real-time enhancement: 10 ms chunks in, 10 ms chunks out.

    python examples/streaming.py [--update-percent P]

Feeds the shipped noisy example to a :class:`npdgru.streaming.Stream` 160 samples at a time (as a
sound card callback would), times every ``process()`` call, and checks that the streamed output
is the offline output delayed by ``stream.latency`` = 320 samples (20 ms), bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from npdgru import Enhancer

HERE = Path(__file__).resolve().parent
CHUNK = 160  # 10 ms at 16 kHz


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update-percent", "-P", type=float, default=50.0)
    args = ap.parse_args(argv)

    x, sr = sf.read(HERE / "noisy_dishes_5db.flac", dtype="float32")
    assert sr == 16000, "a Stream takes 16 kHz mono"
    enh = Enhancer(update_percent=args.update_percent, exact=True)  # exact: offline products in the streaming order
    stream = enh.stream()

    # Warm-up on a throwaway stream so that the first timed call does not pay for compilation.
    warm = enh.stream()
    for i in range(0, 1600, CHUNK):
        warm.process(x[i:i + CHUNK])
    warm.flush()

    out, times = [], []
    for i in range(0, len(x), CHUNK):
        chunk = x[i:i + CHUNK]
        t0 = time.perf_counter()
        y = stream.process(chunk)  # returns len(chunk) samples, 320 samples behind
        times.append(time.perf_counter() - t0)
        out.append(y)
    out.append(stream.flush())  # the last 320 samples
    streamed = np.concatenate(out)

    offline = enh.enhance(x, sr)
    n, L = len(x), stream.latency
    same = len(streamed) == n + L and np.array_equal(streamed[L:L + n], offline) and not streamed[:L].any()
    us = np.array(times) * 1e6
    print(f"P={enh.update_percent:g}: {len(times)} calls of {CHUNK} samples (10 ms): median {np.median(us):.0f} us, "
          f"p99 {np.percentile(us, 99):.0f} us, max {us.max():.0f} us per call; latency {L} samples ({1000 * L / sr:.0f} ms)")
    print(f"streamed == offline delayed by {L} samples, bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
