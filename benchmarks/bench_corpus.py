"""Benchmark: a corpus of files through ``npdgru enhance``: the in-process loop, 1 and 2 Dask workers.

    python benchmarks/bench_corpus.py [--files 200] [--seconds 10] [--repeats 3] [-P 100] [--workers 1 2]

Generates ``--files`` files of ``--seconds`` s (16 kHz mono PCM_16: the example recording
``examples/noisy_dishes_5db.flac`` rolled by a different offset per file and tiled to length)
in a temporary folder, then enhances the corpus (``npdgru.corpus.run_items``, the code
behind ``npdgru enhance DIR -o OUT [--jobs N]``) with

* ``serial``: the in-process loop (no ``--jobs``, no ``--scheduler``);
* ``N worker(s)``: a LocalCluster of N single-threaded worker processes (``--jobs N``).

Every worker count gets its own cluster, started once and warmed up (every worker has loaded
the weights and its Numba kernels) on a separate small corpus before timing: the table is the
steady state, and the cluster start is a column of its own (paid once per run). The rows are
interleaved: each of ``--repeats`` rounds runs serial, 1 worker, 2 workers, ... once, each into a
fresh output folder, so that load from other processes on a shared machine hits every row alike;
the table shows medians. Outputs of every row are checked to be byte-identical to the serial
loop's before anything is printed.

Columns: files/s, audio hours per hour (= 1 / real-time factor of the whole run), speed-up
against 1 worker and against serial, the per-file overhead against the serial loop
((t - t_serial) / files), and the CPU seconds of all processes (this one, which holds the
LocalCluster's scheduler, plus every worker): on a machine shared with other work the wall
times measure the CPU left over, while the CPU seconds show what the cluster itself costs.
"""

from __future__ import annotations

import os

# One thread per process (the workers inherit this): the scaling is over processes only.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from npdgru import corpus as dist  # noqa: E402
from npdgru.evaluate.runner import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "nsnet2.safetensors"
SR = 16000


def make_corpus(root: Path, files: int, seconds: float) -> None:
    x, sr = sf.read(str(REPO / "examples" / "noisy_dishes_5db.flac"), dtype="float32")
    assert sr == SR
    n = int(seconds * SR)
    tiled = np.tile(x, 1 + n // len(x))
    for k in range(files):
        p = root / f"d{k % 10}" / f"f{k:05d}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, np.roll(tiled, 7919 * k)[:n], SR, subtype="PCM_16")


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.wav"))}


def cpu_seconds(client) -> float:
    """CPU time of this process (driver, and the scheduler of a LocalCluster) and of every worker."""
    workers = sum(client.run(time.process_time).values()) if client is not None else 0.0
    return time.process_time() + workers


def run_once(corpus: Path, out: Path, config, scheduler=None, client=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) to enhance the corpus into a fresh ``out``."""
    if out.exists():
        shutil.rmtree(out)
    c0 = cpu_seconds(client)
    t0 = time.perf_counter()
    items, _, journal = dist.plan_work([corpus], out, config=config)
    results = dist.run_items(items, config, journal=journal, scheduler=scheduler)
    dt = time.perf_counter() - t0
    cpu = cpu_seconds(client) - c0
    bad = [r.error for r in results if r.status != "done"]
    if bad:
        raise SystemExit(f"failed: {bad[:3]}")
    return dt, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-P", "--update-percent", type=float, default=100.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args()

    import dask
    from distributed import Client, LocalCluster

    config = dist.Config(weights=args.weights, update_percent=args.update_percent, model=dist.model_id(args.weights))
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    clusters = []
    try:
        corpus, warm = tmp / "corpus", tmp / "warm"
        make_corpus(corpus, args.files, args.seconds)
        make_corpus(warm, 4 * max(args.workers), 1.0)
        hours = args.files * args.seconds / 3600
        rows = {"serial": (None, 0.0, None)}
        dist._enhancer(config)  # the in-process loop's Enhancer, loaded and compiled once
        run_once(warm, tmp / "warm-out", config)
        for n in args.workers:
            t0 = time.perf_counter()
            with dask.config.set(dist.CLUSTER_CONFIG | {"distributed.scheduler.allowed-failures": dist.ALLOWED_FAILURES}):
                lc = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
            client = Client(lc)
            client.wait_for_workers(n)
            start = time.perf_counter() - t0
            clusters.append((client, lc))
            run_once(warm, tmp / "warm-out", config, lc.scheduler_address)  # every worker: weights, kernels
            rows[f"{n} worker{'s' if n > 1 else ''}"] = (lc.scheduler_address, start, client)
        times = {name: [] for name in rows}
        cpus = {name: [] for name in rows}
        reference = None
        for r in range(args.repeats):
            for name, (address, _, client) in rows.items():
                out = tmp / f"out-{name.replace(' ', '')}"
                dt, cpu = run_once(corpus, out, config, address, client)
                times[name].append(dt)
                cpus[name].append(cpu)
                got = tree_bytes(out)
                if reference is None:
                    reference = got
                elif got != reference:
                    raise SystemExit(f"{name}: outputs differ from the serial loop's")
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f} s" for n, t in times.items()), flush=True)
        med = {n: statistics.median(t) for n, t in times.items()}
        med_cpu = {n: statistics.median(t) for n, t in cpus.items()}
        one = next((n for n in med if n.startswith("1 worker")), None)
        print()
        print(f"{args.files} files x {args.seconds:g} s ({hours:.2f} h of audio), nsnet2 P={args.update_percent:g}, cpu backend, one thread per process; "
              f"median of {args.repeats} interleaved rounds; {cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}")
        print()
        print("| run | cluster start (s) | time (s) | files/s | audio h per h | vs 1 worker | vs serial | per-file overhead vs serial, wall (ms) | CPU s, all processes | per-file overhead vs serial, CPU (ms) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, t in med.items():
            start = rows[name][1]
            vs1 = f"{med[one] / t:.2f}x" if one else ""
            over = f"{1e3 * (t - med['serial']) / args.files:+.1f}" if name != "serial" else ""
            over_cpu = f"{1e3 * (med_cpu[name] - med_cpu['serial']) / args.files:+.1f}" if name != "serial" else ""
            print(f"| {name} | {start:.1f} | {t:.1f} | {args.files / t:.2f} | {hours / (t / 3600):.0f} | {vs1} | {med['serial'] / t:.2f}x | {over} | {med_cpu[name]:.1f} | {over_cpu} |")
        print()
        print("all rows: outputs byte-identical to the serial loop's")
    finally:
        for client, lc in clusters:
            client.close()
            lc.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
