"""A state record read as a copy of an older one (`jobdir._copy_damage`) where nothing was copied (adversarial
pass 246): the record below was made at a name another writer's record had held, then given up.

Where hard links are not supported a record is created empty, then filled. A fill whose bytes all landed but
whose fsync failed for good (a Drive quota, a full disk reported at the flush) is taken back (`_withdraw`), so
the name reads as it did; but another writer may have read that record whole meanwhile and recorded over it (a
`runner retry` over the `cancel`). A third writer that had read the record below (a worker's completion) then
creates its record at the name given up: its record is passed over and dropped, as before. The retry's record
does not name the one now below it, and it read as "not decided over ... as if copied from an older one": the job
broken until `runner repair`, a retry the user had seen succeed undone by it, and the workers stopped.
"""

import errno
import os

import pytest
from helpers import write_jsonl

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir
from runner.jobdir import JobState, read_state
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=3)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def test_a_record_over_one_taken_back_by_its_writer_is_not_read_as_a_copy(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    runner.cancel(job.dir)
    runner.retry(job.dir)
    # a worker read the state (queued, record 2) and goes on to read its ledger
    worker_read = read_state(job.dir)
    assert (worker_read.seq, worker_read.state) == (2, JobState.QUEUED)
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(jobdir, "_LINKS", {})
    real_fsync = os.fsync
    third = jobdir.record_name(3)
    flushes: list[str] = []

    def fsync(fd):
        # the cancel's record 3, filled: a retry reads it whole and records 4 over it, then its flush fails
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/state/{third}") and not flushes:
            flushes.append(third)
            runner.retry(job.dir)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(RunnerError, match="quota"):
        runner.cancel(job.dir)
    # the cancel took its record back; the retry's, over it, is the newest
    assert not (job.dir / "state" / third).exists() and jobdir.newest_state_seq(job.dir) == 4
    # the worker's completion, decided over record 2, lands at the free name 3 and is dropped (passed over)
    assert jobdir.write_completed(job.dir, worker_read) is None
    status = runner.status(job.dir)
    assert (status.state, status.message) == ("queued", None), status.message
    assert (read_state(job.dir).seq, read_state(job.dir).generation) == (4, 2)
