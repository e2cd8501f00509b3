"""Enhancer and Stream (npdgru.enhance) on real audio with the shipped NSNet2 weights.

* shapes, lengths and dtypes for mono, stereo and 8 / 44.1 / 48 kHz input; stereo channels are
  enhanced independently (bit for bit the mono result of each channel);
* bad input refused with AudioError (NaN/Inf, integers, empty, 3-D); silence and audio shorter
  than one frame work;
* the mask floor parameter is validated and honoured;
* streaming == offline delayed by 320 samples, bit for bit, over random chunk sizes (hypothesis);
* the two examples in examples/ run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npdgru import stft
from npdgru.enhance import ALGORITHMIC_LATENCY, DEFAULT_MASK_FLOOR_DB, Enhancer
from npdgru.errors import AudioError, ParameterError, WeightsError

REPO = Path(__file__).resolve().parents[1]
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"
SHIPPED = REPO / "weights" / "nsnet2.safetensors"
SR = 16000

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")


def _noisy_files() -> list[Path]:
    files = sorted(NOISY_DIR.glob("*.flac"))
    return files if files else [REPO / "examples" / "noisy_dishes_5db.flac"]


def _read(path: Path, seconds: float) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    assert sr == SR
    return np.ascontiguousarray(x[: int(seconds * SR), 0])


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """1 s of real noisy speech, float32 mono at 16 kHz."""
    return _read(_noisy_files()[0], 1.0)


@pytest.fixture(scope="module")
def speech2() -> np.ndarray:
    """1 s of another mixture (a second channel, a second utterance)."""
    files = _noisy_files()
    return _read(files[1 % len(files)], 1.0) if len(files) > 1 else _read(files[0], 2.0)[SR:]


@pytest.fixture(scope="module")
def enh100():
    return Enhancer(update_percent=100, exact=True)  # the bit-identity tests run in exact mode


@pytest.fixture(scope="module")
def enh50():
    return Enhancer(update_percent=50, exact=True)


@pytest.fixture(scope="module", params=[100, 50])
def enh(request, enh100, enh50):
    return enh100 if request.param == 100 else enh50


# ------------------------------------------------------------------------ shapes and rates


def test_mono(enh, speech):
    y = enh.enhance(speech, SR)
    assert y.shape == speech.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert 0 < np.sum(y**2) < np.sum(speech**2)  # something was removed, not everything
    assert not np.shares_memory(y, speech)


def test_float64_input_gives_float32(enh100, speech):
    y64 = enh100.enhance(speech.astype(np.float64), SR)
    assert y64.shape == speech.shape and y64.dtype == np.float32  # documented: float32 out
    assert np.array_equal(y64, enh100.enhance(speech, SR))  # cast once on entry


def test_stereo_channels_are_independent(enh, speech, speech2):
    x = np.stack([speech, speech2], axis=1)
    y = enh.enhance(x, SR)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(y[:, 0], enh.enhance(speech, SR))
    assert np.array_equal(y[:, 1], enh.enhance(speech2, SR))
    # A non-contiguous (Fortran-order) stereo array gives the same result.
    assert np.array_equal(enh.enhance(np.asfortranarray(x), SR), y)


def test_single_column_2d_stays_2d(enh100, speech):
    y = enh100.enhance(speech[:, None], SR)
    assert y.shape == (len(speech), 1)
    assert np.array_equal(y[:, 0], enh100.enhance(speech, SR))


def _one_shot(enh, x):
    """The offline pipeline written plainly: stft -> mask of all frames at once -> istft."""
    X = stft.stft(x)[:, None, :]
    return stft.istft(enh._apply(X, enh.model.init_state(1))[:, 0], len(x))


@pytest.mark.parametrize("block", [1, 7, 100, 101, 1000])
def test_blocked_offline_path_is_bit_identical(enh, speech, speech2, monkeypatch, block):
    """enhance() runs the model in blocks of frames (bounded memory); the blocks do not show."""
    import npdgru.enhance as enhance_mod

    want = _one_shot(enh, speech)
    monkeypatch.setattr(enhance_mod, "_BLOCK_FRAMES", block)
    assert np.array_equal(enh.enhance(speech, SR), want)
    y = enh.enhance(np.stack([speech, speech2], axis=1), SR)
    assert np.array_equal(y[:, 0], want) and np.array_equal(y[:, 1], _one_shot(enh, speech2))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_sample_rates(enh50, speech, rate):
    from scipy.signal import resample_poly

    x = resample_poly(speech[: SR // 2], rate, SR).astype(np.float32)  # 0.5 s at `rate`
    y = enh50.enhance(x, rate)
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    assert 0 < np.sum(y**2) < np.sum(x**2)
    stereo = np.stack([x, x[::-1]], axis=1)
    ys = enh50.enhance(stereo, rate)
    assert ys.shape == stereo.shape
    np.testing.assert_allclose(ys[:, 0], y, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 100, 159, 160, 161, 319, 320, 321])
def test_shorter_than_a_frame_and_boundaries(enh, speech, n):
    x = speech[:n]
    y = enh.enhance(x, SR)
    assert y.shape == (n,) and y.dtype == np.float32 and np.isfinite(y).all()


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_one_sample_at_other_rates(enh50, rate):
    y = enh50.enhance(np.array([0.25], np.float32), rate)
    assert y.shape == (1,) and np.isfinite(y).all()


def test_silence_gives_silence(enh):
    for x in (np.zeros(SR // 2, np.float32), np.zeros((SR // 4, 2), np.float32), np.zeros(1, np.float32)):
        y = enh.enhance(x, SR)
        assert y.shape == x.shape and np.isfinite(y).all()
        assert not y.any()  # X = 0 -> masked X = 0 -> y = 0 exactly
    y = enh.enhance(np.zeros(4410, np.float32), 44100)
    assert y.shape == (4410,) and np.isfinite(y).all() and not y.any()


def test_tiny_and_loud_signals_stay_finite(enh50, speech):
    for scale in (1e-30, 1e-8, 1.0, 100.0):
        y = enh50.enhance(speech[:4000] * np.float32(scale), SR)
        assert np.isfinite(y).all()


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(enh100, speech, bad):
    x = speech[:1000].copy()
    x[500] = bad
    with pytest.raises(AudioError, match="NaN or Inf"):
        enh100.enhance(x, SR)
    with pytest.raises(AudioError, match="NaN or Inf"):
        enh100.enhance(np.stack([speech[:1000], x], axis=1), SR)


@pytest.mark.parametrize(
    "audio, match",
    [
        (np.zeros(1000, np.int16), "integer samples"),
        (np.zeros(1000, np.int32), "integer samples"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((0, 2), np.float32), "empty"),
        (np.zeros((100, 0), np.float32), "empty"),
        (np.zeros((100, 2, 2), np.float32), r"\(samples,\) or \(samples, channels\)"),
        (np.float32(0.5), r"\(samples,\) or \(samples, channels\)"),
        (np.array(["a", "b"]), "numeric"),
        (np.zeros(10, np.complex64), "numeric"),
    ],
)
def test_bad_arrays_refused(enh100, audio, match):
    with pytest.raises(AudioError, match=match):
        enh100.enhance(audio, SR)


@pytest.mark.parametrize("rate", [0, 999, -16000, 16000.0, "16000", None, True])
def test_bad_sample_rate_refused(enh100, speech, rate):
    with pytest.raises(AudioError, match="sample_rate"):
        enh100.enhance(speech[:100], rate)


@pytest.mark.parametrize("P", [0, -5, 100.01, 1000, float("nan"), float("inf"), "50"])  # None: the model's own P
def test_update_percent_out_of_range(P):
    with pytest.raises(ParameterError, match="update_percent"):
        Enhancer(update_percent=P)


@pytest.mark.parametrize("backend", ["gpu", "", "CPU"])
def test_unknown_backend(backend):
    with pytest.raises(ParameterError, match="backend"):
        Enhancer(backend=backend)


def test_bad_weights_path(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors"):
        Enhancer(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------ mask floor


@pytest.mark.parametrize("floor", [0.5, 1, float("nan"), float("inf"), float("-inf"), "-80", None])
def test_mask_floor_validated(floor):
    with pytest.raises(ParameterError, match="mask_floor_db"):
        Enhancer(mask_floor_db=floor)


def test_mask_floor_default_is_nsnet2():
    assert DEFAULT_MASK_FLOOR_DB == -80.0
    e = Enhancer()
    assert e.mask_floor_db == -80.0 and e.mask_floor == np.float32(1e-4)


def test_mask_floor_zero_is_identity(speech):
    """Floor 0 dB clips every mask to 1: the output is the STFT round trip of the input."""
    y = Enhancer(update_percent=50, mask_floor_db=0).enhance(speech, SR)
    np.testing.assert_allclose(y, speech, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(y, stft.istft(stft.stft(speech), len(speech)))


@pytest.mark.parametrize("floor", [-80.0, -20.0, -6.0])
def test_mask_floor_bounds_the_gain(speech, floor):
    """Every bin's gain |Y|/|X| lies in [10^(floor/20), 1], and the floor is reached at -6 dB."""
    e = Enhancer(update_percent=100, mask_floor_db=floor)
    X = stft.stft(speech)[:, None, :]
    Y = e._apply(X, e.model.init_state(1))
    nz = np.abs(X) > 1e-6
    gain = np.abs(Y)[nz] / np.abs(X)[nz]
    lo = 10.0 ** (floor / 20.0)
    assert gain.min() >= lo * (1 - 1e-5) and gain.max() <= 1 + 1e-5
    if floor == -6.0:
        assert np.isclose(gain.min(), lo, rtol=1e-5)


