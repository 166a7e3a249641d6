"""Faster kernels swapped into a loaded model, computing the same function.

`install` changes, per layer instance (never the classes, never the weights), two things:

* oneDNN for the small matmuls of decoding on a CPU. A decode step multiplies every weight matrix by only one
  row per sequence of the batch (64 rows by default). PyTorch sends a float32 CPU linear layer to MKL's sgemm,
  which on the project's 2-core dev machine (AMD EPYC, AVX2) reaches 40-80 GFLOP/s at 64 rows; oneDNN's kernel
  (`torch.ops.mkldnn._linear_pointwise`, the one torch.compile's CPU backend emits) reaches 85-100 on the same
  weights, read in place. The model's Linear layers (and GPT-2's Conv1D) go to oneDNN for calls of up to
  SMALL_ROWS rows; bigger calls (the prompt pass) stay with MKL, which is faster there. No weight is copied.
  Float32 on CPU only, and only where the op exists and agrees with `torch.nn.functional.linear` on a probe.
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

SMALL_ROWS = 256  # up to this many rows per call: oneDNN; more: MKL (measured: MKL wins from ~1,000 rows)


def _onednn(x: Any, weight: Any, bias: Any) -> Any:
    """x @ weight.T + bias through oneDNN; `weight` is [out, in] as in nn.Linear (any strides)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def available() -> bool:
    """Whether this torch has the oneDNN linear op and it computes what F.linear computes."""
    import torch

    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((3, 1, 16), (8, 16), (8,)))
        with torch.inference_mode():
            ok = torch.allclose(_onednn(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4)
            ok = ok and torch.allclose(_onednn(x, w.t().contiguous().t(), None), x @ w.t(), atol=1e-4)
        return bool(ok)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _small(x: Any) -> bool:
    import torch

    # no autograd formula for the oneDNN op: with gradients on, the layer's own forward runs
    return x.dim() >= 2 and x.numel() // max(1, x.shape[-1]) <= SMALL_ROWS and not torch.is_grad_enabled()


def _linear_forward(self: Any, x: Any) -> Any:
    if _small(x):
        return _onednn(x, self.weight, self.bias)
    return type(self).forward(self, x)


def _conv1d_forward(self: Any, x: Any) -> Any:
    # transformers' Conv1D keeps its weight as [in, out]: its transpose is the [out, in] view oneDNN takes
    if _small(x):
        return _onednn(x, self.weight.t(), self.bias)
    return type(self).forward(self, x)


def _gelu_forward(self: Any, x: Any) -> Any:
    import torch

    return torch.nn.functional.gelu(x, approximate="tanh")


def install(model: Any) -> dict[str, int]:
    """Swap the kernels described above into `model`. Returns how many layers got each:
    {"onednn_linear": n, "fused_gelu": m}."""
    import torch
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    use_onednn = available()
    counts = {"onednn_linear": 0, "fused_gelu": 0}
    for module in model.modules():
        kind = type(module)  # exact types: subclasses (quantized, LoRA...) keep their own forward
        if kind is NewGELUActivation:
            module.forward = types.MethodType(_gelu_forward, module)
            counts["fused_gelu"] += 1
            continue
        if not use_onednn or kind not in (torch.nn.Linear, Conv1D):
            continue
        if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            continue
        forward = _linear_forward if kind is torch.nn.Linear else _conv1d_forward
        module.forward = types.MethodType(forward, module)
        counts["onednn_linear"] += 1
    return counts


def uninstall(model: Any, which: tuple[str, ...] = ("onednn_linear", "fused_gelu")) -> None:
    """Undo `install` for the kinds in `which`: those layers back to their class's forward."""
    funcs = {"onednn_linear": (_linear_forward, _conv1d_forward), "fused_gelu": (_gelu_forward,)}
    undo = tuple(f for kind in which for f in funcs[kind])
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, "__func__", None) in undo:
            del module.forward
