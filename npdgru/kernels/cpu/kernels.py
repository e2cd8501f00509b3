"""Numba CPU kernels for the GRU and the D-GRU, mirroring :mod:`npdgru.reference`.

Layout. Weights are stored transposed, column-contiguous: ``wih_t = weight_ih.T`` (I, 3H) and
``whh_t = weight_hh.T`` (H, 3H), so column j of W (everything that input or state entry j feeds)
is one contiguous row of 3H floats. A pre-activation vector is built as

    acc = b + Σ_j W[:, j] · v_j          (j ascending, one axpy per column)

which skips real work when few v_j change: only their columns are read.

The D-GRU step for one stream (paper eq. 4-5, ``docs/design.md``):
  1. ``z = σ(gi_z + M_z)`` and ``u = 1 − z`` for all H neurons, where ``M = W_hh h + b_hh`` is a
     running accumulator, not recomputed;
  2. the A largest ``u``, ties to the lower index: a walk from the stream's last threshold
     (``_top_a_hinted``: a few vectorised passes; a bisection where that is far);
  3. r, n and the new h only for those A rows;
  4. ``M += W_hh[:, S] (h'_S − h_S)``: 3H·A MACs instead of 3H·H.
A layer whose input is the state of a previous D-GRU layer keeps its input pre-activations the
same way (``sparse_input=True``): only input columns whose value changed are read.

Float32 drift of the accumulators: every ``refresh_every`` steps of a stream (default 128, i.e.
1.28 s at a 10 ms hop) M (and the input accumulator) are recomputed from scratch, which costs
3H·H/128 MACs per step on average. The bound is measured in ``tests/test_kernels_drift.py``:
over 6000 steps the hidden state stays within 1e-4 of the float64 reference (see there).

Every kernel is private to the cpu backend and trusts its arguments; the layers of
``layers.py`` validate them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import JIT

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
    ``[None, :]`` views, not reshape: a reshape can raise, and its error message machinery
    (strings, shape formatting) costs seconds of first-use compile time.
    """
    _affine_columns(v[None, :], wt, b, acc[None, :])


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


# The selection threshold of a step is close to the one of the step before (measured on the
# shipped models over 4 s of test-set speech at P = 50: the count of this step's u at or above
# the last step's A-th largest differs from A by 2 (median; 90th percentile 4-5) at H = 64, by
# 3-4 (90th 6-10) at H = 160 and 400). So each row keeps the key of its last threshold
# (GRUState.tau) and the selection walks from there, one vectorised pass over the keys per
# distinct value crossed. Measured on those u in time order (one thread, machine loaded; us per
# selection, index pass included, A = H/4, H/2, 3H/4), _top_a_hinted against _top_a (counting
# ranks / the histogram-narrowed quickselect): H = 64 (41 band rows): 0.15 / 0.18 / 0.22 against
# 0.39 / 0.45 / 0.70; H = 160: 0.48 / 0.56 / 0.54 against 0.89 / 0.91 / 1.05; H = 256: 1.86 /
# 0.64 / 0.91 against 2.49 / 1.74 / 2.44; H = 400: 1.15 / 1.16 / 1.50 against 2.25 / 2.56 / 2.54.
# The walk gives up after this many passes (then a bisection on the keys runs, <= 33 passes;
# same result). On those u (A = H/4, H/2, 3H/4) it then gives up on no step at H = 64, on
# 0-11 % at H = 160, 0.2-1.2 % at H = 400, and on 38 % at H = 256, A = 64 (MPT's full band, whose
# threshold sits among many distinct u near 1; that case still measured 0.75x the time of
# _top_a above); with 6 passes it gave up on 18-28 % at H = 160. A pass costs about 7 ns at
# H = 64 and 26 ns at H = 400.
_HINT_STEPS = 16
_KEY_ABOVE = np.int64(1 << 40)  # above every key
_KEY_BELOW = np.int64(-(1 << 40))  # below every key


