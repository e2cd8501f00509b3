"""Resampling between a signal's rate and the model's 16 kHz: ``scipy.signal.resample_poly``'s
filter, three ways.

* :func:`resample_signal`: a whole signal in one call (``resample_poly``, float32 out).
* :class:`BlockResampler`: the same, fed in blocks of any size, with ``resample_signal``'s bits
  on the whole signal: files enhanced in bounded memory (``enhance.enhance_file``). It recomputes
  each block with a margin of the filter's length on both sides, so it holds back about the
  filter's half length of output: fine for files, too slow to start for 10 ms chunks.
* :class:`StreamResampler`: the streaming one, for :class:`npdgru.Stream` at other rates. It
  emits every output its input allows (a lag of ``delay`` outputs, about 0.7 ms), so 10 ms
  chunks keep a low latency; its sums run in their own order, so it equals ``resample_poly`` to
  float rounding, not bit for bit.

The streaming resampler: ``resample_poly(x, up, down)`` is ``upfirdn(h, x, up, down)`` with the
first ``delay`` outputs removed, where ``h`` is its windowed-sinc low-pass (``firwin(2·10·max(up,
down) + 1, 1/max(up, down), window=("kaiser", 5.0))·up``, zero-padded in front). Each output m of
``upfirdn`` needs only the inputs up to ``floor(m·down/up)``, so the same outputs can be computed
as the input arrives: output m = sum_j x[i0 - j]·h[ph + j·up] with i0 = (m·down) // up, ph =
(m·down) % up. :class:`StreamResampler` keeps the last inputs the filter reaches back to and emits
every output its input allows, dropping the first ``delay`` as ``resample_poly`` does: its
concatenated outputs are ``resample_poly(x)`` (to float rounding: float64 taps and sums, float32
out), ending ``delay`` outputs short until zeros are fed after the end.

Latency: after n inputs it has emitted ``ceil(n·up/down) - delay`` outputs, so it lags by
``delay`` outputs (10 to 11 samples of the lower rate, about 0.7 ms between 16 and 48 or 44.1
kHz; :attr:`StreamResampler.delay`). The sums run in a numba kernel (:func:`_polyphase`, float64
taps and sums, as ``resample_poly`` computes float64 input); :func:`polyphase_numpy` is its NumPy
twin (a gather and one product per output), compared in tests/test_stream_rates.py.
"""

from __future__ import annotations

from fractions import Fraction

import numba
import numpy as np

from .kernels._config import JIT


@numba.njit(**JIT)
def _polyphase(buf, taps, m0, m1, up, down, base, out):
    """out[r] = sum_j buf[i0 - j]·taps[ph, j] for output m = m0 + r, t = m·down, i0 = t // up - base, ph = t % up."""
    K = taps.shape[1]
    for r in range(m1 - m0):
        t = (m0 + r) * down
        i0 = t // up - base
        ph = t % up
        for c in range(buf.shape[1]):
            acc = 0.0
            for j in range(K):
                acc += taps[ph, j] * buf[i0 - j, c]
            out[r, c] = acc


