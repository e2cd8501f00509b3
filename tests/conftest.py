"""Shared fixtures for the GRU / D-GRU tests.

* ``warm_kernels`` (session): compiles (or loads from the numba cache) every cpu kernel once, so
  that no hypothesis example pays for compilation and ``deadline=None`` is only a safety net.
* ``corner_case`` (parametrized): the corner cases of STYLE.md as shared data: all-zero input,
  a single frame, H = 1, A = 1, A = H.
* ``make_gru`` (session): a factory of random PyTorch-layout GRU weights and inputs.

Helpers are plain functions here and reach the tests through fixtures, so the test modules never
import ``conftest``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class GRUCase:
    """One GRU problem: float32 weights in torch.nn.GRU layout, inputs and initial state.

    weight_ih (3H, I)  weight_hh (3H, H)  bias_ih, bias_hh (3H,)  x (T, B, I)  h0 (B, H)
    """

    name: str
    weights: tuple  # (weight_ih, weight_hh, bias_ih, bias_hh), float32
    x: np.ndarray
    h0: np.ndarray
    A: int

    @property
    def H(self) -> int:
        return self.weights[1].shape[1]

    @property
    def I(self) -> int:  # noqa: E743 (the paper's name)
        return self.weights[0].shape[1]

    @property
    def weights64(self) -> tuple:
        """The same weights in float64, for the reference (float64 is the exact side of parity)."""
        return tuple(w.astype(np.float64) for w in self.weights)


def random_gru(H, I, *, seed, T=8, B=2, A=None, scale=1.0, x_scale=1.0, h0_scale=0.5, zero_h0=False) -> GRUCase:
    """Random GRU weights uniform in ±scale/sqrt(H) (torch.nn.GRU's init at scale=1), x ~ N(0, x_scale²)."""
    rng = np.random.default_rng(seed)
    k = scale / np.sqrt(H)
    weights = tuple(
        rng.uniform(-k, k, shape).astype(np.float32) for shape in [(3 * H, I), (3 * H, H), (3 * H,), (3 * H,)]
    )
    x = (rng.standard_normal((T, B, I)) * x_scale).astype(np.float32)
    h0 = np.zeros((B, H), np.float32) if zero_h0 else rng.uniform(-h0_scale, h0_scale, (B, H)).astype(np.float32)
    return GRUCase(name=f"random H={H} I={I} seed={seed}", weights=weights, x=x, h0=h0, A=H if A is None else A)


@pytest.fixture(scope="session")
def make_gru():
    """Factory: ``make_gru(H, I, seed=..., T=, B=, A=, scale=, x_scale=, zero_h0=)`` -> GRUCase."""
    return random_gru


def _corner(name: str) -> GRUCase:
    if name == "zero_input":  # silence: x = 0, h0 = 0; only the biases drive the state
        c = random_gru(12, 5, seed=11, T=6, B=2, A=5, zero_h0=True)
        c.x[...] = 0.0
    elif name == "single_frame":
        c = random_gru(9, 4, seed=12, T=1, B=3, A=4)
    elif name == "H1":  # one neuron: A = ceil(P·1/100) = 1 for every P
        c = random_gru(1, 3, seed=13, T=7, B=2, A=1)
    elif name == "A1":
        c = random_gru(16, 6, seed=14, T=9, B=2, A=1)
    elif name == "AH":  # A = H: the D-GRU is the dense GRU written as h + u (n - h)
        c = random_gru(10, 4, seed=15, T=8, B=2, A=10)
    else:  # pragma: no cover
        raise ValueError(name)
    c.name = name
    return c


CORNER_CASES = ["zero_input", "single_frame", "H1", "A1", "AH"]


@pytest.fixture(params=CORNER_CASES)
def corner_case(request) -> GRUCase:
    """The STYLE.md corner cases: all-zero input, a single frame, H=1, A=1, A=H."""
    return _corner(request.param)


@pytest.fixture(scope="session")
def warm_kernels():
    """Compile every cpu kernel specialisation the tests use, once per session.

    Uses the same dtypes and layouts as the tests (float32 C-contiguous arrays, a C-contiguous
    bool ``selected``), so later calls hit the compiled code. Returns the ``cpu`` module.
    """
    from npdgru.kernels import cpu

    c = random_gru(5, 3, seed=0, T=3, B=2, A=2)
    for kwargs in ({"update_percent": 100.0}, {"update_percent": 40.0}, {"update_percent": 40.0, "sparse_input": True}):
        layer = cpu.GRULayer(*c.weights, **kwargs)
        state = layer.init_state(2, c.h0)
        sel = np.zeros((3, 2, 5), bool)
        layer.forward(c.x, state, selected=sel)
        layer.forward(c.x[:1], state)
    cpu.dgru_sequence(c.x, c.h0, *c.weights, 5)
    return cpu


# The quick selection (`python3 -m pytest -m quick`): the specification and its cpu kernels, the
# weight file and STFT, the command line, conversion, streaming and the user-facing edges; under
# two minutes on 2 cores with the numba cache warm. The full suite stays the one CI runs.
QUICK_MODULES = {
    "test_reference", "test_weights", "test_stft", "test_kernels_cpu", "test_cli", "test_convert",
    "test_stream_batch", "test_user_edges", "test_stream_rates",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in QUICK_MODULES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)
