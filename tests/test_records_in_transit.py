"""A state record set aside by an adopter and not put back (adversarial pass 61, carried until pass 78).

Without hard links, a writer whose create reported an error (its reply lost) finds the name taken by an empty
file; empty for long, it takes it aside by a rename to look at it (`jobdir._adopt_unfilled`). A `runner cancel`
frozen between its create and its fill may wake just before that rename, fill its record, read it back at its
name and say "cancelled"; the adopter then finds it filled aside and puts it back. Killed in between (a Colab VM
reclaimed), the reported cancel was left under a temp name: the job read queued and `runner work` ran it to the
end, and the temp files' sweep deleted the cancel. Such a record, whole and decided over the newest one, now
stands as if at its name."""

import json
import os

import pytest
from helpers import two_row_job

import runner
from runner import jobdir
from runner.jobdir import JobState


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    return two_row_job(tmp_path, tiny_gpt2, runner_home)


def _state(job) -> os.PathLike:
    return job.dir / "state"


def set_aside(job, seq: int) -> tuple[bytes, str]:
    """The record at `seq` as an adopter killed after its rename leaves it: its bytes, and the name they are at."""
    record = _state(job) / jobdir.record_name(seq)
    aside = jobdir._aside_name(record)
    data = record.read_bytes()
    os.rename(record, aside)
    return data, os.path.basename(aside)


def by_name(job) -> dict[str, str]:
    return {p.name: json.loads(p.read_bytes())["by"] for p in sorted(_state(job).glob("0*.json"))}


def test_a_cancel_left_aside_by_a_killed_adopter_stands_and_the_next_writer_puts_it_back_first(job):
    assert runner.cancel(job.dir) == "queued"
    data, _ = set_aside(job, 1)
    assert job.state().state is JobState.CANCELLED  # read where it was set aside
    assert runner.status(job.dir).state == "cancelled"
    runner.retry(job.dir)  # decided over the cancel: it goes back to its name first
    assert by_name(job) == {"00000001.json": "cancel", "00000002.json": "retry"}
    assert (_state(job) / "00000001.json").read_bytes() == data  # byte for byte: its writer reads it back
    assert job.state().state is JobState.QUEUED and job.state().generation == 1


def test_a_writer_that_read_the_state_before_it_was_set_aside_puts_it_back_and_decides_again(job):
    assert runner.cancel(job.dir) == "queued"
    record = jobdir.read_state(job.dir)
    runner.retry(job.dir)
    set_aside(job, 2)  # the retry's record, aside
    assert jobdir.record_state(job.dir, record, jobdir.StateRecord(JobState.FAILED), "failed") is None
    assert by_name(job) == {"00000001.json": "cancel", "00000002.json": "retry"}  # not a failure over it


def test_the_temp_files_sweep_puts_a_record_in_transit_back_before_it_sweeps(job):
    assert runner.cancel(job.dir) == "queued"
    data, aside = set_aside(job, 1)
    os.utime(_state(job) / aside, (1, 1))  # old enough to be swept
    jobdir.remove_stale_temps(job)
    assert sorted(os.listdir(_state(job))) == ["00000001.json"]
    assert (_state(job) / "00000001.json").read_bytes() == data


@pytest.mark.parametrize("case", ["torn", "over another record", "a writer's own temp file"])
def test_only_a_whole_record_aside_over_the_newest_one_is_in_transit(job, case):
    assert runner.cancel(job.dir) == "queued"
    runner.retry(job.dir)
    data = (_state(job) / "00000002.json").read_bytes()
    if case == "torn":
        os.unlink(_state(job) / "00000002.json")
        data = data[:-20]
        name = os.path.basename(jobdir._aside_name(_state(job) / "00000002.json"))
    elif case == "over another record":  # the retry's record, as if it were the third one
        name = os.path.basename(jobdir._aside_name(_state(job) / "00000003.json"))
    else:  # a writer killed before linking its record (hard links): its change never landed
        os.unlink(_state(job) / "00000002.json")
        name = ".00000002.json.0123abcd.tmp"
    (_state(job) / name).write_bytes(data)
    newest = "retry" if case == "over another record" else "cancel"
    assert job.state().by == newest
    os.utime(_state(job) / name, (1, 1))
    jobdir.remove_stale_temps(job)  # swept as any other temp file
    assert name not in os.listdir(_state(job)) and job.state().by == newest


