"""Token texts in place (runner/tokens.py) with SentencePiece byte fallback, a real U+FFFD, and no byte table."""

import pytest
from helpers import unreadable_by_llguidance

from runner.tokens import TokenText, alternative_pieces, token_pieces


def test_sentencepiece_byte_fallback_characters_in_a_row_join_back(llama_engine):
    """Two characters in a row that the tiny Llama spells with byte-fallback tokens (<0xE9><0xB7><0xB2>):
    decoding the first character plus the first byte of the second gives "\ufffd" * 4 (the ByteFallback
    decoder rejects the whole run of bytes), so the head is no prefix of the full text and the piece falls
    back to decode([id]) = "\ufffd". README: the tokens "join back into the text"."""
    tok = llama_engine.tokenizer
    for text in ["鷲鷲", "ｶﾀｶﾅ", "😀😀"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = token_pieces(tok, ids)
        assert "".join(pieces) == tok.decode(ids), (text, pieces)
        assert "\ufffd" not in "".join(pieces), (text, pieces)


def test_score_tokens_of_consecutive_byte_fallback_characters(llama_engine):
    """The same through TokenText.pieces, as the score job's `tokens` column is made."""
    tok = llama_engine.tokenizer
    ids = tok("鷲鷲", add_special_tokens=False)["input_ids"]
    pieces = TokenText(tok).pieces(ids)
    assert "".join(pieces).strip() == "鷲鷲", pieces


def test_alternative_completing_a_second_byte_fallback_character(llama_engine):
    tok = llama_engine.tokenizer
    ids = tok("鷲鷲", add_special_tokens=False)["input_ids"]
    assert alternative_pieces(tok, ids[:-1], ids[-1:]) == ["鷲"]


def test_llama_text_cut_after_two_bytes_of_a_character_holds_the_whole_partial_back(
    llama_engine, monkeypatch
):
    """SentencePiece's ByteFallback decoder writes one "\ufffd" per byte of an incomplete character, so a
    length finish after 2 of 鷲's 3 byte tokens decodes as "...\ufffd\ufffd"; hold_back_partial drops one
    "\ufffd" only, and the text still ends in a replacement character the model never wrote."""
    from runner.params import GenerationParams

    tok = llama_engine.tokenizer
    ids = [i for i in tok("鷲", add_special_tokens=False)["input_ids"] if tok.convert_ids_to_tokens(i) != "▁"]
    assert len(ids) == 3, tok.convert_ids_to_tokens(ids)  # <0xE9> <0xB7> <0xB2>
    forced = iter(ids[:2])
    real_pick = llama_engine._pick

    def pick_forced(st):
        import torch

        tok_, chosen, logprobs = real_pick(st)
        tok_[:] = next(forced)
        st.step = (
            tok_.tolist(),
            st.step[1],
            torch.isin(tok_, llama_engine._eos).tolist(),
        )  # (read from the device)
        return tok_, chosen, logprobs

    monkeypatch.setattr(llama_engine, "_pick", pick_forced)
    prompt = tok("Hello")["input_ids"]
    (c,) = llama_engine.generate([prompt], GenerationParams(max_new_tokens=2, min_new_tokens=2), [0])
    assert c.finish_reason == "length" and c.token_ids == ids[:2]
    assert not c.text.endswith("\ufffd"), repr(c.text)


def test_fallback_bytes_of_alternatives_are_not_read_as_one_sequence(gpt2_engine, monkeypatch):
    """Without llguidance's byte table (a tokenizer it cannot read), `TokenText.bytes(ids)` is the bytes of
    `pieces(ids)`: the ids read as one sequence. results._top_entries calls it with one step's alternatives,
    which are not a sequence: an alternative that is the first byte of a character is then read as followed
    by the next alternative and reported with no bytes at all ([]), and the next one with bytes it lacks."""
    from runner.engine import Completion
    from runner.results import _top_entries

    tok = gpt2_engine.tokenizer
    other = unreadable_by_llguidance(tok, monkeypatch)
    a, b, _ = tok("鷲", add_special_tokens=False)["input_ids"]  # three byte tokens: E9 B7 B2
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    c = Completion([a], [-1.0], "", "length", None, top_logprobs=[[(a, -1.0, 1), (b, -2.0, 2)]])
    (step,) = _top_entries(c, prompt, TokenText(other))
    for entry in step:
        assert entry["bytes"], step  # every token has at least one byte


def test_a_replacement_character_the_text_contains_shows_on_its_own_last_token(gpt2_engine):
    """A U+FFFD that is really in the text (EF BF BD, three byte tokens in the tiny GPT-2) is stripped as if it
    were an incomplete character, so it shows on the *next* token (" lit" reads "\ufffd lit") and its own
    last byte token reads ""."""
    tok = gpt2_engine.tokenizer
    ids = tok("\ufffd lit", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    raw = TokenText(tok).bytes(ids)
    k = next(i for i in range(len(ids)) if b"".join(raw[: i + 1]) == "\ufffd".encode())  # its last token
    assert pieces[k].endswith("\ufffd") and "\ufffd" not in "".join(pieces[k + 1 :]), pieces


def test_the_text_after_a_prompt_ending_in_byte_tokens_reads_whole(llama_engine):
    """The text of a row is decoded after the prompt's last few tokens. When those started inside a character
    spelled in byte tokens (含む: <0xE5><0x90><0xAB><0xE3><0x82><0x80>, window from <0xAB>), the ByteFallback
    decoder read the whole run of bytes as U+FFFD, the generated bytes included: `text` was "���" where the
    tokens said "含", and a JSON answer lost its "{" (adversarial pass 27). The window now starts at a
    character."""
    from runner.params import GenerationParams

    tok = llama_engine.tokenizer
    prompt = tok("含む")["input_ids"]
    assert tok.convert_ids_to_tokens(prompt[-4])[:3] == "<0x"  # the premise: the window starts inside 含
    params = [
        GenerationParams(max_new_tokens=8, choices=["含"]),
        GenerationParams(max_new_tokens=8, choices=["{a"]),
    ]
    for p in params:
        (c,) = llama_engine.generate([prompt], p, [0])
        assert c.text == p.choices[0] == tok.decode(c.token_ids, skip_special_tokens=True), (
            c.text,
            c.token_ids,
        )


@pytest.mark.parametrize("engine", ["gpt2_engine", "llama_engine"])
def test_a_stop_string_whose_character_ends_in_a_later_token_is_found(engine, request):
    """む spelled in several byte tokens: after its first, the text ends in U+FFFD, and the search for stop
    strings went on from after it, so the whole む was never looked at: `--stop む` ran on to the end
    (adversarial pass 27: Japanese stop strings such as 「質問：」 were ignored)."""
    from runner.params import GenerationParams

    eng = request.getfixturevalue(engine)
    prompt = eng.tokenizer("Hello")["input_ids"]
    p = GenerationParams(max_new_tokens=12, choices=["含むよ"], stop=["む"])
    (c,) = eng.generate([prompt], p, [0])
    assert (c.text, c.finish_reason, c.stop_reason) == ("含", "stop", "む"), (c.text, c.token_ids)


@pytest.mark.parametrize("engine", ["gpt2_engine", "llama_engine"])
@pytest.mark.parametrize(("min_new", "first_counts"), [(0, True), (3, True), (4, False)])
def test_min_new_tokens_and_a_stop_string_split_over_byte_tokens(engine, request, min_new, first_counts):
    """鷲鷲鷲 in byte tokens, stop 鷲: with --min-new-tokens the stop counts from the text of the min-th token on;
    an unfinished character's U+FFFD was counted as text there (the first 鷲 was missed, or the text cut at one
    that should not count: adversarial pass 29). The first 鷲 ends at its 3rd byte token (4th with Llama's
    leading "▁"): min_new_tokens 4 leaves it out on GPT-2, not on Llama; either way the text ends before a 鷲
    that counts, and no token is generated past it."""
    from runner.params import GenerationParams

    eng = request.getfixturevalue(engine)
    prompt = eng.tokenizer("Hello")["input_ids"]
    p = GenerationParams(max_new_tokens=12, choices=["鷲鷲鷲"], stop=["鷲"], min_new_tokens=min_new)
    (c,) = eng.generate([prompt], p, [0])
    text = eng.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert c.stop_reason == "鷲" and text.endswith("鷲") and text.count("鷲") in (1, 2), (c.text, text)
    counted_first = text.count("鷲") == 1
    assert c.text == ("" if counted_first else "鷲") and (counted_first or not first_counts), (c.text, text)


def _forcing(eng, monkeypatch, ids):
    """The model's next token is each of `ids` in turn, then EOS."""
    forced = iter([*ids] + [eng.eos_ids[0]] * 50)
    real = eng.model.forward

    def forward(*a, **k):
        out = real(*a, **k)
        out.logits[:, -1, :] = -1e9
        out.logits[:, -1, next(forced)] = 1e9
        return out

    monkeypatch.setattr(eng.model, "forward", forward)


@pytest.mark.parametrize("engine", ["gpt2_engine", "llama_engine"])
def test_the_transformers_path_reads_and_cuts_byte_tokens_as_the_loop_does(engine, request, monkeypatch):
    """Beam search and --no-repeat-ngram-size run through transformers' generate (hf_generate.py), which
    decoded after prompt[-4:] (Japanese after a Japanese prompt read "���" with Llama) and, cutting at a stop
    string, counted an unfinished character's U+FFFD as text (the stop's own byte tokens were cut off, or
    tokens past it kept: adversarial pass 29). Both now as the loop: the same text and tokens."""
    from runner.hf_generate import generate_with_transformers
    from runner.params import GenerationParams

    eng = request.getfixturevalue(engine)
    tok = eng.tokenizer
    for prompt_text, choice, stop in [("鷲鷲鷲鷲", "含", []), ("Hello", "鷲鷲鷲", ["鷲"])]:
        prompt = tok(prompt_text)["input_ids"]
        (loop,) = eng.generate(
            [prompt], GenerationParams(max_new_tokens=12, choices=[choice], stop=stop), [0]
        )
        past = tok(choice, add_special_tokens=False)["input_ids"] if stop else []  # tokens past the stop
        longer = [t for t in loop.token_ids if t not in eng.eos_ids] + past
        _forcing(eng, monkeypatch, longer)
        params = GenerationParams(max_new_tokens=len(longer), no_repeat_ngram_size=50, stop=stop)
        (hf,) = generate_with_transformers(eng, prompt, params, None)
        monkeypatch.undo()
        got, want = (hf.text, hf.token_ids, hf.stop_reason), (loop.text, loop.token_ids, loop.stop_reason)
        assert got == want


def test_a_short_prompt_that_starts_inside_a_character_still_reads_whole(llama_engine):
    """`--truncate left` can leave a few tokens that start inside a character: BOS, then the last bytes of 鷲.
    The text window walked back to the BOS and decoded from there, and the byte run read as U+FFFD, the
    generated 含 included (adversarial pass 29); a window that finds no character start behind now starts after
    the unfinished bytes."""
    from runner.params import GenerationParams

    tok = llama_engine.tokenizer
    bytes_ = [
        i for i in tok("鷲", add_special_tokens=False)["input_ids"] if tok.convert_ids_to_tokens(i) != "▁"
    ]
    for prompt in ([tok.bos_token_id, *bytes_[1:]], [tok.bos_token_id, *bytes_[1:], *bytes_]):
        (c,) = llama_engine.generate([prompt], GenerationParams(max_new_tokens=8, choices=["含"]), [0])
        assert c.text == "含", (c.text, tok.convert_ids_to_tokens(prompt))
