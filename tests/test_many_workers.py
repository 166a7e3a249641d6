"""Several workers on one job: they share it by units, the job completes once, and the results equal one
worker's. In process (two workers in threads, with events deciding who does what), as `runner work --workers
3`, and under torchrun (one process per LOCAL_RANK)."""

import json
import signal
import threading
import time

import pytest
from helpers import assert_exactly_once, fresh_copy, prepared_job
from workers import run_runner

import runner
from runner import EngineOptions, GenerationParams
from runner.engine import Engine
from runner.jobdir import Job, Owner, read_ledger
from runner.jobs import create_job
from runner.worker import JobRun, run_job

PARAMS = GenerationParams(max_new_tokens=5, temperature=1.0, num_return_sequences=2, seed=5)
OPTIONS = EngineOptions(batch_size=2)
N = 18
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("many")
    rows = [{"id": f"q{i:02d}", "prompt": f"Every student reads {i}"} for i in range(N)]
    return prepared_job(root, tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=3)


def test_two_workers_share_a_job_by_units_and_it_completes_once(tmp_path, prepared, tiny_gpt2, monkeypatch):
    """Worker A holds its first batch until worker B has committed a unit: both do part of the job, status
    shows both while they work, and the job ends completed with one worker's results."""
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    b_committed = threading.Event()
    seen_workers = []
    original_commit, original_compute = JobRun.commit, JobRun.compute

    def commit(self, unit):
        original_commit(self, unit)
        if self.owner.worker == "B" and read_ledger(self.job).commits:
            b_committed.set()

    def compute(self, unit, keys, wanted, suspect):
        if self.owner.worker == "A" and not b_committed.is_set():
            assert b_committed.wait(120), "worker B never committed"
            seen_workers.append(sorted(w["worker"] for w in runner.status(job_dir).workers))
        return original_compute(self, unit, keys, wanted, suspect)

    monkeypatch.setattr(JobRun, "commit", commit)
    monkeypatch.setattr(JobRun, "compute", compute)
    summaries = {}

    def work(name):
        engine = Engine(tiny_gpt2, OPTIONS)
        summaries[name] = run_job(Job.open(job_dir), engine, echo=None, owner=Owner.me(name), shard_rows=2)

    a = threading.Thread(target=work, args=("A",))
    a.start()
    while not (job_dir / "claims").exists() or not list((job_dir / "claims").iterdir()):
        a.join(0.01)  # A has claimed its first unit; now B starts
    b = threading.Thread(target=work, args=("B",))
    b.start()
    a.join()
    b.join()
    assert seen_workers[0] == ["A", "B"]
    by_worker = {}
    for c in read_ledger(Job.open(job_dir)).commits:
        by_worker.setdefault(c.marker["worker"], set()).add(c.unit)
    assert set(by_worker) == {"A", "B"} and not by_worker["A"] & by_worker["B"]
    assert summaries["A"].generated + summaries["B"].generated == 2 * N  # nothing computed twice
    assert any(s.finished for s in summaries.values())
    assert runner.status(job_dir).state == "completed"
    assert_exactly_once(job_dir, prepared[1])


@pytest.mark.slow
def test_three_worker_processes_finish_one_job_like_one_worker(tmp_path, prepared):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    code, out = run_runner(
        "--home", home, "work", "--workers", 3, "--job", job_dir, "--shard-rows", 2, env_extra=ONE_THREAD
    )
    assert code == 0 and "Traceback" not in out, out
    assert "started 3 worker processes" in out
    assert runner.status(job_dir).state == "completed"
    assert_exactly_once(job_dir, prepared[1])
    assert len(Job.open(job_dir).read_stats()["runs"]) >= 1


@pytest.mark.slow
def test_a_worker_process_stopped_while_the_other_does_the_job_does_not_hold_the_command(tmp_path, prepared):
    """Worker w2 of `--workers 2` stops (SIGSTOP) before it claims anything; w1 does the whole job and ends. The
    command waited for w2 for ever; it lets it go and ends, the job done once."""
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    code, out = run_runner("--home", home, "work", "--workers", 2, "--job", job_dir, "--shard-rows", 2,
                           env_extra={**ONE_THREAD, "RUNNER_FAULT": "worker_start:1:SIGSTOP:w2"}, timeout=600)  # fmt: skip
    assert code == 0 and "Traceback" not in out, out
    assert "worker process 2 (pid " in out and "is stopped (SIGSTOP) and the others have ended" in out, out
    assert "[runner w2]" not in out.split("is stopped (SIGSTOP)")[0], out  # it never began
    assert_exactly_once(job_dir, prepared[1])


