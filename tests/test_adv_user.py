"""Adversarial pass 178, as a new user: what a user's files and commands met that the other tests did not try."""

import pytest
from helpers import invoke, write_jsonl

from runner.errors import InputError
from runner.jobs import create_job


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('id,prompt\n1,"He said hi\n2,normal\n3,normal\n', 2, "prompt"),  # the rows below went into row 1
        ('id,prompt,x\n1,"a,b\n2,c,d\n', 2, "prompt"),  # (read ragged by pyarrow: named the same way)
        ('"id,prompt\n1,a\n', 1, None),  # the header's own
    ],
)
def test_a_csv_cell_whose_quote_is_never_closed_is_refused_not_read_as_the_rest_of_the_file(
    tmp_path, tiny_gpt2, text, line, field
):
    """A quoted cell left open took every line after it into itself: `1,"He said hi` then two more rows made a
    job of one row, whose prompt held the other two, without a word."""
    (tmp_path / "p.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as e:
        create_job(tmp_path / "p.csv", tiny_gpt2, home=tmp_path / "home")
    where = f"p.csv:{line}: {field}: " if field else f"p.csv:{line}: "
    assert f"{where}a quoted cell opened here is never closed" in str(e.value), str(e.value)


def test_a_csv_cell_closed_on_the_last_line_without_a_line_break_is_read(tmp_path, tiny_gpt2):
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a ""b"" c"\n2,"d\ne"', encoding="utf-8")
    job = create_job(tmp_path / "p.csv", tiny_gpt2, home=tmp_path / "home")
    import pyarrow.parquet as pq

    assert pq.read_table(job.dir / "prompts.parquet", columns=["prompt"]).column(0).to_pylist() == [
        'a "b" c',
        "d\ne",
    ]


@pytest.mark.parametrize("command", ["status", "results", "watch", "report", "cancel"])
def test_a_run_batch_output_file_named_as_a_job_points_to_its_job_folder(tmp_path, tiny_gpt2, command):
    """`runner status out/responses.jsonl`, the file a run-batch user knows, said "no job folder ..." (and
    `runner results` that it was no Parquet file), never where the job is: beside it, `out/responses.jsonl.job`."""

    out = tmp_path / "responses.jsonl"
    body = {"model": tiny_gpt2, "prompt": "Hi", "max_tokens": 1}
    write_jsonl(
        tmp_path / "b.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}]
    )
    create_job(tmp_path / "b.jsonl", tiny_gpt2, job_dir=tmp_path / "responses.jsonl.job")
    out.write_text("{}\n")  # (the output a finished run-batch wrote)
    result = invoke(command, out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"run-batch`, whose job folder is {out}.job" in result.output, result.output


def test_runner_generate_of_one_string_is_one_prompt_and_of_a_generator_is_its_prompts(
    tiny_gpt2, gpt2_engine
):
    """`runner.generate("hi", model)` generated for "h" and for "i" (and "The capital of France is" was refused
    as "prompt 4 is empty": its space); a generator of prompts was used up by the checks, then a TypeError."""
    import runner
    from runner import GenerationParams

    params = GenerationParams(max_new_tokens=2)
    listed = runner.generate(["hi", "yo"], tiny_gpt2, params, engine=gpt2_engine)
    assert runner.generate("hi", tiny_gpt2, params, engine=gpt2_engine) == listed[:1]
    assert runner.generate((p for p in ["hi", "yo"]), tiny_gpt2, params, engine=gpt2_engine) == listed


def test_python_submit_and_run_batch_of_a_batch_file_take_the_clis_defaults(tmp_path, tiny_gpt2, runner_home):
    """From Python, a Batch file's requests without max_tokens got the prompt files' 64 tokens (the CLI: 256, or
    half the context window), and `runner.run_batch(..., params=None)` a random seed, not the file's: its answers
    were neither the CLI's nor the same twice."""
    import json

    import runner
    from runner.openai_batch import default_max_tokens

    body = {"model": tiny_gpt2, "prompt": "The old man"}  # no max_tokens, no seed: the defaults decide
    req = write_jsonl(tmp_path / "req.jsonl", [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                                "body": body}])  # fmt: skip
    assert runner.submit(req, tiny_gpt2).params.max_new_tokens == default_max_tokens(tiny_gpt2) != 64
    r = invoke("run-batch", "-i", req, "-o", tmp_path / "cli.jsonl", "--model", tiny_gpt2)
    assert r.exit_code == 0, r.output
    runner.run_batch(req, tmp_path / "api.jsonl", tiny_gpt2, None, None, echo=None)
    cli, api = (json.loads((tmp_path / f"{w}.jsonl").read_text())["response"]["body"] for w in ("cli", "api"))
    assert api["choices"] == cli["choices"] and api["usage"] == cli["usage"]


def test_an_empty_list_of_rows_is_nothing_to_run_not_a_wrong_type(tiny_gpt2, runner_home):
    """`runner.submit([], model)` (a notebook's filter that kept no row) said "input must be ... a list of row
    dicts ..., not list"."""
    import runner

    with pytest.raises(InputError) as e:
        runner.submit([], tiny_gpt2)
    assert str(e.value) == "nothing to run: the list has no rows", str(e.value)


def test_results_of_a_job_with_no_result_yet_prints_no_empty_pandas_frame(tmp_path, tiny_gpt2, runner_home):
    """`runner results night1` just after submit printed pandas' "Empty DataFrame / Columns: [] / Index: []"."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}]), tiny_gpt2, home=runner_home)
    r = invoke("results", job.dir)
    assert r.exit_code == 0 and "Empty DataFrame" not in r.output and "(0 rows; --to FILE" in r.output, (
        r.output
    )


def test_a_parquet_file_of_view_columns_runs_and_passes_them_through(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A Parquet file whose Arrow schema says string_view / list_view (Polars' newest Arrow level,
    `pa.string_view()`): the worker died writing its first results (pyarrow's `take` has no kernel for views)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    import runner
    from runner import GenerationParams
    from runner.worker import run_job

    if not hasattr(pa, "string_view"):
        pytest.skip("pyarrow < 16 reads no views")
    table = pa.table({"id": pa.array(["a", "b"], pa.string_view()), "prompt": pa.array(["Hi", "Yo"], pa.string_view()),
                      "tags": pa.array([["x"], ["y", "z"]], pa.list_view(pa.string_view())),
                      "meta": pa.array([{"k": "m"}, None], pa.struct([("k", pa.string_view())]))})  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet")
    job = create_job(tmp_path / "p.parquet", tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    got = runner.load_results(job.dir, format="arrow")
    assert got.column("tags").to_pylist() == [["x"], ["y", "z"]] and got.column("meta").to_pylist() == [
        {"k": "m"},
        None,
    ]
    assert str(got.schema.field("tags").type) == "list<element: string>"


def test_a_messages_cell_that_is_one_object_or_empty_is_named_as_such(tmp_path, tiny_llama):
    """A CSV `messages` cell holding one message object (no list around it) was refused as "got string", and
    an empty cell too: the JSON text of an object was never read as JSON."""
    text = 'id,messages\n1,"{""role"": ""user"", ""content"": ""hi""}"\n2,\n3,[]\n4,"[{""role"": ""user"", ""content"": ""x""}]"\n'
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as e:
        create_job(tmp_path / "m.csv", tiny_llama, home=tmp_path / "home")
    said = str(e.value)
    assert (
        "m.csv:2: messages: must be a non-empty list of {role, content} objects, got object (one message: put it in a list, [{...}])"
        in said
    ), said
    assert (
        "m.csv:3: messages: must be a non-empty list of {role, content} objects, got an empty string" in said
    ), said
    assert (
        "m.csv:4: messages: must be a non-empty list of {role, content} objects, got an empty array" in said
    ), said


def test_a_csv_of_plain_prompts_and_chats_reads_an_empty_cell_as_none(tmp_path, tiny_llama, runner_home):
    """A CSV with a `prompt` and a `messages` column, each row filling one (a spreadsheet, or pandas' to_csv of
    such rows): every row was refused, "give either 'prompt' or 'messages', not both", for the other's empty
    cell. A row filling both is still refused."""
    import pyarrow.parquet as pq

    chat = '"[{""role"": ""user"", ""content"": ""hi""}]"'
    (tmp_path / "m.csv").write_text(f"id,prompt,messages\n1,hello,\n2,,{chat}\n", encoding="utf-8")
    job = create_job(tmp_path / "m.csv", tiny_llama, home=runner_home)
    prompts = pq.read_table(job.dir / "prompts.parquet", columns=["prompt"]).column(0).to_pylist()
    assert prompts[0] == "hello" and prompts[1].startswith("<|im_start|>user\nhi"), prompts
    (tmp_path / "both.csv").write_text(f"id,prompt,messages\n1,hello,{chat}\n", encoding="utf-8")
    with pytest.raises(
        InputError, match="both.csv:2: messages: give either 'prompt' or 'messages', not both"
    ):
        create_job(tmp_path / "both.csv", tiny_llama, home=runner_home)


def test_a_dataframe_naming_a_column_twice_is_named_so(tiny_gpt2, runner_home):
    """`pd.DataFrame(rows, columns=["prompt", "prompt"])` was refused as "its column \"names found: ['prompt',
    'prompt']\" mixes types ...; give it one type, say df[\"names found: ...\"].astype(str)": pyarrow's
    message read as a column name."""
    pd = pytest.importorskip("pandas")
    import runner

    with pytest.raises(InputError) as e:
        runner.submit(pd.DataFrame([["a", "b"]], columns=["prompt", "prompt"]), tiny_gpt2)
    assert "the DataFrame: prompt: the DataFrame names this column more than once" in str(e.value), str(
        e.value
    )


def test_load_results_as_a_dataset_takes_an_extension_typed_column(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A Parquet input's `pa.uuid()` column passes through (pandas and every export take it), but
    `load_results(..., format="datasets")` raised "Arrow type extension<arrow.uuid> does not have a datasets dtype
    equivalent": it is its 16 bytes there."""
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    import pyarrow.parquet as pq

    import runner
    from runner import GenerationParams
    from runner.worker import run_job

    if not hasattr(pa, "uuid"):
        pytest.skip("pyarrow < 18 has no uuid type")
    ids = [bytes(range(16)), bytes(range(16, 32))]
    pq.write_table(
        pa.table({"prompt": ["Hi", "Yo"], "key": pa.array(ids, pa.uuid())}), tmp_path / "p.parquet"
    )
    job = create_job(tmp_path / "p.parquet", tiny_gpt2, GenerationParams(max_new_tokens=1), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert runner.load_results(job.dir, format="datasets")["key"] == ids
