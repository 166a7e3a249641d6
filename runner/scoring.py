"""Scoring and embedding: log-probs of given texts, of continuations given a context, and text vectors.

job rows (jobs.py: text -> `tokenize_text` / `split_context` -> token ids + index of the first scored token)
-> `score_rows` / `embed_batch` (one batch) -> `TextScore`s / vectors -> results.score_table / embed_table.
From Python, `score_texts`, `score_continuations` and `embed_texts` do the same on lists, batched by
`in_batches` (length-sorted, token-budgeted) with results in input order.

Padding is on the left with position ids that skip it, as in generation (engine.py), so a row scores the
same whatever batch it lands in. A row's last token is only predicted, never fed, as in lm-evaluation-harness:
a sequence may be one token longer than the context window. Only the logits of scored positions are computed,
and a chunk of positions at a time: the model runs once for its hidden states, its output layer then runs per
chunk, and log-probs are gathered as logit - logsumexp(logits) in float32, never as a full log_softmax copy,
so memory beyond the model is O(batch x vocab x positions per chunk) however long the texts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .batching import default_batch_size, default_batch_tokens, encode, encode_texts, left_pad, plan_batches
from .engine import NumericalError, prefill_groups
from .errors import RunnerError
from .tokens import TokenText, token_pieces

FLOAT_CHUNK = 1 << 25  # float32 logits converted at once: 128 MiB


@dataclass
class TextScore:
    """The scored tokens of one row: `token_logprobs[i]` = log P(token_ids[i] | every token before it) under
    the raw model distribution (no temperature), `greedy[i]`: token_ids[i] is that distribution's argmax."""

    token_ids: list[int]
    token_logprobs: list[float]
    greedy: list[bool]

    @property
    def is_greedy(self) -> bool:
        """Greedy decoding from the context would produce exactly these tokens (lm-eval's `is_greedy`)."""
        return all(self.greedy)

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.num_tokens if self.num_tokens else math.nan

    @property
    def perplexity(self) -> float:
        return perplexity(self.mean_logprob) if self.num_tokens else math.nan

    @classmethod
    def concat(cls, parts: Sequence[TextScore]) -> TextScore:
        """One score from consecutive parts (the windows of a rolling score)."""
        return cls(
            [t for p in parts for t in p.token_ids],
            [lp for p in parts for lp in p.token_logprobs],
            [g for p in parts for g in p.greedy],
        )


ScoredTokens = TextScore


def perplexity(mean_logprob: float) -> float:
    """exp(-mean log-prob per token); inf past float64 (a mean below -709.78: math.exp raises there)."""
    try:
        return math.exp(-mean_logprob)
    except OverflowError:
        return math.inf


