"""Adversarial pass 244: the prompt files Japanese Colab users really have (kept in Excel, Google Sheets, pandas
and JSON Lines from other tools), submitted as the README says. Each either runs with its rows as the file holds
them, or is refused naming the file, the line and the field, saying what reads it; a job read before reading 8
(inputs.READING) is read, and its refusals worded, as its submit did (`runner repair`)."""

import json
import os

import pyarrow.parquet as pq
import pytest
from helpers import invoke, write_jsonl

import runner.inputs
import runner.jobs
from runner import InputError
from runner.errors import said_on_the_command_line
from runner.inputs import REPEATED_HEADER, PromptReader, read_prompts
from runner.jobdir import Job
from runner.jobs import _rewrite_inputs, create_job


def _read(path, reading=None, **kw):
    """Each row of `path` as (line, extra columns) or (line, problem message), read as a job of `reading`."""
    reader = PromptReader(path, **kw)
    if reading is not None:
        reader.reading = reading
    return [(r.line, r.extra) if hasattr(r, "extra") else (r.line, r.message) for r in reader.rows()]


def _rewritten(job, reading, out):
    """prompts.parquet's rows and its checksum as `runner repair` writes them again for `job`, had job.json said
    its file was read with `reading`."""
    import dataclasses

    from runner import storage

    out.mkdir()
    meta = {**job.meta, "input": {**job.meta["input"], "reading": reading}}
    _rewrite_inputs(Job(job.dir, dataclasses.replace(job.spec, meta=meta)), out)
    prompts = out / "prompts.parquet"
    return pq.read_table(prompts).to_pylist(), storage.file_sha256(prompts)


# --- CSV from a spreadsheet -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "extra"),
    [
        ("id,prompt,,\r\n1,hello,,\r\n2,world,,\r\n", [{}, {}]),  # Excel: the empty columns right of the data
        (
            "\ufeffid,prompt,,,\r\n1,こんにちは,,,\r\n2,world,,,\r\n,,,,\r\n",
            [{}, {}],
        ),  # CSV UTF-8, blank rows
        ("id,prompt,\n1,hello,\n2,world,\n", [{}, {}]),  # one such column: no column named "" of nothing
        (
            "id,prompt,,\n1,hello,x,\n2,world,,\n",
            [{"": "x"}, {"": ""}],
        ),  # one holding a value: kept, as before
        ("id,prompt,,\n1,hello,,\n2,world,,y\n", [{"": ""}, {"": "y"}]),  # ... whichever it is
        (",id,prompt,,\n0,1,hello,,\n1,2,world,,\n", [{}, {}]),  # df.to_csv()'s index, then Excel's columns
        (",id,prompt,\n,1,hello,x\n,2,world,\n", [{"": "x"}, {"": ""}]),  # an empty first column is no index
    ],
)
def test_a_spreadsheets_empty_unnamed_columns_are_left_out(tmp_path, text, extra):
    """Excel and Google Sheets save the empty columns right of a sheet's data (`id,prompt,,`, each row ending in
    commas): two of them refused the file ("the header leaves more than one column unnamed"), one was a column
    named "" of empty cells in every row of the results. A column with no name and no value carries nothing and
    is left out; one holding a value somewhere is kept, as a single unnamed column always was."""
    path = tmp_path / "p.csv"
    path.write_bytes(text.encode("utf-8"))
    assert _read(path) == [(2, extra[0]), (3, extra[1])]
    assert [(r.id, r.prompt) for r in read_prompts(path).rows][1] == ("2", "world")


def test_two_unnamed_columns_holding_values_are_refused_naming_them(tmp_path):
    """Read as rows, each row would keep one of their cells: refused as before, naming the columns as a
    spreadsheet does, even where the value is on the last line."""
    path = tmp_path / "notes.csv"
    path.write_text("id,prompt,,,\n1,hi,,a,\n" + "2,yo,,,\n" * 50 + "3,hey,,,b\n", encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_prompts(path)
    assert str(e.value) == (
        f"cannot read the prompt file: {path}:1: the header leaves columns 4 (D) and 5 (E) unnamed, and they hold "
        "values (a row would keep only one of their cells): name each column in the header's line"
    )


def test_an_unnamed_column_left_out_still_refuses_a_file_that_is_not_utf8(tmp_path):
    """A column left out is not read by pyarrow: a bad byte in it, past the first block read, would have gone
    unsaid."""
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"id,prompt,,\n" + "".join(f"{i},hi,,\n" for i in range(5000)).encode() + b"x,yo,,\xff\n"
    )
    with pytest.raises(InputError, match=r"p.csv:5002: the file is not UTF-8"):
        read_prompts(path)


