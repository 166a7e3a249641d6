"""The `runner` command: a thin click layer over the Python API.

Each command parses options, builds the settings objects, calls the library and turns `RunnerError`s into
`Error: ...` (exit 1, no traceback). Nothing here is needed to use runner from Python.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import shlex
import stat
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .errors import (
    TEXT_ON_STDIN,
    NotOnThisMachine,
    ParamError,
    RunnerError,
    command,
    said_on_the_command_line,
)
from .faults import fault_point
from .params import DTYPE_ALIASES, DTYPES, unescape
from .progress import counted

if TYPE_CHECKING:
    from .jobdir import Job


def _fields(cls_name: str) -> tuple[str, ...]:
    """The settings' own field names: the CLI options follow them, never a second list."""
    import dataclasses

    from . import params

    return tuple(f.name for f in dataclasses.fields(getattr(params, cls_name)))


GEN_FIELDS = _fields("GenerationParams")
ENGINE_FIELDS = _fields("EngineOptions")
NEGATABLE = ("continuous_batching", "cuda_graphs")  # engine options given as --x/--no-x: False is asked


# `runner work --workers N` names each worker process's lines ("[runner w2]"): their lines share one log
WORKER_LABEL = "RUNNER_WORKER_LABEL"
# ...and tells each the pid of the command that started it (`_end_with_launcher`)
LAUNCHER_PID = "RUNNER_LAUNCHER_PID"


def _echo(line: str) -> None:
    label = os.environ.get(WORKER_LABEL, "")
    try:
        click.echo(f"[runner{' ' + label if label else ''}] {line}", err=True)
    # its reader went away (`runner run ... 2>&1 | head`; a closed terminal: EIO): the work goes on (log.txt).
    # A file (`runner work --background`'s log, on Drive) that failed one write is no reader gone: the line is
    # dropped, the next ones land (it went silent for the rest of the run, its last word, an error, unsaid)
    except OSError:
        if not _is_file(sys.stderr):
            _to_devnull(sys.stderr)


def _is_file(stream: Any) -> bool:
    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # (closed, or no file descriptor: a notebook's stream)
        return False


def _to_devnull(stream: Any) -> None:
    """Point a stream whose reader went away at /dev/null, so that later writes (and the flush at exit) pass."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


# What a Ctrl-C leaves, said after "interrupted" by the commands that compute (the others keep nothing or change
# nothing: a submit interrupted queued nothing, a watch leaves the job's workers at work)
_KEPT = "; finished batches are kept: run the same command again to carry on"
INTERRUPTED = {"run": _KEPT, "score": _KEPT, "embed": _KEPT, "work": _KEPT, "run_batch": _KEPT,
               "watch": " (only the watching: the job's workers go on)"}  # fmt: skip


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Domain errors become `Error: ...` with exit code 1; settings errors name the option."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ParamError as e:
            said = str(e)
            if TEXT_ON_STDIN in said and fn.__name__ in ("run", "score", "embed", "submit"):
                # (`runner embed "江戸時代の..."` was told to pipe it into `runner score`)
                own = f"echo 'TEXT' | runner {fn.__name__} - -m MODEL"
                said = said.replace(TEXT_ON_STDIN, own + (" (a quick try: runner generate 'TEXT' -m MODEL)"
                                                          if fn.__name__ == "run" else ""))  # fmt: skip
            raise click.ClickException(f"{e.option}: {said}") from e
        except NotOnThisMachine as e:  # (with what to do: the hf download of a pinned snapshot)
            raise click.ClickException(e.said()) from e
        except RunnerError as e:
            raise click.ClickException(str(e)) from e
        # not click's "Aborted!" (exit 1): say what is kept, exit 130 (143, 129)
        except KeyboardInterrupt as e:
            how = e.said if isinstance(e, Terminated) else "interrupted"
            _echo(how + INTERRUPTED.get(fn.__name__, ""))
            raise SystemExit(128 + e.signum if isinstance(e, Terminated) else 130) from None
        except BrokenPipeError:  # `runner status | head`: the reader went away; say nothing more, exit as
            _to_devnull(sys.stdout)  # a process killed by SIGPIPE does
            raise SystemExit(141) from None
        except OSError as e:  # a file-system error no layer above named: still one line, never a traceback
            raise click.ClickException(
                f"cannot read or write {e.filename or 'the job home'}: {e.strerror or e}"
            ) from e

    return wrapper


def _apply(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


class _Path(click.Path):
    """A file (or with `folder`, a folder) to write or read: `click.Path` that refuses an empty path at once
    (`--to ''` was Path('.'), whose rename was retried for a minute as a busy file system, then blamed on it;
    `-o ''` said ". exists and is not a runner job folder"; `--home ''` listed "no jobs in ")."""

    def __init__(self, folder: bool | None = False) -> None:  # (None: either)
        super().__init__(file_okay=not folder, dir_okay=folder is not False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail(f"an empty path names no {'file' if self.file_okay else 'folder'}", param, ctx)
        return super().convert(value, param, ctx)


class _Finite(click.FloatRange):
    """A float option (in the range given, if any) that refuses nan and inf, as the generation settings do: nan
    passes every comparison of click's FloatRange (`--hours nan` was no deadline at all, `--progress-every nan`
    no progress line until the end), and none of these options means anything at infinity."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {number}.", param, ctx)
        return super().convert(number, param, ctx)


model_option = click.option(
    "-m", "--model", required=True,
    help="Hub id (gpt2), local model folder, .gguf file, or the offline demo smollm2-135m-instruct.",
)  # fmt: skip
_REVISION = "A hub model's branch, tag or commit to run on [default: main]."
revision_option = click.option(
    "--revision",
    help=f"{_REVISION} A hub model's job runs to the end on the commit this names at submit, whatever is pushed "
    "since.",
)
# (runner generate makes no job to pin)
try_revision_option = click.option("--revision", help=_REVISION)
_SERVED = "A model name to answer to (besides --model), repeatable: an OpenAI Batch body.model may give it"
served_names_option = click.option(
    "--served-model-name", "served_model_names", multiple=True,
    help=f"{_SERVED}, and --format openai answers with the first.",
)  # fmt: skip
# (run-batch has no --format: each answer names the model its request named)
batch_served_names_option = click.option(
    "--served-model-name", "served_model_names", multiple=True,
    help=f"{_SERVED} (each answer names the model its request named).",
)  # fmt: skip

input_options = _apply([
    click.argument("input_path", metavar="INPUT", type=_Path(folder=None)),
    model_option,
    revision_option,
    click.option("--prompt-field", "--text-field", "prompt_field",
                 help="Column holding the prompt (generate) or the text (score, embed) [default: prompt / text]."),
    click.option("--template", help='Template filled from columns: the prompt (or the text to score / embed), e.g. '
                                    '"Q: {question}\\nA:" (escapes \\n \\t work).'),
    click.option("--skip-invalid", is_flag=True,
                 help="Run the valid rows; list invalid ones with reasons in the job's errors.jsonl."),
    click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
                 help="Prompts over the context window: refuse (none) or keep their end (left)."),
])  # fmt: skip


def _chat_template_option(use: str, answers: str = "chats") -> Callable[..., Any]:
    """`--chat-template`, its help saying what goes through it in this command (`use`)."""
    return click.option("--chat-template", help=f"A Jinja chat template (a file, or the template itself) {use} "
                        "instead of the model's own: a model without one (GPT-2 fine-tuned on your chat format) can "
                        f"answer {answers}.")  # fmt: skip


chat_template_option = _chat_template_option("for 'messages' rows and --chat,")

generate_input_options = _apply([
    served_names_option,
    click.option("--chat", is_flag=True,
                 help="Generate: send each plain prompt as a user message through the model's chat template."),
    chat_template_option,
])  # fmt: skip


