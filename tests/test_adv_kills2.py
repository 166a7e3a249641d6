"""Adversarial kill sweep over what test_kill.py and test_adv_kills.py do not cover (pass 183): `runner run FILE
-o DIR` killed at each fault point it passes, then run again; `runner cancel` and `runner retry` killed at
their state record while a `runner work` process is on the job; `runner submit` killed at each fault point on a
file system without hard links (tests/linkless, as Colab's Drive mount), `--name` included.

Found: without hard links a claim (.names/KEY.N.json: a `submit --name`'s, or `runner run FILE`'s without -o) is
created empty and then filled; a submit killed in between left it empty, and every later submit of that name
(or file and settings) was refused for ten minutes as "claimed by another submit ... being written right now
or was killed; run this submit again in a moment (it then returns that job)", which it never did. A claim's
submit keeps its temp folder in the home until the claim is filled, so an empty claim with no live submit of
this machine there is taken over at once.

Held (each kill then the same command again: results exactly the reference's, one job, no refusal): `run -o`
killed at submit's four writes, its first claim, mid-shard, between shard and marker, and at the completion
record; `cancel` and `retry` killed at their record while a worker was frozen after a commit (the worker then
ends as the state says, and a later `work` completes once); linkless `submit --name` killed at each of its
writes leaves no job listed or worked on.

Not changed (documented in jobdir.py): without hard links a state record killed between its create and its fill
(`runner run`'s completion record, `cancel`, `retry`: after_create) leaves the job broken until `runner repair`,
and the next command says so and names that command.
"""

from __future__ import annotations

import signal
import warnings

import pytest
import workers
from helpers import assert_exactly_once, fresh_copy, prepared_job, reference_run
from test_adv_workers import proc_state, wait_until
from test_state_records import LINKLESS

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobdir import read_state

PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=11)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"a{i:02d}", "prompt": f"The old man said {i}"} for i in range(4)]
# `python -c LINKLESS ARGS` (test_state_records.LINKLESS) is `runner ARGS` on a file system without hard links
# (forked from the test's fork server like `python -m runner`, with RUNNER_TEST_FORK=1: tests/zygote.py)
FORK = {"RUNNER_TEST_FORK": "1"}


def linkless(*args, fault=None):
    env = {**FORK, **({"RUNNER_FAULT": fault} if fault else {})}
    return workers.run_runner(*args, env_extra=env, prefix=("-c", LINKLESS))


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_gpt2):
    """The prompts file and its uninterrupted results."""
    return reference_run(tmp_path_factory.mktemp("adv183"), tiny_gpt2, ROWS, PARAMS, OPTIONS)


def settings(model):
    """PARAMS and OPTIONS as command-line options."""
    return ("-m", model, "--max-new-tokens", "4", "--temperature", "1.0", "-n", "2", "--seed", "11", "--batch-size",
            "2")  # fmt: skip


@pytest.mark.slow  # real runner processes
@pytest.mark.parametrize("command", ["submit --name", "run without -o"])
def test_without_hard_links_a_submit_killed_between_its_claims_create_and_fill_blocks_nothing(
    tmp_path, ref, tiny_gpt2, command
):
    prompts, want = ref
    home = tmp_path / "home"
    if command == "submit --name":
        args = ("--home", home, "submit", prompts, *settings(tiny_gpt2), "--name", "night1")
    else:
        args = ("--home", home, "run", prompts, *settings(tiny_gpt2))
    code, out = linkless(*args, fault="after_create:1")
    assert code == -signal.SIGKILL, out
    claims = list((home / jobdir.NAMES).glob("*.json"))
    assert [p.stat().st_size for p in claims] == [0], claims  # the claim, created and never filled
    code, out = linkless(*args)
    assert code == 0 and "claimed by another submit" not in out, out
    code, out = linkless("--home", home, "work")
    assert code == 0, out
    [job] = jobdir.job_folders(home)
    assert read_state(job).state == "completed"
    assert_exactly_once(job, want)


def test_an_empty_claim_is_waited_for_while_a_submit_of_this_home_is_alive(
    tmp_path, ref, tiny_gpt2, runner_home
):
    """The other side of the above: an empty claim may be one a live submit is about to fill (its temp folder is
    in the home), so it is not taken over then; once that folder is gone (its job moved in, or its submit dead
    and tidied), it is."""
    from runner.jobs import create_job

    prompts, _ = ref
    (runner_home / jobdir.NAMES).mkdir(parents=True)
    (runner_home / jobdir.NAMES / "night1.0.json").write_bytes(b"")
    building = runner_home / jobdir.submit_temp_name("20261201-000000-abcdef")  # this process: alive
    building.mkdir()
    with pytest.raises(runner.RunnerError, match="claimed by another submit"):
        create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="night1")
    building.rmdir()
    job = create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="night1")
    assert [p.name for p in jobdir.job_folders(runner_home)] == [job.id]


