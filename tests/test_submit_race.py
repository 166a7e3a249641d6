"""Two submits of one --name at the same time store one job (README: "running a notebook's cells twice never
submits twice", also from two Colab VMs on one Drive folder). Found by an adversarial pass: the name was looked
up before the job existed and nobody checked it again, so both submits stored a job named night1 (with
different seeds), every later command by name failed, and `runner work` computed every row twice.

A named submit now claims the name exclusively (jobs._claim_name, .names/NAME.json) before its final rename.
Deterministic: the first submit is frozen (SIGSTOP) once its temp folder appears in the home (a progress event;
its writes are slowed through tests/fsfaults.py only so that the folder lives long enough to be seen), the
second runs to its end, then the first is continued."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsfaults
import pytest
from helpers import write_jsonl
from workers import run_runner, worker_env

import runner
from runner import EngineOptions, GenerationParams, RunnerError, jobdir, jobs
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3)


@pytest.mark.slow  # real submit processes
def test_two_concurrent_submits_of_one_name_make_one_job(tmp_path, tiny_gpt2, runner_home):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(4)])
    args = ["--home", str(runner_home), "submit", str(prompts), "-m", tiny_gpt2, "--max-new-tokens", "3",
            "--name", "night1"]  # fmt: skip
    runner_home.mkdir(parents=True, exist_ok=True)
    slow = fsfaults.FsFaults(runner_home, slow=0.3)
    first = subprocess.Popen([sys.executable, str(fsfaults.HERE), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=worker_env({fsfaults.ENV: slow.settings()}))  # fmt: skip
    end = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") and p.is_dir() for p in runner_home.iterdir()):
        assert first.poll() is None and time.monotonic() < end, (
            "the first submit ended before its temp folder"
        )
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)  # frozen after its name check, building its job
    try:
        code, out = run_runner(*args)
        assert code == 0, out
    finally:
        first.send_signal(signal.SIGCONT)
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out1
    folders = jobdir.job_folders(runner_home)
    assert len(folders) == 1, [p.name for p in folders]
    assert folders[0].name in out1  # the first submit returned the job the second stored, and says so
    assert f"job {folders[0].name} (the same file and settings) is already there: queued" in out1, out1
    assert not [p for p in runner_home.iterdir() if p.name.endswith(".tmp")]  # and left no temp folder
    code, status = run_runner("--home", runner_home, "status", "night1")
    assert code == 0 and "night1" in status, status


def dead_owner():
    """The Owner record of a process that has exited (same boot and PID namespace): provably dead."""
    out = subprocess.run([sys.executable, "-c", "import json; from runner import jobdir; "
                          "print(json.dumps(jobdir.Owner.me('submit').as_dict()))"],
                         capture_output=True, text=True, env=worker_env(), check=True).stdout  # fmt: skip
    return json.loads(out)


def claims(home, name="night1"):
    return sorted(p.name for p in (home / jobs.NAMES).iterdir() if p.name.startswith(name + "."))


def test_a_name_held_by_a_submit_being_written_is_refused_until_it_lands(tmp_path, tiny_gpt2, runner_home):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    (runner_home / jobs.NAMES).mkdir(parents=True)
    me = jobdir.Owner.me("submit").as_dict()  # alive: this very process
    claim = runner_home / jobs.NAMES / "night1.0.json"
    claim.write_text(json.dumps({"job": "20261201-000000-abcdef", "owner": me}))
    with pytest.raises(
        RunnerError, match="claimed by another submit .* being written right now or was killed"
    ):
        create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert jobdir.job_folders(runner_home) == []
    # the submit holding it was killed before its job landed: its claim is taken over by the next number
    claim.write_text(json.dumps({"job": "20261201-000000-abcdef", "owner": dead_owner()}))
    job = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert claims(runner_home) == ["night1.0.json", "night1.1.json"]
    assert json.loads((runner_home / jobs.NAMES / "night1.1.json").read_text())["job"] == job.id
    # or on another machine (a VM since gone), or damaged: taken over once old
    (runner_home / job.id).rename(tmp_path / "deleted")  # the user deleted the named job
    newest = runner_home / jobs.NAMES / "night1.1.json"
    newest.write_text(json.dumps({"job": "20261201-000000-abcdef", "owner": {**me, "boot": "another-vm"}}))
    with pytest.raises(RunnerError, match="frees itself within 10 minutes"):
        create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    old = time.time() - jobs.STALE_CLAIM_SECONDS - 5
    os.utime(newest, (old, old))
    again = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert json.loads((runner_home / jobs.NAMES / "night1.2.json").read_text())["job"] == again.id


def test_damaged_and_foreign_claims_block_no_name_for_good(tmp_path, tiny_gpt2, runner_home):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    names = runner_home / jobs.NAMES
    names.mkdir(parents=True)
    old = time.time() - jobs.STALE_CLAIM_SECONDS - 5
    (names / "night1.0.json").write_text('{"job": "2026')  # torn (a copy tool, a full disk)
    (names / "night2.0.json").mkdir()  # a folder in a claim's place
    for p in (names / "night1.0.json", names / "night2.0.json"):
        with pytest.raises(RunnerError, match="claimed by another submit"):  # young: may be on its way
            create_job(
                prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name=p.name.split(".")[0]
            )
        os.utime(p, (old, old))
    for name in ("night1", "night2"):
        job = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name=name)
        assert json.loads((names / f"{name}.1.json").read_text())["job"] == job.id


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_two_submits_taking_over_one_stale_claim_make_one_job(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """Submit A judges a killed submit's claim stale and is paused right there (where a SIGSTOP would freeze
    it) while submit B, a real process, takes the same claim over and stores its job; then A goes on. Both
    race for the next claim number, only one creates it: one job, which A returns."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(3)])
    (runner_home / jobs.NAMES).mkdir(parents=True)
    (runner_home / jobs.NAMES / "night1.0.json").write_text(
        json.dumps({"job": "20200101-000000-abcdef", "owner": dead_owner()})
    )
    real_stale = jobs._stale_claim
    other = []

    def stale(path, held):
        verdict = real_stale(path, held)
        if verdict and not other:  # A judged the claim stale; B submits now
            other.append(run_runner("--home", runner_home, "submit", prompts, "-m", tiny_gpt2, "--max-new-tokens",
                                    "3", "--name", "night1"))  # fmt: skip
        return verdict

    monkeypatch.setattr(jobs, "_stale_claim", stale)
    a = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home, name="night1")
    assert other and other[0][0] == 0, other
    folders = jobdir.job_folders(runner_home)
    assert [p.name for p in folders] == [a.id] and a.id in other[0][1]  # B stored it, A returned it


