"""A corpus of files: the work list, the journal, and their execution in-process or on a Dask cluster.

    inputs (files, folders, manifests) -o OUT
        -> plan_work: one Item (input, output) per file; collisions refused up front;
           what the journal OUT/.npdgru-journal.jsonl says is done and current is skipped
        -> run_items: tasks of about TASK_SECONDS of audio each, run in this process
           (neither jobs nor scheduler) or on dask.distributed (a LocalCluster of ``jobs``
           single-threaded worker processes, or the running cluster at ``scheduler``)
        -> every output written atomically (npdgru.audio.write_audio); one journal line per
           file: input, output, sha256 of the input, model, P, status, error

Nothing lost, nothing twice:

* A worker process keeps one :class:`~npdgru.enhance.Enhancer` per configuration (weights are
  loaded once per process) and catches every per-file failure: a bad file is one line naming it,
  the task goes on.
* A worker that dies is replaced by its nanny and the task is retried (``allowed_failures``
  times; then each of its files is run again alone, since a file may only have shared the worker
  with the one that kills it, and a file that kills its worker alone too is recorded as failed). Before writing an output the worker compares
  it with the ``os.stat`` the driver took when it planned the run: an output that changed since
  was written by an earlier attempt of the same task in this run (the rename is atomic, so it
  is complete) and is not written again.
* Only the driver writes the journal (one writer, also on shared storage), and only while it
  holds the output folder's lock (``OUT/.npdgru-lock``, flock: one run per folder). It first
  records every output of the run as ``planned``: a killed run leaves outputs that the next run
  may redo without ``--overwrite`` (they are npdgru's own: the lines carry the folder's id), and
  the next run skips exactly those whose journal line says ``done`` with the same input (size
  and mtime, else sha256, all three taken by the worker from the file it read), weights, P and
  mask floor, and whose output is still there with the recorded size. The journal is read as
  untrusted data: lines of the wrong types are ignored, with a warning.
* Every output lies inside OUT (resolved, symlinks followed) and has an audio suffix; a
  manifest row that names another is refused before any work.
* A file is read, enhanced and written in blocks of a minute (npdgru.enhance.enhance_file):
  memory does not grow with its length.

dask is imported only when a cluster is asked for (``pip install -e ".[distributed]"``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .convert import sha256_of
from .errors import AudioError, NpdgruError, ParameterError

JOURNAL_NAME = ".npdgru-journal.jsonl"
LOCK_NAME = ".npdgru-lock"  # one run per output folder: flock'ed for the run; holds its pid and the folder's id
TEMP_PREFIX = ".npdgru-"  # temporary outputs, the journal and the lock: never taken as inputs
PART_SUFFIX = ".part"  # temporary outputs: TEMP_PREFIX ... PART_SUFFIX (npdgru.audio.write_audio)
TASK_SECONDS = 60.0  # audio per task: a few seconds of compute, so scheduling costs little
TASK_MAX_FILES = 64
ALLOWED_FAILURES = 3  # a task whose worker dies more often than this is recorded as failed
# Dask settings of the LocalCluster (a running cluster keeps its own), each measured to cost CPU
# on every task (benchmarks/bench_corpus.py): no statistical profiler sampling the worker
# threads every 10 ms, and the workers' environment without MALLOC_TRIM_THRESHOLD_ (setting it
# turns off glibc's adaptive mmap threshold, so every large array of every file is a fresh
# mmap with its page faults); BLAS and OpenMP stay at one thread per worker, as Dask sets them.
CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1},
}
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
INPUT_KEYS = ("input", "audio_filepath", "path")  # npdgru, NeMo, plain
OUTPUT_KEYS = ("output", "output_filepath")

__all__ = ["Item", "Config", "Result", "collect_inputs", "plan_work", "run_items", "cluster", "Journal", "JOURNAL_NAME"]


@dataclass(frozen=True)
class Item:
    """One file to enhance."""

    src: str
    dst: str
    seconds: float  # duration from the header (0 when the header is unreadable: the worker says why)
    before: tuple | None = None  # (st_ino, st_mtime_ns, st_size) of dst when planned; None: absent


@dataclass(frozen=True)
class Config:
    """What a worker needs to build its Enhancer (and what the journal records as the model)."""

    weights: str | None
    update_percent: float
    backend: str = "cpu"
    mask_floor_db: float = -80.0
    model: str = ""  # weights file name @ first 16 hex digits of its sha256
    subtype: str | None = None  # --subtype; None: the input's where the output format holds it
    exact: bool = False  # --exact: products in the streaming hop's order (Enhancer(exact=))


@dataclass
class Result:
    src: str
    dst: str
    status: str  # "done" | "failed" | "skipped"
    error: str | None = None
    sha256: str | None = None
    input_size: int | None = None  # the input's identity, taken in the worker from the file it read
    input_mtime_ns: int | None = None
    seconds: float = 0.0  # audio
    channels: int = 0
    rate: int = 0
    compute: float = 0.0  # seconds of enhancement (not reading, not writing)
    rewritten: bool = True  # False: an earlier attempt of this run had written it already
    warnings: list = field(default_factory=list)  # format changes that lose bits or clip


# --------------------------------------------------------------------------------------------
# work list
# --------------------------------------------------------------------------------------------


def _audio_suffixes():
    from .audio import AUDIO_SUFFIXES

    return AUDIO_SUFFIXES


def _is_audio_name(p: Path) -> bool:
    return p.suffix.lower() in _audio_suffixes() and not p.name.startswith(TEMP_PREFIX)


def _read_manifest(path: Path, out_root: Path) -> list[tuple[Path, Path]]:
    """(input, output) of every row of a CSV or JSON-lines manifest.

    Inputs relative to the manifest's folder; outputs relative to OUT, or, where the manifest
    gives none, the input's path under the manifest's folder (else its whole path) below OUT.
    """
    base = path.parent
    rows: list[tuple[int, dict]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                rows = [(k, r) for k, r in enumerate(reader, start=2)]
            else:
                for k, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ParameterError(f"{path}, line {k}: not JSON ({e.msg})") from None
                    if not isinstance(r, dict):
                        raise ParameterError(f"{path}, line {k}: expected a JSON object per line")
                    rows.append((k, r))
    except OSError as e:
        raise ParameterError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ParameterError(f"{path}: the manifest is not UTF-8 text") from None
    if not rows:
        raise ParameterError(f"{path}: the manifest lists no files")
    pairs = []
    for k, r in rows:
        key = next((c for c in INPUT_KEYS if r.get(c)), None)
        if key is None:
            raise ParameterError(f"{path}, line {k}: no input path (a column or key named {' or '.join(INPUT_KEYS)})")
        src = Path(str(r[key]))
        src = src if src.is_absolute() else base / src
        out_key = next((c for c in OUTPUT_KEYS if r.get(c)), None)
        if out_key is not None:
            value = str(r[out_key])
            dst = out_root / value  # an absolute value stays absolute: refused below unless inside OUT
            if Path(value).suffix.lower() not in _audio_suffixes():
                raise ParameterError(f"{path}, line {k}: output {value!r} must end in {', '.join(_audio_suffixes())}")
            if not _inside(dst, out_root):
                raise ParameterError(f"{path}, line {k}: output {value!r} resolves outside -o {out_root}; manifest outputs stay inside the output folder")
        else:
            try:
                rel = src.resolve().relative_to(base.resolve())
            except ValueError:
                rel = Path(*src.resolve().parts[1:])
            dst = out_root / rel
        pairs.append((src, dst))
    return pairs


def _inside(path, root) -> bool:
    """``path`` lies in folder ``root`` once both are resolved (``..`` and symlinks followed), as
    tarfile's ``data`` filter decides: a symlink that leads out of ``root`` is out."""
    r, base = os.path.realpath(path), os.path.realpath(root)
    return r != base and os.path.commonpath([r, base]) == base


