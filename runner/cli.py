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
    "num_return_sequences", "seed", "stop", "logprobs", "prompt_logprobs",
)  # fmt: skip
ENGINE_FIELDS = ("device", "dtype", "batch_size", "max_batch_tokens", "trust_remote_code", "allow_pickle")


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


def _apply(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


input_options = _apply([
    click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False)),
    click.option("-m", "--model", required=True,
                 help="Hub id (gpt2), local model folder, .gguf file, or the offline demo smollm2-135m-instruct."),
    click.option("--prompt-field", "--text-field", "prompt_field",
                 help="Column holding the prompt (generate) or the text (score, embed) [default: prompt / text]."),
    click.option("--template", help='Prompt template filled from columns, e.g. "Q: {question}\\nA:".'),
    click.option("--skip-invalid", is_flag=True,
                 help="Run the valid rows; list invalid ones with reasons in the job's errors.jsonl."),
    click.option("--truncate", type=click.Choice(["none", "left"]), default="none", show_default=True,
                 help="Prompts over the context window: refuse (none) or keep their end (left)."),
])  # fmt: skip

generation_options = _apply([
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
    click.option("--logprobs", type=int, help="Also keep the K most likely alternatives of each token (0-20)."),
    click.option("--prompt-logprobs", is_flag=True, default=None, help="Also keep the log-prob of every prompt token."),
])  # fmt: skip

score_options = _apply([
    click.option("--add-bos/--no-add-bos", default=None,
                 help="Score the first token given BOS (EOS for GPT-2) as context [default: on]."),
    click.option("--add-eos/--no-add-eos", default=None,
                 help="Also score the end of the text (EOS), as gpt2-score does without --exclude-end [default: off]."),
    click.option("--stride", type=int, help="Texts over the context window: window step in tokens [default: half]."),
])  # fmt: skip

embed_options = _apply([
    click.option("--pooling", type=click.Choice(["mean", "last"]),
                 help="Mean of the last hidden states over the text, or the last token's [default: mean]."),
])  # fmt: skip

engine_options = _apply([
    click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto]."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                 help="Weights and compute precision [default: auto: fp32 on CPU, bf16/fp16 on GPU]."),
    click.option("--batch-size", type=int, help="Most sequences per batch [default: 64]."),
    click.option("--max-batch-tokens", type=int,
                 help="Most tokens per batch, rows x (longest prompt + max new tokens) [default: from device]."),
    click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run."),
    click.option("--allow-pickle-weights", "allow_pickle", is_flag=True,
                 help="Allow pickle-based weights (pytorch_model.bin); only safetensors/GGUF otherwise."),
])  # fmt: skip

output_option = click.option(
    "-o", "--output", type=click.Path(file_okay=False),
    help="Job folder for this run (default: a new job in the job home). Run again to resume.",
)  # fmt: skip


def _unescape(s: str) -> str:
    # `--stop "\n"` arrives as backslash + n from most shells; users mean a newline (as in seed QA prompts).
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape") if "\\" in s else s


KIND_FIELDS = {"generate": GEN_FIELDS, "score": ("add_bos", "add_eos", "stride"), "embed": ("pooling",)}


def build_settings(kw: dict[str, Any], kind: str = "generate") -> tuple[Any, Any]:
    """The kind's settings object and the engine options from the given options; options that belong to
    another kind of job are refused rather than silently ignored."""
    from .params import EmbedParams, EngineOptions, GenerationParams, ScoreParams

    given = {k for fields in KIND_FIELDS.values() for k in fields if kw.get(k) not in (None, ())}
    stray = sorted(given - set(KIND_FIELDS[kind]))
    if stray:
        raise ParamError(stray[0], f"not used by {kind} jobs.")
    values = {k: kw[k] for k in KIND_FIELDS[kind] if kw.get(k) not in (None, ())}
    if "stop" in values:
        values["stop"] = [_unescape(s) for s in values["stop"]]
    eng = {k: kw[k] for k in ENGINE_FIELDS if kw.get(k) is not None}
    cls = {"generate": GenerationParams, "score": ScoreParams, "embed": EmbedParams}[kind]
    return cls(**values), EngineOptions(**eng)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="runner")
