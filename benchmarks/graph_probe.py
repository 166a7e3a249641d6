#!/usr/bin/env python
"""What replaying decode steps as CUDA graphs would be worth: a probe for a GPU run (gpu_check.sh).

The first H200 run (2026-12-04, benchmarks/RESULTS.md) found decode steps bound by the host launching kernels
(GPU busy about a third of the time). The field's answer is a decode step replayed as a CUDA graph over a
static KV cache (vLLM; transformers' `cache_implementation="static"` with `torch.compile(mode="reduce-overhead")`).
Before building that into runner, this measures it on the same batches, in one process:

  generate            transformers `model.generate`, dynamic cache (plain eager)
  generate-static     `cache_implementation="static"` + CompileConfig (CUDA graphs on a GPU), after a warm-up
                      call that compiles; its compile time is reported apart
  runner              runner's engine on the same prompts at the same batch size (and at --runner-batch-sizes)
  runner-graphs       the same with `EngineOptions.cuda_graphs` (runner/graphs.py: fixed slots, each decode step
                      replayed as a CUDA graph; on a CPU the same fixed-slot steps, eagerly); rows compared with
                      runner's own

Every batch is left-padded to the longest prompt of the set, so one compiled graph serves them all (the best
case for the static cache: a real job's batches have other shapes). Greedy, exactly --max-new-tokens tokens.

    python benchmarks/graph_probe.py --model smollm2-random --device cuda --num-prompts 512 --batch-size 256
"""

from __future__ import annotations

import time

from refill import probe_parser, probe_setup


def batches(tok, texts: list[str], batch_size: int, device) -> list[dict]:
    longest = max(len(tok(t)["input_ids"]) for t in texts)
    return [
        tok(texts[i : i + batch_size], return_tensors="pt", padding="max_length", max_length=longest).to(
            device
        )
        for i in range(0, len(texts), batch_size)
    ]


def generate_all(model, encoded: list[dict], n_new: int, **extra) -> tuple[list[list[int]], float]:
    from measure import sync

    outs = []
    sync(model.device)
    start = time.perf_counter()
    for enc in encoded:
        out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, **extra)
        outs += out[:, enc["input_ids"].shape[1] :].tolist()
    sync(model.device)
    return outs, time.perf_counter() - start


def runner_rows(engine, ids: list[list[int]], new: int, batch_size: int) -> dict:
    """runner on `ids` at `batch_size`, its own decode then fixed slots replayed as CUDA graphs (each after a
    warm-up batch of 2 tokens): seconds and how many rows the two agree on token for token."""
    from runner_paths import run_runner

    from runner.batching import default_batch_tokens

    budget = default_batch_tokens(engine, "generate")
    row: dict = {"batch_size": batch_size}
    outs = {}
    for mode, static in (("eager", False), ("graphs", True)):
        engine.static_decode = static
        try:
            run_runner(engine, ids[:batch_size], 2, batch_size, budget)  # warm-up
            outs[mode], row[f"{mode}_seconds"], _ = run_runner(engine, ids, new, batch_size, budget)
        finally:
            engine.static_decode = False
    row["rows_identical"] = sum(a == b for a, b in zip(outs["eager"], outs["graphs"], strict=True))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = probe_parser(__doc__)
    ap.add_argument(
        "--no-compile", action="store_true", help="static cache without torch.compile (a CPU dry run)"
    )
    ap.add_argument(
        "--runner-batch-sizes", default="", help="more batch sizes for the runner rows, e.g. 64,512"
    )
    args = ap.parse_args(argv)

    from report import write_json

    from runner.batching import encode

    engine, texts, res = probe_setup(args)
    n, new = len(texts), args.max_new_tokens
    # runner's rows first (their JSON written at once): the compile below is the step whose length is unknown
    ids = [encode(engine.tokenizer, t, False) for t in texts]
    sizes = [args.batch_size, *(int(b) for b in args.runner_batch_sizes.split(",") if b.strip())]
    res["runner_sweep"] = []
    for b in dict.fromkeys(sizes):
        row = runner_rows(engine, ids, new, b)
        res["runner_sweep"].append(row)
        print(f"runner batch {b}: eager {row['eager_seconds']:.2f} s, {n * new / row['eager_seconds']:,.0f} tok/s;"
              f" cuda_graphs {row['graphs_seconds']:.2f} s, {n * new / row['graphs_seconds']:,.0f} tok/s"
              f" ({row['eager_seconds'] / row['graphs_seconds']:.2f}x); rows identical {row['rows_identical']}/{n}",
              flush=True)  # fmt: skip
        write_json(res, args.json_out, lambda *_: None)
    res["runner_seconds"] = res["runner_sweep"][0]["eager_seconds"]
    plain, graphs = transformers_rows(engine, texts, args, res)
    for name in ("generate", "generate_static", "runner"):
        res[f"{name}_tok_s"] = n * new / res[f"{name}_seconds"]
    res["static_rows_identical_to_generate"] = sum(a == b for a, b in zip(plain, graphs, strict=True))
    print(f"{args.model} on {engine.device} ({engine.dtype}), {n} prompts x {new} tokens, batch {args.batch_size}, "
          f"padded to {res['padded_to']}: generate {res['generate_tok_s']:,.0f} tok/s; static cache"
          f"{'' if args.no_compile else ' + compile'} {res['generate_static_tok_s']:,.0f} tok/s (first call "
          f"{res['generate_static_first_call_seconds']:.1f} s); runner {res['runner_tok_s']:,.0f} tok/s; "
          f"static / runner {res['generate_static_tok_s'] / res['runner_tok_s']:.2f}x; rows static == dynamic "
          f"{res['static_rows_identical_to_generate']}/{n}", flush=True)  # fmt: skip
    write_json(res, args.json_out, print)
    return 0


def transformers_rows(engine, texts: list[str], args, res: dict) -> tuple[list, list]:
    """`generate` eager, then with the static cache (compiled unless --no-compile), on the same batches left-padded
    to the longest prompt: their seconds into `res`; returns both's tokens."""
    from runner_paths import plain_transformers
    from transformers import CompileConfig

    model, tok = engine.model, engine.tokenizer
    tok.padding_side = "left"
    encoded = batches(tok, texts, args.batch_size, engine.device)
    res.update(padded_to=encoded[0]["input_ids"].shape[1], compiled=not args.no_compile)
    static = {"cache_implementation": "static"}
    if not args.no_compile:
        static["compile_config"] = CompileConfig()
    new = args.max_new_tokens
    with plain_transformers(engine):  # the model exactly as transformers loaded it
        generate_all(model, encoded[:1], 2)  # warm-up
        plain, res["generate_seconds"] = generate_all(model, encoded, new)
        _, res["generate_static_first_call_seconds"] = generate_all(model, encoded[:1], new, **static)
        graphs, res["generate_static_seconds"] = generate_all(model, encoded, new, **static)
    return plain, graphs


if __name__ == "__main__":
    raise SystemExit(main())
