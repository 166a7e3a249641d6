"""Reading and validating prompt files: every problem names file, line and field; valid rows are kept."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

from runner import InputError, ParamError
from runner.errors import said_on_the_command_line
from runner.inputs import PromptReader, SeenIds, Template, read_prompts


def problems_of(path, **kw):
    with pytest.raises(InputError) as info:
        read_prompts(path, **kw)
    return [str(p) for p in info.value.problems], str(info.value)


def test_reads_prompts_ids_and_passthrough(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        '{"id": "a", "prompt": "Hello", "topic": "greeting", "score": 1}',
        "",
        '{"prompt": "吾輩は猫である。", "topic": null}',
        '{"id": 7, "messages": [{"role": "user", "content": "What is the capital of France?"}]}',
    ])  # fmt: skip
    ps = read_prompts(f)
    assert [r.id for r in ps.rows] == ["a", "3", "7"]  # missing id -> line number; integer id -> its string
    assert [r.line for r in ps.rows] == [1, 3, 4]
    assert ps.rows[0].prompt == "Hello" and ps.rows[0].extra == {"topic": "greeting", "score": 1}
    assert ps.rows[2].prompt is None and ps.rows[2].messages[0]["role"] == "user"
    assert ps.columns == ["topic", "score"] and ps.problems == []


BAD_LINES = [
    ('{"prompt": "ok",}', "p.jsonl:1: invalid JSON (Expecting property name enclosed in double quotes at column 17)"),
    # a line cut off inside a string (then a line break): not "Invalid control character at", a dangling "at"
    ('{"id": "b", "prompt": "cut off here', "p.jsonl:1: invalid JSON (unterminated string starting at column 23)"),
    ('{"prompt": "a\tb"}', "p.jsonl:1: invalid JSON (raw control character '\\t' inside a string at column 14: escape it)"),
    ('{"prompt": "a" "b": 1}', "p.jsonl:1: invalid JSON (Expecting ',' delimiter at column 16)"),
    ('["a", "b"]', "p.jsonl:1: expected a JSON object per line, got array"),
    ('{"prompt": NaN}', "p.jsonl:1: invalid JSON (NaN is not valid JSON)"),
    ('{"prompt": 42}', "p.jsonl:1: prompt: must be a string, got number"),
    ('{"prompt": "   "}', "p.jsonl:1: prompt: prompt is only whitespace ('   ')"),
    ('{"text": "no prompt here"}', "p.jsonl:1: prompt: missing (each row needs 'prompt' or 'messages'; the row "
     "has 'text'; prompt_field='text' reads it)"),
    ('{"id": "a", "prompt": null}', "p.jsonl:1: prompt: must be a string, got null (each row needs 'prompt' or "
     "'messages'; the row has 'id'; prompt_field or template names the one to use)"),  # was "missing"
    ('{"id": 1.5, "prompt": "x"}', "p.jsonl:1: id: must be a string or an integer, got 1.5"),
    ('{"id": "", "prompt": "x"}', "p.jsonl:1: id: must be a non-empty string"),
    ('{"prompt": "\\ud800"}', "p.jsonl:1: contains a lone surrogate escape (such as \\ud800), not valid Unicode"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}',
     "p.jsonl:1: messages: item 0: role must be one of system, user, assistant, tool, developer, got 'wizard'"),
    ('{"messages": "hi"}', "p.jsonl:1: messages: must be a non-empty list of {role, content} objects, got string"),
    # a key left out or misspelt said "role must be one of ..., got None" / "content must be ..., got null" (pass 195)
    ('{"messages": [{"rol": "user", "content": "hi"}]}',
     "p.jsonl:1: messages: item 0: role missing (the message has 'rol', 'content')"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
     "p.jsonl:1: messages: item 1: content missing (the message has 'role')"),
    ('{"messages": [{}]}', "p.jsonl:1: messages: item 0: role missing (the message has no fields)"),
    ('{"messages": [{"role": null, "content": "hi"}]}',
     "p.jsonl:1: messages: item 0: role must be one of system, user, assistant, tool, developer, got null"),
    ('{"messages": [{"role": "user", "content": 3}]}', "p.jsonl:1: messages: item 0: content must be a string or a list of text parts, got number"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
     "p.jsonl:1: messages: give either 'prompt' or 'messages', not both"),
    (b'{"prompt": "caf\xe9"}',
     "p.jsonl:1: invalid UTF-8 at byte 16 of the line; the file is not UTF-8; save it as UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "expected"), BAD_LINES)
def test_each_bad_line_is_named(tmp_path, line, expected):
    f = write_jsonl(tmp_path / "p.jsonl", [line])
    problems, message = problems_of(f)
    assert [p.replace(str(tmp_path) + "/", "") for p in problems] == [expected]
    assert "nothing was run" in message or "no valid rows" in message


def test_a_line_cut_off_inside_a_string_reads_the_same_wherever_it_is(tmp_path):
    """A file copied while being written, or a line break pasted into a prompt: the cut line said "Invalid control
    character at" with more lines after it (its line break was parsed as part of the string), and "Unterminated
    string starting at" as the file's last line."""
    cut = '{"id": "b", "prompt": "cut off here'
    said = []
    for name, data in [
        ("a", f'{{"id": "a", "prompt": "x"}}\n{cut}\n{{"id": "c", "prompt": "y"}}\n'),
        ("b", f'{{"id": "a", "prompt": "x"}}\n{cut}'),
        ("c", f'{{"id": "a", "prompt": "x"}}\r\n{cut}\r\n{{"id": "c", "prompt": "y"}}\r\n'),
    ]:
        (tmp_path / f"{name}.jsonl").write_text(data, newline="")
        problems, _ = problems_of(tmp_path / f"{name}.jsonl")
        said.append([p.replace(str(tmp_path) + "/", "") for p in problems])
    assert said == [[f"{n}.jsonl:2: invalid JSON (unterminated string starting at column 23)"] for n in "abc"]


