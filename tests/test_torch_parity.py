"""P = 100 is exactly a GRU: the cpu kernels and the reference against torch.nn.GRU / GRUCell.

Skipped when torch is absent. Same weights (torch layout is ours: gate order r, z, n, reset after
the recurrent product). Tolerance: both sides are float32 with different summation orders (BLAS
vs our column order) and different tanh/sigmoid (torch's libm vs our rational fit, 3.5e-7), so
they differ by a few 1e-7 per step; measured max over these cases 4.8e-7 (cpu vs torch) and 5.2e-7
(float64 reference vs float32 torch). ATOL = 1e-5 absolute (|h| <= 1, so no relative part is
needed) leaves a factor 20. The float64 check of the reference against torch.float64 has no
float32 in it at all: measured 5e-16, asserted 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npdgru import reference as ref  # noqa: E402
from npdgru.kernels import cpu  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("warm_kernels")]

ATOL = 1e-5
ATOL64 = 1e-12

SHAPES = [  # (H, I, B, T)
    (1, 1, 1, 5),
    (7, 3, 2, 30),
    (32, 16, 3, 50),
    (64, 161, 4, 50),
    (400, 161, 2, 20),  # NSNet2's first GRU
]


@pytest.fixture(scope="module", autouse=True)
def _torch_deterministic():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torch_gru(weight_sets, dtype=torch.float32):
    """torch.nn.GRU with num_layers = len(weight_sets), loaded with our (w_ih, w_hh, b_ih, b_hh)."""
    H, I = weight_sets[0][1].shape[1], weight_sets[0][0].shape[1]
    gru = torch.nn.GRU(I, H, num_layers=len(weight_sets)).to(dtype)
    with torch.no_grad():
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weight_sets):
            for name, value in [("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)]:
                getattr(gru, f"{name}_l{layer}").copy_(torch.from_numpy(np.asarray(value)).to(dtype))
    return gru


def _t(a, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _diff_msg(what, got, want):
    d = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    i = np.unravel_index(int(np.argmax(d)), d.shape)
    return f"{what}: max |diff| {d[i]:.3g} at {tuple(int(v) for v in i)}: ours={float(got[i])!r} torch={float(want[i])!r}"


@pytest.mark.parametrize("H, I, B, T", SHAPES)
def test_cpu_dense_matches_torch_gru(make_gru, H, I, B, T):
    c = make_gru(H, I, seed=H + I, T=T, B=B)  # nonzero h0
    gru = _torch_gru([c.weights])
    with torch.no_grad():
        want, h_n = gru(_t(c.x), _t(c.h0)[None])
    want = want.numpy()
    layer = cpu.GRULayer(*c.weights, update_percent=100)
    state = layer.init_state(B, c.h0)
    got = layer.forward(c.x, state)
    assert np.abs(got - want).max() <= ATOL, _diff_msg(f"cpu dense H={H} I={I} B={B}", got, want)
    assert np.abs(state.h - h_n[0].numpy()).max() <= ATOL
    # the D-GRU kernel at A = H is the same GRU
    got_d, S = cpu.dgru_sequence(c.x, c.h0, *c.weights, H)
    assert S.all()
    assert np.abs(got_d - want).max() <= ATOL, _diff_msg(f"cpu dgru A=H H={H}", got_d, want)


def test_cpu_two_layers_match_torch_two_layer_gru(make_gru):
    H, I, B, T = 48, 20, 3, 40
    c1 = make_gru(H, I, seed=1, T=T, B=B)
    c2 = make_gru(H, H, seed=2, T=T, B=B)
    gru = _torch_gru([c1.weights, c2.weights])
    h0 = np.stack([c1.h0, c2.h0])  # (num_layers, B, H)
    with torch.no_grad():
        want, h_n = gru(_t(c1.x), _t(h0))
    layer1 = cpu.GRULayer(*c1.weights, update_percent=100)
    layer2 = cpu.GRULayer(*c2.weights, update_percent=100)
    s1, s2 = layer1.init_state(B, c1.h0), layer2.init_state(B, c2.h0)
    got = layer2.forward(layer1.forward(c1.x, s1), s2)
    assert np.abs(got - want.numpy()).max() <= ATOL, _diff_msg("cpu 2 layers", got, want.numpy())
    assert np.abs(np.stack([s1.h, s2.h]) - h_n.numpy()).max() <= ATOL


@pytest.mark.parametrize("H, I, B, T", SHAPES[:4])
def test_cpu_streaming_matches_torch_gru_cell(make_gru, H, I, B, T):
    """One frame per call with carried state == torch.nn.GRUCell step by step."""
    c = make_gru(H, I, seed=3 * H + I, T=T, B=B)
    cell = torch.nn.GRUCell(I, H)
    with torch.no_grad():
        for name, value in zip(["weight_ih", "weight_hh", "bias_ih", "bias_hh"], c.weights):
            getattr(cell, name).copy_(_t(value))
    layer = cpu.GRULayer(*c.weights, update_percent=100)
    state = layer.init_state(B, c.h0)
    h = _t(c.h0)
    for t in range(T):
        with torch.no_grad():
            h = cell(_t(c.x[t]), h)
        got = layer.forward(c.x[t : t + 1], state)[0]
        assert np.abs(got - h.numpy()).max() <= ATOL, _diff_msg(f"cpu streaming step {t} H={H}", got, h.numpy())


@pytest.mark.parametrize("H, I, B, T", SHAPES)
def test_reference_matches_torch(make_gru, H, I, B, T):
    c = make_gru(H, I, seed=7 * H + I, T=T, B=B)
    x64, h064 = c.x.astype(np.float64), c.h0.astype(np.float64)
    # float64 on both sides: the same equations, only summation order differs
    gru64 = _torch_gru([c.weights64], torch.float64)
    with torch.no_grad():
        want64 = gru64(_t(x64, torch.float64), _t(h064, torch.float64)[None])[0].numpy()
    got64 = ref.gru_sequence(x64, h064, *c.weights64)
    assert np.abs(got64 - want64).max() <= ATOL64, _diff_msg(f"reference float64 H={H}", got64, want64)
    # the D-GRU reference at A = H is the dense GRU too
    got_d, S = ref.dgru_sequence(x64, h064, *c.weights64, H)
    assert S.all() and np.abs(got_d - want64).max() <= ATOL64
    # float64 reference vs float32 torch
    gru = _torch_gru([c.weights])
    with torch.no_grad():
        want = gru(_t(c.x), _t(c.h0)[None])[0].numpy()
    assert np.abs(got64 - want).max() <= ATOL, _diff_msg(f"reference vs torch float32 H={H}", got64, want)
