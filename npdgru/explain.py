"""``npdgru explain``: one self-contained HTML page that shows what the D-GRU selects.

For one input file the page shows the noisy and enhanced spectrograms and the mask, and for every
D-GRU step of the model (every layer that recurs along time):

* a raster of the neurons updated in each frame (neurons x frames; the A largest u = 1 - z);
* the number of selected neurons per frame (A by construction) and of neurons whose value
  actually changed (a selected neuron whose update rounds away in float32 keeps its bits);
* the drift of the recurrent accumulators M: after each frame, ``|M - (W_hh h + b_hh)|`` with the
  product recomputed in float64 from the kernel's own float32 state h, max and mean over the 3H
  entries, against the refresh period (M is recomputed exactly every ``refresh_every`` frames);
  for a step whose input product runs from the changed input entries, also its input
  accumulator ``|g - (W_ih x + b_ih)|``;
* a table of the model, P, A per layer, the frames and the MACs per frame of
  :meth:`npdgru.plan.Plan.macs` (per step :meth:`~npdgru.plan.Plan.step_macs`) with the share saved.

A step with F bands (DPRNN's inter-frame layers: 41 bands sharing weights) is shown for one band
(``band``, default 0), the drift also as its maximum over all bands.

The run is the cpu backend with ``exact=True``, one frame per call for the D-GRU steps: the
masks are those of the streaming hop and of ``npdgru enhance --exact``, bit for bit. Only the
first channel of the input is shown, resampled to 16 kHz like ``npdgru enhance`` does.

The page needs nothing but the standard library and NumPy: images are PNGs written here
(zlib + struct, 8-bit indexed colour) and embedded as base64 inside inline SVG figures, whose axes
and curves are SVG too; no script, font or file is loaded from anywhere.
"""

from __future__ import annotations

import base64
import html
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import stft
from .audio import read_audio
from .enhance import Enhancer
from .errors import AudioError, ParameterError
from .resample import resample_signal

__all__ = ["LayerTrace", "Explanation", "trace", "explain", "render_page", "explain_file", "DEFAULT_SECONDS"]

DEFAULT_SECONDS = 30.0  # the page shows at most this much of the input (frames are pixels)
FRAME_SECONDS = stft.HOP / stft.SAMPLE_RATE  # 10 ms: frame t is centred on t·HOP (stft.py)


@dataclass
class LayerTrace:
    """One D-GRU step, frame by frame (T frames, one stream).

    name, hidden, A, bands   the plan step's name, H, A and F
    band                     the band shown (0 for a step with one band)
    dense                    P = 100: the dense GRU kernel runs, no accumulators (drift is NaN)
    sparse_input             the input product runs from the changed columns of the input
    refresh_every            the accumulators' refresh period in frames (refreshed before frames 0, R, 2R, ...)
    x         (T, I) float32 the shown band's input, as the step read it
    selected  (T, H) bool    the shown band's selected neurons per frame
    changed   (T,) int       neurons of the shown band whose float32 value changed in the frame
    drift_max, drift_mean  (T, F) float64  max / mean over the 3H entries of |M - (W_hh h + b_hh)|
                             after each frame, per band (the product in float64 from the float32 h)
    input_drift_max (T, F) float64  sparse-input steps: max over 3H of |g - (W_ih x + b_ih)|, the
                             input accumulator against the frame's input x; NaN otherwise
    """

    name: str
    hidden: int
    A: int
    bands: int
    band: int
    dense: bool
    sparse_input: bool
    refresh_every: int
    x: np.ndarray
    selected: np.ndarray
    changed: np.ndarray
    drift_max: np.ndarray
    drift_mean: np.ndarray
    input_drift_max: np.ndarray


@dataclass
class Explanation:
    """What :func:`explain` computed for one input: the page's data (:func:`render_page`)."""

    source: str
    model_name: str
    update_percent: float
    sample_rate: int  # of the input file
    channels: int
    start: float  # seconds into the input where the frames begin
    seconds: float  # seconds of input shown
    total_seconds: float
    spectrum: np.ndarray  # (T, 161) complex64 noisy STFT
    mask: np.ndarray  # (T, 161) float32, clipped to [mask floor, 1] as npdgru enhance applies it
    layers: list = field(default_factory=list)  # LayerTrace per D-GRU step, in plan order
    plan: object = None  # the model's npdgru.plan.Plan (MACs, A, bands)
    weights: object = None  # the loaded npdgru.weights.Weights

    @property
    def frames(self) -> int:
        return self.spectrum.shape[0]


