"""What a job computes for a batch of (row, sample) keys, per job kind, and how a failing batch is split.

worker.py hands a batch of keys to `make_task(...).compute` through `isolating`, which retries smaller
batches on out-of-memory and NaN/inf, so that only a row that fails alone becomes a `RowError`. Each sample's
randomness is seeded from (job seed, row id, sample) by `sample_seed`, so splitting never changes a result.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .batching import default_batch_size, default_batch_tokens
from .engine import ConstraintError, Engine, NumericalError

if TYPE_CHECKING:
    from .jobdir import Job

# With continuous batching a generate call takes this many planned batches and decodes at most one batch's worth
# of rows at once, the others joining as rows end: the longer the window, the less of it is the tail where slots
# empty with nobody left to join; but it is also what a kill loses and what a crash record holds.
REFILL_BATCHES = 4


def sample_seed(job_seed: int, row_id: str, sample: int) -> int:
    """The seed of one sample's generator: depends on the job seed, the row's id and the sample index only."""
    digest = hashlib.blake2b(f"{job_seed}\0{row_id}\0{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "cublas_status_alloc_failed" in text
    )


def decode_slots(lengths: list[int], batch_size: int, budget: int, new_tokens: int) -> int:
    """Rows of prompts of `lengths` that may decode at once: as many as `batching.plan_batches` puts in its first
    batch, the one of the longest prompts, so that any of them together stay within the token budget."""
    return max(1, min(batch_size, len(lengths), budget // (max(lengths) + new_tokens)))


@dataclass
class RowError:
    """A row that could not be done, recorded in errors.jsonl instead of the results."""

    error: str
    message: str


@dataclass
class Task:
    """What a job kind does with a batch of (row, sample) keys, and how its results become a table."""

    compute: Callable[[list[tuple[int, int]]], list[Any]]
    table: Callable[..., Any]
    tokens: Callable[[Any], int]  # tokens produced or read for one result, for tok/s
    new_tokens: int  # tokens each sequence grows by, for the batch budget
    finite: Callable[[Any], bool]  # every number of one result is finite (no NaN/inf log-prob is written)


def _all_finite(values: Iterable[float | None]) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _completion_finite(c: Any) -> bool:
    """A completion's numbers are finite; a row error in its place (a constraint that failed) has none."""
    if isinstance(c, RowError):
        return True
    return (
        _all_finite(c.token_logprobs)
        and _all_finite(c.prompt_logprobs or ())
        and all(_all_finite(lp for _, lp, _ in step) for step in c.top_logprobs or ())
    )


def _row_params(job: Job, prompts: Any) -> Callable[[int], Any]:
    """Row i of `prompts` -> its GenerationParams: the job's, or the job's with the row's own settings (one
    object per distinct setting, made once)."""
    import json

    from .params import ROW_SAMPLING, row_params

    base = job.params
    raw = (
        prompts.column("settings").to_pylist()
        if "settings" in prompts.column_names
        else [None] * prompts.num_rows
    )
    auto = bool(job.meta.get("sample_auto"))
    by_fields = job.meta.get("row_sampling") == ROW_SAMPLING  # jobs before it: sampling as they were made
    made: dict[str, Any] = {}

    def get(i: int) -> Any:
        text = raw[i]
        if not text:
            return base
        if text not in made:
            made[text] = row_params(base, auto, json.loads(text), by_fields)
        return made[text]

    return get


def make_task(
    job: Job,
    engine: Engine,
    prompts: Any,
    start: int = 0,
    stop: Callable[[], bool] | None = None,
    finished: Callable[[tuple[int, int], int], None] | None = None,
    stepped: Callable[[int], None] | None = None,
) -> Task:
    """The job kind's Task over `prompts`, a window of the job's prompts table whose first row is row `start`
    of the job; `compute` takes (row, sample) keys numbered over the whole job; `stop()` may abandon a
    generation batch between decode steps (engine.Stopped); `finished(key, tokens)` hears of each generated
    sample as it ends, before its batch does, and `stepped(tokens)` of each decode step (progress)."""
    if job.kind == "generate":
        return _generate_task(job, engine, prompts, start, stop, finished, stepped)
    from . import scoring
    from .jobdir import WHOLE_LAST_WINDOW
    from .results import embed_table, score_table

    params = job.params
    input_ids = prompts.column("input_ids").to_pylist()
    if job.kind == "score":
        froms = prompts.column("score_from").to_pylist()

        def score(keys: list[tuple[int, int]]) -> list[Any]:
            rows = [r - start for r, _ in keys]
            return scoring.score_rows(
                engine, [input_ids[r] for r in rows], [froms[r] for r in rows], params.stride,
                whole_last=bool(job.meta.get(WHOLE_LAST_WINDOW)),  # (a job of before: as it began)
            )  # fmt: skip

        return Task(
            score, score_table, lambda res: len(res.token_ids), 0, lambda r: _all_finite(r.token_logprobs)
        )

    def embed(keys: list[tuple[int, int]]) -> list[Any]:
        return scoring.embed_batch(engine, [input_ids[r - start] for r, _ in keys], params.pooling)

    return Task(embed, lambda p, rows, _t: embed_table(p, rows), lambda v: 0, 0, _all_finite)


