"""The npdgru weight file: safetensors tensors plus versioned metadata.

Layout (DESIGN.md section 4)::

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
``add``, ``concat``. A file records the oldest format that reads it: 1 for a plain chain of
linear and GRU layers, so files of the first reader stay readable by it.

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

FORMAT = "npdgru"
FORMAT_VERSION = 2  # the newest this npdgru reads; a file says the oldest that can read it
LAYER_KINDS_V1 = ("linear", "gru")
LAYER_KINDS = ("linear", "gru", "bigru", "layernorm", "pad", "slice", "add", "concat")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "none")

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
        for key in ("format_version", "sample_rate", "trained_update_percent", "source", "license", "converted_from", "source_sha256", "notes"):
            if key in self.metadata:
                lines.append(f"{key}: {self.metadata[key]}")
        return "\n".join(lines)


def describe_layer(layer) -> str:
    """One line per layer for ``npdgru info``: kind, sizes, bands and inputs."""
    kind, F = layer["kind"], layer.get("bands", 1)
    if kind == "gru":
        desc = f"D-GRU {layer['in']} -> {layer['hidden']} (along time)"
    elif kind == "bigru":
        desc = f"BiGRU {layer['in']} -> 2x{layer['hidden']} (across the bands of a frame, dense)"
    elif kind == "linear":
        desc = f"Linear {layer['in']} -> {layer['out']} + {layer.get('activation', 'none')}"
    elif kind == "layernorm":
        desc = f"LayerNorm {layer['size']}"
    elif kind == "pad":
        desc = f"Pad {layer['in']} -> {layer['out']}"
    elif kind == "slice":
        desc = f"Slice [{layer['start']}:{layer['stop']}]"
    else:
        desc = kind.capitalize()
    if F > 1:
        desc += f", {F} bands"
    if "inputs" in layer:
        desc += f"  <- {', '.join(layer['inputs'])}"
    return desc


def _fail(path, msg):
    raise WeightsError(f"{path}: {msg}" if path else msg)


_SIZE_KEYS = {
    "linear": ("in", "out"),
    "gru": ("in", "hidden"),
    "bigru": ("in", "hidden"),
    "layernorm": ("size",),
    "pad": ("in", "out"),
    "slice": ("start", "stop"),
    "add": (),
    "concat": (),
}
_V2_KEYS = ("inputs", "bands")  # fields a format-1 reader does not know


def layer_inputs(layers, i) -> list[str]:
    """Names a layer reads: its ``inputs``, else the previous layer ("features" for the first)."""
    spec = layers[i]
    if "inputs" in spec:
        return list(spec["inputs"])
    return ["features" if i == 0 else layers[i - 1]["name"]]


def layer_width(spec, in_widths) -> int:
    """Output width of a layer (entries per frame and stream), given its input widths."""
    kind, F = spec["kind"], spec.get("bands", 1)
    if kind == "linear":
        return F * spec["out"]
    if kind == "gru":
        return F * spec["hidden"]
    if kind == "bigru":
        return F * 2 * spec["hidden"]
    if kind == "pad":
        return spec["out"]
    if kind == "slice":
        return spec["stop"] - spec["start"]
    if kind == "concat":
        return sum(in_widths)
    return in_widths[0]  # layernorm, add


def format_version_of(arch) -> int:
    """1 for a plain chain of linear and GRU layers (NSNet2), 2 when a layer needs the graph
    fields (``inputs``, ``bands``) or the kinds added with them (bigru, layernorm, pad, slice, add,
    concat): a format-1 reader then refuses the file as newer instead of misreading it."""
    for spec in arch["layers"]:
        if spec["kind"] not in LAYER_KINDS_V1 or any(k in spec for k in _V2_KEYS):
            return 2
    return 1


def validate_architecture(arch, path=None) -> dict:
    """Check an architecture dict; return it. Raises WeightsError naming the problem.

    The layers run in order; each reads ``inputs`` (layer names or "features"; by default the
    previous layer) and the last one gives the mask (width ``n_features``). Sizes are per band:
    a layer with ``bands`` = F runs the same weights on F bands of its input (a width of F·in).
    """
    if not isinstance(arch, dict) or not isinstance(arch.get("layers"), list) or not arch["layers"]:
        _fail(path, "architecture must be a dict with a non-empty 'layers' list")
    nf = arch.get("n_features")
    if not isinstance(nf, int) or isinstance(nf, bool) or nf < 1:
        _fail(path, f"architecture n_features={nf!r} must be a positive integer")
    widths = {"features": nf}
    layers = arch["layers"]
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            _fail(path, f"architecture layer {i} is not a dict")
        kind, name = layer.get("kind"), layer.get("name")
        if kind not in LAYER_KINDS:
            _fail(path, f"architecture layer {i} ({name}): kind {kind!r} is not one of {LAYER_KINDS}")
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in widths:
            _fail(path, f"architecture layer {i}: name {name!r} must be a unique identifier without dots (not 'features', not starting with '_')")
        for k in _SIZE_KEYS[kind] + (("bands",) if "bands" in layer else ()):
            v = layer.get(k)
            low = 0 if k == "start" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                _fail(path, f"architecture layer {name}: '{k}'={v!r} must be an integer >= {low}")
        if "bands" in layer and kind not in ("linear", "gru", "bigru", "layernorm"):
            _fail(path, f"architecture layer {name}: kind {kind!r} takes no 'bands'")
        inputs = layer.get("inputs", None)
        if inputs is not None and (not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs)):
            _fail(path, f"architecture layer {name}: 'inputs' must be a non-empty list of layer names")
        inputs = layer_inputs(layers, i)
        for x in inputs:
            if x not in widths:
                _fail(path, f"architecture layer {name}: input {x!r} is not 'features' or an earlier layer")
        n_in = len(inputs)
        if kind in ("add", "concat") and n_in < 2:
            _fail(path, f"architecture layer {name}: {kind} needs at least two inputs")
        if kind not in ("add", "concat") and n_in != 1:
            _fail(path, f"architecture layer {name}: {kind} takes one input, got {n_in}")
        in_w = [widths[x] for x in inputs]
        F = layer.get("bands", 1)
        if kind in ("linear", "gru", "bigru", "pad") and in_w[0] != F * layer["in"]:
            band = f" ({F} bands x {layer['in']})" if F > 1 else ""
            _fail(path, f"architecture layer {name}: input size {F * layer['in']}{band} does not match the width {in_w[0]} of {inputs[0]}")
        if kind == "layernorm" and in_w[0] != F * layer["size"]:
            _fail(path, f"architecture layer {name}: {F} bands x size {layer['size']} does not match the width {in_w[0]} of {inputs[0]}")
        if kind == "pad" and layer["out"] < layer["in"]:
            _fail(path, f"architecture layer {name}: pad out={layer['out']} is smaller than in={layer['in']}")
        if kind == "slice" and not layer["start"] < layer["stop"] <= in_w[0]:
            _fail(path, f"architecture layer {name}: slice [{layer['start']}, {layer['stop']}) is not inside the width {in_w[0]} of {inputs[0]}")
        if kind == "add" and len(set(in_w)) != 1:
            _fail(path, f"architecture layer {name}: add needs inputs of one width, got {in_w}")
        if kind == "linear" and layer.get("activation", "none") not in ACTIVATIONS:
            _fail(path, f"architecture layer {name}: activation {layer.get('activation')!r} is not one of {ACTIVATIONS}")
        if kind == "layernorm" and not (isinstance(layer.get("eps", 1e-5), float) and 0.0 < layer.get("eps", 1e-5) < 1.0):
            _fail(path, f"architecture layer {name}: eps={layer.get('eps')!r} must be a float in (0, 1)")
        widths[name] = layer_width(layer, in_w)
    width = widths[layers[-1]["name"]]
    if width != nf:
        _fail(path, f"architecture output width {width} must equal n_features={nf} (a mask per bin)")
    return arch


def expected_shapes(arch) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, with its shape (PyTorch names and layouts)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in arch["layers"]:
        n, kind = layer["name"], layer["kind"]
        if kind in ("gru", "bigru"):
            H, I = layer["hidden"], layer["in"]
            for suffix in ("", "_reverse") if kind == "bigru" else ("",):
                shapes.update({f"{n}.weight_ih{suffix}": (3 * H, I), f"{n}.weight_hh{suffix}": (3 * H, H), f"{n}.bias_ih{suffix}": (3 * H,), f"{n}.bias_hh{suffix}": (3 * H,)})
        elif kind == "linear":
            shapes.update({f"{n}.weight": (layer["out"], layer["in"]), f"{n}.bias": (layer["out"],)})
        elif kind == "layernorm":
            shapes.update({f"{n}.weight": (layer["size"],), f"{n}.bias": (layer["size"],)})
    return shapes


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
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 < p <= 100.0:
        _fail(path, f"trained_update_percent={value!r} must be a number in (0, 100] or 'any'")
    return str(p)


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
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError, MemoryError) as e:
        _fail(path, f"cannot read as safetensors ({e})")
    check_tensors(arch, tensors, path)
    return Weights(architecture=arch, tensors=tensors, metadata=meta, path=path)


DEFAULT_MODEL = "nsnet2-ft-anyp.safetensors"  # NSNet2 fine-tuned with the select gate at any P


def default_weights_path() -> Path:
    """The shipped default model (``weights/nsnet2-ft-anyp.safetensors``, packaged as npdgru._shipped).

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
