"""Benchmark: offline and streaming enhancement with NSNet2, one thread, and the CLI's memory.

    python benchmarks/bench_enhance.py [--seconds 10] [--repeats 7] [--skip-memory] [--skip-onnx]

Prints markdown tables:

1. Offline, a 10 s file (test-set mixtures concatenated), one thread: the npdgru cpu model at
   P = 100 / 75 / 50 / 25 and onnxruntime running the original NSNet2 ONNX on the same features.
   Microseconds per 10 ms frame for the model alone and end to end (STFT, features, model, mask,
   inverse STFT), real-time factor, ratio to onnxruntime; the median of ``--repeats`` runs after
   a warm-up, all in one process. Exits 1 if npdgru at P = 100 differs from onnxruntime by more
   than 1e-4 (the two must compute the same model), before any timing.
2. Streaming: microseconds per ``Stream.process()`` call of 160 samples (10 ms) at P = 100 and
   P = 50, median and 99th percentile over a 10 s signal.
3. Peak memory (max RSS) of ``npdgru enhance`` on generated 1 s, 1 min and 10 min files
   (``--skip-memory`` to leave out).

The NSNet2 ONNX model is found through NPDGRU_NSNET2_ONNX or .cache/nsnet2/ (tools/fetch_nsnet2.sh);
without it, or without onnxruntime, the onnxruntime columns are left out.
"""

from __future__ import annotations

import os

# One thread everywhere, before NumPy / Numba / onnxruntime are imported.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

import npdgru  # noqa: E402
from npdgru import stft  # noqa: E402
from npdgru.enhance import Enhancer  # noqa: E402
from npdgru.model import MaskModel  # noqa: E402
from npdgru.evaluate.runner import cpu_model  # noqa: E402
from npdgru.weights import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NSNET2 = REPO / "weights" / "nsnet2.safetensors"
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"
SR = 16000
PARITY_ATOL = 1e-4
PERCENTS = (100, 75, 50, 25)


def versions() -> str:
    import numba
    import scipy

    v = [f"Python {platform.python_version()}", f"npdgru {npdgru.__version__}", f"NumPy {np.__version__}", f"Numba {numba.__version__}", f"SciPy {scipy.__version__}"]
    try:
        import onnxruntime

        v.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    return ", ".join(v)


def test_signal(seconds: float) -> np.ndarray:
    """Test-set mixtures (or the shipped example) concatenated to ``seconds`` of 16 kHz audio."""
    files = sorted(NOISY_DIR.glob("*.flac")) or [REPO / "examples" / "noisy_dishes_5db.flac"]
    parts, n, want, k = [], 0, int(seconds * SR), 0
    while n < want:
        x, sr = sf.read(str(files[k % len(files)]), dtype="float32", always_2d=True)
        assert sr == SR, files[k % len(files)]
        parts.append(x[:, 0])
        n += len(x)
        k += 1
    return np.concatenate(parts)[:want]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def onnx_session():
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    env = os.environ.get("NPDGRU_NSNET2_ONNX")
    path = Path(env) if env else REPO / ".cache" / "nsnet2" / "nsnet2-20ms-baseline.onnx"
    if not path.is_file():
        return None, f"{path} not found (run tools/fetch_nsnet2.sh)"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"]), str(path)


