#!/usr/bin/env python
"""Throughput benchmark: runner's engine vs `model.generate` one prompt at a time vs `transformers.pipeline`.

One process, one loaded model, one fixed prompt set, greedy decoding with exactly --max-new-tokens tokens per prompt
(min_new_tokens = max_new_tokens, so every method does the same amount of work):

  naive     model.generate(...) one prompt at a time (batch 1, no padding)
  pipeline  transformers.pipeline("text-generation", batch_size=16), prompts in file order, left padding
  runner    runner.batching.plan_batches (length-sorted, budgeted) + Engine.generate per batch, with the engine's
            defaults (EngineOptions().batch_size, worker.default_batch_tokens) and a sweep of other batch sizes.
            Includes the raw log-prob (log_softmax + gather) that runner always computes.

Also: the device's matmul FLOP/s and the fraction of that roofline runner reaches, token agreement between the
three methods, the cost of runner's log-prob computation, and (--profile) a torch.profiler breakdown of the runner
path. See benchmarks/README.md.

    python benchmarks/bench.py --model smollm2 --device cpu --json-out benchmarks/results-smollm2.json
    python benchmarks/bench.py --model gpt2-random --device cpu
    python benchmarks/bench.py --model smollm2 --device cuda --batch-sizes 16,64,128,256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------------
# Prompt set: fixed, deterministic, mixed lengths (a few words .. ~200 tokens), about 1/6 Japanese.
# ----------------------------------------------------------------------------------------------------------------

SHORT_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "Translate to French: good morning",
    "The best way to learn a language is",
    "Q: What is 12 times 7?\nA:",
    "List three primary colors:",
    "In 1969, humans first",
    "日本の首都は",
    "今日の天気は",
    "Write a haiku about autumn.",
    "import numpy as np\n",
    "The mitochondria is",
    "Dear hiring manager,",
    "富士山の高さは",
    "A recipe for pancakes:",
]

EN_SENTENCES = [
    "The history of the printing press shows how a single invention can reshape the way knowledge spreads.",
    "Before Gutenberg, books were copied by hand, which made them rare, expensive and often inconsistent.",
    "Modern compilers translate high-level source code into machine instructions through several passes.",
    "Each pass transforms an intermediate representation, removing redundancy and exposing parallelism.",
    "Photosynthesis converts light energy into chemical energy stored in the bonds of glucose molecules.",
    "The chloroplast contains stacks of thylakoid membranes where the light-dependent reactions take place.",
    "A good unit test checks one behaviour, runs quickly and fails with a message that explains the problem.",
    "When the test suite is slow, developers run it less often, and regressions slip into the main branch.",
    "The river delta supports a dense population of birds that migrate thousands of kilometres every year.",
    "Farmers along the banks rely on seasonal floods to deposit fertile silt across their fields.",
    "In distributed systems, a network partition forces a choice between consistency and availability.",
    "Leases and heartbeats let a cluster detect failed workers and hand their work to someone else.",
    "The orchestra tuned their instruments while the audience slowly found their seats in the dim hall.",
    "A single oboe sounded the A, and the strings answered it one section at a time.",
    "Interest rates influence how much households borrow and how much companies invest in new factories.",
    "Central banks raise rates to cool inflation, accepting slower growth as the price of stable prices.",
    "The lighthouse keeper wrote in his logbook every evening, noting the wind, the tide and passing ships.",
    "On stormy nights he climbed the spiral stairs twice an hour to trim the wick and clean the lens.",
    "Transformer language models predict the next token from all previous tokens using self-attention.",
    "Caching the keys and values of earlier tokens makes each decoding step cost far less than the first.",
    "The expedition reached the glacier after nine days of walking through forests and over high passes.",
    "Their guide warned them that the ice bridge would not hold after the afternoon sun had softened it.",
    "Good documentation answers the question a reader has right now, not every question they might ask.",
    "Examples that can be copied and run teach faster than paragraphs of careful explanation.",
]

JA_SENTENCES = [
    "日本は四つの大きな島と数千の小さな島からなる国です。",
    "春になると、多くの人が公園で桜の花を見ながら食事を楽しみます。",
    "東京の地下鉄は時間に正確で、毎日何百万人もの人が利用しています。",
    "機械学習のモデルは大量のデータから規則を学び、新しい入力に対して予測を行います。",
    "京都には千年以上の歴史を持つ寺や神社がたくさんあります。",
    "秋の山は赤や黄色の葉で覆われ、ハイキングをする人でにぎわいます。",
    "この文章は、多言語の入力を扱う性能評価のために用意されたものです。",
    "新しい駅の建設は予定より二年遅れましたが、ついに来月開業します。",
]


def build_prompts(n: int, count_tokens) -> list[str]:
    """`n` prompts, deterministic for a given n and tokenizer. Kinds cycle: short (3/8), medium ~25-80 tokens
    (2/8), long ~110-190 tokens (2/8), Japanese medium/long (1/8); short ones include Japanese too."""
    rng = random.Random(1234)
    prompts: list[str] = []
    for i in range(n):
        kind = i % 8
        if kind in (0, 1, 2):
            prompts.append(SHORT_PROMPTS[(i // 8 * 3 + kind) % len(SHORT_PROMPTS)])
            continue
        if kind == 7:
            pool, target, sep = JA_SENTENCES, rng.randint(40, 190), ""
        else:
            pool, sep = EN_SENTENCES, " "
            target = rng.randint(25, 80) if kind in (3, 4) else rng.randint(110, 190)
        start = rng.randrange(len(pool))
        parts: list[str] = []
        j = 0
        while not parts or count_tokens(sep.join(parts)) < target:
            parts.append(pool[(start + j) % len(pool)])
            j += 1
        text = sep.join(parts)
        ask = [
            "Summarize the text above in one sentence:",
            "Continue the text:",
            "Question: what is the main idea?\nAnswer:",
        ]
        if kind == 7:
            text += "\n要約:"
        else:
            text += "\n\n" + ask[i % 3]
        prompts.append(text)
    rng.shuffle(prompts)  # file order mixes lengths, as a real input file does
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------------------


def smollm2_dir() -> str:
    from runner.models import DEMO_MODEL, resolve_model

    return resolve_model(DEMO_MODEL)


def gpt2_random_dir(seed: int) -> str:
    """A GPT-2-124M-shaped model (GPT2Config() defaults: 12 layers, 12 heads, n_embd 768, n_positions 1024), random
    init with a fixed seed, saved once as safetensors. Tokenizer: SmolLM2's byte-level BPE (49,152 tokens), so
    vocab_size is 49,152 instead of GPT-2's 50,257 (123.7M instead of 124.4M parameters; <1% less compute)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    from runner.models import cache_root

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    target = cache_root() / "bench" / f"gpt2-random-seed{seed}-v{len(tok)}"
    if (target / "config.json").is_file():
        return str(target)
    cfg = GPT2Config(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory during a `with` block: CUDA max_memory_allocated, or on CPU the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs; if that is not allowed, RSS sampled by a thread via psutil)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0
        self.base = 0
        self.method = ""

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.base = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS (VmHWM, reset per method)"
            self._thread = None
        except OSError:
            self._start_sampler()
        return self

    def _start_sampler(self):
        import threading

        self.method = "peak RSS (sampled every 10 ms)"
        self._stop = threading.Event()
        self._sampled = self.base

        def loop():
            while not self._stop.wait(0.01):
                self._sampled = max(self._sampled, _rss())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, _rss())
        else:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            self.peak = int(m.group(1)) * 1024 if m else _rss()
        return False