def _folds_case(folder) -> bool:
    """Whether the file system of ``folder`` (or of its nearest existing parent) folds case.

    Probed without writing: a path component with letters, spelt with its case swapped, names the
    same file on a folding file system (macOS, Windows). With no such component, the platform's
    default."""
    import sys

    p = Path(os.path.abspath(folder))
    while not p.exists() and p != p.parent:
        p = p.parent
    for q in (p, *p.parents):
        if q.name != q.name.swapcase():
            other = q.with_name(q.name.swapcase())
            try:
                return os.path.samefile(q, other)
            except OSError:
                return False
    return sys.platform in ("darwin", "win32")


def _check_output_name(out: Path, n_inputs: int) -> bool:
    """True if ``-o`` names one output file, False if a folder; ParameterError if it can be neither.

    A name with an audio suffix is a file (for one input); one with another suffix (``out.txt``,
    ``ok.mp3``) is refused rather than taken as a folder name, unless that folder exists.
    """
    if out.is_dir():
        return False
    if out.exists():  # a file (or a FIFO, a device): only as the one output file
        if n_inputs > 1 or out.suffix.lower() not in _audio_suffixes():
            raise ParameterError(f"{out}: exists and is not a folder; for {n_inputs} input(s) name a folder or a .wav/.flac/.ogg/.aiff file")
        return True
    if out.suffix.lower() in _audio_suffixes():
        if n_inputs > 1:
            raise ParameterError(f"{out}: {n_inputs} inputs need an output folder, not a file name")
        return True
    if out.suffix:
        raise ParameterError(f"{out}: npdgru writes {', '.join(_audio_suffixes())} files, not '{out.suffix}'; for a folder of that name create it first")
    return False


