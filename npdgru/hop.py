"""The hop engine: B streams' 10 ms hops in, their enhanced hops out.

:class:`Hops` is the one streaming path (:class:`~npdgru.streaming.Stream` and
:class:`~npdgru.streaming.StreamBatch` run on it): the STFT history of each stream
(:class:`_StftBatch`, also the offline path's STFT driver) and the model run on the hops. How a
hop is computed is its own affair: where the backend has a one-frame program for the plan
(``executor.has_frame_program``, the cpu backend) every hop of all streams goes through
:class:`_FusedHop` (samples to samples in buffers made once), otherwise through batched
analysis, the model on the frames and batched synthesis. Both give the same bits
(tests/test_fused_hop.py).
"""

from __future__ import annotations

import numpy as np

from . import stft

_cpu = None  # the cpu backend's hop kernels (numba): imported by the first fused hop


class _StftBatch:
    """Analysis and synthesis of B streams, hops in and hops out: the one STFT driver behind
    :meth:`Enhancer.enhance`, :class:`Stream` and :class:`StreamBatch`.

    Row b carries its last input hop (the analysis history, initially the front padding of zeros)
    and the second half of its last synthesis frame. Frame t of a stream is ``rfft((hop t-1, hop t)
    · WINDOW)`` and its output hop ``irfft(Y[t])[:HOP] · WINDOW + tail``: the frames of
    ``stft.stft`` and the overlap-add of ``stft.istft``, through the same kernels
    (``stft._synthesise``, the same windowing and FFT sizes), so every path gives the same bits.
    """

    def __init__(self, batch: int):
        self.prev = np.zeros((batch, stft.HOP), np.float32)
        self.tail = np.zeros((batch, stft.HOP), np.float32)

    def analyse(self, hops: np.ndarray, rows=None) -> np.ndarray:
        """hops (n, k, HOP) float32 of rows ``rows`` (all rows if None) -> spectra (k, n, N_BINS)."""
        prev = self.prev if rows is None else self.prev[rows]
        blocks = np.concatenate((prev[:, None], hops), axis=1)  # (n, k + 1, HOP)
        frames = np.concatenate((blocks[:, :-1], blocks[:, 1:]), axis=2)  # (n, k, N_FFT), a fresh copy
        frames *= stft.WINDOW
        X = np.fft.rfft(frames, n=stft.N_FFT, axis=2).astype(np.complex64, copy=False)
        if rows is None:
            self.prev[:] = hops[:, -1]
        else:
            self.prev[rows] = hops[:, -1]
        return X.transpose(1, 0, 2)

    def synthesise(self, Y: np.ndarray, rows=None) -> np.ndarray:
        """Spectra (k, n, N_BINS) of rows ``rows`` -> the k output hops of each row, (n, k·HOP)."""
        k, n = Y.shape[:2]
        H = stft.HOP
        y = stft._synthesise(np.ascontiguousarray(Y.transpose(1, 0, 2)).reshape(n * k, stft.N_BINS)).reshape(n, k, stft.N_FFT)
        out = y[:, :, :H].copy()  # first halves ...
        out[:, 0] += self.tail if rows is None else self.tail[rows]  # ... plus the second half of the frame before
        out[:, 1:] += y[:, :-1, H:]
        if rows is None:
            self.tail[:] = y[:, -1, H:]
        else:
            self.tail[rows] = y[:, -1, H:]
        return out.reshape(n, k * H)

    def analyse_hop(self, x: np.ndarray, frames: np.ndarray) -> None:
        """One hop x (B, HOP) of every row -> its windowed analysis frames into ``frames`` (B,
        N_FFT), in place (the fused hop: :meth:`analyse`'s windowing, no allocation)."""
        _cpu.hop_frames(self.prev, x, stft.WINDOW, frames)

    def synthesise_hop(self, y: np.ndarray, out: np.ndarray) -> None:
        """The inverse FFTs y (B, N_FFT) of one hop of every row -> the output hops into out (B,
        HOP), in place (the fused hop: :meth:`synthesise`'s overlap-add; y is windowed in place)."""
        _cpu.hop_overlap_add(y, stft.WINDOW, self.tail, out)

    def reorder(self, rows: np.ndarray) -> None:
        """Keep rows ``rows`` in that order (a row < 0: a new stream)."""
        keep = rows >= 0
        for name in ("prev", "tail"):
            old = getattr(self, name)
            new = np.zeros((len(rows), stft.HOP), np.float32)
            new[keep] = old[rows[keep]]
            setattr(self, name, new)


