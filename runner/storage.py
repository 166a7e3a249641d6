"""File-system primitives for the job home, written for a Google Drive mount that misbehaves.

Everything that writes into a job folder goes through here:
  * `atomic_write` writes a small file through a temp name + rename, so a reader sees all of it or none;
  * `publish` copies a finished local file into the job home the same way (write locally first, so a slow
    or failing mount never holds a half-built Parquet file);
  * `retry` re-runs an operation on transient errors (EIO, ENOTCONN "Transport endpoint is not connected",
    EAGAIN, ...) with exponential backoff, and gives up with a clear `StorageError` on anything else.
Temp files start with "." so folder listings that look for results never see them.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import RunnerError
from .faults import fault_point

T = TypeVar("T")

TRANSIENT = {errno.EIO, errno.ENOTCONN, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}
RETRY_DELAYS = (0.2, 0.5, 1, 2, 4, 8, 15, 30)  # about a minute in all: long enough for Drive to come back


# Something of the wrong kind stands where runner reads or writes (a folder where a file belongs, a file where a
# folder belongs, a link loop): that job's folder is damaged, not the home; the job is broken, the others run.
DAMAGED = {errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ELOOP}
DENIED = {errno.EACCES, errno.EPERM}  # this user may not: the folder is another's, or its permissions say no
DENIED_HINT = "this user may not read or write it: see who owns it and its permissions (`ls -ld`)"


class StorageError(RunnerError):
    """The job home cannot be written or read (after retries for transient errors). `errno`: the OS error's.
    `local`: not the job home but this machine's own temp folder (where shards are written first)."""

    def __init__(
        self, message: str, errno_: int | None = None, damaged: bool | None = None, local: bool = False
    ):
        super().__init__(message)
        self.errno = errno_
        self._damaged = damaged
        self.local = local

    @property
    def unreadable_for_now(self) -> bool:
        """A transient error that lasted through the retries (a mount failing for a minute): nothing damaged,
        and a later look may succeed (`runner status` says `unreadable`; `runner work` runs the other jobs and
        stops on it when nothing else is left)."""
        return not self.damaged and self.errno in TRANSIENT

    @property
    def repairable(self) -> bool:
        """Whether `runner repair` can help: not where this user is denied (another user's folder, umask 077);
        the folder's owner or permissions must change first (`DENIED_HINT`)."""
        return self.errno not in DENIED

    @property
    def damaged(self) -> bool:
        """The error says one job folder's layout is damaged (DAMAGED, or said so), not that the home is failing."""
        return self._damaged if self._damaged is not None else self.errno in DAMAGED


def retry(op: Callable[[], T], what: str, delays: tuple[float, ...] | None = None) -> T:
    """Run `op`, retrying transient OS errors with backoff (RETRY_DELAYS); raise StorageError naming `what`
    otherwise. A wait that lasts is said on stderr (`_say_waiting`), so a command is not taken for hung. Tried
    once only inside `at_once`, and inside `one_look` where `what` already failed through the retries."""
    delays = RETRY_DELAYS if delays is None else delays
    look, missed = _LOOK.get(), _AT_ONCE.get()
    if missed is not None or (look is not None and what in look):
        delays = ()
    for attempt in range(len(delays) + 1):
        try:
            return op()
        except OSError as e:
            if e.errno in TRANSIENT and attempt < len(delays):
                if sum(delays[:attempt]) < SAY_WAITING_AFTER <= sum(delays[: attempt + 1]):
                    _say_waiting(what, e, sum(delays[attempt:]))
                time.sleep(delays[attempt])
                continue
            if e.errno in TRANSIENT and missed is not None:
                missed.append(what)
            elif e.errno in TRANSIENT and look is not None:
                look.add(what)
            denied = f"; {DENIED_HINT}" if e.errno in DENIED else ""
            raise StorageError(f"cannot {what}: {e.strerror or e} (errno {e.errno}){denied}", e.errno) from e
    raise AssertionError("unreachable")


# What `retry` calls the reads that failed through the retries in this look at the jobs (`one_look`), and those
# that failed in their one try (`at_once`); None outside one.
_LOOK: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("runner_look", default=None)
_AT_ONCE: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("runner_at_once", default=None)


