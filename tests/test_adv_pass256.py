"""Adversarial pass 256: OpenAI Batch request fields and per-row settings against what they mean at OpenAI (and in
vLLM's run-batch): each taken with its meaning, or refused at submit naming the line and the field; and the output
lines as a user's OpenAI-parsing code reads them.

Found, and kept fixed below:
- A chat request's `"top_logprobs": true` (a count given as a boolean, which OpenAI refuses: it takes an integer in
  0..20) was taken as top_logprobs 0 (no alternatives), and `"top_logprobs": false` beside `"logprobs": true` as
  no log-probs at all: each request ran and nothing said why. The Batch reader copied top_logprobs into the row's
  `logprobs`, where a boolean is chat's logprobs true/false. (Reading 9: `runner repair` reads a job of before as
  its submit did.)
- A plain row's `suffix` (a /v1/completions field: text the completion must lead up to) and a chat row's `tools`,
  `tool_choice`, `functions` and `function_call` were kept as data without a word: the row ran as if it had not
  given them (no insertion, no tool definitions in the prompt), where a Batch body giving one is refused and a
  plain row's `echo` and `best_of` get a note. Submit now says so for these too, and for an embed row's
  `dimensions` (every vector had the model's full size) and `encoding_format` (its export gave numbers).
- Chat and text completion bodies had no `system_fingerprint`, which every OpenAI response (and every line of
  `vllm run-batch`'s output, null there) carries: code reading `body["system_fingerprint"]`, as it reads
  `body["model"]`, failed with a KeyError. It is now null, as vLLM writes it.

Held (pass 256): max_tokens and max_completion_tokens both given is refused naming the latter; 0 is refused naming
the field; null is the job's; a chat `stop` of "" is refused, [] and more than 4 stop strings are taken (vLLM takes
any number); `n` with a seed gives distinct samples; temperature 0 beside top_p is greedy; presence/frequency
penalties are OpenAI's additive ones on generated tokens (sampling.py), applied when greedy too; suffix, reasoning_effort,
audio, prediction, verbosity, web_search_options, stream_options beyond {}, tools, tool_choice "required", functions,
modalities with audio, vLLM's add_generation_prompt/chat_template_kwargs/ignore_eos/skip_special_tokens, embeddings
`dimensions`, a list `input`, a list or token-id `prompt` are refused naming body.FIELD; user, metadata, store,
service_tier, parallel_tool_calls taken (they change no output); image and audio content parts refused, text parts
taken; role "function" refused; booleans as numbers (seed, n, max_tokens, temperature, top_p, penalties) refused.
Left as they are (documented): echo's prompt tokens carry no alternatives in `top_logprobs` ({}).
"""

from __future__ import annotations

import json

import pytest
from helpers import CHAT, COMP, batch_request, invoke, write_jsonl

import runner
from runner.errors import InputError
from runner.jobs import create_job

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.mark.parametrize("value", [True, False])
def test_a_chat_top_logprobs_given_as_a_boolean_is_refused_not_taken_as_0(tmp_path, tiny_llama, value):
    lines = [batch_request("a", CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": value})]
    with pytest.raises(InputError) as e:
        create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_llama, served_model_names=("tiny",),
                   home=tmp_path / "home")  # fmt: skip
    assert "b.jsonl:1: body.top_logprobs: must be a whole number of alternatives (0-20), got " in str(
        e.value
    ), str(e.value)
    # the count as a number is taken, a whole float too (a writer holding numbers as doubles)
    for k, top in enumerate((0, 3, 2.0)):
        lines = [batch_request("a", CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": top})]
        job = create_job(write_jsonl(tmp_path / f"ok{k}.jsonl", lines), tiny_llama, served_model_names=("tiny",),
                         home=tmp_path / f"home{k}")  # fmt: skip
        assert json.loads(job.prompts().to_pylist()[0]["settings"])["logprobs"] == top


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ({"prompt": "def f(x):", "suffix": "    return y\n"}, "'suffix' is kept as data"),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
         "'tools' and 'tool_choice' are kept as data"),
        ({"messages": MESSAGES, "functions": [{"name": "f"}], "function_call": "auto"},
         "'functions' and 'function_call' are kept as data"),
    ],
)  # fmt: skip
def test_a_plain_rows_suffix_or_tools_are_said_to_be_data(tmp_path, tiny_llama, runner_home, row, said):
    """A plain row ran without its `suffix` or its `tools` (never in the prompt), said nowhere; a Batch body giving
    one is refused."""
    out = invoke("submit", write_jsonl(tmp_path / "p.jsonl", [row]), "-m", tiny_llama).stderr
    assert f"note: {said}, not settings: a plain row is no OpenAI request" in out.replace(
        "is kept as data, not a setting", "is kept as data, not settings"
    ), out
    assert "'prompt'" not in out and "'messages'" not in out


