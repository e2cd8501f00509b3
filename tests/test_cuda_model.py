"""The cuda backend through the model and the enhancer (MaskModel, Enhancer, Stream, enhance_batch,
StreamBatch), on a CUDA GPU or numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

The model is a tiny random one of the NSNet2 topology (161 -> FC 16 -> GRU 12 -> GRU 12 -> FC 161)
so that the simulator runs it in seconds. Tolerances against the cpu backend: masks within 1e-5
(P = 100) and 1e-4 (P < 100), as tests/test_model.py allows cpu vs reference; enhanced audio
within 1e-5 (measured: <= 6e-8 on these clips, peak amplitude ~0.4). Within the cuda backend
equalities are bit for bit: streaming == offline, a stream in a batch == the stream alone.

The tests without the ``needs_cuda`` mark run everywhere: importing npdgru does not import
numba.cuda, and backend "cuda" without a GPU (or without numba.cuda) is a ParameterError that
says what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npdgru import architectures, stft
from npdgru.errors import ParameterError
from npdgru.model import MaskModel, get_backend

from cuda_available import CUDA_OK, REASON, SIM  # noqa: E402
from test_stream_batch import noise_speechlike  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOP = 160
MASK_ATOL_DENSE, MASK_ATOL_SPARSE, AUDIO_ATOL = 1e-5, 1e-4, 1e-5
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason=REASON)


def tiny_weights(seed=0, H=12):
    """A random NSNet2-shaped model small enough for the simulator (npdgru.architectures.tiny_weights)."""
    return architectures.tiny_weights(seed, hidden=H)


@pytest.fixture(scope="module")
def weights():
    return tiny_weights()


@pytest.fixture(scope="module")
def K():
    """The cuda backend with small launches (multi-block paths, few simulator threads)."""
    if not CUDA_OK:
        pytest.skip("no CUDA GPU and no simulator")
    mod = get_backend("cuda")
    saved = mod.config.THREADS_PER_BLOCK, mod.config.GEMM_TILE, mod.config.GEMM_REG
    interval = sys.getswitchinterval()
    mod.config.THREADS_PER_BLOCK, mod.config.GEMM_TILE, mod.config.GEMM_REG = 8, 4, 2
    sys.setswitchinterval(1e-4)
    yield mod
    mod.config.THREADS_PER_BLOCK, mod.config.GEMM_TILE, mod.config.GEMM_REG = saved
    sys.setswitchinterval(interval)


def _env(**changes):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(changes)
    return env


# ------------------------------------------------------------------- runs everywhere


def test_importing_npdgru_does_not_import_numba_cuda():
    code = (
        "import sys, npdgru, npdgru.model, npdgru.enhance, npdgru.kernels.cpu, npdgru.cli\n"
        "bad = [m for m in sys.modules if m == 'numba.cuda' or m.startswith('numba.cuda.') or m.startswith('numba_cuda.numba.cuda')]\n"
        "print('LOADED', bad)\n"
        "assert not bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cuda_without_gpu_or_simulator_says_how_to_install():
    code = (
        "from npdgru.errors import ParameterError\n"
        "from npdgru.model import get_backend\n"
        "try:\n"
        "    get_backend('cuda')\n"
        "    print('AVAILABLE')\n"
        "except ParameterError as e:\n"
        "    print('ERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    if "AVAILABLE" in r.stdout:
        pytest.skip("a CUDA GPU is present")
    assert "ERROR backend 'cuda'" in r.stdout and 'pip install -e ".[cuda]"' in r.stdout and "NUMBA_ENABLE_CUDASIM=1" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr


def test_cuda_when_numba_cuda_cannot_be_imported(monkeypatch, weights):
    monkeypatch.setitem(sys.modules, "npdgru.kernels.cuda", None)  # import fails as without numba.cuda
    with pytest.raises(ParameterError, match=r"pip install -e \"\.\[cuda\]\""):
        get_backend("cuda")
    from npdgru.enhance import Enhancer

    with pytest.raises(ParameterError, match="backend 'cuda'"):
        Enhancer(weights, backend="cuda")


# ------------------------------------------------------------------------ MaskModel


@needs_cuda
@pytest.mark.parametrize("P, atol", [(100, MASK_ATOL_DENSE), (50, MASK_ATOL_SPARSE)])
def test_mask_model_matches_cpu_and_reference(K, weights, P, atol):
    rng = np.random.default_rng(1)
    F = (rng.standard_normal((6, 3, 161)) * 2.0 - 4.0).astype(np.float32)
    masks = {}
    for backend in ("cuda", "cpu", "reference"):
        m = MaskModel(weights, update_percent=P, backend=backend)
        masks[backend] = m.forward(F, m.init_state(3))
    got = masks["cuda"]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (6, 3, 161)
    assert got.std() > 0.01
    for other in ("cpu", "reference"):
        err = float(np.abs(got - masks[other]).max())
        assert err <= atol, f"P={P}: max |cuda - {other}| = {err:.3g} > {atol}"


@needs_cuda
def test_state_stays_on_the_device_across_calls(K, weights):
    """Chunked calls == one call, bit for bit; the state is device arrays; device in -> device out."""
    rng = np.random.default_rng(2)
    F = (rng.standard_normal((7, 2, 161)) * 2.0 - 4.0).astype(np.float32)
    m = MaskModel(weights, update_percent=50, backend="cuda")
    whole = m.forward(F, m.init_state(2))
    s = m.init_state(2)
    assert all(K.is_device_array(st.h) and K.is_device_array(st.m) for st in s.layers)
    parts, t = [], 0
    for k in (1, 2, 0, 4):
        parts.append(m.forward(F[t : t + k], s))
        t += k
    assert np.array_equal(np.concatenate(parts), whole)
    assert parts[2].shape == (0, 2, 161)
    d = m.forward(K.to_device(F), m.init_state(2))
    assert K.is_device_array(d) and np.array_equal(d.copy_to_host(), whole)
    with pytest.raises(ParameterError, match=r"\(T, 2, 161\)"):
        m.forward(F[:, :1], s)
    cpu_model = MaskModel(weights, update_percent=50, backend="cpu")
    with pytest.raises(ParameterError, match="states do not move between backends"):
        m.forward(F, cpu_model.init_state(2))
    bad = F.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ParameterError, match="NaN or Inf"):
        m.forward(bad, s)


# ----------------------------------------------------------------------- Enhancer


@needs_cuda
@pytest.mark.parametrize("P", [100, 50])
def test_enhancer_cuda_matches_cpu(K, weights, P):
    from npdgru.enhance import Enhancer

    x = noise_speechlike(1600, 3)
    y_cuda = Enhancer(weights, update_percent=P, backend="cuda").enhance(x, 16000)
    y_cpu = Enhancer(weights, update_percent=P, backend="cpu").enhance(x, 16000)
    assert y_cuda.shape == x.shape and y_cuda.dtype == np.float32
    err = float(np.abs(y_cuda - y_cpu).max())
    assert err <= AUDIO_ATOL, f"P={P}: max |cuda - cpu| = {err:.3g}"
    assert np.abs(y_cpu).max() > 0.1


@needs_cuda
def test_stream_equals_offline_on_cuda(K, weights):
    """A cuda Stream returns the cuda offline output delayed by 320 samples, bit for bit."""
    from npdgru.enhance import Enhancer

    enh = Enhancer(weights, update_percent=50, backend="cuda")
    x = noise_speechlike(1500, 4)
    offline = enh.enhance(x, 16000)
    st = enh.stream()
    out = np.concatenate([st.process(x[i : i + 500]) for i in range(0, len(x), 500)] + [st.flush()])
    assert np.array_equal(out[st.latency : st.latency + len(x)], offline)


@needs_cuda
def test_enhance_batch_on_cuda_equals_each_file(K, weights):
    """Signals of different lengths (one stereo) in one GPU batch: each == its own enhance()."""
    from npdgru.enhance import Enhancer

    enh = Enhancer(weights, update_percent=50, backend="cuda")
    xs = [noise_speechlike(1000, 5), np.stack([noise_speechlike(1700, 6), noise_speechlike(1700, 7)], 1), noise_speechlike(300, 8)]
    ys = enh.enhance_batch(xs, 16000)
    cpu = Enhancer(weights, update_percent=50, backend="cpu")
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert y.shape == x.shape and y.dtype == np.float32
        assert np.array_equal(y, enh.enhance(x, 16000)), f"signal {i}"
        assert float(np.abs(y - cpu.enhance(x, 16000)).max()) <= AUDIO_ATOL


@needs_cuda
def test_stream_batch_on_cuda_join_skip_leave(K, weights):
    """Streams join, skip calls and leave a cuda StreamBatch; each gets its offline output
    delayed by 320 samples, bit for bit (i.e. exactly what it gets alone)."""
    from npdgru.enhance import Enhancer

    enh = Enhancer(weights, update_percent=50, backend="cuda")
    sb = enh.stream_batch()
    n_ticks = 9
    # stream: (join tick, leave tick (flush) or None, skipped ticks)
    plan = {0: (0, None, ()), 1: (0, 5, (2,)), 2: (3, None, (6,))}
    xs = {k: noise_speechlike(n_ticks * HOP, 10 + k) for k in plan}
    sid, outs, used = {}, {k: [] for k in plan}, {k: 0 for k in plan}
    for tick in range(n_ticks):
        for k, (join, leave, _) in plan.items():
            if tick == join:
                sid[k] = sb.add()
            if tick == leave:
                outs[k].append(sb.remove(sid.pop(k), flush=True))
        chunks = {s: xs[k][used[k] : used[k] + HOP] for k, s in sid.items() if tick not in plan[k][2]}
        for s, y in sb.process(chunks).items():
            k = next(k for k, v in sid.items() if v == s)
            outs[k].append(y)
            used[k] += HOP
    for k, (join, leave, _) in plan.items():
        got = np.concatenate(outs[k])
        n = used[k]
        offline = enh.enhance(xs[k][:n], 16000)
        if leave is not None:  # flushed: the whole signal
            assert len(got) == n + 320
            assert np.array_equal(got[320 : 320 + n], offline), f"stream {k}"
        else:  # still open: everything up to the latency
            assert np.array_equal(got[320:n], offline[: n - 320]), f"stream {k}"
        assert not got[:320].any()


# ----------------------------------------------------------------------- benchmark


@needs_cuda
@pytest.mark.skipif(not SIM, reason="the smoke run is for the simulator")
def test_bench_cuda_smoke_and_refusal_under_the_simulator():
    script = str(REPO / "benchmarks" / "bench_cuda.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, env=_env(NUMBA_ENABLE_CUDASIM="1"), cwd=REPO, timeout=300)
    assert r.returncode == 2 and "simulator" in r.stderr and "--smoke" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, script, "--smoke", "--no-torch"], capture_output=True, text=True, env=_env(NUMBA_ENABLE_CUDASIM="1"), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| B ")]
    assert len(rows) == 4 and "SMOKE RUN" in r.stdout, r.stdout
