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
from .weights import Weights, layer_inputs

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
    """Carried state of a model for B streams: one entry per GRU layer (a layer with F bands
    carries B·F rows, stream b owning rows b·F ... b·F + F - 1)."""

    layers: list
    batch: int


class HostOps:
    """Shape glue between layers for the host backends (NumPy arrays, any float dtype)."""

    @staticmethod
    def swap01(x):
        return np.ascontiguousarray(x.transpose(1, 0, 2))

    @staticmethod
    def flip0(x):
        return np.ascontiguousarray(x[::-1])

    @staticmethod
    def concat(xs):
        return np.concatenate(xs, axis=-1)

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def pad(x, out):
        y = np.zeros(x.shape[:-1] + (out,), x.dtype)
        y[..., : x.shape[-1]] = x
        return y

    @staticmethod
    def slice(x, start, stop):
        return np.ascontiguousarray(x[..., start:stop])


class _Node:
    """One layer of the architecture graph: ``run(inputs, T, B, state)`` on (T, B, width) arrays."""

    gru = None  # the backend GRULayer carrying state along time, if any

    def __init__(self, spec, inputs):
        self.spec, self.name, self.inputs = spec, spec["name"], inputs
        self.kind, self.bands = spec["kind"], spec.get("bands", 1)


class _LinearNode(_Node):
    def __init__(self, spec, inputs, layer):
        super().__init__(spec, inputs)
        self.layer = layer

    def run(self, xs, T, B, state):
        y = self.layer._run(xs[0].reshape(T * B * self.bands, self.spec["in"]))  # explicit sizes: T = 0 works
        return y.reshape(T, B, self.bands * self.spec["out"])


class _NormNode(_LinearNode):
    def run(self, xs, T, B, state):
        C = self.spec["size"]
        return self.layer._run(xs[0].reshape(T * B * self.bands, C)).reshape(T, B, self.bands * C)


class _GRUNode(_Node):
    """D-GRU along time; with F bands each stream is F streams sharing the weights."""

    def __init__(self, spec, inputs, layer):
        super().__init__(spec, inputs)
        self.gru = layer

    def run(self, xs, T, B, state):
        F = self.bands
        y = self.gru._run(xs[0].reshape(T, B * F, self.spec["in"]), state)
        return y.reshape(T, B, F * self.spec["hidden"])


class _BiGRUNode(_Node):
    """Dense bidirectional GRU across the F bands of each frame (DPRNN's intra-frame path).

    Every frame of every stream is a sequence of F steps starting from h = 0, so nothing is carried
    from frame to frame: offline and streaming give the same output. Output per band: [forward h,
    backward h] (``torch.nn.GRU(bidirectional=True)``).
    """

    def __init__(self, spec, inputs, fwd, bwd, ops):
        super().__init__(spec, inputs)
        self.fwd, self.bwd, self.ops = fwd, bwd, ops

    def run(self, xs, T, B, state):
        F, I, H, ops = self.bands, self.spec["in"], self.spec["hidden"], self.ops
        N = T * B
        if N == 0:  # no frame (T = 0): nothing to run, and a GRU state of 0 streams cannot be made
            return ops.pad(ops.slice(xs[0], 0, 0), F * 2 * H)
        seq = ops.swap01(xs[0].reshape(N, F, I))  # (F, N, I): bands are the steps, frames the streams
        yf = self.fwd._run(seq, self.fwd.init_state(N))
        yb = ops.flip0(self.bwd._run(ops.flip0(seq), self.bwd.init_state(N)))
        y = ops.swap01(ops.concat([yf, yb]))  # (N, F, 2H)
        return y.reshape(T, B, F * 2 * H)


class _OpNode(_Node):
    def __init__(self, spec, inputs, ops):
        super().__init__(spec, inputs)
        self.ops = ops

    def run(self, xs, T, B, state):
        s, ops = self.spec, self.ops
        if self.kind == "add":
            y = xs[0]
            for x in xs[1:]:
                y = ops.add(y, x)
            return y
        if self.kind == "concat":
            return ops.concat(xs)
        if self.kind == "pad":
            return ops.pad(xs[0], s["out"])
        return ops.slice(xs[0], s["start"], s["stop"])


