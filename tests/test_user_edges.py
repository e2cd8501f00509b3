"""Where users meet npdgru: the model's own P by default, MP3, standard input and output, the
compile notice, the one-call ``npdgru.enhance``.

The pipes are real: ``python -m npdgru`` in a subprocess with stdin and stdout connected, so
what is checked is the bytes a shell pipeline would see.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npdgru import Enhancer
from npdgru.cli import main
from npdgru.errors import AudioError, WeightsError
from cli_run import run

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "noisy_dishes_5db.flac"
SR = 16000
MP3 = "MP3" in sf.available_formats()
needs_mp3 = pytest.mark.skipif(not MP3, reason=f"libsndfile {sf.__libsndfile_version__} has no MP3 (needs >= 1.1 built with mpg123 and lame)")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, sr = sf.read(EXAMPLE, dtype="float32")
    assert sr == SR
    return np.ascontiguousarray(x[: SR // 2])


def npdgru(*argv, stdin: bytes = b"", env=None, timeout=300):
    """``python -m npdgru ARGV`` with ``stdin`` piped in: (status, stdout bytes, stderr text)."""
    e = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "npdgru", *map(str, argv)], input=stdin, capture_output=True, env=e, timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout, p.stderr.decode()


def run_stdin(capsysbinary, monkeypatch, *argv, stdin: bytes = b""):
    """main(argv) in this process with ``stdin`` as standard input: (status, stdout bytes, stderr text)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    status = main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


def one_error(status, err, *needles):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npdgru: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ----------------------------------------------------------------------------- default P


def test_shipped_models_run_at_their_own_p_by_default():
    assert Enhancer().update_percent == 50.0  # the default model is an any-P model
    assert Enhancer(model="dprnn").update_percent == 50.0
    assert Enhancer(model="nsnet2").update_percent == 100.0  # trained dense: run dense
    assert Enhancer(update_percent=75).update_percent == 75.0  # an explicit P wins


def test_user_file_keeps_100_unless_it_records_a_p(tmp_path):
    from npdgru import architectures, save_weights

    w = architectures.tiny_weights(1, hidden=8)
    plain, marked, bad = tmp_path / "plain.safetensors", tmp_path / "marked.safetensors", tmp_path / "bad.safetensors"
    save_weights(plain, w.tensors, architecture=w.architecture)
    save_weights(marked, w.tensors, architecture=w.architecture, extra={"default_update_percent": "30"})
    with pytest.raises(WeightsError, match="default_update_percent"):  # refused when written ...
        save_weights(bad, w.tensors, architecture=w.architecture, extra={"default_update_percent": "0"})
    assert not bad.exists()
    assert Enhancer(plain).update_percent == 100.0
    assert Enhancer(marked).update_percent == 30.0
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(marked), framework="np") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(marked)), str(bad), metadata=dict(meta, default_update_percent="fifty"))
    with pytest.raises(WeightsError, match="default_update_percent"):  # ... and when read
        Enhancer(bad)
    # a copy of a shipped file elsewhere is a user's file: nothing recorded, so dense
    copy = tmp_path / "nsnet2-kd-anyp.safetensors"
    copy.write_bytes((REPO / "weights" / "nsnet2-kd-anyp.safetensors").read_bytes())
    assert Enhancer(copy).update_percent == 100.0


def test_cli_default_p_and_models_listing(capsys, tmp_path, speech):
    src = tmp_path / "in.wav"
    sf.write(src, speech, SR, subtype="FLOAT")
    out = tmp_path / "out.wav"
    status, stdout, err = run(capsys, "enhance", src, "-o", out)
    assert status == 0, err
    assert "model nsnet2-kd-anyp" in stdout and "(P=50)" in stdout and "enhanced in " in stdout
    y, _ = sf.read(out, dtype="float32")
    assert np.array_equal(y, Enhancer(update_percent=50).enhance(speech, SR))
    status, stdout, _ = run(capsys, "models")
    line = next(ln for ln in stdout.splitlines() if ln.strip().startswith("nsnet2-kd-anyp"))
    assert "P=50" in line and "MiB" in line
    assert "P=100" in next(ln for ln in stdout.splitlines() if ln.strip().startswith("nsnet2 "))