@pytest.mark.slow
def test_worker_processes_share_the_cpu_cores_not_each_take_them_all(tmp_path, prepared, monkeypatch):
    """`--workers 2` on a CPU: each process gets its share of the cores (torch would start a thread per core in
    each: 2 processes x all cores fighting over the cores); a user's OMP_NUM_THREADS is kept."""
    import os

    home, job_dir = fresh_copy(tmp_path, prepared[0])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out = run_runner("--home", home, "work", "--workers", 2, "--job", job_dir, "--shard-rows", 2)
    assert code == 0 and "Traceback" not in out, out
    assert_exactly_once(job_dir, prepared[1])
    # each process's lines say which it is: one log holds both (adversarial pass 27: unlabelled, each one's
    # progress read as the job's)
    assert "[runner w1] " in out or "[runner w2] " in out, out
    cores = len(os.sched_getaffinity(0))
    runs = Job.open(job_dir).read_stats()["runs"]
    assert runs and {r["cpu_threads"] for r in runs} == {max(1, cores // 2)}, runs


@pytest.mark.slow
def test_torchrun_processes_each_take_units_of_one_job(tmp_path, prepared):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    torchrun = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "runner")
    code, out = run_runner(
        "--home", home, "work", "--job", "job", "--shard-rows", 2, prefix=torchrun, env_extra=ONE_THREAD
    )
    assert code == 0 and "Traceback" not in out, out
    assert runner.status(job_dir).state == "completed"
    assert_exactly_once(job_dir, prepared[1])


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_gpus_needs_a_gpu_and_says_so(tmp_path):
    code, out = run_runner("--home", tmp_path, "work", "--gpus", "all", env_extra=ONE_THREAD)
    assert code == 1 and "no CUDA GPU is visible" in out and "--workers N" in out


STOPPED, CONTINUED = (signal.SIGSTOP << 8) | 0x7F, 0xFFFF  # wait statuses, as os.waitpid reports them


def fake_workers(monkeypatch, statuses: list[tuple[int, int]], after_signals=(), stopped_now=True):
    """Worker processes 4000, 4001... whose os.waitpid statuses come in the order of `statuses` (pid, status),
    then those of `after_signals` once a signal was sent; the signals sent are listed. /proc says each one
    reported stopped is stopped now (`stopped_now`) or not."""
    import os
    import subprocess

    from runner import cli

    monkeypatch.setattr(cli, "_still_stopped", lambda pid: stopped_now)

    made, sent, queue = [], [], list(statuses)

    class Worker:
        def __init__(self, args, env=None, **how):
            self.pid, self.returncode = 4000 + len(made), None
            made.append(self)

        def send_signal(self, sig):
            sent.append((self.pid, sig))
            queue.extend(after_signals if len(sent) == 1 else ())

    monkeypatch.setattr(subprocess, "Popen", Worker)
    monkeypatch.setattr(os, "waitpid", lambda pid, options: queue.pop(0))
    return sent


def test_a_worker_process_stopped_once_the_others_ended_is_let_go(monkeypatch, capsys):
    """`runner work --workers 2` with one worker frozen past its lease (SIGSTOP): the other took its units over
    and finished the job, and the command waited for the stopped one for ever. It is now let go (SIGTERM, then
    SIGCONT) and the command ends, 0: the work is done."""
    from runner import cli

    sent = fake_workers(monkeypatch, [(4001, STOPPED), (4000, 0)], after_signals=[(4001, signal.SIGTERM)])
    assert cli._run_processes(None, [], [None, None]) == 0
    assert sent == [(4001, signal.SIGTERM), (4001, signal.SIGCONT)]
    assert (
        "worker process 2 (pid 4001) is stopped (SIGSTOP) and the others have ended"
        in capsys.readouterr().err
    )


def test_a_stop_reported_after_the_worker_was_continued_lets_nothing_go(monkeypatch):
    """A whole group suspended and resumed, the command first: the stop reports of its workers are read after
    they were continued (their continued reports still to come). /proc says they run: none is let go."""
    from runner import cli

    sent = fake_workers(
        monkeypatch, [(4000, 0), (4001, STOPPED), (4001, CONTINUED), (4001, 0)], stopped_now=False
    )
    assert cli._run_processes(None, [], [None, None]) == 0 and sent == []


def test_worker_processes_all_stopped_are_waited_for(monkeypatch):
    """Every worker stopped and none ended (paused on purpose, `kill -STOP`): none is let go; continued, they
    end as usual."""
    from runner import cli

    sent = fake_workers(monkeypatch, [(4000, STOPPED), (4001, STOPPED), (4000, CONTINUED), (4001, CONTINUED),
                                      (4001, 0), (4000, 3 << 8)])  # fmt: skip
    assert cli._run_processes(None, [], [None, None]) == 3 and sent == []


def test_a_worker_process_killed_by_a_signal_is_said_and_fails_the_command(monkeypatch, capsys):
    """`runner work --workers 2` with one worker killed (SIGKILL: the out-of-memory killer): the command exited
    247 (-9) without a word (adversarial pass 11). It now says which worker was killed by what, and what
    becomes of its units, and exits 1."""
    from runner import cli

    fake_workers(monkeypatch, [(4000, 0), (4001, signal.SIGKILL)])
    assert cli._run_processes(None, [], [None, None]) == 1
    said = capsys.readouterr().err
    assert "worker process 2 (pid 4001) was killed by SIGKILL (out of memory?)" in said
    assert "taken over by the other workers" in said


def _two_workers_computing(tmp_path, tiny_gpt2, rows: int, check=None):
    """`runner work --workers 2` (in a session of its own) on a job of `rows` long rows, once each worker has said
    its unit (its first batch is under way): (job, the command's process, its lines so far, the workers'
    labels). `check(proc)` runs after each line."""
    import subprocess
    import sys

    from workers import worker_env

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Every student reads {i}"}) + "\n"
                               for i in range(rows)))  # fmt: skip
    home = tmp_path / "home"
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=200, min_new_tokens=200),
                     EngineOptions(batch_size=16), home=home, unit_rows=40)  # fmt: skip
    command = [sys.executable, "-m", "runner", "--home", str(home), "work", "--workers", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=worker_env(ONE_THREAD), start_new_session=True)  # fmt: skip
    said, computing = [], set()
    while len(computing) < 2:
        line = proc.stdout.readline()
        assert line, "".join(said)
        said.append(line)
        if "to generate on" in line:
            computing.add(line.split("]")[0])
        if check is not None:
            check(proc)
    return job, proc, said, computing