def test_mask_floor_changes_noise_energy():
    """On pure noise a -80 dB floor removes (much) more energy than a -6 dB floor."""
    noise = (0.05 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)
    e_in = np.sum(noise**2)
    e80 = np.sum(Enhancer(update_percent=50, mask_floor_db=-80).enhance(noise, SR) ** 2)
    e6 = np.sum(Enhancer(update_percent=50, mask_floor_db=-6).enhance(noise, SR) ** 2)
    assert e80 < e6 < e_in
    assert e80 < 0.1 * e_in  # NSNet2 suppresses stationary white noise by > 10 dB
    assert e6 >= 10 ** (-6 / 10) * e_in * 0.9  # the floor limits suppression to ~6 dB


# ------------------------------------------------------------------------------- streaming


def _run_stream(stream, x, sizes):
    """Feed ``x`` in chunks cycling through ``sizes``; return concat(outputs + flush)."""
    out, i, k = [], 0, 0
    while i < len(x):
        size = sizes[k % len(sizes)]
        k += 1
        if k % len(sizes) == 0 and not any(sizes):  # all zero sizes: feed the rest at once
            size = len(x) - i
        chunk = x[i:i + size]
        y = stream.process(chunk)
        assert y.dtype == np.float32 and y.shape == (len(chunk),)
        out.append(y)
        i += len(chunk)
    out.append(stream.flush())
    return np.concatenate(out)


