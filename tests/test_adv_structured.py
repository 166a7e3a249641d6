"""Adversarial pass 248: structured output (JSON schema, json_object, regex, choices, grammar) as a demanding user
and the fault campaign use it: every sample that ends `stop` validates against its schema, whatever keywords
the schema uses (enum, const, pattern, anyOf, $ref, additionalProperties false, Japanese values); a sample cut by
max_tokens or a stop string never claims to satisfy it; OpenAI Batch files' response_format; a row whose
matcher gives up errors once, and only that sample; a constrained, seeded job killed at its progress events and
resumed equals an uninterrupted one, token for token.

Found: a request with n > 1 whose matchers gave up in several but not all of its samples was exported as an
error line naming only the last failed sample ("sample 4 failed: ... (2 other samples were generated)"; sample 2
failed too); a plain row's `"json_object": true` (GenerationParams' name) and vLLM's `structured_outputs`,
`guided_whitespace_pattern`, `guided_decoding_backend` were kept as data without a word (the row ran
unconstrained); a grammar with a dead end past its first character failed its row with llguidance's bare
"NoExtensionBias"; a json_schema dict from Python holding a numpy integer, a set or NaN raised json's TypeError
(no field named) or reached llguidance as `NaN`.

Held: the schema keywords llguidance enforces give only valid samples (those it cannot enforce, such as `not`,
`uniqueItems` or an unknown format, are refused at submit naming file, line and field); a sample cut at
max_tokens is `length` with constraint_complete false, and one whose constraint ends exactly at max_tokens is
`stop` and complete; kills at after_generate, mid_write and after_shard, and a retry killed once, leave a
constrained job's results exactly once; Batch `logit_bias` (runner has none) is refused at submit naming
`body.logit_bias`, its empty and null forms taken."""

from __future__ import annotations

import json
import re
import signal

import pytest
import workers
from helpers import WIDE_RULES, assert_exactly_once, fresh_copy, ids_of, invoke, prepared_job, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.jobdir import read_state
from runner.jobs import create_job
from runner.openai_batch import export
from runner.worker import run_job

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
# A grammar whose matcher gives up a dozen letters in (helpers.WIDE_RULES): a sample whose first character is a
# letter fails, one that starts with a digit is the digit alone.
SOMETIMES = "start: /[0-9]/ | /[a-z]{12}/ wide\n" + WIDE_RULES


def chat(cid: str, content: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": CHAT,
            "body": {"model": "tiny", "messages": [{"role": "user", "content": content}], **body}}  # fmt: skip


def _samples_named(message: str) -> set[int]:
    """The 1-based sample numbers an error line's message says failed ("sample 2 failed", "samples 2 and 4
    failed", "samples 1, 2 and 4 failed")."""
    head = re.match(r"samples? ([\d, and]+) failed: ", message)
    return set() if head is None else {int(x) for x in re.findall(r"\d+", head.group(1))}


