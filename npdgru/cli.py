"""Command line: ``npdgru enhance | info | convert``.

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
    notes = convert_checkpoint(args.checkpoint, out, arch=args.arch, mapping=args.map)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="npdgru", description="D-GRU speech enhancement (NumPy + Numba).")
    p.add_argument("--version", action="version", version=f"npdgru {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enhance", help="enhance audio files or folders")
    e.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    e.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    e.add_argument("--update-percent", "-P", type=float, default=100.0, help="P in (0, 100]: percent of GRU neurons updated per frame (default 100)")
    e.add_argument("--weights", default=None, help="weight file (default: shipped weights/nsnet2.safetensors)")
    e.add_argument("--backend", choices=("cpu", "reference"), default="cpu")
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
    c.add_argument("--arch", default="nsnet2", help="target architecture (default nsnet2)")
    c.add_argument("--map", default=None, help="JSON file mapping checkpoint names to npdgru names")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NpdgruError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
