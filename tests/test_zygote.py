"""The fork server the slow tests' processes come from (tests/zygote.py) must behave as `python ...` does, or the
kill, crash and exit-code tests would test it instead of runner."""

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import workers
import zygote

pytestmark = pytest.mark.slow  # (real processes: make test, not test-fast)

PARENT = "import os; print(os.getppid(), end='')"
FORK = {"RUNNER_TEST_FORK": "1"}  # `python -c` forks only when asked


def forked(args, env_extra=FORK, **kw) -> subprocess.CompletedProcess:
    assert subprocess.Popen is zygote.ZygotePopen
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=workers.worker_env(env_extra),
                          **kw)  # fmt: skip


def parent_of(env_extra) -> int:
    return int(forked(["-c", PARENT], env_extra).stdout)


def test_the_environment_tests_pass_still_forks_late_in_the_session():
    """(This file runs last: a variable the session itself set meanwhile would make every command plain.)"""
    assert zygote.env_key(workers.worker_env({"RUNNER_FAULT": "x"})) == zygote.env_key(zygote.SERVER.env)


def test_exit_codes_output_and_argv_are_those_of_the_interpreter():
    done = forked(["-c", "import sys; print(sys.argv); print('e', file=sys.stderr); sys.exit(3)", "a", "b"])
    assert (done.returncode, done.stdout, done.stderr) == (3, "['-c', 'a', 'b']\n", "e\n")
    assert forked(["-c", "raise SystemExit('bye')"]).returncode == 1
    done = forked(["-c", "import sys; sys.stdout.write(repr(sys.stdin.read()))"], input="a\r\nb")
    assert done.stdout == repr("a\r\nb")


def test_only_commands_with_the_servers_environment_fork_from_it():
    for plain in (
        {},
        {**FORK, "OMP_NUM_THREADS": "7"},
        {**FORK, "HF_HOME": "/elsewhere"},
        {**FORK, "RUNNER_TEST_EXEC": "1"},
    ):
        assert parent_of(plain) == os.getpid(), plain  # a plain child of this process
    forks = zygote.SERVER.forked
    read_when_used = {
        "RUNNER_FAULT": "x",
        "PATH": "/nowhere:" + os.environ["PATH"],
        "SOME_TOOLS_SETTING": "1",
    }
    assert parent_of({**FORK, **read_when_used}) != os.getpid()
    assert zygote.SERVER.forked == forks + 1
    code = "import os; print(os.environ['RUNNER_FAULT'], os.getcwd(), end='')"
    done = forked(["-c", code], {**FORK, "RUNNER_FAULT": "x"}, cwd="tests")
    assert done.stdout == f"x {Path('tests').resolve()}"  # its own environment and working folder
    with pytest.raises(FileNotFoundError):
        forked(["-m", "runner", "status"], cwd="no-such-folder")


def test_an_uncaught_error_prints_the_interpreters_traceback_and_exits_1():
    done = forked(["-c", "raise ValueError('boom')"])
    assert done.returncode == 1 and "zygote" not in done.stderr
    assert done.stderr.startswith(
        'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
    )
    assert done.stderr.endswith("ValueError: boom\n")


def test_signals_reach_the_child_and_it_stays_a_zombie_until_waited_for():
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True, env=workers.worker_env(FORK))  # fmt: skip
    assert proc.stdout.readline() == "up\n" and proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    pidfd = os.pidfd_open(proc.pid)
    select.select([pidfd], [], [])  # (readable once it has died)
    os.close(pidfd)
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(") ", 1)[1][0]
    assert state == "Z"  # not reaped before this process waits, as a plain child
    assert proc.wait() == -signal.SIGKILL
    assert not Path(f"/proc/{proc.pid}").exists()  # reaped once wait() returns, as waitpid does
    proc.stdout.close()
    assert forked(["-c", "raise KeyboardInterrupt"]).returncode == -signal.SIGINT


def test_runner_runs_as_with_python_m(tmp_path):
    done = forked(["-m", "runner", "--home", str(tmp_path), "status"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = forked(["-m", "runner", "--no-such-option"])
    assert done.returncode == 2 and "No such option" in done.stderr


def test_a_file_given_as_stdout_stays_open_in_the_test(tmp_path):
    with open(tmp_path / "out.txt", "w") as f:
        assert subprocess.run([sys.executable, "-c", "print('to the file')"], stdout=f,
                              env=workers.worker_env(FORK)).returncode == 0  # fmt: skip
        f.write("and the test\n")
    assert (tmp_path / "out.txt").read_text() == "to the file\nand the test\n"
