"""Strict, dependency-free reader for the safetensors format.

The file is untrusted input. Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of
UTF-8 JSON (an object mapping tensor names to ``{"dtype", "shape", "data_offsets"}`` plus an
optional ``"__metadata__"`` object of strings), then the data buffer. This reader checks
everything the reference implementation checks (header size limit, JSON object, known dtypes,
byte length matches shape, offsets inside the buffer, contiguous and non-overlapping, the buffer
fully covered) and additionally refuses duplicate keys and unknown fields. Tensors are read one
at a time with an explicit size, never by mapping or loading the whole file.

It returns the tensors in their stored dtype; :mod:`npdgru.convert.torch_checkpoint` does the
float32 casting and writes the notes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

from npdgru.errors import CheckpointError

#: Same limit as the reference implementation (``safetensors`` refuses headers over 100 MB).
MAX_HEADER_BYTES = 100_000_000
MAX_NDIM = 32

#: safetensors dtype tag -> (canonical dtype name, little-endian numpy dtype).
#: bfloat16 is carried as raw uint16 bit patterns.
SAFETENSORS_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "F64": ("float64", np.dtype("<f8")),
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")),
    "I64": ("int64", np.dtype("<i8")),
    "I32": ("int32", np.dtype("<i4")),
    "I16": ("int16", np.dtype("<i2")),
    "I8": ("int8", np.dtype("i1")),
    "U64": ("uint64", np.dtype("<u8")),
    "U32": ("uint32", np.dtype("<u4")),
    "U16": ("uint16", np.dtype("<u2")),
    "U8": ("uint8", np.dtype("u1")),
    "BOOL": ("bool", np.dtype("u1")),
}

_FLOAT_NAMES = frozenset({"float64", "float32", "float16", "bfloat16"})


def looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """Cheap content sniff: plausible header length followed by ``{``."""
    if len(head) < 9 or file_size < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= file_size - 8 and head[8:9] == b"{"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r} in safetensors header")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise CheckpointError(f"non-standard JSON constant {name} in safetensors header")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors(
    path: str | os.PathLike[str],
    *,
    max_tensor_bytes: int,
    max_total_bytes: int,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[dict[str, tuple[str, np.ndarray | None]], dict[str, str]]:
    """Parse and validate a safetensors file.

    Returns ``(tensors, metadata)`` where ``tensors`` maps name -> ``(dtype_name, array)`` in
    header order. Floating-point tensors are read (native byte order, C-contiguous, owning their
    memory; bfloat16 as uint16 bit patterns); non-float tensors are validated but not read and
    come back with ``array=None``. Raises :class:`CheckpointError` on anything malformed.
    """
    name = os.fspath(path)
    with open(name, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{name}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", prefix)
        if n > max_header_bytes:
            raise CheckpointError(
                f"{name}: safetensors header of {n} bytes exceeds the limit of {max_header_bytes}"
            )
        if n < 2 or 8 + n > file_size:
            raise CheckpointError(f"{name}: safetensors header length {n} does not fit the file")
        raw = fh.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{name}: truncated safetensors header")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{name}: safetensors header is not UTF-8") from exc
        if not text.startswith("{"):
            raise CheckpointError(f"{name}: safetensors header is not a JSON object")
        try:
            header = json.loads(
                text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
            )
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{name}: safetensors header is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise CheckpointError(f"{name}: safetensors header nests too deeply") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{name}: safetensors header is not a JSON object")

        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()
        ):
            raise CheckpointError(f"{name}: '__metadata__' must map strings to strings")

        data_start = 8 + n
        data_len = file_size - data_start
        entries: list[tuple[int, int, str, str, tuple[int, ...], np.dtype]] = []
        total = 0
        for key, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise CheckpointError(
                    f"{name}: tensor {key!r} must have exactly 'dtype', 'shape', 'data_offsets'"
                )
            tag = info["dtype"]
            if not isinstance(tag, str) or tag not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{name}: tensor {key!r} has unsupported dtype {tag!r}; supported: "
                    + ", ".join(SAFETENSORS_DTYPES)
                )
            dtype_name, np_dtype = SAFETENSORS_DTYPES[tag]
            shape = info["shape"]
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_NDIM
                or not all(_is_int(d) and d >= 0 for d in shape)
            ):
                raise CheckpointError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
            offsets = info["data_offsets"]
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len
            ):
                raise CheckpointError(
                    f"{name}: tensor {key!r} has data_offsets {offsets!r} outside the "
                    f"{data_len}-byte data buffer"
                )
            nbytes = math.prod(shape) * np_dtype.itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise CheckpointError(
                    f"{name}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes but shape "
                    f"{shape} of {tag} needs {nbytes}"
                )
            if nbytes > max_tensor_bytes:
                raise CheckpointError(
                    f"{name}: tensor {key!r} of {nbytes} bytes exceeds the per-tensor limit of "
                    f"{max_tensor_bytes}"
                )
            if dtype_name in _FLOAT_NAMES:
                total += nbytes
                if total > max_total_bytes:
                    raise CheckpointError(
                        f"{name}: tensors exceed the total limit of {max_total_bytes} bytes"
                    )
            entries.append((offsets[0], offsets[1], key, dtype_name, tuple(shape), np_dtype))

        # Reference semantics: buffers are contiguous, non-overlapping and cover the data exactly.
        cursor = 0
        for begin, end, key, *_ in sorted(entries, key=lambda e: (e[0], e[1])):
            if begin != cursor:
                kind = "overlaps another tensor" if begin < cursor else "leaves a gap before it"
                raise CheckpointError(f"{name}: tensor {key!r} {kind} in the data buffer")
            cursor = end
        if cursor != data_len:
            raise CheckpointError(
                f"{name}: data buffer is {data_len} bytes but the header accounts for {cursor}"
            )

        tensors: dict[str, tuple[str, np.ndarray | None]] = {}
        for begin, end, key, dtype_name, shape, np_dtype in entries:
            if dtype_name not in _FLOAT_NAMES:
                tensors[key] = (dtype_name, None)
                continue
            fh.seek(data_start + begin)
            buf = fh.read(end - begin)
            if len(buf) != end - begin:
                raise CheckpointError(f"{name}: truncated data for tensor {key!r}")
            arr = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
            arr = np.array(arr, dtype=np_dtype.newbyteorder("="), order="C", copy=True)
            tensors[key] = (dtype_name, arr)
    return tensors, metadata
