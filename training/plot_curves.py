"""Plot the loss curves of training runs (for the model card): ``python training/plot_curves.py``.

Reads ``training/runs/*/log.csv`` (written by ``npdgru train``) and writes
``weights/training_curves.png``: training loss (moving mean) and validation loss / SI-SNR against
the optimiser step, one colour per run. Needs matplotlib (the ``eval`` extra).
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _read(log: pathlib.Path):
    rows = list(csv.DictReader(open(log)))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["train_loss"] not in ("", "nan")]
    val_keys = [k for k in rows[0] if k.startswith("val_loss_")] if rows else []
    val = {}
    for k in val_keys:
        P = k.split("_P")[-1]
        pts = [(int(r["step"]), float(r[k]), float(r[f"val_sisnr_P{P}"])) for r in rows if r.get(k)]
        val[P] = pts
    return train, val


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=str(REPO / "training" / "runs"))
    p.add_argument("--out", default=str(REPO / "weights" / "training_curves.png"))
    p.add_argument("--runs-glob", nargs="+", default=["*"], help="which run folders (e.g. '*-anyp' for the from-scratch models; several globs: their union)")
    args = p.parse_args(argv)
    logs = sorted({log for g in args.runs_glob for log in pathlib.Path(args.runs).glob(f"{g}/log.csv")})
    if not logs:
        raise SystemExit(f"no log.csv under {args.runs}")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, log in enumerate(logs):
        name = log.parent.name
        color = f"C{i}"
        train, val = _read(log)
        if train:
            s, l = zip(*train)
            axes[0].plot(s, l, color=color, alpha=0.8, label=name)
        for j, (P, pts) in enumerate(sorted(val.items(), key=lambda kv: -float(kv[0]))):
            s, vl, vs = zip(*pts)
            style = ["-", "--", ":"][j % 3]
            label = f"{name} @P={P}" if len(val) > 1 else name
            axes[1].plot(s, vl, style, color=color, marker=".", label=label)
            axes[2].plot(s, vs, style, color=color, marker=".", label=label)
    axes[0].set(title="training loss (mean since the last validation step)", xlabel="step", ylabel="loss")
    axes[1].set(title="validation loss (speech/val, fixed mixtures)", xlabel="step", ylabel="loss")
    axes[2].set(title="validation SI-SNR", xlabel="step", ylabel="dB")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
