"""`runner work --background` (a detached worker, output in HOME/logs/) and `runner watch` (status lines until the
job ends): the notebook kernel stays free while the work goes on."""

import pytest
from helpers import PROMPTS, invoke, write_jsonl

import runner
from runner import GenerationParams
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


def test_watch_says_so_when_no_worker_runs_the_job(tmp_path, tiny_gpt2):
    home = tmp_path / "home"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = runner.submit(f, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home)
    lines, sleeps = [], []
    from runner.background import watch

    final = watch(job.id, home, every=5, echo=lines.append, sleep=sleeps.append)
    assert final.state == "queued" and len(sleeps) == IDLE_POLLS - 1
    assert (
        lines[-1]
        == f"no worker is running job {job.id}: start one with `runner work` (or `runner work --background`)"
    )
    result = invoke("--home", home, "watch", job.id, "--every", 0.01)
    assert result.exit_code == 1 and "no worker is running job" in result.output
