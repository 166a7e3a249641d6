"""Adversarial pass 262: a big file (many rows, long texts) submitted, run, resumed and exported.

Found, and kept fixed below:
  * Submitting a file of long texts (documents to score, long chats) took memory in proportion to 10,000 of its
    rows, however long each was: submit read, tokenized and held a chunk of `ROW_GROUP_ROWS` rows at a time, and
    the tokenizer's output for a chunk costs ~50 bytes a character of text (its encodings, then the token ids as
    Python ints). A 184 MB JSONL of 10,000 texts of 20,000 characters peaked at 9.8 GB at submit (a Colab has
    12), where 10,000 prompts of 300 characters take 0.3 GB. A chunk now ends at `CHUNK_TEXT_CHARS` characters of
    text as well (reading 11: a job read before keeps its row groups, which `runner repair` writes again).
  * Submitting a Parquet file took memory in proportion to the file: pyarrow by default reads a row group's column
    whole before its first batch, and pandas' `to_parquet` writes one row group of up to a million rows, so a
    Parquet file of 40 MB of prompts took 34 MB more Arrow memory to read than one of 8 MB (a 2 GB file, 2 GB
    more). It is read a page at a time (`pre_buffer=False` with a read buffer).
  * A file refused at submit counted fewer invalid rows than it had, and said nothing of it: once a row was refused,
    the later chunks were only read and checked, not tokenized (to refuse as fast as reading allows), so their
    rows too long for the model were not counted, and "(use skip_invalid=True to run the valid rows)" was said of
    a file none of whose rows fit ("229 invalid rows" for 1,000 documents too long, once the chunks of long texts
    were smaller; 10,000 of 200,000 short prompts before). The message says where the unmeasured rows begin.
  * A worker asked for log-probs with alternatives held 1,000 result rows before writing a shard, however much each
    held: with `logprobs=20` and 200 new tokens, 2 GB (1.8 MB a row as Python objects; 250 MB with shards of
    100 rows), so a real model's 1,024 tokens took ~10 GB. A shard is also written once its rows hold
    `SHARD_VALUES` numbers (token ids, log-probs, alternatives).
  * `runner.load_results("jobs/J/shards/00000-00000000-0000.parquet")` (and `runner results` of it) returned that
    one shard's rows, unverified and only some of the job's, as the job's results, without a word; a quarantined
    file, and the job's prompts.parquet (prompts and token ids), likewise. Such a file is refused, naming the job
    folder to give instead, as a job's input file already was.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from helpers import invoke, write_jsonl
from workers import ROOT, worker_env

import runner
import runner.jobs as jobs
from runner import GenerationParams
from runner.jobdir import PROMPTS
from runner.jobs import create_job
from runner.worker import run_job

WORDS = "the old man said that every student reads a language model slowly".split()


def long_rows(n, chars=20_000):
    text = " ".join(WORDS[i % len(WORDS)] for i in range(chars // 5))[:chars]
    return [{"id": f"d{i}", "prompt": f"{i} {text}"} for i in range(n)]


def test_a_chunk_of_long_texts_ends_at_its_characters(tmp_path, tiny_gpt2, monkeypatch):
    """Row groups of prompts.parquet (what submit tokenized at a time) hold `CHUNK_TEXT_CHARS` characters of
    text and one row more at most, not 10,000 rows whatever their length; the rows are all there, in order."""
    monkeypatch.setattr(jobs, "CHUNK_TEXT_CHARS", 100_000, raising=False)
    path = write_jsonl(tmp_path / "docs.jsonl", long_rows(30))
    job = create_job(
        path, tiny_gpt2, GenerationParams(max_new_tokens=2), truncate="left", job_dir=tmp_path / "j"
    )
    meta = pq.read_metadata(job.dir / PROMPTS)
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sum(sizes) == 30 and max(sizes) <= 100_000 // 20_000 + 1, sizes
    assert pq.read_table(job.dir / PROMPTS, columns=["id"])["id"].to_pylist() == [f"d{i}" for i in range(30)]
    assert job.meta["input"]["reading"] >= 11


def submit_peak(tmp: str, model: str, n: int) -> int:
    """tracemalloc's peak (bytes) while submitting `n` texts of 20,000 characters (run in a fresh process)."""
    import tracemalloc
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    Path(tmp).mkdir()
    jobs.CHUNK_TEXT_CHARS = 200_000
    params = GenerationParams(max_new_tokens=2)
    warm = write_jsonl(Path(tmp) / "warm.jsonl", long_rows(2))
    create_job(warm, model, params, truncate="left", job_dir=Path(tmp) / "warm")  # (first-time allocations)
    path = write_jsonl(Path(tmp) / f"p{n}.jsonl", long_rows(n))
    tracemalloc.start()
    create_job(path, model, params, truncate="left", job_dir=Path(tmp) / f"j{n}")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def in_fresh_process(call: str) -> list[str]:
    """What `print(t.CALL)` prints, `t` this module, run in a fresh process (a peak of its own), split in words."""
    code = f"import test_adv_pass262 as t; print({call})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=worker_env(), cwd=ROOT / "tests")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1].split()