def _generate_task(
    job: Job, engine: Engine, prompts: Any, start: int, stop: Any, finished: Any, stepped: Any
) -> Task:
    """make_task for generation: each key's row settings and seed, our decode loop for most rows, and
    transformers' generate for beam search / no_repeat_ngram_size rows (`_through_transformers`)."""
    from .results import completions_table

    ids = prompts.column("id").to_pylist()
    input_ids = prompts.column("input_ids").to_pylist()
    per_row = _row_params(job, prompts)
    longest = max([job.params.max_new_tokens] + [per_row(i).max_new_tokens for i in range(prompts.num_rows)])
    batch_size = default_batch_size(engine, job.options.batch_size)
    budget = job.options.max_batch_tokens or default_batch_tokens(engine, "generate")

    def generate(keys: list[tuple[int, int]]) -> list[Any]:
        rows = [per_row(r - start) for r, _ in keys]
        # a row's own seed, else the job's (recorded in job.json when none was given)
        seeds = [sample_seed(job.seed if p.seed is None else p.seed, ids[r - start], s)
                 for p, (r, s) in zip(rows, keys, strict=True)]  # fmt: skip
        batch = [input_ids[r - start] for r, _ in keys]
        # More keys than a batch (continuous batching): the rest join as rows end.
        slots = lambda prompts: decode_slots([len(p) for p in prompts], batch_size, budget, longest)  # noqa: E731
        return generate_keys(engine, keys, rows, seeds, batch, stop, finished, stepped, slots)

    outputs = job.meta.get("outputs") or {}
    settings = prompts.column("settings").to_pylist() if "settings" in prompts.column_names else None

    def table(prompts_: Any, generated: list[Any], texts: Any) -> Any:
        return completions_table(prompts_, generated, texts, outputs, settings)

    return Task(generate, table, lambda c: len(c.token_ids), longest, _completion_finite)


def generate_keys(engine: Engine, keys: list[tuple[int, int]], rows: list[Any], seeds: list[int],
                  batch: list[list[int]], stop: Any = None, finished: Any = None, stepped: Any = None,
                  slots: Callable[[list[list[int]]], int] | None = None) -> list[Any]:  # fmt: skip
    """One completion per (row, sample) key: our decode loop for most rows (`slots(prompts)`: how many decode at
    once), transformers' generate for beam search / no_repeat_ngram_size rows (`_through_transformers`). A key
    whose constraint's matcher gave up mid-sample (engine.ConstraintError) is a `constraint_error` RowError."""
    out = _through_transformers(engine, keys, rows, seeds, batch, stop, finished, stepped)
    mine = [i for i in range(len(keys)) if i not in out]
    if mine:
        prompts = [batch[i] for i in mine]
        on_finish = None if finished is None else (lambda j, tokens: finished(keys[mine[j]], tokens))
        try:
            done = engine.generate(prompts, [rows[i] for i in mine], [seeds[i] for i in mine], stop=stop,
                                   max_active=slots(prompts) if slots else None, on_finish=on_finish,
                                   on_step=stepped)  # fmt: skip
        except NumericalError as e:  # (its rows are positions in `mine`: the caller splits `keys`)
            raise NumericalError([mine[j] for j in e.rows]) from None
        except ConstraintError as e:  # (the others ran to their end, as alone)
            done = [
                RowError("constraint_error", e.failed[j]) if c is None else c for j, c in enumerate(e.done)
            ]
        out.update(zip(mine, done, strict=True))
    return [out[i] for i in range(len(keys))]


def _through_transformers(engine: Engine, keys: list[tuple[int, int]], rows: list[Any], seeds: list[int],
                          batch: list[list[int]], stop: Any, finished: Any, stepped: Any) -> dict[int, Any]:  # fmt: skip
    """Completions (by key position) of the keys whose settings need transformers' generate: a beam row's beams
    are searched once per batch and handed out by sample index (the n best); a sampled row draws each sample
    alone with its own seed, so batching never changes it."""
    from .engine import Stopped

    out: dict[int, Any] = {}
    beams: dict[int, list[Any]] = {}
    for i, ((r, s), p) in enumerate(zip(keys, rows, strict=True)):
        if not p.uses_transformers_generate:
            continue
        if stop is not None and stop():
            raise Stopped("stopped between prompts")
        if p.num_beams > 1:
            if r not in beams:
                beams[r] = engine.transformers_generate(batch[i], p, None, stop, stepped)
            out[i] = beams[r][s]
        else:
            out[i] = engine.transformers_generate(batch[i], p, seeds[i], stop, stepped)[0]
        if finished is not None:
            finished(keys[i], len(out[i].token_ids))
    return out


