"""Backends: one executor each, built from (plan, tensors), with the same interface.

``reference`` NumPy, float64 (:mod:`npdgru.kernels.reference` on :mod:`npdgru.reference`, the specification)
``cpu``       numba @njit kernels, float32 (imported on first use)
``cuda``      numba.cuda kernels (imported lazily; needs the ``cuda`` extra or the simulator)

Each backend module mirrors :mod:`npdgru.reference` function for function and offers
``Executor(plan, tensors, refresh_every=None, exact=False)`` with ``init_state(B)``, ``run(features, state)``
and a state with ``take(rows)`` / ``put(rows, sub)``, and ``RUNNERS``: one runner per layer kind
(``npdgru.kinds.KINDS``).
"""

from __future__ import annotations

import importlib

from ..errors import ParameterError

BACKENDS = ("cpu", "reference", "cuda")

GPU_INSTALL = 'pip install -e ".[cuda]"'


def get_backend(name: str):
    """The backend module: ``reference`` (NumPy, float64), ``cpu`` (Numba, float32) or ``cuda``
    (numba.cuda, float32; imported only here, on first use).

    ``cuda`` needs numba.cuda (the ``cuda`` extra, numba-cuda) and a CUDA GPU, or numba's CUDA
    simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Python starts). Without them a
    ParameterError says how to install them.
    """
    if name == "reference":
        return importlib.import_module("npdgru.kernels.reference")
    if name == "cpu":
        return importlib.import_module("npdgru.kernels.cpu")
    if name == "cuda":
        try:
            mod = importlib.import_module("npdgru.kernels.cuda")
        except Exception as e:  # numba.cuda missing or broken (driver/bindings): no deep traceback
            raise ParameterError(
                f"backend 'cuda' needs numba.cuda, which cannot be imported ({type(e).__name__}: {e}); "
                f"install it with  {GPU_INSTALL}  or use backend 'cpu'"
            ) from None
        mod.require_device()
        return mod
    raise ParameterError(f"backend={name!r} must be one of {BACKENDS}")
