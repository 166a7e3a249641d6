"""Adversarial pass 203, a new user's notebook walkthrough of the Python API: what a transformers and pandas user
typed into a cell that the other tests did not try."""

import pytest

import runner
from runner import GenerationParams
from runner.errors import RunnerError


@pytest.mark.parametrize("table", ["dataframe", "dict"])
def test_generate_of_a_dataframe_or_a_dict_is_refused_not_run_on_its_column_names(
    tiny_gpt2, gpt2_engine, table
):
    """`runner.generate(df, model)` (runner.run takes a DataFrame) generated for the word "prompt", the column's
    name, as if it were the prompt, without a word; a dict of rows likewise for its keys."""
    pd = pytest.importorskip("pandas")
    rows = (
        pd.DataFrame({"prompt": ["吾輩は猫である", "名前はまだ無い"]})
        if table == "dataframe"
        else {"prompt": "猫"}
    )
    with pytest.raises(RunnerError, match=r"takes prompt strings, not a (DataFrame|dict)") as e:
        runner.generate(rows, tiny_gpt2, GenerationParams(max_new_tokens=2), engine=gpt2_engine)
    fix = "df['prompt'].tolist(), or run the rows as a job with runner.run(df, ...)"
    assert fix in str(e.value) if table == "dataframe" else "runner.run([row, ...]" in str(e.value), str(
        e.value
    )
    # (a Series gives its values: its prompts)
    series = pd.Series(["吾輩は猫である"], name="prompt")
    params = GenerationParams(max_new_tokens=2)
    assert runner.generate(series, tiny_gpt2, params, engine=gpt2_engine) == runner.generate(
        ["吾輩は猫である"], tiny_gpt2, params, engine=gpt2_engine
    )


@pytest.mark.parametrize(
    ("params", "field", "hint"),
    [
        (runner.ScoreParams(), None, "(for a list of texts: [{'text': t} for t in texts])"),
        (runner.EmbedParams(), None, "(for a list of texts: [{'text': t} for t in texts])"),
        (None, "question", "(for a list of prompts: [{'question': p} for p in prompts]; runner.generate"),
    ],
)
def test_a_list_of_strings_is_refused_naming_the_rows_this_kind_of_job_reads(
    tiny_gpt2, runner_home, params, field, hint
):
    """`runner.run(["現在も行方不明のまま。", ...], model, runner.ScoreParams())` said to pass
    `[{'prompt': p} for p in prompts]`, which a score job refuses in turn ("text: missing")."""
    texts = ["現在も行方不明のまま。", "現在も行方不明のママ。"]
    with pytest.raises(runner.ParamError) as e:
        runner.submit(texts, tiny_gpt2, params, prompt_field=field)
    assert hint in str(e.value), str(e.value)
    # and the rows it shows are taken
    rows = [{field or "text": t} for t in texts]
    assert runner.submit(rows, tiny_gpt2, params, prompt_field=field).kind == (
        "generate" if field else type(params).__name__[:-6].lower()
    )


@pytest.mark.parametrize(
    ("cls", "said"),
    [
        (
            runner.GenerationParams,
            ["top_p: float = 1.0", "Nucleus sampling mass, in [0, 1]", "top_k: int = 0"],
        ),
        (runner.EngineOptions, ["batch_size: int | None = None", "Most sequences decoded together, >= 1"]),
        (runner.ScoreParams, ["add_eos: bool = False", "Append EOS and score it too"]),
        (runner.EmbedParams, ["pooling: str = 'mean'", "last: the last real token's state"]),
    ],
)
def test_help_of_a_settings_class_says_what_each_setting_means_and_takes(cls, said):
    """`help(runner.GenerationParams)` showed one line ("How to generate. Every field is checked on
    construction.") and the signature: each field's docstring, its meaning and range, is in the source only."""
    import pydoc

    shown = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    assert all(s in shown for s in said), shown
    assert " |  Settings:\n |  \n |  " in shown and cls().__doc__ == cls.__doc__, shown


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (
            lambda m: runner.generate("吾輩は", m, max_new_tokens=20, do_sample=True, top_k=50),
            "generate() takes max_new_tokens in its settings, not as a keyword of its own: "
            "runner.generate(..., params=runner.GenerationParams(max_new_tokens=20, do_sample=True, top_k=50))",
        ),
        (
            lambda m: runner.generate("吾輩は", m, max_length=50),
            "generate() got an unexpected keyword argument 'max_length': the setting is max_new_tokens",
        ),
        # (the tutorials' model.generate(..., pad_token_id=tokenizer.eos_token_id), kept as a loose keyword: said
        # bare "unexpected keyword argument 'pad_token_id'", where GenerationParams(pad_token_id=...) said why)
        (
            lambda m: runner.generate("吾輩は", m, pad_token_id=50256),
            "generate() got an unexpected keyword argument 'pad_token_id': runner pads each batch itself",
        ),
        (
            lambda m: runner.submit([{"prompt": "吾輩は"}], m, temperature=0.8),
            "submit() takes temperature in its settings, not as a keyword of its own: "
            "runner.submit(..., params=runner.GenerationParams(temperature=0.8))",
        ),
        (
            lambda m: runner.submit([{"text": "吾輩は"}], m, runner.ScoreParams(), add_eos=True),
            "runner.submit(..., params=runner.ScoreParams(add_eos=True))",
        ),
        (
            lambda m: runner.submit([{"prompt": "吾輩は"}], m, colour="red"),
            "submit() got an unexpected keyword",
        ),
        (
            lambda m: runner.run_batch("in.jsonl", "out.jsonl", m, None, None, batch_size=8),
            "runner.run_batch(..., options=runner.EngineOptions(batch_size=8))",
        ),
        # (said "too many positional arguments", of no function, the setting unsaid)
        (
            lambda m: runner.submit([{"prompt": "吾輩は"}], m, None, None, "jobs", temperature=0.8),
            "runner.submit(..., params=runner.GenerationParams(temperature=0.8))",
        ),
        # (the class for its object: said "must be called with a dataclass type or instance")
        (
            lambda m: runner.submit([{"prompt": "吾輩は"}], m, runner.GenerationParams, temperature=0.8),
            "runner.submit(..., params=runner.GenerationParams(temperature=0.8))",
        ),
    ],
)
def test_a_setting_given_as_a_keyword_is_named_with_the_settings_object_it_goes_in(
    tiny_gpt2, runner_home, call, said
):
    """`runner.generate(prompts, "gpt2", max_new_tokens=20, do_sample=True, top_k=50)`, as transformers'
    pipeline takes them, was Python's bare "unexpected keyword argument"; `runner.submit(..., temperature=0.8)`
    said "create_job() got an unexpected keyword argument", a function the user never called (runner.run said
    where the setting goes since pass 195). Nothing is made."""
    with pytest.raises(TypeError) as e:
        call(tiny_gpt2)
    assert said in str(e.value) and "create_job" not in str(e.value), str(e.value)
    assert not runner_home.exists() or not any(runner_home.iterdir())


