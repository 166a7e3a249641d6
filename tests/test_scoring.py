"""runner.scoring against plain, unbatched, unpadded forward passes of the tiny models (and one demo-model check)."""

import math

import pytest
from helpers import plain_logprobs

from runner import GenerationParams
from runner.engine import PREFILL_MIN_FILL
from runner.errors import RunnerError
from runner.scoring import (
    TextScore,
    embed_batch,
    embed_texts,
    fit_context,
    in_batches,
    rolling_windows,
    score_batch,
    score_continuations,
    score_record,
    score_rows,
    score_texts,
    split_context,
    token_pieces,
    tokenize_text,
)

ENGINES = ["gpt2_engine", "llama_engine"]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello",
    "吾輩は猫である。名前はまだ無い。",
    "My friend said that every student learns from a long story.",
    "Hi there",
]


def long_ids(engine, n_min):
    text, ids = "", []
    while len(ids) <= n_min:
        text += " ".join(SENTENCES) + " "
        ids = tokenize_text(engine.tokenizer, text)
    return ids


# --- tokenizing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENGINES)
def test_tokenize_text_adds_one_bos_as_context_and_eos_on_request(request, name):
    tok = request.getfixturevalue(name).tokenizer
    bos = tok.bos_token_id  # GPT-2: <|endoftext|> is both BOS and EOS
    plain_ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert tokenize_text(tok, "Hello world") == [bos, *plain_ids]  # never doubled (Llama adds <s> itself)
    assert tokenize_text(tok, "Hello world", add_bos=False) == plain_ids
    assert tokenize_text(tok, "Hello world", add_eos=True) == [bos, *plain_ids, tok.eos_token_id]


def test_lm_eval_moves_trailing_whitespace_to_the_continuation(gpt2_engine, llama_engine):
    tok = gpt2_engine.tokenizer
    ctx, cont = split_context(tok, "The capital of France is ", "Paris")
    assert tok.decode(ctx) == "The capital of France is" and tok.decode(cont) == " Paris"
    assert tok.decode(cont[:1]).startswith(" ")  # the continuation starts with the space
    assert ctx + cont == tok("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    assert split_context(tok, "", "Hello") == ([tok.eos_token_id], tok("Hello")["input_ids"])  # no BOS: EOS
    sp = llama_engine.tokenizer
    ctx, cont = split_context(sp, "The capital of France is ", "Paris")
    assert sp.convert_ids_to_tokens(cont)[0].startswith("▁") and sp.decode(ctx) == "The capital of France is"
    assert split_context(sp, "  ", "Hello")[0] == [sp.bos_token_id]  # whitespace-only context is empty


def test_fit_context_keeps_the_end_of_the_context_as_lm_eval():
    assert fit_context([1, 2, 3], [4, 5], None) == [1, 2, 3]
    assert fit_context([1, 2, 3], [4, 5], 4) == [1, 2, 3]  # 5 tokens, 4 fed: the last is only predicted
    assert fit_context([1, 2, 3], [4, 5], 3) == [2, 3]
    assert fit_context([1, 2, 3], [4, 5], 2) == [3]
    with pytest.raises(RunnerError, match="continuation is 2 tokens, over the context window of 1"):
        fit_context([1, 2, 3], [4, 5], 1)


@pytest.mark.parametrize("name", ENGINES)
def test_token_pieces_read_in_place_and_join_back_into_the_text(request, name):
    tok = request.getfixturevalue(name).tokenizer
    for text in ["The capital of France is Paris.", "猫が好きです。 😀 café", "a  b\n\nc"]:
        ids = tokenize_text(tok, text, add_eos=True)
        pieces = token_pieces(tok, ids[1:], ids[:1])
        assert "".join(pieces[:-1]) == text and pieces[-1] == tok.eos_token
    ids = tokenize_text(tok, "The capital of")
    assert token_pieces(tok, ids[-1:], ids[:-1]) == [" of"]  # "▁of" keeps its space, unlike decode([id])


# --- scoring --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENGINES)
def test_batched_scores_equal_plain_unpadded_forward_passes(request, name):
    engine = request.getfixturevalue(name)
    seqs = [tokenize_text(engine.tokenizer, s) for s in SENTENCES]
    froms = [1, 1, 3, 5, 2]  # some rows keep more context unscored
    assert len({len(s) for s in seqs}) == len(seqs)
    bos = engine.tokenizer.bos_token_id  # GPT-2: <|endoftext|> is both BOS and EOS
    assert all(s[0] == bos and s[1] != bos for s in seqs)  # one BOS, never doubled (Llama adds <s> itself)
    scored = score_batch(engine, seqs, froms)
    for ids, start, res in zip(seqs, froms, scored, strict=True):
        lps, greedy = plain_logprobs(engine, ids)
        assert res.token_ids == ids[start:]
        assert res.token_logprobs == pytest.approx(lps[start - 1 :], abs=1e-4)
        assert res.greedy == greedy[start - 1 :]
    alone = [score_batch(engine, [s], [f])[0] for s, f in zip(seqs, froms, strict=True)]
    for a, b in zip(alone, scored, strict=True):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5) and a.greedy == b.greedy