def test_submit_memory_does_not_grow_with_long_texts(tmp_path, tiny_gpt2):
    """Submit 12 and 120 texts of 20,000 characters: the peak must not grow with the file. Before, the whole file
    was one chunk (under 10,000 rows), and its peak grew ~10 times."""
    peaks = []
    for n in (12, 120):
        (peak,) = in_fresh_process(f"t.submit_peak({str(tmp_path / str(n))!r}, {tiny_gpt2!r}, {n})")
        peaks.append(int(peak))
    assert peaks[1] < 2 * peaks[0], peaks


def arrow_peak(path: str) -> int:
    """pyarrow's peak memory (bytes) while reading and checking the rows of `path` (run in a fresh process)."""
    import pyarrow as pa

    from runner.inputs import PromptReader

    assert sum(len(chunk.rows) for chunk in PromptReader(path).chunks(10_000)) > 0
    return pa.default_memory_pool().max_memory()


def test_a_parquet_file_of_one_row_group_is_read_in_bounded_memory(tmp_path):
    """8,192 and 40,960 prompts of 1,000 characters in one row group each (as pandas writes them): reading the
    bigger takes no more than a few MB more. Before, 8 MB more Arrow memory per 8 MB of file (read whole)."""
    import random

    import pyarrow as pa

    peaks = []
    for n in (8192, 40960):
        rnd = random.Random(n)
        texts = [rnd.randbytes(500).hex() for _ in range(n)]
        path = tmp_path / f"p{n}.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": texts}), path)
        assert pq.read_metadata(path).num_row_groups == 1
        (peak,) = in_fresh_process(f"t.arrow_peak({str(path)!r})")
        peaks.append(int(peak))
    assert peaks[1] - peaks[0] < 8 * 2**20, peaks


