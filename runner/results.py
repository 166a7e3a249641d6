"""Parquet result shards: their schema, how they are written and vouched for, and `load_results`.

engine.py (`Completion`s) -> `completions_table` -> `write_shard` -> shards/NNNNN-W.parquet + done/NNNNN-W.json
-> `load_results` (pandas, input order)

A shard counts only once its completion marker exists and agrees with the shard (size and row count from the
Parquet footer). The marker is written last, so a worker killed at any instant leaves either a counted shard or
files that are ignored and whose rows are generated again: nothing is lost and nothing counts twice.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import storage
from .errors import RunnerError, first_line
from .faults import fault_point
from .jobdir import ORDER

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from .tokens import TokenText

# Columns of a job's prompts table (jobs.py) that are not passed through to the results as they are.
PROMPT_COLUMNS = (
    ORDER, "line", "id", "prompt", "input_ids", "prompt_tokens", "score_from", "continuation", "settings", "n",
    "request",
)  # fmt: skip

# Output columns of a generation job, in order; passthrough input columns follow them.
GENERATION_COLUMNS = (
    "id", "sample", "prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
    "token_ids", "token_logprobs", "cumulative_logprob",
)  # fmt: skip


def passthrough_columns(prompts_schema: pa.Schema) -> list[str]:
    """The input columns a job carries through to its results unchanged."""
    return [n for n in prompts_schema.names if n not in PROMPT_COLUMNS]


def top_logprobs_type() -> pa.DataType:
    import pyarrow as pa

    BYTES = pa.list_(pa.uint8())  # a token's UTF-8 bytes as OpenAI gives them: a list of ints
    entry = pa.struct(
        [("token_id", pa.int32()), ("token", pa.string()), ("bytes", BYTES), ("logprob", pa.float32()),
         ("rank", pa.int32())]
    )  # fmt: skip
    return pa.list_(pa.list_(entry))


def generation_schema(
    top_logprobs: bool = False,
    prompt_logprobs: bool = False,
    settings: bool = False,
    constraint: bool = False,
    beam_score: bool = False,
) -> pa.Schema:
    """Result columns of a generation job; the optional ones exist when the job asked for them."""
    import pyarrow as pa

    schema = pa.schema(
        [
            (ORDER, pa.int64()),
            ("id", pa.string()),
            ("sample", pa.int32()),
            ("prompt", pa.string()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("stop_reason", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
            ("token_ids", pa.list_(pa.int32())),
            ("token_logprobs", pa.list_(pa.float32())),
            ("cumulative_logprob", pa.float64()),
        ]
    )
    if constraint:  # structured output: whether `text` satisfies the row's constraint (null: it has none)
        schema = schema.append(pa.field("constraint_complete", pa.bool_()))
    if top_logprobs:
        schema = schema.append(pa.field("top_logprobs", top_logprobs_type()))
    if prompt_logprobs:
        schema = schema.append(pa.field("prompt_logprobs", pa.list_(pa.float32())))
    if settings:
        schema = schema.append(pa.field("settings", pa.string()))  # the row's own settings, as JSON
    if beam_score:
        schema = schema.append(pa.field("beam_score", pa.float64()))  # null for rows without beam search
    return schema


@dataclass
class GeneratedRow:
    row: int  # index into the job's prompts table
    sample: int
    completion: Any  # engine.Completion


def completions_table(
    prompts: pa.Table,
    generated: list[GeneratedRow],
    texts: TokenText | None = None,
    outputs: dict[str, bool] | None = None,
    settings: list[str | None] | None = None,
) -> pa.Table:
    """One result row per (prompt, sample): generated columns, then the row's passthrough columns.
    `prompts` is the job's prompts table (jobs.py), indexed by `GeneratedRow.row`; `texts` gives the `token`
    (in place, after the prompt and the tokens before) and `bytes` of `top_logprobs`. `outputs` says which optional columns the
    job has (the same in every shard; rows that did not ask for one get null); `settings` is each prompt
    row's own settings (JSON), kept in a `settings` column when `outputs["settings"]`."""
    import pyarrow as pa

    idx = pa.array([g.row for g in generated], pa.int64())
    base = prompts.take(idx)
    comps = [g.completion for g in generated]
    cols = {
        ORDER: base.column(ORDER),
        "id": base.column("id"),
        "sample": pa.array([g.sample for g in generated], pa.int32()),
        "prompt": base.column("prompt"),
        "text": pa.array([c.text for c in comps], pa.string()),
        "finish_reason": pa.array([c.finish_reason for c in comps], pa.string()),
        "stop_reason": pa.array([c.stop_reason for c in comps], pa.string()),
        "prompt_tokens": base.column("prompt_tokens"),
        "completion_tokens": pa.array([len(c.token_ids) for c in comps], pa.int32()),
        "token_ids": pa.array([c.token_ids for c in comps], pa.list_(pa.int32())),
        "token_logprobs": pa.array([c.token_logprobs for c in comps], pa.list_(pa.float32())),
        "cumulative_logprob": pa.array([c.cumulative_logprob for c in comps], pa.float64()),
    }
    if outputs is None:
        outputs = {"top_logprobs": any(c.top_logprobs is not None for c in comps),
                   "prompt_logprobs": any(c.prompt_logprobs is not None for c in comps),
                   "constraint": any(c.constraint_complete is not None for c in comps)}  # fmt: skip
    outputs = {**outputs, "settings": bool(outputs.get("settings") and settings is not None)}
    cols.update(_optional_columns(generated, base, texts, outputs, settings))
    optional = ("top_logprobs", "prompt_logprobs", "settings", "constraint", "beam_score")
    schema = generation_schema(**{name: bool(outputs.get(name)) for name in optional})
    arrays = [cols[f.name].cast(f.type) for f in schema]
    for name in passthrough_columns(prompts.schema):
        schema = schema.append(prompts.schema.field(name))
        arrays.append(base.column(name))
    return pa.Table.from_arrays(arrays, schema=schema)


def _optional_columns(
    generated: list[GeneratedRow],
    base: pa.Table,
    texts: TokenText | None,
    outputs: dict[str, bool],
    settings: list[str | None] | None,
) -> dict[str, Any]:
    """The optional generation columns `outputs` asks for, by name."""
    import pyarrow as pa

    comps = [g.completion for g in generated]
    cols: dict[str, Any] = {}
    if outputs.get("constraint"):
        cols["constraint_complete"] = pa.array([c.constraint_complete for c in comps], pa.bool_())
    if outputs.get("top_logprobs"):
        prompt_ids = base.column("input_ids").to_pylist()
        cols["top_logprobs"] = pa.array(
            [_top_entries(c, ids, texts) for c, ids in zip(comps, prompt_ids, strict=True)],
            top_logprobs_type(),
        )
    if outputs.get("prompt_logprobs"):
        cols["prompt_logprobs"] = pa.array([c.prompt_logprobs for c in comps], pa.list_(pa.float32()))
    if outputs.get("settings"):
        cols["settings"] = pa.array([settings[g.row] for g in generated], pa.string())
    if outputs.get("beam_score"):
        cols["beam_score"] = pa.array([c.beam_score for c in comps], pa.float64())
    return cols