@pytest.mark.slow
def test_one_ctrl_c_reaches_each_worker_process_once(tmp_path, tiny_gpt2):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `runner work --workers 2` and
    its worker processes. The command passes it on to each worker too, so a worker could take the two as "stop
    at once" and drop the batch it was computing (pass 123). The workers have sessions of their own: one
    Ctrl-C is one stop after the current batch in each."""
    import os
    import signal

    def own_sessions(proc):
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        assert all(os.getpgid(int(c)) != os.getpgid(proc.pid) for c in children), "in the command's group"

    job, proc, said, computing = _two_workers_computing(tmp_path, tiny_gpt2, 400, own_sessions)
    os.killpg(proc.pid, signal.SIGINT)  # one Ctrl-C
    said += proc.stdout.readlines()
    out = "".join(said)
    assert proc.wait() == 130, out
    for worker in computing:  # each once; none stopped at once, dropping its batch
        assert out.count(f"{worker}] stopping after the current batch") == 1, out
    assert "interrupted" not in out and "Traceback" not in out, out
    assert runner.status(job.dir).state == "queued (interrupted)", out


@pytest.mark.slow
def test_worker_processes_stop_when_their_command_is_killed(tmp_path, tiny_gpt2):
    """`runner work --workers 2` killed by SIGKILL (`kill -9` of the pid `--background` prints, the out-of-memory
    killer, a notebook kernel restarted): its worker processes, in sessions of their own (pass 123), were not
    in its process group and computed on unseen, holding the device, and a `runner work --workers 2` run again
    put two more processes on it (adversarial pass 141). Each now stops as on SIGTERM once its command is gone,
    writing its finished batches, and leaves the job queued for the next `runner work`."""
    import os
    import signal

    job, proc, _, _ = _two_workers_computing(tmp_path, tiny_gpt2, 4000)
    children = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    os.killpg(proc.pid, signal.SIGKILL)  # the command alone: its workers are in sessions of their own
    proc.wait()

    def running(pid):  # (an orphan that ended may stay a zombie where nothing reaps it)
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    # they stop within a batch (seconds; the job takes many minutes): the deadline only keeps a regression from
    # hanging the suite, and is far past what a loaded machine needs
    deadline = time.monotonic() + 600
    while any(running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not any(running(c) for c in children), (
            "worker processes compute on after their command was killed"
        )
    finally:
        for c in filter(running, children):
            os.kill(c, signal.SIGKILL)
    status = runner.status(job.dir)
    assert status.state == "queued (interrupted)" and not status.workers, status


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7", "cuda", "cpu", None])
def test_a_worker_process_on_a_gpu_makes_it_its_current_device(monkeypatch, device):
    """`runner work --device cuda:N` (each `--gpus` worker): calls that name no device go to its GPU, not cuda:0;
    a GPU that is not there is left to the engine's clear message."""
    import torch

    from runner.scheduler import make_current

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    make_current(device)
    assert current == ([1] if device == "cuda:1" else [])


