"""Adversarial pass 257: one file of a job folder that fails every read with EIO for hours (its copy on Google Drive
unavailable or corrupted) while every other file reads: job.json, its backup, prompts.parquet, the newest state
record and the one below, a claim, a shard and its marker, stats.json, verified.json, a heartbeat, errors.jsonl,
the home's .names claims, and the listings of state/, shards/, done/, claims/ and the job folder itself.

Found, and kept fixed below:
  * `runner work` stopped the whole home ("stopped: the job home cannot be read (cannot read .../prompts.parquet
    ...)") before a healthy job there ran, when one job's prompts.parquet (or the listing of its shards/) did not
    read through the retries: the queue skips a folder that does not read and runs the others, but a read failing
    inside a job's run was taken for the whole home failing. That job is now skipped, tried again once other jobs
    have run, and the worker stops on it (the same message) only when nothing else is left.
  * a verified.json that did not read through the retries held its whole job: `runner work` skipped it, `runner
    status` showed it unreadable, `runner results` and `runner repair` failed, for as long as that one file did
    not read. It is only a cache of shard checksums: the shards are verified afresh instead.
  * a heartbeat that did not read through the retries (left by a worker killed in the job, on a file Drive could
    not serve) held its job: `runner work` skipped it, `runner status` showed it unreadable, `runner results`
    exited 1 and `runner repair` failed, for as long. It is taken as a damaged heartbeat is: stale.
  * a job.json that did not read through the retries held its job, and `runner repair`, which restores a damaged or
    missing one from job.backup.json, failed on it ("cannot read .../job.json"); where its stat failed too, every
    command given the job's folder failed before reading anything (`find_job` looked for job.json first). Repair
    now sets it aside in quarantine/ and restores it from the backup, where that reads as this folder's job's spec.
  * a commit whose marker or shard did not read through the retries held its job (status unreadable, results
    refused, work skipped it), and `runner repair`, which sets aside a commit that does not verify, failed on it.
    Repair sets it aside in quarantine/ as one that does not verify (its stat failing too), and its rows are
    computed again; only where job.json reads then, so that a home that does not read now is never taken apart.
  * `runner repair` stopped on any file of the folder whose stat failed for good (stats.json, job.backup.json, a
    claim, a heartbeat, verified.json: "cannot read .../stats.json") as it looked at each file's kind, where
    nothing else it does needs that file. Such a file is left where it is.
  * a state record below the newest that did not read through the retries held its job (each reader checks the
    newest against the one below: status unreadable, results refused, work skipped it; "known and accepted"), and
    `runner repair` failed on it. Its word never counts where the record above it reads whole and is neither a
    repair's blind record nor a worker's outcome (`_late_word_stands`), and a job whose record below is gone reads:
    repair sets such a record aside in quarantine/ and says so. The newest record, and one right below a blind
    record or an outcome, are left (repair stops on them, naming the file): moving those could change the state.
  * a prompts.parquet that did not read through the retries held its job, and `runner repair`, which writes a
    damaged or missing one again from the input file when that is unchanged, failed on it ("cannot read
    .../prompts.parquet"). It is set aside in quarantine/ (moved: it cannot be copied) and written again, byte for
    byte as submit wrote it (its sha256), where job.json reads then; errors.jsonl likewise.
"""

from __future__ import annotations

import errno
import os

import pytest
from fsfaults import Unreadable
from helpers import assert_exactly_once, invoke, reference_run, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job
from runner.scheduler import work
from runner.storage import StorageError
from runner.worker import run_job

ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(6)]
PARAMS, OPTIONS = GenerationParams(max_new_tokens=3), EngineOptions(batch_size=2)


