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
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from . import stft
from .errors import AudioError, ParameterError
from .model import MaskModel, ModelState
from .weights import Weights, default_weights_path, load_weights

ALGORITHMIC_LATENCY = stft.ALGORITHMIC_LATENCY  # samples at 16 kHz
_BLOCK_FRAMES = 1000  # frames (10 s) per model call of the offline path: bounded memory
DEFAULT_MASK_FLOOR_DB = -80.0  # NSNet2's minimum gain: the mask is clipped to [10^(-80/20), 1]

__all__ = ["Enhancer", "Stream", "StreamBatch", "ALGORITHMIC_LATENCY", "DEFAULT_MASK_FLOOR_DB"]


def _check_audio(audio, name="audio") -> np.ndarray:
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise AudioError(f"{name}: audio must be a numeric array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        raise AudioError(f"{name}: integer samples ({a.dtype}); pass floats in [-1, 1] (e.g. x / 32768)")
    if a.ndim not in (1, 2):
        raise AudioError(f"{name}: audio must be (samples,) or (samples, channels), got shape {a.shape}")
    if a.shape[0] == 0 or (a.ndim == 2 and a.shape[1] == 0):
        raise AudioError(f"{name}: audio is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise AudioError(f"{name}: audio contains NaN or Inf samples")
    return a


class Enhancer:
    """Speech enhancement with a mask model at a chosen update percentage.

    Parameters
    ----------
    weights : path to an npdgru weight file, a loaded :class:`Weights`, or None for the shipped
        default (``weights/nsnet2-ft-anyp.safetensors``, NSNet2 fine-tuned for any P).
    update_percent : P in (0, 100]; each GRU layer updates ceil(P·H/100) neurons per frame.
    backend : "cpu" (Numba, float32), "cuda" (numba.cuda, float32; model state on the GPU) or
        "reference" (NumPy, float64, slow).
    mask_floor_db : lowest gain the mask may apply, in dB (NSNet2: -80 dB).

    Examples
    --------
    >>> enh = Enhancer(update_percent=50)                      # doctest: +SKIP
    >>> y = enh.enhance(x, sample_rate=16000)                  # doctest: +SKIP
    """

    sample_rate = stft.SAMPLE_RATE

    def __init__(self, weights=None, *, update_percent: float = 100.0, backend: str = "cpu", mask_floor_db: float = DEFAULT_MASK_FLOOR_DB):
        if not isinstance(weights, Weights):
            weights = load_weights(default_weights_path() if weights is None else weights)
        if weights.architecture["n_features"] != stft.N_BINS:
            raise ParameterError(f"{weights.path}: model expects {weights.architecture['n_features']} features, the STFT gives {stft.N_BINS}")
        if not (isinstance(mask_floor_db, (int, float)) and math.isfinite(mask_floor_db) and mask_floor_db <= 0):
            raise ParameterError(f"mask_floor_db={mask_floor_db!r} must be a finite number <= 0")
        self.weights = weights
        self.model = MaskModel(weights, update_percent=update_percent, backend=backend)
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
        xp = np.zeros((T * H, C), np.float32)  # x and the tail padding that completes frame T-1
        xp[:n] = x
        ana = [stft.StftStream() for _ in range(C)]
        syn = [stft.IstftStream() for _ in range(C)]
        yp = np.empty((T * H, C), np.float32)  # the synthesis streams emit yp from index 0
        state = self.model.init_state(C)
        step = _BLOCK_FRAMES * H
        for s0 in range(0, T * H, step):
            X = np.stack([ana[c].push(xp[s0 : s0 + step, c]) for c in range(C)], axis=1)
            Y = self._apply(X, state)
            for c in range(C):
                yp[s0 : s0 + len(Y) * H, c] = syn[c].push(Y[:, c])
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
        self._stft = stft.StftStream()
        self._istft = stft.IstftStream()
        self._state = self.enhancer.model.init_state(1)
        # The synthesis stream emits yp = y delayed by one hop; one more hop of zeros in front
        # makes the output y delayed by exactly N_FFT samples, for any chunk sizes.
        self._out = np.zeros(stft.HOP, np.float32)
        self._n_in = 0
        self._lead = True  # the synthesis stream's first hop is still to come

    def _run(self, samples: np.ndarray) -> None:
        frames = self._stft.push(samples)
        if len(frames):
            Y = self.enhancer._apply(frames[:, None, :], self._state)[:, 0]
            y = self._istft.push(Y)
            if self._lead:  # yp[:HOP] is the (masked) front padding, not x: silence, as documented
                y[: stft.HOP] = 0.0
                self._lead = False
            self._out = np.concatenate([self._out, y])

    def process(self, chunk) -> np.ndarray:
        """Feed samples (any count, float, 16 kHz mono); get as many enhanced samples back."""
        c = np.asarray(chunk)
        if c.size == 0:
            return np.zeros(0, np.float32)
        c = _check_audio(c, "chunk")
        if c.ndim != 1:
            raise AudioError(f"chunk: a stream takes mono samples (k,), got shape {c.shape}")
        c = c.astype(np.float32)
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
        self._state = None  # ModelState of len(self._ids) streams; None while empty
        H = stft.HOP
        self._prev = np.zeros((0, H), np.float32)  # last input hop per stream (analysis history)
        self._tail = np.zeros((0, H), np.float32)  # second half of the last synthesis frame
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
        self._state = _take_state(self._model, self._state, rows) if len(rows) else None
        keep = rows >= 0
        for name in ("_prev", "_tail", "_pending", "_frames"):
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
        """One hop for each stream named: ``{id: (160,) float samples}`` -> ``{id: (160,) float32}``."""
        if not isinstance(chunks, dict):
            raise ParameterError(f"chunks must be a dict {{stream id: (160,) samples}}, got {type(chunks).__name__}")
        if not chunks:
            return {}
        ids = sorted(chunks, key=self._row)  # batch row order: all streams -> no state copies
        rows = np.array([self._row(sid) for sid in ids], np.int64)
        x = np.empty((len(ids), stft.HOP), np.float32)
        for k, sid in enumerate(ids):
            c = _check_audio(chunks[sid], f"stream {sid!r}")
            if c.shape != (stft.HOP,):
                raise AudioError(f"stream {sid!r}: a chunk must be one hop of {stft.HOP} samples (16 kHz mono), got shape {c.shape}")
            x[k] = c
        out = self._tick(rows, x)
        return {sid: out[k] for k, sid in enumerate(ids)}

    def _tick(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance batch rows ``rows`` by the hops x (n, 160); return their outputs (n, 160)."""
        H = stft.HOP
        # analysis: frame = (previous hop, this hop) windowed, as StftStream / stft._analyse
        frames = np.concatenate((self._prev[rows], x), axis=1)
        frames *= stft.WINDOW
        X = np.fft.rfft(frames, n=stft.N_FFT, axis=1).astype(np.complex64, copy=False)
        self._prev[rows] = x
        full = len(rows) == len(self._ids) and (rows == np.arange(len(rows))).all()
        if full:
            Y = self.enhancer._apply(X[None], self._state)[0]
        else:  # a subset of the streams: run them as a batch of their own, write their state back
            sub = _take_state(self._model, self._state, rows)
            Y = self.enhancer._apply(X[None], sub)[0]
            _put_state(self._model, self._state, rows, sub)
        # synthesis: overlap-add with the carried tail, as IstftStream
        y = stft._synthesise(Y)
        yp = y[:, :H].copy()
        yp += self._tail[rows]
        self._tail[rows] = y[:, H:]
        yp[self._frames[rows] == 0] = 0.0  # the first hop is the (masked) front padding: silence
        self._frames[rows] += 1
        out = self._pending[rows]
        self._pending[rows] = yp
        return out


_STATE_FIELDS = ("h", "m", "g", "xprev", "step")  # per-stream rows of a layer state (cpu, reference)


def _take_state(model: MaskModel, state, rows: np.ndarray):
    """A model state of ``len(rows)`` streams: stream k copies stream ``rows[k]`` (< 0: a new one)."""
    rows = np.asarray(rows, np.int64)
    layers = []
    for i, (layer, F) in enumerate(zip(model.gru_layers, model.gru_bands)):
        st = None if state is None else state.layers[i]
        r = _band_rows(rows, F)
        if st is not None and hasattr(st, "take"):  # cuda: gathered on the device
            layers.append(st.take(r))
            continue
        new = layer.init_state(len(r))
        rows_f = r
        keep = rows_f >= 0
        if st is not None and keep.any():
            for f in _STATE_FIELDS:
                if hasattr(st, f):
                    getattr(new, f)[keep] = getattr(st, f)[rows_f[keep]]
        layers.append(new)
    return ModelState(layers=layers, batch=len(rows))


def _band_rows(rows: np.ndarray, F: int) -> np.ndarray:
    """State rows of streams ``rows`` in a layer with F bands (stream b owns rows b·F ... b·F+F-1)."""
    if F == 1:
        return rows
    r = rows[:, None] * F + np.arange(F)
    r[rows < 0] = -1
    return r.reshape(-1)


def _put_state(model: MaskModel, state, rows: np.ndarray, sub) -> None:
    """Write the streams of ``sub`` back into rows ``rows`` of ``state``."""
    for st, s2, F in zip(state.layers, sub.layers, model.gru_bands):
        r = _band_rows(np.asarray(rows, np.int64), F)
        if hasattr(st, "put"):
            st.put(r, s2)
            continue
        for f in _STATE_FIELDS:
            if hasattr(st, f):
                getattr(st, f)[r] = getattr(s2, f)


def _check_rate(sample_rate, name="sample_rate") -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
        raise AudioError(f"{name}={sample_rate!r} must be an integer number of Hz (>= 1000)")


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


def read_audio(path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 (samples, channels). Raises AudioError naming the file."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a folder")
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); soundfile reads WAV, FLAC, OGG, AIFF") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    return x, int(sr)


def write_audio(path, y: np.ndarray, sample_rate: int, *, subtype: str | None = None) -> None:
    """Write audio atomically: a temporary file in the same folder, then rename.

    The temporary file is ``.npdgru-XXXX.<ext>.part``: folder scans never take it as an input,
    and it is removed on any failure (a full disk, an unwritable folder: an AudioError naming
    ``path``) and on KeyboardInterrupt or the SIGTERM that ``npdgru enhance`` turns into one.
    """
    import tempfile

    import soundfile as sf

    path = os.fspath(path)
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
        fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".aiff": "AIFF", ".aif": "AIFF"}.get(ext.lower())
        if fmt is None:
            raise AudioError(f"{path}: cannot write '{ext}' files; use .wav, .flac, .ogg or .aiff")
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