def _elsewhere(hint: str) -> Callable[..., Any]:
    """A hidden option users bring from another tool: refused with what runner calls it."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:
            raise click.UsageError(f"{param.opts[0]}: {hint}", ctx)

    return refuse


def _generation_options(job: bool) -> Callable[..., Any]:
    """The generation settings' options: of a job (`run`, `submit`), or of `runner generate`'s try, whose help
    speaks of what it does (prints; no Batch files, no job to pick a seed for)."""
    batch = (
        "; an OpenAI Batch file's requests that set no max_tokens: 256, or half the context window if smaller"
    )
    batch = batch if job else ""
    seed = "a job picks one and keeps it" if job else "0, the same samples each try"
    keep = "keep" if job else "print"
    return _apply([
        click.option("--max-new-tokens", type=int, help=f"Tokens to generate per sample [default: 64{batch}]."),
        click.option("--max-length", hidden=True, expose_value=False, callback=_elsewhere(
            "transformers' max_length counts the prompt too; runner's limit is --max-new-tokens (new tokens only)")),
        click.option("--min-length", hidden=True, expose_value=False, callback=_elsewhere(
            "transformers' min_length counts the prompt too; runner's is --min-new-tokens (new tokens only)")),
        # gpt2-generate.py's spellings (`--min_length 512 --max_length 1024`), which click offered nothing for
        *[click.option(typed, f"gpt2_{typed[2:]}", hidden=True, expose_value=False, callback=_elsewhere(
              f"runner's {word} is {ours}, in new tokens (transformers' {typed[2:]} counts the prompt too)"))
          for typed, word, ours in (("--max_length", "limit", "--max-new-tokens"),
                                    ("--min_length", "minimum", "--min-new-tokens"))],
        # vLLM's and OpenAI's names (pass 48: click's close match sent --n to --json, --stop-sequences to -n)
        *[click.option(name, hidden=True, expose_value=False, callback=_elsewhere(f"runner's name is {ours}"))
          for name, ours in (("--n", "-n (--num-return-sequences)"), ("--max-tokens", "--max-new-tokens"),
                             ("--max-completion-tokens", "--max-new-tokens"), ("--min-tokens", "--min-new-tokens"),
                             ("--stop-sequences", "--stop (repeatable)"), ("--top-logprobs", "--logprobs K"))],
        click.option("--best-of", hidden=True, expose_value=False, callback=_elsewhere(
            "runner has no best_of: -n N returns all N samples, each with its cumulative_logprob to choose by")),
        click.option("--min-new-tokens", type=int, help="Suppress EOS/stop strings until this many tokens."),
        click.option("--do-sample/--greedy", default=None,
                     help="Sample or decode greedily [default: sample iff --temperature/--top-p/--top-k/--min-p/-n "
                          "ask]."),
        click.option("--temperature", type=float, help="Sampling temperature; 0 = greedy [default: 1.0]."),
        click.option("--top-p", type=float, help="Nucleus sampling mass in [0, 1] [default: 1.0]."),
        click.option("--top-k", type=int, callback=lambda ctx, param, v: 0 if v == -1 else v,
                     help="Sample from the k most likely tokens; 0 (or vLLM's -1) = off [default: 0]."),
        click.option("--min-p", type=float,
                     help="Min-p in [0, 1]: drop tokens under min-p x the top token's probability; 0 = off "
                          "[default: 0]."),
        click.option("--repetition-penalty", type=float, help="Penalty > 0 for repeated tokens [default: 1.0]."),
        click.option("--presence-penalty", type=float, help="OpenAI presence penalty in [-2, 2] [default: 0]."),
        click.option("--frequency-penalty", type=float, help="OpenAI frequency penalty in [-2, 2] [default: 0]."),
        click.option("-n", "--num-return-sequences", type=int, help="Samples per prompt [default: 1]."),
        click.option("--seed", type=int, help=f"Random seed; the same seed gives the same results [default: {seed}]."),
        click.option("--stop", multiple=True, help='Stop string, repeatable (e.g. --stop "\\n"). Escapes \\n \\t work.'),
        click.option("--logprobs", type=int, help=f"Also {keep} the K most likely alternatives of each token (0-20)."),
        click.option("--prompt-logprobs", is_flag=True, default=None, help=f"Also {keep} the log-prob of every prompt token."),
        click.option("--json-schema", metavar="FILE|JSON",
                     help="Structured output: each sample is JSON satisfying this JSON schema (a file, or inline)."),
        click.option("--json", "json_object", is_flag=True, default=None,
                     help="Structured output: each sample is a JSON object."),
        click.option("--regex", help="Structured output: each sample's whole text matches this regular expression."),
        click.option("--choice", "choices", multiple=True,
                     help="Structured output: each sample is exactly one of these strings (repeatable)."),
        click.option("--grammar", metavar="FILE",
                     help="Structured output: each sample is a sentence of this grammar (Lark, or llama.cpp GBNF)."),
        click.option("--num-beams", type=int, help="Beam search with this many beams; -n returns the n best [default: 1 = off]."),
        click.option("--length-penalty", type=float, help="Beam search: score = log-prob / length ** this [default: 1.0]."),
        click.option("--early-stopping", is_flag=True, default=None,
                     help="Beam search: stop once num_beams candidates are finished [default: off]."),
        click.option("--no-repeat-ngram-size", type=int, help="Never repeat an n-gram of this size; 0 = off [default: 0]."),
    ])  # fmt: skip


generation_options = _generation_options(job=True)

score_options = _apply([
    click.option("--add-bos/--no-add-bos", default=None,
                 help="Score the first token given BOS (EOS for GPT-2) as context [default: on]."),
    click.option("--add-eos/--no-add-eos", " /--exclude-end", default=None,
                 help="Also score the end of the text (EOS), as gpt2-score does without --exclude-end (which is "
                      "runner's default, and may be given) [default: off]."),
    click.option("--stride", type=int, help="Texts over the context window: window step in tokens [default: half]."),
])  # fmt: skip

embed_options = _apply([
    click.option("--pooling", type=click.Choice(["mean", "last"]),
                 help="Mean of the last hidden states over the text, or the last token's [default: mean]."),
])  # fmt: skip

engine_options = _apply([
    click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto]."),
    click.option("--dtype", type=click.Choice([*DTYPES, *DTYPE_ALIASES]),
                 help="Weights and compute precision (fp32, fp16, bf16 also) [default: auto: fp32 on CPU, bf16/fp16 "
                      "on GPU]."),
    click.option("--batch-size", type=int, help="Most sequences per batch [default: 64 on CPU; on a GPU 1024 with >= 70 GiB, else 256]."),
    click.option("--max-batch-tokens", type=int,
                 help="Most tokens per batch: rows x (longest prompt + max new tokens); for score and embed, rows x longest text [default: from device]."),
    click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run."),
    click.option("--allow-pickle-weights", "allow_pickle", is_flag=True,
                 help="Allow pickle-based weights (pytorch_model.bin); only safetensors/GGUF otherwise."),
    click.option("--device-map", type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
                 help="Spread a model too large for one GPU over the GPUs and CPU memory (accelerate)."),
])  # fmt: skip

generate_engine_options = _apply([
    engine_options,
    click.option("--continuous-batching/--no-continuous-batching", default=None,
                 help="Generate: prompts join the running batch as rows end, instead of each batch running "
                      "until its longest row ends [default: off]."),
    click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                 help="Generate on a GPU: each batch decodes in fixed slots, every decode step replayed as a "
                      "CUDA graph (small models' steps wait on kernel launches) [default: off; ignored on CPU]."),
])  # fmt: skip

output_option = click.option(
    "-o", "--output", type=_Path(folder=True),
    help="Job folder for this run (default: a new job in the job home). Run again to resume.",
)  # fmt: skip

progress_option = click.option(
    "--progress-every", type=_Finite(min=1), metavar="SECONDS",
    help="A progress line every this many seconds [default: every 10 s, further apart as the run grows old, "
         "at most every 5 minutes: ~200 lines for a night in a Colab cell].",
)  # fmt: skip


def _template(text: str | None) -> str | None:
    """`--template` takes the same escapes as `--stop`: "Q: {q}\\nA:" as typed in a shell means a newline."""
    return None if text is None else unescape(text)


def _chat_template(value: str | None) -> str | None:
    """`--chat-template`: the template's text, read from the file it names, or given as it is."""
    from .batching import read_chat_template

    return None if value is None else read_chat_template(value)


KIND_FIELDS = {"generate": GEN_FIELDS, "score": _fields("ScoreParams"), "embed": _fields("EmbedParams")}


def batch_max_tokens(kw: dict[str, Any], kind: str, input_path: str, model: str) -> dict[str, Any]:
    """`kw` with the Batch default for --max-new-tokens when a generate job of an OpenAI Batch file gives
    none (256, or half the context window: `openai_batch.default_max_tokens`), in `run-batch`, `submit` and
    `run` alike: `runner submit requests.jsonl` capped answers at the prompt files' 64 where `run-batch` gave
    256 (adversarial pass 163)."""
    from . import openai_batch

    if (
        kind != "generate"
        or kw.get("max_new_tokens") is not None
        or not openai_batch.is_batch_file(input_path)
    ):
        return kw
    return {
        **kw,
        "max_new_tokens": openai_batch.default_max_tokens(
            model, kw.get("trust_remote_code") or False, kw.get("revision")
        ),
    }


def build_settings(kw: dict[str, Any], kind: str = "generate") -> tuple[Any, Any]:
    """The kind's settings object and the engine options from the given options; options that belong to
    another kind of job are refused rather than silently ignored."""
    from .params import SAMPLING_FIELDS, EmbedParams, EngineOptions, GenerationParams, ScoreParams

    given = {k for fields in KIND_FIELDS.values() for k in fields if kw.get(k) not in (None, ())}
    stray = sorted(given - set(KIND_FIELDS[kind]))
    if stray:
        raise ParamError(stray[0], f"not used by {kind} jobs.")
    values = {k: kw[k] for k in KIND_FIELDS[kind] if kw.get(k) not in (None, ())}
    sampling = [k for k in SAMPLING_FIELDS if k in values]
    if (
        values.get("do_sample") is False and sampling
    ):  # greedy takes the likeliest token: they would do nothing
        raise ParamError(
            sampling[0], "no effect with --greedy, which takes the most likely token; give one of them"
        )
    if "stop" in values:
        values["stop"] = [unescape(s) for s in values["stop"]]
    if "json_schema" in values and not values["json_schema"].lstrip().startswith("{"):
        values["json_schema"] = _read_option_file("json_schema", values["json_schema"])
    if "grammar" in values:
        values["grammar"] = _read_option_file("grammar", values["grammar"])
    # (a plain flag's False is its absence, not asked: --trust-remote-code left out asks nothing of a rerun)
    eng = {
        k: kw[k] for k in ENGINE_FIELDS if kw.get(k) is not None and (kw[k] is not False or k in NEGATABLE)
    }
    cls = {"generate": GenerationParams, "score": ScoreParams, "embed": EmbedParams}[kind]
    return cls(**values), EngineOptions(**eng)


def _read_option_file(name: str, path: str) -> str:
    """The text of the file an option names (`--json-schema schema.json`, `--grammar sql.lark`); a byte-order
    mark (Notepad's UTF-8) is no text, as in an input or chat template file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ParamError(
            name, f"cannot read {name} file {path!r}: {getattr(e, 'strerror', None) or e}."
        ) from e


def _set_home(ctx: click.Context, param: Any, value: str | None) -> str | None:
    if value is not None:
        ctx.ensure_object(dict)["home"] = value
    return value


PROMPT_PREVIEW = 30  # characters of each prompt `runner results` shows
HOME_HELP = "Job home folder [env RUNNER_HOME; default ./jobs]."


def home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--home DIR` after the command as well as before it (`runner status --home DIR`)."""
    return click.option("--home", type=_Path(folder=True), expose_value=False, callback=_set_home,
                        is_eager=True, help=HOME_HELP)(fn)  # fmt: skip


def _hidden(name: str) -> Callable[..., Any]:
    """Leave the option `name` out of this command's --help (one it refuses with its reason, as score does
    --truncate; the shared options list it for the commands that take it)."""

    def hide(fn: Callable[..., Any]) -> Callable[..., Any]:
        for param in getattr(fn, "__click_params__", []):
            if param.name == name and isinstance(param, click.Option):
                param.hidden = True
        return fn

    return hide


