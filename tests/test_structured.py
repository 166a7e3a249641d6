"""Structured output (constraints.py): every sample that ends with `stop` satisfies its JSON schema, regex or
choices; the others are flagged incomplete; a mixed batch equals each row alone; log-probs stay raw; bad
schemas and patterns are refused at submit naming the row. Tiny random models for the properties (a random
model obeys a constraint only if the mask makes it), the demo model for real extraction jobs."""

import json
import re

import pytest
import torch
from helpers import WIDE_RULES, assert_same_completions, ids_of, invoke, plain_logprobs, write_jsonl

import runner
from runner import GenerationParams, InputError, constraints
from runner.errors import ParamError
from runner.jobs import create_job
from runner.params import row_overrides, row_params
from runner.worker import run_job

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "job": {"enum": ["student", "teacher", "engineer", "doctor", "other"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"type": "string", "maxLength": 20},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "job", "hobbies", "home"],
    "additionalProperties": False,
}
DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
SMALL = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
}


def satisfies(params: GenerationParams, text: str) -> bool:
    if params.json_schema is not None or params.json_object:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        schema = params.json_schema or {"type": "object"}
        return jsonschema.Draft202012Validator(schema).is_valid(value)
    if params.regex is not None:
        return re.fullmatch(params.regex, text) is not None
    return text in params.choices


def assert_obeyed(params_per_row, completions):
    """Every `stop` sample satisfies its constraint and says so; every other one is flagged incomplete."""
    for p, c in zip(params_per_row, completions, strict=True):
        if c.finish_reason == "stop":
            assert satisfies(p, c.text) and c.constraint_complete is True, (c.text, p)
        else:
            assert c.constraint_complete is satisfies(p, c.text), (c.text, p)


# --- settings ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"json_schema": "{not json"}, "json_schema", "json_schema must be a JSON schema, got invalid JSON"),
        ({"json_schema": [1]}, "json_schema", "json_schema must be a JSON schema object"),
        (
            {"json_schema": {"type": "foo"}},
            "json_schema",
            "json_schema cannot be compiled: Invalid type: foo",
        ),
        ({"regex": "[a-"}, "regex", "regex cannot be compiled: .*unclosed character class"),
        ({"regex": ""}, "regex", "regex must be a non-empty string"),
        ({"choices": []}, "choices", "choices must be a list of non-empty strings"),
        ({"choices": ["a", ""]}, "choices", "choices must be a list of non-empty strings"),
        ({"grammar": "start: nope"}, "grammar", 'grammar cannot be compiled: .*unknown name: "nope"'),
        # languages that hold no text: every row would end at once with an empty answer
        ({"regex": "[a&&b]"}, "regex", "regex matches no text at all: no answer could satisfy it"),
        ({"regex": "x[^\\s\\S]"}, "regex", "regex matches no text at all"),
        ({"grammar": 'start: /[^\\s\\S]/ "a"'}, "grammar", "grammar matches no text at all"),
        (
            {"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}},
            "json_schema",
            "json_schema cannot be compiled: Unsatisfiable",
        ),
        ({"json_object": "yes"}, "json_object", "json_object must be true or false"),
        ({"regex": "a", "choices": ["a"]}, "choices", "give one of json_schema, .*; got regex and choices"),
        ({"regex": "a", "num_beams": 2}, "regex", "regex cannot be combined with num_beams > 1"),
    ],
)
def test_bad_constraints_name_the_setting(kwargs, field, message):
    with pytest.raises(ParamError, match=message) as e:
        GenerationParams(**kwargs)
    assert e.value.param == field


def test_a_schema_dict_too_deep_to_write_is_a_param_error():
    # a dict from Python (a JSON text that deep is refused as it is read): json.dumps raised RecursionError
    schema: dict = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ParamError, match="json_schema cannot be compiled: nested too deeply"):
        GenerationParams(json_schema=schema)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"regex": "(x|[^\\s\\S])"},  # one branch is empty, the other is not
        {"regex": "あ+"},  # multi-byte first characters
        {"json_schema": {"enum": ["日本"]}},
        {"choices": ["😀"]},
        {"grammar": 'start: "yes" <|im_end|>'},  # a model's special token: its own tokenizer judges it
    ],
)
def test_constraints_that_match_some_text_are_accepted(kwargs):
    assert constraints.kind_of(GenerationParams(**kwargs)) is not None


