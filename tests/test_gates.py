"""The gates of a GRU layer: top-A (the D-GRU), a threshold select gate and a delta network.

The reference (``npdgru.reference``, float64) is checked against properties that follow from the
equations alone: the threshold gate selects between 0 and H neurons, below every u it is the
dense GRU, above every u the state never changes, a neuron outside S keeps its bits, u = θ is
not selected; the delta GRU at Θ = 0 is the dense GRU (against ``reference.gru_sequence``) and
with a Θ larger than every change it never propagates anything, and its memories W x̂ + b are
the accumulated deltas of the papers (against a plain-Python accumulator written here).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npdgru import reference as ref

TOL64 = 1e-12

shapes = dict(H=st.integers(1, 9), I=st.integers(1, 6), B=st.integers(1, 3), T=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))


def _u(x, h, W):
    """The paper's update gate u = 1 − z for the step from h on x (float64)."""
    (_, i_z, _), (_, h_z, _) = ref._gates(x, h, *W)
    return 1.0 - ref.sigmoid(i_z + h_z)


# ------------------------------------------------------------------------ threshold select gate


@settings(deadline=None, max_examples=60)
@given(theta=st.floats(-0.5, 1.5, allow_nan=False), **shapes)
def test_threshold_selects_u_above_theta_and_keeps_the_rest(make_gru, H, I, B, T, seed, theta):
    c = make_gru(H, I, seed=seed, T=T, B=B)
    W, x, h0 = c.weights64, c.x.astype(np.float64), c.h0.astype(np.float64)
    out, S = ref.tgru_sequence(x, h0, *W, theta)
    assert S.shape == (T, B, H) and S.dtype == bool
    prev = h0
    for t in range(T):
        u = _u(x[t], prev, W)
        np.testing.assert_array_equal(S[t], u > theta)  # the count is anything in 0..H
        assert ((S[t].sum(-1) >= 0) & (S[t].sum(-1) <= H)).all()
        keep = ~S[t]  # outside S: the very same bits
        assert np.array_equal(out[t][keep].view(np.uint64), prev[keep].view(np.uint64))
        # inside S: eq. (5) on the selected rows, as the top-A D-GRU computes it
        want = ref.dgru_step(x[t], prev, *W, H)[0]
        np.testing.assert_array_equal(out[t][S[t]], want[S[t]])
        prev = out[t]


@settings(deadline=None, max_examples=40)
@given(**shapes)
def test_threshold_below_every_u_is_the_dense_gru(make_gru, H, I, B, T, seed):
    c = make_gru(H, I, seed=seed, T=T, B=B)
    W, x, h0 = c.weights64, c.x.astype(np.float64), c.h0.astype(np.float64)
    out, S = ref.tgru_sequence(x, h0, *W, -1.0)  # u = 1 − σ(·) > 0 > −1
    assert S.all()
    # bit for bit the D-GRU at A = H (the same formula h + u (n − h)), and the dense GRU within rounding
    np.testing.assert_array_equal(out, ref.dgru_sequence(x, h0, *W, H)[0])
    np.testing.assert_allclose(out, ref.gru_sequence(x, h0, *W), rtol=0, atol=TOL64)


@settings(deadline=None, max_examples=40)
@given(theta=st.sampled_from([1.0, 2.0, np.inf]), **shapes)
def test_threshold_above_every_u_never_changes_the_state(make_gru, H, I, B, T, seed, theta):
    c = make_gru(H, I, seed=seed, T=T, B=B, scale=3.0)
    out, S = ref.tgru_sequence(c.x.astype(np.float64), c.h0.astype(np.float64), *c.weights64, theta)
    assert not S.any()
    assert np.array_equal(out, np.broadcast_to(c.h0.astype(np.float64), out.shape))


def test_threshold_equal_to_u_is_not_selected():
    u = np.array([[0.25, 0.5, 0.75, 0.5]])
    np.testing.assert_array_equal(ref.threshold_select(u, 0.5), [[False, False, True, False]])
    np.testing.assert_array_equal(ref.threshold_select(u, 0.25), [[False, True, True, True]])
    # the same in a step: a neuron whose u is exactly θ keeps its value
    H, I = 2, 1
    W = (np.zeros((3 * H, I)), np.zeros((3 * H, H)), np.zeros(3 * H), np.zeros(3 * H))  # z = σ(0) = 0.5: u = 0.5
    h = np.array([[0.3, -0.2]])
    h1, S = ref.tgru_step(np.ones((1, I)), h, *W, 0.5)
    assert not S.any() and np.array_equal(h1, h)
    h1, S = ref.tgru_step(np.ones((1, I)), h, *W, np.nextafter(0.5, 0.0))
    assert S.all() and np.allclose(h1, h + 0.5 * (0.0 - h))  # n = tanh(0) = 0


# ------------------------------------------------------------------------ delta network