class _ResultsFormat(click.Choice):
    """`runner results --format`: a file type asked for there (`--format csv`, as pandas users say it) is told
    where it goes, --to's suffix, beside click's list of the two formats."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.lower().lstrip(".") in ("csv", "jsonl", "json", "parquet"):
            self.fail(f"{value!r} is a file type: --to FILE.{value.lower().lstrip('.')} writes it (--format is "
                      "table, the rows as they are, or openai, OpenAI Batch output lines)", param, ctx)  # fmt: skip
        return super().convert(value, param, ctx)


# Words a switch's value is written as (click's own for a boolean, GenerationConfig's do_sample=False habit): one
# right after a switch (`--do-sample false`) is refused, not read as an argument
SWITCH_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


# Other tools' names for options runner spells otherwise (gpt-2's scripts: --length, --nsamples; transformers'
# run_generation.py: --length, --num_return_sequences, --fp16, --model_name_or_path): runner's, where a command has it
OTHER_TOOLS_NAMES = {
    "--length": "--max-new-tokens",
    "--nsamples": "--num-return-sequences",
    "--num_samples": "--num-return-sequences",
    "--num-samples": "--num-return-sequences",
    "--fp16": "--dtype fp16",
    "--bf16": "--dtype bf16",
    "--model_name_or_path": "--model",
    "--model_name": "--model",
    "--model_path": "--model",
}


class _Command(click.Command):
    """A command that refuses both sides of an on/off flag given together (`--do-sample --greedy`,
    `--add-eos --exclude-end`): click kept the last one typed and said nothing, where runner refuses settings
    that cannot all hold (`--greedy --temperature 0.8`), and a switch given a value (`--do-sample false`: click
    read 'false' as a second prompt and sampled). A mistyped option's "Did you mean" names shown
    options only: the hidden ones are other tools' names, refused when typed (`--max-new-token` was offered
    `--max-tokens`, `--num-return-sequence` `--stop-sequences`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return self._parse_args(ctx, args)
        except click.NoSuchOption as e:
            shown = [o for p in self.get_params(ctx) if isinstance(p, click.Option) and not p.hidden
                     for o in p.opts + p.secondary_opts if o.startswith("--")]  # fmt: skip
            theirs = self._other_tools_name(e.option_name, shown)
            if theirs:
                raise click.UsageError(f"No such option '{e.option_name}': {theirs}", ctx) from None
            dashed = e.option_name.replace("_", "-")
            if dashed in shown:
                e.possibilities = [dashed]
            elif e.possibilities:
                from difflib import get_close_matches

                e.possibilities = get_close_matches(e.option_name, shown) or None
            raise

    def _other_tools_name(self, typed: str, shown: list[str]) -> str | None:
        """What runner calls an option of gpt-2's scripts, transformers' run_generation.py or a tutorial's
        `generate_text(length=50)` that this command has under another name, where click's close match offered
        a wrong one (`--length` -> `--length-penalty`, `--nsamples` -> `--do-sample`) or none (`--fp16`)."""
        if typed == "--prompt" and any(p.name == "prompts" for p in self.params):
            return 'the prompt is the argument: runner generate "TEXT" -m MODEL'
        ours = OTHER_TOOLS_NAMES.get(typed, "")
        name, _, value = ours.partition(" ")
        if name not in shown:
            return None
        short = [o for p in self.params if name in p.opts for o in p.opts if not o.startswith("--")]
        return f"runner's is {short[0]} ({ours})" if short and not value else f"runner's is {ours}"

    def _parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given, takes_value, skip = [], {o for p in self.params if isinstance(p, click.Option) and not p.is_flag
                                        for o in p.opts + p.secondary_opts}, False  # fmt: skip
        for arg in args:
            if arg == "--":
                break
            if not skip:
                given.append(arg)
            skip = not skip and arg in takes_value
        # (`given` holds no option's value: a word right after a switch in it is an argument there)
        switches = {o: p for p in self.params if isinstance(p, click.Option) and p.is_flag and not p.is_eager
                    for o in p.opts + p.secondary_opts}  # fmt: skip
        for opt, word in itertools.pairwise(given):
            if opt in switches and word.lower() in SWITCH_WORDS:
                raise click.UsageError(self._switch_given_a_value(switches[opt], opt, word), ctx)
        for param in self.params:
            if isinstance(param, click.Option) and param.is_flag and param.secondary_opts:
                on = [o for o in given if o in param.opts]
                off = [o for o in given if o in param.secondary_opts]
                if on and off:
                    first, then = sorted((on[0], off[0]), key=given.index)
                    raise click.UsageError(f"{first} and {then} say opposite things: give one of them", ctx)
        typed = list(args)  # (click's parser takes the words off the list)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if "unexpected extra argument" in e.message:
                e.message += _a_path_with_a_space(typed, e.message)
            raise

    def _switch_given_a_value(self, param: click.Option, opt: str, word: str) -> str:
        """What to type instead of `opt word` (`--do-sample false`): a switch takes no value, and click read the
        word as an argument (a second prompt of `runner generate`), the switch on whatever it said."""
        many = [p for p in self.params if isinstance(p, click.Argument) and p.nargs == -1]
        what = many[0].human_readable_name if many else "an extra argument"
        if param.secondary_opts:
            on, off = max(param.opts, key=len), " or ".join(param.secondary_opts)
            sides = f"{on} turns it on, {off} turns it off"
        else:
            sides = f"give {opt} to turn it on, leave it out for off"
        return (f"{opt} is a switch and takes no value, so {word!r} would be read as {what}: {sides} (to mean "
                f"the text {word!r}, give it before {opt} or after --)")  # fmt: skip


def _a_path_with_a_space(args: list[str], message: str) -> str:
    """ ": 'Colab' and 'Notebooks/p.csv' look like one path ..." where click's "Got unexpected extra argument
    (Notebooks/p.csv)" came from a Drive path with a space left unquoted in a cell (`!runner run
    /content/drive/MyDrive/Colab Notebooks/p.csv`): the word before it and it name a path there, or one in a
    folder there whose name has the space (`-o My Drive/out`); "" otherwise."""
    extra = message.rpartition("(")[2].rstrip(")").split(" ")
    for i in range(1, len(args)):
        joined = args[i - 1 : i + len(extra)]
        if args[i : i + len(extra)] != extra or args[i - 1].startswith("-"):
            continue
        path = " ".join(joined)
        folder = os.path.dirname(path)
        if os.path.lexists(path) or (" " in folder and os.path.isdir(folder)):
            words = " and ".join(repr(w) for w in joined)
            return f': {words} look like one path with a space in it: quote it, "{path}"'
    return ""


class _Commands(click.Group):
    """The command group: a command users look for under another name is pointed to (click's own close match
    sent `runner export` to `report`, which writes an HTML report, not the rows: pass 38)."""

    command_class = _Command
    ELSEWHERE = {
        "export": "`runner results JOB --to FILE` writes a job's rows (.csv, .jsonl, .parquet; --format openai for "
        "an OpenAI Batch output file)",
    }

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] in self.ELSEWHERE and self.get_command(ctx, args[0]) is None:
            raise click.UsageError(f"No such command {args[0]!r}: {self.ELSEWHERE[args[0]]}.", ctx)
        return super().resolve_command(ctx, args)


@click.group(
    cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="runner")
