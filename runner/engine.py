"""Load a causal LM and generate for a batch of prompts, with raw log-probs computed inside the loop.

batching.py (token ids) -> `Engine.generate` -> `Completion`s -> worker.py (Parquet shards)

The decode loop is our own rather than `model.generate` for five reasons, each a requirement:
  * log-probs come from the raw next-token distribution (log_softmax of the unprocessed logits, vLLM's
    default), gathered step by step: extra memory O(batch x vocab), never O(batch x steps x vocab);
  * each sample draws its randomness from its own generator, seeded from (job seed, row id, sample), so a
    row's result does not depend on which batch it landed in: batched == unbatched, and a job killed and
    resumed with other batches reproduces itself;
  * rows that finish (EOS, stop string) leave the batch and the KV cache at once, so one long generation
    does not make the whole batch keep paying for finished rows; with `max_active` (continuous batching)
    waiting rows are prefilled and join the running batch in their place, their KV caches joined to its
    cache (as new groups of a kvcache.GroupedCache, or copied into the one merged cache);
  * stop strings are found on decoded text and cut from `text`, with `stop_reason` naming the string;
  * structured output (constraints.py): a row's JSON schema / regex / choices / grammar masks the scores its
    token is picked from, never the log-probs, and its matcher follows the row in and out of the batch.
The logits processors (sampling.py) compute what transformers' processors of the same names compute, with
each row's own settings as tensors, so that rows with different settings share a batch.

Speed (benchmarks/RESULTS.md measures each lever by switching it off): prompts are prefilled in groups of
similar length; the decode batch keeps its KV cache in preallocated buffers (kvcache.GrowingLayer) and, on CPU,
in one cache per length group with attention run group by group (kvcache.GroupedCache), so no step reads
padding; kernels.py swaps in faster kernels for the same functions (oneDNN small matmuls, fused GELU).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import constraints, graphs, kernels, kvcache
from .batching import left_pad
from .errors import ModelLoadError, RunnerError, first_line
from .models import (
    context_window,
    eos_token_ids,
    load_model,
    load_revision,
    load_tokenizer,
    pick_device,
    pick_dtype,
    reading_model,
    resolve_model,
    weight_file_stats,
)
from .params import EngineOptions, GenerationParams
from .tokens import TokenText, decode_many, partial_tail_tokens

# Prompt tokens decoded with the generation, so that a leading space survives (SentencePiece); moved back to the
# start of a character spelled in byte tokens (`_text_prefix`), up to DETOKENIZE_BACK more.
DETOKENIZE_CONTEXT = 4
DETOKENIZE_BACK = 3  # a UTF-8 character has at most 3 bytes after its first
# Most padded tokens in one prefill forward pass. A batch is prefilled in groups of similar length under this
# budget, then decoded together (kvcache.py); on CPU, small groups cost no matmul efficiency and waste no padding.
PREFILL_TOKENS_CPU, PREFILL_TOKENS_GPU = 2048, 16384
PREFILL_MIN_FILL = 0.9  # a prefill group's real tokens / padded tokens
# The start all prompts of a batch share (a chat template's system prompt, a few-shot instruction, a --template's
# head) is prefilled once and its keys/values copied into every row (`Engine._shared_prefix`), when it is at
# least this many tokens: a shorter one does not pay for its own forward pass and the copies.
SHARED_PREFIX_MIN = 16
# The first batch prefilled after a shared start is checked against one of its rows prefilled alone: a model
# whose forward ignores the position ids or the attention mask of a cache would give other logits. Log-prob
# distance allowed (the top tokens of that row): float rounding of a batch stays far below it.
PREFIX_CHECK_TOL = {"float32": 1e-2, "other": 0.3}
# Most groups of similar length a batch is decoded in, each with its own KV cache (kvcache.GroupedCache), so that
# decode attention does not read the padding of a batch of mixed lengths. Each group costs a small attention
# call per layer per step: cheap next to a CPU step; on GPUs, where small models' steps are launch-bound, it is
# off until measured there.
DECODE_GROUPS_CPU, DECODE_GROUPS_GPU = 8, 1
# Attention kernels on a GPU: flash, memory-efficient or math, never cuDNN's. cuDNN's attention (torch's first
# choice on Hopper for a masked bf16/fp16 attention) builds an execution graph for each new shape, and a decode
# step's keys grow by one every step, so a batch of shapes never seen pays a graph build per step. On an H200
# (2026-12-04, bf16, 1,024 prompts x 32 tokens, benchmarks/RESULTS.md): batches of 64 took 26.1 s with torch's
# choice and 3.0 s without cuDNN (GPT-2 shape; SmolLM2 shape 33.0 -> 11.5 s), batches of 1,024 0.5 -> 0.3 s.
GPU_ATTENTION = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # torch.nn.attention.SDPBackend names
# Continuous batching (`generate(..., max_active=)`): a running batch takes waiting rows once this share of its
# slots is free, so that the joiners' prefill is shared and they form a few decode groups, not one per row.
REFILL_SHARE = 0.125


@dataclass
class Completion:
    """One generated sample. `token_ids` includes the EOS token when one ended the sample."""

    token_ids: list[int]
    token_logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    stop_reason: str | None  # the stop string that ended it; None for EOS or length
    # Per generated token, the alternatives as (token_id, logprob, rank), most likely first, the chosen token
    # included even when it is not among the top K (then last, with its true rank). Only with `logprobs`.
    top_logprobs: list[list[tuple[int, float, int]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    # Structured output: whether `text` satisfies the row's constraint (a `length` finish can leave it
    # incomplete); None for a row without one.
    constraint_complete: bool | None = None
    tokens: list[str] | None = None  # each token's text in place (tokens.token_pieces), when asked for
    token_bytes: list[bytes] | None = None  # each token's exact UTF-8 bytes, beside `tokens`
    # runner.generate, beside `top_logprobs` / `prompt_logprobs`: each alternative's, each prompt token's
    # (text in place, bytes)
    top_tokens: list[list[tuple[str, bytes]]] | None = None
    prompt_token_texts: list[tuple[str, bytes]] | None = None
    beam_score: float | None = None  # beam search: transformers' length-penalised score of this beam

    @property
    def cumulative_logprob(self) -> float:
        return float(math.fsum(self.token_logprobs))


def _continues_a_character(name: Any) -> bool:
    """A byte-fallback token ("<0xAB>") holding a UTF-8 continuation byte: it is never a character's first."""
    return (
        isinstance(name, str)
        and len(name) == 6
        and name.startswith("<0x")
        and name.endswith(">")
        and name[3:5].upper() in _CONTINUATION_BYTES
    )


_CONTINUATION_BYTES = frozenset(f"{b:02X}" for b in range(0x80, 0xC0))


class Stopped(RunnerError):
    """A batch abandoned between decode steps because its job was cancelled."""


class NumericalError(RunnerError):
    """The model produced NaN or infinite logits for some rows (fp16 overflow is the usual cause)."""

    def __init__(self, rows: list[int]):
        super().__init__(f"non-finite logits in {len(rows)} of the batch's rows")
        self.rows = rows


class ConstraintError(RunnerError):
    """Rows whose structured-output matcher gave up mid-sample (one of llguidance's parser limits): `failed`,
    row -> the row error's message (constraints.failure_message). They left the batch where it happened; the
    others ran to their end as they do alone, and `done` holds every row's completion, None for those that
    failed. (A matcher in error allows only EOS: its sample would otherwise read as one the model stopped.)"""

    def __init__(self, failed: dict[int, str], done: list[Completion | None]):
        super().__init__(
            f"the constraint of {len(failed)} of the batch's rows failed: {next(iter(failed.values()))}"
        )
        self.failed, self.done = failed, done


