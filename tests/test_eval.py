"""``npdgru eval`` end to end, through ``npdgru.cli.main([...])``.

The smoke test evaluates the first 3 pairs of ../shared/data/testset at P = 100 and 50 and
checks the outputs against facts that do not come from the evaluation code: the manifest's SNRs
against the SNR measured from the audio, npdgru at P = 100 against onnxruntime running the
original NSNet2 (the same network: the same scores), the MAC counts of NSNet2 worked out by hand,
and the file formats (CSV columns, markdown table, PNG signature and size). A second run with two
worker processes and no ONNX file must reproduce the first run's numbers exactly.

Skips when the eval extra or the test set is absent. The full test-set run is ``slow``.
"""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

for _mod in ("pesq", "pystoi", "onnxruntime", "matplotlib", "speechmos"):
    pytest.importorskip(_mod, reason=f"eval extra missing ({_mod}): pip install -e '.[eval]'")

from cli_run import one_line_error, run  # noqa: E402
from npdgru.cli import main  # noqa: E402
from npdgru.evaluate.runner import default_onnx_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TESTSET = REPO.parent / "shared" / "data" / "testset"
SHIPPED = REPO / "weights" / "nsnet2.safetensors"
COLUMNS = ["file", "snr_db", "snr_measured_db", "row", "engine", "model", "P", "pesq", "estoi", "si_snr", "sig", "bak", "ovrl", "p808", "clipped"]
METRICS = ["pesq", "estoi", "si_snr", "sig", "bak", "ovrl", "p808"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_testset = pytest.mark.skipif(not (TESTSET / "clean").is_dir(), reason=f"test set not found at {TESTSET}")
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames), list(r)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One evaluation of 3 pairs at P = 100, 50 (with the ORT row when the ONNX file is here)."""
    if not (TESTSET / "clean").is_dir():
        pytest.skip(f"test set not found at {TESTSET}")
    out = tmp_path_factory.mktemp("eval")
    status = main(["eval", "--data", str(TESTSET), "--out", str(out), "--limit", "3", "--percents", "100", "50",
                   "--weights", str(SHIPPED), "--timing-frames", "300", "--timing-repeats", "2", "--quiet"])
    assert status == 0
    return out


@needs_testset
def test_smoke_csv(smoke):
    cols, rows = _read_csv(smoke / "per_file.csv")
    assert cols == COLUMNS
    have_onnx = default_onnx_path().is_file()
    names = ["clean", "noisy"] + (["NSNet2 ONNX (onnxruntime)"] if have_onnx else []) + ["nsnet2 P=100", "nsnet2 P=50"]
    files = sorted(p.name for p in (TESTSET / "noisy").iterdir())[:3]
    assert len(rows) == 3 * len(names)
    assert [(r["file"], r["row"]) for r in rows] == [(f, n) for f in files for n in names]

    manifest = {r["id"]: float(r["snr_db"]) for r in csv.DictReader(open(TESTSET / "manifest.csv"))}
    for r in rows:
        assert float(r["snr_db"]) == manifest[Path(r["file"]).stem]
        # The SNR from the audio (noisy - clean is the scaled noise) agrees with the manifest.
        assert float(r["snr_measured_db"]) == pytest.approx(float(r["snr_db"]), abs=0.1), r["file"]
        for m in ("sig", "bak", "ovrl", "p808"):
            assert 1.0 <= float(r[m]) <= 5.0, (r["row"], m, r[m])
        if r["row"] == "clean":
            assert r["pesq"] == r["estoi"] == r["si_snr"] == ""
            continue
        assert 1.0 <= float(r["pesq"]) <= 4.65 and 0.0 <= float(r["estoi"]) <= 1.0
        if r["row"] == "noisy":  # noise independent of speech: SI-SNR of the mixture ~ its SNR
            assert float(r["si_snr"]) == pytest.approx(float(r["snr_db"]), abs=1.0), r["file"]

    by = {(r["file"], r["row"]): r for r in rows}
    for f in files:
        # NSNet2 improves on the noisy input at P = 100 in BAK (it removes noise).
        assert float(by[f, "nsnet2 P=100"]["bak"]) > float(by[f, "noisy"]["bak"])
        if have_onnx:  # the same network through onnxruntime: the same scores
            for m in METRICS:
                a, b = float(by[f, "nsnet2 P=100"][m]), float(by[f, "NSNet2 ONNX (onnxruntime)"][m])
                assert a == pytest.approx(b, abs=2e-3, rel=1e-3), (f, m, a, b)


@needs_testset
def test_smoke_summary(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    rows = {r["name"]: r for r in s["rows"]}
    _, per_file = _read_csv(smoke / "per_file.csv")
    for name, r in rows.items():
        assert r["files"] == 3
        for m in METRICS:
            vals = [float(x[m]) for x in per_file if x["row"] == name and x[m] != ""]
            if vals:
                assert r["mean"][m] == pytest.approx(np.mean(vals), abs=1e-5), (name, m)
    # NSNet2 (H = 400, I = 400, two GRU layers; fc 161-400, 400-600, 600-600, 600-161), by hand:
    dense = 2 * 3 * 400 * (400 + 400)  # 1,920,000
    other = 161 * 400 + 400 * 600 + 600 * 600 + 600 * 161  # 761,000
    p100, p50 = rows["nsnet2 P=100"], rows["nsnet2 P=50"]
    assert p100["macs"]["gru_dense"] == p100["macs"]["gru_paper"] == p100["macs"]["gru_ours"] == dense
    assert p50["macs"]["gru_dense"] == dense and p50["macs"]["other"] == other
    assert p50["macs"]["gru_paper"] == 2 * (400 + 2 * 200) * (400 + 400)  # (1 + 2P)/3 of dense
    assert p50["macs"]["gru_ours"] == 2 * (3 * 400 * 400 + 3 * 400 * 200)  # dense input + A columns
    assert p50["fraction_updated"] == 0.5 and p100["fraction_updated"] == 1.0
    for name in ("nsnet2 P=100", "nsnet2 P=50"):
        assert 1.0 < rows[name]["us_per_frame"] < 10_000.0
    assert rows["noisy"]["us_per_frame"] is None
    assert set(s["snr_groups_db"]) == {"-5", "0", "5"}  # the first 3 pairs: -5, 0, 5 dB


@needs_testset
def test_smoke_markdown_and_png(smoke):
    md = (smoke / "summary.md").read_text()
    lines = md.splitlines()
    header = [l for l in lines if l.startswith("| row | P |")]
    assert len(header) == 1
    cells = [c.strip() for c in header[0].strip("|").split("|")]
    assert cells[:2] == ["row", "P"] and {"PESQ", "ESTOI", "SI-SNR (dB)", "SIG", "BAK", "OVRL", "P.808", "model us/frame best (median)"} <= set(cells)
    i = lines.index(header[0])
    table = []
    for l in lines[i + 2 :]:
        if not l.startswith("|"):
            break
        table.append(l)
    assert [l.split("|")[1].strip() for l in table][:2] == ["clean", "noisy"]
    assert any(l.startswith("| nsnet2 P=50 |") for l in table)
    assert all(l.count("|") == header[0].count("|") for l in table)
    assert "## By input SNR" in md and "delta PESQ" in md and "-5 dB" in md

    png = (smoke / "quality_vs_compute.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 600 and height > 400
    import matplotlib.image

    img = matplotlib.image.imread(str(smoke / "quality_vs_compute.png"))
    assert img.shape[:2] == (height, width) and img.std() > 0.01  # decodes, not blank


@needs_testset
def test_jobs_and_missing_onnx(smoke, tmp_path, capsys, monkeypatch):
    """Two workers, and the ONNX row left out with a note: the same numbers as the first run."""
    monkeypatch.setenv("NPDGRU_NSNET2_ONNX", str(tmp_path / "absent.onnx"))
    status, out, err = run(capsys, "eval", "--data", TESTSET, "--out", tmp_path / "j2", "--limit", "2", "--percents", "50",
                            "--weights", SHIPPED, "--jobs", "2", "--timing-frames", "100", "--timing-repeats", "1", "--quiet")
    assert status == 0, err
    assert "absent.onnx not found" in out and "left out" in out
    _, rows = _read_csv(tmp_path / "j2" / "per_file.csv")
    assert [r["row"] for r in rows] == ["clean", "noisy", "nsnet2 P=50"] * 2
    _, first = _read_csv(smoke / "per_file.csv")
    first = {(r["file"], r["row"]): r for r in first}
    for r in rows:
        assert r == first[r["file"], r["row"]], r


@needs_testset
def test_no_reference_keeps_only_the_model_rows(smoke, tmp_path, capsys):
    """--no-reference: only the weight files' rows, with the numbers of the full run."""
    status, out, err = run(capsys, "eval", "--data", TESTSET, "--out", tmp_path / "nr", "--limit", "1", "--percents", "50",
                            "--weights", SHIPPED, "--no-reference", "--timing-frames", "100", "--timing-repeats", "1", "--quiet")
    assert status == 0, err
    _, rows = _read_csv(tmp_path / "nr" / "per_file.csv")
    assert [r["row"] for r in rows] == ["nsnet2 P=50"]
    _, first = _read_csv(smoke / "per_file.csv")
    assert rows[0] == next(r for r in first if r["file"] == rows[0]["file"] and r["row"] == "nsnet2 P=50")


