"""Readers and exports of a job under faults that land between their steps (adversarial pass 192): what a
reader returns is a consistent set, and an export of a completed job holds every row once; where it cannot, it
says so. What was found:

* a completed job with a row error (its rows fall short of its total by that error) was asked about a second
  time after its rows were read, and what that second look said was taken over the rows read: a commit damaged
  since, or a mount failing for a moment, made `runner results --to` exit 1, "written, but without rows the
  job had", over a file holding every row and an errors file explaining the one failed.
"""

import errno
import json

import pytest
from helpers import completed_with_a_row_error, invoke, write_jsonl

from runner import EngineOptions, GenerationParams, jobdir, results, storage
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said that " * (1 + i % 3)} for i in range(8)]


def _completed_with_r1_failed(tmp_path, model, engine, home, monkeypatch):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), model, PARAMS, OPTIONS, home=home, unit_rows=2)
    completed_with_a_row_error(job, engine, monkeypatch)
    return job


def _damage_a_shard(job, monkeypatch):
    """A commit's shard changed on disk (its stamp dropped, so the next look reads it again)."""
    shard = sorted((job.dir / jobdir.SHARDS).iterdir())[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    (job.dir / "verified.json").unlink()


def _mount_fails(job, monkeypatch):
    """The listing of done/ failing through the retries (a mount gone for a minute)."""
    real = jobdir.scan

    def scan(folder, dirs=False):
        if folder == job.dir / jobdir.MARKERS:
            raise storage.StorageError(f"cannot list {folder}: Input/output error (errno 5)", errno.EIO)
        return real(folder, dirs)

    monkeypatch.setattr(jobdir, "scan", scan)


@pytest.mark.parametrize("after", [_damage_a_shard, _mount_fails], ids=["damaged", "unreadable"])
def test_a_whole_export_of_a_completed_job_is_not_said_to_lack_rows_by_a_later_look(
    after, tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    job = _completed_with_r1_failed(tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch)
    real, hit = results.read_results_table, []

    def read_then_fault(j, *ledger):
        table = real(j, *ledger)
        hit.append(after(job, monkeypatch))
        return table

    monkeypatch.setattr(results, "read_results_table", read_then_fault)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = invoke("--home", runner_home, "results", job.id, "--to", out, "--errors-to", errors)
    assert hit and result.exit_code == 0, result.output
    rows = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert rows == [r["id"] for r in ROWS if r["id"] != "r1"]
    assert [json.loads(line)["id"] for line in errors.read_text().splitlines()] == ["r1"]