@click.option("--home", envvar="RUNNER_HOME", type=click.Path(file_okay=False),
              help="Job home folder [env RUNNER_HOME; default ./jobs].")  # fmt: skip
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Batch text generation for Hugging Face causal LMs: validate a prompt file, generate in left-padded
    batches with log-probs, write Parquet, resume after any interruption."""
    ctx.obj = {"home": home}


def _run_kind(
    ctx: click.Context, kind: str, input_path: str, model: str, output: str | None, kw: dict[str, Any]
) -> None:
    from .scheduler import run as run_api

    params, options = build_settings(kw, kind)
    _warn_if_not_on_drive(ctx.obj["home"] if output is None else output)
    job, summary = run_api(
        input_path, model, params, options, output=output, echo=_echo,
        prompt_field=kw["prompt_field"], template=kw["template"], skip_invalid=kw["skip_invalid"],
        truncate=kw["truncate"], home=ctx.obj["home"],
    )  # fmt: skip
    invalid = job.meta["input"]["invalid"]
    if invalid:
        _echo(f"{invalid} invalid row(s) skipped; see {job.dir / 'errors.jsonl'}")
    _echo(
        f"done: {summary.done:,}/{summary.total:,} rows, {summary.errors} errors, "
        f"{summary.tokens_per_second:,.1f} tok/s"
    )
    click.echo(str(job.dir))


@cli.command()
@input_options
@generation_options
@engine_options
@output_option
@click.pass_context
@handle_errors
def run(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Validate INPUT, generate for every row and write the results (submit + work on one job).

    \b
    Example:
      runner run examples/prompts.jsonl --model smollm2-135m-instruct --max-new-tokens 64 -o out/
      python -c "import runner; print(runner.load_results('out/').head())"
    """
    _run_kind(ctx, "generate", input_path, model, output, kw)


@cli.command()
@input_options
@score_options
@engine_options
@output_option
@click.pass_context
@handle_errors
def score(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Score texts: the log-probability of each row's `text` under the model (sum, mean, perplexity and
    per token), or of its `continuation` given its `context` (with `is_greedy`), as gpt2-score and lm-eval.

    \b
    Example:
      runner score examples/score.jsonl --model smollm2-135m-instruct -o out/score
    """
    _run_kind(ctx, "score", input_path, model, output, kw)


@cli.command()
@input_options
@embed_options
@engine_options
@output_option
@click.pass_context
@handle_errors
def embed(ctx: click.Context, input_path: str, model: str, output: str | None, **kw: Any) -> None:
    """Embed texts: one vector per row's `text` (mean of the last hidden states, or the last token's), as a
    fixed-size float32 column `embedding`, like gpt2-transform.

    \b
    Example:
      runner embed examples/score.jsonl --model smollm2-135m-instruct -o out/embed
    """
    _run_kind(ctx, "embed", input_path, model, output, kw)


def _warn_if_not_on_drive(home: str | None) -> None:
    """On Colab, a job home on the VM's own disk dies with the VM: say so before hours of work go there."""
    import os
    import sys
    from pathlib import Path

    from .jobs import default_home

    if "google.colab" not in sys.modules and not os.environ.get("COLAB_RELEASE_TAG"):
        return
    path = Path(home) if home else default_home()
    if not str(path.resolve()).startswith("/content/drive"):
        _echo(
            f"WARNING: the job home {path.resolve()} is not on Google Drive; it vanishes with this Colab VM. "
            "Mount Drive and use --home /content/drive/MyDrive/runner-jobs (or set RUNNER_HOME)."
        )