def test_settings_normalise_and_rows_replace_the_jobs_constraint():
    p = GenerationParams(json_schema=json.dumps(SMALL), choices=None)
    assert p.json_schema == SMALL and GenerationParams(choices=("a", "b")).choices == ["a", "b"]
    # unset constraint fields are left out of to_dict, so jobs made before them keep their fingerprint
    assert (
        "regex" not in GenerationParams().to_dict() and GenerationParams(regex="a").to_dict()["regex"] == "a"
    )
    job = GenerationParams(regex="[0-9]+")
    assert row_params(job, True, row_overrides({"choices": ["x"]})).regex is None
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}}
    assert row_params(job, True, row_overrides({"response_format": fmt})).json_schema == SMALL
    assert row_params(job, True, row_overrides({"response_format": {"type": "json_object"}})).json_object
    assert row_params(job, True, row_overrides({"choices": None, "response_format": None})).regex == "[0-9]+"
    plain = row_params(job, True, row_overrides({"response_format": {"type": "text"}}))
    assert plain.regex is None and not plain.json_object
    with pytest.raises(ParamError, match="response_format json_schema needs"):
        row_overrides({"response_format": {"type": "json_schema", "json_schema": SMALL}})
    with pytest.raises(ParamError, match="give one of 'response_format' and 'json_schema'"):
        row_overrides({"response_format": fmt, "json_schema": SMALL})


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        # some servers take a schema here: it was dropped, and the row's answer was any object
        (
            {"type": "json_object", "schema": SMALL},
            "response_format json_object takes no 'schema' .*json_schema",
        ),
        ({"type": "text", "regex": "[0-9]+"}, "response_format text takes no 'regex' \\(it would be ignored"),
        ({"type": "json_schema", "json_schema": {"schema": SMALL}, "strict": True}, "takes no 'strict'"),
        (
            {"type": "json_schema", "json_schema": {"schema": SMALL, "pattern": "x"}},
            "response_format json_schema takes no json_schema.'pattern'",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": SMALL, "strict": "yes"}},
            "strict must be true or",
        ),
    ],
)
def test_a_response_format_key_nothing_reads_is_refused(fmt, message):
    with pytest.raises(ParamError, match=message) as e:
        row_overrides({"response_format": fmt})
    assert e.value.param == "response_format"


def test_a_response_format_keeps_what_the_openai_sdk_writes():
    spec = {"name": "s", "description": None, "schema": SMALL, "strict": None}
    fmt = {"type": "json_schema", "json_schema": spec}
    assert row_overrides({"response_format": fmt}) == {"json_schema": SMALL}
    spec = {"name": "s", "description": "a person", "schema": SMALL, "strict": True}
    assert row_overrides({"response_format": {"type": "json_schema", "json_schema": spec}}) == {
        "json_schema": SMALL
    }
    assert row_overrides({"response_format": {"type": "json_object", "json_schema": None}}) == {
        "json_object": True
    }


# --- the engine, on tiny random models ----------------------------------------------------------------------

PROMPTS = ["The quick brown fox", "Hello", "A language model reads", "My friend", "Our team", "The robot"]
MIXED = [
    GenerationParams(max_new_tokens=24, json_schema=SMALL),
    GenerationParams(max_new_tokens=12, regex=DATE, temperature=1.0, do_sample=True),
    GenerationParams(max_new_tokens=8, choices=["yes", "no", "maybe not"], temperature=0.7),
    GenerationParams(max_new_tokens=6),
    GenerationParams(max_new_tokens=30, json_object=True, temperature=0.9, top_p=0.9),
    GenerationParams(max_new_tokens=10, regex="[a-z]+( [a-z]+)*", stop=[" "]),
]


@pytest.mark.parametrize("engine_name", [pytest.param("gpt2_engine", marks=pytest.mark.slow), "llama_engine"])
def test_a_mixed_batch_obeys_and_equals_each_row_alone(engine_name, request):
    """Rows with different constraints (and none) in one batch, also decoded a few at a time with rows joining
    as others end: each equals the row run alone, and each obeys its constraint."""
    engine = request.getfixturevalue(engine_name)
    ids = ids_of(engine, PROMPTS)
    seeds = list(range(11, 17))
    batched = engine.generate(ids, MIXED, seeds)
    refill = engine.generate(ids, MIXED, seeds, max_active=2)
    alone = [engine.generate([i], [p], [s])[0] for i, p, s in zip(ids, MIXED, seeds, strict=True)]
    assert_same_completions(batched, alone)
    assert_same_completions(refill, alone)
    assert [c.constraint_complete for c in batched] == [c.constraint_complete for c in alone]
    assert batched[3].constraint_complete is None  # no constraint
    constrained = [(p, c) for p, c in zip(MIXED, batched, strict=True) if p is not MIXED[3]]
    assert_obeyed(*zip(*constrained, strict=True))
    assert batched[1].finish_reason == batched[2].finish_reason == "stop"  # bounded patterns always complete


