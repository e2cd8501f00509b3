"""What a layer kind is: one class per kind, in one table (:data:`KINDS`).

A weight file's architecture is a list of layers, each a dict with a ``kind`` (``weights.py``
reads and writes it). A kind object owns everything that gives such a dict its meaning:

* its schema: the integer size keys it needs, whether it takes ``bands`` and how many inputs, and
  its own checks (:meth:`Kind.check`, called by :func:`npdgru.plan.validate_architecture`);
* its output width (:meth:`Kind.width`), its tensors with their shapes (:meth:`Kind.shapes`), a
  line for ``npdgru info`` (:meth:`Kind.describe`);
* how it resolves at an update percentage P into the fields of a plan step (:meth:`Kind.resolve`:
  sizes, A, dense, sparse input), and its MACs and weight bytes per frame (:meth:`Kind.macs`,
  :meth:`Kind.weight_bytes`).

The plan (``plan.py``) loops over this table; every backend registers one runner per kind
(``RUNNERS[kind]`` in ``kernels/``, ``TORCH_RUNNERS`` in ``train/torch_model.py``, ``_STEPS`` in
``reference.py``), and ``tests/test_plan.py`` checks that none lacks one. Adding a kind is one
class here plus one runner per backend.

Sizes are per band: a layer with ``bands`` = F runs the same weights on F bands of its input.
"""

from __future__ import annotations

from . import reference
from .errors import ParameterError

__all__ = ["Kind", "KINDS", "KINDS_V1", "ACTIVATIONS", "GATES", "VARIABLE_GATES", "num_selected", "check_percent"]

ACTIVATIONS = ("relu", "sigmoid", "tanh", "none")
GATES = reference.GATES  # a GRU layer's "gate": top-a (default), threshold, delta
VARIABLE_GATES = ("threshold", "delta")  # gates whose work per step varies (the plan counts the dense bound)


def check_percent(update_percent) -> float:
    """P as a float in (0, 100]; ParameterError otherwise ("50", None and True are refused, not cast)."""
    try:
        reference.num_selected(update_percent, 1)
    except ValueError:
        raise ParameterError(f"update_percent={update_percent!r} must be a number in (0, 100]") from None
    return float(update_percent)


def num_selected(update_percent, hidden_size) -> int:
    """:func:`npdgru.reference.num_selected` (A = ceil(P·H/100)) behind a ParameterError check."""
    try:
        return reference.num_selected(update_percent, hidden_size)
    except ValueError as e:
        raise ParameterError(str(e)) from None


class Kind:
    """A layer kind. Subclasses set the class attributes and override what differs.

    name          the ``kind`` string of the architecture dict
    keys          integer size keys the dict must have (each >= 1, ``start`` >= 0)
    takes_bands   whether ``bands`` is allowed
    many_inputs   whether it reads two or more inputs (else exactly one)
    v1            known to format-1 readers (a plain chain of these is format 1)
    v2_keys       optional keys of the layer dict that only format-2 readers know
    carries_state whether it carries state from frame to frame (one state per step)
    code          its index in :data:`KINDS` (the cpu frame program's kind code)
    """

    name = "?"
    keys: tuple = ()
    takes_bands = False
    many_inputs = False
    v1 = False
    carries_state = False
    code = -1
    v2_keys: tuple = ()  # optional keys a format-1 reader does not know (a layer with one is format 2)

    def check(self, layer, in_widths, source) -> str | None:
        """What is wrong with ``layer`` given its input widths (None if nothing); ``source`` names its first input."""
        return None

    def width(self, layer, in_widths) -> int:
        """Output width (entries per frame and stream)."""
        return in_widths[0]

    def shapes(self, layer) -> dict:
        """The tensors the layer reads, name -> shape, in the order its kernels take them."""
        return {}

    def describe(self, layer) -> str:
        return self.name.capitalize()

    def resolve(self, layer, in_widths, P, source, sparse_inputs) -> dict:
        """Fields of the plan step at update percentage P (``source``: the step of the first
        input, None for the features): size_in, size_out and what the kind adds."""
        return {"size_in": in_widths[0], "size_out": self.width(layer, in_widths)}

    def macs(self, step) -> dict:
        """MACs per frame of one stream, by counter (gru_dense, gru_paper, gru_ours, other)."""
        return {}

    def weight_bytes(self, step) -> tuple:
        """(dense, ours): bytes of float32 weights one frame of one stream reads."""
        return 0, 0