@click.option("--home", envvar="RUNNER_HOME", type=_Path(folder=True), help=HOME_HELP)
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Batch text generation for Hugging Face causal LMs: validate a prompt file, generate in left-padded
    batches with log-probs, write Parquet, resume after any interruption."""
    ctx.ensure_object(dict).setdefault("home", home)
    # the library's messages name options here (`--skip-invalid`), Python arguments in a notebook's call
    ctx.with_resource(said_on_the_command_line())
    import warnings

    warnings.showwarning = _show_warning


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """runner's own warnings (partial results, a shard left out...) as one `[runner] warning:` line, not
    Python's `path:line: UserWarning:` form; other libraries' warnings as Python prints them."""
    import warnings

    if filename.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
        _echo(f"warning: {message}")
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line), err=True, nl=False)


def _run_kind(
    ctx: click.Context,
    kind: str,
    input_path: str,
    model: str,
    output: str | None,
    kw: dict[str, Any],
    stdout_is_data: bool = False,
) -> Job:
    """Submit and run a job of `kind`; the job, finished (else its folder is printed and the command exits; on
    stderr where standard output carries data, as `score --print`'s)."""
    from .scheduler import run as run_api

    params, options = build_settings(batch_max_tokens(kw, kind, input_path, model), kind)
    _check_drive(ctx.obj["home"], output)
    with _ctrl_c_stops() as stop:
        job, summary = run_api(
            input_path, model, params, options, output=output, echo=_echo, stop=stop,
            prompt_field=kw["prompt_field"], template=_template(kw["template"]), skip_invalid=kw["skip_invalid"],
            truncate=kw["truncate"], home=ctx.obj["home"], served_model_names=kw.get("served_model_names", ()),
            chat=kw.get("chat", False), chat_template=_chat_template(kw.get("chat_template")),
            progress_every=kw.get("progress_every"), revision=kw["revision"],
        )  # fmt: skip
    invalid = job.meta["input"]["invalid"]
    if invalid:
        _echo(f"{counted(invalid, 'invalid rows')} skipped; see {job.dir / 'errors.jsonl'}")
    if summary.unrunnable:  # said why, and what runs it, as the job stayed queued
        raise SystemExit(1)
    if not summary.finished:
        _echo(_stopped_line(job, summary, job.spec.count_noun, "carry on"))
        if stdout_is_data:
            _echo(f"results in {job.dir}")
        else:
            click.echo(str(job.dir))
        raise SystemExit(130 if stop() else 1)
    speed = (  # (none computed here, the job not done before: other workers did it while this one waited)
        ("" if kind == "embed" else f", {summary.tokens_per_second:,.1f} tok/s")
        if summary.generated
        else ", already done before: nothing computed"
        if summary.done_before
        else ""
    )
    _echo(
        f"done: {summary.done:,}/{summary.total:,} {job.spec.count_noun}, {counted(summary.errors, 'errors')}{speed}"
    )
    return job


@cli.command()
@input_options
@generate_input_options
@generation_options
@generate_engine_options
@output_option
@progress_option
@home_option
@click.pass_context
@handle_errors
def run(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Validate INPUT, generate for every row and write the results (submit + work on one job).

    \b
    Example:
      runner run examples/prompts.jsonl --model smollm2-135m-instruct --max-new-tokens 64 -o out/demo
      python -c "import runner; print(runner.load_results('out/demo').head())"
    """
    click.echo(str(_run_kind(ctx, "generate", input_path, model, output, kw).dir))


@cli.command()
@_hidden("truncate")  # refused by score: a text over the window is scored in windows
@input_options
@score_options
@click.option(
    "--print",
    "print_scores",
    is_flag=True,
    help="Print each text and its log-prob, tab-separated, as gpt2-score does (the job folder then goes to "
    "stderr).",
)
@click.option(
    "--tokens",
    "print_tokens",
    is_flag=True,
    help="Print each token and its log-prob below its text, as gpt2-score --tokens (implies --print).",
)
@engine_options
@output_option
@progress_option
@home_option
@click.pass_context
@handle_errors
def score(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Score texts: the log-probability of each row's `text` under the model (sum, mean, perplexity and
    per token), or of its `continuation` given its `context` (with `is_greedy`), as gpt2-score and lm-eval.

    \b
    Example:
      runner score examples/score.jsonl --model smollm2-135m-instruct -o out/score
      printf 'The capital of France is Paris.\\nThe capital of France is Rome.\\n' | runner score - -m MODEL --print
    """
    from .results import load_results, score_lines

    print_tokens = kw.pop("print_tokens")
    printed = kw.pop("print_scores") or print_tokens
    job = _run_kind(ctx, "score", input_path, model, output, kw, stdout_is_data=printed)
    if not printed:
        click.echo(str(job.dir))
        return
    for line in score_lines(load_results(job.dir), tokens=print_tokens):
        click.echo(line)
    _echo(f"results in {job.dir}")


@cli.command()
@input_options
@embed_options
@click.option("--context", hidden=True, expose_value=False, callback=_elsewhere(
    "gpt2-transform's text is runner embed's input: a file of texts (.txt: one a line), or standard input: "
    "echo \"TEXT\" | runner embed - -m MODEL --print"))  # fmt: skip
@click.option(
    "--print",
    "print_vectors",
    is_flag=True,
    help="Print each text's vector as a JSON list, one line per row in input order, as gpt2-transform does (the "
    "job folder then goes to stderr).",
)
@engine_options
@output_option
@progress_option
@home_option
@click.pass_context
@handle_errors
def embed(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Embed texts: one vector per row's `text` (mean of the last hidden states, or the last token's), as a
    fixed-size float32 column `embedding`, like gpt2-transform.

    \b
    Example:
      runner embed examples/texts.jsonl --model smollm2-135m-instruct -o out/embed
      echo "The capital of France" | runner embed - -m MODEL --print
    """
    from .results import embed_lines, load_results

    printed = kw.pop("print_vectors")
    job = _run_kind(ctx, "embed", input_path, model, output, kw, stdout_is_data=printed)
    if not printed:
        click.echo(str(job.dir))
        return
    for line in embed_lines(load_results(job.dir)):
        click.echo(line)
    _echo(f"results in {job.dir}")


def _check_drive(home: Any, output: Any = None, option: str = "-o", name: str | None = None) -> None:
    """On Colab, a job home (or a job's own folder, `output`, which `option` names) on the VM's own disk dies
    with the VM: say so, and what to give instead (`option` a path on Drive, ending in `name`), before hours of
    work go there; one under /content/drive before Drive is mounted is refused (storage.refuse_unmounted_drive)."""
    from pathlib import Path

    from . import storage
    from .jobdir import default_home

    if not storage.on_colab():
        return
    path = (Path(output) if output else Path(home) if home else default_home()).resolve()
    storage.refuse_unmounted_drive(path)
    if path.is_relative_to(storage.DRIVE):
        return
    if output:  # (--home does not move an -o folder: pass 44)
        there = shlex.quote(f"/content/drive/MyDrive/{name or path.name}")
        how = f"give {option} a path there, e.g. {option} {there}"
        if option == "--job":  # (--job names a job, it makes none: the folder goes there first: pass 48)
            how = f"copy the job there, `cp -r {shlex.quote(str(path))} {there}`, then `runner work --job {there}`"
        _echo(f"WARNING: the job folder {path} is not on Google Drive; it vanishes with this Colab VM. Mount "
              f"Drive and {how}")  # fmt: skip
    else:
        _echo(f"WARNING: the job home {path} is not on Google Drive; it vanishes with this Colab VM. Mount Drive "
              "and use --home /content/drive/MyDrive/runner-jobs (or set RUNNER_HOME).")  # fmt: skip


@cli.command()
@input_options
@generate_input_options
@click.option(
    "--kind",
    type=click.Choice(["generate", "score", "embed"]),
    default="generate",
    show_default=True,
    help="What the job does with each row.",
)
@generation_options
@score_options
@embed_options
@generate_engine_options
@click.option(
    "--name",
    help="A name to refer to the job by (instead of its id): ASCII letters, digits, '-', '_' "
    "and '.', from a letter or digit.",
)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@home_option
@click.pass_context
@handle_errors
def submit(
    ctx: click.Context, input_path: str, model: str, kind: str, name: str | None, priority: int, **kw: Any
) -> None:
    """Validate INPUT and the settings (and that the model's config and tokenizer load) and queue a job.

    Prints the job id. Nothing invalid is ever queued. Start the work with `runner work`.
    """
    from .api import status as runner_status
    from .jobs import create_job

    _check_drive(ctx.obj["home"])
    params, options = build_settings(batch_max_tokens(kw, kind, input_path, model), kind)
    job = create_job(
        input_path, model, params, options,
        prompt_field=kw["prompt_field"], template=_template(kw["template"]), skip_invalid=kw["skip_invalid"],
        truncate=kw["truncate"], home=ctx.obj["home"], name=name, priority=priority,
        served_model_names=kw["served_model_names"], chat=kw["chat"], chat_template=_chat_template(kw["chat_template"]),
        revision=kw["revision"],
    )  # fmt: skip
    from .jobs import submit_warnings

    for line in submit_warnings(job):
        _echo(line)
    invalid, rows = job.meta["input"]["invalid"], job.meta["input"]["rows"]
    if not job.created:  # the same name (or folder), file and settings were submitted before: that job
        now = runner_status(job.dir)
        _echo(f"job {job.id} (the same file and settings) is already there: {now.state}, "
              f"{now.done_text()} {job.spec.count_noun}")  # fmt: skip
    else:
        _echo(
            f"queued {kind} job {job.id}: {counted(rows, 'rows')}"
            + (f" ({job.total:,} results with their samples)" if job.total != rows else "")
            + (f"; {counted(invalid, 'invalid rows')} listed in errors.jsonl" if invalid else "")
        )
    click.echo(job.id)


def _deadline(hours: float | None, until: str | None) -> float | None:
    import datetime as dt
    import time

    if hours is not None and until is not None:
        raise click.UsageError("give --hours or --until, not both")
    if hours is not None:  # (> 0 and finite: its option's type)
        return time.time() + hours * 3600
    if until is not None:
        try:
            hh, mm = (int(x) for x in until.split(":"))
            now = dt.datetime.now()
            end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        except ValueError as e:
            raise click.BadParameter(f"expected HH:MM, got {until!r}", param_hint="--until") from e
        if end <= now:
            end += dt.timedelta(days=1)
        return end.timestamp()
    return None


@cli.command(context_settings={"allow_extra_args": True})
@click.option(
    "--hours",
    type=_Finite(min=0, min_open=True, max=1e6),  # (a larger one overflowed the deadline to inf)
    help="Stop starting new batches so as to finish within this many hours.",
)
@click.option("--until", help="Stop by this local time (HH:MM).")
@click.option("--job", "job_ref", help="Work on this job only (id, name or folder).")
@click.option("--once", is_flag=True, help="Stop after one job.")
@click.option(
    "--shard-rows",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Write a results shard at least every this many rows...",
)
@click.option(
    "--shard-minutes",
    type=_Finite(min=0, min_open=True, max=1e6),
    default=5.0,
    show_default=True,
    help="...and every this many minutes: the most work a kill can lose.",
)
@click.option("--device", help="Run on this device instead of the jobs' own (cpu, cuda, cuda:N).")
@click.option("--gpus", help="One worker process per local GPU: 'all' or a count (each on its own cuda:i).")
@click.option("--workers", "n_workers", type=click.IntRange(min=1), help="Run this many worker processes.")
@click.option("--background", is_flag=True,
              help="Start the work as a detached process (output in HOME/logs/) and return at once; "
                   "follow it with `runner watch JOB` or `runner status`.")  # fmt: skip
@progress_option
@home_option
@click.pass_context
@handle_errors
def work(
    ctx: click.Context, hours: float | None, until: str | None, job_ref: str | None, once: bool, shard_rows: int,
    shard_minutes: float, device: str | None, gpus: str | None, n_workers: int | None, background: bool,
    progress_every: float | None,
) -> None:  # fmt: skip
    """Run queued jobs: interrupted ones first, then by priority and age, until the queue is empty or the
    deadline. Several workers (processes, GPUs, machines sharing the folder) share a job by units.
    Ctrl-C (or the deadline) finishes and writes the current batch, then stops; run it again to carry on.
    Under `torchrun` / `accelerate launch` each process works on its own GPU (LOCAL_RANK)."""
    _refuse_work_arguments(ctx)
    deadline = _deadline(hours, until)
    if until is not None and not background:  # 9:00 given at 9:20 is tomorrow's: said, not assumed silently
        import datetime as dt

        # The zone too: a Colab VM's clock is UTC, not the user's (their 07:00 is not the VM's)
        end = dt.datetime.fromtimestamp(deadline).astimezone()  # type: ignore[arg-type]
        _echo(f"working until {end:%H:%M %Z}" + (" tomorrow" if end.date() > dt.date.today() else " today"))
    _check_drive(ctx.obj["home"], _own_folder(ctx.obj["home"], job_ref), "--job")
    args = ["--shard-rows", str(shard_rows), "--shard-minutes", str(shard_minutes)]
    args += (["--job", job_ref] if job_ref else []) + (["--once"] if once else [])
    args += ["--until", until] if until else (["--hours", str(hours)] if hours else [])
    args += ["--progress-every", str(progress_every)] if progress_every else []
    if background:
        extra = (["--device", device] if device else []) + (["--gpus", gpus] if gpus else [])
        extra += ["--workers", str(n_workers)] if n_workers else []
        _work_in_background(ctx.obj["home"], args + extra, job_ref)
        return
    if gpus is not None or n_workers is not None:
        devices = _worker_devices(gpus, n_workers, device)
        raise SystemExit(_run_processes(ctx.obj["home"], args, devices))
    _work_here(ctx.obj["home"], job_ref, deadline, once, shard_rows, shard_minutes, device, progress_every)


def _refuse_work_arguments(ctx: click.Context) -> None:
    """`runner work prompts.csv` (as `runner run prompts.csv`) and `runner work night1` were told only "Got
    unexpected extra argument": said what a file needs first (a submit) and how one job is given (`--job`)."""
    if not ctx.args:
        return
    from .jobdir import open_job

    given = ctx.args[0]
    try:
        open_job(given, ctx.obj["home"])
    except (RunnerError, OSError):
        pass
    else:
        raise click.UsageError(f"runner work --job {shlex.quote(given)} works on that job alone (runner work "
                               "takes no argument: without --job it works on every queued job)", ctx)  # fmt: skip
    if os.path.isfile(given) or given == "-":
        file = shlex.quote(given)
        raise click.UsageError(f"runner work takes no file: it works on the jobs submitted to the home; `runner "
                               f"submit {file} -m MODEL` submits it (then `runner work`), or `runner run {file} -m "
                               "MODEL` does both", ctx)  # fmt: skip
    raise click.UsageError(f"Got unexpected extra argument ({' '.join(ctx.args)})", ctx)


def _work_in_background(home: str | None, args: list[str], job_ref: str | None) -> None:
    """`runner work --background`: start the worker and say how to follow it, and that one started before on this
    machine still runs (a notebook's cells run again after a disconnect that left the VM alive): the new one is a
    second, with its own copy of the model, which the user may not want on one GPU."""
    from .api import work_in_background
    from .background import running

    before = running(home)
    worker = work_in_background(args, home)
    _echo(f"working in the background (pid {worker.pid}); its output: {worker.log}")
    if before:
        pids = ", ".join(str(w.pid) for w in before)
        _echo(f"note: {counted(len(before), 'background workers')} of this job home "
              f"{'is' if len(before) == 1 else 'are'} already running on this machine (pid {pids}): this one is another, with its own copy of the model (they share the jobs; no "
              f"row is computed twice); kill {worker.pid} if one is enough")  # fmt: skip
    job = job_ref or "JOB"
    _echo(f"follow it with `{command(home, 'watch', job)}` or `{command(home, 'status')}`; "
          f"stop it with `{command(home, 'cancel', job)}` or kill {worker.pid}")  # fmt: skip


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, `docker stop`, a Slurm or Kubernetes preemption) or SIGHUP (its terminal closed, an
    SSH session dropped): stop at once, as a second Ctrl-C does, so the batches finished before are written
    (worker.commit_on_interrupt) in the grace period."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum = signum
        self.said = (
            "hung up (SIGHUP: its terminal closed)" if signum == signal.SIGHUP else "terminated (SIGTERM)"
        )


def _stops() -> list[Any]:
    """The signals that stop the work: Ctrl-C, SIGTERM, and SIGHUP unless it is ignored (`nohup runner work`:
    a closed terminal is no stop)."""
    import signal

    return [signal.SIGINT, signal.SIGTERM] + [signal.SIGHUP] * (
        signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    )


@contextlib.contextmanager
def _ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """Yields `stop()` for the work below: the first Ctrl-C makes it true (the work finishes and writes the
    current batch, then returns); a second one stops at once (KeyboardInterrupt: the batches finished before
    are still written, worker.commit_on_interrupt). SIGTERM stops at once too (Terminated)."""
    import signal

    asked: list[bool] = []
    ending: list[int] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(True)
        _echo("stopping after the current batch (Ctrl-C again to stop at once; finished batches are kept)")

    def on_sigterm(signum: int, frame: Any) -> None:
        if ending:  # a second one (a closed terminal sends SIGHUP to every process of the job): the first one
            return  # is being handled, and raising again would break off writing the finished batches
        ending.append(signum)
        asked.append(True)
        raise Terminated(signum)

    previous = {
        sig: signal.signal(sig, on_sigint if sig == signal.SIGINT else on_sigterm) for sig in _stops()
    }
    try:
        yield lambda: bool(asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _work_here(home, job_ref, deadline, once, shard_rows, shard_minutes, device, every) -> None:  # noqa: ANN001
    import time

    from .scheduler import make_current
    from .scheduler import work as work_loop

    failed: list[Any] = []
    unrunnable: list[Any] = []  # jobs asking for a device this machine lacks (said as met; they stay queued)
    broken: list[str] = []  # ids of broken jobs skipped (said as met, with what brings them back)
    make_current(device)
    with _ctrl_c_stops() as stop:
        _end_with_launcher()
        fault_point("worker_start")  # (a test stops one worker of `--workers N` here: it never claims a unit)
        summaries = work_loop(home, job=job_ref, deadline=deadline, once=once, shard_rows=shard_rows,
                              shard_seconds=shard_minutes * 60, stop=stop, echo=_echo, device=device,
                              on_failed=failed.append, on_unrunnable=unrunnable.append,
                              on_broken=lambda job_id, folder: broken.append(job_id),
                              progress_every=every)  # fmt: skip
    if unrunnable and not summaries and not failed and not broken:
        raise SystemExit(1)  # nothing could run here: `runner work && next` must not go on
    timed_out = deadline is not None and time.time() >= deadline and not stop()
    left, unread = _queue(home, job_ref) if timed_out or stop() else ([], 0)
    said_unrunnable = {j.id for j in unrunnable}  # (said as met: not run here again, so not left to run here)
    left = [c for c in left if c.job.id not in said_unrunnable]
    again = _work_command(home, job_ref) if job_ref else command(home, "work")
    if left or unread:  # (not "nothing to do" when the deadline came before a job began)
        also = f" (and {unread} whose folder could not be read just now)" if unread else ""
        why = "at the deadline (--hours/--until)" if timed_out else "(Ctrl-C)"
        _echo(
            f"stopped {why} with {counted(len(left), 'jobs')} left to run{also}; run `{again}` again to carry on"
        )
    elif not summaries and not failed and not broken:
        _say_lost_rows(home, job_ref)
        _echo("nothing to do: no queued or interrupted jobs" + (f" matching {job_ref!r}" if job_ref else "")
              + f" in {_home_said(home)}")  # fmt: skip
    elif not all(s.finished or s.others or _cancelled(home, s.job_id) for s in _last_of_each(summaries)):
        _echo(f"stopped; run `{again}` again to carry on")
    if stop() and (left or unread or not _all_finished(summaries, home)):
        raise SystemExit(130)  # interrupted: scripts and notebooks can tell (not when it stopped nothing: a
    # Ctrl-C in the last batch of the last job, which completed, lets `runner work && next` go on)
    if failed or broken:  # `runner work && next-step` must not go on as if all went well
        raise RunnerError("; ".join(_not_run(failed, broken)))


def _end_with_launcher() -> None:
    """A worker process of `runner work --workers N` gets SIGTERM when that command ends (Linux): its session is
    its own (`_run_processes`), so a command killed by SIGKILL (`kill -9`, the out-of-memory killer, a notebook
    kernel restarted) left it computing on unseen, holding the device, and the command run again put more
    processes on it (adversarial pass 141). SIGTERM stops it as `kill PID` would: its finished batches are
    written. Called once its handler is in place; a command gone before that is checked for here."""
    import ctypes
    import signal

    launcher = os.environ.get(LAUNCHER_PID, "")
    if not launcher.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # (no prctl to call: the worker runs on, as before)
    if os.getppid() != int(launcher):
        os.kill(os.getpid(), signal.SIGTERM)


def _not_run(failed: list[Any], broken: list[str]) -> Iterator[str]:
    """What `runner work` ends with when jobs failed, or were broken and skipped (a broken job stays so for
    every worker until `runner repair` brings it back: it is no job done, and no "nothing to do")."""
    if failed:
        yield (f"{counted(len(failed), 'jobs')} failed: {', '.join(j.id for j in failed)} (`runner status JOB` "
               f"says why; {_after_failure(failed)})")  # fmt: skip
    if broken:
        yield (f"{counted(len(broken), 'jobs', 'are')} broken and skipped: {', '.join(broken)} (`runner status "
               "JOB` says why and what brings it back)")  # fmt: skip


def _all_finished(summaries: list[Any], home: Any) -> bool:
    """Whether each job this `runner work` ran was finished (or cancelled) at its last run."""
    return bool(summaries) and all(s.finished or _cancelled(home, s.job_id) for s in _last_of_each(summaries))


def _work_command(home: Any, job_ref: str) -> str:
    """The command that runs JOB: `runner work` for a job in the home, `runner work --job FOLDER` for one in a
    folder of its own (background.work_command)."""
    from .background import work_command
    from .jobdir import find_job

    try:
        return work_command(home, find_job(job_ref, home))
    except RunnerError:
        return command(home, "work")


def _own_folder(home: Any, job_ref: str | None) -> Any:
    """JOB's folder where it is one of its own (`-o DIR`, outside the home), else None."""
    from .background import in_home
    from .jobdir import find_job

    try:
        folder = find_job(job_ref, home) if job_ref else None
    except RunnerError:
        return None
    return folder if folder is not None and not in_home(home, folder) else None


def _queue(home: Any, job_ref: str | None) -> tuple[list[Any], int]:
    """The queued jobs to take, and how many folders could not be read for now (they may be queued too)."""
    from .scheduler import queue

    broken: dict[str, Any] = {}
    try:
        left = queue(home, job_ref, broken)
    except RunnerError:
        left = []
    return left, sum(1 for b in broken.values() if b.unreadable)


def _home_said(home: Any) -> str:
    """The job home looked in, and how to look elsewhere: a job submitted with --home (on Drive) is not in the
    default ./jobs of a plain `runner status` (pass 33)."""
    from .jobdir import default_home, missing_home

    given = home is not None or os.environ.get("RUNNER_HOME")
    root = home if home is not None else default_home()
    if given and (missing := missing_home(root)):  # a mistyped --home said only "no jobs in /typo"
        return f"{root} ({missing}: a mistyped --home or $RUNNER_HOME, or a Drive not mounted yet?)"
    return f"{root}" + ("" if given else " (the default job home; --home DIR or $RUNNER_HOME for another)")


def _last_of_each(summaries: list[Any]) -> list[Any]:
    """Each job's last run: one left unfinished and run again later in the same `runner work` (a shard found
    damaged at its end) is done."""
    return list({s.job_id: s for s in summaries}.values())


def _cancelled(home: Any, job_id: str) -> bool:
    """The job was cancelled (its worker said so): running `runner work` again would not carry it on."""
    from . import api

    try:
        return api.status(job_id, home).state == "cancelled"
    except RunnerError:
        return False


def _say_lost_rows(home: Any, job_ref: str | None) -> None:
    """Before "nothing to do": the completed jobs whose results no longer all verify (a shard damaged since),
    which `runner work` leaves alone until `runner repair` re-queues their missing rows."""
    from . import api

    try:
        found = api.status(job_ref, home) if job_ref else api.status(home=home)
    except RunnerError:
        return  # the work loop said what it could not read
    for s in found if isinstance(found, list) else [found]:
        if s.missing:
            _echo(f"job {s.id} {s.message}")


def _after_failure(failed: list[Any]) -> str:
    """What to do next: `runner retry`, unless the jobs failed for what a retry would meet again: a damaged
    prompts file (submitted again) or a model changed under the job (put back first: pass 38)."""
    from .scheduler import MODEL_CHANGED

    def cause(job: Any) -> str | None:
        try:
            error = job.state().error or ""
        except RunnerError:
            return None
        if MODEL_CHANGED in error:
            return "model"
        return "prompts" if "submit the file again" in error else None

    causes = [cause(j) for j in failed]
    if all(c == "prompts" for c in causes):
        return "their prompts files are damaged: submit the files again"
    if all(causes):
        return "a retry alone would fail again: it says what to do"
    return "`runner retry JOB` re-queues it" + (
        " unless its prompts file is damaged or its model changed" if any(causes) else ""
    )


def _worker_devices(gpus: str | None, n_workers: int | None, device: str | None) -> list[str | None]:
    """The device of each worker process: cuda:0..N-1 with --gpus, else the jobs' own (or --device)."""
    if gpus is None:
        return [device] * (n_workers or 1)
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise RunnerError(
            "--gpus: no CUDA GPU is visible to this process (use --workers N for CPU processes)"
        )
    want = count if gpus == "all" else int(gpus) if gpus.isdigit() and int(gpus) > 0 else None
    if want is None or want > count:
        raise click.BadParameter(
            f"expected 'all' or a count in 1..{count}, got {gpus!r}", param_hint="--gpus"
        )
    return [f"cuda:{i}" for i in range(want)]


def _run_processes(home: str | None, args: list[str], devices: list[str | None]) -> int:
    """One `runner work` process per device, all on the same home; waits for all, forwards Ctrl-C. Exit code:
    the first non-zero one of the workers (0 when all are; 1 for one killed by a signal, which is said)."""
    import signal
    import subprocess

    base = [sys.executable, "-m", "runner"] + (["--home", home] if home else []) + ["work", *args]
    env = _threads_each(len(devices))
    # each in a session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground group) reaches this
    # process alone, which passes it on once; a worker that got both took the second as "stop at once" and
    # dropped the batch it was computing (pass 123)
    env[LAUNCHER_PID] = str(os.getpid())
    procs = [subprocess.Popen(base + (["--device", d] if d else []), env={**env, WORKER_LABEL: f"w{i}"},
                              start_new_session=True) for i, d in enumerate(devices, 1)]  # fmt: skip
    _echo(
        f"started {len(procs)} worker processes"
        + (f" on {', '.join(d for d in devices if d)}" if devices[0] else "")
    )
    # Ctrl-C, SIGTERM and SIGHUP go to every worker process, each of which writes its finished batches
    previous = {
        sig: signal.signal(sig, lambda signum, _: [p.send_signal(signum) for p in procs]) for sig in _stops()
    }
    try:
        let_go = _wait_for_workers(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [0 if p in let_go else p.returncode for p in procs]
    for i, (p, code) in enumerate(zip(procs, codes, strict=True), 1):
        if code < 0:  # killed by a signal: SIGKILL is the out-of-memory killer's
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            _echo(f"worker process {i} (pid {p.pid}) was killed by {name}"
                  f"{' (out of memory?)' if -code == signal.SIGKILL else ''}; the units it held are taken over "
                  "by the other workers once its claims go stale, or by the next `runner work`")  # fmt: skip
    return next((c if c > 0 else 1 for c in codes if c), 0)


def _wait_for_workers(procs: list[Any]) -> list[Any]:
    """Wait for every worker process to end; returns those let go. A worker stopped by a signal (SIGSTOP: frozen
    past its lease, its units taken over by the others) while every other one has ended is let go: SIGTERM,
    then SIGCONT, and it stops as on `kill PID`, writing only what it still may. The command waited for it for
    ever once the others had finished the work. Workers all stopped while none has ended (paused on purpose,
    `kill -STOP`) are waited for. Where the system cannot say a child stopped (no WUNTRACED), a plain wait."""
    import signal

    if not hasattr(os, "WUNTRACED"):
        for p in procs:
            p.wait()
        return []
    stopped: set[int] = set()
    let_go: list[Any] = []
    while live := {p.pid: p for p in procs if p.returncode is None}:
        if set(live) <= stopped and len(live) < len(procs) and all(map(_still_stopped, live)):
            for p in (p for p in live.values() if p not in let_go):
                let_go.append(p)
                _echo(f"worker process {procs.index(p) + 1} (pid {p.pid}) is stopped (SIGSTOP) and the others have "
                      "ended: it is let go on to stop (its units were taken over or are left for the next "
                      "`runner work`)")  # fmt: skip
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)
        try:
            pid, status = os.waitpid(-1, os.WUNTRACED | os.WCONTINUED)
        # each one reaped already (by a signal's forwarding: Popen.send_signal polls)
        except ChildProcessError:
            for p in live.values():
                p.wait()  # (its code as the poll read it)
            continue
        if pid not in live:
            continue
        if os.WIFSTOPPED(status):
            stopped.add(pid)
        elif os.WIFCONTINUED(status):
            stopped.discard(pid)
        else:
            live[pid].returncode = os.waitstatus_to_exitcode(status)
            stopped.discard(pid)
    return let_go


def _still_stopped(pid: int) -> bool:
    """Whether a child reported stopped is stopped now, where /proc tells (elsewhere: as reported). A report of
    a stop may be read after the child was continued (a whole group suspended and resumed, the command first:
    its continued reports still to come): such a worker must not be let go."""
    from .jobdir import process_state

    return process_state(pid) in (None, "T", "t")


def _threads_each(processes: int) -> dict[str, str]:
    """The workers' environment: unless the user chose OMP_NUM_THREADS, each process gets its share of this
    machine's cores, as torchrun does (each torch process would start a thread per core: N processes on a
    2-core CPU would run 2N threads on 2 cores, each waiting at barriers for a thread that lost its core)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // processes))
    return env


@cli.command()
@click.argument("job_ref", metavar="[JOB]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@home_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, job_ref: str | None, as_json: bool) -> None:
    """Show all jobs as a table (state, done/total, tok/s, ETA, errors, workers), or one JOB (id, name or
    folder) in detail. A job whose files are damaged shows as `broken`, with the reason."""
    import json

    from . import api
    from .job_status import UNREADABLE, status_table

    if job_ref is None:
        statuses = api.status(home=ctx.obj["home"])
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
        else:
            click.echo(status_table(statuses) if statuses else f"no jobs in {_home_said(ctx.obj['home'])}")
            # what needs the user: a broken job and how to bring it back, a failure's reason, what a queued job
            # waits for, a worker stopped on this machine (what goes on with it), the file of a job that does not
            # read (the table said `unreadable`, naming nothing)
            for st in statuses:
                if st.message and (
                    st.state in ("broken", "failed", UNREADABLE)
                    or st.state.startswith("queued")
                    or st.workers_stopped
                ):
                    click.echo(f"{st.id}: {st.message}")
        return
    s = api.status(job_ref, ctx.obj["home"])
    if as_json:
        click.echo(json.dumps(s.as_dict(), indent=2, ensure_ascii=False))
        return
    shown = s.state in ("broken", UNREADABLE)  # (no report of a job that does not read)
    click.echo("\n".join(_detail(s) + ([] if shown else [_report_line(job_ref, s.folder)])))


def _report_line(job_ref: str, folder: str) -> str:
    """The command that makes this job's report, as typed: the reference given when it finds the same job
    without --home, else the folder."""
    from pathlib import Path

    from .jobdir import find_job

    try:
        same = find_job(job_ref).resolve() == Path(folder).resolve()
    except (RunnerError, OSError):
        same = False
    return f"report:   runner report {shlex.quote(job_ref if same else folder)} -o report.html"


def _non_default(params: Any, stored: dict[str, Any]) -> dict[str, Any]:
    """The settings a job changed from their defaults (the seed is shown on its own)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(params) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(params)
                     if f.default_factory is not dataclasses.MISSING})  # fmt: skip
    changed = {k: v for k, v in stored.items() if not (k in defaults and v == defaults[k])}
    return {k: v for k, v in changed.items() if k != "seed" and v is not None}


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def _short(value: Any, most: int = 60) -> str:
    """A setting as status shows it: a long one (a JSON schema, a grammar) cut to its first `most` characters."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _detail(s: Any) -> list[str]:
    from .jobdir import Job

    lines = [
        f"job:      {s.id}" + (f" ({s.name})" if s.name else ""),
        f"state:    {s.state}" + (f" - {s.message}" if s.message else ""),
    ]
    if s.total is None:  # (broken or unreadable: not counted)
        return lines + [f"folder:   {s.folder}"]
    job = Job.open(s.folder)
    workers = [_worker_said(w) for w in s.workers]
    return lines + [
        f"progress: {s.done:,}/{s.total:,} {job.spec.count_noun}, {counted(s.errors, 'row errors')}, "
        f"{counted(s.invalid, 'invalid input rows')}"
        + (f" ({s.unsaved:,} more computed, not saved yet)" if s.unsaved else ""),
        f"speed:    {f'{s.tokens_per_second:,.1f}' if s.tokens_per_second else '-'} tok/s, ETA {s.eta}",
        f"workers:  {'; '.join(workers) if workers else '-'}",
        f"memory:   peak {_gib(s.peak_memory_bytes)} (GPU memory on CUDA, resident memory on CPU)",
        f"model:    {s.model}" + (f" (snapshot {s.model_revision})" if s.model_revision else ""),
        f"input:    {job.meta['input'].get('path', '?')} ({job.spec.rows:,} prompt{'' if job.spec.rows == 1 else 's'})",
        f"settings: {_settings_line(job)}",
        f"folder:   {job.dir}",
    ]  # fmt: skip


def _worker_said(w: dict[str, Any]) -> str:
    """A live worker in `runner status JOB`: its device and speed; "loading the model" before it names its
    device (it said "on ?: 0.0 tok/s"); "stopped" where it is stopped on this machine (its speed is of before)."""
    where = f" on {w['device']}" if w["device"] else ""
    if w.get("state") == "stopped":
        return f"{w['worker']}{where}: stopped"
    return (
        f"{w['worker']}{where}: {w['tokens_per_second'] or 0:,.1f} tok/s"
        if where
        else f"{w['worker']}: loading the model"
    )


def _settings_line(job: Any) -> str:
    """The settings a job was submitted with that differ from the defaults (a seed only where a job samples:
    score and embed jobs take none; pass 72)."""
    parts = [f"{k}={_short(v)}" for k, v in _non_default(job.params, job.meta["params"]).items()]
    parts += [f"seed={job.seed}"] if job.kind == "generate" else []
    parts += ["chat (each prompt as a user message)"] if job.meta["input"].get("chat") else []
    parts += ["its own --chat-template"] if job.meta["input"].get("chat_template") else []
    line = ", ".join(parts) or "the defaults"
    # (an OpenAI Batch file's requests sample at temperature 1 unless they say otherwise: "do_sample=False" alone
    # read as if none did; new-user walkthrough, pass 178)
    own = (job.meta.get("outputs") or {}).get("settings")
    return (
        f"{line}; rows that set their own (a field of the row, a request's body) run with those"
        if own
        else line
    )


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option(
    "--to",
    "to_path",
    type=_Path(),
    help="Write to .jsonl, .json (one array), .csv (lists as JSON) or .parquet.",
)
@click.option(
    "--format",
    "fmt",
    type=_ResultsFormat(["table", "openai"]),
    default="table",
    show_default=True,
    help="openai: one OpenAI Batch output line per request (--to FILE.jsonl).",
)
@click.option(
    "--errors-to",
    type=_Path(),
    help="Write the rows that could not be done (invalid input, row errors) to this file, beside --to or alone, "
    "typed by suffix as --to; with --format openai the Batch error file [default there: beside --to, "
    ".errors.jsonl].",
)
@home_option
@click.pass_context
@handle_errors
def results(ctx: click.Context, job_ref: str, to_path: str | None, fmt: str, errors_to: str | None) -> None:
    """Export a job's results (in input order) to a file, or preview them."""
    from .results import export_results, export_type_problem, preview_results

    if fmt == "openai" and to_path is None:
        raise click.UsageError("--format openai needs --to FILE.jsonl")
    if to_path is None and errors_to is None:
        df, total = preview_results(job_ref, ctx.obj["home"])
        preview = ["id", "sample", "prompt", "finish_reason", "completion_tokens", "logprob", "perplexity",
                   "num_tokens", "context", "continuation", "text"]  # fmt: skip
        head = df[[c for c in preview if c in df.columns]].head(20)
        if "prompt" in head.columns:  # which prompt gave which text: its start is enough to tell them apart
            head = head.assign(prompt=head["prompt"].map(_shortened))
        # a column no row of the preview fills (context / continuation of plain texts) says nothing
        if len(head):  # (none yet: pandas' "Empty DataFrame / Columns: [] / Index: []" said nothing)
            import pandas as pd

            # (a Japanese character fills two columns of a terminal or a Colab cell: counted as one, its row's
            # columns stood apart from the others')
            with pd.option_context("display.unicode.east_asian_width", True):
                click.echo(head.dropna(axis="columns", how="all").to_string(max_colwidth=60))
        click.echo(f"({counted(total, 'rows')}; --to FILE to export)")
        return
    for hint, path in (("--to", to_path), ("--errors-to", errors_to)):
        problem = export_type_problem(path) if fmt == "table" and path else None
        if problem:
            raise click.BadParameter(problem, param_hint=hint)
    written = export_results(job_ref, to_path, ctx.obj["home"], fmt, errors_to)
    rows, errors = written
    if fmt == "openai":
        _echo(
            f"wrote {counted(rows, 'response lines')} to {to_path}"
            + (
                f" and {counted(errors, 'error lines')} {f'to {errors_to}' if errors_to else 'beside it'}"
                if errors
                else ""
            )
        )
    elif to_path is None:  # --errors-to alone
        _echo(f"wrote {counted(errors, 'errors')} to {errors_to}")
    else:
        _echo(
            f"wrote {counted(rows, 'rows')} to {to_path}"
            + (f" and {counted(errors, 'errors')} to {errors_to}" if errors_to else "")
        )
    if written.lost:  # `runner results J --to f && upload f` must not upload a partial file
        raise RunnerError(f"{to_path or errors_to} was written, but without rows the job had: {written.lost}")


def _shortened(text: object, width: int = PROMPT_PREVIEW) -> object:
    """A preview's prompt: its first `width` characters, on one line."""
    if not isinstance(text, str):
        return text
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option(
    "-o",
    "--output",
    "path",
    type=_Path(),
    default="report.html",
    show_default=True,
    help="The HTML file to write.",
)
@home_option
@click.pass_context
@handle_errors
def report(ctx: click.Context, job_ref: str, path: str) -> None:
    """Write a report of JOB (id, name or folder) as one HTML page that needs no network: throughput over
    time, output lengths, finish reasons, log-prob and perplexity histograms, errors by reason, peak memory,
    settings and the lowest and highest scoring outputs. Works while the job runs, or before it has results.

    \b
    Example:
      runner report out/demo -o report.html
    """
    from . import api

    written = api.report(job_ref, path, ctx.obj["home"])
    _echo(f"wrote the report of job {job_ref} to {written}")
    click.echo(str(written))


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--every", type=_Finite(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds between looks at the job: a line when its status changed (a worker renews its "
                   "figures every 30 s), else one a minute.")  # fmt: skip
@home_option
@click.pass_context
@handle_errors
def watch(ctx: click.Context, job_ref: str, every: float) -> None:
    """Print a line when JOB's status changes (looked at every few seconds) until it ends: a live view while
    `runner work --background` runs."""
    from .api import watch as watch_job

    s = watch_job(job_ref, ctx.obj["home"], every, echo=_echo)
    if s.state != "completed":
        raise SystemExit(1)


@cli.command()
@click.argument("job_ref", metavar="JOB")
@home_option
@click.pass_context
@handle_errors
def cancel(ctx: click.Context, job_ref: str) -> None:
    """Cancel a queued or running JOB (id, name or folder); finished rows are kept (`runner retry` resumes it)."""
    from . import api

    was = api.status(
        job_ref, ctx.obj["home"]
    ).state  # "running" while a worker is on it (its state record: queued)
    api.cancel(job_ref, ctx.obj["home"])
    _echo(f"cancelled job {job_ref} (was {was}); `{command(ctx.obj['home'], 'retry', job_ref)}` resumes it")


@cli.command()
@click.argument("job_ref", metavar="JOB")
@home_option
@click.pass_context
@handle_errors
def retry(ctx: click.Context, job_ref: str) -> None:
    """Re-queue a failed or cancelled JOB, or a completed one with row errors (finished rows are kept; rows that
    failed are tried again)."""
    from . import api

    cleared = api.retry(job_ref, ctx.obj["home"])
    _echo(f"re-queued job {job_ref}" + (f"; {counted(cleared, 'failed rows')} will be tried again" if cleared else "")
          + f"; run `{_work_command(ctx.obj['home'], job_ref)}` to carry on")  # fmt: skip


@cli.command()
@click.argument("job_ref", metavar="JOB")
@home_option
@click.pass_context
@handle_errors
def repair(ctx: click.Context, job_ref: str) -> None:
    """Bring a damaged JOB back from what still verifies: restore job.json from its backup, write a damaged
    prompts.parquet or errors.jsonl again from the input file (when that is unchanged), quarantine shards that
    fail their checksum, record the state where its newest record is damaged, and re-queue the rows that are
    missing."""
    from . import api
    from .jobdir import UNKNOWN_WRITER

    r = api.repair(job_ref, ctx.obj["home"])
    if r.restored_spec:
        _echo("job.json restored from job.backup.json")
    for name in r.restored_inputs:
        _echo(f"{name} written again from the job's input file, byte for byte as submitted (the damaged one is "
              "in quarantine/)")  # fmt: skip
    if r.mended_backup:
        _echo("job.backup.json was damaged or missing: written again from job.json")
    for name, why in r.quarantined:
        _echo(f"quarantined commit {name}: {why}")
    after = ""
    if r.state_now == "queued" and not r.unrestorable:
        after = f"; run `{_work_command(ctx.obj['home'], job_ref)}` to compute the rest"
    elif r.restored_inputs and r.state_now == "failed":  # failed on the damaged file: it can go on now
        after = f"; `{command(ctx.obj['home'], 'retry', job_ref)}` carries it on"
    _echo(f"state {r.state_was} -> {r.state_now}; {r.done:,}/{r.total:,} result rows verified{after}")
    if r.damaged_by == "":
        _echo("its newest state record was empty: a change killed while it was written did not happen; if you "
              "ran `runner cancel` or `runner retry` just then, run it again")  # fmt: skip
    elif r.damaged_by == UNKNOWN_WRITER:
        _echo("its newest state record was damaged past reading which command wrote it; what it recorded no longer "
              "counts: if you ran `runner cancel` or `runner retry` on this job lately, run it again")  # fmt: skip
    elif r.damaged_by:
        again = command(ctx.obj["home"], r.damaged_by, job_ref)
        _echo(f"its damaged newest state record says it was a `runner {r.damaged_by}`; what it recorded is "
              f"unknown, so it no longer counts: if you ran one, run `{again}` again")  # fmt: skip
    if r.aside_word:
        whose = {"completed": "a worker's completion", "failed": "a worker's failure"}.get(
            r.aside_word, f"a `runner {r.aside_word}`"
        )
        _echo(f"its newest state record was empty, and the whole record of {whose} stood aside for it (another "
              "writer, killed as it put it back): that word stands")  # fmt: skip
    if r.damaged_aside is not None:
        which = f"`runner {r.damaged_aside}`" if r.damaged_aside else "`runner cancel` or `runner retry`"
        _echo(f"a state record in transit was damaged (now in quarantine/); what it recorded no longer counts: if "
              f"you ran {which} on this job lately, run it again")  # fmt: skip
    if r.lost_retry:
        _echo(_lost_retry_line(r.lost_retry, r.state_now))
    for name in r.unread_records:
        _echo(f"{name}, below the newest state record, did not read through the retries: set aside in quarantine/ "
              "(its word was superseded by the newer records)")  # fmt: skip
    for name in r.foreign_records:
        _echo(f"{name} was another job's state record (copied in from its folder): set aside in quarantine/; what "
              "this job's own record at that name said, if it had one, is lost: if you ran `runner cancel` or "
              "`runner retry` on it lately, run it again")  # fmt: skip
    if r.unrestorable:  # the job stays broken: `runner repair JOB && runner work` must not go on (pass 122)
        raise RunnerError(f"prompts.parquet or errors.jsonl is damaged and was not written again: {r.unrestorable} "
                          "(if that can be put right, run this repair again; else submit the file again)")  # fmt: skip


def _lost_retry_line(lost: tuple[int, int], now: str | None) -> str:
    """What `runner repair` says of a newest state record under an older retry generation than the job's files
    (jobdir.RepairReport.lost_retry: what it said, what is recorded now)."""
    held = f" (and the job stays {now}, as its newest record says)" if now in ("cancelled", "failed") else ""
    return (f"its newest state record said retry generation {lost[0]}, but the job's files were written under "
            f"{lost[1]}: the record of a `runner retry` was missing (deleted, or an older record copied over it), "
            f"and generation {lost[1]} is recorded again; what was recorded after that retry is lost{held}: if you "
            "ran a command on this job since, run it again")  # fmt: skip


@cli.command()
@click.argument("prompts", nargs=-1, required=True)
@model_option
@try_revision_option
@click.option("--chat", is_flag=True, help="Send each prompt as a user message through the chat template.")
@_chat_template_option("that --chat sends the prompts through")
@click.option("--show-logprobs", is_flag=True, help="Also print each token with its log-prob.")
@click.option("--context", hidden=True, expose_value=False, callback=_elsewhere(
    "gpt2-generate's --context is runner generate's argument: runner generate \"TEXT\" -m MODEL"))  # fmt: skip
@click.option("--num_generate", "--num-generate", hidden=True, expose_value=False, callback=_elsewhere(
    "gpt2-generate's --num_generate is runner's -n (--num-return-sequences): samples per prompt"))  # fmt: skip
@click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
              help="Prompts over the context window: refuse (none) or keep their end (left), as a job does.")  # fmt: skip