def _naive_delta_gru(x, h0, w_ih, w_hh, b_ih, b_hh, theta, theta_x):
    """The papers' delta GRU with explicit memories, one stream, plain Python floats::

    M_x = b_ih, M_h = b_hh, x̂ = ĥ = 0; per step: for each entry whose change exceeds its
    threshold, add its weight column times the change to the memory and remember the value.
    """
    I, H = len(x[0]), len(h0)
    Mx, Mh = list(b_ih), list(b_hh)
    xh, hh, h = [0.0] * I, [0.0] * H, list(h0)
    out = []
    for xt in x:
        for j in range(I):
            d = xt[j] - xh[j]
            if abs(d) > theta_x:
                xh[j] = xt[j]
                for q in range(3 * H):
                    Mx[q] += w_ih[q][j] * d
        for j in range(H):
            d = h[j] - hh[j]
            if abs(d) > theta:
                hh[j] = h[j]
                for q in range(3 * H):
                    Mh[q] += w_hh[q][j] * d
        new = []
        for i in range(H):
            r = 1.0 / (1.0 + np.exp(-(Mx[i] + Mh[i])))
            z = 1.0 / (1.0 + np.exp(-(Mx[H + i] + Mh[H + i])))
            n = np.tanh(Mx[2 * H + i] + r * Mh[2 * H + i])
            new.append((1.0 - z) * n + z * h[i])
        h = new
        out.append(list(h))
    return np.array(out)


@settings(deadline=None, max_examples=40)
@given(theta=st.sampled_from([0.0, 0.01, 0.1, 0.5]), theta_x=st.sampled_from([None, 0.0, 0.3, 1.0]), **shapes)
def test_delta_gru_is_the_papers_accumulated_memories(make_gru, H, I, B, T, seed, theta, theta_x):
    c = make_gru(H, I, seed=seed, T=T, B=B)
    W, x, h0 = c.weights64, c.x.astype(np.float64), c.h0.astype(np.float64)
    out, sent_h, sent_x = ref.delta_gru_sequence(x, h0, *W, theta, theta_x)
    assert sent_h.shape == (T, B, H) and sent_x.shape == (T, B, I)
    Wl = [w.tolist() for w in W]
    for b in range(B):
        want = _naive_delta_gru(x[:, b].tolist(), h0[b].tolist(), *Wl, theta, theta if theta_x is None else theta_x)
        np.testing.assert_allclose(out[:, b], want, rtol=0, atol=1e-10, err_msg=f"stream {b}")


@settings(deadline=None, max_examples=40)
@given(**shapes)
def test_delta_at_zero_threshold_is_the_dense_gru(make_gru, H, I, B, T, seed):
    c = make_gru(H, I, seed=seed, T=T, B=B)
    W, x, h0 = c.weights64, c.x.astype(np.float64), c.h0.astype(np.float64)
    out, sent_h, sent_x = ref.delta_gru_sequence(x, h0, *W, 0.0)
    np.testing.assert_allclose(out, ref.gru_sequence(x, h0, *W), rtol=0, atol=TOL64)
    assert sent_x.any() or not x.any()


@settings(deadline=None, max_examples=40)
@given(**shapes)
def test_delta_with_a_huge_threshold_propagates_nothing(make_gru, H, I, B, T, seed):
    """Nothing is propagated: the memories stay at the biases, so every step sees x̂ = ĥ = 0."""
    c = make_gru(H, I, seed=seed, T=T, B=B)
    W, x, h0 = c.weights64, c.x.astype(np.float64), c.h0.astype(np.float64)
    out, sent_h, sent_x = ref.delta_gru_sequence(x, h0, *W, 1e9)
    assert not sent_h.any() and not sent_x.any()
    # with x̂ = ĥ = 0 the gates are constants of the biases: h' = (1 − z0) n0 + z0 h
    b_ih, b_hh = W[2], W[3]
    z0 = ref.sigmoid(b_ih[H : 2 * H] + b_hh[H : 2 * H])
    n0 = np.tanh(b_ih[2 * H :] + ref.sigmoid(b_ih[:H] + b_hh[:H]) * b_hh[2 * H :])
    h = h0
    for t in range(T):
        h = (1.0 - z0) * n0 + z0 * h
        np.testing.assert_allclose(out[t], h, rtol=0, atol=TOL64)


def test_delta_change_equal_to_theta_is_not_sent():
    x_hat, sent = ref.delta_encode(np.array([1.5, 0.2, -0.5]), np.array([1.0, 0.0, 0.0]), 0.5)
    np.testing.assert_array_equal(sent, [False, False, False])
    np.testing.assert_array_equal(x_hat, [1.0, 0.0, 0.0])
    x_hat, sent = ref.delta_encode(np.array([1.5, 0.2, -0.6]), np.array([1.0, 0.0, 0.0]), 0.5)
    np.testing.assert_array_equal(sent, [False, False, True])
    np.testing.assert_array_equal(x_hat, [1.0, 0.0, -0.6])


