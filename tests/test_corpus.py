"""Many files: the work list, the journal, the in-process loop and a Dask cluster (npdgru.corpus).

The cluster tests run a LocalCluster of 2 single-threaded worker processes. The killed-worker
test is deterministic: a hook in the worker kills its own process (SIGKILL) right after the
first output of one chosen file is on disk and before the task can report; the task is then
retried on a replacement worker. Every run is compared byte for byte with the serial loop.
"""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from npdgru import corpus as dist
from npdgru.cli import main
from npdgru.errors import ParameterError
from cli_run import run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "nsnet2.safetensors"
SR = 16000

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/nsnet2.safetensors missing")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, sr = sf.read(str(REPO / "examples" / "noisy_dishes_5db.flac"), dtype="float32")
    assert sr == SR
    return np.ascontiguousarray(x[: SR // 2])


def make_corpus(root: Path, speech, n=6) -> list[Path]:
    """n short files (different lengths and contents) in a small tree."""
    files = []
    for k in range(n):
        p = root / ("a" if k % 2 else "b") / f"f{k}.wav"
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, np.roll(speech, 997 * k)[: 2000 + 500 * k], SR, subtype="PCM_16")
        files.append(p)
    return files


def tree(root: Path) -> dict:
    """{relative path: bytes} of every file under root (the journal and the lock apart)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (dist.JOURNAL_NAME, dist.LOCK_NAME)}


def journal(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / dist.JOURNAL_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def serial_out(tmp_path_factory, speech):
    """The serial loop's outputs of the corpus: the bytes every other run must reproduce."""
    root = tmp_path_factory.mktemp("serial")
    make_corpus(root / "in", speech)
    assert main(["enhance", str(root / "in"), "-o", str(root / "out"), "--weights", str(SHIPPED), "-q"]) == 0
    return root / "in", tree(root / "out")


def config():
    return dist.Config(weights=str(SHIPPED), update_percent=100.0, model=dist.model_id(SHIPPED))


# ------------------------------------------------------------------------------- work list


def test_manifests_csv_and_jsonl(tmp_path, speech):
    files = make_corpus(tmp_path / "in", speech, n=3)
    (tmp_path / "m.csv").write_text("audio_filepath,duration\n" + "".join(f"in/{f.parent.name}/{f.name},1\n" for f in files))
    lines = [json.dumps({"input": str(files[0])}), json.dumps({"audio_filepath": f"in/a/{files[1].name}", "output": "x/one.wav"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    pairs, single = dist.collect_inputs([tmp_path / "m.csv"], tmp_path / "out")
    assert not single
    assert pairs == [(tmp_path / "in" / f.parent.name / f.name, tmp_path / "out" / "in" / f.parent.name / f.name) for f in files]
    pairs, _ = dist.collect_inputs([tmp_path / "m.jsonl"], tmp_path / "out")
    assert pairs[0][1] == tmp_path / "out" / "in" / "b" / "f0.wav"  # mirrors the tree under the manifest's folder
    assert pairs[1] == (tmp_path / "in" / "a" / files[1].name, tmp_path / "out" / "x" / "one.wav")


@pytest.mark.parametrize("text, needle", [("name\nx.wav\n", "no input path"), ('{"input": "a.wav"}\nnot json\n', "line 2: not JSON"), ("", "lists no files")])
def test_bad_manifest_is_named(tmp_path, text, needle):
    m = tmp_path / ("m.csv" if text.startswith("name") or not text else "m.jsonl")
    m.write_text(text)
    with pytest.raises(ParameterError, match=needle) as e:
        dist.collect_inputs([m], tmp_path / "out")
    assert str(m) in str(e.value)


def test_collision_names_both_inputs(capsys, tmp_path, speech):
    files = make_corpus(tmp_path / "in", speech, n=2)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"input": str(f), "output": "same.wav"}) + "\n" for f in files))
    status, _, err = run(capsys, "enhance", tmp_path / "m.jsonl", "-o", tmp_path / "out", "--weights", SHIPPED)
    assert status == 2 and "Traceback" not in err
    assert "two inputs would write the same output" in err and str(files[0]) in err and str(files[1]) in err
    assert not (tmp_path / "out").exists()  # refused up front: nothing written, no journal


