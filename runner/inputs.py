"""Read and validate prompt files (JSONL, Parquet, CSV): the first stage of the flow.

input file -> `PromptReader.chunks` -> `PromptChunk`s (valid `PromptRow`s + `Problem`s) -> job (jobs.py)
(`read_prompts` gathers them into one `PromptSet`, for files that fit in memory)

The file is read as a stream, so a file of any size is checked in bounded memory, and every problem names the
file, the line (JSONL) or row (Parquet/CSV, 1-based) and the field. A row gives its prompt in one of three ways:
  * a `--template` with `{column}` placeholders filled from the row's columns,
  * a string column (`prompt` by default, `--prompt-field` to pick another),
  * an OpenAI-style `messages` list, rendered later with the tokenizer's chat template.
Every other column passes through to the results unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import stat
import string
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import openai_batch, storage
from .errors import (
    TEXT_ON_STDIN,
    InputError,
    ParamError,
    Problem,
    RunnerError,
    first_line,
    on_the_command_line,
    option,
)
from .params import ROW_SETTINGS, row_overrides, setting_from_text

T = TypeVar("T")

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_LINE_BYTES = 64 * 1024 * 1024  # a line this long is surely a broken file, not a prompt
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text"}  # fmt: skip


@dataclass
class PromptRow:
    """One valid input row. `prompt` is None exactly when `messages` is set."""

    line: int
    id: str
    prompt: str | None  # the prompt, the text to score/embed, or the context of a continuation
    messages: list[dict[str, str]] | None
    extra: dict[str, Any] = field(default_factory=dict)
    continuation: str | None = None  # scoring rows with context + continuation fields
    settings: dict[str, Any] | None = None  # the row's own generation settings (GenerationParams fields)
    request: dict[str, Any] | None = None  # an OpenAI Batch request: url, model, echo
    raw_settings: dict[str, Any] | None = None  # the setting fields as the row spelled them
    # a Batch request's row fields renamed from its body's fields (openai_batch.body_named)
    body_names: dict[str, str] | None = None


@dataclass
class PromptSet:
    path: str
    rows: list[PromptRow]
    problems: list[Problem]
    columns: list[str]  # passthrough column names, in first-seen order


class Template:
    """`str.format`-style `{column}` placeholders, and nothing else: no attribute access, indexing,
    conversions or format specs, so a template can never run code or reach into Python objects."""

    def __init__(self, text: str):
        self.text = text
        self.parts: list[tuple[str, str | None]] = []  # (literal, placeholder or None)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise ParamError(
                "template", f"template is not valid: {e} (write literal braces as {{{{ and }}}})."
            ) from e
        for literal, name, spec, conversion in parsed:
            if name is not None:
                if name == "":
                    raise ParamError(
                        "template", "template placeholder {} must name a column, like {question}."
                    )
                if "." in name or "[" in name or spec or conversion:
                    raise ParamError(
                        "template",
                        f"template placeholder {{{name}{'!' + conversion if conversion else ''}"
                        f"{':' + spec if spec else ''}}} is not allowed: use plain {{column}} placeholders"
                        + (
                            " (literal braces, as in JSON, are written {{ and }})."
                            if name[:1] in "\"'"
                            else "."
                        ),
                    )
            self.parts.append((literal, name))
        self.fields = [n for _, n in self.parts if n is not None]
        if not self.fields:
            raise ParamError("template", "template has no {column} placeholder.")

    def render(self, row: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
        """Return (text, None, None) or (None, bad_field, reason)."""
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name is None:
                continue
            if name not in row or row[name] is None:
                return (
                    None,
                    name,
                    f"missing field {name!r} used by {option('template', None)};{_fields_it_has(row)}",
                )
            value = row[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return (
                    None,
                    name,
                    f"must be a string or number to fill {option('template', None)}, got {_kind(value)}",
                )
            out.append(str(value))
        return "".join(out), None, None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every line (json.loads with options builds a new one per call: ~10% of reading a file).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    """json.loads(text, parse_constant=_reject_constant), BOM check included."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def _json_problem(text: str, e: ValueError) -> str:
    """What is wrong with a line that is not JSON, with the column where it is (json's own messages end in a
    bare "at", the position being formatted apart). The line is parsed again without its line break first: a
    string cut off at the line's end read as a string holding a raw line break ("Invalid control character")."""
    if not isinstance(e, json.JSONDecodeError):
        return str(e)  # (NaN is not valid JSON)
    try:
        _loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as bare:
        e = bare
    except (ValueError, RecursionError):
        pass
    if e.msg.startswith("Unterminated string"):
        return f"unterminated string starting at column {e.colno}"
    if e.msg.startswith("Invalid control character"):
        return f"raw control character {e.doc[e.pos]!r} inside a string at column {e.colno}: escape it"
    if e.msg.startswith("Unexpected UTF-8 BOM"):
        return "a byte-order mark, U+FEFF, starts the line"
    return f"{e.msg} at column {e.colno}"


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _text_lines(path: Path, unicode_blank: bool = False) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) or (line number, None, reason) for each line that is not blank (`_blank`:
    with `unicode_blank`, a line of U+3000 or no-break spaces is blank too). Reads in
    binary so that a stray bad byte is reported on its line (the first such line also says what the file looks
    like, once), and streams so memory stays flat. A file that looks written in another encoding (Shift-JIS,
    UTF-16) is refused as a whole: row by row, --skip-invalid would run its ASCII lines and drop the rest."""
    hint = ""
    with _opened(lambda: open(path, "rb"), path) as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                yield lineno, None, f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit"
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark, as Windows editors write
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if not hint and _written_in_another_encoding(path, raw):
                    raise _not_utf8_error(path) from None
                said, hint = hint, hint or not_utf8(path, raw)
                yield (
                    lineno,
                    None,
                    f"invalid UTF-8 at byte {e.start + 1} of the line" + ("" if said else f"; {hint}"),
                )
                continue
            if not _blank(text, unicode_blank):
                yield lineno, text, None


def _blank(text: str, unicode: bool) -> bool:
    """A line of only ASCII whitespace, or with `unicode` of any whitespace (U+3000, which a Japanese IME types
    between paragraphs, U+00A0); never one holding \x1c-\x1f, which str.strip drops but are not blank (a line
    of them stays a row, refused as only whitespace)."""
    if unicode:
        return not text.strip() and not any("\x1c" <= c <= "\x1f" for c in text)
    return not text.strip(" \t\r\n\x0b\x0c")


def iter_text(
    path: Path, field: str, unicode_blank: bool = True
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """A .txt file (or standard input): one prompt, or text to score or embed, per line (as gpt2-score and
    `runner generate FILE.txt` read them), its id the line number; blank lines are skipped, a line of only
    Unicode spaces (U+3000, which a Japanese IME types, a no-break space) too: as a text it is only whitespace,
    which a row may not be, and refused the whole file (`unicode_blank` False: kept, as a job of before
    read its file: `PromptReader.reading`)."""
    for lineno, text, reason in _text_lines(path, unicode_blank):
        yield lineno, None if text is None else {field: text.rstrip("\r\n")}, reason


# How a file is read (job.json's input "reading"): 11 (adversarial pass 262) changes no row, only where submit's
# chunks (prompts.parquet's row groups) end: at a number of characters of text too (`PromptReader.chunks`); 10
# (adversarial pass 261), a Batch /v1/completions request with echo and max_tokens 0 (scoring its prompt, as the
# OpenAI API does) is refused naming `runner score` (it was refused as any max_tokens 0); 9 (adversarial pass 256), a
# Batch chat body's `top_logprobs` given as true or false is refused (true was top_logprobs 0, false no log-probs at
# all); 8 (adversarial pass 244), a CSV's columns with no name and no value in any row are left out (one was a column
# named "" of empty cells; two or more refused the file), a CSV row repeating the header is refused (it was a row, its
# prompt the column's name), a JSON Lines file whose first line is "{" alone is refused as JSON over many lines (each
# line was refused, or --skip-invalid ran the few that parse), and a row without its prompt field says what reads it
# (`_what_reads_it`); 7 (adversarial passes 234-235), a CSV `stop` cell that only starts like a JSON list ("[END]\n")
# has its typed `\n` read as a line break (it kept a backslash and an n), and a float id's refusal names its value and
# what made it (`_float_id_said`; it said "got number"); 6 (2026-12-07: adversarial passes 222-227), a score pair's
# context that encodes to no tokens is the empty context, BOS (scoring.split_contexts), and a continuation or text
# that encodes to none is refused as such; a row's min_p is a setting (a plain row's column was data, a Batch body's
# refused), a Batch body's whole float seed (-1.0) is its integer (was refused), a response_format key nothing reads
# is refused (was dropped), and a left-out message is found by counting its text's occurrences; 5 (adversarial pass
# 222), a chat row's developer message is a system message for a template without that role, and a message the
# template leaves out is refused (batching.render_prompt); 4 (2026-12-06, evening), a Parquet file's named RangeIndex
# (pandas' `set_index("番号")` of 1, 2, 3 ..., kept in its metadata only) is a column; 3 (2026-12-06, later), an
# embedding request may ask for base64; 2 (2026-12-06), a Parquet column keeps its Arrow type and a .txt line of
# Unicode spaces is blank; 1, a job without it: `runner repair` rebuilds its prompts.parquet and errors.jsonl as its
# submit wrote them, or their checksums differ and it cannot
READING = 11


def iter_jsonl(path: Path, reading: int = READING) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (line number, object, None) or (line number, None, reason); blank lines are skipped. A file of
    JSON written over many lines is refused as such (`reading`: a job's, since 8 objects as well as arrays)."""
    for lineno, text, reason in _text_lines(path):
        if text is None:
            yield lineno, None, reason
            continue
        try:
            obj = _loads(text)
        except ValueError as e:
            # a pretty-printed JSON array opens with "[" alone (a broken first row is that row's problem)
            if lineno == 1 and text.strip() == "[":
                raise _json_array_error(path) from None
            if lineno == 1 and text.strip() == "{" and reading >= 8 and not _a_row_follows(path):
                raise _json_objects_error(path) from None
            yield lineno, None, f"invalid JSON ({_json_problem(text, e)})"
            continue
        except RecursionError:  # thousands of [ or {: the parser's recursion limit (pass 64)
            yield lineno, None, "invalid JSON (nested too deeply)"
            continue
        if not isinstance(obj, dict):
            rows = lineno == 1 and isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj)
            hint = " (one JSON array of rows, as pandas' to_json(orient='records') writes: add lines=True)"
            yield lineno, None, f"expected a JSON object per line, got {_kind(obj)}" + (hint if rows else "")
            continue
        if "\\u" in text and _has_surrogate(obj):  # only a \u escape can make a lone surrogate
            yield lineno, None, "contains a lone surrogate escape (such as \\ud800), not valid Unicode"
            continue
        yield lineno, obj, None


