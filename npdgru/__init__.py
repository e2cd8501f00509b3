"""npdgru: the Dynamic GRU (D-GRU) for compute-efficient speech enhancement, in NumPy + Numba.

Layers of the package (imports point down): ``cli`` -> ``enhance`` -> ``stft``, ``model`` ->
``kernels`` (cpu, cuda) and ``reference`` (the NumPy specification) -> ``weights``, ``errors``.
"""

__version__ = "0.1.0"
