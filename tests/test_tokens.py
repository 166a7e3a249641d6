"""Token texts in place and exact bytes (runner/tokens.py): what results and OpenAI Batch output show."""

import pytest
from helpers import unreadable_by_llguidance

from runner.tokens import TokenText, alternative_pieces, partial_tail_tokens, token_pieces

ENGINES = ["gpt2_engine", "llama_engine"]  # byte-level BPE; SentencePiece with byte fallback
TEXTS = ["吾輩は猫である。名前はまだ無い。", "The capital of France is Paris.", "café 😀 naïve"]


@pytest.mark.parametrize("name", ENGINES)
def test_token_bytes_rebuild_the_text_exactly(request, name):
    tok = request.getfixturevalue(name).tokenizer
    texts = TokenText(tok)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        raw = texts.bytes(ids)
        # SentencePiece's first token carries the space it adds in front ("▁吾"): a real byte of that token.
        dummy_prefix = b" " if name == "llama_engine" else b""
        assert b"".join(raw) == dummy_prefix + text.encode() and len(raw) == len(ids)
        assert "".join(token_pieces(tok, ids)) == text


@pytest.mark.parametrize("name", ENGINES)
def test_alternatives_read_in_place(request, name):
    tok = request.getfixturevalue(name).tokenizer
    prefix = tok("The capital of", add_special_tokens=False)["input_ids"]
    (france,) = [i for i in tok(" France", add_special_tokens=False)["input_ids"][-1:]]
    # A SentencePiece "▁France" keeps its space in place (decode([id]) drops it); both agree with the pieces.
    assert alternative_pieces(tok, prefix, [france]) == token_pieces(tok, [france], prefix)
    ids = tok("鷲", add_special_tokens=False)["input_ids"]
    if len(ids) > 1:  # a character over byte tokens: its last byte completes it in place
        assert alternative_pieces(tok, ids[:-1], ids[-1:]) == ["鷲"]


def test_the_tokens_of_a_cut_character_are_found(gpt2_engine):
    tok = gpt2_engine.tokenizer
    texts = TokenText(tok)
    ids = tok("猫だ鷲", add_special_tokens=False)["input_ids"]
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    k = partial_tail_tokens(texts.bytes(ids[:cut]))
    assert k >= 1 and not tok.decode(ids[: cut - k]).endswith("\ufffd")
    assert partial_tail_tokens(["a\ufffd".encode()]) == 0  # a U+FFFD the model wrote is whole
    assert partial_tail_tokens([b"abc"]) == 0
    assert partial_tail_tokens([b"\xe7\x8c\xab\xe3"]) is None  # one token ends 猫 and starts another


def test_generated_text_cut_mid_character_does_not_end_in_a_replacement_char(gpt2_engine, monkeypatch):
    """The engine's own path: a length finish whose last token is the first bytes of a character."""
    from runner.params import GenerationParams

    tok = gpt2_engine.tokenizer
    ids = tok("鷲", add_special_tokens=False)["input_ids"]  # not in the tiny corpus: one token per byte
    assert len(ids) > 1, "the tiny GPT-2 should split 鷲 into byte tokens"
    forced = iter(ids[:-1])
    real_pick = gpt2_engine._pick

    def pick_forced(st):  # the real step, then the chosen token replaced by the next forced one
        import torch

        tok_, chosen, logprobs = real_pick(st)
        tok_[:] = next(forced)
        st.step = (
            tok_.tolist(),
            st.step[1],
            torch.isin(tok_, gpt2_engine._eos).tolist(),
        )  # (read from the device)
        return tok_, chosen, logprobs

    monkeypatch.setattr(gpt2_engine, "_pick", pick_forced)
    prompt = tok("Hello", add_special_tokens=False)["input_ids"]
    (c,) = gpt2_engine.generate(
        [prompt], GenerationParams(max_new_tokens=len(ids) - 1, min_new_tokens=len(ids) - 1), [0]
    )
    assert c.finish_reason == "length" and c.token_ids == ids[:-1]
    assert tok.decode(c.token_ids).endswith("\ufffd") and not c.text.endswith("\ufffd")


def test_a_tokenizer_llguidance_cannot_read_falls_back_to_the_text_in_place(gpt2_engine, monkeypatch):
    tok = gpt2_engine.tokenizer
    other = unreadable_by_llguidance(tok, monkeypatch)
    ids = tok("The capital", add_special_tokens=False)["input_ids"]
    assert TokenText(other).bytes(ids) == [p.encode() for p in token_pieces(tok, ids)]


@pytest.mark.parametrize("name", ENGINES)
def test_many_rows_decode_as_the_tokenizer_decodes_each(request, name):
    import random

    from runner.tokens import _rust_decoder, decode_many

    tok = request.getfixturevalue(name).tokenizer
    rng = random.Random(0)
    words = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # random ids (special tokens, lone bytes of split characters) and real texts cut anywhere
    rows = [[rng.randrange(len(tok)) for _ in range(rng.randrange(0, 30))] for _ in range(200)]
    rows += [w[rng.randrange(len(w)) :] + w[: rng.randrange(len(w))] for w in words for _ in range(50)]
    assert _rust_decoder(tok) is not None  # transformers' own fast tokenizer: one call of the Rust decoder
    assert decode_many(tok, rows) == [tok.decode(r, skip_special_tokens=True) for r in rows]


def test_a_tokenizer_that_cleans_up_spaces_or_decodes_its_own_way_decodes_row_by_row(tiny_gpt2):
    from transformers import AutoTokenizer

    from runner.tokens import _rust_decoder, decode_many

    tidy = AutoTokenizer.from_pretrained(tiny_gpt2, clean_up_tokenization_spaces=True)
    tidy.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = tidy("Paris , France . It isn 't .", add_special_tokens=False)["input_ids"]
    assert _rust_decoder(tidy) is None
    assert decode_many(tidy, [ids]) == [tidy.decode(ids, skip_special_tokens=True)]

    class Shouting(type(tidy)):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs).upper()

    loud = Shouting.from_pretrained(tiny_gpt2)
    assert _rust_decoder(loud) is None
    assert decode_many(loud, [ids]) == [loud.decode(ids, skip_special_tokens=True)]
