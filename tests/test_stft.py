"""Tests of npdgru.stft: round trip, an independent scipy construction, streaming == offline."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from npdgru.errors import ParameterError
from npdgru.hop import _StftBatch
from npdgru.stft import (
    ALGORITHMIC_LATENCY,
    HOP,
    N_BINS,
    N_FFT,
    SAMPLE_RATE,
    WINDOW,
    istft,
    log_power,
    num_frames,
    stft,
)

FAST = settings(deadline=None, max_examples=60)


def assert_close(actual, ref, *, atol, rtol, what=""):
    """``|actual - ref| <= atol + rtol * |ref|`` elementwise; report the worst index."""
    actual = np.asarray(actual)
    ref = np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    err = np.abs(actual.astype(np.complex128) - ref.astype(np.complex128))
    bound = atol + rtol * np.abs(ref)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        pytest.fail(
            f"{what}: {bad.sum()} of {err.size} outside atol={atol:g} + rtol={rtol:g}*|ref|; "
            f"worst at {i}: actual={actual[i]!r} ref={ref[i]!r} err={err[i]:g}"
        )


def random_signal(seed: int, n: int, amplitude: float = 1.0) -> np.ndarray:
    return (amplitude * np.random.default_rng(seed).standard_normal(n)).astype(np.float64)


def padded(x: np.ndarray) -> np.ndarray:
    """The padded signal ``xp`` of the framing definition, built independently."""
    n = len(x)
    T = int(np.ceil(n / HOP)) + 1
    return np.concatenate([np.zeros(HOP), x, np.zeros((T - 1) * HOP + N_FFT - HOP - n)])


# ---------------------------------------------------------------------------------------------
# Constants, shapes, dtypes
# ---------------------------------------------------------------------------------------------


def test_constants_and_window():
    assert (SAMPLE_RATE, N_FFT, HOP, N_BINS, ALGORITHMIC_LATENCY) == (16000, 320, 160, 161, 320)
    assert WINDOW.dtype == np.float32 and WINDOW.shape == (N_FFT,)
    expected = np.sqrt(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))
    assert_close(WINDOW, expected, atol=1e-7, rtol=0, what="window")
    # COLA of the squared window at 50 % overlap: the reason synthesis needs no normalisation.
    w2 = WINDOW.astype(np.float64) ** 2
    assert_close(w2[:HOP] + w2[HOP:], np.ones(HOP), atol=1e-6, rtol=0, what="COLA")


@pytest.mark.parametrize("n, T", [(1, 2), (159, 2), (160, 2), (161, 3), (320, 3), (16000, 101)])
def test_num_frames(n, T):
    assert num_frames(n) == T
    assert num_frames(np.int64(n)) == T
    assert stft(np.zeros(n)).shape == (T, N_BINS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes_and_dtypes(dtype):
    x = random_signal(0, 1000).astype(dtype)
    X = stft(x)
    assert X.shape == (num_frames(1000), N_BINS) and X.dtype == np.complex64
    y = istft(X, 1000)
    assert y.shape == (1000,) and y.dtype == np.float32
    assert istft(X, 0).shape == (0,)
    L = log_power(X)
    assert L.shape == X.shape and L.dtype == np.float32


def test_input_not_modified():
    x = random_signal(1, 500)
    x0 = x.copy()
    X = stft(x)
    X0 = X.copy()
    istft(X, 500)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(X, X0)


# ---------------------------------------------------------------------------------------------
# Round trip and an independent construction
# ---------------------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 5000),
    amplitude=st.sampled_from([1e-4, 1.0, 3e2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_perfect_reconstruction(n, amplitude, seed):
    x = random_signal(seed, n, amplitude)
    y = istft(stft(x), n)
    scale = float(np.max(np.abs(x)))
    # float32 end to end: cast (~6e-8 rel) + two 320-point FFTs; measured worst ~3e-7 * max|x|.
    assert_close(y, x, atol=1e-5 * scale, rtol=1e-5, what=f"n={n} amplitude={amplitude}")


def test_perfect_reconstruction_edges():
    for n in (1, 2, 159, 160, 161, 319, 320, 321, 480):
        x = random_signal(n, n)
        assert_close(istft(stft(x), n), x, atol=1e-5 * np.max(np.abs(x)), rtol=1e-5, what=f"n={n}")
    # A length shorter than the frames cover is a prefix of the full reconstruction.
    x = random_signal(7, 1000)
    X = stft(x)
    np.testing.assert_array_equal(istft(X, 300), istft(X, 1000)[:300])
    # The longest permitted length reconstructs the appended zeros too.
    T = X.shape[0]
    y = istft(X, HOP * (T - 1))
    assert_close(y[1000:], np.zeros(HOP * (T - 1) - 1000), atol=1e-5 * 4, rtol=0, what="tail")


@FAST
@given(n=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_frames_match_scipy_stft(n, seed):
    x = random_signal(seed, n)
    xp = padded(x)
    w = WINDOW.astype(np.float64)
    # Same padded signal, same window, no extra scipy padding; scaling="spectrum" divides by
    # sum(w), which we undo. Zxx is (bins, frames).
    _, _, Zxx = scipy.signal.stft(
        xp,
        fs=SAMPLE_RATE,
        window=w,
        nperseg=N_FFT,
        noverlap=N_FFT - HOP,
        nfft=N_FFT,
        detrend=False,
        return_onesided=True,
        boundary=None,
        padded=False,
        scaling="spectrum",
    )
    ref = Zxx.T * w.sum()
    X = stft(x)
    assert X.shape == ref.shape == (num_frames(n), N_BINS)
    # Spectral values reach ~sqrt(N_FFT) * std(x); the float32 path errs ~1e-6 of that.
    scale = np.sqrt(N_FFT) * np.max(np.abs(x))
    assert_close(X, ref, atol=1e-5 * scale, rtol=1e-5, what=f"n={n}")


def test_frames_match_naive_loop():
    x = random_signal(3, 777)
    xp = padded(x)
    X = stft(x)
    for t in range(X.shape[0]):
        frame = xp[t * HOP : t * HOP + N_FFT] * WINDOW.astype(np.float64)
        assert_close(X[t], np.fft.rfft(frame), atol=1e-4, rtol=1e-5, what=f"frame {t}")


# ---------------------------------------------------------------------------------------------
# Streaming == offline
# ---------------------------------------------------------------------------------------------


@FAST
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_streaming_analysis_equals_offline(sizes, seed):
    """The streaming driver (hop._StftBatch) fed whole hops, in blocks of any count, gives the
    frames of stft: frame t = (hop t-1, hop t), the history starting as the front padding."""
    n = 1 + seed % 3000
    x = random_signal(seed, n)
    ref = stft(x)
    T = ref.shape[0]
    hops = np.concatenate([x, np.zeros(HOP * T - n, np.float32)]).reshape(T, HOP)  # xp[HOP:]
    driver, got, t = _StftBatch(1), [], 0
    for size in sizes + [T]:  # a final block with whatever remains
        k = min(size, T - t)
        if k:
            got.append(driver.analyse(hops[None, t : t + k])[:, 0])  # (k, N_BINS)
        t += k
    got = np.concatenate(got)
    assert got.shape == ref.shape and got.dtype == np.complex64
    # two float32 FFT paths over 320 unit-variance samples: rounding of a few 1e-6 in absolute
    # terms whatever the bin's size (1.1e-6 found by hypothesis on seed 35422); a framing error
    # is of the order of the signal (1)
    assert_close(got, ref, atol=5e-6, rtol=1e-6, what=f"sizes={sizes}")


@FAST
@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=12), seed=st.integers(0, 2**32 - 1))
def test_streaming_synthesis_equals_offline_yp(sizes, seed):
    n = 1 + seed % 3000
    X = stft(random_signal(seed, n))
    T = X.shape[0]
    # The offline yp, built independently: hop t gets frame t's first half + frame t-1's second.
    y = np.fft.irfft(X.astype(np.complex128), n=N_FFT, axis=1) * WINDOW
    yp = np.zeros(HOP * (T + 1))
    for t in range(T):
        yp[t * HOP : t * HOP + N_FFT] += y[t]
    driver, out, t = _StftBatch(1), [], 0
    for size in sizes + [T]:
        k = min(size, T - t)
        if k:
            block = driver.synthesise(X[t : t + k, None])[0]
            assert block.shape == (k * HOP,)
            out.append(block)
        t += k
    out = np.concatenate(out)
    assert out.shape == (HOP * T,)
    assert_close(out, yp[: HOP * T], atol=1e-6 * np.abs(yp).max(), rtol=1e-6, what=f"sizes={sizes}")
    # Delayed by one hop, the stream's output is the offline istft output.
    np.testing.assert_allclose(out[HOP : HOP + n], istft(X, n), atol=1e-6 * np.abs(yp).max())


# ---------------------------------------------------------------------------------------------
# Features and errors
# ---------------------------------------------------------------------------------------------


def test_log_power_of_silence():
    L = log_power(stft(np.zeros(1234)))
    assert np.isfinite(L).all()
    np.testing.assert_array_equal(L, np.full(L.shape, -12.0, dtype=np.float32))


def test_log_power_values():
    X = np.array([[1 + 0j, 3 + 4j, 1e-3j, 0]], dtype=np.complex64)
    np.testing.assert_allclose(log_power(X), [[0.0, np.log10(25.0), -6.0, -12.0]], rtol=1e-6)


@pytest.mark.parametrize(
    "call",
    [
        lambda: stft(np.zeros((2, 100))),
        lambda: stft(np.zeros(0)),
        lambda: stft(np.zeros(100, dtype=np.int16)),
        lambda: stft(np.float32(1.0)),
        lambda: istft(np.zeros((5, 160), np.complex64), 100),
        lambda: istft(np.zeros((5, 162), np.complex64), 100),
        lambda: istft(np.zeros(161, np.complex64), 100),
        lambda: istft(np.zeros((5, 161), np.complex64), 5 * HOP),
        lambda: istft(np.zeros((5, 161), np.complex64), -1),
        lambda: istft(np.zeros((5, 161), np.complex64), 1.5),
        lambda: num_frames(0),
        lambda: num_frames(2.0),
        lambda: log_power(np.array(["a"])),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(ParameterError):
        call()
