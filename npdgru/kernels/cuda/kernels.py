"""The numba.cuda kernels (private, trusting their arguments) and their launch helpers; the
NumPy twin of each is named in the package docstring (``npdgru/kernels/cuda/__init__.py``)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import config as _numba_config
from numba import cuda, float32, int32

from ...errors import ParameterError
from ..checks import as_f32
from . import config
from .device import is_device_array, to_device

# A batch of one stream is a grid of one block: say nothing about it (numba-cuda warns about
# grids smaller than the GPU by default).
_numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


# --------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _sigmoid(a):
    """σ(a) = ½ + ½·tanh(a/2) in float32 (no exp overflow; the form of the cpu backend)."""
    return _HALF + _HALF * math.tanh(_HALF * a)


@cuda.jit(device=True)
def _activate(v, code):
    """0 none, 1 relu, 2 sigmoid, 3 tanh (the codes of checks.ACT_CODES)."""
    if code == 1:
        return max(v, _ZERO)
    if code == 2:
        return _sigmoid(v)
    if code == 3:
        return math.tanh(v)
    return v


@cuda.jit(device=True)
def _rank(u, i, H):
    """Place of u[i] in the stable descending order of u[:H]: #{j : u_j > u_i or (u_j == u_i, j < i)}.

    All threads of a warp read the same u[j] at the same time (a shared-memory broadcast).
    """
    ui = u[i]
    r = 0
    for j in range(H):
        uj = u[j]
        if uj > ui or (uj == ui and j < i):
            r += 1
    return r


@cuda.jit(device=True)
def _dgru_cell(g, sh_h, sh_m, sh_u, sh_idx, sh_dh, whh_t, b_hh, A, refresh, H, tid, nt, out, sel, t, b, write_sel):
    """One D-GRU step of one stream by one block (paper eq. 4-5); twin of reference.dgru_step.

    g (3H,) input pre-activations W_ih x + b_ih; sh_h (H,) and sh_m (3H,) the state, updated in
    place; sh_u, sh_idx, sh_dh scratch. Begins and ends with every thread past a barrier.
    """
    H3 = 3 * H
    if refresh:  # exact M = W_hh h + b_hh every refresh_every steps (float32 drift bound)
        for q in range(tid, H3, nt):
            acc = b_hh[q]
            for j in range(H):
                acc += whh_t[j, q] * sh_h[j]
            sh_m[q] = acc
        cuda.syncthreads()
    for i in range(tid, H, nt):  # z, u for every neuron: needed to select
        sh_u[i] = _ONE - _sigmoid(g[H + i] + sh_m[H + i])
    cuda.syncthreads()
    for i in range(tid, H, nt):  # select by rank; r, n and h' only for the A selected rows
        rk = i if A >= H else _rank(sh_u, i, H)
        if rk < A:
            ui = sh_u[i]
            r = _sigmoid(g[i] + sh_m[i])
            n = math.tanh(g[2 * H + i] + r * sh_m[2 * H + i])
            hi = sh_h[i]
            hn = hi + ui * (n - hi)
            sh_idx[rk] = i  # the rank is the slot in the list of changed columns
            sh_dh[rk] = hn - hi
            sh_h[i] = hn
            if write_sel:
                sel[t, b, i] = True
    cuda.syncthreads()
    for q in range(tid, H3, nt):  # M += W_hh[:, S] Δh_S: A coalesced column reads
        acc = sh_m[q]
        for k in range(A):
            acc += whh_t[sh_idx[k], q] * sh_dh[k]
        sh_m[q] = acc
    for i in range(tid, H, nt):
        out[t, b, i] = sh_h[i]
    cuda.syncthreads()


# --------------------------------------------------------------------------------------------
# kernels (factories: sizes are compile-time constants, one compilation per layer shape)
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _gemm(tile, reg):
    """out = act(x @ wt + b) for x (N, K), wt (K, Q), b (Q,), out (N, Q): grid (ceil(N/BM), ceil(Q/BN))."""
    BM = BN = tile * reg
    BK = tile
    NT = tile * tile
    A_SHAPE, B_SHAPE, ACC_SHAPE = (BM, BK), (BK, BN), (reg, reg)

    @cuda.jit
    def gemm(x, wt, b, out, act):
        N, K = x.shape
        Q = wt.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * tile + tx
        n0 = cuda.blockIdx.x * BM
        q0 = cuda.blockIdx.y * BN
        As = cuda.shared.array(A_SHAPE, float32)
        Bs = cuda.shared.array(B_SHAPE, float32)
        acc = cuda.local.array(ACC_SHAPE, float32)
        av = cuda.local.array(reg, float32)
        for i in range(reg):  # outputs (n0 + ty + i·tile, q0 + tx + j·tile): coalesced over tx
            for j in range(reg):
                q = q0 + tx + j * tile
                acc[i, j] = b[q] if q < Q else _ZERO  # bias first, then columns ascending (as cpu)
        for k0 in range(0, K, BK):
            for e in range(tid, BM * BK, NT):  # consecutive threads read consecutive k of a row
                r = e // BK
                c = e - r * BK
                n = n0 + r
                k = k0 + c
                As[r, c] = x[n, k] if (n < N and k < K) else _ZERO
            for e in range(tid, BK * BN, NT):  # consecutive threads read consecutive q of wt row k
                r = e // BN
                c = e - r * BN
                k = k0 + r
                q = q0 + c
                Bs[r, c] = wt[k, q] if (k < K and q < Q) else _ZERO
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(reg):
                    av[i] = As[ty + i * tile, kk]
                for j in range(reg):
                    bv = Bs[kk, tx + j * tile]
                    for i in range(reg):
                        acc[i, j] += av[i] * bv
            cuda.syncthreads()
        for i in range(reg):
            n = n0 + ty + i * tile
            if n < N:
                for j in range(reg):
                    q = q0 + tx + j * tile
                    if q < Q:
                        out[n, q] = _activate(acc[i, j], act)

    return gemm


@cuda.jit
def _gru_cell(gi_t, m, h, out_t):
    """Dense GRU step, one thread per (stream, neuron); m = W_hh h + b_hh from the GEMM."""
    k = cuda.grid(1)
    B, H = h.shape
    if k < B * H:
        b = k // H
        i = k - b * H
        r = _sigmoid(gi_t[b, i] + m[b, i])
        z = _sigmoid(gi_t[b, H + i] + m[b, H + i])
        n = math.tanh(gi_t[b, 2 * H + i] + r * m[b, 2 * H + i])
        hb = h[b, i]
        hn = hb + (_ONE - z) * (n - hb)
        h[b, i] = hn
        out_t[b, i] = hn


@lru_cache(maxsize=None)
def _dgru(H, nt):
    """D-GRU over T frames, dense input: gi (T, B, 3H) precomputed; one block of nt threads per stream."""
    H3 = 3 * H

    @cuda.jit
    def dgru(gi, whh_t, b_hh, A, refresh_every, h, m, step, out, sel):
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        sh_h = cuda.shared.array(H, float32)
        sh_m = cuda.shared.array(H3, float32)
        sh_u = cuda.shared.array(H, float32)
        sh_dh = cuda.shared.array(H, float32)
        sh_idx = cuda.shared.array(H, int32)
        T = gi.shape[0]
        write_sel = sel.shape[0] == T
        s0 = step[b]
        for i in range(tid, H, nt):
            sh_h[i] = h[b, i]
        for q in range(tid, H3, nt):
            sh_m[q] = m[b, q]
        cuda.syncthreads()
        for t in range(T):
            refresh = (s0 + t) % refresh_every == 0
            _dgru_cell(gi[t, b], sh_h, sh_m, sh_u, sh_idx, sh_dh, whh_t, b_hh, A, refresh, H, tid, nt, out, sel, t, b, write_sel)
        for i in range(tid, H, nt):
            h[b, i] = sh_h[i]
        for q in range(tid, H3, nt):
            m[b, q] = sh_m[q]
        if tid == 0:
            step[b] = s0 + T

    return dgru


@lru_cache(maxsize=None)
def _dgru_sparse(H, I, nt):
    """D-GRU over T frames whose input x (T, B, I) changes in few entries: input accumulator g."""
    H3 = 3 * H

    @cuda.jit
    def dgru_sparse(x, wih_t, b_ih, whh_t, b_hh, A, refresh_every, h, m, g, xprev, step, out, sel):
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        sh_h = cuda.shared.array(H, float32)
        sh_m = cuda.shared.array(H3, float32)
        sh_g = cuda.shared.array(H3, float32)
        sh_dx = cuda.shared.array(I, float32)
        sh_u = cuda.shared.array(H, float32)
        sh_dh = cuda.shared.array(H, float32)
        sh_idx = cuda.shared.array(H, int32)
        T = x.shape[0]
        write_sel = sel.shape[0] == T
        s0 = step[b]
        for i in range(tid, H, nt):
            sh_h[i] = h[b, i]
        for q in range(tid, H3, nt):
            sh_m[q] = m[b, q]
            sh_g[q] = g[b, q]
        cuda.syncthreads()
        for t in range(T):
            refresh = (s0 + t) % refresh_every == 0
            for j in range(tid, I, nt):  # the input itself on a refresh, else its change
                xj = x[t, b, j]
                sh_dx[j] = xj if refresh else xj - xprev[b, j]
                xprev[b, j] = xj
            cuda.syncthreads()
            for q in range(tid, H3, nt):  # g = W_ih x + b_ih, from the changed columns only
                if refresh:
                    acc = b_ih[q]
                    for j in range(I):
                        acc += wih_t[j, q] * sh_dx[j]
                else:
                    acc = sh_g[q]
                    for j in range(I):
                        d = sh_dx[j]
                        if d != _ZERO:  # the same j for the whole warp: no divergence
                            acc += wih_t[j, q] * d
                sh_g[q] = acc
            cuda.syncthreads()
            _dgru_cell(sh_g, sh_h, sh_m, sh_u, sh_idx, sh_dh, whh_t, b_hh, A, refresh, H, tid, nt, out, sel, t, b, write_sel)
        for i in range(tid, H, nt):
            h[b, i] = sh_h[i]
        for q in range(tid, H3, nt):
            m[b, q] = sh_m[q]
            g[b, q] = sh_g[q]
        if tid == 0:
            step[b] = s0 + T

    return dgru_sparse


@lru_cache(maxsize=None)
def _topa(H, nt):
    """The select gate alone: mask[b, i] = rank of u[b, i] < A (one block per row)."""

    @cuda.jit
    def topa(u, A, mask):
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        sh_u = cuda.shared.array(H, float32)
        for i in range(tid, H, nt):
            sh_u[i] = u[b, i]
        cuda.syncthreads()
        for i in range(tid, H, nt):
            mask[b, i] = _rank(sh_u, i, H) < A

    return topa


@cuda.jit
def _gather(src, idx, dst):
    """dst[k, :] = src[idx[k], :], or zeros where idx[k] < 0 (a fresh stream)."""
    e = cuda.grid(1)
    N, K = dst.shape
    if e < N * K:
        k = e // K
        c = e - k * K
        s = idx[k]
        dst[k, c] = src[s, c] if s >= 0 else 0


@cuda.jit
def _scatter(src, idx, dst):
    """dst[idx[k], :] = src[k, :]."""
    e = cuda.grid(1)
    N, K = src.shape
    if e < N * K:
        k = e // K
        c = e - k * K
        dst[idx[k], c] = src[k, c]


@cuda.jit
def _layer_norm(x, w, b, eps, out):
    """LayerNorm of rows of x (N, C), one thread per row; twin of reference.layer_norm.

    Sums over c in index order, as the cpu backend's _layer_norm: a row gives the same bits alone or in a batch.
    """
    N, C = x.shape
    inv_c = _ONE / float32(C)
    for n in range(cuda.grid(1), N, cuda.gridsize(1)):
        s = _ZERO
        for c in range(C):
            s += x[n, c]
        mu = s * inv_c
        v = _ZERO
        for c in range(C):
            d = x[n, c] - mu
            v += d * d
        inv = _ONE / math.sqrt(v * inv_c + eps)
        for c in range(C):
            out[n, c] = (x[n, c] - mu) * inv * w[c] + b[c]


# The glue kernels give each output entry to one thread (grid-stride loops over flat indices:
# consecutive threads take consecutive entries of the last axis, coalesced reads and writes).


@cuda.jit
def _swap01(x, y):
    """y[j, i, k] = x[i, j, k] for x (a, b, c), y (b, a, c)."""
    nb, na, nc = y.shape
    for e in range(cuda.grid(1), na * nb * nc, cuda.gridsize(1)):
        r = e // nc
        k = e - r * nc
        j = r // na
        i = r - j * na
        y[j, i, k] = x[i, j, k]


@cuda.jit
def _flip0(x, y):
    """y[i, k] = x[n - 1 - i, k] for x, y (n, m)."""
    n, m = y.shape
    for e in range(cuda.grid(1), n * m, cuda.gridsize(1)):
        i = e // m
        k = e - i * m
        y[i, k] = x[n - 1 - i, k]


@cuda.jit
def _add(a, b, y):
    """y = a + b for flat (n,) arrays."""
    for e in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
        y[e] = a[e] + b[e]


@cuda.jit
def _window(x, start, y):
    """y[r, c] = x[r, start + c], zero where start + c is past the end of x's row (slice, pad)."""
    R, W = y.shape
    for e in range(cuda.grid(1), R * W, cuda.gridsize(1)):
        r = e // W
        c = e - r * W
        k = start + c
        y[r, c] = x[r, k] if k < x.shape[1] else _ZERO


