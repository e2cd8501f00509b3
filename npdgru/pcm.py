"""Raw PCM and streamed WAV on pipes, for ``npdgru stream`` (and ``npdgru live`` to a file).

libsndfile cannot read a WAV from a pipe as it arrives (it seeks), so the few lines of RIFF that
a stream needs live here: :func:`read_wav_header` reads a header from a binary stream and stops
at the samples; :func:`wav_header` writes one whose sizes say "unknown length" (0xFFFFFFFF, as
``arecord`` and ``sox`` do on a pipe; :func:`fix_wav_sizes` fills them in on a seekable file).
Samples are little-endian; the subtypes are soundfile's names.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import AudioError

SUBTYPES = {"PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4}  # bytes per sample
_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
UNKNOWN = 0xFFFFFFFF


def check_subtype(subtype: str, name: str = "--subtype") -> str:
    st = str(subtype).upper()
    if st not in SUBTYPES:
        raise AudioError(f"{name} {subtype!r}: a stream carries {', '.join(SUBTYPES)}")
    return st


def decode(data: bytes, subtype: str, channels: int) -> np.ndarray:
    """Little-endian PCM bytes (whole frames) -> float32 (frames, channels) in [-1, 1]."""
    if subtype == "PCM_16":
        x = np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768)
    elif subtype == "PCM_32":
        x = (np.frombuffer(data, "<i4").astype(np.float64) / 2**31).astype(np.float32)
    elif subtype == "FLOAT":
        x = np.frombuffer(data, "<f4").astype(np.float32)
    else:  # PCM_24: three bytes, sign-extended through the top byte of an int32
        b = np.frombuffer(data, np.uint8).reshape(-1, 3)
        v = np.zeros((len(b), 4), np.uint8)
        v[:, 1:] = b
        x = (v.view("<i4")[:, 0].astype(np.float64) / 2**31).astype(np.float32)
    return x.reshape(-1, channels)


def encode(y: np.ndarray, subtype: str) -> bytes:
    """float (frames, channels) -> little-endian PCM bytes; integer subtypes clip at full scale."""
    if subtype == "FLOAT":
        return np.ascontiguousarray(y, "<f4").tobytes()
    bits = {"PCM_16": 16, "PCM_24": 24, "PCM_32": 32}[subtype]
    full = 2.0 ** (bits - 1)
    q = np.clip(np.round(np.asarray(y, np.float64) * full), -full, full - 1).astype("<i4")
    if subtype == "PCM_16":
        return q.astype("<i2").tobytes()
    if subtype == "PCM_32":
        return q.tobytes()
    return np.ascontiguousarray(q.reshape(-1, 1).view(np.uint8)[:, :3]).tobytes()


def _read_exact(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = stream.read(n - len(data))
        if not part:
            break
        data += part
    return data


def read_wav_header(stream, name: str = "stdin") -> tuple[int, int, str]:
    """Read a RIFF/WAVE header up to the first sample: (sample rate, channels, subtype)."""
    head = _read_exact(stream, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        hint = "no data" if not head else "not a WAV header"
        raise AudioError(f"{name}: {hint}; npdgru stream reads WAV, or raw PCM with --format raw --rate HZ --channels N")
    fmt = None
    while True:
        chunk = _read_exact(stream, 8)
        if len(chunk) < 8:
            raise AudioError(f"{name}: the WAV header ends before its data chunk")
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"data":
            if fmt is None:
                raise AudioError(f"{name}: WAV data before its fmt chunk")
            return fmt
        if size > 1 << 20:
            raise AudioError(f"{name}: a WAV header chunk {cid!r} of {size} bytes; not a header npdgru streams")
        body = _read_exact(stream, size + (size & 1))
        if cid == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"{name}: a WAV fmt chunk of {len(body)} bytes")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            subtype = {(_WAVE_FORMAT_PCM, 16): "PCM_16", (_WAVE_FORMAT_PCM, 24): "PCM_24", (_WAVE_FORMAT_PCM, 32): "PCM_32", (_WAVE_FORMAT_FLOAT, 32): "FLOAT"}.get((tag, bits))
            if subtype is None:
                raise AudioError(f"{name}: WAV of format tag {tag} with {bits}-bit samples; npdgru stream takes 16/24/32-bit PCM or 32-bit float")
            if channels < 1:
                raise AudioError(f"{name}: the WAV header says {channels} channels")
            fmt = (int(rate), int(channels), subtype)


def wav_header(rate: int, channels: int, subtype: str, frames: int | None = None) -> bytes:
    """A 44-byte WAV header; ``frames=None``: sizes 0xFFFFFFFF (length unknown, a stream)."""
    width = SUBTYPES[subtype]
    tag = _WAVE_FORMAT_FLOAT if subtype == "FLOAT" else _WAVE_FORMAT_PCM
    data = UNKNOWN if frames is None else frames * channels * width
    riff = UNKNOWN if frames is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, tag, channels, rate, rate * channels * width, channels * width, 8 * width)
            + b"data" + struct.pack("<I", data))


def fix_wav_sizes(fh, rate: int, channels: int, subtype: str, frames: int) -> bool:
    """Write the real sizes into the header at the start of ``fh`` if it can seek; True if done."""
    try:
        if not fh.seekable():
            return False
        end = fh.tell()
        fh.seek(0)
        fh.write(wav_header(rate, channels, subtype, frames))
        fh.seek(end)
        return True
    except OSError:
        return False
