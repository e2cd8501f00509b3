"""The cuda backend's layers (validated, device-resident), its shape glue ``Ops`` and its executor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import cuda

from ...errors import ParameterError
from ...kinds import num_selected
from .._graph import LAYER_RUNNERS, ExecState, GraphExecutor
from ..checks import ACT_CODES, DEFAULT_REFRESH, as_f32, check_gru_weights, check_linear_weights, check_norm_weights, positive_int, selected_count
from . import config
from .device import Workspace, copy_device, is_device_array, require_device, to_device
from .kernels import (_add, _blocks, _check_input, _dgru, _dgru_sparse, _flip0, _gather, _gru_cell, _launch_gemm, _layer_norm, _no_sel, _put_cols,
                      _scatter, _shared_bytes, _swap01, _topa, _window)

__all__ = ["GRULayer", "GRUState", "Linear", "LayerNorm", "Ops", "Executor", "RUNNERS", "gru_sequence", "dgru_sequence", "gru_step", "dgru_step", "top_a"]

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
                _gather[_blocks(dst.size, config.THREADS_PER_BLOCK), config.THREADS_PER_BLOCK](src, d_idx, dst)
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
            _scatter[_blocks(src.size, config.THREADS_PER_BLOCK), config.THREADS_PER_BLOCK](src, d_idx, dst)


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
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name)
        I, H = self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        self.sparse_input = bool(sparse_input)
        self.refresh_every = positive_int("refresh_every", refresh_every)
        if A is not None:  # A neurons per step (resolved by the plan, or asked for): the D-GRU kernel even at A = H
            self.A, self.dense = selected_count(A, H), False
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
        if need > config.MAX_SHARED_BYTES:
            raise ParameterError(
                f"{self.name}: hidden size H={self.hidden_size} (input {self.input_size}) needs {need} bytes of shared memory "
                f"per block for the cuda D-GRU kernel, more than {config.MAX_SHARED_BYTES}; use backend 'cpu' or P=100"
            )

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        """Zero (or ``h0``, host (B, H)) state for ``batch`` independent streams, on the device."""
        B, H = positive_int("batch", batch), self.hidden_size
        h = None if h0 is None else as_f32("h0", h0, (B, H))
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
        nt = int(config.THREADS_PER_BLOCK)
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
    A = positive_int("A", A)  # None is an error here, not "every neuron"
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
    A = positive_int("A", A)
    if A > H:
        raise ParameterError(f"A={A!r} must be an integer in [1, H={H}]")
    d_u = to_device(as_f32("u", u, u.shape))
    mask = _zeros((B, H), np.bool_)
    if B:
        nt = int(config.THREADS_PER_BLOCK)
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
        self.weight, self.bias = check_linear_weights(weight, bias, activation, name)
        self.out_features, self.in_features = self.weight.shape
        self.activation = activation
        self._code = ACT_CODES[activation]
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
        nt = int(config.THREADS_PER_BLOCK)
        kernel[min(_blocks(n, nt), int(config.GLUE_MAX_BLOCKS)), nt](*args)


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
        self.weight, self.bias = check_norm_weights(weight, bias, name)
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
    batches_files = True
    GRULayer, Linear, LayerNorm = GRULayer, Linear, LayerNorm

    def __init__(self, plan, tensors, *, refresh_every=None, exact=False):
        require_device()
        self._upload = Workspace()  # device copy of the features
        super().__init__(plan, tensors, refresh_every=refresh_every, exact=exact)

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
