"""The job folder's ownership and integrity model (jobdir.py), case by case, in process: fenced claims, keyed
results, verification and quarantine, transient read errors, one-write transitions, broken jobs and repair,
liveness across PID namespaces, a slow file system, and a home that stays closed."""

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from fsfaults import FsFaults
from helpers import assert_exactly_once, reference_run, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir, storage
from runner.jobdir import Heartbeat, Job, JobState, Owner, read_ledger, take_unit
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=99)
OPTIONS = EngineOptions(batch_size=2)
N = 8  # prompts; units of 3 rows: 3 units, 16 result rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(N)]
    prompts, ref = reference_run(
        tmp_path_factory.mktemp("jobdir"), tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=3
    )
    assert len(ref) == 2 * N
    return prompts, ref


@pytest.fixture
def job(reference, tiny_gpt2, runner_home):
    return create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)


def stop_after(n):
    calls = []
    return lambda: calls.append(1) or len(calls) > n


def test_a_ledger_reads_the_claims_of_the_units_left_only(reference, tiny_gpt2, runner_home, gpt2_engine,
                                                          monkeypatch):  # fmt: skip
    """Each time a worker took a unit it read every claim file of the job: units of 1,000 done, 1,000 reads (a
    round trip each on Drive), and the cost of a unit grew with the units done (adversarial pass 111). Only the
    claims of units with keys left matter (who holds them), and only those are read."""
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=1)
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(4))
    claimed = {int(n[:5]) for n in os.listdir(job.dir / "claims") if jobdir.CLAIM_RE.fullmatch(n)}
    read, real = [], jobdir._read_json_or_none
    monkeypatch.setattr(jobdir, "_read_json_or_none", lambda path: read.append(Path(path)) or real(path))
    progress = jobdir.job_progress(job)
    assert progress.units_left and claimed - set(progress.units_left)  # claims of done units are there
    claims_read = {
        int(p.name[:5]) for p in read if p.parent.name == "claims" and jobdir.CLAIM_RE.fullmatch(p.name)
    }
    assert claims_read <= set(progress.units_left), (claims_read, progress.units_left)
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


# --- fenced ownership ---------------------------------------------------------------------------------------


def taken_over_before_its_first_commit(monkeypatch) -> list:
    """The worker run next is frozen between its last check and its first commit, while another worker takes
    that unit over (claims and seals it): the epochs taken are appended to the list returned."""
    import runner.worker as worker_module

    taken, original = [], worker_module.JobRun.commit

    def takeover_then_commit(self, unit):  # runs inside the frozen worker, right before each commit
        if not taken:
            taken.append(take_unit(self.job, unit.index, Owner.me("successor"), unit.epoch))
        return original(self, unit)

    monkeypatch.setattr(worker_module.JobRun, "commit", takeover_then_commit)
    monkeypatch.setattr(jobdir, "still_holds", lambda *a: True)  # it checked before it froze
    return taken


def test_a_stale_worker_that_commits_after_a_takeover_counts_for_nothing(
    job, reference, gpt2_engine, monkeypatch
):
    """The worker is frozen (SIGSTOP, a suspended VM) between its last check and its commit, and another
    worker took its unit over meanwhile: the commit lands after the seal and is ignored, whatever it holds."""
    frozen = Owner.me("frozen")
    taken = taken_over_before_its_first_commit(monkeypatch)
    run_job(job, gpt2_engine, echo=None, owner=frozen, shard_rows=2, should_stop=stop_after(1))
    monkeypatch.undo()
    assert taken == [1]
    ledger = read_ledger(job)
    late = [n for n in jobdir.scan(job.dir / "done") if n.startswith("00000-00000000-")]
    assert late and not [c for c in ledger.commits if c.unit == 0]  # on disk, sealed out, never counted
    assert json.loads((job.dir / "claims" / "00000-00000000.seal.json").read_text())["commits"] == []
    assert job.state().state is JobState.QUEUED  # and it could not change the job's state
    summary = run_job(job, gpt2_engine, echo=None)
    assert summary.finished and assert_exactly_once(job.dir, reference[1]) == 2 * N


def test_a_seal_with_a_changed_byte_is_damaged_not_obeyed(job, reference, gpt2_engine):
    """A seal's commit name with one digit changed (still valid JSON) left a good commit out of the results
    (adversarial pass 58): seals carry a checksum, and one that does not match is damaged, which accepts every
    commit of its epoch, as a torn seal does. A seal list of something other than names is damaged too."""
    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=stop_after(1))
    committed = sorted(c.name for c in read_ledger(job).commits if c.unit == 0)
    assert committed and take_unit(job, 0, Owner.me("successor"), 0) == 1  # seals epoch 0 as it stands
    seal = job.dir / "claims" / jobdir.seal_name(0, 0)
    assert json.loads(seal.read_text())["commits"] == committed
    text = seal.read_text()
    name = committed[0]
    changed = name[:-1] + ("1" if name[-1] == "0" else "0")
    seal.write_text(text.replace(f'"{name}"', f'"{changed}"'))
    assert sorted(c.name for c in read_ledger(job).commits if c.unit == 0) == committed
    seal.write_text(json.dumps({**json.loads(text), "commits": [{"a": 1}]}))  # (read_ledger raised TypeError)
    assert sorted(c.name for c in read_ledger(job).commits if c.unit == 0) == committed
    summary = run_job(job, gpt2_engine, echo=None)
    assert summary.finished and assert_exactly_once(job.dir, reference[1]) == 2 * N


def test_a_late_commit_landing_between_a_readers_reads_is_not_counted_then_dropped(
    job, gpt2_engine, monkeypatch
):
    """Pass 74: a reader read the claims (no seal yet), then a taker sealed the old epoch and a superseded
    worker's late marker landed, then the reader listed the markers: the late commit counted as if its epoch had
    no seal, and dropped out at the next read (results going backwards). The markers are listed first now."""
    import shutil

    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=stop_after(1))
    before = sorted(c.name for c in read_ledger(job).commits)
    name = next(n for n in before if n.startswith("00000-00000000-"))
    real, landed = jobdir._read_claims, []

    def claims_then_seal_and_late_marker(j):
        out = real(j)
        if not landed:  # between the reader's two reads: the taker seals, then the late marker lands
            landed.append(take_unit(j, 0, Owner.me("successor"), 0))
            late = name[:-4] + "0009"
            marker = json.loads((j.dir / "done" / f"{name}.json").read_text())
            marker.update(seq=9, shard=f"{late}.parquet")
            marker["check"] = jobdir.marker_checksum(marker)
            shutil.copy(j.dir / "shards" / f"{name}.parquet", j.dir / "shards" / f"{late}.parquet")
            (j.dir / "done" / f"{late}.json").write_text(json.dumps(marker))
        return out

    monkeypatch.setattr(jobdir, "_read_claims", claims_then_seal_and_late_marker)
    first = sorted(c.name for c in read_ledger(job).commits)
    second = sorted(c.name for c in read_ledger(job).commits)
    assert landed == [1] and first == second == before


def test_a_late_commit_left_out_by_a_seal_is_said_so_not_called_damaged(
    job, reference, gpt2_engine, monkeypatch
):
    """A worker frozen between its last check and its commit, its unit taken over and sealed meanwhile: its late
    commit is left out, and the worker said it "no longer verifies (quarantined)", as if its shard were damaged
    (adversarial pass 47). It says the unit was taken over."""
    said = []
    taken_over_before_its_first_commit(monkeypatch)
    run_job(job, gpt2_engine, echo=said.append, shard_rows=100)
    monkeypatch.undo()
    left_out = [line for line in said if line.startswith("commit 00000-00000000-0000 of this run")]
    assert left_out == ["commit 00000-00000000-0000 of this run was left out: its unit was taken over by another "
                        "worker (this one was thought dead): its 6 results are computed again"], said  # fmt: skip
    assert not [line for line in said if "no longer verifies" in line]


def test_a_completion_is_decided_on_sealed_epochs(job, reference, gpt2_engine, monkeypatch):
    """A worker frozen right before its last commit, while another took its unit over and had listed the
    epoch's markers but not yet created the seal: the thawed worker's commit landed, its finish counted it (the
    epoch had no seal yet) and recorded "completed"; then the seal, from the older listing, left that commit
    out, and the completed job lacked its rows (adversarial pass 41). The completion is decided after the
    finishing worker fixes the seal itself: the taker's seal, created second, is not made."""
    successor, listed = Owner.me("successor"), []
    real = jobdir.write_marker

    def write_marker(j, index, epoch, seq, marker):
        if index == 2 and not listed:  # the last unit's commit: the taker claims it and lists its markers
            assert jobdir.create_exclusive(j.dir / "claims" / jobdir.claim_name(index, epoch + 1),
                                           {**successor.as_dict(), "unit": index, "epoch": epoch + 1})  # fmt: skip
            prefix = f"{index:05d}-{epoch:08d}-"
            listed.append([n[:-5] for n in jobdir.scan(j.dir / "done") if n.startswith(prefix)])
        return real(j, index, epoch, seq, marker)

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    monkeypatch.setattr(jobdir, "still_holds", lambda *a: True)  # it checked before it froze
    run_job(job, gpt2_engine, echo=None, shard_rows=100)
    monkeypatch.undo()
    seal = job.dir / "claims" / jobdir.seal_name(2, 0)
    # the taker goes on: it creates the seal from the listing it made before the commit (unless one exists)
    jobdir.create_exclusive(seal, {"unit": 2, "epoch": 0, "commits": listed[0], "sealed": time.time()})
    if job.state().state is JobState.COMPLETED:
        assert_exactly_once(job.dir, reference[1])  # completed: every row is there, and stays there
    assert json.loads(seal.read_text())["commits"] == ["00002-00000000-0000"]


def test_a_worker_whose_unit_was_taken_over_discards_its_rows(job, reference, gpt2_engine, monkeypatch):
    said = []
    import runner.worker as worker_module

    original = worker_module.JobRun.commit

    successor = Heartbeat(job, Owner.me("successor"), ttl=600)

    def taken_before_commit(self, unit):
        if unit.index == 0 and unit.epoch == 0:
            successor.beat()  # alive, and holding the unit from now on
            take_unit(self.job, 0, successor.owner, 0)
        return original(self, unit)

    monkeypatch.setattr(worker_module.JobRun, "commit", taken_before_commit)
    summary = run_job(job, gpt2_engine, echo=said.append, shard_rows=100)
    assert any("was taken over by another worker" in s for s in said)
    assert not summary.finished and summary.others == 1  # the other units are done; unit 0 is the successor's
    # each unit says its rows, then how many of its results are left ("6 of 16" read as 10 done: pass 44)
    assert any(": unit 1 (rows 4-6 of 8): 6 results to generate on " in line for line in said)
    # its progress no longer counts the discarded rows as done, "not saved yet" (pass 41)
    assert said[-1].startswith("10/16 results (62.5%)") and "not saved" not in said[-1], said[-1]
    assert not [c for c in read_ledger(job).commits if c.unit == 0]
    monkeypatch.undo()
    successor.path.unlink()  # the successor stops (its claim is released)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


