#!/usr/bin/env python
"""Which attention kernels a decode step should use on a GPU: a probe for the next GPU run (gpu_check.sh).

The first H200 run (2026-12-04, benchmarks/RESULTS.md) found torch dispatching the decode steps' masked
attention to cuDNN (`aten::_cudnn_attention_forward`), and a batch-size sweep that was not monotonic (GPT-2
shape: 256 rows a batch 0.45x the speed of 64 and of 1,024). cuDNN builds an execution graph for each new shape,
and a decode step's key length grows by one every step: the suspicion is graph builds, paid again by every
batch whose cache has another shape. This runs the same static batches (greedy, exactly --max-new-tokens each)
under each attention policy, twice (cold: shapes never seen; warm: the same shapes again), in one process:

  default     torch's own choice (cuDNN on Hopper when it takes the mask)
  no-cudnn    torch.nn.attention.sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH])

and prints seconds, output tok/s, the ratio and token agreement with the default (bf16 rounding differs by
kernel, so a few rows may part on a near tie of a random-weight model).

    python benchmarks/sdpa_probe.py --model smollm2-random --device cuda --num-prompts 512 --batch-size 256
"""

from __future__ import annotations

import argparse
import json

from refill import _bench


def policies(device_type: str) -> dict[str, list | None]:
    from torch.nn.attention import SDPBackend

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if device_type == "cpu":  # (the CPU has no efficient-attention kernel: asking for it alone would fail)
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return {"default": None, "no-cudnn": fused}


def run(engine, ids, n_new, batch_size, budget, backends) -> tuple[list[list[int]], float]:
    import contextlib

    from runner_paths import run_runner
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        outs, seconds, _ = run_runner(engine, ids, n_new, batch_size, budget)
    return outs, seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)

    from prompts import build_prompts

    from runner import EngineOptions
    from runner.batching import default_batch_tokens, encode
    from runner.engine import Engine

    bench = _bench()
    engine = Engine(
        bench.model_folder(argparse.Namespace(model=args.model, seed=0)), EngineOptions(device=args.device)
    )
    texts = build_prompts(args.num_prompts, lambda t: len(engine.tokenizer(t)["input_ids"]))
    ids = [encode(engine.tokenizer, t, False) for t in texts]
    budget = default_batch_tokens(engine, "generate")
    res: dict = {"model": args.model, "device": str(engine.device), "dtype": str(engine.dtype), "rows": len(ids),
                 "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    outs = {}
    for name, backends in policies(engine.device.type).items():
        for phase in ("cold", "warm"):
            outs[name], seconds = run(engine, ids, args.max_new_tokens, args.batch_size, budget, backends)
            res[f"{name}_{phase}_seconds"] = seconds
            tok_s = len(ids) * args.max_new_tokens / seconds
            print(f"  {name:9s} {phase}: {seconds:6.2f} s, {tok_s:9.1f} tok/s", flush=True)
    base = res["default_warm_seconds"]
    for name in outs:
        res[f"{name}_warm_ratio"] = base / res[f"{name}_warm_seconds"]
        res[f"{name}_rows_identical"] = sum(a == b for a, b in zip(outs["default"], outs[name], strict=True))
    print(
        f"{args.model} on {engine.device} ({engine.dtype}), {len(ids)} prompts x {args.max_new_tokens} tokens, "
        f"batch size {args.batch_size}: no-cudnn / default (warm) = {res['no-cudnn_warm_ratio']:.2f}x, "
        f"rows identical {res['no-cudnn_rows_identical']}/{len(ids)}"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
