"""Adversarial pass 273: `runner work` on a job home kept on a flaky mount (Google Drive from Colab: transient EIO
on reads and writes, ENOSPC, stale handles, slow renames). Faults are injected on the calls themselves, never timed.

Found, and kept fixed below:
  * A job's log.txt that could not be appended to (Drive full, or the append failing through a minute of retries)
    stopped `runner work` ("Error: stopped: the job home cannot be written (cannot append to .../log.txt ...)"),
    though log.txt is only a record: the worker wrote every line it said there (`JobRun.say`: a unit's first line)
    unguarded. A line that does not land is dropped; the rows are what the shards say.
  * stats.json failing to write as the job's last rows were done (its read was guarded, "only informative", its
    write not) left the job queued with every row done and stopped `runner work` with "the job home cannot be
    written", the jobs queued after it not run. The run's line is left out (said in log.txt) and the job completes.
  * A job failed by `runner work` (its model changed since submit, say) whose log.txt then did not take the line
    "failed: ..." ended `runner work` with "Error: cannot append to .../log.txt" before it said "job ... failed"
    and before the jobs queued after it ran (`_settle_failure` wrote the line unguarded, as no other line of the
    scheduler is): the failure is said and the next job runs.
  * A worker that found a commit damaged (a shard Drive served changed) moved it to quarantine/, then stopped with
    "Error: stopped: the job home cannot be written (... log.txt ...)" where its line "quarantined commit ..." did
    not land: `jobdir.quarantine` wrote it unguarded. The commit is aside, its rows computed again, the job runs.
  * Google Drive unmounted under `runner work` (the whole home gone, not one job's folder): the worker said the
    job's folder was "gone (moved or deleted while this worker ran it)", then "nothing to do: no queued or
    interrupted jobs", and exited 0, so `runner work && next-step` went on with the jobs half done or not begun.
    A job folder missing with the folder holding it is the home gone: the worker stops, exit 1, "Error: stopped:
    the job home cannot be written (its folder HOME is gone (Google Drive unmounted? ...)); job ... resumes".
  * Drive unmounted between two jobs (the first one's end said): the queue read as empty, and `runner work` ended
    with exit 0, its last word "job ... completed", the next jobs never begun. The home there at the start and
    gone once the queue reads empty is a stop: exit 1, "Error: stopped: the job home HOME is gone (...)" (a home
    that is a link to Drive too: the link stays, dangling, so links are followed for this look).
  * Drive unmounted as a job completed: its end was said "6/6 rows, 0 errors; not completed: it became queued as
    this run ended (a `runner retry` or `runner repair`)", a missing folder's state reading as queued. It says
    the rows are saved and its folder is gone now.
  * `runner work --background`'s log file (in the home's logs/, on Drive) failing one write (a passing EIO) went
    silent for the rest of the run: the failed write was taken for its reader gone (a closed terminal) and stderr
    pointed at /dev/null, so the worker's later lines and its last word (an error) never reached the log. A file
    keeps its stream: the one line is dropped.
"""

from __future__ import annotations

import errno
import json
import os

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, storage
from runner.jobdir import read_state
from runner.jobs import create_job
from runner.scheduler import work
from runner.worker import run_job

N = 6


def _job(tmp_path, model, home):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(N)]
    return create_job(write_jsonl(tmp_path / "p.jsonl", rows), model, GenerationParams(max_new_tokens=2),
                      EngineOptions(), home=home, unit_rows=2)  # fmt: skip


def _failing(monkeypatch, name: str, call: str, errno_: int):
    """storage.CALL failing through the retries (StorageError) for every file named NAME."""
    real = getattr(storage, call)

    def failing(path, *a, **k):
        if str(path).endswith(name):
            raise storage.StorageError(
                f"cannot write {path}: {errno.errorcode[errno_]} (errno {errno_})", errno_
            )
        return real(path, *a, **k)

    monkeypatch.setattr(storage, call, failing)


def _completed_once(job) -> None:
    """Completed, each row in exactly one counted shard (load_results would hide a duplicate)."""
    import pyarrow.parquet as pq

    from runner.results import ORDER, valid_shards

    assert read_state(job.dir).state == "completed"
    rows = [
        r
        for shard in valid_shards(job.dir)
        for r in pq.read_table(shard, columns=[ORDER]).column(0).to_pylist()
    ]
    assert sorted(rows) == list(range(N))
    assert sorted(runner.load_results(job.dir)["id"]) == sorted(f"r{i}" for i in range(N))


