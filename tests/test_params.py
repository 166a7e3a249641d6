"""GenerationParams / EngineOptions: every field validated up front, messages naming the option and range."""

import pytest

from runner import EngineOptions, GenerationParams, ParamError
from runner.params import ScoreParams


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, r"max_new_tokens must be in \[1, 1000000\], got 0\."),
        ("max_new_tokens", 2.5, r"max_new_tokens must be an integer, got 2\.5\."),
        ("max_new_tokens", True, r"max_new_tokens must be an integer, got True\."),
        ("min_new_tokens", -1, r"min_new_tokens must be >= 0, got -1\."),
        ("min_new_tokens", 100, r"min_new_tokens must be <= max_new_tokens=64, got 100\."),
        ("temperature", -0.5, r"temperature must be >= 0, got -0\.5\."),
        ("temperature", float("nan"), r"temperature must be a finite number, got nan\."),
        ("temperature", "hot", r"temperature must be a number, got 'hot'\."),
        ("top_p", 1.5, r"top_p must be in \[0, 1\], got 1\.5\."),
        ("top_p", -0.1, r"top_p must be in \[0, 1\], got -0\.1\."),
        ("top_k", -3, r"top_k must be >= 0, got -3\."),
        ("repetition_penalty", 0.0, r"repetition_penalty must be > 0, got 0\.0\."),
        ("num_return_sequences", 0, r"num_return_sequences must be in \[1, 1024\], got 0\."),
        ("seed", -1, r"seed must be in \[0, 18446744073709551615\], got -1\."),
        ("stop", [""], r"stop strings must be non-empty strings, got ''\."),
        ("stop", 5, r"stop must be a string or a list of strings, got 5\."),
        ("do_sample", "yes", r"do_sample must be true or false, got 'yes'\."),
        # vLLM's prompt_logprobs is a count of alternatives (0: the tokens' own), here an on/off switch
        (
            "prompt_logprobs",
            0,
            r"got 0 \(vLLM's count of alternatives: runner keeps each prompt token's own log-prob",
        ),
        ("prompt_logprobs", "yes", r"prompt_logprobs must be true or false, got 'yes'\.$"),
    ],
)
def test_each_field_is_checked(field, value, message):
    with pytest.raises(ParamError, match=message) as info:
        GenerationParams(**{field: value})
    assert info.value.param == field
    assert info.value.option == "--" + field.replace("_", "-")


def test_cross_field_checks():
    # n copies of the greedy answer, as OpenAI's n at temperature 0; top_p 0 keeps only the most likely token
    assert GenerationParams(num_return_sequences=4, do_sample=False).do_sample is False
    assert GenerationParams(num_return_sequences=4, temperature=0).do_sample is False
    assert GenerationParams(top_p=0).top_p == 0.0
    with pytest.raises(ParamError, match=r"temperature must be > 0 when sampling"):
        GenerationParams(do_sample=True, temperature=0)


def test_normalisation_and_sampling_default():
    p = GenerationParams(stop="\n")
    assert p.stop == ["\n"] and p.do_sample is False  # greedy unless something asks for sampling
    assert GenerationParams(temperature=0.8).do_sample is True
    assert GenerationParams(num_return_sequences=4).do_sample is True
    assert GenerationParams(top_k=50).do_sample is True
    assert GenerationParams(temperature=0).do_sample is False  # temperature 0 means greedy, as in vLLM
    assert GenerationParams(temperature=1).temperature == 1.0 and isinstance(
        GenerationParams(top_p=1).top_p, float
    )