# --------------------------------------------------------------------------------------------
# the run: the executor's steps, the D-GRU steps one frame at a time
# --------------------------------------------------------------------------------------------


def trace(model, features, *, band: int = 0):
    """The mask of one stream with every D-GRU step traced frame by frame.

    Walks the plan as the executor does (each step's runner on its inputs), except that a step
    that carries state runs one frame per call through its layer's public ``forward(...,
    selected=)``, and after each frame the accumulator M of its state is compared with a fresh
    float64 product. The cpu executor only: its state holds M (``GRUState.m``).

    Parameters
    ----------
    model : a :class:`npdgru.model.MaskModel` on the cpu backend
    features : (T, n_features) log-power features of one stream
    band : the band shown of steps with several bands

    Returns
    -------
    mask (T, n_features) float32, [LayerTrace per D-GRU step]
    """
    ex, plan = model.executor, model.plan
    if ex.backend != "cpu":
        raise ParameterError(f"explain traces the cpu backend's accumulators, not the {ex.backend!r} backend")
    state = model.init_state(1)
    x = ex.check_features(np.asarray(features)[:, None, :], state)
    T = x.shape[0]
    values = [None] * (len(plan.steps) + 1)
    values[0] = x
    layers = []
    for s, run in zip(plan.steps, ex.steps):
        xs = [values[i] for i in s.slots]
        if run.state_layer is None:
            values[s.slot] = run(xs, state, T, 1)
            continue
        tr, y = _trace_step(s, run.state_layer, state.layers[s.state_index], xs[0].reshape(T, s.bands, s.size_in), band)
        values[s.slot] = y.reshape(T, 1, s.width)
        layers.append(tr)
    return ex.finish(values[-1])[:, 0, :], layers


_DRIFT_BLOCK = 128  # frames whose states are kept and compared in one float64 matrix product


def _trace_step(s, layer, st, x, band):
    """One D-GRU step over x (T, F, I), one frame per call; (LayerTrace, y (T, F, H)).

    The states after each frame are kept for a block of frames and compared with the float64
    products of the whole block at once (one matrix-matrix product instead of a matrix-vector
    product per frame, which would read the weights from memory again for every frame)."""
    T, F, H = x.shape[0], s.bands, s.hidden
    b = band if F > 1 else 0
    sel = np.zeros((T, F, H), np.bool_)
    y = np.empty((T, F, H), np.float32)
    dmax, dmean, gmax = (np.full((T, F), np.nan) for _ in range(3))
    accumulates = not s.dense  # P = 100: the dense kernel, no accumulators
    input_acc = s.sparse_input and accumulates  # one frame per call: the input accumulator runs
    K = min(T, _DRIFT_BLOCK)
    m_blk, h_blk = np.empty((K, F, 3 * H), np.float32), np.empty((K, F, H), np.float32)
    g_blk = np.empty((K, F, 3 * H), np.float32) if input_acc else None
    if accumulates:  # float64: the exact side of the comparison
        w_t, bias = layer.weight_hh.astype(np.float64).T, layer.bias_hh.astype(np.float64)  # (H, 3H), (3H,)
        wi_t, bias_i = layer.weight_ih.astype(np.float64).T, layer.bias_ih.astype(np.float64)  # (I, 3H)
    for t in range(T):
        y[t] = layer.forward(x[t : t + 1], st, selected=sel[t : t + 1])[0]
        if not accumulates:
            continue
        k = t % K
        m_blk[k], h_blk[k] = st.m, st.h
        if input_acc:
            g_blk[k] = st.g
        if k == K - 1 or t == T - 1:
            t0, n = t - k, k + 1
            d = np.abs(m_blk[:n] - (h_blk[:n].astype(np.float64) @ w_t + bias))  # (n, F, 3H)
            dmax[t0 : t + 1], dmean[t0 : t + 1] = d.max(axis=2), d.mean(axis=2)
            if input_acc:
                gmax[t0 : t + 1] = np.abs(g_blk[:n] - (x[t0 : t + 1].astype(np.float64) @ wi_t + bias_i)).max(axis=2)
    before = np.concatenate([np.zeros((1, H), np.float32), y[:-1, b]])  # h before each frame (h0 = 0)
    tr = LayerTrace(name=s.name, hidden=H, A=s.A, bands=F, band=b, dense=s.dense, sparse_input=s.sparse_input, refresh_every=layer.refresh_every,
                    x=np.ascontiguousarray(x[:, b]), selected=np.ascontiguousarray(sel[:, b]), changed=np.count_nonzero(y[:, b] != before, axis=1),
                    drift_max=dmax, drift_mean=dmean, input_drift_max=gmax)
    return tr, y