def test_every_problem_is_reported_and_capped(tmp_path):
    lines = (
        ['{"prompt": "fine"}']
        + ['{"prompt": 1}'] * 30
        + ['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}']
    )
    f = write_jsonl(tmp_path / "p.jsonl", lines)
    problems, message = problems_of(f)
    assert len(problems) == 31
    assert problems[-1].endswith("p.jsonl:33: id: duplicate id 'x' (first on line 32)")
    assert "... and 11 more problems" in message and "skip_invalid=True" in message


def test_skip_invalid_is_suggested_only_when_some_row_is_valid(tmp_path, tiny_gpt2):
    """A file of only bad rows, or of none, said "(use --skip-invalid to run the valid rows)" (there are none;
    new-user walkthrough), and an empty file "1 invalid row"."""
    from runner.jobs import create_job

    cases = {
        "bad": ['{"prompt": 1}', '{"prompt": 2}'],
        "half": ['{"prompt": 1}', '{"prompt": "ok"}'],
        "empty": [],
    }
    said = {}
    for name, lines in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        for read in (read_prompts, lambda p: create_job(p, tiny_gpt2, home=tmp_path / "home")):
            with pytest.raises(InputError) as err:
                read(path)
            said.setdefault(name, set()).add(str(err.value).replace(str(tmp_path) + "/", ""))
    assert said["bad"] == {"no valid rows in bad.jsonl:\nbad.jsonl:1: prompt: must be a string, got number\n"
                           "bad.jsonl:2: prompt: must be a string, got number"}  # fmt: skip
    assert said["half"] == {"1 invalid row; nothing was run:\nhalf.jsonl:1: prompt: must be a string, got "
                            "number\n(use skip_invalid=True to run the valid rows)"}  # fmt: skip
    assert said["empty"] == {"nothing to run: empty.jsonl: the file has no rows"}


def test_bom_and_blank_lines_are_fine(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n\n   \n{"prompt": "second"}\n')
    assert [r.prompt for r in read_prompts(f).rows] == ["first", "second"]


def test_skip_invalid_keeps_valid_rows_and_returns_problems(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "a"}', "{oops", '{"prompt": "b"}'])
    ps = read_prompts(f, skip_invalid=True)
    assert [r.prompt for r in ps.rows] == ["a", "b"]
    assert [(p.line, p.message.split(" (")[0]) for p in ps.problems] == [(2, "invalid JSON")]
    with pytest.raises(InputError, match="no valid rows"):
        read_prompts(write_jsonl(tmp_path / "bad.jsonl", ["{oops"]), skip_invalid=True)


def test_template_fills_columns_and_names_missing_ones(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [
        json.dumps({"context": "Paris is in France.", "question": "Where is Paris?"}),
        json.dumps({"context": "x"}),
        json.dumps({"context": "x", "question": ["a list"]}),
    ])  # fmt: skip
    tmpl = "Context: {context}\nQuestion: {question}\nAnswer:"
    ps = read_prompts(f, template=tmpl, skip_invalid=True)
    assert ps.rows[0].prompt == "Context: Paris is in France.\nQuestion: Where is Paris?\nAnswer:"
    assert ps.rows[0].extra == {"context": "Paris is in France.", "question": "Where is Paris?"}
    assert [str(p).split("qa.jsonl:")[1] for p in ps.problems] == [
        "2: question: missing field 'question' used by template; the row has 'context'",
        "3: question: must be a string or number to fill template, got array",
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{x.__class__}", r"placeholder \{x.__class__\} is not allowed"),
        ("{x[0]}", r"placeholder \{x\[0\]\} is not allowed"),
        ("{x!r}", r"placeholder \{x!r\} is not allowed"),
        ("{x:>10}", r"placeholder \{x:>10\} is not allowed"),
        # JSON in a template: how to write its braces is said (pass 44)
        (
            '{"a": 1} {q}',
            r'placeholder \{"a": 1\} is not allowed: .*literal braces, as in JSON, are written \{\{ and',
        ),
        ("{}", r"must name a column"),
        ("no placeholders", r"template has no \{column\} placeholder"),
        ("{unclosed", r"template is not valid"),
    ],
)
def test_templates_fill_placeholders_only(template, message):
    with pytest.raises(ParamError, match=message) as info:
        Template(template)
    assert info.value.option == "--template"


