"""StreamBatch and Enhancer.enhance_batch on the cpu backend (no GPU, no simulator needed).

* streams that join, skip calls and leave (with and without flush) give, bit for bit, what a
  :class:`Stream` fed the same 160-sample chunks gives; the other streams are never disturbed;
* ``enhance_batch`` of signals with different lengths, channel counts and rates equals
  ``enhance`` of each, bit for bit (the padding after a short signal never reaches its output);
* bad input is refused with ParameterError / AudioError naming the stream or the signal.

The model is a tiny random one of the NSNet2 topology (161 -> 16 -> GRU 12 -> GRU 12 -> 161), so
the test does not depend on the shipped weights; one test repeats the check with NSNet2 if present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npdgru.enhance import Enhancer, StreamBatch
from npdgru.errors import AudioError, ParameterError
from npdgru import architectures
from npdgru.weights import Weights

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "nsnet2.safetensors"
HOP = 160


def tiny_weights(seed=0, H=12) -> Weights:
    """A random NSNet2-shaped model small enough for the simulator (npdgru.architectures.tiny_weights)."""
    return architectures.tiny_weights(seed, hidden=H)


def noise_speechlike(n, seed):
    """Noise with a slowly varying envelope (so the D-GRU selections keep changing)."""
    rng = np.random.default_rng(seed)
    env = 0.05 + 0.2 * np.abs(np.sin(np.arange(n) / 900.0 + seed))
    return (rng.standard_normal(n) * env).astype(np.float32)


@pytest.fixture(scope="module", params=[50, 100])
def enh(request):
    return Enhancer(tiny_weights(), update_percent=request.param, backend="cpu", exact=True)


def run_schedule(enh, schedule, signals, n_ticks):
    """Drive a StreamBatch and independent Streams with the same chunks.

    schedule: {stream index: (join tick, leave tick or None, flush on leave, ticks skipped)}.
    Returns {stream index: (batch output, stream output)} concatenated.
    """
    sb = enh.stream_batch()
    sid, single, got, want, pos = {}, {}, {}, {}, {}
    for tick in range(n_ticks):
        for k, (join, leave, flush, skip) in schedule.items():
            if tick == join:
                sid[k] = sb.add()
                single[k], got[k], want[k], pos[k] = enh.stream(), [], [], 0
            if tick == leave:
                tail = sb.remove(sid[k], flush=flush)
                if flush:
                    got[k].append(tail)
                    want[k].append(single[k].flush())
                else:
                    assert tail is None
                del sid[k]
        chunks, who = {}, {}
        for k, s in sid.items():
            if tick in schedule[k][3]:
                continue
            chunks[s] = signals[k][pos[k] : pos[k] + HOP]
            who[s] = k
            pos[k] += HOP
        out = sb.process(chunks)
        assert set(out) == set(chunks)
        for s, y in out.items():
            k = who[s]
            assert y.shape == (HOP,) and y.dtype == np.float32
            got[k].append(y)
            want[k].append(single[k].process(chunks[s]))
    return {k: (np.concatenate(got[k]), np.concatenate(want[k])) for k in got}


def test_join_skip_leave_equals_independent_streams(enh):
    signals = [noise_speechlike(60 * HOP, seed) for seed in range(5)]
    schedule = {
        0: (0, None, False, ()),  # there from the start to the end
        1: (0, 25, True, (3, 4)),  # leaves with flush, skipped two calls
        2: (5, 40, False, ()),  # joins late, leaves without flush
        3: (12, None, False, tuple(range(20, 30, 3))),  # joins at 12, skips every third call from 20
        4: (25, 26, True, ()),  # one hop, then flush
    }
    res = run_schedule(enh, schedule, signals, 50)
    for k, (got, want) in res.items():
        assert got.shape == want.shape, k
        assert np.array_equal(got, want), f"stream {k}: max |diff| {np.abs(got - want).max():.3g}"
    got0 = res[0][0]
    assert np.abs(got0).max() > 0 and not got0[:320].any()  # real output after the 20 ms latency


def test_streams_do_not_disturb_each_other(enh):
    """A stream's output does not depend on who else is in the batch (bit for bit)."""
    x = noise_speechlike(30 * HOP, 7)
    alone = run_schedule(enh, {0: (0, None, False, ())}, [x], 30)[0][0]
    crowd = [x] + [noise_speechlike(30 * HOP, s) for s in (8, 9, 10)]
    busy = run_schedule(enh, {0: (0, None, False, ()), 1: (2, 9, False, ()), 2: (4, None, True, (5,)), 3: (9, 20, True, ())}, crowd, 30)[0][0]
    assert np.array_equal(alone, busy)


