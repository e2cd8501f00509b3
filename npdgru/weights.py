"""The npdgru weight file: safetensors tensors plus versioned metadata.

Layout::

    tensors   float32, C order, PyTorch names and layouts: fc1.weight (out, in), fc1.bias (out,),
              gru1.weight_ih (3H, I), gru1.weight_hh (3H, H), gru1.bias_ih (3H,), gru1.bias_hh
              (3H,), gate order r, z, n
    metadata  format="npdgru", format_version="1", architecture=<JSON>, sample_rate="16000",
              trained_update_percent, source, license (+ optional converted_from, source_sha256,
              notes, mask_floor_db)

The architecture is a list of layers run in order on log-power features::

    {"name": "nsnet2", "n_features": 161, "layers": [
        {"kind": "linear", "name": "fc1", "in": 161, "out": 400, "activation": "relu"},
        {"kind": "gru", "name": "gru1", "in": 400, "hidden": 400}, ...]}

Format 2 (DPRNN, MPT; ``npdgru/architectures.py``) makes it a small graph: a layer may read
``inputs`` (earlier layer names or "features"; default the previous layer) and run on ``bands``
(the same weights on F bands of its input, width F·in). Kinds: ``linear``, ``gru`` (a D-GRU along
time), ``bigru`` (a dense bidirectional GRU across the bands of a frame; tensors also with the
suffix ``_reverse``), ``layernorm`` (``weight``/``bias`` of shape (size,)), ``pad``, ``slice``,
``add``, ``concat``. A ``gru`` layer may name its ``gate`` (``docs/design.md``): ``"top-a"`` (the
default, A = ceil(P·H/100) neurons per frame), ``"threshold"`` with ``theta`` (the neurons with
u > θ) or ``"delta"`` with ``theta`` and optionally ``theta_x`` (a delta network). A file records
the oldest format that reads it: 1 for a plain chain of linear and GRU layers without a gate
field, so files of the first reader stay readable by it.

Loading validates everything before anything runs: a newer ``format_version`` is refused, and a
missing, unexpected, mis-shaped, non-float32 or non-finite tensor is named with its file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import WeightsError
from .plan import (  # noqa: F401 (the architecture's meaning lives in plan.py; these names stay importable here)
    ACTIVATIONS,
    LAYER_KINDS,
    LAYER_KINDS_V1,
    describe_layer,
    expected_shapes,
    format_version_of,
    layer_inputs,
    layer_width,
    validate_architecture,
)

FORMAT = "npdgru"
FORMAT_VERSION = 2  # the newest this npdgru reads; a file says the oldest that can read it

__all__ = ["Weights", "load_weights", "save_weights", "expected_shapes", "validate_architecture", "default_weights_path", "FORMAT_VERSION"]


@dataclass
class Weights:
    """A loaded, validated weight file."""

    architecture: dict
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def trained_update_percent(self) -> float:
        """P the model was trained at; NaN for a model trained at any P ("any" in the metadata)."""
        value = self.metadata.get("trained_update_percent", "100")
        if value.strip().lower() == "any":
            return float("nan")
        try:
            return float(value)
        except ValueError:
            return 100.0

    @property
    def default_update_percent(self) -> float | None:
        """P the file asks to be run at when the user names none (metadata ``default_update_percent``); None if it records none."""
        value = self.metadata.get("default_update_percent")
        return None if value is None else _default_percent(value, self.path)

    def describe(self) -> str:
        """Human-readable summary (what ``npdgru info`` prints)."""
        lines = [f"file: {self.path}"] if self.path else []
        arch = self.architecture
        lines.append(f"architecture: {arch.get('name', '?')} ({arch['n_features']} features)")
        n_params = 0
        for layer in arch["layers"]:
            lines.append(f"  {layer['name']:<8} {describe_layer(layer)}")
        for a in self.tensors.values():
            n_params += a.size
        lines.append(f"parameters: {n_params:,} float32 ({n_params * 4 / 2**20:.1f} MiB)")
        for key in ("format_version", "sample_rate", "trained_update_percent", "default_update_percent", "source", "license", "converted_from", "source_sha256", "notes"):
            if key in self.metadata:
                lines.append(f"{key}: {self.metadata[key]}")
        return "\n".join(lines)


def _fail(path, msg):
    raise WeightsError(f"{path}: {msg}" if path else msg)


def check_tensors(arch, tensors, path=None) -> None:
    """All problems at once: missing, unexpected, mis-shaped, wrong dtype, non-finite."""
    want = expected_shapes(arch)
    problems = []
    for name in sorted(set(want) - set(tensors)):
        problems.append(f"missing tensor {name} (expected shape {want[name]})")
    for name in sorted(set(tensors) - set(want)):
        problems.append(f"unexpected tensor {name} {tuple(np.shape(tensors[name]))}")
    for name in sorted(set(want) & set(tensors)):
        a = tensors[name]
        if a.dtype != np.float32:
            problems.append(f"tensor {name} has dtype {a.dtype}, expected float32")
        elif tuple(a.shape) != want[name]:
            problems.append(f"tensor {name} has shape {tuple(a.shape)}, expected {want[name]}")
        elif not np.isfinite(a).all():
            problems.append(f"tensor {name} contains NaN or Inf")
    if problems:
        _fail(path, "weights do not fit the architecture:\n  " + "\n  ".join(problems))


def _trained_percent(value, path) -> str:
    """The metadata string of trained_update_percent: a P in (0, 100] or "any"."""
    if isinstance(value, str) and value.strip().lower() == "any":
        return "any"
    return str(_percent(value, path, "trained_update_percent", " or 'any'"))


def _default_percent(value, path) -> float:
    """The metadata ``default_update_percent``: a P in (0, 100] (what ``-P`` defaults to for this file)."""
    return _percent(value, path, "default_update_percent")


def _percent(value, path, key: str, also: str = "") -> float:
    """``value`` as a P in (0, 100]; a WeightsError naming ``key`` and the file otherwise."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 < p <= 100.0:
        _fail(path, f"{key}={value!r} must be a number in (0, 100]{also}")
    return p


