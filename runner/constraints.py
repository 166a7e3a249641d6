"""Structured output: each sample's text held to a JSON schema, a regex, a list of choices or a grammar.

params.py (`GenerationParams.json_schema`, `json_object`, `regex`, `choices`, `grammar`) -> `grammar_of` (the
llguidance grammar, checked when the settings are made: `problem`) -> engine.py's decode loop, where
`Constraints` holds one llguidance matcher per constrained row: each step `mask` removes the tokens a row may
not take from the scores its token is picked from, `advance` feeds the picked tokens to the matchers, and
`complete` says at the end whether a row's text satisfies its constraint.

The engine is llguidance (Rust; used by vLLM, SGLang and outlines): a grammar compiles in well under a
millisecond and the token masks of a batch are computed in parallel, outside the GIL, from the tokenizer's
vocabulary, so nothing here walks the vocabulary in Python.

The mask decides the token only: `token_logprobs` stay the raw model's log-probs (log_softmax of the
unprocessed logits), so a very negative log-prob shows where the constraint forced the model's hand.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from .errors import ParamError, RunnerError

# GenerationParams fields that constrain the output; at most one per row.
FIELDS = ("json_schema", "json_object", "regex", "choices", "grammar")
# JSON as a model writes it on one line, `{"a": 1, "b": [2, 3]}`: free whitespace lets small models loop on
# newlines until max_new_tokens. A schema's own "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# how `tokenizer_of`'s refusal begins (submit says "<field> cannot be used with this model's tokenizer: " instead)
UNUSABLE = "structured output cannot use this model's tokenizer: "


def kind_of(params: Any) -> str | None:
    """The constraint field `params` sets, or None."""
    given = [f for f in FIELDS if getattr(params, f, None) not in (None, False)]
    return given[0] if given else None


def grammar_of(params: Any) -> str | None:
    """The llguidance grammar (JSON text) of the row's constraint, or None when it has none."""
    from llguidance import LLMatcher

    kind = kind_of(params)
    if kind is None:
        return None
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(json.dumps(params.json_schema), defaults=JSON_DEFAULTS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choices":  # Lark string literals take JSON's escapes
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choices))
    return LLMatcher.grammar_from_lark(lark_of(params.grammar))


def lark_of(text: str) -> str:
    """A grammar as Lark: Lark (llguidance's dialect) as is, GBNF (llama.cpp) converted."""
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return any_to_lark(text)
    except Exception as e:  # noqa: BLE001 (the converter raises plain exceptions of several kinds)
        raise ValueError(f"cannot read it as Lark or GBNF: {e}") from e


def problem(params: Any) -> str | None:
    """What is wrong with the row's constraint, to follow its field's name ("cannot be compiled: " and
    llguidance's message, or "matches no text ..."), or None when it can be used."""
    below = _below_int64(_schemas_in(params))
    if below:
        return f"cannot be compiled: {below}"
    try:
        grammar = grammar_of(params)
    except ValueError as e:
        return f"cannot be compiled: {e}"
    except RecursionError:  # a schema given as a Python dict too deep for json.dumps
        return "cannot be compiled: nested too deeply"
    message = None if grammar is None else _check(grammar)
    if message and kind_of(params) != "grammar":
        message = re.sub(r"^at \d+\(\d+\): ", "", message)  # a place in the grammar made here: meaningless
    if message is None and grammar is not None and _matches_nothing(grammar):
        return "matches no text at all: no answer could satisfy it"
    return message and f"cannot be compiled: {message}"


INT64_MIN = -(2**63)