def test_tasks_group_a_few_seconds_of_audio():
    items = [dist.Item(f"{k}.wav", f"o{k}.wav", 4.0) for k in range(10)]
    tasks = dist.make_tasks(items, task_seconds=10.0)
    assert [len(t) for t in tasks] == [3, 3, 3, 1]
    assert [it for t in tasks for it in t] == items
    assert [len(t) for t in dist.make_tasks(items, task_seconds=1e9, max_files=4)] == [4, 4, 2]


# --------------------------------------------------------------------- the in-process loop


def test_rows_3_and_8_bad_files_among_good_ones(capsys, tmp_path, speech, monkeypatch):
    """7 files, 3 bad (corrupt, samples that overflow float32, a disk full on writing): every
    error line names its file, no RuntimeWarning, the run goes on, a final count, exit 2."""
    src = tmp_path / "in"
    good = make_corpus(src, speech, n=4)
    (src / "corrupt.wav").write_bytes(b"RIFF garbage")
    sf.write(src / "huge.wav", np.full(4000, 3e38, np.float32), SR, subtype="FLOAT")
    sf.write(src / "full.wav", speech[:3333], SR)
    real_write = sf.write

    def write(file, data, *a, **k):  # the disk fills up while full.wav's output is written
        real_write(file, data, *a, **k)
        if len(data) == 3333:
            raise sf.LibsndfileError(0, prefix="Error writing file: No space left on device ")

    monkeypatch.setattr(sf, "write", write)
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 2
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert "Traceback" not in err and "RuntimeWarning" not in err
    errors = [line for line in err.splitlines() if line.startswith("npdgru: error:")]
    assert len(errors) == 3, err
    for name in ("corrupt.wav", "huge.wav", "full.wav"):
        assert sum(str(src / name) in line or str(out / name) in line for line in errors) == 1, (name, errors)
    assert any("No space left on device" in line for line in errors)
    assert "7 files: 4 done, 0 skipped (done before), 3 failed" in stdout
    assert sorted(p.name for p in out.rglob("*.wav")) == sorted(f.name for f in good)
    assert not list(out.rglob(".npdgru-*.part"))  # the temporary file of full.wav is gone
    status_by_file = {Path(r["output"]).name: r["status"] for r in journal(out) if r["status"] != "planned"}
    assert status_by_file == {**{f.name: "done" for f in good}, "corrupt.wav": "failed", "huge.wav": "failed", "full.wav": "failed"}


def test_row_7_temporary_files_are_never_inputs(capsys, tmp_path, speech, serial_out):
    """A temporary output left by a killed run (old or new naming) is not taken as an input."""
    src = tmp_path / "in"
    make_corpus(src, speech)
    (src / "a" / ".npdgru-k3j2x.wav").write_bytes(b"RIFF half-written")
    (src / "a" / ".npdgru-k3j2y.wav.part").write_bytes(b"RIFF half-written")
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "out", "--weights", SHIPPED, "-q")
    assert status == 0, err
    assert tree(tmp_path / "out") == serial_out[1]


def test_row_7_sigterm_while_writing_then_resume(capsys, tmp_path, speech, serial_out, monkeypatch):
    """SIGTERM while the third output is written: its temporary file is removed, the run stops
    with one line; the run started again does only what is missing, and the outputs are the
    serial run's, byte for byte."""
    src = tmp_path / "in"
    make_corpus(src, speech)
    out = tmp_path / "out"
    real_write = sf.write
    calls = []

    def write(path, *a, **k):
        real_write(path, *a, **k)  # the temporary file is on disk, not yet renamed
        calls.append(path)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sf, "write", write)
    status, _, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")
    assert status == 2 and "interrupted" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
    assert not Path(calls[2]).exists() and not list(out.rglob(".npdgru-*.part"))
    assert len(list(out.rglob("*.wav"))) == 2
    first = {p: p.stat().st_ino for p in out.rglob("*.wav")}
    monkeypatch.setattr(sf, "write", real_write)

    status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)  # no --overwrite needed
    assert status == 0, err
    assert "6 files: 4 done, 2 skipped (done before), 0 failed" in stdout
    assert {p: p.stat().st_ino for p in first} == first  # the two done before were not rewritten
    assert tree(out) == serial_out[1]


