"""The D-GRU in plain NumPy: the specification every fast kernel is checked against.

Read this file beside the paper: Cheng et al., "Dynamic Gated Recurrent Neural Network for
Compute-efficient Speech Enhancement", Interspeech 2024, arXiv:2408.12425, section 2.

Conventions (``docs/design.md``) follow ``torch.nn.GRU``::

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

Two other gates choose S (the architecture's ``gate`` field of a GRU layer, ``docs/design.md``):
the threshold select gate (:func:`threshold_select`, :func:`tgru_sequence`: S = {i : u_i > θ}, a
count that varies per step) and the delta network (:func:`delta_gru_sequence`, Neil et al. 2017,
Gao et al. 2020: only input and state changes larger than Θ are propagated, every neuron updates).

Nothing here is fast. Functions work in whatever float dtype they are given (the tests run them
in float64 to check the float32 kernels). Shapes: ``B`` independent streams, ``T`` steps. Every
matrix product is taken one row at a time, so a stream gives the same bits alone or in a batch
(a BLAS matrix-matrix product may sum in another order for another row count).

:func:`forward` is the whole mask model: a plan (``npdgru.plan.Plan.as_data()``, plain data)
walked step by step on these functions, the readable twin of every backend's executor.

This module imports NumPy only: it depends on nothing else of npdgru. A bad argument is a
ValueError; the package's checked entry points (``npdgru.kinds``, the backends) raise
``npdgru.ParameterError`` before anything reaches here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "num_selected",
    "sigmoid",
    "top_a",
    "gru_step",
    "dgru_step",
    "gru_sequence",
    "dgru_sequence",
    "GATES",
    "threshold_select",
    "tgru_step",
    "tgru_sequence",
    "delta_encode",
    "delta_gru_step",
    "delta_gru_sequence",
    "MacCount",
    "count_macs",
    "layer_norm",
    "linear",
    "forward",
]


def num_selected(update_percent: float, hidden_size: int) -> int:
    """A = ceil(P·H/100): how many neurons the D-GRU updates per step.

    P is read as the decimal the user wrote (``Fraction(str(P))``), so ``P=33.3, H=1000`` gives
    333, not 334 from binary rounding of ``33.3*1000/100``.
    """
    if isinstance(update_percent, bool) or not isinstance(update_percent, (int, float, np.integer, np.floating)):
        raise ValueError(f"update_percent={update_percent!r} must be a number in (0, 100]")
    p = float(update_percent)
    if not (math.isfinite(p) and 0.0 < p <= 100.0):
        raise ValueError(f"update_percent={update_percent!r} must be in (0, 100]")
    if int(hidden_size) != hidden_size or hidden_size < 1:
        raise ValueError(f"hidden_size={hidden_size!r} must be a positive integer")
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


def matvec_rows(W, x):
    """W x for every row x of (..., I): (..., O), one matrix-vector product per row (batch-invariant)."""
    x2 = np.asarray(x).reshape(-1, x.shape[-1])
    out = np.empty((x2.shape[0], W.shape[0]), np.result_type(x2, W))
    for n in range(x2.shape[0]):
        out[n] = W @ x2[n]
    return out.reshape(x.shape[:-1] + (W.shape[0],))


def _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Pre-activations split by gate: (x-side r, z, n), (h-side r, z, n); each (..., H)."""
    H = weight_hh.shape[1]
    gi = matvec_rows(weight_ih, x) + bias_ih  # W_i{r,z,n} x + b_i{r,z,n}, (..., 3H)
    gh = matvec_rows(weight_hh, h) + bias_hh  # W_h{r,z,n} h + b_h{r,z,n}, (..., 3H)
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
        raise ValueError(f"x must be (T, B, I), got shape {x.shape}")
    H = weight_hh.shape[1]
    if h0 is None:
        h0 = np.zeros((x.shape[1], H), dtype=x.dtype)
    if h0.shape != (x.shape[1], H):
        raise ValueError(f"h0 must be (B, H)={(x.shape[1], H)}, got {h0.shape}")
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
    return _selecting_sequence(dgru_step, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, A)