def test_a_request_whose_matchers_gave_up_in_some_samples_names_each_failed_sample(tmp_path, tiny_llama,
                                                                                   llama_engine):  # fmt: skip
    """n = 4, sampled, a grammar whose matcher gives up when a sample starts with a letter (about 3 in 4): each
    failed sample is a `constraint_error` row error of its own, the others are results, and the request's Batch
    error line names every failed sample. It named only the last one ("sample 4 failed: ... (2 other samples
    were generated)", sample 2 failed too)."""
    lines = [chat(f"c{i}", f"hi {i}", max_tokens=30, n=4, temperature=1.0, guided_grammar=SOMETIMES)
             for i in range(6)]  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_llama, GenerationParams(max_new_tokens=30, seed=9),
                     runner.EngineOptions(batch_size=3), job_dir=tmp_path / "job", served_model_names=("tiny",))  # fmt: skip
    assert run_job(job, llama_engine, echo=None).finished
    failed: dict[str, set[int]] = {}
    for e in runner.read_errors(job.dir):
        assert (
            e["error"] == "constraint_error"
            and "grammar: llguidance's parser gave up at token" in e["message"]
        )
        failed.setdefault(e["id"], set()).add(e["sample"] + 1)
    have = runner.load_results(job.dir).groupby("id").size().to_dict()
    assert all(have.get(c, 0) + len(s) == 4 for c, s in failed.items())
    # (about 3 samples in 4 fail: some request has two or three failed samples beside an answered one)
    assert any(1 < len(s) < 4 for s in failed.values()), failed
    written, errors = export(job, tmp_path / "out.jsonl")
    assert (written, errors) == (6 - len(failed), len(failed))
    for line in map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines()):
        cid, error = line["custom_id"], line["response"]["body"]["error"]
        assert (line["response"]["status_code"], error["code"]) == (500, "constraint_error")
        if cid in have:
            assert _samples_named(error["message"]) == failed[cid], error["message"]
            assert error["message"].endswith(f"({have[cid]} other sample{'s' if have[cid] > 1 else ''} "
                                             f"{'were' if have[cid] > 1 else 'was'} generated)")  # fmt: skip
        else:  # every sample failed: the message is the failure's own
            assert error["message"].startswith("grammar: llguidance's parser gave up at token")


# --- a constrained, seeded job killed at its progress events --------------------------------------------------