def test_a_worker_whose_temp_marker_was_tidied_after_a_takeover_discards_its_rows(
    job, reference, gpt2_engine, monkeypatch
):
    """A worker frozen past its lease (and TEMP_MAX_AGE) right before renaming its commit marker into done/:
    the worker that took the unit over tidied its temp file away, and the woken worker stopped with a false
    "the job home cannot be written" (adversarial pass 11). A commit write that fails once the claim is lost is
    ClaimLost: the rows are discarded, as any late commit's are, and the run goes on."""
    successor = Heartbeat(job, Owner.me("successor"), ttl=600)
    real, said = jobdir.write_marker, []

    def write_marker(j, index, epoch, seq, marker):
        if index == 0 and epoch == 0:  # woken: the unit is the successor's, the temp file gone
            successor.beat()
            take_unit(j, 0, successor.owner, 0)
            raise storage.StorageError(
                "cannot rename .00000-00000000-0000.json.1a2b3c4d.tmp: No such file", 2
            )
        return real(j, index, epoch, seq, marker)

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    summary = run_job(job, gpt2_engine, echo=said.append, shard_rows=100)
    assert any("was taken over by another worker" in s for s in said)
    assert not summary.finished and not [c for c in read_ledger(job).commits if c.unit == 0]
    monkeypatch.undo()
    successor.path.unlink()  # the successor stops (its claim is released)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


def test_claiming_is_exclusive_on_a_slow_file_system(job, monkeypatch):
    """Eight workers race for one unit through a mount where every operation takes 50 ms: one owner."""
    FsFaults(job.dir.parent, slow=0.05).install(monkeypatch)
    got = []
    threads = [threading.Thread(target=lambda i=i: got.append(take_unit(job, 1, Owner.me(f"w{i}"), -1)))
               for i in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=str) == [0] + [None] * 7
    assert jobdir.scan(job.dir / "claims") == ["00001-00000000.json"]


# --- keyed, verified --------------------------------------------------------------------------------------


def test_a_key_committed_twice_counts_once_and_conflict_copies_are_ignored(job, reference, gpt2_engine):
    run_job(job, gpt2_engine, echo=None)
    done = job.dir / "done"
    name = sorted(done.iterdir())[0]
    shutil.copy(name, done / (name.stem + " (1).json"))  # a Drive conflict copy
    marker = json.loads(name.read_text())
    shard = job.dir / "shards" / marker["shard"]
    # the same keys committed again under another valid name (a recomputation): identical by construction
    again = name.stem[:-4] + "0099"
    shutil.copy(shard, job.dir / "shards" / f"{again}.parquet")
    twin = {**marker, "seq": 99, "shard": f"{again}.parquet"}
    (done / f"{again}.json").write_text(json.dumps({**twin, "check": jobdir.marker_checksum(twin)}))
    status = runner.status(job.dir)
    assert (status.done, status.total, status.state) == (2 * N, 2 * N, "completed")
    assert_exactly_once(job.dir, reference[1])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "torn-marker", "foreign-keys"])
def test_a_damaged_commit_is_never_counted_then_quarantined_and_redone(job, reference, gpt2_engine, damage):
    run_job(job, gpt2_engine, echo=None, shard_rows=2)
    commits = read_ledger(job).commits
    victim = commits[len(commits) // 2]
    shard = job.dir / "shards" / victim.shard
    marker = job.dir / "done" / f"{victim.name}.json"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-7]))
    elif damage == "delete":
        shard.unlink()
    elif damage == "torn-marker":
        marker.write_text(marker.read_text()[:40])
    else:  # a marker whose keys are not its shard's: its checksum is right, the content is someone else's
        m = json.loads(marker.read_text())
        other = commits[0]
        shutil.copy(job.dir / "shards" / other.shard, shard)
        m.update(bytes=shard.stat().st_size, sha256=storage.file_sha256(shard))
        m["check"] = jobdir.marker_checksum(m)  # a consistent marker: only the shard's keys can tell
        marker.write_text(json.dumps(m))
    lost = victim.marker["rows"] if damage != "foreign-keys" else victim.marker["rows"]
    with pytest.warns(
        UserWarning, match="broken: completed, but .* result rows? (?:is|are) missing"
    ):  # never values from an unverified shard, never fewer rows without a word (a torn marker too: pass 10)
        partial = runner.load_results(job.dir)
    assert len(partial) == 2 * N - lost
    s = runner.status(job.dir)
    assert s.state == "broken" and "runner repair" in s.message and s.done == 2 * N - lost
    report = runner.repair(job.dir)
    assert report.state_now == "queued" and [n for n, _ in report.quarantined] == [victim.name]
    assert any(p.name.endswith(f"{victim.name}.json") for p in (job.dir / "quarantine").iterdir())
    assert runner.work(job.dir.parent, echo=None)[0].generated == lost
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, reference[1])


def test_a_shard_changed_under_its_verified_stamp_is_found_by_results_and_repair(job, reference, gpt2_engine):
    """A shard's bytes changed while its size and times did not (bit rot; a mount that keeps stale times), after
    verified.json stamped it sound: load_results left it out and said to run `runner repair`, but repair and
    the next worker trusted the stamp ("verified"), status said completed, and its rows stayed missing for good
    (adversarial pass 57). Repair reads every shard afresh; a reader that finds a stamped shard failing drops
    its stamp, so status and the next worker look again."""
    run_job(job, gpt2_engine, echo=None, shard_rows=2)
    assert runner.status(job.dir).state == "completed"  # stamps every shard in verified.json
    victim = read_ledger(job).commits[1]
    shard = job.dir / "shards" / victim.shard
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    cache = json.loads((job.dir / "verified.json").read_text())
    st = shard.stat()
    cache[victim.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, cache[victim.name][3]]
    (job.dir / "verified.json").write_text(json.dumps(cache))  # as if nothing about the file had changed
    snapshot = (job.dir / "verified.json").read_text()
    with pytest.warns(UserWarning, match=f"commit {victim.name} left out: .*runner repair"):
        assert len(runner.load_results(job.dir)) == 2 * N - victim.marker["rows"]
    assert runner.status(job.dir).state == "broken"  # the stamp is gone: status read the shard again
    (job.dir / "verified.json").write_text(snapshot)  # the stamp back (say, a reader on a read-only copy)
    report = runner.repair(job.dir)
    assert [n for n, _ in report.quarantined] == [victim.name] and report.state_now == "queued"
    assert runner.work(job.dir.parent, echo=None)[0].generated == victim.marker["rows"]
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, reference[1])


def test_transient_read_errors_are_retried_and_never_mean_not_done(job, reference, gpt2_engine, monkeypatch):
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(3), shard_rows=1)
    done_before = runner.status(job.dir).done
    real_scandir = os.scandir
    failures = {"n": 0}

    def flaky_scandir(path="."):  # every other listing of the done-set fails once with EIO
        if str(path).endswith(("done", "claims", "shards")) and failures["n"] % 2 == 0:
            failures["n"] += 1
            raise OSError(errno.EIO, "Input/output error", str(path))
        failures["n"] += 1
        return real_scandir(path)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 8)
    monkeypatch.setattr(os, "scandir", flaky_scandir)
    summary = run_job(job, gpt2_engine, echo=None)
    assert summary.finished and summary.generated == 2 * N - done_before  # nothing done twice
    assert failures["n"] > 4
    monkeypatch.setattr(
        os, "scandir", lambda path=".": (_ for _ in ()).throw(OSError(errno.ENOTCONN, "gone"))
    )
    with pytest.raises(storage.StorageError, match="Transport endpoint|gone"):
        read_ledger(job)  # a mount that stays gone is an error, not an empty done-set
    monkeypatch.undo()
    assert_exactly_once(job.dir, reference[1])


# --- transitions, broken jobs, repair ---------------------------------------------------------------------


def test_cancel_and_retry_are_one_write_each(job, gpt2_engine, monkeypatch):
    """Each is one exclusive create of the next state record: a kill at any instant leaves the old state or
    the new one, and nothing else is written."""
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(2), shard_rows=1)
    writes = []
    real_write, real_create = storage.atomic_write, jobdir.create_exclusive
    monkeypatch.setattr(
        storage,
        "atomic_write",
        lambda t, *a, **k: writes.append(os.path.basename(t)) or real_write(t, *a, **k),
    )
    monkeypatch.setattr(
        jobdir,
        "create_exclusive",
        lambda p, obj: writes.append(f"{p.parent.name}/{p.name}") or real_create(p, obj),
    )
    assert runner.cancel(job.dir) == "queued" and writes == ["state/00000001.json"]
    writes.clear()
    runner.retry(job.dir)
    assert writes == ["state/00000002.json"] and job.state().generation == 1


def test_a_state_record_whose_create_landed_before_a_transient_error_is_the_writers(job, monkeypatch):
    """The hard link of `runner cancel`'s record lands, then the mount reports EIO: the retried create finds the
    name taken, by this very writer's record. The cancel happened once; it does not read "already cancelled"."""
    real_link, failed = os.link, []

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        if not failed:
            failed.append(dst)
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", link)
    assert runner.cancel(job.dir) == "queued" and len(failed) == 1
    monkeypatch.undo()
    assert [p.name for p in (job.dir / "state").iterdir()] == ["00000001.json"]
    assert job.state().state is JobState.CANCELLED


def test_a_claim_that_landed_is_the_takers_though_the_look_at_it_fails_once(job, monkeypatch):
    """A unit's claim links into place, the mount reports EIO, the retried create finds the name taken, and
    the look that tells the taker's own file from another writer's fails once too (a burst of EIO on a flaky
    mount): it is retried. Taken for another's, the unit was left by its own taker, whose fresh heartbeat then
    kept anyone else from it (pass 189)."""
    real_link, real_samefile, failed = os.link, os.path.samefile, []

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        if Path(dst).parent.name == "claims" and not failed:
            failed.append(dst)
            raise OSError(errno.EIO, "Input/output error")

    def samefile(a, b):
        if len(failed) == 1:
            failed.append(b)
            raise OSError(errno.EIO, "Input/output error")
        return real_samefile(a, b)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os.path, "samefile", samefile)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 3)
    assert take_unit(job, 0, Owner.me("w1"), -1) == 0 and len(failed) == 2
    monkeypatch.undo()
    assert jobdir.still_holds(job, 0, 0, "w1")


def _no_links(monkeypatch) -> None:
    """A file system without hard links (Drive), transient errors retried at once."""
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 3)


def _failing_creates(monkeypatch, times: int = 1, landed: bool = False, which=lambda path: True) -> list:
    """os.open: the first `times` exclusive creates of paths `which` picks raise EIO, having made the file
    (`landed`: the reply was lost) or not. Returns the paths they failed on."""
    real_open, failed = os.open, []

    def open_(path, flags, *a, **k):
        if flags & os.O_EXCL and len(failed) < times and which(path):
            if landed:  # (a name already taken raises FileExistsError here, as it would, and is not counted)
                os.close(real_open(path, flags, *a, **k))
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_)
    return failed


