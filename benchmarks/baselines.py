"""The transformers baselines every runner row is compared with, run on the model exactly as transformers
loaded it (the caller wraps them in runner_paths.plain_transformers):

* `run_naive`: `model.generate` one prompt at a time (no padding);
* `run_pipeline`: `transformers.pipeline("text-generation", batch_size=N)`.
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
