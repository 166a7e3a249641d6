"""Parquet result shards: their schema, how they are written and vouched for, and `load_results`.

engine.py (`Completion`s) -> `completions_table` -> `write_shard` -> shards/NNNNN-W.parquet + done/NNNNN-W.json
-> `load_results` (pandas, input order)

A shard counts only once its completion marker exists and agrees with the shard (size and row count from the
Parquet footer). The marker is written last, so a worker killed at any instant leaves either a counted shard or
files that are ignored and whose rows are generated again: nothing is lost and nothing counts twice.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .errors import RunnerError
from .faults import fault_point

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

SHARDS, MARKERS, PROMPTS = "shards", "done", "prompts.parquet"
ORDER = "_row"  # input order of the row (0-based over valid rows); sorts results, dropped by load_results
# Columns of a job's prompts table (jobs.py) that are not passed through to the results as they are.
PROMPT_COLUMNS = (ORDER, "line", "id", "prompt", "input_ids", "prompt_tokens", "score_from", "continuation")

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

    entry = pa.struct(
        [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()), ("rank", pa.int32())]
    )
    return pa.list_(pa.list_(entry))


def generation_schema(top_logprobs: bool = False, prompt_logprobs: bool = False) -> pa.Schema:
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
    if top_logprobs:
        schema = schema.append(pa.field("top_logprobs", top_logprobs_type()))
    if prompt_logprobs:
        schema = schema.append(pa.field("prompt_logprobs", pa.list_(pa.float32())))
    return schema


@dataclass
class GeneratedRow:
    row: int  # index into the job's prompts table
    sample: int
    completion: Any  # engine.Completion


def completions_table(
    prompts: pa.Table,
    generated: list[GeneratedRow],
    token_text: Callable[[list[int]], list[str]] | None = None,
) -> pa.Table:
    """One result row per (prompt, sample): generated columns, then the row's passthrough columns.
    `prompts` is the job's prompts table (jobs.py), indexed by `GeneratedRow.row`; `token_text` decodes
    token ids one by one, for the `token` field of `top_logprobs`."""
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
    has_top = bool(comps) and comps[0].top_logprobs is not None
    has_prompt = bool(comps) and comps[0].prompt_logprobs is not None
    if has_top:
        flat = sorted({t for c in comps for step in c.top_logprobs for t, _, _ in step})
        text = dict(zip(flat, token_text(flat) if token_text else [None] * len(flat), strict=True))
        cols["top_logprobs"] = pa.array(
            [[[{"token_id": t, "token": text[t], "logprob": lp, "rank": rk} for t, lp, rk in step]
              for step in c.top_logprobs] for c in comps],
            top_logprobs_type(),
        )  # fmt: skip
    if has_prompt:
        cols["prompt_logprobs"] = pa.array([c.prompt_logprobs for c in comps], pa.list_(pa.float32()))
    schema = generation_schema(has_top, has_prompt)
    arrays = [cols[f.name].cast(f.type) for f in schema]
    for name in passthrough_columns(prompts.schema):
        schema = schema.append(prompts.schema.field(name))
        arrays.append(base.column(name))
    return pa.Table.from_arrays(arrays, schema=schema)


SCORE_COLUMNS = (
    "id", "text", "context", "continuation", "logprob", "mean_logprob", "perplexity", "num_tokens", "is_greedy",
    "token_ids", "tokens", "token_logprobs",
)  # fmt: skip
EMBED_COLUMNS = ("id", "text", "num_tokens", "embedding")
OUTPUT_COLUMNS = {"generate": GENERATION_COLUMNS, "score": SCORE_COLUMNS, "embed": EMBED_COLUMNS}


def score_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        (ORDER, pa.int64()), ("id", pa.string()), ("sample", pa.int32()), ("text", pa.string()),
        ("context", pa.string()), ("continuation", pa.string()), ("logprob", pa.float64()),
        ("mean_logprob", pa.float64()), ("perplexity", pa.float64()), ("num_tokens", pa.int32()),
        ("is_greedy", pa.bool_()), ("token_ids", pa.list_(pa.int32())), ("tokens", pa.list_(pa.string())),
        ("token_logprobs", pa.list_(pa.float32())),
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


def score_table(
    prompts: pa.Table, scored: list[GeneratedRow], token_text: Callable[[list[int]], list[str]]
) -> pa.Table:
    """One row per scored text: `completion` of each GeneratedRow is a scoring.TextScore."""
    import math

    import pyarrow as pa

    base = prompts.take(pa.array([g.row for g in scored], pa.int64()))
    conts = base.column("continuation").to_pylist()
    texts = base.column("prompt").to_pylist()
    res = [g.completion for g in scored]
    cols = {
        ORDER: base.column(ORDER), "id": base.column("id"), "sample": [0] * len(scored),
        "text": [None if c is not None else t for t, c in zip(texts, conts, strict=True)],
        "context": [t if c is not None else None for t, c in zip(texts, conts, strict=True)],
        "continuation": conts,
        "logprob": [r.logprob for r in res],
        "mean_logprob": [r.logprob / len(r.token_logprobs) for r in res],
        "perplexity": [math.exp(-r.logprob / len(r.token_logprobs)) for r in res],
        "num_tokens": [len(r.token_ids) for r in res],
        "is_greedy": [r.is_greedy for r in res],
        "token_ids": [r.token_ids for r in res],
        "tokens": [token_text(r.token_ids) for r in res],
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


def next_shard_name(job_dir: Path, worker: str) -> str:
    """`NNNNN-worker`: sortable, and unique even if two workers ever raced on one job."""
    used = [
        n.split("-", 1)[0] for n in storage.listdir(job_dir / SHARDS) + storage.listdir(job_dir / MARKERS)
    ]
    nums = [int(n) for n in used if n.isdigit()]
    return f"{max(nums, default=-1) + 1:05d}-{worker}"


def write_shard(job_dir: Path, table: pa.Table, worker: str, metadata: dict[str, str] | None = None) -> str:
    """Write `table` as the job's next shard and vouch for it with a marker. Returns the shard's name.

    The shard is written and verified on local disk, copied into the job home under a temp name and renamed,
    and only then is the marker written (itself atomically). Killed anywhere in here, the job counts either
    the whole shard or none of it.
    """
    import pyarrow.parquet as pq

    name = next_shard_name(job_dir, worker)
    meta = {b"runner.rows": str(table.num_rows).encode()}
    for k, v in (metadata or {}).items():
        meta[f"runner.{k}".encode()] = v.encode()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with tempfile.TemporaryDirectory(prefix="runner-shard-") as tmp:
        local = Path(tmp) / f"{name}.parquet"
        pq.write_table(table, local, compression="zstd")
        if pq.read_metadata(local).num_rows != table.num_rows:
            raise RunnerError(f"shard {name} did not verify after writing (row count mismatch)")
        marker = {
            "shard": f"{name}.parquet",
            "rows": table.num_rows,
            "bytes": local.stat().st_size,
            "sha256": storage.file_sha256(local),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        target = job_dir / SHARDS / f"{name}.parquet"
        storage.publish(local, target)
    fault_point("after_shard")  # the shard is in place, its marker is not: it must not count
    storage.write_json(job_dir / MARKERS / f"{name}.json", marker)
    return name


TEMP_MAX_AGE = 600.0  # seconds: a temp file left alone this long has no live writer (leases go stale in 120)


def remove_stale_temps(job_dir: Path, max_age: float = TEMP_MAX_AGE) -> int:
    """Delete temp files that killed workers left in shards/ and done/ (a publish killed half way, or a rename
    that a FUSE / Drive mount does as copy + delete, killed after the copy). They never count, but a shard's
    temp is as big as the shard, and on Drive it would use quota for ever. Only files untouched for
    `max_age` seconds go: a worker still writing one keeps it fresh. Returns how many were deleted."""
    removed = 0
    now = time.time()
    for folder in (job_dir / SHARDS, job_dir / MARKERS):
        for name in storage.listdir(folder):
            if not storage.is_temp_name(name):
                continue
            try:
                if now - (folder / name).stat().st_mtime < max_age:
                    continue
            except FileNotFoundError:
                continue
            storage.remove(folder / name)
            removed += 1
    return removed


def valid_shards(job_dir: Path) -> list[Path]:
    """Shards vouched for by a marker that agrees with them (size, footer row count), in name order.
    A shard without a marker, a marker without its shard, or any disagreement: not counted."""
    import pyarrow.parquet as pq

    found = []
    for entry in storage.listdir(job_dir / MARKERS):
        if entry.startswith(".") or not entry.endswith(".json"):
            continue
        try:
            marker = storage.read_json(job_dir / MARKERS / entry)
            shard = job_dir / SHARDS / marker["shard"]
            if shard.stat().st_size != marker["bytes"]:
                continue
            if pq.read_metadata(shard).num_rows != marker["rows"]:
                continue
        except (OSError, ValueError, KeyError, TypeError, RunnerError):
            continue  # torn marker, missing or truncated shard: its rows are simply not done
        except Exception as e:  # pyarrow's ArrowInvalid on a half-written file
            if type(e).__name__.startswith("Arrow"):
                continue
            raise
        found.append(shard)
    return found


def done_mask(job_dir: Path, rows: int, samples: int) -> Any:
    """Which (row, sample) pairs are in counted shards, as a [rows, samples] numpy bool array: one byte per
    result row, where a set of (row, sample) tuples takes ~100."""
    import numpy as np
    import pyarrow.parquet as pq

    mask = np.zeros((rows, samples), dtype=bool)
    for shard in valid_shards(job_dir):
        t = pq.read_table(shard, columns=[ORDER, "sample"])
        mask[t.column(ORDER).to_numpy(), t.column("sample").to_numpy()] = True
    return mask


def done_keys(job_dir: Path) -> set[tuple[int, int]]:
    """(row, sample) pairs already in counted shards (for small jobs and tests; workers use `done_mask`)."""
    import pyarrow.parquet as pq

    keys: set[tuple[int, int]] = set()
    for shard in valid_shards(job_dir):
        t = pq.read_table(shard, columns=[ORDER, "sample"])
        keys.update(zip(t.column(ORDER).to_pylist(), t.column("sample").to_pylist(), strict=True))
    return keys


def read_results_table(job_dir: Path) -> pa.Table:
    """All counted rows of a job, in input order, as one Arrow table (with the `_row` column)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = valid_shards(job_dir)
    if not shards:
        prompts_schema = pq.read_schema(job_dir / PROMPTS)
        meta = storage.read_json(job_dir / "job.json")
        params, kind = meta.get("params", {}), meta.get("kind", "generate")
        if kind == "score":
            schema = score_schema()
        elif kind == "embed":
            schema = embed_schema(int(meta.get("embedding_dim") or 0))
        else:
            schema = generation_schema(
                params.get("logprobs") is not None, bool(params.get("prompt_logprobs"))
            )
        for name in passthrough_columns(prompts_schema):
            schema = schema.append(prompts_schema.field(name))
        return schema.empty_table()
    table = pa.concat_tables([pq.read_table(s) for s in shards], promote_options="default")
    table = table.replace_schema_metadata(None)
    order = pc.sort_indices(table, sort_keys=[(ORDER, "ascending"), ("sample", "ascending")])
    table = table.take(order)
    keys = list(zip(table.column(ORDER).to_pylist(), table.column("sample").to_pylist(), strict=True))
    if len(set(keys)) != len(keys):  # cannot happen by construction; never show a row twice if it did
        warnings.warn(f"{job_dir}: duplicate result rows found and dropped", stacklevel=2)
        first = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
        table = table.take(pa.array(first))
    return table


