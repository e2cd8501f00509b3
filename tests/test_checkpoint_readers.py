"""read_checkpoint on genuine checkpoints: every way torch (and safetensors) writes a state dict.

Each test saves with the real writer and compares read_checkpoint's float32 arrays exactly
against the torch tensors cast to float32. Tests that need torch skip when it is absent.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from npdgru.convert.torch_checkpoint import detect_format, read_checkpoint
from npdgru.errors import CheckpointError


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


try:  # Net must live at module level so that torch.save(model) can pickle it whole
    import torch as _torch
except ImportError:  # pragma: no cover - torch is optional
    _torch = None

if _torch is not None:

    class Net(_torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            nn = _torch.nn
            self.inp = nn.Linear(8, 16)
            self.gru = nn.GRU(16, 12, num_layers=2, batch_first=True)
            self.norm = nn.BatchNorm1d(12)  # adds an int64 num_batches_tracked buffer
            self.out = nn.Linear(12, 4)

        def forward(self, x: Any) -> Any:
            h, _ = self.gru(_torch.tanh(self.inp(x)))
            return self.out(self.norm(h.transpose(1, 2)).transpose(1, 2))


def _net(torch: Any) -> Any:
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(2, 5, 8))  # updates the BatchNorm running statistics
    return net


def _expected(sd: dict[str, Any], torch: Any) -> dict[str, np.ndarray]:
    return {
        k: v.detach().to(torch.float32).numpy()
        for k, v in sd.items()
        if v.dtype.is_floating_point
    }


def _assert_same(state: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(state) == list(expected)
    for name, ref in expected.items():
        got = state[name]
        assert got.dtype == np.float32, name
        assert got.flags.c_contiguous, name
        assert got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=name)


def _save(torch: Any, obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_state_dict_roundtrip(torch: Any, tmp_path: Path, legacy: bool) -> None:
    sd = _net(torch).state_dict()
    path = _save(torch, sd, tmp_path / "net.pt", legacy)
    assert detect_format(path) == ("torch-legacy" if legacy else "torch-zip")
    state, notes = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    assert "gru.weight_hh_l1" in state and state["gru.weight_ih_l0"].shape == (36, 16)
    assert any("legacy" in n for n in notes) == legacy
    assert any("norm.num_batches_tracked" in n and "dropped" in n for n in notes)
    assert not any("cast" in n for n in notes)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_wrapped_checkpoints(torch: Any, tmp_path: Path, key: str, legacy: bool) -> None:
    sd = _net(torch).state_dict()
    path = _save(torch, {key: sd, "epoch": 7, "note": "best"}, tmp_path / "w.pt", legacy)
    state, notes = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    assert any(n.startswith(f"unwrapped '{key}'") for n in notes), notes


def test_lightning_like_checkpoint(torch: Any, tmp_path: Path) -> None:
    net = _net(torch)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 3, 8)).sum().backward()
    opt.step()
    sd = net.state_dict()
    ckpt = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 1e-3, "hidden": 12, "betas": (0.9, 0.999)},
    }
    path = _save(torch, ckpt, tmp_path / "epoch=3.ckpt")
    state, notes = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    assert any(n.startswith("unwrapped 'state_dict'") and "optimizer_states" in n for n in notes)
    assert "stripped prefix 'model.'" in notes


def test_data_parallel_prefix(torch: Any, tmp_path: Path) -> None:
    sd = _net(torch).state_dict()
    path = _save(torch, {f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    state, notes = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    assert "stripped prefix 'module.'" in notes


def test_prefix_kept_unless_shared_by_all(torch: Any, tmp_path: Path) -> None:
    sd = {"model.w": torch.ones(2), "head.b": torch.zeros(3)}
    state, notes = read_checkpoint(_save(torch, sd, tmp_path / "p.pt"))
    assert list(state) == ["model.w", "head.b"]
    assert not any("stripped" in n for n in notes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_low_and_high_precision(torch: Any, tmp_path: Path, dtype: str, legacy: bool) -> None:
    net = _net(torch).to(getattr(torch, dtype))
    sd = net.state_dict()
    path = _save(torch, sd, tmp_path / f"{dtype}.pt", legacy)
    state, notes = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    n_float = sum(1 for v in sd.values() if v.dtype.is_floating_point)
    assert f"cast {n_float} {dtype} tensors to float32" in notes, notes


def test_bfloat16_special_values(torch: Any, tmp_path: Path) -> None:
    t = torch.tensor([0.0, -0.0, 1.5, -2.75, 3.0e38, 1e-40, float("inf"), float("-inf")],
                     dtype=torch.bfloat16)
    state, _ = read_checkpoint(_save(torch, {"x": t}, tmp_path / "bf.pt"))
    np.testing.assert_array_equal(state["x"], t.float().numpy())
    assert np.signbit(state["x"][1])


def test_float64_overflow_noted(torch: Any, tmp_path: Path) -> None:
    t = torch.tensor([1.0, 1e300, -1e300], dtype=torch.float64)
    state, notes = read_checkpoint(_save(torch, {"x": t}, tmp_path / "f64.pt"))
    np.testing.assert_array_equal(state["x"], np.array([1.0, np.inf, -np.inf], np.float32))
    assert any("overflowed" in n for n in notes)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_and_shared_storage(torch: Any, tmp_path: Path, legacy: bool) -> None:
    big = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 3
    sd = {
        "full": big,
        "rows": big[1:3],  # offset view
        "col": big[:, 4],  # strided view
        "t": big.t(),  # transposed, non-contiguous
        "steps": big[::2, 1::3],  # 2-D strided with offset
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "scalar": big[2, 5],  # 0-d view
        "empty": big[:0],  # zero elements
        "tied_a": big,  # the same tensor under two names
    }
    path = _save(torch, sd, tmp_path / "views.pt", legacy)
    if not legacy:
        with zipfile.ZipFile(path) as zf:
            records = [n for n in zf.namelist() if re.search(r"/data/\d+$", n)]
        assert len(records) == 2  # big's storage is written once and shared
    state, _ = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
    assert state["scalar"].shape == () and state["empty"].shape == (0, 10)
    assert not np.shares_memory(state["full"], state["tied_a"])


def test_nested_dicts_and_parameters(torch: Any, tmp_path: Path) -> None:
    enc, dec = torch.nn.Linear(4, 3), torch.nn.GRU(3, 2)
    obj = {
        "encoder": enc.state_dict(),
        "decoder": {"gru": dec.state_dict()},
        "scale": torch.nn.Parameter(torch.tensor([2.0, 3.0])),  # pickled via _rebuild_parameter
        "layers": [torch.ones(2), torch.zeros(1)],
    }
    state, notes = read_checkpoint(_save(torch, obj, tmp_path / "nested.pt"))
    expected = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    expected |= {f"decoder.gru.{k}": v for k, v in dec.state_dict().items()}
    expected |= {"scale": obj["scale"], "layers.0": obj["layers"][0], "layers.1": obj["layers"][1]}
    _assert_same(state, _expected(expected, torch))


def test_non_tensor_entries_ignored_with_note(torch: Any, tmp_path: Path) -> None:
    state, notes = read_checkpoint(
        _save(torch, {"w": torch.ones(2), "epoch": 3, "name": "x"}, tmp_path / "m.pt"))
    assert list(state) == ["w"]
    assert any("ignored 2 non-tensor entries" in n and "'epoch'" in n for n in notes)


def test_no_float_tensors_refused(torch: Any, tmp_path: Path) -> None:
    path = _save(torch, {"steps": torch.tensor(5), "ids": torch.arange(4)}, tmp_path / "i.pt")
    with pytest.raises(CheckpointError, match="no floating-point tensors"):
        read_checkpoint(path)


@pytest.mark.parametrize("dtype,itemsize", [("float32", 4), ("float16", 2), ("float64", 8)])
def test_big_endian_archive(torch: Any, tmp_path: Path, dtype: str, itemsize: int) -> None:
    sd = {"w": (torch.arange(12.0).reshape(3, 4) / 7).to(getattr(torch, dtype)),
          "b": torch.tensor([-1.5, 2.25]).to(getattr(torch, dtype))}
    little = _save(torch, sd, tmp_path / "le.pt")
    big = tmp_path / "be.pt"
    with zipfile.ZipFile(little) as zin, zipfile.ZipFile(big, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif re.search(r"/data/\d+$", info.filename):
                data = np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
            zout.writestr(info.filename, data)
    ref = torch.load(big, weights_only=True)  # torch agrees on what the big-endian file holds
    np.testing.assert_array_equal(ref["w"].float().numpy(), sd["w"].float().numpy())
    state, notes = read_checkpoint(big)
    _assert_same(state, _expected(sd, torch))
    assert any("big-endian" in n for n in notes)


def test_safetensors_from_torch(torch: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = _net(torch).state_dict()
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    state, notes = read_checkpoint(path)
    # safetensors sorts tensors by dtype/name; compare as a mapping
    expected = _expected(sd, torch)
    assert set(state) == set(expected)
    _assert_same({k: state[k] for k in expected}, expected)
    assert notes[0] == "read safetensors file"
    assert any("num_batches_tracked" in n for n in notes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_safetensors_dtypes(torch: Any, tmp_path: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    sd = {k: v.to(getattr(torch, dtype)) for k, v in torch.nn.GRU(5, 3).state_dict().items()}
    path = tmp_path / "g.safetensors"
    save_file(sd, str(path))
    state, notes = read_checkpoint(path)
    expected = _expected(sd, torch)
    _assert_same({k: state[k] for k in expected}, expected)
    assert f"cast 4 {dtype} tensors to float32" in notes


def test_safetensors_numpy_writer(tmp_path: Path) -> None:
    """No torch needed: the numpy writer, and agreement with the reference reader."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((3, 4)).astype(np.float32),
              "model.b": rng.standard_normal(5).astype(np.float16),
              "c": np.zeros((0, 2), np.float32),
              "steps": np.array([3], np.int64)}
    path = tmp_path / "n.safetensors"
    save_file(arrays, str(path))
    state, notes = read_checkpoint(path)
    ref = load_file(str(path))
    assert set(state) == {"a", "model.b", "c"}
    for k in state:
        np.testing.assert_array_equal(state[k], ref[k].astype(np.float32))
        assert state[k].dtype == np.float32
    assert any("steps (int64)" in n for n in notes)


