"""Numba CPU kernels for the GRU and the D-GRU, mirroring :mod:`npdgru.reference`.

Layout. Weights are stored transposed, column-contiguous: ``wih_t = weight_ih.T`` (I, 3H) and
``whh_t = weight_hh.T`` (H, 3H), so column j of W (everything that input or state entry j feeds)
is one contiguous row of 3H floats. A pre-activation vector is built as

    acc = b + Σ_j W[:, j] · v_j          (j ascending, one axpy per column)

which skips real work when few v_j change: only their columns are read.

The D-GRU step for one stream (paper eq. 4-5, DESIGN.md section 1):
  1. ``z = σ(gi_z + M_z)`` and ``u = 1 − z`` for all H neurons, where ``M = W_hh h + b_hh`` is a
     running accumulator, not recomputed;
  2. the A largest ``u`` by quickselect (O(H) on average, no sort), ties to the lower index;
  3. r, n and the new h only for those A rows;
  4. ``M += W_hh[:, S] (h'_S − h_S)``: 3H·A MACs instead of 3H·H.
A layer whose input is the state of a previous D-GRU layer keeps its input pre-activations the
same way (``sparse_input=True``): only input columns whose value changed are read.

Float32 drift of the accumulators: every ``refresh_every`` steps of a stream (default 128, i.e.
1.28 s at a 10 ms hop) M (and the input accumulator) are recomputed from scratch, which costs
3H·H/128 MACs per step on average. The bound is measured in ``tests/test_kernels_drift.py``:
over 6000 steps the hidden state stays within 1e-4 of the float64 reference (see there).

Every kernel is private and trusts its arguments; :class:`GRULayer` validates them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ParameterError
from ..kinds import KINDS, num_selected
from ._config import JIT, JIT_EXACT
from ._graph import LAYER_RUNNERS, GraphExecutor

__all__ = ["GRULayer", "GRUState", "gru_sequence", "dgru_sequence", "DEFAULT_REFRESH"]

DEFAULT_REFRESH = 128
_FRAME_BLOCK = 8  # frames that share one pass over the input weights in _affine_columns
# r and n are evaluated for all H rows when A·_ALL_ROWS_RATIO >= H: measured (one thread) the
# vectorised pass over all rows is faster than A gathered rows for A >= H/8 at H = 64...400
_ALL_ROWS_RATIO = 8
# How the A largest u are found (measured one thread, u = 1 - sigmoid of normal values, A = H/2:
# counting ranks 0.57 / 2.1 / 28 us at H = 64 / 128 / 400, the histogram-narrowed quickselect
# 0.23 / 0.40 / 1.06 us, a plain quickselect 2.0 / 3.1 / 4.8 us at H = 160 / 256 / 400):
_RANK_MAX_H = 63  # counting ranks below H = 64
_BINS = 64  # histogram bins of _kth_largest_binned (needs H >= _BINS: idx is its scratch)
_BINNED_MIN_H = 64  # the histogram-narrowed quickselect from H = 64


# --------------------------------------------------------------------------------------------
# private kernels (no validation, no allocation inside loops)
# --------------------------------------------------------------------------------------------


# tanh as a rational function (the [13/6] minimax fit used by Eigen), clamped where it reaches
# ±1 in float32: branch-free arithmetic that LLVM vectorises, unlike a call to libm's tanhf.
# Measured on a grid of 2e6 points in [-12, 12]: within 3.5e-7 of tanh (float64); the sigmoid
# 0.5 + 0.5·tanh(a/2) within 2.3e-7 of 1/(1 + e^-a) (tests/test_kernels_cpu.py checks both).
_TANH_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7, _A9, _A11, _A13 = (np.float32(v) for v in (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(v) for v in (
    4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))


@njit(**JIT)
def _tanh(a):
    v = min(max(a, -_TANH_CLAMP), _TANH_CLAMP)
    v2 = v * v
    p = v2 * _A13 + _A11
    p = v2 * p + _A9
    p = v2 * p + _A7
    p = v2 * p + _A5
    p = v2 * p + _A3
    p = v2 * p + _A1
    q = v2 * _B6 + _B4
    q = v2 * q + _B2
    q = v2 * q + _B0
    return v * p / q


@njit(**JIT)
def _sigmoid(a):
    return np.float32(0.5) + np.float32(0.5) * _tanh(np.float32(0.5) * a)


@njit(**JIT)
def _accumulate(acc, wt, idx, d, count):
    """acc += Σ_k wt[idx[k], :] · d[k] for k < count, in k order, four columns per pass.

    Four columns per pass keep ``acc`` in registers; the sum is still formed in k order, so the
    result is the same as one column at a time.
    """
    K = acc.shape[0]
    k = 0
    while k + 4 <= count:
        w0 = wt[idx[k]]
        w1 = wt[idx[k + 1]]
        w2 = wt[idx[k + 2]]
        w3 = wt[idx[k + 3]]
        d0 = d[k]
        d1 = d[k + 1]
        d2 = d[k + 2]
        d3 = d[k + 3]
        for q in range(K):
            acc[q] = acc[q] + w0[q] * d0 + w1[q] * d1 + w2[q] * d2 + w3[q] * d3
        k += 4
    while k < count:
        w0 = wt[idx[k]]
        d0 = d[k]
        for q in range(K):
            acc[q] = acc[q] + w0[q] * d0
        k += 1


@njit(**JIT)
def _dense_columns(acc, wt, b, v):
    """acc = b + Σ_j wt[j, :] · v[j] over all j: the full product of one vector.

    The one-frame case of _affine_columns (same code, so the same bits as any frame of a block).
    """
    _affine_columns(v.reshape(1, v.shape[0]), wt, b, acc.reshape(1, acc.shape[0]))


@njit(**JIT)
def _affine_columns(x, wt, b, out):
    """out[n] = b + Σ_j wt[j] x[n, j] for every row n of x (N, J): input products of all frames.

    Frames are processed in blocks of _FRAME_BLOCK that share each pass over the weights (matrix-
    matrix reuse); per output entry the sum runs in j order, exactly as _dense_columns.
    """
    N, J = x.shape
    K = wt.shape[1]
    for n0 in range(0, N, _FRAME_BLOCK):
        n1 = min(n0 + _FRAME_BLOCK, N)
        for n in range(n0, n1):
            o = out[n]
            for q in range(K):
                o[q] = b[q]
        j = 0
        while j + 4 <= J:
            w0 = wt[j]
            w1 = wt[j + 1]
            w2 = wt[j + 2]
            w3 = wt[j + 3]
            for n in range(n0, n1):
                o = out[n]
                v0 = x[n, j]
                v1 = x[n, j + 1]
                v2 = x[n, j + 2]
                v3 = x[n, j + 3]
                for q in range(K):
                    o[q] = o[q] + w0[q] * v0 + w1[q] * v1 + w2[q] * v2 + w3[q] * v3
            j += 4
        while j < J:
            w0 = wt[j]
            for n in range(n0, n1):
                o = out[n]
                v0 = x[n, j]
                for q in range(K):
                    o[q] = o[q] + w0[q] * v0
            j += 1


@njit(**JIT)
def _kth_largest(u, buf, k):
    """Value of the k-th largest entry of u (k >= 1): Hoare quickselect on a copy, O(H) average."""
    n = u.shape[0]
    for i in range(n):
        buf[i] = u[i]
    lo = 0
    hi = n - 1
    kk = k - 1
    while lo < hi:
        a = buf[lo]
        b = buf[(lo + hi) >> 1]
        c = buf[hi]
        # median of three as the pivot
        if a < b:
            if b < c:
                pivot = b
            elif a < c:
                pivot = c
            else:
                pivot = a
        else:
            if a < c:
                pivot = a
            elif b < c:
                pivot = c
            else:
                pivot = b
        i = lo
        j = hi
        while i <= j:
            while buf[i] > pivot:  # descending: larger values go left
                i += 1
            while buf[j] < pivot:
                j -= 1
            if i <= j:
                tmp = buf[i]
                buf[i] = buf[j]
                buf[j] = tmp
                i += 1
                j -= 1
        # now buf[lo..j] >= pivot, buf[j+1..i-1] == pivot, buf[i..hi] <= pivot
        if kk <= j:
            hi = j
        elif kk >= i:
            lo = i
        else:
            return pivot
    return buf[kk]


@njit(**JIT)
def _top_a_by_rank(u, A, cnt, idx):
    """_top_a for small H by counting: neuron i is selected iff fewer than A neurons rank above
    it (u_j > u_i, or u_j == u_i with j < i: the stable descending order of reference.top_a).

    O(H²) comparisons, vectorised over i with no data-dependent branch, against the
    quickselect's O(H) average of unpredictable branches (timings at _RANK_MAX_H).
    ``cnt`` (H,) float32 scratch holds the counts (exact integers below 2**24).
    """
    H = u.shape[0]
    for i in range(H):
        cnt[i] = 0.0
    for j in range(H):
        uj = u[j]
        for i in range(H):
            cnt[i] += np.float32((uj > u[i]) | ((uj == u[i]) & (j < i)))
    fa = np.float32(A)
    k = 0
    for i in range(H):
        idx[k] = i  # overwritten unless selected; k <= A < H keeps it in bounds
        k += cnt[i] < fa


@njit(**JIT)
def _kth_largest_binned(u, buf, hist, k):
    """Value of the k-th largest entry of u (k >= 1), for large H: a histogram of _BINS bins
    over [min u, max u] finds the bin that holds it, then a quickselect among that bin's entries
    only. The bin index is a non-decreasing function of u, so the bins are ordered as the values.
    ``hist`` (>= _BINS int64) and ``buf`` (H float32) are scratch."""
    H = u.shape[0]
    lo = u[0]
    hi = u[0]
    for i in range(H):
        lo = min(lo, u[i])
        hi = max(hi, u[i])
    if not hi > lo:
        return lo
    top = _BINS - 1
    scale = np.float32(_BINS) / (hi - lo)
    for b in range(_BINS):
        hist[b] = 0
    for i in range(H):
        hist[min(np.int64((u[i] - lo) * scale), top)] += 1
    above = 0
    b = top
    while above + hist[b] < k:
        above += hist[b]
        b -= 1
    c = 0
    for i in range(H):
        buf[c] = u[i]
        c += min(np.int64((u[i] - lo) * scale), top) == b
    cand = buf[:c]
    return _kth_largest(cand, cand, k - above)  # in place: the copy inside is onto itself


@njit(**JIT)
def _top_a(u, A, buf, idx):
    """Indices of the A largest u in ascending index order, ties to the lower index -> idx[:A]."""
    H = u.shape[0]
    if A >= H:
        for i in range(H):
            idx[i] = i
        return
    if H <= _RANK_MAX_H:
        _top_a_by_rank(u, A, buf, idx)
        return
    if H >= _BINNED_MIN_H:
        tau = _kth_largest_binned(u, buf, idx, A)  # idx is scratch until the selection is written
    else:
        tau = _kth_largest(u, buf, A)
    n_gt = 0
    for i in range(H):
        n_gt += u[i] > tau
    n_eq = A - n_gt  # how many of the entries equal to tau are taken, lowest index first
    k = 0
    for i in range(H):  # without data-dependent branches: idx[k] is overwritten unless taken
        ui = u[i]
        eq = (ui == tau) & (n_eq > 0)
        idx[k] = i
        k += (ui > tau) | eq
        n_eq -= eq


@njit(**JIT)
def _input_delta(xt, xprev, g, wih_t, b_ih, refresh, idx_in, d_in):
    """Input accumulator g = W_ih x + b_ih kept from the entries of x that changed."""
    I = xt.shape[0]
    if refresh:
        _dense_columns(g, wih_t, b_ih, xt)
        for j in range(I):
            xprev[j] = xt[j]
        return
    c = 0
    for j in range(I):
        dj = xt[j] - xprev[j]
        if dj != 0.0:
            idx_in[c] = j
            d_in[c] = dj
            xprev[j] = xt[j]
            c += 1
    _accumulate(g, wih_t, idx_in, d_in, c)


@njit(**JIT)
def _gru_forward(gi, whh_t, b_hh, h, m, out):
    """Dense GRU. gi (T, B, 3H) input pre-activations incl. b_ih; h (B, H) in/out; out (T, B, H)."""
    T, B, H3 = gi.shape
    H = H3 // 3
    for t in range(T):
        for b in range(B):
            hb = h[b]
            mb = m[b]
            g = gi[t, b]
            _dense_columns(mb, whh_t, b_hh, hb)  # M = W_hh h + b_hh, (3H,)
            for i in range(H):
                r = _sigmoid(g[i] + mb[i])
                z = _sigmoid(g[H + i] + mb[H + i])
                n = _tanh(g[2 * H + i] + r * mb[2 * H + i])
                hb[i] = hb[i] + (np.float32(1.0) - z) * (n - hb[i])
            for i in range(H):
                out[t, b, i] = hb[i]


@njit(**JIT)
def _dgru_cell(g, hb, mb, whh_t, b_hh, A, refresh, ubuf, qbuf, idx, dh):
    """One D-GRU step of one stream; g (3H,) input pre-activations; hb, mb updated in place."""
    H = hb.shape[0]
    if refresh:
        _dense_columns(mb, whh_t, b_hh, hb)  # drift bound: exact M every refresh_every steps
    for i in range(H):  # z and u for every neuron: needed to select
        ubuf[i] = np.float32(1.0) - _sigmoid(g[H + i] + mb[H + i])
    _top_a(ubuf, A, qbuf, idx)
    if A * _ALL_ROWS_RATIO >= H:
        # r and n of every row in one vectorised pass (qbuf is free after the selection), then
        # the A selected rows read from it: for a large A this is cheaper than A gathered scalar
        # evaluations, and each n is the same expression, so the same bits either way
        for i in range(H):
            r = _sigmoid(g[i] + mb[i])
            qbuf[i] = _tanh(g[2 * H + i] + r * mb[2 * H + i])
        for k in range(A):
            i = idx[k]
            hi = hb[i]
            hn = hi + ubuf[i] * (qbuf[i] - hi)
            dh[k] = hn - hi
            hb[i] = hn
    else:
        for k in range(A):  # r, n and h' only for the selected rows
            i = idx[k]
            r = _sigmoid(g[i] + mb[i])
            n = _tanh(g[2 * H + i] + r * mb[2 * H + i])
            hi = hb[i]
            hn = hi + ubuf[i] * (n - hi)
            dh[k] = hn - hi
            hb[i] = hn
    _accumulate(mb, whh_t, idx, dh, A)  # M += W_hh[:, S] Δh_S


@njit(**JIT)
def _dgru_forward(gi, whh_t, b_hh, A, refresh_every, h, m, step, out, sel, ubuf, qbuf, idx, dh):
    """D-GRU over T steps, dense input (gi precomputed for all frames)."""
    T, B, H3 = gi.shape
    write_sel = sel.shape[0] == T
    for t in range(T):
        for b in range(B):
            refresh = step[b] % refresh_every == 0
            step[b] += 1
            _dgru_cell(gi[t, b], h[b], m[b], whh_t, b_hh, A, refresh, ubuf, qbuf, idx, dh)
            out[t, b] = h[b]
            if write_sel:
                for k in range(A):
                    sel[t, b, idx[k]] = True


@njit(**JIT)
def _dgru_forward_sparse_input(x, wih_t, b_ih, whh_t, b_hh, A, refresh_every, h, m, g, xprev, step, out, sel, ubuf, qbuf, idx, dh, idx_in, d_in):
    """D-GRU over T steps whose input x (T, B, I) changes in few entries per step."""
    T, B, I = x.shape
    write_sel = sel.shape[0] == T
    for t in range(T):
        for b in range(B):
            refresh = step[b] % refresh_every == 0
            step[b] += 1
            _input_delta(x[t, b], xprev[b], g[b], wih_t, b_ih, refresh, idx_in, d_in)
            _dgru_cell(g[b], h[b], m[b], whh_t, b_hh, A, refresh, ubuf, qbuf, idx, dh)
            out[t, b] = h[b]
            if write_sel:
                for k in range(A):
                    sel[t, b, idx[k]] = True


# --------------------------------------------------------------------------------------------
# public, validated wrappers
# --------------------------------------------------------------------------------------------


def _positive_int(name, v):
    """``v`` as an int >= 1; anything else (None, str, bool, 1.5, NaN, inf) -> ParameterError."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating)) or not float(v).is_integer() or v < 1:
        raise ParameterError(f"{name}={v!r} must be a positive integer")
    return int(v)


