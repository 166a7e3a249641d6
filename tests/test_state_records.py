"""The job's state records (state/SEQ.json) where they are hardest to keep, found by adversarial pass 12:

* a job of an older runner version (state.json, no records) whose first record was killed half way: the empty
  state/ folder read as "queued, generation 0", so a retry's generation was lost and cleared row errors
  counted again. With no record, the older files are read, whatever folders stand;
* where the file system has no hard links, a record is created empty and filled after (O_EXCL): a transient
  error while filling it made the writer read its own record as another's (it now rewrites its own record).
  A writer killed in between leaves the job broken (an empty record says nothing of what it was to say):
  repair records the state anew from the newest record that still reads;
* an older runner kept reading state.json of an older job the new runner had given state records: each
  ignored the other's cancel. The first record now makes the job layout 3, which older runners refuse;
* a worker that found the job failing, then slept, recorded "failed" over a `retry` made meanwhile (after
  the user fixed the cause): the failure is now recorded over the state read before it was found.
"""

import errno
import json
import os
import shutil
import sys
import threading

import pytest
from helpers import completed_with_a_row_error, invoke, newest_state_record, run_until_done, write_jsonl
from workers import run_runner

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir, scheduler
from runner.jobdir import Job, JobState
from runner.jobs import create_job

pytestmark = pytest.mark.slow  # commands as real processes, killed half way

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=5)
OPTIONS = EngineOptions(batch_size=4)
ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]
# `python -c LINKLESS ARGS` is `runner ARGS` on a file system without hard links
LINKLESS = (
    "import errno, os, sys\n"
    "def link(*a, **k): raise OSError(errno.EPERM, 'Operation not permitted')\n"
    "os.link = link\n"
    "from runner.cli import main\n"
    "sys.argv[0] = 'runner'\n"
    "main()\n"
)


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    return create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)


def as_older_version(job, state: str, generation: int) -> None:
    """The job as an older runner version left it: its state in state.json, no state/ folder."""
    shutil.rmtree(job.dir / "state")
    record = {"state": state, "generation": generation, "error": None, "updated": 7.5}
    (job.dir / "state.json").write_text(json.dumps(record))


def records(job) -> list[tuple[str, int]]:
    return [(p.name, p.stat().st_size) for p in sorted((job.dir / "state").glob("*.json"))]


def test_an_older_jobs_first_record_killed_half_way_leaves_its_state(job, monkeypatch):
    monkeypatch.setattr(jobdir, "STATE_PATIENCE_SECONDS", -1.0)  # (without links: empty for longer than that)
    as_older_version(job, "queued", 1)  # its retry had cleared generation 0's row errors
    code, out = run_runner("cancel", job.dir, env_extra={"RUNNER_FAULT": "before_create:1"})
    assert code != 0 and (job.dir / "state").is_dir() and records(job) == []  # killed: the folder, no record
    assert (job.state().state, job.state().generation) == (JobState.QUEUED, 1)
    (job.dir / "state" / jobdir.record_name(1)).write_bytes(b"")  # and a record killed before its content
    assert runner.status(job.dir).state == "broken"  # what it was to say is unknown: never guessed
    report = runner.repair(job.dir)  # from the newest word that still reads: state.json's
    assert report.state_now == "queued" and (job.state().generation, job.state().seq) == (1, 2)
    code, out = run_runner("cancel", job.dir)
    assert code == 0, out
    assert (job.state().state, job.state().generation, job.state().seq) == (JobState.CANCELLED, 1, 3)


def test_without_hard_links_a_record_killed_before_its_content_breaks_the_job_until_repaired(
    job, monkeypatch
):
    monkeypatch.setattr(
        jobdir, "STATE_PATIENCE_SECONDS", -1.0
    )  # killed, not being written: past the patience
    code, out = run_runner("cancel", job.dir, prefix=("-c", LINKLESS))
    assert code == 0 and job.state().state is JobState.CANCELLED, out
    code, out = run_runner("retry", job.dir, env_extra={"RUNNER_FAULT": "after_create:1"},
                           prefix=("-c", LINKLESS))  # fmt: skip
    assert code != 0 and records(job)[-1] == ("00000002.json", 0), out
    status = runner.status(job.dir)
    assert status.state == "broken" and "state/00000002.json is damaged (it is empty" in status.message
    code, out = run_runner("repair", job.dir, prefix=("-c", LINKLESS))
    assert code == 0 and job.state().state is JobState.CANCELLED, out  # the newest word that still reads
    code, out = run_runner("retry", job.dir, prefix=("-c", LINKLESS))
    assert code == 0 and (job.state().state, job.state().generation) == (JobState.QUEUED, 1), out