@pytest.mark.parametrize("reading", [10, 11])
def test_repair_writes_the_row_groups_again_as_its_submit_did(tmp_path, tiny_gpt2, monkeypatch, reading):
    """A job read before 11 holds its long texts in one row group, one of 11 in row groups by characters:
    `runner repair` of its damaged prompts.parquet writes it again byte for byte, either way."""
    monkeypatch.setattr(jobs, "CHUNK_TEXT_CHARS", 50_000)
    path = write_jsonl(tmp_path / "docs.jsonl", long_rows(6))
    with monkeypatch.context() as m:
        m.setattr(runner.inputs, "READING", reading)
        job = create_job(
            path, tiny_gpt2, GenerationParams(max_new_tokens=2), truncate="left", job_dir=tmp_path / "j"
        )
    groups = pq.read_metadata(job.dir / PROMPTS).num_row_groups
    assert job.meta["input"]["reading"] == reading and groups == (1 if reading < 11 else 2)
    data = (job.dir / PROMPTS).read_bytes()
    (job.dir / PROMPTS).write_bytes(data[: len(data) // 2])
    runner.repair(job.dir)
    assert (job.dir / PROMPTS).read_bytes() == data


def test_a_file_inside_a_job_folder_is_no_results_file(tmp_path, tiny_gpt2, gpt2_engine):
    """`load_results("jobs/J/shards/00000-....parquet")` (or `runner results` of it) gave that shard's rows,
    unverified and only some of the job's, as if they were its results, and `jobs/J/prompts.parquet` gave the
    prompts, token ids and all, as results: the error names the job folder to give instead."""
    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(5)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None, shard_rows=2).finished
    shard = sorted((job.dir / "shards").glob("*.parquet"))[0]
    quarantined = job.dir / "quarantine" / "old" / shard.name
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(shard.read_bytes())
    for path, what in (
        (shard, "a shard"),
        (quarantined, "a quarantined"),
        (job.dir / PROMPTS, "its validated"),
    ):
        with pytest.raises(runner.RunnerError, match=f"is not a results file: it is {what}.* of job folder "
                                                     f"{re.escape(str(job.dir))}"):  # fmt: skip
            runner.load_results(path)
        said = invoke("results", path, "--to", tmp_path / "out.jsonl")
        assert said.exit_code == 1 and f"job folder {job.dir}" in said.output, said.output
    runner.export_results(job.dir, tmp_path / "results.parquet")
    assert len(runner.load_results(tmp_path / "results.parquet")) == 5 == len(runner.load_results(job.dir))


def test_a_refusal_says_where_the_rows_it_did_not_tokenize_begin(tmp_path, tiny_gpt2, monkeypatch):
    """Every row too long for the model: the first chunk's are counted, and the message says from which line on
    the rows were not measured, rather than suggest skip_invalid for a file none of whose rows would run."""
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 4)
    path = write_jsonl(tmp_path / "p.jsonl", long_rows(10, chars=2_000))
    with pytest.raises(runner.InputError) as info:
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2))
    said = str(info.value)
    assert said.startswith("4 invalid rows; nothing was run:"), said
    assert said.endswith(f"(the rows from {path}:5 on were checked but not tokenized: those too long for the model "
                         "are not counted yet; use skip_invalid=True to run the valid rows)"), said  # fmt: skip
    said = invoke("submit", path, "-m", tiny_gpt2, "--home", tmp_path / "home").output
    assert f"the rows from {path}:5 on were checked but not tokenized" in said and "--skip-invalid" in said, (
        said
    )
    # all in one chunk: every row counted, and the file has no valid rows
    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 100)
    with pytest.raises(runner.InputError, match=f"^no valid rows in {re.escape(str(path))}"):
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2))


def worker_peak(tmp: str, model: str, n: int) -> tuple[int, int]:
    """(tracemalloc's peak in the worker, shards written) for `n` rows asking 8 alternatives a token, 40 tokens
    (run in a fresh process)."""
    import tracemalloc
    from pathlib import Path

    import torch

    import runner.worker as worker
    from runner import EngineOptions
    from runner.engine import Engine

    torch.set_num_threads(1)
    Path(tmp).mkdir()
    worker.SHARD_VALUES = 20_000
    options = EngineOptions(batch_size=10)
    engine = Engine(model, options)
    params = GenerationParams(max_new_tokens=40, min_new_tokens=40, logprobs=8)
    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(n)]
    for name in ("warm", "job"):  # (first-time allocations)
        path = write_jsonl(Path(tmp) / f"{name}.jsonl", rows[:10] if name == "warm" else rows)
        job = create_job(path, model, params, options, job_dir=Path(tmp) / name)
        tracemalloc.start()
        assert run_job(job, engine, echo=None, progress_interval=0.0).finished
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(runner.load_results(job.dir)) == n
    return peak, len(list((job.dir / "shards").glob("*.parquet")))


@pytest.mark.slow
def test_a_worker_writes_a_shard_once_its_rows_hold_so_many_numbers(tmp_path, tiny_gpt2):
    """30 and 150 rows of 40 tokens with 8 alternatives each (~1,200 numbers a row): shards are written every
    ~20,000 numbers, so the worker's peak does not grow with the rows. Before, every row of a unit waited for
    the 1,000th (shard_rows), and the peak grew ~5 times."""
    out = []
    for n in (30, 150):
        out.append(
            tuple(
                map(int, in_fresh_process(f"*t.worker_peak({str(tmp_path / str(n))!r}, {tiny_gpt2!r}, {n})"))
            )
        )
    (peak_30, _), (peak_150, shards_150) = out
    assert shards_150 >= 5 and peak_150 < 2 * peak_30, out
