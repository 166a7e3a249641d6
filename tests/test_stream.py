"""Big files in bounded memory: submit reads, checks and writes the prompts a chunk at a time, the worker reads
them a window at a time; nothing about the results changes. Chunk and window sizes are shrunk so that a few
thousand rows make many of them."""

import json
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl
from workers import ROOT

import runner
import runner.jobs as jobs
import runner.worker as worker
from runner import EngineOptions, GenerationParams, InputError, jobdir
from runner.jobdir import PROMPTS
from runner.jobs import Job, create_job
from runner.results import valid_shards
from runner.worker import run_job

WORDS = "the old man said that every student reads a language model slowly".split()


def rows(n, note_chars=0):
    return [
        {"id": f"r{i:06d}", "prompt": " ".join(WORDS[: 2 + i % 10]), "k": i, "note": "x" * note_chars}
        for i in range(n)
    ]


@pytest.fixture
def small_chunks(monkeypatch):
    """Row groups of 64 prompts at submit, units of 40 in the worker (so units split row groups too)."""
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(jobdir, "UNIT_ROWS", 40)


@pytest.fixture
def one_thread():
    """The tiny model runs fastest on one thread, and this keeps the test quick on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_memory_grows_with_the_chunk_not_the_file(tmp_path, tiny_gpt2):
    """Submit + run N and 4N rows under tracemalloc: the peak must not grow with the file. Before streaming it
    grew by ~1.7 KB a row at submit (every row, text and token id in Python lists) and ~1.3 KB a row in the
    worker (ids, token ids, the todo list and the done set), and this test failed on that code; now the only
    per-row costs are 24 bytes of duplicate-id index at submit and a few bytes per (row, sample) in the
    worker. (tracemalloc sees Python and numpy memory, not Arrow's: that the worker never reads the whole
    prompts table is checked directly.)

    Measured in a fresh process: after a long test session the interpreter's own tables (interned strings
    grow with every path ever parsed) can resize by megabytes inside the measurement, which is not the file's."""
    import subprocess
    import sys

    from workers import worker_env

    code = f"import test_stream, json; print(json.dumps(test_stream.measure_peaks({str(tmp_path)!r}, {tiny_gpt2!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=worker_env(), cwd=ROOT / "tests")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (submit_n, work_n), (submit_4n, work_4n) = json.loads(proc.stdout.strip().splitlines()[-1])
    n, per_row = 1000, 200  # bytes a row allowed; the code before streaming used 1,300-1,700
    assert submit_4n - submit_n < 3 * n * per_row, (submit_n, submit_4n)
    assert work_4n - work_n < 3 * n * per_row, (work_n, work_4n)
    df = runner.load_results(tmp_path / f"job{4 * n}")
    assert list(df["id"]) == [f"r{i:06d}" for i in range(4 * n)] and (df["note"].str.len() == 1000).all()


def measure_peaks(tmp: str, model: str) -> list[tuple[int, int]]:
    """(submit peak, work peak) in bytes for N = 1000 and 4N rows, in this process (see the test above)."""
    import torch

    from runner.engine import Engine

    torch.set_num_threads(1)
    jobs.ROW_GROUP_ROWS, jobdir.UNIT_ROWS = 64, 40  # row groups of 64, units of 40: units split row groups
    worker.CANCEL_CHECK_SECONDS = 0.0  # timer paths run every batch, in every run alike
    engine = Engine(model, EngineOptions(batch_size=64))
    params, options = GenerationParams(max_new_tokens=1), EngineOptions(batch_size=64)

    def whole_table(self):
        raise AssertionError("the worker read the whole prompts table")

    Job.prompts = whole_table

    def peaks(n):
        # ~1 KB of passthrough text a row: a file of N rows is over 1 MB, so the input hash's 1 MB read
        # buffer is the same for N and 4N.
        path = write_jsonl(Path(tmp) / f"p{n}.jsonl", rows(n, note_chars=1000))
        tracemalloc.start()
        try:
            job = create_job(path, model, params, options, job_dir=Path(tmp) / f"job{n}")
            submit = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            summary = run_job(job, engine, echo=None, shard_rows=500, progress_interval=0.0)
            work = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert summary.finished and summary.done == n
        meta = pq.read_metadata(job.dir / PROMPTS)
        assert meta.num_row_groups == -(-n // 64) and meta.row_group(0).num_rows == 64
        return submit, work

    peaks(100)  # first-time allocations (caches, lazy imports) are not the file's
    return [peaks(1000), peaks(4000)]


def test_stopped_between_and_inside_windows_every_row_once(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, one_thread
):
    """Stop after every few batches, over and over, across windows of 3 prompts in row groups of 4 (and
    shards of 5 rows that straddle windows): every (id, sample) ends up exactly once, with the same results as
    an uninterrupted run of the whole file as one window."""
    path = write_jsonl(tmp_path / "p.jsonl", rows(22))
    params = GenerationParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=3)
    options = EngineOptions(batch_size=2)
    ref_job = create_job(path, tiny_gpt2, params, options, job_dir=tmp_path / "ref")
    run_job(ref_job, gpt2_engine, echo=None)
    ref = runner.load_results(ref_job.dir)

    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(jobdir, "UNIT_ROWS", 3)
    job = create_job(path, tiny_gpt2, params, options, job_dir=tmp_path / "cut")
    assert pq.read_metadata(job.dir / PROMPTS).num_row_groups == 6

    def stop_after(batches):
        calls = []
        return lambda: calls.append(1) or len(calls) > batches

    runs = 0
    while True:
        runs += 1
        summary = run_job(
            Job.open(job.dir), gpt2_engine, echo=None, shard_rows=5, should_stop=stop_after(1 + runs % 3)
        )
        if summary.finished:
            break
        assert runs < 100
    assert runs > 5 and summary.done == 44
    df = runner.load_results(job.dir)
    keys = list(zip(df["id"], df["sample"], strict=True))
    assert len(keys) == len(set(keys)) == 44
    cols = ["id", "sample", "text", "token_ids", "k"]
    assert df[cols].to_json() == ref[cols].to_json()
    assert sum(pq.read_metadata(s).num_rows for s in valid_shards(job.dir)) == 44


