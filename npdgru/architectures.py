"""The three model architectures of the paper, as npdgru architecture dicts (``weights.py``).

Every model maps 161 log-power bins of a 20 ms frame (10 ms hop, 16 kHz) to a mask on the noisy
STFT, and every recurrence along time is a D-GRU, so each runs at any update percentage P.

* ``nsnet2`` — the GRU model (``docs/design.md``): FC 400 -> D-GRU 400 -> D-GRU 400 -> FC 600 ->
  FC 600 -> FC 161 + sigmoid. 2.68 MMACs/frame dense.
* ``dprnn`` — a dual-path RNN on STFT features (after Luo et al., 2020, as used for enhancement
  in the time-frequency domain). The 161 bins are zero-padded to 164 and cut into F = 41 bands of
  4 bins; a per-band linear embedding (4 -> 32) and LayerNorm give a (41 bands x 32) map per frame.
  Two dual-path blocks follow, each:

      intra-frame: BiGRU across the 41 bands (2 x 16, dense; it is not a recurrence in time)
                   -> per-band linear 32 -> 32 -> LayerNorm -> + residual
      inter-frame: D-GRU along time per band (32 -> 64, the 41 bands share weights)
                   -> per-band linear 64 -> 32 -> LayerNorm -> + residual

  then a per-band linear 32 -> 4 + sigmoid and the first 161 entries are the mask.
  2.15 MMACs/frame dense, 54,116 parameters. The intra path stays dense as the issue asks: it has
  no state along time to keep, so the select gate has nothing to skip there.
* ``mpt`` — **our reconstruction** of the paper's MPT, whose configuration is not published: a
  multi-path temporal model. Four sub-band paths (bins 0-39, 40-79, 80-119, 120-160: each a
  linear 40/41 -> 64 + ReLU and a D-GRU 64 -> 160) and one full-band path (linear 161 -> 128 +
  ReLU and a D-GRU 128 -> 256) run along time side by side; their states are concatenated
  (896) and fused by linear 896 -> 300 + ReLU and 300 -> 161 + sigmoid into the mask.
  1.07 MMACs/frame dense, 68 % of it in the D-GRUs (so the select gate has the most to save).

Sizes were chosen for a real-time CPU budget of the same order as NSNet2 (the project's aim), not
tuned; ``npdgru info`` prints each layer and ``MaskModel.macs_per_frame`` the counts.
"""

from __future__ import annotations

import copy

from .errors import ParameterError

N_BINS = 161

__all__ = ["ARCHITECTURES", "NSNET2_ARCHITECTURE", "architecture", "dprnn", "mpt", "tiny_weights"]

# NSNet2 as Microsoft's ONNX model has it (``convert/onnx_nsnet2.py`` checks a file against it)
NSNET2_ARCHITECTURE = {
    "name": "nsnet2",
    "n_features": N_BINS,
    "layers": [
        {"kind": "linear", "name": "fc1", "in": 161, "out": 400, "activation": "relu"},
        {"kind": "gru", "name": "gru1", "in": 400, "hidden": 400},
        {"kind": "gru", "name": "gru2", "in": 400, "hidden": 400},
        {"kind": "linear", "name": "fc2", "in": 400, "out": 600, "activation": "relu"},
        {"kind": "linear", "name": "fc3", "in": 600, "out": 600, "activation": "relu"},
        {"kind": "linear", "name": "fc4", "in": 600, "out": 161, "activation": "sigmoid"},
    ],
}