@contextlib.contextmanager
def one_look() -> Iterator[set[str]]:
    """Around a read-only look at jobs (`runner status`, a poll of `runner watch`): what failed through the
    retries once is tried once more at most, not waited for again, when the look reads it again. A job.json
    Drive could not serve was waited for 2 to 3 times a minute, read again for the broken job's id, name and
    model (adversarial pass 269). Inside another look: that one's."""
    if (look := _LOOK.get()) is not None:
        yield look
        return
    look = set()
    token = _LOOK.set(look)
    try:
        yield look
    finally:
        _LOOK.reset(token)


@contextlib.contextmanager
def at_once() -> Iterator[list[str]]:
    """Inside it, each read is tried once, not retried: what failed for now (a transient error) is listed in
    what it yields, for the caller to read again through the retries only where it needs it."""
    missed: list[str] = []
    token = _AT_ONCE.set(missed)
    try:
        yield missed
    finally:
        _AT_ONCE.reset(token)


SAY_WAITING_AFTER = 3.0  # seconds of retrying one operation before the wait is said (a blip is not)
SAY_WAITING_EVERY = 60.0  # and then at most once a minute (a status reading many files of a failing mount)
_said_waiting_at: list[float] = []


def _say_waiting(what: str, e: OSError, left: float) -> None:
    """One stderr line for a file system that keeps failing: `runner status` on a Drive mount that dropped
    would otherwise say nothing for a minute or two."""
    now = time.monotonic()
    if _said_waiting_at and now - _said_waiting_at[-1] < SAY_WAITING_EVERY:
        return
    _said_waiting_at.append(now)
    print(f"[runner] the file system is not answering: cannot {what} yet ({e.strerror or e}, errno {e.errno}); "
          f"trying again for up to {left:.0f} s", file=sys.stderr, flush=True)  # fmt: skip


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (files created, linked or renamed into it) survive a power cut; a file system
    that cannot open a folder (or sync one) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some file systems (and Windows) cannot open a directory; the rename is still done
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: Path) -> str:
    """A fresh temp name beside `target`, as a plain string: pathlib (3.11) interns every path component it
    parses, so a long-running worker that made a Path of each unique temp name would grow the interpreter's
    interned-string table for ever."""
    folder, name = os.path.split(os.fspath(target))
    return os.path.join(folder, f"{temp_name_stem(name)}.{uuid.uuid4().hex[:8]}.tmp")


def owned_temp_name(target: str | os.PathLike) -> str:
    """A temp name beside `target` that says which process writes it, `.{name}.{PID}-{TAG}.{8 hex}.tmp`
    (`namespace_tag`): whether its writer is gone can be told from the name alone (`OWNED_TEMP`, `writer_gone`),
    so a later writer of the same file removes it at once (`remove_stale_temps_of`), not minutes later. For what
    is written outside job folders (exports, a submit's temp folder)."""
    folder, name = os.path.split(os.fspath(target))
    return os.path.join(
        folder, f"{temp_name_stem(name)}.{os.getpid()}-{namespace_tag()}.{uuid.uuid4().hex[:8]}.tmp"
    )


DRIVE = "/content/drive"  # where a Colab notebook mounts Google Drive


def on_colab() -> bool:
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def refuse_unmounted_drive(*paths: str | os.PathLike | None) -> None:
    """On Colab, a path under /content/drive before Drive is mounted there: RunnerError. Folders made there are
    on the VM's own disk, lost with it, and drive.mount then refuses the mount point, no longer empty."""
    if not on_colab() or os.path.ismount(DRIVE):
        return
    for path in paths:
        if path is not None and Path(path).resolve().is_relative_to(DRIVE):
            raise RunnerError(f"Google Drive is not mounted at {DRIVE}, so {Path(path).resolve()} would be on this "
                              "VM's own disk, lost with it (and drive.mount would then refuse the folder): mount "
                              f"it first, `from google.colab import drive; drive.mount('{DRIVE}')`")  # fmt: skip


NAME_MAX = 255  # bytes in one file name (Linux, and Drive's mount)
TEMP_ADDS = 32  # bytes a temp name adds to its stem at most: ".PID-TAG" (7 + 8 digits), ".8 hex", ".tmp"


