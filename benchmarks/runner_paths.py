"""runner's side of every row: the code paths the benchmark times, and its speed levers switched off.

* `run_runner`: plan_batches + Engine.generate per batch, greedy with a fixed length (the fixed workload);
* `run_as_job`: a whole job, submitted then run by a worker, as `runner run` does (the realistic workload, so
  that any engine option, whichever layer reads it, takes effect);
* `score_seqs` / `embed_seqs`: runner.scoring as `runner score` / `runner embed` batch it;
* `levers_off` / `plain_transformers`: the engine without some of its speed levers, or the model exactly as
  transformers loaded it (for the baselines); `no_logprobs`: runner without its log-prob, for timing only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from measure import sync

KERNEL_OF_LEVER = {"onednn": "onednn_linear", "packed_weights": "onednn_packed", "fused_gelu": "fused_gelu"}
LEVERS = {  # KERNEL_OF_LEVER: the levers that are runner/kernels.py's, by its names
    "onednn": "oneDNN for CPU matmuls (runner/kernels.py)",
    "packed_weights": "weights packed for oneDNN (runner/kernels.py)",
    "fused_gelu": "fused GELU for gelu_new (runner/kernels.py)",
    "grouped_decode": "decode attention per length group (kvcache.GroupedCache)",
    "prefill_and_cache": "grouped prefill + in-place KV cache (kvcache.GrowingLayer)",
}


@contextlib.contextmanager
def levers_off(engine, *which: str):
    """The engine with some of its speed levers switched off (see LEVERS), restored on exit. With all of them
    off and attention back to plain sdpa, `engine.model` is the model exactly as transformers loaded it."""
    import runner.engine as engine_mod
    from runner import kernels

    model = engine.model
    swapped = [KERNEL_OF_LEVER[lever] for lever in which if lever in ("onednn", "fused_gelu")]
    unpacked = (
        {}
        if not {"onednn", "packed_weights"} & set(which)
        else {  # put back on exit, not repacked
            m: m.__dict__.pop(kernels.PACKED) for m in model.modules() if kernels.PACKED in m.__dict__
        }
    )
    saved = (engine.prefill_tokens, engine._merge_caches, engine._grouped, engine_mod.PREFILL_MIN_FILL)
    attn = model.config._attn_implementation
    try:
        kernels.uninstall(model, tuple(swapped))
        if "grouped_decode" in which:
            engine._grouped = False
        if "prefill_and_cache" in which:
            engine.prefill_tokens, engine._merge_caches, engine_mod.PREFILL_MIN_FILL = 10**12, False, 0.0
        if "attention" in which and attn != "sdpa":
            model.set_attn_implementation("sdpa")
        yield
    finally:
        engine.prefill_tokens, engine._merge_caches, engine._grouped, engine_mod.PREFILL_MIN_FILL = saved
        if model.config._attn_implementation != attn:
            model.set_attn_implementation(attn)
        if swapped:
            kernels.install(model, pack=False)
        for m, packed in unpacked.items():
            m.__dict__[kernels.PACKED] = packed


def plain_transformers(engine):
    """`engine.model` as transformers loaded it (sdpa, stock layers): for the naive and pipeline baselines."""
    return levers_off(engine, *LEVERS, "attention")


def run_runner(engine, ids, n_new, batch_size, budget) -> tuple[list[list[int]], float, list[list[int]]]:
    from runner.batching import plan_batches
    from runner.params import GenerationParams

    params = GenerationParams(max_new_tokens=n_new, min_new_tokens=n_new)
    plan = plan_batches([len(p) for p in ids], batch_size, budget, n_new)
    outs: list[list[int]] = [[] for _ in ids]
    sync(engine.device)
    t0 = time.perf_counter()
    for batch in plan:
        comps = engine.generate([ids[i] for i in batch], params, [0] * len(batch))
        for i, c in zip(batch, comps, strict=True):
            outs[i] = list(c.token_ids)
    sync(engine.device)
    return outs, time.perf_counter() - t0, plan


def run_as_job(engine, rows: list[dict], params, options, folder: Path) -> tuple[list[int], float]:
    """Submit ROWS (prompt dicts, per-row settings allowed) as a job in FOLDER, untimed, then time one worker
    running it with ENGINE, the job's own options on the engine while it runs (so an engine option counts
    whether the engine or the worker reads it). Returns (completion tokens of every result row, seconds)."""
    import runner
    from runner.jobs import create_job
    from runner.worker import run_job

    folder.mkdir(parents=True)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    job = create_job(prompts, engine.spec, params, options, job_dir=folder / "job")
    with engine_options(engine, options):
        sync(engine.device)
        t0 = time.perf_counter()
        summary = run_job(job, engine, echo=None)
        sync(engine.device)
        seconds = time.perf_counter() - t0
    if not summary.finished or summary.errors:
        raise RuntimeError(f"the benchmark job did not finish cleanly: {summary}")
    return [int(n) for n in runner.load_results(job.dir)["completion_tokens"]], seconds


@contextlib.contextmanager
def engine_options(engine, options):
    """ENGINE with OPTIONS' fields (those it has) as its `options` while the block runs."""
    saved = engine.options
    fields = {f.name for f in dataclasses.fields(saved)}
    engine.options = dataclasses.replace(saved, **{k: v for k, v in vars(options).items() if k in fields})
    try:
        yield
    finally:
        engine.options = saved