@functools.cache
def output_columns(kind: str) -> tuple[str, ...]:
    """Every column a result of a `kind` job may have, the optional ones included (`sample` of a score row,
    `beam_score`, `top_logprobs` ...): an input column of such a name passes through renamed, never beside it
    (two columns of one name made a completed job's shards unreadable)."""
    schema = {
        "generate": lambda: generation_schema(True, True, True, True, True),
        "score": score_schema,
        "embed": lambda: embed_schema(1),
    }[kind]()
    return tuple(schema.names)


def score_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        (ORDER, pa.int64()), ("id", pa.string()), ("sample", pa.int32()), ("text", pa.string()),
        ("context", pa.string()), ("continuation", pa.string()), ("logprob", pa.float64()),
        ("mean_logprob", pa.float64()), ("perplexity", pa.float64()), ("num_tokens", pa.int32()),
        ("is_greedy", pa.bool_()), ("token_ids", pa.list_(pa.int32())), ("tokens", pa.list_(pa.string())),
        ("token_bytes", pa.list_(pa.list_(pa.uint8()))), ("token_logprobs", pa.list_(pa.float32())),
    ])  # fmt: skip


def embed_schema(dim: int) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        (ORDER, pa.int64()), ("id", pa.string()), ("sample", pa.int32()), ("text", pa.string()),
        ("num_tokens", pa.int32()), ("embedding", pa.list_(pa.float32(), dim)),
    ])  # fmt: skip


def _with_passthrough(schema: pa.Schema, cols: dict[str, Any], prompts: pa.Table, base: pa.Table) -> pa.Table:
    import pyarrow as pa

    arrays = [cols[f.name].cast(f.type) if hasattr(cols[f.name], "cast") else pa.array(cols[f.name], f.type)
              for f in schema]  # fmt: skip
    for name in passthrough_columns(prompts.schema):
        schema = schema.append(prompts.schema.field(name))
        arrays.append(base.column(name))
    return pa.Table.from_arrays(arrays, schema=schema)


def _top_entries(c: Any, prompt_ids: list[int], texts: TokenText | None) -> list[list[dict[str, Any]]] | None:
    """A sample's `top_logprobs`: per step, each candidate's id, text in place, bytes, log-prob and rank."""
    if c.top_logprobs is None:
        return None
    from .tokens import PIECE_CONTEXT

    steps = []
    head = prompt_ids[-PIECE_CONTEXT:]
    for i, step in enumerate(c.top_logprobs):
        ids = [t for t, _, _ in step]
        # what step i reads after: the prompt's end and the tokens before it (a window, not all i of them)
        before = [*head, *c.token_ids[max(0, i - PIECE_CONTEXT) : i]]
        words = texts.alternatives(before, ids) if texts else [None] * len(ids)
        raw = texts.bytes(ids) if texts else [None] * len(ids)
        steps.append([{"token_id": t, "token": w, "bytes": None if b is None else list(b), "logprob": lp,
                       "rank": rk} for (t, lp, rk), w, b in zip(step, words, raw, strict=True)])  # fmt: skip
    return steps


def score_table(prompts: pa.Table, scored: list[GeneratedRow], texts: TokenText) -> pa.Table:
    """One row per scored text: `completion` of each GeneratedRow is a scoring.TextScore; `tokens` read in
    place (after the unscored tokens before them) and `token_bytes` are each token's exact UTF-8 bytes."""
    import pyarrow as pa

    from .scoring import perplexity

    base = prompts.take(pa.array([g.row for g in scored], pa.int64()))
    conts = base.column("continuation").to_pylist()
    prompt_ids, froms = base.column("input_ids").to_pylist(), base.column("score_from").to_pylist()
    inputs = base.column("prompt").to_pylist()
    res = [g.completion for g in scored]
    cols = {
        ORDER: base.column(ORDER), "id": base.column("id"), "sample": [0] * len(scored),
        "text": [None if c is not None else t for t, c in zip(inputs, conts, strict=True)],
        "context": [t if c is not None else None for t, c in zip(inputs, conts, strict=True)],
        "continuation": conts,
        "logprob": [r.logprob for r in res],
        "mean_logprob": [r.logprob / len(r.token_logprobs) for r in res],
        "perplexity": [perplexity(r.logprob / len(r.token_logprobs)) for r in res],
        "num_tokens": [len(r.token_ids) for r in res],
        "is_greedy": [r.is_greedy for r in res],
        "token_ids": [r.token_ids for r in res],
        "tokens": [texts.pieces(r.token_ids, ids[:f]) for r, ids, f in zip(res, prompt_ids, froms, strict=True)],
        "token_bytes": [[list(b) for b in texts.bytes(r.token_ids)] for r in res],
        "token_logprobs": [r.token_logprobs for r in res],
    }  # fmt: skip
    return _with_passthrough(score_schema(), cols, prompts, base)


def embed_table(prompts: pa.Table, embedded: list[GeneratedRow]) -> pa.Table:
    """One row per text: `completion` of each GeneratedRow is its vector (list of floats)."""
    import pyarrow as pa

    base = prompts.take(pa.array([g.row for g in embedded], pa.int64()))
    dim = len(embedded[0].completion)
    cols = {
        ORDER: base.column(ORDER), "id": base.column("id"), "sample": [0] * len(embedded),
        "text": base.column("prompt"), "num_tokens": base.column("prompt_tokens"),
        "embedding": [g.completion for g in embedded],
    }  # fmt: skip
    return _with_passthrough(embed_schema(dim), cols, prompts, base)


