"""The transformers baselines every runner row is compared with, run on the model exactly as transformers
loaded it (the caller wraps them in runner_paths.plain_transformers):

* `run_naive` / `run_naive_sampled`: `model.generate` one prompt at a time (no padding);
* `run_pipeline` / `run_pipeline_sampled`: `transformers.pipeline("text-generation", batch_size=N)`;
* `score_plain`: what a plain script does to score texts: a forward pass over the padded batch, log_softmax over
  the whole vocabulary, gather.
"""

from __future__ import annotations

import time

from measure import sync


def run_naive(model, ids, n_new, eos_ids, pad_id, device) -> tuple[list[list[int]], float]:
    import torch

    outs = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in ids:
            x = torch.tensor([p], device=device)
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=pad_id,
            )
            outs.append(y[0, x.shape[1] :].tolist())
    sync(device)
    return outs, time.perf_counter() - t0


def make_pipeline(model, model_dir, pad_id, batch_size):
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token_id = pad_id
    return pipeline("text-generation", model=model, tokenizer=tok, batch_size=batch_size)


def run_pipeline(
    pipe, texts, n_new, eos_ids, pad_id, device
) -> tuple[list[list[int]], list[list[int]], float]:
    """Returns (generated ids, prompt ids as the pipeline tokenized them, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    res = pipe(
        texts,
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        return_tensors=True,
        add_special_tokens=True,  # as runner's batching.encode does for plain prompts
    )
    sync(device)
    seconds = time.perf_counter() - t0
    gens, prompts = [], []
    for r in res:
        seq = list(r[0]["generated_token_ids"])
        gens.append(seq[-n_new:])
        prompts.append(seq[:-n_new])
    return gens, prompts, seconds


def run_naive_sampled(
    model, ids, lengths, seeds, sampling, eos_ids, pad_id, device
) -> tuple[list[int], float]:
    """model.generate one prompt at a time, sampling with SAMPLING (generate's keyword arguments), each row
    with its own max_new_tokens and torch seed, stopping at EOS: (new tokens per row, seconds)."""
    import torch

    counts = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p, n, seed in zip(ids, lengths, seeds, strict=True):
            torch.manual_seed(seed)
            x = torch.tensor([p], device=device)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                               eos_token_id=eos_ids, pad_token_id=pad_id, **sampling)  # fmt: skip
            counts.append(y.shape[1] - x.shape[1])  # batch 1: nothing after the EOS
    sync(device)
    return counts, time.perf_counter() - t0


def run_pipeline_sampled(pipe, batch_size, texts, ids, lengths, seeds, sampling, eos_ids, pad_id, device):
    """The pipeline in batches of BATCH_SIZE over the rows grouped by max_new_tokens (one call per value, as a
    script would; file order within a group), sampling with SAMPLING, each call seeded by its first row's seed, stopping at EOS.
    Returns (new tokens per row, seconds, number of batches)."""
    import torch

    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    sequences: dict[int, list[int]] = {}
    sync(device)
    t0 = time.perf_counter()
    for n, rows in sorted(groups.items()):
        torch.manual_seed(seeds[rows[0]])
        res = pipe([texts[i] for i in rows], batch_size=batch_size, max_new_tokens=n, eos_token_id=eos_ids,
                   pad_token_id=pad_id, return_tensors=True, add_special_tokens=True, **sampling)  # fmt: skip
        sequences.update((i, list(r[0]["generated_token_ids"])) for i, r in zip(rows, res, strict=True))
    sync(device)
    seconds = time.perf_counter() - t0
    counts = [new_tokens(sequences[i], ids[i], pad_id, eos_ids) for i in range(len(texts))]
    batches = sum(-(-len(rows) // batch_size) for rows in groups.values())
    return counts, seconds, batches


def new_tokens(sequence: list[int], prompt: list[int], pad_id: int, eos_ids: list[int]) -> int:
    """How many tokens a pipeline row generated: SEQUENCE is [left padding, PROMPT, new tokens, padding]; the
    new ones run up to and including the first EOS (the batch pads finished rows after it)."""
    n = len(prompt)
    starts = (k for k in range(n, len(sequence) + 1)
              if sequence[k - n : k] == prompt and all(t == pad_id for t in sequence[: k - n]))  # fmt: skip
    start = next(starts, None)
    if start is None:
        raise RuntimeError("the pipeline tokenized a prompt differently from runner")
    new = sequence[start:]
    ends = [j for j, t in enumerate(new) if t in eos_ids]
    return ends[0] + 1 if ends else len(new)


def score_plain(model, seqs: list[list[int]], batch_size: int, pad_id: int, device):
    """Score every token of SEQS after the first as a plain transformers script does: batches of BATCH_SIZE in
    file order, right-padded (positions need no care), one forward pass, log_softmax over the whole vocabulary
    at every position [batch, width, vocab], gather the next tokens. Returns (log-probs per row, seconds)."""
    import torch

    out: list[list[float]] = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(seqs), batch_size):
            batch = seqs[a : a + batch_size]
            x = torch.full((len(batch), max(map(len, batch))), pad_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, s in enumerate(batch):
                x[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
            x, mask = x.to(device), mask.to(device)
            logits = model(input_ids=x, attention_mask=mask).logits  # [batch, width, vocab]
            lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
            out += [lp[r, : len(s) - 1].tolist() for r, s in enumerate(batch)]
    sync(device)
    return out, time.perf_counter() - t0
