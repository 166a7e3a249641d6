"""A mount that shows another machine's files late (Google Drive between two Colab VMs): the small marker of a
commit can show before its shard. Found by an adversarial pass (132, tests/stalefs.py): a worker on the other VM
took the marker without its shard for damage and moved it to quarantine/; the shard arrived after, and a job
completed meanwhile was left with those rows missing (`runner repair` to compute them again). A marker younger
than SHARD_ARRIVAL_SECONDS whose shard is missing is now left where it is (not counted meanwhile)."""

import os
import time

import pytest
from helpers import assert_exactly_once, reference_run

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.jobdir import Job, Owner, read_ledger
from runner.jobs import create_job
from runner.worker import JobRun, run_job

PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=99)
OPTIONS = EngineOptions(batch_size=2)
N = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(N)]
    return reference_run(tmp_path_factory.mktemp("late"), tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=3)


def another_workers_tidy(job, engine) -> None:
    """What a worker starting on the job does first (JobRun.run): read the ledger, set aside what fails."""
    run = JobRun(Job.open(job.dir), engine, None, 2, 300.0, None, None, Owner.me("B"), jobdir.LEASE_TTL, None)
    run.tidy(jobdir.job_progress(run.job, run.ledger()))


def completed_with_a_shard_in_transit(reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch,
                                      same_host_name=False):  # fmt: skip
    """A job completed on one VM, as another VM sees it: one commit's marker there, its shard not yet. With
    `same_host_name`, the other VM has this one's host name (`--hostname worker`, "localhost"), another boot."""
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)
    assert run_job(job, gpt2_engine, echo=None, shard_rows=2).finished
    if same_host_name:  # where what follows runs
        real = storage.boot_id()
        monkeypatch.setattr(storage, "boot_id", lambda: f"not-{real}")
    else:
        monkeypatch.setattr(jobdir, "host_tag", lambda: "another-vm")
    victim = read_ledger(job).commits[1]
    shard = job.dir / "shards" / victim.shard
    aside = job.dir.parent / "in-transit.parquet"
    os.replace(shard, aside)  # the other VM's mount does not show it yet
    return job, victim, shard, aside


@pytest.mark.parametrize("same_host_name", [False, True])
def test_a_young_marker_whose_shard_has_not_arrived_is_not_quarantined(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch, same_host_name
):
    """Also from a machine whose host name is this one's (two VMs or containers named alike on one shared
    folder): the marker's worker id names this host, and its young marker was set aside at once as this
    machine's own damage; once the shard arrived the completed job had lost its rows (adversarial pass 168).
    The claim it committed under was made on another boot: that tells the machines apart."""
    job, victim, shard, aside = completed_with_a_shard_in_transit(
        reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch, same_host_name
    )
    another_workers_tidy(job, gpt2_engine)
    assert (job.dir / "done" / f"{victim.name}.json").exists()
    assert not list((job.dir / "quarantine").glob("*"))
    os.replace(aside, shard)  # it arrives
    s = runner.status(job.dir)
    assert s.state == "completed" and s.done == s.total == 2 * N, s
    assert_exactly_once(job.dir, reference[1])


