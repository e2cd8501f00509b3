"""Speech-quality metrics, each implemented once.

Intrusive (need the clean reference ``clean`` and the estimate ``est``, same length, 16 kHz mono):

* :func:`pesq_wb`  wide-band PESQ, ITU-T P.862.2 (MOS-LQO, about 1.04 .. 4.64), through the
  ``pesq`` package (the ITU reference C code, wrapped).
* :func:`estoi`    extended STOI (Jensen & Taal, IEEE/ACM TASLP 2016), 0 .. 1, through
  ``pystoi.stoi(..., extended=True)``.
* :func:`si_snr`   scale-invariant signal-to-noise ratio in dB (Le Roux et al., "SDR - half-baked
  or well done?", ICASSP 2019), here in NumPy, float64.

Non-intrusive (the estimate alone):

* :class:`Dnsmos`  DNSMOS P.835 (SIG, BAK, OVRL; Reddy et al., ICASSP 2022) and DNSMOS P.808
  (MOS; Reddy et al., ICASSP 2021), running the Microsoft ONNX models shipped inside the
  ``speechmos`` wheel (MIT) with onnxruntime. The procedure is that of ``speechmos/dnsmos.py``
  0.0.1.1 (itself the DNS Challenge's ``dnsmos_local.py``), step for step; see :class:`Dnsmos`.

Every function checks its inputs first and raises :class:`npdgru.errors.AudioError` (a bad
signal) or :class:`npdgru.errors.ParameterError` (a bad argument) with a message naming the
problem; the third-party code is only called on valid input.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy.signal

from ..errors import AudioError, ParameterError

SAMPLE_RATE = 16000  # Hz: every metric here is computed at 16 kHz

# the columns of an evaluation (runner.py computes them, report.py tabulates them), and those that
# need the clean reference
METRICS = ("pesq", "estoi", "si_snr", "sig", "bak", "ovrl", "p808")
INTRUSIVE = ("pesq", "estoi", "si_snr")

__all__ = ["SAMPLE_RATE", "METRICS", "INTRUSIVE", "pesq_wb", "estoi", "si_snr", "Dnsmos", "dnsmos_model_paths", "p808_melspec"]


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _signal(x, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float signal (any float dtype; integers are refused)."""
    a = np.asarray(x)
    if a.dtype.kind != "f":
        raise AudioError(f"{name}: expected a float signal, got dtype {a.dtype}")
    if a.ndim == 2 and a.shape[1] == 1:  # (samples, 1), as npdgru.audio.read_audio returns
        a = a[:, 0]
    if a.ndim != 1:
        raise AudioError(f"{name}: expected a mono signal of shape (samples,), got shape {a.shape}")
    if a.size == 0:
        raise AudioError(f"{name}: signal is empty")
    if not np.isfinite(a).all():
        raise AudioError(f"{name}: signal contains NaN or Inf samples")
    return a


def _pair(clean, est, sample_rate) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate != SAMPLE_RATE:
        raise AudioError(f"sample_rate={sample_rate!r}: the metrics are computed at {SAMPLE_RATE} Hz; resample first")
    c, e = _signal(clean, "clean"), _signal(est, "estimate")
    if c.shape != e.shape:
        raise AudioError(f"clean has {c.size} samples, the estimate {e.size}: the two must have the same length")
    return c, e


# --------------------------------------------------------------------------------------------
# intrusive metrics
# --------------------------------------------------------------------------------------------