def test_score_batch_edge_cases(gpt2_engine):
    ids = tokenize_text(gpt2_engine.tokenizer, "Hello world")
    assert score_batch(gpt2_engine, [], []) == []
    assert (
        score_batch(gpt2_engine, [ids, [0]], [len(ids), 1]) == [TextScore([], [], [])] * 2
    )  # nothing to score
    one = score_batch(gpt2_engine, [ids, [0]], [1, 1])
    assert one[1] == TextScore([], [], []) and one[0].num_tokens == len(ids) - 1
    with pytest.raises(ValueError, match="score_from must be in"):
        score_batch(gpt2_engine, [ids], [0])


@pytest.mark.parametrize("name", ENGINES)
def test_continuation_score_equals_the_greedy_generation(request, name):
    engine = request.getfixturevalue(name)
    ctx = engine.tokenizer("The old man said")["input_ids"]
    gen = engine.generate([ctx], GenerationParams(max_new_tokens=6))[0]
    res = score_batch(engine, [ctx + gen.token_ids], [len(ctx)])[0]
    assert res.token_ids == gen.token_ids and res.is_greedy
    assert res.token_logprobs == pytest.approx(gen.token_logprobs, abs=1e-4)
    assert res.logprob == pytest.approx(gen.cumulative_logprob, abs=1e-4)
    other = gen.token_ids[:-1] + [(gen.token_ids[-1] + 1) % len(engine.tokenizer)]
    changed = score_batch(engine, [ctx + other], [len(ctx)])[0]
    assert not changed.is_greedy and changed.greedy == [True] * (len(other) - 1) + [False]


def test_score_continuations_scores_the_continuation_tokens(gpt2_engine):
    tok = gpt2_engine.tokenizer
    pairs = [("The capital of France is ", "Paris"), ("", "Hello world"), ("A small bird", " reads")]
    got = score_continuations(gpt2_engine, pairs, batch_size=2)
    for (context, continuation), res in zip(pairs, got, strict=True):
        ctx, cont = split_context(tok, context, continuation)
        lps, _ = plain_logprobs(gpt2_engine, ctx + cont)
        assert res.token_ids == cont and res.logprob == pytest.approx(sum(lps[len(ctx) - 1 :]), abs=1e-4)


# --- rolling windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 50, 64, 65, 300])
@pytest.mark.parametrize(("max_len", "stride"), [(64, 32), (64, 63), (64, 64), (64, 500), (100, 7), (2, 1)])
def test_rolling_windows_score_every_token_exactly_once(length, max_len, stride):
    ids = list(range(1000, 1000 + length))
    scored = []
    for window, start in rolling_windows(ids, max_len, stride):
        assert len(window) <= max_len and 1 <= start < len(window)
        assert window == ids[ids.index(window[0]) :][: len(window)]
        scored += window[start:]
    assert scored == ids[1:]
    if length <= max_len:
        assert rolling_windows(ids, max_len, stride) == ([(ids, 1)] if length > 1 else [])


