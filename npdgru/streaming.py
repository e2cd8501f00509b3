"""Streaming: 10 ms chunks in, enhanced chunks out, with carried state.

:class:`Stream` returns exactly the offline output delayed by ``ALGORITHMIC_LATENCY = 320``
samples (20 ms at 16 kHz), bit for bit: offline and streaming run the same code on the same
frames (``stft.py``) and the model is causal. :class:`StreamBatch` serves N concurrent streams,
one 10 ms hop per stream per call, with streams joining and leaving at any call; on
``backend="cuda"`` every layer of every stream runs on the GPU in one batch, and each stream's
output is the one it would get alone. Other rates and channel counts run behind streaming
resamplers (:mod:`npdgru.resample`).

Input is checked completely before any state changes (a refused chunk or hop leaves its stream
exactly as it was), against the limits of :mod:`npdgru.audio`.
"""

from __future__ import annotations

import numpy as np

from . import stft
from .audio import _check_audio, _check_channels, _check_rate, _check_samples
from .errors import AudioError, ParameterError, StreamInputError
from .hop import Hops

ALGORITHMIC_LATENCY = stft.ALGORITHMIC_LATENCY  # samples at 16 kHz
_NO_SAMPLES = np.zeros(0, np.float32)  # an empty partial hop (read only)
_NO_SAMPLES.flags.writeable = False

__all__ = ["Stream", "StreamBatch", "ALGORITHMIC_LATENCY"]


def _validate_chunk(chunk) -> np.ndarray:
    """A Stream chunk, checked completely before any state changes: (k,) float32, maybe empty."""
    c = np.asarray(chunk)
    if c.size == 0 and c.ndim == 1:
        return np.zeros(0, np.float32)
    if c.ndim != 1:
        raise AudioError(f"chunk: a stream takes mono samples (k,), got shape {c.shape}")
    return _check_audio(c, "chunk").astype(np.float32)


def _validate_hops(chunks: dict, open_rows: dict) -> tuple[list, np.ndarray, dict]:
    """Check every stream's hop of a StreamBatch call before any state changes.

    ``open_rows`` maps each open stream id to its batch row. Returns the accepted ids, their hops
    (n, 160) float32, and ``{id: reason}`` for the refused ones (an id that is not open, a wrong
    shape, NaN/Inf, a magnitude beyond the limit).
    """
    ok, hops, rejected = [], [], {}
    for sid, chunk in chunks.items():
        try:
            if sid not in open_rows:
                shown = list(open_rows)[:20]
                more = f" and {len(open_rows) - 20} more" if len(open_rows) > 20 else ""
                raise ParameterError(f"stream id {sid!r} is not open (open ids: {shown}{more})")
            c = np.asarray(chunk)
            if c.shape != (stft.HOP,):
                raise AudioError(f"stream {sid!r}: a chunk must be one hop of {stft.HOP} samples (16 kHz mono), got shape {c.shape}")
            c = _check_audio(c, f"stream {sid!r}")
        except (AudioError, ParameterError) as e:
            rejected[sid] = str(e)
            continue
        ok.append(sid)
        hops.append(c)
    x = np.array(hops, np.float32).reshape(len(hops), stft.HOP)
    return ok, x, rejected


