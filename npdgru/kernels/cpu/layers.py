"""The cpu backend's layers (float32, Numba kernels of ``kernels.py``) and its executor.

Each public layer validates its arguments (``..checks``) and then calls the kernels through
``_run``, which trusts them; the executor runs a plan with one runner per layer kind.

Products whose input is known for all frames of a call (a Linear layer, the input product of a
GRU with dense input) run in one of two ways, chosen by ``exact``:

- ``exact=False`` (default): one float32 matmul over all rows (NumPy's, i.e. OpenBLAS sgemm,
  about twice the column-order kernel's speed), bias added after. Its summation order depends
  on the row count and the CPU, so offline and the streaming hop (whose one-frame kernels keep
  the column order) agree within a tolerance, not bit for bit (tests/test_model.py states it).
- ``exact=True``: the column-order kernel ``_affine_columns``, whose sums run in the same order
  for one frame or many, so offline == streaming bit for bit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ...errors import ParameterError
from ...kinds import GATES, num_selected
from .._graph import LAYER_RUNNERS, GraphExecutor
from ..checks import ACT_CODES, DEFAULT_REFRESH, as_f32, check_gru_weights, check_linear_weights, check_norm_weights, positive_int, selected_count
from .frame import FrameProgram, covers as frame_covers
from .kernels import _activate, _affine_columns, _delta_scan, _dgru_forward, _gated_forward, _gru_forward, _layer_norm

# The input product of a D-GRU fed by a D-GRU (sparse_input) over the frames of a call, when not
# exact: the input accumulator (3H·(changed inputs) MACs per frame, column kernel) pays against
# one dense BLAS product of all frames only where few inputs change. Measured on NSNet2 (H = 400),
# one thread, 2-core AMD EPYC, us per frame for the whole model, accumulator vs BLAS:
# - MaskModel.forward on 1001 frames, machine loaded: P = 75: 161 vs 156; P = 50: 119 vs 129;
#   P = 25: 91 vs 103;
# - benchmarks/bench_enhance.py (Enhancer.enhance, 10 s, median of 7, idle machine; the "dense-in"
#   rows): P = 50: 85.4 vs 77.6 (best runs 78.3 vs 76.2); P = 25: 63.8 vs 62.2 (best 56.9 vs 61.7).
# The idle run decides P = 50 for BLAS; P = 25 is a tie that the accumulator keeps. So over many
# frames the accumulator runs for A/H <= this:
_SPARSE_INPUT_MAX_FRACTION = 0.25


class _OneBlasThread:
    """A context in which BLAS runs on one thread, so that a product's bits never depend on the
    number of cores: OpenBLAS splits a product's rows among its threads, and on some CPUs (its
    Haswell kernels on a Zen 3 EPYC, measured: 9 of 42240 samples of the example file differed
    in the last bit between OPENBLAS_NUM_THREADS=1 and 2) the split changes the rounding. The
    setting is process-wide (threadpoolctl), so entries from several threads are counted and
    the first sets it, the last restores it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._blas = None  # threadpoolctl's controllers of the BLAS libraries loaded (found once)
        self._saved = []

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                if self._blas is None:
                    from threadpoolctl import ThreadpoolController

                    self._blas = ThreadpoolController().select(user_api="blas").lib_controllers
                self._saved = [lib.get_num_threads() for lib in self._blas]
                for lib in self._blas:
                    lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._blas, self._saved):
                    lib.set_num_threads(n)


one_blas_thread = _OneBlasThread()


def _product(x, wt, b, out, exact):
    """out = x @ wt + b for x (N, J) float32 C-contiguous: in column order when exact, else BLAS."""
    if exact:
        _affine_columns(x, wt, b, out)
    else:
        np.matmul(x, wt, out=out)
        out += b

__all__ = ["GRULayer", "GRUState", "Linear", "LayerNorm", "Executor", "RUNNERS", "gru_sequence", "dgru_sequence", "tgru_sequence", "delta_gru_sequence", "DEFAULT_REFRESH"]


