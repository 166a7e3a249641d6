"""Kill a real `runner work` process with SIGKILL (as Colab does) at random and at named instants, run it
again, and check the results are exactly-once and equal to an uninterrupted run."""

import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import workers
from helpers import assert_exactly_once, fresh_copy, prepared_job

import runner
import runner.jobs as jobs
from runner import EngineOptions, GenerationParams
from runner.jobdir import read_state
from runner.jobs import Job, create_job
from runner.results import valid_shards

pytestmark = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not

N_PROMPTS, N_SAMPLES = 24, 2
PARAMS = GenerationParams(max_new_tokens=12, temperature=1.0, num_return_sequences=N_SAMPLES, seed=1234)
OPTIONS = EngineOptions(batch_size=2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """A submitted job that nothing has run yet (copied per trial), and the uninterrupted reference results."""
    root = tmp_path_factory.mktemp("kill")
    words = "the old man said that every student reads a language model slowly".split()
    rows = [
        {"id": f"r{i:02d}", "prompt": " ".join(words[: 2 + i % len(words)]), "k": i} for i in range(N_PROMPTS)
    ]
    template, ref = prepared_job(root, tiny_gpt2, rows, PARAMS, OPTIONS)
    assert len(ref) == N_PROMPTS * N_SAMPLES
    return template, ref


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, prepared, tiny_gpt2):
    """The same job with its prompts in row groups of 5, so a worker goes through it in 5 windows."""
    root = tmp_path_factory.mktemp("kill-windows")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(jobs, "ROW_GROUP_ROWS", 5)
        job = create_job(Job.open(prepared[0]).meta["input"]["path"], tiny_gpt2, PARAMS, OPTIONS,
                         job_dir=root / "template")  # fmt: skip
    return job.dir, prepared[1]


def commits(job_dir: Path) -> int:
    done = job_dir / "done"
    return len([p for p in done.iterdir() if p.suffix == ".json"]) if done.exists() else 0


