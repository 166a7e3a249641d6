"""Faster kernels swapped into a loaded model, computing the same function.

`install` changes, per layer instance (never the classes, never the weights), two things:

* oneDNN for the matmuls on a CPU, with each weight packed once into oneDNN's own blocked layout. A decode step
  multiplies every weight matrix by only one row per sequence of the batch (64 rows by default). PyTorch sends a
  float32 CPU linear layer to MKL's sgemm, which repacks the weight on every call; on the project's 2-core dev
  machine it reaches 40-80 GFLOP/s at 64 rows. oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`, the one
  torch.compile's CPU backend emits) reaches 85-140 on the weights read in place, and 90-215 on weights packed
  once by `torch.ops.mkldnn._reorder_linear_weight` (the packing inductor does), at every row count measured
  (1 to 4,096): so a packed layer sends every call to oneDNN, the prompt pass included. The packed copy costs
  the layer's weight size once more in memory, so layers are packed only while the machine's available memory
  keeps twice that to spare (PACK_MEMORY_FACTOR), over the room a float32 retry of a bfloat16 model needs
  (Engine.in_float32 upcasts every weight: packed copies must not make a retry that fitted fail); unpacked
  layers send calls of up to SMALL_ROWS rows to oneDNN on the weight in place and bigger ones to MKL (faster
  there on an AVX2 machine). The model's own weights are never changed or copied over. Float32 on CPU, and
  bfloat16 where oneDNN takes it (`torch.ops.mkldnn._is_mkldnn_bf16_supported`: AVX-512 and newer, natively
  with avx512_bf16 or AMX, emulated on older AVX-512; torch's own bfloat16 linear goes to the same oneDNN
  there, and the packed weight gives the same numbers, 1.5x faster at decode's row counts on an AMX Xeon:
  benchmarks/RESULTS.md, 2026-12-05); only where the ops exist and agree with `torch.nn.functional.linear` on
  a probe in that dtype.
* GPT-2's activation, "gelu_new" (transformers' NewGELUActivation: seven elementwise ops, each a pass over
  memory), as PyTorch's fused `gelu(approximate="tanh")`: the same formula, which transformers itself ships as
  "gelu_pytorch_tanh" ("equivalent to NewGELU ... but much faster; not an exact numerical match due to
  rounding errors"): 8x faster on a [1374 x 3072] prompt activation here, results within 2.4e-7.

Both differ from the stock layers by float rounding only, as a different batch size already does.
`benchmarks/bench.py` measures what each is worth (runs with each off) and checks tokens still agree with
plain `model.generate`; `uninstall` puts the stock forward back.
"""

from __future__ import annotations

import types
from typing import Any

# Unpacked layers: up to SMALL_ROWS rows per call oneDNN, more MKL (MKL won from ~1,000 rows on AVX2).
SMALL_ROWS = 256
PACK_MEMORY_FACTOR = 2  # the packed copies take at most available memory / this
PACKED = "_runner_packed_weight"  # the attribute holding a layer's packed copy


def _onednn(x: Any, weight: Any, bias: Any) -> Any:
    """x @ weight.T + bias through oneDNN; `weight` is [out, in] as in nn.Linear (any strides)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _pack(weight: Any) -> Any:
    """`weight` ([out, in], any strides) in oneDNN's blocked layout: an opaque tensor only `_onednn` reads."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight)


def dtypes() -> tuple[Any, ...]:
    """The weight dtypes whose CPU linears go to oneDNN here: float32, and bfloat16 where oneDNN takes it (the
    test torch's own bfloat16 linear makes before it calls oneDNN: AVX-512 and newer)."""
    import torch

    onednn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return (torch.float32, torch.bfloat16) if onednn_bf16 else (torch.float32,)


def available(packed: bool = False, dtype: Any = None) -> bool:
    """Whether this torch has the oneDNN linear op (and, with `packed`, its weight packing) and it computes
    what F.linear computes, in `dtype` (default float32)."""
    import torch

    dtype = dtype or torch.float32
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if packed and not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen).to(dtype) for s in ((3, 1, 16), (8, 16), (8,)))
        prep = _pack if packed else (lambda t: t)
        tol = {"atol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
        with torch.inference_mode():
            ok = torch.allclose(_onednn(x, prep(w), b), torch.nn.functional.linear(x, w, b), **tol)
            ok = ok and torch.allclose(_onednn(x, prep(w.t().contiguous().t()), None), x @ w.t(), **tol)
        return bool(ok)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown: then nothing is packed)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _small(self: Any, x: Any) -> bool:
    import torch

    # no autograd formula for the oneDNN op: with gradients on, the layer's own forward runs; an input of
    # another dtype than the weight (upcast or cast after install) too
    rows = x.numel() // max(1, x.shape[-1])
    cpu = x.device.type == "cpu"  # (a model moved to a GPU after install: oneDNN takes CPU tensors only)
    return (
        cpu
        and x.dim() >= 2
        and rows <= SMALL_ROWS
        and x.dtype == self.weight.dtype
        and not torch.is_grad_enabled()
    )


