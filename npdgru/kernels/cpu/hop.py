"""The elementwise steps of a streaming hop around the FFTs: the NumPy ufuncs of the offline path
(``stft._analyse``, ``stft.log_power``, ``Enhancer._apply``, ``stft._synthesise``), operation for
operation, compiled without FMA contraction so that every value is rounded as NumPy rounds it."""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import JIT_EXACT

__all__ = ["hop_frames", "hop_power", "hop_features", "hop_apply_mask", "hop_overlap_add"]


@njit(**JIT_EXACT)
def hop_frames(prev, x, window, frames):
    """frames[b] = (prev[b], x[b]) · window; prev[b] = x[b]. prev, x (B, HOP); frames (B, 2·HOP)."""
    B, H = x.shape
    for b in range(B):
        for j in range(H):
            frames[b, j] = prev[b, j] * window[j]
            frames[b, H + j] = x[b, j] * window[H + j]
            prev[b, j] = x[b, j]


@njit(**JIT_EXACT)
def hop_power(X, floor, p64):
    """p64 = max(float64(re·re + im·im), floor): the power of stft.log_power before its log10."""
    B, K = X.shape
    for b in range(B):
        for k in range(K):
            re = X[b, k].real
            im = X[b, k].imag
            p = re * re + im * im
            p64[b, k] = max(np.float64(p), floor)


@njit(**JIT_EXACT)
def hop_features(p64, features):
    """features = float32(p64) (after the log10)."""
    B, K = p64.shape
    for b in range(B):
        for k in range(K):
            features[b, k] = np.float32(p64[b, k])


@njit(**JIT_EXACT)
def hop_apply_mask(X, mask, floor, Y):
    """mask = clip(mask, floor, 1); Y = X · mask, as NumPy's complex64 · float32 product."""
    B, K = X.shape
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for b in range(B):
        for k in range(K):
            m = min(max(mask[b, k], floor), one)
            mask[b, k] = m
            re = X[b, k].real
            im = X[b, k].imag
            Y[b, k] = complex(re * m - im * zero, re * zero + im * m)


@njit(**JIT_EXACT)
def hop_overlap_add(y, window, tail, out):
    """y ·= window; out = y[:, :HOP] + tail; tail = y[:, HOP:]."""
    B, H = out.shape
    for b in range(B):
        for j in range(2 * H):
            y[b, j] = y[b, j] * window[j]
        for j in range(H):
            out[b, j] = y[b, j] + tail[b, j]
            tail[b, j] = y[b, H + j]
