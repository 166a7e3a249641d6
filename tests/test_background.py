"""`runner work --background` (a detached worker, output in HOME/logs/) and `runner watch` (status lines until the
job ends): the notebook kernel stays free while the work goes on."""

import dataclasses
import os
import re
import shlex
import time

import pytest
from helpers import PROMPTS, invoke, write_jsonl

import runner
from runner import GenerationParams, background, storage
from runner.background import IDLE_POLLS, running


@pytest.mark.slow  # a real worker process
def test_background_work_and_watch_until_completed(tmp_path, tiny_gpt2):
    home = tmp_path / "home"
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=4), home=home)
    result = invoke("--home", home, "work", "--background", "--once")
    assert result.exit_code == 0, result.output
    assert "working in the background (pid" in result.output and "runner watch JOB" in result.output
    lines = []
    final = runner.watch(job.id, home, every=0.1, echo=lines.append)  # polls until the job ends
    assert final.state == "completed" and final.done == final.total == len(PROMPTS)
    assert lines[-1].split()[2] == "completed:" and len(runner.load_results(job.id, home)) == len(PROMPTS)
    (log,) = (home / "logs").glob("work-*.log")
    assert job.id in log.read_text()
    from runner.background import _CHILDREN

    _CHILDREN[-1].wait()  # the process exits once it completed the job (--once); then it no longer counts
    assert not running(home)
    n = len(PROMPTS)
    result = invoke("--home", home, "watch", job.id, "--every", 0.1)
    assert result.exit_code == 0 and f"completed: {n}/{n}" in result.output


def test_watch_says_so_when_no_worker_runs_the_job(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.delenv("RUNNER_HOME")  # the home given as --home only
    home = tmp_path / "home"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home)
    lines, sleeps = [], []
    from runner.background import watch

    final = watch(job.id, home, every=5, echo=lines.append, sleep=sleeps.append)
    assert final.state == "queued" and len(sleeps) == IDLE_POLLS - 1
    # the command names the home the job is in (pasted without it, it looked in ./jobs: pass 44)
    assert lines[-1] == (f"no worker is running job {job.id}: start one with `runner --home {home} work` (or add "
                         "--background)")  # fmt: skip
    result = invoke("--home", home, "watch", job.id, "--every", 0.01)
    assert result.exit_code == 1 and "no worker is running job" in result.output
    pasted = re.search(r"`runner (.+?)`", lines[-1]).group(1)
    assert "completed" in invoke(*shlex.split(pasted)).output


def test_a_job_whose_model_is_loading_shows_its_worker(tmp_path, tiny_gpt2, monkeypatch):
    """`runner work` loaded the model before its heartbeat: for the whole load (minutes for a big model on Colab)
    status said "queued" with no worker and `runner watch` gave up ("no worker is running job"), so users started
    a second worker (pass 33). Checked while the model loads, from inside the load."""
    from runner.background import watch
    from runner.scheduler import Engines

    home = tmp_path / "home"
    job = runner.submit(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2,
                        GenerationParams(max_new_tokens=2), home=home)  # fmt: skip
    seen, real = [], Engines.get

    class StillWatching(Exception):
        pass

    def poll(seconds):
        polls.append(seconds)
        if len(polls) > IDLE_POLLS:  # it would have given up by now without a worker
            raise StillWatching

    def loading(self, j):
        s = runner.status(job.id, home)
        with pytest.raises(StillWatching):
            watch(job.id, home, every=5, echo=None, sleep=poll)
        seen.append((s.state, len(s.workers)))
        return real(self, j)

    polls = []
    monkeypatch.setattr(Engines, "get", loading)
    assert invoke("--home", home, "work").exit_code == 0
    assert seen == [("running", 1)] and runner.status(job.id, home).state == "completed"


class _FakeProc:
    """Stands for a started worker process that is still running."""

    def __init__(self, pid):
        self.pid = pid

    def poll(self):
        return None