def _in_main_thread(path) -> bool:
    return threading.current_thread() is threading.main_thread()


def _freeze_threads_after_create(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """A writer on another thread than the main one stops between its exclusive create and its fill (a frozen
    process) until `thawed` is set; `frozen` is set once it stopped."""
    frozen, thawed = threading.Event(), threading.Event()

    def at(name):
        if name == "after_create" and not _in_main_thread(None):
            frozen.set()
            assert thawed.wait(60), "the frozen writer was never thawed"

    monkeypatch.setattr(jobdir, "fault_point", at)
    return frozen, thawed


def test_without_links_a_create_that_landed_before_a_transient_error_is_the_writers(job, monkeypatch):
    """No hard links (Drive): the O_EXCL create of `runner cancel`'s record lands, then the mount reports EIO.
    The retry found the name taken, by its own empty file, took it for another writer's and left it empty: the
    cancel failed and the job read broken until `runner repair`, nothing having been killed (adversarial pass
    57). An empty file at the name after our own create failed, that no one fills, is ours: filled."""
    _no_links(monkeypatch)
    lost = _failing_creates(monkeypatch, landed=True, which=lambda path: "state" in str(path))
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.0,))
    assert runner.cancel(job.dir) == "queued" and [Path(p).name for p in lost] == ["00000001.json"]
    monkeypatch.undo()
    assert [p.name for p in (job.dir / "state").iterdir()] == ["00000001.json"]
    assert job.state().state is JobState.CANCELLED


def test_without_links_a_name_another_writer_fills_after_our_failed_create_is_theirs(tmp_path, monkeypatch):
    """The other side of the test above: our create failed (it did not land), another writer created the name
    meanwhile and fills it while we look: it is theirs, never overwritten."""
    path = tmp_path / "00000001.json"
    tries = []

    def open_(p, flags, *a, **k):
        if flags & os.O_EXCL and not tries:
            tries.append(p)
            path.write_bytes(b"")  # the other writer's create, then its fill as we look (below)
            raise OSError(errno.EIO, "Input/output error")
        return real_open(p, flags, *a, **k)

    def sleep(seconds):  # the other writer fills its file during our first pause
        path.write_bytes(b'{"theirs": 1}\n')

    real_open = os.open
    _no_links(monkeypatch)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(jobdir.time, "sleep", sleep)
    assert jobdir.create_exclusive(path, {"ours": 1}) is False
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"theirs": 1}


def _copying_rename(src, dst, *a, **k):
    """os.rename as some FUSE / Drive mounts do it: the bytes copied to the destination, then the source deleted."""
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)
    os.unlink(src)


@pytest.mark.parametrize("rename", ["rename", "copy then delete"])
@pytest.mark.parametrize("wakes", ["after the adoption", "between the adopter's last look and its move"])
def test_without_links_a_writer_frozen_between_create_and_fill_and_an_adopter_are_never_both_its_creator(
    tmp_path, monkeypatch, rename, wakes
):
    """Writer B creates the name and freezes before filling it; writer A's own create had failed (it did not
    land) and its retry finds B's empty file, empty past ADOPT_PAUSES: A adopts it. B wakes and fills. Both
    said they created it: a `cancel` reported done was overwritten by a worker's "completed", a longer fill
    over a shorter one left a damaged record, one claim was held twice (adversarial passes 59, 60; on a mount
    whose rename is a copy, A's renamed-in record was the very file B filled). A takes the empty file aside by
    a rename, creates the name afresh, and B fills through its own descriptor (never reopened by name) and
    reads back: exactly one of them holds the name, whenever B wakes."""
    path = tmp_path / "00000001.json"
    _no_links(monkeypatch)
    frozen, thawed = _freeze_threads_after_create(monkeypatch)  # B, on its thread
    b_done, real_rename = threading.Event(), os.rename

    def rename_(src, dst, *a, **k):
        if wakes.startswith("between") and not thawed.is_set():
            thawed.set()  # B fills and reads back before A's move
            assert b_done.wait(60)
        (real_rename if rename == "rename" else _copying_rename)(src, dst)

    def b():
        b_said.append(jobdir.create_exclusive(path, {"writer": "B"}))
        b_done.set()

    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.0,))
    monkeypatch.setattr(os, "rename", rename_)
    b_said = []
    thread = threading.Thread(target=b)
    thread.start()
    assert frozen.wait(60) and path.exists() and path.stat().st_size == 0
    _failing_creates(monkeypatch, which=_in_main_thread)  # A's first create fails without landing
    try:
        a_said = jobdir.create_exclusive(path, {"writer": "A"})
    finally:
        thawed.set()
        thread.join(60)
    monkeypatch.undo()
    winner = json.loads(path.read_text())["writer"]
    assert [a_said, *b_said] == [winner == "A", winner == "B"]
    assert winner == ("A" if wakes.startswith("after") else "B")
    assert [n for n in os.listdir(tmp_path) if n != path.name] == []  # nothing left aside


def test_without_links_creates_whose_replies_are_lost_twice_in_a_row_still_land(tmp_path, monkeypatch):
    """Lost replies come in bursts on a flaky mount: the adopter's fresh create lost its reply too, and the name
    was left empty with no writer, the job broken (adversarial pass 61). An adopter adopts again (a few times)."""
    path = tmp_path / "00000001.json"
    _no_links(monkeypatch)
    lost = _failing_creates(monkeypatch, times=2, landed=True)
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.0,))
    assert jobdir.create_exclusive(path, {"writer": "A"}) is True and len(lost) == 2
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"writer": "A"} and os.listdir(tmp_path) == [path.name]


def test_without_links_a_record_put_back_never_replaces_one_created_while_it_was_aside(tmp_path, monkeypatch):
    """The adopter took the empty name aside; while it was there, C created the name (free) and reported its
    record, and the frozen writer W filled the file aside. The adopter put W's file back with a rename, over
    C's: two writers told they created one record, a reported cancel gone (adversarial pass 61). It puts it
    back only where the name is free: C's record stands, and W, reading back, drops its word."""
    path = tmp_path / "00000001.json"
    _no_links(monkeypatch)
    frozen, thawed = _freeze_threads_after_create(monkeypatch)  # W, on its thread
    w_done, real_rename, said = threading.Event(), os.rename, {}

    def rename_(src, dst, *a, **k):
        real_rename(src, dst)
        if not thawed.is_set():  # the name is free while the file is aside: C creates it; W wakes and fills
            said["C"] = jobdir.create_exclusive(path, {"writer": "C"})
            thawed.set()
            assert w_done.wait(60)

    def w():
        said["W"] = jobdir.create_exclusive(path, {"writer": "W"})
        w_done.set()

    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.0,))
    monkeypatch.setattr(os, "rename", rename_)
    thread = threading.Thread(target=w)
    thread.start()
    assert frozen.wait(60)
    _failing_creates(monkeypatch, which=_in_main_thread)  # the adopter's first create fails without landing
    try:
        said["A"] = jobdir.create_exclusive(path, {"writer": "A"})
    finally:
        thawed.set()
        thread.join(60)
    monkeypatch.undo()
    assert said == {"C": True, "W": False, "A": False} and json.loads(path.read_text()) == {"writer": "C"}
    assert os.listdir(tmp_path) == [path.name]


def test_without_links_an_adopter_whose_name_another_adopter_took_aside_decides_again(tmp_path, monkeypatch):
    """Two writers wait out the same empty name; the first takes it aside while the second is still looking:
    the second stopped with "cannot read ...: No such file or directory" (adversarial pass 62). It is not
    its name: False, and its caller decides again over what stands."""
    path = tmp_path / "00000001.json"
    path.write_bytes(b"")  # a writer's create, its fill not come

    def sleep(seconds):  # the other adopter moves the name aside during our wait (not a retry's 0 s pause)
        if seconds and path.exists():
            os.rename(path, tmp_path / "aside")

    _no_links(monkeypatch)
    _failing_creates(monkeypatch)
    monkeypatch.setattr(jobdir.time, "sleep", sleep)
    assert jobdir.create_exclusive(path, {"writer": "A"}) is False
    monkeypatch.undo()
    assert not path.exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_between_creating_a_record_and_filling_it_waits_for_the_fill(job, monkeypatch, sig):
    """No hard links: a SIGTERM (`docker stop`) or a Ctrl-C landing between the exclusive create of a state
    record and its fill left it empty, the job broken until `runner repair` (adversarial pass 28: the worker's
    "completed"). The signal is held until the record is whole, then handled as it would have been."""
    import signal

    class Stopped(Exception):
        pass

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    def at(name):
        if name == "after_create":
            os.kill(os.getpid(), getattr(signal, sig))

    def handler(signum, frame):
        raise Stopped

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(jobdir, "fault_point", at)
    previous = signal.signal(getattr(signal, sig), handler)
    try:
        with pytest.raises(Stopped):
            runner.cancel(job.dir)
    finally:
        signal.signal(getattr(signal, sig), previous)
    assert signal.getsignal(getattr(signal, sig)) is previous
    assert job.state().state is JobState.CANCELLED  # the record is whole


def test_the_link_probe_tries_again_where_it_could_not_tell(tmp_path, monkeypatch):
    """links_supported keeps the answer a probe gave (a link made, or refused as unsupported), not one that
    could not tell (nothing could be created there: a Drive hiccup, a full disk): a glitch once made every
    empty record of that job damage for the rest of the process (adversarial pass 28)."""
    folder = tmp_path / "state"
    assert jobdir.links_supported(folder) is None  # (not there yet: cannot tell)
    folder.mkdir()

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)
    assert jobdir.links_supported(folder) is False
    monkeypatch.undo()
    assert not jobdir.links_supported(folder) and list(folder.iterdir()) == []  # kept; no probe file left


@pytest.mark.parametrize("code", ["EPERM", "EOPNOTSUPP", "ENOSYS"])
def test_a_file_system_without_hard_links_creates_its_records_exclusively_all_the_same(
    job, monkeypatch, code
):
    """A FUSE mount whose daemon has no link operation answers ENOSYS on Linux before 6.4 (EPERM after): every
    claim, marker and state record failed with "cannot create ...: Function not implemented". Each of these
    answers means no hard links here: the record is created with O_EXCL and filled, once."""

    def link(*a, **k):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(os, "link", link)
    assert runner.cancel(job.dir) == "queued"
    assert [p.name for p in (job.dir / "state").iterdir()] == ["00000001.json"]
    assert job.state().state is JobState.CANCELLED
    with pytest.raises(runner.RunnerError, match="already cancelled"):
        runner.cancel(job.dir)
    runner.retry(job.dir)  # the next record, created the same way
    assert sorted(p.name for p in (job.dir / "state").iterdir()) == ["00000001.json", "00000002.json"]
    assert job.state().state is JobState.QUEUED and job.state().generation == 1


