"""Read untrusted PyTorch checkpoints into NumPy without torch and without running pickle code.

A checkpoint downloaded from the internet is untrusted input: ``torch.load`` without
``weights_only=True`` executes arbitrary code hidden in its pickle. This module never imports
torch and never resolves a pickle global to anything but its own small, side-effect-free
stand-ins listed in :data:`ALLOWED_GLOBALS`. Every other global is refused in
``Unpickler.find_class`` -- before anything it names could run -- with a
:class:`~npdgru.errors.CheckpointError` naming the global and the file.

Formats (detected from the content, not the extension):

* PyTorch zip (``torch.save`` since 1.6; ``.pt/.pth/.ckpt/.bin``): ``<archive>/data.pkl`` plus
  ``<archive>/data/<key>`` storage records and an optional ``<archive>/byteorder`` record.
* PyTorch legacy (``_use_new_zipfile_serialization=False``): magic/protocol/sys-info pickles,
  the main pickle, the storage-key list pickle, then raw little-endian storages, each prefixed
  by an 8-byte little-endian element count.
* safetensors (strict own parser, :mod:`npdgru.convert.safetensors_reader`).

Refused: TorchScript archives (``torch.jit.save``), whole pickled ``nn.Module`` objects (or any
object other than containers of tensors and plain Python scalars), the tar-based format of
PyTorch < 0.4, plain pickles, unknown dtypes, sparse/quantized/meta/subclass tensors.

Before any unpickling the pickle stream is pre-scanned with :func:`pickletools.genops` (pure
Python, no objects built): the scan verifies it is complete, that every declared length fits in
the bytes present (so the C unpickler never pre-allocates a huge declared buffer), that memo
indices are sane, and refuses extension-registry and out-of-band-buffer opcodes as well as any
``GLOBAL``/``INST`` outside the allow-list.

Memory is bounded: a zip member whose declared size exceeds ``max_record_bytes`` or whose
compression ratio is absurd is refused before it is read, records are read with an explicit size
cap, tensor extents and element counts are validated against their storage and against
``max_total_bytes`` before anything is allocated, and tensors outside the selected state dict
are never materialised.
"""

from __future__ import annotations

import _compat_pickle
import io
import lzma
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from npdgru.convert.safetensors_reader import looks_like_safetensors, read_safetensors
from npdgru.errors import CheckpointError, ParameterError

__all__ = [
    "ALLOWED_GLOBALS",
    "DEFAULT_MAX_COMPRESSION_RATIO",
    "DEFAULT_MAX_PICKLE_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "detect_format",
    "read_checkpoint",
]

MiB = 1 << 20
GiB = 1 << 30

#: Largest single zip member / storage / tensor (declared, uncompressed) that is read.
DEFAULT_MAX_RECORD_BYTES = 2 * GiB
#: Per checkpoint: cap on storage bytes read, and separately on float32 bytes returned.
DEFAULT_MAX_TOTAL_BYTES = 8 * GiB
#: Largest pickle stream (``data.pkl``, or the pickles at the head of a legacy file).
DEFAULT_MAX_PICKLE_BYTES = 64 * MiB
#: Largest uncompressed/compressed ratio of a compressed zip member (zeros deflate ~1030:1).
DEFAULT_MAX_COMPRESSION_RATIO = 100.0
#: Members smaller than this are exempt from the ratio check (an all-zero bias compresses well).
_RATIO_CHECK_MIN_BYTES = 1 * MiB

_MAX_NDIM = 32
_MAX_NESTING = 32
_MAX_ENTRIES = 1_000_000
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_TAR_MAGIC_OFFSET = 257

# torch storage class name -> (canonical dtype name, little-endian numpy dtype).
# bfloat16 is carried as raw uint16 bit patterns; bool as uint8 (non-float tensors are dropped).
_STORAGE_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "FloatStorage": ("float32", np.dtype("<f4")),
    "HalfStorage": ("float16", np.dtype("<f2")),
    "BFloat16Storage": ("bfloat16", np.dtype("<u2")),
    "DoubleStorage": ("float64", np.dtype("<f8")),
    "LongStorage": ("int64", np.dtype("<i8")),
    "IntStorage": ("int32", np.dtype("<i4")),
    "ShortStorage": ("int16", np.dtype("<i2")),
    "CharStorage": ("int8", np.dtype("i1")),
    "ByteStorage": ("uint8", np.dtype("u1")),
    "BoolStorage": ("bool", np.dtype("u1")),
}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

_REBUILD_FUNCTIONS = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
)

