"""A quick try: generate for a few prompts at once, printed, no job folder (`runner generate`).

prompts (arguments, stdin lines or a .txt file) -> chat template if asked -> engine.Engine.generate -> text.
For trying settings before submitting a night's job; the same engine and seeds as a job, so the settings
behave the same there. Nothing is written to disk.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import RunnerError, option
from .inputs import SUFFIXES, input_file, not_utf8_text, read_text_lines
from .params import (
    EngineOptions,
    GenerationParams,
    as_params_hint,
    check_options,
    check_truncate,
    settings_apart,
    unescape,
)
from .tokens import REPLACEMENT, text_alone

FILE_SUFFIXES = tuple(SUFFIXES)  # a one-word argument ending so is a file name, never a prompt


def read_prompts_arg(items: Iterable[str]) -> list[str]:
    """Each item is a prompt, `-` (one prompt per line of standard input) or a .txt file (one per line). A word
    that names a file (no whitespace, a prompt-file suffix) is never taken as a prompt: a missing .txt file,
    or a .jsonl / .csv / .parquet file (those are `runner run`'s), is an error, not a prompt of its name."""
    return [text for _, text in read_prompts_with_ids(items)]


def read_prompts_with_ids(items: Iterable[str]) -> list[tuple[str, str]]:
    """`read_prompts_arg`'s prompts with the row id a job would give each. One .txt file, or standard input, is
    read as `runner run` reads it (its lines, blank ones skipped) and its line numbers are the ids; prompts from
    several places (arguments, files) are numbered in order from 1. A sampled try's seeds come from them, so
    `runner generate FILE.txt --seed S` prints what `runner run FILE.txt --seed S` writes. A prompt argument's
    typed `\\n`, `\\t`, `\\r` is a line break, tab, carriage return, as in `--template` (`\\\\n`: a backslash
    and n); a file's lines are read as they are."""
    items = list(items)
    out: list[tuple[int, str]] = []
    for item in items:
        if item == "-":
            with input_file("-") as path:
                out.extend(read_text_lines(path, numbered=True))
        elif _file_name(item):
            out.extend(read_text_lines(_txt_file(item), numbered=True))
        else:
            # typed as `--template` and `--stop` take it: "Q: ...\\nA:" means a line break (a file's lines are data)
            out.append((0, unescape(_utf8(item, "a prompt argument"))))
    if not out and items:  # (only '-' and files give none: each was empty, or held only blank lines)
        where = " and ".join(dict.fromkeys("standard input" if i == "-" else i for i in items))
        raise RunnerError(f"no prompt in {where} (empty, or only blank lines)")
    if not out:
        raise RunnerError("no prompt given (a prompt, '-' for standard input, or a .txt file)")
    one_file = len(items) == 1 and (items[0] == "-" or _file_name(items[0]))
    return [(str(n) if one_file else str(i), text) for i, (n, text) in enumerate(out, 1)]


def _utf8(text: str, where: str) -> str:
    """`text` if it is valid UTF-8 (bytes that were not read as undecodable `surrogateescape` characters),
    else RunnerError saying what it looks like, as for a file that is not UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        raise RunnerError(f"{where}: {not_utf8_text(raw)}") from None


def _file_name(item: str) -> bool:
    """A word with a prompt-file suffix, or any argument naming a file with one that is there ("My Drive/p.txt":
    read as prompts, not generated for as text: pass 48)."""
    if not item.lower().endswith(FILE_SUFFIXES):
        return False
    return not any(c.isspace() for c in item) or Path(item).is_file()


def _txt_file(item: str) -> Path:
    """The .txt file `item` names; RunnerError when it is not one."""
    import shlex

    path = Path(item)
    if not path.is_file():
        raise RunnerError(f"no such file: {item}; to generate for this text itself, give it on standard input "
                          f"(echo {shlex.quote(item)} | runner generate - -m MODEL)")  # fmt: skip
    if not item.lower().endswith(".txt"):
        raise RunnerError(f"{item}: generate reads prompts from .txt files (one per line); "
                          f"run a {path.suffix} file with `runner run {shlex.quote(item)} -m MODEL`")  # fmt: skip
    return path


@settings_apart("generate", (GenerationParams, EngineOptions))
def generate(
    prompts: str | Iterable[str],
    model: str,
    params: GenerationParams | None = None,
    options: EngineOptions | None = None,
    *,
    chat: bool = False,
    chat_template: str | os.PathLike | None = None,
    truncate: str = "none",
    revision: str | None = None,
    engine: Any = None,
    row_ids: list[str] | None = None,
) -> list[list[Any]]:
    """Generate for `prompts` (a list of strings, or one) at once: one list of `num_return_sequences` completions (engine.Completion, with
    `tokens` filled) per prompt. `chat`: send each prompt as one user message through the model's chat
    template, or through `chat_template` (Jinja text, given with `chat`, as a job takes it: without, a job
    would not use it, so a try refuses it), which the engine's tokenizer keeps.
    `truncate` "left": a prompt over the context window keeps its end, as a job's does (else it is refused).
    `revision`: a hub model's branch, tag or commit, as a job's (else its newest); an `engine` given with it must
    hold that snapshot (ValueError).
    Seeds are per (row id, sample) from `params.seed` (0 when none), as a job's are, so a try is repeatable:
    `row_ids` are the prompts' row ids (default: their numbers from 1, a job's ids for the lines of a .txt or JSONL
    file without blank lines or ids of its own)."""
    from . import constraints
    from .batching import (
        chat_template_text,
        check_chat_option,
        encode,
        keep_end,
        render_prompt,
        use_chat_template,
    )
    from .engine import Engine
    from .models import asked_snapshot, check_engine_revision
    from .tasks import RowError, generate_keys, sample_seed

    # one string is one prompt, as vLLM's LLM.generate takes it (it was a prompt per character), and any iterable
    # is read once (a generator was used up by the checks, then had no len())
    _refuse_a_table(prompts)
    # (before the model loads: it failed after, "'GenerationConfig' object has no attribute 'prompt_budget'")
    if params is not None and not isinstance(params, GenerationParams):
        raise TypeError(
            f"params must be GenerationParams, not {type(params).__name__}{as_params_hint(params)}"
        )
    check_options(options)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_prompts(prompts)  # before the model loads
    check_truncate(truncate)
    # a job of these prompts would not use it: the try would differ
    if chat_template is not None and not chat:
        raise RunnerError(f"{option('chat_template', None)} renders prompts sent as user messages: pass "
                          f"{option('chat')} too (a job of plain prompts without it does not use the template, so "
                          "this try would not be the job's)")  # fmt: skip
    params = params or GenerationParams()
    if engine is None:
        engine = Engine(model, options or EngineOptions(), asked_snapshot(model, revision))
    elif revision is not None:
        check_engine_revision(engine, model, revision, asked_snapshot(model, revision))
    if chat_template is not None:
        use_chat_template(engine.tokenizer, chat_template_text(chat_template))
    if chat:
        check_chat_option(engine.tokenizer, model)
    constraints.check_tokenizer(params, engine.tokenizer)  # (as a submit does: naming the option)
    ids = []
    for text in prompts:
        messages = [{"role": "user", "content": text}] if chat else None
        ids.append(encode(engine.tokenizer, render_prompt(text, messages, engine.tokenizer), chat))
    budget = params.prompt_budget(engine.context_window)
    if truncate == "left" and budget is not None:
        ids = [keep_end(engine.tokenizer, p, budget, chat) if len(p) > budget else p for p in ids]
    _check_window(ids, params, engine.context_window)
    n = params.num_return_sequences
    keys = [(i, s) for i in range(len(prompts)) for s in range(n)]
    seed = params.seed if params.seed is not None else 0
    row_ids = row_ids if row_ids is not None else [str(i + 1) for i in range(len(prompts))]
    if len(row_ids) != len(prompts):
        raise RunnerError(f"row_ids: {len(row_ids)} given for {len(prompts)} prompts")
    seeds = [sample_seed(seed, row_ids[i], s) for i, s in keys]
    done = generate_keys(engine, keys, [params] * len(keys), seeds, [ids[i] for i, _ in keys])
    failed = [(i, c) for (i, _), c in zip(keys, done, strict=True) if isinstance(c, RowError)]
    if failed:  # (a constraint whose matcher gave up mid-sample: no answer, not one the model stopped)
        raise RunnerError(f"prompt {failed[0][0] + 1}: {failed[0][1].message}")
    for (i, _), c in zip(keys, done, strict=True):
        _token_texts(engine.texts, c, ids[i])
    return [done[i * n : (i + 1) * n] for i in range(len(prompts))]


def _token_texts(texts: Any, c: Any, prompt: list[int]) -> None:
    """Fill what `runner generate` prints of completion `c` of token ids `prompt`: its tokens' texts in place
    (" Paris", not the id's "Paris") and bytes, and those of its alternatives and prompt tokens when asked."""
    c.tokens, c.token_bytes = texts.pieces(c.token_ids, prompt), texts.bytes(c.token_ids)
    if c.top_logprobs is not None:
        alts = [[a for a, _, _ in step] for step in c.top_logprobs]
        c.top_tokens = [
            list(zip(texts.alternatives([*prompt, *c.token_ids[:j]], ids), texts.bytes(ids), strict=True))
            for j, ids in enumerate(alts)
        ]
    if c.prompt_logprobs is not None:
        c.prompt_token_texts = list(zip(texts.pieces(prompt), texts.bytes(prompt), strict=True))


def shown_token(text: str, raw: bytes | None) -> str:
    """A token as `runner generate` prints it: its text quoted, or, where it is not characters of its own (part
    of a character split over byte tokens, most Japanese under GPT-2's byte-level BPE), its bytes, b'\\xe3\\x81',
    as `runner score --tokens` shows them, not as '' before the token that completes the character and
    '\\ufffd' where nothing does. A token with characters of its own shows them ("\\ufffd" for a last one cut);
    SentencePiece's "▁" in front of a text, which reads as nothing there, shows as '▁', not b' '."""
    if text == "" and raw is not None:  # part of a character, or SentencePiece's "▁" in front of a text
        alone = text_alone(raw)
        return repr(alone if alone is not None else bytes(raw))
    own = (
        raw is None or text.replace(REPLACEMENT, "") != "" or REPLACEMENT.encode() in raw
    )  # "は公\ufffd": its text
    return repr(text if own else bytes(raw))


def logprobs_lines(c: Any, show_logprobs: bool) -> list[str]:
    """What `runner generate` prints below completion `c`'s text: with `show_logprobs`, each token and its
    log-prob on one line; with `--logprobs K`, a line per token with its K most likely alternatives after it;
    with `--prompt-logprobs`, the prompt's tokens and theirs (the first has none)."""
    raws = c.token_bytes or [None] * len(c.token_logprobs)
    shown = [
        f"{shown_token(t, b)}:{lp:.2f}"
        for t, b, lp in zip(c.tokens or [], raws, c.token_logprobs, strict=True)
    ]
    lines = []
    if c.prompt_token_texts is not None:
        prompt = zip(c.prompt_token_texts, c.prompt_logprobs or [], strict=True)
        lines.append(
            "prompt: "
            + " ".join(f"{shown_token(*t)}:{'-' if lp is None else f'{lp:.2f}'}" for t, lp in prompt)
        )
    if c.top_tokens is not None:
        for token, step, texts in zip(shown, c.top_logprobs, c.top_tokens, strict=True):
            alts = " ".join(f"{shown_token(*t)}:{lp:.2f}" for t, (_, lp, _) in zip(texts, step, strict=True))
            lines.append(f"{token} | {alts}")
    elif show_logprobs:
        lines.append(" ".join(shown))
    return ["    " + line for line in lines]


def _refuse_a_table(prompts: Any) -> None:
    """A DataFrame or a dict of rows is refused, naming what to pass: iterated, each gives its column names or
    keys, and `runner.generate(df, ...)` generated for the word "prompt" as if it were the prompt."""
    from collections.abc import Mapping

    pandas = type(prompts).__module__.split(".")[0] == "pandas"
    if isinstance(prompts, Mapping) or (pandas and hasattr(prompts, "columns")):
        if pandas:
            what, fix = "a DataFrame (read as a list, it gives its column names)", "df['prompt'].tolist()"
            job = "runner.run(df, ...)"
        else:
            what, fix = f"a {type(prompts).__name__} (read as a list, it gives its keys)", "a list of prompts"
            job = "runner.run([row, ...], ...)"
        raise RunnerError(
            f"runner.generate takes prompt strings, not {what}: pass {fix}, or run the rows as a job with {job}"
        )


def _check_prompts(prompts: list[str]) -> None:
    """Each prompt a string with text in it, as `runner run` checks a file's rows (an empty one would reach the
    engine as a row of no tokens)."""
    for number, text in enumerate(prompts, 1):
        if not isinstance(text, str):
            raise RunnerError(f"prompt {number} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RunnerError(f"prompt {number} is empty")


def _check_window(ids: list[list[int]], params: GenerationParams, window: int | None) -> None:
    """Submit's context-window rule (GenerationParams.prompt_budget), for every path (our loop and beams); and
    submit's refusal of a prompt that encodes to no tokens."""
    budget = params.prompt_budget(window)
    for number, prompt in enumerate(ids, 1):
        if not prompt:
            raise RunnerError(f"prompt {number} encodes to no tokens")
        if budget is not None and len(prompt) > budget:
            raise RunnerError(
                f"prompt {number} is {len(prompt)} tokens; with max_new_tokens={params.max_new_tokens} it exceeds "
                f"the model's context window of {window} tokens (shorten it, lower {option('max_new_tokens', None)}, "
                f"or pass {option('truncate', 'left')})"
            )
