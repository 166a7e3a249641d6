"""The job's state against commands that land at the worst moment, found by an adversarial pass:

* `runner retry` while a worker finishes the job: the worker used to read state.json, then write "completed"
  with the generation it had read, undoing the retry (the failed row never tried again), or to compute the
  progress under the old generation and call the job complete under the new one (status: "broken"). Workers
  now write completion to completed.json under the generation they read first: state.json is the commands'.
* `runner cancel` as a worker records the job's own failure was overwritten by "failed": failures go to
  failed.json the same way;
* a row error computed as a `retry` lands was stamped with the new generation at commit, so the retry never
  tried that row; it now carries the generation its unit's keys were chosen under;
* `runner repair` of a torn state.json restarted the retry generation at 0, so row errors of generation 1
  counted again after the next retry. Repair now takes the newest generation the commits and the completion
  were written under.

The interleavings are deterministic: the real `jobdir.retry` (what `runner retry` calls) runs at the exact
instant, from a patched function of the worker's path."""

import inspect
import json

import pytest
from helpers import commit_row_error, newest_state_record, run_until_done, write_jsonl
from workers import run_runner

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir
from runner.crashes import DeviceError
from runner.job_status import job_status
from runner.jobdir import Job, JobState
from runner.jobs import create_job
from runner.worker import JobRun, run_job

pytestmark = pytest.mark.slow  # `runner retry` / `runner repair` as real processes

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=4)
ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(6)]
BAD = "r1"


@pytest.fixture
def errored(tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch):
    """r1 poisons the device: after two runs it is a committed row error; rows r2.. are still to do."""
    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    commit_row_error(job, gpt2_engine)
    monkeypatch.delenv("RUNNER_FAULT")
    assert [e["id"] for e in runner.read_errors(job.dir)] == [BAD]
    return job


def test_a_retry_as_the_worker_writes_completion_stands(errored, gpt2_engine, monkeypatch):
    job = errored
    real = jobdir.write_completed
    fired = []

    def write_completed(path, read):
        if not fired:  # the worker's finish(), about to write: the user's real `runner retry` lands now
            code, out = run_runner("retry", job.dir)
            assert code == 0 and "1 failed row will be tried again" in out, out
            fired.append(read.generation)
        return real(path, read)

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    run_job(job, gpt2_engine, echo=None)
    assert fired == [0]
    state = job.state()
    assert (state.state, state.generation, runner.read_errors(job.dir)) == (JobState.QUEUED, 1, [])
    monkeypatch.setattr(jobdir, "write_completed", real)
    s = run_job(job, gpt2_engine, echo=None)  # r1 is tried again (and works now)
    assert s.finished and s.errors == 0 and job.state().state is JobState.COMPLETED
    assert sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]


def test_a_retry_as_the_worker_reads_its_progress_leaves_no_false_completion(
    errored, gpt2_engine, monkeypatch
):
    job = errored
    real = jobdir.job_progress
    fired = []

    def job_progress(j, ledger=None):
        p = real(j, ledger)
        if inspect.stack()[1].function == "finish" and p.complete and not fired:
            fired.append(jobdir.retry(Job.open(job.dir)))  # the user's `runner retry`, at this instant
        return p

    monkeypatch.setattr(jobdir, "job_progress", job_progress)
    run_job(job, gpt2_engine, echo=None)
    monkeypatch.setattr(jobdir, "job_progress", real)
    assert fired == [1]
    assert job.state().state is JobState.QUEUED and job_status(Job.open(job.dir)).state != "broken"


@pytest.mark.parametrize("damage", ["torn", "folder", "deleted"])
def test_a_retry_after_repairing_a_damaged_state_really_retries(damage, tmp_path, tiny_gpt2, gpt2_engine,
                                                                runner_home, monkeypatch):  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    run_until_done(job, gpt2_engine)  # generation 0: r1 is a row error
    code, out = run_runner("retry", job.dir)
    assert code == 0 and "1 failed row" in out, out
    run_until_done(job, gpt2_engine)  # generation 1: r1 fails again (the fault is still there)
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 1)
    monkeypatch.delenv("RUNNER_FAULT")  # the cause is fixed
    state = newest_state_record(job.dir)  # the completion, generation 1
    if damage == "torn":
        state.write_bytes(state.read_bytes()[:20])
    else:
        state.unlink()
        if damage == "folder":
            state.mkdir()  # a folder where the record belongs: repair sets it aside
    code, out = run_runner("repair", job.dir)
    assert code == 0 and "Traceback" not in out, out
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 1)
    code, out = run_runner("retry", job.dir)
    assert code == 0 and "1 failed row will be tried again" in out, out
    assert runner.read_errors(job.dir) == []
    s = run_job(job, gpt2_engine, echo=None)
    assert (
        s.finished and s.errors == 0 and sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]
    )