def test_an_exclusive_create_whose_temp_file_was_tidied_away_writes_it_again(job, monkeypatch):
    """`runner cancel` frozen between writing its record under a temp name and linking it into place, while a
    repair tidied the temp file away as left behind: it woke to "cannot create .../state/00000001.json: No
    such file or directory" and the cancel was lost (adversarial pass 20). It writes the temp file again."""
    tidied = []

    def tidy_once(name):
        if name == "before_create" and not tidied:
            tidied.extend(p for p in (job.dir / "state").iterdir() if p.name.endswith(".tmp"))
            for p in tidied:
                p.unlink()

    monkeypatch.setattr(jobdir, "fault_point", tidy_once)
    assert runner.cancel(job.dir) == "queued" and len(tidied) == 1
    assert [p.name for p in (job.dir / "state").iterdir()] == ["00000001.json"]  # no temp file left either
    assert job.state().state is JobState.CANCELLED


def test_a_job_of_an_older_version_is_read_and_carries_on(job, gpt2_engine):
    """A job an older runner version left (state.json by the commands, completed.json or failed.json by the
    workers, no state/ folder) reads as it did; its first transition starts the records, which count from then."""
    shutil.rmtree(job.dir / "state")
    (job.dir / "state.json").write_text('{"state": "queued", "generation": 2, "error": null, "updated": 5.5}')
    (job.dir / "failed.json").write_text(
        '{"generation": 2, "state_updated": 5.5, "error": "the model changed"}'
    )
    assert (job.state().state, job.state().generation, job.state().error) == (
        "failed",
        2,
        "the model changed",
    )
    (job.dir / "failed.json").write_text('{"generation": 1, "state_updated": 5.5, "error": "old"}')
    assert job.state().state is JobState.QUEUED  # an outcome of an older generation no longer counts
    (job.dir / "state.json").write_text('{"state": "cancelled", "generation": 2, "updated": 6.5}')
    assert runner.retry(job.dir) == 0 and (job.state().state, job.state().generation) == ("queued", 3)
    assert [p.name for p in (job.dir / "state").iterdir()] == ["00000001.json"]
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    assert (job.state().state, job.state().generation) == ("completed", 3)


def test_a_file_where_the_state_folder_belongs_breaks_the_job_until_repaired(job, gpt2_engine, runner_home):
    """state/ replaced by a file (a sync client's doing) must not read as "no records yet" (queued): a cancelled
    job would run again. The job is broken, named; repair sets the file aside and records the state anew."""
    assert run_job(job, gpt2_engine, echo=None).finished
    shutil.rmtree(job.dir / "state")
    (job.dir / "state").write_text("not a folder")
    status = runner.status(job.dir)
    assert status.state == "broken" and "state/ is not a folder" in status.message
    report = runner.repair(job.dir)
    assert (report.state_now, report.done) == ("completed", report.total) and (job.dir / "state").is_dir()
    assert any(p.name.endswith("-state") for p in (job.dir / "quarantine").iterdir())


@pytest.mark.parametrize(
    ("fmt", "said"),
    [
        (2, None),
        (4, None),
        (5, None),
        (jobdir.MIN_P_FORMAT, None),
        (jobdir.READABLE_FORMATS[-1] + 1, "newer than this runner reads"),
        (1, "submit the file"),
    ],  # fmt: skip
)
def test_the_layout_version_of_a_job_is_read_or_refused_with_what_to_do(job, fmt, said):
    """A job of the previous layout (2: state.json) is read; one of a newer runner (another VM with a newer
    install) is refused, saying to install it here too, rather than misread (an older runner ignores state
    records: a cancelled job would run again)."""
    meta = json.loads((job.dir / "job.json").read_text())
    assert meta["format"] == jobdir.FINGERPRINT_FORMAT and jobdir.FORMAT == 3
    meta["format"] = fmt
    meta["spec_sha256"] = jobdir.spec_checksum(meta)
    (job.dir / "job.json").write_text(json.dumps(meta))
    if said is None:
        assert Job.open(job.dir).state().state is JobState.QUEUED
        return
    with pytest.raises(jobdir.BrokenJob, match=said) as e:
        Job.open(job.dir)
    assert not e.value.repairable and runner.status(job.dir).state == "broken"


def test_retry_clears_row_errors_by_generation(job, gpt2_engine, monkeypatch):
    import runner.worker as worker_module

    monkeypatch.setattr(worker_module, "isolating", lambda engine, compute, keys, iso: [
        worker_module.RowError("out_of_memory", "too big") if r == 4 else compute([(r, s)])[0] for r, s in keys
    ])  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    assert [(e["row"], e["error"]) for e in runner.read_errors(job.dir)] == [(4, "out_of_memory")] * 2
    monkeypatch.undo()
    assert runner.retry(job.dir) == 1 and runner.read_errors(job.dir) == []  # one row, its two samples
    summary = run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert summary.finished and summary.generated == 2 and summary.errors == 0


def test_opening_a_job_lists_its_folder_once_instead_of_a_stat_per_name(job, monkeypatch):
    """`runner status` opens every job of the home, on a network mount (Drive) where each stat is a round trip."""
    calls = []
    for name in ("lstat", "stat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real, **k: calls.append(a[0]) or real(*a, **k))
    jobdir.Job.open(job.dir)
    assert len(calls) <= 2, calls  # the folder itself (a link is refused) and job.json as it is read


@pytest.mark.parametrize("folder", ["done", "shards", "claims", "state"])
def test_a_file_where_a_job_folder_belongs_breaks_the_job_until_repaired(
    job, reference, gpt2_engine, runner_home, folder
):
    """One of the job's folders replaced by a file (a sync client's doing) on a completed job: every command says the
    job is broken and names `runner repair` (not "nothing to do", not a bare "Not a directory"); repair sets the file
    aside and `runner work` computes what is missing, exactly once."""
    assert run_job(job, gpt2_engine, echo=None).finished
    shutil.rmtree(job.dir / folder)
    (job.dir / folder).write_text("not a folder")
    status = runner.status(job.dir)
    assert status.state == "broken" and f"{folder}/ is not a folder" in status.message
    said = []
    assert runner.work(runner_home, echo=said.append, engine=gpt2_engine) == []
    assert any("is broken" in line and f"runner repair {job.dir}" in line for line in said), said
    with pytest.raises(jobdir.BrokenJob, match=f"is broken \\({folder}/ is not a folder\\); `runner repair"):
        runner.load_results(job.dir)
    assert runner.repair(job.dir).state_now in ("queued", "completed") and not (job.dir / folder).is_file()
    assert any(p.name.endswith(f"-{folder}") for p in (job.dir / "quarantine").iterdir())
    runner.work(runner_home, echo=None, engine=gpt2_engine)
    assert_exactly_once(job.dir, reference[1])


@pytest.mark.parametrize("folder", ["inflight", "workers"])
def test_a_file_where_a_workers_folder_belongs_breaks_an_unfinished_job_until_repaired(
    job, reference, gpt2_engine, runner_home, folder
):
    """inflight/ or workers/ replaced by a file on an interrupted job: `runner status` says broken, naming it and
    `runner repair` (it said "queued (interrupted)" while no worker could run the job); the rows done still read;
    a completed job does not need inflight/."""
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1), shard_rows=1)
    shutil.rmtree(job.dir / folder, ignore_errors=True)
    (job.dir / folder).write_text("not a folder")
    status = runner.status(job.dir)
    assert status.state == "broken" and f"{folder}/ is not a folder" in status.message
    assert f"runner repair {job.dir}" in status.message
    said = []
    assert runner.work(runner_home, echo=said.append, engine=gpt2_engine) == []
    assert any("is broken" in line and f"runner repair {job.dir}" in line for line in said), said
    with pytest.warns(UserWarning, match=f"{folder}/ is not a folder.*these are"):
        assert 0 < len(runner.load_results(job.dir)) < len(reference[1])
    assert runner.repair(job.dir).state_now == "queued" and not (job.dir / folder).is_file()
    runner.work(runner_home, echo=None, engine=gpt2_engine)
    assert_exactly_once(job.dir, reference[1])
    (job.dir / folder).rename(job.dir / "set-aside")
    (job.dir / folder).write_text("not a folder")
    # (workers/ as a file on a completed job still reads as damaged: its live workers cannot be listed)
    assert runner.status(job.dir).state == ("completed" if folder == "inflight" else "broken")


@pytest.mark.parametrize(
    ("file", "content", "reason"),
    [
        ("job.json", '{"id": "x", "kin', "job.json is damaged"),
        ("job.json", "{}", "job.json does not match its checksum"),
        ("job.json", "SEED", "job.json does not match its checksum"),
        (
            "state/00000001.json",
            "GENERATION",
            "state/00000001.json is damaged (it does not match its checksum",
        ),
        ("state/00000001.json", "FIELD", "state/00000001.json is damaged (it has fields no state record has"),
        ("state/00000001.json", "{}", "state/00000001.json is invalid"),
        ("state/00000001.json", '{"state": "canc', "state/00000001.json is damaged"),
        ("state/00000001.json", '{"state": "running"}', "never stored"),
        ("state/00000001.json", "", "state/00000001.json is damaged (it is empty"),  # never the record before
        ("state.json", "{}", "state.json is invalid"),  # a job of an older version, before its first record
        ("state.json", '{"state": "canc', "state.json is damaged"),
    ],
)
def test_damaged_metadata_breaks_only_its_job(
    job, reference, tiny_gpt2, gpt2_engine, runner_home, file, content, reason
):
    other = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)
    if file.startswith("state/"):
        job.set_state(JobState.QUEUED)  # the job's first state record
    elif file == "state.json":
        shutil.rmtree(job.dir / "state")  # a job of an older version: its state.json is read
    if content == "SEED":  # one digit changed, still valid JSON: noticed, not obeyed (results would change)
        meta = json.loads((job.dir / file).read_text())
        meta["seed"] += 1
        content = json.dumps(meta)
    # a retry's generation changed; a key's name changed (no checksum then)
    elif content in ("GENERATION", "FIELD"):
        record = json.loads((job.dir / file).read_text())
        record["generation"] += 1
        if content == "FIELD":
            record["chock"] = record.pop("check")
        content = json.dumps(record)
    (job.dir / file).write_text(content)
    (job.dir / "stats.json").write_text("{}")  # informative only: never breaks anything
    statuses = {s.id: s for s in runner.status(home=runner_home)}
    assert statuses[job.dir.name].state == "broken" and reason in statuses[job.dir.name].message
    assert statuses[other.id].state == "queued"
    summaries = runner.work(runner_home, echo=None, engine=gpt2_engine)
    assert [s.job_id for s in summaries] == [other.id] and summaries[0].finished
    report = runner.repair(job.dir)
    assert report.state_now == "queued" and report.restored_spec == (file == "job.json")
    assert runner.work(runner_home, echo=None, engine=gpt2_engine)[0].finished
    assert_exactly_once(job.dir, reference[1])


