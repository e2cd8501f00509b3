"""Errors a person can act on.

Every public entry point validates its arguments and raises one of these, with a message that
names the offending value or file and, where there is one, the fix. Jitted kernels never raise:
they are called only after validation.
"""

from __future__ import annotations


class NpdgruError(Exception):
    """Base class of every error npdgru raises on purpose."""


class ParameterError(NpdgruError, ValueError):
    """A function argument is out of range or has the wrong shape/dtype."""


class AudioError(NpdgruError):
    """An audio file or array cannot be used (missing, corrupt, empty, NaN/Inf, bad layout)."""


class WeightsError(NpdgruError):
    """A weight file is missing, malformed, from a newer format, or does not fit its architecture."""


class CheckpointError(NpdgruError):
    """A checkpoint cannot be converted safely (refused global, corrupt archive, bad tensors)."""


class StreamInputError(AudioError, ParameterError):
    """Some streams of a :class:`~npdgru.streaming.StreamBatch` call were refused; the others ran.

    ``rejected`` maps each refused stream id to the reason; ``outputs`` holds the hops of the
    streams that were processed (``{id: (160,) float32}``), as ``process`` would have returned.
    A refused stream's state is exactly as it was before the call.
    """

    def __init__(self, rejected: dict, outputs: dict):
        self.rejected = dict(rejected)
        self.outputs = dict(outputs)
        ids = ", ".join(repr(k) for k in self.rejected)
        reasons = "; ".join(self.rejected.values())
        super().__init__(f"stream(s) {ids} refused, the other {len(self.outputs)} processed: {reasons}")
