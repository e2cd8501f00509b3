"""The graph models (DPRNN, MPT) end to end: independent evidence for the format-2 architectures.

Golden values come from an implementation other than the one under test: the PyTorch twin
(``npdgru.train.torch_model.GraphNet``: ``torch._VF.gru`` for the dense and bidirectional GRUs,
``nn.functional.layer_norm``, the autograd D-GRU) or hand arithmetic; the float64 NumPy
reference backend is checked against the twin too, never used as its own golden. Bit-for-bit
checks (streaming, batching, StreamBatch) compare the cpu backend with itself under a different
schedule, which is the property being claimed.

Most tests use size-reduced random models (the builders of ``npdgru.architectures``) so the file
runs in seconds; the shipped ``weights/dprnn-anyp.safetensors`` and ``mpt-anyp.safetensors`` are
used for twin parity on real features, the MAC counts and the CLI.

Tolerances (measured when this file was written): small random models, torch seed 0, 40 real
frames x 3 streams: twin vs reference <= 3.3e-7, twin vs cpu <= 4.8e-7 at P = 100, 50, 25 (seeds
1-3 on random features: <= 5.1e-7); shipped models on 31 real frames: <= 6.6e-7. Asserted: 1e-5 (reference, and cpu at P = 100) and 1e-4 (cpu at
P < 100, where a float32 near-tie in the top-A selection could flip one neuron). None of the seeds
used here has such a flip.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from npdgru import stft
from npdgru.architectures import architecture, dprnn, mpt
from npdgru.cli import main
from npdgru.enhance import Enhancer
from npdgru.errors import CheckpointError, WeightsError
from npdgru.model import MaskModel
from npdgru.reference import count_macs
from npdgru.weights import FORMAT_VERSION, Weights, expected_shapes, load_weights, save_weights, validate_architecture

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "noisy_dishes_5db.flac"
SHIPPED = {"dprnn": REPO / "weights" / "dprnn-anyp.safetensors", "mpt": REPO / "weights" / "mpt-anyp.safetensors"}

REF_ATOL = 1e-5
CPU_DENSE_ATOL = 1e-5
CPU_SPARSE_ATOL = 1e-4


def small_arch(name: str) -> dict:
    """Size-reduced DPRNN (6 bands of 28 bins, 2 blocks) and MPT (2 sub-bands + full band)."""
    if name == "dprnn":
        return dprnn(bands=6, bins_per_band=28, channels=8, intra_hidden=4, inter_hidden=8, blocks=2)
    return mpt(edges=(0, 80, 161), sub_embed=8, sub_hidden=12, full_embed=8, full_hidden=16, fusion=10)


def random_weights(arch: dict, seed: int) -> Weights:
    """NumPy random weights (PyTorch's default init ranges, LayerNorm gains around 1): no torch."""
    rng = np.random.default_rng(seed)
    t = {}
    for spec in arch["layers"]:
        n, kind = spec["name"], spec["kind"]
        for k, s in expected_shapes({"layers": [spec]}).items():
            if kind == "layernorm":
                t[k] = ((1.0 if k.endswith(".weight") else 0.0) + rng.uniform(-0.3, 0.3, s)).astype(np.float32)
            else:
                bound = 1.0 / np.sqrt(spec["hidden"] if kind in ("gru", "bigru") else spec["in"])
                t[k] = rng.uniform(-bound, bound, s).astype(np.float32)
    return Weights(architecture=validate_architecture(arch), tensors=t)


def real_features(n_frames: int, offset: int = 16000, batch: int = 1) -> np.ndarray:
    """(T, B, 161) float32 log-power features of the shipped example; stream b starts b·0.25 s later."""
    import soundfile as sf

    x, sr = sf.read(str(EXAMPLE), dtype="float32", always_2d=True)
    assert sr == 16000
    n = (n_frames - 1) * stft.HOP
    cols = [stft.log_power(stft.stft(x[offset + b * 4000 : offset + b * 4000 + n, 0]))[:n_frames] for b in range(batch)]
    F = np.stack(cols, axis=1)
    assert F.shape == (n_frames, batch, 161) and F.dtype == np.float32
    return F


def run_model(weights, feats, P, backend="cpu"):
    m = MaskModel(weights, update_percent=P, backend=backend)
    return m.forward(feats, m.init_state(feats.shape[1]))


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def torch():
    """torch, one thread (skips the tests that need it when it is absent)."""
    t = pytest.importorskip("torch")
    threads = t.get_num_threads()
    t.set_num_threads(1)
    yield t
    t.set_num_threads(threads)


def twin(torch, net, feats, P) -> np.ndarray:
    """GraphNet (batch first) on time-first features -> time-first mask."""
    with torch.no_grad():
        y = net(torch.from_numpy(np.ascontiguousarray(feats.transpose(1, 0, 2))), P)
    return y.numpy().transpose(1, 0, 2)


def twin_weights(torch, arch, seed):
    """A GraphNet with PyTorch's default init under a fixed seed, and the same tensors as Weights."""
    from npdgru.train.torch_model import GraphNet

    torch.manual_seed(seed)
    net = GraphNet(arch).eval()
    w = Weights(architecture=arch, tensors={k: v.detach().numpy().copy() for k, v in net.state_dict().items()})
    return net, w


# ------------------------------------------------------------------ 1. parity with the twin


@pytest.fixture(scope="module")
def small_feats():
    return real_features(40, batch=3)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["dprnn", "mpt"])