def _below_int64(schema: Any) -> str | None:
    """Where an integer (sub)schema allows only integers at or below -2**63, as llguidance reads a JSON number (a
    float, then a 64-bit integer): a const or enum value there, or a range both of whose bounds are. llguidance
    1.9 compiling such a range, [-2**63, -2**63], crashes the process (a segmentation fault, no message), so it
    is refused before. Other bounds are llguidance's to judge."""
    todo = [schema]
    while todo:  # (not recursive: a schema may nest deeper than Python's stack; `problem` says so then)
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        if not isinstance(node, dict):
            continue
        todo.extend(node.values())
        whole = _intersected(node)
        # (each of its anyOf / oneOf subschemas is one more range: with `node`, not with the other choices)
        choices = [s for n in whole for k in ("anyOf", "oneOf") if isinstance(n.get(k), list) for s in n[k]]
        for group in [whole, *(whole + _intersected(c) for c in choices if isinstance(c, dict))]:
            said = _integers_below(group)
            if said:
                return said
    return None


def _schemas_in(params: Any) -> list[Any]:
    """The JSON schemas of the row's constraint: its json_schema, or those a Lark grammar embeds (`%json {...}`)."""
    kind = kind_of(params)
    if kind == "json_schema":
        return [params.json_schema]
    if kind != "grammar":
        return []
    found, decoder = [], json.JSONDecoder()
    for at in re.finditer(r"%json\s*", params.grammar):
        try:
            found.append(decoder.raw_decode(params.grammar, at.end())[0])
        except ValueError:  # (not JSON: llguidance's to say)
            continue
    return found