def test_an_old_marker_whose_shard_is_missing_is_still_quarantined(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job, victim, shard, aside = completed_with_a_shard_in_transit(
        reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
    )
    marker = job.dir / "done" / f"{victim.name}.json"
    old = time.time() - jobdir.SHARD_ARRIVAL_SECONDS - 60
    os.utime(marker, (old, old))
    another_workers_tidy(job, gpt2_engine)
    assert not marker.exists()
    assert [p.name.split("-", 2)[-1] for p in (job.dir / "quarantine").iterdir()] == [marker.name]


def test_a_marker_dated_ahead_by_the_clock_of_the_vm_that_wrote_it_is_young_too(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """The VM that wrote the commit has a clock two minutes ahead of this one's: its marker, just written, is
    dated in this VM's future. It was taken for old at once (beyond SKEW_SLACK) and set aside before its shard
    arrived: the completed job was left with 2 rows missing (adversarial pass 141). It is young, counted from
    when this process first saw it, and the shard that arrives completes the job."""
    job, victim, shard, aside = completed_with_a_shard_in_transit(
        reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
    )
    marker = job.dir / "done" / f"{victim.name}.json"
    ahead = time.time() + 120
    os.utime(marker, (ahead, ahead))
    another_workers_tidy(job, gpt2_engine)
    assert marker.exists() and not list((job.dir / "quarantine").glob("*"))
    os.replace(aside, shard)  # it arrives
    s = runner.status(job.dir)
    assert s.state == "completed" and s.done == s.total == 2 * N, s
    assert_exactly_once(job.dir, reference[1])


def test_status_says_a_young_shard_is_not_here_yet_before_sending_to_repair(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """On the other VM, status said "completed, but 2 result rows are missing ... `runner repair`", and a repair
    run then re-queued the sound job and set its commit aside (adversarial pass 134). A shard not here yet
    whose marker is young is said as such: look again first. An old one is missing as before."""
    job, victim, shard, aside = completed_with_a_shard_in_transit(
        reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
    )
    s = runner.status(job.dir)
    assert s.state == "broken" and s.message.startswith(
        f"completed, but 2 result rows are missing: the shards of 1 commit ({victim.name}) are not here yet"
    ), s
    assert "Look again in a few minutes; if they do not come, `runner repair" in s.message
    # a marker dated ahead by another VM's clock is not young for as long as that clock is ahead
    ahead = time.time() + jobdir.SKEW_SLACK + 3600
    os.utime(job.dir / "done" / f"{victim.name}.json", (ahead, ahead))
    assert "are not here yet" not in runner.status(job.dir).message
    marker = job.dir / "done" / f"{victim.name}.json"
    old = time.time() - jobdir.SHARD_ARRIVAL_SECONDS - 60
    os.utime(marker, (old, old))
    s = runner.status(job.dir)
    assert s.message.startswith("completed, but 2 result rows are missing or failed verification"), s
    assert s.message.endswith("its shard is missing")


def test_on_the_machine_that_wrote_it_a_missing_shard_is_damage_at_once(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """This machine's own shards are here once their markers are: a young marker of this host whose shard is
    missing is damage, set aside by the next worker and said as missing, as before."""
    here = jobdir.host_tag
    job, victim, shard, aside = completed_with_a_shard_in_transit(
        reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
    )
    monkeypatch.setattr(jobdir, "host_tag", here)  # back on the machine that computed it
    assert runner.status(job.dir).message.startswith("completed, but 2 result rows are missing")
    another_workers_tidy(job, gpt2_engine)
    marker = job.dir / "done" / f"{victim.name}.json"
    assert not marker.exists()
    assert [p.name.split("-", 2)[-1] for p in (job.dir / "quarantine").iterdir()] == [marker.name]


def test_a_container_of_this_boot_with_the_host_name_is_this_machine(
    reference, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """A container on this machine (another PID namespace, the host's name under `--network host`: one
    container per GPU on a bind-mounted folder) writes through this kernel: its shard is here once its marker
    is, so one missing is damage at once, not a shard in transit for SHARD_ARRIVAL_SECONDS."""
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)
    assert run_job(job, gpt2_engine, echo=None, shard_rows=2).finished
    monkeypatch.setattr(storage, "pid_namespace", lambda: "pid:[1]")  # another container, the same boot
    victim = read_ledger(job).commits[1]
    (job.dir / "shards" / victim.shard).unlink()
    another_workers_tidy(job, gpt2_engine)
    marker = job.dir / "done" / f"{victim.name}.json"
    assert not marker.exists()
    assert [p.name.split("-", 2)[-1] for p in (job.dir / "quarantine").iterdir()] == [marker.name]
