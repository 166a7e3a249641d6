"""Adversarial: what `runner status` (and `runner.status`, `runner report`) says of workers and progress, held
against the processes it describes (pass 212): a worker stopped by SIGSTOP or Ctrl-Z on this machine, one killed
and not reaped yet (a zombie), a pid reused by another process, two workers of one job with one stopped, a
frozen job beside a running one, a worker on another machine, an ETA at a rate of zero.

The workers here are heartbeats written as a worker writes them, naming a real child process of the test (so that
/proc says what that process is): a child that blocks on its stdin, stopped, killed or left running."""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import workers
from helpers import assert_exactly_once, fresh_copy, invoke, prepared_job

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.background import status_line
from runner.job_status import home_status, status_table
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
def test_a_worker_stopped_on_this_machine_is_said_stopped_its_speed_and_eta_not_live(job):
    with child() as proc:
        beat(job, owner_of(proc, "w-frozen"))
        st = runner.status(job.dir)
        assert st.state == "running" and st.tokens_per_second == 40.0 and st.eta_seconds is not None
        stop(proc)
        st = runner.status(job.dir)
        assert st.state == "stopped", st
        assert st.tokens_per_second is None and st.eta_seconds is None and st.eta == "-"
        assert [w["state"] for w in st.workers] == ["stopped"]
        assert st.workers[0]["tokens_per_second"] is None
        assert f"kill -CONT {proc.pid}" in st.message and "w-frozen" in st.message
        table = status_table([st])
        assert "stopped" in table and "40.0" not in table
        assert "stopped: 0/8 | - tok/s | ETA - | 1 worker (1 stopped)" in status_line(st)
        # (of a job that still runs, the rows so far; not "computed only after `runner retry`")
        with pytest.warns(UserWarning, match="is stopped: .*the rest are not computed yet"):
            runner.load_results(job.dir)
        r = invoke("status")
        assert r.exit_code == 0 and f"{st.id}: {st.message}" in r.output, r.output
        r = invoke("status", str(job.dir))
        out = r.output
        assert r.exit_code == 0 and "ETA -" in out and "40.0" not in out and "stopped" in out, out
        proc.send_signal(signal.SIGCONT)
        wait_until(lambda: proc_state(proc.pid) not in ("T", "t"), "the child to go on")
        st = runner.status(job.dir)
        assert st.state == "running" and st.tokens_per_second == 40.0 and st.workers[0]["state"] == "running"


@pytest.mark.slow
def test_two_workers_one_stopped_the_speed_and_eta_are_the_running_ones(job):
    with child() as a, child() as b:
        beat(job, owner_of(a, "w-a"), rows_per_second=1.0, tokens_per_second=10.0)
        beat(job, owner_of(b, "w-b"), rows_per_second=3.0, tokens_per_second=30.0)
        stop(a)
        st = runner.status(job.dir)
        assert st.state == "running"
        assert st.tokens_per_second == 30.0
        assert st.eta_seconds == pytest.approx(ROWS / 3.0)
        assert {w["worker"]: w["state"] for w in st.workers} == {"w-a": "stopped", "w-b": "running"}
        assert st.worker == "w-b"  # (the running one: w-a, first by name, was named)
        assert "w-a" in st.message and f"kill -CONT {a.pid}" in st.message
        assert "2 (1 stopped)" in status_table([st])


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


