"""The ``npdgru`` command (npdgru.cli), called in-process through ``main([...])``.

Success: a file to a file, a folder tree to a folder tree, other rates and stereo, ``info``.
Failure: exit status 2 and exactly one line ``npdgru: error: ...`` naming the file, never a
traceback, for every bad input of the issue. One test runs ``python -m npdgru.cli`` in a
subprocess to check the real exit status and stderr of the program.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import save_file

from cli_run import run

REPO = Path(__file__).resolve().parents[1]
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"
SHIPPED = REPO / "weights" / "nsnet2.safetensors"
SR = 16000

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """0.5 s of real noisy speech (float32, 16 kHz mono)."""
    files = sorted(NOISY_DIR.glob("*.flac")) or [REPO / "examples" / "noisy_dishes_5db.flac"]
    x, sr = sf.read(str(files[0]), dtype="float32", always_2d=True)
    assert sr == SR
    return np.ascontiguousarray(x[: SR // 2, 0])


@pytest.fixture
def wav(tmp_path, speech) -> Path:
    p = tmp_path / "in.wav"
    sf.write(p, speech, SR, subtype="PCM_16")
    return p


def assert_one_line_error(status, err, *needles):
    assert status == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1, err
    assert errors[0].startswith("npdgru: error: "), err
    for n in needles:
        assert str(n) in errors[0], f"{n!r} not in {errors[0]!r}"


# ---------------------------------------------------------------------------------- success


def test_enhance_file_to_file(capsys, tmp_path, wav, speech):
    out = tmp_path / "out.wav"
    status, stdout, err = run(capsys, "enhance", wav, "-o", out, "--update-percent", "50")
    assert status == 0, err
    y, sr = sf.read(out, dtype="float32")
    assert sr == SR and y.shape == speech.shape and np.isfinite(y).all()
    assert sf.info(out).subtype == "PCM_16"  # same format as the input
    assert 0 < np.sum(y**2) < np.sum(speech**2)
    # Per-file summary: duration, real-time factor, share of neurons updated.
    assert f"{wav} -> {out}: 0.50 s, 1 ch, 16000 Hz, real-time factor " in stdout
    assert "50.0% of GRU neurons updated per frame (P=50)" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_output_matches_enhancer(capsys, tmp_path, speech):
    from npdgru.enhance import Enhancer

    src = tmp_path / "in_float.wav"
    sf.write(src, speech, SR, subtype="FLOAT")
    out = tmp_path / "out_float.wav"
    status, _, err = run(capsys, "enhance", src, "-o", out, "-P", "75", "-q")
    assert status == 0, err
    y, _ = sf.read(out, dtype="float32")
    assert np.array_equal(y, Enhancer(update_percent=75).enhance(speech, SR))


def test_enhance_folder_recursively(capsys, tmp_path, speech):
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    sf.write(src / "top.wav", speech, SR)
    sf.write(src / "a" / "mid.flac", speech[:4000], SR)
    sf.write(src / "a" / "b" / "deep.wav", speech[:100], SR)
    (src / "a" / "notes.txt").write_text("not audio")  # ignored inside a folder
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "enhance", src, "-o", out)
    assert status == 0, err
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == [".npdgru-journal.jsonl", ".npdgru-lock", "a/b/deep.wav", "a/mid.flac", "top.wav"]  # the journal: resume; the lock: one run at a time
    assert sf.info(out / "a" / "mid.flac").format == "FLAC"
    assert sf.info(out / "a" / "b" / "deep.wav").frames == 100
    assert stdout.count("real-time factor") == 3 and stdout.count("50.0% of GRU neurons") == 3  # the default model at its own P


@pytest.mark.parametrize("rate, channels", [(8000, 1), (44100, 1), (48000, 1), (16000, 2), (48000, 2)])
def test_other_rates_and_stereo(capsys, tmp_path, speech, rate, channels):
    from scipy.signal import resample_poly

    x = resample_poly(speech, rate, SR).astype(np.float32)
    if channels == 2:
        x = np.stack([x, 0.5 * x[::-1]], axis=1)
    src = tmp_path / f"in_{rate}_{channels}.wav"
    sf.write(src, x, rate)
    out = tmp_path / "out.flac"  # a different container than the input
    status, stdout, err = run(capsys, "enhance", src, "-o", out, "-P", "25")
    assert status == 0, err
    y, sr = sf.read(out, dtype="float32", always_2d=True)
    assert sr == rate and y.shape == (len(x), channels) and np.isfinite(y).all()
    assert f"{channels} ch, {rate} Hz" in stdout


def test_info(capsys):
    status, stdout, err = run(capsys, "info", SHIPPED)
    assert status == 0, err
    assert "architecture: nsnet2 (161 features)" in stdout
    assert "gru1     D-GRU 400 -> 400" in stdout and "fc4      Linear 600 -> 161 + sigmoid" in stdout
    assert "source:" in stdout and "NSNet2" in stdout and "license:" in stdout and "CC BY 4.0" in stdout


def test_subprocess_exit_codes(tmp_path, wav):
    """The real program: exit status 2, one line on stderr, no traceback; 0 on success."""
    cmd = [sys.executable, "-m", "npdgru.cli"]
    missing = tmp_path / "missing.wav"
    r = subprocess.run([*cmd, "enhance", str(missing), "-o", str(tmp_path / "o.wav")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"npdgru: error: {missing}: no such file or folder"
    assert r.stdout == ""
    r = subprocess.run([*cmd, "enhance", str(wav), "-o", str(tmp_path / "o.wav"), "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.wav").is_file()


# ---------------------------------------------------------------------------------- bad input


def test_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.wav"
    status, _, err = run(capsys, "enhance", missing, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, missing, "no such file")


def test_corrupt_audio(capsys, tmp_path):
    bad = tmp_path / "random.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    status, _, err = run(capsys, "enhance", bad, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, bad, "cannot read audio")
    assert not (tmp_path / "out.wav").exists()


def test_truncated_wav_header(capsys, tmp_path, wav):
    bad = tmp_path / "truncated.wav"
    bad.write_bytes(wav.read_bytes()[:20])
    status, _, err = run(capsys, "enhance", bad, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, bad)


def test_zero_length_wav(capsys, tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), SR)
    status, _, err = run(capsys, "enhance", empty, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, empty, "no samples")


def test_zero_byte_file(capsys, tmp_path):
    empty = tmp_path / "zero.wav"
    empty.write_bytes(b"")
    status, _, err = run(capsys, "enhance", empty, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, empty, "cannot read audio")


@pytest.mark.parametrize("name", ["notes.txt", "song.mp3"])
def test_unsupported_container(capsys, tmp_path, name):
    bad = tmp_path / name
    bad.write_text("this is text, not audio\n" * 20)
    status, _, err = run(capsys, "enhance", bad, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, bad, "cannot read audio")


def test_folder_without_audio(capsys, tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "readme.txt").write_text("hi")
    status, _, err = run(capsys, "enhance", d, "-o", tmp_path / "out")
    assert_one_line_error(status, err, d, "no audio files")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples(capsys, tmp_path, speech, bad):
    x = speech.copy()
    x[123] = bad
    src = tmp_path / "nan.wav"
    sf.write(src, x, SR, subtype="FLOAT")
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "out.wav")
    assert_one_line_error(status, err, src, "NaN or Inf")
    assert not (tmp_path / "out.wav").exists()


def test_one_bad_file_among_good_ones(capsys, tmp_path, speech):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "good.wav", speech, SR)
    (src / "bad.wav").write_bytes(b"RIFF garbage")
    status, stdout, err = run(capsys, "enhance", src, "-o", tmp_path / "out", "-q")
    assert_one_line_error(status, err, src / "bad.wav")
    assert (tmp_path / "out" / "good.wav").is_file()  # the good file is still enhanced
    assert not (tmp_path / "out" / "bad.wav").exists()


def test_output_equal_to_input(capsys, tmp_path, wav):
    before = wav.read_bytes()
    for extra in ([], ["--overwrite"]):
        status, _, err = run(capsys, "enhance", wav, "-o", wav, *extra)
        assert_one_line_error(status, err, wav, "overwrite an input")
        assert wav.read_bytes() == before
    # Enhancing a folder into itself would write every output over its input.
    status, _, err = run(capsys, "enhance", tmp_path, "-o", tmp_path, "--overwrite")
    assert_one_line_error(status, err, "overwrite an input")
    assert wav.read_bytes() == before


def test_existing_output_needs_overwrite(capsys, tmp_path, wav):
    out = tmp_path / "out.wav"
    out.write_bytes(b"precious")
    status, _, err = run(capsys, "enhance", wav, "-o", out)
    assert_one_line_error(status, err, out, "--overwrite")
    assert out.read_bytes() == b"precious"
    status, _, err = run(capsys, "enhance", wav, "-o", out, "--overwrite", "-q")
    assert status == 0, err
    assert sf.info(out).frames == sf.info(wav).frames


@pytest.mark.parametrize("args, needle", [(["-P", "0"], "update_percent"), (["-P", "101"], "update_percent"), (["--mask-floor-db", "3"], "mask_floor_db")])
def test_bad_parameters(capsys, tmp_path, wav, args, needle):
    status, _, err = run(capsys, "enhance", wav, "-o", tmp_path / "out.wav", *args)
    assert_one_line_error(status, err, needle)


# ------------------------------------------------------------------------------ bad weights


@pytest.fixture(scope="module")
def shipped():
    """(tensors, metadata) of the shipped weight file, read without npdgru's checks."""
    from safetensors import safe_open

    with safe_open(str(SHIPPED), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _bad_weights(tmp_path, shipped, name, mutate_tensors=None, **meta_over):
    tensors, meta = shipped
    tensors = dict(tensors)
    if mutate_tensors:
        mutate_tensors(tensors)
    meta = {**meta, **meta_over}
    p = tmp_path / name
    save_file(tensors, str(p), metadata=meta)
    return p


@pytest.mark.parametrize(
    "case, mutate, meta, needles",
    [
        ("missing", lambda t: t.pop("gru2.weight_hh"), {}, ["missing tensor gru2.weight_hh"]),
        ("shape", lambda t: t.__setitem__("fc1.weight", t["fc1.weight"].T.copy()), {}, ["fc1.weight has shape (161, 400), expected (400, 161)"]),
        ("dtype", lambda t: t.__setitem__("fc4.bias", t["fc4.bias"].astype(np.float64)), {}, ["fc4.bias has dtype float64"]),
        ("version", None, {"format_version": "3"}, ["format_version 3 is newer"]),
        ("two_problems", lambda t: (t.pop("gru1.bias_ih"), t.__setitem__("fc2.bias", t["fc2.bias"][:10].copy())), {}, ["missing tensor gru1.bias_ih", "fc2.bias has shape (10,)"]),
    ],
)
def test_bad_weights(capsys, tmp_path, wav, shipped, case, mutate, meta, needles):
    w = _bad_weights(tmp_path, shipped, f"{case}.safetensors", mutate, **meta)
    out = tmp_path / "out.wav"
    status, _, err = run(capsys, "enhance", wav, "-o", out, "--weights", w)
    assert_one_line_error(status, err, w, *needles)
    assert not out.exists()
    status, stdout, err = run(capsys, "info", w)
    assert_one_line_error(status, err, w, *needles)
    assert stdout == ""


def test_bad_architecture_json_weights(capsys, tmp_path, shipped):
    arch = json.loads(shipped[1]["architecture"])
    arch["layers"][1]["in"] = 300
    w = _bad_weights(tmp_path, shipped, "arch.safetensors", architecture=json.dumps(arch))
    status, _, err = run(capsys, "info", w)
    assert_one_line_error(status, err, w, "gru1", "input size 300")


def test_missing_weights_file(capsys, tmp_path, wav):
    w = tmp_path / "nope.safetensors"
    status, _, err = run(capsys, "enhance", wav, "-o", tmp_path / "out.wav", "--weights", w)
    assert_one_line_error(status, err, w, "no such weight file")


def test_a_closed_stdout_is_one_line_not_a_traceback():
    """`npdgru info FILE | head -1`: the reader may close the pipe before npdgru writes. Here it
    is closed before npdgru starts: one error line naming stdout, exit 2, no traceback."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "npdgru", "info", str(Path(__file__).resolve().parents[1] / "weights" / "nsnet2.safetensors")],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines() == ["npdgru: error: stdout: the reader closed the pipe"], p.stderr