def test_resubmitting_a_named_job_returns_it_through_its_claim(tmp_path, tiny_gpt2, runner_home):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    job = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert json.loads((runner_home / jobs.NAMES / "night1.0.json").read_text())["job"] == job.id
    assert (
        create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1").id == job.id
    )
    assert len(jobdir.job_folders(runner_home)) == 1


def test_a_named_job_whose_spec_and_claim_are_both_damaged_is_not_stored_twice(
    tmp_path, tiny_gpt2, runner_home
):
    """Its name claim torn and its job.json torn (the backup whole), a rerun of the same named submit took the
    claim over once it was stale and stored a second job of that name: everything computed again, and status
    and results then refused the name (adversarial pass 31). The submit now names the broken job and repair;
    once repaired, it returns it."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    job = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    claim = runner_home / jobs.NAMES / "night1.0.json"
    claim.write_bytes(claim.read_bytes()[:40])
    (job.dir / jobdir.JOB_FILE).write_bytes((job.dir / jobdir.JOB_FILE).read_bytes()[:60])
    old = time.time() - jobs.STALE_CLAIM_SECONDS - 60
    os.utime(claim, (old, old))
    with pytest.raises(
        RunnerError, match=rf"the name 'night1' is job {job.id}'s, which is broken .* `runner repair"
    ):
        create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert len(jobdir.job_folders(runner_home)) == 1
    (shown,) = runner.status(home=runner_home)  # by its backup's name, not "-"
    assert (shown.state, shown.name, shown.model) == ("broken", "night1", job.spec.model)
    runner.repair(job.id, home=runner_home)
    assert (
        create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1").id == job.id
    )
    assert len(jobdir.job_folders(runner_home)) == 1


def test_two_concurrent_submits_to_one_folder_return_one_job(tmp_path, tiny_gpt2, monkeypatch):
    """`runner run FILE -o DIR` twice at once (a cell run twice, two VMs): the one that moves its job in second
    returns the job the first stored there (same inputs and settings), and refuses one of other settings;
    before, it failed with 'cannot read or write DIR: Directory not empty' (found by adversarial pass 10).
    Deterministic: the other submit runs to its end while this one writes its prompts."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(4)])
    real = jobs._write_prompts

    def submit_meanwhile(out, params):
        started: list = []

        def write_prompts(*args, **kwargs):
            if not started:
                started.append("writing")  # the other submit's own prompts go straight through
                started[0] = create_job(prompts, tiny_gpt2, params, job_dir=out)
            return real(*args, **kwargs)

        monkeypatch.setattr(jobs, "_write_prompts", write_prompts)
        return started

    other = submit_meanwhile(tmp_path / "out", PARAMS)
    job = create_job(prompts, tiny_gpt2, PARAMS, job_dir=tmp_path / "out")
    assert job.dir == other[0].dir == tmp_path / "out" and job.id == other[0].id
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp folder left
    submit_meanwhile(tmp_path / "out2", GenerationParams(max_new_tokens=5))
    with pytest.raises(RunnerError, match="holds a job with other inputs or settings"):
        create_job(prompts, tiny_gpt2, PARAMS, job_dir=tmp_path / "out2")