@pytest.mark.parametrize(
    ("record", "said"),
    [({}, "it has no 'state' field"), (None, "not a state record: null"), ("done", "not a state record: a string"),
     ({"state": 5}, "state 5 is no job state"), ({"state": "queued", "generation": "1"}, "generation '1' is not a count")],
)  # fmt: skip
def test_a_state_record_torn_into_other_json_is_said_in_words(record, said):
    """A state record torn into valid JSON of another shape said "(KeyError: 'state')" or "(TypeError:
    'NoneType' object is not subscriptable)", which reads like runner's own failure (campaign pass 110)."""
    with pytest.raises(jobdir.BrokenJob) as e:
        jobdir._parse_state(record, "state/00000003.json", 3)
    assert str(e.value) == f"state/00000003.json is invalid ({said})"


def test_bad_heartbeats_claims_and_stats_are_ignored(job, reference, gpt2_engine, runner_home):
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(2), shard_rows=1)
    (job.dir / "workers" / "ghost.json").write_text('{"worker": "ghost", "expires": "soon"}')
    (job.dir / "claims" / "00002-00000000.json").write_text("{torn")
    (job.dir / "stats.json").write_text("[]")
    assert runner.status(job.dir).state == "queued (interrupted)"
    assert runner.work(runner_home, echo=None, engine=gpt2_engine)[0].finished
    assert_exactly_once(job.dir, reference[1])


def test_a_damaged_prompts_file_breaks_its_job_the_others_run_and_repair_brings_it_back(
    job, reference, tiny_gpt2, gpt2_engine, runner_home
):
    """The job with a damaged prompts.parquet is left broken, not failed: it was stored as failed, and `runner
    work` said to submit the file again, which loses the rows done, where `runner repair` writes the file again
    from the unchanged input and the job goes on (pass 120)."""
    other = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)
    data = bytearray((job.dir / "prompts.parquet").read_bytes())
    data[100] ^= 0xFF
    (job.dir / "prompts.parquet").write_bytes(bytes(data))
    summaries = runner.work(runner_home, echo=None, engine=gpt2_engine)
    assert [s.job_id for s in summaries] == [other.id]
    s = runner.status(job.dir)
    assert s.state == "broken" and "prompts.parquet" in s.message and "damaged" in s.message, s
    assert jobdir.read_state(job.dir).state == "queued"
    # job.prompts() (the public way to look at a job's prompts) refuses it too, rather than show changed prompts
    with pytest.raises(RunnerError, match="prompts.parquet of job .* is damaged"):
        job.prompts()
    assert other.prompts().num_rows * other.samples == other.total
    runner.repair(job.dir)
    assert runner.work(runner_home, echo=None, engine=gpt2_engine)[0].finished
    assert_exactly_once(job.dir, reference[1])


def _two_jobs_of_other_prompts(tmp_path, tiny_gpt2) -> tuple[Job, Job]:
    """Two jobs of the same settings, ids and row count whose prompts differ: one's prompts.parquet is valid
    for the other, and wrong."""
    mine = write_jsonl(
        tmp_path / "a.jsonl", [{"id": f"r{i}", "prompt": f"Prompt number {i} says"} for i in range(6)]
    )
    theirs = write_jsonl(
        tmp_path / "b.jsonl", [{"id": f"r{i}", "prompt": f"Another {i} said"} for i in range(6)]
    )
    job = create_job(mine, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a", unit_rows=2)
    return job, create_job(theirs, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "b", unit_rows=2)


def test_prompts_changed_while_a_worker_runs_stop_it_before_the_next_unit(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """prompts.parquet swapped for another (valid) one while a worker is between units, its mtime put back:
    the next unit's rows are not computed from it; the job fails saying so, keeping what was done (found by an
    adversarial pass: the job completed with the later units computed from the changed prompts)."""
    job, swapped = _two_jobs_of_other_prompts(tmp_path, tiny_gpt2)
    real = jobdir.write_marker

    def write_marker(*args, **kw):  # the first unit's commit lands, then the file is changed under the worker
        real(*args, **kw)
        path = job.dir / "prompts.parquet"
        st = path.stat()
        path.write_bytes((swapped.dir / "prompts.parquet").read_bytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    with pytest.raises(RunnerError, match=f"prompts.parquet of job {job.id} is damaged"):
        run_job(job, gpt2_engine, echo=None, shard_rows=1)
    assert sorted(set(runner.load_results(job.dir)["id"])) == ["r0", "r1"]


def test_prompts_changed_under_their_verified_stamp_are_found_when_a_worker_starts(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """prompts.parquet's bytes changed while its size and times did not (bit rot; a mount that keeps stale
    times), after verified.json stamped it: the next worker trusted the stamp and completed the job with rows
    computed from the changed prompts, silently (adversarial pass 59). A worker hashes it when it starts."""
    job, swapped = _two_jobs_of_other_prompts(tmp_path, tiny_gpt2)
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1))  # stamps prompts.parquet in verified.json
    path = job.dir / "prompts.parquet"
    assert json.loads((job.dir / "verified.json").read_text())["prompts.parquet"][0] == path.stat().st_size
    path.write_bytes((swapped.dir / "prompts.parquet").read_bytes())
    cache = json.loads((job.dir / "verified.json").read_text())
    st = path.stat()
    cache["prompts.parquet"][:3] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # as if nothing had changed
    (job.dir / "verified.json").write_text(json.dumps(cache))
    assert runner.status(job.dir).state.startswith(
        "queued"
    )  # (status trusts the stamp: it does not hash each poll)
    with pytest.raises(RunnerError, match=f"prompts.parquet of job {job.id} is damaged"):
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    # ...and what the worker found is told to status: the stamp is dropped, so it says broken, not queued for
    # ever beside a worker that skips the job each time (pass 122)
    assert "prompts.parquet" not in json.loads((job.dir / "verified.json").read_text())
    s = runner.status(job.dir)
    assert s.state == "broken" and f"prompts.parquet of job {job.id} is damaged" in s.message, s


def test_a_completed_job_that_lost_a_shard_is_brought_back(job, reference, gpt2_engine, runner_home):
    assert run_job(job, gpt2_engine, echo=None, shard_rows=4).finished
    victim = read_ledger(job).commits[1]
    (job.dir / "shards" / victim.shard).unlink()
    s = runner.status(job.dir)
    assert s.state == "broken" and s.done == 2 * N - victim.marker["rows"]
    assert runner.work(runner_home, echo=None, engine=gpt2_engine) == []  # nothing to do until repaired
    runner.repair(job.dir)
    assert runner.work(runner_home, echo=None, engine=gpt2_engine)[0].generated == victim.marker["rows"]
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, reference[1])


# --- liveness, names, links, leftovers ---------------------------------------------------------------------


def test_pid_liveness_only_within_the_same_boot_and_pid_namespace():
    me = Owner.me("w")
    dead_pid = 2**22 + 12345  # above pid_max on this machine: no such process
    assert Owner(me.worker, me.host, dead_pid, me.boot, me.pidns, "1").provably_dead()
    # the same host name but another PID namespace (a container) or another boot: only the heartbeat decides
    assert not Owner(me.worker, me.host, dead_pid, me.boot, "pid:[1]", "1").provably_dead()
    assert not Owner(me.worker, me.host, dead_pid, "other-boot", me.pidns, "1").provably_dead()
    assert not Owner(me.worker, me.host, dead_pid, None, None, None).provably_dead()
    # a live pid that now belongs to another process (pid reuse): its start time differs
    assert Owner(me.worker, me.host, os.getpid(), me.boot, me.pidns, "0").provably_dead()
    assert not me.provably_dead()


def test_a_live_workers_heartbeat_in_another_namespace_is_respected(job):
    other = Owner("far", "same-host", 999999, "boot-x", "pid:[1]", "7")
    Heartbeat(job, other, ttl=60).beat()
    assert take_unit(job, 0, other, -1) == 0
    progress = jobdir.job_progress(job)
    assert 0 not in progress.claimable and "far" in progress.live


def test_a_dead_worker_whose_clock_ran_ahead_loses_its_lease_after_the_lease(job, monkeypatch):
    """A worker on a machine whose clock runs 5 hours ahead died (its VM gone, so no pid check can see it): its
    heartbeat's times are in our future. Its units were held for those 5 hours (adversarial pass 18); its lease
    now counts from when this process first saw that heartbeat, and a beat that changes renews it."""
    import time as time_module

    far = Owner("far", "other-vm", 4242, "boot-gone", "pid:[1]", "7")
    assert take_unit(job, 0, far, -1) == 0
    clock = [1000.0]
    monkeypatch.setattr(time_module, "monotonic", lambda: clock[0])
    ahead = time_module.time() + 5 * 3600
    monkeypatch.setattr(time_module, "time", lambda: ahead)  # (the writer's clock)
    Heartbeat(job, far, ttl=60).beat()
    monkeypatch.undo()
    monkeypatch.setattr(time_module, "monotonic", lambda: clock[0])
    progress = jobdir.job_progress(job)
    assert "far" in progress.live and 0 not in progress.claimable  # alive as far as we know
    assert progress.live["far"]["expires"] <= time_module.time() + 60  # not 5 hours from now
    clock[0] += 59
    assert "far" in jobdir.job_progress(job).live
    clock[0] += 2  # its lease, on our clock, without a new beat
    progress = jobdir.job_progress(job)
    assert "far" not in progress.live and 0 in progress.claimable
    hb = json.loads((job.dir / "workers" / "far.json").read_text())
    hb["heartbeat"] += 30  # it beats again (alive after all): a fresh lease
    hb["expires"] += 30
    hb["check"] = storage.json_checksum(hb)  # (as its writer computes it)
    (job.dir / "workers" / "far.json").write_text(json.dumps(hb))
    assert "far" in jobdir.job_progress(job).live


@pytest.mark.parametrize(("ahead", "ttl"), [(25 * 3600, 60), (5, jobdir.MAX_LEASE)])
def test_a_live_worker_whose_clock_runs_ahead_holds_its_unit_while_it_beats(job, monkeypatch, ahead, ttl):
    """A heartbeat dated more than MAX_LEASE in our future was taken for damage: a worker whose clock ran a day
    ahead, or 5 s ahead with RUNNER_LEASE_TTL=86400, lost its units to healthy workers over and over
    (adversarial pass 111). Its lease counts from when its beat was first seen here, as any beat ahead."""
    import time as time_module

    far = Owner("far", "other-vm", 4242, "boot-gone", "pid:[1]", "7")
    assert take_unit(job, 0, far, -1) == 0
    clock = [1000.0]
    writer_now = time_module.time() + ahead
    monkeypatch.setattr(time_module, "time", lambda: writer_now)  # (the writer's clock)
    Heartbeat(job, far, ttl=ttl).beat()
    monkeypatch.undo()
    monkeypatch.setattr(time_module, "monotonic", lambda: clock[0])
    progress = jobdir.job_progress(job)
    assert "far" in progress.live and 0 not in progress.claimable
    if ahead > jobdir.SKEW_SLACK:  # (a beat a few seconds ahead is believed: its lease is on the wall clock)
        clock[0] += ttl + 1  # its lease, on our clock, without a new beat: dead after all
        progress = jobdir.job_progress(job)
        assert "far" not in progress.live and 0 in progress.claimable


def test_a_heartbeat_with_a_changed_byte_is_damage_not_a_lease(job):
    """A digit flipped in a dead worker's "expires" (a worker on another VM, so no pid check can see it) held
    its units for up to a day (adversarial pass 19, by reading). A heartbeat carries its checksum: a changed
    byte makes it stale, and the unit is free."""
    far = Owner("far", "other-vm", 4242, "boot-gone", "pid:[1]", "7")
    assert take_unit(job, 0, far, -1) == 0
    Heartbeat(job, far, ttl=60).beat()
    assert "far" in jobdir.job_progress(job).live
    path = job.dir / "workers" / "far.json"
    hb = json.loads(path.read_text())
    hb["expires"] += 20 * 3600  # one digit of its time flipped
    path.write_text(json.dumps(hb))
    progress = jobdir.job_progress(job)
    assert "far" not in progress.live and 0 in progress.claimable


@pytest.mark.parametrize("name", ["a" * 101, "-lead", "has space", "x/y", ".hidden", ""])
def test_names_are_plain_and_short(reference, tiny_gpt2, name):
    with pytest.raises(RunnerError, match="invalid job name"):
        create_job(reference[0], tiny_gpt2, PARAMS, name=name)


def test_a_name_is_idempotent_and_never_another_jobs_id(job, reference, tiny_gpt2, runner_home):
    named = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="night1", unit_rows=3)
    again = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="night1", unit_rows=3)
    assert (
        again.id == named.id and len(jobdir.job_folders(runner_home)) == 2
    )  # running the cell twice is safe
    with pytest.raises(RunnerError, match="is taken by job"):
        create_job(
            reference[0], tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home, name="night1"
        )
    with pytest.raises(RunnerError, match="is taken by job"):
        create_job(reference[0], tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home, name=job.id)


