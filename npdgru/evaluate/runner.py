"""``npdgru eval``: every model at every update percentage on a folder of clean/noisy pairs.

    DATA/clean/NAME, DATA/noisy/NAME      pairs matched by file name (16 kHz mono, same length)
    DATA/manifest.csv (optional)          id (= NAME without suffix), snr_db, ...

Rows (one "system" each):

* ``clean``: DNSMOS of the clean references (the intrusive metrics are trivial there and left
  empty): the ceiling of DNSMOS on this speech, which is read, phone-quality speech;
* ``noisy``: the unprocessed mixture;
* ``NSNet2 ONNX (onnxruntime)``: the original NSNet2 model run by onnxruntime on our features
  (``stft.log_power`` of ``stft.stft``), mask clipped to the same -80 dB floor as
  :class:`npdgru.enhance.Enhancer`, ``stft.istft``; left out with a note when the ONNX file is
  absent;
* ``<weights stem> P=<P>``: :class:`npdgru.enhance.Enhancer` for every weight file and P.

For every file and row: PESQ (wb), ESTOI, SI-SNR, DNSMOS SIG/BAK/OVRL and P.808
(``metrics.py``). For every row: GRU neurons updated per frame, MACs per frame (dense, the
paper's count, ours with accumulators, and the rest of the model) and the measured model time per
frame on this CPU (one thread, best of ``repeats`` runs over ``timing_frames`` frames of real
features, measured in this process before any worker starts).

Files are evaluated in this process (``jobs=1``) or one task per pair on ``npdgru.corpus``
(a local Dask cluster of ``jobs`` worker processes, or the cluster at ``scheduler``): each
worker process builds its own onnxruntime sessions and Numba models once; the rows, in the
order of the pairs, do not depend on where they ran.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import AudioError, ParameterError
from .metrics import INTRUSIVE, METRICS, SAMPLE_RATE  # noqa: F401 (INTRUSIVE, METRICS: importable here as before)

DEFAULT_PERCENTS = (100.0, 75.0, 50.0, 25.0, 10.0)
ONNX_NAME = "nsnet2-20ms-baseline.onnx"

__all__ = ["Pair", "System", "find_pairs", "default_onnx_path", "default_weight_files", "evaluate", "DEFAULT_PERCENTS", "METRICS"]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One clean/noisy pair of the test folder."""

    name: str  # file name, the same in clean/ and noisy/
    clean: str
    noisy: str
    samples: int
    snr_db: float | None  # from manifest.csv; None: measured from the audio by the worker


def _audio_info(path: Path):
    import soundfile as sf

    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); soundfile reads WAV, FLAC, OGG, AIFF") from None


def _read_manifest(path: Path) -> dict[str, float]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "id" not in cols or "snr_db" not in cols:
                raise ParameterError(f"{path}: needs the columns id and snr_db, has {', '.join(cols) or 'none'}")
            out = {}
            for k, row in enumerate(reader, start=2):
                try:
                    out[row["id"]] = float(row["snr_db"])
                except (TypeError, ValueError):
                    raise ParameterError(f"{path}, line {k}: snr_db={row.get('snr_db')!r} is not a number") from None
            return out
    except OSError as e:
        raise ParameterError(f"{path}: cannot read ({e.strerror or e})") from None


