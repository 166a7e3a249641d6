"""A state record replaced by a copy of another record of the same job (adversarial pass 245): a sync conflict
(Google Drive, Dropbox), an rsync of an older backup or a user's `cp` leaves state/S.json holding state/S-1.json
byte for byte (valid JSON, a valid checksum). It read as the state it copies, without a word:

* a `cancel` undone: the job read queued and `runner work` ran it to the end;
* a `retry` undone: the job read cancelled again, `runner work` ran nothing;
* a worker's completion or failure, a repair's record undone: the job read queued (or what stood before);

and so did the record before it (S-2) copied over it, or the newest copied to S+1. A copy is told: its writer
token is that of the record below (or of the one that record was decided over: no writer writes two records),
or it was not decided over the record below it (`over`). It is damaged as a torn record is: `runner status`
says the job is broken naming the file, `runner work` skips it, commands and exports refuse naming it, and
`runner repair` records the state anew from the records that still read, saying that what the damaged record
said no longer counts (run the command again).
"""

import json
import shutil

import pytest
from damage_sweep import requests
from helpers import invoke, run_until_done, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir
from runner import worker as worker_module
from runner.jobdir import JobState, StateRecord, read_state
from runner.jobs import create_job
from runner.results import export_results
from runner.scheduler import work
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=3)
OPTIONS = EngineOptions(batch_size=2)
REPAIRED = "its newest state record was damaged past reading which command wrote it"


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    """A Batch job of 4 requests (and a refused line), 2 requests a unit."""
    inputs = write_jsonl(tmp_path / "requests.jsonl", requests("the old man said"))
    return create_job(inputs, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=2, skip_invalid=True,
                      served_model_names=("m",))  # fmt: skip


def record(job, seq: int):
    return job.dir / jobdir.STATES / jobdir.record_name(seq)


def copy(job, seq: int, to: int) -> None:
    """state/`seq` copied over (or to) state/`to`, byte for byte."""
    shutil.copyfile(record(job, seq), record(job, to))


def commits_of(job) -> list[str]:
    return sorted(p.name for p in (job.dir / jobdir.MARKERS).glob("*.json"))


def half_run(job, engine) -> int:
    """One batch computed and committed, then the worker stopped: the rows done."""
    asked: list[int] = []
    run_job(job, engine, echo=None, shard_rows=2, should_stop=lambda: asked.append(1) or len(asked) > 1)
    done = runner.status(job.dir).done
    assert 0 < done < 4
    return done


def _cancel(job, engine) -> None:
    """cancel (1), retry (2), a batch computed, cancel (3): the newest a cancel over a retry."""
    runner.cancel(job.dir)
    runner.retry(job.dir)
    half_run(job, engine)
    runner.cancel(job.dir)


def _retry(job, engine) -> None:
    """a batch computed, cancel (1), retry (2): the newest a retry over a cancel."""
    half_run(job, engine)
    runner.cancel(job.dir)
    runner.retry(job.dir)


def _failure(job, engine) -> None:
    """cancel (1), retry (2), a batch computed, a worker's failure (3) over the retry."""
    runner.cancel(job.dir)
    runner.retry(job.dir)
    half_run(job, engine)
    assert jobdir.write_failed(job.dir, read_state(job.dir), "the model changed") is not None


def _repair(job, engine) -> None:
    """a batch computed, cancel (1), a repair's record (2) over it: queued (as repair records it when it read the
    cancel)."""
    half_run(job, engine)
    runner.cancel(job.dir)
    assert (
        jobdir.record_state(job.dir, read_state(job.dir), StateRecord(JobState.QUEUED), "repair") is not None
    )


def _completion(job, engine) -> None:
    """cancel (1), retry (2), run to the end: the worker's completion (3) over the retry."""
    runner.cancel(job.dir)
    runner.retry(job.dir)
    run_until_done(job, engine)


# (how the job got there, the state its newest record says, the state it read as with the copy below over it,
# the state `runner repair` records: from the record below and the rows done)
LOST = {
    "cancel": (_cancel, "cancelled", "queued", "queued"),
    "retry": (_retry, "queued", "cancelled", "cancelled"),
    "failure": (_failure, "failed", "queued", "queued"),
    "repair": (_repair, "queued", "cancelled", "cancelled"),
    "completion": (_completion, "completed", "queued", "completed"),
}


