"""The KV cache the engine decodes with: prompts prefilled in tight groups, then decoded together in place.

engine.py prefills a batch in groups of similar length (little padding in the costly prompt pass), then
`merge_prefills` joins the groups' caches, left-padded, into one cache for the decode loop. Each layer keeps its
keys/values in a preallocated buffer that grows in chunks (`GrowingLayer`): appending a token writes one slot
in place, where transformers' DynamicLayer `torch.cat`s (copies) the whole cache of every layer at every step.

Only caches whose layers are all plain DynamicLayers (full attention: GPT-2, Llama, Qwen, Mistral without a
sliding window...) are merged; anything else (sliding windows, linear attention, quantized caches) is left to
transformers and decoded as one prefill, as before.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

GROW_TOKENS = 64  # buffer slots added at a time; a decode step writes into a free slot, no copy


def _new_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of a larger buffer [batch, heads, capacity, dim]."""

        def __init__(self, keys: Any, values: Any, length: int):
            super().__init__()
            self.buf_k, self.buf_v, self.length = keys, values, length
            self.device, self.dtype = keys.device, keys.dtype
            self.is_initialized = True
            self._views()

        def _views(self) -> None:
            self.keys = self.buf_k[:, :, : self.length]
            self.values = self.buf_v[:, :, : self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n = key_states.shape[-2]
            end = self.length + n
            if end > self.buf_k.shape[-2]:
                self.buf_k = _grow(self.buf_k, self.length, end + GROW_TOKENS)
                self.buf_v = _grow(self.buf_v, self.length, end + GROW_TOKENS)
            self.buf_k[:, :, self.length : end] = key_states
            self.buf_v[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            indices = indices.to(self.buf_k.device)  # (device_map: this layer may be on another GPU)
            self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
            self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.buf_k = self.buf_k.repeat_interleave(repeats, dim=0)
            self.buf_v = self.buf_v.repeat_interleave(repeats, dim=0)
            self._views()

        def reset(self) -> None:
            self.length = 0
            self._views()

        def drop_front(self, n: int) -> None:
            """Forget the first `n` slots (padding in every row): views of the same buffer, nothing copied."""
            self.buf_k, self.buf_v = self.buf_k[:, :, n:], self.buf_v[:, :, n:]
            self.length -= n
            self._views()

    return GrowingLayer


@functools.cache
def growing_layer_class():
    return _new_layer_class()


def _grow(buf: Any, length: int, capacity: int) -> Any:
    import torch

    b, h, _, d = buf.shape
    new = torch.empty((b, h, capacity, d), dtype=buf.dtype, device=buf.device)
    new[:, :, :length] = buf[:, :, :length]
    return new


def mergeable(cache: Any) -> bool:
    """True when every layer of `cache` is a plain transformers DynamicLayer holding keys and values."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (
        type(cache) is DynamicCache
        and bool(layers)
        and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        and all(layer.keys.dim() == 4 and layer.keys.shape == layer.values.shape for layer in layers)
    )


def select_rows(cache: Any, indices: Any) -> None:
    """Keep the batch rows `indices` of `cache`, each layer's on the layer's own device: with `device_map` the
    layers (and their caches) are spread over GPUs, and a tensor on cuda:1 cannot be indexed by one on cuda:0
    (transformers' `batch_select_indices` hands every layer the same indices)."""
    if isinstance(cache, grouped_cache_class()) or not hasattr(cache, "layers"):
        cache.batch_select_indices(indices)  # (a grouped cache selects group by group; its layers move them)
        return
    for layer in cache.layers:
        device = getattr(layer, "device", None)
        layer.batch_select_indices(indices if device is None else indices.to(device))


def merge_prefills(caches: list[Any], extra: int) -> Any:
    """One cache for the rows of all `caches` (in order), left-padded to the longest, with room for `extra`
    more tokens. Padded slots are zeros; the caller's attention mask excludes them. Slots past the prompts are
    left unset: a layer's keys/values are views of its first `length` slots only."""
    import torch
    from transformers.cache_utils import DynamicCache

    cls = growing_layer_class()
    lengths = [c.layers[0].keys.shape[-2] for c in caches]
    longest = max(lengths)
    rows = sum(c.layers[0].keys.shape[0] for c in caches)
    capacity = longest + max(1, min(extra, GROW_TOKENS))
    merged = DynamicCache()
    layers = []
    for i in range(len(caches[0].layers)):
        parts = [(c.layers[i].keys, c.layers[i].values) for c in caches]
        k0 = parts[0][0]
        _, h, _, d = k0.shape
        buf_k = torch.empty((rows, h, capacity, d), dtype=k0.dtype, device=k0.device)
        buf_v = torch.empty_like(buf_k)
        r = 0
        for (k, v), n in zip(parts, lengths, strict=True):
            b = k.shape[0]
            if n < longest:  # masked, but must be finite: 0 attention x NaN would still be NaN
                buf_k[r : r + b, :, : longest - n] = 0
                buf_v[r : r + b, :, : longest - n] = 0
            buf_k[r : r + b, :, longest - n : longest] = k
            buf_v[r : r + b, :, longest - n : longest] = v
            r += b
        layers.append(cls(buf_k, buf_v, longest))
        for c in caches:  # free each part's copy as soon as it is merged (the caller may still hold the part)
            part = c.layers[i]
            part.keys = part.values = None
            # a growing layer: its buffer too (a refill merges the running batch's cache)
            if hasattr(part, "buf_k"):
                part.buf_k = part.buf_v = None
    merged.layers = layers
    return merged


def drop_front(cache: Any, n: int) -> None:
    """Drop the first `n` slots of every layer of a merged cache (`merge_prefills`): columns that are padding in
    every row, left by rows that had longer prompts and left the batch."""
    if n > 0:
        for layer in cache.layers:
            layer.drop_front(n)


# ----------------------------------------------------------------------------------------------------------------
# Grouped decode: each prefill group keeps its own cache, and attention runs group by group
# ----------------------------------------------------------------------------------------------------------------
#
# Merged into one left-padded cache, a batch of mixed lengths makes every decode step read the padding too: with
# prompts of 3..229 tokens, two thirds of the keys/values read were padding, and on a CPU decode attention is
# bound by exactly those reads. A GroupedCache keeps the rows in groups of similar length (each group a merged
# cache of its own, >= 90% real tokens). The linear layers still run on the whole batch at once; only attention
# goes group by group, through `grouped_attention`, which the engine installs as the model's attention function
# (transformers' AttentionInterface) under the name ATTENTION. Outside a grouped decode step that function *is*
# transformers' sdpa, so prefill, scoring and anything else compute exactly what sdpa computes.

ATTENTION = "runner_sdpa"
_ACTIVE = threading.local()  # .cache: the GroupedCache of the decode step running in this thread


class GroupingUnsupported(RuntimeError):
    """The model did not route every layer's attention through `grouped_attention` (a custom attention path):
    the step's output would be wrong, so the caller must decode this batch with one merged cache instead."""


def install_grouped_attention(model: Any) -> bool:
    """Make `model` use `grouped_attention` (sdpa unless a grouped decode is active). True when installed; False
    for models not on transformers' sdpa (eager-only or custom attention), which keep their own."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # same masks as sdpa
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError, AttributeError):
        return False
    return model.config._attn_implementation == ATTENTION


def grouped_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
    """transformers' sdpa attention, run group by group over a GroupedCache's own keys/values while one is
    active (a decode step: one query token per row), ignoring the merged `key`/`value`/`attention_mask`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = getattr(_ACTIVE, "cache", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    if query.shape[2] != 1 or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(cache.layers):
        raise GroupingUnsupported(f"attention call the grouped cache cannot serve ({type(module).__name__})")
    layer = cache.layers[layer_idx]
    outs = []
    for g, ((start, end), sub) in enumerate(zip(cache.bounds, layer.subs, strict=True)):
        out, _ = sdpa_attention_forward(
            module, query[start:end], sub.keys, sub.values, cache.mask(g, sub.length), **kwargs
        )
        outs.append(out)
    cache.calls += 1
    return torch.cat(outs) if len(outs) > 1 else outs[0], None


@functools.cache
def grouped_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GroupedLayer(DynamicLayer):
        """One model layer of a GroupedCache: a GrowingLayer per group. `update` appends each group's rows of
        the new token to that group's buffer; the length it reports is that of the merged (padded) layout."""

        def __init__(self, subs: list[Any], cache: Any):
            super().__init__()
            self.subs, self.cache = subs, cache
            self.length = max(s.length for s in subs)
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            for (start, end), sub in zip(self.cache.bounds, self.subs, strict=True):
                sub.update(key_states[start:end], value_states[start:end])
            self.length += key_states.shape[-2]
            return key_states, value_states  # grouped_attention reads the groups' buffers, not these

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            raise NotImplementedError("GroupedCache.batch_select_indices selects for all layers at once")

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a grouped cache is for decoding forward only")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("a grouped cache is for decoding forward only")

    return GroupedLayer


@functools.cache
def grouped_cache_class():
    import torch
    from transformers.cache_utils import DynamicCache

    class GroupedCache(DynamicCache):
        """A DynamicCache of GroupedLayers; `bounds[g]` are group g's decode-batch slots, `pads[g]` its rows'
        left padding. Used as a context manager around a decode step: active for `grouped_attention` inside."""

        def batch_select_indices(self, indices: Any) -> None:
            """Keep the decode-batch slots `indices` (ascending), group by group; empty groups go."""
            keep = indices.tolist()
            bounds, kept_groups, new_pads = [], [], []
            at = 0
            for g, (start, end) in enumerate(self.bounds):
                local = [i - start for i in keep if start <= i < end]
                if not local:
                    continue
                if len(local) < end - start:
                    sel = torch.tensor(local, device=indices.device)
                    for layer in self.layers:
                        layer.subs[g].batch_select_indices(sel)
                    self.pads[g] = self.pads[g][sel]
                kept_groups.append(g)
                new_pads.append(self.pads[g])
                bounds.append((at, at + len(local)))
                at += len(local)
            for layer in self.layers:
                layer.subs = [layer.subs[g] for g in kept_groups]
            self.bounds, self.pads, self._masks = bounds, new_pads, {}

        def mask(self, g: int, length: int) -> Any:
            """Group g's attention mask [rows, 1, 1, length]: True where a row has a real token."""
            hit = self._masks.get(g)
            if hit is None or hit[0] != length:
                pads = self.pads[g]
                m = torch.arange(length, device=pads.device)[None, :] >= pads[:, None]
                hit = self._masks[g] = (length, m[:, None, None, :])
            return hit[1]

        def __enter__(self):
            _ACTIVE.cache = self
            self.calls = 0
            return self

        def __exit__(self, *exc: Any) -> None:
            _ACTIVE.cache = None
            if exc[0] is None and self.calls != len(self.layers):
                raise GroupingUnsupported(
                    f"only {self.calls} of {len(self.layers)} layers used the grouped attention"
                )

    return GroupedCache


def is_grouped(cache: Any) -> bool:
    return isinstance(cache, grouped_cache_class())


def group_count(cache: Any) -> int:
    """Groups of a decode cache: a GroupedCache's, 1 for any other cache, 0 for none."""
    if cache is None:
        return 0
    return len(cache.bounds) if is_grouped(cache) else 1


def groups_of(cache: Any, lens: Any) -> list[tuple[Any, Any]]:
    """(merged cache, left padding per row [rows] long) of each group of a decode cache, in slot order: a
    GroupedCache's groups, or a merged cache (`merge_prefills`) as one group, whose rows hold `lens` tokens
    each, right-aligned. For `grouped`, which joins them again with other groups (continuous batching)."""
    from types import SimpleNamespace

    if is_grouped(cache):
        return [
            (SimpleNamespace(layers=[layer.subs[g] for layer in cache.layers]), cache.pads[g])
            for g in range(len(cache.bounds))
        ]
    return [(cache, cache.get_seq_length() - lens)]


def grouped(caches: list[Any], pads: list[Any]) -> Any:
    """One cache for the rows of all `caches` (merged caches from `merge_prefills`, in decode-batch order),
    kept apart per group. `pads[g]`: left-padding slots of each row in group g's buffer (a list or a tensor)."""
    import torch

    layer_cls = grouped_layer_class()
    device = caches[0].layers[0].keys.device
    cache = grouped_cache_class()()
    cache.bounds, at = [], 0
    for c in caches:
        rows = c.layers[0].keys.shape[0]
        cache.bounds.append((at, at + rows))
        at += rows
    cache.pads = [torch.as_tensor(p, dtype=torch.long, device=device) for p in pads]
    cache._masks, cache.calls = {}, 0
    cache.layers = [layer_cls([c.layers[i] for c in caches], cache) for i in range(len(caches[0].layers))]
    return cache


# ----------------------------------------------------------------------------------------------------------------
# A shared prompt start: prefilled once, its keys/values copied into every row
# ----------------------------------------------------------------------------------------------------------------


def repeat_rows(cache: Any, rows: int) -> Any:
    """A new DynamicCache holding `rows` copies of the one row of `cache` (a plain one: `mergeable`)."""
    from transformers.cache_utils import DynamicCache

    shape = (rows, -1, -1, -1)
    return DynamicCache(
        ddp_cache_data=[(lay.keys.expand(shape), lay.values.expand(shape)) for lay in cache.layers]
    )


def pads_first(cache: Any, shared: int, pads: Any) -> None:
    """Put each row's padding in front of its keys/values. A prefill after a shared start of `shared` tokens
    leaves row r as [shared start, pads[r] padding slots, its own tokens]; afterwards it is [padding, shared
    start, own tokens], the left padding every other cache of the engine has (the tokens' positions were given
    explicitly, so only the slots move)."""
    import torch

    keys = cache.layers[0].keys
    width = keys.shape[2]
    t = torch.arange(width, device=keys.device)[None, :]
    pads = pads[:, None].to(keys.device)
    src = torch.where(t < pads, shared + t, torch.where(t < pads + shared, t - pads, t))
    for layer in cache.layers:  # with a device_map, layers live on several devices
        index = src[:, None, :, None].to(layer.keys.device).expand(layer.keys.shape)
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
