"""npdgru convert: PyTorch checkpoints -> npdgru weights, parity with the PyTorch module at P=100.

The PyTorch NSNet2 module below is the topology the public ONNX file was exported from; its
output on random features is the independent reference (golden values are computed here, by
torch, never stored).
"""

import json

import numpy as np
import pytest

from npdgru.cli import main
from npdgru.convert import NSNET2_TORCH_NAMES, convert_checkpoint
from npdgru.errors import CheckpointError
from npdgru.model import MaskModel
from npdgru.weights import load_weights

torch = pytest.importorskip("torch")


class NSNet2(torch.nn.Module):
    def __init__(self, n=161, h=400, f=600):
        super().__init__()
        self.fc_in = torch.nn.Sequential(torch.nn.Linear(n, h), torch.nn.ReLU())
        self.rnn = torch.nn.GRU(h, h, num_layers=2, batch_first=True)
        self.fc_out = torch.nn.Sequential(torch.nn.Linear(h, f), torch.nn.ReLU(), torch.nn.Linear(f, f), torch.nn.ReLU(), torch.nn.Linear(f, n), torch.nn.Sigmoid())

    def forward(self, x):
        return self.fc_out(self.rnn(self.fc_in(x))[0])


@pytest.fixture(scope="module")
def net_and_features():
    torch.manual_seed(0)
    net = NSNet2().eval()
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((60, 161)) * 2 - 4).astype(np.float32)  # log-power-like
    with torch.no_grad():
        golden = net(torch.from_numpy(feats)[None])[0].numpy()
    return net, feats, golden


def _mask(path, feats, P=100.0):
    m = MaskModel(load_weights(path), update_percent=P)
    return m.forward(feats[:, None, :], m.init_state(1))[:, 0]


SAVERS = {
    "zip": lambda net, p: torch.save(net.state_dict(), p),
    "legacy": lambda net, p: torch.save(net.state_dict(), p, _use_new_zipfile_serialization=False),
    "wrapped_state_dict": lambda net, p: torch.save({"state_dict": net.state_dict(), "epoch": 3}, p),
    "wrapped_model": lambda net, p: torch.save({"model": net.state_dict()}, p),
    "lightning": lambda net, p: torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, p),
    "half": lambda net, p: torch.save({k: v.half() for k, v in net.state_dict().items()}, p),
}


@pytest.mark.parametrize("how", sorted(SAVERS) + ["safetensors"])
def test_convert_parity_with_torch(tmp_path, net_and_features, how):
    net, feats, golden = net_and_features
    src = tmp_path / ("ckpt.safetensors" if how == "safetensors" else "ckpt.pt")
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    else:
        SAVERS[how](net, src)
    out = tmp_path / "w.safetensors"
    notes = convert_checkpoint(src, out, arch="nsnet2")
    mask = _mask(out, feats)
    # float32 kernels vs torch float32: 1e-5 absolute on a sigmoid mask; half precision weights are
    # rounded, so compare against torch running the same rounded weights.
    if how == "half":
        assert any("float16" in n for n in notes)
        ref = NSNet2().eval()
        ref.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
        with torch.no_grad():
            golden = ref(torch.from_numpy(feats)[None])[0].numpy()
    np.testing.assert_allclose(mask, golden, atol=1e-5, rtol=0, err_msg=how)
    w = load_weights(out)
    assert len(w.metadata["source_sha256"]) == 64


