"""`runner generate` (a quick try, nothing saved) and `--chat` (plain prompts through the chat template)."""

import io
import re

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams
from runner.quick import read_prompts_arg


def test_generate_prints_text_and_matches_the_engine(tiny_gpt2, gpt2_engine):
    params = GenerationParams(max_new_tokens=5, temperature=0.9, num_return_sequences=2, seed=3)
    first = runner.generate(["The old man", "Every student"], tiny_gpt2, params, engine=gpt2_engine)
    again = runner.generate(["The old man", "Every student"], tiny_gpt2, params, engine=gpt2_engine)
    assert [[c.token_ids for c in s] for s in first] == [
        [c.token_ids for c in s] for s in again
    ]  # repeatable
    assert [len(s) for s in first] == [2, 2]
    result = invoke("generate", "The old man", "-m", tiny_gpt2, "--max-new-tokens", 5, "--greedy")
    assert result.exit_code == 0, result.output
    greedy = gpt2_engine.generate(
        [gpt2_engine.tokenizer("The old man")["input_ids"]], GenerationParams(max_new_tokens=5)
    )
    assert result.output.strip() == f"[The old man] {greedy[0].text}"
    # --show-logprobs: each token's text in place (as quoted Python strings) with its log-prob
    result = invoke(
        "generate", "The old man", "-m", tiny_gpt2, "--max-new-tokens", 5, "--greedy", "--show-logprobs"
    )
    c = greedy[0]
    pieces = gpt2_engine.texts.pieces(c.token_ids, gpt2_engine.tokenizer("The old man")["input_ids"])
    raws = gpt2_engine.texts.bytes(c.token_ids)
    shown = [t if t.replace("\ufffd", "") else b for t, b in zip(pieces, raws, strict=True)]  # b: split bytes
    expected = " ".join(f"{t!r}:{lp:.2f}" for t, lp in zip(shown, c.token_logprobs, strict=True))
    assert result.output.splitlines()[1].strip() == expected
    # the text holds back a character the limit cut; its token still shows, as "\ufffd"
    assert "".join(pieces) in (c.text, c.text + "\ufffd")


def test_show_logprobs_shows_a_token_holding_part_of_a_character_as_its_bytes(gpt2_engine):
    """`runner generate --show-logprobs` showed a token holding the first bytes of a Japanese character (GPT-2's
    byte-level BPE splits most) as '' and, where the length cut the character, as '\ufffd': a row of blanks
    for a Japanese prompt, where `runner score --tokens` shows such a token's bytes. It shows them too, as a
    bytes literal beside the quoted texts."""
    from runner.engine import Completion
    from runner.quick import logprobs_lines

    texts, tok = gpt2_engine.texts, gpt2_engine.tokenizer
    ids = tok("日本語の文章")["input_ids"]
    ids = ids[: max(i for i in range(len(ids)) if texts.pieces(ids[: i + 1])[-1].endswith("\ufffd")) + 1]
    c = Completion(
        ids, [-0.5] * len(ids), "", "length", None, tokens=texts.pieces(ids), token_bytes=texts.bytes(ids)
    )
    shown = logprobs_lines(c, True)[0].strip().split(" ")
    partial = [i for i, t in enumerate(c.tokens) if t == "" or t.endswith("\ufffd")]
    assert len(partial) >= 2 and partial[-1] == len(ids) - 1
    assert all(shown[i] == f"{c.token_bytes[i]!r}:-0.50" for i in partial)  # b'\xe6\x97':-0.50
    assert all(shown[i] == f"{t!r}:-0.50" for i, t in enumerate(c.tokens) if i not in partial)
    assert (
        "''" not in logprobs_lines(c, True)[0].strip() and "\ufffd" not in logprobs_lines(c, True)[0].strip()
    )