def test_delta_input_threshold_is_its_own():
    """Θ_x applies to the input, Θ to the state: a huge Θ_x freezes x̂ at 0 only."""
    rng = np.random.default_rng(0)
    H, I, T = 5, 3, 6
    W = tuple(rng.uniform(-0.5, 0.5, s) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)])
    x = rng.standard_normal((T, 1, I))
    out, sent_h, sent_x = ref.delta_gru_sequence(x, None, *W, 0.0, 1e9)
    assert not sent_x.any() and sent_h[1:].any()
    np.testing.assert_allclose(out, ref.gru_sequence(np.zeros_like(x), None, *W), rtol=0, atol=TOL64)


@pytest.mark.parametrize("gate", ref.GATES)
def test_forward_runs_each_gate_on_a_plan_step(gate):
    """reference.forward dispatches on the step's gate (a one-layer plan written by hand)."""
    rng = np.random.default_rng(1)
    I = H = 4
    W = {f"g.{n}": rng.uniform(-0.5, 0.5, s) for n, s in [("weight_ih", (3 * H, I)), ("weight_hh", (3 * H, H)), ("bias_ih", (3 * H,)), ("bias_hh", (3 * H,))]}
    step = {"name": "g", "kind": "gru", "inputs": ["features"], "bands": 1, "size_in": I, "hidden": H, "A": 2, "dense": False,
            "gate": gate, "theta": 0.3, "theta_x": 0.1}
    x = rng.standard_normal((7, I))
    y = ref.forward({"n_features": I, "steps": [step]}, W, x)
    Wt = tuple(W[f"g.{n}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    want = {"top-a": lambda: ref.dgru_sequence(x[:, None], None, *Wt, 2)[0],
            "threshold": lambda: ref.tgru_sequence(x[:, None], None, *Wt, 0.3)[0],
            "delta": lambda: ref.delta_gru_sequence(x[:, None], None, *Wt, 0.3, 0.1)[0]}[gate]()
    np.testing.assert_array_equal(y, want[:, 0])


# ------------------------------------------------------------------------ the architecture field


def _with_gate(arch, gate, **params):
    """A copy of ``arch`` whose GRU layers along time have ``gate`` and its parameters."""
    import copy

    arch = copy.deepcopy(arch)
    for layer in arch["layers"]:
        if layer["kind"] == "gru":
            layer.update(gate=gate, **params)
    return arch


GATE_PARAMS = {"threshold": {"theta": 0.5}, "delta": {"theta": 0.05, "theta_x": 0.2}}


def test_a_gru_without_a_gate_is_top_a_and_format_1():
    from npdgru.architectures import architecture
    from npdgru.plan import format_version_of, make_plan

    arch = architecture("nsnet2")
    p = make_plan(arch, update_percent=50)
    assert [s.gate for s in p.state_steps] == ["top-a", "top-a"] and p.step("gru1").A == 200
    assert format_version_of(arch) == 1


@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_a_variable_gate_resolves_to_its_thresholds_and_the_dense_bound(gate):
    from npdgru.architectures import architecture
    from npdgru.plan import format_version_of, make_plan

    arch = _with_gate(architecture("nsnet2"), gate, **GATE_PARAMS[gate])
    dense = make_plan(architecture("nsnet2"), update_percent=100)
    for P in (100, 25):  # P is not read by these gates
        p = make_plan(arch, update_percent=P, sparse_inputs=True)
        g1, g2 = p.step("gru1"), p.step("gru2")
        assert (g1.gate, g1.theta, g1.A, g1.dense, g2.sparse_input) == (gate, GATE_PARAMS[gate]["theta"], 400, False, False)
        assert g1.theta_x == (0.2 if gate == "delta" else 0.0)
        assert p.macs() == dense.macs()  # the plan counts the dense bound; a run measures the work
    assert format_version_of(arch) == 2  # a format-1 reader would run it as top-A: refused as newer


@pytest.mark.parametrize("layer_update, message", [
    ({"gate": "topk"}, "gate 'topk' is not one of"),
    ({"gate": "threshold"}, "needs 'theta' in \\[0, 1\\)"),
    ({"gate": "threshold", "theta": 1.0}, "needs 'theta' in \\[0, 1\\)"),
    ({"gate": "threshold", "theta": True}, "needs 'theta'"),
    ({"gate": "threshold", "theta": "0.5"}, "needs 'theta'"),
    ({"gate": "threshold", "theta": 0.5, "theta_x": 0.1}, "takes no 'theta_x'"),
    ({"gate": "delta"}, "needs 'theta' a number >= 0"),
    ({"gate": "delta", "theta": -0.1}, "needs 'theta' a number >= 0"),
    ({"gate": "delta", "theta": float("nan")}, "needs 'theta' a number >= 0"),
    ({"gate": "delta", "theta": 0.1, "theta_x": -1}, "needs 'theta_x' a number >= 0"),
    ({"theta": 0.5}, "top-a gate takes no 'theta'"),
])
def test_bad_gates_are_refused_with_the_file_and_layer(layer_update, message):
    from npdgru.architectures import architecture
    from npdgru.errors import WeightsError
    from npdgru.plan import validate_architecture

    arch = architecture("nsnet2")
    arch["layers"][1].update(layer_update)
    with pytest.raises(WeightsError, match=f"model.safetensors: architecture layer gru1: .*{message}"):
        validate_architecture(arch, "model.safetensors")


@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_a_gated_model_file_round_trips_and_describes_its_gate(tmp_path, gate):
    from npdgru.architectures import tiny_weights
    from npdgru.weights import load_weights, save_weights

    w = tiny_weights(hidden=6)
    arch = _with_gate(w.architecture, gate, **GATE_PARAMS[gate])
    save_weights(tmp_path / "m.safetensors", w.tensors, architecture=arch)
    back = load_weights(tmp_path / "m.safetensors")
    assert back.architecture == arch and back.metadata["format_version"] == "2"
    assert {"threshold": "threshold gate u > 0.5", "delta": "delta gate |change| > 0.05 (input 0.2)"}[gate] in back.describe()


# ------------------------------------------------------------------------ cpu kernels vs the reference
#
# Tolerances as tests/test_kernels_cpu.py (its docstring): float32 kernels against the float64
# reference within ATOL + RTOL·|ref| per step; a decision (u > θ, |Δ| > Θ) whose reference value
# lies within MARGIN of the threshold may go either way in float32 and is left out of the set
# comparison. Trajectories are teacher forced: each reference step starts from the kernel's own
# previous state (h, and for the delta gate x̂ and ĥ), one frame per call.

ATOL, RTOL, MARGIN = 2e-5, 1e-4, 1e-5
KERNEL_CASES = [  # (H, I, B, T)
    (1, 3, 2, 12),
    (7, 5, 3, 20),
    (64, 20, 2, 25),
    (130, 40, 1, 15),
]


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = ~(np.abs(got - want) <= ATOL + RTOL * np.abs(want))
    assert not bad.any(), f"{what}: {int(bad.sum())} entries differ, max {np.abs(got - want).max():.3g}"


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("refresh", [1, 128])
@pytest.mark.parametrize("H, I, B, T", KERNEL_CASES)
@pytest.mark.parametrize("theta", [0.3, 0.62])
def test_cpu_threshold_matches_the_reference_step_by_step(make_gru, H, I, B, T, theta, refresh):
    from npdgru.kernels import cpu

    c = make_gru(H, I, seed=H * 31 + I + B, T=T, B=B, scale=2.0)
    W64 = c.weights64
    layer = cpu.GRULayer(*c.weights, gate="threshold", theta=theta, refresh_every=refresh, exact=True)
    state = layer.init_state(B, c.h0)
    counts = []
    for t in range(T):
        prev = state.h.astype(np.float64)
        S = np.zeros((1, B, H), bool)
        got = layer.forward(c.x[t : t + 1], state, selected=S)[0]
        want, S_ref = ref.tgru_step(c.x[t].astype(np.float64), prev, *W64, theta)
        safe = np.abs(_u(c.x[t].astype(np.float64), prev, W64) - theta) >= MARGIN
        np.testing.assert_array_equal(S[0][safe], S_ref[safe], err_msg=f"selection t={t}")
        _close(got, want, f"h t={t}")
        assert np.array_equal(_bits(got[~S[0]]), _bits(prev[~S[0]].astype(np.float32)))  # untouched bit for bit
        counts.append(S.sum())
    assert min(counts) < B * H  # the count varies (not always every neuron)
    # offline (exact: column order) == one frame per call, bit for bit; rows alone == in a batch
    out, S_off = cpu.tgru_sequence(c.x, c.h0, *c.weights, theta, refresh_every=refresh, exact=True)
    assert np.array_equal(_bits(out[-1]), _bits(state.h))
    for b in range(B):
        alone, S_b = cpu.tgru_sequence(c.x[:, b : b + 1], c.h0[b : b + 1], *c.weights, theta, refresh_every=refresh, exact=True)
        assert np.array_equal(_bits(alone[:, 0]), _bits(out[:, b])) and np.array_equal(S_b[:, 0], S_off[:, b])


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("refresh", [1, 3, 128])
@pytest.mark.parametrize("H, I, B, T", KERNEL_CASES)
@pytest.mark.parametrize("theta, theta_x", [(0.0, 0.0), (0.02, None), (0.1, 0.5)])
def test_cpu_delta_matches_the_reference_step_by_step(make_gru, H, I, B, T, theta, theta_x, refresh):
    from npdgru.kernels import cpu

    c = make_gru(H, I, seed=H * 17 + I + B, T=T, B=B, scale=2.0)
    W64 = c.weights64
    thx = theta if theta_x is None else theta_x
    layer = cpu.GRULayer(*c.weights, gate="delta", theta=theta, theta_x=theta_x, refresh_every=refresh, exact=True)
    state = layer.init_state(B, c.h0)
    sent = compared = 0
    for t in range(T):
        prev, xh, hh = (a.astype(np.float64) for a in (state.h, state.xprev, state.hhat))
        S = np.zeros((1, B, H), bool)
        got = layer.forward(c.x[t : t + 1], state, selected=S)[0]
        want, xh_ref, hh_ref, sx_ref, sh_ref = ref.delta_gru_step(c.x[t].astype(np.float64), prev, xh, hh, *W64, theta, theta_x)
        safe_h = np.abs(np.abs(prev - hh) - theta) >= MARGIN
        np.testing.assert_array_equal(S[0][safe_h], sh_ref[safe_h], err_msg=f"propagated state t={t}")
        if (np.abs(np.abs(c.x[t] - xh) - thx) >= MARGIN).all() and safe_h.all():  # no decision at the margin
            _close(state.xprev, xh_ref, f"x_hat t={t}")
            _close(state.hhat, hh_ref, f"h_hat t={t}")
            _close(got, want, f"h t={t}")
            compared += 1
        sent += S.sum()
    assert compared >= T // 2, f"only {compared} of {T} steps free of decisions at the margin"
    assert layer.mean_work(state)[0] == pytest.approx(sent / (B * T))
    # offline (exact: the memories in the kernel) == one frame per call, bit for bit
    out, _ = cpu.delta_gru_sequence(c.x, c.h0, *c.weights, theta, theta_x, refresh_every=refresh, exact=True)
    assert np.array_equal(_bits(out[-1]), _bits(state.h))
    # offline through BLAS (the x̂ scan, then one product): within rounding of the exact run when
    # no state decision sits at a threshold (Θ = 0)
    if theta == 0.0:
        fast, _ = cpu.delta_gru_sequence(c.x, c.h0, *c.weights, theta, theta_x, refresh_every=refresh)
        _close(fast, out, "BLAS input product vs in-kernel memory")
        want = ref.gru_sequence(c.x.astype(np.float64), c.h0.astype(np.float64), *W64) if thx == 0.0 else None
        if want is not None:
            _close(fast, want, "delta at Θ = 0 vs the dense GRU")


@pytest.mark.usefixtures("warm_kernels")
def test_cpu_delta_with_a_huge_threshold_reads_no_column():
    from npdgru.kernels import cpu

    rng = np.random.default_rng(3)
    H, I, B, T = 16, 8, 2, 10
    W = tuple(rng.uniform(-0.3, 0.3, s).astype(np.float32) for s in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)])
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    layer = cpu.GRULayer(*W, gate="delta", theta=1e9)
    state = layer.init_state(B)
    S = np.zeros((T, B, H), bool)
    out = layer.forward(x, state, selected=S)
    assert not S.any() and layer.mean_work(state) == (0.0, 0.0)
    want, _, _ = ref.delta_gru_sequence(x.astype(np.float64), None, *(w.astype(np.float64) for w in W), 1e9)
    _close(out, want, "nothing propagated")