# ----------------------------------------------------------------------------- MP3 and subtypes


def test_codec_subtype_is_not_carried_into_another_format(tmp_path):
    from npdgru.enhance import output_subtype

    y = np.zeros(10, np.float32)
    assert output_subtype(tmp_path / "o.wav", y, source_subtype="MPEG_LAYER_III")[0] == "PCM_16"
    assert output_subtype(tmp_path / "o.flac", y, source_subtype="VORBIS")[0] == "PCM_16"
    assert output_subtype(tmp_path / "o.ogg", y, source_subtype="VORBIS")[0] == "VORBIS"
    assert output_subtype(tmp_path / "o.wav", y, source_subtype="PCM_24")[0] == "PCM_24"


@needs_mp3
def test_mp3_in_and_out(capsys, tmp_path, speech):
    src = tmp_path / "talk.mp3"
    sf.write(src, speech, SR)
    status, stdout, err = run(capsys, "enhance", src, "-o", tmp_path / "out.wav")
    assert status == 0, err
    info = sf.info(tmp_path / "out.wav")
    assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", SR)
    status, _, err = run(capsys, "enhance", tmp_path / "out.wav", "-o", tmp_path / "back.mp3")
    assert status == 0, err
    y, sr = sf.read(tmp_path / "back.mp3", dtype="float32")
    assert sf.info(tmp_path / "back.mp3").format == "MP3" and sr == SR and abs(len(y) - len(speech)) < 2000
    assert 0 < np.sum(y**2)


@needs_mp3
def test_folder_scan_takes_mp3(capsys, tmp_path, speech):
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "a.mp3", speech, SR)
    status, stdout, err = run(capsys, "enhance", tmp_path / "in", "-o", tmp_path / "out")
    assert status == 0, err
    assert sf.info(tmp_path / "out" / "a.mp3").format == "MP3"


def test_read_error_names_the_formats_read(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"RIFF0000not really audio")
    with pytest.raises(AudioError) as e:
        from npdgru import read_audio

        read_audio(bad)
    msg = str(e.value)
    assert str(bad) in msg and "WAV, FLAC, OGG" in msg and ("MP3" in msg) == MP3 and "soundfile reads" not in msg


# ----------------------------------------------------------------------------- stdin / stdout


@pytest.fixture(scope="module")
def wav_bytes(speech) -> bytes:
    b = io.BytesIO()
    sf.write(b, speech, SR, format="WAV", subtype="PCM_16")
    return b.getvalue()


def test_stdin_to_stdout_wav(speech, wav_bytes, tmp_path):
    status, out, err = npdgru("enhance", "-", "-o", "-", stdin=wav_bytes)
    assert status == 0, err
    y, sr = sf.read(io.BytesIO(out), dtype="float32")  # stdout holds the WAV and nothing else
    assert sr == SR and y.shape == speech.shape and sf.info(io.BytesIO(out)).subtype == "PCM_16"
    ref = Enhancer().enhance(sf.read(io.BytesIO(wav_bytes), dtype="float32")[0], SR)
    assert np.max(np.abs(y - ref)) <= 1 / 32768 + 1e-6  # the 16-bit rounding of the output
    assert "stdin -> stdout" in err and "model nsnet2-kd-anyp" in err and "P=50" in err
    status, out2, err = npdgru("enhance", "-", "-o", "/dev/stdout", "-q", stdin=wav_bytes)
    assert status == 0 and out2 == out and err == "", err