def _json_array_error(path: Path) -> InputError:
    """A file whose first line opens a JSON array it does not close: one array of rows over many lines
    (`json.dump(rows, f, indent=2)`), which was refused line by line as "invalid JSON", never said as such."""
    why = (
        "the file is one JSON array over many lines, not JSON Lines (one object per line): jq -c '.[]' "
        f"{_as_lines(path)} writes it so; in Python write each row with json.dumps(row, ensure_ascii=False) and a "
        "line break (pandas: to_json(orient='records', lines=True))"
    )
    return InputError([Problem(str(path), 1, None, why)], header="cannot read the prompt file")


def _json_objects_error(path: Path) -> InputError:
    """A file whose first line is "{" alone: JSON objects written over many lines (`jq` without -c, or
    `json.dump(row, f, indent=2)`), or one object holding the rows in a list (`{"data": [...]}`). Each of its
    lines was refused as "invalid JSON", never saying why."""
    key = _rows_key(path)
    if key is None:
        why = ("the file's JSON objects are written over many lines (as jq without -c, or json.dump(..., "
               f"indent=2), writes them), not one per line as JSON Lines: jq -c . {_as_lines(path)} writes each "
               "on one line")  # fmt: skip
    else:
        why = (f"the file is one JSON object over many lines, its rows in the list {key!r}, not JSON Lines (one "
               f"object per line): jq -c '{_jq_step(key)}[]' {_as_lines(path)} writes them so")  # fmt: skip
    return InputError([Problem(str(path), 1, None, why)], header="cannot read the prompt file")


def _a_row_follows(path: Path) -> bool:
    """Whether the file's second line that is not blank is a JSON object: a JSON Lines file whose first row is
    broken ("{" alone), which is that row's problem, not a file of objects over many lines. Opened through the
    retries, as the lines were (`_head` reads none where the open fails: a passing EIO refused such a file as a
    whole, saying its objects were written over many lines)."""
    with _opened(lambda: open(path, "rb"), path) as f:
        head = f.read(HEAD_BYTES)
    lines = [line for line in head.split(b"\n")[1:] if line.strip()]
    try:
        return bool(lines) and isinstance(_loads(lines[0].decode("utf-8")), dict)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return False


def _as_lines(path: Path) -> str:
    """`FILE > FILE-lines.jsonl` of a command converting the file into JSON Lines beside it."""
    return _into_beside(str(path), "lines")


def _rows_key(path: Path) -> str | None:
    """The key of the list of row objects the file holds, where it is one JSON object ({"data": [{...}, ...]}),
    read whole (up to MAX_LINE_BYTES); None where it is not, or cannot be read."""
    try:
        if os.path.getsize(path) > MAX_LINE_BYTES:
            return None
        with open(path, encoding="utf-8-sig") as f:
            whole = _loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(whole, dict):
        return None
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    return lists[0] if lists else None


# --- files that are not UTF-8 -------------------------------------------------------------------------------

HEAD_BYTES = 64 * 1024  # enough of a file to tell UTF-16 or Shift-JIS


def not_utf8(path: Path, bad: bytes = b"") -> str:
    """What to tell the user of a file that is not UTF-8, with what it looks like when that is clear (from the
    file's first bytes, else from `bad`, the first line that is not UTF-8)."""
    return _not_utf8("the file", _looks_like(path, bad), "save it as UTF-8")


def _written_in_another_encoding(path: Path, bad: bytes) -> bool:
    """The whole file looks written in another encoding (Shift-JIS, UTF-16), not a UTF-8 file with a stray
    line: an encoding is recognised, and none of the non-ASCII lines of its first bytes is UTF-8 (one Shift-JIS
    line pasted into a UTF-8 file is that line's problem: --skip-invalid runs the others)."""
    head = _head(path)
    if _guessed(head, bad) is None:
        return False
    lines = [line for line in head.removeprefix(b"\xef\xbb\xbf").split(b"\n")[:-1] if not line.isascii()]
    return not any(_is_utf8(line) for line in lines)  # (the last line may be cut short: left out)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _looks_like(path: Path, bad: bytes = b"") -> str | None:
    """The encoding a file not in UTF-8 looks written in (from its first bytes, else from `bad`), or None."""
    return _guessed(_head(path), bad)


def _guessed(head: bytes, bad: bytes) -> str | None:
    # (a packed file is known by its first bytes only: a stray line further on was said to be a zip archive)
    return _packed(head) or _guess_encoding(head) or _guess_encoding(bad[:HEAD_BYTES])


def _head(path: Path) -> bytes:
    """The file's first HEAD_BYTES (none where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(HEAD_BYTES)
    except OSError:
        return b""


def not_utf8_text(raw: bytes) -> str:
    """`not_utf8` for bytes that are not in a file (standard input, an argument)."""
    return _not_utf8("the text", _guessed(raw[:HEAD_BYTES], b""), "send it as UTF-8")


# what to do with an Excel workbook given for a prompt file
SAVE_AS_CSV = 'save the sheet as "CSV UTF-8 (Comma delimited)"'


def _not_utf8(what: str, guess: str | None, fix: str) -> str:
    if guess in PACKED.values():  # (a gzip file named .jsonl was "not UTF-8 ...; save it as UTF-8")
        fix = (
            "unpack it (gunzip, unzip ...) and give the text inside" if "Excel" not in guess else SAVE_AS_CSV
        )
    return f"{what} is not UTF-8" + (f" (it looks like {guess})" if guess else "") + f"; {fix}"


# The first bytes of the packed files of PACKED (an .xls is an OLE file: said as the workbook it most likely is);
# bzip2's "BZh" is followed by a block size digit and a block's magic (or the end of stream's): a Latin-1 text
# starting "BZhang" was said to be bzip2
MAGIC = ((re.compile(rb"\x1f\x8b\x08"), ".gz"), (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), ".bz2"),
         (re.compile(rb"\xfd7zXZ\x00"), ".xz"), (re.compile(rb"\x28\xb5\x2f\xfd"), ".zst"),
         (re.compile(rb"PK\x03\x04"), ".zip"), (re.compile(rb"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"), ".xls"))  # fmt: skip


def _packed(head: bytes) -> str | None:
    """What packed file (PACKED) `head`, a file's first bytes, starts as, or None."""
    return next((PACKED[suffix] for magic, suffix in MAGIC if magic.match(head)), None)


def _guess_encoding(head: bytes) -> str | None:
    """UTF-16 (its byte-order mark, or the NUL bytes of mostly-ASCII text), Shift-JIS/CP932 (it decodes as such
    and holds kana: text that only happens to decode is kanji soup, a Latin code page more likely), or None."""
    import codecs

    nuls = max(head[0::2].count(0), head[1::2].count(0))
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or nuls > len(head) // 4:
        return "UTF-16"
    try:
        text = codecs.getincrementaldecoder("cp932")().decode(head)  # a character cut at the end is left out
    except UnicodeDecodeError:
        return None
    return "Shift-JIS/CP932" if any("\u3041" <= c <= "\u30fa" for c in text) else None


def not_utf8_problem(path: Path) -> Problem:
    """The file-level problem of a text file that is not UTF-8, on the first line that is not."""
    line, raw = 0, b""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError:
                break
    return Problem(str(path), line, None, not_utf8(path, raw) + _how_to_convert(path, _looks_like(path, raw)))


# iconv's names of the encodings `_guess_encoding` tells
ICONV = {"Shift-JIS/CP932": "CP932", "UTF-16": "UTF-16"}


def _how_to_convert(path: Path, guess: str | None) -> str:
    """How to make a file in the encoding `guess` UTF-8 (said of a whole file): Excel's "CSV (comma delimited)"
    in Japan writes CP932, and the UTF-8 one is another item of the Save As list; iconv converts any file."""
    if guess not in ICONV:
        return ""
    if path.name == STDIN_COPY and path.parent.name.startswith(
        TEMPORARY
    ):  # (standard input: no file to name)
        return f" (iconv -f {ICONV[guess]} -t UTF-8 converts it on its way in)"
    excel = 'in Excel, Save As "CSV UTF-8 (Comma delimited)"; or ' if path.suffix.lower() == ".csv" else ""
    return f" ({excel}iconv -f {ICONV[guess]} -t UTF-8 {_into_beside(str(path), 'utf8', path.suffix)})"


def _not_utf8_error(path: Path) -> InputError:
    return InputError([not_utf8_problem(path)], header="cannot read the prompt file")


def read_text_lines(path: Path, numbered: bool = False) -> list[Any]:
    """The lines of a .txt file that are not blank, read as jobs read it (`_text_lines`); `numbered`: as (line
    number, text), the number a job makes its id. InputError naming the file and the first line that cannot be
    read (not UTF-8, too long)."""
    lines: list[Any] = []
    for lineno, text, reason in _text_lines(path, unicode_blank=True):  # (as `iter_text` reads a job's file)
        if text is None:
            raise InputError([Problem(str(path), lineno, None, reason)], header="cannot read the prompt file")
        lines.append((lineno, text.rstrip("\r\n")) if numbered else text.rstrip("\r\n"))
    return lines