def test_a_row_error_computed_as_a_retry_lands_is_tried_again(tmp_path, tiny_gpt2, gpt2_engine, runner_home,
                                                               monkeypatch):  # fmt: skip
    """The worker computed a row error, then a `retry` (raising the generation) lands before its commit: the
    error belongs to the generation its unit was chosen under, so the retry tries that row again."""
    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    with pytest.raises(DeviceError):
        run_job(job, gpt2_engine, echo=None)  # the batch with r1 breaks the device; the next run isolates it
    real = JobRun.row_error
    fired = []

    def row_error(self, unit, r, s, error, message):
        if not fired:  # r1's error is computed; a retry lands before it is committed
            old = jobdir.read_state(job.dir)
            Job.open(job.dir).set_state(JobState.QUEUED, generation=old.generation + 1)
            fired.append(old.generation)
        return real(self, unit, r, s, error, message)

    monkeypatch.setattr(JobRun, "row_error", row_error)
    with pytest.raises(DeviceError):
        run_job(job, gpt2_engine, echo=None)
    marker = next(m for m in (job.dir / "done").iterdir() if '"errors": [\n' in m.read_text())
    assert '"generation": 0' in marker.read_text()  # stamped with the generation its unit was chosen under
    assert fired == [0] and runner.read_errors(job.dir) == []  # stamped with generation 0: it does not count
    monkeypatch.setattr(JobRun, "row_error", real)
    monkeypatch.delenv("RUNNER_FAULT")
    s = run_until_done(job, gpt2_engine)
    assert s.errors == 0 and sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]


def _a_failing_job(run, afresh=False):
    """What makes a worker fail a job as it starts on it (a damaged prompts file did, until pass 120 made that
    a broken job, left queued for `runner repair`)."""
    raise RunnerError(f"job {run.job.id} is damaged: a failure of the job's own")


def test_a_cancel_or_retry_as_a_job_fails_stands(tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch):
    """The worker finds the job itself failing (an error of the job's own as it starts on it) and is about
    to say so as the user cancels: the cancel stands (it used to be overwritten by "failed"). Then a retry
    re-queues past the failure, and the next failure is recorded under the new generation."""
    from runner import scheduler

    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    monkeypatch.setattr(JobRun, "check_prompts", _a_failing_job)
    real = jobdir.write_failed
    fired = []

    def write_failed(path, read, error):
        if not fired:  # the user's `runner cancel`, at this instant
            fired.append(jobdir.cancel(Job.open(job.dir)))
        return real(path, read, error)

    monkeypatch.setattr(jobdir, "write_failed", write_failed)
    scheduler.work(home=runner_home, engine=gpt2_engine, echo=None, once=True)
    assert fired == [JobState.QUEUED] and job.state().state is JobState.CANCELLED
    monkeypatch.setattr(jobdir, "write_failed", real)
    jobdir.retry(Job.open(job.dir))
    scheduler.work(home=runner_home, engine=gpt2_engine, echo=None, once=True)
    state = job.state()
    assert (state.state, state.generation) == (JobState.FAILED, 1) and "damaged" in state.error
    assert jobdir.retry(Job.open(job.dir)) == 0 and job.state().state is JobState.QUEUED  # retry re-queues it


def test_a_retry_as_repair_settles_the_state_stands(errored, gpt2_engine, monkeypatch):
    """`runner repair` read the state (completed, generation 0), then `runner retry` re-queued the row error
    (generation 1) before repair wrote its state back: the retry was undone (the row error counted again and
    `runner work` did nothing; found by adversarial pass 11). Repair now leaves a state.json that a command
    wrote meanwhile as it is, and writes none when the job already reads what it found."""
    job = errored
    run_until_done(job, gpt2_engine)  # generation 0: complete, with r1 a row error
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 0)
    real, fired = jobdir.job_progress, []

    def job_progress(j, ledger=None):
        if (
            inspect.stack()[1].function == "_repair_state" and not fired
        ):  # repair has read the state: retry lands now
            fired.append(jobdir.retry(Job.open(job.dir)))
        return real(j, ledger)

    monkeypatch.setattr(jobdir, "job_progress", job_progress)
    report = jobdir.repair(job.dir)
    monkeypatch.setattr(jobdir, "job_progress", real)
    assert fired == [1] and report.state_now == "queued"
    assert (job.state().state, job.state().generation, runner.read_errors(job.dir)) == (
        JobState.QUEUED,
        1,
        [],
    )
    s = run_job(job, gpt2_engine, echo=None)  # r1 is tried again (and works now)
    assert (
        s.finished and s.errors == 0 and sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]
    )


