"""Workers on a mount that shows another machine's changes late (Google Drive between Colab VMs): exactly once
all the same. Each `runner` process here runs under tests/stalefs.py, an eventually consistent view of the job
home: another process's new files show late in listings, its deleted and renamed files linger, a file it
replaced reads its old bytes for a while (by counts of the reader's own reads, seeded: no sleeps). In "vm"
trials each process also has a boot id of its own, so only heartbeats tell whether a worker lives.

A trial, in a fresh copy of the prepared job: 2 `runner work --job job --shard-rows 2` processes, some carrying a
RUNNER_FAULT (they SIGKILL themselves at a named point, at a drawn visit), with a `runner status` meanwhile; once
they are gone, up to FINISHING rounds of a plain `runner work --job job` and `runner status job`, until the job
is completed (all of them through the stale view, whose status may lag behind: it must only answer). Then, looking at the job directly: every (row,
sample) in the results exactly once and equal to an uninterrupted run, the job completed, no row errors, nothing
in quarantine/, no traceback in any process's output. Found by adversarial pass 132 (a young marker whose shard
had not arrived was quarantined: test_late_shards.py); 26 such trials passed after that fix.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_exactly_once, fresh_copy, prepared_job
from workers import worker_env

import runner
from runner import EngineOptions, GenerationParams

pytestmark = pytest.mark.slow  # real worker processes

STALEFS = Path(__file__).resolve().parent / "stalefs.py"
PARAMS = GenerationParams(max_new_tokens=5, temperature=1.0, num_return_sequences=2, seed=5)
OPTIONS = EngineOptions(batch_size=2)
N, UNIT_ROWS = 24, 3
ENV = {"OMP_NUM_THREADS": "1", "RUNNER_LEASE_TTL": "6"}
# where a faulted worker SIGKILLs itself (runner/faults.py), at a visit drawn in 1..MAX_VISIT
POINTS = ("after_generate", "after_shard", "before_replace", "before_create", "after_create", "mid_write")
MAX_VISIT, FAULTED = 12, 0.6
FINISHING = 4
TIMEOUT = 300  # seconds: a safety net for a process that hangs, never a wait for something to happen
# (seed, max_lag, p, vm): the seed draws the faults (1: both workers killed, at after_generate:5 and
# before_create:8; 7: one at after_shard:7, the other unfaulted; 9: both, at before_replace:5 and mid_write:1)
TRIALS = [(1, 40, 0.7, False), (7, 200, 0.9, True), (9, 120, 0.8, True)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """(template job folder, reference results): N rows x 2 samples in units of UNIT_ROWS rows."""
    root = tmp_path_factory.mktemp("stale")
    rows = [{"id": f"q{i:02d}", "prompt": f"Every student reads {i}"} for i in range(N)]
    return prepared_job(root, tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=UNIT_ROWS)


class Trial:
    """The processes of one trial, each `runner ARGS...` under its own stale view of HOME; what each said."""

    def __init__(self, tmp_path: Path, home: Path, seed: int, max_lag: int, p: float, vm: bool):
        self.tmp_path, self.home, self.journal = tmp_path, home, tmp_path / "journal"
        self.settings = {
            "root": str(home),
            "journal": str(self.journal),
            "max_lag": max_lag,
            "p": p,
            "vm": vm,
        }
        self.seed, self.started, self.running = seed, 0, []
        self.said: list[tuple[str, int, str]] = []  # (what, exit code, output)

    def start(self, what: str, *args: str, fault: str | None = None) -> subprocess.Popen:
        self.started += 1
        settings = {**self.settings, "seed": self.seed * 100 + self.started}
        env = {
            **ENV,
            "RUNNER_TEST_STALEFS": json.dumps(settings),
            **({"RUNNER_FAULT": fault} if fault else {}),
        }
        proc = subprocess.Popen(
            [sys.executable, str(STALEFS), "--home", str(self.home), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(env), cwd=self.tmp_path,
        )  # fmt: skip
        proc.what = what
        self.running.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen) -> tuple[int, str, str]:
        """Its exit code, stdout and stderr, once it has ended."""
        out, err = proc.communicate(timeout=TIMEOUT)
        self.running.remove(proc)
        self.said.append((proc.what, proc.returncode, out + err))
        return proc.returncode, out, err

    def run(self, what: str, *args: str) -> tuple[int, str, str]:
        return self.wait(self.start(what, *args))

    def kill_the_rest(self) -> None:
        for proc in self.running:
            proc.kill()
            proc.communicate()

    def story(self) -> str:
        return "\n".join(f"=== {what} (exit {code})\n{out}" for what, code, out in self.said)

    def stale_reads_served(self) -> int:
        return sum(int(f.read_text() or 0) for f in self.journal.glob("stale-*.txt"))


@pytest.mark.parametrize(
    ("seed", "max_lag", "p", "vm"),
    TRIALS,
    ids=[f"seed{s}-lag{lag}-{'vm' if vm else 'host'}" for s, lag, _, vm in TRIALS],
)
def test_workers_on_a_stale_mount_finish_the_job_exactly_once(tmp_path, prepared, seed, max_lag, p, vm):
    template, ref = prepared
    home, job_dir = fresh_copy(tmp_path, template)
    trial = Trial(tmp_path, home, seed, max_lag, p, vm)
    rng = random.Random(seed)
    faults = [
        f"{rng.choice(POINTS)}:{rng.randint(1, MAX_VISIT)}" if rng.random() < FAULTED else None
        for _ in range(2)
    ]
    try:
        workers = [
            trial.start(f"worker {i} ({fault})", "work", "--job", "job", "--shard-rows", "2", fault=fault)
            for i, fault in enumerate(faults)
        ]
        code, _, _ = trial.run("status meanwhile", "status")
        assert code == 0, trial.story()
        for proc, fault in zip(workers, faults, strict=True):
            code, _, _ = trial.wait(proc)
            # a faulted worker may finish before its visit comes; none ends any other way
            assert code in ((0, -signal.SIGKILL) if fault else (0,)), trial.story()
        for r in range(FINISHING):
            code, _, _ = trial.run(f"finishing worker {r}", "work", "--job", "job")
            assert code == 0, trial.story()
            # what the stale view shows may lag (queued, or even broken: "completed, but rows are missing"
            # while their markers are in transit); it must only answer
            code, out, _ = trial.run(f"status {r}", "status", "job", "--json")
            assert code == 0 and json.loads(out)["state"], trial.story()
            if runner.status(job_dir).state == "completed":  # as it is
                break
    finally:
        trial.kill_the_rest()
    story = trial.story()
    (tmp_path / "story.txt").write_text(story)  # every process's output, to read after a failure
    assert "Traceback" not in story, story
    assert runner.status(job_dir).state == "completed", story
    assert_exactly_once(job_dir, ref)
    assert runner.read_errors(job_dir) == [], story
    # No sound commit set aside, between VMs. On one host runner takes the view as consistent (a local disk, or one
    # mount's cache shared by its processes): a marker whose shard it does not see is damage there, so a "host"
    # trial, whose processes see each other's changes late, may set one aside and compute its rows again (seen
    # in CI once: a takeover of a unit whose last marker showed before its shard); exactly once holds either way.
    quarantine = job_dir / "quarantine"
    assert not vm or not quarantine.exists() or not list(quarantine.iterdir()), story
    assert trial.stale_reads_served() > 0  # the view was stale at all