def test_cpu_gate_arguments_are_checked():
    from npdgru.errors import ParameterError
    from npdgru.kernels import cpu

    W = (np.zeros((6, 1), np.float32), np.zeros((6, 2), np.float32), np.zeros(6, np.float32), np.zeros(6, np.float32))
    with pytest.raises(ParameterError, match="gate 'top-k' is not one of"):
        cpu.GRULayer(*W, gate="top-k")
    with pytest.raises(ParameterError, match="theta=nan must be a finite number"):
        cpu.GRULayer(*W, gate="threshold", theta=float("nan"))
    with pytest.raises(ParameterError, match="sparse input"):
        cpu.GRULayer(*W, gate="delta", theta=0.1, sparse_input=True)


# ------------------------------------------------------------------------ a gated model end to end


def _gated_weights(gate):
    from npdgru.architectures import tiny_weights
    from npdgru.weights import Weights

    w = tiny_weights(seed=5, hidden=12)
    return Weights(architecture=_with_gate(w.architecture, gate, **GATE_PARAMS.get(gate, {})), tensors=w.tensors)


def _signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_a_gated_model_runs_on_cpu_as_on_the_reference(gate):
    from npdgru import stft
    from npdgru.model import MaskModel

    w = _gated_weights(gate)
    F = stft.log_power(stft.stft(_signal(16000)))[:, None, :]
    masks = {}
    for backend in ("cpu", "reference"):
        m = MaskModel(w, update_percent=50, backend=backend)  # P is not read by these gates
        masks[backend] = m.forward(F, m.init_state(1))
    want = ref.forward(MaskModel(w, backend="reference").plan.as_data(), w.tensors, F[:, 0])
    np.testing.assert_allclose(masks["reference"][:, 0], want, rtol=0, atol=1e-6)  # float32 out of float64
    assert np.abs(masks["cpu"] - masks["reference"]).max() <= 1e-4
    m = MaskModel(w, update_percent=50, backend="cpu")
    state = m.init_state(1)
    m.forward(F, state)
    layer = m.executor.gru_layers[0]
    assert 0.0 < layer.mean_work(state.layers[0])[0] < 12  # some columns, not every one, per step


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_a_gated_model_streams_as_it_runs_offline(gate):
    from npdgru.enhance import Enhancer

    x = _signal(40 * 160, seed=1)
    for exact in (True, False):
        e = Enhancer(_gated_weights(gate), exact=exact)
        st = e.stream()
        assert st._hops.fused is None  # the one-frame program covers top-A steps only
        y = np.concatenate([st.process(x[i : i + 160]) for i in range(0, len(x), 160)] + [st.flush()])
        off = e.enhance(x, 16000)
        if exact:  # the same kernels in the same column order: the same bits
            assert np.array_equal(y[320 : 320 + len(x)], off)
        else:  # BLAS input products offline (tests/test_model.py's tolerance)
            assert np.abs(y[320 : 320 + len(x)] - off).max() <= 1e-4