def gate_fields(gate: str = "top-a", theta=None, theta_x=None) -> dict:
    """--gate/--theta/--theta-x (of ``npdgru train`` and ``npdgru convert``) as the fields of a
    GRU layer ({} for top-a), checked by the kind; ParameterError names the options."""
    if gate == "top-a":
        if theta is not None or theta_x is not None:
            raise ParameterError("--theta and --theta-x go with --gate threshold or delta")
        return {}
    fields = {"gate": gate, "theta": theta}
    if theta_x is not None:
        fields["theta_x"] = theta_x
    problem = KINDS["gru"].check(dict(fields, name="gru", **{"in": 1, "hidden": 1}), [1], "features")
    if problem:
        raise ParameterError(f"--gate {gate} --theta {theta} --theta-x {theta_x}: {problem} ('theta' is --theta, 'theta_x' --theta-x)")
    return fields


def gate_label(layers) -> str | None:
    """The variable gates of an architecture's layer dicts with their thresholds, e.g.
    "threshold 0.2" or "delta 0.15" ("delta 0.15/0.05" where the input's differs); None when
    every D-GRU layer is top-A (the names of eval rows and of ``npdgru models``)."""
    labels = []
    for layer in layers:
        gate = layer.get("gate") if isinstance(layer, dict) else None
        if gate == "threshold":
            labels.append(f"threshold {layer['theta']:g}")
        elif gate == "delta":
            tx = layer.get("theta_x", layer["theta"])
            labels.append(f"delta {layer['theta']:g}" + ("" if tx == layer["theta"] else f"/{tx:g}"))
    return ", ".join(dict.fromkeys(labels)) or None


def with_gate(architecture: dict, fields: dict) -> dict:
    """A copy of ``architecture`` whose D-GRU layers along time carry the gate ``fields`` (from
    :func:`gate_fields`; {} is top-A) in place of any gate they had (the weights stay valid: a
    gate adds no tensor)."""
    def regated(layer):
        kind = KINDS[layer["kind"]]
        if not kind.carries_state:
            return dict(layer)
        return dict({k: v for k, v in layer.items() if k not in kind.v2_keys}, **fields)

    return dict(architecture, layers=[regated(layer) for layer in architecture["layers"]])


def _band_input_check(layer, in_widths, source):
    F = layer.get("bands", 1)
    if in_widths[0] != F * layer["in"]:
        band = f" ({F} bands x {layer['in']})" if F > 1 else ""
        return f"input size {F * layer['in']}{band} does not match the width {in_widths[0]} of {source}"
    return None


def _gru_shapes(name, I, H, suffixes):
    shapes = {}
    for s in suffixes:
        shapes.update({f"{name}.weight_ih{s}": (3 * H, I), f"{name}.weight_hh{s}": (3 * H, H), f"{name}.bias_ih{s}": (3 * H,), f"{name}.bias_hh{s}": (3 * H,)})
    return shapes


class Linear(Kind):
    """y = act(W x + b) per band."""

    name, keys, takes_bands, v1 = "linear", ("in", "out"), True, True

    def check(self, layer, in_widths, source):
        if layer.get("activation", "none") not in ACTIVATIONS:
            return _band_input_check(layer, in_widths, source) or f"activation {layer.get('activation')!r} is not one of {ACTIVATIONS}"
        return _band_input_check(layer, in_widths, source)

    def width(self, layer, in_widths):
        return layer.get("bands", 1) * layer["out"]

    def shapes(self, layer):
        n = layer["name"]
        return {f"{n}.weight": (layer["out"], layer["in"]), f"{n}.bias": (layer["out"],)}

    def describe(self, layer):
        return f"Linear {layer['in']} -> {layer['out']} + {layer.get('activation', 'none')}"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        return {"size_in": layer["in"], "size_out": layer["out"], "activation": layer.get("activation", "none")}

    def macs(self, s):
        return {"other": s.bands * s.size_in * s.size_out}

    def weight_bytes(self, s):
        b = 4 * (s.size_in * s.size_out + s.size_out)
        return b, b


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


