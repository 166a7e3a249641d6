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
