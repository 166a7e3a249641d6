"""The job home misbehaving like a Drive mount: transient errors are retried, permanent ones stop cleanly."""

import errno
import os
import re
import time
from pathlib import Path

import pytest

from runner import storage
from runner.storage import StorageError, atomic_write, publish, retry


class Flaky:
    """Wraps a function: raises OSError(code) for the first `fails` calls, then behaves."""

    def __init__(self, fn, code, fails):
        self.fn, self.code, self.fails, self.calls = fn, code, fails, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls <= self.fails:
            raise OSError(self.code, os.strerror(self.code))
        return self.fn(*a, **kw)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOTCONN, errno.EAGAIN, errno.ESTALE])
def test_transient_errors_are_retried(tmp_path, monkeypatch, code):
    flaky = Flaky(os.replace, code, fails=3)
    monkeypatch.setattr(storage.os, "replace", flaky)
    atomic_write(tmp_path / "state.json", '{"ok": true}')
    assert (tmp_path / "state.json").read_text() == '{"ok": true}' and flaky.calls == 4
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp files left behind


def test_permanent_errors_stop_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.os, "replace", Flaky(os.replace, errno.ENOSPC, fails=99))
    with pytest.raises(
        StorageError, match=r"cannot write .*state.json: No space left on device \(errno 28\)"
    ):
        atomic_write(tmp_path / "state.json", "x")
    assert not (tmp_path / "state.json").exists() and list(tmp_path.iterdir()) == []


def test_a_mount_that_never_comes_back_gives_up(tmp_path):
    calls = []

    def op():
        calls.append(1)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    with pytest.raises(StorageError, match="Transport endpoint is not connected"):
        retry(op, "list the job home", delays=(0, 0, 0))
    assert len(calls) == 4


def test_a_wait_that_lasts_is_said_once_a_blip_is_not(monkeypatch, capsys):
    """`runner status` on a Drive mount that dropped said nothing for two minutes (it retries each read for a
    minute): a wait past SAY_WAITING_AFTER seconds is said on stderr, once a minute at most; a blip is not."""
    monkeypatch.setattr(storage, "_said_waiting_at", [])
    retry(Flaky(lambda: "ok", errno.EIO, fails=2), "read blip.json")  # waits 0.2 + 0.5 s
    assert capsys.readouterr().err == ""
    for name in ("a.json", "b.json"):
        assert retry(Flaky(lambda: "ok", errno.EIO, fails=6), f"read {name}") == "ok"
    said = capsys.readouterr().err.splitlines()
    assert said == [
        "[runner] the file system is not answering: cannot read a.json yet (Input/output error, errno 5); "
        "trying again for up to 59 s"
    ]


def test_publish_copies_under_a_temp_name_then_renames(tmp_path, monkeypatch):
    src = tmp_path / "local.parquet"
    src.write_bytes(b"x" * 10_000)
    seen = []
    real = os.replace
    monkeypatch.setattr(
        storage.os,
        "replace",
        lambda a, b: (seen.append((os.path.basename(a), os.path.getsize(a))), real(a, b)),
    )
    (tmp_path / "home").mkdir()
    publish(src, tmp_path / "home" / "00001-w.parquet")
    assert seen[0][0].startswith(".00001-w.parquet.") and seen[0][1] == 10_000
    assert (tmp_path / "home" / "00001-w.parquet").read_bytes() == src.read_bytes()


def test_a_temp_file_tidied_away_while_it_was_written_is_written_again(tmp_path, monkeypatch):
    """A worker frozen mid-copy past its lease and the temp files' age: `runner repair` deletes its temp file as
    left behind; woken, it stopped with "the job home cannot be written (No such file or directory)" though it
    still held its unit (adversarial pass 19). It writes the file again."""
    src = tmp_path / "local.parquet"
    src.write_bytes(b"x" * 10_000)
    (tmp_path / "home").mkdir()
    tidied = []

    def repair_runs(name):
        if name == "mid_write" and not tidied:
            (temp,) = [p for p in (tmp_path / "home").iterdir() if p.name.startswith(".")]
            temp.unlink()
            tidied.append(temp)

    monkeypatch.setattr(storage, "fault_point", repair_runs)
    publish(src, tmp_path / "home" / "00001-w.parquet")
    assert tidied and (tmp_path / "home" / "00001-w.parquet").read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["00001-w.parquet"]