class GRU(Kind):
    """A D-GRU along time (per band; the bands share weights).

    Its ``gate`` (``docs/design.md``) chooses which neurons change per frame:

    * ``"top-a"`` (default; a layer without the field): the A = ceil(P·H/100) largest u, P given
      at run time (``update_percent``);
    * ``"threshold"`` with ``theta`` θ in [0, 1): every neuron with u > θ (a count that varies);
    * ``"delta"`` with ``theta`` Θ >= 0 (and optionally ``theta_x``, the input's, default Θ): a
      delta network, only state and input changes larger than Θ propagate.

    The variable gates read their threshold from the architecture (trained with it) and not P;
    their plan step counts the dense bound (A = H) and a run measures the mean work.
    """

    name, keys, takes_bands, v1, carries_state = "gru", ("in", "hidden"), True, True, True
    v2_keys = ("gate", "theta", "theta_x")

    def check(self, layer, in_widths, source):
        problem = _band_input_check(layer, in_widths, source)
        if problem:
            return problem
        gate = layer.get("gate", "top-a")
        if gate not in GATES:
            return f"gate {gate!r} is not one of {GATES}"
        theta, theta_x = layer.get("theta"), layer.get("theta_x")
        if gate == "top-a":
            if theta is not None or theta_x is not None:
                return "the top-a gate takes no 'theta' or 'theta_x' (its count is P at run time)"
        elif gate == "threshold":
            if not (_number(theta) and 0.0 <= theta < 1.0):
                return f"the threshold gate needs 'theta' in [0, 1) (the u = 1 - z above it are updated), got {theta!r}"
            if theta_x is not None:
                return "the threshold gate takes no 'theta_x'"
        else:
            for k, v in (("theta", theta), ("theta_x", theta_x)):
                if (v is not None or k == "theta") and not (_number(v) and v >= 0.0):
                    return f"the delta gate needs '{k}' a number >= 0 (the smallest change propagated), got {v!r}"
        return None

    def width(self, layer, in_widths):
        return layer.get("bands", 1) * layer["hidden"]

    def shapes(self, layer):
        return _gru_shapes(layer["name"], layer["in"], layer["hidden"], ("",))

    def describe(self, layer):
        gate = layer.get("gate", "top-a")
        if gate == "threshold":
            how = f", threshold gate u > {layer['theta']:g}"
        elif gate == "delta":
            tx = layer.get("theta_x", layer["theta"])
            how = f", delta gate |change| > {layer['theta']:g} (input {tx:g})"
        else:
            how = ""
        return f"D-GRU {layer['in']} -> {layer['hidden']} (along time{how})"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        H, F = layer["hidden"], layer.get("bands", 1)
        gate = layer.get("gate", "top-a")
        if gate in VARIABLE_GATES:  # P is not read: the threshold is the architecture's; A = H is the bound
            theta = float(layer["theta"])
            theta_x = float(layer.get("theta_x", theta)) if gate == "delta" else 0.0
            return {"size_in": layer["in"], "size_out": H, "hidden": H, "A": H, "dense": False, "sparse_input": False,
                    "A_in": None, "gate": gate, "theta": theta, "theta_x": theta_x}
        # the input product runs from the changed columns when the input is the state of another
        # top-A D-GRU step with the same bands (only those change in few entries per frame)
        sparse = (bool(sparse_inputs) and P < 100.0 and source is not None and KINDS[source.kind].carries_state and source.bands == F
                  and source.gate == "top-a")
        return {"size_in": layer["in"], "size_out": H, "hidden": H, "A": num_selected(P, H), "dense": P == 100.0,
                "sparse_input": sparse, "A_in": source.A if sparse else None}

    def macs(self, s):
        F = s.bands
        m = reference.count_macs(s.size_in, s.hidden, A=s.A, input_changed=s.A_in)  # variable gates: A = H, the bound
        return {"gru_dense": F * m.dense, "gru_paper": F * m.paper, "gru_ours": F * m.sparse}

    def weight_bytes(self, s):
        H, I, F = s.hidden, s.size_in, s.bands
        rec = H if s.dense else min(H, F * s.A)
        inp = min(I, F * s.A_in) if s.sparse_input else I
        return 4 * (3 * H * (I + H) + 6 * H), 4 * (3 * H * (inp + rec) + 6 * H)


