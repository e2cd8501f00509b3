"""NSNet2 ONNX -> npdgru conversion (npdgru.convert.onnx_nsnet2).

The real model is found through the environment variable NPDGRU_NSNET2_ONNX or at
``.cache/nsnet2/nsnet2-20ms-baseline.onnx`` under the repository root (``tools/fetch_nsnet2.sh``
puts it there); tests that need it skip with a message when it is absent. The torch round-trip
test needs no download: it exports a randomly initialised NSNet2 from PyTorch.

The numerical check runs an independent plain-NumPy forward pass, written here from the
PyTorch GRU equations (not from npdgru code), on the converted tensors and compares its mask with
onnxruntime's on real features.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from npdgru.convert.onnx_nsnet2 import (  # noqa: E402
    NSNET2_ARCHITECTURE,
    NSNET2_LICENSE,
    NSNET2_ONNX_SHA256,
    NSNET2_SOURCE,
    NSNET2_TENSOR_MAP,
    NSNET2_TRANSFORMS,
    read_nsnet2_onnx,
)
from npdgru.errors import CheckpointError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOISY_DIR = REPO.parent / "shared" / "data" / "testset" / "noisy"

# onnxruntime (float32) vs the float64 NumPy forward; measured max |diff| ~1e-6 on real features.
MASK_ATOL = 1e-5


# ------------------------------------------------------------------------------- fixtures


def _model_path() -> Path | None:
    env = os.environ.get("NPDGRU_NSNET2_ONNX")
    if env:
        return Path(env)
    p = REPO / ".cache" / "nsnet2" / "nsnet2-20ms-baseline.onnx"
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def model_path() -> Path:
    p = _model_path()
    if p is None or not p.is_file():
        pytest.skip("NSNet2 ONNX model not found: run tools/fetch_nsnet2.sh (puts it in "
                    ".cache/nsnet2/) or set NPDGRU_NSNET2_ONNX to its path")
    return p


@pytest.fixture(scope="module")
def converted(model_path):
    return read_nsnet2_onnx(model_path)


@pytest.fixture(scope="module")
def model_proto(model_path):
    return onnx.load(str(model_path))


def _copy(proto):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    return m


def _save(model, tmp_path, name="corrupt.onnx") -> Path:
    p = tmp_path / name
    p.write_bytes(model.SerializeToString())
    return p


# ------------------------------------------------------------- independent NumPy forward


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _gru_forward(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.GRU, gate order r, z, n, h0 = 0. x: (T, I) -> (T, H)."""
    H = w_hh.shape[1]
    gi = x @ w_ih.T + b_ih  # (T, 3H), all steps at once
    h = np.zeros(H, dtype=x.dtype)
    out = np.empty((x.shape[0], H), dtype=x.dtype)
    for t in range(x.shape[0]):
        gh = w_hh @ h + b_hh
        r = _sigmoid(gi[t, :H] + gh[:H])
        z = _sigmoid(gi[t, H:2 * H] + gh[H:2 * H])
        n = np.tanh(gi[t, 2 * H:] + r * gh[2 * H:])  # reset after the recurrent product
        h = (1.0 - z) * n + z * h
        out[t] = h
    return out


