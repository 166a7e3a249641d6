"""`--profile`: a torch.profiler breakdown of runner's default path by op bucket, split into the prompt pass
(Engine._prefill) and decode, and the prompt pass timed unprofiled against one prompt at a time."""

from __future__ import annotations

import time
from typing import Any

from measure import sync
from runner_paths import run_runner

CATEGORIES = [
    (
        "matmul (linear/mm/addmm/bmm)",
        (
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::linear",
            "aten::matmul",
            "aten::_addmm_activation",
            "mkldnn",
            "aten::baddbmm",
        ),
    ),
    ("attention (sdpa kernels)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("log_softmax (runner log-probs)", ("aten::_log_softmax", "aten::log_softmax")),
    ("KV cache / mask concat (aten::cat)", ("aten::cat",)),
    (
        "copies (copy_/clone/contiguous/to)",
        (
            "aten::copy_",
            "aten::clone",
            "aten::contiguous",
            "aten::to",
            "aten::_to_copy",
            "aten::index_select",
            "aten::index",
        ),
    ),
    (
        "argmax / isin / item / tolist",
        (
            "aten::argmax",
            "aten::isin",
            "aten::item",
            "aten::_local_scalar_dense",
            "aten::isfinite",
            "aten::gather",
            "aten::any",
        ),
    ),
]


def _bucketize(prof, device) -> tuple[dict[str, float], float, list[tuple[str, float]], int]:
    """Self time per bucket (seconds), total op self time, top ops, op calls. On CUDA, device (kernel) time."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    self_us: dict[str, float] = {}
    for ev in events:
        self_us[ev.key] = self_us.get(ev.key, 0.0) + float(getattr(ev, attr, 0.0) or 0.0)
    buckets: dict[str, float] = {}
    other = "other ops (elementwise, norms, rope, ...)"
    for key, us in self_us.items():
        for cat, pats in CATEGORIES:
            if any(key == p or (not p.startswith("aten::") and p in key) for p in pats):
                buckets[cat] = buckets.get(cat, 0.0) + us / 1e6
                break
        else:
            buckets[other] = buckets.get(other, 0.0) + us / 1e6
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:15]
    return (
        buckets,
        sum(self_us.values()) / 1e6,
        [(k, us / 1e6) for k, us in top],
        sum(ev.count for ev in events),
    )


def _prefills(engine, ids, plan, n_new: int, as_engine: bool) -> float:
    """Seconds for the prompt pass alone: per planned batch as the engine does it (grouped prefill, caches
    merged for decoding; as_engine=True), or one prompt at a time without padding (as_engine=False)."""
    import torch

    kw = {"logits_to_keep": 1} if engine._keep_arg else {}
    sync(engine.device)
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in plan:
            if as_engine:
                engine._prefill([ids[i] for i in batch], n_new)
                continue
            for i in batch:
                x = torch.tensor([ids[i]], device=engine.device)
                engine.model(input_ids=x, use_cache=True, **kw)
    sync(engine.device)
    return time.perf_counter() - t


def profile_runner(engine, ids, n_new, batch_size, budget) -> dict[str, Any]:
    """torch.profiler over one runner pass, and over its prompt pass alone (Engine._prefill); decode = the rest.
    Ops are bucketed by self time; 'python + framework overhead' is wall time minus all ops' self time (HF module
    code, the engine's Python loop, the dispatcher, and the profiler's own overhead). Unprofiled, also times the
    engine's prompt pass (grouped prefill + cache merge) vs one prompt at a time without padding."""
    from torch.profiler import ProfilerActivity, profile

    from runner.batching import plan_batches

    plan = plan_batches([len(p) for p in ids], batch_size, budget, n_new)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _, wall, _ = run_runner(engine, ids, n_new, batch_size, budget)
    total_b, total_ops, top, calls = _bucketize(prof, engine.device)
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        _prefills(engine, ids, plan, n_new, as_engine=True)
        pre_wall = time.perf_counter() - t
    pre_b, pre_ops, _, pre_calls = _bucketize(prof, engine.device)
    ovh = "python + framework overhead (wall - ops)"
    total_b[ovh] = max(0.0, wall - total_ops)
    pre_b[ovh] = max(0.0, pre_wall - pre_ops)
    rows = {
        k: {"total": v, "prefill": pre_b.get(k, 0.0), "decode": v - pre_b.get(k, 0.0)}
        for k, v in total_b.items()
    }
    return {
        "batch_size": batch_size,
        "wall_seconds_profiled": wall,
        "prefill_wall_seconds_profiled": pre_wall,
        "op_calls": calls,
        "decode_op_calls": calls - pre_calls,
        "decode_steps": len(plan) * (n_new - 1),
        "buckets_seconds": rows,
        "top_ops_self_seconds": top,
        "prefill_engine_seconds": _prefills(engine, ids, plan, n_new, as_engine=True),
        "prefill_unpadded_seconds": _prefills(engine, ids, plan, n_new, as_engine=False),
    }