def polyphase_numpy(buf, taps, m0, m1, up, down, base) -> np.ndarray:
    """The NumPy twin of :func:`_polyphase`: (m1 - m0, C) float64."""
    m = np.arange(m0, m1)
    t = m * down
    idx = (t // up - base)[:, None] - np.arange(taps.shape[1])[None, :]  # (M, K): rows of x[i0 - j]
    return np.einsum("mk,mkc->mc", taps[t % up], buf[idx])


def resample_filter(up: int, down: int) -> tuple[np.ndarray, int]:
    """(h, delay): ``resample_poly``'s filter with its front padding, and the outputs it removes."""
    from scipy.signal import firwin

    if up == down:  # resample_poly returns the input
        return np.ones(1), 0
    max_rate = max(up, down)
    half_len = 10 * max_rate
    h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * up
    n_pre_pad = down - half_len % down
    return np.concatenate([np.zeros(n_pre_pad), h]), (half_len + n_pre_pad) // down


class StreamResampler:
    """Resample C channels from ``rate_in`` to ``rate_out`` Hz in chunks; state carried across calls.

    ``process(x)`` takes (n, C) float samples (any n, also 0) and returns every output sample
    those inputs complete, (m, C) float32; concatenated, the outputs are ``resample_poly`` of the
    concatenated inputs (tests/test_stream_rates.py), :attr:`delay` samples behind it.
    """

    def __init__(self, rate_in: int, rate_out: int, channels: int = 1):
        r = Fraction(int(rate_out), int(rate_in))
        self.up, self.down = r.numerator, r.denominator
        h, self.delay = resample_filter(self.up, self.down)
        K = -(-len(h) // self.up)  # taps per phase
        taps = np.zeros(K * self.up)
        taps[: len(h)] = h
        self.taps = np.ascontiguousarray(taps.reshape(K, self.up).T)  # taps[ph, j] = h[ph + j·up]
        self.K = K
        self.channels = int(channels)
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros((self.K - 1, self.channels))  # the inputs before the chunk (zeros before the start)
        self._n_in = 0  # inputs seen
        self._m_next = 0  # next upfirdn output index
        self._skip = self.delay  # outputs still to drop

    def pending_inputs(self, n_out: int) -> int:
        """How many more input samples make at least ``n_out`` more outputs."""
        m_target = self._m_next + self._skip + n_out  # upfirdn index to reach (exclusive)
        n_total = -(-(m_target * self.down) // self.up)  # ceil(n·up/down) >= m_target
        return max(0, n_total - self._n_in)

    def process(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.channels)
        n = len(x)
        buf = np.ascontiguousarray(np.concatenate([self._hist, x]) if n else self._hist)
        n_total = self._n_in + n
        m_end = -(-(n_total * self.up) // self.down)  # outputs whose inputs have all arrived
        y = np.empty((max(0, m_end - self._m_next), self.channels))
        if len(y):  # buf row of input i is i - base
            _polyphase(buf, self.taps, self._m_next, m_end, self.up, self.down, self._n_in - (self.K - 1), y)
        if self.K > 1:
            self._hist = buf[len(buf) - (self.K - 1) :].copy()
        self._n_in, self._m_next = n_total, m_end
        drop = min(self._skip, len(y))
        self._skip -= drop
        return y[drop:].astype(np.float32)


def resample_signal(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    if sr_from == sr_to:
        return x
    from scipy.signal import resample_poly

    r = Fraction(int(sr_to), int(sr_from))
    return resample_poly(x, r.numerator, r.denominator, axis=0).astype(np.float32)


class BlockResampler:
    """``resample_signal`` (``scipy.signal.resample_poly``) fed in blocks, with the same output bits.

    resample_poly's output sample j is a fixed sum over the input samples within its FIR
    filter's half length (``10·max(up, down)`` at the upsampled rate) of j·down/up. So each
    block is resampled together with ``margin`` input samples before and after it, and only the
    outputs whose whole filter support has arrived are handed out; the input kept starts at a
    multiple of ``down``, where output and input grids meet, so a segment's outputs are the
    whole signal's, shifted by a whole number of samples (tests/test_enhance.py).
    """

    def __init__(self, sr_from: int, sr_to: int, channels: int):
        r = Fraction(int(sr_to), int(sr_from))
        self.up, self.down = r.numerator, r.denominator
        half_len = 10 * max(self.up, self.down)  # resample_poly's default filter
        self.margin = -(-(half_len + 2 * self.down) // self.up) + 2  # input samples, each side
        self.buf = np.zeros((0, channels), np.float32)
        self.start = 0  # input index of buf[0], a multiple of down
        self.n = 0  # input samples pushed
        self.done = 0  # output samples handed out

    def _outputs(self, stop: int) -> np.ndarray:
        """Outputs done .. stop of the whole signal, from the buffer."""
        if stop <= self.done:
            return np.zeros((0, self.buf.shape[1]), np.float32)
        y = resample_signal(self.buf, self.down, self.up)  # rates in the ratio up:down
        off = self.start * self.up // self.down
        out = y[self.done - off : stop - off]
        self.done = stop
        return out

    def push(self, x: np.ndarray) -> np.ndarray:
        if self.up == self.down:
            return x
        self.buf = np.concatenate([self.buf, x])
        self.n += len(x)
        out = self._outputs(max(self.done, (self.n - self.margin) * self.up // self.down))
        keep = max(self.start, (self.done * self.down // self.up - self.margin) // self.down * self.down)
        self.buf = self.buf[keep - self.start :]
        self.start = keep
        return out

    def finish(self) -> np.ndarray:
        if self.up == self.down:
            return np.zeros((0, self.buf.shape[1]), np.float32)
        return self._outputs(-(-self.n * self.up // self.down))  # resample_poly's length: ceil(n·up/down)