def test_generate_prints_the_alternatives_and_prompt_logprobs_it_was_asked_for(tiny_gpt2, gpt2_engine):
    """`runner generate --logprobs 3` and `--prompt-logprobs` computed them and printed nothing of them (a try
    saves nothing, so they were lost): a line per token now shows its 3 most likely alternatives, and a
    `prompt:` line each prompt token's log-prob, as `runner.generate` returns them."""
    args = ["The old man", "-m", tiny_gpt2, "--max-new-tokens", 4, "--greedy"]
    result = invoke("generate", *args, "--logprobs", 3, "--prompt-logprobs")
    assert result.exit_code == 0, result.output
    (c,) = runner.generate("The old man", tiny_gpt2, GenerationParams(max_new_tokens=4, logprobs=3,
                                                                      prompt_logprobs=True), engine=gpt2_engine)[0]  # fmt: skip
    lines = result.output.splitlines()[1:]
    prompt = [lp for lp in c.prompt_logprobs]
    assert lines[0].startswith("    prompt: ") and lines[0].count(":") == 1 + len(prompt)
    assert lines[0].endswith(f":{prompt[-1]:.2f}") and ":-" in lines[0].split()[1]  # (the first has none)
    assert len(lines) == 1 + len(c.token_ids)
    for line, lp, step in zip(lines[1:], c.token_logprobs, c.top_logprobs, strict=True):
        chosen, alts = line.strip().split(" | ")
        assert chosen.endswith(f":{lp:.2f}") and len(step) >= 3
        assert re.findall(r":(-?[0-9.]+)(?: |$)", alts) == [f"{a[1]:.2f}" for a in step]


def test_generate_help_speaks_of_what_generate_does():
    """`runner generate --help` read as a job's: --max-new-tokens named an OpenAI Batch file's default (generate
    takes no Batch file), --seed said "a job picks one", --logprobs and --prompt-logprobs "keep" what a try
    keeps nowhere, --chat-template spoke of 'messages' rows. A job's commands still say so."""
    shown = " ".join(invoke("generate", "--help").output.split())
    assert "Tokens to generate per sample [default: 64]." in shown and "Batch" not in shown
    assert "[default: 0, the same samples each try]" in shown and "a job picks" not in shown
    assert "Also print the K most likely alternatives" in shown and "Also print the log-prob" in shown
    assert "'messages'" not in shown and "keep the K" not in shown
    job = " ".join(invoke("run", "--help").output.split())
    assert (
        "OpenAI Batch file's requests that set no max_tokens" in job and "a job picks one and keeps it" in job
    )
    assert "Also keep the K most likely alternatives" in job


def test_generate_reads_stdin_and_txt_files(tmp_path, tiny_gpt2):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    result = invoke(
        "generate", "-", tmp_path / "p.txt", "-m", tiny_gpt2, "--max-new-tokens", 2, input="zero\n"
    )
    assert result.exit_code == 0, result.output
    assert [ln.split("]")[0] for ln in result.output.splitlines()] == ["[zero", "[one", "[two"]


@pytest.mark.parametrize("empty", ["", "  \n"])
def test_generate_refuses_an_empty_prompt_naming_it_before_loading_the_model(tiny_gpt2, monkeypatch, empty):
    """As `runner run` refuses an empty prompt: not a reshape error from the engine's prefill."""
    import runner.engine

    monkeypatch.setattr(runner.engine, "Engine", None)  # loading the model would fail the test
    with pytest.raises(runner.RunnerError, match=r"^prompt 2 is empty$"):
        runner.generate(["Hello", empty], tiny_gpt2)
    result = invoke("generate", "Hello", empty, "-m", tiny_gpt2, "--max-new-tokens", 2)
    assert result.exit_code == 1 and result.output == "Error: prompt 2 is empty\n"


def test_generate_refuses_a_prompt_of_no_tokens(tiny_gpt2, gpt2_engine, monkeypatch):
    monkeypatch.setattr("runner.batching.encode", lambda tokenizer, text, chat: [])
    with pytest.raises(runner.RunnerError, match=r"^prompt 1 encodes to no tokens$"):
        runner.generate(["Hello"], tiny_gpt2, engine=gpt2_engine)