def resolve_source(source: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """A job folder, a results Parquet file, or a job id / name in the job home."""
    p = Path(source)
    if p.is_file() or (p / "job.json").is_file():
        return p
    from .jobs import find_job

    return find_job(str(source), home)


def load_results(source: str | os.PathLike, home: str | os.PathLike | None = None) -> pd.DataFrame:
    """Results as a pandas DataFrame, one row per (prompt, sample), in input order.

    `source` is a job id or name (looked up in the job home: `home`, else $RUNNER_HOME, else ./jobs), a job
    folder (such as `runner run -o out/`), or a Parquet file of results. Rows not generated yet are absent;
    `runner status` says how many.
    """
    import pyarrow.parquet as pq

    path = resolve_source(source, home)
    table = pq.read_table(path) if path.is_file() else read_results_table(path)
    if ORDER in table.column_names:
        table = table.drop([ORDER])
    return table.to_pandas()


def read_errors(job_dir: Path) -> list[dict[str, Any]]:
    """Entries of the job's errors.jsonl (rows that could not be done, with the reason)."""
    return list(iter_errors(job_dir))


def iter_errors(job_dir: Path) -> Iterator[dict[str, Any]]:
    """`read_errors` one entry at a time: a big file submitted with --skip-invalid may list millions."""
    path = job_dir / "errors.jsonl"
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line torn by a kill mid-append