def _as_f32(name, a, shape):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ParameterError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ParameterError(f"{name} must have shape {shape}, got {a.shape}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
        a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ParameterError(f"{name} contains NaN or Inf")
    return a


def _selected_count(A, H):
    """A as an int in [1, H]; ParameterError otherwise (every backend's ``GRULayer(A=...)``)."""
    A = _positive_int("A", A)
    if A > H:
        raise ParameterError(f"A={A!r} must be an integer in [1, H={H}]")
    return A


@dataclass
class GRUState:
    """Carried state of one GRU layer for B streams (cpu backend).

    h     (B, H)   hidden state
    m     (B, 3H)  recurrent accumulator W_hh h + b_hh (D-GRU)
    g     (B, 3H)  input accumulator W_ih x + b_ih (sparse-input layers)
    xprev (B, I)   the input that ``g`` was built from
    step  (B,)     steps since start; accumulators are refreshed when step % refresh_every == 0
    The remaining fields are scratch buffers reused by every call (no allocation per step).
    """

    h: np.ndarray
    m: np.ndarray
    g: np.ndarray
    xprev: np.ndarray
    step: np.ndarray
    ubuf: np.ndarray
    qbuf: np.ndarray
    idx: np.ndarray
    dh: np.ndarray
    idx_in: np.ndarray
    d_in: np.ndarray
    gi: np.ndarray  # (T_max, B, 3H) input pre-activations of a call, grown when needed

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    _ROWS = ("h", "m", "g", "xprev", "step")  # the per-stream fields; the rest is scratch

    def take(self, rows) -> "GRUState":
        """A new state of ``len(rows)`` streams: stream k copies stream ``rows[k]``, or is a fresh
        (zero) stream where ``rows[k] < 0``."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and rows.max() >= self.batch:
            raise ParameterError(f"rows {rows.tolist()} out of range for a batch of {self.batch}")
        keep = rows >= 0
        new = {}
        for f in self._ROWS:
            old = getattr(self, f)
            a = np.zeros((rows.size,) + old.shape[1:], old.dtype)
            a[keep] = old[rows[keep]]
            new[f] = a
        scratch = {f: np.zeros_like(getattr(self, f)) for f in ("ubuf", "qbuf", "idx", "dh", "idx_in", "d_in")}
        return GRUState(**new, **scratch, gi=np.zeros((0, rows.size, self.gi.shape[2]), np.float32))

    def put(self, rows, other: "GRUState") -> None:
        """Write the streams of ``other`` into rows ``rows`` of this state (distinct rows)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        for f in self._ROWS:
            getattr(self, f)[rows] = getattr(other, f)


def _check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name):
    """The four GRU tensors as float32 arrays of consistent shapes (3H, I), (3H, H), (3H,), (3H,).

    Shared by every backend's ``GRULayer``; a wrong shape or dtype is a ParameterError naming
    the tensor.
    """
    w_hh = np.asarray(weight_hh)
    w_ih = np.asarray(weight_ih)
    if w_hh.ndim != 2 or w_hh.shape[0] != 3 * w_hh.shape[1] or w_hh.shape[1] < 1:
        raise ParameterError(f"{name}.weight_hh must have shape (3H, H), got {w_hh.shape}")
    H = w_hh.shape[1]
    if w_ih.ndim != 2 or w_ih.shape[0] != 3 * H or w_ih.shape[1] < 1:
        raise ParameterError(f"{name}.weight_ih must have shape (3H, I) = ({3 * H}, I), got {w_ih.shape}")
    I = w_ih.shape[1]
    return (
        _as_f32(f"{name}.weight_ih", w_ih, (3 * H, I)),
        _as_f32(f"{name}.weight_hh", w_hh, (3 * H, H)),
        _as_f32(f"{name}.bias_ih", bias_ih, (3 * H,)),
        _as_f32(f"{name}.bias_hh", bias_hh, (3 * H,)),
    )