def test_raw_pcm_pipe_and_file_to_stdout(speech, tmp_path):
    pcm = np.round(speech * 32767).astype("<i2")
    status, out, err = npdgru("enhance", "-", "-o", "-", "--format", "raw", "--rate", SR, "--channels", 1, "-q", stdin=pcm.tobytes())
    assert status == 0, err
    y = np.frombuffer(out, "<i2").astype(np.float32) / 32768
    assert len(y) == len(pcm)
    ref = Enhancer().enhance(pcm.astype(np.float32) / 32768, SR)
    assert np.max(np.abs(y - ref)) <= 1.5 / 32768
    src = tmp_path / "in.flac"
    sf.write(src, speech, SR, subtype="PCM_24")
    status, out, err = npdgru("enhance", src, "-o", "-", "--format", "flac", "-q")
    assert status == 0, err
    info = sf.info(io.BytesIO(out))
    assert (info.format, info.subtype, info.frames) == ("FLAC", "PCM_24", len(speech))


@pytest.mark.parametrize("argv, stdin, needles", [
    (["enhance", "-", "-o", "-", "--format", "raw"], b"\0\0" * 100, ["--rate", "--channels"]),
    (["enhance", "-", "-o", "-"], b"", ["stdin", "no data"]),
    (["enhance", "-", "-o", "-"], b"garbage" * 10, ["stdin", "cannot read audio", "--format raw"]),
    (["enhance", "-", "-o", "-", "--format", "mp4"], b"", ["--format", "raw"]),
    (["enhance", "-", "-o", "-", "--format", "raw", "--rate", "16000", "--channels", "1", "--subtype", "ULAW"], b"\0" * 100, ["subtype"]),
], ids=["raw-needs-rate", "empty", "garbage", "bad-format", "raw-subtype"])
def test_stdio_errors_are_one_line_and_stdout_stays_empty(capsysbinary, monkeypatch, argv, stdin, needles):
    status, out, err = run_stdin(capsysbinary, monkeypatch, *argv, stdin=stdin)
    one_error(status, err, *needles)
    assert out == b""


def test_a_terminal_is_not_read_as_audio(capsys, monkeypatch, tmp_path):
    import types

    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True, buffer=io.BytesIO()))
    status, _, err = run(capsys, "enhance", "-", "-o", tmp_path / "o.wav")
    one_error(status, err, "standard input", "terminal")
    status, _, err = run(capsys, "stream")
    one_error(status, err, "pipe or redirect")


def test_stdin_to_existing_file_needs_overwrite(capsysbinary, monkeypatch, tmp_path, wav_bytes):
    dst = tmp_path / "o.wav"
    dst.write_bytes(b"keep")
    status, out, err = run_stdin(capsysbinary, monkeypatch, "enhance", "-", "-o", dst, stdin=wav_bytes)
    one_error(status, err, str(dst), "--overwrite")
    assert dst.read_bytes() == b"keep"
    status, out, err = run_stdin(capsysbinary, monkeypatch, "enhance", "-", "-o", tmp_path / "o.txt", stdin=wav_bytes)
    one_error(status, err, "o.txt", "cannot write '.txt'")
    status, out, err = run_stdin(capsysbinary, monkeypatch, "enhance", "-", "-o", tmp_path / "new.flac", "-q", stdin=wav_bytes)
    assert status == 0 and out == b"" and sf.info(tmp_path / "new.flac").format == "FLAC", err


# ----------------------------------------------------------------------------- compile notice


@pytest.mark.slow
def test_compile_notice_on_a_cold_cache_without_a_terminal(tmp_path, wav_bytes):
    """A cold numba cache (an empty NUMBA_CACHE_DIR) is announced on stderr before compiling,
    although stderr is a pipe; stdout still holds only audio."""
    status, out, err = npdgru("enhance", "-", "-o", "-", stdin=wav_bytes, env={"NUMBA_CACHE_DIR": str(tmp_path / "numba")}, timeout=600)
    assert status == 0, err
    assert err.splitlines()[0].startswith("npdgru: compiling the numba kernels (first run only; about ")
    assert "kernels compiled in" in err and sf.read(io.BytesIO(out))[1] == SR


def test_cold_cache_detection(tmp_path, monkeypatch):
    from npdgru.cli import _numba_cache_cold

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert _numba_cache_cold()


# ----------------------------------------------------------------------------- npdgru.enhance


