"""Decode steps over fixed slots, replayed as CUDA graphs on a GPU (`EngineOptions.cuda_graphs`).

The H200 runs (benchmarks/RESULTS.md, 2026-12-04) found a small model's decode step bound by the host launching
kernels, the GPU busy about a third of the time; a step replayed as a CUDA graph was worth 2-3x the best eager
one there (graph_probe.py). A CUDA graph replays recorded kernels on the same tensors of the same shapes, while the
engine's own decode batch changes shape at every step (finished rows leave it, its cache grows). So a static
batch decodes here in fixed slots instead:

  * every row keeps its slot to the end of the batch; a finished row's slot goes on computing, its outputs
    unread (on a GPU a row more or less costs next to nothing; `Engine.generate` still returns each row's own);
  * each layer's keys/values live in one buffer [slots, heads, capacity, dim] (prompt width + max_new_tokens):
    rows are left-padded, so every row writes the same column `col` at a step, in place;
  * attention reads the first `end` columns, `end` the next multiple of GRAPH_COLUMNS: one graph per such
    bucket, recorded the first time the batch reaches it, after one eager step there (the warm-up a capture
    needs), then replayed; the token ids are copied into a fixed input, and the positions, the write column and
    the attention mask advance inside the graph.

On a CPU the same steps run eagerly (that is what the tests compare with the engine's own decode, token for
token), and a capture that fails on a GPU leaves the batch to eager static steps with a warning, and the engine's
later batches to its own decode (`Engine.static_decode` off: fixed slots only pay as graphs).

Only for models whose attention takes the step's 4D boolean mask as it is (`takes_bool_mask`): transformers'
sdpa. Eager attention adds a 4D mask to the scores (a boolean one adds 1 where it should mask).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

from .errors import first_line

# Key columns a graph attends over, a multiple of this (the last window ends at the batch's capacity): few
# graphs a batch, little attention spent on columns not written yet.
GRAPH_COLUMNS = 256
# Fewest new tokens a batch takes fixed slots for: the prefill gives the first, a window's first step is eager
# (the warm-up), and only the next is recorded; fewer would pay the buffers' copy for no graph.
MIN_NEW_TOKENS = 3


class FixedSlotsUnsupported(RuntimeError):
    """A step in fixed slots gave other logits than the row alone (Engine._check_fixed_slots): this model's
    forward does not take the fixed slots' 4D mask as given, so the engine decodes its own way instead."""


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def takes_bool_mask(model: Any) -> bool:
    """Whether `model`'s attention reads a 4D boolean mask as given (True: attend): transformers' sdpa, or
    runner's grouped sdpa (kvcache.ATTENTION). Eager attention adds the mask to the scores, so a boolean mask
    would add 1 instead of masking (silently wrong rows); flash attention and custom code take no 4D mask."""
    from .kvcache import ATTENTION

    return getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", ATTENTION)


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """A layer of keys/values in fixed buffers: `update` writes column `batch.col` of every row and returns the
        first `batch.end` columns, so the tensors a step touches are the same at every step."""

        def __init__(self, batch: StaticBatch, keys: Any, values: Any):
            super().__init__()
            # (weakly: the batch holds the cache that holds this layer, and a cycle would keep a finished batch's
            # keys/values and graphs in GPU memory until a full garbage collection, beside the next batch's)
            self.batch, self.buf_k, self.buf_v = weakref.proxy(batch), keys, values
            self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            col, end = self.batch.col, self.batch.end
            self.buf_k.index_copy_(2, col, key_states)
            self.buf_v.index_copy_(2, col, value_states)
            self.keys, self.values = self.buf_k[:, :, :end], self.buf_v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.batch.end

    return SlotLayer


