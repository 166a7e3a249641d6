"""Beam search and no_repeat_ngram_size, which our decode loop does not host, through transformers' own generate.

tasks.generate_keys -> `generate_with_transformers(engine, prompt, params, seed)` -> engine.Completion(s)

One prompt at a time, so a row's result never depends on its batch: a beam row gives its num_return_sequences
best beams, a sampled row (no_repeat_ngram_size) one sample drawn from its own seed. What our loop promises holds
here too: `token_logprobs` are the raw model log-probs of the chosen tokens (one teacher-forced forward pass);
stop strings are looked for in the generated text only, and not before min_new_tokens (cut after generation,
not by transformers' StopStringCriteria, which also reads the prompt); a cancel or a progress tick comes
between steps (a StoppingCriteria asked after each); and only our settings apply, never fields of the model's
generation_config.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from .engine import Completion, Stopped
from .params import GenerationParams


def generate_with_transformers(
    engine: Any, prompt: list[int], params: GenerationParams, seed: int | None,
    stop: Callable[[], bool] | None = None, stepped: Callable[[int], None] | None = None,
) -> list[Completion]:  # fmt: skip
    """`prompt`: token ids; `seed`: the sample's seed (sampling only). `stop()` is asked after each step and
    abandons the row (engine.Stopped); `stepped(tokens)` hears of each step. Returns the completions, best
    beam first, with `beam_score` (transformers' length-penalised score) for beams."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.tensor([prompt], device=engine.device)
    config = _config(engine, params)
    watch = _watch(stop, stepped, config.num_return_sequences)
    with engine.computing(), _only(engine.model, config), _seeded(engine.device, seed):
        out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                    stopping_criteria=StoppingCriteriaList([watch]))  # fmt: skip
    if watch.cancelled:
        raise Stopped("stopped between decode steps")
    seqs = out.sequences[:, len(prompt) :].tolist()
    scores = out.sequences_scores.tolist() if params.num_beams > 1 else [None] * len(seqs)
    return [_completion(engine, prompt, new, params, score) for new, score in zip(seqs, scores, strict=True)]


def _config(engine: Any, params: GenerationParams) -> Any:
    from transformers import GenerationConfig

    beams = params.num_beams > 1
    sample = params.sampled
    return GenerationConfig(
        max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens, do_sample=sample,
        temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
        top_k=params.top_k if sample else None, min_p=params.min_p if sample and params.min_p else None,
        repetition_penalty=params.repetition_penalty,
        num_beams=params.num_beams, num_return_sequences=params.num_return_sequences if beams else 1,
        **({"length_penalty": params.length_penalty, "early_stopping": params.early_stopping} if beams else {}),
        no_repeat_ngram_size=params.no_repeat_ngram_size or None, eos_token_id=engine.eos_ids,
        pad_token_id=engine.pad_id, return_dict_in_generate=True, output_scores=beams,
    )  # fmt: skip


@contextlib.contextmanager
def _only(model: Any, config: Any) -> Iterator[None]:
    """transformers fills the fields a GenerationConfig leaves unset from the model's own generation_config
    (a no_repeat_ngram_size or bad_words_ids in its generation_config.json): make ours the model's meanwhile."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _seeded(device: Any, seed: int | None) -> Iterator[None]:
    """torch's global generator seeded with the sample's own seed, and put back as it was afterwards."""
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed if seed is not None else 0)
        yield


def _watch(stop: Callable[[], bool] | None, stepped: Callable[[int], None] | None, per_step: int) -> Any:
    """A StoppingCriteria asked after each step: progress, and the end of generation on a cancel."""
    import torch
    from transformers import StoppingCriteria

    class Watch(StoppingCriteria):
        cancelled = False

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            if stepped is not None:
                stepped(per_step)
            self.cancelled = self.cancelled or bool(stop is not None and stop())
            return torch.full(
                (input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device
            )

    return Watch()


def _completion(engine: Any, prompt: list[int], new: list[int], params: GenerationParams,
                score: float | None) -> Completion:  # fmt: skip
    """One sequence as our Completion: cut after its EOS or its first stop string (what follows is padding or
    was never to be generated), text without the stop string, raw log-probs of its tokens."""
    prefix = engine._text_prefix(prompt)
    eos_at = next((i for i, t in enumerate(new) if t in engine.eos_ids), None)
    reason, stop = ("length", None) if eos_at is None else ("stop", None)
    new = new if eos_at is None else new[: eos_at + 1]
    text = engine._detok(prefix, new)
    # As our loop: a stop string counts from the text of the min_new_tokens-th token on.
    floor = engine._text_length(prefix, new[: params.min_new_tokens - 1]) if params.min_new_tokens > 1 else 0
    found = [(i, x) for i, x in ((text.find(x, floor), x) for x in params.stop) if i >= 0]
    if found:
        at, stop = min(found)
        # the tokens up to the one whose text completes the stop string, as our loop stops there
        ends = (k for k in range(1, len(new) + 1) if engine._detok(prefix, new[:k]).find(stop, floor) == at)
        new = new[: next(ends, len(new))]
        reason, text = "stop", text[:at]
    elif reason == "length" and text.endswith("\ufffd"):
        text = engine._hold_back(prefix, new, text)
    return Completion(new, _raw_logprobs(engine, prompt, new), text, reason, stop, beam_score=score)


def _raw_logprobs(engine: Any, prompt: list[int], new: list[int]) -> list[float]:
    """log P(each generated token) under the unprocessed logits, as our loop reports them: scoring.py's."""
    from .scoring import score_batch

    return score_batch(engine, [prompt + new], [len(prompt)])[0].token_logprobs if new else []
