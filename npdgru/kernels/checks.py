"""Argument checks shared by the backends (cpu, cuda): every public layer validates with these
and raises a ParameterError that names the tensor or argument, so the kernels behind can trust
their inputs."""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError

__all__ = ["DEFAULT_REFRESH", "ACT_CODES", "positive_int", "as_f32", "selected_count", "check_gru_weights", "check_linear_weights", "check_norm_weights"]

# accumulator refresh period of the D-GRU layers (steps of a stream; 1.28 s at a 10 ms hop): the
# float32 drift bound is measured in tests/test_kernels_drift.py
DEFAULT_REFRESH = 128

# activation codes of the Linear kernels (cpu and cuda); the names are npdgru.kinds.ACTIVATIONS
ACT_CODES = {"none": 0, "relu": 1, "sigmoid": 2, "tanh": 3}


def positive_int(name, v):
    """``v`` as an int >= 1; anything else (None, str, bool, 1.5, NaN, inf) -> ParameterError."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating)) or not float(v).is_integer() or v < 1:
        raise ParameterError(f"{name}={v!r} must be a positive integer")
    return int(v)


def as_f32(name, a, shape):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ParameterError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != shape:
        raise ParameterError(f"{name} must have shape {shape}, got {a.shape}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
        a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ParameterError(f"{name} contains NaN or Inf")
    return a


def selected_count(A, H):
    """A as an int in [1, H]; ParameterError otherwise (every backend's ``GRULayer(A=...)``)."""
    A = positive_int("A", A)
    if A > H:
        raise ParameterError(f"A={A!r} must be an integer in [1, H={H}]")
    return A


def check_gru_weights(weight_ih, weight_hh, bias_ih, bias_hh, name):
    """The four GRU tensors as float32 arrays of consistent shapes (3H, I), (3H, H), (3H,), (3H,).

    Shared by every backend's ``GRULayer``; a wrong shape or dtype is a ParameterError naming
    the tensor.
    """
    w_hh = np.asarray(weight_hh)
    w_ih = np.asarray(weight_ih)
    if w_hh.ndim != 2 or w_hh.shape[0] != 3 * w_hh.shape[1] or w_hh.shape[1] < 1:
        raise ParameterError(f"{name}.weight_hh must have shape (3H, H), got {w_hh.shape}")
    H = w_hh.shape[1]
    if w_ih.ndim != 2 or w_ih.shape[0] != 3 * H or w_ih.shape[1] < 1:
        raise ParameterError(f"{name}.weight_ih must have shape (3H, I) = ({3 * H}, I), got {w_ih.shape}")
    I = w_ih.shape[1]
    return (
        as_f32(f"{name}.weight_ih", w_ih, (3 * H, I)),
        as_f32(f"{name}.weight_hh", w_hh, (3 * H, H)),
        as_f32(f"{name}.bias_ih", bias_ih, (3 * H,)),
        as_f32(f"{name}.bias_hh", bias_hh, (3 * H,)),
    )


def check_linear_weights(weight, bias, activation, name):
    """Linear weight (out, in) and bias (out,) as float32, and a known activation (cpu and cuda)."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ParameterError(f"{name}.weight must be 2-D (out, in), got shape {w.shape}")
    if activation not in ACT_CODES:
        raise ParameterError(f"{name}: activation {activation!r} is not one of {tuple(ACT_CODES)}")
    return as_f32(f"{name}.weight", w, w.shape), as_f32(f"{name}.bias", bias, (w.shape[0],))


def check_norm_weights(weight, bias, name):
    """LayerNorm weight and bias as float32 (C,) arrays; ParameterError naming the tensor (cpu and cuda)."""
    w = as_f32(f"{name}.weight", weight, np.shape(weight))
    if w.ndim != 1:
        raise ParameterError(f"{name}.weight must be 1-D (C,), got shape {w.shape}")
    return w, as_f32(f"{name}.bias", bias, (w.shape[0],))
