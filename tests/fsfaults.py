"""A misbehaving job home for tests: slow, renames done as copy + delete, and permanent errors.

Only paths under one folder (the job home) are affected; everything else (the model, pytest's own files,
pyarrow's local temp shards) runs at full speed. What is patched is what runner uses to write the job home:
`open` as seen by runner.storage and runner.jobdir, and os.replace / fsync / listdir / scandir / unlink / mkdir
/ link.

  * slow: every write, rename, fsync, delete and listing takes `slow` seconds (a Drive mount on a bad day);
  * copy_rename: os.replace copies the bytes to the destination, then deletes the source, as some FUSE / Drive
    mounts do; `kill` SIGKILLs the process at the N-th such rename into a sub-folder, after the copy and
    before the delete of the temp file ("after_copy"), or with half of the bytes copied ("mid_copy");
  * fail: an errno name (EROFS, ENOSPC): every write, rename, delete and mkdir fails with it, from the start
    or (`fail_from` = a sub-folder) once a file has been written into that sub-folder (a disk that fills up);
  * eio: the chance that a listing of, or a read of a file in, one of the sub-folders `eio_dirs` ("." for the
    folder itself: job.json, its backup, verified.json, stats.json...) fails with a
    transient EIO or ENOTCONN (a Drive mount dropping a request). Each failure is transient: the next access
    to the same path succeeds. `eio_seed` seeds the choices; each failure is appended as a line to `eio_log`;
  * retry_delays: runner.storage.RETRY_DELAYS for the process (short ones, so that many transient errors cost
    a test little time).

In-process: `FsFaults(home, slow=0.25).install(monkeypatch.setattr)`. In a worker process: run this file as
the program, with the settings as JSON in $RUNNER_TEST_FSFAULTS (`command(...)` builds both):
`python tests/fsfaults.py --home H work ...` installs the faults, then runs the `runner` command.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

ENV = "RUNNER_TEST_FSFAULTS"
HERE = Path(__file__).resolve()


class FsFaults:
    def __init__(
        self, root, *, slow: float = 0.0, copy_rename: bool = False, kill: dict | None = None,
        fail: str | None = None, fail_from: str | None = None, eio: float = 0.0,
        eio_dirs: tuple[str, ...] = ("done", "claims", "shards"), eio_seed: int = 0, eio_log: str | None = None,
        retry_delays: list[float] | None = None,
    ):  # fmt: skip
        self.root = os.path.realpath(root)
        self.eio, self.eio_dirs, self.eio_seed, self.eio_log = eio, tuple(eio_dirs), eio_seed, eio_log
        self.retry_delays = retry_delays
        self.eio_rng = random.Random(eio_seed)
        self.eio_failed: set[str] = set()  # paths whose last access failed: the next one succeeds
        self.eio_count = 0
        self.slow, self.copy_rename, self.kill = slow, copy_rename, kill
        self.fail = getattr(errno, fail) if fail else None
        self.fail_from = fail_from
        self.failing = fail is not None and fail_from is None
        self.slowed = 0  # operations that were slowed down
        self.renames: dict[str, int] = {}  # copy-renames per destination sub-folder
        self._lock = threading.Lock()
        self.real = {
            n: getattr(os, n) for n in ("replace", "fsync", "listdir", "scandir", "unlink", "mkdir", "link")
        }
        self.real_open = builtins.open

    def settings(self) -> str:
        fail = errno.errorcode[self.fail] if self.fail else None
        return json.dumps({"root": self.root, "slow": self.slow, "copy_rename": self.copy_rename,
                           "kill": self.kill, "fail": fail, "fail_from": self.fail_from, "eio": self.eio,
                           "eio_dirs": list(self.eio_dirs), "eio_seed": self.eio_seed,
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

    def _transient(self, path, listing: bool) -> None:
        """Fail this read of the done-set once, at random, with EIO or ENOTCONN (see `eio`)."""
        if not self.eio or isinstance(path, int) or not self._ours(path):
            return
        p = os.path.realpath(os.fsdecode(path))
        folder = p if listing else os.path.dirname(p)
        if folder == self.root:  # the job folder's own files (job.json, its backup, verified.json...): "."
            if "." not in self.eio_dirs:
                return
        elif os.path.dirname(folder) != self.root or os.path.basename(folder) not in self.eio_dirs:
            return
        with self._lock:
            if p in self.eio_failed:
                self.eio_failed.discard(p)  # the retry succeeds
                return
            if self.eio_rng.random() >= self.eio:
                return
            self.eio_failed.add(p)
            self.eio_count += 1
            code = self.eio_rng.choice((errno.EIO, errno.ENOTCONN))
            if self.eio_log:
                with self.real_open(self.eio_log, "a") as f:
                    f.write(f"{errno.errorcode[code]} {'list' if listing else 'read'} {p}\n")
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def _wrote(self, path) -> None:
        if self.fail_from is not None and self._sub(path) == self.fail_from:
            self.failing = True  # the disk is full from now on

    # --- the patched calls -------------------------------------------------------------------------------

    def open(self, file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and self._ours(file) and any(c in mode for c in "wax+"):
            self._slow()
            self._check_fail(file)
        elif not isinstance(file, int):
            self._transient(file, listing=False)
        return self.real_open(file, mode, *args, **kwargs)

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

    def fsync(self, fd):
        if self._ours(fd):
            self._slow()
        return self.real["fsync"](fd)

    def listdir(self, path="."):
        if self._ours(path):
            self._slow()
            self._transient(path, listing=True)
        return self.real["listdir"](path)

    def scandir(self, path="."):
        if self._ours(path):
            self._slow()
            self._transient(path, listing=True)
        return self.real["scandir"](path)

    def link(self, src, dst, *args, **kwargs):
        if self._ours(dst):
            self._slow()
            self._check_fail(dst)
        return self.real["link"](src, dst, *args, **kwargs)

    def unlink(self, path, *args, **kwargs):
        if self._ours(path):
            self._slow()
            self._check_fail(path)
        return self.real["unlink"](path, *args, **kwargs)

    def mkdir(self, path, *args, **kwargs):
        if self._ours(path):
            self._check_fail(path)
        return self.real["mkdir"](path, *args, **kwargs)

    def install(self, monkeypatch=None) -> FsFaults:
        """Patch the calls (through pytest's `monkeypatch` in a test, so that they are put back afterwards)."""
        import runner.jobdir
        import runner.storage

        patches = [(os, name, getattr(self, name)) for name in self.real] + [
            (runner.storage, "open", self.open),
            (runner.jobdir, "open", self.open),
        ]
        if self.retry_delays is not None:
            patches.append((runner.storage, "RETRY_DELAYS", tuple(self.retry_delays)))
        for obj, name, value in patches:
            if monkeypatch is not None:
                monkeypatch.setattr(obj, name, value, raising=False)
            else:
                setattr(obj, name, value)
        return self


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