def test_an_older_job_becomes_layout_3_with_its_first_record(job):
    """So that an older runner (another VM not yet upgraded) refuses it rather than read state.json."""
    as_older_version(job, "queued", 0)
    for name in ("job.json", "job.backup.json"):
        meta = json.loads((job.dir / name).read_text())
        meta["format"] = 2
        meta["spec_sha256"] = jobdir.spec_checksum(meta)
        (job.dir / name).write_text(json.dumps(meta))
    assert Job.open(job.dir).state().state is JobState.QUEUED
    runner.cancel(job.dir)
    for name in ("job.json", "job.backup.json"):
        meta = json.loads((job.dir / name).read_text())
        assert meta["format"] == 3 and meta["spec_sha256"] == jobdir.spec_checksum(meta)
    assert Job.open(job.dir).state().state is JobState.CANCELLED


def test_without_hard_links_a_transient_error_filling_a_record_rewrites_it(job, monkeypatch):
    real_write, failed = os.write, []

    def write(fd, data):
        if not failed and b'"by": "cancel"' in bytes(data):
            failed.append(fd)
            real_write(fd, bytes(data)[:10])  # half of it lands, then the mount fails a moment
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data)

    _no_links(monkeypatch)
    monkeypatch.setattr(os, "write", write)
    assert runner.cancel(job.dir) == "queued" and len(failed) == 1
    monkeypatch.undo()
    assert [n for n, _ in records(job)] == ["00000001.json"] and job.state().state is JobState.CANCELLED


def test_a_failure_found_before_a_retry_is_not_recorded_over_it(job, gpt2_engine, runner_home, monkeypatch):
    """The worker finds the job failing (an error of its own as it starts on it) and sleeps before recording
    it; meanwhile the user fixes the cause, cancels and retries. The failure it found is older than the retry:
    not recorded."""
    from runner.worker import JobRun

    fixed, real_check = [], JobRun.check_prompts

    def check_prompts(run, afresh=False):
        if not fixed:
            raise RunnerError(f"job {run.job.id} fails: a cause of its own")
        return real_check(run, afresh)

    monkeypatch.setattr(JobRun, "check_prompts", check_prompts)
    real, fired = scheduler._settle_failure, []

    def settle_failure(j, *args):
        if not fired:  # the failure is found; the user's fix, cancel and retry land before it is recorded
            fixed.append(True)
            fired.append(jobdir.cancel(Job.open(job.dir)))
            jobdir.retry(Job.open(job.dir))
        return real(j, *args)

    monkeypatch.setattr(scheduler, "_settle_failure", settle_failure)
    scheduler.work(home=runner_home, engine=gpt2_engine, echo=None, once=True)
    monkeypatch.setattr(scheduler, "_settle_failure", real)
    assert fired == [JobState.QUEUED]
    assert (job.state().state, job.state().generation, job.state().by) == (JobState.QUEUED, 1, "retry")
    scheduler.work(home=runner_home, engine=gpt2_engine, echo=None, once=True)
    assert job.state().state is JobState.COMPLETED and len(runner.load_results(job.dir)) == len(ROWS)


def test_repair_of_an_older_job_with_a_file_at_state_keeps_its_state_json(job):
    """A file where state/ belongs in an older version's cancelled job: repair set it aside and re-queued the
    job from the facts, though its state.json still said cancelled. It now reads state.json once the file is
    aside."""
    as_older_version(job, "cancelled", 2)
    (job.dir / "state").write_text("not a folder")
    assert runner.status(job.dir).state == "broken"
    report = runner.repair(job.dir)
    assert report.state_now == "cancelled" and (job.state().state, job.state().generation) == ("cancelled", 2)