class _FusedHop:
    """One 10 ms hop of B streams from samples to samples with no allocation: the analysis frame,
    the log-power features, every model step (one jitted call, ``FrameProgram``), the mask and
    the synthesis overlap-add, all into buffers made here once.

    Every operation is the one of the general path: NumPy's FFTs and log10, the elementwise steps
    of ``stft.log_power``, :meth:`Enhancer._apply` and :class:`_StftBatch` repeated operation for
    operation by numba kernels compiled without FMA contraction (``cpu.hop_*``), and the model
    kernels on one frame; so the output has the same bits (tests/test_fused_hop.py).
    """

    def __init__(self, enhancer, batch: int):
        global _cpu
        from .kernels import cpu

        self.cpu = _cpu = cpu  # the elementwise hop kernels (numba, imported with the cpu backend)
        self.prog = enhancer.model.executor.frame_program(batch)
        self.batch = batch
        B, f32 = batch, np.float32
        self.frames = np.zeros((B, stft.N_FFT), f32)
        self.X = np.zeros((B, stft.N_BINS), np.complex64)
        self.Y = np.zeros((B, stft.N_BINS), np.complex64)
        self.p64 = np.zeros((B, stft.N_BINS), np.float64)
        self.y = np.zeros((B, stft.N_FFT), f32)
        self.floor = enhancer.mask_floor

    def run(self, x: np.ndarray, spectra: _StftBatch, state, out: np.ndarray) -> None:
        """Hops x (B, HOP) of every row of ``spectra``/``state`` -> their output hops into out (B, HOP)."""
        cpu = self.cpu
        spectra.analyse_hop(x, self.frames)
        np.fft.rfft(self.frames, n=stft.N_FFT, axis=1, out=self.X)
        cpu.hop_power(self.X, stft._LOG_FLOOR, self.p64)  # stft.log_power, ufunc for ufunc
        np.log10(self.p64, out=self.p64)
        prog = self.prog
        cpu.hop_features(self.p64, prog.features)
        prog.run(state)
        cpu.hop_apply_mask(self.X, prog.mask, self.floor, self.Y)  # Enhancer._apply
        np.fft.irfft(self.Y, n=stft.N_FFT, axis=1, out=self.y)
        spectra.synthesise_hop(self.y, out)


class Hops:
    """The hops of B streams through the model: ``run(x, state)`` takes hops x (B, k, HOP) and
    returns their output hops (B, k·HOP), the synthesis's ``yp`` (the output one hop late), with
    each stream's STFT history here and its model state in ``state``.

    ``rows`` runs a subset of the streams (a batch of their own: their state is taken out of
    ``state`` and put back); :meth:`reorder` keeps, reorders and adds streams. ``fused`` is the
    fused hop of the batch in use, None where the backend has no one-frame program for the plan
    (setting it to None runs the other route, as the tests do).
    """

    def __init__(self, enhancer, batch: int):
        self.enhancer = enhancer
        self.spectra = _StftBatch(batch)
        self.fused = _FusedHop(enhancer, max(batch, 1)) if enhancer.model.executor.has_frame_program else None

    def reset(self) -> None:
        """Every stream back to its start (silence before the first sample)."""
        self.spectra = _StftBatch(len(self.spectra.prev))

    def reorder(self, rows: np.ndarray) -> None:
        """Keep rows ``rows`` in that order (a row < 0: a new stream)."""
        self.spectra.reorder(rows)

    def run(self, x: np.ndarray, state, rows=None, out=None) -> np.ndarray:
        """Hops x (n, k, HOP) of rows ``rows`` (all rows if None) -> their output hops (n, k·HOP),
        written into ``out`` if given (n, k·HOP) float32."""
        n, k, H = x.shape
        if rows is None and self.fused is not None:
            if self.fused.batch != n:
                self.fused = _FusedHop(self.enhancer, n)
            y = np.empty((n, k * H), np.float32) if out is None else out
            if k == 1:
                self.fused.run(x.reshape(n, H), self.spectra, state, y)
            else:
                y3 = y.reshape(n, k, H)
                for j in range(k):
                    self.fused.run(x[:, j], self.spectra, state, y3[:, j])
            return y
        X = self.spectra.analyse(x, rows)
        # column-order products: a hop has the bits of the fused hop, alone or in any sub-batch
        if rows is None:
            Y = self.enhancer._apply(X, state, exact=True)
        else:
            sub = state.take(rows)
            Y = self.enhancer._apply(X, sub, exact=True)
            state.put(rows, sub)
        y = self.spectra.synthesise(Y, rows)
        if out is not None:
            out[:] = y
        return y if out is None else out