def test_rows_sharing_a_grammar_compile_it_once_and_each_decode_on_their_own(llama_engine, monkeypatch):
    """A job's rows (and a row's samples) share their constraint: it is compiled once per `generate` and each
    row gets its own copy of the compiled matcher, so one row's tokens never move another's parser."""
    import llguidance

    real, made = llguidance.LLMatcher, []

    def counting(*args, **kwargs):
        made.append(args[1])
        return real(*args, **kwargs)

    schema = constraints.grammar_of(GenerationParams(json_schema={"type": "object"}))
    digits = constraints.grammar_of(GenerationParams(regex="[0-9]+"))
    tok = constraints.tokenizer_of(llama_engine.tokenizer, llama_engine.eos_ids)
    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    c = constraints.Constraints(tok, [schema, None, digits, schema, schema, digits])
    assert sorted(made) == sorted([schema, digits])
    vocab = len(llama_engine.tokenizer)
    allowed = c.mask(torch.zeros(1, vocab), [0]).isfinite()[0]
    first = int(allowed.nonzero()[0])
    assert c.advance([0], [first]) == [False]
    # (rows 3 and 4 have not moved: what row 0 may take next is not what they may take first)
    assert len(c.accepting[0]) == 2 and len(c.accepting[3]) == len(c.accepting[4]) == 1
    assert not torch.equal(c.mask(torch.zeros(1, vocab), [0]), c.mask(torch.zeros(1, vocab), [3]))
    assert torch.equal(c.mask(torch.zeros(1, vocab), [3]).isfinite()[0], allowed)


def test_log_probs_stay_raw_and_n_samples_differ(gpt2_engine):
    """The mask picks the token; token_logprobs are the raw model's log P(token), as one unpadded forward
    pass gives them (a forced token may be very unlikely)."""
    ids = ids_of(gpt2_engine, ["The old man"])[0]
    p = GenerationParams(max_new_tokens=12, regex=DATE, num_return_sequences=3)
    samples = gpt2_engine.generate([ids] * 3, p, [1, 2, 3])
    assert len({c.text for c in samples}) > 1
    for c in samples:
        lps, _ = plain_logprobs(gpt2_engine, ids + c.token_ids)
        assert c.token_logprobs == pytest.approx(lps[len(ids) - 1 :], abs=1e-4)
        assert re.fullmatch(DATE, c.text) and c.constraint_complete


def test_stop_strings_and_eos_inside_a_constraint(gpt2_engine):
    """A stop string cuts the text: complete only when what is left satisfies the constraint. A row whose
    constraint allows ending there may end with EOS (all of the model's EOS ids are allowed)."""
    ids = ids_of(gpt2_engine, PROMPTS[:2])
    cut = gpt2_engine.generate(ids, GenerationParams(max_new_tokens=12, regex=DATE, stop=["-"]))
    for c in cut:
        assert c.stop_reason == "-" and re.fullmatch("[0-9]{4}", c.text) and c.constraint_complete is False
    words = GenerationParams(max_new_tokens=16, regex="[a-z]+(;[a-z]+)*", stop=[";"])
    for c in gpt2_engine.generate(ids, words):
        assert ";" not in c.text and (c.constraint_complete is (re.fullmatch("[a-z]+", c.text) is not None))


def test_a_grammar_naming_the_eos_token_is_complete_once_the_model_writes_it(gpt2_engine):
    """A grammar may name the model's EOS token (`start: "yes" <|im_end|>` for a chat model whose EOS it is): the
    sample that wrote it ended `stop` with exactly the grammar's tokens, yet read constraint_complete false, as
    the EOS was never fed to the matcher. A grammar that goes on after the EOS is not satisfied where it ends."""
    ids = ids_of(gpt2_engine, PROMPTS[:2])
    for grammar, complete in (('start: "a" <|endoftext|>', True), ('start: "a" <|endoftext|> "b"', False)):
        for c in gpt2_engine.generate(ids, GenerationParams(max_new_tokens=6, grammar=grammar)):
            assert (c.text, c.finish_reason, c.token_ids[-1]) == ("a", "stop", gpt2_engine.eos_ids[0])
            assert c.constraint_complete is complete, grammar