@njit(**JIT)
def _top_a_hinted(u, A, idx, tau, row):
    """_top_a from a hint: the indices of the A largest u, ascending, ties to the lower index ->
    idx[:A], for a row whose last threshold has the key tau[row]; leaves this one's key there.
    The selection is the same whatever tau[row] holds; only the time changes.

    Keys: key(u) = the bits of u for u >= 0, minus the bits of |u| below: an int64 in the order
    of the floats (not NaN), equal for equal floats (-0.0 and 0.0 both 0). Integer keys because
    the passes below vectorise on int64 min/max, not on float min/max (scalar without fast-math).
    The A-th largest key: a walk from tau[row] over the distinct keys between, one pass each;
    after _HINT_STEPS passes a bisection between the smallest and largest key (<= 33 passes).
    One function, not one per pass: each jitted function adds first-use compile time.
    idx holds the keys until the selection overwrites them (in place: the key at i is read
    before any write reaches i).
    """
    H = u.shape[0]
    if A >= H:
        for i in range(H):
            idx[i] = i
        return
    bits = u.view(np.int32)
    t0 = tau[row]
    c = 0  # how many keys >= t0, the smallest of them, the largest key below; all keys' range
    lo = _KEY_ABOVE
    hi = _KEY_BELOW
    kmin = _KEY_ABOVE
    kmax = _KEY_BELOW
    for i in range(H):
        b = np.int64(bits[i])
        s = b >> 31  # 0 or -1
        key = ((b & 0x7FFFFFFF) ^ s) - s
        idx[i] = key
        c += key >= t0
        lo = min(lo, key if key >= t0 else _KEY_ABOVE)
        hi = max(hi, key if key < t0 else _KEY_BELOW)
        kmin = min(kmin, key)
        kmax = max(kmax, key)
    # the walk, up (drop the smallest keys >= t0 while at least A remain above them) or down
    # (take the largest keys < t0 until A are reached); down runs on negated keys, so that one
    # loop serves both: d = 1 up, -1 down; m the key (times d) whose copies the pass counts
    d = 1 if c >= A else -1
    m = lo if d == 1 else -hi
    tk = _KEY_ABOVE  # the A-th largest key, when found
    n_gt = -1  # how many keys exceed it (-1: not known), how many equal it
    n_eq = 0
    for _ in range(_HINT_STEPS):
        e = 0
        nxt = _KEY_ABOVE
        for i in range(H):
            key = idx[i] * d
            e += key == m
            nxt = min(nxt, key if key > m else _KEY_ABOVE)
        if d == 1 and c - e < A:
            tk, n_gt, n_eq = m, c - e, e
            break
        if d == -1 and c + e >= A:
            tk, n_gt, n_eq = -m, c, e
            break
        c -= e * d
        m = nxt
    if n_gt < 0:  # the walk gave up: bisection, one counting pass per halving (<= 33)
        lo = kmin
        hi = kmax + 1  # at least A keys >= lo, fewer than A keys >= hi
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            c = 0
            for i in range(H):
                c += idx[i] >= mid
            if c >= A:
                lo = mid
            else:
                hi = mid
        tk = lo
        n_gt = 0
        for i in range(H):
            n_gt += idx[i] > tk
            n_eq += idx[i] == tk
    tau[row] = tk
    take = A - n_gt  # how many of the keys equal to tk are taken, lowest index first
    k = 0
    if take == n_eq:  # all of them: one compare per entry
        for i in range(H):  # without data-dependent branches: idx[k] is overwritten unless taken
            ki = idx[i]
            idx[k] = i
            k += ki >= tk
        return
    for i in range(H):
        ki = idx[i]
        eq = (ki == tk) & (take > 0)
        idx[k] = i
        k += (ki > tk) | eq
        take -= eq


@njit(**JIT)
def _input_delta(xt, xprev, g, wih_t, b_ih, refresh, idx_in, d_in):
    """Input accumulator g = W_ih x + b_ih kept from the entries of x that changed."""
    I = xt.shape[0]
    if refresh:
        _dense_columns(g, wih_t, b_ih, xt)
        for j in range(I):
            xprev[j] = xt[j]
        return
    c = np.int64(0)  # not a literal 0: _accumulate would be compiled once more for Literal[int](0)
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
        # M = W_hh h + b_hh of all B rows in one call: the rows share each pass over W_hh (DPRNN's
        # 41 band rows, a BiGRU's frames), and a row gets the bits it gets alone (_dense_columns)
        _affine_columns(h, whh_t, b_hh, m)
        for b in range(B):
            hb = h[b]
            mb = m[b]
            g = gi[t, b]
            for i in range(H):
                r = _sigmoid(g[i] + mb[i])
                z = _sigmoid(g[H + i] + mb[H + i])
                n = _tanh(g[2 * H + i] + r * mb[2 * H + i])
                hb[i] = hb[i] + (np.float32(1.0) - z) * (n - hb[i])
            for i in range(H):
                out[t, b, i] = hb[i]


@njit(**JIT)
def _update_selected(g, hb, mb, ubuf, qbuf, idx, dh, A):
    """h' = h + u (n − h) for the A rows idx[:A] (u in ubuf), their changes -> dh[:A]: the row
    arithmetic of every select gate (paper eq. 5), r and n from g and the memory mb."""
    H = hb.shape[0]
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