@contextlib.contextmanager
def main_thread_ended():
    """A process whose main thread ended while another of its threads runs on (its group leader a zombie)."""
    code = ("import ctypes, sys, threading; threading.Thread(target=sys.stdin.read).start(); "
            "ctypes.CDLL(None).pthread_exit(None)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        wait_until(lambda: proc_state(proc.pid) == "Z", "its main thread to end")
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("tasks", ["listed", "unreadable"])
def test_a_worker_whose_main_thread_alone_ended_is_still_a_live_worker(job, monkeypatch, tasks):
    """The group leader of a process whose main thread ended while its other threads run on shows as a zombie in
    /proc too: that process lives, and holds its lease. Its /proc task list failing to read (EIO, as /proc gives
    while a task is torn down elsewhere, or a FUSE /proc in a sandbox) proves nothing either: the list was taken
    as "reaped meanwhile", and a process whose writer thread was mid-shard lost its units to another worker."""
    real = os.listdir
    with main_thread_ended() as proc:

        def listdir(path="."):
            if str(path) == f"/proc/{proc.pid}/task":
                raise OSError(errno.EIO, "Input/output error", str(path))
            return real(path)

        owner = owner_of(proc, "w-threads")
        beat(job, owner)
        if tasks == "unreadable":
            monkeypatch.setattr(os, "listdir", listdir)
        assert not owner.provably_dead()
        st = runner.status(job.dir)
        assert st.state == "running" and [w["worker"] for w in st.workers] == ["w-threads"], st


# In a PID namespace of its own whose /proc is still the parent's (`unshare --pid --fork` without --mount-proc):
# the next pid made `pid` (ns_last_pid), a worker started there writes its heartbeat, and a reader there judges it
IN_NAMESPACE = """
import json, subprocess, sys
import runner
from runner.jobdir import Heartbeat, Job, Owner
pid, job = int(sys.argv[1]), Job.open(sys.argv[2])
try:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
except OSError as e:
    sys.exit(f"SETUP: cannot choose the next pid here ({e})")
code = "import json, sys; from runner.jobdir import Owner; print(json.dumps(Owner.me('w-ns').as_dict()), flush=True); sys.stdin.read()"
w = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
owner = Owner.from_dict(json.loads(w.stdout.readline()))
Heartbeat(job, owner, ttl=120, info={"device": "cpu", "rows": 0}).beat()
seen = {"pid": w.pid, "dead": owner.provably_dead(), "stopped": owner.provably_stopped(),
        "workers": [x["worker"] for x in runner.status(job.dir).workers]}
print(json.dumps(seen), flush=True)
w.stdin.close(); w.wait()
"""


@pytest.mark.slow
def test_a_worker_in_a_pid_namespace_whose_proc_is_the_parents_is_not_judged_by_another_process(job):
    """Under `unshare --pid --fork` without --mount-proc, /proc/PID is the parent namespace's process PID, not
    this namespace's: a live worker there whose pid was, in the parent namespace, a zombie was provably dead (and
    one whose pid there was stopped, stopped), and its units were taken over while it computed them."""
    with child() as zombie:
        zombie.send_signal(signal.SIGKILL)
        wait_until(lambda: proc_state(zombie.pid) == "Z", "the child to be a zombie")
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        try:
            done = subprocess.run(["unshare", *user, "--pid", "--fork", sys.executable, "-c", IN_NAMESPACE,
                                   str(zombie.pid), str(job.dir)], capture_output=True, text=True,
                                  env=workers.worker_env(), timeout=120)  # fmt: skip
        except FileNotFoundError:
            pytest.skip("no unshare")
        # (sandboxes differ: no user or PID namespaces, no ns_last_pid, another pid taken first)
        if done.returncode != 0 and ("unshare:" in done.stderr or "SETUP:" in done.stderr):
            pytest.skip(f"no PID namespace of this kind here: {done.stderr.strip()[-200:]}")
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
        if seen["pid"] != zombie.pid:
            pytest.skip(f"the worker in the namespace got pid {seen['pid']}, not {zombie.pid}")
        assert not seen["dead"] and not seen["stopped"] and seen["workers"] == ["w-ns"], seen


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


@pytest.mark.slow
def test_a_stopped_worker_of_another_machine_cannot_be_told_and_shows_as_running(job):
    with child() as proc:
        stop(proc)
        beat(job, owner_of(proc, "w-far", boot="another-boot"))
        st = runner.status(job.dir)
        assert st.state == "running" and st.workers[0]["state"] == "running" and st.tokens_per_second == 40.0


@pytest.mark.slow
def test_a_frozen_job_beside_a_running_one_in_the_home(job, prompts, tiny_gpt2, runner_home):
    other = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=3), OPTIONS, home=runner_home,
                       unit_rows=2, name="day")  # fmt: skip
    with child() as a, child() as b:
        beat(job, owner_of(a, "w-frozen"))
        beat(other, owner_of(b, "w-busy"), rows_per_second=4.0, tokens_per_second=80.0)
        stop(a)
        by_name = {s.name: s for s in home_status(runner_home)}
        assert by_name["night"].state == "stopped" and by_name["night"].eta_seconds is None
        assert by_name["day"].state == "running" and by_name["day"].tokens_per_second == 80.0
        assert by_name["day"].eta_seconds == pytest.approx(ROWS / 4.0) and by_name["day"].message is None