def collect_inputs(inputs, out) -> tuple[list[tuple[Path, Path]], bool]:
    """(input, output) for every file named, inside a folder (recursively) or in a manifest, and
    whether OUT is a single output file (one input file and an audio suffix)."""
    out_p = Path(out)
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _is_audio_name(f))
            if not files:
                raise AudioError(f"{p}: folder holds no audio files ({', '.join(_audio_suffixes())})")
            found += [(f, out_p / f.relative_to(p)) for f in files]
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            found += _read_manifest(p, out_p)
        elif p.exists():
            found.append((p, out_p / p.name))
        else:
            raise AudioError(f"{p}: no such file or folder")
    single = _check_output_name(out_p, len(found))
    if single:
        found = [(found[0][0], out_p)]
    return found, single


def _stat_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _duration(path) -> float:
    import soundfile as sf

    if not _is_regular(path):  # a FIFO or pipe is read once, by the worker
        return 0.0
    from .audio import _sf_name

    try:
        info = sf.info(_sf_name(os.fspath(path)))
        return info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # unreadable: the worker reports it with the file's name
        return 0.0


_STATUSES = ("planned", "done", "failed")
_NUMBER = (int, float)
# Every field a journal line may hold, with its types: the journal is data from the disk.
_FIELDS = {"output": (str,), "input": (str,), "status": (str,), "sha256": (str, type(None)), "model": (str,), "P": _NUMBER,
           "mask_floor_db": _NUMBER, "seconds": _NUMBER, "output_size": (int, type(None)), "input_size": (int, type(None)),
           "input_mtime_ns": (int, type(None)), "error": (str, type(None)), "folder_id": (str,), "exact": (bool,)}
_REQUIRED = ("output", "input", "status")


