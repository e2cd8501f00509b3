"""Streaming at any sample rate and channel count: the streaming resampler against
``scipy.signal.resample_poly``, ``Stream(sample_rate=, channels=)`` against the offline path, and
``npdgru stream`` through real pipes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from npdgru import Enhancer
from npdgru.errors import AudioError, ParameterError
from npdgru.resample import StreamResampler

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "noisy_dishes_5db.flac"


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, sr = sf.read(EXAMPLE, dtype="float32")
    return np.ascontiguousarray(x[: int(1.5 * sr)])


@pytest.mark.parametrize("rate_in, rate_out", [(48000, 16000), (16000, 48000), (44100, 16000), (16000, 44100), (22050, 16000), (8000, 16000), (16000, 16000)])
def test_resampler_matches_resample_poly_for_any_chunking(rate_in, rate_out):
    rng = np.random.default_rng(rate_in + rate_out)
    x = rng.standard_normal((2500, 2)).astype(np.float32)
    r = StreamResampler(rate_in, rate_out, 2)
    outs, i = [], 0
    while i < len(x):
        k = int(rng.integers(0, 400))  # empty chunks too
        outs.append(r.process(x[i : i + k]))
        i = min(i + k, len(x))
        assert sum(map(len, outs)) == max(0, -(-i * r.up // r.down) - r.delay)  # emits all its input allows
    outs.append(r.process(np.zeros((r.pending_inputs(r.delay + 1), 2))))  # the tail: zeros after the end
    y = np.concatenate(outs)
    ref = resample_poly(x, rate_out, rate_in, axis=0)
    assert len(y) >= len(ref)
    np.testing.assert_allclose(y[: len(ref)], ref, atol=2e-6, rtol=0, err_msg=f"{rate_in} -> {rate_out}")


@pytest.mark.parametrize("up, down", [(1, 3), (3, 1), (160, 441), (441, 160), (2, 3)])
def test_polyphase_kernel_matches_its_numpy_twin(up, down):
    from npdgru.resample import _polyphase, polyphase_numpy

    rng = np.random.default_rng(up * 1000 + down)
    K, C, m0 = 7, 3, 5
    taps = rng.standard_normal((up, K))
    base = (m0 * down) // up - (K - 1)  # the first output reaches back to buf row 0
    m1 = m0 + 40
    buf = rng.standard_normal(((m1 * down) // up - base + 1, C))
    got = np.empty((m1 - m0, C))
    _polyphase(buf, taps, m0, m1, up, down, base, got)
    np.testing.assert_allclose(got, polyphase_numpy(buf, taps, m0, m1, up, down, base), rtol=1e-12, atol=1e-12, err_msg=f"up={up} down={down}")


@pytest.mark.parametrize("rate, channels", [(16000, 2), (48000, 1), (44100, 2), (8000, 1)])
def test_stream_at_any_rate_equals_offline_delayed(speech, rate, channels):
    """At P = 100 (no select gate to flip on a rounding difference) the stream is the offline
    output delayed by ``latency``, to the resampler's float rounding, except the last 10 ms
    (offline cuts the 16 kHz signal before resampling back, the stream does not). ``exact``:
    offline products in the streaming hop's column order, so 16 kHz compares bit for bit."""
    enh = Enhancer(update_percent=100, exact=True)
    x = resample_poly(speech, rate, 16000).astype(np.float32)
    if channels == 2:
        x = np.stack([x, 0.5 * x[::-1]], axis=1)
    st = enh.stream(sample_rate=rate, channels=channels)
    rng = np.random.default_rng(rate)
    outs, i = [], 0
    while i < len(x):
        k = int(rng.integers(1, rate // 40))
        y = st.process(x[i : i + k])
        assert y.shape == x[i : i + k].shape
        outs.append(y)
        i += k
    tail = st.flush()
    assert tail.shape[0] == st.latency
    y = np.concatenate(outs + [tail])
    L, e = st.latency, rate // 100
    assert np.all(y[: L // 2] == 0)  # silence first (the resampler rings a few samples before L)
    ref = enh.enhance(x, rate)
    if rate == 16000:
        assert np.array_equal(y[L : L + len(x)], ref)  # each channel is the mono stream: bit for bit
    else:
        np.testing.assert_allclose(y[L : L + len(x) - e], ref[:-e], atol=2e-5, rtol=0)
    assert st.latency == {16000: 320, 48000: 1024, 44100: 941, 8000: 182}[rate]


def test_stream_at_48k_default_p_close_to_offline(speech):
    enh = Enhancer()  # P = 50: the select gate may flip on a rounding difference; the output stays close
    x = resample_poly(speech, 3, 1).astype(np.float32)
    st = enh.stream(sample_rate=48000)
    y = np.concatenate([st.process(x[i : i + 480]) for i in range(0, len(x), 480)] + [st.flush()])
    ref = enh.enhance(x, 48000)
    err = y[st.latency : st.latency + len(x)] - ref
    assert 10 * np.log10(np.sum(ref**2) / np.sum(err**2)) > 40


def test_stream_refuses_bad_chunks_and_options():
    enh = Enhancer()
    st = enh.stream(sample_rate=48000, channels=2)
    with pytest.raises(AudioError, match=r"\(k, 2\)"):
        st.process(np.zeros(480, np.float32))
    bad = np.zeros((480, 2), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        st.process(bad)
    assert st.process(np.zeros((0, 2), np.float32)).shape == (0, 2)  # left as it was
    with pytest.raises(AudioError, match="sample_rate"):
        enh.stream(sample_rate=500)
    with pytest.raises(ParameterError, match="channels"):
        enh.stream(channels=0)


@pytest.mark.parametrize("rate, channels", [(48000, 1), (16000, 2), (44100, 2)])
def test_stream_batch_at_any_rate_equals_offline_delayed(speech, rate, channels):
    enh = Enhancer(update_percent=100, exact=True)
    x = resample_poly(speech, rate, 16000).astype(np.float32)
    if channels == 2:
        x = np.stack([x, 0.5 * x[::-1]], axis=1)
    hop = rate // 100
    x = x[: len(x) // hop * hop]
    sb = enh.stream_batch(sample_rate=rate, channels=channels)
    assert sb.hop == hop
    a = sb.add()
    ya, yb, b = [], [], None
    for k, i in enumerate(range(0, len(x), hop)):
        if k == 20:
            b = sb.add()  # joins later: a's output does not change (checked against a alone below)
        chunks = {a: x[i : i + hop]}
        if b is not None:
            chunks[b] = x[::-1][i : i + hop].copy()
        out = sb.process(chunks)
        ya.append(out[a])
        if b is not None:
            yb.append(out[b])
    ya = np.concatenate(ya + [sb.remove(a, flush=True)])
    L, e = sb.latency, rate // 100
    assert len(ya) == len(x) + L and sb.ids == [b]
    ref = enh.enhance(x, rate)
    if rate == 16000:
        assert np.array_equal(ya[L : L + len(x)], ref)
    else:
        np.testing.assert_allclose(ya[L : L + len(x) - e], ref[:-e], atol=2e-5, rtol=0)
    alone = enh.stream_batch(sample_rate=rate, channels=channels)
    s = alone.add()
    ys = np.concatenate([alone.process({s: x[i : i + hop]})[s] for i in range(0, len(x), hop)] + [alone.remove(s, flush=True)])
    assert np.array_equal(ys, ya)  # bit for bit what it gets alone


def test_stream_batch_at_a_rate_refuses_one_bad_hop_alone():
    from npdgru import StreamInputError

    sb = Enhancer().stream_batch(sample_rate=48000, channels=2)
    a, b = sb.add(), sb.add()
    good = np.zeros((480, 2), np.float32)
    with pytest.raises(StreamInputError) as e:
        sb.process({a: good, b: np.zeros((160, 2), np.float32)})
    assert list(e.value.outputs) == [a] and "(480, 2)" in str(e.value)
    with pytest.raises(ParameterError, match="multiple of 100"):
        Enhancer().stream_batch(sample_rate=22050)


# ----------------------------------------------------------------------------- npdgru stream


def npdgru(*argv, stdin: bytes):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "npdgru", *map(str, argv)], input=stdin, capture_output=True, env=env, timeout=300, cwd=REPO)
    return p.returncode, p.stdout, p.stderr.decode()


def test_npdgru_stream_wav_16k_pipe_equals_offline(speech):
    b = io.BytesIO()
    sf.write(b, speech, 16000, format="WAV", subtype="FLOAT")
    status, out, err = npdgru("stream", "-P", "100", stdin=b.getvalue())
    assert status == 0, err
    y, sr = sf.read(io.BytesIO(out), dtype="float32")  # a WAV of unknown length, read to its end
    assert sr == 16000 and y.shape == speech.shape
    assert np.array_equal(y, Enhancer(update_percent=100, exact=True).enhance(speech, 16000))  # aligned: the delay is dropped
    assert "npdgru stream: 1.50 s, 1 ch, 16000 Hz" in err and "latency 320 samples (20.0 ms)" in err and "real-time factor" in err


def test_npdgru_stream_raw_48k_stereo_pipe(speech):
    x = resample_poly(speech, 3, 1).astype(np.float32)
    x = np.stack([x, 0.5 * x[::-1]], axis=1)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    status, out, err = npdgru("stream", "--format", "raw", "--rate", 48000, "--channels", 2, "-P", "100", "--keep-latency", stdin=pcm.tobytes())
    assert status == 0, err
    y = np.frombuffer(out, "<i2").reshape(-1, 2).astype(np.float32) / 32768
    L = 1024  # Stream(sample_rate=48000).latency
    assert len(y) == len(x) + L and np.all(y[: L // 2] == 0)
    ref = Enhancer(update_percent=100).enhance(pcm.astype(np.float32) / 32768, 48000)
    assert np.max(np.abs(y[L : L + len(x) - 480] - ref[:-480])) <= 2 / 32768


def test_npdgru_stream_carries_state_across_reads():
    """A pipe delivers the input in pieces: the output is the same as from one piece."""
    rng = np.random.default_rng(3)
    pcm = (rng.standard_normal(8000) * 3000).astype("<i2").tobytes()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "npdgru", "stream", "--format", "raw", "--rate", "16000", "--channels", "1", "-q"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    for k in range(0, len(pcm), 1234):  # odd sizes: pieces end inside samples and hops
        p.stdin.write(pcm[k : k + 1234])
        p.stdin.flush()
    p.stdin.close()
    out = p.stdout.read()
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    status, whole, err = npdgru("stream", "--format", "raw", "--rate", 16000, "--channels", 1, "-q", stdin=pcm)
    assert status == 0 and out == whole and len(out) == len(pcm) and err == ""


@pytest.mark.parametrize("argv, stdin, needle", [
    (["stream"], b"", "no data"),
    (["stream"], b"hello world, not a wav", "not a WAV header"),
    (["stream", "--format", "raw"], b"\0\0", "--rate"),
    (["stream", "--format", "raw", "--rate", "500", "--channels", "1"], b"\0\0", "sample rate"),
    (["stream", "--rate", "16000"], b"", "raw PCM"),
], ids=["empty", "garbage", "raw-needs-rate", "bad-rate", "rate-with-wav"])
def test_npdgru_stream_errors(capsysbinary, monkeypatch, argv, stdin, needle):
    from npdgru.cli import main

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))  # in this process: the pipes are tested above
    status = main(argv)
    out, err = capsysbinary.readouterr()
    err = err.decode()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("npdgru: error: ") and needle in lines[0], err
    assert out == b""


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
@pytest.mark.parametrize("channels", [1, 3])  # 3 channels: libsndfile writes WAVE_FORMAT_EXTENSIBLE
def test_pcm_codec_and_wav_headers_agree_with_libsndfile(subtype, channels):
    from npdgru import pcm

    rng = np.random.default_rng(7)
    x = np.clip(rng.standard_normal((300, channels)) * 0.3, -1, 0.999).astype(np.float32)
    raw = io.BytesIO()
    sf.write(raw, x, 16000, format="RAW", subtype=subtype, endian="LITTLE")
    ref = sf.read(io.BytesIO(raw.getvalue()), samplerate=16000, channels=channels, format="RAW", subtype=subtype, endian="LITTLE", dtype="float32", always_2d=True)[0]
    assert np.array_equal(pcm.decode(raw.getvalue(), subtype, channels), ref)
    assert pcm.encode(ref, subtype) == raw.getvalue()  # integer samples: our rounding gives libsndfile's bytes back
    wav = io.BytesIO()
    sf.write(wav, x, 22050, format="WAV", subtype=subtype)
    stream = io.BytesIO(wav.getvalue())
    assert pcm.read_wav_header(stream) == (22050, channels, subtype)
    assert np.array_equal(pcm.decode(stream.read(), subtype, channels), sf.read(io.BytesIO(wav.getvalue()), dtype="float32", always_2d=True)[0])
    ours = pcm.wav_header(22050, channels, subtype) + raw.getvalue()  # length unknown: libsndfile reads to the end
    got, rate = sf.read(io.BytesIO(ours), dtype="float32", always_2d=True)
    assert rate == 22050 and np.array_equal(got, ref)
