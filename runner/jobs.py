"""Submit: create a self-contained job folder from a prompt file (what the folder holds is jobdir.py).

input file -> inputs.PromptReader (chunks) -> `create_job` (render chat templates, tokenize once, check lengths
against the context window, store settings + a validated copy of the prompts) -> job folder -> worker.py

The input is streamed: each chunk of `ROW_GROUP_ROWS` rows (fewer where their texts reach `CHUNK_TEXT_CHARS`) is
validated, tokenized (one tokenizer call) and written as one row group of prompts.parquet before the next is
read, so a file of any size is submitted in memory bounded by a chunk.

The job is built in a hidden temp folder (with an owner record, so that the temp folder of a killed submit is
cleaned up by the next one) and renamed into place, so a kill during submit never leaves a half-made job that
a worker would pick up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, constraints, jobdir, openai_batch, storage
from .batching import chat_template_text, check_chat_option, keep_end
from .errors import (
    InputError,
    NotOnThisMachine,
    ParamError,
    Problem,
    RunnerError,
    command,
    first_line,
    on_the_command_line,
    option,
    said_on_the_command_line,
)
from .inputs import READING, PromptReader, PromptRow, input_file
from .jobdir import JOB_BACKUP, JOB_FILE, ORDER, PROMPTS, Job, JobState, check_name, default_home, new_job_id
from .models import (
    ModelUnreadable,
    asked_revision,
    at,
    check_causal_lm,
    check_weights,
    context_window,
    fingerprint_version,
    hub_newest_here,
    hub_snapshot,
    is_hub_model,
    load_config,
    load_tokenizer,
    model_fingerprint,
    reading_model,
    resolve_model,
    stored_spec,
    text_config,
)
from .params import (
    OFF_UNSAID,
    RENAMED_ROW_SETTINGS,
    ROW_SAMPLING,
    ROW_SETTINGS,
    SAMPLING_FIELDS,
    SETTINGS_RUNNER_LACKS,
    EmbedParams,
    EngineOptions,
    GenerationParams,
    ScoreParams,
    as_params_hint,
    check_options,
    check_truncate,
    said_before_6,
    settings_apart,
)
from .passthrough import Passthrough, rewrite_passthrough
from .progress import counted, in_words
from .results import LOCAL_SHARD_PREFIX, PROMPT_COLUMNS, passthrough_columns

ROW_GROUP_ROWS = 10_000  # rows read, checked, tokenized and written at a time; a row group of prompts.parquet
CHUNK_TEXT_CHARS = 4 * 2**20  # ... or fewer, their texts this long: tokenizing takes ~50 bytes a character
PROBLEMS_KEPT = 1000  # invalid rows held for the error message; all are counted, and listed in errors.jsonl
KINDS = {GenerationParams: "generate", ScoreParams: "score", EmbedParams: "embed"}


def _fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _reader(
    input_path: Path,
    kind: str,
    prompt_field: str,
    template: str | None,
    models: tuple[str, ...],
    chat: bool,
    params: Any,
) -> PromptReader:
    """How this kind of job reads its rows: generation reads messages and per-row settings, scoring pairs."""
    return PromptReader(
        input_path, prompt_field=prompt_field, template=template,
        messages_field="messages" if kind == "generate" else None,
        pair_fields=("context", "continuation") if kind == "score" else None,
        row_settings=kind == "generate", chat=chat,
        batch=(kind, models, openai_batch.says_greedy(params), getattr(params, "logprobs", None) is not None),
    )  # fmt: skip


def _identity(
    input_path: Path,
    model: str,
    params: Any,
    *,
    prompt_field: str,
    template: str | None,
    skip_invalid: bool,
    truncate: str,
    served: tuple[str, ...],
    chat: bool,
    chat_template: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """What makes two submits the same job: the input's bytes, how it is read, the model (and the `revision`
    asked of it) and the settings."""
    return {
        "input_sha256": storage.retry(lambda: storage.file_sha256(input_path), f"read {input_path}"),
        "prompt_field": prompt_field, "template": template,
        "skip_invalid": skip_invalid, "truncate": truncate, "model": model, "params": params.to_dict(),
        "served_model_names": list(served), **({"chat": True} if chat else {}),
        **({"chat_template": chat_template} if chat_template is not None else {}), **_schema_order(params),
        **({"revision": revision} if revision else {}),
    }  # fmt: skip


def _schema_order(params: Any) -> dict[str, str]:
    """A job's JSON schema as written, where its keys are not in sorted order: the order its object is
    generated in, which the fingerprint (sorted keys) would not see; jobs whose schema is sorted, or that have
    none, keep the fingerprint they had."""
    schema = getattr(params, "json_schema", None)
    if schema is None or _json(schema) == json.dumps(schema, ensure_ascii=False, sort_keys=True):
        return {}
    return {"json_schema_text": _json(schema)}


def _input_meta(source: Any, input_path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """meta["input"]: where the rows came from and how they were read (as the identity says)."""
    return {"path": _describe(source, input_path), "sha256": identity["input_sha256"],
            "mtime": int(storage.retry(input_path.stat, f"look at {input_path}").st_mtime),
            "prompt_field": identity["prompt_field"],
            "template": identity["template"], "truncate": identity["truncate"],
            "chat": identity.get("chat", False), "skip_invalid": identity["skip_invalid"],
            "served_model_names": identity["served_model_names"],
            **({"chat_template": identity["chat_template"]} if "chat_template" in identity else {})}  # fmt: skip


def _default_params(
    source: Any, model: str, options: EngineOptions | None, revision: str | None = None
) -> GenerationParams:
    """The settings of a job given none: GenerationParams(), but for an OpenAI Batch file the Batch default for
    max_tokens (256, or half the context window) as the CLI gives it (`cli.batch_max_tokens`): from Python,
    `runner.submit`, `runner.run` and `runner.run_batch` of requests without max_tokens answered in 64 tokens."""
    from . import openai_batch

    if isinstance(source, (str, os.PathLike)) and openai_batch.is_batch_file(source):
        trust = options is not None and options.trust_remote_code
        return GenerationParams(max_new_tokens=openai_batch.default_max_tokens(model, trust, revision))
    return GenerationParams()


@settings_apart("submit")
def create_job(
    input_path: str | os.PathLike,
    model: str,
    params: GenerationParams | ScoreParams | EmbedParams | None = None,
    options: EngineOptions | None = None,
    *,
    prompt_field: str | None = None,
    template: str | None = None,
    skip_invalid: bool = False,
    truncate: str = "none",
    name: str | None = None,
    priority: int = 0,
    home: str | os.PathLike | None = None,
    job_dir: str | os.PathLike | None = None,
    unit_rows: int | None = None,
    served_model_names: tuple[str, ...] = (),
    chat: bool = False,
    chat_template: str | os.PathLike | None = None,
    revision: str | None = None,
    same_in_home: bool = False,
    seed_from_input: bool = False,
) -> Job:
    """Validate everything and store a queued job. Nothing invalid is ever stored.

    The kind of job follows from `params`: GenerationParams (generate; the default), ScoreParams (score the
    log-probability of texts, or of a continuation given a context) or EmbedParams (one vector per text).
    `prompt_field` is the column holding the prompt/text: `prompt` for generation, `text` otherwise.

    `job_dir` puts the job in that folder (as `runner run -o DIR`); an existing job there with the same
    inputs and settings is returned as is (to be resumed); one with other settings is refused. So is a `name`
    already taken in the home: the same inputs and settings return that job (running a notebook's cells again
    never submits twice), other ones are refused. With `same_in_home` (`runner run` without -o), a job of the
    home with the same inputs and settings and no name is returned as is too, unless it failed or was cancelled.
    `job.created` tells a job stored now from one already there.

    `chat` sends each plain prompt as one user message through the model's chat template (instruct models
    answer raw text poorly); `meta["input"]["raw_prompts_to_chat_model"]` says when it was not asked for but the
    model has a chat template and every row was a plain prompt. `chat_template` (Jinja text, as a tokenizer's
    `chat_template`, or a Path to a file of it) renders `messages` rows (and `chat` prompts) instead of the
    model's own, or for a model that has none (a GPT-2 fine-tuned on your own chat format); the job records it.

    `revision`: a hub model's branch, tag or commit (from_pretrained's `revision`). A hub model's job is pinned
    to the commit that names at submit (without `revision`, the newest: main), and runs on it to the end.

    `unit_rows` is the number of prompts a worker claims at a time (several workers share a job by units).
    `seed_from_input`: `params` without a seed take one from the input's sha256 (`runner.run_batch`: the same
    file gives the same output on every run).

    A generation row may carry its own settings (params.ROW_SETTINGS: `temperature`, `max_tokens`, `n`, ...);
    OpenAI Batch request lines are read as rows (openai_batch.py), their `body.model` being `model`, its folder
    name, or one of `served_model_names`.

    The file is read, checked, tokenized and written `ROW_GROUP_ROWS` rows (or `CHUNK_TEXT_CHARS` characters of text)
    at a time, so memory is bounded by that chunk whatever the file's size (plus 24 bytes a row to find duplicate
    ids: inputs.SeenIds).
    """
    check_options(options)
    params, options = (
        params or _default_params(input_path, model, options, revision),
        options or EngineOptions(),
    )
    kind = _check_args(params, truncate, name, unit_rows, priority, chat, chat_template)
    chat_template = None if chat_template is None else chat_template_text(chat_template)
    job_dir = None if job_dir is None else jobdir.named_folder(Path(job_dir))
    unit_rows = jobdir.UNIT_ROWS if unit_rows is None else unit_rows
    source = input_path
    prompt_field = prompt_field or ("prompt" if kind == "generate" else "text")
    with input_file(source, prompt_field, kind) as input_path:
        # the names Batch lines may give the model
        models = tuple(dict.fromkeys((model, Path(model).name, *served_model_names)))
        model, revision = stored_spec(model), asked_revision(model, revision)
        reader = _reader(input_path, kind, prompt_field, template, models, chat, params)
        identity = _identity(input_path, model, params, prompt_field=prompt_field, template=template,
                             skip_invalid=skip_invalid, truncate=truncate, served=served_model_names,
                             chat=chat, chat_template=chat_template, revision=revision)  # fmt: skip
        if seed_from_input and getattr(params, "seed", 0) is None:
            # (from the hash of the bytes read: one of its own, made before, named the file as it was then)
            params = params.replaced(seed=openai_batch.input_seed(identity["input_sha256"]))
            identity["params"] = params.to_dict()
        root = _home_checked(home, job_dir)
        fingerprint = _fingerprint(identity)
        rerun = same_in_home and job_dir is None and name is None  # `runner run FILE` without -o or --name
        existing = _already_submitted(job_dir, root, name, identity)
        if existing is None and rerun:
            existing = _same_job_in_home(root, fingerprint)
        if existing is not None:
            return existing
        _refuse_a_name_like_an_id(job_dir)
        # (the model's files read again after a transient error, a model on a Drive mount: `reading_model`)
        pinned, (config, tokenizer, window) = reading_model(
            lambda: _pinned_facts(model, options, kind, params, chat_template, revision), model
        )
        if chat:
            check_chat_option(tokenizer, model)
        target = Path(job_dir) if job_dir is not None else root / new_job_id()
        meta = {
            "id": target.name if job_dir is None else new_job_id(), "name": name, "kind": kind,
            "priority": priority, "model": model, **pinned,
            "context_window": window, "embedding_dim": embedding_dim(config) if kind == "embed" else None,
            "params": params.to_dict(), "engine": options.to_dict(), "unit_rows": unit_rows,
            "fingerprint": fingerprint, "input": _input_meta(source, input_path, identity),
        }  # fmt: skip
        _refuse_what_json_cannot_hold(meta)
        prep = _Preparer(kind, tokenizer, params, window, truncate, prompt_field,
                         kind == "generate" and _sample_auto(params), _vocab_size(config),
                         (model, served_model_names))  # fmt: skip
        if rerun:
            claim = _Claim.of_rerun(root, fingerprint)
        else:
            claim = _Claim.of_name(name) if job_dir is None else None
        holder = _write_job(target, meta, reader, prep, skip_invalid, tokenizer, claim)
        # another submit of the same name, -o folder, or file and settings got there first, while this one was
        # being written
        if holder is not None:
            return (
                Job.open(root / holder) if rerun else _held_by(holder, job_dir, root, name, identity, target)
            )
        job = Job.open(target)
        job.created = True
        _log_created(job, kind, model)
        return job


def _refuse_what_json_cannot_hold(meta: Any, where: str = "") -> None:
    """job.json holds text only: a setting whose bytes are not UTF-8 (a model folder so named, a `--stop` given
    such bytes: Python keeps them as surrogates) is refused before a row is read, naming it (it ended in a
    UnicodeEncodeError traceback once every row had been tokenized)."""
    for key, value in meta.items() if isinstance(meta, dict) else enumerate(meta):
        at = f"{where}.{key}" if where else str(key)
        if isinstance(value, (dict, list)):
            _refuse_what_json_cannot_hold(value, at)
        elif isinstance(value, str) and not storage.is_text(value):
            raise RunnerError(f"{at} '{_shown(value)}' is not UTF-8 text, and job.json stores text only: give it "
                              "in UTF-8 (a file or folder: rename it)")  # fmt: skip


def _shown(value: str) -> str:
    """`value` with its bytes that are not UTF-8 as \\xNN (as `ls -b` shows a name)."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _log_created(job: Job, kind: str, model: str) -> None:
    """The job's first log line. The job is stored and queued: a line that cannot be written must not say the
    submit failed."""
    try:
        job.log(f"created {kind} job {job.id}: {counted(job.spec.rows, 'rows')} x "
                f"{counted(job.samples, 'samples')}, model {model}")  # fmt: skip
    except storage.StorageError:
        pass