def _numpy_forward(arch, tensors, feats, dtype=np.float64):
    """feats (T, 161) -> mask (T, 161), following ``arch`` layer by layer."""
    acts = {"relu": lambda a: np.maximum(a, 0.0), "sigmoid": _sigmoid}
    y = feats.astype(dtype)
    for L in arch["layers"]:
        p = {k.split(".", 1)[1]: v.astype(dtype) for k, v in tensors.items()
             if k.split(".", 1)[0] == L["name"]}
        if L["kind"] == "linear":
            y = acts[L["activation"]](y @ p["weight"].T + p["bias"])
        else:
            y = _gru_forward(y, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
    return y


def _features(x: np.ndarray) -> np.ndarray:
    """log10(max(|rfft(w * frame)|^2, 1e-12)), w = sqrt periodic Hann(320), hop 160.

    Frame t = xp[160 t : 160 t + 320], xp = 160 zeros + x + zero tail. Returns (1, T, 161)
    float32.
    """
    n = np.arange(320)
    win = np.sqrt(0.5 - 0.5 * np.cos(2.0 * np.pi * n / 320))
    T = math.ceil(len(x) / 160) + 1
    xp = np.zeros((T + 1) * 160)
    xp[160:160 + len(x)] = x
    frames = np.stack([xp[t * 160:t * 160 + 320] for t in range(T)])
    power = np.abs(np.fft.rfft(frames * win, n=320, axis=-1)) ** 2
    return np.log10(np.maximum(power, 1e-12)).astype(np.float32)[None]


def _noisy_audio() -> np.ndarray:
    files = sorted(NOISY_DIR.glob("*.flac")) + sorted(NOISY_DIR.glob("*.wav"))
    if files:
        sf = pytest.importorskip("soundfile")
        x, fs = sf.read(str(files[0]), dtype="float64", always_2d=True)
        assert fs == 16000
        return x[:3 * 16000, 0]
    # No test set here: a speech-like synthetic signal keeps the check meaningful.
    rng = np.random.default_rng(0)
    t = np.arange(3 * 16000) / 16000
    voiced = np.sin(2 * np.pi * (150 + 50 * np.sin(2 * np.pi * 3 * t)) * t) * (t % 0.5 < 0.3)
    return 0.3 * voiced + 0.05 * rng.standard_normal(t.size)


# ---------------------------------------------------------------------------------- tests


def test_mapping_table_is_complete_and_named():
    """Every tensor of every layer appears once; every transformation is defined."""
    names = [row[0] for row in NSNET2_TENSOR_MAP]
    assert len(names) == len(set(names))
    want = []
    for L in NSNET2_ARCHITECTURE["layers"]:
        keys = ("weight", "bias") if L["kind"] == "linear" else (
            "weight_ih", "weight_hh", "bias_ih", "bias_hh")
        want += [f"{L['name']}.{k}" for k in keys]
    assert sorted(names) == sorted(want)
    assert {row[3] for row in NSNET2_TENSOR_MAP} <= set(NSNET2_TRANSFORMS)
    assert "CC BY 4.0" in NSNET2_LICENSE and "Microsoft" in NSNET2_SOURCE


def test_architecture_and_layout(converted, model_proto):
    arch, tensors = converted
    assert arch == NSNET2_ARCHITECTURE
    assert arch is not NSNET2_ARCHITECTURE  # a copy: callers may not mutate the constant
    assert list(tensors) == [row[0] for row in NSNET2_TENSOR_MAP]
    shapes = {
        "fc1.weight": (400, 161), "fc1.bias": (400,),
        "fc2.weight": (600, 400), "fc2.bias": (600,),
        "fc3.weight": (600, 600), "fc3.bias": (600,),
        "fc4.weight": (161, 600), "fc4.bias": (161,),
    }
    for g in ("gru1", "gru2"):
        shapes.update({f"{g}.weight_ih": (1200, 400), f"{g}.weight_hh": (1200, 400),
                       f"{g}.bias_ih": (1200,), f"{g}.bias_hh": (1200,)})
    for k, v in tensors.items():
        assert v.shape == shapes[k], k
        assert v.dtype == np.float32 and v.flags.c_contiguous, k

    # The published file's initializer names are the ones the table documents.
    inits = {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    assert {row[2] for row in NSNET2_TENSOR_MAP} <= set(inits)

    # Spot-check the transformations by hand, independent of the table's code.
    H = 400
    W, R, B = inits["192"][0], inits["193"][0], inits["194"][0]  # ONNX blocks z, r, h
    z, r, h = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    np.testing.assert_array_equal(tensors["gru1.weight_ih"][:H], W[r])
    np.testing.assert_array_equal(tensors["gru1.weight_ih"][H:2 * H], W[z])
    np.testing.assert_array_equal(tensors["gru1.weight_ih"][2 * H:], W[h])
    np.testing.assert_array_equal(tensors["gru1.weight_hh"][:H], R[r])
    np.testing.assert_array_equal(tensors["gru1.bias_ih"][H:2 * H], B[:3 * H][z])
    np.testing.assert_array_equal(tensors["gru1.bias_hh"][:H], B[3 * H:][r])
    np.testing.assert_array_equal(tensors["gru1.bias_hh"][2 * H:], B[3 * H:][h])
    np.testing.assert_array_equal(tensors["fc1.weight"], inits["172"].T)
    np.testing.assert_array_equal(tensors["fc4.bias"], inits["fc_out.4.bias"])


def test_published_file_hash(model_path):
    import hashlib

    if os.environ.get("NPDGRU_NSNET2_ONNX"):
        pytest.skip("NPDGRU_NSNET2_ONNX may point to a re-export; hash not checked")
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == NSNET2_ONNX_SHA256


def test_mask_matches_onnxruntime(model_path, converted):
    arch, tensors = converted
    feats = _features(_noisy_audio())
    assert feats.shape[0] == 1 and feats.shape[2] == 161 and feats.shape[1] > 250

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ((inp,),) = [sess.get_inputs()]
    want = sess.run(None, {inp.name: feats})[0][0]

    got = _numpy_forward(arch, tensors, feats[0], np.float64)
    got32 = _numpy_forward(arch, tensors, feats[0], np.float32)
    err = float(np.max(np.abs(got - want)))
    err32 = float(np.max(np.abs(got32 - want)))
    print(f"\nNSNet2 mask, {feats.shape[1]} frames: max |numpy64 - onnxruntime| = {err:.3g}, "
          f"max |numpy32 - onnxruntime| = {err32:.3g}, mask range "
          f"[{want.min():.3g}, {want.max():.3g}]")
    assert want.std() > 0.05  # a real, non-trivial mask
    assert err <= MASK_ATOL, err
    assert err32 <= MASK_ATOL, err32


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter is chatty (deprecation, tracer)
def test_torch_export_roundtrip(tmp_path):
    """A fresh PyTorch NSNet2 exported to ONNX converts back to exactly its state_dict.

    Needs no download, and checks the gate reordering against PyTorch itself. Initializer names
    of a modern export differ from the published file ("onnx::GRU_192"), which the role-based
    reader must not care about.
    """
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class NSNet2(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in = nn.Sequential(nn.Linear(161, 400), nn.ReLU())
            self.rnn = nn.GRU(400, 400, num_layers=2, batch_first=True)
            self.fc_out = nn.Sequential(nn.Linear(400, 600), nn.ReLU(), nn.Linear(600, 600),
                                        nn.ReLU(), nn.Linear(600, 161), nn.Sigmoid())

        def forward(self, x):
            return self.fc_out(self.rnn(self.fc_in(x))[0])

    torch.manual_seed(0)
    net = NSNet2().eval()
    path = tmp_path / "nsnet2_torch.onnx"
    x = torch.randn(1, 20, 161)
    try:
        torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 1: "frames"},
                                        "output": {0: "batch", 1: "frames"}},
                          opset_version=11, dynamo=False)
    except Exception as exc:  # exporter availability varies between torch versions
        pytest.skip(f"torch.onnx.export (TorchScript exporter) unavailable: {exc}")

    arch, tensors = read_nsnet2_onnx(path)
    assert arch == NSNET2_ARCHITECTURE
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    torch_name = {"fc1": "fc_in.0", "fc2": "fc_out.0", "fc3": "fc_out.2", "fc4": "fc_out.4"}
    for ours, arr in tensors.items():
        layer, what = ours.split(".")
        if layer.startswith("gru"):
            key = f"rnn.{what}_l{int(layer[3:]) - 1}"
        else:
            key = f"{torch_name[layer]}.{what}"
        np.testing.assert_array_equal(arr, sd[key], err_msg=ours)

    with torch.no_grad():
        want = net(x).numpy()[0]
    got = _numpy_forward(arch, tensors, x.numpy()[0], np.float64)
    np.testing.assert_allclose(got, want, atol=MASK_ATOL, rtol=0)


