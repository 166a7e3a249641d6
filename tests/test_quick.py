"""`runner generate` (a quick try, nothing saved) and `--chat` (plain prompts through the chat template)."""

from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams


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
    expected = " ".join(f"{t!r}:{lp:.2f}" for t, lp in zip(pieces, c.token_logprobs, strict=True))
    assert result.output.splitlines()[1].strip() == expected
    # the text holds back a character the limit cut; its token still shows, as "\ufffd"
    assert "".join(pieces) in (c.text, c.text + "\ufffd")


def test_generate_reads_stdin_and_txt_files(tmp_path, tiny_gpt2):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    result = invoke(
        "generate", "-", tmp_path / "p.txt", "-m", tiny_gpt2, "--max-new-tokens", 2, input="zero\n"
    )
    assert result.exit_code == 0, result.output
    assert [ln.split("]")[0] for ln in result.output.splitlines()] == ["[zero", "[one", "[two"]


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
