"""A misbehaving job home for tests: slow, renames done as copy + delete, and permanent errors.

Only paths under one folder (the job home) are affected; everything else (the model, pytest's own files,
pyarrow's local temp shards) runs at full speed. What is patched is what runner uses to write the job home:
`open` as seen by runner.storage and runner.jobdir, and os.replace / fsync / listdir / scandir / unlink / mkdir
/ link; with `eio`, also what it reads it with: builtins.open and io.open (pathlib's read_text / read_bytes)
for reads, os.stat / os.lstat (and so os.path.exists / isdir / lexists and pathlib's stat / exists / is_file /
is_dir), pyarrow.OSFile / memory_map (read modes) and pyarrow.parquet's read_table / ParquetFile / read_schema /
read_metadata (runner imports pyarrow inside functions, so the module attributes are what it calls). A patched
call runs the real ones it makes itself (realpath's lstat, pyarrow's own opens) without faults.

  * slow: every write, rename, fsync, delete and listing takes `slow` seconds (a Drive mount on a bad day);
  * copy_rename: os.replace copies the bytes to the destination, then deletes the source, as some FUSE / Drive
    mounts do; `kill` SIGKILLs the process at the N-th such rename into a sub-folder, after the copy and
    before the delete of the temp file ("after_copy"), or with half of the bytes copied ("mid_copy");
  * fail: an errno name (EROFS, ENOSPC): every write, rename, delete and mkdir fails with it, from the start
    or (`fail_from` = a sub-folder) once a file has been written into that sub-folder (a disk that fills up);
  * eio: the chance that a listing of, or a read or stat of a file in, one of the sub-folders `eio_dirs` ("."
    for the folder itself: job.json, its backup, verified.json, stats.json, the sub-folders' own entries...)
    fails with a transient EIO or ENOTCONN (a Drive mount dropping a request), a missing file's stat too (an
    existence check). Each failure is transient: the next access of the same kind (list, read, stat) to the
    same path succeeds. `eio_stat`: another chance for stats (runner makes several for a read: the same rate
    would make most failures stats). `eio_seed` seeds the choices; each failure is appended to `eio_log` as a
    line "ERRNO KIND PATH";
  * retry_delays: runner.storage.RETRY_DELAYS for the process (short ones, so that many transient errors cost
    a test little time).

In-process: `FsFaults(home, slow=0.25).install(monkeypatch)`. In a worker process: run this file as
the program, with the settings as JSON in $RUNNER_TEST_FSFAULTS (`command(...)` builds both):
`python tests/fsfaults.py --home H work ...` installs the faults, then runs the `runner` command.
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow
import pyarrow.parquet

ENV = "RUNNER_TEST_FSFAULTS"
HERE = Path(__file__).resolve()
# the real calls, taken once (a second FsFaults in the process must not wrap the first one's patches)
OS_CALLS = ("replace", "fsync", "listdir", "scandir", "unlink", "mkdir", "link", "stat", "lstat")
REAL = {
    **{n: getattr(os, n) for n in OS_CALLS},
    "open": builtins.open,
    **{n: getattr(pyarrow, n) for n in ("OSFile", "memory_map")},
    **{n: getattr(pyarrow.parquet, n) for n in ("read_table", "ParquetFile", "read_schema", "read_metadata")},
}
_INSIDE = threading.local()  # `on` while a patched call runs: the calls it makes itself go to the real ones


def _patched(name: str):
    """A patched call: inside another one of this thread (realpath's lstat, pyarrow's own opens) it is the real
    call, so that faults land only on runner's own calls and never recurse."""

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if getattr(_INSIDE, "on", False):
                return REAL[name](*args, **kwargs)
            _INSIDE.on = True
            try:
                return method(self, *args, **kwargs)
            finally:
                _INSIDE.on = False

        return call

    return wrap