class Stream:
    """Chunks in, chunks out, with carried state.

    ``process(chunk)`` accepts any number of samples and returns exactly as many: the offline
    output delayed by ``latency`` = 320 samples (20 ms), the first 320 output samples being
    zeros. ``flush()`` ends the stream and returns the last ``latency`` samples plus whatever the
    final partial frame held, so that ``concat(outputs)[latency:latency + n] ==
    Enhancer.enhance(x)`` for the n input samples. The stream can then be used again.

    ``Stream(enh, sample_rate=48000, channels=2)`` takes chunks of (k,) samples (one channel) or
    (k, channels) at that rate: each channel runs as its own 16 kHz stream behind a streaming
    resampler (:class:`npdgru.resample.StreamResampler`, ``resample_poly``'s filter), which adds
    about 1.3 ms: ``latency`` is then in samples of ``sample_rate`` (1024 at 48 kHz, 21.3 ms), and
    the output equals the offline output delayed by ``latency`` to float rounding for rates that
    are multiples of 50 Hz (at other rates 20 ms is not a whole number of samples: within a
    sample). At 16 kHz with several channels each channel is bit for bit the mono stream's.
    """

    latency = ALGORITHMIC_LATENCY

    def __init__(self, enhancer, *, sample_rate: int = stft.SAMPLE_RATE, channels: int = 1):
        self.enhancer = enhancer
        self._adapter = None
        if (sample_rate, channels) != (stft.SAMPLE_RATE, 1):
            self._adapter = _RateStream(enhancer, sample_rate, channels)
            self.latency = self._adapter.latency
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.reset()

    def reset(self) -> None:
        if self._adapter is not None:
            self._adapter.reset()
            return
        if not hasattr(self, "_hops"):
            self._hops = Hops(self.enhancer, 1)
        self._hops.reset()
        self._state = self.enhancer.model.init_state(1)
        self._partial = _NO_SAMPLES  # input samples of the hop in progress (< HOP)
        # The synthesis emits yp = y delayed by one hop; one more hop of zeros in front makes the
        # output y delayed by exactly N_FFT samples, for any chunk sizes.
        self._out = np.zeros(stft.HOP, np.float32)
        self._n_in = 0
        self._lead = True  # the synthesis's first hop is still to come

    def _run(self, samples: np.ndarray) -> None:
        H = stft.HOP
        x = np.concatenate([self._partial, samples]) if len(self._partial) else samples
        k = len(x) // H
        self._partial = x[k * H :].copy() if len(x) > k * H else _NO_SAMPLES
        if k:
            q = len(self._out)
            out = np.empty(q + k * H, np.float32)  # the output queue and the new hops after it
            out[:q] = self._out
            self._hops.run(x[: k * H].reshape(1, k, H), self._state, out=out[q:].reshape(1, k * H))
            if self._lead:  # yp[:HOP] is the (masked) front padding, not x: silence, as documented
                out[q : q + H] = 0.0
                self._lead = False
            self._out = out

    def process(self, chunk) -> np.ndarray:
        """Feed samples (any count, float; (k,) or (k, channels) at the stream's rate); get as many enhanced samples back.

        A refused chunk (wrong shape, NaN/Inf, a sample beyond ``MAX_ABS_SAMPLE``) raises
        AudioError and leaves the stream exactly as it was: the next chunk continues the timeline.
        """
        if self._adapter is not None:
            return self._adapter.process(chunk)
        c = _validate_chunk(chunk)  # everything checked before any state changes
        if not len(c):
            return c
        self._n_in += len(c)
        self._run(c)
        out, self._out = self._out[: len(c)], self._out[len(c) :]
        return out

    def flush(self) -> np.ndarray:
        """End of input: return the remaining ``latency`` samples (and reset the stream)."""
        if self._adapter is not None:
            return self._adapter.flush()
        n = self._n_in
        if n:
            self._run(np.zeros(stft.HOP * stft.num_frames(n) - n, np.float32))
        emitted = n  # process() returned exactly n samples so far
        out = self._out[: n + self.latency - emitted]
        if len(out) < self.latency:  # nothing was pushed: just the latency of silence
            out = np.concatenate([out, np.zeros(self.latency - len(out), np.float32)])
        self.reset()
        return out


