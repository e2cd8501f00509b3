"""Command line: ``npdgru enhance | models | info | convert | eval | train``.

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

from .errors import NpdgruError, ParameterError


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


def _format_percent(fraction: float) -> str:
    """A percentage that does not round A/H away: 0.0025 -> '0.25', 0.0125 -> '1.25', 0.5 -> '50.0'."""
    text = f"{100.0 * fraction:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _warm_up(enh, quiet: bool) -> None:
    """Run the kernels once on silence, so that per-file times exclude JIT compilation.

    Numba compiles on the first call (cached on disk afterwards); if that takes more than half a
    second, say so on a terminal while it runs, and how long it took.
    """
    import threading

    import numpy as np

    said = threading.Event()

    def say():
        said.set()
        print("npdgru: compiling kernels (first run only) ...", file=sys.stderr, flush=True)

    timer = threading.Timer(0.5, say)
    if not quiet and sys.stderr.isatty():
        timer.start()
    t0 = time.perf_counter()
    try:
        enh.enhance(np.zeros(4 * enh.sample_rate // 100, np.float32), enh.sample_rate)
    finally:
        timer.cancel()
    if said.is_set():
        print(f"npdgru: kernels compiled in {time.perf_counter() - t0:.1f} s (not counted in the times below)", file=sys.stderr, flush=True)


def cmd_enhance(args) -> int:
    from tqdm import tqdm

    from . import distributed as dist
    from .enhance import Enhancer, output_subtype

    if args.jobs and args.scheduler:
        raise ParameterError("--jobs and --scheduler exclude each other: --jobs N starts N local workers, --scheduler attaches to a running cluster")
    if args.jobs or args.scheduler:
        dist._need_dask()
    if args.model is not None and args.weights is not None:
        raise ParameterError("pass either --model NAME or --weights FILE, not both")
    # The weights and P are checked here, before any file is planned or any worker starts.
    if args.exact and (args.jobs or args.scheduler):  # dist.Config does not carry it to workers yet
        raise ParameterError("--exact runs in this process only: leave out --jobs/--scheduler")
    enh = Enhancer(args.weights, model=args.model, update_percent=args.update_percent, backend=args.backend, mask_floor_db=args.mask_floor_db, exact=args.exact)
    weights_path = getattr(enh.weights, "path", None) or args.weights
    weights_path = os.path.abspath(weights_path) if weights_path else None  # workers run elsewhere
    config = dist.Config(weights=weights_path, update_percent=enh.update_percent, backend=args.backend, mask_floor_db=enh.mask_floor_db,
                         model=dist.model_id(weights_path) if weights_path else "", subtype=args.subtype)
    items, skipped, journal = dist.plan_work(args.inputs, args.output, config=config, overwrite=args.overwrite)
    if args.subtype is not None:  # a --subtype the output format cannot hold: once, before any work
        import numpy as np

        for dst in {Path(it.dst).suffix.lower(): it.dst for it in items}.values():
            output_subtype(dst, np.zeros(1, np.float32), subtype=args.subtype)
    dist._ENHANCERS.clear()
    dist._ENHANCERS[config] = enh  # the in-process loop uses this one
    if items and not (args.jobs or args.scheduler):
        _warm_up(enh, args.quiet)  # per-file times exclude JIT compilation
    pct = _format_percent(enh.model.fraction_updated())
    total = len(items) + len(skipped)
    bar = tqdm(total=total, initial=len(skipped), unit="file", disable=args.quiet or total < 2, file=sys.stderr, desc="npdgru enhance")
    counts = {"done": 0, "failed": 0, "skipped": len(skipped)}
    audio = [0.0]
    t_start = time.perf_counter()

    def on_result(r):
        counts[r.status] += 1
        for w in r.warnings:
            tqdm.write(f"npdgru: warning: {w}", file=sys.stderr)
        if r.status == "failed":
            tqdm.write(f"npdgru: error: {_one_line(r.error)}", file=sys.stderr)
        else:
            audio[0] += r.seconds
            if not args.quiet and r.seconds:
                rtf = f", real-time factor {r.compute / r.seconds:.3f}" if r.rewritten else " (written by an earlier attempt)"
                tqdm.write(f"{r.src} -> {r.dst}: {r.seconds:.2f} s, {r.channels} ch, {r.rate} Hz{rtf}, {pct}% of GRU neurons updated per frame (P={enh.update_percent:g})", file=sys.stdout)
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


def cmd_models(args) -> int:
    from .shipped import ALIASES, shipped_models

    models = shipped_models()
    aliases = {v: k for k, v in ALIASES.items() if k != "default"}
    width = max((len(m["name"]) for m in models), default=4)
    print("shipped models (npdgru enhance --model NAME, Enhancer(model=NAME)):")
    for m in models:
        alias = f" (or {aliases[m['name']]})" if m["name"] in aliases else ""
        size = m["path"].stat().st_size / 1e6
        print(f"  {m['name']:<{width}}  {size:5.1f} MB  {m['description']}{alias}")
    print(f"files in {models[0]['path'].parent if models else '(none found)'}; npdgru info NAME for details")
    return 0


def cmd_info(args) -> int:
    from .shipped import model_path
    from .weights import load_weights

    if args.weights is None:
        return cmd_models(args)
    target = args.weights
    if not os.path.exists(target) and os.sep not in target and not target.endswith(".safetensors"):
        target = model_path(target)  # a shipped model's name
    w = load_weights(target)
    print(w.describe())
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    out = Path(args.output)
    if out.is_dir():
        raise ParameterError(f"{out}: is a folder; name the weight file to write (e.g. {out / 'model.safetensors'})")
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
    summary = evaluate(args.data, args.out, weights=args.weights, percents=args.percents, onnx=args.onnx, jobs=args.jobs, scheduler=args.scheduler, limit=args.limit, timing_frames=args.timing_frames, timing_repeats=args.timing_repeats, progress=not args.quiet, command=command, reference=not args.no_reference)
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
    e.add_argument("--model", "-m", default=None, metavar="NAME", help="a shipped model by name (npdgru models lists them; default nsnet2-kd-anyp)")
    e.add_argument("--weights", default=None, help="a weight file (instead of --model)")
    e.add_argument("--subtype", default=None, help="output sample format, e.g. PCM_16, PCM_24, FLOAT (default: the input's where the output format holds it)")
    e.add_argument("--backend", choices=("cpu", "reference", "cuda"), default="cpu")
    e.add_argument("--mask-floor-db", type=float, default=-80.0, help="lowest gain of the mask in dB (default -80, as NSNet2)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    e.add_argument("--exact", action="store_true", help="offline output bit for bit equal to the streaming hop's (products in its order; slower)")
    e.add_argument("--jobs", type=_positive_int, default=None, help="run on a local Dask cluster of N single-threaded worker processes (needs the distributed extra)")
    e.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on the running Dask cluster at ADDRESS (tcp://host:8786); inputs and outputs on storage every worker sees")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(func=cmd_enhance)

    i = sub.add_parser("info", help="what a weight file holds (no argument: the shipped models)")
    i.add_argument("weights", nargs="?", default=None, help="a weight file or a shipped model's name")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

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
    v.add_argument("--no-reference", action="store_true", help="only the weight files' rows: no clean, noisy or onnxruntime rows (a run to merge with tools/merge_eval.py, which takes them from its first run)")
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
