"""A KeyboardInterrupt in the middle of the work (a second Ctrl-C, a notebook's stop button on `runner.run`):
the batches finished before it are written, never part of a batch, and a resumed run completes each row once,
equal to an uninterrupted run."""

import dataclasses

import pytest
from helpers import assert_exactly_once, invoke, reference_run

import runner
from runner import EngineOptions, GenerationParams, worker
from runner.engine import Engine
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=5, temperature=1.0, num_return_sequences=2, seed=7)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said " * (1 + i % 3)} for i in range(6)]


@pytest.fixture
def reference(tmp_path, tiny_gpt2):
    return reference_run(tmp_path, tiny_gpt2, ROWS, PARAMS, OPTIONS)


def _nth_call_interrupted(real, nth):
    """`real`, raising KeyboardInterrupt at its nth call instead (as a Ctrl-C landing there would)."""
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*a, **kw)

    return wrapped


def _interrupt_on(monkeypatch, where, nth):
    """Engine.generate (a batch being computed), Task.tokens (a batch's outcomes being buffered) or right after
    InFlight.running (a batch's in-flight record just written: on a Drive mount its rename is a round trip)."""
    if where == "inflight":
        from runner.crashes import InFlight

        real_running, calls = InFlight.running, []

        def running(self, *a, **kw):
            real_running(self, *a, **kw)
            calls.append(1)
            if len(calls) == nth:
                raise KeyboardInterrupt

        monkeypatch.setattr(InFlight, "running", running)
        return
    if where == "inflight_rename":  # the record's rename returned, InFlight has not noted it yet (pass 70)
        from runner import crashes

        real_write, calls = crashes.storage.write_json, []

        def write_json(path, *a, **kw):
            real_write(path, *a, **kw)
            if "inflight" in str(path):
                calls.append(1)
                if len(calls) == nth:
                    raise KeyboardInterrupt

        monkeypatch.setattr(crashes.storage, "write_json", write_json)
        return
    if where == "generate":
        monkeypatch.setattr(Engine, "generate", _nth_call_interrupted(Engine.generate, nth))
        return
    real_make = worker.make_task

    def make_task(*a, **kw):
        task = real_make(*a, **kw)
        return dataclasses.replace(task, tokens=_nth_call_interrupted(task.tokens, nth))

    monkeypatch.setattr(worker, "make_task", make_task)


@pytest.mark.parametrize(
    "where, nth, written",
    [
        ("generate", 3, 4),  # during the third batch: the first two (2 keys each) are written
        ("tokens", 4, 2),  # while the second batch's outcomes are being buffered: only the first is written
        # as the second batch's in-flight record lands: only the first is written (pass 69)
        ("inflight", 2, 2),
        # as the first batch's record's rename returns: nothing is written (pass 70)
        ("inflight_rename", 1, 0),
        ("inflight_rename", 2, 2),
    ],
)
def test_an_interrupt_writes_the_finished_batches_only(
    tmp_path, reference, tiny_gpt2, gpt2_engine, monkeypatch, where, nth, written
):
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "job")
    with monkeypatch.context() as m:
        _interrupt_on(m, where, nth)
        with pytest.raises(KeyboardInterrupt):
            run_job(job, gpt2_engine, echo=None)  # shards every 1,000 rows: nothing was written before
    assert runner.status(job.dir).done == written
    assert ("interrupted: the finished batches" in (job.dir / "log.txt").read_text()) == (written > 0)
    # not a crash: no batch left in flight, so the next run neither says a worker died nor isolates rows, whose
    # log-probs alone may differ in the last bit (pass 68)
    assert [p.name for p in (job.dir / "inflight").glob("*.json")] == []
    said = []
    assert run_job(job, gpt2_engine, echo=said.append).finished
    assert not any("died" in line or "one at a time" in line for line in said), said
    assert_exactly_once(job.dir, reference[1])