def save_weights(path, tensors: dict, *, architecture: dict, trained_update_percent: float | str = 100.0, source: str = "", license: str = "", extra: dict | None = None) -> None:
    """Write a weight file atomically (temporary file in the same folder, then rename)."""
    from safetensors.numpy import save

    validate_architecture(architecture, path)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    check_tensors(architecture, tensors, path)
    meta = {
        "format": FORMAT,
        "format_version": str(format_version_of(architecture)),
        "architecture": json.dumps(architecture, sort_keys=False),
        "sample_rate": "16000",
        "trained_update_percent": _trained_percent(trained_update_percent, path),
        "source": source,
        "license": license,
    }
    for k, v in (extra or {}).items():
        meta[str(k)] = str(v)
    if "default_update_percent" in meta:  # refused when written, not first when loaded
        meta["default_update_percent"] = str(_default_percent(meta["default_update_percent"], path))
    data = save(tensors, metadata=meta)
    path = Path(path)
    if path.is_dir():
        _fail(path, "is a folder; name the weight file to write (e.g. OUT.safetensors)")
    try:  # as enhance.write_audio: create the folder, write a temporary file there, rename
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _fail(path, f"cannot write there ({e.strerror or e})")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions, a folder in the way
        _fail(path, f"cannot write the weight file ({e.strerror or e})")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights(path) -> Weights:
    """Read and validate a weight file. Raises WeightsError naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        _fail(path, "no such weight file")
    if os.path.isdir(path):
        _fail(path, "is a folder, not a weight file")
    try:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
            fmt, version = meta.get("format"), meta.get("format_version")
            if fmt != FORMAT:
                _fail(path, f"not an npdgru weight file (metadata format={fmt!r}); convert checkpoints with 'npdgru convert'")
            try:
                v = int(version)
            except (TypeError, ValueError):
                _fail(path, f"format_version={version!r} is not an integer")
            if v > FORMAT_VERSION:
                _fail(path, f"format_version {v} is newer than this npdgru reads ({FORMAT_VERSION}); upgrade npdgru")
            if v < 1:
                _fail(path, f"format_version {v} is not valid")
            try:
                arch = json.loads(meta.get("architecture", ""))
            except json.JSONDecodeError as e:
                _fail(path, f"architecture metadata is not valid JSON ({e})")
            validate_architecture(arch, path)
            if meta.get("sample_rate", "16000") != "16000":
                _fail(path, f"sample_rate={meta.get('sample_rate')!r}: only 16000 Hz models are supported")
            if "default_update_percent" in meta:
                _default_percent(meta["default_update_percent"], path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError, MemoryError) as e:
        _fail(path, f"cannot read as safetensors ({e})")
    check_tensors(arch, tensors, path)
    return Weights(architecture=arch, tensors=tensors, metadata=meta, path=path)


DEFAULT_MODEL = "nsnet2-kd-anyp.safetensors"  # NSNet2 distilled with the select gate for any P


def default_weights_path() -> Path:
    """The shipped default model (``weights/nsnet2-kd-anyp.safetensors``, packaged as npdgru._shipped).

    The any-P fine-tune: one file that keeps its quality at whatever P the user picks (the
    evaluation table in the README); ``weights/nsnet2.safetensors`` is the original NSNet2.
    """
    from importlib.resources import files

    try:
        p = files("npdgru._shipped") / DEFAULT_MODEL
        if p.is_file():
            return Path(str(p))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "weights" / DEFAULT_MODEL
