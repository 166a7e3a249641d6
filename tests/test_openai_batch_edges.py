"""OpenAI Batch files: plain rows that only look like requests, null fields, echo with the job's log-probs (adversarial pass 163)."""

import json

import pytest
from helpers import invoke, write_jsonl

from runner import GenerationParams, InputError, ScoreParams
from runner.jobdir import Job, find_job
from runner.jobs import create_job


@pytest.mark.parametrize(
    ("rows", "params", "options"),
    [
        # C4 / FineWeb rows: a web page's text and the url it came from
        ([{"text": "The old man", "url": "https://example.com/a"}], ScoreParams(), {}),
        (
            [{"text": "The old man", "url": "https://example.com/a"}],
            GenerationParams(),
            {"prompt_field": "text"},
        ),
        # an email's subject and (text) body, rendered by a template
        (
            [{"subject": "Hi", "body": "See you at noon"}],
            GenerationParams(),
            {"template": "{subject}: {body}"},
        ),
    ],
)
def test_a_plain_row_with_a_url_or_body_of_its_own_is_not_a_batch_request(tmp_path, tiny_gpt2, rows, params,
                                                                           options):  # fmt: skip
    """A plain row holding a web page's `url` or an email's text `body` was taken for an OpenAI Batch request
    line (any of custom_id, method, url, body made one), and the whole file was refused: "custom_id: must be
    a non-empty string", or "--template does not apply to it"."""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    job = create_job(path, tiny_gpt2, params, home=tmp_path / "home", **options)
    assert job.meta["input"]["rows"] == 1 and job.meta["input"]["invalid"] == 0
    # (a generate job's plain row records what it answers as in `--format openai`, in a request's own shape:
    # a runner of before, reading `model` and `echo` of any request recorded, exports the job too)
    plain = {"url": "/v1/completions", "model": job.spec.model, "echo": False}
    want = [None] if isinstance(params, ScoreParams) else [plain]
    assert [r and json.loads(r) for r in job.prompts().column("request").to_pylist()] == want


def test_best_of_beside_a_null_n_is_taken_as_best_of_1_is(tmp_path, tiny_gpt2):
    """A null field asks for nothing (the SDK's model_dump() writes them): best_of 1 beside `"n": null` was
    refused ("only best_of = n"), where best_of 1 alone is taken."""
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "n": None, "best_of": 1}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}
    path = write_jsonl(tmp_path / "b.jsonl", [line])
    job = create_job(path, tiny_gpt2, served_model_names=("tiny",), home=tmp_path / "home")
    assert job.meta["input"]["rows"] == 1 and job.prompts().column("n").to_pylist() == [1]


def test_echo_with_the_jobs_logprobs_gives_the_prompts_tokens_first(tmp_path, tiny_llama):
    """A completions request with echo and no logprobs of its own gets the job's --logprobs: its logprobs cover
    the echoed text, prompt first, as when the request asks itself (they began at the completion, text_offset
    at the prompt's end, while `text` held the prompt)."""
    from openai.types import Completion

    import runner
    from runner.engine import Engine
    from runner.openai_batch import export
    from runner.worker import run_job

    body = {"model": "tiny", "prompt": "Every student", "max_tokens": 3, "echo": True, "temperature": 0}
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/completions", "body": b}
             for c, b in (("job", body), ("own", {**body, "logprobs": 2}))]  # fmt: skip
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    job = create_job(path, tiny_llama, GenerationParams(max_new_tokens=4, logprobs=2),
                     runner.EngineOptions(batch_size=4), job_dir=tmp_path / "job", served_model_names=("tiny",))  # fmt: skip
    assert run_job(job, Engine(tiny_llama), echo=None).finished
    assert export(job, tmp_path / "out.jsonl") == (2, 0)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    job_lp, own_lp = (Completion.model_validate(x["response"]["body"]).choices[0].logprobs for x in out)
    assert job_lp.text_offset[0] == 0 and job_lp.tokens == own_lp.tokens
    assert job_lp.token_logprobs == own_lp.token_logprobs and job_lp.text_offset == own_lp.text_offset