def _selecting_sequence(step, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, param):
    """``step`` (dgru_step or tgru_step, with its A or θ) over T steps: (out, S), both (T, B, H)."""
    h = _check_sequence_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    T, B = x.shape[:2]
    H = weight_hh.shape[1]
    out = np.empty((T, B, H), dtype=np.result_type(x, h))
    S = np.empty((T, B, H), dtype=bool)
    for t in range(T):
        h, S[t] = step(x[t], h, weight_ih, weight_hh, bias_ih, bias_hh, param)
        out[t] = h
    return out, S


# --------------------------------------------------------------------------------------------
# Other gates: a threshold select gate and a delta network
# --------------------------------------------------------------------------------------------

GATES = ("top-a", "threshold", "delta")
"""The gates of a GRU layer: ``top-a`` (the D-GRU above, A = ceil(P·H/100) neurons per step),
``threshold`` (:func:`tgru_sequence`) and ``delta`` (:func:`delta_gru_sequence`)."""


def threshold_select(u: np.ndarray, theta: float) -> np.ndarray:
    """Threshold select gate: boolean mask of the entries with ``u > θ`` (strictly).

    An entry equal to θ is not selected, so θ = 0 selects every neuron whose u is positive and
    the count is anything from 0 to H per row.
    """
    return u > theta


def tgru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh, theta):
    """One step of the D-GRU with a threshold select gate (the paper's eq. (5) on a variable S)::

        u   = 1 − z                                         all H neurons, as the top-A gate
        S   = {i : u_i > θ}                                 select gate, a threshold for eq. (4)
        h_i ← h_i + u_i (n_i − h_i)    for i in S           paper eq. (5)
        h_i ← h_i                      for i not in S       (bit for bit)

    Cheng et al. (arXiv:2408.12425) fix the count A and leave a threshold open: here the work
    per step is |S|, 0 ... H. θ below every u is the dense GRU (written h + u (n − h)); θ >= 1
    (u = 1 − σ(·) < 1) never changes the state.

    Returns (h_new, S) as :func:`dgru_step`.
    """
    (i_r, i_z, i_n), (h_r, h_z, h_n) = _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    u = 1.0 - sigmoid(i_z + h_z)  # paper's update gate, all H neurons
    S = threshold_select(u, theta)
    r = sigmoid(i_r + h_r)
    n = np.tanh(i_n + r * h_n)
    return np.where(S, h + u * (n - h), h), S


def tgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, theta):
    """The threshold-gate D-GRU over T steps for B streams: (out (T, B, H), S (T, B, H) bool)."""
    return _selecting_sequence(tgru_step, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, theta)


def delta_encode(v, v_hat, theta):
    """Delta encoding of a vector against its last propagated value (Neil et al. 2017, eq. 7)::

        Δv_j = v_j − v̂_j    where |v_j − v̂_j| > Θ, then v̂_j ← v_j
        Δv_j = 0           otherwise (v̂_j kept)

    Returns (v̂ new, propagated mask). Strictly greater: a change of exactly Θ is not
    propagated, and Θ = 0 propagates every change (an unchanged entry changes nothing).
    """
    sent = np.abs(v - v_hat) > theta
    return np.where(sent, v, v_hat), sent


