"""Whole, valid files of another job copied into a job's folder (adversarial pass 79).

A commit (its done/ marker and its shard, same name) copied in from another job of the same layout checked out
against its own marker: the job read completed, `runner repair` verified every row and `load_results` returned
the other job's samples (another seed's, another file's rows). And a job.json copied in with its backup made
`runner status` show the other job's id and settings as this folder's, completed. A shard names the job it was
written for; verified.json names the job whose shards it vouches for."""

import shutil

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir, scheduler
from runner.jobs import create_job
from runner.worker import run_job

ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(6)]
OPTIONS = EngineOptions(batch_size=2)


def run_until_done(job, engine) -> None:
    assert run_job(job, engine, echo=None, shard_rows=2).finished  # (commits of 2 results)


def make(tmp_path, model, seed: int, home=None, out=None):
    params = GenerationParams(max_new_tokens=3, temperature=0.8, num_return_sequences=2, seed=seed)
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    return create_job(prompts, model, params, OPTIONS, home=home, job_dir=out, unit_rows=6)


@pytest.fixture
def two_jobs(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """Job A (seed 7) and job B (seed 8, same prompts and layout), both completed; A's results."""
    a, b = (
        make(tmp_path, tiny_gpt2, 7, home=runner_home),
        make(tmp_path, tiny_gpt2, 8, home=tmp_path / "other"),
    )
    for job in (a, b):
        run_until_done(job, gpt2_engine)
    return a, b, runner.load_results(a)


def copy_commit(src, dst, index: int) -> str:
    name = sorted(p.stem for p in (dst.dir / "done").glob("*.json"))[index]
    for sub, ext in (("shards", ".parquet"), ("done", ".json")):
        shutil.copy2(src.dir / sub / f"{name}{ext}", dst.dir / sub / f"{name}{ext}")
    return name


@pytest.mark.parametrize("index", [0, 2])  # (the first one listed was taken for the folder's own results)
def test_a_commit_copied_in_from_another_job_is_quarantined_and_its_rows_computed_again(
    two_jobs, gpt2_engine, index
):
    a, b, own = two_jobs
    name = copy_commit(b, a, index)
    shown = runner.status(a.dir)
    assert shown.state == "broken" and f"written for job {b.id}" in shown.message
    with pytest.warns(UserWarning, match=f"commit {name}: its shard was written for job {b.id}"):
        shown = runner.load_results(a)
    kept = own.merge(shown[["id", "sample", "text"]], on=["id", "sample", "text"])
    assert len(shown) == len(kept) == len(own) - 2  # its 2 results left out, none of B's taken in
    report = jobdir.repair(a.dir)
    assert any(b.id in why for _, why in report.quarantined)
    run_until_done(a, gpt2_engine)
    again = runner.load_results(a)
    assert again[["id", "sample", "text"]].equals(own[["id", "sample", "text"]])


def test_a_job_json_copied_in_with_its_backup_is_not_shown_as_the_folders_job(two_jobs):
    a, b, _ = two_jobs
    for name in ("job.json", "job.backup.json"):
        shutil.copy2(b.dir / name, a.dir / name)
    shown = runner.status(a.dir)
    assert shown.state == "broken" and f"its folder is named for job {a.id}" in shown.message


def test_in_a_folder_of_its_own_the_results_say_whose_they_are(tmp_path, tiny_gpt2, gpt2_engine):
    a, b = make(tmp_path, tiny_gpt2, 7, out=tmp_path / "a"), make(tmp_path, tiny_gpt2, 8, out=tmp_path / "b")
    run_until_done(a, gpt2_engine)
    assert runner.status(a.dir).state == "completed"  # (verified.json now vouches for A's shards)
    for name in ("job.json", "job.backup.json"):
        shutil.copy2(b.dir / name, a.dir / name)
    shown = runner.status(a.dir)
    assert shown.state == "broken" and f"its shard was written for job {a.id}" in shown.message
    with pytest.raises(jobdir.BrokenJob, match=f"its results were written for job {a.id}"):
        run_job(jobdir.Job.open(a.dir), gpt2_engine, echo=None)
    with pytest.raises(jobdir.BrokenJob, match=f"its results were written for job {a.id}, but the spec") as e:
        jobdir.repair(a.dir)  # (nothing quarantined: they are this folder's results)
    assert not e.value.repairable and len(list((a.dir / "shards").iterdir())) == 6  # (12 results, 2 a commit)


def test_a_job_folder_copied_within_its_home_is_a_copy_not_a_second_job(tmp_path, tiny_gpt2, runner_home):
    """Pass 78: a Drive conflict copy `ID (1)` (or `cp -r jobs/ID jobs/backup`) was a second job of the same id:
    status listed it twice and `runner work` computed it once per folder."""
    params = GenerationParams(max_new_tokens=2, seed=3)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, params, OPTIONS, home=runner_home,
                     name="night1")  # fmt: skip
    for copy in (f"{job.id} (1)", "backup"):
        shutil.copytree(job.dir, runner_home / copy)
    shown = {s.folder: s for s in runner.status(home=runner_home)}
    assert shown[str(job.dir)].state == "queued"
    for copy in (f"{job.id} (1)", "backup"):
        said = shown[str(runner_home / copy)]
        assert said.state == "broken" and f"{copy}/ is a copy of the folder {job.id}/" in said.message
    broken = {}
    assert [c.job.dir for c in scheduler.queue(runner_home, broken=broken)] == [job.dir]
    assert len(broken) == 2
    assert jobdir.open_job("night1", runner_home).dir == job.dir  # the name is the job's, not "several jobs"


