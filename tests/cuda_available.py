"""Whether the cuda tests can run here: numba's CUDA simulator or a real GPU (shared by the cuda test files)."""

from __future__ import annotations

import os

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REASON = (
    "cuda kernels need a CUDA GPU or numba's simulator: run with NUMBA_ENABLE_CUDASIM=1 set before "
    "Python starts (pip install -e '.[cuda]')"
)


def _gpu_present() -> bool:
    if SIM:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:
        return False


CUDA_OK = SIM or _gpu_present()
