"""The D-GRU in plain NumPy: the specification every fast kernel is checked against.

Read this file beside the paper: Cheng et al., "Dynamic Gated Recurrent Neural Network for
Compute-efficient Speech Enhancement", Interspeech 2024, arXiv:2408.12425, section 2.

Conventions (``../shared/DESIGN.md`` section 1) follow ``torch.nn.GRU``::

    weight_ih (3H, I)   weight_hh (3H, H)   bias_ih (3H,)   bias_hh (3H,)   gate order r, z, n

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)                 reset gate
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)                 PyTorch's update gate
    n  = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        candidate (reset after the product)
    h' = (1 − z) ⊙ n + z ⊙ h                              dense GRU

The paper's update gate is ``u = 1 − z`` (how much of the candidate is taken in). The D-GRU
updates only the ``A = ceil(P·H/100)`` neurons with the largest ``u`` (ties go to the lower
index); every other neuron keeps its value bit for bit::

    S   = top_a(u, A)                                      select gate, paper eq. (4)
    h_i ← h_i + u_i (n_i − h_i)   for i in S               paper eq. (5)
    h_i ← h_i                      for i not in S

Nothing here is fast. Functions work in whatever float dtype they are given (the tests run them
in float64 to check the float32 kernels). Shapes: ``B`` independent streams, ``T`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .errors import ParameterError

__all__ = [
    "num_selected",
    "sigmoid",
    "top_a",
    "gru_step",
    "dgru_step",
    "gru_sequence",
    "dgru_sequence",
    "MacCount",
    "count_macs",
    "layer_norm",
]


def num_selected(update_percent: float, hidden_size: int) -> int:
    """A = ceil(P·H/100): how many neurons the D-GRU updates per step.

    P is read as the decimal the user wrote (``Fraction(str(P))``), so ``P=33.3, H=1000`` gives
    333, not 334 from binary rounding of ``33.3*1000/100``.
    """
    if isinstance(update_percent, bool) or not isinstance(update_percent, (int, float, np.integer, np.floating)):
        raise ParameterError(f"update_percent={update_percent!r} must be a number in (0, 100]")
    p = float(update_percent)
    if not (math.isfinite(p) and 0.0 < p <= 100.0):
        raise ParameterError(f"update_percent={update_percent!r} must be in (0, 100]")
    if int(hidden_size) != hidden_size or hidden_size < 1:
        raise ParameterError(f"hidden_size={hidden_size!r} must be a positive integer")
    a = math.ceil(Fraction(str(p)) * int(hidden_size) / 100)
    return max(1, min(int(hidden_size), a))


def sigmoid(a: np.ndarray) -> np.ndarray:
    """Logistic function σ(a) = 1 / (1 + e^(−a)), in the dtype of ``a``."""
    return 1.0 / (1.0 + np.exp(-a))


def top_a(u: np.ndarray, A: int) -> np.ndarray:
    """Select gate: boolean mask of the A largest entries along the last axis.

    Ties go to the lower index: a stable sort of ``−u`` keeps equal values in index order, so
    of several equal ``u`` at the boundary the first ones are taken.

    Parameters
    ----------
    u : (..., H) array
    A : int, 1 <= A <= H

    Returns
    -------
    (..., H) bool array with exactly A True entries per row.
    """
    order = np.argsort(-u, axis=-1, kind="stable")  # descending u, ties in index order
    mask = np.zeros(u.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :A], True, axis=-1)
    return mask


def _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Pre-activations split by gate: (x-side r, z, n), (h-side r, z, n); each (..., H)."""
    H = weight_hh.shape[1]
    gi = x @ weight_ih.T + bias_ih  # W_i{r,z,n} x + b_i{r,z,n}, (..., 3H)
    gh = h @ weight_hh.T + bias_hh  # W_h{r,z,n} h + b_h{r,z,n}, (..., 3H)
    return (gi[..., :H], gi[..., H : 2 * H], gi[..., 2 * H :]), (gh[..., :H], gh[..., H : 2 * H], gh[..., 2 * H :])


def gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """One step of the dense GRU (PyTorch convention). x (..., I), h (..., H) -> h' (..., H)."""
    (i_r, i_z, i_n), (h_r, h_z, h_n) = _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    r = sigmoid(i_r + h_r)  # reset gate, (..., H)
    z = sigmoid(i_z + h_z)  # PyTorch update gate, (..., H)
    n = np.tanh(i_n + r * h_n)  # candidate, (..., H)
    return (1.0 - z) * n + z * h