class GRULayer:
    """A (D-)GRU layer on the cpu backend, from PyTorch-layout weights.

    Parameters
    ----------
    weight_ih : (3H, I)   weight_hh : (3H, H)   bias_ih, bias_hh : (3H,)   gate order r, z, n
    update_percent : P in (0, 100]; A = ceil(P·H/100) neurons are updated per step. At P=100 the
        dense GRU kernel runs (no accumulators).
    sparse_input : the input is the state of a previous D-GRU layer and changes in few entries;
        keep an input accumulator updated from the changed columns.
    refresh_every : accumulators are recomputed exactly every this many steps (float32 drift).
    A : the number of neurons updated per step, instead of ``update_percent``; the D-GRU
        (accumulator) kernel then runs even at A = H.
    """

    backend = "cpu"

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, *, update_percent=100.0, sparse_input=False, refresh_every=DEFAULT_REFRESH, name="gru", A=None):
        self.name = name
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = _check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name)
        I, H = self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        self.wih_t = np.ascontiguousarray(self.weight_ih.T)  # (I, 3H) column-contiguous
        self.whh_t = np.ascontiguousarray(self.weight_hh.T)  # (H, 3H)
        self.sparse_input = bool(sparse_input)
        self.refresh_every = _positive_int("refresh_every", refresh_every)
        if A is not None:  # resolved by the plan (or asked for): the D-GRU kernel even at A = H
            self.A, self.dense = _selected_count(A, H), False
            self.update_percent = 100.0 * self.A / H
        else:
            self.A = num_selected(update_percent, H)  # validates P before float() can raise TypeError
            self.update_percent = float(update_percent)
            self.dense = self.update_percent == 100.0

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        """Zero (or ``h0``) state for ``batch`` independent streams."""
        B, H, I = _positive_int("batch", batch), self.hidden_size, self.input_size
        h = np.zeros((B, H), np.float32) if h0 is None else _as_f32("h0", h0, (B, H)).copy()
        f = np.float32
        return GRUState(
            h=h, m=np.zeros((B, 3 * H), f), g=np.zeros((B, 3 * H), f), xprev=np.zeros((B, I), f),
            step=np.zeros(B, np.int64), ubuf=np.zeros(H, f), qbuf=np.zeros(H, f),
            idx=np.zeros(H, np.int64), dh=np.zeros(H, f), idx_in=np.zeros(I, np.int64),
            d_in=np.zeros(I, f), gi=np.zeros((0, B, 3 * H), f),
        )

    def _check_call(self, x, state):
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ParameterError(f"{self.name}: x must have shape (T, B, {self.input_size}), got {x.shape}")
        if not isinstance(state, GRUState) or state.h.shape != (x.shape[1], self.hidden_size):
            got = getattr(getattr(state, "h", None), "shape", type(state).__name__)
            raise ParameterError(f"{self.name}: state is for {got}, x has batch {x.shape[1]} (use layer.init_state(B))")
        if state.xprev.shape != (x.shape[1], self.input_size) or state.idx.shape != (self.hidden_size,):
            # the sparse-input kernel indexes xprev/idx_in by input entry, without bounds checks
            raise ParameterError(f"{self.name}: state was made by a layer of another input size (use layer.init_state(B))")
        return _as_f32(f"{self.name} input x", x, x.shape)

    def forward(self, x, state: GRUState, *, selected=None):
        """Run T steps for B streams; ``state`` is updated in place.

        Parameters
        ----------
        x : (T, B, I) float array (cast to float32)
        state : from :meth:`init_state`
        selected : optional (T, B, H) bool array, filled with the selected neurons

        Returns
        -------
        (T, B, H) float32 hidden states after each step.
        """
        x = self._check_call(x, state)
        T, B = x.shape[:2]
        H = self.hidden_size
        if selected is not None:
            if not isinstance(selected, np.ndarray) or selected.shape != (T, B, H) or selected.dtype != np.bool_ or not selected.flags.writeable:
                raise ParameterError(f"selected must be a writeable bool array of shape {(T, B, H)}")
            selected[...] = self.dense
        return self._run(x, state, selected)

    _NO_SEL = np.zeros((0, 1, 1), np.bool_)

    def _run(self, x, state: GRUState, selected=None):
        """forward() without validation: x float32 C-contiguous (T, B, I), state from init_state."""
        T, B = x.shape[:2]
        H = self.hidden_size
        out = np.empty((T, B, H), np.float32)
        sel = selected if (selected is not None and not self.dense) else self._NO_SEL
        if T == 0:
            return out
        if self.sparse_input and not self.dense:
            _dgru_forward_sparse_input(x, self.wih_t, self.bias_ih, self.whh_t, self.bias_hh, self.A, self.refresh_every, state.h, state.m, state.g, state.xprev, state.step, out, sel, state.ubuf, state.qbuf, state.idx, state.dh, state.idx_in, state.d_in)
            return out
        if state.gi.shape[0] < T:
            state.gi = np.empty((T, B, 3 * H), np.float32)
        gi = state.gi[:T]
        _affine_columns(x.reshape(T * B, -1), self.wih_t, self.bias_ih, gi.reshape(T * B, 3 * H))
        if self.dense:
            _gru_forward(gi, self.whh_t, self.bias_hh, state.h, state.m, out)
        else:
            _dgru_forward(gi, self.whh_t, self.bias_hh, self.A, self.refresh_every, state.h, state.m, state.step, out, sel, state.ubuf, state.qbuf, state.idx, state.dh)
        return out


def gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    """Dense GRU over T steps for B streams, like :func:`npdgru.reference.gru_sequence`."""
    layer = GRULayer(weight_ih, weight_hh, bias_ih, bias_hh, update_percent=100.0)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    return layer.forward(x, state)


def dgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, A, *, sparse_input=False, refresh_every=DEFAULT_REFRESH):
    """D-GRU with A selected neurons per step (the accumulator kernel, also at A = H).

    Same arguments and results as :func:`npdgru.reference.dgru_sequence`: (out, S).
    """
    A = _positive_int("A", A)  # None is an error here, not "every neuron"
    layer = GRULayer(weight_ih, weight_hh, bias_ih, bias_hh, A=A, sparse_input=sparse_input, refresh_every=refresh_every)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    S = np.zeros((x.shape[0], state.batch, layer.hidden_size), np.bool_) if x.ndim == 3 else None
    out = layer.forward(x, state, selected=S)
    return out, S


# --------------------------------------------------------------------------------------------
# fully connected layers (the model's FC layers), same column-order arithmetic
# --------------------------------------------------------------------------------------------

_ACT_CODES = {"none": 0, "relu": 1, "sigmoid": 2, "tanh": 3}


@njit(**JIT)
def _activate(y, code):
    """In-place activation of a (N, K) array: 0 none, 1 relu, 2 sigmoid, 3 tanh."""
    if code == 0:
        return
    N, K = y.shape
    for n in range(N):
        row = y[n]
        if code == 1:
            for q in range(K):
                row[q] = max(row[q], np.float32(0.0))
        elif code == 2:
            for q in range(K):
                row[q] = _sigmoid(row[q])
        else:
            for q in range(K):
                row[q] = _tanh(row[q])


