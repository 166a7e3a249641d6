"""Adversarial: faults the other tests inject one at a time, combined on one job home shared by several workers
(pass 209). Workers here are threads of this process; one "frozen" (SIGSTOP, a suspended VM) stops whole, its
heartbeat too, at a named step until the test thaws it, and its lease is made to run out by dating its heartbeat
back (the time a real freeze takes).

Found: a worker stopped (Ctrl-C, SIGTERM, its --hours deadline) while a `runner cancel` or `runner retry` was being
written where links are not supported (a Drive mount: the state record is created empty, then filled) said the
job "is broken (state/... is damaged (it is empty ...)); skipped (`runner repair ...` brings it back)", and
`runner work` ended with "Error: ... broken" (exit 1): the record was filled a moment later, nothing was broken,
and the user was sent to repair a sound job. It now says that a change of the job's state is being written.

Held (every row once, each the reference's; `runner status` counting the rows load_results gives):
* two frozen committers in a row on one unit (three epochs: each frozen before its shard, or with its claim
  checked and its marker not renamed in yet), with and without hard links, the first one's looks at the claims
  failing once each with EIO as it thaws;
* a cancel landing while the taker of a frozen worker's unit is itself frozen before its seal, and the frozen
  worker's late commit landing then.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import warnings

import pytest
from helpers import assert_exactly_once, fresh_copy, prepared_job, taker_frozen_before_its_seal

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.jobdir import Heartbeat, Job, JobState, Owner, read_state
from runner.worker import JobRun, run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, num_return_sequences=2, seed=3)
OPTIONS = EngineOptions(batch_size=2)
N = 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """A job of 8 rows x 2 samples in units of 4 rows, nothing run yet, and its reference results."""
    rows = [{"id": f"c{i:02d}", "prompt": f"The old man said {i}"} for i in range(N)]
    return prepared_job(tmp_path_factory.mktemp("adv209"), tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=4)


def without_links(monkeypatch) -> None:
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(jobdir, "_LINKS", {})


def cancel_frozen_before_its_fill(job_dir, monkeypatch):
    """`runner cancel` in a thread, frozen between its record's create and its fill (no hard links): returns
    release(), which lets it fill the record and end."""
    frozen, thaw, real_fill = threading.Event(), threading.Event(), jobdir._fill

    def fill(fd, data):
        if threading.current_thread().name == "cancel":
            frozen.set()
            assert thaw.wait(60)
        real_fill(fd, data)

    monkeypatch.setattr(jobdir, "_fill", fill)
    t = threading.Thread(target=lambda: jobdir.cancel(Job.open(job_dir)), name="cancel", daemon=True)
    t.start()
    assert frozen.wait(60)

    def release() -> None:
        thaw.set()
        t.join(60)
        assert not t.is_alive()

    return release


@pytest.mark.parametrize("how", ["ctrl-c", "deadline"])
def test_a_worker_stopped_as_a_cancel_is_being_written_does_not_say_the_job_is_broken(
    tmp_path, prepared, gpt2_engine, monkeypatch, how
):
    from runner.scheduler import work

    home, job_dir = fresh_copy(tmp_path, prepared[0])
    without_links(monkeypatch)
    real_time, stopping = time.time, []
    # (the --hours deadline comes a minute on: the clock moves on, less than a record's patience)
    monkeypatch.setattr(time, "time", lambda: real_time() + (61.0 if stopping else 0.0))
    real_commit, release = JobRun.commit, []

    def commit(self, unit):
        real_commit(self, unit)
        if unit.seq == 1 and not release:  # its first commit is in: a cancel is being written, then the stop
            release.append(cancel_frozen_before_its_fill(job_dir, monkeypatch))
            stopping.append(True)

    monkeypatch.setattr(JobRun, "commit", commit)
    said, broken = [], []
    work(home, job=str(job_dir), engine=gpt2_engine, echo=said.append, shard_rows=2,
         stop=(lambda: bool(stopping)) if how == "ctrl-c" else None,
         deadline=real_time() + 60 if how == "deadline" else None,
         on_broken=lambda job_id, folder: broken.append(job_id))  # fmt: skip
    assert release and not broken, "\n".join(said)
    assert not [line for line in said if "broken" in line or "repair" in line], said
    assert "a change of its state is being written" in said[-1], said
    release[0]()
    status = runner.status(job_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a cancelled job's results may be partial)
        assert status.state == "cancelled" and status.done == len(runner.load_results(job_dir)) == 2, status
    jobdir.retry(Job.open(job_dir))
    ends_exactly_once(job_dir, gpt2_engine, prepared[1])


def ends_exactly_once(job_dir, engine, ref) -> None:
    """Runs the job to its end if it is not completed; then `runner status` says so and every row is there once."""
    if runner.status(job_dir).state != "completed":
        run_job(Job.open(job_dir), engine, echo=None, owner=Owner.me("Z"), shard_rows=2)
    status = runner.status(job_dir)
    assert status.state == "completed" and status.done == status.total and status.errors == 0, status
    assert read_state(job_dir).state is JobState.COMPLETED
    assert_exactly_once(job_dir, ref)


class Freezer:
    """Worker threads named by their worker id. `at[NAME] = (STEP, N)`: worker NAME freezes whole (its heartbeat's
    writes too) at its N-th visit of STEP ("publish": before its shard goes in; "write_marker": its claim checked,
    its marker not renamed in yet), until `thaw(NAME)`."""

    def __init__(self, monkeypatch):
        self.at: dict[str, tuple[str, int]] = {}
        self.frozen: set[str] = set()
        self.thaws: dict[str, threading.Event] = {}
        self.visits: dict[tuple[str, str], int] = {}
        real_beat, real_marker, real_publish = Heartbeat.beat, jobdir.write_marker, storage.publish

        def beat(hb, **info):
            if hb.owner.worker in self.frozen:
                assert self.event(hb.owner.worker).wait(120)
            return real_beat(hb, **info)

        def step(name, real):
            def call(*args, **kwargs):
                self.visit(name)
                return real(*args, **kwargs)

            return call

        monkeypatch.setattr(Heartbeat, "beat", beat)
        monkeypatch.setattr(jobdir, "write_marker", step("write_marker", real_marker))
        monkeypatch.setattr(storage, "publish", step("publish", real_publish))

    def event(self, name: str) -> threading.Event:
        return self.thaws.setdefault(name, threading.Event())

    def visit(self, step: str) -> None:
        me = threading.current_thread().name
        key = (me, step)
        self.visits[key] = self.visits.get(key, 0) + 1
        if self.at.get(me) == (step, self.visits[key]):
            self.frozen.add(me)
            assert self.event(me).wait(120), f"{me} was never thawed"
            self.frozen.discard(me)

    def wait_frozen(self, name: str) -> None:
        end = time.monotonic() + 120
        while name not in self.frozen:  # (a condition looked at, not a sleep deciding anything)
            assert time.monotonic() < end, f"{name} never froze"
            time.sleep(0.01)

    def thaw(self, name: str) -> None:
        self.event(name).set()


def lease_ran_out(job_dir, name: str) -> None:
    """Worker NAME's heartbeat as a frozen worker's is once its lease has run out (dated back 1,000 s)."""
    path = job_dir / jobdir.WORKERS / f"{name}.json"
    hb = json.loads(path.read_text())
    hb["heartbeat"] -= 1000
    hb["expires"] -= 1000
    del hb["check"]
    hb["check"] = storage.json_checksum(hb)
    path.write_text(json.dumps(hb))


def start_worker(job_dir, engine, name: str, out: dict) -> threading.Thread:
    def run() -> None:
        try:
            out[name] = run_job(Job.open(job_dir), engine, echo=None, owner=Owner.me(name), shard_rows=2,
                                lease_ttl=600)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 (the test says it)
            out[name] = e

    t = threading.Thread(target=run, name=name)
    t.start()
    return t


def status_says_what_loads(job_dir) -> None:
    """`runner status` counts the rows load_results gives."""
    status = runner.status(job_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (results of a job not completed may be partial)
        assert status.done == len(runner.load_results(job_dir)), status


@pytest.mark.parametrize("links", [True, False])
@pytest.mark.parametrize("step", ["write_marker", "publish"])
def test_two_frozen_committers_in_a_row_on_one_unit_count_nothing_twice(
    tmp_path, prepared, gpt2_engine, monkeypatch, links, step
):
    """A freezes at its second commit of unit 0, past its lease: B takes the unit over and freezes at its first,
    past its lease too: C takes it over (epoch 2) and completes the job. B, then A, thaw and carry on, a late
    marker each where they froze with their claim checked. With each of A's looks at the claims failing once
    with EIO."""
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    if not links:
        without_links(monkeypatch)
    fz, out = Freezer(monkeypatch), {}
    fz.at.update(A=(step, 2), B=(step, 1))
    a = start_worker(job_dir, gpt2_engine, "A", out)
    fz.wait_frozen("A")
    lease_ran_out(job_dir, "A")
    b = start_worker(job_dir, gpt2_engine, "B", out)
    fz.wait_frozen("B")
    lease_ran_out(job_dir, "B")
    status_says_what_loads(job_dir)
    start_worker(job_dir, gpt2_engine, "C", out).join(120)
    assert runner.status(job_dir).state == "completed"
    real_lstat, failed = os.lstat, set()

    def lstat(path, *args, **kwargs):
        if threading.current_thread().name == "A" and "/claims/" in str(path) and str(path) not in failed:
            failed.add(str(path))
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", lstat)
    for name, t in (("B", b), ("A", a)):
        fz.thaw(name)
        t.join(120)
    monkeypatch.setattr(os, "lstat", real_lstat)
    assert not [e for e in out.values() if isinstance(e, BaseException)], out
    assert failed and {c.split("-")[1] for c in os.listdir(job_dir / "claims") if c.startswith("00000-")} == {
        "00000000.json", "00000000.seal.json", "00000001.json", "00000001.seal.json", "00000002.json"
    }  # fmt: skip
    status_says_what_loads(job_dir)
    ends_exactly_once(job_dir, gpt2_engine, prepared[1])


def test_a_cancel_as_a_frozen_workers_unit_is_taken_over_and_its_late_commit_lands(
    tmp_path, prepared, gpt2_engine, monkeypatch
):
    """A did two commits of unit 0 and froze with its claim checked, its second marker not yet in; B takes the
    unit over and freezes before its seal; a `runner cancel` lands, then A's late marker; B seals. Status and
    load_results agree at each step; a retry and a worker then complete the job once."""
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    done = job_dir / jobdir.MARKERS
    run_job(Job.open(job_dir), gpt2_engine, echo=None, owner=Owner.me("A"), shard_rows=2,
            should_stop=lambda: len(list(done.glob("00000-*"))) >= 2)  # fmt: skip
    late = done / "00000-00000000-0001.json"
    shutil.move(late, tmp_path / "late.json")  # (not in yet: A froze before its rename)
    start, release, took = taker_frozen_before_its_seal(Job.open(job_dir), monkeypatch, "B", 0)
    start()
    jobdir.cancel(Job.open(job_dir))
    shutil.move(tmp_path / "late.json", late)
    status_says_what_loads(job_dir)
    release()
    assert took == [1] and runner.status(job_dir).state == "cancelled"
    status_says_what_loads(job_dir)
    jobdir.retry(Job.open(job_dir))
    ends_exactly_once(job_dir, gpt2_engine, prepared[1])
