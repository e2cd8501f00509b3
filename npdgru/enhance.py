"""Enhance audio: arrays and files offline, or 10 ms chunks as a stream.

    noisy x -> STFT X (T, 161) -> log-power features -> model -> mask m in [floor, 1]
            -> X·m -> inverse STFT -> enhanced y (same length, same sample rate as x)

Offline and streaming run the same code on the same frames (``stft.py``) and the model is
causal, so a :class:`Stream` returns exactly the offline output delayed by
``ALGORITHMIC_LATENCY = 320`` samples (20 ms at 16 kHz), bit for bit.

Many signals at once: :meth:`Enhancer.enhance_batch` runs a list of signals as one batch of
independent streams (zero padding after each signal's end, which a causal model never sees);
:class:`StreamBatch` serves N concurrent streams, one 10 ms hop per stream per call, with
streams joining and leaving at any call. On ``backend="cuda"`` both run every layer of every
stream on the GPU in one batch; each stream's output is the one it would get alone.

Input is checked completely before any state changes (a refused chunk or hop leaves its stream
exactly as it was) against the limits below: finite samples within ``MAX_ABS_SAMPLE`` = 1e6,
``MIN_SAMPLE_RATE`` .. ``MAX_SAMPLE_RATE`` = 1 kHz .. 384 kHz, at most ``MAX_CHANNELS`` = 64
channels and never more channels than samples (a transposed array).
"""

from __future__ import annotations

import math
import numbers
import os
from fractions import Fraction

import numpy as np

from . import stft
from .errors import AudioError, ParameterError, StreamInputError
from .model import MaskModel
from .weights import Weights, default_weights_path, load_weights

ALGORITHMIC_LATENCY = stft.ALGORITHMIC_LATENCY  # samples at 16 kHz
_BLOCK_FRAMES = 1000  # frames (10 s) per model call of the offline path: bounded memory
DEFAULT_MASK_FLOOR_DB = -80.0  # NSNet2's minimum gain: the mask is clipped to [10^(-80/20), 1]