def test_small_random_models_match_torch_twin(torch, small_feats, name):
    net, w = twin_weights(torch, small_arch(name), seed=0)
    assert set(net.state_dict()) == set(expected_shapes(w.architecture))  # twin names = npdgru names
    golden = {P: twin(torch, net, small_feats, P) for P in (100, 50, 25)}
    for P, g in golden.items():
        ref = run_model(w, small_feats, P, "reference")
        cpu = run_model(w, small_feats, P, "cpu")
        assert cpu.shape == g.shape == small_feats.shape and cpu.dtype == np.float32
        assert 0.0 <= cpu.min() and cpu.max() <= 1.0
        e_ref, e_cpu = _maxdiff(ref, g), _maxdiff(cpu, g)
        assert e_ref <= REF_ATOL, f"{name} P={P}: |reference - torch| = {e_ref:.3g}"
        atol = CPU_DENSE_ATOL if P == 100 else CPU_SPARSE_ATOL
        assert e_cpu <= atol, f"{name} P={P}: |cpu - torch| = {e_cpu:.3g}"
    # the select gate really acts: P = 25 is a different model, far beyond the tolerance
    assert _maxdiff(golden[25], golden[100]) > 100 * CPU_SPARSE_ATOL, name


# ----------------------------------------------------------- 2. parity with the shipped weights


@pytest.mark.torch
@pytest.mark.parametrize("name", ["dprnn", "mpt"])
def test_shipped_weights_match_torch_twin(torch, name):
    if not SHIPPED[name].is_file():
        pytest.skip(f"{SHIPPED[name]} missing")
    from npdgru.train.torch_model import GraphNet

    w = load_weights(SHIPPED[name])
    assert w.architecture == architecture(name)  # the shipped file is the documented model
    assert w.metadata["format_version"] == "2"
    net = GraphNet.from_weights(w).eval()
    feats = real_features(31)
    masks = {}
    for P in (100, 50):
        g = twin(torch, net, feats, P)
        masks[P] = g
        assert g.std() > 0.1  # a trained mask on speech, not a constant
        e_ref = _maxdiff(run_model(w, feats, P, "reference"), g)
        e_cpu = _maxdiff(run_model(w, feats, P, "cpu"), g)
        assert e_ref <= REF_ATOL, f"{name} P={P}: |reference - torch| = {e_ref:.3g}"
        assert e_cpu <= (CPU_DENSE_ATOL if P == 100 else CPU_SPARSE_ATOL), f"{name} P={P}: |cpu - torch| = {e_cpu:.3g}"
    assert _maxdiff(masks[50], masks[100]) > 10 * CPU_SPARSE_ATOL


