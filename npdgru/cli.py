"""Command line: ``npdgru enhance | stream | live | explain | models | info | convert | eval | train``.

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


def _shown(text: str) -> str:
    """Text with file names that are not UTF-8 (surrogate escapes) shown as \\xNN, printable anywhere."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if any("\udc80" <= c <= "\udcff" for c in text) else text


def _error(msg: str) -> int:
    print(f"npdgru: error: {_shown(_one_line(msg))}", file=sys.stderr)
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


def _updated(enh) -> str:
    """What the D-GRU layers update per frame, for the summary lines: the fraction at P, or the
    variable gates (threshold, delta: their work varies per frame; P sets only top-A layers)."""
    variable = sorted({s.gate for s in enh.model.plan.state_steps} - {"top-a"})
    if variable:
        return f"GRU gate {', '.join(variable)} (the neurons updated vary per frame)"
    return f"{_format_percent(enh.model.fraction_updated())}% of GRU neurons updated per frame (P={enh.update_percent:g})"


def _numba_cache_cold() -> bool:
    """True if the cpu kernels that every model runs have no numba cache index at least as new
    as their source.

    Cheap (a few stat calls): numba writes ``<module>.<function>-<line>.pyXY.nbi`` next to the
    source (``__pycache__``) or under NUMBA_CACHE_DIR, and recompiles when the source is newer.
    Only ``kernels/cpu/kernels.py`` is looked at: the streaming hop's modules stay uncompiled
    for a user who only enhances files, and must not make every run look cold.
    """
    import importlib.util

    spec = importlib.util.find_spec("npdgru.kernels.cpu.kernels")  # located, not imported (numba)
    if spec is None or not spec.origin:
        return False
    src = Path(spec.origin)
    cache_root = os.environ.get("NUMBA_CACHE_DIR")
    pattern = f"{src.stem}.*.nbi"
    index = Path(cache_root).rglob(pattern) if cache_root else (src.parent / "__pycache__").glob(pattern)
    try:
        newest = max((p.stat().st_mtime for p in index), default=None)
        return newest is None or newest < src.stat().st_mtime
    except OSError:
        return False


COMPILE_NOTICE = "npdgru: compiling the numba kernels (first run only; about 5-10 s on 2 cores, cached on disk afterwards) ..."


