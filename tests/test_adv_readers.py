"""Adversarial pass 251: the results as users read them, through `runner.load_results` and `runner results --to`,
and as a notebook user reads a job folder they know (`pd.read_parquet("jobs/ID/shards")`, a glob of *.parquet,
`datasets.load_dataset("parquet", data_dir=...)`, `pyarrow.dataset`).

Found: a passthrough column of lists or objects holding integers with a null among them (a list `[2**60 + 1,
None]`, an object missing from a row) came back from `load_results` (pandas) and in a CSV export as floats (7 as
7.0, 2**60 + 1 rounded); the README said nothing of reading shards/ directly, where a shard a killed worker left
before its marker (its rows computed again) or a superseded worker's late one shows each of its rows twice;
sorting a job's rows held it three times over in Arrow's memory; `runner results J --to prompts.jsonl` wrote
over the job's own input file.

Held: temp files in shards/ (`.NAME.HEX.tmp`) are skipped by every reader tried; a retry leaves no shard twice
(row errors live in markers); quarantine moves shards out of shards/; result columns and their types are the
same in every shard (optional columns by the job, not the rows), for generate (n > 1, logprobs), score and
embed; an export of a job still running says so and writes only the rows whose commits count; JSON, JSON Lines
and Parquet exports round-trip nested, unicode, NaN and 2**60-sized values.
"""

import csv
import glob
import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest
from helpers import write_jsonl
from workers import ROOT

import runner
from runner import GenerationParams
from runner.jobs import create_job
from runner.worker import run_job

BIG = 2**60 + 1  # float64 cannot hold it
# the pools memory is measured on, kept for the session: a buffer allocated from one (cached somewhere) that
# outlived its pool crashed the interpreter as it ended
POOLS: list[pa.MemoryPool] = []


@pytest.fixture
def nested_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    rows = [
        {"id": "a", "prompt": "the old man", "ids": [BIG, None], "meta": {"k": BIG + 2, "v": "日本"}},
        {"id": "b", "prompt": "every student", "ids": [7], "meta": None},
        {"id": "c", "prompt": "a cat", "ids": None, "meta": {"k": 3, "v": None}},
    ]
    write_jsonl(tmp_path / "p.jsonl", rows)
    params = GenerationParams(max_new_tokens=2, seed=1)
    job = create_job(tmp_path / "p.jsonl", tiny_gpt2, params, home=runner_home, unit_rows=1)
    assert run_job(job, gpt2_engine, echo=None, shard_rows=1).finished
    return job


def test_load_results_keeps_integers_inside_lists_and_objects_as_stored(nested_job):
    """pandas makes an integer child with a null a float: `[BIG, None]` read `[1.152921504606847e+18, nan]`,
    `{"k": 3}` read `{"k": 3.0}` (the sorted table's struct fields hold nulls where a row's object is null)."""
    stored = runner.load_results(nested_job.dir, format="arrow").select(["ids", "meta"]).to_pylist()
    assert stored[0] == {"ids": [BIG, None], "meta": {"k": BIG + 2, "v": "日本"}}
    df = runner.load_results(nested_job.dir)
    got = [{"ids": r["ids"], "meta": r["meta"]} for r in df.to_dict("records")]
    assert got == stored
    assert type(got[1]["ids"][0]) is int and type(got[2]["meta"]["k"]) is int
    # a list column without nulls stays as before: numpy arrays of its type
    assert str(df["token_ids"][0].dtype) == "int32"


def test_a_csv_export_writes_integers_inside_lists_and_objects_as_stored(nested_job, tmp_path):
    runner.export_results(nested_job.dir, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["ids"]) if r["ids"] else None for r in rows] == [[BIG, None], [7], None]
    assert json.loads(rows[0]["meta"]) == {"k": BIG + 2, "v": "日本"}
    assert json.loads(rows[2]["meta"]) == {"k": 3, "v": None}
    # and pandas reads the file back, the nested cells as JSON text
    back = pd.read_csv(tmp_path / "out.csv", encoding="utf-8-sig")
    assert back["id"].tolist() == ["a", "b", "c"] and json.loads(back["meta"][0])["k"] == BIG + 2


