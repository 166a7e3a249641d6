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

    return GrowingLayer


_LAYER_CLASS = None


def growing_layer_class():
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = _new_layer_class()
    return _LAYER_CLASS


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


def merge_prefills(caches: list[Any], extra: int) -> Any:
    """One cache for the rows of all `caches` (in order), left-padded to the longest, with room for `extra`
    more tokens. Padded slots are zeros; the caller's attention mask excludes them."""
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
        buf_k = torch.zeros((rows, h, capacity, d), dtype=k0.dtype, device=k0.device)
        buf_v = torch.zeros_like(buf_k)
        r = 0
        for (k, v), n in zip(parts, lengths, strict=True):
            b = k.shape[0]
            buf_k[r : r + b, :, longest - n : longest] = k
            buf_v[r : r + b, :, longest - n : longest] = v
            r += b
        layers.append(cls(buf_k, buf_v, longest))
        for c in caches:  # free each group's copy as soon as it is merged
            c.layers[i].keys = c.layers[i].values = None
    merged.layers = layers
    return merged
