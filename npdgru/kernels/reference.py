"""The ``reference`` backend: the plan's executor on the float64 functions of :mod:`npdgru.reference`.

Layers with the interface of every backend (``init_state``, ``forward``, ``_run``, a state with
``take(rows)`` / ``put(rows, sub)``), checked here, computed by the specification. Slow; it is
what the cpu and cuda backends are compared with, stream batching and state moves included.
"""

from __future__ import annotations

import numpy as np

from .. import reference as spec
from ..errors import ParameterError
from ..kinds import num_selected
from ._graph import LAYER_RUNNERS, GraphExecutor, HostOps

__all__ = ["GRULayer", "GRUState", "Linear", "LayerNorm", "Executor", "RUNNERS"]


class GRUState:
    """Carried state of one GRU layer for B streams: h (B, H), and for a delta gate the last
    propagated input x_hat (B, I) and state h_hat (B, H) (empty otherwise)."""

    def __init__(self, h, x_hat=None, h_hat=None):
        self.h = h
        self.x_hat = np.zeros((h.shape[0], 0)) if x_hat is None else x_hat
        self.h_hat = np.zeros((h.shape[0], 0)) if h_hat is None else h_hat

    _ROWS = ("h", "x_hat", "h_hat")

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    def take(self, rows) -> "GRUState":
        """Streams ``rows`` (a fresh zero stream where a row is < 0) as a new state."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        new = []
        for f in self._ROWS:
            old = getattr(self, f)
            a = np.zeros((rows.size, old.shape[1]), old.dtype)
            a[rows >= 0] = old[rows[rows >= 0]]
            new.append(a)
        return GRUState(*new)

    def put(self, rows, other: "GRUState") -> None:
        """Write the streams of ``other`` into rows ``rows``."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        for f in self._ROWS:
            getattr(self, f)[rows] = getattr(other, f)


class GRULayer:
    """A (D-)GRU layer on the reference backend (float64); same interface as ``cpu.GRULayer``.

    ``gate``: "top-a" (A or P), "threshold" (``theta``) or "delta" (``theta``, ``theta_x``), the
    functions of :mod:`npdgru.reference`.
    """

    backend = "reference"
    gates = spec.GATES

    def __init__(self, weight_ih, weight_hh, bias_ih, bias_hh, *, update_percent=100.0, sparse_input=False, refresh_every=None, name="gru", A=None, gate="top-a", theta=0.0, theta_x=None):
        self.name = name
        self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh = (np.asarray(a, np.float64) for a in (weight_ih, weight_hh, bias_ih, bias_hh))
        self.input_size, self.hidden_size = self.weight_ih.shape[1], self.weight_hh.shape[1]
        if self.weight_ih.shape[0] != 3 * self.hidden_size or self.weight_hh.shape != (3 * self.hidden_size, self.hidden_size):
            raise ParameterError(f"{name}: weight shapes {self.weight_ih.shape}, {self.weight_hh.shape} are not (3H, I), (3H, H)")
        if gate not in spec.GATES:
            raise ParameterError(f"{name}: gate {gate!r} is not one of {spec.GATES}")
        self.gate, self.theta, self.theta_x = gate, float(theta), float(theta if theta_x is None else theta_x)
        if gate != "top-a":
            self.A, self.dense, self.update_percent = self.hidden_size, False, 100.0
        elif A is not None:  # A neurons per step (resolved by the plan): the D-GRU path even at A = H
            if isinstance(A, bool) or not isinstance(A, (int, np.integer)) or not 1 <= A <= self.hidden_size:
                raise ParameterError(f"A={A!r} must be an integer in [1, H={self.hidden_size}]")
            self.A, self.dense = int(A), False
            self.update_percent = 100.0 * self.A / self.hidden_size
        else:
            self.A = num_selected(update_percent, self.hidden_size)
            self.update_percent = float(update_percent)
            self.dense = self.update_percent == 100.0

    def init_state(self, batch: int = 1, h0=None) -> GRUState:
        h = np.zeros((batch, self.hidden_size)) if h0 is None else np.array(h0, np.float64)
        if self.gate == "delta":
            return GRUState(h, np.zeros((batch, self.input_size)), np.zeros((batch, self.hidden_size)))
        return GRUState(h)

    def _run(self, x, state: GRUState):
        return self.forward(x, state)

    def forward(self, x, state: GRUState, *, selected=None):
        """x (T, B, I) -> (T, B, H); ``state`` updated in place. ``selected``: the neurons
        updated (top-a, threshold) or the state entries propagated (delta) at each step."""
        x = np.asarray(x, np.float64)
        if x.ndim != 3 or x.shape[2] != self.input_size or x.shape[1] != state.batch:
            raise ParameterError(f"{self.name}: x must have shape (T, {state.batch}, {self.input_size}), got {x.shape}")
        W = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if self.gate == "delta":
            out, S = self._delta(x, state, W)
        elif self.gate == "threshold":
            out, S = spec.tgru_sequence(x, state.h, *W, self.theta)
        elif self.dense:
            out, S = spec.gru_sequence(x, state.h, *W), True
        else:
            out, S = spec.dgru_sequence(x, state.h, *W, self.A)
        if selected is not None:
            selected[...] = S
        if len(out):
            state.h = out[-1].copy()
        return out

    def _delta(self, x, state, W):
        T, B = x.shape[:2]
        out = np.empty((T, B, self.hidden_size))
        S = np.empty((T, B, self.hidden_size), bool)
        h = state.h
        for t in range(T):
            h, state.x_hat, state.h_hat, _, S[t] = spec.delta_gru_step(x[t], h, state.x_hat, state.h_hat, *W, self.theta, self.theta_x)
            out[t] = h
        return out, S


class Linear:
    """Fully connected layer y = act(x Wᵀ + b) on the reference backend (float64)."""

    backend = "reference"

    def __init__(self, weight, bias, *, activation="none", name="linear"):
        if activation not in spec.ACTIVATION_FUNCTIONS:
            raise ParameterError(f"{name}: activation {activation!r} is not one of {tuple(spec.ACTIVATION_FUNCTIONS)}")
        self.name = name
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.activation = activation

    def _run(self, x):
        return self.forward(x)

    def forward(self, x):
        """x (N, in) -> (N, out)."""
        return spec.linear(np.asarray(x, np.float64), self.weight, self.bias, self.activation)


class LayerNorm:
    """:func:`npdgru.reference.layer_norm` over rows of (N, C) on the reference backend (float64)."""

    backend = "reference"

    def __init__(self, weight, bias, *, eps=1e-5, name="norm"):
        self.name, self.eps = name, float(eps)
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        self.size = self.weight.shape[0]

    def _run(self, x):
        return spec.layer_norm(np.asarray(x, np.float64), self.weight, self.bias, self.eps)

    forward = _run


RUNNERS = dict(LAYER_RUNNERS)  # every kind on these layers and the host shape glue


class Executor(GraphExecutor):
    """A :class:`~npdgru.plan.Plan` run on these float64 layers (slow; the specification)."""

    backend = "reference"
    ops = HostOps
    runners = RUNNERS
    GRULayer, Linear, LayerNorm = GRULayer, Linear, LayerNorm