@contextlib.contextmanager
def write_local_shard(table: pa.Table, metadata: dict[str, str] | None = None) -> Iterator[tuple[Path, str]]:
    """Write `table` as a Parquet file on local disk, check it reads back with its row count, and yield
    (path, sha256) while the file exists: the caller copies it into the job home (storage.publish)."""
    import pyarrow.parquet as pq

    meta = {b"runner.rows": str(table.num_rows).encode()}
    for k, v in (metadata or {}).items():
        meta[f"runner.{k}".encode()] = v.encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    sweep_killed_local_temps()
    try:
        tmp = tempfile.mkdtemp(prefix=local_temp_prefix())
    except OSError as e:
        raise _local_disk_error(e) from e
    try:
        local = Path(tmp) / "shard.parquet"
        try:
            pq.write_table(table, storage.arrow_file(local, "wb"), compression="zstd")
        except OSError as e:  # pyarrow's errors name no file: say which disk it was, not "the job home"
            raise _local_disk_error(e) from e
        if pq.read_metadata(storage.arrow_file(local)).num_rows != table.num_rows:
            raise RunnerError("a results shard did not verify after writing (row count mismatch)")
        yield local, storage.file_sha256(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOCAL_SHARD_PREFIX = "runner-shard-"
LOCAL_EXPORT_PREFIX = "runner-export-"  # (openai_batch.export stages its two files there)
# a local shard lives for seconds; one this old was left by a killed process
LOCAL_SHARD_MAX_AGE = 24 * 3600.0


def local_temp_prefix(kind: str = LOCAL_SHARD_PREFIX) -> str:
    """runner-shard-TAG-PID- (or another `kind`): whose folder it is (storage.namespace_tag: a pid means this
    process only there)."""
    return f"{kind}{storage.namespace_tag()}-{os.getpid()}-"


@functools.cache
def sweep_killed_local_temps(kind: str = LOCAL_SHARD_PREFIX) -> None:
    """Once per process: remove the local folders of `kind` (shards; an OpenAI export's staged files) that killed
    processes left in the temp folder (a SIGKILL skips the cleanup; on one's own machine each kill left one, up
    to a shard's or a whole export's size): at once where the folder names a process of this machine that has
    ended, else once a day old; never a live process's (a worker stopped for a day, or a clock stepped a day
    ahead, had the folder it was writing taken; pass 131)."""
    import time

    root = Path(tempfile.gettempdir())
    try:
        found = [(p, time.time() - p.lstat().st_mtime) for p in root.glob(kind + "*") if not p.is_symlink()]
    except OSError:
        return
    for folder, age in found:
        owner = _owner(folder.name, kind)
        if not storage.pid_exists(owner) if owner is not None else age > LOCAL_SHARD_MAX_AGE:
            shutil.rmtree(folder, ignore_errors=True)


def _owner(name: str, kind: str) -> int | None:
    """The pid of the process of this machine that made the local folder `name` (`local_temp_prefix(kind)`);
    None where the name says no such thing (another boot or PID namespace, or another name): a pid means the
    same process only under the same tag."""
    tag, _, rest = name[len(kind) :].partition("-")
    pid = rest.partition("-")[0]
    return int(pid) if tag == storage.namespace_tag() and pid.isdigit() else None


def _local_disk_error(e: OSError) -> storage.StorageError:
    return storage.StorageError(
        f"cannot write a results shard in {tempfile.gettempdir()} ({e.strerror or first_line(e)}; TMPDIR names "
        "another folder)", e.errno, local=True,
    )  # fmt: skip


def valid_shards(job_dir: Path) -> list[Path]:
    """Shard files of the commits that count (accepted and verified), in name order."""
    from .jobdir import SHARDS, Job, read_ledger

    job = Job.open(job_dir)
    return [job.dir / SHARDS / c.shard for c in read_ledger(job).commits if c.shard]


def done_keys(job_dir: Path) -> set[tuple[int, int]]:
    """(row, sample) keys done (for small jobs and tests; workers use the ledger's masks)."""
    import numpy as np

    from .jobdir import Job, read_ledger

    rows, samples = np.nonzero(read_ledger(Job.open(job_dir)).done_mask())
    return set(zip(rows.tolist(), samples.tolist(), strict=True))


def empty_results(job: Any) -> pa.Table:
    """The schema of a job's results, with no rows."""
    import pyarrow.parquet as pq

    prompts_schema = job.read_prompts(pq.read_schema)
    params, kind = job.meta.get("params", {}), job.kind
    if kind == "score":
        schema = score_schema()
    elif kind == "embed":
        schema = embed_schema(int(job.meta.get("embedding_dim") or 0))
    else:
        outputs = job.meta.get("outputs") or {}
        schema = generation_schema(bool(outputs.get("top_logprobs", params.get("logprobs") is not None)),
                                   bool(outputs.get("prompt_logprobs", params.get("prompt_logprobs"))),
                                   bool(outputs.get("settings")), bool(outputs.get("constraint")),
                                   bool(outputs.get("beam_score")))  # fmt: skip
    for name in passthrough_columns(prompts_schema):
        schema = schema.append(prompts_schema.field(name))
    return schema.empty_table()


def rows_ledger(job: Any) -> Any:
    """The ledger the results are read from (`shard_tables`): its shards are checked as they are read. Where the
    job's state does not read through the retries (a state record Drive cannot serve), it counts no row errors:
    its rows count whatever the state says (a `runner retry` keeps them), and a reader missing rows says the state
    could not be read (`_warn_if_partial`). `load_results` of a completed job failed for as long."""
    from .jobdir import read_ledger, state_as_read

    # (the generation only says which row errors count: while a `cancel` or `retry` is being written, the one before)
    try:
        generation = state_as_read(job)[0].generation
    except storage.StorageError as e:
        if not e.unreadable_for_now:
            raise
        generation = NO_GENERATION
    return read_ledger(job, verify=False, generation=generation)


NO_GENERATION = -1  # a ledger's retry generation where the state did not read: no commit's row errors count


def shard_tables(
    job: Any, columns: list[str] | None = None, ledger: Any = None
) -> Iterator[tuple[Any, pa.Table]]:
    """(commit, its shard as a table) for each commit that counts (of `ledger`, else `rows_ledger`), one shard
    in memory at a time. Each shard is checked against its marker's checksum and keys as it is read: one that
    fails is left out (with a warning naming it; `runner repair` quarantines it and `runner work` redoes its
    rows). With `columns`, only those of them the shard has (and `_row`, `sample`) are decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .jobdir import forget_verified, read_checked_shard, read_shard_bytes

    for c in (ledger or rows_ledger(job)).commits:
        if not c.shard:
            continue
        data, why = read_checked_shard(job, c)
        if why is not None:
            warnings.warn(f"{job.dir}: commit {c.name} left out: {why} (run `runner repair "
                          f"{shlex.quote(str(job.dir))}`)", stacklevel=3)  # fmt: skip
            forget_verified(job, c.name)
            continue
        want = None
        if columns is not None:
            names = pq.read_schema(pa.BufferReader(data)).names
            want = [ORDER, "sample", *(n for n in columns if n in names and n not in (ORDER, "sample"))]
        yield c, read_shard_bytes(data, want)


def read_results_table(job: Any, ledger: Any = None) -> pa.Table:
    """All counted rows of a job (jobdir.Job; of `ledger`, else `rows_ledger`), in input order, as one Arrow
    table (with the `_row` column): `result_parts` joined. A shard that fails its check is left out (with a
    warning naming it; `runner repair` quarantines it and `runner work` redoes its rows). Keys are unique: a
    key committed twice (identical by construction) is kept once."""
    import pyarrow as pa

    parts = list(result_parts(job, ledger))
    if not parts:
        return empty_results(job)
    bounds = [
        (part.column(ORDER)[0].as_py(), part.column(ORDER)[-1].as_py()) for part in parts if part.num_rows
    ]
    table = pa.concat_tables(parts, promote_options="default")
    del parts
    # units in order, each sorted, their rows apart: in order as a whole (else a shard held rows of another
    # unit's range, which no worker writes: sorted whole, as before)
    if all(last < first for (_, last), (first, _) in zip(bounds, bounds[1:], strict=False)):
        return table
    return _in_order([table], job.samples)


def result_parts(job: Any, ledger: Any = None, in_order: bool = False) -> Iterator[pa.Table]:
    """The counted rows of a job (as `read_results_table`, with `_row`) a unit at a time: each unit's shards read
    (`shard_tables`: each checked as it is read), sorted by (row, sample) with each key once, and let go of
    before the next unit's are read. Sorting the whole job at once held it three times over (the shards, the
    combined columns and the sorted copy: 70 MB for 23 MB of results; adversarial pass 251); an export held it
    whole once (~0.7 KB a row: 0.7 GB for a million; pass 266). `in_order`: a unit listed after a later one
    (which no ledger lists) is `Unstreamable`, raised before the later one is given."""
    unit, tables = None, []
    for commit, table in shard_tables(job, ledger=ledger):
        if in_order and unit is not None and commit.unit < unit:
            raise Unstreamable(f"unit {commit.unit} is listed after unit {unit}")
        if commit.unit != unit and tables:
            yield _in_order(tables, job.samples)  # (which lets go of the unit's shards)
        unit = commit.unit
        tables.append(table)
    if tables:
        yield _in_order(tables, job.samples)


def _in_order(tables: list[pa.Table], samples: int) -> pa.Table:
    """`tables` (shards, let go of here) as one table sorted by (row, sample), each key once."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)
    tables.clear()
    order = pc.sort_indices(table, sort_keys=[(ORDER, "ascending"), ("sample", "ascending")])
    flat = table.column(ORDER).to_numpy() * samples + table.column("sample").to_numpy()
    flat = flat[order.to_numpy()]
    first = np.ones(len(flat), dtype=bool)
    first[1:] = flat[1:] != flat[:-1]
    keep = order if first.all() else order.filter(pa.array(first))
    return table.take(keep)


