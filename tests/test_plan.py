"""The plan and the kind table: every kind resolves in one place and runs on every backend.

* every kind of ``npdgru.kinds.KINDS`` has a runner in every backend (cpu, reference, cuda,
  torch, the pure reference model and the cpu frame program);
* a plan's steps carry A, the buffer widths and the state slots, so the executors resolve
  nothing again: P is checked once and A computed once per D-GRU step on the way to the kernels;
* the counters (MACs, weight bytes) against hand counts of NSNet2; the module doctest runs.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys

import pytest

from npdgru import kinds, plan, reference
from npdgru.architectures import architecture, dprnn, mpt, tiny_weights
from npdgru.errors import ParameterError, WeightsError
from npdgru.plan import make_plan, validate_architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ one runner per kind


def _missing(table) -> list:
    return sorted(set(kinds.KINDS) - set(table))


@pytest.mark.parametrize("module", ["npdgru.kernels.cpu", "npdgru.kernels.reference"])
def test_every_kind_has_a_runner_on_the_host_backends(module):
    import importlib

    mod = importlib.import_module(module)
    assert _missing(mod.RUNNERS) == [], f"{module} has no runner for these kinds"
    assert mod.Executor.runners is mod.RUNNERS


def test_every_kind_has_a_frame_step_and_a_reference_step():
    from npdgru.kernels import cpu

    assert _missing(cpu.FRAME_STEPS) == []
    assert _missing(reference._STEPS) == []


def test_every_kind_has_a_runner_on_cuda():
    """Imported in a fresh process on numba's CUDA simulator (the variable must be set before numba starts)."""
    code = "import sys; from npdgru.kernels import cuda; from npdgru.kinds import KINDS; sys.stdout.write(','.join(sorted(set(KINDS) - set(cuda.RUNNERS))) + '|' + str(cuda.Executor.runners is cuda.RUNNERS))"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and "numba.cuda" in r.stderr and "No module" in r.stderr:  # pragma: no cover
        pytest.skip("numba.cuda cannot be imported here")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "|True", f"cuda lacks runners for: {r.stdout}"


def test_every_kind_has_a_torch_runner():
    pytest.importorskip("torch")
    from npdgru.train.torch_model import TORCH_RUNNERS

    assert _missing(TORCH_RUNNERS) == []


def test_kind_codes_are_the_table_order():
    assert [k.code for k in kinds.KINDS.values()] == list(range(len(kinds.KINDS)))
    assert all(name == k.name for name, k in kinds.KINDS.items())


def test_an_executor_refuses_a_kind_it_has_no_runner_for(monkeypatch):
    from npdgru.kernels import cpu

    w = tiny_weights(hidden=4)
    p = make_plan(w.architecture)
    monkeypatch.delitem(cpu.RUNNERS, "gru")
    with pytest.raises(ParameterError, match="kind 'gru' has no runner"):
        cpu.Executor(p, w.tensors)


# ------------------------------------------------------------------------ what a step carries


def test_steps_carry_a_widths_and_state_slots():
    p = make_plan(dprnn(), update_percent=50)
    by = {s.name: s for s in p.steps}
    assert by["pad"].in_widths == (161,) and by["pad"].width == 164
    assert by["enc"].bands == 41 and by["enc"].width == 41 * 32
    assert by["intra1"].hidden == 16 and by["intra1"].width == 41 * 32 and by["intra1"].A is None
    assert by["inter1"].A == 32 and not by["inter1"].dense and by["inter1"].state_index == 0
    assert by["inter2"].state_index == 1 and [s.name for s in p.state_steps] == ["inter1", "inter2"]
    assert by["intra1_res"].in_widths == (41 * 32, 41 * 32)
    assert by["mask"].width == 161 and by["mask"].state_index == -1


def test_sparse_input_records_the_changed_count_of_its_source():
    p = make_plan(architecture("nsnet2"), update_percent=25, sparse_inputs=True)
    g1, g2 = p.step("gru1"), p.step("gru2")
    assert (g1.sparse_input, g1.A_in) == (False, None)  # fed by a linear layer: dense input
    assert (g2.sparse_input, g2.A_in) == (True, g1.A) and g1.A == 100
    assert not make_plan(architecture("nsnet2"), update_percent=100, sparse_inputs=True).step("gru2").sparse_input


def test_gru_layers_run_the_plans_a(monkeypatch):
    """A is resolved once (in the plan): the executor's layers take step.A, and P is checked once."""
    from npdgru.kernels import cpu

    calls = []
    real = reference.num_selected
    monkeypatch.setattr(reference, "num_selected", lambda P, H: calls.append((P, H)) or real(P, H))
    w = tiny_weights(hidden=8)
    p = make_plan(w.architecture, update_percent=50)
    ex = cpu.Executor(p, w.tensors)
    assert [g.A for g in ex.gru_layers] == [s.A for s in p.state_steps] == [4, 4]
    assert calls == [(50, 1), (50.0, 8), (50.0, 8)]  # P checked once, then A once per D-GRU step


