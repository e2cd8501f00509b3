"""Audio in and out: reading and writing files, standard input/output, and the input limits.

``read_audio`` / ``write_audio`` read and write whole signals (a pipe, a FIFO or ``-`` too);
:class:`AudioInput` opens a file once and reads it in blocks, with the identity (sha256, size,
mtime) of the bytes decoded; ``output_subtype`` chooses what a format change keeps; outputs are
written atomically (``_atomic_output``: a temporary file beside the output, then a rename).

Every signal that enters npdgru, from a file or as an array, is checked here against the limits
below: finite samples within ``MAX_ABS_SAMPLE`` = 1e6, ``MIN_SAMPLE_RATE`` .. ``MAX_SAMPLE_RATE``
= 1 kHz .. 384 kHz, at most ``MAX_CHANNELS`` = 64 channels and never more channels than samples
(a transposed array).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import numpy as np

from .errors import AudioError, ParameterError

__all__ = ["read_audio", "write_audio", "AudioInput", "audio_format", "output_subtype", "stdio_format", "AUDIO_SUFFIXES", "STDIO",
           "MAX_ABS_SAMPLE", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_CHANNELS", "MAX_PIPE_BYTES"]




# Input limits. Samples: nominal full scale is ±1; the largest magnitude whose features stay
# finite is sqrt(float32 max) / sum(window) = 9.06e16 (a constant signal: |X[0]|^2 overflows
# float32 in stft.log_power above it; tests/test_hardening.py finds it). MAX_ABS_SAMPLE leaves
# ten orders of magnitude to that and still takes integer PCM scaled as floats (±32768).
MAX_ABS_SAMPLE = 1e6
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000  # Hz; resampling cost grows with the ratio
MAX_CHANNELS = 64


def _check_audio(audio, name="audio") -> np.ndarray:
    """The audio as an array, or AudioError naming ``name`` and the problem; never copies."""
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise AudioError(f"{name}: audio must be a numeric array, got dtype {a.dtype}")
    if a.dtype.kind in "iu":
        raise AudioError(f"{name}: integer samples ({a.dtype}); pass floats in [-1, 1] (e.g. x / 32768)")
    if a.ndim not in (1, 2):
        raise AudioError(f"{name}: audio must be (samples,) or (samples, channels), got shape {a.shape}")
    if a.shape[0] == 0 or (a.ndim == 2 and a.shape[1] == 0):
        raise AudioError(f"{name}: audio is empty (shape {a.shape})")
    if a.ndim == 2 and (a.shape[1] > a.shape[0] or a.shape[1] > MAX_CHANNELS):
        raise AudioError(
            f"{name}: shape {a.shape} reads as {a.shape[1]} channels of {a.shape[0]} samples; audio is "
            f"(samples, channels) with at most {MAX_CHANNELS} channels (channels first? pass x.T)"
        )
    _check_samples(a, name)
    return a


def _check_samples(a: np.ndarray, name: str) -> None:
    """NaN, Inf and magnitudes beyond MAX_ABS_SAMPLE are refused (one pass over the data)."""
    peak = max(float(a.max()), -float(a.min())) if a.size else 0.0  # NaN propagates; no copy
    if not math.isfinite(peak):
        raise AudioError(f"{name}: audio contains NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(f"{name}: a sample of magnitude {peak:.3g} exceeds the limit {MAX_ABS_SAMPLE:g} (full scale is ±1)")


def _check_channels(channels) -> None:
    if isinstance(channels, (bool, np.bool_)) or not isinstance(channels, (int, np.integer)) or not 1 <= channels <= MAX_CHANNELS:
        raise ParameterError(f"channels={channels!r} must be an integer from 1 to {MAX_CHANNELS}")


def _check_rate(sample_rate, name="sample_rate") -> None:
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}={sample_rate!r} must be an integer number of Hz from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")  # read (libsndfile >= 1.1 reads MP3)
STDIO = "-"  # a path that means standard input (read_audio) or standard output (write_audio)


MAX_PIPE_BYTES = 2**30  # a pipe or FIFO is read into memory (libsndfile cannot seek it): 1 GiB at most


def read_audio(path, *, info: bool = False, raw: dict | None = None):
    """Read an audio file as float32 (samples, channels). Raises AudioError naming the file.

    The file is opened once (a pipe or FIFO, e.g. ``<(cat x.wav)``, is read into memory first, as
    libsndfile cannot seek it); ``path="-"`` reads standard input the same way. The header is
    checked before any samples are read: the sample rate must lie in [MIN_SAMPLE_RATE,
    MAX_SAMPLE_RATE] and the channels number at most MAX_CHANNELS. Headerless PCM needs ``raw=
    {"samplerate": Hz, "channels": C, "subtype": "PCM_16"}`` (little-endian). With ``info=True``
    returns ``(x, sample_rate, {"format": ..., "subtype": ...})``.
    """
    import io
    import stat
    import sys

    import soundfile as sf

    path = os.fspath(path)
    if path == STDIO:
        st = None
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise AudioError(f"{path}: no such file") from None
        except OSError as e:
            raise AudioError(f"{path}: cannot open ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode):
            raise AudioError(f"{path}: is a folder")
        if stat.S_ISREG(st.st_mode):  # libsndfile says only "System error" for a file it may not read
            try:  # (a FIFO is not probed: opening it would take its one writer)
                os.close(os.open(path, os.O_RDONLY))
            except OSError as e:
                raise AudioError(f"{path}: cannot open ({e.strerror or e})") from None
    name = "stdin" if st is None else path
    raw_args = {}
    if raw is not None:
        raw_args = {"format": "RAW", "samplerate": raw["samplerate"], "channels": raw["channels"], "subtype": raw.get("subtype") or "PCM_16", "endian": "LITTLE"}
        _check_rate(raw["samplerate"], f"{name}: --rate")
        if not (isinstance(raw["channels"], int) and 1 <= raw["channels"] <= MAX_CHANNELS):
            raise AudioError(f"{name}: --channels {raw['channels']!r} must be an integer from 1 to {MAX_CHANNELS}")
        if raw_args["subtype"] not in _RAW_SUBTYPES:
            raise AudioError(f"{name}: raw PCM subtype {raw_args['subtype']!r} is not one of {', '.join(_RAW_SUBTYPES)}")
    try:
        if st is not None and stat.S_ISREG(st.st_mode):
            source = _sf_name(path)
        else:  # stdin, FIFO, pipe, character device: read once, with a bound
            fh = sys.stdin.buffer if st is None else open(path, "rb")
            try:
                data = _read_bounded(fh, name)
            finally:
                if st is not None:
                    fh.close()
            if not data:
                raise AudioError(f"{name}: no data (an empty pipe or file)")
            source = io.BytesIO(data)
        path = name
        with sf.SoundFile(source, **raw_args) as f:
            sr, C, fmt, subtype = int(f.samplerate), int(f.channels), f.format, f.subtype
            _check_header(path, sr, C)
            x = f.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, MemoryError) as e:
        raise AudioError(f"{path}: cannot read audio ({' '.join(str(e).split())}); npdgru reads {_readable_formats()}{'' if raw else ', or raw PCM with --format raw --rate HZ --channels N'}") from None
    if x.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples")
    _check_samples(x, path)
    if info:
        return x, sr, {"format": fmt, "subtype": subtype}
    return x, sr


def _read_bounded(fh, path) -> bytes:
    data = fh.read(MAX_PIPE_BYTES + 1)
    if len(data) > MAX_PIPE_BYTES:
        raise AudioError(f"{path}: more than {MAX_PIPE_BYTES} bytes from a pipe; write the audio to a file first")
    return data


def _check_header(path, sr: int, channels: int) -> None:
    """The header's rate and channels, checked before any sample is read."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: the header says {sr} Hz; npdgru takes {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz")
    if channels > MAX_CHANNELS:
        raise AudioError(f"{path}: the header says {channels} channels; npdgru takes at most {MAX_CHANNELS}")


