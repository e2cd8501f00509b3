"""The training code (extra ``torch``): the PyTorch D-GRU against the NumPy reference.

The reference (``npdgru.reference``, float64) is the independent side of every check here:
the torch layer runs in float64 too, so selected sets must agree exactly and values to ~1e-12.
The hand-written backward pass is checked against the plain-autograd twin and by gradcheck.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npdgru import reference, stft  # noqa: E402
from npdgru.errors import ParameterError  # noqa: E402
from npdgru.model import MaskModel  # noqa: E402
from npdgru.train import torch_model as tm  # noqa: E402
from npdgru.train.data import MixtureSampler  # noqa: E402
from npdgru.weights import Weights, expected_shapes, load_weights  # noqa: E402

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]


def _layer_inputs(H, I, T, B, seed):
    rng = np.random.default_rng(seed)
    k = 1 / np.sqrt(H)
    w = [rng.uniform(-k, k, s) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    x = rng.standard_normal((T, B, I))
    h0 = rng.uniform(-0.5, 0.5, (B, H))
    return w, x, h0


def _torch_dgru(w, x, h0, P):
    H = w[1].shape[1]
    g = tm.DGRU(w[0].shape[1], H, 1).double()
    with torch.no_grad():
        for name, a in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), w):
            getattr(g, name).copy_(torch.from_numpy(a))
    y, h_n = g(torch.from_numpy(x).transpose(0, 1), torch.from_numpy(h0)[None], update_percent=P)
    return y.detach().transpose(0, 1).numpy(), h_n.detach()[0].numpy()


@pytest.mark.parametrize("H, P", [(7, 100), (16, 50), (16, 25), (9, 10), (1, 30), (12, 99)])
def test_dgru_forward_matches_reference(H, P):
    w, x, h0 = _layer_inputs(H, 5, T=12, B=3, seed=H * 100 + int(P))
    A = reference.num_selected(P, H)
    expected, S = reference.dgru_sequence(x, h0, *w, A)
    got, h_n = _torch_dgru(w, x, h0, P)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(h_n, got[-1])
    changed = got != np.concatenate([h0[None], got[:-1]])
    assert np.all(changed <= S)  # only selected neurons may change ...
    if A < H:  # ... and unselected ones are carried bit for bit
        prev = np.concatenate([h0[None], got[:-1]])
        np.testing.assert_array_equal(got[~S], prev[~S])


def test_p100_is_torch_gru():
    w, x, h0 = _layer_inputs(10, 4, T=9, B=2, seed=5)
    ref = torch.nn.GRU(4, 10, batch_first=True).double()
    with torch.no_grad():
        for name, a in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), w):
            getattr(ref, name).copy_(torch.from_numpy(a))
    expected, _ = ref(torch.from_numpy(x).transpose(0, 1), torch.from_numpy(h0)[None])
    got, _ = _torch_dgru(w, x, h0, 100)
    np.testing.assert_allclose(got, expected.detach().transpose(0, 1).numpy(), atol=1e-12)
    np.testing.assert_allclose(got, reference.gru_sequence(x, h0, *w), atol=1e-12)


def test_select_ties_go_to_lower_index():
    u = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    for A in range(1, 7):
        expected = reference.top_a(u.numpy(), A)
        np.testing.assert_array_equal(tm._select(u, A).numpy().astype(bool), expected)


def test_dgru_layer_with_exact_ties_matches_reference():
    """Zero weights_hh and equal z pre-activations in some rows: u ties exactly every step."""
    H, I = 8, 3
    w, x, h0 = _layer_inputs(H, I, T=6, B=2, seed=3)
    w[0][H : 2 * H] = 0.0  # W_iz = 0
    w[1][H : 2 * H] = 0.0  # W_hz = 0
    w[2][H : 2 * H] = 0.0
    w[3][H : 2 * H] = np.array([0.3, 0.1, 0.1, 0.1, 0.3, 0.1, -1.0, 0.1])  # z bias: ties among 0.1s
    for P in (25, 50, 75):
        A = reference.num_selected(P, H)
        expected, S = reference.dgru_sequence(x, h0, *w, A)
        got, _ = _torch_dgru(w, x, h0, P)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("A", [1, 3, 5])
def test_handwritten_backward_matches_autograd(A):
    g = torch.Generator().manual_seed(A)
    B, T, H = 3, 7, 5
    args = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True) for s in ((B, T, 3 * H), (B, H), (3 * H, H), (3 * H,))]
    y1 = tm.dgru_layer(*args, A)
    y2 = tm.dgru_layer_autograd(*args, A)
    assert torch.equal(y1, y2)
    grad = torch.randn(y1.shape, dtype=torch.float64, generator=g)
    g1 = torch.autograd.grad(y1, args, grad)
    g2 = torch.autograd.grad(y2, args, grad)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: tm.dgru_layer(*a, A), tuple(args))


def test_features_match_numpy_stft():
    rng = np.random.default_rng(0)
    for n in (1, 159, 160, 161, 3217):
        x = (rng.standard_normal(n) * 0.1).astype(np.float32)
        X_np = stft.stft(x)
        X_t = tm.stft(torch.from_numpy(x)[None].double())[0].numpy()
        np.testing.assert_allclose(X_t, X_np, atol=2e-6)
        np.testing.assert_allclose(tm.log_power(torch.from_numpy(X_np)).numpy(), stft.log_power(X_np), atol=2e-6)
        y = tm.istft(torch.from_numpy(X_np)[None].to(torch.complex128), n)[0].numpy()
        np.testing.assert_allclose(y, stft.istft(X_np, n), atol=1e-6)
        np.testing.assert_allclose(y, x, atol=1e-6)  # perfect reconstruction


def _tiny_nsnet2(seed=0, hidden=12, mid=10):
    """NSNet2-shaped architecture (its layer names, so the default name map applies), tiny sizes."""
    arch = {"name": "nsnet2", "n_features": 161, "layers": [
        {"kind": "linear", "name": "fc1", "in": 161, "out": hidden, "activation": "relu"},
        {"kind": "gru", "name": "gru1", "in": hidden, "hidden": hidden},
        {"kind": "gru", "name": "gru2", "in": hidden, "hidden": hidden},
        {"kind": "linear", "name": "fc2", "in": hidden, "out": mid, "activation": "relu"},
        {"kind": "linear", "name": "fc3", "in": mid, "out": mid, "activation": "relu"},
        {"kind": "linear", "name": "fc4", "in": mid, "out": 161, "activation": "sigmoid"},
    ]}
    rng = np.random.default_rng(seed)
    tensors = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in expected_shapes(arch).items()}
    return Weights(architecture=arch, tensors=tensors, metadata={})


@pytest.mark.parametrize("P", [100, 50, 25])
def test_masknet_matches_npdgru_reference_backend(P):
    w = _tiny_nsnet2()
    model = tm.MaskNet.from_weights(w).double()
    rng = np.random.default_rng(1)
    F = rng.uniform(-8, 0, (1, 30, 161))
    with torch.no_grad():
        got = model(torch.from_numpy(F), update_percent=P).numpy()[0]
    m = MaskModel(w, update_percent=P, backend="reference")
    expected = m.forward(F.transpose(1, 0, 2), m.init_state(1))[:, 0]
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_saved_state_dict_converts_with_npdgru_convert(tmp_path):
    """The user path: torch.save(state_dict) -> npdgru convert -> cpu backend = torch model."""
    from npdgru.cli import main as cli

    model = tm.MaskNet.from_weights(_tiny_nsnet2(seed=4))
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(model.architecture))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert cli(["convert", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.safetensors"), "--arch", str(arch_file)]) == 0
    w = load_weights(tmp_path / "m.safetensors")
    F = np.random.default_rng(2).uniform(-8, 0, (40, 1, 161)).astype(np.float32)
    for P in (100, 50):
        with torch.no_grad():
            expected = model(torch.from_numpy(F.transpose(1, 0, 2)), update_percent=P).numpy()[0]
        m = MaskModel(w, update_percent=P, backend="cpu")
        np.testing.assert_allclose(m.forward(F, m.init_state(1))[:, 0], expected, atol=2e-5)


# -- data ------------------------------------------------------------------------------------


def _fake_corpus(root: Path):
    """A tiny corpus with the layout of ../shared/data (noise/test exists and must never be read)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    for split, speakers in (("train", 3), ("val", 2)):
        d = root / "speech" / split
        d.mkdir(parents=True)
        for s in range(speakers):
            for u in range(2):
                n = int(rng.integers(8000, 30000))
                sf.write(d / f"SPEAKER{s + 10 * (split == 'val'):04d}_{u:09d}.flac", (rng.standard_normal(n) * 0.1).clip(-1, 1), 16000)
    for split in ("train", "test"):
        d = root / "noise" / split
        d.mkdir(parents=True)
        for k in range(2):
            x = rng.standard_normal(40000) * 0.05 if split == "train" else np.full(40000, 0.5)
            sf.write(d / f"noise{k}.flac", x, 16000)


