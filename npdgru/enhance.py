"""Enhance audio: arrays and files offline; :mod:`npdgru.streaming` serves 10 ms chunks.

    noisy x -> STFT X (T, 161) -> log-power features -> model -> mask m in [floor, 1]
            -> X·m -> inverse STFT -> enhanced y (same length, same sample rate as x)

Offline and streaming run the same code on the same frames (``stft.py``, the hop engine of
``hop.py``) and the model is causal, so a :class:`Stream` returns exactly the offline output
delayed by ``ALGORITHMIC_LATENCY = 320`` samples (20 ms at 16 kHz), bit for bit.

Many signals at once: :meth:`Enhancer.enhance_batch` runs a list of signals as one batch of
independent streams (zero padding after each signal's end, which a causal model never sees).
:func:`enhance_file` enhances a file of any length in bounded memory; the one-call
``npdgru.enhance(x, sr)`` keeps an Enhancer per set of options.

The layers below: ``audio.py`` (files, standard input/output, the input limits), ``streaming.py``
(:class:`Stream`, :class:`StreamBatch`), ``hop.py`` (the STFT driver and the fused hop),
``resample.py`` (other sample rates). Their public names are importable from here too.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

from . import stft
from .audio import (AUDIO_SUFFIXES, MAX_ABS_SAMPLE, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, STDIO, AudioInput, _atomic_output,  # noqa: F401
                    _check_audio, _check_rate, _clip_note, _clipped, _sf_name, audio_format, output_subtype, read_audio, stdio_format, write_audio)
from .errors import ParameterError
from .hop import _StftBatch
from .model import MaskModel, get_backend
from .streaming import ALGORITHMIC_LATENCY, Stream, StreamBatch
from .weights import Weights, default_weights_path, load_weights

_BLOCK_FRAMES = 1000  # frames (10 s) per model call of the offline path: bounded memory
DEFAULT_MASK_FLOOR_DB = -80.0  # NSNet2's minimum gain: the mask is clipped to [10^(-80/20), 1]

__all__ = ["Enhancer", "Stream", "StreamBatch", "enhance_file", "ALGORITHMIC_LATENCY", "DEFAULT_MASK_FLOOR_DB", "MAX_ABS_SAMPLE", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_CHANNELS",
           "read_audio", "write_audio", "AudioInput"]


# Input accumulators (a D-GRU layer fed by a D-GRU layer reads only the changed input columns,
# ``MaskModel(sparse_inputs=True)``) are used where the backend says they pay
# (``Executor.sparse_inputs_max_p``: on cpu P <= 50, where benchmarks/bench_enhance.py measures
# them faster both offline and per streaming hop than the dense input product; NSNet2: about
# 15 % offline and 8-12 % per hop at P = 50 and 25). One rule for both modes, so offline and
# streaming still compute the same bits.
def _input_accumulators_pay(backend, update_percent) -> bool:
    P = update_percent
    return isinstance(P, (int, float, np.floating, np.integer)) and not isinstance(P, bool) and P <= get_backend(backend).Executor.sparse_inputs_max_p


class _Offline16:
    """The offline path at 16 kHz fed in blocks of any size: ``push(x)`` returns the output
    samples that are final, ``finish()`` the rest, ``n`` in all for n input samples.

    The model runs on steps of ``_BLOCK_FRAMES`` frames counted from the first sample, whatever
    the blocks pushed, with its state and the STFT history carried between steps (as
    :class:`Stream` carries them between chunks): the same calls on the same arrays as one call
    with the whole signal, so the same bits (tests/test_enhance.py).
    """

    def __init__(self, enhancer: "Enhancer", channels: int):
        self.enhancer = enhancer
        self.spectra = _StftBatch(channels)
        self.state = enhancer.model.init_state(channels)
        self.held = np.zeros((0, channels), np.float32)  # input of the step in progress
        self.n = 0  # input samples pushed
        self.skip = stft.HOP  # the synthesis emits yp; y = yp[HOP:HOP + n]

    def _step(self, hops: np.ndarray) -> np.ndarray:
        """Input (k·HOP, C) -> the synthesis's next k·HOP samples (k·HOP, C)."""
        C, H = hops.shape[1], stft.HOP
        k = hops.shape[0] // H
        Y = self.enhancer._apply(self.spectra.analyse(np.ascontiguousarray(hops.T).reshape(C, k, H)), self.state)
        return self.spectra.synthesise(Y).T

    def _run(self, x: np.ndarray, final: bool) -> np.ndarray:
        step = _BLOCK_FRAMES * stft.HOP
        x = np.concatenate([self.held, x]) if len(self.held) else x
        stop = len(x) if final else len(x) - len(x) % step
        out = [self._step(x[s0 : s0 + step]) for s0 in range(0, stop, step)]
        self.held = x[stop:].copy()
        y = np.concatenate(out) if out else np.zeros((0, x.shape[1]), np.float32)
        cut = min(self.skip, len(y))
        self.skip -= cut
        return y[cut:]

    def push(self, x: np.ndarray) -> np.ndarray:
        """x (m, C) float32 at 16 kHz -> the output samples now final (a multiple of the step)."""
        self.n += len(x)
        return self._run(x, final=False)

    def finish(self) -> np.ndarray:
        """The rest of the output: the tail padding of ``stft`` completes the last frame."""
        H, C = stft.HOP, self.held.shape[1]
        pad = stft.num_frames(self.n) * H - self.n if self.n else 0  # xp is T·HOP long
        y = self._run(np.zeros((pad, C), np.float32), final=True)
        return y[: len(y) - (pad - H)] if self.n else y  # y = yp[HOP : HOP + n]