def test_template_keeps_escaped_braces():
    assert Template('{{"q": "{q}"}}').render({"q": "hi"})[0] == '{"q": "hi"}'


def test_prompt_field_option(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", ['{"question": "Why?", "prompt": "other"}'])
    row = read_prompts(f, prompt_field="question").rows[0]
    assert row.prompt == "Why?" and row.extra == {"prompt": "other"}


def test_parquet_and_csv(tmp_path):
    pq.write_table(
        pa.table({"id": ["a", "b"], "prompt": ["Hello", "World"], "n": [1, 2]}), tmp_path / "p.parquet"
    )
    ps = read_prompts(tmp_path / "p.parquet")
    assert [(r.id, r.prompt, r.extra, r.line) for r in ps.rows] == [
        ("a", "Hello", {"n": 1}, 1),
        ("b", "World", {"n": 2}, 2),
    ]
    (tmp_path / "p.csv").write_text('id,prompt\n007,"Hello, world"\n008,\n', encoding="utf-8")
    problems, _ = problems_of(tmp_path / "p.csv")
    assert [p.split("p.csv:")[1] for p in problems] == ["3: prompt: prompt is empty"]
    rows = read_prompts(tmp_path / "p.csv", skip_invalid=True).rows
    assert [(r.id, r.prompt, r.line) for r in rows] == [("007", "Hello, world", 2)]


NOT_UTF8 = "the file is not UTF-8 (it looks like {}); save it as UTF-8"
JAPANESE = "id,prompt\n1,吾輩は猫である。\n2,名前はまだ無い。\n"


@pytest.mark.parametrize(
    ("text", "encoding", "line", "guess"),
    [
        (JAPANESE, "cp932", 2, "Shift-JIS/CP932"),
        (JAPANESE, "utf-16", 1, "UTF-16"),
        (
            "id,prompt,note\n1,Hello,ok\n2,Hi,こんにちは\n",
            "cp932",
            3,
            "Shift-JIS/CP932",
        ),  # only a passthrough
        ("prompt\n" + "Hello\n" * 20000 + "こんにちは\n", "cp932", 20002, "Shift-JIS/CP932"),  # a later block
    ],
    ids=["sjis", "utf16", "sjis-passthrough", "sjis-late"],
)
def test_a_csv_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, text, encoding, line, guess):
    """A CSV from a Japanese Windows user (Shift-JIS/CP932) or saved as UTF-16: one line naming the file, the
    first line that is not UTF-8 and what it looks like, not a UnicodeDecodeError traceback."""
    path = tmp_path / "p.csv"
    path.write_bytes(text.encode(encoding))
    problems, message = problems_of(path)
    converted = path.with_name("p-utf8.csv")
    iconv = f"iconv -f {'CP932' if encoding == 'cp932' else 'UTF-16'} -t UTF-8 {path} > {converted}"
    assert message == f"cannot read the prompt file: {path}:{line}: " + NOT_UTF8.format(guess) + (
        f' (in Excel, Save As "CSV UTF-8 (Comma delimited)"; or {iconv})'
    )


def test_a_latin1_csv_is_not_utf8_with_no_guess(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("id,prompt\n1,déjà vu au café\n".encode("latin-1"))
    assert (
        problems_of(path)[1]
        == f"cannot read the prompt file: {path}:2: the file is not UTF-8; save it as UTF-8"
    )


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("p.jsonl.gz", "a gzip-compressed file, which runner does not read: unpack it first (gunzip -k p.jsonl.gz "
                       "writes p.jsonl) and give p.jsonl"),
        ("p.zip", "a zip archive, which runner does not read: unpack it (unzip p.zip) and give the prompt file "
                  "inside"),
        ("p.xlsx", 'an Excel workbook, which runner does not read: save the sheet as "CSV UTF-8 (Comma delimited)" '
                   "and give the .csv"),
    ],
)  # fmt: skip
def test_a_packed_prompt_file_is_said_to_be_one(tmp_path, name, said):
    """A prompts.jsonl.gz (datasets reads those), a zip or an Excel workbook was "unknown file type '.gz'", saying
    neither what it is nor what to do."""
    import gzip

    path = tmp_path / name
    path.write_bytes(gzip.compress(b'{"prompt": "Hi"}\n'))
    with pytest.raises(ParamError) as err:
        read_prompts(path)
    assert str(err.value).endswith(f"{path}: {said}"), str(err.value)