@dataclass
class GRUState:
    """Carried state of one GRU layer for B streams (cpu backend).

    h     (B, H)   hidden state
    m     (B, 3H)  recurrent accumulator W_hh h + b_hh (D-GRU)
    g     (B, 3H)  input accumulator W_ih x + b_ih (sparse-input layers)
    xprev (B, I)   the input that ``g`` was built from (a delta gate's x̂)
    step  (B,)     steps since start; accumulators are refreshed when step % refresh_every == 0
    tau   (B,)     the key of each stream's last selection threshold, where the next selection
                   starts its search (any value gives the same selection; kernels._top_a_hinted)
    hhat  (B, H)   a delta gate's ĥ, the state that ``m`` was built from
    work  (2,)     threshold and delta gates: state and input columns read by the updates so
                   far, over all streams (the measured work; ``GRULayer.mean_work``)
    The remaining fields are scratch buffers reused by every call (no allocation per step).
    """

    h: np.ndarray
    m: np.ndarray
    g: np.ndarray
    xprev: np.ndarray
    step: np.ndarray
    tau: np.ndarray
    ubuf: np.ndarray
    qbuf: np.ndarray
    idx: np.ndarray
    dh: np.ndarray
    idx_in: np.ndarray
    d_in: np.ndarray
    gi: np.ndarray  # (T_max, B, 3H) input pre-activations of a call, grown when needed
    hhat: np.ndarray = None
    work: np.ndarray = None
    xs: np.ndarray = None  # (T_max, B, I) a delta gate's propagated inputs of a call, grown when needed

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    _ROWS = ("h", "m", "g", "xprev", "step", "tau", "hhat")  # the per-stream fields; the rest is scratch

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
        return GRUState(**new, **scratch, gi=np.zeros((0, rows.size, self.gi.shape[2]), np.float32), work=np.zeros(2, np.int64),
                        xs=np.zeros((0, rows.size, self.xprev.shape[1]), np.float32))

    def put(self, rows, other: "GRUState") -> None:
        """Write the streams of ``other`` into rows ``rows`` of this state (distinct rows)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        for f in self._ROWS:
            getattr(self, f)[rows] = getattr(other, f)


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
    gate : "top-a" (A or P), "threshold" (the neurons with u > ``theta`` change) or "delta"
        (state changes larger than ``theta`` and input changes larger than ``theta_x``, default
        ``theta``, propagate; every neuron updates): ``npdgru.reference``'s ``tgru_sequence`` and
        ``delta_gru_sequence``. P and A are not read by those two.
    A : the number of neurons updated per step, instead of ``update_percent``; the D-GRU
        (accumulator) kernel then runs even at A = H.
    exact : input products in column order (offline == streaming bit for bit), else through BLAS
        (module docstring); a sparse-input layer then keeps its input accumulator over many
        frames only where it pays (``_SPARSE_INPUT_MAX_FRACTION``).
    """

    backend = "cpu"
    gates = GATES

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, *, update_percent=100.0, sparse_input=False, refresh_every=DEFAULT_REFRESH, name="gru", A=None, exact=False,
                 gate="top-a", theta=0.0, theta_x=None):
        self.name = name
        self.exact = bool(exact)
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name)
        I, H = self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        self.wih_t = np.ascontiguousarray(self.weight_ih.T)  # (I, 3H) column-contiguous
        self.whh_t = np.ascontiguousarray(self.weight_hh.T)  # (H, 3H)
        self.sparse_input = bool(sparse_input)
        self.refresh_every = positive_int("refresh_every", refresh_every)
        if gate not in GATES:
            raise ParameterError(f"{name}: gate {gate!r} is not one of {GATES}")
        self.gate = gate
        self._gate_code = GATES.index(gate)  # 1 threshold, 2 delta (the code of _gated_forward)
        self.theta, self.theta_x = _threshold(name, "theta", theta), _threshold(name, "theta_x", theta if theta_x is None else theta_x)
        if gate != "top-a":  # the count varies per step: A = H is its bound
            if sparse_input:
                raise ParameterError(f"{name}: the {gate} gate keeps no sparse input accumulator (sparse_input is for top-a)")
            self.A, self.dense, self.update_percent = H, False, 100.0
        elif A is not None:  # resolved by the plan (or asked for): the D-GRU kernel even at A = H
            self.A, self.dense = selected_count(A, H), False
            self.update_percent = 100.0 * self.A / H
        else:
            self.A = num_selected(update_percent, H)  # validates P before float() can raise TypeError
            self.update_percent = float(update_percent)
            self.dense = self.update_percent == 100.0

    @property
    def _accumulate_input(self) -> bool:
        """The input accumulator over a call of many frames (the streaming hop always keeps it)."""
        return self.sparse_input and not self.dense and (self.exact or self.A <= _SPARSE_INPUT_MAX_FRACTION * self.hidden_size)

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        """Zero (or ``h0``) state for ``batch`` independent streams."""
        B, H, I = positive_int("batch", batch), self.hidden_size, self.input_size
        h = np.zeros((B, H), np.float32) if h0 is None else as_f32("h0", h0, (B, H)).copy()
        f = np.float32
        return GRUState(
            h=h, m=np.zeros((B, 3 * H), f), g=np.zeros((B, 3 * H), f), xprev=np.zeros((B, I), f),
            step=np.zeros(B, np.int64), tau=np.zeros(B, np.int64), ubuf=np.zeros(H, f), qbuf=np.zeros(H, f),
            idx=np.zeros(H, np.int64), dh=np.zeros(H, f), idx_in=np.zeros(I, np.int64),
            d_in=np.zeros(I, f), gi=np.zeros((0, B, 3 * H), f), hhat=np.zeros((B, H), f),
            work=np.zeros(2, np.int64), xs=np.zeros((0, B, I), f),
        )

    def mean_work(self, state: GRUState) -> tuple:
        """Threshold and delta gates: (state columns, input columns) read per step and stream
        by the updates so far (the measured work; the top-A gate reads A and, with a sparse
        input, the changed inputs). NaN before the first step."""
        n = float(state.step.sum())
        return (state.work[0] / n, state.work[1] / n) if n else (float("nan"), float("nan"))

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
        return as_f32(f"{self.name} input x", x, x.shape)

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
    _NO_GI = np.zeros((0, 1, 1), np.float32)  # gi of a sparse-input call (the kernel reads x)

    def _run(self, x, state: GRUState, selected=None):
        """forward() without validation: x float32 C-contiguous (T, B, I), state from init_state."""
        T, B = x.shape[:2]
        H = self.hidden_size
        out = np.empty((T, B, H), np.float32)
        sel = selected if (selected is not None and not self.dense) else self._NO_SEL
        if T == 0:
            return out
        if self._gate_code:
            return self._run_gated(x, state, out, sel)
        if self.sparse_input and not self.dense and (T == 1 or self._accumulate_input):
            _dgru_forward(self._NO_GI, x, self.wih_t, self.bias_ih, self.whh_t, self.bias_hh, self.A, self.refresh_every, state.h, state.m, state.g, state.xprev, state.step, state.tau, out, sel, state.ubuf, state.qbuf, state.idx, state.dh, state.idx_in, state.d_in)
            return out
        if state.gi.shape[0] < T:
            state.gi = np.empty((T, B, 3 * H), np.float32)
        gi = state.gi[:T]
        _product(x.reshape(T * B, -1), self.wih_t, self.bias_ih, gi.reshape(T * B, 3 * H), self.exact)
        if self.dense:
            _gru_forward(gi, self.whh_t, self.bias_hh, state.h, state.m, out)
        else:
            _dgru_forward(gi, x[:0], self.wih_t, self.bias_ih, self.whh_t, self.bias_hh, self.A, self.refresh_every, state.h, state.m, state.g, state.xprev, state.step, state.tau, out, sel, state.ubuf, state.qbuf, state.idx, state.dh, state.idx_in, state.d_in)
            if self.sparse_input:  # the input accumulator as the last frame left it, for the next call
                state.g[:] = gi[T - 1]
                state.xprev[:] = x[T - 1]
        return out


    def _run_gated(self, x, state, out, sel):
        """The threshold or delta gate (``_gated_forward``). The input product of a threshold
        step runs over all frames as a top-A step's; a delta step's input memory is kept in the
        kernel for one frame or ``exact`` (column order: offline == streaming bit for bit), else
        the propagated inputs x̂_t of all frames (which do not depend on the state) are scanned
        first and their product runs as one (BLAS) product."""
        T, B = x.shape[:2]
        H, I = self.hidden_size, self.input_size
        th, thx = np.float32(self.theta), np.float32(self.theta_x)
        args = (self.wih_t, self.bias_ih, self.whh_t, self.bias_hh, th, thx, self.refresh_every, state.h, state.m, state.g, state.xprev, state.hhat,
                state.step, out, sel, state.work, state.ubuf, state.qbuf, state.idx, state.dh, state.idx_in, state.d_in)
        if self.gate == "delta" and (T == 1 or self.exact):
            _gated_forward(self._gate_code, self._NO_GI, x, *args)
            return out
        if state.gi.shape[0] < T:
            state.gi = np.empty((T, B, 3 * H), np.float32)
        gi = state.gi[:T]
        if self.gate == "delta":
            if state.xs.shape[0] < T:
                state.xs = np.empty((T, B, I), np.float32)
            xs = state.xs[:T]
            state.work[1] += _delta_scan(x, state.xprev, thx, xs)
            _product(xs.reshape(T * B, I), self.wih_t, self.bias_ih, gi.reshape(T * B, 3 * H), False)
            _gated_forward(self._gate_code, gi, x[:0], *args)
            state.g[:] = gi[T - 1]  # the input memory W x̂ + b as the last frame left it, for the next call
            return out
        _product(x.reshape(T * B, I), self.wih_t, self.bias_ih, gi.reshape(T * B, 3 * H), self.exact)
        _gated_forward(self._gate_code, gi, x[:0], *args)
        return out