class Enhancer:
    """Speech enhancement with a mask model at a chosen update percentage.

    Parameters
    ----------
    weights : path to an npdgru weight file, a loaded :class:`Weights`, or None for the shipped
        default (``weights/nsnet2-kd-anyp.safetensors``, NSNet2 distilled for any P).
    model : instead of ``weights``, the name of a shipped model (``"dprnn"``, ``"mpt"``,
        ``"nsnet2"``, ...; :func:`npdgru.shipped_models` lists them).
    update_percent : P in (0, 100]; each GRU layer updates ceil(P·H/100) neurons per frame.
        None (the default): the model's own P (:func:`npdgru.shipped.default_update_percent`:
        50 for the shipped any-P models, 100 for the original NSNet2 and for a weight file that
        records no ``default_update_percent``).
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

    def __init__(self, weights=None, *, model: str | None = None, update_percent: float | None = None, backend: str = "cpu", mask_floor_db: float = DEFAULT_MASK_FLOOR_DB, exact: bool = False):
        weights = _resolve_weights(weights, model)
        if update_percent is None:
            from .shipped import default_update_percent

            update_percent = default_update_percent(weights)
        if weights.architecture["n_features"] != stft.N_BINS:
            raise ParameterError(f"{weights.path}: model expects {weights.architecture['n_features']} features, the STFT gives {stft.N_BINS}")
        if isinstance(mask_floor_db, (bool, np.bool_)) or not isinstance(mask_floor_db, numbers.Real) or not (math.isfinite(mask_floor_db) and mask_floor_db <= 0):
            raise ParameterError(f"mask_floor_db={mask_floor_db!r} must be a finite number <= 0")
        self.weights = weights
        self.model = MaskModel(weights, update_percent=update_percent, backend=backend, sparse_inputs=_input_accumulators_pay(backend, update_percent), exact=exact)
        self.update_percent = self.model.update_percent
        self.mask_floor_db = float(mask_floor_db)
        self.mask_floor = np.float32(10.0 ** (self.mask_floor_db / 20.0))

    def _apply(self, X: np.ndarray, state, *, exact: bool | None = None) -> np.ndarray:
        """Masked spectra for frames X (T, B, 161); the model state carries across calls.
        ``exact``: :meth:`MaskModel.forward`'s (the streaming paths pass True)."""
        mask = self.model.forward(stft.log_power(X), state, exact=exact)
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
        from .resample import resample_signal

        x16 = resample_signal(x, sample_rate, self.sample_rate)
        y16 = self._enhance16(x16)
        y = resample_signal(y16, self.sample_rate, sample_rate)
        y = _fit_length(y, n)
        return y[:, 0] if mono else y

    def _enhance16(self, x: np.ndarray) -> np.ndarray:
        """x (n, C) at 16 kHz -> (n, C): the channels run as a batch of independent streams.

        The signal goes through the streaming analysis/synthesis of ``stft.py`` in blocks of
        ``_BLOCK_FRAMES`` frames with the model state carried (:class:`_Offline16`), so memory
        beyond the input and output does not grow with the length. The frames are those of
        ``stft.stft`` and the result is ``stft.istft``'s, bit for bit (tests/test_enhance.py).
        """
        run = _Offline16(self, x.shape[1])
        return np.concatenate([run.push(x), run.finish()])

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
        from .resample import resample_signal

        signals = []  # (mono, n, x16 (n16, C)) per signal
        for i, (audio, sr) in enumerate(zip(audios, rates)):
            a = _check_audio(audio, f"audios[{i}]")
            _check_rate(sr, f"sample_rate[{i}]" if isinstance(sample_rate, (list, tuple)) else "sample_rate")
            x = (a[:, None] if a.ndim == 1 else a).astype(np.float32, copy=False)
            signals.append((a.ndim == 1, x.shape[0], resample_signal(x, sr, self.sample_rate)))
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
            y = _fit_length(resample_signal(np.ascontiguousarray(y16), self.sample_rate, sr), n)
            out.append(y[:, 0] if mono else y)
        return out

    def stream(self, *, sample_rate: int = stft.SAMPLE_RATE, channels: int = 1) -> "Stream":
        """A streaming enhancer with its own state, at any rate and channel count; see :class:`Stream`."""
        return Stream(self, sample_rate=sample_rate, channels=channels)

    def stream_batch(self, *, sample_rate: int = stft.SAMPLE_RATE, channels: int = 1) -> "StreamBatch":
        """An empty batch of concurrent streams (10 ms hops; any rate that is a multiple of 100 Hz); see :class:`StreamBatch`."""
        return StreamBatch(self, sample_rate=sample_rate, channels=channels)



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


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    if len(y) >= n:
        return np.ascontiguousarray(y[:n])
    return np.concatenate([y, np.zeros((n - len(y),) + y.shape[1:], y.dtype)])