def bench_offline(x: np.ndarray, repeats: int, use_onnx: bool) -> int:
    weights = load_weights(NSNET2)  # the original NSNet2: its ONNX twin is the comparison
    n = len(x)
    seconds = n / SR
    X = stft.stft(x)
    F = stft.log_power(X)[:, None, :]  # (T, 1, 161)
    T = F.shape[0]
    print(f"## Offline: {seconds:g} s of audio ({T} frames of 10 ms), NSNet2, one thread\n")

    sess = None
    if use_onnx:
        sess, where = onnx_session()
        if sess is None:
            print(f"(onnxruntime left out: {where})\n")
    if sess is not None:
        # Parity first: timings of two engines that compute different things mean nothing.
        name = sess.get_inputs()[0].name
        feats = np.ascontiguousarray(F[:, 0][None])  # (1, T, 161)
        ort_mask = sess.run(None, {name: feats})[0][0]
        dense = MaskModel(weights, update_percent=100, backend="cpu")
        err = float(np.max(np.abs(dense.forward(F, dense.init_state(1))[:, 0] - ort_mask)))
        verdict = "OK" if err <= PARITY_ATOL else "FAILED"
        print(f"Parity: max |mask npdgru P=100 - onnxruntime| = {err:.2e} over {T}x161 values (limit {PARITY_ATOL:g}): {verdict}\n")
        if err > PARITY_ATOL:
            return 1

    rows = []
    for P in PERCENTS:
        model = MaskModel(weights, update_percent=P, backend="cpu")
        t_model = median_time(lambda: model.forward(F, model.init_state(1)), repeats)
        enh = Enhancer(weights, update_percent=P, backend="cpu")
        t_e2e = median_time(lambda: enh.enhance(x, SR), repeats)
        macs = model.macs_per_frame()
        rows.append((f"npdgru cpu P={P}", 100 * model.fraction_updated(), (macs["gru_ours"] + macs["other"]) / 1e6, t_model, t_e2e))

    t_ort = None
    if sess is not None:
        floor = np.float32(10 ** (-80 / 20))

        def ort_e2e():
            Xo = stft.stft(x)
            m = sess.run(None, {name: stft.log_power(Xo)[None]})[0][0]
            np.clip(m, floor, np.float32(1.0), out=m)
            return stft.istft(Xo * m, n)

        t_ort = (median_time(lambda: sess.run(None, {name: feats}), repeats), median_time(ort_e2e, repeats))
        rows.append(("onnxruntime (NSNet2 ONNX)", 100.0, (1_920_000 + 761_000) / 1e6, *t_ort))

    print("| engine | GRU neurons updated | MMACs / frame | model us / frame | model RTF | model vs ORT | end-to-end us / frame | end-to-end RTF | end-to-end vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, pct, mmacs, tm, te in rows:
        rm = f"{tm / t_ort[0]:.2f}x" if t_ort else "-"
        re = f"{te / t_ort[1]:.2f}x" if t_ort else "-"
        print(f"| {name} | {pct:.0f}% | {mmacs:.2f} | {1e6 * tm / T:.1f} | {tm / seconds:.4f} | {rm} | {1e6 * te / T:.1f} | {te / seconds:.4f} | {re} |")
    print(f"\nMedian of {repeats} runs after one warm-up. RTF = processing time / audio duration. "
          "MMACs: multiply-accumulates per frame (GRU layers as run, plus the linear layers).\n")
    return 0


def bench_streaming(x: np.ndarray) -> None:
    print("## Streaming: one `Stream.process()` call per 160 samples (10 ms), one thread\n")
    print("| P | calls | median us / call | p99 us / call | max us / call | real-time budget used (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for P in (100, 50):
        enh = Enhancer(update_percent=P)
        warm = enh.stream()
        for i in range(0, min(len(x), 16000), 160):
            warm.process(x[i:i + 160])
        s = enh.stream()
        times = []
        for i in range(0, len(x) - 159, 160):
            chunk = x[i:i + 160]
            t0 = time.perf_counter()
            s.process(chunk)
            times.append(time.perf_counter() - t0)
        us = 1e6 * np.array(times)
        print(f"| {P} | {len(us)} | {np.median(us):.0f} | {np.percentile(us, 99):.0f} | {us.max():.0f} | {np.median(us) / 10000:.1%} |")
    print()


def bench_memory(base: np.ndarray) -> None:
    print("## Peak memory of `npdgru enhance` (max RSS of the process, one thread)\n")
    print("| input | samples | audio as float32 | max RSS | RSS above the 1 s run | time |")
    print("|---|---:|---:|---:|---:|---:|")
    env = dict(os.environ)
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, dt)")
    baseline = None
    with tempfile.TemporaryDirectory(prefix="npdgru-bench-") as tmp:
        for label, seconds in (("1 s", 1), ("1 min", 60), ("10 min", 600)):
            n = seconds * SR
            src = Path(tmp) / f"in_{seconds}s.wav"
            sf.write(src, np.resize(base, n), SR, subtype="PCM_16")
            out = Path(tmp) / f"out_{seconds}s.wav"
            cmd = [sys.executable, "-c", probe, sys.executable, "-m", "npdgru.cli", "enhance", str(src), "-o", str(out), "-q"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            rc, kib, dt = r.stdout.split()
            if rc != "0":
                print(f"| {label} | failed: {r.stderr.strip()} |")
                continue
            mib = int(kib) / 1024  # Linux reports ru_maxrss in KiB
            baseline = mib if baseline is None else baseline
            print(f"| {label} | {n:,} | {n * 4 / 2**20:.1f} MiB | {mib:.0f} MiB | {mib - baseline:.0f} MiB | {float(dt):.1f} s |")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the offline test signal (default 10)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per measurement, after one warm-up (default 7)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the CLI peak-memory table")
    ap.add_argument("--skip-onnx", action="store_true", help="leave out onnxruntime")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    print(f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}")
    print(f"Versions: {versions()}")
    print("Threads: NUMBA/OMP/OPENBLAS/MKL_NUM_THREADS=1, onnxruntime intra_op=inter_op=1\n")

    x = test_signal(args.seconds)
    if bench_offline(x, args.repeats, not args.skip_onnx):
        print(f"error: npdgru at P=100 differs from onnxruntime by more than {PARITY_ATOL:g}; no timings reported", file=sys.stderr)
        return 1
    bench_streaming(x)
    if not args.skip_memory:
        bench_memory(x)
    print(f"(benchmark ran in {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
