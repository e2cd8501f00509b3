"""One frame of B streams through every step of a plan in one jitted call (the streaming hop).

The kernels are those of the layers (``kernels.py``) on T = 1, so a frame gives the bits the
per-layer path gives. Each kind puts its step into the program through ``FRAME_STEPS[kind]``;
the jitted switch reads the kind codes of the one table, ``npdgru.kinds.KINDS``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ...errors import ParameterError
from ...kinds import KINDS
from .._config import JIT
from .kernels import _activate, _affine_columns, _dgru_forward, _gru_forward, _layer_norm

__all__ = ["FrameProgram", "FRAME_STEPS"]

# kind codes of the jitted switch: each kind's index in the one table (npdgru.kinds.KINDS)
_K_LINEAR, _K_GRU, _K_BIGRU, _K_NORM, _K_ADD, _K_CONCAT, _K_PAD, _K_SLICE = (KINDS[k].code for k in ("linear", "gru", "bigru", "layernorm", "add", "concat", "pad", "slice"))
# columns of a step's row in the code table
(_C_KIND, _C_OUT, _C_NIN, _C_F, _C_IN, _C_OUTSZ, _C_A, _C_DENSE, _C_SPARSE, _C_ACT, _C_START,
 _C_W, _C_B, _C_ST, _C_SCR, _C_REFRESH) = range(16)
_N_COLS = 16


@njit(**JIT)
def _frame_steps(codes, ins, eps, vals, W, Bv, Hs, Ms, Gs, Xs, Ss, scratch, sel0, ubuf, qbuf, idx, dh, idx_in, d_in):
    """Every step of a plan for one frame of B streams: vals[0] (B, n_features) -> vals[-1].

    The same kernels as the per-layer path (``GRULayer._run``, ``Linear._run``, ...) on T = 1, so
    a frame gives the bits it gives there: streaming == offline. codes: one row per step (the
    ``_C_*`` columns); ins: the input slots of each step; vals: one (B, width) buffer per slot.
    """
    B = vals[0].shape[0]
    n_st = len(Ss) // 2  # Ss: the step arrays of the D-GRU states, then their tau arrays
    for i in range(codes.shape[0]):
        c = codes[i]
        kind = c[_C_KIND]
        y = vals[c[_C_OUT]]
        x = vals[ins[i, 0]]
        F = c[_C_F]
        n_in = c[_C_IN]
        n_out = c[_C_OUTSZ]
        if kind == _K_LINEAR:
            yo = y.reshape(B * F, n_out)
            _affine_columns(x.reshape(B * F, n_in), W[c[_C_W]], Bv[c[_C_B]], yo)
            _activate(yo, c[_C_ACT])
        elif kind == _K_NORM:
            _layer_norm(x.reshape(B * F, n_in), Bv[c[_C_B]], Bv[c[_C_B] + 1], eps[i], y.reshape(B * F, n_in))
        elif kind == _K_GRU:
            BF = B * F
            H = n_out
            st = c[_C_ST]
            x3 = x.reshape(1, BF, n_in)
            y3 = y.reshape(1, BF, H)
            if c[_C_SPARSE] == 1:
                _dgru_forward(x3[:0], x3, W[c[_C_W]], Bv[c[_C_B]], W[c[_C_W] + 1], Bv[c[_C_B] + 1], c[_C_A], c[_C_REFRESH], Hs[st], Ms[st], Gs[st], Xs[st], Ss[st], Ss[n_st + st], y3, sel0, ubuf[:H], qbuf[:H], idx[:H], dh[:H], idx_in, d_in)
            else:
                gi = scratch[c[_C_SCR]][: BF * 3 * H].reshape(1, BF, 3 * H)
                _affine_columns(x.reshape(BF, n_in), W[c[_C_W]], Bv[c[_C_B]], gi.reshape(BF, 3 * H))
                if c[_C_DENSE] == 1:
                    _gru_forward(gi, W[c[_C_W] + 1], Bv[c[_C_B] + 1], Hs[st], Ms[st], y3)
                else:
                    _dgru_forward(gi, x3[:0], W[c[_C_W]], Bv[c[_C_B]], W[c[_C_W] + 1], Bv[c[_C_B] + 1], c[_C_A], c[_C_REFRESH], Hs[st], Ms[st], Gs[st], Xs[st], Ss[st], Ss[n_st + st], y3, sel0, ubuf[:H], qbuf[:H], idx[:H], dh[:H], idx_in, d_in)
        elif kind == _K_BIGRU:
            # a sequence of F band steps per stream from h = 0, forward then backward
            H = n_out // 2
            I = n_in
            s = scratch[c[_C_SCR]]
            o = 0
            seq = s[o : o + F * B * I].reshape(F, B, I)
            o += F * B * I
            gi = s[o : o + F * B * 3 * H].reshape(F, B, 3 * H)
            o += F * B * 3 * H
            h = s[o : o + B * H].reshape(B, H)
            o += B * H
            m = s[o : o + B * 3 * H].reshape(B, 3 * H)
            o += B * 3 * H
            yd = s[o : o + F * B * H].reshape(F, B, H)
            for d in range(2):
                for f in range(F):
                    fs = f if d == 0 else F - 1 - f
                    for b in range(B):
                        for j in range(I):
                            seq[f, b, j] = x[b, fs * I + j]
                _affine_columns(seq.reshape(F * B, I), W[c[_C_W] + 2 * d], Bv[c[_C_B] + 2 * d], gi.reshape(F * B, 3 * H))
                h[:] = 0.0
                _gru_forward(gi, W[c[_C_W] + 2 * d + 1], Bv[c[_C_B] + 2 * d + 1], h, m, yd)
                for f in range(F):
                    fs = f if d == 0 else F - 1 - f
                    for b in range(B):
                        for j in range(H):
                            y[b, fs * 2 * H + d * H + j] = yd[f, b, j]
        elif kind == _K_ADD:
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, j]
            for k in range(1, c[_C_NIN]):
                z = vals[ins[i, k]]
                for b in range(B):
                    for j in range(n_out):
                        y[b, j] = y[b, j] + z[b, j]
        elif kind == _K_CONCAT:
            off = 0
            for k in range(c[_C_NIN]):
                z = vals[ins[i, k]]
                w = z.shape[1]
                for b in range(B):
                    for j in range(w):
                        y[b, off + j] = z[b, j]
                off += w
        elif kind == _K_PAD:
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, j] if j < n_in else np.float32(0.0)
        else:  # slice
            s0 = c[_C_START]
            for b in range(B):
                for j in range(n_out):
                    y[b, j] = x[b, s0 + j]


class FrameProgram:
    """One frame of B streams through every step of a plan in one jitted call, with every buffer
    allocated here, once: write the features into ``features`` (B, n_features), call
    :meth:`run` with an executor state of B streams, read the mask from ``mask`` (B, n_features).

    The kernels are those of the per-layer path on T = 1, so the mask has the bits of
    :meth:`Executor.run` on the same frame (tests/test_fused_hop.py).
    """

    def __init__(self, executor, batch: int):
        plan = executor.plan
        f32 = np.float32
        B = batch
        steps = plan.steps
        self.batch = B
        self.vals = tuple([np.zeros((B, plan.n_features), f32)] + [np.zeros((B, s.width), f32) for s in steps])
        codes = np.zeros((len(steps), _N_COLS), np.int64)
        ins = np.zeros((len(steps), max(len(s.slots) for s in steps)), np.int64)
        eps = np.zeros(len(steps), f32)
        W, Bv, scratch = [], [], []
        self._maxH = self._maxI = 1
        for i, (s, runner) in enumerate(zip(steps, executor.steps)):
            c = codes[i]
            if s.kind not in FRAME_STEPS:
                raise ParameterError(f"a frame program has no step for kind {s.kind!r} (step {s.name})")
            c[_C_KIND], c[_C_OUT], c[_C_NIN], c[_C_F] = KINDS[s.kind].code, s.slot, len(s.slots), s.bands
            c[_C_IN], c[_C_OUTSZ], c[_C_START] = s.size_in, s.size_out, s.start
            ins[i, : len(s.slots)] = s.slots
            c[_C_W], c[_C_B], c[_C_SCR] = len(W), len(Bv), len(scratch)
            FRAME_STEPS[s.kind](self, s, runner, c, W, Bv, scratch, eps)
        n_state = len(plan.state_steps)
        maxH, maxI = self._maxH, self._maxI
        if not W or not Bv or not n_state:
            raise ParameterError("a frame program needs at least one linear and one gru step")
        scratch.append(np.zeros(1, f32))
        self.codes, self.ins, self.eps = codes, ins, eps
        self.W, self.Bv, self.scratch = tuple(W), tuple(Bv), tuple(scratch)
        self.sel0 = np.zeros((0, 1, 1), np.bool_)
        self.ubuf, self.qbuf, self.dh = np.zeros(maxH, f32), np.zeros(maxH, f32), np.zeros(maxH, f32)
        self.idx = np.zeros(maxH, np.int64)
        self.idx_in, self.d_in = np.zeros(maxI, np.int64), np.zeros(maxI, f32)
        self.features, self.mask = self.vals[0], self.vals[-1]
        self._state_ref = None

    def _bind(self, state) -> None:
        """The tuples of state arrays (rebuilt only when the state object changes)."""
        if state.batch != self.batch:
            raise ParameterError(f"state of {state.batch} streams for a frame program of {self.batch}")
        L = state.layers
        self._st = (tuple(s.h for s in L), tuple(s.m for s in L), tuple(s.g for s in L), tuple(s.xprev for s in L), tuple(s.step for s in L) + tuple(s.tau for s in L))
        # step and tau arrays in one tuple: with one argument more (20) the jitted call retained
        # about 400 bytes per call under numba 0.68's dispatcher (tracemalloc; 19 and 21 did not)
        self._state_ref = state

    def run(self, state) -> None:
        """features -> mask for one frame; ``state`` (B streams, from the executor) updated in place."""
        if self._state_ref is not state:
            self._bind(state)
        Hs, Ms, Gs, Xs, Ss = self._st
        _frame_steps(self.codes, self.ins, self.eps, self.vals, self.W, self.Bv, Hs, Ms, Gs, Xs, Ss, self.scratch, self.sel0, self.ubuf, self.qbuf, self.idx, self.dh, self.idx_in, self.d_in)


def _frame_linear(prog, s, runner, c, W, Bv, scratch, eps):
    W.append(runner.layer.wt)
    Bv.append(runner.layer.bias)
    c[_C_ACT] = runner.layer._code
    scratch.append(np.zeros(0, np.float32))


def _frame_norm(prog, s, runner, c, W, Bv, scratch, eps):
    Bv += [runner.layer.weight, runner.layer.bias]
    eps[s.slot - 1] = runner.layer.eps


def _frame_gru(prog, s, runner, c, W, Bv, scratch, eps):
    g = runner.layer
    W += [g.wih_t, g.whh_t]
    Bv += [g.bias_ih, g.bias_hh]
    c[_C_A], c[_C_DENSE], c[_C_SPARSE] = g.A, int(g.dense), int(g.sparse_input and not g.dense)
    c[_C_REFRESH], c[_C_ST] = g.refresh_every, s.state_index
    scratch.append(np.zeros(prog.batch * s.bands * 3 * s.hidden, np.float32))
    prog._maxH, prog._maxI = max(prog._maxH, s.hidden), max(prog._maxI, s.size_in)


def _frame_bigru(prog, s, runner, c, W, Bv, scratch, eps):
    fwd, bwd = runner.layers
    W += [fwd.wih_t, fwd.whh_t, bwd.wih_t, bwd.whh_t]
    Bv += [fwd.bias_ih, fwd.bias_hh, bwd.bias_ih, bwd.bias_hh]
    F, I, H, B = s.bands, s.size_in, s.hidden, prog.batch
    scratch.append(np.zeros(F * B * I + F * B * 3 * H + B * H + B * 3 * H + F * B * H, np.float32))


def _frame_glue(prog, s, runner, c, W, Bv, scratch, eps):
    """Shape glue: everything it needs is in its code row."""


# how each kind puts its step into a frame program (its tensors, its scratch, its code row); the
# jitted _frame_steps runs them by KINDS[kind].code
FRAME_STEPS = {"linear": _frame_linear, "gru": _frame_gru, "bigru": _frame_bigru, "layernorm": _frame_norm,
               "pad": _frame_glue, "slice": _frame_glue, "add": _frame_glue, "concat": _frame_glue}


def covers(plan) -> bool:
    """Whether :class:`FrameProgram` runs ``plan``: every step kind has a frame step, the plan
    has a D-GRU step along time (the program's buffers need one), and every D-GRU step has the
    top-A gate. A threshold or delta step streams on the per-layer path (the same kernels on one
    frame, the same bits): with its branch in _frame_steps (``_gated_forward``) the first,
    uncached compile of every streaming user grew from 16.4-17.5 s to 24.5-36.2 s (tiny model,
    empty NUMBA_CACHE_DIR, this 2-core machine loaded; two runs each), a cost for every model
    that the variable gates do not justify yet."""
    return all(s.kind in FRAME_STEPS for s in plan.steps) and bool(plan.state_steps) and all(s.gate == "top-a" for s in plan.state_steps)