def _check_band(band, plan) -> int:
    """The band shown of the D-GRU steps with several bands: it must exist in each of them."""
    most = min((s.bands for s in plan.state_steps if s.bands > 1), default=1)
    if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or not 0 <= band < most:
        bands = f"0 to {most - 1} (the D-GRU steps have {most} bands)" if most > 1 else "0 (the D-GRU steps of this model have one band each)"
        raise ParameterError(f"band={band!r}: must be {bands}")
    return int(band)


def _check_seconds(start, seconds):
    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)

    if not (number(start) and start >= 0):
        raise ParameterError(f"start={start!r} must be a finite number >= 0 (seconds)")
    if seconds is not None and not (number(seconds) and seconds > 0):
        raise ParameterError(f"seconds={seconds!r} must be a finite number > 0")


def explain(source, *, weights=None, model: str | None = None, update_percent: float | None = None, band: int = 0, start: float = 0.0,
            seconds: float | None = DEFAULT_SECONDS) -> Explanation:
    """Run a model on (part of) an audio file and keep what the page shows.

    Parameters
    ----------
    source : audio file (anything ``npdgru enhance`` reads)
    weights, model, update_percent : as :class:`npdgru.enhance.Enhancer` (default: the default
        model at its own P)
    band : the band shown of D-GRU steps with several bands (DPRNN: 0 ... 40)
    start, seconds : the part of the input run and shown (from ``start``, at most ``seconds``; None:
        to the end); the model starts from zero state at ``start``

    Returns
    -------
    :class:`Explanation`
    """
    _check_seconds(start, seconds)
    enh = Enhancer(weights, model=model, update_percent=update_percent, backend="cpu", exact=True)
    band = _check_band(band, enh.model.plan)
    x, sr = read_audio(source)
    path = os.fspath(source)
    n_total = x.shape[0]
    i0 = int(round(start * sr))
    if i0 >= n_total:
        raise ParameterError(f"{path}: start={start:g} s is at or after the end ({n_total / sr:.2f} s)")
    i1 = n_total if seconds is None else min(n_total, i0 + max(1, int(round(seconds * sr))))
    x16 = resample_signal(np.ascontiguousarray(x[i0:i1, :1]), sr, stft.SAMPLE_RATE)[:, 0]
    if x16.size == 0:
        raise AudioError(f"{path}: too short to give one frame at 16 kHz")
    X = stft.stft(x16)
    mask, layers = trace(enh.model, stft.log_power(X), band=band)
    np.clip(mask, enh.mask_floor, np.float32(1.0), out=mask)
    w = enh.weights
    name = os.path.basename(os.fspath(w.path)).removesuffix(".safetensors") if getattr(w, "path", None) else "(weights in memory)"
    return Explanation(source=path, model_name=name, update_percent=enh.update_percent, sample_rate=int(sr), channels=int(x.shape[1]), start=i0 / sr,
                       seconds=(i1 - i0) / sr, total_seconds=n_total / sr, spectrum=X, mask=mask, layers=layers, plan=enh.model.plan, weights=w)


def _check_output(src, dst, overwrite: bool) -> None:
    dst = os.fspath(dst)
    if os.path.isdir(dst):
        raise ParameterError(f"{dst}: is a folder; name the page to write (e.g. {os.path.join(dst, 'explain.html')})")
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ParameterError(f"{dst}: output would overwrite the input")
    if os.path.exists(dst) and not overwrite:
        raise ParameterError(f"{dst}: output exists; pass --overwrite to replace it")