def pesq_wb(clean, est, *, sample_rate: int = SAMPLE_RATE) -> float:
    """Wide-band PESQ (ITU-T P.862.2), MOS-LQO.

    Calls ``pesq.pesq(16000, clean, est, "wb")``, the ITU-T reference implementation wrapped by
    the ``pesq`` package. That wrapper divides both signals by their common peak and casts them
    to float32 before the C code runs; P.862's level alignment makes the score independent of a
    common gain. A signal identical to its reference scores 4.644 (the P.862.2 mapping's maximum).

    Raises
    ------
    AudioError : mismatched lengths, NaN/Inf, not 16 kHz, or no speech found by PESQ's voice
        activity detection (e.g. a silent reference).
    """
    c, e = _pair(clean, est, sample_rate)
    if not np.any(c) or not np.any(e):
        raise AudioError("PESQ is undefined for a silent signal (clean or estimate is all zeros)")
    from pesq import PesqError, pesq

    try:
        return float(pesq(SAMPLE_RATE, c.astype(np.float64), e.astype(np.float64), "wb"))
    except PesqError as err:  # NoUtterancesError, BufferTooShortError, ...
        raise AudioError(f"PESQ failed: {type(err).__name__} ({err})") from None


def estoi(clean, est, *, sample_rate: int = SAMPLE_RATE) -> float:
    """Extended short-time objective intelligibility (ESTOI), 0 .. 1 (higher is better).

    Calls ``pystoi.stoi(clean, est, 16000, extended=True)`` (Jensen & Taal 2016): resampling to
    10 kHz, removal of frames more than 40 dB below the loudest clean frame, one-third octave
    bands, 384 ms segments, correlation of spectro-temporally normalised envelopes. Computed in
    float64. A signal identical to its reference gives 1.

    Raises
    ------
    AudioError : mismatched lengths, NaN/Inf, not 16 kHz, or too little speech (pystoi needs 30
        frames after silence removal; it would warn and return 1e-5, which we refuse to average).
    """
    c, e = _pair(clean, est, sample_rate)
    from pystoi import stoi

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            return float(stoi(c.astype(np.float64), e.astype(np.float64), SAMPLE_RATE, extended=True))
        except RuntimeWarning as w:
            raise AudioError(f"ESTOI is undefined here: {w}") from None


def si_snr(clean, est, *, sample_rate: int = SAMPLE_RATE) -> float:
    """Scale-invariant SNR in dB (Le Roux et al. 2019), computed in float64.

    With both signals made zero-mean (s = clean - mean, e = est - mean)::

        s_target = (<e, s> / <s, s>) s          the part of e along s
        e_noise  = e - s_target                 everything else
        SI-SNR   = 10 log10(|s_target|^2 / |e_noise|^2)

    The value does not change when ``est`` is scaled by any non-zero factor. An estimate that is
    exactly a scaled copy of ``clean`` gives ``+inf`` (no noise left); no epsilon is added, so
    every finite value is the exact ratio.

    Raises
    ------
    AudioError : a constant (silent) clean signal, for which no direction s exists; a constant
        estimate (nothing along s and nothing else: 0/0); mismatched lengths, NaN/Inf, not 16 kHz.
    """
    c, e = _pair(clean, est, sample_rate)
    s = c.astype(np.float64)
    s = s - s.mean()
    x = e.astype(np.float64)
    x = x - x.mean()
    ss = float(s @ s)
    if ss == 0.0:
        raise AudioError("SI-SNR is undefined for a silent (constant) clean signal")
    if not np.any(x):
        raise AudioError("SI-SNR is undefined for a silent (constant) estimate")
    target = (float(x @ s) / ss) * s
    noise = x - target
    pt, pn = float(target @ target), float(noise @ noise)
    if pn == 0.0:
        return math.inf
    if pt == 0.0:
        return -math.inf
    return 10.0 * math.log10(pt / pn)


# --------------------------------------------------------------------------------------------
# DNSMOS
# --------------------------------------------------------------------------------------------

# The P.835 model's raw outputs are mapped to the listener scale by these second-order
# polynomials (highest power first), the non-personalised calibration of the DNS Challenge.
P835_POLY = {
    "sig": (-0.08397278, 1.22083953, 0.0052439),
    "bak": (-0.13166888, 1.60915514, -0.39604546),
    "ovrl": (-0.06766283, 1.11546468, 0.04602535),
}
INPUT_LENGTH = 9.01  # s of audio per model call (the models' fixed input: 144160 samples)
_N_FFT_P808 = 321  # P.808 mel features: librosa melspectrogram(n_fft=frame_size + 1 = 321, ...)
_HOP_P808 = 160
_N_MELS_P808 = 120


