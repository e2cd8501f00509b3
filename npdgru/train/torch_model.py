"""The D-GRU and the mask models in PyTorch, for training (extra ``torch``).

The forward pass is the one of :mod:`npdgru.reference`, written with torch tensors so that
autograd can train through it:

    u   = 1 − z                        the paper's update gate, all H neurons
    S   = A largest u (ties → lower index), A = ceil(P·H/100)
    h_i ← h_i + u_i (n_i − h_i)        i in S   (gradients flow through u, n and h)
    h_i ← h_i                          i not in S (identity, gradient passes unchanged)

The select gate S itself is a hard, non-differentiable choice, as in the paper. The other gates
of a GRU layer (``docs/design.md``) are trained the same way: the threshold gate S = {u > θ} is
the same hard mask on a threshold instead of a count (:func:`dgru_layer` with ``theta``); the
delta gate (:func:`delta_gru_layer`) propagates the changes larger than Θ in the forward pass and
passes the gradient straight through the delta encoding (ĥ and x̂ are differentiated as h and x:
``h + (ĥ − h).detach()``), the usual estimator for a quantiser in the forward pass. At P = 100 the
layer calls PyTorch's fused GRU (the same parameters, the same maths), which is much faster to
train; ``tests/test_train.py`` checks both paths against the NumPy reference.

Parameter names follow ``torch.nn.GRU`` (``weight_ih_l0`` ...) and the model's names follow the
PyTorch NSNet2 layout that ``npdgru convert`` maps by default (``fc_in.0``, ``rnn``,
``fc_out.0/2/4``), so a checkpoint saved with ``torch.save(model.state_dict())`` converts with
the real user path: ``npdgru convert ckpt.pt -o model.safetensors``.

Features mirror :mod:`npdgru.stft` exactly (periodic sqrt-Hann, 320-point frames, hop 160, one hop
of front padding, ``log10(max(|X|², 1e-12))``); the test compares them with the NumPy ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ParameterError
from ..kinds import KINDS, num_selected
from ..stft import HOP, N_BINS, N_FFT, num_frames

__all__ = ["DGRU", "MaskNet", "GraphNet", "TORCH_RUNNERS", "dgru_forward", "delta_gru_layer", "stft", "istft", "log_power", "window"]


def window(device=None, dtype=torch.float32) -> torch.Tensor:
    """The periodic sqrt-Hann window of :data:`npdgru.stft.WINDOW`."""
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float64, device=device).sqrt().to(dtype)


def stft(x: torch.Tensor) -> torch.Tensor:
    """(B, n) float → (B, T, 161) complex, T = ceil(n/160) + 1, frames as :func:`npdgru.stft.stft`."""
    n = x.shape[-1]
    T = num_frames(n)
    xp = nn.functional.pad(x, (HOP, HOP * (T + 1) - HOP - n))
    frames = xp.unfold(-1, N_FFT, HOP)  # (B, T, 320)
    return torch.fft.rfft(frames * window(x.device, x.dtype), n=N_FFT, dim=-1)


def istft(X: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`stft` by overlap-add (the squared window sums to one): (B, T, 161) → (B, length)."""
    frames = torch.fft.irfft(X, n=N_FFT, dim=-1) * window(X.device)  # (B, T, 320)
    B, T, _ = frames.shape
    yp = nn.functional.fold(
        frames.transpose(1, 2), output_size=(1, HOP * (T + 1)), kernel_size=(1, N_FFT), stride=(1, HOP)
    ).reshape(B, -1)
    return yp[:, HOP : HOP + length]


def log_power(X: torch.Tensor) -> torch.Tensor:
    """log10(max(|X|², 1e-12)), the NSNet2 input feature."""
    return torch.log10(torch.clamp(X.real.square() + X.imag.square(), min=1e-12))