def test_runner_run_again_carries_on_the_job_not_its_copy(tmp_path, tiny_gpt2, runner_home):
    prompts, params = write_jsonl(tmp_path / "p.jsonl", ROWS), GenerationParams(max_new_tokens=2, seed=3)
    job, _ = runner.run(prompts, tiny_gpt2, params, echo=None)
    shutil.copytree(job.dir, runner_home / f"{job.id} (1)")  # (listed after it: newest first, it came first)
    again, _ = runner.run(prompts, tiny_gpt2, params, echo=None)
    assert again.dir == job.dir


def test_a_copy_is_not_run_while_the_job_it_copies_is_broken(tmp_path, tiny_gpt2, runner_home):
    """Pass 81: with the job's own folder broken (a torn job.json), `runner work` computed the job in its copy;
    once repaired, the job was computed again in its own folder."""
    params = GenerationParams(max_new_tokens=2, seed=3)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, params, OPTIONS, home=runner_home)
    shutil.copytree(job.dir, runner_home / f"{job.id} (1)")
    (job.dir / "job.json").write_text("{torn")
    broken = {}
    assert scheduler.queue(runner_home, broken=broken) == [] and len(broken) == 2
    jobdir.repair(job.dir)
    assert [c.job.dir for c in scheduler.queue(runner_home)] == [job.dir]


