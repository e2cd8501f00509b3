"""read_checkpoint on hostile input: refused globals, broken archives, bombs, fuzzing.

Every crafted file here is built by hand (raw pickle opcodes + zipfile), so these tests run
without torch; the few that use ``torch.save`` to produce a realistic malicious checkpoint skip
when torch is absent. Payloads only ever ``touch`` a canary file under ``tmp_path``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npdgru.convert.torch_checkpoint import ALLOWED_GLOBALS, read_checkpoint
from npdgru.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# ---------------------------------------------------------------------------------------------
# A tiny raw-opcode writer for torch-style pickles (protocol 2, like torch.save)
# ---------------------------------------------------------------------------------------------


def op_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def op_int(i: int) -> bytes:
    return pickle.dumps(i, protocol=2)[2:-1]


def op_global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def op_ordered_dict() -> bytes:
    return op_global("collections", "OrderedDict") + b")R"


def op_tensor(
    key: str,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str = "FloatStorage",
    legacy: bool = False,
) -> bytes:
    pid = [op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"),
           op_int(numel)]
    if legacy:
        pid.append(b"N")
    return (
        op_global("torch._utils", "_rebuild_tensor_v2")
        + b"("
        + op_tuple(pid)
        + b"Q"  # BINPERSID
        + op_int(offset)
        + op_tuple([op_int(d) for d in size])
        + op_tuple([op_int(s) for s in stride])
        + b"\x89"  # NEWFALSE (requires_grad)
        + op_ordered_dict()  # backward_hooks
        + b"tR"
    )


def state_pickle(entries: dict[str, bytes], extra: bytes = b"") -> bytes:
    """Protocol-2 pickle of OrderedDict(name -> object given as opcodes)."""
    body = b"".join(op_str(k) + v for k, v in entries.items())
    return b"\x80\x02" + op_ordered_dict() + b"(" + body + extra + b"u."


def write_zip(
    path: Path,
    pkl: bytes,
    records: dict[str, bytes],
    *,
    prefix: str = "archive",
    byteorder: str | None = "little",
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in records.items():
            zf.writestr(f"{prefix}/data/{key}", data, compress_type=compression)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def write_legacy(path: Path, main: bytes, storages: dict[str, tuple[int, bytes]]) -> Path:
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 8}}
    out = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, sys_info):
        out.write(pickle.dumps(obj, protocol=2))
    out.write(main)
    out.write(pickle.dumps(list(storages), protocol=2))
    for numel, data in storages.values():
        out.write(struct.pack("<q", numel))
        out.write(data)
    path.write_bytes(out.getvalue())
    return path


W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7


def valid_zip(path: Path) -> Path:
    pkl = state_pickle({
        "w": op_tensor("0", 12, 0, (3, 4), (4, 1)),
        "wt": op_tensor("0", 12, 0, (4, 3), (1, 4)),
        "b": op_tensor("1", 3, 0, (3,), (1,)),
    })
    return write_zip(path, pkl, {"0": W.tobytes(), "1": np.ones(3, np.float32).tobytes()})


def valid_legacy(path: Path) -> Path:
    main = state_pickle({
        "w": op_tensor("0", 12, 0, (3, 4), (4, 1), legacy=True),
        "b": op_tensor("1", 3, 0, (3,), (1,), legacy=True),
    })
    ones = np.ones(3, np.float32).tobytes()
    return write_legacy(path, main, {"0": (12, W.tobytes()), "1": (3, ones)})


def test_builders_produce_readable_checkpoints(tmp_path: Path) -> None:
    state, notes = read_checkpoint(valid_zip(tmp_path / "z.pt"))
    np.testing.assert_array_equal(state["w"], W)
    np.testing.assert_array_equal(state["wt"], W.T)
    assert state["wt"].flags.c_contiguous
    state, _ = read_checkpoint(valid_legacy(tmp_path / "l.pt"))
    np.testing.assert_array_equal(state["w"], W)
    np.testing.assert_array_equal(state["b"], np.ones(3, np.float32))


def test_builders_match_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    for p in (valid_zip(tmp_path / "z.pt"), valid_legacy(tmp_path / "l.pt")):
        ref = torch.load(p, weights_only=True)
        np.testing.assert_array_equal(ref["w"].numpy(), W)


# ---------------------------------------------------------------------------------------------
# Code-execution payloads
# ---------------------------------------------------------------------------------------------


def _canary_cmd(tmp_path: Path) -> str:
    return f"touch {tmp_path / 'CANARY'}"


class ReduceTo:
    """An object whose pickle calls ``func(*args)`` on load."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