def _warm_up(enh, quiet: bool) -> None:
    """Run the kernels once on silence, so that per-file times exclude JIT compilation.

    Numba compiles on the first call (cached on disk afterwards). One line on stderr says so,
    terminal or not: before the call when the on-disk cache is cold, or after one second of a
    call that compiles what the cache lacked; then how long it took.
    """
    import threading

    import numpy as np

    said = threading.Event()

    def say():
        said.set()
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)

    timer = threading.Timer(1.0, say)
    if not quiet:
        if _numba_cache_cold():
            say()
        else:
            timer.start()
    t0 = time.perf_counter()
    try:
        enh.enhance(np.zeros(4 * enh.sample_rate // 100, np.float32), enh.sample_rate)
    finally:
        timer.cancel()
    if said.is_set():
        print(f"npdgru: kernels compiled in {time.perf_counter() - t0:.1f} s (not counted in the times below)", file=sys.stderr, flush=True)


def _model_name(enh) -> str:
    """The model as the user named it: a shipped model's name, else the weight file's name."""
    path = getattr(enh.weights, "path", None)
    return Path(path).name.removesuffix(".safetensors") if path else "(weights in memory)"


def _stdio_options(args):
    """(format of '-' or None, raw-PCM description of stdin or None), checked."""
    from .audio import stdio_format

    uses_stdio = "-" in getattr(args, "inputs", ["-"]) or args.output == "-"
    fmt = stdio_format(args.format) if args.format is not None else None
    if fmt is not None and not uses_stdio:
        raise ParameterError("--format is the format of '-' (standard input or output); a file's format is its suffix")
    if (args.rate is not None or args.channels is not None) and fmt != "RAW":
        raise ParameterError("--rate and --channels describe raw PCM: pass them with --format raw")
    raw = None
    if fmt == "RAW" and "-" in getattr(args, "inputs", ["-"]):
        if args.rate is None or args.channels is None:
            raise ParameterError("--format raw reads headerless PCM: pass --rate HZ and --channels N (and --subtype, default PCM_16)")
        raw = {"samplerate": args.rate, "channels": args.channels, "subtype": (args.subtype or "PCM_16").upper()}
    return fmt, raw


def _enhance_stdio(args, enh) -> int:
    """One input to one output where either is '-' (standard input / output): in memory."""
    from .audio import audio_format, output_subtype, read_audio, write_audio

    if len(args.inputs) != 1:
        raise ParameterError("'-' (standard input or output) takes exactly one input")
    src, dst = args.inputs[0], args.output
    if args.jobs or args.scheduler:
        raise ParameterError("--jobs and --scheduler enhance files and folders, not '-' (standard input or output)")
    fmt, raw = _stdio_options(args)
    if src != "-" and os.path.isdir(src):
        raise ParameterError(f"{src}: is a folder; '-o -' (standard output) takes one file")
    if dst != "-":
        if os.path.isdir(dst):
            raise ParameterError(f"{dst}: is a folder; name the output file for standard input (e.g. {os.path.join(dst, 'enhanced.wav')})")
        audio_format(dst)  # a suffix npdgru writes, before standard input is read
        if os.path.exists(dst) and not args.overwrite:
            raise ParameterError(f"{dst}: output exists; pass --overwrite to replace it")
    if src != "-" and dst != "-" and os.path.realpath(src) == os.path.realpath(dst):
        raise ParameterError(f"{dst}: output would overwrite the input")
    if src == "-" and sys.stdin.isatty():
        raise ParameterError("'-' reads audio from standard input, which is a terminal here: pipe a file in (cat in.wav | npdgru enhance - -o ...)")
    if dst == "-" and sys.stdout.isatty():
        raise ParameterError("'-o -' writes audio to standard output, which is a terminal here: redirect it (> out.wav) or pipe it")
    x, sr, meta = read_audio(src, info=True, raw=raw)
    out_fmt = (fmt or "WAV") if dst == "-" else None
    _warm_up(enh, args.quiet)
    t0 = time.perf_counter()
    y = enh.enhance(x, sr)
    compute = time.perf_counter() - t0
    chosen, warns = output_subtype(dst, y, source_subtype=meta["subtype"], subtype=args.subtype, format=out_fmt)
    for w in warns:
        print(f"npdgru: warning: {w.replace('-: ', 'stdout: ', 1) if w.startswith('-: ') else w}", file=sys.stderr)
    write_audio(dst, y, sr, subtype=chosen, format=out_fmt)
    if not args.quiet:
        seconds = len(x) / sr
        print(f"{'stdin' if src == '-' else src} -> {'stdout' if dst == '-' else dst}: {seconds:.2f} s, {x.shape[1]} ch, {sr} Hz, real-time factor {compute / seconds:.3f}, "
              f"{_updated(enh)}, model {_model_name(enh)}, enhanced in {compute:.2f} s", file=sys.stderr)
    return 0


def cmd_enhance(args) -> int:
    from tqdm import tqdm

    from . import corpus
    from .enhance import Enhancer

    if args.jobs and args.scheduler:
        raise ParameterError("--jobs and --scheduler exclude each other: --jobs N starts N local workers, --scheduler attaches to a running cluster")
    if args.jobs or args.scheduler:
        corpus.need_dask()
    if args.model is not None and args.weights is not None:
        raise ParameterError("pass either --model NAME or --weights FILE, not both")
    if args.output == "/dev/stdout":
        args.output = "-"  # not a file to replace atomically: the same stream as '-'
    _stdio_options(args)  # --format, --rate, --channels checked before the model loads
    # The weights and P are checked here, before any file is planned or any worker starts.
    enh = Enhancer(args.weights, model=args.model, update_percent=args.update_percent, backend=args.backend, mask_floor_db=args.mask_floor_db, exact=args.exact)
    if "-" in args.inputs or args.output == "-":
        return _enhance_stdio(args, enh)
    weights_path = getattr(enh.weights, "path", None) or args.weights
    weights_path = os.path.abspath(weights_path) if weights_path else None  # workers run elsewhere
    config = corpus.Config(weights=weights_path, update_percent=enh.update_percent, backend=args.backend, mask_floor_db=enh.mask_floor_db,
                         model=corpus.model_id(weights_path) if weights_path else "", subtype=args.subtype, exact=args.exact)
    items, skipped, journal = corpus.plan_work(args.inputs, args.output, config=config, overwrite=args.overwrite)
    if journal is not None and journal.warning():
        print(f"npdgru: warning: {_shown(journal.warning())}", file=sys.stderr)
    corpus.use_enhancer(config, enh)  # the in-process loop uses this one
    if items and not (args.jobs or args.scheduler):
        _warm_up(enh, args.quiet)  # per-file times exclude JIT compilation
    updated = _updated(enh)
    model = _model_name(enh)
    total = len(items) + len(skipped)
    bar = tqdm(total=total, initial=len(skipped), unit="file", disable=args.quiet or total < 2 or not sys.stderr.isatty(), file=sys.stderr, desc="npdgru enhance")
    counts = {"done": 0, "failed": 0, "skipped": len(skipped)}
    audio = [0.0]
    t_start = time.perf_counter()

    def on_result(r):
        counts[r.status] += 1
        for w in r.warnings:
            tqdm.write(f"npdgru: warning: {_shown(w)}", file=sys.stderr)
        if r.status == "failed":
            tqdm.write(f"npdgru: error: {_shown(_one_line(r.error))}", file=sys.stderr)
        else:
            audio[0] += r.seconds
            if not args.quiet and r.seconds:
                rtf = f", real-time factor {r.compute / r.seconds:.3f}" if r.rewritten else " (written by an earlier attempt)"
                wall_s = f", enhanced in {r.compute:.2f} s" if r.rewritten else ""
                tqdm.write(f"{_shown(r.src)} -> {_shown(r.dst)}: {r.seconds:.2f} s, {r.channels} ch, {r.rate} Hz{rtf}, {updated}, model {model}{wall_s}", file=sys.stdout)
        wall = time.perf_counter() - t_start
        bar.set_postfix_str(f"{audio[0] / 3600:.3f} h audio, RTF {wall / audio[0] if audio[0] else 0:.3f}, {counts['failed']} failed", refresh=False)
        bar.update(1)

    try:
        with _sigterm_as_interrupt():
            corpus.run_items(items, config, journal=journal, jobs=args.jobs, scheduler=args.scheduler, on_result=on_result,
                           on_note=lambda line: tqdm.write(f"npdgru: warning: {_shown(line)}", file=sys.stderr))
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    if not args.quiet and total > 1:
        rtf = f", RTF {wall / audio[0]:.3f} (wall time / audio time)" if audio[0] else ""
        print(f"npdgru enhance: {total} files: {counts['done']} done, {counts['skipped']} skipped (done before), {counts['failed']} failed; "
              f"{audio[0] / 3600:.3f} h of audio in {wall:.1f} s{rtf}", file=sys.stdout)
    return 2 if counts["failed"] else 0


def _load_enhancer(args):
    from .enhance import Enhancer

    if args.model is not None and args.weights is not None:
        raise ParameterError("pass either --model NAME or --weights FILE, not both")
    return Enhancer(args.weights, model=args.model, update_percent=args.update_percent, backend=args.backend, mask_floor_db=args.mask_floor_db)


def _warm_stream(enh, rate: int, channels: int, quiet: bool) -> None:
    """Compile (or load) every kernel a stream at this rate uses before the first real block."""
    import numpy as np

    _warm_up(enh, quiet)
    warm = enh.stream(sample_rate=rate, channels=channels)
    warm.process(np.zeros((rate // 25, channels) if channels > 1 else rate // 25, np.float32))


def cmd_stream(args) -> int:
    """Standard input to standard output, block by block, with the model state carried."""
    from . import pcm
    from .audio import MAX_CHANNELS, _check_rate

    fmt = (args.format or "wav").lower()
    if fmt not in ("wav", "raw"):
        raise ParameterError(f"--format {args.format!r}: npdgru stream reads and writes wav or raw")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    if sys.stdin.isatty() or sys.stdout.isatty():
        raise ParameterError("npdgru stream reads audio from standard input and writes it to standard output: pipe or redirect both (npdgru stream < in.wav > out.wav)")
    if fmt == "raw":
        if args.rate is None or args.channels is None:
            raise ParameterError("--format raw reads headerless PCM: pass --rate HZ and --channels N (and --subtype, default PCM_16)")
        rate, channels, sub_in = args.rate, args.channels, pcm.check_subtype(args.subtype or "PCM_16")
        sub_out = sub_in
    else:
        if args.rate is not None or args.channels is not None:
            raise ParameterError("--rate and --channels describe raw PCM (--format raw); a WAV's come from its header")
        rate, channels, sub_in = pcm.read_wav_header(stdin)
        sub_out = pcm.check_subtype(args.subtype) if args.subtype else sub_in
    _check_rate(rate, "stdin: sample rate")
    if channels > MAX_CHANNELS:
        raise ParameterError(f"stdin: {channels} channels; npdgru takes at most {MAX_CHANNELS}")
    enh = _load_enhancer(args)
    stream = enh.stream(sample_rate=rate, channels=channels)
    _warm_stream(enh, rate, channels, args.quiet)
    if not 0 < args.block_ms <= 1000:
        raise ParameterError(f"--block-ms {args.block_ms:g}: must be in (0, 1000]")
    block = max(1, round(rate * args.block_ms / 1000.0))
    frame_bytes = channels * pcm.SUBTYPES[sub_in]
    skip = 0 if args.keep_latency else stream.latency  # drop the delay: output aligned with input
    n_in = n_out = 0
    compute = 0.0

    def emit(y):
        nonlocal skip, n_out
        y = y.reshape(-1, channels)
        if skip:
            cut = min(skip, len(y))
            y, skip = y[cut:], skip - cut
        if len(y):
            stdout.write(pcm.encode(y, sub_out))
            stdout.flush()
            n_out += len(y)

    try:
        if fmt == "wav":
            stdout.write(pcm.wav_header(rate, channels, sub_out))
        while True:
            data = pcm._read_exact(stdin, block * frame_bytes)
            whole = len(data) - len(data) % frame_bytes
            if whole:
                x = pcm.decode(data[:whole], sub_in, channels)
                t0 = time.perf_counter()
                y = stream.process(x if channels > 1 else x[:, 0])
                compute += time.perf_counter() - t0
                n_in += len(x)
                emit(y)
            if len(data) < block * frame_bytes:
                if whole != len(data):
                    print(f"npdgru: warning: stdin: ended inside a sample frame; the last {len(data) - whole} bytes are dropped", file=sys.stderr)
                break
        t0 = time.perf_counter()
        emit(stream.flush())
        compute += time.perf_counter() - t0
        if fmt == "wav":
            pcm.fix_wav_sizes(stdout, rate, channels, sub_out, n_out)
        stdout.flush()
    except BrokenPipeError:
        sys.stderr.flush()
        return _error("stdout: the reader closed the pipe")
    if not args.quiet and n_in:
        secs = n_in / rate
        print(f"npdgru stream: {secs:.2f} s, {channels} ch, {rate} Hz, {_updated(enh)}, "
              f"model {_model_name(enh)}; latency {stream.latency} samples ({1000 * stream.latency / rate:.1f} ms), blocks of {block} samples; "
              f"real-time factor {compute / secs:.3f} (compute / audio time)", file=sys.stderr)
    return 0


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise ParameterError('npdgru live needs sounddevice (the live extra): pip install -e ".[live]"') from None
    except OSError as e:  # sounddevice imports, but PortAudio is missing
        raise ParameterError(f"npdgru live: sounddevice cannot load PortAudio ({e}); install it (e.g. apt-get install libportaudio2)") from None
    return sounddevice


def _device(text):
    """--input-device/--output-device: an index or (part of) a name, as sounddevice takes them."""
    if text is None:
        return None
    return int(text) if str(text).lstrip("-").isdigit() else text


def cmd_live(args) -> int:
    """Microphone to speakers (or to a file), block by block, with the model state carried."""
    import numpy as np

    sd = _sounddevice()
    if args.list_devices:
        print(sd.query_devices())
        return 0
    out_path = args.output
    if out_path is not None:
        from .audio import audio_format

        audio_format(out_path)  # a writable format, checked before the microphone opens
        if os.path.isdir(out_path):
            raise ParameterError(f"{out_path}: is a folder; name the file to record to")
        if os.path.exists(out_path) and not args.overwrite:
            raise ParameterError(f"{out_path}: output exists; pass --overwrite to replace it")
        if args.output_device is not None:
            raise ParameterError("--output-device plays; -o records to a file: pass one of them")
    if args.seconds is not None and not args.seconds > 0:
        raise ParameterError(f"--seconds {args.seconds}: must be > 0")
    enh = _load_enhancer(args)
    rate, channels = args.rate, args.channels
    stream = enh.stream(sample_rate=rate, channels=channels)
    _warm_stream(enh, rate, channels, args.quiet)
    if not 0 < args.block_ms <= 1000:
        raise ParameterError(f"--block-ms {args.block_ms:g}: must be in (0, 1000]")
    block = max(1, round(rate * args.block_ms / 1000.0))
    limit = None if args.seconds is None else int(round(args.seconds * rate))
    inp, outp = _device(args.input_device), _device(args.output_device)
    try:
        if out_path is None:
            dev = sd.Stream(samplerate=rate, blocksize=block, channels=channels, dtype="float32", device=(inp, outp))
        else:
            dev = sd.InputStream(samplerate=rate, blocksize=block, channels=channels, dtype="float32", device=inp)
    except Exception as e:  # PortAudio's errors: a missing device, a rate it refuses
        raise ParameterError(f"npdgru live: cannot open the audio device ({' '.join(str(e).split())}); npdgru live --list-devices shows them") from None
    writer = tmp = None
    if out_path is not None:
        import tempfile

        import soundfile as sf

        folder = os.path.dirname(os.path.abspath(out_path))
        fd, tmp = tempfile.mkstemp(prefix=".npdgru-", suffix=Path(out_path).suffix + ".part", dir=folder)
        os.close(fd)
        writer = sf.SoundFile(tmp, "w", samplerate=rate, channels=channels, format=audio_format(out_path))
    n_in = dropped = 0
    compute = 0.0
    if not args.quiet:
        where = out_path if out_path is not None else "the speakers"
        print(f"npdgru live: {rate} Hz, {channels} ch, blocks of {block} samples, latency {stream.latency} samples ({1000 * stream.latency / rate:.1f} ms) "
              f"plus the devices'; to {where}; Ctrl-C ends", file=sys.stderr, flush=True)
    try:
        with dev:
            while limit is None or n_in < limit:
                x, overflowed = dev.read(block)
                dropped += bool(overflowed)
                x = np.asarray(x, np.float32).reshape(-1, channels)
                t0 = time.perf_counter()
                y = stream.process(x if channels > 1 else x[:, 0])
                compute += time.perf_counter() - t0
                n_in += len(x)
                if writer is not None:
                    writer.write(y)
                else:
                    dropped += bool(dev.write(np.ascontiguousarray(y.reshape(-1, channels))))
    except KeyboardInterrupt:
        pass
    finally:
        if writer is not None:
            writer.write(stream.flush())
            writer.close()
            os.replace(tmp, out_path)
    if not args.quiet and n_in:
        secs = n_in / rate
        print(f"npdgru live: {secs:.2f} s, real-time factor {compute / secs:.3f} (compute / audio time), {dropped} dropped blocks "
              f"(input overflows and output underflows), model {_model_name(enh)}, P={enh.update_percent:g}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from .shipped import ALIASES, shipped_models

    models = shipped_models()
    aliases = {v: k for k, v in ALIASES.items() if k != "default"}
    width = max((len(m["name"]) for m in models), default=4)
    print("shipped models (npdgru enhance --model NAME, Enhancer(model=NAME)):")
    hows = [f"P={m['update_percent']:g}" if m["gate"] is None else m["gate"] for m in models]
    how_width = max((len(h) for h in hows), default=5)
    for m, how in zip(models, hows):
        alias = f" (or {aliases[m['name']]})" if m["name"] in aliases else ""
        size = m["path"].stat().st_size / 2**20
        print(f"  {m['name']:<{width}}  {size:5.1f} MiB  {how:<{how_width}}  {m['description']}{alias}")
    print(f"P: the update percent used when -P is not given (a delta or threshold gate reads none); files in {models[0]['path'].parent if models else '(none found)'}; npdgru info NAME for details")
    return 0


def cmd_info(args) -> int:
    from .shipped import model_path
    from .weights import load_weights

    if args.weights is None:
        return cmd_models(args)
    target = args.weights
    if not os.path.exists(target) and os.sep not in target and not target.endswith(".safetensors"):
        target = model_path(target)  # a shipped model's name
    from .shipped import default_update_percent

    w = load_weights(target)
    print(w.describe())
    print(f"runs at: P={default_update_percent(w):g} when -P / update_percent is not given")
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
    gate = None  # keep the architecture's gates unless --gate (or a stray --theta) says otherwise
    if args.gate is not None or args.theta is not None or args.theta_x is not None:
        from .kinds import gate_fields

        gate = gate_fields(args.gate or "top-a", args.theta, args.theta_x)
    notes = convert_checkpoint(
        args.checkpoint, out, arch=args.arch, mapping=args.map, trained_update_percent=args.trained_update_percent,
        source=args.source, license=args.license, metadata=meta, gate=gate,
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
    weights, percents = args.weights, args.percents
    if weights is None:  # the quick question: the default model dense and at the P it runs at
        from .shipped import default_update_percent
        from .weights import default_weights_path, load_weights

        path = default_weights_path()
        own = [100.0] + [p for p in [default_update_percent(load_weights(path))] if p != 100.0]
        weights = [str(path) if percents is not None else f"{path}@{','.join(f'{p:g}' for p in own)}"]
    if percents is None:
        percents = [100, 75, 50, 25, 10]
    if not args.quiet and _numba_cache_cold():
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)
    summary = evaluate(args.data, args.out, weights=weights, percents=percents, onnx=args.onnx, jobs=args.jobs, scheduler=args.scheduler, limit=args.limit, timing_frames=args.timing_frames, timing_repeats=args.timing_repeats, progress=not args.quiet and sys.stderr.isatty(), command=command, reference=not args.no_reference)
    if not args.quiet:
        text = markdown(summary)
        start = text.index("## All")
        print(text[start : text.index("## By input SNR")].rstrip())
    print(f"wrote {Path(args.out) / 'per_file.csv'}, summary.md, summary.json, quality_vs_compute.png")
    return 0


def cmd_explain(args) -> int:
    """One HTML page of what the D-GRU selects for an input (npdgru/explain.py)."""
    from .explain import DEFAULT_SECONDS, explain_file

    if args.model is not None and args.weights is not None:
        raise ParameterError("pass either --model NAME or --weights FILE, not both")
    if not args.quiet and _numba_cache_cold():
        print(COMPILE_NOTICE, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    e = explain_file(args.input, args.output, overwrite=args.overwrite, weights=args.weights, model=args.model, update_percent=args.update_percent,
                     band=args.band, start=args.start, seconds=DEFAULT_SECONDS if args.seconds is None else args.seconds)
    size = os.path.getsize(args.output)
    print(f"wrote {_shown(args.output)} ({size / 1024:.0f} KiB): {e.frames} frames, {len(e.layers)} D-GRU steps, model {e.model_name}, P={e.update_percent:g}, "
          f"{_format_percent(e.plan.fraction_updated())}% of neurons updated per frame, in {time.perf_counter() - t0:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _model_choice(p) -> None:
    """-P/--model/--weights: which model at which P (enhance, stream, live, explain)."""
    p.add_argument("--update-percent", "-P", type=float, default=None, metavar="P", help="P in (0, 100]: percent of GRU neurons updated per frame (default: the model's own P, shown by npdgru models: 50 for the any-P models, 100 for the original nsnet2 and for a weight file that records none)")
    p.add_argument("--model", "-m", default=None, metavar="NAME", help="a shipped model by name (npdgru models lists them; default nsnet2-kd-anyp)")
    p.add_argument("--weights", default=None, help="a weight file (instead of --model)")


def _model_options(p) -> None:
    """--model/--weights/-P/--backend/--mask-floor-db of the commands that enhance."""
    _model_choice(p)
    p.add_argument("--backend", choices=("cpu", "reference", "cuda"), default="cpu", help="cpu (numba, default), cuda (numba.cuda, a GPU) or reference (the NumPy float64 specification: slow, for checking)")
    p.add_argument("--mask-floor-db", type=float, default=-80.0, help="lowest gain of the mask in dB (default -80, as NSNet2)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="npdgru", description="D-GRU speech enhancement (NumPy + Numba).")
    p.add_argument("--version", action="version", version=f"npdgru {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enhance", help="enhance audio files or folders (or standard input)",
                       description="Remove noise from speech in audio files (WAV, FLAC, OGG, MP3, AIFF; 1 kHz to 384 kHz, up to 64 channels), folders "
                                   "(searched recursively, the tree mirrored under -o) or manifests, with the default model at its own P unless told otherwise. "
                                   "'-' reads standard input or writes standard output (WAV unless --format). Each output is written to a temporary file "
                                   "and renamed; an input is never overwritten. A killed folder run resumes where it stopped.")
    e.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or manifests (.csv or .jsonl with an input path column 'input' or 'audio_filepath', optionally 'output')")
    e.add_argument("-o", "--output", required=True, help="output file (one input; its suffix picks the format: .wav .flac .ogg .mp3 .aiff), folder (several inputs or a folder), or '-' for standard output")
    _model_options(e)
    e.add_argument("--subtype", default=None, help="output sample format, e.g. PCM_16, PCM_24, FLOAT (default: the input's where the output format holds it); with --format raw also the input's (default PCM_16)")
    e.add_argument("--format", default=None, metavar="FORMAT", help="format of '-' (standard input or output): wav (default for stdout), flac, ogg, mp3, aiff, or raw (headerless little-endian PCM, with --rate and --channels for stdin); stdin with a header is recognised")
    e.add_argument("--rate", type=_positive_int, default=None, metavar="HZ", help="sample rate of raw PCM on stdin (with --format raw)")
    e.add_argument("--channels", type=_positive_int, default=None, metavar="N", help="channels of raw PCM on stdin (with --format raw)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files (never an input)")
    e.add_argument("--exact", action="store_true", help="offline output bit for bit equal to the streaming hop's (products in its order; slower)")
    e.add_argument("--jobs", type=_positive_int, default=None, help="run on a local Dask cluster of N single-threaded worker processes (needs the distributed extra)")
    e.add_argument("--scheduler", default=None, metavar="ADDRESS", help="run on the running Dask cluster at ADDRESS (tcp://host:8786); inputs and outputs on storage every worker sees")
    e.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors (no per-file lines, no compile notice, no progress bar)")
    e.set_defaults(func=cmd_enhance)

    st = sub.add_parser("stream", help="enhance standard input to standard output in real time (WAV or raw PCM, any rate and channels)",
                        description="Read WAV or raw PCM from standard input and write the enhanced audio to standard output as it arrives, "
                                    "block by block with the model state carried (e.g. arecord -f S16_LE -r 48000 -c 2 -t raw | npdgru stream --format raw --rate 48000 --channels 2 | aplay -f S16_LE -r 48000 -c 2). "
                                    "Messages go to standard error.")
    st.add_argument("--format", default=None, choices=("wav", "raw"), help="wav (default: rate, channels and sample format from its header; the output is a WAV of unknown length) or raw (headerless little-endian PCM, with --rate and --channels)")
    st.add_argument("--rate", type=_positive_int, default=None, metavar="HZ", help="sample rate of raw PCM")
    st.add_argument("--channels", type=_positive_int, default=None, metavar="N", help="channels of raw PCM")
    st.add_argument("--subtype", default=None, help="sample format: PCM_16 (raw default), PCM_24, PCM_32 or FLOAT; raw: in and out; wav: out (default: the input's)")
    st.add_argument("--block-ms", type=float, default=10.0, metavar="MS", help="read and write blocks of this many milliseconds (default 10)")
    st.add_argument("--keep-latency", action="store_true", help="keep the leading delay (the stream's latency of silence) instead of dropping it; without it the output lines up with the input and has its length")
    _model_options(st)
    st.add_argument("--quiet", "-q", action="store_true", help="no messages on standard error except errors")
    st.set_defaults(func=cmd_stream)

    lv = sub.add_parser("live", help="enhance the microphone to the speakers or to a file (needs the live extra: sounddevice)",
                        description="Record from an input device, enhance block by block and play on an output device, or record the "
                                    "enhanced audio to a file with -o; prints the real-time factor and the dropped blocks at the end. Ctrl-C ends.")
    lv.add_argument("--input-device", default=None, metavar="DEV", help="input device: index or part of its name (default: the system's)")
    lv.add_argument("--output-device", default=None, metavar="DEV", help="output device: index or part of its name (default: the system's)")
    lv.add_argument("-o", "--output", default=None, metavar="FILE", help="record the enhanced audio to this file (.wav, .flac, ...) instead of playing it")
    lv.add_argument("--overwrite", action="store_true", help="replace the -o file if it exists")
    lv.add_argument("--rate", type=_positive_int, default=48000, metavar="HZ", help="device sample rate (default 48000)")
    lv.add_argument("--channels", type=_positive_int, default=1, metavar="N", help="channels (default 1)")
    lv.add_argument("--block-ms", type=float, default=10.0, metavar="MS", help="block length in milliseconds (default 10)")
    lv.add_argument("--seconds", type=float, default=None, help="stop after this many seconds (default: at Ctrl-C)")
    lv.add_argument("--list-devices", action="store_true", help="list the audio devices and exit")
    _model_options(lv)
    lv.add_argument("--quiet", "-q", action="store_true", help="no messages on standard error except errors")
    lv.set_defaults(func=cmd_live)

    x = sub.add_parser("explain", help="an HTML page of what the D-GRU does on a file: selected neurons per frame, accumulator drift, MACs",
                       description="Run a model on an audio file and write one self-contained HTML page (no network, images embedded): the noisy and "
                                   "enhanced spectrograms and the mask; per D-GRU step the neurons updated in each frame (neurons x frames), their count "
                                   "per frame and the drift of the accumulators against the refresh period; the model, P, A per step and the MACs per frame.")
    x.add_argument("input", help="an audio file (WAV, FLAC, OGG, MP3, AIFF; the first channel is shown, resampled to 16 kHz)")
    x.add_argument("-o", "--output", required=True, help="the HTML page to write")
    _model_choice(x)
    x.add_argument("--band", type=int, default=0, help="the band shown of D-GRU steps with several bands (DPRNN's 41: 0 to 40; default 0)")
    x.add_argument("--start", type=float, default=0.0, metavar="S", help="begin S seconds into the file (the model starts from zero state there; default 0)")
    x.add_argument("--seconds", type=float, default=None, metavar="S", help="show at most S seconds (default 30: a frame is a pixel column)")
    x.add_argument("--overwrite", action="store_true", help="replace the output page if it exists (never the input)")
    x.add_argument("--quiet", "-q", action="store_true", help="no compile notice on standard error")
    x.set_defaults(func=cmd_explain)

    i = sub.add_parser("info", help="what a weight file holds (no argument: the shipped models)")
    i.add_argument("weights", nargs="?", default=None, help="a weight file or a shipped model's name")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the shipped models")
    m.set_defaults(func=cmd_models)

    c = sub.add_parser("convert", help="convert a checkpoint (PyTorch .pt/.pth/.ckpt, .safetensors, NSNet2 .onnx) to npdgru weights")
    c.add_argument("checkpoint", help="the checkpoint to read: a PyTorch .pt/.pth/.ckpt (zip or legacy; read without torch and without running pickled code), a .safetensors or the NSNet2 .onnx")
    c.add_argument("-o", "--output", required=True, help="the npdgru weight file to write (.safetensors)")
    c.add_argument("--arch", default="nsnet2", help="target architecture: nsnet2 (default), dprnn, mpt or an architecture JSON file")
    c.add_argument("--map", default=None, help="JSON file mapping checkpoint names to npdgru names")
    c.add_argument("--overwrite", action="store_true", help="replace the output file if it exists (never the checkpoint)")
    c.add_argument("--trained-update-percent", default="100", help="P the model was trained at, or 'any' (stored in the metadata)")
    c.add_argument("--source", default=None, help="where the weights come from (metadata)")
    c.add_argument("--license", default=None, help="licence of the weights (metadata)")
    c.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="more metadata (repeatable)")
    c.add_argument("--gate", choices=("top-a", "threshold", "delta"), default=None,
                   help="run every D-GRU layer along time with this gate (docs/design.md); a model trained with top-A is then untrained for it")
    c.add_argument("--theta", type=float, default=None, help="the threshold of --gate threshold (0 <= theta < 1) or delta (>= 0)")
    c.add_argument("--theta-x", type=float, default=None, help="--gate delta: the input's threshold (default: --theta)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("eval", help="quality (PESQ, ESTOI, SI-SNR, DNSMOS) and compute of every model at every P on clean/noisy pairs",
                       description="Enhance every noisy file of --data with every model at every P, score it against its clean reference "
                                   "(PESQ, ESTOI, SI-SNR, DNSMOS) and time the model per frame; writes per_file.csv, summary.md, summary.json and "
                                   "a plot of quality against compute to --out. Needs the eval extra.")
    v.add_argument("--data", required=True, help="folder with clean/ and noisy/ (files of the same names) and optionally manifest.csv")
    v.add_argument("--out", required=True, help="output folder: per_file.csv, summary.md, summary.json, quality_vs_compute.png")
    v.add_argument("--weights", nargs="+", default=None, help="weight files (default: the default model at P = 100 and at its own P, 50; every shipped model: --weights weights/*.safetensors); FILE@P1,P2 evaluates FILE only at those P")
    v.add_argument("--percents", nargs="+", type=float, default=None, help="update percentages P of the --weights files (default 100 75 50 25 10)")
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
    except BrokenPipeError:  # e.g. `npdgru info FILE | head`: the reader of stdout went away
        _quiet_stdout()
        return _error("stdout: the reader closed the pipe")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): nothing to flush
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
