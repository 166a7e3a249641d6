"""Adversarial pass 266: exports of a large job, and exports under faults (Ctrl-C, a read error mid-way).

Found, and kept fixed below:
  * `runner results J --to FILE` (.jsonl, .json, .csv, .parquet, with or without --errors-to) and `--format
    openai` held the job's whole results table in memory before writing the first line (`load_results` read
    every shard, then joined them): ~0.7 KB a row of a real job, so a million rows took 0.7 GB more than the
    export needed, on a Colab of 12. The rows are read, sorted and written a unit at a time
    (`results.result_parts`); the files are the same bytes (a Parquet export: the same table, a row group a
    unit). Measured on a synthetic job of 200,000 rows (pyarrow's peak): 28 MB before, 4 MB after, and flat.
  * `runner results J` (the preview: 20 rows and a count) loaded the whole job into pandas to show them (a
    million rows: gigabytes, more than the export). It reads a unit at a time (`results.preview_results`); the
    same lines print.
  * `--format openai` took ~2 ms a request beyond the answer itself: each request's rows were a pandas DataFrame
    (split out of a chunk with groupby, then read with iterrows): 200,000 requests took 300 s (a million, ~25
    minutes), where the table export takes 5 s. They are Python dicts from Arrow: 22 s, the same bytes.
  * `--format openai` onto a full disk (or a folder that refuses new files) deleted the older output and errors
    file first, then failed to copy the new ones in: exit 1 with the older export gone and no new one. Both new
    files are copied beside their names (`storage.staged_publish`) before either older one is touched.

Kept as they were, now that the rows stream: a Ctrl-C (or a read failing) with half the rows written leaves the
export already there as it was and no temp file beside it; a shard the mount fails to read mid-way is said as the
read it is (exit 1), not as "cannot write FILE"; units a ledger lists out of order are written whole, in input
order, as before.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import invoke

import runner
from runner import GenerationParams, jobdir, results, storage
from runner.engine import Completion
from runner.jobs import create_job
from runner.results import GeneratedRow, completions_table, write_local_shard

UNIT = 8


def synthetic_job(root: Path, model: str, n: int, unit_rows: int = UNIT, shard_rows: int = 3,
                  units: set[int] | None = None, errors: dict[int, str] | None = None) -> jobdir.Job:  # fmt: skip
    """A generation job of `n` rows whose shards and markers are written here, as a worker writes them, without a
    model (a few shards a unit); completed unless `units` says which units are done. `errors`: rows that failed
    (row -> message), each a row error of its unit's last commit."""
    root.mkdir(parents=True, exist_ok=True)
    src = root / "p.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"the old man {i} said"}) + "\n" for i in range(n))
    )
    job = create_job(
        src, model, GenerationParams(max_new_tokens=4), job_dir=root / "job", unit_rows=unit_rows
    )
    prompts = pq.read_table(job.dir / jobdir.PROMPTS)
    errors = errors or {}
    for u, start in enumerate(range(0, n, unit_rows)):
        if units is not None and u not in units:
            continue
        stop = min(start + unit_rows, n)
        commits = list(range(start, stop, shard_rows))
        for seq, a in enumerate(commits):
            b = min(a + shard_rows, stop)
            done = [r for r in range(a, b) if r not in errors]
            failed = [{"id": f"r{r}", "line": r + 1, "row": r, "sample": 0, "stage": "generate", "error": "oom",
                       "message": errors[r]} for r in range(a, b) if r in errors]  # fmt: skip
            marker = {"format": jobdir.FORMAT, "unit": u, "epoch": 0, "seq": seq, "worker": "w-synthetic",
                      "generation": 0, "shard": None, "rows": len(done), "keys": jobdir.key_ranges(done),
                      "errors": failed, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "batches": []}  # fmt: skip
            if done:
                gen = [GeneratedRow(r - start, 0, Completion([5, 6, 7, 0], [-1.5, -0.25, -3.0, -0.5],
                                                             f" text of row {r}", "stop", None)) for r in done]  # fmt: skip
                name = jobdir.commit_name(u, 0, seq)
                with write_local_shard(completions_table(prompts.slice(start, stop - start), gen, None, {}),
                                       {"job": job.id, "kind": "generate"}) as (local, digest):  # fmt: skip
                    storage.ensure_dir(job.dir / jobdir.SHARDS)
                    storage.publish(local, job.dir / jobdir.SHARDS / f"{name}.parquet")
                    marker.update(shard=f"{name}.parquet", bytes=local.stat().st_size, sha256=digest)
            jobdir.write_marker(job, u, 0, seq, marker)
    if units is None:
        jobdir.write_completed(job.dir, jobdir.read_state(job.dir))
    return job