def _payloads(tmp_path: Path) -> list[tuple[str, object]]:
    cmd = _canary_cmd(tmp_path)
    return [
        (f"{os.system.__module__}.system", ReduceTo(os.system, (cmd,))),
        ("builtins.eval", ReduceTo(eval, (f"__import__('os').system({cmd!r})",))),
        ("builtins.exec", ReduceTo(exec, (f"import os; os.system({cmd!r})",))),
        ("subprocess.Popen", ReduceTo(subprocess.Popen, (["touch", str(tmp_path / "CANARY")],))),
        ("builtins.getattr", ReduceTo(getattr, ("x", "upper"))),
        ("numpy.frombuffer", ReduceTo(np.frombuffer, (b"\0\0\0\0",))),
    ]


def _spliced_state(obj: object) -> bytes:
    """A protocol-2 state dict whose second entry is the payload's own opcodes."""
    payload = pickle.dumps(obj, protocol=2)[2:-1]  # strip PROTO 2 and STOP
    return state_pickle({"w": op_tensor("0", 12, 0, (3, 4), (4, 1)), "evil": payload})


@pytest.mark.parametrize("container", ["zip", "legacy", "plain"])
def test_code_execution_payloads_refused(tmp_path: Path, container: str) -> None:
    for global_name, obj in _payloads(tmp_path):
        pkl = _spliced_state(obj)
        path = tmp_path / f"evil_{container}.pt"
        if container == "zip":
            write_zip(path, pkl, {"0": W.tobytes()})
        elif container == "legacy":
            pkl = pkl.replace(op_str("cpu") + op_int(12), op_str("cpu") + op_int(12) + b"N")
            write_legacy(path, pkl, {"0": (12, W.tobytes())})
        else:
            path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert global_name in str(info.value), (global_name, str(info.value))
        assert str(path) in str(info.value)
        assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_payload_in_data_pkl_any_protocol(tmp_path: Path, protocol: int) -> None:
    """Whole data.pkl from the stdlib pickler: GLOBAL (<=3) and STACK_GLOBAL (>=4) paths."""
    cmd = _canary_cmd(tmp_path)
    pkl = pickle.dumps({"evil": ReduceTo(os.system, (cmd,))}, protocol=protocol)
    path = write_zip(tmp_path / "evil.pt", pkl, {})
    with pytest.raises(CheckpointError, match=rf"{os.system.__module__}\.system"):
        read_checkpoint(path)
    assert not (tmp_path / "CANARY").exists()


