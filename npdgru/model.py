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
``GRULayer`` classes with one interface (``reference``, ``cpu``, ``cuda``). On ``cuda`` the
features are uploaded once per call and the layers pass device arrays to each other; only the
mask comes back.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from .errors import ParameterError
from .reference import count_macs, num_selected
from .weights import Weights

BACKENDS = ("cpu", "reference", "cuda")

CUDA_INSTALL = 'pip install -e ".[cuda]"'


def get_backend(name: str):
    """The backend module: ``reference`` (NumPy, float64), ``cpu`` (Numba, float32) or ``cuda``
    (numba.cuda, float32; imported only here, on first use).

    ``cuda`` needs numba.cuda (the ``cuda`` extra, numba-cuda) and a CUDA GPU, or numba's CUDA
    simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python starts). Without them a
    ParameterError says how to install them.
    """
    if name == "reference":
        return importlib.import_module("npdgru.reference")
    if name == "cpu":
        return importlib.import_module("npdgru.kernels.cpu")
    if name == "cuda":
        try:
            mod = importlib.import_module("npdgru.kernels.cuda")
        except Exception as e:  # numba.cuda missing or broken (driver/bindings): no deep traceback
            raise ParameterError(
                f"backend 'cuda' needs numba.cuda, which cannot be imported ({type(e).__name__}: {e}); "
                f"install it with  {CUDA_INSTALL}  or use backend 'cpu'"
            ) from None
        mod.require_device()
        return mod
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
    backend : "cpu", "reference" or "cuda" (layers and state on the GPU; see :meth:`forward`)
    """

    def __init__(self, weights: Weights, *, update_percent: float = 100.0, backend: str = "cpu", refresh_every: int | None = None, sparse_inputs: bool = False):
        self.weights = weights
        self.architecture = weights.architecture
        self.n_features = self.architecture["n_features"]
        num_selected(update_percent, 1)  # validates P first: "50", None, True are refused, not cast
        self.update_percent = float(update_percent)
        self.sparse_inputs = bool(sparse_inputs)
        self.backend_name = backend
        B = get_backend(backend)
        self._backend = B
        self._upload = B.Workspace() if backend == "cuda" else None  # device copy of the features
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
        features : (T, B, n_features) log-power features. On the cuda backend it may also be a
            float32 device array (trusted to be finite), and the mask then stays on the device.
        state : from :meth:`init_state`, updated in place (streaming: call again with more frames).
            On the cuda backend the state lives on the GPU between calls.

        Returns
        -------
        (T, B, n_features) float32 mask in [0, 1]: a NumPy array, or a new device array for
        device features (cuda).
        """
        cuda = self.backend_name == "cuda"
        on_device = cuda and self._backend.is_device_array(features)
        x = features if on_device else np.asarray(features)
        if x.ndim != 3 or x.shape[2] != self.n_features or x.shape[1] != state.batch:
            raise ParameterError(f"features must have shape (T, {state.batch}, {self.n_features}), got {tuple(x.shape)}")
        if cuda and any(not isinstance(s, self._backend.GRUState) for s in getattr(state, "layers", [None])):
            raise ParameterError("state was not made by a cuda model's init_state (states do not move between backends)")
        if on_device:
            if np.dtype(x.dtype) != np.float32:
                raise ParameterError(f"device features must be float32, got {x.dtype}")
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                raise ParameterError("features contain NaN or Inf")
            if cuda:  # one upload; every layer runs on the device (a frame never leaves it)
                x = self._backend.to_device(x, self._upload)
        T, Bn = x.shape[:2]
        k = 0
        for layer in self.layers:  # inputs are validated once, here; layers run unchecked
            if hasattr(layer, "hidden_size"):
                x = layer._run(x, state.layers[k])
                k += 1
            else:
                y = layer._run(x.reshape(T * Bn, x.shape[2]))  # explicit sizes: T = 0 frames is allowed
                x = y.reshape(T, Bn, y.shape[1])
        if cuda:  # x is a view of a layer's workspace: hand out a copy
            if on_device:
                return self._backend.copy_device(x)
            return x.copy_to_host()
        return np.asarray(x, np.float32)

    def fraction_updated(self) -> float:
        """Fraction of GRU neurons updated per step (A/H averaged over layers, weighted by H)."""
        g = self.gru_layers
        return sum(layer.A for layer in g) / max(1, sum(layer.hidden_size for layer in g))

    def macs_per_frame(self) -> dict:
        """MACs per frame as this model runs: GRU layers (dense / paper / ours) and the rest.

        *ours* counts a layer's input product from A columns only when it really runs that way
        (``sparse_inputs=True`` and fed by a D-GRU layer); otherwise it is dense, 3H·I.
        """
        dense = paper = ours = other = 0
        prev_A = None
        for layer in self.layers:
            if hasattr(layer, "hidden_size"):
                m = count_macs(layer.input_size, layer.hidden_size, self.update_percent, input_changed=prev_A)
                dense, paper, ours = dense + m.dense, paper + m.paper, ours + m.sparse
                prev_A = layer.A if (self.sparse_inputs and self.update_percent < 100.0) else None
            else:
                other += layer.weight.size
                prev_A = None
        return {"gru_dense": dense, "gru_paper": paper, "gru_ours": ours, "other": other}