@_generation_options(job=False)
@generate_engine_options
@handle_errors
def generate(
    prompts: tuple[str, ...],
    model: str,
    chat: bool,
    chat_template: str | None,
    show_logprobs: bool,
    truncate: str,
    revision: str | None,
    **kw: Any,
) -> None:
    """Generate for PROMPTS at once and print the text: a quick try of settings before a night's job. A
    prompt may be '-' (one per line of standard input) or a .txt file (one per line); a missing .txt file is an
    error, not a prompt. A prompt's typed \\n is a line break, as in --template. Nothing is saved.

    \b
    Example:
      runner generate "The capital of France is" -m smollm2-135m-instruct --max-new-tokens 8
      runner generate "Write a haiku" -m smollm2-135m-instruct --chat --temperature 0.8 -n 2
    """
    from . import quick
    from .results import one_line

    params, options = build_settings(kw)
    ids, texts = zip(*quick.read_prompts_with_ids(prompts), strict=True)
    template = _chat_template(chat_template)
    answers = quick.generate(list(texts), model, params, options, chat=chat, chat_template=template,
                             truncate=truncate, revision=revision, row_ids=list(ids))  # fmt: skip
    for text, samples in zip(texts, answers, strict=True):
        for s, c in enumerate(samples):
            head = f"[{one_line(text[:40])}]" + (f" #{s}" if len(samples) > 1 else "")  # one line, as typed
            click.echo(f"{head} {c.text}")
            for line in quick.logprobs_lines(c, show_logprobs):
                click.echo(line)