@pytest.fixture
def two_jobs(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """(sick, well, reference results of sick): sick has 4 of its 6 rows done, well is queued."""
    prompts, ref = reference_run(tmp_path, tiny_gpt2, ROWS, PARAMS, OPTIONS)
    sick = create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="sick", unit_rows=2)
    stopped = iter([False, False, True])
    run_job(sick, gpt2_engine, echo=None, should_stop=lambda: next(stopped, True), shard_rows=2)
    well = create_job(write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}]), tiny_gpt2,
                      GenerationParams(max_new_tokens=2), home=runner_home, name="well")  # fmt: skip
    return sick, well, ref


@pytest.mark.parametrize("bad", ["prompts.parquet", "shards"])
def test_a_job_whose_prompts_or_shards_do_not_read_for_good_leaves_the_others_to_run(
    bad, two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """`runner work` stopped the whole home ("stopped: the job home cannot be read") before the healthy job ran,
    as its reads of the sick job's prompts (or the listing of its shards/) failed through the retries: a file Drive
    cannot serve for hours held every job of the home for as long."""
    sick, well, ref = two_jobs
    Unreadable(runner_home, [sick.dir / bad]).install(monkeypatch)
    said = []
    with pytest.raises(StorageError) as stopped:
        work(runner_home, engine=gpt2_engine, echo=said.append, poll=0.01)
    assert runner.status(well.dir).state == "completed", said
    assert str(sick.dir / bad) in str(stopped.value) and "Input/output error" in str(stopped.value)
    assert "repair" not in str(stopped.value)
    assert [line for line in said if f"job {sick.id} cannot be read for now" in line and bad in line], said
    monkeypatch.undo()
    work(runner_home, engine=gpt2_engine, echo=None)
    assert runner.status(sick.dir).state == "completed"
    assert_exactly_once(sick.dir, ref)


def test_a_home_gone_as_a_whole_after_a_jobs_read_failed_stops_as_it_did(two_jobs, gpt2_engine, runner_home,
                                                                         monkeypatch):  # fmt: skip
    """The whole mount gone (ENOTCONN everywhere) from the sick job's read of its prompts on: the worker stops with
    the stop that read said, naming the job that stays consistent, not a bare "cannot list HOME"."""
    sick, well, _ = two_jobs

    class Gone(Unreadable):
        down = False

        def _transient(self, path, kind):
            if isinstance(path, int) or not self._ours(path):
                return
            self.down = self.down or os.path.realpath(os.fsdecode(path)) in self.bad
            if self.down:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN), os.fsdecode(path))

    Gone(runner_home, [sick.dir / "prompts.parquet"]).install(monkeypatch)
    result = invoke("work")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: stopped: the job home cannot be read (cannot read {sick.dir / 'prompts.parquet'}: Transport "
        f"endpoint is not connected (errno 107)); job {sick.id} is consistent and resumes with the next `runner "
        "work` (or the same `runner run` again)"
    ), result.output