def test_mixtures_follow_the_recipe(tmp_path):
    _fake_corpus(tmp_path)
    s = MixtureSampler(tmp_path, seconds=1.0, seed=3, recipe="v1")
    for _ in range(30):
        noisy, clean, snr = s.example()
        assert noisy.shape == clean.shape == (16000,) and noisy.dtype == np.float32
        assert -5 <= snr <= 15 and np.max(np.abs(noisy)) <= 0.99 + 1e-6
        noise = noisy.astype(np.float64) - clean
        measured = 10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(noise**2))
        assert abs(measured - snr) < 0.05
    # reproducible from the seed
    a = MixtureSampler(tmp_path, seconds=1.0, seed=9, recipe="v1").batch(3)
    b = MixtureSampler(tmp_path, seconds=1.0, seed=9, recipe="v1").batch(3)
    np.testing.assert_array_equal(a[0], b[0])


def test_extra_speech_is_drawn_by_its_share_in_training_only(tmp_path):
    """--extra-speech: the extra folder's utterances come with probability --extra-speech-share
    (0: never, 1: always, 0.5: about half of 400 draws), only in the training split; an unknown
    folder is refused before a run folder is made."""
    import soundfile as sf

    from npdgru.errors import ParameterError
    from npdgru.train.loop import build_parser, train

    _fake_corpus(tmp_path / "data")
    extra = tmp_path / "libri"
    extra.mkdir()
    for k in range(3):
        sf.write(extra / f"{k}-1-000{k}.flac", np.random.default_rng(k).standard_normal(30000) * 0.1, 16000)

    def drawn(split, share, n=400):
        s = MixtureSampler(tmp_path / "data", split=split, seconds=1.0, seed=5, extra_speech=[extra], extra_share=share)
        seen = []
        crop = s._speech_crop
        s._speech_crop = lambda rng, stem, n=None: (seen.append(stem), crop(rng, stem, n))[1]
        for _ in range(n):
            s.example()
        return seen

    assert not any(x.startswith("libri/") for x in drawn("train", 0.0))
    assert all(x.startswith("libri/") for x in drawn("train", 1.0))
    half = sum(x.startswith("libri/") for x in drawn("train", 0.5))
    assert 140 < half < 260  # binomial(400, 0.5): 6 standard deviations either side
    assert not any(x.startswith("libri/") for x in drawn("val", 1.0, 50))
    with pytest.raises(ParameterError, match="extra_share"):
        MixtureSampler(tmp_path / "data", seconds=1.0, extra_speech=[extra], extra_share=1.5)
    for bad in (["--extra-speech", str(tmp_path / "nowhere")], ["--extra-speech-share", "2"]):
        args = build_parser().parse_args(["--out", str(tmp_path / "run"), "--data", str(tmp_path / "data")] + bad)
        with pytest.raises(ParameterError, match=bad[0]):
            train(args)
        assert not (tmp_path / "run").exists()