def test_without_hard_links_a_cancel_frozen_before_filling_its_record_is_not_lost_to_a_repair(
    job, monkeypatch
):
    """Adversarial pass 13: `runner cancel` frozen between creating its record and filling it; status said the
    job was broken (an empty newest record) and the user ran `runner repair`, which recorded the state over
    it. The cancel woke, filled its record and said "cancelled", but the repair's record was newer: the job ran.
    Each record names the one it was decided over: the repair's names none (it found the cancel's empty), so once
    the cancel's record reads its word stands, and the cancel, seeing it was passed over, says so and is done."""

    real_point, fired = jobdir.fault_point, []

    def fault_point(name):
        if name == "after_create" and not fired:  # the cancel's record is created and still empty
            fired.append(runner.status(job.dir).state)
            fired.append(jobdir.repair(job.dir).state_now)  # the user's repair, while the cancel is frozen
        return real_point(name)

    _no_links(monkeypatch)
    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    assert runner.cancel(job.dir) == "queued"
    monkeypatch.undo()
    assert fired == ["queued", "queued"]  # status: the state before the cancel, a change being written
    assert [json.loads(p.read_text())["by"] for p in sorted((job.dir / "state").glob("*.json"))] == [
        "cancel",  # filled after the repair's record was decided without it: passed over, but its word stands
        "repair",  # (decided blind over the record below it: `_late_word_stands`)
    ]
    assert job.state().state is JobState.CANCELLED


def _no_links(monkeypatch):
    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def _cancel_frozen_until_a_repair_records(job, monkeypatch) -> list:
    """Without hard links: `runner cancel` in a thread, frozen between creating its record and filling it (this
    returns once it is); the repair run next is paused before its own create while the cancel fills its record,
    finds none after it, and returns. The list returned gets what the cancel returned."""
    _no_links(monkeypatch)
    real_point, real_create = jobdir.fault_point, jobdir.create_exclusive
    frozen, wake, said = threading.Event(), threading.Event(), []

    def fault_point(name):
        if name == "after_create" and not frozen.is_set():  # the cancel's record is created and still empty
            frozen.set()
            wake.wait()
        return real_point(name)

    def create_exclusive(path, obj):
        if obj.get("by") == "repair" and not wake.is_set():  # the repair, paused before its create
            wake.set()
            cancel.join()  # the cancel fills its record, finds none after it, and returns
        return real_create(path, obj)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    monkeypatch.setattr(jobdir, "create_exclusive", create_exclusive)
    cancel = threading.Thread(target=lambda: said.append(runner.cancel(job.dir)))
    cancel.start()
    frozen.wait()
    return said


def test_without_hard_links_a_cancel_filled_while_a_repair_is_about_to_record_stands(job, monkeypatch):
    """Adversarial pass 14: as above, but the repair was itself paused between its last look at the cancel's
    empty record and its own create; the cancel filled its record, found nothing after it and said "cancelled";
    then the repair recorded "queued" over it and the job ran. The repair now looks at the record it decided over
    once its own is in place: filled meanwhile, its word is recorded again."""

    said = _cancel_frozen_until_a_repair_records(job, monkeypatch)
    shown = runner.status(job.dir)
    assert shown.state == "queued" and "a change of state is being written" in shown.message
    report = jobdir.repair(job.dir)
    monkeypatch.undo()
    assert said == ["queued"]  # the cancel said it cancelled a queued job
    assert report.damaged_by is None  # the cancel's word stood: repair tells no one to cancel again
    assert [json.loads(p.read_text())["by"] for p in sorted((job.dir / "state").glob("*.json"))] == [
        "cancel",
        "repair",  # decided without the cancel
        "repair",  # the cancel's word, recorded again
    ]
    assert job.state().state is JobState.CANCELLED