def explain_file(source, output, *, overwrite: bool = False, **options) -> Explanation:
    """:func:`explain` ``source`` and write the page to ``output`` (a temporary file beside it,
    then renamed). ``options``: :func:`explain`'s. An existing ``output`` needs ``overwrite``."""
    _check_output(os.fspath(source), output, overwrite)
    e = explain(source, **options)
    page = render_page(e)
    out = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(out))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".npdgru-", suffix=".html.part", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:  # a file name that is not UTF-8
            f.write(page)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a file opened for writing would be (mkstemp makes 0600)
        os.replace(tmp, out)
    except OSError as err:
        raise ParameterError(f"{out}: cannot write the page ({err.strerror or err})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return e


# --------------------------------------------------------------------------------------------
# images: 8-bit indexed PNG (zlib + struct), no imaging library
# --------------------------------------------------------------------------------------------


def png_indexed(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """A PNG of ``indices`` (rows, columns) uint8 into ``palette`` (n <= 256, 3) uint8; row 0 on top.

    Colour type 3 (indexed), bit depth 8, filter type 0 on every row, no interlace.
    """
    idx = np.ascontiguousarray(indices, np.uint8)
    h, w = idx.shape
    raw = np.zeros((h, w + 1), np.uint8)  # a leading 0 per row: filter type None
    raw[:, 1:] = idx

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    pal = np.ascontiguousarray(palette, np.uint8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)) + chunk(b"PLTE", pal.tobytes())
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


# viridis (matplotlib's), sampled at 0, 1/8, ..., 1 and interpolated linearly to 256 entries
_VIRIDIS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], np.float64)
PALETTE = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)
RASTER_PALETTE = np.array([(255, 255, 255), (30, 60, 150)], np.uint8)  # 0: kept, 1: selected