def test_sampler_never_reads_test_noise(tmp_path, monkeypatch):
    import soundfile as sf

    _fake_corpus(tmp_path)
    opened = []
    real_read = sf.read
    monkeypatch.setattr(sf, "read", lambda f, *a, **k: (opened.append(Path(f)), real_read(f, *a, **k))[1])
    MixtureSampler(tmp_path, split="train", seconds=1.0).batch(4)
    MixtureSampler(tmp_path, split="val", seconds=1.0).fixed_set(4)
    assert opened and not any("test" in p.parts for p in opened)


def test_training_loop_runs_resumes_and_converts(tmp_path):
    """Smoke test of the whole recipe on the tiny corpus: 3 steps, resume to 5, convert."""
    from npdgru.cli import main as cli
    from npdgru.train.loop import main as train_main
    from npdgru.weights import save_weights

    _fake_corpus(tmp_path / "data")
    w = _tiny_nsnet2()
    save_weights(tmp_path / "init.safetensors", w.tensors, architecture=w.architecture)
    common = ["--data", str(tmp_path / "data"), "--init", str(tmp_path / "init.safetensors"), "--out", str(tmp_path / "run"),
              "--batch", "2", "--seconds", "0.5", "--val-count", "2", "--val-every", "2", "--log-every", "1"]
    assert train_main(common + ["--any-p", "25", "100", "--steps", "3"]) == 0
    first = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert first["step"] == 3
    assert cli(["train"] + common + ["--any-p", "25", "100", "--steps", "5"]) == 0  # resumed via the CLI
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 5
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,seconds,train_loss") and "val_sisnr_P50" in rows[0]
    steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2, 3, 4, 5}  # one log across the resume
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(w.architecture))
    out = tmp_path / "trained.safetensors"
    assert cli(["convert", str(tmp_path / "run" / "last.pt"), "-o", str(out), "--arch", str(arch)]) == 0
    trained = load_weights(out)
    assert any(not np.array_equal(trained.tensors[k], w.tensors[k]) for k in w.tensors)  # it learned something


# -- the v2 recipe and distillation ----------------------------------------------------------


def _fake_extra(root: Path, clips_per_type=10):
    """noise/extra with two types of clips, each clip a constant of its own value (to trace it), and one RIR."""
    import soundfile as sf

    for t, kind in enumerate(("animals", "water")):
        d = root / "noise" / "extra" / "train"
        d.mkdir(parents=True, exist_ok=True)
        for c in range(clips_per_type):
            n = 3000 if c % 2 else 30000  # short clips must be looped to the crop length
            sf.write(d / f"{kind}__src__clip{c:02d}.flac", np.full(n, 0.01 * (1 + c + 20 * t)), 16000)
    rir = np.zeros(8000)
    rir[100], rir[900], rir[3000] = 1.0, 0.5, 0.25
    (root / "noise" / "extra" / "rir").mkdir(parents=True)
    sf.write(root / "noise" / "extra" / "rir" / "room.flac", rir, 16000)


def test_v2_recipe_holds_out_noise_by_clip(tmp_path):
    _fake_corpus(tmp_path)
    _fake_extra(tmp_path)
    tr = MixtureSampler(tmp_path, split="train", seconds=1.0, seed=1)
    va = MixtureSampler(tmp_path, split="val", seconds=1.0, seed=1)
    assert set(tr.type_names) == {"noise0", "noise1", "animals", "water"} and len(tr.rirs) == 1
    values = lambda s, k: {round(float(c[0]), 3) for c in s.noise_types[k]}  # noqa: E731
    for kind in ("animals", "water"):
        assert len(values(tr, kind)) == 9 and len(values(va, kind)) == 1  # every tenth clip held out
        assert not values(tr, kind) & values(va, kind)
    for k in ("noise0", "noise1"):  # recordings split in time: 90 % / 10 %, no overlap
        assert tr.noise_types[k][0].size == 36000 and va.noise_types[k][0].size == 4000
    for clip in tr.noise_types["water"]:  # short clips are looped to the crop, long ones cropped
        assert tr._noise_segment(tr.rng, clip).size == tr.n
    v1 = MixtureSampler(tmp_path, split="train", seconds=1.0, recipe="v1")
    assert v1.type_names == ["noise0", "noise1"] and v1.p_reverb == 0


