"""The executor every backend shares: a :class:`~npdgru.plan.Plan` run step by step on the layer
classes of one backend module (``reference``, ``kernels.cpu``, ``kernels.cuda``).

A backend provides ``GRULayer`` (``init_state``, ``_run``, with a state that has ``take(rows)``
and ``put(rows, sub)``), ``Linear``, ``LayerNorm`` and the shape glue ``Ops`` (for the host
backends :class:`HostOps`). The executor builds them once from (plan, tensors) and then only runs:
the step kinds are read from the plan, never from the architecture.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError


class HostOps:
    """Shape glue between steps for the host backends (NumPy arrays, any float dtype)."""

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


def band_rows(rows: np.ndarray, F: int) -> np.ndarray:
    """State rows of streams ``rows`` in a step with F bands (stream b owns rows b·F ... b·F+F-1);
    a negative stream row (a new stream) gives F negative rows."""
    rows = np.asarray(rows, np.int64)
    if F == 1:
        return rows
    r = rows[:, None] * F + np.arange(F)
    r[rows < 0] = -1
    return r.reshape(-1)


class ExecState:
    """Carried state of an executor for B streams: one backend state per D-GRU step (a step with
    F bands carries B·F rows, stream b owning rows b·F ... b·F + F - 1).

    ``take(rows)`` gives a new state whose stream k is a copy of stream ``rows[k]`` (a fresh stream
    where ``rows[k] < 0``); ``put(rows, sub)`` writes the streams of ``sub`` back into ``rows``.
    """

    def __init__(self, layers: list, batch: int, bands: list):
        self.layers, self.batch, self.bands = layers, batch, bands

    def take(self, rows) -> "ExecState":
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and rows.max() >= self.batch:
            raise ParameterError(f"rows {rows.tolist()} out of range for a batch of {self.batch}")
        return ExecState([st.take(band_rows(rows, F)) for st, F in zip(self.layers, self.bands)], len(rows), self.bands)

    def put(self, rows, sub: "ExecState") -> None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size != sub.batch or (rows.size and (rows.min() < 0 or rows.max() >= self.batch)) or len(set(rows.tolist())) != rows.size:
            raise ParameterError(f"rows {rows.tolist()} must be {sub.batch} distinct rows of a batch of {self.batch}")
        for st, s2, F in zip(self.layers, sub.layers, self.bands):
            st.put(band_rows(rows, F), s2)


class GraphExecutor:
    """Runs a plan on one backend. Subclasses (one per backend) set ``backend`` and the module.

    Parameters
    ----------
    plan : :class:`npdgru.plan.Plan`
    tensors : the weight file's tensors (PyTorch names and layouts)
    refresh_every : accumulator refresh period of the D-GRU steps (backend default if None)
    """

    backend = "?"
    ops = HostOps

    def __init__(self, plan, tensors, module, *, refresh_every=None):
        self.plan, self.module = plan, module
        extra = {} if refresh_every is None else {"refresh_every": refresh_every}
        self._runners = []
        self._slot_names = ["features"] + [s.name for s in plan.steps]
        for s in plan.steps:
            self._check_kind(s)
            w = [tensors[n] for n in s.tensors]
            if s.kind == "gru":
                obj = module.GRULayer(*w, update_percent=plan.update_percent, sparse_input=s.sparse_input, name=s.name, **extra)
            elif s.kind == "bigru":
                obj = (module.GRULayer(*w[:4], update_percent=100.0, name=s.name), module.GRULayer(*w[4:], update_percent=100.0, name=f"{s.name}_reverse"))
            elif s.kind == "linear":
                obj = module.Linear(*w, activation=s.activation, name=s.name)
            elif s.kind == "layernorm":
                obj = module.LayerNorm(*w, eps=s.eps, name=s.name)
            else:
                obj = None
            self._runners.append(obj)

    def _check_kind(self, step) -> None:
        """Refuse a step this backend cannot run (ParameterError naming it)."""

    # -- layers ---------------------------------------------------------------------------------

    @property
    def layers(self) -> list:
        """The backend layers in order (a bidirectional GRU gives its two directions)."""
        out = []
        for obj in self._runners:
            if isinstance(obj, tuple):
                out += list(obj)
            elif obj is not None and not hasattr(obj, "size"):
                out.append(obj)
        return out

    @property
    def gru_layers(self) -> list:
        """The D-GRU layers along time (those with carried state), in order."""
        return [obj for s, obj in zip(self.plan.steps, self._runners) if s.carries_state]

    # -- state and running ----------------------------------------------------------------------

    def init_state(self, batch: int = 1) -> ExecState:
        steps = self.plan.state_steps
        return ExecState([g.init_state(batch * s.bands) for s, g in zip(steps, self.gru_layers)], batch, [s.bands for s in steps])

    def check_features(self, features, state):
        """The features as the array the steps take; ParameterError for a bad shape or value."""
        x = np.asarray(features)
        nf = self.plan.n_features
        if not isinstance(state, ExecState):
            raise ParameterError(f"state must come from init_state of this model, got {type(state).__name__}")
        if x.ndim != 3 or x.shape[2] != nf or x.shape[1] != state.batch:
            raise ParameterError(f"features must have shape (T, {state.batch}, {nf}), got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ParameterError("features contain NaN or Inf")
        return x

    def run(self, features, state: ExecState):
        """Masks (T, B, n_features) for features (T, B, n_features); ``state`` updated in place."""
        x = self.check_features(features, state)
        return self.finish(self._walk(x, state))

    def finish(self, y):
        return np.asarray(y, np.float32)

    def _walk(self, x, state: ExecState):
        T, Bn = x.shape[:2]
        values = [None] * (len(self.plan.steps) + 1)
        values[0] = x
        k = 0
        ops = self.ops
        for s, obj in zip(self.plan.steps, self._runners):
            xs = [values[i] for i in s.slots]
            F = s.bands
            if s.kind == "gru":
                y = obj._run(xs[0].reshape(T, Bn * F, s.size_in), state.layers[k]).reshape(T, Bn, s.width)
                k += 1
            elif s.kind == "bigru":
                y = self._bigru(obj, xs[0], s, T, Bn)
            elif s.kind in ("linear", "layernorm"):
                y = obj._run(xs[0].reshape(T * Bn * F, s.size_in)).reshape(T, Bn, s.width)
            elif s.kind == "add":
                y = xs[0]
                for z in xs[1:]:
                    y = ops.add(y, z)
            elif s.kind == "concat":
                y = ops.concat(xs)
            elif s.kind == "pad":
                y = ops.pad(xs[0], s.size_out)
            else:  # slice
                y = ops.slice(xs[0], s.start, s.stop)
            for i in s.slots:  # free what no later step reads
                if self._slot_names[i] in s.frees:
                    values[i] = None
            values[s.slot] = y
        return values[-1]

    def _bigru(self, pair, x, s, T, Bn):
        """Dense bidirectional GRU across the F bands of each frame (DPRNN's intra-frame path).

        Every frame of every stream is a sequence of F steps starting from h = 0, so nothing is
        carried from frame to frame: offline and streaming give the same output. Output per band:
        [forward h, backward h] (``torch.nn.GRU(bidirectional=True)``).
        """
        fwd, bwd = pair
        F, I, H, ops = s.bands, s.size_in, s.hidden, self.ops
        N = T * Bn
        if N == 0:  # no frame (T = 0): nothing to run, and a GRU state of 0 streams cannot be made
            return ops.pad(ops.slice(x, 0, 0), F * 2 * H)
        seq = ops.swap01(x.reshape(N, F, I))  # (F, N, I): bands are the steps, frames the streams
        yf = fwd._run(seq, fwd.init_state(N))
        yb = ops.flip0(bwd._run(ops.flip0(seq), bwd.init_state(N)))
        y = ops.swap01(ops.concat([yf, yb]))  # (N, F, 2H)
        return y.reshape(T, Bn, F * 2 * H)