def test_without_hard_links_a_cancel_filled_before_a_repair_killed_after_its_record_stands(
    job, gpt2_engine, monkeypatch
):
    """Pass 73: as above, but the repair was killed right after its own record, before it could look at the
    cancel's record again (`_late_word`): the cancel had said "cancelled", the job read queued, a second repair
    changed nothing and `runner work` computed every row. A repair's record decided blind over the record below
    it lets that record's word stand once it reads, whoever reads the state."""

    def killed(*a, **k):
        raise KeyboardInterrupt  # the repair dies right after its record

    monkeypatch.setattr(jobdir, "_late_word", killed)
    said = _cancel_frozen_until_a_repair_records(job, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        jobdir.repair(job.dir)
    monkeypatch.undo()
    assert said == ["queued"]  # the cancel said it cancelled a queued job
    assert [json.loads(p.read_text())["by"] for p in sorted((job.dir / "state").glob("*.json"))] == [
        "cancel",
        "repair",  # decided without the cancel, which was not recorded again
    ]
    assert job.state().state is JobState.CANCELLED and runner.status(job.dir).state == "cancelled"
    assert jobdir.repair(job.dir).state_now == "cancelled"
    scheduler.work(job.dir.parent, engine=gpt2_engine, echo=None, once=True)
    assert runner.status(job.dir).done == 0  # nothing computed: the job is cancelled
    runner.retry(job.dir)
    assert job.state().state is JobState.QUEUED


def test_a_flipped_byte_in_a_retrys_record_is_noticed_and_repair_says_to_retry_again(
    job, gpt2_engine, monkeypatch
):
    """Adversarial pass 16: a byte flipped in the newest record (the retry's generation 1 read 0; valid JSON,
    same size) was obeyed: `runner work` completed the job at once with the failed rows still failed. Each
    record now carries its checksum: the job is broken, and repair, which cannot know what the record said,
    says which command it claims to be so the user runs it again."""
    assert completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    assert job.state().state is JobState.COMPLETED
    assert runner.retry(job.dir) == 1
    path = newest_state_record(job.dir)
    data = path.read_bytes()
    assert data.count(b'"generation": 1') == 1
    path.write_bytes(data.replace(b'"generation": 1', b'"generation": 0'))
    status = runner.status(job.dir)
    assert status.state == "broken" and "does not match its checksum" in status.message
    out = invoke("repair", job.dir).output
    assert f"state broken (state/{path.name} is damaged (it does not match its checksum))" in out
    assert "says it was a `runner retry`" in out and f"run `runner retry {job.dir}` again" in out
    assert runner.retry(job.dir) == 1  # the user's retry, again: the failed row is computed
    assert run_until_done(job, gpt2_engine) and runner.read_errors(job.dir) == []


def test_a_flipped_generation_in_a_completion_retries_no_row_through_repair(job, gpt2_engine, monkeypatch):
    """Adversarial pass 17: a job completed with a row error; a byte flipped in its completion record
    ("generation": 0 -> 1). Repair took that generation as its floor, so the row error stopped counting and the
    job went back to work: a retry nobody asked for. A record failing its checksum now counts for nothing."""
    assert completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    assert job.state().state is JobState.COMPLETED
    before = (runner.status(job.dir).done, len(runner.read_errors(job.dir)))
    path = newest_state_record(job.dir)
    path.write_bytes(path.read_bytes().replace(b'"generation": 0', b'"generation": 1'))
    assert runner.status(job.dir).state == "broken"
    report = runner.repair(job.dir)
    assert (report.state_now, job.state().generation) == ("completed", 0)
    assert (runner.status(job.dir).done, len(runner.read_errors(job.dir))) == before


def test_a_flipped_generation_in_an_older_record_retries_no_row_through_repair(job, gpt2_engine, monkeypatch):
    """Adversarial pass 17: cancel, retry, then the job completed with a row error; a byte flipped in the oldest
    record (the cancel's "generation": 0 -> 2), which nothing reads but repair. Any later `runner repair` took it
    as its floor and re-queued the job: the row error was cleared and its row computed, unasked."""
    runner.cancel(job.dir)
    runner.retry(job.dir)
    assert completed_with_a_row_error(job, gpt2_engine, monkeypatch) and job.state().generation == 1
    oldest = job.dir / "state" / "00000001.json"
    oldest.write_bytes(oldest.read_bytes().replace(b'"generation": 0', b'"generation": 2'))
    assert runner.status(job.dir).state == "completed"  # the newest record reads: nothing to see yet
    assert runner.repair(job.dir).state_now == "completed" and job.state().generation == 1
    assert len(runner.read_errors(job.dir)) == 1


def test_a_worker_that_finds_the_state_unreadable_after_its_run_says_so_and_goes_on(
    job, gpt2_engine, runner_home, monkeypatch
):
    """No hard links: another worker's record, created and not yet filled (that worker frozen), is the newest
    when this worker looks at the state after its run: it says the job is broken, named, instead of ending
    `runner work` with a bare "state/00000002.json is damaged" (adversarial pass 17)."""
    real = scheduler.run_job

    def run_job(j, *a, **k):
        summary = real(j, *a, **k)
        (j.dir / "state" / jobdir.record_name(jobdir.newest_state_seq(j.dir) + 1)).write_bytes(b"")
        return summary

    monkeypatch.setattr(scheduler, "run_job", run_job)
    said = []
    summaries = scheduler.work(runner_home, engine=gpt2_engine, echo=said.append, once=True)
    assert [s.job_id for s in summaries] == [job.id] and summaries[0].finished
    assert any(f"job {job.id} is broken" in line and "runner repair" in line for line in said), said


def test_repair_of_an_empty_newest_record_says_a_command_may_not_have_happened(job, monkeypatch):
    """No hard links: `runner cancel` killed between creating its record and filling it leaves it empty; the
    job is broken, and repair (which cannot know it was a cancel) says that a command did not happen."""
    monkeypatch.setattr(
        jobdir, "STATE_PATIENCE_SECONDS", -1.0
    )  # killed, not being written: past the patience
    runner.cancel(job.dir)
    runner.retry(job.dir)
    (job.dir / "state" / "00000003.json").write_bytes(b"")  # the next cancel, killed half way
    assert runner.status(job.dir).state == "broken"
    out = invoke("repair", job.dir).output
    assert "-> queued" in out and "newest state record was empty" in out and "run it again" in out, out


def test_a_record_that_names_no_predecessor_never_passes_over_the_one_before(job, monkeypatch):
    """Adversarial pass 14: a runner of this session's earlier commit (records without "over") cancelled over a
    retry frozen right after creating its record: the retry took the missing "over" for "decided without mine",
    retried again and undid the cancel. Only a record that names another predecessor passes over one."""
    runner.cancel(job.dir)
    real, fired = jobdir.create_exclusive, []

    def create_exclusive(path, obj):
        created = real(path, obj)
        if (
            obj.get("by") == "retry" and not fired
        ):  # an earlier runner's cancel lands after the retry's record
            fired.append(path.name)
            after = path.parent / jobdir.record_name(int(path.stem) + 1)
            after.write_text(json.dumps({"state": "cancelled", "generation": 1, "error": None, "updated": 9.5,
                                         "by": "cancel", "writer": "0123456789abcdef"}))  # fmt: skip
        return created

    monkeypatch.setattr(jobdir, "create_exclusive", create_exclusive)
    assert runner.retry(job.dir) == 0 and fired == ["00000002.json"]
    monkeypatch.undo()
    assert [p.name for p in sorted((job.dir / "state").glob("*.json"))] == [
        "00000001.json", "00000002.json", "00000003.json",
    ]  # fmt: skip
    assert (job.state().state, job.state().generation) == (JobState.CANCELLED, 1)


def test_a_broken_job_in_its_own_folder_is_shown_by_its_id(tmp_path, tiny_gpt2):
    """`runner status myscores` of a job whose newest state record is damaged showed the folder's name as the
    job's id; job.json names it (pass 51)."""
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "myscores")
    jobdir.cancel(job)
    record = newest_state_record(job.dir)
    record.write_bytes(record.read_bytes()[:20])
    status = runner.status(job.dir)
    assert status.state == "broken" and status.id == job.id != "myscores"