def test_v2_reverberation_keeps_the_direct_path():
    rng = np.random.default_rng(0)
    rir = np.zeros(20000)
    rir[50], rir[400], rir[12000] = 0.5, 0.2, 0.1
    h = __import__("npdgru.train.data", fromlist=["_light_rir"])._light_rir(rng, rir)
    assert h.size == 16000 and h[0] == 1.0  # starts at the direct path, normalised to it
    assert h[350] == pytest.approx(0.4)  # early reflection (< 50 ms) kept as measured
    assert 0.1 * 0.2 <= h[11950] <= 0.2 + 1e-12  # the late part scaled by a gain in [0.1, 1]


def test_mixtures_v2_follow_the_recipe(tmp_path):
    _fake_corpus(tmp_path)
    _fake_extra(tmp_path)
    s = MixtureSampler(tmp_path, seconds=1.0, seed=5)
    s.p_reverb = 1.0  # every example reverberant: the target is the reverberant speech
    for _ in range(10):
        noisy, clean, snr = s.example()
        assert -5 <= snr <= 20 and np.max(np.abs(noisy)) <= 0.99 + 1e-6
        noise = noisy.astype(np.float64) - clean
        assert abs(10 * np.log10(np.sum(clean.astype(np.float64) ** 2) / np.sum(noise**2)) - snr) < 0.05


def test_distillation_loss_mixes_teacher_and_clean():
    """W = 1 against itself is zero; W = 0 is the supervised loss; W = 0.5 the mean of both terms."""
    from npdgru.train.loop import _step_loss, loss_fn

    torch.manual_seed(0)
    student = tm.MaskNet.from_weights(_tiny_nsnet2(seed=1)).double()
    teacher = tm.MaskNet.from_weights(_tiny_nsnet2(seed=2)).double()
    rng = np.random.default_rng(3)
    noisy = torch.from_numpy(rng.standard_normal((2, 3200)) * 0.1)
    clean = torch.from_numpy(rng.standard_normal((2, 3200)) * 0.05)
    with torch.no_grad():
        own = _step_loss(student, noisy, clean, 100, teacher=student, distill_weight=1.0)
        sup = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.0)
        dis = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=1.0)
        mix = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.5)
        # independent: the two terms written out from the public pieces
        X, S = tm.stft(noisy), tm.stft(clean)
        E = X * student(tm.log_power(X), 50)
        T = X * teacher(tm.log_power(X), 100)
        rms = clean.square().mean(-1).sqrt() + 1e-5
    assert float(own) < 1e-6 < float(sup)
    assert float(sup) == pytest.approx(float(loss_fn(E, S, rms)), rel=1e-12)
    assert float(dis) == pytest.approx(float(loss_fn(E, T, rms)), rel=1e-12)
    assert float(mix) == pytest.approx(0.5 * (float(sup) + float(dis)), rel=1e-12)


def test_distillation_run_keeps_the_best_model_and_converts(tmp_path):
    """Smoke test: --teacher, --workers, --warmup, best.pt by validation loss, then npdgru convert."""
    from npdgru.cli import main as cli
    from npdgru.train.loop import main as train_main
    from npdgru.weights import save_weights

    _fake_corpus(tmp_path / "data")
    _fake_extra(tmp_path / "data")
    w = _tiny_nsnet2()
    save_weights(tmp_path / "init.safetensors", w.tensors, architecture=w.architecture)
    init = str(tmp_path / "init.safetensors")
    args = ["--data", str(tmp_path / "data"), "--init", init, "--teacher", init, "--distill-weight", "0.5",
            "--out", str(tmp_path / "run"), "--batch", "2", "--seconds", "0.5", "--val-count", "2", "--val-every", "2",
            "--log-every", "1", "--any-p", "25", "100", "--steps", "3", "--workers", "1", "--warmup", "4"]
    assert train_main(args) == 0
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    val = [r.split(",") for r in rows[1:] if len(r.split(",")) > 4]
    means = {int(r[0]): np.mean([float(r[i]) for i in (4, 6, 8)]) for r in val}
    assert best["step"] == min(means, key=means.get)  # the best validation row is the one kept
    assert [r.split(",")[3] for r in rows[2:4]] == ["2.5e-05", "5e-05"]  # warm-up: lr (step+1)/4
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(w.architecture))
    out = tmp_path / "best.safetensors"
    assert cli(["convert", str(tmp_path / "run" / "best.pt"), "-o", str(out), "--arch", str(arch)]) == 0
    got = load_weights(out).tensors
    assert any(not np.array_equal(got[k], w.tensors[k]) for k in w.tensors) or best["step"] == 0