def test_a_repair_as_the_worker_writes_completion_leaves_the_job_queued(tmp_path, tiny_gpt2, gpt2_engine,
                                                                        runner_home, monkeypatch):  # fmt: skip
    """A worker about to write completed.json while `runner repair` sets a damaged shard aside (re-queuing the
    job at the same generation): the completion landed after the repair and the job read "completed" with rows
    missing, so `runner work` did nothing for it (found by adversarial pass 11). A completion now counts only
    over the state.json its worker read, and is not written once the state moved on."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=2)  # fmt: skip
    real, fired = jobdir.write_completed, []

    def write_completed(path, read):
        if not fired:  # every row is committed; Drive damages a shard and the user's repair runs, now
            shard = sorted((job.dir / "shards").glob("*.parquet"))[0]
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 0x10
            shard.write_bytes(bytes(data))
            fired.append(jobdir.repair(job.dir))
        return real(path, read)

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    run_job(job, gpt2_engine, echo=None, shard_rows=2)
    monkeypatch.setattr(jobdir, "write_completed", real)
    assert len(fired) == 1 and fired[0].quarantined and fired[0].state_now == "queued"
    assert job.state().state is JobState.QUEUED and job_status(Job.open(job.dir)).state != "broken"
    s = run_job(job, gpt2_engine, echo=None)  # the set-aside rows are computed again
    assert s.finished and job.state().state is JobState.COMPLETED
    assert sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]


def test_a_worker_that_slept_before_writing_completion_leaves_a_newer_one(tmp_path, tiny_gpt2, gpt2_engine,
                                                                          runner_home, monkeypatch):  # fmt: skip
    """A worker paused right before writing completed.json (generation 0) while the job was cancelled, retried
    (generation 1) and completed again by another worker: it woke and wrote its generation 0 over the newer
    completion, and the job read "queued" until the next `runner work` (adversarial pass 11)."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    real, fired = jobdir.write_completed, []

    def write_completed(path, read):
        if not fired:  # the cancel, the retry and another worker's whole run land now
            fired.append(read.generation)
            cancel_retry_and_complete_elsewhere(job, gpt2_engine)
        return real(path, read)

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    run_job(job, gpt2_engine, echo=None)
    assert fired == [0]
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 1)


def cancel_retry_and_complete_elsewhere(job, engine) -> None:
    """While a worker is about to record the job's completion: the user cancels and retries it (generation
    1), and another worker runs it to its end."""
    jobdir.cancel(Job.open(job.dir))
    jobdir.retry(Job.open(job.dir))
    assert run_job(Job.open(job.dir), engine, echo=None).finished


def state_records(job) -> list[tuple[str, str, int]]:
    """Every state record of the job, oldest first: (by, state, generation)."""
    out = []
    for path in sorted((job.dir / "state").glob("*.json")):
        d = json.loads(path.read_text())
        out.append((d["by"], d["state"], d["generation"]))
    return out


def test_a_worker_paused_inside_the_write_of_its_completion_leaves_a_newer_state(tmp_path, tiny_gpt2,
                                                                                 gpt2_engine, runner_home,
                                                                                 monkeypatch):  # fmt: skip
    """Window A of adversarial pass 11: a worker past its last check, paused inside the very write of its
    completion (generation 0), while the job was cancelled, retried (generation 1) and completed by another
    worker. Its rename used to land over the newer completion, so the job read "queued" until the next
    `runner work`. Its record's place (the one after the state it read) is taken now: its write never lands."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    real, fired = jobdir.create_exclusive, []

    def create_exclusive(path, obj):
        if path.parent.name == "state" and obj.get("by") == "completed" and not fired:
            fired.append(obj["generation"])  # the worker's record is written whole; its create is next
            cancel_retry_and_complete_elsewhere(job, gpt2_engine)
        return real(path, obj)

    monkeypatch.setattr(jobdir, "create_exclusive", create_exclusive)
    run_job(job, gpt2_engine, echo=None)
    assert fired == [0]
    assert state_records(job) == [
        ("cancel", "cancelled", 0),
        ("retry", "queued", 1),
        ("completed", "completed", 1),
    ]
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 1)


def test_a_retry_landing_inside_the_write_of_a_repair_stands(errored, gpt2_engine, monkeypatch):
    """Window B of adversarial pass 11: `runner repair` (which set a damaged shard aside, so it must record the
    state) paused inside the very write of its state while `runner retry` re-queued the row errors: its rename
    landed over the retry, which was undone. The retry took the place repair's record was to have: repair reads
    again, and the retry stands."""
    job = errored
    run_until_done(job, gpt2_engine)  # generation 0: complete, with r1 a row error
    shard = sorted((job.dir / "shards").glob("*.parquet"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    real, fired = jobdir.create_exclusive, []

    def create_exclusive(path, obj):
        if path.parent.name == "state" and obj.get("by") == "repair" and not fired:
            fired.append(jobdir.retry(Job.open(job.dir)))  # the user's `runner retry`, at this instant
        return real(path, obj)

    monkeypatch.setattr(jobdir, "create_exclusive", create_exclusive)
    report = jobdir.repair(job.dir)
    monkeypatch.setattr(jobdir, "create_exclusive", real)
    assert fired == [1] and report.quarantined and report.state_now == "queued"
    assert state_records(job)[-1] == ("retry", "queued", 1) and runner.read_errors(job.dir) == []
    s = run_until_done(job, gpt2_engine)  # the set-aside rows and r1 are computed again
    assert s.errors == 0 and sorted(runner.load_results(job.dir)["id"]) == [r["id"] for r in ROWS]
    assert (job.state().state, job.state().generation) == (JobState.COMPLETED, 1)