PERSON = {
    "$defs": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "type": "object",
    "properties": {
        "名前": {"enum": ["太郎", "花子", "Zoë"]},
        "age": {"$ref": "#/$defs/age"},
        "kind": {"const": "人"},
        "tag": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]},
    },
    "required": ["名前", "age", "kind", "tag"],
    "additionalProperties": False,
}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
KILL_ROWS = [
    {"id": "k0", "prompt": "Write a person", "json_schema": PERSON},
    {"id": "k1", "prompt": "The date is", "regex": DATE},
    {"id": "k2", "prompt": "答え:", "choices": ["はい", "いいえ", "😀"]},
    {"id": "k3", "prompt": "Spell it", "grammar": "start: /[a-z]{12}/ wide\n" + WIDE_RULES},  # always gives up
    {"id": "k4", "prompt": "An object", "response_format": {"type": "json_object"}},
    {"id": "k5", "prompt": "Plain words"},
    {"id": "k6", "prompt": "Someone", "response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
    {"id": "k7", "prompt": "Words", "regex": "[a-z]+( [a-z]+)*", "stop": [" "]},
]  # fmt: skip
KILL_PARAMS = GenerationParams(max_new_tokens=24, temperature=1.0, num_return_sequences=2, seed=1234)


@pytest.fixture(scope="module")
def constrained(tmp_path_factory, tiny_gpt2):
    """A constrained, seeded, sampled job not run yet, and its uninterrupted results."""
    return prepared_job(tmp_path_factory.mktemp("adv248"), tiny_gpt2, KILL_ROWS, KILL_PARAMS,
                        EngineOptions(batch_size=2))  # fmt: skip


def _check_constrained(job_dir, ref) -> None:
    """Exactly once and equal to the reference, constraint_complete too; k3 is one constraint_error per sample,
    never a result; every `stop` sample of a JSON row validates against its schema."""
    assert_exactly_once(job_dir, ref)
    df = runner.load_results(job_dir)
    cols = ["id", "sample", "text", "finish_reason", "constraint_complete"]
    assert df[cols].to_json() == ref[cols].to_json()
    errors = [(e["id"], e["sample"], e["error"]) for e in runner.read_errors(job_dir)]
    assert errors == [("k3", 0, "constraint_error"), ("k3", 1, "constraint_error")]
    for _, r in df[df["id"].isin(["k0", "k6"])].iterrows():
        if r["finish_reason"] == "stop":
            jsonschema.validate(json.loads(r["text"]), PERSON)
        assert r["constraint_complete"] is (r["finish_reason"] == "stop"), r["text"]


@pytest.mark.slow  # real worker processes
@pytest.mark.parametrize(
    "point",
    # (one point in make test; the others in make test-deep, which CI runs too: make test nears its 15 minutes)
    [
        "after_generate:2",
        *(pytest.param(p, marks=pytest.mark.deep) for p in ("mid_write:2", "after_shard:3")),
    ],
)
def test_a_constrained_job_killed_at_its_progress_events_resumes_exactly_once(tmp_path, constrained, point):
    """SIGKILL inside a `runner work` of a constrained job (JSON schemas with Japanese enums, $ref, const,
    anyOf; a regex; Japanese and emoji choices; a grammar whose matcher gives up; a stop string inside a
    regex) at a named progress event, then `runner work` again: the results are the uninterrupted run's,
    token for token, each (row, sample) once, the failed row's samples errors once each. A `runner retry`
    computes them again, to the same errors, and changes no result."""
    template, ref = constrained
    assert set(ref["id"]) == {f"k{i}" for i in range(8)} - {"k3"}
    home, job_dir = fresh_copy(tmp_path, template)
    code, out = workers.run_worker(home, env_extra={"RUNNER_FAULT": point})
    assert code == -signal.SIGKILL, out
    assert_exactly_once(job_dir, ref, complete=False)
    code, out = workers.run_worker(home)
    assert code == 0 and read_state(job_dir).state == "completed", out
    _check_constrained(job_dir, ref)
    code, out = workers.run_runner("--home", home, "retry", "job")
    assert code == 0 and "1 failed row will be tried again" in out, out
    code, out = workers.run_worker(home, env_extra={"RUNNER_FAULT": "after_generate:1"})
    assert code == -signal.SIGKILL, out
    code, out = workers.run_worker(home)
    assert code == 0 and read_state(job_dir).state == "completed", out
    _check_constrained(job_dir, ref)


def test_a_constraint_column_that_is_no_row_setting_is_said_to_be_data(tmp_path, tiny_gpt2, runner_home):
    """A row's `"json_object": true` (GenerationParams' own name for `--json`) and vLLM's other structured-output
    fields (`structured_outputs`, `guided_whitespace_pattern`, `guided_decoding_backend`) were kept as data
    without a word: every such row ran unconstrained, where a Batch body giving one is refused."""
    rows = [{"prompt": "Hello", "json_object": True, "topic": "cats"}]
    said = invoke("submit", write_jsonl(tmp_path / "p.jsonl", rows), "-m", tiny_gpt2).stderr
    assert (
        "note: 'json_object' is kept as data, not a setting: a row asks for a JSON object with "
        'response_format {"type": "json_object"}' in said
    ), said
    assert "'topic'" not in said
    rows = [{"prompt": "Hello", "structured_outputs": {"regex": "[0-9]+"}, "guided_whitespace_pattern": " ",
             "guided_decoding_backend": "xgrammar"}]  # fmt: skip
    said = invoke("submit", write_jsonl(tmp_path / "q.jsonl", rows), "-m", tiny_gpt2).stderr
    assert (
        "note: 'structured_outputs', 'guided_whitespace_pattern' and 'guided_decoding_backend' are kept as data, "
        "not settings: runner has none of them" in said
    ), said


@pytest.mark.parametrize(
    "grammar",
    [
        'start: "a" b\nb: c\nc: b',  # b and c only call each other: no sentence goes past "a"
        'start: /a+/ "b" /[^\\s\\S]/',  # a terminal no text matches, after text that some does
    ],
)
def test_a_grammar_with_a_dead_end_is_a_row_error_that_says_so(llama_engine, grammar):
    """A grammar whose first text is possible but leads nowhere passes submit's check (it looks at the first
    byte) and fails its row mid-sample; only that row: the one beside it is what it is alone. The row error read
    "grammar: llguidance's parser gave up at token 2: NoExtensionBias", llguidance's name for a mask that allows
    no token, which says nothing to a user: it now says the grammar has a dead end there."""
    from runner.engine import ConstraintError

    ids = ids_of(llama_engine, ["Hello", "Hi"])
    plain = GenerationParams(max_new_tokens=3)
    with pytest.raises(ConstraintError) as e:
        llama_engine.generate(ids, [GenerationParams(max_new_tokens=8, grammar=grammar), plain], [1, 2])
    assert list(e.value.failed) == [0] and e.value.done[0] is None
    message = e.value.failed[0]
    assert message.startswith("grammar: llguidance's parser gave up at token "), message
    assert (
        "no token may follow the text so far, not even its end: the grammar has a dead end there" in message
    )
    (alone,) = llama_engine.generate([ids[1]], [plain], [2])
    assert e.value.done[1].token_ids == alone.token_ids


# --- OpenAI Batch files ----------------------------------------------------------------------------------------


def test_a_batch_files_response_formats_and_refusals_read_as_openai_objects(tmp_path, tiny_llama):
    """run-batch --skip-invalid of chat requests with response_format json_schema (strict, n = 3, sampled), one
    with max_tokens too small to close the object, json_object, guided_choice with Japanese and emoji, a schema
    llguidance cannot compile and logit_bias (runner has none) in its forms: each answered line is an openai
    ChatCompletion whose `stop` contents validate against the schema and whose `length` ones do not parse;
    each refused line is a 400 naming its line and field, in input order among the others, its `error` an
    openai ErrorObject; logit_bias {} and null are taken."""
    from test_openai_batch import check_output_line

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    lines = [
        chat("s", "人を一人", response_format=fmt, max_tokens=60, n=3, temperature=1.0, seed=4),
        chat("short", "人", response_format=fmt, max_tokens=3),
        chat("obj", "An object", response_format={"type": "json_object"}, max_tokens=30),
        chat("pick", "はい?", guided_choice=["はい", "いいえ", "😀"], n=2, temperature=1.0),
        chat("bad", "x", response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {}}}}),
        chat("lb1", "x", logit_bias={"15": 100}),
        chat("lb2", "x", logit_bias={"abc": -100}),
        chat("lb3", "x", logit_bias={"15": 200}),
        chat("lb4", "x", logit_bias={}),
        chat("lb5", "x", logit_bias=None, max_tokens=2),
    ]  # fmt: skip
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    result = invoke("run-batch", "-i", inp, "-o", out, "-m", tiny_llama, "--served-model-name", "tiny",
                    "--skip-invalid", "--max-new-tokens", "8")  # fmt: skip
    assert result.exit_code == 0, result.output
    answered = {x["custom_id"]: check_output_line(x) for x in map(json.loads, out.read_text().splitlines())}
    assert list(answered) == ["s", "short", "obj", "pick", "lb4", "lb5"]
    assert len(answered["s"].choices) == 3 and len(answered["pick"].choices) == 2
    for choice in answered["s"].choices + answered["short"].choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), PERSON)
        else:
            assert choice.finish_reason == "length"
            with pytest.raises(ValueError):
                json.loads(choice.message.content)
    (short,) = answered["short"].choices
    assert short.finish_reason == "length" and answered["short"].usage.completion_tokens == 3
    for choice in answered["obj"].choices:
        assert choice.finish_reason == "length" or isinstance(json.loads(choice.message.content), dict)
    assert {c.message.content for c in answered["pick"].choices} <= {"はい", "いいえ", "😀"}
    refused = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in refused] == ["bad", "lb1", "lb2", "lb3"]
    for x, line, field in zip(
        refused, (5, 6, 7, 8), ["response_format"] + ["body.logit_bias"] * 3, strict=True
    ):
        assert check_output_line(x) is None and x["response"]["status_code"] == 400
        error = x["response"]["body"]["error"]
        assert error["message"].startswith(f"line {line}: {field}: ") and error["param"] == field, error
    assert (
        'json_schema cannot be compiled: Unimplemented keys: ["not"]'
        in refused[0]["response"]["body"]["error"]["message"]
    )


