"""``npdgru explain`` and :mod:`npdgru.explain`: the page of what the D-GRU selects.

What the page shows is checked against sources that do not come from the page's own code:

* the selection raster (decoded from the page's PNG by the small decoder below): exactly A
  neurons per frame; the same bits as a fresh cpu ``GRULayer.forward(..., selected=S)`` on the
  step's input (frame by frame and in one call); and, teacher forced from the kernel's state, the
  NumPy reference ``dgru_step`` in float64 (wherever its margin between the A-th and (A+1)-th
  largest u is >= MARGIN: closer is a tie that float32 may break the other way);
* the drift numbers: |M - (W_hh h + b_hh)| recomputed here with ``np.einsum`` in float64 from the
  fresh layer's state after each frame;
* the MAC table: ``Plan.macs()`` / ``Plan.step_macs()`` of the model as ``npdgru enhance`` builds
  it, and the dense count 3H(I + H) per band from the architecture;
* the mask: ``MaskModel.forward`` of ``Enhancer(exact=True)``, bit for bit.

A short clip of examples/noisy_dishes_5db.flac keeps it fast (51 frames; 151 where a refresh
must fall inside).
"""

from __future__ import annotations

import base64
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npdgru import reference as ref
from npdgru import stft
from npdgru.enhance import Enhancer
from npdgru.explain import explain, explain_file, png_indexed
from npdgru.kernels import cpu
from cli_run import run, one_line_error

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "noisy_dishes_5db.flac"
SR = 16000
MARGIN = 1e-5  # float32 vs float64 u closer than this is a tie (as tests/test_kernels_drift.py)