class StaticBatch:
    """The decode state of one static batch in fixed slots: a cache of SlotLayers over preallocated buffers, the
    step's inputs (`ids`, `pos`), the write column (`col`) and the attention mask [slots, 1, 1, capacity], and
    on a GPU the graphs recorded per `end` bucket. `step` runs one decode step for the slots still decoding."""

    def __init__(self, engine: Any, cache: Any, lens: Any, extra: int, graphs: bool):
        import torch
        from transformers.cache_utils import DynamicCache

        self.engine, self.graphs = engine, graphs
        first = cache.layers[0]
        slots, _, width, _ = first.keys.shape
        device = first.keys.device
        self.capacity = width + extra  # (what the token budget counted for this batch: no more)
        self.next_col, self.end = width, width  # the column the next step writes (host copy of `col`)
        self.cache = DynamicCache()
        self.cache.layers = [self._copied(layer, slots, width) for layer in cache.layers]
        cols = torch.arange(self.capacity, device=device)
        # a row's real tokens are the last `lens` of the prompt width (left padding), then what it generates
        self.mask = ((cols >= width - lens[:, None]) & (cols < width))[:, None, None, :]
        self.col = torch.tensor([width], device=device)
        self.ids = torch.full((slots, 1), engine.pad_id, device=device)
        self.pos = lens.clone().unsqueeze(-1)
        # 1 for the slots still decoding: a finished slot's position stays where its row ended, within the
        # model's positions (a row with a long prompt and few new tokens beside one with many would otherwise
        # run past them: GPT-2's position embedding index out of range, a device-side assert on a GPU)
        self.live, self.n_live = torch.ones_like(self.pos), slots
        self.logits: Any = None  # [slots, vocab] float32, made by the first (eager) step
        self.recorded: dict[int, Any] = {}  # end -> torch.cuda.CUDAGraph
        self.warm: set[int] = set()  # ends that had their eager step (the warm-up before a capture)
        self.pool: Any = None
        self.capture_stream: Any = None  # the stream every capture of this batch records on (its pool's)

    def _copied(self, layer: Any, slots: int, width: int) -> Any:
        """One layer's prompt keys/values copied into zeroed buffers of the full capacity (columns not written
        yet are masked, and must be finite: 0 attention x NaN is NaN)."""
        k, v = layer.keys, layer.values
        buf_k = k.new_zeros((slots, k.shape[1], self.capacity, k.shape[3]))
        buf_v = v.new_zeros((slots, v.shape[1], self.capacity, v.shape[3]))
        buf_k[:, :, :width], buf_v[:, :, :width] = k, v
        # free each layer's old copy as soon as it is copied (as merge_prefills does)
        layer.keys = layer.values = None
        if hasattr(layer, "buf_k"):
            layer.buf_k = layer.buf_v = None
        return _layer_class()(self, buf_k, buf_v)

    def step(self, slots: Any, tokens: Any) -> Any:
        """One decode step: `tokens` ([active, 1]) are the next inputs of `slots` ([active] long); every slot
        computes. Returns the float32 next-token logits of `slots` [active, vocab]."""
        self.ids.index_copy_(0, slots, tokens)
        if slots.shape[0] != self.n_live:  # rows ended: their slots' positions stop (read by the graphs)
            self.live.zero_().index_fill_(0, slots, 1)
            self.n_live = slots.shape[0]
        self.end = min(self.capacity, _round_up(self.next_col + 1, GRAPH_COLUMNS))
        if not self.graphs:
            self._run()
        elif self.end in self.recorded:
            self.recorded[self.end].replay()
        elif self.end in self.warm:
            self._record_and_replay()
        else:
            self._warm_up()
        self.next_col += 1
        return self.logits.index_select(0, slots)

    @property
    def replayed(self) -> bool:
        """Whether the last step was a graph's replay, else run eagerly (Engine._check_fixed_slots checks the
        first of each kind)."""
        return self.end in self.recorded

    def _run(self) -> None:
        """The step itself (what a graph records): the new column joins the mask, the model writes its
        keys/values there, the logits are kept, and the column and positions move on."""
        self.mask.index_fill_(-1, self.col, True)
        out = self.engine.model(
            input_ids=self.ids, attention_mask=self.mask[..., : self.end], position_ids=self.pos,
            use_cache=True, **{self.engine._cache_arg: self.cache},
        )  # fmt: skip
        if self.logits is None:
            self.logits = out.logits[:, -1, :].float()
        else:
            self.logits.copy_(out.logits[:, -1, :])
        self.col.add_(1)
        self.pos.add_(self.live)

    def _warm_up(self) -> None:
        """The first step at a new `end`: eager, on a side stream (as torch's CUDA-graph recipe warms up)."""
        import torch

        device = self.col.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.warm.add(self.end)

    def _record_and_replay(self) -> None:
        """Record this step as a graph (recording runs nothing), then replay it. A capture that fails (an op
        that waits for the host, a model that cannot be recorded) leaves this batch to eager steps and the
        engine's later batches to its own decode: the same capture would fail again in each (a warning and, in
        torch, a capture pool left allocating-to every time)."""
        import torch

        device = self.col.device
        stream = torch.cuda.current_stream(device)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            # this batch's captures on its own GPU: torch.cuda.graph's default stream is made once, on whichever
            # device was current at the process's first capture, and a capture there records nothing of the
            # kernels run on another GPU (Engine(device="cuda:1") where cuda:0 is current): an empty graph,
            # replayed as nothing, every later step's logits stale
            self.capture_stream = torch.cuda.Stream(device)
        try:
            with (
                torch.cuda.device(device),
                torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream),
            ):
                self._run()
        except Exception as e:  # (a real error, not the capture's, is raised again by the eager step below)
            # torch.cuda.graph's __exit__ raises from capture_end() before it puts back the stream it captured on
            torch.cuda.set_stream(stream)
            warnings.warn(
                f"runner: CUDA graph capture failed, decoding eagerly from here on ({first_line(e)})",
                stacklevel=2,
            )
            self.graphs = False
            self.engine.static_decode = False
            self._run()
            return
        self.recorded[self.end] = graph
        graph.replay()
