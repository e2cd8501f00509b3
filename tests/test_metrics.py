"""Speech-quality metrics (npdgru.evaluate.metrics) against known values and independent code.

* PESQ / ESTOI / SI-SNR of a clean file against itself: the scales' maxima (4.644, 1, +inf).
* SI-SNR of constructed signals whose answer is known in closed form (orthogonal sinusoids over
  whole periods), its scale and offset invariance.
* PESQ, ESTOI and SI-SNR fall as white noise is added to real speech.
* DNSMOS equals speechmos 0.0.1.1's own computation (``speechmos.dnsmos.run``, which uses
  librosa for the P.808 features), and our P.808 features equal librosa's.
* Bad inputs give AudioError / ParameterError with a message that says what is wrong.

Needs the eval extra (pesq, pystoi, onnxruntime, speechmos); the speechmos reference tests also
need librosa and requests, which speechmos imports and npdgru does not.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pesq", reason="eval extra missing: pip install -e '.[eval]'")
pytest.importorskip("pystoi", reason="eval extra missing: pip install -e '.[eval]'")
pytest.importorskip("onnxruntime", reason="eval extra missing: pip install -e '.[eval]'")

from npdgru.errors import AudioError, ParameterError  # noqa: E402
from npdgru.evaluate.metrics import Dnsmos, estoi, p808_melspec, pesq_wb, si_snr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLEAN = REPO / "examples" / "clean_dishes_5db.flac"
NOISY = REPO / "examples" / "noisy_dishes_5db.flac"
SR = 16000
HAVE_SPEECHMOS = importlib.util.find_spec("speechmos") is not None


def _read(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32")
    assert sr == SR and x.ndim == 1
    return x


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return _read(CLEAN)


@pytest.fixture(scope="module")
def noisy() -> np.ndarray:
    return _read(NOISY)


@pytest.fixture(scope="module")
def dnsmos():
    if not HAVE_SPEECHMOS:
        pytest.skip("speechmos (the DNSMOS ONNX models) is not installed: pip install -e '.[eval]'")
    return Dnsmos()


def _speechmos():
    """speechmos.dnsmos, the reference; it imports librosa and requests at import time."""
    for mod in ("speechmos", "librosa", "requests"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"reference speechmos.dnsmos needs {mod}, which is not installed")
    import speechmos.dnsmos

    return speechmos.dnsmos


# ------------------------------------------------------------------------------ identity


def test_clean_against_itself(clean):
    assert pesq_wb(clean, clean) == pytest.approx(4.644, abs=0.005)  # the P.862.2 maximum
    assert estoi(clean, clean) == pytest.approx(1.0, abs=1e-9)
    assert si_snr(clean, clean) == math.inf


# ------------------------------------------------------------------------------ SI-SNR


def _tones(n=16000, k_s=50, k_n=73):
    """s and n: cosines with whole numbers of periods in n samples: zero mean, orthogonal."""
    t = np.arange(n) / n
    s = np.cos(2 * np.pi * k_s * t)
    v = np.sin(2 * np.pi * k_n * t)
    return s, v


def test_si_snr_known_values():
    s, v = _tones()
    # est = s + g v with <s, v> = 0: SI-SNR = 10 log10(|s|^2 / (g^2 |v|^2)) = -20 log10(g).
    for g, want in ((0.1, 20.0), (1.0, 0.0), (10 ** (-7.5 / 20), 7.5), (3.0, -20 * math.log10(3.0))):
        assert si_snr(s, s + g * v) == pytest.approx(want, abs=1e-9), g
    # A scaled target: est = a s + g v gives 10 log10(a^2 / g^2); with a = 0.5, g = 0.05: 20 dB.
    assert si_snr(s, 0.5 * s + 0.05 * v) == pytest.approx(20.0, abs=1e-9)
    # Nothing of s in the estimate: <v, s> is 0 up to rounding, so the ratio is (nearly) zero.
    assert si_snr(s, v) < -200.0


def test_si_snr_scale_and_offset_invariance(clean, noisy):
    ref = si_snr(clean, noisy)
    assert math.isfinite(ref)
    for a in (1e-3, 0.25, 7.0, -2.0):
        assert si_snr(clean, (a * noisy.astype(np.float64))) == pytest.approx(ref, abs=1e-9), a
    assert si_snr(clean, noisy.astype(np.float64) + 0.01) == pytest.approx(ref, abs=1e-9)  # zero-mean first
    assert si_snr(clean.astype(np.float64) - 0.02, noisy) == pytest.approx(ref, abs=1e-9)


def test_si_snr_is_computed_in_float64():
    s, v = _tones()
    g = 1e-4  # 80 dB: far below float32 resolution of the residual if it were computed in float32
    assert si_snr(s, s + g * v) == pytest.approx(80.0, abs=1e-6)


# ------------------------------------------------------------------------------ noise


def test_quality_falls_with_noise(clean):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(clean.size)
    p_s = float(np.mean(clean.astype(np.float64) ** 2))
    scores = []
    for snr in (30.0, 15.0, 5.0, -5.0):
        g = math.sqrt(p_s / 10 ** (snr / 10) / np.mean(w**2))
        est = (clean + g * w).astype(np.float32)
        scores.append((snr, pesq_wb(clean, est), estoi(clean, est), si_snr(clean, est)))
    for (snr0, p0, e0, s0), (snr1, p1, e1, s1) in zip(scores, scores[1:]):
        assert p1 < p0, (snr1, p1, p0)
        assert e1 < e0, (snr1, e1, e0)
        assert s1 < s0, (snr1, s1, s0)
    for snr, _, _, s in scores:  # white noise is nearly orthogonal to speech: SI-SNR ~ SNR
        assert s == pytest.approx(snr, abs=0.3), snr
    assert scores[0][1] > 2.5 and scores[-1][1] < 1.5  # PESQ: mild vs heavy noise
    assert scores[0][2] > 0.9 and scores[-1][2] < 0.5  # ESTOI likewise


# ------------------------------------------------------------------------------ DNSMOS


def test_p808_features_equal_librosa(noisy):
    librosa = pytest.importorskip("librosa", reason="librosa (reference for the P.808 features) not installed")
    for y in (noisy[:-160], noisy.astype(np.float64)[:-160], noisy[: 3 * SR + 7]):
        want = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=321, hop_length=160, n_mels=120)
        want = ((librosa.power_to_db(want, ref=np.max) + 40) / 40).T.astype(np.float32)
        got = p808_melspec(y)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"dtype {y.dtype}, {len(y)} samples")


@pytest.mark.parametrize("case", ["example_2.6s", "concatenated_12.5s_float64"])
def test_dnsmos_equals_speechmos(dnsmos, case, clean, noisy):
    """The 2.6 s example runs one 9.01 s segment (repeated audio); 12.5 s runs four (hops of 1 s)."""
    ref = _speechmos()
    if case == "example_2.6s":
        x = noisy
    else:
        x = np.concatenate([noisy, clean, noisy, clean, noisy])[: int(12.5 * SR)].astype(np.float64)
    got = dnsmos(x)
    want = ref.run(x, SR)
    for ours, theirs in (("sig", "sig_mos"), ("bak", "bak_mos"), ("ovrl", "ovrl_mos"), ("p808", "p808_mos")):
        assert got[ours] == pytest.approx(float(want[theirs]), abs=1e-5), (case, ours, got, want)
    assert 1.0 <= got["ovrl"] <= 5.0 and 1.0 <= got["p808"] <= 5.0


def test_dnsmos_ranks_clean_above_noisy(dnsmos, clean, noisy):
    c, n = dnsmos(clean), dnsmos(noisy)
    assert c["bak"] > n["bak"] + 1.0 and c["ovrl"] > n["ovrl"] + 0.5, (c, n)


def test_dnsmos_does_not_import_speechmos():
    if not HAVE_SPEECHMOS:
        pytest.skip("speechmos is not installed")
    code = ("import sys; from npdgru.evaluate.metrics import Dnsmos; d = Dnsmos(); "
            "print(sorted(m for m in ('speechmos', 'librosa', 'requests') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("fn", [pesq_wb, estoi, si_snr], ids=["pesq", "estoi", "si_snr"])
def test_bad_pairs(fn, clean):
    with pytest.raises(AudioError, match="same length"):
        fn(clean, clean[:-1])
    bad = clean.copy()
    bad[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        fn(clean, bad)
    with pytest.raises(AudioError, match="16000 Hz"):
        fn(clean, clean, sample_rate=8000)
    with pytest.raises(AudioError, match="float"):
        fn((clean * 32767).astype(np.int16), (clean * 32767).astype(np.int16))
    with pytest.raises(AudioError, match="mono"):
        fn(np.stack([clean, clean], 1), np.stack([clean, clean], 1))
    with pytest.raises(AudioError, match="empty"):
        fn(np.zeros(0, np.float32), np.zeros(0, np.float32))


def test_silence_is_refused(clean):
    z = np.zeros_like(clean)
    with pytest.raises(AudioError, match="silent"):
        si_snr(z, clean)
    with pytest.raises(AudioError, match="silent"):
        si_snr(clean, z)
    with pytest.raises(AudioError, match="silent"):
        pesq_wb(z, clean)


def test_estoi_too_short_is_an_error(clean):
    with pytest.raises(AudioError, match="ESTOI"):
        estoi(clean[:1600], clean[:1600])  # 0.1 s: fewer than 30 frames at 10 kHz


def test_dnsmos_bad_input(dnsmos, noisy):
    with pytest.raises(AudioError, match=r"\[-1, 1\]"):
        dnsmos(noisy * 4.0)
    with pytest.raises(AudioError, match="16000 Hz"):
        dnsmos(noisy, sample_rate=48000)
    with pytest.raises(AudioError, match="NaN"):
        dnsmos(np.full(100, np.nan, np.float32))
    with pytest.raises(ParameterError, match="intra_op_threads"):
        Dnsmos(intra_op_threads=0)