_offline_cache: dict = {}


def _offline(enh, x):
    key = (enh.update_percent, len(x))
    if key not in _offline_cache:
        _offline_cache[key] = enh.enhance(x, SR)
    return _offline_cache[key]


@settings(deadline=None, max_examples=75, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=40), n=st.one_of(st.just(SR), st.integers(1, SR)))
def test_stream_equals_offline(enh, speech, sizes, n):
    x = speech[:n]
    L = ALGORITHMIC_LATENCY
    got = _run_stream(enh.stream(), x, sizes)
    assert len(got) == n + L
    assert not got[:L].any()  # the latency is silence
    assert np.array_equal(got[L:L + n], _offline(enh, x))


def test_stream_latency_constant():
    assert ALGORITHMIC_LATENCY == 320 == Enhancer.stream(Enhancer()).latency


def test_flush_resets_the_stream(enh, speech, speech2):
    s = enh.stream()
    first = _run_stream(s, speech, [160])
    second = _run_stream(s, speech2, [333, 17])  # same stream object, after flush
    fresh = _run_stream(enh.stream(), speech2, [1000])
    assert np.array_equal(second, fresh)
    assert np.array_equal(first[320:], enh.enhance(speech, SR))
    assert np.array_equal(second[320:], enh.enhance(speech2, SR))


def test_flush_without_input(enh100):
    s = enh100.stream()
    y = s.flush()
    assert y.shape == (320,) and not y.any()
    assert s.process(np.zeros(0, np.float32)).shape == (0,)
    assert s.flush().shape == (320,)