class MaskModel:
    """A mask estimator (NSNet2, DPRNN, MPT, ...) at update percentage P on one backend.

    Parameters
    ----------
    weights : a loaded :class:`npdgru.weights.Weights`
    update_percent : P in (0, 100]; every GRU layer along time updates A = ceil(P·H/100) neurons
        per step (the bidirectional GRUs across frequency of DPRNN stay dense).
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
        ops = getattr(B, "Ops", HostOps)
        extra = {} if refresh_every is None else {"refresh_every": refresh_every}
        t = weights.tensors
        self.nodes: list[_Node] = []
        specs = self.architecture["layers"]
        kinds = {"features": None}
        for i, spec in enumerate(specs):
            n, kind, ins = spec["name"], spec["kind"], layer_inputs(specs, i)
            if kind == "gru":
                # an input accumulator fed by the changed entries only: for a D-GRU layer read
                # straight from the state of another D-GRU layer with the same bands
                src = specs[[x["name"] for x in specs].index(ins[0])] if ins[0] != "features" else None
                sparse_in = bool(sparse_inputs) and self.update_percent < 100.0 and src is not None and src["kind"] == "gru" and src.get("bands", 1) == spec.get("bands", 1)
                layer = B.GRULayer(t[f"{n}.weight_ih"], t[f"{n}.weight_hh"], t[f"{n}.bias_ih"], t[f"{n}.bias_hh"], update_percent=self.update_percent, sparse_input=sparse_in, name=n, **extra)
                node = _GRUNode(spec, ins, layer)
            elif kind == "bigru":
                fwd, bwd = (B.GRULayer(t[f"{n}.weight_ih{s}"], t[f"{n}.weight_hh{s}"], t[f"{n}.bias_ih{s}"], t[f"{n}.bias_hh{s}"], update_percent=100.0, name=f"{n}{s}") for s in ("", "_reverse"))
                node = _BiGRUNode(spec, ins, fwd, bwd, ops)
            elif kind == "linear":
                node = _LinearNode(spec, ins, B.Linear(t[f"{n}.weight"], t[f"{n}.bias"], activation=spec.get("activation", "none"), name=n))
            elif kind == "layernorm":
                if not hasattr(B, "LayerNorm"):
                    raise ParameterError(f"backend {backend!r} cannot run layer {n} (layernorm) yet; use backend 'cpu'")
                node = _NormNode(spec, ins, B.LayerNorm(t[f"{n}.weight"], t[f"{n}.bias"], eps=spec.get("eps", 1e-5), name=n))
            else:
                node = _OpNode(spec, ins, ops)
            if kind in ("bigru", "add", "concat", "pad", "slice") and ops is HostOps and backend == "cuda":
                raise ParameterError(f"backend 'cuda' cannot run layer {n} ({kind}) yet; use backend 'cpu'")
            kinds[n] = kind
            self.nodes.append(node)
        # when each value is read for the last time (offline calls free what is no longer needed)
        self._last_use = {}
        for k, node in enumerate(self.nodes):
            for x in node.inputs:
                self._last_use[x] = k

    @property
    def layers(self):
        """The backend layers in order (a bidirectional GRU gives its two directions)."""
        out = []
        for node in self.nodes:
            if isinstance(node, _BiGRUNode):
                out += [node.fwd, node.bwd]
            elif isinstance(node, _GRUNode):
                out.append(node.gru)
            elif isinstance(node, _LinearNode):
                out.append(node.layer)
        return out

    @property
    def gru_layers(self):
        """The D-GRU layers along time (those with carried state), in order."""
        return [node.gru for node in self.nodes if node.gru is not None]

    @property
    def gru_bands(self) -> list[int]:
        """Bands F of each D-GRU layer: its state holds F rows per stream."""
        return [node.bands for node in self.nodes if node.gru is not None]

    def init_state(self, batch: int = 1) -> ModelState:
        return ModelState(layers=[n.gru.init_state(batch * n.bands) for n in self.nodes if n.gru is not None], batch=batch)

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
        values = {"features": x}
        k = 0
        for i, node in enumerate(self.nodes):  # inputs are validated once, here; layers run unchecked
            st = None
            if node.gru is not None:
                st = state.layers[k]
                k += 1
            y = node.run([values[n] for n in node.inputs], T, Bn, st)
            for n in node.inputs:
                if self._last_use[n] == i:
                    values.pop(n, None)
            values[node.name] = y
        x = values[self.nodes[-1].name]
        if cuda:  # x is a view of a layer's workspace: hand out a copy
            if on_device:
                return self._backend.copy_device(x)
            return x.copy_to_host()
        return np.asarray(x, np.float32)

    def fraction_updated(self) -> float:
        """Fraction of D-GRU neurons updated per step (A/H averaged over layers, weighted by H·bands)."""
        g = [(n.gru, n.bands) for n in self.nodes if n.gru is not None]
        return sum(layer.A * F for layer, F in g) / max(1, sum(layer.hidden_size * F for layer, F in g))

    def macs_per_frame(self) -> dict:
        """MACs per frame as this model runs: D-GRU layers (dense / paper / ours) and the rest.

        *ours* counts a layer's input product from A columns only when it really runs that way
        (``sparse_inputs=True`` and fed by a D-GRU layer); otherwise it is dense, 3H·I. A layer
        with F bands counts F times. The dense bidirectional GRUs across frequency (DPRNN) are in
        *other*, with the linear layers; normalisation and shape glue are not counted.
        """
        dense = paper = ours = other = 0
        A_of = {}
        for node in self.nodes:
            s, F = node.spec, node.bands
            if node.gru is not None:
                g = node.gru
                prev_A = A_of.get(node.inputs[0]) if getattr(g, "sparse_input", False) else None
                m = count_macs(s["in"], s["hidden"], self.update_percent, input_changed=prev_A)
                dense, paper, ours = dense + F * m.dense, paper + F * m.paper, ours + F * m.sparse
                A_of[node.name] = g.A
            elif node.kind == "bigru":
                other += F * 2 * 3 * s["hidden"] * (s["in"] + s["hidden"])
            elif node.kind == "linear":
                other += F * s["in"] * s["out"]
        return {"gru_dense": dense, "gru_paper": paper, "gru_ours": ours, "other": other}
