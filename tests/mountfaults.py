"""A job home whose mount goes away (or fills up, or turns read-only) at a chosen moment of a worker's run, or
whose job folder the user moves or deletes then: run this file as the program of a worker process, with the
settings as JSON in $RUNNER_TEST_MOUNT (`command(...)` builds both).

  * trigger: when it happens, "POINT:N" (the N-th visit of a named fault point, runner/faults.py) or
    "wrote:SUB:N" (the N-th file renamed into a sub-folder SUB of a job: done/ for a marker); `job` limits
    either to one job folder's name;
  * what: an errno name: from then on, the next `calls` accesses in the home fail with it (all of them,
    reads, listings and stats too, with `reads`: a Drive mount gone, ENOTCONN; writes alone otherwise: ENOSPC,
    EDQUOT, EROFS); `calls` = -1: for good. Or "move:DEST" / "delete": the job folder is renamed to DEST (a
    path) or deleted at once, by the user.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys

from fsfaults import REAL, FsFaults

ENV = "RUNNER_TEST_MOUNT"
HERE = os.path.abspath(__file__)
MODULES = ("runner.worker", "runner.storage", "runner.results", "runner.jobdir", "runner.cli")


class MountFaults(FsFaults):
    def __init__(self, root, trigger: str, what: str, calls: int = -1, reads: bool = False,
                 job: str | None = None, log: str | None = None, kill: bool = False, retry_delays=(0.01, 0.03, 0.1, 0.3, 0.6)):  # fmt: skip
        super().__init__(root, eio=1.0, retry_delays=list(retry_delays))
        self.trigger, self.what, self.calls, self.reads, self.job, self.log = (
            trigger,
            what,
            calls,
            reads,
            job,
            log,
        )
        self.visits, self.kill_after = 0, kill
        self.down = False
        self.failed = 0

    def _fire(self, where: str) -> None:
        if self.log:
            with self.real_open(self.log, "a") as f:
                f.write(f"fired {self.what} at {where}\n")
        if self.what.startswith("move:"):
            REAL["replace"](os.path.join(self.root, self.job), self.what[5:])
        elif self.what == "delete":
            shutil.rmtree(os.path.join(self.root, self.job))
        else:
            self.down = True
        if self.kill_after:  # the VM dies right then: every process of it, no `finally`
            os.kill(os.getpid(), signal.SIGKILL)

    def _count(self, where: str, job: str | None) -> None:
        if self.job is not None and job is not None and job != self.job:
            return
        self.visits += 1
        if self.visits == int(self.trigger.rsplit(":", 1)[1]):
            self._fire(where)

    def _fail(self, path) -> None:
        if not self.down or not self._ours(path):
            return
        if self.calls >= 0 and self.failed >= self.calls:
            self.down = False
            return
        self.failed += 1
        code = getattr(errno, self.what)
        raise OSError(code, os.strerror(code), os.fsdecode(path) if not isinstance(path, int) else str(path))

    def _transient(self, path, kind: str) -> None:
        if self.reads:
            self._fail(path)

    def _check_fail(self, path) -> None:
        self._fail(path)

    def _wrote(self, path) -> None:
        if not self.trigger.startswith("wrote:"):
            return
        sub = self.trigger.split(":")[1]
        real = os.path.realpath(os.fsdecode(path))
        if os.path.basename(os.path.dirname(real)) == sub:
            self._count(f"wrote {real}", os.path.basename(os.path.dirname(os.path.dirname(real))))

    def os_open(self, path, flags, *args, **kwargs):
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if not isinstance(path, int) and (self.reads or writes):
            self._fail(path)
        return REAL_OS_OPEN(path, flags, *args, **kwargs)

    def os_rename(self, src, dst, *args, **kwargs):
        self._fail(dst)
        return REAL_OS_RENAME(src, dst, *args, **kwargs)

    def fsync(self, fd):
        self._fail(fd)
        return REAL["fsync"](fd)

    def point(self, real):
        name = self.trigger.split(":")[0]

        def fault_point(point: str) -> None:
            real(point)
            if point == name:
                self._count(point, None)

        return fault_point

    def install(self, monkeypatch=None) -> MountFaults:
        super().install(monkeypatch)
        os.open, os.rename = self.os_open, self.os_rename
        if not self.trigger.startswith("wrote:"):
            for module in map(sys.modules.get, MODULES):
                module.fault_point = self.point(module.fault_point)
        return self


REAL_OS_OPEN, REAL_OS_RENAME = os.open, os.rename


def command(root, **settings) -> tuple[tuple[str, ...], dict[str, str]]:
    """(prefix, env) for workers.start_worker: a worker process with these faults installed."""
    return (HERE,), {ENV: json.dumps({"root": os.path.realpath(root), **settings})}


def main() -> None:
    import runner.cli

    for name in MODULES:
        __import__(name)
    cfg = json.loads(os.environ[ENV])
    MountFaults(cfg.pop("root"), **cfg).install()
    runner.cli.cli(prog_name="runner")


if __name__ == "__main__":
    main()
