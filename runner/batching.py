"""Turn validated rows into token ids and plan them into length-sorted, budgeted, left-padded batches.

rows (inputs.py) -> `render_prompt` + `encode` (once per row, at submit) -> `plan_batches` -> `left_pad`
-> engine.py

Sorting by length keeps padding small; the token budget keeps a batch of long prompts from running out of
memory while short prompts still get large batches. Padding is always on the left so every row's next token sits
in the last column, and the attention mask (never the token values) tells padding from real tokens, so a pad
token that equals EOS (GPT-2) cannot be confused with a real EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import RunnerError

if TYPE_CHECKING:
    import torch


def render_prompt(prompt: str | None, messages: list[dict[str, str]] | None, tokenizer: Any) -> str:
    """The exact text sent to the model: the prompt itself, or the messages through the chat template."""
    if messages is None:
        assert prompt is not None
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise RunnerError(
            "this row has 'messages' but the model's tokenizer has no chat template; "
            "give a plain 'prompt' (or --template) instead, or use a chat/instruct model"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of one prompt. A rendered chat template already holds its special tokens (BOS included),
    so it is encoded without adding them again; a plain prompt gets what the tokenizer adds (Llama's BOS)."""
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def encode_many(tokenizer: Any, texts: Sequence[str], chat: bool) -> list[list[int]]:
    """`encode` of each text, in one tokenizer call: a fast (Rust) tokenizer encodes a list many times faster
    than the same texts one by one, which is most of what submitting a big file costs."""
    return encode_texts(tokenizer, texts, add_special_tokens=not chat)


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
