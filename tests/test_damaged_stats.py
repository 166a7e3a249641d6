"""stats.json (each finished run: its speed, its peak memory) as `runner status` and `runner report` show it, when
the file is damaged (adversarial pass 142): the file had no checksum, so a flipped bit in a digit (valid JSON, a
run's peak memory or speed changed) was shown as the job's, with nothing said."""

import builtins
import errno
import json
import os

import pytest
from helpers import write_jsonl

import runner
from runner import EngineOptions, GenerationParams, storage
from runner.job_report import _bytes
from runner.jobs import create_job
from runner.worker import run_job


@pytest.fixture
def done_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(3)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=3),
                     EngineOptions(batch_size=2), home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    return job


def flip_a_digit(path, field):
    """Flip the low bit of a leading digit of `"field": NUMBER` (5 -> 4, 8 -> 9 ...; a leading 1 is left, as 0
    would make it no JSON number): still valid JSON, another value of the same size."""
    data = bytearray(path.read_bytes())
    at = data.index(f'"{field}": '.encode()) + len(field) + 4
    at += data[at : at + 2] in (b"1" + bytes([d]) for d in b"0123456789")
    data[at] ^= 1
    path.write_bytes(bytes(data))
    return json.loads(data)["runs"][0][field]


@pytest.mark.parametrize("field", ["peak_memory_bytes", "tokens_per_second"])
def test_a_flipped_digit_in_stats_json_is_not_shown_as_the_jobs(field, done_job, tmp_path):
    stats = done_job.dir / "stats.json"
    (run,) = json.loads(stats.read_text())["runs"]
    flipped = flip_a_digit(stats, field)
    assert flipped != run[field]
    status = runner.status(done_job.dir)
    assert status.state == "completed" and getattr(status, field) != flipped
    page = runner.report(done_job.dir, tmp_path / "r.html").read_text()
    shown = _bytes(flipped) if field == "peak_memory_bytes" else f"{flipped:,.1f}"  # as the report shows them
    assert f'<td class="num">{shown}</td>' not in page and f"Highest: {shown}" not in page


@pytest.mark.parametrize("damage", ["unreadable", "torn", "flipped"])
def test_a_report_whose_stats_json_does_not_read_says_so_not_that_no_run_finished(damage, done_job, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    """A completed job's report said "Peak memory was not recorded: no run has finished yet" when stats.json
    failed through the retries (a Drive mount), or was damaged."""
    stats = done_job.dir / "stats.json"
    if damage == "torn":
        stats.write_bytes(stats.read_bytes()[:40])
    elif damage == "flipped":
        flip_a_digit(stats, "peak_memory_bytes")
    else:
        monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
        real = builtins.open

        def failing(file, *args, **kwargs):
            if not isinstance(file, int) and os.fspath(file) == os.fspath(stats):
                raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", failing)
    page = runner.report(done_job.dir, tmp_path / "r.html").read_text()
    assert "no run has finished yet" not in page
    assert "stats.json" in page and (
        "could not be read" in page if damage == "unreadable" else "damaged" in page
    )
