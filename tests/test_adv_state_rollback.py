"""A job's newest state records deleted (a Drive sync conflict, a restore from an old backup that deletes what
it does not hold): the job reads the older state. What that can do to its rows, found by test:

* a rollback undoes the commands recorded after the record it rolls back to (a `cancel`: the job runs again;
  a `retry`: its row errors count again; a `repair`'s record) and nothing more: the done rows are keys, kept
  whatever the state says, and a re-run of the lost command brings the job back;
* except that a lost `retry` left its generation to be taken again: the next `runner retry` raised the older
  generation to the lost one's, under which the row errors committed by the lost retry's run counted again.
  It said "1 row's errors cleared" and `runner work` then computed nothing: the row the user had retried
  after fixing its cause stayed failed for good. A retry now goes past every generation rows were committed
  under; `runner status` says a retry's record is missing where commits name a newer generation than the
  state, and `runner repair` records that generation again and says so.

(An older record copied over the newest is told, not read: the job is broken until `runner repair`, as for any
damaged record; tests/test_adv_copied_records.py.)
"""

import errno
import json
import os
import time

import pytest
from helpers import (
    commit_row_error,
    completed_with_a_row_error,
    invoke,
    newest_state_record,
    run_until_done,
    write_jsonl,
)

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.crashes import InFlight
from runner.jobdir import JobState, read_state
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said that " * (1 + i % 3)} for i in range(8)]


def no_links(monkeypatch) -> None:
    """This process on a file system without hard links (as Colab's Drive mount)."""

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(jobdir, "_LINKS", {})
    monkeypatch.setattr(os, "link", link)


def _job(tmp_path, model, home):
    return create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), model, PARAMS, OPTIONS, home=home, unit_rows=2)


def _completed_with_an_error(job, engine, monkeypatch) -> None:
    completed_with_a_row_error(job, engine, monkeypatch)


def _cancelled(job, engine, monkeypatch) -> None:
    runner.cancel(job.dir)


def _retried_and_failed_again(job, engine, monkeypatch) -> int:
    """`runner retry` of the job, then `runner work` with row r1 failing again (its cause not fixed yet): the
    job completed under generation 1 with r1's error. The place of the newest record before the retry."""
    before = jobdir.newest_state_seq(job.dir)
    runner.retry(job.dir)
    monkeypatch.setenv("RUNNER_FAULT", "poison_row:r1")
    commit_row_error(job, engine)
    run_until_done(job, engine)
    monkeypatch.delenv("RUNNER_FAULT")
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.COMPLETED, 1)
    return before


def _restored(job, seq: int) -> None:
    """The job's state records as a backup taken when `seq` was the newest holds them, restored over the folder:
    the newer records deleted."""
    for path in sorted((job.dir / jobdir.STATES).glob("*.json"))[seq:]:
        path.unlink()


