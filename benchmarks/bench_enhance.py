"""Benchmark: offline and streaming enhancement, every shipped model, one thread, with the targets.

    python benchmarks/bench_enhance.py [--seconds 10] [--repeats 5] [--skip-memory] [--skip-onnx] [--skip-first-call]

Prints markdown tables, all measured in one process with the rows interleaved (every repeat
runs every row once, in turn; the median per row is reported), so that the ratios between rows
hold even on a busy machine:

1. Offline, end to end through ``Enhancer.enhance`` (STFT, features, model, mask, inverse STFT)
   on ``--seconds`` of test-set mixtures: us per 10 ms frame for each shipped model at
   P = 100 / 75 / 50 / 25, the ratio to the model's own P = 100 and, for the NSNet2-shaped
   models, to onnxruntime running the same weights densely (an ONNX graph built here with
   torch.onnx: ``nn.GRU`` layers, so ONNX GRU operators) with the same NumPy STFT around it.
2. Streaming, one ``Stream.process`` call per 160 samples (10 ms): median and 99th percentile
   us per hop, the ratio to the model's own P = 100 and to the stateful onnxruntime peer (the same
   ONNX graph with its GRU states as inputs and outputs, one frame per call, a NumPy STFT around
   it), and the MB of weights one hop reads (``Plan.weight_bytes``: dense, and as run).
   NSNet2 also runs with ``exact=True`` (rows "P exact": the column-order products, offline ==
   streaming bit for bit) and without input accumulators (rows "P dense-in").
3. The targets, each with the ratio measured above and whether it holds.
4. First call: README's first command in a fresh process with an empty ``NUMBA_CACHE_DIR``
   (compiling the kernels it needs), then warm, default and exact mode (``--skip-first-call``).
5. Peak memory (max RSS) of ``npdgru enhance`` on 1 s, 1 min and 10 min files (``--skip-memory``).

Before timing, npdgru at P = 100 must agree with onnxruntime (max |mask difference| <= 1e-4) on
every NSNet2-shaped model; otherwise the script exits 1 without timings. Without torch, onnx or
onnxruntime the onnxruntime columns are left out (the rest runs).
"""

from __future__ import annotations

import os

# One thread everywhere, before NumPy / Numba / onnxruntime are imported.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
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
from npdgru.evaluate.runner import cpu_model  # noqa: E402
from npdgru.kinds import KINDS  # noqa: E402
from npdgru.model import MaskModel  # noqa: E402
from npdgru.plan import format_version_of  # noqa: E402
from npdgru.weights import load_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"
MODELS = ("nsnet2", "nsnet2-kd-anyp", "dprnn-anyp", "mpt-anyp")
SR = 16000
HOP = stft.HOP
PARITY_ATOL = 1e-4
EXTRA_ROWS = ("50 dense-in", "25 dense-in", "100 exact", "75 exact", "50 exact", "25 exact")  # NSNet2 only
PERCENTS = (100, 75, 50, 25)
FLOOR = np.float32(10 ** (-80 / 20))


def versions() -> str:
    import numba
    import scipy

    v = [f"Python {platform.python_version()}", f"npdgru {npdgru.__version__}", f"NumPy {np.__version__}", f"Numba {numba.__version__}", f"SciPy {scipy.__version__}"]
    for mod in ("onnxruntime", "torch"):
        try:
            v.append(f"{mod} {__import__(mod).__version__}")
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


# ------------------------------------------------------------------------------------ peer


def nsnet2_shaped(weights) -> bool:
    """linear*, gru+, linear* with one GRU size: what ``nn.GRU(num_layers=k)`` exports."""
    if format_version_of(weights.architecture) != 1:  # a plain chain of linear and D-GRU layers
        return False
    g = [i for i, s in enumerate(weights.architecture["layers"]) if KINDS[s["kind"]].carries_state]
    if not g or g != list(range(g[0], g[-1] + 1)):
        return False
    specs = [weights.architecture["layers"][i] for i in g]
    return len({(s["hidden"]) for s in specs}) == 1 and all(s.get("bands", 1) == 1 for s in weights.architecture["layers"])