@pytest.fixture
def big_job(tmp_path, tiny_gpt2):
    return synthetic_job(tmp_path / "big", tiny_gpt2, 8 * UNIT)


@pytest.fixture
def rows_held(monkeypatch):
    """The most result rows (sorted unit tables, `results._in_order`) alive at once while it is in use, counted
    as each is made and let go (weakref), not by memory measured (which flakes)."""
    real, alive, most = results._in_order, [0], [0]

    def counted(tables, samples):
        table = real(tables, samples)
        alive[0] += table.num_rows
        most[0] = max(most[0], alive[0])
        weakref.finalize(table, lambda n=table.num_rows: alive.__setitem__(0, alive[0] - n))
        return table

    monkeypatch.setattr(results, "_in_order", counted)
    return most


@pytest.mark.parametrize(
    "name", ["out.jsonl", "out.json", "out.csv", "out.parquet", "pair.jsonl", "openai.jsonl"]
)
def test_an_export_holds_a_unit_of_rows_at_a_time(big_job, rows_held, tmp_path, name):
    """Every row is written, and no more than two units' rows (the one written and the next) are held at once.
    Before, the export read the whole job (64 rows) into one table first."""
    out = tmp_path / name
    if name.startswith("pair"):
        written = runner.export_results(big_job.dir, out, errors_to=tmp_path / "errors.csv")
    elif name.startswith("openai"):
        written = runner.export_results(big_job.dir, out, format="openai")
    else:
        written = runner.export_results(big_job.dir, out)
    assert written.rows == 8 * UNIT and not written.lost
    assert 0 < rows_held[0] <= 2 * UNIT, rows_held[0]


def _whole(job, to: Path) -> None:
    """The export as it was written before it streamed: the whole table at once."""
    results._write_whole(runner.load_results(job.dir, format="arrow"), to)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_streamed_export_is_the_whole_tables_export(big_job, tmp_path, suffix):
    """The same bytes as the whole table written at once; a Parquet file the same table (a row group a unit)."""
    runner.export_results(big_job.dir, tmp_path / f"streamed{suffix}")
    _whole(big_job, tmp_path / f"whole{suffix}")
    streamed, whole = tmp_path / f"streamed{suffix}", tmp_path / f"whole{suffix}"
    if suffix == ".parquet":
        assert pq.read_table(streamed).equals(pq.read_table(whole))
        assert pq.read_schema(streamed).equals(pq.read_schema(whole), check_metadata=True)
        assert pq.ParquetFile(streamed).metadata.num_row_groups == 8
    else:
        assert streamed.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", "openai"])