def _merge_eval():
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_eval", REPO / "tools" / "merge_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@needs_testset
def test_merge_eval_retime(smoke, tmp_path, capsys):
    """tools/merge_eval.py keeps the quality of the runs it merges and, with --retime, times every
    kept row again in one run; a model that no run holds is named."""
    merge = _merge_eval()
    assert merge([str(smoke), "--models", "nsnet2", "--out", str(tmp_path / "m"), "--retime", "--timing-frames", "100", "--timing-repeats", "1"]) == 0
    before = json.loads((smoke / "summary.json").read_text())
    after = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [r["name"] for r in after["rows"]] == [r["name"] for r in before["rows"]]
    for a, b in zip(after["rows"], before["rows"]):
        assert a["mean"] == b["mean"], a["name"]
        if a["engine"] in ("npdgru", "onnxruntime"):
            assert math.isfinite(a["us_per_frame"]) and a["us_per_frame"] > 0, a
            assert a["us_per_frame_median"] >= a["us_per_frame"]
    assert after["meta"]["timing"].startswith("re-timed together") and "100 frames" in after["meta"]["timing"]
    assert (tmp_path / "m" / "quality_vs_compute.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| nsnet2 P=50 |" in (tmp_path / "m" / "summary.md").read_text()
    # a later run replaces the rows of the same model and P: here the --no-reference-style rerun at P = 50
    later = json.loads((smoke / "summary.json").read_text())
    later["rows"] = [dict(r, mean=dict(r["mean"], pesq=9.0)) for r in later["rows"] if r["name"] == "nsnet2 P=50"]
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "summary.json").write_text(json.dumps(later))
    assert merge([str(smoke), str(tmp_path / "later"), "--models", "nsnet2", "--out", str(tmp_path / "m2")]) == 0
    merged = {r["name"]: r for r in json.loads((tmp_path / "m2" / "summary.json").read_text())["rows"]}
    assert merged["nsnet2 P=50"]["mean"]["pesq"] == 9.0 and merged["nsnet2 P=100"]["mean"] == next(r["mean"] for r in before["rows"] if r["name"] == "nsnet2 P=100")
    assert list(merged)[-2:] == ["nsnet2 P=100", "nsnet2 P=50"]
    assert merge([str(smoke), "--models", "no-such-model", "--out", str(tmp_path / "x")]) == 1
    assert "no-such-model" in capsys.readouterr().err


