"""The cuda (numba.cuda, float32) kernels against the float64 reference and the cpu backend.

Runs on a CUDA GPU or on numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python
starts); skipped otherwise. The simulator runs every CUDA thread as a Python thread, so sizes are
tiny (H <= 24, B <= 5, T <= 8) and the launch parameters are lowered for the whole module
(``THREADS_PER_BLOCK = 8``, GEMM tiles of 8 x 8 from 4 x 4 threads): H = 21 and 24 with 8
threads per block take the multi-pass and remainder paths, B streams are B blocks, and every
GEMM here spans several tiles with partial ones at the edges.

Tolerances, as in tests/test_kernels_cpu.py: |cuda − ref| <= ATOL + RTOL·|ref| with ATOL = 2e-5,
RTOL = 1e-4 (float32 sums of <= 50 terms and CUDA's tanhf: a few 1e-7 per step, measured max
2e-7 here). A selection step whose reference margin u_(A) − u_(A+1) is below MARGIN = 1e-5 is
left out of the set comparison; every comparison of values is teacher-forced (each reference
step starts from the kernel's own previous state). The selection itself is exact: ``top_a`` and
the tie tests compare sets with no margin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from npdgru import reference as ref
from npdgru.errors import ParameterError
from npdgru.kernels import cpu
from npdgru.kernels.cpu import kernels as cpu_kernels

from cuda_available import CUDA_OK, REASON, SIM  # noqa: E402

if not CUDA_OK:
    pytest.skip(REASON, allow_module_level=True)

from npdgru.kernels import cuda as K  # noqa: E402  (imports numba.cuda: only after the skip)
from numba import cuda, float32  # noqa: E402  (a global named cuda: the simulator swaps it in a kernel's module)

REPO = Path(__file__).resolve().parents[1]
ATOL = 2e-5
RTOL = 1e-4
MARGIN = 1e-5
NEVER = 10**9


@pytest.fixture(autouse=True, scope="module")
def small_launches():
    """Small blocks and tiles (multi-block, remainder paths) and a fast GIL hand-over (simulator)."""
    saved = K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG
    interval = sys.getswitchinterval()
    K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG = 8, 4, 2
    sys.setswitchinterval(1e-4)  # the simulator's threads wait at every syncthreads for the GIL
    yield
    K.config.THREADS_PER_BLOCK, K.config.GEMM_TILE, K.config.GEMM_REG = saved
    sys.setswitchinterval(interval)


# ------------------------------------------------------------------------------------ helpers


def assert_close(got, want, what, atol=ATOL, rtol=RTOL):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} entries differ beyond {atol:g} + {rtol:g}|ref|; "
            f"first at {i}: cuda={float(got[i])!r} ref={float(want[i])!r} (max |diff| {np.abs(got - want).max():.3g})"
        )


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def update_gate64(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    H = weight_hh.shape[1]
    a_z = x @ weight_ih[H : 2 * H].T + bias_ih[H : 2 * H] + h @ weight_hh[H : 2 * H].T + bias_hh[H : 2 * H]
    return 1.0 - ref.sigmoid(a_z)


def check_dgru_trajectory(c, x, out, sel, A, what):
    """The D-GRU invariants on a cuda run, teacher forced: exactly A change per stream and step,
    the others bit-identical, the changed ones = reference values, the set = reference top A."""
    T, B, H = out.shape
    W64 = c.weights64
    x64 = x.astype(np.float64)
    prev32 = np.concatenate([c.h0[None], out[:-1]])
    prev = prev32.astype(np.float64)
    counts = sel.sum(axis=-1)
    assert (counts == A).all(), f"{what}: selected counts {np.unique(counts)} != A={A}"
    keep = ~sel
    assert np.array_equal(bits(out)[keep], bits(prev32)[keep]), f"{what}: an unselected neuron changed"
    h_all, _ = ref.dgru_step(x64, prev, *W64, H)
    assert_close(np.where(sel, out, 0.0), np.where(sel, h_all, 0.0), f"{what} selected values (teacher forced)")
    if A == H:
        return 0
    u = update_gate64(x64, prev, *W64)
    _, S_ref = ref.dgru_step(x64, prev, *W64, A)
    s = -np.sort(-u, axis=-1)
    kth, next_ = s[..., A - 1], s[..., A]
    clear = (kth - next_) >= MARGIN
    if not np.array_equal(sel[clear], S_ref[clear]):
        t, b = (int(v) for v in np.argwhere(clear & (sel != S_ref).any(-1))[0])
        raise AssertionError(f"{what}: selection differs at t={t} b={b}: cuda {np.flatnonzero(sel[t, b])} ref {np.flatnonzero(S_ref[t, b])}")
    lo = np.where(sel, u, np.inf).min(-1)
    hi = np.where(sel, -np.inf, u).max(-1)
    assert (lo >= kth - MARGIN).all() and (hi <= next_ + MARGIN).all(), f"{what}: selection far from the top A"
    return int((~clear).sum())


def run_layer(c, P, *, sparse_input=False, refresh_every=K.DEFAULT_REFRESH, x=None):
    x = c.x if x is None else x
    layer = K.GRULayer(*c.weights, update_percent=P, sparse_input=sparse_input, refresh_every=refresh_every)
    state = layer.init_state(x.shape[1], c.h0)
    sel = np.zeros(x.shape[:2] + (c.H,), bool)
    out = layer.forward(x, state, selected=sel)
    return layer, state, out, sel


# ----------------------------------------------------------------------------- select gate


@pytest.mark.parametrize("H", [21, 24])
def test_top_a_equals_reference_with_ties(H):
    """Rank-by-counting == reference.top_a (stable sort) on rows full of exact ties, every A."""
    rng = np.random.default_rng(H)
    u = (rng.integers(-3, 4, (5, H)) * 0.25).astype(np.float32)  # 7 levels: many ties per row
    u[1] = 0.5  # one row all equal: the first A win
    u[2, ::2] = 1.0  # ties at the top, straddling most A
    for A in sorted({1, 2, 5, H // 2, H - 1, H}):
        got = K.top_a(u, A)
        want = ref.top_a(u.astype(np.float64), A)
        np.testing.assert_array_equal(got, want, err_msg=f"H={H} A={A}")
        assert (got.sum(-1) == A).all()
    assert (K.top_a(u, 3)[1] == (np.arange(H) < 3)).all()


def test_top_a_matches_cpu_quickselect():
    rng = np.random.default_rng(3)
    u = rng.random((4, 23)).astype(np.float32)
    u[:, 5] = u[:, 17]  # a tie in every row
    for A in (1, 7, 12, 22):
        got = K.top_a(u, A)
        for b in range(4):
            idx = np.full(23, -1, np.int64)
            cpu_kernels._top_a(u[b], A, np.zeros(23, np.float32), idx)
            mask = np.zeros(23, bool)
            mask[idx[:A]] = True
            np.testing.assert_array_equal(got[b], mask, err_msg=f"row {b} A={A}")


# -------------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("activation", ["none", "relu", "sigmoid", "tanh"])
def test_linear_matches_reference_and_cpu(activation):
    """Tiled GEMM over 13 rows x 19 outputs, 11 inputs: 2 x 3 tiles of 8 x 8, all partial at an edge."""
    rng = np.random.default_rng(1)
    w = rng.uniform(-0.6, 0.6, (19, 11)).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, 19).astype(np.float32)
    x = rng.standard_normal((13, 11)).astype(np.float32)
    lin = K.Linear(w, b, activation=activation)
    y = lin.forward(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (13, 19)
    assert_close(y, ref.linear(x.astype(np.float64), w, b, activation), f"Linear {activation} vs reference")
    assert_close(y, cpu.Linear(w, b, activation=activation).forward(x), f"Linear {activation} vs cpu", atol=1e-6, rtol=1e-6)
    # a device array in gives a device array out with the same bits; zero rows work
    d = lin.forward(K.to_device(x))
    assert K.is_device_array(d) and np.array_equal(bits(d.copy_to_host()), bits(y))
    assert lin.forward(x[:0]).shape == (0, 19)
    # the tile size does not change any bit (same summation order in every tile)
    K.config.GEMM_TILE, K.config.GEMM_REG = 2, 3
    try:
        assert np.array_equal(lin.forward(x), y)
    finally:
        K.config.GEMM_TILE, K.config.GEMM_REG = 4, 2


# ------------------------------------------------------------------------- dense GRU, P=100


def test_dense_gru_matches_reference_and_cpu(make_gru):
    c = make_gru(21, 11, seed=5, T=6, B=3)
    x64, h64 = c.x.astype(np.float64), c.h0.astype(np.float64)
    out = K.gru_sequence(c.x, c.h0, *c.weights)
    assert out.dtype == np.float32 and out.shape == (6, 3, 21)
    assert_close(out, ref.gru_sequence(x64, h64, *c.weights64), "cuda dense vs reference")
    assert_close(out, cpu.gru_sequence(c.x, c.h0, *c.weights), "cuda dense vs cpu")
    one = K.gru_step(c.x[0], c.h0, *c.weights)
    assert np.array_equal(bits(one), bits(out[0]))
    assert_close(one, ref.gru_step(x64[0], h64, *c.weights64), "cuda gru_step vs reference")


def test_p100_is_the_dense_gru(make_gru):
    """P = 100: GRULayer runs the dense GRU (all selected); the D-GRU kernel at A = H agrees."""
    c = make_gru(24, 7, seed=6, T=5, B=2)
    layer, _, out, sel = run_layer(c, 100)
    assert layer.dense and sel.all()
    dgru, S = K.dgru_sequence(c.x, c.h0, *c.weights, c.H)
    assert S.all()
    want = ref.gru_sequence(c.x.astype(np.float64), c.h0.astype(np.float64), *c.weights64)
    assert_close(out, want, "cuda P=100 vs reference GRU")
    assert_close(dgru, want, "cuda D-GRU A=H vs reference GRU")
    assert_close(dgru, out, "cuda D-GRU A=H vs cuda dense", atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ D-GRU


@pytest.mark.parametrize("H, I, P, B, seed", [(24, 9, 50, 5, 1), (21, 11, 25, 3, 2), (24, 5, 10, 2, 3), (21, 8, 90, 2, 4), (17, 6, 1e-3, 2, 5)])
def test_dgru_invariants_and_parity(make_gru, H, I, P, B, seed):
    c = make_gru(H, I, seed=seed, T=8, B=B, scale=1.5)
    A = ref.num_selected(P, H)
    layer, state, out, sel = run_layer(c, P)
    assert layer.A == A and out.dtype == np.float32
    check_dgru_trajectory(c, c.x, out, sel, A, f"cuda H={H} A={A}")
    # the cpu backend on the same problem: same selections away from near ties, close values
    cpu_layer = cpu.GRULayer(*c.weights, update_percent=P)
    sel_cpu = np.zeros_like(sel)
    out_cpu = cpu_layer.forward(c.x, cpu_layer.init_state(B, c.h0), selected=sel_cpu)
    same = ~(sel != sel_cpu).any(axis=(1, 2))
    t_end = int(np.argmin(same)) if not same.all() else len(same)
    assert t_end >= 6, f"cuda and cpu selections part at t={t_end}"
    assert_close(out[:t_end], out_cpu[:t_end], f"cuda vs cpu H={H} A={A}")
    st = state.to_host()
    assert np.array_equal(bits(st["h"]), bits(out[-1])) and (st["step"] == 8).all()


def test_corner_cases(corner_case):
    """zero input, one frame, H = 1, A = 1, A = H (tests/conftest.py) against the reference."""
    c = corner_case
    x64, h64 = c.x.astype(np.float64), c.h0.astype(np.float64)
    out, S = K.dgru_sequence(c.x, c.h0, *c.weights, c.A)
    check_dgru_trajectory(c, c.x, out, S, c.A, f"cuda {c.name}")
    want, S_ref = ref.dgru_sequence(x64, h64, *c.weights64, c.A)
    np.testing.assert_array_equal(S, S_ref, err_msg=c.name)
    assert_close(out, want, f"cuda dgru {c.name}")
    assert_close(K.gru_sequence(c.x, c.h0, *c.weights), ref.gru_sequence(x64, h64, *c.weights64), f"cuda dense {c.name}")


def test_ties_go_to_the_lower_index():
    """Exact ties in u inside the kernel (zero z-rows, equal biases; identical z-rows)."""
    H, I, A, T, B = 10, 4, 3, 4, 2
    rng = np.random.default_rng(7)
    w_ih = rng.uniform(-0.4, 0.4, (3 * H, I)).astype(np.float32)
    w_hh = rng.uniform(-0.4, 0.4, (3 * H, H)).astype(np.float32)
    b_ih = rng.uniform(-0.4, 0.4, 3 * H).astype(np.float32)
    b_hh = rng.uniform(-0.4, 0.4, 3 * H).astype(np.float32)
    w_ih[H : 2 * H] = 0.0  # z from the biases only: u constant in time
    w_hh[H : 2 * H] = 0.0
    b_hh[H : 2 * H] = 0.0
    b_ih[H : 2 * H] = np.float32(0.5)
    b_ih[H + np.array([2, 5, 6, 9])] = np.float32(-1.0)  # four tie for the largest u; A=3 takes 2, 5, 6
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (B, H)).astype(np.float32)
    expected = np.zeros(H, bool)
    expected[[2, 5, 6]] = True
    _, S = K.dgru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, A)
    assert (S == expected).all(), np.argwhere(S != expected)
    b_ih[H : 2 * H] = np.float32(0.25)  # all tied: the first A
    _, S = K.dgru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, A, sparse_input=True)
    assert (S == (np.arange(H) < A)).all()
    # identical z-rows 1, 4, 6 (weights and biases): bit-equal u, the lower index first
    H, A = 8, 2
    w_ih, w_hh, b_ih, b_hh = (rng.uniform(-0.4, 0.4, s).astype(np.float32) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)])
    for dst in (4, 6):
        for a in (w_ih, w_hh, b_ih, b_hh):
            a[H + dst] = a[H + 1]
    x = rng.standard_normal((5, 1, I)).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (1, H)).astype(np.float32)
    _, S = K.dgru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, A)
    _, S_ref = ref.dgru_sequence(x.astype(np.float64), h0.astype(np.float64), w_ih, w_hh, b_ih, b_hh, A)
    np.testing.assert_array_equal(S, S_ref)
    assert not (S[..., 4] & ~S[..., 1]).any() and not (S[..., 6] & ~S[..., 4]).any()


def test_dgru_step_matches_reference(make_gru):
    """The one-frame form: reference.dgru_step(x, h, ..., A) for all streams at once."""
    c = make_gru(24, 6, seed=9, T=1, B=4)
    A = 7
    h1, S = K.dgru_step(c.x[0], c.h0, *c.weights, A)
    want, S_ref = ref.dgru_step(c.x[0].astype(np.float64), c.h0.astype(np.float64), *c.weights64, A)
    np.testing.assert_array_equal(S, S_ref)
    assert_close(h1, want, "cuda dgru_step")
    assert np.array_equal(bits(h1[~S]), bits(c.h0[~S]))


# ------------------------------------------------------------ streaming, batches, block size


@pytest.mark.parametrize("mode", ["dense", "dgru", "sparse_input"])
def test_offline_equals_streaming_bit_for_bit(make_gru, mode):
    """State on the device across calls: T frames at once == 1-frame calls == chunks, bit for bit,
    with accumulator refreshes (refresh_every=3) falling inside calls and on call boundaries."""
    c = make_gru(12, 5, seed=11, T=7, B=2)
    P = 100.0 if mode == "dense" else 40.0
    layer = K.GRULayer(*c.weights, update_percent=P, sparse_input=mode == "sparse_input", refresh_every=3)
    s_off = layer.init_state(2, c.h0)
    sel_off = np.zeros((7, 2, 12), bool)
    off = layer.forward(c.x, s_off, selected=sel_off)
    s_one = layer.init_state(2, c.h0)
    sel_one = np.zeros_like(sel_off)
    one = np.concatenate([layer.forward(c.x[t : t + 1], s_one, selected=sel_one[t : t + 1]) for t in range(7)])
    s_chk = layer.init_state(2, c.h0)
    chunked = np.concatenate([layer.forward(c.x[a:b], s_chk) for a, b in [(0, 3), (3, 3), (3, 7)]])
    assert np.array_equal(bits(off), bits(one)), f"offline != 1-frame calls ({mode})"
    assert np.array_equal(bits(off), bits(chunked)), f"offline != chunks ({mode})"
    assert np.array_equal(sel_off, sel_one)
    h_off = s_off.to_host()
    for s in (s_one, s_chk):
        hs = s.to_host()
        assert np.array_equal(bits(h_off["h"]), bits(hs["h"])) and np.array_equal(h_off["step"], hs["step"])
        if mode != "dense":
            assert np.array_equal(bits(h_off["m"]), bits(hs["m"])), f"accumulators differ ({mode})"
    if mode == "dgru":
        check_dgru_trajectory(c, c.x, off, sel_off, layer.A, "cuda refresh_every=3")


def test_batch_streams_and_block_size_do_not_change_bits(make_gru):
    """Stream b of a batch == stream b alone, and 8 == 32 threads per block, bit for bit."""
    c = make_gru(21, 6, seed=12, T=5, B=4)
    layer = K.GRULayer(*c.weights, update_percent=30)
    sel = np.zeros((5, 4, 21), bool)
    batch = layer.forward(c.x, layer.init_state(4, c.h0), selected=sel)
    for b in (0, 3):
        sel_b = np.zeros((5, 1, 21), bool)
        alone = layer.forward(c.x[:, b : b + 1], layer.init_state(1, c.h0[b : b + 1]), selected=sel_b)
        assert np.array_equal(bits(batch[:, b : b + 1]), bits(alone)), f"stream {b}"
        assert np.array_equal(sel[:, b : b + 1], sel_b)
    K.config.THREADS_PER_BLOCK = 32
    try:
        wide = layer.forward(c.x, layer.init_state(4, c.h0))
    finally:
        K.config.THREADS_PER_BLOCK = 8
    assert np.array_equal(bits(wide), bits(batch))


@pytest.mark.parametrize("refresh_every", [1, NEVER])
def test_sparse_input_layer_matches_reference(make_gru, refresh_every):
    """A layer fed by a D-GRU layer with an input accumulator (few input entries change per step)."""
    c1 = make_gru(16, 6, seed=13, T=8, B=2)
    c2 = make_gru(12, 16, seed=14, T=8, B=2)
    l1 = K.GRULayer(*c1.weights, update_percent=25)
    y1 = l1.forward(c1.x, l1.init_state(2, c1.h0))
    assert ((y1[1:] != y1[:-1]).sum(-1) == 4).all()  # A = 4 of 16 inputs change per step
    _, _, out, sel = run_layer(c2, 50, sparse_input=True, refresh_every=refresh_every, x=y1)
    check_dgru_trajectory(c2, y1, out, sel, 6, f"cuda sparse input refresh={refresh_every}")
    _, _, dense_in, sel_d = run_layer(c2, 50, refresh_every=refresh_every, x=y1)
    np.testing.assert_array_equal(sel, sel_d)
    assert_close(out, dense_in, "sparse vs dense input", atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ state rows


def test_state_take_and_put(make_gru):
    """GRUState.take/put (StreamBatch join/leave): rows copied exactly, -1 gives a fresh stream."""
    c = make_gru(9, 4, seed=15, T=3, B=3)
    layer = K.GRULayer(*c.weights, update_percent=50, sparse_input=True)
    s = layer.init_state(3, c.h0)
    layer.forward(c.x, s)
    full = s.to_host()
    t = s.take([2, -1, 0])
    got = t.to_host()
    for f in ("h", "m", "g", "xprev", "step"):
        assert np.array_equal(got[f][0], full[f][2]) and np.array_equal(got[f][2], full[f][0])
        assert not got[f][1].any()
    # advancing the taken streams and putting them back == advancing them in place
    sub = s.take([2, 0])
    layer.forward(c.x[:1, [2, 0]], sub)
    s.put([2, 0], sub)
    ref_state = layer.init_state(3, c.h0)
    layer.forward(c.x, ref_state)
    x1 = c.x[:1].copy()
    x1[0, 1] = 0.0  # stream 1 is not advanced in s; advance all three in ref and compare rows 0, 2
    layer.forward(x1, ref_state)
    a, b = s.to_host(), ref_state.to_host()
    for f in ("h", "m", "g", "xprev", "step"):
        assert np.array_equal(a[f][[0, 2]], b[f][[0, 2]]), f
        assert np.array_equal(a[f][1], full[f][1]), f
    with pytest.raises(ParameterError):
        s.put([0, 0], s.take([1, 2]))
    with pytest.raises(ParameterError):
        s.take([3])


# ---------------------------------------------------------------------------- bad arguments


def _w(H=5, I=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.3, 0.3, s).astype(np.float32) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]]


def _bad_calls():
    W = _w()
    x = np.zeros((4, 2, 3), np.float32)
    layer = K.GRULayer(*W, update_percent=50)
    sparse = K.GRULayer(*_w(5, 7), update_percent=50, sparse_input=True)
    cpu_layer = cpu.GRULayer(*W, update_percent=50)
    lin = K.Linear(W[0], W[2])

    def fwd(xx, **kw):
        return lambda: layer.forward(xx, layer.init_state(2), **kw)

    nan_x = x.copy()
    nan_x[2, 1, 0] = np.nan
    return {
        "P=0": lambda: K.GRULayer(*W, update_percent=0),
        "P='50'": lambda: K.GRULayer(*W, update_percent="50"),
        "x ndim 2": fwd(x[0]),
        "x wrong I": fwd(np.zeros((4, 2, 4), np.float32)),
        "x int dtype": fwd(np.zeros((4, 2, 3), np.int32)),
        "x NaN": fwd(nan_x),
        "x float64 device array": fwd(K.kernels.cuda.to_device(x.astype(np.float64))),
        "weight_hh not (3H, H)": lambda: K.GRULayer(W[0], np.zeros((15, 4), np.float32), W[2], W[3]),
        "weight_ih NaN": lambda: K.GRULayer(np.full_like(W[0], np.nan), *W[1:]),
        "bias_ih wrong shape": lambda: K.GRULayer(W[0], W[1], np.zeros(14, np.float32), W[3]),
        "state wrong batch": lambda: layer.forward(x, layer.init_state(3)),
        "state None": lambda: layer.forward(x, None),
        "state of the cpu backend": lambda: layer.forward(x, cpu_layer.init_state(2)),
        "state of another input size": lambda: sparse.forward(np.zeros((2, 2, 7), np.float32), layer.init_state(2)),
        "batch 0": lambda: layer.init_state(0),
        "h0 wrong shape": lambda: layer.init_state(2, np.zeros((2, 4), np.float32)),
        "refresh_every=0": lambda: K.GRULayer(*W, update_percent=50, refresh_every=0),
        "selected wrong shape": fwd(x, selected=np.zeros((4, 2, 4), bool)),
        "selected int dtype": fwd(x, selected=np.zeros((4, 2, 5), np.int8)),
        "dgru_sequence A=0": lambda: K.dgru_sequence(x, None, *W, 0),
        "dgru_sequence A=H+1": lambda: K.dgru_sequence(x, None, *W, 6),
        "gru_sequence h0 wrong": lambda: K.gru_sequence(x, np.zeros((3, 5), np.float32), *W),
        "dgru_step x 3-D": lambda: K.dgru_step(x, None, *W, 2),
        "top_a A=0": lambda: K.top_a(np.zeros((2, 5), np.float32), 0),
        "top_a 1-D": lambda: K.top_a(np.zeros(5, np.float32), 1),
        "Linear x wrong width": lambda: lin.forward(np.zeros((2, 4), np.float32)),
        "Linear x 3-D": lambda: lin.forward(np.zeros((1, 2, 3), np.float32)),
        "Linear activation": lambda: K.Linear(W[0], W[2], activation="gelu"),
        "input too large for shared memory": lambda: K.GRULayer(np.zeros((15, 13000), np.float32), *W[1:], update_percent=50, sparse_input=True),
    }


def test_bad_arguments_raise_parameter_error():
    calls = _bad_calls()
    for name, call in calls.items():
        with pytest.raises(ParameterError) as e:
            call()
        assert str(e.value), name


def test_error_messages_name_the_argument():
    W = _w()
    layer = K.GRULayer(*W, update_percent=50, name="gru7")
    with pytest.raises(ParameterError, match=r"gru7 input x must have shape \(T, B, 3\)"):
        layer.forward(np.zeros((2, 3)), layer.init_state(1))
    with pytest.raises(ParameterError, match="gru7: state is for"):
        layer.forward(np.zeros((2, 2, 3)), layer.init_state(1))
    with pytest.raises(ParameterError, match="selected"):
        layer.forward(np.zeros((2, 1, 3)), layer.init_state(1), selected=np.zeros((2, 1, 4), bool))


# ------------------------------------------------------------------ compiles for a real GPU

_PTX_CHECK = textwrap.dedent(
    """
    import types
    import numba.cuda.dispatcher as d
    from numba import cuda, types as nt
    from numba.cuda.cudadrv import nvvm
    if getattr(cuda, "implementation", "") != "NVIDIA":
        print("NO-NVVM: the check needs numba-cuda, not numba's deprecated built-in numba.cuda")
        raise SystemExit(0)
    d.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))  # no GPU here

    def probe(a):
        a[0] = 1.0

    try:  # a trivial kernel first: does this install have the CUDA compiler libraries at all?
        nvvm.NVVM().get_version()
        cuda.compile_ptx(probe, (nt.float32[::1],), cc=(9, 0))
    except Exception as e:
        print("NO-NVVM", type(e).__name__, e)
        raise SystemExit(0)
    from npdgru.kernels import cuda as K
    f32, i64, b1 = nt.float32, nt.int64, nt.boolean
    a1, a2, a3 = (lambda t, n=n: nt.Array(t, n, "C") for n in (1, 2, 3))
    jobs = [
        (K.kernels._gemm(16, 4), (a2(f32), a2(f32), a1(f32), a2(f32), i64)),
        (K.kernels._gru_cell, (a2(f32),) * 4),
        (K.kernels._dgru(400, 128), (a3(f32), a2(f32), a1(f32), i64, i64, a2(f32), a2(f32), a1(i64), a3(f32), a3(b1))),
        (K.kernels._dgru_sparse(400, 400, 128), (a3(f32), a2(f32), a1(f32), a2(f32), a1(f32), i64, i64, a2(f32), a2(f32), a2(f32), a2(f32), a1(i64), a3(f32), a3(b1))),
        (K.kernels._topa(400, 128), (a2(f32), i64, a2(b1))),
        (K.kernels._gather, (a2(f32), a1(i64), a2(f32))),
        (K.kernels._gather, (a2(i64), a1(i64), a2(i64))),
        (K.kernels._scatter, (a2(f32), a1(i64), a2(f32))),
        (K.kernels._scatter, (a2(i64), a1(i64), a2(i64))),
    ]
    for k, sig in jobs:
        ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
        assert ".f64" not in ptx, f"{k.py_func.__name__}: float64 arithmetic in the PTX"
        assert ".local" not in ptx, f"{k.py_func.__name__}: local memory (spilled arrays) in the PTX"
    print("PTX-OK", len(jobs))
    """
)


def test_kernels_compile_for_sm90_without_float64_or_local_memory():
    """Real numba-cuda compilation (not the simulator) of every kernel at NSNet2 size for sm_90.

    Needs libNVVM (numba-cuda[cu12] or [cu13]); skipped where it is missing (the simulator CI)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _PTX_CHECK], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    if "NO-NVVM" in r.stdout:
        pytest.skip(f"needs numba-cuda with libNVVM (pip install 'numba-cuda[cu13]'): {r.stdout.strip()[:200]}")
    assert r.returncode == 0 and "PTX-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.skipif(not SIM, reason="the simulator's shared arrays (a GPU has no such step)")