# --------------------------------------------------------------------------------------------
# a file in bounded memory
# --------------------------------------------------------------------------------------------

BLOCK_SECONDS = 60.0  # audio read, enhanced and written at a time by enhance_file


def enhance_file(enhancer: Enhancer, src: AudioInput, dst, *, subtype: str | None = None, block_seconds: float = BLOCK_SECONDS) -> dict:
    """Enhance the opened input ``src`` into the file ``dst``, written atomically.

    A file of at most ``block_seconds`` is read whole and enhanced by :meth:`Enhancer.enhance`.
    A longer one is read, enhanced and written in blocks of ``block_seconds``: the 16 kHz path
    carries the model state and the STFT history (:class:`_Offline16`) and other rates go
    through block-fed resamplers (:class:`npdgru.resample.BlockResampler`), so memory does not grow with the
    length and the output has the bits of :meth:`Enhancer.enhance` on the whole file
    (tests/test_enhance.py). The input's identity is checked before the output is renamed into
    place: an input written to meanwhile leaves no output.

    Returns ``{"warnings": [...], "compute": seconds of enhancement, "identity": (sha256,
    size, mtime_ns)}``; the output subtype is :func:`output_subtype`'s (``subtype``: the user's).
    """
    import itertools
    import time

    import soundfile as sf

    sr, C = src.samplerate, src.channels
    block = max(1, int(block_seconds * sr))
    fmt = audio_format(dst)
    chosen, notes = output_subtype(dst, np.zeros(0, np.float32), source_subtype=src.subtype, subtype=subtype)
    compute = 0.0
    if src.frames <= block:  # one block: the whole-file path
        x = src.read()
        t0 = time.perf_counter()
        y = enhancer.enhance(x, sr)
        compute = time.perf_counter() - t0
        identity = src.identity()
        chosen, notes = output_subtype(dst, y, source_subtype=src.subtype, subtype=subtype)
        write_audio(dst, y, sr, subtype=chosen)
        return {"warnings": notes, "compute": compute, "identity": identity}
    _check_rate(sr)
    from .resample import BlockResampler

    r_in, r_out = BlockResampler(sr, stft.SAMPLE_RATE, C), BlockResampler(stft.SAMPLE_RATE, sr, C)
    model = _Offline16(enhancer, C)
    clipped, n_in, n_out = 0, 0, 0
    with _atomic_output(dst) as tmp:
        with sf.SoundFile(_sf_name(tmp), "w", sr, C, subtype=chosen, format=fmt) as f:
            for x in itertools.chain(src.blocks(block), [None]):
                t0 = time.perf_counter()
                if x is not None:
                    n_in += len(x)
                    y = r_out.push(model.push(r_in.push(x)))
                else:  # the end: each stage's rest, through the stages after it
                    y16 = np.concatenate([model.push(r_in.finish()), model.finish()])
                    y = np.concatenate([r_out.push(y16), r_out.finish()])
                y = y[: n_in - n_out]  # the resampled tail beyond the input's length (_fit_length)
                compute += time.perf_counter() - t0
                clipped += _clipped(chosen, y)
                f.write(y)
                n_out += len(y)
        identity = src.identity()
    note = _clip_note(dst, chosen, clipped, n_out * C)
    return {"warnings": notes + ([note] if note else []), "compute": compute, "identity": identity}