def test_one_call_enhance_caches_an_enhancer_per_options(speech):
    import npdgru
    from npdgru import enhance as module_enhance
    from npdgru.errors import ParameterError

    npdgru.enhance._CACHED.clear()
    y = npdgru.enhance(speech, SR)
    assert np.array_equal(y, Enhancer().enhance(speech, SR))
    first = list(npdgru.enhance._CACHED.values())[0]
    assert first.update_percent == 50.0
    y2 = module_enhance(speech, SR)  # `from npdgru import enhance`: the same callable
    assert np.array_equal(y, y2) and list(npdgru.enhance._CACHED.values()) == [first]  # reused, not rebuilt
    y3 = npdgru.enhance(speech, SR, update_percent=100)
    assert len(npdgru.enhance._CACHED) == 2 and not np.array_equal(y, y3)
    assert np.array_equal(y3, Enhancer(update_percent=100).enhance(speech, SR))
    with pytest.raises(ParameterError, match="unknown option.*update_prcent"):
        npdgru.enhance(speech, SR, update_prcent=50)
    for P in (90, 80, 70, 60, 40):  # at most four are kept
        npdgru.enhance(speech[:1600], SR, update_percent=P)
    assert len(npdgru.enhance._CACHED) == 4


# ----------------------------------------------------------------------------- convert: LSTM by name


def test_lstm_under_nsnet2_names_is_refused_in_one_line(capsys, tmp_path):
    """A 2-layer LSTM saved under the PyTorch NSNet2 names (rnn.weight_ih_l0, ...) maps onto the
    GRU tensors: it is named as an LSTM, not listed as eight shape mismatches."""
    from safetensors.numpy import save_file

    from npdgru.convert import NSNET2_TORCH_NAMES
    from npdgru.weights import expected_shapes
    from npdgru.architectures import architecture

    want = expected_shapes(architecture("nsnet2"))
    state = {}
    for ck, name in NSNET2_TORCH_NAMES.items():
        shape = list(want[name])
        if ck.startswith("rnn."):
            shape[0] = shape[0] // 3 * 4  # an LSTM's i, f, g, o blocks
        state[ck] = np.zeros(shape, np.float32)
    src = tmp_path / "lstm.safetensors"
    save_file(state, str(src))
    status, out, err = run(capsys, "convert", src, "-o", tmp_path / "o.safetensors")
    one_error(status, err, str(src), "an LSTM (4 gate blocks in rnn.weight_", "GRU layers only")
    assert "expected" not in err and not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- eval: the quick question


def test_eval_without_weights_is_the_default_model_dense_and_at_its_p(capsys, tmp_path):
    import json

    from npdgru.evaluate import missing_dependencies

    if missing_dependencies():
        pytest.skip(f"the eval extra is missing: {missing_dependencies()}")
    data = tmp_path / "data"
    for sub, name in (("clean", "clean_dishes_5db.flac"), ("noisy", "noisy_dishes_5db.flac")):
        (data / sub).mkdir(parents=True)
        x, sr = sf.read(REPO / "examples" / name, dtype="float32")
        sf.write(data / sub / "a.wav", x, sr)
    status, _, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "out", "--timing-frames", "50", "--timing-repeats", "1", "--quiet")
    assert status == 0, err
    rows = [r["name"] for r in json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]]
    ours = [r for r in rows if r.startswith("nsnet2")]
    assert ours == ["nsnet2-kd-anyp P=100", "nsnet2-kd-anyp P=50"], rows
    assert "clean" in rows and "noisy" in rows


# ----------------------------------------------------------------------------- npdgru live (a fake device)