@cli.command("run-batch")
@click.option(
    "-i",
    "--input-file",
    "input_path",
    required=True,
    type=_Path(),
    help="OpenAI Batch input file (JSONL of custom_id / method / url / body).",
)
@click.option(
    "-o",
    "--output-file",
    "output_path",
    required=True,
    type=_Path(),
    help="Batch output file, written (atomically) once every request is done.",
)
@model_option
@revision_option
@batch_served_names_option
@click.option(
    "--max-new-tokens",
    type=int,
    help="For requests that set no max_tokens [default: 256, or half the context window if smaller].",
)
@click.option("--job-dir", type=_Path(folder=True), help="The job folder [default: OUTPUT.job].")
@click.option("--skip-invalid", is_flag=True,
              help="Answer the valid requests; each invalid line is a 400 line of the .errors.jsonl file.")  # fmt: skip
@click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
              help="Prompts over the context window: refuse (none) or keep their end (left).")  # fmt: skip
@_chat_template_option("that the /v1/chat/completions requests' messages go through", answers="them")
@generate_engine_options
@progress_option
@click.pass_context
@handle_errors
def run_batch(ctx: click.Context, input_path: str, output_path: str, model: str, served_model_names: tuple[str, ...],
              max_new_tokens: int, job_dir: str | None, **kw: Any) -> None:  # fmt: skip
    """Run an OpenAI Batch file, as `vllm run-batch` does, and resume when run again: the output file (and
    an .errors.jsonl beside it) appears, whole, when every request is done.

    \b
    Example:
      runner run-batch -i requests.jsonl -o responses.jsonl --model smollm2-135m-instruct
    """
    from . import openai_batch

    kind = openai_batch.file_kind(input_path)
    kw = {**kw, **({"max_new_tokens": max_new_tokens} if kind == "generate" else {})}
    params, options = build_settings(batch_max_tokens(kw, kind, input_path, model), kind)
    # (the job folder is OUTPUT.job unless --job-dir names it: -o on Drive takes it there too)
    where = ("--job-dir", None) if job_dir else ("-o", os.path.basename(output_path))
    _check_drive(None, job_dir or f"{output_path}.job", *where)
    with _ctrl_c_stops() as stop:
        job, summary = openai_batch.run_batch(input_path, output_path, model, params, options, job_dir=job_dir,
                                              served_model_names=served_model_names, echo=_echo, stop=stop,
                                              skip_invalid=kw["skip_invalid"], truncate=kw["truncate"],
                                              chat_template=_chat_template(kw["chat_template"]),
                                              progress_every=kw["progress_every"], revision=kw["revision"])  # fmt: skip
    if not summary.finished:
        # (a request asking n > 1 has n results)
        noun = "requests" if job.spec.count_noun == "rows" else "results"
        _echo(_stopped_line(job, summary, noun, "carry on (the output file comes once all are done)"))
        raise SystemExit(130 if stop() else 1)
    _echo(
        f"done: {summary.done:,}/{summary.total:,} result rows, {summary.errors} row errors -> {output_path}"
    )


