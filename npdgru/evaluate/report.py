"""Tables and the plot of ``npdgru eval``: per_file.csv, summary.md, summary.json, quality_vs_compute.png."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .metrics import INTRUSIVE, METRICS

CSV_COLUMNS = ("file", "snr_db", "snr_measured_db", "row", "engine", "model", "P", *METRICS, "clipped")
LABELS = {"pesq": "PESQ", "estoi": "ESTOI", "si_snr": "SI-SNR (dB)", "sig": "SIG", "bak": "BAK", "ovrl": "OVRL", "p808": "P.808"}
BY_SNR_METRICS = ("pesq", "estoi", "si_snr", "ovrl")


def _snr_key(row: dict, measured: bool) -> str:
    """The SNR group of a file: the manifest's value, or the measured SNR to the nearest 5 dB."""
    v = float(row["snr_db"])
    if not math.isfinite(v):
        return f"{v:g}"
    if measured:
        v = 5.0 * round(v / 5.0)
    return f"{v:g}"


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def _std(values) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def summarize(rows: list[dict], systems: list[dict], meta: dict) -> dict:
    """Means (and sample standard deviations) per system, overall and per input-SNR group."""
    measured = not str(meta.get("snr_source", "")).startswith("manifest")
    snrs = sorted({_snr_key(r, measured) for r in rows}, key=float)
    out = []
    for s in systems:
        mine = [r for r in rows if r["row"] == s["name"]]
        entry = dict(s)
        entry["files"] = len(mine)
        entry["mean"] = {m: _mean(r[m] for r in mine) for m in METRICS}
        entry["std"] = {m: _std(r[m] for r in mine) for m in METRICS}
        entry["by_snr"] = {}
        for k in snrs:
            g = [r for r in mine if _snr_key(r, measured) == k]
            entry["by_snr"][k] = {"files": len(g), **{m: _mean(r[m] for r in g) for m in METRICS}}
        entry["clipped_files"] = sum(bool(r.get("clipped")) for r in mine)
        out.append(entry)
    return {"meta": meta, "snr_groups_db": snrs, "rows": out}


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])) for k in CSV_COLUMNS})


