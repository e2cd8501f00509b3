"""The cpu backend: Numba kernels (float32), one module per concern.

``kernels``  the jitted GRU / D-GRU / linear / layer-norm kernels (private, trusting)
``layers``   the validated layers (``GRULayer``, ``Linear``, ``LayerNorm``), the executor and
             its runners (``RUNNERS``, one per layer kind)
``frame``    ``FrameProgram``: one frame of B streams through every step in one jitted call
``hop``      the elementwise STFT steps of a streaming hop (NumPy's rounding, no FMA)

Argument checks shared with the cuda backend live in ``npdgru.kernels.checks``.
"""

from ..checks import DEFAULT_REFRESH
from .frame import FRAME_STEPS, FrameProgram
from .hop import hop_apply_mask, hop_features, hop_frames, hop_overlap_add, hop_power
from .layers import RUNNERS, Executor, GRULayer, GRUState, LayerNorm, Linear, delta_gru_sequence, dgru_sequence, gru_sequence, tgru_sequence

__all__ = ["GRULayer", "GRUState", "Linear", "LayerNorm", "Executor", "RUNNERS", "FrameProgram", "FRAME_STEPS", "gru_sequence", "dgru_sequence", "tgru_sequence", "delta_gru_sequence", "DEFAULT_REFRESH",
           "hop_frames", "hop_power", "hop_features", "hop_apply_mask", "hop_overlap_add"]