def _check_linear_weights(weight, bias, activation, name):
    """Linear weight (out, in) and bias (out,) as float32, and a known activation (cpu and cuda)."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ParameterError(f"{name}.weight must be 2-D (out, in), got shape {w.shape}")
    if activation not in _ACT_CODES:
        raise ParameterError(f"{name}: activation {activation!r} is not one of {tuple(_ACT_CODES)}")
    return _as_f32(f"{name}.weight", w, w.shape), _as_f32(f"{name}.bias", bias, (w.shape[0],))


class Linear:
    """Fully connected layer y = act(x Wᵀ + b) on the cpu backend (float32)."""

    backend = "cpu"

    def __init__(self, weight, bias, *, activation="none", name="linear"):
        self.name = name
        self.weight, self.bias = _check_linear_weights(weight, bias, activation, name)
        self.out_features, self.in_features = self.weight.shape
        self.wt = np.ascontiguousarray(self.weight.T)  # (in, out) column-contiguous
        self.activation = activation
        self._code = _ACT_CODES[activation]

    def forward(self, x):
        """x (N, in) float32 -> (N, out) float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ParameterError(f"{self.name}: x must have shape (N, {self.in_features}), got {x.shape}")
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def _run(self, x):
        """forward() without validation: x float32 C-contiguous (N, in)."""
        y = np.empty((x.shape[0], self.out_features), np.float32)
        if x.shape[0]:
            _affine_columns(x, self.wt, self.bias, y)
            _activate(y, self._code)
        return y