# ------------------------------------------------------------------------ corrupt models


def _init(model, name):
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return t


def _node(model, op_type, k=0):
    return [n for n in model.graph.node if n.op_type == op_type][k]


def _set_attr(node, name, value):
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def test_missing_initializer(model_proto, tmp_path):
    m = _copy(model_proto)
    m.graph.initializer.remove(_init(m, "193"))
    p = _save(m, tmp_path)
    with pytest.raises(CheckpointError) as ei:
        read_nsnet2_onnx(p)
    msg = str(ei.value)
    assert "'193'" in msg and "gru1.weight_hh" in msg and "missing" in msg and str(p) in msg


def test_reshaped_initializer(model_proto, tmp_path):
    m = _copy(model_proto)
    t = _init(m, "172")
    a = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a.T), "172"))  # (400, 161)
    p = _save(m, tmp_path)
    with pytest.raises(CheckpointError) as ei:
        read_nsnet2_onnx(p)
    msg = str(ei.value)
    assert "'172'" in msg and "fc1.weight" in msg and "(400, 161)" in msg and "(161, 400)" in msg


def test_wrong_dtype_initializer(model_proto, tmp_path):
    m = _copy(model_proto)
    t = _init(m, "fc_out.2.bias")
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64),
                                       "fc_out.2.bias"))
    with pytest.raises(CheckpointError, match=r"fc_out\.2\.bias.*DOUBLE"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_non_finite_initializer(model_proto, tmp_path):
    m = _copy(model_proto)
    t = _init(m, "214")
    a = numpy_helper.to_array(t).copy()
    a[0, 5] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, "214"))
    with pytest.raises(CheckpointError, match=r"'214'.*NaN"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_linear_before_reset_zero_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    _set_attr(_node(m, "GRU", 1), "linear_before_reset", 0)
    with pytest.raises(CheckpointError, match=r"gru2.*linear_before_reset=0"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_reverse_direction_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    _set_attr(_node(m, "GRU", 0), "direction", "reverse")
    with pytest.raises(CheckpointError, match=r"gru1.*direction='reverse'"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_unsupported_op_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    _node(m, "Relu", 1).op_type = "Tanh"
    with pytest.raises(CheckpointError, match="unsupported op 'Tanh'"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_wrong_activation_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    _node(m, "Sigmoid", 0).op_type = "Relu"  # fc4 + relu instead of sigmoid
    with pytest.raises(CheckpointError, match="layer sequence"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_nonzero_initial_state_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    _set_attr(_node(m, "ConstantOfShape"), "value",
              numpy_helper.from_array(np.array([0.5], dtype=np.float32)))
    with pytest.raises(CheckpointError, match="initial state"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_external_data_refused(model_proto, tmp_path):
    m = _copy(model_proto)
    t = _init(m, "216")
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    with pytest.raises(CheckpointError, match=r"'216'.*external data"):
        read_nsnet2_onnx(_save(m, tmp_path))


def test_not_onnx_and_missing_file(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    with pytest.raises(CheckpointError, match="junk.onnx"):
        read_nsnet2_onnx(junk)
    with pytest.raises(CheckpointError, match="fetch_nsnet2"):
        read_nsnet2_onnx(tmp_path / "absent.onnx")