def resolve_source(source: str | os.PathLike, home: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """(path, whether it is a results Parquet file): a job folder, a results file, or a job id / name in the job
    home. A transient read error is retried, never taken for "not a file"."""
    p = Path(source)
    if storage.retry(p.is_file, f"read {p}"):
        return p, True
    from .jobdir import find_job

    return find_job(source, home), False


RESULT_FORMATS = ("pandas", "arrow", "datasets")


def load_results(
    source: str | os.PathLike, home: str | os.PathLike | None = None, format: str = "pandas"
) -> pd.DataFrame | pa.Table | Any:
    """Results, one row per (prompt, sample), in input order: a pandas DataFrame, or with `format="arrow"` a
    pyarrow Table (no copy: for results larger than a DataFrame comfortably holds), or with
    `format="datasets"` a Hugging Face `datasets.Dataset` on that table (`.map`, `.push_to_hub`, ...).

    `source` is a job id or name (looked up in the job home: `home`, else $RUNNER_HOME, else ./jobs), a job
    folder (such as `runner run -o out/`), or a Parquet file of results. Rows not generated yet are absent;
    `runner status` says how many.
    """
    if format not in RESULT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(RESULT_FORMATS)}, got {format!r}")
    table, _ = _results_and_loss(source, home)
    if format == "arrow":
        return table
    if format == "datasets":
        import datasets

        return datasets.Dataset(_extensions_as_storage(table))
    return to_pandas(table)


def preview_results(
    source: str | os.PathLike, home: str | os.PathLike | None = None, rows: int = 20
) -> tuple[pd.DataFrame, int]:
    """(the first `rows` results as `load_results` gives them, how many results there are): `runner results J`'s
    preview, read a unit at a time (`results_streamed`): it loaded the whole job into pandas to show 20 rows and
    a count (a million rows: gigabytes; pass 266). Where rows are missing, `load_results`' warnings say so."""
    import pyarrow as pa

    head: list[pa.Table] = []
    total, kept = 0, 0
    try:
        for part in results_streamed(source, home, []):
            total += part.num_rows
            if kept < rows:
                head.append(part.slice(0, rows - kept))
                kept += head[-1].num_rows
            del part
    except Unstreamable:  # (shards no worker writes: read whole, as `load_results` reads them)
        table, _ = _results_and_loss(source, home)
        head, total = [table.slice(0, rows)], table.num_rows
    table = pa.concat_tables(head, promote_options="default")
    return to_pandas(table.drop([ORDER]) if ORDER in table.column_names else table), total


def _extensions_as_storage(table: pa.Table) -> pa.Table:
    """`table` with each Arrow extension column (a passthrough `pa.uuid()`) as its storage (16-byte binary):
    datasets has no type for one, and `load_results(..., format="datasets")` raised its ValueError."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if isinstance(field.type, pa.BaseExtensionType):
            storage = field.type.storage_type
            column = pa.chunked_array([c.storage for c in table.column(i).chunks], storage)
            table = table.set_column(i, field.with_type(storage), column)
    return table


def _results_and_loss(source: str | os.PathLike, home: str | os.PathLike | None) -> tuple[pa.Table, str]:
    """`load_results`' table, and why results the job had are missing from it ("" when none are: a job still
    running, cancelled or failed is only not done yet; its missing rows are warned of all the same)."""
    from .jobdir import Job, job_file_hint, naming_broken, read_parquet

    path, is_file = resolve_source(source, home)
    if is_file and (hint := job_file_hint(path)):
        raise RunnerError(f"{path} is not a results file{hint}")
    if is_file:  # (an exported results file on a Drive mount: a transient error is read again)
        table, lost = storage.retry(lambda: _read_results_file(path, read_parquet, home), f"read {path}"), ""
    else:
        with naming_broken(path):
            job = Job.open(path)
            completed = _completed_now(job)  # (before its rows are read)
            ledger = rows_ledger(job)
            table = read_results_table(job, ledger)
        # the row errors of the ledger the rows were read from: with them, every row of the job is accounted for
        failed = int(ledger.failed_mask().sum())
        lost = _warn_if_partial(job, table.num_rows, completed, failed)
    return (table.drop([ORDER]) if ORDER in table.column_names else table), lost


class Unstreamable(Exception):
    """A part of the results that cannot follow the ones before it in a file written a part at a time
    (`results_streamed`): other columns than theirs, or rows before theirs. No worker writes such shards; the
    export is written from the whole table instead, as before it was streamed."""


def results_streamed(
    source: str | os.PathLike, home: str | os.PathLike | None, lost: list[str]
) -> Iterator[pa.Table]:
    """`_results_and_loss` a unit at a time (`result_parts`; a results file whole), each with `_row` and the
    columns of the first, in input order after the one before (else `Unstreamable`); with no rows, an empty
    table of the results' columns. Once the last is taken, `lost` holds why rows the job had are missing ("" when
    none are), as `_results_and_loss` says it."""
    from .jobdir import Job, naming_broken

    path, is_file = resolve_source(source, home)
    if is_file:
        table, why = _results_and_loss(path, home)
        yield table
        lost.append(why)
        return
    with naming_broken(path):
        job = Job.open(path)
        completed = _completed_now(job)  # (before its rows are read)
        ledger = rows_ledger(job)
        parts = result_parts(job, ledger, in_order=True)
        rows, schema, last = 0, None, -1
        for part in parts:
            if schema is None:
                schema = part.schema
            elif not part.schema.equals(schema):
                raise Unstreamable("a part has other columns than the first")
            if part.num_rows:
                if part.column(ORDER)[0].as_py() <= last:
                    raise Unstreamable("a part holds rows before the last part's")
                last = part.column(ORDER)[-1].as_py()
            rows += part.num_rows
            yield part
            del part
        if schema is None:
            yield empty_results(job)
    failed = int(ledger.failed_mask().sum())
    lost.append(_warn_if_partial(job, rows, completed, failed))


def _read_results_file(path: Path, read_parquet: Callable[[Path], pa.Table], home: Any = None) -> pa.Table:
    """A results file's table; a file that is no Parquet (an export to .jsonl or .csv, the job's input file) is
    said so, naming it, not pyarrow's traceback ("Parquet magic bytes not found in footer")."""
    import pyarrow as pa

    from .jobdir import batch_job_hint, input_file_hint

    try:
        return read_parquet(path)
    except pa.ArrowInvalid as e:
        if hint := batch_job_hint(path) or input_file_hint(path, home):
            raise RunnerError(f"{path} is not a Parquet file of results{hint}") from None
        raise RunnerError(f"{path} is not a Parquet file of results ({first_line(e)}): give a job id, name or "
                          "folder, or a results .parquet file (read an export to .jsonl, .json or .csv with "
                          "pandas)") from None  # fmt: skip