def test_streams_do_not_share_state(enh50, speech, speech2):
    a, b = enh50.stream(), enh50.stream()
    out_a, out_b = [], []
    for i in range(0, SR, 160):  # interleaved calls
        out_a.append(a.process(speech[i:i + 160]))
        out_b.append(b.process(speech2[i:i + 160]))
    out_a.append(a.flush())
    out_b.append(b.flush())
    assert np.array_equal(np.concatenate(out_a)[320:], enh50.enhance(speech, SR))
    assert np.array_equal(np.concatenate(out_b)[320:], enh50.enhance(speech2, SR))


def test_stream_rejects_bad_chunks_and_keeps_going(enh50, speech):
    s = enh50.stream()
    out = [s.process(speech[:4000])]
    with pytest.raises(AudioError, match="mono"):
        s.process(np.zeros((160, 2), np.float32))
    bad = speech[4000:4160].copy()
    bad[3] = np.nan
    with pytest.raises(AudioError, match="NaN or Inf"):
        s.process(bad)
    with pytest.raises(AudioError, match="NaN or Inf"):
        s.process(np.array([np.inf], np.float32))
    with pytest.raises(AudioError, match="integer"):
        s.process(np.zeros(160, np.int16))
    # A refused chunk changes nothing: the stream still gives the offline result.
    out += [s.process(speech[4000:]), s.flush()]
    assert np.array_equal(np.concatenate(out)[320:], enh50.enhance(speech, SR))


# -------------------------------------------------------------------------------- examples


def _run_example(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)  # this checkout's npdgru
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_example_enhance_file(tmp_path):
    out = _run_example("examples/enhance_file.py", str(tmp_path))
    assert "P=100" in out and "P= 50" in out and "SNR" in out
    assert (tmp_path / "enhanced_P100.wav").is_file() and (tmp_path / "enhanced_P50.wav").is_file()


def test_example_streaming():
    out = _run_example("examples/streaming.py", "--update-percent", "50")
    assert "bit for bit: True" in out and "us per call" in out


# ------------------------------------------------------------------ files in bounded memory


@pytest.mark.parametrize("rates", [(44100, 16000), (16000, 44100), (48000, 16000), (16000, 22050), (8000, 16000), (11025, 16000)])
def test_block_fed_resampler_equals_resample_poly(rates):
    """The block-fed resampler hands out the bits of resample_poly on the whole signal, for block
    sizes below, around and above its filter's support."""
    from npdgru.resample import BlockResampler as _Resampler
    from npdgru.resample import resample_signal as _resample

    x = np.random.default_rng(3).standard_normal((20000, 2)).astype(np.float32)
    want = _resample(x, *rates)
    for block in (331, 997, 4410, 30000):
        r = _Resampler(*rates, 2)
        got = np.concatenate([r.push(x[s : s + block]) for s in range(0, len(x), block)] + [r.finish()])
        assert got.shape == want.shape and np.array_equal(got, want), (rates, block)


