#!/usr/bin/env python
"""Which attention kernels a decode step should use on a GPU: the probe that decided engine.GPU_ATTENTION.

The first H200 run (2026-12-04, benchmarks/RESULTS.md) found torch dispatching the decode steps' masked
attention to cuDNN (`aten::_cudnn_attention_forward`), and a batch-size sweep that was not monotonic (GPT-2
shape: 256 rows a batch 0.45x the speed of 64 and of 1,024). cuDNN builds an execution graph for each new shape,
and a decode step's key length grows by one every step. The second H200 run measured it (cold: 6.3 s with cuDNN,
2.0 s without), and runner now leaves cuDNN's kernel out on a GPU (engine.GPU_ATTENTION). This runs the same
static batches (greedy, exactly --max-new-tokens each) under each policy, twice (cold: shapes never seen; warm:
the same shapes again), in one process:

  cudnn       torch's own choice (cuDNN on Hopper when it takes the mask): GPU_ATTENTION + CUDNN_ATTENTION
  no-cudnn    runner's: GPU_ATTENTION (flash, memory-efficient, math)

and prints seconds, output tok/s, the ratios and token agreement with cuDNN's (bf16 rounding differs by kernel,
so a few rows may part on a near tie of a random-weight model). On CPU both policies are torch's choice.

    python benchmarks/sdpa_probe.py --model smollm2-random --device cuda --num-prompts 512 --batch-size 256
"""

from __future__ import annotations

from refill import probe_parser, probe_setup


def policies() -> dict[str, tuple[str, ...]]:
    """engine.GPU_ATTENTION for each policy: runner's (no cuDNN), and torch's own choice (cuDNN allowed)."""
    from runner.engine import GPU_ATTENTION

    return {"cudnn": ("CUDNN_ATTENTION", *GPU_ATTENTION), "no-cudnn": GPU_ATTENTION}


def run(engine, ids, n_new, batch_size, budget, kernels) -> tuple[list[list[int]], float]:
    from runner_paths import run_runner

    import runner.engine as engine_mod

    saved, engine_mod.GPU_ATTENTION = engine_mod.GPU_ATTENTION, kernels
    try:
        outs, seconds, _ = run_runner(engine, ids, n_new, batch_size, budget)
    finally:
        engine_mod.GPU_ATTENTION = saved
    return outs, seconds


def main(argv: list[str] | None = None) -> int:
    args = probe_parser(__doc__).parse_args(argv)

    from report import write_json

    from runner.batching import default_batch_tokens, encode

    engine, texts, res = probe_setup(args)
    ids = [encode(engine.tokenizer, t, False) for t in texts]
    budget = default_batch_tokens(engine, "generate")
    outs = {}
    for name, kernels in policies().items():
        for phase in ("cold", "warm"):
            outs[name], seconds = run(engine, ids, args.max_new_tokens, args.batch_size, budget, kernels)
            res[f"{name}_{phase}_seconds"] = seconds
            tok_s = len(ids) * args.max_new_tokens / seconds
            print(f"  {name:9s} {phase}: {seconds:6.2f} s, {tok_s:9.1f} tok/s", flush=True)
    for name in outs:
        for phase in ("cold", "warm"):
            res[f"{name}_{phase}_ratio"] = res[f"cudnn_{phase}_seconds"] / res[f"{name}_{phase}_seconds"]
        res[f"{name}_rows_identical"] = sum(a == b for a, b in zip(outs["cudnn"], outs[name], strict=True))
    print(
        f"{args.model} on {engine.device} ({engine.dtype}), {len(ids)} prompts x {args.max_new_tokens} tokens, "
        f"batch size {args.batch_size}: runner's kernels (no cuDNN) / with cuDNN: cold {res['no-cudnn_cold_ratio']:.2f}x, "
        f"warm {res['no-cudnn_warm_ratio']:.2f}x, "
        f"rows identical {res['no-cudnn_rows_identical']}/{len(ids)}"
    )
    write_json(res, args.json_out, print)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
