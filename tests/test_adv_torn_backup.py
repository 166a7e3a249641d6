"""A job folder backed up while a worker runs it, then restored (adversarial pass 243): a Colab user copies the job
home to Google Drive as `runner work` runs (`cp -r jobs /content/drive/...`, rsync, Drive's own sync), and after
the VM dies copies the backup back, into a fresh home or over what is left, and runs `runner work` again.

The copy is taken file by file while commits land (tests/torn_copy.py: a few files at each create, rename, link
and delete the worker makes in the folder, each folder listed when the copy reaches it, in sorted, reversed or
random order), so it holds what no moment of the job held: a marker without its shard, a shard without its
marker, a state record newer than the commits it implies (completed, rows missing), a dead worker's claim,
heartbeat and in-flight record, a temp file of a write not renamed yet, a retry's commits without its record.
Each copy is restored (a) as a fresh home's job, (b) over the stopped worker's folder (its files written over
the folder's own, the folder's newer files left), then `runner status`, `runner work` (with `runner repair`
where a message says so), `load_results` and the exports: the rows equal the undamaged job's exactly, none
twice, none lost (tests/damage_sweep.py's `ordeal`), else a RunnerError naming a file.

Held everywhere in this pass (no defect found): fresh and over (`cp -r`, and `cp -a` keeping times), a copy
restored on another VM (another host name and boot, its files dated at the restore), a job resumed by three
workers in turn, stopped by a row that broke the device then `runner retry`, cancelled then retried, two
workers taking units from each other, an OpenAI Batch job, a copy cut short with its last file half-copied
(the VM died during the backup), leftovers of the copying tools (rsync's `.NAME.XXXXXX`, temp files, `NAME~`,
Drive's `NAME (1)`), a whole home copied as a named job was submitted and run (then submitted again), and the
same job restored twice into one home. The fast tests sample the matrix; `deep` sweeps it densely."""

from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
from pathlib import Path

import pytest
from damage_sweep import (
    Scenario,
    Undamaged,
    dead_owner,
    exports,
    ordeal,
    read_at_once,
    same_rows,
    work_through,
)
from helpers import prepared_job
from torn_copy import TornCopy, restore_over, watching

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.crashes import DeviceError
from runner.errors import RunnerError
from runner.jobdir import Job
from runner.jobs import create_job
from runner.scheduler import work
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=5)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"The river said {i}"} for i in range(8)]
ORDERS = ("sorted", "reversed", "random")


