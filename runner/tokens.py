"""How tokens read in results: each token's text in place and its exact UTF-8 bytes.

engine.py / scoring.py (token ids) -> `TokenText` -> results.py (`tokens`, `token_bytes`, `top_logprobs`)
and openai_batch.py (`logprobs.content[].bytes`).

Decoding one id at a time is wrong twice: SentencePiece drops the leading space ("▁Paris" -> "Paris"), and a
character split over byte tokens (most Japanese with GPT-2's byte-level BPE) decodes as "\ufffd" on each part.
So a token's text is read in place (decoded after the tokens before it), and its bytes come from llguidance's
byte-level view of the tokenizer (the one constrained decoding uses), from which split characters can be
rebuilt exactly, as OpenAI's `bytes` field allows.
"""

from __future__ import annotations

import codecs
import weakref
from collections.abc import Sequence
from typing import Any

PIECE_CONTEXT = 8  # tokens decoded before each token in `token_pieces` (a UTF-8 character is <= 4 bytes)
REPLACEMENT = "\ufffd"
_BYTE_LEVEL: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # tokenizer -> LLTokenizer


def token_pieces(tokenizer: Any, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[str]:
    """The text of each token as it reads in place, leading space included (SentencePiece's "▁Paris" ->
    " Paris", which decoding the id alone loses): each token is decoded after the few before it (`prefix`
    first) and the text of those cut off. A character split over several byte tokens shows whole on its
    last token and as "" on the others, so the pieces join back into the text; special tokens show as
    themselves ("</s>")."""
    seq = [*prefix[-PIECE_CONTEXT:], *ids]
    off = len(seq) - len(ids)
    starts = [max(0, off + i - PIECE_CONTEXT) for i in range(len(ids))]
    heads = _decode(tokenizer, [seq[s : off + i] for i, s in enumerate(starts)])
    fulls = _decode(tokenizer, [seq[s : off + i + 1] for i, s in enumerate(starts)])
    special = set(tokenizer.all_special_ids)
    pieces = []
    for i, (head, full) in enumerate(zip(heads, fulls, strict=True)):
        if ids[i] in special:
            pieces.append(tokenizer.convert_ids_to_tokens(ids[i]))
        else:
            last = i == len(ids) - 1
            pieces.append(_piece(tokenizer, ids[i], head, full, keep_partial=last, cut_start=starts[i] > 0))
    return pieces


def alternative_pieces(tokenizer: Any, prefix: Sequence[int], alternatives: Sequence[int]) -> list[str]:
    """The text each of `alternatives` would read as after `prefix` (the top log-probs of one step): in place
    like `token_pieces`, so " Paris" keeps its space and a token that completes a character shows it."""
    window = list(prefix[-PIECE_CONTEXT:])
    cut = len(prefix) > PIECE_CONTEXT
    (head,) = _decode(tokenizer, [window])
    fulls = _decode(tokenizer, [[*window, a] for a in alternatives])
    special = set(tokenizer.all_special_ids)
    return [
        tokenizer.convert_ids_to_tokens(a) if a in special else _piece(tokenizer, a, head, full, True, cut)
        for a, full in zip(alternatives, fulls, strict=True)
    ]


def _decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def _piece(tokenizer: Any, token: int, head: str, full: str, keep_partial: bool, cut_start: bool) -> str:
    # "\ufffd" is an incomplete character: at the end, wait for its last byte (unless nothing follows); at the
    # start (the window began inside a character) it is the same in both and not this token's text.
    head = head.rstrip(REPLACEMENT)
    if not keep_partial:
        full = full.rstrip(REPLACEMENT)
    if cut_start:
        head, full = head.lstrip(REPLACEMENT), full.lstrip(REPLACEMENT)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode([token])


class TokenText:
    """Texts and bytes of one tokenizer's tokens, for result tables. The byte table is built on first use
    (about 0.3 s for a 50k vocabulary)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._ll: Any = None

    def pieces(self, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[str]:
        return (
            token_pieces(self.tokenizer, [int(i) for i in ids], [int(i) for i in prefix]) if len(ids) else []
        )

    def alternatives(self, prefix: Sequence[int], alternatives: Sequence[int]) -> list[str]:
        return alternative_pieces(self.tokenizer, [int(i) for i in prefix], [int(i) for i in alternatives])

    def bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's exact UTF-8 bytes (a special token's: its name)."""
        ll = self._byte_table()
        if ll is None:  # no byte-level view of this tokenizer: the bytes of its text in place
            return [p.encode() for p in self.pieces(ids)]
        return [ll.decode_bytes([int(i)]) for i in ids]

    def _byte_table(self) -> Any:
        if self._ll is None:
            self._ll = byte_level_tokenizer(self.tokenizer) or False
        return self._ll or None


def byte_level_tokenizer(tokenizer: Any) -> Any:
    """llguidance's LLTokenizer for a Hugging Face tokenizer, built once per tokenizer (None for a slow,
    Python-only tokenizer or any other it cannot read)."""
    import llguidance.hf

    if not getattr(tokenizer, "is_fast", False):
        return None
    if tokenizer not in _BYTE_LEVEL:
        try:
            _BYTE_LEVEL[tokenizer] = llguidance.hf.from_tokenizer(tokenizer)
        except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read: bytes of the text in place instead
            _BYTE_LEVEL[tokenizer] = None
    return _BYTE_LEVEL[tokenizer]


def hold_back_partial(text: str, token_bytes: Sequence[bytes]) -> str:
    """`text` without the trailing "\ufffd" that stands for a character the token limit cut (its last bytes
    never generated), as a streaming decoder holds incomplete bytes back; a U+FFFD the model wrote stays."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(b"".join(token_bytes), final=False)
    pending = decoder.getstate()[0]
    return text[:-1] if pending and text.endswith(REPLACEMENT) else text