@cli.command()
@input_options
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
@engine_options
@click.option("--name", help="A name to refer to the job by (instead of its id).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.pass_context
@handle_errors
def submit(
    ctx: click.Context, input_path: str, model: str, kind: str, name: str | None, priority: int, **kw: Any
) -> None:
    """Validate INPUT and the settings (and that the model's config and tokenizer load) and queue a job.

    Prints the job id. Nothing invalid is ever queued. Start the work with `runner work`.
    """
    from .jobs import create_job

    _warn_if_not_on_drive(ctx.obj["home"])
    params, options = build_settings(kw, kind)
    job = create_job(
        input_path, model, params, options,
        prompt_field=kw["prompt_field"], template=kw["template"], skip_invalid=kw["skip_invalid"],
        truncate=kw["truncate"], home=ctx.obj["home"], name=name, priority=priority,
    )  # fmt: skip
    invalid = job.meta["input"]["invalid"]
    _echo(
        f"queued {kind} job {job.id}: {job.meta['input']['rows']:,} rows"
        + (f" x {job.samples} samples = {job.total:,} results" if job.samples > 1 else "")
        + (f"; {invalid} invalid row(s) listed in errors.jsonl" if invalid else "")
    )
    click.echo(job.id)


def _deadline(hours: float | None, until: str | None) -> float | None:
    import datetime as dt
    import time

    if hours is not None and until is not None:
        raise click.UsageError("give --hours or --until, not both")
    if hours is not None:
        if hours <= 0:
            raise click.BadParameter("must be > 0", param_hint="--hours")
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


@cli.command()
@click.option("--hours", type=float, help="Stop starting new batches so as to finish within this many hours.")
@click.option("--until", help="Stop by this local time (HH:MM).")
@click.option("--job", "job_ref", help="Work on this job only.")
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
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="...and every this many minutes: the most work a kill can lose.",
)
@click.pass_context
@handle_errors
def work(
    ctx: click.Context,
    hours: float | None,
    until: str | None,
    job_ref: str | None,
    once: bool,
    shard_rows: int,
    shard_minutes: float,
) -> None:
    """Run queued jobs: interrupted ones first, then by priority and age, until the queue is empty or the
    deadline. Ctrl-C (or the deadline) finishes and writes the current batch, then stops; run it again to carry on.
    """
    import signal

    from .scheduler import work as work_loop

    deadline = _deadline(hours, until)
    _warn_if_not_on_drive(ctx.obj["home"])
    stop = {"requested": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        _echo("stopping after the current batch (Ctrl-C again to stop at once; finished shards are kept)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        summaries = work_loop(
            ctx.obj["home"],
            job=job_ref,
            deadline=deadline,
            once=once,
            shard_rows=shard_rows,
            shard_seconds=shard_minutes * 60,
            stop=lambda: stop["requested"],
            echo=_echo,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    if not summaries:
        _echo("nothing to do: no queued or interrupted jobs" + (f" matching {job_ref!r}" if job_ref else ""))
    elif not all(s.finished for s in summaries):
        _echo("stopped; run `runner work` again to carry on")


@cli.command()
@click.argument("job_ref", metavar="[JOB]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, job_ref: str | None, as_json: bool) -> None:
    """Show all jobs as a table (state, done/total, tok/s, ETA, errors), or one JOB in detail."""
    import json

    from .jobs import Job, all_jobs, find_job
    from .status import job_status, status_table

    if job_ref is None:
        statuses = [job_status(j) for j in all_jobs(ctx.obj["home"])]
        if as_json:
            click.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
        elif statuses:
            click.echo(status_table(statuses))
        else:
            click.echo("no jobs")
        return
    job = Job.open(find_job(job_ref, ctx.obj["home"]))
    s = job_status(job)
    if as_json:
        click.echo(json.dumps({**s.as_dict(), "job": job.meta}, indent=2, ensure_ascii=False))
        return
    p = job.meta["params"]
    lines = [
        f"job:      {s.id}" + (f" ({s.name})" if s.name else ""),
        f"state:    {s.state}" + (f" - {s.message}" if s.message else "") + (f" [worker {s.worker}]" if s.worker else ""),
        f"progress: {s.done:,}/{s.total:,} rows, {s.errors} row errors, {s.invalid} invalid input rows",
        f"speed:    {s.tokens_per_second or '-'} tok/s, ETA {s.eta}",
        f"model:    {s.model}",
        f"input:    {job.meta['input']['path']} ({job.meta['input']['rows']:,} prompts)",
        "settings: " + ", ".join(f"{k}={v!r}" for k, v in p.items() if k != "seed" and v not in (None, [])) + f", seed={job.seed}",
        f"folder:   {job.dir}",
    ]  # fmt: skip
    click.echo("\n".join(lines))


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.option("--to", "to_path", type=click.Path(dir_okay=False), help="Write to .jsonl, .csv or .parquet.")
@click.pass_context
@handle_errors
def results(ctx: click.Context, job_ref: str, to_path: str | None) -> None:
    """Export a job's results (in input order) to a file, or preview them."""
    from pathlib import Path

    from .results import load_results

    df = load_results(job_ref, ctx.obj["home"])
    if to_path is None:
        preview = ["id", "sample", "finish_reason", "completion_tokens", "logprob", "perplexity", "num_tokens",
                   "context", "continuation", "text"]  # fmt: skip
        click.echo(df[[c for c in preview if c in df.columns]].head(20).to_string(max_colwidth=60))
        click.echo(f"({len(df):,} rows; --to FILE to export)")
        return
    suffix = Path(to_path).suffix.lower()
    if suffix == ".parquet":
        df.to_parquet(to_path, index=False)
    elif suffix in (".jsonl", ".json"):
        df.to_json(to_path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".csv":
        df.to_csv(to_path, index=False)
    else:
        raise click.BadParameter(
            f"unknown type {suffix or '(none)'!r}; use .jsonl, .csv or .parquet", param_hint="--to"
        )
    _echo(f"wrote {len(df):,} rows to {to_path}")


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.pass_context
@handle_errors
def cancel(ctx: click.Context, job_ref: str) -> None:
    """Cancel a queued or running job; rows already finished are kept (`runner retry` re-queues it)."""
    from pathlib import Path

    from .jobs import find_job
    from .leases import cancel_job

    path = Path(find_job(job_ref, ctx.obj["home"]))
    was = cancel_job(path)
    _echo(f"cancelled job {path.name} (was {was})")


@cli.command()
@click.argument("job_ref", metavar="JOB")
@click.pass_context
@handle_errors
def retry(ctx: click.Context, job_ref: str) -> None:
    """Re-queue a failed or cancelled job (finished rows are kept; rows that failed are tried again)."""
    from pathlib import Path

    from .jobs import find_job
    from .leases import retry_job

    path = Path(find_job(job_ref, ctx.obj["home"]))
    cleared = retry_job(path)
    _echo(
        f"re-queued job {path.name}" + (f"; {cleared} failed row(s) will be tried again" if cleared else "")
    )


def main() -> None:
    cli(prog_name="runner")