def _levels(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """v mapped linearly from [lo, hi] to palette indices 0 ... 255 (clipped)."""
    return np.clip(np.round((v - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------------
# figures: inline SVG (axes, ticks, curves), images inside them
# --------------------------------------------------------------------------------------------

_L, _R, _TOP, _BOTTOM, _PW = 72, 150, 22, 34, 860  # margins and plot width in px
_COLORS = ("#1f4e99", "#d95f02", "#7570b3", "#1b9e77")


def _nice_step(span: float, most: int) -> float:
    for m in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span / m <= most:
            return m
    return span / most


def _fmt(v: float) -> str:
    return f"{v:.6g}"


class _Axes:
    """Frames 0 ... T-1 left to right (frame t spans [t, t+1)), plot height ``ph``."""

    def __init__(self, T: int, ph: int, t0: float):
        self.T, self.ph, self.t0 = T, ph, t0
        self.width, self.height = _L + _PW + _R, _TOP + ph + _BOTTOM

    def x(self, frame: float) -> float:
        return _L + frame * _PW / max(self.T, 1)

    def time_axis(self) -> list:
        parts = [f'<line x1="{_L}" y1="{_TOP + self.ph}" x2="{_L + _PW}" y2="{_TOP + self.ph}" class="ax"/>']
        span = self.T * FRAME_SECONDS
        step = _nice_step(span, 12)
        k0 = math.ceil(self.t0 / step - 1e-9)
        k = k0
        while k * step <= self.t0 + span + 1e-9:
            frame = (k * step - self.t0) / FRAME_SECONDS
            if 0 <= frame <= self.T:
                xp = self.x(frame)
                parts.append(f'<line x1="{xp:.1f}" y1="{_TOP + self.ph}" x2="{xp:.1f}" y2="{_TOP + self.ph + 4}" class="ax"/>'
                             f'<text x="{xp:.1f}" y="{_TOP + self.ph + 16}" text-anchor="middle">{_fmt(round(k * step, 6))}</text>')
            k += 1
        parts.append(f'<text x="{_L + _PW / 2}" y="{_TOP + self.ph + 30}" text-anchor="middle">time (s); one frame per 10 ms</text>')
        return parts

    def y_ticks(self, ticks, label: str) -> list:
        """ticks: (text, y from the top of the plot in px)."""
        parts = [f'<line x1="{_L}" y1="{_TOP}" x2="{_L}" y2="{_TOP + self.ph}" class="ax"/>']
        for text, yp in ticks:
            parts.append(f'<line x1="{_L - 4}" y1="{_TOP + yp:.1f}" x2="{_L}" y2="{_TOP + yp:.1f}" class="ax"/>'
                         f'<text x="{_L - 6}" y="{_TOP + yp + 4:.1f}" text-anchor="end">{html.escape(text)}</text>')
        parts.append(f'<text transform="translate(14,{_TOP + self.ph / 2}) rotate(-90)" text-anchor="middle">{html.escape(label)}</text>')
        return parts

    def svg(self, parts, title: str, fig_id: str) -> str:
        head = f'<svg id="{fig_id}" class="fig" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {self.width} {self.height}" width="{self.width}" height="{self.height}" role="img">'
        return head + f'<title>{html.escape(title)}</title>' + "".join(parts) + "</svg>"


def _image_figure(fig_id, title, png: bytes, T, t0, ph, y_ticks, y_label, *, pixelated=False, colorbar=None) -> str:
    """An image stretched over the plot area; ``colorbar``: (low text, high text) beside it."""
    ax = _Axes(T, ph, t0)
    style = ' style="image-rendering:pixelated"' if pixelated else ""
    parts = [f'<image x="{_L}" y="{_TOP}" width="{_PW}" height="{ph}" preserveAspectRatio="none"{style} href="{_data_uri(png)}"/>']
    parts += ax.y_ticks(y_ticks, y_label) + ax.time_axis()
    if colorbar is not None:
        low, high, what = colorbar
        bar = png_indexed(np.arange(255, -1, -1, dtype=np.uint8)[:, None], PALETTE)
        x0 = _L + _PW + 16
        parts.append(f'<image x="{x0}" y="{_TOP}" width="12" height="{ph}" preserveAspectRatio="none" href="{_data_uri(bar)}"/>'
                     f'<text x="{x0 + 16}" y="{_TOP + 9}">{html.escape(high)}</text><text x="{x0 + 16}" y="{_TOP + ph}">{html.escape(low)}</text>'
                     f'<text x="{x0 + 16}" y="{_TOP + ph / 2 + 4}">{html.escape(what)}</text>')
    return ax.svg(parts, title, fig_id)


def _polylines(ax: _Axes, values, ymap) -> list:
    """Polyline point lists of (frame centre, value), broken where a value is NaN."""
    runs, cur = [], []
    for t, v in enumerate(values):
        if v is None or not np.isfinite(v):
            if cur:
                runs.append(cur)
            cur = []
            continue
        cur.append(f"{ax.x(t + 0.5):.1f},{_TOP + ymap(v):.1f}")
    if cur:
        runs.append(cur)
    return runs


def _line_figure(fig_id, title, T, t0, ph, series, *, y_range, y_label, log=False, markers=(), marker_label="") -> str:
    """Curves over frames: ``series`` [(values (T,), label)], ``markers`` frames with a dashed line."""
    ax = _Axes(T, ph, t0)
    lo, hi = y_range
    if log:
        llo, lhi = math.log10(lo), math.log10(hi)

        def ymap(v):
            return ph * (1.0 - (math.log10(min(max(v, lo), hi)) - llo) / (lhi - llo))

        ticks = [(f"1e{e}", ymap(10.0**e)) for e in range(math.ceil(llo), math.floor(lhi) + 1)]
    else:
        def ymap(v):
            return ph * (1.0 - (min(max(v, lo), hi) - lo) / (hi - lo))

        step = _nice_step(hi - lo, 5)
        ticks = [(_fmt(round(k * step, 9)), ymap(k * step)) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    parts = []
    for f in markers:
        xp = ax.x(f)
        parts.append(f'<line x1="{xp:.1f}" y1="{_TOP}" x2="{xp:.1f}" y2="{_TOP + ph}" class="mark"/>')
    for k, (values, label) in enumerate(series):
        color = _COLORS[k % len(_COLORS)]
        for run in _polylines(ax, values, ymap):
            if len(run) == 1:
                x, y = run[0].split(",")
                parts.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{color}"/>')
            else:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="{2.6 if k == 0 else 1.2}"/>')
        yl = _TOP + 10 + 14 * k
        parts.append(f'<line x1="{_L + _PW + 10}" y1="{yl - 4}" x2="{_L + _PW + 26}" y2="{yl - 4}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{_L + _PW + 30}" y="{yl}">{html.escape(label)}</text>')
    if markers and marker_label:
        yl = _TOP + 10 + 14 * len(series)
        parts.append(f'<line x1="{_L + _PW + 10}" y1="{yl - 4}" x2="{_L + _PW + 26}" y2="{yl - 4}" class="mark"/><text x="{_L + _PW + 30}" y="{yl}">{html.escape(marker_label)}</text>')
    parts += ax.y_ticks(ticks, y_label) + ax.time_axis()
    return ax.svg(parts, title, fig_id)


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.45em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ccc}h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.2em .55em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.meta{color:#555}
svg.fig{display:block;max-width:100%;height:auto;font-size:11px;font-family:inherit;margin:.3em 0}
svg.fig .ax{stroke:#444;stroke-width:1}svg.fig .mark{stroke:#999;stroke-width:1;stroke-dasharray:3,3}
code{background:#f3f3f3;padding:0 .2em}
"""


def _n(v) -> str:
    return f"{int(v):,}"


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


def _sci(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.2e}"


def _freq_ticks(ph: int):
    top = stft.SAMPLE_RATE / 2
    return [(f"{k}", ph * (1 - k * 1000 / top)) for k in range(0, int(top // 1000) + 1, 2)]


def _spectrogram_figures(e: Explanation) -> list:
    T, t0, ph = e.frames, e.start, 170
    power = e.spectrum.real.astype(np.float64) ** 2 + e.spectrum.imag.astype(np.float64) ** 2
    noisy_db = 10 * np.log10(np.maximum(power, 1e-12))
    enh_db = 10 * np.log10(np.maximum(power * e.mask.astype(np.float64) ** 2, 1e-12))
    hi = float(noisy_db.max())
    lo = hi - 80.0
    ticks, label = _freq_ticks(ph), "kHz"
    bar_db = (f"{lo:.0f} dB", f"{hi:.0f} dB", "power")
    figs = [
        ("fig-noisy", "Noisy spectrogram", _levels(noisy_db.T[::-1], lo, hi), bar_db),
        ("fig-mask", "Mask (gain per bin, 0 to 1)", _levels(e.mask.T[::-1].astype(np.float64), 0.0, 1.0), ("0", "1", "gain")),
        ("fig-enhanced", "Enhanced spectrogram (noisy x mask)", _levels(enh_db.T[::-1], lo, hi), bar_db),
    ]
    return [f"<h3>{title}</h3>" + _image_figure(fid, title, png_indexed(img, PALETTE), T, t0, ph, ticks, label, colorbar=bar) for fid, title, img, bar in figs]


def _layer_section(e: Explanation, tr: LayerTrace, counts: dict) -> str:
    T, t0 = e.frames, e.start
    H, A = tr.hidden, tr.A
    band_txt = f"band {tr.band} of {tr.bands} (the bands share weights; each keeps its own state and selection)" if tr.bands > 1 else "one band"
    ph = H * max(1, math.ceil(160 / H))  # at least one pixel per neuron: no row is dropped
    raster = png_indexed(tr.selected.T.astype(np.uint8), RASTER_PALETTE)
    nt = [(str(k), ph * (k + 0.5) / H) for k in _neuron_ticks(H)]
    # crisp pixels where the image is enlarged; where frames outnumber the pixels, averaged (shaded)
    raster_fig = _image_figure(f"fig-{tr.name}-raster", f"{tr.name}: selected neurons per frame", raster, T, t0, ph, nt, "neuron", pixelated=T <= _PW)
    count_fig = _line_figure(f"fig-{tr.name}-count", f"{tr.name}: neurons per frame", T, t0, 110,
                             [(tr.selected.sum(axis=1), "selected"), (tr.changed, "changed")], y_range=(0, H), y_label="neurons")
    never = int(np.count_nonzero(~tr.selected.any(axis=0)))
    share = tr.selected.mean(axis=0)
    rows = [("H (neurons)", _n(H)), ("A (updated per frame)", f"{_n(A)} ({_pct(A / H)})"), ("bands", f"{tr.bands}, shown: {tr.band}"),
            ("input product", "from the changed columns of the input (input accumulator)" if tr.sparse_input else "dense (all inputs, every frame)"),
            ("selected per frame", f"min {int(tr.selected.sum(axis=1).min())}, max {int(tr.selected.sum(axis=1).max())}" if T else "-"),
            ("changed per frame (h' != h in float32)", f"mean {float(tr.changed.mean()):.1f}, min {int(tr.changed.min())}" if T else "-"),
            ("neurons never selected in these frames", f"{never} of {H}"),
            ("neurons selected in every frame", f"{int(np.count_nonzero(tr.selected.all(axis=0)))} of {H}" if T else "-"),
            ("most / least often selected neuron", f"{int(share.argmax())} ({_pct(float(share.max()))} of frames) / {int(share.argmin())} ({_pct(float(share.min()))})" if T else "-"),
            ("MACs per frame dense / paper / ours", " / ".join(_n(counts.get(k, 0)) for k in ("gru_dense", "gru_paper", "gru_ours")))]
    if tr.dense:
        drift_html = ("<p>P = 100: the dense GRU kernel computes W<sub>hh</sub> h + b<sub>hh</sub> afresh in every frame; "
                      "there are no accumulators, hence no drift to show.</p>")
    else:
        dm, dmean = tr.drift_max[:, tr.band], tr.drift_mean[:, tr.band]
        hi = max(float(np.nanmax(tr.drift_max)), float(np.nanmax(tr.input_drift_max)) if tr.sparse_input else 0.0, 1e-8)  # T >= 2 (stft)
        lo = 1e-10
        marks = list(range(0, T, tr.refresh_every))
        which = f", band {tr.band}" if tr.bands > 1 else ""
        series = [(dm, f"max{which}"), (dmean, f"mean{which}")]
        if tr.bands > 1:
            series.append((np.nanmax(tr.drift_max, axis=1), f"max, all {tr.bands} bands"))
        if tr.sparse_input:
            series.append((tr.input_drift_max[:, tr.band], f"input acc. max{which}"))
        drift_fig = _line_figure(f"fig-{tr.name}-drift", f"{tr.name}: accumulator drift", T, t0, 150, series, y_range=(lo, 10 ** math.ceil(math.log10(hi))),
                                 y_label="|M - (W h + b)|", log=True, markers=marks, marker_label=f"refresh (every {tr.refresh_every})")
        rows += [("refresh period (frames)", str(tr.refresh_every)),
                 ("drift max (shown band)", f'<span class="drift-max">{_sci(float(np.nanmax(dm)))}</span>'),
                 ("drift mean (shown band, over frames)", f'<span class="drift-mean">{_sci(float(np.nanmean(dmean)))}</span>')]
        if tr.bands > 1:
            rows.append((f"drift max (all {tr.bands} bands)", _sci(float(np.nanmax(tr.drift_max)))))
        if tr.sparse_input:
            rows.append(("input accumulator drift max (shown band)", f'<span class="input-drift-max">{_sci(float(np.nanmax(tr.input_drift_max[:, tr.band])))}</span>'))
        drift_html = ("<p>Accumulator drift after each frame: max and mean over the 3H entries of |M - (W<sub>hh</sub> h + b<sub>hh</sub>)|, "
                      "the product recomputed in float64 from the kernel's float32 h (values below 1e-10 are drawn at 1e-10). "
                      f"Dashed: the frames before which M is recomputed exactly (every {tr.refresh_every} frames)."
                      + (" This step's input product is kept the same way, from the changed entries of its input: the input accumulator g against "
                         "W<sub>ih</sub> x + b<sub>ih</sub> of the frame's input, also refreshed every "
                         f"{tr.refresh_every} frames." if tr.sparse_input else "") + "</p>" + drift_fig)
    table = "<table>" + "".join(f'<tr><th class="l">{k}</th><td class="l">{v}</td></tr>' for k, v in rows) + "</table>"
    return (f'<section id="layer-{html.escape(tr.name)}" class="layer"><h3>{html.escape(tr.name)}: D-GRU, H = {H}, A = {A}, {band_txt}</h3>' + table
            + "<p>Selected neurons (dark) per frame: neuron 0 at the top, one column per frame.</p>" + raster_fig
            + "<p>Neurons selected per frame (A by construction) and neurons whose value changed (a selected neuron whose update rounds to nothing in float32 keeps its bits).</p>"
            + count_fig + drift_html + "</section>")


def _neuron_ticks(H: int) -> list:
    step = next(m for m in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, H) if H / m <= 8)
    return list(range(0, H, step))


def _summary(e: Explanation) -> str:
    plan = e.plan
    macs = plan.macs()
    per = plan.step_macs()
    dense_all = macs["gru_dense"] + macs["other"]
    rows = [("input", html.escape(e.source)), ("model", html.escape(e.model_name)), ("P (update percent)", f"{e.update_percent:g}"),
            ("frames", f"{e.frames} ({e.seconds:.2f} s from {e.start:.2f} s of {e.total_seconds:.2f} s; 10 ms per frame)"),
            ("audio", f"{e.sample_rate} Hz, {e.channels} channel{'s' if e.channels > 1 else ''}; shown: channel 1" + ("" if e.sample_rate == stft.SAMPLE_RATE else ", resampled to 16 kHz")),
            ("run", "cpu backend, exact products, one frame per call: the masks of the streaming hop and of <code>npdgru enhance --exact</code>")]
    info = "<table>" + "".join(f'<tr><th class="l">{k}</th><td class="l">{v}</td></tr>' for k, v in rows) + "</table>"
    head = "<tr><th class='l'>D-GRU step</th><th>H</th><th>bands</th><th>A</th><th>A/H</th><th>input product</th><th>MACs dense</th><th>paper</th><th>ours</th></tr>"
    body = ""
    for s in plan.state_steps:
        c = per[s.name]
        body += (f'<tr id="step-{html.escape(s.name)}"><td class="l">{html.escape(s.name)}</td><td>{s.hidden}</td><td>{s.bands}</td><td class="A" data-value="{s.A}">{s.A}</td>'
                 f"<td>{_pct(s.A / s.hidden)}</td><td class='l'>{'changed columns' if s.sparse_input else 'dense'}</td>"
                 + "".join(f'<td data-value="{c[k]}">{_n(c[k])}</td>' for k in ("gru_dense", "gru_paper", "gru_ours")) + "</tr>")
    layers = "<table>" + head + body + "</table>"
    mrows = [("gru_dense", "D-GRU steps, dense GRU"), ("gru_paper", "D-GRU steps, the paper's count (z for all rows, r and n for A)"),
             ("gru_ours", "D-GRU steps, ours (accumulators: recurrent product from the A changed columns)"), ("other", "everything else (linear layers, dense BiGRUs)")]
    mt = "".join(f'<tr><td class="l">{label}</td><td id="macs-{k}" data-value="{macs[k]}">{_n(macs[k])}</td></tr>' for k, label in mrows)
    saved = [("saved-model", "saved, whole model (ours vs dense)", 1 - (macs["gru_ours"] + macs["other"]) / dense_all if dense_all else 0.0),
             ("saved-paper", "saved, whole model (paper's count vs dense)", 1 - (macs["gru_paper"] + macs["other"]) / dense_all if dense_all else 0.0),
             ("saved-gru", "saved, D-GRU steps only (ours vs dense)", 1 - macs["gru_ours"] / macs["gru_dense"] if macs["gru_dense"] else 0.0)]
    mt += "".join(f'<tr><td class="l">{label}</td><td id="{i}" data-value="{v!r}">{_pct(v)}</td></tr>' for i, label, v in saved)
    macs_table = "<table><tr><th class='l'>MACs per frame of one stream (<code>Plan.macs()</code>)</th><th>MACs</th></tr>" + mt + "</table>"
    return info + layers + macs_table


def render_page(e: Explanation) -> str:
    """The self-contained HTML page of an :class:`Explanation`."""
    from . import __version__

    plan = e.plan
    counts = plan.step_macs()
    multi = [tr for tr in e.layers if tr.bands > 1]
    band_note = (f" Steps with several bands show band {multi[0].band} (option <code>--band</code>); their drift also as the maximum over all bands." if multi else "")
    title = f"npdgru explain: {os.path.basename(e.source)}"
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>What the D-GRU selected: {html.escape(os.path.basename(e.source))}</h1>",
             f'<p class="meta">Model {html.escape(e.model_name)} at P = {e.update_percent:g}, {e.frames} frames; made by <code>npdgru explain</code> (npdgru {__version__}).</p>',
             '<section id="summary"><h2>Model and work per frame</h2>', _summary(e),
             "<p>A = ceil(P·H/100) neurons are updated per frame in every D-GRU step: the A largest u = 1 − z (ties to the lower index); every other neuron keeps its value bit for bit. "
             "MACs count one frame of one stream; a step with F bands counts F times.</p></section>",
             '<section id="spectrograms"><h2>Noisy, mask, enhanced</h2>', *_spectrogram_figures(e), "</section>",
             f'<section id="layers"><h2>D-GRU steps ({len(e.layers)})</h2><p>Every step that recurs along time, in the order the model runs them.{band_note}</p>',
             *[_layer_section(e, tr, counts[tr.name]) for tr in e.layers], "</section>",
             '<section id="notes"><h2>How this page was made</h2><p>The input (first channel, resampled to 16 kHz where needed) goes through the STFT of npdgru '
             "(320 points, hop 160, sqrt-Hann) into log-power features. The model runs on the cpu backend with exact products; each D-GRU step runs one frame per call "
             "and reports the neurons it selected. After each frame its accumulator M (the running W<sub>hh</sub> h + b<sub>hh</sub>, updated from the changed columns) "
             "is compared with the product recomputed in float64 from the step's float32 state. The mask is clipped at -80 dB as <code>npdgru enhance</code> applies it. "
             "Spectrograms: 10·log10 |X|², the 80 dB below the noisy maximum. The page loads nothing: images are embedded PNGs inside SVG.</p></section>",
             "</body></html>\n"]
    return "".join(parts)