def test_links_are_never_followed_out_of_the_home(job, gpt2_engine, runner_home, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / ".00001-w.parquet.0123abcd.tmp"  # looks like a stale temp file
    precious.write_text("not yours")
    os.utime(precious, (0, 0))
    shutil.rmtree(job.dir / "shards")
    (job.dir / "shards").symlink_to(outside)
    (runner_home / "elsewhere").symlink_to(outside)
    statuses = {s.id: s for s in runner.status(home=runner_home)}
    assert statuses[job.dir.name].state == "broken" and "symbolic link" in statuses[job.dir.name].message
    assert statuses["elsewhere"].state == "broken"
    assert runner.work(runner_home, echo=None, engine=gpt2_engine) == []
    report = runner.repair(job.dir)  # the link set aside in quarantine/, what it points to left alone
    assert report.state_now == "queued" and not (job.dir / "shards").is_symlink()
    assert [p.name for p in outside.iterdir()] == [precious.name] and precious.read_text() == "not yours"
    assert runner.work(runner_home, echo=None, engine=gpt2_engine)[0].finished
    assert precious.read_text() == "not yours"


def test_a_job_named_by_a_link_the_user_made_is_the_folder_it_points_to(
    job, reference, gpt2_engine, tmp_path
):
    """`ln -s .../out/demo demo; runner status demo`: the link is the user's name for the job, not damage (it
    said "broken ... `runner repair demo`", and repair refused the link: adversarial pass 18)."""
    assert run_job(job, gpt2_engine, echo=None).finished
    link = tmp_path / "demo"
    link.symlink_to(job.dir)
    assert runner.status(link).state == "completed"
    assert runner.repair(link).state_now == "completed"
    assert len(runner.load_results(link)) == len(reference[1])
    again, _ = runner.run(
        reference[0], job.spec.model, PARAMS, OPTIONS, output=link, engine=gpt2_engine, echo=None
    )
    assert again.dir == job.dir.resolve()
    assert_exactly_once(job.dir, reference[1])


def test_a_killed_submits_temp_folder_is_cleaned_up(reference, tiny_gpt2, runner_home):
    runner_home.mkdir(parents=True, exist_ok=True)
    tag = storage.namespace_tag()
    dead_pid = 2**22 + 777  # above pid_max: no such process
    left = (
        runner_home / f".20260101-000000-abcdef.{dead_pid}-{tag}.0123abcd.tmp"
    )  # killed before writing anything
    left.mkdir()
    reused = (
        runner_home / f".20260101-000002-abcdef.{os.getpid()}-{tag}.0123abce.tmp"
    )  # its pid now someone else's
    reused.mkdir()
    me = Owner.me("submit")
    (reused / ".owner.json").write_text(
        json.dumps(Owner(me.worker, me.host, me.pid, me.boot, me.pidns, "1").as_dict())
    )
    alive = (
        runner_home / f".20260101-000001-abcdef.{os.getpid()}-{tag}.89abcdef.tmp"
    )  # a submit still running
    alive.mkdir()
    (alive / ".owner.json").write_text(json.dumps(me.as_dict()))
    elsewhere = runner_home / f".20260101-000003-abcdef.{dead_pid}-00000000.0123abcf.tmp"  # another namespace
    elsewhere.mkdir()
    create_job(reference[0], tiny_gpt2, PARAMS, home=runner_home)
    assert not left.exists() and not reused.exists() and alive.exists() and elsewhere.exists()
    assert [s.state for s in runner.status(home=runner_home)] == ["queued"]


def test_housekeeping_retries_a_transient_error_on_what_it_looks_at(job, monkeypatch):
    """One EIO on the lstat of a temp file a killed worker left, or of a killed submit's temp folder, is retried
    like every other read of the home; before, it stopped `runner work` (found by a chaos campaign)."""
    old = 1_000_000_000  # a day and more ago
    left = Path(storage.temp_name(job.dir / "shards" / "00000-x.parquet"))
    left.write_bytes(b"half a shard")
    submit = job.dir.parent / jobdir.submit_temp_name("20260101-000000-abcdef")
    submit.mkdir()
    for path in (left, submit):
        os.utime(path, (old, old))
    real_lstat, failed = os.lstat, set()

    def lstat(path, *args, **kwargs):
        if str(path) in (str(left), str(submit)) and str(path) not in failed:
            failed.add(str(path))
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(os, "lstat", lstat)
    assert jobdir.remove_stale_temps(job) == 1 and jobdir.remove_dead_submits(job.dir.parent) == 1
    assert failed == {str(left), str(submit)} and not left.exists() and not submit.exists()


def test_a_temp_file_of_a_worker_holding_a_long_lease_is_not_deleted(job):
    """RUNNER_LEASE_TTL=3600: a worker frozen for half an hour halfway through copying a shard still holds its unit;
    its temp file is not another's to delete (repair deleted it at 600 s: the worker then stopped with "the job
    home cannot be written"; adversarial pass 18). Once no live worker holds a lease that long, it goes."""
    frozen = Owner("frozen", "other-vm", 4242, "boot-x", "pid:[1]", "7")
    Heartbeat(job, frozen, ttl=3600).beat()
    hb = json.loads((job.dir / "workers" / "frozen.json").read_text())
    hb["heartbeat"] += 3000  # and its clock runs 50 minutes ahead of ours: still its lease of an hour
    hb["expires"] += 3000
    hb["check"] = storage.json_checksum(hb)
    (job.dir / "workers" / "frozen.json").write_text(json.dumps(hb))
    half = Path(storage.temp_name(job.dir / "shards" / "00000-00000000-0001.parquet"))
    half.parent.mkdir(exist_ok=True)
    half.write_bytes(b"half a shard")
    half_an_hour_ago = time.time() - 1800
    os.utime(half, (half_an_hour_ago, half_an_hour_ago))
    assert jobdir.remove_stale_temps(job) == 0 and half.exists()
    (job.dir / "workers" / "frozen.json").unlink()  # its worker gone: the lease with it
    assert jobdir.remove_stale_temps(job) == 1 and not half.exists()


def test_one_transient_error_listing_the_home_or_an_o_folder_is_retried(job, tmp_path, monkeypatch):
    """One EIO on the listing of the home (`runner status` looks for links there), on the lstat of an -o
    folder's job.json (`runner run FILE -o DIR` again, to carry on), on the stat of the folder given to
    load_results, or on the stat of done/ a worker makes sure of before a commit is retried; before, the command failed with 'cannot list HOME' / 'cannot read or write
    DIR/job.json: Input/output error', or load_results raised the OSError (adversarial pass 11)."""
    from runner import jobs

    real_scandir, real_lstat, failed = os.scandir, os.lstat, []

    def scandir(path="."):
        if str(path) == str(job.dir.parent) and "scandir" not in failed:
            failed.append("scandir")
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_scandir(path)

    def lstat(path, *args, **kwargs):
        if str(path) == str(job.dir / "job.json") and "lstat" not in failed:
            failed.append("lstat")
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_lstat(path, *args, **kwargs)

    real_stat = os.stat

    def stat(path, *args, **kwargs):
        for name, there in (("stat", job.dir), ("mkdir", job.dir / "done")):
            if str(path) == str(there) and name not in failed:
                failed.append(name)
                raise OSError(errno.EIO, "Input/output error", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "stat", stat)
    assert jobdir.linked_entries(job.dir.parent) == [] and jobs._existing_job(job.dir).id == job.id
    with pytest.warns(UserWarning, match="not computed yet"):
        assert len(runner.load_results(job.dir)) == 0  # its first look: a results file, or a job folder?
    storage.ensure_dir(
        job.dir / "done"
    )  # a worker's mkdir(exist_ok=True) of done/ before a commit: it stats it
    assert failed == ["scandir", "lstat", "stat", "mkdir"]


def test_repair_leaves_the_temp_files_a_frozen_worker_may_still_be_writing(job, gpt2_engine):
    """A worker frozen past its lease (no live heartbeat) may wake and rename its temp file: repair deletes
    only old ones; before, it deleted all, and the woken worker stopped saying the job home could not be
    written (found by a chaos campaign)."""
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1), shard_rows=1)
    young = Path(storage.temp_name(job.dir / "shards" / "00002-00000000-0000.parquet"))
    old = Path(storage.temp_name(job.dir / "shards" / "00001-00000000-0005.parquet"))
    for path in (young, old):
        path.write_bytes(b"part of a shard")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    runner.repair(job.dir)
    assert young.exists() and not old.exists()


