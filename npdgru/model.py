"""Mask-estimation models built from a weight file's architecture.

A model is the architecture resolved into a plan (``plan.py``) and run by the executor of one
backend (``kernels/``) on log-power features, e.g. NSNet2 (``docs/design.md``)::

    log-power (161) -> FC 400 + ReLU -> GRU 400 -> GRU 400 -> FC 600 + ReLU -> FC 600 + ReLU
                    -> FC 161 + sigmoid = mask on the noisy STFT

Every GRU layer along time runs as a D-GRU at the chosen update percentage P. With
``sparse_inputs=True`` a GRU layer whose input is the state of a previous D-GRU layer keeps an
input accumulator fed by the changed entries only, so its input product costs 3H·A_in instead of
3H·I MACs. :class:`~npdgru.enhance.Enhancer` turns it on for the cpu backend at P <= 50, where
benchmarks/bench_enhance.py measures it faster offline and per streaming hop; ``MaskModel``
leaves it off unless asked.

The model knows no backend's details: it chooses an executor and hands it the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import BACKENDS, get_backend
from .kernels._graph import ExecState, HostOps
from .plan import make_plan
from .weights import Weights

__all__ = ["MaskModel", "ModelState", "LayerWork", "HostOps", "get_backend", "BACKENDS"]

ModelState = ExecState  # carried state of a model for B streams (see kernels._graph.ExecState)


@dataclass(frozen=True)
class LayerWork:
    """Measured work of one threshold or delta layer (:meth:`MaskModel.work_per_frame`).

    state_columns  (T,) recurrent columns read per frame (the updated or propagated state
                   entries), per band
    input_columns  (T,) input columns read per frame (delta: the propagated input entries), per
                   band; None for a threshold layer (its input product is dense)
    """

    name: str
    gate: str
    hidden: int
    size_in: int
    bands: int
    state_columns: np.ndarray
    input_columns: np.ndarray | None

    def means(self) -> tuple:
        """(state columns, input columns or None) per frame and band, means over the frames: what
        ``Plan.macs(measured=)`` takes."""
        return float(self.state_columns.mean()), None if self.input_columns is None else float(self.input_columns.mean())

    def share(self) -> np.ndarray:
        """(T,) share of the H state entries updated per frame."""
        return self.state_columns / self.hidden


def work_means(work: dict | None) -> dict | None:
    """{layer name: LayerWork.means()} of :meth:`MaskModel.work_per_frame`'s result: what
    ``Plan.macs(measured=)`` takes (None stays None)."""
    return None if work is None else {k: v.means() for k, v in work.items()}


class MaskModel:
    """A mask estimator (NSNet2, DPRNN, MPT, ...) at update percentage P on one backend.

    Parameters
    ----------
    weights : a loaded :class:`npdgru.weights.Weights`
    update_percent : P in (0, 100]; every GRU layer along time updates A = ceil(P·H/100) neurons
        per step (the bidirectional GRUs across frequency of DPRNN stay dense).
    backend : "cpu", "reference" or a GPU backend (see :func:`npdgru.kernels.get_backend`)
    refresh_every : accumulator refresh period of the D-GRU layers (backend default if None)
    sparse_inputs : input accumulators for D-GRU layers fed by a D-GRU layer (see above)
    exact : the cpu backend computes every product in the fixed column order of the streaming
        hop, so that offline and streaming masks are the same bits; by default the products over
        many frames run through BLAS (faster; the same masks within a tolerance, ``docs/speed.md``)
    """

    def __init__(self, weights: Weights, *, update_percent: float = 100.0, backend: str = "cpu", refresh_every: int | None = None, sparse_inputs: bool = False, exact: bool = False):
        self.weights = weights
        self.architecture = weights.architecture
        self.n_features = self.architecture["n_features"]
        self.sparse_inputs = bool(sparse_inputs)
        self.exact = bool(exact)
        self.backend_name = backend
        self.plan = make_plan(self.architecture, update_percent=update_percent, sparse_inputs=self.sparse_inputs)  # checks P
        self.update_percent = self.plan.update_percent
        self.executor = get_backend(backend).Executor(self.plan, weights.tensors, refresh_every=refresh_every, exact=self.exact)

    @property
    def layers(self):
        """The backend layers in order (a bidirectional GRU gives its two directions)."""
        return self.executor.layers

    @property
    def gru_layers(self):
        """The D-GRU layers along time (those with carried state), in order."""
        return self.executor.gru_layers

    @property
    def gru_bands(self) -> list[int]:
        """Bands F of each D-GRU layer: its state holds F rows per stream."""
        return [s.bands for s in self.plan.state_steps]

    def init_state(self, batch: int = 1) -> ModelState:
        return self.executor.init_state(batch)

    def forward(self, features, state: ModelState, *, exact: bool | None = None) -> np.ndarray:
        """Masks for T frames of B streams.

        Parameters
        ----------
        features : (T, B, n_features) log-power features (a GPU backend may also take a float32
            device array, trusted to be finite; the mask then stays on the device).
        state : from :meth:`init_state`, updated in place (streaming: call again with more frames).
        exact : this call's products in column order (True) whatever the model's ``exact``
            (the streaming paths pass True); None: the model's own.

        Returns
        -------
        (T, B, n_features) float32 mask in [0, 1].
        """
        return self.executor.run(features, state, exact=exact)

    def fraction_updated(self) -> float:
        """Fraction of D-GRU neurons updated per step (A/H averaged over layers, weighted by H·bands)."""
        return self.plan.fraction_updated()

    def macs_per_frame(self, measured: dict | None = None) -> dict:
        """MACs per frame as this model runs (:meth:`npdgru.plan.Plan.macs`); ``measured`` (from
        :meth:`work_per_frame`) counts the threshold and delta layers at their measured mean work
        instead of the dense bound."""
        return self.plan.macs(measured=work_means(measured))

    def updated_share(self, work: dict) -> np.ndarray:
        """(T,) share of all D-GRU state entries updated per frame, weighted by H·bands as
        :meth:`fraction_updated`: the measured layers of ``work`` (:meth:`work_per_frame`) per
        frame, the top-A layers at their A."""
        steps = self.plan.state_steps
        T = len(next(iter(work.values())).state_columns) if work else 1
        updated = sum(s.A * s.bands for s in steps if s.name not in work) + sum(w.state_columns * w.bands for w in work.values())
        return np.broadcast_to(np.asarray(updated, np.float64) / sum(s.hidden * s.bands for s in steps), (T,))

    def work_per_frame(self, features) -> dict:
        """The measured work of the threshold and delta layers on ``features`` (T, 1, n_features).

        The work of such a layer varies per frame: it reads the recurrent columns of the updated
        (threshold) or propagated (delta) state entries, and a delta layer also the columns of
        its propagated input entries. Runs the frames one at a time from a fresh state (as a
        stream; the counts are those of an offline run too) on the cpu backend and returns, per
        layer name, a :class:`LayerWork` with per-frame column counts averaged over the layer's
        bands. Top-A layers are not listed (their count is A by construction).
        """
        from .errors import ParameterError
        from .kinds import VARIABLE_GATES

        if self.backend_name != "cpu":
            raise ParameterError(f"work_per_frame runs on the cpu backend (this model runs on {self.backend_name!r})")
        x = np.asarray(features)
        if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != self.n_features:
            raise ParameterError(f"work_per_frame: features must have shape (T, 1, {self.n_features}), got {x.shape}")
        state = self.init_state(1)
        watched = [(s, st) for s, st in zip(self.plan.state_steps, state.layers) if s.gate in VARIABLE_GATES]
        T = x.shape[0]
        counts = {s.name: np.zeros((T, 2), np.int64) for s, _ in watched}
        for t in range(T):
            before = [st.work.copy() for _, st in watched]
            self.forward(x[t : t + 1], state)
            for (s, st), b in zip(watched, before):
                counts[s.name][t] = st.work - b
        return {s.name: LayerWork(s.name, s.gate, s.hidden, s.size_in, s.bands, counts[s.name][:, 0] / s.bands,
                                  counts[s.name][:, 1] / s.bands if s.gate == "delta" else None) for s, _ in watched}