def test_cuda_refuses_a_gated_step_by_name():
    """The runner table checks the backend's GRULayer.gates (cuda's runs top-A only)."""
    from npdgru.errors import ParameterError
    from npdgru.kernels import reference as refbackend
    from npdgru.plan import make_plan

    w = _gated_weights("delta")

    class NoGates(refbackend.GRULayer):
        gates = ("top-a",)

    class Ex(refbackend.Executor):
        backend = "topa-only"
        GRULayer = NoGates

    with pytest.raises(ParameterError, match="backend 'topa-only' cannot run step gru1: its 'delta' gate runs on the cpu and reference"):
        Ex(make_plan(w.architecture), w.tensors)


# ------------------------------------------------------------------------ the command line


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate", ["top-a", "threshold", "delta"])
def test_npdgru_enhance_and_info_run_a_model_with_each_gate(tmp_path, capsys, gate):
    """`npdgru enhance` on a tiny model file with the gate: the output is the Enhancer's (the same
    plan and kernels), and the summary line says which gate runs; `npdgru info` names it."""
    import soundfile as sf

    from npdgru.cli import main
    from npdgru.enhance import Enhancer
    from npdgru.weights import save_weights

    w = _gated_weights(gate)
    model = tmp_path / f"{gate}.safetensors"
    save_weights(model, w.tensors, architecture=w.architecture)
    x = _signal(8000, seed=2)
    sf.write(tmp_path / "in.wav", x, 16000, subtype="FLOAT")
    out = tmp_path / "out.wav"
    assert main(["enhance", str(tmp_path / "in.wav"), "-o", str(out), "--weights", str(model), "-P", "50"]) == 0
    stdout = capsys.readouterr().out
    y, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and np.array_equal(y, Enhancer(str(model), update_percent=50).enhance(x, 16000))
    if gate == "top-a":
        assert "50.0% of GRU neurons updated per frame (P=50)" in stdout
    else:
        assert f"GRU gate {gate} (the neurons updated vary per frame)" in stdout
        assert not np.array_equal(y, Enhancer(w.__class__(architecture=_gated_weights("top-a").architecture, tensors=w.tensors), update_percent=50).enhance(x, 16000))
    assert main(["info", str(model)]) == 0
    info = capsys.readouterr().out
    assert ("gate" in info) == (gate != "top-a")


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_a_stream_batch_with_a_gate_keeps_each_stream_as_alone(gate):
    """Streams join and skip a hop (a subset runs on moved state: take/put carry ĥ and x̂): each
    stream's output is the one it gets alone (exact products: the same bits)."""
    from npdgru.enhance import Enhancer

    e = Enhancer(_gated_weights(gate), exact=True)
    sb = e.stream_batch()
    ids = [sb.add(), sb.add()]
    xs = {i: _signal(14 * 160, seed=20 + k) for k, i in enumerate(ids)}
    got = {i: [] for i in ids}
    for t in range(14):
        names = [i for i in ids if not (t == 6 and i == ids[0])]  # stream 0 skips hop 6
        out = sb.process({i: xs[i][t * 160 : (t + 1) * 160] for i in names})
        for i in names:
            got[i].append(out[i])
    for k, i in enumerate(ids):
        st = e.stream()
        chunks = [xs[i][t * 160 : (t + 1) * 160] for t in range(14) if not (t == 6 and k == 0)]
        alone = np.concatenate([st.process(c) for c in chunks])
        assert np.array_equal(np.concatenate(got[i]), alone), f"stream {k}"