@pytest.fixture(scope="module")
def undamaged(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """A job of 8 rows in units of 4 not run yet (its template folder), and what every restored copy must come
    back to: the same job run uninterrupted, with its exports."""
    root = tmp_path_factory.mktemp("torn")
    template, _ = prepared_job(root, tiny_gpt2, ROWS, PARAMS, OPTIONS, unit_rows=4)
    done = shutil.copytree(template, root / "done")
    run_job(Job.open(done), gpt2_engine, echo=None, shard_rows=1)
    ours = Scenario({"completed": done}, root / "out", batch=False)
    exports(done, ours.out, batch=False)
    return template, Undamaged.of(ours, ours)


def owner(tag: str) -> jobdir.Owner:
    """A worker of this machine provably gone (as `dead_owner`), one per tag: each run is another worker."""
    o = dead_owner()
    return jobdir.Owner(f"{o.worker}{tag}", o.host, o.pid, o.boot, o.pidns, tag)


def run(folder: Path, engine, tag: str, batches: int | None = None) -> None:
    """A worker's run of the job, stopped after `batches` batches (None: to its end; a DeviceError ends it)."""
    seen: list[int] = []
    try:
        run_job(Job.open(folder), engine, echo=None, shard_rows=1, owner=owner(tag),
                should_stop=lambda: seen.append(1) or (batches is not None and len(seen) > batches))  # fmt: skip
    except DeviceError:
        pass


def resumed(folder: Path, engine, mp) -> None:
    """Three workers in turn: stopped after 3 batches, after 2, then to the end."""
    run(folder, engine, "1", 3)
    run(folder, engine, "2", 2)
    run(folder, engine, "3")


def retried(folder: Path, engine, mp) -> None:
    """Row r1 breaks the device until it is set aside (a row error, the job completed), then `runner retry`
    computes it."""
    mp.setenv("RUNNER_FAULT", "poison_row:r1")
    for tag in "123456":
        run(folder, engine, tag)
    mp.delenv("RUNNER_FAULT")
    assert runner.status(folder).state == "completed"
    runner.retry(folder)
    run(folder, engine, "7")


def cancelled(folder: Path, engine, mp) -> None:
    run(folder, engine, "1", 3)
    runner.cancel(folder)
    run(folder, engine, "2")
    runner.retry(folder)
    run(folder, engine, "3", 2)
    run(folder, engine, "4")


def two_at_once(folder: Path, engine, mp) -> None:
    """Two workers at once, each taking the other's units (each sees the other as gone): seals, stale commits."""
    threads = [threading.Thread(target=run, args=(folder, engine, tag)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def copied_while(tmp_path: Path, template: Path, steps, engine, monkeypatch, starts, steps_of=(1, 4)):
    """The job (a copy of `template`) through `steps`, copied meanwhile in each order from each event of `starts`,
    `steps_of` files an event: (its folder as the steps left it, {copier: its copy})."""
    folder = shutil.copytree(template, tmp_path / "orig" / "home" / "job")
    copiers = [TornCopy(folder, tmp_path / f"copy-{i}", order, start, step, seed=start)
               for i, (order, start, step) in enumerate((o, s, n) for o in ORDERS for s in starts for n in steps_of)]  # fmt: skip
    lock = threading.Lock()

    def on_event() -> None:
        with lock:
            for c in copiers:
                c.event()

    with monkeypatch.context() as mp:
        watching(mp, folder, on_event)
        steps(folder, engine, mp)
    return folder, {repr(c): c.finish() for c in copiers}


def restored(tmp_path: Path, name: str, backup: Path, over: Path | None, keep_times: bool = False) -> Path:
    """A case folder whose home/job is `backup` restored fresh, or over a copy of the folder `over`."""
    case = tmp_path / f"case-{name}"
    if over is None:
        shutil.copytree(backup, case / "home" / "job")
    else:
        shutil.copytree(over, case / "home" / "job")
        restore_over(backup, case / "home" / "job", keep_times)
    return case


def each_restored(tmp_path, copies, over, undamaged, engine, keep_times=False, around=None) -> dict[str, str]:
    """`ordeal` of each copy restored (fresh, or over the folder `over`), inside `around(mp, job folder)` if given:
    {copier: outcome}; the failures are said together."""
    outcomes, failures = {}, []
    for name, backup in copies.items():
        case = restored(tmp_path, name, backup, over, keep_times)
        try:
            with pytest.MonkeyPatch.context() as mp:
                if around is not None:
                    around(mp, case / "home" / "job")
                outcomes[name] = ordeal(case, engine, undamaged)
        except Exception as e:  # (every copy is asked; the failures are said together below)
            tb = "".join(traceback.format_tb(e.__traceback__)[-3:])
            failures.append(f"{name}: {type(e).__name__}: {e}\n{tb}")
        shutil.rmtree(case)
    assert not failures, f"{len(failures)} of {len(copies)} copies:\n" + "\n".join(failures)
    return outcomes


def on_another_vm(mp, folder: Path, later: float = 300.0) -> None:
    """What follows runs on a fresh VM `later` seconds after the old one died: another host name and boot, and
    the restored files dated now (`cp -r`)."""
    real = time.time
    mp.setattr(time, "time", lambda: real() + later)
    mp.setattr(jobdir, "host_tag", lambda: "fresh-vm")
    mp.setattr(storage, "boot_id", lambda: "another-boot")
    for p in folder.rglob("*"):
        os.utime(p, (real() + later, real() + later))


def torn(outcomes: dict[str, str]) -> list[str]:
    """The copies that held what no moment of the job held, as status said of them on restore."""
    said = ("failed verification", "completed, but", "retry generation")
    return [name for name, outcome in outcomes.items() if any(s in outcome for s in said)]


def test_a_backup_taken_as_workers_commit_restored_into_a_fresh_home_ends_exactly_once(
    tmp_path, undamaged, gpt2_engine, monkeypatch
):
    template, want = undamaged
    _, copies = copied_while(tmp_path, template, resumed, gpt2_engine, monkeypatch, range(4, 60, 9))
    outcomes = each_restored(tmp_path, copies, None, want, gpt2_engine)
    assert all(o.endswith("exact") for o in outcomes.values()), outcomes
    assert torn(outcomes), "no copy was torn: the sweep asked nothing"


@pytest.mark.parametrize("keep_times", [False, pytest.param(True, marks=pytest.mark.deep)])
def test_a_backup_restored_over_the_stopped_job_ends_exactly_once(
    tmp_path, undamaged, gpt2_engine, monkeypatch, keep_times
):
    """`cp -r` (`cp -a`) of each copy over the folder its worker left mid-job (a dead worker's claim, heartbeat
    and in-flight record back, older files over newer ones), then `runner work`."""
    template, want = undamaged

    def stopped(folder, engine, mp):
        run(folder, engine, "1", 3)
        run(folder, engine, "2", 1)

    left, copies = copied_while(tmp_path, template, stopped, gpt2_engine, monkeypatch, range(3, 40, 6), (2,))
    outcomes = each_restored(tmp_path, copies, left, want, gpt2_engine, keep_times)
    assert all(o.endswith("exact") for o in outcomes.values()), outcomes


def test_a_backup_from_before_a_retry_restored_over_the_retried_job_ends_exactly_once(
    tmp_path, undamaged, gpt2_engine, monkeypatch
):
    """Copies taken as a row error was committed, the job completed, `runner retry` recorded and the row computed,
    restored over the job since completed again: the retry stands, every row once."""
    template, want = undamaged
    done, copies = copied_while(
        tmp_path, template, retried, gpt2_engine, monkeypatch, range(20, 100, 16), (1,)
    )
    outcomes = each_restored(tmp_path, copies, done, want, gpt2_engine)
    assert all(o.endswith("exact") for o in outcomes.values()), outcomes


def test_a_backup_cut_short_is_run_exactly_once_or_refused_naming_a_file(
    tmp_path, undamaged, gpt2_engine, monkeypatch
):
    """The VM died during the backup itself: the copy stops where it was, its last file half-copied (job.json,
    a state record, a shard...). Each restored one completes exactly once (after `runner repair` where a message
    says so) or is refused naming what is wrong (`ordeal`: a RunnerError naming no file fails)."""
    template, want = undamaged
    folder = shutil.copytree(template, tmp_path / "orig" / "job")
    copiers = [TornCopy(folder, tmp_path / f"copy-{i}", o, s, 1, seed=s)
               for i, (o, s) in enumerate((o, s) for o in ORDERS for s in range(4, 40, 5))]  # fmt: skip
    with monkeypatch.context() as mp:
        watching(mp, folder, lambda: [c.event() for c in copiers])
        run(folder, gpt2_engine, "1", 5)
    outcomes = each_restored(tmp_path, {repr(c): c.cut() for c in copiers}, None, want, gpt2_engine)
    assert any("runner repair" in o and o.endswith("exact") for o in outcomes.values()), outcomes


# (one in `make test`, the others in `make test-deep`)
@pytest.mark.parametrize("leftover", [*(pytest.param(k, marks=pytest.mark.deep) for k in ("rsync", "temp", "tilde")),
                                      "drive copy"])  # fmt: skip
def test_what_copying_tools_leave_beside_each_file_changes_nothing(
    tmp_path, undamaged, gpt2_engine, leftover
):
    """A backup that rsync, cp or Drive left its own files in (rsync's `.NAME.XXXXXX` of a transfer cut short,
    a temp file half-written, `NAME~`, a sync conflict's `NAME (1).EXT`, beside every file of a job stopped
    halfway): restored, the job completes exactly once."""
    template, want = undamaged
    case = tmp_path / "case"
    folder = shutil.copytree(template, case / "home" / "job")
    run(folder, gpt2_engine, "1", 3)
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        data = p.read_bytes()
        stem, _, ext = p.name.partition(".")
        beside = {"rsync": f".{p.name}.Ab12Cd", "temp": f".{p.name}.1a2b3c4d.tmp", "tilde": f"{p.name}~",
                  "drive copy": f"{stem} (1).{ext}"}[leftover]  # fmt: skip
        (p.parent / beside).write_bytes(data if leftover == "drive copy" else data[: len(data) // 2])
    assert ordeal(case, gpt2_engine, want).endswith("exact")


def test_one_backup_restored_twice_into_one_home_runs_once(tmp_path, undamaged, gpt2_engine, monkeypatch):
    """Two torn copies of one job restored into one home, as its id's folder and as ID-copy, and a worker on each
    (`runner work`, `runner work --job ID-copy`): the copy is refused naming the folder it copies, the job's
    folder completes exactly once, and the job read by its id is that one."""
    template, want = undamaged
    _, copies = copied_while(tmp_path, template, resumed, gpt2_engine, monkeypatch, (9, 25), (2,))
    first, second = list(copies.values())[:2]
    job_id = Job.open(template).id
    home = tmp_path / "twins"
    shutil.copytree(first, home / job_id)
    shutil.copytree(second, home / f"{job_id}-copy")
    said: list[str] = []
    worker = threading.Thread(target=lambda: work(home, engine=gpt2_engine, echo=said.append, shard_rows=1))
    worker.start()
    work(home, job=str(home / f"{job_id}-copy"), engine=gpt2_engine, echo=said.append, shard_rows=1)
    worker.join()
    assert any(f"{job_id}-copy/ is a copy of the folder {job_id}/" in line for line in said), said
    assert runner.status(home / job_id).state == "completed"
    assert runner.status(home / f"{job_id}-copy").state == "broken"
    same_rows(runner.load_results(job_id, home=home), want.reference, complete=True)


def submit(home: Path, prompts: Path, model: str) -> Job:
    return create_job(prompts, model, PARAMS, OPTIONS, home=home, name="night", unit_rows=4)


def home_restored(case: Path, backup: Path, prompts: Path, model: str, engine, want) -> str:
    """A copy of a whole home restored, the notebook's cells run again: `runner submit --name night` (the job
    there, or a new one, or refused with what to do), then status, work (repair where said) and load_results by
    name, exactly the undamaged job's."""
    home = case / "home"
    shutil.copytree(backup, home)
    try:
        job = submit(home, prompts, model)
    except RunnerError as e:
        assert "is claimed by another submit" in str(e) and "delete" in str(e), e
        return "submit refused"
    (case / "first").mkdir()
    notes = [*read_at_once(job.dir, case / "first", want), *work_through(job.dir, engine)]
    same_rows(runner.load_results("night", home=home), want.reference, complete=True)
    return "; ".join([*notes, f"submit: {'new job' if job.created else 'the job there'}"])


@pytest.mark.parametrize("vm", ["same", "another"])
def test_a_home_copied_as_a_named_job_is_submitted_and_run_then_submitted_again(
    tmp_path, undamaged, gpt2_engine, tiny_gpt2, monkeypatch, vm
):
    template, want = undamaged
    prompts, home = template.parent / "p.jsonl", tmp_path / "orig" / "home"
    home.mkdir(parents=True)
    copiers = [TornCopy(home, tmp_path / f"copy-{i}", o, s, 3, seed=s)
               for i, (o, s) in enumerate((o, s) for o in ORDERS for s in range(1, 90, 11))]  # fmt: skip
    with monkeypatch.context() as mp:
        watching(mp, home, lambda: [c.event() for c in copiers])
        submit(home, prompts, tiny_gpt2)
        seen: list[int] = []
        work(home, engine=gpt2_engine, echo=None, shard_rows=1, stop=lambda: seen.append(1) or len(seen) > 3)
    outcomes = {}
    for c in copiers:
        case = tmp_path / f"case-{c!r}"
        with monkeypatch.context() as mp:
            if vm == "another":
                on_another_vm(mp, c.finish())
            outcomes[repr(c)] = home_restored(case, c.finish(), prompts, tiny_gpt2, gpt2_engine, want)
        shutil.rmtree(case)
    assert any("the job there" in o for o in outcomes.values()), outcomes


# --- the dense sweep: `make test-deep` ------------------------------------------------------------------------

STEPS = {"resumed": resumed, "retried": retried, "cancelled": cancelled, "two at once": two_at_once}


@pytest.mark.deep
@pytest.mark.parametrize("restore", ["fresh", "over", "over keeping times", "fresh on another VM"])
@pytest.mark.parametrize("steps", list(STEPS))
def test_every_moment_every_order_every_restore(
    tmp_path, undamaged, gpt2_engine, monkeypatch, steps, restore
):
    """Copies from every 18th event of each job's life (every 4th held too, in pass 243: ~12 minutes), each
    order, 1 and 4 files an event, restored each way. A copy from before a `runner retry` or after a `runner cancel` may end as that stage was (its row error, or
    cancelled): `ordeal` then checks that what it holds is the undamaged job's."""
    template, want = undamaged
    left, copies = copied_while(tmp_path, template, STEPS[steps], gpt2_engine, monkeypatch, range(2, 150, 18))
    over = left if restore.startswith("over") else None
    around = on_another_vm if restore.endswith("another VM") else None
    outcomes = each_restored(tmp_path, copies, over, want, gpt2_engine, restore.endswith("times"), around)
    if steps in ("resumed", "two at once") or over is not None:
        assert all(o.endswith("exact") for o in outcomes.values()), outcomes
