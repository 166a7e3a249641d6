"""Adversarial pass 253: a second reader of the write protocol without hard links (`jobdir._create_then_fill` and
the adopter's, the withdrawer's and the readers' steps around it), three writers interleaved at one name.

Found, and kept fixed below:
  * a `runner cancel` that had said "cancelled" was lost, and the job ran on (or read completed). Three writers
    decided over the same state record: the first created its record and then waited on the mount through its
    fill; the second, its own create's reply lost, found that file empty for long, adopted the name, recorded
    the cancel there and read it back whole (done). The first's fill then failed for good (a full Drive), and it
    took back its create (`_withdraw`) by renaming whatever stood at the name aside, and only then looked whether
    it was its own: the cancel, moved away. A third writer past its look for records in transit (a worker's
    outcome) created its record at the name freed meanwhile; the put-back of the cancel then found the name
    taken, and the cancel was deleted. (So too a claim, `take_unit`: the adopter's claim deleted under its
    worker, and a third worker took the same epoch: two held the unit.) A withdrawer now looks first, and
    leaves a file that is not its own where it is.
  * a state record in transit (set aside by an adopter killed before it put it back, pass 61: a reported
    cancel) was left an empty file at its name by the next writer putting it back, the job broken until `runner
    repair`: that put-back's create landed and reported an error, its retry found its own empty file at the
    name with the record still aside, and took it for another writer's put-back killed before its fill
    (`_put_back_killed`), so it neither filled it nor created again. A record aside that is the one being put
    back no longer counts as another's.
  * a `runner cancel` that took effect said "Error: job ... is already cancelled" (exit 1): its record, filled
    as an adopter's last look still found it empty, was set aside and put back by a create, then a fill, and
    the cancel's read back fell between the two: an empty file, taken for another writer's record, so it decided
    again, over its own. An empty read is now waited on as a missing one is.
  * two asides of one record could share a name (3 random digits: 1 in 1,000), and the second rename ends the
    record in transit at the first. The name is drawn from 46,656 now, and drawn again where taken.
  * a `runner cancel` whose fill landed but whose fsync failed for good (a mount turned read-only) said it
    failed, and took effect: its withdrawal set the whole record aside, read as one in transit, and the next
    writer put it back. A withdrawn file is emptied through its descriptor before it is set aside.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
from helpers import two_row_job

from runner import jobdir, storage
from runner.jobdir import JobState, StateRecord, read_state


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    return two_row_job(tmp_path, tiny_gpt2, runner_home)


class Gate:
    """A thread stopped at a step until the test lets it go on (events, never sleeps)."""

    def __init__(self) -> None:
        self.reached, self.go = threading.Event(), threading.Event()

    def stop_here(self) -> None:
        self.reached.set()
        assert self.go.wait(30), "the test never let this step go on"


def _run(name: str, target, results: dict, ended: threading.Event) -> threading.Thread:
    def body() -> None:
        try:
            results[name] = target()
        except BaseException as e:  # noqa: BLE001 (the test reads what each writer ended with)
            results[name] = e
        finally:
            ended.set()

    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t


def _withdrawer_adopter_third(monkeypatch, path: str, withdrawer, adopter, third) -> dict:
    """Three writers of one name, without hard links: the withdrawer's create lands and its fill waits on the
    mount; the adopter's create drops (EIO), its retry finds that file, empty through its pauses, adopts the
    name and reports its own file written; the third writer is stopped right before its create; the
    withdrawer's fill then fails for good (a full disk) and it takes its create back, stopped after a rename of
    the name aside (if it makes one) while the third creates. What each writer's call ended with."""
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", ())  # (the adopter's ~13 s of looks at an empty file, done)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0,))
    w_fill, w_renamed, c_create, w_created = Gate(), Gate(), Gate(), threading.Event()
    a_tries: list[int] = []
    real_open, real_pwrite, real_rename = os.open, os.pwrite, os.rename

    def open_(file, flags, *a, **k):
        me = threading.current_thread().name
        if os.fspath(file) == path and flags & os.O_EXCL and me == "adopter" and not a_tries:
            a_tries.append(1)
            assert w_created.wait(30)
            raise OSError(
                errno.EIO, "the mount dropped the request"
            )  # (it did not land; the withdrawer's did)
        fd = real_open(file, flags, *a, **k)
        if os.fspath(file) == path and me == "withdrawer":
            w_created.set()
        return fd

    def pwrite(fd, data, at):
        if threading.current_thread().name == "withdrawer":
            w_fill.stop_here()  # waiting on the mount through the adopter's pauses
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, at)

    def rename(src, dst):
        real_rename(src, dst)
        if threading.current_thread().name == "withdrawer" and os.fspath(src) == path:
            w_renamed.stop_here()

    def fault_point(name):
        if name == "before_create" and threading.current_thread().name == "third":
            c_create.stop_here()  # past its look for a record in transit, before its create

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    results: dict = {}
    withdrawing = _run("withdrawer", withdrawer, results, w_renamed.reached)
    assert w_fill.reached.wait(30)
    _run("adopter", adopter, results, threading.Event()).join(30)
    creating = _run("third", third, results, threading.Event())
    assert c_create.reached.wait(30)
    w_fill.go.set()  # the fill fails for good: the create is taken back
    assert w_renamed.reached.wait(30)  # (the name set aside, or left as it is: the withdrawer's end)
    c_create.go.set()
    creating.join(30)
    w_renamed.go.set()
    withdrawing.join(30)
    assert isinstance(results["withdrawer"], storage.StorageError)  # the full disk, said
    return results


