"""Converters from foreign checkpoints to npdgru weight files.

``onnx_nsnet2``       the public NSNet2 ONNX model (needs the ``onnx`` package)
``torch_checkpoint``  PyTorch .pt/.pth/.ckpt (zip and legacy) and .safetensors, without torch
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_nsnet2_onnx(onnx_path, out_path) -> None:
    """Convert the NSNet2 ONNX model into an npdgru weight file (atomic write)."""
    from ..weights import save_weights
    from .onnx_nsnet2 import NSNET2_LICENSE, NSNET2_SOURCE, read_nsnet2_onnx

    arch, tensors = read_nsnet2_onnx(onnx_path)
    save_weights(
        out_path, tensors, architecture=arch, trained_update_percent=100.0, source=NSNET2_SOURCE, license=NSNET2_LICENSE,
        extra={"converted_from": os.path.basename(os.fspath(onnx_path)), "source_sha256": sha256_of(onnx_path), "mask_floor_db": "-80"},
    )


# Default names of a PyTorch NSNet2 module (the module the public ONNX file was exported from:
# fc_in = Sequential(Linear(161, 400), ReLU), rnn = GRU(400, 400, num_layers=2),
# fc_out = Sequential(Linear(400, 600), ReLU, Linear(600, 600), ReLU, Linear(600, 161), Sigmoid)).
# Checkpoint name -> npdgru name; no tensor is transposed or reordered: torch.nn.GRU already uses
# our layout (weight_ih (3H, I), gate order r, z, n) and nn.Linear our (out, in).
NSNET2_TORCH_NAMES = {
    "fc_in.0.weight": "fc1.weight", "fc_in.0.bias": "fc1.bias",
    "rnn.weight_ih_l0": "gru1.weight_ih", "rnn.weight_hh_l0": "gru1.weight_hh",
    "rnn.bias_ih_l0": "gru1.bias_ih", "rnn.bias_hh_l0": "gru1.bias_hh",
    "rnn.weight_ih_l1": "gru2.weight_ih", "rnn.weight_hh_l1": "gru2.weight_hh",
    "rnn.bias_ih_l1": "gru2.bias_ih", "rnn.bias_hh_l1": "gru2.bias_hh",
    "fc_out.0.weight": "fc2.weight", "fc_out.0.bias": "fc2.bias",
    "fc_out.2.weight": "fc3.weight", "fc_out.2.bias": "fc3.bias",
    "fc_out.4.weight": "fc4.weight", "fc_out.4.bias": "fc4.bias",
}


def architecture_argument(arch):
    """--arch of `npdgru convert` and `npdgru train`: a built-in name ('nsnet2', 'dprnn', 'mpt') or a JSON file holding an architecture dict."""
    import json

    from ..errors import CheckpointError
    from ..weights import WeightsError, validate_architecture

    from ..architectures import ARCHITECTURES, architecture

    if arch in ARCHITECTURES:
        return architecture(arch)
    if os.path.isfile(str(arch)):
        try:
            with open(arch) as f:
                spec = json.load(f)
            return validate_architecture(spec, arch)
        except (OSError, json.JSONDecodeError, WeightsError) as e:
            raise CheckpointError(f"{arch}: not a usable architecture file ({e})") from None
    raise CheckpointError(f"--arch {arch!r}: use one of {tuple(ARCHITECTURES)} or a JSON file with an architecture")


def _load_mapping(mapping):
    import json

    from ..errors import CheckpointError

    if mapping is None:
        return dict(NSNET2_TORCH_NAMES)
    if isinstance(mapping, dict):
        return dict(mapping)
    try:
        with open(mapping) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mapping}: cannot read the name map ({e})") from None
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise CheckpointError(f"{mapping}: the name map must be a JSON object of strings {{\"checkpoint.name\": \"npdgru.name\"}}")
    return m


def map_state_dict(state: dict, arch: dict, mapping: dict, path) -> dict:
    """Rename checkpoint tensors to npdgru names; refuse layer kinds we cannot run, by name.

    A name already in npdgru form passes unchanged. Missing, unexpected and mis-shaped tensors
    are all listed in one CheckpointError.
    """
    from ..errors import CheckpointError
    from ..weights import WeightsError, check_tensors, expected_shapes

    import re

    refused, lstm = [], []
    want = expected_shapes(arch)
    for k, a in state.items():
        low = k.lower()
        name = mapping.get(k, k)
        if name in want:  # a tensor the architecture asks for (e.g. a bigru's _reverse) ...
            rows = want[name][0] if want[name] else 0
            # ... but under GRU names an LSTM's tensors have 4 gate blocks where a GRU has 3
            if re.search(r"(weight|bias)_(ih|hh)(_reverse)?$", name) and np.ndim(a) >= 1 and rows % 3 == 0 and np.shape(a)[0] == 4 * (rows // 3) != rows:
                lstm.append(k)
            continue
        if "lstm" in low or ("weight_hh" in low and np.ndim(a) == 2 and np.shape(a)[0] == 4 * np.shape(a)[1]):
            lstm.append(k)
        elif "_reverse" in low:
            refused.append(f"{k}: bidirectional GRU/LSTM (reverse direction) cannot run causally")
    if lstm:  # one line: the kind is the problem, not each tensor's shape
        lstm.sort(key=lambda k: ("weight" not in k, k))
        more = f" and {len(lstm) - 2} more" if len(lstm) > 2 else ""
        raise CheckpointError(f"{path}: an LSTM (4 gate blocks in {', '.join(lstm[:2])}{more}); npdgru converts GRU layers only")
    if refused:
        raise CheckpointError(f"{path}: unsupported layers:\n  " + "\n  ".join(refused))
    out = {}
    for k, a in state.items():
        name = mapping.get(k, k)
        if name in out:
            raise CheckpointError(f"{path}: two checkpoint tensors map to {name}")
        out[name] = a
    try:
        check_tensors(arch, out, path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    return {k: out[k] for k in want}


def convert_checkpoint(checkpoint, out_path, *, arch="nsnet2", mapping=None, trained_update_percent=100.0, source=None, license=None, metadata=None, gate=None) -> list[str]:
    """Convert a checkpoint file into an npdgru weight file; returns the reader's notes.

    ``gate`` (``kinds.gate_fields``, e.g. ``{"gate": "delta", "theta": 0.03}``; {} is top-A) puts
    that gate on every D-GRU layer along time of the architecture in place of any it had
    (``kinds.with_gate``; docs/design.md): a model trained with top-A then runs with another
    gate, untrained for it. None keeps the architecture's gates.

    ``trained_update_percent`` (a number, or ``"any"`` for a model trained at P drawn per batch),
    ``source``, ``license`` and ``metadata`` (more string pairs) go into the file's metadata.
    ``.onnx`` files go through the NSNet2 ONNX reader; everything else (PyTorch zip or legacy
    pickles, safetensors) through the allow-list reader of :mod:`.torch_checkpoint`, which never
    imports torch nor runs pickled code.
    """
    from ..errors import CheckpointError
    from ..weights import save_weights

    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    if checkpoint.lower().endswith(".onnx"):
        convert_nsnet2_onnx(checkpoint, out_path)
        return ["read the NSNet2 ONNX graph (gate order z,r,h -> r,z,n; MatMul weights transposed)"]
    from .torch_checkpoint import read_checkpoint

    spec = architecture_argument(arch)
    if gate is not None:
        from ..kinds import with_gate
        from ..weights import WeightsError, validate_architecture

        try:
            spec = validate_architecture(with_gate(spec, gate), f"--gate {gate.get('gate', 'top-a')}")
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
    state, notes = read_checkpoint(checkpoint)
    tensors = map_state_dict(state, spec, _load_mapping(mapping), checkpoint)
    extra = {"converted_from": os.path.basename(checkpoint), "source_sha256": sha256_of(checkpoint), "notes": "; ".join(notes)}
    if gate is not None:
        extra["gate_applied_by_convert"] = ", ".join(f"{k}={v}" for k, v in gate.items()) or "gate=top-a"
    extra.update({str(k): str(v) for k, v in (metadata or {}).items()})
    save_weights(
        out_path, tensors, architecture=spec, trained_update_percent=trained_update_percent,
        source=source or f"converted from {os.path.basename(checkpoint)} by npdgru convert",
        license=license or "as the source checkpoint", extra=extra,
    )
    return notes
