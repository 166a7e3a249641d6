"""Adversarial pass 264: a second reading of passes 262-263 (chunks ending at CHUNK_TEXT_CHARS, Parquet read a page
at a time, shards committed by their numbers, results files of a job folder refused, a chunk's row settings made
once per distinct setting).

Found, and kept fixed below:
- A Parquet prompt file whose setting column Arrow reads as no JSON value (a `temperature` of decimal type, a
  binary `stop`, a date `seed`) made submit end in a TypeError traceback ("Object of type Decimal is not JSON
  serializable") instead of its rows' problems ("temperature must be a number, got Decimal('0.70')", as before
  pass 263): the memo of a chunk's row settings is keyed by their JSON, made before the settings were checked.
  Settings with no JSON are now made (and refused) unmemoized.
- Prompts given from Python (a list of rows, a DataFrame) refused at submit named their invalid rows by position
  ("rows[0]: prompt: prompt is empty") but where the rows only checked begin by the temporary file's 1-based line,
  under the source's name: "the rows from the list:3 on were checked but not tokenized" meant rows[2] (pass 262's
  note, renamed as text where its problems are renamed by position). It is now named as they are ("rows[2]").

Held (no change): units of 4 rows over row groups of 2, 3, 3, 4 and 2 rows, n=2 sampled with log-probs, killed at
after_shard:2/4, mid_write:3 or before_replace:3 with shards of 1 row, resumed: every (id, sample) once, in order,
as an uninterrupted run's; `runner repair` of uneven chunks with refused rows (--skip-invalid) and settings 1 / 1.0
writes prompts.parquet byte for byte; passthrough columns (ints beside floats, lists, structs of other keys, mixed
JSON, nested lists) come out the same in chunks of one row as in one chunk; Parquet inputs of 1-row row groups
(lists, structs), of 3 MB texts beside a 1 MB read buffer, with page indexes, v1 pages, gzip and 64 MB pages read
back every row (the buffered read takes 0.21 s for 5,000 row groups against 0.16 pre-buffered); the settings memo
keys 1, 1.0 and true apart (JSON), and key order only costs a second make.
"""

from __future__ import annotations

import datetime
import decimal
import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import workers
from helpers import write_jsonl
from test_adv_kinds import LEASE, same_value

import runner
import runner.jobs as jobs
from runner import GenerationParams
from runner.errors import InputError
from runner.jobdir import PROMPTS
from runner.jobs import create_job


@pytest.mark.parametrize(
    ("name", "column", "message"),
    [
        ("temperature", pa.array([decimal.Decimal("0.7"), None], pa.decimal128(4, 2)), "must be a number"),
        ("stop", pa.array([b"x", None], pa.binary()), "must be a string or a list of strings"),
        ("seed", pa.array([datetime.date(2020, 1, 1), None], pa.date32()), "must be an integer"),
    ],
)
def test_a_setting_arrow_reads_as_no_json_value_is_the_rows_problem(
    tmp_path, tiny_gpt2, name, column, message
):
    pq.write_table(pa.table({"prompt": ["a b", "c d"], name: column}), tmp_path / "p.parquet")
    with pytest.raises(InputError) as e:
        create_job(
            tmp_path / "p.parquet", tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "j"
        )
    assert f"p.parquet:1: {name}: {name} {message}" in str(e.value)
    assert "p.parquet:2" not in str(e.value)


@pytest.mark.parametrize("as_frame", [False, True])
def test_where_the_unchecked_rows_begin_is_named_as_the_rows_are(tmp_path, tiny_gpt2, monkeypatch, as_frame):
    import pandas as pd

    monkeypatch.setattr(jobs, "ROW_GROUP_ROWS", 2)
    rows = [{"prompt": ""}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    with pytest.raises(InputError) as e:
        create_job(pd.DataFrame(rows) if as_frame else rows, tiny_gpt2, GenerationParams(max_new_tokens=2),
                   job_dir=tmp_path / "j")  # fmt: skip
    name = "df.iloc[{}]" if as_frame else "rows[{}]"
    assert name.format(0) + ": prompt: prompt is empty" in str(e.value)
    assert f"the rows from {name.format(2)} on were checked but not tokenized" in str(e.value)


WORDS = "the old man said that every student reads a language model slowly".split()
LENGTHS = [1, 300, 2, 2, 900, 1, 5, 1200, 3, 1, 1, 400, 2, 60]  # words: row groups of 2, 3, 3, 4 and 2 rows


def uneven_rows():
    return [{"id": f"r{i}", "prompt": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k)), "seed": i % 3}
            for i, k in enumerate(LENGTHS)]  # fmt: skip


def test_repair_of_uneven_chunks_with_invalid_rows_is_byte_identical(tmp_path, tiny_gpt2, monkeypatch):
    """Row groups ending at characters, of rows 1 to 1,200 words long, some refused (an empty prompt, an id
    given twice), settings given as 1 and 1.0: `runner repair` writes prompts.parquet again byte for byte."""
    monkeypatch.setattr(jobs, "CHUNK_TEXT_CHARS", 700)
    rows = uneven_rows() + [{"id": "r3", "prompt": "a"}, {"id": "e", "prompt": ""}]
    rows += [{**r, "id": f"t{i}", "temperature": [1, 1.0, 0.5][i % 3]} for i, r in enumerate(uneven_rows())]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "j", skip_invalid=True)  # fmt: skip
    assert pq.read_metadata(job.dir / PROMPTS).num_row_groups > 4
    data = (job.dir / PROMPTS).read_bytes()
    (job.dir / PROMPTS).write_bytes(data[: len(data) // 2])
    runner.repair(job.dir)
    assert (job.dir / PROMPTS).read_bytes() == data


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after_shard:2", "mid_write:3"])
def test_units_across_uneven_row_groups_killed_then_resumed(tmp_path, tiny_gpt2, monkeypatch, fault):
    """Units of 4 rows over row groups of 2, 3, 3, 4 and 2 (chunks ending at characters), 2 sampled samples with
    log-probs, killed at a commit then run on: every (id, sample) once, in order, as an uninterrupted run's."""
    monkeypatch.setattr(jobs, "CHUNK_TEXT_CHARS", 1500)
    params = GenerationParams(max_new_tokens=3, temperature=0.8, num_return_sequences=2, logprobs=2)
    template = create_job(write_jsonl(tmp_path / "p.jsonl", uneven_rows()), tiny_gpt2, params, truncate="left",
                          job_dir=tmp_path / "t", unit_rows=4)  # fmt: skip
    meta = pq.read_metadata(template.dir / PROMPTS)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2, 3, 3, 4, 2]
    for name in ("ref", "kill"):
        (tmp_path / name).mkdir()
        shutil.copytree(template.dir, tmp_path / name / "job")
    code, out = workers.run_worker(tmp_path / "ref", shard_rows=100, env_extra=LEASE, timeout=300)
    assert code == 0, out
    code, out = workers.run_worker(tmp_path / "kill", shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": fault},
                                   timeout=300)  # fmt: skip
    assert code == -signal.SIGKILL, out
    code, out = workers.run_worker(tmp_path / "kill", shard_rows=3, env_extra=LEASE, timeout=300)
    assert code == 0, out
    want = runner.load_results(tmp_path / "ref" / "job").to_dict("records")
    got = runner.load_results(tmp_path / "kill" / "job").to_dict("records")
    assert [(g["id"], g["sample"]) for g in got] == [(f"r{i}", s) for i in range(14) for s in (0, 1)]
    for g, w in zip(got, want, strict=True):
        same_value(g, w, g["id"])