@pytest.mark.parametrize("lost", list(LOST))
def test_a_record_replaced_by_a_copy_of_the_one_below_breaks_the_job_naming_it(
    lost, job, gpt2_engine, runner_home
):
    """The record below copied over the newest: the job read as the copy says (a cancel undone: `runner work`
    ran it to the end). Now the job is broken, naming the file, as for a torn record: status, work, the commands
    and the exports; `runner repair` records the state from the records that still read and says to run the
    command again."""
    made, was, rolled_back, repaired = LOST[lost]
    made(job, gpt2_engine)
    seq = jobdir.newest_state_seq(job.dir)
    assert read_state(job.dir).state.value == was
    commits = commits_of(job)
    copy(job, seq - 1, seq)
    named = f"state/{jobdir.record_name(seq)} is damaged (a copy of state/{jobdir.record_name(seq - 1)}"
    status = runner.status(job.dir)
    assert status.state == "broken" and named in status.message, (status, rolled_back)
    lines: list[str] = []
    work(runner_home, engine=gpt2_engine, echo=lines.append, shard_rows=2, once=True)
    assert any(named in line and "skipped" in line for line in lines), lines
    # nothing computed
    assert commits_of(job) == commits
    for args in (["cancel", job.id], ["retry", job.id], ["results", job.id]):
        said = invoke("--home", runner_home, *args)
        assert said.exit_code == 1 and named in said.output and "runner repair" in said.output, (
            args,
            said.output,
        )
    said = invoke("--home", runner_home, "repair", job.id)
    assert said.exit_code == 0 and REPAIRED in said.output and "run it again" in said.output, said.output
    assert read_state(job.dir).state.value == repaired
    # the cancel run again, as repair says
    if lost == "cancel":
        runner.cancel(job.dir)
        assert runner.status(job.dir).state == "cancelled"


def test_a_completed_jobs_results_and_exports_refuse_naming_the_copy_until_repaired(
    tmp_path, job, gpt2_engine, runner_home
):
    """A completed Batch job whose completion was replaced by the retry's record below it: load_results, the
    table export and the Batch export refuse naming the file (they read it as queued); repaired, it is completed
    again and its exports are the undamaged job's, byte for byte."""
    _completion(job, gpt2_engine)
    want = {name: _export(job, tmp_path / "before", name) for name in ("rows.jsonl", "responses.jsonl")}
    copy(job, 2, 3)
    named = "state/00000003.json is damaged (a copy of state/00000002.json"
    with pytest.raises(
        RunnerError, match=r"state/00000003\.json is damaged \(a copy of state/00000002\.json"
    ):
        runner.load_results(job.dir)
    for name in want:
        with pytest.raises(RunnerError) as refused:
            _export(job, tmp_path / "damaged", name)
        assert named in str(refused.value)
    assert runner.repair(job.dir).state_now == "completed"
    assert {name: _export(job, tmp_path / "after", name) for name in want} == want


def _export(job, folder, name: str) -> bytes:
    folder.mkdir(exist_ok=True)
    export_results(job.dir, folder / name, format="openai" if name == "responses.jsonl" else "table")
    return (folder / name).read_bytes()


def _five_records(job, engine) -> None:
    """cancel (1), retry (2), a batch computed, cancel (3), retry (4), cancel (5)."""
    _cancel(job, engine)
    runner.retry(job.dir)
    runner.cancel(job.dir)
    assert (read_state(job.dir).seq, read_state(job.dir).generation) == (5, 2)


@pytest.mark.parametrize(
    ("older", "said"),
    ids=["S-1", "S-2", "S-3", "S-4"],
    argvalues=[
        (4, "a copy of state/00000004.json, whose writer token it has"),
        (3, "a copy of an older record: its writer wrote the record state/00000004.json was decided over"),
        (
            2,
            "it was not decided over state/00000004.json, the record below it, as if copied from an older one",
        ),
        (
            1,
            "it was not decided over state/00000004.json, the record below it, as if copied from an older one",
        ),
    ],
)
def test_any_older_record_copied_over_the_newest_breaks_the_job(older, said, job, gpt2_engine, runner_home):
    """Five records (cancel, retry, cancel, retry, cancel), then an older one copied over the newest (an old
    backup's file restored over it): it read as the copy says (queued, or cancelled under an older retry
    generation), without a word. Broken, named; repair records the state from the retry below (the cancel at 5
    to run again, as it says), under its generation."""
    _five_records(job, gpt2_engine)
    copy(job, older, 5)
    status = runner.status(job.dir)
    assert status.state == "broken" and f"state/00000005.json is damaged ({said}; a sync conflict" in (
        status.message
    ), status
    said = invoke("--home", runner_home, "repair", job.id)
    assert said.exit_code == 0 and REPAIRED in said.output, said.output
    assert (read_state(job.dir).state, read_state(job.dir).generation) == (JobState.QUEUED, 2)