@pytest.mark.usefixtures("warm_kernels")
def test_a_model_may_mix_gates_and_p_sets_only_its_top_a_layers():
    """gru1 delta, gru2 top-A: P resolves gru2's A only, and gru2 keeps no sparse input
    accumulator on a delta layer's state (every entry of it changes each frame)."""
    import copy

    from npdgru import stft
    from npdgru.model import MaskModel
    from npdgru.plan import make_plan
    from npdgru.weights import Weights

    w = _gated_weights("top-a")
    arch = copy.deepcopy(w.architecture)
    arch["layers"][1].update(gate="delta", theta=0.05)
    p = make_plan(arch, update_percent=25, sparse_inputs=True)
    assert (p.step("gru1").gate, p.step("gru1").A, p.step("gru2").gate, p.step("gru2").A, p.step("gru2").sparse_input) == ("delta", 12, "top-a", 3, False)
    mixed = Weights(architecture=arch, tensors=w.tensors)
    F = stft.log_power(stft.stft(_signal(8000, seed=4)))[:, None, :]
    got = MaskModel(mixed, update_percent=25, backend="cpu")
    want = MaskModel(mixed, update_percent=25, backend="reference")
    assert np.abs(got.forward(F, got.init_state(1)) - want.forward(F, want.init_state(1))).max() <= 1e-4


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate, params", [("threshold", {"theta": 0.55}), ("delta", {"theta": 0.15, "theta_x": 0.5})])
def test_cpu_gate_memories_do_not_drift_over_long_runs(make_gru, gate, params):
    """1500 steps at the default refresh period: the float32 memories (accumulated from changed
    columns, refreshed every 128 steps) keep every teacher-forced step within the parity tolerance
    of the float64 reference started from the kernel's own state (the bound of
    tests/test_kernels_drift.py for the top-A gate). The work is partial, so columns accumulate.
    Measured: max 1.8e-6 (threshold, 24 of 64 state columns per step), 1.3e-6 (delta, 39 of 64)."""
    from npdgru.kernels import cpu

    H, I, T = 64, 24, 1500
    c = make_gru(H, I, seed=77, T=T, B=1, scale=2.0)
    W64 = c.weights64
    layer = cpu.GRULayer(*c.weights, gate=gate, **params)
    state = layer.init_state(1, c.h0)
    worst = 0.0
    for t in range(T):
        prev, xh, hh = (a.astype(np.float64) for a in (state.h, state.xprev, state.hhat))
        got = layer.forward(c.x[t : t + 1], state)[0]
        x64 = c.x[t].astype(np.float64)
        if gate == "threshold":
            if (np.abs(_u(x64, prev, W64) - params["theta"]) < MARGIN).any():
                continue
            want = ref.tgru_step(x64, prev, *W64, params["theta"])[0]
        else:
            if (np.abs(np.abs(prev - hh) - params["theta"]) < MARGIN).any() or (np.abs(np.abs(x64 - xh) - params["theta_x"]) < MARGIN).any():
                continue
            want = ref.delta_gru_step(x64, prev, xh, hh, *W64, params["theta"], params["theta_x"])[0]
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= ATOL, f"max per-step error {worst:.3g} over {T} steps"
    assert 0.1 * H < layer.mean_work(state)[0] < 0.75 * H  # the columns path, not the whole product


