"""Adversarial pass 202: the Drive mount going away and coming back, the disk filling or turning read-only
inside a commit, a job folder moved or deleted by the user while a worker runs the home, and the VM killed in
the middle, with real `runner work` processes (tests/mountfaults.py)."""

import errno
import shutil
import signal

import mountfaults
import pytest
import workers
from helpers import assert_exactly_once, prepared_job, write_jsonl

from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.jobdir import Job, read_state
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=5)
OPTIONS = EngineOptions(batch_size=2)
N = 6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """Two jobs of the same prompts (two ids), and the reference both must equal."""
    root = tmp_path_factory.mktemp("drive")
    rows = [{"id": f"r{i}", "prompt": f"The river said {i}"} for i in range(N)]
    first, ref = prepared_job(root, tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=2)
    second = create_job(root / "p.jsonl", tiny_gpt2, PARAMS, OPTIONS, job_dir=root / "second", unit_rows=2)
    return first, second.dir, ref


@pytest.fixture
def home(tmp_path, prepared):
    home = tmp_path / "home"
    home.mkdir()
    # b is the job a worker of the home runs first (of two queued jobs, the one whose id sorts first)
    first, second = sorted(prepared[:2], key=lambda d: Job.open(d).id)
    shutil.copytree(first, home / "b")
    shutil.copytree(second, home / "a")
    return home


def run(home, *extra, **faults):
    if faults:
        faults["log"] = str(home.parent / "fired.log")
    prefix, env = mountfaults.command(home, **faults) if faults else ((), {})
    env["RUNNER_LEASE_TTL"] = "3"
    return workers.run_worker(home, *extra, prefix=prefix, env_extra=env, shard_rows=1, timeout=120)


def finishes(home, ref, *dirs):
    code, out = run(home)
    assert code == 0 and "Traceback" not in out, out
    for d in dirs:
        assert read_state(d).state == "completed", out
        assert_exactly_once(d, ref)
    return out


def fired(home) -> str:
    return (home.parent / "fired.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trigger", "where"),
    [
        ("wrote:done:1", "inside"),  # its first marker just written, moved within the home
        ("after_shard:1", "delete"),  # a shard in place, its marker not yet: deleted
        ("after_generate:1", "outside"),  # a batch computed, nothing written yet: moved out of the home
    ],
)
def test_a_job_folder_moved_or_deleted_as_it_runs_leaves_the_other_job_and_itself_exactly_once(
    home, prepared, trigger, where
):
    """A job's folder moved or deleted by the user while `runner work` of the home runs it: the worker stopped
    with "the job home cannot be written (... No such file or directory); job ... resumes with the next `runner
    work`", the home's other job left undone, and a folder gone after a shard said its claim "was taken over by
    another worker". Now it says the folder is gone, writes nothing more there and runs the other job; the
    moved job, run again where it is now, ends exactly once (adversarial pass 202)."""
    dest = {"inside": home / "b2", "outside": home.parent / "elsewhere" / "b", "delete": None}[where]
    if dest is not None:
        dest.parent.mkdir(exist_ok=True)
    code, out = run(home, trigger=trigger, what=f"move:{dest}" if dest else "delete", job="b")
    assert fired(home).startswith(f"fired {'move' if dest else 'delete'}"), out
    assert code == 0 and "Traceback" not in out, out
    assert f"{home / 'b'} is gone (moved or deleted while this worker ran it)" in out
    assert "cannot be written" not in out and "taken over by another worker" not in out, out
    assert read_state(home / "a").state == "completed", out
    assert_exactly_once(home / "a", prepared[2])
    assert not (home / "b").exists()
    if dest is not None:
        assert_exactly_once(dest, prepared[2], complete=False)
        code, out = run(home, "--job", str(dest))
        assert code == 0 and "Traceback" not in out, out
        assert read_state(dest).state == "completed", out
        assert_exactly_once(dest, prepared[2])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trigger", "what", "calls"),
    [
        ("after_shard:1", "ENOTCONN", 5),  # the mount gone a moment, with a commit in flight: it carries on
        ("wrote:done:1", "ENOSPC", -1),  # the disk full after a marker (verified.json not yet): a clean stop
    ],
)
def test_a_mount_gone_or_full_inside_a_commit_then_back_ends_exactly_once(
    home, prepared, trigger, what, calls
):
    """Held in adversarial pass 202 (with EDQUOT, EROFS, other moments and outages for good): a sample."""
    code, out = run(home, trigger=trigger, what=what, calls=calls, reads=what == "ENOTCONN")
    assert fired(home).startswith(f"fired {what}"), out
    assert "Traceback" not in out, out
    assert code == (0 if calls >= 0 else 1), out
    for d in (home / "a", home / "b"):
        assert_exactly_once(d, prepared[2], complete=calls >= 0)
    finishes(home, prepared[2], home / "a", home / "b")