def test_a_batch_file_submitted_without_max_new_tokens_takes_the_batch_default_as_run_batch_does(
    tmp_path, tiny_gpt2, runner_home
):
    """README: requests without max_tokens get 256, or half the context window. Only `run-batch` gave it:
    `runner submit requests.jsonl` capped them at the prompt files' default of 64 (adversarial pass 163). A
    prompt file keeps 64; --max-new-tokens decides for both."""
    import pandas as pd

    from runner.openai_batch import default_max_tokens
    from runner.params import GenerationParams

    body = {"model": "tiny", "prompt": "Hi"}
    batch = write_jsonl(tmp_path / "req.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                                  "body": body}])  # fmt: skip
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    parquet = tmp_path / "req.parquet"  # (a Batch file kept as Parquet: the reader takes it as requests too)
    pd.read_json(batch, lines=True).to_parquet(parquet)
    cases = [(batch, (), default_max_tokens(tiny_gpt2)), (plain, (), GenerationParams().max_new_tokens),
             (batch, ("--max-new-tokens", "5"), 5), (parquet, (), default_max_tokens(tiny_gpt2))]  # fmt: skip
    for k, (path, more, want) in enumerate(cases):
        r = invoke("submit", path, "-m", tiny_gpt2, "--served-model-name", "tiny", "--name", f"j{k}", *more)
        assert r.exit_code == 0, r.output
        job = Job.open(find_job(f"j{k}"))
        assert job.params.max_new_tokens == want
    assert default_max_tokens(tiny_gpt2) != GenerationParams().max_new_tokens


@pytest.mark.parametrize(
    ("url", "fields", "refused"),
    [
        ("/v1/embeddings", {"logprobs": None, "echo": None, "best_of": None, "top_logprobs": None}, None),
        ("/v1/completions", {"encoding_format": None}, None),
        ("/v1/chat/completions", {"encoding_format": None}, None),
        ("/v1/embeddings", {"echo": False}, "body.echo"),
        ("/v1/chat/completions", {"logprobs": 1}, "body.logprobs"),
        ("/v1/chat/completions", {"logprobs": 0}, "body.logprobs"),
    ],
)
def test_null_fields_ask_for_nothing_on_every_endpoint_and_chat_logprobs_is_a_boolean(url, fields, refused):
    """A null field is taken on every endpoint (the SDK's model_dump() writes them): the embeddings endpoint
    refused `"logprobs": null`, the others `"encoding_format": null`. Chat's logprobs is true or false: 1 and 0
    were taken as them (equal in Python)."""
    from runner.openai_batch import request_row

    inputs = {"/v1/embeddings": {"input": "Hi"}, "/v1/completions": {"prompt": "Hi"},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]}}  # fmt: skip
    body = {"model": "tiny", **inputs[url], **fields}
    kind = "embed" if url == "/v1/embeddings" else "generate"
    row, field, problem = request_row(
        {"custom_id": "a", "method": "POST", "url": url, "body": body}, kind, ("tiny",)
    )
    assert field == refused, problem
    assert (row is None) == (refused is not None)


def test_a_refusal_cites_the_body_fields_as_the_body_spells_them(tmp_path, tiny_llama):
    """min_tokens over max_tokens was refused citing `max_new_tokens=2`, a field neither the Batch body nor the
    plain row has."""
    from runner.errors import InputError

    body = {"model": "tiny", "prompt": "Hi", "min_tokens": 5, "max_tokens": 2}
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}
    plain = {"prompt": "Hi", "min_tokens": 5, "max_tokens": 2}
    chat = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "min_tokens": 5,
            "max_completion_tokens": 2,
        },
    }
    for name, line in (("b.jsonl", request), ("p.jsonl", plain), ("c.jsonl", chat)):
        with pytest.raises(InputError) as e:
            create_job(write_jsonl(tmp_path / name, [line]), tiny_llama, served_model_names=("tiny",),
                       home=tmp_path / "home")  # fmt: skip
        cap = "max_completion_tokens" if name == "c.jsonl" else "max_tokens"
        assert f"{name}:1: min_tokens: min_tokens must be <= {cap}=2, got 5" in str(e.value), str(e.value)


