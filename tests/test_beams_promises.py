"""Rows through transformers' generate (beams, no_repeat_ngram_size) keep our loop's promises: min_new_tokens holds
stop strings back, stop strings are looked for in the generated text only, only our settings apply, a cancel
and progress come between steps."""

import pytest

from runner import GenerationParams


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"no_repeat_ngram_size": 50}], ids=["beams", "ngram"])
def test_min_new_tokens_suppresses_stop_strings_through_transformers_too(gpt2_engine, settings):
    """README: `--min-new-tokens`: "EOS and stop strings are suppressed until this many tokens"; our loop
    does so. transformers' StopStringCriteria ignores min_new_tokens, so a beam / no_repeat_ngram_size row
    ends at a stop string after 2 tokens with min_new_tokens=5 (the tiny GPT-2's greedy start from "The old
    man" is 448 334, which reads as "…強しました" + "は…")."""
    tok = gpt2_engine.tokenizer
    prompt = tok("The old man")["input_ids"]
    loop_params = GenerationParams(max_new_tokens=8, stop=["は"])
    (first,) = gpt2_engine.generate([prompt], [loop_params], [0])
    assert first.stop_reason == "は" and len(first.token_ids) < 5  # the stop string comes early
    params = GenerationParams(max_new_tokens=8, min_new_tokens=5, stop=["は"], **settings)
    (loop,) = gpt2_engine.generate(
        [prompt], [GenerationParams(max_new_tokens=8, min_new_tokens=5, stop=["は"])], [0]
    )
    assert len(loop.token_ids) >= 5  # our loop holds the stop string back
    for c in gpt2_engine.transformers_generate(prompt, params, 0):
        assert len(c.token_ids) >= 5, (c.token_ids, c.text, c.finish_reason)


def test_min_new_tokens_text_keeps_the_tokens_generated_while_stop_strings_were_suppressed(gpt2_engine):
    """Our loop suppresses the stop string until min_new_tokens (5 tokens are generated and reported), but
    then cuts `text` at the *first* "は", which lay inside the suppressed tokens: text reads as 2 tokens
    while token_ids / completion_tokens say 5 (vLLM looks for a stop string only in the text added after
    min_tokens)."""
    tok = gpt2_engine.tokenizer
    prompt = tok("The old man")["input_ids"]
    params = GenerationParams(max_new_tokens=8, min_new_tokens=5, stop=["は"])
    (c,) = gpt2_engine.generate([prompt], [params], [0])
    assert len(c.token_ids) >= 5
    before_min = tok.decode(c.token_ids[:4]).rstrip("\ufffd")
    assert c.text.startswith(before_min), (c.text, before_min, c.token_ids)


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"no_repeat_ngram_size": 50}], ids=["beams", "ngram"])
def test_a_stop_string_spanning_the_prompt_end_does_not_cut_a_transformers_row(gpt2_engine, settings):
    """transformers' StopStringCriteria looks at prompt + generation, so a stop string made of the prompt's
    last character and the first generated one ("x" + "Q" after "The quick brown fox") ends the row after
    one token; `_hf_completion` finds no stop string in the generated text and reports finish_reason
    "length" with 1 of max_new_tokens=6 tokens. Our loop looks in the generated text only and goes on."""
    tok = gpt2_engine.tokenizer
    prompt = tok("The quick brown fox")["input_ids"]
    (free,) = gpt2_engine.generate([prompt], [GenerationParams(max_new_tokens=6)], [0])
    stop = "x" + free.text[0]
    assert stop not in free.text  # the generated text alone never contains it
    (loop,) = gpt2_engine.generate([prompt], [GenerationParams(max_new_tokens=6, stop=[stop])], [0])
    assert len(loop.token_ids) == 6 and loop.finish_reason == "length"
    params = GenerationParams(max_new_tokens=6, stop=[stop], **settings)
    c = gpt2_engine.transformers_generate(prompt, params, 0)[0]
    assert not (c.finish_reason == "length" and len(c.token_ids) < 6), (c.token_ids, c.text, c.finish_reason)
    assert len(c.token_ids) == 6, (c.token_ids, c.text, c.finish_reason)


def test_the_model_generation_config_does_not_leak_into_beam_rows(tmp_path, tiny_gpt2, gpt2_engine):
    """`_hf_config` leaves unset what our settings turn off (no_repeat_ngram_size=0 -> None, and every field
    it never names), and transformers 5 fills None fields from the model's generation_config.json. A model
    whose generation_config.json says no_repeat_ngram_size=1 then gets it on beam rows (not on our loop's
    rows), while the job records no_repeat_ngram_size=0."""
    import json
    import shutil

    from runner.engine import Engine

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    gc_path = model / "generation_config.json"
    gc = json.loads(gc_path.read_text()) if gc_path.exists() else {}
    gc_path.write_text(json.dumps({**gc, "no_repeat_ngram_size": 1}))
    other = Engine(str(model))
    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    params = GenerationParams(max_new_tokens=6, num_beams=2)
    assert params.no_repeat_ngram_size == 0
    want = gpt2_engine.transformers_generate(prompt, params, None)[0].token_ids
    got = other.transformers_generate(prompt, params, None)[0].token_ids
    assert got == want, (got, want)


@pytest.mark.parametrize(
    "settings", [{}, {"num_beams": 2}, {"no_repeat_ngram_size": 2}], ids=["loop", "beams", "ngram"]
)
def test_a_cancel_during_a_row_stops_it_within_a_step(gpt2_engine, settings):
    """Engine.generate: `stop()` is "asked between decode steps ... a cancelled job stops within a step, not a
    whole batch" (README: "a running worker stops within seconds"). A beam / no_repeat_ngram_size row is one
    call to transformers' generate with no stopping criterion asking stop(): a cancel that arrives after it
    started waits for the whole row (a long beam search on a big model: minutes)."""
    from runner.engine import Stopped
    from runner.tasks import generate_keys

    asked = []

    def stop():  # the cancel arrives right after the row started
        asked.append(1)
        return len(asked) > 1

    params = GenerationParams(max_new_tokens=16, min_new_tokens=16, **settings)
    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    with pytest.raises(Stopped):
        generate_keys(gpt2_engine, [(0, 0)], [params], [1], [prompt], stop=stop)


@pytest.mark.parametrize(
    "settings", [{}, {"num_beams": 2}, {"no_repeat_ngram_size": 2}], ids=["loop", "beams", "ngram"]
)
def test_progress_within_a_row_is_reported_for_transformers_rows_too(gpt2_engine, settings):
    """`stepped(tokens)` moves tok/s and the heartbeat within a batch; generate_keys never passes it to
    `_through_transformers`, so a job of beam rows shows 0 tok/s until each row (batch) ends."""
    from runner.tasks import generate_keys

    steps = []
    params = GenerationParams(max_new_tokens=8, min_new_tokens=8, **settings)
    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    generate_keys(gpt2_engine, [(0, 0)], [params], [1], [prompt], stepped=steps.append)
    assert sum(steps) > 0, steps
