"""The wall clock is the one judge of leases and file ages (adversarial passes 233, 237 and 240).

Passes 233 and 237 judged the leases of workers sharing this machine's CLOCK_MONOTONIC, and the ages of empty
claims, empty state records and markers, by that clock, so that a step of the wall clock (NTP, a VM resumed)
would take no live worker's units (exactly-once held before: the epochs fence the losers; only work was done
twice). Pass 240 found the price: time passing, told by the wall clock (a lease run out as a tool or test
advances `time.time`, or a heartbeat dated back), no longer freed a frozen worker's units on this machine, and
a step of the wall clock cannot be told from time passing. Freeing a frozen worker's units is the promise; the
waste after a step is not, so the wall clock judges, as these tests pin down. What stays of pass 237: a dead
submit's temp folder is set aside by a rename before its removal. Deterministic: nothing sleeps.
"""

import os
import time

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams, jobdir
from runner.jobdir import Heartbeat, Owner, take_unit
from runner.jobs import create_job

TTL = 60.0


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    lines = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(4))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), tiny_gpt2, GenerationParams(max_new_tokens=3),
                      runner.EngineOptions(batch_size=2), home=runner_home)  # fmt: skip


def wall_on(monkeypatch, seconds: float) -> None:
    """From here on this process's wall clock reads `seconds` on from the real one."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_a_frozen_worker_of_this_machine_loses_its_unit_once_the_wall_clock_passes_its_lease(
    job, monkeypatch
):
    """A worker of this very process (alive: no pid says it is gone) beat once and holds the job's only unit;
    the wall clock then passes its lease: its unit is free, as it was before pass 233 and is again."""
    frozen = Owner.me("frozen")
    Heartbeat(job, frozen, ttl=TTL).beat()
    assert take_unit(job, 0, frozen, -1) == 0
    assert 0 not in jobdir.job_progress(job).claimable
    wall_on(monkeypatch, TTL - 5)
    assert 0 not in jobdir.job_progress(job).claimable
    wall_on(monkeypatch, TTL + 1)
    progress = jobdir.job_progress(job)
    assert "frozen" not in progress.live and 0 in progress.claimable


@pytest.mark.parametrize("kind", ["claim", "record"])
def test_an_empty_claim_or_state_record_ages_by_the_wall_clock(job, monkeypatch, kind):
    """An empty claim (being filled) is held for CLAIM_FILL_SECONDS and an empty state record (a `cancel` being
    written) waited for STATE_PATIENCE_SECONDS, by the wall clock: once it has passed, the claim is free and
    the job broken (`runner repair`), whenever this process first saw them."""
    if kind == "claim":
        (job.dir / "claims").mkdir(exist_ok=True)
        (job.dir / "claims" / "00000-00000000.json").write_bytes(b"")
        assert 0 not in jobdir.job_progress(job).claimable
        wall_on(monkeypatch, jobdir.CLAIM_FILL_SECONDS + 1)
        assert 0 in jobdir.job_progress(job).claimable
        return
    monkeypatch.setattr(jobdir, "links_supported", lambda folder: False)
    place = job.dir / jobdir.STATES / jobdir.record_name(jobdir.read_state(job.dir).seq + 1)
    place.parent.mkdir(exist_ok=True)
    place.write_bytes(b"")
    assert runner.status(job.dir).state == "queued"
    wall_on(monkeypatch, jobdir.STATE_PATIENCE_SECONDS + 1)
    assert runner.status(job.dir).state == "broken"


def test_a_sweep_after_a_step_of_days_never_empties_a_job_a_live_submit_moves_in(tmp_path, monkeypatch):
    """The wall clock stepped two days forward while a submit of this machine moves its finished job into the
    home: its temp folder (its .owner.json already gone) looks a day old to remove_dead_submits, whose rmtree
    opened the folder just before the submit's rename and went on deleting inside the job now in the home: a
    job stored without its files. The folder is set aside by a rename first (the submit's move-in or that one
    wins), then removed: the submit then finds its folder gone, and no job is stored half."""
    temp = tmp_path / jobdir.submit_temp_name("20260101-000000-abcdef")
    temp.mkdir()
    for name in ("job.json", "prompts.parquet"):
        (temp / name).write_text("whole")
    stored = tmp_path / "20260101-000000-abcdef"
    real_scandir = os.scandir

    def scandir(path=".", *args):
        if isinstance(path, int) and temp.exists():  # (rmtree, listing the folder it opened)
            os.replace(temp, stored)  # the submit's move into the home, at that moment
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    wall_on(monkeypatch, 2 * 86400)
    jobdir.remove_dead_submits(tmp_path)
    monkeypatch.undo()
    assert not stored.exists() or sorted(p.name for p in stored.iterdir()) == ["job.json", "prompts.parquet"]
    assert not temp.exists() and not list(tmp_path.glob("*taken-over"))