def test_round_trip_through_dict():
    p = GenerationParams(
        max_new_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop=["。", "\n"], num_return_sequences=2
    )
    assert GenerationParams.from_dict(p.to_dict()) == p
    with pytest.raises(ParamError, match="GenerationParams has no setting 'beams': did you mean 'num_beams'"):
        GenerationParams.from_dict({**p.to_dict(), "beams": 4})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        # transformers' generate habits (the Colab tutorials' max_length=100) and the OpenAI API's names
        (
            lambda: GenerationParams(max_length=100),
            "no setting 'max_length': use max_new_tokens .*prompt too",
        ),
        (lambda: GenerationParams(min_length=5), "no setting 'min_length': use min_new_tokens"),
        (lambda: GenerationParams(max_tokens=16), "no setting 'max_tokens': use max_new_tokens"),
        (lambda: GenerationParams(n=4), "no setting 'n': use num_return_sequences"),
        (lambda: GenerationParams(stop_strings=["\n"]), "no setting 'stop_strings': use stop "),
        # the tutorials' model.generate(..., pad_token_id=tokenizer.eos_token_id): said, not a bare "no setting"
        (
            lambda: GenerationParams(pad_token_id=50256),
            "no setting 'pad_token_id': runner pads each batch itself",
        ),
        (
            lambda: GenerationParams(eos_token_id=198),
            "no setting 'eos_token_id': runner stops at .*; to end at some text, give stop",
        ),
        (
            lambda: ScoreParams(eos_token_id=198),
            r"no setting 'eos_token_id': runner takes it from the model\.$",
        ),
        (lambda: GenerationParams(temprature=0.7), "no setting 'temprature': did you mean 'temperature'"),
        (
            lambda: EngineOptions(batchsize=8),
            "EngineOptions has no setting 'batchsize': did you mean 'batch_size'",
        ),
        (lambda: ScoreParams(max_length=8), r"ScoreParams has no setting 'max_length'\.$"),
    ],
)
def test_an_unknown_keyword_is_named_with_what_runner_calls_it(make, message):
    """Python callers get a ParamError naming the keyword, not Python's bare TypeError "unexpected keyword"."""
    with pytest.raises(ParamError, match=message) as err:
        make()
    assert err.value.param == message.split("'")[1]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "gpu", r"device must be auto, cpu, cuda or cuda:N, got 'gpu'\."),
        ("device", "cuda:x", r"device must be auto, cpu, cuda or cuda:N, got 'cuda:x'\."),
        ("dtype", "fp8", r"dtype must be one of auto, float32, float16, bfloat16, got 'fp8'\."),
        ("batch_size", 0, r"batch_size must be >= 1, got 0\."),
        ("max_batch_tokens", -5, r"max_batch_tokens must be >= 1, got -5\."),
        ("continuous_batching", "yes", r"continuous_batching must be true or false, got 'yes'\."),
    ],
)
def test_engine_options_are_checked(field, value, message):
    with pytest.raises(ParamError, match=message):
        EngineOptions(**{field: value})
    EngineOptions(device="cuda:1", dtype="bfloat16", batch_size=8, max_batch_tokens=4096)  # valid ones pass


def test_a_row_that_gives_a_sampling_setting_samples_and_temperature_zero_is_greedy():
    from runner.params import row_params

    auto, greedy, sampling = (
        GenerationParams(),
        GenerationParams(do_sample=False),
        GenerationParams(do_sample=True),
    )
    for base, sample_auto in ((auto, True), (greedy, False), (sampling, False)):
        for given in ({"temperature": 1.0}, {"temperature": 0.9}, {"top_p": 1.0}, {"top_k": 0}):
            assert row_params(base, sample_auto, given).do_sample is True, (
                base,
                given,
            )  # as an OpenAI request
        assert row_params(base, sample_auto, {"temperature": 0}).do_sample is False
        assert row_params(base, sample_auto, {"max_new_tokens": 3}).do_sample is base.do_sample
    assert row_params(auto, True, {"num_return_sequences": 3}).do_sample is True  # n > 1 asks, as for the job
    cold = GenerationParams(temperature=0)  # a row's top_p in a job at temperature 0: greedy, as OpenAI's API
    assert row_params(cold, True, {"top_p": 0.9}).do_sample is False
    assert row_params(cold, True, {"top_p": 0.9, "temperature": 0.7}).do_sample is True
    with pytest.raises(ParamError, match="temperature has no effect with do_sample false") as info:
        row_params(auto, True, {"temperature": 0.9, "do_sample": False})
    assert info.value.param == "temperature"
    # a job made before these rules keeps its own: a row's temperature 1.0 was greedy there
    assert row_params(auto, True, {"temperature": 1.0}, by_fields=False).do_sample is False
    assert row_params(greedy, False, {"temperature": 0.9}, by_fields=False).do_sample is False


def test_a_rows_contradictory_settings_are_refused_naming_the_field():
    from runner.params import row_overrides

    with pytest.raises(ParamError, match="top_logprobs needs logprobs: true") as info:
        row_overrides({"logprobs": False, "top_logprobs": 3})
    assert info.value.param == "top_logprobs"
    assert row_overrides({"logprobs": True, "top_logprobs": 3}) == {"logprobs": 3}
    for order in (["regex", "response_format"], ["response_format", "regex"]):  # neither silently wins
        raw = {"regex": "[0-9]+", "response_format": {"type": "text"}}
        with pytest.raises(ParamError, match="give one of 'response_format' and 'regex'") as info:
            row_overrides({k: raw[k] for k in order})
        assert info.value.param == "regex"
    assert row_overrides({"response_format": {"type": "json_object"}, "regex": None}) == {"json_object": True}