def test_cli_convert_and_info(tmp_path, net_and_features, capsys):
    net, feats, golden = net_and_features
    src = tmp_path / "net.pth"
    torch.save(net.state_dict(), src)
    out = tmp_path / "net.safetensors"
    assert main(["convert", str(src), "-o", str(out), "--arch", "nsnet2"]) == 0
    assert main(["convert", str(src), "-o", str(out)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    assert "source_sha256" in capsys.readouterr().out


def test_cli_convert_records_training_metadata(tmp_path, net_and_features, capsys):
    import math

    from npdgru.weights import load_weights

    net, _, _ = net_and_features
    src = tmp_path / "net.pt"
    torch.save({"model": net.state_dict(), "step": 7}, src)
    out = tmp_path / "any.safetensors"
    args = ["convert", str(src), "-o", str(out), "--trained-update-percent", "any", "--source", "fine-tuned here",
            "--license", "CC BY 4.0", "--meta", "trained_update_range=25-100", "--meta", "steps=7"]
    assert main(args) == 0
    w = load_weights(out)
    assert math.isnan(w.trained_update_percent) and w.metadata["trained_update_percent"] == "any"
    assert (w.metadata["source"], w.metadata["license"]) == ("fine-tuned here", "CC BY 4.0")
    assert (w.metadata["trained_update_range"], w.metadata["steps"]) == ("25-100", "7")
    assert main(["convert", str(src), "-o", str(tmp_path / "p50.safetensors"), "--trained-update-percent", "50"]) == 0
    assert load_weights(tmp_path / "p50.safetensors").trained_update_percent == 50.0
    capsys.readouterr()
    assert main(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "--trained-update-percent", "150"]) == 2
    assert "trained_update_percent" in capsys.readouterr().err
    assert main(["convert", str(src), "-o", str(tmp_path / "y.safetensors"), "--meta", "novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_custom_names_with_map_file(tmp_path, net_and_features):
    net, feats, golden = net_and_features
    renamed = {k.replace("fc_in", "encoder").replace("rnn", "core"): v for k, v in net.state_dict().items()}
    src = tmp_path / "c.pt"
    torch.save(renamed, src)
    with pytest.raises(CheckpointError, match="missing tensor fc1.weight"):
        convert_checkpoint(src, tmp_path / "x.safetensors")
    mp = tmp_path / "map.json"
    mp.write_text(json.dumps({k.replace("fc_in", "encoder").replace("rnn", "core"): v for k, v in NSNET2_TORCH_NAMES.items()}))
    convert_checkpoint(src, tmp_path / "y.safetensors", mapping=str(mp))
    np.testing.assert_allclose(_mask(tmp_path / "y.safetensors", feats), golden, atol=1e-5)


def test_all_problems_listed_at_once(tmp_path, net_and_features):
    net, *_ = net_and_features
    sd = dict(net.state_dict())
    del sd["rnn.bias_hh_l1"]
    sd["fc_out.4.weight"] = sd["fc_out.4.weight"][:, :10]
    sd["extra.weight"] = torch.zeros(3)
    src = tmp_path / "bad.pt"
    torch.save(sd, src)
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, tmp_path / "o.safetensors")
    msg = str(e.value)
    assert "missing tensor gru2.bias_hh" in msg and "fc4.weight has shape (161, 10)" in msg and "unexpected tensor extra.weight" in msg
    assert str(src) in msg
    assert not (tmp_path / "o.safetensors").exists()


def test_bidirectional_and_lstm_refused_by_name(tmp_path):
    gru = torch.nn.GRU(8, 8, bidirectional=True)
    src = tmp_path / "bi.pt"
    torch.save(gru.state_dict(), src)
    with pytest.raises(CheckpointError, match="weight_ih_l0_reverse.*bidirectional"):
        convert_checkpoint(src, tmp_path / "o.safetensors")
    lstm = torch.nn.LSTM(8, 8)
    torch.save({"lstm." + k: v for k, v in lstm.state_dict().items()}, src)
    with pytest.raises(CheckpointError, match="LSTM"):
        convert_checkpoint(src, tmp_path / "o.safetensors")


def test_malicious_checkpoint_refused_by_cli(tmp_path, capsys):
    import os
    import pickle
    import zipfile

    canary = tmp_path / "CANARY"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    src = tmp_path / "evil.pt"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("evil/version", "3\n")
    assert main(["convert", str(src), "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "system" in err and str(src) in err and "Traceback" not in err
    assert not canary.exists()