def test_the_cli_submits_an_excel_csv_and_exports_only_its_columns(tmp_path, tiny_gpt2):
    """`runner submit FILE` of Excel's `id,prompt,,` was "Error: cannot read the prompt file"; the job's
    prompts are the file's two columns, as the same sheet without the empty columns gives."""
    path = tmp_path / "sheet.csv"
    path.write_bytes("id,prompt,,\r\n1,こんにちは,,\r\n2,world,,\r\n".encode())
    said = invoke("submit", path, "-m", tiny_gpt2, "--max-new-tokens", 2, "--home", tmp_path / "home")
    assert said.exit_code == 0 and "2 rows" in said.output, said.output
    job = create_job(path, tiny_gpt2, home=tmp_path / "h2")
    (tmp_path / "plain.csv").write_bytes("id,prompt\r\n1,こんにちは\r\n2,world\r\n".encode())
    plain = create_job(tmp_path / "plain.csv", tiny_gpt2, home=tmp_path / "h3")
    assert job.prompts().column_names == plain.prompts().column_names
    assert job.prompts().column("prompt").to_pylist() == ["こんにちは", "world"]


def test_a_job_of_before_reading_8_keeps_its_empty_unnamed_column_through_repair(
    tmp_path, tiny_gpt2, monkeypatch
):
    """A job submitted before reading 8 kept `id,prompt,`'s empty column named "": `runner repair` rebuilds its
    prompts.parquet so, byte for byte (read as today, its checksum would differ and repair could not)."""
    path = tmp_path / "p.csv"
    path.write_text("id,prompt,\n1,hello,\n2,world,\n")
    with monkeypatch.context() as m:
        m.setattr(runner.inputs, "READING", 7)
        m.setattr(runner.jobs, "READING", 7)
        job = create_job(path, tiny_gpt2, job_dir=tmp_path / "before")
    assert job.meta["input"]["reading"] == 7 and "" in job.prompts().column_names
    rows, sha = _rewritten(job, 7, tmp_path / "again")
    assert sha == job.meta["prompts_sha256"] and [r[""] for r in rows] == ["", ""]
    now = create_job(path, tiny_gpt2, job_dir=tmp_path / "now")
    assert now.meta["input"]["reading"] == runner.inputs.READING and "" not in now.prompts().column_names
    assert (
        _rewritten(now, now.meta["input"]["reading"], tmp_path / "now-again")[1] == now.meta["prompts_sha256"]
    )


def test_a_header_repeated_in_the_middle_is_refused_on_its_line(tmp_path, tiny_gpt2):
    """Two exports joined (`cat a.csv b.csv`, a sheet pasted under another with its headings): the second header
    was a row like any other, its prompt "prompt". It is refused on its line; --skip-invalid runs the others. A
    file of one column may hold a prompt that is its name: kept. A job read before reading 8 kept it."""
    path = tmp_path / "joined.csv"
    path.write_text(",id,prompt\n0,1,a\n1,2,b\n,id,prompt\n0,3,c\n")  # df.to_csv() twice
    assert _read(path) == [(2, {}), (3, {}), (4, REPEATED_HEADER), (5, {})]
    with pytest.raises(InputError, match=r"joined.csv:4: this row repeats the header \(CSV files joined"):
        read_prompts(path)
    assert [r.id for r in read_prompts(path, skip_invalid=True).rows] == ["1", "2", "3"]
    assert [line for line, _ in _read(path, reading=7)] == [2, 3, 4, 5]
    (tmp_path / "one.csv").write_text("prompt\nhello\nprompt\n")
    assert [r.prompt for r in read_prompts(tmp_path / "one.csv").rows] == ["hello", "prompt"]


# --- a row without its prompt field: what reads it ------------------------------------------------------------

MISSING = "missing (each row needs 'prompt' or 'messages'; the row has "


