"""A job home that stays unreadable through the retries (a Drive mount failing for a minute): what cannot be
read is said to be unreadable, never `broken` with a `runner repair` hint and never complete. Adversarial
pass 65 (a single transient error at any read held: those are retried)."""

import builtins
import errno
import os
import warnings

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, storage
from runner.jobs import create_job
from runner.scheduler import work
from runner.storage import StorageError
from runner.worker import run_job


def _job(tmp_path, model, home, rows=6):
    lines = ({"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(rows))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), model, GenerationParams(max_new_tokens=3),
                      EngineOptions(batch_size=2), job_dir=home / "job", unit_rows=2)  # fmt: skip


def _failing_listings(monkeypatch, folder, after=0):
    """Listings of `folder` fail with EIO through the retries, after the first `after` of them."""
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    seen = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def failing(p=".", real=real):
            if not isinstance(p, int) and os.fspath(p) == os.fspath(folder):
                seen.append(1)
                if len(seen) > after:
                    raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(p))
            return real(p)

        monkeypatch.setattr(os, name, failing)


def test_status_of_the_home_says_a_job_it_cannot_read_is_unreadable_not_broken(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    _failing_listings(monkeypatch, job.dir / "state")
    [shown] = runner.status(home=runner_home)
    assert shown.state == "unreadable" and "Input/output error" in shown.message, shown
    assert "repair" not in shown.message
    out = invoke("status").output
    assert "unreadable" in out and "broken" not in out and "repair" not in out, out
    monkeypatch.undo()
    assert runner.status(home=runner_home)[0].state == "completed"


def test_load_results_of_a_partial_job_warns_when_its_state_cannot_be_read(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    stopped = iter([False, False, True])  # two batches, then stopped: 4 of 6 rows
    assert run_job(job, gpt2_engine, echo=None, should_stop=lambda: next(stopped, True), shard_rows=2).stopped
    _failing_listings(
        monkeypatch, job.dir / "state", after=2
    )  # the state, then the shards read; then the mount fails
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        df = runner.load_results(job.dir)
    assert 0 < len(df) < 6
    assert any(f"{len(df)} of its 6 results" in str(w.message) and "could not be read" in str(w.message)
               for w in said), [str(w.message) for w in said]  # fmt: skip


def test_an_export_of_a_partial_job_whose_state_cannot_be_read_exits_1(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """`runner results J --to f && upload f`: with the state unreadable, whether the missing rows are lost is
    not known, and the export exited 0 as if the file were all the job would have."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    stopped = iter([False, True])  # one batch, then stopped: 2 of 6 rows
    assert run_job(job, gpt2_engine, echo=None, should_stop=lambda: next(stopped, True), shard_rows=2).stopped
    _failing_listings(monkeypatch, job.dir / "state", after=2)  # (as above)
    result = invoke("results", str(job.dir), "--to", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 1, result.output
    assert "was written, but" in result.output and "could not be read" in result.output, result.output
    assert "its other 4 rows may be lost" in result.output, result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_work_stops_on_a_job_it_cannot_read_instead_of_calling_it_broken(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _job(tmp_path, tiny_gpt2, runner_home)
    _failing_listings(monkeypatch, job.dir)  # Job.open lists the folder
    said = []
    with pytest.raises(StorageError, match="Input/output error"):
        work(runner_home, engine=gpt2_engine, echo=said.append)
    assert not any("broken" in line for line in said), said
    monkeypatch.undo()
    assert runner.status(job.dir).state == "queued"


@pytest.mark.parametrize("unreadable", ["", "state"])  # the job folder itself, or its state records
def test_work_runs_the_other_jobs_before_it_stops_on_the_one_it_cannot_read(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch, unreadable
):
    """One folder unreadable through the retries (the others read) stopped `runner work` before any job ran: a
    broken job breaks only itself, and one that cannot be read for now should not hold up the others either."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    src = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}])
    healthy = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home)
    _failing_listings(monkeypatch, job.dir / unreadable if unreadable else job.dir)
    said = []
    with pytest.raises(StorageError, match="Input/output error"):
        work(runner_home, engine=gpt2_engine, echo=said.append)
    assert runner.status(healthy.dir).state == "completed"
    assert [line for line in said if "cannot be read for now" in line and str(job.dir) in line], said
    assert not any("broken" in line or "repair" in line for line in said), said
    monkeypatch.undo()
    assert runner.status(job.dir).state == "queued"
    work(runner_home, engine=gpt2_engine, echo=None)
    assert runner.status(job.dir).state == "completed"


def test_a_worker_stopped_by_a_read_that_fails_says_the_job_home_cannot_be_read(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """It said "the job home cannot be written (cannot read ...)" of a read (pass 65)."""
    from runner import scheduler

    job = _job(tmp_path, tiny_gpt2, runner_home)

    def run_job(j, *a, **k):
        raise StorageError(f"cannot read {j.dir / 'done'}: Input/output error (errno 5)", errno.EIO)

    monkeypatch.setattr(scheduler, "run_job", run_job)
    with pytest.raises(StorageError) as stopped:
        work(runner_home, engine=gpt2_engine, echo=None)
    assert str(stopped.value).startswith("stopped: the job home cannot be read (cannot read "), stopped.value
    assert f"job {job.id} is consistent" in str(stopped.value)


def test_a_job_folder_denied_for_good_is_broken_and_the_others_run(tmp_path, tiny_gpt2, gpt2_engine, runner_home,
                                                                   monkeypatch):  # fmt: skip
    """Pass 67: only a transient error through the retries is `unreadable`; a folder denied for good (EACCES)
    was too, and stopped `runner work` before the healthy job ran. It is broken, and breaks only itself."""
    locked = _job(tmp_path, tiny_gpt2, runner_home)
    src = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}])
    healthy = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home)
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def denied(p=".", real=real):
            if not isinstance(p, int) and os.fspath(p) == os.fspath(locked.dir):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
            return real(p)

        monkeypatch.setattr(os, name, denied)
    shown = {s.folder: s for s in runner.status(home=runner_home)}
    assert shown[str(locked.dir)].state == "broken" and "Permission denied" in shown[str(locked.dir)].message
    # and not `runner repair`, which cannot help there (adversarial pass 111: another user's umask 077)
    assert (
        "runner repair" not in shown[str(locked.dir)].message
        and "(`ls -ld`)" in shown[str(locked.dir)].message
    )
    said = []
    work(runner_home, engine=gpt2_engine, echo=said.append)
    assert runner.status(healthy.dir).state == "completed"
    skipped = [line for line in said if "is broken" in line]
    assert skipped and "(`ls -ld`)" in skipped[0] and "runner repair" not in skipped[0], said