def _sf_name(path: str):
    """soundfile encodes a str file name strictly: a name that is not UTF-8 goes as bytes."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


class _HashedFile:
    """A regular file as soundfile's virtual I/O reads it (``pread`` at its own position), with
    the sha256 of its bytes taken from those same reads: each byte is hashed the first time a
    read reaches it in order, and :meth:`sha256` reads only what the decoder skipped."""

    def __init__(self, fd: int):
        import hashlib

        self.fd, self.pos, self.hashed = fd, 0, 0
        self.size = os.fstat(fd).st_size
        self._h = hashlib.sha256()

    def _saw(self, start: int, data) -> None:
        if start <= self.hashed < start + len(data):
            self._h.update(data[self.hashed - start :])
            self.hashed = start + len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, self.size)[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        if hasattr(os, "preadv"):
            n = os.preadv(self.fd, [view], self.pos)
        else:  # macOS before 11
            data = os.pread(self.fd, len(view), self.pos)
            n = len(data)
            view[:n] = data
        self._saw(self.pos, view[:n])
        self.pos += n
        return n

    def sha256(self) -> str:
        while True:
            block = os.pread(self.fd, 1 << 20, self.hashed)
            if not block:
                return self._h.hexdigest()
            self._saw(self.hashed, block)


class AudioInput:
    """An audio file opened once and read in blocks, with its identity from the same open file.

    The header is checked before any sample is read (as :func:`read_audio`). ``identity()``
    gives (sha256, size, mtime_ns) of the bytes that were decoded: the size and mtime of the
    open file (``fstat``, so a file replaced meanwhile by a rename does not count), the hash
    from the decoder's own reads; a file written to while it was read is an AudioError. A pipe
    or FIFO is read into memory once (at most ``MAX_PIPE_BYTES``) and has no identity (None).
    """

    def __init__(self, path):
        import io
        import stat

        import soundfile as sf

        self.path = path = os.fspath(path)
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise AudioError(f"{path}: no such file") from None
        except OSError as e:
            raise AudioError(f"{path}: cannot open ({e.strerror or e})") from None
        self._sf = self._raw = None
        try:
            self._st = os.fstat(self._fd)
            if stat.S_ISDIR(self._st.st_mode):
                raise AudioError(f"{path}: is a folder")
            if stat.S_ISREG(self._st.st_mode):
                self._raw = source = _HashedFile(self._fd)
            else:  # FIFO, pipe, character device: read once, with a bound
                with open(self._fd, "rb", closefd=False) as fh:
                    source = io.BytesIO(_read_bounded(fh, path))
            try:
                self._sf = sf.SoundFile(source)
            except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, MemoryError) as e:
                raise AudioError(f"{path}: cannot read audio ({' '.join(str(e).split())}); npdgru reads {_readable_formats()}") from None
            f = self._sf
            self.samplerate, self.channels, self.frames = int(f.samplerate), int(f.channels), int(f.frames)
            self.format, self.subtype = f.format, f.subtype
            _check_header(path, self.samplerate, self.channels)
        except BaseException:
            self.close()
            raise

    def blocks(self, frames: int):
        """(k, channels) float32 blocks of at most ``frames`` samples, each checked (NaN, Inf, magnitude)."""
        import soundfile as sf

        n = 0
        while True:
            try:
                x = self._sf.read(frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, ValueError, OSError, MemoryError) as e:
                raise AudioError(f"{self.path}: cannot read audio ({' '.join(str(e).split())}); npdgru reads {_readable_formats()}") from None
            if not len(x):
                break
            _check_samples(x, self.path)
            n += len(x)
            yield x
        if n == 0:
            raise AudioError(f"{self.path}: the file holds no samples")

    def read(self) -> np.ndarray:
        """Every sample, (samples, channels) float32."""
        return np.concatenate(list(self.blocks(max(self.frames, 1))))

    def identity(self) -> tuple:
        """(sha256, size, mtime_ns) of the file read; (None, None, None) for a pipe."""
        if self._raw is None:
            return None, None, None
        digest = self._raw.sha256()
        now = os.fstat(self._fd)
        if (now.st_size, now.st_mtime_ns) != (self._st.st_size, self._st.st_mtime_ns) or self._raw.hashed != now.st_size:
            raise AudioError(f"{self.path}: the file changed while it was read; run again to enhance what it holds now")
        return digest, now.st_size, now.st_mtime_ns

    def close(self) -> None:
        if self._sf is not None:
            self._sf.close()
            self._sf = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".mp3": "MP3", ".aiff": "AIFF", ".aif": "AIFF"}
_RAW_SUBTYPES = ("PCM_16", "PCM_24", "PCM_32", "FLOAT")  # headerless PCM, little-endian
# a codec subtype is kept only in its own format (an MP3 input's MPEG_LAYER_III is no WAV subtype)
_CODEC_FORMATS = {"VORBIS": "OGG", "OPUS": "OGG", "MPEG_LAYER_I": "MP3", "MPEG_LAYER_II": "MP3", "MPEG_LAYER_III": "MP3"}


def _readable_formats() -> str:
    """The formats this libsndfile reads among npdgru's suffixes, for error messages."""
    import soundfile as sf

    have = sf.available_formats()
    return ", ".join(dict.fromkeys(f for f in _FORMATS.values() if f in have))


