"""The npdgru weight file (npdgru.weights): round trip, description, and every refusal.

Every refusal is a WeightsError whose message names the file and, where there is one, the
tensor. Bad files are written here directly with ``safetensors.numpy.save_file`` so that the
loader, not the writer, is what refuses them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from npdgru.errors import WeightsError
from npdgru.weights import (
    FORMAT_VERSION,
    Weights,
    expected_shapes,
    load_weights,
    save_weights,
    validate_architecture,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "nsnet2.safetensors"

TINY = {
    "name": "tiny",
    "n_features": 5,
    "layers": [
        {"kind": "linear", "name": "fc1", "in": 5, "out": 4, "activation": "relu"},
        {"kind": "gru", "name": "gru1", "in": 4, "hidden": 3},
        {"kind": "linear", "name": "fc2", "in": 3, "out": 5, "activation": "sigmoid"},
    ],
}


def tiny_tensors(seed=0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in expected_shapes(TINY).items()}


def tiny_meta(**over) -> dict[str, str]:
    meta = {
        "format": "npdgru",
        "format_version": str(FORMAT_VERSION),
        "architecture": json.dumps(TINY),
        "sample_rate": "16000",
        "trained_update_percent": "100",
        "source": "unit test",
        "license": "CC0",
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def write_raw(path: Path, tensors=None, **meta_over) -> Path:
    """A safetensors file as a foreign or damaged tool might write it (no npdgru checks)."""
    save_file(tiny_tensors() if tensors is None else tensors, str(path), metadata=tiny_meta(**meta_over))
    return path


def refused(path, *needles) -> str:
    """Load ``path``, expect a WeightsError naming the file and every needle; return the message."""
    with pytest.raises(WeightsError) as ei:
        load_weights(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------- good files


def test_round_trip(tmp_path):
    t = tiny_tensors()
    p = tmp_path / "tiny.safetensors"
    save_weights(p, t, architecture=TINY, trained_update_percent=50.0, source="unit test", license="CC0", extra={"notes": "hello"})
    w = load_weights(p)
    assert isinstance(w, Weights)
    assert w.architecture == TINY
    assert w.path == str(p)
    assert set(w.tensors) == set(t)
    for k in t:
        assert w.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(w.tensors[k], t[k])
    assert w.metadata["format"] == "npdgru"
    assert w.metadata["format_version"] == "1"  # a plain linear+GRU chain is written as format 1 (readable by the first reader)
    assert w.metadata["source"] == "unit test" and w.metadata["license"] == "CC0"
    assert w.metadata["notes"] == "hello"
    assert w.trained_update_percent == 50.0


def test_save_casts_float64_to_float32(tmp_path):
    p = tmp_path / "w.safetensors"
    save_weights(p, tiny_tensors(dtype=np.float64), architecture=TINY)
    w = load_weights(p)
    assert all(a.dtype == np.float32 for a in w.tensors.values())


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "w.safetensors"
    save_weights(p, tiny_tensors(0), architecture=TINY)
    save_weights(p, tiny_tensors(1), architecture=TINY)  # replace in place
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    np.testing.assert_array_equal(load_weights(p).tensors["fc1.bias"], tiny_tensors(1)["fc1.bias"])
    # A refused save writes nothing and leaves the old file as it was.
    bad = tiny_tensors(2)
    bad["fc2.weight"] = bad["fc2.weight"][:, :2]
    with pytest.raises(WeightsError, match="fc2.weight"):
        save_weights(p, bad, architecture=TINY)
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    np.testing.assert_array_equal(load_weights(p).tensors["fc1.bias"], tiny_tensors(1)["fc1.bias"])
    # The file gets the usual permissions (mkstemp's 0600 is widened per umask).
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_save_refuses_nan(tmp_path):
    t = tiny_tensors()
    t["gru1.bias_hh"][1] = np.nan
    p = tmp_path / "nan.safetensors"
    with pytest.raises(WeightsError, match=r"gru1\.bias_hh.*NaN"):
        save_weights(p, t, architecture=TINY)
    assert not p.exists() and os.listdir(tmp_path) == []


@pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped weights/nsnet2.safetensors missing")
def test_shipped_weights_describe():
    w = load_weights(SHIPPED)
    d = w.describe()
    assert f"file: {SHIPPED}" in d
    assert "architecture: nsnet2 (161 features)" in d
    for line in ("fc1      Linear 161 -> 400 + relu", "gru1     D-GRU 400 -> 400", "gru2     D-GRU 400 -> 400",
                 "fc2      Linear 400 -> 600 + relu", "fc3      Linear 600 -> 600 + relu", "fc4      Linear 600 -> 161 + sigmoid"):
        assert line in d, line
    n = 161 * 400 + 400 + 2 * (1200 * 400 * 2 + 2 * 1200) + 400 * 600 + 600 + 600 * 600 + 600 + 600 * 161 + 161
    assert sum(a.size for a in w.tensors.values()) == n
    assert f"parameters: {n:,} float32" in d
    assert "format_version: 1" in d and "sample_rate: 16000" in d
    assert "CC BY 4.0" in d and "Microsoft" in d and "NSNet2" in d
    assert "source_sha256: 88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9" in d
    assert w.trained_update_percent == 100.0


def test_describe_tiny(tmp_path):
    p = tmp_path / "tiny.safetensors"
    save_weights(p, tiny_tensors(), architecture=TINY, source="here", license="CC0")
    d = load_weights(p).describe()
    n = sum(a.size for a in tiny_tensors().values())
    assert "architecture: tiny (5 features)" in d and "GRU 4 -> 3" in d and "Linear 3 -> 5 + sigmoid" in d
    assert f"parameters: {n:,} float32" in d and "source: here" in d and "license: CC0" in d


# ------------------------------------------------------------------------------ bad tensors


def test_missing_tensor(tmp_path):
    t = tiny_tensors()
    del t["gru1.weight_hh"]
    p = write_raw(tmp_path / "missing.safetensors", t)
    refused(p, "missing tensor gru1.weight_hh", "(9, 3)")


def test_unexpected_tensor(tmp_path):
    t = tiny_tensors()
    t["gru9.weight"] = np.zeros((2, 2), np.float32)
    p = write_raw(tmp_path / "extra.safetensors", t)
    refused(p, "unexpected tensor gru9.weight", "(2, 2)")


def test_wrong_shape(tmp_path):
    t = tiny_tensors()
    t["fc1.weight"] = np.zeros((5, 4), np.float32)  # transposed
    p = write_raw(tmp_path / "shape.safetensors", t)
    refused(p, "tensor fc1.weight has shape (5, 4), expected (4, 5)")


def test_wrong_dtype(tmp_path):
    t = tiny_tensors()
    t["gru1.bias_ih"] = t["gru1.bias_ih"].astype(np.float64)
    p = write_raw(tmp_path / "f64.safetensors", t)
    refused(p, "tensor gru1.bias_ih has dtype float64, expected float32")


def test_nan_tensor(tmp_path):
    t = tiny_tensors()
    t["fc2.bias"][3] = np.nan
    p = write_raw(tmp_path / "nan.safetensors", t)
    refused(p, "tensor fc2.bias contains NaN or Inf")


def test_inf_tensor(tmp_path):
    t = tiny_tensors()
    t["gru1.weight_ih"][0, 0] = np.inf
    p = write_raw(tmp_path / "inf.safetensors", t)
    refused(p, "gru1.weight_ih contains NaN or Inf")


def test_all_problems_listed_at_once(tmp_path):
    t = tiny_tensors()
    del t["fc1.bias"]
    t["gru1.weight_hh"] = np.zeros((9, 4), np.float32)
    t["fc2.weight"] = t["fc2.weight"].astype(np.float64)
    p = write_raw(tmp_path / "many.safetensors", t)
    msg = refused(p, "missing tensor fc1.bias", "tensor gru1.weight_hh has shape (9, 4), expected (9, 3)", "tensor fc2.weight has dtype float64")
    assert msg.count("\n") >= 3  # one line per problem


# ------------------------------------------------------------------------------ bad metadata


def test_newer_format_version_refused(tmp_path):
    p = write_raw(tmp_path / "v2.safetensors", format_version=str(FORMAT_VERSION + 1))
    refused(p, "newer", f"format_version {FORMAT_VERSION + 1}", "upgrade npdgru")


@pytest.mark.parametrize("version", ["one", "", "1.5", "0", "-3"])
def test_bad_format_version_refused(tmp_path, version):
    p = write_raw(tmp_path / "bad_version.safetensors", format_version=version)
    refused(p, "format_version")


def test_missing_format_version_refused(tmp_path):
    p = write_raw(tmp_path / "no_version.safetensors", format_version=None)
    refused(p, "format_version=None")


def test_foreign_safetensors_refused(tmp_path):
    # e.g. a PyTorch state dict saved with safetensors: no npdgru metadata at all
    p = tmp_path / "foreign.safetensors"
    save_file({"rnn.weight_ih_l0": np.zeros((3, 3), np.float32)}, str(p))
    refused(p, "not an npdgru weight file", "npdgru convert")
    p2 = write_raw(tmp_path / "other_format.safetensors", format="something-else")
    refused(p2, "not an npdgru weight file", "'something-else'")


def test_bad_architecture_json(tmp_path):
    p = write_raw(tmp_path / "badjson.safetensors", architecture="{'layers': [")
    refused(p, "architecture metadata is not valid JSON")
    p2 = write_raw(tmp_path / "noarch.safetensors", architecture=None)
    refused(p2, "architecture")


def test_architecture_widths_do_not_chain(tmp_path):
    arch = json.loads(json.dumps(TINY))
    arch["layers"][1]["in"] = 6  # fc1 gives 4
    p = write_raw(tmp_path / "chain.safetensors", architecture=json.dumps(arch))
    refused(p, "gru1", "input size 6 does not match the width 4 of fc1")


def test_architecture_output_width(tmp_path):
    arch = json.loads(json.dumps(TINY))
    arch["layers"][2]["out"] = 4
    p = write_raw(tmp_path / "out.safetensors", architecture=json.dumps(arch))
    refused(p, "output width 4 must equal n_features=5")


def test_unsupported_sample_rate(tmp_path):
    p = write_raw(tmp_path / "sr.safetensors", sample_rate="8000")
    refused(p, "sample_rate='8000'")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda a: a.update(layers=[]), "non-empty 'layers'"),
        (lambda a: a.update(n_features=0), "n_features=0"),
        (lambda a: a["layers"][1].update(kind="lstm"), "kind 'lstm'"),
        (lambda a: a["layers"][2].update(name="fc1"), "unique"),
        (lambda a: a["layers"][2].update(name="fc.2"), "without dots"),
        (lambda a: a["layers"][1].update(hidden=0), "'hidden'=0"),
        (lambda a: a["layers"][0].update(activation="gelu"), "activation 'gelu'"),
        (lambda a: a["layers"].__setitem__(0, "fc1"), "layer 0 is not a dict"),
    ],
)
def test_validate_architecture_refusals(mutate, needle):
    arch = json.loads(json.dumps(TINY))
    mutate(arch)
    with pytest.raises(WeightsError) as ei:
        validate_architecture(arch, "model.safetensors")
    assert needle in str(ei.value) and "model.safetensors" in str(ei.value)


# ---------------------------------------------------------------------------- not a file at all


def test_corrupt_file(tmp_path):
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    refused(p, "cannot read as safetensors")


def test_truncated_file(tmp_path):
    good = write_raw(tmp_path / "good.safetensors")
    data = good.read_bytes()
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(data[: len(data) - 40])
    refused(p, "cannot read as safetensors")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    refused(p, "cannot read as safetensors")


def test_folder(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    refused(d, "is a folder")


def test_nonexistent(tmp_path):
    refused(tmp_path / "nope.safetensors", "no such weight file")