@pytest.mark.parametrize("word", ["cancel", "fail"])
def test_repair_keeps_a_sound_cancel_or_failure_of_a_job_whose_rows_are_all_done(job, gpt2_engine, word,
                                                                               monkeypatch):  # fmt: skip
    """Adversarial pass 66: a `runner cancel` landing just before the worker's completion record keeps the job
    cancelled (the worker says so), but `runner repair`, finding nothing damaged, recorded completed over it:
    a reported cancel undone without a `runner retry`. A cancel or failure whose record reads now stands."""
    real = jobdir.write_completed

    def write_completed(job_dir, read):  # the user's word lands just before the worker records completion
        if word == "cancel":
            runner.cancel(job_dir)
        else:
            Job.open(job_dir).set_state(JobState.FAILED, "the model would not load")
        return real(job_dir, read)

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    run_until_done(job, gpt2_engine)
    monkeypatch.undo()
    was = job.state()
    assert was.state in (JobState.CANCELLED, JobState.FAILED) and runner.status(job.dir).done == len(ROWS)
    report = runner.repair(job.dir)
    assert report.state_now == was.state.value and job.state().state is was.state, report
    assert job.state().error == was.error
    assert runner.retry(job.dir) == 0 and job.state().state is JobState.QUEUED


def _eio_once_on_records(monkeypatch, armed: threading.Event) -> list:
    """Once `armed` is set, the first os.stat jobdir makes of a state record in the thread named "slow" fails with
    EIO (a network mount's hiccup); the list returned gets the paths it failed."""
    real_stat, failed = os.stat, []

    def stat(path, *a, **k):
        p = os.fspath(path)
        name = os.path.basename(p)
        hit = jobdir._RECORD.match(name) and os.path.basename(os.path.dirname(p)) == jobdir.STATES
        # (a stat of jobdir's own, not one storage's reads make and retry)
        hit = hit and sys._getframe(1).f_globals.get("__name__") == jobdir.__name__
        if hit and armed.is_set() and not failed and threading.current_thread().name == "slow":
            failed.append(p)
            raise OSError(errno.EIO, "Input/output error", p)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    return failed