def test_dispatch_on_content_not_extension(torch: Any, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = torch.nn.Linear(3, 2).state_dict()
    cases = {
        "torch-zip": _save(torch, sd, tmp_path / "zip.safetensors"),
        "torch-legacy": _save(torch, sd, tmp_path / "legacy.bin", legacy=True),
        "safetensors": tmp_path / "st.pt",
    }
    save_file(sd, str(cases["safetensors"]))
    for fmt, path in cases.items():
        assert detect_format(path) == fmt
        state, notes = read_checkpoint(path)
        _assert_same({k: state[k] for k in sd}, _expected(sd, torch))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_whole_module_refused_with_hint(torch: Any, tmp_path: Path, legacy: bool) -> None:
    cases = ((_net(torch), "Net"), (torch.nn.Linear(3, 2), "torch.nn.modules.linear.Linear"))
    for model, name in cases:
        path = _save(torch, model, tmp_path / "model.pt", legacy)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        msg = str(info.value)
        assert name in msg and "nn.Module" in msg and "model.state_dict()" in msg, msg
        assert str(path) in msg


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_refused(torch: Any, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript") as info:
        read_checkpoint(path)
    assert "model.state_dict()" in str(info.value)


def test_in_memory_torch_bytes_equal_file(torch: Any, tmp_path: Path) -> None:
    """torch.save to a buffer then to disk byte-for-byte reads the same (no path magic)."""
    sd = torch.nn.Linear(4, 4).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    path = tmp_path / "noext"
    path.write_bytes(buf.getvalue())
    state, _ = read_checkpoint(path)
    _assert_same(state, _expected(sd, torch))