def test_a_constraint_that_allows_nothing_more_ends_the_sample_before_min_new_tokens(gpt2_engine):
    """min_new_tokens holds EOS back, but a whole choice can take nothing more: the constraint wins, and the
    sample ends with a text that satisfies it (not EOS-less filler, not an arbitrary token)."""
    ids = ids_of(gpt2_engine, PROMPTS[:3])
    params = GenerationParams(max_new_tokens=12, min_new_tokens=10, choices=["yes", "no"])
    for c in gpt2_engine.generate(ids, params):
        assert c.text in ("yes", "no") and c.finish_reason == "stop" and c.constraint_complete is True
        assert len(c.token_ids) < 10


def test_a_constraint_that_allows_only_the_empty_text_ends_at_once_before_min_new_tokens(llama_engine):
    """A regex matching only the empty text allows nothing but EOS from the first step: min_new_tokens held that
    back too, every score was -inf, and a token the constraint forbids was picked (<unk>, or any sampled one),
    `stop` with constraint_complete false. The row beside it, unconstrained, still waits for min_new_tokens."""
    ids = ids_of(llama_engine, PROMPTS[:2])
    for sample in ({}, {"do_sample": True, "top_k": 5}):
        empty = GenerationParams(max_new_tokens=5, min_new_tokens=3, regex="a{0}", **sample)
        free = GenerationParams(max_new_tokens=5, min_new_tokens=3, **sample)
        c, other = llama_engine.generate(ids, [empty, free], seeds=[1, 2])
        assert (c.text, c.finish_reason, c.constraint_complete) == ("", "stop", True)
        assert c.token_ids == [llama_engine.eos_ids[0]] and len(other.token_ids) >= 3


# --- jobs, the command line and OpenAI Batch files -----------------------------------------------------------


def test_per_row_constraints_in_a_job_and_the_constraint_complete_column(tmp_path, tiny_gpt2, gpt2_engine):
    rows = [
        {"id": "a", "prompt": "Hello", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}}},
        {"id": "b", "prompt": "Hello", "regex": DATE},
        {"id": "c", "prompt": "Hello", "choices": ["red", "green"], "n": 2, "temperature": 1.0},
        {"id": "d", "prompt": "Hello"},
        {"id": "e", "prompt": "Hello", "json_schema": SMALL},
        {"id": "f", "prompt": "Hello", "response_format": {"type": "json_object"}},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=24, seed=3), job_dir=tmp_path / "job")
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir).set_index(["id", "sample"])
    assert df.loc[("d", 0), "constraint_complete"] is None
    assert re.fullmatch(DATE, df.loc[("b", 0), "text"]) and df.loc[("b", 0), "constraint_complete"]
    assert {df.loc[("c", s), "text"] for s in (0, 1)} <= {"red", "green"}
    for key in [("a", 0), ("e", 0), ("f", 0)]:
        r = df.loc[key]
        if r["finish_reason"] == "stop":
            assert r["constraint_complete"] and isinstance(json.loads(r["text"]), dict)
        else:
            assert r["constraint_complete"] is False


def test_a_rows_schema_keeps_its_key_order(tmp_path, tiny_gpt2, gpt2_engine):
    # JSON objects come out in the schema's key order (as OpenAI's structured outputs): a row's schema, given as
    # json_schema or as a Batch response_format, must not be stored with its keys sorted
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    rows = [
        {"id": "a", "prompt": "Hello", "json_schema": schema},
        {"id": "b", "prompt": "Hi", "response_format": fmt},
    ]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=24),
                     job_dir=tmp_path / "job")  # fmt: skip
    stored = [json.loads(s) for s in job.prompts().column("settings").to_pylist()]
    assert [list(s["json_schema"]["properties"]) for s in stored] == [["zeta", "alpha"]] * 2
    assert run_job(job, gpt2_engine, echo=None).finished
    for text in runner.load_results(job.dir)["text"]:
        first = re.match(r'\s*\{\s*"(\w+)', text)
        assert first and "zeta".startswith(first.group(1)), text


def test_a_bad_row_constraint_is_refused_at_submit_naming_the_row(tmp_path, tiny_gpt2):
    rows = [
        {"id": "ok", "prompt": "Hello", "regex": "[0-9]+"},
        {"id": "bad", "prompt": "Hello", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
        {"id": "bad2", "prompt": "Hello", "regex": "(unclosed"},
        {"id": "bad3", "prompt": "Hello", "choices": "yes"},
        {"id": "bad4", "prompt": "Hello", "regex": "[a&&b]"},
        {"id": "bad5", "prompt": "Hello", "response_format": {"type": "json_object", "schema": SMALL}},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as e:
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=4), job_dir=tmp_path / "job")
    text = str(e.value)
    assert f"{path}:2: response_format: json_schema cannot be compiled: Invalid type: nope" in text
    assert re.search(rf"{re.escape(str(path))}:3: regex: regex cannot be compiled: .*unclosed", text)
    assert (
        f'{path}:4: choices: choices must be a list of non-empty strings (in JSON, as ["yes", "no"]), got \'yes\''
        in text
    )
    assert f"{path}:5: regex: regex matches no text at all: no answer could satisfy it" in text
    assert (
        f"{path}:6: response_format: response_format json_object takes no 'schema' (it would be ignored"
        in text
    )
    assert not (tmp_path / "job").exists()


