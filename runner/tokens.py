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
import functools
import re
import weakref
from collections.abc import Sequence
from typing import Any

PIECE_CONTEXT = 8  # tokens decoded before each token in `token_pieces` (a UTF-8 character is <= 4 bytes)
REPLACEMENT = "\ufffd"
SPACE_MARK = "\u2581"  # SentencePiece's "▁": how a token that is a space the text does not show is printed
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens: <0x2C>
_BYTE_LEVEL: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # tokenizer -> LLTokenizer
_RUST: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # tokenizer -> Rust decoder or None


def token_pieces(tokenizer: Any, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[str]:
    """The text of each token as it reads in place, leading space included (SentencePiece's "▁Paris" ->
    " Paris", which decoding the id alone loses): each token's exact bytes (`byte_level_tokenizer`) fed to a
    UTF-8 decoder that has read the tokens before it (`prefix` first). A character split over several byte
    tokens shows whole on its last token and as "" on the others, so the pieces join back into the text; an
    unfinished character at the very end shows as "\ufffd"; special tokens show as themselves ("</s>")."""
    ll = byte_level_tokenizer(tokenizer)
    if ll is None:
        return _decoded_pieces(tokenizer, ids, prefix)
    special = set(tokenizer.all_special_ids)
    decoder = _decoder_after(ll, prefix, special)
    pieces = []
    for i, t in enumerate(ids):
        if t in special:
            pieces.append(tokenizer.convert_ids_to_tokens(t))
            continue
        piece = decoder.decode(ll.decode_bytes([t]))
        pieces.append(piece + REPLACEMENT if i == len(ids) - 1 and decoder.getstate()[0] else piece)
    return _without_dummy_prefix(tokenizer, ids, prefix, special, pieces)


def alternative_pieces(tokenizer: Any, prefix: Sequence[int], alternatives: Sequence[int]) -> list[str]:
    """The text each of `alternatives` would read as after `prefix` (the top log-probs of one step): in place
    like `token_pieces`, so " Paris" keeps its space and a token that completes a character shows it."""
    ll = byte_level_tokenizer(tokenizer)
    if ll is None:
        return _decoded_alternatives(tokenizer, prefix, alternatives)
    special = set(tokenizer.all_special_ids)
    state = _decoder_after(ll, prefix, special).getstate()
    out = []
    for a in alternatives:
        if a in special:
            out.append(tokenizer.convert_ids_to_tokens(a))
            continue
        decoder = _utf8()
        decoder.setstate(state)
        piece = decoder.decode(ll.decode_bytes([a]))
        piece += REPLACEMENT if decoder.getstate()[0] else ""
        out.append(_without_dummy_prefix(tokenizer, [a], prefix, special, [piece])[0])
    return out


def _utf8() -> Any:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _decoder_after(ll: Any, prefix: Sequence[int], special: set[int]) -> Any:
    """A UTF-8 decoder that has read the last tokens of `prefix` (holding the first bytes of an unfinished
    character, if they end with one)."""
    decoder = _utf8()
    for t in prefix[-PIECE_CONTEXT:]:
        if t not in special:
            decoder.decode(ll.decode_bytes([t]))
    return decoder


def _without_dummy_prefix(
    tokenizer: Any, ids: Sequence[int], prefix: Sequence[int], special: set[int], pieces: list[str]
) -> list[str]:
    """SentencePiece writes a space in front of the first word ("▁The") that decoding drops at the start of a
    text: drop it from the first token's piece too when no real token comes before it."""
    if any(t not in special for t in prefix):
        return pieces
    first = next((i for i, t in enumerate(ids) if t not in special), None)
    if first is None or not pieces[first].startswith(" ") or tokenizer.decode([ids[first]]).startswith(" "):
        return pieces
    return [*pieces[:first], pieces[first][1:], *pieces[first + 1 :]]


def _decoded_pieces(tokenizer: Any, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[str]:
    """token_pieces for a tokenizer with no byte-level view: each token decoded after the few before it and
    the text of those cut off (exact unless a run of byte tokens decodes differently in parts)."""
    seq = [*prefix[-PIECE_CONTEXT:], *ids]
    off = len(seq) - len(ids)
    starts = [max(0, off + i - PIECE_CONTEXT) for i in range(len(ids))]
    heads = decode_many(tokenizer, [seq[s : off + i] for i, s in enumerate(starts)])
    fulls = decode_many(tokenizer, [seq[s : off + i + 1] for i, s in enumerate(starts)])
    special = set(tokenizer.all_special_ids)
    pieces = []
    for i, (head, full) in enumerate(zip(heads, fulls, strict=True)):
        if ids[i] in special:
            pieces.append(tokenizer.convert_ids_to_tokens(ids[i]))
        else:
            last = i == len(ids) - 1
            pieces.append(_piece(tokenizer, ids[i], head, full, keep_partial=last, cut_start=starts[i] > 0))
    return pieces


def _decoded_alternatives(tokenizer: Any, prefix: Sequence[int], alternatives: Sequence[int]) -> list[str]:
    window = list(prefix[-PIECE_CONTEXT:])
    cut = len(prefix) > PIECE_CONTEXT
    (head,) = decode_many(tokenizer, [window])
    fulls = decode_many(tokenizer, [[*window, a] for a in alternatives])
    special = set(tokenizer.all_special_ids)
    return [
        tokenizer.convert_ids_to_tokens(a) if a in special else _piece(tokenizer, a, head, full, True, cut)
        for a, full in zip(alternatives, fulls, strict=True)
    ]


def decode_many(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)` of each row. transformers' `batch_decode` calls
    `decode` row by row in Python; where `decode` is exactly the Rust tokenizer's (`_rust_decoder`), all rows
    go to it in one call (its threads share them out): the same texts, 2x faster on one core and more on many.
    The decode loop's stop strings read every such row's whole text at every step (engine.py)."""
    if not rows:
        return []
    rust = _rust_decoder(tokenizer)
    if rust is not None:
        return rust.decode_batch(rows, skip_special_tokens=True)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def _rust_decoder(tokenizer: Any) -> Any:
    """The tokenizers.Tokenizer behind `tokenizer` when its `decode` is that Tokenizer's decode and nothing
    more: transformers' own fast tokenizer class (methods not overridden by a model's code) with no clean-up
    of spaces. Otherwise None."""
    try:
        return _RUST[tokenizer]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable
        return None
    from transformers import PreTrainedTokenizerFast

    base, cls = PreTrainedTokenizerFast, type(tokenizer)
    plain = isinstance(tokenizer, base) and all(
        getattr(cls, name) is getattr(base, name) for name in ("decode", "_decode", "batch_decode")
    )
    rust = getattr(tokenizer, "_tokenizer", None)
    ok = plain and not tokenizer.clean_up_tokenization_spaces and hasattr(rust, "decode_batch")
    _RUST[tokenizer] = rust if ok else None
    return _RUST[tokenizer]


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

    def bytes(self, ids: Sequence[int], space_marks: bool = True) -> list[bytes]:
        """Each token's exact UTF-8 bytes (a special token's: its name). `space_marks` False: a tokenizer with no
        byte-level view gives each token's text decoded alone, SentencePiece's "▁" in front dropped, as before
        pass 271 (`scoring._continuation_ids`, whose pairs a job's reading fixes)."""
        ll = self._byte_table()
        if ll is None and not space_marks:
            return [self.tokenizer.decode([int(i)]).encode() for i in ids]
        if ll is None:  # no byte-level view of this tokenizer: the bytes of each token's own text
            ids = [int(i) for i in ids]
            texts = [self.tokenizer.decode([i]) for i in ids]
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            special = set(self.tokenizer.all_special_ids)
            # decoding one id drops SentencePiece's space in front ("▁今日" -> "今日", "▁" -> ""; rinna's
            # Unigram T5Tokenizer): put it back, as llguidance's table has it for byte-fallback vocabularies
            return [
                (" " + text if isinstance(p, str) and p.startswith(SPACE_MARK) and t not in special
                 and not text.startswith(" ") else text).encode()
                for t, p, text in zip(ids, pieces, texts, strict=True)
            ]  # fmt: skip
        return [ll.decode_bytes([int(i)]) for i in ids]

    def held_before(self, ids: Sequence[int], prefix: Sequence[int] = ()) -> list[bytes]:
        """Before each of `ids`, read in place after `prefix`, the first bytes of a character still waiting
        for its last ones (b"" where none): what `unfinished` needs to tell a token that leaves a character
        unfinished from one whose bytes are simply not UTF-8."""
        special = set(self.tokenizer.all_special_ids)
        seq = [int(t) for t in [*prefix[-PIECE_CONTEXT:], *ids]]
        decoder = _utf8()
        held = []
        for t, raw in zip(seq, self.bytes(seq), strict=True):
            held.append(decoder.getstate()[0])
            if t not in special:
                decoder.decode(raw)
        return held[len(held) - len(ids) :]

    @functools.cached_property
    def byte_twins(self) -> frozenset[int]:
        """The byte-fallback tokens (SentencePiece's <0x2C>, as Llama's and Mistral's vocabularies have) whose
        byte another token of the vocabulary spells too ("," and <0x2C>, "▁" and <0x20>). Both read as the same
        text, so a `top_logprobs` keyed by text kept one of them (19 entries where 20 were asked, and the chosen
        token's key could hold its twin's log-prob: adversarial pass 169); openai_batch.py names these by their
        bytes ("bytes:\\x2c"), as a token that is no text alone is."""
        tokenizer = self.tokenizer
        ids = list(range(len(tokenizer)))
        fallback = {
            i for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
            if isinstance(piece, str) and _BYTE_FALLBACK.fullmatch(piece)
        }  # fmt: skip
        if not fallback:
            return frozenset()
        raw = self.bytes(ids)
        spelled = {raw[i] for i in ids if i not in fallback and len(raw[i]) == 1}
        return frozenset(i for i in fallback if raw[i] in spelled)

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


def text_alone(raw: bytes) -> str | None:
    """A token's bytes read on their own, a space as SentencePiece's "▁" (how a token that reads as nothing
    in place is shown: part of a character, or the space in front of a text); None where they are not UTF-8."""
    try:
        return bytes(raw).decode("utf-8").replace(" ", SPACE_MARK)
    except UnicodeDecodeError:
        return None


def unfinished(held: bytes, raw: bytes) -> bool:
    """Whether a token of bytes `raw`, read after the bytes `held` of an unfinished character
    (`TokenText.held_before`), leaves a character unfinished: its text in place then ends in the "\ufffd" that
    `token_pieces` and `alternative_pieces` add where nothing follows, which is not a character of its own."""
    decoder = _utf8()
    decoder.decode(held + raw)
    return bool(decoder.getstate()[0])


def partial_tail_tokens(token_bytes: Sequence[bytes]) -> int | None:
    """How many trailing tokens hold only the first bytes of a character that never got its last ones (0: the
    text ends whole; None: a token holds both the end of a whole character and such first bytes)."""
    decoder = _utf8()
    decoder.decode(b"".join(token_bytes), final=False)
    pending = len(decoder.getstate()[0])
    held = 0
    for k, raw in enumerate(reversed(token_bytes)):
        if held == pending:
            return k
        held += len(raw)
        if held > pending:
            return None
    return len(token_bytes) if held == pending else None