#: Every pickle global this reader resolves, each to its own safe stand-in (never to torch):
#: the four rebuild functions become validating constructors of lazy tensor records,
#: ``collections.OrderedDict`` becomes a plain ``dict`` subclass that ignores ``BUILD`` state,
#: and the storage classes become inert dtype markers that cannot be called.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    ("collections.OrderedDict",)
    + _REBUILD_FUNCTIONS
    + tuple(f"torch.{s}" for s in _STORAGE_DTYPES)
    + tuple(f"torch.cuda.{s}" for s in _STORAGE_DTYPES)
)

# Opcodes refused outright by the pre-scan: the extension registry (resolves globals behind
# find_class's back in some implementations) and out-of-band buffers (never legitimate here).
_FORBIDDEN_OPCODES = frozenset({"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"})
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})

_SAFE_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

# Exceptions that malformed input can raise inside zipfile, zlib, pickle, struct, json, numpy.
# They are converted to CheckpointError at the public boundary; anything else is a bug.
_BOUNDARY_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    pickle.UnpicklingError,
    struct.error,
    EOFError,
    ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    NotImplementedError,
    RuntimeError,  # zipfile: encrypted member
    OSError,
)

_NN_MODULE_HINT = (
    "if you trust the file, load it in PyTorch and save model.state_dict() instead "
    "(torch.save(model.state_dict(), path))"
)
_ALLOWED_SUMMARY = (
    "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor, "
    "torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state, "
    "torch[.cuda].{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage"
)


def _short(text: object, limit: int = 200) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + "..."


def _py3_name(full: str) -> str:
    """The Python-3 name of a Python-2 global as protocol-2 pickles write it (for messages)."""
    module, _, name = full.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _refusal(full: str, path: str) -> CheckpointError:
    full = _short(full)
    py3 = _py3_name(full)
    shown = f"'{full}'" if py3 == full else f"'{full}' (= {py3})"
    if full.startswith("__torch__"):
        why = "this is a TorchScript archive (torch.jit.save), not a state dict; " + _NN_MODULE_HINT
    elif full.startswith(("torch.nn.", "__main__.", "torch.jit.")) or re.search(
        r"\.[A-Z][A-Za-z0-9_]*$", full
    ):
        why = (
            "the checkpoint pickles a whole model object (nn.Module) or another Python class, "
            "not just tensors; " + _NN_MODULE_HINT
        )
    else:
        why = (
            "calling it could run arbitrary code, so the file may be malicious; do not torch.load "
            "it unless you trust its source"
        )
    return CheckpointError(
        f"{path}: refused pickle global {shown}: {why}. Allowed globals: {_ALLOWED_SUMMARY}"
    )


# --------------------------------------------------------------------------------------------
# Safe stand-ins for the allowed globals
# --------------------------------------------------------------------------------------------


class _OrderedDict(dict):  # type: ignore[type-arg]
    """Stand-in for ``collections.OrderedDict`` (dicts keep insertion order)."""

    def __setstate__(self, state: object) -> None:
        # torch.save attaches ``_metadata`` to state dicts through BUILD; it is irrelevant here.
        return None


class _StorageType:
    """Inert marker for a ``torch.<X>Storage`` class: a dtype, not callable."""

    __slots__ = ("qualname", "dtype_name", "np_dtype")

    def __init__(self, qualname: str, dtype_name: str, np_dtype: np.dtype) -> None:
        self.qualname = qualname
        self.dtype_name = dtype_name
        self.np_dtype = np_dtype

    def __setstate__(self, state: object) -> None:
        raise CheckpointError(f"unexpected BUILD on storage type {self.qualname}")


class _Storage:
    """A typed view of one storage record, read lazily (and once) through its source."""

    __slots__ = ("source", "key", "dtype_name", "np_dtype", "numel", "elem_offset")

    def __init__(
        self,
        source: _Source,
        key: str,
        dtype_name: str,
        np_dtype: np.dtype,
        numel: int,
        elem_offset: int = 0,
    ) -> None:
        self.source = source
        self.key = key
        self.dtype_name = dtype_name
        self.np_dtype = np_dtype
        self.numel = numel
        self.elem_offset = elem_offset

    def __setstate__(self, state: object) -> None:
        raise CheckpointError(f"unexpected BUILD on storage {self.key!r}")

    def array(self) -> np.ndarray:
        raw = self.source.raw(self.key)
        itemsize = self.np_dtype.itemsize
        need = (self.elem_offset + self.numel) * itemsize
        if len(raw) < need:
            raise CheckpointError(
                f"{self.source.path}: storage {self.key!r} holds {len(raw)} bytes but "
                f"{need} are declared"
            )
        return np.frombuffer(
            raw, dtype=self.np_dtype, count=self.numel, offset=self.elem_offset * itemsize
        )