def test_two_background_workers_started_in_the_same_second_keep_their_own_log_and_pid(tmp_path, monkeypatch):
    """Two workers started from one kernel within one second: the log / pid names carry a random suffix (not the
    starting process's pid), and each pid file records its own worker's pid."""
    pids = iter([40001, 40002])
    monkeypatch.setattr(background.subprocess, "Popen", lambda *a, **kw: _FakeProc(next(pids)))
    monkeypatch.setattr(background.time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second
    monkeypatch.setattr(background, "_CHILDREN", [])
    home = tmp_path / "home"
    a = background.start(["--once"], home)
    b = background.start(["--once"], home)
    assert a.log != b.log
    assert sorted(w.pid for w in background.running(home)) == [40001, 40002]


def test_watch_is_not_kept_waiting_by_a_stale_pid_file_whose_pid_was_reused(tmp_path, tiny_gpt2):
    """A pid file (an older runner's, with no start time) stays in HOME/logs after its worker exits; once the pid
    is reused by an unrelated process (a VM restart on Colab starts numbering again; the home lives on Drive),
    `watch` must not count it as a worker forever."""
    home = tmp_path / "home"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "logs" / "work-20250101-000000-1.pid").write_text(str(os.getppid()))  # a live non-runner process

    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) > 20:
            raise AssertionError("watch keeps waiting for a worker that is not one")

    final = background.watch(job.id, home, every=1, echo=None, sleep=sleep)
    assert final.state == "queued" and len(polls) < background.IDLE_POLLS + 1


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from /proc")
def test_a_pid_file_whose_start_time_does_not_match_is_stale_and_removed(tmp_path):
    """The pid is alive (this process) but started at another time than the pid file says: a reused pid."""
    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    started = int(background._pid_start(os.getpid()))
    (logs / "work-20250101-000000-aaaaaa.pid").write_text(f"{os.getpid()} {started + 1}")
    (logs / "work-20250101-000000-bbbbbb.pid").write_text(f"{os.getpid()} {started}")
    assert [w.log.name for w in running(tmp_path / "home")] == ["work-20250101-000000-bbbbbb.log"]
    assert sorted(p.name for p in logs.glob("*.pid")) == ["work-20250101-000000-bbbbbb.pid"]


def test_watch_of_a_failed_job_says_why_in_its_last_line(tmp_path, tiny_gpt2, monkeypatch):
    home = tmp_path / "home"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home)
    failed = dataclasses.replace(runner.status(job.id, home), state="failed", message="CUDA out of memory")
    monkeypatch.setattr(runner.api, "status", lambda *a, **kw: failed)
    lines = []
    assert background.watch(job.id, home, echo=lines.append).state == "failed"
    assert lines[-1].endswith(f"{job.id} failed: 0/1 | - tok/s | ETA - | CUDA out of memory")


def test_ctrl_c_on_watch_and_an_empty_home_say_what_they_are(tmp_path, tiny_gpt2, monkeypatch):
    """Ctrl-C on `runner watch` said "finished batches are kept: run the same command again", so users thought
    the job had stopped (its workers go on); `runner status` of an empty home said "no jobs" without naming
    the home, after a submit with --home on Drive (pass 33)."""
    home = tmp_path / "home"
    job = runner.submit(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2,
                        GenerationParams(max_new_tokens=2), home=home)  # fmt: skip

    def ctrl_c(status):
        raise KeyboardInterrupt  # as a Ctrl-C lands during a poll

    monkeypatch.setattr(background, "status_line", ctrl_c)
    result = invoke("--home", home, "watch", job.id)
    assert (
        result.exit_code == 130
        and "interrupted (only the watching: the job's workers go on)" in result.stderr
    )
    assert "finished batches" not in result.stderr
    monkeypatch.delenv("RUNNER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    said = invoke("status").stdout
    assert said.strip() == "no jobs in jobs (the default job home; --home DIR or $RUNNER_HOME for another)"
    (tmp_path / "other").mkdir()
    assert invoke("--home", tmp_path / "other", "status").stdout.strip() == f"no jobs in {tmp_path / 'other'}"


def test_watch_prints_a_line_when_it_changes_and_once_a_minute_otherwise(tmp_path, tiny_gpt2, monkeypatch):
    """Pass 85: workers beat every lease/4 (30 s), so a line every 10 s said the same thing three times, its ETA
    frozen, and read as a stuck job."""
    import dataclasses

    import runner.api
    from runner.background import watch

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=2), home=tmp_path / "home")
    base = dataclasses.replace(runner.status(job.dir), state="running", workers=[{"worker": "w"}])
    seen = [base] * 8 + [dataclasses.replace(base, done=1)] + [dataclasses.replace(base, state="completed")]
    monkeypatch.setattr(runner.api, "status", lambda job, home: seen.pop(0))
    lines = []
    watch(job.id, every=10, echo=lines.append, sleep=lambda s: None)
    # the first look, the same a minute later (the 7th), the change, the end
    assert [line.split(" ", 1)[1].split(":")[0] for line in lines] == [f"{job.id} running"] * 3 + [
        f"{job.id} completed"
    ]
    assert len(lines) == 4 and " 0/1 " not in lines[2]