@pytest.mark.parametrize(
    ("row", "python", "command_line"),
    [
        ({"text": "hello"}, "'text'; prompt_field='text' reads it)", "'text'; --prompt-field text reads it)"),
        ({"ID": "1", "Prompt": "hi"}, "prompt_field='Prompt' reads it)", "--prompt-field Prompt reads it)"),
        (
            {"instruction": "Translate", "input": "hello", "output": "こんにちは"},
            "template='{instruction}\\n\\n{input}' makes Alpaca's instruction and input one prompt)",
            "--template '{instruction}\\n\\n{input}' makes Alpaca's instruction and input one prompt)",
        ),
        (
            {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"}]},
            "not ShareGPT's: jq -c '.messages = [.conversations[] | {role: ",
            "> {dir}/p-chat.jsonl)",
        ),
        (
            {"id": 1, "data": {"prompt": "hello"}},
            "prompt_field cannot reach into 'data', which holds it: lift it out, jq -c '.prompt = .data.prompt' "
            "{dir}/p.jsonl > {dir}/p-flat.jsonl)",
            "--prompt-field cannot reach into 'data'",
        ),
        (
            {"id": "a", "conversations": [{"role": "user", "content": "hi"}]},
            "runner reads a chat from 'messages': jq -c '.messages = .conversations | del(.conversations)' "
            "{dir}/p.jsonl > {dir}/p-chat.jsonl)",
            "> {dir}/p-chat.jsonl)",
        ),
    ],
    ids=["text", "capitalised", "alpaca", "sharegpt", "nested", "chat-named-otherwise"],
)
def test_a_row_of_another_tools_shape_is_told_what_reads_it(tmp_path, row, python, command_line):
    """Such rows were told "--prompt-field or --template names the one to use": --prompt-field cannot reach into
    an object, and the user was left to find the template or the conversion."""
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    said = [_read(path)[0][1]]
    with said_on_the_command_line():
        said.append(_read(path)[0][1])
    for message, hint in zip(said, (python, command_line), strict=True):
        assert message.startswith(MISSING) and hint.replace("{dir}", str(tmp_path)) in message, message
    before = _read(path, reading=7)[0][1]
    assert before.endswith("; prompt_field or template names the one to use)"), before


def test_a_rows_settings_are_not_the_text_a_hint_names(tmp_path):
    """A generate row's `stop` is a setting, not a second text field that would leave `text` unnamed."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello", "stop": "END"}])
    assert _read(path, row_settings=True)[0][1].endswith(
        "the row has 'text', 'stop'; prompt_field='text' reads it)"
    )


def test_what_a_hint_says_reads_the_file(tmp_path, tiny_gpt2):
    """The hints' options give the rows they name."""
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "to Ken", "output": "Hi"}])
    (row,) = read_prompts(alpaca, template="{instruction}\n\n{input}").rows
    assert row.prompt == "Say hi\n\nto Ken" and row.extra["output"] == "Hi"
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert [r.prompt for r in read_prompts(text, prompt_field="text").rows] == ["hello"]


def test_a_csv_header_with_spaces_after_its_commas_is_said_so(tmp_path):
    """`id, prompt` (typed by hand) names a column " prompt": each row was refused as missing 'prompt', the
    space visible only in the quotes of "the row has 'id', ' prompt'"."""
    path = tmp_path / "p.csv"
    path.write_text("id, prompt\n1, hello\n")
    (message,) = [m for _, m in _read(path)]
    assert message.startswith(
        MISSING + "'id', ' prompt'; prompt_field=' prompt' reads it (its cells keep their"
    )
    assert (
        f"pandas.read_csv({str(path)!r}, skipinitialspace=True, dtype=str, keep_default_na=False)"
        f".to_csv({str(tmp_path / 'p-trimmed.csv')!r}, index=False)" in message
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"id": {"0": "a", "1": "b"}, "prompt": {"0": "x", "1": "y"}}, "id"),  # pandas' df.to_json()
        ({"prompt": ["x", "y"], "topic": ["t", "u"]}, "prompt"),  # json.dump(dict_of_lists)
    ],
)
def test_a_line_of_whole_columns_says_how_to_write_rows(tmp_path, line, field):
    """`df.to_json("p.jsonl")` writes one object of columns ({"prompt": {"0": ..., "1": ...}}): it was refused
    as "id: must be a string or an integer, got object", not saying why."""
    path = write_jsonl(tmp_path / "p.jsonl", [line])
    (problem,) = _problems(path)
    assert problem.field == field and problem.message.endswith(
        "; this line holds whole columns, as pandas' to_json() writes by default: write one row per line, "
        "df.to_json(PATH, orient='records', lines=True, force_ascii=False)"
    )
    assert "whole columns" not in _read(path, reading=7)[0][1]