def _intersected(node: dict[str, Any]) -> list[dict[str, Any]]:
    """`node` and the subschemas of its allOf, theirs too: llguidance intersects them (`{"type": "integer",
    "minimum": ..., "allOf": [{"maximum": ...}]}` is one range)."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        if isinstance(n.get("allOf"), list):
            todo.extend(s for s in n["allOf"] if isinstance(s, dict))
    return out


def _integers_below(group: list[dict[str, Any]]) -> str | None:
    """`_below_int64` of one group of intersected subschemas."""
    if not any("integer" in (t if isinstance(t := n.get("type"), list) else [t]) for n in group):
        return None
    for n in group:
        values = [("const", n.get("const"))] + [
            ("enum", v) for v in n.get("enum", []) if isinstance(n["enum"], list)
        ]
        for key, v in values:
            if (x := _number(v)) is not None and x <= INT64_MIN:
                return f"{key} value {v!r} lies at or below -2**63 ({INT64_MIN}), where llguidance's integers end"
    lows = [
        (k, n[k]) for n in group for k in ("minimum", "exclusiveMinimum") if _number(n.get(k)) is not None
    ]
    highs = [
        (k, n[k]) for n in group for k in ("maximum", "exclusiveMaximum") if _number(n.get(k)) is not None
    ]
    below = [(k, v) for k, v in highs if _number(v) <= INT64_MIN]
    # (the range is the tightest: its lower bound the greatest given, its upper the least)
    if lows and below and all(_number(v) <= INT64_MIN for _, v in lows):
        return (f"{lows[0][0]} {lows[0][1]!r} and {below[0][0]} {below[0][1]!r} lie at or below -2**63 "
                f"({INT64_MIN}), where llguidance's integers end")  # fmt: skip
    return None


def _number(value: Any) -> float | None:
    """A JSON number as llguidance reads it (a float; one past a float's range, as infinite), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # (an integer of hundreds of digits)
        return math.inf if value > 0 else -math.inf


def tokenizer_problem(params: Any, tokenizer: Any) -> str | None:
    """What is wrong with the row's constraint for the model's (Hugging Face) tokenizer, to follow its field's
    name ("cannot be used with this model's tokenizer: " and why), or None; each would otherwise stop the whole
    run at the first batch holding the row. Any constraint needs a tokenizer llguidance reads (not a WordPiece
    one, as GPT-2 Chinese models have, nor a slow one). Only a grammar names tokens (`<|im_end|>`,
    `<[128000]>`): `problem` judges it on a tokenizer of bytes, which has none."""
    kind = kind_of(params)
    if kind is None:
        return None
    message = _unreadable(tokenizer)
    if message is None and kind == "grammar":
        message = _check_with(grammar_of(params), tokenizer)
    return message and f"cannot be used with this model's tokenizer: {message}"


def check_tokenizer(params: Any, tokenizer: Any) -> None:
    """ParamError naming the constraint's field when it cannot be used with the model's tokenizer
    (`tokenizer_problem`): a submit asks it of the job's settings and of each row's own, a try of its settings."""
    problem = tokenizer_problem(params, tokenizer)
    if problem:
        raise ParamError(kind_of(params), f"{kind_of(params)} {problem}")


@functools.lru_cache(maxsize=1)
def _unreadable(tokenizer: Any) -> str | None:
    """Why llguidance cannot read the model's tokenizer, or None: once per tokenizer, not per row."""
    try:
        _tokenizer_of_model(tokenizer)
    except RunnerError as e:
        return str(e).removeprefix(UNUSABLE)
    return None


@functools.lru_cache(maxsize=256)
def _check_with(grammar: str, tokenizer: Any) -> str | None:
    """llguidance's complaint about `grammar` on the model's tokenizer, on one line: once per grammar, not per
    row (a submit asks it of every row that has settings of its own, most of them the job's grammar)."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_tokenizer_of_model(tokenizer), grammar, log_level=0)
    return _check_message(matcher.get_error()) if matcher.is_error() else None


@functools.lru_cache(maxsize=1)
def _tokenizer_of_model(tokenizer: Any) -> Any:
    """The llguidance tokenizer of a submit's Hugging Face tokenizer (its EOS is enough to judge a grammar)."""
    return tokenizer_of(tokenizer, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [0])


@functools.lru_cache(maxsize=256)
def _check(grammar: str) -> str | None:
    """llguidance's complaint about a grammar, on one line (without its echo of the grammar's source)."""
    from llguidance import LLMatcher

    return _check_message(LLMatcher.validate_grammar(grammar))


def _check_message(message: str) -> str | None:
    """llguidance's message on one line, without its echo of the grammar's source (`1 | start: ...`, `^`)."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and set(line) != {"^"} and not re.match(r"\d+ \|", line)]
    return " ".join(kept) or None


@functools.lru_cache(maxsize=256)
def _matches_nothing(grammar: str) -> bool:
    """True when not even a first byte of text can satisfy `grammar` (a regex such as `[a&&b]`, a JSON schema
    whose bounds exclude every value): llguidance compiles such a grammar, then a row would end at once with
    an empty text. Judged on a tokenizer of single bytes, so it holds for every model's tokenizer."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    if matcher.is_error():
        # (e.g. a grammar naming a model's special token: `tokenizer_problem` judges it at submit)
        return False
    matcher.compute_bitmask()
    return matcher.is_error() and not matcher.is_accepting()


@functools.cache
def _byte_tokenizer() -> Any:
    """An llguidance tokenizer whose tokens are the 256 bytes (and an EOS)."""
    from llguidance import LLTokenizer, TokenizerWrapper

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([i]) for i in range(256)] + [b"</s>"]

        def __call__(self, text: bytes | str) -> list[int]:
            return list(text if isinstance(text, bytes) else text.encode("utf-8"))

    return LLTokenizer(TokenizerWrapper(Bytes()))


