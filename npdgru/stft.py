"""Short-time Fourier analysis and synthesis, offline and streaming.

The transform NSNet2 and every npdgru model were trained on: 16 kHz audio, 20 ms frames
(``N_FFT = 320`` samples), 10 ms hop (``HOP = 160``), ``N_BINS = 161`` one-sided bins, and the
square root of the *periodic* Hann window for both analysis and synthesis.

Why no normalisation in synthesis
---------------------------------
The periodic Hann window of length 320 satisfies ``hann[n] + hann[n + 160] == 1`` (its two halves
are ``0.5 - 0.5 cos`` and ``0.5 + 0.5 cos``). Analysis and synthesis each apply ``sqrt(hann)``,
so every output sample receives ``w[n]**2 + w[n + 160]**2 == 1`` in total from the two frames
that cover it: plain overlap-add reconstructs the input (constant overlap-add, COLA).

Framing (the one definition every function below follows)
---------------------------------------------------------
For a signal ``x`` of ``n >= 1`` samples::

    T  = ceil(n / HOP) + 1                                 # num_frames(n)
    xp = concat(zeros(HOP), x, zeros(HOP * T - n))         # len(xp) == HOP * (T + 1)
    X[t] = rfft(xp[t*HOP : t*HOP + N_FFT] * w)             # t = 0 .. T-1

The front padding of one hop means sample ``x[i]`` (at ``xp[HOP + i]``) lies in exactly two
frames, ``t = i // HOP`` and ``t = i // HOP + 1``; the tail padding (between 160 and 319 zeros)
makes the last frame full. Synthesis overlap-adds ``irfft(X[t]) * w`` at hop 160 into ``yp`` and
returns ``y = yp[HOP : HOP + n]``.

Streaming
---------
The streaming driver (``npdgru.hop._StftBatch``, behind every stream and the offline path)
produces the same frames hop by hop: frame ``t`` is complete when the input count reaches
``t*HOP + HOP`` (its last sample, ``xp[t*HOP + N_FFT - 1] == x[t*HOP + HOP - 1]``, has arrived).
It keeps one hop of history, initially zeros, which *is* the front padding. Synthesis
overlap-adds with a carried tail: after frame ``t`` it emits ``yp[t*HOP : t*HOP + HOP]``, the hop
that frames ``t-1`` and ``t`` have now both completed; its output is ``yp`` from index 0, i.e.
``y`` delayed by ``HOP`` samples (the first hop reconstructs the front padding, not ``x``), and
its last ``HOP`` samples arrive only with the (zero-padded) frame after the final input.

Algorithmic latency
-------------------
After ``r`` input samples a stream has emitted frames ``0 .. floor(r/HOP) - 1`` and hence
``floor(r/HOP) * HOP`` samples of ``yp``, i.e. ``(floor(r/HOP) - 1) * HOP >= r - 319`` samples
of ``y``. A causal stream that returns exactly ``len(chunk)`` samples per call, for arbitrary
chunk sizes, must therefore delay its output by at least ``N_FFT - 1 = 319`` samples. We use
``ALGORITHMIC_LATENCY = N_FFT = 320`` samples (20 ms): a whole number of hops and milliseconds,
and the usual convention that a frame-based enhancer's algorithmic latency is its window
length. (With chunks that are multiples of ``HOP`` a delay of ``HOP`` would suffice; the
constant covers the general case.)

Precision: all arithmetic is float32 (inputs are cast once on entry; float64 is accepted and
converted), spectra are complex64. With NumPy >= 2 the FFTs themselves run in single precision;
with NumPy 1.x they run in float64 and the results are cast back, which is only more accurate.
NaN or Inf in the input is not checked here (callers validate audio) and propagates.
"""

from __future__ import annotations

import numpy as np
import scipy.signal

from npdgru.errors import ParameterError

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP",
    "N_BINS",
    "WINDOW",
    "ALGORITHMIC_LATENCY",
    "num_frames",
    "stft",
    "istft",
    "log_power",
]