def test_a_log_txt_that_cannot_be_appended_to_stops_nothing(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _failing(monkeypatch, "log.txt", "append_line", errno.ENOSPC)
    said: list[str] = []
    (summary,) = work(runner_home, echo=said.append, shard_rows=2)
    assert summary.finished and summary.generated == N
    assert any(f"job {job.id} completed" in line for line in said)  # (still said on the console)
    _completed_once(job)


def test_stats_json_failing_to_write_at_the_end_still_completes_the_job(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _failing(monkeypatch, "stats.json", "write_json", errno.EIO)
    (summary,) = work(runner_home, echo=None, shard_rows=2)
    assert summary.finished
    _completed_once(job)
    monkeypatch.undo()
    assert "stats.json not updated: cannot write" in (job.dir / "log.txt").read_text()


def test_a_job_failed_whose_log_txt_cannot_be_appended_to_lets_the_next_job_run(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    rows = [{"id": "r0", "prompt": "hello"}]
    changed = create_job(write_jsonl(tmp_path / "q.jsonl", rows), str(model), GenerationParams(max_new_tokens=2),
                         EngineOptions(), home=runner_home, name="changed")  # fmt: skip
    cfg = json.loads((model / "config.json").read_text())
    cfg["n_layer"] = 1  # the user saved another model into its folder
    (model / "config.json").write_text(json.dumps(cfg))
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _failing(monkeypatch, f"{changed.id}/log.txt", "append_line", errno.ENOSPC)
    said: list[str] = []
    summaries = work(runner_home, echo=said.append, shard_rows=2)
    assert read_state(changed.dir).state == "failed"
    assert any(f"job {changed.id} failed: the model" in line for line in said)
    assert [s.job_id for s in summaries] == [job.id]
    _completed_once(job)


def test_a_commit_quarantined_whose_log_line_does_not_land_stops_nothing(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    first = run_job(job, echo=None, shard_rows=2, should_stop=lambda: any((job.dir / "done").glob("*.json")))
    assert not first.finished and first.done == 2
    (shard,) = (job.dir / "shards").glob("*.parquet")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # Drive served the shard changed (a sync conflict's copy written over it)
    shard.write_bytes(bytes(data))
    _failing(monkeypatch, "log.txt", "append_line", errno.EIO)
    (summary,) = work(runner_home, echo=None, shard_rows=2)
    assert summary.finished
    _completed_once(job)
    assert list((job.dir / "quarantine").iterdir())


def test_a_job_home_gone_mid_run_stops_the_worker_with_exit_1_not_nothing_to_do(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    from runner import jobdir

    jobs = [_job(tmp_path, tiny_gpt2, runner_home) for _ in range(2)]
    real, away = jobdir.write_marker, tmp_path / "away"

    def unmounted_after(job, *a, **k):  # Drive unmounted right after the first commit's marker
        real(job, *a, **k)
        monkeypatch.setattr(jobdir, "write_marker", real)
        os.rename(runner_home, away)

    monkeypatch.setattr(jobdir, "write_marker", unmounted_after)
    r = invoke("--home", str(runner_home), "work", "--shard-rows", "2")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "nothing to do" not in r.output and "(moved or deleted while this worker ran it)" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(
        f"Error: stopped: the job home cannot be written (its folder {runner_home} is gone "
    ), last
    assert "Google Drive unmounted?" in last and "resumes with the next `runner work`" in last, last
    monkeypatch.undo()
    os.rename(away, runner_home)  # mounted again
    assert len(work(runner_home, echo=None, shard_rows=2)) == 2
    for job in jobs:
        _completed_once(job)


@pytest.mark.parametrize("linked", [False, True])  # (True: the home a link to Drive, dangling once unmounted)
def test_a_job_home_gone_between_two_jobs_stops_the_worker_with_exit_1(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, linked
):
    from runner import scheduler

    jobs = [_job(tmp_path, tiny_gpt2, runner_home) for _ in range(2)]
    home = runner_home
    if linked:
        home = tmp_path / "jobs"
        home.symlink_to(runner_home)
    away = tmp_path / "away"
    _unmounted_after(monkeypatch, scheduler, "_settle", runner_home, away)  # once the first job's end is said
    r = invoke("--home", str(home), "work", "--shard-rows", "2")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    first = sorted(job.id for job in jobs)[0]  # (the worker takes the jobs in the order of their ids)
    assert f"job {first} completed: 6/6 rows" in r.output and r.output.count("starting job") == 1
    last = r.output.strip().splitlines()[-1]
    assert last == (f"Error: stopped: the job home {home} is gone (Google Drive unmounted? or the folder moved "
                    "or deleted); its jobs resume with the next `runner work` once it is back"), last  # fmt: skip
    monkeypatch.undo()
    os.rename(away, runner_home)  # mounted again
    work(home, echo=None, shard_rows=2)
    for job in jobs:
        _completed_once(job)


def _unmounted_after(monkeypatch, module, name: str, home, away) -> None:
    """Drive unmounted (the home moved to `away`) right after the first call of `module.name`."""
    real = getattr(module, name)

    def unmounted_after(*a, **k):
        out = real(*a, **k)
        monkeypatch.setattr(module, name, real)
        os.rename(home, away)
        return out

    monkeypatch.setattr(module, name, unmounted_after)


def test_a_job_home_gone_as_a_job_completes_is_not_said_queued_by_a_retry(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    from runner import jobdir

    jobs = [_job(tmp_path, tiny_gpt2, runner_home) for _ in range(2)]
    away = tmp_path / "away"
    # (as the first job completed, before its end is said)
    _unmounted_after(monkeypatch, jobdir, "write_completed", runner_home, away)
    r = invoke("--home", str(runner_home), "work", "--shard-rows", "2")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "became queued" not in r.output and "runner retry" not in r.output, r.output
    first = sorted(job.id for job in jobs)[0]
    assert f"job {first}: 6/6 rows, 0 errors saved; its folder is gone now" in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"Error: stopped: the job home {runner_home} is gone")
    monkeypatch.undo()
    os.rename(away, runner_home)
    work(runner_home, echo=None, shard_rows=2)
    for job in jobs:
        _completed_once(job)


def test_a_background_workers_log_file_failing_one_write_keeps_the_lines_after(tmp_path, monkeypatch):
    import click

    from runner import cli

    log = open(
        tmp_path / "work.log", "w", buffering=1
    )  # what `runner work --background` writes to (on Drive)
    monkeypatch.setattr("sys.stderr", log)
    real, calls = click.echo, []

    def echo(message, err=False, **kw):
        calls.append(message)
        if len(calls) == 1:  # Drive drops one write of the log
            raise OSError(errno.EIO, "Input/output error")
        return real(message, err=err, **kw)

    monkeypatch.setattr(click, "echo", echo)
    cli._echo("a line Drive dropped")
    cli._echo("job J completed: 6/6 rows, 0 errors")
    log.close()
    assert (tmp_path / "work.log").read_text() == "[runner] job J completed: 6/6 rows, 0 errors\n"