def dnsmos_model_paths() -> tuple[Path, Path]:
    """(P.835 ``sig_bak_ovr.onnx``, P.808 ``model_v8.onnx``) inside the installed speechmos wheel.

    Found with ``importlib.util.find_spec`` without importing speechmos (whose ``__init__``
    imports requests and librosa); nothing is downloaded.
    """
    try:
        spec = importlib.util.find_spec("speechmos")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ParameterError('DNSMOS needs the ONNX models of the speechmos wheel: pip install -e ".[eval]" (or pip install speechmos)')
    for root in spec.submodule_search_locations:
        folder = Path(root) / "dnsmos_models"
        p835, p808 = folder / "sig_bak_ovr.onnx", folder / "model_v8.onnx"
        if p835.is_file() and p808.is_file():
            return p835, p808
    raise ParameterError(f"speechmos is installed but {Path(spec.submodule_search_locations[0]) / 'dnsmos_models'} lacks sig_bak_ovr.onnx / model_v8.onnx; reinstall speechmos")


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa ``hz_to_mel(htk=False)``): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_mel, logstep = 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = f >= 1000.0
    mels[log_t] = min_log_mel + np.log(f[log_t] / 1000.0) / logstep
    return mels


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    f = f_sp * m
    min_log_mel, logstep = 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = m >= min_log_mel
    f[log_t] = 1000.0 * np.exp(logstep * (m[log_t] - min_log_mel))
    return f


def _mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32: librosa ``filters.mel(sr, n_fft, n_mels)`` defaults
    (fmin 0, fmax sr/2, Slaney scale, Slaney area normalisation), with its float32 roundings."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sr / 2.0]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, len(fftfreqs)), np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    return (weights * enorm[:, None]).astype(np.float32)  # float64 product, cast back, as librosa


_MEL_BASIS = None


def p808_melspec(audio: np.ndarray) -> np.ndarray:
    """The P.808 model's input features for one segment: (frames, 120) float32.

    ``speechmos`` computes ``(librosa.power_to_db(melspectrogram(y, sr=16000, n_fft=321,
    hop_length=160, n_mels=120), ref=np.max) + 40) / 40`` transposed. Written out (librosa >=
    0.10 semantics, with its dtypes, so that the values agree to float32 rounding):

    1. centred frames: the signal is padded with 160 zeros at each end, frames of 321 samples at
       hop 160; each frame times the periodic Hann window of length 321 (float64), real FFT in
       float64, cast to complex64 (librosa's output dtype for float32 input);
    2. power |X|^2 (float32; float64 for float64 input, as librosa); 120 Slaney mel bands
       (float32 filterbank);
    3. 10 log10(max(P, 1e-10)) - 10 log10(max(max P, 1e-10)), floored at its maximum - 80 dB;
    4. (dB + 40) / 40.
    """
    global _MEL_BASIS
    if _MEL_BASIS is None:
        _MEL_BASIS = _mel_filterbank(SAMPLE_RATE, _N_FFT_P808, _N_MELS_P808)
    y = np.asarray(audio)
    pad = _N_FFT_P808 // 2
    yp = np.concatenate([np.zeros(pad, y.dtype), y, np.zeros(pad, y.dtype)])
    n_frames = 1 + (len(yp) - _N_FFT_P808) // _HOP_P808
    frames = np.lib.stride_tricks.sliding_window_view(yp, _N_FFT_P808)[:: _HOP_P808][:n_frames]
    window = scipy.signal.get_window("hann", _N_FFT_P808, fftbins=True)  # periodic Hann, float64
    # librosa keeps float64 input in float64 (complex128); float32 input gives complex64.
    ft = np.float64 if y.dtype == np.float64 else np.float32
    spec = np.fft.rfft(frames * window, axis=-1).astype(np.complex128 if ft is np.float64 else np.complex64)
    power = np.abs(spec) ** 2  # (frames, 161)
    mel = power @ _MEL_BASIS.T.astype(ft)  # (frames, 120); the filterbank itself is float32
    db = ft(10.0) * np.log10(np.maximum(ft(1e-10), mel))
    db -= ft(10.0) * np.log10(np.maximum(ft(1e-10), mel.max()))
    db = np.maximum(db, db.max() - ft(80.0))
    return ((db + ft(40.0)) / ft(40.0)).astype(np.float32)


