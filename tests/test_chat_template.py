"""`--chat-template`: a Jinja chat template for 'messages' rows (and --chat prompts, OpenAI Batch chat requests)
instead of the model's own, or for a model without one: the GPT-2 chatbots of the users' study logs are fine-tuned
on their own format ("<|user|>... <|bot|>") and have no chat template, so every chat row was refused."""

import json

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams, ParamError, ScoreParams
from runner.jobs import create_job
from runner.worker import run_job

TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CHAT = [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "How are you?"}]  # fmt: skip
RENDERED = "<|user|>こんにちは\n<|assistant|>Hi\n<|user|>How are you?\n<|assistant|>"


def test_a_model_without_a_chat_template_answers_chats_through_one_given(tmp_path, tiny_gpt2, gpt2_engine):
    rows = [{"id": "c", "messages": CHAT}, {"id": "p", "prompt": "The old man"}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(runner.InputError, match="no chat template; give one with chat_template"):
        create_job(path, tiny_gpt2)
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=3, seed=1), chat_template=TEMPLATE,
                     job_dir=tmp_path / "out")  # fmt: skip
    assert job.prompts().column("prompt").to_pylist() == [RENDERED, "The old man"]
    assert job.meta["input"]["chat_template"] == TEMPLATE
    assert run_job(job, gpt2_engine, echo=None).finished
    assert runner.load_results(job.dir)["prompt"].tolist() == [RENDERED, "The old man"]
    # the same folder with another template (or none) is another job: refused, saying what differs
    with pytest.raises(runner.RunnerError, match="the chat template"):
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=3, seed=1), chat_template=TEMPLATE + " ",
                   job_dir=tmp_path / "out")  # fmt: skip
    with pytest.raises(runner.RunnerError, match="chat_template given, now none"):
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=3, seed=1), job_dir=tmp_path / "out")


def test_the_cli_reads_a_template_file_or_the_template_itself(tmp_path, tiny_gpt2, runner_home):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": CHAT}])
    (tmp_path / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    # inline, taken as typed (Jinja reads its own '\\n'), however long: a 300-character one is no file name
    long = TEMPLATE + "{# " + "a C:\\Users\\x note " * 20 + "#}"
    for given in (tmp_path / "chat.jinja", TEMPLATE, long):
        r = invoke("submit", path, "-m", tiny_gpt2, "--chat-template", given, "--max-new-tokens", 2)
        assert r.exit_code == 0, r.output
        assert runner.open_job(r.stdout.strip()).prompts().column("prompt").to_pylist() == [RENDERED]
    # typed \\n outside Jinja's tags is a line break (as --template, --stop and vLLM read it); a file's BOM no text
    typed = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}assistant:"
    r = invoke("submit", path, "-m", tiny_gpt2, "--chat-template", typed, "--max-new-tokens", 2)
    assert runner.open_job(r.stdout.strip()).prompts().column("prompt").to_pylist() == [
        "user: こんにちは\nassistant: Hi\nuser: How are you?\nassistant:"
    ]
    (tmp_path / "bom.jinja").write_text("\ufeff" + TEMPLATE, encoding="utf-8")
    r = invoke(
        "submit", path, "-m", tiny_gpt2, "--chat-template", tmp_path / "bom.jinja", "--max-new-tokens", 3
    )
    assert runner.open_job(r.stdout.strip()).prompts().column("prompt").to_pylist() == [RENDERED]
    bad = invoke("submit", path, "-m", tiny_gpt2, "--chat-template", "{% for m in messages %}\n{{ m }")
    assert bad.output.startswith("Error: --chat-template: not a valid Jinja template: line 2: "), bad.output
    missing = invoke("submit", path, "-m", tiny_gpt2, "--chat-template", tmp_path / "nope.jinja")
    assert missing.output == (f"Error: --chat-template: no file {tmp_path / 'nope.jinja'} (and it is not a Jinja "
                              "template: it has no {{ ... }} or {% ... %})\n")  # fmt: skip
    score = invoke(
        "submit", path, "-m", tiny_gpt2, "--kind", "score", "--chat-template", tmp_path / "chat.jinja"
    )
    assert score.exit_code != 0 and "chat_template is for generate jobs" in score.output
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Hello"}])
    unused = invoke("submit", plain, "-m", tiny_gpt2, "--chat-template", TEMPLATE)
    assert unused.exit_code == 0 and "the template is not used. Pass --chat" in unused.stderr, unused.stderr


def test_a_row_the_template_refuses_is_an_invalid_row_naming_why(tmp_path, tiny_gpt2):
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}" \
             "{% endif %}" + TEMPLATE  # fmt: skip
    rows = [{"id": "ok", "messages": [{"role": "system", "content": "Be brief."}, *CHAT]},
            {"id": "bad", "messages": CHAT}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(runner.InputError, match=r"chat.jsonl:2: messages: the chat template cannot render this "
                                                r"row's messages: a system message comes first"):  # fmt: skip
        create_job(path, tiny_gpt2, chat_template=strict)
    job = create_job(path, tiny_gpt2, chat_template=strict, skip_invalid=True)
    assert job.prompts().column("id").to_pylist() == ["ok"]
    with pytest.raises(ParamError, match="'chat.jinja' is not Jinja text \\(for a file, pass Path"):
        create_job(path, tiny_gpt2, chat_template="chat.jinja")  # not rendered as the text "chat.jinja"
    (tmp_path / "chat.jinja").write_text(strict, encoding="utf-8")
    from_file = create_job(path, tiny_gpt2, chat_template=tmp_path / "chat.jinja", skip_invalid=True)
    assert from_file.meta["input"]["chat_template"] == strict
    with pytest.raises(ParamError, match="chat_template is for generate jobs"):
        create_job(
            write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}]),
            tiny_gpt2,
            ScoreParams(),
            chat_template=strict,
        )


