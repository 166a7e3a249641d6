"""The output side of `runner run-batch` (adversarial pass 191): what cannot be written is refused before the run."""

import json
import os
from pathlib import Path

import pytest
from helpers import invoke, write_jsonl

from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def test_run_batch_refuses_an_errors_file_name_too_long_before_the_run(tmp_path, tiny_gpt2):
    """`-o` with a legal 250-byte name whose default errors file (`.errors` inserted) is over the 255 bytes a
    file name may have: the whole batch ran, then its export failed ("cannot read ...: File name too long"),
    and so did every run again, so its output could never be written. Refused before anything runs, naming
    the file, as the other problems of the output are (adversarial pass 191)."""
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "Every student", "max_tokens": 2}}  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", [request])
    out = tmp_path / ("x" * 244 + ".jsonl")
    result = invoke("run-batch", "-i", inp, "-o", out, "--model", tiny_gpt2, "--served-model-name", "tiny")
    assert result.exit_code != 0, result.output
    assert ".errors.jsonl" in result.output and "255" in result.output, result.output
    assert not out.with_name(out.name + ".job").exists(), "the batch ran before its output was refused"
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    assert json.loads(inp.read_text()) == request


@pytest.mark.parametrize("always", [False, True])
@pytest.mark.parametrize("rows", [True, False])
def test_an_errors_export_whose_listing_missed_the_commit_of_a_row_error_is_not_whole(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch, rows, always
):
    """A job completed with row r1 failed; `runner results --to f --errors-to e` (or `--errors-to e` alone)
    read the errors through a listing of done/ that missed the commit holding r1's error (a mount that shows
    files late, as the rows' own read is guarded against), and its rows through one that saw all. r1 was in
    neither file, exit 0, with no word: an errors file silently missing an error. Now the errors are read again
    (the listing caught up: r1's error is there), or, where every listing misses it (`always`), exit 1 saying
    so (adversarial pass 191)."""
    from helpers import completed_with_a_row_error

    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=2)  # fmt: skip
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    real, missed = jobdir.scan, []

    def scan(folder, dirs=False):  # the first listing of done/ misses the marker of r1's error
        names = real(folder, dirs)
        if os.path.basename(folder) == "done" and (always or not missed):
            erred = [n for n in names if json.loads((Path(folder) / n).read_text()).get("errors")]
            missed.extend(erred)
            names = [n for n in names if n not in erred]
        return names

    monkeypatch.setattr(jobdir, "scan", scan)
    args = ("--to", tmp_path / "out.jsonl") if rows else ()
    result = invoke("--home", runner_home, "results", job.id, *args, "--errors-to", tmp_path / "e.jsonl")
    assert missed, "no marker held the row error"
    errors = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    if always:
        # (with the rows, whose read missed the same commit, their loss is what is said)
        assert result.exit_code == 1 and "was written, but without rows" in result.output, result.output
        assert rows or f"{tmp_path / 'e.jsonl'} was written" in result.output, result.output
    else:
        assert result.exit_code == 0 and [e["id"] for e in errors] == ["r1"], (result.output, errors)