class _Tensor:
    """A validated, not yet materialised tensor: storage + offset + size + stride."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride

    def __setstate__(self, state: object) -> None:
        raise CheckpointError("unexpected BUILD on a tensor")

    @property
    def dtype_name(self) -> str:
        return self.storage.dtype_name

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    def materialize(self) -> np.ndarray:
        native = self.storage.np_dtype.newbyteorder("=")
        if self.numel == 0:
            return np.zeros(self.size, dtype=native)
        base = self.storage.array()
        itemsize = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.size,
            # a size-1 dimension never moves, so its (possibly huge) stride is irrelevant
            strides=tuple(0 if d == 1 else s * itemsize for d, s in zip(self.size, self.stride)),
            writeable=False,
        )
        return np.array(view, dtype=native, order="C", copy=True)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Rebuilder:
    """The rebuild functions, validating every argument before recording a lazy tensor."""

    def __init__(self, path: str, limits: _Limits) -> None:
        self.path = path
        self.limits = limits

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: invalid tensor in pickle: {what}")

    def rebuild_tensor(self, storage: object, storage_offset: object, size: object,
                       stride: object) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise self._fail(f"storage argument is a {type(storage).__name__}, not a storage")
        if not _is_int(storage_offset) or storage_offset < 0:
            raise self._fail(f"storage offset {_short(storage_offset)} is not a non-negative int")
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise self._fail("size and stride must be tuples")
        if len(size) > _MAX_NDIM or len(size) != len(stride):
            raise self._fail(f"{len(size)}-d size with {len(stride)}-d stride")
        if not all(_is_int(d) and d >= 0 for d in size):
            raise self._fail(f"size {_short(size)} has a negative or non-int entry")
        if not all(_is_int(s) and s >= 0 for s in stride):
            raise self._fail(f"stride {_short(stride)} has a negative or non-int entry")
        numel = math.prod(size)
        if numel == 0:
            if storage_offset > storage.numel:
                raise self._fail(f"offset {storage_offset} beyond storage of {storage.numel}")
        else:
            extent = storage_offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1
            if extent > storage.numel:
                raise self._fail(
                    f"size {size} with stride {stride} at offset {storage_offset} needs "
                    f"{extent} elements but storage {storage.key!r} holds {storage.numel}"
                )
        out_bytes = numel * max(storage.np_dtype.itemsize, 4)
        if out_bytes > self.limits.max_record_bytes:
            raise self._fail(
                f"size {size} would need {out_bytes} bytes, over the limit of "
                f"{self.limits.max_record_bytes}"
            )
        return _Tensor(storage, storage_offset, size, stride)

    def rebuild_tensor_v2(self, storage: object, storage_offset: object, size: object,
                          stride: object, requires_grad: object = False,
                          backward_hooks: object = None, metadata: object = None) -> _Tensor:
        return self.rebuild_tensor(storage, storage_offset, size, stride)

    def rebuild_parameter(self, data: object, requires_grad: object = False,
                          backward_hooks: object = None) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise self._fail(f"parameter data is a {type(data).__name__}, not a tensor")
        return data

    def rebuild_parameter_with_state(self, data: object, requires_grad: object,
                                     backward_hooks: object, state: object) -> _Tensor:
        return self.rebuild_parameter(data)

    def globals(self) -> dict[str, object]:
        table: dict[str, object] = {
            "collections.OrderedDict": _OrderedDict,
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor_v2,
            "torch._utils._rebuild_tensor": self.rebuild_tensor,
            "torch._utils._rebuild_parameter": self.rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self.rebuild_parameter_with_state,
        }
        for mod in ("torch", "torch.cuda"):
            for cls, (dtype_name, np_dtype) in _STORAGE_DTYPES.items():
                q = f"{mod}.{cls}"
                table[q] = _StorageType(q, dtype_name, np_dtype)
        assert set(table) == ALLOWED_GLOBALS
        return table


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


class _Limits:
    __slots__ = ("max_record_bytes", "max_total_bytes", "max_pickle_bytes",
                 "max_compression_ratio")

    def __init__(self, max_record_bytes: int, max_total_bytes: int, max_pickle_bytes: int,
                 max_compression_ratio: float) -> None:
        self.max_record_bytes = max_record_bytes
        self.max_total_bytes = max_total_bytes
        self.max_pickle_bytes = max_pickle_bytes
        self.max_compression_ratio = max_compression_ratio


def _scan_pickle(buf: bytes, start: int, path: str, what: str) -> int:
    """Validate one pickle in ``buf[start:]`` without building anything; return its end."""
    bio = io.BytesIO(buf)
    bio.seek(start)
    n_ops = 0
    try:
        for op, arg, _pos in pickletools.genops(bio):
            n_ops += 1
            name = op.name
            if name in _FORBIDDEN_OPCODES:
                raise CheckpointError(f"{path}: {what} uses the forbidden pickle opcode {name}")
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                full = f"{module}.{attr}"
                if full not in ALLOWED_GLOBALS:
                    raise _refusal(full, path)
            elif name in _MEMO_OPCODES:
                if not _is_int(arg) or arg < 0 or arg > n_ops:
                    raise CheckpointError(f"{path}: {what} has an implausible memo index")
            elif name == "FRAME":
                if not _is_int(arg) or arg > len(buf) - bio.tell():
                    raise CheckpointError(f"{path}: {what} declares a frame past its end")
    except CheckpointError:
        raise
    except (ValueError, EOFError, struct.error, OverflowError) as exc:
        raise CheckpointError(f"{path}: {what} is truncated or corrupt: {_short(exc)}") from exc
    return bio.tell()


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, allowed: dict[str, object],
                 persistent: Callable[[object], object] | None) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._allowed = allowed
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        obj = self._allowed.get(full)
        if obj is None:
            raise _refusal(full, self._path)
        return obj

    def persistent_load(self, pid: object) -> object:
        if self._persistent is None:
            raise CheckpointError(f"{self._path}: unexpected persistent id in pickle")
        return self._persistent(pid)


def _unpickle(buf: bytes, start: int, path: str, what: str, allowed: dict[str, object],
              persistent: Callable[[object], object] | None = None) -> tuple[object, int]:
    end = _scan_pickle(buf, start, path, what)
    obj = _SafeUnpickler(buf[start:end], path, allowed, persistent).load()
    return obj, end


# --------------------------------------------------------------------------------------------
# Storage sources
# --------------------------------------------------------------------------------------------


class _Source:
    path: str
    limits: _Limits

    def __init__(self, path: str, limits: _Limits) -> None:
        self.path = path
        self.limits = limits
        self._cache: dict[str, bytes] = {}
        self.bytes_read = 0

    def _account(self, n: int) -> None:
        self.bytes_read += n
        if self.bytes_read > self.limits.max_total_bytes:
            raise CheckpointError(
                f"{self.path}: storages exceed the total limit of "
                f"{self.limits.max_total_bytes} bytes"
            )

    def raw(self, key: str) -> bytes:
        data = self._cache.get(key)
        if data is None:
            data = self._read(key)
            self._cache[key] = data
        return data

    def _read(self, key: str) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _storage_type(self, stype: object) -> _StorageType:
        if not isinstance(stype, _StorageType):
            raise CheckpointError(
                f"{self.path}: persistent id names a {type(stype).__name__}, not a storage type"
            )
        return stype

    def _check_key(self, key: object) -> str:
        if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key) or ".." in key:
            raise CheckpointError(f"{self.path}: invalid storage key {_short(repr(key))}")
        return key

    def _check_numel(self, numel: object, stype: _StorageType) -> int:
        if not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{self.path}: invalid storage size {_short(repr(numel))}")
        if numel * stype.np_dtype.itemsize > self.limits.max_record_bytes:
            raise CheckpointError(
                f"{self.path}: storage of {numel} x {stype.dtype_name} exceeds the record limit "
                f"of {self.limits.max_record_bytes} bytes"
            )
        return numel


class _ZipSource(_Source):
    def __init__(self, path: str, limits: _Limits, zf: zipfile.ZipFile,
                 members: dict[str, zipfile.ZipInfo], prefix: str, big_endian: bool) -> None:
        super().__init__(path, limits)
        self.zf = zf
        self.members = members
        self.prefix = prefix
        self.big_endian = big_endian

    def check_member(self, info: zipfile.ZipInfo, cap: int) -> None:
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: zip member {info.filename!r} is encrypted")
        if info.file_size > cap:
            raise CheckpointError(
                f"{self.path}: zip member {info.filename!r} declares {info.file_size} bytes, "
                f"over the limit of {cap}"
            )
        if info.compress_type != zipfile.ZIP_STORED and info.file_size >= _RATIO_CHECK_MIN_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > self.limits.max_compression_ratio:
                raise CheckpointError(
                    f"{self.path}: zip member {info.filename!r} expands {ratio:.0f}:1 "
                    f"({info.compress_size} -> {info.file_size} bytes), over the limit of "
                    f"{self.limits.max_compression_ratio:.0f}:1 (zip bomb?)"
                )

    def read_member(self, info: zipfile.ZipInfo, cap: int) -> bytes:
        self.check_member(info, cap)
        self._account(info.file_size)
        with self.zf.open(info) as fh:
            data = fh.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise CheckpointError(
                f"{self.path}: zip member {info.filename!r} holds {len(data)} bytes, "
                f"not the declared {info.file_size}"
            )
        return data

    def record(self, key: str) -> zipfile.ZipInfo:
        name = f"{self.prefix}/data/{key}"
        info = self.members.get(name)
        if info is None:
            raise CheckpointError(
                f"{self.path}: the pickle references storage record {name!r}, which is not in "
                "the archive"
            )
        return info

    def persistent_load(self, pid: object) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise CheckpointError(
                f"{self.path}: unsupported persistent id (expected ('storage', type, key, "
                f"location, numel)); got a {type(pid).__name__}"
            )
        _, stype_obj, key_obj, location, numel_obj = pid
        stype = self._storage_type(stype_obj)
        key = self._check_key(key_obj)
        if not isinstance(location, str):
            raise CheckpointError(f"{self.path}: storage location must be a string")
        numel = self._check_numel(numel_obj, stype)
        info = self.record(key)
        self.check_member(info, self.limits.max_record_bytes)
        need = numel * stype.np_dtype.itemsize
        if need > info.file_size:
            raise CheckpointError(
                f"{self.path}: storage {key!r} declares {numel} x {stype.dtype_name} "
                f"({need} bytes) but its record holds only {info.file_size} bytes"
            )
        np_dtype = stype.np_dtype.newbyteorder(">") if self.big_endian else stype.np_dtype
        return _Storage(self, key, stype.dtype_name, np_dtype, numel)

    def _read(self, key: str) -> bytes:
        return self.read_member(self.record(key), self.limits.max_record_bytes)


class _LegacySource(_Source):
    def __init__(self, path: str, limits: _Limits, fh: io.BufferedReader, file_size: int) -> None:
        super().__init__(path, limits)
        self.fh = fh
        self.file_size = file_size
        self.roots: dict[str, _Storage] = {}
        self.records: dict[str, tuple[int, int]] = {}  # key -> (offset, nbytes)

    def persistent_load(self, pid: object) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise CheckpointError(
                f"{self.path}: unsupported persistent id (expected ('storage', type, key, "
                f"location, numel, view)); got a {type(pid).__name__}"
            )
        _, stype_obj, key_obj, location, numel_obj, view = pid
        stype = self._storage_type(stype_obj)
        key = self._check_key(key_obj)
        if not isinstance(location, str):
            raise CheckpointError(f"{self.path}: storage location must be a string")
        numel = self._check_numel(numel_obj, stype)
        root = self.roots.get(key)
        if root is None:
            root = _Storage(self, key, stype.dtype_name, stype.np_dtype, numel)
            self.roots[key] = root
        elif root.dtype_name != stype.dtype_name or root.numel != numel:
            raise CheckpointError(f"{self.path}: storage {key!r} is declared inconsistently")
        if view is None:
            return root
        # Pre-0.4 storage views: (view_key, offset, view_size) into the root storage.
        if (
            not isinstance(view, tuple)
            or len(view) != 3
            or not _is_int(view[1])
            or not _is_int(view[2])
            or view[1] < 0
            or view[2] < 0
            or view[1] + view[2] > numel
        ):
            raise CheckpointError(f"{self.path}: invalid storage view of {key!r}")
        return _Storage(self, key, stype.dtype_name, stype.np_dtype, view[2], view[1])

    def index_records(self, keys: object, start: int) -> None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise CheckpointError(f"{self.path}: storage key list is not a list of strings")
        pos = start
        for key in keys:
            if key in self.records:
                raise CheckpointError(f"{self.path}: storage {key!r} is listed twice")
            root = self.roots.get(key)
            if root is None:
                raise CheckpointError(
                    f"{self.path}: storage {key!r} is listed but never used by the pickle"
                )
            if pos + 8 > self.file_size:
                raise CheckpointError(f"{self.path}: truncated before storage {key!r}")
            self.fh.seek(pos)
            head = self.fh.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{self.path}: truncated before storage {key!r}")
            (count,) = struct.unpack("<q", head)
            if count != root.numel:
                raise CheckpointError(
                    f"{self.path}: storage {key!r} has {count} elements on disk but "
                    f"{root.numel} in the pickle"
                )
            nbytes = count * root.np_dtype.itemsize
            if pos + 8 + nbytes > self.file_size:
                raise CheckpointError(
                    f"{self.path}: storage {key!r} needs {nbytes} bytes past the end of the file"
                )
            self.records[key] = (pos + 8, nbytes)
            pos += 8 + nbytes

    def _read(self, key: str) -> bytes:
        rec = self.records.get(key)
        if rec is None:
            raise CheckpointError(f"{self.path}: storage {key!r} has no data in the file")
        offset, nbytes = rec
        if nbytes > self.limits.max_record_bytes:
            raise CheckpointError(f"{self.path}: storage {key!r} exceeds the record limit")
        self._account(nbytes)
        self.fh.seek(offset)
        data = self.fh.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{self.path}: truncated storage {key!r}")
        return data


# --------------------------------------------------------------------------------------------
# Format readers
# --------------------------------------------------------------------------------------------


# name -> (canonical dtype name, element count, function returning the array in that dtype)
_Entries = dict[str, tuple[str, int, Callable[[], "np.ndarray | None"]]]


def _read_zip(path: str, limits: _Limits, notes: list[str], stack: ExitStack) -> _Entries:
    zf = stack.enter_context(zipfile.ZipFile(path))
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in members:  # zipfile would silently read the last copy
            raise CheckpointError(
                f"{path}: zip archive holds two members named {info.filename!r}: refusing an "
                "ambiguous checkpoint"
            )
        members[info.filename] = info
    pkls = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pkls:
        if "constants.pkl" in {n.rsplit("/", 1)[-1] for n in members}:
            raise CheckpointError(
                f"{path}: TorchScript archive without data.pkl; " + _NN_MODULE_HINT
            )
        raise CheckpointError(
            f"{path}: zip archive has no '<archive>/data.pkl' record: not a PyTorch checkpoint"
        )
    if len(pkls) > 1:
        raise CheckpointError(f"{path}: zip archive holds several data.pkl records: {pkls}")
    prefix = pkls[0][: -len("/data.pkl")]
    big_endian = False
    source = _ZipSource(path, limits, zf, members, prefix, False)
    order = members.get(f"{prefix}/byteorder")
    if order is not None:
        text = source.read_member(order, 16).decode("ascii", "replace").strip()
        if text not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byteorder record {text!r}")
        big_endian = text == "big"
        source.big_endian = big_endian
        if big_endian:
            notes.append("converted big-endian storages to native byte order")
    if f"{prefix}/constants.pkl" in members or any(
        n.startswith(f"{prefix}/code/") for n in members
    ):
        notes.append("archive looks like TorchScript (torch.jit.save)")
    pkl = source.read_member(members[pkls[0]], limits.max_pickle_bytes)
    rebuilder = _Rebuilder(path, limits)
    obj, end = _unpickle(pkl, 0, path, "data.pkl", rebuilder.globals(), source.persistent_load)
    if end != len(pkl):
        raise CheckpointError(f"{path}: trailing bytes after the pickle in data.pkl")
    notes.insert(0, f"read PyTorch zip checkpoint (archive '{_short(prefix, 60)}')")
    return _select_tensors(obj, path, notes)


def _constant(arr: np.ndarray | None) -> Callable[[], np.ndarray | None]:
    return lambda: arr


def _read_legacy(path: str, limits: _Limits, notes: list[str], stack: ExitStack) -> _Entries:
    fh = stack.enter_context(open(path, "rb"))
    file_size = os.fstat(fh.fileno()).st_size
    head = fh.read(min(file_size, limits.max_pickle_bytes))
    none: dict[str, object] = {}
    magic, pos = _unpickle(head, 0, path, "legacy magic number", none)
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path}: a plain pickle, not a PyTorch checkpoint (no torch magic number); "
            "refusing it"
        )
    proto, pos = _unpickle(head, pos, path, "legacy protocol version", none)
    if proto != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy protocol version {_short(proto)}")
    sys_info, pos = _unpickle(head, pos, path, "legacy sys_info", none)
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{path}: legacy sys_info is not a dict")
    source = _LegacySource(path, limits, fh, file_size)
    rebuilder = _Rebuilder(path, limits)
    obj, pos = _unpickle(head, pos, path, "legacy main pickle", rebuilder.globals(),
                         source.persistent_load)
    keys, pos = _unpickle(head, pos, path, "legacy storage key list", none)
    source.index_records(keys, pos)
    notes.insert(0, "read PyTorch legacy (pre-1.6, non-zip) checkpoint")
    return _select_tensors(obj, path, notes)


def _read_safetensors(path: str, limits: _Limits, notes: list[str]) -> _Entries:
    tensors, _meta = read_safetensors(
        path, max_tensor_bytes=limits.max_record_bytes, max_total_bytes=limits.max_total_bytes
    )
    notes.insert(0, "read safetensors file")
    return {
        k: (dt, 0 if arr is None else arr.size, _constant(arr)) for k, (dt, arr) in tensors.items()
    }


# --------------------------------------------------------------------------------------------
# Selecting, flattening, casting
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("model.", "module.", "_orig_mod.")


def _has_tensor(obj: object, depth: int = 3) -> bool:
    if isinstance(obj, _Tensor):
        return True
    if depth <= 0 or not isinstance(obj, dict):
        return False
    return any(_has_tensor(v, depth - 1) for v in list(obj.values())[:1000])


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(_short(s, 60)) for s in items[:limit])
    return shown + (f", ... ({len(items)} total)" if len(items) > limit else "")


def _select_tensors(obj: object, path: str, notes: list[str]) -> _Entries:
    if isinstance(obj, _Tensor):
        raise CheckpointError(f"{path}: the checkpoint holds a single tensor, not a state dict")
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: the checkpoint's top-level object is a {type(obj).__name__}, "
            "not a dict of tensors"
        )
    for _ in range(3):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(inner, dict) and _has_tensor(inner):
                others = [str(k) for k in obj if k != key]
                note = f"unwrapped '{key}'"
                if others:
                    note += f" (ignored other top-level keys: {_names(others)})"
                notes.append(note)
                obj = inner
                break
        else:
            break

    flat: dict[str, _Tensor] = {}
    skipped: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[str, object, int]] = [("", obj, 0)]
    visits = 0
    while stack:
        prefix, node, depth = stack.pop()
        visits += 1
        if visits > _MAX_ENTRIES:
            raise CheckpointError(f"{path}: the checkpoint has more than {_MAX_ENTRIES} entries")
        if isinstance(node, _Tensor):
            if prefix in flat:
                raise CheckpointError(f"{path}: two tensors flatten to the name {prefix!r}")
            flat[prefix] = node
            continue
        if isinstance(node, (dict, list, tuple)):
            if id(node) in seen:
                skipped.append(prefix or "<root>")
                continue
            seen.add(id(node))
            if depth >= _MAX_NESTING:
                raise CheckpointError(
                    f"{path}: containers nest deeper than {_MAX_NESTING} levels at {prefix!r}"
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            children = []
            for k, v in items:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise CheckpointError(
                        f"{path}: key of type {type(k).__name__} under {prefix!r} is not a name"
                    )
                children.append((f"{prefix}.{k}" if prefix else str(k), v, depth + 1))
            stack.extend(reversed(children))
            continue
        skipped.append(prefix or "<root>")
    if skipped:
        notes.append(f"ignored {len(skipped)} non-tensor entries ({_names(skipped)})")

    return {k: (t.dtype_name, t.numel, t.materialize) for k, t in flat.items()}


def _strip_prefixes(flat: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    changed = True
    while changed and flat:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) and len(k) > len(p) for k in flat):
                flat = {k[len(p):]: v for k, v in flat.items()}
                notes.append(f"stripped prefix '{p}'")
                changed = True
    return flat


def _finish(
    path: str, entries: _Entries, notes: list[str], limits: _Limits
) -> dict[str, np.ndarray]:
    entries = _strip_prefixes(entries, notes)
    out: dict[str, np.ndarray] = {}
    cast: dict[str, int] = {}
    overflow = 0
    dropped: list[str] = []
    total = 0
    for name, (dtype_name, numel, get) in entries.items():
        if dtype_name not in _FLOAT_DTYPES:
            dropped.append(f"{name} ({dtype_name})")
            continue
        total += numel * 4  # checked before anything is allocated
        if total > limits.max_total_bytes:
            raise CheckpointError(
                f"{path}: tensors exceed the total limit of {limits.max_total_bytes} bytes"
            )
        arr = get()
        if arr is None or arr.size != numel:  # pragma: no cover - internal invariant
            raise CheckpointError(f"{path}: internal error materialising {name!r}")
        if dtype_name == "float32":
            res = np.asarray(arr, dtype=np.float32)
        elif dtype_name == "bfloat16":
            res = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif dtype_name == "float64":
            with np.errstate(over="ignore", invalid="ignore"):
                res = arr.astype(np.float32)
            overflow += int(np.count_nonzero(np.isinf(res) & np.isfinite(arr)))
        else:
            res = arr.astype(np.float32)
        if dtype_name != "float32":
            cast[dtype_name] = cast.get(dtype_name, 0) + 1
        out[name] = np.require(res, dtype=np.float32, requirements=["C"])  # keeps 0-d
    for dtype_name in ("float16", "bfloat16", "float64"):
        n = cast.get(dtype_name, 0)
        if n:
            notes.append(f"cast {n} {dtype_name} tensor{'s' if n != 1 else ''} to float32")
    if overflow:
        notes.append(f"{overflow} float64 values overflowed to +-inf in float32")
    if dropped:
        notes.append(f"dropped {len(dropped)} non-float tensors: {_names(dropped)}")
    if not out:
        raise CheckpointError(f"{path}: no floating-point tensors found in the checkpoint")
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _sniff(head: bytes, file_size: int) -> str:
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:4] in (b"PK\x05\x06", b"PK\x07\x08"):
        return "empty-zip"
    if looks_like_safetensors(head, file_size):
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-legacy"
    if head[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    return "unknown"


def _open_head(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(512)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from exc
    return head, size


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return ``'torch-zip'``, ``'torch-legacy'`` or ``'safetensors'`` from the file's content.

    Raises :class:`CheckpointError` for empty, unknown or unsupported files.
    """
    name = os.fspath(path)
    head, size = _open_head(name)
    fmt = _sniff(head, size)
    if size == 0:
        raise CheckpointError(f"{name}: empty file")
    if fmt == "empty-zip":
        raise CheckpointError(f"{name}: empty zip archive, not a PyTorch checkpoint")
    if fmt == "tar":
        raise CheckpointError(
            f"{name}: tar-based checkpoint of PyTorch < 0.4 is not supported; re-save it with a "
            "current PyTorch (torch.save(model.state_dict(), path))"
        )
    if fmt == "unknown":
        raise CheckpointError(
            f"{name}: not a PyTorch (zip or legacy) or safetensors checkpoint "
            f"(starts with {head[:8]!r})"
        )
    return fmt


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_pickle_bytes: int = DEFAULT_MAX_PICKLE_BYTES,
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a PyTorch or safetensors checkpoint into a flat dict of float32 NumPy arrays.

    Never imports torch and never runs code from the file (see the module docstring for the
    allow-list and limits). Returns ``(state, notes)``: ``state`` maps dotted parameter names to
    C-contiguous float32 arrays (fresh copies sharing no memory with one another), in file
    order; ``notes`` are human-readable lines about what was done (format, unwrapping
    ``state_dict``/``model``/``model_state_dict``, stripping a ``model.``/``module.``/
    ``_orig_mod.`` prefix shared by all keys, float16/bfloat16/float64 -> float32 casts,
    dropped integer/bool tensors such as ``num_batches_tracked``, ignored non-tensor entries).

    Integer and bool tensors are validated but left out of ``state`` (with a note naming them).
    Limits (keyword-only): ``max_record_bytes`` caps any single zip member, storage or tensor;
    ``max_total_bytes`` caps the storage bytes read and, separately, the float32 bytes returned;
    ``max_pickle_bytes`` caps the pickle stream; ``max_compression_ratio`` caps the expansion
    of compressed zip members of 1 MiB or more.

    Raises :class:`~npdgru.errors.CheckpointError` for every refused or malformed input.
    """
    for label, value in (("max_record_bytes", max_record_bytes),
                         ("max_total_bytes", max_total_bytes),
                         ("max_pickle_bytes", max_pickle_bytes)):
        if not _is_int(value) or value <= 0:
            raise ParameterError(f"{label} must be a positive int, got {value!r}")
    if not isinstance(max_compression_ratio, (int, float)) or not max_compression_ratio >= 1:
        raise ParameterError(f"max_compression_ratio must be >= 1, got {max_compression_ratio!r}")
    limits = _Limits(max_record_bytes, max_total_bytes, max_pickle_bytes,
                     float(max_compression_ratio))
    name = os.fspath(path)
    fmt = detect_format(name)
    notes: list[str] = []
    try:
        with ExitStack() as stack:  # files stay open until the selected tensors are read
            if fmt == "torch-zip":
                entries = _read_zip(name, limits, notes, stack)
            elif fmt == "torch-legacy":
                entries = _read_legacy(name, limits, notes, stack)
            else:
                entries = _read_safetensors(name, limits, notes)
            state = _finish(name, entries, notes, limits)
    except CheckpointError as exc:
        if name in str(exc):
            raise
        raise CheckpointError(f"{name}: {exc}") from exc
    except _BOUNDARY_ERRORS as exc:
        raise CheckpointError(
            f"{name}: corrupt or unreadable {fmt} checkpoint "
            f"({type(exc).__name__}: {_short(exc)})"
        ) from exc
    notes.insert(1, f"{len(state)} float32 tensors")
    return state, notes
