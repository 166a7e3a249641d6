"""Wall-clock steps and the leases of workers on one machine (adversarial pass 233).

`runner work --workers N` (or several `runner work`) on one machine: a heartbeat's lease was judged by the wall
clock alone, so a step of it forward (NTP, a VM resumed, a Colab host moved) made every live worker's heartbeat
look stale to the others until its next beat, and each took the others' units over (the epochs fenced the
losers, but their work was thrown away and done again). A heartbeat now also carries the writer's
CLOCK_MONOTONIC reading; a reader of the same boot, PID and time namespaces judges the lease by that. Other
machines, and heartbeats without a reading (an earlier runner's) or with one not of this clock, are judged by
the wall clock as before. Pass 237: so are workers in containers of one host (another PID namespace, the
same boot and time namespace); and the ages of files that carry no steady reading (an empty claim being
filled, an empty state record being written, another machine's young marker) count from this process's first
sight of them on its CLOCK_MONOTONIC: a step of the wall clock took a claim being filled over, said a job whose
`cancel` was being written broken, and set a marker aside before its shard arrived. Deterministic: the clocks
are monkeypatched, nothing sleeps.
"""

import json
import os
import time

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams, jobdir, storage
from runner.jobdir import Heartbeat, Owner, take_unit
from runner.jobs import create_job
from runner.scheduler import work

HOUR = 3600.0
TTL = 60.0


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    lines = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(4))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), tiny_gpt2, GenerationParams(max_new_tokens=3),
                      runner.EngineOptions(batch_size=2), home=runner_home)  # fmt: skip


def holding(job, owner: Owner) -> Heartbeat:
    """`owner` beats (a lease of TTL) and holds the job's only unit."""
    beat = Heartbeat(job, owner, ttl=TTL)
    beat.beat()
    assert take_unit(job, 0, owner, -1) == 0
    return beat


def wall_stepped(monkeypatch, step: float) -> None:
    """From here on this process's wall clock reads `step` seconds on from the real one (the heartbeat was
    written before the step)."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + step)


def steady_on(monkeypatch, seconds: float) -> None:
    """From here on this process's CLOCK_MONOTONIC reads `seconds` on from the real one (time passed)."""
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + seconds)


def rewritten(beat: Heartbeat, **changes) -> None:
    """The heartbeat's record with `changes` (None: the field left out), checksummed as its writer does."""
    hb = json.loads(beat.path.read_text())
    del hb["check"]
    for key, value in changes.items():
        if value is None:
            hb.pop(key, None)
        else:
            hb[key] = value
    hb["check"] = storage.json_checksum(hb)
    beat.path.write_text(json.dumps(hb))


def held_by(job, worker: str) -> bool:
    progress = jobdir.job_progress(job)
    return worker in progress.live and 0 not in progress.claimable


@pytest.mark.parametrize("step", [HOUR, 10 * 86400])
def test_a_live_worker_of_this_machine_keeps_its_unit_when_the_wall_clock_steps_forward(
    job, monkeypatch, step
):
    near = Owner.me("near")
    holding(job, near)
    wall_stepped(monkeypatch, step)
    assert held_by(job, "near")
    # what `runner status` says of its lease is the same judgement: TTL from its beat, on the stepped clock
    assert 0 < jobdir.live_workers(job)["near"]["expires"] - time.time() <= TTL
    status = runner.status(job.dir)
    assert status.state == "running" and [w["worker"] for w in status.workers] == ["near"], status


def test_work_takes_no_unit_from_a_live_worker_of_this_machine_after_a_forward_step(job, gpt2_engine,
                                                                                    runner_home, monkeypatch):  # fmt: skip
    """`runner work` beside a live worker of the same machine whose last beat was just before the step: it
    waits (stopped once it says so), as without the step. It computed the unit again, and that worker's work
    was thrown away."""
    holding(job, Owner.me("other-worker"))
    wall_stepped(monkeypatch, HOUR)
    said = []
    assert work(runner_home, engine=gpt2_engine, echo=said.append, stop=lambda: bool(said), poll=0.2) == []
    assert "the rest is held by worker other-worker" in said[0], said
    assert not list((job.dir / "shards").glob("*.parquet"))