@pytest.mark.usefixtures("warm_kernels")
@pytest.mark.parametrize("gate", ["threshold", "delta"])
def test_work_per_frame_counts_the_references_selection(gate):
    """MaskModel.work_per_frame of the first gated layer against the float64 reference run on the
    same input (fc1 of the features): per frame the updated (threshold) or propagated (delta)
    state entries and, for delta, the propagated input entries. float32 against float64 may flip
    an entry whose u or change sits at the threshold: at most 2 frames of 100 may differ, by one."""
    from npdgru import stft
    from npdgru.model import MaskModel

    w = _gated_weights(gate)
    F = stft.log_power(stft.stft(_signal(16000, seed=3)))[:, None, :].astype(np.float32)
    m = MaskModel(w, backend="cpu")
    work = m.work_per_frame(F)
    assert set(work) == {"gru1", "gru2"} and all(v.gate == gate for v in work.values())
    t = {k: v.astype(np.float64) for k, v in w.tensors.items()}
    x = ref.linear(F.astype(np.float64), t["fc1.weight"], t["fc1.bias"], "relu")
    W = (t["gru1.weight_ih"], t["gru1.weight_hh"], t["gru1.bias_ih"], t["gru1.bias_hh"])
    h0 = np.zeros((1, 12))
    if gate == "threshold":
        _, S = ref.tgru_sequence(x, h0, *W, GATE_PARAMS[gate]["theta"])
        want = {"state_columns": S.sum(axis=(1, 2))}
        assert work["gru1"].input_columns is None
    else:
        _, sent_h, sent_x = ref.delta_gru_sequence(x, h0, *W, **GATE_PARAMS[gate])
        want = {"state_columns": sent_h.sum(axis=(1, 2)), "input_columns": sent_x.sum(axis=(1, 2))}
    for key, v in want.items():
        got = getattr(work["gru1"], key)
        assert got.shape == v.shape == (F.shape[0],)
        assert 0 < v.sum() < 12 * F.shape[0] or key == "input_columns"  # neither nothing nor everything
        diff = np.abs(got - v)
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 2, f"{key}: {np.count_nonzero(diff)} frames differ"
    share = work["gru1"].share()
    assert np.array_equal(share, work["gru1"].state_columns / 12)
    # the measured MACs count the mean work: between the fixed input product and the dense bound
    bound, measured = m.macs_per_frame(), m.macs_per_frame(work)
    assert measured["gru_dense"] == bound["gru_dense"] and measured["gru_ours"] < bound["gru_ours"]