def _completed_now(job: Any) -> int | None:
    """The retry generation of the job's state where it reads as completed, else None (also where it cannot be
    read now: its rows are read all the same, and `_warn_if_partial` says the state could not be read)."""
    from .jobdir import JobState, state_as_read

    try:
        state = state_as_read(job)[0]
    except (RunnerError, OSError):
        return None
    return state.generation if state.state is JobState.COMPLETED else None


def to_pandas(table: pa.Table) -> pd.DataFrame:
    """The table as a DataFrame, every value as stored: an integer column with a missing value (a passthrough
    id absent from some rows) becomes pandas' nullable integer, not float64, which changes ids above 2**53
    (12345678901234567 and ...569 both read 1.2345678901234568e16) and turns a count 3 into 3.0."""
    import pandas as pd
    import pyarrow as pa

    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype()}  # fmt: skip
    df = table.to_pandas()
    for name, column in zip(table.column_names, table.columns, strict=True):
        if column.type in nullable and column.null_count:
            df[name] = column.to_pandas(types_mapper=nullable.get)
        elif _nested_integer_with_nulls(column):
            df[name] = pd.Series(column.to_pylist(), index=df.index, dtype=object)
    return df


def _nested_integer_with_nulls(column: pa.ChunkedArray) -> bool:
    """Whether a list, struct or map column holds integers of which some are null (a null element of a list, or
    a null struct, whose fields hold nulls there): pandas makes such integers floats (a list of ids
    [2**60 + 1, None] read [1.152921504606847e+18, nan], a struct's {"k": 7} {"k": 7.0}), so `to_pandas`
    gives that column as Python lists and dicts, every value as stored (adversarial pass 251)."""
    import pyarrow as pa

    def integers_with_nulls(array: pa.Array) -> bool:
        t = array.type
        if pa.types.is_integer(t):
            return array.null_count > 0
        if pa.types.is_struct(t):
            return any(integers_with_nulls(array.field(i)) for i in range(t.num_fields))
        if pa.types.is_map(t):
            return integers_with_nulls(array.keys) or integers_with_nulls(array.items)
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return integers_with_nulls(array.values)
        return False

    nested = pa.types.is_nested(column.type)
    return nested and any(integers_with_nulls(chunk) for chunk in column.chunks)


def _warn_if_partial(job: Any, rows: int, completed: int | None = None, failed: int = 0) -> str:
    """Results missing rows are said, not silent: those of a job not complete yet (queued, running, cancelled,
    failed), and those of a completed job that lost rows since (a damaged commit: `runner repair`). A job with
    all its `rows` is not asked about (no second read of the ledger). Returns why rows were lost (a broken job,
    or one whose state could not be read, or that was `completed` already (its generation) when fewer rows
    were read than the second read finds: an export then must not pass for whole), else "". `failed`: the row
    errors of the ledger the rows were read from."""
    from .job_status import job_status

    if rows >= job.spec.total:
        return ""
    if completed is not None and rows + failed >= job.spec.total:
        # completed before its rows were read, and each row read or failed: whole, whatever a second look says
        # (a transient error, a commit damaged or quarantined since; an export of every row exited 1, "written,
        # but without rows the job had: job J is broken")
        return _completed_since(job, rows)
    try:
        s = job_status(job)
    except storage.StorageError as e:
        # the mount failing through the retries: the results may be partial, say so
        warnings.warn(f"job {job.id}: these are {rows:,} of its {job.spec.total:,} results, and whether the rest "
                      f"are still to come could not be read ({e})", stacklevel=4)  # fmt: skip
        return f"job {job.id}'s state could not be read ({e}): its other {job.spec.total - rows:,} rows may be lost"
    except RunnerError as e:  # broken (its shards were read and checked one by one, each left out named)
        return f"job {job.id} is broken: {e}"
    # (the counts said are of the rows returned: the status is a second read, and the job may have moved on
    # since the shards were read; pass 74)
    if s.state == "broken":
        warnings.warn(f"job {s.id} is broken: {s.message}; these are {rows:,} of its {job.spec.total:,} results",
                      stacklevel=4)  # fmt: skip
        return f"job {s.id} is broken: {s.message}"
    # (completed again since, by a `runner retry` of its row errors: completed while read, as below)
    elif (
        s.state == "completed"
        and completed is not None
        and s.done > rows
        and _completed_now(job) == completed
    ):
        # completed before its rows were read: the listing read them from missed commits the second read sees (a
        # mount showing files late, catching up meanwhile); an export of half passed for whole (exit 0)
        lost = (
            f"job {s.id} is completed, but these are {rows:,} of its {s.done:,} results: the folder listed "
            "fewer commits than a second look found (a mount that shows files late?); load them again"
        )
        warnings.warn(lost, stacklevel=4)
        return lost
    elif s.state == "completed":  # its other rows are row errors, unless it completed as they were read
        if s.done > rows:
            warnings.warn(f"job {s.id} completed while its results were being read: these are {rows:,} of its "
                          f"{s.done:,} results; load them again for all", stacklevel=4)  # fmt: skip
    else:
        rest = ("the rest are not computed yet" if s.state.startswith(("queued", "running", "stopped")) else
                f"the rest are computed only after `runner retry {shlex.quote(str(job.dir))}`")  # fmt: skip
        warnings.warn(f"job {s.id} is {s.state}: these are {rows:,} of its {s.total:,} results ({rest})",
                      stacklevel=4)  # fmt: skip
    return ""


def _completed_since(job: Any, rows: int) -> str:
    """ "" for the `rows` of a job read whole as it stood completed; a completion since with more rows (a `runner
    retry` of its row errors, and a worker) is warned of, as `_warn_if_partial` warns of one."""
    from .job_status import job_status

    try:
        s = job_status(job)
    except RunnerError:
        return ""
    if s.state == "completed" and s.done > rows:
        warnings.warn(f"job {s.id} completed while its results were being read: these are {rows:,} of its "
                      f"{s.done:,} results; load them again for all", stacklevel=5)  # fmt: skip
    return ""


def one_line(text: Any) -> str:
    """`text` on one line, as typed: a backslash doubled, tabs and line breaks as \\t, \\r, \\n (a line break
    and a typed "\\n" read apart), and every other character that breaks a line for some reader or moves a
    terminal's cursor (a form feed, U+2028, ESC: the other C0/C1 controls and U+2028/U+2029, which Python's
    `splitlines` and JavaScript split on) as \\xNN or \\uNNNN."""
    return str(text).translate(_ESCAPES)


_ESCAPES = {
    **{c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]},
    0x2028: "\\u2028",
    0x2029: "\\u2029",
    **{ord(c): e for c, e in {"\\": "\\\\", "\t": "\\t", "\r": "\\r", "\n": "\\n"}.items()},
}