def test_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Sanity check that the canary mechanism works: plain pickle.loads does run it."""
    pickle.loads(pickle.dumps(ReduceTo(os.system, (_canary_cmd(tmp_path) + " >/dev/null",))))
    assert (tmp_path / "CANARY").exists()


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        (b"cposix\nsystem\n(Vtouch {c}\ntR.", "posix.system"),
        (b"cos\nsystem\n(Vtouch {c}\ntR.", "os.system"),
        (b"(Vtouch {c}\nios\nsystem\n.", "os.system"),  # INST
        (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x8c\x0ftouch {c}\x85R.", "posix.system"),
        (b"cbuiltins\n__import__\n(Vos\ntR.", "builtins.__import__"),
        (b"c__builtin__\neval\n(Vprint(1)\ntR.", "__builtin__.eval"),
        (b"ctorch\nload\n(Vx\ntR.", "torch.load"),
        (b"ctorch._utils\n_rebuild_device_tensor_from_numpy\n(tR.",
         "torch._utils._rebuild_device_tensor_from_numpy"),
        (b"ccollections\nCounter\n)R.", "collections.Counter"),
    ],
)
def test_raw_global_refused(tmp_path: Path, raw: bytes, name: str) -> None:
    canary = str(tmp_path / "CANARY").encode()
    pkl = raw.replace(b"{c}", canary)
    if b"\x8c\x0ftouch" in pkl:  # fix SHORT_BINUNICODE length for the STACK_GLOBAL variant
        arg = b"touch " + canary
        pkl = pkl.replace(b"\x8c\x0ftouch " + canary, b"\x8c" + bytes([len(arg)]) + arg)
    for container in ("zip", "legacy"):
        path = tmp_path / f"raw_{container}.pt"
        if container == "zip":
            write_zip(path, pkl, {})
        else:
            write_legacy(path, pkl, {})
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        assert name in str(info.value)
        assert not (tmp_path / "CANARY").exists()


def test_extension_opcodes_refused(tmp_path: Path) -> None:
    for ext in (b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00"):
        path = write_zip(tmp_path / "ext.pt", b"\x80\x02" + ext + b".", {})
        with pytest.raises(CheckpointError, match="EXT"):
            read_checkpoint(path)


def test_storage_type_not_callable(tmp_path: Path) -> None:
    """An allowed storage marker or rebuild function called with junk is still refused."""
    for body in (
        op_global("torch", "FloatStorage") + op_tuple([op_int(5)]) + b"R",
        op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple([op_int(1)] * 6) + b"R",
        op_global("torch._utils", "_rebuild_parameter") + op_tuple([op_int(1)] * 3) + b"R",
    ):
        path = write_zip(tmp_path / "junk.pt", state_pickle({"x": body}), {})
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_torch_saved_malicious_objects_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cmd = _canary_cmd(tmp_path)
    obj = {"w": torch.ones(3), "evil": ReduceTo(os.system, (cmd,))}
    for legacy in (False, True):
        path = tmp_path / f"torch_evil_{legacy}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError, match=rf"{os.system.__module__}\.system"):
            read_checkpoint(path)
        assert not (tmp_path / "CANARY").exists()


def test_reader_never_imports_torch(tmp_path: Path) -> None:
    path = valid_zip(tmp_path / "z.pt")
    code = (
        "import sys\n"
        "from npdgru.convert.torch_checkpoint import read_checkpoint\n"
        f"state, notes = read_checkpoint({str(path)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'safetensors' not in sys.modules, 'safetensors was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_allow_list_is_exactly_tensor_rebuilding() -> None:
    assert "collections.OrderedDict" in ALLOWED_GLOBALS
    assert "torch._utils._rebuild_tensor_v2" in ALLOWED_GLOBALS
    for bad in ("builtins.eval", "os.system", "posix.system", "torch.load", "torch.Size",
                "torch.nn.modules.linear.Linear", "torch._tensor._rebuild_from_type_v2"):
        assert bad not in ALLOWED_GLOBALS
    assert all(g.startswith(("torch.", "collections.")) for g in ALLOWED_GLOBALS)


# ---------------------------------------------------------------------------------------------
# Structurally broken archives
# ---------------------------------------------------------------------------------------------


def _zip_with(tmp_path: Path, tensor: bytes, records: dict[str, bytes]) -> Path:
    return write_zip(tmp_path / "bad.pt", state_pickle({"w": tensor}), records)


@pytest.mark.parametrize(
    ("tensor", "records", "match"),
    [
        (op_tensor("0", 12, 0, (3, 4), (4, 1)), {}, "not in the archive"),
        (op_tensor("7", 12, 0, (3, 4), (4, 1)), {"0": W.tobytes()}, "archive/data/7"),
        (op_tensor("../0", 12, 0, (3, 4), (4, 1)), {"0": W.tobytes()}, "invalid storage key"),
        (op_tensor("0", 12, 0, (3, 4), (4, 1)), {"0": W.tobytes()[:40]}, "holds only 40 bytes"),
        (op_tensor("0", 12, 0, (4, 4), (4, 1)), {"0": W.tobytes()}, "needs 16 elements"),
        (op_tensor("0", 12, 5, (3, 4), (4, 1)), {"0": W.tobytes()}, "needs 17 elements"),
        (op_tensor("0", 12, 0, (3, 4), (-4, 1)), {"0": W.tobytes()}, "negative"),
        (op_tensor("0", 12, -1, (3, 4), (4, 1)), {"0": W.tobytes()}, "offset"),
        (op_tensor("0", 12, 0, (3, -4), (4, 1)), {"0": W.tobytes()}, "negative"),
        (op_tensor("0", 12, 0, (3, 4), (4,)), {"0": W.tobytes()}, "stride"),
        (op_tensor("0", 12, 0, (2**40,), (1,)), {"0": W.tobytes()}, "needs 1099511627776"),
        (op_tensor("0", 12, 0, (2**40, 2**40), (0, 0)), {"0": W.tobytes()}, "over the limit"),
        (op_tensor("0", 2**40, 0, (2**40,), (1,)), {"0": W.tobytes()}, "exceeds the record limit"),
        (op_tensor("0", 3, 0, (3,), (1,), storage="ComplexFloatStorage"), {"0": W.tobytes()},
         "torch.ComplexFloatStorage"),
    ],
)
def test_bad_tensor_records(
    tmp_path: Path, tensor: bytes, records: dict[str, bytes], match: str
) -> None:
    path = _zip_with(tmp_path, tensor, records)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak  # refused before allocating anything large


def test_huge_pickle_lengths_refused_without_allocating(tmp_path: Path) -> None:
    bombs = [
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",  # BINBYTES8
        b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"abc.",  # BYTEARRAY8
        b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"abc.",  # LONG4
        b"\x80\x02K\x01r\xff\xff\xff\x7f.",  # LONG_BINPUT to a huge memo index
        b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"K\x01.",  # FRAME past the end
    ]
    tracemalloc.start()
    try:
        for raw in bombs:
            path = write_zip(tmp_path / "pbomb.pt", raw, {})
            with pytest.raises(CheckpointError):
                read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak


def test_truncated_archives(tmp_path: Path) -> None:
    for make in (valid_zip, valid_legacy):
        data = make(tmp_path / "full.pt").read_bytes()
        for cut in (len(data) // 2, len(data) - 1, 10, 1):
            path = tmp_path / "cut.pt"
            path.write_bytes(data[:cut])
            with pytest.raises(CheckpointError) as info:
                read_checkpoint(path)
            assert str(path) in str(info.value)


def test_zip_bomb_refused(tmp_path: Path) -> None:
    numel = 16 * 2**20  # 64 MiB of float32 zeros deflate to ~64 KiB
    pkl = state_pickle({"w": op_tensor("0", numel, 0, (numel,), (1,))})
    path = write_zip(tmp_path / "bomb.pt", pkl, {"0": bytes(4 * numel)},
                     compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    with pytest.raises(CheckpointError, match="zip bomb"):
        read_checkpoint(path)


def test_declared_member_size_over_limit(tmp_path: Path) -> None:
    # A real 1 MiB storage is refused under a 512 KiB limit ...
    numel = 2**18
    pkl = state_pickle({"w": op_tensor("0", numel, 0, (numel,), (1,))})
    path = write_zip(tmp_path / "big.pt", pkl, {"0": bytes(4 * numel)})
    with pytest.raises(CheckpointError, match="over the limit|exceeds the record limit"):
        read_checkpoint(path, max_record_bytes=2**19)
    assert read_checkpoint(path)[0]["w"].shape == (numel,)
    # ... and a forged central-directory size of ~4 GiB is refused before reading.
    data = bytearray(valid_zip(tmp_path / "forged.pt").read_bytes())
    name = b"archive/data/0"
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0
        if data[pos + 46: pos + 46 + len(name)] == name:
            break
        pos += 4
    data[pos + 24: pos + 28] = struct.pack("<I", 0xFFFFFFF0)
    forged = tmp_path / "forged.pt"
    forged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="over the limit"):
        read_checkpoint(forged)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00",
        np.random.default_rng(0).bytes(4096),
        b"PK\x03\x04" + np.random.default_rng(1).bytes(4096),
        b"PK\x05\x06" + bytes(18),
        b"\x80\x02" + np.random.default_rng(2).bytes(256),
        pickle.dumps({"w": [1.0, 2.0]}, protocol=2),  # plain pickle, not torch
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}" + b" " * 8,  # broken safetensors
        bytes(512),
    ],
)
def test_garbage_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)


def test_zip_without_data_pkl_and_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_checkpoint(path)
    ts = state_pickle({"m": op_global("__torch__.MyNet", "MyNet") + b")R"})
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_checkpoint(write_zip(tmp_path / "ts.pt", ts, {}))


def test_recursive_and_deep_structures(tmp_path: Path) -> None:
    # d["a"] = d  (cycle), alongside a valid tensor
    cyc = (b"\x80\x02}q\x00(" + op_str("w") + op_tensor("0", 12, 0, (3, 4), (4, 1))
           + op_str("a") + b"h\x00u.")
    state, notes = read_checkpoint(write_zip(tmp_path / "cyc.pt", cyc, {"0": W.tobytes()}))
    assert list(state) == ["w"]
    # 10_000 nested lists under one key
    deep = b"\x80\x02}(" + op_str("deep") + b"]" * 10_000 + b"a" * 9_999 + b"u."
    with pytest.raises(CheckpointError, match="nest deeper"):
        read_checkpoint(write_zip(tmp_path / "deep.pt", deep, {}))
    # exponential sharing: each level holds the previous level twice
    exp = b"\x80\x02" + op_tensor("0", 12, 0, (3, 4), (4, 1))
    for _ in range(30):  # 2**30 paths if shared containers were re-walked
        exp += b"q\x000h\x00h\x00\x86"  # BINPUT 0; POP; BINGET 0; BINGET 0; TUPLE2
    exp = b"\x80\x02}(" + op_str("x") + exp[2:] + b"u."
    state, _ = read_checkpoint(write_zip(tmp_path / "exp.pt", exp, {"0": W.tobytes()}))
    assert len(state) <= 200


def test_total_output_budget(tmp_path: Path) -> None:
    """Many views of one 1 MiB storage: reading it once is fine, copying it 20x is not."""
    numel = 2**18
    pkl = state_pickle({f"v{i}": op_tensor("0", numel, 0, (numel,), (1,)) for i in range(20)})
    path = write_zip(tmp_path / "views.pt", pkl, {"0": bytes(4 * numel)})
    with pytest.raises(CheckpointError, match="total limit"):
        read_checkpoint(path, max_total_bytes=8 * 2**20)
    assert len(read_checkpoint(path, max_total_bytes=32 * 2**20)[0]) == 20


def _safetensors_file(path: Path, header: object, data: bytes, raw: bytes | None = None) -> Path:
    import json

    hb = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlaps"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "accounts"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(8), "outside"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
        ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8),
         "exactly"),
        ({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, bytes(8),
         "outside"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a PyTorch"),  # not even sniffed as safetensors
    ],
)
def test_safetensors_strict(tmp_path: Path, header: object, data: bytes, match: str) -> None:
    path = _safetensors_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_safetensors_header_tricks(tmp_path: Path) -> None:
    dup = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}'
    with pytest.raises(CheckpointError, match="duplicate"):
        read_checkpoint(_safetensors_file(tmp_path / "d.st", None, bytes(4), raw=dup))
    nan = b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    with pytest.raises(CheckpointError):
        read_checkpoint(_safetensors_file(tmp_path / "n.st", None, bytes(4), raw=nan))
    deep = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CheckpointError):
        read_checkpoint(_safetensors_file(tmp_path / "deep.st", None, b"", raw=deep))
    # declared header length over the limit: refused before reading it
    path = tmp_path / "huge.st"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{" + bytes(64))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Fuzzing: any mutation either reads cleanly or raises CheckpointError
# ---------------------------------------------------------------------------------------------

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos:pos + arg]
        else:
            del buf[pos:]
    return bytes(buf)


def _check_outcome(path: Path) -> None:
    try:
        state, notes = read_checkpoint(path)
    except CheckpointError:
        return
    assert isinstance(state, dict) and isinstance(notes, list)
    for name, arr in state.items():
        assert isinstance(name, str)
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.flags.c_contiguous


_FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _safetensors_bytes() -> bytes:
    import json

    header = {"w": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "h": {"dtype": "F16", "shape": [2], "data_offsets": [48, 52]},
              "__metadata__": {"format": "pt"}}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + W.tobytes() + np.ones(2, np.float16).tobytes()


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "zip-pickle"])
def test_fuzz_mutations(tmp_path: Path, kind: str) -> None:
    if kind == "zip":
        base = valid_zip(tmp_path / "base.pt").read_bytes()
    elif kind == "legacy":
        base = valid_legacy(tmp_path / "base.pt").read_bytes()
    elif kind == "safetensors":
        base = _safetensors_bytes()
    else:  # mutate data.pkl itself and repack it in a well-formed zip (CRCs stay valid)
        with zipfile.ZipFile(valid_zip(tmp_path / "base.pt")) as zf:
            base = zf.read("archive/data.pkl")
    path = tmp_path / "fuzz.pt"
    if kind != "zip-pickle":
        path.write_bytes(base)
        _, _ = read_checkpoint(path)  # the unmutated base is valid

    @_FUZZ
    @given(st.lists(_mutation, min_size=1, max_size=4))
    def run(mutations: list[tuple]) -> None:
        data = _mutate(base, mutations)
        if kind == "zip-pickle":
            write_zip(path, data, {"0": W.tobytes(), "1": np.ones(3, np.float32).tobytes()})
        else:
            path.write_bytes(data)
        _check_outcome(path)

    run()


_EXTRA_OPS = [b"0", b"1", b"2", b"t", b"R", b"(", b")", b"N", b"\x88", b"\x89", b"K\x00", b"K\x05",
              b"J\xff\xff\xff\xff", b"h\x00", b"q\x00", b"}", b"]", b"a", b"e", b"u", b"s", b"b",
              b"Q", b"\x81", b"\x85", b"\x86", b"\x87", op_str("0"), op_str("1"), op_str("storage"),
              op_global("torch", "HalfStorage"), op_global("collections", "OrderedDict"),
              op_global("torch._utils", "_rebuild_tensor_v2"),
              op_global("torch._utils", "_rebuild_parameter")]


def _opcode_tokens(pkl: bytes) -> list[bytes]:
    import pickletools

    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    return [pkl[pos:end] for (_, _, pos), end in zip(ops, ends)]


def test_fuzz_opcode_level(tmp_path: Path) -> None:
    """Well-formed opcode streams with tokens deleted/duplicated/replaced reach the unpickler
    and the rebuild functions (byte-level mutations mostly stop at the pre-scan)."""
    with zipfile.ZipFile(valid_zip(tmp_path / "base.pt")) as zf:
        tokens = _opcode_tokens(zf.read("archive/data.pkl"))
    head, body = tokens[0], tokens[1:-1]
    path = tmp_path / "fuzz.pt"
    edit = st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 10**6))

    @_FUZZ
    @given(st.lists(edit, min_size=1, max_size=5))
    def run(edits: list[tuple[int, int, int]]) -> None:
        toks = list(body)
        for kind, i, j in edits:
            i %= len(toks)
            if kind == 0 and len(toks) > 1:
                del toks[i]
            elif kind == 1:
                toks.insert(i, toks[j % len(toks)])
            elif kind == 2:
                toks.insert(i, _EXTRA_OPS[j % len(_EXTRA_OPS)])
            else:
                toks[i] = _EXTRA_OPS[j % len(_EXTRA_OPS)]
        pkl = head + b"".join(toks) + b"."
        write_zip(path, pkl, {"0": W.tobytes(), "1": np.ones(3, np.float32).tobytes()})
        _check_outcome(path)

    run()


_dim = st.integers(-1, 6)
_stride = st.one_of(st.integers(-1, 8), st.sampled_from([2**31, 2**62, 2**64]))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    numel=st.integers(0, 30),
    offset=st.one_of(st.integers(-2, 35), st.just(2**63)),
    geometry=st.integers(0, 3).flatmap(
        lambda nd: st.tuples(st.lists(_dim, min_size=nd, max_size=nd),
                             st.lists(_stride, min_size=nd, max_size=nd))),
)
def test_tensor_geometry_property(tmp_path: Path, numel: int, offset: int, geometry: tuple) -> None:
    """Any (storage size, offset, size, stride): exact as_strided result or CheckpointError."""
    size, stride = (tuple(g) for g in geometry)
    data = np.arange(numel, dtype=np.float32) + 0.5
    pkl = state_pickle({"x": op_tensor("0", numel, offset, size, stride),
                        "ok": op_tensor("1", 1, 0, (), ())})
    path = write_zip(tmp_path / "geo.pt", pkl, {"0": data.tobytes(), "1": b"\0\0\x80?"})
    valid = offset >= 0 and all(d >= 0 for d in size) and all(s >= 0 for s in stride)
    n = int(np.prod(size)) if valid else 0
    if valid and n > 0:
        valid = offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1 <= numel
    elif valid:
        valid = offset <= numel
    if not valid:
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
        return
    state, _ = read_checkpoint(path)
    if n:
        idx = offset + sum(i * s for i, s in zip(np.indices(size), stride))
        expected = data[idx] if size else data[offset]
    else:
        expected = np.zeros(size, np.float32)
    assert state["x"].shape == size
    np.testing.assert_array_equal(state["x"], expected)
    assert state["ok"].shape == () and state["ok"] == 1.0


def test_legacy_storage_views_and_cuda_storage(tmp_path: Path) -> None:
    """Pre-0.4 storage views (view_metadata) and torch.cuda.*Storage markers."""
    view_pid = op_tuple([op_str("storage"), op_global("torch.cuda", "FloatStorage"), op_str("0"),
                         op_str("cuda:0"), op_int(12),
                         op_tuple([op_str("v1"), op_int(2), op_int(6)])])
    tensor = (op_global("torch._utils", "_rebuild_tensor_v2") + b"(" + view_pid + b"Q"
              + op_int(1) + op_tuple([op_int(2), op_int(2)]) + op_tuple([op_int(2), op_int(1)])
              + b"\x89" + op_ordered_dict() + b"tR")
    path = write_legacy(tmp_path / "views.pt", state_pickle({"v": tensor}),
                        {"0": (12, W.tobytes())})
    state, _ = read_checkpoint(path)
    view = W.ravel()[2:8]  # the storage view; the tensor starts 1 element into it
    np.testing.assert_array_equal(state["v"], view[np.array([[1, 2], [3, 4]])])
    # a view running past its root storage is refused
    bad = view_pid.replace(op_int(6), op_int(11))
    path = write_legacy(tmp_path / "bad.pt", state_pickle({"v": tensor.replace(view_pid, bad)}),
                        {"0": (12, W.tobytes())})
    with pytest.raises(CheckpointError, match="view"):
        read_checkpoint(path)


def test_legacy_storage_count_mismatch(tmp_path: Path) -> None:
    main = state_pickle({"w": op_tensor("0", 12, 0, (3, 4), (4, 1), legacy=True)})
    for storages, match in (
        ({"0": (11, W.tobytes()[:44])}, "11 elements on disk"),
        ({"0": (12, W.tobytes()[:44])}, "past the end"),
        ({"0": (12, W.tobytes()), "9": (1, b"abcd")}, "never used"),
        ({}, "no data"),
    ):
        path = write_legacy(tmp_path / "l.pt", main, storages)
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)


def test_rebuild_parameter_with_state(tmp_path: Path) -> None:
    param = (op_global("torch._utils", "_rebuild_parameter_with_state")
             + op_tuple([op_tensor("0", 12, 0, (12,), (1,)), b"\x88", op_ordered_dict(),
                         b"}" + op_str("tag") + op_str("x") + b"s"])
             + b"R")
    state, _ = read_checkpoint(write_zip(tmp_path / "p.pt", state_pickle({"p": param}),
                                         {"0": W.tobytes()}))
    np.testing.assert_array_equal(state["p"], W.ravel())


def test_build_on_tensor_refused(tmp_path: Path) -> None:
    body = op_tensor("0", 12, 0, (12,), (1,)) + b"}" + b"b"  # BUILD with a dict state
    path = write_zip(tmp_path / "b.pt", state_pickle({"w": body}), {"0": W.tobytes()})
    with pytest.raises(CheckpointError, match="BUILD"):
        read_checkpoint(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