def test_a_gzip_file_named_as_text_is_said_to_be_packed(tmp_path):
    """A gzip file under a .jsonl name was "not UTF-8 ...; save it as UTF-8": it is said to be gzip, to unpack."""
    import gzip

    path = tmp_path / "p.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "Hi"}\n'))
    assert problems_of(path)[1].endswith(
        "the file is not UTF-8 (it looks like a gzip-compressed file); unpack it (gunzip, unzip ...) and give the "
        "text inside"
    )


@pytest.mark.parametrize(("sep", "said"), [(";", "semicolons (;)"), ("\t", "tabs")], ids=["semicolon", "tab"])
def test_a_csv_separated_by_semicolons_or_tabs_is_said_so(tmp_path, sep, said):
    """Excel in a European or Japanese locale saves "CSV" with ';' (a TSV renamed .csv has tabs): every row was
    "prompt: missing ... the row has 'id;prompt'", with no word of the separator. A comma CSV whose one column
    holds ';' in its cells is read as before."""
    path = tmp_path / "p.csv"
    path.write_text(f"id{sep}prompt\n1{sep}こんにちは\n2{sep}今日は晴れ\n", encoding="utf-8")
    assert problems_of(path)[1] == (
        f"cannot read the prompt file: {path}:1: the header {f'id{sep}prompt'!r} reads as one column: its names "
        f"are separated by {said}, and a CSV file's by commas; save it from Excel as \"CSV UTF-8 (Comma "
        f'delimited)", or read it with pandas.read_csv(..., sep={sep!r}) and pass the DataFrame to runner.run'
    )
    path.write_text(f'prompt\n"a{sep}b"\nc{sep}d\n', encoding="utf-8")
    assert [r.prompt for r in read_prompts(path).rows] == [f"a{sep}b", f"c{sep}d"]


@pytest.mark.parametrize("sep", [";", "\t"], ids=["semicolon", "tab"])
def test_a_csv_whose_one_quoted_column_name_holds_a_semicolon_or_tab_is_read(tmp_path, sep):
    """A comma CSV of one column whose quoted name holds ';' or a tab ("q;a", as a spreadsheet quotes it) is
    one column by its quotes, not a file separated by that character: it is read, --prompt-field naming it."""
    path = tmp_path / "p.csv"
    path.write_text(f'"q{sep}a"\nhello\n', encoding="utf-8")
    assert [r.prompt for r in read_prompts(path, prompt_field=f"q{sep}a").rows] == ["hello"]