# (the slow command, the state before it, what the job reads once its word stands, the user's command after it)
STORIES = [
    ("retry", "cancelled", "queued", "cancel"),  # the user's cancel undone by the retry applied again
    ("cancel", "queued", "cancelled", "retry"),  # the user's retry undone by the cancel applied again
]


@pytest.mark.parametrize("eio", [False, True])
@pytest.mark.parametrize(("slow_cmd", "before", "stood", "user_cmd"), STORIES)
def test_a_slow_commands_standing_word_built_on_by_the_users_next_is_not_applied_again(
    job, monkeypatch, slow_cmd, before, stood, user_cmd, eio
):
    """Pass 76: a retry filled late under a repair's blind record was the job's word at once (queued); the user's
    cancel was recorded over it; then the retry, finding itself passed over and the repair's record no longer
    the newest, decided again over the cancel and re-queued the job: the reported cancel undone. Pass 189
    (`eio`): an EIO in its look at the records' times (whether its word stood for the user's command) read as
    "it did not", and the slow command applied its word a second time (a cancel undid a retry made after it)."""
    _no_links(monkeypatch)
    if before == "cancelled":
        runner.cancel(job.dir)
    frozen, wake_fill, at_check, wake_check = (threading.Event() for _ in range(4))
    real_point, real_passed, said = jobdir.fault_point, jobdir._passed_over, []

    def fault_point(name):
        if name == "after_create" and threading.current_thread().name == "slow" and not frozen.is_set():
            frozen.set()
            assert wake_fill.wait(60)  # the slow command's record created, still empty
        return real_point(name)

    def passed_over(folder, seq, token):
        if threading.current_thread().name == "slow" and not at_check.is_set():
            at_check.set()
            assert wake_check.wait(60)  # filled; about to look whether it was passed over
        return real_passed(folder, seq, token)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    monkeypatch.setattr(jobdir, "_passed_over", passed_over)
    failed = _eio_once_on_records(monkeypatch, wake_check) if eio else None
    command = getattr(runner, slow_cmd)
    slow = threading.Thread(target=lambda: said.append(command(job.dir)), name="slow", daemon=True)
    slow.start()
    assert frozen.wait(60)
    assert runner.repair(job.dir).state_now == before  # blind over the slow command's empty record
    wake_fill.set()
    assert at_check.wait(60)
    assert runner.status(job.dir).state == stood  # the slow command's word stands
    getattr(runner, user_cmd)(job.dir)  # the user's command, told it is done
    wake_check.set()
    slow.join(60)
    assert failed or not eio, "the EIO was not met"
    assert len(said) == 1  # the slow command returned: done
    assert job.state().state == before


def _freeze_slow_after_create(monkeypatch) -> tuple[threading.Event, threading.Event, list]:
    """The first state record a thread named "slow" creates is left unfilled until `wake` is set (`frozen` is set
    once it is): a command frozen between its create and its fill. Returns (frozen, wake, a list for its say)."""
    frozen, wake = threading.Event(), threading.Event()
    real_point = jobdir.fault_point

    def fault_point(name):
        if name == "after_create" and threading.current_thread().name == "slow" and not frozen.is_set():
            frozen.set()
            wake.wait()
        return real_point(name)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    return frozen, wake, []


def test_status_and_repair_read_a_late_word_below_an_empty_newest_record(job, monkeypatch):
    """Pass 76: a cancel filled late under a repair's blind record stood; a retry killed between creating its
    record and filling it then made status show, and repair record, the blind record's own word (queued)."""
    _no_links(monkeypatch)
    frozen, wake, said = _freeze_slow_after_create(monkeypatch)
    slow = threading.Thread(target=lambda: said.append(runner.cancel(job.dir)), name="slow")
    slow.start()
    frozen.wait()
    runner.repair(job.dir)  # blind over the cancel's empty record
    wake.set()
    slow.join()
    assert said == ["queued"] and runner.status(job.dir).state == "cancelled"
    killed = job.dir / "state" / jobdir.record_name(jobdir.newest_state_seq(job.dir) + 1)
    killed.write_bytes(b"")  # a retry killed between its create and its fill
    assert runner.status(job.dir).state == "cancelled"  # (a change being written over it)
    assert runner.repair(job.dir).state_now == "cancelled"