def _f(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _int(v) -> str:
    return "-" if v is None else f"{int(v):,}"


def _trained(v) -> str:
    """The trained-P cell: "-" unknown, "any" for a model trained at P drawn per batch (NaN)."""
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "any"
    return f"{v:g}"


def _p(s: dict) -> str:
    if s.get("gate", "top-a") != "top-a":
        return "-"  # a threshold or delta gate does not read P
    return "-" if s["percent"] is None else f"{s['percent']:g}"


def _updated(s: dict) -> str:
    if s.get("fraction_updated") is None:
        return "-"
    p99 = s.get("fraction_updated_p99")
    return f"{100 * s['fraction_updated']:.0f}%" + ("" if p99 is None else f" (p99 {100 * p99:.0f}%)")


def _point_label(s: dict) -> str:
    gate = s.get("gate", "top-a")
    return f"P={s['percent']:g}" if gate == "top-a" else gate


def markdown(summary: dict) -> str:
    meta, rows = summary["meta"], summary["rows"]
    snrs = summary["snr_groups_db"]
    lines = ["# npdgru eval: speech quality and compute per model and update percentage P", ""]
    lines += [f"Data: `{meta['data']}`, {meta['pairs']} clean/noisy pairs (input SNR from {meta['snr_source']})."]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`"]
    lines += [f"Machine: {meta['machine']}. Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "."]
    load = meta.get("load_average_at_timing")
    load = f" (1-minute load average when timing started: {load:.2f})" if load is not None else ""
    lines += [f"Time per frame: {meta['timing']}{load}; MACs per frame of one 10 ms frame (16 kHz, 161 bins).", ""]

    lines += [f"## All {meta['pairs']} files (means)", ""]
    head = ["row", "P", "trained P", "GRU neurons updated", "GRU MACs/frame dense", "paper (1+2P)/3", "ours", "model MACs/frame", "model us/frame best (median)", *[LABELS[m] for m in METRICS]]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in rows:
        macs = s.get("macs") or {}
        total = None if not macs else macs["gru_ours"] + macs["other"]
        cells = [
            s["name"],
            _p(s),
            _trained(s.get("trained_percent")) if s.get("gate", "top-a") == "top-a" else "-",
            _updated(s),
            _int(macs.get("gru_dense")),
            _int(macs.get("gru_paper")),
            _int(macs.get("gru_ours")),
            _int(total),
            "-" if s.get("us_per_frame") is None else f"{s['us_per_frame']:.1f} ({s['us_per_frame_median']:.1f})",
            *[_f(s["mean"][m], 2 if m in ("si_snr",) else 3 if m == "estoi" else 2) for m in METRICS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GRU MACs/frame: both GRU layers per frame. *dense*: 3H(I+H) per layer; *paper*: (H+2A)(I+H), "
        "the paper's (1+2P)/3; *ours*: 3H·I (dense input product) + 3H·A (recurrent accumulators), as "
        "the model runs (`sparse_inputs=False`); a threshold or delta gate (no P: its work varies per "
        "frame) at its mean work measured on the timing frames, with the 99th percentile over "
        "frames of the neurons updated in parentheses. *model MACs/frame*: ours plus the linear layers. "
        "*model us/frame*: features to mask, no STFT; the best of the timed runs and, in "
        "parentheses, their median. `clean` is DNSMOS of the clean references "
        "(the intrusive metrics are trivial there); the enhanced rows are intrusive against them.",
        "",
    ]

    lines += ["## By input SNR (means per SNR group)", ""]
    counts = {k: rows[0]["by_snr"][k]["files"] for k in snrs} if rows else {}
    for m in BY_SNR_METRICS:
        lines += [f"### {LABELS[m]}", ""]
        head = ["row", *[f"{k} dB (n={counts[k]})" for k in snrs], "all"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for s in rows:
            if m in INTRUSIVE and s["model"] == "clean":
                continue
            d = 3 if m == "estoi" else 2
            lines.append("| " + " | ".join([s["name"], *[_f(s["by_snr"][k][m], d) for k in snrs], _f(s["mean"][m], d)]) + " |")
        lines.append("")

    deltas = _delta_rows(rows)
    if deltas:
        lines += ["## Cost of the D-GRU: change against P=100 of the same weights, by input SNR", ""]
        for m in ("pesq", "estoi", "ovrl"):
            lines += [f"### delta {LABELS[m]}", ""]
            head = ["row", *[f"{k} dB" for k in snrs], "all"]
            lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
            d = 3 if m == "estoi" else 2
            for s, ref in deltas:
                cells = [_delta(s["by_snr"][k][m], ref["by_snr"][k][m], d) for k in snrs]
                lines.append("| " + " | ".join([s["name"], *cells, _delta(s["mean"][m], ref["mean"][m], d)]) + " |")
            lines.append("")
    clipped = sum(s.get("clipped_files", 0) for s in rows)
    if clipped:
        lines += [f"Note: {clipped} estimates peaked above full scale and were clipped to [-1, 1] for DNSMOS only.", ""]
    sec = meta.get("seconds", {})
    if sec:
        lines += [f"Ran in {sec.get('total', 0):.0f} s ({sec.get('timing', 0):.0f} s timing, {sec.get('files', 0):.0f} s files, {meta['jobs']} job(s)), {meta['date']}.", ""]
    return "\n".join(lines)


def _delta(v, ref, digits) -> str:
    return "-" if v is None or ref is None else f"{v - ref:+.{digits}f}"


def _delta_rows(rows):
    out = []
    for s in rows:
        if s["engine"] != "npdgru" or s["percent"] == 100.0:
            continue
        ref = [r for r in rows if r["engine"] == "npdgru" and r["path"] == s["path"] and r["percent"] == 100.0]
        if ref:
            out.append((s, ref[0]))
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def _finite(o):
    """JSON has no inf/NaN: such values become null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _place_labels(ax, labels, fontsize: int = 8) -> None:
    """Annotate points so that no two labels overlap: each label takes the first of a few offsets
    (right-above, right-below, further up or down, left) whose box, estimated in points from the
    text length, meets no label placed before it; points are placed left to right."""
    ax.autoscale_view()
    scale = 72.0 / ax.figure.dpi  # display pixels -> points
    w_char, h = 0.6 * fontsize, fontsize + 1
    offsets = [(4, 4), (4, -h - 2), (4, h + 6), (4, -2 * h - 4), (-4, 4), (4, 2 * h + 8)]
    placed = []  # boxes (x0, y0, x1, y1) in points
    for x, y, text in sorted(labels, key=lambda t: (t[0], t[1])):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        w = w_char * len(text)
        for dx, dy in offsets:
            x0 = px + dx if dx >= 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(box[0] - px, box[1] - py), fontsize=fontsize)


def plot(path: Path, summary: dict) -> None:
    """PESQ and DNSMOS OVRL against measured us/frame and counted MACs/frame (2 x 2 panels)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    models = list(dict.fromkeys(s["path"] for s in rows if s["engine"] == "npdgru"))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, metric in enumerate(("pesq", "ovrl")):
        for j, xkind in enumerate(("us", "macs")):
            ax = axes[i, j]
            labels = []  # (x, y, text) of every point, placed once the axes hold everything
            for k, wpath in enumerate(models):
                pts = sorted((s for s in rows if s["engine"] == "npdgru" and s["path"] == wpath and s["mean"][metric] is not None), key=lambda s: s["percent"])
                if not pts:
                    continue
                c = colors[k % len(colors)]
                ys = [s["mean"][metric] for s in pts]
                if xkind == "us":
                    xs = [s["us_per_frame"] for s in pts]
                    ax.plot(xs, ys, "o-", color=c, label=f"npdgru {pts[0]['model']}")
                else:
                    xs = [(s["macs"]["gru_ours"] + s["macs"]["other"]) / 1e6 for s in pts]
                    xp = [(s["macs"]["gru_paper"] + s["macs"]["other"]) / 1e6 for s in pts]
                    ax.plot(xs, ys, "o-", color=c, label=f"npdgru {pts[0]['model']} (ours, as run)")
                    ax.plot(xp, ys, "o--", color=c, mfc="none", alpha=0.6, label=f"{pts[0]['model']} (paper's count)")
                labels += [(x, y, _point_label(s)) for x, y, s in zip(xs, ys, pts)]
            for s in rows:
                v = s["mean"][metric]
                if v is None:
                    continue
                if s["engine"] == "onnxruntime":
                    x = s["us_per_frame"] if xkind == "us" else (s["macs"]["gru_dense"] + s["macs"]["other"]) / 1e6
                    ax.plot([x], [v], "*", ms=14, color="black", label=s["name"])
                elif s["model"] == "noisy":
                    ax.axhline(v, ls=":", color="gray", label="noisy input")
                elif s["model"] == "clean":
                    ax.axhline(v, ls="-.", color="green", alpha=0.6, label="clean reference")
            _place_labels(ax, labels)
            ax.set_xlabel("model time per frame (us, one thread)" if xkind == "us" else "model MACs per frame (millions)")
            ax.set_ylabel("PESQ (wb)" if metric == "pesq" else "DNSMOS OVRL")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    meta = summary["meta"]
    fig.suptitle(f"npdgru eval: {meta['pairs']} pairs of {Path(meta['data']).name}, means; {meta['machine'].split(',')[0]}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out: Path, rows: list[dict], summary: dict) -> None:
    """per_file.csv, summary.md, summary.json, quality_vs_compute.png into ``out``."""
    out = Path(out)
    write_csv(out / "per_file.csv", rows)
    write_summary(out, summary)


def write_summary(out: Path, summary: dict) -> None:
    """summary.md, summary.json (inf/NaN as null), quality_vs_compute.png into ``out`` (also the
    output of ``tools/merge_eval.py``)."""
    out = Path(out)
    (out / "summary.md").write_text(markdown(summary) + "\n")
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(_finite(summary), indent=1, default=_json_default) + "\n")
    os.replace(tmp, out / "summary.json")
    plot(out / "quality_vs_compute.png", summary)