SAMPLE_RATE = 16000  # Hz; other rates are resampled before they reach this module
N_FFT = 320  # frame length, 20 ms
HOP = 160  # frame advance, 10 ms (50 % overlap)
N_BINS = N_FFT // 2 + 1  # 161 one-sided frequency bins

#: ``sqrt(periodic Hann(320))``, float32, shape ``(N_FFT,)``. Used for analysis and synthesis.
WINDOW = np.sqrt(scipy.signal.get_window("hann", N_FFT, fftbins=True)).astype(np.float32)
WINDOW.flags.writeable = False

#: Output delay, in samples, of a causal stream that returns ``len(chunk)`` samples per call
#: for arbitrary chunk sizes. The need is ``N_FFT - 1 = 319`` (``y`` available after ``r``
#: inputs is ``>= r - 319``, see the module docstring); rounded up to ``N_FFT`` = 20 ms.
ALGORITHMIC_LATENCY = N_FFT

_LOG_FLOOR = 1e-12  # power floor of log_power (applied in float64): silence -> -12


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_signal(x, name: str, *, allow_empty: bool) -> np.ndarray:
    """Return ``x`` as a contiguous 1-D float32 array, or raise :class:`ParameterError`."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ParameterError(
            f"{name} must be a 1-D array of samples, got shape {arr.shape} "
            "(enhance multi-channel audio one channel at a time)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise ParameterError(
            f"{name} must be a real floating-point array, got dtype {arr.dtype} "
            "(convert integer PCM to float first, e.g. x / 32768 for int16)"
        )
    if not allow_empty and arr.size == 0:
        raise ParameterError(f"{name} is empty: at least one sample is needed")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_spectrum(X, name: str) -> np.ndarray:
    """Return ``X`` as a contiguous ``(k, N_BINS)`` complex64 array, or raise."""
    arr = np.asarray(X)
    if arr.ndim != 2 or arr.shape[1] != N_BINS:
        raise ParameterError(
            f"{name} must have shape (frames, {N_BINS}), got {arr.shape} "
            f"(N_FFT={N_FFT} gives {N_BINS} one-sided bins)"
        )
    if not (np.issubdtype(arr.dtype, np.complexfloating) or np.issubdtype(arr.dtype, np.floating)):
        raise ParameterError(f"{name} must be a complex array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.complex64)


def num_frames(n_samples: int) -> int:
    """Number of STFT frames of a signal of ``n_samples`` samples.

    Parameters
    ----------
    n_samples : int
        Signal length, ``>= 1``.

    Returns
    -------
    int
        ``ceil(n_samples / HOP) + 1``: every sample lies in exactly two frames.

    Raises
    ------
    ParameterError
        If ``n_samples`` is not an integer ``>= 1``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
        raise ParameterError(f"n_samples must be an integer, got {n_samples!r}")
    if n_samples < 1:
        raise ParameterError(f"n_samples={n_samples} must be >= 1")
    return -(-int(n_samples) // HOP) + 1


# --------------------------------------------------------------------------------------------
# The two kernels shared by the offline and streaming paths (so both give identical bits)
# --------------------------------------------------------------------------------------------


def _analyse(blocks: np.ndarray) -> np.ndarray:
    """Spectra of the frames formed by consecutive pairs of hop-sized blocks.

    Parameters
    ----------
    blocks : ndarray, shape (k + 1, HOP), float32
        Consecutive hops of the padded signal ``xp``; frame ``j`` is ``blocks[j] ++ blocks[j+1]``.

    Returns
    -------
    ndarray, shape (k, N_BINS), complex64
    """
    frames = np.concatenate((blocks[:-1], blocks[1:]), axis=1)  # (k, N_FFT), a fresh copy
    frames *= WINDOW
    return np.fft.rfft(frames, n=N_FFT, axis=1).astype(np.complex64, copy=False)


def _synthesise(X: np.ndarray) -> np.ndarray:
    """Windowed inverse FFT of each frame, ready for overlap-add.

    Parameters
    ----------
    X : ndarray, shape (k, N_BINS), complex64

    Returns
    -------
    ndarray, shape (k, N_FFT), float32
        ``irfft(X[j]) * WINDOW`` for each frame ``j``.
    """
    frames = np.fft.irfft(X, n=N_FFT, axis=1).astype(np.float32, copy=False)
    frames *= WINDOW
    return frames


# --------------------------------------------------------------------------------------------
# Offline
# --------------------------------------------------------------------------------------------


def stft(x) -> np.ndarray:
    """Short-time Fourier transform of a whole signal.

    Parameters
    ----------
    x : array_like, shape (n,), float
        Signal at 16 kHz, ``n >= 1``. float64 is accepted and cast to float32 (all internal
        arithmetic is float32).

    Returns
    -------
    X : ndarray, shape (T, N_BINS), complex64
        ``T = num_frames(n) = ceil(n / HOP) + 1`` frames; frame ``t`` is the spectrum of
        ``xp[t*HOP : t*HOP + N_FFT] * WINDOW`` with ``xp`` the padded signal of the module
        docstring.

    Raises
    ------
    ParameterError
        If ``x`` is not 1-D, not floating point, or empty.
    """
    x = _as_signal(x, "x", allow_empty=False)
    n = x.size
    T = num_frames(n)
    xp = np.zeros(HOP * (T + 1), dtype=np.float32)  # HOP front zeros, x, 160..319 tail zeros
    xp[HOP : HOP + n] = x
    return _analyse(xp.reshape(T + 1, HOP))


def istft(X, length: int) -> np.ndarray:
    """Inverse of :func:`stft` by weighted overlap-add.

    Parameters
    ----------
    X : array_like, shape (T, N_BINS), complex
        Spectra, e.g. from :func:`stft` (possibly masked). Cast to complex64.
    length : int
        Number of output samples, ``0 <= length <= HOP * (T - 1)`` (the samples that two
        frames cover). Pass ``len(x)`` to invert ``stft(x)``.

    Returns
    -------
    y : ndarray, shape (length,), float32
        ``yp[HOP : HOP + length]`` where ``yp`` is the overlap-add of ``irfft(X[t]) * WINDOW``
        at hop ``HOP``. ``istft(stft(x), len(x))`` equals ``x`` to float32 rounding.

    Raises
    ------
    ParameterError
        If ``X`` does not have 161 bins per frame or ``length`` is out of range.
    """
    X = _as_spectrum(X, "X")
    T = X.shape[0]
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise ParameterError(f"length must be an integer, got {length!r}")
    max_length = HOP * (T - 1) if T >= 1 else 0
    if not 0 <= length <= max_length:
        raise ParameterError(
            f"length={length} is out of range for {T} frames: must be in [0, {max_length}] "
            "(num_frames(length) must not exceed the number of frames)"
        )
    frames = _synthesise(X)  # (T, N_FFT)
    yp = np.zeros((T + 1, HOP), dtype=np.float32)  # yp viewed as hops
    yp[:T] += frames[:, :HOP]  # first half of frame t lands in hop t ...
    yp[1:] += frames[:, HOP:]  # ... second half in hop t + 1
    return yp.reshape(-1)[HOP : HOP + length].copy()


def log_power(X) -> np.ndarray:
    """Log power spectrum, the NSNet2 input feature.

    Parameters
    ----------
    X : array_like, complex, any shape (typically (T, N_BINS))

    Returns
    -------
    ndarray, same shape as ``X``, float32
        ``log10(maximum(|X|**2, 1e-12))``; silence gives exactly ``-12``, never ``-inf``.
    """
    X = np.asarray(X)
    if not (np.issubdtype(X.dtype, np.complexfloating) or np.issubdtype(X.dtype, np.floating)):
        raise ParameterError(f"X must be a complex or float array, got dtype {X.dtype}")
    X = X.astype(np.complex64, copy=False)
    power = X.real * X.real + X.imag * X.imag  # |X|^2 in float32, without the sqrt of abs()
    # The floor and log run in float64 (cheap: 161 values per frame) so that silence maps to
    # exactly -12: float32(1e-12) is 9.9999998e-13, whose float32 log10 rounds to -12.000001.
    return np.log10(np.maximum(power.astype(np.float64), _LOG_FLOOR)).astype(np.float32)