def _file(tmp_path, x, rate, name="x.wav"):
    import soundfile as sf

    path = tmp_path / name
    sf.write(path, x, rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("rate, channels", [(16000, 1), (16000, 2), (44100, 2), (8000, 1)])
def test_file_in_blocks_equals_the_whole_file(enh50, tmp_path, monkeypatch, rate, channels):
    """enhance_file reads, enhances and writes in blocks (here 0.3 s, the model's step lowered to
    37 frames so that the blocks cross several steps): the output has the bits of
    Enhancer.enhance on the whole file, at 16 kHz and through the resamplers, mono and stereo;
    a file no longer than one block goes through Enhancer.enhance itself."""
    import soundfile as sf

    import npdgru.enhance as E

    monkeypatch.setattr(E, "_BLOCK_FRAMES", 37)
    speech = _read(_noisy_files()[0], 2.0)
    n = int(2.3 * rate)
    x = np.stack([np.resize(speech, n), np.resize(speech[::-1], n)], axis=1)[:, :channels] * np.float32(0.8)
    src = _file(tmp_path, x, rate)
    want = enh50.enhance(sf.read(src, dtype="float32", always_2d=True)[0], rate)
    for block_seconds in (0.3, 1.0, 10.0):
        dst = tmp_path / f"y{block_seconds}.wav"
        with E.AudioInput(src) as a:
            done = E.enhance_file(enh50, a, dst, subtype="FLOAT", block_seconds=block_seconds)
        got = sf.read(dst, dtype="float32", always_2d=True)[0]
        assert got.shape == want.shape and np.array_equal(got, want), (rate, channels, block_seconds)
        assert done["warnings"] == [] and done["compute"] > 0


def test_file_in_blocks_holds_bounded_memory(enh100, tmp_path, monkeypatch):
    """The block path's peak allocation (tracemalloc, which sees NumPy's buffers) does not grow
    with the file: the same for 15 s and 45 s in 2 s blocks, and below the 45 s file's samples
    as float32, while the whole-file path's peak holds several copies of them."""
    import tracemalloc

    import npdgru.enhance as E

    monkeypatch.setattr(E, "_BLOCK_FRAMES", 100)
    speech = _read(_noisy_files()[0], 2.0)

    def peak(seconds, block_seconds):
        src = _file(tmp_path, np.resize(speech, seconds * SR), SR)
        tracemalloc.start()
        try:
            with E.AudioInput(src) as a:
                E.enhance_file(enh100, a, tmp_path / "y.wav", block_seconds=block_seconds)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(3, 2.0)  # the model's buffers for one channel, made once
    short, long = peak(15, 2.0), peak(45, 2.0)
    samples = 45 * SR * 4  # bytes of the 45 s file as float32
    assert long < 1.1 * short and long < samples, (short, long, samples)
    assert peak(45, 60.0) > 2 * samples  # one block: the whole file, as before


def test_input_identity_is_of_the_bytes_read(tmp_path):
    """sha256, size and mtime come from the open file that was decoded: a file replaced by a
    rename meanwhile does not change them; a file written to while it is read is refused."""
    import hashlib

    import npdgru.enhance as E

    x = np.resize(_read(_noisy_files()[0], 1.0), 3 * SR)
    src = _file(tmp_path, x, SR)
    data, st = src.read_bytes(), src.stat()
    with E.AudioInput(src) as a:
        got = np.concatenate(list(a.blocks(SR)))
        _file(tmp_path, x[:1000], SR, "new.wav").replace(src)  # an edit by rename, after the read
        assert a.identity() == (hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns)
    assert got.shape == (3 * SR, 1)
    with E.AudioInput(src) as a:  # now the small file; written to in place between two blocks
        blocks = a.blocks(100)
        next(blocks)
        with open(src, "ab") as f:
            f.write(b"\0" * 64)
        list(blocks)
        with pytest.raises(AudioError, match="changed while it was read"):
            a.identity()


def test_unreadable_input_says_permission_denied(tmp_path, monkeypatch):
    """An input the process may not read is 'Permission denied', naming the file (libsndfile
    said 'System error.'). As root, chmod 000 does not stop a read: the refusal is simulated."""
    import npdgru.enhance as E

    src = _file(tmp_path, np.zeros(1600, np.float32), SR)
    if os.geteuid() == 0:
        real_open = os.open

        def refusing_open(path, *a, **k):
            if os.fspath(path) == str(src):
                raise PermissionError(13, "Permission denied")
            return real_open(path, *a, **k)

        monkeypatch.setattr(os, "open", refusing_open)
    else:
        src.chmod(0)
    with pytest.raises(AudioError) as e:
        E.AudioInput(src)
    assert "Permission denied" in str(e.value) and str(src) in str(e.value)


def test_output_bits_do_not_depend_on_the_number_of_blas_threads():
    """The cpu backend's BLAS products run on one thread whatever the process allows: OpenBLAS
    splits a product's rows among its threads, and on a Zen 3 EPYC (its Haswell kernels) the
    split changed the last bit of 9 of the example file's 42240 samples (1 against 2 threads)."""
    import soundfile as sf
    from threadpoolctl import threadpool_info, threadpool_limits

    if not any(i["user_api"] == "blas" for i in threadpool_info()):
        pytest.skip("no BLAS library found by threadpoolctl")
    x, sr = sf.read(Path(__file__).parent.parent / "examples" / "noisy_dishes_5db.flac", dtype="float32")
    enh = Enhancer(update_percent=100)
    outs = []
    for n in (1, 2, 4):
        with threadpool_limits(limits=n, user_api="blas"):
            outs.append(enh.enhance(x, sr))
            assert all(i["num_threads"] == n for i in threadpool_info() if i["user_api"] == "blas")  # left as it was
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