def test_flush_of_an_unused_stream_and_ids():
    enh = Enhancer(tiny_weights(), update_percent=50, exact=True)
    sb = StreamBatch(enh)
    a, b = sb.add(), sb.add()
    assert sb.ids == [a, b] and len(sb) == 2 and a in sb and a != b
    assert np.array_equal(sb.remove(a, flush=True), enh.stream().flush())  # 320 zeros
    assert sb.ids == [b] and a not in sb
    c = sb.add()
    assert c not in (a, b)  # ids are never reused
    assert sb.process({}) == {}


def test_bad_input_is_refused():
    enh = Enhancer(tiny_weights(), update_percent=50, exact=True)
    sb = enh.stream_batch()
    a = sb.add()
    ok = np.zeros(HOP, np.float32)
    with pytest.raises(ParameterError, match="stream id 99"):
        sb.process({99: ok})
    with pytest.raises(AudioError, match="one hop of 160"):
        sb.process({a: np.zeros(100, np.float32)})
    with pytest.raises(AudioError, match="one hop of 160"):
        sb.process({a: np.zeros((HOP, 2), np.float32)})
    bad = ok.copy()
    bad[3] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        sb.process({a: bad})
    with pytest.raises(AudioError, match="integer"):
        sb.process({a: np.zeros(HOP, np.int16)})
    with pytest.raises(ParameterError, match="dict"):
        sb.process([ok])
    with pytest.raises(ParameterError):
        StreamBatch(object())
    sb.remove(a)
    with pytest.raises(ParameterError, match="not open"):
        sb.remove(a)


# ------------------------------------------------------------------------------ enhance_batch


def test_enhance_batch_equals_enhance_per_signal(enh):
    xs = [
        noise_speechlike(5000, 1),
        noise_speechlike(160 * 23, 2),  # a whole number of hops
        np.stack([noise_speechlike(7001, 3), noise_speechlike(7001, 4)], axis=1),  # stereo
        noise_speechlike(37, 5),  # shorter than a hop
        noise_speechlike(12000, 6).astype(np.float64),
    ]
    ys = enh.enhance_batch(xs, 16000)
    assert len(ys) == len(xs)
    for i, (x, y) in enumerate(zip(xs, ys)):
        assert y.shape == x.shape and y.dtype == np.float32, i
        assert np.array_equal(y, enh.enhance(x, 16000)), f"signal {i}"


def test_enhance_batch_with_one_rate_per_signal():
    enh = Enhancer(tiny_weights(), update_percent=50, exact=True)
    xs = [noise_speechlike(4000, 1), noise_speechlike(8000, 2), noise_speechlike(3000, 3)]
    rates = [8000, 16000, 44100]
    ys = enh.enhance_batch(xs, rates)
    for x, y, sr in zip(xs, ys, rates):
        assert np.array_equal(y, enh.enhance(x, sr))
    assert enh.enhance_batch([], 16000) == []
    assert enh.enhance_batch((xs[1],), 16000)[0].shape == xs[1].shape


def test_enhance_batch_bad_input():
    enh = Enhancer(tiny_weights(), update_percent=50, exact=True)
    x = noise_speechlike(1000, 1)
    with pytest.raises(ParameterError, match="list"):
        enh.enhance_batch(np.stack([x, x]), 16000)
    with pytest.raises(ParameterError, match="2 rates for 3"):
        enh.enhance_batch([x, x, x], [16000, 16000])
    with pytest.raises(AudioError, match=r"audios\[1\]"):
        enh.enhance_batch([x, np.array([np.nan, 1.0])], 16000)
    with pytest.raises(AudioError, match=r"sample_rate\[0\]"):
        enh.enhance_batch([x], [16000.5])
    with pytest.raises(AudioError, match="sample_rate"):
        enh.enhance_batch([x], 10)


@pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")
def test_nsnet2_stream_batch_equals_streams():
    """The same bit-for-bit equality with the shipped NSNet2 weights at P = 50."""
    import soundfile as sf

    x, sr = sf.read(str(REPO / "examples" / "noisy_dishes_5db.flac"), dtype="float32")
    assert sr == 16000
    enh = Enhancer(SHIPPED, update_percent=50, exact=True)
    signals = [x[i * 4000 : i * 4000 + 40 * HOP] for i in range(3)]
    res = run_schedule(enh, {0: (0, None, False, ()), 1: (3, 30, True, (10,)), 2: (8, None, False, ())}, signals, 40)
    for k, (got, want) in res.items():
        assert np.array_equal(got, want), k
    ys = enh.enhance_batch(signals, 16000)
    for s, y in zip(signals, ys):
        assert np.array_equal(y, enh.enhance(s, 16000))