@pytest.mark.parametrize("copied", ["job.json", "job.backup.json"])
def test_a_spec_copied_in_from_another_job_is_refused_and_repair_keeps_the_one_the_results_are_for(
    job, reference, tiny_gpt2, gpt2_engine, runner_home, copied
):
    """Another job's whole, checksummed job.json copied into a job folder (same prompts file, other settings):
    a worker carried on with that job's settings and the job completed with rows of both mixed, silently
    (adversarial pass 23). Now the folder is broken until `repair`, which keeps the spec its results were
    written for, whichever of job.json and its backup was copied over."""
    other = create_job(reference[0], tiny_gpt2, GenerationParams(max_new_tokens=2, seed=5), OPTIONS,
                       home=runner_home, unit_rows=3)  # fmt: skip
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1))  # some of its rows are done
    assert 0 < runner.status(job.dir).done < 2 * N
    commits = sorted(os.listdir(job.dir / jobdir.MARKERS))
    shutil.copy(other.dir / copied, job.dir / copied)
    with pytest.raises(jobdir.BrokenJob, match="job.json is job .*'s, but job.backup.json is job .*'s"):
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    # nothing ran (its status, broken, counts nothing: pass 269)
    assert sorted(os.listdir(job.dir / jobdir.MARKERS)) == commits and runner.status(job.dir).done is None
    jobdir.repair(job.dir)
    assert (
        Job.open(job.dir).id == job.id
        and jobdir._read_json_or_none(job.dir / "job.backup.json")["id"] == job.id
    )
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


@pytest.mark.parametrize("damage", ["flip", "torn", "missing", "folder"])
def test_a_damaged_backup_is_written_again_so_a_later_torn_job_json_is_repairable(
    job, reference, gpt2_engine, damage
):
    """A completed job's job.backup.json damaged (a flipped bit in its model, still valid JSON): status said
    nothing, `runner repair` said all was well and left it so, and when job.json tore later the job was lost
    for good, every shard intact (adversarial pass 57). Repair writes a damaged backup again from job.json, and
    so does a worker before it runs the job (said in the log)."""
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1))
    backup = job.dir / "job.backup.json"
    if damage == "flip":
        backup.write_text(backup.read_text().replace('"model": "', '"model": "X', 1))
    elif damage == "torn":
        backup.write_text(backup.read_text()[:50])
    else:
        backup.unlink()
        if damage == "folder":
            backup.mkdir()
    report = jobdir.repair(job.dir)
    assert report.mended_backup and not report.restored_spec
    assert jobdir._read_json_or_none(backup) == job.meta
    (job.dir / "job.json").write_text((job.dir / "job.json").read_text()[:60])  # torn later
    assert jobdir.repair(job.dir).restored_spec
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


def test_a_worker_writes_a_damaged_backup_again_before_it_runs_the_job(job, reference, gpt2_engine):
    backup = job.dir / "job.backup.json"
    backup.write_text(backup.read_text().replace('"seed": ', '"seed": 1', 1))
    assert run_job(job, gpt2_engine, echo=None).finished
    assert jobdir._read_json_or_none(backup) == job.meta
    assert "job.backup.json was damaged: written again from job.json" in (job.dir / "log.txt").read_text()
    assert not jobdir.repair(job.dir).mended_backup  # (sound now: nothing to mend)
    assert_exactly_once(job.dir, reference[1])


def test_repair_tells_two_jobs_specs_apart_before_any_result_or_refuses(
    reference, tiny_gpt2, runner_home, tmp_path
):
    """No results yet (no shard says whose they are): a job home's folder is named by its job's id; an `-o`
    folder of two jobs of the same prompts file cannot tell, and repair says so rather than pick one."""
    params = GenerationParams(max_new_tokens=2, seed=5)
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=3)
    other = create_job(reference[0], tiny_gpt2, params, OPTIONS, home=runner_home, unit_rows=3)
    shutil.copy(other.dir / "job.backup.json", job.dir / "job.backup.json")
    jobdir.repair(job.dir)
    assert jobdir._read_json_or_none(job.dir / "job.backup.json")["id"] == job.id == Job.open(job.dir).id
    # the same prompts file, the same rows (n = 2), another seed: their prompts.parquet are alike byte for byte
    same_rows = GenerationParams(max_new_tokens=3, temperature=1.0, num_return_sequences=2, seed=7)
    mine = create_job(reference[0], tiny_gpt2, same_rows, OPTIONS, job_dir=tmp_path / "out", unit_rows=3)
    assert mine.meta["prompts_sha256"] == job.meta["prompts_sha256"]
    shutil.copy(job.dir / "job.json", mine.dir / "job.json")
    with pytest.raises(jobdir.BrokenJob, match="nothing in the folder tells which is its own") as e:
        jobdir.repair(mine.dir)
    assert not e.value.repairable
    assert jobdir._read_json_or_none(mine.dir / "job.backup.json")["id"] == mine.id  # nothing was overwritten


def test_repair_tells_two_jobs_specs_apart_by_their_prompts_through_transient_read_errors(
    reference, tiny_gpt2, runner_home, tmp_path, monkeypatch
):
    """An `-o` folder with no results, job.json another job's (of other prompts): its prompts.parquet's checksum
    says which spec is the folder's own, read through a mount that fails every first read or stat in the folder
    once (before: that checksum was read without retries, and repair ended on a raw EIO)."""
    mine = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "out", unit_rows=3)
    prompts = write_jsonl(tmp_path / "other.jsonl", [{"id": "o1", "prompt": "Something else entirely"}])
    other = create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    shutil.copy(other.dir / "job.json", mine.dir / "job.json")
    FsFaults(mine.dir, eio=1.0, eio_dirs=(".",), retry_delays=[0.0] * 6).install(monkeypatch)
    assert jobdir.repair(mine.dir).restored_spec
    monkeypatch.undo()
    assert jobdir._read_json_or_none(mine.dir / "job.json")["id"] == mine.id == Job.open(mine.dir).id


@pytest.mark.parametrize("copied", [("job.json", "job.backup.json"), ("job.backup.json",)])
def test_a_folder_whose_results_are_another_jobs_is_refused_not_run_or_repaired_into_it(
    job, reference, tiny_gpt2, gpt2_engine, runner_home, copied
):
    """Both spec files copied in from another job (or its backup copied over a damaged job.json): nothing but the
    results says whose folder it is, and they do (adversarial pass 25: the rows ran with the other's settings)."""
    other = create_job(reference[0], tiny_gpt2, GenerationParams(max_new_tokens=2, seed=5), OPTIONS,
                       home=runner_home, unit_rows=3)  # fmt: skip
    run_job(job, gpt2_engine, echo=None, should_stop=stop_after(1))
    done = runner.status(job.dir).done
    for name in copied:
        shutil.copy(other.dir / name, job.dir / name)
    if copied == ("job.backup.json",):
        (job.dir / "job.json").write_text("{torn")
    else:
        with pytest.raises(jobdir.BrokenJob, match=f"its folder is named for job {job.id}"):
            run_job(Job.open(job.dir), gpt2_engine, echo=None)
    # (in a job home the folder's name says it first; in a folder of its own, its results: test_foreign_files)
    with pytest.raises(jobdir.BrokenJob, match=f"its folder is named for job {job.id}, but the spec") as e:
        jobdir.repair(job.dir)
    assert not e.value.repairable
    assert jobdir._read_json_or_none(job.dir / "job.backup.json")["id"] == other.id  # nothing was overwritten
    assert runner.status(other.dir).done == 0 < done  # (the other job is untouched)


@pytest.mark.parametrize("state", ["interrupted", "completed"])
def test_a_shard_whose_footer_names_another_job_is_a_damaged_shard_not_another_jobs_folder(
    job, reference, gpt2_engine, state
):
    """One flipped bit in a shard's footer changed the job id it reads: the worker and `runner repair` took the
    folder for another job's (not repairable) and the job stayed broken at 4/8 for good (pass 36). Only a shard
    that matches its marker says whose folder it is; this one is quarantined and its rows computed again."""
    import pyarrow.parquet as pq

    run_job(job, gpt2_engine, echo=None, should_stop=None if state == "completed" else stop_after(1))
    shard = sorted((job.dir / "shards").iterdir())[0]
    table = pq.read_table(shard)
    meta = {**table.schema.metadata, b"runner.job": job.id[:-1].encode() + b"x"}
    pq.write_table(table.replace_schema_metadata(meta), shard)  # a valid file, unlike its marker's checksum
    jobdir.repair(job.dir)
    run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, reference[1])


def test_the_heartbeat_is_renewed_sooner_at_first(job):
    """`runner status` showed the first decode step's speed (5x too low) and no ETA for the first 30 s of a
    run: the heartbeat file is written at the first figures, then only every ttl/4 (adversarial pass 27). Its
    first renewals now come after 5, 10 and 20 s, then every ttl/4."""
    waits = []

    class Clock:
        def wait(self, timeout):
            waits.append(timeout)
            return len(waits) > 5

        def is_set(self):
            return len(waits) > 5

    beat = Heartbeat(job, Owner.me("w"), ttl=120)
    beat._stop = Clock()
    beat._run()
    assert waits == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]
    assert (job.dir / "workers" / "w.json").exists()


def test_repair_stops_on_a_read_error_below_a_torn_record_not_requeue_a_cancelled_job(job, monkeypatch):
    """The newest state record torn over a `cancel`, and the cancel's record unreadable for longer than the
    retries (a Drive outage) while repair looked for the newest record that still reads: it was taken for
    damage, repair fell back to "queued" and the cancelled job ran again (adversarial pass 40). A read error is
    not damage: repair stops with it, and run again once the mount is back, keeps the cancel."""
    jobdir.cancel(job)
    assert job.state().state is JobState.CANCELLED
    (job.dir / "state" / "00000002.json").write_text('{"state": "queu')  # torn
    real = storage.read_bytes

    def read_bytes(path, *args, **kwargs):
        if Path(path).name == "00000001.json":
            raise storage.StorageError(f"cannot read {path}: Input/output error", errno.EIO)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    with pytest.raises(storage.StorageError, match="Input/output error"):
        jobdir.repair(job.dir)
    monkeypatch.undo()
    assert "broken" in jobdir.repair(job.dir).state_was
    assert job.state().state is JobState.CANCELLED


def test_a_heartbeat_whose_with_block_was_left_without_its_exit_stops_and_goes(job, monkeypatch):
    """Pass 68: a notebook's stop pressed twice, the second landing as the `with` block ended, skipped the
    heartbeat's __exit__: its thread renewed the dead worker's lease for the life of the kernel (status showed a
    live worker, the same cell run again waited for its own claims for ever). The thread stops once the frame
    that entered it is no longer running, and removes the heartbeat."""
    monkeypatch.setattr(jobdir, "EARLY_BEAT_SECONDS", 0.01)
    beat = Heartbeat(job, Owner.me("w-left"), ttl=120)

    def cell():  # enters, then leaves as an exception would that skipped __exit__
        beat.__enter__()
        assert "w-left" in jobdir.live_workers(job)

    cell()
    beat._thread.join(timeout=120)
    assert not beat._thread.is_alive() and not beat.path.exists()
    with Heartbeat(job, Owner.me("w-with"), ttl=120) as inside:  # inside its block it beats on
        inside._stop.wait(0.05)
        assert inside._thread.is_alive() and "w-with" in jobdir.live_workers(job)


