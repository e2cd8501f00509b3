"""The architecture resolved once into steps: what each layer reads, computes and carries.

A weight file's architecture (``weights.py`` checks it) is a list of layers; the plan turns it,
once, into :class:`Step` records that every consumer walks without interpreting the JSON again:

* the executors of every backend (``kernels/``) run the steps in order;
* the PyTorch twin ``train.torch_model.GraphNet`` walks the same steps;
* the work counters (:meth:`Plan.macs`, :meth:`Plan.weight_bytes`) are computed here and nowhere
  else.

A step knows its kind, its inputs (earlier steps or "features", as buffer slots), its bands F,
its buffer widths, for a D-GRU layer the number A of neurons updated per step (resolved here, once,
from P), whether its input product runs from the changed columns of a previous D-GRU state
(``sparse_input``, with that state's A), and the tensors it
reads. What a kind means lives in its class in ``kinds.py``; this module only loops over that
table: it checks an architecture dict (:func:`validate_architecture`), names the tensors it needs
(:func:`expected_shapes`), describes a layer for ``npdgru info`` and resolves the steps.
``weights.py`` keeps the file I/O and the tensor checks.

    >>> from npdgru.architectures import architecture
    >>> p = make_plan(architecture("nsnet2"), update_percent=50)
    >>> [s.kind for s in p.steps], p.steps[1].A
    (['linear', 'gru', 'gru', 'linear', 'linear', 'linear'], 200)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import ParameterError, WeightsError
from .kinds import ACTIVATIONS, KINDS, KINDS_V1, check_percent  # noqa: F401 (ACTIVATIONS: importable from weights.py)

__all__ = ["Step", "Plan", "make_plan", "FEATURES", "validate_architecture", "expected_shapes", "describe_layer", "layer_inputs", "LAYER_KINDS"]

FEATURES = "features"
LAYER_KINDS = tuple(KINDS)
LAYER_KINDS_V1 = KINDS_V1
KINDS_WITH_STATE = tuple(n for n, k in KINDS.items() if k.carries_state)  # one state per step, carried along time


@dataclass(frozen=True)
class Step:
    """One layer of the plan.

    name, kind   the layer's name and kind (a key of :data:`npdgru.kinds.KINDS`)
    inputs       names read ("features" or earlier steps), in order; ``slots`` the same as indices
                 into the executor's value list (0 = features, k + 1 = step k)
    slot         where this step's output lives (its index + 1)
    in_widths    widths of the inputs (entries per frame and stream)
    bands        F: the step runs the same weights on F bands of its input
    size_in      per-band input size (linear, gru, bigru, pad), C for layernorm, the input width else
    size_out     per-band output size: out (linear), hidden (gru), 2·hidden (bigru), size (norm)
    width        entries of the output per frame and stream (F · size_out, or the glue's width)
    hidden       H of a gru or bigru step (0 otherwise)
    A            D-GRU steps: neurons updated per step (= hidden at P = 100); None otherwise
    dense        gru steps: P = 100, the dense GRU kernel runs (no accumulators)
    sparse_input gru steps: the input product is kept from the changed columns of the input (the
                 state of a previous D-GRU step with the same bands, which changes A_in entries)
    gate         gru steps: "top-a" (A neurons per step, from P), "threshold" (u > theta) or
                 "delta" (changes larger than theta, the input's larger than theta_x); the
                 variable gates carry A = hidden, the bound of their work (``kinds.GRU``)
    theta, theta_x   the threshold(s) of a threshold or delta step (0.0 otherwise)
    state_index  the step's state among the plan's carried states (-1: it carries none)
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
    in_widths: tuple = ()
    hidden: int = 0
    A: int | None = None
    A_in: int | None = None
    dense: bool = True
    sparse_input: bool = False
    gate: str = "top-a"
    theta: float = 0.0
    theta_x: float = 0.0
    state_index: int = -1
    activation: str = "none"
    eps: float = 1e-5
    start: int = 0
    stop: int = 0
    tensors: tuple = ()
    frees: tuple = ()

    @property
    def carries_state(self) -> bool:
        return self.state_index >= 0


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
        """Fraction of D-GRU neurons updated per step (A/H averaged over steps, weighted by H·bands);
        a threshold or delta step counts its bound A = H (its work varies per frame)."""
        g = self.state_steps
        return sum(s.A * s.bands for s in g) / max(1, sum(s.hidden * s.bands for s in g))

    def macs(self, measured: dict | None = None) -> dict:
        """MACs per frame of one stream as the plan runs: D-GRU steps (dense / paper / ours) and the rest.

        *ours* counts a step's input product from A columns only when it runs that way
        (``sparse_input``, fed by a D-GRU step); otherwise it is dense, 3H·I. A step with F bands
        counts F times. The dense bidirectional GRUs across frequency (DPRNN) are in *other*, with
        the linear layers; normalisation and shape glue are not counted. A threshold or delta step
        counts the dense bound (its work varies per frame; a run measures it) unless ``measured``
        gives its mean work: step name -> (state columns, input columns or None) per frame and
        band (``MaskModel.work_per_frame``), rounded to whole columns.
        """
        total = {"gru_dense": 0, "gru_paper": 0, "gru_ours": 0, "other": 0}
        for counts in self.step_macs(measured).values():
            for k, v in counts.items():
                total[k] += v
        return total

    def step_macs(self, measured: dict | None = None) -> dict:
        """MACs per frame of one stream of each step, name -> the counters of :meth:`macs` that
        the step adds to (a step that is not counted gives {}); :meth:`macs` is their sum."""
        measured = measured or {}
        out = {}
        for s in self.steps:
            if s.name in measured:
                a, a_in = measured[s.name]
                s = replace(s, A=int(round(float(a))), A_in=None if a_in is None else int(round(float(a_in))))
            out[s.name] = KINDS[s.kind].macs(s)
        return out

    def weight_bytes(self) -> dict:
        """Bytes of float32 weights one streaming hop (one frame of one stream) reads.

        ``dense``: every weight once. ``ours``: a D-GRU step reads its recurrent columns of the
        changed entries only (at most min(H, F·A) columns of 3H floats, the bands sharing the
        weights) and, with ``sparse_input``, its input columns likewise; everything else is read
        whole. An upper bound on distinct bytes (the bands of one frame may pick the same columns).
        """
        dense = ours = 0
        for s in self.steps:
            d, o = KINDS[s.kind].weight_bytes(s)
            dense, ours = dense + d, ours + o
        return {"dense": dense, "ours": ours}

    def as_data(self) -> dict:
        """The plan as plain data (dicts, lists, numbers, strings): what :func:`npdgru.reference.forward` walks."""
        return {"n_features": self.n_features, "update_percent": self.update_percent, "steps": [asdict(s) for s in self.steps]}


def make_plan(architecture: dict, *, update_percent: float = 100.0, sparse_inputs: bool = False) -> Plan:
    """Resolve a (validated) architecture into a :class:`Plan` at update percentage P.

    ``sparse_inputs``: a D-GRU step whose input is the state of another D-GRU step with the same
    bands keeps its input product from the changed columns (only when P < 100).
    """
    P = check_percent(update_percent)  # the one check of P on the way to the kernels
    layers = architecture["layers"]
    names = [FEATURES] + [s["name"] for s in layers]
    widths = {FEATURES: architecture["n_features"]}
    by_name = {}
    ins_all = [layer_inputs(layers, i) for i in range(len(layers))]
    last = {}
    for i, ins in enumerate(ins_all):
        for x in ins:
            last[x] = i
    steps = []
    n_state = 0
    for i, spec in enumerate(layers):
        name = spec["name"]
        kind = KINDS.get(spec["kind"])
        if kind is None:
            raise ParameterError(f"architecture layer {name}: kind {spec['kind']!r} has no plan (not one of {', '.join(KINDS)})")
        ins = ins_all[i]
        in_w = tuple(widths[x] for x in ins)
        fields = kind.resolve(spec, in_w, P, by_name.get(ins[0]), sparse_inputs)
        if kind.carries_state:
            fields["state_index"], n_state = n_state, n_state + 1
        frees = tuple(x for x in dict.fromkeys(ins) if last.get(x) == i)
        step = Step(name=name, kind=spec["kind"], inputs=tuple(ins), slots=tuple(names.index(x) for x in ins), slot=i + 1, in_widths=in_w,
                    bands=spec.get("bands", 1), width=kind.width(spec, in_w), tensors=tuple(kind.shapes(spec)), frees=frees, **fields)
        steps.append(step)
        widths[name], by_name[name] = step.width, step
    return Plan(architecture=architecture, n_features=architecture["n_features"], update_percent=P, steps=steps)


# --------------------------------------------------------------------------------------------
# the architecture dict itself, checked and described kind by kind (weights.py reads and writes
# files and checks tensors; what a kind means is decided in kinds.py)
# --------------------------------------------------------------------------------------------


def _fail(path, msg):
    raise WeightsError(f"{path}: {msg}" if path else msg)


def describe_layer(layer) -> str:
    """One line per layer for ``npdgru info``: kind, sizes, bands and inputs."""
    desc = KINDS[layer["kind"]].describe(layer)
    F = layer.get("bands", 1)
    if F > 1:
        desc += f", {F} bands"
    if "inputs" in layer:
        desc += f"  <- {', '.join(layer['inputs'])}"
    return desc


_V2_KEYS = ("inputs", "bands")  # fields a format-1 reader does not know


def layer_inputs(layers, i) -> list[str]:
    """Names a layer reads: its ``inputs``, else the previous layer ("features" for the first)."""
    spec = layers[i]
    if "inputs" in spec:
        return list(spec["inputs"])
    return [FEATURES if i == 0 else layers[i - 1]["name"]]


def layer_width(spec, in_widths) -> int:
    """Output width of a layer (entries per frame and stream), given its input widths."""
    return KINDS[spec["kind"]].width(spec, in_widths)


def format_version_of(arch) -> int:
    """1 for a plain chain of format-1 kinds (NSNet2's linear and GRU layers), 2 when a layer needs
    the graph fields (``inputs``, ``bands``), a kind's format-2 keys (a GRU's ``gate``) or a kind
    added with them: a format-1 reader then
    refuses the file as newer instead of misreading it."""
    for spec in arch["layers"]:
        if spec["kind"] not in KINDS_V1 or any(k in spec for k in _V2_KEYS + KINDS[spec["kind"]].v2_keys):
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
    widths = {FEATURES: nf}
    layers = arch["layers"]
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            _fail(path, f"architecture layer {i} is not a dict")
        name = layer.get("name")
        kind = KINDS.get(layer.get("kind")) if isinstance(layer.get("kind"), str) else None
        if kind is None:
            _fail(path, f"architecture layer {i} ({name}): kind {layer.get('kind')!r} is not one of {LAYER_KINDS}")
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in widths:
            _fail(path, f"architecture layer {i}: name {name!r} must be a unique identifier without dots (not 'features', not starting with '_')")
        for k in kind.keys + (("bands",) if "bands" in layer else ()):
            v = layer.get(k)
            low = 0 if k == "start" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                _fail(path, f"architecture layer {name}: '{k}'={v!r} must be an integer >= {low}")
        if "bands" in layer and not kind.takes_bands:
            _fail(path, f"architecture layer {name}: kind {kind.name!r} takes no 'bands'")
        inputs = layer.get("inputs", None)
        if inputs is not None and (not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs)):
            _fail(path, f"architecture layer {name}: 'inputs' must be a non-empty list of layer names")
        inputs = layer_inputs(layers, i)
        for x in inputs:
            if x not in widths:
                _fail(path, f"architecture layer {name}: input {x!r} is not 'features' or an earlier layer")
        n_in = len(inputs)
        if kind.many_inputs and n_in < 2:
            _fail(path, f"architecture layer {name}: {kind.name} needs at least two inputs")
        if not kind.many_inputs and n_in != 1:
            _fail(path, f"architecture layer {name}: {kind.name} takes one input, got {n_in}")
        in_w = [widths[x] for x in inputs]
        problem = kind.check(layer, in_w, inputs[0])
        if problem:
            _fail(path, f"architecture layer {name}: {problem}")
        widths[name] = kind.width(layer, in_w)
    width = widths[layers[-1]["name"]]
    if width != nf:
        _fail(path, f"architecture output width {width} must equal n_features={nf} (a mask per bin)")
    return arch


def expected_shapes(arch) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, with its shape (PyTorch names and layouts)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in arch["layers"]:
        shapes.update(KINDS[layer["kind"]].shapes(layer))
    return shapes