def find_pairs(data_dir, *, limit: int | None = None) -> list[Pair]:
    """The clean/noisy pairs of ``data_dir``, sorted by name, the first ``limit`` of them.

    Every pair is checked from the file headers before anything runs: both files exist, are
    16 kHz mono and have the same number of samples. Errors name the folder or the file.
    """
    from ..enhance import AUDIO_SUFFIXES

    root = Path(data_dir)
    if not root.is_dir():
        raise ParameterError(f"{root}: no such folder (expected a folder with clean/ and noisy/ inside)")
    for sub in ("clean", "noisy"):
        if not (root / sub).is_dir():
            raise ParameterError(f"{root}: has no {sub}/ folder (expected clean/ and noisy/ with files of the same names)")

    def listing(sub):
        return {p.name: p for p in (root / sub).iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES}

    clean, noisy = listing("clean"), listing("noisy")
    if not noisy:
        raise AudioError(f"{root / 'noisy'}: folder holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    no_clean = sorted(set(noisy) - set(clean))
    no_noisy = sorted(set(clean) - set(noisy))
    if no_clean:
        more = f" (and {len(no_clean) - 1} more)" if len(no_clean) > 1 else ""
        raise AudioError(f"{root / 'noisy' / no_clean[0]}: no clean file of the same name in {root / 'clean'}{more}")
    if no_noisy:
        more = f" (and {len(no_noisy) - 1} more)" if len(no_noisy) > 1 else ""
        raise AudioError(f"{root / 'clean' / no_noisy[0]}: no noisy file of the same name in {root / 'noisy'}{more}")
    names = sorted(noisy)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ParameterError(f"limit={limit!r} must be a positive integer")
        names = names[:limit]

    manifest_path = root / "manifest.csv"
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else None
    pairs = []
    for name in names:
        lengths = []
        for path in (clean[name], noisy[name]):
            info = _audio_info(path)
            if info.samplerate != SAMPLE_RATE:
                raise AudioError(f"{path}: sample rate {info.samplerate} Hz; the evaluation needs {SAMPLE_RATE} Hz files")
            if info.channels != 1:
                raise AudioError(f"{path}: {info.channels} channels; the evaluation needs mono files")
            if info.frames == 0:
                raise AudioError(f"{path}: the file holds no samples")
            lengths.append(info.frames)
        if lengths[0] != lengths[1]:
            raise AudioError(f"{noisy[name]}: {lengths[1]} samples, its clean file {clean[name]} has {lengths[0]}; a pair must have the same length")
        snr = None
        if manifest is not None:
            stem = Path(name).stem
            if stem not in manifest:
                raise ParameterError(f"{manifest_path}: no row with id {stem!r} (for {noisy[name]})")
            snr = manifest[stem]
        pairs.append(Pair(name=name, clean=str(clean[name]), noisy=str(noisy[name]), samples=lengths[0], snr_db=snr))
    return pairs


def _read_mono(path: str, samples: int) -> np.ndarray:
    from ..enhance import read_audio

    x, sr = read_audio(path)
    if sr != SAMPLE_RATE or x.shape[1] != 1 or x.shape[0] != samples:  # changed since find_pairs
        raise AudioError(f"{path}: file changed during the evaluation (now {sr} Hz, {x.shape[1]} ch, {x.shape[0]} samples)")
    return np.ascontiguousarray(x[:, 0])


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    """10 log10(|clean|^2 / |noisy - clean|^2), float64 (the mixture's input SNR)."""
    c = clean.astype(np.float64)
    n = noisy.astype(np.float64) - c
    pc, pn = float(c @ c), float(n @ n)
    if pn == 0.0:
        return math.inf
    if pc == 0.0:
        return -math.inf
    return 10.0 * math.log10(pc / pn)


# --------------------------------------------------------------------------------------------
# systems (rows)
# --------------------------------------------------------------------------------------------


@dataclass
class System:
    """One row of the table: how an estimate is made and what it costs."""

    name: str  # "clean", "noisy", "NSNet2 ONNX (onnxruntime)", "nsnet2 P=50"
    engine: str  # "reference" | "onnxruntime" | "npdgru"
    model: str  # "clean" | "noisy" | "nsnet2-onnx" | weights stem
    percent: float | None = None
    path: str | None = None  # weights or ONNX file
    trained_percent: float | None = None
    fraction_updated: float | None = None  # GRU neurons updated per frame / H (exactly A/H; measured mean for a variable gate)
    macs: dict = field(default_factory=dict)  # gru_dense, gru_paper, gru_ours, other
    us_per_frame: float | None = None  # best of the timed runs
    us_per_frame_median: float | None = None
    gate: str = "top-a"  # "top-a", or the variable gates of the model with their thresholds ("threshold 0.2")
    fraction_updated_p99: float | None = None  # a variable gate's 99th percentile over frames (measured)


def default_onnx_path() -> Path:
    """NSNet2 ONNX: $NPDGRU_NSNET2_ONNX, else .cache/nsnet2/ in the current folder, else in the
    repository of this checkout (where ``tools/fetch_nsnet2.sh`` puts it)."""
    env = os.environ.get("NPDGRU_NSNET2_ONNX")
    if env:
        return Path(env)
    here = Path(".cache") / "nsnet2" / ONNX_NAME
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / ".cache" / "nsnet2" / ONNX_NAME


def default_weight_files() -> list[Path]:
    """Every ``*.safetensors`` next to the shipped default weights (``weights/``), sorted."""
    from ..weights import default_weights_path

    folder = default_weights_path().parent
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ParameterError(f"{folder}: no *.safetensors weight files; pass --weights FILE")
    return files


def _ort_session(path: str, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise ParameterError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _macs_as_run(model, measured: dict | None = None) -> dict:
    """MACs per frame of ``model`` as it runs (``MaskModel.macs_per_frame``), plus what "ours"
    would be with input accumulators on every D-GRU layer fed by a D-GRU layer
    (``sparse_inputs=True``), kept as ``gru_ours_input_accumulators``. ``measured``: the
    variable gates' measured work (``MaskModel.work_per_frame``).
    """
    from ..model import work_means
    from ..plan import make_plan

    out = dict(model.macs_per_frame(measured))
    sparse = make_plan(model.architecture, update_percent=model.update_percent, sparse_inputs=True)
    out["gru_ours_input_accumulators"] = sparse.macs(work_means(measured))["gru_ours"]
    return out


def _dense_macs(architecture: dict) -> dict:
    """MACs per frame of an architecture run densely (onnxruntime's NSNet2)."""
    from ..plan import make_plan

    m = make_plan(architecture, update_percent=100.0).macs()
    gru = m["gru_dense"]
    return {"gru_dense": gru, "gru_paper": gru, "gru_ours": gru, "other": m["other"], "gru_ours_input_accumulators": gru}


def _weights_entry(entry, percents) -> tuple[str, list[float]]:
    """``FILE`` (evaluated at every P of ``percents``) or ``FILE@P[,P...]`` (only at those P)."""
    path, sep, tail = str(entry).rpartition("@")
    if sep:
        try:
            return path, [float(p) for p in tail.split(",") if p]
        except ValueError:
            pass
    return str(entry), list(percents)


def _build_systems(weight_files, percents, onnx_path, reference: bool = True) -> list[System]:
    from ..architectures import NSNET2_ARCHITECTURE
    from ..kinds import gate_label
    from ..model import MaskModel
    from ..weights import load_weights

    systems = [System("clean", "reference", "clean"), System("noisy", "reference", "noisy")] if reference else []
    if onnx_path is not None and reference:
        systems.append(System("NSNet2 ONNX (onnxruntime)", "onnxruntime", "nsnet2-onnx", 100.0, str(onnx_path), 100.0, 1.0, _dense_macs(NSNET2_ARCHITECTURE)))
    entries = [_weights_entry(w, percents) for w in weight_files]
    stems = [Path(w).stem for w, _ in entries]
    for w, own_percents in entries:
        weights = load_weights(w)
        stem = Path(w).stem if stems.count(Path(w).stem) == 1 else str(w)
        for P in own_percents:
            m = MaskModel(weights, update_percent=P, backend="cpu")  # validates P
            gate = gate_label(m.architecture["layers"]) or "top-a"
            if gate != "top-a":  # P is not read: one row, its work measured by measure_work()
                systems.append(System(f"{stem} {gate}", "npdgru", stem, 100.0, str(w), weights.trained_update_percent, None, _macs_as_run(m), gate=gate))
                break
            systems.append(System(f"{stem} P={P:g}", "npdgru", stem, float(P), str(w), weights.trained_update_percent, m.fraction_updated(), _macs_as_run(m)))
    return systems


def measure_work(systems: list[System], features: np.ndarray) -> None:
    """For the rows with a threshold or delta gate: the share of GRU neurons updated per frame
    (mean and 99th percentile over the frames of ``features``, weighted by H·bands as
    ``Plan.fraction_updated``) and the MACs per frame at the measured mean work
    (``MaskModel.work_per_frame``, on the cpu backend); top-A rows keep their exact counts."""
    from ..model import MaskModel
    from ..weights import load_weights

    for s in systems:
        if s.engine != "npdgru" or s.gate == "top-a":
            continue
        m = MaskModel(load_weights(s.path), update_percent=s.percent, backend="cpu")
        work = m.work_per_frame(features)
        share = m.updated_share(work)
        s.fraction_updated, s.fraction_updated_p99 = float(share.mean()), float(np.percentile(share, 99))
        s.macs = _macs_as_run(m, work)


def _timing_features(pairs: list[Pair], frames: int) -> np.ndarray:
    """(T, 1, 161) log-power features of the first noisy files, concatenated to ``frames``."""
    from .. import stft

    parts, n = [], 0
    for p in pairs * (1 + frames * stft.HOP // max(1, sum(q.samples for q in pairs))):
        parts.append(_read_mono(p.noisy, p.samples))
        n += p.samples
        if n >= frames * stft.HOP:
            break
    x = np.concatenate(parts)
    F = stft.log_power(stft.stft(x))[:frames]
    return np.ascontiguousarray(F[:, None, :])


def time_systems(systems: list[System], features: np.ndarray, *, repeats: int = 7) -> None:
    """Fill ``us_per_frame`` (best run) and ``us_per_frame_median``: the model alone, features
    to mask, one thread.

    npdgru: ``MaskModel.forward`` over all frames in one call (the offline path; the Numba
    kernels are single-threaded). onnxruntime: ``InferenceSession.run`` on (1, T, 161) with
    ``intra_op_num_threads=1``. After one warm-up call each, the systems are timed in
    ``repeats`` interleaved rounds (one run of every system per round), so that a burst of load
    from other processes on a shared machine hits every row alike rather than a few rows
    entirely; the best run is the estimate of the unloaded cost, the median shows the spread.
    """
    from ..model import MaskModel
    from ..weights import load_weights

    T = features.shape[0]
    loaded, runs = {}, []
    for s in systems:
        if s.engine == "npdgru":
            w = loaded.setdefault(s.path, load_weights(s.path))
            model = MaskModel(w, update_percent=s.percent, backend="cpu")
            fn = lambda model=model: model.forward(features, model.init_state(1))  # noqa: E731
        elif s.engine == "onnxruntime":
            sess = _ort_session(s.path, 1)
            feed = {sess.get_inputs()[0].name: np.ascontiguousarray(features[:, 0][None])}
            fn = lambda sess=sess, feed=feed: sess.run(None, feed)  # noqa: E731
        else:
            continue
        fn()  # warm-up: compilation, caches
        runs.append((s, fn, []))
    for _ in range(repeats):
        for s, fn, times in runs:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    for s, fn, times in runs:
        s.us_per_frame = 1e6 * min(times) / T
        s.us_per_frame_median = 1e6 * float(np.median(times)) / T


# --------------------------------------------------------------------------------------------
# per-file work (runs in the worker processes)
# --------------------------------------------------------------------------------------------

_WORKER: dict = {}
_WORKER_LOCK = threading.Lock()


def _init_worker(systems: list[System], dnsmos_threads: int) -> None:
    """Build everything once per process: DNSMOS sessions, the NSNet2 session, the enhancers."""
    from ..enhance import Enhancer
    from ..weights import load_weights
    from .metrics import Dnsmos

    _WORKER.clear()
    _WORKER["dnsmos"] = Dnsmos(intra_op_threads=dnsmos_threads)
    _WORKER["systems"] = systems
    loaded, engines = {}, {}
    for s in systems:
        if s.engine == "npdgru":
            w = loaded.setdefault(s.path, load_weights(s.path))
            engines[s.name] = Enhancer(w, update_percent=s.percent, backend="cpu")
        elif s.engine == "onnxruntime":
            engines[s.name] = _ort_session(s.path, 1)
    _WORKER["engines"] = engines


def _evaluate_pair_on_worker(systems: list[System], pair: Pair) -> list[dict]:
    """``_evaluate_pair`` in a Dask worker: the worker is set up once per process (and again
    only for other systems)."""
    with _WORKER_LOCK:  # a worker with several threads: one pair at a time per process
        if _WORKER.get("systems") != systems:
            _init_worker(systems, 1)
        return _evaluate_pair(pair)


def _enhance_onnx(sess, x: np.ndarray) -> np.ndarray:
    """NSNet2 through onnxruntime, framed exactly as npdgru.enhance.Enhancer does."""
    from .. import stft
    from ..enhance import DEFAULT_MASK_FLOOR_DB

    X = stft.stft(x)
    feats = stft.log_power(X)[None]  # (1, T, 161)
    mask = sess.run(None, {sess.get_inputs()[0].name: feats})[0][0]
    np.clip(mask, np.float32(10.0 ** (DEFAULT_MASK_FLOOR_DB / 20.0)), np.float32(1.0), out=mask)
    return stft.istft(X * mask, len(x))


def _evaluate_pair(pair: Pair) -> list[dict]:
    """Every system on one pair: one dict per row, in the order of the systems.

    BLAS runs on one thread here, in every process: a threaded BLAS dot product splits its sum
    by the thread count, so the last bits of SI-SNR and ESTOI would depend on where the pair ran
    (Dask's workers set OPENBLAS_NUM_THREADS=1); the rows are the same bits everywhere.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of the eval extra
        return _evaluate_pair_rows(pair)
    with threadpool_limits(1, user_api="blas"):
        return _evaluate_pair_rows(pair)


def _evaluate_pair_rows(pair: Pair) -> list[dict]:
    from .metrics import estoi, pesq_wb, si_snr

    clean = _read_mono(pair.clean, pair.samples)
    noisy = _read_mono(pair.noisy, pair.samples)
    snr_measured = measured_snr_db(clean, noisy)
    snr = pair.snr_db if pair.snr_db is not None else snr_measured
    dnsmos = _WORKER["dnsmos"]
    rows = []
    for s in _WORKER["systems"]:
        if s.engine == "reference":
            est = clean if s.model == "clean" else noisy
        elif s.engine == "onnxruntime":
            est = _enhance_onnx(_WORKER["engines"][s.name], noisy)
        else:
            est = _WORKER["engines"][s.name].enhance(noisy, SAMPLE_RATE)
        row = {"file": pair.name, "snr_db": snr, "snr_measured_db": round(snr_measured, 3), "row": s.name, "engine": s.engine, "model": s.model, "P": s.percent}
        try:
            if s.model == "clean":
                row.update(pesq=None, estoi=None, si_snr=None)
            else:
                row.update(pesq=pesq_wb(clean, est), estoi=estoi(clean, est), si_snr=si_snr(clean, est))
            peak = float(np.max(np.abs(est)))
            # DNSMOS takes samples in [-1, 1]: a (rare) enhanced overshoot is clipped, as writing
            # the estimate to a PCM file would.
            d = dnsmos(np.clip(est, -1.0, 1.0) if peak > 1.0 else est)
        except AudioError as e:
            raise AudioError(f"{pair.noisy} ({s.name}): {e}") from None
        row.update(d, clipped=peak > 1.0)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# the whole evaluation
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (for the record of a measurement)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("npdgru", "numpy", "numba", "scipy", "onnxruntime", "pesq", "pystoi", "speechmos", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def evaluate(data_dir, out_dir, *, weights=None, percents=DEFAULT_PERCENTS, onnx=None, jobs: int = 1, limit: int | None = None, timing_frames: int = 1000, timing_repeats: int = 7, progress: bool = True, command: str | None = None, log=print, scheduler: str | None = None, reference: bool = True) -> dict:
    """Run the evaluation and write ``per_file.csv``, ``summary.md``, ``summary.json`` and
    ``quality_vs_compute.png`` into ``out_dir``. Returns the summary (as in summary.json).

    Parameters
    ----------
    data_dir : folder with clean/ and noisy/ (and optionally manifest.csv)
    weights : weight files (default: every weights/*.safetensors)
    percents : update percentages P in (0, 100]
    onnx : NSNet2 ONNX file; None looks in the default places and leaves the row out (with a note)
        when absent; a path that is given must exist.
    jobs : worker processes over files (1: in this process; more: a local Dask cluster of
        ``jobs`` single-threaded workers, the distributed extra)
    scheduler : address of a running Dask cluster to evaluate the files on (instead of ``jobs``)
    limit : only the first ``limit`` pairs, sorted by name
    reference : False leaves out the clean, noisy and onnxruntime rows (only the weight files'
        rows; for runs merged by ``tools/merge_eval.py``, which takes those rows from its first run)
    log : where notes go (a print-like function)
    """
    from . import report

    t_start = time.perf_counter()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ParameterError(f"jobs={jobs!r} must be an integer >= 1")
    if scheduler and jobs != 1:
        raise ParameterError("--jobs and --scheduler exclude each other: --jobs N starts N local workers, --scheduler attaches to a running cluster")
    if scheduler or jobs > 1:
        from ..corpus import need_dask

        need_dask()
    percents = list(dict.fromkeys(float(p) for p in percents))
    if not percents:
        raise ParameterError("no update percentages given")
    weight_files = [Path(w) for w in weights] if weights else default_weight_files()
    for w in weight_files:
        if not Path(_weights_entry(w, percents)[0]).is_file():
            raise ParameterError(f"{w}: no such weight file")
    if onnx is not None:
        onnx_path = Path(onnx)
        if not onnx_path.is_file():
            raise ParameterError(f"{onnx_path}: no such ONNX file (tools/fetch_nsnet2.sh fetches NSNet2)")
    elif not reference:
        onnx_path = None
    else:
        onnx_path = default_onnx_path()
        if not onnx_path.is_file():
            log(f"note: {onnx_path} not found: the NSNet2 onnxruntime row is left out (run tools/fetch_nsnet2.sh or pass --onnx PATH)")
            onnx_path = None

    pairs = find_pairs(data_dir, limit=limit)
    systems = _build_systems(weight_files, percents, onnx_path, reference)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParameterError(f"{out}: cannot create the output folder ({e.strerror or e})") from None

    log(f"evaluating {len(pairs)} pairs of {data_dir} x {len(systems)} rows ({', '.join(s.name for s in systems)}), " + (f"on the Dask cluster at {scheduler}" if scheduler else f"{jobs} job(s)"))
    t0 = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    features = _timing_features(pairs, timing_frames)
    time_systems(systems, features, repeats=timing_repeats)
    measure_work(systems, features)
    t_timing = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = []
    from tqdm import tqdm

    bar = tqdm(total=len(pairs), unit="file", disable=not progress, file=sys.stderr, mininterval=2.0 if sys.stderr.isatty() else 30.0, desc="npdgru eval")
    if jobs == 1 and not scheduler:
        _init_worker(systems, 1)
        try:
            for p in pairs:
                rows += _evaluate_pair(p)
                bar.update(1)
        finally:
            _WORKER.clear()
    else:
        from functools import partial

        from ..corpus import map_ordered

        # Absolute paths: a worker on another node runs in its own folder (shared storage).
        remote_systems = [replace(s, path=os.path.abspath(s.path) if s.path else None) for s in systems]
        remote_pairs = [replace(p, clean=os.path.abspath(p.clean), noisy=os.path.abspath(p.noisy)) for p in pairs]
        per_pair = map_ordered(partial(_evaluate_pair_on_worker, remote_systems), remote_pairs, jobs=None if scheduler else min(jobs, len(pairs)), scheduler=scheduler, on_done=lambda: bar.update(1))
        for r in per_pair:
            rows += r
    bar.close()
    t_files = time.perf_counter() - t0

    meta = {
        "command": command,
        "data": str(Path(data_dir)),
        "pairs": len(pairs),
        "snr_source": "manifest.csv" if pairs and pairs[0].snr_db is not None else "measured from clean and noisy - clean",
        "weights": [str(w) for w in weight_files],
        "percents": percents,
        "onnx": str(onnx_path) if onnx_path else None,
        "jobs": jobs,
        "scheduler": scheduler,
        "machine": f"{cpu_model()} ({os.cpu_count()} logical CPUs), {platform.system()} {platform.release()}",
        "versions": _versions(),
        "timing": f"model only (features -> mask), {features.shape[0]} frames of real features in one call, one thread, best of {timing_repeats} interleaved rounds after a warm-up",
        "load_average_at_timing": load,
        "seconds": {"timing": round(t_timing, 1), "files": round(t_files, 1), "total": round(time.perf_counter() - t_start, 1)},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    summary = report.summarize(rows, [asdict(s) for s in systems], meta)
    report.write_all(out, rows, summary)
    return summary