def test_a_ctrl_c_while_the_command_loads_ends_it_in_one_line_not_a_traceback():
    """The `runner` command spends a tenth of a second (more on a busy machine) importing its modules before its
    own Ctrl-C handling starts: a Ctrl-C there printed Python's traceback. Here the import of click is where it
    lands (a finder that raises it), as a Ctrl-C would."""
    import subprocess
    import sys
    from pathlib import Path

    scripts = (Path(__file__).parents[1] / "pyproject.toml").read_text().split("[project.scripts]")[1]
    assert scripts.split("\n")[1] == 'runner = "runner.__main__:main"'  # the command starts there
    code = """import sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
from runner.__main__ import main
main()"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "[runner] interrupted\n")


@pytest.mark.parametrize("where", ["after the command", "parsing"])
def test_a_ctrl_c_after_the_command_handled_its_own_is_exit_130_not_clicks_aborted(
    monkeypatch, capsys, runner_home, where
):
    """A Ctrl-C landing once a command's own handling is over (`runner work` had completed the job and was
    ending; the adversarial test of stops and signals met it) was click's "Aborted!" and exit 1, which scripts
    read as a failure; it is exit 130 and one line, as a Ctrl-C anywhere else. Another Abort stays exit 1."""
    import click

    from runner import cli

    real_invoke = cli._Commands.invoke

    def invoke_then_ctrl_c(self, ctx):
        if where == "parsing":
            raise KeyboardInterrupt
        real_invoke(self, ctx)
        raise KeyboardInterrupt

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(cli, "_exit_now", exit_now)
    monkeypatch.setattr(cli._Commands, "invoke", invoke_then_ctrl_c)
    monkeypatch.setattr("sys.argv", ["runner", "status"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Aborted!" not in err and "[runner] interrupted" in err, err

    def aborted(self, ctx):
        raise click.Abort

    monkeypatch.setattr(cli._Commands, "invoke", aborted)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1 and "Aborted!" in capsys.readouterr().err


def test_a_submit_stopped_in_a_notebook_does_not_block_the_same_cell_run_again(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """Pass 68: the stop button landing after a submit claimed its name (or `runner run`'s file and settings)
    and before its job was in place left the claim to a process that is alive (the kernel): the same cell run
    again was refused for 10 minutes ("claimed by another submit that is being written right now"). A claim of
    this very process that no call of it is writing is taken over at once."""
    from helpers import write_jsonl

    from runner import jobs

    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(4)]
    )
    params = GenerationParams(max_new_tokens=3, seed=3)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    for call in (lambda: runner.run(path, tiny_gpt2, params, echo=None),
                 lambda: runner.submit(path, tiny_gpt2, params, name="night1")):  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(jobs, "_move_into_place", stopped)
            with pytest.raises(KeyboardInterrupt):
                call()
        call()
    assert sorted(s.state for s in runner.status()) == ["completed", "queued"]


def test_a_stop_as_the_submit_temp_folder_is_made_leaves_nothing_beside_the_job(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 70: a stop landing as `runner.run(..., output=DIR)` made its temp folder (before the try that removes
    it) left `.DIR.PID-....tmp` beside DIR for a day: its pid is the live kernel and it had no owner file yet."""
    import os

    from helpers import write_jsonl

    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    out, real_mkdir = tmp_path / "w" / "out", os.mkdir
    out.parent.mkdir()

    def mkdir(p, *a, **k):
        real_mkdir(p, *a, **k)
        name = os.path.basename(os.fspath(p))
        if name.startswith(".out.") and name.endswith(".tmp"):
            raise KeyboardInterrupt  # the stop button, as the mkdir returns

    with monkeypatch.context() as m:
        m.setattr(os, "mkdir", mkdir)
        with pytest.raises(KeyboardInterrupt):
            runner.run(path, tiny_gpt2, PARAMS, OPTIONS, output=out, echo=None)
    assert sorted(p.name for p in out.parent.iterdir()) == []
    runner.run(path, tiny_gpt2, PARAMS, OPTIONS, output=out, echo=None)  # the same cell, again
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
@pytest.mark.parametrize("others_queued", [False, True])
def test_a_ctrl_c_in_the_last_batch_of_the_last_job_stops_nothing(tmp_path, tiny_gpt2, others_queued):
    """Ctrl-C on `runner work` as the last batch of the queue is computed: the batch is written and the job
    completes, so nothing was stopped and the exit is 0 (`runner work && next` goes on; it was 130 as if work
    were left). With another job still queued the Ctrl-C did stop something: 130, and that job waits."""
    import workers
    from helpers import write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    one_batch = dataclasses.replace(PARAMS, num_return_sequences=1)
    home = tmp_path / "home"
    jobs = [create_job(prompts, tiny_gpt2, one_batch, OPTIONS, job_dir=home / name)
            for name in ("first", "second")[: 1 + others_queued]]  # fmt: skip
    code, out = workers.run_worker(home, env_extra={"RUNNER_FAULT": "after_generate:1:SIGINT"})
    assert "stopping after the current batch" in out, out
    states = sorted(runner.status(job.dir).state for job in jobs)
    if others_queued:
        assert code == 130, out
        assert states == ["completed", "queued"] and "again to carry on" in out, out
    else:
        assert code == 0, out
        assert states == ["completed"] and "again to carry on" not in out, out


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_a_ctrl_c_in_the_last_batch_this_machine_can_run_stops_nothing(tmp_path, tiny_gpt2):
    """The same with a job queued that this machine cannot run (`--device cuda` without CUDA: said as met, left
    queued; met first here): exit 0 as without the Ctrl-C, not 130 with "1 job left to run; run `runner work`
    again", which would not run it either (review pass 112)."""
    import workers
    from helpers import invoke, write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS[:2])
    home = tmp_path / "home"
    gpu = invoke("--home", home, "submit", prompts, "--model", tiny_gpt2, "--max-new-tokens", 2, "--device", "cuda",
                 "--priority", 1)  # (met first)  # fmt: skip
    assert gpu.exit_code == 0, gpu.output
    here = create_job(prompts, tiny_gpt2, dataclasses.replace(PARAMS, num_return_sequences=1), OPTIONS,
                      job_dir=home / "cpu")  # fmt: skip
    code, out = workers.run_worker(home, env_extra={"RUNNER_FAULT": "after_generate:1:SIGINT"})
    assert runner.status(here.dir).state == "completed" and "stopping after the current batch" in out, out
    assert code == 0 and "left to run" not in out, out