def test_plan_as_data_is_plain_data():
    d = make_plan(mpt(), update_percent=30).as_data()
    assert json.loads(json.dumps(d)) == json.loads(json.dumps(d))  # lists, dicts, numbers, strings only
    assert [s["name"] for s in d["steps"]][-1] == "out" and d["n_features"] == 161


# ------------------------------------------------------------------------ P and the counters


@pytest.mark.parametrize("P", [0, 101, float("nan"), "50", None, True])
def test_make_plan_refuses_a_bad_percent(P):
    with pytest.raises(ParameterError, match="update_percent"):
        make_plan(architecture("nsnet2"), update_percent=P)


def test_nsnet2_counters_by_hand():
    I0, H, F2, F3 = 161, 400, 600, 600
    other = I0 * 400 + 400 * F2 + F2 * F3 + F3 * 161
    dense = 2 * 3 * H * (400 + H)
    m = make_plan(architecture("nsnet2"), update_percent=100).macs()
    assert m == {"gru_dense": dense, "gru_paper": dense, "gru_ours": dense, "other": other}
    m = make_plan(architecture("nsnet2"), update_percent=50, sparse_inputs=True).macs()
    A = 200
    assert m["gru_paper"] == 2 * (H + 2 * A) * (400 + H)
    assert m["gru_ours"] == (3 * H * 400 + 3 * H * A) + (3 * H * A + 3 * H * A)
    wb = make_plan(architecture("nsnet2"), update_percent=50, sparse_inputs=True).weight_bytes()
    fc = 4 * (I0 * 400 + 400 + 400 * F2 + F2 + F2 * F3 + F3 + F3 * 161 + 161)
    gru = 4 * (3 * H * (400 + H) + 6 * H)
    assert wb["dense"] == fc + 2 * gru
    assert wb["ours"] == fc + 4 * (3 * H * (400 + A) + 6 * H) + 4 * (3 * H * (A + A) + 6 * H)


def test_module_doctest_runs():
    r = doctest.testmod(plan)
    assert r.attempted > 0 and r.failed == 0


# ------------------------------------------------------------------------ the schema, kind by kind


def _arch(*layers, n=161):
    return {"name": "t", "n_features": n, "layers": list(layers)}


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"kind": "conv", "name": "s"}, "kind 'conv' is not one of"),
        ({"kind": "linear", "name": "a", "in": 161, "out": 161, "activation": "gelu"}, "activation 'gelu'"),
        ({"kind": "linear", "name": "a", "in": 160, "out": 161}, "input size 160 does not match the width 161"),
        ({"kind": "pad", "name": "a", "in": 161, "out": 100}, "pad out=100 is smaller than in=161"),
        ({"kind": "slice", "name": "a", "start": 5, "stop": 170}, "slice [5, 170) is not inside the width 161"),
        ({"kind": "layernorm", "name": "a", "size": 161, "eps": 2.0}, "eps=2.0 must be a float in (0, 1)"),
        ({"kind": "pad", "name": "a", "in": 161, "out": 161, "bands": 1}, "kind 'pad' takes no 'bands'"),
        ({"kind": "add", "name": "a"}, "add needs at least two inputs"),
        ({"kind": "gru", "name": "a", "in": 161, "hidden": 0}, "'hidden'=0 must be an integer >= 1"),
    ],
)
def test_each_kind_checks_its_layer(layer, message):
    with pytest.raises(WeightsError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate_architecture(_arch(layer), path="m.safetensors")


def test_widths_and_shapes_come_from_the_kinds():
    a = dprnn(channels=8, intra_hidden=4, inter_hidden=6, blocks=1)
    validate_architecture(a)
    shapes = plan.expected_shapes(a)
    assert shapes["intra1.weight_ih_reverse"] == (12, 8) and shapes["inter1.weight_hh"] == (18, 6)
    assert shapes["enc_norm.weight"] == (8,) and "pad.weight" not in shapes
    assert plan.describe_layer(a["layers"][3]) == "BiGRU 8 -> 2x4 (across the bands of a frame, dense), 41 bands  <- enc_norm"
    assert plan.format_version_of(architecture("nsnet2")) == 1 and plan.format_version_of(a) == 2


def test_reference_imports_nothing_of_npdgru():
    import ast

    tree = ast.parse(open(reference.__file__).read())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
    assert mods <= {"__future__", "math", "dataclasses", "fractions", "numpy"}, mods


def test_reference_forward_walks_every_kind():
    a = dprnn(channels=8, intra_hidden=4, inter_hidden=6, blocks=1)
    assert {s["kind"] for s in make_plan(a).as_data()["steps"]} == set(kinds.KINDS) - {"concat"}
    assert "concat" in {s["kind"] for s in make_plan(mpt()).as_data()["steps"]}
