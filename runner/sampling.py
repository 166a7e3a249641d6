"""Per-row logits processing and sampling for one decode batch, as tensors.

engine.py's decode loop -> `RowSettings.of(params per row)` -> each step: `process(logits, ...)` -> `pick(...)`

Every row of a batch may carry its own settings (an OpenAI Batch file mixes temperatures, top-p, penalties
and greedy rows), so each processor takes a [batch, 1] tensor of its parameter instead of one number. Each is
written to compute exactly what transformers' processor of the same name computes for that row alone, and a
row whose setting is "off" (temperature 1, top-k 0, top-p 1, min-p 0, penalty 1 or 0) is left bit for bit
unchanged, so a row's tokens never depend on the other rows of its batch. The order is transformers' (repetition
penalty, then temperature, top-k, top-p, min-p: generation/utils.py's _get_logits_processor), with the OpenAI
presence/frequency penalties next to the repetition penalty, as vLLM applies them: on the tokens generated so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# A top_k beyond any vocabulary: keeps every token, as a larger one does
ALL_TOKENS = 2**62
TENSORS = ("sample", "temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency")


@dataclass
class RowSettings:
    """The sampling settings of the rows in the decode batch, in slot order: [batch] or [batch, 1] tensors, and
    the same values on the host (`host`), from which each step decides which processors run: asking the
    tensors would wait for the GPU several times a step."""

    sample: Any  # [batch] bool: sampled (else greedy)
    temperature: Any  # [batch, 1] float: 1 where off or greedy
    top_k: Any  # [batch] long: 0 where off or greedy
    top_p: Any  # [batch, 1] float64: 1 where off or greedy
    min_p: Any  # [batch, 1] float: 0 where off or greedy
    repetition: Any  # [batch, 1] float: 1 where off
    presence: Any  # [batch, 1] float: 0 where off
    frequency: Any  # [batch, 1] float: 0 where off
    host: list[tuple[Any, ...]]  # per slot, the values above in that order, as Python numbers

    @classmethod
    def of(cls, params: list[Any], device: Any) -> RowSettings:
        import torch

        # (a top_k past int64, which keeps every token as any past the vocabulary does, failed the tensor below,
        # "Overflow when unpacking long long", at every run of its job: adversarial pass 261)
        host = [
            (True, p.temperature, min(p.top_k, ALL_TOKENS), p.top_p, p.min_p)
            if p.sampled
            else (False, 1.0, 0, 1.0, 0.0)
            for p in params
        ]
        host = [
            (*h, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
            for h, p in zip(host, params, strict=True)
        ]
        cols = list(zip(*host, strict=True))

        def col(values: tuple[float, ...], dtype: Any = torch.float32) -> Any:
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(-1)

        return cls(
            sample=torch.tensor(cols[0], device=device),
            temperature=col(cols[1]),
            top_k=torch.tensor(cols[2], device=device),
            # float64, as transformers' 1 - top_p is a Python float before it meets the float32 sums
            top_p=col(cols[3], torch.float64),
            # float32, as transformers' min_p (a Python float) is when it scales the float32 top probability
            min_p=col(cols[4]),
            repetition=col(cols[5]),
            presence=col(cols[6]),
            frequency=col(cols[7]),
            host=host,
        )

    def select(self, idx: Any, slots: list[int]) -> RowSettings:
        """The settings of the slots that stay in the batch (`slots`, and `idx`: the same as a tensor)."""
        return RowSettings(**{f: getattr(self, f)[idx] for f in TENSORS}, host=[self.host[i] for i in slots])

    @classmethod
    def cat(cls, parts: list[RowSettings]) -> RowSettings:
        """The settings of the slots of `parts`, one after the other (rows joining a running batch)."""
        import torch

        host = [h for p in parts for h in p.host]
        return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in TENSORS}, host=host)

    def any(self, field: str, off: Any) -> bool:
        """Whether some slot's `field` is not `off`."""
        i = TENSORS.index(field)
        return any(h[i] != off for h in self.host)

    @property
    def needs_history(self) -> bool:
        return self.any("repetition", 1.0)

    @property
    def needs_counts(self) -> bool:
        return self.any("presence", 0) or self.any("frequency", 0)