# -------------------------------------------------------- 3. offline == streaming, bit for bit


CHUNKINGS = [[1] * 30, [7, 1, 13, 2, 7], [30], [0, 16, 0, 14]]

# Bit-for-bit equalities across chunkings and batch sizes are the property of ``exact=True`` (every
# product in the fixed column order): the default BLAS products may round a call of 30 frames and
# one of 7 differently (OpenBLAS's kernels on a Zen 3 EPYC do); tests/test_exact_mode.py bounds the
# default path against it.


@pytest.mark.parametrize("name", ["dprnn", "mpt"])
def test_offline_equals_streaming_bit_for_bit(name):
    w = random_weights(small_arch(name), seed=3)
    feats = real_features(30, batch=2)
    m = MaskModel(w, update_percent=50, backend="cpu", exact=True)
    offline = m.forward(feats, m.init_state(2))
    for chunks in CHUNKINGS:
        assert sum(chunks) == 30
        state = m.init_state(2)
        parts, t = [], 0
        for n in chunks:
            parts.append(m.forward(feats[t : t + n], state))
            t += n
        got = np.concatenate(parts)
        assert np.array_equal(got, offline), f"{name} chunks {chunks}: max |diff| {_maxdiff(got, offline):.3g}"
    # the carried state after 17 frames is the same, in one call or in 17
    s1, s2 = m.init_state(2), m.init_state(2)
    m.forward(feats[:17], s1)
    for t in range(17):
        m.forward(feats[t : t + 1], s2)
    for a, b in zip(s1.layers, s2.layers):
        assert np.array_equal(a.h, b.h)
    assert np.array_equal(m.forward(feats[17:], s2), offline[17:])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dprnn_zero_frames(backend):
    """A 0-frame call (as for NSNet2, tests/test_model.py) returns (0, B, 161) and leaves the
    state alone. Regression: the BiGRU node asked the cpu GRU for a state of 0 streams."""
    w = random_weights(small_arch("dprnn"), seed=4)
    feats = real_features(12, batch=2)
    m = MaskModel(w, update_percent=50, backend=backend, exact=True)
    s = m.init_state(2)
    first = m.forward(feats[:5], s)
    empty = m.forward(feats[:0], s)
    assert empty.shape == (0, 2, 161) and empty.dtype == np.float32
    rest = m.forward(feats[5:], s)
    assert np.array_equal(np.concatenate([first, empty, rest]), m.forward(feats, m.init_state(2)))


def test_shipped_dprnn_offline_equals_one_frame_calls():
    if not SHIPPED["dprnn"].is_file():
        pytest.skip("weights/dprnn-anyp.safetensors missing")
    w = load_weights(SHIPPED["dprnn"])
    feats = real_features(20)
    m = MaskModel(w, update_percent=50, backend="cpu", exact=True)
    offline = m.forward(feats, m.init_state(1))
    state = m.init_state(1)
    stream = np.concatenate([m.forward(feats[t : t + 1], state) for t in range(20)])
    assert np.array_equal(stream, offline)


# ------------------------------------------------------------------- 4. batch invariance


@pytest.mark.parametrize("name, P", [("dprnn", 50), ("dprnn", 100), ("mpt", 50)])
def test_batch_equals_each_stream_alone(name, P):
    w = random_weights(small_arch(name), seed=5)
    feats = real_features(25, batch=4)
    m = MaskModel(w, update_percent=P, backend="cpu", exact=True)
    if name == "dprnn":
        assert m.gru_bands == [6, 6]
        assert [s.h.shape for s in m.init_state(4).layers] == [(24, 8), (24, 8)]  # B·F rows
    together = m.forward(feats, m.init_state(4))
    for b in range(4):
        alone = m.forward(feats[:, b : b + 1], m.init_state(1))
        assert np.array_equal(together[:, b : b + 1], alone), f"{name} P={P} stream {b}"
    assert _maxdiff(together[:, 0], together[:, 1]) > 1e-3  # the streams really differ


# ------------------------------------------------------------------------- 5. StreamBatch


