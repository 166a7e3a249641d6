"""tests/stalefs.py itself: the eventually consistent view the stale-mount test (test_stale_mount.py) runs workers
under. Two views of one journal in this process (`who` "A" and "B") stand for two processes on two machines."""

import errno
import os

import pytest
from stalefs import StaleFs

MAX_LAG = 50


@pytest.fixture
def views(tmp_path):
    """(root, A's view, B's view, journal folder): every change may lag (p=1), by up to MAX_LAG of the reader's
    reads. The lags are fixed by the seed (they hash paths under the root, not where tmp_path is): another seed
    may draw one too short for a test's first reads."""
    root, journal = tmp_path / "home", tmp_path / "journal"
    root.mkdir()

    def view(who):
        return StaleFs(root, journal, seed=3, max_lag=MAX_LAG, p=1.0, who=who)

    return root, view("A"), view("B"), journal


def read(fs, path):
    """The file's bytes as FS sees them, None when it says there is no such file."""
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write(fs, path, data: bytes, atomic=False):
    """Write DATA at PATH through FS: in place ("wb"), or a temp file renamed over it (as runner's atomic writes)."""
    target = f"{path}.tmp" if atomic else path
    with fs.open(target, "wb") as f:
        f.write(data)
    if atomic:
        fs.replace(target, path)


def reads_until(fs, path, want, limit=MAX_LAG + 2):
    """How many of FS's reads of PATH pass before it reads WANT (each read a read operation: the view's clock)."""
    for n in range(limit):
        if read(fs, path) == want:
            return n
    raise AssertionError(f"{path} never read {want!r} in {limit} reads")


def test_another_process_new_file_is_unseen_for_a_while_then_seen(views):
    root, a, b, _ = views
    assert b.listdir(root) == []
    write(a, root / "marker.json", b"{}")
    assert a.listdir(root) == ["marker.json"]  # its own at once
    assert "marker.json" not in b.listdir(root)
    assert "marker.json" not in [e.name for e in b.scandir(root)]
    with pytest.raises(FileNotFoundError):
        b.stat(root / "marker.json")
    with pytest.raises(FileNotFoundError):
        os.close(b.os_open(root / "marker.json", os.O_RDONLY))
    waited = reads_until(b, root / "marker.json", b"{}")
    assert 1 <= waited <= MAX_LAG
    for _ in range(5):  # seen once, it stays seen
        assert b.listdir(root) == ["marker.json"] and read(b, root / "marker.json") == b"{}"
    assert b.stat(root / "marker.json").st_size == 2


def test_a_process_sees_its_own_changes_at_once(views):
    root, a, b, _ = views
    write(b, root / "f", b"b's")  # another's change, unseen by A for a while
    write(a, root / "f", b"one", atomic=True)
    assert read(a, root / "f") == b"one" and a.stat(root / "f").st_size == 3
    write(a, root / "f", b"second")
    assert read(a, root / "f") == b"second"
    a.mkdir(root / "sub")
    write(a, root / "sub" / "g", b"x", atomic=True)
    assert sorted(a.listdir(root)) == ["f", "sub"] and a.listdir(root / "sub") == ["g"]
    a.unlink(root / "sub" / "g")
    assert a.listdir(root / "sub") == []
    with pytest.raises(FileNotFoundError):
        a.stat(root / "sub" / "g")


@pytest.mark.parametrize("atomic", [True, False], ids=["renamed-over", "written-over"])
def test_a_replaced_file_reads_its_old_bytes_then_the_new(views, atomic):
    root, a, b, _ = views
    (root / "state.json").write_bytes(b"old")  # there before either looked
    write(a, root / "state.json", b"newer", atomic=atomic)
    assert read(b, root / "state.json") == b"old"
    assert b.stat(root / "state.json").st_size == 3
    assert "state.json" in b.listdir(root)  # listed either way
    waited = reads_until(b, root / "state.json", b"newer")
    assert 1 <= waited <= MAX_LAG
    assert read(b, root / "state.json") == b"newer" and b.stat(root / "state.json").st_size == 5


def test_each_of_two_quick_writes_keeps_its_own_old_bytes(views):
    """Two writes of one file with no read between: the first change unseen still reads the bytes from before
    it (the copies of replaced bytes were named by the read count: the second write's copy took the first's)."""
    root, a, b, _ = views
    (root / "hb.json").write_bytes(b"v1")
    write(a, root / "hb.json", b"v2")
    write(a, root / "hb.json", b"v3")
    seen = [read(b, root / "hb.json") for _ in range(MAX_LAG + 2)]
    assert seen[0] == b"v1" and seen[-1] == b"v3" and set(seen) <= {b"v1", b"v2", b"v3"}, seen


def test_a_deleted_file_is_still_listed_a_while_but_cannot_be_opened(views):
    root, a, b, _ = views
    (root / "claim.json").write_bytes(b"{}")
    a.unlink(root / "claim.json")
    assert b.listdir(root) == ["claim.json"]
    (entry,) = list(b.scandir(root))
    assert entry.name == "claim.json" and entry.is_file()
    with pytest.raises(FileNotFoundError):
        entry.stat()
    assert read(b, root / "claim.json") is None
    for _ in range(MAX_LAG + 1):
        b.listdir(root)
    assert b.listdir(root) == []


def test_paths_outside_the_root_are_never_stale(views, tmp_path):
    root, a, b, journal = views
    write(a, root / "inside", b"in")  # an unseen change under the root meanwhile
    for folder in (tmp_path / "elsewhere", tmp_path / "home2"):  # home2: the root's name is only its prefix
        a.mkdir(folder)
        write(a, folder / "f", b"one")
        write(a, folder / "f", b"two", atomic=True)
        write(a, folder / "g", b"g")
        a.unlink(folder / "g")
        assert b.listdir(folder) == ["f"] and read(b, folder / "f") == b"two"
        assert b.stat(folder / "f").st_size == 3
        with pytest.raises(OSError) as e:
            b.stat(folder / "g")
        assert e.value.errno == errno.ENOENT
    journaled = (journal / "journal.jsonl").read_text()
    assert "inside" in journaled and "elsewhere" not in journaled and "home2" not in journaled
    assert read(b, root / "inside") is None  # still unseen: the reads outside did not count