@njit(**JIT)
def _dgru_cell(g, hb, mb, whh_t, b_hh, A, refresh, ubuf, qbuf, idx, dh, tau, row):
    """One D-GRU step of one stream; g (3H,) input pre-activations; hb, mb updated in place;
    tau[row] the key of the stream's last selection threshold (``_top_a_hinted``)."""
    H = hb.shape[0]
    if refresh:
        _dense_columns(mb, whh_t, b_hh, hb)  # drift bound: exact M every refresh_every steps
    for i in range(H):  # z and u for every neuron: needed to select
        ubuf[i] = np.float32(1.0) - _sigmoid(g[H + i] + mb[H + i])
    _top_a_hinted(ubuf, A, idx, tau, row)
    _update_selected(g, hb, mb, ubuf, qbuf, idx, dh, A)
    _accumulate(mb, whh_t, idx, dh, A)  # M += W_hh[:, S] Δh_S


@njit(**JIT)
def _dgru_forward(gi, x, wih_t, b_ih, whh_t, b_hh, A, refresh_every, h, m, g, xprev, step, tau, out, sel, ubuf, qbuf, idx, dh, idx_in, d_in):
    """D-GRU over T steps of B streams, with dense or sparse input.

    Dense input: gi (T, B, 3H) holds the input pre-activations of every step (incl. b_ih); x is
    empty (0, B, I). Sparse input (the state of a previous D-GRU layer): x (T, B, I) and gi empty;
    the input accumulator g (B, 3H) is kept from the changed entries of x (``_input_delta``).
    One kernel for both, so that ``_dgru_cell`` is compiled and optimised once, not once per
    caller (first-use compile time).
    """
    sparse = x.shape[0] > 0
    T = x.shape[0] if sparse else gi.shape[0]
    B, H = h.shape
    write_sel = sel.shape[0] == T
    for t in range(T):
        for b in range(B):
            refresh = step[b] % refresh_every == 0
            step[b] += 1
            if sparse:
                _input_delta(x[t, b], xprev[b], g[b], wih_t, b_ih, refresh, idx_in, d_in)
                gb = g[b]
            else:
                gb = gi[t, b]
            _dgru_cell(gb, h[b], m[b], whh_t, b_hh, A, refresh, ubuf, qbuf, idx, dh, tau, b)
            hb = h[b]
            for i in range(H):  # not out[t, b] = h[b]: a shape-checked copy compiles its error path
                out[t, b, i] = hb[i]
            if write_sel:
                for k in range(A):
                    sel[t, b, idx[k]] = True


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


# --------------------------------------------------------------------------------------------
# the variable gates (npdgru.reference.tgru_sequence, delta_gru_sequence): a count per step
# --------------------------------------------------------------------------------------------
# A threshold or delta step changes a number of columns that varies per frame. Above this
# fraction of the columns the memory is recomputed whole (_dense_columns, which also resets its
# drift) instead of accumulated column by column (_accumulate). Measured with
# benchmarks/bench_gates.py (one thread, 2-core AMD EPYC shared with a training run; columns /
# whole time, best of 9 x 1000 calls, three runs): H = 64: 0.92-1.8 at c/H = 0.25, 1.2-1.5 from
# 0.5 up (the whole product wins almost everywhere, the gather costs more than the columns
# saved); H = 128: 0.61 / 0.81 / 1.00 / 1.08 / 1.13 / 1.2 at 0.25 / 0.5 / 0.75 / 0.85 / 0.9 / 1
# (steady across runs); H = 400 (noisy): 0.21-0.30 / 0.40-0.68 at 0.25 / 0.5, 0.77-1.05 at
# 0.75, 0.95-0.99 at 0.95 and 1.08-1.38 at 1 in the quieter runs. The crossover is at 0.75 for
# H = 128 and 0.75 ... 0.95 for H = 400: above 3/4 the whole product is no slower and resets the
# drift too.
_DENSE_COLUMNS_FRACTION = 0.75


@njit(**JIT)
def _threshold_select(u, theta, idx):
    """Indices of the u > θ (strictly) in ascending order -> idx[:count]; returns count."""
    k = np.int64(0)
    for i in range(u.shape[0]):  # branch-free: idx[k] is overwritten unless selected
        idx[k] = i
        k += u[i] > theta
    return k


@njit(**JIT)
def _update_columns(acc, wt, b, v, idx, d, count):
    """acc += Σ_k wt[idx[k]] d[k] (the changed columns), or acc = b + Σ_j wt[j] v[j] whole when
    more than _DENSE_COLUMNS_FRACTION of the columns changed (v: the vector after the change)."""
    if count > _DENSE_COLUMNS_FRACTION * v.shape[0]:
        _dense_columns(acc, wt, b, v)
    else:
        _accumulate(acc, wt, idx, d, count)