def test_load_results_of_a_running_job_says_the_rest_is_still_to_come(tmp_path, tiny_gpt2, monkeypatch):
    """Pass 68: it said the rest "are computed only after `runner retry`" of a job a worker is running."""
    import dataclasses

    from runner import job_status as job_status_module

    job = _job(tmp_path, tiny_gpt2, tmp_path / "home")
    real = job_status_module.job_status
    monkeypatch.setattr(
        job_status_module, "job_status", lambda j: dataclasses.replace(real(j), state="running")
    )
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        runner.load_results(job.dir)
    texts = [str(w.message) for w in said]
    assert any("is running" in t and "not computed yet" in t for t in texts) and not any(
        "retry" in t for t in texts
    )


def test_one_job_folder_unreadable_is_shown_so_and_the_rest_of_the_home_as_it_is(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """Pass 89: one job's job.json unreadable through the retries (ESTALE on that one file, the rest of the
    home fine) made `runner status` of the whole home fail, and a lookup by name with it."""
    rows = write_jsonl(
        tmp_path / "p.jsonl", ({"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(2))
    )
    sick, well = (create_job(rows, tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home, name=n)
                  for n in ("sick", "well"))  # fmt: skip
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))

    def failing(real):
        def call(p, *a, **k):
            if os.fspath(p) == os.fspath(sick.dir / "job.json"):
                raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), os.fspath(p))
            return real(p, *a, **k)

        return call

    for module, name in ((os, "lstat"), (os, "stat"), (os, "open"), (builtins, "open")):
        monkeypatch.setattr(module, name, failing(getattr(module, name)))
    shown = {s.folder: s.state for s in runner.status(home=runner_home)}
    assert shown == {str(sick.dir): "unreadable", str(well.dir): "queued"}, shown
    assert runner.status("well", home=runner_home).id == well.id


def test_a_worker_waits_for_the_jobs_others_hold_while_one_folder_does_not_read(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """With one folder unreadable for now and the only other job held by a live worker, `runner work` stopped
    with the read error instead of waiting for that job, as it waits when every folder reads."""
    from runner.jobdir import Heartbeat, Owner, take_unit

    job = _job(tmp_path, tiny_gpt2, runner_home)
    held = create_job(write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}]), tiny_gpt2,
                      GenerationParams(max_new_tokens=2), home=runner_home)  # fmt: skip
    other = Owner.me("other-worker")
    Heartbeat(held, other, ttl=600).beat()
    assert take_unit(held, 0, other, -1) == 0  # its only unit, held by a live worker
    _failing_listings(monkeypatch, job.dir)
    said = []
    waited = lambda: any("the rest is held by worker other-worker" in line for line in said)  # noqa: E731
    assert work(runner_home, engine=gpt2_engine, echo=said.append, poll=0.05, stop=waited) == []
    assert any("cannot be read for now" in line and str(job.dir) in line for line in said), said


