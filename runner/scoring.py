"""Scoring and embedding: log-probs of given texts, continuations given a context, and text vectors.

job rows (jobs.py: token ids + the index of the first token to score) -> `score_rows` / `embed_batch`
-> `TextScore`s / vectors -> results.score_table / embed_table

One forward pass per batch, left-padded with position ids that skip the padding (as in generation), so a row
scores the same whatever batch it is in. Only the logits of positions that are scored are computed
(`logits_to_keep`), and log-probs are gathered as logit - logsumexp without a full log_softmax copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .batching import left_pad
from .engine import NumericalError


@dataclass
class TextScore:
    """Scored tokens of one row: `token_logprobs[i]` = log P(token_ids[i] | everything before it)."""

    token_ids: list[int]
    token_logprobs: list[float]
    is_greedy: bool  # every scored token is the model's argmax: greedy decoding would produce exactly these

    @property
    def logprob(self) -> float:
        return math.fsum(self.token_logprobs)


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token a text is scored after: BOS, or EOS for models without one (GPT-2's <|endoftext|>), as
    lm-evaluation-harness does."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tokenize_text(tokenizer: Any, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Token ids to score: [BOS] + text (+ [EOS]). The BOS is context only (scoring starts at index 1), so
    the first word gets a score; a tokenizer that adds BOS itself (Llama) does not get a second one."""
    ids = list(tokenizer(text, add_special_tokens=add_bos)["input_ids"])
    bos = prefix_token_id(tokenizer)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def split_context(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) with lm-evaluation-harness's rule: trailing whitespace of the context
    moves to the start of the continuation, the pair is encoded together, and the continuation is whatever
    follows the context's own encoding. An empty context becomes the BOS (EOS) token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    if not context:
        return [prefix_token_id(tokenizer)], list(
            tokenizer(continuation, add_special_tokens=False)["input_ids"]
        )
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    return ctx, whole[len(ctx) :]


def score_batch(engine: Any, seqs: list[list[int]], score_from: list[int]) -> list[TextScore]:
    """Score tokens score_from[r].. of each sequence in one forward pass.

    seqs: token ids per row (any lengths, each within the context window); score_from[r] >= 1.
    Left padding aligns every row's end at the last column, so the scored positions are the last
    max(len - score_from) columns: only their logits are computed.
    """
    import torch

    ids, mask = left_pad(seqs, engine.pad_id, engine.device)  # [batch, width]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n_scored = [len(s) - f for s, f in zip(seqs, score_from, strict=True)]
    keep = max(n_scored) + 1  # logits at column c predict the token at c + 1
    kwargs = {"logits_to_keep": keep} if engine._keep_arg else {}
    with torch.inference_mode():
        out = engine.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
        logits = out.logits[:, -keep:-1, :].float()  # [batch, keep - 1, vocab]
        targets = ids[:, ids.shape[1] - keep + 1 :]  # [batch, keep - 1]
        lps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        greedy = logits.argmax(-1) == targets
    results = []
    bad = []
    for r, n in enumerate(n_scored):
        row_lps = lps[r, lps.shape[1] - n :]
        if not bool(torch.isfinite(row_lps).all()):
            bad.append(r)
        results.append(
            TextScore(
                seqs[r][len(seqs[r]) - n :], row_lps.tolist(), bool(greedy[r, greedy.shape[1] - n :].all())
            )
        )
    if bad:
        raise NumericalError(bad)
    return results


def rolling_windows(ids: list[int], max_len: int, stride: int, first: int = 1) -> list[tuple[list[int], int]]:
    """Windows of at most `max_len` tokens advancing by `stride` (HF's perplexity recipe), each scoring only
    the tokens no earlier window scored: every token from `first` on is scored exactly once, with up to
    max_len - 1 tokens of context. Returns (window ids, index of the first token to score in it)."""
    stride = max(1, min(stride, max_len - 1))
    windows, begin, scored_to = [], 0, first
    while scored_to < len(ids):
        end = min(begin + max_len, len(ids))
        if end > scored_to:
            windows.append((ids[begin:end], scored_to - begin))
            scored_to = end
        begin += stride
    return windows


def score_rows(
    engine: Any, seqs: list[list[int]], score_from: list[int], stride: int | None = None
) -> list[TextScore]:
    """Score a batch of rows; rows longer than the context window are scored in strided windows."""
    window = engine.context_window
    fits = [i for i, s in enumerate(seqs) if window is None or len(s) <= window]
    out: list[TextScore | None] = [None] * len(seqs)
    if fits:
        for i, res in zip(
            fits, score_batch(engine, [seqs[i] for i in fits], [score_from[i] for i in fits]), strict=True
        ):
            out[i] = res
    for i in (i for i in range(len(seqs)) if out[i] is None):
        assert window is not None
        parts = rolling_windows(seqs[i], window, stride or window // 2, score_from[i])
        scored = score_batch(engine, [w for w, _ in parts], [f for _, f in parts])
        out[i] = TextScore(
            [t for s in scored for t in s.token_ids],
            [lp for s in scored for lp in s.token_logprobs],
            all(s.is_greedy for s in scored),
        )
    return out  # type: ignore[return-value]


def embed_batch(engine: Any, seqs: list[list[int]], pooling: str = "mean") -> list[list[float]]:
    """One vector per sequence from the last hidden state [batch, seq, hidden]: the mean over real tokens,
    or the last token's (with left padding, the last column of every row)."""
    import torch

    ids, mask = left_pad(seqs, engine.pad_id, engine.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if engine._keep_arg else {}
    with torch.inference_mode():
        out = engine.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=False,
            output_hidden_states=True,
            **kwargs,
        )
        hidden = out.hidden_states[-1].float()  # [batch, seq, hidden]
        if pooling == "last":
            vectors = hidden[:, -1, :]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * m).sum(1) / m.sum(1)
    if not bool(torch.isfinite(vectors).all()):
        raise NumericalError([r for r in range(len(seqs)) if not bool(torch.isfinite(vectors[r]).all())])
    return vectors.tolist()