def test_a_late_cancel_under_two_blind_repairs_in_a_row_stands(job, monkeypatch):
    """Pass 76: a cancel and a first repair each frozen between creating their record and filling it, a second
    repair recording blind over the first's: the cancel, finding the record after it empty, said "cancelled",
    and the job read queued (the first repair's word) for good. The late word is followed down the chain once
    the first repair fills its record."""
    _no_links(monkeypatch)
    gates = {n: (threading.Event(), threading.Event()) for n in ("slow-cancel", "slow-repair")}
    real_point, out = jobdir.fault_point, {}

    def fault_point(name):
        gate = gates.get(threading.current_thread().name)
        if name == "after_create" and gate and not gate[0].is_set():
            gate[0].set()
            gate[1].wait()
        return real_point(name)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    cancel = threading.Thread(
        target=lambda: out.setdefault("cancel", runner.cancel(job.dir)), name="slow-cancel"
    )
    cancel.start()
    gates["slow-cancel"][0].wait()
    first = threading.Thread(target=lambda: runner.repair(job.dir), name="slow-repair")
    first.start()
    gates["slow-repair"][0].wait()
    runner.repair(job.dir)  # the second repair: blind over the first's empty record
    gates["slow-cancel"][1].set()
    cancel.join()
    assert out == {"cancel": "queued"}
    gates["slow-repair"][1].set()  # (until the first repair fills its record, the job reads queued: noted)
    first.join()
    assert job.state().state is JobState.CANCELLED and runner.repair(job.dir).state_now == "cancelled"


def test_a_record_being_written_over_a_damaged_one_shows_the_job_broken_not_queued(job, monkeypatch):
    """Pass 88: without links, a cancel's record torn, then a `runner repair` killed right after creating its
    own record over it (left empty): status showed "queued - a change of state is being written" for two
    minutes, the state below the empty record being unknown (a torn cancel). It shows the damage."""
    _no_links(monkeypatch)
    assert runner.cancel(job.dir) == "queued"
    first = job.dir / "state" / "00000001.json"
    first.write_bytes(first.read_bytes()[:-30])  # torn
    (job.dir / "state" / "00000002.json").write_bytes(b"")  # the repair, killed between create and fill
    shown = runner.status(job.dir)
    assert shown.state == "broken" and "state/00000001.json is damaged" in shown.message, shown
    assert runner.repair(job.dir).state_now == "queued"  # (what the torn cancel said is unknown)


def test_every_signal_handler_is_put_back_when_a_signal_lands_as_they_are(monkeypatch):
    """Around a record's create and fill (no links) Ctrl-C, SIGTERM and SIGHUP are held, then their handlers put
    back one by one. A Ctrl-C landing as SIGTERM's was put back raised there (signal.signal runs pending
    handlers first), leaving SIGTERM and SIGHUP held for good: in a notebook kernel, a SIGTERM was swallowed
    from then on (pass 125). Every handler is back, and the Ctrl-C still stops."""
    import signal

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in sigs}
    real, landed = signal.signal, []

    def landing(sig, handler):
        if sig == signal.SIGTERM and not landed:  # a pending Ctrl-C's handler runs as SIGTERM's is put back
            landed.append(sig)
            raise KeyboardInterrupt
        return real(sig, handler)

    try:
        with pytest.raises(KeyboardInterrupt):
            with jobdir._signals_deferred():
                monkeypatch.setattr(signal, "signal", landing)
        monkeypatch.undo()
        assert landed and {sig: signal.getsignal(sig) for sig in sigs} == before
    finally:
        for sig, handler in before.items():
            real(sig, handler)


