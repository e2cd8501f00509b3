"""The architecture resolved once into steps: what each layer reads, computes and carries.

A weight file's architecture (``weights.py`` checks it) is a list of layers; the plan turns it,
once, into :class:`Step` records that every consumer walks without interpreting the JSON again:

* the executors of every backend (``kernels/``) run the steps in order;
* the PyTorch twin ``train.torch_model.GraphNet`` walks the same steps;
* the work counters (:meth:`Plan.macs`, :meth:`Plan.weight_bytes`) are computed here and nowhere
  else.

A step knows its kind, its inputs (earlier steps or "features", as buffer slots), its bands F,
its widths, for a D-GRU layer the number A of neurons updated per step, whether its input product
runs from the changed columns of a previous D-GRU state (``sparse_input``), and the tensors it
reads. This module is the only code that gives a layer kind its meaning: it also checks an
architecture dict (:func:`validate_architecture`), names the tensors each kind needs
(:func:`expected_shapes`) and describes a layer for ``npdgru info``; ``weights.py`` keeps the file
I/O and the tensor checks.

    >>> from npdgru.architectures import NSNET2_ARCHITECTURE      # doctest: +SKIP
    >>> p = make_plan(NSNET2_ARCHITECTURE, update_percent=50)      # doctest: +SKIP
    >>> [s.kind for s in p.steps], p.steps[1].A                    # doctest: +SKIP
    (['linear', 'gru', 'gru', 'linear', 'linear', 'linear'], 200)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ParameterError, WeightsError
from .reference import count_macs, num_selected

__all__ = ["Step", "Plan", "make_plan", "KINDS_WITH_STATE", "FEATURES", "validate_architecture", "expected_shapes", "describe_layer", "layer_inputs", "LAYER_KINDS"]

FEATURES = "features"
LAYER_KINDS_V1 = ("linear", "gru")
LAYER_KINDS = ("linear", "gru", "bigru", "layernorm", "pad", "slice", "add", "concat")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "none")
KINDS_WITH_STATE = ("gru",)  # kinds that carry state from frame to frame (one state per step)
_GLUE = ("add", "concat", "pad", "slice")


@dataclass(frozen=True)
class Step:
    """One layer of the plan.

    name, kind   the layer's name and kind (linear, gru, bigru, layernorm, pad, slice, add, concat)
    inputs       names read ("features" or earlier steps), in order; ``slots`` the same as indices
                 into the executor's value list (0 = features, k + 1 = step k)
    slot         where this step's output lives (its index + 1)
    bands        F: the step runs the same weights on F bands of its input
    size_in      per-band input size (linear, gru, bigru, pad), C for layernorm, the input width else
    size_out     per-band output size: out (linear), hidden (gru), 2·hidden (bigru), size (norm)
    width        entries of the output per frame and stream (F · size_out, or the glue's width)
    A            D-GRU steps: neurons updated per step (= hidden at P = 100); None otherwise
    dense        gru steps: P = 100, the dense GRU kernel runs (no accumulators)
    sparse_input gru steps: the input product is kept from the changed columns of the input (the
                 state of a previous D-GRU step with the same bands)
    activation, eps, start, stop   per kind (linear, layernorm, slice)
    tensors      names of the tensors the step reads, e.g. ("fc1.weight", "fc1.bias")
    frees        names whose last reader this step is (the executor may drop them after it)
    """

    name: str
    kind: str
    inputs: tuple
    slots: tuple
    slot: int
    bands: int
    size_in: int
    size_out: int
    width: int
    A: int | None = None
    dense: bool = True
    sparse_input: bool = False
    activation: str = "none"
    eps: float = 1e-5
    start: int = 0
    stop: int = 0
    tensors: tuple = ()
    frees: tuple = ()

    @property
    def hidden(self) -> int:
        """H of a gru or bigru step."""
        return self.size_out // 2 if self.kind == "bigru" else self.size_out

    @property
    def carries_state(self) -> bool:
        return self.kind in KINDS_WITH_STATE


@dataclass
class Plan:
    """The architecture as steps, at one update percentage. Build it with :func:`make_plan`."""

    architecture: dict
    n_features: int
    update_percent: float
    steps: list = field(default_factory=list)

    @property
    def state_steps(self) -> list:
        """The steps that carry state along time (one state per step, F rows per stream)."""
        return [s for s in self.steps if s.carries_state]

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def fraction_updated(self) -> float:
        """Fraction of D-GRU neurons updated per step (A/H averaged over steps, weighted by H·bands)."""
        g = self.state_steps
        return sum(s.A * s.bands for s in g) / max(1, sum(s.hidden * s.bands for s in g))

    def macs(self) -> dict:
        """MACs per frame of one stream as the plan runs: D-GRU steps (dense / paper / ours) and the rest.

        *ours* counts a step's input product from A columns only when it runs that way
        (``sparse_input``, fed by a D-GRU step); otherwise it is dense, 3H·I. A step with F bands
        counts F times. The dense bidirectional GRUs across frequency (DPRNN) are in *other*, with
        the linear layers; normalisation and shape glue are not counted.
        """
        dense = paper = ours = other = 0
        for s in self.steps:
            F = s.bands
            if s.kind == "gru":
                prev_A = self.step(s.inputs[0]).A if s.sparse_input else None
                m = count_macs(s.size_in, s.hidden, self.update_percent, input_changed=prev_A)
                dense, paper, ours = dense + F * m.dense, paper + F * m.paper, ours + F * m.sparse
            elif s.kind == "bigru":
                other += F * 2 * 3 * s.hidden * (s.size_in + s.hidden)
            elif s.kind == "linear":
                other += F * s.size_in * s.size_out
        return {"gru_dense": dense, "gru_paper": paper, "gru_ours": ours, "other": other}

    def weight_bytes(self) -> dict:
        """Bytes of float32 weights one streaming hop (one frame of one stream) reads, per step kind.

        ``dense``: every weight once. ``ours``: a D-GRU step reads its recurrent columns of the
        changed entries only (at most min(H, F·A) columns of 3H floats, the bands sharing the
        weights) and, with ``sparse_input``, its input columns likewise; everything else is read
        whole. An upper bound on distinct bytes (the bands of one frame may pick the same columns).
        """
        dense = ours = 0
        for s in self.steps:
            if s.kind == "linear":
                b = 4 * (s.size_in * s.size_out + s.size_out)
                dense, ours = dense + b, ours + b
            elif s.kind == "bigru":
                b = 4 * 2 * (3 * s.hidden * (s.size_in + s.hidden) + 6 * s.hidden)
                dense, ours = dense + b, ours + b
            elif s.kind == "layernorm":
                dense, ours = dense + 8 * s.size_in, ours + 8 * s.size_in
            elif s.kind == "gru":
                H, I, F = s.hidden, s.size_in, s.bands
                dense += 4 * (3 * H * (I + H) + 6 * H)
                rec = H if s.dense else min(H, F * s.A)
                inp = min(I, F * self.step(s.inputs[0]).A) if s.sparse_input else I
                ours += 4 * (3 * H * (inp + rec) + 6 * H)
        return {"dense": dense, "ours": ours}


def _tensor_names(spec) -> tuple:
    """The tensors a layer reads, in the order its kernels take them (expected_shapes' order)."""
    return tuple(expected_shapes({"layers": [spec]}))


def make_plan(architecture: dict, *, update_percent: float = 100.0, sparse_inputs: bool = False) -> Plan:
    """Resolve a (validated) architecture into a :class:`Plan` at update percentage P.

    ``sparse_inputs``: a D-GRU step whose input is the state of another D-GRU step with the same
    bands keeps its input product from the changed columns (only when P < 100).
    """
    num_selected(update_percent, 1)  # validates P first: "50", None, True are refused, not cast
    P = float(update_percent)
    layers = architecture["layers"]
    names = [FEATURES] + [s["name"] for s in layers]
    widths = {FEATURES: architecture["n_features"]}
    kinds = {FEATURES: None}
    bands = {FEATURES: 1}
    A_of = {FEATURES: None}
    ins_all = [layer_inputs(layers, i) for i in range(len(layers))]
    last = {}
    for i, ins in enumerate(ins_all):
        for x in ins:
            last[x] = i
    steps = []
    for i, spec in enumerate(layers):
        kind, name, F = spec["kind"], spec["name"], spec.get("bands", 1)
        ins = ins_all[i]
        in_w = [widths[x] for x in ins]
        kw = {}
        if kind == "linear":
            size_in, size_out, width = spec["in"], spec["out"], F * spec["out"]
            kw["activation"] = spec.get("activation", "none")
        elif kind == "gru":
            size_in, size_out, width = spec["in"], spec["hidden"], F * spec["hidden"]
            A = num_selected(P, size_out)
            src = ins[0]
            sparse = bool(sparse_inputs) and P < 100.0 and kinds[src] == "gru" and bands[src] == F
            kw.update(A=A, dense=P == 100.0, sparse_input=sparse)
        elif kind == "bigru":
            size_in, size_out, width = spec["in"], 2 * spec["hidden"], F * 2 * spec["hidden"]
        elif kind == "layernorm":
            size_in = size_out = spec["size"]
            width = F * spec["size"]
            kw["eps"] = float(spec.get("eps", 1e-5))
        elif kind == "pad":
            size_in, size_out, width = spec["in"], spec["out"], spec["out"]
        elif kind == "slice":
            size_in, size_out = in_w[0], spec["stop"] - spec["start"]
            width = size_out
            kw.update(start=spec["start"], stop=spec["stop"])
        elif kind == "concat":
            size_in, size_out = in_w[0], sum(in_w)
            width = size_out
        elif kind == "add":
            size_in = size_out = width = in_w[0]
        else:
            raise ParameterError(f"architecture layer {name}: kind {kind!r} has no plan (not one of linear, gru, bigru, layernorm, {', '.join(_GLUE)})")
        frees = tuple(x for x in dict.fromkeys(ins) if last.get(x) == i)
        steps.append(Step(name=name, kind=kind, inputs=tuple(ins), slots=tuple(names.index(x) for x in ins), slot=i + 1,
                          bands=F, size_in=size_in, size_out=size_out, width=width, tensors=_tensor_names(spec), frees=frees, **kw))
        widths[name], kinds[name], bands[name], A_of[name] = width, kind, F, kw.get("A")
    return Plan(architecture=architecture, n_features=architecture["n_features"], update_percent=P, steps=steps)


# --------------------------------------------------------------------------------------------
# the architecture dict itself: what each kind needs, its output width, its tensors, its check
# (weights.py reads and writes files and checks tensors; what a kind means is decided here)
# --------------------------------------------------------------------------------------------


def _fail(path, msg):
    raise WeightsError(f"{path}: {msg}" if path else msg)


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


