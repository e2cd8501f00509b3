"""Command line: ``npdgru enhance | info | convert | eval``.

Every expected failure (bad audio, bad weights, refused checkpoint, bad arguments) prints one
line ``npdgru: error: ...`` naming the file and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import AudioError, NpdgruError, ParameterError


def _one_line(msg: str) -> str:
    """Fold a multi-line message (e.g. every problem of a weight file) into one line."""
    head, *rest = [line.strip() for line in str(msg).splitlines() if line.strip()] or [""]
    return " ".join([head, "; ".join(rest)]) if rest else head


def _error(msg: str) -> int:
    print(f"npdgru: error: {_one_line(msg)}", file=sys.stderr)
    return 2


def _collect_inputs(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input root) for every audio file named or inside a folder."""
    from .enhance import AUDIO_SUFFIXES

    found = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise AudioError(f"{p}: folder holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
            found += [(f, f.relative_to(p)) for f in files]
        elif p.exists():
            found.append((p, Path(p.name)))
        else:
            raise AudioError(f"{p}: no such file or folder")
    return found


def _plan_outputs(pairs, out: str, overwrite: bool) -> list[tuple[Path, Path]]:
    from .enhance import AUDIO_SUFFIXES

    out_p = Path(out)
    single_file_out = len(pairs) == 1 and out_p.suffix.lower() in AUDIO_SUFFIXES and not out_p.is_dir()
    plan = []
    for src, rel in pairs:
        dst = out_p if single_file_out else out_p / rel
        plan.append((src, dst))
    in_real = {os.path.realpath(s) for s, _ in plan}
    seen = set()
    for src, dst in plan:
        r = os.path.realpath(dst)
        if r in in_real:
            raise ParameterError(f"{dst}: output would overwrite an input file; choose another -o")
        if r in seen:
            raise ParameterError(f"{dst}: two inputs would write the same output file")
        seen.add(r)
        if dst.exists() and not overwrite:
            raise ParameterError(f"{dst}: output exists; pass --overwrite to replace it")
    return plan


def cmd_enhance(args) -> int:
    import soundfile as sf
    from tqdm import tqdm

    from .enhance import Enhancer, read_audio, write_audio

    plan = _plan_outputs(_collect_inputs(args.inputs), args.output, args.overwrite)
    enh = Enhancer(args.weights, update_percent=args.update_percent, backend=args.backend, mask_floor_db=args.mask_floor_db)
    pct = 100.0 * enh.model.fraction_updated()
    failures = 0
    bar = tqdm(plan, unit="file", disable=args.quiet or len(plan) < 2, file=sys.stderr)
    for src, dst in bar:
        try:
            x, sr = read_audio(src)
            t0 = time.perf_counter()
            y = enh.enhance(x, sr)
            dt = time.perf_counter() - t0
            info = sf.info(str(src))
            same_format = Path(dst).suffix.lower() == Path(src).suffix.lower()
            write_audio(dst, y, sr, subtype=info.subtype if same_format else None)
        except NpdgruError as e:
            failures += 1
            tqdm.write(f"npdgru: error: {_one_line(e)}", file=sys.stderr)
            continue
        dur = len(x) / sr
        if not args.quiet:
            tqdm.write(f"{src} -> {dst}: {dur:.2f} s, {x.shape[1]} ch, {sr} Hz, real-time factor {dt / dur:.3f}, {pct:.1f}% of GRU neurons updated per frame (P={enh.update_percent:g})", file=sys.stdout)
    return 2 if failures else 0


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
    summary = evaluate(args.data, args.out, weights=args.weights, percents=args.percents, onnx=args.onnx, jobs=args.jobs, limit=args.limit, timing_frames=args.timing_frames, timing_repeats=args.timing_repeats, progress=not args.quiet, command=command)
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
    e.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    e.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    e.add_argument("--update-percent", "-P", type=float, default=100.0, help="P in (0, 100]: percent of GRU neurons updated per frame (default 100)")
    e.add_argument("--weights", default=None, help="weight file (default: the shipped weights/nsnet2-ft-anyp.safetensors)")
    e.add_argument("--backend", choices=("cpu", "reference", "cuda"), default="cpu")
    e.add_argument("--mask-floor-db", type=float, default=-80.0, help="lowest gain of the mask in dB (default -80, as NSNet2)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
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
    v.add_argument("--jobs", type=_positive_int, default=1, help="worker processes over files (default 1)")
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