def score_lines(df: Any, tokens: bool = False) -> Iterator[str]:
    """A score job's results as gpt2-score prints them: each text and its log-prob, tab-separated (a context /
    continuation pair: the two texts, then the continuation's log-prob), and with `tokens` each token and its
    log-prob on the lines below. Tabs and line breaks inside a text are written as \\t and \\n: one line per row.
    A token holding only the first bytes of a character (most Japanese under GPT-2's byte-level BPE), whose
    text is "" (the character shows on the token that completes it), is written as its bytes, "\\xe5\\x90",
    not as a blank; SentencePiece's "▁" in front of a text, which reads as nothing there, as "▁", not "\\x20"."""

    from .tokens import text_alone

    def piece(text: str, raw: Any) -> str:
        if text or raw is None:
            return one_line(text)
        alone = text_alone(raw)
        return one_line(alone) if alone is not None else "".join(f"\\x{b:02x}" for b in bytes(raw))

    columns = ["text", "context", "continuation", "logprob", "tokens", "token_bytes", "token_logprobs"]
    for text, context, continuation, logprob, pieces, raws, logprobs in df[columns].itertuples(index=False):
        texts = [context, continuation] if isinstance(continuation, str) else [text]
        yield "\t".join([*map(one_line, texts), f"{logprob:.5g}"])
        if tokens:
            raws = [None] * len(pieces) if raws is None else raws
            yield from (f"{piece(t, b)}\t{lp:.5g}" for t, b, lp in zip(pieces, raws, logprobs, strict=True))


def embed_lines(df: Any) -> Iterator[str]:
    """An embed job's results as gpt2-transform prints a vector: each row's `embedding` as a JSON list of
    floats (the float32 values written out in full), one line per row."""
    for vector in df["embedding"]:
        yield json.dumps([float(v) for v in vector])


EXPORT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def export_type_problem(to: str | os.PathLike) -> str | None:
    """Why `to` cannot be an export file (its suffix names no type export_results writes), else None."""
    suffix = Path(to).suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        return None
    if os.fspath(to) == "-":  # (the shell's "standard output": the preview is what prints there)
        return "exports go to a file, not to standard output; name one (.jsonl, .json, .csv or .parquet)"
    excel = suffix in (".xlsx", ".xls", ".xlsm")  # (a Japanese Excel user's first try)
    return f"unknown type {suffix or '(none)'!r}; use .jsonl, .json, .csv or .parquet" + (
        " (a .csv opens in Excel: it is written as UTF-8 with a BOM, so Excel reads its Japanese text right)"
        if excel
        else ""
    )


class _Counts(NamedTuple):
    rows: int
    errors: int


class Exported(_Counts):
    """What `export_results` wrote: `rows` (rows, or Batch response lines) and `errors` (Batch error lines, or
    error rows to `errors_to`); `lost`: why rows the job had computed are not in the file (a job broken since,
    which `runner results` exits 1 on, after writing), "" when none are (a job still running is not done yet)."""

    lost: str = ""

    def losing(self, lost: str) -> Exported:
        """These counts, of an export that `lost` says is missing rows."""
        self.lost = lost
        return self


def export_results(
    source: str | os.PathLike,
    to: str | os.PathLike | None = None,
    home: str | os.PathLike | None = None,
    format: str = "table",
    errors_to: str | os.PathLike | None = None,
) -> Exported:
    """`runner results JOB --to FILE`: write a job's results (in input order) to FILE, its type by suffix
    (.jsonl, .json as one array, .csv with lists as JSON text, .parquet). With `format="openai"`, one OpenAI
    Batch output line per request, and the requests that could not be done to `errors_to` (default beside it,
    FILE.errors.jsonl). As a table, `errors_to` gets `read_errors` (id, line, row, sample, stage, field, error,
    message; its type by suffix, as `to`); `to` None writes that errors file alone (`runner results JOB
    --errors-to FILE`). Returns how many rows (or lines) and error lines it wrote; where rows the job had are
    missing (`Exported.lost`), a file already at `to` (or `errors_to`) is left as it was: RunnerError."""
    from . import jobdir

    if to is None and (format == "openai" or errors_to is None):
        raise ValueError("export_results needs `to`" + ("" if format == "openai" else " or `errors_to`"))
    if "" in (to, errors_to):  # (Path("") is ".": a rename onto it was retried for a minute as a busy mount)
        raise ValueError("an empty path names no file")
    storage.refuse_unmounted_drive(to, errors_to)
    refuse_inside_job(jobdir.find_job(source, home), to, errors_to)
    if format == "openai":
        from . import openai_batch

        with jobdir.opened_job(source, home) as job:
            return openai_batch.export(job, to, errors_to)
    if format != "table":
        raise ValueError(f"format must be 'table' or 'openai', got {format!r}")
    for path in filter(None, (to, errors_to)):
        if problem := export_type_problem(path):
            raise ValueError(f"{path}: {problem}")
    if errors_to is None:  # the target checked before the rows are read (pyarrow named its temp file)
        check_export_target(Path(to))
        with _staged_results(source, home, Path(to)) as (place, rows, lost):
            _keep_the_file_there(lost, Path(to))
            place()
        return Exported(rows, 0).losing(lost)
    if to is None:  # the errors alone: the refused input lines and the row errors, as beside an export
        check_export_target(Path(errors_to))
        missed: list[str] = []
        errors = _errors_table(read_errors(source, home, missed=missed))
        _keep_the_file_there("".join(missed), Path(errors_to))
        _write_whole(errors, Path(errors_to))
        return Exported(0, errors.num_rows).losing("".join(missed))
    check_export_pair(Path(to), Path(errors_to))
    # the errors read before the rows: a `runner retry` between the two reads then leaves the pair as it was
    # before it (its errors listed, their rows not there), never rows without the errors that explain the gap;
    # a row the retry's worker computed meanwhile is a row, its error gone (pass 94: it was both)
    missed: list[str] = []
    errors = read_errors(source, home, missed=missed)
    answered = _Answered(errors)
    # both staged whole first (a full disk leaves the older pair as it was); then a kill between the two renames
    # leaves no errors file, never an older one beside new rows
    with _staged_results(source, home, Path(to), answered.see) as (place_rows, rows, lost):
        errors_table = _errors_table(answered.not_since(errors))
        lost = lost or "".join(missed)
        _keep_the_file_there(lost, Path(to), Path(errors_to))
        with _staged([errors_table], Path(errors_to)) as place_errors:
            storage.remove(errors_to)
            place_rows()
            place_errors()
    return Exported(rows, errors_table.num_rows).losing(lost)


def _keep_the_file_there(lost: str, *targets: Path) -> None:
    """An export that may lack rows the job had (`lost`: a commit damaged since, a mount showing files late, a job
    broken) is not written over a file already there, which may be a whole export of before: a RunnerError says
    so and the file is left as it was. (It overwrote it, exit 1 after: the one good copy replaced by a partial
    one.)"""
    there = [str(t) for t in targets if lost and os.path.lexists(t)]
    if there:
        raise RunnerError(f"{' and '.join(there)} left as {'they were' if len(there) > 1 else 'it was'}, not "
                          f"written: the rows read may lack some the job had ({lost}); to save the rows that "
                          "can be read, give a new file")  # fmt: skip