def _packed_ok(self: Any, x: Any) -> bool:
    import torch

    # inputs of another dtype or device (the model was moved after install, to any device but the CPU, or upcast
    # by Engine.in_float32), or gradients on: the layer's own
    packed = self.__dict__.get(PACKED)
    cpu = x.device.type == "cpu"
    return packed is not None and x.dtype == packed.dtype and cpu and not torch.is_grad_enabled()


def _linear_forward(self: Any, x: Any) -> Any:
    if _packed_ok(self, x):
        return _onednn(x, self.__dict__[PACKED], self.bias)
    if _small(self, x):
        return _onednn(x, self.weight, self.bias)
    return type(self).forward(self, x)


def _conv1d_forward(self: Any, x: Any) -> Any:
    # transformers' Conv1D keeps its weight as [in, out]: its transpose is the [out, in] view oneDNN takes
    if _packed_ok(self, x):
        return _onednn(x, self.__dict__[PACKED], self.bias)
    if _small(self, x):
        return _onednn(x, self.weight.t(), self.bias)
    return type(self).forward(self, x)


def _gelu_forward(self: Any, x: Any) -> Any:
    import torch

    return torch.nn.functional.gelu(x, approximate="tanh")


def install(model: Any, pack: bool = True, cpu_linears: bool = True) -> dict[str, int]:
    """Swap the kernels described above into `model`. Returns how many layers got each:
    {"onednn_linear": n, "onednn_packed": k (of those n), "fused_gelu": m}. `pack=False` never packs;
    `cpu_linears=False` leaves every linear alone (a model on a GPU: its CPU-offloaded layers are accelerate's,
    whose hook moves their weights, and a forward swapped in would drop it)."""
    import torch
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    counts = {"onednn_linear": 0, "onednn_packed": 0, "fused_gelu": 0}
    linears = []
    for module in model.modules():
        kind = type(module)  # exact types: subclasses (quantized, LoRA...) keep their own forward
        if kind is NewGELUActivation:
            module.forward = types.MethodType(_gelu_forward, module)
            counts["fused_gelu"] += 1
        elif cpu_linears and kind in (torch.nn.Linear, Conv1D) and module.weight.dtype in dtypes():
            linears += [module] if module.weight.device.type == "cpu" else []
    usable = {d: available(dtype=d) for d in {m.weight.dtype for m in linears}}  # each dtype probed
    linears = [m for m in linears if usable[m.weight.dtype]]
    if not linears:
        return counts
    for module in linears:
        forward = _linear_forward if type(module) is torch.nn.Linear else _conv1d_forward
        module.forward = types.MethodType(forward, module)
    counts["onednn_linear"] = len(linears)
    counts["onednn_packed"] = _pack_layers(linears, _upcast_bytes(model)) if pack else 0
    return counts


def _upcast_bytes(model: Any) -> int:
    """The memory Engine.in_float32 adds upcasting `model`'s CPU tensors (a bfloat16 row retried in float32)."""
    import torch

    tensors = [t for g in (model.parameters(), model.buffers()) for t in g if t.is_floating_point()]
    cpu = [t for t in tensors if t.dtype != torch.float32 and t.device.type == "cpu"]
    return max(0, sum(t.numel() * (4 - t.element_size()) for t in cpu))


def _pack_layers(linears: list[Any], reserve: int = 0) -> int:
    """Give each layer its packed weight while memory allows (see the module's docstring), leaving `reserve`
    bytes out of it (what a float32 retry needs); how many got one."""
    import torch
    from transformers.pytorch_utils import Conv1D

    packable = {d: available(packed=True, dtype=d) for d in {m.weight.dtype for m in linears}}
    budget = (_available_memory() - reserve) // PACK_MEMORY_FACTOR  # what the packed copies may take in all
    packed = 0
    for module in (m for m in linears if packable[m.weight.dtype]):
        budget -= module.weight.numel() * module.weight.element_size()
        if budget < 0:
            break
        weight = module.weight.t() if type(module) is Conv1D else module.weight
        with torch.inference_mode():
            module.__dict__[PACKED] = _pack(weight.detach())
        packed += 1
    return packed


def uninstall(model: Any, which: tuple[str, ...] = ("onednn_linear", "fused_gelu")) -> None:
    """Undo `install` for the kinds in `which`: those layers back to their class's forward."""
    funcs = {"onednn_linear": (_linear_forward, _conv1d_forward), "fused_gelu": (_gelu_forward,)}
    undo = tuple(f for kind in which for f in funcs[kind])
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) in undo:
            del module.forward
            module.__dict__.pop(PACKED, None)
