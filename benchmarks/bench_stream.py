"""Real-time factor and latency of ``npdgru stream`` through a pipe, per sample rate and channels.

    python benchmarks/bench_stream.py [--seconds 10] [-P 50]

The input is the shipped example recording (examples/noisy_dishes_5db.flac) repeated to
``--seconds``, resampled to each rate, the second channel reversed; it goes as 16-bit WAV into
``npdgru stream`` on stdin, 10 ms blocks, and the table shows what the command reports on stderr:
its compute time over the audio time (kernels compiled beforehand, not counted) and its latency.
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("-P", "--update-percent", default=None)
    args = ap.parse_args()
    x, sr = sf.read(REPO / "examples" / "noisy_dishes_5db.flac", dtype="float32")
    x = np.tile(x, int(np.ceil(args.seconds * sr / len(x))))[: int(args.seconds * sr)]
    print("| rate | channels | real-time factor | latency |")
    print("|---:|---:|---:|---:|")
    for rate, channels in [(16000, 1), (16000, 2), (48000, 1), (48000, 2), (44100, 2), (8000, 1)]:
        y = resample_poly(x, rate, sr).astype(np.float32)
        if channels == 2:
            y = np.stack([y, y[::-1]], axis=1)
        b = io.BytesIO()
        sf.write(b, y, rate, format="WAV", subtype="PCM_16")
        cmd = [sys.executable, "-m", "npdgru", "stream"] + (["-P", str(args.update_percent)] if args.update_percent else [])
        p = subprocess.run(cmd, input=b.getvalue(), capture_output=True, cwd=REPO)
        err = p.stderr.decode()
        if p.returncode:
            raise SystemExit(err)
        rtf = re.search(r"real-time factor ([0-9.]+)", err).group(1)
        lat = re.search(r"latency (\d+) samples \(([0-9.]+) ms\)", err)
        print(f"| {rate} | {channels} | {rtf} | {lat.group(1)} samples ({lat.group(2)} ms) |")


if __name__ == "__main__":
    main()