def test_a_refusal_of_the_jobs_setting_does_not_blame_a_body_field_given_as_null(tmp_path, tiny_llama):
    """`"min_tokens": null` asks for nothing (the SDK's model_dump() writes it), so the job's --min-new-tokens
    over the body's max_tokens is the job's fault: it was refused as the body's `min_tokens`, which a plain row
    with the same null is not."""
    from runner.errors import InputError

    body = {"model": "tiny", "prompt": "Hi", "min_tokens": None, "max_tokens": 2}
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}
    with pytest.raises(InputError) as e:
        create_job(write_jsonl(tmp_path / "b.jsonl", [request]), tiny_llama, GenerationParams(min_new_tokens=5),
                   served_model_names=("tiny",), home=tmp_path / "home")  # fmt: skip
    assert "b.jsonl:1: min_new_tokens: min_new_tokens must be <= max_tokens=2, got 5" in str(e.value), str(
        e.value
    )


@pytest.mark.parametrize("command", ["run", "submit"])
def test_the_help_says_the_batch_default_for_max_new_tokens(command):
    """`runner submit requests.jsonl` gives requests without max_tokens 256 (as run-batch does), while its help
    said 64 for every file."""
    result = invoke(command, "--help")
    assert "256, or half the context window" in " ".join(result.output.split()), result.output


def test_completion_top_logprobs_keep_a_byte_fallback_token_and_the_token_spelling_its_byte(
    tmp_path, tiny_llama, llama_engine
):
    """A SentencePiece vocabulary with byte fallback spells some bytes twice: "," and <0x2C>, "▁" and <0x20>.
    Both read as the same text, so `top_logprobs` (a dict keyed by token name) kept one of them: 19 entries
    where logprobs 20 was asked, and where the chosen token was one of the pair, its entry could hold the other's
    log-prob. Each alternative keeps an entry of its own, under a name no other token of the step has."""
    from openai.types import Completion

    import runner
    from runner.openai_batch import export
    from runner.worker import run_job

    prompts = ["The old man, 1, 2, 3", "Hello! It's - 0.5", "a b c d", "Numbers: 1,2,3,4"]
    lines = [{"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": p, "logprobs": 20, "max_tokens": 12,
                                                    "temperature": 1.5, "n": 4}}
             for i, p in enumerate(prompts)]  # fmt: skip
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    job = create_job(path, tiny_llama, GenerationParams(max_new_tokens=12, seed=7), job_dir=tmp_path / "job",
                     served_model_names=("tiny",))  # fmt: skip
    assert run_job(job, llama_engine, echo=None).finished
    assert export(job, tmp_path / "out.jsonl") == (4, 0)
    df = runner.load_results(job.dir)
    collided = 0
    for line in (tmp_path / "out.jsonl").read_text().splitlines():
        out = json.loads(line)
        body = Completion.model_validate(out["response"]["body"])
        for choice in body.choices:
            row = df[(df["id"] == out["custom_id"]) & (df["sample"] == choice.index)].iloc[0]
            lp = choice.logprobs
            for i, (alts, got) in enumerate(zip(row["top_logprobs"], lp.top_logprobs, strict=True)):
                texts = [a["token"] for a in alts]
                collided += len(texts) - len(set(texts))
                assert len(got) == len(alts), (out["custom_id"], choice.index, i, got)
                assert sorted(got.values()) == pytest.approx(sorted(float(a["logprob"]) for a in alts))
                assert got[lp.tokens[i]] == lp.token_logprobs[i]
    assert collided > 0  # (some step had two alternatives reading as the same text)


def test_plain_rows_answer_with_the_served_model_name(tmp_path, tiny_gpt2, gpt2_engine):
    """A job of plain rows submitted with --served-model-name answers with that name in `model` (the first one
    not empty), as its Batch requests would and as vLLM's run-batch does (it gave the model's folder path)."""
    from runner.openai_batch import export
    from runner.worker import run_job

    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "job",
                     served_model_names=("", "my-gpt", "gpt"))  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    export(job, tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]["model"] == "my-gpt"