def test_stream_batch_with_dprnn_equals_streams():
    from test_stream_batch import HOP, noise_speechlike, run_schedule

    w = random_weights(small_arch("dprnn"), seed=7)
    enh = Enhancer(w, update_percent=50, backend="cpu", exact=True)
    signals = [noise_speechlike(40 * HOP, seed) for seed in range(4)]
    schedule = {
        0: (0, None, False, ()),  # from the start to the end
        1: (0, 22, True, (3, 4)),  # leaves with flush, skipped two calls
        2: (5, 33, False, ()),  # joins late, leaves without flush
        3: (12, None, False, (20, 23, 26)),  # joins at 12, skips some calls
    }
    res = run_schedule(enh, schedule, signals, 40)
    for k, (got, want) in res.items():
        assert got.shape == want.shape, k
        assert np.array_equal(got, want), f"stream {k}: max |diff| {_maxdiff(got, want):.3g}"
    assert np.abs(res[0][0]).max() > 0
    # stream 0 alone gives the same bits as stream 0 in the crowd (the band rows never mix)
    alone = run_schedule(enh, {0: (0, None, False, ())}, signals[:1], 40)[0][0]
    assert np.array_equal(alone, res[0][0])


# ------------------------------------------------------------------------ 6. weight format


def test_dprnn_file_is_format_2_and_round_trips(tmp_path):
    w = random_weights(small_arch("dprnn"), seed=1)
    p = tmp_path / "d.safetensors"
    save_weights(p, w.tensors, architecture=w.architecture, trained_update_percent="any")
    back = load_weights(p)
    assert back.metadata["format_version"] == "2" and FORMAT_VERSION == 2
    assert back.architecture == w.architecture
    assert set(back.tensors) == set(w.tensors)
    for k in w.tensors:
        assert back.tensors[k].dtype == np.float32 and np.array_equal(back.tensors[k], w.tensors[k]), k
    feats = real_features(10)
    assert np.array_equal(run_model(back, feats, 50), run_model(w, feats, 50))
    # a plain linear/GRU chain is still written as format 1 (old readers keep reading it)
    chain = {"name": "c", "n_features": 161, "layers": [
        {"kind": "linear", "name": "fc1", "in": 161, "out": 8},
        {"kind": "gru", "name": "gru1", "in": 8, "hidden": 8},
        {"kind": "linear", "name": "fc2", "in": 8, "out": 161, "activation": "sigmoid"}]}
    cw = random_weights(chain, seed=2)
    save_weights(tmp_path / "c.safetensors", cw.tensors, architecture=chain)
    assert load_weights(tmp_path / "c.safetensors").metadata["format_version"] == "1"


def test_newer_format_version_refused(tmp_path):
    from safetensors.numpy import save_file

    w = random_weights(small_arch("dprnn"), seed=1)
    meta = {"format": "npdgru", "format_version": "3", "architecture": json.dumps(w.architecture), "sample_rate": "16000"}
    p = tmp_path / "v3.safetensors"
    save_file(w.tensors, str(p), metadata=meta)
    with pytest.raises(WeightsError, match="newer") as e:
        load_weights(p)
    assert str(p) in str(e.value) and "3" in str(e.value)


def _broken(name, edit):
    arch = copy.deepcopy(small_arch(name))
    layers = {spec["name"]: spec for spec in arch["layers"]}
    edit(layers, arch)
    return arch