def test_a_grammar_naming_a_token_the_model_lacks_is_refused_at_submit(tmp_path, tiny_gpt2):
    # a grammar may name special tokens, which the check on a tokenizer of bytes cannot judge: one the model's
    # tokenizer lacks was accepted, then stopped the whole run at the first batch holding the row
    rows = [
        {"id": "ok", "prompt": "Hello", "grammar": 'start: "a" <|endoftext|>'},
        {"id": "bad", "prompt": "Hello", "grammar": 'start: "a" <|im_end|>'},
        {"id": "bad2", "prompt": "Hello", "grammar": "start: <[128000]>"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as e:
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=4), job_dir=tmp_path / "job")
    text = str(e.value)
    assert f"{path}:2: grammar: grammar cannot be used with this model's tokenizer:" in text
    assert 'unknown special token: "<|im_end|>"' in text and "\n   1 |" not in text
    assert f"{path}:3: grammar: grammar cannot be used with this model's tokenizer:" in text
    assert ":1:" not in text and not (tmp_path / "job").exists()
    with pytest.raises(ParamError, match="grammar cannot be used with this model's tokenizer: .*<\\|im_end"):
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=4, grammar='start: <|im_end|>'),
                   job_dir=tmp_path / "job2")  # fmt: skip


def test_constraint_options_on_the_command_line(tmp_path, tiny_gpt2):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)])
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SMALL))
    for args, check in [
        (["--json-schema", schema], lambda t: jsonschema.validate(json.loads(t), SMALL) is None),
        (["--json-schema", json.dumps(SMALL)], lambda t: jsonschema.validate(json.loads(t), SMALL) is None),
        (["--regex", DATE], lambda t: re.fullmatch(DATE, t)),
        (["--choice", "left", "--choice", "right"], lambda t: t in ("left", "right")),
        (["--json"], lambda t: isinstance(json.loads(t), dict)),
    ]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = invoke("run", prompts, "-m", tiny_gpt2, "--max-new-tokens", 24, *args, "-o", out)
        assert result.exit_code == 0, result.output
        df = runner.load_results(out)
        done = df[df["finish_reason"] == "stop"]
        assert all(check(t) for t in done["text"]) and done["constraint_complete"].all()
        assert not df[df["finish_reason"] == "length"]["constraint_complete"].any()
    result = invoke("run", prompts, "-m", tiny_gpt2, "--regex", "[a-", "-o", tmp_path / "bad")
    assert result.exit_code == 1 and result.output.startswith("Error: --regex: regex cannot be compiled: ")
    result = invoke("run", prompts, "-m", tiny_gpt2, "--json", "--choice", "a", "-o", tmp_path / "bad")
    assert result.exit_code == 1 and "Error: --choice: give one of" in result.output
    result = invoke(
        "run", prompts, "-m", tiny_gpt2, "--grammar", tmp_path / "none.lark", "-o", tmp_path / "bad"
    )
    assert result.exit_code == 1 and "Error: --grammar: cannot read grammar file" in result.output


def test_a_lark_grammar_and_a_gbnf_grammar(gpt2_engine):
    ids = ids_of(gpt2_engine, PROMPTS[:3])
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[0-9]{1,3}/'
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [0-9] [0-9]? [0-9]?'
    pattern = r"\([0-9]{1,3}(\+[0-9]{1,3})*\)"
    for grammar in (lark, gbnf):
        for c in gpt2_engine.generate(ids, GenerationParams(max_new_tokens=20, grammar=grammar)):
            assert c.constraint_complete is (re.fullmatch(pattern, c.text) is not None)
            assert c.finish_reason == "length" or c.constraint_complete


