"""Benchmark: peak memory of ``npdgru enhance`` on one long file (1 h, 10 h, ...).

    python benchmarks/bench_memory.py [--hours 1 10] [-P 100] [--rate 16000] [--whole]

For each length, writes a 16 kHz mono PCM_16 WAV of that many hours in a temporary folder (the
example recording ``examples/noisy_dishes_5db.flac`` tiled, written block by block, so this
process stays small), then runs ``npdgru enhance FILE -o OUT.wav -q`` (``python -m npdgru.cli``) in a child process and
reads the child's peak resident set size from ``os.wait4`` (``ru_maxrss``: the high-water mark
of that process alone). ``--whole`` adds, for each length, the same file through
``read_audio`` + ``Enhancer.enhance`` + ``write_audio`` in a child (the whole file in memory):
what the command held before it read, enhanced and wrote in blocks.

Columns: hours of audio, the file's size, the child's peak RSS, its wall time and the
real-time factor (wall time / audio time, including start-up and weight loading).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "noisy_dishes_5db.flac"

WHOLE = """
import sys
from npdgru.enhance import Enhancer, read_audio, write_audio
x, sr = read_audio(sys.argv[1])
y = Enhancer(update_percent=float(sys.argv[3])).enhance(x, sr)
write_audio(sys.argv[2], y, sr, subtype="PCM_16")
"""


def make_file(path: Path, hours: float, rate: int) -> None:
    """A mono PCM_16 file of ``hours`` hours, written a minute at a time."""
    from npdgru.resample import resample_signal as _resample

    x, sr = sf.read(str(EXAMPLE), dtype="float32")
    x = _resample(x[:, None], sr, rate)[:, 0]
    total, minute = int(hours * 3600 * rate), 60 * rate
    tile = np.resize(x, minute + len(x))
    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16", format="WAV") as f:
        for s0 in range(0, total, minute):
            k = min(minute, total - s0)
            off = (s0 // minute * 7919) % len(x)  # a different offset each minute
            f.write(tile[off : off + k])


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of the child running argv."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit status {p.returncode}")
    kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss / 1024  # macOS: bytes
    return kb / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("-P", "--update-percent", type=float, default=100.0)
    ap.add_argument("--rate", type=int, default=16000, help="sample rate of the generated file (default 16000)")
    ap.add_argument("--whole", action="store_true", help="also the whole file in memory (read_audio + Enhancer.enhance)")
    ap.add_argument("--tmp", default=None, help="folder for the generated files (default: the system's temporary folder)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for hours in args.hours:
            src, dst = Path(tmp) / f"{hours:g}h.wav", Path(tmp) / f"{hours:g}h-out.wav"
            make_file(src, hours, args.rate)
            size = src.stat().st_size / 1e6
            runs = [("npdgru enhance (blocks)", [sys.executable, "-m", "npdgru.cli", "enhance", str(src), "-o", str(dst), "-P", str(args.update_percent), "-q", "--overwrite"])]
            if args.whole:
                runs.append(("whole file in memory", [sys.executable, "-c", WHOLE, str(src), str(dst), str(args.update_percent)]))
            for name, argv in runs:
                rss, wall = peak_rss(argv)
                if sf.info(str(dst)).frames != sf.info(str(src)).frames:
                    raise SystemExit(f"{dst}: not as long as its input")
                rows.append((name, hours, size, rss, wall, wall / (hours * 3600)))
                print(f"  {name}, {hours:g} h: peak RSS {rss:.0f} MB, {wall:.0f} s", file=sys.stderr, flush=True)
            src.unlink()
            dst.unlink()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.rate} Hz mono PCM_16, P = {args.update_percent:g}, cpu backend")
    print()
    print("| run | audio (h) | file (MB) | peak RSS (MB) | wall (s) | RTF |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, hours, size, rss, wall, rtf in rows:
        print(f"| {name} | {hours:g} | {size:.0f} | {rss:.0f} | {wall:.0f} | {rtf:.4f} |")


if __name__ == "__main__":
    main()