# --------------------------------------------------------------------------------------------
# one call: npdgru.enhance(x, sr, **options)
# --------------------------------------------------------------------------------------------

_ENHANCER_OPTIONS = ("weights", "model", "update_percent", "backend", "mask_floor_db", "exact")
_CACHED: dict = {}  # options -> Enhancer, most recent last
_CACHE_SIZE = 4


def _options_key(options: dict) -> tuple:
    def key(value):
        if isinstance(value, (str, os.PathLike)):
            return ("path", os.path.abspath(os.fspath(value)))
        if isinstance(value, Weights):
            return ("weights", id(value))  # the cached Enhancer keeps the object alive
        return (type(value).__name__, value)

    return tuple(sorted((k, key(v)) for k, v in options.items()))


def enhance(audio, sample_rate, **options) -> np.ndarray:
    """Enhance a signal in one call: ``npdgru.enhance(x, sr)``, ``npdgru.enhance(x, sr, model="dprnn")``.

    ``options`` are :class:`Enhancer`'s (``weights``, ``model``, ``update_percent``, ``backend``,
    ``mask_floor_db``). The Enhancer for each set of options is made on the first call and kept
    (the four most recently used), so later calls with the same options load no weights and
    compile nothing. A weight file is keyed by its path: after changing the file, pass it as a
    loaded :func:`load_weights` or make an :class:`Enhancer`. The cache is per process and not
    locked: from several threads, give each thread its own Enhancer.

    Returns the enhanced signal, float32, of the shape of ``audio`` (see :meth:`Enhancer.enhance`).
    """
    unknown = sorted(set(options) - set(_ENHANCER_OPTIONS))
    if unknown:
        raise ParameterError(f"npdgru.enhance: unknown option(s) {', '.join(unknown)} (options: {', '.join(_ENHANCER_OPTIONS)})")
    try:
        k = _options_key(options)
        hash(k)
    except TypeError:
        raise ParameterError(f"npdgru.enhance: options must be numbers, strings, paths or Weights, got {options!r}") from None
    enh = _CACHED.pop(k, None)
    if enh is None:
        enh = Enhancer(**options)
    _CACHED[k] = enh  # most recent last
    while len(_CACHED) > _CACHE_SIZE:
        _CACHED.pop(next(iter(_CACHED)))
    return enh.enhance(audio, sample_rate)


class _CallableModule(type(os)):
    """``npdgru.enhance`` is this module (``from npdgru.enhance import Enhancer``) and, called,
    the one-call :func:`enhance`: Python binds a package's attribute to its submodule on import,
    so a function of that name in ``npdgru/__init__.py`` would be replaced by the module."""

    def __call__(self, audio, sample_rate, **options):
        return enhance(audio, sample_rate, **options)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule

