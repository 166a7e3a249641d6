"""Score and embed jobs through the same job machinery: columns, order, rolling windows, resume, CLI."""

import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import commit_row_error, invoke, run_until_done, write_jsonl

import runner
from runner import EngineOptions, jobdir, storage
from runner.inputs import READING
from runner.jobs import Job, create_job
from runner.params import EmbedParams, ScoreParams
from runner.results import valid_shards
from runner.worker import run_job

ROWS = [
    {"id": "fox", "text": "The quick brown fox", "topic": "animals"},
    {"id": "cat", "text": "吾輩は猫である。名前はまだ無い。", "topic": "books"},
    {"id": "pair", "context": "The old man said ", "continuation": "hello", "topic": "qa"},
    {"id": "hi", "text": "Hello", "topic": "greeting"},
]


@pytest.fixture
def texts(tmp_path):
    return write_jsonl(tmp_path / "texts.jsonl", ROWS)


def test_score_job_columns_and_values(tmp_path, texts, tiny_gpt2, gpt2_engine):
    job, summary = runner.run(
        texts, tiny_gpt2, ScoreParams(), output=tmp_path / "s", engine=gpt2_engine, echo=None
    )
    assert summary.finished and summary.done == 4
    df = runner.load_results(job.dir)
    assert list(df["id"]) == ["fox", "cat", "pair", "hi"] and list(df["topic"]) == [
        "animals",
        "books",
        "qa",
        "greeting",
    ]
    for _, row in df.iterrows():
        assert row.logprob == pytest.approx(float(sum(row.token_logprobs)), abs=1e-3)
        assert row.num_tokens == len(row.token_ids) == len(row.tokens) == len(row.token_logprobs)
        assert row.mean_logprob == pytest.approx(row.logprob / row.num_tokens)
        assert row.perplexity == pytest.approx(math.exp(-row.mean_logprob))
        assert row.is_greedy in (True, False)
    pair = df.set_index("id").loc["pair"]
    assert (
        pair.context == "The old man said " and pair.continuation == "hello"
    )  # as given; tokens follow lm-eval
    assert pd.isna(pair.text) and gpt2_engine.tokenizer.decode(list(pair.token_ids)) == " hello"
    assert df.set_index("id").loc["fox", "text"] == "The quick brown fox"
    # Japanese over byte-level tokens reads whole, not as "\ufffd" per byte; the bytes rebuild the text exactly.
    cat = df.set_index("id").loc["cat"]
    assert "".join(cat.tokens) == ROWS[1]["text"] and "\ufffd" not in "".join(cat.tokens)
    assert b"".join(bytes(list(b)) for b in cat.token_bytes) == ROWS[1]["text"].encode()
    # The first word is scored given BOS: every token of the text, none of the BOS.
    fox_ids = gpt2_engine.tokenizer("The quick brown fox")["input_ids"]
    assert list(df.loc[0, "token_ids"]) == fox_ids
    assert job.meta["params"] == {"add_bos": True, "add_eos": False, "stride": None}


def test_add_eos_scores_the_end_of_text(tmp_path, texts, tiny_gpt2, gpt2_engine):
    with_end, _ = runner.run(
        texts, tiny_gpt2, ScoreParams(add_eos=True), output=tmp_path / "e", engine=gpt2_engine, echo=None
    )
    without, _ = runner.run(
        texts, tiny_gpt2, ScoreParams(), output=tmp_path / "n", engine=gpt2_engine, echo=None
    )
    a, b = runner.load_results(with_end.dir), runner.load_results(without.dir)
    assert (
        a.loc[0, "num_tokens"] == b.loc[0, "num_tokens"] + 1
        and a.loc[0, "token_ids"][-1] == gpt2_engine.eos_ids[0]
    )
    assert a.loc[0, "logprob"] < b.loc[0, "logprob"]
    meta = pq.read_metadata(valid_shards(with_end.dir)[0]).metadata
    assert json.loads(meta[b"runner.params"])["add_eos"] is True and meta[b"runner.kind"] == b"score"


def test_texts_longer_than_the_window_are_scored_in_strides(tmp_path, tiny_gpt2, gpt2_engine):
    long = " ".join(f"word{i % 37}" for i in range(300))
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"id": "long", "text": long}) + "\n")
    job, summary = runner.run(
        p, tiny_gpt2, ScoreParams(stride=100), output=tmp_path / "r", engine=gpt2_engine, echo=None
    )
    row = runner.load_results(job.dir).loc[0]
    n_ids = len(gpt2_engine.tokenizer(long)["input_ids"])
    assert n_ids > 256 and row.num_tokens == n_ids  # every token once, with BOS as the first one's context
    assert all(math.isfinite(x) for x in row.token_logprobs)


def test_a_pair_over_the_window_is_cut_as_score_continuations_cuts_it(tmp_path, tiny_gpt2, gpt2_engine):
    """One context-window rule (scoring.fit_context) for jobs and the Python API: the context keeps its end, and
    context + continuation may be one token over the window, since the last token is only predicted."""
    from runner.scoring import score_continuations

    context = " ".join(f"word{i % 37}" for i in range(300))
    rows = [{"id": "long", "context": context, "continuation": " and the end"},
            {"id": "too-long", "context": "Hi", "continuation": " x" * 300}]  # fmt: skip
    p = write_jsonl(tmp_path / "pairs.jsonl", rows)
    job, _ = runner.run(p, tiny_gpt2, ScoreParams(), output=tmp_path / "r", engine=gpt2_engine, echo=None,
                        skip_invalid=True)  # fmt: skip
    prompts = job.prompts().to_pylist()
    assert [r["id"] for r in prompts] == ["long"] and len(prompts[0]["input_ids"]) == 257  # window 256 + 1
    (error,) = runner.read_errors(job.dir)
    assert error["id"] == "too-long" and error["field"] == "continuation"
    assert "over the context window of 256" in error["message"]
    (expected,) = score_continuations(gpt2_engine, [(context, " and the end")])
    row = runner.load_results(job.dir).loc[0]
    assert list(row.token_logprobs) == pytest.approx(expected.token_logprobs, abs=1e-5)


def test_embed_job_gives_fixed_size_vectors(tmp_path, texts, tiny_gpt2, gpt2_engine):
    job, summary = runner.run(texts, tiny_gpt2, EmbedParams(), output=tmp_path / "v", engine=gpt2_engine, echo=None,
                              skip_invalid=True)  # fmt: skip
    df = runner.load_results(job.dir)
    assert list(df["id"]) == ["fox", "cat", "hi"]  # the context/continuation row has no text to embed
    assert pq.read_schema(valid_shards(job.dir)[0]).field("embedding").type == pa.list_(pa.float32(), 64)
    assert all(len(v) == 64 for v in df["embedding"])
    last, _ = runner.run(texts, tiny_gpt2, EmbedParams(pooling="last"), output=tmp_path / "l", engine=gpt2_engine,
                         echo=None, skip_invalid=True)  # fmt: skip
    assert list(runner.load_results(last.dir)["embedding"][0]) != list(df["embedding"][0])


@pytest.mark.parametrize("params", [ScoreParams(), EmbedParams()], ids=["score", "embed"])
def test_a_row_error_of_a_score_or_embed_job_names_its_stage(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, params
):
    """A row that breaks the device in a score (embed) job is a row error of stage score (embed), as
    read_errors says: it was listed as of stage generate, a step the job never has (adversarial pass 140)."""
    rows = [{"id": "fox", "text": "The quick brown fox"}, {"id": "cat", "text": "A cat sat"}]
    job = create_job(write_jsonl(tmp_path / "t.jsonl", rows), tiny_gpt2, params, job_dir=tmp_path / "j")
    monkeypatch.setenv("RUNNER_FAULT", "poison_row:cat")
    commit_row_error(job, gpt2_engine)
    run_until_done(job, gpt2_engine)
    errors = runner.read_errors(job.dir)
    assert [(e["id"], e["stage"], e["error"]) for e in errors] == [("cat", job.kind, "worker_crash")]


def test_score_jobs_resume_like_generation(tmp_path, texts, tiny_gpt2, gpt2_engine):
    ref, _ = runner.run(
        texts, tiny_gpt2, ScoreParams(), output=tmp_path / "ref", engine=gpt2_engine, echo=None
    )
    job = create_job(texts, tiny_gpt2, ScoreParams(), EngineOptions(batch_size=1), job_dir=tmp_path / "cut")
    calls = []
    first = run_job(
        job, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: calls.append(1) or len(calls) > 2
    )
    assert not first.finished and first.done == 2
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    a, b = runner.load_results(job.dir), runner.load_results(ref.dir)
    assert list(a["id"]) == list(b["id"]) and a["logprob"].tolist() == pytest.approx(
        b["logprob"].tolist(), abs=1e-4
    )


def test_cli_score_embed_and_submit_kind(tmp_path, texts, tiny_gpt2, runner_home):
    r = invoke("score", texts, "-m", tiny_gpt2, "-o", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert len(runner.load_results(tmp_path / "s")) == 4
    preview = invoke("results", tmp_path / "s")
    assert (
        preview.exit_code == 0
        and "perplexity" in preview.output
        and "(4 rows; --to FILE to export)" in preview.output
    )
    assert "context" in preview.output  # a pair among the texts
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "The quick brown fox"}, {"text": "Hello"}])
    assert invoke("score", plain, "-m", tiny_gpt2, "-o", tmp_path / "plain").exit_code == 0
    preview = invoke("results", tmp_path / "plain").output
    assert (
        "perplexity" in preview and "context" not in preview and "NaN" not in preview
    )  # no empty pair columns
    r = invoke("embed", texts, "-m", tiny_gpt2, "--skip-invalid", "-o", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "errors\n" in r.stderr and "tok/s" not in r.stderr  # embedding generates no tokens: no "0.0 tok/s"
    assert invoke("results", tmp_path / "e").exit_code == 0
    r = invoke("submit", texts, "-m", tiny_gpt2, "--kind", "score", "--temperature", "0.5")
    assert r.exit_code == 1 and r.output.startswith("Error: --temperature: not used by score jobs.")
    r = invoke("submit", texts, "-m", tiny_gpt2, "--kind", "score", "--no-add-bos")
    assert r.exit_code == 0 and "queued score job" in r.stderr
    r = invoke("run", texts, "-m", tiny_gpt2)
    assert r.exit_code == 1 and "prompt: missing" in r.output  # a text file is not a prompt file


# --- the demo model (the scoring math itself is tested in test_scoring.py) ------------------------------


@pytest.mark.slow  # the demo model (converted once per session, ~1 minute): `make test` runs it, test-fast not
def test_demo_model_prefers_the_true_sentence(tmp_path):
    p = write_jsonl(tmp_path / "paris.jsonl", [{"id": "paris", "text": "The capital of France is Paris."},
                                               {"id": "berlin", "text": "The capital of France is Berlin."}])  # fmt: skip
    job, _ = runner.run(p, "smollm2-135m-instruct", ScoreParams(), output=tmp_path / "out", echo=None)
    df = runner.load_results(job.dir).set_index("id")
    assert df.loc["paris", "logprob"] > df.loc["berlin", "logprob"] + 1.0


def test_a_problem_in_standard_input_is_named_so_not_as_a_temporary_file(tiny_gpt2, runner_home):
    """(found by adversarial pass 10: errors named /tmp/runner-input-.../stdin.txt)"""
    result = invoke("score", "-", "-m", tiny_gpt2, input=b"hello\n\x82\xa0\x82\xa2\n")
    assert result.exit_code == 1 and "standard input:2: the file is not UTF-8" in result.output
    assert "runner-input-" not in result.output and "stdin.txt" not in result.output
    # (no file to convert: iconv on the way in, not one naming the temporary copy)
    assert result.output.rstrip().endswith("(iconv -f CP932 -t UTF-8 converts it on its way in)")


def test_score_reads_a_txt_file_or_standard_input_one_text_per_line(tmp_path, tiny_gpt2, runner_home):
    """gpt2-score users pipe texts in (`printf ... | gpt2-score.py -`): `runner score -` and `runner score FILE.txt`
    read one text per line (a byte-order mark dropped, blank lines skipped, the id is the line number), scored
    as the same texts in JSONL are (found by a user walkthrough: both were refused)."""
    texts = ["The cat sat on the mat.", "吾輩は猫である。"]
    (tmp_path / "t.txt").write_text("\ufeff" + texts[0] + "\n\n" + texts[1] + "\r\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "text": texts[0]}, {"id": "3", "text": texts[1]}])
    stdin = texts[0] + "\n\n" + texts[1] + "\n"
    outs = []
    for source, given in ((tmp_path / "t.txt", None), ("-", stdin), (jsonl, None)):
        result = invoke("score", source, "-m", tiny_gpt2, input=given)
        assert result.exit_code == 0, result.output
        outs.append(runner.load_results(result.stdout.strip())[["id", "text", "logprob"]])
    assert list(outs[0]["id"]) == ["1", "3"] and list(outs[0]["text"]) == texts
    assert outs[0].to_json() == outs[1].to_json() == outs[2].to_json()
    assert Job.open(result.stdout.strip()).meta["input"]["path"].endswith("t.jsonl")
    assert "standard input" in [Job.open(p).meta["input"]["path"] for p in jobdir.job_folders(runner_home)]


def test_a_txt_line_of_only_full_width_spaces_is_a_blank_line(tmp_path, tiny_gpt2, runner_home):
    """A line of ideographic spaces (U+3000, what a Japanese IME types between paragraphs) or no-break spaces is
    as blank as a line of ASCII spaces: skipped. It was taken for a text, and refused as "text is only
    whitespace", so the whole file was refused (adversarial pass 173)."""
    texts = ["吾輩は猫である。", "名前はまだ無い。"]
    (tmp_path / "t.txt").write_text(
        texts[0] + "\n\u3000\u3000\n  \n\u00a0\n" + texts[1] + "\n", encoding="utf-8"
    )
    result = invoke("score", tmp_path / "t.txt", "-m", tiny_gpt2)
    assert result.exit_code == 0, result.output
    df = runner.load_results(result.stdout.strip())
    assert list(df["id"]) == ["1", "5"] and list(df["text"]) == texts
    from runner.inputs import read_text_lines

    assert read_text_lines(tmp_path / "t.txt", numbered=True) == [(1, texts[0]), (5, texts[1])]  # generate's


def test_score_print_shows_each_text_and_its_logprob_as_gpt2_score_does(tmp_path, tiny_gpt2, runner_home):
    """`printf ... | gpt2-score.py -` prints `text<TAB>logprob` per line (and each token with --tokens); `runner
    score -` printed only the job folder, the scores a second command away (new-user walkthrough). `--print`
    prints them (the folder goes to stderr), one line per row even where a text holds a tab or a line break."""
    texts = ["現在も行方不明のまま。", "現在も行方不明のママ。"]
    result = invoke("score", "-", "-m", tiny_gpt2, "--print", input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.output
    df = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1])
    assert result.stdout.splitlines() == [
        f"{t}\t{lp:.5g}" for t, lp in zip(texts, df["logprob"], strict=True)
    ]
    rows = [
        {"id": "a", "text": "tab\there\nand a line"},
        {"id": "b", "context": "Q: 1+1?", "continuation": " 2"},
    ]
    result = invoke("score", write_jsonl(tmp_path / "t.jsonl", rows), "-m", tiny_gpt2, "--tokens")
    assert result.exit_code == 0, result.output
    df = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1])
    lines = result.stdout.splitlines()
    first, pair = df.iloc[0], df.iloc[1]

    def escaped(token):
        return token.replace("\t", "\\t").replace("\n", "\\n")

    assert lines[0] == f"tab\\there\\nand a line\t{first['logprob']:.5g}"
    assert lines[1 : 1 + first["num_tokens"]] == [
        f"{escaped(t)}\t{lp:.5g}" for t, lp in zip(first["tokens"], first["token_logprobs"], strict=True)
    ]
    assert lines[1 + first["num_tokens"]] == f"Q: 1+1?\t 2\t{pair['logprob']:.5g}"
    assert len(lines) == 2 + first["num_tokens"] + pair["num_tokens"]


def test_embed_print_shows_each_vector_as_gpt2_transform_does(tiny_gpt2, runner_home):
    """`gpt2-transform.py --context="..."` prints the text's vector as a list; `runner embed -` printed only the
    job folder. `--print` prints each row's vector as a JSON list, one line per row in input order, every
    float32 value in full (the folder goes to stderr)."""
    texts = ["江戸時代のインターネット回線", "The capital of France", "短い"]
    result = invoke("embed", "-", "-m", tiny_gpt2, "--print", input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.output
    df = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1])
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(printed) == len(texts) and len(printed[0]) == len(df["embedding"][0]) > 0
    assert printed == [[float(v) for v in vector] for vector in df["embedding"]]
    assert printed[0] != printed[1]


def test_score_print_keeps_a_row_on_one_line_whatever_breaks_lines_in_its_text(
    tmp_path, tiny_gpt2, runner_home
):
    """`--print` escaped only tabs and line breaks: a form feed, a vertical tab, U+2028/U+2029 (Python's
    `splitlines`, JavaScript and some editors break lines there) or an ESC sequence (a terminal's colours) in a
    text went out as they were, one row over several lines or a recoloured terminal. Each is written escaped."""
    rows = [{"id": "a", "text": "one\x0ctwo\x0bthree\u2028four\u2029five\x1b[31mred\x85six 日本語"}]
    result = invoke("score", write_jsonl(tmp_path / "t.jsonl", rows), "-m", tiny_gpt2, "--print")
    assert result.exit_code == 0, result.output
    logprob = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1])["logprob"][
        0
    ]
    assert result.stdout.splitlines() == [
        f"one\\x0ctwo\\x0bthree\\u2028four\\u2029five\\x1b[31mred\\x85six 日本語\t{logprob:.5g}"
    ]


def test_score_tokens_show_the_bytes_of_a_token_that_only_starts_a_character(tiny_gpt2, runner_home):
    """Under a byte-level BPE most Japanese characters span two or three tokens: all but the last hold only some of the
    character's bytes, and its text is "" (the character shows on the token that completes it). `--tokens`
    printed such a token as a blank piece (new-user walkthrough, pass 85); it prints its bytes ("\\xe5\\x90")."""
    text = "完全の域に達することは難い。"
    result = invoke("score", "-", "-m", tiny_gpt2, "--tokens", input=text + "\n")
    assert result.exit_code == 0, result.output
    df = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1])
    row = df.iloc[0]
    lines = result.stdout.splitlines()[1:]
    assert len(lines) == row["num_tokens"]
    starts = 0
    for line, piece, raw in zip(lines, row["tokens"], row["token_bytes"], strict=True):
        shown = line.split("\t")[0]
        assert shown, line  # never a blank piece
        if piece:
            assert shown == piece
        else:
            starts += 1
            assert shown == "".join(f"\\x{b:02x}" for b in bytes(raw))
    assert starts > 0  # the tiny tokenizer does split these characters
    assert "".join(row["tokens"]) == text


def test_score_tokens_show_sentencepieces_space_in_front_of_a_text_as_its_mark(tiny_llama, runner_home):
    """A SentencePiece tokenizer puts "▁" in front of a text ("Hello" -> "▁", "H", ...); that token reads as
    nothing in the text, and `--tokens` printed it as its bytes, "\\x20", as if it were part of a character. It
    prints SentencePiece's own mark, "▁" (so does `runner generate --prompt-logprobs`)."""
    result = invoke("score", "-", "-m", tiny_llama, "--tokens", input="Hello,  world\n")
    assert result.exit_code == 0, result.output
    row = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1]).iloc[0]
    assert row["tokens"][0] == "" and bytes(row["token_bytes"][0]) == b" "  # (the tiny tokenizer does so)
    lines = result.stdout.splitlines()[1:]
    assert lines[0].split("\t")[0] == "\u2581" and "\\x20" not in result.stdout
    shown = invoke("generate", "Hello", "-m", tiny_llama, "--max-new-tokens", 1, "--prompt-logprobs").output
    assert "'\u2581':" in shown and "b' '" not in shown


def test_progress_lines_show_tok_s_only_where_tokens_are_counted():
    """An embedding job's progress read "0.0 tok/s" all along (new-user walkthrough): without tokens it shows rows/s
    only; a generation's line shows tok/s from its first steps, even before a row ends."""
    from runner.progress import Progress

    embed = Progress(10, counts_tokens=False)
    embed.update(4, 0)
    assert "tok/s" not in embed.line() and "rows/s" in embed.line()
    generate = Progress(10)
    generate.update(0, 12)
    assert "tok/s" in generate.line()
    assert "tok/s" in Progress(10).line()  # nothing yet: the figure starts at 0
    # a row that ended at its first token (made by the prompt pass, counted when the batch settles) is no
    # embedding: the generation's line kept no tok/s then (user walkthrough, pass 195)
    ended_early = Progress(10)
    ended_early.update(1, 0)
    assert "tok/s" in ended_early.line()


def test_an_embed_jobs_progress_shows_no_tok_s_and_a_generations_does(
    tmp_path, texts, tiny_gpt2, gpt2_engine
):
    """The worker tells its progress whether the job makes tokens, from the job's kind."""
    for params, shown in [(EmbedParams(), False), (runner.GenerationParams(max_new_tokens=1), True)]:
        lines: list[str] = []
        runner.run(texts, tiny_gpt2, params, output=tmp_path / type(params).__name__, engine=gpt2_engine,
                   echo=lines.append, skip_invalid=True, progress_every=1e-9,
                   **({} if isinstance(params, EmbedParams) else {"prompt_field": "text"}))  # fmt: skip
        progress = [line for line in lines if "rows/s" in line]
        assert progress and all(("tok/s" in line) is shown for line in progress), lines


def test_score_print_stopped_early_keeps_standard_output_for_scores(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A `--print` run that stops before its end (Ctrl-C, a cancel from elsewhere) names its folder on stderr:
    standard output is the scores' (review)."""
    import runner.scheduler as scheduler
    from runner.worker import RunSummary

    real = scheduler.run

    def stopped(*args, **kwargs):
        job, _ = real(*args, **{**kwargs, "stop": lambda: True})
        return job, RunSummary(job.id, 0, 2, 0, 0, 0.0, 0, False, stopped=True)

    monkeypatch.setattr(scheduler, "run", stopped)
    result = invoke("score", "-", "-m", tiny_gpt2, "--print", input="one\ntwo\n")
    assert result.exit_code == 1 and result.stdout == "" and "results in " in result.stderr, result.output


def test_a_pair_split_inside_a_token_is_scored_or_refused_never_a_crash(
    tmp_path, tiny_gpt2, tiny_llama, gpt2_engine, llama_engine
):
    """("th", "e") encodes as one token "the": the continuation had no token after the context's, and the job
    died on a ZeroDivisionError traceback at its first commit, every resume again (adversarial pass 157).
    Under GPT-2's byte-level BPE the continuation is scored as its own tokens; where those do not spell it
    (sentencepiece's alone start with a space) the row is refused naming its continuation."""
    rows = [{"id": "seam", "context": "th", "continuation": "e"},
            {"id": "ok", "context": "The cat", "continuation": " sat"}]  # fmt: skip
    p = write_jsonl(tmp_path / "pairs.jsonl", rows)
    job, summary = runner.run(
        p, tiny_gpt2, ScoreParams(), output=tmp_path / "g", engine=gpt2_engine, echo=None
    )
    df = runner.load_results(job.dir).set_index("id")
    assert summary.finished and df.loc["seam", "num_tokens"] == 1 and list(df.loc["seam", "tokens"]) == ["e"]
    llama_rows = [{"id": "seam", "context": "t", "continuation": "he"}, rows[1]]
    p = write_jsonl(tmp_path / "llama.jsonl", llama_rows)
    job, summary = runner.run(p, tiny_llama, ScoreParams(), output=tmp_path / "l", engine=llama_engine, echo=None,
                              skip_invalid=True)  # fmt: skip
    assert summary.finished and list(runner.load_results(job.dir)["id"]) == ["ok"]
    (error,) = runner.read_errors(job.dir)
    assert (
        error["id"] == "seam" and error["field"] == "continuation" and "across the seam" in error["message"]
    )


def test_truncate_left_is_refused_for_a_score_job(tmp_path, texts, tiny_gpt2, runner_home):
    """`runner score --truncate left` was taken and did nothing: a long text is scored whole in windows and a
    pair's context is cut anyway, so a user asking to keep the end got every token scored (adversarial pass
    157). It is refused naming the option, as the other options score jobs do not use."""
    r = invoke("score", texts, "-m", tiny_gpt2, "--truncate", "left")
    assert r.exit_code == 1 and r.output.startswith("Error: --truncate: not used by score jobs"), r.output
    assert "--stride" in r.output
    with pytest.raises(runner.ParamError, match="not used by score jobs"):
        create_job(texts, tiny_gpt2, ScoreParams(), truncate="left", job_dir=tmp_path / "j")
    assert invoke("embed", texts, "-m", tiny_gpt2, "--truncate", "left", "--skip-invalid").exit_code == 0


def test_repair_reads_the_input_of_a_job_of_before_as_its_submit_did(tmp_path, tiny_gpt2, runner_home):
    """`runner repair` rebuilds prompts.parquet and errors.jsonl from the input, and keeps them only if their
    sha256 is the one job.json holds: a job submitted before Parquet columns kept their types (a float32 column
    was float64) and before a .txt line of U+3000 was blank (refused, in errors.jsonl under --skip-invalid) is
    read as it was, or its damaged files could never be restored (review of pass 173)."""
    import dataclasses

    from runner.jobs import _rewrite_inputs

    pq.write_table(
        pa.table({"text": ["a b", "c d"], "p": pa.array([0.1, 0.7], pa.float32())}), tmp_path / "f.parquet"
    )
    (tmp_path / "t.txt").write_text("hello there\n\u3000\u3000\nworld again\n", encoding="utf-8")
    for name, typ, invalid in (("f.parquet", pa.float64(), 0), ("t.txt", None, 1)):
        job = create_job(tmp_path / name, tiny_gpt2, ScoreParams(), skip_invalid=True)
        assert job.meta["input"]["reading"] == READING and job.meta["input"]["invalid"] == 0
        meta = {**job.meta, "input": {k: v for k, v in job.meta["input"].items() if k != "reading"}}
        before = Job(job.dir, dataclasses.replace(job.spec, meta=meta))  # as job.json of before holds it
        out = tmp_path / f"re-{name}"
        out.mkdir()
        _rewrite_inputs(before, out)
        if typ is not None:
            assert pq.read_schema(out / "prompts.parquet").field("p").type == typ
        errors = (out / jobdir.INVALID).read_text().splitlines() if invalid else []
        assert [json.loads(e)["line"] for e in errors] == ([2] if invalid else [])


def test_repair_rebuilds_a_generate_job_of_before_without_an_endpoint_per_row(tmp_path, tiny_gpt2):
    """A generate job's prompts.parquet records each plain row's `--format openai` endpoint since reading 2: a
    job of before is rebuilt by `runner repair` without it, or its checksum would never match again."""
    import dataclasses

    from runner.jobs import _rewrite_inputs

    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "prompt": "Hello"}\n', encoding="utf-8")
    job = create_job(path, tiny_gpt2, job_dir=tmp_path / "job")
    out = tmp_path / "now"
    out.mkdir()
    _rewrite_inputs(job, out)  # a job of now: the same bytes as its submit wrote
    assert storage.file_sha256(out / "prompts.parquet") == job.meta["prompts_sha256"]
    meta = {**job.meta, "input": {k: v for k, v in job.meta["input"].items() if k != "reading"}}
    out = tmp_path / "before"
    out.mkdir()
    _rewrite_inputs(Job(job.dir, dataclasses.replace(job.spec, meta=meta)), out)
    assert pq.read_table(out / "prompts.parquet").column("request").to_pylist() == [None]


def test_a_txt_line_of_information_separators_is_not_blank(tmp_path):
    """str.strip drops \\x1c-\\x1f, which are not blank (`_text_lines`): a line of them stays a row (refused as
    only whitespace), not silently skipped as a line of U+3000 is."""
    from runner.inputs import iter_text, read_text_lines

    (tmp_path / "t.txt").write_text("a\n\x1e\n\u3000\nb\n", encoding="utf-8")
    assert [n for n, _, _ in iter_text(tmp_path / "t.txt", "text")] == [1, 2, 4]
    assert read_text_lines(tmp_path / "t.txt") == ["a", "\x1e", "b"]


def test_a_pair_whose_context_encodes_to_no_tokens_is_scored_not_a_crash(tmp_path, tiny_llama):
    """A pair whose context a tokenizer normalises away was submitted beginning its score at token 0, and each
    run of the job died on score_batch's ValueError, the other rows of its batch never scored (adversarial pass
    225). Its context is the empty one: the BOS."""
    from helpers import normalising_copy

    path = normalising_copy(tiny_llama, tmp_path / "llama", "\u200b")
    rows = [{"id": "zw", "context": "\u200b", "continuation": " Hello"},
            {"id": "empty", "context": "", "continuation": " Hello"},
            {"id": "ok", "context": "Hi", "continuation": " there"}]  # fmt: skip
    job, summary = runner.run(write_jsonl(tmp_path / "p.jsonl", rows), str(path), ScoreParams(),
                              output=tmp_path / "s", echo=None)  # fmt: skip
    assert summary.finished and runner.read_errors(job.dir) == []
    df = runner.load_results(job.dir).set_index("id")
    assert list(df.index) == ["zw", "empty", "ok"] and df.loc["zw", "context"] == "\u200b"
    assert list(df.loc["zw", "token_ids"]) == list(df.loc["empty", "token_ids"])
    assert df.loc["zw", "logprob"] == pytest.approx(df.loc["empty", "logprob"], abs=1e-4)


