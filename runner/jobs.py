"""Jobs: the job home, job ids, and creating a self-contained job folder from a prompt file.

input file -> inputs.read_prompts -> `create_job` (render chat templates, tokenize once, check lengths against
the context window, store settings + a validated copy of the prompts) -> job folder -> worker.py

A job folder holds everything needed to run, resume, inspect or move the job without the original file:

    job.json          settings, model, fingerprints, seed: written once, at creation
    prompts.parquet   validated prompts: _row, line, id, prompt (final text), input_ids, prompt_tokens, passthrough
    errors.jsonl      rows that could not be done, with file/line/stage/reason
    shards/NNNNN-W.parquet, done/NNNNN-W.json   results and their completion markers (results.py)
    stats.json, log.txt

The job is built in a hidden temp folder and renamed into place, so a kill during submit never leaves a
half-made job that a worker would pick up.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, storage
from .errors import InputError, ParamError, Problem, RunnerError
from .inputs import read_prompts
from .params import EmbedParams, EngineOptions, GenerationParams, ScoreParams
from .results import ORDER, OUTPUT_COLUMNS, PROMPTS

if TYPE_CHECKING:
    import pyarrow as pa

JOB_FILE = "job.json"
KINDS = {GenerationParams: "generate", ScoreParams: "score", EmbedParams: "embed"}


def default_home() -> Path:
    """$RUNNER_HOME, else ./jobs."""
    return Path(os.environ.get("RUNNER_HOME") or "jobs")


def new_job_id() -> str:
    """Time-sortable and unique: 20261122-184455-3f9a."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_job_ref(ref: str) -> str:
    """A job id or name must be a plain folder name: no separators, no '..', nothing absolute."""
    if not ref or ref in (".", "..") or "/" in ref or "\\" in ref or ref.startswith(".") or "\0" in ref:
        raise RunnerError(f"invalid job id or name {ref!r}: use letters, digits, '-', '_' and '.'")
    return ref