def wait_for_commits(job_dir: Path, target: int, proc, timeout=120.0) -> bool:
    """Block until the job has `target` commit markers (progress, not time); False if the worker ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if commits(job_dir) >= target:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("the worker made no progress in time")


def wait_for_generation(job_dir: Path, before: int, proc, timeout=120.0):
    """Block until this process has logged that it started generating (so a kill lands in the real work)."""
    log = job_dir / "log.txt"
    end = time.time() + timeout
    while time.time() < end:
        if log.exists() and " to generate on " in log.read_text()[before:]:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("worker did not start generating in time")


def log_size(job_dir):
    log = job_dir / "log.txt"
    return len(log.read_text()) if log.exists() else 0


def finish(home, job_dir, ref):
    proc = workers.start_worker(home)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert read_state(job_dir).state == "completed", out
    assert_exactly_once(job_dir, ref)


def test_sigkill_at_random_instants(tmp_path, prepared, windowed):
    """Every other round runs the job with its prompts in 5 row groups, so kills land in and between the
    worker's windows too; the results match the run of the whole table as one window. Kills are triggered by
    progress (0-3 new commits after the worker starts generating), then land a random instant later inside
    the next batch or commit: never on a timer alone, so a slow machine changes nothing but the wait."""
    rng = random.Random(20261122)
    kills = progressed = windowed_kills = 0
    rounds = 0
    while kills < 20:
        rounds += 1
        template = windowed if rounds % 2 == 0 else prepared
        home, job_dir = fresh_copy(tmp_path / f"round{rounds}", template[0])
        assert pq.read_metadata(job_dir / "prompts.parquet").num_row_groups == (5 if rounds % 2 == 0 else 1)
        for _ in range(5):
            before = log_size(job_dir)
            proc = workers.start_worker(home)
            if not wait_for_generation(job_dir, before, proc):
                proc.wait()
                break  # the job finished before this start reached generation: nothing left to kill
            if not wait_for_commits(job_dir, commits(job_dir) + rng.randint(0, 3), proc):
                proc.wait()
                break  # it finished before that much progress: nothing left to kill
            time.sleep(rng.uniform(0, 0.05))  # jitter only: where in the next batch or commit it lands
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                windowed_kills += template is windowed
            done = assert_exactly_once(job_dir, prepared[1], complete=False)
            progressed += done > 0
        finish(home, job_dir, prepared[1])
    assert kills >= 20 and progressed > 0 and windowed_kills > 0


@pytest.mark.parametrize("point", ["after_generate", "mid_write", "after_shard"])
def test_sigkill_at_named_points(tmp_path, prepared, point):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    proc = workers.start_worker(home, env_extra={"RUNNER_FAULT": f"{point}:3"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    counted = {s.name for s in valid_shards(job_dir)}
    on_disk = {p.name for p in (job_dir / "shards").iterdir()}
    if point == "after_shard":
        assert len(on_disk - counted) == 1  # the shard without its marker is on disk and does not count
    if point == "mid_write":
        assert any(p.startswith(".") for p in on_disk)  # a half-copied temp file, never counted
    assert_exactly_once(job_dir, prepared[1], complete=False)
    finish(home, job_dir, prepared[1])


def test_ctrl_c_finishes_the_batch_and_stops_cleanly(tmp_path, prepared):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    proc = workers.start_worker(home)
    assert wait_for_generation(job_dir, 0, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out  # interrupted: a script or notebook can tell
    if "completed" not in out:  # unless the whole job beat the signal
        assert "stopping after the current batch" in out and "run `runner work` again" in out
        assert read_state(job_dir).state == "queued"
        assert runner.status(job_dir).state == "queued (interrupted)"
        assert not list((job_dir / "workers").iterdir())  # its heartbeat went with it
    finish(home, job_dir, prepared[1])


# `python -m runner` with SIGHUP's disposition set first (one inherited from the test run, say CI under nohup,
# would otherwise decide): default, as in a terminal, or ignored, as under `nohup`
HUP = "import runpy, signal; signal.signal(signal.SIGHUP, signal.{}); runpy.run_module('runner', run_name='__main__')"


@pytest.mark.parametrize(
    ("sig", "code_said"),
    [("SIGINT", (130, "stopping after the current batch")), ("SIGTERM", (143, "terminated (SIGTERM)")),
     ("SIGHUP", (129, "hung up (SIGHUP: its terminal closed)"))],
)  # fmt: skip
def test_ctrl_c_on_runner_run_writes_the_finished_batches_and_the_same_command_carries_on(
    tmp_path, prepared, sig, code_said
):
    """Ctrl-C on `runner run` (found by a user walkthrough: click's "Aborted!", exit 1, and every row of the
    run lost, since none was in a shard yet): it finishes and writes the current batch, exits 130 saying how to
    carry on, and the same command then finishes the job, each row once. The Ctrl-C comes after the second
    batch is generated (RUNNER_FAULT=after_generate:2:SIGINT), so exactly two batches of two are written.
    SIGTERM (`kill PID`, `docker stop`, a preemption) stops at once and writes them too, exit 143: it killed
    the process as a silent crash does (adversarial pass 26); so does SIGHUP (the terminal closed: every
    finished row was lost, without a word), exit 129."""
    job = Job.open(prepared[0])
    out = tmp_path / "out"
    args = ("run", job.meta["input"]["path"], "-m", job.spec.model, "--max-new-tokens", "12", "--temperature", "1.0",
            "-n", "2", "--seed", "1234", "--batch-size", "2", "-o", out)  # fmt: skip
    prefix = ("-c", HUP.format("SIG_DFL"))
    code, output = workers.run_runner(
        *args, env_extra={"RUNNER_FAULT": f"after_generate:2:{sig}"}, prefix=prefix
    )
    assert code == code_said[0], output
    assert code_said[1] in output and "run the same command again" in output, output
    assert not (out / "inflight").exists() or not list((out / "inflight").iterdir())  # no crash to isolate
    assert "Aborted" not in output and "Traceback" not in output
    assert runner.status(out).done == 4
    code, output = workers.run_runner(*args)
    assert code == 0, output
    assert_exactly_once(out, prepared[1])


def test_a_hang_up_under_nohup_is_no_stop(tmp_path, prepared):
    """`nohup runner work &` ignores SIGHUP so that closing the terminal does not stop it: runner keeps that."""
    job = Job.open(prepared[0])
    out = tmp_path / "out"
    args = ("run", job.meta["input"]["path"], "-m", job.spec.model, "--max-new-tokens", "12", "--temperature", "1.0",
            "-n", "2", "--seed", "1234", "--batch-size", "2", "-o", out)  # fmt: skip
    code, output = workers.run_runner(
        *args, env_extra={"RUNNER_FAULT": "after_generate:2:SIGHUP"}, prefix=("-c", HUP.format("SIG_IGN"))
    )
    assert code == 0 and "hung up" not in output, output
    assert_exactly_once(out, prepared[1])