def process(logits: Any, history: Any, counts: Any, s: RowSettings) -> Any:
    """Scores to choose the next token from. `logits`: [batch, vocab] float32 (left unchanged); `history`:
    [batch, seq] token ids seen (prompt and generation) or None; `counts`: [batch, vocab] how often each token
    was generated, or None."""
    import torch

    scores = logits
    if history is not None and s.needs_history:
        # transformers' RepetitionPenaltyLogitsProcessor, with the penalty per row
        seen = torch.gather(scores, 1, history)
        seen = torch.where(seen < 0, seen * s.repetition, seen / s.repetition)
        scores = scores.scatter(1, history, seen)
    if counts is not None and s.needs_counts:
        # OpenAI / vLLM: logit -= frequency x count + presence x (count > 0), over generated tokens
        scores = scores - s.frequency * counts - s.presence * (counts > 0).to(scores.dtype)
    if not s.any("sample", False):
        return scores
    if s.any("temperature", 1.0):
        scores = scores / s.temperature
    if s.any("top_k", 0):
        scores = _top_k(scores, s.top_k, max(h[2] for h in s.host))
    if s.any("top_p", 1.0):
        scores = _top_p(scores, s.top_p)
    if s.any("min_p", 0.0):
        scores = _min_p(scores, s.min_p)
    return scores


def _top_k(scores: Any, k: Any, largest: int) -> Any:
    """transformers' TopKLogitsWarper per row (k = 0: off; `largest`: the largest k)."""
    import torch

    kmax = min(largest, scores.shape[-1])
    kth = torch.topk(scores, kmax, dim=-1).values.gather(1, (k.clamp(min=1, max=kmax) - 1).unsqueeze(-1))
    remove = (scores < kth) & (k > 0).unsqueeze(-1)
    return scores.masked_fill(remove, -math.inf)