@dataclass
class Isolation:
    """What `isolating` learnt so far in this run."""

    rows: int | None = None  # after an out-of-memory, the batch size that worked
    float32_retried: list[tuple[int, int]] = field(default_factory=list)  # keys recomputed in float32


def isolating(
    engine: Engine,
    compute: Callable[[list[tuple[int, int]]], list[Any]],
    keys: list[tuple[int, int]],
    iso: Isolation,
) -> list[Any]:
    """Run `compute` on a batch; on out-of-memory or non-finite logits retry in smaller batches, so that
    only a row that fails alone becomes a `RowError` and the rest complete. Splitting never changes results:
    every sample carries its own seed. After an out-of-memory, `iso.rows` remembers the size that then
    worked, so later batches start there instead of failing first. Rows named by a `NumericalError` are
    retried alone and the others together; a row that is non-finite alone in float16/bfloat16 is recomputed
    with the model in float32 (`_retry_in_float32`). A continuous-batching window (more keys than slots) splits
    the same way: its halves keep the slots of a batch until they are no longer than one, so an out-of-memory
    there takes a split or two more to fit, and the rest of the unit then runs as static batches."""
    cap = iso.rows
    if cap is not None and len(keys) > cap:
        return [
            o for i in range(0, len(keys), cap) for o in isolating(engine, compute, keys[i : i + cap], iso)
        ]
    try:
        return list(compute(keys))
    except NumericalError as e:
        bad = {r for r in e.rows if 0 <= r < len(keys)}  # positions in this batch: a hint (it splits anyway)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        bad = None
    # Out of the handler before anything is retried: its traceback holds the failed batch's frames (its KV
    # cache, its logits), which would stay allocated through the retries and make them run out of memory.
    if bad is None:  # out of memory
        free_memory(engine)
        half = max(1, len(keys) // 2)
        iso.rows = half if iso.rows is None else min(iso.rows, half)
        if len(keys) == 1:
            return [RowError("out_of_memory", "this row does not fit in memory even alone (shorten the prompt "
                                              "or lower --max-new-tokens)")]  # fmt: skip
    elif len(keys) == 1:
        return [_retry_in_float32(engine, compute, keys, iso)]
    elif bad and len(bad) < len(keys):
        rest = [i for i in range(len(keys)) if i not in bad]
        got = dict(zip(rest, isolating(engine, compute, [keys[i] for i in rest], iso), strict=True))
        for i in sorted(bad):
            got[i] = isolating(engine, compute, [keys[i]], iso)[0]
        return [got[i] for i in range(len(keys))]
    half = len(keys) // 2
    return isolating(engine, compute, keys[:half], iso) + isolating(engine, compute, keys[half:], iso)


def _retry_in_float32(
    engine: Engine,
    compute: Callable[[list[tuple[int, int]]], list[Any]],
    keys: list[tuple[int, int]],
    iso: Isolation,
) -> Any:
    """One row whose logits are NaN/inf on its own: fp16 overflow is the usual cause, so compute it again
    with the model upcast to float32 (exact, and undone afterwards). A row that is non-finite even then, or
    whose retry does not fit in memory, becomes a RowError."""
    import torch

    dtype = dtype_name(engine)
    if engine.dtype == torch.float32:
        return RowError("numerical_error", "the model produced NaN/inf logits for this row in float32")
    fits = True
    try:
        with engine.in_float32():
            out = compute(keys)[0]
    except NumericalError:
        return RowError("numerical_error", f"the model produced NaN/inf logits for this row in {dtype} "
                                           "and again in float32")  # fmt: skip
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        fits = False  # (freed out of the handler, which holds the failed computation's frames)
    free_memory(engine)
    if not fits:
        return RowError("numerical_error", f"NaN/inf logits in {dtype}, and the model does not fit in memory "
                                           "in float32 to retry (try --dtype float32 on a larger device)")  # fmt: skip
    # (a row whose float32 recompute came back a row error, its constraint's failure, gets no float32 note)
    if not isinstance(out, RowError):
        iso.float32_retried.extend(keys)
    return out


def dtype_name(engine: Engine) -> str:
    return str(engine.dtype).replace("torch.", "")


def library_versions() -> str:
    """The versions that compute a row besides the model and settings (shard metadata: `note_precision`)."""
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def device_kind(engine: Engine) -> str:
    """What kind of device the engine computes on: the GPU's name ("Tesla T4"), else "cpu" (or mps...)."""
    import torch

    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    return engine.device.type


def free_memory(engine: Engine) -> None:
    import gc

    import torch

    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