def test_a_window_as_long_as_the_text_is_plain_scoring(gpt2_engine):
    ids = tokenize_text(gpt2_engine.tokenizer, " ".join(SENTENCES))
    lps, _ = plain_logprobs(gpt2_engine, ids)
    for max_len in (len(ids), len(ids) + 10):
        [(window, start)] = rolling_windows(ids, max_len, stride=max_len - 1)
        assert score_batch(gpt2_engine, [window], [start])[0].token_logprobs == pytest.approx(lps, abs=1e-4)
    assert score_rows(gpt2_engine, [ids], [1], stride=8)[0].token_logprobs == pytest.approx(lps, abs=1e-4)


@pytest.mark.parametrize("stride", [None, 100, 256])
def test_a_text_longer_than_the_context_is_scored_token_by_token_in_windows(gpt2_engine, stride):
    engine = gpt2_engine
    assert engine.context_window == 256
    ids = long_ids(engine, 600)
    res = score_rows(engine, [ids, ids[:20]], [1, 1], stride=stride, max_batch_tokens=600)
    assert res[0].token_ids == ids[1:] and len(res[0].token_logprobs) == len(ids) - 1
    assert res[1].token_ids == ids[1:20]
    expected = []  # each token scored by a plain pass over its own window: 256 fed (+1 predicted only)
    for window, start in rolling_windows(ids, 257, stride or 128):
        lps, _ = plain_logprobs(engine, window)
        expected += lps[start - 1 :]
    assert res[0].token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(math.isfinite(x) for x in res[0].token_logprobs)