def temp_name_stem(name: str) -> str:
    """The start of the temp names of a file called `name`: `.{name}`, or, for a name too long to take what a
    temp name adds (an export `--to` a legal 240-byte name failed "File name too long"), its start and a digest
    of all of it, so that temps of two long names that start alike stay apart."""
    stem = f".{name}"
    encoded = os.fsencode(stem)
    if len(encoded) + TEMP_ADDS <= NAME_MAX:
        return stem
    # cut in bytes, as the limit counts them; a character the cut splits is left out (half of one made a name
    # that is not UTF-8, which pyarrow refused with a traceback: review pass 112)
    cut = encoded[: NAME_MAX - TEMP_ADDS - 9].decode("utf-8", "ignore")
    return f"{cut}~{hashlib.sha1(os.fsencode(name)).hexdigest()[:8]}"


OWNED_TEMP = re.compile(
    r"(\..+)\.(\d+)-([0-9a-f]{8})\.[0-9a-f]{8}\.tmp"
)  # (.name, PID, TAG): `owned_temp_name`


def writer_gone(owned: re.Match[str]) -> bool:
    """Whether the process an `OWNED_TEMP` name names is provably gone: it ran on this boot and PID namespace
    (its TAG) and its pid is free (a reused pid reads as alive)."""
    return owned.group(3) == namespace_tag() and not pid_exists(int(owned.group(2)))


def is_temp_name(name: str) -> bool:
    """A name `temp_name` (or `owned_temp_name`) makes: `.{name}.{8 hex}.tmp`."""
    parts = name.rsplit(".", 2)
    return name.startswith(".") and len(parts) == 3 and parts[2] == "tmp" and len(parts[1]) == 8


def remove_stale_temps_of(target: str | os.PathLike, max_age: float = 600.0) -> int:
    """Delete the temp files of `target` beside it that no live writer of the same file holds (an export killed
    mid-way): an `owned_temp_name` whose process is gone from this machine at once, any other untouched for
    `max_age` seconds (a live writer's temp file changes as it writes). Best effort: what cannot be listed or
    removed stays."""
    folder, name = os.path.split(os.path.abspath(os.fspath(target)))
    removed, now = 0, time.time()
    try:
        with os.scandir(folder) as entries:
            stale = [
                e.path for e in entries
                if is_temp_name(e.name) and e.is_file(follow_symlinks=False)
                and _left_behind(e.name, temp_name_stem(name), now - e.stat(follow_symlinks=False).st_mtime, max_age)
            ]  # fmt: skip
        for path in stale:
            os.unlink(path)
            removed += 1
    except OSError:
        pass
    return removed


def _left_behind(temp: str, of: str, age: float, max_age: float) -> bool:
    """Whether the temp file named `temp` is a left-behind one of the file whose `temp_name_stem` is `of`:
    `temp_name`'s, older than `max_age`; `owned_temp_name`'s, also when its process is gone (`writer_gone`)."""
    if temp.rsplit(".", 2)[0] == of:
        return age > max_age
    owned = OWNED_TEMP.fullmatch(temp)
    if owned is None or owned.group(1) != of:
        return False
    return writer_gone(owned) or age > max_age


# --- this process: which machine and PID namespace it runs in ----------------------------------------------

# where the OS has no PID namespaces, one pid space per boot (`pid_namespace`)
NO_PID_NAMESPACES = "none"
_BSD = ("freebsd", "netbsd", "openbsd", "dragonfly")
# this process's stand-in for `namespace_tag` where the machine cannot be named: no other process shares it
_PROCESS_TAG = uuid.uuid4().hex[:8]


def boot_id() -> str | None:
    """A name of this boot of this machine, none other's: Linux's boot_id, macOS's kern.bootsessionuuid, on a BSD
    kern.boottime with the host name; None where none can be read (no /proc, a sandbox, another OS)."""
    linux = _read_boot_id()
    if linux is not None or sys.platform.startswith("linux"):
        return linux
    if sys.platform == "darwin":
        session = _sysctl("kern.bootsessionuuid")
        return session.rstrip(b"\0").decode("ascii", "replace") if session else None
    if sys.platform.startswith(_BSD):
        booted = _sysctl("kern.boottime")
        return f"{booted.hex()}@{socket.gethostname()}" if booted else None
    return None