def _problems(path):
    with pytest.raises(InputError) as e:
        read_prompts(path)
    return e.value.problems


def test_a_prompt_given_as_a_list_is_not_said_to_be_columns(tmp_path):
    """One field holding a list is a prompt given as a list (or a Parquet list column), not whole columns."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ["x", "y"]}])
    assert _problems(path)[0].message == "must be a string, got array"


# --- JSON over many lines -------------------------------------------------------------------------------------


def test_json_objects_over_many_lines_are_one_refusal_saying_how_to_make_lines(tmp_path):
    """`jq '.[]'` without -c, or `json.dump(row, f, indent=2)` per row, writes each object over many lines: every
    line was refused as "invalid JSON (...)", never saying why, and --skip-invalid ran any that parsed alone. A
    file of one object holding its rows in a list names the list. A job read before reading 8 read it so."""
    rows = [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]
    pretty = tmp_path / "p.jsonl"
    pretty.write_text("".join(json.dumps(r, indent=2) + "\n" for r in rows))
    with pytest.raises(InputError) as e:
        read_prompts(pretty, skip_invalid=True)
    assert str(e.value).endswith(
        f"{pretty}:1: the file's JSON objects are written over many lines (as jq without -c, or json.dump(..., "
        f"indent=2), writes them), not one per line as JSON Lines: jq -c . {pretty} > {tmp_path}/p-lines.jsonl "
        "writes each on one line"
    )
    assert all("invalid JSON" in m for _, m in _read(pretty, reading=7))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 2, "data": rows}, indent=2))
    with pytest.raises(InputError, match=r"its rows in the list 'data', .*: jq -c '\.data\[\]' \S+w.json > "):
        read_prompts(wrapped)
    # a JSON Lines file whose first row is broken ("{" alone) is that row's problem
    broken = tmp_path / "b.jsonl"
    broken.write_text('{\n{"prompt": "a"}\n')
    ps = read_prompts(broken, skip_invalid=True)
    assert [r.prompt for r in ps.rows] == ["a"] and [p.line for p in ps.problems] == [1]


def test_a_json_array_over_many_lines_says_the_jq_that_makes_lines(tmp_path):
    """It said to write each row with json.dumps in Python; the file at hand converts with one jq line, written
    beside it (never `> FILE` onto itself, which empties it first)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps([{"prompt": "a"}], indent=2))
    with pytest.raises(
        InputError, match=rf"jq -c '\.\[\]' {path} > {tmp_path}/rows-lines.jsonl writes it so"
    ):
        read_prompts(path)


def test_a_broken_first_row_stays_that_rows_problem_through_a_passing_read_error(tmp_path, monkeypatch):
    """Telling a broken first row ("{" alone) from objects over many lines opens the file a second time: a
    passing EIO there (a Drive mount dropping a request) read as no second line, and the file was refused as a
    whole, said written over many lines. That open is retried, as the lines' is."""
    import builtins
    import errno

    import runner.storage

    broken = tmp_path / "b.jsonl"
    broken.write_text('{\n{"prompt": "a"}\n')
    real_open, opens = builtins.open, []

    def flaky_open(file, mode="r", *args, **kwargs):
        if os.fspath(file) == str(broken) and "b" in mode:
            opens.append(mode)
            if len(opens) == 2:  # the second look, after the first line was read
                raise OSError(errno.EIO, "Input/output error", str(broken))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(runner.storage, "RETRY_DELAYS", (0.0,))
    monkeypatch.setattr(builtins, "open", flaky_open)
    ps = read_prompts(broken, skip_invalid=True)
    assert len(opens) >= 3 and [r.prompt for r in ps.rows] == ["a"] and [p.line for p in ps.problems] == [1]