def test_openai_batch_response_format(tmp_path, tiny_llama):
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "strict": True, "schema": SMALL}}
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 24,
                  "temperature": 0, "response_format": fmt}}
        for i, p in enumerate(PROMPTS[:3])
    ] + [{"custom_id": "g", "method": "POST", "url": "/v1/completions",
          "body": {"model": "tiny", "prompt": "Hi", "max_tokens": 8, "guided_choice": ["up", "down"]}}]  # fmt: skip
    inp, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    result = invoke("run-batch", "-i", inp, "-o", out, "-m", tiny_llama, "--served-model-name", "tiny")
    assert result.exit_code == 0, result.output
    answers = {
        x["custom_id"]: x["response"]["body"]["choices"][0]
        for x in map(json.loads, out.read_text().splitlines())
    }
    assert answers["g"]["text"] in ("up", "down")
    for i in range(3):
        choice = answers[f"r{i}"]
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), SMALL)


# --- the demo model: real extraction, dates and labels, >= 50 rows each ---------------------------------------

NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Julia"]
CITIES = [
    ("Paris", "France"),
    ("Berlin", "Germany"),
    ("Tokyo", "Japan"),
    ("Lima", "Peru"),
    ("Oslo", "Norway"),
]
JOBS = ["teacher", "engineer", "doctor", "student", "baker"]
HOBBIES = ["chess", "tennis", "cooking", "hiking", "painting", "music"]


