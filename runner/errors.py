"""User-facing errors. The CLI prints their message (no traceback); everything else is a bug.

Every module raises these instead of bare exceptions so that `runner/cli.py` can turn them into
`Error: ...` lines with exit code 1, and so that tests can match the exact words a user sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from .progress import counted


class RunnerError(Exception):
    """An error the user can fix; its message is shown as is."""


class NotOnThisMachine(RunnerError):
    """Something a job needs is not on this machine (a GPU, its model folder on a Drive not mounted yet): a
    fact about the machine, not the job, which stays queued for a machine that has it. `hint`: what to do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    def said(self) -> str:
        """The message with what to do, for where it is said at once: "... (download it: hf download ...)"."""
        return f"{self} ({self.hint})" if self.hint else str(self)


class ParamError(RunnerError, ValueError):
    """A generation or engine setting is out of range. `param` names the field (``top_p``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    @property
    def option(self) -> str:
        """The command-line spelling of the field, for messages: ``top_p`` -> ``--top-p``."""
        return _SPELLED.get(self.param) or "--" + self.param.replace("_", "-")


# Settings whose option is not their name with dashes.
_SPELLED = {
    "json_object": "--json",
    "choices": "--choice",
    "input": "INPUT",
    "allow_pickle": "--allow-pickle-weights",
    "served_model_names": "--served-model-name",
    "output": "-o",
}

# Whether messages are said on the command line (the `runner` command sets it while a command runs) or to a
# Python caller: a hint names the setting as the reader gives it (`option`).
_CLI = False


@contextlib.contextmanager
def said_on_the_command_line() -> Iterator[None]:
    """Messages made inside name settings as options (`--truncate left`), not Python arguments: the `runner`
    command's whole run, and what is stored for either (errors.jsonl is the same bytes whoever submitted)."""
    global _CLI
    before, _CLI = _CLI, True
    try:
        yield
    finally:
        _CLI = before


def on_the_command_line() -> bool:
    """Whether a message made now is said on the command line (`said_on_the_command_line`)."""
    return _CLI


def option(name: str, value: object = True, owner: str = "") -> str:
    """A setting a message tells its reader to give, as they give it: `--truncate left` on the command line,
    `truncate='left'` to a Python caller. `value` True: a flag (`--skip-invalid`, `skip_invalid=True`); None:
    the setting alone (`--max-new-tokens`, `max_new_tokens`); `...`: a value of the reader's (`--name`,
    `name=...`). `owner`: the settings object it goes in, in Python (`EngineOptions(allow_pickle=True)`)."""
    if _CLI:
        flag = _SPELLED.get(name) or "--" + name.replace("_", "-")
        if value is True or value is None or value is ...:
            return flag
        # (a repeatable option: each value after its own flag)
        return " ".join(f"{flag} {v}" for v in (value if isinstance(value, (tuple, list)) else [value]))
    said = name if value is None else f"{name}={'...' if value is ... else repr(value)}"
    return f"{owner}({said})" if owner else said


@dataclass(frozen=True)
class Problem:
    """One bad input row: where it is and what is wrong with it."""

    file: str
    line: int  # 1-based line of a JSONL file, or 1-based row of a Parquet/CSV file
    field: str | None
    message: str
    id: str | None = None
    # how a row of an input given from Python is named, "{}" its 0-based position ("rows[{}]"): its problems
    # read "rows[1]: prompt: ...", as a file's read "file.jsonl:2: prompt: ..." (else "the list:2: ...")
    row: str | None = None

    def __str__(self) -> str:
        # (line 0: the file as a whole)
        if self.line and self.row:
            where = self.row.format(self.line - 1)
        elif self.row and not self.field and self.message.startswith("the file "):
            # an input given from Python is no file: "the list has no rows", not "the list: the file has no rows"
            return f"{self.file} {self.message.removeprefix('the file ')}"
        else:
            where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class InputError(RunnerError):
    """A prompt file has problems. Shows up to `shown` of them, one per line, then a count of the rest.
    `total` counts them all when `problems` holds only the first few (a big file may have millions).
    A `header` says the file as a whole cannot be used (unreadable, no valid rows): one problem then reads as
    one line, and --skip-invalid, which cannot help, is not suggested."""

    def __init__(
        self,
        problems: list[Problem],
        shown: int = 20,
        header: str | None = None,
        total: int | None = None,
        unmeasured: str | None = None,
        note: str | None = None,
    ):
        """`unmeasured`: where the rows begin that were read and checked but not tokenized (submit stops
        tokenizing at the first problem), so that those too long for the model are not counted among them.
        `note`: a last line on what the problems ask for (kept out of the problems' own messages, which
        errors.jsonl holds as a job's submit wrote them)."""
        self.problems, self.shown, self.header, self.unmeasured = problems, shown, header, unmeasured
        self.note = note
        self.total = len(problems) if total is None else total
        lines = [str(p) for p in problems[:shown]]
        if self.total > len(lines):
            lines.append(f"... and {counted(self.total - len(lines), 'more problems')}")
        if header is None:
            head, tail = (
                f"{counted(self.total, 'invalid rows')}; nothing was run",
                f"\n(use {option('skip_invalid')} to run the valid rows)",
            )
            if unmeasured:
                tail = (f"\n(the rows from {unmeasured} on were checked but not tokenized: those too long for the "
                        f"model are not counted yet; use {option('skip_invalid')} to run the valid rows)")  # fmt: skip
        else:
            head, tail = header, ""
        sep = ": " if header is not None and len(lines) == 1 else ":\n"
        super().__init__(head + sep + "\n".join(lines) + tail + (f"\n{note}" if note else ""))

    def naming(self, old: str, new: str, row: str | None = None) -> InputError:
        """The same error with the file `old` called `new` (standard input, read through a temporary file), and
        its rows named as `row` says (`Problem.row`: an input given from Python, by position)."""
        problems = [dataclasses.replace(p, file=new, row=row) if p.file == old else p for p in self.problems]
        header = None if self.header is None else self.header.replace(old, new)
        unmeasured = self.unmeasured  # ("file:LINE", named as its problems)
        if unmeasured is not None and unmeasured.startswith(f"{old}:"):
            line = unmeasured[len(old) + 1 :]
            unmeasured = row.format(int(line) - 1) if row and line.isdigit() else f"{new}:{line}"
        return InputError(problems, self.shown, header, self.total, unmeasured, self.note)


class ModelLoadError(RunnerError):
    """The model or tokenizer could not be found or loaded."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def command(home: object, *words: str) -> str:
    """A command for a message, to paste as printed: `runner --home HOME WORDS...`, quoted, with --home where a
    home was given other than $RUNNER_HOME's (else the pasted command looks in another home: pass 44)."""
    import os
    import shlex

    given = home is not None and os.environ.get("RUNNER_HOME") != os.fspath(home)  # type: ignore[arg-type]
    return shlex.join(["runner", *(["--home", os.fspath(home)] if given else []), *words])  # type: ignore[arg-type]


# How a text, not a file, is given (the CLI names the command the user ran in place of this: cli.handle_errors)
TEXT_ON_STDIN = "echo 'TEXT' | runner score - -m MODEL (embed, run alike)"
