"""Command line: ``npdgru enhance | info | convert | eval``.

Every expected failure (bad audio, bad weights, refused checkpoint, bad arguments) prints one
line ``npdgru: error: ...`` naming the file and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import AudioError, NpdgruError, ParameterError


def _one_line(msg: str) -> str:
    """Fold a multi-line message (e.g. every problem of a weight file) into one line."""
    head, *rest = [line.strip() for line in str(msg).splitlines() if line.strip()] or [""]
    return " ".join([head, "; ".join(rest)]) if rest else head


def _error(msg: str) -> int:
    print(f"npdgru: error: {_one_line(msg)}", file=sys.stderr)
    return 2


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C: temporary outputs are removed, the journal is closed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_enhance(args) -> int:
    from tqdm import tqdm

    from . import distributed as dist
    from .enhance import Enhancer

    if args.jobs and args.scheduler:
        raise ParameterError("--jobs and --scheduler exclude each other: --jobs N starts N local workers, --scheduler attaches to a running cluster")
    if args.jobs or args.scheduler:
        dist._need_dask()
    # The weights and P are checked here, before any file is planned or any worker starts.
    enh = Enhancer(args.weights, update_percent=args.update_percent, backend=args.backend, mask_floor_db=args.mask_floor_db)
    weights_path = getattr(enh.weights, "path", None) or args.weights
    weights_path = os.path.abspath(weights_path) if weights_path else None  # workers run elsewhere
    config = dist.Config(weights=weights_path, update_percent=enh.update_percent, backend=args.backend, mask_floor_db=enh.mask_floor_db,
                         model=dist.model_id(weights_path) if weights_path else "")
    dist._ENHANCERS.clear()
    dist._ENHANCERS[config] = enh  # the in-process loop uses this one
    items, skipped, journal = dist.plan_work(args.inputs, args.output, config=config, overwrite=args.overwrite)
    pct = 100.0 * enh.model.fraction_updated()
    total = len(items) + len(skipped)
    bar = tqdm(total=total, initial=len(skipped), unit="file", disable=args.quiet or total < 2, file=sys.stderr, desc="npdgru enhance")
    counts = {"done": 0, "failed": 0, "skipped": len(skipped)}
    audio = [0.0]
    t_start = time.perf_counter()

    def on_result(r):
        counts[r.status] += 1
        if r.status == "failed":
            tqdm.write(f"npdgru: error: {_one_line(r.error)}", file=sys.stderr)
        else:
            audio[0] += r.seconds
            if not args.quiet and r.seconds:
                rtf = f", real-time factor {r.compute / r.seconds:.3f}" if r.rewritten else " (written by an earlier attempt)"
                tqdm.write(f"{r.src} -> {r.dst}: {r.seconds:.2f} s, {r.channels} ch, {r.rate} Hz{rtf}, {pct:.1f}% of GRU neurons updated per frame (P={enh.update_percent:g})", file=sys.stdout)
        wall = time.perf_counter() - t_start
        bar.set_postfix_str(f"{audio[0] / 3600:.3f} h audio, RTF {wall / audio[0] if audio[0] else 0:.3f}, {counts['failed']} failed", refresh=False)
        bar.update(1)

    try:
        with _sigterm_as_interrupt():
            dist.run_items(items, config, journal=journal, jobs=args.jobs, scheduler=args.scheduler, on_result=on_result)
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    if not args.quiet and total > 1:
        rtf = f", RTF {wall / audio[0]:.3f} (wall time / audio time)" if audio[0] else ""
        print(f"npdgru enhance: {total} files: {counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
              f"{audio[0] / 3600:.3f} h of audio in {wall:.1f} s{rtf}", file=sys.stdout)
    return 2 if counts["failed"] else 0


def cmd_info(args) -> int:
    from .weights import load_weights

    w = load_weights(args.weights)
    print(w.describe())
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise ParameterError(f"{out}: output exists; pass --overwrite to replace it")
    if os.path.realpath(out) == os.path.realpath(args.checkpoint):
        raise ParameterError(f"{out}: output would overwrite the checkpoint")
    meta = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    notes = convert_checkpoint(
        args.checkpoint, out, arch=args.arch, mapping=args.map, trained_update_percent=args.trained_update_percent,
        source=args.source, license=args.license, metadata=meta,
    )
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out}")
    return 0


def cmd_train(train_args: list[str]) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ParameterError('npdgru train needs PyTorch: pip install -e ".[torch]" torch==2.13.0') from None
    from .train.loop import main as train_main

    return train_main(train_args)


def cmd_eval(args) -> int:
    from .evaluate import missing_dependencies

    missing = missing_dependencies()
    if missing:
        return _error(f"npdgru eval needs {', '.join(missing)} (the eval extra): pip install -e \".[eval]\"")
    from .evaluate.report import markdown
    from .evaluate.runner import evaluate

    argv = getattr(args, "argv", None)
    command = "npdgru eval " + " ".join(argv) if argv is not None else None
    summary = evaluate(args.data, args.out, weights=args.weights, percents=args.percents, onnx=args.onnx, jobs=args.jobs, scheduler=args.scheduler, limit=args.limit, timing_frames=args.timing_frames, timing_repeats=args.timing_repeats, progress=not args.quiet, command=command)
    if not args.quiet:
        text = markdown(summary)
        start = text.index("## All")
        print(text[start : text.index("## By input SNR")].rstrip())
    print(f"wrote {Path(args.out) / 'per_file.csv'}, summary.md, summary.json, quality_vs_compute.png")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="npdgru", description="D-GRU speech enhancement (NumPy + Numba).")
    p.add_argument("--version", action="version", version=f"npdgru {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enhance", help="enhance audio files or folders")
    e.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or manifests (.csv or .jsonl with an input path column 'input' or 'audio_filepath', optionally 'output')")
    e.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    e.add_argument("--update-percent", "-P", type=float, default=100.0, help="P in (0, 100]: percent of GRU neurons updated per frame (default 100)")
    e.add_argument("--weights", default=None, help="weight file (default: the shipped weights/nsnet2-ft-anyp.safetensors)")
    e.add_argument("--backend", choices=("cpu", "reference", "cuda"), default="cpu")
    e.add_argument("--mask-floor-db", type=float, default=-80.0, help="lowest gain of the mask in dB (default -80, as NSNet2)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    e.add_argument("--jobs", type=_positive_int, default=None, help="run on a local Dask cluster of N single-threaded worker processes (needs the distributed extra)")
    e.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on the running Dask cluster at ADDRESS (tcp://host:8786); inputs and outputs on storage every worker sees")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_enhance)

    i = sub.add_parser("info", help="what a weight file holds")
    i.add_argument("weights")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a checkpoint (PyTorch .pt/.pth/.ckpt, .safetensors, NSNet2 .onnx) to npdgru weights")
    c.add_argument("checkpoint")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--arch", default="nsnet2", help="target architecture: nsnet2 (default), dprnn, mpt or an architecture JSON file")
    c.add_argument("--map", default=None, help="JSON file mapping checkpoint names to npdgru names")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--trained-update-percent", default="100", help="P the model was trained at, or 'any' (stored in the metadata)")
    c.add_argument("--source", default=None, help="where the weights come from (metadata)")
    c.add_argument("--license", default=None, help="licence of the weights (metadata)")
    c.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="more metadata (repeatable)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("eval", help="quality (PESQ, ESTOI, SI-SNR, DNSMOS) and compute of every model at every P on clean/noisy pairs")
    v.add_argument("--data", required=True, help="folder with clean/ and noisy/ (files of the same names) and optionally manifest.csv")
    v.add_argument("--out", required=True, help="output folder: per_file.csv, summary.md, summary.json, quality_vs_compute.png")
    v.add_argument("--weights", nargs="+", default=None, help="weight files (default: every weights/*.safetensors); FILE@P1,P2 evaluates FILE only at those P")
    v.add_argument("--percents", nargs="+", type=float, default=[100, 75, 50, 25, 10], help="update percentages P (default 100 75 50 25 10)")
    v.add_argument("--onnx", default=None, help="NSNet2 ONNX model for the onnxruntime row (default: .cache/nsnet2/nsnet2-20ms-baseline.onnx; left out if absent)")
    v.add_argument("--jobs", type=_positive_int, default=1, help="worker processes over files (default 1: in this process; more: a local Dask cluster, the distributed extra)")
    v.add_argument("--scheduler", default=None, metavar="ADDRESS", help="evaluate the files on the running Dask cluster at ADDRESS (tcp://host:8786)")
    v.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N pairs (sorted by name)")
    v.add_argument("--timing-frames", type=_positive_int, default=1000, help="frames of real features timed per row (default 1000)")
    v.add_argument("--timing-repeats", type=_positive_int, default=7, help="timed rounds over all rows, the best run of each row is kept (default 7)")
    v.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no table on stdout")
    v.set_defaults(func=cmd_eval)

    # Its options live with the training code (npdgru/train/loop.py), which needs torch: the
    # arguments are passed through so that `import npdgru.cli` never imports torch.
    # main() hands everything after `train` to that parser; this entry is for `npdgru --help`.
    sub.add_parser("train", help="fine-tune a model with the D-GRU select gate (needs torch; `npdgru train --help`)", add_help=False)
    return p


def main(argv=None) -> int:
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if argv_list[:1] == ["train"]:
        try:
            return cmd_train(argv_list[1:])
        except NpdgruError as e:
            return _error(str(e))
        except KeyboardInterrupt:
            return _error("interrupted")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])  # for the record of `npdgru eval`
    try:
        return args.func(args)
    except NpdgruError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