@cuda.jit
def _put_cols(x, y, off):
    """y[r, off + c] = x[r, c] for x (R, w): one part of a concatenation (threads over x)."""
    R, w = x.shape
    for e in range(cuda.grid(1), R * w, cuda.gridsize(1)):
        r = e // w
        c = e - r * w
        y[r, off + c] = x[r, c]


def _blocks(n, nt):
    return (n + nt - 1) // nt


def _launch_gemm(x2, wt, b, out2, act):
    """out2 = act(x2 @ wt + b) on the device; x2 (N, K), out2 (N, Q); nothing for N = 0."""
    N, Q = out2.shape
    if N == 0:
        return
    tile, reg = int(config.GEMM_TILE), int(config.GEMM_REG)
    bm = tile * reg
    _gemm(tile, reg)[(_blocks(N, bm), _blocks(Q, bm)), (tile, tile)](x2, wt, b, out2, act)


def _shared_bytes(H, I, sparse):
    return 4 * ((10 * H + I) if sparse else 7 * H)


_NO_SEL = None


def _no_sel():
    global _NO_SEL
    if _NO_SEL is None:
        _NO_SEL = cuda.to_device(np.zeros((0, 1, 1), np.bool_))
    return _NO_SEL


def _check_input(name, x, ndim, last):
    """x as a float32 device array of ``ndim`` dimensions whose last one is ``last``.

    Returns (device array, came_from_host). Host arrays are validated (float dtype, finite) and
    copied; device arrays must already be float32 and are trusted to be finite (checking would
    copy them back).
    """
    dev = is_device_array(x)
    a = x if dev else np.asarray(x)
    if dev and np.dtype(a.dtype) != np.float32:
        raise ParameterError(f"{name} must be a float32 device array, got dtype {a.dtype}")
    if not dev and not np.issubdtype(a.dtype, np.floating):
        raise ParameterError(f"{name} must be a float array, got dtype {a.dtype}")
    shape = tuple(a.shape)
    if len(shape) != ndim or shape[-1] != last:
        want = ("T", "B", last) if ndim == 3 else ("N", last)
        raise ParameterError(f"{name} must have shape ({', '.join(map(str, want))}), got {shape}")
    if dev:
        return a, False
    return to_device(as_f32(name, a, shape)), True