BAD_ARCHS = [  # (case, model, edit, layer named in the message, another needle)
    ("unknown input", "dprnn", lambda L, a: L["intra1"].update(inputs=["nope"]), "intra1", "'nope'"),
    ("add widths differ", "dprnn", lambda L, a: L["intra1_res"].update(inputs=["pad", "intra1_norm"]), "intra1_res", "one width"),
    ("slice out of range", "dprnn", lambda L, a: L["mask"].update(stop=169), "mask", "not inside the width 168"),
    ("bands mismatch", "dprnn", lambda L, a: L["enc"].update(bands=5), "enc", "5 bands x 28"),
    ("bands on pad", "dprnn", lambda L, a: L["pad"].update(bands=2), "pad", "takes no 'bands'"),
    ("bands on concat", "mpt", lambda L, a: L["paths"].update(bands=2), "paths", "takes no 'bands'"),
    ("pad smaller than in", "dprnn", lambda L, a: L["pad"].update(out=100), "pad", "smaller than in=161"),
    ("concat one input", "mpt", lambda L, a: L["paths"].update(inputs=["sb1_gru"]), "paths", "at least two inputs"),
    ("input from a later layer", "mpt", lambda L, a: L["sb1_fc"].update(inputs=["fb_fc"]), "sb1_fc", "earlier layer"),
    ("layernorm size", "dprnn", lambda L, a: L["enc_norm"].update(size=7), "enc_norm", "size 7"),
]


@pytest.mark.parametrize("case, name, edit, layer, needle", BAD_ARCHS, ids=[c[0] for c in BAD_ARCHS])
def test_bad_architecture_refused_naming_the_layer(tmp_path, case, name, edit, layer, needle):
    arch = _broken(name, edit)
    with pytest.raises(WeightsError) as e:
        validate_architecture(arch)
    msg = str(e.value)
    assert f"layer {layer}:" in msg, msg
    assert needle in msg, msg
    # the same architecture in a file is refused on load, naming the file too
    from safetensors.numpy import save_file

    good = random_weights(small_arch(name), seed=0)
    p = tmp_path / "bad.safetensors"
    save_file(good.tensors, str(p), metadata={"format": "npdgru", "format_version": "2", "architecture": json.dumps(arch)})
    with pytest.raises(WeightsError) as e2:
        load_weights(p)
    assert str(p) in str(e2.value) and f"layer {layer}:" in str(e2.value)


# ------------------------------------------------------------------------------ 7. convert


@pytest.mark.torch
def test_convert_graphnet_checkpoint(torch, tmp_path):
    from npdgru.convert import convert_checkpoint

    arch = small_arch("dprnn")
    net, _ = twin_weights(torch, arch, seed=2)
    src = tmp_path / "last.pt"
    torch.save({"model": net.state_dict(), "step": 3}, src)
    arch_file = tmp_path / "dprnn-small.json"
    arch_file.write_text(json.dumps(arch))
    out = tmp_path / "d.safetensors"
    convert_checkpoint(src, out, arch=str(arch_file), trained_update_percent="any")
    w = load_weights(out)
    assert w.architecture == arch and w.metadata["format_version"] == "2" and w.metadata["converted_from"] == "last.pt"
    assert any(k.endswith("_reverse") for k in w.tensors)  # the bigru's second direction came through
    feats = real_features(20, batch=2)
    for P in (100, 50):
        g = twin(torch, net, feats, P)
        e = _maxdiff(run_model(w, feats, P, "cpu"), g)
        assert e <= (CPU_DENSE_ATOL if P == 100 else CPU_SPARSE_ATOL), f"P={P}: {e:.3g}"

    # the builtin full-size dprnn does not fit these tensors: every mis-shaped one is listed
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, tmp_path / "full.safetensors", arch="dprnn")
    assert "enc.weight has shape (8, 28), expected (32, 4)" in str(e.value)
    assert "inter1.weight_hh has shape (24, 8), expected (192, 64)" in str(e.value)
    assert not (tmp_path / "full.safetensors").exists()

    # as NSNet2 it is refused, the reverse directions named as bidirectional (never accepted)
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, tmp_path / "n.safetensors", arch="nsnet2")
    msg = str(e.value)
    assert str(src) in msg
    reverse = [k for k in net.state_dict() if k.endswith("_reverse")]
    assert len(reverse) == 8  # 2 blocks x 4 tensors
    for k in reverse:
        assert f"{k}: bidirectional" in msg, k
    assert not (tmp_path / "n.safetensors").exists()

    # without the reverse tensors the nsnet2 refusal still lists every problem at once
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("_reverse")}, tmp_path / "fwd.pt")
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(tmp_path / "fwd.pt", tmp_path / "n.safetensors", arch="nsnet2")
    msg = str(e.value)
    assert "missing tensor fc1.weight" in msg and "missing tensor gru2.bias_hh" in msg
    assert "unexpected tensor inter1.weight_ih" in msg and "unexpected tensor intra2.weight_hh" in msg
    assert not (tmp_path / "n.safetensors").exists()