def _min_p(scores: Any, min_p: Any) -> Any:
    """transformers' MinPLogitsWarper per row (`min_p`: [batch, 1] float32, 0: off): drop the tokens whose
    probability is under min_p x the most likely token's. The most likely one is never dropped, as its
    min_tokens_to_keep of 1 asks (min_p <= 1: its threshold is at most that token's own probability), so no
    second pass finds it. A row at 0 removes nothing."""
    import torch

    probs = torch.softmax(scores, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(remove, -math.inf)


# Top-p from the most likely tokens: sorting the whole vocabulary for every row at every step cost more than the
# decode step itself (a 49k vocabulary, 64 rows: 126 ms of sort against ~230 ms of model on 2 CPU cores). The
# kept set is decided from the most likely tokens (TOP_P_CANDIDATES, then more) wherever that is unambiguous:
# the cut falls inside the candidates, clear of it on both sides by more than transformers' own float32 softmax
# can be off there (at least TOP_P_MARGIN), and not between two equal scores. Any other row takes
# transformers' full sort, so the kept set is the one TopPLogitsWarper keeps.
TOP_P_CANDIDATES = (256, 4096)
TOP_P_MARGIN = 1e-5


def _top_p(scores: Any, p: Any) -> Any:
    """transformers' TopPLogitsWarper per row (p = 1: off): drop the least likely tokens whose cumulative
    probability stays within 1 - p, always keeping the most likely one. A row decided from its candidates
    keeps exactly the tokens scoring at least its last kept candidate (no tie across the cut), so the whole
    batch is cut by one comparison with a threshold per row; the other rows take the full sort."""
    import torch

    threshold = torch.full_like(p, -math.inf, dtype=scores.dtype)  # [batch, 1]: -inf keeps everything
    rows = (p < 1.0).squeeze(-1).nonzero().squeeze(-1)  # rows still to decide from more candidates
    full = [
        rows[:0]
    ]  # rows left to the full sort: a cut too close to call does not move with more candidates
    for k in TOP_P_CANDIDATES:
        if rows.numel() == 0 or k >= scores.shape[-1]:
            break
        every = rows.numel() == scores.shape[0]  # all rows: no copy of the scores
        cut, clear, deeper = _top_p_candidates(scores if every else scores[rows], p if every else p[rows], k)
        threshold[rows[clear]] = cut[clear]
        full.append(rows[~clear & ~deeper])
        rows = rows[deeper]
    rows = torch.cat([*full, rows])
    out = scores.masked_fill(scores < threshold, -math.inf)
    if rows.numel():
        sub = scores[rows]
        out[rows] = sub.masked_fill(_top_p_sorted(sub, p[rows]), -math.inf)
    return out


def _top_p_candidates(scores: Any, p: Any, k: int) -> tuple[Any, Any, Any]:
    """Top-p decided from the k most likely tokens: the score of the last token kept ([rows, 1]; top-p keeps
    the tokens scoring at least that), whether that decision is unambiguous ([rows] bool), and whether the
    cut lies past the k candidates ([rows] bool: more might decide it). A candidate is kept while the mass of
    the candidates more likely than it is under p (transformers: removed where the ascending cumulative sum
    is <= 1 - p)."""
    vals, _ = scores.topk(k, dim=-1)
    # exp(score - largest) / their sum: torch's CPU softmax is ~1.5e-5 off as a whole (harmless to transformers,
    # which sums the tail, not to the mass above ~p summed here), and exp(score - log-sum-exp) in float32 loses
    # digits at |score| > 256
    top = vals[:, :1]
    probs = (vals - top).exp() / (scores - top).exp_().sum(-1, keepdim=True)
    above = probs.cumsum(-1) - probs
    kept = (above < p).sum(-1, keepdim=True).clamp(min=1)  # 0 only for a NaN or all -inf row: stays unclear
    last, first_out = kept - 1, kept.clamp(max=k - 1)  # the last candidate kept, the first one removed
    above_last, deeper = above.gather(1, last), kept == k
    # transformers' own float32 softmax is off by up to ~vocab x 2^-27 of the mass it sums up to the cut
    margin = ((1 - above_last) * scores.shape[-1] * 2.0**-27).clamp(min=TOP_P_MARGIN)
    clear = ~deeper & (above_last < p - margin) & (above.gather(1, first_out) > p + margin)
    cut = vals.gather(1, last)
    clear &= cut > vals.gather(1, first_out)  # no tie across the cut
    return cut, clear.squeeze(-1), deeper.squeeze(-1)


def _top_p_sorted(scores: Any, p: Any) -> Any:
    """transformers' TopPLogitsWarper's own computation: the tokens it removes ([rows, vocab] bool)."""
    sorted_logits, sorted_idx = scores.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cumulative <= (1 - p).to(cumulative.dtype)) & (p < 1.0)
    remove_sorted[..., -1:] = False
    return remove_sorted.scatter(1, sorted_idx, remove_sorted)


def pick(scores: Any, s: RowSettings, uniforms: Any) -> Any:
    """The next token of each row: [batch] long. Sampled rows invert their CDF at their own uniform draw
    (`uniforms`: [batch], from each sample's own generator); greedy rows take the argmax."""
    import torch

    if not s.any("sample", False):
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1)
    cdf = probs.cumsum(-1)
    u, total = uniforms.to(cdf.dtype), cdf[:, -1:]
    # below the total: a draw of 1 - 2^-25 or more rounds to 1.0 in float32, and `right=True` would then find no
    # token (the clamp took the vocabulary's last, which the processors may have removed: top-k, a grammar...)
    target = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    sampled = sampled.clamp(max=scores.shape[-1] - 1)  # (a row with nothing left to choose)
    if all(h[0] for h in s.host):  # no greedy row: no argmax over the vocabulary
        return sampled
    return torch.where(s.sample, sampled, scores.argmax(-1))
