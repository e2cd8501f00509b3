"""npdgru.reference (the NumPy specification) against tests/naive.py, plus its small helpers.

Both sides run in float64 but sum in different orders (BLAS matmul vs a Python loop), so values
agree to ~1e-15 and the comparison uses 1e-12. Selections are compared step by step with teacher
forcing (the naive step starts from the reference's previous state) so that a difference in the
last bit of u can never send the two trajectories apart; a step whose naive margin between the
A-th and (A+1)-th largest u is below 1e-12 would be skipped (with random weights it never is).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from naive import naive_dgru_step, naive_gru_sequence, naive_gru_step, naive_select, naive_update_gate
from npdgru import reference as ref
from npdgru import kinds
from npdgru.errors import ParameterError

TOL64 = 1e-12  # float64 vs float64 with different summation order (|h| <= 1, sums of <= 13 terms)

percents = st.one_of(
    st.sampled_from([100.0, 75.0, 50.0, 25.0, 10.0, 1e-6]),
    st.floats(min_value=0.0, max_value=100.0, exclude_min=True, allow_nan=False),
)


def _select_margin(u, A):
    """u_(A) − u_(A+1) of the sorted values (inf when A = H: nothing to separate)."""
    s = sorted(u, reverse=True)
    return math.inf if A >= len(s) else s[A - 1] - s[A]


# --------------------------------------------------------------------------- reference vs naive


@settings(deadline=None, max_examples=60)
@given(
    H=st.integers(1, 8), I=st.integers(1, 5), B=st.integers(1, 3), T=st.integers(1, 5),
    P=percents, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 2.0]),
)
def test_reference_matches_naive(make_gru, H, I, B, T, P, seed, scale):
    c = make_gru(H, I, seed=seed, T=T, B=B, scale=scale)
    W = c.weights64
    Wl = [w.tolist() for w in W]
    x = c.x.astype(np.float64)
    h0 = c.h0.astype(np.float64)
    A = ref.num_selected(P, H)

    # dense GRU, free running
    out = ref.gru_sequence(x, h0, *W)
    naive = np.array(naive_gru_sequence(x.tolist(), h0.tolist(), *Wl))
    np.testing.assert_allclose(out, naive, rtol=0, atol=TOL64, err_msg=f"reference gru H={H} I={I}")

    # D-GRU, teacher forced step by step
    out, S = ref.dgru_sequence(x, h0, *W, A)
    assert S.dtype == bool and S.shape == (T, B, H)
    assert (S.sum(axis=-1) == A).all(), f"reference selects {S.sum(-1)} neurons, A={A}"
    prev = h0
    for t in range(T):
        for b in range(B):
            h_nv, sel_nv = naive_dgru_step(x[t, b].tolist(), prev[b].tolist(), *Wl, A)
            u = naive_update_gate(x[t, b].tolist(), prev[b].tolist(), *Wl)
            if _select_margin(u, A) >= TOL64:
                np.testing.assert_array_equal(S[t, b], sel_nv, err_msg=f"reference selection t={t} b={b} H={H} A={A}")
                np.testing.assert_allclose(out[t, b], h_nv, rtol=0, atol=TOL64, err_msg=f"reference dgru t={t} b={b} H={H} A={A}")
            # unselected neurons keep their value bit for bit
            keep = ~S[t, b]
            assert np.array_equal(out[t, b][keep].view(np.uint64), prev[b][keep].view(np.uint64))
        prev = out[t]


def test_reference_corner_cases_match_naive(corner_case):
    c = corner_case
    W = c.weights64
    Wl = [w.tolist() for w in W]
    x, h0 = c.x.astype(np.float64), c.h0.astype(np.float64)
    out, S = ref.dgru_sequence(x, h0, *W, c.A)
    prev = h0
    for t in range(x.shape[0]):
        for b in range(x.shape[1]):
            h_nv, sel_nv = naive_dgru_step(x[t, b].tolist(), prev[b].tolist(), *Wl, c.A)
            np.testing.assert_array_equal(S[t, b], sel_nv, err_msg=f"{c.name} t={t} b={b}")
            np.testing.assert_allclose(out[t, b], h_nv, rtol=0, atol=TOL64, err_msg=f"{c.name} t={t} b={b}")
        prev = out[t]


def test_dgru_step_at_A_equals_H_is_gru_step(make_gru):
    c = make_gru(13, 7, seed=3, T=1, B=4)
    W = c.weights64
    x, h = c.x[0].astype(np.float64), c.h0.astype(np.float64)
    h_d, S = ref.dgru_step(x, h, *W, 13)
    assert S.all()
    np.testing.assert_allclose(h_d, ref.gru_step(x, h, *W), rtol=0, atol=TOL64)
    np.testing.assert_allclose(ref.gru_step(x, h, *W)[0], naive_gru_step(x[0].tolist(), h[0].tolist(), *[w.tolist() for w in W]), rtol=0, atol=TOL64)


def test_reference_keeps_the_dtype():
    """The reference computes in the dtype it is given (float32 in, float32 out)."""
    rng = np.random.default_rng(0)
    W = [rng.uniform(-0.3, 0.3, s).astype(np.float32) for s in [(12, 3), (12, 4), (12,), (12,)]]
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    out, S = ref.dgru_sequence(x, None, *W, 2)
    assert out.dtype == np.float32 and S.dtype == bool
    assert ref.gru_sequence(x, None, *W).dtype == np.float32


# ------------------------------------------------------------------------------------- top_a


@pytest.mark.parametrize(
    "u, A, expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 2, [1, 1, 0, 0]),  # all equal: the lowest indices
        ([0.5, 0.9, 0.5, 0.5], 2, [1, 1, 0, 0]),  # 0.9, then of the tied 0.5s the lowest index
        ([0.2, 0.7, 0.7, 0.1, 0.7], 2, [0, 1, 1, 0, 0]),
        ([0.2, 0.7, 0.7, 0.1, 0.7], 3, [0, 1, 1, 0, 1]),
        ([0.3, 0.3, 0.9, 0.3], 1, [0, 0, 1, 0]),
        ([0.3, 0.3, 0.9, 0.3], 3, [1, 1, 1, 0]),
        ([0.0, -0.0, 0.0], 1, [1, 0, 0]),  # +0 and -0 compare equal: a tie
        ([5.0], 1, [1]),
        ([0.1, 0.2, 0.3], 3, [1, 1, 1]),
    ],
)
def test_top_a_ties_go_to_the_lower_index(u, A, expected):
    mask = ref.top_a(np.array(u), A)
    np.testing.assert_array_equal(mask, np.array(expected, bool))
    np.testing.assert_array_equal(mask, naive_select(u, A))


def test_top_a_batched_rows_select_independently():
    u = np.array([[0.1, 0.4, 0.4, 0.2], [0.9, 0.9, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_array_equal(ref.top_a(u, 2), [[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    u3 = np.stack([u, u[::-1]])  # (2, 3, 4): any leading axes
    assert (ref.top_a(u3, 3).sum(-1) == 3).all()


@settings(deadline=None, max_examples=200)
@given(u=st.lists(st.integers(0, 3), min_size=1, max_size=12), data=st.data())
def test_top_a_matches_rank_counting_with_many_ties(u, data):
    A = data.draw(st.integers(1, len(u)))
    np.testing.assert_array_equal(ref.top_a(np.array(u, float), A), naive_select([float(v) for v in u], A))


# ------------------------------------------------------------------------------ num_selected


@pytest.mark.parametrize(
    "P, H, A",
    [
        (100, 400, 400), (100.0, 7, 7), (100, 1, 1),
        (50, 400, 200), (50, 401, 201), (25, 400, 100), (10, 400, 40), (75, 256, 192),
        (33.3, 1000, 333),  # read as the decimal 33.3, not 33.29999... or 33.3000...1
        (1e-9, 400, 1), (0.001, 1, 1), (1e-300, 5, 1),  # tiny P still updates one neuron
        (99.9999, 400, 400), (99.9, 400, 400), (99.75, 400, 399),
        (np.float32(50), 10, 5), (np.int64(20), 10, 2), (np.float64(12.5), 8, 1),
    ],
)
def test_num_selected(P, H, A):
    assert ref.num_selected(P, H) == A


# the specification refuses with ValueError (it imports nothing of npdgru); the package's checked
# entry point npdgru.kinds.num_selected with ParameterError, the same message
CHECKED = [(ref.num_selected, ValueError), (kinds.num_selected, ParameterError)]


@pytest.mark.parametrize("fn, error", CHECKED)
@pytest.mark.parametrize("P", [0, 0.0, -1, -1e-9, 100.0001, 101, float("nan"), float("inf"), -float("inf"), "50", True, False, None, [50]])
def test_num_selected_rejects_bad_percent(P, fn, error):
    with pytest.raises(error, match="update_percent"):
        fn(P, 10)


@pytest.mark.parametrize("fn, error", CHECKED)
@pytest.mark.parametrize("H", [0, -3, 1.5])
def test_num_selected_rejects_bad_hidden_size(H, fn, error):
    with pytest.raises(error, match="hidden_size"):
        fn(50, H)


@settings(deadline=None, max_examples=200)
@given(P=percents, H=st.integers(1, 2000))
def test_num_selected_is_ceil_of_the_decimal(P, H):
    A = ref.num_selected(P, H)
    assert 1 <= A <= H
    exact = P * H / 100
    assert A >= exact - 1e-9 * H and A - 1 < exact + 1e-9 * H  # ceil, up to binary rounding of P


# -------------------------------------------------------------------------------- count_macs


@pytest.mark.parametrize("P", [100, 75, 50, 25, 10])
@pytest.mark.parametrize("I, H", [(400, 400), (400, 200), (161, 400), (64, 100)])
def test_count_macs_paper_ratio_is_one_plus_two_p_over_three(P, I, H):
    m = ref.count_macs(I, H, P)
    assert m.dense == 3 * H * (I + H)
    paper_ratio, _ = m.ratios()
    # H divisible by 100/P here: A = P·H/100 exactly and the ratio is exact up to float division
    assert paper_ratio == pytest.approx((1 + 2 * P / 100) / 3, rel=1e-12)


@settings(deadline=None, max_examples=200)
@given(I=st.integers(1, 600), H=st.integers(1, 600), P=percents)
def test_count_macs_paper_ratio_within_rounding(I, H, P):
    m = ref.count_macs(I, H, P)
    paper_ratio, sparse_ratio = m.ratios()
    # A = ceil(P·H/100) exceeds P·H/100 by less than 1, so the ratio by less than 2/(3H)
    assert (1 + 2 * P / 100) / 3 - 1e-12 <= paper_ratio < (1 + 2 * P / 100) / 3 + 2 / (3 * H) + 1e-12
    assert m.paper <= m.dense and m.sparse <= m.dense
    assert 0 < sparse_ratio <= 1


@pytest.mark.parametrize("I, H, P", [(400, 400, 50), (400, 256, 25), (161, 400, 10), (3, 5, 60)])
def test_count_macs_sparse_formula(I, H, P):
    A = ref.num_selected(P, H)
    m = ref.count_macs(I, H, P)
    assert m.sparse == 3 * H * I + 3 * H * A  # dense input: every input column, A state columns
    assert m.paper == (H + 2 * A) * (I + H)
    # a sparse input (previous D-GRU layer with A_in changed entries per step)
    A_in = ref.num_selected(P, I)
    m_in = ref.count_macs(I, H, P, input_changed=A_in)
    assert m_in.sparse == 3 * H * A_in + 3 * H * A
    assert m_in.dense == m.dense and m_in.paper == m.paper
    # more changed entries than inputs is capped at I
    assert ref.count_macs(I, H, P, input_changed=10 * I).sparse == m.sparse


@pytest.mark.parametrize("I, H", [(400, 400), (161, 400), (7, 3)])
def test_count_macs_dense_at_p100(I, H):
    m = ref.count_macs(I, H, 100)
    assert m.sparse == m.paper == m.dense
    assert m.ratios() == (1.0, 1.0)


def test_count_macs_dense_at_p100_with_sparse_input_of_full_size():
    # a second layer of the same width whose input changes in all H entries: no saving at P=100
    m = ref.count_macs(400, 400, 100, input_changed=400)
    assert m.sparse == m.dense == m.paper


def test_count_macs_rejects_bad_percent():
    with pytest.raises(ValueError):
        ref.count_macs(400, 400, 0)


# ------------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("B", [2, 3, 7])
def test_a_stream_gives_the_same_bits_alone_and_in_a_batch(B):
    """The reference takes its products row by row: a BLAS matrix product of several rows may sum
    in another order than that of one row, which would make a stream's bits depend on its batch."""
    rng = np.random.default_rng(B)
    I, H = 400, 400
    W = (rng.uniform(-0.05, 0.05, (3 * H, I)), rng.uniform(-0.05, 0.05, (3 * H, H)), rng.uniform(-0.05, 0.05, 3 * H), rng.uniform(-0.05, 0.05, 3 * H))
    x, h = rng.standard_normal((B, I)), rng.uniform(-0.5, 0.5, (B, H))
    batch, S = ref.dgru_step(x, h, *W, 200)
    for b in range(B):
        alone, S1 = ref.dgru_step(x[b : b + 1], h[b : b + 1], *W, 200)
        assert np.array_equal(alone[0], batch[b]) and np.array_equal(S1[0], S[b]), f"stream {b} of {B}"
    assert np.array_equal(ref.gru_step(x[:1], h[:1], *W)[0], ref.gru_step(x, h, *W)[0])