def test_the_deadline_counts_the_jobs_whose_folder_does_not_read_among_those_left(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """ "stopped at the deadline with N jobs left" left out a folder unreadable for now: it may be queued too."""
    job = _job(tmp_path, tiny_gpt2, runner_home)
    create_job(write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}]), tiny_gpt2,
               GenerationParams(max_new_tokens=2), home=runner_home)  # fmt: skip
    _failing_listings(monkeypatch, job.dir)
    result = invoke("work", "--hours", "0.0000001")
    assert result.exit_code == 0, result.output
    assert "stopped at the deadline (--hours/--until) with 1 job left to run (and 1 whose folder could not be " \
           "read just now); run `runner work` again" in result.stderr, result.stderr  # fmt: skip


@pytest.mark.parametrize("folder", ["done", "shards"])
def test_a_listed_file_the_mount_once_says_is_missing_is_read_again(folder, tmp_path, tiny_gpt2, gpt2_engine,
                                                                    monkeypatch):  # fmt: skip
    """The folder lists a commit's marker (or shard) and opening it answers "no such file" once, as a flaky
    mount does: it is read again, and every row is there (pass 102: its rows were dropped, and the warning
    said the job completed while its results were being read)."""
    job = _job(tmp_path, tiny_gpt2, tmp_path)
    assert run_job(job, gpt2_engine, echo=None).finished
    (job.dir / "verified.json").unlink()  # (a cache of checks: every marker and shard is read again)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    real, missed = builtins.open, []

    def flaky(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(job.dir / folder) and path not in missed:
            missed.append(path)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = runner.load_results(job.dir)
    assert missed and sorted(df["id"]) == [f"r{i}" for i in range(6)]


@pytest.mark.parametrize("name", ["p.jsonl", "p.parquet", "p.csv", "p.txt"])
def test_a_prompt_file_on_a_flaky_mount_is_read_again_not_refused(tmp_path, tiny_gpt2, monkeypatch, name):
    """The prompt file on a Drive mount that drops requests: every first open, read and stat of it fails (EIO or
    ENOTCONN). The submit reads it again, as reads in the job home are, and stores the job a submit without
    faults stores (adversarial pass 140: `runner submit` said 'cannot read or write ...: Input/output error')."""
    import fsfaults
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(5)]
    path = tmp_path / "in" / name
    path.parent.mkdir()
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".csv"):
        pyarrow.csv.write_csv(pa.Table.from_pylist(rows), path)
    elif name.endswith(".txt"):
        path.write_text("".join(r["prompt"] + "\n" for r in rows))
    else:
        write_jsonl(path, rows)
    params = GenerationParams(max_new_tokens=3)
    plain = create_job(path, tiny_gpt2, params, home=tmp_path / "plain")
    faults = fsfaults.FsFaults(path.parent, eio=1.0, eio_dirs=(".",), retry_delays=[0.0] * 4)
    faults.install(monkeypatch)
    job = create_job(path, tiny_gpt2, params, home=tmp_path / "flaky")
    monkeypatch.undo()
    assert faults.eio_count >= 2  # (the faults landed: at least the hash's open and a stat)
    assert job.meta["fingerprint"] == plain.meta["fingerprint"]
    assert pq.read_table(job.dir / "prompts.parquet").equals(pq.read_table(plain.dir / "prompts.parquet"))


def _pathlib_of_python_3_13(monkeypatch):
    """Path.exists / is_file / is_dir as Python 3.13 has them: os.path's, which say False of any error."""
    import pathlib

    for look, call in (("exists", os.path.exists), ("is_file", os.path.isfile), ("is_dir", os.path.isdir)):
        monkeypatch.setattr(pathlib.Path, look, lambda self, *a, call=call, **k: call(self))


def _one_stat_fails(monkeypatch, path, nth):
    """The `nth` os.stat of `path` fails with EIO (a Drive mount that dropped that one request)."""
    real, seen = os.stat, []

    def stat(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            seen.append(p)
            if len(seen) == nth:
                raise OSError(errno.EIO, "Input/output error", os.fspath(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 4)


def test_a_look_at_the_prompt_file_or_model_that_fails_once_is_retried_on_python_3_13(
    tmp_path, tiny_gpt2, monkeypatch
):
    """From Python 3.13 on, Path.is_file / is_dir / exists say False of a transient EIO instead of raising it:
    the retry around them never ran, and a prompt file on a Drive mount that dropped one look was refused as
    "not a file", a model folder as "no config.json in ...: not a model folder"."""
    import shutil

    from runner.models import reading_model, resolve_model

    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(3)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    for nth in range(1, 5):  # (each look of the submit at the file)
        with monkeypatch.context() as m:
            _pathlib_of_python_3_13(m)
            _one_stat_fails(m, prompts, nth)
            job = create_job(
                prompts, tiny_gpt2, GenerationParams(max_new_tokens=3), home=tmp_path / f"h{nth}"
            )
        assert job.meta["input"]["rows"] == 3
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    with monkeypatch.context() as m:  # (transformers' own look at config.json is its own)
        _pathlib_of_python_3_13(m)
        _one_stat_fails(m, model / "config.json", 1)
        assert reading_model(lambda: resolve_model(str(model)), str(model)) == str(model)