@pytest.mark.slow
def test_a_running_worker_at_a_rate_of_zero_has_no_eta(job):
    with child() as proc:
        beat(job, owner_of(proc, "w-slow"), rows_per_second=0.0, tokens_per_second=0.0)
        st = runner.status(job.dir)
        assert (
            st.state == "running"
            and st.eta_seconds is None
            and st.eta == "-"
            and st.tokens_per_second is None
        )


@pytest.mark.slow
def test_the_report_says_a_stopped_worker_is_stopped_not_running_now(job, tmp_path):
    from runner.job_report import write_report

    with child() as proc:
        beat(job, owner_of(proc, "w-frozen"))
        stop(proc)
        out = tmp_path / "r.html"
        write_report(job, out)
        html = out.read_text()
        assert "<td>running now</td>" not in html and "<td>stopped now</td><td>w-frozen</td>" in html


@pytest.mark.slow
def test_a_real_worker_stopped_at_its_second_shard_shows_stopped_then_finishes_once(tmp_path, tiny_gpt2):
    """`runner work` stopping itself (SIGSTOP) after its second shard (and each one after), looked at by `runner
    status` in another process: stopped, its pid named, no speed, ETA -; continued, it finishes the job exactly
    once."""
    rows = [{"id": f"a{i:02d}", "prompt": f"The old man said {i}"} for i in range(ROWS)]
    template, ref = prepared_job(tmp_path, tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=2)
    home, job_dir = fresh_copy(tmp_path, template)
    proc = workers.start_worker(home, shard_rows=1, env_extra={"RUNNER_FAULT": "after_shard:2:SIGSTOP"})
    try:
        wait_until(
            lambda: proc_state(proc.pid) in ("T", "t") or proc.poll() is not None, "the worker to stop", 300
        )
        assert proc.poll() is None, proc.communicate()[0]
        code, out = workers.run_runner("--home", home, "status")
        assert code == 0 and "Traceback" not in out, out
        assert f"`kill -CONT {proc.pid}` continues it" in out, out
        table = out.splitlines()[1].split()
        assert table[3] == "stopped" and table[5:7] == ["-", "-"] and table[8:10] == ["1", "(1"], out
        st = runner.status(job_dir)
        assert st.state == "stopped" and st.workers[0]["pid"] == proc.pid and 0 < st.done < st.total, st
    finally:
        proc.send_signal(signal.SIGCONT)
    # (the fault stops it again at each shard from its second on: continued each time)
    while proc.poll() is None:
        wait_until(lambda: proc_state(proc.pid) in ("T", "t", "Z", None), "the worker to stop or end", 300)
        proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert runner.status(job_dir).state == "completed"
    assert_exactly_once(job_dir, ref)


@pytest.mark.slow
def test_a_worker_waiting_for_units_held_by_a_stopped_worker_says_it_is_stopped(job):
    """`runner work` with nothing free but units a worker stopped on this machine holds said it waited "for it
    to finish": it says that worker is stopped, and how to continue it."""
    from runner import scheduler

    with child() as proc:
        owner = owner_of(proc, "w-frozen")
        beat(job, owner)
        for unit in range(job.spec.units):
            assert jobdir.take_unit(job, unit, owner, -1) == 0
        stop(proc)
        held = scheduler._held_elsewhere(job.dir.parent, job, "me")
        assert [h[2] for h in held] == [
            f"w-frozen, stopped on this machine (SIGSTOP or Ctrl-Z: `kill -CONT {proc.pid}` continues it)"
        ]
        proc.send_signal(signal.SIGCONT)
        wait_until(lambda: proc_state(proc.pid) not in ("T", "t"), "the child to go on")
        assert [h[2] for h in scheduler._held_elsewhere(job.dir.parent, job, "me")] == ["w-frozen"]


@pytest.mark.slow
def test_a_background_worker_whose_main_thread_alone_ended_is_still_running(tmp_path):
    """`running` (what `runner watch` looks at) took any zombie for a finished worker, without the look at its
    other threads the job's workers get: a worker whose main thread ended while a thread of it computed on lost
    its pid file, and `watch` said no worker ran the job."""
    from runner import background

    (tmp_path / "logs").mkdir()
    pid_file = tmp_path / "logs" / "work-20260101-000000-aaaaaa.pid"
    with main_thread_ended() as proc:
        pid_file.write_text(f"{proc.pid} {jobdir._pid_start(proc.pid)} {storage.namespace_tag()}")
        assert [w.pid for w in background.running(tmp_path)] == [proc.pid] and pid_file.exists()
    assert background.running(tmp_path) == [] and not pid_file.exists()