def test_resume_redoes_changed_inputs_and_refuses_foreign_outputs(capsys, tmp_path, speech):
    src = tmp_path / "in"
    files = make_corpus(src, speech, n=3)
    out = tmp_path / "out"
    assert run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")[0] == 0
    sf.write(files[1], speech[:1234], SR, subtype="PCM_16")  # a changed input is redone
    status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 0, err
    assert "3 files: 1 done, 2 skipped" in stdout and sf.info(out / files[1].relative_to(src)).frames == 1234
    status, stdout, _ = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-P", "50")  # another P: all redone
    assert status == 0 and "3 files: 3 done, 0 skipped" in stdout
    (out / dist.JOURNAL_NAME).unlink()  # outputs not known to be npdgru's are not replaced silently
    status, _, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 2 and "output exists; pass --overwrite" in err


def test_batched_tasks_equal_file_by_file(tmp_path, serial_out):
    """The cuda path of a task (its files as one ``enhance_batch``), run here on the cpu backend:
    the same bytes as file by file; a bad file in the batch is that file's error only.

    With ``--exact`` on both sides: the cuda kernels sum in a fixed order whatever the batch, as
    the cpu's column-order products do; the cpu's default BLAS products may round a batch of
    files differently from one file (their bits depend on the number of rows)."""
    src, _ = serial_out
    serial = tmp_path / "serial"
    assert main(["enhance", str(src), "-o", str(serial), "--weights", str(SHIPPED), "--exact", "-q"]) == 0
    expected = tree(serial)
    (tmp_path / "bad.wav").write_bytes(b"RIFF garbage")
    out = tmp_path / "out"
    exact = dist.Config(weights=str(SHIPPED), update_percent=100.0, model=dist.model_id(SHIPPED), exact=True)
    items, _, _ = dist.plan_work([src], out, config=exact)
    bad = dist.Item(str(tmp_path / "bad.wav"), str(out / "bad.wav"), 0.0)
    results = dist._process_batch(dist._enhancer(exact), items[:3] + [bad] + items[3:])
    assert [r.status for r in results] == ["done"] * 3 + ["failed"] + ["done"] * 3
    assert str(tmp_path / "bad.wav") in results[3].error
    assert tree(out) == expected


# ------------------------------------------------------------------------------ on a cluster


@pytest.fixture(scope="module")
def local_cluster():
    """2 single-threaded worker processes under nannies; tasks retried after a worker dies."""
    pytest.importorskip("distributed")
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": dist.ALLOWED_FAILURES}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL) as lc:
            yield lc


def test_scheduler_folder_equals_serial(capsys, tmp_path, local_cluster, serial_out):
    src, expected = serial_out
    status, stdout, err = run(capsys, "enhance", src, "-o", tmp_path / "out", "--weights", SHIPPED, "--scheduler", local_cluster.scheduler_address)
    assert status == 0, err
    assert tree(tmp_path / "out") == expected
    assert "6 files: 6 done, 0 skipped (done before), 0 failed" in stdout


def test_jobs_2_manifest_with_bad_files(capsys, tmp_path, speech, serial_out):
    """--jobs 2 starts its own LocalCluster: a manifest of the corpus plus two bad files."""
    pytest.importorskip("distributed")
    src, expected = serial_out
    (tmp_path / "bad.wav").write_bytes(b"RIFF garbage")
    rows = [{"input": str(p)} for p in sorted(src.rglob("*.wav"))] + [{"input": str(tmp_path / "bad.wav")}, {"input": str(tmp_path / "missing.wav")}]
    manifest = src / "all.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        status, stdout, err = run(capsys, "enhance", manifest, "-o", tmp_path / "out", "--weights", SHIPPED, "--jobs", "2")
    finally:
        manifest.unlink()
    assert status == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("npdgru: error:")]
    assert len(errors) == 2 and str(tmp_path / "bad.wav") in err and str(tmp_path / "missing.wav") in err, err
    assert "8 files: 6 done, 0 skipped (done before), 2 failed" in stdout
    got = tree(tmp_path / "out")
    bad_dst = [k for k in got if k.endswith("bad.wav") or k.endswith("missing.wav")]
    assert not bad_dst
    assert got == expected