def restore_inputs(job: Job) -> tuple[list[str], str | None]:
    """prompts.parquet (and errors.jsonl) written again from the job's input file where they are not the files
    submit wrote (a flipped byte, a truncation: before, such a job could only be submitted again and computed
    anew). Only from the input file still at its path with the bytes submitted, and only a file written again
    byte for byte as submit wrote it (its sha256 in job.json): the same rows, tokens and settings, or nothing.
    The damaged file is kept in quarantine/. Returns (the names written again, why they could not be, or None)."""
    expected = {PROMPTS: job.spec.prompts_sha256, jobdir.INVALID: job.meta["input"].get("invalid_sha256")}
    # those that did not read through the retries (a file Drive cannot serve for hours)
    unread: set[str] = set()

    def problem(name: str, why: Callable[[], Any]) -> Any:
        try:
            return why()
        except storage.StorageError as e:
            if not e.unreadable_for_now:
                raise
            unread.add(name)
            return True

    prompts = lambda: storage.kind(job.dir / PROMPTS) != "file" or jobdir.prompts_problem(job)  # noqa: E731
    damaged = [PROMPTS] if problem(PROMPTS, prompts) else []
    if job.meta["input"].get("invalid") and problem(jobdir.INVALID, lambda: jobdir.invalid_problem(job)):
        damaged.append(jobdir.INVALID)
    if not damaged:
        return [], None
    # (never a home that does not read now: job.json must read for a file of it to be taken for lost)
    if unread:
        storage.read_json(job.dir / jobdir.JOB_FILE)
    # (a killed repair's folder is swept as a killed worker's local shards are)
    with tempfile.TemporaryDirectory(prefix=LOCAL_SHARD_PREFIX + "restore-") as tmp:
        try:
            _rewrite_inputs(job, Path(tmp))
        except InputError as e:
            return [], f"the input file no longer reads as it did ({first_line(e)})"
        except storage.StorageError as e:  # a mount failing for a minute: the repair stops, to be run again
            if e.unreadable_for_now:
                raise
            return [], first_line(e)
        except NotOnThisMachine as e:  # (a pinned snapshot not in this machine's cache: which to download)
            return [], e.said()
        except RunnerError as e:
            return [], first_line(e)
        for name in damaged:
            rewritten = Path(tmp) / name
            if not rewritten.is_file() or storage.file_sha256(rewritten) != expected[name]:
                return [], f"{name} written again from the input file is not the one submit wrote"
        for name in damaged:
            if name in unread:  # (moved aside whole: it cannot be copied)
                jobdir.move_aside(job.dir, name)
                storage.publish(Path(tmp) / name, job.dir / name)
            else:
                jobdir.replace_keeping_old(job.dir, name, Path(tmp) / name)
    with contextlib.suppress(RunnerError):  # (a log.txt that cannot be written is repair's to set aside)
        job.log(f"repair: {', '.join(damaged)} was missing, did not read or did not match its checksum; written "
                f"again from the input file {job.meta['input']['path']} (as submitted, byte for byte; the damaged "
                "one is in quarantine/)")  # fmt: skip
    return damaged, None


def _rewrite_inputs(job: Job, folder: Path) -> None:
    """Read the job's input file again, as its submit did, into `folder` (RunnerError when it is not there,
    or not the file submitted)."""
    inp = job.meta["input"]
    path = Path(inp["path"])
    if not path.is_absolute() or not path.is_file():
        raise RunnerError(f"its input {inp['path']} is not a file there any more")
    model, params, kind = job.spec.model, job.params, job.kind
    if kind == "generate" and job.meta.get("sample_auto"):
        # submit was given no do_sample (job.json holds the one it decided: read back, it reads as given, and
        # a Batch request without a temperature would be taken for greedy): decided again, as submit did
        params = dataclasses.replace(params, do_sample=None)
    # (a job stored before 2026-12-02 records no served names, chat or skip_invalid: none, False, False then)
    models = tuple(dict.fromkeys((model, Path(model).name, *(inp.get("served_model_names") or ()))))
    reader = _reader(
        path, kind, inp["prompt_field"], inp.get("template"), models, bool(inp.get("chat")), params
    )
    reader.reading = inp.get("reading", 1)  # (a job of before: its file read as its submit read it)
    # (after the reader is made: a change from here on is refused when it has read the file)
    if storage.file_sha256(path) != inp["sha256"]:
        raise RunnerError(f"its input file {path} has changed since it was submitted")
    config, tokenizer, window = _model_facts(
        model, job.options, kind, params, inp.get("chat_template"), job.spec.revision
    )
    prep = _Preparer(kind, tokenizer, params, window, inp.get("truncate", "none"), inp["prompt_field"],
                     kind == "generate" and _sample_auto(params), _vocab_size(config),
                     # (a job of before, read as its submit read it: no endpoint per row, as its checksum says)
                     (model, inp.get("served_model_names") or ()) if reader.reading >= 2 else None)  # fmt: skip
    prep.reading = reader.reading
    _write_prompts(reader, prep, folder, bool(inp.get("skip_invalid")))