def dgru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh, A):
    """One step of the D-GRU: only the A neurons with the largest u = 1 − z change.

    The paper's saving: z is needed for all H neurons (to select), r and n only for the A selected
    ones. This reference computes everything and then selects; the kernels skip the work.

    Returns
    -------
    h_new : (..., H)  unselected entries are the very same values as ``h``
    S     : (..., H) bool, the selected neurons
    """
    (i_r, i_z, i_n), (h_r, h_z, h_n) = _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    z = sigmoid(i_z + h_z)  # PyTorch update gate, all H neurons
    u = 1.0 - z  # paper's update gate
    S = top_a(u, A)  # select gate: A largest u, ties -> lower index
    r = sigmoid(i_r + h_r)  # reset gate (needed only where S)
    n = np.tanh(i_n + r * h_n)  # candidate (needed only where S)
    h_new = np.where(S, h + u * (n - h), h)  # selected: h + u (n − h); others kept bit for bit
    return h_new, S


def _check_sequence_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    if x.ndim != 3:
        raise ParameterError(f"x must be (T, B, I), got shape {x.shape}")
    H = weight_hh.shape[1]
    if h0 is None:
        h0 = np.zeros((x.shape[1], H), dtype=x.dtype)
    if h0.shape != (x.shape[1], H):
        raise ParameterError(f"h0 must be (B, H)={(x.shape[1], H)}, got {h0.shape}")
    return h0


def gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    """Dense GRU over T steps for B streams. x (T, B, I), h0 (B, H) or None -> (T, B, H)."""
    h = _check_sequence_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    out = np.empty((x.shape[0], x.shape[1], weight_hh.shape[1]), dtype=np.result_type(x, h))
    for t in range(x.shape[0]):
        h = gru_step(x[t], h, weight_ih, weight_hh, bias_ih, bias_hh)
        out[t] = h
    return out


def dgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, A):
    """D-GRU over T steps for B independent streams, each selecting its own neurons.

    Returns
    -------
    out : (T, B, H) hidden states after each step
    S   : (T, B, H) bool, the neurons selected at each step
    """
    h = _check_sequence_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    T, B = x.shape[:2]
    H = weight_hh.shape[1]
    out = np.empty((T, B, H), dtype=np.result_type(x, h))
    S = np.empty((T, B, H), dtype=bool)
    for t in range(T):
        h, S[t] = dgru_step(x[t], h, weight_ih, weight_hh, bias_ih, bias_hh, A)
        out[t] = h
    return out, S


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one GRU layer for one step of one stream.

    dense  : 3H(I + H), every gate row against x and h.
    paper  : (H + 2A)(I + H), z for all rows, r and n only for the A selected rows, i.e.
             (1 + 2P)/3 of dense (the paper's count).
    sparse : ours, with exact accumulators (DESIGN.md section 1). The recurrent pre-activations
             M = W_hh h + b_hh are updated from the A changed columns of h: 3H·A. The input side is
             3H·A_in when the input changes in only A_in entries per step (the state of a previous
             D-GRU layer, kept in an input accumulator) and 3H·I when the input is dense: the
             kernels compute a dense input's products for every row, batched over frames at
             matrix-matrix speed, because the selection is not known before the step.
    Elementwise work (sigmoid, tanh, selection) and periodic accumulator refreshes are not counted.
    """

    dense: int
    paper: int
    sparse: int

    def ratios(self) -> tuple[float, float]:
        """(paper / dense, sparse / dense)."""
        return self.paper / self.dense, self.sparse / self.dense


def count_macs(input_size: int, hidden_size: int, update_percent: float = 100.0, *, input_changed: int | None = None) -> MacCount:
    """MACs per step of one (D-)GRU layer; see :class:`MacCount`.

    ``input_changed`` is how many input entries change per step when the input is the state of a
    previous D-GRU layer (that layer's A); None means a dense input.
    """
    I, H = int(input_size), int(hidden_size)
    A = num_selected(update_percent, H)
    dense = 3 * H * (I + H)
    paper = (H + 2 * A) * (I + H)
    input_cost = 3 * H * (I if input_changed is None else min(I, int(input_changed)))
    return MacCount(dense=dense, paper=paper, sparse=input_cost + 3 * H * A)


# --------------------------------------------------------------------------------------------
# Layers with carried state: the interface every backend offers (see kernels/cpu.py), so that
# model.py can run on any of them. The reference computes in float64.
# --------------------------------------------------------------------------------------------


class GRUState:
    """Carried state of one GRU layer for B streams: just h (B, H)."""

    def __init__(self, h):
        self.h = h

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    def take(self, rows) -> "GRUState":
        """Streams ``rows`` (a fresh zero stream where a row is < 0) as a new state."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        h = np.zeros((rows.size, self.h.shape[1]), self.h.dtype)
        h[rows >= 0] = self.h[rows[rows >= 0]]
        return GRUState(h)

    def put(self, rows, other: "GRUState") -> None:
        """Write the streams of ``other`` into rows ``rows``."""
        self.h[np.asarray(rows, np.int64).reshape(-1)] = other.h


class GRULayer:
    """A (D-)GRU layer on the reference backend (float64); same interface as ``cpu.GRULayer``."""

    backend = "reference"

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, *, update_percent=100.0, sparse_input=False, refresh_every=None, name="gru", A=None):
        self.name = name
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = (np.asarray(a, np.float64) for a in (weight_ih, weight_hh, bias_ih, bias_hh))
        self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        if self.weight_ih.shape[0] != 3 * self.hidden_size or self.weight_hh.shape != (3 * self.hidden_size, self.hidden_size):
            raise ParameterError(f"{name}: weight shapes {self.weight_ih.shape}, {self.weight_hh.shape} are not (3H, I), (3H, H)")
        self.update_percent = float(update_percent)
        self.A = num_selected(update_percent, self.hidden_size)
        self.dense = self.update_percent == 100.0
        if A is not None:  # A neurons per step, the D-GRU path even at A = H
            if isinstance(A, bool) or not isinstance(A, (int, np.integer)) or not 1 <= A <= self.hidden_size:
                raise ParameterError(f"A={A!r} must be an integer in [1, H={self.hidden_size}]")
            self.A, self.dense = int(A), False
            self.update_percent = 100.0 * self.A / self.hidden_size

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        h = np.zeros((batch, self.hidden_size)) if h0 is None else np.array(h0, np.float64)
        return GRUState(h)

    def _run(self, x, state: GRUState):
        return self.forward(x, state)

    def forward(self, x, state: GRUState, *, selected=None):
        """x (T, B, I) -> (T, B, H); ``state`` updated in place."""
        x = np.asarray(x, np.float64)
        if x.ndim != 3 or x.shape[2] != self.input_size or x.shape[1] != state.batch:
            raise ParameterError(f"{self.name}: x must have shape (T, {state.batch}, {self.input_size}), got {x.shape}")
        W = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if self.dense:
            out = gru_sequence(x, state.h, *W)
            if selected is not None:
                selected[...] = True
        else:
            out, S = dgru_sequence(x, state.h, *W, self.A)
            if selected is not None:
                selected[...] = S
        if len(out):
            state.h = out[-1].copy()
        return out


class Linear:
    """Fully connected layer y = act(x Wᵀ + b) on the reference backend (float64)."""

    backend = "reference"

    def __init__(self, weight, bias, *, activation="none", name="linear"):
        self.name = name
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.activation = activation

    def _run(self, x):
        return self.forward(x)

    def forward(self, x):
        """x (N, in) -> (N, out)."""
        y = np.asarray(x, np.float64) @ self.weight.T + self.bias
        return ACTIVATION_FUNCTIONS[self.activation](y)


ACTIVATION_FUNCTIONS = {
    "none": lambda y: y,
    "relu": lambda y: np.maximum(y, 0.0),
    "sigmoid": sigmoid,
    "tanh": np.tanh,
}


def layer_norm(x, weight, bias, eps=1e-5):
    """Layer normalisation over the last axis (``torch.nn.LayerNorm``, biased variance)::

        y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias

    DPRNN normalises each band of each frame on its own, so it stays causal (no statistics
    across time) and offline and streaming outputs are the same.
    """
    x = np.asarray(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


class LayerNorm:
    """:func:`layer_norm` over rows of (N, C) on the reference backend (float64)."""

    backend = "reference"

    def __init__(self, weight, bias, *, eps=1e-5, name="norm"):
        self.name, self.eps = name, float(eps)
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.size = self.weight.shape[0]

    def _run(self, x):
        return layer_norm(np.asarray(x, np.float64), self.weight, self.bias, self.eps)

    forward = _run


def Executor(plan, tensors, *, refresh_every=None):
    """A :class:`~npdgru.plan.Plan` run on these float64 layers (slow; the specification)."""
    import sys

    from .kernels._graph import GraphExecutor

    class _Reference(GraphExecutor):
        backend = "reference"

    return _Reference(plan, tensors, sys.modules[__name__], refresh_every=refresh_every)