def _journal_problem(rec) -> str | None:
    """Why a parsed journal line cannot be used, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for k in _REQUIRED:
        if k not in rec:
            return f"no {k!r}"
    for k, v in rec.items():
        types = _FIELDS.get(k)
        if types is None:
            continue  # a field of a later version: ignored
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            return f"{k!r} is {type(v).__name__} {json.dumps(v)[:40]}"
    if rec["status"] not in _STATUSES:
        return f"status {rec['status']!r} is not one of {', '.join(_STATUSES)}"
    return None


class Journal:
    """``OUT/.npdgru-journal.jsonl``: one JSON line per event, appended by the driver only.

    The last line of an output decides: ``planned`` (this run or a killed one means to write
    it), ``done`` (written from this input by this model), ``failed`` (with the error).

    The journal is data from the disk: a line that is not JSON (a torn last line of a killed
    run) or whose fields have the wrong types is ignored, and said once (``ignored``). Opening
    the journal takes the folder's lock (``OUT/.npdgru-lock``, ``fcntl.flock``, held until
    :meth:`close` or the process's end): one run per folder at a time. The lock file also keeps
    the folder's id, which every line this folder's runs write carries (``folder_id``); only
    such a line makes an existing output npdgru's own, to replace without ``--overwrite``.
    """

    def __init__(self, folder, *, lock: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_NAME
        self.last: dict[str, dict] = {}
        self.ignored: list[str] = []  # "line k: why", for one warning
        self.folder_id: str | None = None
        self._lock_file = None
        self._f = None
        if lock:
            self._lock()
        self._read()

    def _lock(self) -> None:
        import fcntl
        import secrets

        lock_path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise ParameterError(f"{lock_path}: cannot create the output folder's lock ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_info(fd).get("pid")
            os.close(fd)
            who = f"pid {holder}" if isinstance(holder, int) and not isinstance(holder, bool) else "another process"
            raise ParameterError(f"{self.folder}: another npdgru run ({who}) is writing into this folder; wait for it to end or choose another -o") from None
        info = _lock_info(fd)
        fid = info.get("folder_id")
        self.folder_id = fid if isinstance(fid, str) and len(fid) == 32 and all(c in "0123456789abcdef" for c in fid) else secrets.token_hex(16)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps({"pid": os.getpid(), "folder_id": self.folder_id}) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise ParameterError(f"{lock_path}: cannot write the output folder's lock ({e.strerror or e})") from None
        self._lock_file = os.fdopen(fd, "r+b")  # closed (the lock released) by close(), or when collected

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8", errors="replace", newline="\n") as f:
            for k, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    self.ignored.append(f"line {k}: not JSON" + ("" if line.endswith("\n") else " (torn last line)"))
                    continue
                why = _journal_problem(rec)
                if why is not None:
                    self.ignored.append(f"line {k}: {why}")
                    continue
                self.last[rec["output"]] = rec

    def warning(self) -> str | None:
        """One line for the ignored lines, or None."""
        if not self.ignored:
            return None
        more = f" and {len(self.ignored) - 3} more" if len(self.ignored) > 3 else ""
        return f"{self.path}: {len(self.ignored)} line(s) ignored ({'; '.join(self.ignored[:3])}{more})"

    def owns(self, rec: dict | None) -> bool:
        """The record was written by a run in this folder, for an output inside it: that output
        may be replaced without --overwrite."""
        return rec is not None and self.folder_id is not None and rec.get("folder_id") == self.folder_id and _inside(rec["output"], self.folder)

    def open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a+b")
            self._f.seek(0, os.SEEK_END)
            if self._f.tell():  # a torn last line (a killed run): the next record starts a line of its own
                self._f.seek(-1, os.SEEK_END)
                torn = self._f.read(1) != b"\n"
                self._f.seek(0, os.SEEK_END)
                if torn:
                    self._f.write(b"\n")
        except OSError as e:
            raise ParameterError(f"{self.path}: cannot write the journal ({e.strerror or e})") from None
        return self

    def write(self, records) -> None:
        if self._f is None:
            return
        # ASCII JSON: a file name that is not UTF-8 (a surrogate escape) is written as \udcXX and read back as it was
        self._f.write("".join(json.dumps(dict(r, folder_id=self.folder_id), sort_keys=True) + "\n" for r in records).encode("ascii"))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            try:
                os.fsync(self._f.fileno())
            except OSError:
                pass
            self._f.close()
            self._f = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None


def _lock_info(fd) -> dict:
    """What a lock file holds ({"pid", "folder_id"}), {} if unreadable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def remove_stale_parts(folder) -> int:
    """Remove the temporary outputs (``.npdgru-*.part``) that killed runs left below ``folder``.

    Only while holding the folder's lock: no other run of this folder is writing one."""
    n = 0
    for dirpath, _, names in os.walk(folder):  # symlinked folders are not followed
        for name in names:
            if name.startswith(TEMP_PREFIX) and name.endswith(PART_SUFFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except OSError:
                    pass
    return n


def _key(path) -> str:
    return os.path.abspath(path)


def _is_current(rec: dict | None, src: Path, dst: Path, config: Config) -> bool:
    """The journal says dst is done from this very input by this model, and dst is still there."""
    if not rec or rec.get("status") != "done" or rec.get("input") != _key(src) or not _is_regular(src):
        return False
    if (rec.get("model"), rec.get("P"), rec.get("mask_floor_db"), rec.get("exact", False)) != (config.model, config.update_percent, config.mask_floor_db, config.exact):
        return False
    try:
        d, s = os.stat(dst), os.stat(src)
    except OSError:
        return False
    if d.st_size != rec.get("output_size"):
        return False
    if (s.st_size, s.st_mtime_ns) == (rec.get("input_size"), rec.get("input_mtime_ns")):
        return True
    return sha256_of(src) == rec.get("sha256")  # touched but maybe the same bytes


def plan_work(inputs, out, *, config: Config, overwrite: bool = False) -> tuple[list[Item], list[Result], Journal | None]:
    """The files to do, the files the journal says are done (skipped), and the journal
    (None when OUT is a single file), which holds the output folder's lock until it is closed.

    Refuses up front, naming the files: an output outside OUT (a symlink out of it), an output
    that is an input, two inputs with one output (names that differ only in case, where the file
    system folds case), an existing output that is not npdgru's without ``overwrite``, and
    another run holding OUT. Temporary outputs that killed runs left in OUT are removed."""
    pairs, single = collect_inputs(inputs, out)
    folds = not single and _folds_case(out)

    def same_file_key(path) -> str:
        r = os.path.realpath(path)
        return r.casefold() if folds else r

    in_real = {same_file_key(s) for s, _ in pairs}
    seen: dict[str, Path] = {}
    for src, dst in pairs:
        if not single and not _inside(dst, out):
            raise ParameterError(f"{dst}: resolves outside the output folder {out} (a symlink out of it?); outputs stay inside -o")
        r = same_file_key(dst)
        if r in in_real:
            raise ParameterError(f"{dst}: output would overwrite an input file; choose another -o")
        if r in seen:
            case = " (names that differ only in case are one file here)" if folds and os.path.realpath(dst) != os.path.realpath(seen[r][1]) else ""
            raise ParameterError(f"{dst}: two inputs would write the same output file{case}: {seen[r][0]} and {src}")
        seen[r] = (src, dst)
    if config.subtype is not None:  # a --subtype the output format cannot hold: once per format, before any work
        from .audio import output_subtype

        for dst in {Path(d).suffix.lower(): d for _, d in pairs}.values():
            output_subtype(dst, np.zeros(1, np.float32), subtype=config.subtype)
    journal = None if single else Journal(out)
    try:
        if journal is not None:
            remove_stale_parts(out)  # this run holds the lock: any .part there is a dead run's
        todo, skipped = [], []
        for src, dst in pairs:
            rec = journal.last.get(_key(dst)) if journal else None
            if _is_current(rec, src, dst, config):
                skipped.append(Result(str(src), str(dst), "skipped", sha256=rec.get("sha256"), seconds=float(rec.get("seconds") or 0.0)))
                continue
            before = _stat_key(dst)
            if before is not None and not overwrite and not (journal and journal.owns(rec)):
                raise ParameterError(f"{dst}: output exists; pass --overwrite to replace it")
            todo.append(Item(str(src), str(dst), _duration(src), before))
    except BaseException:
        if journal is not None:
            journal.close()
        raise
    return todo, skipped, journal


def make_tasks(items: list[Item], *, task_seconds: float = TASK_SECONDS, max_files: int = TASK_MAX_FILES) -> list[list[Item]]:
    """Consecutive files grouped into tasks of about ``task_seconds`` of audio (at least one file)."""
    tasks, cur, acc = [], [], 0.0
    for it in items:
        cur.append(it)
        acc += it.seconds
        if acc >= task_seconds or len(cur) >= max_files:
            tasks.append(cur)
            cur, acc = [], 0.0
    if cur:
        tasks.append(cur)
    return tasks


# --------------------------------------------------------------------------------------------
# per-file work (in the worker processes, or in this one)
# --------------------------------------------------------------------------------------------

_ENHANCERS: dict = {}  # the main thread's: the in-process loop
_THREAD = threading.local()


def use_enhancer(config: Config, enhancer) -> None:
    """The in-process loop (this process's main thread) runs ``config`` on ``enhancer``, an
    Enhancer already made (``npdgru enhance`` checks the weights and P with it before planning),
    instead of loading the weights again."""
    _ENHANCERS.clear()
    _ENHANCERS[config] = enhancer


def _enhancer(config: Config):
    """One Enhancer per configuration per worker thread, kept: the weights are loaded once.

    A worker started with several threads (``dask worker --nthreads 4``) runs tasks
    concurrently in one process: each thread gets its own Enhancer, whose buffers no other
    thread touches."""
    if threading.current_thread() is threading.main_thread():
        cache = _ENHANCERS
    else:  # a Dask worker's task thread
        cache = _THREAD.__dict__.setdefault("enhancers", {})
    enh = cache.get(config)
    if enh is None:
        from .enhance import Enhancer

        cache.clear()
        enh = cache[config] = Enhancer(config.weights, update_percent=config.update_percent, backend=config.backend, mask_floor_db=config.mask_floor_db, exact=config.exact)
    return enh


def _named(src: str, e: BaseException) -> str:
    """One line naming the file."""
    msg = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    if not isinstance(e, NpdgruError):
        msg = f"{type(e).__name__}: {msg}"
    return msg if src in msg else f"{src}: {msg}"


@contextmanager
def _quiet_numerics():
    """Overflow in a file's numbers (e.g. samples near float32's limit) is reported as that
    file's error by the checks downstream, not as a RuntimeWarning on the console."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            yield


def _write(item: Item, y, sr: int, after_write=None, *, source_subtype=None, subtype=None) -> list[str]:
    """Write one output atomically in the subtype ``output_subtype`` chooses; its warnings."""
    from .audio import output_subtype, write_audio

    chosen, warns = output_subtype(item.dst, y, source_subtype=source_subtype, subtype=subtype)
    write_audio(item.dst, y, sr, subtype=chosen)
    if after_write is not None:
        after_write(item)
    return _named_warnings(item, warns)


def _named_warnings(item: Item, warns) -> list[str]:
    return [w if item.dst in w else f"{item.dst}: {w}" for w in warns]


def _already_written(item: Item) -> bool:
    """An earlier attempt of this task in this run wrote the output (it changed since planning)."""
    now = _stat_key(item.dst)
    return now is not None and now != item.before


def _is_regular(path) -> bool:
    """A regular file; a FIFO or pipe (``<(cat x.wav)``) can be read once only."""
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _process_one(enh, item: Item, after_write=None, subtype=None) -> Result:
    """One file, read, enhanced and written in blocks (``npdgru.enhance.enhance_file``); its
    identity (sha256, size, mtime) taken here from the open file that was read."""
    from .audio import AudioInput
    from .enhance import enhance_file

    r = Result(item.src, item.dst, "failed")
    try:
        with _quiet_numerics(), AudioInput(item.src) as src:
            r.seconds, r.channels, r.rate = src.frames / src.samplerate, src.channels, src.samplerate
            if _already_written(item):
                r.sha256, r.input_size, r.input_mtime_ns = src.identity()
                r.status, r.rewritten = "done", False
                return r
            done = enhance_file(enh, src, item.dst, subtype=subtype)
            r.sha256, r.input_size, r.input_mtime_ns = done["identity"]
            r.compute, r.warnings = done["compute"], _named_warnings(item, done["warnings"])
        if after_write is not None:
            after_write(item)
        r.status = "done"
    except (Exception, MemoryError) as e:  # noqa: BLE001 - every per-file failure is that file's line
        r.error = _named(item.src, e)
    return r


def _process_batch(enh, items: list[Item], after_write=None, subtype=None) -> list[Result]:
    """cuda: the readable files of a task as one GPU batch (``Enhancer.enhance_batch``, which
    equals ``enhance`` per file bit for bit); a batch that fails falls back to file by file.
    A file longer than one block goes file by file, in blocks (bounded memory)."""
    from .audio import AudioInput
    from .enhance import BLOCK_SECONDS

    results = [Result(it.src, it.dst, "failed") for it in items]
    subtypes = {}
    ready = []  # (index, x, sr)
    for k, (it, r) in enumerate(zip(items, results)):
        try:
            with _quiet_numerics(), AudioInput(it.src) as src:  # opened once
                r.seconds, r.channels, r.rate = src.frames / src.samplerate, src.channels, src.samplerate
                if src.frames > BLOCK_SECONDS * src.samplerate:
                    results[k] = None  # in blocks, below
                    continue
                x = src.read()
                r.sha256, r.input_size, r.input_mtime_ns = src.identity()
                subtypes[k] = src.subtype
            if _already_written(it):
                r.status, r.rewritten = "done", False
                continue
            ready.append((k, x, src.samplerate))
        except (Exception, MemoryError) as e:  # noqa: BLE001
            r.error = _named(it.src, e)
    for k, r in enumerate(results):
        if r is None:
            results[k] = _process_one(enh, items[k], after_write, subtype)
    if not ready:
        return results
    try:
        t0 = time.perf_counter()
        with _quiet_numerics():
            ys = enh.enhance_batch([x for _, x, _ in ready], [sr for _, _, sr in ready])
        dt = (time.perf_counter() - t0) / len(ready)
    except (Exception, MemoryError):  # noqa: BLE001 - one bad file must not fail the others
        for k, _, _ in ready:
            results[k] = _process_one(enh, items[k], after_write, subtype)
        return results
    for (k, _, sr), y in zip(ready, ys):
        r = results[k]
        r.compute = dt
        try:
            r.warnings = _write(items[k], y, sr, after_write, source_subtype=subtypes[k], subtype=subtype)
            r.status = "done"
        except (Exception, MemoryError) as e:  # noqa: BLE001
            r.error = _named(items[k].src, e)
    return results


def run_task(items: list[Item], config: Config, after_write=None) -> list[Result]:
    """One task: every file of ``items`` with this process's Enhancer; never raises for a file."""
    enh = _enhancer(config)
    if enh.model.executor.batches_files and len(items) > 1:
        return _process_batch(enh, items, after_write, config.subtype)
    return [_process_one(enh, it, after_write, config.subtype) for it in items]


# --------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------


def need_dask() -> None:
    """ParameterError with the install command where dask.distributed is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ParameterError('--jobs/--scheduler need dask.distributed (the distributed extra): pip install -e ".[distributed]"') from None


SCHEDULER_TIMEOUT = 30.0  # seconds for --scheduler to connect and answer Dask's handshake
WORKERLESS_TIMEOUT = 120.0  # seconds a cluster may have no worker at all before the run gives up


class _LogTally(logging.Handler):
    """dask.distributed's log records of a run, kept for one summary line (a worker's death is
    already each file's own error line)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count, self.first = 0, None

    def emit(self, record):
        self.count += 1
        if self.first is None:
            self.first = " ".join(record.getMessage().split())[:300]


@contextmanager
def cluster(*, jobs: int | None = None, scheduler: str | None = None, allowed_failures: int = ALLOWED_FAILURES, on_note=None):
    """A dask Client: on the running cluster at ``scheduler``, or on a LocalCluster of ``jobs``
    single-threaded worker processes (each under a nanny that replaces it if it dies).

    The ``distributed`` log records of this process (the LocalCluster's scheduler and nannies)
    are not printed: at the end, ``on_note(line)`` gets one line that counts them and quotes the
    first (without ``on_note``, the ``npdgru`` logger warns with it)."""
    need_dask()
    log = logging.getLogger("distributed")
    saved = log.handlers[:], log.propagate, log.level
    tally = _LogTally()
    log.handlers, log.propagate = [tally], False
    log.setLevel(logging.WARNING)  # no INFO lines of the cluster's start and close
    try:
        with _cluster(jobs, scheduler, allowed_failures) as client:
            yield client
    finally:
        log.handlers, log.propagate = saved[0], saved[1]
        log.setLevel(saved[2])
        if tally.count:
            note = f"the Dask cluster logged {tally.count} warning(s) or error(s), the first: {tally.first}"
            (on_note or logging.getLogger("npdgru").warning)(note)


def _probe_scheduler(address: str, timeout: float) -> None:
    """Connect to ``address`` and exchange Dask's handshake within ``timeout`` seconds, else one
    ParameterError: Client() itself waits forever on a port that accepts and says nothing, and
    reads another protocol's greeting (``SSH-2.0-...``) as a frame length of exabytes."""
    import asyncio

    from distributed.comm import connect

    async def probe():
        comm = await connect(address, timeout=timeout)
        await comm.close()

    outcome: list = []

    def run():
        try:
            asyncio.run(asyncio.wait_for(probe(), timeout))
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below as one line
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True, name="npdgru-scheduler-probe")  # never inside a caller's event loop
    t.start()
    t.join(timeout + 5.0)
    e = outcome[0] if outcome else TimeoutError()
    if e is None:
        return
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)) or "Timed out" in str(e):
        why = f"no Dask scheduler answered within {timeout:g} s"
    elif isinstance(e, (MemoryError, OverflowError)) or type(e).__name__ in ("CommClosedError", "UnpackException", "ExtraData", "FormatError", "StreamClosedError"):
        why = "what answered there is not a Dask scheduler"
    else:
        why = f"cannot connect ({' '.join(str(e).split())[:200] or type(e).__name__})"
    raise ParameterError(f"--scheduler {address}: {why}")