def _select(u: torch.Tensor, A: int) -> torch.Tensor:
    """Select gate as a 0/1 float mask: the A largest u per row, ties → lower index.

    ``torch.topk`` does not promise an order among equal values, so exact ties at the
    boundary are settled like :func:`npdgru.reference.top_a`: every u above the A-th largest
    value is taken, then the lowest-index ones equal to it fill the rest.
    """
    H = u.shape[-1]
    if A >= H:
        return torch.ones_like(u)
    kth = torch.topk(u, A, dim=-1, sorted=False).values.min(dim=-1, keepdim=True).values
    above = u > kth
    equal = u == kth
    need = A - above.sum(-1, keepdim=True)  # how many of the equal ones to take, >= 1
    take_equal = equal & (torch.cumsum(equal.to(torch.int32), -1) <= need)
    return (above | take_equal).to(u.dtype)


def _gate(u: torch.Tensor, A: int, theta) -> torch.Tensor:
    """The select mask of a step: the A largest u (``theta`` None) or the u > θ (the threshold gate,
    :func:`npdgru.reference.threshold_select`: u = θ is not selected)."""
    return _select(u, A) if theta is None else (u > theta).to(u.dtype)


def dgru_layer_autograd(gi: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, A: int, theta=None) -> torch.Tensor:
    """D-GRU over time with plain autograd, the readable twin of :class:`_DGRUFunction`.

    ``gi = W_ih x + b_ih`` for all steps, (B, T, 3H); returns the outputs (B, T, H). ``theta``:
    the threshold gate's θ instead of A.
    """
    H = h.shape[-1]
    outs = []
    for t in range(gi.shape[1]):
        gh = nn.functional.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi[:, t].split(H, dim=-1)
        h_r, h_z, h_n = gh.split(H, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        u = 1.0 - z
        sel = _gate(u.detach(), A, theta)  # the choice itself is not differentiated
        h = h + sel * (u * (n - h))
        outs.append(h)
    return torch.stack(outs, 1)


class _DGRUFunction(torch.autograd.Function):
    """The same recurrence with a hand-written backward pass through time.

    Autograd records ~20 nodes per step; over 400 steps that bookkeeping costs more than the
    arithmetic. Here the forward stores r, z, n, the recurrent candidate product and the select
    mask per step, and the backward runs the chain rule of the equations above step by step
    (``tests/test_train.py`` checks it against :func:`dgru_layer_autograd`)::

        dn = dh·s·u        du = dh·s·(n − h)        dh_prev = dh·(1 − s·u) + dgh W_hh
        dpre_n = dn (1 − n²)      dr = dpre_n · gh_n      dgh_n = dpre_n · r
        dpre_r = dr r (1 − r)     dpre_z = −du z (1 − z)
    """

    @staticmethod
    def forward(ctx, gi, h0, w_hh, b_hh, A, theta=None):
        B, T, H3 = gi.shape
        H = H3 // 3
        hs = gi.new_empty(B, T + 1, H)  # hs[:, t] is the state before step t
        r_all, z_all, n_all, ghn_all, s_all = (gi.new_empty(B, T, H) for _ in range(5))
        hs[:, 0] = h0
        h = h0
        for t in range(T):
            gh = torch.addmm(b_hh, h, w_hh.t())
            r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
            z = torch.sigmoid(gi[:, t, H : 2 * H] + gh[:, H : 2 * H])
            ghn = gh[:, 2 * H :]
            n = torch.tanh(gi[:, t, 2 * H :] + r * ghn)
            u = 1.0 - z
            s = _gate(u, A, theta)
            h = h + s * (u * (n - h))
            hs[:, t + 1] = h
            r_all[:, t], z_all[:, t], n_all[:, t], ghn_all[:, t], s_all[:, t] = r, z, n, ghn, s
        ctx.save_for_backward(hs, r_all, z_all, n_all, ghn_all, s_all, w_hh)
        return hs[:, 1:].clone()

    @staticmethod
    def backward(ctx, grad_out):
        hs, r_all, z_all, n_all, ghn_all, s_all, w_hh = ctx.saved_tensors
        B, T, H = r_all.shape
        dgi = grad_out.new_empty(B, T, 3 * H)
        dgh = grad_out.new_empty(B, T, 3 * H)
        dh = grad_out.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            dh = dh + grad_out[:, t]
            r, z, n, ghn, s = r_all[:, t], z_all[:, t], n_all[:, t], ghn_all[:, t], s_all[:, t]
            h_prev = hs[:, t]
            u = 1.0 - z
            su = s * u
            dn = dh * su
            du = dh * s * (n - h_prev)
            dpre_n = dn * (1.0 - n * n)
            dpre_r = dpre_n * ghn * r * (1.0 - r)
            dpre_z = -du * z * (1.0 - z)
            dgi[:, t, :H] = dpre_r
            dgi[:, t, H : 2 * H] = dpre_z
            dgi[:, t, 2 * H :] = dpre_n
            dgh[:, t, :H] = dpre_r
            dgh[:, t, H : 2 * H] = dpre_z
            dgh[:, t, 2 * H :] = dpre_n * r
            dh = dh * (1.0 - su) + dgh[:, t] @ w_hh
        flat_dgh = dgh.reshape(B * T, 3 * H)
        d_w_hh = flat_dgh.t() @ hs[:, :-1].reshape(B * T, H)
        d_b_hh = flat_dgh.sum(0)
        return dgi, dh, d_w_hh, d_b_hh, None, None


def dgru_layer(gi: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, A: int, theta=None) -> torch.Tensor:
    """D-GRU over time (fast path for training): ``gi`` (B, T, 3H), ``h0`` (B, H) → (B, T, H).
    ``theta``: the threshold gate (S = {u > θ}) instead of the A largest u."""
    return _DGRUFunction.apply(gi, h0, w_hh, b_hh, A, theta)


def _delta_encode(v, v_hat, theta):
    """:func:`npdgru.reference.delta_encode` (no gradient): the new v̂."""
    return torch.where((v - v_hat).abs() > theta, v, v_hat)


def delta_gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, theta: float, theta_x: float | None = None):
    """The delta GRU over time (:func:`npdgru.reference.delta_gru_sequence`): ``x`` (B, T, I),
    ``h0`` (B, H) → (B, T, H), from x̂ = ĥ = 0.

    x̂_t does not depend on the state, so it is encoded for all steps first and the input product
    runs once; ĥ is encoded step by step. Straight-through: the products read
    ``v + (v̂ − v).detach()`` (the value v̂, the gradient of v). Plain autograd, no hand-written
    backward yet: about 4x the time of :func:`dgru_layer` (one 400-unit layer, 16 x 401 frames,
    one thread: 5.1 s forward + backward against 1.0-1.3 s).
    """
    thx = theta if theta_x is None else theta_x
    with torch.no_grad():
        x_hat = torch.empty_like(x)
        xh = x.new_zeros(x.shape[0], x.shape[2])
        for t in range(x.shape[1]):
            xh = _delta_encode(x[:, t], xh, thx)
            x_hat[:, t] = xh
    gi = nn.functional.linear(x + (x_hat - x).detach(), w_ih, b_ih)
    H = h0.shape[-1]
    h, h_hat = h0, h0.new_zeros(h0.shape)
    outs = []
    for t in range(x.shape[1]):
        h_hat = _delta_encode(h.detach(), h_hat, theta)
        gh = nn.functional.linear(h + (h_hat - h).detach(), w_hh, b_hh)
        i_r, i_z, i_n = gi[:, t].split(H, dim=-1)
        h_r, h_z, h_n = gh.split(H, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1.0 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


class DGRU(nn.Module):
    """A stack of unidirectional D-GRU layers with the parameters of ``torch.nn.GRU``.

    ``forward(x, h0=None, update_percent=100)`` with ``x`` (B, T, I) (batch first) returns
    ``(y, h_n)`` like ``nn.GRU(batch_first=True)``. ``update_percent`` can change per call (the
    any-P training draws it per batch).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        k = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            i = input_size if layer == 0 else hidden_size
            for name, shape in (("weight_ih", (3 * hidden_size, i)), ("weight_hh", (3 * hidden_size, hidden_size)), ("bias_ih", (3 * hidden_size,)), ("bias_hh", (3 * hidden_size,))):
                self.register_parameter(f"{name}_l{layer}", nn.Parameter(torch.empty(shape).uniform_(-k, k)))

    def _params(self, layer):
        return [getattr(self, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, update_percent: float = 100.0):
        B = x.shape[0]
        H = self.hidden_size
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, B, H)
        A = num_selected(update_percent, H)
        if A == H:  # exactly a GRU: PyTorch's fused implementation, same parameters
            weights = [p for layer in range(self.num_layers) for p in self._params(layer)]
            y, h_n = torch._VF.gru(x, h0, weights, True, self.num_layers, 0.0, self.training, False, True)
            return y, h_n
        y = x
        finals = []
        for layer in range(self.num_layers):
            y = dgru_forward(y, h0[layer], *self._params(layer), update_percent=update_percent)
            finals.append(y[:, -1])
        return y, torch.stack(finals, 0)


def dgru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, *, update_percent: float = 100.0, training: bool = True, gate: str = "top-a", theta: float = 0.0, theta_x: float | None = None):
    """One D-GRU layer over time: ``x`` (B, T, I), ``h0`` (B, H) → (B, T, H).

    ``gate``: "top-a" (A from ``update_percent``), "threshold" (u > ``theta``; P not read) or
    "delta" (changes larger than ``theta``, the input's larger than ``theta_x``; P not read).
    """
    H = w_hh.shape[1]
    if gate == "threshold":
        return dgru_layer(nn.functional.linear(x, w_ih, b_ih), h0, w_hh, b_hh, H, float(theta))
    if gate == "delta":
        return delta_gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, float(theta), theta_x)
    if gate != "top-a":
        raise ParameterError(f"gate {gate!r} is not one of ('top-a', 'threshold', 'delta')")
    A = num_selected(update_percent, H)
    if A == H:  # exactly a GRU: PyTorch's fused implementation
        y, _ = torch._VF.gru(x, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, training, False, True)
        return y
    gi = nn.functional.linear(x, w_ih, b_ih)  # all time steps at once
    return dgru_layer(gi, h0, w_hh, b_hh, A)


_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "none": nn.Identity}


class _EnhanceMixin:
    def enhance(self, noisy: torch.Tensor, update_percent: float = 100.0, mask_floor: float = 0.0) -> torch.Tensor:
        """(B, n) waveform → (B, n) enhanced waveform (mask on the noisy STFT)."""
        X = stft(noisy)
        mask = self(log_power(X), update_percent)
        if mask_floor > 0:
            mask = mask.clamp(min=mask_floor)
        return istft(X * mask, noisy.shape[-1])


class _Params(nn.Module):
    """The tensors of one npdgru layer, registered under their npdgru names (``weight_ih`` ...)."""

    def __init__(self, shapes: dict, init: dict):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(init[name](shape)))


def _uniform(k):
    return lambda shape: torch.empty(shape).uniform_(-k, k)


# -- one runner per layer kind (npdgru.kinds.KINDS): ``init`` gives PyTorch's default
# initialisation of each tensor (nn.Linear, nn.GRU, nn.LayerNorm), ``forward(p, s, xs, P, training)``
# runs a plan step on (B, T, width) inputs, ``p`` holding its tensors under their npdgru names


class _TorchLinear:
    @staticmethod
    def init(spec):
        return {"weight": _uniform(1.0 / math.sqrt(spec["in"])), "bias": _uniform(1.0 / math.sqrt(spec["in"]))}

    @staticmethod
    def forward(p, s, xs, P, training):
        Bn, T = xs[0].shape[:2]
        y = nn.functional.linear(xs[0].reshape(Bn, T, s.bands, s.size_in), p.weight, p.bias).reshape(Bn, T, s.width)
        return _ACTIVATIONS[s.activation]()(y)


class _TorchGRU:
    @staticmethod
    def init(spec):
        u = _uniform(1.0 / math.sqrt(spec["hidden"]))
        return {n + sfx: u for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") for sfx in ("", "_reverse")}

    @staticmethod
    def forward(p, s, xs, P, training):
        Bn, T = xs[0].shape[:2]
        F, I, H = s.bands, s.size_in, s.hidden
        seq = xs[0].reshape(Bn, T, F, I).permute(0, 2, 1, 3).reshape(Bn * F, T, I)  # row b·F + f, as npdgru
        y = dgru_forward(seq, seq.new_zeros(Bn * F, H), p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh, update_percent=P, training=training,
                         gate=s.gate, theta=s.theta, theta_x=s.theta_x)
        return y.reshape(Bn, F, T, H).permute(0, 2, 1, 3).reshape(Bn, T, F * H)


class _TorchBiGRU(_TorchGRU):
    @staticmethod
    def forward(p, s, xs, P, training):
        Bn, T = xs[0].shape[:2]
        H = s.hidden
        seq = xs[0].reshape(Bn * T, s.bands, s.size_in)
        w = [p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh, p.weight_ih_reverse, p.weight_hh_reverse, p.bias_ih_reverse, p.bias_hh_reverse]
        y, _ = torch._VF.gru(seq, seq.new_zeros(2, Bn * T, H), w, True, 1, 0.0, training, True, True)
        return y.reshape(Bn, T, s.bands * 2 * H)


class _TorchLayerNorm:
    @staticmethod
    def init(spec):
        return {"weight": torch.ones, "bias": torch.zeros}

    @staticmethod
    def forward(p, s, xs, P, training):
        Bn, T = xs[0].shape[:2]
        C = s.size_in
        return nn.functional.layer_norm(xs[0].reshape(Bn, T, s.bands, C), (C,), p.weight, p.bias, s.eps).reshape(Bn, T, s.bands * C)


def _torch_glue(fn):
    return type("_TorchGlue", (), {"init": staticmethod(lambda spec: {}), "forward": staticmethod(lambda p, s, xs, P, training: fn(s, xs))})


TORCH_RUNNERS = {
    "linear": _TorchLinear,
    "gru": _TorchGRU,
    "bigru": _TorchBiGRU,
    "layernorm": _TorchLayerNorm,
    "pad": _torch_glue(lambda s, xs: nn.functional.pad(xs[0], (0, s.size_out - s.size_in))),
    "slice": _torch_glue(lambda s, xs: xs[0][..., s.start : s.stop]),
    "add": _torch_glue(lambda s, xs: sum(xs[1:], xs[0])),
    "concat": _torch_glue(lambda s, xs: torch.cat(xs, dim=-1)),
}


class GraphNet(_EnhanceMixin, nn.Module):
    """The PyTorch twin of :class:`npdgru.model.MaskModel` for any architecture (DPRNN, MPT, ...).

    Built from an architecture dict (``npdgru.architectures``); each layer is a submodule named as
    the layer, holding its tensors under their npdgru names, so ``state_dict()`` keys are exactly
    the npdgru tensor names (``inter1.weight_ih``) and ``npdgru convert --arch dprnn`` needs no map.
    Layouts follow PyTorch (batch first here): ``forward(features (B, T, 161), P)`` → mask.

    Layer semantics, as in ``model.py``: ``bands`` = F runs the same weights on F bands (the state
    of a D-GRU with bands is F streams per example); ``bigru`` is a dense bidirectional GRU across
    the bands of each frame (``nn.GRU(bidirectional=True)`` over F steps, h0 = 0).
    """

    def __init__(self, architecture: dict):
        super().__init__()
        from ..plan import make_plan
        from ..weights import expected_shapes, validate_architecture

        validate_architecture(architecture)
        self.architecture = architecture
        self.plan = make_plan(architecture)  # the steps npdgru's executors run; P is a forward argument here
        self.specs = architecture["layers"]
        self.inputs = [list(s.inputs) for s in self.plan.steps]
        shapes = expected_shapes(architecture)
        for spec in self.specs:
            n = spec["name"]
            mine = {k.split(".", 1)[1]: v for k, v in shapes.items() if k.split(".", 1)[0] == n}
            if mine:
                self.add_module(n, _Params(mine, TORCH_RUNNERS[spec["kind"]].init(spec)))

    @classmethod
    def from_weights(cls, weights) -> "GraphNet":
        """A GraphNet holding the tensors of an npdgru :class:`~npdgru.weights.Weights`."""
        model = cls(weights.architecture)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.tensors.items()}, strict=True)
        return model

    def forward(self, features: torch.Tensor, update_percent: float = 100.0) -> torch.Tensor:
        """(B, T, n_features) log-power features → (B, T, n_features) mask."""
        values = {"features": features}
        for s in self.plan.steps:
            p = getattr(self, s.name, None)
            values[s.name] = TORCH_RUNNERS[s.kind].forward(p, s, [values[n] for n in s.inputs], update_percent, self.training)
        return values[self.plan.steps[-1].name]


class MaskNet(_EnhanceMixin, nn.Module):
    """The NSNet2-shaped mask model: Linear+act, a D-GRU stack, Linear+act layers, a mask.

    Built from an npdgru architecture dict (``Weights.architecture``) of the form
    ``linear*, gru+, linear*`` with equal GRU sizes; module names are those of the PyTorch NSNet2
    layout (``fc_in``, ``rnn``, ``fc_out``) so that ``npdgru convert`` maps them by default.
    """

    def __init__(self, architecture: dict):
        super().__init__()
        problem = self.misfit(architecture)
        if problem:
            raise ParameterError(f"MaskNet needs {problem}")
        layers = architecture["layers"]
        rec = [i for i, layer in enumerate(layers) if KINDS[layer["kind"]].carries_state]
        first_gru, n_gru = rec[0], len(rec)
        grus = layers[first_gru : first_gru + n_gru]

        def stack(specs):
            mods = []
            for s in specs:
                mods += [nn.Linear(s["in"], s["out"]), _ACTIVATIONS[s.get("activation", "none")]()]
            return nn.Sequential(*mods)

        self.architecture = architecture
        self.layer_names = [layer["name"] for layer in layers]
        self.fc_in = stack(layers[:first_gru])
        self.rnn = DGRU(grus[0]["in"], grus[0]["hidden"], n_gru)
        self.fc_out = stack(layers[first_gru + n_gru :])

    @staticmethod
    def misfit(architecture: dict) -> str | None:
        """What keeps an architecture from the NSNet2 layout (None when it fits): a plain chain of
        format-1 kinds (fully connected layers around consecutive D-GRU layers of one size)."""
        from ..plan import format_version_of

        layers = architecture["layers"]
        if format_version_of(architecture) != 1:
            return "a plain chain of linear and D-GRU layers (format 1)"
        rec = [i for i, layer in enumerate(layers) if KINDS[layer["kind"]].carries_state]
        if not rec or rec != list(range(rec[0], rec[0] + len(rec))):
            return "the GRU layers to be consecutive"
        if len({layers[i]["hidden"] for i in rec}) != 1:
            return "GRU layers of one hidden size"
        return None

    @classmethod
    def holds(cls, weights) -> bool:
        """Whether :meth:`from_weights` takes these weights: an NSNet2-shaped chain whose tensors
        have the names of the PyTorch NSNet2 layout's map (``npdgru.convert.NSNET2_TORCH_NAMES``)."""
        from ..convert import NSNET2_TORCH_NAMES

        return cls.misfit(weights.architecture) is None and set(weights.tensors) <= set(NSNET2_TORCH_NAMES.values())

    def forward(self, features: torch.Tensor, update_percent: float = 100.0) -> torch.Tensor:
        """(B, T, 161) log-power features → (B, T, 161) mask."""
        y, _ = self.rnn(self.fc_in(features), update_percent=update_percent)
        return self.fc_out(y)

    @classmethod
    def from_weights(cls, weights) -> "MaskNet":
        """A MaskNet holding the tensors of an npdgru :class:`~npdgru.weights.Weights`."""
        from ..convert import NSNET2_TORCH_NAMES

        model = cls(weights.architecture)
        inverse = {npd: tor for tor, npd in NSNET2_TORCH_NAMES.items()}
        state = {inverse[k]: torch.from_numpy(v.copy()) for k, v in weights.tensors.items()}
        model.load_state_dict(state, strict=True)
        return model


assert N_BINS == N_FFT // 2 + 1