def test_p_skew_draws_low_p_more_often(tmp_path):
    """--p-skew K draws P = LO + (HI - LO) u^K: the share below the middle of the range is
    0.5^(1/K) (0.5 uniform, 0.707 at K = 2), every draw stays in [LO, HI]; K <= 0 is refused."""
    from npdgru.train.loop import _draw_percent, build_parser

    for k, share in ((1.0, 0.5), (2.0, 0.5 ** 0.5)):
        args = build_parser().parse_args(["--out", "x", "--any-p", "25", "100", "--p-skew", str(k)])
        rng = np.random.default_rng(0)
        draws = np.array([_draw_percent(args, rng) for _ in range(20000)])
        assert draws.min() >= 25.0 and draws.max() <= 100.0
        assert abs(np.mean(draws < 62.5) - share) < 0.015, (k, np.mean(draws < 62.5))
    args = build_parser().parse_args(["--out", str(tmp_path / "run"), "--any-p", "25", "100", "--p-skew", "0"])
    with pytest.raises(ParameterError, match="--p-skew"):
        from npdgru.train.loop import train

        train(args)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_ema_update_follows_the_formula():
    """ema_update: p_ema <- d p_ema + (1 - d) p with d = min(decay, (1 + n) / (10 + n)), worked
    out here by hand on a one-layer net; buffers are copied."""
    from npdgru.train.loop import ema_update

    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)  # parameters and buffers
    with torch.no_grad():
        model.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.running_mean.copy_(torch.tensor([5.0, 6.0, 7.0]))
    ema = torch.nn.BatchNorm1d(3)  # weight 1, running_mean 0
    ema_update(ema, model, 0, 0.99)  # d = 1/10
    assert torch.allclose(ema.weight, torch.tensor([1.0, 1.9, 2.8]))
    assert torch.equal(ema.running_mean, model.running_mean)
    ema_update(ema, model, 1000, 0.5)  # d = min(0.5, 1001/1010) = 0.5
    assert torch.allclose(ema.weight, torch.tensor([1.0, 1.95, 2.9]))


def _ema_run_args(tmp_path):
    """`npdgru train` arguments of a tiny --ema run on a fake corpus under ``tmp_path``."""
    from npdgru.weights import save_weights

    _fake_corpus(tmp_path / "data")
    w = _tiny_nsnet2()
    save_weights(tmp_path / "init.safetensors", w.tensors, architecture=w.architecture)
    return ["--data", str(tmp_path / "data"), "--init", str(tmp_path / "init.safetensors"), "--recipe", "v1",
            "--out", str(tmp_path / "run"), "--batch", "2", "--seconds", "0.5", "--val-count", "2", "--val-every", "2",
            "--log-every", "1", "--update-percent", "50", "--lr", "1e-2", "--ema", "0.9"]