def test_a_run_stopped_at_once_says_so_in_its_log(tmp_path, reference, tiny_gpt2, gpt2_engine, monkeypatch):
    """A second Ctrl-C (or SIGTERM) stops `runner run` at once: its log.txt ended at "unit 0 ... rows to
    generate", with no word of how the run ended, where one Ctrl-C logs "stopped with ... done"."""
    import signal

    from runner.cli import Terminated

    for stop, said in (
        (KeyboardInterrupt(), "interrupted"),
        (Terminated(signal.SIGTERM), "terminated (SIGTERM)"),
    ):

        def generate(*a, _raised=stop, **kw):
            raise _raised

        monkeypatch.setattr(Engine, "generate", generate)
        with pytest.raises(KeyboardInterrupt):
            runner.run(reference[0], tiny_gpt2, PARAMS, OPTIONS, output=tmp_path / "job", engine=gpt2_engine,
                       echo=None)  # fmt: skip
        last = (tmp_path / "job" / "log.txt").read_text().splitlines()[-1]
        assert f"stopped at once: {said}; its finished batches are kept" in last, last


def test_a_run_stopped_at_once_keeps_its_line_in_stats(
    tmp_path, reference, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A notebook's stop button on `runner.run` (a second Ctrl-C, SIGTERM) wrote the finished batches but not the
    run's line in stats.json: `runner status` of the job, 4 of 12 rows done, said "speed: - tok/s" and "peak -",
    and the report left the run out; a run stopped before it computed anything still adds no line."""
    job = create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "job")
    with monkeypatch.context() as m:
        _interrupt_on(m, "generate", 1)
        with pytest.raises(KeyboardInterrupt):
            run_job(job, gpt2_engine, echo=None)
    assert job.read_stats()["runs"] == []
    with monkeypatch.context() as m:
        _interrupt_on(m, "generate", 3)
        with pytest.raises(KeyboardInterrupt):
            run_job(job, gpt2_engine, echo=None)
    (run,) = job.read_stats()["runs"]
    assert run["rows"] == 4 and run["tokens"] > 0, run
    status = runner.status(job.dir)
    assert status.done == 4 and status.tokens_per_second and status.peak_memory_bytes, status
    shown = invoke("status", job.dir).output
    assert "speed:    - tok/s" not in shown and "peak -" not in shown, shown
