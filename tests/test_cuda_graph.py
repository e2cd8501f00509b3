"""The cuda backend on architecture graphs: the shape glue ``cuda.Ops`` against ``model.HostOps``,
``cuda.LayerNorm`` against ``reference.layer_norm`` and ``cpu.LayerNorm``, and whole DPRNN and MPT
models (tiny, random weights) against the float64 reference backend.

Runs on a CUDA GPU or on numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python
starts); skipped otherwise. The simulator runs every CUDA thread as a Python thread, so sizes are
tiny and the launch parameters are lowered for the whole module (``THREADS_PER_BLOCK = 8``, GEMM
tiles of 16 x 16 from 2 x 2 threads, ``GLUE_MAX_BLOCKS = 2``): widths like 7 and 13 are not
multiples of the block size, and the glue tests run both with a grid of one thread per entry
(several blocks, a partial last one) and with a capped grid (each thread takes several entries).

Tolerances: the glue is exact (copies and one float32 add: compared bit for bit); LayerNorm within
1e-5 of the float64 reference; masks within 1e-5 (P = 100) and 1e-4 (P = 50) of the reference, as
tests/test_cuda_model.py allows. Within the cuda backend equalities are bit for bit: a row alone ==
the row in a batch, streaming (one frame per call) == offline.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np
import pytest

from npdgru import architectures
from npdgru import reference as ref
from npdgru.errors import ParameterError
from npdgru.kernels import cpu
from npdgru.model import HostOps, MaskModel

from cuda_available import CUDA_OK, REASON, SIM  # noqa: E402

if not CUDA_OK:
    pytest.skip(REASON, allow_module_level=True)

from npdgru.kernels import cuda as K  # noqa: E402  (imports numba.cuda: only after the skip)

MASK_ATOL = {100: 1e-5, 50: 1e-4}
NORM_ATOL = 1e-5
T_FRAMES, BATCH = 12, 2


@pytest.fixture(autouse=True, scope="module")
def small_launches():
    """Small blocks, grids and tiles (multi-block, grid-stride and remainder paths: few simulator
    threads) and a fast GIL hand-over (simulator)."""
    saved = K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG, K.config.GLUE_MAX_BLOCKS
    interval = sys.getswitchinterval()
    K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG, K.config.GLUE_MAX_BLOCKS = 8, 2, 8, 2
    sys.setswitchinterval(1e-4)  # the simulator's threads wait at every syncthreads for the GIL
    yield
    K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG, K.config.GLUE_MAX_BLOCKS = saved
    sys.setswitchinterval(interval)


@pytest.fixture(params=[2, 4096], ids=["strided", "thread_per_entry"])
def glue_blocks(request, monkeypatch):
    """The glue kernels on 2 blocks (each thread takes several entries) and uncapped."""
    monkeypatch.setattr(K.config, "GLUE_MAX_BLOCKS", request.param)
    return request.param


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check_device(y, shape):
    assert K.is_device_array(y)
    assert tuple(y.shape) == tuple(shape) and np.dtype(y.dtype) == np.float32
    assert y.is_c_contiguous()
    return y.copy_to_host()


# ------------------------------------------------------------------------------- shape glue

# (a size-1 axis, widths 7 and 13 that are not multiples of the 8 threads of a block, empty arrays)
SWAP_FLIP_SHAPES = [(3, 5, 7), (1, 4, 13), (6, 1, 3), (2, 3, 1), (0, 2, 5), (2, 0, 3)]


@pytest.mark.parametrize("shape", SWAP_FLIP_SHAPES)
def test_swap01_and_flip0_match_host(shape, glue_blocks):
    x = _rand(shape, 1)
    d = K.to_device(x)
    got = _check_device(K.Ops.swap01(d), (shape[1], shape[0], shape[2]))
    assert np.array_equal(got, HostOps.swap01(x))
    got = _check_device(K.Ops.flip0(d), shape)
    assert np.array_equal(got, HostOps.flip0(x))
    assert np.array_equal(d.copy_to_host(), x)  # inputs are left alone


def test_flip0_and_concat_on_other_ranks(glue_blocks):
    for shape in [(9,), (5, 3), (1, 7), (4, 2, 3, 5)]:
        x = _rand(shape, 2)
        assert np.array_equal(_check_device(K.Ops.flip0(K.to_device(x)), shape), HostOps.flip0(x))
    parts = [_rand((5, w), 3 + w) for w in (3, 1, 6)]
    got = _check_device(K.Ops.concat([K.to_device(p) for p in parts]), (5, 10))
    assert np.array_equal(got, HostOps.concat(parts))


@pytest.mark.parametrize("lead, widths", [((4, 3), (7, 13)), ((1, 1), (1,)), ((2, 5), (3, 0, 9, 1)), ((0, 2), (4, 5))])
def test_concat_matches_host(lead, widths, glue_blocks):
    parts = [_rand(lead + (w,), 10 + k) for k, w in enumerate(widths)]
    got = _check_device(K.Ops.concat([K.to_device(p) for p in parts]), lead + (sum(widths),))
    assert np.array_equal(got, HostOps.concat(parts))


@pytest.mark.parametrize("shape", [(3, 2, 13), (1, 1, 1), (5, 7), (0, 3, 4)])
def test_add_matches_host(shape, glue_blocks):
    a, b = _rand(shape, 20), _rand(shape, 21)
    got = _check_device(K.Ops.add(K.to_device(a), K.to_device(b)), shape)
    assert np.array_equal(got, HostOps.add(a, b))


@pytest.mark.parametrize("shape, out", [((3, 2, 13), 16), ((2, 1, 5), 5), ((1, 1, 1), 9), ((4, 7), 8), ((0, 2, 3), 6)])
def test_pad_matches_host(shape, out, glue_blocks):
    x = _rand(shape, 30)
    y = K.Ops.pad(K.to_device(x), out)
    got = _check_device(y, shape[:-1] + (out,))
    assert np.array_equal(got, HostOps.pad(x, out))


@pytest.mark.parametrize("shape, start, stop", [((3, 2, 13), 0, 13), ((3, 2, 13), 5, 12), ((2, 1, 9), 8, 9), ((4, 7), 2, 3), ((2, 3, 6), 4, 2), ((0, 2, 6), 1, 4)])
def test_slice_matches_host(shape, start, stop, glue_blocks):
    x = _rand(shape, 40)
    want = HostOps.slice(x, start, stop)
    got = _check_device(K.Ops.slice(K.to_device(x), start, stop), want.shape)
    assert np.array_equal(got, want)


def test_ops_refuse_mismatched_shapes():
    a, b = K.to_device(_rand((2, 3), 0)), K.to_device(_rand((3, 3), 1))
    with pytest.raises(ParameterError, match="add"):
        K.Ops.add(a, b)
    with pytest.raises(ParameterError, match="concat"):
        K.Ops.concat([a, b])
    with pytest.raises(ParameterError, match="pad"):
        K.Ops.pad(a, 2)


# ------------------------------------------------------------------------------- LayerNorm


def _norm_weights(C, seed):
    rng = np.random.default_rng(seed)
    return (1.0 + 0.3 * rng.standard_normal(C)).astype(np.float32), (0.2 * rng.standard_normal(C)).astype(np.float32)


@pytest.mark.parametrize("N, C", [(13, 7), (1, 1), (9, 32), (0, 5)])
def test_layer_norm_matches_reference_and_cpu(N, C):
    w, b = _norm_weights(C, N + C)
    x = (_rand((N, C), 50) * 3.0 + 1.5).astype(np.float32)
    layer = K.LayerNorm(w, b, eps=1e-5, name="n")
    got = layer.forward(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (N, C)
    want = ref.layer_norm(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=NORM_ATOL)
    np.testing.assert_allclose(got, cpu.LayerNorm(w, b, eps=1e-5).forward(x), rtol=0, atol=1e-6)
    d = layer.forward(K.to_device(x))  # device in -> device out
    assert np.array_equal(_check_device(d, (N, C)), got)


def test_layer_norm_rows_alone_equal_rows_together():
    C = 11
    w, b = _norm_weights(C, 5)
    x = (_rand((10, C), 51) * 2.0 - 0.5).astype(np.float32)
    x[3] = 4.0  # a constant row: variance 0
    layer = K.LayerNorm(w, b, eps=1e-3)
    together = layer._run(K.to_device(x)).copy_to_host()
    for n in range(x.shape[0]):
        assert np.array_equal(layer._run(K.to_device(x[n : n + 1])).copy_to_host()[0], together[n]), f"row {n}"
    assert np.array_equal(layer._run(K.to_device(x[4:9])).copy_to_host(), together[4:9])
    np.testing.assert_allclose(together[3], b, rtol=0, atol=1e-6)


def test_layer_norm_checks():
    w, b = _norm_weights(4, 6)
    with pytest.raises(ParameterError, match=r"ln\.weight must be 1-D"):
        K.LayerNorm(np.ones((2, 2), np.float32), b, name="ln")
    with pytest.raises(ParameterError, match=r"ln\.bias must have shape \(4,\)"):
        K.LayerNorm(w, b[:3], name="ln")
    with pytest.raises(ParameterError, match=r"ln\.weight contains NaN"):
        K.LayerNorm(np.array([1.0, np.nan, 1.0, 1.0]), b, name="ln")
    with pytest.raises(ParameterError, match=r"ln\.weight must be a float array"):
        K.LayerNorm(np.ones(4, np.int64), b, name="ln")
    layer = K.LayerNorm(w, b, name="ln")
    with pytest.raises(ParameterError, match=r"shape \(N, 4\)"):
        layer.forward(np.zeros((3, 5), np.float32))
    with pytest.raises(ParameterError, match="float array"):
        layer.forward(np.zeros((3, 4), np.int32))
    with pytest.raises(ParameterError, match="NaN or Inf"):
        layer.forward(np.full((3, 4), np.inf, np.float32))


# ------------------------------------------------------------------------------- whole models

ARCHS = {
    "dprnn": lambda: architectures.dprnn(bands=6, bins_per_band=28, channels=8, intra_hidden=4, inter_hidden=8, blocks=2),
    "mpt": lambda: architectures.mpt(edges=(0, 80, 161), sub_embed=8, sub_hidden=12, full_embed=8, full_hidden=16, fusion=10),
}


@lru_cache(maxsize=None)
def _weights(name):
    from npdgru.weights import Weights, expected_shapes, validate_architecture

    arch = validate_architecture(ARCHS[name]())
    norms = {s["name"] for s in arch["layers"] if s["kind"] == "layernorm"}
    rng = np.random.default_rng(7)
    t = {}
    for k, shape in expected_shapes(arch).items():
        layer, field = k.split(".")
        if layer in norms:
            t[k] = ((1.0 if field == "weight" else 0.0) + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            t[k] = (rng.uniform(-1.0, 1.0, shape) / np.sqrt(shape[-1])).astype(np.float32)
    return Weights(architecture=arch, tensors=t)


def _features(seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((T_FRAMES, BATCH, 161)) * 2.0 - 4.0).astype(np.float32)


@lru_cache(maxsize=None)
def _masks(name, P, backend):
    m = MaskModel(_weights(name), update_percent=P, backend=backend)
    return m.forward(_features(), m.init_state(BATCH))


@pytest.mark.parametrize("P", [100, 50])
@pytest.mark.parametrize("name", ["dprnn", "mpt"])
def test_model_matches_reference(name, P):
    got, want = _masks(name, P, "cuda"), _masks(name, P, "reference")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (T_FRAMES, BATCH, 161)
    assert got.std() > 0.01
    err = float(np.abs(got - want).max())
    assert err <= MASK_ATOL[P], f"{name} P={P}: max |cuda - reference| = {err:.3g} > {MASK_ATOL[P]}"


@pytest.mark.parametrize("name", ["dprnn", "mpt"])
def test_model_streaming_equals_offline(name):
    """One frame per call with carried (device) state == all frames in one call, bit for bit.
    Every other frame goes in as a device array (and its mask stays on the device)."""
    m = MaskModel(_weights(name), update_percent=50, backend="cuda")
    F = _features()
    s = m.init_state(BATCH)
    frames = []
    for t in range(T_FRAMES):
        if t % 2:
            d = m.forward(K.to_device(F[t : t + 1]), s)
            frames.append(_check_device(d, (1, BATCH, 161)))
        else:
            frames.append(m.forward(F[t : t + 1], s))
    assert np.array_equal(np.concatenate(frames), _masks(name, 50, "cuda"))