def test_openai_batch_chat_requests_and_a_quick_try_use_it_too(tmp_path, tiny_gpt2):
    from runner import quick

    lines = [{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny-gpt2", "messages": CHAT, "max_tokens": 3, "temperature": 0}}]  # fmt: skip
    path = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "responses.jsonl"
    r = invoke("run-batch", "-i", path, "-o", out, "-m", tiny_gpt2, "--served-model-name", "tiny-gpt2",
               "--chat-template", TEMPLATE)  # fmt: skip
    assert r.exit_code == 0, r.output
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["custom_id"] == "r1" and line["response"]["status_code"] == 200
    (job_prompt,) = runner.open_job(tmp_path / "responses.jsonl.job").prompts().column("prompt").to_pylist()
    assert job_prompt == RENDERED
    greedy = GenerationParams(max_new_tokens=4, do_sample=False)
    (chatted,) = quick.generate(["How are you?"], tiny_gpt2, greedy, chat=True, chat_template=TEMPLATE)
    (plain,) = quick.generate(["<|user|>How are you?\n<|assistant|>"], tiny_gpt2, greedy)  # what it renders
    assert chatted[0].token_ids == plain[0].token_ids
    r = invoke("generate", "How are you?", "-m", tiny_gpt2, "--chat", "--chat-template", TEMPLATE,
               "--max-new-tokens", 2)  # fmt: skip
    assert r.exit_code == 0 and r.output.startswith("[How are you?]"), r.output
    # Without --chat a job of plain prompts does not use the template (it warns): a try that did would not be
    # the job's (adversarial pass 44), so it is refused, saying what to pass
    r = invoke("generate", "How are you?", "-m", tiny_gpt2, "--chat-template", TEMPLATE)
    assert (
        r.exit_code != 0
        and "--chat-template renders prompts sent as user messages: pass --chat too" in r.output
    )


def test_chat_on_a_model_without_a_chat_template_is_refused_once_up_front(tmp_path, tiny_gpt2, gpt2_engine):
    """`--chat` with a model that has no chat template said "this row has 'messages'" of every row of a file of
    plain prompts (10,000 lines for 10,000 prompts; adversarial pass 27). It is refused once, naming --chat and
    what to do; `runner generate --chat` the same."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Hello {i}"} for i in range(50)])
    with pytest.raises(ParamError, match=r"has none: give one with chat_template .*or drop chat=True") as e:
        create_job(path, tiny_gpt2, chat=True)
    assert e.value.option == "--chat" and "row" not in str(e.value)
    out = invoke("run", path, "-m", tiny_gpt2, "--chat", "--max-new-tokens", "2").output
    assert out.count("drop --chat") == 1 and "p.jsonl:" not in out, out
    with pytest.raises(ParamError, match="drop chat=True"):
        runner.generate(["Hello"], tiny_gpt2, chat=True, engine=gpt2_engine)
    assert create_job(path, tiny_gpt2, chat=True, chat_template=TEMPLATE)  # with one given: fine


def test_a_messages_other_fields_reach_the_template_as_vllm_passes_them(tmp_path, tiny_gpt2):
    """`name`, `tool_calls`, `tool_call_id` were dropped before the template saw them: a multi-party or
    tool-history chat rendered as if they were not there. A null field is absent (the SDK's model_dump())."""
    template = ("{% for m in messages %}[{{ m.role }}|{{ m.name }}|{{ m.tool_call_id }}|{{ m.tool_calls is defined }}"
                "|{{ 'absent' if m.refusal is not defined else m.refusal }}]{{ m.content }}{% endfor %}")  # fmt: skip
    call = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    chat = [{"role": "user", "name": "alice", "content": "hi", "refusal": None},
            {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": chat}])
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2), chat_template=template,
                     job_dir=tmp_path / "out")  # fmt: skip
    assert job.prompts().column("prompt").to_pylist() == [
        "[user|alice||False|absent]hi[assistant|||True|absent][tool||c1|False|absent]42"
    ]
    chat[1]["tool_calls"] = None  # content null is taken beside tool calls only
    with pytest.raises(runner.InputError, match="chat.jsonl:1: messages: item 1: content must be a string"):
        create_job(write_jsonl(tmp_path / "chat.jsonl", [{"id": "c", "messages": chat}]), tiny_gpt2,
                   chat_template=template, job_dir=tmp_path / "out2")  # fmt: skip


def test_a_template_file_that_does_not_answer_once_is_looked_at_again(tmp_path, monkeypatch):
    """`--chat-template /content/drive/chat.jinja` on a Drive mount: one EIO looking at it is looked at again
    (os.path.isfile took it for "no file", refusing the submit with a false message); a long template given
    inline is still the template, not an error (ENAMETOOLONG)."""
    import errno
    import os

    from runner import storage
    from runner.batching import read_chat_template

    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    real, failed = os.stat, []

    def stat(p, *args, **kwargs):
        if str(p) == str(path) and not failed:
            failed.append(p)
            raise OSError(errno.EIO, "Input/output error", str(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,))
    monkeypatch.setattr(os, "stat", stat)
    assert read_chat_template(str(path)) == path.read_text() and failed
    inline = "{{ messages[0]['content'] }}" + " " * 5000
    assert read_chat_template(inline) == inline