def stdio_format(name) -> str:
    """``--format`` of ``-`` (standard input/output): a soundfile format name, AudioError otherwise."""
    import soundfile as sf

    fmt = str(name).upper()
    if fmt == "AIF":
        fmt = "AIFF"
    if fmt != "RAW" and fmt not in set(_FORMATS.values()):
        raise AudioError(f"--format {name!r}: choose from wav, flac, ogg, mp3, aiff, raw")
    if fmt not in sf.available_formats():
        raise AudioError(f"--format {name!r}: this libsndfile ({sf.__libsndfile_version__}) does not write {fmt}")
    return fmt
# how much of a sample a subtype keeps, to tell when a format change loses bits
_SUBTYPE_RANK = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 5, "DOUBLE": 6}
_FLOAT_SUBTYPES = ("FLOAT", "DOUBLE", "VORBIS", "OPUS")  # no clipping at ±1


def audio_format(path, format: str | None = None) -> str:
    """The soundfile format written for ``path``: ``format`` if given (``-``: standard output,
    WAV by default), else by its suffix (no suffix: WAV); AudioError otherwise."""
    import soundfile as sf

    if format is not None:
        return stdio_format(format)
    if os.fspath(path) == STDIO:
        return "WAV"
    ext = os.path.splitext(os.fspath(path))[1]
    fmt = _FORMATS.get(ext.lower() or ".wav")
    if fmt is None:
        raise AudioError(f"{path}: cannot write '{ext}' files; use .wav, .flac, .ogg, .mp3 or .aiff")
    if fmt not in sf.available_formats():
        raise AudioError(f"{path}: this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}; use .wav or .flac")
    return fmt