def _rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else 0


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no mmap for large blocks, no trimming of the heap top. Without
    this, every tensor over 32 MiB (KV-cache `torch.cat` results, big prefill activations) is mmap'ed and unmapped
    again, so each use pays fresh page faults - tens of seconds of kernel time per run on a VM. Same as
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge> MALLOC_TOP_PAD_=1GiB in the environment."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) == 1
        ok &= libc.mallopt(m_top_pad, ctypes.c_int(1 << 30)) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


class Usage:
    """CPU time (user, system) and minor page faults of this process during a `with` block."""

    def __enter__(self):
        import resource

        self._r0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc):
        import resource

        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.user = r1.ru_utime - self._r0.ru_utime
        self.sys = r1.ru_stime - self._r0.ru_stime
        self.minflt = r1.ru_minflt - self._r0.ru_minflt
        return False


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device, dtype, quick: bool) -> dict[str, Any]:
    """Best-of-N square matmul throughput (the compute roofline), plus a decode-shaped one for reference."""
    import torch

    sizes = [1024, 2048] if quick else [1024, 2048, 4096]
    if device.type == "cuda":
        sizes = [4096, 8192]
    best, per_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        sync(device)
        reps = 10 if device.type == "cuda" else 3
        t_best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            t_best = min(t_best, time.perf_counter() - t)
        per_size[n] = 2 * n**3 / t_best
        best = max(best, per_size[n])
        del a, b
    return {"peak_flops": best, "by_size": {str(k): v for k, v in per_size.items()}, "dtype": str(dtype)}


