"""How the benchmark measures: peak memory, CPU time and page faults of a block, the matmul roofline, parameter
counts, padding, token agreement, and the machine it ran on. Nothing here knows which method is being timed."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import time
from pathlib import Path
from typing import Any


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


MATMUL_SIZES = {
    "cpu": (1024, 2048, 4096),
    "quick": (1024, 2048),
    "cuda": (4096, 8192),
}  # square matrices timed


def matmul_flops(device, dtype, quick: bool) -> dict[str, Any]:
    """Best-of-N square matmul throughput (the compute roofline), plus a decode-shaped one for reference."""
    import torch

    sizes = MATMUL_SIZES["cuda" if device.type == "cuda" else "quick" if quick else "cpu"]
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
