"""An eventually consistent job home for adversarial tests: what ANOTHER process did shows late.

A Drive-like mount (FUSE with caching) is close-to-open consistent for none of its clients: each process sees
its own writes at once, but another's creates, deletes, renames and replaces only after a while. Modelled here
deterministically, by operation counts (never by sleeps):

  * every change a process makes under `root` (a create, a delete, a rename's source and target, a file written
    over) is appended to a shared journal, with a copy of the bytes a replaced file had;
  * a process that reads (a listing, stat/lstat/exists, an open for reading) first reads the journal's new
    lines; each change by another process stays unseen for `lag` of this process's own read operations, `lag`
    drawn per (observer, change) from a hash of (seed, observer, journal line, path under root) in
    [0, max_lag] (only a fraction `p` of changes lag at all): the same lags for the same `who`s and journal
    wherever the root is;
  * while a change to a path is unseen, the path reads as it was before it: a created file or folder is not
    listed and stat/open say "no such file"; a deleted or renamed-away entry is still listed (but stat and open
    of it say "no such file", as a mount whose listing is cached answers); a replaced file reads (and stats) as
    its previous bytes;
  * a process's own change to a path it sees at once, and no change another made before it (in journal order)
    ever shows over it.

Paths outside `root` pass straight through. The observer (`who`) is the process id unless given: a test may
make two StaleFs of one journal in one process, with other `who`s, and use their methods (open, listdir,
stat...) directly as two processes' views, without installing either.

Run as a wrapper program: `python tests/stalefs.py ARGS...` with $RUNNER_TEST_STALEFS = JSON settings
{"root", "journal", "seed", "max_lag", "p", "vm"} installs the view, then runs `runner ARGS...`; with "vm" true
the process also has a boot id and a host name of its own (as if on its own VM), so only heartbeats tell whether a
worker lives.
Unseen changes served are counted in the journal folder (`stale-WHO.txt`, rewritten every 5th one: a lower
bound), so a test can say that staleness was served at all.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import stat as stat_mod
import sys
import threading

ENV = "RUNNER_TEST_STALEFS"


class _Entry:
    """A DirEntry for a name the stale listing still shows (or a real one passed through)."""

    def __init__(self, folder: str, name: str, isdir: bool):
        self.name, self.path, self._isdir = name, os.path.join(folder, name), isdir

    def is_dir(self, follow_symlinks=True):
        return self._isdir

    def is_file(self, follow_symlinks=True):
        return not self._isdir

    def is_symlink(self):
        return False

    def stat(self, follow_symlinks=True):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory (stale listing)", self.path)

    def inode(self):
        return 0


class _Scan:
    def __init__(self, entries):
        self._entries = list(entries)

    def __iter__(self):
        return iter(self._entries)

    def __next__(self):  # pragma: no cover
        raise StopIteration

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def close(self):
        pass


class StaleFs:
    def __init__(self, root, journal, seed=0, max_lag=40, p=0.7, who=None):
        self.root = os.path.realpath(root)
        self.jdir = journal
        self.jpath = os.path.join(journal, "journal.jsonl")
        self.seed, self.max_lag, self.p = seed, max_lag, p
        self.pid = os.getpid() if who is None else who  # the observer: its own changes it sees at once
        self.real = {
            n: getattr(os, n)
            for n in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "link", "open", "listdir",
                      "scandir", "stat", "lstat")
        }  # fmt: skip
        self.real_open = builtins.open
        self.lock = threading.RLock()
        self.ops = 0  # read operations so far: the clock that unseen changes' lags count
        self.index = 0  # journal lines read so far
        self.saves = 0  # copies of replaced files so far (each its own name)
        self.offset = 0
        self.buf = b""
        self.pending: list[dict] = []  # others' changes not yet seen: {path, op, old, isdir, until}
        self.stale_served = 0
        self.inside = threading.local()
        os.makedirs(os.path.join(journal, "old"), exist_ok=True)

    # --- the journal --------------------------------------------------------------------------------------

    def _ours(self, path) -> str | None:
        if isinstance(path, int):
            return None
        try:
            p = os.path.abspath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return None
        return p if p == self.root or p.startswith(self.root + os.sep) else None

    def _append(self, rec: dict) -> None:
        rec["pid"] = self.pid
        line = (json.dumps(rec) + "\n").encode()
        fd = self.real["open"](self.jpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _save_old(self, path: str) -> str | None:
        """A copy of the file at `path` before it is written over (None: nothing, or not a file, there)."""
        try:
            st = self.real["lstat"](path)
        except OSError:
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        self.saves += 1  # (not the read count: two writes of a file between reads each keep their bytes)
        dst = os.path.join(
            self.jdir, "old", f"{self.pid}-{self.saves}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
        )
        try:
            with self.real_open(path, "rb") as src, self.real_open(dst, "wb") as out:
                out.write(src.read())
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:
            return None
        return dst

    def _lag(self, rec: dict, index: int) -> int:
        where = os.path.relpath(
            rec["path"], self.root
        )  # (not the absolute path: the same wherever the root is)
        h = hashlib.sha256(f"{self.seed}:{self.pid}:{index}:{where}".encode()).digest()
        if h[0] / 256 >= self.p:
            return 0
        return int.from_bytes(h[1:5], "big") % (self.max_lag + 1)

    def _refresh(self) -> None:
        self.ops += 1
        try:
            fd = self.real["open"](self.jpath, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.lseek(fd, self.offset, 0)
            chunk = b""
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunk += b
        finally:
            os.close(fd)
        self.offset += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self.index += 1
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec["pid"] == self.pid:
                # our own change: others' journaled before it are moot, though read only now, after it
                self._touched(rec["path"])
                continue
            lag = self._lag(rec, self.index)
            if lag:
                rec["until"] = self.ops + lag
                self.pending.append(rec)
        self.pending = [r for r in self.pending if r["until"] > self.ops]

    def _view(self, path: str) -> dict | None:
        """The earliest unseen change to `path` by another process (None: the path reads as it is)."""
        for r in self.pending:
            if r["path"] == path:
                return r
        return None

    def _count(self) -> None:
        self.stale_served += 1
        if self.stale_served % 5 == 1:
            try:
                with self.real_open(os.path.join(self.jdir, f"stale-{self.pid}.txt"), "w") as f:
                    f.write(str(self.stale_served))
            except OSError:
                pass

    def _touched(self, path: str) -> None:
        """Our own change to `path`: we see it at once (read-your-writes), so others' earlier ones are moot."""
        self.pending = [r for r in self.pending if r["path"] != path]

    # --- writes -------------------------------------------------------------------------------------------

    def _isdir(self, p: str) -> bool:
        try:
            return stat_mod.S_ISDIR(self.real["lstat"](p).st_mode)
        except OSError:
            return False

    def _exists(self, p: str) -> bool:
        try:
            self.real["lstat"](p)
            return True
        except OSError:
            return False

    def _rename(self, which, src, dst, *a, **kw):
        s, d = self._ours(src), self._ours(dst)
        if s is None and d is None:
            return self.real[which](src, dst, *a, **kw)
        with self.lock:
            isdir = s is not None and self._isdir(s)
            existed = d is not None and self._exists(d)
            old = self._save_old(d) if existed else None
            self.real[which](src, dst, *a, **kw)
            if s is not None:
                self._touched(s)
                self._append({"op": "remove", "path": s, "isdir": isdir})
            if d is not None:
                self._touched(d)
                self._append(
                    {"op": "replace" if existed else "create", "path": d, "old": old, "isdir": isdir}
                )

    def replace(self, src, dst, *a, **kw):
        return self._rename("replace", src, dst, *a, **kw)

    def rename(self, src, dst, *a, **kw):
        return self._rename("rename", src, dst, *a, **kw)

    def _remove(self, which, path, *a, **kw):
        p = self._ours(path)
        if p is None:
            return self.real[which](path, *a, **kw)
        with self.lock:
            isdir = self._isdir(p)
            self.real[which](path, *a, **kw)
            self._touched(p)
            self._append({"op": "remove", "path": p, "isdir": isdir})

    def unlink(self, path, *a, **kw):
        return self._remove("unlink", path, *a, **kw)

    def remove(self, path, *a, **kw):
        return self._remove("remove", path, *a, **kw)

    def rmdir(self, path, *a, **kw):
        return self._remove("rmdir", path, *a, **kw)

    def mkdir(self, path, *a, **kw):
        p = self._ours(path)
        if p is None:
            return self.real["mkdir"](path, *a, **kw)
        with self.lock:  # (a folder another made that we do not see yet: mkdir says it exists, as a mount's)
            self.real["mkdir"](path, *a, **kw)
            self._touched(p)
            self._append({"op": "create", "path": p, "isdir": True})

    def link(self, src, dst, *a, **kw):
        d = self._ours(dst)
        if d is None:
            return self.real["link"](src, dst, *a, **kw)
        with self.lock:
            self.real["link"](src, dst, *a, **kw)
            self._touched(d)
            self._append({"op": "create", "path": d, "isdir": False})

    def os_open(self, path, flags, *a, **kw):
        p = self._ours(path) if kw.get("dir_fd") is None else None
        if p is None:
            return self.real["open"](path, flags, *a, **kw)
        with self.lock:
            if flags & (os.O_WRONLY | os.O_RDWR):
                return self._opened_to_write(
                    p, flags & os.O_TRUNC, lambda: self.real["open"](path, flags, *a, **kw)
                )
            old = self._old_bytes_seen(p, path)
            return self.real["open"](old or path, flags, *a, **kw)

    def open(self, file, mode="r", *a, **kw):
        p = self._ours(file)
        if p is None:
            return self.real_open(file, mode, *a, **kw)
        with self.lock:
            if any(c in mode for c in "wxa+"):
                return self._opened_to_write(p, "w" in mode, lambda: self.real_open(file, mode, *a, **kw))
            old = self._old_bytes_seen(p, p)
            return self.real_open(old or file, mode, *a, **kw)

    def _opened_to_write(self, p, truncates, opening):
        """`opening()` of `p` for a write, journaled: a new file as created, a truncated one as replaced (its old
        bytes kept for the others' views)."""
        existed = self._exists(p)
        old = self._save_old(p) if existed and truncates else None
        handle = opening()
        if not existed or old:
            self._touched(p)
            self._append({"op": "replace" if existed else "create", "path": p, "old": old, "isdir": False})
        return handle

    def _old_bytes_seen(self, p, name):
        """For a read of `p`: the copy of its old bytes where this view still sees them, None where it sees the
        file as it is; FileNotFoundError (naming `name`) where this view does not see it yet, or still sees it
        gone."""
        self._refresh()
        v = self._view(p)
        if v is None:
            return None
        self._count()
        if v["op"] in ("create", "remove"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (stale)", name)
        return v.get("old") or None

    # --- reads --------------------------------------------------------------------------------------------

    def _stat(self, which, path, *a, **kw):
        p = self._ours(path) if kw.get("dir_fd") is None else None
        if p is None:
            return self.real[which](path, *a, **kw)
        with self.lock:
            self._refresh()
            v = self._view(p)
            if v is not None:
                self._count()
                if v["op"] in ("create", "remove"):
                    raise FileNotFoundError(errno.ENOENT, "No such file or directory (stale)", p)
                if v.get("old"):
                    return self.real["lstat"](v["old"])
            return self.real[which](path, *a, **kw)

    def stat(self, path, *a, **kw):
        return self._stat("stat", path, *a, **kw)

    def lstat(self, path, *a, **kw):
        return self._stat("lstat", path, *a, **kw)

    def _listing(self, path):
        """(real entries kept, names of stale ghosts with isdir) for a folder under root, or None."""
        p = self._ours(path)
        if p is None:
            return None
        self._refresh()
        v = self._view(p)
        if v is not None and v["op"] == "create":
            self._count()
            raise FileNotFoundError(errno.ENOENT, "No such file or directory (stale)", p)
        hide, ghosts = set(), {}
        for r in self.pending:
            if os.path.dirname(r["path"]) != p:
                continue
            name = os.path.basename(r["path"])
            if name in hide or name in ghosts:
                continue  # the earliest unseen change decides
            if r["op"] == "create":
                hide.add(name)
            elif r["op"] == "remove":
                ghosts[name] = r.get("isdir", False)
            else:
                hide.add("\0")  # a replace: listed either way
        return p, hide, ghosts

    def listdir(self, path="."):
        with self.lock:
            view = self._listing(path)
            names = self.real["listdir"](path)
            if view is None:
                return names
            _, hide, ghosts = view
            out = [n for n in names if n not in hide]
            extra = [n for n in ghosts if n not in out]
            if len(out) != len(names) or extra:
                self._count()
            return out + extra

    def scandir(self, path="."):
        with self.lock:
            view = self._listing(path)
            if view is None:
                return self.real["scandir"](path)
            p, hide, ghosts = view
            with self.real["scandir"](path) as it:
                real = list(it)
            out = [e for e in real if e.name not in hide]
            names = {e.name for e in out}
            extra = [_Entry(p, n, d) for n, d in ghosts.items() if n not in names]
            if len(out) != len(real) or extra:
                self._count()
            return _Scan(out + extra)

    def install(self) -> StaleFs:
        import runner.jobdir
        import runner.storage

        for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "link", "listdir", "scandir",
                     "stat", "lstat"):  # fmt: skip
            setattr(os, name, getattr(self, name))
        os.open = self.os_open
        builtins.open = self.open
        io.open = self.open
        for mod in (runner.storage, runner.jobdir):
            mod.open = self.open
        return self


def main() -> None:
    cfg = json.loads(os.environ[ENV])
    StaleFs(
        cfg["root"], cfg["journal"], cfg.get("seed", 0), cfg.get("max_lag", 40), cfg.get("p", 0.7)
    ).install()
    if cfg.get("vm"):  # each process as if on its own VM: only heartbeats tell whether a worker lives
        import socket

        import runner.storage

        fake = f"vm-{os.getpid()}"
        runner.storage.boot_id = lambda: fake
        socket.gethostname = lambda: fake  # (its worker ids and markers name it)
    from runner.cli import cli

    sys.argv[0] = "runner"
    cli(prog_name="runner")


if __name__ == "__main__":
    main()