def delta_gru_step(x, h, x_hat, h_hat, weight_ih, weight_hh, bias_ih, bias_hh, theta, theta_x=None):
    """One step of the delta GRU (DeltaGRU: Neil et al., "Delta Networks for Optimized Recurrent
    Network Computation", ICML 2017, arXiv:1612.05571; EdgeDRNN: Gao et al., IEEE JETCAS 2020)::

        x̂, Δx = delta_encode(x, x̂, Θ_x)                   input changes larger than Θ_x
        ĥ, Δh = delta_encode(h, ĥ, Θ)                      state changes larger than Θ
        M_x ← M_x + W_ih Δx      (= W_ih x̂ + b_ih)         only the columns of sent entries
        M_h ← M_h + W_hh Δh      (= W_hh ĥ + b_hh)         EdgeDRNN's delta memories
        r  = σ(M_x,r + M_h,r)
        z  = σ(M_x,z + M_h,z)
        n  = tanh(M_x,n + r ⊙ M_h,n)                       reset after the product, as PyTorch
        h' = (1 − z) ⊙ n + z ⊙ h                           every neuron, from the true h

    The papers' memories start at the biases with x̂ = ĥ = 0, so a memory is always the product
    of the last propagated vector: this reference computes ``W x̂ + b`` directly (the kernels
    accumulate the deltas, the same sum in exact arithmetic). Θ = Θ_x = 0 is the dense GRU
    (ĥ = h and x̂ = x after encoding); a Θ above every change propagates nothing.
    ``theta_x`` None: the input uses Θ.

    Returns (h_new, x_hat, h_hat, sent_x (..., I) bool, sent_h (..., H) bool).
    """
    x_hat, sent_x = delta_encode(x, x_hat, theta if theta_x is None else theta_x)
    h_hat, sent_h = delta_encode(h, h_hat, theta)
    (i_r, i_z, i_n), (h_r, h_z, h_n) = _gates(x_hat, h_hat, weight_ih, weight_hh, bias_ih, bias_hh)
    r = sigmoid(i_r + h_r)
    z = sigmoid(i_z + h_z)
    n = np.tanh(i_n + r * h_n)
    return (1.0 - z) * n + z * h, x_hat, h_hat, sent_x, sent_h