# `runner run FILE -o DIR` on one unit of 4 rows passes: submit's writes (its owner file, the prompts' stamp,
# job.backup.json, job.json: before_replace 1-4), the first claim (before_create 1), the commit (mid_write 1,
# after_shard 1) and the completion record (before_create 2)
RUN_POINTS = [*(f"before_replace:{n}" for n in range(1, 5)), "before_create:1", "mid_write:1", "after_shard:1",
              "before_create:2"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fault", RUN_POINTS)
def test_runner_run_killed_at_each_point_carries_on_with_the_same_command(tmp_path, ref, tiny_gpt2, fault):
    prompts, want = ref
    out = tmp_path / "w" / "out"
    args = ("run", prompts, *settings(tiny_gpt2), "-o", out)
    code, said = workers.run_runner(*args, env_extra={"RUNNER_FAULT": fault})
    assert code == -signal.SIGKILL, said
    code, said = workers.run_runner(*args)
    assert code == 0 and "Traceback" not in said, said
    assert read_state(out).state == "completed"
    assert_exactly_once(out, want)
    code, said = workers.run_runner(*args)  # and once more: nothing computed, nothing submitted
    assert code == 0 and "nothing computed" in said, said
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no second job, no temp folder beside it
    assert_exactly_once(out, want)


N = 12


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """A job of 12 rows in units of 4, nothing run yet, and its reference results."""
    rows = [{"id": f"a{i:02d}", "prompt": f"The old man said {i}"} for i in range(N)]
    return prepared_job(
        tmp_path_factory.mktemp("adv183-units"), tiny_gpt2, rows, PARAMS, OPTIONS, unit_rows=4
    )


def frozen_worker(home):
    """A `runner work` that froze itself (SIGSTOP) once its second shard is written: a progress event, so the
    commands below land while it is on the job, whatever the machine's speed."""
    proc = workers.start_worker(home, shard_rows=1, env_extra={"RUNNER_FAULT": "after_shard:2:SIGSTOP"})
    wait_until(lambda: proc_state(proc.pid) == "T" or proc.poll() is not None, "the worker to stop")
    assert proc.poll() is None, proc.communicate()[0]
    return proc


def thawed(proc) -> str:
    """Continue the worker each time it stops itself again (from its second shard on) until it ends."""
    while proc.poll() is None:
        wait_until(
            lambda: proc_state(proc.pid) in ("T", "Z", None) or proc.poll() is not None, "a stop or end"
        )
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=0.5)
        except Exception:  # noqa: BLE001 (stopped again: continued again)
            pass
    return proc.communicate()[0]


@pytest.mark.slow
def test_a_cancel_killed_at_its_record_while_a_worker_runs_then_cancelled_again(tmp_path, prepared):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    worker = frozen_worker(home)
    code, out = workers.run_runner(
        "--home", home, "cancel", job_dir, env_extra={"RUNNER_FAULT": "before_create:1"}
    )
    assert code == -signal.SIGKILL and read_state(job_dir).state == "queued", out
    code, out = workers.run_runner("--home", home, "cancel", job_dir)
    assert code == 0, out
    said = thawed(worker)
    assert worker.returncode == 0 and "Traceback" not in said, said
    assert read_state(job_dir).state == "cancelled", (
        said
    )  # (a worker done with every row says so: its word dropped)
    with warnings.catch_warnings():  # (load_results warns that a cancelled job's results may be partial)
        warnings.simplefilter("ignore")
        committed = assert_exactly_once(job_dir, prepared[1], complete=False)
    assert committed >= 2 and runner.status(job_dir).done == committed
    code, out = workers.run_runner("--home", home, "retry", job_dir)
    assert code == 0, out
    code, out = workers.run_worker(home)
    assert code == 0 and read_state(job_dir).state == "completed", out
    assert_exactly_once(job_dir, prepared[1])


@pytest.mark.slow
def test_a_retry_killed_at_its_record_while_a_worker_runs_then_retried_again(tmp_path, prepared):
    home, job_dir = fresh_copy(tmp_path, prepared[0])
    for _ in range(2):  # the row breaks the device, then alone again: a row error, committed
        code, out = workers.run_worker(home, shard_rows=1, env_extra={"RUNNER_FAULT": "poison_row:a05"})
        assert code != 0, out
    assert runner.status(job_dir).errors == 1
    worker = frozen_worker(home)
    code, out = workers.run_runner(
        "--home", home, "retry", job_dir, env_extra={"RUNNER_FAULT": "before_create:1"}
    )
    assert code == -signal.SIGKILL and read_state(job_dir).generation == 0, out
    code, out = workers.run_runner("--home", home, "retry", job_dir)
    assert code == 0 and "1 failed row will be tried again" in out, out
    said = thawed(worker)
    assert worker.returncode == 0 and "Traceback" not in said, said
    status = runner.status(job_dir)
    assert status.state == "completed" and status.errors == 0 and status.generation == 1, (status, said)
    assert_exactly_once(job_dir, prepared[1])  # the failed row too, once


# `runner submit --name` without hard links passes: its four writes (before_replace 1-4), then its name's claim,
# a temp file linked (before_create 1, then the link refused) or created empty and filled (after_create 1)
SUBMIT_POINTS = [*(f"before_replace:{n}" for n in range(1, 5)), "before_create:1", "after_create:1"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", SUBMIT_POINTS)
def test_without_hard_links_a_named_submit_killed_at_each_point_leaves_no_job_and_its_name_free(
    tmp_path, ref, tiny_gpt2, fault
):
    prompts, want = ref
    home = tmp_path / "home"
    args = ("--home", home, "submit", prompts, *settings(tiny_gpt2), "--name", "night1")
    code, out = linkless(*args, fault=fault)
    assert code == -signal.SIGKILL, out
    code, out = linkless("--home", home, "status")
    assert code == 0 and "no jobs in" in out, out  # no half-made job listed
    code, out = linkless("--home", home, "work")
    assert code == 0 and "nothing to do" in out, out  # nor worked on
    code, out = linkless(*args)
    assert code == 0 and "queued generate job" in out, out
    code, out = linkless("--home", home, "work")
    assert code == 0, out
    [job] = jobdir.job_folders(home)
    assert read_state(job).state == "completed" and runner.status(job).name == "night1"
    assert_exactly_once(job, want)
    assert sorted(p.name for p in home.iterdir()) == sorted([jobdir.NAMES, job.name]), (
        "a killed submit's temp folder"
    )