def _read_boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux's /proc/self/ns/pid); `NO_PID_NAMESPACES` on macOS and the BSDs,
    whose pids are one per boot; None where it cannot be told (a Linux without /proc)."""
    linux = _read_pid_namespace()
    if linux is not None or not sys.platform.startswith(("darwin", *_BSD)):
        return linux
    return NO_PID_NAMESPACES


def _read_pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@functools.cache
def _sysctl(name: str) -> bytes | None:
    """The value of sysctl `name` as bytes (sysctlbyname(3): macOS, the BSDs); None where it cannot be read."""
    import ctypes

    try:
        call = ctypes.CDLL(None).sysctlbyname
    except (OSError, AttributeError):
        return None
    call.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    call.restype = ctypes.c_int
    size = ctypes.c_size_t(0)
    if call(name.encode(), None, ctypes.byref(size), None, 0) != 0 or not 0 < size.value <= 4096:
        return None
    value = ctypes.create_string_buffer(size.value)
    if call(name.encode(), value, ctypes.byref(size), None, 0) != 0:
        return None
    return value.raw[: size.value]


def namespace_tag() -> str:
    """8 hex digits naming this boot and PID namespace: a pid recorded under the tag means the same process only
    under the same tag, and whoever compares a tag with this one may judge that pid here (`writer_gone`, a local
    shard folder, a submit's temp folder, a background worker's pid file). Where the boot or the namespace is
    unknown (no /proc, a sandbox), a tag of this process alone: every Mac and sandbox got one tag, so each of two
    machines sharing a home took the other's pids for its own, and removed the other's live temp files as left
    behind; only age tells of such a machine's leftovers now."""
    boot, pidns = boot_id(), pid_namespace()
    if not boot or not pidns:
        return _PROCESS_TAG
    return hashlib.sha256(f"{boot}\0{pidns}".encode()).hexdigest()[:8]


# os.kill(pid, 0) on Windows is TerminateProcess (pid_exists)
WINDOWS = os.name == "nt"