def delta_gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, theta, theta_x=None):
    """The delta GRU over T steps for B streams, from x̂ = ĥ = 0 (memories at the biases).

    Returns
    -------
    out    : (T, B, H) hidden states after each step
    sent_h : (T, B, H) bool, the state entries propagated at each step (of the state before it)
    sent_x : (T, B, I) bool, the input entries propagated at each step
    """
    h = _check_sequence_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    T, B, I = x.shape
    H = weight_hh.shape[1]
    dt = np.result_type(x, h)
    out = np.empty((T, B, H), dtype=dt)
    sent_h = np.empty((T, B, H), dtype=bool)
    sent_x = np.empty((T, B, I), dtype=bool)
    x_hat, h_hat = np.zeros((B, I), dt), np.zeros((B, H), dt)
    for t in range(T):
        h, x_hat, h_hat, sent_x[t], sent_h[t] = delta_gru_step(x[t], h, x_hat, h_hat, weight_ih, weight_hh, bias_ih, bias_hh, theta, theta_x)
        out[t] = h
    return out, sent_h, sent_x


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one GRU layer for one step of one stream.

    dense  : 3H(I + H), every gate row against x and h.
    paper  : (H + 2A)(I + H), z for all rows, r and n only for the A selected rows, i.e.
             (1 + 2P)/3 of dense (the paper's count).
    sparse : ours, with exact accumulators (``docs/design.md``). The recurrent pre-activations
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


def count_macs(input_size: int, hidden_size: int, update_percent: float = 100.0, *, input_changed: int | None = None, A: int | None = None) -> MacCount:
    """MACs per step of one (D-)GRU layer; see :class:`MacCount`.

    ``input_changed`` is how many input entries change per step when the input is the state of a
    previous D-GRU layer (that layer's A); None means a dense input. ``A``: the neurons updated
    per step, when already resolved (then ``update_percent`` is not read).
    """
    I, H = int(input_size), int(hidden_size)
    if A is None:
        A = num_selected(update_percent, H)
    dense = 3 * H * (I + H)
    paper = (H + 2 * A) * (I + H)
    input_cost = 3 * H * (I if input_changed is None else min(I, int(input_changed)))
    return MacCount(dense=dense, paper=paper, sparse=input_cost + 3 * H * A)


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


ACTIVATION_FUNCTIONS = {
    "none": lambda y: y,
    "relu": lambda y: np.maximum(y, 0.0),
    "sigmoid": sigmoid,
    "tanh": np.tanh,
}


def linear(x, weight, bias, activation="none"):
    """Fully connected layer y = act(W x + b) over the last axis: x (..., in) -> (..., out)."""
    return ACTIVATION_FUNCTIONS[activation](matvec_rows(weight, x) + bias)


# --------------------------------------------------------------------------------------------
# The whole mask model: a plan walked on the functions above, one stream, float64
# --------------------------------------------------------------------------------------------
# A step (plain data, ``Plan.as_data()``) gives its kind, its inputs, F = bands, per-band sizes
# I = size_in, H = hidden, A, dense, and per kind activation / eps / start, stop. Each step
# function takes (step, inputs (T, width) each, w) where w(suffix) is the step's tensor.


def _linear(s, xs, w):  # the same weights on each of the F bands
    T = xs[0].shape[0]
    y = linear(xs[0].reshape(T, s["bands"], s["size_in"]), w("weight"), w("bias"), s["activation"])
    return y.reshape(T, -1)


def _gru(s, xs, w):  # D-GRU along time, eq. (4)-(5), or its gate; the F bands are F streams of one layer
    T, F = xs[0].shape[0], s["bands"]
    x = xs[0].reshape(T, F, s["size_in"])  # (T, B = F, I)
    W = (w("weight_ih"), w("weight_hh"), w("bias_ih"), w("bias_hh"))
    gate = s.get("gate", "top-a")
    if gate == "threshold":
        y = tgru_sequence(x, None, *W, s["theta"])[0]
    elif gate == "delta":
        y = delta_gru_sequence(x, None, *W, s["theta"], s["theta_x"])[0]
    else:
        y = gru_sequence(x, None, *W) if s["dense"] else dgru_sequence(x, None, *W, s["A"])[0]
    return y.reshape(T, F * s["hidden"])


def _bigru(s, xs, w):  # dense, across the F bands of each frame, from h = 0 at every frame
    T, F, H = xs[0].shape[0], s["bands"], s["hidden"]
    seq = xs[0].reshape(T, F, s["size_in"]).transpose(1, 0, 2)  # (F, T, I): bands are the steps
    fwd = gru_sequence(seq, None, *(w(n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
    bwd = gru_sequence(seq[::-1], None, *(w(n + "_reverse") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))[::-1]
    return np.concatenate([fwd, bwd], axis=-1).transpose(1, 0, 2).reshape(T, F * 2 * H)


def _layernorm(s, xs, w):  # each band of each frame on its own
    T = xs[0].shape[0]
    return layer_norm(xs[0].reshape(T, s["bands"], s["size_in"]), w("weight"), w("bias"), s["eps"]).reshape(T, -1)


_STEPS = {
    "linear": _linear,
    "gru": _gru,
    "bigru": _bigru,
    "layernorm": _layernorm,
    "pad": lambda s, xs, w: np.pad(xs[0], ((0, 0), (0, s["size_out"] - s["size_in"]))),
    "slice": lambda s, xs, w: xs[0][:, s["start"] : s["stop"]],
    "add": lambda s, xs, w: sum(xs[1:], xs[0]),
    "concat": lambda s, xs, w: np.concatenate(xs, axis=-1),
}


def forward(plan, tensors, features):
    """The mask of one stream: features (T, n_features) -> (T, n_features), float64.

    ``plan``: ``{"n_features": int, "steps": [step, ...]}`` (``npdgru.plan.Plan.as_data()``);
    ``tensors``: the weight file's tensors by name (``fc1.weight`` ...).
    """
    values = {"features": np.asarray(features, np.float64)}
    for s in plan["steps"]:
        def w(suffix, name=s["name"]):
            return np.asarray(tensors[f"{name}.{suffix}"], np.float64)

        values[s["name"]] = _STEPS[s["kind"]](s, [values[x] for x in s["inputs"]], w)
    return values[plan["steps"][-1]["name"]]