def test_a_perplexity_past_the_float_range_is_written_as_inf(tmp_path, tiny_gpt2, test_device):
    """A text whose mean log-prob is below -709.78 (a model of large logits: here its final norm scaled up)
    has a perplexity past float64: math.exp raised OverflowError as the shard was written, and the job died at
    each commit, every row of the unit lost (adversarial pass 225). It is inf; log-probs stay finite."""
    import torch

    from runner.engine import Engine

    engine = Engine(tiny_gpt2, EngineOptions(device=test_device))
    with torch.no_grad():
        engine.model.transformer.ln_f.weight.mul_(3000.0)
    rows = [{"id": "hot", "text": "Hello world"}, {"id": "fox", "text": "The quick brown fox"}]
    job, summary = runner.run(write_jsonl(tmp_path / "t.jsonl", rows), tiny_gpt2, ScoreParams(),
                              output=tmp_path / "s", engine=engine, echo=None)  # fmt: skip
    assert summary.finished and summary.done == 2
    df = runner.load_results(job.dir)
    assert all(math.isfinite(lp) for lps in df["token_logprobs"] for lp in lps)
    assert (df["mean_logprob"] < -710).any() and (df["perplexity"] == math.inf).any()
    for row in df.itertuples():
        assert row.perplexity == (
            math.inf if row.mean_logprob < -710 else pytest.approx(math.exp(-row.mean_logprob))
        )
    assert invoke("results", job.dir, "--to", tmp_path / "out.csv").exit_code == 0
    assert invoke("results", job.dir, "--to", tmp_path / "out.jsonl").exit_code == 0
    assert invoke("report", job.dir, "-o", tmp_path / "r.html").exit_code == 0


def test_a_continuation_or_text_that_encodes_to_no_tokens_is_refused_as_such(tmp_path, tiny_llama):
    """A continuation the tokenizer deletes whole was refused as a token across the seam, "split the pair where
    a token ends", and such a text as needing "a context token before it" (adversarial pass 225): each is
    refused for what it is, encoding to no tokens."""
    from helpers import normalising_copy

    from runner.engine import Engine
    from runner.scoring import score_continuations

    path = normalising_copy(tiny_llama, tmp_path / "llama", "\u200b")
    rows = [{"id": "cont", "context": "Hi", "continuation": "\u200b"},
            {"id": "alone", "context": "", "continuation": "\u200b\u200b"},
            {"id": "text", "text": "\u200b"}, {"id": "ok", "text": "Hello"}]  # fmt: skip
    job, summary = runner.run(write_jsonl(tmp_path / "p.jsonl", rows), str(path), ScoreParams(),
                              output=tmp_path / "s", echo=None, skip_invalid=True)  # fmt: skip
    assert summary.finished and list(runner.load_results(job.dir)["id"]) == ["ok"]
    got = {e["id"]: (e["field"], e["message"]) for e in runner.read_errors(job.dir)}
    assert got == {"cont": ("continuation", "continuation encodes to no tokens (the tokenizer deletes its characters)"),
                   "alone": ("continuation", "continuation encodes to no tokens (the tokenizer deletes its characters)"),
                   "text": ("text", "text encodes to no tokens (the tokenizer deletes its characters)")}  # fmt: skip
    engine = Engine(str(path), EngineOptions(device="cpu"))
    with pytest.raises(runner.RunnerError, match=r"^pairs\[0\]: continuation encodes to no tokens"):
        score_continuations(engine, [("Hi", "\u200b")])


def test_repair_prepares_a_score_job_read_before_6_as_its_submit_did(tmp_path, tiny_llama):
    """Since reading 6 a pair whose context encodes to no tokens is scored after the BOS and a continuation of
    no tokens is refused as such: `runner repair` of a job read before rebuilds its prompts.parquet and
    errors.jsonl as its submit wrote them (context [], the seam message), or their checksums never match."""
    import dataclasses

    from helpers import normalising_copy

    from runner.jobs import _rewrite_inputs

    path = normalising_copy(tiny_llama, tmp_path / "llama", "\u200b")
    rows = [{"id": "zw", "context": "\u200b", "continuation": " Hello"},
            {"id": "cont", "context": "Hi", "continuation": "\u200b"}]  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), str(path), ScoreParams(), skip_invalid=True)
    for reading, score_from, message in ((READING, 1, "encodes to no tokens"), (5, 0, "across the seam")):
        meta = {**job.meta, "input": {**job.meta["input"], "reading": reading}}
        out = tmp_path / f"re-{reading}"
        out.mkdir()
        _rewrite_inputs(Job(job.dir, dataclasses.replace(job.spec, meta=meta)), out)
        assert pq.read_table(out / "prompts.parquet").column("score_from").to_pylist() == [score_from]
        (error,) = [json.loads(e) for e in (out / jobdir.INVALID).read_text().splitlines()]
        assert error["id"] == "cont" and message in error["message"]