def test_the_readme_says_not_to_read_shards_directly_where_a_shard_that_does_not_count_doubles_rows(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A worker killed between its shard's rename and its marker leaves the shard in shards/ (it never counts:
    no marker vouches for it) and its rows are computed again in another commit. `load_results` reads each row
    once; every direct reader of shards/ reads those rows twice. The README's job folder section listed shards/
    as "results", and said nothing of this."""
    rows = [{"id": str(i), "prompt": f"row {i}"} for i in range(4)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    params = GenerationParams(max_new_tokens=2, seed=1)
    job = create_job(tmp_path / "p.jsonl", tiny_gpt2, params, home=runner_home, unit_rows=2)
    assert run_job(job, gpt2_engine, echo=None).finished
    shards = job.dir / "shards"
    # the shard a killed worker left: one of unit 0's, under a commit name no marker has
    shutil.copy(shards / "00000-00000000-0000.parquet", shards / "00000-00000000-0001.parquet")
    assert len(runner.load_results(job.dir)) == 4
    globbed = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{shards}/*.parquet"))])
    assert len(globbed) == 6 and len(pd.read_parquet(shards)) == 6
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    section = readme[readme.index("### Job folder") :]
    assert "not from `shards/` directly" in section
    assert "a row twice" in section and "`runner results JOB --to FILE.parquet`" in section


def test_a_nested_integer_column_without_nulls_is_left_to_pandas():
    """Only a column whose integers hold a null is given as Python objects; others keep pandas' arrays."""
    from runner.results import to_pandas

    table = pa.table({"l": pa.array([[1, 2], [3]], pa.list_(pa.int64())), "f": pa.array([[0.5, None], []])})
    df = to_pandas(table)
    assert str(df["l"][0].dtype) == "int64" and str(df["f"][0].dtype) == "float64"


def test_load_results_of_many_shards_holds_the_job_about_once(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """Sorting the whole job at once held it three times over in Arrow's memory (the shards, their columns
    combined, the sorted copy: 70 MB at the peak for 23 MB of results, 4,000 rows in 80 shards); a unit at a
    time it holds it about once (25 MB). Measured on a pool of its own, not timed."""
    rows = [{"id": str(i), "prompt": f"row {i}", "payload": f"{i:04d}" * 1000} for i in range(120)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    params = GenerationParams(max_new_tokens=2, seed=1)
    job = create_job(tmp_path / "p.jsonl", tiny_gpt2, params, home=runner_home, unit_rows=10)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert len(list((job.dir / "shards").iterdir())) >= 8
    default, pool = pa.default_memory_pool(), pa.proxy_memory_pool(pa.default_memory_pool())
    POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        table = runner.load_results(job.dir, format="arrow")
    finally:
        pa.set_memory_pool(default)
    assert table.column("id").to_pylist() == [str(i) for i in range(120)]
    assert pool.max_memory() < 1.5 * table.nbytes, (pool.max_memory(), table.nbytes)


@pytest.mark.parametrize("option", ["--to", "--errors-to"])
def test_an_export_never_writes_over_the_jobs_input_file(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, option
):
    """`runner results night1 --to prompts.jsonl` (the name a user had typed a moment before, for submit) wrote
    the results over the prompts the job was submitted from, without a word: the user's file gone, and `runner
    repair` could no longer write prompts.parquet again from it. run-batch refused its requests file already."""
    from helpers import invoke

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hi"}])
    before = prompts.read_bytes()
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2, seed=1), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    result = invoke("results", job.id, option, str(prompts))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{prompts} is the input file of job {job.id}" in " ".join(result.output.split()), result.output
    assert prompts.read_bytes() == before
    # a link to it is the same file; another name is written
    (tmp_path / "link.jsonl").symlink_to(prompts)
    with pytest.raises(runner.RunnerError, match="is the input file of job"):
        runner.export_results(job.id, tmp_path / "link.jsonl")
    assert runner.export_results(job.id, tmp_path / "out.jsonl").rows == 1 and prompts.read_bytes() == before


def test_rows_come_in_input_order_whatever_order_units_come_in_and_an_empty_shard_among_them(
    nested_job, monkeypatch
):
    """Units are sorted one at a time and joined: units read out of order (a ledger listing them so), and a
    shard of no rows among them, still give every row once, in input order."""
    from runner import results

    real = results.shard_tables
    pairs = list(real(nested_job))
    assert len(pairs) == 3

    def shuffled(job, columns=None, ledger=None):
        (c0, t0), (c1, t1), (c2, t2) = pairs
        yield from [(c2, t2), (c1, t1.slice(0, 0)), (c0, t0), (c1, t1)]

    monkeypatch.setattr(results, "shard_tables", shuffled)
    ids = runner.load_results(nested_job.dir, format="arrow").column("id").to_pylist()
    assert ids == ["a", "b", "c"]