def test_killed_worker_loses_nothing_and_writes_nothing_twice(tmp_path, local_cluster, serial_out):
    src, expected = serial_out
    marker = tmp_path / "killed.json"

    def after_write(item, marker=str(marker)):
        """In the worker: die (SIGKILL) right after f3's output is on disk, once."""
        import json as _json
        import os as _os
        import signal as _signal

        if item.src.endswith("f3.wav") and not _os.path.exists(marker):
            st = _os.stat(item.dst)
            with open(marker, "w") as f:
                _json.dump({"ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "pid": _os.getpid()}, f)
            _os.kill(_os.getpid(), _signal.SIGKILL)

    out = tmp_path / "out"
    items, skipped, jr = dist.plan_work([src], out, config=config())
    assert not skipped and len(items) == 6
    results = dist.run_items(items, config(), journal=jr, scheduler=local_cluster.scheduler_address, task_seconds=0.3, after_write=after_write)
    killed = json.loads(marker.read_text())  # the worker did die after writing f3's output
    assert [r.status for r in results] == ["done"] * 6, [r.error for r in results]
    assert tree(out) == expected  # none missing, none corrupt: the serial run's bytes
    f3 = next(out.rglob("f3.wav")).stat()
    assert (f3.st_ino, f3.st_mtime_ns) == (killed["ino"], killed["mtime_ns"])  # not written a second time
    assert [r.rewritten for r in results if r.src.endswith("f3.wav")] == [False]
    done = [r["output"] for r in journal(out) if r["status"] == "done"]
    assert sorted(done) == sorted(os.path.abspath(it.dst) for it in items)  # each once
    assert not list(out.rglob(".npdgru-*.part"))


def test_worker_that_keeps_dying_is_recorded_as_failed(tmp_path, local_cluster, speech):
    files = make_corpus(tmp_path / "in", speech, n=2)

    def after_write(item):
        import os as _os
        import signal as _signal

        if item.src.endswith("f1.wav"):
            _os.unlink(item.dst)  # so that every attempt writes again, and dies again
            _os.kill(_os.getpid(), _signal.SIGKILL)

    out = tmp_path / "out"
    items, _, jr = dist.plan_work([tmp_path / "in"], out, config=config())
    results = dist.run_items(items, config(), journal=jr, scheduler=local_cluster.scheduler_address, task_seconds=0.01, after_write=after_write)
    by = {Path(r.src).name: r for r in results}
    assert by["f0.wav"].status == "done"
    assert by["f1.wav"].status == "failed" and "worker died" in by["f1.wav"].error and str(files[1]) in by["f1.wav"].error


def test_eval_on_the_cluster_gives_the_same_rows(tmp_path, local_cluster, monkeypatch):
    """The per-pair rows of ``npdgru eval`` on the cluster (what ``--jobs``/``--scheduler`` run)
    are the in-process rows, in the order of the pairs (generated pairs; the CLI end to end on
    the test set: tests/test_eval.py::test_jobs_and_missing_onnx)."""
    from functools import partial

    from npdgru.evaluate import missing_dependencies

    if missing_dependencies():
        pytest.skip(f"eval extra missing: {missing_dependencies()}")
    from npdgru.evaluate import runner

    clean, _ = sf.read(str(REPO / "examples" / "clean_dishes_5db.flac"), dtype="float32")
    noisy, _ = sf.read(str(REPO / "examples" / "noisy_dishes_5db.flac"), dtype="float32")
    data = tmp_path / "data"
    for sub, x in (("clean", clean), ("noisy", noisy)):
        (data / sub).mkdir(parents=True)
        for k in range(2):
            sf.write(data / sub / f"p{k}.wav", np.roll(x, 3001 * k)[: 2 * SR], SR, subtype="FLOAT")
    pairs = runner.find_pairs(data)
    systems = runner._build_systems([SHIPPED], [50.0], None)
    here = [runner._evaluate_pair_on_worker(systems, p) for p in pairs]
    runner._WORKER.clear()
    there = dist.map_ordered(partial(runner._evaluate_pair_on_worker, systems), pairs, scheduler=local_cluster.scheduler_address)
    assert [r["file"] for rows in there for r in rows] == ["p0.wav"] * 3 + ["p1.wav"] * 3
    from npdgru.evaluate.report import write_csv

    write_csv(tmp_path / "here.csv", [r for rows in here for r in rows])
    write_csv(tmp_path / "there.csv", [r for rows in there for r in rows])
    assert (tmp_path / "there.csv").read_bytes() == (tmp_path / "here.csv").read_bytes()  # per_file.csv: the same bytes
    # The float64 values themselves: pystoi's ESTOI varies in its last bits with the memory
    # alignment of its numpy temporaries (even within one process), so 1e-13, not bit for bit.
    for a, b in zip((r for rows in here for r in rows), (r for rows in there for r in rows)):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float) and a[k] != b[k]:
                assert k == "estoi" and abs(a[k] - b[k]) <= 1e-13 * abs(a[k]), (a["file"], a["row"], k, a[k], b[k])
            else:
                assert a[k] == b[k], (a["file"], a["row"], k, a[k], b[k])


def test_jobs_and_scheduler_exclude_each_other(capsys, tmp_path, speech):
    make_corpus(tmp_path / "in", speech, n=1)
    status, _, err = run(capsys, "enhance", tmp_path / "in", "-o", tmp_path / "out", "--jobs", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert status == 2 and "exclude each other" in err


# ----------------------------------------------------- a run stays in its folder, alone


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "no_suffix", "symlink"])
def test_manifest_output_outside_the_folder_is_refused(capsys, tmp_path, speech, kind):
    """A manifest's output that is absolute, climbs out with '..', has no audio suffix, or
    goes through a symlink out of -o is refused before any work, naming the row and the value:
    even with --overwrite, the file there is untouched."""
    files = make_corpus(tmp_path / "in", speech, n=2)
    victim = tmp_path / "outside" / "important"
    victim.parent.mkdir()
    victim.write_text("precious")
    out = tmp_path / "out"
    value = {"absolute": str(victim), "dotdot": "../outside/x.wav", "no_suffix": "sub/important", "symlink": "link/x.wav"}[kind]
    if kind == "symlink":
        out.mkdir()
        (out / "link").symlink_to(victim.parent)
    if kind == "dotdot":
        (tmp_path / "m.csv").write_text(f"input,output\n{files[0]},a.wav\n{files[1]},{value}\n")
        manifest, row = tmp_path / "m.csv", "line 3"
    else:
        (tmp_path / "m.jsonl").write_text(json.dumps({"input": str(files[0])}) + "\n" + json.dumps({"input": str(files[1]), "output": value}) + "\n")
        manifest, row = tmp_path / "m.jsonl", "line 2"
    status, _, err = run(capsys, "enhance", manifest, "-o", out, "--weights", SHIPPED, "--overwrite")
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{manifest}, {row}: output {value!r}" in err, err
    assert victim.read_text() == "precious" and sorted(p.name for p in victim.parent.iterdir()) == ["important"]
    assert not out.exists() or [p.name for p in out.iterdir()] == ["link"]  # nothing done, no journal


