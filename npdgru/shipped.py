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
}
ALIASES = {"default": DEFAULT_MODEL.removesuffix(".safetensors"), "dprnn": "dprnn-anyp", "mpt": "mpt-anyp"}


def weights_folder() -> Path:
    """The folder of the shipped weight files (installed as the package data npdgru._shipped)."""
    return default_weights_path().parent


def shipped_models() -> list[dict]:
    """``[{"name", "path", "description", "default"}]`` for every shipped weight file, by name."""
    default = DEFAULT_MODEL.removesuffix(".safetensors")
    out = []
    for p in sorted(weights_folder().glob("*.safetensors")):
        name = p.name.removesuffix(".safetensors")
        out.append({"name": name, "path": p, "description": DESCRIPTIONS.get(name, ""), "default": name == default})
    return out


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
