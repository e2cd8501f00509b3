"""Enhance audio: arrays and files offline, or 10 ms chunks as a stream.

    noisy x -> STFT X (T, 161) -> log-power features -> model -> mask m in [floor, 1]
            -> X·m -> inverse STFT -> enhanced y (same length, same sample rate as x)

Offline and streaming run the same code on the same frames (``stft.py``) and the model is
causal, so a :class:`Stream` returns exactly the offline output delayed by
``ALGORITHMIC_LATENCY = 320`` samples (20 ms at 16 kHz), bit for bit.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from . import stft
from .errors import AudioError, ParameterError
from .model import MaskModel
from .weights import Weights, default_weights_path, load_weights

ALGORITHMIC_LATENCY = stft.ALGORITHMIC_LATENCY  # samples at 16 kHz
_BLOCK_FRAMES = 1000  # frames (10 s) per model call of the offline path: bounded memory
DEFAULT_MASK_FLOOR_DB = -80.0  # NSNet2's minimum gain: the mask is clipped to [10^(-80/20), 1]

__all__ = ["Enhancer", "Stream", "ALGORITHMIC_LATENCY", "DEFAULT_MASK_FLOOR_DB"]


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
        default (``weights/nsnet2.safetensors``).
    update_percent : P in (0, 100]; each GRU layer updates ceil(P·H/100) neurons per frame.
    backend : "cpu" (Numba, float32) or "reference" (NumPy, float64, slow).
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
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1000:
            raise AudioError(f"sample_rate={sample_rate!r} must be an integer number of Hz (>= 1000)")
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

    def stream(self) -> "Stream":
        """A streaming enhancer (16 kHz mono) with its own state; see :class:`Stream`."""
        return Stream(self)


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
    """Write audio atomically: a temporary file in the same folder, then rename."""
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
        fd, tmp = tempfile.mkstemp(prefix=".npdgru-", suffix=ext, dir=folder)
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