@dataclass
class Job:
    dir: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Job:
        path = Path(path)
        if not (path / JOB_FILE).is_file():
            raise RunnerError(f"{path} is not a runner job folder (no {JOB_FILE})")
        return cls(path, storage.read_json(path / JOB_FILE))

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "generate")

    @property
    def params(self) -> Any:
        """GenerationParams, ScoreParams or EmbedParams, by the job's kind."""
        if self.kind == "generate":
            return GenerationParams.from_dict(self.meta["params"])
        return (ScoreParams if self.kind == "score" else EmbedParams)(**self.meta["params"])

    @property
    def samples(self) -> int:
        """Result rows per prompt."""
        return self.params.num_return_sequences if self.kind == "generate" else 1

    @property
    def options(self) -> EngineOptions:
        return EngineOptions(**self.meta["engine"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def total(self) -> int:
        """Result rows the job will have when done: valid prompts x samples."""
        return int(self.meta["input"]["rows"]) * self.samples

    def prompts(self) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.dir / PROMPTS)

    def log(self, line: str) -> None:
        storage.append_line(self.dir / "log.txt", time.strftime("%Y-%m-%d %H:%M:%S ") + line)


def find_job(ref: str, home: str | os.PathLike | None = None) -> Path:
    """The folder of a job given its id or name, in `home` (default: $RUNNER_HOME or ./jobs)."""
    check_job_ref(ref)
    root = Path(home) if home is not None else default_home()
    if (root / ref / JOB_FILE).is_file():
        return root / ref
    named = [p for p in _job_dirs(root) if storage.read_json(p / JOB_FILE).get("name") == ref]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise RunnerError(
            f"several jobs are named {ref!r}; use the job id ({', '.join(p.name for p in named)})"
        )
    raise RunnerError(f"no job {ref!r} in {root}")


def all_jobs(home: str | os.PathLike | None = None) -> list[Job]:
    """Every job in the home, oldest first (ids sort by creation time)."""
    root = Path(home) if home is not None else default_home()
    return [Job.open(p) for p in _job_dirs(root)]


def _job_dirs(root: Path) -> list[Path]:
    return [
        root / n for n in storage.listdir(root) if not n.startswith(".") and (root / n / JOB_FILE).is_file()
    ]


def model_fingerprint(spec: str, config: Any) -> str:
    """Identifies the model's weights well enough to refuse resuming a job on a different model: the config
    plus weight file names and sizes for a local folder, the hub commit for a hub id."""
    from .models import resolve_model

    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    path = Path(resolve_model(spec))
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(str(getattr(config, "_commit_hash", "") or spec).encode())
    return h.hexdigest()[:16]


def _fingerprint(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _passthrough_array(name: str, values: list[Any]) -> tuple[pa.Array, bool]:
    """Arrow array of a passthrough column; columns of mixed JSON types are kept as JSON text."""
    import pyarrow as pa

    try:
        return pa.array(values), False
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array(
            [None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()
        ), True


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
) -> Job:
    """Validate everything and store a queued job. Nothing invalid is ever stored.

    The kind of job follows from `params`: GenerationParams (generate; the default), ScoreParams (score the
    log-probability of texts, or of a continuation given a context) or EmbedParams (one vector per text).
    `prompt_field` is the column holding the prompt/text: `prompt` for generation, `text` otherwise.

    `job_dir` puts the job in that folder (as `runner run -o DIR`); an existing job there with the same
    inputs and settings is returned as is (to be resumed); one with other settings is refused.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .engine import check_causal_lm, context_window, load_config, load_tokenizer

    params = params or GenerationParams()
    kind = KINDS.get(type(params))
    if kind is None:
        raise TypeError(
            f"params must be GenerationParams, ScoreParams or EmbedParams, not {type(params).__name__}"
        )
    options = options or EngineOptions()
    if truncate not in ("none", "left"):
        raise ParamError("truncate", f"truncate must be none or left, got {truncate!r}.")
    if name is not None:
        check_job_ref(name)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ParamError("priority", f"priority must be an integer, got {priority!r}.")
    input_path = Path(input_path)
    if prompt_field is None:
        prompt_field = "prompt" if kind == "generate" else "text"
    prompt_set = read_prompts(
        input_path, prompt_field=prompt_field, template=template, skip_invalid=skip_invalid,
        messages_field="messages" if kind == "generate" else None,
        pair_fields=("context", "continuation") if kind == "score" else None,
    )  # fmt: skip
    identity = {
        "input_sha256": storage.file_sha256(input_path),
        "prompt_field": prompt_field,
        "template": template,
        "skip_invalid": skip_invalid,
        "truncate": truncate,
        "model": model,
        "params": params.to_dict(),
    }
    if job_dir is not None:
        job_dir = Path(job_dir)
        existing = _existing_job(job_dir)
        if existing is not None:
            if existing.meta.get("fingerprint") != _fingerprint(identity):
                raise RunnerError(
                    f"{job_dir} holds a job with other inputs or settings; resuming it with these is refused "
                    f"(use another -o folder, or run `runner work --job {job_dir}` to finish it as it was)"
                )
            return existing

    config = load_config(model, options.trust_remote_code)
    check_causal_lm(model, config)
    tokenizer = load_tokenizer(model, options.trust_remote_code)
    window = context_window(config, tokenizer)
    if kind == "generate" and window is not None and window - params.max_new_tokens < 1:
        raise ParamError(
            "max_new_tokens",
            f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's "
            f"context window of {window} tokens.",
        )
    problems: list[Problem] = list(prompt_set.problems)
    kept, texts, ids_list, froms = [], [], [], []
    for row in prompt_set.rows:
        try:
            text, ids, score_from = _prepare_row(kind, row, tokenizer, params, window, truncate)
        except _RowProblem as e:
            problems.append(Problem(prompt_set.path, row.line, e.field or prompt_field, str(e), row.id))
            continue
        kept.append(row)
        texts.append(text)
        ids_list.append(ids)
        froms.append(score_from)
    if problems and (not skip_invalid or not kept):
        raise InputError(problems)

    columns: dict[str, Any] = {
        ORDER: pa.array(range(len(kept)), pa.int64()),
        "line": pa.array([r.line for r in kept], pa.int64()),
        "id": pa.array([r.id for r in kept], pa.string()),
        "prompt": pa.array(texts, pa.string()),
        "input_ids": pa.array(ids_list, pa.list_(pa.int32())),
        "prompt_tokens": pa.array([len(i) for i in ids_list], pa.int32()),
    }
    if kind == "score":
        columns["score_from"] = pa.array(froms, pa.int32())
        columns["continuation"] = pa.array([r.continuation for r in kept], pa.string())
    json_columns, renamed = [], {}
    for col in prompt_set.columns:
        # An input column named like an output column (say `text`) keeps its data as `input_text`.
        out_name = f"input_{col}" if col in OUTPUT_COLUMNS[kind] or col in columns else col
        if out_name != col:
            renamed[col] = out_name
        arr, as_json = _passthrough_array(col, [r.extra.get(col) for r in kept])
        columns[out_name] = arr
        if as_json:
            json_columns.append(out_name)
    table = pa.table(columns)

    job_id = new_job_id()
    seed = getattr(params, "seed", None)
    seed = seed if seed is not None else secrets.randbits(63)
    meta = {
        "id": job_id,
        "name": name,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "priority": priority,
        "runner_version": __version__,
        "model": model,
        "model_fingerprint": model_fingerprint(model, config),
        "context_window": window,
        "embedding_dim": _hidden_size(config) if kind == "embed" else None,
        "input": {
            "path": str(input_path.resolve()),
            "sha256": identity["input_sha256"],
            "rows": len(kept),
            "invalid": len(problems),
            "prompt_field": prompt_field,
            "template": template,
            "truncate": truncate,
            "json_columns": json_columns,
            "renamed_columns": renamed,
        },
        "params": params.to_dict(),
        "seed": seed,
        "engine": options.to_dict(),
        "fingerprint": _fingerprint(identity),
    }
    target = Path(job_dir) if job_dir is not None else (Path(home) if home else default_home()) / job_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for sub in ("shards", "done"):
            (tmp / sub).mkdir()
        pq.write_table(table, tmp / PROMPTS, compression="zstd")
        for p in problems:
            storage.append_line(
                tmp / "errors.jsonl",
                json.dumps({"id": p.id, "line": p.line, "field": p.field, "stage": "validate",
                            "error": "invalid_input", "message": p.message}, ensure_ascii=False),
            )  # fmt: skip
        storage.write_json(tmp / JOB_FILE, meta)
        if target.exists():
            target.rmdir()  # an empty -o folder the user made beforehand (anything else was refused above)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    job = Job(target, meta)
    job.log(f"created {kind} job {job_id}: {len(kept)} rows x {job.samples} samples, model {model}")
    return job


def _hidden_size(config: Any) -> int | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)


class _RowProblem(Exception):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _prepare_row(kind: str, row: Any, tokenizer: Any, params: Any, window: int | None, truncate: str):
    """(text sent to the model, token ids, index of the first token to score) for one row; raises
    _RowProblem naming the field when the row cannot be done."""
    from .batching import encode, render_prompt

    if kind == "score":
        from .scoring import split_context, tokenize_text

        if row.continuation is not None:
            ctx, cont = split_context(tokenizer, row.prompt, row.continuation)
            if window is not None and len(ctx) + len(cont) > window:
                if len(cont) >= window:
                    raise _RowProblem(f"continuation is {len(cont)} tokens, over the context window of {window}",
                                      "continuation")  # fmt: skip
                ctx = ctx[len(ctx) + len(cont) - window :]  # as lm-eval: keep the end of the context
            return row.prompt, ctx + cont, len(ctx)
        ids = tokenize_text(tokenizer, row.prompt, add_bos=params.add_bos, add_eos=params.add_eos)
        if len(ids) < 2:
            raise _RowProblem("text has no token to score (it needs a context token before it)")
        return row.prompt, ids, 1  # longer than the window: scored in strided windows at work time
    try:
        text = render_prompt(row.prompt, row.messages, tokenizer)
    except RunnerError as e:
        raise _RowProblem(str(e), "messages") from e
    ids = encode(tokenizer, text, chat=row.messages is not None)
    budget = None if window is None else window - (params.max_new_tokens if kind == "generate" else 0)
    if budget is not None and len(ids) > budget:
        if truncate != "left":
            need = f"; with max_new_tokens={params.max_new_tokens} it" if kind == "generate" else ", which"
            lower = ", lower --max-new-tokens" if kind == "generate" else ""
            raise _RowProblem(
                f"prompt is {len(ids)} tokens{need} exceeds the model's context window of {window} tokens "
                f"(shorten it{lower}, or pass --truncate left)",
                "messages" if row.messages else None,
            )
        ids = ids[-budget:]  # keep the end of the prompt: the part the answer follows
    if not ids:
        raise _RowProblem("prompt encodes to no tokens")
    return text, ids, 0


def _existing_job(path: Path) -> Job | None:
    if (path / JOB_FILE).is_file():
        return Job.open(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunnerError(f"{path} exists and is not a runner job folder; choose an empty or new -o folder")
    return None