@pytest.mark.parametrize("name", ["missing.txt", "prompts.JSONL", "data/p.csv", "p.parquet"])
def test_generate_refuses_a_file_name_that_is_not_there_rather_than_use_it_as_a_prompt(tiny_gpt2, name):
    result = invoke("generate", name, "-m", tiny_gpt2, "--max-new-tokens", 2)
    assert result.exit_code == 1 and result.output == (
        f"Error: no such file: {name}; to generate for this text itself, give it on standard input "
        f"(echo {name} | runner generate - -m MODEL)\n"
    )


def test_generate_sends_a_prompt_file_to_run_and_takes_text_that_only_ends_like_one(tmp_path, tiny_gpt2):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    result = invoke("generate", path, "-m", tiny_gpt2, "--max-new-tokens", 2)
    assert result.exit_code == 1 and result.output == (
        f"Error: {path}: generate reads prompts from .txt files (one per line); "
        f"run a .jsonl file with `runner run {path} -m MODEL`\n"
    )
    assert read_prompts_arg(["What is in notes.txt", "missing.txt\n"]) == [
        "What is in notes.txt",
        "missing.txt\n",
    ]


def test_a_txt_file_is_read_by_generate_as_jobs_read_it(tmp_path):
    """One reader for .txt: lines end at \\n only (a U+2028 pasted from a web page stays inside its prompt),
    blank lines are skipped, and `runner generate FILE.txt` gets the prompts a job of that file gets."""
    from runner.inputs import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("one\u2028prompt\r\n\n  \nsecond\x1cstill\n", encoding="utf-8")
    assert read_prompts_arg([str(path)]) == ["one\u2028prompt", "second\x1cstill"]
    assert [r.prompt for r in read_prompts(path).rows] == read_prompts_arg([str(path)])
    # a path with a space ("My Drive/p.txt") that is there is the file, not a prompt of its name (pass 48)
    spaced = tmp_path / "My Drive" / "p.txt"
    spaced.parent.mkdir()
    spaced.write_text("first\nsecond\n")
    assert read_prompts_arg([str(spaced)]) == ["first", "second"]
    assert read_prompts_arg([str(tmp_path / "My Drive" / "missing.txt")]) == [
        str(tmp_path / "My Drive" / "missing.txt")
    ]


def test_a_txt_file_with_a_byte_order_mark_does_not_send_it_as_text(tmp_path, tiny_gpt2, gpt2_engine):
    """Notepad's UTF-8 starts with EF BB BF: it is no part of the first prompt (JSONL and CSV drop it too)."""
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffThe old man\nHello\n".encode())
    assert read_prompts_arg([str(path)]) == ["The old man", "Hello"]
    result = invoke("generate", path, "-m", tiny_gpt2, "--max-new-tokens", 3, "--greedy")
    greedy = runner.generate(
        ["The old man"], tiny_gpt2, GenerationParams(max_new_tokens=3), engine=gpt2_engine
    )
    assert result.exit_code == 0 and result.output.splitlines()[0] == f"[The old man] {greedy[0][0].text}"


@pytest.mark.parametrize(("encoding", "guess"), [("cp932", "Shift-JIS/CP932"), ("utf-16", "UTF-16")])
def test_a_txt_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, tiny_gpt2, encoding, guess):
    path = tmp_path / "p.txt"
    path.write_bytes("吾輩は猫である\nこんにちは\n".encode(encoding))
    result = invoke("generate", path, "-m", tiny_gpt2, "--max-new-tokens", 2)
    iconv = {"cp932": "CP932", "utf-16": "UTF-16"}[encoding]
    assert result.exit_code == 1 and result.output == (
        f"Error: cannot read the prompt file: {path}:1: the file is not UTF-8 (it looks like {guess}); save it as "
        f"UTF-8 (iconv -f {iconv} -t UTF-8 {path} > {tmp_path / 'p-utf8.txt'})\n"
    )