class BiGRU(Kind):
    """A dense bidirectional GRU across the F bands of each frame (h0 = 0 per frame: no state in time)."""

    name, keys, takes_bands = "bigru", ("in", "hidden"), True

    check = staticmethod(_band_input_check)

    def width(self, layer, in_widths):
        return layer.get("bands", 1) * 2 * layer["hidden"]

    def shapes(self, layer):
        return _gru_shapes(layer["name"], layer["in"], layer["hidden"], ("", "_reverse"))

    def describe(self, layer):
        return f"BiGRU {layer['in']} -> 2x{layer['hidden']} (across the bands of a frame, dense)"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        return {"size_in": layer["in"], "size_out": 2 * layer["hidden"], "hidden": layer["hidden"]}

    def macs(self, s):
        return {"other": s.bands * 2 * 3 * s.hidden * (s.size_in + s.hidden)}

    def weight_bytes(self, s):
        b = 4 * 2 * (3 * s.hidden * (s.size_in + s.hidden) + 6 * s.hidden)
        return b, b


class LayerNorm(Kind):
    """Normalisation of each band of each frame over its ``size`` entries (no statistics across time)."""

    name, keys, takes_bands = "layernorm", ("size",), True

    def check(self, layer, in_widths, source):
        F = layer.get("bands", 1)
        if in_widths[0] != F * layer["size"]:
            return f"{F} bands x size {layer['size']} does not match the width {in_widths[0]} of {source}"
        eps = layer.get("eps", 1e-5)
        if not (isinstance(eps, float) and 0.0 < eps < 1.0):
            return f"eps={layer.get('eps')!r} must be a float in (0, 1)"
        return None

    def width(self, layer, in_widths):
        return layer.get("bands", 1) * layer["size"]

    def shapes(self, layer):
        n = layer["name"]
        return {f"{n}.weight": (layer["size"],), f"{n}.bias": (layer["size"],)}

    def describe(self, layer):
        return f"LayerNorm {layer['size']}"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        return {"size_in": layer["size"], "size_out": layer["size"], "eps": float(layer.get("eps", 1e-5))}

    def weight_bytes(self, s):
        return 8 * s.size_in, 8 * s.size_in


class Pad(Kind):
    """Zeros appended to the input up to ``out`` entries."""

    name, keys = "pad", ("in", "out")

    def check(self, layer, in_widths, source):
        if layer["out"] < layer["in"]:
            return _band_input_check(layer, in_widths, source) or f"pad out={layer['out']} is smaller than in={layer['in']}"
        return _band_input_check(layer, in_widths, source)

    def width(self, layer, in_widths):
        return layer["out"]

    def describe(self, layer):
        return f"Pad {layer['in']} -> {layer['out']}"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        return {"size_in": layer["in"], "size_out": layer["out"]}


class Slice(Kind):
    """Entries ``start`` ... ``stop`` - 1 of the input."""

    name, keys = "slice", ("start", "stop")

    def check(self, layer, in_widths, source):
        if not layer["start"] < layer["stop"] <= in_widths[0]:
            return f"slice [{layer['start']}, {layer['stop']}) is not inside the width {in_widths[0]} of {source}"
        return None

    def width(self, layer, in_widths):
        return layer["stop"] - layer["start"]

    def describe(self, layer):
        return f"Slice [{layer['start']}:{layer['stop']}]"

    def resolve(self, layer, in_widths, P, source, sparse_inputs):
        return {"size_in": in_widths[0], "size_out": layer["stop"] - layer["start"], "start": layer["start"], "stop": layer["stop"]}


class Add(Kind):
    """The sum of two or more inputs of one width (residual connections)."""

    name, many_inputs = "add", True

    def check(self, layer, in_widths, source):
        if len(set(in_widths)) != 1:
            return f"add needs inputs of one width, got {list(in_widths)}"
        return None


class Concat(Kind):
    """The inputs one after the other."""

    name, many_inputs = "concat", True

    def width(self, layer, in_widths):
        return sum(in_widths)


KINDS = {k.name: k for k in (Linear(), GRU(), BiGRU(), LayerNorm(), Pad(), Slice(), Add(), Concat())}
for _code, _kind in enumerate(KINDS.values()):
    _kind.code = _code
KINDS_V1 = tuple(n for n, k in KINDS.items() if k.v1)