pytestmark = [pytest.mark.usefixtures("warm_kernels"), pytest.mark.skipif(not EXAMPLE.is_file(), reason="examples/noisy_dishes_5db.flac missing")]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """0.5 s of the example as a 16-bit WAV."""
    x, sr = sf.read(str(EXAMPLE), dtype="float32", always_2d=True)
    p = tmp_path_factory.mktemp("explain") / "clip.wav"
    sf.write(p, x[: sr // 2, 0], sr, subtype="PCM_16")
    return p


def decode_png(data: bytes):
    """(indices (rows, columns) uint8, palette (n, 3) uint8) of an 8-bit indexed PNG with filter 0."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, palette, head = 8, b"", None, None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        if tag == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif tag == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype = head[:4]
    assert (depth, ctype) == (8, 3)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:], palette


def figure_png(page: str, fig_id: str) -> bytes:
    m = re.search(rf'<svg id="{re.escape(fig_id)}".*?href="data:image/png;base64,([A-Za-z0-9+/=]+)"', page, re.S)
    assert m, fig_id
    return base64.b64decode(m.group(1))


def weights64(e, name):
    t = e.weights.tensors
    return tuple(np.asarray(t[f"{name}.{k}"], np.float64) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


def fresh_run(e, tr):
    """The step's layer made anew from the weights and run frame by frame on the shown band's
    input: (h (T, H), selected (T, H), drift max and mean (T,), input accumulator drift max (T,),
    the drifts by einsum in float64)."""
    t = e.weights.tensors
    W = [t[f"{tr.name}.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    layer = cpu.GRULayer(*W, A=None if tr.dense else tr.A, update_percent=100.0, sparse_input=tr.sparse_input, exact=True)
    st = layer.init_state(1)
    T, H = tr.selected.shape
    h, sel = np.zeros((T, H), np.float32), np.zeros((T, 1, H), bool)
    dmax, dmean, gmax = np.full(T, np.nan), np.full(T, np.nan), np.full(T, np.nan)
    w_ih, w_hh, b_ih, b_hh = (np.asarray(a, np.float64) for a in W)
    for k in range(T):
        h[k] = layer.forward(tr.x[k : k + 1, None], st, selected=sel[k : k + 1])[0, 0]
        if not tr.dense:
            d = np.abs(st.m[0].astype(np.float64) - (np.einsum("ij,j->i", w_hh, st.h[0].astype(np.float64)) + b_hh))
            dmax[k], dmean[k] = d.max(), d.mean()
        if tr.sparse_input:
            gmax[k] = np.abs(st.g[0].astype(np.float64) - (np.einsum("ij,j->i", w_ih, tr.x[k].astype(np.float64)) + b_ih)).max()
    whole = np.zeros((T, 1, H), bool)  # the same layer over all frames in one call
    layer.forward(tr.x[:, None], layer.init_state(1), selected=whole)
    assert np.array_equal(whole[:, 0], sel[:, 0]), f"{tr.name}: one call vs frame by frame"
    return h, sel[:, 0], dmax, dmean, gmax


def check_page(page: str, e, P_expected: float, **model):
    ids = set(re.findall(r'id="([^"]+)"', page))
    for section in ("summary", "spectrograms", "layers", "notes", "fig-noisy", "fig-mask", "fig-enhanced"):
        assert section in ids, section
    # offline: nothing is fetched (the one URL is the SVG namespace, an identifier)
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert set(re.findall(r'href="([a-z]+):', page)) == {"data"}
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}
    # the MAC table: Plan.macs() of the model as npdgru enhance builds it
    plan = Enhancer(update_percent=P_expected, **model).model.plan
    macs = plan.macs()
    for k, v in macs.items():
        m = re.search(rf'id="macs-{k}" data-value="(\d+)">([\d,]+)<', page)
        assert m and int(m.group(1)) == v and m.group(2) == f"{v:,}", k
    steps = plan.state_steps
    assert [tr.name for tr in e.layers] == [s.name for s in steps]
    per = plan.step_macs()
    assert {k: sum(c.get(k, 0) for c in per.values()) for k in macs} == macs
    dense = 0
    for s in steps:
        assert f'id="layer-{s.name}"' in page
        row = re.search(rf'<tr id="step-{s.name}">(.*?)</tr>', page).group(1)
        values = [int(v) for v in re.findall(r'data-value="(\d+)"', row)]
        assert values == [s.A, per[s.name]["gru_dense"], per[s.name]["gru_paper"], per[s.name]["gru_ours"]]
        assert s.A == ref.num_selected(P_expected, s.hidden)
        dense += s.bands * 3 * s.hidden * (s.size_in + s.hidden)  # docs/design.md: 3H(I + H) per band
    assert macs["gru_dense"] == dense
    saved = float(re.search(r'id="saved-model" data-value="([^"]+)"', page).group(1))
    assert saved == pytest.approx(1 - (macs["gru_ours"] + macs["other"]) / (macs["gru_dense"] + macs["other"]), abs=1e-12)


def check_layers(page: str, e):
    for tr in e.layers:
        T, H = tr.selected.shape
        idx, pal = decode_png(figure_png(page, f"fig-{tr.name}-raster"))
        assert idx.shape == (H, T) and pal.shape == (2, 3)
        raster = idx.T.astype(bool)  # (T, H): what the page shows
        assert (raster.sum(axis=1) == tr.A).all(), f"{tr.name}: not A neurons in every frame"
        assert np.array_equal(raster, tr.selected)
        h, sel, dmax, dmean, gmax = fresh_run(e, tr)
        assert np.array_equal(sel, raster), f"{tr.name}: the page's raster is not the cpu layer's selection"
        # teacher forced against the float64 reference: each frame from the kernel's previous h
        w_ih, w_hh, b_ih, b_hh = weights64(e, tr.name)
        prev = np.zeros(H)
        for k in range(T):
            x = tr.x[k].astype(np.float64)
            h_ref, S_ref = ref.dgru_step(x, prev, w_ih, w_hh, b_ih, b_hh, tr.A)
            if not np.array_equal(S_ref, raster[k]):
                z = ref.sigmoid((w_ih @ x + b_ih)[H : 2 * H] + (w_hh @ prev + b_hh)[H : 2 * H])
                u = np.sort(1.0 - z)[::-1]
                assert u[tr.A - 1] - u[tr.A] < MARGIN, f"{tr.name} frame {k}: selection differs from the reference with margin {u[tr.A - 1] - u[tr.A]:.2e}"
            else:
                np.testing.assert_allclose(h[k], h_ref, atol=1e-4, err_msg=f"{tr.name} frame {k}")
            prev = h[k].astype(np.float64)
        assert np.array_equal(tr.changed, np.count_nonzero(h != np.vstack([np.zeros((1, H), np.float32), h[:-1]]), axis=1))
        if tr.dense:
            assert np.isnan(tr.drift_max).all() and "no drift to show" in page
            continue
        np.testing.assert_allclose(tr.drift_max[:, tr.band], dmax, rtol=1e-9, atol=1e-13, err_msg=tr.name)
        np.testing.assert_allclose(tr.drift_mean[:, tr.band], dmean, rtol=1e-9, atol=1e-13, err_msg=tr.name)
        assert 0 < dmax.max() < 1e-3  # float32 rounding, bounded by the refresh
        assert np.isnan(gmax).all() != tr.sparse_input
        np.testing.assert_allclose(tr.input_drift_max[:, tr.band], gmax, rtol=1e-9, atol=1e-13, err_msg=tr.name)
        section = page[page.index(f'id="layer-{tr.name}"') :]
        assert re.search(r'class="drift-max">([^<]+)<', section).group(1) == f"{np.nanmax(tr.drift_max[:, tr.band]):.2e}"


@pytest.mark.parametrize("model, P, band", [("nsnet2-kd-anyp", 50.0, 0), ("dprnn", 25.0, 3), ("mpt", 50.0, 0), ("nsnet2", 100.0, 0)])
def test_page_matches_independent_sources(tmp_path, clip, model, P, band):
    out = tmp_path / "page.html"
    e = explain_file(clip, out, model=model, update_percent=P, band=band)
    page = out.read_text(encoding="utf-8")
    assert e.frames == stft.num_frames(SR // 2) == 51
    check_page(page, e, P, model=model)
    check_layers(page, e)
    if model == "nsnet2-kd-anyp":  # P <= 50 on cpu: gru2's input product from gru1's changed entries
        assert e.layers[1].sparse_input and not np.isnan(e.layers[1].input_drift_max).any()
    multi = [tr for tr in e.layers if tr.bands > 1]
    assert all(tr.band == band for tr in multi) and all(tr.band == 0 for tr in e.layers if tr.bands == 1)
    # the mask is the exact model's, bit for bit (clipped at -80 dB as enhance applies it)
    x, _ = sf.read(str(clip), dtype="float32")
    enh = Enhancer(model=model, update_percent=P, exact=True)
    X = stft.stft(x)
    mask = enh.model.forward(stft.log_power(X)[:, None, :], enh.model.init_state(1))[:, 0]
    assert np.array_equal(e.mask, np.clip(mask, enh.mask_floor, np.float32(1.0)))
    assert np.array_equal(e.spectrum, X)


def test_refresh_inside_the_frames():
    """151 frames: the accumulators are recomputed before frame 128; the drift falls there."""
    e = explain(EXAMPLE, model="nsnet2-kd-anyp", update_percent=50, seconds=1.5)
    assert e.frames == 151
    for tr in e.layers:
        R = tr.refresh_every
        assert R == 128
        d = tr.drift_max[:, 0]
        assert d[R] < d[R - 1] / 4, f"{tr.name}: drift {d[R - 1]:.2e} before the refresh, {d[R]:.2e} after"
        _, _, dmax, _, _ = fresh_run(e, tr)
        np.testing.assert_allclose(d, dmax, rtol=1e-9, atol=1e-13)


def test_tiny_model_other_rate_stereo_part(tmp_path):
    """A weight file (--weights) of a tiny model, a 48 kHz stereo input, 0.3 s from 0.1 s: the
    first channel, resampled to 16 kHz as npdgru enhance resamples it."""
    from npdgru.architectures import tiny_weights
    from npdgru.resample import resample_signal
    from npdgru.weights import save_weights

    w = tiny_weights(seed=3)
    wfile = tmp_path / "tiny.safetensors"
    save_weights(wfile, w.tensors, architecture=w.architecture)
    x, sr = sf.read(str(EXAMPLE), dtype="float32", always_2d=True)
    x48 = resample_signal(x[:, :1], sr, 48000)[:, 0]
    stereo = np.stack([x48, 0.5 * x48[::-1]], axis=1)
    src = tmp_path / "stereo48.wav"
    sf.write(src, stereo, 48000, subtype="FLOAT")
    out = tmp_path / "tiny.html"
    e = explain_file(src, out, weights=wfile, update_percent=37.5, start=0.1, seconds=0.3)
    page = out.read_text(encoding="utf-8")
    x16 = resample_signal(stereo[4800:19200, :1], 48000, 16000)[:, 0]
    assert e.frames == stft.num_frames(len(x16)) and np.array_equal(e.spectrum, stft.stft(x16))
    assert [tr.A for tr in e.layers] == [3, 3]  # ceil(37.5 * 8 / 100)
    assert "48000 Hz, 2 channels; shown: channel 1, resampled to 16 kHz" in page and "tiny" in page
    check_page(page, e, 37.5, weights=str(wfile))
    check_layers(page, e)


def test_png_round_trip():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 7, (5, 9)).astype(np.uint8)
    pal = rng.integers(0, 256, (7, 3)).astype(np.uint8)
    got, got_pal = decode_png(png_indexed(idx, pal))
    assert np.array_equal(got, idx) and np.array_equal(got_pal, pal)


# ------------------------------------------------------------------------------- command line


def test_cli_writes_the_page(capsys, tmp_path, clip):
    out = tmp_path / "page.html"
    status, stdout, err = run(capsys, "explain", clip, "-o", out, "-m", "dprnn", "-P", "25", "--band", "40", "-q")
    assert status == 0, err
    assert f"wrote {out}" in stdout and "51 frames" in stdout and "P=25" in stdout
    page = out.read_text(encoding="utf-8")
    assert "band 40 of 41" in page and page.rstrip().endswith("</html>")
    assert not list(tmp_path.glob(".npdgru-*"))  # no temporary file left


def test_cli_errors(capsys, tmp_path, clip):
    out = tmp_path / "page.html"
    one_line_error(*run(capsys, "explain", tmp_path / "nope.wav", "-o", out)[::2], tmp_path / "nope.wav", "no such file")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    one_line_error(*run(capsys, "explain", bad, "-o", out)[::2], bad, "cannot read audio")
    for P in ("0", "101", "nan"):
        one_line_error(*run(capsys, "explain", clip, "-o", out, "-P", P)[::2], "update_percent")
    one_line_error(*run(capsys, "explain", clip, "-o", out, "-m", "dprnn", "--band", "41")[::2], "band=41", "0 to 40")
    one_line_error(*run(capsys, "explain", clip, "-o", out, "--band", "1")[::2], "band=1")
    one_line_error(*run(capsys, "explain", clip, "-o", out, "--start", "9")[::2], clip, "after the end")
    one_line_error(*run(capsys, "explain", clip, "-o", out, "--seconds", "0")[::2], "seconds")
    one_line_error(*run(capsys, "explain", clip, "-o", tmp_path)[::2], tmp_path, "is a folder")
    one_line_error(*run(capsys, "explain", clip, "-o", clip, "--overwrite")[::2], clip, "overwrite the input")
    one_line_error(*run(capsys, "explain", clip, "-o", out, "-m", "dprnn", "--weights", clip)[::2], "not both")
    assert not out.exists()
    out.write_text("precious")
    one_line_error(*run(capsys, "explain", clip, "-o", out)[::2], out, "--overwrite")
    assert out.read_text() == "precious"
    status, _, err = run(capsys, "explain", clip, "-o", out, "--overwrite", "-q")
    assert status == 0, err
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