class Constraints:
    """The matchers of one `generate` call's constrained rows, by row (not slot), so that rows leaving and
    joining the batch need no bookkeeping here. `tokenizer`: an llguidance LLTokenizer whose EOS tokens are
    the model's (`tokenizer_of`)."""

    def __init__(self, tokenizer: Any, grammars: list[str | None]):
        from llguidance import LLMatcher

        self.tokenizer = tokenizer
        # one compiled matcher per distinct grammar (rows of a job, samples of a row share theirs: a large JSON
        # schema takes ~7 ms to compile, 0.1 ms to copy), each row a fresh copy of it
        compiled: dict[str, Any] = {}
        for g in grammars:
            if g is not None and g not in compiled:
                compiled[g] = LLMatcher(tokenizer, g, log_level=0)
                if compiled[g].is_error():
                    raise RunnerError(
                        f"cannot compile a row's constraint for this tokenizer: {compiled[g].get_error()}"
                    )
        self.matchers = [None if g is None else compiled[g].deep_copy() for g in grammars]
        # per row: after k generated tokens (k = 0, 1, ...), whether the text so far satisfies the constraint
        self.accepting = [[m.is_accepting()] if m is not None else [] for m in self.matchers]
        self._bits: Any = None  # [rows, vocab / 32] int32: the masks of the constrained slots, reused

    def mask(self, logits: Any, rows: list[int]) -> Any:
        """`logits` [slots, vocab] float32 with the tokens each constrained slot may not take set to -inf
        (a new tensor; `logits` is left unchanged). `rows[slot]` is the slot's row."""
        import torch

        slots = [s for s, r in enumerate(rows) if self.matchers[r] is not None]
        if not slots:
            return logits
        refused = self._refused([rows[s] for s in slots], logits.shape[-1], logits.device)  # [c, vocab]
        if len(slots) == len(rows):
            return logits.masked_fill(refused, -math.inf)
        out = logits.clone()
        idx = torch.tensor(slots, device=logits.device)
        out[idx] = logits[idx].masked_fill(refused, -math.inf)
        return out

    def _refused(self, rows: list[int], vocab: int, device: Any) -> Any:
        """[len(rows), vocab] bool on `device`: the tokens each row's matcher refuses next (it allows EOS only
        when its text is complete); ids past the tokenizer's vocabulary (a model's padded embedding rows)
        always."""
        import torch
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        if self._bits is None or self._bits.shape[0] < len(rows):
            self._bits = allocate_token_bitmask(len(self.matchers), self.tokenizer.vocab_size)
        bits = self._bits[: len(rows)]
        fill_next_token_bitmask_par(_executor(), [(self.matchers[r], k) for k, r in enumerate(rows)], bits)
        refused = unpack_refused(bits, device)
        if refused.shape[1] < vocab:
            refused = torch.cat([refused, refused.new_ones(len(rows), vocab - refused.shape[1])], dim=1)
        return refused[:, :vocab]

    def advance(self, rows: list[int], tokens: list[int]) -> list[bool]:
        """Feed each slot's picked token to its row's matcher, EOS too (it ends the row): a grammar may name the
        EOS token (`start: "yes" <|im_end|>`), and is satisfied only once it is fed. Returns per slot whether
        the row's constraint is over: nothing but EOS may follow, or (never expected, as the mask allowed the
        token) the matcher refused it."""
        done = [False] * len(rows)
        for s, (r, t) in enumerate(zip(rows, tokens, strict=True)):
            m = self.matchers[r]
            if m is None:
                continue
            ok = m.consume_token(t)
            self.accepting[r].append(ok and m.is_accepting())
            done[s] = not ok or m.is_stopped()
        return done

    def failure(self, row: int) -> str | None:
        """Why the row's matcher gave up mid-sample, on one line (llguidance's message without its dump of the
        parser's state), or None while it works. A matcher that hits one of llguidance's parser limits (`Current
        row has 2001 items; max is 2000`: a right-recursive grammar nests once per character) stays in error and
        then allows nothing but EOS: its sample would read as one the model stopped."""
        m = self.matchers[row]
        if m is None or not m.is_error():
            return None
        return _check_message(m.get_error().split("<state>")[0]) or "its matcher failed"

    def complete(self, row: int, tokens: int) -> bool | None:
        """Whether the row's first `tokens` generated tokens (a final EOS counted) satisfy its constraint; None
        for a row without one."""
        if self.matchers[row] is None:
            return None
        return self.accepting[row][tokens]

    def complete_with(self, row: int, tokens: int, rest: str) -> bool:
        """Whether the row's first `tokens` generated tokens, then the text `rest` (where the row's text ends
        inside a generated token: a character held back, a stop string cut), satisfy its constraint: `rest` as
        tokens of exactly its bytes (llguidance's tokenize_bytes; a tokenizer's own encode may add a space).
        Rolls the row's matcher back: for a row that is over."""
        m = self.matchers[row]
        assert m is not None
        more = self.tokenizer.tokenize_bytes(rest.encode("utf-8"))
        fed = len(self.accepting[row]) - 1
        if (
            self.tokenizer.decode_bytes(more) != rest.encode("utf-8")
            or m.is_error()
            or not m.rollback(fed - tokens)
        ):
            return False
        return m.try_consume_tokens(more) == len(more) and m.is_accepting()