def test_ema_run_validates_the_average_and_resumes(tmp_path):
    """--ema: last.pt carries the average as "model" (what `npdgru convert` takes), the raw weights
    as "raw" and the update count; best.pt is the average (not the raw weights); a resume with
    other options records them in config.json."""
    from npdgru.convert.torch_checkpoint import read_checkpoint
    from npdgru.train.loop import main as train_main

    common = _ema_run_args(tmp_path)
    assert train_main(common + ["--steps", "3"]) == 0
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert last["ema_updates"] == 3 and set(last["raw"]) == set(last["model"]) and "ema" not in last
    assert any(not torch.equal(last["raw"][k], last["model"][k]) for k in last["model"])
    if best["step"] == 3:
        assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    state, _ = read_checkpoint(tmp_path / "run" / "last.pt")  # the converter's reading: the average
    assert all(np.array_equal(state[k], last["model"][k].numpy()) for k in last["model"])
    with open(tmp_path / "run" / "log.csv", "a") as f:  # a row logged after the checkpoint by a run then killed
        f.write("9,99.0,0.5,0.01\n")
    assert train_main(common + ["--steps", "4", "--lr", "5e-3"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr"] == 0.01 and config["resumes"] == [{"step": 3, "changed": {"steps": 4, "lr": 0.005}}]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema_updates"] == 4
    steps = [int(r.split(",")[0]) for r in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert 9 not in steps and steps == sorted(steps) and steps[-1] == 4, steps  # the row after the checkpoint is dropped on resume


def test_ema_run_resumes_from_the_earlier_checkpoint_layout(tmp_path):
    """A last.pt of the earlier layout ("model" the raw weights, "ema" the average) resumes: the
    trained weights continue from "model", the average from "ema", and the new last.pt has the
    current layout."""
    from npdgru.train.loop import main as train_main

    common = _ema_run_args(tmp_path)
    assert train_main(common + ["--steps", "2"]) == 0
    path = tmp_path / "run" / "last.pt"
    now = torch.load(path, weights_only=True)
    torch.save({"model": now["raw"], "ema": now["model"], "step": now["step"], "seed": now["seed"],
                "ema_updates": now["ema_updates"]}, path)
    assert train_main(common + ["--steps", "3", "--lr", "0"]) == 0  # lr 0: the raw weights stay as they were
    after = torch.load(path, weights_only=True)
    assert after["step"] == 3 and after["ema_updates"] == 3 and "ema" not in after
    assert all(torch.equal(after["raw"][k], now["raw"][k]) for k in now["raw"])
    # one more average step towards unchanged raw weights: d * average + (1 - d) * raw
    d = min(0.9, (1 + 2) / (10 + 2))
    for k in now["raw"]:
        if now["raw"][k].is_floating_point():
            assert torch.allclose(after["model"][k], d * now["model"][k] + (1 - d) * now["raw"][k], atol=1e-6), k


@pytest.mark.parametrize("argv, message", [(["--ema", "2"], "--ema must be in [0, 1)"), (["--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
                                           (["--gate", "threshold"], "needs 'theta' in [0, 1)"), (["--gate", "delta", "--theta", "-1"], "needs 'theta' a number >= 0"),
                                           (["--theta", "0.5"], "--theta and --theta-x go with --gate threshold or delta"),
                                           (["--arch", "no-such"], "--arch 'no-such': use one of")])
def test_train_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    """`npdgru train --ema 2`: one line naming the option, exit status 2, no traceback, no run folder."""
    from npdgru.cli import main

    rc = main(["train", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("npdgru: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_train_refuses_an_architecture_file_that_is_not_one_in_one_line(tmp_path, capsys):
    """`npdgru train --arch FILE` with a broken architecture: one line naming the file, exit 2, no run folder."""
    from npdgru.cli import main

    bad = tmp_path / "arch.json"
    bad.write_text('{"name": "x", "n_features": 161, "layers": [{"kind": "gru", "name": "g", "in": 161}]}')
    rc = main(["train", "--out", str(tmp_path / "run"), "--arch", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "not a usable architecture file" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_train_from_scratch_takes_an_architecture_file(tmp_path):
    """`npdgru train --arch FILE` trains that architecture from scratch (here the tiny test model;
    e.g. a wider MPT from npdgru.architectures.mpt(...)); the run's architecture.json is it, and
    `npdgru convert --arch` of that file exports the run."""
    from npdgru.architectures import tiny_weights
    from npdgru.cli import main as cli
    from npdgru.train.loop import main as train_main
    from npdgru.weights import load_weights

    _fake_corpus(tmp_path / "data")
    arch = tiny_weights().architecture
    (tmp_path / "tiny.json").write_text(json.dumps(arch))
    assert train_main(["--data", str(tmp_path / "data"), "--arch", str(tmp_path / "tiny.json"), "--recipe", "v1",
                       "--out", str(tmp_path / "run"), "--batch", "2", "--seconds", "0.5", "--val-count", "2",
                       "--val-every", "1", "--log-every", "1", "--update-percent", "50", "--steps", "1"]) == 0
    assert json.loads((tmp_path / "run" / "architecture.json").read_text())["layers"] == arch["layers"]
    out = tmp_path / "tiny.safetensors"
    assert cli(["convert", str(tmp_path / "run" / "last.pt"), "-o", str(out), "--arch", str(tmp_path / "run" / "architecture.json")]) == 0
    assert load_weights(out).architecture["layers"] == arch["layers"]


# -- the residual-noise term, voice augmentation, DNSMOS at validation ------------------------


def test_noise_floor_loss_acts_only_where_the_output_exceeds_the_reference_on_noise_bins():
    """Hand-made spectra, one frame of 4 bins, clean RMS 1: bin 0 speech-dominated (term off even
    though the output is far above the reference), bin 1 noise-dominated with the output above the
    reference (the only cost, gradient pushing |E| down), bin 2 noise-dominated with the output
    below the reference (no cost: never pushes towards more noise), bin 3 output equal to reference."""
    from npdgru.train.loop import COMPRESSION, noise_floor_loss

    S = torch.tensor([[[1.0, 1e-4, 1e-4, 1e-3]]], dtype=torch.complex128)
    N = torch.tensor([[[0.01, 1.0, 1.0, 1.0]]], dtype=torch.complex128)
    R = torch.tensor([[[0.5, 0.1, 0.1, 0.2]]], dtype=torch.complex128)
    er = torch.tensor([[[5.0, 0.5, 0.01, 0.2]]], dtype=torch.float64, requires_grad=True)
    E = torch.complex(er, torch.zeros_like(er))
    rms = torch.ones(1, dtype=torch.float64)
    loss = noise_floor_loss(E, R, S, S + N, rms, below_db=10.0)
    c = COMPRESSION
    assert float(loss.detach()) == pytest.approx(((0.5 + 1e-8) ** c - (0.1 + 1e-8) ** c) ** 2 / 4, rel=1e-9)
    loss.backward()
    g = er.grad.reshape(-1)
    assert g[1] > 0 and g[0] == 0 and g[2] == 0 and g[3] == 0
    # a threshold that no bin passes (speech must be 100 dB below the noise): inactive everywhere
    assert float(noise_floor_loss(E, R, S, S + N, rms, below_db=100.0).detach()) == 0.0
    # level-normalised: the same example 10x louder (clean RMS too) costs the same
    loud = noise_floor_loss(10 * E, 10 * R, 10 * S, 10 * (S + N), 10 * rms, below_db=10.0)
    assert float(loud) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_pause_floor_loss_acts_only_in_pause_frames_where_the_output_exceeds_the_lowered_reference():
    """Hand-made spectra, 3 frames of 2 bins, clean RMS 1: frame 0 speech (clean power 1, far above
    the mean: no cost however loud the output), frames 1 and 2 pauses (clean power 1e-6, 60 dB under
    the mean). Frame 1's output lies above the reference in bin 0 only; frame 2's lies below it. With
    a margin of 20 dB the reference drops tenfold and frame 2's bin 0 starts to cost too."""
    from npdgru.train.loop import COMPRESSION, pause_floor_loss

    c = COMPRESSION
    S = torch.tensor([[[1.0, 1.0], [1e-3, 1e-3], [1e-3, 1e-3]]], dtype=torch.complex128)
    R = torch.tensor([[[0.5, 0.5], [0.1, 0.1], [0.1, 0.1]]], dtype=torch.complex128)
    er = torch.tensor([[[5.0, 5.0], [0.4, 0.1], [0.05, 0.001]]], dtype=torch.float64, requires_grad=True)
    E = torch.complex(er, torch.zeros_like(er))
    rms = torch.ones(1, dtype=torch.float64)
    loss = pause_floor_loss(E, R, S, rms, below_db=25.0)
    assert float(loss.detach()) == pytest.approx(((0.4 + 1e-8) ** c - (0.1 + 1e-8) ** c) ** 2 / 6, rel=1e-9)
    loss.backward()
    g = er.grad.reshape(3, 2)
    assert g[1, 0] > 0 and float(g[0].abs().sum()) == 0 and g[1, 1] == 0 and float(g[2].abs().sum()) == 0
    lowered = pause_floor_loss(E, R, S, rms, below_db=25.0, margin_db=20.0)
    want = (((0.4 + 1e-8) ** c - (0.01 + 1e-8) ** c) ** 2 + ((0.1 + 1e-8) ** c - (0.01 + 1e-8) ** c) ** 2
            + ((0.05 + 1e-8) ** c - (0.01 + 1e-8) ** c) ** 2) / 6
    assert float(lowered.detach()) == pytest.approx(want, rel=1e-9)
    # no frame is 80 dB under the mean: inactive; level-normalised like the other terms
    assert float(pause_floor_loss(E, R, S, rms, below_db=80.0).detach()) == 0.0
    assert float(pause_floor_loss(10 * E, 10 * R, 10 * S, 10 * rms).detach()) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_step_loss_adds_the_weighted_noise_term_against_the_teacher():
    from npdgru.train.loop import _step_loss, noise_floor_loss

    student = tm.MaskNet.from_weights(_tiny_nsnet2(seed=1)).double()
    teacher = tm.MaskNet.from_weights(_tiny_nsnet2(seed=2)).double()
    rng = np.random.default_rng(3)
    noisy = torch.from_numpy(rng.standard_normal((2, 3200)) * 0.1)
    clean = torch.from_numpy(rng.standard_normal((2, 3200)) * 0.02)
    with torch.no_grad():
        base = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.5)
        plus = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.5, noise_weight=2.0, noise_below_db=0.0)
        sup = _step_loss(student, noisy, clean, 50, noise_weight=2.0, noise_below_db=0.0)
        X, S = tm.stft(noisy), tm.stft(clean)
        E = X * student(tm.log_power(X), 50)
        T = X * teacher(tm.log_power(X), 100)
        rms = clean.square().mean(-1).sqrt() + 1e-5
        term_t = noise_floor_loss(E, T, S, X, rms, 0.0)
        term_s = noise_floor_loss(E, S, S, X, rms, 0.0)
    assert float(term_t) > 0 and float(term_s) > 0
    assert float(plus) == pytest.approx(float(base) + 2.0 * float(term_t), rel=1e-12)
    assert float(sup) == pytest.approx(float(_step_loss(student, noisy, clean, 50)) + 2.0 * float(term_s), rel=1e-12)
    # the speech-pause term, with a second half of the clean speech that pauses
    from npdgru.train.loop import pause_floor_loss

    clean[:, 1600:] *= 1e-3
    with torch.no_grad():
        base = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.5)
        plus = _step_loss(student, noisy, clean, 50, teacher=teacher, distill_weight=0.5, pause_weight=3.0, pause_margin_db=6.0)
        S = tm.stft(clean)
        term = pause_floor_loss(E, T, S, clean.square().mean(-1).sqrt() + 1e-5, 25.0, 6.0)
    assert float(term) > 0
    assert float(plus) == pytest.approx(float(base) + 3.0 * float(term), rel=1e-12)


def test_peaking_eq_has_its_gain_at_the_centre():
    from scipy.signal import freqz

    from npdgru.train.data import _peaking

    b, a = _peaking(1000.0, 6.0, 1.0)
    _, h = freqz(b, a, worN=[1000.0, 50.0, 7900.0], fs=16000)
    db = 20 * np.log10(np.abs(h))
    assert db[0] == pytest.approx(6.0, abs=1e-6) and abs(db[1]) < 0.5 and abs(db[2]) < 0.5


def test_voice_augmentation_keeps_length_dtype_and_is_reproducible(tmp_path):
    from npdgru.errors import ParameterError

    _fake_corpus(tmp_path)
    _fake_extra(tmp_path)
    a = MixtureSampler(tmp_path, seconds=1.0, seed=4, augment="voice")
    plain = MixtureSampler(tmp_path, seconds=1.0, seed=4)
    changed = 0
    for _ in range(40):  # every stage has probability >= 0.2: 40 draws exercise them all
        noisy, clean, _ = a.example()
        assert noisy.shape == clean.shape == (16000,) and noisy.dtype == clean.dtype == np.float32
        assert np.all(np.isfinite(noisy)) and np.max(np.abs(noisy)) <= 0.99 + 1e-6
        changed += not np.array_equal(clean, plain.example()[1])
    assert changed > 20
    x = MixtureSampler(tmp_path, seconds=1.0, seed=8, augment="voice").batch(4)
    y = MixtureSampler(tmp_path, seconds=1.0, seed=8, augment="voice").batch(4)
    np.testing.assert_array_equal(x[0], y[0])
    np.testing.assert_array_equal(x[1], y[1])
    with pytest.raises(ParameterError, match="augment"):
        MixtureSampler(tmp_path, seconds=1.0, augment="pitch")


def test_channel_and_speed_stages_keep_the_length():
    from npdgru.train.data import _channel, _fit

    x = np.random.default_rng(0).standard_normal(16000)
    for seed in range(30):
        y, z = _channel(np.random.default_rng(seed), [x, 2 * x])
        assert y.shape == x.shape and np.allclose(z, 2 * y)  # one linear channel for both signals
    assert _fit(x, 100).shape == (100,) and _fit(x[:50], 100)[50:].sum() == 0


def test_noise_options_are_refused_before_the_run_folder_is_made(tmp_path):
    from npdgru.errors import ParameterError
    from npdgru.train.loop import build_parser, train

    for bad in (["--noise-weight", "-1"], ["--noise-weight", "nan"], ["--val-dnsmos", "99", "--val-count", "4"],
                ["--pause-weight", "-2"], ["--pause-weight", "inf"], ["--pause-below-db", "nan"], ["--pause-margin-db", "inf"]):
        args = build_parser().parse_args(["--out", str(tmp_path / "run")] + bad)
        with pytest.raises(ParameterError, match=bad[0]):
            train(args)
        assert not (tmp_path / "run").exists()


def test_run_with_noise_term_augmentation_and_validation_dnsmos(tmp_path):
    """Smoke test: --noise-weight, --pause-weight, --augment voice and --val-dnsmos together; the DNSMOS columns
    carry scores on the 1-5 scale."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("speechmos")
    from npdgru.train.loop import main as train_main
    from npdgru.weights import save_weights

    _fake_corpus(tmp_path / "data")
    w = _tiny_nsnet2()
    save_weights(tmp_path / "init.safetensors", w.tensors, architecture=w.architecture)
    init = str(tmp_path / "init.safetensors")
    common = ["--data", str(tmp_path / "data"), "--init", init, "--teacher", init, "--out", str(tmp_path / "run"),
              "--batch", "2", "--seconds", "0.5", "--val-count", "2", "--val-every", "2", "--log-every", "1",
              "--any-p", "25", "100", "--noise-weight", "1", "--pause-weight", "2", "--augment", "voice"]
    assert train_main(common + ["--steps", "2", "--val-dnsmos", "1"]) == 0
    rows = [r.split(",") for r in (tmp_path / "run" / "log.csv").read_text().splitlines()]
    assert rows[0][-3:] == ["dnsmos_sig_P50", "dnsmos_bak_P50", "dnsmos_ovrl_P50"]
    val = [r for r in rows[1:] if len(r) == len(rows[0])]
    assert [int(r[0]) for r in val] == [0, 2]
    assert all(1.0 <= float(v) <= 5.0 for r in val for v in r[-3:])


@pytest.mark.parametrize("gate, theta", [("threshold", "0.5"), ("delta", "0.05")])
def test_a_run_with_a_gate_trains_that_gate_and_converts_with_its_architecture(tmp_path, gate, theta):
    """--gate: the NSNet2-shaped init runs as the graph twin with the gate; architecture.json in the
    run folder converts the checkpoint into a weight file whose layers carry the gate."""
    from npdgru.cli import main as cli
    from npdgru.train.loop import main as train_main
    from npdgru.weights import save_weights

    _fake_corpus(tmp_path / "data")
    w = _tiny_nsnet2()
    save_weights(tmp_path / "init.safetensors", w.tensors, architecture=w.architecture)
    init = str(tmp_path / "init.safetensors")
    args = ["--data", str(tmp_path / "data"), "--init", init, "--teacher", init, "--distill-weight", "0.5", "--gate", gate, "--theta", theta,
            "--out", str(tmp_path / "run"), "--batch", "2", "--seconds", "0.5", "--val-count", "2", "--val-every", "2", "--log-every", "1", "--steps", "2"]
    assert train_main(args) == 0
    arch = json.loads((tmp_path / "run" / "architecture.json").read_text())
    assert [(layer.get("gate"), layer.get("theta")) for layer in arch["layers"] if layer["kind"] == "gru"] == [(gate, float(theta))] * 2
    out = tmp_path / "gated.safetensors"
    assert cli(["convert", str(tmp_path / "run" / "last.pt"), "-o", str(out), "--arch", str(tmp_path / "run" / "architecture.json")]) == 0
    got = load_weights(out)
    assert got.architecture == arch
    assert any(not np.array_equal(got.tensors[k], w.tensors[k]) for k in w.tensors)  # trained