def onnx_peer(weights):
    """An onnxruntime session of the model run densely: inputs x (1, T, F), h (layers, 1, H);
    outputs mask (1, T, F), h_out. One graph serves offline (h = 0, all frames) and streaming
    (one frame per call, the state carried). (None, reason) without torch / onnx / onnxruntime."""
    try:
        import onnxruntime as ort
        import torch
        from torch import nn
    except ImportError as e:
        return None, f"{e.name} is not installed"
    layers = weights.architecture["layers"]
    t = {k: torch.from_numpy(v.copy()) for k, v in weights.tensors.items()}
    grus = [s for s in layers if KINDS[s["kind"]].carries_state]
    first = layers.index(grus[0])
    acts = {"none": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

    def stack(specs):
        mods = []
        for s in specs:
            lin = nn.Linear(s["in"], s["out"])
            lin.weight.data, lin.bias.data = t[f"{s['name']}.weight"], t[f"{s['name']}.bias"]
            mods += [lin, acts[s.get("activation", "none")]()]
        return nn.Sequential(*mods)

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.post = stack(layers[:first]), stack(layers[first + len(grus):])
            self.gru = nn.GRU(grus[0]["in"], grus[0]["hidden"], num_layers=len(grus), batch_first=True)
            for k, s in enumerate(grus):
                for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(self.gru, f"{a}_l{k}").data = t[f"{s['name']}.{a}"]

        def forward(self, x, h):
            y, h2 = self.gru(self.pre(x), h)
            return self.post(y), h2

    import warnings

    f = io.BytesIO()
    n_feat, H = weights.architecture["n_features"], grus[0]["hidden"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Dense().eval(), (torch.zeros(1, 3, n_feat), torch.zeros(len(grus), 1, H)), f, input_names=["x", "h"], output_names=["mask", "h_out"],
                          dynamic_axes={"x": {1: "T"}, "mask": {1: "T"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(f.getvalue(), sess_options=so, providers=["CPUExecutionProvider"])
    return (sess, np.zeros((len(grus), 1, H), np.float32)), "built from the weights with torch.onnx"


def peer_offline(peer, x):
    """End to end with the peer: NumPy STFT, features, all frames in one call, mask, inverse STFT."""
    sess, h0 = peer
    X = stft.stft(x)
    m = sess.run(None, {"x": stft.log_power(X)[None], "h": h0})[0][0]
    np.clip(m, FLOOR, np.float32(1.0), out=m)
    return stft.istft(X * m, len(x))


class PeerStream:
    """The stateful peer as a stream: per 160 samples one analysis frame, one session call with
    the GRU states in and out, the mask, one synthesis hop (NumPy around onnxruntime)."""

    def __init__(self, peer):
        self.sess, h0 = peer
        self.h = h0.copy()
        self.prev = np.zeros(HOP, np.float32)
        self.tail = np.zeros(HOP, np.float32)

    def process(self, chunk):
        frame = np.concatenate([self.prev, chunk]) * stft.WINDOW
        self.prev = chunk
        X = np.fft.rfft(frame).astype(np.complex64)
        m, self.h = self.sess.run(None, {"x": stft.log_power(X)[None, None], "h": self.h})
        y = np.fft.irfft(X * np.clip(m[0, 0], FLOOR, 1.0)).astype(np.float32) * stft.WINDOW
        out = y[:HOP] + self.tail
        self.tail = y[HOP:]
        return out


# ----------------------------------------------------------------------------------- timing


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """(median, best) seconds of each function; every repeat runs all of them once, in turn."""
    for fn in fns.values():
        fn()  # warm-up (compilation, caches)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}, {k: float(np.min(v)) for k, v in times.items()}


def hop_times(makers: dict, x: np.ndarray, rounds: int) -> dict:
    """Seconds per 160-sample ``process`` call of each stream, interleaved in blocks of 50 hops."""
    streams = {k: mk() for k, mk in makers.items()}
    for s in streams.values():  # warm-up: compile and fill the state
        for i in range(0, 50 * HOP, HOP):
            s.process(x[i : i + HOP])
    times = {k: [] for k in makers}
    n_hops = len(x) // HOP
    for _ in range(rounds):
        for b0 in range(0, n_hops, 50):
            for k, s in streams.items():
                for i in range(b0, min(b0 + 50, n_hops)):
                    c = x[i * HOP : (i + 1) * HOP]
                    t0 = time.perf_counter()
                    s.process(c)
                    times[k].append(time.perf_counter() - t0)
    return {k: np.array(v) for k, v in times.items()}


def main_tables(x, repeats: int, use_onnx: bool) -> int:
    seconds = len(x) / SR
    T = stft.num_frames(len(x))
    weights = {m: load_weights(REPO / "weights" / f"{m}.safetensors") for m in MODELS}
    peers = {}
    if use_onnx:
        for m, w in weights.items():
            if nsnet2_shaped(w):
                peer, why = onnx_peer(w)
                if peer is None:
                    print(f"(onnxruntime left out: {why})\n")
                    break
                peers[m] = peer
    # parity first: timings of two engines that compute different things mean nothing
    for m, peer in peers.items():
        F = stft.log_power(stft.stft(x[: 3 * SR]))
        dense = MaskModel(weights[m], update_percent=100)
        err = float(np.max(np.abs(dense.forward(F[:, None], dense.init_state(1))[:, 0] - peer[0].run(None, {"x": F[None], "h": peer[1]})[0][0])))
        print(f"Parity {m}: max |mask npdgru P=100 - onnxruntime| = {err:.2e} over {F.shape[0]}x161 values (limit {PARITY_ATOL:g}): {'OK' if err <= PARITY_ATOL else 'FAILED'}")
        if err > PARITY_ATOL:
            return 1
    print()

    enh = {(m, P): Enhancer(weights[m], update_percent=P) for m in MODELS for P in PERCENTS}
    for P in (50, 25):  # without input accumulators (Enhancer uses them at P <= 50 on cpu)
        e = Enhancer(weights["nsnet2"], update_percent=P)
        e.model = MaskModel(weights["nsnet2"], update_percent=P, sparse_inputs=False)
        enh[("nsnet2", f"{P} dense-in")] = e
    for P in PERCENTS:  # exact=True: the column-order products, offline == streaming bit for bit
        enh[("nsnet2", f"{P} exact")] = Enhancer(weights["nsnet2"], update_percent=P, exact=True)
    fns = {k: (lambda e=e: e.enhance(x, SR)) for k, e in enh.items()}
    for m, peer in peers.items():
        fns[(m, "ort")] = lambda p=peer: peer_offline(p, x)
    t_off, t_best = interleaved(fns, repeats)

    print(f"## Offline, end to end: {seconds:g} s of audio ({T} frames), one thread, median of {repeats} interleaved runs\n")
    print("| model | P | us / frame | x own P=100 | x onnxruntime (same weights, dense) | best run: us / frame, x own P=100, x onnxruntime | MMACs / frame as run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        for P in PERCENTS + (EXTRA_ROWS if m == "nsnet2" else ()):
            t = t_off[(m, P)]
            ort = f"{t / t_off[(m, 'ort')]:.2f}" if (m, "ort") in t_off else "-"
            mac = enh[(m, P)].model.macs_per_frame()
            b = t_best[(m, P)]
            b_ort = f", {b / t_best[(m, 'ort')]:.2f}" if (m, "ort") in t_best else ""
            print(f"| {m} | {P} | {1e6 * t / T:.1f} | {t / t_off[(m, 100)]:.2f} | {ort} | {1e6 * b / T:.1f}, {b / t_best[(m, 100)]:.2f}{b_ort} | {(mac['gru_ours'] + mac['other']) / 1e6:.2f} |")
        if (m, "ort") in t_off:
            print(f"| {m}: onnxruntime | 100 | {1e6 * t_off[(m, 'ort')] / T:.1f} | | 1.00 | {1e6 * t_best[(m, 'ort')] / T:.1f} | |")
    print()

    makers = {k: e.stream for k, e in enh.items()}
    for m, peer in peers.items():
        makers[(m, "ort")] = lambda p=peer: PeerStream(p)
    t_hop = hop_times(makers, x, max(1, repeats // 3))
    med = {k: float(np.median(v)) for k, v in t_hop.items()}
    print(f"## Streaming: one `Stream.process` call per 160 samples, {len(x) // HOP} hops x {max(1, repeats // 3)}, interleaved\n")
    print("| model | P | median us / hop | p99 us / hop | x own P=100 | x onnxruntime stateful | weights read / hop: dense, as run (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        for P in PERCENTS + (EXTRA_ROWS if m == "nsnet2" else ()):
            v = t_hop[(m, P)]
            ort = f"{med[(m, P)] / med[(m, 'ort')]:.2f}" if (m, "ort") in med else "-"
            wb = enh[(m, P)].model.plan.weight_bytes()
            print(f"| {m} | {P} | {1e6 * med[(m, P)]:.0f} | {1e6 * np.percentile(v, 99):.0f} | {med[(m, P)] / med[(m, 100)]:.2f} | {ort} | {wb['dense'] / 1e6:.2f}, {wb['ours'] / 1e6:.2f} |")
        if (m, "ort") in med:
            print(f"| {m}: onnxruntime stateful | 100 | {1e6 * med[(m, 'ort')]:.0f} | {1e6 * np.percentile(t_hop[(m, 'ort')], 99):.0f} | | 1.00 | {enh[(m, 100)].model.plan.weight_bytes()['dense'] / 1e6:.2f} |")
    print()

    # ---- the targets, with the ratios above
    rows = []

    def target(what, value, limit):
        if value is None:
            rows.append((what, "-", f"<= {limit:g}", "not measured"))
        else:
            rows.append((what, f"{value:.2f}", f"<= {limit:g}", "holds" if value <= limit else "misses"))

    def r_off(m, P, ref):
        return t_off[(m, P)] / t_off[(m, ref)] if (m, ref) in t_off else None

    def r_hop(m, P, ref):
        return med[(m, P)] / med[(m, ref)] if (m, ref) in med else None

    for P, lim in ((100, 1.0), (50, 0.75), (25, 0.6)):
        target(f"NSNet2 offline P={P} / onnxruntime", r_off("nsnet2", P, "ort"), lim)
    for m in MODELS:
        lim = 0.85 if m.startswith("dprnn") else 0.75
        target(f"{m} offline P=50 / own P=100", r_off(m, 50, 100), lim)
        target(f"{m} hop P=50 / own P=100", r_hop(m, 50, 100), lim)
        for kind, t in (("offline", t_off), ("hop", med)):
            worst = max(t[(m, P)] for P in PERCENTS if P < 100) / t[(m, 100)]
            target(f"{m} {kind}: slowest of P=75/50/25 / own P=100", worst, 0.999)
    target("NSNet2 hop P=50 / onnxruntime stateful", r_hop("nsnet2", 50, "ort"), 0.5)
    target("NSNet2 hop P=25 / onnxruntime stateful", r_hop("nsnet2", 25, "ort"), 0.35)
    print("## Targets (ratios from the tables above; kernel targets: benchmarks/bench_gru.py)\n")
    print("| target | measured | limit | verdict |")
    print("|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    return 0


FIRST_COMMAND = ["enhance", "examples/noisy_dishes_5db.flac", "--update-percent", "50", "--overwrite"]  # README's first command
FIRST_CALL_LIMIT_S = 8.0


def bench_first_call() -> None:
    """README's first command in a fresh process: with an empty Numba cache (first use: compiling
    the kernels it needs), then again on that cache (warm), for the default and the exact mode."""
    print("## First call: README's first command (`npdgru enhance examples/noisy_dishes_5db.flac --update-percent 50`), wall seconds of a fresh process\n")
    print("| mode | cold cache (compile) | warm cache | target cold | verdict |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="npdgru-bench-") as tmp:
        for mode, extra in (("default", []), ("exact", ["--exact"])):
            env = dict(os.environ, NUMBA_CACHE_DIR=str(Path(tmp) / f"cache-{mode}"))
            cmd = [sys.executable, "-m", "npdgru.cli"] + FIRST_COMMAND + ["-o", str(Path(tmp) / "out.wav"), "-q"] + extra
            t = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
                t.append(time.perf_counter() - t0)
                if r.returncode:
                    print(f"| {mode} | failed: {r.stderr.strip()[-300:]} |")
                    break
            else:
                ok = "holds" if t[0] <= FIRST_CALL_LIMIT_S else "misses"
                print(f"| {mode} | {t[0]:.1f} s | {t[1]:.1f} s | <= {FIRST_CALL_LIMIT_S:g} s | {ok} ({t[0] / FIRST_CALL_LIMIT_S:.2f}x) |")
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
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the test signal (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per row, after one warm-up (default 5)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out the CLI peak-memory table")
    ap.add_argument("--skip-onnx", action="store_true", help="leave out onnxruntime")
    ap.add_argument("--skip-first-call", action="store_true", help="leave out the first-call (compile) table")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    t_start = time.perf_counter()
    print(f"Machine: {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}")
    print(f"Versions: {versions()}")
    print("Threads: NUMBA/OMP/OPENBLAS/MKL_NUM_THREADS=1, onnxruntime intra_op=inter_op=1\n")

    x = test_signal(args.seconds)
    if main_tables(x, args.repeats, not args.skip_onnx):
        print(f"error: npdgru at P=100 differs from onnxruntime by more than {PARITY_ATOL:g}; no timings reported", file=sys.stderr)
        return 1
    if not args.skip_first_call:
        bench_first_call()
    if not args.skip_memory:
        bench_memory(x)
    print(f"(benchmark ran in {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