@contextmanager
def _cluster(jobs, scheduler, allowed_failures):
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(CLUSTER_CONFIG | {"distributed.scheduler.allowed-failures": allowed_failures}):
        if scheduler:
            _probe_scheduler(scheduler, SCHEDULER_TIMEOUT)
            try:
                client = Client(scheduler, timeout=f"{SCHEDULER_TIMEOUT}s")
            except (OSError, TimeoutError, ValueError) as e:
                raise ParameterError(f"--scheduler {scheduler}: cannot connect ({' '.join(str(e).split()) or type(e).__name__})") from None
            with client:
                yield client
            return
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ParameterError(f"jobs={jobs!r} must be an integer >= 1")
        with LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR) as lc, Client(lc) as client:
            yield client


def _as_completed(client, futures):
    """``distributed.as_completed(futures)``, except that a cluster left with no worker for
    WORKERLESS_TIMEOUT seconds (workers that could not start on a loaded machine, or that left a
    remote scheduler) raises NpdgruError instead of waiting for ever: the journal keeps what was
    done, and the next run resumes."""
    from distributed import as_completed

    pending = as_completed(futures)
    since = None
    checked = time.monotonic()
    while not pending.is_empty():
        if pending.has_ready():
            yield from pending.next_batch(block=False)
            since = None
            continue
        now = time.monotonic()
        if now - checked >= 1.0:  # one scheduler call a second
            checked = now
            if client.scheduler_info().get("workers"):
                since = None
            elif since is None:
                since = now
            elif now - since > WORKERLESS_TIMEOUT:
                raise NpdgruError(f"the Dask cluster has had no worker for {WORKERLESS_TIMEOUT:g} s (workers that cannot start or keep dying); run again to resume")
        time.sleep(0.02)


