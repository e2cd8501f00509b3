#!/usr/bin/env python
"""Merge the summaries of several ``npdgru eval`` runs into one table and one plot.

    python tools/merge_eval.py results/eval_finetuned results/eval_dprnn_mpt \
        --models nsnet2-ft-anyp dprnn-anyp mpt-anyp --out results/three_models

Reads each run's ``summary.json`` (same test set: the script checks the pair count and data
folder agree), keeps the rows of the named models (plus noisy, clean and onnxruntime from the
first run; a model at a P that several runs hold comes from the last of them, so a run of a
retrained file listed after the older run replaces its rows), and writes ``OUT/summary.md`` (the overall means) and ``OUT/quality_vs_compute.png``
(``npdgru.evaluate.report.plot``) and ``OUT/summary.json``. Timings come from the runs they were
measured in: compare them within a run, not across runs, or pass ``--retime``, which times every
kept row again here, in one run (``npdgru.evaluate.runner.time_systems``: interleaved rounds,
one thread, the best run), on the noisy files of the first run's data folder, and replaces the
timings of every row with those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npdgru.evaluate.report import write_summary  # noqa: E402
from npdgru.weights import load_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="npdgru eval output folders")
    ap.add_argument("--models", nargs="+", required=True, help="model names (weight file stems) to keep")
    ap.add_argument("--out", required=True)
    ap.add_argument("--retime", action="store_true", help="time every kept row again, in one run on this machine (compare times within one run)")
    ap.add_argument("--timing-frames", type=int, default=1000, help="with --retime: frames of real features timed per row")
    ap.add_argument("--timing-repeats", type=int, default=7, help="with --retime: timed rounds, the best run of each row is kept")
    args = ap.parse_args(argv)
    summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in args.runs]
    first = summaries[0]
    for r, s in zip(args.runs[1:], summaries[1:]):
        for key in ("pairs", "data"):
            if s["meta"][key] != first["meta"][key]:
                print(f"{r}: meta {key}={s['meta'][key]!r} differs from {args.runs[0]} ({first['meta'][key]!r})", file=sys.stderr)
                return 1
    rows = [s for s in first["rows"] if s["engine"] != "npdgru"]
    kept = {}  # (model, P) -> row; a later run replaces the row of an earlier one
    for s in summaries:
        kept.update({(row["model"], row["percent"]): row for row in s["rows"] if row["engine"] == "npdgru" and row["model"] in args.models})
    rows += [kept[k] for k in sorted(kept, key=lambda k: (args.models.index(k[0]), -k[1]))]
    for row in rows:  # summary.json stores NaN (trained at any P) as null: ask the weight file
        if row["engine"] == "npdgru" and row.get("trained_percent") is None and Path(row["path"]).is_file():
            row["trained_percent"] = load_weights(row["path"]).trained_update_percent
    missing = set(args.models) - {row["model"] for row in rows}
    if missing:
        print(f"models not found in the runs: {sorted(missing)}", file=sys.stderr)
        return 1
    merged = dict(first, rows=rows)
    merged["meta"] = dict(first["meta"], command=" ".join(["python", "tools/merge_eval.py"] + list(argv if argv is not None else sys.argv[1:])))
    if args.retime:
        merged["meta"].update(_retime(rows, first["meta"]["data"], args.timing_frames, args.timing_repeats))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, merged)
    print(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and {out / 'quality_vs_compute.png'}")
    return 0


def _retime(rows: list[dict], data: str, frames: int, repeats: int) -> dict:
    """Time the npdgru and onnxruntime rows again, all in this one run; write the timings into
    ``rows``; return the timing metadata."""
    import os
    import time

    from npdgru.evaluate.runner import System, _timing_features, cpu_model, find_pairs, time_systems

    systems = [System(r["name"], r["engine"], r["model"], r["percent"], r["path"]) for r in rows if r["engine"] in ("npdgru", "onnxruntime")]
    for s in systems:
        if not Path(s.path).is_file():
            raise SystemExit(f"--retime: {s.path}: the file of row {s.name!r} is not here")
    load = os.getloadavg()[0]
    features = _timing_features(find_pairs(data), frames)
    t0 = time.perf_counter()
    time_systems(systems, features, repeats=repeats)
    by_name = {s.name: s for s in systems}
    for r in rows:
        if r["name"] in by_name:
            r["us_per_frame"] = by_name[r["name"]].us_per_frame
            r["us_per_frame_median"] = by_name[r["name"]].us_per_frame_median
    print(f"re-timed {len(systems)} rows in {time.perf_counter() - t0:.0f} s (1-minute load average {load:.2f})")
    return {"timing": f"re-timed together by tools/merge_eval.py --retime: model only (features -> mask), {features.shape[0]} frames of real features in one call, one thread, best of {repeats} interleaved rounds after a warm-up", "load_average_at_timing": load, "machine": f"{cpu_model()} ({os.cpu_count()} logical CPUs)"}


if __name__ == "__main__":
    sys.exit(main())