def linear_flops(device, dtype, rows: int, d_in: int, d_out: int) -> float:
    """Throughput of a decode-shaped linear layer [rows, d_in] x [d_in, d_out] (what each decode step runs)."""
    import torch

    x = torch.randn(rows, d_in, device=device, dtype=dtype)
    w = torch.randn(d_out, d_in, device=device, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    sync(device)
    reps = 50
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    sync(device)
    return 2 * rows * d_in * d_out * reps / (time.perf_counter() - t)


def param_counts(model) -> dict[str, int]:
    """all: unique parameters. flop: parameters that a token multiplies by = all - input embedding - position
    embedding + the LM head (counted once, also when it is tied to the input embedding)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings().weight.numel()
    pos = 0
    for name, mod in model.named_modules():
        if name.endswith(("wpe", "embed_positions", "position_embeddings")) and hasattr(mod, "weight"):
            pos += mod.weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"all": total, "non_embedding": total - emb - pos, "flop": total - emb - pos + head}


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return (slots - real) / slots if slots else 0.0


def compare(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """seq: fraction of prompts whose generated ids are identical; prefix: fraction of tokens before the first
    difference (a flipped near-tie changes everything after it); token: position-wise equal tokens."""
    same = prefix = equal = total = 0
    for x, y in zip(a, b, strict=True):
        same += x == y
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
        equal += sum(u == v for u, v in zip(x, y, strict=False))
        total += max(len(x), len(y))
    n = len(a)
    return {"seq": same / n, "prefix": prefix / total, "token": equal / total}


# ----------------------------------------------------------------------------------------------------------------
# The three methods
# ----------------------------------------------------------------------------------------------------------------


def run_naive(model, ids, n_new, eos_ids, pad_id, device) -> tuple[list[list[int]], float]:
    import torch

    outs = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            x = torch.tensor([p], device=device)
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
            )
            outs.append(y[0, x.shape[1] :].tolist())
    sync(device)
    return outs, time.perf_counter() - t0


def make_pipeline(model, model_dir, pad_id, batch_size):
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token_id = pad_id
    return pipeline("text-generation", model=model, tokenizer=tok, batch_size=batch_size)


def run_pipeline(
    pipe, texts, n_new, eos_ids, pad_id, device
) -> tuple[list[list[int]], list[list[int]], float]:
    """Returns (generated ids, prompt ids as the pipeline tokenized them, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    res = pipe(
        texts,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        return_tensors=True,
        add_special_tokens=True,  # as runner's batching.encode does for plain prompts
    )
    sync(device)
    seconds = time.perf_counter() - t0
    gens, prompts = [], []
    for r in res:
        seq = list(r[0]["generated_token_ids"])
        gens.append(seq[-n_new:])
        prompts.append(seq[:-n_new])
    return gens, prompts, seconds


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


# ----------------------------------------------------------------------------------------------------------------
# Profiling the runner path
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    cpu = ""
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else ""
    ram = 0
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram = int(m.group(1)) * 1024 if m else 0
    info = {
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu or platform.processor(),
        "ram_bytes": ram,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "gpt2-random"], default="smollm2")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16"
    )
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--pipeline-batch-size", type=int, default=16)
    ap.add_argument(
        "--batch-sizes", default="8,16,32,64,96,128", help="runner batch sizes to sweep (comma-separated)"
    )
    ap.add_argument(
        "--lp-repeats", type=int, default=2, help="alternating runs with/without log-probs (0: skip)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 8 new tokens, small sweep")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument(
        "--skip-plain-engine", action="store_true", help="skip runner's engine with every speed lever off"
    )
    ap.add_argument(
        "--skip-ablations", action="store_true", help="skip the runs with one speed lever off at a time"
    )
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler breakdown of the runner default path"
    )
    ap.add_argument("--seed", type=int, default=0, help="init seed of the gpt2-random model")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="default",
        help="tuned: glibc mallopt so freed memory stays in the process (no mmap/munmap page-fault churn "
        "for tensors over 32 MiB); applies to every method of the run",
    )
    ap.add_argument(
        "--profile-batch-size", type=int, default=0, help="batch size to profile (0: runner's default)"
    )
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.num_prompts = min(args.num_prompts, 16)
        args.max_new_tokens = min(args.max_new_tokens, 8)
        args.batch_sizes = "8,16"
        args.lp_repeats = min(args.lp_repeats, 1)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    malloc_tuned = tune_malloc() if args.malloc == "tuned" else False
    if args.malloc == "tuned" and not malloc_tuned:
        print(
            "warning: --malloc tuned: mallopt is not available (not glibc?); running with the default",
            file=sys.stderr,
        )
    import torch
    import transformers

    from runner.batching import encode
    from runner.engine import Engine
    from runner.params import EngineOptions
    from runner.worker import default_batch_tokens

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_new = args.max_new_tokens
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    model_dir = smollm2_dir() if args.model == "smollm2" else gpt2_random_dir(args.seed)
    t = time.perf_counter()
    engine = Engine(model_dir, EngineOptions(device=args.device, dtype=args.dtype))
    log(
        f"loaded {args.model} from {model_dir} on {engine.device} ({engine.dtype}) in {time.perf_counter() - t:.1f} s"
    )
    model, tok, dev = engine.model, engine.tokenizer, engine.device
    eos_ids, pad_id = list(engine.eos_ids), engine.pad_id
    counts = param_counts(model)

    texts = build_prompts(args.num_prompts, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    ids = [encode(tok, s, chat=False) for s in texts]
    lengths = [len(p) for p in ids]
    japanese = sum(bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", s)) for s in texts)
    log(
        f"{len(ids)} prompts, {sum(lengths)} prompt tokens, lengths {min(lengths)}..{max(lengths)} "
        f"(median {statistics.median(lengths):.0f}), {japanese} Japanese; {n_new} new tokens each"
    )

    res: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "model": {
            "name": args.model,
            "dir": model_dir,
            "dtype": str(engine.dtype),
            "device": str(dev),
            "params": counts,
            "vocab": model.config.vocab_size,
            "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size,
        },
        "prompts": {
            "count": len(ids),
            "prompt_tokens": sum(lengths),
            "min": min(lengths),
            "max": max(lengths),
            "median": statistics.median(lengths),
            "japanese": japanese,
        },
        "max_new_tokens": n_new,
        "malloc": "tuned (mallopt: mmap_max 0, trim_threshold 2 GiB, top_pad 1 GiB)"
        if malloc_tuned
        else "default",
        "methods": [],
    }

    # -- roofline -------------------------------------------------------------------------------------------
    log("matmul roofline ...")
    mm = matmul_flops(dev, engine.dtype, args.quick)
    hid = model.config.hidden_size
    inter = getattr(model.config, "intermediate_size", None) or 4 * hid
    mm["linear_rows64_flops"] = linear_flops(dev, engine.dtype, 64, hid, inter)
    res["matmul"] = mm
    res["loadavg_start"] = os.getloadavg()
    log(
        f"  peak {mm['peak_flops'] / 1e9:.1f} GFLOP/s; decode-shaped linear [64x{hid}]x[{hid}x{inter}] "
        f"{mm['linear_rows64_flops'] / 1e9:.1f} GFLOP/s"
    )

    def record(name, outs, seconds, mem, pad_frac, n_batches, batch_size, extra=None, usage=None):
        gen = sum(len(o) for o in outs)
        row = {
            "name": name,
            "batch_size": batch_size,
            "batches": n_batches,
            "seconds": seconds,
            "generated_tokens": gen,
            "prompt_tokens": sum(lengths),
            "tokens_per_second": gen / seconds,
            "prompts_per_second": len(outs) / seconds,
            "padding_fraction": pad_frac,
            "peak_memory_bytes": mem.peak,
            "memory_above_start_bytes": max(0, mem.peak - mem.base),
            "roofline_fraction": 2 * counts["flop"] * gen / seconds / mm["peak_flops"],
            "roofline_fraction_all_tokens": 2
            * counts["flop"]
            * (gen + sum(lengths))
            / seconds
            / mm["peak_flops"],
            "cpu_user_seconds": usage.user if usage else None,
            "cpu_sys_seconds": usage.sys if usage else None,
            "minor_page_faults": usage.minflt if usage else None,
            **(extra or {}),
        }
        res["methods"].append(row)
        res["memory_method"] = mem.method
        log(
            f"  {name}: {seconds:.1f} s, {row['tokens_per_second']:.1f} tok/s, {row['prompts_per_second']:.2f} "
            f"prompts/s, padding {pad_frac:.1%}, peak {fmt_bytes(mem.peak)}"
            + (
                f", cpu user {usage.user:.0f} s sys {usage.sys:.0f} s, {usage.minflt:,} page faults"
                if usage
                else ""
            )
        )
        return row

    outputs: dict[str, list[list[int]]] = {}

    # -- runner (first, so a crash there shows up before the slow naive loop) -------------------------------
    from runner.worker import default_batch_size

    default_bs = default_batch_size(engine, EngineOptions())
    budget = default_batch_tokens(engine)
    res["runner_defaults"] = {"batch_size": default_bs, "max_batch_tokens": budget}
    sweep = sorted({default_bs, *(int(x) for x in args.batch_sizes.split(",") if x.strip())})
    log(f"runner: default batch_size {default_bs}, token budget {budget}; sweep {sweep}")
    # Warm-up: one whole pass, so that every runner row is timed in steady state, as in a long job (the first
    # pass over a new shape also grows the heap: ~0.5M page faults here, 10% of a run).
    run_runner(engine, ids, n_new, default_bs, budget)
    for bs in sweep:
        with PeakMemory(dev) as mem, Usage() as use:
            outs, secs, plan = run_runner(engine, ids, n_new, bs, budget)
        name = "runner (default)" if bs == default_bs else f"runner bs={bs}"
        record(name, outs, secs, mem, padding_fraction(lengths, plan), len(plan), bs, usage=use)
        outputs[name] = outs

    # What each lever is worth, in the same run: the default path with one lever off at a time, then with all off
    # (one padded prefill per batch, transformers' DynamicCache, the model's own layers).
    ablations = [] if args.skip_ablations else [(f"runner default without {LEVERS[k]}", (k,)) for k in LEVERS]
    if not args.skip_plain_engine:
        ablations.append(
            ("runner default, all levers off (one prefill + DynamicCache, stock layers)", tuple(LEVERS))
        )
    for name, which in ablations:
        kernel = KERNEL_OF_LEVER.get(which[0])
        if len(which) == 1 and kernel and not engine.kernels[kernel]:
            continue  # not in use for this model and device: nothing to switch off
        with levers_off(engine, *which):
            with PeakMemory(dev) as mem, Usage() as use:
                outs, secs, plan = run_runner(engine, ids, n_new, default_bs, budget)
        record(name, outs, secs, mem, padding_fraction(lengths, plan), len(plan), default_bs, usage=use)
        outputs[name] = outs

    # -- log-prob overhead ----------------------------------------------------------------------------------
    if args.lp_repeats > 0:
        log("log-prob overhead (runner default, with vs without log_softmax) ...")
        with_lp, without_lp, calls = [], [], 0
        for _ in range(args.lp_repeats):
            _, s, plan = run_runner(engine, ids, n_new, default_bs, budget)
            with_lp.append(s)
            with no_logprobs() as c:
                _, s, _ = run_runner(engine, ids, n_new, default_bs, budget)
            calls += c[0]
            without_lp.append(s)
        steps = len(plan) * n_new
        rows_steps = len(ids) * n_new
        mean_rows = rows_steps / steps
        lsm = logsoftmax_step_seconds(max(1, round(mean_rows)), model.config.vocab_size, dev)
        res["logprob_overhead"] = {
            "with_seconds": min(with_lp),
            "without_seconds": min(without_lp),
            "measured_fraction": (min(with_lp) - min(without_lp)) / min(with_lp),
            "patched_calls": calls,
            "microbench_step_seconds": lsm,
            "decode_steps": steps,
            "mean_rows_per_step": mean_rows,
            "estimated_fraction": lsm * steps / min(with_lp),
        }
        lo = res["logprob_overhead"]
        log(
            f"  with {lo['with_seconds']:.2f} s, without {lo['without_seconds']:.2f} s -> measured "
            f"{lo['measured_fraction']:.1%}; microbench {lsm * 1e3:.2f} ms/step x {steps} steps -> "
            f"{lo['estimated_fraction']:.1%}"
        )

    # -- pipeline -------------------------------------------------------------------------------------------
    if not args.skip_pipeline:
        pbs = args.pipeline_batch_size
        log(f"pipeline batch_size={pbs} ...")
        pipe = make_pipeline(model, model_dir, pad_id, pbs)
        with plain_transformers(engine):
            run_pipeline(pipe, texts[:2], 2, eos_ids, pad_id, dev)  # warm-up
            with PeakMemory(dev) as mem, Usage() as use:
                outs, p_prompts, secs = run_pipeline(pipe, texts, n_new, eos_ids, pad_id, dev)
        p_tok = pipe.tokenizer
        p_lengths = [len(p_tok(s, add_special_tokens=True)["input_ids"]) for s in texts]
        same_inputs = all(q[len(q) - len(p) :] == p for q, p in zip(p_prompts, ids, strict=True))
        chunks = [list(range(i, min(i + pbs, len(ids)))) for i in range(0, len(ids), pbs)]
        record(
            f"pipeline bs={pbs}",
            outs,
            secs,
            mem,
            padding_fraction(p_lengths, chunks),
            len(chunks),
            pbs,
            {"same_prompt_ids_as_runner": same_inputs},
            usage=use,
        )
        outputs["pipeline"] = outs
        del pipe
        gc.collect()

    # -- naive ----------------------------------------------------------------------------------------------
    if not args.skip_naive:
        log(f"naive model.generate, one prompt at a time ({len(ids)} prompts) ...")
        with plain_transformers(engine):
            run_naive(model, ids[:1], 2, eos_ids, pad_id, dev)  # warm-up
            with PeakMemory(dev) as mem, Usage() as use:
                outs, secs = run_naive(model, ids, n_new, eos_ids, pad_id, dev)
        record("naive generate bs=1", outs, secs, mem, 0.0, len(ids), 1, usage=use)
        outputs["naive"] = outs

    # -- profile --------------------------------------------------------------------------------------------
    if args.profile:
        log("profiling runner default ...")
        res["profile"] = profile_runner(engine, ids, n_new, args.profile_batch_size or default_bs, budget)

    # -- comparisons ----------------------------------------------------------------------------------------
    ref = outputs["runner (default)"]
    byname = {m["name"]: m for m in res["methods"]}
    run_row = byname["runner (default)"]
    best = max(
        (m for m in res["methods"] if m["name"].startswith("runner")), key=lambda m: m["tokens_per_second"]
    )
    res["best_runner"] = {"name": best["name"], "batch_size": best["batch_size"]}
    res["matches"] = {}
    for other in ("naive", "pipeline"):
        if other in outputs:
            res["matches"][f"runner vs {other}"] = compare(ref, outputs[other])
    if "naive" in outputs and "pipeline" in outputs:
        res["matches"]["pipeline vs naive"] = compare(outputs["pipeline"], outputs["naive"])
    for name, outs in outputs.items():
        if name.startswith("runner") and name != "runner (default)":
            res["matches"][f"{name} vs runner (default)"] = compare(outs, ref)
    ratios = {}
    naive_row = byname.get("naive generate bs=1")
    pipe_row = next((m for m in res["methods"] if m["name"].startswith("pipeline")), None)
    for label, row in (("runner default", run_row), (f"runner best ({best['name']})", best)):
        if naive_row:
            ratios[f"{label} / naive"] = row["tokens_per_second"] / naive_row["tokens_per_second"]
        if pipe_row:
            ratios[f"{label} / pipeline"] = row["tokens_per_second"] / pipe_row["tokens_per_second"]
    res["ratios"] = ratios
    res["targets"] = {
        "runner >= 6x naive": ratios.get("runner default / naive", float("nan")) >= 6 if naive_row else None,
        "runner >= 1.5x pipeline": ratios.get("runner default / pipeline", float("nan")) >= 1.5
        if pipe_row
        else None,
        "runner >= 40% roofline": run_row["roofline_fraction"] >= 0.40,
    }

    res["matmul_end"] = matmul_flops(dev, engine.dtype, True)
    res["loadavg_end"] = os.getloadavg()
    print_report(res)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {args.json_out}")
    return 0


def print_report(res: dict[str, Any]) -> None:
    m, mm, pc = res["model"], res["matmul"], res["model"]["params"]
    print()
    print(
        f"## {m['name']}  ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']:,}; {m['dtype']} on {m['device']})"
    )
    p = res["prompts"]
    print(
        f"prompts: {p['count']} ({p['japanese']} Japanese), {p['prompt_tokens']:,} prompt tokens, lengths "
        f"{p['min']}..{p['max']} (median {p['median']:.0f}); {res['max_new_tokens']} new tokens each, greedy, "
        f"min_new_tokens = max_new_tokens"
    )
    print(
        f"params: all {pc['all'] / 1e6:.1f}M, non-embedding {pc['non_embedding'] / 1e6:.1f}M, roofline count "
        f"(non-embedding + LM head) {pc['flop'] / 1e6:.1f}M -> {2 * pc['flop'] / 1e6:.0f} MFLOP per token"
    )
    print(
        f"matmul roofline: {mm['peak_flops'] / 1e9:.1f} GFLOP/s ({mm['dtype']}, best square matmul; "
        f"decode-shaped linear with 64 rows: {mm['linear_rows64_flops'] / 1e9:.1f} GFLOP/s)"
    )
    if "matmul_end" in res:
        print(
            f"  (re-measured at the end: {res['matmul_end']['peak_flops'] / 1e9:.1f} GFLOP/s; load average at "
            f"start {res['loadavg_start'][0]:.2f}, at end {res['loadavg_end'][0]:.2f})"
        )
    print(
        f"runner defaults: batch_size {res['runner_defaults']['batch_size']}, max_batch_tokens "
        f"{res['runner_defaults']['max_batch_tokens']:,}"
    )
    print()
    hdr = (
        "| method | batches | seconds | output tok/s | prompts/s | padding | peak mem | mem above start "
        "| roofline (out tok) | roofline (all tok) | cpu user / sys s | page faults |"
    )
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in res["methods"]:
        print(
            f"| {r['name']} | {r['batches']} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | "
            f"{r['prompts_per_second']:.2f} | {r['padding_fraction']:.1%} | {fmt_bytes(r['peak_memory_bytes'])} | "
            f"{fmt_bytes(r['memory_above_start_bytes'])} | {r['roofline_fraction']:.1%} | "
            f"{r['roofline_fraction_all_tokens']:.1%} | "
            + (
                f"{r['cpu_user_seconds']:.0f} / {r['cpu_sys_seconds']:.0f} | {r['minor_page_faults'] / 1e6:.1f}M |"
                if r.get("cpu_user_seconds") is not None
                else "| |"
            )
        )
    print()
    print(f"memory: {res.get('memory_method', '')}; malloc: {res.get('malloc', 'default')}")
    if res["ratios"]:
        print("ratios (output tok/s): " + "; ".join(f"{k} = {v:.2f}x" for k, v in res["ratios"].items()))
    print(f"best runner batch size: {res['best_runner']['batch_size']}")
    print(
        "targets: "
        + "; ".join(
            f"{k}: {'n/a' if v is None else ('MET' if v else 'NOT MET')}" for k, v in res["targets"].items()
        )
    )
    if res["matches"]:
        print(
            "greedy agreement (seq = identical prompts, prefix = tokens before first difference, token = equal "
            "positions):"
        )
        for k, v in res["matches"].items():
            print(f"  {k}: seq {v['seq']:.1%}, prefix {v['prefix']:.1%}, token {v['token']:.1%}")
    pipe = next((r for r in res["methods"] if r["name"].startswith("pipeline")), None)
    if pipe is not None:
        print(f"pipeline tokenized the prompts exactly as runner: {pipe['same_prompt_ids_as_runner']}")
    lo = res.get("logprob_overhead")
    if lo:
        print(
            f"log-prob overhead: runner default {lo['with_seconds']:.2f} s with log_softmax, "
            f"{lo['without_seconds']:.2f} s without -> {lo['measured_fraction']:.1%} measured; microbenchmark "
            f"{lo['microbench_step_seconds'] * 1e3:.2f} ms per step ([{lo['mean_rows_per_step']:.0f} x vocab]) x "
            f"{lo['decode_steps']} steps = {lo['estimated_fraction']:.1%} of runner time"
        )
    prof = res.get("profile")
    if prof:
        wall, pre = prof["wall_seconds_profiled"], prof["prefill_wall_seconds_profiled"]
        run = next(
            r
            for r in res["methods"]
            if r["batch_size"] == prof["batch_size"] and r["name"].startswith("runner")
        )
        print()
        print(
            f"profile of runner bs={prof['batch_size']} (torch.profiler: {wall:.1f} s wall profiled, of which prefill "
            f"{pre:.1f} s; {prof['op_calls']:,} op calls, {prof['decode_op_calls'] / max(1, prof['decode_steps']):,.0f} "
            f"per decode step):"
        )
        print("| bucket | total s | share | prefill s | decode s | decode share |")
        print("|---|---|---|---|---|---|")
        dwall = max(1e-9, wall - pre)
        for k, v in sorted(prof["buckets_seconds"].items(), key=lambda kv: -kv[1]["total"]):
            print(
                f"| {k} | {v['total']:.2f} | {v['total'] / wall:.1%} | {v['prefill']:.2f} | {v['decode']:.2f} | "
                f"{v['decode'] / dwall:.1%} |"
            )
        print(
            "top ops by self time: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in prof["top_ops_self_seconds"][:10])
        )
        print(
            f"prefill (unprofiled): as the engine does it {prof['prefill_engine_seconds']:.2f} s = "
            f"{prof['prefill_engine_seconds'] / run['seconds']:.0%} of the runner run ({run['seconds']:.2f} s); "
            f"one prompt at a time without padding {prof['prefill_unpadded_seconds']:.2f} s"
        )


if __name__ == "__main__":
    sys.exit(main())