def test_a_worker_switching_models_frees_the_first_before_loading_the_next(monkeypatch):
    """One engine in memory at a time: the dropped one (reference cycles included) is gone before the next loads
    and reads the GPU's free memory for its token budget."""
    import types
    import weakref

    import runner.scheduler as scheduler

    dropped = []

    class FakeEngine:
        def __init__(self, model, options, revision=None):
            assert all(ref() is None for ref in dropped), "the previous engine is still in memory"
            self.cycle = self  # as a loaded model's modules and hooks refer to each other
            dropped.append(weakref.ref(self))

    monkeypatch.setattr(scheduler, "Engine", FakeEngine)
    current = []
    monkeypatch.setattr(scheduler, "make_current", current.append)
    engines = scheduler.Engines(None, None)
    options = runner.EngineOptions(device="cuda:1")  # a job submitted for a GPU: made current before it loads
    for model in ("a", "b", "a"):
        job = types.SimpleNamespace(
            options=options, spec=types.SimpleNamespace(model=model, revision=None), meta={}
        )
        assert isinstance(engines.get(job), FakeEngine)
    assert len(dropped) == 3 and current == ["cuda:1"] * 3


def test_a_job_of_other_weights_in_the_same_folder_loads_them_again(monkeypatch):
    """A worker kept the model of its last job in memory for the next job of the same folder: a checkpoint
    saved over the folder in between (the next job submitted for it) was computed with the old weights, without
    a word (pass 50). The weights a job was submitted for (its model fingerprint) are part of the key."""
    import types

    import runner.scheduler as scheduler

    loads = []
    monkeypatch.setattr(scheduler, "Engine", lambda model, options, revision: loads.append(model) or object())
    monkeypatch.setattr(scheduler, "make_current", lambda device: None)
    engines = scheduler.Engines(None, None)

    def job(fingerprint):
        return types.SimpleNamespace(options=runner.EngineOptions(), spec=types.SimpleNamespace(model="ckpt", revision=None),
                                     meta={"model_fingerprint": fingerprint})  # fmt: skip

    first = engines.get(job("6:aaaa"))
    assert engines.get(job("6:aaaa")) is first and len(loads) == 1  # the same weights: kept
    assert engines.get(job("6:bbbb")) is not first and len(loads) == 2


def test_a_job_of_another_device_map_loads_the_model_again(monkeypatch):
    """A worker kept the model of its last job (one GPU) for the next job of the same model submitted with
    `--device-map auto` (its layers over every GPU and the CPU): it ran loaded whole on one GPU. The device map is
    part of the key (pass 254)."""
    import types

    import runner.scheduler as scheduler

    loads = []
    monkeypatch.setattr(
        scheduler, "Engine", lambda model, options, revision: loads.append(options) or object()
    )
    monkeypatch.setattr(scheduler, "make_current", lambda device: None)
    engines = scheduler.Engines(None, None)

    def job(device_map):
        return types.SimpleNamespace(options=runner.EngineOptions(device_map=device_map),
                                     spec=types.SimpleNamespace(model="m", revision=None), meta={})  # fmt: skip

    first = engines.get(job(None))
    assert engines.get(job(None)) is first and len(loads) == 1
    assert engines.get(job("auto")) is not first and [o.device_map for o in loads] == [None, "auto"]