def test_chat_wraps_plain_prompts_and_a_raw_prompt_to_a_chat_model_is_warned(
    tmp_path, tiny_llama, runner_home
):
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello there"}])
    result = invoke("submit", p, "-m", tiny_llama)
    assert (
        result.exit_code == 0
        and "WARNING: the model has a chat template" in result.stderr
        and "--chat" in result.stderr
    )
    result = invoke("submit", p, "-m", tiny_llama, "--chat")
    assert result.exit_code == 0 and "WARNING" not in result.stderr
    job = runner.open_job(result.stdout.strip())
    assert (
        job.prompts().column("prompt")[0].as_py()
        == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    result = invoke("submit", p, "-m", tiny_llama, "--chat", "--kind", "score")
    assert result.exit_code == 1 and "--chat: chat is for generate jobs" in result.output


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2"]], ids=["loop", "beams"])
def test_generate_refuses_a_prompt_over_the_context_window_as_submit_does(tiny_gpt2, gpt2_engine, extra):
    """The same rule and message as submit (GenerationParams.prompt_budget), not an IndexError from GPT-2's
    position embedding; for our loop and for transformers' beam search alike."""
    prompt = "x" + " x" * 300  # 301 tokens; the tiny GPT-2 has 256 positions
    n = len(gpt2_engine.tokenizer(prompt)["input_ids"])
    result = invoke("generate", "ok", prompt, "-m", tiny_gpt2, "--max-new-tokens", 4, *extra)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: prompt 2 is {n} tokens; with max_new_tokens=4 it exceeds the model's context window of 256 "
        "tokens (shorten it, lower --max-new-tokens, or pass --truncate left)\n"
    )


def test_generate_truncate_left_keeps_the_end_of_the_prompt_as_a_job_does(tmp_path, tiny_gpt2):
    """`runner generate` tries a night's settings: with --truncate left a prompt over the window answers as the
    same job's row does (it had no --truncate: such a prompt could not be tried)."""
    prompt = " ".join(f"w{i}" for i in range(400))  # far over the tiny GPT-2's 256 positions
    args = ["-m", tiny_gpt2, "--max-new-tokens", 5, "--greedy", "--truncate", "left"]
    tried = invoke("generate", prompt, *args)
    assert tried.exit_code == 0, tried.output
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt}])
    ran = invoke("run", path, *args, "-o", tmp_path / "job")
    assert ran.exit_code == 0, ran.output
    completion = runner.load_results(tmp_path / "job")["text"][0]
    assert tried.stdout == f"[{prompt[:40]}] {completion}\n"
    refused = invoke("generate", prompt, *args[:-2])
    assert refused.exit_code == 1 and "or pass --truncate left" in refused.output
    with pytest.raises(runner.RunnerError, match="truncate must be none or left, got 'right'"):
        runner.generate(["Hello"], tiny_gpt2, truncate="right")  # checked as submit checks it, before loading


def test_prompt_text_that_is_not_utf8_is_one_line_naming_where_it_came_from(tiny_gpt2):
    """Shift-JIS on standard input (or in an argument) is named as such, as in a .txt file, not a tokenizer
    TypeError traceback (found by adversarial pass 9)."""
    import subprocess
    import sys

    import workers

    sjis = "こんにちは".encode("cp932")
    for args, given in ((["-"], sjis + b"\n"), ([sjis], b"")):
        proc = subprocess.run([sys.executable.encode(), b"-m", b"runner", b"generate", *[a if isinstance(a, bytes)
                               else a.encode() for a in args], b"-m", str(tiny_gpt2).encode()], input=given,
                              capture_output=True, env=workers.worker_env(), cwd=workers.ROOT)  # fmt: skip
        err = proc.stderr.decode()
        assert proc.returncode == 1 and "Traceback" not in err, err
        # (standard input read as `runner run -` reads it: its message too)
        assert (
            "is not UTF-8 (it looks like Shift-JIS/CP932)" in err and "standard input" in err or args != ["-"]
        )
        assert "is not UTF-8 (it looks like Shift-JIS/CP932); send it as UTF-8" in err or args == ["-"]


