"""Adversarial pass 255: a second reader of pass 253's write protocol without hard links (`jobdir._withdraw`'s
look before it takes its create back, the longer waits of `_read_when_filled`) and of pass 254's `_given`.

Found, and kept fixed below:
  * on a mount whose inode numbers are not steady from one look to the next (a FUSE file system that makes them
    up per lookup), a `runner cancel` (or a worker's claim, a `submit --name`) whose fill failed for good (a full
    Drive) left its empty file at the name: the job read as a change on its way, then broken until `runner
    repair`. Pass 253's look compared the inode numbers of the descriptor and of the name and, unequal, left the
    file as another's; before it, the file was set aside and, empty, removed. And on a mount that gives every
    file inode number 0, the look took an adopter's record there for its own and took it away: the reported
    cancel of pass 253's case lost all the same. Inode numbers are no longer trusted alone: bytes that are no
    beginning of the record being written are another's, and less than all of it (an empty file) is ours.
"""

from __future__ import annotations

import errno
import os

import pytest
from helpers import two_row_job
from test_adv_pass253 import _withdrawer_adopter_third

from runner import cancel, jobdir, storage
from runner.jobdir import JobState, StateRecord, read_state


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    return two_row_job(tmp_path, tiny_gpt2, runner_home)


def _inode_numbers(monkeypatch, kind: str) -> None:
    """os.fstat and os.lstat as a mount reports them: a new inode number at each look ("unsteady"), or 0 for
    every file ("zero")."""
    real_fstat, real_lstat, looks = os.fstat, os.lstat, [0]

    def as_mounted(st: os.stat_result) -> os.stat_result:
        looks[0] += 1
        fields = list(st)
        fields[1] = 0 if kind == "zero" else st.st_ino + looks[0]
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", lambda fd: as_mounted(real_fstat(fd)))
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: as_mounted(real_lstat(p, *a, **k)))


@pytest.mark.parametrize("inodes", ["unsteady", "zero"])
def test_a_create_whose_fill_failed_is_taken_back_whatever_the_inode_numbers(job, monkeypatch, inodes):
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0,))
    monkeypatch.setattr(
        os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left"))
    )
    _inode_numbers(monkeypatch, inodes)
    with pytest.raises(storage.StorageError, match="No space left"):
        cancel(job.dir)
    monkeypatch.undo()
    assert not (job.dir / "state" / jobdir.record_name(1)).exists()  # not an empty record: the job reads
    assert read_state(job.dir).state is JobState.QUEUED


@pytest.mark.parametrize("inodes", ["unsteady", "zero"])
def test_a_withdrawn_create_never_takes_away_an_adopters_record_whatever_the_inode_numbers(
    job, monkeypatch, inodes
):
    """Pass 253's three writers at one name (test_adv_pass253), on such a mount."""
    read = read_state(job.dir)

    def record(state: JobState, by: str):
        return lambda: jobdir.record_state(job.dir, read, StateRecord(state), by)

    _inode_numbers(monkeypatch, inodes)
    path = os.fspath(job.dir / "state" / jobdir.record_name(1))
    results = _withdrawer_adopter_third(
        monkeypatch, path, record(JobState.QUEUED, "retry"), record(JobState.CANCELLED, "cancel"),
        record(JobState.FAILED, "failed"),
    )  # fmt: skip
    said = results["adopter"]
    assert isinstance(said, StateRecord) and said.state is JobState.CANCELLED  # "cancelled"
    monkeypatch.undo()
    state = read_state(job.dir)
    assert state.state is JobState.CANCELLED and state.writer == said.writer, (state, results)


def test_a_withdrawn_claim_never_takes_away_an_adopters_claim_where_every_inode_number_is_0(job, monkeypatch):
    def claim(worker: str):
        return lambda: jobdir.take_unit(job, 0, jobdir.Owner.me(worker), -1)

    storage.ensure_dir(job.dir / jobdir.CLAIMS)
    _inode_numbers(monkeypatch, "zero")
    path = os.fspath(job.dir / jobdir.CLAIMS / jobdir.claim_name(0, 0))
    results = _withdrawer_adopter_third(monkeypatch, path, claim("w"), claim("a"), claim("c"))
    monkeypatch.undo()
    assert results["adopter"] == 0 and results["third"] is None, results  # one worker holds epoch 0, not two
    assert jobdir.still_holds(job, 0, 0, "a")