def test_the_newest_record_copied_to_the_next_place_breaks_the_job_and_repair_keeps_its_word(
    job, gpt2_engine, runner_home
):
    """The newest record (a cancel) copied to the next place (a stray extra, or the copy a sync conflict left in
    place of a record written there): broken, named; repair keeps the cancel that reads below it."""
    _cancel(job, gpt2_engine)
    copy(job, 3, 4)
    status = runner.status(job.dir)
    assert status.state == "broken" and "state/00000004.json is damaged (a copy of state/00000003.json" in (
        status.message
    ), status
    said = invoke("--home", runner_home, "repair", job.id)
    assert said.exit_code == 0 and "-> cancelled" in said.output, said.output
    assert read_state(job.dir).state is JobState.CANCELLED
    # the job goes on: a record decided over repair's reads
    runner.retry(job.dir)
    assert invoke("--home", runner_home, "work").exit_code == 0
    assert runner.status(job.dir).state == "completed"


def test_a_copy_below_a_damaged_record_is_told_too(job, gpt2_engine, runner_home):
    """cancel (1), retry (2) damaged, repair's record over it (3), then the cancel copied over repair's record:
    the record right below does not read, so the copy is told from the nearest one that does (its own)."""
    _retry(job, gpt2_engine)
    damaged = record(job, 2).read_bytes()
    record(job, 2).write_bytes(damaged.replace(b'"generation": 1', b'"generation": 7'))
    assert runner.repair(job.dir).state_now == "cancelled"
    assert read_state(job.dir).blind
    copy(job, 1, 3)
    status = runner.status(job.dir)
    assert status.state == "broken" and "state/00000003.json is damaged (a copy of state/00000001.json" in (
        status.message
    ), status


@pytest.mark.parametrize(("older", "at"), [(1, 2), (2, 3), (1, 3), (3, 4), (1, 4)], ids=str)
def test_a_copy_replacing_a_record_below_the_newest_is_not_the_newest_damaged(older, at, job, gpt2_engine):
    """Five records, then an older one copied over one below the newest: the newest record, sound, is the job's
    state (it does not name the copy as the record it was decided over, but the copy is the damaged one); a
    command then records over it."""
    _five_records(job, gpt2_engine)
    copy(job, older, at)
    status = runner.status(job.dir)
    assert status.state == "cancelled" and not status.message, status
    runner.retry(job.dir)
    assert (read_state(job.dir).state, read_state(job.dir).seq) == (JobState.QUEUED, 6)


def test_a_worker_stops_naming_a_copy_that_lands_as_it_runs(job, gpt2_engine, monkeypatch):
    """cancel (1), retry (2), then as the retried job runs the cancel's file comes back over the retry's (a sync
    conflict): the worker read the job cancelled and stopped, the retry undone without a word. It stops as for a
    damaged record, its finished batch committed, naming the file."""
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 0.0)
    runner.cancel(job.dir)
    runner.retry(job.dir)
    asked: list[int] = []

    def lands_after_a_batch() -> bool:
        asked.append(1)
        if len(asked) == 2:
            copy(job, 1, 2)
        return False

    with pytest.raises(
        jobdir.BrokenJob, match=r"state/00000002\.json is damaged \(a copy of state/00000001\.json"
    ):
        run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=lands_after_a_batch)
    assert commits_of(job) and runner.status(job.dir).state == "broken"


def test_records_of_earlier_runners_still_read(job):
    """Records an earlier runner wrote (no writer, no `over`, no checksum; or a writer and no `over`) name no
    record below them, and none names theirs: they read as before, and so does a record written over them."""

    def earlier(seq: int, state: str, **more) -> None:
        record(job, seq).parent.mkdir(exist_ok=True)
        record(job, seq).write_text(json.dumps({"state": state, "generation": 0, "error": None, "updated": 1.0,
                                                **more}))  # fmt: skip

    earlier(1, "cancelled")
    assert read_state(job.dir).state is JobState.CANCELLED
    # over the earlier record, which names no writer
    runner.retry(job.dir)
    assert (read_state(job.dir).state, read_state(job.dir).seq) == (JobState.QUEUED, 2)
    earlier(3, "cancelled", by="cancel", writer="0123456789abcdef")
    assert read_state(job.dir).state is JobState.CANCELLED
    runner.retry(job.dir)
    assert (read_state(job.dir).state, read_state(job.dir).seq) == (JobState.QUEUED, 4)
    assert runner.status(job.dir).state == "queued"