def test_work_per_frame_lists_only_variable_gates_and_checks_its_input():
    from npdgru.errors import ParameterError
    from npdgru.model import MaskModel

    m = MaskModel(_gated_weights("threshold"), backend="cpu")
    with pytest.raises(ParameterError, match=r"features must have shape \(T, 1, 161\)"):
        m.work_per_frame(np.zeros((5, 2, 161), np.float32))
    with pytest.raises(ParameterError, match="cpu backend"):
        MaskModel(_gated_weights("threshold"), backend="reference").work_per_frame(np.zeros((5, 1, 161), np.float32))
    from npdgru.architectures import tiny_weights

    top_a = MaskModel(tiny_weights(seed=5, hidden=12), update_percent=50, backend="cpu")
    assert top_a.work_per_frame(np.zeros((5, 1, 161), np.float32)) == {}


def test_convert_puts_a_gate_on_every_d_gru_layer(tmp_path, capsys):
    """`npdgru convert FILE --gate delta --theta 0.03`: the same tensors, the gate on both D-GRU
    layers of NSNet2 (the architecture is read back, not the code's own output), and bad gate
    arguments are one line naming the problem, with no file written."""
    from pathlib import Path

    from cli_run import one_line_error, run
    from npdgru.weights import load_weights

    src = Path(__file__).resolve().parents[1] / "weights" / "nsnet2.safetensors"
    out = tmp_path / "delta.safetensors"
    status, _, err = run(capsys, "convert", src, "-o", out, "--gate", "delta", "--theta", "0.03", "--theta-x", "0.05")
    assert status == 0, err
    w, orig = load_weights(out), load_weights(src)
    grus = [layer for layer in w.architecture["layers"] if layer["kind"] == "gru"]
    assert len(grus) == 2 and all((g["gate"], g["theta"], g["theta_x"]) == ("delta", 0.03, 0.05) for g in grus)
    assert all(layer.get("gate") is None for layer in w.architecture["layers"] if layer["kind"] != "gru")
    assert set(w.tensors) == set(orig.tensors) and all(np.array_equal(w.tensors[k], orig.tensors[k]) for k in w.tensors)
    # --gate top-a takes the gate off an architecture file that has one (and --gate replaces a gate)
    arch = tmp_path / "delta.json"
    arch.write_text(__import__("json").dumps(w.architecture))
    for argv, want in ((("--gate", "top-a"), [None, None]), (("--gate", "threshold", "--theta", "0.4"), ["threshold", "threshold"])):
        status, _, err = run(capsys, "convert", src, "-o", tmp_path / "re.safetensors", "--overwrite", "--arch", arch, *argv)
        assert status == 0, err
        layers = [layer for layer in load_weights(tmp_path / "re.safetensors").architecture["layers"] if layer["kind"] == "gru"]
        assert [layer.get("gate") for layer in layers] == want and all("theta_x" not in layer for layer in layers)
    bad = tmp_path / "bad.safetensors"
    for argv, needle in ((("--gate", "threshold", "--theta", "1.5"), "theta' in [0, 1)"), (("--theta", "0.2"), "--theta and --theta-x go with --gate"),
                         (("--gate", "delta"), "the delta gate needs 'theta'"), (("--gate", "top-a", "--theta", "0.1"), "--theta and --theta-x go with --gate")):
        one_line_error(*run(capsys, "convert", src, "-o", bad, *argv)[::2], needle)
        assert not bad.exists()


def test_the_shipped_delta_model_is_the_default_weights_with_the_delta_gate(capsys):
    """weights/nsnet2-kd-delta.safetensors (`--model delta`): the default's tensors bit for bit,
    the delta gate at 0.15 on both GRU layers; `npdgru models` names the gate instead of a P."""
    from cli_run import run
    from npdgru.enhance import Enhancer
    from npdgru.shipped import model_path, shipped_models
    from npdgru.weights import load_weights

    e = Enhancer(model="delta")
    default = load_weights(model_path("default"))
    assert e.weights.tensors.keys() == default.tensors.keys()
    assert all(np.array_equal(e.weights.tensors[k], default.tensors[k]) for k in default.tensors)
    assert [(s.gate, s.theta, s.theta_x) for s in e.model.plan.state_steps] == [("delta", 0.15, 0.15)] * 2
    (m,) = [m for m in shipped_models() if m["name"] == "nsnet2-kd-delta"]
    assert m["gate"] == "delta 0.15" and all(o["gate"] is None for o in shipped_models() if o["name"] != m["name"])
    status, out, _ = run(capsys, "models")
    assert status == 0 and any(line.split()[:4] == ["nsnet2-kd-delta", "10.3", "MiB", "delta"] for line in out.splitlines())
    y = e.enhance(_signal(8000), 16000)
    assert y.shape == (8000,) and np.isfinite(y).all() and 0 < np.abs(y).max() < 1
