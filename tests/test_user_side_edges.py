"""Edges a user meets on the user's side: option files saved by Windows editors, exports, score printing."""

import re

import pytest
from helpers import invoke

import runner
from runner import ScoreParams
from runner.cli import build_settings
from runner.errors import RunnerError
from runner.inputs import read_prompts
from runner.jobs import create_job
from runner.worker import run_job


def test_a_schema_or_grammar_file_with_a_byte_order_mark_is_read_as_its_text(tmp_path):
    """Notepad saves UTF-8 with a BOM; an input file, a chat template file may have one, so may these."""
    schema = tmp_path / "person.schema.json"
    schema.write_bytes(
        b'\xef\xbb\xbf{"type": "object", "properties": {"\xe5\x90\x8d\xe5\x89\x8d": {"type": "string"}}}'
    )
    grammar = tmp_path / "yesno.lark"
    grammar.write_bytes('\ufeffstart: "はい" | "いいえ"\n'.encode())
    params, _ = build_settings({"json_schema": str(schema)})
    assert params.json_schema == {"type": "object", "properties": {"名前": {"type": "string"}}}
    params, _ = build_settings({"grammar": str(grammar)})
    assert params.grammar == 'start: "はい" | "いいえ"\n'


@pytest.fixture
def score_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    (tmp_path / "texts.txt").write_text("現在も行方不明のまま。\n絵文字🎉\n", encoding="utf-8")
    job = create_job(tmp_path / "texts.txt", tiny_gpt2, ScoreParams(), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    return job


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_an_export_into_a_folder_not_there_names_the_folder_not_a_temp_file(score_job, tmp_path, suffix):
    """`runner results JOB --to out/x.parquet` before `mkdir out`: said up front, as with --errors-to (pyarrow
    named its temp file, `.x.parquet.123-....tmp`, and `Detail: [errno 2]`)."""
    to = tmp_path / "not-made" / f"scores{suffix}"
    result = invoke("results", score_job.id, "--to", to)
    assert result.exit_code == 1
    assert f"cannot write {to}: no folder {to.parent}" in result.output
    assert ".tmp" not in result.output


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.csv", "texts.txt"])
def test_results_of_a_file_that_is_not_parquet_says_so_not_a_traceback(score_job, tmp_path, name):
    """`runner.load_results("scores.jsonl")` after an export, or `runner results texts.txt` (the input file for the
    job): pyarrow's "Parquet magic bytes not found in footer" came out as a traceback."""
    path = tmp_path / name
    if name != "texts.txt":
        assert invoke("results", score_job.id, "--to", path).exit_code == 0
    with pytest.raises(RunnerError, match=rf"{re.escape(str(path))} is not a Parquet file of results"):
        runner.load_results(path)
    result = invoke("results", path)
    assert result.exit_code == 1 and "is not a Parquet file of results" in result.output


def test_a_csv_mixing_texts_and_pairs_reads_empty_pair_cells_as_no_pair(tmp_path):
    """A CSV writes "none" as an empty cell (pandas' `to_csv` of a DataFrame mixing text rows and context /
    continuation rows): a text row there has both pair cells empty, and is a text row, as with nulls in JSONL or
    Parquet (it was refused, "continuation: must be a non-empty string, got an empty string"). A pair with its
    continuation alone empty is still refused."""
    path = tmp_path / "mix.csv"
    path.write_text(
        "id,text,context,continuation\r\n1,こんにちは,,\r\n2,,日本の首都は,東京\r\n3,,,絵文字🎉\r\n4,,日本の,\r\n",
        encoding="utf-8-sig",
    )
    ps = read_prompts(path, prompt_field="text", skip_invalid=True, pair_fields=("context", "continuation"))
    got = [(r.id, r.prompt, r.continuation, r.extra) for r in ps.rows]
    assert got == [
        ("1", "こんにちは", None, {}),
        ("2", "日本の首都は", "東京", {"text": ""}),
        ("3", "", "絵文字🎉", {"text": ""}),
    ]
    assert [(p.line, p.field) for p in ps.problems] == [(5, "continuation")]