def test_a_journal_line_from_elsewhere_does_not_stand_for_overwrite(capsys, tmp_path, speech):
    """A journal line not written by this folder's runs (here: planted, with no folder id) does
    not make an existing file npdgru's: without --overwrite it is refused, untouched."""
    files = make_corpus(tmp_path / "in", speech, n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.wav").write_text("not npdgru's")
    (out / dist.JOURNAL_NAME).write_text(json.dumps({"output": str(out / "x.wav"), "input": str(files[0]), "status": "planned"}) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"input": str(files[0]), "output": "x.wav"}) + "\n")
    status, _, err = run(capsys, "enhance", tmp_path / "m.jsonl", "-o", out, "--weights", SHIPPED)
    assert status == 2 and "output exists; pass --overwrite" in err, err
    assert (out / "x.wav").read_text() == "not npdgru's"


def test_one_run_per_output_folder(capsys, tmp_path, speech):
    """While a process holds the folder (a run in progress), a second run into it fails at once
    with one line naming that process; when the holder dies, the kernel releases the lock."""
    import subprocess
    import sys

    make_corpus(tmp_path / "in", speech, n=2)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"from npdgru.corpus import Journal; j = Journal({str(out)!r}); print('held', flush=True); import time; time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        status, _, err = run(capsys, "enhance", tmp_path / "in", "-o", out, "--weights", SHIPPED, "-q")
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert f"another npdgru run (pid {holder.pid})" in err and str(out) in err
        assert not list(out.rglob("*.wav"))
    finally:
        holder.kill()
        holder.wait()
    status, _, err = run(capsys, "enhance", tmp_path / "in", "-o", out, "--weights", SHIPPED, "-q")
    assert status == 0, err


