#!/usr/bin/env python
"""Continuous batching A/B: static batches vs one refilled batch, on one workload, in one process.

The workload a real job looks like: chat prompts of mixed length (bench.py's prompt set through the model's chat
template), sampled (temperature 0.8, top-p 0.95, a seed per row), EOS allowed, and each row's max_new_tokens drawn
from 8..128 (--max-new-tokens) with a fixed seed, so answers end at very different steps.

  static   the worker's plan without continuous batching: plan_batches (length-sorted, budgeted) of --batch-size
           rows, one Engine.generate per batch; a batch runs until its longest row ends.
  refill   the same rows in the same order in one Engine.generate(..., max_active=--batch-size): rows that end
           leave and waiting rows are prefilled and join the running batch.

Both run after one warm-up (alternately, --repeats times each; tok/s from the fastest run); the report gives
wall and CPU seconds, output tok/s, the ratios, how many rows agree token for token (they should all: a row's
result does not depend on its companions) and the load average at start and end.

    RUNNER_CACHE=/tmp/rcache python benchmarks/refill.py --model smollm2 --batch-size 16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from pathlib import Path


def _bench():
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).with_name("bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options sdpa_probe.py and graph_probe.py share: one model, one device, one batch size."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json-out", type=Path)
    return ap


def probe_setup(args: argparse.Namespace):
    """A probe's engine (--model on --device, its default dtype there), bench.py's prompts (--num-prompts) and
    the head of its results."""
    from prompts import build_prompts

    from runner import EngineOptions
    from runner.engine import Engine

    engine = Engine(
        _bench().model_folder(argparse.Namespace(model=args.model, seed=0)), EngineOptions(device=args.device)
    )
    texts = build_prompts(args.num_prompts, lambda t: len(engine.tokenizer(t)["input_ids"]))
    res = {"model": args.model, "device": str(engine.device), "dtype": str(engine.dtype), "rows": len(texts),
           "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    return engine, texts, res


def workload(
    engine,
    n: int,
    greedy: bool,
    seed: int,
    longest: int = 128,
    samples: int = 1,
    few_shot: bool = False,
    natural: bool = False,
):
    """(prompt token ids, GenerationParams per row, seeds), the rows in the worker's plan order; with `samples`
    > 1 each row comes `samples` times (the keys of `-n samples`), each sample with its own seed; with
    `few_shot`, every prompt starts with prompts.FEW_SHOT; with `natural`, every row has max_new_tokens
    `longest` (as `runner submit --max-new-tokens` gives a whole file) and only EOS ends a row sooner."""
    from prompts import FEW_SHOT, build_prompts

    from runner import GenerationParams
    from runner.batching import encode, render_prompt
    from runner.tasks import sample_seed

    texts = build_prompts(n, lambda t: len(engine.tokenizer(t)["input_ids"]))
    texts = [FEW_SHOT + t for t in texts] if few_shot else texts
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    ids = []
    for t in texts:
        messages = [{"role": "user", "content": t}] if chat else None
        ids.append(encode(engine.tokenizer, render_prompt(t, messages, engine.tokenizer), chat))
    rng = random.Random(seed)
    sampling = {"temperature": 0.0} if greedy else {"temperature": 0.8, "top_p": 0.95}
    params = [
        GenerationParams(
            max_new_tokens=longest if natural else rng.randint(min(8, longest), longest), **sampling
        )
        for _ in ids
    ]
    keys = [(i, s) for i in range(n) for s in range(samples)]
    return (
        [ids[i] for i, _ in keys],
        [params[i] for i, _ in keys],
        [sample_seed(seed, str(i), s) for i, s in keys],
    )


def run_static(engine, ids, params, seeds, batch_size, budget):
    from runner.batching import plan_batches

    out = [None] * len(ids)
    longest = max(p.max_new_tokens for p in params)
    for batch in plan_batches([len(p) for p in ids], batch_size, budget, longest):
        done = engine.generate([ids[i] for i in batch], [params[i] for i in batch], [seeds[i] for i in batch])
        for i, c in zip(batch, done, strict=True):
            out[i] = c
    return out


def run_refill(engine, ids, params, seeds, batch_size, budget):
    from runner.batching import plan_batches
    from runner.tasks import decode_slots

    longest = max(p.max_new_tokens for p in params)
    order = [i for b in plan_batches([len(p) for p in ids], batch_size, budget, longest) for i in b]
    # as the worker does: no more rows decode at once than the token budget holds (static's batches are planned
    # within it too, so both run the same number of rows at most: not 256 against static's 85 on a GPU)
    slots = decode_slots([len(p) for p in ids], batch_size, budget, longest)
    done = engine.generate([ids[i] for i in order], [params[i] for i in order], [seeds[i] for i in order],
                           max_active=slots)  # fmt: skip
    out = [None] * len(ids)
    for i, c in zip(order, done, strict=True):
        out[i] = c
    return out


def run_static_unshared(engine, ids, params, seeds, batch_size, budget):
    """run_static with every row's prompt computed whole and on its own (Engine.share_prompts and
    Engine.share_prefix off): no prompt pass shared by the samples of a row, no shared start, as before."""
    engine.share_prompts = engine.share_prefix = False
    try:
        return run_static(engine, ids, params, seeds, batch_size, budget)
    finally:
        engine.share_prompts = engine.share_prefix = True


def count_steps(engine) -> list[int]:
    """Rows of every decode step the engine runs from now on (appended to the returned list)."""
    rows: list[int] = []
    real = engine._forward

    def forward(input_ids, attention_mask, position_ids, cache, last_only):
        if not last_only:
            rows.append(input_ids.shape[0])
        return real(input_ids, attention_mask, position_ids, cache, last_only)

    engine._forward = forward
    return rows


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU seconds say more about
    the work done than the wall clock, which counts the time other processes held the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def fmt(seconds: list[float]) -> str:
    return " / ".join(f"{s:.1f}" for s in seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, gpt2-random, smollm2-random, tiny-random or a model folder",
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, help="token budget per batch [default: the worker's: from "
                    "free memory on a GPU, runner's fixed one on CPU]")  # fmt: skip
    ap.add_argument(
        "--max-new-tokens", type=int, default=128, help="each row's max_new_tokens is drawn from 8..this"
    )
    ap.add_argument("--natural", action="store_true", help="every row gets max_new_tokens = --max-new-tokens "
                    "(one setting for the whole file, as users submit); answers end where the model says EOS")  # fmt: skip
    ap.add_argument("--greedy", action="store_true", help="greedy instead of sampling")
    ap.add_argument("--samples", type=int, default=1, help="samples per prompt (-n); > 1 implies --unshared")
    ap.add_argument("--few-shot", action="store_true", help="every prompt starts with the same few-shot "
                    "instruction (prompts.FEW_SHOT, ~200 tokens)")  # fmt: skip
    ap.add_argument("--unshared", action="store_true", help="add a static run without shared prompt work "
                    "(static_unshared: no shared prompt passes, no shared start)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the max_new_tokens draw and of the rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on most GPUs), float32, bfloat16, float16: in "
                    "float32 every row must agree token for token; in half precision a row's companions change "
                    "its rounding, and a sampled row parts from its static twin at the first near tie")  # fmt: skip
    ap.add_argument(
        "--repeats", type=int, default=1, help="run static and refill alternately this many times each"
    )
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    from runner import EngineOptions
    from runner.engine import Engine

    load_start = os.getloadavg()
    bench = _bench()
    model = bench.model_folder(argparse.Namespace(model=args.model, seed=0))  # --seed is the workload's
    engine = Engine(model, EngineOptions(device=args.device, dtype=args.dtype))
    if args.max_batch_tokens is None:
        from runner.batching import default_batch_tokens

        args.max_batch_tokens = default_batch_tokens(engine, "generate")
    ids, params, seeds = workload(
        engine,
        args.num_prompts,
        args.greedy,
        args.seed,
        args.max_new_tokens,
        args.samples,
        args.few_shot,
        args.natural,
    )
    engine.generate(ids[:4], params[:4], seeds[:4], max_active=2)  # warm-up: kernels, allocator, both paths
    res = {"model": args.model, "rows": len(ids), "batch_size": args.batch_size, "greedy": args.greedy,
           "few_shot": args.few_shot, "natural": args.natural,
           "prompt_tokens": sum(map(len, ids)), "shared_start": len(os.path.commonprefix(ids)),
           "max_new_tokens": [p.max_new_tokens for p in params],
           "loadavg_start": load_start}  # fmt: skip
    runs = {"static": run_static, "refill": run_refill}
    if args.samples > 1 or args.unshared:
        runs["static_unshared"] = run_static_unshared
    outs = {}
    steps = count_steps(engine)
    for name in [*runs] * args.repeats:  # static, refill, static, refill...: load changes hit both alike
        steps.clear()
        outs[name], wall, cpu = timed(
            runs[name], engine, ids, params, seeds, args.batch_size, args.max_batch_tokens
        )
        res.setdefault(f"{name}_seconds", []).append(wall)
        res.setdefault(f"{name}_cpu_seconds", []).append(cpu)
        res[f"{name}_decode_steps"] = len(steps)
        res[f"{name}_slot_use"] = sum(steps) / (len(steps) * args.batch_size)  # busy share of the slots
    static, refill = outs["static"], outs["refill"]
    res["loadavg_end"] = os.getloadavg()
    res["output_tokens"] = sum(len(c.token_ids) for c in static)
    res["eos_rows"] = sum(c.finish_reason == "stop" for c in static)
    for name in runs:
        res[f"{name}_tok_per_s"] = res["output_tokens"] / min(res[f"{name}_seconds"])
        res[f"{name}_tok_per_cpu_s"] = res["output_tokens"] / min(res[f"{name}_cpu_seconds"])
    res["speedup"] = res["refill_tok_per_s"] / res["static_tok_per_s"]
    res["speedup_cpu"] = res["refill_tok_per_cpu_s"] / res["static_tok_per_cpu_s"]
    res["rows_identical"] = sum(a.token_ids == b.token_ids for a, b in zip(static, refill, strict=True))
    unshared = outs.get("static_unshared")
    if unshared is not None:
        res["shared_speedup"] = res["static_tok_per_s"] / res["static_unshared_tok_per_s"]
        res["unshared_rows_identical"] = sum(
            a.token_ids == b.token_ids for a, b in zip(static, unshared, strict=True)
        )
    res["max_logprob_diff"] = max(
        (abs(x - y) for a, b in zip(static, refill, strict=True) if a.token_ids == b.token_ids
         for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True)),
        default=0.0,
    )  # fmt: skip
    print(
        f"{args.model}, {len(ids)} rows ({res['prompt_tokens']} prompt tokens, {res['shared_start']} of each shared "
        f"by all), batch size {args.batch_size}, "
        f"{'greedy' if args.greedy else 'sampled'}: {res['output_tokens']} output tokens, {res['eos_rows']} rows "
        f"ended by EOS\n"
        f"  static: {fmt(res['static_seconds'])} s, {res['static_tok_per_s']:.1f} tok/s; CPU {fmt(res['static_cpu_seconds'])} s, "
        f"{res['static_tok_per_cpu_s']:.1f} tok/CPU-s\n"
        f"  refill: {fmt(res['refill_seconds'])} s, {res['refill_tok_per_s']:.1f} tok/s ({res['speedup']:.2f}x); "
        f"CPU {fmt(res['refill_cpu_seconds'])} s, {res['refill_tok_per_cpu_s']:.1f} tok/CPU-s ({res['speedup_cpu']:.2f}x)\n"
        f"  decode steps: static {res['static_decode_steps']} ({res['static_slot_use']:.0%} of slots busy), refill "
        f"{res['refill_decode_steps']} ({res['refill_slot_use']:.0%})\n"
        + (
            f"  static without shared prompt work: {fmt(res['static_unshared_seconds'])} s, "
            f"{res['static_unshared_tok_per_s']:.1f} tok/s (shared: {res['shared_speedup']:.2f}x), rows identical "
            f"{res['unshared_rows_identical']}/{len(ids)}\n"
            if unshared is not None
            else ""
        )
        + f"  rows identical: {res['rows_identical']}/{len(ids)}, largest log-prob difference "
        f"{res['max_logprob_diff']:.1e}\n"
        f"  load average: start {load_start[0]:.2f}, end {res['loadavg_end'][0]:.2f}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
