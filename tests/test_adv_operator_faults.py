"""Operator commands (`runner status`, `cancel`, `retry`, `repair`, `results --to`) under faults that combine
(adversarial pass 198): a command killed half way, then the next one meeting a transient read error. What was
found:

* without hard links, a `runner cancel` or `runner retry` killed between the create and the fill of its state
  record leaves it empty: after STATE_PATIENCE_SECONDS the job is broken and `runner repair` brings it back. One
  EIO on the stat that dates that record read as "made just now": `runner cancel` and `runner retry` said "a
  change of state is being written ... try again in a moment", `runner status` showed the state below it as
  standing ("cancelled - a change of state is being written (0 s ago)"), and `runner results --to` exported the
  job as cancelled (exit 0), where each says the job is broken and names `runner repair` without the EIO.

Held (kept here where cheap): a pair export and an OpenAI Batch export with `runner retry` (and its worker)
landing after each read of the commits; each command of status / cancel / retry / repair / results over a
killed or damaged state with transient EIO in every folder of the job; repair, retry and cancel killed at each
fault point, then run again under EIO; a worker frozen past its lease (and one alive mid-commit) while retry,
repair and damage to a state record or a marker land, thawed after another worker finished.
"""

import errno
import os

import pytest
from fsfaults import FsFaults
from helpers import invoke, write_jsonl

from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"the old man said {i}"} for i in range(4)]


def _no_links(monkeypatch) -> None:
    """This process on a file system without hard links (as Colab's Drive mount), the faults' link too."""
    import fsfaults

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(jobdir, "_LINKS", {})
    monkeypatch.setitem(fsfaults.REAL, "link", link)
    monkeypatch.setattr(os, "link", link)


@pytest.fixture
def killed_half_way(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """A cancelled job whose `runner retry` was killed, without hard links, between the create and the fill of
    its record: an empty newest record, made long ago (the job is broken, `runner repair` mends it)."""
    _no_links(monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    job.set_state(jobdir.JobState.CANCELLED)
    empty = job.dir / jobdir.STATES / jobdir.record_name(jobdir.newest_state_seq(job.dir) + 1)
    empty.write_bytes(b"")
    os.utime(empty, (1, 1))
    return job


COMMANDS = {
    "status": (("status",), 0, "broken - state/00000002.json is damaged (it is empty"),
    "cancel": (("cancel",), 1, "is broken (state/00000002.json is damaged (it is empty"),
    "retry": (("retry",), 1, "is broken (state/00000002.json is damaged (it is empty"),
    "export": (("results", "--to", "OUT"), 1, "is broken (state/00000002.json is damaged (it is empty"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_empty_record_left_long_ago_is_not_taken_for_one_being_written_over_one_eio(
    command, killed_half_way, tmp_path, runner_home, monkeypatch
):
    """Every first read, listing and stat in state/ fails once (EIO or ENOTCONN), the next succeeds: each
    command says what it says without the faults, the job broken and `runner repair` named."""
    job = killed_half_way
    args, code, says = COMMANDS[command]
    args = [tmp_path / "o.parquet" if a == "OUT" else a for a in args]
    args.insert(1, job.id)
    FsFaults(job.dir, eio=1.0, eio_dirs=("state",), retry_delays=[0.0] * 4).install(monkeypatch)
    result = invoke("--home", runner_home, *args)
    assert result.exit_code == code and says in result.output, result.output
    assert "being written" not in result.output and "runner repair" in result.output, result.output
    monkeypatch.undo()
    _no_links(monkeypatch)
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0 and "state broken (" in result.output and "-> cancelled" in result.output, (
        result.output
    )


ROWS8 = [{"id": f"r{i}", "prompt": "the old man said that " * (1 + i % 3)} for i in range(8)]


@pytest.fixture(scope="module")
def with_a_row_error(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """A job completed with row r1 failed (a row error), in units of 2, to copy."""
    from helpers import completed_with_a_row_error

    root = tmp_path_factory.mktemp("adv198")
    mp = pytest.MonkeyPatch()
    try:
        job = create_job(write_jsonl(root / "p.jsonl", ROWS8), tiny_gpt2, PARAMS, OPTIONS, home=root / "h",
                         unit_rows=2)  # fmt: skip
        completed_with_a_row_error(job, gpt2_engine, mp)
    finally:
        mp.undo()
    return job.dir


@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("then", ["retry", "retry+work"])
@pytest.mark.parametrize("export", ["pair", "openai"])
def test_an_export_with_a_retry_landing_at_each_read_of_the_commits_has_each_row_once(
    export, then, nth, with_a_row_error, tmp_path, runner_home, gpt2_engine, monkeypatch
):
    """Held (pass 198): `runner retry` re-opening the failed row r1 (and a worker computing it) right after the
    export's n-th read of the job's commits: each request is in the output or in the errors file, never both
    and never neither, exit 0 (the pair as before the retry, or as after its worker)."""
    import json
    import shutil

    from runner.worker import run_job

    job_dir = runner_home / with_a_row_error.name
    shutil.copytree(with_a_row_error, job_dir)
    real, calls = jobdir.read_ledger, []

    def read_ledger(*a, **k):
        ledger = real(*a, **k)
        calls.append(1)
        if len(calls) == nth:
            jobdir.retry(jobdir.Job.open(job_dir))
            if then == "retry+work":
                run_job(jobdir.Job.open(job_dir), gpt2_engine, echo=None)
        return ledger

    monkeypatch.setattr(jobdir, "read_ledger", read_ledger)
    out, errors = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    how = ("--format", "openai") if export == "openai" else ()
    result = invoke("--home", runner_home, "results", job_dir.name, *how, "--to", out, "--errors-to", errors)
    assert result.exit_code == 0 and len(calls) >= nth, result.output
    rows = [
        json.loads(line).get("custom_id", json.loads(line)["id"]) for line in out.read_text().splitlines()
    ]
    failed = [
        json.loads(line).get("custom_id", json.loads(line)["id"]) for line in errors.read_text().splitlines()
    ]
    assert sorted(rows + failed) == [r["id"] for r in ROWS8], (rows, failed)