def test_input_replaced_during_its_task_is_redone(capsys, tmp_path, speech):
    """The journal's identity of an input is the one of the bytes that were enhanced: an input
    replaced after it was read (here right after its output is written, before the task
    returns) is redone by the next run, not skipped with a stale output."""
    files = make_corpus(tmp_path / "in", speech, n=2)
    replacement = tmp_path / "new.wav"
    sf.write(replacement, speech[:1111], SR, subtype="PCM_16")

    def after_write(item):
        if item.src.endswith("f1.wav") and replacement.exists():
            os.replace(replacement, item.src)

    out = tmp_path / "out"
    items, _, jr = dist.plan_work([tmp_path / "in"], out, config=config())
    assert [r.status for r in dist.run_items(items, config(), journal=jr, after_write=after_write)] == ["done", "done"]
    assert not replacement.exists() and sf.info(files[1]).frames == 1111
    todo, skipped, jr = dist.plan_work([tmp_path / "in"], out, config=config())
    jr.close()
    assert [Path(it.src).name for it in todo] == ["f1.wav"] and [Path(r.src).name for r in skipped] == ["f0.wav"]


def test_journal_lines_of_wrong_types_are_ignored_with_a_warning(capsys, tmp_path, speech):
    """Journal lines with a non-string output or a non-numeric seconds (and not JSON at all) are
    ignored with one warning line; the run goes on from the valid lines."""
    src = tmp_path / "in"
    make_corpus(src, speech, n=2)
    out = tmp_path / "out"
    assert run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")[0] == 0
    done = [r for r in journal(out) if r["status"] == "done"][0]
    bad = [{"output": ["x"], "input": "y", "status": "done"}, dict(done, seconds="abc"), dict(done, output_size=True)]
    with open(out / dist.JOURNAL_NAME, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad) + "{not json\n")
    status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 0 and "Traceback" not in err, err
    warnings_ = [line for line in err.splitlines() if line.startswith("npdgru: warning:")]
    assert len(warnings_) == 1 and "4 line(s) ignored" in warnings_[0] and "'seconds' is str" in warnings_[0], err
    assert "2 files: 0 done, 2 skipped" in stdout


def test_torn_last_journal_line_does_not_swallow_the_next_record(capsys, tmp_path, speech):
    """A run killed while writing a journal line leaves it without its newline: the next run
    starts its records on a line of their own, so none is lost."""
    src = tmp_path / "in"
    files = make_corpus(src, speech, n=2)
    out = tmp_path / "out"
    assert run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")[0] == 0
    with open(out / dist.JOURNAL_NAME, "a") as f:
        f.write('{"output": "/torn", "sta')
    sf.write(files[1], speech[:1234], SR, subtype="PCM_16")
    assert run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")[0] == 0
    lines = (out / dist.JOURNAL_NAME).read_text().splitlines()
    assert lines.count('{"output": "/torn", "sta') == 1
    records = [json.loads(line) for line in lines if line != '{"output": "/torn", "sta']
    changed = [r["status"] for r in records if r["input"] == str(files[1])]
    assert changed == ["planned", "done", "planned", "done"]


def test_stale_temporary_outputs_are_removed_on_resume(capsys, tmp_path, speech):
    """Temporary outputs (.npdgru-*.part) that a killed run left are removed by the next run
    into that folder; other files are not touched."""
    src = tmp_path / "in"
    make_corpus(src, speech, n=2)
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    stale = [out / ".npdgru-k3j2x.wav.part", out / "a" / ".npdgru-zz91.flac.part"]
    kept = [out / "notes.part", out / ".npdgru-keep.txt", out / "a" / "mine.wav"]
    for p in stale + kept:
        p.write_bytes(b"RIFF half-written")
    status, _, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED, "-q")
    assert status == 0, err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_file_names_that_are_not_utf8(capsys, tmp_path, speech):
    """A file whose name is not valid UTF-8 is enhanced, shown with \\xNN escapes, journaled, and
    skipped by the next run."""
    src = tmp_path / "in"
    src.mkdir()
    name = os.fsencode(str(src)) + b"/\xff\xfe.wav"
    try:
        sf.write(name, speech[:3000], SR)
    except (OSError, sf.LibsndfileError):
        pytest.skip("this file system refuses names that are not UTF-8")
    sf.write(src / "ok.wav", speech[:2000], SR)
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 0, err
    assert "\\xff\\xfe.wav" in stdout
    assert sf.info(os.fsencode(str(out)) + b"/\xff\xfe.wav").frames == 3000
    status, stdout, err = run(capsys, "enhance", src, "-o", out, "--weights", SHIPPED)
    assert status == 0 and "2 files: 0 done, 2 skipped" in stdout, stdout + err


