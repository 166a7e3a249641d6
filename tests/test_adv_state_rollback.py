"""A job's newest state record deleted, or an older record copied over it (a Drive sync conflict, a restore from
an old backup): the job reads the older state. What that can do to its rows, found by test:

* a rollback undoes the commands recorded after the record it rolls back to (a `cancel`: the job runs again;
  a `retry`: its row errors count again; a `repair`'s record) and nothing more: the done rows are keys, kept
  whatever the state says, and a re-run of the lost command brings the job back;
* except that a lost `retry` left its generation to be taken again: the next `runner retry` raised the older
  generation to the lost one's, under which the row errors committed by the lost retry's run counted again.
  It said "1 row's errors cleared" and `runner work` then computed nothing: the row the user had retried
  after fixing its cause stayed failed for good. A retry now goes past every generation rows were committed
  under; `runner status` says a retry's record is missing where commits name a newer generation than the
  state, and `runner repair` records that generation again and says so.
"""

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
from runner import EngineOptions, GenerationParams
from runner.jobdir import JobState, read_state
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said that " * (1 + i % 3)} for i in range(8)]


def _job(tmp_path, model, home):
    return create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), model, PARAMS, OPTIONS, home=home, unit_rows=2)


def _completed_with_an_error(job, engine, monkeypatch) -> None:
    completed_with_a_row_error(job, engine, monkeypatch)


def _cancelled(job, engine, monkeypatch) -> None:
    runner.cancel(job.dir)


def _retried_and_failed_again(job, engine, monkeypatch) -> bytes:
    """`runner retry` of the job, then `runner work` with row r1 failing again (its cause not fixed yet): the
    job completed under generation 1 with r1's error. The newest record before the retry, as a backup holds it."""
    before = newest_state_record(job.dir).read_bytes()
    runner.retry(job.dir)
    monkeypatch.setenv("RUNNER_FAULT", "poison_row:r1")
    commit_row_error(job, engine)
    run_until_done(job, engine)
    monkeypatch.delenv("RUNNER_FAULT")
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.COMPLETED, 1)
    return before


@pytest.mark.parametrize("before", [_completed_with_an_error, _cancelled], ids=["row errors", "cancelled"])
def test_a_retry_after_a_lost_retry_runs_the_rows_it_re_queues(
    before, tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    before(job, gpt2_engine, monkeypatch)
    older = _retried_and_failed_again(job, gpt2_engine, monkeypatch)
    newest_state_record(job.dir).write_bytes(older)  # the record before the retry, restored over the newest
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
    older = _retried_and_failed_again(job, gpt2_engine, monkeypatch)
    newest_state_record(job.dir).write_bytes(older)
    status = runner.status(job.dir)
    assert status.state == "completed" and status.errors == 1
    assert (
        "rows were committed under retry generation 1, but its state says 0 (newest state record: "
        "state/00000003.json): the record of a `runner retry` is missing" in status.message
    ), status.message
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0, result.output
    assert "its newest state record said retry generation 0, but the job's files were written under 1" in (
        result.output
    )
    assert read_state(job.dir).generation == 1 and runner.status(job.dir).message is None


@pytest.mark.parametrize("how", ["deleted", "older copy"])
def test_a_lost_cancel_only_undoes_the_cancel(how, tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """What cannot be told: a cancel's record deleted (or the record before it copied over it) leaves no trace
    (no worker writes after a cancel), and the next `runner work` runs the job again; but each row once, the
    rows done before the cancel kept."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    runner.cancel(job.dir)
    runner.retry(job.dir)
    retry = newest_state_record(job.dir).read_bytes()
    asked: list[int] = []
    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert 0 < runner.status(job.dir).done < len(ROWS)
    runner.cancel(job.dir)
    cancel = newest_state_record(job.dir)
    cancel.unlink() if how == "deleted" else cancel.write_bytes(retry)
    status = runner.status(job.dir)
    assert (status.state, status.message) == ("queued (interrupted)", None), status
    assert run_job(job, gpt2_engine, echo=None).finished
    ids = runner.load_results(job.dir)["id"].tolist()
    assert sorted(ids) == sorted(r["id"] for r in ROWS)