# Qwen2.5's chat template, as its tokenizer_config.json holds it (without its tools part): a first system message,
# else its own default one; later system, user, assistant and tool messages; any other role renders as nothing
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_developer_message_is_the_system_message_of_a_template_without_that_role(tmp_path, tiny_llama):
    """OpenAI's `developer` role is the system message of the models that have no role of that name (its
    reference: "developer messages replace the previous system messages"). Qwen's template renders any other
    role as nothing: the request's instructions were dropped without a word, and its own default system prompt
    put in their place (adversarial pass 222)."""
    chat = "/v1/chat/completions"
    body = lambda role: {"model": "tiny", "messages": [{"role": role, "content": "Answer in French."},  # noqa: E731
                                                       {"role": "user", "content": "Hi"}]}  # fmt: skip
    lines = [
        {"custom_id": r, "method": "POST", "url": chat, "body": body(r)} for r in ("developer", "system")
    ]
    path = write_jsonl(tmp_path / "b.jsonl", lines)
    job = create_job(path, tiny_llama, served_model_names=("tiny",), chat_template=QWEN_TEMPLATE,
                     home=tmp_path / "home")  # fmt: skip
    developer, system = job.prompts().column("prompt").to_pylist()
    assert "Answer in French." in developer and developer == system
    # a template that knows the role keeps it (gpt-oss renders its developer messages as their own section)
    knows = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{# developer #}"
    job = create_job(write_jsonl(tmp_path / "k.jsonl", lines[:1]), tiny_llama, served_model_names=("tiny",),
                     chat_template=knows, home=tmp_path / "home2")  # fmt: skip
    assert job.prompts().column("prompt").to_pylist() == ["developer: Answer in French.\nuser: Hi\n"]


def test_a_message_the_chat_template_leaves_out_is_refused_naming_it(tmp_path, tiny_llama):
    """A system message under a template that takes only user and assistant turns renders as nothing, and the
    row was answered without it (a Batch request's messages alike): it is refused, naming the line, the field
    and the message. Under Qwen's template it is rendered, and taken."""
    user_only = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] | trim + '\\n' }}"
                 "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}A:")  # fmt: skip
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi  "}]
    rows = [{"id": "kept", "messages": messages[1:]}, {"id": "dropped", "messages": messages}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as err:
        create_job(path, tiny_llama, chat_template=user_only, home=tmp_path / "home")
    assert (
        "p.jsonl:2: messages: the chat template leaves out item 0 (a system message): its text is not in "
        "the prompt it renders" in str(err.value)
    ), str(err.value)
    assert "p.jsonl:1" not in str(err.value)  # (trimmed by the template, the user's text is still there)
    job = create_job(path, tiny_llama, chat_template=QWEN_TEMPLATE, home=tmp_path / "home2")
    assert "Be brief." in job.prompts().column("prompt").to_pylist()[1]


def test_repair_renders_a_job_of_before_as_its_submit_did(tmp_path, tiny_llama):
    """A job read before reading 5 rendered a developer message as its template did and took a message the
    template left out: `runner repair` rebuilds its prompts.parquet so, or its checksum would never match again."""
    import dataclasses

    from runner import storage
    from runner.jobs import _rewrite_inputs

    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "messages": messages}])
    job = create_job(path, tiny_llama, chat_template=QWEN_TEMPLATE, job_dir=tmp_path / "job")
    out = tmp_path / "now"
    out.mkdir()
    _rewrite_inputs(job, out)
    assert storage.file_sha256(out / "prompts.parquet") == job.meta["prompts_sha256"]
    meta = {**job.meta, "input": {**job.meta["input"], "reading": 4}}
    out = tmp_path / "before"
    out.mkdir()
    _rewrite_inputs(Job(job.dir, dataclasses.replace(job.spec, meta=meta)), out)
    import pyarrow.parquet as pq

    assert "French" not in pq.read_table(out / "prompts.parquet").column("prompt").to_pylist()[0]


def _rewritten_as_read(job: Job, reading: int, out):
    """prompts.parquet's rows and errors.jsonl's ids as `runner repair` writes them again for `job` had job.json
    said its file was read with `reading`."""
    import dataclasses

    import pyarrow.parquet as pq

    from runner.jobs import _rewrite_inputs

    out.mkdir()
    meta = {**job.meta, "input": {**job.meta["input"], "reading": reading}}
    _rewrite_inputs(Job(job.dir, dataclasses.replace(job.spec, meta=meta)), out)
    errors = out / "errors.jsonl"
    lines = errors.read_text().splitlines() if errors.exists() else []
    return pq.read_table(out / "prompts.parquet").to_pylist(), [json.loads(line)["id"] for line in lines]


