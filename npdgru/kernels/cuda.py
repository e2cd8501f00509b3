"""numba.cuda kernels for the GRU and the D-GRU over B independent streams, mirroring ``cpu.py``.

Imported lazily, only when ``backend="cuda"`` is asked for (``npdgru.model.get_backend``), so that
``import npdgru`` never imports numba.cuda. It runs on a CUDA GPU (``pip install -e ".[cuda]"``,
numba-cuda) or, slowly, on numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python
starts), which is how the tests run it without a GPU.

The same public names as ``cpu.py`` (and ``reference.py``): :class:`GRULayer` (``init_state``,
``forward``, ``_run``), :class:`GRUState`, :class:`Linear` (``forward``, ``_run``),
:func:`gru_sequence`, :func:`dgru_sequence`, plus :func:`top_a`, :func:`gru_step` and
:func:`dgru_step`, and for the architecture graph (``model.py``) :class:`LayerNorm` and the shape
glue :class:`Ops` (the device twin of ``model.HostOps``). Every kernel below has its NumPy twin in ``reference.py``:

    kernel               what it computes                                     NumPy twin
    _gemm (factory)      out = act(x Wᵀ + b), tiled over rows and features     reference.Linear
    _gru_cell            one dense GRU step, elementwise after M = W_hh h      reference.gru_step
    _dgru (factory)      T D-GRU steps of one stream per block                 reference.dgru_sequence
    _dgru_sparse         the same with an input accumulator (sparse input)     reference.dgru_sequence
    _topa (factory)      the select gate alone                                 reference.top_a
    _gather/_scatter     state rows in and out (StreamBatch join/leave)        numpy fancy indexing
    _layer_norm          LayerNorm of rows, one thread per row                 reference.layer_norm
    _swap01, _flip0,     shape glue between graph layers (:class:`Ops`), one   model.HostOps
    _add, _window,       thread per output entry: swap axes 0 and 1, reverse
    _put_cols            axis 0, sum, slice / zero-pad and concatenate the
                         last axis

Layouts (coalescing). Weights are stored transposed, column-contiguous, as in ``cpu.py``:
``wih_t`` (I, 3H), ``whh_t`` (H, 3H), ``Linear.wt`` (in, out). Threads of a block vary over the
output row q (one of the 3H gate rows, or an output feature), so ``wt[j, q]`` for a fixed column
j, the update from column j, is one coalesced read, and a D-GRU step reads only the A selected
columns of ``whh_t``. Activations and states are row-major with the stream (or frame·stream) as
the row: x (T, B, I), h (B, H), M (B, 3H).

Launch configuration (module parameters, read at every launch, so tests can lower them to force
multi-block and remainder paths; kernels are compiled once per value):

* ``THREADS_PER_BLOCK`` (128): the D-GRU runs one block per stream, looping over the T frames of
  a call inside the kernel with h, M, u and the selection in shared memory, so a call of T frames
  is one launch; elementwise kernels use it as their block size.
* ``GLUE_MAX_BLOCKS`` (4096): :class:`LayerNorm` (one thread per row) and the shape glue
  :class:`Ops` (one thread per output entry) are grid-stride loops on at most this many blocks
  of ``THREADS_PER_BLOCK``; past that a thread takes several rows or entries (tests lower it so
  that the simulator starts few threads).
* ``GEMM_TILE`` (16) x ``GEMM_REG`` (4): the dense layers and the input products of all T·B
  frames are one tiled GEMM: a (GEMM_TILE, GEMM_TILE) block computes a 64 x 64 output tile, each
  thread 4 x 4 outputs in registers, from shared-memory tiles of 64 rows x 16 reduction entries.

Selection (paper eq. 4). Per stream, u = 1 − z for all H neurons goes to shared memory; each
thread computes the rank of its neurons by counting,
``rank_i = #{j : u_j > u_i or (u_j == u_i and j < i)}``, and neuron i is selected iff rank_i < A.
That is exactly the stable descending sort of ``reference.top_a`` (ties to the lower index),
with no data-dependent control flow across threads and no atomics: O(H²/threads) comparisons of
broadcast shared-memory reads, about as many as the 3H·A/threads multiply-adds of the
accumulator update. The rank also gives each selected neuron its slot in the compacted list of
changed columns (no prefix sum needed).

Accumulators (DESIGN.md section 1), the same semantics as ``cpu.GRULayer``: M = W_hh h + b_hh is
kept per stream and updated from the A changed columns, ``M += W_hh[:, S] Δh_S``; it is recomputed
exactly when ``step % refresh_every == 0`` (step counted per stream, so the first step of a
stream computes it). At P = 100 the layer runs the dense GRU: per step one GEMM over all streams
(M = h W_hhᵀ + b_hh, weights read once per tile of 64 streams) and one elementwise kernel.

Determinism. Every output entry is computed by one thread, in a fixed order (bias first, then
columns ascending, or selected columns in rank order), independent of the block size, the batch
size B and how the frames are split into calls. So a stream in a batch gives the same bits as the
stream alone, and streaming gives the offline bits, as on the cpu backend. The bits differ from
the cpu backend's (other tanh, FMA contraction, another order of the accumulator updates).

float32 throughout; ``math.tanh`` on float32 is CUDA's ``tanhf``, σ(a) = ½ + ½·tanh(a/2) (as in
``cpu.py``; no overflow for large |a|). Static shared memory bounds the sizes: 7H floats (dense
input) or 10H + I floats (sparse input) per block, at most 48 KiB, i.e. H <= 1755 (H = 400 uses
11 KiB).

Nothing is allocated inside kernel loops; per call, outputs go into workspaces kept in the
state (GRU layers) or the layer (Linear), grown when a call has more frames than before, so
streaming calls do no device allocation after the first. ``_run`` returns views of those
workspaces (valid until the next call); the public ``forward`` returns fresh arrays. The graph
glue (:class:`Ops`) and :class:`LayerNorm` return new arrays: their values are small (a frame's
width) and a value may be read by several later layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import config as _numba_config
from numba import cuda, float32, int32

from ..errors import ParameterError
from ..kinds import num_selected
from .cpu import _ACT_CODES, DEFAULT_REFRESH, _as_f32, _check_gru_weights, _check_linear_weights, _check_norm_weights, _positive_int, _selected_count
from ._graph import LAYER_RUNNERS, ExecState, GraphExecutor

__all__ = [
    "GRULayer",
    "GRUState",
    "Linear",
    "LayerNorm",
    "Ops",
    "gru_sequence",
    "dgru_sequence",
    "gru_step",
    "dgru_step",
    "top_a",
    "DEFAULT_REFRESH",
    "THREADS_PER_BLOCK",
    "GEMM_TILE",
    "GEMM_REG",
    "GLUE_MAX_BLOCKS",
    "require_device",
    "is_device_array",
    "to_device",
    "synchronize",
    "copy_device",
    "Workspace",
]

THREADS_PER_BLOCK = 128  # D-GRU block (one stream) and elementwise kernels
GEMM_TILE = 16  # GEMM block is GEMM_TILE x GEMM_TILE threads ...
GEMM_REG = 4  # ... each computing GEMM_REG x GEMM_REG outputs: 64 x 64 output tiles
MAX_SHARED_BYTES = 48 * 1024  # static shared memory per block
GLUE_MAX_BLOCKS = 4096  # grid cap of the LayerNorm and shape-glue kernels (grid-stride loops)

# A batch of one stream is a grid of one block: say nothing about it (numba-cuda warns about
# grids smaller than the GPU by default).
_numba_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)

INSTALL_HINT = (
    'on a machine with an NVIDIA GPU and driver install the cuda extra:  pip install -e ".[cuda]"  '
    '(numba-cuda; add  "numba-cuda[cu12]"  or  "numba-cuda[cu13]"  for the CUDA libraries matching '
    "the driver); without a GPU set NUMBA_ENABLE_CUDASIM=1 before Python starts to run numba's (slow) "
    "CUDA simulator, or use backend 'cpu'"
)


def simulator() -> bool:
    """True when numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(_numba_config.ENABLE_CUDASIM)