# --- tokenizing -------------------------------------------------------------------------------------------


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token a text is scored after: BOS, or EOS for models without one (GPT-2's <|endoftext|>), as
    lm-evaluation-harness's `prefix_token_id`."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tokenize_text(tokenizer: Any, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids to score: [BOS] + text (+ [EOS]). The BOS is context only (score from index 1) so that the
    first word gets a score too; it is added once, whether or not the tokenizer adds it itself (Llama's <s>).
    add_eos scores "and then the text ends" too (gpt2-score does unless --exclude-end)."""
    return tokenize_texts(tokenizer, [text], add_bos, add_eos)[0]


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False
) -> list[list[int]]:
    """`tokenize_text` of each text, in one tokenizer call (much faster on a list with a fast tokenizer)."""
    bos = prefix_token_id(tokenizer) if add_bos else None
    eos = tokenizer.eos_token_id if add_eos else None
    return [
        ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        for ids in encode_texts(tokenizer, texts, add_special_tokens=False)
    ]


def split_context(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's `_encode_pair`: trailing whitespace of the
    context moves to the start of the continuation, the pair is encoded together, and the continuation is
    whatever follows the length of the context's own encoding, where the pair's encoding starts with it (else
    `_continuation_ids`: the continuation's own, or [] where that does not spell it). An empty context
    becomes [BOS] (EOS), and so does one that encodes to no tokens (a normalizer deletes its characters)."""
    return split_contexts(tokenizer, [(context, continuation)])[0]


def split_contexts(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], empty_is_bos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """`split_context` of each (context, continuation) pair, with all the encoding in one tokenizer call
    (`empty_is_bos` False: a context of no tokens stays [], as jobs read before 6 prepared it)."""
    texts: list[str] = []
    moved: list[str] = []  # each continuation with the context's trailing whitespace
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        moved.append(continuation)
        # An empty context encodes the continuation alone; otherwise the context, then context + continuation.
        texts.extend([continuation] if not context else [context, context + continuation])
    encoded = iter(encode_texts(tokenizer, texts, add_special_tokens=False))
    out = []
    for (context, _), continuation in zip(pairs, moved, strict=True):
        if not context.rstrip():
            out.append(([prefix_token_id(tokenizer)], next(encoded)))
        else:
            ctx, whole = next(encoded), next(encoded)
            # a context normalised away is the empty one: scored after the BOS, never from token 0
            bos = [prefix_token_id(tokenizer)] if empty_is_bos else []
            out.append((ctx or bos, _continuation_ids(tokenizer, ctx, whole, continuation)))
    return out


def _continuation_ids(tokenizer: Any, ctx: list[int], whole: list[int], continuation: str) -> list[int]:
    """The continuation's tokens after the context's own `ctx`: the end of the pair's encoding `whole`, as
    lm-eval, where `whole` starts with `ctx`. Where it does not, a token of `whole` spans the seam ("th" +
    "e" is "the"; a Japanese character's bytes), and its end would score other bytes than the continuation's
    (one lost, or none at all): the continuation encoded alone instead, if its tokens spell exactly it (a
    sentencepiece tokenizer's alone start with a space); else [] (the caller refuses the pair)."""
    if whole[: len(ctx)] == ctx:
        return whole[len(ctx) :]
    alone = encode_texts(tokenizer, [continuation], add_special_tokens=False)[0]
    # (space_marks False: a Unigram SentencePiece's "▁X" alone passes for "X", as jobs of reading 11 read it)
    spelled = b"".join(TokenText(tokenizer).bytes(alone, space_marks=False))
    return alone if spelled == continuation.encode() else []


SEAM_IN_A_TOKEN = (
    "the pair's encoding has a token across the seam of context and continuation, and the continuation "
    "alone does not encode to exactly its own text: split the pair where a token ends (at a space or a word)"
)


def no_continuation(tokenizer: Any, continuation: str) -> str:
    """Why a pair has no continuation token to score: it is empty, it encodes to none at all (a normalizer
    deletes its characters), or a token spans the seam (SEAM_IN_A_TOKEN)."""
    if not continuation:
        return "continuation is empty"
    if not encode_texts(tokenizer, [continuation], add_special_tokens=False)[0]:
        return "continuation encodes to no tokens (the tokenizer deletes its characters)"
    return SEAM_IN_A_TOKEN


def fit_context(context: list[int], continuation: list[int], window: int | None) -> list[int]:
    """The context cut from the left so that context + continuation fits `window` fed tokens (+1 predicted
    only), as lm-eval's `(context + continuation)[-(max_length + 1):]`. No continuation token: RunnerError
    (`split_context` found none that spell it)."""
    if not continuation:
        raise RunnerError(SEAM_IN_A_TOKEN)
    if window is None or len(context) + len(continuation) <= window + 1:
        return context
    if len(continuation) > window:
        raise RunnerError(f"continuation is {len(continuation)} tokens, over the context window of {window}")
    return context[len(context) + len(continuation) - window - 1 :]


def score_record(tokenizer: Any, score: TextScore, prefix: Sequence[int] = ()) -> dict[str, Any]:
    """A result row's score fields: logprob (sum), mean_logprob, perplexity (exp(-mean)), num_tokens,
    is_greedy, and per token token_ids, tokens (`token_pieces`; `prefix`: the ids before the first scored
    token, for its leading space) and token_logprobs."""
    return {
        "logprob": score.logprob,
        "mean_logprob": score.mean_logprob,
        "perplexity": score.perplexity,
        "num_tokens": score.num_tokens,
        "is_greedy": score.is_greedy,
        "token_ids": score.token_ids,
        "tokens": token_pieces(tokenizer, score.token_ids, prefix),
        "token_bytes": TokenText(tokenizer).bytes(score.token_ids),
        "token_logprobs": score.token_logprobs,
    }


# --- one batch --------------------------------------------------------------------------------------------


def score_batch(engine: Any, seqs: list[list[int]], score_from: list[int]) -> list[TextScore]:
    """Score tokens score_from[r]..len-1 of each row.

    seqs: token ids per row, any lengths up to the context window + 1 (the last token is never fed);
    score_from[r] in [1, len(seqs[r])]: tokens before it are context only. Rows run in groups of similar
    length (engine.prefill_groups, as generation's prompt pass), so padding costs almost nothing."""
    n_scored = [len(s) - f for s, f in zip(seqs, score_from, strict=True)]
    if any(f < 1 or n < 0 for f, n in zip(score_from, n_scored, strict=True)):
        raise ValueError(
            f"score_from must be in [1, len(seq)], got {score_from} for lengths {[len(s) for s in seqs]}"
        )
    out: list[TextScore] = [TextScore([], [], []) for _ in seqs]
    todo = [r for r, n in enumerate(n_scored) if n > 0]
    bad: list[int] = []
    for group in prefill_groups([len(seqs[r]) - 1 for r in todo], engine.prefill_tokens):
        rows = [todo[i] for i in group]
        try:
            scores = _score_group(engine, [seqs[r] for r in rows], [n_scored[r] for r in rows])
        except NumericalError as e:
            bad.extend(rows[i] for i in e.rows)
            continue
        for r, score in zip(rows, scores, strict=True):
            out[r] = score
    if bad:
        raise NumericalError(sorted(bad))
    return out


def _score_group(engine: Any, seqs: list[list[int]], n_scored: list[int]) -> list[TextScore]:
    """One forward pass over rows of similar length: the model sees seq[:-1] left-padded (input_ids
    [batch, width] int64), so that row ends align and the last n columns predict a row's last n tokens."""
    import torch

    keep = max(n_scored)
    ids, mask = left_pad([s[:-1] for s in seqs], engine.pad_id, engine.device)  # [batch, width]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # position ids skip the padding, or GPT-2 shifts every row
    targets = left_pad([s[-keep:] for s in seqs], engine.pad_id, engine.device)[0]  # [batch, keep]
    scored = (
        torch.arange(keep, device=engine.device)[None, :]
        >= (keep - torch.tensor(n_scored, device=engine.device))[:, None]
    )
    with engine.computing():
        lps, greedy = _scored_logprobs(engine, ids, mask, pos, targets, scored)  # [batch, keep] each
    results, bad = [], []
    for r, n in enumerate(n_scored):
        row_lps = lps[r, keep - n :]
        if not bool(torch.isfinite(row_lps).all()):
            bad.append(r)
        results.append(
            TextScore(seqs[r][len(seqs[r]) - n :], row_lps.tolist(), greedy[r, keep - n :].tolist())
        )
    if bad:
        raise NumericalError(bad)
    return results


def _scored_logprobs(
    engine: Any, ids: Any, mask: Any, pos: Any, targets: Any, scored: Any
) -> tuple[Any, Any]:
    """(log P(target) [batch, keep] float32, target == argmax [batch, keep] bool) for the last `keep` columns,
    computed where `scored` [batch, keep] is True (elsewhere 0 / False). The model runs once for its hidden
    states; its output layer then runs on the scored positions only, a chunk at a time (`_head_in_chunks`),
    so memory is O(chunk x vocab) however long the rows. A model whose logits are more than its output layer
    (softcapping, a logit scale) gets them whole from its own forward instead."""
    keep = targets.shape[1]
    if getattr(engine, "_head_only", None) is not False:  # None: not known yet for this model
        hidden, last = _hidden_states(engine, ids, mask, pos, keep)  # [batch, keep, hidden], [batch, vocab]
        head = engine.model.get_output_embeddings()
        head_only = hidden is not None and _head_is_the_logits(head, hidden, last)
        if head_only is None:  # no row could tell: as known before (not known: the model's own logits, once)
            head_only = getattr(engine, "_head_only", None)
        engine._head_only = head_only
        if head_only:
            return _head_in_chunks(head, hidden, targets, scored)
    kwargs = {"logits_to_keep": keep} if engine._keep_arg else {}
    out = engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
    return gather_logprobs(out.logits[:, -keep:, :], targets)


def _hidden_states(engine: Any, ids: Any, mask: Any, pos: Any, keep: int) -> tuple[Any, Any]:
    """The final hidden states of the last `keep` columns [batch, keep, hidden] (None if the model has no
    output layer to hook) and the model's own logits of the last column [batch, vocab]: one forward pass
    whose output layer is handed only the last column."""
    head = engine.model.get_output_embeddings()
    if head is None:
        return None, None
    seen: dict[str, Any] = {}

    def last_column_only(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen["hidden"] = args[0][:, -keep:, :]
        return (args[0][:, -1:, :], *args[1:])

    handle = head.register_forward_pre_hook(last_column_only)
    try:
        kwargs = {"logits_to_keep": keep} if engine._keep_arg else {}
        out = engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
    finally:
        handle.remove()
    return seen.get("hidden"), out.logits[:, -1, :]


def _head_is_the_logits(head: Any, hidden: Any, last: Any) -> bool | None:
    """Whether the output layer alone gives the model's logits (checked on the last column, bit for bit), on
    the rows without a NaN: a NaN (a float16 overflow) equals nothing, not even itself, and took the model for
    one with a softcap for good (pass 267). None where every row has one. (An inf equals itself: a model whose
    forward masks tokens with -inf is told apart at once.)"""
    import torch

    clean = ~torch.isnan(last).any(-1)  # [batch]
    if not bool(clean.any()):
        return None
    return bool(torch.equal(head(hidden[:, -1:, :])[:, -1, :][clean], last[clean]))


def _head_in_chunks(head: Any, hidden: Any, targets: Any, scored: Any) -> tuple[Any, Any]:
    """hidden [batch, keep, hidden] -> the output layer and `gather_logprobs` on the `scored` positions
    only, FLOAT_CHUNK / vocab of them at a time; results scattered back to [batch, keep]."""
    import torch

    vocab = head.weight.shape[0] if getattr(head, "weight", None) is not None else 1
    scored = scored.to(hidden.device)  # with a device_map, the last layer may sit on another GPU
    h, tgt = hidden[scored], targets.to(hidden.device)[scored]  # [n, hidden], [n]
    step = max(1, FLOAT_CHUNK // max(1, vocab))
    parts = [
        gather_logprobs(head(h[None, a : a + step]), tgt[None, a : a + step])
        for a in range(0, len(tgt), step)
    ]
    lps = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
    greedy = torch.zeros(scored.shape, dtype=torch.bool, device=hidden.device)
    lps[scored] = torch.cat([p[0][0] for p in parts])
    greedy[scored] = torch.cat([p[1][0] for p in parts])
    return lps, greedy


def gather_logprobs(logits: Any, targets: Any) -> tuple[Any, Any]:
    """logits [batch, keep, vocab] (model dtype), targets [batch, keep] int64 -> (log P(target) [batch, keep]
    float32, target == argmax [batch, keep] bool). Converts to float32 a chunk of positions at a time."""
    import torch

    batch, keep, vocab = logits.shape
    if keep == 0:  # (prompts of one token: nothing before it to score)
        return logits.new_zeros((batch, 0), dtype=torch.float32), logits.new_zeros(
            (batch, 0), dtype=torch.bool
        )
    step = max(1, FLOAT_CHUNK // max(1, batch * vocab))
    lps, greedy = [], []
    for a in range(0, keep, step):
        chunk = logits[:, a : a + step, :].float()  # no copy when the model runs in float32
        tgt = targets[:, a : a + step].unsqueeze(-1)
        lps.append(chunk.gather(-1, tgt).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
        greedy.append(chunk.argmax(-1) == tgt.squeeze(-1))
    return torch.cat(lps, 1), torch.cat(greedy, 1)


def rolling_windows(
    ids: list[int], max_len: int, stride: int, first: int = 1, whole_last: bool = True
) -> list[tuple[list[int], int]]:
    """Windows of at most `max_len` tokens advancing by `stride` (HF's perplexity guide), each scoring only
    the tokens no earlier window scored, the rest of it being context: every token from `first` on is scored
    exactly once, with at least max_len - stride tokens of context (stride is kept below max_len). The last
    window ends at the last token and is a whole `max_len` long, as lm-eval's last rolling window is: its
    tokens get as much context as the window leaves, not what a start at a multiple of the stride left them
    (`whole_last` False: it starts there, as jobs submitted before 2026-12-06 score their texts to the end).
    Returns [(window ids, index in the window of its first scored token)]; one window when the ids fit."""
    stride = max(1, min(stride, max_len - 1))
    windows, begin, scored_to = [], 0, first
    while scored_to < len(ids):
        end = min(begin + max_len, len(ids))
        if end > scored_to:
            # begin, but for the last window: further back, a whole window
            start = max(0, end - max_len) if whole_last else begin
            windows.append((ids[start:end], scored_to - start))
            scored_to = end
        begin += stride
    return windows


def score_rows(
    engine: Any,
    seqs: list[list[int]],
    score_from: list[int],
    stride: int | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    whole_last: bool = True,
) -> list[TextScore]:
    """Score a batch of rows (`score_batch`); a row longer than the context window (+1) is scored in rolling
    windows advancing by `stride` tokens (default: half the window; `whole_last`: `rolling_windows`), its
    windows batched by `batch_size` / `max_batch_tokens` (default: as `runner score`), and their scores joined
    in order."""
    batch_size, max_batch_tokens = _sizes(engine, batch_size, max_batch_tokens, "score")
    window = engine.context_window
    long = [i for i, s in enumerate(seqs) if window is not None and len(s) > window + 1]
    fits = sorted(set(range(len(seqs))) - set(long))
    out: list[TextScore | None] = [None] * len(seqs)
    for i, res in zip(
        fits, score_batch(engine, [seqs[i] for i in fits], [score_from[i] for i in fits]), strict=True
    ):
        out[i] = res
    for i in long:
        parts = rolling_windows(seqs[i], window + 1, stride or window // 2, score_from[i], whole_last)
        scored = in_batches(
            lambda w, f: score_batch(engine, w, f),
            [w for w, _ in parts],
            [f for _, f in parts],
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
        )
        out[i] = TextScore.concat(scored)
    return out  # type: ignore[return-value]


def embed_batch(engine: Any, seqs: list[list[int]], pooling: str = "mean") -> list[list[float]]:
    """One float32 vector [hidden] per row from the last hidden state (after the final norm): the mean over
    the row's real tokens, or its last token's. Rows run in groups of similar length, as in `score_batch`."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be mean or last, got {pooling!r}")
    if any(not s for s in seqs):
        raise ValueError("cannot embed an empty token sequence")
    out: list[list[float]] = [[] for _ in seqs]
    bad: list[int] = []
    for group in prefill_groups([len(s) for s in seqs], engine.prefill_tokens):
        vectors, finite = _embed_group(engine, [seqs[r] for r in group], pooling)
        for r, vec, ok in zip(group, vectors, finite, strict=True):
            out[r] = vec
            if not ok:
                bad.append(r)
    if bad:
        raise NumericalError(sorted(bad))
    return out


def _embed_group(engine: Any, seqs: list[list[int]], pooling: str) -> tuple[list[list[float]], list[bool]]:
    """(vectors, finite) of rows of similar length, from one forward pass over them left-padded
    ([batch, width, hidden]; with left padding a row's last token is the last column)."""
    import torch

    ids, mask = left_pad(seqs, engine.pad_id, engine.device)  # [batch, width]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with engine.computing():
        hidden = _last_hidden(engine, ids, mask, pos).float()  # [batch, width, hidden]
        mask = mask.to(hidden.device)  # with a device_map, the last layer may sit on another GPU
        if pooling == "last":
            vectors = hidden[:, -1, :]
        else:  # where, not multiply: padding positions may hold NaN (fully masked attention rows)
            real = mask.bool().unsqueeze(-1)
            vectors = torch.where(real, hidden, 0.0).sum(1) / real.sum(1)
    return vectors.tolist(), torch.isfinite(vectors).all(-1).tolist()


def _last_hidden(engine: Any, ids: Any, mask: Any, pos: Any) -> Any:
    """The last hidden state [batch, width, hidden]: from the base model (no logits, no per-layer states)
    when the causal LM has one, else from output_hidden_states."""
    model = engine.model
    base = getattr(model, "base_model", model)
    if base is not model:
        out = base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    kwargs = {"logits_to_keep": 1} if engine._keep_arg else {}
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=False,
        output_hidden_states=True,
        **kwargs,
    )
    return out.hidden_states[-1]


# --- many rows --------------------------------------------------------------------------------------------


def in_batches(
    fn: Callable[..., list[Any]],
    seqs: list[list[int]],
    *columns: Sequence[Any],
    batch_size: int,
    max_batch_tokens: int,
) -> list[Any]:
    """fn(batch seqs, *batch columns) -> one result per row, run over length-sorted batches planned as for
    generation with no new tokens (`plan_batches`); returns the results in the order of `seqs`."""
    out: list[Any] = [None] * len(seqs)
    for batch in plan_batches([len(s) for s in seqs], batch_size, max_batch_tokens, 0):
        results = fn([seqs[i] for i in batch], *([col[i] for i in batch] for col in columns))
        for i, res in zip(batch, results, strict=True):
            out[i] = res
    return out


def _sizes(engine: Any, batch_size: int | None, max_batch_tokens: int | None, kind: str) -> tuple[int, int]:
    """The batch size and token budget a job of `kind` would use on this engine, unless given."""
    return default_batch_size(engine, batch_size), max_batch_tokens or default_batch_tokens(engine, kind)


def score_texts(
    engine: Any,
    texts: list[str],
    add_bos: bool = True,
    add_eos: bool = False,
    stride: int | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[TextScore]:
    """Log-probs of whole texts (gpt2-score), rolling over texts longer than the context window. Batches:
    `batch_size` / `max_batch_tokens`, by default what `runner score` uses on the engine's device."""
    batch_size, max_batch_tokens = _sizes(engine, batch_size, max_batch_tokens, "score")
    seqs = [tokenize_text(engine.tokenizer, t, add_bos, add_eos) for t in texts]
    for i, s in enumerate(seqs):
        if len(s) < 2:  # (the first token is context only)
            raise RunnerError(f"texts[{i}] has no token to score (it needs a context token before it)")
    return in_batches(
        lambda b, f: score_rows(engine, b, f, stride, batch_size, max_batch_tokens),
        seqs,
        [1] * len(seqs),
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )


def score_continuations(
    engine: Any,
    pairs: list[tuple[str, str]],
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[TextScore]:
    """log P(continuation | context) and is_greedy per (context, continuation) pair, as lm-eval's
    `loglikelihood`: `split_context`, then the context cut from the left to fit the window."""
    batch_size, max_batch_tokens = _sizes(engine, batch_size, max_batch_tokens, "score")
    seqs, froms = [], []
    for i, (ctx, cont) in enumerate(split_contexts(engine.tokenizer, pairs)):
        try:
            ctx = fit_context(ctx, cont, engine.context_window)
        except RunnerError as e:
            raise RunnerError(
                f"pairs[{i}]: {e if cont else no_continuation(engine.tokenizer, pairs[i][1])}"
            ) from None
        seqs.append(ctx + cont)
        froms.append(len(ctx))
    return in_batches(
        lambda b, f: score_batch(engine, b, f),
        seqs,
        froms,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )


def embed_texts(
    engine: Any,
    texts: list[str],
    pooling: str = "mean",
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> list[list[float]]:
    """One vector per text, each encoded as a plain prompt (with the BOS the tokenizer adds, if any)."""
    batch_size, max_batch_tokens = _sizes(engine, batch_size, max_batch_tokens, "embed")
    seqs = [encode(engine.tokenizer, t, chat=False) for t in texts]
    for i, s in enumerate(seqs):
        if not s:
            raise RunnerError(f"texts[{i}] encodes to no tokens: nothing to embed")
    return in_batches(
        lambda b: embed_batch(engine, b, pooling),
        seqs,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
    )