def test_an_adopter_whose_aside_was_put_back_by_another_decides_again(tmp_path, monkeypatch):
    path = tmp_path / "00000001.json"
    path.write_bytes(b"")  # empty through the adopter's pauses
    real_rename = os.rename

    def rename(src, dst):  # the adopter, frozen right after its rename, outlived the sweep that put it back
        real_rename(src, dst)
        os.unlink(dst)

    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", ())
    monkeypatch.setattr(os, "rename", rename)
    # not a traceback: the caller reads the state again
    assert jobdir._adopt_unfilled(path, b"{}", 1) is False


def test_a_writer_that_read_a_record_in_transit_whose_place_another_took_decides_again(job):
    """Pass 81: a completion decided over a cancel set aside went over the `cancel` another writer had recorded
    at that place meanwhile (and printed "cancelled" for)."""
    assert runner.cancel(job.dir) == "queued"
    set_aside(job, 1)
    read = jobdir.read_state(job.dir)
    assert read.transit and read.state is JobState.CANCELLED
    theirs = {"state": "cancelled", "generation": 0, "error": None, "updated": 1.0, "by": "cancel",
              "writer": "0123456789abcdef", "over": None}  # fmt: skip
    theirs["check"] = jobdir.storage.json_checksum(theirs)
    assert jobdir.create_exclusive(_state(job) / "00000001.json", theirs)
    assert jobdir.record_state(job.dir, read, jobdir.StateRecord(JobState.COMPLETED), "completed") is None
    assert by_name(job) == {"00000001.json": "cancel"} and job.state().writer == theirs["writer"]


def test_a_writer_whose_own_record_an_adopter_set_aside_after_it_was_made_has_recorded_it(job, monkeypatch):
    """Pass 81: a cancel whose record an adopter took aside (then killed) decided again, read its own record in
    transit and said "job ... is already cancelled" (exit 1), though its word stood."""
    real = jobdir.create_exclusive

    def create_then_taken_aside(path, obj):
        assert real(path, obj)
        os.rename(path, jobdir._aside_name(path))
        return False  # (our bytes were not at the name when read back)

    monkeypatch.setattr(jobdir, "create_exclusive", create_then_taken_aside)
    assert runner.cancel(job.dir) == "queued"
    assert by_name(job) == {"00000001.json": "cancel"}  # put back at its name


def test_a_blind_repairs_record_set_aside_stands_over_a_late_completion(job, gpt2_engine):
    """Pass 83: a repair's record decided blind over an empty completion (its worker slow to fill it) names no
    record it was over; set aside by an adopter killed before putting it back, it was not in transit: the late
    completion stood though the repair had said it re-queued the job (a shard was damaged)."""
    from runner.worker import run_job

    assert run_job(job, gpt2_engine, echo=None).finished  # record 1: completed
    repair = {"state": "queued", "generation": 0, "error": None, "updated": 2.0, "by": "repair",
              "writer": "0123456789abcdef", "over": None}  # fmt: skip
    repair["check"] = jobdir.storage.json_checksum(repair)
    aside = jobdir._aside_name(_state(job) / "00000002.json")
    with open(aside, "w") as f:
        json.dump(repair, f)
    assert job.state().state is JobState.QUEUED  # a late completion does not stand over a blind repair
    os.utime(aside, (1, 1))
    jobdir.remove_stale_temps(job)
    assert by_name(job) == {"00000001.json": "completed", "00000002.json": "repair"}


def test_a_damaged_record_in_transit_breaks_the_job_and_repair_says_to_run_the_command_again(job):
    """Pass 87: a reported cancel left aside by a killed adopter, then one flipped byte in it (still JSON): it
    was read as a torn leftover, so the job read queued (`runner work` would have run it to the end) and the
    sweep deleted it, without a word. Damaged at its name it breaks the job, and repair says to run the
    command again; so it does in transit."""
    from helpers import invoke

    assert runner.cancel(job.dir) == "queued"
    data, aside = set_aside(job, 1)
    (_state(job) / aside).write_bytes(data.replace(b'"cancelled"', b'"cancellee"'))
    said = runner.status(job.dir)
    assert said.state == "broken" and f"state/{aside}" in said.message and "is damaged" in said.message
    os.utime(_state(job) / aside, (1, 1))
    jobdir.remove_stale_temps(job)
    assert os.listdir(_state(job)) == [aside]  # left for repair to see
    result = invoke("repair", job.dir)
    assert result.exit_code == 0, result.output
    assert "a state record in transit was damaged" in result.output and "`runner cancel`" in result.output
    assert os.listdir(_state(job)) == [] and any(aside in p.name for p in (job.dir / "quarantine").iterdir())
    assert runner.status(job.dir).state == "queued"
    assert runner.cancel(job.dir) == "queued" and runner.status(job.dir).state == "cancelled"


