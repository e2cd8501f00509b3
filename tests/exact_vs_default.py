"""How far the default (BLAS) mode is from ``exact=True``: shared by tests/test_exact_mode.py and
the measurement that set its bounds (``python3 tests/exact_vs_default.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npdgru import stft
from npdgru.enhance import Enhancer

REPO = Path(__file__).resolve().parents[1]
OOD_DIR = REPO.parent / "shared" / "data" / "testset_ood" / "noisy"


def ood_files(n: int) -> list[Path]:
    return sorted(OOD_DIR.glob("*.flac"))[:n]


def read(path: Path, seconds: float | None = None) -> np.ndarray:
    import soundfile as sf

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    assert sr == 16000
    return np.ascontiguousarray(x[: None if seconds is None else int(seconds * sr), 0])


def masks_and_selections(model, features):
    """The model's mask for features (T, 1, n_features) and the selected neurons of each D-GRU
    step ((T, rows, H) bool each): the executor's walk, with the D-GRU steps asked for S."""
    ex, plan = model.executor, model.plan
    T, Bn = features.shape[:2]
    state = model.init_state(Bn)
    values = [None] * (len(plan.steps) + 1)
    values[0] = np.ascontiguousarray(features, np.float32)
    sels = []
    for s, run in zip(plan.steps, ex.steps):
        xs = [values[i] for i in s.slots]
        if run.state_layer is not None:
            sel = np.zeros((T, Bn * s.bands, s.hidden), bool)
            y = run.state_layer.forward(xs[0].reshape(T, Bn * s.bands, s.size_in), state.layers[s.state_index], selected=sel)
            values[s.slot] = y.reshape(T, Bn, s.width)
            sels.append(sel)
        else:
            values[s.slot] = run(xs, state, T, Bn)
    return values[-1], sels


def compare(model_name: str, P: float, x: np.ndarray) -> dict:
    """Default vs exact on one signal: max |output difference| (enhanced samples), max |mask
    difference|, the share of neuron-frames whose selection differs, and max |offline - streaming|
    output difference of the default mode."""
    fast, exact = (Enhancer(model=model_name, update_percent=P, exact=e) for e in (False, True))
    y_fast, y_exact = fast.enhance(x, 16000), exact.enhance(x, 16000)
    F = stft.log_power(stft.stft(x))[:, None, :]
    m_fast, s_fast = masks_and_selections(fast.model, F)
    m_exact, s_exact = masks_and_selections(exact.model, F)
    n = sum(s.size for s in s_fast)
    differ = sum(int(np.count_nonzero(a != b)) for a, b in zip(s_fast, s_exact)) / 2  # a swap is one neuron in, one out
    st = fast.stream()
    hop = stft.HOP
    ys = np.concatenate([st.process(x[i : i + hop]) for i in range(0, len(x), hop)] + [st.flush()])
    L = st.latency
    return {
        "out": float(np.max(np.abs(y_fast - y_exact))),
        "mask": float(np.max(np.abs(m_fast - m_exact))),
        "sel_share": differ / max(n, 1),
        "stream_out": float(np.max(np.abs(ys[L : L + len(x)] - y_fast))),
    }


if __name__ == "__main__":
    import sys

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else ["nsnet2-kd-anyp"]
    for name in names:
        for P in (100, 75, 50, 25):
            rows = [compare(name, P, read(f)) for f in ood_files(5)]
            print(name, P, {k: max(r[k] for r in rows) for k in rows[0]}, flush=True)