def test_a_constrained_sample_cut_by_max_tokens_never_claims_its_constraint(tiny_llama, llama_engine):
    """max_new_tokens too small to finish: `length`, constraint_complete false, text not what the constraint
    allows; just enough: `stop` and complete; more: the same text (the constraint, not max_new_tokens, ended
    it). In one batch, greedy."""
    ids = ids_of(llama_engine, ["Hello"])
    for kw, whole in (({"choices": ["abcdef"]}, lambda t: t == "abcdef"),
                      ({"json_schema": {"enum": [12345, "はい"]}}, lambda t: t in ("12345", '"はい"')),
                      ({"regex": "[0-9]{4}"}, lambda t: re.fullmatch("[0-9]{4}", t))):  # fmt: skip
        params = [GenerationParams(max_new_tokens=k, **kw) for k in range(1, 9)]
        outs = llama_engine.generate(ids * len(params), params)
        ended = next(i for i, c in enumerate(outs) if c.finish_reason == "stop")
        for c in outs[:ended]:
            assert (c.finish_reason, c.constraint_complete) == ("length", False) and not whole(c.text), (
                kw,
                c,
            )
        for c in outs[ended:]:
            assert (c.finish_reason, c.constraint_complete, c.text) == ("stop", True, outs[ended].text), (
                kw,
                c,
            )
            assert whole(c.text) and len(c.token_ids) == ended + 1