def score_seqs(
    engine, seqs: list[list[int]], batch_size: int, budget: int
) -> tuple[list[list[float]], float]:
    """Every token of SEQS after the first scored as a score job does (scoring.score_rows over length-sorted,
    budgeted batches): (log-probs per row, seconds)."""
    from runner import scoring

    sync(engine.device)
    t0 = time.perf_counter()
    scores = scoring.in_batches(lambda b, f: scoring.score_rows(engine, b, f, None, batch_size, budget), seqs,
                                [1] * len(seqs), batch_size=batch_size, max_batch_tokens=budget)  # fmt: skip
    sync(engine.device)
    return [s.token_logprobs for s in scores], time.perf_counter() - t0


def embed_seqs(engine, seqs: list[list[int]], batch_size: int, budget: int) -> tuple[int, float]:
    """A mean-pooled vector per row of SEQS as an embed job makes it (scoring.embed_batch over length-sorted,
    budgeted batches): (number of vectors, seconds)."""
    from runner import scoring

    sync(engine.device)
    t0 = time.perf_counter()
    vectors = scoring.in_batches(lambda b: scoring.embed_batch(engine, b, "mean"), seqs, batch_size=batch_size,
                                 max_batch_tokens=budget)  # fmt: skip
    sync(engine.device)
    return len(vectors), time.perf_counter() - t0


@contextlib.contextmanager
def no_logprobs():
    """Runner without its log-prob computation, for timing only: torch.log_softmax becomes the identity while the
    block runs (the engine gathers the 'log-prob' from raw logits instead; its greedy choice is unchanged)."""
    import torch

    real = torch.log_softmax
    calls = [0]

    def identity(x, dim=None, **kw):
        calls[0] += 1
        return x

    torch.log_softmax = identity
    try:
        yield calls
    finally:
        torch.log_softmax = real


def logsoftmax_step_seconds(rows: int, vocab: int, device, reps: int = 30) -> float:
    """Seconds for one decode step's log_softmax + gather on [rows, vocab] float32 logits."""
    import torch

    x = torch.randn(rows, vocab, device=device)
    tok = x.argmax(-1, keepdim=True)
    for _ in range(3):
        torch.log_softmax(x, dim=-1).gather(1, tok)
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        torch.log_softmax(x, dim=-1).gather(1, tok).tolist()
    sync(device)
    return (time.perf_counter() - t) / reps
