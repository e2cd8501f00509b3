"""Hostile and careless input: each test is one row of the hardening review, and failed before it.

Streams: a refused chunk or hop leaves the stream (and in a StreamBatch every other stream)
exactly as it was. Limits: sample magnitude, sample rate, channels. Files: a FIFO is opened once,
output names and sample formats are checked before anything is written, ``convert`` writes as
``enhance`` does. API: the top-level imports, shipped models by name, argument types.

The stream tests use the tiny random model of ``npdgru.architectures`` (fast, no shipped file).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npdgru import architectures, stft
from npdgru.enhance import MAX_ABS_SAMPLE, MAX_CHANNELS, Enhancer, read_audio
from npdgru.errors import AudioError, CheckpointError, ParameterError, StreamInputError, WeightsError
from cli_run import run, one_line_error

REPO = Path(__file__).resolve().parents[1]
HOP = stft.HOP
SR = 16000
DPRNN = REPO / "weights" / "dprnn-anyp.safetensors"


@pytest.fixture(scope="module")
def enh():
    return Enhancer(architectures.tiny_weights(3, hidden=12), update_percent=50)


def signal(n, seed):
    rng = np.random.default_rng(seed)
    env = 0.05 + 0.2 * np.abs(np.sin(np.arange(n) / 700.0 + seed))
    return (rng.standard_normal(n) * env).astype(np.float32)


# ------------------------------------------------------------------- rows 1, 2: stream isolation


def test_bound_on_sample_magnitude_is_needed_and_enough(enh):
    """The largest magnitude with finite features is sqrt(float32 max) / sum(window) = 9.06e16 (a
    constant signal puts it all in |X[0]|^2). Above it log_power overflows; at MAX_ABS_SAMPLE
    every intermediate and the output stay finite, for a constant and for noisy full scale."""
    edge = float(np.sqrt(np.finfo(np.float32).max) / np.float64(stft.WINDOW.sum(dtype=np.float64)))
    assert 9.0e16 < edge < 9.1e16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not np.isfinite(stft.log_power(stft.stft(np.full(640, 1.01 * edge, np.float32)))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow anywhere at the limit
        for x in (np.full(3200, MAX_ABS_SAMPLE, np.float32), np.clip(signal(3200, 1) * 1e9, -MAX_ABS_SAMPLE, MAX_ABS_SAMPLE)):
            assert np.isfinite(stft.log_power(stft.stft(x))).all()
            assert np.isfinite(enh.enhance(x, SR)).all()
    with pytest.raises(AudioError, match="exceeds the limit"):
        enh.enhance(np.full(320, 1.01 * MAX_ABS_SAMPLE, np.float32), SR)


@pytest.mark.parametrize("bad", [1e18, 1e30, np.nan, -np.inf])
def test_refused_chunk_leaves_the_stream_as_it_was(enh, bad):
    """Row 2: a chunk of 1e18 raised in this call and the next valid one, and the stream lost
    320 samples for good. Now: refused up front; the stream continues as if it never came."""
    x = signal(16 * HOP, 0)
    s, ref = enh.stream(), enh.stream()
    got, want = [], []
    for i in range(0, len(x), 100):  # chunks across hop boundaries
        if i == 800:
            poison = x[i : i + 100].astype(np.float64)
            poison[7] = bad
            with pytest.raises(AudioError, match="chunk"):
                s.process(poison)
        got.append(s.process(x[i : i + 100]))
        want.append(ref.process(x[i : i + 100]))
    got.append(s.flush())
    want.append(ref.flush())
    assert sum(map(len, got)) == len(x) + s.latency
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))


def test_bad_stream_in_a_batch_is_refused_alone(enh):
    """Row 1: one stream's hop of 1e30 made the whole batch raise for two calls and changed the
    other streams' output for good. Now that stream is refused (its id named), the others are
    processed, and every stream equals a solo Stream fed its accepted hops."""
    xs = [signal(20 * HOP, k) for k in range(3)]
    sb = enh.stream_batch()
    ids = [sb.add() for _ in xs]
    solo = [enh.stream() for _ in xs]
    got = [[] for _ in xs]
    want = [[] for _ in xs]
    for t in range(20):
        hops = {sid: x[t * HOP : (t + 1) * HOP] for sid, x in zip(ids, xs)}
        if t in (5, 6):
            hops[ids[1]] = np.full(HOP, 1e30)
            hops[12345] = np.zeros(HOP)  # not an open stream: refused alone too
            with pytest.raises(StreamInputError) as e:
                sb.process(hops)
            assert set(e.value.rejected) == {ids[1], 12345}
            assert f"stream(s) {ids[1]!r}, 12345 refused" in str(e.value)
            assert "exceeds the limit" in e.value.rejected[ids[1]] and "not open" in e.value.rejected[12345]
            out = e.value.outputs
            assert set(out) == {ids[0], ids[2]}
        else:
            out = sb.process(hops)
        for k, sid in enumerate(ids):
            if sid in out:
                got[k].append(out[sid])
                want[k].append(solo[k].process(hops[sid]))
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate(got[k]), np.concatenate(want[k]), err_msg=f"stream {k}")
    assert len(got[1]) == 18 and len(got[0]) == 20


# ---------------------------------------------------------------- rows 6, 9: rates and channels


def _wav_with_rate(path: Path, rate: int, n: int = 100) -> Path:
    sf.write(path, np.zeros(n, np.float32), 16000, subtype="PCM_16")
    b = bytearray(path.read_bytes())
    b[24:32] = struct.pack("<II", rate, (rate * 2) & 0xFFFFFFFF)  # sample rate, byte rate
    path.write_bytes(bytes(b))
    return path


@pytest.mark.parametrize("rate", [2_147_483_647, 20_000_003, 999])
def test_absurd_sample_rate_in_header_refused_before_reading(tmp_path, rate, capsys):
    """Row 6: a 244-byte WAV saying 2,147,483,647 Hz made npdgru try to allocate 320 GiB."""
    p = _wav_with_rate(tmp_path / "forged.wav", rate)
    assert p.stat().st_size == 244
    with pytest.raises(AudioError, match=f"forged.wav: the header says {rate} Hz"):
        read_audio(p)
    status, _, err = run(capsys, "enhance", p, "-o", tmp_path / "out.wav", "--weights", DPRNN)
    one_line_error(status, err, "forged.wav", f"{rate} Hz")


@pytest.mark.parametrize("rate", [2**40, 20_000_003, 500, 16000.0, True])
def test_sample_rate_limits_of_enhance(enh, rate):
    with pytest.raises(AudioError, match="sample_rate"):
        enh.enhance(np.zeros(1600, np.float32), rate)


def test_channels_first_and_too_many_channels_refused(enh):
    """Row 9: (2, n) was taken as n channels of 2 samples: silent garbage, or a MemoryError."""
    x = signal(16000, 0)
    with pytest.raises(AudioError, match=r"x\.T"):
        enh.enhance(np.stack([x, x]), SR)
    with pytest.raises(AudioError, match=f"at most {MAX_CHANNELS}"):
        enh.enhance(np.zeros((16000, MAX_CHANNELS + 1), np.float32), SR)
    with pytest.raises(AudioError, match=r"x\.T"):
        enh.enhance_batch([x, np.stack([x, x])], SR)
    y = enh.enhance(np.stack([x, x], axis=1), SR)  # the right layout still works
    assert y.shape == (16000, 2)


# ------------------------------------------------------------------------- row 5: pipes, FIFOs


def _feed_fifo(path: Path, data: bytes) -> threading.Thread:
    def writer():
        with open(path, "wb") as f:
            f.write(data)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return t


def _unblock(path: Path, done: threading.Event) -> None:
    """If the reader opens the FIFO a second time (the bug), give it a writer that closes at once."""
    if not done.wait(60):
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_fifo_input_is_opened_once(tmp_path, capsys, fmt):
    """Row 5: read_audio and then sf.info opened the input twice: a hang on a FIFO, or (FLAC, not
    seekable) a read error. Now it is read once, into memory."""
    x = signal(8000, 2)
    src = tmp_path / f"x.{fmt.lower()}"
    sf.write(src, x, SR, format=fmt, subtype="PCM_16")
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    want, _ = read_audio(src)
    _feed_fifo(fifo, src.read_bytes())
    got, sr = read_audio(fifo)
    assert sr == SR
    np.testing.assert_array_equal(got, want)
    _feed_fifo(fifo, src.read_bytes())
    done = threading.Event()
    threading.Thread(target=_unblock, args=(fifo, done), daemon=True).start()
    status, out, err = run(capsys, "enhance", fifo, "-o", tmp_path / "y.wav", "--weights", DPRNN)
    done.set()
    assert status == 0, err
    assert sf.info(str(tmp_path / "y.wav")).frames == len(x)


# ------------------------------------------------------------------- row 10: output names


@pytest.mark.parametrize("name", ["ok.m4a", "out.txt"])  # .mp3 is written where libsndfile has MP3
def test_output_with_a_foreign_suffix_is_refused(tmp_path, capsys, name):
    """Row 10: '-o out/ok.m4a' became a folder 'ok.m4a/' and was left behind empty."""
    src = tmp_path / "in.wav"
    sf.write(src, signal(1600, 0), SR)
    dst = tmp_path / "out" / name
    status, _, err = run(capsys, "enhance", src, "-o", dst)
    one_line_error(status, err, name, Path(name).suffix)
    assert not (tmp_path / "out").exists()


def test_several_inputs_into_one_file_name_refused(tmp_path, capsys):
    for k in range(2):
        sf.write(tmp_path / f"in{k}.wav", signal(1600, k), SR)
    status, _, err = run(capsys, "enhance", tmp_path / "in0.wav", tmp_path / "in1.wav", "-o", tmp_path / "o.wav")
    one_line_error(status, err, "o.wav", "2 inputs need an output folder")
    assert not (tmp_path / "o.wav").exists()


# ------------------------------------------------------------------ row 11: bits and clipping


def test_24_bit_input_keeps_24_bits_in_flac(tmp_path, capsys):
    """Row 11: a 24-bit WAV written as .flac became 16-bit, without a word."""
    src = tmp_path / "in.wav"
    sf.write(src, signal(3200, 0), SR, subtype="PCM_24")
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "o.flac", "--weights", DPRNN)
    assert status == 0, err
    assert sf.info(str(tmp_path / "o.flac")).subtype == "PCM_24"
    assert "warning" not in err


def test_float_input_beyond_full_scale_to_flac_is_warned(tmp_path, capsys):
    """Row 11: a float WAV with peaks above 1.0 written as .flac: a third of the samples clipped
    and 24 bits became 16, no word said. Now both are warned, with the option that keeps them."""
    src = tmp_path / "loud.wav"
    sf.write(src, signal(8000, 0) * 40, SR, subtype="FLOAT")
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "o.flac", "--weights", DPRNN)
    assert status == 0, err
    y = sf.read(str(tmp_path / "o.flac"))[0]
    assert "npdgru: warning:" in err and "o.flac" in err
    assert "FLOAT samples are written as FLAC PCM_16; pass --subtype PCM_24" in err
    assert "exceed ±1.0 and are clipped" in err and "--subtype FLOAT" in err
    assert np.abs(y).max() <= 1.0
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "o.wav", "--weights", DPRNN)
    assert status == 0 and "warning" not in err  # float WAV to float WAV: nothing lost
    assert sf.info(str(tmp_path / "o.wav")).subtype == "FLOAT"
    assert np.abs(sf.read(str(tmp_path / "o.wav"))[0]).max() > 1.0


def test_subtype_option(tmp_path, capsys):
    src = tmp_path / "in.wav"
    sf.write(src, signal(3200, 0), SR, subtype="PCM_16")
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "o.flac", "--weights", DPRNN, "--subtype", "PCM_24")
    assert status == 0, err
    assert sf.info(str(tmp_path / "o.flac")).subtype == "PCM_24"
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "p.flac", "--weights", DPRNN, "--subtype", "FLOAT")
    one_line_error(status, err, "p.flac", "FLOAT", "cannot be written as FLAC", "PCM_24")
    assert not (tmp_path / "p.flac").exists()
    (tmp_path / "many").mkdir()
    for k in range(3):  # a folder: the same one line, before any file is read
        sf.write(tmp_path / "many" / f"{k}.wav", signal(1600, k), SR)
    status, _, err = run(capsys, "enhance", tmp_path / "many", "-o", tmp_path / "outs", "--weights", DPRNN, "--subtype", "VORBIS")
    one_line_error(status, err, "VORBIS", "cannot be written as WAV")
    assert not (tmp_path / "outs").exists()


# ------------------------------------------------------------------ row 4: convert's output


def _tiny_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    from safetensors.numpy import save_file

    w = architectures.tiny_weights(0, hidden=8)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in w.tensors.items()}, str(ckpt))
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(w.architecture))
    return ckpt, arch


def test_convert_into_a_missing_folder_is_created(tmp_path, capsys):
    ckpt, arch = _tiny_checkpoint(tmp_path)
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    status, _, err = run(capsys, "convert", ckpt, "-o", out, "--arch", arch)
    assert status == 0, err
    assert out.is_file()


def test_convert_under_a_file_or_onto_a_folder_is_one_line(tmp_path, capsys):
    """Row 4: NotADirectoryError / IsADirectoryError tracebacks."""
    ckpt, arch = _tiny_checkpoint(tmp_path)
    (tmp_path / "afile").write_text("x")
    status, _, err = run(capsys, "convert", ckpt, "-o", tmp_path / "afile" / "m.safetensors", "--arch", arch)
    one_line_error(status, err, "m.safetensors", "cannot write there")
    (tmp_path / "dir.safetensors").mkdir()
    status, _, err = run(capsys, "convert", ckpt, "-o", tmp_path / "dir.safetensors", "--arch", arch)
    one_line_error(status, err, "dir.safetensors", "is a folder")


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Row 4: a full disk gave an OSError traceback. Simulated: every write of the weight file fails."""
    ckpt, arch = _tiny_checkpoint(tmp_path)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    status, _, err = run(capsys, "convert", ckpt, "-o", out_dir / "m.safetensors", "--arch", arch)
    one_line_error(status, err, "m.safetensors", "No space left on device")
    assert list(out_dir.iterdir()) == []


