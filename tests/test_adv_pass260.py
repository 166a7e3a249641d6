"""Adversarial pass 260: the readers of a job folder on a mount that fails some reads for good (a Google Drive file
that cannot be served for hours): `runner status` (of the home and of one job), `runner.status`, `runner watch`,
`runner cancel`, `runner.load_results`, `runner report` and the exports.

Found, and kept fixed below:
  * `runner.status(JOB)` raised StorageError ("cannot read .../state/00000002.json: Input/output error") where the
    job's newest state record (or a commit's marker, the listing of done/ ...) did not read through the retries,
    while `runner.status()` listed the same job as `unreadable` with that reason: a notebook polling one job
    stopped on a minute-long Drive outage, `runner status JOB` exited 1 ("Error: cannot read ...") and `runner
    status JOB --json` printed no JSON, `runner watch JOB` stopped watching, and `runner cancel JOB`, which looks
    at the status only to say what the job was, refused to cancel a job whose shard did not read (the cancel
    itself reads only the state). One job is now shown as the listing shows it: `unreadable`, naming the file.
  * `runner status` listed such a job `unreadable` in its table and said nothing more: which file did not read
    was said for a broken, failed or queued job below the table, never for an unreadable one.
  * `runner.load_results` and `runner results --to` of a completed job failed ("cannot read .../state/00000003.json:
    Input/output error") for as long as its newest state record (or the listing of state/) did not read, every
    row of the job in its verified shards; a state that stopped reading just after the rows were read gave them,
    with a warning. Its rows count whatever the state says (a `runner retry` keeps them; the state only says
    which row errors count): they are read, whole without a word, or, rows missing, with the warning that
    whether the rest are still to come could not be read (an export of them exits 1, as it did).
"""

from __future__ import annotations

import errno
import json
import warnings

import pytest
from fsfaults import Unreadable
from helpers import invoke, reference_run, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.worker import run_job

ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(6)]
PARAMS, OPTIONS = GenerationParams(max_new_tokens=3), EngineOptions(batch_size=2)


@pytest.fixture
def sick(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """A job with 4 of its 6 rows done, cancelled and re-queued (records 1 and 2), and another job queued beside it."""
    prompts, _ = reference_run(tmp_path, tiny_gpt2, ROWS, PARAMS, OPTIONS)
    job = create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, name="sick", unit_rows=2)
    stopped = iter([False, False, True])
    run_job(job, gpt2_engine, echo=None, should_stop=lambda: next(stopped, True), shard_rows=2)
    runner.cancel(job.dir)
    runner.retry(job.dir)
    create_job(write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "prompt": "Hello"}]), tiny_gpt2,
               GenerationParams(max_new_tokens=2), home=runner_home, name="well")  # fmt: skip
    return job


BAD = ["state/00000002.json", "done/00000-00000000-0000.json", "shards/00000-00000000-0000.parquet", "done",
       "claims", "job.json"]  # fmt: skip