# ------------------------------------------------------------------------------- 8. MACs


def test_macs_per_frame_by_hand():
    """MACs per frame of the full-size models from the sizes in npdgru/architectures.py.

    DPRNN (F = 41 bands of 4 bins, C = 32, intra BiGRU 2 x 16, inter D-GRU 32 -> 64, 2 blocks)
      D-GRU dense per band and layer 3·64·(32 + 64) = 18432; x 41 bands x 2 layers = 1,511,424
      P = 50: A = 32, paper (64 + 2·32)·96 = 12288, ours 3·64·32 + 3·64·32 = 12288; x 82 = 1,007,616
      other: enc 41·4·32 = 5248; per block BiGRU 41·2·3·16·(32 + 16) = 188,928,
             intra_fc 41·32·32 = 41,984, inter_fc 41·64·32 = 83,968 (x 2 blocks = 629,760);
             dec 41·32·4 = 5248; total 640,256  (dense total 2,151,680: the docstring's 2.15 M)
    MPT (sub-bands 40, 40, 40, 41 bins -> 64 -> D-GRU 160; full band 161 -> 128 -> D-GRU 256)
      D-GRU dense: 4·3·160·(64 + 160) = 430,080 + 3·256·(128 + 256) = 294,912 -> 724,992
      P = 50: sub A = 80: paper (160 + 160)·224 = 71,680 (x 4 = 286,720), ours 3·160·64 + 3·160·80
              = 69,120 (x 4 = 276,480); full A = 128: paper (256 + 256)·384 = 196,608,
              ours 3·256·128 + 3·256·128 = 196,608 -> paper 483,328, ours 473,088
      other: 3·40·64 + 41·64 = 10,304; 161·128 = 20,608; 896·300 = 268,800; 300·161 = 48,300
             -> 348,012  (dense total 1,073,004: the docstring's 1.07 M, 67.6 % in the D-GRUs)
    """
    hand = {
        ("dprnn", 100): {"gru_dense": 1_511_424, "gru_paper": 1_511_424, "gru_ours": 1_511_424, "other": 640_256},
        ("dprnn", 50): {"gru_dense": 1_511_424, "gru_paper": 1_007_616, "gru_ours": 1_007_616, "other": 640_256},
        ("mpt", 100): {"gru_dense": 724_992, "gru_paper": 724_992, "gru_ours": 724_992, "other": 348_012},
        ("mpt", 50): {"gru_dense": 724_992, "gru_paper": 483_328, "gru_ours": 473_088, "other": 348_012},
    }
    assert 3 * 64 * (32 + 64) * 41 * 2 == 1_511_424 and (64 + 64) * 96 * 82 == 1_007_616
    assert 41 * 4 * 32 + 2 * (41 * 2 * 3 * 16 * 48 + 41 * 32 * 32 + 41 * 64 * 32) + 41 * 32 * 4 == 640_256
    assert 4 * 3 * 160 * 224 + 3 * 256 * 384 == 724_992 and 3 * 40 * 64 + 41 * 64 + 161 * 128 + 896 * 300 + 300 * 161 == 348_012
    # the per-layer D-GRU numbers through count_macs, times bands, agree with the arithmetic
    for P in (100, 50):
        d = count_macs(32, 64, P)
        assert (82 * d.dense, 82 * d.paper, 82 * d.sparse) == tuple(hand["dprnn", P][k] for k in ("gru_dense", "gru_paper", "gru_ours"))
        s, f = count_macs(64, 160, P), count_macs(128, 256, P)
        assert (4 * s.dense + f.dense, 4 * s.paper + f.paper, 4 * s.sparse + f.sparse) == tuple(hand["mpt", P][k] for k in ("gru_dense", "gru_paper", "gru_ours"))
    for name in ("dprnn", "mpt"):
        w = random_weights(architecture(name), seed=0)
        for P in (100, 50):
            m = MaskModel(w, update_percent=P, backend="cpu")
            assert m.macs_per_frame() == hand[name, P], (name, P)
        assert MaskModel(w, update_percent=50).fraction_updated() == 0.5
    assert hand["dprnn", 100]["gru_dense"] + hand["dprnn", 100]["other"] == 2_151_680
    assert hand["mpt", 100]["gru_dense"] + hand["mpt", 100]["other"] == 1_073_004


