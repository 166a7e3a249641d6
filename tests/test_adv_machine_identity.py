"""Whose pid a pid is, where /proc does not say which machine this is (adversarial pass 216).

A temp file, a local shard folder, a submit's temp folder and a background worker's pid file each name the pid
of the process that writes it, with `storage.namespace_tag()`: under this process's tag a pid that no longer
exists here is a killed writer's, and its leftover is removed at once. The tag hashed /proc's boot id and PID
namespace; where neither can be read (every Mac, some sandboxes) it was one value on every such machine, so of
two of them sharing a home (a Drive folder synced to two Macs) each took the other's pids for its own and
removed the other's live files: an export in progress lost its temp file, a submit the folder it was filling,
a background worker its pid file (`runner workers` forgot it). Now a Mac names its boot (kern.bootsessionuuid),
and a machine that cannot be named gets a tag of the process alone: only age tells of its leftovers.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from runner import background, jobdir, results, storage

# a pid no process has here (above Linux's pid_max), alive on the other machine
THEIRS = 2**22 + 4321
TWO_DAYS_AGO = time.time() - 2 * 86400


def no_proc_machine(monkeypatch, process: str) -> None:
    """From here on, this process runs on a Linux whose /proc tells nothing (a sandbox), as process `process`
    (8 hex digits) of it."""
    monkeypatch.setattr(storage, "boot_id", lambda: None)
    monkeypatch.setattr(storage, "pid_namespace", lambda: None)
    monkeypatch.setattr(storage, "_PROCESS_TAG", process, raising=False)


def mac(monkeypatch, session: str, process: str) -> None:
    """From here on, this process runs on a Mac (no /proc) booted as `session` (its kern.bootsessionuuid), as
    process `process` of it."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(storage, "_read_boot_id", lambda: None, raising=False)
    monkeypatch.setattr(storage, "_read_pid_namespace", lambda: None, raising=False)
    sysctl = {"kern.bootsessionuuid": f"{session}\0".encode()}
    monkeypatch.setattr(storage, "_sysctl", sysctl.get, raising=False)
    monkeypatch.setattr(storage, "_PROCESS_TAG", process, raising=False)


def temp_file(root: Path, tag: str) -> Path:
    """An export's temp file beside its target, as `storage.owned_temp_name` names it."""
    path = root / f".answers.jsonl.{THEIRS}-{tag}.0badf00d.tmp"
    path.write_text("half an export")
    return path


def local_shard_folder(root: Path, tag: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"{results.LOCAL_SHARD_PREFIX}{tag}-{THEIRS}-abc"
    path.mkdir()
    return path


def submit_folder(root: Path, tag: str) -> Path:
    """A submit's temp folder, before its .owner.json is written."""
    path = root / f".20260101-000000-abcdef.{THEIRS}-{tag}.0123abcd.tmp"
    path.mkdir()
    return path


def pid_file(root: Path, tag: str) -> Path:
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / "work-20260101-000000-aaaaaa.log").write_text("working\n")
    path = root / "logs" / "work-20260101-000000-aaaaaa.pid"
    path.write_text(f"{THEIRS} - {tag}")
    return path


def sweep(kind, root: Path) -> None:
    """What removes leftovers of `kind`: the next writer of the file, of a shard, a submit, `runner workers`."""
    if kind is temp_file:
        storage.remove_stale_temps_of(root / "answers.jsonl")
    elif kind is local_shard_folder:
        results.sweep_killed_local_temps.cache_clear()
        results.sweep_killed_local_temps()
    elif kind is submit_folder:
        jobdir.remove_dead_submits(root)
    else:
        assert background.running(root) == []


def aged(path: Path) -> None:
    for each in (path, path.with_suffix(".log")):
        if each.exists():
            os.utime(each, (TWO_DAYS_AGO, TWO_DAYS_AGO))


KINDS = [temp_file, local_shard_folder, submit_folder, pid_file]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_two_machines_without_boot_ids_leave_each_others_live_files(root, monkeypatch, kind):
    """Two sandboxes whose /proc tells nothing share a home: what one writes, naming a pid that is no process on
    the other, stays there when the other looks for leftovers; once it is old, it goes."""
    no_proc_machine(monkeypatch, "aaaaaaaa")
    live = kind(root, storage.namespace_tag())
    no_proc_machine(monkeypatch, "bbbbbbbb")
    sweep(kind, root)
    assert live.exists()
    aged(live)
    sweep(kind, root)
    assert not live.exists()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_two_macs_leave_each_others_live_files_and_a_mac_cleans_its_own_at_once(root, monkeypatch, kind):
    """Two Macs share a home (a Drive folder synced to both): the other Mac's files stay; a file of a process
    of this Mac's boot that has ended goes at once, as on Linux (another process of the same Mac sweeps it)."""
    mac(monkeypatch, "SESSION-A", "aaaaaaaa")
    live = kind(root, storage.namespace_tag())
    mac(monkeypatch, "SESSION-B", "bbbbbbbb")
    sweep(kind, root)
    assert live.exists()
    mac(monkeypatch, "SESSION-A", "cccccccc")
    sweep(kind, root)
    assert not live.exists()


def test_a_mac_names_its_boot_and_one_pid_space_and_a_machine_without_a_name_is_no_other():
    """The identities themselves: a Mac's boot is its session uuid, its pids are one space; on a machine
    without a name the tag is this process's, 8 hex digits as a name needs."""
    mp = pytest.MonkeyPatch()
    try:
        mac(mp, "SESSION-A", "aaaaaaaa")
        assert (storage.boot_id(), storage.pid_namespace()) == ("SESSION-A", storage.NO_PID_NAMESPACES)
        owner = jobdir.Owner.me("w")
        assert jobdir.Owner("w", "h", THEIRS, owner.boot, owner.pidns, None).provably_dead()
        assert not jobdir.Owner("w", "h", THEIRS, "SESSION-B", owner.pidns, None).provably_dead()
        mp.setattr(sys, "platform", "linux")
        assert storage.pid_namespace() is None and storage.namespace_tag() == "aaaaaaaa"
        assert not jobdir.Owner.me("w").provably_dead()
        assert not jobdir.Owner("w", "h", THEIRS, None, None, None).provably_dead()
    finally:
        mp.undo()
    assert storage.OWNED_TEMP.fullmatch(f".a.1-{storage._PROCESS_TAG}.0badf00d.tmp")