@dataclass
class _Decode:
    """The state of one `generate` call's decode loop. Per row (input order): prompt, settings, generator,
    outputs. Per slot (the rows decoding now, in batch order; `rows[slot]` is the row): logits, KV cache,
    lengths, penalty state. Rows not started yet wait in `waiting`, the next to be admitted first."""

    prompts: list[list[int]]
    params: list[GenerationParams]
    rngs: list[Any]
    max_active: int  # most slots decoding at once
    waiting: list[int]
    prompt_lps: list[list[float | None] | None] | None  # per row, when some row asks for them
    track_history: bool  # some row has a repetition penalty: keep `history`
    track_counts: bool  # some row has a presence/frequency penalty: keep `counts`
    on_finish: Callable[[int, int], None] | None = None
    constraints: Any = None  # constraints.Constraints: the matchers of the constrained rows, or None
    rows: list[int] = field(default_factory=list)
    logits: Any = None  # [slots, vocab] float32: the next-token logits of each slot
    cache: Any = None  # the slots' KV cache: each slot's tokens right-aligned, left padding (kvcache.py)
    lens: Any = None  # [slots] long: each slot's tokens in the cache = the position id of its next token
    settings: Any = None  # sampling.RowSettings, in slot order
    history: Any = None  # [slots, seq] token ids seen, for the repetition penalty
    counts: Any = None  # [slots, vocab] generated-token counts, for presence/frequency penalties
    keep: list[int] = field(default_factory=list)  # the slots that go on after this step
    step: Any = None  # this step's tokens, their log-probs and whether each is EOS, per slot, on the host
    static: Any = None  # graphs.StaticBatch: the batch decodes in fixed slots (then `cache` is None)
    slots: Any = None  # [slots] long: each slot's fixed slot in `static`

    def __post_init__(self) -> None:
        n = len(self.prompts)
        # the prompt tokens each row's text is decoded after (Engine._text_prefix)
        self.prefixes: list[list[int]] = []
        self.out_ids: list[list[int]] = [[] for _ in range(n)]
        self.out_lps: list[list[float]] = [[] for _ in range(n)]
        self.finish: list[tuple[str, str | None] | None] = [None] * n
        self.stop_pos: list[int | None] = [None] * n
        self.scanned = [0] * n  # characters of decoded text already searched for stop strings
        # where stop strings count from (the text of the min_new_tokens-th token on)
        self.stops_from = [0] * n
        self.tops: list[list[list[tuple[int, float, int]]]] = [[] for _ in range(n)]
        # rows whose matcher gave up (ConstraintError): the row error's message
        self.failed: dict[int, str] = {}

    def keep_slots(self, idx: Any) -> None:
        """Keep the slots `st.keep` (`idx`: the same as a tensor) of everything but the cache and the logits
        (the engine selects the cache; the next forward step replaces the logits)."""
        self.rows = [self.rows[s] for s in self.keep]
        self.lens, self.settings = self.lens[idx], self.settings.select(idx, self.keep)
        if self.history is not None:
            self.history = self.history[idx]
        if self.counts is not None:
            self.counts = self.counts[idx]

    def add_slots(
        self, rows: list[int], logits: Any, lens: Any, settings: Any, history: Any, counts: Any
    ) -> None:
        """Append slots for newly prefilled `rows` after the running ones (the engine joins their caches)."""
        import torch

        from .sampling import RowSettings

        if not self.rows:
            self.rows, self.logits, self.lens, self.settings = rows, logits, lens, settings
            self.history, self.counts = history, counts
            return
        self.rows = self.rows + rows
        self.logits, self.lens = torch.cat([self.logits, logits]), torch.cat([self.lens, lens])
        self.settings = RowSettings.cat([self.settings, settings])
        if self.history is not None:
            self.history = _cat_history(self.history, history)
        if self.counts is not None:
            self.counts = torch.cat([self.counts, counts])


def _cat_history(a: Any, b: Any) -> Any:
    """Two [rows, seq] histories as one, the narrower left-padded with repeats of its rows' first column (a
    token each row has seen: repeating it changes no penalty)."""
    import torch

    width = max(a.shape[1], b.shape[1])
    a, b = (torch.cat([h[:, :1].expand(-1, width - h.shape[1]), h], dim=1) for h in (a, b))
    return torch.cat([a, b])


def _positions(mask: Any) -> Any:
    """Position ids that count real tokens only: with left padding, GPT-2 and friends would otherwise give the
    first real token of a short prompt position 5 instead of 0 and generate something else."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _step_mask(lens: Any, width: int) -> Any:
    """[slots, width] attention mask of a decode step: each slot's `lens` cached tokens (right-aligned in the
    cache's width - 1 columns, padding before them) and the new token in the last column."""
    import torch

    cols = torch.arange(width, device=lens.device)
    return (cols[None, :] >= (width - 1 - lens)[:, None]).long()