def test_repair_reads_a_job_of_before_reading_6_as_its_submit_did(tmp_path, tiny_gpt2):
    """A job read before reading 6 (today's min_p, whole float seeds, response_format keys nothing reads) kept a
    plain row's min_p column as data, refused a Batch body's min_p and seed -1.0, and took a response_format key
    nothing reads: `runner repair` rebuilds its prompts.parquet and errors.jsonl so. It read them as today's
    submit does, and repair of such a job failed ('prompts.parquet written again from the input file is not the
    one submit wrote'), a job with a min_p column even without --skip-invalid."""
    from runner import storage

    plain = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello", "min_p": 0.1}])
    job = create_job(plain, tiny_gpt2, job_dir=tmp_path / "plain")
    now, _ = _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "plain-now")
    assert now[0]["settings"] is not None and "min_p" not in now[0]
    assert storage.file_sha256(tmp_path / "plain-now" / "prompts.parquet") == job.meta["prompts_sha256"]
    before, _ = _rewritten_as_read(job, 5, tmp_path / "plain-before")
    assert (
        before[0]["settings"] is None and before[0]["min_p"] == 0.1
    )  # data, as the runner of before kept it

    def line(cid, **body):
        return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
                "body": {"model": "tiny", "prompt": "Hello", "max_tokens": 3, **body}}  # fmt: skip

    schema = {"type": "json_schema", "json_schema": {"schema": {"type": "object"}, "strict": "yes"}}
    lines = [line("a"), line("seed", seed=-1.0), line("min_p", min_p=0.1),
             line("schema", response_format={"type": "json_object", "schema": {"type": "object"}}),
             line("strict", response_format=schema)]  # fmt: skip
    batch = write_jsonl(tmp_path / "b.jsonl", lines)
    job = create_job(
        batch, tiny_gpt2, served_model_names=("tiny",), skip_invalid=True, job_dir=tmp_path / "batch"
    )
    rows, errors = _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "batch-now")
    assert [r["id"] for r in rows] == ["a", "seed", "min_p"] and errors == ["schema", "strict"]
    rows, errors = _rewritten_as_read(job, 5, tmp_path / "batch-before")
    assert [r["id"] for r in rows] == ["a", "schema", "strict"] and errors == ["seed", "min_p"]
    assert '"json_object": true' in rows[1]["settings"]


def test_repair_reads_a_csv_stop_cell_of_before_reading_7_as_its_submit_did(tmp_path, tiny_gpt2):
    """Since reading 7 a CSV stop cell that only starts like a JSON list (`[END]\\n`) has its typed `\\n` read as a
    line break; a job read before kept the backslash and the n, and `runner repair` rebuilds its prompts.parquet
    so (as read today, its checksum would differ and repair could not)."""
    from runner import storage

    (tmp_path / "p.csv").write_text("prompt,stop\nHello,[END]\\n\n")
    job = create_job(tmp_path / "p.csv", tiny_gpt2, job_dir=tmp_path / "csv")
    now, _ = _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "csv-now")
    assert json.loads(now[0]["settings"])["stop"] == "[END]\n"
    assert storage.file_sha256(tmp_path / "csv-now" / "prompts.parquet") == job.meta["prompts_sha256"]
    before, _ = _rewritten_as_read(job, 6, tmp_path / "csv-before")
    assert json.loads(before[0]["settings"])["stop"] == "[END]\\n"