def _describe(source: Any, path: Path) -> str:
    """What job.json says the input was: the file's absolute path, or the dataset it was read from. A name's bytes
    that are not UTF-8 are written as \\xNN (JSON holds text only; a `runner repair` that needs the file again
    then says it is not there)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text == "-":
            return "standard input"
        text = text if text.startswith("hf:") else str(Path(text).resolve())
        return _shown(text)
    return f"{type(source).__name__} ({getattr(source, 'num_rows', '?')} rows)"


def _home_checked(home: str | os.PathLike | None, job_dir: Path | None) -> Path:
    """The job home (`home`, else $RUNNER_HOME or ./jobs), once the folder the job goes in (`job_dir`, else a
    folder of the home) is known not to be a Drive not mounted yet (storage.refuse_unmounted_drive)."""
    root = Path(home) if home is not None else default_home()
    storage.refuse_unmounted_drive(job_dir if job_dir is not None else root)
    return root


def _check_args(
    params: Any,
    truncate: str,
    name: str | None,
    unit_rows: Any,
    priority: Any,
    chat: bool,
    chat_template: Any = None,
) -> str:
    """The job kind `params` stands for, once every submit argument is checked (ParamError naming it)."""
    kind = KINDS.get(type(params))
    if kind is None:
        raise TypeError(f"params must be GenerationParams, ScoreParams or EmbedParams, not {type(params).__name__}"
                        f"{as_params_hint(params)}")  # fmt: skip
    check_truncate(truncate)
    if kind == "score" and truncate != "none":
        raise ParamError("truncate", "not used by score jobs: a text over the context window is scored whole, in "
                         f"windows ({option('stride', None)}), and a pair's context keeps its end to fit.")  # fmt: skip
    if name is not None:
        check_name(name, "job name")
    if unit_rows is not None and (
        isinstance(unit_rows, bool) or not isinstance(unit_rows, int) or unit_rows < 1
    ):
        raise ParamError("unit_rows", f"unit_rows must be an integer >= 1, got {unit_rows!r}.")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ParamError("priority", f"priority must be an integer, got {priority!r}.")
    if chat and kind != "generate":
        raise ParamError("chat", f"chat is for generate jobs, not {kind} jobs.")
    if chat_template is not None and kind != "generate":
        raise ParamError("chat_template", f"chat_template is for generate jobs, not {kind} jobs.")
    return kind


def _refuse_a_name_like_an_id(job_dir: Path | None) -> None:
    """A new job's own folder (-o) named like a job id is refused: a folder so named is taken for that job's (as
    a job home names each job's folder), so the new job (another id) would be refused as another's at every run
    (pass 87)."""
    if job_dir is not None and jobdir.JOB_ID.fullmatch(job_dir.name):
        raise RunnerError(
            f"{job_dir}: a folder named like a job id is taken for that job's folder (as in a job home), and a new "
            f"job gets an id of its own; name the folder otherwise (e.g. {job_dir.with_name('out-' + job_dir.name)})"
        )


def _as_it_was(existing: Job, job_dir: Path) -> str:
    """What the job already in `job_dir` offers as it was: its results when it is completed (`runner work` had
    nothing to finish there), else `runner work` to finish it."""
    where = shlex.quote(str(job_dir))
    try:
        completed = existing.state().state == "completed"
    except RunnerError:
        completed = False
    if completed:
        return f"it is completed: `runner results {where}` has its results"
    return f"or run `runner work --job {where}` to finish it as it was"


def _folder_options() -> str:
    """Where a job's own folder is given, as the reader gives it."""
    if on_the_command_line():
        return "-o, or --job-dir for run-batch"
    return "output= of runner.run, job_dir= of runner.submit and runner.run_batch"


def _already_submitted(job_dir: Any, root: Path, name: str | None, identity: dict[str, Any]) -> Job | None:
    """The job this submit repeats (same folder or same name, same inputs and settings), to be resumed; a
    different job in that folder or under that name is refused, saying what differs."""
    if job_dir is not None:
        existing = _existing_job(Path(job_dir))
        if existing is not None and not _same_job(existing, identity):
            raise RunnerError(
                f"{job_dir} holds a job with other inputs or settings{_differences(existing, identity)}; resuming "
                f"it with these is refused (use another job folder: {_folder_options()}; "
                f"{_as_it_was(existing, Path(job_dir))})"
            )
        return existing
    if name is None:
        return None
    existing = _named_job(root, name)
    if existing is not None and not _same_job(existing, identity):
        raise RunnerError(
            f"the name {name!r} is taken by job {existing.id}, submitted with other inputs or settings"
            f"{_differences(existing, identity)}; choose another {option('name', None)}"
        )
    return existing


def _same_job(job: Job, identity: dict[str, Any]) -> bool:
    """Whether `job` was submitted with these inputs and settings. A job submitted without a seed runs with the
    one it drew (`runner status` shows it): asking for that seed asks for the same job (pass 123: refused as
    "seed None, now N")."""
    if job.meta.get("fingerprint") == _fingerprint(identity):
        return True
    seed, stored = identity["params"].get("seed"), job.meta.get("params") or {}
    unseeded = "seed" in stored and stored["seed"] is None
    if seed is None or not unseeded or seed != job.meta.get("seed"):
        return False
    return job.meta.get("fingerprint") == _fingerprint(
        {**identity, "params": {**identity["params"], "seed": None}}
    )


def _differences(job: Job, identity: dict[str, Any]) -> str:
    """What differs between a stored job and this submit, as far as job.json says: " (seed 0, now 42; ...)"."""
    read, reading = job.meta["input"], ("prompt_field", "template", "truncate")
    # (a setting to_dict leaves out when off is said at its value: "min_p 0.0, now 0.05", not None)
    params = {**OFF_UNSAID, **(job.meta.get("params") or {})}
    stored = {"model": job.meta.get("model"), **{k: read.get(k) for k in reading}, "chat": read.get("chat", False),
              "revision": job.meta.get("model_revision_asked"), **params}  # fmt: skip
    asked = {"model": identity["model"], **{k: identity[k] for k in reading}, "chat": identity.get("chat", False),
             "revision": identity.get("revision"), **OFF_UNSAID, **identity["params"]}  # fmt: skip
    # (a DataFrame, Dataset or list of rows has no file: job.json describes it, "DataFrame (3 rows)")
    what = "the input file's content" if os.path.isabs(str(read.get("path", ""))) else "the input's content"
    said = [what] if read.get("sha256") != identity["input_sha256"] else []
    said += settings_apart(stored, asked)
    said += [
        f"{k} {read[k]!r}, now {identity[k]!r}"
        for k in ("skip_invalid", "served_model_names")
        if k in read and read[k] != identity[k]
    ]  # fmt: skip (recorded since 2026-12-02)
    schemas = stored.get("json_schema"), asked.get("json_schema")
    if schemas[0] == schemas[1] and _json(schemas[0]) != _json(schemas[1]):
        said.append("json_schema's key order (the order its object is generated in)")
    if read.get("chat_template") != identity.get("chat_template"):
        said.append(
            "the chat template"
            if read.get("chat_template") and identity.get("chat_template")
            else "chat_template " + ("given, now none" if read.get("chat_template") else "none, now given")
        )
    return f" ({'; '.join(said)})" if said else ""


def settings_apart(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """ "seed 0, now 42" for each key the two differ in, in key order: what a refusal or note of other settings
    names (a submit of a job already stored, an interrupted job beside a new one, a Ray checkpoint's stage)."""
    return [f"{k} {earlier.get(k)!r}, now {now.get(k)!r}" for k in sorted(earlier.keys() | now.keys())
            if earlier.get(k) != now.get(k)]  # fmt: skip


def _same_job_in_home(root: Path, fingerprint: str) -> Job | None:
    """The newest unnamed job of the home with these inputs and settings that did not fail and was not
    cancelled (those the user re-queues with `runner retry`), if any. Such a job that is broken but repairable
    is an error saying so (a new job would compute its rows again, the broken one left behind)."""
    for path in sorted(jobdir.job_folders(root), reverse=True):  # ids start with the submit time
        job = None
        try:
            job = Job.open(path)
            if _carries_on(job, fingerprint) and not jobdir.is_copy_in_home(job):
                return job
        except ModelUnreadable:
            raise  # not a new job for a model that cannot be read for now: the old one may well be its job
        except jobdir.BrokenJob as e:
            meta = job.meta if job is not None else jobdir._read_json_or_none(path / JOB_BACKUP)
            ours = (
                isinstance(meta, dict) and meta.get("name") is None and meta.get("fingerprint") == fingerprint
            )
            if e.repairable and ours:
                raise RunnerError(f"job {path.name} of this file and these settings is broken ({e}); `runner "
                                  f"repair {shlex.quote(str(path))}` brings it back, then this command carries it "
                                  "on (-o DIR makes a new job instead)") from None  # fmt: skip
        except RunnerError:
            continue
    return None


def _carries_on(job: Job, fingerprint: str) -> bool:
    """Whether `runner run` of these inputs and settings (`fingerprint`) without -o or --name carries `job` on:
    an unnamed job of them that did not fail, was not cancelled, and whose model is unchanged."""
    if job.name is not None or job.meta.get("fingerprint") != fingerprint:
        return False
    return job.state().state not in (JobState.FAILED, JobState.CANCELLED) and _same_model(job)


def _same_model(job: Job) -> bool:
    """`model_unchanged`, a model that cannot be read counting as changed: a model retrained in place, or
    another ./model from another folder, makes a new job rather than return the old one's results. Transient
    read errors are retried (`reading_model`), then ModelUnreadable. A hub model's job is compared with the
    hub's newest snapshot (an update pushed makes a new job), unless that is not here whole, offline
    (`hub_newest_here`): then with its own, as `runner work` runs it (a new machine whose cache the hint's `hf
    download --revision COMMIT` filled, an update half downloaded), where a new submit failed or made a job that
    cannot run here."""
    then = f"; run the same command again once it can be read (it carries on job {job.id})"
    asked = job.meta.get("model_revision_asked")
    try:
        newest = job.spec.revision is None or reading_model(
            lambda: hub_newest_here(job.spec.model, asked), job.spec.model, then
        )
        return reading_model(lambda: model_unchanged(job, pinned=not newest), job.spec.model, then)
    except ModelUnreadable:
        raise
    except (OSError, RunnerError):
        return False


def model_unchanged(job: Job, pinned: bool = True) -> bool:
    """The job's model folder still holds the model it was submitted with: its fingerprint, computed the way
    the job's was (fingerprint_version), a hub model's at the snapshot the job pinned (`pinned`: what its
    workers load; else at the newest, or the branch or tag the job asked for, as a new submit would take it:
    `runner run` of the same file makes a new job when the hub model moved on). OSError when the model cannot
    be read. A fingerprint that differs is computed once more, from no kept GGUF table, before the model is
    taken for another: one torn read of a model file on a network mount failed the job for good as "not the
    one it was submitted with", and made `runner run` start a new job beside the one it should carry on."""
    from .models import has_fingerprint

    revision = job.spec.revision if pinned else job.meta.get("model_revision_asked")
    stored = job.meta.get("model_fingerprint")
    return has_fingerprint(job.spec.model, stored, job.options.trust_remote_code, revision)


def _pinned_facts(
    model: str, options: EngineOptions, kind: str, params: Any, chat_template: str | None, asked: str | None
) -> tuple[dict[str, str], tuple[Any, Any, int | None]]:
    """job.json's model_fingerprint and, for a hub model, the commit its job is pinned to ("model_revision":
    the one branch, tag or commit `asked` names now, else the newest), with the `_model_facts` of that
    snapshot. The commit is the snapshot the model's files load from now, read before the tokenizer that
    tokenizes the prompts loads it, as its workers will: an update pushed while the job runs (a README edit is a
    commit too) neither mixes two models' rows nor fails the job."""
    resolve_model(model)  # (a folder or file that is not there is said as such, not taken for a hub id)
    revision = hub_snapshot(model, asked) if is_hub_model(model) else None
    facts = _model_facts(model, options, kind, params, chat_template, revision)
    pinned = {"model_fingerprint": model_fingerprint(model, facts[0], revision=revision)}
    if revision:
        pinned.update(model_revision=revision, **({"model_revision_asked": asked} if asked else {}))
    return pinned, facts


def _layout(prep: _Preparer, meta: dict[str, Any]) -> int:
    """The job folder format of a job stored now: what its rows need (`_Preparer.job_format`), and at least
    jobdir.FINGERPRINT_FORMAT where its model fingerprint is of a version a runner from before would compute
    otherwise (it failed the job as another model's, under the workers of now)."""
    needed = prep.job_format(meta["format"])
    if int(fingerprint_version(meta.get("model_fingerprint"))) >= jobdir.FINGERPRINT_FORMAT_FROM:
        return max(needed, jobdir.FINGERPRINT_FORMAT)
    return needed


def _held_by(
    holder: str, job_dir: Any, root: Path, name: str | None, identity: dict[str, Any], target: Path
) -> Job:
    """The job another submit of the same name or -o folder stored while this one was being written."""
    existing = _already_submitted(job_dir, root, name, identity)
    if existing is None:
        held = f"the job name {name!r} is held by job {holder}" if job_dir is None else f"{target} is taken"
        raise RunnerError(f"{held}, which cannot be opened")
    return existing


def _model_facts(
    model: str,
    options: EngineOptions,
    kind: str,
    params: Any,
    chat_template: str | None = None,
    revision: str | None = None,
) -> tuple[Any, Any, int | None]:
    """(config, tokenizer, context window) of a causal LM (a hub model's at snapshot `revision`), refusing a
    generation that leaves no room for a prompt in the window. The tokenizer renders chats with
    `chat_template` when one is given."""
    from .batching import use_chat_template

    # (refuses remote code unless --trust-remote-code)
    config = load_config(model, options.trust_remote_code, revision)
    check_causal_lm(model, config)
    check_weights(model, options.allow_pickle)
    tokenizer = load_tokenizer(model, options.trust_remote_code, revision)
    if chat_template is not None:
        use_chat_template(tokenizer, chat_template)
    window = context_window(config, tokenizer)
    if kind == "generate":
        params.prompt_budget(window)
        constraints.check_tokenizer(params, tokenizer)
    return config, tokenizer, window


def _write_job(
    target: Path,
    meta: dict[str, Any],
    reader: Any,
    prep: Any,
    skip_invalid: bool,
    tokenizer: Any,
    claim: _Claim | None = None,
) -> str | None:
    """Write the job in a temp folder beside `target` (prompts.parquet, errors.jsonl, job.json and its backup),
    then move it into place in one rename: a killed submit leaves no half job. A job with a `claim` (its name,
    or the file and settings of `runner run` without -o) first claims it (`_claim_name`); returns the id of
    the job holding it when another submit has it, or the folder's name when another submit moved its job into
    `target` first (nothing is written then), else None."""
    storage.retry(lambda: target.parent.mkdir(parents=True, exist_ok=True), f"create {target.parent}")
    jobdir.remove_dead_submits(target.parent)
    tmp = target.parent / jobdir.submit_temp_name(target.name)
    try:
        # (a name of this submit's own: one that is there was made by this call; inside the try, so that a
        # stop landing as the folder is made does not leave it for a day: pass 70)
        storage.ensure_dir(tmp)
        storage.write_json(tmp / ".owner.json", jobdir.Owner.me("submit").as_dict(), durable=False)
        for sub in jobdir.FOLDERS:
            storage.ensure_dir(tmp / sub)
        written = _write_prompts(reader, prep, tmp, skip_invalid)
        params = prep.params
        seed = getattr(params, "seed", None)
        meta = {"format": jobdir.FORMAT, **meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "runner_version": __version__}  # fmt: skip
        meta["input"].update({
            "rows": written.rows, "invalid": written.invalid,
            "invalid_sha256": storage.file_sha256(tmp / jobdir.INVALID) if written.invalid else None,
            "json_columns": written.json_columns, "reading": reader.reading,
            "renamed_columns": written.renamed,
            **_noted(written, reader.batch_file, meta["kind"]),
            "messages": reader.saw_messages,  # a row went through the chat template (jobs before per-row `request`)
            # (not said of a Batch file: its /v1/completions requests ask for raw prompts, and --chat is refused)
            "raw_prompts_to_chat_model": bool(meta["kind"] == "generate" and not reader.saw_messages
                                              and not reader.batch_file and getattr(tokenizer, "chat_template", None)),
        })  # fmt: skip
        meta.update({
            "sample_auto": prep.sample_auto, "row_sampling": ROW_SAMPLING,
            "format": _layout(prep, meta), jobdir.WHOLE_LAST_WINDOW: meta["kind"] == "score",
            "samples": written.samples or getattr(params, "num_return_sequences", 1),
            "results": written.results, "per_row_n": written.per_row_n, "outputs": written.outputs,
            "seed": seed if seed is not None else secrets.randbits(63),
            "prompts_sha256": storage.file_sha256(tmp / PROMPTS),
        })  # fmt: skip
        meta["spec_sha256"] = jobdir.spec_checksum(meta)
        jobdir.stamp_prompts(tmp, meta["prompts_sha256"])  # `runner status` need not hash it again
        storage.write_json(tmp / JOB_BACKUP, meta)
        storage.write_json(tmp / JOB_FILE, meta)
        storage.remove(tmp / ".owner.json")
        _flush_inputs(tmp)
        holder = _claim_name(target.parent, claim, target.name, tmp.name) if claim is not None else None
        if holder is not None:
            return holder
        try:
            # an empty -o folder the user made beforehand (anything else was refused above), unless another
            # submit to the same folder removed it first
            if not _remove_if_empty(target):
                return target.name
            _move_into_place(tmp, target, meta["id"])
        except FileNotFoundError:
            if claim is None:
                raise
            # this submit slept past its claim, and the submit that took the claim over set its folder aside
            # first (`_fence_stale_submit`): that submit's job holds the claim now
            return _claim_name(target.parent, claim, target.name, None)
        except OSError as e:  # another submit to the same -o folder moved its job in first
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return target.name
        return None
    except storage.StorageError as e:  # (a full disk): named by the job's folder, not the temp one being made
        e.args = (str(e).replace(str(tmp), str(target)), *e.args[1:])
        raise
    finally:
        _ENDED.add(tmp.name)
        # (gone once moved into place; no look first: one failing for a moment raised its OSError over a job
        # stored, pass 208. What cannot be removed now, remove_dead_submits tidies later)
        shutil.rmtree(tmp, ignore_errors=True)


# The temp folders of the submits of this process that have ended: a claim of this process naming one is what an
# earlier call left when it was interrupted (a notebook's stop button: the kernel lives on; pass 68)
_ENDED: set[str] = set()


def _remove_if_empty(folder: Path) -> bool:
    """Remove `folder` if it is empty (nothing there is fine too); False when it holds something: another submit
    to the same -o folder moved its job in first. Transient errors retried (one failed the whole submit: pass
    49); a removal whose reply was lost is done."""

    def op() -> bool:
        try:
            folder.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        return True

    return storage.retry(op, f"remove the empty folder {folder}")


def _flush_inputs(folder: Path) -> None:
    """prompts.parquet and errors.jsonl to the disk, and the folder's entries: a job is self-contained (its
    input file may go away), so a power cut after submit must not leave them empty (pass 122; job.json and its
    backup are written durably)."""
    for name in (PROMPTS, jobdir.INVALID):
        if (folder / name).exists():
            storage.retry(lambda name=name: storage.fsync_file(folder / name), f"write {folder / name}")
    storage.fsync_dir(folder)


def _move_into_place(tmp: Path, target: Path, job_id: str) -> None:
    """os.replace(tmp, target), transient errors retried, then the home's entry made durable. A rename that
    took effect though the mount reported an error (its reply lost) is done: the job is there, and saying it
    failed made users submit it twice."""
    for delay in (*storage.RETRY_DELAYS, None):
        try:
            os.replace(tmp, target)
            storage.fsync_dir(target.parent)
            return
        except OSError as e:
            if e.errno not in storage.TRANSIENT:
                raise
            if storage.kind(tmp) is None and _job_id_in(target) == job_id:
                return
            if delay is None:
                raise
            time.sleep(delay)


def _job_id_in(folder: Path) -> str | None:
    """The id of the job in `folder`; None when no job.json reads there (none, or not a job's). Transient errors
    are retried, never "not ours": a rename that landed though its reply was lost was then tried again, met its
    temp folder gone, and the submit said it failed with its job in place (found by an adversarial pass)."""
    try:
        meta = storage.read_json(folder / JOB_FILE)
    except ValueError:
        return None
    except storage.StorageError as e:
        if isinstance(e.__cause__, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return None
        raise
    return meta.get("id") if isinstance(meta, dict) else None


NAMES = jobdir.NAMES  # in the home: NAME.N.json, the claims on a job name; the newest (highest N) holds it
STALE_CLAIM_SECONDS = 600  # a claim whose job never appeared is taken over after this (its submit was killed)


# .names/~FINGERPRINT.N.json: the claims of `runner run` without -o or --name (no job name has a "~")
RERUN_CLAIM = "~"


@dataclass(frozen=True)
class _Claim:
    """What a submit claims in the home's .names folder: its job name, or (`runner run FILE` without -o or
    --name) its file and settings, so that two such runs at the same moment (two Colab VMs running one notebook
    on one Drive folder) store one job and both work on it."""

    key: str  # the claim files' stem: the name, or RERUN_CLAIM + the inputs and settings' fingerprint
    label: str  # what messages call it
    counts: Callable[[str], bool] | None = None  # whether the holder's job still holds it (None: always)

    @classmethod
    def of_name(cls, name: str | None) -> _Claim | None:
        return None if name is None else cls(name, f"the job name {name!r}")

    @classmethod
    def of_rerun(cls, root: Path, fingerprint: str) -> _Claim:
        """Held by a job the same command carries on (`_carries_on`): once that job failed or was cancelled,
        or its model changed, the next run takes the claim over with a new job."""

        def counts(holder: str) -> bool:
            try:
                return _carries_on(Job.open(root / holder), fingerprint)
            except ModelUnreadable:
                raise
            except RunnerError:
                return False

        return cls(RERUN_CLAIM + fingerprint, "this file with these settings", counts)


def _claim_name(root: Path, claim: _Claim, job_id: str, temp: str | None) -> str | None:
    """Make `job_id` the job holding `claim` in the home: two submits of one name at the same time (two Colab
    VMs running one notebook) then store one job, not two. Returns None when the claim is ours, else the id of
    the job that holds it; RunnerError while the holder's job has not appeared yet.

    A claim is a file .names/KEY.N.json created exclusively and whole (jobdir.create_exclusive); the newest
    (highest N) is the one that counts. It is taken over by creating KEY.N+1.json, exclusively again, once
    its job never appeared and its submit is provably gone or STALE_CLAIM_SECONDS old (a submit killed in
    between), or it is damaged, or its job no longer holds it (`claim.counts`): two submits taking one claim
    over race for the same N+1, and only one creates it. Nothing is ever deleted, so nobody can remove a claim
    another has just made. A claim names its submit's temp folder (`temp`), which a takeover sets aside first:
    a submit that only slept then finds its folder gone, and never moves a second job into the home.
    (`temp` None: claim nothing, only say who holds it.)"""
    folder = root / NAMES
    if folder.is_symlink():
        raise RunnerError(f"{folder} is a symbolic link; runner does not follow links out of the job home")
    storage.ensure_dir(folder)
    # a claim's temp file left by a submit stopped before its removal (pass 70)
    jobdir.remove_old_temps(folder)
    record = {"job": job_id, "owner": jobdir.Owner.me("submit").as_dict(), "temp": temp}
    for _ in range(8):
        newest = jobdir.newest_name_claim(folder, claim.key)
        n = 0 if newest is None else newest + 1
        if newest is not None:
            path = folder / f"{claim.key}.{newest}.json"
            held = jobdir._read_json_or_none(path) if storage.kind(path) == "file" else None
            holder = held.get("job") if isinstance(held, dict) else None
            if _in_home(root, holder):
                if claim.counts is None or claim.counts(holder):
                    return holder
            elif temp is None or not (_stale_claim(path, held) or _left_unfilled(path, temp)):
                raise RunnerError(
                    f"{claim.label} is claimed by another submit (job {holder or '?'}) that is being written "
                    f"right now or was killed; run this submit again in a moment (it then returns that job). A "
                    f"killed submit's claim frees itself within {STALE_CLAIM_SECONDS // 60} minutes, or delete "
                    f"{path} if no other submit is running"
                )
            elif not _fence_stale_submit(root, held):
                continue  # its job was moved in meanwhile: it holds the claim after all
        if temp is None:
            raise RunnerError(f"{claim.label} was taken over by another submit while this one was stopped; run "
                              "this submit again (it then returns that submit's job)")  # fmt: skip
        if jobdir.create_exclusive(folder / f"{claim.key}.{n}.json", record):
            return None
    raise RunnerError(f"cannot claim {claim.label} in {folder}: its claims keep changing")


def _fence_stale_submit(root: Path, held: Any) -> bool:
    """Before taking a stale claim over: set aside the temp folder its submit builds its job in, so that the
    submit, if it only slept (a suspended VM), finds it gone instead of moving a second job of the claim into the
    home. False when that folder is gone because its job was moved in just now (the claim is held after all)."""
    temp = held.get("temp") if isinstance(held, dict) else None
    if not (isinstance(temp, str) and jobdir.is_submit_temp(temp)):
        return True  # a claim of an older version, or damaged: nothing to fence
    aside = root / f"{temp}{jobdir.TAKEN_OVER}"
    try:
        storage.retry(lambda: os.rename(root / temp, aside), f"set aside {root / temp}")
    except storage.StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        return not _in_home(root, held.get("job"))
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _in_home(root: Path, job_id: Any) -> bool:
    """Whether the job a claim names has been moved into the home."""
    return isinstance(job_id, str) and job_id in {p.name for p in jobdir.job_folders(root)}


def _stale_claim(path: Path, held: Any) -> bool:
    """A claim to take over: its submit provably gone, or the claim old (a damaged one too: where hard links
    are missing, a claim is created empty and then written, so a young unreadable claim may be on its way)."""
    owner = jobdir.Owner.from_dict(held.get("owner")) if isinstance(held, dict) else None
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return True
    temp = held.get("temp") if isinstance(held, dict) else None
    if owner is not None and isinstance(temp, str) and temp in _ENDED and owner.is_this_process():
        return True  # an earlier call of this process, interrupted (a notebook cell stopped and run again)
    # (dated ahead by more than the wait itself, its date is not believed: a submit killed on a VM whose clock ran
    # days ahead kept its name claimed for days, while the message said ten minutes)
    return (owner is not None and owner.provably_dead()) or abs(age) > STALE_CLAIM_SECONDS


def _left_unfilled(path: Path, temp: str) -> bool:
    """An empty claim no live submit can still fill: where hard links are missing a claim is created empty and
    then filled, and a submit killed in between left it so, refusing its name (or its file and settings) for
    STALE_CLAIM_SECONDS to every later submit, told to run again "in a moment" (pass 183). Its submit keeps its
    temp folder in the home until the claim is filled; so when the home holds no such folder but ours (`temp`)
    whose process may be alive (gone from this machine is provably dead; another machine's may live), and the
    claim is still empty after looking (filled meanwhile, its folder may have just moved in), its submit was
    killed in between."""
    if _size(path) != 0:
        return False
    for name in jobdir.scan(path.parent.parent, dirs=True):
        owned = storage.OWNED_TEMP.fullmatch(name)
        if owned is not None and name != temp and not storage.writer_gone(owned):
            return False
    return _size(path) == 0


def _size(path: Path) -> int | None:
    """The size of the file at `path`; None when nothing, or something else than a plain file, is there."""
    st = jobdir._lstat_or_none(path)
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


def _vocab_size(config: Any) -> int | None:
    """Rows of the model's input embedding: a token id past them is out of range for the model."""
    size = getattr(text_config(config), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def embedding_dim(config: Any) -> int | None:
    """How many values an embed job's vectors hold (scoring.embed_batch: the base model's last hidden state): its
    hidden size, but where a projection follows the last layer, that one's (OPT-350m: 512 of 1,024)."""
    cfg = text_config(config)
    return (
        getattr(cfg, "word_embed_proj_dim", None)
        or getattr(cfg, "hidden_size", None)
        or getattr(cfg, "n_embd", None)
    )


# --- the prompts file, a chunk at a time -----------------------------------------------------------------


@dataclass
class _Written:
    rows: int
    invalid: int
    json_columns: list[str]
    renamed: dict[str, str]
    samples: int = 0  # the most samples a row asks for
    results: int = 0  # result rows when done: sum of each row's samples
    per_row_n: bool = False  # some row asks for its own number of samples
    outputs: dict[str, bool] = field(default_factory=dict)  # optional result columns some row asks for
    # a plain file's columns read as settings -> the rows of the job giving one (submit names them: a data
    # column called `n` or `seed` gives rows samples or seeds of their own, adversarial pass 235); counted of
    # the rows written, not of those read (pass 240: a row --skip-invalid left out was counted)
    setting_columns: dict[str, int] = field(default_factory=dict)
    # rows whose messages end with an assistant message (fine-tuning data, its answer given): the model writes
    # the turn after it (submit says so, adversarial pass 247)
    assistant_last: int = 0
    # the passthrough columns named like `id` but not it (`ID`, `id `), when no row gave an id (pass 247)
    id_like: list[str] = field(default_factory=list)


def _noted(written: _Written, batch_file: bool, kind: str) -> dict[str, Any]:
    """meta["input"]'s facts for submit's notes on the file's shape (`_setting_columns_note`, `_assistant_last_note`,
    `_id_like_note`); none of a Batch file, whose requests say themselves what they ask for."""
    return {
        "setting_columns": {} if batch_file else written.setting_columns,
        "assistant_last": 0 if batch_file or kind != "generate" else written.assistant_last,
        "id_like_columns": [] if batch_file else written.id_like,
    }


def _sample_auto(params: Any) -> bool:
    """The user left sampling to be decided by the other settings (do_sample not given)."""
    return getattr(params, "_do_sample_given", None) is None


class _Problems:
    """Every invalid row of the file: counted, the first `PROBLEMS_KEPT` held for the error message, and, when
    the valid rows run anyway (--skip-invalid), each written to errors.jsonl as it is found, so a file with
    millions of bad rows needs no memory for them."""

    def __init__(self, errors_path: Path | None):
        self.count = 0
        self.kept: list[Problem] = []
        self.path = errors_path

    def add(self, problems: list[Problem]) -> None:
        if not problems:
            return
        self.count += len(problems)
        self.kept.extend(problems[: max(0, PROBLEMS_KEPT - len(self.kept))])
        if self.path is not None:
            storage.append_line(self.path, only_writer=True, line="\n".join(
                json.dumps({"id": p.id, "line": p.line, "field": p.field, "stage": "validate",
                            "error": "invalid_input", "message": p.message}, ensure_ascii=False)
                for p in problems
            ))  # fmt: skip


def _write_prompts(reader: PromptReader, prep: _Preparer, folder: Path, skip_invalid: bool) -> _Written:
    """`_write_rows`. Under `skip_invalid` the invalid rows go to errors.jsonl, whose bytes must not depend on
    who submitted (a repair writes it again and compares, a notebook's job repaired by `runner repair` too):
    their messages name settings as options (`--truncate left`) from Python as well."""
    with said_on_the_command_line() if skip_invalid else contextlib.nullcontext():
        return _write_rows(reader, prep, folder, skip_invalid)


def _prompts_writer(folder: Path, schema: Any) -> Any:
    """The ParquetWriter of the job's prompts.parquet (zstd), opened with `schema`."""
    import pyarrow.parquet as pq

    with _writing(folder / PROMPTS):
        return pq.ParquetWriter(storage.arrow_file(folder / PROMPTS, "wb"), schema, compression="zstd")


def _write_rows(reader: PromptReader, prep: _Preparer, folder: Path, skip_invalid: bool) -> _Written:
    """Read, check and tokenize the input a chunk at a time and write prompts.parquet into `folder` one row
    group per chunk. Raises InputError (after reading the whole file, so that every problem is listed) when
    a row is invalid and not `skip_invalid`, or when no row is valid.

    Once such a refusal is certain, later chunks are only validated: nothing will be written, and the file's
    own problems come back as fast as reading allows (as before streaming, when a file with invalid rows was
    refused before any tokenizing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = _Problems(folder / jobdir.INVALID if skip_invalid else None)
    columns = Passthrough(prep.kind, prep.fixed_names, reader.column_types())
    writer: pq.ParquetWriter | None = None
    rows = valid = 0  # rows written; rows found valid (written or not)
    # where the valid rows begin that were not tokenized (a refusal was certain)
    unmeasured: str | None = None
    settings: dict[str, int] = {}  # setting -> rows written that give it (`_Written.setting_columns`)
    # rows written whose messages end with an assistant message (`_Written.assistant_last`)
    answered = 0
    try:
        # (a job read before 11: its row groups as its submit wrote them, `runner repair` writing them again)
        for chunk in reader.chunks(ROW_GROUP_ROWS, CHUNK_TEXT_CHARS if reader.reading >= 11 else None):
            columns.register(chunk.columns)
            if problems.count and not skip_invalid:
                problems.add(chunk.problems)
                valid += len(chunk.rows)
                unmeasured = unmeasured or (f"{reader.name}:{chunk.rows[0].line}" if chunk.rows else None)
                continue
            prepared, token_problems = prep.prepare(reader.name, chunk.rows)
            problems.add(sorted(chunk.problems + token_problems, key=lambda p: p.line))
            valid += len(prepared)
            if not prepared or (problems.count and not skip_invalid):
                continue
            table = prep.table(prepared, rows)
            extra = columns.arrays([row for row, *_ in prepared])
            if writer is None:
                columns.freeze()
                writer = _prompts_writer(folder, pa.schema([*table.schema, *columns.fields()]))
            for f, arr in zip(columns.fields(), columns.written_arrays(extra, len(prepared)), strict=True):
                table = table.append_column(f, arr)
            with _writing(folder / PROMPTS):
                writer.write_table(table, row_group_size=len(prepared))
            rows += len(prepared)
            _count_settings(settings, prepared)
            answered += sum(_ends_with_assistant(row) for row, *_ in prepared)
    finally:
        if writer is not None:
            with _writing(folder / PROMPTS):
                writer.close()
    written_extra = prep.summary
    if not rows and not problems.count:
        raise InputError([Problem(reader.name, 0, None, "the file has no rows")], header="nothing to run")
    if problems.count and (not skip_invalid or not rows):
        header = None if valid else f"no valid rows in {reader.name}"  # (then --skip-invalid cannot help)
        raise InputError(problems.kept, header=header, total=problems.count, unmeasured=unmeasured,
                         note=_no_tokens_note(reader, problems.kept))  # fmt: skip
    if columns.rewrite:
        rewrite_passthrough(reader, folder / PROMPTS, columns)
    return _Written(
        rows,
        problems.count,
        columns.json_columns(),
        columns.renamed(),
        **written_extra(),
        setting_columns={k: n for k, n in settings.items() if n},
        assistant_last=answered,
        id_like=[] if reader.saw_ids else _id_like(list(columns.types)),
    )


MAX_TOKENS_FIELDS = ("max_tokens", "max_new_tokens", "max_completion_tokens")


def _no_tokens_note(reader: PromptReader, problems: list[Problem]) -> str | None:
    """Where a plain row asks for 0 new tokens (its prompt's log-probs alone, as lm-eval's loglikelihood and the
    OpenAI API's echo with max_tokens 0 ask): `runner score` does that. A Batch request with echo is pointed there
    by its own message (openai_batch.SCORE_INSTEAD); a plain row's said only "must be in [1, 1000000], got 0"."""
    if reader.batch_file or not any(
        p.field in MAX_TOKENS_FIELDS and p.message.endswith(", got 0.") for p in problems
    ):
        return None
    field = reader.prompt_field
    if on_the_command_line():
        how = "runner score INPUT -m MODEL" + (
            f" --text-field {shlex.quote(field)}" if field != "text" else ""
        )
    else:
        how = "runner.submit(INPUT, MODEL, runner.ScoreParams()" + (
            f", prompt_field={field!r})" if field != "text" else ")"
        )
    return (f"(a row asking for 0 new tokens asks for its prompt's log-probs alone: that is `runner score`'s "
            f"work, not a generate job's, which generates at least one token: {how} gives each text's logprob, "
            "and each token's in token_logprobs)")  # fmt: skip


def _count_settings(counts: dict[str, int], prepared: list[Any]) -> None:
    """Add to `counts` (setting -> rows, in the file's column order) the settings each row of `prepared` gives
    itself."""
    for row, *_ in prepared:
        for k, v in (row.raw_settings or {}).items():
            counts[k] = counts.get(k, 0) + (v is not None)


def _id_like(columns: list[str]) -> list[str]:
    """Of the input `columns` (a file where no row gave an id), those spelled like `id` but not it: `ID`, `Id`,
    `id ` (a spreadsheet's header), and `custom_id` (an OpenAI Batch line's id, in a plain file of prompts),
    which runner keeps as data."""
    return [c for c in columns if c != "id" and c.strip().lower() in ("id", "custom_id")]


def _ends_with_assistant(row: PromptRow) -> bool:
    """The row's messages end with an assistant message (its answer given, as fine-tuning data has it)."""
    return (
        bool(row.messages)
        and isinstance(row.messages[-1], dict)
        and row.messages[-1].get("role") == "assistant"
    )


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """pyarrow's write errors name no file ("Error writing bytes to file ... No space left on device"): say
    which one could not be written."""
    try:
        yield
    except OSError as e:
        raise storage.StorageError(f"cannot write {path}: {e.strerror or first_line(e)}", e.errno) from e


# A row that can be done: (row, text sent to the model, token ids, index of the first token to score).
_Prepared = tuple[PromptRow, str, list[int], int]


class _Preparer:
    """Turns a chunk of valid rows into what a job runs: the text sent to the model, its token ids (one
    tokenizer call per chunk), and for scoring the first scored token; a row that cannot be done becomes a
    Problem naming its field."""

    def __init__(self, kind: str, tokenizer: Any, params: Any, window: int | None, truncate: str, field: str,
                 sample_auto: bool = False, vocab: int | None = None, answers_as: tuple[str, Any] | None = None):  # fmt: skip
        self.kind, self.tokenizer, self.params = kind, tokenizer, params
        # (the model and served names a plain row answers with in `--format openai`; None: nothing recorded per
        # row, as for Ray Data's stages, which export no Batch file)
        self.answers_as = answers_as
        self.window, self.truncate, self.field = window, truncate, field
        self.sample_auto, self.vocab = sample_auto, vocab
        # how its rows are prepared (inputs.READING): `runner repair` of a job read before prepares them as its
        # submit did (before 6, a score pair's context of no tokens stayed []; before 5 and 6, messages rendered
        # otherwise: batching.render_prompt)
        self.reading = READING
        # some row gives temperature / top_p / top_k / min_p (jobdir.ROW_SAMPLING_FORMAT)
        self.sampling_rows = False
        # the job or some row gives min_p (jobdir.MIN_P_FORMAT)
        self.min_p = bool(getattr(params, "min_p", 0))
        self.windowed = False  # some text is scored in rolling windows (jobdir.WHOLE_WINDOW_FORMAT)
        # the chunk's row settings made, by their JSON (`row_params`: a row's were made three times, for its prompt
        # budget, its count and its `n` column, two thirds of a submit of rows giving their own)
        self.made: dict[str, Any] = {}
        # Input columns are renamed away from every prompts.parquet column name, not only this kind's: a
        # `continuation` column of a generation job is passed through as `input_continuation`.
        self.fixed_names = PROMPT_COLUMNS
        self.max_n, self.results, self.per_row_n = 0, 0, False
        # The job's own settings ask for these columns (beam_score only once a row searches beams); rows add theirs.
        self.outputs = {**asked_outputs(params), "beam_score": False, "settings": False}

    def summary(self) -> dict[str, Any]:
        return {"samples": self.max_n, "results": self.results, "per_row_n": self.per_row_n,
                "outputs": self.outputs}  # fmt: skip

    def job_format(self, default: int) -> int:
        """The job folder format these rows need (jobdir.FORMAT and after): a runner from before what they use
        refuses the job instead of misreading it."""
        if self.windowed:
            return jobdir.WHOLE_WINDOW_FORMAT
        if self.min_p:
            return jobdir.MIN_P_FORMAT
        return jobdir.ROW_SAMPLING_FORMAT if self.sampling_rows else default

    def row_params(self, row: PromptRow) -> Any:
        """The row's own GenerationParams (the job's when it sets none); ParamError names the row's field."""
        from .params import row_params

        if not row.settings:
            return self.params
        self.sampling_rows = self.sampling_rows or any(f in row.settings for f in SAMPLING_FIELDS)
        self.min_p = self.min_p or "min_p" in row.settings
        try:
            key = _json(row.settings)
        except (TypeError, ValueError, RecursionError):  # (a Parquet decimal or bytes: its check names it)
            return row_params(self.params, self.sample_auto, row.settings)
        if key not in self.made:
            self.made[key] = row_params(self.params, self.sample_auto, row.settings)
        return self.made[key]

    def prepare(self, name: str, rows: list[PromptRow]) -> tuple[list[_Prepared], list[Problem]]:
        """The rows that can be done, as (row, text, token ids, first scored token), and the problems of
        the others."""
        out, problems = [], []
        self.made.clear()  # (held for one chunk: its rows', which `table` writes next)
        for row, result in zip(rows, self._prepare(rows), strict=True):
            result = self._in_vocabulary(result)
            if isinstance(result, _RowProblem):
                # (a Batch line's field as its body spells it: input, not text)
                field, message = openai_batch.body_named(
                    row.body_names, result.field or self.field, str(result)
                )
                problems.append(Problem(name, row.line, field, message, row.id))
            else:
                out.append((row, *result))
                self._count(row)
        return out, problems

    def _in_vocabulary(self, result: Any) -> Any:
        """A row whose token ids reach past the model's embedding (a tokenizer with tokens added after the model
        was made, never resized) is a problem now: on a GPU such an id is a device-side assert that takes the
        worker's whole process down, on a CPU an IndexError."""
        if (
            isinstance(result, _RowProblem)
            or self.vocab is None
            or not result[1]
            or max(result[1]) < self.vocab
        ):
            return result
        bad = max(result[1])
        return _RowProblem(f"token id {bad} ({self.tokenizer.convert_ids_to_tokens(bad)!r}) is outside the model's "
                           f"vocabulary of {self.vocab:,} ids: its tokenizer has tokens its embedding lacks "
                           "(resize the model's token embeddings to the tokenizer, or leave such tokens out)")  # fmt: skip

    def _count(self, row: PromptRow) -> None:
        """Samples and optional outputs this row adds to the job."""
        if self.kind != "generate":
            self.max_n, self.results = 1, self.results + 1
            return
        p = self.row_params(row)
        n = p.num_return_sequences
        self.per_row_n = self.per_row_n or n != self.params.num_return_sequences
        self.max_n, self.results = max(self.max_n, n), self.results + n
        for name, on in asked_outputs(p).items():
            self.outputs[name] |= on
        self.outputs["settings"] |= bool(row.settings)

    def table(self, prepared: list[_Prepared], first: int) -> Any:
        """The fixed columns of prompts.parquet for these rows; `first` is the `_row` of the first."""
        import pyarrow as pa

        rows = [p[0] for p in prepared]
        ids = [p[2] for p in prepared]
        columns: dict[str, Any] = {
            ORDER: pa.array(range(first, first + len(rows)), pa.int64()),
            "line": pa.array([r.line for r in rows], pa.int64()),
            "id": pa.array([r.id for r in rows], pa.string()),
            "prompt": pa.array([p[1] for p in prepared], pa.string()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "prompt_tokens": pa.array([len(i) for i in ids], pa.int32()),
        }
        if self.kind == "score":
            columns["score_from"] = pa.array([p[3] for p in prepared], pa.int32())
            columns["continuation"] = pa.array([r.continuation for r in rows], pa.string())
        if self.kind == "generate":
            columns["settings"] = pa.array([_json(r.settings) for r in rows], pa.string())
            columns["n"] = pa.array([self.row_params(r).num_return_sequences for r in rows], pa.int32())
        columns["request"] = pa.array([_json(self._request(r)) for r in rows], pa.string())
        return pa.table(columns)

    def _request(self, row: PromptRow) -> dict[str, Any] | None:
        """The row's Batch request; for another row of a generate job, the endpoint it answers as in `--format
        openai`: a chat completion where it went through the chat template (messages, `--chat`), else a text
        completion (its prompt continued as typed). Per row: one file may hold both kinds of row."""
        if row.request is not None or self.kind != "generate" or self.answers_as is None:
            return row.request
        url = openai_batch.CHAT if row.messages is not None else openai_batch.COMPLETIONS
        return openai_batch.plain_request(url, *self.answers_as)

    def _prepare(self, rows: list[PromptRow]) -> list[tuple[str, list[int], int] | _RowProblem]:
        """(text sent to the model, token ids, index of the first token to score) per row, or a _RowProblem
        naming the field when the row cannot be done."""
        if self.kind == "score":
            return self._prepare_score(rows)
        from .batching import encode_many, render_prompt

        texts: list[str | _RowProblem] = []
        for row in rows:
            try:
                texts.append(render_prompt(row.prompt, row.messages, self.tokenizer, self.reading >= 5,
                                           self.reading >= 6))  # fmt: skip
            except RunnerError as e:
                texts.append(_RowProblem(str(e), "messages"))
        encoded: dict[int, list[int]] = {}
        for chat in (False, True):  # rendered chat templates hold their special tokens already
            todo = [i for i, t in enumerate(texts) if isinstance(t, str) and bool(rows[i].messages) == chat]
            ids = encode_many(self.tokenizer, [texts[i] for i in todo], chat)  # type: ignore[misc]
            encoded.update(zip(todo, ids, strict=True))
        window = self.window
        generate = self.kind == "generate"
        out: list[tuple[str, list[int], int] | _RowProblem] = []
        for i, (row, text) in enumerate(zip(rows, texts, strict=True)):
            if isinstance(text, _RowProblem):
                out.append(text)
                continue
            try:
                params = self.row_params(row) if generate else self.params
                budget = params.prompt_budget(window) if generate else window
                if params is not self.params:  # (the job's own was judged with the model: `_model_facts`)
                    constraints.check_tokenizer(params, self.tokenizer)
            except ParamError as e:
                # (a job read before 6: refused in its submit's words, as its errors.jsonl has them)
                now = self.reading >= 6
                said = _row_field(row, e.param, str(e) if now else said_before_6(str(e)), now)
                fld, message = openai_batch.body_named(row.body_names, *said)
                out.append(_RowProblem(message, fld))
                continue
            ids = encoded[i]
            if budget is not None and len(ids) > budget:
                if self.truncate != "left":
                    out.append(self._too_long(row, params, len(ids), window))
                    continue
                ids = keep_end(self.tokenizer, ids, budget, chat=bool(row.messages))
            out.append(_RowProblem("prompt encodes to no tokens") if not ids else (text, ids, 0))
        return out

    def _too_long(self, row: PromptRow, params: Any, tokens: int, window: int) -> _RowProblem:
        """A prompt over the context window less its max tokens: what to lower is the row's own max tokens
        field where it sets one (--max-new-tokens would change nothing for it: pass 42), else the option."""
        field, it = "messages" if row.messages else None, "it"
        if self.kind != "generate":
            need, fix = ", which", ""
        elif "max_new_tokens" in (row.settings or {}):
            field = openai_batch.body_named(row.body_names, *_row_field(row, "max_new_tokens", ""))[0]
            need, fix, it = (
                f"; with its {field}={params.max_new_tokens} it",
                f", lower its {field}",
                "the prompt",
            )
        else:
            need, fix = (
                f"; with max_new_tokens={params.max_new_tokens} it",
                f", lower {option('max_new_tokens', None)}",
            )
        return _RowProblem(f"prompt is {tokens} tokens{need} exceeds the model's context window of {window} tokens "
                           f"(shorten {it}{fix}, or pass {option('truncate', 'left')})", field)  # fmt: skip

    def _prepare_score(self, rows: list[PromptRow]) -> list[tuple[str, list[int], int] | _RowProblem]:
        from .scoring import fit_context, no_continuation, split_contexts, tokenize_texts

        pairs = [r for r in rows if r.continuation is not None]
        texts = [r for r in rows if r.continuation is None]
        now = self.reading >= 6  # (a job read before: its rows prepared and refused as its submit did)
        split = iter(
            split_contexts(self.tokenizer, [(r.prompt or "", r.continuation or "") for r in pairs], now)
        )
        plain = iter(tokenize_texts(self.tokenizer, [r.prompt or "" for r in texts],
                                    add_bos=self.params.add_bos, add_eos=self.params.add_eos))  # fmt: skip
        window = self.window
        out: list[tuple[str, list[int], int] | _RowProblem] = []
        for row in rows:
            assert row.prompt is not None
            if row.continuation is not None:
                ctx, cont = next(split)
                try:
                    ctx = fit_context(ctx, cont, window)  # as lm-eval: keep the end of the context
                except RunnerError as e:
                    why = no_continuation(self.tokenizer, row.continuation) if now and not cont else str(e)
                    out.append(_RowProblem(why, "continuation"))
                    continue
                out.append((row.prompt, ctx + cont, len(ctx)))
                continue
            ids = next(plain)
            # nothing but the BOS / EOS added: the text's characters are deleted by the tokenizer's normalizer
            if now and len(ids) < 2 and len(ids) == self.params.add_bos + self.params.add_eos:
                out.append(_RowProblem("text encodes to no tokens (the tokenizer deletes its characters)"))
            elif len(ids) < 2:
                out.append(_RowProblem("text has no token to score (it needs a context token before it)"))
            else:  # a text longer than the window is scored in strided windows at work time
                self.windowed = self.windowed or (self.window is not None and len(ids) > self.window + 1)
                out.append((row.prompt, ids, 1))
        return out


def asked_outputs(params: Any) -> dict[str, bool]:
    """The optional result columns these settings ask for (results.generation_schema's): alternatives, prompt
    log-probs, constraint_complete (a structured-output constraint) and beam_score (beam search)."""
    from .constraints import kind_of

    return {"top_logprobs": getattr(params, "logprobs", None) is not None,
            "prompt_logprobs": bool(getattr(params, "prompt_logprobs", False)),
            "constraint": kind_of(params) is not None, "beam_score": getattr(params, "num_beams", 1) > 1}  # fmt: skip


def _json(value: Any) -> str | None:
    # not sort_keys: a JSON schema's key order is the order its object is generated in
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _row_field(row: PromptRow, param: str, message: str, paired: bool = True) -> tuple[str, str]:
    """The field of the input row a setting came from (its own spelling: `n`, not num_return_sequences), and
    the setting's message spelled so ("n must be in [1, 1024], got 0."). `paired` (since reading 6): OpenAI chat's
    logprobs true beside top_logprobs names top_logprobs (a job read before named logprobs)."""
    from .params import ROW_SETTINGS, cited_as

    # (a spelling given as null, or an empty cell of its column, is not the one at fault)
    given = {k for k, v in (row.raw_settings or {}).items() if v is not None}
    message = cited_as(message, {ROW_SETTINGS[k]: k for k in given if ROW_SETTINGS.get(k, k) != k})
    spelled = [k for k, v in ROW_SETTINGS.items() if v == param and k in given]
    if paired and isinstance((row.raw_settings or {}).get("logprobs"), bool) and "top_logprobs" in spelled:
        spelled.remove("logprobs")  # OpenAI chat's pair: logprobs true, and the count in top_logprobs
    if not spelled:  # the job's setting clashing with one the row gave ("regex ... num_beams > 1"): the row's
        named = [
            k for k in sorted(given) if k in ROW_SETTINGS and re.search(rf"\b{ROW_SETTINGS[k]}\b", message)
        ]
        if not named and param == "json_object" and "response_format" in given:
            named = ["response_format"]  # ({"type": "json_object"}: the only way a row gives json_object)
        return (named[0] if named else param), message
    # (response_format's message names the json_schema in it, which is at fault)
    if spelled[0] == "response_format" or not re.match(rf"{param}[ =]", message):
        return spelled[0], message
    return spelled[0], spelled[0] + message[len(param) :]


class _RowProblem(Exception):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def submit_warnings(job: Job) -> list[str]:
    """What a user should hear about a job just submitted, before it runs."""
    out = []
    if job.meta.get("input", {}).get("raw_prompts_to_chat_model") and job.meta["input"].get("chat_template"):
        out.append(
            f"WARNING: {option('chat_template', None)} renders 'messages' rows (chat requests) and "
            f"{option('chat')} prompts, but every row is a plain prompt: the template is not used. Pass "
            f"{option('chat')} to send each prompt as a user message through it (run, submit)."
        )
    elif job.meta.get("input", {}).get("raw_prompts_to_chat_model"):
        out.append(
            "WARNING: the model has a chat template (an instruct/chat model) but every row is a raw prompt; such "
            f"models often answer raw text with nothing useful. Pass {option('chat')} to send each prompt as a "
            "user message (or give `messages` rows)."
        )
    out.extend(_data_notes(job))
    out.extend(_setting_columns_note(job))
    out.extend(_assistant_last_note(job))
    out.extend(_id_like_note(job))
    out.extend(_tab_table_note(job))
    try:  # (the job is stored: a home that fails through the retries now costs the notes, not the submit's exit)
        beside = _beside(job)
        out.extend(_interrupted_siblings(job, beside))
        twin = _twin(job, beside)
    except RunnerError as e:
        out.append(f"note: the other jobs of {job.dir.parent} could not be read for the notes on them ({e})")
        twin = None
    if twin is not None:
        cancel = command(_home_option(job), "cancel", job.id)
        out.append(
            f"WARNING: job {twin.id} (queued, submitted {twin.spec.created}) has the same file "
            "and settings: this is a second job, and `runner work` computes both. Running a notebook's cells again? "
            f"Give {option('name', ...)}, so that a rerun returns its job; `{cancel}` drops this one."
        )

    unused = _unused_model_defaults(job)
    if unused:
        given = [option(k, v) for k, v in unused.items()]
        options = " ".join(given) if on_the_command_line() else f"GenerationParams({', '.join(given)})"
        out.append(
            f"note: the model's generation_config.json asks for {', '.join(f'{k}={v}' for k, v in unused.items())}"
            f"{' (sampling)' if 'temperature' in unused or 'top_k' in unused else ''}, which this job does not use: "
            f"runner applies only the settings given (greedy unless asked), so a job never depends on a file beside "
            f"the weights. To use them, pass {options}"
        )
    return out


def _data_notes(job: Job) -> list[str]:
    """`submit_warnings`' notes on input columns named like settings that a generate (or embed) job keeps as data."""
    if job.spec.kind not in ("generate", "embed"):
        return []
    import pyarrow.parquet as pq

    # (read once: each note's helper read prompts.parquet's schema again)
    columns = passthrough_columns(job.read_prompts(pq.read_schema))
    if job.spec.kind == "embed":
        return _request_notes(columns, EMBED_REQUEST_ONLY_COLUMNS)
    out = []
    data = _length_columns(columns)
    if data:
        why = ("a row's own limits are max_new_tokens (or max_tokens) and min_new_tokens, which count new tokens only "
               "(transformers' max_length and min_length count the prompt too)")  # fmt: skip
        out.append(_kept_as_data([repr(c) for c in data], why))
    near = _near_setting_columns(columns)
    if near:
        out.append(
            _kept_as_data(near, 'a row\'s settings have these exact names (README, "Settings per row")')
        )
    out += _request_notes(columns, REQUEST_ONLY_COLUMNS)
    for column in (c for c in NOT_ROW_SETTINGS if c in columns):
        out.append(_kept_as_data([repr(column)], NOT_ROW_SETTINGS[column]))
    lacking = _columns_runner_has_no_setting_for(columns)
    if lacking:
        none = {1: "no such setting", 2: "neither"}.get(len(lacking), "none of them")
        why = f"runner has {none} (other tools' names; a row's settings are those of README, \"Settings per row\")"
        out.append(_kept_as_data([repr(c) for c in lacking], why))
    return out


def _setting_columns_note(job: Job) -> list[str]:
    """submit's note naming the columns of a plain file read as each row's settings, and in how many rows: a
    data column that happens to be called `n`, `seed` or `temperature` (a question's number, a data set's
    seed) changes what those rows compute, said nowhere but the README (adversarial pass 235)."""
    given = job.meta.get("input", {}).get("setting_columns") or {}
    if not given:
        return []
    total = job.meta["input"].get("rows", 0)
    said = ", ".join(f"{name!r} ({counted(n, 'rows')}{'' if n == total else f' of {total:,}'})"
                     for name, n in given.items())  # fmt: skip
    return [
        f'note: read as each row\'s own settings: {said} (README, "Settings per row"); a column of these names '
        "that is your data, not a setting, needs another name"
    ]


def _assistant_last_note(job: Job) -> list[str]:
    """submit's note on the chat rows whose last message is the assistant's (fine-tuning data, its answer given):
    the chat template renders it as a finished turn and the model writes the turn after it, as vLLM and the
    OpenAI API do; one who meant the answer written again learned it from the results (adversarial pass 247)."""
    n, total = job.meta.get("input", {}).get("assistant_last") or 0, job.meta["input"].get("rows", 0)
    if not n:
        return []
    if n == total:
        said, jq, pandas = f"every row ({total:,})", ".messages |= .[:-1]", "m[:-1]"
    else:
        said = f"{counted(n, 'rows')} of {total:,}"
        jq = '.messages |= (if .[-1].role == "assistant" then .[:-1] else . end)'
        pandas = "m[:-1] if m[-1]['role'] == 'assistant' else m"
    return [
        f"note: {said} end{'s' if n in (1, total) else ''} with an assistant message (an answer given, as in fine-tuning "
        "data): the model writes the turn after it, as vLLM and the OpenAI API do, not that answer again (nor "
        "does runner continue it, as transformers' continue_final_message would). To have the answer written "
        f"instead, drop that last message: jq -c '{jq}' IN.jsonl > OUT.jsonl, or in pandas "
        f"df['messages'] = df['messages'].map(lambda m: {pandas})"
    ]


def _id_like_note(job: Job) -> list[str]:
    """submit's note on a column named like the id but not `id` (`ID`, `Id`, `id `: Excel's and pandas'
    headers) in a file where no row gave an id: runner reads only `id`, so each id is the row's number and the
    column is kept as data, said nowhere (adversarial pass 247)."""
    names = job.meta.get("input", {}).get("id_like_columns") or []
    if not names:
        return []
    one, first = len(names) == 1, names[0]
    listed = in_words([repr(n) for n in names])
    return [
        f"note: {listed} look{'s' if one else ''} like the id column, but runner reads ids from a column named "
        "exactly 'id': each row's id is its number (its line in the file, its row in a Parquet file or a "
        f"DataFrame) and {listed} {'is' if one else 'are'} kept as data. To use it as the ids, rename it: "
        f"df = df.rename(columns={{{first!r}: 'id'}}) in pandas, or jq -c '.id = .[{json.dumps(first)}] | "
        f"del(.[{json.dumps(first)}])' IN.jsonl > OUT.jsonl"
    ]


def _tab_table_note(job: Job) -> list[str]:
    """submit's note on a .txt file whose first line is the header of a tab-separated table (`id<TAB>prompt`:
    Excel's "Unicode text" and "Text (Tab delimited)" exports are .txt files): each line of a .txt is one prompt
    or text, tabs and all, so the header and every row went in whole, said nowhere (adversarial pass 271)."""
    from .inputs import _free_csv_name, _text_lines

    given = job.meta.get("input", {})
    path, field = given.get("path"), given.get("prompt_field") or "prompt"
    if not path or given.get("template") or Path(path).suffix.lower() != ".txt":
        return []
    try:
        with contextlib.closing(_text_lines(Path(path))) as lines:
            first = next((text for _, text, _ in lines if text is not None), None)
    except (OSError, RunnerError, ValueError):  # (gone, or unreadable now: no note, as for stdin's copy)
        return []
    names = [] if first is None or "\t" not in first else [c.strip().casefold() for c in first.split("\t")]
    if not {"id", "prompt", "text", field.casefold()} & set(names):
        return []
    header = first.rstrip("\r\n")
    return [
        f"note: the first line of {Path(path).name}, {header!r}, reads like the header of a tab-separated table: "
        "a .txt file is one prompt (or text) a line, tabs and all, so that line and each row went in whole. A "
        f"table goes in as a CSV: pandas.read_csv({path!r}, sep='\\t', dtype=str, keep_default_na=False)"
        f".to_csv({str(_free_csv_name(Path(path)))!r}, index=False)"
    ]


def _kept_as_data(names: list[str], why: str) -> str:
    """submit's note that the columns `names` (as shown) are kept as data, not settings, and why."""
    one = len(names) == 1
    listed = in_words(names)
    return f"note: {listed} {'is' if one else 'are'} kept as data, not {'a setting' if one else 'settings'}: {why}"


def _length_columns(columns: list[str]) -> list[str]:
    """Of a generate job's input `columns`, max_length / min_length (model.generate()'s habit, the tutorials'),
    which it keeps as data: no row setting has those names."""
    return [c for c in ("max_length", "min_length") if c in columns]


# Fields of an OpenAI /v1/completions or /v1/chat/completions request that no row setting has: a plain row's such
# column is its data (an OpenAI Batch file's request takes or refuses them from its body), and submit says what
# each would have asked for (a row's suffix and tools went unsaid: adversarial pass 256)
_NO_TOOLS = "runner gives the chat template no tool definitions and parses no tool calls"
REQUEST_ONLY_COLUMNS = {
    "best_of": "runner has no best_of: -n N (or a row's n) returns all N samples, each with its cumulative_logprob "
    "to choose by",
    "echo": "a plain row's `--format openai` answer never repeats its prompt (the results keep it in `prompt`, a "
    "row's prompt_logprobs its log-probs); an OpenAI Batch file's /v1/completions request takes echo",
    "suffix": "runner inserts nothing before a suffix: the prompt is continued from its end",
    "tools": _NO_TOOLS, "tool_choice": _NO_TOOLS, "functions": _NO_TOOLS, "function_call": _NO_TOOLS,
    # (a chat row's went unsaid, where a Batch body's is refused: adversarial pass 261)
    "reasoning_effort": "runner gives the chat template no reasoning effort (a template that reads one, as "
    "gpt-oss's does, renders its own default)",
    "verbosity": "runner has no verbosity: max_new_tokens (a row's max_tokens) bounds an answer's length",
}  # fmt: skip
# GenerationParams fields that are no row setting under their own name: a row's column of one is its data, and
# submit says how a row asks for it (a row's `"json_object": true` ran unconstrained, said nowhere)
NOT_ROW_SETTINGS = {
    "json_object": 'a row asks for a JSON object with response_format {"type": "json_object"} (json_object is '
    "GenerationParams' name, --json the command line's)",
}


# ... and of an OpenAI /v1/embeddings request, for an embed job's plain rows (adversarial pass 256)
EMBED_REQUEST_ONLY_COLUMNS = {
    "dimensions": "runner's vectors have the model's full hidden size (an OpenAI Batch file's dimensions is refused)",
    "encoding_format": "a plain row's `--format openai` answer gives its vector as numbers; an OpenAI Batch file's "
    "/v1/embeddings request takes encoding_format",
}


def _request_notes(columns: list[str], fields: dict[str, str]) -> list[str]:
    """The note on the input `columns` that are OpenAI request `fields` (REQUEST_ONLY_COLUMNS, or
    EMBED_REQUEST_ONLY_COLUMNS for an embed job), which a plain row keeps as data: what each would have asked for."""
    request = [c for c in fields if c in columns]
    if not request:
        return []
    whys = dict.fromkeys(fields[c] for c in request)  # (tools and tool_choice: said once)
    why = "a plain row is no OpenAI request" + "".join(f"; {w}" for w in whys)
    return [_kept_as_data([repr(c) for c in request], why)]


def _near_setting_columns(columns: list[str]) -> list[str]:
    """Of a generate job's input `columns`, those named almost like a row setting (`Temperature`,
    `max_new_token`, `top-p`, as an Excel sheet has them), each with the setting it looks like: kept as data, so
    every row ran with the job's settings and nothing said why."""
    import difflib

    out = []
    for column in columns:
        key = column.strip().lower().replace("-", "_").replace(" ", "_")
        # (a letter off a word of 3 is another word: a 'top' column was asked "did you mean 'stop'?")
        near = (
            [key]
            if key in ROW_SETTINGS
            else [RENAMED_ROW_SETTINGS[key]]
            if key in RENAMED_ROW_SETTINGS
            else []
        )
        if not near and len(key) > 3:
            near = difflib.get_close_matches(key, ROW_SETTINGS, n=1, cutoff=0.85)
        if (
            near
            and column not in ROW_SETTINGS
            and column not in ("max_length", "min_length", *SETTINGS_RUNNER_LACKS)
        ):
            out.append(f"{column!r} (did you mean {near[0]!r}?)")
    return out


def _columns_runner_has_no_setting_for(columns: list[str]) -> list[str]:
    """Of a generate job's input `columns`, those named as another tool's setting runner lacks (vLLM's
    `ignore_eos`, `stop_token_ids`, GenerationConfig's `eos_token_id`): kept as data, so each row ran without it,
    and nothing said so (a Batch body giving one is refused)."""
    return [c for c in columns if c in SETTINGS_RUNNER_LACKS]


def _beside(job: Job) -> list[Job]:
    """The other jobs in this unnamed job's home of the same file and kind, newest first, read once for the notes
    on them (`_twin`, `_interrupted_siblings`). None for a named job (a named submit returns its job instead) or
    one in a folder of its own (`-o DIR`: `runner work` runs no such job, and folders beside it are the user's own
    choice, pass 44)."""
    if job.name is not None or not jobdir.JOB_ID.fullmatch(job.dir.name):
        return []
    mine = (job.meta.get("kind"), (job.meta.get("input") or {}).get("sha256"))
    out = []
    for path in sorted(jobdir.job_folders(job.dir.parent), reverse=True):
        if path == job.dir:
            continue
        try:
            other = Job.open(path)
            if (other.meta.get("kind"), (other.meta.get("input") or {}).get("sha256")) == mine and not (
                jobdir.is_copy_in_home(other)
            ):
                out.append(other)
        except RunnerError:
            continue
    return out


def _home_option(job: Job) -> Path | None:
    """The --home a command on a job beside this one needs: its job home, None for the one found without."""
    home = job.dir.parent
    return None if home.resolve() == jobdir.default_home().resolve() else home


def _twin(job: Job, beside: list[Job]) -> Job | None:
    """Another job beside this unnamed one in its job home, queued or running, of the same file, model and
    settings (an unseeded one the same though each picks its own seed): a notebook's cells run again after a
    VM's death."""
    mine = _same_work(job.meta)
    for other in beside:
        try:
            if _same_work(other.meta) == mine and other.state().state is JobState.QUEUED:
                return other
        except RunnerError:
            continue
    return None


def _interrupted_siblings(job: Job, beside: list[Job]) -> list[str]:
    """A note on each job beside this unnamed one in its home that was interrupted on the same file (queued with
    rows done) under other settings: a cell run again after Ctrl-C with one setting changed said only "starting
    job B", not that A, the job it was meant to carry on, was not (its rows done are not B's) and stays queued
    for `runner work` to compute beside B (pass 235)."""
    out = []
    home = _home_option(job)
    for other in reversed(beside):
        try:
            if (other.name is not None or _same_work(other.meta) == _same_work(job.meta)
                    or other.state().state is not JobState.QUEUED):  # fmt: skip
                continue
            done = jobdir.job_progress(other)
        except RunnerError:
            continue
        if done.done:
            out.append(f"note: job {other.id} (interrupted, {done.done:,}/{done.total:,} {other.spec.count_noun} "
                       f"done) is of the same file with other settings ({_settings_apart(other.meta, job.meta)}), so "
                       f"this job does not carry it on; it stays queued, and `runner work` computes it too: "
                       f"`{command(home, 'cancel', other.id)}` drops it")  # fmt: skip
    return out


def _settings_apart(old: dict[str, Any], new: dict[str, Any]) -> str:
    """ "max_new_tokens 2, now 3; ...": the settings (and model, and how the file is read) two jobs differ in."""
    theirs, mine = dict(old.get("params") or {}), dict(new.get("params") or {})
    theirs["model"], mine["model"] = old.get("model"), new.get("model")
    for k in _READING:
        theirs[k], mine[k] = (old.get("input") or {}).get(k), (new.get("input") or {}).get(k)
    apart = settings_apart(theirs, mine)
    return "; ".join(apart[:3]) + ("; ..." if len(apart) > 3 else "")


def _same_work(meta: dict[str, Any]) -> str:
    """What a job computes, as job.json says: kind, model, settings (a seed as given: None when runner picked
    one), the input and how it is read."""
    read = meta.get("input") or {}
    return json.dumps([meta.get("kind"), meta.get("model"), meta.get("params") or {},
                       [read.get(k) for k in _READING]])  # fmt: skip


_READING = ("sha256", "prompt_field", "template", "truncate", "chat", "chat_template", "skip_invalid",
            "served_model_names")  # fmt: skip


MODEL_SAMPLING = ("temperature", "top_k", "top_p", "min_p")  # what model.generate() applies when it samples
MODEL_PENALTIES = ("repetition_penalty", "no_repeat_ngram_size")  # what it applies either way


def _unused_model_defaults(job: Job) -> dict[str, Any]:
    """The settings the model's generation_config.json gives (what `model.generate()` would apply) that this
    generate job left at runner's defaults and so does not apply: {field: the model's value}."""
    if job.kind != "generate":
        return {}
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(job.spec.model, local_files_only=True, **at(job.spec.revision))
    except Exception:  # no generation_config.json (or a .gguf file): nothing to say
        return {}
    given, default = job.params, GenerationParams()
    greedy_asked = given.temperature == 0  # (--temperature 0: greedy on purpose)
    suggested = (
        {k: getattr(gen, k, None) for k in MODEL_SAMPLING} if gen.do_sample and not greedy_asked else {}
    )
    suggested.update({k: v for k, v in gen.to_diff_dict().items() if k in MODEL_PENALTIES})
    return {k: v for k, v in suggested.items()
            if v is not None and v != getattr(default, k) and getattr(given, k) == getattr(default, k)}  # fmt: skip


def _existing_job(path: Path) -> Job | None:
    """The job in an -o folder, None when it is new or empty (transient read errors retried: storage.kind)."""
    if storage.kind(path / JOB_FILE) == "file" or storage.kind(path / JOB_BACKUP) == "file":
        with jobdir.naming_broken(path):
            return Job.open(path)
    there = storage.kind(path)
    if there is not None and (there != "dir" or storage.listdir(path)):
        raise RunnerError(f"{path} exists and is not a runner job folder; choose an empty or new -o folder")
    return None


def _named_job(root: Path, name: str) -> Job | None:
    """The job in the home whose id or name is `name`, if any (a name never equals another job's id)."""
    for path in jobdir.job_folders(root):
        try:
            job = Job.open(path)
        except RunnerError as e:
            meta = jobdir.spec_or_backup(path)  # its job.json damaged: its backup still says whose name it is
            if meta is not None and name in (meta.get("id"), meta.get("name")):
                raise RunnerError(f"the name {name!r} is job {path.name}'s, which is broken ({e}); `runner repair "
                                  f"{path}` mends it, then this submit returns it") from e  # fmt: skip
            continue
        if job.id == name or job.name == name:
            return job
    return None