@pytest.mark.parametrize("bad", BAD)
def test_one_job_that_does_not_read_is_shown_unreadable_as_the_listing_shows_it(bad, sick, runner_home,
                                                                               monkeypatch):  # fmt: skip
    path = sick.dir / bad
    Unreadable(runner_home, [path]).install(monkeypatch)
    listed = {s.name: s for s in runner.status(home=runner_home)}["sick"]
    assert listed.state == "unreadable", listed
    shown = runner.status(sick.dir)
    assert (shown.state, shown.message, shown.id) == (listed.state, listed.message, sick.id), shown
    assert f"cannot read {path}" in shown.message or f"cannot list {path}" in shown.message, shown
    assert "repair" not in shown.message
    assert f"{sick.id}: {shown.message}" in invoke("status").output.splitlines()
    result = invoke("status", sick.dir)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[1] == f"state:    unreadable - {shown.message}", result.output
    assert "runner report" not in result.output, result.output
    result = invoke("status", sick.dir, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["state"] == "unreadable", result.output
    monkeypatch.undo()
    assert runner.status(sick.dir).state == "queued (interrupted)"


def test_one_job_denied_to_this_user_is_shown_broken_as_the_listing_shows_it(sick, runner_home, monkeypatch):
    """A state record this user may not read (another user's, umask 077): no wait brings it back, so the listing
    shows the job broken with the permissions hint, not `unreadable`; `runner.status(JOB)` raised instead."""
    newest = sick.dir / "state" / "00000002.json"
    Unreadable(runner_home, [newest], err=errno.EACCES).install(monkeypatch)
    listed = {s.name: s for s in runner.status(home=runner_home)}["sick"]
    shown = runner.status(sick.dir)
    assert (shown.state, shown.message) == (listed.state, listed.message) == ("broken", shown.message), shown
    assert f"cannot read {newest}: Permission denied" in shown.message and "ls -ld" in shown.message, shown
    assert "runner repair" not in shown.message  # (repair cannot help: the permissions must change first)


def test_watch_goes_on_through_a_poll_that_does_not_read(sick, gpt2_engine, runner_home, monkeypatch):
    """`runner watch JOB` stopped ("Error: cannot read ...") at the first poll the mount could not serve."""
    from runner.background import watch
    from runner.scheduler import work

    work(runner_home, engine=gpt2_engine, echo=None)
    faults = Unreadable(runner_home, [sick.dir / "state" / "00000003.json"]).install(monkeypatch)
    lines = []

    def sleep(seconds):
        faults.bad.clear()  # the mount serves it again at the next poll

    final = watch(sick.dir, runner_home, every=5, echo=lines.append, sleep=sleep)
    assert final.state == "completed", lines
    assert f"unreadable: ? | - tok/s | ETA - | cannot read {sick.dir / 'state' / '00000003.json'}" in lines[0]


def test_cancel_of_a_job_whose_shard_does_not_read_cancels_it(sick, runner_home, monkeypatch):
    """`runner cancel` looked at the job's status first, only to say what it was; a shard that did not read made
    it exit 1 without cancelling, where the cancel reads only the job's state."""
    Unreadable(runner_home, [sick.dir / "shards" / "00000-00000000-0000.parquet"]).install(monkeypatch)
    result = invoke("cancel", sick.dir)
    assert result.exit_code == 0, result.output
    assert f"cancelled job {sick.dir} (was unreadable)" in result.output, result.output
    monkeypatch.undo()
    assert runner.status(sick.dir).state == "cancelled"


@pytest.mark.parametrize("bad", ["state/00000003.json", "state"])
def test_the_results_of_a_completed_job_whose_state_does_not_read_are_read_whole(
    bad, sick, gpt2_engine, runner_home, monkeypatch, tmp_path
):
    """Every row of the job is in its verified shards, but its newest state record (or the listing of state/) did
    not read through the retries: `load_results` and `runner results --to` failed ("cannot read .../state/..."),
    for as long, where a state that stopped reading after the rows were read gave the rows with a warning. The
    rows count whatever the state says (a retry keeps them): all there, they are the job's results."""
    from runner.scheduler import work

    work(runner_home, engine=gpt2_engine, echo=None)
    whole = runner.load_results(sick.dir)
    Unreadable(runner_home, [sick.dir / bad]).install(monkeypatch)
    assert runner.status(sick.dir).state == "unreadable"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all its rows: nothing to say
        assert runner.load_results(sick.dir).equals(whole)
    result = invoke("results", sick.dir, "--to", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == list(
        whole["id"]
    )


def test_the_results_of_a_partial_job_whose_state_does_not_read_are_said_to_be_partial(sick, runner_home,
                                                                                      monkeypatch, tmp_path):  # fmt: skip
    """4 of the 6 rows, the state not read: the rows are given with a warning that whether the rest are still to come
    could not be read, and an export of them exits 1 (as where the state stopped reading after the rows)."""
    newest = sick.dir / "state" / "00000002.json"
    Unreadable(runner_home, [newest]).install(monkeypatch)
    with pytest.warns(UserWarning, match=f"these are 4 of its 6 results, and whether the rest are still to come could "
                                         f"not be read \\(cannot read {newest}"):  # fmt: skip
        assert len(runner.load_results(sick.dir)) == 4
    result = invoke("results", sick.dir, "--to", tmp_path / "out.jsonl")
    assert result.exit_code == 1 and "its other 2 rows may be lost" in result.output, result.output
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4
