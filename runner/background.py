"""`runner work --background` and `runner watch`: work that leaves the notebook kernel (or the terminal) free.

`start` runs `runner work ARGS` as a detached process (its own session: closing the cell or the terminal does not
stop it) whose output goes to a log file in the job home's `logs/` folder, with a `.pid` file beside it holding
the worker's pid and its start time (so that a pid reused by another process, after a VM restart say, is not
taken for the worker).
`watch` prints one status line at a time, read from the job folder, until the job ends; it is what a notebook
cell shows while the worker runs. Both read and write only the home, so they work from any process.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import storage
from .errors import command
from .job_status import UNREADABLE
from .jobdir import (
    ENDED,
    JobState,
    _pid_start,
    _proc_is_ours,
    _stat_start,
    _stat_state,
    _threads_ended,
    default_home,
)
from .progress import counted

LOGS = "logs"
FINAL = {JobState.COMPLETED.value, JobState.FAILED.value, JobState.CANCELLED.value, JobState.BROKEN.value}
FOREIGN_PID_FILE_DAYS = 1  # another machine's pid file whose log is quiet this long is deleted
IDLE_POLLS = 3  # polls in a row with no live worker before `watch` says so and returns


@dataclass(frozen=True)
class BackgroundWorker:
    pid: int
    log: Path
    started: str | None = None  # the process's start time (/proc/PID/stat field 22), None without /proc

    @property
    def alive(self) -> bool:
        return _alive(self.pid, self.started)


def start(args: Sequence[str] = (), home: str | os.PathLike | None = None) -> BackgroundWorker:
    """Start `runner work ARGS` detached, its output in HOME/logs/work-TIME-RANDOM.log (a random suffix: two
    workers started in one second get their own log) and `PID START_TIME` in the .pid file beside it. Returns at
    once."""
    root = Path(home) if home is not None else default_home()
    logs = root / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"work-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"
    command = [sys.executable, "-m", "runner", "--home", str(root), "work", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the log as they are printed
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)  # fmt: skip
    _CHILDREN.append(proc)  # kept so that a finished child is reaped (not left a zombie) when polled
    started = _pid_start(proc.pid)
    # `PID START TAG`: the tag (storage.namespace_tag) says on which machine the pid means this process
    log.with_suffix(".pid").write_text(f"{proc.pid} {started or '-'} {storage.namespace_tag()}")
    return BackgroundWorker(proc.pid, log, started)


def running(home: str | os.PathLike | None = None) -> list[BackgroundWorker]:
    """Background workers of this home started on this machine whose process is alive. Deletes the pid files of
    this machine's workers that are not; another machine's (a home on Drive shared by two VMs) are left alone:
    their pid means nothing here (adversarial pass 111)."""
    root = Path(home) if home is not None else default_home()
    found, here = [], storage.namespace_tag()
    # (a listing that fails through the retries raises StorageError, not the OSError that ended `runner watch`)
    for pid_file in [root / LOGS / n for n in storage.listdir(root / LOGS) if n.endswith(".pid")]:
        try:  # (a passing error is read again: skipped, a live worker's job would read as run by no one)
            fields = storage.retry(pid_file.read_text, f"read {pid_file}").split()
            pid, started = int(fields[0]), (fields[1] if len(fields) > 1 and fields[1] != "-" else None)
        except (storage.StorageError, ValueError, IndexError):  # gone, denied, garbage, or failing for good
            continue
        # another machine's, or this one's before a reboot (a new VM)
        if len(fields) > 2 and fields[2] != here:
            if _quiet_for(pid_file.with_suffix(".log"), FOREIGN_PID_FILE_DAYS * 86400):
                _forget(pid_file)  # its worker has written nothing for days: gone
            continue
        worker = BackgroundWorker(pid, pid_file.with_suffix(".log"), started)
        if worker.alive:
            found.append(worker)
        else:
            _forget(pid_file)  # the log stays: it is what the worker said
    return found


def _forget(pid_file: Path) -> None:
    """Delete the pid file of a worker that is gone, where it can be: tidying only, so a home on a read-only
    mount, or a failing one, leaves it there (`runner watch` ended with a traceback on the OSError)."""
    with contextlib.suppress(OSError):
        pid_file.unlink(missing_ok=True)


def _quiet_for(log: Path, seconds: float) -> bool:
    """Whether `log` (a worker's output: a line at least every few minutes while it works) is missing or has
    not changed for `seconds`."""
    try:
        return time.time() - log.stat().st_mtime > seconds
    except FileNotFoundError:
        return True
    except OSError:
        return False


def in_home(home: str | os.PathLike | None, folder: Path) -> bool:
    """Whether the job in `folder` is one of the home's (which `runner work` runs), not in a folder of its own."""
    root = Path(home) if home is not None else default_home()
    return folder.resolve().parent == root.resolve()


def work_command(home: str | os.PathLike | None, folder: Path) -> str:
    """The command that runs the job in `folder`: `runner work` for one in the home, `runner work --job FOLDER`
    for one in a folder of its own (`-o DIR`), which `runner work` alone never runs."""
    return (
        command(home, "work") if in_home(home, folder) else command(None, "work", "--job", os.fspath(folder))
    )


def watch(
    job: str | os.PathLike,
    home: str | os.PathLike | None = None,
    every: float = 10.0,
    echo: Callable[[str], None] | None = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Look at the job's status every `every` seconds, printing a line when it changed (and once a minute
    otherwise), until it is completed, failed or cancelled, or no worker has run it for a few polls (then says
    how to start one). Returns the last JobStatus."""
    idle, said, quiet = 0, None, 0
    while True:
        s = _poll(job, home)
        line = status_line(s)
        # a line only when it says something new (workers beat every lease/4: a 10 s poll read the same figures
        # three times, its ETA frozen; pass 85), else once a minute to show it is still watching
        if echo and (line.split(" ", 1)[1] != said or (quiet + 1) * every >= 60 or s.state in FINAL):
            echo(line)
            said, quiet = line.split(" ", 1)[1], 0
        else:
            quiet += 1
        if s.state in FINAL:
            return s
        # (a poll that did not read names no workers: it counts neither way, the job's workers may go on)
        if s.state != UNREADABLE:
            idle = 0 if s.workers else _idle_polls(idle, home)
        if idle >= IDLE_POLLS:
            if echo:
                echo(
                    f"no worker is running job {s.id}: start one with `{work_command(home, Path(s.folder))}` (or add "
                    "--background)"
                )
            return s
        sleep(every)


def _poll(job: str | os.PathLike, home: str | os.PathLike | None) -> Any:
    """The job's status; `unreadable` where the job cannot even be found for now (the home's listing, or its
    folder's stat, failing through the retries): it ended the watch with "Error: cannot list HOME", though a poll
    that does not read counts neither way (pass 265). Its row names the job as given, nothing read for it."""
    from .api import status
    from .job_status import broken_status

    try:
        return status(job, home)
    except storage.StorageError as e:
        if not e.unreadable_for_now:
            raise
        shown = broken_status(
            Path(os.fspath(job)), f"{e} (read again at the next poll)", repairable=False, meta={}
        )
        return replace(shown, state=UNREADABLE)


def _idle_polls(idle: int, home: str | os.PathLike | None) -> int:
    """Polls in a row with no live worker, after one whose status names none: `idle` where the home's logs/
    does not list through the retries (whether a background worker runs is not known: it counts neither way;
    it ended `runner watch` with a traceback of the OSError)."""
    try:
        return 0 if running(home) else idle + 1
    except storage.StorageError:
        return idle


def status_line(s: Any) -> str:
    """One line of a job's status, for a log or a notebook cell."""
    tps = f"{s.tokens_per_second:,.1f} tok/s" if s.tokens_per_second else "- tok/s"
    # (workers stopped on this machine are counted apart: "2 workers (1 stopped)")
    stopped = s.workers_stopped
    workers = f" | {counted(len(s.workers), 'workers')}" + (f" ({stopped} stopped)" if stopped else "")
    errors = f" | {counted(s.errors, 'errors')}" if s.errors else ""
    # why it failed, once it has ended; what did not read, while the job does not
    why = f" | {s.message}" if (s.state in FINAL or s.state == UNREADABLE) and s.message else ""
    return (f"{time.strftime('%H:%M:%S')} {s.id} {s.state}: {s.done_text()} | {tps} | ETA {s.eta}"
            f"{errors}{workers if s.workers else ''}{why}")  # fmt: skip


def _alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` is still the worker that was started. Where /proc is this process's (jobdir._proc_is_ours)
    the process must not have ended (a zombie whose threads all ended, as jobdir's owners are judged) and must have
    the recorded start time; a pid file without one (an older runner's) must name a `runner work` process.
    Elsewhere (no /proc, or another PID namespace's, whose /proc/PID is another process) kill(pid, 0) is all
    there is."""
    for proc in _CHILDREN:
        if proc.pid == pid:
            return proc.poll() is None
    # (alive where it exists, someone else's too: /proc still tells whether it is our worker)
    if not storage.pid_exists(pid):
        return False
    if not _proc_is_ours():
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process went away meanwhile
        return False
    # a zombie answers kill(0) but is finished; not one whose other threads run on
    if _stat_state(stat) in ENDED and _threads_ended(pid):
        return False
    if started is not None:
        return _stat_start(stat) == started
    try:  # an older pid file: the pid counts only while it is a `runner ... work` process
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return b"runner" in argv and b"work" in argv


_CHILDREN: list[subprocess.Popen] = []