def test_a_spreadsheets_blank_row_in_a_csv_is_skipped_as_a_blank_line(tmp_path):
    """Excel writes a blank row inside its range as ",": every such row was refused ("id: must be a non-empty
    string", or "prompt: prompt is empty"), where a blank line is skipped. The rows keep their line numbers."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,note\r\nhello,\r\n,\r\nworld,x\r\n,\r\n", encoding="utf-8")
    rows = read_prompts(path).rows
    assert [(r.id, r.prompt) for r in rows] == [("2", "hello"), ("4", "world")]
    path.write_text("prompt,note\r\nhello,\r\n,x\r\n", encoding="utf-8")  # a row with a cell is a row
    assert problems_of(path)[0] == [f"{path}:3: prompt: prompt is empty"]


def test_a_csv_row_after_an_empty_line_is_named_by_its_own_line(tmp_path):
    """pyarrow skips an empty line without a word: the rows after one were named a line too early (an error
    pointed at the row above the bad one, and a row's default id was the line above it)."""
    path = tmp_path / "p.csv"
    path.write_text('prompt,note\n\nhello,a\n"two\n\nlines",b\n\n\n,c\nlast,d\n', encoding="utf-8")
    assert problems_of(path)[0] == [f"{path}:9: prompt: prompt is empty"]
    rows = read_prompts(path, skip_invalid=True).rows
    assert [(r.id, r.line, r.prompt) for r in rows] == [
        ("3", 3, "hello"),
        ("4", 4, "two\n\nlines"),
        ("10", 10, "last"),
    ]


def test_a_csv_row_after_a_cell_over_the_csv_modules_field_limit_is_named_by_its_own_line(tmp_path):
    """The lines come from the `csv` module, which stops at a cell over 131,072 characters (its field size
    limit) where pyarrow reads on: a long document with line breaks named every row after it by a line that
    was not its own (and took that line as its default id)."""
    path = tmp_path / "p.csv"
    long = "\n".join(["x" * 70_000] * 3)
    path.write_text(f'prompt,note\n"{long}",a\n\nhello,b\nlast,c\n', encoding="utf-8")
    rows = read_prompts(path).rows
    assert [(r.id, r.line) for r in rows] == [("2", 2), ("6", 6), ("7", 7)]


def test_a_csv_with_empty_lines_above_its_header_reads_as_the_same_file_without_them(tmp_path):
    """pyarrow skips empty lines above the header too, where the `csv` module reads an empty first record: the
    header was taken for empty, so every column was read with a type guessed (id 007 as 7) and each row named
    by the line above its own."""
    path = tmp_path / "p.csv"
    path.write_text("\n\nid,prompt\n007,hello\n\n0x1F,bye\n", encoding="utf-8")
    rows = read_prompts(path).rows
    assert [(r.id, r.line, r.prompt) for r in rows] == [("007", 4, "hello"), ("0x1F", 6, "bye")]


@pytest.mark.parametrize(("bad", "got"), [('c,say "hi", then stop', 3), ("c", 1)])
def test_a_csv_row_with_more_or_fewer_cells_than_the_header_is_named_by_its_line(tmp_path, bad, got):
    """An unquoted comma in a prompt (a hand edit, a spreadsheet): pyarrow's parse error named neither the line
    nor the field (adversarial pass 27). The row is named by the line it starts on (after a cell holding a line
    break: the file's line, not the row's number), with what to do."""
    path = tmp_path / "p.csv"
    path.write_text(f'id,prompt\na,hello\nb,"two\nlines"\n{bad}\nd,ok\n', encoding="utf-8")
    message = problems_of(path)[1]
    assert message.startswith(
        f"cannot read the prompt file: {path}:5: expected 2 cells (as the header), got {got}"
    )
    assert "must be quoted" in message


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.jsonl", '{"prompt": "Hello"}\n{"prompt": "吾輩は猫である"}\n'),
        ("p.txt", "Hello\n吾輩は猫である\n"),
    ],
)
def test_a_jsonl_or_text_file_in_another_encoding_is_refused_as_a_whole(tmp_path, name, text):
    """A Shift-JIS prompts.txt (Notepad, Excel): its bad lines were listed one by one, ending with "use
    --skip-invalid to run the valid rows", which ran the ASCII lines and dropped every Japanese one (pass 33).
    One line naming the file, as for a CSV; a stray bad byte in a UTF-8 file is still its line's problem."""
    path = tmp_path / name
    path.write_bytes(text.encode("cp932"))
    for skip in (False, True):
        problems, message = problems_of(path, skip_invalid=skip)
        assert message.startswith(
            f"cannot read the prompt file: {path}:2: " + NOT_UTF8.format("Shift-JIS/CP932")
        )
        assert message.endswith(
            f" (iconv -f CP932 -t UTF-8 {path} > {path.with_name('p-utf8' + path.suffix)})"
        )
    # one Shift-JIS line pasted into a UTF-8 file: that line's problem (adversarial pass 34)
    good = "".join(text.splitlines(keepends=True)[1:]).encode("utf-8")
    pasted = "名前はまだ無い\n" if name == "p.txt" else '{"prompt": "名前はまだ無い"}\n'
    path.write_bytes(good * 3 + pasted.encode("cp932"))
    problems, message = problems_of(path)
    assert problems == [f"{path}:4: invalid UTF-8 at byte {1 if name == 'p.txt' else 13} of the line; "
                        + NOT_UTF8.format("Shift-JIS/CP932")], message  # fmt: skip
    path.write_bytes('{"prompt": "Hello"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    stray = f"{path}:2: invalid UTF-8 at byte 16 of the line; the file is not UTF-8; save it as UTF-8"
    assert problems_of(path)[0] == [stray]


def test_a_pandas_index_is_not_a_passthrough_column(tmp_path):
    """df.to_parquet() after a filter or a shuffle stores the unnamed index as `__index_level_0__`: pandas
    reads it back as the index, so runner does not carry it into the results; a named index is a column."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"id": ["a", "b", "c", "d"], "prompt": ["w", "x", "y", "z"], "topic": [5, 1, 9, 3]})
    df[df.id != "b"].sample(frac=1, random_state=0).to_parquet(tmp_path / "shuffled.parquet")
    assert "__index_level_0__" in pq.ParquetFile(tmp_path / "shuffled.parquet").schema_arrow.names
    ps = read_prompts(tmp_path / "shuffled.parquet")
    assert sorted(r.id for r in ps.rows) == ["a", "c", "d"] and ps.columns == ["topic"]
    assert all(set(r.extra) == {"topic"} for r in ps.rows)
    df.set_index("topic").to_parquet(tmp_path / "named.parquet")
    assert read_prompts(tmp_path / "named.parquet").columns == ["topic"]


def test_a_csvs_cells_come_back_as_the_text_the_file_holds(tmp_path):
    """Adversarial pass 21: pyarrow guessed each CSV column's type from its first block, so passthrough keys
    007 came back as 7, 20-digit keys as equal floats, and an "A12" after a megabyte of numbers refused the
    file; a quoted cell holding a line break and a comma across a block boundary split the row in two (a
    phantom row, a prompt cut short); `tag,tag` kept one column's cells silently."""
    import csv

    n = 30000
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt", "code", "key"])
        w.writerows(
            [f"r{i}", f"xxTranslate to French:\nHello, world {i}", "007", str(10**19 + i)] for i in range(n)
        )
        w.writerow(["last", "last", "A12", "1.10"])
    rows = read_prompts(tmp_path / "p.csv").rows
    assert len(rows) == n + 1 and all(
        r.prompt == f"xxTranslate to French:\nHello, world {r.id[1:]}" for r in rows[:n]
    )
    assert [r.extra for r in rows[:2]] == [{"code": "007", "key": "10000000000000000000"},
                                           {"code": "007", "key": "10000000000000000001"}]  # fmt: skip
    assert rows[-1].extra == {"code": "A12", "key": "1.10"}
    (tmp_path / "dup.csv").write_text("id,prompt,tag,tag\n1,Hi,a,b\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"dup.csv:1: tag: the header names this column more than once"):
        read_prompts(tmp_path / "dup.csv")
    # a row after cells holding line breaks is named by the line it starts on
    (tmp_path / "lines.csv").write_text('id,prompt,note\nq1,"two\nlines",x\nq2,,"a\r\nb"\nq3,,y\n')
    problems, _ = problems_of(tmp_path / "lines.csv")
    assert [p.split("lines.csv:")[1] for p in problems] == [
        "4: prompt: prompt is empty",
        "6: prompt: prompt is empty",
    ]
    table = pa.Table.from_arrays(
        [pa.array(["Hi"]), pa.array(["a"]), pa.array(["b"])], ["prompt", "tag", "tag"]
    )
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(InputError, match=r"dup.parquet: tag: the file names this column more than once"):
        read_prompts(tmp_path / "dup.parquet")
    (tmp_path / "notes.csv").write_text(
        "prompt,,\nhi,note A,note B\n", encoding="utf-8"
    )  # Excel: no headings
    with pytest.raises(
        InputError, match=r"notes.csv:1: the header leaves columns 2 \(B\) and 3 \(C\) unnamed, and"
    ):
        read_prompts(tmp_path / "notes.csv")


def test_the_index_pandas_writes_to_csv_is_not_a_passthrough_column(tmp_path):
    """df.to_csv() writes the index as a first column with no name: not data, as in Parquet above."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"id": ["a", "b", "c"], "prompt": ["w", "x", "y"], "topic": [5, 1, 9]})
    df.sample(frac=1, random_state=0).to_csv(tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().startswith(",id,prompt,topic")
    ps = read_prompts(tmp_path / "p.csv")
    assert sorted(r.id for r in ps.rows) == ["a", "b", "c"] and ps.columns == ["topic"]
    assert all(set(r.extra) == {"topic"} for r in ps.rows)
    df.to_csv(tmp_path / "plain.csv", index=False)
    assert read_prompts(tmp_path / "plain.csv").columns == ["topic"]


def test_parquet_wrong_types_and_truncated_file(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    problems, _ = problems_of(tmp_path / "ints.parquet")
    assert [p.split("ints.parquet:")[1] for p in problems] == [
        "1: prompt: must be a string, got number",
        "2: prompt: must be a string, got number",
    ]
    pq.write_table(pa.table({"prompt": [["nested"]]}), tmp_path / "nested.parquet")
    assert problems_of(tmp_path / "nested.parquet")[0][0].endswith("prompt: must be a string, got array")
    data = (tmp_path / "ints.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    problems, message = problems_of(tmp_path / "cut.parquet")
    assert "not a readable Parquet file" in problems[0] and "cannot read the prompt file" in message


def test_missing_file_and_unknown_type(tmp_path):
    assert "no such file" in problems_of(tmp_path / "nope.jsonl")[0][0]
    (tmp_path / "p.docx").write_text("x")
    with pytest.raises(
        ParamError, match=r"unknown file type '\.docx'; use \.jsonl, \.parquet, \.csv, \.txt or -"
    ):
        read_prompts(tmp_path / "p.docx")
    # a folder that is no save_to_disk dataset said "unknown file type '(none)'" (pass 195)
    (tmp_path / "prompts").mkdir()
    with pytest.raises(
        ParamError, match=r"prompts is a folder: name a prompt file in it \(\.jsonl, .*save_to_disk"
    ):
        read_prompts(tmp_path / "prompts")
    # a text given where the file goes (gpt2-score's habit: `runner score "現在も..."`): said so (pass 33)
    with pytest.raises(
        ParamError, match=r"現在も東京は: no such file; a text itself goes in on standard input"
    ) as e:
        read_prompts("現在も東京は")
    assert e.value.option == "INPUT"


def test_a_txt_file_is_one_prompt_per_line(tmp_path):
    """.txt: one prompt per line (the id is its line number), blank lines skipped, a byte-order mark and CRLF
    dropped; a line that is not UTF-8 is named as in JSONL."""
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffこんにちは\r\n\n  \nThe fox\n".encode() + "猫".encode("cp932") + b"\n")
    ps = read_prompts(f, skip_invalid=True)
    assert [(r.id, r.prompt) for r in ps.rows] == [("1", "こんにちは"), ("4", "The fox")]
    assert [(p.line, p.message.split(";")[0]) for p in ps.problems] == [
        (5, "invalid UTF-8 at byte 1 of the line")
    ]


def test_seen_ids_finds_every_repeat_and_its_first_line():
    import random

    rng = random.Random(1)
    for _ in range(200):
        ids = [str(rng.randint(0, rng.choice([5, 50, 1000]))) for _ in range(rng.randint(0, 300))]
        seen, first, got, want = SeenIds(), {}, [], []
        pos = 0
        while pos < len(ids):  # chunks of random sizes: repeats within a chunk and across chunks
            part = ids[pos : pos + rng.randint(1, 40)]
            lines = list(range(pos + 1, pos + 1 + len(part)))
            got += seen.add(part, lines)
            for i, line in zip(part, lines, strict=True):
                want.append(first.get(i))
                first.setdefault(i, line)
            pos += len(part)
        assert got == want and len(seen) == len(first)


def test_chunks_report_duplicates_across_chunks_in_line_order(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        '{"id": "a", "prompt": "1"}', '{"id": "b", "prompt": "2"}', "{oops",
        '{"id": "a", "prompt": "4"}', '{"id": "c", "prompt": "5"}', '{"id": "c", "prompt": "6"}',
        '{"id": "b", "prompt": 7}', '{"id": "b", "prompt": "8"}',
    ])  # fmt: skip
    chunks = list(PromptReader(f).chunks(3))
    assert [[r.line for r in c.rows] for c in chunks] == [
        [1, 2],
        [5],
        [],
    ]
    problems = [str(p).split("p.jsonl:")[1] for c in chunks for p in c.problems]
    assert problems == [
        "3: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        "4: id: duplicate id 'a' (first on line 1)",
        "6: id: duplicate id 'c' (first on line 5)",
        "7: prompt: must be a string, got number",
        "8: id: duplicate id 'b' (first on line 2)",
    ]


def test_a_score_file_without_its_text_field_names_the_option_score_takes(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", ['{"sentence": "吾輩は猫である。"}'])
    problems, _ = problems_of(f, prompt_field="text", messages_field=None)
    assert problems[0].endswith("the row has 'sentence'; prompt_field='sentence' reads it)")
    with said_on_the_command_line():  # (`runner score`'s option)
        problems, _ = problems_of(f, prompt_field="text", messages_field=None)
    assert problems[0].endswith("the row has 'sentence'; --text-field sentence reads it)")
    f = write_jsonl(tmp_path / "s.jsonl", ['{"sentence": "吾輩は猫である。", "note": "x"}'])
    problems, _ = problems_of(f, prompt_field="text", messages_field=None)
    assert problems[0].endswith(
        "the row has 'sentence', 'note'; prompt_field or template names the one to use)"
    )


def test_an_empty_text_to_score_or_embed_is_said_as_a_text_not_a_prompt(tmp_path):
    """`runner score` / `embed` of a row whose text is empty said "text: prompt is empty": a score file has no
    prompts (adversarial pass 143)."""
    f = write_jsonl(tmp_path / "s.jsonl", ['{"text": "  "}', '{"body": ""}'])
    assert problems_of(f, prompt_field="text", messages_field=None)[0][0].endswith(
        "s.jsonl:1: text: text is only whitespace ('  ')"
    )
    problems, _ = problems_of(f, prompt_field="body", messages_field=None)
    assert problems[1].endswith("s.jsonl:2: body: text is empty")
    problems, _ = problems_of(write_jsonl(tmp_path / "p.jsonl", ['{"prompt": " "}', '{"prompt": ""}']))
    assert problems[0].endswith("p.jsonl:1: prompt: prompt is only whitespace (' ')")  # ("empty" was untrue)
    assert problems[1].endswith("p.jsonl:2: prompt: prompt is empty")


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_a_json_array_written_over_many_lines_is_one_line_saying_so(tmp_path, name):
    """`json.dump(rows, f, ensure_ascii=False, indent=2)`, as Japanese tutorials save data, was refused line by
    line ("rows.jsonl:1: invalid JSON (Expecting value at column 2)", then one line for each of its lines), never
    saying the file is a JSON array and not JSON Lines (adversarial pass 143)."""
    f = tmp_path / name
    f.write_text(json.dumps([{"prompt": "吾輩は猫である"}, {"prompt": "b"}], ensure_ascii=False, indent=2))
    problems, message = problems_of(f)
    assert len(problems) == 1 and problems[0].startswith(f"{f}:1: the file is one JSON array over many lines")
    assert message.startswith("cannot read the prompt file: ") and "lines=True" in message


def test_a_broken_first_row_that_starts_with_a_bracket_is_that_rows_problem(tmp_path):
    """Only a first line that is "[" alone says the file is a JSON array: a JSON Lines file whose first row is
    cut short ("[1, ") keeps its other rows under --skip-invalid (a fuzz test found the whole file refused)."""
    f = tmp_path / "p.jsonl"
    f.write_text('[1, \n{"id": "a", "prompt": "hello"}\n')
    ps = read_prompts(f, skip_invalid=True)
    assert [r.id for r in ps.rows] == ["a"] and [p.line for p in ps.problems] == [1]
    assert "invalid JSON" in ps.problems[0].message


def test_a_csv_cell_gives_messages_as_json_text(tmp_path):
    """The README's input table lists `messages` for every format, but a CSV cell is text: its JSON list was
    refused as "got string" (adversarial pass 27). It reads as the list; a cell that is not JSON is named."""
    import csv

    path = tmp_path / "c.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "messages"])
        w.writerow(["a", json.dumps([{"role": "user", "content": "こんにちは"}], ensure_ascii=False)])
    (row,) = read_prompts(path).rows
    assert row.messages == [{"role": "user", "content": "こんにちは"}] and row.prompt is None
    path.write_text('id,messages\na,"[{""role"": ""user"""\n', encoding="utf-8")
    assert (
        "c.csv:2: messages: a list of {role, content} objects as JSON text must be valid JSON"
        in problems_of(path)[1]
    )


def test_default_ids_are_what_the_readme_says_a_csv_its_line_numbers(tmp_path):
    """A CSV's rows without ids are named by the line each starts on (the header is line 1: ids 2, 3, 5 below),
    where the README said "the line number (JSONL) or row number", and a user merging on 1, 2, 3 found none
    (pass 195); a Parquet file's are its row numbers from 1."""
    from pathlib import Path

    (tmp_path / "p.csv").write_text('prompt\nfirst\n"two\nlines"\nthird\n', encoding="utf-8")
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "p.parquet")
    assert [r.id for r in read_prompts(tmp_path / "p.csv").rows] == ["2", "3", "5"]
    assert [r.id for r in read_prompts(tmp_path / "p.parquet").rows] == ["1", "2"]
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (row,) = [ln for ln in readme.splitlines() if ln.startswith("| `id` | optional")]
    assert (
        "in a CSV the line its row starts on, the header being line 1" in row and "row number from 1" in row
    )


def test_latin1_text_starting_like_bzip2_is_not_said_to_be_packed(tmp_path):
    """A Latin-1 .txt whose first line starts "BZh" (a word, no bzip2 stream: that is "BZh" + a block size digit +
    its block magic) was said to look like a bzip2-compressed file, to unpack."""
    path = tmp_path / "p.txt"
    path.write_bytes("BZhang café\n".encode("latin-1"))
    assert "bzip2" not in problems_of(path)[1]


def test_a_stray_line_starting_like_a_zip_is_that_lines_problem(tmp_path):
    """A packed file is known by its first bytes, not by a line further on: a UTF-8 file with one stray Latin-1
    line starting "PK\\x03\\x04" had that line said to look like a zip archive, to unpack."""
    path = tmp_path / "p.txt"
    path.write_bytes("Grüße\n".encode() + b"PK\x03\x04 caf\xe9\n" + b"hello\n")
    rows = read_prompts(path, skip_invalid=True)
    assert [r.prompt for r in rows.rows] == ["Grüße", "hello"]
    assert [p.line for p in rows.problems] == [2] and "zip" not in str(rows.problems[0])


def test_a_packed_file_whose_text_is_beside_it_says_so(tmp_path):
    """p.jsonl.gz beside its p.jsonl was told "gunzip -k p.jsonl.gz writes p.jsonl", which gunzip refuses
    (p.jsonl already exists): said to give the p.jsonl there, or unpack over it."""
    import gzip

    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n')
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "Hi"}\n'))
    with pytest.raises(ParamError) as err:
        read_prompts(path)
    assert str(err.value).endswith(
        "p.jsonl is beside it already: give p.jsonl, or unpack this one over it (gunzip -kf p.jsonl.gz)"
    ), str(err.value)
