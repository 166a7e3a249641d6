"""End to end on the real demo model (SmolLM2-135M-Instruct, offline): the answers make sense."""

import json

import pytest

import runner
from runner import GenerationParams

pytestmark = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not


def test_greedy_answer_to_the_capital_of_france_is_paris(tmp_path):
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(
        json.dumps({"id": "fr", "messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n"
        + json.dumps({"id": "plain", "prompt": "The capital of Japan is"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    job, summary = runner.run(prompts, "smollm2-135m-instruct", GenerationParams(max_new_tokens=24),
                              output=tmp_path / "out", echo=None)  # fmt: skip
    assert summary.finished
    df = runner.load_results(tmp_path / "out")
    fr = df.set_index("id").loc["fr"]
    assert "Paris" in fr.text, fr.text
    assert (
        fr.finish_reason == "stop" and df.stop_reason.isna().all()
    )  # ended by <|im_end|>, which is not in the text
    assert "<|im_end|>" not in fr.text and fr.prompt.startswith("<|im_start|>")
    assert fr.cumulative_logprob < 0 and len(fr.token_logprobs) == fr.completion_tokens
