"""Adversarial pass 264: a second reading of passes 262-263 (chunks ending at CHUNK_TEXT_CHARS, Parquet read a page
at a time, shards committed by their numbers, results files of a job folder refused, a chunk's row settings made
once per distinct setting).

Found, and kept fixed below:
- A Parquet prompt file whose setting column Arrow reads as no JSON value (a `temperature` of decimal type, a
  binary `stop`, a date `seed`) made submit end in a TypeError traceback ("Object of type Decimal is not JSON
  serializable") instead of its rows' problems ("temperature must be a number, got Decimal('0.70')", as before
  pass 263): the memo of a chunk's row settings is keyed by their JSON, made before the settings were checked.
  Settings with no JSON are now made (and refused) unmemoized.
"""

from __future__ import annotations

import datetime
import decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner import GenerationParams
from runner.errors import InputError
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