def test_units_read_out_of_order_are_exported_whole_in_input_order(big_job, tmp_path, monkeypatch, suffix):
    """A ledger listing units out of order (no worker writes one; a copied folder might): the rows cannot be
    written a unit at a time in input order, and are written from the whole table, as before."""
    fmt, suffix = ("openai", ".jsonl") if suffix == "openai" else ("table", suffix)
    if fmt == "openai":
        runner.export_results(big_job.dir, tmp_path / f"whole{suffix}", format=fmt)
    else:
        _whole(big_job, tmp_path / f"whole{suffix}")
    real = results.shard_tables

    def backwards(job, columns=None, ledger=None):
        yield from sorted(real(job, columns, ledger), key=lambda pair: -pair[0].unit)

    monkeypatch.setattr(results, "shard_tables", backwards)
    assert runner.export_results(big_job.dir, tmp_path / f"out{suffix}", format=fmt).rows == 8 * UNIT
    if suffix == ".parquet":
        assert pq.read_table(tmp_path / f"out{suffix}").equals(pq.read_table(tmp_path / f"whole{suffix}"))
    else:
        assert (tmp_path / f"out{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()


def _interrupted_after(monkeypatch, parts: int, error: BaseException) -> None:
    """The job's rows read, then `error` once `parts` units were (a Ctrl-C, a mount failing mid-way)."""
    real = results.result_parts

    def then_fail(job, ledger=None, **kw):
        for i, part in enumerate(real(job, ledger, **kw)):
            if i == parts:
                raise error
            yield part

    monkeypatch.setattr(results, "result_parts", then_fail)


def _left_beside(folder: Path) -> list[str]:
    """The files in `folder` (temp files included), the job's folder and the job home left out."""
    return sorted(p.name for p in folder.iterdir() if p.name not in ("big", "home"))


@pytest.mark.parametrize(
    "name", ["out.jsonl", "out.json", "out.csv", "out.parquet", "pair.jsonl", "openai.jsonl"]
)
def test_ctrl_c_mid_export_leaves_the_old_file_and_no_temp_file(big_job, tmp_path, monkeypatch, name):
    """Ctrl-C with half the rows written: the export already there stays as it was, nothing else is left."""
    folder = tmp_path / "exports"
    folder.mkdir()
    out, errors = folder / name, folder / "errors.jsonl"
    out.write_text("an older export\n")
    errors.write_text("its errors\n")
    _interrupted_after(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        if name.startswith("pair"):
            runner.export_results(big_job.dir, out, errors_to=errors)
        elif name.startswith("openai"):
            runner.export_results(big_job.dir, out, format="openai", errors_to=errors)
        else:
            runner.export_results(big_job.dir, out)
    assert out.read_text() == "an older export\n" and errors.read_text() == "its errors\n"
    assert _left_beside(folder) == sorted([name, "errors.jsonl"])


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet", "openai.jsonl"])
def test_a_read_failing_mid_export_is_said_as_a_read(big_job, tmp_path, monkeypatch, runner_home, name):
    """A shard the mount fails to read through the retries, half the rows written: `runner results` says what
    could not be read (exit 1), not that the export could not be written; the old file stays."""
    failure = storage.StorageError(f"cannot read {big_job.dir}/shards/00004-00000000-0000.parquet: Input/output "
                                   "error")  # fmt: skip
    _interrupted_after(monkeypatch, 4, failure)
    out = tmp_path / name
    out.write_text("an older export\n")
    args = ("--format", "openai") if name.startswith("openai") else ()
    result = invoke("--home", runner_home, "results", big_job.dir, "--to", out, *args)
    assert result.exit_code == 1, result.output
    assert "cannot read" in result.output and "cannot write" not in result.output, result.output
    assert out.read_text() == "an older export\n" and _left_beside(tmp_path) == [name]


def test_a_full_disk_leaves_an_older_openai_pair_as_it_was(big_job, tmp_path, monkeypatch, runner_home):
    """The disk of the exports full (a file cannot be written there; one can be deleted): `--format openai` says
    so (exit 1) and the older output and errors file stand as they were, no temp file beside them. Before, the
    older pair was deleted first, then the new files failed to copy in: the older export gone, no new one."""
    import errno
    import os

    folder = tmp_path / "exports"
    folder.mkdir()
    out, errors = folder / "out.jsonl", folder / "out.errors.jsonl"
    out.write_text("an older export\n")
    errors.write_text("its errors\n")
    real = open

    def full(path, mode="r", *a, **k):
        if "w" in mode and Path(path).parent == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real(path, mode, *a, **k)

    monkeypatch.setattr(storage, "open", full, raising=False)
    result = invoke("--home", runner_home, "results", big_job.dir, "--to", out, "--format", "openai")
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert out.read_text() == "an older export\n" and errors.read_text() == "its errors\n"
    assert _left_beside(folder) == ["out.errors.jsonl", "out.jsonl"]


def test_the_openai_export_calls_into_pandas_no_more_for_more_requests(big_job, tmp_path):
    """Counted, not timed: the calls into pandas' code while the requests are turned into lines, which before
    were ~1,000 a request (a DataFrame a request, read with iterrows); now none of a request's."""
    import os
    import sys

    from runner import openai_batch

    in_pandas, calls = f"{os.sep}pandas{os.sep}", [0]

    def profile(frame, event, arg):
        if event == "call" and in_pandas in frame.f_code.co_filename:
            calls[0] += 1

    with jobdir.opened_job(big_job.dir) as job:
        openai_batch._token_text(job)  # (the tokenizer loaded first: its own imports are not the export's)
        sys.setprofile(profile)
        try:
            assert openai_batch.export(job, tmp_path / "out.jsonl").rows == 8 * UNIT
        finally:
            sys.setprofile(None)
    assert calls[0] < 8 * UNIT * 10, calls[0]


def test_the_preview_of_results_reads_a_unit_at_a_time(big_job, rows_held, runner_home):
    """`runner results J` (no --to) shows the first 20 rows and the count of all, holding a unit or two of rows,
    not the whole job in pandas (before: all 64 rows, ~5x their Arrow size)."""
    result = invoke("--home", runner_home, "results", big_job.dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-1] == "(64 rows; --to FILE to export)" and len(lines) == 1 + 20 + 1, result.output
    assert " r19 " in lines[-2] and "r20" not in result.output
    assert 0 < rows_held[0] <= 2 * UNIT, rows_held[0]


def test_the_preview_of_a_job_half_done_says_the_rest_are_to_come(tmp_path, tiny_gpt2, runner_home):
    job = synthetic_job(tmp_path / "half", tiny_gpt2, 4 * UNIT, units={0, 2})
    result = invoke("--home", runner_home, "results", job.dir)
    assert result.exit_code == 0, result.output
    assert "these are 16 of its 32 results (the rest are not computed yet)" in result.output, result.output
    assert result.output.splitlines()[-1] == "(16 rows; --to FILE to export)"