def people(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        city, country = CITIES[i % 5]
        text = (f"{NAMES[i % 10]} is {20 + (i * 7) % 50} years old and works as a {JOBS[i % 5]} in {city}, "
                f"{country}. {NAMES[i % 10]} likes {HOBBIES[i % 6]} and {HOBBIES[(i + 2) % 6]}.")  # fmt: skip
        rows.append({"id": f"p{i}", "prompt": f"Extract the person described below as JSON.\n\n{text}"})
    return rows


def dates(n: int) -> list[dict]:
    events = ["New Year's Day", "Christmas Day", "the first day of spring", "Halloween", "Valentine's Day"]
    return [{"id": f"d{i}", "prompt": f"On what date is {events[i % 5]} in {1990 + i}? Answer as YYYY-MM-DD."}
            for i in range(n)]  # fmt: skip


def reviews(n: int) -> list[dict]:
    good = ["I loved it", "Great value", "Works perfectly", "Best purchase this year", "Wonderful service"]
    bad = ["It broke after a day", "Terrible support", "Waste of money", "Arrived damaged", "Never again"]
    texts = [(good if i % 2 else bad)[i % 5] + f" (order {i})." for i in range(n)]
    return [
        {"id": f"r{i}", "prompt": f"Is this review positive, negative or neutral?\n\n{t}"}
        for i, t in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def demo_engine():
    from runner.engine import Engine

    return Engine("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "params"),
    [
        (people(24), GenerationParams(max_new_tokens=80, json_schema=PERSON)),
        (dates(24), GenerationParams(max_new_tokens=12, regex=DATE)),
        (reviews(24), GenerationParams(max_new_tokens=6, choices=["positive", "negative", "neutral"])),
    ],
    ids=["json-schema", "regex-dates", "choices"],
)
def test_demo_model_jobs_obey_their_constraint(tmp_path, demo_engine, rows, params):
    """24-row jobs on the demo model (--chat): every `stop` output validates (jsonschema / re.fullmatch /
    membership) and is flagged complete; every other one is flagged incomplete."""
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    job, summary = runner.run(
        path, "smollm2-135m-instruct", params, output=tmp_path / "job", chat=True, echo=None
    )
    assert summary.finished
    df = runner.load_results(job.dir)
    assert len(df) == 24
    for _, r in df.iterrows():
        if r["finish_reason"] == "stop":
            assert satisfies(params, r["text"]) and r["constraint_complete"] is True, r["text"]
        else:
            assert r["constraint_complete"] is False, r["text"]
    assert (df["finish_reason"] == "stop").mean() >= 0.5  # the constraint is usable, not only safe


def test_a_constrained_job_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, tiny_gpt2, gpt2_engine):
    from runner.jobdir import Job

    rows = [{"id": f"r{i}", "prompt": p, **({"regex": DATE} if i % 2 else {})} for i, p in enumerate(PROMPTS)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    params = GenerationParams(
        max_new_tokens=16, json_schema=SMALL, temperature=1.0, num_return_sequences=2, seed=5
    )
    ref_job, _ = runner.run(path, tiny_gpt2, params, output=tmp_path / "ref", engine=gpt2_engine, echo=None)
    ref = runner.load_results(ref_job.dir)
    job = create_job(path, tiny_gpt2, params, runner.EngineOptions(batch_size=2), job_dir=tmp_path / "cut")
    calls = []
    summary = run_job(
        job, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: calls.append(1) or len(calls) > 2
    )
    assert not summary.finished and 0 < summary.done < 12
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    resumed = runner.load_results(job.dir)
    cols = ["id", "sample", "text", "token_ids", "finish_reason", "constraint_complete"]
    assert resumed[cols].to_json() == ref[cols].to_json()
    assert ref["constraint_complete"].notna().all()


def test_a_masks_bits_unpack_the_same_on_the_gpu_path_as_with_numpy(test_device):
    """llguidance's bitmask (bit j of int32 word i: token 32 i + j allowed) is unpacked with numpy on a CPU and
    with torch on the device on a GPU: both say the same tokens are refused (here both on the test device)."""
    import torch

    from runner import constraints

    bits = torch.randint(
        -(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0)
    )
    bits[0, 0] = -1  # every token of the word allowed
    bits[1, 0] = 0  # none of them
    bits[2, 0] = 1 << 5  # token 5 only
    expected = torch.tensor(
        [[(int(w) >> j) & 1 == 0 for w in row for j in range(32)] for row in bits.tolist()]
    )
    assert torch.equal(constraints._unpack_with_numpy(bits), expected)
    assert torch.equal(constraints._unpack_with_torch(bits, test_device).cpu(), expected)
    assert (
        constraints.unpack_refused(bits, torch.device(test_device)).device.type
        == torch.device(test_device).type
    )
    assert (
        not expected[0, :32].any() and expected[1, :32].all() and expected[2, :32].tolist().count(False) == 1
    )


def test_constraint_complete_judges_the_text_returned(tiny_llama, llama_engine):
    """`constraint_complete` was False for texts that satisfy the constraint whenever the text ends inside a
    generated token (adversarial pass 46): a character cut by max_new_tokens and held back ('a' of regex
    a(🐱)*), or a stop string cut in the middle of a token ('ang' of [a-z]{1,30} with stop 'u'). And it stays
    False for a text that does not satisfy it, however it ends."""
    for kw, ok in (({"regex": "a(🐱)*"}, lambda t: re.fullmatch("a(🐱)*", t)),
                   ({"choices": ["a", "a🐱"]}, lambda t: t in ["a", "a🐱"])):  # fmt: skip
        (c,) = runner.generate(
            ["Hello"], tiny_llama, GenerationParams(max_new_tokens=3, **kw), engine=llama_engine
        )[0]
        assert c.finish_reason == "length" and c.constraint_complete == bool(ok(c.text)), (kw, c.text)
    params = GenerationParams(max_new_tokens=30, temperature=1.0, num_return_sequences=20, seed=4,
                              regex="[a-z]{1,30}", stop=["u", "e"])  # fmt: skip
    samples = runner.generate(["Word: "], tiny_llama, params, engine=llama_engine)[0]
    cut = [c for c in samples if c.stop_reason is not None]
    assert cut and all(c.constraint_complete == bool(re.fullmatch("[a-z]{1,30}", c.text)) for c in cut)
    params = GenerationParams(max_new_tokens=3, regex="(ab){30}")  # cut short: not complete
    assert runner.generate(["Hi"], tiny_llama, params, engine=llama_engine)[0][0].constraint_complete is False


# --- a matcher that fails mid-sample -------------------------------------------------------------------------

# GBNF's habit for "one or more": right recursion, one level of nesting per character. llguidance's Earley rows
# then grow by one item per character, and at ~2,000 bytes (`max_items_in_row`) its matcher gives up.
RIGHT_RECURSIVE = "root ::= [a-z] root | [a-z]"
# A parser limit reached after a dozen characters: a row of 2,100 items (each alternative a rule of its own).
WIDE = "start: /[a-z]{12}/ wide\n" + WIDE_RULES


def _lone(engine, ids, params, seeds):
    return [engine.generate([i], [p], [s])[0] for i, p, s in zip(ids, params, seeds, strict=True)]


@pytest.mark.slow  # (~1,300 decode steps: the fast ones below fail a grammar at token 6)
def test_a_right_recursive_grammar_the_parser_gives_up_on_is_a_row_error_not_a_stop(llama_engine):
    """`root ::= [a-z] root | [a-z]` with min_new_tokens=1500 stopped after ~1,276 tokens with finish_reason
    `stop`, no EOS written and constraint_complete false, although the text matches [a-z]+: llguidance's matcher
    had hit its row limit and the sample pretended the model stopped. The row fails now, with llguidance's word
    and a hint; the rows beside it get what they get alone."""
    from runner.engine import ConstraintError

    ids = ids_of(llama_engine, PROMPTS[:3])
    params = [GenerationParams(max_new_tokens=1500, min_new_tokens=1500, grammar=RIGHT_RECURSIVE),
              GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=24, json_schema=SMALL)]  # fmt: skip
    with pytest.raises(ConstraintError) as e:
        llama_engine.generate(ids, params, [1, 2, 3])
    assert list(e.value.failed) == [0] and e.value.done[0] is None
    message = e.value.failed[0]
    assert re.match(
        r"grammar: llguidance's parser gave up at token 1,\d{3}: .*Current row has 20\d\d items", message
    )
    assert "<state>" not in message and "\n" not in message
    assert "root ::= [a-z]+" in message  # the way out, for the GBNF habit
    assert_same_completions(e.value.done[1:], _lone(llama_engine, ids[1:], params[1:], [2, 3]))


def test_a_row_whose_parser_gives_up_leaves_its_batch_as_it_is_alone(llama_engine):
    """The failing row (and its greedy twin) leave the batch; the others, constrained or not, sampled or
    greedy, decoded all at once or a few at a time with rows joining, get exactly their lone results."""
    from runner.engine import ConstraintError

    ids = ids_of(llama_engine, PROMPTS)
    wide = GenerationParams(max_new_tokens=40, grammar=WIDE)
    params = [MIXED[0], wide, MIXED[1], MIXED[3], wide, MIXED[5]]
    batch_ids = ids[:4] + [ids[1]] + ids[5:]  # row 4: row 1's twin
    seeds = list(range(11, 17))
    alone = _lone(llama_engine, [batch_ids[i] for i in (0, 2, 3, 5)], [params[i] for i in (0, 2, 3, 5)],
                  [seeds[i] for i in (0, 2, 3, 5)])  # fmt: skip
    for max_active in (None, 2):
        with pytest.raises(ConstraintError) as e:
            llama_engine.generate(batch_ids, params, seeds, max_active=max_active)
        assert sorted(e.value.failed) == [1, 4] and e.value.done[1] is e.value.done[4] is None
        assert "Current row has 21" in e.value.failed[1]
        assert_same_completions([e.value.done[i] for i in (0, 2, 3, 5)], alone)
        assert [e.value.done[i].constraint_complete for i in (0, 2, 3, 5)] == [
            c.constraint_complete for c in alone
        ]


def test_a_row_whose_parser_gives_up_is_a_row_error_of_its_job_through_resume_and_retry(
    tmp_path, tiny_llama, llama_engine
):
    """In a job the row is a `constraint_error` row error with llguidance's message, never a result; a job
    stopped and resumed, and a retry that computes the row again, keep it so; the other rows are the results."""
    from runner.jobdir import Job

    rows = [
        {"id": f"r{i}", "prompt": p, **({"grammar": WIDE} if i == 2 else {})} for i, p in enumerate(PROMPTS)
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    params = GenerationParams(max_new_tokens=12, regex="[a-z]+( [a-z]+)*", seed=5)
    job = create_job(path, tiny_llama, params, runner.EngineOptions(batch_size=2), job_dir=tmp_path / "job")
    calls = []
    summary = run_job(job, llama_engine, echo=None, shard_rows=1,
                      should_stop=lambda: calls.append(1) or len(calls) > 2)  # fmt: skip
    assert not summary.finished
    assert run_job(Job.open(job.dir), llama_engine, echo=None).finished

    def check():
        errors = [e for e in runner.read_errors(job.dir) if e["stage"] == "generate"]
        assert [(e["id"], e["error"]) for e in errors] == [("r2", "constraint_error")]
        assert "grammar: llguidance's parser gave up at token" in errors[0]["message"]
        assert "Current row has 21" in errors[0]["message"]
        df = runner.load_results(job.dir)
        assert sorted(df["id"]) == ["r0", "r1", "r3", "r4", "r5"]
        assert set(df["finish_reason"]) <= {"stop", "length"}
        return df

    before = check()
    assert runner.retry(job.dir) == 1
    assert run_job(Job.open(job.dir), llama_engine, echo=None).finished
    assert check().to_json() == before.to_json()


def test_a_try_of_a_prompt_whose_parser_gives_up_says_so(tiny_llama, llama_engine):
    """`runner.generate` (a try, no job): the prompt's failure is an error naming it, not a `stop`."""
    with pytest.raises(runner.RunnerError, match="prompt 1: grammar: llguidance's parser gave up at token"):
        runner.generate(["Hello", "Hi"], tiny_llama, GenerationParams(max_new_tokens=40, grammar=WIDE),
                        engine=llama_engine)  # fmt: skip
