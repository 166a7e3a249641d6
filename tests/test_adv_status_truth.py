"""Adversarial: what `runner status` (and `runner.status`, `runner report`) says of workers and progress, held
against the processes it describes (pass 212): a worker stopped by SIGSTOP or Ctrl-Z on this machine, one killed
and not reaped yet (a zombie), a pid reused by another process, two workers of one job with one stopped, a
frozen job beside a running one, a worker on another machine, an ETA at a rate of zero.

The workers here are heartbeats written as a worker writes them, naming a real child process of the test (so that
/proc says what that process is): a child that blocks on its stdin, stopped, killed or left running."""

import contextlib
import signal
import socket
import subprocess
import sys
import time

import pytest

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.jobdir import Heartbeat, Owner
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=4)
OPTIONS = EngineOptions(batch_size=2)
ROWS = 8


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"id": "r{i}", "prompt": "The old man said {i}"}}\n' for i in range(ROWS)))
    return path


@pytest.fixture
def job(prompts, tiny_gpt2, runner_home):
    return create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=2, name="night")


def proc_state(pid):
    return jobdir.process_state(pid)


def wait_until(cond, what, timeout=30.0):
    """Polls a process's state as /proc shows it (a signal is delivered asynchronously): an event, not a pause
    that decides anything."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def child():
    """A process of this machine that waits on its stdin until the test ends it."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc
    finally:
        with contextlib.suppress(OSError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


def stop(proc):
    proc.send_signal(signal.SIGSTOP)
    wait_until(lambda: proc_state(proc.pid) in ("T", "t"), "the child to stop")


def owner_of(proc, worker, boot=None):
    """The owner a worker running as `proc` writes in its heartbeat and claims (another machine's: `boot`)."""
    here = boot is None
    return Owner(worker, socket.gethostname(), proc.pid, storage.boot_id() if here else boot,
                 storage.pid_namespace() if here else "pid:[1]", jobdir._pid_start(proc.pid))  # fmt: skip


def beat(job, owner, rows_per_second=2.0, tokens_per_second=40.0, **info):
    """The heartbeat of a worker that computes at these speeds (as worker.update_heartbeat writes it)."""
    info = {"device": "cpu", "rows": 4, "unsaved": 0, "rows_per_second": rows_per_second,
            "tokens_per_second": tokens_per_second, "peak_memory_bytes": 2**20, **info}  # fmt: skip
    Heartbeat(job, owner, ttl=120, info=info).beat()


@pytest.mark.slow
def test_a_worker_killed_and_not_reaped_yet_is_no_live_worker(job):
    """A worker killed -9 whose parent has not waited for it yet (a zombie: `runner work --workers N` between two
    looks, a notebook's Popen never polled) holds no live lease, as one reaped does."""
    with child() as proc:
        beat(job, owner_of(proc, "w-killed"))
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda: proc_state(proc.pid) == "Z", "the child to be a zombie")
        assert Owner.from_dict(owner_of(proc, "w-killed").as_dict()).provably_dead()
        st = runner.status(job.dir)
        assert st.state == "queued" and not st.workers and st.tokens_per_second is None, st
        proc.wait()
        st = runner.status(job.dir)
        assert st.state == "queued" and not st.workers, st


@pytest.mark.slow
def test_a_worker_whose_main_thread_alone_ended_is_still_a_live_worker(job):
    """The group leader of a process whose main thread ended while its other threads run on shows as a zombie in
    /proc too: that process lives, and holds its lease."""
    code = ("import ctypes, sys, threading; threading.Thread(target=sys.stdin.read).start(); "
            "ctypes.CDLL(None).pthread_exit(None)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        wait_until(lambda: proc_state(proc.pid) == "Z", "its main thread to end")
        owner = owner_of(proc, "w-threads")
        beat(job, owner)
        assert not owner.provably_dead()
        st = runner.status(job.dir)
        assert st.state == "running" and [w["worker"] for w in st.workers] == ["w-threads"], st
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_heartbeat_whose_pid_now_belongs_to_another_process_is_no_worker(job):
    with child() as proc:
        owner = owner_of(proc, "w-reused")
        # the pid of a process started later than the worker that wrote the heartbeat (another start time)
        beat(
            job,
            Owner(owner.worker, owner.host, owner.pid, owner.boot, owner.pidns, str(int(owner.start) - 1)),
        )
        st = runner.status(job.dir)
        assert st.state == "queued" and not st.workers, st
        stop(proc)
        st = runner.status(job.dir)
        assert st.state == "queued" and not st.workers, st