@pytest.mark.parametrize(
    "where",
    [{"boot": "another-boot"}, {"timens": "time:[1]"}, {"pidns": "pid:[1]", "timens": None}],
    ids=["another-boot", "another-time-namespace", "another-container-unknown-time-namespace"],
)
def test_a_heartbeat_of_another_machine_is_judged_by_the_wall_clock(job, monkeypatch, where):
    """A heartbeat of another boot or time namespace carries a monotonic reading that is not of this clock
    (here it is fresh by this clock's count, all the same): its lease is the wall clock's. So is one of another
    PID namespace where the time namespaces cannot be read (both None: a sandbox's /proc)."""
    me = Owner.me("far")
    far = Owner(
        me.worker, "other-vm", me.pid, where.get("boot", me.boot), where.get("pidns", me.pidns), me.start
    )
    beat = holding(job, far)
    if "timens" in where:
        rewritten(beat, timens=where["timens"])
    if where.get("timens", "") is None:
        monkeypatch.setattr(storage, "time_namespace", lambda: None)
    assert held_by(job, "far")
    wall_stepped(monkeypatch, TTL + 1)
    assert not held_by(job, "far")


def test_a_live_worker_in_a_container_of_this_machine_keeps_its_unit_when_the_wall_clock_steps_forward(
    job, monkeypatch
):
    """A worker in another container of this host (another PID namespace; the host's boot_id and time
    namespace, as Docker gives by default) reads the same CLOCK_MONOTONIC: its lease is judged by it, and a
    forward step no longer ends it (it did: its unit taken over, its work thrown away; pass 237). Its pid means
    nothing here: never taken for provably dead, even with the pid free."""
    if storage.time_namespace() is None:
        pytest.skip("no time namespace to read here")
    me = Owner.me("boxed")
    holding(job, Owner(me.worker, "container-7", 2**22 - 3, me.boot, "pid:[4026532999]", "1"))
    wall_stepped(monkeypatch, HOUR)
    assert held_by(job, "boxed")
    monkeypatch.undo()
    steady_on(monkeypatch, TTL + 1)
    assert not held_by(job, "boxed")  # frozen (or gone) past its lease, by that clock


def test_a_frozen_worker_of_this_machine_is_taken_over_once_its_monotonic_lease_is_over(job, monkeypatch):
    """A worker stopped (SIGSTOP) past its lease: its reading stays old while the clock runs on, and its unit is
    free, even with the wall clock stepped back an hour meanwhile (its beat then in our future: it got a lease
    more from when that was seen)."""
    holding(job, Owner.me("frozen"))
    steady_on(monkeypatch, TTL - 1)
    assert held_by(job, "frozen")
    monkeypatch.undo()
    steady_on(monkeypatch, TTL + 1)
    wall_stepped(monkeypatch, -HOUR)
    assert not held_by(job, "frozen")
    monkeypatch.undo()
    steady_on(monkeypatch, TTL + 1)
    assert not held_by(job, "frozen")


def test_a_heartbeat_without_a_monotonic_reading_is_judged_by_the_wall_clock(job, monkeypatch):
    """An earlier runner's heartbeat (no reading) of this machine, still checksummed: as before this pass."""
    beat = holding(job, Owner.me("old"))
    rewritten(beat, monotonic=None, timens=None)
    assert held_by(job, "old")
    wall_stepped(monkeypatch, TTL + 1)
    assert not held_by(job, "old")


@pytest.mark.parametrize("reading", [1e18, -5.0, "soon", float("nan")])
def test_a_monotonic_reading_not_of_this_clock_leaves_the_wall_clock_to_judge(job, monkeypatch, reading):
    """A reading ahead of this clock (or not a reading) is not this clock's: it neither holds a lease for ever
    nor ends a fresh one; the wall clock judges."""
    beat = holding(job, Owner.me("odd"))
    rewritten(beat, monotonic=reading)
    assert held_by(job, "odd")
    wall_stepped(monkeypatch, TTL + 1)
    assert not held_by(job, "odd")


# Pass 237: the other ages judged on the wall clock, of files that carry no steady reading (an empty claim or
# state record, another machine's commit marker): their age at this process's first sight is their mtime's,
# and from there this process's CLOCK_MONOTONIC counts.


def empty_claim(job) -> None:
    """A claim created and not filled yet (no hard links: a worker's create, then its fill)."""
    storage.ensure_dir(job.dir / "claims")
    (job.dir / "claims" / "00000-00000000.json").write_bytes(b"")


def claimable(job) -> bool:
    return 0 in jobdir.job_progress(job).claimable