def dprnn(*, bands: int = 41, bins_per_band: int = 4, channels: int = 32, intra_hidden: int = 16, inter_hidden: int = 64, blocks: int = 2) -> dict:
    """The DPRNN architecture dict (defaults: the shipped model)."""
    F, G, C = bands, bins_per_band, channels
    if F * G < N_BINS:
        raise ParameterError(f"{F} bands x {G} bins do not cover {N_BINS} bins")
    layers = [
        {"kind": "pad", "name": "pad", "in": N_BINS, "out": F * G},
        {"kind": "linear", "name": "enc", "in": G, "out": C, "bands": F},
        {"kind": "layernorm", "name": "enc_norm", "size": C, "bands": F},
    ]
    x = "enc_norm"
    for b in range(1, blocks + 1):
        layers += [
            {"kind": "bigru", "name": f"intra{b}", "in": C, "hidden": intra_hidden, "bands": F, "inputs": [x]},
            {"kind": "linear", "name": f"intra{b}_fc", "in": 2 * intra_hidden, "out": C, "bands": F},
            {"kind": "layernorm", "name": f"intra{b}_norm", "size": C, "bands": F},
            {"kind": "add", "name": f"intra{b}_res", "inputs": [x, f"intra{b}_norm"]},
            {"kind": "gru", "name": f"inter{b}", "in": C, "hidden": inter_hidden, "bands": F},
            {"kind": "linear", "name": f"inter{b}_fc", "in": inter_hidden, "out": C, "bands": F},
            {"kind": "layernorm", "name": f"inter{b}_norm", "size": C, "bands": F},
            {"kind": "add", "name": f"inter{b}_res", "inputs": [f"intra{b}_res", f"inter{b}_norm"]},
        ]
        x = f"inter{b}_res"
    layers += [
        {"kind": "linear", "name": "dec", "in": C, "out": G, "bands": F, "activation": "sigmoid", "inputs": [x]},
        {"kind": "slice", "name": "mask", "start": 0, "stop": N_BINS},
    ]
    return {"name": "dprnn", "n_features": N_BINS, "layers": layers}


def mpt(*, edges=(0, 40, 80, 120, N_BINS), sub_embed: int = 64, sub_hidden: int = 160, full_embed: int = 128, full_hidden: int = 256, fusion: int = 300) -> dict:
    """Our MPT reconstruction (defaults: the shipped model): sub-band paths between ``edges``
    plus a full-band path, fused into the mask."""
    layers = []
    states = []
    for k, (a, b) in enumerate(zip(edges[:-1], edges[1:]), start=1):
        layers += [
            {"kind": "slice", "name": f"sb{k}_bins", "start": a, "stop": b, "inputs": ["features"]},
            {"kind": "linear", "name": f"sb{k}_fc", "in": b - a, "out": sub_embed, "activation": "relu"},
            {"kind": "gru", "name": f"sb{k}_gru", "in": sub_embed, "hidden": sub_hidden},
        ]
        states.append(f"sb{k}_gru")
    layers += [
        {"kind": "linear", "name": "fb_fc", "in": N_BINS, "out": full_embed, "activation": "relu", "inputs": ["features"]},
        {"kind": "gru", "name": "fb_gru", "in": full_embed, "hidden": full_hidden},
        {"kind": "concat", "name": "paths", "inputs": states + ["fb_gru"]},
        {"kind": "linear", "name": "fuse", "in": len(states) * sub_hidden + full_hidden, "out": fusion, "activation": "relu"},
        {"kind": "linear", "name": "out", "in": fusion, "out": N_BINS, "activation": "sigmoid"},
    ]
    return {"name": "mpt", "n_features": N_BINS, "layers": layers}


def _nsnet2() -> dict:
    return copy.deepcopy(NSNET2_ARCHITECTURE)


ARCHITECTURES = {"nsnet2": _nsnet2, "dprnn": dprnn, "mpt": mpt}


def architecture(name: str) -> dict:
    """A fresh copy of a named architecture: 'nsnet2', 'dprnn' or 'mpt'."""
    if name not in ARCHITECTURES:
        raise ParameterError(f"architecture {name!r} is not one of {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]()


def tiny_weights(seed: int = 0, hidden: int = 8):
    """A random model of the NSNet2 topology (FC 16 -> D-GRU H -> D-GRU H -> FC 161), small enough
    for numba's CUDA simulator: for tests and smoke runs, not for enhancement.

    Weights are uniform in ±1/sqrt(fan-in); fc1 is scaled by 0.3 because log-power features are
    O(10) and would saturate it.
    """
    import numpy as np

    from .weights import Weights, expected_shapes, validate_architecture

    arch = {"name": "tiny", "n_features": N_BINS, "layers": [
        {"kind": "linear", "name": "fc1", "in": N_BINS, "out": 16, "activation": "relu"},
        {"kind": "gru", "name": "gru1", "in": 16, "hidden": hidden},
        {"kind": "gru", "name": "gru2", "in": hidden, "hidden": hidden},
        {"kind": "linear", "name": "fc2", "in": hidden, "out": N_BINS, "activation": "sigmoid"},
    ]}
    validate_architecture(arch)
    rng = np.random.default_rng(seed)
    t = {k: (rng.uniform(-1.0, 1.0, s) / np.sqrt(s[-1])).astype(np.float32) for k, s in expected_shapes(arch).items()}
    t["fc1.weight"] *= np.float32(0.3)
    return Weights(architecture=arch, tensors=t)