def _poly(coeffs, x: float) -> float:
    """Horner evaluation in float64, highest power first (numpy.poly1d)."""
    y = 0.0
    for c in coeffs:
        y = y * x + c
    return y


class Dnsmos:
    """DNSMOS P.835 (SIG, BAK, OVRL) and P.808 (MOS) of a 16 kHz signal, without a reference.

    Holds one onnxruntime session per model, created once and reused for every call.

    The procedure of ``speechmos.dnsmos`` 0.0.1.1 (non-personalised), step for step:

    1. the signal is repeated (doubled) until it is at least 9.01 s (144160 samples) long;
    2. it is cut into 9.01 s segments every 1 s: ``floor(len / 16000) - 9.01`` truncated, + 1 of
       them; a segment shorter than 9.01 s is skipped;
    3. P.835: the raw float32 segment goes into ``sig_bak_ovr.onnx``; its three outputs are
       mapped by the polynomials :data:`P835_POLY`; P.808: :func:`p808_melspec` of the segment
       without its last 160 samples goes into ``model_v8.onnx``;
    4. each score is the mean over the segments.

    Parameters
    ----------
    intra_op_threads : onnxruntime threads per model call (default 1).
    """

    def __init__(self, *, intra_op_threads: int = 1):
        if isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int) or intra_op_threads < 1:
            raise ParameterError(f"intra_op_threads={intra_op_threads!r} must be an integer >= 1")
        import onnxruntime as ort

        self.p835_path, self.p808_path = dnsmos_model_paths()
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.p835 = ort.InferenceSession(os.fspath(self.p835_path), sess_options=so, providers=["CPUExecutionProvider"])
        self.p808 = ort.InferenceSession(os.fspath(self.p808_path), sess_options=so, providers=["CPUExecutionProvider"])

    def __call__(self, audio, *, sample_rate: int = SAMPLE_RATE) -> dict[str, float]:
        """{"sig", "bak", "ovrl", "p808"} of a mono float signal in [-1, 1].

        Raises
        ------
        AudioError : not 16 kHz, not mono, empty, NaN/Inf, or samples outside [-1, 1] (speechmos
            refuses those too: the models were trained on full-scale float audio).
        """
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate != SAMPLE_RATE:
            raise AudioError(f"sample_rate={sample_rate!r}: DNSMOS runs at {SAMPLE_RATE} Hz; resample first")
        audio = _signal(audio, "audio")
        if np.max(np.abs(audio)) > 1.0:
            raise AudioError(f"audio: DNSMOS needs samples in [-1, 1], got a peak of {float(np.max(np.abs(audio))):.3g}")
        fs = SAMPLE_RATE
        len_samples = int(INPUT_LENGTH * fs)
        while len(audio) < len_samples:
            audio = np.append(audio, audio)
        num_hops = int(np.floor(len(audio) / fs) - INPUT_LENGTH) + 1
        scores = {"sig": [], "bak": [], "ovrl": [], "p808": []}
        for idx in range(num_hops):
            # The same float expressions as speechmos, so the same integer bounds.
            seg = audio[int(idx * fs) : int((idx + INPUT_LENGTH) * fs)]
            if len(seg) < len_samples:
                continue
            raw = self.p835.run(None, {"input_1": seg.astype(np.float32)[None, :]})[0][0]
            mel = p808_melspec(seg[:-160])[None, :, :]
            p808 = self.p808.run(None, {"input_1": mel})[0][0][0]
            for key, r in zip(("sig", "bak", "ovrl"), raw):
                scores[key].append(_poly(P835_POLY[key], float(r)))
            scores["p808"].append(float(p808))
        return {k: float(np.mean(v)) for k, v in scores.items()}
