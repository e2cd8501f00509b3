"""Converters from foreign checkpoints to npdgru weight files.

``onnx_nsnet2``       the public NSNet2 ONNX model (needs the ``onnx`` package)
``torch_checkpoint``  PyTorch .pt/.pth/.ckpt (zip and legacy) and .safetensors, without torch
"""

from __future__ import annotations

import hashlib
import os


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