def _iter_arrow(
    path: Path, fmt: str, reading: int = READING
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """The rows of a Parquet or CSV file, read as a job of `reading` (its job.json's) read them: since 4 a
    Parquet file's named RangeIndex is a column, first (`_named_range_index`); since 8 a CSV's unnamed columns
    holding nothing are left out (`_csv_batches`) and a CSV row repeating the header is refused."""
    import pyarrow as pa

    try:
        index = None
        if fmt == "parquet":
            import pyarrow.parquet as pq

            # (read a page at a time: by default a row group's column is read whole, and pandas writes a row group
            # of up to a million rows, so a 2 GB file took 2 GB more to read)
            pf = _opened(
                lambda: pq.ParquetFile(storage.arrow_file(path), pre_buffer=False, buffer_size=1 << 20), path
            )
            columns = _data_columns(pf.schema_arrow)
            index = _named_range_index(pf, columns) if reading >= 4 else None
            _refuse_names_twice(path, columns, 0, "the file")
            batches = pf.iter_batches(batch_size=4096, columns=columns)
        else:
            batches = _csv_batches(path, reading >= 8)
        # CSV rows are named by the file line they start on (the header is line 1), Parquet rows from 1
        lines = _csv_lines(path) if fmt == "csv" else itertools.count(1)
        for batch in batches:
            for obj in batch.to_pylist():
                line = next(lines)
                if index is not None:
                    obj = {index[0]: index[1] + (line - 1) * index[2], **obj}
                blank_row = fmt == "csv" and not any(obj.values())  # a spreadsheet's ",,": as a blank line
                if blank_row:
                    continue
                if fmt == "csv" and reading >= 8 and _repeats_header(obj):
                    yield line, None, REPEATED_HEADER
                else:
                    yield line, obj, None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        if isinstance(e, OSError) and e.errno in storage.TRANSIENT:  # the file system's error, not the file's
            raise storage.StorageError(
                f"cannot read {path}: {e.strerror or e} (errno {e.errno})", e.errno
            ) from e
        if fmt == "csv" and "invalid UTF8" in str(e):  # a text column of a later block
            raise _not_utf8_error(path) from e
        if fmt == "csv" and (ragged := _ragged_csv_row(path)) is not None:
            raise InputError([ragged], header="cannot read the prompt file") from e
        what = "Parquet" if fmt == "parquet" else "CSV"
        raise InputError(
            [Problem(str(path), 0, None, f"not a readable {what} file ({e})")],
            header="cannot read the prompt file",
        ) from e


# A CSV row that repeats the header: CSV exports joined together (`cat a.csv b.csv`, a sheet pasted under another
# with its headings), each with its header. It was a row like any other, its prompt the column's name.
REPEATED_HEADER = (
    "this row repeats the header (CSV files joined together, each with its own header?): delete it"
)


def _repeats_header(obj: dict[str, Any]) -> bool:
    """Whether a CSV row holds its columns' names, each in its own column (at least two named columns: a file of
    one column may well hold a prompt that is its name)."""
    return sum(1 for k in obj if k) >= 2 and all(v == k for k, v in obj.items())


def _ragged_csv_row(path: Path) -> Problem | None:
    """The first CSV row with more or fewer cells than the header, named by the line it starts on (pyarrow's
    parse error names neither line nor row when it reads in threads): most often a cell holding a comma or a
    quote that was not quoted, by hand or by a spreadsheet."""
    import csv

    start, header = 1, []
    with (
        _opened(lambda: open(path, encoding="utf-8-sig", newline=""), path) as f,
        contextlib.suppress(csv.Error, ValueError),
    ):
        records = _csv_records(f)
        try:
            header, end = _csv_header(records)
            start = end + 1
            for cells, end in records:
                if cells and len(cells) != len(header):
                    return Problem(str(path), start, None, f"expected {len(header)} cells (as the header), got "
                                   f"{len(cells)}: a cell holding a comma or a quote must be quoted (\"say "
                                   "\"\"hi\"\", then stop\")")  # fmt: skip
                start = end + 1
        except _UnclosedQuote as e:
            return _unclosed_quote(path, start, header, e.cell)
    return None


def _csv_header(records: Iterator[tuple[list[str], int]]) -> tuple[list[str], int]:
    """The header of `_csv_records` and the line it ends on: the first record that is not an empty line, as
    pyarrow skips empty lines above it too (the `csv` module's empty first record was taken for the header)."""
    return next(((cells, end) for cells, end in records if cells), ([], 0))


def _csv_lines(path: Path) -> Iterator[int]:
    """The file line each CSV record after the header starts on, as pyarrow reads the records: it skips empty
    lines without a word and a quoted cell may hold line breaks, so counting records (or their line breaks)
    named every row after an empty line a line too early. Read beside pyarrow by the `csv` module, whose
    `line_num` counts the file's lines (should the two ever part, the lines go on counting from there)."""
    import csv

    with _opened(lambda: open(path, encoding="utf-8-sig", newline=""), path) as f:
        records = _csv_records(f)
        start, header = 1, []
        try:
            with contextlib.suppress(csv.Error, ValueError):
                header, end = _csv_header(records)
                start = end + 1
                for cells, end in records:
                    if cells:
                        yield start
                    start = end + 1
        except _UnclosedQuote as e:
            problem = _unclosed_quote(path, start, header, e.cell)
            raise InputError([problem], header="cannot read the prompt file") from None
    yield from itertools.count(start)


class _UnclosedQuote(Exception):
    """The file ends inside a quoted cell (cell `cell` of the last record)."""

    def __init__(self, cell: int):
        super().__init__(cell)
        self.cell = cell


def _unclosed_quote(path: Path, line: int, header: list[str], cell: int) -> Problem:
    """A quoted cell never closed takes every line after it into itself, and pyarrow reads it so without a word:
    the rows below it were gone from the job. Refused, naming the line the cell's record starts on."""
    field = header[cell] if line > 1 and 0 <= cell < len(header) else None
    why = ("a quoted cell opened here is never closed: its quote runs to the end of the file and takes every "
           "line after it into this one cell; close it, and double a quote inside a quoted cell (\"say \"\"hi"
           "\"\", then stop\")")  # fmt: skip
    return Problem(str(path), line, field, why)


def _csv_records(f: Any) -> Iterator[tuple[list[str], int]]:
    """Each CSV record of `f` and the file line it ends on, as the `csv` module reads them but with no limit on a
    cell's size: pyarrow reads a cell of any size, and the module stops at its field size limit (131,072
    characters, a long document), where the lines counted beside pyarrow parted from its rows. The limit is the
    module's, for the whole process: raised for each record only, then set back. A last record that ends inside
    a quoted cell raises _UnclosedQuote (`_refuse_unclosed`: its lines are held while it is read)."""
    import csv

    held: list[str] = []
    ended = [False]

    def kept() -> Iterator[str]:
        for text in f:
            held.append(text)
            yield text
        ended[0] = True

    reader = csv.reader(kept())
    while True:
        held.clear()
        limit = csv.field_size_limit(2**31 - 1)  # (a C long on every platform)
        try:
            cells = next(reader, None)
            if cells is not None and ended[0]:  # the last record: does it end in a quote?
                _refuse_unclosed(held, len(cells) - 1)
        finally:
            csv.field_size_limit(limit)
        if cells is None:
            return
        yield cells, reader.line_num


def _refuse_unclosed(lines: list[str], cell: int) -> None:
    """Raise _UnclosedQuote where `lines` (one record, the file's last) end inside a quoted cell, which the
    `csv` module (strict=False, as pyarrow) takes as the cell's end."""
    import csv

    try:
        for _ in csv.reader(lines, strict=True):
            pass
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise _UnclosedQuote(cell) from None


def _without_views(t: Any) -> Any:
    """Arrow type `t` with its view layouts as the plain ones (string_view as string, binary_view as binary,
    list_view as list, at any depth): the Parquet type is the same, and pyarrow has no `take` for views, so a
    job of a Parquet file read as views (Polars' newest Arrow level, `pa.string_view()`) died writing its
    first results."""
    import pyarrow as pa

    if "_view" not in str(t):  # (the usual case: the type as it is)
        return t
    is_ = lambda name: getattr(pa.types, name, lambda _: False)(t)  # noqa: E731 (pyarrow < 16: no views)
    if is_("is_string_view") or is_("is_binary_view"):
        return pa.string() if is_("is_string_view") else pa.binary()
    if is_("is_list_view") or is_("is_large_list_view") or pa.types.is_list(t) or pa.types.is_large_list(t):
        item = t.value_field.with_type(_without_views(t.value_type))
        return (
            pa.large_list(item) if is_("is_large_list_view") or pa.types.is_large_list(t) else pa.list_(item)
        )
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_without_views(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_without_views(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(_without_views(t.key_type), _without_views(t.item_type), t.keys_sorted)
    return t


def _data_columns(schema: Any) -> list[str]:
    """The Parquet file's columns without the index pandas stores for an unnamed non-range index
    (`__index_level_0__`, written by `df.to_parquet()` after a filter or a shuffle): pandas reads it back as
    the index, not as data, so it is not a passthrough column of the results either."""
    meta = _pandas_meta(schema)
    index = {
        c for c in meta.get("index_columns", []) if isinstance(c, str) and c.startswith("__index_level_")
    }
    return [name for name in schema.names if name not in index]


def _pandas_meta(schema: Any) -> dict[str, Any]:
    """The note pandas leaves in a Parquet file's schema ({} for none, or one that is not JSON)."""
    try:
        return schema.pandas_metadata or {}
    except ValueError:
        return {}


def _named_range_index(pf: Any, columns: list[str]) -> tuple[str, int, int] | None:
    """(name, start, step) of the named RangeIndex pandas keeps in a Parquet file's metadata only (`df.set_index(
    "番号").to_parquet()` of 1, 2, 3 ...: evenly spaced values are not stored as a column), as `df.reset_index()`
    would make it a column; None when there is none, or it does not number the file's rows."""
    meta = _pandas_meta(pf.schema_arrow)
    ranges = [c for c in meta.get("index_columns", []) if isinstance(c, dict) and c.get("kind") == "range"]
    if len(ranges) != 1 or len(meta.get("index_columns", [])) != 1:
        return None
    name, start, stop, step = (ranges[0].get(k) for k in ("name", "start", "stop", "step"))
    if not isinstance(name, str) or name in columns or not all(type(v) is int for v in (start, stop, step)):
        return None
    if step == 0 or len(range(start, stop, step)) != pf.metadata.num_rows:
        return None
    return name, start, step


def _refuse_names_twice(path: Path, names: list[str], line: int, holder: str) -> None:
    """A file whose columns share a name (or leave more than one unnamed) is refused: read as rows, each row
    would keep one of their cells and drop the others without a word."""
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        what = "leaves more than one column unnamed" if twice[0] == "" else "names this column more than once"
        problem = Problem(str(path), line, twice[0] or None, f"{holder} {what} (a row would keep only one of "
                          "their cells): name each column")  # fmt: skip
        raise InputError([problem], header="cannot read the prompt file")


def _refuse_other_separator(path: Path, header: list[str]) -> None:
    """A CSV whose header reads as one column holding ';' or tabs between names (Excel in a European or
    Japanese locale saves with ';', a TSV renamed .csv) is refused, saying so: it said of every row "prompt:
    missing ... the row has 'id;prompt'", and left the user to work out why. One quoted name holding ';'
    ("q;a") is one column: the header is read again split at `sep`, where quotes keep it whole."""
    for sep, said in ((";", "semicolons (;)"), ("\t", "tabs")):
        if len(header) == 1 and sep in header[0] and len(_first_record(path, sep)) > 1:
            why = (f"the header {header[0]!r} reads as one column: its names are separated by {said}, and a CSV "
                   "file's by commas; save it from Excel as \"CSV UTF-8 (Comma delimited)\", or read it with "
                   f"pandas.read_csv(..., sep={sep!r}) and pass the DataFrame to runner.run")  # fmt: skip
            raise InputError([Problem(str(path), 1, None, why)], header="cannot read the prompt file")


def _first_record(path: Path, sep: str) -> list[str]:
    """The CSV file's first record (its header) as the `csv` module reads it with `sep` between cells (a file
    not UTF-8: UnicodeDecodeError)."""
    import csv

    with _opened(lambda: open(path, encoding="utf-8-sig", newline=""), path) as f:
        return next((cells for cells in csv.reader(f, delimiter=sep) if cells), [])  # (as `_csv_header`)


def _csv_batches(path: Path, leave_out_empty: bool = True) -> Any:
    """The CSV file's record batches, every column as the text the file holds: a CSV cell is text, and a type
    guessed from the first block would change values (an id or a key 007 read as 7, 0x1F as 31, a 20-digit key
    rounded to a float) or refuse the file at a later cell that does not fit it ("A12" after a megabyte of
    numbers). The setting columns read each cell as JSON would give it (RowChecker). A quoted cell may hold
    line breaks. A first column with no name is the index `df.to_csv()` writes, not data (as
    `__index_level_0__` in Parquet). `leave_out_empty` (reading 8): a column with no name and no value in any
    row is left out first (`_unnamed_kept`). A file that is not UTF-8, or whose header names a column twice,
    is refused here."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        header = _first_record(path, ",")
    except UnicodeDecodeError as e:
        raise _not_utf8_error(path) from e
    keep = _unnamed_kept(path, header) if leave_out_empty else list(range(len(header)))
    names = [header[i] for i in keep]
    # the unnamed first column df.to_csv() writes
    if names[:1] == [""] and keep[0] == 0 and "" not in names[1:]:
        keep, names = keep[1:], names[1:]
    _refuse_names_twice(path, names, 1, "the header")
    _refuse_other_separator(path, header)
    types = {c: pa.string() for c in header}
    # the columns left out, by name where the name is not one kept too ([] reads every column)
    dropped = len(keep) < len(header)
    data = names if dropped and "" not in names else []
    options = pcsv.ConvertOptions(column_types=types, include_columns=data, strings_can_be_null=False)
    reader = _opened(lambda: pcsv.open_csv(storage.arrow_file(path), convert_options=options,
                                           parse_options=pcsv.ParseOptions(newlines_in_values=True)), path)  # fmt: skip
    if any(pa.types.is_binary(f.type) for f in reader.schema):
        raise _not_utf8_error(path)
    if data or not dropped:
        return reader
    return (batch.select(keep) for batch in reader)


def _unnamed_kept(path: Path, header: list[str]) -> list[int]:
    """The header's columns to read, by position: those with a name, and those without one that hold a value in
    some row. A column with neither carries nothing: Excel and Google Sheets save the empty columns right of
    a sheet's data so (`id,prompt,,`), each row ending in commas, and such a file was refused ("the header
    leaves more than one column unnamed"), or kept an empty column named "" in every row of the results. Two
    or more unnamed columns holding values are refused, named as a spreadsheet names them."""
    unnamed = [i for i, name in enumerate(header) if name == ""]
    filled = _filled_columns(path, unnamed) if unnamed else []
    if len(filled) > 1:
        shown = " and ".join(f"{i + 1} ({_sheet_column(i)})" for i in filled[:3])
        why = (f"the header leaves columns {shown} unnamed, and they hold values (a row would keep only one of "
               "their cells): name each column in the header's line")  # fmt: skip
        raise InputError([Problem(str(path), 1, None, why)], header="cannot read the prompt file")
    return [i for i, name in enumerate(header) if name != "" or i in filled]


def _sheet_column(i: int) -> str:
    """A spreadsheet's name of column `i` (from 0): A ... Z, AA ..."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(ord("A") + r) + name
    return name


def _filled_columns(path: Path, columns: list[int]) -> list[int]:
    """Which of the CSV file's `columns` (positions) hold a cell that is not empty in some record below the
    header, read as `_csv_lines` reads them (the file's reading names a file that cannot be read)."""
    import csv

    filled: set[int] = set()
    with _opened(lambda: open(path, encoding="utf-8-sig", newline=""), path) as f:
        records = _csv_records(f)
        try:
            _csv_header(records)
            for cells, _ in records:
                filled.update(i for i in columns if i < len(cells) and cells[i])
                if len(filled) == len(columns):
                    break
        except UnicodeDecodeError as e:  # (a column left out unread would not be said not UTF-8)
            raise _not_utf8_error(path) from e
        except (csv.Error, ValueError, _UnclosedQuote):
            pass
    return sorted(filled)


# --- Hugging Face datasets as input ------------------------------------------------------------------------


# The temporary folder an input that is not a file is written to, and the name of standard input's copy there
TEMPORARY, STDIN_COPY = "runner-input-", "stdin.txt"


@contextlib.contextmanager
def input_file(source: Any, field: str = "prompt", kind: str = "generate") -> Iterator[Path]:
    """The prompt file `source` stands for, as a path, for the time of a submit. A path is itself; `-` is
    standard input, one prompt (or text) per line, copied to a temporary .txt file. A Hugging
    Face `datasets.Dataset`, a dataset folder written by `save_to_disk`, or `hf:NAME[:CONFIG][@SPLIT]` (a
    dataset on the Hub, through `datasets.load_dataset`) is written to a temporary Parquet file, batch by
    batch (`Dataset.to_parquet`), and read from there like any Parquet file; the job keeps its own validated
    copy, so the temporary file goes when the submit ends. A list of strings is refused, showing the rows a
    `kind` job reads them as, its text in `field`."""
    if isinstance(source, str) and source == "-":  # standard input: one prompt (or text) per line
        with tempfile.TemporaryDirectory(prefix=TEMPORARY) as tmp:
            path = Path(tmp) / STDIN_COPY
            with open(path, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
            try:
                yield path
            except InputError as e:  # named as the user gave it, not as the temporary file
                raise e.naming(str(path), "standard input") from None
        return
    dataset, as_text = _as_dataset(source, field, kind)
    if dataset is None:
        yield Path(source)
        return
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per write garbles a Colab cell; runner prints its own progress
    try:
        with tempfile.TemporaryDirectory(prefix=TEMPORARY) as tmp:
            path = Path(tmp) / f"{_dataset_label(source)}.parquet"
            dataset.to_parquet(str(path))
            if as_text:
                _note_settings_as_json(path, as_text)
            try:
                yield path
            except InputError as e:  # named as the user gave it, not as the temporary file
                raise e.naming(str(path), *_source_name(source)) from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _from_pandas(df: Any) -> Any:
    """A DataFrame as a datasets.Dataset, a named index as a column (as `df.to_parquet()` keeps it). A column
    whose Python objects share no Arrow type is an error naming it, not pyarrow's traceback."""
    import datasets
    import pandas as pd
    import pyarrow as pa

    if isinstance(df.index, pd.RangeIndex) and df.index.name is not None and df.index.name not in df.columns:
        # pandas keeps a set_index("番号") of 1, 2, 3 ... (evenly spaced) as a RangeIndex, which Arrow stores in
        # its metadata only: the column was lost where one of 1, 2, 5 was kept
        df = df.reset_index()
    named = any(
        n is not None for n in df.index.names
    )  # an unnamed index (a filter's, a shuffle's) is not data
    # (two columns of one name: pyarrow's "Duplicate column names found" was read as a column named so)
    _refuse_names_twice(Path("the DataFrame"), [str(c) for c in df.columns], 0, "the DataFrame")
    columns = {k: df[k].tolist() for k in ARROW_MISREADS if k in df.columns}
    changed, as_text = _settings_for_arrow(columns, "the DataFrame")
    if changed:
        df = df.assign(**changed)
    try:
        return datasets.Dataset.from_pandas(df, preserve_index=None if named else False), as_text
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        said = [str(a) for a in e.args]
        column = next((a.split("column ", 1)[1].split(" with type")[0] for a in said if "column " in a), None)
        what = f"its column {column!r} mixes types" if column else "a column mixes types"
        fix = "" if column in ROW_SETTINGS else f", say df[{column or 'COLUMN'!r}].astype(str)"
        raise InputError([Problem("the DataFrame", 0, column, f"{what} ({said[0]}); give it one type{fix}")],
                         header="cannot read the input") from None  # fmt: skip


# What an error calls a list of rows given from Python ("no valid rows in the list", "the list has no rows").
_LIST = "the list"


def _from_list(rows: list[dict[str, Any]]) -> Any:
    """Row dicts as a datasets.Dataset, every key of every row a column (from_list takes the first row's keys
    only); a key whose values share no Arrow type is an error naming it."""
    import datasets
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [r if len(r) == len(keys) else {k: r.get(k) for k in keys} for r in rows]
    changed, as_text = _settings_for_arrow(
        {k: [r[k] for r in rows] for k in ARROW_MISREADS if k in keys}, _LIST
    )
    if changed:
        rows = [{**r, **{k: values[i] for k, values in changed.items()}} for i, r in enumerate(rows)]
    try:
        return datasets.Dataset.from_list(rows), as_text
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as e:
        said = first_line(e)
        column = next((k for k in keys if _mixed(rows, k)), None)
        what = (
            f"its key {column!r} has values of different types"
            if column
            else "a key has values of different types"
        )
        raise InputError([Problem(_LIST, 0, column, f"{what} ({said}); give it one type in every row")],
                         header="cannot read the input") from None  # fmt: skip


# Row settings whose value is an object (a JSON schema). A list of rows or a DataFrame holds them as JSON text on
# their way through Arrow, which would give every row's object each key any row's has (null where it has none)
# in one key order, and refuse two schemas whose values differ in type; the reader parses them back.
OBJECT_SETTINGS = ("json_schema", "guided_json", "response_format")
JSON_SETTINGS = b"runner.json_settings"  # the temporary Parquet file's note of the columns held as JSON text
ARROW_MISREADS = ("stop", *OBJECT_SETTINGS)  # the setting columns `_settings_for_arrow` prepares


def _settings_for_arrow(columns: dict[str, list[Any]], source: str) -> tuple[dict[str, list[Any]], list[str]]:
    """Of a list of rows' or a DataFrame's setting `columns` (ARROW_MISREADS), those Arrow would misread, as it
    should read them: a `stop` string beside stop lists as its list (both are a row's stop), object settings
    as JSON text (the reader parses them back); and which columns are JSON text."""
    changed: dict[str, list[Any]] = {}
    stops = columns.get("stop", [])
    if any(isinstance(v, str) for v in stops) and any(isinstance(v, list) for v in stops):
        changed["stop"] = [[v] if isinstance(v, str) else v for v in stops]
    as_text = [k for k in OBJECT_SETTINGS if any(isinstance(v, dict) for v in columns.get(k, []))]
    for k in as_text:
        changed[k] = [_json_text(v, k, source) for v in columns[k]]
    return changed, as_text


def _json_text(value: Any, key: str, source: str) -> Any:
    """An object setting's value as JSON text (None for a missing one); numpy numbers and arrays (a DataFrame's)
    as the numbers and lists they hold. What JSON cannot hold is an error naming the key."""
    if value is None or (isinstance(value, float) and value != value):  # (pandas' missing value)
        return None
    if not isinstance(value, (dict, list)):
        return value

    def plain(o: Any) -> Any:
        if hasattr(o, "tolist"):  # numpy scalars and arrays
            return o.tolist()
        raise TypeError(f"{type(o).__name__} is not JSON")

    try:
        return json.dumps(value, ensure_ascii=False, default=plain)
    except (TypeError, ValueError) as e:
        raise InputError([Problem(source, 0, key, f"holds a value JSON cannot hold ({e})")],
                         header="cannot read the input") from None  # fmt: skip


def _note_settings_as_json(path: Path, keys: list[str]) -> None:
    """Rewrite the temporary Parquet file `path` with the note that its columns `keys` hold JSON text."""
    import pyarrow.parquet as pq

    table = pq.read_table(storage.arrow_file(path))
    meta = {**(table.schema.metadata or {}), JSON_SETTINGS: json.dumps(keys).encode()}
    pq.write_table(table.replace_schema_metadata(meta), storage.arrow_file(path, "wb"))


def _opened(open_: Callable[[], T], path: Path) -> T:
    """`open_()` of a prompt file, transient errors retried: a Drive mount's passing EIO read as "not a readable
    Parquet file" (a submit refused; a repair said the input file no longer read as it did, and the job could
    not be repaired). Any other error is raised as it was, for the reader to name."""
    try:
        return storage.retry(open_, f"read {path}")
    except storage.StorageError as e:
        if e.unreadable_for_now or not isinstance(e.__cause__, OSError):
            raise
        raise e.__cause__ from None


def _settings_as_json(path: Path) -> set[str]:
    """The columns a temporary Parquet file of runner's holds as JSON text (`_note_settings_as_json`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        note = (pq.read_schema(storage.arrow_file(path)).metadata or {}).get(JSON_SETTINGS)
        keys = json.loads(note) if note else []
    except (OSError, ValueError, pa.ArrowException):  # (an unreadable file is named by the reader)
        return set()
    return {k for k in keys if k in OBJECT_SETTINGS} if isinstance(keys, list) else set()


def _mixed(rows: list[dict[str, Any]], key: str) -> bool:
    """Whether the rows' non-null values of `key` are of more than one Python type (int and float are one)."""
    kinds = {float if type(r[key]) is int else type(r[key]) for r in rows if r.get(key) is not None}
    return len(kinds) > 1


def _source_name(source: Any) -> tuple[str, str]:
    """What an error calls an input that is not a file (the list, the DataFrame, the dataset), and one of its
    rows (`Problem.row`): by its position, as the caller would index it (rows[1], df.iloc[1], dataset[1]);
    "the rows:2" read as a file of that name's line 2. Its problems as a whole read "the list has no rows" and
    "no valid rows in the list" ("the rows: the file has no rows", "no valid rows in the rows")."""
    if isinstance(source, list):
        return _LIST, "rows[{}]"
    if type(source).__module__.split(".")[0] == "pandas":
        return "the DataFrame", "df.iloc[{}]"
    return "the dataset", "dataset[{}]"


def _as_dataset(source: Any, field: str = "prompt", kind: str = "generate") -> Any:
    """`source` as a datasets.Dataset (None when it is a plain file path), and the object setting columns it
    holds as JSON text (OBJECT_SETTINGS). A list of strings is refused, naming the rows a `kind` job takes."""
    if type(source).__module__.split(".")[0] == "datasets":
        return _one_split(source, None, repr(source)[:60]), []
    if type(source).__module__.split(".")[0] == "pandas" and hasattr(source, "columns"):  # a DataFrame
        return _from_pandas(source)
    if isinstance(source, list) and all(isinstance(r, dict) for r in source):  # rows as dicts (none: no rows)
        return _from_list(source)
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if text is None:
        raise ParamError(
            "input",
            f"input must be a file path, a pandas DataFrame, a list of row dicts or a datasets.Dataset, not "
            f"{type(source).__name__}{_rows_hint(source, kind, field)}",
        )
    if text.startswith("hf:"):
        return _hub_dataset(text), []
    folder = Path(text)
    if _looked_at(folder, stat.S_ISDIR) and any(
        _looked_at(folder / f, stat.S_ISREG) for f in ("state.json", "dataset_dict.json")
    ):
        import datasets

        return _one_split(datasets.load_from_disk(str(folder)), None, text), []
    return None, []


def _looked_at(path: Path, test: Callable[[int], bool] | None = None) -> bool:
    """`storage.is_there(path, test)` of a prompt file, a transient error retried: a prompt file on a Drive mount
    that dropped one request was refused, where a read in the job home is retried (adversarial pass 140)."""
    return storage.retry(lambda: storage.is_there(path, test), f"look at {path}")


def _hub_dataset(spec: str) -> Any:
    """hf:NAME[:CONFIG][@SPLIT] -> datasets.load_dataset(NAME, CONFIG, split=SPLIT)."""
    import datasets

    name, _, split = spec[3:].partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise ParamError(
            "input", f"{spec}: expected hf:NAME[:CONFIG][@SPLIT], such as hf:openai/gsm8k:main@test"
        )
    try:
        loaded = datasets.load_dataset(name, config or None, split=split or None)
    except Exception as e:  # the Hub, the network or the dataset's own loading code
        raise InputError([Problem(spec, 0, None, f"cannot load the dataset: {str(e).splitlines()[0]}")],
                         header="cannot read the prompt dataset") from e  # fmt: skip
    return _one_split(loaded, split, spec)


def _rows_hint(source: Any, kind: str, field: str) -> str:
    """How to give a list of strings or a pandas Series as the rows a `kind` job reads (its `field`), or ""."""
    what = "prompts" if kind == "generate" else "texts"
    if type(source).__module__.split(".")[0] == "pandas" and hasattr(source, "to_frame"):
        return f" (for a Series of {what}: series.to_frame({field!r}))"
    if not (isinstance(source, list) and source and all(isinstance(r, str) for r in source)):
        return ""
    # (a score or embed job reads `text`: the hint said 'prompt', refused again as "text: missing")
    if kind == "generate":
        return f" (for a list of prompts: [{{{field!r}: p}} for p in prompts]; runner.generate prints a few at once)"
    return f" (for a list of texts: [{{{field!r}: t}} for t in texts])"


def _one_split(loaded: Any, split: str | None, name: str) -> Any:
    """A Dataset as is; a DatasetDict with one split, that split; with several, an error listing them."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if not isinstance(loaded, datasets.DatasetDict):
        raise ParamError("input", f"{name}: a {type(loaded).__name__} cannot be read; give a datasets.Dataset "
                                  "(a streaming dataset: take what you need into a Dataset first)")  # fmt: skip
    splits = list(loaded.keys())
    if len(splits) == 1:
        return loaded[splits[0]]
    raise ParamError("input", f"{name} has the splits {', '.join(splits)}: name one (hf:NAME@SPLIT, or "
                              "pass dataset[SPLIT] from Python)")  # fmt: skip


def _dataset_label(source: Any) -> str:
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "dataset"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[-80:] or "dataset"


# Packed files a user may give for a prompt file (a .jsonl.gz as datasets reads it, an Excel workbook): what
# each is and what to do, where "unknown file type '.gz'" said neither
PACKED = {".gz": "a gzip-compressed file", ".bz2": "a bzip2-compressed file", ".xz": "an xz-compressed file",
          ".zst": "a zstd-compressed file", ".zip": "a zip archive", ".xlsx": "an Excel workbook",
          ".xls": "an Excel workbook"}  # fmt: skip
_UNPACK = {".gz": "gunzip -k", ".bz2": "bunzip2 -k", ".xz": "unxz -k", ".zst": "unzstd", ".zip": "unzip"}


def _unpack_hint(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.suffix.lower() in (".xlsx", ".xls"):
        return f"{SAVE_AS_CSV} and give the .csv"
    inner = p.with_suffix("")
    if p.suffix.lower() == ".zip" or inner.suffix.lower() not in SUFFIXES:
        return f"unpack it ({_UNPACK[p.suffix.lower()]} {p.name}) and give the prompt file inside"
    # (gunzip -k refuses to write over a file: "gunzip -k p.jsonl.gz writes p.jsonl" where p.jsonl stood)
    if os.path.lexists(inner):
        unpack = _UNPACK[p.suffix.lower()].replace(" -k", " -kf") if " -k" in _UNPACK[p.suffix.lower()] else (
            f"{_UNPACK[p.suffix.lower()]} -f")  # fmt: skip
        return f"{inner.name} is beside it already: give {inner.name}, or unpack this one over it ({unpack} {p.name})"
    return f"unpack it first ({_UNPACK[p.suffix.lower()]} {p.name} writes {inner.name}) and give {inner.name}"


def _free_csv_name(path: Path) -> Path:
    """The .csv a file converted to CSV goes to: beside it, never over a .csv already there."""
    for tail in ("", "-from-tsv", "-from-tsv-2"):
        csv = path.with_name(f"{path.stem}{tail}.csv")
        if not os.path.lexists(csv):
            return csv
    return path.with_name(f"{path.stem}-from-tsv-3.csv")


def input_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES and not os.path.lexists(path):  # (`runner score "a text"`, gpt2-score's habit)
        raise ParamError("input", f"{os.fspath(path)}: no such file; a text itself goes in on standard input: "
                                  f"{TEXT_ON_STDIN}")  # fmt: skip
    # a folder that is no save_to_disk dataset (those were read before): it said "unknown file type '(none)'"
    if suffix not in SUFFIXES and _looked_at(Path(path), stat.S_ISDIR):
        raise ParamError("input", f"{os.fspath(path)} is a folder: name a prompt file in it (.jsonl, .parquet, .csv, "
                                  ".txt), or a dataset folder written by save_to_disk (this one has no state.json "
                                  "or dataset_dict.json)")  # fmt: skip
    if suffix in PACKED:
        raise ParamError(
            "input", f"{path}: {PACKED[suffix]}, which runner does not read: {_unpack_hint(path)}"
        )
    if suffix in (".tsv", ".tab"):  # (Japanese corpora's habit, and pandas' to_csv(sep="\t"))
        csv = repr(os.fspath(_free_csv_name(Path(path))))
        raise ParamError("input", f"{path}: a tab-separated file, which runner does not read: save it as a CSV, with "
                                  f"pandas: pd.read_csv({os.fspath(path)!r}, sep='\\t', dtype=str, "
                                  f"keep_default_na=False).to_csv({csv}, index=False)")  # fmt: skip
    if suffix not in SUFFIXES:
        raise ParamError(
            "input",
            f"{path}: unknown file type {suffix or '(none)'!r}; use .jsonl, .parquet, .csv, .txt or - (or a Hugging Face "
            "dataset: a save_to_disk folder, hf:NAME[:CONFIG][@SPLIT], or a datasets.Dataset from Python).",
        )
    return SUFFIXES[suffix]


class SeenIds:
    """The ids met so far, and the line of each, for duplicate detection in one pass over a file of any size.

    This is the one part of reading that grows with the file: 24 bytes per valid row, where a dict of the id
    strings would take ~150. An id is kept as a 128-bit digest (two uint64 columns; two different ids share
    one with probability ~rows^2 / 2^129, nil for any real file) and the line it was on. The digests sit in a
    few sorted runs merged like a binary counter, so a chunk is checked with vectorized binary searches and
    merging costs O(rows log rows) in all."""

    def __init__(self) -> None:
        self._runs: list[tuple[Any, Any, Any]] = []  # (h1 sorted ascending, h2, line), aligned

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self._runs)

    def add(self, ids: list[str], lines: list[int]) -> list[int | None]:
        """For each id, the line it was first met on (in an earlier chunk, or earlier in `ids`), or None if
        it is new; new ids are remembered."""
        import numpy as np

        n = len(ids)
        if n == 0:
            return []
        # Python's str hash is SipHash, keyed per process: two keyed 64-bit halves (of the id, and of NUL + the
        # id) make a 128-bit digest at a fraction of the cost of hashlib; the index lives in one process.
        h1 = np.fromiter(map(hash, ids), dtype=np.int64, count=n).view(np.uint64)
        h2 = np.fromiter(map(hash, map("\0".__add__, ids)), dtype=np.int64, count=n).view(np.uint64)
        line = np.asarray(lines, dtype=np.int64)
        order = np.lexsort((np.arange(n), h2, h1))  # by digest, then position: each id's first use leads
        s1, s2 = h1[order], h2[order]
        first = np.full(n, -1, dtype=np.int64)  # in sorted order
        for r1, r2, rl in self._runs:
            at = np.searchsorted(r1, s1)  # sorted needles: each search starts where the last one ended
            hit = np.flatnonzero(r1[np.minimum(at, len(r1) - 1)] == s1)
            for i in hit:  # only repeated ids (or a 64-bit half colliding) get here
                j = at[i]
                while j < len(r1) and r1[j] == s1[i]:
                    if r2[j] == s2[i]:
                        first[i] = rl[j]
                        break
                    j += 1
        lead = np.ones(n, dtype=bool)
        lead[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1])
        leader = np.maximum.accumulate(np.where(lead, np.arange(n), 0))
        again = ~lead & (first < 0)
        first[again] = line[order[leader[again]]]
        new = lead & (first < 0)
        if new.any():
            self._runs.append((s1[new], s2[new], line[order[new]]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            a, b = list(self._runs.pop(-2)), list(self._runs.pop())
            # Two sorted runs: a stable argsort (timsort) merges them in linear time. Column by column, each
            # old column let go once merged, so that merging needs ~24 bytes a row more, not ~56.
            merge = np.argsort(np.concatenate((a[0], b[0])), kind="stable")
            merged = [np.concatenate((a.pop(0), b.pop(0)))[merge] for _ in range(3)]
            self._runs.append((merged[0], merged[1], merged[2]))
        out = np.empty(n, dtype=np.int64)
        out[order] = first
        return [None if f < 0 else f for f in out.tolist()]


@dataclass
class PromptChunk:
    """Consecutive rows of a prompt file: the valid ones, and the problems of the others, by line."""

    rows: list[PromptRow]
    problems: list[Problem]
    columns: list[str]  # passthrough column names of these rows, in first-seen order


class RowChecker:
    """The checks of one input row, with the settings they depend on: what `PromptReader` applies to each row
    of a file, and what runner.ray applies to each row of a Ray Data batch, so both refuse the same rows with
    the same words. `name` is what a `Problem` says the row came from.

    `messages_field=None` refuses chat rows (scoring and embedding take plain text). `pair_fields` (context,
    continuation) lets a row give a context and a continuation to score instead of a text. `row_settings`:
    rows may carry their own generation settings (params.ROW_SETTINGS fields). `batch`: (job kind, model
    names) to read OpenAI Batch request lines against. `chat`: plain prompts go through the chat template as
    one user message."""

    reading = READING  # how its file is read (`PromptReader`: a job of before, as job.json says)

    def __init__(
        self,
        name: str,
        prompt_field: str = "prompt",
        template: str | None = None,
        id_field: str = "id",
        messages_field: str | None = "messages",
        pair_fields: tuple[str, str] | None = None,
        row_settings: bool = False,
        batch: tuple[str, tuple[str, ...]] | None = None,
        chat: bool = False,
    ):
        self.name = name
        self.row_settings, self.batch = row_settings, batch
        self._requests: bool | None = None  # an OpenAI Batch file (decided by its first row)
        self.chat = chat
        self.saw_messages = False
        # a row gave its own id (else every id is the row's number: submit's note on an `ID` column)
        self.saw_ids = False
        self.json_lines = False  # the rows are a JSON Lines file's (`PromptReader`)
        # the file's setting columns are text (CSV): each cell is read as JSON would give it
        self.settings_as_text = False
        # ... or Arrow's (Parquet, and rows, DataFrames, datasets through it): an object holds every key any row's
        # object of the column has, null where it has not (one row's JSON schema gets its neighbours' keys)
        self.settings_from_arrow = False
        # ... but these, JSON text on the way (a list of rows, a DataFrame)
        self.settings_as_json: set[str] = set()
        self.template = Template(template) if template is not None else None
        self.prompt_field, self.id_field = prompt_field, id_field
        self.messages_field, self.pair_fields = messages_field, pair_fields

    def check(self, lineno: int, obj: dict[str, Any]) -> PromptRow | Problem:
        """One row, already parsed: a valid `PromptRow`, or the `Problem` that makes it invalid. Duplicate ids
        are not looked for here (`PromptReader.chunks` does)."""
        request = names = None
        if self.batch is not None and self._requests is None:
            self._requests = openai_batch.is_request(obj)  # the first row says what the file is
            self._refuse_options_a_batch_file_sets(lineno)
        if self._requests:
            cid = obj.get("custom_id")  # where a refused line has one, it names it in the Batch error file
            obj, fld, why = openai_batch.request_row(
                obj,
                *self.batch,
                base64=self.reading >= 3,
                since_6=self.reading >= 6,
                since_9=self.reading >= 9,
                since_10=self.reading >= 10,
            )
            if obj is None:
                return Problem(self.name, lineno, fld, why, cid if isinstance(cid, str) and cid else None)
            request = obj.pop("_request")
            names = request.pop("names", None)
        if self.settings_as_text and self.pair_fields:
            obj = _without_empty_pair(obj, self.pair_fields)
        if self.settings_as_text and self.messages_field and self.template is None:
            obj = _without_empty_other(obj, self.prompt_field, self.messages_field)
        row, problem = _validate_row(
            self.name, lineno, obj, self.prompt_field, self.template, self.id_field,
            self.messages_field, self.pair_fields,
        )  # fmt: skip
        self.saw_ids = self.saw_ids or obj.get(self.id_field) is not None
        if row is not None:
            row.request, row.body_names = request, names
            if self.chat and row.messages is None and row.prompt is not None:
                row.messages, row.prompt = [{"role": "user", "content": row.prompt}], None
            self.saw_messages = self.saw_messages or row.messages is not None
            row, problem = self._settings(row)
        if problem is not None and self.reading >= 7 and problem.field == self.id_field:
            problem = _float_id_said(problem, obj.get(self.id_field))
        if problem is not None and self.reading >= 8 and not self._requests:
            problem = _what_reads_it(problem, obj, self)
        if problem is not None and names:
            fld, message = openai_batch.body_named(names, problem.field, problem.message)
            problem = dataclasses.replace(problem, field=fld, message=message)
        return row if row is not None else problem  # type: ignore[return-value]

    @property
    def batch_file(self) -> bool:
        """Whether the rows are OpenAI Batch requests, each saying itself what the model reads."""
        return bool(self._requests)

    def _refuse_options_a_batch_file_sets(self, lineno: int) -> None:
        """A Batch request says itself what the model reads: its messages (/v1/chat/completions) or its raw
        prompt (/v1/completions, which `--chat` turned into a chat without a word), and where (`--template`
        and `--prompt-field` gave errors about fields the line does not have; adversarial pass 121)."""
        given = [option(o, v) for o, v, on in (("chat", True, self.chat), ("template", None, self.template is not None),
                                               ("prompt_field", None, self.prompt_field not in ("prompt", "text"))) if on]  # fmt: skip
        if self._requests and given:
            raise RunnerError(f"{self.name} is an OpenAI Batch file (line {lineno}): {' and '.join(given)} does not "
                              "apply to it, as each request says what the model reads (messages for "
                              "/v1/chat/completions, its prompt as it is for /v1/completions)")  # fmt: skip

    def _settings(self, row: PromptRow) -> tuple[PromptRow | None, Problem | None]:
        """Move the row's setting fields out of its passthrough columns (generate jobs only). A column the
        template uses is the template's data ("{city} is {temperature} degrees"), never a setting."""
        if not self.row_settings:
            return row, None
        data = set(self.template.fields) if self.template else set()
        # (min_p is a setting since reading 6: a job read before kept its column as data)
        keys = [
            k
            for k in row.extra
            if k in ROW_SETTINGS and k not in data and (k != "min_p" or self.reading >= 6)
        ]
        raw = {k: row.extra.pop(k) for k in keys}
        if self.settings_as_text:  # a CSV's cells
            raw = {k: setting_from_text(k, v, self.reading >= 7) for k, v in raw.items()}
        elif self.settings_from_arrow:  # Arrow gives an object every key of its column's: drop the nulls
            raw = {k: _from_arrow(v, k in self.settings_as_json) for k, v in raw.items()}
        row.raw_settings = raw or None
        try:
            row.settings = row_overrides(raw, self.reading >= 6) or None
        except ParamError as e:
            return None, Problem(self.name, row.line, e.param, str(e), row.id)
        return row, None


def _without_empty_pair(obj: dict[str, Any], pair_fields: tuple[str, str]) -> dict[str, Any]:
    """A CSV row without its context and continuation cells when both are empty: a CSV writes "none" so (pandas'
    `to_csv` of texts beside pairs), and the row is a text row, as with nulls in JSONL or Parquet (each text row
    was refused, "continuation: must be a non-empty string"). A context beside an empty continuation stays: that
    pair is refused."""
    if any(obj.get(f) != "" for f in pair_fields):
        return obj
    return {k: v for k, v in obj.items() if k not in pair_fields}


def _without_empty_other(obj: dict[str, Any], prompt_field: str, messages_field: str) -> dict[str, Any]:
    """A CSV row without its empty prompt cell beside a messages cell (or its empty messages cell beside a
    prompt): a CSV writes "none" so (a spreadsheet of plain prompts and chats, pandas' `to_csv` of both), as
    JSONL and Parquet write null; every row of such a file was refused, "give either 'prompt' or 'messages',
    not both"."""
    prompt, messages = obj.get(prompt_field), obj.get(messages_field)
    if None in (prompt, messages) or (prompt == "") == (messages == ""):
        return obj
    empty = prompt_field if prompt == "" else messages_field
    return {k: v for k, v in obj.items() if k != empty}


def _from_arrow(value: Any, as_json: bool) -> Any:
    """A setting read from Arrow: JSON text parsed back (`as_json`), else its objects without null keys."""
    if as_json and isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):  # (nested too deeply: pass 67)
            return value  # (the field's check names it)
    return _without_null_keys(value)


def _without_null_keys(value: Any) -> Any:
    """`value` without the null-valued keys of its objects, at every depth (a setting read from Arrow)."""
    if isinstance(value, dict):
        return {k: _without_null_keys(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_null_keys(v) for v in value]
    return value


def _file_state(path: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, None when it cannot be read (its reader says why)."""
    try:
        st = storage.retry(lambda: os.stat(path), f"look at {path}")
    except storage.StorageError:
        return None
    return st.st_size, st.st_mtime_ns


class PromptReader(RowChecker):
    """Reads and validates a prompt file as a stream of chunks, so that memory is bounded by a chunk and not
    by the file (JSONL line by line, Parquet by batches, CSV by blocks). Only the ids seen so far are kept
    for duplicate detection (`SeenIds`, 24 bytes per row). Each row is checked by `RowChecker.check`.

    Settings are checked when the reader is made (file type, a file that is not there, the template), so a
    caller can refuse early, before loading any model."""

    def __init__(self, path: str | os.PathLike, **checks: Any):
        """`checks`: RowChecker's settings (prompt_field, template, ...), by name."""
        self.path = Path(path)
        self.format = input_format(self.path)
        if not _looked_at(self.path, stat.S_ISREG):
            raise InputError(
                [
                    Problem(
                        str(self.path),
                        0,
                        None,
                        "not a file" if _looked_at(self.path) else "no such file",
                    )
                ],
                header="cannot read the prompt file",
            )
        super().__init__(str(self.path), **checks)
        self.state = _file_state(self.path)  # before the submit hashes it (the job's identity)
        self.settings_as_text = self.format == "csv"
        self.json_lines = self.format == "jsonl"
        self.reading = READING  # (`runner repair` reads a job of before as it was: job.json says)
        self.settings_from_arrow = self.format == "parquet"
        self.settings_as_json = _settings_as_json(self.path) if self.format == "parquet" else set()

    def _source(self) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        if self.format == "jsonl":
            return iter_jsonl(self.path, self.reading)
        if self.format == "text":
            return iter_text(self.path, self.prompt_field, self.reading >= 2)
        return _iter_arrow(self.path, self.format, self.reading)

    def column_types(self) -> dict[str, Any]:
        """The Arrow type of each column of a Parquet file (its passthrough columns keep them: `Passthrough`);
        {} for JSONL, CSV and text, and for a file whose schema cannot be read (reading its rows says why)."""
        if self.format != "parquet" or self.reading < 2:
            return {}
        import pyarrow.parquet as pq

        try:
            schema = _opened(lambda: pq.read_schema(storage.arrow_file(self.path)), self.path)
        except Exception:  # noqa: BLE001 (the rows' read names the problem, as for any unreadable file)
            return {}
        return {field.name: _without_views(field.type) for field in schema}

    def first_row(self) -> dict[str, Any] | None:
        """The file's first readable row as read, before any check (None if it has none): what it holds."""
        return next((obj for _, obj, _ in self._source() if obj is not None), None)

    def rows(self) -> Iterator[PromptRow | Problem]:
        """Each row of the file in order: a valid `PromptRow`, or the `Problem` that makes it invalid.
        Duplicate ids are not looked for here (`chunks` does)."""
        for lineno, obj, reason in self._source():
            yield (
                Problem(self.name, lineno, None, reason or "unreadable")
                if obj is None
                else self.check(lineno, obj)
            )
        self._refuse_a_change()

    def _refuse_a_change(self) -> None:
        """A file rewritten while it was read (an editor saving, `df.to_json(path)` in another cell) gave a job
        the rows of one file under the identity (sha256) of the other: a later submit of the first file was
        answered with it (adversarial pass 121). Its size and modification time must be as when the reader
        was made, which was before the file was hashed."""
        if _file_state(self.path) != self.state:
            raise RunnerError(f"the prompt file {self.path} changed while it was being read: run the command "
                              "again once it is written")  # fmt: skip

    def chunks(self, size: int, chars: int | None = None) -> Iterator[PromptChunk]:
        """The file in chunks of `size` rows (valid or not), in order, with duplicate ids reported on the
        later row ("first on line N") across the whole file. With `chars`, a chunk also ends once its rows'
        texts reach that many characters: tokenizing a chunk takes ~50 bytes a character, so 10,000 documents
        of 20,000 characters took 10 GB where 10,000 short prompts take 0.3."""
        seen = SeenIds()
        items: list[PromptRow | Problem] = []
        held = 0  # characters of text in `items`
        for item in self.rows():
            items.append(item)
            held += _text_chars(item) if chars is not None else 0
            if len(items) >= size or (chars is not None and held >= chars):
                yield self._chunk(items, seen)
                items, held = [], 0
        if items:
            yield self._chunk(items, seen)

    def _chunk(self, items: list[PromptRow | Problem], seen: SeenIds) -> PromptChunk:
        valid = [r for r in items if isinstance(r, PromptRow)]
        problems = [p for p in items if isinstance(p, Problem)]
        firsts = seen.add([r.id for r in valid], [r.line for r in valid])
        rows: list[PromptRow] = []
        columns: dict[str, None] = {}
        for row, first in zip(valid, firsts, strict=True):
            if first is not None:
                # (a Batch line's id is its custom_id)
                field = "custom_id" if self._requests else self.id_field
                problems.append(Problem(
                    self.name, row.line, field, f"duplicate id {row.id!r} (first on line {first})", row.id
                ))  # fmt: skip
                continue
            for key in row.extra:
                columns.setdefault(key, None)
            rows.append(row)
        problems.sort(key=lambda p: p.line)
        return PromptChunk(rows, problems, list(columns))


def _text_chars(item: PromptRow | Problem) -> int:
    """Characters of text a row gives the tokenizer: its prompt (or context) and continuation, or its messages."""
    if isinstance(item, Problem):
        return 0
    messages = sum(len(v) for m in item.messages or () for v in m.values() if isinstance(v, str))
    return len(item.prompt or "") + len(item.continuation or "") + messages


def read_prompts(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    template: str | None = None,
    id_field: str = "id",
    messages_field: str | None = "messages",
    skip_invalid: bool = False,
    max_problems_shown: int = 20,
    pair_fields: tuple[str, str] | None = None,
) -> PromptSet:
    """Read and validate a whole prompt file into memory (jobs read big files in chunks with `PromptReader`
    instead). Raises `InputError` listing every problem unless `skip_invalid`, in which case the problems
    come back in `PromptSet.problems` for the errors file."""
    reader = PromptReader(path, prompt_field=prompt_field, template=template, id_field=id_field,
                          messages_field=messages_field, pair_fields=pair_fields)  # fmt: skip
    rows: list[PromptRow] = []
    problems: list[Problem] = []
    columns: dict[str, None] = {}
    for chunk in reader.chunks(4096):
        rows.extend(chunk.rows)
        problems.extend(chunk.problems)
        columns.update(dict.fromkeys(chunk.columns))
    name = reader.name
    if not rows and not problems:
        raise InputError([Problem(name, 0, None, "the file has no rows")], header="nothing to run")
    if problems and (not skip_invalid or not rows):
        header = None if rows else f"no valid rows in {name}"  # (then --skip-invalid cannot help)
        raise InputError(problems, max_problems_shown, header=header)
    return PromptSet(name, rows, problems, list(columns))


class _Bad(Exception):
    """A row's problem while it is checked: the field and the message (row-local, never escapes this module)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def _validate_row(
    name: str,
    lineno: int,
    obj: dict[str, Any],
    prompt_field: str,
    tmpl: Template | None,
    id_field: str,
    messages_field: str | None,
    pair_fields: tuple[str, str] | None = None,
) -> tuple[PromptRow | None, Problem | None]:
    """One row checked: (the row, None), or (None, the problem naming its field)."""
    rid: str | None = None
    consumed = {id_field}
    try:
        rid = _row_id(obj, id_field, lineno)
        if pair_fields and obj.get(pair_fields[1]) is not None:
            context, continuation = _pair(obj, pair_fields)
            consumed.update(pair_fields)
            return _finish_row(name, lineno, obj, rid, context, None, consumed, continuation)
        prompt, messages = _prompt_or_messages(obj, prompt_field, tmpl, messages_field, pair_fields, consumed)
    except _Bad as e:
        return None, Problem(name, lineno, e.field, str(e), rid)
    return _finish_row(name, lineno, obj, rid, prompt, messages, consumed)


def _row_id(obj: dict[str, Any], id_field: str, lineno: int) -> str:
    """A non-empty string, or an integer (kept as its decimal string); absent -> the line number."""
    raw_id = obj.get(id_field)
    if raw_id is None:
        return str(lineno)
    if isinstance(raw_id, str):
        if not raw_id.strip():
            raise _Bad(id_field, "must be a non-empty string")
        return raw_id
    if isinstance(raw_id, int) and not isinstance(raw_id, bool):
        return str(raw_id)
    raise _Bad(id_field, f"must be a string or an integer, got {_kind(raw_id)}")


def _float_id_said(problem: Problem, raw_id: Any) -> Problem:
    """A float id's refusal with its value and what made it (since reading 7; it said only "got number"): pandas
    turns an integer column with a missing cell into floats (1.0, 2.0, NaN), and the fix is one line."""
    if not isinstance(raw_id, float):
        return problem
    if math.isnan(raw_id):
        why = "got NaN, a missing id as pandas writes one in a column of numbers: give each row an id"
    elif raw_id.is_integer():
        why = (f"got {raw_id!r}, a whole number stored as a float (pandas makes an integer column with a missing "
               "cell floats): df['id'] = df['id'].astype('Int64') keeps it whole")  # fmt: skip
    else:
        why = f"got {raw_id!r}"
    return dataclasses.replace(problem, message=f"must be a string or an integer, {why}")


def _what_reads_it(problem: Problem, obj: dict[str, Any], checker: RowChecker) -> Problem:
    """A row's refusal saying what reads the row (since reading 8), where it is a shape another tool writes: a
    line of whole columns (pandas' `to_json()`), or a row without the prompt field that holds it under another
    name or in another shape (`_field_hint`); it said only "--prompt-field or --template names the one to use",
    and --prompt-field could not reach into an object."""
    if checker.json_lines and _holds_columns(obj.get(checker.prompt_field), obj):
        why = ("this line holds whole columns, as pandas' to_json() writes by default: write one row per line, "
               "df.to_json(PATH, orient='records', lines=True, force_ascii=False)")  # fmt: skip
        return dataclasses.replace(problem, message=f"{problem.message}; {why}")
    if problem.field != checker.prompt_field or not problem.message.startswith("missing ("):
        return problem
    hint = _field_hint(obj, checker, problem.file)
    if hint is None:
        return problem
    return dataclasses.replace(problem, message=problem.message.rsplit("; ", 1)[0] + f"; {hint})")


def _holds_columns(value: Any, obj: dict[str, Any]) -> bool:
    """Whether a row whose prompt is `value` is whole columns: each field an object of one set of row numbers
    ("0", "1" ...), as pandas' `to_json()` writes, or a list of one length (`json.dump(dict_of_lists)`)."""
    if isinstance(value, dict):
        keys = set(value)
        return (
            bool(keys)
            and all(k.isdigit() for k in keys)
            and all(isinstance(v, dict) and set(v) == keys for v in obj.values())
        )
    if isinstance(value, list):  # (a list prompt alone is a prompt given as a list, not a column)
        return len(obj) > 1 and all(isinstance(v, list) and len(v) == len(value) for v in obj.values())
    return False


# The flags and commands `_field_hint` gives: Alpaca's columns into one prompt, ShareGPT's turns into messages
ALPACA_TEMPLATE = "{instruction}\n\n{input}"
SHAREGPT_JQ = ('.messages = [.conversations[] | {role: {"human": "user", "gpt": "assistant", "system": "system"}'
               '[.from], content: .value}] | del(.conversations)')  # fmt: skip


def _field_hint(obj: dict[str, Any], checker: RowChecker, file: str) -> str | None:
    """What reads a row without its prompt field (`checker.prompt_field`), or None: the field spelt otherwise
    (`Prompt`, ` prompt` as `id, prompt` makes it), Alpaca's instruction and input, ShareGPT's conversations,
    the field inside an object (`{"data": {"prompt": ...}}`), or the row's one text field (`text`)."""
    field, chat = checker.prompt_field, checker.messages_field is not None
    # (the row's text fields: its id and its settings, `stop`, read as they are)
    read = {checker.id_field, *(ROW_SETTINGS if checker.row_settings else ())}
    texts = [k for k, v in obj.items() if isinstance(v, str) and v.strip() and k not in read]
    near = [k for k in texts if k.strip().casefold() == field.casefold()]
    if near:
        said = f"{_reading_field(field, near[0])} reads it"
        # (spaces after the commas, `id, prompt`: not a name typed with a space after it, `prompt `, `入力　`,
        # whose cells have none and whose header skipinitialspace keeps)
        if near[0].startswith(" ") and near[0] == near[0].rstrip() and checker.settings_as_text:
            said += (f" (its cells keep their spaces too; pandas.read_csv({file!r}, skipinitialspace=True, "
                     f"dtype=str, keep_default_na=False).to_csv({_beside(file, 'trimmed', '.csv')!r}, index=False) "
                     "writes the file without the spaces after its commas)")  # fmt: skip
        return said
    if chat and isinstance(obj.get("instruction"), str) and isinstance(obj.get("input", ""), str):
        template = ALPACA_TEMPLATE if "input" in obj else "{instruction}"
        typed = shlex.quote(template.replace("\n", "\\n")) if on_the_command_line() else template
        return f"{option('template', typed)} makes Alpaca's instruction and input one prompt"
    said = _chat_hint(obj, checker.messages_field, file) if chat else None
    if said is not None:
        return said
    inside = [k for k, v in obj.items() if isinstance(v, dict) and isinstance(v.get(field), str)]
    if inside:
        lift = f"{_jq_step(field)} = {_jq_step(inside[0])}{_jq_step(field)}"
        return (f"{_field_option(field)} cannot reach into {inside[0]!r}, which holds it: lift it out, jq -c "
                f"'{lift}' {_into_beside(file, 'flat')}")  # fmt: skip
    if len(texts) == 1:
        return f"{_reading_field(field, texts[0])} reads it"
    return None


def _chat_hint(obj: dict[str, Any], messages_field: str, file: str) -> str | None:
    """The jq that makes a row's chat its `messages_field`, where it is under another name: ShareGPT's
    `conversations` of {from, value} turns, or a list of {role, content} messages named otherwise
    (`conversations`, `dialog`); or None."""
    out = _into_beside(file, "chat")
    turns = obj.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and "from" in t for t in turns):
        return f"runner reads chats as OpenAI {messages_field!r}, not ShareGPT's: jq -c '{SHAREGPT_JQ}' {out}"
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            step = _jq_step(key)
            return (
                f"runner reads a chat from {messages_field!r}: jq -c '.messages = {step} | del({step})' {out}"
            )
    return None


def _into_beside(file: str, tag: str, suffix: str = ".jsonl") -> str:
    """`FILE > FILE-TAG.jsonl`, quoted for a shell: where a command's converted output goes (`_beside`)."""
    return f"{shlex.quote(file)} > {shlex.quote(_beside(file, tag, suffix))}"


def _jq_step(key: str) -> str:
    """A jq path's step to `key`: `.key`, or `.["a key"]` where it is not a plain name."""
    return f".{key}" if key.isidentifier() else f".[{json.dumps(key)}]"


def _beside(file: str, tag: str, suffix: str = ".jsonl") -> str:
    """The name of a file to write `file` converted into, beside it (never `file` itself: a command's `> FILE`
    empties its input before it is read)."""
    path = Path(file)
    return str(path.with_name(f"{path.stem}-{tag}{suffix}"))


def _reading_field(field: str, key: str) -> str:
    """The option reading the prompt (or text) from column `key`, as the reader gives it."""
    if on_the_command_line():
        return f"{_field_option(field)} {shlex.quote(key)}"
    return f"prompt_field={key!r}"


def _pair(obj: dict[str, Any], pair_fields: tuple[str, str]) -> tuple[str, str]:
    """(context, continuation) of a scoring pair: the context may be empty, the continuation not."""
    ctx_field, cont_field = pair_fields
    context, cont = obj.get(ctx_field), obj[cont_field]
    if not isinstance(context, str):
        raise _Bad(ctx_field, f"must be a string (may be empty) next to {cont_field!r}, got {_kind(context)}")
    if not isinstance(cont, str) or not cont:
        raise _Bad(
            cont_field, f"must be a non-empty string, got {_kind(cont) if cont != '' else 'an empty string'}"
        )
    return context, cont


def _prompt_or_messages(
    obj: dict[str, Any],
    prompt_field: str,
    tmpl: Template | None,
    messages_field: str | None,
    pair_fields: tuple[str, str] | None,
    consumed: set[str],
) -> tuple[str | None, list[dict[str, str]] | None]:
    """(prompt, None) from --template or the prompt field, or (None, messages); the fields used join `consumed`."""
    if tmpl is not None:
        prompt, fld, reason = tmpl.render(obj)
        if prompt is None:
            raise _Bad(fld, reason or f"cannot fill {option('template', None)}")
        return _not_empty(prompt, "template", messages_field), None
    if obj.get(prompt_field) is not None:
        value = obj[prompt_field]
        if not isinstance(value, str):
            raise _Bad(prompt_field, f"must be a string, got {_kind(value)}")
        consumed.add(prompt_field)
        if messages_field and obj.get(messages_field) is not None:
            raise _Bad(messages_field, f"give either {prompt_field!r} or {messages_field!r}, not both")
        return _not_empty(value, prompt_field, messages_field), None
    if messages_field and obj.get(messages_field) is not None:
        messages, reason = _check_messages(obj[messages_field])
        if messages is None:
            raise _Bad(messages_field, reason or "invalid")
        consumed.add(messages_field)
        return None, messages
    wanted = [prompt_field] + ([messages_field] if messages_field else [])
    if pair_fields:
        wanted.append(" + ".join(pair_fields))
    # (a null prompt is there: "missing ... the row has 'id'" was untrue of it)
    what = "must be a string, got null" if prompt_field in obj else "missing"
    raise _Bad(prompt_field, what + " (each row needs " + " or ".join(repr(w) for w in wanted) + ";"
               + _fields_it_has(obj) + f"; {_field_option(prompt_field)} or {option('template', None)} names the one "
               "to use)")  # fmt: skip


def _field_option(prompt_field: str) -> str:
    """The option naming the field to read, as the reader gives it: a score or embed job's `--text-field`."""
    if on_the_command_line():
        return "--text-field" if prompt_field == "text" else "--prompt-field"
    return "prompt_field"


def _fields_it_has(row: dict[str, Any]) -> str:
    """' the row has 'question', 'answer'' (at most 8 named): what a misnamed field could be."""
    names = [repr(k) for k, v in row.items() if v is not None]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f" the row has {shown}" if names else " the row has no fields"


def _not_empty(prompt: str, field: str, messages_field: str | None) -> str:
    """`prompt`, unless blank. Rows that cannot be chats (`messages_field` None) are texts to score or embed,
    and are said so: "text: prompt is empty" misnamed a score file's text."""
    if not prompt.strip():
        noun = "prompt" if messages_field else "text"
        shown = repr(prompt) if len(prompt) <= 20 else f"{len(prompt):,} characters"
        raise _Bad(field, f"{noun} is empty" if not prompt else f"{noun} is only whitespace ({shown})")
    return prompt


def _finish_row(
    name: str,
    lineno: int,
    obj: dict[str, Any],
    rid: str,
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    consumed: set[str],
    continuation: str | None = None,
) -> tuple[PromptRow | None, Problem | None]:
    """Last checks on the fields runner reads, then the row. A passthrough column keeps what it holds, NaN and
    infinities too (Polars, Spark and datasets write them; Parquet keeps them, a JSON export writes null: they
    were refused, and such a file could not run: pass 46)."""
    for key, value in obj.items():
        if key in consumed and isinstance(value, float) and not math.isfinite(value):
            return None, Problem(name, lineno, key, f"must be a finite number, got {value}", rid)
    extra = {k: v for k, v in obj.items() if k not in consumed}
    return PromptRow(lineno, rid, prompt, messages, extra, continuation), None


def _text_parts(parts: list[Any]) -> tuple[str | None, str | None]:
    """A message's content given as OpenAI content parts ([{"type": "text", "text": ...}, ...]): their texts
    joined by line breaks, or why not (a part that is not text: runner runs text models)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = repr(kind) if isinstance(kind, str) else _kind(part)
            return (
                None,
                f'content part {j} is {what}: only text parts ({{"type": "text", "text": ...}}) are taken',
            )
        texts.append(part["text"])
    return "\n".join(texts), None


def _check_messages(value: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):  # a CSV cell (or a text column) of JSON
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:  # (nested too deeply: pass 67)
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            return None, f"a list of {{role, content}} objects as JSON text must be valid JSON ({why})"
    if not isinstance(value, list) or not value:
        what = "an empty string" if value == "" else "an empty array" if value == [] else _kind(value)
        one = " (one message: put it in a list, [{...}])" if isinstance(value, dict) else ""
        return None, f"must be a non-empty list of {{role, content}} objects, got {what}{one}"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return None, f"item {i} must be an object with role and content, got {_kind(m)}"
        role, content = m.get("role"), m.get("content")
        # a key left out (or misspelt: "rol") is named as missing, not as "got None" / "got null"
        if "role" not in m or ("content" not in m and not m.get("tool_calls")):
            has = ", ".join(repr(k) for k in m) or "no fields"
            return (
                None,
                f"item {i}: {'role' if 'role' not in m else 'content'} missing (the message has {has})",
            )
        if role not in ROLES:
            got = repr(role) if isinstance(role, str) else _kind(role)
            return None, f"item {i}: role must be one of {', '.join(ROLES)}, got {got}"
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined as vLLM joins them
            content, why = _text_parts(content)
            if why:
                return None, f"item {i}: {why}"
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            return None, f"item {i}: content must be a string or a list of text parts, got {_kind(content)}"
        # its other fields (name, tool_calls, tool_call_id ...) go to the chat template as given, as vLLM passes
        # them; a null one is absent (the openai SDK's model_dump() writes every field)
        out.append({**{k: v for k, v in m.items() if v is not None}, "role": role, "content": content})
    if not any((m["content"] or "").strip() or m.get("tool_calls") for m in out):
        return None, "all messages are empty"
    return out, None