def failure_message(params: Any, tokens: int, failure: str) -> str:
    """A row error's message for a row whose matcher gave up at its `tokens`-th generated token (`failure`:
    `Constraints.failure`), naming the constraint's field; for a right-recursive grammar, the way out."""
    message = f"{kind_of(params)}: llguidance's parser gave up at token {tokens:,}: {failure}"
    if "NoExtensionBias" in failure:  # (llguidance's name for a mask that allows no token at all)
        message += (" (no token may follow the text so far, not even its end: the grammar has a dead end there, "
                    "such as rules that only call each other or a terminal that no text matches)")  # fmt: skip
    # (llguidance's own advice there, "try avoiding single-byte/short lexemes", misleads)
    if "ff_tokens" in failure:
        message += (" (the text it forces from here on never ends: no finite text satisfies the constraint, such as "
                    "a schema each of whose arrays or objects must hold another, or a rule that only calls itself, "
                    '`start: "a" start`)')  # fmt: skip
    if "left-recursive" in failure:
        message += (" (where a rule calls itself last, as GBNF's `root ::= [a-z] root | [a-z]`, it nests one level "
                    "per character: write it `root ::= [a-z]+`, or left-recursive, `root ::= root [a-z] | [a-z]`)")  # fmt: skip
    return message


def unpack_refused(bits: Any, device: Any) -> Any:
    """llguidance's bitmask [c, words] int32 (bit j of word i set: token 32 i + j allowed) as [c, words * 32]
    bool on `device`, set where refused. On a GPU the words travel (1/8 of the bools' bytes) and are unpacked
    there; on a CPU numpy's unpackbits is the fastest way."""
    if getattr(device, "type", "cpu") == "cpu":
        return _unpack_with_numpy(bits)
    return _unpack_with_torch(bits, device)


def _unpack_with_numpy(bits: Any) -> Any:
    import numpy as np
    import torch

    # little-endian int32 words: their bytes low first, each byte's bits low first
    return torch.from_numpy(np.unpackbits((~bits.numpy()).view(np.uint8), axis=1, bitorder="little")).bool()


def _unpack_with_torch(bits: Any, device: Any) -> Any:
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=device)
    return ((bits.to(device).unsqueeze(-1) >> shifts) & 1).eq(0).flatten(1)


def tokenizer_of(tokenizer: Any, eos_ids: list[int]) -> Any:
    """The llguidance tokenizer of a Hugging Face (fast) tokenizer, with the model's EOS ids as its EOS tokens
    (so a matcher whose text is complete allows each of them). ~0.3 s: the engine keeps it."""
    from llguidance.hf import from_tokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise RunnerError(
            f"{UNUSABLE}it is a slow one ({type(tokenizer).__name__}); llguidance reads fast (Rust) ones"
        )
    try:
        return from_tokenizer(tokenizer, eos_token=list(eos_ids))
    except ValueError as e:  # (a WordPiece tokenizer: "can't determine decoder type: Some(WordPiece(...))")
        raise RunnerError(f"{UNUSABLE}llguidance cannot read it ({e})") from e


@functools.lru_cache(maxsize=1)
def _executor() -> Any:
    """llguidance's thread pool for computing a batch's masks in parallel (one per process)."""
    from llguidance import LLExecutor

    return LLExecutor()