def _task_key(k: int, items: list[Item], stamp: str) -> str:
    h = hashlib.sha1(b"\0".join(os.fsencode(it.src) for it in items)).hexdigest()[:12]
    return f"npdgru-enhance-{stamp}-{k}-{h}"


def _why(e: BaseException) -> str:
    """One line for a task that failed on the cluster."""
    return "worker died" if type(e).__name__ == "KilledWorker" else f"{type(e).__name__}: {' '.join(str(e).split())}"


def iter_results(items: list[Item], config: Config, *, jobs: int | None = None, scheduler: str | None = None, task_seconds: float = TASK_SECONDS,
                 after_write=None, allowed_failures: int = ALLOWED_FAILURES, on_note=None):
    """Yield the results of each task as it finishes: in order in this process (neither jobs nor
    scheduler), in completion order on a cluster. A task whose worker died more than
    ``allowed_failures`` times yields its files as failed.

    Tasks hold ``task_seconds`` of audio, less for a small corpus: at least about 8 tasks per
    worker thread, so that every worker has work until the end."""
    if not jobs and not scheduler:  # file by file (cuda: task by task, one batch each), journaled as they finish
        for items in make_tasks(items, task_seconds=task_seconds):
            if _enhancer(config).model.executor.batches_files:
                yield run_task(items, config, after_write)
            else:
                for it in items:
                    yield run_task([it], config, after_write)
        return
    with cluster(jobs=jobs, scheduler=scheduler, allowed_failures=allowed_failures, on_note=on_note) as client:
        threads = max(1, sum(client.nthreads().values()))
        total = sum(it.seconds for it in items)
        tasks = make_tasks(items, task_seconds=min(task_seconds, total / (8 * threads)))
        stamp = f"{os.getpid()}-{time.time_ns()}"
        futures = {}
        for k, items in enumerate(tasks):
            # Absolute paths: a worker on another node runs in its own folder (shared storage).
            items = [replace(it, src=_key(it.src), dst=_key(it.dst)) for it in items]
            f = client.submit(run_task, items, config, after_write, key=_task_key(k, items, stamp), pure=False)
            futures[f] = items
        suspects = []  # files of tasks whose workers died: maybe only beside the file that kills them
        for f in _as_completed(client, futures):
            items = futures.pop(f)
            try:
                yield f.result()
            except Exception as e:  # noqa: BLE001 - KilledWorker, lost connection: these files failed
                if type(e).__name__ == "KilledWorker":
                    suspects += items
                else:
                    yield [Result(it.src, it.dst, "failed", error=f"{it.src}: {_why(e)} (tried {allowed_failures + 1} times)") for it in items]
            f.release()
        # Each suspect again, alone on the cluster: a file that shared a dying worker (in its task or
        # queued on that worker) is done now; the file that kills its worker fails on its own. One
        # at a time on purpose: two submitted together may share a worker thread pool again.
        for k, it in enumerate(suspects):
            f = client.submit(run_task, [it], config, after_write, key=_task_key(len(tasks) + k, [it], stamp), pure=False)
            try:
                yield f.result()
            except Exception as e:  # noqa: BLE001
                yield [Result(it.src, it.dst, "failed", error=f"{it.src}: {_why(e)} (tried {allowed_failures + 1} times with others, then {allowed_failures + 1} times alone)")]
            f.release()