def test_another_machines_pid_file_is_left_alone(tmp_path):
    """Two VMs share a home on Drive: a pid file of the other's background worker names a pid that means
    nothing here; `running` (run by every `watch`) deleted it as a dead worker's (adversarial pass 111)."""
    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    dead_here = 2**22 + 4321  # above pid_max: no such process on this machine
    (logs / "work-20250101-000000-aaaaaa.pid").write_text(f"{dead_here} 12345 0badc0de")  # another machine's
    (logs / "work-20250101-000000-bbbbbb.pid").write_text(f"{dead_here} 12345 {storage.namespace_tag()}")
    (logs / "work-20250101-000000-aaaaaa.log").write_text("working\n")
    assert running(tmp_path / "home") == []
    assert [p.name for p in logs.glob("*.pid")] == ["work-20250101-000000-aaaaaa.pid"]  # this machine's went
    two_days_ago = time.time() - 2 * 86400  # its log quiet for days (or a VM before a reboot): it goes too
    os.utime(logs / "work-20250101-000000-aaaaaa.log", (two_days_ago, two_days_ago))
    assert running(tmp_path / "home") == [] and not list(logs.glob("*.pid"))


def test_a_started_workers_pid_file_names_this_machine(tmp_path):
    """The pid file `start` writes is `PID START TAG`, and once its worker has ended `running` removes it."""
    home = tmp_path / "home"
    worker = background.start(["--help"], home=home)
    pid_file = worker.log.with_suffix(".pid")
    assert pid_file.read_text().split() == [str(worker.pid), worker.started or "-", storage.namespace_tag()]
    background._CHILDREN[-1].wait(timeout=120)
    assert running(home) == [] and not pid_file.exists()


def test_a_pid_file_that_does_not_read_once_is_read_again_not_skipped(tmp_path, monkeypatch):
    """A transient error reading a live background worker's pid file (its home on a Drive mount) is read again:
    skipped, `runner watch` would take the job for one no worker runs."""
    import errno
    import pathlib

    logs = tmp_path / "home" / "logs"
    logs.mkdir(parents=True)
    pid_file = logs / "work-20250101-000000-aaaaaa.pid"
    started = background._pid_start(os.getpid())
    pid_file.write_text(f"{os.getpid()} {int(started)} {storage.namespace_tag()}")
    real, failed = pathlib.Path.read_text, []

    def read_text(self, *args, **kwargs):
        if self == pid_file and not failed:
            failed.append(self)
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert [w.pid for w in running(tmp_path / "home")] == [os.getpid()] and failed


def test_watch_help_says_a_line_comes_when_the_status_changed_not_every_few_seconds():
    """`runner watch --every 5` printed a line each 30 s (a line only when the status changed; a worker renews
    its figures every 30 s), where its help said "Seconds between status lines" (a new user's pass 195)."""
    said = " ".join(invoke("watch", "--help").output.split())
    assert "Seconds between status lines" not in said
    assert "Seconds between looks at the job: a line when its status changed" in said


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from /proc")
def test_a_second_background_worker_on_this_machine_is_said_to_be_one_more(tmp_path, monkeypatch):
    """A notebook's cells run again after a disconnect that left the VM alive: `runner work --background`
    started a second worker beside the first without a word, a second copy of the model on the one GPU. It
    says so, naming the first; the first start says nothing of the kind."""
    pids = iter([os.getpid(), os.getppid()])  # (live processes: the first start's pid file counts as running)
    monkeypatch.setattr(background.subprocess, "Popen", lambda *a, **kw: _FakeProc(next(pids)))
    monkeypatch.setattr(background, "_CHILDREN", [])
    home = tmp_path / "home"
    first = invoke("--home", home, "work", "--background")
    assert first.exit_code == 0 and "already running" not in first.output, first.output
    second = invoke("--home", home, "work", "--background")
    assert second.exit_code == 0, second.output
    assert (
        f"note: 1 background worker of this job home is already running on this machine (pid {os.getpid()}): "
        f"this one is another, with its own copy of the model" in " ".join(second.output.split())
    ), second.output
    assert f"kill {os.getppid()} if one is enough" in " ".join(second.output.split())