@njit(**JIT)
def _layer_norm(x, w, b, eps, out):
    """Rows of x (N, C): sums in index order, so a row gives the same bits alone or in a block."""
    N, C = x.shape
    inv_c = np.float32(1.0) / np.float32(C)
    for n in range(N):
        row = x[n]
        s = np.float32(0.0)
        for c in range(C):
            s += row[c]
        mu = s * inv_c
        v = np.float32(0.0)
        for c in range(C):
            d = row[c] - mu
            v += d * d
        inv = np.float32(1.0) / np.sqrt(v * inv_c + eps)
        o = out[n]
        for c in range(C):
            o[c] = (row[c] - mu) * inv * w[c] + b[c]


def _check_norm_weights(weight, bias, name):
    """LayerNorm weight and bias as float32 (C,) arrays; ParameterError naming the tensor (cpu and cuda)."""
    w = _as_f32(f"{name}.weight", weight, np.shape(weight))
    if w.ndim != 1:
        raise ParameterError(f"{name}.weight must be 1-D (C,), got shape {w.shape}")
    return w, _as_f32(f"{name}.bias", bias, (w.shape[0],))


class LayerNorm:
    """:func:`npdgru.reference.layer_norm` over rows of (N, C) on the cpu backend (float32)."""

    backend = "cpu"

    def __init__(self, weight, bias, *, eps=1e-5, name="norm"):
        self.name = name
        self.weight, self.bias = _check_norm_weights(weight, bias, name)
        self.size = self.weight.shape[0]
        self.eps = np.float32(eps)

    def forward(self, x):
        """x (N, C) float32 -> (N, C) float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.size:
            raise ParameterError(f"{self.name}: x must have shape (N, {self.size}), got {x.shape}")
        return self._run(_as_f32(f"{self.name} input", x, x.shape))

    def _run(self, x):
        y = np.empty(x.shape, np.float32)
        if x.shape[0]:
            _layer_norm(x, self.weight, self.bias, self.eps, y)
        return y


# --------------------------------------------------------------------------------------------
# the executor: a plan run on these layers
# --------------------------------------------------------------------------------------------


RUNNERS = dict(LAYER_RUNNERS)  # every kind on the layers above and the host shape glue


class Executor(GraphExecutor):
    """A :class:`~npdgru.plan.Plan` on the cpu backend (Numba, float32)."""

    backend = "cpu"
    runners = RUNNERS
    GRULayer, Linear, LayerNorm = GRULayer, Linear, LayerNorm

    def frame_program(self, batch: int) -> "FrameProgram":
        """A one-frame program of ``batch`` streams with buffers of its own (one per user, so
        that two streams never share scratch memory)."""
        return FrameProgram(self, batch)


# --------------------------------------------------------------------------------------------
# one frame of B streams through every step in one call (the streaming hop)
# --------------------------------------------------------------------------------------------

# kind codes of the jitted switch: each kind's index in the one table (npdgru.kinds.KINDS)
_K_LINEAR, _K_GRU, _K_BIGRU, _K_NORM, _K_ADD, _K_CONCAT, _K_PAD, _K_SLICE = (KINDS[k].code for k in ("linear", "gru", "bigru", "layernorm", "add", "concat", "pad", "slice"))
# columns of a step's row in the code table
(_C_KIND, _C_OUT, _C_NIN, _C_F, _C_IN, _C_OUTSZ, _C_A, _C_DENSE, _C_SPARSE, _C_ACT, _C_START,
 _C_W, _C_B, _C_ST, _C_SCR, _C_REFRESH) = range(16)
_N_COLS = 16


@njit(**JIT)
def _frame_steps(codes, ins, eps, vals, W, Bv, Hs, Ms, Gs, Xs, Ss, scratch, sel0, ubuf, qbuf, idx, dh, idx_in, d_in):
    """Every step of a plan for one frame of B streams: vals[0] (B, n_features) -> vals[-1].

    The same kernels as the per-layer path (``GRULayer._run``, ``Linear._run``, ...) on T = 1, so
    a frame gives the bits it gives there: streaming == offline. codes: one row per step (the
    ``_C_*`` columns); ins: the input slots of each step; vals: one (B, width) buffer per slot.
    """
    B = vals[0].shape[0]
    for i in range(codes.shape[0]):
        c = codes[i]
        kind = c[_C_KIND]
        y = vals[c[_C_OUT]]
        x = vals[ins[i, 0]]
        F = c[_C_F]
        n_in = c[_C_IN]
        n_out = c[_C_OUTSZ]
        if kind == _K_LINEAR:
            yo = y.reshape(B * F, n_out)
            _affine_columns(x.reshape(B * F, n_in), W[c[_C_W]], Bv[c[_C_B]], yo)
            _activate(yo, c[_C_ACT])
        elif kind == _K_NORM:
            _layer_norm(x.reshape(B * F, n_in), Bv[c[_C_B]], Bv[c[_C_B] + 1], eps[i], y.reshape(B * F, n_in))
        elif kind == _K_GRU:
            BF = B * F
            H = n_out
            st = c[_C_ST]
            x3 = x.reshape(1, BF, n_in)
            y3 = y.reshape(1, BF, H)
            if c[_C_SPARSE] == 1:
                _dgru_forward_sparse_input(x3, W[c[_C_W]], Bv[c[_C_B]], W[c[_C_W] + 1], Bv[c[_C_B] + 1], c[_C_A], c[_C_REFRESH], Hs[st], Ms[st], Gs[st], Xs[st], Ss[st], y3, sel0, ubuf[:H], qbuf[:H], idx[:H], dh[:H], idx_in, d_in)
            else:
                gi = scratch[c[_C_SCR]][: BF * 3 * H].reshape(1, BF, 3 * H)
                _affine_columns(x.reshape(BF, n_in), W[c[_C_W]], Bv[c[_C_B]], gi.reshape(BF, 3 * H))
                if c[_C_DENSE] == 1:
                    _gru_forward(gi, W[c[_C_W] + 1], Bv[c[_C_B] + 1], Hs[st], Ms[st], y3)
                else:
                    _dgru_forward(gi, W[c[_C_W] + 1], Bv[c[_C_B] + 1], c[_C_A], c[_C_REFRESH], Hs[st], Ms[st], Ss[st], y3, sel0, ubuf[:H], qbuf[:H], idx[:H], dh[:H])
        elif kind == _K_BIGRU:
            # a sequence of F band steps per stream from h = 0, forward then backward
            H = n_out // 2
            I = n_in
            s = scratch[c[_C_SCR]]
            o = 0
            seq = s[o : o + F * B * I].reshape(F, B, I)
            o += F * B * I
            gi = s[o : o + F * B * 3 * H].reshape(F, B, 3 * H)
            o += F * B * 3 * H
            h = s[o : o + B * H].reshape(B, H)
            o += B * H
            m = s[o : o + B * 3 * H].reshape(B, 3 * H)
            o += B * 3 * H
            yd = s[o : o + F * B * H].reshape(F, B, H)
            for d in range(2):
                for f in range(F):
                    fs = f if d == 0 else F - 1 - f
                    for b in range(B):
                        for j in range(I):
                            seq[f, b, j] = x[b, fs * I + j]
                _affine_columns(seq.reshape(F * B, I), W[c[_C_W] + 2 * d], Bv[c[_C_B] + 2 * d], gi.reshape(F * B, 3 * H))
                h[:] = 0.0
                _gru_forward(gi, W[c[_C_W] + 2 * d + 1], Bv[c[_C_B] + 2 * d + 1], h, m, yd)
                for f in range(F):
                    fs = f if d == 0 else F - 1 - f
                    for b in range(B):
                        for j in range(H):
                            y[b, fs * 2 * H + d * H + j] = yd[f, b, j]
        elif kind == _K_ADD:
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, j]
            for k in range(1, c[_C_NIN]):
                z = vals[ins[i, k]]
                for b in range(B):
                    for j in range(n_out):
                        y[b, j] = y[b, j] + z[b, j]
        elif kind == _K_CONCAT:
            off = 0
            for k in range(c[_C_NIN]):
                z = vals[ins[i, k]]
                w = z.shape[1]
                for b in range(B):
                    for j in range(w):
                        y[b, off + j] = z[b, j]
                off += w
        elif kind == _K_PAD:
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, j] if j < n_in else np.float32(0.0)
        else:  # slice
            s0 = c[_C_START]
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, s0 + j]


class FrameProgram:
    """One frame of B streams through every step of a plan in one jitted call, with every buffer
    allocated here, once: write the features into ``features`` (B, n_features), call
    :meth:`run` with an executor state of B streams, read the mask from ``mask`` (B, n_features).

    The kernels are those of the per-layer path on T = 1, so the mask has the bits of
    :meth:`Executor.run` on the same frame (tests/test_fused_hop.py).
    """

    def __init__(self, executor: "Executor", batch: int):
        plan = executor.plan
        f32 = np.float32
        B = batch
        steps = plan.steps
        self.batch = B
        self.vals = tuple([np.zeros((B, plan.n_features), f32)] + [np.zeros((B, s.width), f32) for s in steps])
        codes = np.zeros((len(steps), _N_COLS), np.int64)
        ins = np.zeros((len(steps), max(len(s.slots) for s in steps)), np.int64)
        eps = np.zeros(len(steps), f32)
        W, Bv, scratch = [], [], []
        self._maxH = self._maxI = 1
        for i, (s, runner) in enumerate(zip(steps, executor.steps)):
            c = codes[i]
            if s.kind not in FRAME_STEPS:
                raise ParameterError(f"a frame program has no step for kind {s.kind!r} (step {s.name})")
            c[_C_KIND], c[_C_OUT], c[_C_NIN], c[_C_F] = KINDS[s.kind].code, s.slot, len(s.slots), s.bands
            c[_C_IN], c[_C_OUTSZ], c[_C_START] = s.size_in, s.size_out, s.start
            ins[i, : len(s.slots)] = s.slots
            c[_C_W], c[_C_B], c[_C_SCR] = len(W), len(Bv), len(scratch)
            FRAME_STEPS[s.kind](self, s, runner, c, W, Bv, scratch, eps)
        n_state = len(plan.state_steps)
        maxH, maxI = self._maxH, self._maxI
        if not W or not Bv or not n_state:
            raise ParameterError("a frame program needs at least one linear and one gru step")
        scratch.append(np.zeros(1, f32))
        self.codes, self.ins, self.eps = codes, ins, eps
        self.W, self.Bv, self.scratch = tuple(W), tuple(Bv), tuple(scratch)
        self.sel0 = np.zeros((0, 1, 1), np.bool_)
        self.ubuf, self.qbuf, self.dh = np.zeros(maxH, f32), np.zeros(maxH, f32), np.zeros(maxH, f32)
        self.idx = np.zeros(maxH, np.int64)
        self.idx_in, self.d_in = np.zeros(maxI, np.int64), np.zeros(maxI, f32)
        self.features, self.mask = self.vals[0], self.vals[-1]
        self._state_ref = None

    def _bind(self, state) -> None:
        """The tuples of state arrays (rebuilt only when the state object changes)."""
        if state.batch != self.batch:
            raise ParameterError(f"state of {state.batch} streams for a frame program of {self.batch}")
        L = state.layers
        self._st = (tuple(s.h for s in L), tuple(s.m for s in L), tuple(s.g for s in L), tuple(s.xprev for s in L), tuple(s.step for s in L))
        self._state_ref = state

    def run(self, state) -> None:
        """features -> mask for one frame; ``state`` (B streams, from the executor) updated in place."""
        if self._state_ref is not state:
            self._bind(state)
        Hs, Ms, Gs, Xs, Ss = self._st
        _frame_steps(self.codes, self.ins, self.eps, self.vals, self.W, self.Bv, Hs, Ms, Gs, Xs, Ss, self.scratch, self.sel0, self.ubuf, self.qbuf, self.idx, self.dh, self.idx_in, self.d_in)


def _frame_linear(prog, s, runner, c, W, Bv, scratch, eps):
    W.append(runner.layer.wt)
    Bv.append(runner.layer.bias)
    c[_C_ACT] = runner.layer._code
    scratch.append(np.zeros(0, np.float32))


def _frame_norm(prog, s, runner, c, W, Bv, scratch, eps):
    Bv += [runner.layer.weight, runner.layer.bias]
    eps[s.slot - 1] = runner.layer.eps


def _frame_gru(prog, s, runner, c, W, Bv, scratch, eps):
    g = runner.layer
    W += [g.wih_t, g.whh_t]
    Bv += [g.bias_ih, g.bias_hh]
    c[_C_A], c[_C_DENSE], c[_C_SPARSE] = g.A, int(g.dense), int(g.sparse_input and not g.dense)
    c[_C_REFRESH], c[_C_ST] = g.refresh_every, s.state_index
    scratch.append(np.zeros(prog.batch * s.bands * 3 * s.hidden, np.float32))
    prog._maxH, prog._maxI = max(prog._maxH, s.hidden), max(prog._maxI, s.size_in)


def _frame_bigru(prog, s, runner, c, W, Bv, scratch, eps):
    fwd, bwd = runner.layers
    W += [fwd.wih_t, fwd.whh_t, bwd.wih_t, bwd.whh_t]
    Bv += [fwd.bias_ih, fwd.bias_hh, bwd.bias_ih, bwd.bias_hh]
    F, I, H, B = s.bands, s.size_in, s.hidden, prog.batch
    scratch.append(np.zeros(F * B * I + F * B * 3 * H + B * H + B * 3 * H + F * B * H, np.float32))


def _frame_glue(prog, s, runner, c, W, Bv, scratch, eps):
    """Shape glue: everything it needs is in its code row."""


# how each kind puts its step into a frame program (its tensors, its scratch, its code row); the
# jitted _frame_steps runs them by KINDS[kind].code
FRAME_STEPS = {"linear": _frame_linear, "gru": _frame_gru, "bigru": _frame_bigru, "layernorm": _frame_norm,
               "pad": _frame_glue, "slice": _frame_glue, "add": _frame_glue, "concat": _frame_glue}


# --------------------------------------------------------------------------------------------
# the elementwise steps of a streaming hop around the FFTs: the NumPy ufuncs of the offline path
# (stft._analyse, stft.log_power, Enhancer._apply, stft._synthesise), operation for operation,
# compiled without FMA contraction so that every value is rounded as NumPy rounds it
# --------------------------------------------------------------------------------------------


@njit(**JIT_EXACT)
def hop_frames(prev, x, window, frames):
    """frames[b] = (prev[b], x[b]) · window; prev[b] = x[b]. prev, x (B, HOP); frames (B, 2·HOP)."""
    B, H = x.shape
    for b in range(B):
        for j in range(H):
            frames[b, j] = prev[b, j] * window[j]
            frames[b, H + j] = x[b, j] * window[H + j]
            prev[b, j] = x[b, j]


@njit(**JIT_EXACT)
def hop_power(X, floor, p64):
    """p64 = max(float64(re·re + im·im), floor): the power of stft.log_power before its log10."""
    B, K = X.shape
    for b in range(B):
        for k in range(K):
            re = X[b, k].real
            im = X[b, k].imag
            p = re * re + im * im
            p64[b, k] = max(np.float64(p), floor)


@njit(**JIT_EXACT)
def hop_features(p64, features):
    """features = float32(p64) (after the log10)."""
    B, K = p64.shape
    for b in range(B):
        for k in range(K):
            features[b, k] = np.float32(p64[b, k])


@njit(**JIT_EXACT)
def hop_apply_mask(X, mask, floor, Y):
    """mask = clip(mask, floor, 1); Y = X · mask, as NumPy's complex64 · float32 product."""
    B, K = X.shape
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for b in range(B):
        for k in range(K):
            m = min(max(mask[b, k], floor), one)
            mask[b, k] = m
            re = X[b, k].real
            im = X[b, k].imag
            Y[b, k] = complex(re * m - im * zero, re * zero + im * m)


@njit(**JIT_EXACT)
def hop_overlap_add(y, window, tail, out):
    """y ·= window; out = y[:, :HOP] + tail; tail = y[:, HOP:]."""
    B, H = out.shape
    for b in range(B):
        for j in range(2 * H):
            y[b, j] = y[b, j] * window[j]
        for j in range(H):
            out[b, j] = y[b, j] + tail[b, j]
            tail[b, j] = y[b, H + j]