def test_without_manifest_the_snr_is_measured(tmp_path, capsys):
    """No manifest.csv: the SNR comes from the audio and groups to the nearest 5 dB."""
    data = tmp_path / "d"
    for sub, src in (("clean", "clean_dishes_5db.flac"), ("noisy", "noisy_dishes_5db.flac")):
        (data / sub).mkdir(parents=True)
        (data / sub / "dishes.flac").write_bytes((REPO / "examples" / src).read_bytes())
    status, out, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "o", "--percents", "25", "--weights", SHIPPED,
                            "--timing-frames", "50", "--timing-repeats", "1", "--quiet")
    assert status == 0, err
    _, rows = _read_csv(tmp_path / "o" / "per_file.csv")
    assert {r["file"] for r in rows} == {"dishes.flac"} and rows[-1]["row"] == "nsnet2 P=25"
    assert float(rows[0]["snr_db"]) == pytest.approx(5.0, abs=0.1)  # the example is a 5 dB mixture
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["snr_groups_db"] == ["5"] and s["meta"]["snr_source"].startswith("measured")


def _pair_folder(root: Path, names, *, sr=16000, seconds=1.0, clean_names=None):
    rng = np.random.default_rng(1)
    for sub, ns in (("clean", clean_names if clean_names is not None else names), ("noisy", names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for n in ns:
            sf.write(root / sub / n, 0.1 * rng.standard_normal(int(sr * seconds)), sr, subtype="PCM_16")
    return root


def test_missing_pair_is_named(tmp_path, capsys):
    data = _pair_folder(tmp_path / "d", ["a.wav", "b.wav"], clean_names=["a.wav"])
    status, _, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "o", "--quiet")
    one_line_error(status, err, "b.wav", "no clean file")


def test_wrong_rate_is_named(tmp_path, capsys):
    data = _pair_folder(tmp_path / "d", ["a.wav"], sr=8000)
    status, _, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "o", "--quiet")
    one_line_error(status, err, "a.wav", "8000 Hz", "16000")


