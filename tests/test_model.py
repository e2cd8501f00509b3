"""The mask model (npdgru.model.MaskModel) with the shipped NSNet2 weights on real features.

* cpu (Numba, float32) vs reference (NumPy, float64) at P = 100 and P = 50;
* cpu at P = 100 vs onnxruntime running the original NSNet2 ONNX (skips without either);
* the work counters (macs_per_frame, fraction_updated) against a hand computation;
* offline forward == the same frames fed in chunks with carried state, bit for bit.

Tolerances (measured on 2 s of four test-set files): cpu vs reference max |mask diff| < 1e-6 at
P = 100 and < 1.3e-5 at P = 50; cpu vs onnxruntime ~1.3e-6. We allow 1e-5 (dense) and 1e-4
(D-GRU: float32 vs float64 accumulators feed the same top-A selection, slightly more drift).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from npdgru import stft
from npdgru.errors import ParameterError
from npdgru.model import MaskModel
from npdgru.weights import load_weights

REPO = Path(__file__).resolve().parents[1]
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"
SHIPPED = REPO / "weights" / "nsnet2.safetensors"

DENSE_ATOL = 1e-5
SPARSE_ATOL = 1e-4

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")


def _noisy(seconds: float) -> np.ndarray:
    """The first seconds of a real test-set mixture (or the shipped example)."""
    import soundfile as sf

    files = sorted(NOISY_DIR.glob("*.flac"))
    path = files[0] if files else REPO / "examples" / "noisy_dishes_5db.flac"
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    assert sr == 16000
    return x[: int(seconds * sr), 0]


@pytest.fixture(scope="module")
def weights():
    return load_weights(SHIPPED)


@pytest.fixture(scope="module")
def features():
    """(T, 1, 161) log-power features of 2 s of real noisy speech."""
    F = stft.log_power(stft.stft(_noisy(2.0)))[:, None, :]
    assert F.shape == (201, 1, 161) and F.dtype == np.float32
    return F


def _mask(w, F, P, backend):
    m = MaskModel(w, update_percent=P, backend=backend)
    return m.forward(F, m.init_state(F.shape[1]))


@pytest.mark.parametrize("P, atol", [(100, DENSE_ATOL), (50, SPARSE_ATOL)])
def test_cpu_matches_reference(weights, features, P, atol):
    cpu = _mask(weights, features, P, "cpu")
    ref = _mask(weights, features, P, "reference")
    assert cpu.shape == ref.shape == features.shape
    assert cpu.dtype == np.float32
    assert 0.0 <= cpu.min() and cpu.max() <= 1.0
    assert cpu.std() > 0.05  # a real, non-trivial mask
    err = float(np.max(np.abs(cpu - ref)))
    assert err <= atol, f"P={P}: max |cpu - reference| = {err:.3g} > {atol}"


def test_sparse_mask_differs_from_dense_but_stays_close(weights, features):
    """P=50 is a different model (post-hoc sparsity), not a copy of P=100, yet still sensible."""
    dense = _mask(weights, features, 100, "cpu")
    half = _mask(weights, features, 50, "cpu")
    assert not np.array_equal(dense, half)
    assert float(np.mean(np.abs(dense - half))) < 0.2


def _onnx_path() -> Path | None:
    env = os.environ.get("NPDGRU_NSNET2_ONNX")
    p = Path(env) if env else REPO / ".cache" / "nsnet2" / "nsnet2-20ms-baseline.onnx"
    return p if p.is_file() else None


def test_p100_matches_onnxruntime(weights, features):
    ort = pytest.importorskip("onnxruntime")
    path = _onnx_path()
    if path is None:
        pytest.skip("NSNet2 ONNX not found: run tools/fetch_nsnet2.sh or set NPDGRU_NSNET2_ONNX")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: features[:, 0][None]})[0][0]
    got = _mask(weights, features, 100, "cpu")[:, 0]
    err = float(np.max(np.abs(got - want)))
    assert want.std() > 0.05
    assert err <= DENSE_ATOL, f"max |npdgru - onnxruntime| = {err:.3g} > {DENSE_ATOL}"


def test_work_counters_p50(weights):
    """Hand computation for NSNet2 (H = 400, A = ceil(0.5 * 400) = 200)."""
    m = MaskModel(weights, update_percent=50, backend="cpu")
    assert [g.A for g in m.gru_layers] == [200, 200]
    assert m.fraction_updated() == 0.5
    H, I, A = 400, 400, 200
    dense = 2 * 3 * H * (I + H)  # 1_920_000
    paper = 2 * (H + 2 * A) * (I + H)  # (1 + 2P)/3 of dense: 1_280_000
    ours = 2 * (3 * H * I + 3 * H * A)  # as run by default: dense input products, A recurrent columns
    other = 161 * 400 + 400 * 600 + 600 * 600 + 600 * 161
    assert (dense, paper, ours, other) == (1_920_000, 1_280_000, 1_440_000, 761_000)
    assert m.macs_per_frame() == {"gru_dense": dense, "gru_paper": paper, "gru_ours": ours, "other": other}
    sparse = MaskModel(weights, update_percent=50, backend="cpu", sparse_inputs=True)
    ours_sparse = (3 * H * I + 3 * H * A) + (3 * H * A + 3 * H * A)  # gru2's input from A columns too
    assert sparse.macs_per_frame()["gru_ours"] == ours_sparse == 1_200_000


def test_work_counters_p100_and_odd_p(weights):
    m = MaskModel(weights, update_percent=100, backend="cpu")
    assert m.fraction_updated() == 1.0
    mac = m.macs_per_frame()
    assert mac["gru_dense"] == mac["gru_paper"] == mac["gru_ours"] == 1_920_000
    m = MaskModel(weights, update_percent=33.3, backend="reference")  # A = ceil(133.2) = 134
    assert [g.A for g in m.gru_layers] == [134, 134]
    assert m.fraction_updated() == 134 / 400


@pytest.mark.parametrize("chunks", [[1] * 12 + [50, 139], [7, 0, 64, 3, 127], [201]])
def test_chunked_forward_is_bit_identical_p50(weights, features, chunks):
    m = MaskModel(weights, update_percent=50, backend="cpu", exact=True)
    offline = m.forward(features, m.init_state(1))
    state = m.init_state(1)
    parts, t = [], 0
    for k in chunks:
        parts.append(m.forward(features[t:t + k], state))
        t += k
    assert t == features.shape[0]
    assert np.array_equal(np.concatenate(parts), offline)


def test_batch_streams_are_independent(weights, features):
    """Two streams in one batch give each stream's own result (what stereo relies on).

    By default the products run through BLAS, whose bits may depend on the number of rows (and
    the CPU), so a stream alone and the same stream in a batch of two agree bit for bit only with
    ``exact=True``; by default another stream's input never changes a stream's output (same batch
    shape, other content: the same bits)."""
    other = features[::-1].copy()
    third = (features * 0.5 - 1.0).astype(np.float32)
    m = MaskModel(weights, update_percent=50, backend="cpu")
    both = m.forward(np.concatenate([features, other], axis=1), m.init_state(2))
    swapped = m.forward(np.concatenate([features, third], axis=1), m.init_state(2))
    assert np.array_equal(both[:, :1], swapped[:, :1])
    assert not np.array_equal(both[:, 1:], swapped[:, 1:])
    exact = MaskModel(weights, update_percent=50, backend="cpu", exact=True)
    both = exact.forward(np.concatenate([features, other], axis=1), exact.init_state(2))
    assert np.array_equal(both[:, :1], exact.forward(features, exact.init_state(1)))
    assert np.array_equal(both[:, 1:], exact.forward(other, exact.init_state(1)))


def test_bad_arguments(weights, features):
    with pytest.raises(ParameterError):
        MaskModel(weights, update_percent=0)
    with pytest.raises(ParameterError):
        MaskModel(weights, update_percent=100.5)
    with pytest.raises(ParameterError, match="tpu"):
        MaskModel(weights, backend="tpu")
    m = MaskModel(weights, update_percent=50)
    with pytest.raises(ParameterError, match=r"\(T, 1, 161\)"):
        m.forward(features[:, 0], m.init_state(1))
    with pytest.raises(ParameterError, match=r"\(T, 2, 161\)"):
        m.forward(features, m.init_state(2))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_frames(weights, features, backend):
    """forward on 0 frames returns (0, B, 161) and leaves the state alone. Compared bit for bit
    with ``exact=True`` (products in column order): by default a call of 20 frames and one of 40
    may round their BLAS products differently."""
    m = MaskModel(weights, update_percent=50, backend=backend, exact=True)
    s = m.init_state(1)
    first = m.forward(features[:20], s)
    before = [np.copy(v) for layer in s.layers for v in vars(layer).values() if isinstance(v, np.ndarray)]
    empty = m.forward(features[:0], s)
    assert empty.shape == (0, 1, 161) and empty.dtype == np.float32
    after = [v for layer in s.layers for v in vars(layer).values() if isinstance(v, np.ndarray)]
    assert len(after) == len(before) > 0 and all(np.array_equal(a, b) for a, b in zip(before, after))
    rest = m.forward(features[20:40], s)
    assert np.array_equal(np.concatenate([first, empty, rest]), m.forward(features[:40], m.init_state(1)))