def test_help_of_run_says_what_it_takes_beyond_its_signature():
    """help(runner.run) showed `input_path: Any` and `**job_kwargs: Any` and a docstring naming neither: nothing
    said a DataFrame or a list of rows is an input, nor that `name=`, `home=`, `skip_invalid=` ... are taken."""
    doc = " ".join(runner.run.__doc__.split())
    assert "a pandas DataFrame, a list of row dicts or a datasets.Dataset" in doc, doc
    assert "`job_kwargs` are `runner.submit`'s (`name`, `home`," in doc and "`skip_invalid`" in doc, doc


@pytest.mark.parametrize(("params", "column"), [(None, "prompt"), (runner.ScoreParams(), "text")])
def test_a_series_is_refused_naming_the_frame_this_kind_of_job_reads(tiny_gpt2, runner_home, params, column):
    """`runner.run(df["prompt"], ...)` (a Series, as `runner.generate` takes) was refused as "not Series" with
    nothing said of what to pass: it names `series.to_frame(...)` with the column that kind of job reads."""
    import pandas as pd

    series = pd.Series(["吾輩は猫である", "名前はまだ無い"])
    with pytest.raises(runner.ParamError) as e:
        runner.submit(series, tiny_gpt2, params)
    assert "not Series (for a Series of " in str(e.value) and f"series.to_frame('{column}'))" in str(e.value)
    assert runner.submit(series.to_frame(column), tiny_gpt2, params).meta["input"]["rows"] == 2


def test_a_function_taking_any_keyword_has_none_refused_as_a_loose_setting():
    """params.settings_apart refused every keyword a function's **kwargs takes, as not in its signature."""
    from runner.params import settings_apart

    @settings_apart("f")
    def f(a, params=None, **extra):
        return extra

    assert f(1, temperature=0.8, colour="red") == {"temperature": 0.8, "colour": "red"}


def test_stop_strings_given_as_runs_stop_callback_say_where_they_go(tmp_path, tiny_gpt2, runner_home):
    """`runner.run(..., stop=["\\n"])` (vLLM's and the OpenAI API's stop strings) was taken for run's `stop`
    callback, and failed after the model loaded ("'list' object is not callable"); run_batch the same. Now
    refused at once, naming GenerationParams(stop=...); nothing is submitted."""
    rows = [{"prompt": "吾輩は猫である"}]
    with pytest.raises(
        TypeError, match=r"stop strings go in params=runner.GenerationParams\(stop=\['\\n'\]\)"
    ):
        runner.run(rows, tiny_gpt2, stop=["\n"], echo=None)
    assert runner.status(home=runner_home) == []


def test_a_misspelled_setting_given_as_a_keyword_names_the_setting_it_is_near(tiny_gpt2, runner_home):
    """`runner.submit(..., temprature=0.8)` said only "unexpected keyword argument" where
    GenerationParams(temprature=0.8) says "did you mean 'temperature'": the keyword names the setting too."""
    rows = [{"prompt": "吾輩は猫である"}]
    with pytest.raises(TypeError, match=r"did you mean temperature, runner.submit\(\.\.\., params=runner"):
        runner.submit(rows, tiny_gpt2, temprature=0.8)
    with pytest.raises(TypeError, match=r"did you mean batch_size, runner.submit\(\.\.\., options=runner"):
        runner.submit(rows, tiny_gpt2, batchsize=8)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'$"):
        runner.submit(rows, tiny_gpt2, zzz=1)
