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


# ------------------------------------------------------------------------ the other gates in the torch twin
#
# The training twin (npdgru.train.torch_model) of the threshold and delta gates against the float64
# NumPy reference: both float64, the same equations, only summation orders differ (measured below
# 1e-15 here), so ATOL64 = 1e-12. A decision at the threshold could go either way between the two
# summation orders, which random float64 data does not meet.


def _layer64(H, I, B, T, seed):
    rng = np.random.default_rng(seed)
    k = 2.0 / np.sqrt(H)
    w = [rng.uniform(-k, k, s) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    return w, rng.standard_normal((T, B, I)), rng.uniform(-0.5, 0.5, (B, H))


def _twin(w, x, h0, **gate):
    from npdgru.train import torch_model as tm

    tw = [torch.from_numpy(a) for a in w]
    y = tm.dgru_forward(torch.from_numpy(x).transpose(0, 1), torch.from_numpy(h0), *tw, **gate)
    return y.detach().transpose(0, 1).numpy()


@pytest.mark.parametrize("H, I, B, T", [(1, 2, 2, 8), (9, 4, 3, 15), (40, 12, 2, 20)])
@pytest.mark.parametrize("theta", [0.0, 0.4, 0.55, 0.99])
def test_torch_threshold_gate_matches_reference(H, I, B, T, theta):
    w, x, h0 = _layer64(H, I, B, T, seed=H + int(100 * theta))
    want, S = ref.tgru_sequence(x, h0, *w, theta)
    got = _twin(w, x, h0, gate="threshold", theta=theta)
    assert np.abs(got - want).max() <= ATOL64
    prev = np.concatenate([h0[None], got[:-1]])
    np.testing.assert_array_equal(got[~S], prev[~S])  # outside S: carried bit for bit


@pytest.mark.parametrize("H, I, B, T", [(1, 2, 2, 8), (9, 4, 3, 15), (40, 12, 2, 20)])
@pytest.mark.parametrize("theta, theta_x", [(0.0, None), (0.05, None), (0.2, 0.6), (1e9, None)])
def test_torch_delta_gate_matches_reference(H, I, B, T, theta, theta_x):
    w, x, h0 = _layer64(H, I, B, T, seed=3 * H + int(10 * theta))
    want, _, _ = ref.delta_gru_sequence(x, h0, *w, theta, theta_x)
    got = _twin(w, x, h0, gate="delta", theta=theta, theta_x=theta_x)
    assert np.abs(got - want).max() <= ATOL64


def test_torch_threshold_backward_is_autograd_of_the_same_mask():
    from npdgru.train import torch_model as tm

    g = torch.Generator().manual_seed(0)
    B, T, H = 3, 7, 5
    args = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((B, T, 3 * H), (B, H), (3 * H, H), (3 * H,))]
    y1, y2 = tm.dgru_layer(*args, H, 0.5), tm.dgru_layer_autograd(*args, H, 0.5)
    assert torch.equal(y1, y2) and 0 < int((y1 != torch.cat([args[1][:, None], y1[:, :-1]], 1)).sum()) < B * T * H
    grad = torch.randn(y1.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(y1, args, grad), torch.autograd.grad(y2, args, grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_delta_gradient_at_zero_threshold_is_the_gru_gradient():
    """Straight-through: at Θ = 0 (x̂ = x, ĥ = h) the delta GRU's gradients are torch.nn.GRU's."""
    from npdgru.train import torch_model as tm

    w, x, h0 = _layer64(6, 3, 2, 9, seed=4)
    tw = [torch.from_numpy(a).requires_grad_() for a in w]
    xt = torch.from_numpy(x).transpose(0, 1).contiguous().requires_grad_()
    y = tm.delta_gru_layer(xt, torch.from_numpy(h0), *tw, 0.0)
    gru = _torch_gru([w], torch.float64)
    y_ref, _ = gru(xt.transpose(0, 1), torch.from_numpy(h0)[None])
    grad = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(y, [xt] + tw, grad)
    want = torch.autograd.grad(y_ref.transpose(0, 1), [xt] + [getattr(gru, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate, params", [("threshold", {"theta": 0.5}), ("delta", {"theta": 0.05, "theta_x": 0.3})])
def test_graphnet_with_a_gate_matches_reference_forward(gate, params):
    """The training model of a gated architecture against reference.forward on its plan, float64."""
    from npdgru.architectures import tiny_weights
    from npdgru.plan import make_plan
    from npdgru.train.torch_model import GraphNet
    from npdgru.weights import Weights

    w = tiny_weights(seed=2, hidden=10)
    arch = dict(w.architecture, layers=[dict(layer, gate=gate, **params) if layer["kind"] == "gru" else layer for layer in w.architecture["layers"]])
    net = GraphNet.from_weights(Weights(architecture=arch, tensors=w.tensors)).double().eval()
    feats = np.random.default_rng(0).uniform(-8, 2, (30, 161))
    with torch.no_grad():
        got = net(torch.from_numpy(feats)[None], 50.0)[0].numpy()
    want = ref.forward(make_plan(arch, update_percent=50).as_data(), w.tensors, feats)
    assert np.abs(got - want).max() <= ATOL64