@pytest.mark.parametrize("before", [_completed_with_an_error, _cancelled], ids=["row errors", "cancelled"])
def test_a_retry_after_a_lost_retry_runs_the_rows_it_re_queues(
    before, tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    before(job, gpt2_engine, monkeypatch)
    _restored(job, _retried_and_failed_again(job, gpt2_engine, monkeypatch))
    assert read_state(job.dir).generation == 0
    # the cause fixed, the user retries the job: r1 is computed, and done
    assert runner.retry(job.dir) == (1 if before is _completed_with_an_error else 0)
    run_until_done(job, gpt2_engine)
    status = runner.status(job.dir)
    assert (status.state, status.done, status.errors) == ("completed", 8, 0), status


def test_status_says_a_retrys_record_is_missing_and_repair_records_its_generation_again(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _completed_with_an_error(job, gpt2_engine, monkeypatch)
    _restored(job, _retried_and_failed_again(job, gpt2_engine, monkeypatch))
    status = runner.status(job.dir)
    assert status.state == "completed" and status.errors == 1
    assert (
        "rows were committed under retry generation 1, but its state says 0 (newest state record: "
        "state/00000001.json): the record of a `runner retry` is missing" in status.message
    ), status.message
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0, result.output
    assert "its newest state record said retry generation 0, but the job's files were written under 1" in (
        result.output
    )
    assert read_state(job.dir).generation == 1 and runner.status(job.dir).message is None


def test_a_lost_cancel_only_undoes_the_cancel(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """What cannot be told: a cancel's record deleted leaves no trace (no worker writes after a cancel), and the
    next `runner work` runs the job again; but each row once, the rows done before the cancel kept. (The record
    before it copied over it is told: tests/test_adv_copied_records.py.)"""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    runner.retry(job.dir)
    asked: list[int] = []
    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert 0 < runner.status(job.dir).done < len(ROWS)
    runner.cancel(job.dir)
    newest_state_record(job.dir).unlink()
    status = runner.status(job.dir)
    assert (status.state, status.message) == ("queued (interrupted)", None), status
    assert run_job(job, gpt2_engine, echo=None).finished
    ids = runner.load_results(job.dir)["id"].tolist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS)


def _retried_row_error_committed(job, engine, monkeypatch) -> None:
    """The job completed with row r1's error, `runner retry`, then r1 failing again under generation 1 (its
    error committed; the job queued)."""
    _completed_with_an_error(job, engine, monkeypatch)
    runner.retry(job.dir)
    monkeypatch.setenv("RUNNER_FAULT", "poison_row:r1")
    commit_row_error(job, engine)
    monkeypatch.delenv("RUNNER_FAULT")


def test_on_another_vm_a_retrys_record_not_here_yet_is_not_said_missing(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """Two VMs on one Drive folder: the retry and its worker's commits on one, `runner status` on the other,
    whose mount shows the commits before the retry's record (files arrive late, and not in the order they were
    made). It said the record "is missing" and sent the user to `runner repair`, which then wrote its record at
    the place the retry's was on its way to. Commits made lately on another machine are said as such: look again
    first; an old one under a newer generation is a missing record as before (adversarial pass 201)."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _retried_row_error_committed(job, gpt2_engine, monkeypatch)
    monkeypatch.setattr(jobdir, "host_tag", lambda: "another-vm")  # where what follows runs
    record = newest_state_record(job.dir)
    on_its_way = job.dir.parent / "on-its-way.json"
    os.replace(record, on_its_way)  # this VM's mount does not show it yet
    message = runner.status(job.dir).message
    assert "may not be here yet" in message and "Look again in a few minutes; if it does not come" in message
    assert "is missing (deleted" not in message, message
    os.replace(on_its_way, record)  # it arrives
    status = runner.status(job.dir)
    assert status.generation == 1 and status.message.startswith("every row's result (or error) is saved"), (
        status
    )
    record.unlink()  # lost for good, and the commits are old
    old = time.time() - jobdir.SHARD_ARRIVAL_SECONDS - 60
    for marker in (job.dir / jobdir.MARKERS).glob("*.json"):
        os.utime(marker, (old, old))
    message = runner.status(job.dir).message
    assert "the record of a `runner retry` is missing" in message and "not here yet" not in message, message


def test_a_retrys_record_being_put_back_is_not_said_missing(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """Without hard links, an adopter that took the retry's record aside (found empty through its pauses, filled
    just before its rename: `jobdir._adopt_unfilled`) puts it back by a create, then a fill. Between the two,
    `runner status` reads the state before it, as for any record being written, but also said that the record
    of a `runner retry` is missing, and to `runner repair`: the rows committed under it were made before the
    adopter's rename (adversarial pass 201). A record being written may be that retry's: nothing is said lost."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _retried_row_error_committed(job, gpt2_engine, monkeypatch)
    no_links(monkeypatch)
    record = newest_state_record(job.dir)
    os.rename(record, jobdir._aside_name(record))
    record.write_bytes(b"")  # the put-back's create, its fill not yet
    status = runner.status(job.dir)
    assert status.message.startswith("a change of state is being written (") and ";" not in status.message, (
        status.message
    )


def test_a_retry_landing_while_repair_reads_is_not_said_lost(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """`runner retry` of a cancelled job landing while `runner repair` read it (after its read of the state,
    before its look at the generations of the other records and commits): repair let the retry stand, but said
    "the record of a `runner retry` was missing ... generation 1 is recorded again; what was recorded after that
    retry is lost: if you ran a command on this job since, run it again" (adversarial pass 201). Only a
    generation repair records again is said."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    real = jobdir._last_generation

    def retry_lands(j):
        runner.retry(job.dir)
        monkeypatch.setattr(jobdir, "_last_generation", real)
        return real(j)

    monkeypatch.setattr(jobdir, "_last_generation", retry_lands)
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0 and "state cancelled -> queued" in result.output, result.output
    assert "retry generation" not in result.output and "run it again" not in result.output, result.output
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.QUEUED, 1)


def _in_flight(job, generation: int, worker: str | None = None):
    """The in-flight record a worker left in unit 0 under retry `generation`, killed inside its batch (written as
    a worker writes it, `InFlight.running`); the worker is this machine's unless named."""
    worker = worker or f"{jobdir.host_tag()}-{os.getpid()}-killed"
    path = job.dir / jobdir.INFLIGHT / "00000.json"
    InFlight(path, worker, generation=generation, job=job.id).running([(0, 0)], [])
    return path


def _retried_then_killed_in_a_batch(job, how: str) -> None:
    """A cancelled job retried (generation 1), its worker killed inside its first batch before any commit, then the
    retry's record deleted, or the record before it (the cancel) copied over it."""
    runner.cancel(job.dir)
    cancel = newest_state_record(job.dir).read_bytes()
    runner.retry(job.dir)
    _in_flight(job, 1)
    retry = newest_state_record(job.dir)
    retry.unlink() if how == "deleted" else retry.write_bytes(cancel)


@pytest.mark.parametrize("how", ["deleted", "older copy"])
def test_a_lost_retry_whose_worker_left_an_in_flight_record_is_said_and_recorded_again(
    how, tmp_path, tiny_gpt2, runner_home
):
    """The record of a `runner retry` lost before anything was committed under its generation: the job read as
    cancelled again without a word, though its worker's in-flight record (checksummed, naming the job) says it
    computed rows under that generation, which no worker can know but from that record (adversarial pass 241).
    Said as commits under it are said; `runner repair` records that generation again. (The cancel's record
    copied over it: a damaged record, the job broken until `runner repair`, which records that generation too;
    pass 245.)"""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _retried_then_killed_in_a_batch(job, how)
    status = runner.status(job.dir)
    if how == "deleted":
        assert status.state == "cancelled" and status.generation == 0, status
        assert (
            "a worker computed rows under retry generation 1 (inflight/00000.json), but its state says 0 (newest "
            "state record: state/00000001.json): the record of a `runner retry` is missing"
            in (status.message or "")
        ), status.message
    else:
        assert (
            status.state == "broken"
            and "state/00000002.json is damaged (a copy of state/00000001.json" in (status.message or "")
        ), status
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0, result.output
    said = (
        "its newest state record said retry generation 0, but the job's files were written under 1"
        if how == "deleted"
        else "its newest state record was damaged past reading which command wrote it"
    )
    assert said in result.output, result.output
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.CANCELLED, 1)
    assert runner.status(job.dir).message is None


def test_a_retry_after_a_lost_retry_goes_past_its_in_flight_generation(tmp_path, tiny_gpt2, runner_home):
    """A retry run again after its record was lost goes past the generation its worker's in-flight record names:
    taken again, that record of a killed batch counted as a crash of the new retry's rows."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _retried_then_killed_in_a_batch(job, "deleted")
    runner.retry(job.dir)
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.QUEUED, 2)


@pytest.mark.parametrize("which", ["flipped", "another job's", "older generation"])
def test_an_in_flight_record_that_proves_nothing_says_no_retry_lost(which, tmp_path, tiny_gpt2, runner_home):
    """An in-flight record that fails its checksum, names another job, or was written under the state's own
    generation is no evidence of a lost retry: nothing said, repair records no generation."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    path = _in_flight(job, 0 if which == "older generation" else 1)
    record = json.loads(path.read_bytes())
    if which == "flipped":
        record["generation"] = 2
    elif which == "another job's":
        record["job"] = "someone-else"
        record["check"] = storage.json_checksum(record)
    path.write_text(json.dumps(record))
    status = runner.status(job.dir)
    assert status.state == "cancelled" and "retry" not in (status.message or ""), status.message
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0 and "retry generation" not in result.output, result.output
    assert read_state(job.dir).generation == 0


def test_a_young_in_flight_record_of_another_machine_may_be_ahead_of_its_retrys_record(
    tmp_path, tiny_gpt2, runner_home
):
    """A worker on another VM of the same Drive folder, inside its first batch after a retry there: this mount may
    show its in-flight record before the retry's record. Said as such (look again), as young commits are; an old
    one is a missing record."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    path = _in_flight(job, 1, worker="another-vm-4242-abcdef")
    message = runner.status(job.dir).message or ""
    assert "may not be here yet" in message and "is missing (deleted" not in message, message
    old = time.time() - jobdir.SHARD_ARRIVAL_SECONDS - 60
    os.utime(path, (old, old))
    message = runner.status(job.dir).message or ""
    assert "the record of a `runner retry` is missing" in message and "not here yet" not in message, message


def test_the_in_flight_record_said_is_one_of_the_generation_said(tmp_path, tiny_gpt2, runner_home):
    """Two in-flight records newer than the state (two lost retries, a worker killed in each): status named the
    first record listed with the newest generation, though that record says an older one (adversarial pass 242)."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    _in_flight(job, 1)
    worker = f"{jobdir.host_tag()}-{os.getpid()}-killed-too"
    InFlight(job.dir / jobdir.INFLIGHT / "00001.json", worker, generation=2, job=job.id).running([(2, 0)], [])
    message = runner.status(job.dir).message or ""
    assert "a worker computed rows under retry generation 2 (inflight/00001.json)" in message, message