def test_names_differing_in_case_collide_where_the_file_system_folds_case(capsys, tmp_path, speech, monkeypatch):
    """A.wav and a.wav are two outputs here, but one file on a file system that folds case
    (macOS, Windows): there the collision is refused up front, naming both inputs."""
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "A.wav", speech[:2000], SR)
    sf.write(src / "a.wav", speech[:3000], SR)
    assert dist._folds_case(tmp_path) is False  # this file system: two files
    monkeypatch.setattr(dist, "_folds_case", lambda folder: True)
    status, _, err = run(capsys, "enhance", src, "-o", tmp_path / "out", "--weights", SHIPPED)
    assert status == 2 and "differ only in case" in err and str(src / "A.wav") in err and str(src / "a.wav") in err, err
    assert not (tmp_path / "out").exists()


def _server(greeting: bytes | None) -> int:
    """A TCP server on a free port that accepts and then says nothing, or sends ``greeting``."""
    import socket
    import threading

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)

    def serve():
        held = []
        while True:
            c, _ = s.accept()
            held.append(c)
            if greeting:
                c.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname()[1]


@pytest.mark.parametrize("greeting, needle", [(None, "no Dask scheduler answered within 1 s"), (b"SSH-2.0-OpenSSH_9.6\r\n", "not a Dask scheduler")])
def test_scheduler_that_is_not_one(capsys, tmp_path, speech, monkeypatch, greeting, needle):
    """--scheduler at a port that accepts and says nothing (an HTTP server) or sends another
    protocol's greeting (SSH): one line, exit 2, within the connect timeout (lowered to 1 s)."""
    import threading
    import time

    pytest.importorskip("distributed")
    monkeypatch.setattr(dist, "SCHEDULER_TIMEOUT", 1.0)
    make_corpus(tmp_path / "in", speech, n=1)
    port = _server(greeting)
    result = []
    t0 = time.perf_counter()
    thread = threading.Thread(target=lambda: result.append(main(["enhance", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(SHIPPED),
                                                                 "--scheduler", f"tcp://127.0.0.1:{port}"])), daemon=True)
    thread.start()
    thread.join(60)
    assert result == [2], "hung" if thread.is_alive() else result
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err and str(port) in err, err


def test_dead_workers_are_one_summary_line(capfd, tmp_path, speech):
    """A file that kills its worker every time: the cluster's own log lines
    ('distributed.scheduler - ERROR ...') do not reach the terminal; the run hands one summary
    line to on_note, and the file is recorded as failed."""
    pytest.importorskip("distributed")
    make_corpus(tmp_path / "in", speech, n=2)

    def after_write(item):
        import os as _os
        import signal as _signal

        if item.src.endswith("f1.wav"):
            _os.unlink(item.dst)
            _os.kill(_os.getpid(), _signal.SIGKILL)

    items, _, jr = dist.plan_work([tmp_path / "in"], tmp_path / "out", config=config())
    notes = []
    results = dist.run_items(items, config(), journal=jr, jobs=2, task_seconds=0.01, after_write=after_write, allowed_failures=0, on_note=notes.append)
    assert {Path(r.src).name: r.status for r in results} == {"f0.wav": "done", "f1.wav": "failed"}
    err = capfd.readouterr().err
    assert "distributed." not in err and "Traceback" not in err, err
    assert len(notes) == 1 and "workers died" in notes[0], notes


def _sleep_then(x):
    import time

    time.sleep(60)
    return x


def test_a_cluster_left_without_workers_is_an_error_not_a_hang(monkeypatch):
    """Workers that cannot start on a loaded machine (or that all leave) once left map_ordered
    waiting for ever; after WORKERLESS_TIMEOUT with no worker the run now ends in one error."""
    pytest.importorskip("distributed")
    import threading
    import time

    from npdgru.errors import NpdgruError

    monkeypatch.setattr(dist, "WORKERLESS_TIMEOUT", 1.0)
    outcome = []

    def run():
        import logging

        from distributed import Client, LocalCluster

        try:
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL) as lc, Client(lc) as client:
                futures = {client.submit(_sleep_then, 1, pure=False): 0}
                while not any(client.processing().values()):
                    time.sleep(0.05)  # the task has reached the worker
                lc.scale(0)  # every worker leaves; none comes back
                for _ in dist._as_completed(client, futures):
                    pass
            outcome.append(None)
        except NpdgruError as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(45)
    assert outcome, "map over a cluster with no worker still waits for ever"
    assert isinstance(outcome[0], NpdgruError) and "no worker" in str(outcome[0])
