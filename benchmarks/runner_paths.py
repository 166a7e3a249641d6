"""runner's side of every row: the code paths the benchmark times, and its speed levers switched off.

* `run_runner`: plan_batches + Engine.generate per batch, greedy with a fixed length;
* `levers_off` / `plain_transformers`: the engine without some of its speed levers, or the model exactly as
  transformers loaded it (for the baselines); `no_logprobs`: runner without its log-prob, for timing only.
"""

from __future__ import annotations

import contextlib
import time

from measure import sync

KERNEL_OF_LEVER = {"onednn": "onednn_linear", "fused_gelu": "fused_gelu"}  # runner/kernels.py's names
LEVERS = {
    "onednn": "oneDNN for decode matmuls (runner/kernels.py)",
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
    swapped = [KERNEL_OF_LEVER[lever] for lever in which if lever in KERNEL_OF_LEVER]
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
            kernels.install(model)


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
