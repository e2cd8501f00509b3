#!/usr/bin/env python
"""Merge the summaries of several ``npdgru eval`` runs into one table and one plot.

    python tools/merge_eval.py results/eval_finetuned results/eval_dprnn_mpt \
        --models nsnet2-ft-anyp dprnn-anyp mpt-anyp --out results/three_models

Reads each run's ``summary.json`` (same test set: the script checks the pair count and data
folder agree), keeps the rows of the named models (plus noisy, clean and onnxruntime from the
first run), and writes ``OUT/summary.md`` (the overall means) and ``OUT/quality_vs_compute.png``
(``npdgru.evaluate.report.plot``). Timings come from the runs they were measured in: compare
them within a run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npdgru.evaluate.report import markdown, plot  # noqa: E402
from npdgru.weights import load_weights  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="npdgru eval output folders")
    ap.add_argument("--models", nargs="+", required=True, help="model names (weight file stems) to keep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    summaries = [json.loads((Path(r) / "summary.json").read_text()) for r in args.runs]
    first = summaries[0]
    for r, s in zip(args.runs[1:], summaries[1:]):
        for key in ("pairs", "data"):
            if s["meta"][key] != first["meta"][key]:
                print(f"{r}: meta {key}={s['meta'][key]!r} differs from {args.runs[0]} ({first['meta'][key]!r})", file=sys.stderr)
                return 1
    rows = [s for s in first["rows"] if s["engine"] != "npdgru"]
    for s in summaries:
        rows += [row for row in s["rows"] if row["engine"] == "npdgru" and row["model"] in args.models]
    for row in rows:  # summary.json stores NaN (trained at any P) as null: ask the weight file
        if row["engine"] == "npdgru" and row.get("trained_percent") is None and Path(row["path"]).is_file():
            row["trained_percent"] = load_weights(row["path"]).trained_update_percent
    missing = set(args.models) - {row["model"] for row in rows}
    if missing:
        print(f"models not found in the runs: {sorted(missing)}", file=sys.stderr)
        return 1
    merged = dict(first, rows=rows)
    merged["meta"] = dict(first["meta"], command=" ".join(["python", "tools/merge_eval.py"] + list(argv if argv is not None else sys.argv[1:])))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(merged) + "\n")
    plot(out / "quality_vs_compute.png", merged)
    print(f"wrote {out / 'summary.md'} and {out / 'quality_vs_compute.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
