"""Adversarial: runner.work_in_background / runner.watch (runner/background.py)."""

import os

from helpers import write_jsonl

import runner
from runner import GenerationParams, background


class _FakeProc:
    """Stands for a started worker process that is still running."""

    def __init__(self, pid):
        self.pid = pid

    def poll(self):
        return None


def test_two_background_workers_started_in_the_same_second_keep_their_own_log_and_pid(tmp_path, monkeypatch):
    """The log / pid file name is work-TIME-PID where PID is the *starting* process's pid (the notebook
    kernel), not the worker's: two workers started from one kernel within one second share one log and the
    second pid file overwrites the first, so `running()` sees one worker of two."""
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
    """A pid file stays in HOME/logs after its worker exits, and liveness is `kill(pid, 0)` only: once the pid
    is reused by an unrelated process (a VM restart on Colab starts numbering again; the home lives on Drive),
    `watch` counts it as a worker forever and never says that no worker runs the job."""
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
