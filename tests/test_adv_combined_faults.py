"""Adversarial: faults the other tests inject one at a time, combined on one job home shared by several workers
(pass 209). Workers here are threads of this process; one "frozen" (SIGSTOP, a suspended VM) stops whole, its
heartbeat too, at a named step until the test thaws it, and its lease is made to run out by dating its heartbeat
back (the time a real freeze takes).

Found: a worker stopped (Ctrl-C, SIGTERM, its --hours deadline) while a `runner cancel` or `runner retry` was being
written where links are not supported (a Drive mount: the state record is created empty, then filled) said the
job "is broken (state/... is damaged (it is empty ...)); skipped (`runner repair ...` brings it back)", and
`runner work` ended with "Error: ... broken" (exit 1): the record was filled a moment later, nothing was broken,
and the user was sent to repair a sound job. It now says that a change of the job's state is being written.

"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings

import pytest
from helpers import assert_exactly_once, fresh_copy, prepared_job

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobdir import Job, JobState, Owner, read_state
from runner.worker import JobRun, run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, num_return_sequences=2, seed=3)
OPTIONS = EngineOptions(batch_size=2)
N = 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """A job of 8 rows x 2 samples in units of 4 rows, nothing run yet, and its reference results."""
    rows = [{"id": f"c{i:02d}", "prompt": f"The old man said {i}"} for i in range(N)]
    return prepared_job(tmp_path_factory.mktemp("adv209"), tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=4)


def without_links(monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(jobdir, "_LINKS", {})


def cancel_frozen_before_its_fill(job_dir, monkeypatch):
    """`runner cancel` in a thread, frozen between its record's create and its fill (no hard links): returns
    release(), which lets it fill the record and end."""
    frozen, thaw, real_fill = threading.Event(), threading.Event(), jobdir._fill

    def fill(fd, data):
        if threading.current_thread().name == "cancel":
            frozen.set()
            assert thaw.wait(60)
        real_fill(fd, data)

    monkeypatch.setattr(jobdir, "_fill", fill)
    t = threading.Thread(target=lambda: jobdir.cancel(Job.open(job_dir)), name="cancel", daemon=True)
    t.start()
    assert frozen.wait(60)

    def release() -> None:
        thaw.set()
        t.join(60)
        assert not t.is_alive()

    return release


@pytest.mark.parametrize("how", ["ctrl-c", "deadline"])
def test_a_worker_stopped_as_a_cancel_is_being_written_does_not_say_the_job_is_broken(
    tmp_path, prepared, gpt2_engine, monkeypatch, how
):
    from runner.scheduler import work

    home, job_dir = fresh_copy(tmp_path, prepared[0])
    without_links(monkeypatch)
    real_time, stopping = time.time, []
    # (the --hours deadline comes a minute on: the clock moves on, less than a record's patience)
    monkeypatch.setattr(time, "time", lambda: real_time() + (61.0 if stopping else 0.0))
    real_commit, release = JobRun.commit, []

    def commit(self, unit):
        real_commit(self, unit)
        if unit.seq == 1 and not release:  # its first commit is in: a cancel is being written, then the stop
            release.append(cancel_frozen_before_its_fill(job_dir, monkeypatch))
            stopping.append(True)

    monkeypatch.setattr(JobRun, "commit", commit)
    said, broken = [], []
    work(home, job=str(job_dir), engine=gpt2_engine, echo=said.append, shard_rows=2,
         stop=(lambda: bool(stopping)) if how == "ctrl-c" else None,
         deadline=real_time() + 60 if how == "deadline" else None,
         on_broken=lambda job_id, folder: broken.append(job_id))  # fmt: skip
    assert release and not broken, "\n".join(said)
    assert not [line for line in said if "broken" in line or "repair" in line], said
    assert "a change of its state is being written" in said[-1], said
    release[0]()
    status = runner.status(job_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a cancelled job's results may be partial)
        assert status.state == "cancelled" and status.done == len(runner.load_results(job_dir)) == 2, status
    jobdir.retry(Job.open(job_dir))
    ends_exactly_once(job_dir, gpt2_engine, prepared[1])


def ends_exactly_once(job_dir, engine, ref) -> None:
    """Runs the job to its end if it is not completed; then `runner status` says so and every row is there once."""
    if runner.status(job_dir).state != "completed":
        run_job(Job.open(job_dir), engine, echo=None, owner=Owner.me("Z"), shard_rows=2)
    status = runner.status(job_dir)
    assert status.state == "completed" and status.done == status.total and status.errors == 0, status
    assert read_state(job_dir).state is JobState.COMPLETED
    assert_exactly_once(job_dir, ref)