# A column per way of changing type between chunks of 4 rows.
def changing_rows():
    out = []
    for i in range(12):
        chunk = i // 4
        out.append({
            "id": f"c{i}",
            "prompt": f"row {i}",
            "num": i if chunk == 0 else i + 0.5,  # int, then float: float for every row
            "tag": "a" if chunk < 2 else 7,  # string, then number: JSON text for every row
            "sparse": None if chunk == 0 else i,  # null, then int
            "obj": {"a": i} if chunk == 0 else {"b": str(i)},  # struct fields merge
            "late": f"late {i}" if chunk == 2 else None,  # absent in the first chunks
            "steady": f"s{i}",
            "big": 0.5 if chunk == 0 else 2**60 + i,  # floats, then integers no float holds: JSON text for all
            "text": f"input {i}",  # named like an output column: passed through as input_text
            **({"new": [i, i]} if i == 10 else {}),  # a column that appears in the last chunk
        })  # fmt: skip
    return out


def whole_file_column(values):
    """What the code before streaming stored: one pa.array over the whole column, or JSON text for all."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def test_passthrough_columns_that_change_type_between_chunks(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, one_thread
):
    data = changing_rows()
    path = write_jsonl(tmp_path / "p.jsonl", data)
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    job, summary = runner.run(path, tiny_gpt2, GenerationParams(max_new_tokens=1), output=tmp_path / "out",
                              engine=gpt2_engine, echo=None)  # fmt: skip
    assert summary.finished
    prompts = pq.read_table(job.dir / PROMPTS)
    assert pq.read_metadata(job.dir / PROMPTS).num_row_groups == 3
    names = ["num", "tag", "sparse", "obj", "late", "steady", "big", "input_text", "new"]
    assert prompts.column_names[9:] == names  # after the fixed columns (settings, n, request included)
    for name in names:
        col = "text" if name == "input_text" else name
        assert prompts.column(name).combine_chunks() == whole_file_column([r.get(col) for r in data]), name
    assert prompts.schema.field("num").type == pa.float64() and prompts.column("tag")[0].as_py() == '"a"'
    assert job.meta["input"]["json_columns"] == ["tag", "big"]
    assert job.meta["input"]["renamed_columns"] == {"text": "input_text"}
    df = runner.load_results(job.dir)
    assert list(df["num"]) == [r["num"] for r in data] and list(df["tag"]) == ['"a"'] * 8 + ["7"] * 4
    assert df["obj"][5] == {"a": None, "b": "5"} and df["new"][10].tolist() == [10, 10]
    assert [json.loads(b) for b in df["big"][4:6]] == [2**60 + 4, 2**60 + 5]  # not two equal floats

    # One chunk for the whole file gives the same prompts table.
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 1000)
    whole = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=1), job_dir=tmp_path / "whole")
    assert pq.read_table(whole.dir / PROMPTS).equals(prompts)


def test_columns_that_keep_their_types_are_written_once(tmp_path, tiny_gpt2, monkeypatch):
    def no_rewrite(*a, **kw):
        raise AssertionError("prompts.parquet was rewritten")

    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(jobs, "rewrite_passthrough", no_rewrite)
    data = [
        {"prompt": f"row {i}", "mixed": [1, "x"] if i % 2 else "y", "f": 0.5 if i == 0 else i, "none": None}
        for i in range(10)
    ]  # JSON text from the first chunk on; float first, then ints; never a value
    job = create_job(write_jsonl(tmp_path / "p.jsonl", data), tiny_gpt2, job_dir=tmp_path / "job")
    prompts = job.prompts()
    assert prompts.column("mixed").to_pylist()[:2] == ['"y"', '[1, "x"]']
    assert prompts.column("f").to_pylist() == [0.5] + [float(i) for i in range(1, 10)]
    assert prompts.schema.field("none").type == pa.null()


def test_values_nested_too_deep_for_parquet_are_json_text_and_too_deep_for_json_an_invalid_line(
    tmp_path, tiny_gpt2, tiny_llama
):
    """Adversarial pass 64: a line nested thousands deep ended `runner run-batch` / `run` / `submit` in a
    RecursionError traceback (now an invalid line naming it), and a column of lists nested 100 deep made
    submit write a prompts.parquet it could not read back ("prompts.parquet is damaged"): such a column is
    JSON text now, as a column whose values share no type."""

    def nested(depth):
        value = 1
        for _ in range(depth):
            value = [value]
        return value

    good = [
        {"id": f"r{i}", "prompt": f"row {i}", "shallow": nested(3), "deep": nested(100)} for i in range(2)
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"id": "x", "prompt": "y", "z": '
                    + "[" * 5000 + "]" * 5000 + "}\n")  # fmt: skip
    with pytest.raises(runner.InputError, match=r"p.jsonl:3: invalid JSON \(nested too deeply\)"):
        create_job(path, tiny_gpt2, job_dir=tmp_path / "refused")
    job = create_job(path, tiny_gpt2, job_dir=tmp_path / "job", skip_invalid=True)
    prompts = job.prompts()  # reads back
    assert prompts.column("shallow").to_pylist() == [nested(3)] * 2
    assert [json.loads(v) for v in prompts.column("deep").to_pylist()] == [nested(100)] * 2
    assert job.meta["input"]["json_columns"] == ["deep"] and job.meta["input"]["invalid"] == 1
    # the same in a CSV cell (messages, json_schema as JSON text) and a Parquet string column (pass 67)
    deep = "[" * 5000 + "]" * 5000
    chat = '[{"role": "user", "content": "hi"}]'
    for column, good_value in (("messages", chat), ("json_schema", "")):
        csv = tmp_path / f"{column}.csv"
        frame = {"id": ["a", "b"], column: [good_value, deep]}
        pd.DataFrame(frame if column == "messages" else {**frame, "prompt": ["x", "y"]}).to_csv(
            csv, index=False
        )
        cells = create_job(csv, tiny_llama, job_dir=tmp_path / column, skip_invalid=True)  # (a chat template)
        assert cells.meta["input"]["invalid"] == 1 and [e["field"] for e in cells.invalid_rows()] == [column]


def test_problems_are_counted_all_kept_few_and_listed_in_order(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(jobs, "PROBLEMS_KEPT", 10)
    lines = []
    for i in range(60):
        if i % 3 == 0:
            lines.append('{"prompt": 1}')
        elif i == 7:
            lines.append(json.dumps({"id": "dup", "prompt": " ".join(["word"] * 300)}))  # too long
        elif i in (8, 52):
            lines.append(json.dumps({"id": "dup", "prompt": "again"}))  # line 8's id (too long, but valid)
        else:
            lines.append(json.dumps({"id": f"ok{i}", "prompt": "fine"}))
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(InputError) as info:
        create_job(path, tiny_gpt2)
    e = info.value
    # Every third row and the duplicate ids (lines 9 and 53) are counted; once line 1 has made the file a
    # refusal, later chunks are only validated, not tokenized, so line 8 (too long) is not looked at.
    assert e.total == 20 + 2 and len(e.problems) == 10
    assert str(e).startswith("22 invalid rows; nothing was run:") and "... and 12 more problems" in str(e)
    job = create_job(path, tiny_gpt2, skip_invalid=True)
    errors = runner.read_errors(job.dir)
    assert [x["line"] for x in errors] == sorted([i + 1 for i in range(0, 60, 3)] + [8, 9, 53])
    assert {x["line"]: x["message"] for x in errors}[53] == "duplicate id 'dup' (first on line 8)"
    assert "exceeds the model's context window" in {x["line"]: x["message"] for x in errors}[8]
    assert job.meta["input"]["invalid"] == 23 and job.meta["input"]["rows"] == 37


def test_integers_no_float_holds_after_a_chunk_of_floats_are_not_rounded(tmp_path, tiny_gpt2, monkeypatch):
    """Floats in the first chunk, integers past 2**53 in the next, nothing else changing type (so no rewrite):
    the integers were cast to floats, 2**60+1 and 2**60+2 stored as one value (adversarial pass 21). As one
    read of the whole column would (pa.array refuses the mix), the column is JSON text."""
    rows = [{"id": f"r{i}", "prompt": "Hello", "big": 0.5 if i < 4 else 2**60 + i} for i in range(8)]
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=1),
                     job_dir=tmp_path / "out")  # fmt: skip
    assert [json.loads(v) for v in job.prompts().column("big").to_pylist()] == [r["big"] for r in rows]


def test_integers_that_pass_2_63_in_a_later_chunk_make_a_uint64_column(tmp_path, tiny_gpt2, monkeypatch):
    """A sorted hash column passing 2**63 only after the first chunk was JSON text ("0", "1" ...); one read of
    the whole column makes it uint64 (adversarial pass 22)."""
    rows = [{"id": f"r{i}", "prompt": "Hello", "h": i if i < 4 else 2**63 + i} for i in range(8)]
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=1),
                     job_dir=tmp_path / "out")  # fmt: skip
    column = job.prompts().column("h")
    assert column.type == pa.uint64() and column.to_pylist() == [r["h"] for r in rows]
