"""Readers that read a job more than once agree with themselves when a writer acts between their reads (pass 74):
`load_results`' partial notice counts the rows it returns, the report's errors are those of the retry
generation its summary counts, and an export's errors file explains the rows it writes."""

import warnings

import pytest
from helpers import completed_with_a_row_error, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, job_report, jobdir, results
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said that " * (1 + i % 3)} for i in range(8)]


def _half_done(tmp_path, model):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), model, PARAMS, OPTIONS, job_dir=tmp_path / "job",
                     unit_rows=4)  # fmt: skip
    run_job(job, echo=None, should_stop=lambda: any((job.dir / "done").iterdir()))
    assert runner.status(job.dir).done == 4
    return job


def test_results_read_as_the_job_completes_are_said_to_be_partial(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """The shards were read, then a worker completed the job, then the notice asked the status: 4 of 8 rows came
    back without a word (the status said completed)."""
    job = _half_done(tmp_path, tiny_gpt2)
    real = results.read_results_table

    def read_then_the_job_completes(j, *ledger):
        table = real(j, *ledger)
        assert run_job(job, gpt2_engine, echo=None).finished
        return table

    monkeypatch.setattr(results, "read_results_table", read_then_the_job_completes)
    with pytest.warns(UserWarning, match="completed while its results were being read: these are 4 of its 8"):
        assert len(runner.load_results(job.dir)) == 4
    monkeypatch.setattr(results, "read_results_table", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read again: all of them, nothing to say
        assert len(runner.load_results(job.dir)) == 8


def test_a_report_read_across_a_retry_counts_the_errors_it_lists(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """A `runner retry` landing between the report's status and its ledger: the summary said 1 row error, the
    errors section (read at the new generation) listed none."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    assert runner.status(job.dir).errors == 1
    real, retried = jobdir.live_workers, []

    def live_then_retry(j, *a, **k):  # read by the report right after its status
        if not retried:
            retried.append(runner.retry(j.dir))
        return real(j, *a, **k)

    monkeypatch.setattr(jobdir, "live_workers", live_then_retry)
    data = job_report.collect(jobdir.Job.open(job.dir))
    listed = sum(n for (stage, _), n in data.errors.items() if stage != "validate")
    assert retried and (data.status.errors, listed) == (1, 1)


def test_an_export_read_across_a_retry_lists_the_errors_of_the_rows_it_lacks(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    real, retried = results.read_errors, []

    def read_errors_then_retry(*a, **k):  # a retry lands between the export's two reads
        out = real(*a, **k)
        retried.append(runner.retry(job.dir))
        return out

    monkeypatch.setattr(results, "read_errors", read_errors_then_retry)
    with pytest.warns(UserWarning, match="these are 7 of its 8"):
        done = runner.export_results(job.dir, tmp_path / "out.jsonl", errors_to=tmp_path / "errors.jsonl")
    assert retried and (done.rows, done.errors) == (7, 1)


def test_an_export_read_across_a_retry_and_its_worker_names_each_row_once(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """Pass 94: a retry and the worker that computed the failed row again landing between the export's two
    reads: that row was in the rows file and in the errors file, without a word."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    real, redone = results.read_errors, []

    def read_errors_then_retry_and_work(*a, **k):
        out = real(*a, **k)
        if not redone:
            runner.retry(job.dir)
            redone.append(run_job(job, gpt2_engine, echo=None).finished)  # r1, healthy now
        return out

    monkeypatch.setattr(results, "read_errors", read_errors_then_retry_and_work)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row came back: nothing to say
        done = runner.export_results(job.dir, tmp_path / "out.jsonl", errors_to=tmp_path / "errors.jsonl")
    assert redone == [True] and (done.rows, done.errors) == (8, 0)
    assert (tmp_path / "errors.jsonl").read_text() == ""


def test_an_openai_export_read_as_the_job_completes_is_whole(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    """Pass 94: the last worker completing the job between the export's ledger and its state: the export said
    the completed job had lost 2 rows and advised `runner repair`."""
    job = _half_done(tmp_path, tiny_gpt2)
    real, finished = jobdir.job_progress, []

    def progress_then_the_job_completes(j, ledger=None):
        progress = real(j, ledger)
        if not finished:
            monkeypatch.setattr(jobdir, "job_progress", real)  # (the worker reads it too)
            finished.append(run_job(job, gpt2_engine, echo=None).finished)
            monkeypatch.setattr(jobdir, "job_progress", progress_then_the_job_completes)
        return progress

    monkeypatch.setattr(jobdir, "job_progress", progress_then_the_job_completes)
    done = runner.export_results(job.dir, tmp_path / "out.jsonl", format="openai")
    assert finished == [True] and (done.rows, done.errors) == (8, 0)


def test_results_read_while_a_change_of_state_is_being_written_without_links(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 94: where links are not supported a `cancel` or `retry` creates its record empty, then fills it.
    Status shows the state before it meanwhile; `load_results` and the exports refused ("try again in a
    moment"), though the rows need no state (and the row errors that of the record before)."""
    import errno
    import os

    job = _half_done(tmp_path, tiny_gpt2)

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    (job.dir / "state" / jobdir.record_name(jobdir.newest_state_seq(job.dir) + 1)).write_bytes(b"")
    assert "a change of state is being written" in runner.status(job.dir).message
    with pytest.warns(UserWarning, match="4 of its 8"):
        assert sorted(runner.load_results(job.dir)["id"]) == ["r0", "r1", "r2", "r3"]
    with pytest.warns(UserWarning, match="4 of its 8"):
        done = runner.export_results(job.dir, tmp_path / "out.jsonl", errors_to=tmp_path / "errors.jsonl")
    assert (done.rows, done.errors) == (4, 0)