def test_simulator_gives_every_thread_of_a_block_the_same_shared_arrays(monkeypatch):
    """numba-cuda's simulator creates a block's shared array on first use with no lock: threads
    that look it up at the same time got different arrays (garbage reads, now and then).
    npdgru.kernels.cuda.device serialises it. Here creation is made slow (2 ms, so that every
    thread of the block reaches the lookup before the first store): each thread still reads what
    its neighbours wrote, and the two arrays of two source lines stay two arrays."""
    import time

    from npdgru.kernels.cuda import device

    made = []

    def slow(shape, dtype):
        time.sleep(0.002)
        made.append(shape)
        return np.empty(shape, dtype)

    monkeypatch.setattr(device, "_new_shared", slow)

    @cuda.jit
    def neighbours(out):
        a = cuda.shared.array(32, float32)
        b = cuda.shared.array(32, float32)
        i = cuda.threadIdx.x
        a[i] = i
        b[i] = -2 * i
        cuda.syncthreads()
        out[i] = a[(i + 1) % 32] + b[(i + 5) % 32]

    out = np.zeros(32, np.float32)
    neighbours[1, 32](out)
    i = np.arange(32)
    np.testing.assert_array_equal(out, (i + 1) % 32 - 2 * ((i + 5) % 32))
    assert made == [32, 32]  # one array per source line for the whole block