@pytest.mark.parametrize("extra", [1, 2, 60])
@pytest.mark.parametrize("stride", [None, 100])
def test_the_last_window_of_a_long_text_feeds_a_whole_window(gpt2_engine, extra, stride):
    """lm-eval's rolling windows: the last window, like every other, feeds the model a whole context window, so
    the tokens it scores have as much context as the window leaves. It began at a multiple of the stride: a
    text one token over the window (BOS + 257 tokens) scored its last token after 129 tokens, not 256."""
    engine = gpt2_engine
    window = engine.context_window
    ids = long_ids(engine, window + extra + 1)[: window + 1 + extra]
    res = score_rows(engine, [ids], [1], stride=stride, max_batch_tokens=600)[0]
    assert res.token_ids == ids[1:]
    alone, _ = plain_logprobs(engine, ids[-(window + 1) :])  # the last tokens after the whole window
    assert res.token_logprobs[-1] == pytest.approx(alone[-1], abs=1e-4)
    windows = rolling_windows(ids, window + 1, stride or window // 2)
    assert all(len(w) == window + 1 for w, _ in windows)
    last_window, start = windows[-1]
    assert last_window == ids[-(window + 1) :]
    n = len(last_window) - start
    assert res.token_logprobs[-n:] == pytest.approx(alone[-n:], abs=1e-4)


def test_a_score_job_keeps_the_rolling_windows_it_was_submitted_with(tmp_path, tiny_gpt2, gpt2_engine):
    """A job submitted before the last window became a whole one (no WHOLE_LAST_WINDOW in its job.json) scores
    its texts as it began, so a job resumed by a newer runner never mixes the two; a new job holding such a text
    has WHOLE_WINDOW_FORMAT, which a runner of before refuses instead of scoring it the old way."""
    import dataclasses

    from helpers import write_jsonl

    import runner
    from runner import ScoreParams, jobdir
    from runner.jobs import create_job
    from runner.worker import run_job

    window = gpt2_engine.context_window
    text = " ".join(SENTENCES * 40)
    ids = tokenize_text(gpt2_engine.tokenizer, text)
    assert len(ids) > window + 1 and (len(ids) - window - 1) % (window // 2)  # the two windowings differ
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": text}, {"id": "b", "text": "Hi there"}])
    new = create_job(path, tiny_gpt2, ScoreParams(), job_dir=tmp_path / "new")
    assert new.meta["format"] >= jobdir.WHOLE_WINDOW_FORMAT and new.meta[jobdir.WHOLE_LAST_WINDOW]
    old = create_job(path, tiny_gpt2, ScoreParams(), job_dir=tmp_path / "old")
    meta = {k: v for k, v in old.meta.items() if k != jobdir.WHOLE_LAST_WINDOW}
    old = jobdir.Job(old.dir, dataclasses.replace(old.spec, meta={**meta, "format": jobdir.FORMAT}))
    got = {}
    for name, job in (("new", new), ("old", old)):
        assert run_job(job, gpt2_engine, echo=None).finished
        got[name] = runner.load_results(job.dir).set_index("id").loc["a", "token_logprobs"]
    for name, whole_last in (("new", True), ("old", False)):
        expected = []
        for w, start in rolling_windows(ids, window + 1, window // 2, 1, whole_last):
            expected += plain_logprobs(gpt2_engine, w)[0][start - 1 :]
        assert list(got[name]) == pytest.approx(expected, abs=1e-4), name
    assert got["new"][-1] != pytest.approx(got["old"][-1], abs=1e-3)


def test_score_texts_batches_rows_in_input_order(gpt2_engine):
    texts = [*SENTENCES, " ".join(SENTENCES) * 12]  # the last is over the window
    got = score_texts(gpt2_engine, texts, add_eos=True, batch_size=2)
    for text, res in zip(texts[:-1], got[:-1], strict=True):
        ids = tokenize_text(gpt2_engine.tokenizer, text, add_eos=True)
        assert res.token_ids == ids[1:]
        assert res.token_logprobs == pytest.approx(plain_logprobs(gpt2_engine, ids)[0], abs=1e-4)
    assert got[-1].num_tokens == len(tokenize_text(gpt2_engine.tokenizer, texts[-1], add_eos=True)) - 1
    with pytest.raises(RunnerError, match=r"texts\[0\] has no token to score"):
        score_texts(gpt2_engine, [""], add_bos=False)


def test_score_record_summarises_a_score(llama_engine):
    ids = tokenize_text(llama_engine.tokenizer, "The capital of France is Paris.")
    res = score_batch(llama_engine, [ids], [1])[0]
    rec = score_record(llama_engine.tokenizer, res, ids[:1])
    assert rec["logprob"] == pytest.approx(sum(res.token_logprobs)) and rec["num_tokens"] == len(ids) - 1
    assert rec["mean_logprob"] == pytest.approx(rec["logprob"] / rec["num_tokens"])
    assert rec["perplexity"] == pytest.approx(math.exp(-rec["mean_logprob"]))
    assert "".join(rec["tokens"]) == "The capital of France is Paris." and rec["token_ids"] == ids[1:]
    empty = TextScore([], [], [])
    assert empty.logprob == 0 and math.isnan(empty.mean_logprob) and empty.is_greedy


def test_in_batches_plans_by_length_and_returns_input_order():
    seqs = [[0] * n for n in (3, 9, 1, 9, 5)]
    seen = []

    def fn(batch, tags):
        seen.append(tags)
        return [f"{t}:{len(s)}" for s, t in zip(batch, tags, strict=True)]

    out = in_batches(fn, seqs, list("abcde"), batch_size=2, max_batch_tokens=100)
    assert out == ["a:3", "b:9", "c:1", "d:9", "e:5"]
    assert seen == [["b", "d"], ["e", "a"], ["c"]]  # longest first, at most 2 per batch


# --- embeddings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("name", ENGINES)
def test_embeddings_equal_a_plain_pass_alone_or_padded(request, name, pooling):
    import numpy as np
    import torch

    engine = request.getfixturevalue(name)
    seqs = [tokenize_text(engine.tokenizer, s) for s in SENTENCES]
    together = np.array(embed_batch(engine, seqs, pooling))
    alone = np.array([embed_batch(engine, [s], pooling)[0] for s in seqs])
    hidden = engine.model.config.hidden_size
    assert together.shape == (len(seqs), hidden) and np.abs(together - alone).max() < 1e-5
    for ids, vec in zip(seqs, together, strict=True):
        with torch.no_grad():
            states = engine.model(
                torch.tensor([ids], device=engine.device), output_hidden_states=True
            ).hidden_states[-1][0]
        ref = states.mean(0) if pooling == "mean" else states[-1]
        assert np.abs(vec - ref.float().cpu().numpy()).max() < 1e-5
    assert np.abs(together[0] - together[1]).max() > 1e-3
    texts = np.array(embed_texts(engine, SENTENCES[:2], pooling, batch_size=1))
    direct = np.array(embed_batch(engine, [engine.tokenizer(s)["input_ids"] for s in SENTENCES[:2]], pooling))
    assert np.abs(texts - direct).max() < 1e-5


def test_embed_batch_refuses_bad_input(gpt2_engine):
    with pytest.raises(ValueError, match="pooling must be mean or last, got 'max'"):
        embed_batch(gpt2_engine, [[1, 2]], "max")
    with pytest.raises(ValueError, match="empty token sequence"):
        embed_batch(gpt2_engine, [[1, 2], []])


# --- the demo model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_prefers_the_true_sentence():
    from runner.engine import Engine

    engine = Engine("smollm2-135m-instruct")
    paris, berlin = score_texts(
        engine, ["The capital of France is Paris.", "The capital of France is Berlin."]
    )
    assert paris.logprob > berlin.logprob + 1.0
    [cont_paris, cont_berlin] = score_continuations(
        engine, [("The capital of France is ", "Paris"), ("The capital of France is ", "Berlin")]
    )
    assert cont_paris.logprob > cont_berlin.logprob and cont_paris.is_greedy


# --- bounded memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ENGINES)
def test_the_output_layer_runs_a_few_positions_at_a_time(request, name, monkeypatch):
    """Scoring never holds [batch, positions, vocab] logits: the output layer runs on scored positions only
    (no padding), at most FLOAT_CHUNK / vocab of them at a time; the scores are those of plain passes."""
    from runner import scoring

    engine = request.getfixturevalue(name)
    engine._head_only = None
    seqs = [tokenize_text(engine.tokenizer, s) for s in SENTENCES]
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(scoring, "FLOAT_CHUNK", 3 * vocab)  # 3 positions per chunk
    shapes = []
    gather = scoring.gather_logprobs
    monkeypatch.setattr(
        scoring, "gather_logprobs", lambda lg, t: shapes.append(tuple(lg.shape)) or gather(lg, t)
    )
    scored = score_batch(engine, seqs, [1] * len(seqs))
    assert engine._head_only is True
    assert all(b == 1 and w <= 3 and v == vocab for b, w, v in shapes)
    assert sum(w for _, w, _ in shapes) == sum(
        len(s) - 1 for s in seqs
    )  # every scored token once, no padding
    for ids, res in zip(seqs, scored, strict=True):
        lps, greedy = plain_logprobs(engine, ids)
        assert res.token_logprobs == pytest.approx(lps, abs=1e-4) and res.greedy == greedy


@pytest.mark.parametrize("name", ENGINES)
def test_rows_are_scored_and_embedded_in_groups_of_similar_length(request, name, monkeypatch):
    """A batch of very different lengths is not padded to its longest row: each forward pass holds rows
    whose padding is at most 1 - PREFILL_MIN_FILL of it, and every row scores as alone."""
    engine = request.getfixturevalue(name)
    short = [tokenize_text(engine.tokenizer, s) for s in SENTENCES]
    seqs = short + [long_ids(engine, 60)]
    fills = []  # (rows, real tokens / padded tokens) per forward pass
    hook = engine.model.base_model.register_forward_pre_hook(  # the body: scoring and embedding go through it
        lambda m, args, kw: fills.append(
            (len(kw["attention_mask"]), kw["attention_mask"].float().mean().item())
        ),
        with_kwargs=True,
    )
    try:
        together = score_batch(engine, seqs, [1] * len(seqs))
        scored_passes = len(fills)
        vectors = embed_batch(engine, seqs)
    finally:
        hook.remove()
    assert scored_passes >= 2 and len(fills) - scored_passes >= 2  # embedding groups rows the same way
    assert all(rows == 1 or fill >= PREFILL_MIN_FILL - 1e-6 for rows, fill in fills)
    assert vectors[-1] == pytest.approx(embed_batch(engine, seqs[-1:])[0], abs=1e-5)
    for s, res in zip(seqs, together, strict=True):
        assert res.token_logprobs == pytest.approx(score_batch(engine, [s], [1])[0].token_logprobs, abs=1e-4)


def test_a_model_whose_logits_are_more_than_its_output_layer_is_scored_from_its_own_logits(tiny_gpt2):
    """A final softcap / logit scale (Gemma 2, Cohere) lives in the model's forward, after the output layer:
    the head-only check fails and scoring takes the model's own logits."""
    import torch

    from runner.engine import Engine

    engine = Engine(tiny_gpt2)

    def softcap(module, args, output):
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)

    handle = engine.model.register_forward_hook(softcap)
    try:
        seqs = [tokenize_text(engine.tokenizer, s) for s in SENTENCES]
        scored = score_batch(engine, seqs, [1] * len(seqs))
        assert engine._head_only is False
        for ids, res in zip(seqs, scored, strict=True):
            assert res.token_logprobs == pytest.approx(plain_logprobs(engine, ids)[0], abs=1e-4)
    finally:
        handle.remove()


def test_a_seam_inside_a_token_scores_exactly_the_continuation_or_refuses_the_pair(gpt2_engine, llama_engine):
    """A pair whose seam falls inside a token of their joint encoding ("th" + "e" is one token "the"; "で" +
    "ある" is a token holding "で" and the first bytes of "あ"): the end of the joint encoding after the
    context's length scored other bytes than the continuation ("で\\ufffdる", one byte lost) or none at all,
    and a job of such a pair died on a ZeroDivisionError at commit (adversarial pass 157). The continuation
    is now its own encoding where that spells it exactly (byte-level BPE), and refused otherwise."""
    from runner.tokens import TokenText

    tok, texts = gpt2_engine.tokenizer, TokenText(gpt2_engine.tokenizer)
    for context, continuation in [("th", "e"), ("で", "ある"), ("He", "llo"), ("quic", "k")]:
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx, cont = split_context(tok, context, continuation)
        assert whole[: len(ctx)] != ctx  # (the case in point)
        assert b"".join(texts.bytes(cont)) == continuation.encode()
        assert tok.decode(ctx + cont) == context + continuation
    (score,) = score_continuations(gpt2_engine, [("th", "e")])
    assert score.num_tokens == 1 and math.isfinite(score.logprob)
    with pytest.raises(RunnerError, match=r"pairs\[1\]: the pair's encoding has a token across the seam"):
        score_continuations(llama_engine, [("The cat", " sat"), ("t", "he")])
    with pytest.raises(RunnerError, match=r"pairs\[0\]: continuation is empty"):
        score_continuations(gpt2_engine, [("Hello", "")])


def test_score_texts_refuses_an_empty_text_as_a_job_does(gpt2_engine):
    """score_texts([""]) gave logprob 0.0 (probability 1, perplexity NaN) for the empty text, which is only its
    BOS, and a one-token text without BOS the same; a score job refuses both rows (adversarial pass 157)."""
    for texts, add_bos in (([""], True), (["Hello", "e"], False)):  # "e": one token
        with pytest.raises(
            RunnerError, match=rf"texts\[{len(texts) - 1}\] has no token to score \(it needs a"
        ):
            score_texts(gpt2_engine, texts, add_bos=add_bos)


def test_embed_texts_names_the_text_that_encodes_to_no_tokens(gpt2_engine):
    """embed_texts(["Hello", ""]) raised a bare ValueError "cannot embed an empty token sequence" from inside a
    batch, naming no text (adversarial pass 157); it names the text, as score_texts does."""
    with pytest.raises(RunnerError, match=r"texts\[1\] encodes to no tokens"):
        embed_texts(gpt2_engine, ["Hello", ""])


def test_a_context_that_encodes_to_no_tokens_is_an_empty_context(tmp_path, tiny_llama):
    """A context the tokenizer normalises away ("\\u200b" under a normalizer that deletes it, as sentencepiece's
    nmt_nfkc deletes control characters) encoded to no tokens: the pair began scoring at token 0, and
    score_batch refused it with "score_from must be in [1, len(seq)], got [0]" (adversarial pass 225). It is
    the empty context it spells: the BOS, as lm-eval scores an empty context, then the continuation."""
    from helpers import normalising_copy

    from runner.engine import Engine
    from runner.params import EngineOptions

    path = normalising_copy(tiny_llama, tmp_path / "llama", "\u200b")
    engine = Engine(str(path), EngineOptions(device="cpu"))
    tok = engine.tokenizer
    assert tok("\u200b", add_special_tokens=False)["input_ids"] == []
    hello = tok(" Hello", add_special_tokens=False)["input_ids"]
    assert (
        split_context(tok, "\u200b", " Hello")
        == split_context(tok, "", " Hello")
        == ([tok.bos_token_id], hello)
    )
    assert split_context(tok, "\u200b\u200b ", "Hello") == ([tok.bos_token_id], hello)
    got, empty = score_continuations(engine, [("\u200b", " Hello"), ("", " Hello")])
    assert got.token_ids == hello and got.token_logprobs == pytest.approx(empty.token_logprobs, abs=1e-5)
    assert got.token_logprobs == pytest.approx(
        plain_logprobs(engine, [tok.bos_token_id, *hello])[0], abs=1e-4
    )


def test_a_perplexity_past_the_float_range_is_inf(gpt2_engine):
    """exp(-mean log-prob) of a mean below -709.78 is past float64: math.exp raised OverflowError (adversarial
    pass 225); such a perplexity is inf, as numpy's exp says."""
    score = TextScore([5], [-800.0], [False])
    assert score.logprob == -800.0 and score.perplexity == math.inf
    assert TextScore([5, 6], [-700.0, -700.0], [False, False]).perplexity == pytest.approx(math.exp(700))


def _lm_eval_rolling(engine, tokens: list[int], prefix: int, max_len: int) -> list[float]:
    """lm-eval's loglikelihood_rolling, written out: get_rolling_token_windows(context_len=1), each window made
    disjoint (make_disjoint_window), scored by a plain forward pass."""
    windows = [([prefix, *tokens[: max_len - 1]], tokens[:max_len])]
    predicted = len(windows[0][1])
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        predicted += n
    out = []
    for context, continuation in windows:
        context = context[: len(context) - len(continuation) + 1]
        out += plain_logprobs(engine, context + continuation)[0][len(context) - 1 :]
    return out


@pytest.mark.parametrize("extra", [1, 200, 300])
def test_a_stride_of_the_whole_window_is_lm_evals_rolling_loglikelihood(gpt2_engine, extra):
    """README: `--stride` equal to the context window gives lm-eval's loglikelihood_rolling token for token."""
    engine = gpt2_engine
    window = engine.context_window
    ids = long_ids(engine, 2 * window + extra)[: 2 * window + extra]
    expected = _lm_eval_rolling(engine, ids[1:], ids[0], window)
    got = score_rows(engine, [ids], [1], stride=window, max_batch_tokens=600)[0]
    assert got.token_ids == ids[1:] and got.token_logprobs == pytest.approx(expected, abs=1e-4)