def test_a_verified_json_that_does_not_read_for_good_is_a_cache_started_afresh(
    two_jobs, gpt2_engine, runner_home, monkeypatch, tmp_path
):
    """verified.json is only a cache of shard checksums, but one Drive could not serve held its whole job: `runner
    work` skipped it, `runner status` showed it unreadable, `runner results` and `runner repair` failed, for as
    long as that one file did not read. The shards are verified afresh instead (a home that fails as a whole
    fails on them)."""
    sick, well, ref = two_jobs
    Unreadable(runner_home, [sick.dir / "verified.json"]).install(monkeypatch)
    assert runner.status(sick.dir).state == "queued (interrupted)"
    with pytest.warns(UserWarning, match="these are 4 of its 6 results"):
        assert len(runner.load_results(sick.dir)) == 4
    work(runner_home, engine=gpt2_engine, echo=None)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    result = invoke("results", str(sick.dir), "--to", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    # (its contents only: where its stat fails too, `runner repair` stops on it, naming it)
    Unreadable(runner_home, [sick.dir / "verified.json"], kinds=("read",)).install(monkeypatch)
    assert runner.repair(sick.dir).state_now == "completed"
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


def test_a_job_skipped_for_a_file_that_did_not_read_runs_once_the_others_have_if_it_reads_then(
    two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """The skipped job is tried again when nothing else is left: the file reads by then, and it completes in the
    same `runner work`."""
    sick, well, ref = two_jobs
    faults = Unreadable(runner_home, [sick.dir / "prompts.parquet"]).install(monkeypatch)
    said = []

    def echo(line):
        said.append(line)
        if line.startswith(f"job {well.id} completed"):
            faults.bad.clear()  # the mount serves it again

    work(runner_home, engine=gpt2_engine, echo=echo, poll=0.01)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"], said
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


def test_a_dead_workers_heartbeat_that_does_not_read_for_good_holds_nothing(
    two_jobs, gpt2_engine, runner_home, monkeypatch, tmp_path
):
    """A worker killed in a job leaves its heartbeat; one Drive could not serve held the job for as long: `runner
    work` skipped it ("cannot be read for now"), `runner status` showed it unreadable, `runner results` exited 1
    and `runner repair` failed on it. A heartbeat that does not read is taken as a damaged one is: stale (a live
    worker renews its heartbeat with a new file each beat; the unit it held is fenced by its claim's epoch, so a
    worker taken for dead wrongly commits nothing twice)."""
    from runner.jobdir import Heartbeat, Owner, take_unit

    sick, well, ref = two_jobs
    # (on another machine: not provably dead, and its heartbeat, were it read, is fresh for 10 minutes)
    dead = Owner(worker="dead-worker", host="another-vm", pid=4242, boot=None, pidns=None, start=None)
    Heartbeat(sick, dead, ttl=600).beat()
    assert take_unit(sick, 2, dead, 0) == 1  # the unit left (its epoch 0 the stopped run's), held by it
    Unreadable(runner_home, [sick.dir / "workers" / "dead-worker.json"]).install(monkeypatch)
    assert runner.status(sick.dir).state == "queued (interrupted)"
    work(runner_home, engine=gpt2_engine, echo=None, poll=0.01)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    result = invoke("results", str(sick.dir), "--to", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 0, result.output
    assert runner.repair(sick.dir).state_now == "completed"
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


@pytest.mark.parametrize("stat_fails", [False, True])
def test_repair_restores_a_job_json_that_does_not_read_for_good_from_its_backup(
    stat_fails, two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """A job.json Drive could not serve held its job for as long (status unreadable, results refused, work skipped
    it), and `runner repair`, which restores a damaged or missing one from job.backup.json, failed on it ("cannot
    read job.json"). It is set aside in quarantine/ and restored from the backup, as a missing one is."""
    sick, well, ref = two_jobs
    kinds = ("read", "stat", "list") if stat_fails else ("read",)
    Unreadable(runner_home, [sick.dir / "job.json"], kinds=kinds).install(monkeypatch)
    assert {s.name: s.state for s in runner.status(home=runner_home)}["sick"] == "unreadable"
    report = runner.repair(sick.dir)
    assert report.restored_spec and report.state_now == "queued", report
    assert [p.name for p in (sick.dir / "quarantine").iterdir() if p.name.endswith("-job.json")]
    assert "job.json did not read" in (sick.dir / "log.txt").read_text()
    work(runner_home, engine=gpt2_engine, echo=None)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


@pytest.mark.parametrize("backup", ["unreadable", "another job's"])
def test_repair_of_a_job_json_that_does_not_read_leaves_it_without_a_backup_of_its_own(
    backup, two_jobs, runner_home, monkeypatch
):
    """The backup does not read either (the whole folder failing), or is another job's spec (copied in): nothing is
    set aside, and repair says it cannot read job.json."""
    sick, well, _ = two_jobs
    bad = [sick.dir / "job.json"]
    if backup == "unreadable":
        bad.append(sick.dir / "job.backup.json")
    else:
        (sick.dir / "job.backup.json").write_bytes((well.dir / "job.json").read_bytes())
    Unreadable(runner_home, bad).install(monkeypatch)
    with pytest.raises(StorageError, match="cannot read .*/job.json: Input/output error"):
        runner.repair(sick.dir)
    monkeypatch.undo()
    assert (sick.dir / "job.json").exists() and not list((sick.dir / "quarantine").iterdir())


@pytest.mark.parametrize("bad", ["done", "shards"])
@pytest.mark.parametrize("stat_fails", [False, True])
def test_repair_sets_aside_a_commit_that_does_not_read_for_good_and_its_rows_are_computed_again(
    bad, stat_fails, two_jobs, gpt2_engine, runner_home, monkeypatch, tmp_path
):
    """A commit's marker (or shard) Drive could not serve held its job (status unreadable, results refused, work
    skipped it), and `runner repair`, which sets aside a commit that does not verify, failed on it. It is set aside
    in quarantine/ as one that does not verify is, and its rows are computed again: exactly once."""
    sick, well, ref = two_jobs
    name = "00000-00000000-0000"
    path = sick.dir / bad / f"{name}.{'json' if bad == 'done' else 'parquet'}"
    kinds = ("read", "stat", "list") if stat_fails else ("read",)
    Unreadable(runner_home, [path], kinds=kinds).install(monkeypatch)
    with pytest.raises(StorageError, match=f"cannot read {path}"):
        runner.load_results(sick.dir)
    report = runner.repair(sick.dir)
    assert [n for n, _ in report.quarantined] == [name] and "did not read" in report.quarantined[0][1], report
    assert report.state_now == "queued" and report.done == 2, report
    work(runner_home, engine=gpt2_engine, echo=None)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    assert_exactly_once(sick.dir, ref)
    result = invoke("results", str(sick.dir), "--to", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


@pytest.mark.parametrize(
    "name", ["stats.json", "job.backup.json", "claims/00000-00000000.json", "verified.json"]
)
def test_repair_of_a_job_with_a_file_it_does_not_need_that_does_not_read_or_stat_goes_on(
    name, two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """`runner repair` looks at the kind of each file of the folder (a folder where a file belongs is set aside) and
    stopped on one whose stat failed for good ("cannot read .../stats.json"), where nothing else it does needs
    that file: such a file is left where it is."""
    sick, well, ref = two_jobs
    work(runner_home, engine=gpt2_engine, echo=None)
    Unreadable(runner_home, [sick.dir / name]).install(monkeypatch)
    report = runner.repair(sick.dir)
    assert report.state_now == "completed" and report.done == 6 and not report.quarantined, report
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


def test_repair_sets_aside_a_state_record_below_the_newest_that_does_not_read_for_good(
    two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """A state record below the newest that Drive could not serve held its job (each reader checks the newest
    against it: status unreadable, results refused, work skipped it), and `runner repair` failed on it. Its word
    never counts (the newest's does), and a job whose record below is gone reads: repair sets it aside in
    quarantine/, and the job goes on under the newest record."""
    sick, well, ref = two_jobs
    runner.cancel(sick.dir)
    assert runner.retry(sick.dir) == 0  # records 1 (cancelled) and 2 (queued, retry generation 1)
    below = sick.dir / "state" / "00000001.json"
    Unreadable(runner_home, [below]).install(monkeypatch)
    assert {s.name: s.state for s in runner.status(home=runner_home)}["sick"] == "unreadable"
    result = invoke("repair", str(sick.dir))
    assert result.exit_code == 0, result.output
    assert "state/00000001.json, below the newest state record, did not read through the retries: set aside in " \
           "quarantine/" in result.output, result.output  # fmt: skip
    assert runner.status(sick.dir).state == "queued (interrupted)" and runner.status(sick.dir).generation == 1
    report = runner.repair(sick.dir)  # (once is enough)
    assert report.unread_records == [] and report.state_now == "queued", report
    work(runner_home, engine=gpt2_engine, echo=None)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


def test_repair_leaves_a_newest_state_record_that_does_not_read_and_says_so(
    two_jobs, runner_home, monkeypatch
):
    """The newest record is the job's state (a cancel there): never set aside for not reading, which would roll the
    state back to the record below. Repair stops on it, naming it."""
    sick, _, _ = two_jobs
    runner.cancel(sick.dir)
    newest = sick.dir / "state" / "00000001.json"
    Unreadable(runner_home, [newest]).install(monkeypatch)
    with pytest.raises(StorageError, match=f"cannot read {newest}: Input/output error"):
        runner.repair(sick.dir)
    monkeypatch.undo()
    assert runner.status(sick.dir).state == "cancelled"


def test_repair_leaves_a_record_below_a_workers_outcome_that_does_not_read(two_jobs, gpt2_engine, runner_home,
                                                                          monkeypatch):  # fmt: skip
    """Below a worker's completion (or failure) the record may be a repair's blind one whose late word stands over
    it (`_outcome_over_blind`): one that does not read is not set aside, and repair says which file it cannot read."""
    sick, _, _ = two_jobs
    runner.cancel(sick.dir)
    runner.retry(sick.dir)
    work(runner_home, engine=gpt2_engine, echo=None)  # record 3: completed, by its worker
    below = sick.dir / "state" / "00000002.json"
    Unreadable(runner_home, [below]).install(monkeypatch)
    with pytest.raises(StorageError, match=f"cannot read {below}: Input/output error"):
        runner.repair(sick.dir)
    monkeypatch.undo()
    assert runner.status(sick.dir).state == "completed" and below.exists()


@pytest.mark.parametrize("stat_fails", [False, True])
def test_repair_writes_prompts_that_do_not_read_for_good_again_from_the_input_file(
    stat_fails, two_jobs, gpt2_engine, runner_home, monkeypatch
):
    """A prompts.parquet Drive could not serve held its job for as long (status unreadable, work skipped it), and
    `runner repair`, which writes a damaged or missing one again from the input file when that is unchanged, failed
    on it. It is set aside in quarantine/ and written again, byte for byte as submit wrote it."""
    sick, well, ref = two_jobs
    kinds = ("read", "stat", "list") if stat_fails else ("read",)
    Unreadable(runner_home, [sick.dir / "prompts.parquet"], kinds=kinds).install(monkeypatch)
    monkeypatch.setattr(
        jobdir, "_HASHED", {}
    )  # (a `runner repair` of its own: this process hashed it before)
    report = runner.repair(sick.dir)
    assert report.restored_inputs == ["prompts.parquet"] and report.state_now == "queued", report
    assert [p.name for p in (sick.dir / "quarantine").iterdir() if p.name.endswith("-prompts.parquet")]
    work(runner_home, engine=gpt2_engine, echo=None)
    assert [runner.status(j.dir).state for j in (sick, well)] == ["completed", "completed"]
    monkeypatch.undo()
    assert_exactly_once(sick.dir, ref)


def test_repair_writes_an_errors_jsonl_that_does_not_read_for_good_again(tmp_path, tiny_gpt2, runner_home,
                                                                        monkeypatch):  # fmt: skip
    """errors.jsonl (the input rows found invalid at submit) Drive could not serve: `runner status` of a job whose
    worker had checked it showed it unreadable for as long, and `runner repair` failed on it; it is written again
    from the input file."""
    rows = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}, "{not json"])
    job = create_job(rows, tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home, skip_invalid=True)
    Unreadable(runner_home, [job.dir / "errors.jsonl"]).install(monkeypatch)
    monkeypatch.setattr(jobdir, "_HASHED", {})
    assert runner.repair(job.dir).restored_inputs == ["errors.jsonl"]
    assert runner.status(job.dir).state == "queued" and runner.status(job.dir).invalid == 1
    monkeypatch.undo()
    assert [r["line"] for r in job.invalid_rows()] == [2]