def test_a_withdrawn_create_never_takes_away_the_record_an_adopter_reported(job, monkeypatch):
    read = read_state(job.dir)  # all three decide over this state (queued, no record yet)

    def record(state: JobState, by: str):
        return lambda: jobdir.record_state(job.dir, read, StateRecord(state), by)

    path = os.fspath(job.dir / "state" / jobdir.record_name(1))
    cancelled, failed = record(JobState.CANCELLED, "cancel"), record(JobState.FAILED, "failed")
    results = _withdrawer_adopter_third(
        monkeypatch, path, record(JobState.QUEUED, "retry"), cancelled, failed
    )
    cancel = results["adopter"]
    assert isinstance(cancel, StateRecord) and cancel.state is JobState.CANCELLED  # said "cancelled"
    state = read_state(job.dir)
    assert state.state is JobState.CANCELLED and state.writer == cancel.writer, (state, results)
    assert results["third"] is None  # its place taken: it reads the state again and decides again


def test_a_withdrawn_claim_never_takes_away_the_claim_an_adopter_holds(job, monkeypatch):
    def claim(worker: str):
        return lambda: jobdir.take_unit(job, 0, jobdir.Owner.me(worker), -1)

    storage.ensure_dir(job.dir / jobdir.CLAIMS)
    path = os.fspath(job.dir / jobdir.CLAIMS / jobdir.claim_name(0, 0))
    results = _withdrawer_adopter_third(monkeypatch, path, claim("w"), claim("a"), claim("c"))
    assert results["adopter"] == 0 and results["third"] is None, results  # one worker holds epoch 0, not two
    assert jobdir.still_holds(job, 0, 0, "a")


def test_a_record_in_transit_put_back_through_a_lost_reply_is_put_back_whole(job, monkeypatch):
    """The put-back's create landed and reported an error: its retry finds its own empty file at the name and
    the record it puts back still aside, which is no other writer's put-back killed before its fill."""
    from runner import cancel

    assert cancel(job.dir) == "queued"
    record = job.dir / "state" / jobdir.record_name(1)
    data = record.read_bytes()
    os.rename(record, jobdir._aside_name(record))  # an adopter killed after its rename (pass 61)
    assert read_state(job.dir).state is JobState.CANCELLED  # in transit
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", ())
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0,))
    real_open, lost = os.open, []

    def open_(file, flags, *a, **k):
        fd = real_open(file, flags, *a, **k)
        if os.fspath(file) == os.fspath(record) and flags & os.O_EXCL and not lost:
            lost.append(fd)
            os.close(fd)
            raise OSError(errno.EIO, "the reply was lost")  # (it landed)
        return fd

    monkeypatch.setattr(os, "open", open_)
    jobdir._put_back(job.dir, 1, data)  # (the next writer, or the temp files' sweep)
    assert lost and record.read_bytes() == data  # not left empty: the job broken until `runner repair`
    assert read_state(job.dir).state is JobState.CANCELLED


