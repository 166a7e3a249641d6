"""Turn validated rows into token ids and plan them into length-sorted, budgeted, left-padded batches.

rows (inputs.py) -> `render_prompt` + `encode` (once per row, at submit) -> `plan_batches` -> `left_pad`
-> engine.py

Sorting by length keeps padding small; the token budget keeps a batch of long prompts from running out of
memory while short prompts still get large batches. Padding is always on the left so every row's next token sits
in the last column, and the attention mask (never the token values) tells padding from real tokens, so a pad
token that equals EOS (GPT-2) cannot be confused with a real EOS.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ParamError, RunnerError, first_line, option

if TYPE_CHECKING:
    import torch


def render_prompt(
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    tokenizer: Any,
    faithful: bool = True,
    counted: bool = True,
) -> str:
    """The exact text sent to the model: the prompt itself, or the messages through the chat template.
    `faithful` (jobs read since reading 5, inputs.READING): a `developer` message is a system message for a
    template without that role (`_as_template_roles`), and a message whose text the template leaves out is
    refused (`_refuse_left_out`; `counted`, since reading 6: its text also in another message is no proof);
    a job read before renders as its submit did (`runner repair`)."""
    if messages is None:
        assert prompt is not None
        return prompt
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise RunnerError(
            "this row has 'messages' but the model's tokenizer has no chat template; give one with "
            f"{option('chat_template', None)} (your fine-tune's format), a plain 'prompt' (or "
            f"{option('template', None)}), or use a chat model"
        )
    given = messages
    if faithful:
        messages = _as_template_roles(messages, template)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        if not _refused_by_template(e):
            raise
        raise RunnerError(f"the chat template cannot render this row's messages: {first_line(e)}") from None
    if faithful:
        _refuse_left_out(given, text, counted)
    return text


# the roles whose text a chat template that renders every message shows as given (up to white space at its ends):
# an assistant turn's may lose its reasoning (DeepSeek-R1, Qwen3), a tool result may be rendered as JSON
SHOWN_ROLES = ("system", "developer", "user")


def _as_template_roles(messages: list[dict[str, Any]], template: Any) -> list[dict[str, Any]]:
    """`messages` with each `developer` message a system message where the chat template has no such role (its
    text never says "developer"): OpenAI's developer messages are the system messages of the models without
    one, and most templates (Qwen's: any role they do not know renders as nothing) dropped them without a word,
    or showed the model a role it was never trained on. `template`: the tokenizer's (a dict of named ones too)."""
    if not any(m.get("role") == "developer" for m in messages) or "developer" in str(template):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def _refuse_left_out(messages: list[dict[str, Any]], text: str, counted: bool = True) -> None:
    """A RunnerError naming the first system, developer or user message whose text is not in `text`, the prompt
    the chat template rendered: a template that takes no system message, or only a first one, renders the
    others as nothing, and the row was answered as if it had not said them. `counted`: the text is in `text` as
    many times as these messages say it, so that a left-out system message whose words the user's message
    quotes ("Answer in French." beside "Translate 'Answer in French.'") is not taken for rendered."""
    said = [m.get("content").strip() if isinstance(m.get("content"), str) else "" for m in messages]
    shown = [t for m, t in zip(messages, said, strict=True) if m.get("role") in SHOWN_ROLES]
    for i, m in enumerate(messages):
        if m.get("role") not in SHOWN_ROLES or not said[i]:
            continue
        times = sum(t.count(said[i]) for t in shown) if counted else 1
        if text.count(said[i]) < times:
            raise RunnerError(
                f"the chat template leaves out item {i} (a {m['role']} message): its text is not in the prompt "
                "it renders, and the row would be answered without it (merge it into a message the template "
                f"shows, such as a first system message or the user's, or give {option('chat_template', None)})"
            )


def _refused_by_template(e: Exception) -> bool:
    """A chat template's own refusal (its `raise_exception(...)`, a message it cannot read), not a bug of ours."""
    import jinja2

    return isinstance(e, (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError))


def read_chat_template(value: str) -> str:
    """`--chat-template`, as vLLM's: a file holding a Jinja chat template, or the template itself (taken as
    typed: Jinja reads its own escapes, such as '\\n' in a string)."""
    found = _template_file_kind(value)
    if found == "file":
        return chat_template_text(Path(value))
    if found == "dir":
        raise ParamError("chat_template", f"{value} is a folder, not a chat template file")
    if "{{" not in value and "{%" not in value:
        raise ParamError("chat_template", f"no file {value} (and it is not a Jinja template: it has no {{{{ ... }}}} "
                                          "or {% ... %})")  # fmt: skip
    return _typed_escapes(value)


def _template_file_kind(value: str) -> str | None:
    """ "file", "dir" or None for `--chat-template`'s value, links followed as for any path a user types. A name
    no file can have (a long template given inline: ENAMETOOLONG; a NUL) is None; a transient error (a template
    on a Drive mount) is looked at again (storage.retry), never "no file"."""
    import errno
    import stat

    from . import storage

    def op() -> str | None:
        try:
            mode = os.stat(os.path.expanduser(value)).st_mode
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        except OSError as e:
            if e.errno in (errno.ENAMETOOLONG, errno.EINVAL):
                return None
            raise
        return "dir" if stat.S_ISDIR(mode) else "file"

    return storage.retry(op, f"look at the chat template file {value[:80]}")


def _typed_escapes(template: str) -> str:
    """`\\n`, `\\t`, `\\r` typed in the template's text outside its Jinja tags as the characters they stand for
    (as `--template`, `--stop` and vLLM's inline templates read them); inside a tag Jinja reads its own
    escapes, and any other backslash stays as typed (`C:\\Users`)."""
    import re

    parts = re.split(r"(\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\})", template, flags=re.DOTALL)
    plain = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}
    return "".join(
        p if i % 2 else re.sub(r"\\[ntr]", lambda m: plain[m.group()], p) for i, p in enumerate(parts)
    )