def test_a_sampled_try_of_a_txt_file_is_the_jobs_rows(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """`runner generate p.txt --seed 3` seeded each sample from the prompt's place from 0, a job from its row id
    (the .txt line number): a sampled try did not carry over to the night's job (pass 44). Both use the id a
    job gives, a blank line included."""
    path = tmp_path / "p.txt"
    path.write_text("The old man\n\nEvery student knows\nA cat\n")
    common = ("-m", tiny_gpt2, "--max-new-tokens", 6, "--temperature", "0.9", "--seed", 3, "-n", 2)
    tried = invoke("generate", path, *common)
    assert tried.exit_code == 0, tried.output
    assert invoke("run", path, *common, "-o", tmp_path / "out").exit_code == 0
    df = runner.load_results(tmp_path / "out")
    assert list(df["id"]) == ["1", "1", "3", "3", "4", "4"]
    job_lines = [
        f"[{p[:40]}] #{s} {t}" for p, s, t in zip(df["prompt"], df["sample"], df["text"], strict=True)
    ]
    assert tried.output == "".join(f"{line}\n" for line in job_lines)
    # standard input as `runner run -` reads it (only \n ends a line), and several places numbered in order
    from runner.quick import read_prompts_with_ids

    monkeypatch.setattr(
        "sys.stdin", io.TextIOWrapper(io.BytesIO("First\x0cpage\nSecond\u2028line\n\nThird\n".encode()))
    )
    assert read_prompts_with_ids(["-"]) == [("1", "First\x0cpage"), ("2", "Second\u2028line"), ("4", "Third")]
    assert [i for i, _ in read_prompts_with_ids([str(path), "A cat", str(path)])] == [
        str(i) for i in range(1, 8)
    ]


def test_a_typed_backslash_n_in_a_prompt_argument_is_a_line_break_as_in_template(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """`runner generate "Q: What is 2+2?\\nA:"` (a QA prompt as the README's --template writes it) sent a
    backslash and an n, which --template and --stop take as a line break; the printed head then could not tell
    the two apart. A file's lines stay as they are (data)."""
    assert read_prompts_arg(["Q: hi\\nA:", "a\\tb", "C:\\\\new"]) == ["Q: hi\nA:", "a\tb", "C:\\new"]
    (tmp_path / "p.txt").write_text("Q: hi\\nA:\n")
    assert read_prompts_arg([str(tmp_path / "p.txt")]) == ["Q: hi\\nA:"]
    result = invoke("generate", "Q: hi\\nA:", "-m", tiny_gpt2, "--max-new-tokens", 3, "--greedy")
    assert result.exit_code == 0, result.output
    greedy = gpt2_engine.generate(
        [gpt2_engine.tokenizer("Q: hi\nA:")["input_ids"]], GenerationParams(max_new_tokens=3)
    )
    assert result.output.startswith(f"[Q: hi\\nA:] {greedy[0].text}")  # the head on one line


def test_generate_of_an_empty_txt_file_or_standard_input_names_it_not_a_missing_prompt(tmp_path, tiny_gpt2):
    """`runner generate - < empty` (a Colab cell piping nothing) and a .txt file of blank lines said "no prompt
    given (a prompt, '-' for standard input, or a .txt file)", as if neither had been given (pass 195)."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\u3000\n", encoding="utf-8")
    said = invoke("generate", blank, "-m", tiny_gpt2)
    assert (
        said.exit_code == 1 and said.output == f"Error: no prompt in {blank} (empty, or only blank lines)\n"
    )
    said = invoke("generate", "-", "-m", tiny_gpt2, input="")
    assert (
        said.exit_code == 1
        and said.output == "Error: no prompt in standard input (empty, or only blank lines)\n"
    )