def output_subtype(path, y: np.ndarray, *, source_subtype: str | None = None, subtype: str | None = None, format: str | None = None) -> tuple[str, list[str]]:
    """The subtype to write ``y`` to ``path`` with, and warnings for what the format change loses.

    ``subtype`` (the user's ``--subtype``) is taken as given if the format can hold it. Otherwise
    the input's subtype is kept where the output format holds it (24-bit WAV -> 24-bit FLAC),
    else the format's default, with a warning naming the option that keeps more bits. Samples
    beyond ±1 clip in integer subtypes: counted and warned, with the way to keep them.
    """
    import soundfile as sf

    fmt = audio_format(path, format)
    notes = []
    if source_subtype in _CODEC_FORMATS and _CODEC_FORMATS[source_subtype] != fmt:
        source_subtype = None  # a codec of another format: the output format's default
    if subtype is not None:
        if not (isinstance(subtype, str) and sf.check_format(fmt, subtype.upper())):
            raise AudioError(f"{path}: subtype {subtype!r} cannot be written as {fmt} (choose from {', '.join(sorted(sf.available_subtypes(fmt)))})")
        chosen = subtype.upper()
    elif source_subtype and sf.check_format(fmt, source_subtype):
        chosen = source_subtype
    else:
        chosen = sf.default_subtype(fmt) or "PCM_16"  # RAW has no default
        lost = _SUBTYPE_RANK.get(source_subtype or "", 0) > _SUBTYPE_RANK.get(chosen, 9)
        if lost:
            best = max((s for s in sf.available_subtypes(fmt) if s in _SUBTYPE_RANK), key=_SUBTYPE_RANK.get, default=None)
            keep = f"pass --subtype {best} to keep more" if best and _SUBTYPE_RANK[best] > _SUBTYPE_RANK[chosen] else "write a .wav to keep them"
            notes.append(f"{path}: the input's {source_subtype} samples are written as {fmt} {chosen}; {keep}")
    note = _clip_note(path, chosen, _clipped(chosen, y), y.size)
    return chosen, notes + ([note] if note else [])