def test_a_worker_whose_job_folder_is_submitted_again_under_it_leaves_the_new_job_alone(
    tmp_path, prepared, tiny_gpt2, monkeypatch
):
    """Worker A (`runner work`) is paused after its first commit; meanwhile the folder is deleted and the same
    file submitted again to it (`runner run -o DIR` once more), and the new job completes. A, resumed, wrote its
    commits over the new job's of the same names, claimed a unit there and quarantined that unit's sound shards
    as another job's: the completed job was left broken, 10 rows missing (adversarial pass 141). It now sees
    that its folder holds another job, says so and leaves it as it is."""

    prompts, d = prepared[0].parent / "p.jsonl", tmp_path / "out"
    create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, job_dir=d, unit_rows=3)
    paused, go = threading.Event(), threading.Event()
    original_commit = JobRun.commit

    def commit(self, unit):
        original_commit(self, unit)
        if threading.current_thread().name == "A" and not paused.is_set():
            paused.set()
            assert go.wait(120), "never resumed"

    monkeypatch.setattr(JobRun, "commit", commit)
    said, again = _submitted_again_under_paused_worker(d, prompts, tiny_gpt2, paused, go)
    assert runner.status(d).state == "completed"
    assert not any((d / "quarantine").iterdir())  # nothing of the new job set aside
    assert {c.marker["worker"] for c in read_ledger(Job.open(d)).commits} == {"B"}
    assert_exactly_once(d, prepared[1])
    assert any(f"now holds job {again.id}" in line for line in said), said


def _submitted_again_under_paused_worker(d, prompts, model, paused, go):
    """Worker A (a thread of `runner work` on job folder `d`) runs until it sets `paused`; the folder is then
    deleted, the file submitted again to it and that new job run to completion by worker B; then A goes on
    (`go`) and ends. Returns (A's lines, the new job)."""
    import shutil

    from runner import scheduler

    said = []
    a = threading.Thread(name="A", target=lambda: scheduler.work(job=str(d), echo=said.append, shard_rows=2))
    a.start()
    assert paused.wait(120), "worker A never committed"
    shutil.rmtree(d)
    again = create_job(prompts, model, PARAMS, OPTIONS, job_dir=d, unit_rows=3)
    run_job(again, Engine(model, OPTIONS), echo=None, owner=Owner.me("B"), shard_rows=2)
    assert runner.status(d).state == "completed"
    go.set()
    a.join(120)
    assert not a.is_alive()
    return said, again


@pytest.mark.parametrize("where", ["marker", "shard"])
def test_a_worker_paused_inside_its_commit_as_its_folder_is_submitted_again_leaves_the_new_job_alone(
    tmp_path, prepared, tiny_gpt2, monkeypatch, where
):
    """As above, but A is paused inside its first commit: its shard in place and its claim checked, its marker not
    written yet (`marker`), or its shard on its way (`shard`). Resumed once the new job has completed, it wrote
    its marker (or shard) over the new job's of the same name (unit 0, epoch 0, seq 0): the new job's commit no
    longer verified, and the completed job lost those rows. Neither is written over now: A's commit is refused."""

    from runner import jobdir, storage

    prompts, d = prepared[0].parent / "p.jsonl", tmp_path / "out"
    create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, job_dir=d, unit_rows=3)
    paused, go = threading.Event(), threading.Event()
    module, name = (jobdir, "write_marker") if where == "marker" else (storage, "publish")
    original = getattr(module, name)

    def pausing(*args, **kwargs):
        if threading.current_thread().name == "A" and not paused.is_set():
            paused.set()
            assert go.wait(120), "never resumed"
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, pausing)
    said, again = _submitted_again_under_paused_worker(d, prompts, tiny_gpt2, paused, go)
    status = runner.status(d)
    assert status.state == "completed" and status.done == status.total, said
    assert not (d / "quarantine").exists() or not any((d / "quarantine").iterdir())
    assert {c.marker["worker"] for c in read_ledger(Job.open(d)).commits} == {"B"}
    assert_exactly_once(d, prepared[1])
