"""The shipped models, by name: ``Enhancer(model="dprnn")``, ``npdgru enhance --model dprnn``.

A shipped model's name is its file name in ``weights/`` without ``.safetensors``
(``nsnet2-kd-anyp``, ``dprnn-anyp``, ...); the short aliases below name the usual choice of each
architecture. ``npdgru models`` prints :func:`shipped_models`.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ParameterError
from .weights import DEFAULT_MODEL, default_weights_path

# one line per shipped file (weights/README.md is the model card with the details)
DESCRIPTIONS = {
    "nsnet2-kd-anyp": "NSNet2 distilled from the original with the D-GRU select gate, for any P (the default)",
    "nsnet2": "NSNet2, the original DNS Challenge weights (trained dense)",
    "dprnn-anyp": "DPRNN (dual-path, 41 bands), distilled from NSNet2, for any P",
    "mpt-anyp": "MPT, our reconstruction (4 sub-band + 1 full-band D-GRU paths), distilled from NSNet2, for any P",
    "nsnet2-kd-delta": "the default's weights run as a delta network (DeltaGRU): only state and input changes above 0.15 propagate",
}
# The P each shipped model runs at unless told otherwise, from the quality table (docs/quality.md):
# the any-P models lose at most 0.03 PESQ at P = 50 against their own P = 100 and do half the
# recurrent work; the original NSNet2, trained dense, loses 0.21 there and runs dense.
DEFAULT_PERCENT = {"nsnet2-kd-anyp": 50.0, "dprnn-anyp": 50.0, "mpt-anyp": 50.0, "nsnet2": 100.0}
ALIASES = {"default": DEFAULT_MODEL.removesuffix(".safetensors"), "dprnn": "dprnn-anyp", "mpt": "mpt-anyp", "delta": "nsnet2-kd-delta"}


def weights_folder() -> Path:
    """The folder of the shipped weight files (installed as the package data npdgru._shipped)."""
    return default_weights_path().parent


def shipped_models() -> list[dict]:
    """``[{"name", "path", "description", "default", "update_percent", "gate"}]`` for every shipped weight file, by name.

    ``update_percent`` is the P the model runs at when none is given (:func:`default_update_percent`);
    ``gate`` names the threshold or delta gates of a model whose D-GRU layers have one (they do
    not read P), else None.
    """
    default = DEFAULT_MODEL.removesuffix(".safetensors")
    out = []
    for p in sorted(weights_folder().glob("*.safetensors")):
        name = p.name.removesuffix(".safetensors")
        out.append({"name": name, "path": p, "description": DESCRIPTIONS.get(name, ""), "default": name == default,
                    "update_percent": DEFAULT_PERCENT.get(name, 100.0), "gate": _variable_gates(p)})
    return out


def _variable_gates(path) -> str | None:
    """``kinds.gate_label`` of the file's architecture, read from its header only."""
    import json

    from safetensors import safe_open

    from .kinds import gate_label

    try:
        with safe_open(str(path), "np") as f:
            layers = json.loads((f.metadata() or {}).get("architecture", "{}")).get("layers", [])
        return gate_label(layers)
    except Exception:  # an unreadable file is reported when it is loaded, not here
        return None


def model_path(name) -> Path:
    """The file of the shipped model ``name`` (a file stem or an alias); ParameterError lists the names."""
    if not isinstance(name, str):
        raise ParameterError(f"model={name!r} must be the name of a shipped model (a string)")
    models = {m["name"]: m["path"] for m in shipped_models()}
    key = ALIASES.get(name, name) if name not in models else name
    if key not in models:
        known = ", ".join(list(models) + [a for a in ALIASES if ALIASES[a] in models])
        raise ParameterError(f"model {name!r} is not a shipped model (known: {known}); pass a weight file with --weights / weights=")
    return models[key]


def default_update_percent(weights) -> float:
    """The P a model runs at when the caller gives none.

    The weight file's own ``default_update_percent`` metadata if it has one; else, for a shipped
    file, its entry of ``DEFAULT_PERCENT``; else 100 (dense: a user's file that says nothing is
    run as it was most likely trained).
    """
    recorded = weights.default_update_percent
    if recorded is not None:
        return recorded
    path = getattr(weights, "path", None)
    if path is not None:
        p = Path(path)
        name = p.name.removesuffix(".safetensors")
        try:
            shipped = p.resolve().parent == weights_folder().resolve()
        except OSError:
            shipped = False
        if shipped and name in DEFAULT_PERCENT:
            return DEFAULT_PERCENT[name]
    return 100.0