def _clipped(subtype: str, y: np.ndarray) -> int:
    """Samples of y that ``subtype`` clips (beyond ±1 in an integer format)."""
    return 0 if subtype in _FLOAT_SUBTYPES else int(np.count_nonzero(np.abs(y) > 1.0))


def _clip_note(path, subtype: str, n: int, size: int) -> str | None:
    if not n:
        return None
    return f"{path}: {n} samples ({100.0 * n / size:.3g} %) exceed ±1.0 and are clipped in {audio_format(path)} {subtype}; write a .wav with --subtype FLOAT to keep them"


def write_audio(path, y: np.ndarray, sample_rate: int, *, subtype: str | None = None, format: str | None = None) -> None:
    """Write audio atomically: a temporary file in the same folder, then rename.

    The temporary file is ``.npdgru-XXXX.<ext>.part``: folder scans never take it as an input,
    and it is removed on any failure (a full disk, an unwritable folder: an AudioError naming
    ``path``) and on KeyboardInterrupt or the SIGTERM that ``npdgru enhance`` turns into one.
    ``path="-"`` writes to standard output (``format``: WAV by default; ``"RAW"``: headerless
    little-endian PCM), encoded in memory first so that a failure writes nothing.
    """
    import soundfile as sf

    path = os.fspath(path)
    fmt = audio_format(path, format)  # before anything is created
    if path == STDIO:
        import io
        import sys

        buf = io.BytesIO()
        try:
            sf.write(buf, y, sample_rate, format=fmt, subtype=subtype or sf.default_subtype(fmt) or "PCM_16", **({"endian": "LITTLE"} if fmt == "RAW" else {}))
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
            raise AudioError(f"stdout: cannot encode the output as {fmt} ({' '.join(str(e).split())})") from None
        try:
            sys.stdout.buffer.write(buf.getvalue())
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise AudioError("stdout: the reader closed the pipe") from None
        return
    with _atomic_output(path) as tmp:
        sf.write(_sf_name(tmp), y, sample_rate, format=fmt, subtype=subtype)


@contextmanager
def _atomic_output(path):
    """The name of a temporary file beside ``path`` (``write_audio``'s), renamed to ``path`` when
    the block ends, removed if it raises; OSError and libsndfile errors become AudioError."""
    import tempfile

    import soundfile as sf

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise AudioError(f"{path}: cannot create the output folder ({e.strerror or e})") from None
    ext = os.path.splitext(path)[1] or ".wav"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".npdgru-", suffix=ext + ".part", dir=folder)
    except OSError as e:
        raise AudioError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        raise AudioError(f"{path}: cannot write the output ({e.strerror or e})") from None
    except (sf.LibsndfileError, RuntimeError) as e:  # libsndfile: disk full, I/O error
        raise AudioError(f"{path}: cannot write the output ({' '.join(str(e).split())})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