def refuse_inside_job(job_dir: str | os.PathLike, *paths: str | os.PathLike | None) -> None:
    """Refuse an export target inside the job's folder, whose files are runner's own (a link to it counts), and
    the file the job was submitted from: `runner results J --to prompts.jsonl` wrote over the user's prompts
    without a word, and `runner repair` could no longer write prompts.parquet again from them (pass 251)."""
    from .jobdir import input_path, spec_or_backup

    folder = Path(os.path.realpath(job_dir))
    spec = spec_or_backup(Path(job_dir)) or {}
    given = input_path(spec)
    for path in paths:
        if path is not None and Path(os.path.realpath(path)).is_relative_to(folder):
            raise RunnerError(f"{path} is inside the job's folder {folder}, whose files are runner's own: "
                              "export somewhere else")  # fmt: skip
        if path is not None and given is not None and same_file(path, given):
            raise RunnerError(f"{path} is the input file of job {spec.get('id') or folder.name}: writing it would "
                              "destroy the prompts it was submitted from; give the export another name")  # fmt: skip


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name one file: one path (through links), or one file there now (a hard link). A stat
    that fails for now (a Drive mount dropping a request) is tried again: taken for "not there", the export wrote
    over the job's input file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True

    def same() -> bool:
        try:
            return os.path.samefile(a, b)
        except (FileNotFoundError, NotADirectoryError):  # either is not there (yet): nothing of it to destroy
            return False

    try:
        return storage.retry(same, f"compare {a} with {b}")
    except storage.StorageError:  # (unreadable for good: then no export writes it either)
        return False


class _Answered:
    """Which row errors (`read_errors`, read before the rows) are of an (id, sample) among the results read after
    them (`see`, each part as it is written): `not_since` leaves those out. Lines refused at submit (stage
    "validate") stay: a refused duplicate shares its id with a row."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.keys = {(e.get("id"), e.get("sample") or 0) for e in errors if e.get("stage") != "validate"}
        self.done: set[Any] = set()

    def see(self, table: pa.Table) -> None:
        if not self.keys or "id" not in table.column_names:
            return
        ids = table.column("id").to_pylist()
        samples = table.column("sample").to_pylist() if "sample" in table.column_names else [0] * len(ids)
        self.done.update(k for k in zip(ids, samples, strict=True) if k in self.keys)

    def not_since(self, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e for e in errors
            if e.get("stage") == "validate" or (e.get("id"), e.get("sample") or 0) not in self.done
        ]  # fmt: skip


def check_export_pair(out: Path, errors: Path) -> None:
    """Refuse an output and an errors file that are one file, or that cannot be written (something other than a
    file there, no folder), before anything is written: an older export stays whole."""
    if os.path.realpath(out) == os.path.realpath(errors):  # (the errors were written over the answers)
        raise RunnerError(f"{out}: the output and the errors file must be two files")
    check_export_target(out)
    check_export_target(errors)


def check_export_target(target: Path) -> None:
    """Refuse an export file that cannot be written (something other than a file there, no folder)."""
    if storage.kind(target) not in (None, "file"):
        raise RunnerError(f"cannot write {target}: something other than a file stands there")
    # (retried as the job folder's reads are: one EIO on a mount failed a finished run-batch, pass 93)
    if not storage.retry(target.parent.is_dir, f"read {target.parent}"):
        raise RunnerError(f"cannot write {target}: no folder {target.parent}")


ERROR_FIELDS = ("id", "line", "row", "sample", "stage", "field", "error", "message")


def _errors_table(errors: list[dict[str, Any]]) -> pa.Table:
    """`read_errors` as a table for `--errors-to` (its type by suffix, as `--to`): the same columns whether
    there are errors or none, in read_errors' order."""
    import pyarrow as pa

    types = {"line": pa.int64(), "row": pa.int64(), "sample": pa.int64()}
    schema = pa.schema([(k, types.get(k, pa.string())) for k in ERROR_FIELDS])
    return pa.Table.from_pylist([{k: _error_value(e.get(k), k in types) for k in ERROR_FIELDS} for e in errors],
                                schema=schema)  # fmt: skip


def _error_value(v: Any, number: bool) -> Any:
    if v is None or (number and isinstance(v, int) and not isinstance(v, bool)):
        return v
    return None if number else str(v)


def _write_whole(table: pa.Table, to: Path) -> None:
    """`table` to `to` by its suffix, every value as stored (no float rounded, no integer made a float), through
    a temp file renamed into place: a full disk, a kill or Ctrl-C leaves the old file (or none), never a torn
    one."""
    with _staged([table], to) as place:
        place()


@contextlib.contextmanager
def _staged_results(
    source: str | os.PathLike,
    home: str | os.PathLike | None,
    to: Path,
    see: Callable[[pa.Table], None] | None = None,
) -> Iterator[tuple[Callable[[], None], int, str]]:
    """`_staged` of a job's results (`results_streamed`: a unit at a time, each shown to `see` as it is written);
    yields (the call that renames it into place, its rows, why rows the job had are missing: "" none). Where the
    parts cannot follow one another (`Unstreamable`), the whole table is written instead."""
    lost: list[str] = []
    counted: list[int] = []

    def parts() -> Iterator[pa.Table]:
        read = results_streamed(source, home, lost)
        while True:
            try:
                part = next(read, None)
            except (OSError, storage.StorageError) as e:  # (a read of the job, not a write of the export)
                raise _ReadFailed(e) from e
            if part is None:
                return
            part = part.drop([ORDER]) if ORDER in part.column_names else part
            counted.append(part.num_rows)
            if see is not None:
                see(part)
            yield part

    try:
        with _staged(parts(), to) as place:
            yield place, sum(counted), "".join(lost)
            return
    except Unstreamable:
        pass
    except _ReadFailed as e:  # said as it was, not "cannot write" the export
        raise e.error from e.error.__cause__
    table, why = _results_and_loss(source, home)
    if see is not None:
        see(table)
    with _staged([table], to) as place:
        yield place, table.num_rows, why