def test_a_commit_copied_into_a_queued_folder_of_its_own_is_named_with_what_to_do(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """Pass 86: in a folder of its own (not named by a job id) with no results yet, one commit copied in from
    another job is all that says whose folder it is: refused, and the advice was only to put "that job's"
    job.json back. It now says to move the commits out, which lets the job run."""
    a, b = make(tmp_path, tiny_gpt2, 7, out=tmp_path / "a"), make(tmp_path, tiny_gpt2, 8, out=tmp_path / "b")
    run_until_done(b, gpt2_engine)
    name = sorted(p.stem for p in (b.dir / "done").glob("*.json"))[0]
    for sub, ext in (("shards", ".parquet"), ("done", ".json")):
        (a.dir / sub).mkdir(exist_ok=True)
        shutil.copy2(b.dir / sub / f"{name}{ext}", a.dir / sub / f"{name}{ext}")
    with pytest.raises(jobdir.BrokenJob, match=r"move those commits out \(their done/NAME.json and shards/"):
        run_job(jobdir.Job.open(a.dir), gpt2_engine, echo=None)
    for sub, ext in (("shards", ".parquet"), ("done", ".json")):
        (a.dir / sub / f"{name}{ext}").unlink()  # as it says
    run_until_done(a, gpt2_engine)
    assert runner.status(a.dir).state == "completed"


def test_a_copy_named_by_its_folder_is_not_run_nor_shown_queued(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """Pass 87: the home's table showed `backup` (a `cp -r jobs/ID jobs/backup`) as a copy, but named alone by
    its path or folder name it was an ordinary job: `runner status jobs/backup` said queued, and `runner work
    --job backup` computed the whole job in the copy, the job itself still queued with 0 rows."""
    params = GenerationParams(max_new_tokens=2, seed=3)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, params, OPTIONS, home=runner_home)
    copy = shutil.copytree(job.dir, runner_home / "backup")
    for ref in ("backup", str(copy)):
        said = runner.status(ref, home=runner_home)
        assert said.state == "broken" and f"backup/ is a copy of the folder {job.id}/" in said.message
        broken = {}
        assert scheduler.queue(runner_home, ref, broken=broken) == [] and list(broken) == [str(copy)]
        assert scheduler.work(runner_home, job=ref, echo=None, engine=gpt2_engine) == []
    with pytest.raises(runner.RunnerError, match="is a copy of the folder"):
        run_job(jobdir.open_job("backup", runner_home), gpt2_engine, echo=None)
    # pass 90: repair said "job.json restored from job.backup.json" and "run `runner work`" for it
    said = invoke("repair", copy)
    assert said.exit_code == 1 and f"backup/ is a copy of the folder {job.id}/" in said.output, said.output
    assert (
        "restored" not in said.output
        and (copy / "job.json").read_bytes() == (job.dir / "job.json").read_bytes()
    )
    assert not list((copy / "done").glob("*.json")) and runner.status(job.id, home=runner_home).done == 0


def test_a_new_job_in_a_folder_named_like_a_job_id_is_refused_up_front(tmp_path, tiny_gpt2):
    """Pass 87: `runner run -o out/20250101-120000-abcdef` made a job (with an id of its own) that could never
    run: a folder named like a job id is taken for that job's folder, so the job was refused as another's at
    every run, and `runner repair` could not help. It is refused before anything is written."""
    out = tmp_path / "out" / "20250101-120000-abcdef"
    with pytest.raises(runner.RunnerError, match="named like a job id.*name the folder otherwise"):
        make(tmp_path, tiny_gpt2, 7, out=out)
    assert not out.exists()
    assert make(tmp_path, tiny_gpt2, 7, out=tmp_path / "out" / "night-20250101").dir.exists()


def test_a_job_json_copied_in_alone_says_repair_not_delete(two_jobs):
    """Another job's job.json copied over this job's (its backup still its own): status called the folder a copy
    to move out or delete, which would lose its rows (adversarial pass 104). It says `runner repair`, which
    restores the folder's own spec."""
    a, b, _ = two_jobs
    shutil.copy2(b.dir / "job.json", a.dir / "job.json")
    shown = {s.folder: s for s in runner.status(home=a.dir.parent)}[str(a.dir)]
    assert shown.state == "broken" and "runner repair" in shown.message and "delete" not in shown.message, (
        shown
    )
    assert shown.id == a.id  # its own id, not the copied-in job's
    runner.repair(a.dir)
    assert runner.status(a.dir).id == a.id and runner.status(a.dir).state != "broken"


def test_a_job_json_copied_in_from_a_job_of_the_same_home_says_repair_not_delete(
    tmp_path, tiny_gpt2, runner_home
):
    """The same, both jobs in one home: the folder read as a copy of the other job's folder ("move it out or
    delete it"). Its backup says it is a job of its own: shown as itself, and `runner repair` restores it."""
    a, b = make(tmp_path, tiny_gpt2, 7, home=runner_home), make(tmp_path, tiny_gpt2, 8, home=runner_home)
    shutil.copy2(b.dir / "job.json", a.dir / "job.json")
    shown = {s.folder: s for s in runner.status(home=runner_home)}
    assert shown[str(a.dir)].state == "broken" and shown[str(a.dir)].id == a.id, shown
    assert "runner repair" in shown[str(a.dir)].message and "delete" not in shown[str(a.dir)].message
    assert shown[str(b.dir)].state == "queued" and shown[str(b.dir)].id == b.id
    runner.repair(a.dir)
    assert runner.status(a.dir).id == a.id and runner.status(a.dir).state == "queued"
