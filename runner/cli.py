"""The `runner` command: a thin click layer over the Python API.

Each command parses options, builds the settings objects, calls the library and turns `RunnerError`s into
`Error: ...` (exit 1, no traceback). Nothing here is needed to use runner from Python.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from .errors import ParamError, RunnerError

GEN_FIELDS = (
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
    "num_return_sequences", "seed", "stop",
)  # fmt: skip
ENGINE_FIELDS = ("device", "dtype", "batch_size", "max_batch_tokens")


def _echo(line: str) -> None:
    click.echo(f"[runner] {line}", err=True)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Domain errors become `Error: ...` with exit code 1; settings errors name the option."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ParamError as e:
            raise click.ClickException(f"{e.option}: {e}") from e
        except RunnerError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def job_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Input, model, generation and engine options shared by `run` and `submit`."""
    options = [
        click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False)),
        click.option("-m", "--model", required=True,
                     help="Hub id (gpt2), local model folder, .gguf file, or the offline demo smollm2-135m-instruct."),
        click.option("--prompt-field", default="prompt", show_default=True, help="Column holding the prompt."),
        click.option("--template", help='Prompt template filled from columns, e.g. "Q: {question}\\nA:".'),
        click.option("--skip-invalid", is_flag=True,
                     help="Run the valid rows; list invalid ones with reasons in the job's errors.jsonl."),
        click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
                     help="Prompts over the context window: refuse (none) or keep their end (left)."),
        click.option("--max-new-tokens", type=int, help="Tokens to generate per sample [default: 64]."),
        click.option("--min-new-tokens", type=int, help="Suppress EOS/stop strings until this many tokens."),
        click.option("--do-sample/--greedy", default=None,
                     help="Sample or decode greedily [default: sample iff --temperature/--top-p/--top-k/-n ask]."),
        click.option("--temperature", type=float, help="Sampling temperature; 0 = greedy [default: 1.0]."),
        click.option("--top-p", type=float, help="Nucleus sampling mass in (0, 1] [default: 1.0]."),
        click.option("--top-k", type=int, help="Sample from the k most likely tokens; 0 = off [default: 0]."),
        click.option("--repetition-penalty", type=float, help="Penalty > 0 for repeated tokens [default: 1.0]."),
        click.option("-n", "--num-return-sequences", type=int, help="Samples per prompt [default: 1]."),
        click.option("--seed", type=int, help="Random seed; the same seed gives the same results."),
        click.option("--stop", multiple=True, help='Stop string, repeatable (e.g. --stop "\\n"). Escapes \\n \\t work.'),
        click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto]."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     help="Weights and compute precision [default: auto: fp32 on CPU, bf16/fp16 on GPU]."),
        click.option("--batch-size", type=int, help="Most sequences per batch [default: 64]."),
        click.option("--max-batch-tokens", type=int,
                     help="Most tokens per batch, rows x (longest prompt + max new tokens) [default: from device]."),
        click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _unescape(s: str) -> str:
    # `--stop "\n"` arrives as backslash + n from most shells; users mean a newline (as in seed QA prompts).
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s


def build_settings(kw: dict[str, Any]) -> tuple[Any, Any]:
    from .params import EngineOptions, GenerationParams

    gen = {k: kw[k] for k in GEN_FIELDS if kw.get(k) not in (None, ())}
    if "stop" in gen:
        gen["stop"] = [_unescape(s) for s in gen["stop"]]
    eng = {k: kw[k] for k in ENGINE_FIELDS if kw.get(k) is not None}
    return GenerationParams(**gen), EngineOptions(**eng)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="runner")
@click.option("--home", envvar="RUNNER_HOME", type=click.Path(file_okay=False),
              help="Job home folder [env RUNNER_HOME; default ./jobs].")  # fmt: skip
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Batch text generation for Hugging Face causal LMs: validate a prompt file, generate in left-padded
    batches with log-probs, write Parquet, resume after any interruption."""
    ctx.obj = {"home": home}


@cli.command()
@job_options
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Job folder for this run (default: a new job in the job home). Run again to resume.")  # fmt: skip
@click.pass_context
@handle_errors
def run(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Validate INPUT, generate for every row and write the results (submit + work on one job).

    \b
    Example:
      runner run examples/prompts.jsonl --model smollm2-135m-instruct --max-new-tokens 64 -o out/
      python -c "import runner; print(runner.load_results('out/').head())"
    """
    from .jobs import create_job
    from .worker import run_job

    params, options = build_settings(kw)
    job = create_job(
        input_path, model, params, options,
        prompt_field=kw["prompt_field"], template=kw["template"], skip_invalid=kw["skip_invalid"],
        truncate=kw["truncate"], trust_remote_code=kw["trust_remote_code"],
        home=ctx.obj["home"], job_dir=output,
    )  # fmt: skip
    invalid = job.meta["input"]["invalid"]
    if invalid:
        _echo(f"{invalid} invalid row(s) skipped; see {job.dir / 'errors.jsonl'}")
    summary = run_job(job, echo=_echo)
    _echo(
        f"done: {summary.done:,}/{summary.total:,} rows, {summary.errors} errors, "
        f"{summary.tokens_per_second:,.1f} tok/s"
    )
    click.echo(str(job.dir))


def main() -> None:
    cli(prog_name="runner")
