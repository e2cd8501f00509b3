"""The executor every backend shares: a :class:`~npdgru.plan.Plan` run step by step, each step by
the runner its backend registers for the step's kind (``RUNNERS[kind]``).

A backend (``kernels.reference``, ``kernels.cpu``, ``kernels.cuda``) subclasses
:class:`GraphExecutor` with its layer classes ``GRULayer`` (``init_state``, ``_run``, a state with
``take(rows)`` and ``put(rows, sub)``), ``Linear``, ``LayerNorm``, its shape glue ``ops`` (for the
host backends :class:`HostOps`) and its table ``runners``. :data:`LAYER_RUNNERS` runs every kind
on those classes and ops, so a backend's table starts from it. The executor builds one runner
per step from (step, tensors) once, then only calls them: it never looks at a kind's name.
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


class Runner:
    """One plan step on one backend: built once from (step, its tensors, the executor), then called
    as ``runner(xs, state, T, Bn)`` with the step's inputs (T, Bn, width each) -> (T, Bn, width).

    ``layers``: the backend layers it runs; ``state_layer``: the one whose state it carries (a
    D-GRU along time), else None.
    """

    layers: tuple = ()
    state_layer = None

    def __init__(self, step, weights, ex):
        self.step = step


class LinearRunner(Runner):
    def __init__(self, step, weights, ex):
        self.step, self.layer = step, ex.Linear(*weights, activation=step.activation, name=step.name, **ex.product_options)
        self.layers = (self.layer,)

    def __call__(self, xs, state, T, Bn):
        s = self.step
        return self.layer._run(xs[0].reshape(T * Bn * s.bands, s.size_in)).reshape(T, Bn, s.width)


class LayerNormRunner(LinearRunner):
    def __init__(self, step, weights, ex):
        self.step, self.layer = step, ex.LayerNorm(*weights, eps=step.eps, name=step.name)
        self.layers = (self.layer,)


class GRURunner(Runner):
    """A D-GRU along time: F bands of a stream are F rows of the layer's state. A was resolved by
    the plan (``step.A``); a dense step (P = 100) runs the dense GRU kernel; a threshold or delta
    step passes its gate and thresholds (a backend's ``GRULayer.gates`` lists those it runs)."""

    def __init__(self, step, weights, ex):
        extra = {} if ex.refresh_every is None else {"refresh_every": ex.refresh_every}
        if step.gate != "top-a":  # a threshold or delta gate (kinds.GRU): the layer's own threshold, no A
            if step.gate not in getattr(ex.GRULayer, "gates", ("top-a",)):
                raise ParameterError(f"backend {ex.backend!r} cannot run step {step.name}: its {step.gate!r} gate runs on the cpu and reference backends")
            extra.update(gate=step.gate, theta=step.theta, theta_x=step.theta_x)
        self.step = step
        self.layer = self.state_layer = ex.GRULayer(*weights, A=None if step.dense or step.gate != "top-a" else step.A, sparse_input=step.sparse_input, name=step.name, **extra, **ex.product_options)
        self.layers = (self.layer,)

    def __call__(self, xs, state, T, Bn):
        s = self.step
        return self.layer._run(xs[0].reshape(T, Bn * s.bands, s.size_in), state.layers[s.state_index]).reshape(T, Bn, s.width)


class BiGRURunner(Runner):
    """Dense bidirectional GRU across the F bands of each frame (DPRNN's intra-frame path).

    Every frame of every stream is a sequence of F steps starting from h = 0, so nothing is
    carried from frame to frame: offline and streaming give the same output. Output per band:
    [forward h, backward h] (``torch.nn.GRU(bidirectional=True)``).
    """

    def __init__(self, step, weights, ex):
        self.step, self.ops = step, ex.ops
        opt = ex.product_options
        self.layers = (ex.GRULayer(*weights[:4], name=step.name, **opt), ex.GRULayer(*weights[4:], name=f"{step.name}_reverse", **opt))

    def __call__(self, xs, state, T, Bn):
        fwd, bwd = self.layers
        s, ops, x = self.step, self.ops, xs[0]
        F, I, H = s.bands, s.size_in, s.hidden
        N = T * Bn
        if N == 0:  # no frame (T = 0): nothing to run, and a GRU state of 0 streams cannot be made
            return ops.pad(ops.slice(x, 0, 0), F * 2 * H)
        seq = ops.swap01(x.reshape(N, F, I))  # (F, N, I): bands are the steps, frames the streams
        yf = fwd._run(seq, fwd.init_state(N))
        yb = ops.flip0(bwd._run(ops.flip0(seq), bwd.init_state(N)))
        y = ops.swap01(ops.concat([yf, yb]))  # (N, F, 2H)
        return y.reshape(T, Bn, F * 2 * H)


class GlueRunner(Runner):
    """Shape glue between steps, on the executor's ``ops``: ``fn(ops, step, xs)``."""

    fn = None

    def __init__(self, step, weights, ex):
        self.step, self.ops = step, ex.ops

    def __call__(self, xs, state, T, Bn):
        return type(self).fn(self.ops, self.step, xs)


def _glue(fn):
    return type("GlueRunner", (GlueRunner,), {"fn": staticmethod(fn)})


def _add(ops, s, xs):
    y = xs[0]
    for z in xs[1:]:
        y = ops.add(y, z)
    return y


LAYER_RUNNERS = {
    "linear": LinearRunner,
    "gru": GRURunner,
    "bigru": BiGRURunner,
    "layernorm": LayerNormRunner,
    "pad": _glue(lambda ops, s, xs: ops.pad(xs[0], s.size_out)),
    "slice": _glue(lambda ops, s, xs: ops.slice(xs[0], s.start, s.stop)),
    "add": _glue(_add),
    "concat": _glue(lambda ops, s, xs: ops.concat(xs)),
}


class GraphExecutor:
    """Runs a plan on one backend. Subclasses (one per backend) set ``backend``, ``ops``,
    ``runners`` and the layer classes ``GRULayer``, ``Linear``, ``LayerNorm``.

    Parameters
    ----------
    plan : :class:`npdgru.plan.Plan`
    tensors : the weight file's tensors (PyTorch names and layouts)
    refresh_every : accumulator refresh period of the D-GRU steps (backend default if None)
    exact : products over many frames in the fixed column order of the one-frame kernels, so that
        offline and streaming give the same bits (cpu; the float64 reference and the GPU
        backend have one product order anyway). Otherwise the cpu backend runs them through
        BLAS (``docs/speed.md``).
    """

    backend = "?"
    ops = HostOps
    runners: dict = {}
    # backend policy, read by the layers above (enhance, streaming, corpus)
    has_frame_program = False  # a one-frame program for this plan (``frame_program(B)``): the fused streaming hop
    sparse_inputs_max_p = 0.0  # P at or below which input accumulators are faster here; 0: never
    batches_files = False  # a corpus task runs its files as one batch (a GPU: fuller kernels)

    def __init__(self, plan, tensors, *, refresh_every=None, exact=False):
        self.plan, self.refresh_every, self.exact = plan, refresh_every, bool(exact)
        self._slot_names = ["features"] + [s.name for s in plan.steps]
        self.steps = []
        for s in plan.steps:
            if s.kind not in self.runners:
                raise ParameterError(f"backend {self.backend!r} cannot run step {s.name} (kind {s.kind!r} has no runner there)")
            self.steps.append(self.runners[s.kind](s, [tensors[n] for n in s.tensors], self))

    # -- layers ---------------------------------------------------------------------------------

    @property
    def product_options(self) -> dict:
        """Keywords of this backend's GRULayer and Linear that choose how products run (none
        here; the cpu backend passes ``exact``)."""
        return {}

    @property
    def layers(self) -> list:
        """The backend layers in order (a bidirectional GRU gives its two directions)."""
        return [layer for r in self.steps for layer in r.layers]

    @property
    def gru_layers(self) -> list:
        """The D-GRU layers along time (those with carried state), in order."""
        return [r.state_layer for r in self.steps if r.state_layer is not None]

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

    def run(self, features, state: ExecState, *, exact: bool | None = None):
        """Masks (T, B, n_features) for features (T, B, n_features); ``state`` updated in place.

        ``exact=True`` runs this call's products in column order whatever the executor's own
        setting: the streaming paths use it, so that a stream's hop has the same bits whether it
        runs alone, fused, or in a sub-batch of the streams of a call (``hop.Hops``)."""
        x = self.check_features(features, state)
        if exact is None or bool(exact) == self.exact:
            return self.finish(self._walk(x, state))
        layers = [layer for layer in self.layers if hasattr(layer, "exact")]
        for layer in layers:
            layer.exact = bool(exact)
        try:
            return self.finish(self._walk(x, state))
        finally:
            for layer in layers:
                layer.exact = self.exact

    def finish(self, y):
        return np.asarray(y, np.float32)

    def _walk(self, x, state: ExecState):
        T, Bn = x.shape[:2]
        values = [None] * (len(self.plan.steps) + 1)
        values[0] = x
        for s, run in zip(self.plan.steps, self.steps):
            y = run([values[i] for i in s.slots], state, T, Bn)
            for i in s.slots:  # free what no later step reads
                if self._slot_names[i] in s.frees:
                    values[i] = None
            values[s.slot] = y
        return values[-1]
