"""The whole model in plain NumPy (``reference.forward`` walking ``Plan.as_data()``) against the
two other whole-model implementations: the cpu executor (Numba, float32) and the PyTorch twin
(``GraphNet``, float64 here). Small random models of every shipped architecture, every kind.
"""

from __future__ import annotations

import numpy as np
import pytest

from npdgru import reference
from npdgru.architectures import dprnn, mpt, tiny_weights
from npdgru.model import MaskModel
from npdgru.plan import expected_shapes, make_plan, validate_architecture
from npdgru.weights import Weights


def _weights(name, seed=0):
    if name == "nsnet2-tiny":
        return tiny_weights(seed=seed, hidden=12)
    arch = {"dprnn": lambda: dprnn(channels=8, intra_hidden=4, inter_hidden=12, blocks=2),
            "mpt": lambda: mpt(sub_embed=8, sub_hidden=12, full_embed=8, full_hidden=16, fusion=16)}[name]()
    validate_architecture(arch)
    rng = np.random.default_rng(seed)
    t = {k: (rng.uniform(-1.0, 1.0, s) / np.sqrt(s[-1])).astype(np.float32) for k, s in expected_shapes(arch).items()}
    return Weights(architecture=arch, tensors=t)


def _features(T, seed):
    return np.random.default_rng(seed).normal(0.0, 1.0, (T, 161)).astype(np.float32)


MODELS = ["nsnet2-tiny", "dprnn", "mpt"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("P", [100, 50])
def test_reference_forward_matches_the_cpu_executor(name, P):
    w = _weights(name)
    x = _features(25, seed=1)
    want = reference.forward(make_plan(w.architecture, update_percent=P).as_data(), w.tensors, x)
    m = MaskModel(w, update_percent=P, backend="cpu")
    got = m.forward(x[:, None], m.init_state(1))[:, 0]
    err = np.abs(got - want)
    assert err.max() < 2e-5, f"{name} P={P}: max |cpu - reference| = {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("P", [100, 50, 20])
def test_reference_forward_matches_the_torch_twin(name, P):
    torch = pytest.importorskip("torch")
    from npdgru.train.torch_model import GraphNet

    w = _weights(name, seed=2)
    x = _features(20, seed=3)
    want = reference.forward(make_plan(w.architecture, update_percent=P).as_data(), w.tensors, x)
    net = GraphNet.from_weights(w).double().eval()
    with torch.no_grad():
        got = net(torch.from_numpy(x.astype(np.float64))[None], update_percent=P)[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, err_msg=f"{name} P={P}: torch twin vs reference.forward")


def test_reference_forward_is_the_reference_backend():
    """The plain walk and the reference backend's executor (runners, state, bands as rows) agree."""
    w = _weights("dprnn", seed=4)
    x = _features(12, seed=5)
    want = reference.forward(make_plan(w.architecture, update_percent=40).as_data(), w.tensors, x)
    m = MaskModel(w, update_percent=40, backend="reference")
    got = m.executor._walk(x[:, None].astype(np.float64), m.init_state(1))[:, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
