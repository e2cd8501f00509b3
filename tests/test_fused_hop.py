"""The plan, the executors' state, and the fused streaming hop on the cpu backend.

* the fused hop (one jitted call for every model step, NumPy ufuncs with ``out=`` around it)
  gives, bit for bit, what the general per-layer path gives, for :class:`Stream` and
  :class:`StreamBatch`, on small random NSNet2, DPRNN and MPT models at P = 100, 50, 25 (and
  with input accumulators); the general path is the per-layer executor, an independent route
  through other code (``_StftBatch``, ``Enhancer._apply``, ``GRULayer._run``);
* a steady-state hop allocates nothing but the samples it returns (tracemalloc);
* ``ExecState.take`` / ``put`` move streams between batches on every host backend;
* ``GRULayer(A=...)`` runs the D-GRU kernel at a given A;
* the plan's counts against hand computations (every tensor read once = the file's bytes).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from npdgru import architectures
from npdgru.architectures import dprnn, mpt
from npdgru.enhance import Enhancer
from npdgru.errors import ParameterError
from npdgru.kernels import cpu
from npdgru.kernels.cpu import kernels as cpu_kernels
from npdgru.model import MaskModel
from npdgru.plan import make_plan
from npdgru.weights import Weights, expected_shapes, validate_architecture

HOP = 160


def _random_weights(arch: dict, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    t = {}
    for spec in arch["layers"]:
        for k, s in expected_shapes({"layers": [spec]}).items():
            if spec["kind"] == "layernorm":
                t[k] = ((1.0 if k.endswith(".weight") else 0.0) + rng.uniform(-0.3, 0.3, s)).astype(np.float32)
            else:
                bound = 1.0 / np.sqrt(spec["hidden"] if spec["kind"] in ("gru", "bigru") else spec["in"])
                t[k] = rng.uniform(-bound, bound, s).astype(np.float32)
    return Weights(architecture=validate_architecture(arch), tensors=t)


MODELS = {
    "nsnet2": lambda: architectures.tiny_weights(3, hidden=12),
    "dprnn": lambda: _random_weights(dprnn(bands=6, bins_per_band=28, channels=8, intra_hidden=4, inter_hidden=8, blocks=2), 1),
    "mpt": lambda: _random_weights(mpt(edges=(0, 80, 161), sub_embed=8, sub_hidden=12, full_embed=8, full_hidden=16, fusion=10), 2),
}


def _signal(n, seed):
    rng = np.random.default_rng(seed)
    env = 0.05 + 0.2 * np.abs(np.sin(np.arange(n) / 900.0 + seed))
    return (rng.standard_normal(n) * env).astype(np.float32)


def _enhancer(name, P, sparse=False):
    e = Enhancer(MODELS[name](), update_percent=P, exact=True)
    if sparse:
        e.model = MaskModel(e.weights, update_percent=P, sparse_inputs=True, exact=True)
    return e


def _stream_out(e, x, fused):
    st = e.stream()
    if not fused:
        st._hops.fused = None
    assert (st._hops.fused is not None) == fused
    return np.concatenate([st.process(x[i : i + HOP]) for i in range(0, len(x), HOP)] + [st.flush()])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("P,sparse", [(100, False), (50, False), (25, False), (50, True)])
def test_fused_stream_hop_equals_general_path(name, P, sparse):
    e = _enhancer(name, P, sparse)
    x = _signal(30 * HOP, seed=P)
    fused, general = _stream_out(e, x, True), _stream_out(e, x, False)
    assert np.array_equal(fused, general), f"{name} P={P} sparse={sparse}: max diff {np.abs(fused - general).max()}"
    assert np.array_equal(fused[320 : 320 + len(x)], e.enhance(x, 16000)), f"{name} P={P}: streaming != offline"


@pytest.mark.parametrize("name", ["nsnet2", "dprnn"])
def test_fused_stream_batch_equals_general_path(name):
    """Streams join, skip and leave; full-batch calls take the fused hop, subsets the general path."""
    outs = []
    for fused in (True, False):
        e = _enhancer(name, 50)
        sb = e.stream_batch()
        if not fused:
            sb._hops.fused = None
        ids = [sb.add() for _ in range(3)]
        xs = {i: _signal(12 * HOP, seed=10 + i) for i in ids}
        got = {i: [] for i in ids}
        for t in range(12):
            if t == 5:
                ids.append(sb.add())
                xs[ids[-1]] = _signal(12 * HOP, seed=99)
                got[ids[-1]] = []
            names = [i for i in ids if not (t == 7 and i == ids[0])]  # a subset at t = 7
            out = sb.process({i: xs[i][t * HOP : (t + 1) * HOP] for i in names})
            for i in names:
                got[i].append(out[i])
        outs.append({i: np.concatenate(v) for i, v in got.items()})
    for i in outs[0]:
        assert np.array_equal(outs[0][i], outs[1][i]), f"{name} stream {i}"


def _hop_memory(hidden: int, fused: bool) -> tuple[int, int]:
    """(peak, retained) bytes traced by tracemalloc over 40 steady-state 160-sample hops."""
    e = Enhancer(architectures.tiny_weights(4, hidden=hidden), update_percent=50)
    st = e.stream()
    if not fused:
        st._hops.fused = None
    x = _signal(50 * HOP, seed=5)
    for i in range(10):  # compile, warm the buffers
        st.process(x[i * HOP : (i + 1) * HOP])
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for i in range(10, 50):
            st.process(x[i * HOP : (i + 1) * HOP])
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before, after - before


def test_steady_state_hop_allocates_nothing_that_grows_with_the_model():
    """The fused hop writes into buffers made once: what a hop allocates (its returned samples,
    NumPy's FFT work space, argument checks) does not depend on the model's size, and nothing
    stays allocated but the hop of output in the queue."""
    small, big = _hop_memory(12, True), _hop_memory(400, True)
    assert big[0] - small[0] < 1024, f"fused hop peak grows with the model: {small[0]} -> {big[0]} bytes"
    assert big[1] < 2048 and small[1] < 2048, f"retained after 40 hops: {small[1]}, {big[1]} bytes"


def test_frame_program_refuses_a_state_of_another_batch():
    m = MaskModel(MODELS["nsnet2"](), update_percent=50)
    prog = m.executor.frame_program(2)
    with pytest.raises(ParameterError, match="2"):
        prog.run(m.init_state(3))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_state_take_and_put_move_streams(backend):
    """take(rows) copies streams (fresh ones for -1); running the sub-batch and putting it back
    equals running those streams in the full batch (bit for bit: ``exact=True``, the products in
    column order, whose bits do not depend on the batch size as BLAS's may)."""
    w = MODELS["dprnn"]()
    m = MaskModel(w, update_percent=50, backend=backend, exact=True)
    feats = np.random.default_rng(0).uniform(-8, 0, (6, 3, 161)).astype(np.float32)
    full = m.init_state(3)
    m.forward(feats[:3], full)
    sub = full.take([2, 0])
    y_sub = m.forward(feats[3:, [2, 0]], sub)
    y_full = m.forward(feats[3:], full)
    assert np.array_equal(y_sub, y_full[:, [2, 0]])
    other = m.init_state(3)
    other.put([1, 2], sub)
    F = 6  # bands: stream b owns state rows b·F ... b·F + F - 1
    assert all(np.array_equal(a.h[F:], b.h[np.r_[2 * F : 3 * F, 0:F]]) and not a.h[:F].any() for a, b in zip(other.layers, full.layers))
    fresh = full.take([-1])
    assert all(not s.h.any() for s in fresh.layers)
    with pytest.raises(ParameterError, match="out of range"):
        full.take([3])
    with pytest.raises(ParameterError, match="distinct"):
        full.put([0, 0], sub)


def test_gru_layer_at_a_given_A():
    rng = np.random.default_rng(0)
    H, I = 6, 4
    w = [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    layer = cpu.GRULayer(*w, A=H)
    assert layer.A == H and not layer.dense  # the D-GRU kernel, even at A = H
    dense = cpu.GRULayer(*w)
    x = rng.standard_normal((5, 2, I)).astype(np.float32)
    np.testing.assert_allclose(layer.forward(x, layer.init_state(2)), dense.forward(x, dense.init_state(2)), atol=1e-5)
    assert cpu.GRULayer(*w, A=2).A == 2
    for bad in (0, H + 1, 1.5, True, "2"):
        with pytest.raises(ParameterError, match="A="):
            cpu.GRULayer(*w, A=bad)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_counts(name):
    w = MODELS[name]()
    p = make_plan(w.architecture, update_percent=100)
    # a dense hop reads every tensor of the file once
    assert p.weight_bytes()["dense"] == 4 * sum(t.size for t in w.tensors.values())
    p50 = make_plan(w.architecture, update_percent=50)
    assert p.weight_bytes()["ours"] == p.weight_bytes()["dense"]
    # fewer bytes at P=50, except where the bands' changed columns together cover all H (6 bands
    # of A=4 of H=8 in the small DPRNN: min(H, F·A) = H)
    assert p50.weight_bytes()["ours"] < p.weight_bytes()["ours"] or name == "dprnn"
    assert [s.name for s in p.steps] == [s["name"] for s in w.architecture["layers"]]
    assert all(s.slot == i + 1 for i, s in enumerate(p.steps))


def test_plan_of_nsnet2_by_hand():
    arch = architectures.architecture("nsnet2")
    p = make_plan(arch, update_percent=50, sparse_inputs=True)
    g1, g2 = p.step("gru1"), p.step("gru2")
    assert (g1.A, g1.sparse_input, g2.A, g2.sparse_input) == (200, False, 200, True)
    # recurrent: 200 changed columns of 1200 floats; gru2's input likewise; gru1's input dense
    want = 4 * (161 * 400 + 400) + 4 * (1200 * (400 + 200) + 2400) + 4 * (1200 * (200 + 200) + 2400) + 4 * (400 * 600 + 600 + 600 * 600 + 600 + 600 * 161 + 161)
    assert p.weight_bytes()["ours"] == want


@pytest.mark.parametrize("H", [1, 7, 64, 128, 129, 300])
def test_both_selection_kernels_match_the_reference(H):
    """_top_a picks by counting ranks below H=64 and by a histogram-narrowed quickselect from
    H=64: both give
    reference.top_a's set (ties to the lower index), on values full of ties."""
    from npdgru import reference as ref

    rng = np.random.default_rng(H)
    for trial in range(20):
        u = (rng.integers(-3, 4, H) * 0.25).astype(np.float32) if trial % 2 else rng.random(H).astype(np.float32)
        for A in sorted({1, max(1, H // 4), max(1, H // 2), H - 1 or 1, H}):
            want = ref.top_a(u.astype(np.float64), A)
            buf, idx = np.zeros(H, np.float32), np.full(H, -1, np.int64)
            cpu_kernels._top_a(u, A, buf, idx)
            got = np.zeros(H, bool)
            got[idx[:A]] = True
            assert np.array_equal(got, want) and (np.diff(idx[:A]) > 0).all(), f"H={H} A={A}"
            if A < H:  # the counting kernel on its own, also above the size where _top_a uses it
                idx2 = np.full(H, -1, np.int64)
                cpu_kernels._top_a_by_rank(u, A, buf, idx2)
                assert np.array_equal(idx2[:A], idx[:A]), f"rank kernel H={H} A={A}"


def test_hop_kernels_equal_their_numpy_twins():
    """Each elementwise hop kernel against the NumPy expression of the offline path, bit for bit."""
    from npdgru import stft

    rng = np.random.default_rng(7)
    B = 3
    prev, x = rng.standard_normal((B, HOP)).astype(np.float32), rng.standard_normal((B, HOP)).astype(np.float32)
    frames = np.empty((B, 2 * HOP), np.float32)
    want = np.concatenate((prev, x), axis=1) * stft.WINDOW
    p = prev.copy()
    cpu.hop_frames(p, x, stft.WINDOW, frames)
    assert np.array_equal(frames, want) and np.array_equal(p, x)

    X = np.fft.rfft(frames, axis=1).astype(np.complex64)
    X[0, :5] = 0.0  # silence hits the floor
    p64 = np.empty(X.shape)
    cpu.hop_power(X, stft._LOG_FLOOR, p64)
    feats = np.empty(X.shape, np.float32)
    cpu.hop_features(np.log10(p64), feats)
    assert np.array_equal(feats, stft.log_power(X))

    mask = rng.uniform(-0.2, 1.2, X.shape).astype(np.float32)
    floor = np.float32(10 ** (-80 / 20))
    want_mask = np.clip(mask, floor, np.float32(1.0))
    Y = np.empty_like(X)
    cpu.hop_apply_mask(X, mask, floor, Y)
    assert np.array_equal(mask, want_mask) and np.array_equal(Y.view(np.uint32), (X * want_mask).view(np.uint32))

    y = np.fft.irfft(Y, n=2 * HOP, axis=1).astype(np.float32)
    tail = rng.standard_normal((B, HOP)).astype(np.float32)
    yw = y * stft.WINDOW
    want_out, want_tail = yw[:, :HOP] + tail, yw[:, HOP:].copy()
    out = np.empty((B, HOP), np.float32)
    cpu.hop_overlap_add(y, stft.WINDOW, tail, out)
    assert np.array_equal(out, want_out) and np.array_equal(tail, want_tail)


def test_model_without_a_gru_streams_through_the_per_layer_path():
    """A plan the one-frame program does not cover (no D-GRU step) still streams, offline == streaming."""
    arch = validate_architecture({"name": "lin", "n_features": 161, "layers": [{"kind": "linear", "name": "fc", "in": 161, "out": 161, "activation": "sigmoid"}]})
    e = Enhancer(_random_weights(arch, 3), exact=True)
    st = e.stream()
    assert st._hops.fused is None
    x = _signal(10 * HOP, seed=3)
    y = np.concatenate([st.process(x[i : i + HOP]) for i in range(0, len(x), HOP)] + [st.flush()])
    assert np.array_equal(y[320 : 320 + len(x)], e.enhance(x, 16000))


def test_backend_policy_lives_in_the_executors(monkeypatch):
    """The streaming route, the input accumulators and a corpus task's batching are read from
    the backend's executor (``has_frame_program``, ``sparse_inputs_max_p``, ``batches_files``),
    never decided by the backend's name above it."""
    e = _enhancer("nsnet2", 50)
    assert e.model.executor.has_frame_program and e.stream()._hops.fused is not None
    assert e.model.sparse_inputs and not e.model.executor.batches_files
    ref = Enhancer(MODELS["nsnet2"](), update_percent=50, backend="reference")
    assert not ref.model.executor.has_frame_program and not ref.model.sparse_inputs and ref.stream()._hops.fused is None
    arch = validate_architecture({"name": "lin", "n_features": 161, "layers": [{"kind": "linear", "name": "fc", "in": 161, "out": 161, "activation": "sigmoid"}]})
    lin = MaskModel(_random_weights(arch, 3))
    assert not lin.executor.has_frame_program
    with pytest.raises(ParameterError):  # the property says what the program covers
        lin.executor.frame_program(1)
    monkeypatch.setattr(cpu.Executor, "sparse_inputs_max_p", 0.0)  # a backend where they never pay
    assert not _enhancer("nsnet2", 25).model.sparse_inputs