def test_a_workers_completion_decided_before_a_late_cancel_under_a_blind_repair_does_not_undo_it(
    job, monkeypatch
):
    """Pass 135: without links, a cancel frozen between creating its record and filling it, a repair recording
    queued blind over that empty record, then a worker that computed every row and read the state (queued, the
    cancel still empty) to decide completion: the cancel filled its record, found the repair's the newest, said
    "cancelled" (exit 0), and the worker's completion, recorded over the repair's record, then undid it. The
    cancel's late word is recorded again over the completion, which is dropped."""
    _no_links(monkeypatch)
    frozen, wake, said = threading.Event(), threading.Event(), []
    real_point, real_completed = jobdir.fault_point, jobdir.write_completed

    def fault_point(name):
        if name == "after_create" and threading.current_thread().name == "slow" and not frozen.is_set():
            frozen.set()
            wake.wait()
        return real_point(name)

    slow = threading.Thread(target=lambda: said.append(runner.cancel(job.dir)), name="slow")

    def write_completed(job_dir, read):  # the worker read the state (queued) and found every row done
        assert read.state is JobState.QUEUED and read.blind
        wake.set()
        slow.join()  # the cancel filled its record and returned: "cancelled"
        assert said == ["queued"] and runner.status(job.dir).state == "cancelled"
        return real_completed(job_dir, read)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    slow.start()
    frozen.wait()
    assert runner.repair(job.dir).state_now == "queued"  # blind over the cancel's empty record
    from runner.worker import run_job

    run_job(job, echo=None)
    assert said == ["queued"] and job.state().state is JobState.CANCELLED


def _cancel_frozen_under_a_blind_repair(job, monkeypatch) -> tuple[threading.Thread, threading.Event, list]:
    """Without hard links: `runner cancel` in a thread named "slow", frozen between creating its record and filling
    it, and a repair recorded blind over that empty record (queued: no row is done). Returns the cancel's thread,
    the event that wakes it, and the list that gets what it returned (or the RunnerError it said)."""
    _no_links(monkeypatch)
    frozen, wake, said = _freeze_slow_after_create(monkeypatch)

    def cancel():
        try:
            said.append(runner.cancel(job.dir))
        except RunnerError as e:
            said.append(str(e))

    slow = threading.Thread(target=cancel, name="slow")
    slow.start()
    frozen.wait()
    assert runner.repair(job.dir).state_now == "queued"  # blind over the cancel's empty record
    return slow, wake, said


def test_a_cancel_filled_between_a_completions_record_and_its_look_below_is_told_what_the_job_ends(
    job, monkeypatch
):
    """Adversarial pass 136: without links, the cancel of pass 135 filled its record after the worker had recorded
    its completion over the repair's blind record, and before the worker looked below it (`_late_word_since`).
    The cancel found a record newer than the blind one, older than its own fill (mtimes), decided again over
    the completion and said "already completed" (exit 1); the worker then found the cancel's word and recorded
    it again: the job ended cancelled. A completion over a blind record reads as the late word below it, so the
    cancel's word stands whenever it is filled, and the cancel says "cancelled"."""
    slow, wake, said = _cancel_frozen_under_a_blind_repair(job, monkeypatch)
    real_late = jobdir._late_word_since

    def late_word_since(job_dir, read, ours):  # the worker has recorded its completion, not looked below yet
        wake.set()
        slow.join()
        return real_late(job_dir, read, ours)

    monkeypatch.setattr(jobdir, "_late_word_since", late_word_since)
    from runner.worker import run_job

    run_job(job, echo=None)
    assert said == ["queued"] and job.state().state is JobState.CANCELLED


def test_a_worker_killed_between_its_completion_and_its_look_below_leaves_a_late_cancel_standing(
    job, monkeypatch
):
    """Adversarial pass 136: without links, the worker of pass 135 killed right after recording its completion
    over the repair's blind record, before it looked below it (`_late_word_since`): the cancel below, filled
    meanwhile, had said "cancelled" (the blind record was the newest then), and the job read completed for
    good. A completion over a blind record reads as the late word below it once that reads."""
    slow, wake, said = _cancel_frozen_under_a_blind_repair(job, monkeypatch)

    real_completed = jobdir.write_completed

    class Killed(BaseException):
        pass

    def write_completed(job_dir, read):  # the worker read the state (queued) and found every row done
        wake.set()
        slow.join()  # the cancel filled its record, found the blind one the newest and returned: "cancelled"
        return real_completed(job_dir, read)

    def late_word_since(job_dir, read, ours):
        raise Killed

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    monkeypatch.setattr(jobdir, "_late_word_since", late_word_since)
    from runner.worker import run_job

    with pytest.raises(Killed):
        run_job(job, echo=None)
    assert said == ["queued"]
    assert job.state().state is JobState.CANCELLED and runner.status(job.dir).state == "cancelled"