def test_a_link_at_an_aside_name_is_no_record_in_transit(job):
    """Pass 87: a looping link at an aside's name made every command on the job stop ("Too many levels of
    symbolic links"), `runner repair` too."""
    assert runner.cancel(job.dir) == "queued"
    name = _state(job) / os.path.basename(jobdir._aside_name(_state(job) / "00000002.json"))
    os.symlink(name.name, name)
    assert runner.status(job.dir).state == "cancelled"
    runner.retry(job.dir)
    assert runner.status(job.dir).state == "queued" and by_name(job)["00000002.json"] == "retry"
    runner.repair(job.dir)
    assert runner.status(job.dir).state == "queued"


@pytest.mark.parametrize("repair_killed", [False, True])
def test_a_put_back_killed_between_its_create_and_its_fill_leaves_the_word_to_repair(
    job, monkeypatch, repair_killed
):
    """Pass 87: an adopter putting back a cancel it had set aside (filled, read back by its writer: "cancelled")
    creates the name, then fills it (no hard links). Killed between the two, it left the record empty at its
    name and the cancel aside, no longer in transit: repair recorded queued over the empty record (saying to run
    the cancel again "if you ran it just then") and the sweep deleted the cancel. A repair deciding blind over
    that empty record now takes the word aside as the record's, filled late: it stands."""
    from helpers import invoke

    assert runner.cancel(job.dir) == "queued"
    _, aside = set_aside(job, 1)
    (_state(job) / "00000001.json").write_bytes(b"")  # the put-back's create, killed before its fill
    os.utime(_state(job) / aside, (1, 1))  # (its mtime is its writer's fill: may be old)
    if repair_killed:  # after its blind record, before it records the late word again
        monkeypatch.setattr(jobdir, "_late_word", lambda job, ours, top: ours)
        jobdir.repair(job.dir)
        monkeypatch.undo()
        assert jobdir.newest_state_seq(job.dir) == 2 and (_state(job) / "00000001.json").read_bytes() == b""
        assert json.loads((_state(job) / "00000002.json").read_bytes())["by"] == "repair"
        assert runner.status(job.dir).state == "cancelled"  # read under the blind record
        jobdir.remove_stale_temps(job)
        assert aside in os.listdir(_state(job))  # not swept while it stands for the empty record
    result = invoke("repair", job.dir)
    assert result.exit_code == 0 and "run it again" not in result.output, result.output
    assert runner.status(job.dir).state == "cancelled" and job.state().state is JobState.CANCELLED
    if not repair_killed:  # said, and decided on at once: never queued for a moment (pass 93)
        assert "the whole record of a `runner cancel` stood aside for it" in result.output, result.output
        states = {json.loads(p.read_bytes())["state"] for p in sorted(_state(job).glob("0*.json"))[1:]}
        assert states == {"cancelled"}, states
    # a record of its own, not a word read aside (pass 91: a second repair left it in the temp file only)
    newest = _state(job) / jobdir.record_name(jobdir.newest_state_seq(job.dir))
    assert json.loads(newest.read_bytes())["state"] == "cancelled" and not job.state().blind
    runner.retry(job.dir)
    assert job.state().state is JobState.QUEUED


def test_a_live_writers_record_filled_as_repair_takes_the_word_aside_is_recorded_after_it(job, monkeypatch):
    """Pass 91: a retry frozen between creating its record and filling it, at the name an adopter had freed
    (the cancel recorded there set aside, the adopter killed); a repair decided blind over the empty record and
    took the cancel aside as its word; the retry filled its record right then, found the repair's record the
    newest and said "retried"; the repair recorded the cancel, and the retry was undone."""
    import threading

    monkeypatch.setattr(
        os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "Operation not permitted"))
    )
    jobdir.write_failed(job.dir, jobdir.read_state(job.dir), "boom")  # 1: failed
    gates = {n: (threading.Event(), threading.Event()) for n in ("before_create", "after_create")}
    real_point = jobdir.fault_point

    def fault_point(name):
        if threading.current_thread().name == "retry" and name in gates:
            gates[name][0].set()
            gates[name][1].wait()
        return real_point(name)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    said = []
    retry = threading.Thread(target=lambda: said.append(runner.retry(job.dir)), name="retry")
    retry.start()
    gates["before_create"][0].wait()  # decided over the failure; nothing in transit then
    assert runner.cancel(job.dir) == "failed"  # 2: cancelled, reported
    set_aside(job, 2)  # by an adopter, killed before putting it back
    gates["before_create"][1].set()
    gates["after_create"][0].wait()  # the retry created 2 at the free name, frozen before its fill
    real = jobdir._filled_or_aside

    def filled_or_aside(job_dir, seq):
        found = real(job_dir, seq)
        if found.transit and not gates["after_create"][1].is_set():
            gates["after_create"][1].set()  # the retry fills now: after the repair's look, before its record
            retry.join()
        return found

    monkeypatch.setattr(jobdir, "_filled_or_aside", filled_or_aside)
    jobdir.repair(job.dir)
    retry.join()
    assert len(said) == 1  # the retry said it was done: it came after the cancel
    assert job.state().state is JobState.QUEUED and job.state().generation == 1