def test_save_weights_errors_are_weights_errors(tmp_path):
    from npdgru.weights import save_weights

    w = architectures.tiny_weights(0, hidden=8)
    (tmp_path / "f").write_text("")
    with pytest.raises(WeightsError, match="cannot write there"):
        save_weights(tmp_path / "f" / "m.safetensors", w.tensors, architecture=w.architecture)


# ---------------------------------------------------------- row 13: duplicate zip members


def test_checkpoint_with_duplicate_members_refused(tmp_path):
    """Row 13: two members named archive/data/0: zipfile reads the last one (zeros); accepted."""
    from test_checkpoint_security import valid_zip

    p = valid_zip(tmp_path / "dup.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        with zipfile.ZipFile(p, "a") as zf:
            zf.writestr("archive/data/0", np.zeros(12, np.float32).tobytes())
    with pytest.raises(CheckpointError, match="two members named 'archive/data/0'"):
        from npdgru.convert.torch_checkpoint import read_checkpoint

        read_checkpoint(p)


# --------------------------------------------------------------- rows 12, 14: API and wording


def test_enhancer_argument_types():
    """Row 12: Enhancer(weights=123) was a bare TypeError; a NumPy float floor was refused."""
    with pytest.raises(ParameterError, match="weights=123"):
        Enhancer(weights=123)
    w = architectures.tiny_weights(0, hidden=8)
    e = Enhancer(w, mask_floor_db=np.float32(-60), update_percent=np.float64(50))
    assert e.mask_floor_db == -60.0
    for bad in (True, "-80", float("nan"), 3.0):
        with pytest.raises(ParameterError, match="mask_floor_db"):
            Enhancer(w, mask_floor_db=bad)


def test_tiny_update_percent_is_printed_exactly(tmp_path, capsys):
    """Row 14: -P 0.001 printed '0.2 % updated'; A = 1 of 400 neurons is 0.25 %."""
    src = tmp_path / "in.wav"
    sf.write(src, signal(3200, 0), SR)
    status, out, err = run(capsys, "enhance", src, "-o", tmp_path / "o.wav", "-P", "0.001", "--weights", REPO / "weights" / "nsnet2.safetensors")
    assert status == 0, err
    assert "0.25% of GRU neurons updated" in out


# ------------------------------------------------------------------- newcomer: API and models


def test_top_level_api_is_lazy_and_complete():
    code = (
        "import sys, npdgru; assert 'numba' not in sys.modules and 'npdgru.enhance' not in sys.modules; "
        "from npdgru import Enhancer, Stream, StreamBatch, load_weights, shipped_models, convert_checkpoint, NpdgruError; "
        "import npdgru.enhance as e; assert Enhancer is e.Enhancer and Stream is e.Stream; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import npdgru

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        npdgru.nope  # noqa: B018


def test_shipped_models_by_name(capsys, tmp_path):
    from npdgru import model_path, shipped_models

    names = {m["name"] for m in shipped_models()}
    assert {"nsnet2-kd-anyp", "dprnn-anyp", "mpt-anyp", "nsnet2"} <= names
    assert all(m["description"] for m in shipped_models())
    assert model_path("dprnn").name == "dprnn-anyp.safetensors"
    assert model_path("nsnet2").name == "nsnet2.safetensors"
    assert Enhancer(model="mpt").weights.architecture["name"] == "mpt"
    with pytest.raises(ParameterError, match="'gpt' is not a shipped model.*dprnn-anyp"):
        Enhancer(model="gpt")
    with pytest.raises(ParameterError, match="model='dprnn'"):
        Enhancer("dprnn")  # a name where a file is expected: the hint, not just "no such file"
    with pytest.raises(ParameterError, match="not both"):
        Enhancer(REPO / "weights" / "nsnet2.safetensors", model="dprnn")
    for argv in (["models"], ["info"]):
        status, out, _ = run(capsys, *argv)
        assert status == 0
        for m in shipped_models():
            assert m["name"] in out and m["description"] in out
    status, out, _ = run(capsys, "info", "dprnn")
    assert status == 0 and "dprnn" in out
    src = tmp_path / "in.wav"
    sf.write(src, signal(1600, 0), SR)
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "o.wav", "--model", "gpt")
    one_line_error(status, err, "'gpt' is not a shipped model")


def test_warm_up_says_when_it_compiles(monkeypatch, capsys):
    """The first-run line: JIT compilation is named and kept out of the per-file times."""
    import time

    from npdgru import cli

    class Slow:
        sample_rate = SR
        calls = 0

        def enhance(self, x, sr):
            Slow.calls += 1
            time.sleep(0.8)
            return x

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # said on a pipe too
    monkeypatch.setattr(cli, "_numba_cache_cold", lambda: False)  # a cache that misses a kernel: said after 1 s
    Slow.enhance = lambda self, x, sr: (setattr(Slow, "calls", Slow.calls + 1), time.sleep(1.3), x)[-1]
    cli._warm_up(Slow(), quiet=False)
    err = capsys.readouterr().err
    assert Slow.calls == 1
    assert "compiling the numba kernels (first run only" in err and "not counted in the times below" in err
    Slow.enhance = lambda self, x, sr: x  # fast (cached): nothing said
    cli._warm_up(Slow(), quiet=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "_numba_cache_cold", lambda: True)  # a cold cache: said before compiling
    cli._warm_up(Slow(), quiet=False)
    assert "compiling the numba kernels" in capsys.readouterr().err
    cli._warm_up(Slow(), quiet=True)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_endless_pipe_is_bounded(tmp_path, monkeypatch):
    """A pipe is read into memory with a bound (here lowered to 1 KiB), never without one."""
    import npdgru.audio as audio_module

    monkeypatch.setattr(audio_module, "MAX_PIPE_BYTES", 1024)
    fifo = tmp_path / "endless.fifo"
    os.mkfifo(fifo)
    _feed_fifo_ignoring_close(fifo, b"RIFF" + bytes(5000))
    with pytest.raises(AudioError, match="more than 1024 bytes from a pipe"):
        read_audio(fifo)


def _feed_fifo_ignoring_close(path: Path, data: bytes) -> None:
    def writer():
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BrokenPipeError:  # the reader stops at its bound
            pass

    threading.Thread(target=writer, daemon=True).start()
