"""A deliberately slow, independent GRU / D-GRU: scalar loops over neurons, pure Python floats.

Written from the equations of docs/design.md (torch.nn.GRU convention, gate order r, z, n,
reset applied after the recurrent product), *not* from ``npdgru.reference``: no NumPy matmul, no
sort, no shared helper. Python floats are IEEE float64, so this is the float64 ground truth that
``reference`` itself is checked against (tests/test_reference.py).

    r_i = σ(Σ_j W_ir[i,j] x_j + b_ir[i] + Σ_k W_hr[i,k] h_k + b_hr[i])
    z_i = σ(Σ_j W_iz[i,j] x_j + b_iz[i] + Σ_k W_hz[i,k] h_k + b_hz[i])
    n_i = tanh(Σ_j W_in[i,j] x_j + b_in[i] + r_i (Σ_k W_hn[i,k] h_k + b_hn[i]))
    u_i = 1 − z_i
    rank_i = #{k : u_k > u_i or (u_k == u_i and k < i)}     (ties -> lower index)
    h'_i = h_i + u_i (n_i − h_i)  if rank_i < A  else h_i
"""

from __future__ import annotations

import math


def _sigmoid(a: float) -> float:
    if a >= 0.0:
        return 1.0 / (1.0 + math.exp(-a))
    e = math.exp(a)  # no overflow for large negative a
    return e / (1.0 + e)


def _row_dot(W, row: int, v) -> float:
    s = 0.0
    for j in range(len(v)):
        s += float(W[row][j]) * float(v[j])
    return s


def _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Per-neuron gates (u, r, n) as Python lists; r and n for every neuron (the naive way)."""
    H = len(h)
    u, r, n = [], [], []
    for i in range(H):
        a_r = _row_dot(weight_ih, i, x) + float(bias_ih[i]) + _row_dot(weight_hh, i, h) + float(bias_hh[i])
        a_z = _row_dot(weight_ih, H + i, x) + float(bias_ih[H + i]) + _row_dot(weight_hh, H + i, h) + float(bias_hh[H + i])
        hn = _row_dot(weight_hh, 2 * H + i, h) + float(bias_hh[2 * H + i])
        r_i = _sigmoid(a_r)
        z_i = _sigmoid(a_z)
        n_i = math.tanh(_row_dot(weight_ih, 2 * H + i, x) + float(bias_ih[2 * H + i]) + r_i * hn)
        u.append(1.0 - z_i)
        r.append(r_i)
        n.append(n_i)
    return u, r, n


def naive_update_gate(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """u = 1 − z for every neuron, as a list (used for selection margins)."""
    return _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)[0]


def naive_select(u, A: int):
    """Selected flags of the A largest u by counting ranks (O(H²), no sort), ties -> lower index."""
    H = len(u)
    flags = []
    for i in range(H):
        rank = 0
        for k in range(H):
            if u[k] > u[i] or (u[k] == u[i] and k < i):
                rank += 1
        flags.append(rank < A)
    return flags


def naive_gru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """Dense GRU step, torch form h' = (1 − z) n + z h. Returns a list of H floats."""
    u, _, n = _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    return [u[i] * n[i] + (1.0 - u[i]) * float(h[i]) for i in range(len(h))]


def naive_dgru_step(x, h, weight_ih, weight_hh, bias_ih, bias_hh, A: int):
    """D-GRU step. Returns (h_new list, selected flags list); unselected entries are h's own floats."""
    u, _, n = _gates(x, h, weight_ih, weight_hh, bias_ih, bias_hh)
    sel = naive_select(u, A)
    h_new = [float(h[i]) + u[i] * (n[i] - float(h[i])) if sel[i] else float(h[i]) for i in range(len(h))]
    return h_new, sel


def naive_gru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh):
    """x (T, B, I) nested sequences, h0 (B, H) -> out[t][b] lists."""
    T, B = len(x), len(x[0])
    h = [list(map(float, h0[b])) for b in range(B)]
    out = []
    for t in range(T):
        h = [naive_gru_step(x[t][b], h[b], weight_ih, weight_hh, bias_ih, bias_hh) for b in range(B)]
        out.append([list(hb) for hb in h])
    return out


def naive_dgru_sequence(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, A: int):
    """D-GRU over T steps for B independent streams -> (out[t][b], sel[t][b])."""
    T, B = len(x), len(x[0])
    h = [list(map(float, h0[b])) for b in range(B)]
    out, sel = [], []
    for t in range(T):
        step = [naive_dgru_step(x[t][b], h[b], weight_ih, weight_hh, bias_ih, bias_hh, A) for b in range(B)]
        h = [s[0] for s in step]
        out.append([list(hb) for hb in h])
        sel.append([list(s[1]) for s in step])
    return out, sel