def _threshold(name, key, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
        raise ParameterError(f"{name}: {key}={v!r} must be a finite number")
    return float(v)


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
    A = positive_int("A", A)  # None is an error here, not "every neuron"
    layer = GRULayer(weight_ih, weight_hh, bias_ih, bias_hh, A=A, sparse_input=sparse_input, refresh_every=refresh_every)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    S = np.zeros((x.shape[0], state.batch, layer.hidden_size), np.bool_) if x.ndim == 3 else None
    out = layer.forward(x, state, selected=S)
    return out, S


def tgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, theta, *, refresh_every=DEFAULT_REFRESH, exact=False):
    """The threshold-gate D-GRU, like :func:`npdgru.reference.tgru_sequence`: (out, S)."""
    return _gated_sequence(x, h0, (weight_ih, weight_hh, bias_ih, bias_hh), dict(gate="threshold", theta=theta, refresh_every=refresh_every, exact=exact))


def delta_gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, theta, theta_x=None, *, refresh_every=DEFAULT_REFRESH, exact=False):
    """The delta GRU, like :func:`npdgru.reference.delta_gru_sequence`: (out, sent_h), the state
    entries propagated at each step."""
    return _gated_sequence(x, h0, (weight_ih, weight_hh, bias_ih, bias_hh), dict(gate="delta", theta=theta, theta_x=theta_x, refresh_every=refresh_every, exact=exact))