@pytest.mark.parametrize("fill_at", [1, 4, 10])
def test_a_writer_reading_its_record_back_while_an_adopter_puts_it_back_says_done(job, monkeypatch, fill_at):
    """Its record, filled just as an adopter's last look found it empty, is set aside and put back by a create,
    then a fill: read back between the two, it read empty, taken for another's, and the cancel decided again
    over its own record: "job ... is already cancelled", exit 1, for a cancel that took effect."""
    import time

    from runner import RunnerError, cancel

    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    path = os.fspath(job.dir / "state" / jobdir.record_name(1))
    aside = jobdir._aside_name(path)
    real_read, step, pauses = storage.read_bytes, [], []

    def read_bytes(p, *a, **k):
        if os.fspath(p) == path and not step and os.path.getsize(path):  # the cancel's read back
            step.append("aside")
            os.rename(path, aside)  # the adopter's rename, then its put-back's create
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return real_read(p, *a, **k)

    def sleep(_):
        pauses.append(1)
        if step == ["aside"] and len(pauses) == fill_at:  # the put-back's fill lands while the reader pauses
            step.append("filled")
            with open(path, "wb") as f:
                f.write(real_read(aside))
            os.unlink(aside)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(time, "sleep", sleep)
    try:
        said = cancel(job.dir)
    except RunnerError as e:
        said = str(e)
    assert step == ["aside", "filled"] and said == "queued"
    assert read_state(job.dir).state is JobState.CANCELLED


def test_an_aside_name_is_drawn_wide_and_not_over_one_there(tmp_path):
    """Two asides of one record at once must not share a name (a rename over the first would end the record in
    transit there): the name is drawn from 46,656 (3 digits gave 1,000), and one found taken is drawn again."""
    record = tmp_path / "00000002.json"
    names = {os.path.basename(jobdir._aside_name(record)) for _ in range(2000)}
    assert len(names) > 1000  # (1,000 at most from 3 digits; ~1,960 expected from 46,656)
    assert all(storage.is_temp_name(n) and n.startswith(f".00000002.json.{jobdir.ASIDE}") for n in names)
    for n in names:
        (tmp_path / n).touch()
    drawn = [os.path.basename(jobdir._aside_name(record)) for _ in range(200)]
    assert sum(d in names for d in drawn) <= 2  # (taken: 4% of the names; 8 draws each, all taken 1 in 10^11)


def test_a_withdrawn_create_whose_bytes_landed_is_never_a_record_in_transit(job, monkeypatch):
    """A fill whose bytes landed but whose fsync failed for good (a mount turned read-only) is withdrawn: set
    aside whole, the record read as one in transit (a cancel said failed, then in effect, and put back by the
    next writer). It is emptied through its own descriptor first: aside, it is no record."""
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0,))
    path = os.fspath(job.dir / "state" / jobdir.record_name(1))
    real_rename, real_fsync, seen = os.rename, os.fsync, []

    def fsync(fd):
        if os.path.samestat(os.fstat(fd), os.stat(path)) if os.path.exists(path) else False:
            raise OSError(errno.EROFS, "Read-only file system")  # (the record's fill: its bytes are there)
        real_fsync(fd)

    def rename(src, dst):
        real_rename(src, dst)
        if os.fspath(src) == path:  # the withdrawer's rename aside: what a reader sees then
            seen.append(read_state(job.dir).state)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    read = read_state(job.dir)
    with pytest.raises(storage.StorageError):
        jobdir.record_state(job.dir, read, StateRecord(JobState.CANCELLED), "cancel")
    monkeypatch.undo()
    assert seen == [JobState.QUEUED]
    assert read_state(job.dir).state is JobState.QUEUED and not os.path.exists(path)
    assert not [n for n in os.listdir(job.dir / "state") if jobdir.ASIDE in n]
