"""Adversarial pass 261: generation settings and per-row settings as a demanding user meets them through the Python
API, the command line and OpenAI Batch files.

Found, and kept fixed below:
- `dataclasses.replace(params, temperature=0.7)` of a `GenerationParams(max_new_tokens=64)` ran greedy at
  temperature 0.7 (and `replace(params, num_return_sequences=4)` gave four copies of the greedy answer), said
  nowhere: replace hands the constructor every field, the do_sample the old object had decided (False) too, and it
  was taken as given. A Batch job of such a copy read it as --greedy and answered every request that gave no
  temperature greedily (the API samples those at 1). A copy of an EngineOptions took every field as given the same
  way, so a rerun's note named options no one had asked for ("continuous_batching True (asked: False)"). The
  constructor now tells replace's keywords from its caller's: do_sample is decided again unless the caller gave
  it, and only what the caller (or the old object's maker) gave counts as given.
- `params.temperature = 0.7` on a GenerationParams(max_new_tokens=64) (transformers' GenerationConfig is set so)
  was stored unchecked and undecided: the job ran greedy at temperature 0.7, said nowhere; and `params.top_p = 5`
  made a job, then failed it as "job.json is invalid (top_p must be in [0, 1], got 5.0.)", the broken job left in
  its folder. An assignment is now checked and decides do_sample again, as the constructor does.
- A Batch /v1/completions request with `echo: true` and `max_tokens: 0` (the OpenAI API's way to score a prompt)
  was refused as "max_tokens must be in [1, 1000000], got 0.", not saying that `runner score` does that. (Reading
  10: `runner repair` reads a job of before as its submit did.)
- A plain chat row's `reasoning_effort` or `verbosity` (OpenAI chat request fields) was kept as data without a
  word, the row run with the template's own default, where a Batch body giving one is refused and the other
  OpenAI-only fields of a plain row are named at submit.
- A `top_k` past int64 (`"top_k": 1e20`, a row's or `--top-k`'s: any k over the vocabulary keeps every token, as
  vLLM takes it) was taken at submit, then failed every run of its job with a traceback ("Overflow when unpacking
  long long", building the per-row top_k tensor), the job left queued for the next worker to fail on. It is
  clamped there to a k past any vocabulary.
- `GenerationParams(stop_sequences=[...])` (Anthropic's and Gemini's name for stop strings, which an input row
  takes as `stop`) asked "did you mean 'num_return_sequences'?"; vLLM's guided_json / guided_regex, OpenAI's
  response_format and max_completion_tokens, which a row takes, were "has no setting" with no word of what to use;
  and a pydantic model given as json_schema (as vLLM and the openai SDK take one) was "got <class 'Person'>".
- A numpy number given to a settings object (`seed=np.int64(3)` from np.arange or a DataFrame's column,
  `choices=df["label"].unique()`) was refused as "seed must be an integer, got np.int64(3)", which it is. A numpy
  value is now taken as the Python one it holds.
- `params=model.generation_config` (transformers' GenerationConfig), a dict of settings, or engine options given as
  params were refused as "params must be GenerationParams, ScoreParams or EmbedParams, not GenerationConfig",
  saying nothing of what to give; `runner.generate` loaded the model, then failed with "'GenerationConfig' object
  has no attribute 'prompt_budget'". Both now name what to give (a GenerationConfig's own settings written out).
  So for options: generation settings or a dict given as options= failed deep in the engine ("'GenerationParams'
  object has no attribute 'device'", "... 'trust_remote_code'").
- `GenerationParams(top_k=-1)` (vLLM's top-k off) was refused, where `--top-k -1` and a row's `"top_k": -1` (a
  Batch body's too) are taken as off: one object, one rule.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import pytest
from helpers import batch_request, msgs, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.errors import InputError, ParamError
from runner.jobs import create_job, submit_warnings
from runner.scheduler import _kept_options


@pytest.mark.parametrize(
    ("changes", "sampled"),
    [
        ({"temperature": 0.7}, True),
        ({"num_return_sequences": 4}, True),
        ({"top_p": 0.9, "seed": 3}, True),
        ({"max_new_tokens": 8}, False),
        ({"do_sample": False, "num_return_sequences": 4}, False),  # (said: four greedy answers)
        ({"temperature": 0, "do_sample": False}, False),  # (0.7 beside do_sample false is refused: pass 272)
        ({"temperature": 0}, False),
    ],
)
def test_a_copy_made_by_dataclasses_replace_decides_sampling_as_a_new_object_would(changes, sampled):
    base = GenerationParams(max_new_tokens=3)
    copied = dataclasses.replace(base, **changes)
    assert copied.do_sample is sampled
    assert copied == GenerationParams(**{"max_new_tokens": 3, **changes})
    assert copied._given == {"max_new_tokens", *changes}
    if sys.version_info >= (3, 13):  # (copy.replace calls the dataclass's __replace__)
        assert copy.replace(base, **changes) == copied


def test_a_copy_of_a_copy_keeps_what_each_caller_gave():
    sampled = GenerationParams(max_new_tokens=3, do_sample=True)
    assert dataclasses.replace(sampled, top_k=5).do_sample is True  # (given by the first object's maker)
    greedy = dataclasses.replace(GenerationParams(temperature=0.5), temperature=1.0)
    assert greedy.do_sample is False and greedy._given == {"temperature"}
    assert dataclasses.replace(greedy, num_return_sequences=2).do_sample is True  # (decided again, as asked)


def test_a_rerun_with_a_copied_engine_options_names_only_the_options_asked_for(tmp_path, tiny_gpt2):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "The old man"}])
    job = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=2), EngineOptions(continuous_batching=True),
                     home=tmp_path / "home")  # fmt: skip
    copied = dataclasses.replace(EngineOptions(), batch_size=4)
    assert _kept_options(job, copied) == "batch_size the default (asked: 4)"
    assert _kept_options(job, dataclasses.replace(copied, continuous_batching=False)) == (
        "batch_size the default (asked: 4), continuous_batching True (asked: False)"
    )


def test_a_job_of_copied_params_samples_its_rows_as_one_of_the_params_asked_for(tmp_path, tiny_gpt2):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "The old man", "n": 3}])
    params = dataclasses.replace(GenerationParams(max_new_tokens=2), seed=1)
    job = create_job(src, tiny_gpt2, params, home=tmp_path / "home")
    asked = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=2, seed=1), home=tmp_path / "other")
    assert job.meta["sample_auto"] is True and job.meta["fingerprint"] == asked.meta["fingerprint"]


def test_a_batch_echo_request_of_no_tokens_is_pointed_at_runner_score(tmp_path, tiny_gpt2):
    lines = [batch_request("a", "/v1/completions", {"prompt": "Hello there", "echo": True, "max_tokens": 0}),
             batch_request("b", "/v1/completions", {"prompt": "Hello", "echo": True, "max_tokens": 0.0,
                                                    "logprobs": 1}),
             batch_request("c", "/v1/completions", {"prompt": "Hello", "max_tokens": 0})]  # fmt: skip
    with pytest.raises(InputError) as err:
        create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_gpt2, served_model_names=("tiny",),
                   home=tmp_path / "home")  # fmt: skip
    said = str(err.value)
    for line in (1, 2):
        assert f"b.jsonl:{line}: body.max_tokens: 0 with echo asks for the prompt's log-probs only" in said, (
            said
        )
    assert "runner score texts.jsonl -m MODEL" in said
    assert (
        "b.jsonl:3: max_tokens: max_tokens must be in [1, 1000000], got 0." in said
    )  # (no echo: no scoring)


def test_repair_reads_a_job_of_before_reading_10_as_its_submit_did(tmp_path, tiny_gpt2):
    from test_openai_batch_edges import _rewritten_as_read

    lines = [batch_request("a", "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
             batch_request("z", "/v1/completions", {"prompt": "Hello", "echo": True, "max_tokens": 0})]  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_gpt2, served_model_names=("tiny",),
                     skip_invalid=True, job_dir=tmp_path / "job")  # fmt: skip
    assert job.meta["input"]["reading"] >= 10
    (said,) = [json.loads(x) for x in (job.dir / "errors.jsonl").read_text().splitlines()]
    assert said["field"] == "body.max_tokens" and "runner score" in said["message"]
    rows, errors = _rewritten_as_read(job, 9, tmp_path / "before")
    assert [r["id"] for r in rows] == ["a"] and errors == ["z"]
    before = [json.loads(x) for x in (tmp_path / "before" / "errors.jsonl").read_text().splitlines()]
    assert [(e["field"], e["message"]) for e in before] == [
        ("max_tokens", "max_tokens must be in [1, 1000000], got 0.")
    ]


def test_a_plain_chat_rows_reasoning_effort_is_said_to_be_data(tmp_path, tiny_llama):
    rows = [{"messages": msgs("Hi"), "reasoning_effort": "low", "verbosity": "low"}]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_llama, GenerationParams(max_new_tokens=2),
                     home=tmp_path / "home")  # fmt: skip
    (note,) = [w for w in submit_warnings(job) if "reasoning_effort" in w]
    assert note.startswith(
        "note: 'reasoning_effort' and 'verbosity' are kept as data, not settings: a plain row is no OpenAI request"
    )
    assert "no reasoning effort" in note and "no verbosity" in note


def test_a_top_k_past_int64_keeps_every_token_as_any_past_the_vocabulary_does(
    tmp_path, tiny_gpt2, gpt2_engine
):
    texts = []
    for name, setting in (("huge", {"top_k": 10**20}), ("off", {"temperature": 1.0})):
        src = write_jsonl(tmp_path / f"{name}.jsonl", [{"id": "a", "prompt": "The old man", **setting}])
        job, summary = runner.run(src, tiny_gpt2, GenerationParams(max_new_tokens=4, seed=3), output=tmp_path / name,
                                  engine=gpt2_engine, echo=None)  # fmt: skip
        assert summary.done == 1 and summary.errors == 0
        texts.append(runner.load_results(job.dir)["token_ids"].map(list).tolist())
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("stop_sequences", "use stop (Anthropic's and Gemini's stop_sequences"),
        ("guided_json", "use json_schema (vLLM's guided_json)"),
        ("guided_regex", "use regex (vLLM's guided_regex)"),
        ("response_format", "use json_schema (OpenAI's response_format: its json_schema's \"schema\""),
        ("max_completion_tokens", "use max_new_tokens (OpenAI chat's max_completion_tokens)"),
    ],
)
def test_a_setting_an_input_row_or_another_api_spells_otherwise_says_what_to_use(name, said):
    with pytest.raises(ParamError) as err:
        GenerationParams(**{name: ["x"]})
    assert str(err.value).startswith(f"GenerationParams has no setting {name!r}: {said}"), str(err.value)


def test_a_pydantic_model_given_as_json_schema_is_told_how_to_give_its_schema():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str

    for given in (Person, Person(name="x")):
        with pytest.raises(ParamError, match=r"give its schema, Person\.model_json_schema\(\)\.$"):
            GenerationParams(json_schema=given)
    assert GenerationParams(json_schema=Person.model_json_schema()).json_schema["required"] == ["name"]


def test_a_setting_assigned_after_construction_is_checked_and_decides_sampling_again(tmp_path, tiny_gpt2):
    params = GenerationParams(max_new_tokens=4)
    params.temperature = 0.7
    assert params.do_sample is True and params == GenerationParams(max_new_tokens=4, temperature=0.7)
    with pytest.raises(ParamError, match=r"top_p must be in \[0, 1\], got 5.0"):
        params.top_p = 5
    assert params.top_p == 1.0  # (as it was)
    params.stop = "\n"
    assert params.stop == ["\n"] and params._given == {"max_new_tokens", "temperature", "stop"}
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}]), tiny_gpt2, params, job_dir=tmp_path / "j"
    )
    assert job.meta["params"]["do_sample"] is True and job.meta["params"]["stop"] == ["\n"]
    greedy = GenerationParams(do_sample=False)
    greedy.num_return_sequences = 2  # (do_sample given: kept)
    assert greedy.do_sample is False
    options = EngineOptions()
    options.dtype = "fp16"
    assert options.dtype == "float16" and options._given == {"dtype"}


def test_a_batch_job_of_copied_params_samples_the_requests_that_give_no_temperature(tmp_path, tiny_gpt2):
    """As the OpenAI API does (temperature 1): a copy's decided do_sample False read as --greedy answered every
    such request greedily."""
    lines = [batch_request("a", "/v1/completions", {"prompt": "Hello", "max_tokens": 2})]
    params = dataclasses.replace(GenerationParams(), max_new_tokens=4)
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_gpt2, params, served_model_names=("tiny",),
                     job_dir=tmp_path / "job")  # fmt: skip
    (settings,) = job.prompts().column("settings").to_pylist()
    assert json.loads(settings)["do_sample"] is True


def test_numpy_values_are_taken_as_the_python_values_they_hold(tmp_path, tiny_gpt2):
    np = pytest.importorskip("numpy")
    params = GenerationParams(max_new_tokens=np.int32(3), seed=np.int64(7), top_k=np.int64(5),
                              choices=np.array(["yes", "no"], dtype=object), do_sample=np.bool_(True))  # fmt: skip
    assert params == GenerationParams(
        max_new_tokens=3, seed=7, top_k=5, choices=["yes", "no"], do_sample=True
    )
    assert type(params.seed) is int and type(params.choices) is list
    params.num_return_sequences = np.int64(2)
    assert type(params.num_return_sequences) is int
    assert EngineOptions(batch_size=np.int64(8)).batch_size == 8
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}]), tiny_gpt2, params, job_dir=tmp_path / "j"
    )
    assert job.meta["params"]["seed"] == 7 and job.meta["params"]["choices"] == ["yes", "no"]


def test_top_k_minus_one_is_off_in_python_as_on_the_command_line_and_in_a_row():
    assert GenerationParams(top_k=-1) == GenerationParams() and GenerationParams(top_k=-1).do_sample is False
    assert GenerationParams(top_k=-1, temperature=0.7).top_k == 0
    with pytest.raises(ParamError, match=r"top_k must be >= 0, got -2\."):
        GenerationParams(top_k=-2)


def test_settings_of_another_kind_given_as_params_are_told_what_to_give(tmp_path, tiny_gpt2):
    transformers = pytest.importorskip("transformers")
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.7, stop_strings=["x"],
                                           pad_token_id=0)  # fmt: skip
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    for params, said in [
        (config, "not GenerationConfig; transformers' GenerationConfig is not read: give runner.GenerationParams("
                 "max_new_tokens=3, stop=['x'], do_sample=True, temperature=0.7)"),
        ({"max_new_tokens": 3}, "not dict; a dict of settings makes one: runner.GenerationParams(**settings)"),
        (EngineOptions(), "not EngineOptions; engine options go in options=runner.EngineOptions(...)"),
    ]:  # fmt: skip
        with pytest.raises(TypeError) as err:
            runner.submit(src, tiny_gpt2, params=params, home=tmp_path / "home")
        assert str(err.value).endswith(said), str(err.value)
        with pytest.raises(TypeError) as err:
            runner.generate("Hi", tiny_gpt2, params)  # (refused before the model loads)
        assert str(err.value) == f"params must be GenerationParams, {said}"


def test_settings_of_another_kind_given_as_options_are_told_what_to_give(tmp_path, tiny_gpt2):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    for options, said in [
        (
            GenerationParams(),
            "not GenerationParams; a GenerationParams goes in params=runner.GenerationParams(...)",
        ),
        ({"device": "cpu"}, "not dict; a dict of engine options makes one: runner.EngineOptions(**options)"),
    ]:
        with pytest.raises(TypeError) as err:
            runner.submit(src, tiny_gpt2, options=options, home=tmp_path / "home")
        assert str(err.value) == f"options must be EngineOptions, {said}"
        with pytest.raises(TypeError) as err:
            runner.generate("Hi", tiny_gpt2, options=options)
        assert str(err.value) == f"options must be EngineOptions, {said}"
    assert not (tmp_path / "home").exists()