# --------------------------------------------------------------------------------- 9. CLI


def test_cli_enhance_and_info_with_dprnn(tmp_path, capsys):
    if not SHIPPED["dprnn"].is_file():
        pytest.skip("weights/dprnn-anyp.safetensors missing")
    import soundfile as sf

    out = tmp_path / "out.wav"
    status = main(["enhance", str(EXAMPLE), "-o", str(out), "--weights", str(SHIPPED["dprnn"]), "--update-percent", "50"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    x, sr = sf.read(str(EXAMPLE), dtype="float32")
    y, sr_out = sf.read(str(out), dtype="float32")
    assert sr_out == sr == 16000 and y.shape == x.shape
    assert np.isfinite(y).all() and 0 < np.sum(y**2) < np.sum(x**2)
    assert "50.0% of GRU neurons updated per frame (P=50)" in stdout

    assert main(["info", str(SHIPPED["dprnn"])]) == 0
    text = capsys.readouterr().out
    assert "BiGRU 32 -> 2x16 (across the bands of a frame, dense), 41 bands  <- enc_norm" in text
    assert "D-GRU 32 -> 64 (along time), 41 bands" in text
    assert "Pad 161 -> 164" in text and "Slice [0:161]" in text
    assert "format_version: 2" in text and "trained_update_percent: any" in text
    n_params = sum(a.size for a in load_weights(SHIPPED["dprnn"]).tensors.values())
    assert n_params == 54_116 and "parameters: 54,116 float32" in text


# ---------------------------------------------------------------------------- the cpu LayerNorm kernel


@pytest.mark.parametrize("N, C", [(13, 7), (1, 1), (9, 32), (0, 5)])
def test_cpu_layer_norm_matches_reference_and_is_row_invariant(N, C):
    """cpu's _layer_norm (numba, float32) against its twin reference.layer_norm (float64)."""
    from npdgru import reference as ref
    from npdgru.kernels import cpu

    rng = np.random.default_rng(N * 100 + C)
    x = (rng.standard_normal((N, C)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    ln = cpu.LayerNorm(w, b, eps=1e-5, name="ln")
    y = ln.forward(x)
    want = ref.layer_norm(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5)
    assert y.dtype == np.float32 and y.shape == (N, C)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
    for n in range(N):  # a row alone gives the bits it gets in the block (offline == streaming)
        assert np.array_equal(ln.forward(x[n : n + 1])[0], y[n])


def test_cpu_layer_norm_refuses_bad_weights_and_input():
    from npdgru.errors import ParameterError
    from npdgru.kernels import cpu

    with pytest.raises(ParameterError, match=r"ln\.weight must be 1-D"):
        cpu.LayerNorm(np.ones((2, 2), np.float32), np.zeros(2, np.float32), name="ln")
    with pytest.raises(ParameterError, match=r"ln\.bias must have shape \(3,\)"):
        cpu.LayerNorm(np.ones(3, np.float32), np.zeros(4, np.float32), name="ln")
    with pytest.raises(ParameterError, match=r"ln\.weight contains NaN"):
        cpu.LayerNorm(np.array([1.0, np.nan], np.float32), np.zeros(2, np.float32), name="ln")
    ln = cpu.LayerNorm(np.ones(3, np.float32), np.zeros(3, np.float32), name="ln")
    with pytest.raises(ParameterError, match=r"ln: x must have shape \(N, 3\)"):
        ln.forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ParameterError, match="NaN or Inf"):
        ln.forward(np.array([[0.0, np.inf, 1.0]], np.float32))