def pid_exists(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one of another user's too). Where that cannot be asked
    without harm, True (only the leases' heartbeats judge then): on Windows os.kill(pid, 0) is TerminateProcess,
    which would end the process it asks about."""
    if WINDOWS:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a pid past a C long, as a damaged temp name's: none such)
        return False
    except OSError:
        pass
    return True


def _replace_into(
    target: Path,
    fill: Callable[[Any], None],
    what: str,
    durable: bool = True,
    temp: Callable[[Path], str] = temp_name,
    check: Callable[[], None] | None = None,
) -> None:
    """Write `target` through a temp file (named by `temp`; `fill(fileobj)` writes the bytes) + fsync + rename,
    retried. `durable=False` skips the fsyncs: the file then survives the process being killed, not the machine.
    `check()`, run right before the rename, may raise to leave `target` as it is (the temp file is removed)."""

    def op() -> bool:
        tmp = temp(target)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            fault_point("before_replace")  # the new bytes are whole under the temp name; the old file stands
            if check is not None:
                check()
            try:
                os.replace(tmp, target)
            except FileNotFoundError:
                if not os.path.isdir(target.parent):
                    raise
                return False  # the temp file was tidied away as left behind (its writer was frozen): again
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        if durable:
            fsync_dir(target.parent)
        return True

    if not retry(op, what) and not retry(op, what):
        raise StorageError(
            f"cannot {what}: its temp file was removed twice while being written", errno.ENOENT
        )


def atomic_write(
    target: str | os.PathLike,
    data: bytes | str,
    durable: bool = True,
    check: Callable[[], None] | None = None,
) -> None:
    """Write `data` to `target` so that readers never see a partial file (`check`: as `_replace_into`'s)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    _replace_into(Path(target), lambda f: f.write(payload), f"write {target}", durable, check=check)


def write_json(
    target: str | os.PathLike, obj: Any, durable: bool = True, check: Callable[[], None] | None = None
) -> None:
    atomic_write(
        target, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", durable, check
    )


def _plain(path: str | os.PathLike) -> None:
    """Reads open plain files only: a FIFO would wait for a writer for ever, a socket or device is no file. Such
    a thing (or a folder) at `path` raises IsADirectoryError, as a folder there always did (a missing path is
    left to `open`)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a plain file"
        raise OSError(errno.EISDIR, f"not a file ({what})", str(path))


def _open_plain(path: str | os.PathLike, mode: str = "r", **kw: Any) -> Any:
    """`open` of a plain file (`_plain`). "No such file" while a plain file stands at `path` (a mount's flake:
    the folder lists it, the open misses it) is raised as a transient EIO, so that `retry` opens it again: read
    as gone, a commit's marker or shard dropped its rows from a reader's results (pass 102)."""
    _plain(path)
    try:
        return open(path, mode, **kw)
    except FileNotFoundError as e:
        if kind(path) == "file":
            raise OSError(errno.EIO, "listed but not found when opened", str(path)) from e
        raise


def listed_missing(folder: str | os.PathLike, e: FileNotFoundError) -> None:
    """A listing of `folder` said "No such file or directory": raised again as a transient EIO where a folder
    stands there (a mount's flake), so that `retry` lists it again; else nothing (the folder is not there).
    Taken for an empty folder, one such listing of done/ read a completed job as broken with every row missing,
    and its OpenAI export refused (adversarial pass 192)."""
    if kind(folder) == "dir":
        raise OSError(errno.EIO, "a folder there not found when listed", os.fspath(folder)) from e


def json_of_bytes(data: bytes) -> Any:
    """`json.loads` of `data` read as UTF-8, as runner writes its files: json.loads guesses UTF-16 or UTF-32 from
    the first bytes, so random bytes were said to be damaged "('utf-32-be' codec can't decode bytes ...)"
    (pass 197); a ValueError saying where they are not UTF-8 instead."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"it is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start}") from None
    return json.loads(text)


def read_json(path: str | os.PathLike) -> Any:
    def op() -> Any:
        with _open_plain(path, encoding="utf-8") as f:
            return json.load(f)

    return retry(op, f"read {path}")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a plain file (`_plain`), transient errors retried."""

    def op() -> bytes:
        with _open_plain(path, "rb") as f:
            return f.read()

    return retry(op, f"read {path}")


def publish(
    local: str | os.PathLike,
    target: str | os.PathLike,
    owned: bool = False,
    check: Callable[[], None] | None = None,
) -> None:
    """Copy a finished local file to `target` (temp name + rename); the local file is left in place. `owned`:
    through an `owned_temp_name` (a file outside job folders: `remove_stale_temps_of` tidies it after a kill).
    `check()`: as `_replace_into`'s."""

    def fill(dst: Any) -> None:
        with open(local, "rb") as src:
            dst.write(src.read(os.path.getsize(local) // 2))
            dst.flush()
            fault_point("mid_write")  # half the bytes are in the job home under the temp name
            shutil.copyfileobj(src, dst, 1024 * 1024)

    _replace_into(
        Path(target), fill, f"write {target}", temp=owned_temp_name if owned else temp_name, check=check
    )


@contextlib.contextmanager
def staged_publish(local: str | os.PathLike, target: str | os.PathLike) -> Iterator[Callable[[], None]]:
    """`publish` (`owned`) in two steps: `local` copied whole to a temp name beside `target` and flushed to the
    disk, then the call yielded renames it into place; the temp file goes on exit. The two files of an export are
    both staged so before either older one is removed (`openai_batch.export`): a full disk or a read-only folder
    fails before anything of the older pair is touched (they were removed first, then the copy failed: the older
    export gone and no new one; adversarial pass 266)."""
    target = Path(target)
    tmp = owned_temp_name(target)

    def copy() -> None:
        with open(local, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read(os.path.getsize(local) // 2))
            dst.flush()
            fault_point("mid_write")  # half the bytes are beside the target under the temp name
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        fault_point("before_replace")  # the new bytes are whole under the temp name; the old file stands

    def place() -> None:
        replace(tmp, target)
        fsync_dir(target.parent)

    try:
        retry(copy, f"write {target}")
        yield place
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


LOCK_TRIES = 200  # x LOCK_WAIT seconds: the longest `folder_lock` waits for another holder before going on
LOCK_WAIT = 0.05


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[bool]:
    """An advisory lock (flock) on `folder` for a short read-modify-write by processes of this machine; yields
    whether it was taken. A holder killed lets it go with its process (nothing is left to go stale); one frozen
    (SIGSTOP) holds it, so it is waited for LOCK_TRIES x LOCK_WAIT seconds and then gone on without. Where the
    system has no flock (Windows) or the file system refuses it, it is gone on without at once. Processes on
    other machines sharing a mount are not kept out (a mount's flock is this machine's only)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        yield _take(fd, fcntl)
    finally:
        os.close(fd)  # (lets the lock go)


def _take(fd: int, fcntl: Any) -> bool:
    for _ in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(LOCK_WAIT)
        except OSError:
            return False  # (no locks on this file system)
    return False


def json_checksum(record: dict[str, Any], field: str = "check") -> str:
    """sha256 of a JSON record's content but its own checksum `field`: written into it, so that a changed byte
    in it is noticed, not obeyed."""
    body = {k: v for k, v in record.items() if k != field}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def fails_its_check(record: dict[str, Any]) -> bool:
    """A record carrying a checksum (`check`, json_checksum) that does not match its content: damaged. One without
    (written by an earlier runner) is not judged here."""
    return "check" in record and record["check"] != json_checksum(record)


BLOCK = 1 << 20  # the bytes of a block (`file_sha256`'s `blocks`, `CheckedFile`)


def file_sha256(path: str | os.PathLike, blocks: list[bytes] | None = None) -> str:
    """The sha256 of the file at `path`; with `blocks`, each BLOCK of it is also digested there, in order, the
    list emptied first (a read tried again starts over; `CheckedFile` reads parts of the file against them)."""
    h = hashlib.sha256()
    if blocks is not None:
        blocks.clear()
    with _open_plain(path, "rb") as f:
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
            if blocks is not None:
                blocks.append(_block_digest(chunk))
    return h.hexdigest()


def _block_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ChangedUnderfoot(Exception):
    """A block of a file read by `CheckedFile` is not the one digested when the file was hashed whole."""


class CheckedFile(io.RawIOBase):
    """The file at `path` read as it was when hashed whole (`file_sha256(path, blocks)`): every block a read
    touches is read whole and checked against its digest (ChangedUnderfoot if it differs, or the size does).
    A worker reads each unit's rows of prompts.parquet so: bytes changed under unchanged times after its start
    hash (bit rot, a sync tool keeping times) are found, not computed from, without hashing the file per unit."""

    def __init__(self, path: str | os.PathLike, blocks: list[bytes]) -> None:
        self._f, self._blocks, self._read, self._at = open(path, "rb"), blocks, {}, 0
        self._size = os.fstat(self._f.fileno()).st_size
        if -(-self._size // BLOCK) != len(blocks):
            raise ChangedUnderfoot(f"{path}: {self._size:,} bytes, not as it was hashed")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = 0) -> int:
        self._at = offset + (0, self._at, self._size)[whence]
        return self._at

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")  # (by its bytes, whatever its items: an array of ints)
        n, at = max(0, min(len(out), self._size - self._at)), self._at
        while at < self._at + n:
            block = self._block(at // BLOCK)
            part = block[at % BLOCK : at % BLOCK + self._at + n - at]
            out[at - self._at : at - self._at + len(part)] = part
            at += len(part)
        self._at += n
        return n

    def _block(self, i: int) -> bytes:
        if i not in self._read:
            self._f.seek(i * BLOCK)
            data = self._f.read(BLOCK)
            if _block_digest(data) != self._blocks[i]:
                raise ChangedUnderfoot(f"{self._f.name}: bytes {i * BLOCK:,}.. changed since it was hashed")
            self._read[i] = data
        return self._read[i]

    def close(self) -> None:
        self._f.close()
        super().close()


def arrow_file(path: Any, mode: str = "rb") -> Any:
    """`path` as pyarrow takes it (anything else, a buffer, as it is). pyarrow encodes a path as UTF-8, and a
    name holding bytes that are not UTF-8 (which Python keeps as surrogates) raised UnicodeEncodeError from
    inside it (`runner results --to` such a name, a prompt file or a job home so named): such a path is opened
    here by its bytes. The file closes when pyarrow lets go of it."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    name = os.fspath(path)
    if is_text(name):
        return name
    import pyarrow as pa

    return pa.OSFile(os.fsencode(name), mode)


def is_text(value: str) -> bool:
    """Whether `value` encodes as UTF-8: no byte of a name that is not UTF-8, kept by Python as a surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_lines(path: str | os.PathLike, size: int = 1 << 20, digest: Any = None) -> Iterator[str]:
    """The lines of a plain UTF-8 text file, `size` bytes read at a time, each read retried (a retry opens the
    file again at the same offset): a transient error never cuts the file short, nor raises a raw OSError.
    `digest` (a hashlib object) is updated with every byte read, so that the caller can check what it read."""
    offset, rest = 0, b""
    while chunk := retry(lambda at=offset: _read_at(path, at, size), f"read {path}"):
        offset += len(chunk)
        if digest is not None:
            digest.update(chunk)
        *lines, rest = (rest + chunk).split(b"\n")
        yield from (line.decode("utf-8") for line in lines)
    if rest:
        yield rest.decode("utf-8")


def _read_at(path: str | os.PathLike, offset: int, size: int) -> bytes:
    with _open_plain(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def append_line(path: str | os.PathLike, line: str, only_writer: bool = False) -> None:
    """Append one line (a log or errors entry). A torn last line is tolerated by the readers. Only to a plain
    file (or none yet): opening a FIFO there would wait for a reader for ever, a socket fails.
    Retried as one write of the file's end: a try whose write landed though its reply was lost is not written
    again (an invalid row was listed twice in errors.jsonl: pass 49); `only_writer` (no other process appends
    to this file) also cuts off what a failed try left of the line before writing it again."""
    found = kind(path)
    if found not in (None, "file"):
        raise StorageError(f"cannot append to {path}: a {found} stands there, not a file", damaged=True)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    start: list[int] = []  # the file's size before the first try

    def op() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if not start:
                start.append(size)
            elif size > start[0]:  # an earlier try wrote some or all of the line before its error
                if _read_at(path, start[0], len(data)) == data:
                    return
                if only_writer:
                    os.ftruncate(fd, start[0])
                elif _read_at(path, size - 1, 1) != b"\n":  # (others append too: the torn piece is ended)
                    os.write(fd, b"\n")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    retry(op, f"append to {path}")


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """os.replace, transient errors retried; a rename that took effect though its reply was lost (the source
    gone, the target there at the retry) is done."""
    tries: list[int] = []

    def op() -> None:
        tries.append(1)
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            if len(tries) == 1 or os.path.lexists(src) or not os.path.lexists(dst):
                raise

    retry(op, f"rename {src} to {dst}")


def kind(path: str | os.PathLike) -> str | None:
    """What is at `path` without following a link: "file", "dir", "link", "other", or None when nothing is.
    Transient errors are retried and then raise StorageError: an unreadable mount never reads as "absent"."""
    import stat

    def op() -> str | None:
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            return "link"
        return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"

    return retry(op, f"read {path}")


def is_there(path: str | os.PathLike, test: Callable[[int], bool] | None = None) -> bool:
    """Whether something is at `path`, a link followed (and `test(its mode)`: stat.S_ISREG, S_ISDIR), as
    Path.exists / is_file / is_dir, but a read error raises (OSError) instead of saying False: from Python
    3.13 on those are os.path's, which say False of any error, so that a mount's transient EIO read as "no
    such file" and was never retried."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # (ValueError: a NUL in the name, as pathlib)
        return False
    return test is None or test(mode)


def kinds(folder: str | os.PathLike) -> dict[str, str]:
    """What each name in `folder` is, as `kind` says it, from one listing (not a stat per name: each is a
    round trip on a network mount); {} when there is no such folder. Transient errors are retried."""

    def of(entry: os.DirEntry) -> str:
        if entry.is_symlink():
            return "link"
        if entry.is_file(follow_symlinks=False):
            return "file"
        return "dir" if entry.is_dir(follow_symlinks=False) else "other"

    def op() -> dict[str, str]:
        try:
            with os.scandir(folder) as it:
                return {e.name: of(e) for e in it}
        except FileNotFoundError as e:
            listed_missing(folder, e)
            return {}
        except NotADirectoryError:
            return {}

    return retry(op, f"list {folder}")


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    retry(lambda: Path(path).unlink(missing_ok=True), f"delete {path}")


def ensure_dir(path: str | os.PathLike) -> None:
    """`path` is a folder (made if missing; its parent must be there). Transient errors retried: a folder that
    is there, on a mount that fails a moment, is never "cannot be written"."""
    retry(lambda: Path(path).mkdir(exist_ok=True), f"create {path}")


def listdir(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    return retry(lambda: sorted(os.listdir(p)) if p.is_dir() else [], f"list {p}")