@njit(**JIT)
def _tgru_cell(g, hb, mb, whh_t, b_hh, theta, refresh, ubuf, qbuf, idx, dh):
    """One threshold-gate step of one stream (reference.tgru_step): the u > θ rows change; M is
    kept from their columns. Returns the count. The row arithmetic is _dgru_cell's (_update_selected)."""
    H = hb.shape[0]
    if refresh:
        _dense_columns(mb, whh_t, b_hh, hb)
    for i in range(H):
        ubuf[i] = np.float32(1.0) - _sigmoid(g[H + i] + mb[H + i])
    A = _threshold_select(ubuf, theta, idx)
    _update_selected(g, hb, mb, ubuf, qbuf, idx, dh, A)
    _update_columns(mb, whh_t, b_hh, hb, idx, dh, A)
    return A


@njit(**JIT)
def _delta_encode(v, v_hat, theta, idx, d):
    """reference.delta_encode in place: the entries with |v − v̂| > Θ -> idx[:count], their
    changes -> d[:count], v̂ ← v there. Returns count."""
    c = np.int64(0)
    for j in range(v.shape[0]):
        dj = v[j] - v_hat[j]
        if abs(dj) > theta:
            idx[c] = j
            d[c] = dj
            v_hat[j] = v[j]
            c += 1
    return c


@njit(**JIT)
def _delta_memory(v, v_hat, acc, wt, b, theta, refresh, idx, d):
    """A delta memory acc = W v̂ + b kept from the propagated changes of v; exact every refresh."""
    if refresh:
        _dense_columns(acc, wt, b, v_hat)
    c = _delta_encode(v, v_hat, theta, idx, d)
    _update_columns(acc, wt, b, v_hat, idx, d, c)
    return c


@njit(**JIT)
def _delta_rows(g, hb, mb):
    """Every neuron from the delta memories: h' = h + (1 − z)(n − h) (reference.delta_gru_step)."""
    H = hb.shape[0]
    for i in range(H):
        r = _sigmoid(g[i] + mb[i])
        z = _sigmoid(g[H + i] + mb[H + i])
        n = _tanh(g[2 * H + i] + r * mb[2 * H + i])
        hb[i] = hb[i] + (np.float32(1.0) - z) * (n - hb[i])


@njit(**JIT)
def _delta_scan(x, x_hat, theta_x, xs):
    """The propagated inputs x̂_t of T steps of B streams (they do not depend on the state):
    xs[t, b] = x̂ after step t; x_hat (B, I) in/out. Returns the count of propagated entries."""
    T, B, I = x.shape
    c = np.int64(0)
    for t in range(T):
        for b in range(B):
            xh = x_hat[b]
            xt = x[t, b]
            for j in range(I):
                if abs(xt[j] - xh[j]) > theta_x:
                    xh[j] = xt[j]
                    c += 1
                xs[t, b, j] = xh[j]
    return c


@njit(**JIT)
def _gated_forward(gate, gi, x, wih_t, b_ih, whh_t, b_hh, theta, theta_x, refresh_every, h, m, g, xprev, hhat, step, out, sel, work, ubuf, qbuf, idx, dh, idx_in, d_in):
    """Threshold (gate 1) or delta (gate 2) GRU over T steps of B streams.

    Threshold: gi (T, B, 3H) input pre-activations; x empty. Delta: with x (T, B, I) the input
    memory g (B, 3H) is kept from the propagated changes of x against xprev (= x̂); with x empty,
    gi holds W x̂_t + b_ih of every step (offline: the x̂ scan and one product, _delta_scan).
    hhat (B, H) is ĥ. ``sel`` (T, B, H) or empty: the rows updated (threshold) or the state
    entries propagated (delta). ``work`` += [state columns, input columns] read by the updates.
    """
    in_kernel = x.shape[0] > 0
    T = x.shape[0] if in_kernel else gi.shape[0]
    B, H = h.shape
    write_sel = sel.shape[0] == T
    for t in range(T):
        for b in range(B):
            refresh = step[b] % refresh_every == 0
            step[b] += 1
            hb = h[b]
            if gate == 1:
                c = _tgru_cell(gi[t, b], hb, m[b], whh_t, b_hh, theta, refresh, ubuf, qbuf, idx, dh)
            else:
                if in_kernel:
                    work[1] += _delta_memory(x[t, b], xprev[b], g[b], wih_t, b_ih, theta_x, refresh, idx_in, d_in)
                    gb = g[b]
                else:
                    gb = gi[t, b]
                c = _delta_memory(hb, hhat[b], m[b], whh_t, b_hh, theta, refresh, idx, dh)
                _delta_rows(gb, hb, m[b])
            work[0] += c
            for i in range(H):
                out[t, b, i] = hb[i]
            if write_sel:
                for k in range(c):
                    sel[t, b, idx[k]] = True