def chat_template_text(value: str | os.PathLike) -> str:
    """The chat template `create_job(chat_template=)` stands for: the text of a file given as a Path, or Jinja
    text itself (a string naming a file is refused, not rendered as the literal text of its name)."""
    if isinstance(value, os.PathLike):
        try:
            text = Path(value).expanduser().read_text(encoding="utf-8-sig")  # (a byte-order mark is no text)
        except (OSError, UnicodeDecodeError) as e:
            raise ParamError("chat_template", f"cannot read the chat template file {value}: {e}") from None
        what = f"the file {value} holds no Jinja template"
    elif isinstance(value, str):
        text, what = value, f"{value[:60]!r} is not Jinja text (for a file, pass Path(...))"
    else:
        raise ParamError("chat_template", f"chat_template must be Jinja text or a Path, got {value!r}.")
    if "{{" not in text and "{%" not in text:
        raise ParamError("chat_template", f"{what}: it has no {{{{ ... }}}} or {{% ... %}}")
    return text


def check_chat_option(tokenizer: Any, model: str) -> None:
    """`--chat` (each prompt sent as a user message) needs a chat template: refused once, up front, where the
    model has none and none is given (each row said "this row has 'messages'" of a file of plain prompts)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ParamError("chat", f"each prompt goes as a user message through the model's chat template, and "
                                 f"{model} has none: give one with {option('chat_template', None)} (your "
                                 f"fine-tune's format), or drop {option('chat')}")  # fmt: skip


def use_chat_template(tokenizer: Any, template: str) -> None:
    """Make `template` the tokenizer's chat template (over the model's own, if any), once Jinja has read it:
    one it cannot read is refused before any row is rendered, and leaves the tokenizer as it was."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], chat_template=template,
                                      tokenize=False, add_generation_prompt=True)  # fmt: skip
    except jinja2.TemplateSyntaxError as e:
        raise ParamError(
            "chat_template", f"not a valid Jinja template: line {e.lineno}: {e.message}"
        ) from None
    except Exception as e:
        if not _refused_by_template(e):  # it refuses this one message (say, it wants a system message first):
            raise  # each row is checked when it is rendered
    tokenizer.chat_template = template


def encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt. A rendered chat template already holds its special tokens (BOS included),
    so it is encoded without adding them again; a plain prompt gets what the tokenizer adds in front (Llama's
    BOS), never an EOS it appends (`_appended_eos`)."""
    return encode_many(tokenizer, [text], chat)[0]


def encode_many(tokenizer: Any, texts: Sequence[str], chat: bool) -> list[list[int]]:
    """`encode` of each text, in one tokenizer call: a fast (Rust) tokenizer encodes a list many times faster
    than the same texts one by one, which is most of what submitting a big file costs."""
    ids = encode_texts(tokenizer, texts, add_special_tokens=not chat)
    eos = None if chat else _appended_eos(tokenizer)
    return ids if eos is None else [i[:-1] if i and i[-1] == eos else i for i in ids]


def prepended_bos(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer puts in front of every text it encodes with its special tokens (Llama's <s>),
    else None (GPT-2 adds none; a chat template's own first token is the template's, not the tokenizer's)."""
    return _added_specials(tokenizer)[0]


def keep_end(tokenizer: Any, ids: list[int], budget: int, chat: bool) -> list[int]:
    """`--truncate left`: the end of the prompt, the part the answer follows; a BOS token the tokenizer put
    first stays first, as the tokenizer's own left truncation keeps it (a Llama without its <s> reads on
    from the middle of a text it was never trained to see begin so). Not a chat's: the template's first
    token is its own (SmolLM2's BOS is the role marker <|im_start|>, which would then head a cut message)."""
    bos = None if chat else prepended_bos(tokenizer)
    if bos is not None and ids[:1] == [bos] and budget >= 2:
        return [bos, *ids[len(ids) - budget + 1 :]]
    return ids[-budget:]


def _appended_eos(tokenizer: Any) -> int | None:
    """The EOS id the tokenizer puts at the end of every text it encodes with its special tokens (rinna's
    Japanese GPT-2s: "text</s>"), else None. A prompt ending in "end of text" asks the model to go on after
    it (rinna's model card encodes prompts without special tokens for this reason), so it is left off."""
    return _added_specials(tokenizer)[1]


_ADDED: weakref.WeakKeyDictionary[Any, tuple[int | None, int | None]] = weakref.WeakKeyDictionary()