def _gated_sequence(x, h0, weights, kw):
    layer = GRULayer(*weights, **kw)
    x = np.asarray(x)
    state = layer.init_state(x.shape[1] if x.ndim == 3 else 1, h0)
    S = np.zeros((x.shape[0], state.batch, layer.hidden_size), np.bool_) if x.ndim == 3 else None
    out = layer.forward(x, state, selected=S)
    return out, S


class Linear:
    """Fully connected layer y = act(x Wᵀ + b) on the cpu backend (float32)."""

    backend = "cpu"

    def __init__(self, weight, bias, *, activation="none", name="linear", exact=False):
        self.name = name
        self.exact = bool(exact)  # the product in column order, else BLAS (module docstring)
        self.weight, self.bias = check_linear_weights(weight, bias, activation, name)
        self.out_features, self.in_features = self.weight.shape
        self.wt = np.ascontiguousarray(self.weight.T)  # (in, out) column-contiguous
        self.activation = activation
        self._code = ACT_CODES[activation]

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
            _product(x, self.wt, self.bias, y, self.exact)
            _activate(y, self._code)
        return y


class LayerNorm:
    """:func:`npdgru.reference.layer_norm` over rows of (N, C) on the cpu backend (float32)."""

    backend = "cpu"

    def __init__(self, weight, bias, *, eps=1e-5, name="norm"):
        self.name = name
        self.weight, self.bias = check_norm_weights(weight, bias, name)
        self.size = self.weight.shape[0]
        self.eps = np.float32(eps)

    def forward(self, x):
        """x (N, C) float32 -> (N, C) float32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.size:
            raise ParameterError(f"{self.name}: x must have shape (N, {self.size}), got {x.shape}")
        return self._run(as_f32(f"{self.name} input", x, x.shape))

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

    sparse_inputs_max_p = 50.0  # input accumulators pay at P <= 50 here (benchmarks/bench_enhance.py)

    @property
    def has_frame_program(self) -> bool:
        """Whether :meth:`frame_program` covers this plan (the fused streaming hop)."""
        return frame_covers(self.plan)

    def _walk(self, x, state):
        """The plan's steps; where a product goes through BLAS, on one BLAS thread (the same bits
        on any number of cores: ``one_blas_thread``)."""
        if all(getattr(layer, "exact", True) for layer in self.layers):  # column order only
            return super()._walk(x, state)
        with one_blas_thread:
            return super()._walk(x, state)

    @property
    def product_options(self) -> dict:
        return {"exact": self.exact}

    def frame_program(self, batch: int) -> "FrameProgram":
        """A one-frame program of ``batch`` streams with buffers of its own (one per user, so
        that two streams never share scratch memory)."""
        return FrameProgram(self, batch)