def test_a_submit_whose_empty_o_folder_another_removed_first_carries_on(tmp_path, tiny_gpt2, monkeypatch):
    """`runner run FILE -o DIR` twice at once into an empty DIR the user made: both saw DIR, the other one
    removed it to move its job in, and this one's own removal failed with 'cannot read or write DIR: No such
    file or directory' (adversarial pass 11). Deterministic: the other's removal happens just before this one's."""
    from pathlib import Path

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    out = tmp_path / "out"
    out.mkdir()
    real_rmdir = Path.rmdir

    def rmdir(self):
        if self == out and out.is_dir():
            real_rmdir(self)  # the other submit's removal, an instant before this one's
        return real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", rmdir)
    job = create_job(prompts, tiny_gpt2, PARAMS, job_dir=out)
    assert job.dir == out and (out / "job.json").is_file()


def test_two_concurrent_runs_of_one_file_without_a_folder_make_one_job(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """`runner run FILE` without -o or --name twice at once (two Colab VMs running one notebook on one Drive
    home): both looked for the home's job of that file and settings before either had stored one, so each
    stored its own and computed every row. The file and settings are now claimed as a name is
    (.names/~FINGERPRINT.N.json): the run that stores second returns the first one's job and works on it.
    Once that job is cancelled, the next run takes the claim over with a new job. Deterministic: the other run
    goes to its end while this one writes its prompts."""
    import runner

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(4)])
    real, other = jobs._write_prompts, []

    def write_prompts(*args, **kwargs):
        if not other:
            other.append("running")  # the other run's own prompts go straight through
            other[0] = runner.run(prompts, tiny_gpt2, PARAMS, echo=None)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "_write_prompts", write_prompts)
    job, summary = runner.run(prompts, tiny_gpt2, PARAMS, echo=None)
    theirs, their_summary = other[0]
    assert job.id == theirs.id and their_summary.finished and their_summary.generated == 4
    assert summary.finished and summary.generated == 0
    assert [p.name for p in jobdir.job_folders(runner_home)] == [job.id]
    assert not [p for p in runner_home.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(jobs, "_write_prompts", real)
    params = GenerationParams(max_new_tokens=2)
    cancelled, summary = runner.run(prompts, tiny_gpt2, params, echo=None, stop=lambda: True)
    assert not summary.finished
    runner.cancel(cancelled.dir)
    again, summary = runner.run(prompts, tiny_gpt2, params, echo=None)
    assert again.id != cancelled.id and summary.generated == 4
    claims = {p.name: json.loads(p.read_text())["job"] for p in (runner_home / jobs.NAMES).glob("~*.json")}
    assert sorted(claims.values()) == sorted([job.id, cancelled.id, again.id])
    assert claims[max(n for n, held in claims.items() if held != job.id)] == again.id


def test_a_submit_that_slept_past_its_claim_moves_no_second_job_in(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """Adversarial pass 15: submit A claimed night1 and was frozen before moving its job into the home (a
    suspended VM) until its claim was stale; submit B took the claim over and stored its job; A woke and moved a
    second night1 in (every later command by name failed, `runner work` computed both). The takeover now sets
    A's temp folder aside first, so A finds it gone and returns B's job."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"hello {i}"} for i in range(3)])
    real_claim, other = jobs._claim_name, []

    def claim_name(root, claim, *args):
        held = real_claim(root, claim, *args)
        if held is None and not other:  # A holds the claim; it sleeps past STALE_CLAIM_SECONDS; B submits
            path = root / jobs.NAMES / "night1.0.json"
            old = time.time() - jobs.STALE_CLAIM_SECONDS - 5
            os.utime(path, (old, old))
            other.append(None)  # B's own claim is not A's
            other[0] = create_job(
                prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1"
            )
        return held

    monkeypatch.setattr(jobs, "_claim_name", claim_name)
    a = create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    folders = [p.name for p in jobdir.job_folders(runner_home)]
    assert folders == [other[0].id] and a.id == other[0].id  # one night1: B's, which A returns
    assert not [p for p in runner_home.iterdir() if p.name.startswith(".") and p.name != jobs.NAMES]


def test_a_taken_over_submit_folder_left_behind_is_cleaned_up(runner_home):
    """The takeover deletes the temp folder it set aside at once; where that failed (a busy mount), the next
    submit or `runner work` deletes it, whoever its submit was (it never moves that folder in). A live submit's
    own temp folder stays."""
    runner_home.mkdir(parents=True, exist_ok=True)
    live = runner_home / jobdir.submit_temp_name("20260101-000000-abcdef")  # this process: alive
    aside = runner_home / (jobdir.submit_temp_name("20260101-000001-abcdef") + jobdir.TAKEN_OVER)
    for folder in (live, aside):
        folder.mkdir()
        (folder / "prompts.parquet").write_bytes(b"rows")
    assert jobdir.remove_dead_submits(runner_home) == 1
    assert live.is_dir() and not aside.exists()


def test_a_claims_temp_file_left_by_a_stopped_submit_is_tidied(tmp_path, tiny_gpt2, runner_home):
    """Pass 70: a stop landing before a claim's temp file was removed left it in .names/ for good (the job
    folders' temp files are swept, the home's claims folder was not). One older than TEMP_MAX_AGE goes at the
    next named submit; a young one (a submit writing it now) stays."""
    from runner import storage

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    names = runner_home / jobs.NAMES
    names.mkdir(parents=True)
    left, young = (Path(storage.temp_name(names / f"{n}.0.json")) for n in ("night1", "night2"))
    for p in (left, young):
        p.write_text('{"job": "x"}\n')
    old = time.time() - jobdir.TEMP_MAX_AGE - 5
    os.utime(left, (old, old))
    create_job(prompts, tiny_gpt2, PARAMS, EngineOptions(), home=runner_home, name="night1")
    assert (left.exists(), young.exists()) == (False, True)
