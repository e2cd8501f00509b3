"""Mask-estimation models built from a weight file's architecture.

A model is the layer list of the architecture (``weights.py``) run in order on log-power
features, e.g. NSNet2 (DESIGN.md section 3)::

    log-power (161) -> FC 400 + ReLU -> GRU 400 -> GRU 400 -> FC 600 + ReLU -> FC 600 + ReLU
                    -> FC 161 + sigmoid = mask on the noisy STFT

Every GRU layer runs as a D-GRU at the chosen update percentage P. With ``sparse_inputs=True`` a
GRU layer whose input is the state of a previous D-GRU layer keeps an input accumulator fed by
the changed entries only, so its input product costs 3H·A_in instead of 3H·I MACs. It is off by
default because on the 2-core AMD EPYC we measure on it is not faster in wall-clock time: the
dense input product of a block of frames reuses each weight column for 8 frames, while the
accumulator reads a different set of columns for every frame (benchmarks/bench_enhance.py).

The model never knows which backend runs it: it asks the backend module for ``Linear`` and
``GRULayer`` classes with one interface (``reference``, ``cpu``, later ``cuda``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError
from .reference import count_macs, num_selected
from .weights import Weights

BACKENDS = ("cpu", "reference")


def get_backend(name: str):
    """The backend module: ``reference`` (NumPy, float64) or ``cpu`` (Numba, float32)."""
    if name == "reference":
        return importlib.import_module("npdgru.reference")
    if name == "cpu":
        return importlib.import_module("npdgru.kernels.cpu")
    if name == "cuda":
        raise ParameterError("backend 'cuda' is not available yet; use 'cpu' or 'reference'")
    raise ParameterError(f"backend={name!r} must be one of {BACKENDS}")


@dataclass
class ModelState:
    """Carried state of a model for B streams: one entry per GRU layer."""

    layers: list
    batch: int


class MaskModel:
    """A mask estimator (e.g. NSNet2) at update percentage P on one backend.

    Parameters
    ----------
    weights : a loaded :class:`npdgru.weights.Weights`
    update_percent : P in (0, 100]; every GRU layer updates A = ceil(P·H/100) neurons per step.
    backend : "cpu" or "reference"
    """

    def __init__(self, weights: Weights, *, update_percent: float = 100.0, backend: str = "cpu", refresh_every: int | None = None, sparse_inputs: bool = False):
        self.weights = weights
        self.architecture = weights.architecture
        self.n_features = self.architecture["n_features"]
        num_selected(update_percent, 1)  # validates P first: "50", None, True are refused, not cast
        self.update_percent = float(update_percent)
        self.backend_name = backend
        B = get_backend(backend)
        extra = {} if refresh_every is None else {"refresh_every": refresh_every}
        self.layers = []
        prev_sparse = False  # is the input of the next layer the state of a D-GRU layer?
        for spec in self.architecture["layers"]:
            n, t = spec["name"], weights.tensors
            if spec["kind"] == "gru":
                layer = B.GRULayer(t[f"{n}.weight_ih"], t[f"{n}.weight_hh"], t[f"{n}.bias_ih"], t[f"{n}.bias_hh"], update_percent=self.update_percent, sparse_input=prev_sparse, name=n, **extra)
                prev_sparse = bool(sparse_inputs) and self.update_percent < 100.0
            else:
                layer = B.Linear(t[f"{n}.weight"], t[f"{n}.bias"], activation=spec.get("activation", "none"), name=n)
                prev_sparse = False
            self.layers.append(layer)

    @property
    def gru_layers(self):
        return [layer for layer in self.layers if hasattr(layer, "hidden_size")]

    def init_state(self, batch: int = 1) -> ModelState:
        return ModelState(layers=[g.init_state(batch) for g in self.gru_layers], batch=batch)

    def forward(self, features, state: ModelState) -> np.ndarray:
        """Masks for T frames of B streams.

        Parameters
        ----------
        features : (T, B, n_features) log-power features
        state : from :meth:`init_state`, updated in place (streaming: call again with more frames)

        Returns
        -------
        (T, B, n_features) float32 mask in [0, 1].
        """
        x = np.asarray(features)
        if x.ndim != 3 or x.shape[2] != self.n_features or x.shape[1] != state.batch:
            raise ParameterError(f"features must have shape (T, {state.batch}, {self.n_features}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ParameterError("features contain NaN or Inf")
        T, Bn = x.shape[:2]
        k = 0
        for layer in self.layers:  # inputs are validated once, here; layers run unchecked
            if hasattr(layer, "hidden_size"):
                x = layer._run(x, state.layers[k])
                k += 1
            else:
                y = layer._run(x.reshape(T * Bn, x.shape[2]))  # explicit sizes: T = 0 frames is allowed
                x = y.reshape(T, Bn, y.shape[1])
        return np.asarray(x, np.float32)

    def fraction_updated(self) -> float:
        """Fraction of GRU neurons updated per step (A/H averaged over layers, weighted by H)."""
        g = self.gru_layers
        return sum(layer.A for layer in g) / max(1, sum(layer.hidden_size for layer in g))

    def macs_per_frame(self) -> dict:
        """MACs per frame: GRU layers (dense / paper / ours) and the rest of the model."""
        dense = paper = ours = other = 0
        prev_A = None
        for layer in self.layers:
            if hasattr(layer, "hidden_size"):
                m = count_macs(layer.input_size, layer.hidden_size, self.update_percent, input_changed=prev_A)
                dense, paper, ours = dense + m.dense, paper + m.paper, ours + m.sparse
                prev_A = layer.A if self.update_percent < 100.0 else None
            else:
                other += layer.weight.size
                prev_A = None
        return {"gru_dense": dense, "gru_paper": paper, "gru_ours": ours, "other": other}