def _stopped_line(job: Any, summary: Any, rows: str, then: str) -> str:
    """What `runner run` / `run-batch` says when it ends before the job does: a job cancelled meanwhile (from
    another cell or VM) is re-queued by `runner retry` first; run again as it is, the command would start anew."""
    from .jobdir import JobState

    done = f"{summary.done:,}/{summary.total:,} {rows} done"
    try:
        cancelled = job.state().state is JobState.CANCELLED
    except RunnerError:
        cancelled = False
    if cancelled:
        return (f"job {job.id} was cancelled with {done}; `runner retry {shlex.quote(str(job.dir))}` re-queues it "
                f"(the finished {rows} are kept), then the same command carries it on")  # fmt: skip
    return f"stopped with {done}; run the same command again to {then}"


def main() -> None:
    """The `runner` command. It ends the process with os._exit once its work is done and its output flushed:
    pyarrow's and torch's native thread pools can abort the interpreter's own teardown ("terminate called
    without an active exception", exit -6, apache/arrow#34314) after everything succeeded."""
    try:
        # (not click's standalone mode: a Ctrl-C landing after a command's own handling, its work done and the
        # process ending, was click's "Aborted!" and exit 1, where a Ctrl-C is exit 130 everywhere else)
        done = cli.main(prog_name="runner", standalone_mode=False)
        code: Any = done if isinstance(done, int) else 0  # (an int: the code of a click Exit, --help's)
    except SystemExit as e:
        code = e.code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, click.Abort) as e:
        if isinstance(e, click.Abort) and not isinstance(e.__cause__, KeyboardInterrupt):
            click.echo("Aborted!", err=True)
            code = 1
        else:
            click.echo(
                "[runner] interrupted; finished shards are kept: run the same command again to carry on",
                err=True,
            )
            code = 130
    _exit_now(code)


def _exit_now(code: Any) -> None:
    """Exit with `code` (None, an int or a message, as SystemExit takes) without the interpreter's teardown;
    inside a notebook or an interactive session, a plain SystemExit."""
    if "ipykernel" in sys.modules or hasattr(sys, "ps1") or sys.flags.interactive:
        raise SystemExit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`runner status | head`)
            code = code or 1
    os._exit(code)