def run_items(items: list[Item], config: Config, *, journal: Journal | None = None, jobs: int | None = None, scheduler: str | None = None,
              task_seconds: float = TASK_SECONDS, on_result=None, after_write=None, allowed_failures: int = ALLOWED_FAILURES, on_note=None) -> list[Result]:
    """Enhance ``items``; journal every file; call ``on_result(result)`` as each file finishes
    and ``on_note(line)`` for what the cluster logged (see :func:`cluster`).

    Returns the results in the order of ``items``.
    """
    if journal is not None:
        journal.open()
        journal.write({"output": _key(it.dst), "input": _key(it.src), "status": "planned"} for it in items)
    done: dict[str, Result] = {}
    try:
        for results in iter_results(items, config, jobs=jobs, scheduler=scheduler, task_seconds=task_seconds, after_write=after_write,
                                    allowed_failures=allowed_failures, on_note=on_note):
            if journal is not None:
                journal.write(_record(r, config) for r in results)
            for r in results:
                done[_key(r.dst)] = r
                if on_result is not None:
                    on_result(r)
    finally:
        if journal is not None:
            journal.close()
    return [done[_key(it.dst)] for it in items]


def _record(r: Result, config: Config) -> dict:
    rec = {"output": _key(r.dst), "input": _key(r.src), "status": r.status, "sha256": r.sha256, "model": config.model,
           "P": config.update_percent, "mask_floor_db": config.mask_floor_db, "exact": config.exact, "seconds": round(r.seconds, 6)}
    if r.status == "done":
        rec["output_size"] = os.path.getsize(r.dst) if os.path.exists(r.dst) else None
        # the identity the worker took from the file it read, never a later stat here
        rec["input_size"], rec["input_mtime_ns"] = r.input_size, r.input_mtime_ns
    else:
        rec["error"] = r.error
    return rec


def model_id(weights_path) -> str:
    """``name@sha256[:16]`` of a weight file: the model as the journal records it."""
    return f"{Path(weights_path).name}@{sha256_of(weights_path)[:16]}"


# --------------------------------------------------------------------------------------------
# generic map for npdgru eval
# --------------------------------------------------------------------------------------------


def map_ordered(fn, args: list, *, jobs: int | None = None, scheduler: str | None = None, on_done=None) -> list:
    """``[fn(a) for a in args]`` on a cluster (one task per argument), in the order of ``args``;
    ``on_done()`` after each. Worker failures propagate (an evaluation is all or nothing)."""
    out = [None] * len(args)
    with cluster(jobs=jobs, scheduler=scheduler) as client:
        stamp = f"{os.getpid()}-{time.time_ns()}"
        futures = {client.submit(fn, a, key=f"npdgru-{getattr(fn, '__name__', 'task')}-{stamp}-{k}", pure=False): k for k, a in enumerate(args)}
        for f in _as_completed(client, futures):
            out[futures[f]] = f.result()
            f.release()
            if on_done is not None:
                on_done()
    return out