def attention_kernels(device: Any) -> contextlib.AbstractContextManager:
    """The attention kernels the model may use on DEVICE: GPU_ATTENTION on a GPU, torch's choice elsewhere."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in GPU_ATTENTION])


def prefill_groups(lengths: list[int], budget: int, min_fill: float | None = None) -> list[list[int]]:
    """Indices of `lengths` in prefill groups: longest first, each group at most `budget` padded tokens (or one
    row) and at least `min_fill` real tokens, so the prompt pass computes almost no padding."""
    min_fill = PREFILL_MIN_FILL if min_fill is None else min_fill
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        g = groups[-1] if groups else None
        if g is not None:
            width = lengths[g[0]]
            padded = width * (len(g) + 1)
            if padded <= budget and (real + lengths[i]) >= min_fill * padded:
                g.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def _copies(prompts: list[list[int]]) -> dict[int, list[int]]:
    """Rows by prompt: the first row of each distinct prompt -> every row with that prompt, in order."""
    same: dict[tuple[int, ...], list[int]] = {}
    for r, p in enumerate(prompts):
        same.setdefault(tuple(p), []).append(r)
    return {rs[0]: rs for rs in same.values()}


def _greedy_twins(prompts: list[list[int]], params: list[GenerationParams]) -> dict[int, list[int]]:
    """Rows by what they compute: the first row of each greedy (prompt, settings) -> every row with the same,
    in order; a sampled row is its own. A greedy completion depends on nothing else (not the seed, not the
    batch), so twins (a greedy row's n samples, a prompt given twice) are computed once. Settings are the same
    when their JSON text is (dict equality took schemas with their keys in another order, or `true` for `1`,
    as the same: pass 52)."""
    texts: dict[int, str] = {}  # by params object: a job's rows mostly share one

    def text(p: GenerationParams) -> str:
        if id(p) not in texts:
            texts[id(p)] = json.dumps(p.to_dict(), ensure_ascii=False, default=repr)
        return texts[id(p)]

    out: dict[int, list[int]] = {}
    firsts: dict[tuple[tuple[int, ...], str], int] = {}
    for r, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        first = r if p.do_sample else firsts.setdefault((tuple(prompt), text(p)), r)
        out.setdefault(first, []).append(r)
    return out


def _copied_to_twins(twins: dict[int, list[int]], outs: list[Completion]) -> list[Completion]:
    """The completions of every row: each twin its own copy of its first's (`outs`, one per first)."""
    result: list[Any] = [None] * sum(len(rows) for rows in twins.values())
    for first, out in zip(twins, outs, strict=True):
        for twin in twins[first]:
            result[twin] = out if twin == first else copy.deepcopy(out)
    return result


def decode_groups(lengths: list[int], most: int) -> list[list[int]]:
    """Indices of `lengths` in at most `most` groups of similar length, longest first: `prefill_groups` with no
    token budget, then the adjacent pair that adds the least padding merged until few enough remain."""
    groups = prefill_groups(lengths, sys.maxsize)
    while len(groups) > max(1, most):
        i = min(
            range(len(groups) - 1),
            key=lambda i: len(groups[i + 1]) * (lengths[groups[i][0]] - lengths[groups[i + 1][0]]),
        )
        groups[i : i + 2] = [groups[i] + groups[i + 1]]
    return groups


def _warn_if_threads_spin() -> None:
    """On CPU with several threads: say so when `import runner` came after torch, so that its OpenMP threads
    keep libgomp's ~3 ms spin at every wait (runner/__init__.py: several times slower on a shared CPU)."""
    import torch

    import runner

    if runner.OPENMP_WAIT_MISSED and torch.get_num_threads() > 1:
        warnings.warn(
            "torch was imported before runner, so its CPU threads spin at every wait (on a shared CPU this can "
            "make generation several times slower): `import runner` before torch, or start Python with "
            "GOMP_SPINCOUNT=1000 set",
            RuntimeWarning,
            stacklevel=4,
        )


def peak_memory_bytes(device: Any) -> int:
    """Peak memory since the last `reset_peak_memory` (a job run's start): GPU memory allocated on CUDA, the
    resident set's high-water mark (VmHWM) on Linux CPU. Where /proc is absent (macOS) it is ru_maxrss, the
    process's peak over its whole life, which may be an earlier job's."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        return _proc_status_kib("VmHWM")["VmHWM"] * 1024
    except (OSError, ValueError, IndexError, KeyError):
        pass
    import resource

    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: Any) -> bool:
    """Start a new peak for `peak_memory_bytes` (at a job run's start, so that a job does not report an earlier
    job's peak in the same process): the CUDA allocator's peak, or on Linux the resident set's high-water mark
    (writing 5 to /proc/self/clear_refs). `device` None: the engine is not loaded yet, so every CUDA device an
    earlier engine of this process used starts anew too. True when the peak did start anew; False where neither
    is possible (no /proc, or a kernel or sandbox that takes the write and keeps the old high-water mark)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return True
    torch = sys.modules.get("torch")
    if device is None and torch is not None and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        status = _proc_status_kib("VmHWM", "VmRSS")
    except (OSError, ValueError, IndexError, KeyError):
        return False
    return status["VmHWM"] <= status["VmRSS"] + 16 * 1024  # (the resident set moves between the two reads)


def _proc_status_kib(*fields: str) -> dict[str, int]:
    """The named "Vm...:  123 kB" lines of /proc/self/status, in KiB."""
    lines = Path("/proc/self/status").read_text().splitlines()
    found = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.split(":")[0] in fields}
    return {field: found[field] for field in fields}


class Engine:
    """A loaded model + tokenizer on one device, ready to generate batches."""

    def __init__(self, model: str, options: EngineOptions | None = None, revision: str | None = None):
        """`revision`: a hub model's snapshot (the commit a job was pinned to at submit), else its newest, read
        once (`models.load_revision`): `self.revision` is the commit loaded."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per weight file garbles Colab cells and log files
        self.spec, self.revision = model, load_revision(model, revision)
        revision = self.revision
        self.options = options or EngineOptions()
        self.device = pick_device(self.options.device)
        self.dtype = pick_dtype(self.options.dtype, self.device)
        self.tokenizer = load_tokenizer(model, self.options.trust_remote_code, revision)
        t0 = time.perf_counter()
        self.model = load_model(model, self.options, self.device, self.dtype, revision)
        # weights left mapped from their files (too large to copy): their folder and files as loaded
        mapped = getattr(self.model, "runner_weights_mapped", False)
        self.mapped_folder = resolve_model(model, progress=None) if mapped else None
        # (a passing error there is looked at again alone, not by loading the whole model again)
        self.mapped_files = (
            reading_model(lambda: weight_file_stats(self.mapped_folder), model) if self.mapped_folder else {}
        )
        if self.options.device_map:  # inputs go where accelerate put the embeddings
            self.device = self.model.get_input_embeddings().weight.device
        # Same functions, faster kernels (kernels.py): oneDNN for small CPU matmuls, a fused GELU for GPT-2.
        self.kernels = kernels.install(self.model, cpu_linears=self.device.type == "cpu")
        self.load_seconds = time.perf_counter() - t0
        self._guidance_tokenizer: Any = None  # llguidance's tokenizer, made for the first constraint
        self._read_model_facts()
        self._pick_speed_levers()

    def weights_changed(self) -> str | None:
        """Which weight file the model still reads from changed since it was loaded (a checkpoint written over
        it while a job runs: the rows computed since mix two models), or None."""
        if not self.mapped_folder or not self.mapped_files:
            return None
        # the folder resolved at load (the demo's cache: not resolved, and its GGUF read, again)
        now = weight_file_stats(self.mapped_folder)
        return next((name for name, st in self.mapped_files.items() if now.get(name) != st), None)

    def _read_model_facts(self) -> None:
        """EOS ids, pad id, context window, and how this model's forward names its arguments."""
        import torch

        cfg = self.model.config
        self.eos_ids = eos_token_ids(cfg, getattr(self.model, "generation_config", None), self.tokenizer)
        if not self.eos_ids:
            raise ModelLoadError(
                f"model {self.spec!r} defines no EOS token (config, generation_config, tokenizer)"
            )
        self._eos = torch.tensor(self.eos_ids, device=self.device)
        pad = self.tokenizer.pad_token_id
        # GPT-2 has no pad token: pad with EOS. Safe because padding is known from the attention mask only.
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.context_window = context_window(cfg, self.tokenizer)
        self.texts = TokenText(self.tokenizer)  # token texts in place and their bytes, for results
        forward_params = inspect.signature(self.model.forward).parameters
        self._keep_arg = "logits_to_keep" in forward_params
        # transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    def _pick_speed_levers(self) -> None:
        """Prefill budget, decode groups and grouped attention for this device (module constants say why)."""
        gpu = self.device.type == "cuda"
        if not gpu:
            _warn_if_threads_spin()
        self.prefill_tokens = PREFILL_TOKENS_GPU if gpu else PREFILL_TOKENS_CPU
        self._merge_caches: bool | None = None  # whether this model's cache can be merged (kvcache.py)
        self.decode_groups = DECODE_GROUPS_GPU if gpu else DECODE_GROUPS_CPU
        # Decode attention group by group (kvcache.grouped_attention, sdpa otherwise): only for sdpa models.
        self._grouped = self.decode_groups > 1 and kvcache.install_grouped_attention(self.model)
        self._grouped_verified = False  # set by the first grouped decode step that works
        # A static batch decodes in fixed slots, each step replayed as a CUDA graph (graphs.py): opt-in, GPU only.
        # (True on a CPU runs the same fixed-slot steps eagerly: how the tests check them without a GPU.)
        self.static_decode = gpu and self.options.cuda_graphs and not self.options.device_map
        # the kinds of fixed-slot step (replayed: True, eager: False) that have matched their row alone once
        self._static_checked: set[bool] = set()
        if self.options.cuda_graphs and not self.static_decode:
            why = "with device_map" if self.options.device_map else f"on {self.device.type}"
            warnings.warn(f"cuda_graphs is a GPU lever for one device, not taken {why}: decoding as usual",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        self.share_prompts = True  # rows with the same prompt (the n samples of a row) share one prompt pass
        self.share_prefix = True  # the start all prompts share is prefilled once (SHARED_PREFIX_MIN)
        self._prefix_checked = False  # set once a prefill after a shared start matched its row alone
        self._prefix_memo: tuple[Any, Any] | None = None  # (key, cache) of the last shared start prefilled

    @property
    def speedups(self) -> dict[str, Any]:
        """Which speed levers this engine uses (stats.json records them with each run)."""
        return {
            **self.kernels,
            "grouped_decode": self._grouped,
            "shared_prompts": self.share_prompts,
            "shared_prefix": self.share_prefix,
            "cuda_graphs": self.static_decode and self.device.type == "cuda",
        }

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def generate(
        self,
        prompts: list[list[int]],
        params: GenerationParams | list[GenerationParams],
        seeds: list[int] | None = None,
        stop: Callable[[], bool] | None = None,
        max_active: int | None = None,
        on_finish: Callable[[int, int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Generate one sample per prompt. `prompts`: token ids per row (any lengths); `params`: the settings
        of every row, or one per row (rows with different settings share the batch); `seeds`: one per row,
        required when a row samples; `stop()`, asked between decode steps, abandons the batch (raises
        `Stopped`: a cancelled job stops within a step, not a whole batch). `max_active`: most rows decoding
        at once (None: all); the others wait and join the running batch as rows finish (continuous batching).
        `on_finish(row, tokens)` is called as each row ends (again if the batch has to be recomputed), and
        `on_step(tokens)` after each decode step with the number of tokens it made (progress within a batch).
        Returns completions in the order of `prompts`; a row's completion does not depend on its companions."""

        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("one GenerationParams per prompt, or one for all")
        if any(p.do_sample for p in params) and (seeds is None or len(seeds) != len(prompts)):
            raise ValueError("sampling needs one seed per prompt")
        if any(p.uses_transformers_generate for p in params):
            raise ValueError("num_beams > 1 / no_repeat_ngram_size rows go through transformers_generate "
                             "(tasks.generate_keys routes each row where it belongs)")  # fmt: skip
        if max_active is not None and (
            isinstance(max_active, bool) or not isinstance(max_active, int) or max_active < 1
        ):
            raise ValueError(f"max_active must be an integer >= 1, got {max_active!r}")
        twins = _greedy_twins(prompts, params)  # computed once each, then copied
        firsts = list(twins)
        if len(firsts) < len(prompts):
            prompts, params = [prompts[f] for f in firsts], [params[f] for f in firsts]
            seeds = None if seeds is None else [seeds[f] for f in firsts]
            on_finish = on_finish and (
                lambda r, tokens, each=on_finish: [each(t, tokens) for t in twins[firsts[r]]]
            )
        try:
            with self.computing():
                try:
                    outs = self._generate(prompts, params, seeds, stop, max_active, on_finish, on_step)
                except (kvcache.GroupingUnsupported, graphs.FixedSlotsUnsupported) as e:
                    # Some layer's attention bypassed the grouped path (custom model code), or the model's forward
                    # does not take fixed slots' mask: decode merged / in the engine's own way from now on.
                    if isinstance(e, kvcache.GroupingUnsupported):
                        self._grouped = False
                    else:
                        self.static_decode = False
                    outs = self._generate(prompts, params, seeds, stop, max_active, on_finish, on_step)
        except NumericalError as e:  # (its rows are the firsts': the caller splits its own rows)
            raise NumericalError([t for r in e.rows for t in twins[firsts[r]]]) from None
        except ConstraintError as e:
            failed = {t: message for r, message in e.failed.items() for t in twins[firsts[r]]}
            raise ConstraintError(dict(sorted(failed.items())), _copied_to_twins(twins, e.done)) from None
        return _copied_to_twins(twins, outs)

    def transformers_generate(
        self,
        prompt: list[int],
        params: GenerationParams,
        seed: int | None,
        stop: Any = None,
        stepped: Any = None,
    ) -> list[Completion]:
        """Beam search or no_repeat_ngram_size, which our loop does not host: hf_generate.py."""
        from .hf_generate import generate_with_transformers

        return generate_with_transformers(self, prompt, params, seed, stop, stepped)

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        """One forward pass. Returns (logits of the last position [batch, vocab] float32, cache)."""
        import torch

        kwargs = {"logits_to_keep": 1} if (last_only and self._keep_arg) else {}
        grouped = kvcache.is_grouped(cache)
        try:
            # A grouped cache is active (its attention runs group by group) only inside its `with` block.
            with cache if grouped else contextlib.nullcontext():
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{self._cache_arg: cache},
                    **kwargs,
                )
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # Until a grouped step has worked once, a failure inside one is taken as this model's attention
            # not going through kvcache.grouped_attention (custom code): `generate` decodes merged instead.
            if not grouped or self._grouped_verified or isinstance(e, (torch.OutOfMemoryError, RunnerError)):
                raise
            raise kvcache.GroupingUnsupported(f"grouped decode failed: {first_line(e)}") from e
        if grouped:
            self._grouped_verified = True
        # .to: with a device_map the output layer may sit on another GPU than the inputs (a no-op otherwise)
        return out.logits[:, -1, :].float().to(self.device), getattr(out, self._cache_arg)

    def _generate(self, prompts, params, seeds, stop=None, max_active=None, on_finish=None, on_step=None):
        """The decode loop: admit the first rows (prefill), then per step pick a token for every slot, record it
        (finishing rows on EOS, a stop string or their length) and advance: finished rows leave, the others
        take one forward step, waiting rows join in the freed slots."""
        st = self._start(prompts, params, seeds, max_active, on_finish)
        while st.rows:
            if stop is not None and stop():
                raise Stopped("stopped between decode steps")
            tok, chosen, logprobs = self._pick(st)
            self._record(st, chosen, logprobs)
            if on_step is not None:
                on_step(len(tok))
            self._advance(st, tok)
        outs = self._completions(st)
        if st.failed:
            raise ConstraintError(st.failed, outs)
        return outs

    def _start(self, prompts, params, seeds, max_active, on_finish) -> _Decode:
        """The per-row decode state, with the first rows admitted. Rows wait most new tokens first (the long
        ones start early, short ones fill the tail), then longest prompt first (joiners of similar length)."""
        import numpy as np

        n = len(prompts)
        # A shared start is kept for the rows joining this call's batch, never for the next call: a batch's
        # numbers must not depend on the batches before it, which a resumed run does not run (JobRun.plan).
        self._prefix_memo = None
        waiting = sorted(range(n), key=lambda r: (-params[r].max_new_tokens, -len(prompts[r]), r))
        st = _Decode(
            prompts=prompts, params=params, max_active=min(n, max_active or n), waiting=waiting,
            rngs=[np.random.default_rng(s) if p.do_sample else None for p, s in zip(params, seeds or [None] * n, strict=True)],
            prompt_lps=[None] * n if any(p.prompt_logprobs for p in params) else None,
            track_history=any(p.repetition_penalty != 1.0 for p in params),
            track_counts=any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params),
            on_finish=on_finish, constraints=self._constraints(params),
        )  # fmt: skip
        st.prefixes = [self._text_prefix(p) for p in prompts]
        self._refill(st)
        return st

    def _text_prefix(self, prompt: list[int]) -> list[int]:
        """The prompt's last DETOKENIZE_CONTEXT tokens, which a row's text is decoded after (`_detok`), moved
        back to the start of a character (or, none being within DETOKENIZE_BACK tokens, forward to the next):
        a byte-fallback decoder (Llama, Mistral, Gemma: "<0xE5>") reads a run of byte tokens that starts inside
        a character as U+FFFD, the generated bytes of the run included (Japanese output after a Japanese prompt
        read "���" where the tokens said "含"). A special token starts no text (decoding skips it)."""
        start = max(0, len(prompt) - DETOKENIZE_CONTEXT)
        lo = max(0, start - DETOKENIZE_BACK)
        names = self.tokenizer.convert_ids_to_tokens(prompt[lo:])
        special = set(self.tokenizer.all_special_ids)

        def mid(i: int) -> bool:  # no character starts at token i (a special token is no text: skipped)
            return _continues_a_character(names[i - lo]) or prompt[i] in special

        back = start
        while back > 0 and start - back < DETOKENIZE_BACK and mid(back):
            back -= 1
        if back < len(prompt) and not mid(back):
            return prompt[back:]
        while start < len(prompt) and mid(start):  # none within reach behind: the window starts after them
            start += 1
        return prompt[start:]

    def _constraints(self, params: list[GenerationParams]) -> Any:
        """The matchers of the rows that have a structured-output constraint (constraints.py), or None."""
        made: dict[int, str | None] = {}  # rows share settings objects: one grammar each
        for p in params:
            if id(p) not in made:
                made[id(p)] = constraints.grammar_of(p)
        grammars = [made[id(p)] for p in params]
        if all(g is None for g in grammars):
            return None
        if self._guidance_tokenizer is None:
            self._guidance_tokenizer = constraints.tokenizer_of(self.tokenizer, self.eos_ids)
        return constraints.Constraints(self._guidance_tokenizer, grammars)

    def _pick(self, st: _Decode):
        """This step's token per slot ([batch] long), its raw log-prob ([batch] float32) and the raw
        log-softmax ([batch, vocab]) it came from. A constrained row's mask applies before the processors
        (as in vLLM), so top-k/top-p choose among the tokens it allows; the log-probs stay raw."""
        import torch

        from .sampling import pick, process

        logprobs = torch.log_softmax(st.logits, dim=-1)
        logits = st.logits if st.constraints is None else st.constraints.mask(st.logits, st.rows)
        held = [slot for slot, r in enumerate(st.rows) if len(st.out_ids[r]) < st.params[r].min_new_tokens]
        if held and st.constraints is not None:
            held = self._can_go_on(logits, held)
        # EOS is not allowed before min_new_tokens: held back before the top-k/top-p cut (as transformers'
        # MinNewTokensLengthLogitsProcessor and vLLM do), or a cut that kept only EOS left nothing (pass 42)
        if held:
            logits = logits.clone() if logits is st.logits else logits
            logits[torch.tensor(held, device=self.device).unsqueeze(-1), self._eos.unsqueeze(0)] = -math.inf
        scores = process(logits, st.history, st.counts, st.settings)
        draws = [st.rngs[r].random() if st.rngs[r] is not None else 0.0 for r in st.rows]
        # (no copy to the device when no row samples: on a GPU each copy of a host list waits for the stream)
        sampled = st.settings.any("sample", False)
        uniforms = torch.tensor(draws, dtype=torch.float64, device=self.device) if sampled else None
        tok = pick(scores, st.settings, uniforms)
        chosen = logprobs.gather(1, tok.unsqueeze(-1)).squeeze(-1)
        # one copy to the host a step (each is a wait for the GPU): the tokens, their log-probs, which are EOS
        host = torch.stack([tok.double(), chosen.double(), torch.isin(tok, self._eos).double()]).tolist()
        bad = [st.rows[i] for i, lp in enumerate(host[1]) if not math.isfinite(lp)]
        if bad:
            raise NumericalError(bad)
        st.step = ([int(t) for t in host[0]], host[1], [e != 0 for e in host[2]])
        return tok, chosen, logprobs

    def _can_go_on(self, logits, slots: list[int]) -> list[int]:
        """Of `slots`, those whose (masked) `logits` allow a token besides EOS: a constraint that allows nothing
        but EOS (a regex matching only the empty text, at the first step) ends the sample before min_new_tokens,
        as a finished choice does (`Constraints.advance`); holding its EOS back left every score -inf, and an
        arbitrary token the constraint forbids was picked."""
        import torch

        rows = logits[torch.tensor(slots, device=self.device)]
        rows[:, self._eos] = -math.inf
        return [s for s, ok in zip(slots, torch.isfinite(rows).any(-1).tolist(), strict=True) if ok]

    def _record(self, st: _Decode, chosen, logprobs) -> None:
        """Append each slot's token and log-prob (and alternatives) to its row, decide which rows are finished;
        `st.keep` lists the slots that go on."""

        tok_list, lp_list, is_eos = st.step
        # a constrained row whose text is complete and can only end (a closed JSON object, a choice) ends now
        over = st.constraints.advance(st.rows, tok_list) if st.constraints else [False] * len(st.rows)
        ks = [st.params[r].logprobs for r in st.rows]
        if any(k is not None for k in ks):
            self._collect_top(logprobs, chosen, st.step, ks, st.rows, st.tops)
        scan = []  # rows whose stop strings are looked for in this step's text
        for slot, r in enumerate(st.rows):
            st.out_ids[r].append(tok_list[slot])
            st.out_lps[r].append(lp_list[slot])
            p = st.params[r]
            if is_eos[slot]:
                st.finish[r] = ("stop", None)
            elif p.stop and len(st.out_ids[r]) >= p.min_new_tokens:
                if len(st.out_ids[r]) == p.min_new_tokens > 1:  # stop strings count from this token's text on
                    st.stops_from[r] = self._text_length(st.prefixes[r], st.out_ids[r][:-1])
                    st.scanned[r] = st.stops_from[r] + max(len(x) for x in p.stop) - 1
                scan.append(r)
        self._scan_stops(st, scan)
        st.keep = []
        for slot, r in enumerate(st.rows):
            p = st.params[r]
            # a matcher that gave up (it then allows only EOS) fails its row, whatever token ended it
            failure = st.constraints.failure(r) if over[slot] else None
            if failure is not None:
                st.finish[r] = ("error", None)
                st.failed[r] = constraints.failure_message(p, len(st.out_ids[r]), failure)
            if st.finish[r] is None and over[slot]:
                st.finish[r] = ("stop", None)
            if st.finish[r] is None and len(st.out_ids[r]) >= p.max_new_tokens:
                st.finish[r] = ("length", None)
            if st.finish[r] is None:
                st.keep.append(slot)
            elif st.on_finish is not None:
                st.on_finish(r, len(st.out_ids[r]))

    def _scan_stops(self, st: _Decode, rows: list[int]) -> None:
        """Look for each row's stop strings in the text decoded since the last look (and a stop string's
        length back, for one that straddles two steps). The rows' texts are decoded in one call."""
        texts = self._texts([st.prefixes[r] for r in rows], [st.out_ids[r] for r in rows])
        for r, text in zip(rows, texts, strict=True):
            stops = st.params[r].stop
            start = max(st.stops_from[r], st.scanned[r] - max(len(s) for s in stops) + 1)
            hits = [(i, s) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
            # (an unfinished character at the end reads as U+FFFD now and as itself once whole: looked at again)
            st.scanned[r] = len(text.rstrip("\ufffd"))
            if hits:
                i, s = min(hits)
                st.finish[r], st.stop_pos[r] = ("stop", s), i

    def _advance(self, st: _Decode, tok) -> None:
        """Finished rows leave the batch and its KV cache, the others take one forward step on their new
        token, then waiting rows join in the freed slots (`_refill`)."""
        import torch

        tok_in = tok.unsqueeze(-1)  # [slots, 1]
        if st.history is not None:
            st.history = torch.cat([st.history, tok_in], dim=-1)
        if st.counts is not None:
            st.counts.scatter_add_(1, tok_in, torch.ones_like(tok_in, dtype=st.counts.dtype))
        if st.static is not None:
            self._advance_static(st, tok_in)
            return
        if not st.keep:
            st.rows, st.cache = [], None  # the next rows admitted start a new batch
        elif len(st.keep) < len(st.rows):
            # Finished rows leave the batch and the KV cache now instead of riding along to the end.
            idx = torch.tensor(st.keep, device=self.device)
            kvcache.select_rows(st.cache, idx)
            st.keep_slots(idx)
            tok_in = tok_in[idx]
        if st.rows:
            width = st.cache.get_seq_length() + 1  # the cached columns and the new token
            st.logits, st.cache = self._forward(
                tok_in, _step_mask(st.lens, width), st.lens.unsqueeze(-1), st.cache, last_only=False
            )
            st.lens = st.lens + 1
        self._refill(st)

    def _advance_static(self, st: _Decode, tok_in) -> None:
        """`_advance` for a batch in fixed slots (graphs.StaticBatch): finished rows give up their slot (which
        computes on, unread), the others take one step; no row waits (a static batch starts whole)."""
        import torch

        if not st.keep:
            st.rows, st.static = [], None
            return
        if len(st.keep) < len(st.rows):
            idx = torch.tensor(st.keep, device=self.device)
            st.keep_slots(idx)
            st.slots, tok_in = st.slots[idx], tok_in[idx]
        st.logits = st.static.step(st.slots, tok_in)
        st.lens = st.lens + 1
        if st.static.replayed not in self._static_checked:
            self._check_fixed_slots(st)

    def _check_fixed_slots(self, st: _Decode) -> None:
        """The engine's first step in fixed slots, and its first replayed as a CUDA graph, checked: the most padded
        row's logits must be what its tokens give alone (a model whose forward does not take the 4D mask as
        given, ALiBi built from a 2D one say, or a graph that recorded less than the step, would be silently
        wrong). Else `generate` decodes the batch again its own way, and every later one."""
        i = int(st.lens.argmin())  # the shortest row: the most padding, where a wrong mask shows
        r = st.rows[i]
        if not self._matches_alone(st.prompts[r] + st.out_ids[r], st.logits[i]):
            raise graphs.FixedSlotsUnsupported("a step in fixed slots differed from its row alone")
        self._static_checked.add(st.static.replayed)

    def _refill(self, st: _Decode) -> None:
        """Admit waiting rows into the free slots: into an empty batch always; into a running one when its
        cache takes joiners (`_merge_caches`: merged or grouped caches) and at least REFILL_SHARE of the slots
        are free (or every waiting row fits), so that a prefill is not paid for each row that ends. A model
        whose cache cannot be merged (sliding-window layers...) thus runs static batches of `max_active`:
        each starts when the one before has ended. Rows asking for prompt log-probs join like the others
        (`_prefill_all`)."""
        free = st.max_active - len(st.rows)
        if not st.waiting or free <= 0:
            return
        enough = min(len(st.waiting), max(1, math.ceil(REFILL_SHARE * st.max_active)))
        if st.rows and not (self._merge_caches and free >= enough):
            return
        rows, st.waiting = st.waiting[:free], st.waiting[free:]
        self._admit(st, rows)

    def _admit(self, st: _Decode, rows: list[int]) -> None:
        """Prefill `rows` and add them to the decode batch as new slots after the running ones, their KV
        caches joined to the running cache (`_join`)."""
        import torch

        from .sampling import RowSettings

        extra = max(st.params[r].max_new_tokens for r in rows)
        # a static batch (no continuous batching: every row starts now) decodes in fixed slots, where the model's
        # attention takes their 4D boolean mask (sdpa: graphs.takes_bool_mask)
        static = (
            self.static_decode
            and st.max_active >= len(st.prompts)
            and not st.waiting
            and graphs.takes_bool_mask(self.model)
            and extra >= graphs.MIN_NEW_TOKENS
        )
        if st.prompt_lps is not None and any(st.params[r].prompt_logprobs for r in rows):
            logits, cache, order = self._prefill_all(st, rows, extra)
        else:
            most = max(1, self.decode_groups - kvcache.group_count(st.cache))  # groups left for the joiners
            logits, cache, order = self._prefill([st.prompts[r] for r in rows], extra, 1 if static else most)
        order = [rows[i] for i in order]  # decode order
        lens = torch.tensor([len(st.prompts[r]) for r in order], device=self.device)
        st.cache = self._join(st.cache, st.lens, cache, lens, extra) if st.rows else cache
        st.add_slots(
            order, logits, lens, RowSettings.of([st.params[r] for r in order], self.device),
            self._history([st.prompts[r] for r in order]) if st.track_history else None,
            logits.new_zeros(logits.shape) if st.track_counts else None,
        )  # fmt: skip
        if static and all(isinstance(layer, kvcache.growing_layer_class()) for layer in st.cache.layers):
            st.static = graphs.StaticBatch(self, st.cache, lens, extra, graphs=self.device.type == "cuda")
            st.cache, st.slots = None, torch.arange(len(order), device=self.device)

    def _join(self, old, old_lens, new, new_lens, extra: int) -> Any:
        """One decode cache for the running slots (`old`) then the joiners (`new`). Grouped decode: the
        joiners' groups beside the running ones, nothing copied. One merged cache: both copied, left-padded,
        into a new buffer, without the leading columns that are padding in every running row (the rows that
        had the longest prompts may have left)."""
        if self._grouped:
            parts = kvcache.groups_of(old, old_lens) + kvcache.groups_of(new, new_lens)
            return kvcache.grouped([c for c, _ in parts], [p for _, p in parts])
        kvcache.drop_front(old, old.get_seq_length() - int(old_lens.max()))
        return kvcache.merge_prefills([old, new], extra)

    def _history(self, prompts: list[list[int]]) -> Any:
        """[rows, seq] the prompts' token ids for the repetition penalty, which looks at every id in it: pad
        slots repeat the row's first real token, so that padding (often EOS) is never penalised in one row
        but not in its unpadded twin."""
        import torch

        ids, mask = left_pad(prompts, self.pad_id, self.device)
        first_real = ids.gather(1, mask.argmax(-1, keepdim=True))
        return torch.where(mask.bool(), ids, first_real)

    def _completions(self, st: _Decode) -> list[Completion | None]:
        """Each row's completion; None for a row whose matcher gave up (`st.failed`)."""
        results: list[Completion | None] = []
        for r, text in enumerate(self._texts(st.prefixes, st.out_ids)):
            if r in st.failed:
                results.append(None)
                continue
            if st.stop_pos[r] is not None:
                text = text[: st.stop_pos[r]]
            reason, stop = st.finish[r] or ("length", None)
            if reason == "length" and text.endswith("\ufffd"):  # the limit cut a character? hold it back
                text = self._hold_back(st.prefixes[r], st.out_ids[r], text)
            results.append(Completion(
                st.out_ids[r], st.out_lps[r], text, reason, stop,
                top_logprobs=st.tops[r] if st.params[r].logprobs is not None else None,
                prompt_logprobs=st.prompt_lps[r] if st.prompt_lps is not None and st.params[r].prompt_logprobs else None,
                constraint_complete=self._constraint_complete(st, r, text) if st.constraints else None,
            ))  # fmt: skip
        return results

    def _constraint_complete(self, st: _Decode, r: int, text: str) -> bool | None:
        """Whether the row's returned `text` satisfies its constraint: the matcher's verdict after the tokens
        that make up `text` and a final EOS (a grammar may name it: `start: "yes" <|im_end|>`). Where `text` ends inside a token (a stop string cut there, a
        character cut by max_new_tokens held back), after the whole tokens before that point and then the rest
        of `text` (Constraints.complete_with)."""
        if st.constraints.matchers[r] is None:
            return None
        ids, prefix = st.out_ids[r], st.prefixes[r]
        n = len(ids) - (1 if ids and ids[-1] in self.eos_ids else 0)
        if self._detok(prefix, ids[:n]) == text:
            return st.constraints.complete(r, len(ids))
        k = next(k for k in range(n, -1, -1) if text.startswith(self._detok(prefix, ids[:k])))
        return st.constraints.complete_with(r, k, text[len(self._detok(prefix, ids[:k])) :])

    def _prefill(self, prompts: list[list[int]], extra: int, most: int | None = None):
        """Prefill rows in groups of similar length (`prefill_groups`), then merge the groups' caches for
        decoding: into one cache, or, with grouped decode, into one cache per `decode_groups` group (at most
        `most`, default `decode_groups`). Returns (last-position logits [rows, vocab] in decode order, cache,
        decode order: indices of `prompts`)."""
        if self._merge_caches is not False:
            done = self._prefill_grouped(prompts, extra, self.decode_groups if most is None else most)
            if done is not None:
                return done
        # The model's cache cannot be merged (e.g. sliding-window layers): prefill the rows as one batch.
        order = list(range(len(prompts)))
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        logits, cache = self._forward(ids, mask, _positions(mask), None, last_only=True)
        return logits, self._decode_cache([cache], extra), order

    def _prefill_grouped(self, prompts: list[list[int]], extra: int, most: int):
        """`_prefill` in groups, or None (and `_merge_caches` False) once the model's cache proves unmergeable.
        Rows with the same prompt (the n samples of a row) share one prompt pass: its cache rows are copied."""
        import torch

        lengths = [len(p) for p in prompts]
        copies = _copies(prompts) if self.share_prompts else {r: [r] for r in range(len(prompts))}
        distinct = list(copies)
        groups = (
            decode_groups([lengths[r] for r in distinct], most)
            if self._grouped
            else [list(range(len(distinct)))]
        )
        prefix = self._shared_prefix([prompts[r] for r in distinct])
        logits, merged, pads, order = [], [], [], []
        for group in ([distinct[i] for i in g] for g in groups):
            caches, group_order = [], []
            for chunk in prefill_groups([lengths[r] for r in group], self.prefill_tokens):
                rows = [group[i] for i in chunk]
                lg, c = self._prefill_chunk([prompts[r] for r in rows], prefix)
                self._merge_caches = self._merge_caches or kvcache.mergeable(c)
                if not self._merge_caches:
                    return None
                expanded = [r for row in rows for r in copies[row]]
                if len(expanded) > len(rows):
                    idx = torch.tensor(
                        [i for i, row in enumerate(rows) for _ in copies[row]], device=lg.device
                    )
                    lg = lg[idx]
                    kvcache.select_rows(c, idx)
                logits.append(lg)
                caches.append(c)
                group_order.extend(expanded)
            merged.append(kvcache.merge_prefills(caches, extra))
            width = max(lengths[r] for r in group)
            pads.append([width - lengths[r] for r in group_order])
            order.extend(group_order)
        cache = merged[0] if len(merged) == 1 else kvcache.grouped(merged, pads)
        return torch.cat(logits), cache, order

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, Any] | None:
        """(length, one-row cache) of the start all `prompts` share, when it is worth sharing: at least
        SHARED_PREFIX_MIN tokens, each prompt keeping one token of its own (its last position's logits). The
        last start is kept for the rows joining the running batch of this `generate` call (`_start`)."""

        if not self.share_prefix:
            return None
        n = None
        if len(prompts) > 1:
            n = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        memo = self._prefix_memo
        if memo is not None and memo[0][1] == self.model.dtype and n in (None, len(memo[0][0])):
            start = memo[0][0]
            if all(len(p) > len(start) and tuple(p[: len(start)]) == start for p in prompts):
                return len(start), memo[1]
        if n is None or n < SHARED_PREFIX_MIN:
            return None
        self._prefix_memo = None
        _, cache = self._forward_alone(prompts[0][:n])
        if not kvcache.mergeable(cache):
            return None
        self._prefix_memo = ((tuple(prompts[0][:n]), self.model.dtype), cache)
        return n, cache

    def _forward_alone(self, tokens: list[int]):
        """`_forward` of one unpadded row from a fresh cache: (last-position logits [1, vocab], cache)."""
        import torch

        ids = torch.tensor([tokens], device=self.device)
        mask = torch.ones_like(ids)
        return self._forward(ids, mask, _positions(mask), None, last_only=True)

    def _prefill_chunk(self, prompts: list[list[int]], prefix: tuple[int, Any] | None):
        """One prompt pass over `prompts`, left-padded: (last-position logits, cache). After a shared start
        (`_shared_prefix`), only each prompt's own tokens run, on a copy of the start's cache; the cache's
        slots are then put in the usual left-padded order (kvcache.pads_first)."""
        import torch

        if prefix is None or not self.share_prefix:
            ids, mask = left_pad(prompts, self.pad_id, self.device)
            return self._forward(ids, mask, _positions(mask), None, last_only=True)
        n, shared = prefix
        ids, mask = left_pad([p[n:] for p in prompts], self.pad_id, self.device)
        full = torch.cat([mask.new_ones(len(prompts), n), mask], dim=1)
        cache = kvcache.repeat_rows(shared, len(prompts))
        logits, cache = self._forward(ids, full, _positions(full)[:, n:], cache, last_only=True)
        pads = (mask == 0).sum(1)
        if (
            not self._prefix_checked
            and int(pads.max()) > 0
            and not self._prefix_matches(prompts, pads, logits)
        ):
            self.share_prefix = False  # this model's forward does not take a shared start as given
            return self._prefill_chunk(prompts, None)
        kvcache.pads_first(cache, n, pads)
        return logits, cache

    def _prefix_matches(self, prompts: list[list[int]], pads: Any, logits: Any) -> bool:
        """Whether the most padded row of a prefill after a shared start got the logits it gets alone (its top
        tokens' log-probs within PREFIX_CHECK_TOL). Padding is what a wrong position or mask would show in."""
        r = int(pads.argmax())
        self._prefix_checked = self._matches_alone(prompts[r], logits[r])
        return self._prefix_checked

    def _matches_alone(self, tokens: list[int], logits: Any) -> bool:
        """Whether `logits` ([vocab], a row's next-token logits from a batch) are what `tokens` alone give: the
        top tokens' log-probs within PREFIX_CHECK_TOL (float rounding of a batch stays far below it)."""
        import torch

        alone, _ = self._forward_alone(tokens)
        want, got = alone[0].log_softmax(-1), logits.log_softmax(-1)
        top = want.topk(min(20, want.shape[-1])).indices
        tol = PREFIX_CHECK_TOL["float32" if self.model.dtype == torch.float32 else "other"]
        return bool((want[top] - got[top]).abs().max() <= tol)

    def _prefill_all(self, st: _Decode, rows: list[int], extra: int):
        """`_prefill` for rows some of which ask for prompt log-probs: one pass over them all keeping every
        position's logits (O(rows x prompt x vocab), asked for explicitly), rows in the order given."""
        ids, mask = left_pad([st.prompts[r] for r in rows], self.pad_id, self.device)
        full, cache = self._forward_all(ids, mask, _positions(mask))
        for r, lps in zip(rows, self._prompt_logprobs(full, ids, mask), strict=True):
            st.prompt_lps[r] = lps
        logits = full[:, -1, :].float().to(self.device)
        del full
        return logits, self._decode_cache([cache], extra), list(range(len(rows)))

    def _decode_cache(self, caches: list[Any], extra: int) -> Any:
        """The caches as one growing cache (appends in place) when the model's cache allows it, else as is."""
        if self._merge_caches is None:
            self._merge_caches = kvcache.mergeable(caches[0])
        if self._merge_caches:
            return kvcache.merge_prefills(caches, extra)
        return caches[0]

    def _forward_all(self, input_ids, attention_mask, position_ids):
        """Prefill keeping every position's logits: ([batch, seq, vocab] in the model's dtype, on the output
        layer's device; cache)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True
        )
        return out.logits, getattr(out, self._cache_arg)

    @staticmethod
    def _prompt_logprobs(full, ids, mask) -> list[list[float | None]]:
        """log P(prompt token i | tokens < i) for the real (unpadded) tokens of each row; the first is None.
        In float32 a chunk of positions at a time (`scoring.gather_logprobs`): never another copy of the
        [batch, seq, vocab] logits, of which a half-precision model's float32 copy and the log-softmax were two."""
        from .scoring import gather_logprobs

        lp, _ = gather_logprobs(full[:, :-1, :], ids[:, 1:].to(full.device))
        lp = lp.cpu()
        starts = mask.argmax(-1).tolist()  # first real token of each row (left padding)
        return [[None, *lp[r, start:].tolist()] for r, start in enumerate(starts)]

    @staticmethod
    def _collect_top(logprobs, chosen, step, ks, rows, tops) -> None:
        """Append this step's top-k alternatives (plus the chosen token, if not among them) for each row that
        asked for them (`ks`: k per slot, None for none; `step`: the step's tokens and log-probs on the host, as
        `_pick` read them). Keeps [batch, k] per step, never the vocabulary."""
        import torch

        kmax = max((k for k in ks if k), default=0)
        # rank of the chosen token: 1 + how many tokens are strictly more likely
        ranks = (logprobs > chosen.unsqueeze(-1)).sum(-1, keepdim=True, dtype=torch.int32) + 1
        top_lp, top_id = logprobs.topk(kmax, dim=-1) if kmax else (logprobs[:, :0], ranks[:, :0])
        # one read from the device: the log-probs' float32 bits travel as int32 beside the ids and ranks
        both = torch.cat([top_lp.float().view(torch.int32), top_id.int(), ranks], dim=-1).cpu()
        top_lp = both[:, :kmax].view(torch.float32).tolist()
        top_id, ranks = both[:, kmax : 2 * kmax].tolist(), both[:, -1].tolist()
        top_lp = [lp[: k or 0] for lp, k in zip(top_lp, ks, strict=True)]
        top_id = [i[: k or 0] for i, k in zip(top_id, ks, strict=True)]
        tok_list, ch_list, _ = step
        for slot, r in enumerate(rows):
            if ks[slot] is None:
                continue
            entry = [
                (i, lp, rank) for rank, (i, lp) in enumerate(zip(top_id[slot], top_lp[slot], strict=True), 1)
            ]
            if tok_list[slot] not in top_id[slot]:
                entry.append((tok_list[slot], ch_list[slot], ranks[slot]))
            tops[r].append(entry)

    def _hold_back(self, prefix: list[int], generated: list[int], text: str) -> str:
        """`text` without a character the token limit cut (its first bytes generated, not its last), as a
        streaming decoder holds them back: the text of the tokens before them; "\ufffd" cut off when one token
        holds both the end of a whole character and such first bytes; a U+FFFD the model wrote stays."""
        k = partial_tail_tokens(self.texts.bytes(generated[-4:]))
        if k is None:
            return text[:-1]
        return self._detok(prefix, generated[: len(generated) - k]) if k else text

    def _text_length(self, prefix: list[int], generated: list[int]) -> int:
        """Characters of `generated`'s text that are whole: an unfinished character at the end is not text yet
        (`_hold_back`: a byte-fallback decoder reads it, with the whole run of bytes before it, as U+FFFD), so a
        stop string it begins counts once it is whole."""
        return len(self._hold_back(prefix, generated, self._detok(prefix, generated))) if generated else 0

    def _detok(self, prefix: list[int], generated: list[int]) -> str:
        """Text of `generated` as it reads after the prompt. Decoding it alone would lose a leading space
        with SentencePiece tokenizers ("▁Paris" -> "Paris"), so decode it after the prompt's last few tokens
        and cut the prefix's text off."""
        return self._texts([prefix], [generated])[0]

    def _texts(self, prefixes: list[list[int]], generated: list[list[int]]) -> list[str]:
        """`_detok` of many rows, decoded together (tokens.decode_many)."""
        heads = decode_many(self.tokenizer, prefixes)
        fulls = decode_many(self.tokenizer, [p + g for p, g in zip(prefixes, generated, strict=True)])
        return [
            full[len(head) :] if full.startswith(head) else decode_many(self.tokenizer, [gen])[0]
            for head, full, gen in zip(heads, fulls, generated, strict=True)
        ]

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        """Where the model runs (generate, transformers' generate, score, embed): inference mode, and on a GPU
        the attention kernels of GPU_ATTENTION."""
        import torch

        with torch.inference_mode(), attention_kernels(self.device):
            yield

    @contextlib.contextmanager
    def in_float32(self) -> Iterator[None]:
        """Run the model in float32 inside the block, then put every weight back exactly as it was.

        For rows whose logits overflow in float16/bfloat16 (worker.py retries them here, one at a time).
        Upcasting is exact, so casting back restores the weights bit for bit. Only tensors not already in
        float32 are touched: Llama keeps its rotary `inv_freq` buffer in float32 inside a bf16 model, and a
        blanket `model.to(dtype)` on the way back would round it. Needs the weights' memory in float32 while
        the block runs; an out-of-memory while upcasting puts back what was upcast and reaches the caller.
        Not for use while another thread generates with this engine."""
        import torch

        changed: list[tuple[Any, Any]] = []  # (tensor, its dtype before)
        try:
            with torch.no_grad():
                for t in [*self.model.parameters(), *self.model.buffers()]:  # tied weights appear once
                    if t.is_floating_point() and t.dtype != torch.float32:
                        changed.append((t, t.dtype))
                        t.data = t.data.float()
            yield
        finally:
            with torch.no_grad():
                for t, dtype in changed:
                    t.data = t.data.to(dtype)
