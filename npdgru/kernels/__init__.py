"""Fast backends. Each mirrors :mod:`npdgru.reference` function for function.

``cpu``  numba @njit kernels (imported on first use)
``cuda`` numba.cuda kernels (imported lazily; needs the ``cuda`` extra or the simulator)
"""