class _RateStream:
    """A :class:`Stream` at any rate and channel count: C mono 16 kHz streams between two
    streaming resamplers, and a queue that returns exactly as many samples as came in.

    After n inputs the resamplers and the streams have produced at least n - lead outputs
    (``lead`` = the input resampler's delay in output samples, rounded up, plus the output
    resampler's delay), so a queue that starts with ``lead`` zeros always holds enough.
    """

    def __init__(self, enhancer, sample_rate, channels):
        from .resample import StreamResampler

        _check_rate(sample_rate)
        _check_channels(channels)
        self.rate, self.C = int(sample_rate), int(channels)
        self.streams = [Stream(enhancer) for _ in range(self.C)]
        sr16 = stft.SAMPLE_RATE
        if self.rate == sr16:
            self.rs_in = self.rs_out = None
            self.lead = 0
        else:
            self.rs_in, self.rs_out = StreamResampler(self.rate, sr16, self.C), StreamResampler(sr16, self.rate, self.C)
            self.lead = -(-self.rs_in.delay * self.rate // sr16) + self.rs_out.delay
        self.latency = self.lead + -(-ALGORITHMIC_LATENCY * self.rate // sr16)
        self.reset()

    def reset(self) -> None:
        for s in self.streams:
            s.reset()
        for rs in (self.rs_in, self.rs_out):
            if rs is not None:
                rs.reset()
        self._out = np.zeros((self.lead, self.C), np.float32)

    def _validate(self, chunk) -> np.ndarray:
        c = np.asarray(chunk)
        mono_ok = self.C == 1 and c.ndim == 1
        if not (mono_ok or (c.ndim == 2 and c.shape[1] == self.C)):
            want = "(k,) or (k, 1)" if self.C == 1 else f"(k, {self.C})"
            raise AudioError(f"chunk: this stream takes {want} samples at {self.rate} Hz, got shape {c.shape}")
        if c.dtype.kind != "f":
            raise AudioError(f"chunk: samples must be floats in [-1, 1], got dtype {c.dtype}")
        if c.size:
            _check_samples(c, "chunk")
        return c.reshape(len(c), self.C).astype(np.float32)

    def _push(self, x: np.ndarray) -> None:
        x16 = self.rs_in.process(x) if self.rs_in is not None else x
        y16 = np.stack([s.process(np.ascontiguousarray(x16[:, i])) for i, s in enumerate(self.streams)], axis=1)
        y = self.rs_out.process(y16) if self.rs_out is not None else y16
        self._out = np.concatenate([self._out, y])

    def _pop(self, k: int, mono: bool) -> np.ndarray:
        out, self._out = self._out[:k], self._out[k:]
        return out[:, 0] if mono else out

    def process(self, chunk) -> np.ndarray:
        c = self._validate(chunk)  # everything checked before any state changes
        self._push(c)
        return self._pop(len(c), np.ndim(chunk) == 1)

    def flush(self) -> np.ndarray:
        """The last ``latency`` samples: zeros after the end, as the offline path pads."""
        self._push(np.zeros((self.latency, self.C), np.float32))
        out = self._pop(self.latency, self.C == 1)
        self.reset()
        return out


class StreamBatch:
    """N concurrent streams through one model batch, one 10 ms hop per call (16 kHz mono, or
    ``sample_rate=``/``channels=``: hops of (rate/100, channels) at any rate that is a multiple of
    100 Hz, with ``hop`` and ``latency`` in samples of that rate; see :class:`_RateStreamBatch`).

    ``add()`` returns a stream id; ``process({id: chunk})`` takes exactly ``hop`` = 160 samples
    for each stream named and returns ``{id: 160 enhanced samples}``; ``remove(id)`` ends a
    stream. Streams may join and leave at any call, and a call may name any subset of the
    streams: the others keep their state untouched. Each stream's output is bit for bit what a
    :class:`Stream` fed the same 160-sample chunks returns (the offline output delayed by
    ``latency`` = 320 samples); ``remove(id, flush=True)`` returns what ``Stream.flush()`` would.

    The STFT of all streams of a call is one batched FFT on the host and the model runs once
    for the whole batch (on ``backend="cuda"``, on the GPU with the state kept there). Joining
    and leaving copy the batch state once (``O(N)``, on the device for cuda).

    Examples
    --------
    >>> sb = Enhancer(backend="cuda").stream_batch()            # doctest: +SKIP
    >>> a, b = sb.add(), sb.add()                               # doctest: +SKIP
    >>> out = sb.process({a: x[:160], b: y[:160]})              # doctest: +SKIP
    """

    latency = ALGORITHMIC_LATENCY
    hop = stft.HOP

    def __init__(self, enhancer, *, sample_rate: int = stft.SAMPLE_RATE, channels: int = 1):
        if not all(hasattr(enhancer, a) for a in ("model", "mask_floor", "_apply")):  # duck-typed: enhance.py imports this module
            raise ParameterError(f"StreamBatch needs an Enhancer, got {type(enhancer).__name__}")
        self._adapter = None
        if (sample_rate, channels) != (stft.SAMPLE_RATE, 1):
            self._adapter = _RateStreamBatch(enhancer, sample_rate, channels)
            self.latency, self.hop = self._adapter.latency, self._adapter.hop
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.enhancer = enhancer
        self._model = enhancer.model
        self._ids: list[int] = []  # stream id of each batch row, in row order
        self._next_id = 0
        self._state = None  # model state of len(self._ids) streams; None while empty
        H = stft.HOP
        self._hops = Hops(enhancer, 0)  # analysis history and synthesis tail per stream
        self._pending = np.zeros((0, H), np.float32)  # what the next call returns (yp one hop back)
        self._frames = np.zeros(0, np.int64)  # hops processed per stream

    @property
    def ids(self) -> list:
        """Ids of the open streams, in the order they joined."""
        return list(self._ids) if self._adapter is None else list(self._adapter.streams)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, stream_id) -> bool:
        return stream_id in self.ids

    def _row(self, stream_id) -> int:
        try:
            return self._ids.index(stream_id)
        except ValueError:
            raise ParameterError(f"stream id {stream_id!r} is not open (open ids: {self._ids})") from None

    def _reshape(self, rows: np.ndarray, ids: list) -> None:
        """Keep batch rows ``rows`` (-1: a new stream) in that order, under ``ids``."""
        if not len(rows):
            self._state = None
        elif self._state is None:
            self._state = self._model.init_state(len(rows))
        else:
            self._state = self._state.take(rows)
        self._hops.reorder(rows)
        keep = rows >= 0
        for name in ("_pending", "_frames"):
            old = getattr(self, name)
            new = np.zeros((len(rows),) + old.shape[1:], old.dtype)
            new[keep] = old[rows[keep]]
            setattr(self, name, new)
        self._ids = ids

    def add(self) -> int:
        """Open a new stream (silence before its first sample); returns its id."""
        if self._adapter is not None:
            return self._adapter.add()
        sid = self._next_id
        self._next_id += 1
        self._reshape(np.append(np.arange(len(self._ids)), -1), self._ids + [sid])
        return sid

    def remove(self, stream_id, *, flush: bool = False):
        """Close a stream. With ``flush=True`` return its last ``latency`` samples (``Stream.flush``)."""
        if self._adapter is not None:
            return self._adapter.remove(stream_id, flush=flush)
        r = self._row(stream_id)
        tail = None
        if flush:
            if self._frames[r]:  # the zero hop that completes the last frame, as Stream.flush
                first = self._tick(np.array([r]), np.zeros((1, stft.HOP), np.float32))[0]
                tail = np.concatenate([first, self._pending[r]])
            else:
                tail = np.zeros(self.latency, np.float32)
        rows = np.array([i for i in range(len(self._ids)) if i != r], np.int64)
        self._reshape(rows, [sid for sid in self._ids if sid != stream_id])
        return tail

    def process(self, chunks: dict) -> dict:
        """One hop for each stream named: ``{id: (160,) float samples}`` -> ``{id: (160,) float32}``.

        Every hop is checked before any state changes. A refused hop (an id that is not open, a
        wrong shape, NaN/Inf, a sample beyond ``MAX_ABS_SAMPLE``) leaves its stream as it was;
        the other streams are processed, and then :class:`~npdgru.errors.StreamInputError`
        names the refused ids and carries the others' outputs (``e.outputs``).
        """
        if not isinstance(chunks, dict):
            raise ParameterError(f"chunks must be a dict {{stream id: ({self.hop},) samples}}, got {type(chunks).__name__}")
        if self._adapter is not None:
            return self._adapter.process(chunks)
        row_of = {sid: r for r, sid in enumerate(self._ids)}  # one pass: O(N) for N streams
        ok, x, rejected = _validate_hops(chunks, row_of)
        out = {}
        if ok:
            order = np.argsort([row_of[sid] for sid in ok], kind="stable")  # batch row order
            ids = [ok[k] for k in order]
            rows = np.array([row_of[sid] for sid in ids], np.int64)
            y = self._tick(rows, x[order])
            out = {sid: y[k] for k, sid in enumerate(ids)}
        if rejected:
            raise StreamInputError(rejected, out)
        return out

    def _tick(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Advance batch rows ``rows`` by the hops x (n, 160); return their outputs (n, 160)."""
        full = len(rows) == len(self._ids) and (rows == np.arange(len(rows))).all()
        return self._emit(rows, self._hops.run(x[:, None, :], self._state, None if full else rows))

    def _emit(self, rows: np.ndarray, yp: np.ndarray) -> np.ndarray:
        """Hand out the pending hops of rows ``rows`` and queue their new output hops yp."""
        yp[self._frames[rows] == 0] = 0.0  # the first hop is the (masked) front padding: silence
        self._frames[rows] += 1
        out = self._pending[rows]
        self._pending[rows] = yp
        return out


class _RateStreamBatch:
    """A :class:`StreamBatch` at any rate that is a multiple of 100 Hz and any channel count: each
    stream's C channels are C streams of one 16 kHz mono StreamBatch (the core), behind the
    stream's own streaming resamplers.

    A stream's resampled input gathers in a queue; the core takes a 160-sample hop from every
    queue that holds one, so it sees exactly what :class:`Stream` at that rate sees (the input
    resampler's output without its first ``delay`` samples) and the two give the same output, to
    float rounding. The first hop waits for the resampler's delay (``ceil(delay/160)`` calls), so
    each stream's output queue starts with ``lead`` zeros = that many 10 ms hops plus the output
    resampler's delay: ``latency`` = ``lead`` + 20 ms (1471 samples, 30.6 ms at 48 kHz).
    """

    def __init__(self, enhancer, sample_rate, channels):
        from .resample import StreamResampler

        _check_rate(sample_rate)
        _check_channels(channels)
        if sample_rate % 100:
            raise ParameterError(f"StreamBatch at {sample_rate} Hz: a 10 ms hop needs a rate that is a multiple of 100 Hz; use Stream (any chunk size) for this rate")
        self.rate, self.C, self.hop = int(sample_rate), int(channels), int(sample_rate) // 100
        self.core = StreamBatch(enhancer)
        self._resamplers = (lambda: StreamResampler(self.rate, stft.SAMPLE_RATE, self.C), lambda: StreamResampler(stft.SAMPLE_RATE, self.rate, self.C))
        probe_in, probe_out = (f() for f in self._resamplers)
        self.lead = -(-probe_in.delay // stft.HOP) * self.hop + probe_out.delay
        self.latency = self.lead + ALGORITHMIC_LATENCY * self.rate // stft.SAMPLE_RATE
        self.streams: dict = {}  # id -> {"core": [C core ids], "rs": (in, out), "q16": (m, C), "out": (k, C)}
        self._next_id = 0

    def add(self) -> int:
        sid = self._next_id
        self._next_id += 1
        self.streams[sid] = {"core": [self.core.add() for _ in range(self.C)], "rs": tuple(f() for f in self._resamplers),
                             "q16": np.zeros((0, self.C), np.float32), "out": np.zeros((self.lead, self.C), np.float32)}
        return sid

    def _get(self, sid):
        if sid not in self.streams:
            shown = list(self.streams)[:20]
            raise ParameterError(f"stream id {sid!r} is not open (open ids: {shown})")
        return self.streams[sid]

    def _validate(self, sid, chunk) -> np.ndarray:
        self._get(sid)
        c = np.asarray(chunk)
        want = (self.hop,) if self.C == 1 else (self.hop, self.C)
        if c.shape != want and c.shape != (self.hop, self.C):
            raise AudioError(f"stream {sid!r}: a chunk must be one 10 ms hop of shape {want} at {self.rate} Hz, got shape {c.shape}")
        if c.dtype.kind != "f":
            raise AudioError(f"stream {sid!r}: samples must be floats in [-1, 1], got dtype {c.dtype}")
        _check_samples(c, f"stream {sid!r}")
        return c.reshape(self.hop, self.C).astype(np.float32)

    def _advance(self, hops: dict) -> dict:
        """Push one checked hop (hop, C) per stream id; return each one's next hop of output."""
        for sid, x in hops.items():
            st = self.streams[sid]
            st["q16"] = np.concatenate([st["q16"], st["rs"][0].process(x)])
        ready = [sid for sid in hops if len(self.streams[sid]["q16"]) >= stft.HOP]
        feed = {}
        for sid in ready:
            st = self.streams[sid]
            for c, cid in enumerate(st["core"]):
                feed[cid] = np.ascontiguousarray(st["q16"][: stft.HOP, c])
            st["q16"] = st["q16"][stft.HOP :]
        y16 = self.core.process(feed) if feed else {}
        out = {}
        for sid in hops:
            st = self.streams[sid]
            if sid in ready:
                y = np.stack([y16[cid] for cid in st["core"]], axis=1)
                st["out"] = np.concatenate([st["out"], st["rs"][1].process(y)])
            out[sid], st["out"] = st["out"][: self.hop], st["out"][self.hop :]
            if self.C == 1:
                out[sid] = out[sid][:, 0]
        return out

    def process(self, chunks: dict) -> dict:
        ok, rejected = {}, {}
        for sid, chunk in chunks.items():
            try:
                ok[sid] = self._validate(sid, chunk)
            except (AudioError, ParameterError) as e:
                rejected[sid] = str(e)
        out = self._advance(ok) if ok else {}
        if rejected:
            raise StreamInputError(rejected, out)
        return out

    def remove(self, sid, *, flush: bool = False):
        st = self._get(sid)
        tail = None
        if flush:  # zeros after the end, as Stream.flush: until the last sample is out
            parts, need = [], self.latency
            zero = np.zeros((self.hop, self.C), np.float32)
            while need > 0:
                y = self._advance({sid: zero})[sid]
                parts.append(y[:need])
                need -= len(y)
            tail = np.concatenate(parts)
        for cid in st["core"]:
            self.core.remove(cid)
        del self.streams[sid]
        return tail