@pytest.mark.parametrize("step", [HOUR, -HOUR, -TTL], ids=["forward", "back-far", "back-near"])
def test_a_claim_being_filled_is_held_for_its_fill_time_whatever_the_wall_clock_does(job, monkeypatch, step):
    """Seen empty (being filled), then the wall clock steps: forward, the claim looked an hour old and its unit
    was taken over while its writer filled it (the epochs fenced that worker; its unit was computed again);
    back by more than STATE_PATIENCE_SECONDS, dated ahead past belief, the same; back by less, a claim left
    empty by a killed writer counted as made now until the wall clock came back to its date. Now it is held
    for CLAIM_FILL_SECONDS by this process's steady clock from when it was seen, then free."""
    empty_claim(job)
    assert not claimable(job)
    wall_stepped(monkeypatch, step)
    assert not claimable(job)
    steady_on(monkeypatch, jobdir.CLAIM_FILL_SECONDS + 1)
    assert claimable(job)


def test_a_claim_left_empty_long_ago_is_free_at_first_sight(job, monkeypatch):
    """Its mtime still tells its age when first seen: a writer killed between its create and its fill an hour
    ago holds nothing (no wait of CLAIM_FILL_SECONDS per process that looks)."""
    empty_claim(job)
    old = time.time() - HOUR
    os.utime(job.dir / "claims" / "00000-00000000.json", (old, old))
    assert claimable(job)


def empty_record(job, monkeypatch) -> None:
    """The job's next state record created and not filled yet: a `runner cancel` on its way, no hard links."""
    monkeypatch.setattr(jobdir, "links_supported", lambda folder: False)
    place = job.dir / jobdir.STATES / jobdir.record_name(jobdir.read_state(job.dir).seq + 1)
    place.parent.mkdir(exist_ok=True)
    place.write_bytes(b"")


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
def test_a_state_record_being_written_is_waited_for_its_patience_whatever_the_wall_clock_does(
    job, monkeypatch, step
):
    """Seen empty (a `cancel` being written), then the wall clock steps an hour: `runner status` said the job
    broken (`runner repair`), and a worker gave it up, while the cancel was on its way. Now it is waited for
    STATE_PATIENCE_SECONDS by this process's steady clock from when it was seen, then broken."""
    empty_record(job, monkeypatch)
    assert runner.status(job.dir).state == "queued"  # (the state below it, while it is written)
    wall_stepped(monkeypatch, step)
    assert runner.status(job.dir).state == "queued"
    with pytest.raises(jobdir.BrokenJob) as e:
        job.state()
    assert e.value.unfilled and not e.value.waited_out()
    steady_on(monkeypatch, jobdir.STATE_PATIENCE_SECONDS + 1)
    assert e.value.waited_out()
    assert runner.status(job.dir).state == "broken"


@pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["forward", "back"])
def test_another_machines_young_marker_stays_young_whatever_this_wall_clock_does(tmp_path, monkeypatch, step):
    """A marker just seen (another VM's commit, its shard on its way through the mount) is young for
    SHARD_ARRIVAL_SECONDS by this process's steady clock: the wall clock stepped forward an hour made it old,
    and a worker set it aside before its shard arrived (its rows computed again)."""
    marker = tmp_path / "00000-00000000-0000.json"
    marker.write_text("{}")
    assert jobdir._younger_than(marker, jobdir.SHARD_ARRIVAL_SECONDS)
    wall_stepped(monkeypatch, step)
    assert jobdir._younger_than(marker, jobdir.SHARD_ARRIVAL_SECONDS)
    steady_on(monkeypatch, jobdir.SHARD_ARRIVAL_SECONDS + 1)
    assert not jobdir._younger_than(marker, jobdir.SHARD_ARRIVAL_SECONDS)


def test_work_waits_for_a_state_record_being_written_after_a_forward_step(job, gpt2_engine, runner_home,
                                                                          monkeypatch):  # fmt: skip
    """`runner work` meets the job's newest state record empty (a `cancel` being written, no hard links) after
    the wall clock stepped forward: it waits for it, as without the step. It said the job broken."""
    empty_record(job, monkeypatch)
    assert runner.status(job.dir).state == "queued"  # (seen before the step)
    wall_stepped(monkeypatch, HOUR)
    said = []
    assert work(runner_home, engine=gpt2_engine, echo=said.append, stop=lambda: bool(said), poll=0.2) == []
    assert "waiting up to" in said[0] and not any("broken" in line for line in said), said


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
    wall_stepped(monkeypatch, 2 * 86400)
    jobdir.remove_dead_submits(tmp_path)
    monkeypatch.undo()
    assert not stored.exists() or sorted(p.name for p in stored.iterdir()) == ["job.json", "prompts.parquet"]
    assert not temp.exists() and not list(tmp_path.glob("*taken-over"))