@pytest.mark.slow
def test_a_job_folder_moved_then_the_vm_killed_resumes_exactly_once_from_its_new_place(home, prepared):
    """Held in adversarial pass 202: the folder moved within the home with a shard in place and its marker not
    yet, and every process killed right then (Colab's VM gone); a fresh `runner work` of the home ends both."""
    code, out = run(home, trigger="after_shard:1", what=f"move:{home / 'b2'}", job="b", kill=True)
    assert code == -signal.SIGKILL and fired(home).startswith("fired move"), out
    finishes(home, prepared[2], home / "a", home / "b2")


def test_a_folder_missing_at_one_look_is_not_taken_for_gone(tmp_path, tiny_gpt2, monkeypatch):
    """A mount's flake answering "no such file" once for the job's folder must not end the worker's run of the job
    (JobGone): the folder is looked for again; gone at every look (moved away), it is JobGone."""
    job = _job(tmp_path, tiny_gpt2, "job")
    flakes = _flaky_kind(monkeypatch, job.dir, 1)
    jobdir.check_folder_still_there(job, LOST)
    assert flakes == [job.dir]
    job.dir.rename(tmp_path / "moved")
    with pytest.raises(jobdir.JobGone, match="is gone"):
        jobdir.check_folder_still_there(job, LOST)


def test_a_folder_missing_at_two_looks_in_a_row_is_not_taken_for_gone(tmp_path, tiny_gpt2, monkeypatch):
    """The folder looked for twice at once, a flake of a mount that answered both looks alike (FUSE caches a "no
    such file" it just said) ended the worker's run of a job still there: the looks are now some time apart."""
    job = _job(tmp_path, tiny_gpt2, "job")
    flakes = _flaky_kind(monkeypatch, job.dir, 2)
    jobdir.check_folder_still_there(job, LOST)
    assert flakes == [job.dir, job.dir]


def test_a_folder_deleted_and_submitted_again_is_job_replaced_not_a_failing_home(
    tmp_path, tiny_gpt2, monkeypatch
):
    """A write of the worker failing with "no such file" as the user deleted the job's folder, another job
    submitted to it by the time the folder is looked at: there, it was taken for a failing home (the whole
    worker stopped, "the job home cannot be written"); it is JobReplaced, as at the worker's next claim."""
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    job, other = _job(tmp_path, tiny_gpt2, "job"), _job(tmp_path, tiny_gpt2, "other")
    shutil.rmtree(job.dir)
    other.dir.rename(job.dir)
    with pytest.raises(jobdir.JobReplaced, match=f"now holds job {other.id}, not job {job.id}"):
        jobdir.check_folder_still_there(job, LOST)
    with pytest.raises(jobdir.JobReplaced):
        jobdir.check_folder_still_there(job)


def test_a_job_json_deleted_under_the_worker_is_said_so_with_repair_not_as_a_folder_moved(
    tmp_path, tiny_gpt2, monkeypatch
):
    """The folder still there, its job.json deleted (job.backup.json kept) as the worker ran it: it said the
    folder was "gone (moved or deleted)" and to run it where it is now; it says job.json is gone and that
    `runner repair` restores it from the backup (which it does)."""
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    job = _job(tmp_path, tiny_gpt2, "job")
    (job.dir / "job.json").unlink()
    with pytest.raises(
        jobdir.JobGone, match=r"its job.json is gone from .*`runner repair .*` restores it from job"
    ):
        jobdir.check_folder_still_there(job, LOST)
    jobdir.repair(job.dir)
    assert (job.dir / "job.json").exists()


LOST = FileNotFoundError(errno.ENOENT, "No such file or directory")


def _job(tmp_path, model, name):
    prompts = tmp_path / "p.jsonl"
    if not prompts.exists():
        write_jsonl(prompts, [{"prompt": "hi"}])
    return create_job(prompts, model, PARAMS, OPTIONS, job_dir=tmp_path / name)


def _flaky_kind(monkeypatch, folder, times):
    """storage.kind saying "nothing there" of `folder` at its first `times` looks (retry delays made 0); the
    looks so answered."""
    real, flakes = storage.kind, []

    def kind(path):
        if path == folder and len(flakes) < times:
            flakes.append(path)
            return None
        return real(path)

    monkeypatch.setattr(storage, "kind", kind)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    return flakes