def foreign_proc(monkeypatch, pid, state):
    """/proc is another PID namespace's (`unshare --pid` without --mount-proc): /proc/self is not this process
    and /proc/`pid` another process, in `state`."""
    import pathlib

    real_readlink, real_read_text = os.readlink, pathlib.Path.read_text
    stat = f"{pid} (other) {state} " + " ".join(["1"] * 49)

    def readlink(path, *args, **kwargs):
        return "1" if os.fspath(path) == "/proc/self" else real_readlink(path, *args, **kwargs)

    def read_text(self, *args, **kwargs):
        return stat if str(self) == f"/proc/{pid}/stat" else real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", readlink)
    monkeypatch.setattr(pathlib.Path, "read_text", read_text)


def test_a_proc_of_another_namespace_says_nothing_of_a_background_worker_or_a_stopped_child(
    tmp_path, monkeypatch
):
    """Where /proc/PID is another namespace's process, `running` took a live background worker whose pid was a
    zombie there for finished (and deleted its pid file), and `runner work --workers N` took a child reported
    stopped for continued where that other process ran (and never let it go): only kill() and the reports
    tell there."""
    from runner import background, cli

    (tmp_path / "logs").mkdir()
    pid_file = tmp_path / "logs" / "work-20260101-000000-aaaaaa.pid"
    pid_file.write_text(f"{os.getpid()} - {storage.namespace_tag()}")
    foreign_proc(monkeypatch, os.getpid(), "Z")
    assert [w.pid for w in background.running(tmp_path)] == [os.getpid()] and pid_file.exists()
    foreign_proc(monkeypatch, os.getpid(), "S")
    assert jobdir.process_state(os.getpid()) is None and cli._still_stopped(os.getpid())


@contextlib.contextmanager
def traced_child():
    """A process of this machine stopped by its tracer (this test: it asked to be traced, then stopped itself),
    as under strace or gdb: /proc says "t", and a SIGCONT of anyone else's leaves it stopped. None where this
    machine allows no tracing."""
    code = ("import ctypes, os, signal, sys\n"
            "if ctypes.CDLL(None, use_errno=True).ptrace(0, 0, 0, 0) != 0: sys.exit(3)\n"
            "os.kill(os.getpid(), signal.SIGSTOP); sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        # (not proc.poll(): the tracer's wait hears the stop, which Popen takes for the end)
        wait_until(lambda: proc_state(proc.pid) in ("t", "Z", None), "the child to be traced")
        yield proc if proc_state(proc.pid) == "t" else None
    finally:
        with contextlib.suppress(OSError):
            proc.kill()
        # (a tracer hears its tracee's stops as well as its end: waited for until it ends)
        while proc.returncode is None:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(proc.pid, 0)
                if os.WIFSTOPPED(status):
                    continue
            proc.returncode = -9


@pytest.mark.slow
def test_a_worker_stopped_by_a_tracer_is_not_told_to_be_continued_with_kill_cont(job):
    """A worker stopped under strace or gdb (/proc "t") was counted stopped, rightly, and status said `kill -CONT
    PID` continues it, which does nothing for a traced process: it says a debugger or tracer stopped it."""
    from runner import scheduler

    with traced_child() as proc:
        if proc is None:
            pytest.skip("this machine allows no tracing")
        owner = owner_of(proc, "w-traced")
        beat(job, owner)
        for unit in range(job.spec.units):
            assert jobdir.take_unit(job, unit, owner, -1) == 0
        proc.send_signal(signal.SIGCONT)  # (nothing for it: still stopped)
        st = runner.status(job.dir)
        assert st.state == "stopped" and st.workers[0]["state"] == "stopped", st
        assert "kill -CONT " + str(proc.pid) not in st.message, st.message
        assert (
            f"worker w-traced (pid {proc.pid}) is stopped on this machine by a debugger or tracer"
            in st.message
        )
        assert "goes on when the tracer continues it or detaches" in st.message
        held = scheduler._held_elsewhere(job.dir.parent, job, "me")
        assert [h[2] for h in held] == [f"w-traced, stopped on this machine by a debugger or tracer (strace, gdb: pid "
                                        f"{proc.pid}; it goes on when the tracer continues it or detaches)"]  # fmt: skip