def test_a_writer_whose_create_failed_does_not_adopt_a_put_back_killed_before_its_fill(job, monkeypatch):
    """Pass 92: a cancel's put-back killed between its create and its fill (empty at its name, whole aside);
    a worker's completion, decided over the state before the cancel, whose own create of that name failed
    (EIO), found the name taken by an empty file that stayed empty, took it for its own landed create, and
    recorded the completion there: the reported cancel was lost. It leaves it: repair takes the cancel."""
    import errno

    before = jobdir.read_state(job.dir)
    assert runner.cancel(job.dir) == "queued"
    _, aside = set_aside(job, 1)
    (_state(job) / "00000001.json").write_bytes(b"")  # the put-back's create, killed before its fill
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", ())
    monkeypatch.setattr(jobdir, "STATE_PATIENCE_SECONDS", 0.0)  # (the empty record, waited out)
    real_open, failed = os.open, []

    def flaky_open(path, flags, *a, **k):  # the completion's create reports EIO, and did not land
        if flags & os.O_EXCL and os.fspath(path).endswith("00000001.json") and not failed:
            failed.append(1)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", flaky_open)
    try:
        assert jobdir.write_completed(job.dir, before) is None
    except jobdir.BrokenJob:
        pass  # (or it says the state is broken: either way, not recorded)
    monkeypatch.undo()
    assert failed and aside in os.listdir(_state(job)) and (_state(job) / "00000001.json").read_bytes() == b""
    jobdir.repair(job.dir)
    assert job.state().state is JobState.CANCELLED


@pytest.mark.parametrize("by", ["failed", "completed"])
def test_a_workers_record_aside_under_an_empty_one_is_named_as_a_workers_and_said_only_if_it_stands(job, by):
    """Pass 95: repair's line named a worker's record as a command (`runner failed`, `runner completed`), and
    said a completion stood when the job was not complete and repair recorded queued."""
    from helpers import invoke

    state = JobState.FAILED if by == "failed" else JobState.COMPLETED
    read = jobdir.read_state(job.dir)
    assert jobdir.record_state(
        job.dir, read, jobdir.StateRecord(state, 0, "boom" if by == "failed" else None), by
    )
    seq = jobdir.newest_state_seq(job.dir)
    _, aside = set_aside(job, seq)
    (_state(job) / jobdir.record_name(seq)).write_bytes(b"")  # the put-back's create, killed before its fill
    result = invoke("repair", job.dir)
    assert result.exit_code == 0 and "`runner failed`" not in result.output, result.output
    assert "`runner completed`" not in result.output
    if by == "failed":  # a sound failure stands
        assert "the whole record of a worker's failure stood aside for it" in result.output, result.output
        assert runner.status(job.dir).state == "failed"
    else:  # no row is done: the completion does not stand, and is not said to
        assert "stood aside" not in result.output, result.output
        assert runner.status(job.dir).state == "queued"


def test_a_retry_aside_under_an_empty_record_is_repaired_under_its_generation(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """Pass 95: repair decided over the retry's word set aside, but under the generation before it: its first
    record said completed (the row error still counting), put right only by the record after it."""
    from helpers import completed_with_a_row_error

    job = two_row_job(tmp_path, tiny_gpt2, runner_home)
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    assert job.state().state is JobState.COMPLETED
    runner.retry(job.dir)
    seq = jobdir.newest_state_seq(job.dir)
    set_aside(job, seq)
    (_state(job) / jobdir.record_name(seq)).write_bytes(b"")  # the put-back's create, killed before its fill
    jobdir.repair(job.dir)
    after = [json.loads((_state(job) / jobdir.record_name(n)).read_bytes())
             for n in range(seq + 1, jobdir.newest_state_seq(job.dir) + 1)]  # fmt: skip
    assert after and all((r["state"], r["generation"]) == ("queued", 1) for r in after), after