class FakeSoundDevice:
    """The part of sounddevice that ``npdgru live`` uses, over a fixed signal: ``read`` hands
    out the signal block by block (``overflow_at``: blocks reported as overflowed), ``write``
    keeps what is played (``underflow_at``: blocks reported as underflowed)."""

    def __init__(self, signal, overflow_at=(), underflow_at=()):
        self.signal, self.overflow_at, self.underflow_at = signal, set(overflow_at), set(underflow_at)
        self.played, self.opened = [], []

    def query_devices(self):
        return "0 fake mic, 1 in, 0 out\n1 fake speakers, 0 in, 2 out"

    def _open(self, kind, **kw):
        dev, self.pos, self.reads, self.writes = self, 0, 0, 0
        self.opened.append((kind, kw))

        class S:
            def __enter__(s):
                return s

            def __exit__(s, *a):
                return False

            def read(s, frames):
                x = dev.signal[dev.pos : dev.pos + frames]
                if len(x) < frames:  # the microphone goes on: silence
                    x = np.concatenate([x, np.zeros((frames - len(x),) + x.shape[1:], np.float32)])
                dev.pos += frames
                dev.reads += 1
                return x.reshape(frames, -1), (dev.reads - 1) in dev.overflow_at

            def write(s, y):
                dev.played.append(np.array(y))
                dev.writes += 1
                return (dev.writes - 1) in dev.underflow_at

        return S()

    def Stream(self, **kw):  # noqa: N802 (sounddevice's name)
        return self._open("duplex", **kw)

    def InputStream(self, **kw):  # noqa: N802
        return self._open("input", **kw)


def test_live_to_speakers_with_a_fake_device(monkeypatch, capsys, speech):
    from scipy.signal import resample_poly

    x = resample_poly(speech, 3, 1).astype(np.float32)  # the device runs at 48 kHz
    fake = FakeSoundDevice(x[:, None], overflow_at={3}, underflow_at={7, 8})
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    status, out, err = run(capsys, "live", "--seconds", len(x) / 48000, "--input-device", "2", "--output-device", "speakers")
    assert status == 0, err
    kind, kw = fake.opened[-1]
    assert kind == "duplex" and kw["device"] == (2, "speakers") and kw["samplerate"] == 48000 and kw["blocksize"] == 480
    played = np.concatenate(fake.played)[:, 0]
    st = Enhancer().stream(sample_rate=48000)
    want = np.concatenate([st.process(x[i : i + 480]) for i in range(0, len(played), 480)])
    assert np.array_equal(played, want[: len(played)])  # the stream's output, block by block
    assert "3 dropped blocks" in err and "real-time factor" in err and "latency 1024 samples" in err


def test_live_to_a_file_and_without_sounddevice(monkeypatch, capsys, speech, tmp_path):
    fake = FakeSoundDevice(speech[:, None])
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    out = tmp_path / "rec.wav"
    status, _, err = run(capsys, "live", "-o", out, "--rate", SR, "--seconds", 0.3, "-P", "100")
    assert status == 0, err
    assert fake.opened[-1][0] == "input"
    y, sr = sf.read(out, dtype="float32")
    n = int(0.3 * SR)
    st = Enhancer(update_percent=100).stream()
    want = np.concatenate([st.process(speech[i : i + 160]) for i in range(0, n, 160)] + [st.flush()])
    assert sr == SR and len(y) == len(want) and np.max(np.abs(y - want)) <= 1 / 32768  # PCM_16
    assert "0 dropped blocks" in err
    status, _, err = run(capsys, "live", "-o", out, "--seconds", 0.1)
    one_error(status, err, str(out), "--overwrite")
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # not installed: import fails
    status, _, err = run(capsys, "live", "--seconds", 0.1)
    one_error(status, err, "sounddevice", "pip install")


def test_eval_plot_labels_do_not_overlap():
    """Points of one model a few microseconds apart got their 'P=..' labels printed on top of each other."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from npdgru.evaluate.report import _place_labels

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [36, 43, 48, 52, 116, 117], [1.675, 1.661, 1.667, 1.666, 1.786, 1.785]
    ax.plot(xs, ys, "o")
    ax.plot([170, 230], [1.45, 1.80], "o")  # the range of a real panel
    _place_labels(ax, [(x, y, f"P={p}") for x, y, p in zip(xs, ys, [25, 50, 75, 100, 75, 100])])
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 6
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] if a.overlaps(b)]
    plt.close(fig)
    assert not overlaps