_DEVICE_OK = False  # require_device() succeeded once (real GPU)


def _probe(a):
    a[0] = 1.0


def require_device() -> None:
    """Raise ParameterError, with the fix, unless a CUDA GPU (or the simulator) can run kernels."""
    if simulator():
        return
    try:
        ok = cuda.is_available()
    except Exception as e:  # a broken driver or bindings install  # pragma: no cover
        raise ParameterError(f"backend 'cuda': numba.cuda cannot use the GPU ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if not ok:
        raise ParameterError(f"backend 'cuda': no CUDA GPU found (numba.cuda.is_available() is False); {INSTALL_HINT}")
    global _DEVICE_OK
    if _DEVICE_OK:
        return
    try:  # kernels are compiled by NVVM (and NVRTC): check now, not at the first launch
        cuda.compile_ptx_for_current_device(_probe, (float32[::1],))
    except Exception as e:  # pragma: no cover (needs a GPU without the CUDA libraries)
        raise ParameterError(f"backend 'cuda': a GPU is present but numba cannot compile for it ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    _DEVICE_OK = True


def is_device_array(a) -> bool:
    """True for a numba device array (a simulator one under NUMBA_ENABLE_CUDASIM=1)."""
    return cuda.devicearray.is_cuda_ndarray(a)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def to_device(a, workspace=None):
    """A host float array as a float32 device array (device arrays are returned as they are).

    With a :class:`Workspace` the copy goes into it (no device allocation once it is large enough).
    """
    if is_device_array(a):
        return a
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.strides != _c_strides(a.shape, a.itemsize):
        # numpy calls x[None] C-contiguous whatever the stride of a size-1 axis is; numba's
        # device arrays do not (reshape then raises "operation requires copying"): make it canonical
        a = a.copy()
    if workspace is None:
        return cuda.to_device(a)
    d = workspace.get(a.shape)
    if a.size:
        d.copy_to_device(a)
    return d


def copy_device(a):
    """A new device array with the contents of device array ``a``."""
    d = cuda.device_array(a.shape, a.dtype)
    if a.size:
        d.copy_to_device(a)
    return d


def synchronize() -> None:
    """Wait for every launched kernel (for timing)."""
    cuda.synchronize()


class Workspace:
    """A grow-only float32 device buffer; ``get(shape)`` is a C-contiguous view of its start.

    Reused by every call, so that streaming (one frame per call) allocates nothing on the device
    after the first call. A view is valid until the next ``get`` on the same workspace.
    """

    def __init__(self, dtype=np.float32):
        self.dtype, self.buf = dtype, None

    def get(self, shape):
        n = int(np.prod(shape))
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = cuda.device_array(max(n, 1), self.dtype)
        return self.buf[:n].reshape(shape)


# --------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _sigmoid(a):
    """σ(a) = ½ + ½·tanh(a/2) in float32 (no exp overflow; the form cpu.py uses)."""
    return _HALF + _HALF * math.tanh(_HALF * a)


@cuda.jit(device=True)
def _activate(v, code):
    """0 none, 1 relu, 2 sigmoid, 3 tanh (the codes of cpu._ACT_CODES)."""
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

    Sums over c in index order, as cpu._layer_norm: a row gives the same bits alone or in a batch.
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
    tile, reg = int(GEMM_TILE), int(GEMM_REG)
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
    return to_device(_as_f32(name, a, shape)), True


# --------------------------------------------------------------------------------------------
# GRU layers
# --------------------------------------------------------------------------------------------

_BATCH_FIELDS = ("h", "m", "g", "xprev", "step")


@dataclass
class GRUState:
    """Carried state of one GRU layer for B streams, on the device (cuda backend).

    h     (B, H)   hidden state
    m     (B, 3H)  recurrent accumulator W_hh h + b_hh (D-GRU; scratch of the dense GRU)
    g     (B, 3H)  input accumulator W_ih x + b_ih (sparse-input layers)
    xprev (B, I)   the input that ``g`` was built from
    step  (B,)     int64 steps since start; accumulators refresh when step % refresh_every == 0
    gi, out        workspaces of the input products (T, B, 3H) and outputs (T, B, H) of a call
    """

    h: object
    m: object
    g: object
    xprev: object
    step: object
    gi: "Workspace"
    out: "Workspace"

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    def to_host(self) -> dict:
        """The batch fields as NumPy arrays (copies), e.g. ``state.to_host()["h"]``."""
        return {f: getattr(self, f).copy_to_host() for f in _BATCH_FIELDS}

    def take(self, rows) -> "GRUState":
        """A new state of ``len(rows)`` streams: row k is a copy of stream ``rows[k]``, or a fresh
        (zero) stream where ``rows[k] < 0``. One launch per field."""
        idx = np.asarray(rows, np.int64).reshape(-1)
        if idx.size and (idx.max() >= self.batch):
            raise ParameterError(f"rows {idx.tolist()} out of range for a batch of {self.batch}")
        n = idx.size
        new = _new_state(n, self.h.shape[1], self.xprev.shape[1])
        if n:
            d_idx = cuda.to_device(idx)
            for f in _BATCH_FIELDS:
                src, dst = getattr(self, f), getattr(new, f)
                if src.ndim == 1:
                    src, dst = src.reshape(src.shape[0], 1), dst.reshape(n, 1)
                _gather[_blocks(dst.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](src, d_idx, dst)
        return new

    def put(self, rows, other: "GRUState") -> None:
        """Write the streams of ``other`` into rows ``rows`` of this state (distinct rows)."""
        idx = np.asarray(rows, np.int64).reshape(-1)
        if idx.size != other.batch or (idx.size and (idx.min() < 0 or idx.max() >= self.batch)) or len(set(idx.tolist())) != idx.size:
            raise ParameterError(f"rows {idx.tolist()} must be {other.batch} distinct rows of a batch of {self.batch}")
        if idx.size == 0:
            return
        d_idx = cuda.to_device(idx)
        for f in _BATCH_FIELDS:
            src, dst = getattr(other, f), getattr(self, f)
            if src.ndim == 1:
                src, dst = src.reshape(src.shape[0], 1), dst.reshape(dst.shape[0], 1)
            _scatter[_blocks(src.size, THREADS_PER_BLOCK), THREADS_PER_BLOCK](src, d_idx, dst)


def _zeros(shape, dtype=np.float32):
    return cuda.to_device(np.zeros(shape, dtype))


def _new_state(B, H, I, h0=None) -> GRUState:
    return GRUState(
        h=_zeros((B, H)) if h0 is None else to_device(h0),
        m=_zeros((B, 3 * H)), g=_zeros((B, 3 * H)), xprev=_zeros((B, I)), step=_zeros(B, np.int64),
        gi=Workspace(), out=Workspace(),
    )


class GRULayer:
    """A (D-)GRU layer on the cuda backend, from PyTorch-layout weights; same interface as cpu.GRULayer.

    Parameters
    ----------
    weight_ih : (3H, I)   weight_hh : (3H, H)   bias_ih, bias_hh : (3H,)   gate order r, z, n
    update_percent : P in (0, 100]; A = ceil(P·H/100) neurons per step. P = 100 runs the dense GRU.
    sparse_input : keep an input accumulator updated from the changed input entries.
    refresh_every : accumulators are recomputed exactly every this many steps of a stream.
    """

    backend = "cuda"

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, *, update_percent=100.0, sparse_input=False, refresh_every=DEFAULT_REFRESH, name="gru", A=None):
        self.name = name
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = _check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name)
        I, H = self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        self.sparse_input = bool(sparse_input)
        self.refresh_every = _positive_int("refresh_every", refresh_every)
        if A is not None:  # A neurons per step (resolved by the plan, or asked for): the D-GRU kernel even at A = H
            self.A, self.dense = _selected_count(A, H), False
            self.update_percent = 100.0 * self.A / H
        else:
            self.A = num_selected(update_percent, H)
            self.update_percent = float(update_percent)
            self.dense = self.update_percent == 100.0
        self._check_shared(dense=self.dense)
        self.d_wih_t = cuda.to_device(np.ascontiguousarray(self.weight_ih.T))  # (I, 3H) column-contiguous
        self.d_whh_t = cuda.to_device(np.ascontiguousarray(self.weight_hh.T))  # (H, 3H)
        self.d_bias_ih = cuda.to_device(self.bias_ih)
        self.d_bias_hh = cuda.to_device(self.bias_hh)

    def _check_shared(self, dense):
        if dense:
            return
        need = _shared_bytes(self.hidden_size, self.input_size, self.sparse_input)
        if need > MAX_SHARED_BYTES:
            raise ParameterError(
                f"{self.name}: hidden size H={self.hidden_size} (input {self.input_size}) needs {need} bytes of shared memory "
                f"per block for the cuda D-GRU kernel, more than {MAX_SHARED_BYTES}; use backend 'cpu' or P=100"
            )

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        """Zero (or ``h0``, host (B, H)) state for ``batch`` independent streams, on the device."""
        B, H = _positive_int("batch", batch), self.hidden_size
        h = None if h0 is None else _as_f32("h0", h0, (B, H))
        return _new_state(B, H, self.input_size, h)

    def _check_state(self, state, B):
        if not isinstance(state, GRUState) or tuple(state.h.shape) != (B, self.hidden_size):
            got = tuple(getattr(getattr(state, "h", None), "shape", ())) or type(state).__name__
            raise ParameterError(f"{self.name}: state is for {got}, x has batch {B} (use layer.init_state(B) of this cuda layer)")
        if tuple(state.xprev.shape) != (B, self.input_size):
            raise ParameterError(f"{self.name}: state was made by a layer of another input size (use layer.init_state(B))")

    def forward(self, x, state: GRUState, *, selected=None):
        """Run T steps for B streams; ``state`` (on the device) is updated in place.

        Parameters
        ----------
        x : (T, B, I) float array (host, cast to float32) or float32 device array
        state : from :meth:`init_state`
        selected : optional (T, B, H) writeable NumPy bool array, filled with the selected neurons

        Returns
        -------
        (T, B, H) float32: a NumPy array for host input, a new device array for device input.
        """
        d_x, host = _check_input(f"{self.name} input x", x, 3, self.input_size)
        T, B = d_x.shape[:2]
        self._check_state(state, B)
        H = self.hidden_size
        d_sel = None
        if selected is not None:
            if not isinstance(selected, np.ndarray) or selected.shape != (T, B, H) or selected.dtype != np.bool_ or not selected.flags.writeable:
                raise ParameterError(f"selected must be a writeable bool array of shape {(T, B, H)}")
            if self.dense:
                selected[...] = True
            elif T:
                d_sel = _zeros((T, B, H), np.bool_)
        out = self._run(d_x, state, d_sel)
        if d_sel is not None:
            selected[...] = d_sel.copy_to_host()
        if host:
            return out.copy_to_host()
        return copy_device(out)

    def _run(self, x, state: GRUState, selected=None):
        """forward() without validation: x float32 C-contiguous device (T, B, I) -> view (T, B, H)
        of the state's output workspace (valid until the next call with this state)."""
        T, B = x.shape[:2]
        H = self.hidden_size
        out = state.out.get((T, B, H))
        if T == 0:
            return out
        nt = int(THREADS_PER_BLOCK)
        sel = selected if selected is not None else _no_sel()
        if self.sparse_input and not self.dense:
            _dgru_sparse(H, self.input_size, nt)[B, nt](
                x, self.d_wih_t, self.d_bias_ih, self.d_whh_t, self.d_bias_hh, self.A, self.refresh_every,
                state.h, state.m, state.g, state.xprev, state.step, out, sel)
            return out
        gi = state.gi.get((T, B, 3 * H))
        _launch_gemm(x.reshape(T * B, self.input_size), self.d_wih_t, self.d_bias_ih, gi.reshape(T * B, 3 * H), 0)
        if self.dense:
            for t in range(T):  # per step: M = h W_hhᵀ + b_hh for all streams (GEMM), then the gates
                _launch_gemm(state.h, self.d_whh_t, self.d_bias_hh, state.m, 0)
                _gru_cell[_blocks(B * H, nt), nt](gi[t], state.m, state.h, out[t])
        else:
            _dgru(H, nt)[B, nt](gi, self.d_whh_t, self.d_bias_hh, self.A, self.refresh_every, state.h, state.m, state.step, out, sel)
        return out


def _layer(weight_ih, weight_hh, bias_ih, bias_hh, A=None, **kw):
    return GRULayer(weight_ih, weight_hh, bias_ih, bias_hh, A=A, **kw)


def gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    """Dense GRU over T steps for B streams, like :func:`npdgru.reference.gru_sequence` (NumPy out)."""
    layer = _layer(weight_ih, weight_hh, bias_ih, bias_hh)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    return layer.forward(x, state)


def dgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, A, *, sparse_input=False, refresh_every=DEFAULT_REFRESH):
    """D-GRU with A selected neurons per step (the accumulator kernel, also at A = H).

    Same arguments and results as :func:`npdgru.reference.dgru_sequence`: (out, S), NumPy arrays.
    """
    A = _positive_int("A", A)  # None is an error here, not "every neuron"
    layer = _layer(weight_ih, weight_hh, bias_ih, bias_hh, A, sparse_input=sparse_input, refresh_every=refresh_every)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    S = np.zeros((x.shape[0], state.batch, layer.hidden_size), np.bool_) if x.ndim == 3 else None
    out = layer.forward(x, state, selected=S)
    return out, S


def gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """One dense GRU step for all streams, like :func:`npdgru.reference.gru_step`: x (B, I), h (B, H) -> h'."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ParameterError(f"x must have shape (B, I), got {x.shape}")
    return gru_sequence(x[None], h, weight_ih, weight_hh, bias_ih, bias_hh)[0]


def dgru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh, A):
    """One D-GRU step for all streams, like :func:`npdgru.reference.dgru_step`: -> (h', S), (B, H) each.

    The step kernel is the sequence kernel with T = 1 (one block per stream, one launch).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ParameterError(f"x must have shape (B, I), got {x.shape}")
    out, S = dgru_sequence(x[None], h, weight_ih, weight_hh, bias_ih, bias_hh, A, refresh_every=1)
    return out[0], S[0]


def top_a(u, A):
    """The select gate on the device, like :func:`npdgru.reference.top_a`: (B, H) -> (B, H) bool."""
    u = np.asarray(u)
    if u.ndim != 2 or u.shape[1] < 1:
        raise ParameterError(f"u must have shape (B, H), got {u.shape}")
    B, H = u.shape
    A = _positive_int("A", A)
    if A > H:
        raise ParameterError(f"A={A!r} must be an integer in [1, H={H}]")
    d_u = to_device(_as_f32("u", u, u.shape))
    mask = _zeros((B, H), np.bool_)
    if B:
        nt = int(THREADS_PER_BLOCK)
        _topa(H, nt)[B, nt](d_u, A, mask)
    return mask.copy_to_host()


# --------------------------------------------------------------------------------------------
# fully connected layers
# --------------------------------------------------------------------------------------------


class Linear:
    """Fully connected layer y = act(x Wᵀ + b) on the cuda backend (float32, tiled GEMM)."""

    backend = "cuda"

    def __init__(self, weight, bias, *, activation="none", name="linear"):
        self.name = name
        self.weight, self.bias = _check_linear_weights(weight, bias, activation, name)
        self.out_features, self.in_features = self.weight.shape
        self.activation = activation
        self._code = _ACT_CODES[activation]
        self.d_wt = cuda.to_device(np.ascontiguousarray(self.weight.T))  # (in, out) column-contiguous
        self.d_bias = cuda.to_device(self.bias)
        self._ws = Workspace()

    def forward(self, x):
        """x (N, in) -> (N, out) float32: NumPy for host input, a new device array for device input."""
        d_x, host = _check_input(f"{self.name}: x", x, 2, self.in_features)
        y = cuda.device_array((d_x.shape[0], self.out_features), np.float32)
        _launch_gemm(d_x, self.d_wt, self.d_bias, y, self._code)
        return y.copy_to_host() if host else y

    def _run(self, x):
        """forward() without validation: device (N, in) -> view of this layer's workspace (N, out)."""
        y = self._ws.get((x.shape[0], self.out_features))
        _launch_gemm(x, self.d_wt, self.d_bias, y, self._code)
        return y


# --------------------------------------------------------------------------------------------
# layer normalisation and shape glue (architecture graphs: model.py)
# --------------------------------------------------------------------------------------------


def _empty(shape, dtype=np.float32):
    """A new C-contiguous device array (contents undefined)."""
    return cuda.device_array(tuple(int(n) for n in shape), dtype)


def _launch(kernel, n, *args):
    """A grid-stride ``kernel`` over n items: THREADS_PER_BLOCK per block, one thread per item
    up to GLUE_MAX_BLOCKS blocks (then each thread takes several); nothing for n = 0."""
    if n:
        nt = int(THREADS_PER_BLOCK)
        kernel[min(_blocks(n, nt), int(GLUE_MAX_BLOCKS)), nt](*args)


def _width(x):
    """Size of the last axis (the simulator's shapes refuse negative indices)."""
    return int(x.shape[x.ndim - 1])


def _rows(x):
    """A C-contiguous device array as (rows, last axis); free (a reshape)."""
    return x.reshape(int(np.prod(x.shape[:-1], dtype=np.int64)), _width(x))


class Ops:
    """Shape glue between the layers of an architecture graph, on float32 C-contiguous device
    arrays; the device twin of ``model.HostOps`` (same methods, same results, new arrays)."""

    @staticmethod
    def swap01(x):
        """(a, b, c) -> (b, a, c)."""
        if x.ndim != 3:
            raise ParameterError(f"swap01 needs a 3-D array, got shape {tuple(x.shape)}")
        a, b, c = x.shape
        y = _empty((b, a, c))
        _launch(_swap01, y.size, x, y)
        return y

    @staticmethod
    def flip0(x):
        """Reverse axis 0."""
        y = _empty(x.shape)
        if y.size:
            n = x.shape[0]
            _launch(_flip0, y.size, x.reshape(n, y.size // n), y.reshape(n, y.size // n))
        return y

    @staticmethod
    def concat(xs):
        """Concatenate along the last axis (equal leading shapes)."""
        xs = list(xs)
        if not xs:
            raise ParameterError("concat needs at least one array")
        lead = tuple(xs[0].shape[:-1])
        if any(tuple(x.shape[:-1]) != lead for x in xs):
            raise ParameterError(f"concat: leading shapes differ: {[tuple(x.shape) for x in xs]}")
        W = sum(_width(x) for x in xs)
        y = _empty(lead + (W,))
        if y.size == 0:
            return y
        y2, off = _rows(y), 0
        for x in xs:
            if x.size:
                _launch(_put_cols, x.size, _rows(x), y2, off)
            off += _width(x)
        return y

    @staticmethod
    def add(a, b):
        """a + b (equal shapes)."""
        if tuple(a.shape) != tuple(b.shape):
            raise ParameterError(f"add: shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
        y = _empty(a.shape)
        n = y.size
        if n:
            _launch(_add, n, a.reshape(n), b.reshape(n), y.reshape(n))
        return y

    @staticmethod
    def pad(x, out):
        """Zero-pad the last axis at the end to ``out`` entries (out >= width)."""
        w = _width(x)
        if out < w:
            raise ParameterError(f"pad: out={out} is less than the width {w}")
        y = _empty(tuple(x.shape[:-1]) + (int(out),))
        if y.size:
            _launch(_window, y.size, _rows(x), 0, _rows(y))
        return y

    @staticmethod
    def slice(x, start, stop):
        """x[..., start:stop] (Python slice rules on the last axis)."""
        start, stop, _ = slice(start, stop).indices(_width(x))
        stop = max(stop, start)
        y = _empty(tuple(x.shape[:-1]) + (stop - start,))
        if y.size:
            _launch(_window, y.size, _rows(x), start, _rows(y))
        return y


class LayerNorm:
    """:func:`npdgru.reference.layer_norm` over rows of (N, C) on the cuda backend (float32).

    One thread per row, sums in index order (as ``cpu.LayerNorm``): batch-invariant bits.
    """

    backend = "cuda"

    def __init__(self, weight, bias, *, eps=1e-5, name="norm"):
        self.name = name
        self.weight, self.bias = _check_norm_weights(weight, bias, name)
        self.size = self.weight.shape[0]
        self.eps = np.float32(eps)
        self.d_weight = cuda.to_device(self.weight)
        self.d_bias = cuda.to_device(self.bias)

    def forward(self, x):
        """x (N, C) -> (N, C) float32: NumPy for host input, a new device array for device input."""
        d_x, host = _check_input(f"{self.name}: x", x, 2, self.size)
        y = self._run(d_x)
        return y.copy_to_host() if host else y

    def _run(self, x):
        """forward() without validation: device (N, C) -> new device array (N, C)."""
        y = _empty(x.shape)
        _launch(_layer_norm, x.shape[0], x, self.d_weight, self.d_bias, self.eps, y)
        return y


RUNNERS = dict(LAYER_RUNNERS)  # every kind on the device layers above and the device glue Ops


class Executor(GraphExecutor):
    """A :class:`~npdgru.plan.Plan` on the GPU: features are uploaded once per call and the steps
    pass device arrays to each other; only the mask comes back (or stays, for device features)."""

    backend = "cuda"
    ops = Ops
    runners = RUNNERS
    GRULayer, Linear, LayerNorm = GRULayer, Linear, LayerNorm

    def __init__(self, plan, tensors, *, refresh_every=None):
        require_device()
        self._upload = Workspace()  # device copy of the features
        super().__init__(plan, tensors, refresh_every=refresh_every)

    def check_features(self, features, state):
        nf = self.plan.n_features
        if not isinstance(state, ExecState) or any(not isinstance(s, GRUState) for s in state.layers):
            raise ParameterError("state was not made by a cuda model's init_state (states do not move between backends)")
        self._on_device = is_device_array(features)
        if not self._on_device:
            x = super().check_features(features, state)
            return to_device(x, self._upload)  # one upload; every step runs on the device
        x = features
        if x.ndim != 3 or x.shape[2] != nf or x.shape[1] != state.batch:
            raise ParameterError(f"features must have shape (T, {state.batch}, {nf}), got {tuple(x.shape)}")
        if np.dtype(x.dtype) != np.float32:
            raise ParameterError(f"device features must be float32, got {x.dtype}")
        return x

    def finish(self, y):
        # y is a view of a step's workspace: hand out a copy
        return copy_device(y) if self._on_device else y.copy_to_host()