# --- schemas ---------------------------------------------------------------------------------------------------

SCHEMAS = {
    "person": PERSON,
    "anyOf": {"anyOf": [{"type": "integer", "minimum": 10}, {"type": "string", "maxLength": 3}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"a": {"maximum": 3}}}]},
    "multipleOf": {"type": "integer", "multipleOf": 7},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                          "additionalProperties": False, "maxProperties": 2},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"enum": ["日本", "x"]}], "items": False},
    "recursive": {"$defs": {"t": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/t"},
                  "maxItems": 2}}, "required": ["k"], "additionalProperties": False}}, "$ref": "#/$defs/t"},
    "bounds": {"type": "number", "exclusiveMinimum": -1.5, "maximum": 2.25},
    "const": {"const": {"a": [1, "二"], "b": None}},
    "pattern": {"type": "string", "pattern": "^[ぁ-ん]{2,3}$"},
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_stop_sample_validates_against_its_schema(llama_engine, name):
    """Sampled at temperature 1.5 (a random model goes everywhere the mask lets it): every sample that ends
    `stop` parses and validates against the schema (jsonschema, draft 2020-12) and says so; a `length` one is
    complete only if it does."""
    schema = SCHEMAS[name]
    params = GenerationParams(max_new_tokens=80, json_schema=schema, temperature=1.5, do_sample=True)
    outs = llama_engine.generate(ids_of(llama_engine, ["Hello"]) * 12, params, list(range(12)))
    validator = jsonschema.Draft202012Validator(schema)
    assert any(c.finish_reason == "stop" for c in outs), name
    for c in outs:
        try:
            valid = validator.is_valid(json.loads(c.text))
        except ValueError:
            valid = False
        assert c.constraint_complete is valid and (valid or c.finish_reason == "length"), (name, c.text)


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ({"type": "integer", "maximum": "NUMPY"}, "Object of type int64 is not JSON serializable"),
        ({"enum": {1, 2}}, "Object of type set is not JSON serializable"),
        ({"const": float("nan")}, "Out of range float values are not JSON compliant"),
    ],
)
def test_a_schema_dict_holding_what_json_has_not_is_a_param_error_naming_the_field(schema, why):
    """GenerationParams(json_schema={"maximum": df["age"].max()}) from Python: a numpy integer (or a set) raised
    json's own TypeError, naming no field; a NaN reached llguidance as `NaN` and read "cannot be compiled:
    expected value at line 1 column 11"."""
    import numpy as np

    from runner.errors import ParamError

    if schema.get("maximum") == "NUMPY":
        schema = {**schema, "maximum": np.int64(5)}
    with pytest.raises(ParamError, match=f"json_schema must hold JSON values only .*: {why}") as e:
        GenerationParams(json_schema=schema)
    assert e.value.param == "json_schema"
    assert GenerationParams(json_schema={"enum": (1, 2)}).json_schema == {"enum": (1, 2)}  # a tuple is a list