class _ReadFailed(Exception):
    """A job's rows failing to read while an export is written (`_staged_results`), carrying the `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _staged(parts: Iterable[pa.Table], to: Path) -> Iterator[Callable[[], None]]:
    """The tables of `parts` (one table's columns each), written one after the other to a temp file beside `to`
    (a part at a time: never the whole in memory), flushed to the disk; yields the call that renames it into
    place (a pair of exports is staged whole before either takes its name). The temp file goes on exit."""
    storage.remove_stale_temps_of(to)  # an earlier export of this file killed mid-way
    tmp = storage.owned_temp_name(to)
    suffix = to.suffix.lower()
    try:
        try:
            if suffix == ".parquet":
                _write_parquet(parts, tmp)
            elif suffix in (".jsonl", ".json"):  # .json: one array, as the name says
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(_json_lines(parts, array=suffix == ".json"))
            else:
                _write_csv(parts, tmp)
            # whole on the disk before it takes the name: a machine crash leaves the old file
            storage.fsync_file(tmp)
            fault_point("before_replace")
        except (OSError, storage.StorageError) as e:
            raise _cannot_write(to, e) from None
        # (outside the try: a pair's staging holds both, and the errors file's named the rows file's failed rename)
        yield functools.partial(_place, tmp, to)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _write_parquet(parts: Iterable[pa.Table], path: str) -> None:
    """The parts as one Parquet file, each its own row groups (one table: as `pq.write_table` writes it)."""
    import pyarrow.parquet as pq

    writer = None
    try:
        for part in parts:
            if writer is None:
                writer = pq.ParquetWriter(storage.arrow_file(path, "wb"), part.schema)
            writer.write_table(part)
    finally:
        if writer is not None:
            writer.close()


def _place(tmp: str, to: Path) -> None:
    """The staged file `tmp` renamed to `to`; a failure said of `to`."""
    try:
        storage.replace(tmp, to)
    except (OSError, storage.StorageError) as e:
        raise _cannot_write(to, e) from None


def _cannot_write(to: Path, e: Exception) -> RunnerError:
    cause = e.__cause__ if isinstance(e, storage.StorageError) else e
    return RunnerError(f"cannot write {to}: {getattr(cause, 'strerror', None) or e}")


EXPORT_CHUNK_ROWS = 4096  # rows converted at a time by a CSV or JSON export


def _write_csv(parts: Iterable[pa.Table], path: str) -> None:
    """The rows as CSV, a few thousand at a time (a whole job's table in pandas took 7x the file's size: pass
    46). With a UTF-8 byte-order mark: Excel (a Japanese Windows above all) reads it as UTF-8, not mojibake.
    Lines end in CRLF, as RFC 4180 has it: a cell holding a lone carriage return is then quoted too (with
    pandas' "\n" it was not, and every reader split the row there)."""
    import pyarrow as pa

    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        header = True
        for table in parts:
            for batch in table.to_batches(max_chunksize=EXPORT_CHUNK_ROWS) or [table.schema.empty_table()]:
                if not header and not batch.num_rows:
                    continue
                part = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                _as_json_text(to_pandas(_float32_shortest(part))).to_csv(f, index=False, header=header,
                                                                         lineterminator="\r\n")  # fmt: skip
                header = False


def _json_lines(parts: Iterable[pa.Table], array: bool) -> Iterator[str]:
    """The rows as JSON, a few thousand at a time: each float with every digit (pandas' `to_json` kept 10),
    integers as integers, NaN and infinities (which JSON cannot hold) as null, dates in ISO form. As JSON Lines,
    or (`array`) as the lines of one JSON array."""

    import pyarrow as pa

    first = True
    yield "[" if array else ""
    for batch in (b for table in parts for b in table.to_batches(max_chunksize=EXPORT_CHUNK_ROWS)):
        for row in _float32_shortest(pa.Table.from_batches([batch])).to_pylist():
            text = _json_text(row)
            yield (("" if first else ",") + "\n" + text) if array else text + "\n"
            first = False
    yield "\n]\n" if array else ""


def _float32_shortest(table: pa.Table) -> pa.Table:
    """float32 values (token log-probs) as the float64 of their shortest decimal (-0.37045, not the widened
    -0.3704500198364258): the same float32, a third of the text. Arrow writes that decimal, vectorised."""
    import pyarrow as pa

    def swap(t: pa.DataType, to: pa.DataType) -> pa.DataType:
        if t == pa.float32():
            return to
        if pa.types.is_fixed_size_list(t):  # an embedding
            return pa.list_(swap(t.value_type, to), t.list_size)
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return (pa.list_ if pa.types.is_list(t) else pa.large_list)(swap(t.value_type, to))
        if pa.types.is_struct(t):
            return pa.struct([t.field(i).with_type(swap(t.field(i).type, to)) for i in range(t.num_fields)])
        return t

    for i, f in enumerate(table.schema):
        if swap(f.type, pa.string()) != f.type:
            text = table.column(i).cast(swap(f.type, pa.string()))
            table = table.set_column(i, f.name, text.cast(swap(f.type, pa.float64())))
    return table


def _json_text(value: Any) -> str:
    """`value` (Python objects, as Arrow's to_pylist gives them) as JSON, as every export writes it: every float
    digit, NaN and infinities (which JSON cannot hold) as null, dates in ISO form, bytes as byte lists."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, default=_json_default)
    except ValueError:  # a NaN or an infinity somewhere in it
        return json.dumps(_finite(value), ensure_ascii=False, default=_json_default)


def _json_default(v: Any) -> Any:
    """What json cannot write by itself, from a passthrough column of a Parquet input: dates and times in ISO
    form, decimals and anything else as text, bytes as a list of byte values (as `token_bytes`)."""
    if isinstance(v, (bytes, bytearray)):
        return list(v)
    return v.isoformat() if hasattr(v, "isoformat") else str(v)


def _finite(v: Any) -> Any:
    import math

    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def _as_json_text(df: Any) -> Any:
    """List and struct columns as JSON text (a CSV cell cannot hold a list; pandas would write a truncated
    numpy repr such as `[276 438 ... 221]`)."""

    import numpy as np

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v.tolist()]
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v.item() if isinstance(v, np.generic) else v

    def cell(v: Any) -> Any:  # as the JSON exports write it
        return _json_text(plain(v)) if isinstance(v, (bytes, bytearray, np.ndarray, list, dict)) else v

    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(cell)
    return out


def read_errors(
    source: str | os.PathLike, home: str | os.PathLike | None = None, *, missed: list[str] | None = None
) -> list[dict[str, Any]]:
    """Rows of a job that could not be done: invalid input rows (stage `validate`), then rows that failed at
    run time (out of memory alone, NaN/inf even in float32, a row that crashes workers, a constraint whose parser
    gave up mid-sample), each with id, line, row, sample, stage, error and message. Why some may be missing
    (`_errors_and_loss`) is appended to `missed` (an export's), else warned."""
    from . import jobdir

    with jobdir.opened_job(source, home) as job:
        errors, why = _errors_and_loss(job)
    if why and missed is not None:
        missed.append(why)
    elif why:
        warnings.warn(why, stacklevel=2)
    return errors


def _errors_and_loss(job: Any) -> tuple[list[dict[str, Any]], str]:
    """`jobdir.read_errors` of a job, read again where it reads as completed but its commits listed account for
    fewer rows than it has, none failing verification (a mount that shows files late: the listing missed the
    commit of a row error, and that row was in neither file of an export, exit 0); and why errors may be
    missing where a second look falls short too (else "")."""
    from . import jobdir

    for _ in range(2):
        state = jobdir.state_as_read(job)[0]
        ledger = jobdir.read_ledger(job, generation=state.generation)
        # (keys done or failed, each once: a key both is no second row)
        shown = int((ledger.done_mask() | ledger.failed_mask()).sum())
        holding = ledger.bad_holding_errors()
        if state.state is not jobdir.JobState.COMPLETED or (
            not holding and (ledger.bad or shown >= job.spec.total)
        ):
            return jobdir.read_errors(job, ledger), ""
    if holding:
        # (pass 196: a torn read of such a commit left its errors out without a word, and the rows, read whole
        # after it, exported with exit 0: a failed row in neither file)
        return jobdir.read_errors(job, ledger), (
            f"job {job.id} is completed, but {holding:,} of its commits that may hold row errors failed "
            f"verification: their errors are not in this export (`runner status {job.id}` says more; `runner "
            "repair` quarantines them)"
        )
    return jobdir.read_errors(job, ledger), (
        f"job {job.id} is completed, but its folder listed commits for {shown:,} of its {job.spec.total:,} rows "
        "(a mount that shows files late?): its errors may be missing some; export them again"
    )