def test_a_late_heartbeat_write_of_a_job_left_does_not_delete_the_same_workers_next_heartbeat(
    job, monkeypatch
):
    """Pass 69's risk: leaving a job waits a while for a heartbeat write in progress (slow on a network mount),
    then goes on; the same worker entering the job again wrote its new heartbeat, and the old thread, once its
    write landed, deleted the file: the worker's claims looked released to the others. The old thread now
    writes the current heartbeat again instead."""
    import threading

    monkeypatch.setattr(jobdir, "EARLY_BEAT_SECONDS", 0.01)
    monkeypatch.setattr(jobdir, "HEARTBEAT_JOIN_SECONDS", 0.01)
    owner, real = Owner.me("w-again"), storage.write_json
    first, blocked, gate = Heartbeat(job, owner, ttl=120), threading.Event(), threading.Event()

    def write_json(path, obj, *a, **k):
        if threading.current_thread() is first._thread and not blocked.is_set():
            blocked.set()
            gate.wait(120)  # a write slow on a network mount
        return real(path, obj, *a, **k)

    monkeypatch.setattr(storage, "write_json", write_json)
    with first:
        assert blocked.wait(120)
    assert first._thread.is_alive()  # its exit gave up waiting: the write is still on its way
    monkeypatch.setattr(jobdir, "EARLY_BEAT_SECONDS", 600.0)  # the new thread stays quiet meanwhile
    with Heartbeat(job, owner, ttl=120):
        gate.set()
        first._thread.join(120)
        assert not first._thread.is_alive()
        assert "w-again" in jobdir.live_workers(job)
    assert not first.path.exists()


def test_a_late_heartbeat_thread_never_writes_again_a_heartbeat_whose_job_was_left(job, monkeypatch):
    """Pass 75's review: the newer heartbeat leaving its job just as the old thread looked it up had the old
    thread write it again after its exit removed it: an ended worker looking live for a whole lease."""
    monkeypatch.setattr(jobdir, "EARLY_BEAT_SECONDS", 600.0)
    owner = Owner.me("w-leaving")
    old = Heartbeat(job, owner, ttl=120)
    with Heartbeat(job, owner, ttl=120) as newer:
        newer._stop.set()  # it is leaving the job: its exit has begun
        old._remove_own()  # the old thread, its late write landed
        assert not old.path.exists()


def test_a_heartbeat_of_this_process_that_no_run_of_it_beats_is_not_live(job):
    """Pass 68: a second stop landing as the heartbeat was being removed left its file fresh; the same kernel's
    next run waited a whole lease for "another worker", its own dead one. A heartbeat of this very process
    whose run ended is over; one of another machine still counts."""
    with Heartbeat(job, Owner.me("w-gone"), ttl=120) as ended:
        pass
    ended.beat()  # written again as its run ended: the file stays fresh
    assert "w-gone" not in jobdir.live_workers(job)
    Heartbeat(job, Owner.me("w-fake"), ttl=120).beat()  # a worker this process never ran (a test's): live
    assert "w-fake" in jobdir.live_workers(job)
    remote = Owner("w-remote", "elsewhere", 1, "another-boot", None, None)
    Heartbeat(job, remote, ttl=120).beat()
    assert "w-remote" in jobdir.live_workers(job)


def test_without_links_a_claim_being_filled_is_not_taken_over(job, monkeypatch):
    """No hard links: a claim is created empty, then filled. A worker that read the claims in between took the
    empty one for a dead worker's, took the unit over and computed it twice, telling the live one it was
    "thought dead" (adversarial pass 102). Empty for less than CLAIM_FILL_SECONDS, a claim holds its unit; empty
    for longer, its writer was killed between the two, and the unit is free."""
    _no_links(monkeypatch)
    frozen, thawed = _freeze_threads_after_create(monkeypatch)  # worker A, on its thread
    taken = []
    thread = threading.Thread(target=lambda: taken.append(take_unit(job, 0, Owner.me("A"), -1)))
    thread.start()
    try:
        assert frozen.wait(60) and (job.dir / "claims" / "00000-00000000.json").stat().st_size == 0
        assert 0 not in jobdir.job_progress(job).claimable  # being filled: A's
        monkeypatch.setattr(jobdir, "CLAIM_FILL_SECONDS", 0.0)
        assert 0 in jobdir.job_progress(job).claimable  # empty for longer: no one is filling it
    finally:
        thawed.set()
        thread.join(60)
    assert taken == [0]


def test_a_worker_waits_for_a_claim_being_filled_then_takes_the_unit_of_its_dead_writer(job, gpt2_engine,
                                                                                         monkeypatch):  # fmt: skip
    """A claim left empty by a writer killed between its create and its fill (no links), and no live worker:
    `runner work` waits for it to age past CLAIM_FILL_SECONDS instead of ending with the unit undone, then takes
    it over; the job completes."""
    from runner.scheduler import work

    for unit in range(job.spec.rows // 3):  # every unit held by an empty claim
        storage.ensure_dir(job.dir / "claims")
        (job.dir / "claims" / f"{unit:05d}-00000000.json").write_bytes(b"")
    monkeypatch.setattr(jobdir, "CLAIM_FILL_SECONDS", 1.0)
    said = []
    with Heartbeat(
        job, Owner.me("A"), 600
    ):  # a live worker too: the wait is the claim's, not its lease of 600 s
        work(job.dir.parent, engine=gpt2_engine, echo=said.append, stop=stop_after(1000))
    assert runner.status(job.dir).state == "completed", said
    assert any("its claim is still being written" in s for s in said), said
    assert not any("within 600 s" in s or "within 599 s" in s for s in said), said


def test_a_record_that_cannot_be_written_is_named_not_its_temp_file(tmp_path, monkeypatch):
    """A full disk while a claim / seal / state record was written said "cannot write DIR/.NAME.tmp-...": a
    name the user never sees. The error names the record."""

    def full(fd, data):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobdir, "_write_file", full)
    path = tmp_path / "claims" / jobdir.claim_name(3, 0)
    path.parent.mkdir()
    with pytest.raises(storage.StorageError) as e:
        jobdir.create_exclusive(path, {"unit": 3})
    assert str(e.value) == f"cannot create {path}: No space left on device (errno 28)", str(e.value)
    assert e.value.errno == errno.ENOSPC and os.listdir(path.parent) == []  # (its temp file is gone too)


def test_a_completed_job_whose_prompts_parquet_was_damaged_says_so_and_repair_mends_it(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """Its results stand (load_results reads the shards), but an OpenAI Batch export and a `runner retry` read
    prompts.parquet: status said `completed` and nothing else, until one of them refused (pass 122)."""
    job, _ = _two_jobs_of_other_prompts(tmp_path, tiny_gpt2)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert runner.status(job.dir).message is None
    path = job.dir / "prompts.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    s = runner.status(job.dir)
    assert s.state == "completed" and s.message.startswith(
        f"its results are whole, but prompts.parquet of job {job.id} is damaged"
    ), s
    runner.repair(job.dir)  # written again from the unchanged input file
    s = runner.status(job.dir)
    assert (s.state, s.message) == ("completed", None)


def test_a_completed_job_with_a_folder_where_prompts_parquet_belongs_still_shows_and_says_so(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """The check of a completed job's prompts.parquet raised there: `runner status JOB` ended in an error, and
    the home's list showed the job broken (second reader of pass 122's change)."""
    job, _ = _two_jobs_of_other_prompts(tmp_path, tiny_gpt2)
    assert run_job(job, gpt2_engine, echo=None).finished
    path = job.dir / "prompts.parquet"
    path.unlink()
    path.mkdir()
    s = runner.status(job.dir)
    assert s.state == "completed" and s.message.startswith(
        f"its results are whole, but prompts.parquet of job {job.id} is damaged"
    ), s
    assert [x.state for x in runner.status(home=job.dir.parent) if x.id == job.id] == ["completed"]
    runner.repair(job.dir)  # as the message says: the folder set aside, the file written again
    assert (runner.status(job.dir).state, runner.status(job.dir).message) == ("completed", None)


def test_a_torn_job_json_whose_backup_does_not_read_for_now_is_unreadable_not_to_be_submitted_again(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """job.json torn, and its backup unreadable through the retries (a Drive mount failing for a minute): that
    read as "its backup is missing or damaged too; submit the file again", not repairable, where the backup was
    sound and `runner repair` restores the job once the mount is back. Found by the adversarial pass auditing
    transient errors taken for answers: the job is unreadable for now, as any folder that does not read."""
    import builtins
    import errno
    import io

    from runner import storage
    from runner.job_status import home_status

    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home)
    (job.dir / "job.json").write_text('{"torn')
    backup, real = os.fspath(job.dir / "job.backup.json"), builtins.open

    def failing(file, *args, **kwargs):
        if not isinstance(file, int) and os.fspath(file) == backup:
            raise OSError(errno.EIO, "Input/output error", backup)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing)
    monkeypatch.setattr(io, "open", failing)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 2)
    (listed,) = home_status(runner_home)
    assert listed.state == "unreadable" and "submit the file again" not in listed.message, listed
    monkeypatch.setattr(builtins, "open", real)
    monkeypatch.setattr(io, "open", real)
    assert jobdir.repair(job.dir).restored_spec and Job.open(job.dir).id == job.id


def test_a_job_json_damaged_under_a_running_worker_is_not_taken_for_another_job(
    job, reference, gpt2_engine, monkeypatch
):
    """A digit of the id in job.json flipped while a worker runs the job (still valid JSON, not matching its
    checksum): the worker took it for another job submitted in its place, ended its run and said the folder
    "now holds job ...", a job that is nowhere. It is damage, left to `runner repair`: the run goes on."""
    import runner.worker as worker_module

    original = worker_module.JobRun.commit
    meta = json.loads((job.dir / "job.json").read_text())
    flipped = job.id[:-1] + ("0" if job.id[-1] != "0" else "1")

    def commit_then_damage(self, unit):
        original(self, unit)
        (job.dir / "job.json").write_text(json.dumps({**meta, "id": flipped}, indent=2))

    monkeypatch.setattr(worker_module.JobRun, "commit", commit_then_damage)
    assert run_job(job, gpt2_engine, echo=None).finished
    (job.dir / "job.json").write_text(json.dumps(meta, indent=2))
    assert_exactly_once(job.dir, reference[1])


def test_a_state_record_of_random_bytes_is_said_to_be_no_utf8_text(job, runner_home):
    """Random bytes in a state record were said to be damaged "('utf-32-be' codec can't decode bytes in position
    0-3 ...)": json.loads guesses UTF-32 from leading zero bytes (campaign seeds, pass 197). Runner writes UTF-8."""
    job.set_state(JobState.QUEUED)
    (job.dir / "state" / "00000001.json").write_bytes(b"\x00\x00\x00\x80\x17garbage")
    message = runner.status(job.dir).message
    assert "state/00000001.json is damaged (it is not UTF-8 text: byte 0x80 at offset 3)" in message, message
    assert "codec" not in message