def test_bad_folders_and_options(tmp_path, capsys):
    status, _, err = run(capsys, "eval", "--data", tmp_path / "nothing", "--out", tmp_path / "o")
    one_line_error(status, err, "nothing", "no such folder")
    (tmp_path / "half" / "noisy").mkdir(parents=True)
    status, _, err = run(capsys, "eval", "--data", tmp_path / "half", "--out", tmp_path / "o")
    one_line_error(status, err, "half", "clean/")
    data = _pair_folder(tmp_path / "d", ["a.wav"])
    status, _, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "o", "--onnx", tmp_path / "no.onnx")
    one_line_error(status, err, "no.onnx")
    status, _, err = run(capsys, "eval", "--data", data, "--out", tmp_path / "o", "--percents", "0")
    one_line_error(status, err, "update_percent")
    with pytest.raises(SystemExit):  # argparse: --jobs must be a positive integer
        main(["eval", "--data", str(data), "--out", str(tmp_path / "o"), "--jobs", "0"])
    capsys.readouterr()


def test_missing_eval_extra_is_one_line(tmp_path, capsys, monkeypatch):
    import npdgru.evaluate

    monkeypatch.setattr(npdgru.evaluate, "missing_dependencies", lambda: ["pesq", "speechmos"])
    status, out, err = run(capsys, "eval", "--data", tmp_path, "--out", tmp_path / "o")
    one_line_error(status, err, "pesq, speechmos", 'pip install -e ".[eval]"')
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@needs_testset
def test_full_testset(tmp_path):
    """The whole test set (250 pairs) at the default percentages: 20-40 min on 2 cores."""
    shipped = [str(p) for p in sorted((Path(__file__).resolve().parents[1] / "weights").glob("*.safetensors"))]
    assert main(["eval", "--data", str(TESTSET), "--out", str(tmp_path), "--quiet", "--weights", *shipped]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["meta"]["pairs"] == 250
    rows = {r["name"]: r for r in s["rows"]}
    assert rows["nsnet2 P=100"]["mean"]["pesq"] > rows["noisy"]["mean"]["pesq"]
    assert all(math.isfinite(v) for r in s["rows"] for v in r["mean"].values() if v is not None)


@needs_testset
def test_a_gated_model_is_one_row_with_its_measured_work(tmp_path, capsys):
    """A threshold-gate model (the shipped NSNet2 with u > 0.5 as its gate, untrained for it: a
    cost row, not a quality one) evaluated at two P gives one row (the gate reads no P) named by
    its gate, with the share of neurons updated and the MACs measured on the timing frames
    (MaskModel.work_per_frame on the same features: recomputed here)."""
    from npdgru.evaluate.runner import _timing_features, find_pairs
    from npdgru.model import MaskModel
    from npdgru.weights import load_weights, save_weights

    w = load_weights(SHIPPED)
    arch = json.loads(json.dumps(w.architecture))
    for layer in arch["layers"]:
        if layer["kind"] == "gru":
            layer.update(gate="threshold", theta=0.5)
    gated = tmp_path / "gated.safetensors"
    save_weights(gated, w.tensors, architecture=arch)
    status, out, err = run(capsys, "eval", "--data", TESTSET, "--out", tmp_path / "g", "--limit", "1", "--percents", "100", "50",
                            "--weights", gated, "--no-reference", "--timing-frames", "200", "--timing-repeats", "1", "--quiet")
    assert status == 0, err
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["name"] == "gated threshold 0.5" and row["gate"] == "threshold 0.5"
    m = MaskModel(load_weights(gated), backend="cpu")
    work = m.work_per_frame(_timing_features(find_pairs(TESTSET, limit=1), 200))
    share = (work["gru1"].state_columns + work["gru2"].state_columns) / 800
    assert row["fraction_updated"] == pytest.approx(share.mean()) and row["fraction_updated_p99"] == pytest.approx(np.percentile(share, 99))
    assert 0.0 < share.mean() < 1.0
    macs = 2 * 3 * 400 * 400 + 3 * 400 * (work["gru1"].state_columns.mean().round() + work["gru2"].state_columns.mean().round())
    assert row["macs"]["gru_ours"] == macs and row["macs"]["gru_dense"] == 2 * 3 * 400 * 800
    md = (tmp_path / "g" / "summary.md").read_text()
    assert f"| gated threshold 0.5 | - | - | {100 * share.mean():.0f}% (p99 {100 * np.percentile(share, 99):.0f}%) |" in md