def _added_specials(tokenizer: Any) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) the tokenizer adds in front of and after a text encoded with its special tokens, each
    None where it adds none: one text encoded both ways, once per tokenizer."""
    try:
        return _ADDED[tokenizer]
    except (KeyError, TypeError):
        pass
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    with_special = encode_texts(tokenizer, ["a"], add_special_tokens=True)[0]
    plain = encode_texts(tokenizer, ["a"], add_special_tokens=False)[0]
    added = (
        bos if isinstance(bos, int) and with_special[:1] == [bos] and plain[:1] != [bos] else None,
        eos if isinstance(eos, int) and with_special[-1:] == [eos] and plain[-1:] != [eos] else None,
    )
    with contextlib.suppress(TypeError):  # (an object that takes no weak reference is probed each time)
        _ADDED[tokenizer] = added
    return added


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """The token ids of each text, from one tokenizer call (`encode_many`; scoring.py without special tokens)."""
    if not texts:
        return []
    ids = tokenizer(
        list(texts),
        add_special_tokens=add_special_tokens,
        return_attention_mask=False,  # the masks would cost a third of the time, for nothing
        return_token_type_ids=False,
    )["input_ids"]
    return [i if isinstance(i, list) else list(i) for i in ids]


# --- how big a batch is ---------------------------------------------------------------------------------
# CPU: measured best on the 2-core CPU with grouped prefill (benchmarks/RESULTS.md); decode rows share each
# step's per-layer overhead, and prefill groups keep padding out of the prompt pass. GPU: a decode step of a
# small model costs about the same for 1 row as for 1,024 (the host launching ~6,000 kernels, not the GPU, is
# the limit), so rows are nearly free: on an H200 (2026-12-04) 1,024 rows a batch were 1.2x (GPT-2 shape) and
# 5.0x (SmolLM2 shape) faster than 64. The sizes are vLLM's defaults for offline batches (max_num_seqs): 1,024 on
# a GPU with >= 70 GiB, 256 on smaller ones. On a GPU the token budget, not the row count, is what keeps a
# batch inside memory (`tokens_in_memory`).
CPU_BATCH_SIZE = 64
GPU_BATCH_SIZE, LARGE_GPU_BATCH_SIZE, LARGE_GPU_BYTES = 256, 1024, 70 * 2**30
CPU_BATCH_TOKENS = 32 * 1024
MEMORY_SHARE = 0.5  # of the GPU's free memory, for one batch's KV cache or activations
MIN_BATCH_TOKENS = 1024
# free GPU memory counts in whole GiB: the few MiB a CUDA context varies by change no plan
FREE_GRAIN = 1 << 30


def default_batch_size(engine: Any, batch_size: int | None = None) -> int:
    """`batch_size` when given, else the default for the engine's device (its kind, and a GPU's memory)."""
    if batch_size is not None:
        return batch_size
    if engine.device.type != "cuda":
        return CPU_BATCH_SIZE
    import torch

    large = torch.cuda.get_device_properties(engine.device).total_memory >= LARGE_GPU_BYTES
    return LARGE_GPU_BATCH_SIZE if large else GPU_BATCH_SIZE


def default_batch_tokens(engine: Any, kind: str = "generate") -> int:
    """Token budget per batch when none is given: a fixed size on CPU, where memory is rarely the limit; on a
    GPU, what `MEMORY_SHARE` of its free memory holds (`tokens_in_memory`, `free_memory`)."""
    if engine.device.type != "cuda":
        return CPU_BATCH_TOKENS
    return tokens_in_memory(engine.model.config, engine.dtype, free_memory(engine), kind)


def free_memory(engine: Any) -> int:
    """The GPU memory that was free when the engine planned its first batch, before any ran, rounded down to
    `FREE_GRAIN`. Every later plan takes the same figure: free memory read before each unit would shrink by
    what torch's caching allocator keeps between batches, so a unit planned after a resume (fresh process, more
    free) would batch its rows with other companions than the uninterrupted run did, and its log-probs would
    differ in the last digits. On the same kind of GPU and model, a resumed run plans as the first one did."""
    free = getattr(engine, "_free_at_start", None)
    if free is None:
        import torch

        free = torch.cuda.mem_get_info(engine.device)[0] // FREE_GRAIN * FREE_GRAIN
        engine._free_at_start = free
    return free


def tokens_in_memory(config: Any, dtype: Any, free_bytes: int, kind: str) -> int:
    """How many batch tokens fit in `MEMORY_SHARE` of `free_bytes`. generate: the KV cache, 2 x layers x kv
    heads x head dim values per token, kept for the whole batch. score / embed: no cache, but one layer's
    activations per token at a time (residual, q/k/v/output, the MLP's gate/up/act); their logits are
    computed a chunk of positions at a time (scoring.FLOAT_CHUNK), so the vocabulary does not count here."""
    import torch

    from .models import text_config

    cfg = text_config(config)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 12)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    width = torch.finfo(dtype).bits // 8
    if kind == "generate":
        per_token = 2 * layers * kv_heads * head_dim * width
    else:
        per_token = (6 * hidden + 3 * inner) * width
    return max(MIN_BATCH_TOKENS, int(MEMORY_SHARE * free_bytes / max(per_token, 1)))


def plan_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_batch_tokens: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Group sequence indices into batches, longest prompts first.

    A batch holds at most `batch_size` sequences and at most `max_batch_tokens` tokens counted as
    rows x (longest prompt in the batch + max_new_tokens), which bounds the KV cache. A single sequence over
    the budget still gets a batch of its own. Deterministic: the same lengths give the same plan.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, lengths[i]) + max_new_tokens
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] int64 left-padded with `pad_id`, attention_mask [batch, seq] int64 (1 = real)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