__all__ = ["Enhancer", "Stream", "StreamBatch", "ALGORITHMIC_LATENCY", "DEFAULT_MASK_FLOOR_DB", "MAX_ABS_SAMPLE", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_CHANNELS", "read_audio", "write_audio"]


# Input limits. Samples: nominal full scale is ±1; the largest magnitude whose features stay
# finite is sqrt(float32 max) / sum(window) = 9.06e16 (a constant signal: |X[0]|^2 overflows
# float32 in stft.log_power above it; tests/test_hardening.py finds it). MAX_ABS_SAMPLE leaves
# ten orders of magnitude to that and still takes integer PCM scaled as floats (±32768).
MAX_ABS_SAMPLE = 1e6
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000  # Hz; resampling cost grows with the ratio
MAX_CHANNELS = 64


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
        from .kernels import cpu

        self.cpu = cpu  # the elementwise hop kernels (numba, imported with the cpu backend)
        self.prog = enhancer.model.executor.frame_program(batch)
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
        cpu.hop_frames(spectra.prev, x, stft.WINDOW, self.frames)
        np.fft.rfft(self.frames, n=stft.N_FFT, axis=1, out=self.X)
        cpu.hop_power(self.X, stft._LOG_FLOOR, self.p64)  # stft.log_power, ufunc for ufunc
        np.log10(self.p64, out=self.p64)
        prog = self.prog
        cpu.hop_features(self.p64, prog.features)
        prog.run(state)
        cpu.hop_apply_mask(self.X, prog.mask, self.floor, self.Y)  # Enhancer._apply
        np.fft.irfft(self.Y, n=stft.N_FFT, axis=1, out=self.y)
        cpu.hop_overlap_add(self.y, stft.WINDOW, spectra.tail, out)


def _fused_hop(enhancer, batch: int):
    """A :class:`_FusedHop` where the backend has one-frame programs (cpu), else None."""
    if not hasattr(enhancer.model.executor, "frame_program"):
        return None
    try:
        return _FusedHop(enhancer, batch)
    except ParameterError:  # a plan the one-frame program does not cover: the per-layer path
        return None


# Input accumulators (a D-GRU layer fed by a D-GRU layer reads only the changed input columns,
# ``MaskModel(sparse_inputs=True)``) are used on cpu at P <= 50, where benchmarks/bench_enhance.py
# measures them faster both offline and per streaming hop than the dense input product (NSNet2:
# about 15 % offline and 8-12 % per hop at P = 50 and 25). One rule for both modes, so offline
# and streaming still compute the same bits.
_ACCUMULATOR_MAX_P = 50.0


def _input_accumulators_pay(backend, update_percent) -> bool:
    P = update_percent
    return backend == "cpu" and isinstance(P, (int, float, np.floating, np.integer)) and not isinstance(P, bool) and P <= _ACCUMULATOR_MAX_P


def _check_audio(audio, name="audio") -> np.ndarray:
    """The audio as an array, or AudioError naming ``name`` and the problem; never copies."""
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise AudioError(f"{name}: audio must be a numeric array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        raise AudioError(f"{name}: integer samples ({a.dtype}); pass floats in [-1, 1] (e.g. x / 32768)")
    if a.ndim not in (1, 2):
        raise AudioError(f"{name}: audio must be (samples,) or (samples, channels), got shape {a.shape}")
    if a.shape[0] == 0 or (a.ndim == 2 and a.shape[1] == 0):
        raise AudioError(f"{name}: audio is empty (shape {a.shape})")
    if a.ndim == 2 and (a.shape[1] > a.shape[0] or a.shape[1] > MAX_CHANNELS):
        raise AudioError(
            f"{name}: shape {a.shape} reads as {a.shape[1]} channels of {a.shape[0]} samples; audio is "
            f"(samples, channels) with at most {MAX_CHANNELS} channels (channels first? pass x.T)"
        )
    _check_samples(a, name)
    return a


def _check_samples(a: np.ndarray, name: str) -> None:
    """NaN, Inf and magnitudes beyond MAX_ABS_SAMPLE are refused (one pass over the data)."""
    peak = max(float(a.max()), -float(a.min())) if a.size else 0.0  # NaN propagates; no copy
    if not math.isfinite(peak):
        raise AudioError(f"{name}: audio contains NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"{name}: a sample of magnitude {peak:.3g} exceeds the limit {MAX_ABS_SAMPLE:g} (full scale is ±1)")


def _validate_chunk(chunk) -> np.ndarray:
    """A Stream chunk, checked completely before any state changes: (k,) float32, maybe empty."""
    c = np.asarray(chunk)
    if c.size == 0 and c.ndim == 1:
        return np.zeros(0, np.float32)
    if c.ndim != 1:
        raise AudioError(f"chunk: a stream takes mono samples (k,), got shape {c.shape}")
    return _check_audio(c, "chunk").astype(np.float32)


def _validate_hops(chunks: dict, open_rows: dict) -> tuple[list, np.ndarray, dict]:
    """Check every stream's hop of a StreamBatch call before any state changes.

    ``open_rows`` maps each open stream id to its batch row. Returns the accepted ids, their hops
    (n, 160) float32, and ``{id: reason}`` for the refused ones (an id that is not open, a wrong
    shape, NaN/Inf, a magnitude beyond the limit).
    """
    ok, hops, rejected = [], [], {}
    for sid, chunk in chunks.items():
        try:
            if sid not in open_rows:
                shown = list(open_rows)[:20]
                more = f" and {len(open_rows) - 20} more" if len(open_rows) > 20 else ""
                raise ParameterError(f"stream id {sid!r} is not open (open ids: {shown}{more})")
            c = np.asarray(chunk)
            if c.shape != (stft.HOP,):
                raise AudioError(f"stream {sid!r}: a chunk must be one hop of {stft.HOP} samples (16 kHz mono), got shape {c.shape}")
            c = _check_audio(c, f"stream {sid!r}")
        except (AudioError, ParameterError) as e:
            rejected[sid] = str(e)
            continue
        ok.append(sid)
        hops.append(c)
    x = np.array(hops, np.float32).reshape(len(hops), stft.HOP)
    return ok, x, rejected


class Enhancer:
    """Speech enhancement with a mask model at a chosen update percentage.

    Parameters
    ----------
    weights : path to an npdgru weight file, a loaded :class:`Weights`, or None for the shipped
        default (``weights/nsnet2-kd-anyp.safetensors``, NSNet2 distilled for any P).
    model : instead of ``weights``, the name of a shipped model (``"dprnn"``, ``"mpt"``,
        ``"nsnet2"``, ...; :func:`npdgru.shipped_models` lists them).
    update_percent : P in (0, 100]; each GRU layer updates ceil(P·H/100) neurons per frame.
    backend : "cpu" (Numba, float32), "cuda" (numba.cuda, float32; model state on the GPU) or
        "reference" (NumPy, float64, slow).
    mask_floor_db : lowest gain the mask may apply, in dB (NSNet2: -80 dB).
    exact : offline and streaming give the same bits (products in the streaming order), at some cost offline.

    Examples
    --------
    >>> enh = Enhancer(update_percent=50)                      # doctest: +SKIP
    >>> y = enh.enhance(x, sample_rate=16000)                  # doctest: +SKIP
    """

    sample_rate = stft.SAMPLE_RATE

    def __init__(self, weights=None, *, model: str | None = None, update_percent: float = 100.0, backend: str = "cpu", mask_floor_db: float = DEFAULT_MASK_FLOOR_DB, exact: bool = False):
        weights = _resolve_weights(weights, model)
        if weights.architecture["n_features"] != stft.N_BINS:
            raise ParameterError(f"{weights.path}: model expects {weights.architecture['n_features']} features, the STFT gives {stft.N_BINS}")
        if isinstance(mask_floor_db, (bool, np.bool_)) or not isinstance(mask_floor_db, numbers.Real) or not (math.isfinite(mask_floor_db) and mask_floor_db <= 0):
            raise ParameterError(f"mask_floor_db={mask_floor_db!r} must be a finite number <= 0")
        self.weights = weights
        self.model = MaskModel(weights, update_percent=update_percent, backend=backend, sparse_inputs=_input_accumulators_pay(backend, update_percent), exact=exact)
        self.update_percent = self.model.update_percent
        self.mask_floor_db = float(mask_floor_db)
        self.mask_floor = np.float32(10.0 ** (self.mask_floor_db / 20.0))

    def _apply(self, X: np.ndarray, state) -> np.ndarray:
        """Masked spectra for frames X (T, B, 161); the model state carries across calls."""
        mask = self.model.forward(stft.log_power(X), state)
        np.clip(mask, self.mask_floor, np.float32(1.0), out=mask)
        return X * mask

    def enhance(self, audio, sample_rate: int) -> np.ndarray:
        """Enhance a whole signal.

        Parameters
        ----------
        audio : (samples,) or (samples, channels) float array; each channel is enhanced on its own
            (as independent streams of one batch).
        sample_rate : Hz. Other rates than 16 kHz are resampled to 16 kHz and back
            (``scipy.signal.resample_poly``).

        Returns
        -------
        float32 array of the same shape as ``audio``.
        """
        a = _check_audio(audio)
        _check_rate(sample_rate)
        mono = a.ndim == 1
        x = (a[:, None] if mono else a).astype(np.float32, copy=False)  # never written to
        n, C = x.shape
        x16 = _resample(x, sample_rate, self.sample_rate)
        y16 = self._enhance16(x16)
        y = _resample(y16, self.sample_rate, sample_rate)
        y = _fit_length(y, n)
        return y[:, 0] if mono else y

    def _enhance16(self, x: np.ndarray) -> np.ndarray:
        """x (n, C) at 16 kHz -> (n, C): the channels run as a batch of independent streams.

        The signal goes through the streaming analysis/synthesis of ``stft.py`` in blocks of
        ``_BLOCK_FRAMES`` frames with the model state carried, so memory beyond the input and
        output does not grow with the length. The frames are those of ``stft.stft`` and the
        result is ``stft.istft``'s, bit for bit (tests/test_enhance.py).
        """
        n, C = x.shape
        H, T = stft.HOP, stft.num_frames(n)
        xp = np.zeros((C, T * H), np.float32)  # x and the tail padding that completes frame T-1
        xp[:, :n] = x.T
        spectra = _StftBatch(C)
        yp = np.empty((T * H, C), np.float32)  # the synthesis emits yp from index 0
        state = self.model.init_state(C)
        step = _BLOCK_FRAMES * H
        for s0 in range(0, T * H, step):
            hops = xp[:, s0 : s0 + step]
            k = hops.shape[1] // H
            Y = self._apply(spectra.analyse(hops.reshape(C, k, H)), state)
            yp[s0 : s0 + k * H] = spectra.synthesise(Y).T
        return yp[H : H + n]

    def enhance_batch(self, audios, sample_rate) -> list:
        """Enhance several signals as one batch of independent streams.

        Every channel of every signal is one stream of one model batch (on ``backend="cuda"``,
        one GPU batch). Shorter signals are zero-padded after their end; the model is causal, so
        the padding never reaches their output: ``enhance_batch(xs, sr)[i]`` equals
        ``enhance(xs[i], sr)`` bit for bit.

        Parameters
        ----------
        audios : list (or tuple) of (samples,) or (samples, channels) float arrays; lengths and
            channel counts may differ.
        sample_rate : one rate in Hz for all signals, or a list with one rate per signal.

        Returns
        -------
        list of float32 arrays, each of the shape of its input.
        """
        if isinstance(audios, np.ndarray) or not isinstance(audios, (list, tuple)):
            raise ParameterError(f"audios must be a list of arrays (one per signal), got {type(audios).__name__}")
        if not audios:
            return []
        rates = list(sample_rate) if isinstance(sample_rate, (list, tuple)) else [sample_rate] * len(audios)
        if len(rates) != len(audios):
            raise ParameterError(f"sample_rate: {len(rates)} rates for {len(audios)} signals")
        signals = []  # (mono, n, x16 (n16, C)) per signal
        for i, (audio, sr) in enumerate(zip(audios, rates)):
            a = _check_audio(audio, f"audios[{i}]")
            _check_rate(sr, f"sample_rate[{i}]" if isinstance(sample_rate, (list, tuple)) else "sample_rate")
            x = (a[:, None] if a.ndim == 1 else a).astype(np.float32, copy=False)
            signals.append((a.ndim == 1, x.shape[0], _resample(x, sr, self.sample_rate)))
        n_max = max(x16.shape[0] for _, _, x16 in signals)
        cols = sum(x16.shape[1] for _, _, x16 in signals)
        xs = np.zeros((n_max, cols), np.float32)  # the streams side by side, zero-padded to n_max
        c = 0
        for _, _, x16 in signals:
            xs[: x16.shape[0], c : c + x16.shape[1]] = x16
            c += x16.shape[1]
        ys = self._enhance16(xs)
        out, c = [], 0
        for (mono, n, x16), sr in zip(signals, rates):
            y16 = ys[: x16.shape[0], c : c + x16.shape[1]]
            c += x16.shape[1]
            y = _fit_length(_resample(np.ascontiguousarray(y16), self.sample_rate, sr), n)
            out.append(y[:, 0] if mono else y)
        return out

    def stream(self) -> "Stream":
        """A streaming enhancer (16 kHz mono) with its own state; see :class:`Stream`."""
        return Stream(self)

    def stream_batch(self) -> "StreamBatch":
        """An empty batch of concurrent streams (16 kHz mono, 10 ms hops); see :class:`StreamBatch`."""
        return StreamBatch(self)


class Stream:
    """Chunks in, chunks out, with carried state (16 kHz mono).

    ``process(chunk)`` accepts any number of samples and returns exactly as many: the offline
    output delayed by ``latency`` = 320 samples (20 ms), the first 320 output samples being
    zeros. ``flush()`` ends the stream and returns the last ``latency`` samples plus whatever the
    final partial frame held, so that ``concat(outputs)[latency:latency + n] ==
    Enhancer.enhance(x)`` for the n input samples. The stream can then be used again.
    """

    latency = ALGORITHMIC_LATENCY

    def __init__(self, enhancer: Enhancer):
        self.enhancer = enhancer
        self.reset()

    def reset(self) -> None:
        self._spectra = _StftBatch(1)
        self._state = self.enhancer.model.init_state(1)
        self._partial = np.zeros(0, np.float32)  # input samples of the hop in progress (< HOP)
        # The synthesis emits yp = y delayed by one hop; one more hop of zeros in front makes the
        # output y delayed by exactly N_FFT samples, for any chunk sizes.
        self._out = np.zeros(stft.HOP, np.float32)
        self._n_in = 0
        self._lead = True  # the synthesis's first hop is still to come
        if not hasattr(self, "_fused"):
            self._fused = _fused_hop(self.enhancer, 1)

    def _run(self, samples: np.ndarray) -> None:
        H = stft.HOP
        if self._fused is not None and len(samples) == H and not len(self._partial) and len(self._out) == H:
            # steady state of 10 ms chunks: one hop, samples to samples, into the output queue
            out = np.empty(2 * H, np.float32)
            out[:H] = self._out
            self._fused.run(samples.reshape(1, H), self._spectra, self._state, out[H:].reshape(1, H))
            if self._lead:
                out[H:] = 0.0
                self._lead = False
            self._out = out
            return
        if self._fused is not None:  # other chunk sizes: the completed hops one by one
            x = np.concatenate([self._partial, samples]) if len(self._partial) else samples
            k = len(x) // H
            self._partial = x[k * H :].copy()
            if k:
                y = np.empty((k, H), np.float32)
                for j in range(k):
                    self._fused.run(x[j * H : (j + 1) * H].reshape(1, H), self._spectra, self._state, y[j : j + 1])
                if self._lead:
                    y[0] = 0.0
                    self._lead = False
                self._out = np.concatenate([self._out, y.reshape(-1)])
            return
        x = np.concatenate([self._partial, samples]) if len(self._partial) else samples
        k = len(x) // H
        self._partial = x[k * H :].copy()
        if k:
            X = self._spectra.analyse(x[: k * H].reshape(1, k, H))
            y = self._spectra.synthesise(self.enhancer._apply(X, self._state))[0]
            if self._lead:  # yp[:HOP] is the (masked) front padding, not x: silence, as documented
                y[:H] = 0.0
                self._lead = False
            self._out = np.concatenate([self._out, y])

    def process(self, chunk) -> np.ndarray:
        """Feed samples (any count, float, 16 kHz mono); get as many enhanced samples back.

        A refused chunk (wrong shape, NaN/Inf, a sample beyond ``MAX_ABS_SAMPLE``) raises
        AudioError and leaves the stream exactly as it was: the next chunk continues the timeline.
        """
        c = _validate_chunk(chunk)  # everything checked before any state changes
        if not len(c):
            return c
        self._n_in += len(c)
        self._run(c)
        out, self._out = self._out[: len(c)], self._out[len(c) :]
        return out

    def flush(self) -> np.ndarray:
        """End of input: return the remaining ``latency`` samples (and reset the stream)."""
        n = self._n_in
        if n:
            self._run(np.zeros(stft.HOP * stft.num_frames(n) - n, np.float32))
        emitted = n  # process() returned exactly n samples so far
        out = self._out[: n + self.latency - emitted]
        if len(out) < self.latency:  # nothing was pushed: just the latency of silence
            out = np.concatenate([out, np.zeros(self.latency - len(out), np.float32)])
        self.reset()
        return out


class StreamBatch:
    """N concurrent streams (16 kHz mono) through one model batch, one 10 ms hop per call.

    ``add()`` returns a stream id; ``process({id: chunk})`` takes exactly ``hop`` = 160 samples
    for each stream named and returns ``{id: 160 enhanced samples}``; ``remove(id)`` ends a
    stream. Streams may join and leave at any call, and a call may name any subset of the
    streams: the others keep their state untouched. Each stream's output is bit for bit what a
    :class:`Stream` fed the same 160-sample chunks returns (the offline output delayed by
    ``latency`` = 320 samples); ``remove(id, flush=True)`` returns what ``Stream.flush()`` would.

    The STFT of all streams of a call is one batched FFT on the host and the model runs once
    for the whole batch (on ``backend="cuda"``, on the GPU with the state kept there). Joining
    and leaving copy the batch state once (``O(N)``, on the device for cuda).

    Examples
    --------
    >>> sb = Enhancer(backend="cuda").stream_batch()            # doctest: +SKIP
    >>> a, b = sb.add(), sb.add()                               # doctest: +SKIP
    >>> out = sb.process({a: x[:160], b: y[:160]})              # doctest: +SKIP
    """

    latency = ALGORITHMIC_LATENCY
    hop = stft.HOP

    def __init__(self, enhancer: Enhancer):
        if not isinstance(enhancer, Enhancer):
            raise ParameterError(f"StreamBatch needs an Enhancer, got {type(enhancer).__name__}")
        self.enhancer = enhancer
        self._model = enhancer.model
        self._ids: list[int] = []  # stream id of each batch row, in row order
        self._next_id = 0
        self._state = None  # model state of len(self._ids) streams; None while empty
        H = stft.HOP
        self._spectra = _StftBatch(0)  # analysis history and synthesis tail per stream
        self._fused = _fused_hop(enhancer, 1)  # rebuilt for the batch size in use
        self._pending = np.zeros((0, H), np.float32)  # what the next call returns (yp one hop back)
        self._frames = np.zeros(0, np.int64)  # hops processed per stream

    @property
    def ids(self) -> list:
        """Ids of the open streams, in the order they joined."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, stream_id) -> bool:
        return stream_id in self._ids

    def _row(self, stream_id) -> int:
        try:
            return self._ids.index(stream_id)
        except ValueError:
            raise ParameterError(f"stream id {stream_id!r} is not open (open ids: {self._ids})") from None

    def _reshape(self, rows: np.ndarray, ids: list) -> None:
        """Keep batch rows ``rows`` (-1: a new stream) in that order, under ``ids``."""
        if not len(rows):
            self._state = None
        elif self._state is None:
            self._state = self._model.init_state(len(rows))
        else:
            self._state = self._state.take(rows)
        self._spectra.reorder(rows)
        keep = rows >= 0
        for name in ("_pending", "_frames"):
            old = getattr(self, name)
            new = np.zeros((len(rows),) + old.shape[1:], old.dtype)
            new[keep] = old[rows[keep]]
            setattr(self, name, new)
        self._ids = ids

    def add(self) -> int:
        """Open a new stream (silence before its first sample); returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._reshape(np.append(np.arange(len(self._ids)), -1), self._ids + [sid])
        return sid

    def remove(self, stream_id, *, flush: bool = False):
        """Close a stream. With ``flush=True`` return its last ``latency`` samples (``Stream.flush``)."""
        r = self._row(stream_id)
        tail = None
        if flush:
            if self._frames[r]:  # the zero hop that completes the last frame, as Stream.flush
                first = self._tick(np.array([r]), np.zeros((1, stft.HOP), np.float32))[0]
                tail = np.concatenate([first, self._pending[r]])
            else:
                tail = np.zeros(self.latency, np.float32)
        rows = np.array([i for i in range(len(self._ids)) if i != r], np.int64)
        self._reshape(rows, [sid for sid in self._ids if sid != stream_id])
        return tail

    def process(self, chunks: dict) -> dict:
        """One hop for each stream named: ``{id: (160,) float samples}`` -> ``{id: (160,) float32}``.

        Every hop is checked before any state changes. A refused hop (an id that is not open, a
        wrong shape, NaN/Inf, a sample beyond ``MAX_ABS_SAMPLE``) leaves its stream as it was;
        the other streams are processed, and then :class:`~npdgru.errors.StreamInputError`
        names the refused ids and carries the others' outputs (``e.outputs``).
        """
        if not isinstance(chunks, dict):
            raise ParameterError(f"chunks must be a dict {{stream id: (160,) samples}}, got {type(chunks).__name__}")
        row_of = {sid: r for r, sid in enumerate(self._ids)}  # one pass: O(N) for N streams
        ok, x, rejected = _validate_hops(chunks, row_of)
        out = {}
        if ok:
            order = np.argsort([row_of[sid] for sid in ok], kind="stable")  # batch row order
            ids = [ok[k] for k in order]
            rows = np.array([row_of[sid] for sid in ids], np.int64)
            y = self._tick(rows, x[order])
            out = {sid: y[k] for k, sid in enumerate(ids)}
        if rejected:
            raise StreamInputError(rejected, out)
        return out

    def _tick(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance batch rows ``rows`` by the hops x (n, 160); return their outputs (n, 160)."""
        full = len(rows) == len(self._ids) and (rows == np.arange(len(rows))).all()
        if full and self._fused is not None:
            if self._fused.prog.batch != len(rows):
                self._fused = _fused_hop(self.enhancer, len(rows))
            yp = np.empty((len(rows), stft.HOP), np.float32)
            self._fused.run(x, self._spectra, self._state, yp)
            return self._emit(rows, yp)
        sel = None if full else rows
        X = self._spectra.analyse(x[:, None, :], sel)
        if full:
            Y = self.enhancer._apply(X, self._state)
        else:  # a subset of the streams: run them as a batch of their own, write their state back
            sub = self._state.take(rows)
            Y = self.enhancer._apply(X, sub)
            self._state.put(rows, sub)
        return self._emit(rows, self._spectra.synthesise(Y, sel))

    def _emit(self, rows: np.ndarray, yp: np.ndarray) -> np.ndarray:
        """Hand out the pending hops of rows ``rows`` and queue their new output hops yp."""
        yp[self._frames[rows] == 0] = 0.0  # the first hop is the (masked) front padding: silence
        self._frames[rows] += 1
        out = self._pending[rows]
        self._pending[rows] = yp
        return out


def _check_rate(sample_rate, name="sample_rate") -> None:
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}={sample_rate!r} must be an integer number of Hz from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}")


def _resolve_weights(weights, model):
    """The Weights for ``Enhancer(weights=..., model=...)``; a clear error for anything else."""
    from .shipped import model_path

    if model is not None:
        if weights is not None:
            raise ParameterError("pass either weights= (a file) or model= (a shipped model's name), not both")
        return load_weights(model_path(model))
    if isinstance(weights, Weights):
        return weights
    if weights is None:
        return load_weights(default_weights_path())
    if not isinstance(weights, (str, os.PathLike)):
        raise ParameterError(f"weights={weights!r}: expected a weight file path, a loaded Weights or None (the shipped default); for a shipped model by name use model=")
    if not os.path.exists(weights) and os.sep not in os.fspath(weights):
        try:
            model_path(os.fspath(weights))
        except ParameterError:
            pass
        else:
            raise ParameterError(f"{weights}: no such weight file; for the shipped model of that name pass model={os.fspath(weights)!r} (--model on the command line)")
    return load_weights(weights)


def _resample(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    if sr_from == sr_to:
        return x
    from scipy.signal import resample_poly

    r = Fraction(int(sr_to), int(sr_from))
    return resample_poly(x, r.numerator, r.denominator, axis=0).astype(np.float32)


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) >= n:
        return np.ascontiguousarray(y[:n])
    return np.concatenate([y, np.zeros((n - len(y),) + y.shape[1:], y.dtype)])


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif")


MAX_PIPE_BYTES = 2**30  # a pipe or FIFO is read into memory (libsndfile cannot seek it): 1 GiB at most


def read_audio(path, *, info: bool = False):
    """Read an audio file as float32 (samples, channels). Raises AudioError naming the file.

    The file is opened once (a pipe or FIFO, e.g. ``<(cat x.wav)``, is read into memory first, as
    libsndfile cannot seek it). The header is checked before any samples are read: the sample
    rate must lie in [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] and the channels number at most
    MAX_CHANNELS. With ``info=True`` returns ``(x, sample_rate, {"format": ..., "subtype": ...})``.
    """
    import io
    import stat

    import soundfile as sf

    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as e:
        raise AudioError(f"{path}: cannot open ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(f"{path}: is a folder")
    try:
        if stat.S_ISREG(st.st_mode):
            source = path
        else:  # FIFO, pipe, character device: read once, with a bound
            with open(path, "rb") as fh:
                data = fh.read(MAX_PIPE_BYTES + 1)
            if len(data) > MAX_PIPE_BYTES:
                raise AudioError(f"{path}: more than {MAX_PIPE_BYTES} bytes from a pipe; write the audio to a file first")
            source = io.BytesIO(data)
        with sf.SoundFile(source) as f:
            sr, C, fmt, subtype = int(f.samplerate), int(f.channels), f.format, f.subtype
            if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
                raise AudioError(f"{path}: the header says {sr} Hz; npdgru takes {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
            if C > MAX_CHANNELS:
                raise AudioError(f"{path}: the header says {C} channels; npdgru takes at most {MAX_CHANNELS}")
            x = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, MemoryError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); soundfile reads WAV, FLAC, OGG, AIFF") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    _check_samples(x, path)
    if info:
        return x, sr, {"format": fmt, "subtype": subtype}
    return x, sr


_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".aiff": "AIFF", ".aif": "AIFF"}
# how much of a sample a subtype keeps, to tell when a format change loses bits
_SUBTYPE_RANK = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 5, "DOUBLE": 6}
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE", "VORBIS", "OPUS")  # no clipping at ±1


def audio_format(path) -> str:
    """The soundfile format written for ``path`` by its suffix (no suffix: WAV); AudioError otherwise."""
    ext = os.path.splitext(os.fspath(path))[1]
    fmt = _FORMATS.get(ext.lower() or ".wav")
    if fmt is None:
        raise AudioError(f"{path}: cannot write '{ext}' files; use .wav, .flac, .ogg or .aiff")
    return fmt


def output_subtype(path, y: np.ndarray, *, source_subtype: str | None = None, subtype: str | None = None) -> tuple[str, list[str]]:
    """The subtype to write ``y`` to ``path`` with, and warnings for what the format change loses.

    ``subtype`` (the user's ``--subtype``) is taken as given if the format can hold it. Otherwise
    the input's subtype is kept where the output format holds it (24-bit WAV -> 24-bit FLAC),
    else the format's default, with a warning naming the option that keeps more bits. Samples
    beyond ±1 clip in integer subtypes: counted and warned, with the way to keep them.
    """
    import soundfile as sf

    fmt = audio_format(path)
    notes = []
    if subtype is not None:
        if not (isinstance(subtype, str) and sf.check_format(fmt, subtype.upper())):
            raise AudioError(f"{path}: subtype {subtype!r} cannot be written as {fmt} (choose from {', '.join(sorted(sf.available_subtypes(fmt)))})")
        chosen = subtype.upper()
    elif source_subtype and sf.check_format(fmt, source_subtype):
        chosen = source_subtype
    else:
        chosen = sf.default_subtype(fmt)
        lost = _SUBTYPE_RANK.get(source_subtype or "", 0) > _SUBTYPE_RANK.get(chosen, 9)
        if lost:
            best = max((s for s in sf.available_subtypes(fmt) if s in _SUBTYPE_RANK), key=_SUBTYPE_RANK.get, default=None)
            keep = f"pass --subtype {best} to keep more" if best and _SUBTYPE_RANK[best] > _SUBTYPE_RANK[chosen] else "write a .wav to keep them"
            notes.append(f"{path}: the input's {source_subtype} samples are written as {fmt} {chosen}; {keep}")
    if chosen not in _FLOAT_SUBTYPES:
        n = int(np.count_nonzero(np.abs(y) > 1.0))
        if n:
            notes.append(f"{path}: {n} samples ({100.0 * n / y.size:.3g} %) exceed ±1.0 and are clipped in {fmt} {chosen}; write a .wav with --subtype FLOAT to keep them")
    return chosen, notes


def write_audio(path, y: np.ndarray, sample_rate: int, *, subtype: str | None = None) -> None:
    """Write audio atomically: a temporary file in the same folder, then rename.

    The temporary file is ``.npdgru-XXXX.<ext>.part``: folder scans never take it as an input,
    and it is removed on any failure (a full disk, an unwritable folder: an AudioError naming
    ``path``) and on KeyboardInterrupt or the SIGTERM that ``npdgru enhance`` turns into one.
    """
    import tempfile

    import soundfile as sf

    path = os.fspath(path)
    fmt = audio_format(path)  # before anything is created
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise AudioError(f"{path}: cannot create the output folder ({e.strerror or e})") from None
    ext = os.path.splitext(path)[1] or ".wav"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".npdgru-", suffix=ext + ".part", dir=folder)
    except OSError as e:
        raise AudioError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    try:
        sf.write(tmp, y, sample_rate, format=fmt, subtype=subtype)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise AudioError(f"{path}: cannot write the output ({e.strerror or e})") from None
    except (sf.LibsndfileError, RuntimeError) as e:  # libsndfile: disk full, I/O error
        raise AudioError(f"{path}: cannot write the output ({' '.join(str(e).split())})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