def test_read_lines_resumes_at_its_offset_after_a_transient_error(tmp_path, monkeypatch):
    """A long file read a few bytes at a time, every other open failing with EIO: every line once, in order,
    the torn last one too (each retry opens the file again at the same offset)."""
    path = tmp_path / "errors.jsonl"
    path.write_text("".join(f'{{"line": {i}}}\n' for i in range(50)) + '{"torn')
    real, opens = open, []

    def flaky(file, *a, **kw):
        opens.append(file)
        if len(opens) % 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(storage, "open", flaky, raising=False)
    lines = list(storage.read_lines(path, size=7))
    assert lines == [f'{{"line": {i}}}' for i in range(50)] + ['{"torn'] and len(opens) > 100


def test_kinds_names_what_each_entry_is_from_one_listing(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    os.mkfifo(tmp_path / "p")
    stats = []
    real = os.lstat
    monkeypatch.setattr(os, "lstat", lambda *a, **k: stats.append(a) or real(*a, **k))
    assert storage.kinds(tmp_path) == {"f": "file", "d": "dir", "l": "link", "p": "other"}
    assert stats == []  # the listing's own entry types, not a stat per name
    assert storage.kinds(tmp_path / "missing") == {} and storage.kinds(tmp_path / "f") == {}


class LostReply:
    """Wraps a function: for the calls numbered in `lost`, does it, then raises EIO (the reply lost on a network
    mount); with `half`, an os.write that lands half of its bytes first."""

    def __init__(self, fn, lost=(1,), half=False):
        self.fn, self.lost, self.half, self.calls = fn, set(lost), half, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls in self.lost:
            if self.half:
                fd, data = a
                self.fn(fd, bytes(data[: len(data) // 2]))
            else:
                self.fn(*a, **kw)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self.fn(*a, **kw)


@pytest.mark.parametrize(
    "fault",
    ["error before writing", "reply lost", "half written, reply lost"],
)
def test_an_appended_line_is_there_once_whatever_the_mount_answered(tmp_path, monkeypatch, fault):
    """A retried append never writes its line twice: an invalid row was listed twice in errors.jsonl after one
    lost reply, and after an ordinary failed write too (the line stayed in Python's buffer and was written
    when the file closed). The only writer of a file also cuts off half a line a failed try left (pass 49)."""
    path = tmp_path / "errors.jsonl"
    path.write_text('{"id": "first"}\n')
    wrap = {
        "error before writing": lambda w: Flaky(w, errno.EIO, fails=1),
        "reply lost": LostReply,
        "half written, reply lost": lambda w: LostReply(w, half=True),
    }[fault]
    monkeypatch.setattr(storage.os, "write", wrap(os.write))
    storage.append_line(path, '{"id": "second"}', only_writer=True)
    storage.append_line(path, '{"id": "third"}', only_writer=True)
    assert path.read_text() == '{"id": "first"}\n{"id": "second"}\n{"id": "third"}\n'
    # a file others append to too (log.txt) is not cut: a torn piece a failed try left ends on a line of its own
    log = tmp_path / "log.txt"
    log.write_text("started\n")
    monkeypatch.setattr(storage.os, "write", wrap(os.write))
    storage.append_line(log, "a line")
    torn = "a l\n" if fault == "half written, reply lost" else ""
    assert log.read_text() == "started\n" + torn + "a line\n"


def test_a_rename_whose_reply_was_lost_is_done(tmp_path, monkeypatch):
    (tmp_path / "new").write_text("new")
    (tmp_path / "old").write_text("old")
    monkeypatch.setattr(storage.os, "replace", LostReply(os.replace))
    storage.replace(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old").read_text() == "new" and not (tmp_path / "new").exists()
    with pytest.raises(StorageError, match="No such file"):  # a source that never was is still an error
        storage.replace(tmp_path / "none", tmp_path / "old")


def test_local_shard_folders_left_by_killed_workers_are_swept_once_a_day_old(tmp_path, monkeypatch):
    """A SIGKILL skips the removal of a worker's local shard folder (TMPDIR/runner-shard-*): on one's own machine
    each kill left one for good. The next process to write a shard removes those a day old, and no other."""
    import tempfile

    import pyarrow as pa

    from runner import results

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results.sweep_killed_local_temps.cache_clear()
    old, fresh, other = (tmp_path / n for n in ("runner-shard-old", "runner-shard-fresh", "someone-elses"))
    for folder in (old, fresh, other):
        folder.mkdir()
        (folder / "shard.parquet").write_bytes(b"PAR1")
    for folder in (old, other):
        os.utime(folder, (time.time() - 2 * 86400,) * 2)
    with results.write_local_shard(pa.table({"a": [1, 2]})) as (path, _):
        assert path.is_file() and path.parent.name.startswith("runner-shard-")
    assert not old.exists() and fresh.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runner-shard-fresh", "someone-elses"]


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize(
    "name", ["résultats-" + "x" * 225 + ".jsonl", "résultats-" + "x" * 201 + "é" * 10 + ".jsonl"]
)  # 242 and 238 bytes (é is two); the second's temp name is cut in the middle of an é
def test_a_file_with_a_long_legal_name_is_written_through_a_temp_name_that_fits(tmp_path, owned, name):
    """`runner results --to` a legal 240-byte name failed "File name too long": the temp name adds ~30 bytes.
    Temp names of a long name keep its start and a digest of all of it; a dead writer's is still tidied."""
    target = tmp_path / name
    assert len(os.fsencode(name)) < 255
    local = tmp_path.parent / f"{tmp_path.name}-local.jsonl"
    local.write_text("row\n")
    storage.publish(local, target, owned=owned)
    assert target.read_text() == "row\n" and [p.name for p in tmp_path.iterdir()] == [name]
    dead = storage.owned_temp_name(target).replace(f".{os.getpid()}-", f".{2**22 + 99}-")  # above pid_max
    Path(dead).write_text("half")
    Path(storage.owned_temp_name(tmp_path / name.replace("x", "y", 1))).write_text("another file's")
    assert len(os.fsencode(Path(dead).name)) <= 255 and Path(dead).name.startswith(".résultats-")
    Path(dead).name.encode("utf-8")  # a whole name, not half an é (pyarrow refuses a path that is not UTF-8)
    assert (
        storage.remove_stale_temps_of(target) == 1
        and not Path(dead).exists()
        and len(list(tmp_path.iterdir())) == 2
    )


def test_a_day_old_local_shard_folder_of_a_live_process_is_not_swept(tmp_path, monkeypatch):
    """A worker stopped for a day (Ctrl-Z, a laptop asleep) or a process whose clock stepped a day ahead found a
    live worker's folder a day old and removed it while the worker wrote its shard there (pass 131). A folder
    names its process; only a dead one's (or an unnamed one's) is swept."""
    import subprocess
    import sys
    import tempfile

    import pyarrow as pa

    from runner import results, storage

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results.sweep_killed_local_temps.cache_clear()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    tag = storage.namespace_tag()
    live, dead = (tmp_path / f"runner-shard-{tag}-{pid}-abc" for pid in (os.getpid(), int(gone.stdout)))
    other_host = (
        tmp_path / f"runner-shard-00000000-{os.getpid()}-abc"
    )  # another boot: its pid means nothing here
    for folder in (live, dead, other_host):
        folder.mkdir()
        os.utime(folder, (time.time() - 2 * 86400,) * 2)
    with results.write_local_shard(pa.table({"a": [1]})) as (path, _):
        assert path.parent.name.startswith(f"runner-shard-{tag}-{os.getpid()}-")
    assert live.exists() and not dead.exists() and not other_host.exists()


def test_a_fresh_local_shard_folder_of_an_ended_process_of_this_machine_is_swept_at_once(
    tmp_path, monkeypatch
):
    """A worker killed by the out-of-memory killer on one's own machine left its local shard folder (up to a
    shard's size) for a day. A folder that names a process of this boot and PID namespace that has ended is
    swept by the next process that writes a shard; a live one's, and a fresh one of another machine or of no
    process named, are left alone (a day old, the latter go: the test above)."""
    import subprocess
    import sys
    import tempfile

    import pyarrow as pa

    from runner import results, storage

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    results.sweep_killed_local_temps.cache_clear()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # fmt: skip
    tag = storage.namespace_tag()
    dead, live, elsewhere, unnamed = (
        tmp_path / f"runner-shard-{name}"
        for name in (f"{tag}-{gone}-abc", f"{tag}-{os.getppid()}-abc", f"00000000-{gone}-abc", "xyz")
    )
    for folder in (dead, live, elsewhere, unnamed):
        folder.mkdir()
        (folder / "shard.parquet").write_bytes(b"PAR1")
    with results.write_local_shard(pa.table({"a": [1]})) as (path, _):
        assert path.is_file()
    assert not dead.exists() and live.exists() and elsewhere.exists() and unnamed.exists()


def test_a_checked_file_reads_as_the_file_and_refuses_a_changed_block_it_touches(tmp_path):
    """storage.CheckedFile (a worker's reads of prompts.parquet against its start hash): any seek and read gives
    the file's bytes; a block changed since the hash is refused where a read touches it, and only there; a
    file of another size is refused at once."""
    import random

    data = random.Random(0).randbytes(storage.BLOCK * 2 + 1234)
    path = tmp_path / "f"
    path.write_bytes(data)
    blocks: list[bytes] = []
    assert storage.file_sha256(path, blocks) == storage.file_sha256(path) and len(blocks) == 3
    f = storage.CheckedFile(path, blocks)
    for at, n in [
        (0, 10),
        (storage.BLOCK - 5, 10),
        (len(data) - 7, 100),
        (123, storage.BLOCK * 2),
        (len(data), 5),
    ]:
        f.seek(at)
        assert f.read(n) == data[at : at + n] and f.tell() == min(at + n, len(data))
    assert f.seek(-3, 2) == len(data) - 3 and f.read() == data[-3:]
    changed = bytearray(data)
    changed[storage.BLOCK + 7] ^= 1
    path.write_bytes(changed)
    f = storage.CheckedFile(path, blocks)
    f.seek(0)
    assert f.read(storage.BLOCK) == data[: storage.BLOCK]  # the first block is as hashed
    with pytest.raises(storage.ChangedUnderfoot, match="changed since it was hashed"):
        f.read(8)
    path.write_bytes(
        data[: storage.BLOCK * 2]
    )  # (a size within the last block: that block differs, when read)
    with pytest.raises(storage.ChangedUnderfoot, match="not as it was hashed"):
        storage.CheckedFile(path, blocks)


def test_no_liveness_check_signals_a_process_on_windows(monkeypatch):
    """os.kill(pid, 0) is TerminateProcess on Windows: `runner status` judging a worker alive would have ended it.
    There no check signals anything, and a pid counts as alive (the leases' heartbeats judge)."""
    import subprocess
    import sys

    from runner import background, jobdir

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        signalled = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))
        monkeypatch.setattr(storage, "WINDOWS", True)
        owner = jobdir.Owner.me()
        assert storage.pid_exists(child.pid) and storage.pid_exists(2**22 + 12345)
        assert not jobdir.Owner("w", owner.host, child.pid, owner.boot, owner.pidns, None).provably_dead()
        background._alive(child.pid)
        assert signalled == []
    finally:
        monkeypatch.undo()
        child.kill()
        child.wait()


def test_a_temp_name_of_a_pid_past_any_process_is_a_gone_writer(tmp_path):
    """A temp file's name holding a pid past a C long (damaged, or another system's) raised OverflowError from
    os.kill in whatever swept the folder; no process has such a pid: its writer is gone."""
    name = os.path.basename(storage.owned_temp_name(tmp_path / "x.json"))
    huge = re.sub(r"\.(\d+)-", f".{2**70}-", name, count=1)
    owned = storage.OWNED_TEMP.fullmatch(huge)
    assert owned is not None and int(owned.group(2)) == 2**70, huge
    assert storage.writer_gone(owned) and not storage.pid_exists(2**70)
