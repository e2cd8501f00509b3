"""The device: whether numba.cuda runs here (a GPU or the simulator), transfers and workspaces."""

from __future__ import annotations

import numpy as np
from numba import config as _numba_config
from numba import cuda, float32

from ...errors import ParameterError

__all__ = ["INSTALL_HINT", "simulator", "require_device", "is_device_array", "to_device", "copy_device", "synchronize", "Workspace"]

INSTALL_HINT = (
    'on a machine with an NVIDIA GPU and driver install the cuda extra:  pip install -e ".[cuda]"  '
    '(numba-cuda; add  "numba-cuda[cu12]"  or  "numba-cuda[cu13]"  for the CUDA libraries matching '
    "the driver); without a GPU set NUMBA_ENABLE_CUDASIM=1 before Python starts to run numba's (slow) "
    "CUDA simulator, or use backend 'cpu'"
)


def simulator() -> bool:
    """True when numba runs CUDA kernels in its simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(_numba_config.ENABLE_CUDASIM)


def _new_shared(shape, dtype):
    """A block's new shared array in the simulator (uninitialised, as on a GPU)."""
    return np.empty(shape, dtype)


def _serialise_simulated_shared_arrays() -> bool:
    """Make the simulator's ``cuda.shared.array`` give every thread of a block the same array.

    The simulator runs each CUDA thread as a Python thread and creates a block's shared array on
    the first call from a source line: look it up by (file, line), create it if absent, store
    it, with no lock. Two threads that both look it up before either stores it get two different
    arrays, so a thread reads entries nobody wrote (a garbage column index, a wrong mask), now
    and then and more often on some machines. A real GPU has no such step. This replaces the
    method (numba-cuda's simulator ``FakeCUDAShared.array``) by one whose lookup and store are one
    step under a lock, keyed as before by the calling line. Returns True if the simulator is on.
    """
    if not simulator():
        return False
    import sys
    import threading

    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_npdgru_locked", False):
        return True
    dynamic, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer) or an error
            return dynamic(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = _new_shared(shape, dtype)
        return res

    array._npdgru_locked = True
    shared.array = array
    return True


_serialise_simulated_shared_arrays()


_DEVICE_OK = False  # require_device() succeeded once (real GPU)


def _probe(a):
    a[0] = 1.0


def require_device() -> None:
    """Raise ParameterError, with the fix, unless a CUDA GPU (or the simulator) can run kernels."""
    if simulator():
        return
    try:
        ok = cuda.is_available()
    except Exception as e:  # a broken driver or bindings install  # pragma: no cover
        raise ParameterError(f"backend 'cuda': numba.cuda cannot use the GPU ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    if not ok:
        raise ParameterError(f"backend 'cuda': no CUDA GPU found (numba.cuda.is_available() is False); {INSTALL_HINT}")
    global _DEVICE_OK
    if _DEVICE_OK:
        return
    try:  # kernels are compiled by NVVM (and NVRTC): check now, not at the first launch
        cuda.compile_ptx_for_current_device(_probe, (float32[::1],))
    except Exception as e:  # pragma: no cover (needs a GPU without the CUDA libraries)
        raise ParameterError(f"backend 'cuda': a GPU is present but numba cannot compile for it ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    _DEVICE_OK = True


def is_device_array(a) -> bool:
    """True for a numba device array (a simulator one under NUMBA_ENABLE_CUDASIM=1)."""
    return cuda.devicearray.is_cuda_ndarray(a)


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def to_device(a, workspace=None):
    """A host float array as a float32 device array (device arrays are returned as they are).

    With a :class:`Workspace` the copy goes into it (no device allocation once it is large enough).
    """
    if is_device_array(a):
        return a
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.strides != _c_strides(a.shape, a.itemsize):
        # numpy calls x[None] C-contiguous whatever the stride of a size-1 axis is; numba's
        # device arrays do not (reshape then raises "operation requires copying"): make it canonical
        a = a.copy()
    if workspace is None:
        return cuda.to_device(a)
    d = workspace.get(a.shape)
    if a.size:
        d.copy_to_device(a)
    return d


def copy_device(a):
    """A new device array with the contents of device array ``a``."""
    d = cuda.device_array(a.shape, a.dtype)
    if a.size:
        d.copy_to_device(a)
    return d


def synchronize() -> None:
    """Wait for every launched kernel (for timing)."""
    cuda.synchronize()


class Workspace:
    """A grow-only float32 device buffer; ``get(shape)`` is a C-contiguous view of its start.

    Reused by every call, so that streaming (one frame per call) allocates nothing on the device
    after the first call. A view is valid until the next ``get`` on the same workspace.
    """

    def __init__(self, dtype=np.float32):
        self.dtype, self.buf = dtype, None

    def get(self, shape):
        n = int(np.prod(shape))
        if self.buf is None or self.buf.shape[0] < n:
            self.buf = cuda.device_array(max(n, 1), self.dtype)
        return self.buf[:n].reshape(shape)