def test_a_float_id_is_refused_naming_its_value_and_a_job_of_before_reading_7_as_its_submit_did(
    tmp_path, tiny_gpt2
):
    """pandas makes an integer id column with a missing cell floats (1.0): the refusal said only "got number";
    since reading 7 it names the value and the astype('Int64') that keeps it whole. A job read before wrote the
    old words in its errors.jsonl, and `runner repair` rebuilds that file so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1.0, 2.5], "prompt": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError) as e:
        create_job(tmp_path / "p.parquet", tiny_gpt2, job_dir=tmp_path / "refused")
    assert "id: must be a string or an integer, got 1.0, a whole number stored as a float" in str(e.value)
    assert "df['id'] = df['id'].astype('Int64')" in str(e.value) and "an integer, got 2.5" in str(e.value)
    pq.write_table(pa.table({"id": [1.0, None], "prompt": ["a", "b"]}), tmp_path / "q.parquet")
    job = create_job(tmp_path / "q.parquet", tiny_gpt2, skip_invalid=True, job_dir=tmp_path / "job")
    said = [json.loads(line)["message"] for line in (job.dir / "errors.jsonl").read_text().splitlines()]
    assert "astype('Int64')" in json.dumps(said)
    _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "now")
    assert (tmp_path / "now" / "errors.jsonl").read_bytes() == (job.dir / "errors.jsonl").read_bytes()
    _rewritten_as_read(job, 6, tmp_path / "before")
    before = (tmp_path / "before" / "errors.jsonl").read_text()
    assert "got number" in before and "Int64" not in before


def test_repair_words_the_refusals_of_a_job_of_before_reading_6_as_its_submit_did(tmp_path, tiny_gpt2):
    """Three of today's refusals say more than a job read before reading 6 wrote in its errors.jsonl: prompt_logprobs
    0's vLLM note, min_p among the sampling settings beam search drops, and a plain row's logprobs true beside a
    top_logprobs out of range names top_logprobs. Rebuilt in today's words, such a job's errors.jsonl never matched
    its checksum, and `runner repair` could not restore it ('errors.jsonl written again from the input file is not
    the one submit wrote'). The words expected are those e2c89f3's submit (reading 4) and cb285fb's (5) wrote."""
    from runner import storage

    rows = [{"id": "ok", "prompt": "Hi"}, {"id": "plp", "prompt": "Hi", "prompt_logprobs": 0},
            {"id": "top", "prompt": "Hi", "logprobs": True, "top_logprobs": 50},
            {"id": "beams", "prompt": "Hi", "num_beams": 2, "temperature": 0.7}]  # fmt: skip
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, skip_invalid=True, job_dir=tmp_path / "j"
    )
    _rewritten_as_read(job, job.meta["input"]["reading"], tmp_path / "now")
    assert storage.file_sha256(tmp_path / "now" / "errors.jsonl") == job.meta["input"]["invalid_sha256"]
    before = (
        ("plp", "prompt_logprobs", "prompt_logprobs must be true or false, got 0."),
        ("top", "logprobs", "logprobs must be in [0, 20], got 50."),
        ("beams", "num_beams", "num_beams=2 is beam search, which does not sample: drop the sampling settings "
                               "(temperature, top_p, top_k, do_sample), or use num_beams=1."),
    )  # fmt: skip
    for reading in (4, 5):
        _rewritten_as_read(job, reading, tmp_path / f"before-{reading}")
        lines = (tmp_path / f"before-{reading}" / "errors.jsonl").read_text().splitlines()
        assert [(e["id"], e["field"], e["message"]) for e in map(json.loads, lines)] == list(before)


def test_a_left_out_message_quoted_by_another_is_still_refused(tmp_path, tiny_llama):
    """A system message under a template that takes only user and assistant turns (Phi-3's first template) whose
    words the user's message also says ("Translate 'Answer in French.'"): its text was found in the prompt (the
    user's copy), and the row was taken and answered without its instructions. Each text must be there as many
    times as the messages say it; a template showing both takes the row, and a job read before reading 6 is read
    again as its submit read it."""
    from runner.batching import render_prompt

    user_only = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] | trim + '\\n' }}"
                 "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}A:")  # fmt: skip
    system = {"role": "system", "content": "Answer in French."}
    user = {"role": "user", "content": "Translate 'Answer in French.' into Japanese."}
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "quoted", "messages": [system, user]}])
    with pytest.raises(InputError) as err:
        create_job(path, tiny_llama, chat_template=user_only, home=tmp_path / "home")
    assert "p.jsonl:1: messages: the chat template leaves out item 0 (a system message)" in str(err.value)
    job = create_job(path, tiny_llama, chat_template=QWEN_TEMPLATE, home=tmp_path / "home2")
    assert job.prompts().column("prompt").to_pylist()[0].count("Answer in French.") == 2
    # the same words twice in one conversation, each shown: taken
    again = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Hi"},
    ]
    tokenizer = job_tokenizer(tiny_llama, user_only)
    assert render_prompt(None, again, tokenizer).count("Q: Hi") == 2
    assert "Translate" in render_prompt(
        None, [system, user], tokenizer, counted=False
    )  # (as a job of before)


def job_tokenizer(model: str, template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = template
    return tokenizer