class FsFaults:
    def __init__(
        self, root, *, slow: float = 0.0, copy_rename: bool = False, kill: dict | None = None,
        fail: str | None = None, fail_from: str | None = None, eio: float = 0.0,
        eio_dirs: tuple[str, ...] = ("done", "claims", "shards"), eio_seed: int = 0, eio_log: str | None = None,
        eio_stat: float | None = None, retry_delays: list[float] | None = None,
    ):  # fmt: skip
        self.root = os.path.realpath(root)
        self.eio, self.eio_dirs, self.eio_seed, self.eio_log = eio, tuple(eio_dirs), eio_seed, eio_log
        self.retry_delays = retry_delays
        self.eio_stat = eio if eio_stat is None else eio_stat
        self.eio_rng = random.Random(eio_seed)
        # (kind, path) whose last access failed: the next one succeeds
        self.eio_failed: set[tuple[str, str]] = set()
        self.eio_count = 0
        self.slow, self.copy_rename, self.kill = slow, copy_rename, kill
        self.fail = getattr(errno, fail) if fail else None
        self.fail_from = fail_from
        self.failing = fail is not None and fail_from is None
        self.slowed = 0  # operations that were slowed down
        self.renames: dict[str, int] = {}  # copy-renames per destination sub-folder
        self._lock = threading.Lock()
        self.real = REAL
        self.real_open = REAL["open"]

    def settings(self) -> str:
        fail = errno.errorcode[self.fail] if self.fail else None
        return json.dumps({"root": self.root, "slow": self.slow, "copy_rename": self.copy_rename,
                           "kill": self.kill, "fail": fail, "fail_from": self.fail_from, "eio": self.eio,
                           "eio_dirs": list(self.eio_dirs), "eio_seed": self.eio_seed, "eio_stat": self.eio_stat,
                           "eio_log": self.eio_log, "retry_delays": self.retry_delays})  # fmt: skip

    # --- which paths, and what happens to them -----------------------------------------------------------

    def _ours(self, path) -> bool:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        p = os.path.realpath(os.fsdecode(path))
        return p == self.root or p.startswith(self.root + os.sep)

    @staticmethod
    def _sub(path) -> str:
        """The name of the folder holding `path` (shards, done, or the job's own folder)."""
        return os.path.basename(os.path.dirname(os.path.realpath(os.fsdecode(path))))

    def _slow(self) -> None:
        if self.slow:
            with self._lock:
                self.slowed += 1
            time.sleep(self.slow)

    def _check_fail(self, path) -> None:
        if self.failing:
            raise OSError(self.fail, os.strerror(self.fail), os.fsdecode(path))

    def _transient(self, path, kind: str) -> None:
        """Fail this access ("list", "read" or "stat") once, at random, with EIO or ENOTCONN (see `eio`)."""
        rate = self.eio_stat if kind == "stat" else self.eio
        if not rate or isinstance(path, int) or not self._ours(path):
            return
        p = os.path.realpath(os.fsdecode(path))
        folder = p if kind == "list" else os.path.dirname(p)
        if folder == self.root:  # the job folder's own files (job.json, its backup, verified.json...): "."
            if "." not in self.eio_dirs:
                return
        elif os.path.dirname(folder) != self.root or os.path.basename(folder) not in self.eio_dirs:
            return
        with self._lock:
            if (kind, p) in self.eio_failed:
                self.eio_failed.discard((kind, p))  # the retry succeeds
                return
            if self.eio_rng.random() >= rate:
                return
            self.eio_failed.add((kind, p))
            self.eio_count += 1
            code = self.eio_rng.choice((errno.EIO, errno.ENOTCONN))
            if self.eio_log:
                with self.real_open(self.eio_log, "a") as f:
                    f.write(f"{errno.errorcode[code]} {kind} {p}\n")
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def _wrote(self, path) -> None:
        if self.fail_from is not None and self._sub(path) == self.fail_from:
            self.failing = True  # the disk is full from now on

    # --- the patched calls -------------------------------------------------------------------------------

    @_patched("open")
    def open(self, file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and self._ours(file) and any(c in mode for c in "wax+"):
            self._slow()
            self._check_fail(file)
        elif not isinstance(file, int):
            self._transient(file, "read")
        return self.real_open(file, mode, *args, **kwargs)

    @_patched("open")
    def open_read(self, file, mode="r", *args, **kwargs):
        """builtins.open / io.open for every other module: transient errors on reads (writes as they are)."""
        if not isinstance(file, int) and not any(c in mode for c in "wax+"):
            self._transient(file, "read")
        return self.real_open(file, mode, *args, **kwargs)

    @_patched("stat")
    def stat(self, path, *args, **kwargs):
        if not kwargs.get("dir_fd"):
            self._transient(path, "stat")
        return self.real["stat"](path, *args, **kwargs)

    @_patched("lstat")
    def lstat(self, path, *args, **kwargs):
        if not kwargs.get("dir_fd"):
            self._transient(path, "stat")
        return self.real["lstat"](path, *args, **kwargs)

    def _arrow_read(self, source, call):
        """A pyarrow reader of `source` (a path; a buffer or an open file as it is), the real one run by `call`."""
        if isinstance(source, (str, bytes, os.PathLike)):
            self._transient(source, "read")
        return call()

    @_patched("OSFile")
    def OSFile(self, path, mode="r", *args, **kwargs):  # noqa: N802 (pyarrow's name)
        if mode in ("r", "rb"):
            self._transient(path, "read")
        return self.real["OSFile"](path, mode, *args, **kwargs)

    @_patched("memory_map")
    def memory_map(self, path, mode="r", *args, **kwargs):
        if mode in ("r", "rb"):
            self._transient(path, "read")
        return self.real["memory_map"](path, mode, *args, **kwargs)

    @_patched("read_table")
    def read_table(self, source, *args, **kwargs):
        return self._arrow_read(source, lambda: self.real["read_table"](source, *args, **kwargs))

    @_patched("read_schema")
    def read_schema(self, where, *args, **kwargs):
        return self._arrow_read(where, lambda: self.real["read_schema"](where, *args, **kwargs))

    @_patched("read_metadata")
    def read_metadata(self, where, *args, **kwargs):
        return self._arrow_read(where, lambda: self.real["read_metadata"](where, *args, **kwargs))

    def parquet_file_class(self) -> type:
        """pyarrow.parquet.ParquetFile with its opening through the faults (a subclass: isinstance holds)."""
        faults, real = self, self.real["ParquetFile"]

        class ParquetFile(real):
            def __init__(self, source, *args, **kwargs):
                init = functools.partial(super().__init__, source, *args, **kwargs)
                if getattr(_INSIDE, "on", False):
                    return init()
                _INSIDE.on = True
                try:
                    faults._arrow_read(source, init)
                finally:
                    _INSIDE.on = False

        return ParquetFile

    @_patched("replace")
    def replace(self, src, dst, **kwargs):
        if not self._ours(dst):
            return self.real["replace"](src, dst, **kwargs)
        self._slow()
        self._check_fail(dst)
        if not self.copy_rename or os.path.isdir(src):
            self.real["replace"](src, dst, **kwargs)
        else:
            self._copy_then_delete(src, dst)
        self._wrote(dst)

    def _copy_then_delete(self, src, dst) -> None:
        sub = self._sub(dst)
        self.renames[sub] = self.renames.get(sub, 0) + 1
        kill = (
            self.kill
            if self.kill and self.kill["dir"] == sub and self.kill["nth"] == self.renames[sub]
            else None
        )
        with self.real_open(src, "rb") as a, self.real_open(dst, "wb") as b:
            data = a.read()
            if kill and kill["at"] == "mid_copy":
                b.write(data[: len(data) // 2])
                b.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            b.write(data)
        if kill:  # the destination is whole, the temp file is still there
            os.kill(os.getpid(), signal.SIGKILL)
        self.real["unlink"](src)

    @_patched("fsync")
    def fsync(self, fd):
        if self._ours(fd):
            self._slow()
        return self.real["fsync"](fd)

    @_patched("listdir")
    def listdir(self, path="."):
        if self._ours(path):
            self._slow()
            self._transient(path, "list")
        return self.real["listdir"](path)

    @_patched("scandir")
    def scandir(self, path="."):
        if self._ours(path):
            self._slow()
            self._transient(path, "list")
        return self.real["scandir"](path)

    @_patched("link")
    def link(self, src, dst, *args, **kwargs):
        if self._ours(dst):
            self._slow()
            self._check_fail(dst)
        return self.real["link"](src, dst, *args, **kwargs)

    @_patched("unlink")
    def unlink(self, path, *args, **kwargs):
        if self._ours(path):
            self._slow()
            self._check_fail(path)
        return self.real["unlink"](path, *args, **kwargs)

    @_patched("mkdir")
    def mkdir(self, path, *args, **kwargs):
        if self._ours(path):
            self._check_fail(path)
        return self.real["mkdir"](path, *args, **kwargs)

    def install(self, monkeypatch=None) -> FsFaults:
        """Patch the calls (through pytest's `monkeypatch` in a test, so that they are put back afterwards)."""
        import runner.jobdir
        import runner.storage

        patches = [(os, name, getattr(self, name)) for name in OS_CALLS[:7]] + [
            (runner.storage, "open", self.open),
            (runner.jobdir, "open", self.open),
        ]
        if self.eio or self.eio_stat:  # what runner reads the job folder with, everywhere else
            patches += [(os, "stat", self.stat), (os, "lstat", self.lstat), (builtins, "open", self.open_read),
                        (io, "open", self.open_read), (pyarrow, "OSFile", self.OSFile),
                        (pyarrow, "memory_map", self.memory_map), (pyarrow.parquet, "read_table", self.read_table),
                        (pyarrow.parquet, "ParquetFile", self.parquet_file_class()),
                        (pyarrow.parquet, "read_schema", self.read_schema),
                        (pyarrow.parquet, "read_metadata", self.read_metadata)]  # fmt: skip
        if self.retry_delays is not None:
            patches.append((runner.storage, "RETRY_DELAYS", tuple(self.retry_delays)))
        for obj, name, value in patches:
            if monkeypatch is not None:
                monkeypatch.setattr(obj, name, value, raising=False)
            else:
                setattr(obj, name, value)
        return self


class Unreadable(FsFaults):
    """Every read, stat and listing (`kinds`) of the paths in `bad` fails with `err` (EIO), retried or not (a file
    Drive cannot serve for hours), until it is renamed away or another file is renamed over it; the rest of the
    home reads as it is. `runner.storage.RETRY_DELAYS` is made short."""

    def __init__(self, root, bad, kinds=("read", "stat", "list"), err=errno.EIO):
        super().__init__(root, eio=1.0, retry_delays=[0.0, 0.0])
        self.bad, self.kinds, self.err = {os.path.realpath(p) for p in bad}, kinds, err

    def replace(self, src, dst, **kwargs):  # a file renamed away, or replaced by another: a new file reads
        self.bad -= {os.path.abspath(src), os.path.abspath(dst)}
        return super().replace(src, dst, **kwargs)

    def _transient(self, path, kind):
        if (
            kind in self.kinds
            and not isinstance(path, int)
            and os.path.realpath(os.fsdecode(path)) in self.bad
        ):
            raise OSError(self.err, os.strerror(self.err), os.fsdecode(path))


def command(faults: FsFaults) -> tuple[tuple[str, ...], dict[str, str]]:
    """(prefix, env) for workers.start_worker: run a worker process with these faults installed."""
    return (str(HERE),), {ENV: faults.settings()}


def main() -> None:
    cfg = json.loads(os.environ[ENV])
    root = cfg.pop("root")
    FsFaults(root, **cfg).install()
    from runner.cli import cli

    cli(prog_name="runner")


if __name__ == "__main__":
    main()