def test_completion_bodies_carry_system_fingerprint_as_every_openai_response_does(tmp_path, tiny_llama):
    from runner.engine import Engine
    from runner.openai_batch import export
    from runner.worker import run_job

    lines = [batch_request("c", CHAT, {"messages": MESSAGES, "max_tokens": 2}),
             batch_request("p", COMP, {"prompt": "The old man", "max_tokens": 2})]  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_llama, runner.GenerationParams(max_new_tokens=2),
                     served_model_names=("tiny",), home=tmp_path / "home")  # fmt: skip
    assert run_job(job, Engine(tiny_llama), echo=None).finished
    assert export(job, tmp_path / "out.jsonl") == (2, 0)
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    for line, kind in zip(
        (tmp_path / "out.jsonl").read_text().splitlines(), (ChatCompletion, Completion), strict=True
    ):
        body = json.loads(line)["response"]["body"]
        # read as a dict, as code written against the API's JSON reads it
        assert body["system_fingerprint"] is None and body["model"] == "tiny"
        assert kind.model_validate(body).system_fingerprint is None


def test_a_plain_embed_rows_dimensions_or_encoding_format_are_said_to_be_data(
    tmp_path, tiny_gpt2, runner_home
):
    """A plain embed row's `dimensions` (an OpenAI /v1/embeddings field: a shorter vector) and `encoding_format`
    were kept as data without a word: every vector had the model's full size, as numbers; a Batch body's
    `dimensions` is refused and its `encoding_format` taken."""
    rows = [{"text": "Hello", "dimensions": 8, "encoding_format": "base64"}]
    out = invoke("submit", write_jsonl(tmp_path / "e.jsonl", rows), "-m", tiny_gpt2, "--kind", "embed").stderr
    assert (
        "note: 'dimensions' and 'encoding_format' are kept as data, not settings: a plain row is no OpenAI "
        in out
    )
    assert "vectors have the model's full hidden size" in out and "request takes encoding_format" in out, out
    said = invoke(
        "submit", write_jsonl(tmp_path / "f.jsonl", [{"text": "Hello"}]), "-m", tiny_gpt2, "--kind", "embed"
    )
    assert "kept as data" not in said.stderr


def test_repair_reads_a_job_of_before_reading_9_as_its_submit_did(tmp_path, tiny_llama):
    """A job read before reading 9 took a chat body's `"top_logprobs": true` (as 0): `runner repair` rebuilds its
    prompts.parquet so, where today's reading refuses the line."""
    from test_openai_batch_edges import _rewritten_as_read

    lines = [batch_request("a", CHAT, {"messages": MESSAGES, "max_tokens": 2}),
             batch_request("t", CHAT, {"messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": True})]  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_llama, served_model_names=("tiny",),
                     skip_invalid=True, job_dir=tmp_path / "job")  # fmt: skip
    rows, errors = _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "now")
    assert [r["id"] for r in rows] == ["a"] and errors == ["t"]
    rows, errors = _rewritten_as_read(job, 8, tmp_path / "before")
    assert [r["id"] for r in rows] == ["a", "t"] and errors == []
    assert json.loads(rows[1]["settings"])["logprobs"] == 0
