"""Jobs end to end on the tiny model: job folder, Parquet schema, load_results order, resume, bad shards."""

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams, InputError, ParamError, RunnerError, jobdir
from runner.jobs import Job, create_job
from runner.results import done_keys, valid_shards
from runner.tokens import TokenText, alternative_pieces
from runner.worker import run_job

ROWS = [
    {"id": "fox", "prompt": "The quick brown fox", "lang": "en"},
    {"id": "cat", "prompt": "吾輩は猫である。名前はまだ無い。", "lang": "ja"},
    {"id": "hi", "prompt": "Hello", "lang": "en", "text": "a colliding column"},
    {"id": "lm", "prompt": "A language model reads the whole sentence and then", "lang": "en"},
    {"id": "friend", "prompt": "My friend", "lang": "en"},
]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", ROWS)


def test_run_writes_schema_and_results_in_input_order(tmp_path, prompts_file, tiny_gpt2, gpt2_engine):
    params = GenerationParams(max_new_tokens=6, temperature=0.9, num_return_sequences=2, seed=1)
    job, summary = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "out", engine=gpt2_engine, echo=None
    )
    assert summary.finished and summary.done == 10 and summary.errors == 0
    df = runner.load_results(tmp_path / "out")
    assert list(df["id"]) == ["fox", "fox", "cat", "cat", "hi", "hi", "lm", "lm", "friend", "friend"]
    assert list(df["sample"]) == [0, 1] * 5
    assert list(df.columns[:11]) == [
        "id", "sample", "prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
        "token_ids", "token_logprobs", "cumulative_logprob",
    ]  # fmt: skip
    assert list(df["lang"]) == [r["lang"] for r in ROWS for _ in range(2)]
    assert df.loc[4, "input_text"] == "a colliding column"  # an input column named like an output is renamed
    schema = pq.read_schema(valid_shards(job.dir)[0])
    assert schema.field("token_ids").type == pa.list_(pa.int32())
    assert schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert schema.field("cumulative_logprob").type == pa.float64()
    for _, row in df.iterrows():
        assert row.completion_tokens == len(row.token_ids) == len(row.token_logprobs)
        assert row.cumulative_logprob == pytest.approx(float(sum(row.token_logprobs)), abs=1e-4)
        assert row.finish_reason in ("stop", "length")
    assert df.loc[0, "prompt"] == "The quick brown fox"
    # Same job id or name finds it through the job home as well; stats sit beside the data.
    stats = json.loads((job.dir / "stats.json").read_text())
    assert stats["tokens"] == int(df["completion_tokens"].sum()) and stats["runs"][0]["peak_memory_bytes"] > 0
    assert stats["runs"][0]["speedups"]["fused_gelu"] == 2 and stats["runs"][0]["speedups"]["grouped_decode"]
    meta = json.loads((job.dir / "job.json").read_text())
    assert meta["model"] == tiny_gpt2 and meta["params"]["num_return_sequences"] == 2 and meta["seed"] == 1
    assert pq.read_metadata(valid_shards(job.dir)[0]).metadata[b"runner.job"] == job.id.encode()


def test_same_seed_same_results_and_resume_equals_uninterrupted(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine
):
    params = GenerationParams(max_new_tokens=6, temperature=1.2, num_return_sequences=3, seed=7)
    ref_job, _ = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "ref", engine=gpt2_engine, echo=None
    )
    ref = runner.load_results(ref_job.dir)

    job = create_job(
        prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=2), job_dir=tmp_path / "cut"
    )
    calls = []
    summary = run_job(
        job, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: calls.append(1) or len(calls) > 2
    )
    assert not summary.finished and 0 < summary.done < 15
    partial = runner.load_results(job.dir)
    assert len(partial) == summary.done
    summary = run_job(Job.open(job.dir), gpt2_engine, echo=None)  # the resume generates only the rest
    assert summary.finished and summary.generated == 15 - len(partial)
    resumed = runner.load_results(job.dir)
    cols = ["id", "sample", "text", "token_ids", "finish_reason"]
    assert resumed[cols].to_json() == ref[cols].to_json()
    for a, b in zip(resumed["token_logprobs"], ref["token_logprobs"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)  # other batches: same tokens, float rounding only


def test_a_job_schema_with_its_keys_in_another_order_is_another_job(tmp_path, prompts_file, tiny_gpt2):
    """A JSON schema's key order is the order its object is generated in. The job's fingerprint sorted the keys,
    so a rerun into the same folder with the properties swapped resumed the old job: objects in the old order."""
    from runner.jobs import _schema_order

    def schema(*names):
        return {
            "type": "object",
            "properties": {n: {"type": "integer"} for n in names},
            "required": ["a", "b"],
        }

    def submit(json_schema):
        params = GenerationParams(max_new_tokens=4, json_schema=json_schema)
        return create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "out")

    job = submit(schema("b", "a"))
    assert submit(schema("b", "a")).id == job.id
    with pytest.raises(
        RunnerError, match=r"settings \(json_schema's key order \(the order its object is generated"
    ):
        submit(schema("a", "b"))
    # a schema whose keys are already sorted (and no schema) adds nothing: earlier jobs keep their fingerprint
    assert (
        _schema_order(GenerationParams(json_schema=json.loads(json.dumps(schema("a", "b"), sort_keys=True))))
        == {}
    )
    assert _schema_order(GenerationParams()) == {} and _schema_order(
        GenerationParams(json_schema=schema("b", "a"))
    )


def test_rerun_with_same_output_resumes_and_other_settings_are_refused(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine
):
    params = GenerationParams(max_new_tokens=4)
    job, _ = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "out", engine=gpt2_engine, echo=None
    )
    again, summary = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "out", engine=gpt2_engine, echo=None
    )
    assert again.id == job.id and summary.generated == 0 and summary.finished
    # the refusal says what differs (a user forgetting --seed could not tell why it was refused)
    with pytest.raises(
        RunnerError, match=r"holds a job with other inputs or settings \(max_new_tokens 4, now 5\)"
    ) as refused:
        runner.run(
            prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=5), output=tmp_path / "out", echo=None
        )
    # a completed job has nothing for `runner work` to finish: its results are offered
    assert "it is completed: `runner results" in str(refused.value) and "runner work" not in str(
        refused.value
    )
    create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "queued")
    with pytest.raises(RunnerError, match=r"or run `runner work --job .*queued` to finish it as it was"):
        runner.run(prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=5), output=tmp_path / "queued")
    other = write_jsonl(tmp_path / "other.jsonl", ROWS[:2])
    with pytest.raises(RunnerError, match=r"settings \(the input file's content; seed None, now 42\)"):
        runner.run(
            other, tiny_gpt2, GenerationParams(max_new_tokens=4, seed=42), output=tmp_path / "out", echo=None
        )
    # settings the refusal did not name (new-user walkthrough: a run-batch rerun without --served-model-name)
    with pytest.raises(
        RunnerError,
        match=r"settings \(skip_invalid False, now True\); .* job_dir= of runner.submit and runner.run_batch",
    ):
        runner.run(prompts_file, tiny_gpt2, params, output=tmp_path / "out", skip_invalid=True, echo=None)
    with pytest.raises(RunnerError, match=r"settings \(served_model_names \[\], now \['tiny'\]\)"):
        runner.run(
            prompts_file, tiny_gpt2, params, output=tmp_path / "out", served_model_names=("tiny",), echo=None
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(RunnerError, match="exists and is not a runner job folder"):
        create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "junk")


def test_run_in_the_home_run_again_carries_on_the_same_job(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine, runner_home
):
    """`runner run FILE ...` without -o, run again after an interruption, carries on the home's job of the same
    file and settings (found by a user walkthrough: it started a new job from row 0, and the interrupted one was
    left for a later `runner work` to compute the same rows again); once complete it is returned as is. A
    cancelled one is left alone, and `runner submit` still queues a new job each time (names make it idempotent)."""
    params = GenerationParams(max_new_tokens=4, temperature=1.0, num_return_sequences=2, seed=3)
    options = runner.EngineOptions(batch_size=2)
    ref, _ = runner.run(prompts_file, tiny_gpt2, params, options, output=tmp_path / "ref", engine=gpt2_engine,
                        echo=None)  # fmt: skip
    batches = []
    job, summary = runner.run(prompts_file, tiny_gpt2, params, options, engine=gpt2_engine, echo=None,
                              stop=lambda: len(batches) > 1 or batches.append(1))  # fmt: skip
    first = summary.done
    assert not summary.finished and 0 < first < 10
    again, summary = runner.run(prompts_file, tiny_gpt2, params, options, engine=gpt2_engine, echo=None)
    assert again.id == job.id and summary.finished and summary.generated == 10 - first
    cols = ["id", "sample", "text", "token_ids"]
    assert runner.load_results(job.dir)[cols].to_json() == runner.load_results(ref.dir)[cols].to_json()
    third, summary = runner.run(prompts_file, tiny_gpt2, params, options, engine=gpt2_engine, echo=None)
    assert third.id == job.id and summary.finished and summary.generated == 0
    submitted = create_job(prompts_file, tiny_gpt2, params, options)
    assert submitted.id != job.id  # submit: a new job
    runner.cancel(submitted.dir)  # the newest of the same settings, but cancelled: left alone
    fourth, _ = runner.run(prompts_file, tiny_gpt2, params, options, engine=gpt2_engine, echo=None)
    assert fourth.id == job.id


def test_run_in_the_home_again_after_the_model_changed_makes_a_new_job(
    tmp_path, prompts_file, tiny_gpt2, runner_home
):
    """The same command after the model folder was saved over (retrained in place, or another ./model): a new job,
    never the old model's results returned as done (found by adversarial pass 9)."""
    import shutil

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    params = GenerationParams(max_new_tokens=2)
    first, _ = runner.run(prompts_file, str(model), params, echo=None)
    assert runner.run(prompts_file, str(model), params, echo=None)[0].id == first.id
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [0, 1]}))
    again, summary = runner.run(prompts_file, str(model), params, echo=None)
    assert again.id != first.id and summary.finished and summary.generated == len(ROWS)


def test_run_in_the_home_again_after_its_job_broke_says_so_and_carries_it_on_once_repaired(
    prompts_file, tiny_gpt2, runner_home
):
    """The same command after the home's job broke (job.json torn, its backup sound): an error naming the job
    and `runner repair`, then the same command carries that job on; before, a second job silently computed
    every row again, the first left behind (found by adversarial pass 10)."""
    params = GenerationParams(max_new_tokens=2)
    asked = []
    first, summary = runner.run(prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=1), echo=None,
                                stop=lambda: len(asked) > 2 or bool(asked.append(1)))  # fmt: skip
    assert not summary.finished
    raw = (first.dir / "job.json").read_bytes()
    (first.dir / "job.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RunnerError, match=f"job {first.id} of this file .* is broken .*runner repair"):
        runner.run(prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=1), echo=None)
    assert [p.name for p in jobdir.job_folders(runner_home)] == [first.id]
    runner.repair(first.dir)
    again, summary = runner.run(
        prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=1), echo=None
    )
    assert again.id == first.id and summary.finished and 0 < summary.generated < len(ROWS)


def test_run_in_the_home_again_through_a_transient_model_read_error_carries_on_its_job(
    prompts_file, tiny_gpt2, runner_home, monkeypatch
):
    """One EIO reading the model while the rerun checks that the home's job is still on it is retried; one that
    lasts is an error, never "the model changed" and a second job computing every row again (found by
    adversarial pass 10)."""
    import errno

    import runner.models
    from runner import storage

    params = GenerationParams(max_new_tokens=2)
    first, _ = runner.run(prompts_file, tiny_gpt2, params, echo=None)
    real, failures = runner.models.model_fingerprint, [1]

    def fingerprint(*args, **kwargs):
        if failures and failures.pop():
            raise OSError(errno.EIO, "Input/output error", "model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(runner.models, "model_fingerprint", fingerprint)
    assert runner.run(prompts_file, tiny_gpt2, params, echo=None)[0].id == first.id and not failures
    failures.extend([1] * 3)  # more than the retries
    with pytest.raises(runner.RunnerError, match=f"cannot read the model .*carries on job {first.id}"):
        runner.run(prompts_file, tiny_gpt2, params, echo=None)
    assert [p.name for p in jobdir.job_folders(runner_home)] == [first.id]


@pytest.mark.parametrize("read", ["load_config", "model_fingerprint"])
def test_submit_reads_the_model_again_through_a_transient_error(
    prompts_file, tiny_gpt2, tmp_path, monkeypatch, read
):
    """Submit reads the model's config and tokenizer and takes its fingerprint: one EIO there (a model on a Drive
    mount) is read again, as `runner work` does, not the end of the submit (second reader)."""
    import errno

    import runner.jobs
    from runner import storage

    real, failures = getattr(runner.jobs, read), [1]

    def flaky(*args, **kwargs):
        if failures and failures.pop():
            raise OSError(errno.EIO, "Input/output error", "config.json")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(runner.jobs, read, flaky)
    job = create_job(prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "job")
    assert not failures and job.meta["model_fingerprint"] == runner.models.model_fingerprint(tiny_gpt2, None)


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "marker-torn", "marker-missing"])
def test_damaged_shards_are_not_counted_and_are_redone(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine, damage
):
    params = GenerationParams(max_new_tokens=4)
    job, _ = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "ref", engine=gpt2_engine, echo=None
    )
    ref = runner.load_results(job.dir)
    job = create_job(
        prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=2), job_dir=tmp_path / "out"
    )
    run_job(job, gpt2_engine, echo=None, shard_rows=2)
    shards = valid_shards(job.dir)
    assert len(shards) == 3
    victim = shards[1]
    marker = job.dir / "done" / (victim.stem + ".json")
    if damage == "zero-byte":
        victim.write_bytes(b"")
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-20])
    elif damage == "marker-torn":
        marker.write_text('{"shard": ')
    else:
        marker.unlink()
    assert len(valid_shards(job.dir)) == 2 and len(done_keys(job.dir)) == 3
    summary = run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert summary.generated == 2 and summary.finished
    out = runner.load_results(job.dir)
    assert out[["id", "text"]].to_json() == ref[["id", "text"]].to_json()


def test_invalid_rows_are_refused_or_skipped_into_errors_file(tmp_path, tiny_gpt2, gpt2_engine):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "good"}, {"prompt": ""}, {"prompt": "also good"}])
    with pytest.raises(InputError, match=r"p.jsonl:2: prompt: prompt is empty"):
        create_job(f, tiny_gpt2)
    assert not any((tmp_path / "home").glob("*")) if (tmp_path / "home").exists() else True  # nothing queued
    job, summary = runner.run(f, tiny_gpt2, GenerationParams(max_new_tokens=2), skip_invalid=True,
                              engine=gpt2_engine, echo=None)  # fmt: skip
    errors = runner.read_errors(job.dir)
    assert errors == [{"id": "2", "line": 2, "field": "prompt", "stage": "validate", "error": "invalid_input",
                       "message": "prompt is empty"}]  # fmt: skip
    assert list(runner.load_results(job.id)["id"]) == ["1", "3"]


@pytest.mark.parametrize("kind", ["generate", "score"])
def test_a_token_the_model_has_no_embedding_for_is_refused_at_submit(tmp_path, tiny_gpt2, kind):
    """A tokenizer given tokens after the model was made (a fine-tune that never resized its embeddings): such an
    id is a device-side assert on a GPU, which takes the worker's process down. The row is refused at submit."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<|speaker|>"])
    tokenizer.save_pretrained(model)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    assert tokenizer.convert_tokens_to_ids("<|speaker|>") >= vocab
    field = "text" if kind == "score" else "prompt"
    f = write_jsonl(tmp_path / "p.jsonl", [{field: "Hello"}, {field: "<|speaker|> Hello"}])
    with pytest.raises(InputError, match=rf"p.jsonl:2: {field}: token id {vocab} \('<\|speaker\|>'\) is outside the "
                                         rf"model's vocabulary of {vocab:,} ids"):  # fmt: skip
        create_job(f, str(model), runner.ScoreParams() if kind == "score" else None)


def test_context_window_is_checked_and_truncate_left_keeps_the_end(tmp_path, tiny_gpt2, gpt2_engine):
    long = " ".join(["word"] * 400)  # the tiny GPT-2 has 256 positions
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": long}, {"id": "short", "prompt": "Hi"}])
    with pytest.raises(InputError, match=r"p.jsonl:1: prompt: prompt is \d+ tokens; with max_new_tokens=16 it exceeds "
                                         r"the model's context window of 256 tokens"):  # fmt: skip
        create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=16))
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=16), truncate="left")
    assert job.prompts().column("prompt_tokens").to_pylist()[0] == 240
    with pytest.raises(ParamError, match="leaves no room for a prompt"):
        create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=300))


def test_a_row_whose_own_max_tokens_leaves_no_room_is_told_to_lower_that(tmp_path, tiny_gpt2):
    """The message said "lower --max-new-tokens" for a row whose own max_tokens was too large, which the option
    does not change (adversarial pass 42): the row's field is named, as the row spells it."""
    prompt = " ".join(["The old man looks at the sky."] * 12)  # ~100 tokens of the 256
    for spelled in ("max_tokens", "max_new_tokens"):
        f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": prompt, spelled: 250}])
        with pytest.raises(InputError) as err:
            create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=4))
        assert f"p.jsonl:1: {spelled}: prompt is " in str(err.value)
        assert str(err.value).endswith(
            f"tokens; with its {spelled}=250 it exceeds the model's context window of 256 "
            f"tokens (shorten the prompt, lower its {spelled}, or pass truncate='left')"
        )


def test_a_prompt_file_rewritten_while_submit_reads_it_is_refused(tmp_path, tiny_gpt2, monkeypatch):
    """Submit hashes the file (the job's identity), loads the model, then reads the rows. A file rewritten in
    between (same size) gave a job the new file's prompts under the old file's sha256, and a later submit of
    the old file was answered with that job (adversarial pass 121). Refused now, with nothing stored."""
    from runner import jobs

    old = [{"id": f"r{i}", "prompt": f"apple {i}"} for i in range(40)]
    new = [{"id": f"r{i}", "prompt": f"zebra {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", old)
    real = jobs._model_facts

    def model_facts(*args, **kw):  # the file is hashed by now; its rows are read after this
        write_jsonl(path, new)
        return real(*args, **kw)

    monkeypatch.setattr(jobs, "_model_facts", model_facts)
    home = tmp_path / "home"
    with pytest.raises(RunnerError, match=r"the prompt file .*p\.jsonl changed while it was being read"):
        create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home, name="j")
    assert [p.name for p in home.iterdir() if p.name != ".names"] == []
    monkeypatch.undo()
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=2), home=home, name="j")
    assert job.prompts().column("prompt").to_pylist() == [r["prompt"] for r in new]


def test_a_rows_bad_setting_is_named_by_the_spelling_it_gave_not_an_empty_column_of_another(
    tmp_path, tiny_gpt2
):
    """A CSV (or Parquet) with two spellings of one setting as columns has one of them empty in each row: the
    error named the empty one ("max_new_tokens: ..." where the row's max_tokens was at fault; "response_format"
    for a bad json_schema). Adversarial pass 121. So does a JSONL row giving the other spelling as null."""
    csv = tmp_path / "p.csv"
    csv.write_text('id,prompt,max_new_tokens,max_tokens,response_format,json_schema\na,hello,,500,,\n'
                   'b,hello,,,,"{""type"":""frob"""\n', encoding="utf-8")  # fmt: skip
    with pytest.raises(InputError) as err:
        create_job(csv, tiny_gpt2, GenerationParams(max_new_tokens=4))
    said = str(err.value).splitlines()
    assert "/p.csv:2: max_tokens: max_tokens=500 leaves no room" in said[1], said
    assert "/p.csv:3: json_schema: json_schema must be a JSON schema" in said[2], said
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello", "max_new_tokens": None, "max_tokens": 0}])
    with pytest.raises(InputError, match=r"p\.jsonl:1: max_tokens: max_tokens must be in \[1, "):
        create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=4))


def test_a_rows_setting_that_clashes_with_the_jobs_is_named_not_the_jobs(tmp_path, tiny_gpt2):
    """A job with --regex and a row asking num_beams 4 was refused as "regex: regex cannot be combined with
    num_beams > 1", naming a field the row does not have; the row's num_beams is the one to change."""
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello", "num_beams": 4}])
    with pytest.raises(
        InputError, match=r"p\.jsonl:1: num_beams: regex cannot be combined with num_beams > 1"
    ):
        create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=4, regex="[a-z]+"))


def test_chat_messages_use_the_chat_template(tmp_path, tiny_llama, tiny_gpt2):
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hello there"}]}])
    job = create_job(f, tiny_llama, GenerationParams(max_new_tokens=3))
    prompt = job.prompts().column("prompt")[0].as_py()
    assert prompt == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InputError, match=r"chat.jsonl:1: messages: .*no chat template"):
        create_job(f, tiny_gpt2)


def test_a_model_folder_given_by_a_relative_path_is_found_from_any_directory(
    tmp_path, tiny_gpt2, monkeypatch
):
    """`runner submit -m mymodel` next to the folder, then `runner work` after a `%cd` (or on a second VM with
    the same mount): the job stores the folder's absolute path, and runs."""
    import shutil

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copytree(tiny_gpt2, tmp_path / "a" / "mymodel")
    monkeypatch.chdir(tmp_path / "a")
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), "mymodel",
                     GenerationParams(max_new_tokens=2), home=tmp_path / "home")  # fmt: skip
    assert job.meta["model"] == str(tmp_path / "a" / "mymodel")
    monkeypatch.chdir(tmp_path / "b")
    run_job(jobdir.open_job(job.dir), echo=None)
    assert jobdir.open_job(job.dir).state().state == "completed"
    assert len(runner.load_results(job.dir)) == 1
    # an absolute or ~ path and a hub id are kept as typed
    from runner.models import stored_spec

    assert stored_spec(str(tiny_gpt2) + "/") == str(tiny_gpt2) + "/" and stored_spec("gpt2") == "gpt2"


def test_unknown_model_is_a_clear_error(tmp_path, prompts_file):
    with pytest.raises(RunnerError, match=r"no model folder at .*no-such-model"):
        create_job(prompts_file, str(tmp_path / "no-such-model"))


def test_job_refs_are_names_in_the_home_or_explicit_folders(prompts_file):
    for bad in ("..", ".hidden", "a" * 101, "x y"):
        with pytest.raises(RunnerError, match="invalid job id or name"):
            runner.load_results(bad)
    with pytest.raises(RunnerError, match="not a runner job folder"):
        runner.open_job("/etc")
    with pytest.raises(RunnerError, match="no job folder"):
        runner.open_job("../no-such-folder")


def test_a_job_named_logs_is_found_though_runner_work_keeps_its_logs_beside_it(
    tmp_path, tiny_gpt2, runner_home
):
    """`runner work --background` writes HOME/logs/: a job named "logs" is still found by its name."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home,
                     name="logs")  # fmt: skip
    (runner_home / "logs").mkdir()
    assert runner.open_job("logs", runner_home).dir == job.dir


def test_a_job_whose_job_json_is_damaged_is_still_found_by_its_name(tmp_path, tiny_gpt2, runner_home):
    """The name is in job.json, and in the claim HOME/.names/NAME.N.json its submit made: `runner status q1` says
    broken and `runner repair q1` mends it (the README's `runner repair night1`), not "no job 'q1'"."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home,
                     name="q1")  # fmt: skip
    (job.dir / "job.json").write_text('{"id": "dama')
    result = invoke("--home", runner_home, "status", "q1")
    assert result.exit_code == 0 and "state:    broken - job.json is damaged" in result.output, result.output
    result = invoke("--home", runner_home, "repair", "q1")
    assert result.exit_code == 0 and "job.json restored from job.backup.json" in result.output, result.output
    assert runner.status("q1", runner_home).state == "queued"
    (runner_home / ".names" / "q2.0.json").write_text(json.dumps({"job": "20260101-000000-abcdef"}))
    with pytest.raises(RunnerError, match="no job 'q2'"):  # a claim whose job never appeared names no job
        runner.open_job("q2", runner_home)


def test_a_word_naming_a_folder_here_and_a_job_in_the_home_is_refused_as_ambiguous(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """./night1 from `runner run -o night1` and a job named night1 in the home: which one is meant is asked,
    not guessed; ./night1 and the job's id each name one."""
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    monkeypatch.chdir(tmp_path)
    here = create_job(src, tiny_gpt2, job_dir=tmp_path / "night1")
    named = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home, name="night1")
    with pytest.raises(
        RunnerError, match=r"'night1' names both the job folder ./night1 and job .* say ./night1"
    ):
        runner.open_job("night1", runner_home)
    assert runner.open_job("./night1", runner_home).dir.resolve() == here.dir.resolve()
    assert runner.open_job(named.id, runner_home).dir == named.dir
    monkeypatch.chdir(runner_home)  # inside the home, a job's id names the same folder both ways
    assert runner.open_job(named.id, runner_home).dir.resolve() == named.dir.resolve()


def test_top_and_prompt_logprobs_columns(tmp_path, prompts_file, tiny_gpt2, gpt2_engine):
    params = GenerationParams(max_new_tokens=3, logprobs=2, prompt_logprobs=True)
    job, _ = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "out", engine=gpt2_engine, echo=None
    )
    df = runner.load_results(job.dir)
    first = df.loc[0]
    assert len(first.top_logprobs) == first.completion_tokens
    step = list(first.top_logprobs[0])
    assert set(step[0]) == {"token_id", "token", "bytes", "logprob", "rank"} and step[0]["rank"] == 1
    texts = TokenText(gpt2_engine.tokenizer)
    prompt_ids = job.prompts().column("input_ids")[0].as_py()
    for i, step in enumerate(first.top_logprobs):  # each candidate reads as it would in place, with its bytes
        ids = [int(e["token_id"]) for e in step]
        prefix = [*prompt_ids, *first.token_ids[:i]]
        assert [e["token"] for e in step] == alternative_pieces(gpt2_engine.tokenizer, prefix, ids)
        assert [bytes(list(e["bytes"])) for e in step] == texts.bytes(ids)
    assert len(first.prompt_logprobs) == first.prompt_tokens and math.isnan(
        first.prompt_logprobs[0]
    )  # null in Arrow


# --- Hugging Face datasets in and out --------------------------------------------------------------------


def test_a_dataset_object_a_saved_dataset_folder_and_hf_names_are_inputs(tmp_path, tiny_gpt2, monkeypatch):
    """From Python a datasets.Dataset, from the command line a `save_to_disk` folder or hf:NAME[:CONFIG]@SPLIT
    (datasets.load_dataset; faked here, there is no Hub): each is read as Parquet and gives the same job."""
    import datasets

    import runner
    from runner.params import GenerationParams

    rows = {"id": ["a", "b", "c"], "prompt": ["Hello", "The quick brown fox", "My friend"]}
    ds = datasets.Dataset.from_dict(rows)
    params = GenerationParams(max_new_tokens=3)
    job, _ = runner.run(ds, tiny_gpt2, params, output=tmp_path / "obj", echo=None)
    ref = runner.load_results(job)
    assert list(ref["id"]) == ["a", "b", "c"] and job.spec.rows == 3

    datasets.DatasetDict({"test": ds, "train": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(runner.ParamError, match="has the splits test, train: name one"):
        runner.submit(tmp_path / "saved", tiny_gpt2, params)
    ds.save_to_disk(str(tmp_path / "one"))
    job2, _ = runner.run(tmp_path / "one", tiny_gpt2, params, output=tmp_path / "folder", echo=None)
    assert runner.load_results(job2)["text"].tolist() == ref["text"].tolist()
    from helpers import invoke

    cli = invoke(
        "run", tmp_path / "one", "--model", tiny_gpt2, "--max-new-tokens", "3", "-o", tmp_path / "cli"
    )
    assert cli.exit_code == 0, cli.output
    assert runner.load_results(tmp_path / "cli")["text"].tolist() == ref["text"].tolist()

    asked = []

    def fake_load(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.DatasetDict({"test": ds}) if split is None else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    job3, _ = runner.run("hf:owner/prompts:main@test", tiny_gpt2, params, output=tmp_path / "hub", echo=None)
    assert asked == [("owner/prompts", "main", "test")]
    assert runner.load_results(job3)["text"].tolist() == ref["text"].tolist()
    assert job3.meta["input"]["path"] == "hf:owner/prompts:main@test"


def test_a_dataframe_or_a_list_of_rows_is_an_input_too(tmp_path, tiny_gpt2, gpt2_engine):
    """`runner.run(df, ...)` was refused ("input must be a file path or a datasets.Dataset, not DataFrame"; a
    new-user walkthrough): a DataFrame, with the integer column with gaps pandas makes floats, and a list of row
    dicts give the same job as the file; a list of plain prompts says how to make rows of it."""
    import pandas as pd

    params = GenerationParams(max_new_tokens=4)
    rows = [{"id": "a", "prompt": "Hello", "max_tokens": 2}, {"id": "b", "prompt": "The quick brown fox"}]
    ref, _ = runner.run(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, params, output=tmp_path / "file",
                        engine=gpt2_engine, echo=None)  # fmt: skip
    df = pd.DataFrame(rows)
    assert df["max_tokens"].dtype == float  # 2.0 and NaN
    for name, source in (("df", df), ("list", rows)):
        job, _ = runner.run(source, tiny_gpt2, params, output=tmp_path / name, engine=gpt2_engine, echo=None)
        got = runner.load_results(job)
        assert got[["id", "text", "completion_tokens"]].equals(
            runner.load_results(ref)[["id", "text", "completion_tokens"]]
        )
        assert list(got["completion_tokens"])[0] <= 2
    with pytest.raises(
        ParamError, match=r"not list \(for a list of prompts: \[\{'prompt': p\} for p in prompts\]"
    ):
        runner.run(
            ["Hello", "World"], tiny_gpt2, params, output=tmp_path / "strs", engine=gpt2_engine, echo=None
        )


def test_rows_settings_of_other_shapes_in_a_list_a_dataframe_or_parquet(tmp_path, tiny_gpt2, gpt2_engine):
    """Arrow gives each row's object every key its column's objects have (null where a row has none): each row's
    JSON schema got its neighbours' keys as nulls and was refused; a `stop` string in one row and a list in
    another was pyarrow's traceback; an error named the temporary Parquet file, not the rows."""
    import pandas as pd

    a = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    b = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    rows = [{"id": "a", "prompt": "Name:", "json_schema": a, "stop": "\n"},
            {"id": "b", "prompt": "Age:", "json_schema": b, "stop": ["\n", "."]}]  # fmt: skip
    pd.DataFrame(rows[:1] + [{**rows[1], "stop": None}]).to_parquet(tmp_path / "p.parquet")
    params = GenerationParams(max_new_tokens=4)
    for name, source in (("list", rows), ("df", pd.DataFrame(rows)), ("parquet", tmp_path / "p.parquet")):
        job = create_job(source, tiny_gpt2, params, job_dir=tmp_path / name)
        stored = [json.loads(s) for s in job.prompts().column("settings").to_pylist()]
        assert [s["json_schema"] for s in stored] == [a, b], name
        if name == "list":
            assert [s["stop"] for s in stored] == [["\n"], ["\n", "."]]
    # a list of rows and a DataFrame keep each row's schema exactly as given: its own key order, its nulls
    # ({"const": null}), values of other types than the other rows' (additionalProperties false / an object)
    a = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
         "required": ["zeta", "alpha"], "additionalProperties": False}  # fmt: skip
    b = {"type": "object", "properties": {"alpha": {"type": "integer"}, "zeta": {"const": None}},
         "required": ["alpha"], "additionalProperties": {"type": "integer"}}  # fmt: skip
    rows = [{"id": "a", "prompt": "Name:", "json_schema": a}, {"id": "b", "prompt": "Age:", "json_schema": b}]
    for name, source in (("list2", rows), ("df2", pd.DataFrame(rows))):
        job = create_job(source, tiny_gpt2, params, job_dir=tmp_path / name)
        stored = [json.loads(s)["json_schema"] for s in job.prompts().column("settings").to_pylist()]
        assert [json.dumps(s) for s in stored] == [json.dumps(a), json.dumps(b)], name
    # a key the first row lacks is a column all the same (datasets' from_list takes the first row's keys)
    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y", "temperature": 0.2, "note": "kept"}]
    job = create_job(rows, tiny_gpt2, params, job_dir=tmp_path / "later_keys")
    assert [s and json.loads(s) for s in job.prompts().column("settings").to_pylist()] == [
        None,
        {"temperature": 0.2},
    ]
    assert run_job(job, gpt2_engine, echo=None).finished
    notes = runner.load_results(job.dir)["note"].tolist()
    assert pd.isna(notes[0]) and notes[1] == "kept"
    # numpy numbers inside a DataFrame's schema (as pandas gives them) are the numbers they hold
    import numpy as np

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": np.int64(9)}}}
    job = create_job(pd.DataFrame([{"id": "a", "prompt": "x", "json_schema": schema}]), tiny_gpt2, params,
                     job_dir=tmp_path / "numpy")  # fmt: skip
    assert (
        json.loads(job.prompts().column("settings")[0].as_py())["json_schema"]["properties"]["n"]["maximum"]
        == 9
    )
    with pytest.raises(InputError) as e:
        create_job([{"id": "a", "prompt": "x", "seed": 1}, {"id": "b", "prompt": "y", "seed": "one"}], tiny_gpt2,
                   params, job_dir=tmp_path / "mixed")  # fmt: skip
    assert "its key 'seed' has values of different types" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(InputError) as e:
        create_job(
            [{"id": "a", "prompt": "x", "temperature": -1}], tiny_gpt2, params, job_dir=tmp_path / "bad"
        )
    assert "rows[0]: temperature: temperature must be >= 0" in str(e.value)
    assert "runner-input-" not in str(e.value)


def test_a_bad_row_given_from_python_is_named_as_the_caller_indexes_it(tmp_path, tiny_gpt2):
    """A list of row dicts (or a DataFrame, a datasets.Dataset) with a bad row said "the rows:2: prompt: ...",
    as if "the rows" were a file and 2 its line: the row is now named by its position, as the caller indexes
    it (rows[1], df.iloc[1], dataset[1]); the problem keeps its line, and a problem of the input as a whole
    still names it."""
    import datasets
    import pandas as pd

    rows = [
        {"id": i, "prompt": p, "temperature": t}
        for i, p, t in [("a", "x", 0.5), ("b", "", 0.5), ("c", "y", -1)]
    ]
    given = {"rows": rows, "df": pd.DataFrame(rows), "dataset": datasets.Dataset.from_list(rows)}
    for name, source in given.items():
        with pytest.raises(InputError) as e:
            create_job(source, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / name)
        said = str(e.value).splitlines()
        label = "df.iloc" if name == "df" else name
        assert said[1:3] == [f"{label}[1]: prompt: prompt is empty",
                             f"{label}[2]: temperature: temperature must be >= 0, got -1.0."], said  # fmt: skip
        assert [p.line for p in e.value.problems] == [2, 3]
    with pytest.raises(InputError, match=r"the list: seed: its key 'seed' has values of different types"):
        create_job([{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": "one"}], tiny_gpt2,
                   GenerationParams(max_new_tokens=2), job_dir=tmp_path / "mixed")  # fmt: skip


def test_an_input_from_python_as_a_whole_is_named_as_what_it_is(tmp_path, tiny_gpt2):
    """An empty list, DataFrame or dataset read "nothing to run: the rows: the file has no rows", and one with no
    valid row "no valid rows in the rows": a list is no file, and "the rows" named the whole list."""
    import datasets
    import pandas as pd

    params = GenerationParams(max_new_tokens=2)
    given = {
        "the list": lambda rows: rows,
        "the DataFrame": lambda rows: pd.DataFrame(rows, columns=["prompt"]),
        "the dataset": lambda rows: datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in rows]}),
    }
    for name, make in given.items():
        with pytest.raises(InputError) as e:
            create_job(make([]), tiny_gpt2, params, job_dir=tmp_path / f"{name}-empty")
        assert str(e.value) == f"nothing to run: {name} has no rows"
        with pytest.raises(InputError) as e:
            create_job(make([{"prompt": ""}]), tiny_gpt2, params, job_dir=tmp_path / f"{name}-invalid")
        assert str(e.value).startswith(f"no valid rows in {name}: "), str(e.value)
    # a file's are as they were
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=r"^nothing to run: .*empty\.jsonl: the file has no rows$"):
        create_job(tmp_path / "empty.jsonl", tiny_gpt2, params, job_dir=tmp_path / "file")


def test_results_as_arrow_and_as_a_dataset(tmp_path, tiny_gpt2):
    import datasets
    import pyarrow as pa

    import runner
    from runner.params import GenerationParams

    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b", "prompt": "My friend"}\n', encoding="utf-8")
    job, _ = runner.run(p, tiny_gpt2, GenerationParams(max_new_tokens=3), output=tmp_path / "j", echo=None)
    df = runner.load_results(job)
    table = runner.load_results(job, format="arrow")
    ds = runner.load_results(job.dir, format="datasets")
    assert isinstance(table, pa.Table) and isinstance(ds, datasets.Dataset)
    assert table.column_names == list(df.columns) == ds.column_names  # no _row: the same columns everywhere
    assert table.column("text").to_pylist() == df["text"].tolist() == ds["text"]
    with pytest.raises(ValueError, match="format must be one of pandas, arrow, datasets"):
        runner.load_results(job, format="polars")


def test_progress_and_heartbeat_move_within_a_batch(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A long batch shows tok/s from its first decode steps (progress lines and the heartbeat that `runner
    status` reads), not only once samples end or a shard is written."""
    from runner.worker import JobRun, run_job

    beats = []
    real = JobRun.update_heartbeat

    def update_heartbeat(self):
        real(self)
        if self.beat is not None:
            on_disk = json.loads(self.beat.path.read_text())  # what `runner status` reads
            beats.append((self.progress.done - self.progress.done_before, dict(self.beat.info), on_disk))

    monkeypatch.setattr(JobRun, "update_heartbeat", update_heartbeat)
    steps = []
    real_generate = gpt2_engine.generate
    monkeypatch.setattr(
        gpt2_engine, "generate", lambda *a, **kw: steps.append(kw.get("on_step")) or real_generate(*a, **kw)
    )
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)  # every sample ends at the last step
    job = create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "j")
    lines = []
    summary = run_job(job, gpt2_engine, echo=lines.append, progress_interval=0)
    assert summary.finished and all(callable(f) for f in steps)
    before_any_row = [ln for ln in lines if ln.startswith("0/") and "tok/s" in ln]
    assert before_any_row and not before_any_row[-1].split("|")[1].strip().startswith("0.0 tok/s")
    assert any(
        done == 0 and disk.get("tokens_per_second", 0) > 0 for done, _, disk in beats
    )  # not 30 s later
    assert all(
        info["peak_memory_bytes"] > 0 for _, info, _ in beats
    )  # status shows live workers' peak memory
    assert summary.tokens == int(runner.load_results(job.dir)["completion_tokens"].sum())  # settled exactly


def test_a_rerun_says_which_engine_options_it_does_not_apply(tmp_path, prompts_file, tiny_gpt2, gpt2_engine):
    """`runner run -o out` again with other engine options resumes the job as submitted: the options asked for
    now are named, not silently dropped (those left at their defaults are not)."""
    from runner import EngineOptions

    params = GenerationParams(max_new_tokens=2)
    out = tmp_path / "out"
    runner.run(prompts_file, tiny_gpt2, params, EngineOptions(batch_size=2), output=out, engine=gpt2_engine,
               echo=None)  # fmt: skip
    lines: list[str] = []
    runner.run(prompts_file, tiny_gpt2, params, EngineOptions(batch_size=4, dtype="float32"), output=out,
               engine=gpt2_engine, echo=lines.append)  # fmt: skip
    kept = [line for line in lines if "keeps the engine options" in line]
    assert (
        len(kept) == 1
        and "batch_size 2 (asked: 4)" in kept[0]
        and "dtype 'auto' (asked: 'float32')" in kept[0]
    )
    lines.clear()
    runner.run(
        prompts_file, tiny_gpt2, params, EngineOptions(), output=out, engine=gpt2_engine, echo=lines.append
    )
    assert not [line for line in lines if "keeps the engine options" in line]  # defaults: nothing asked


def test_a_submit_whose_job_is_stored_says_so_even_if_its_log_line_cannot_be_written(
    tmp_path, tiny_gpt2, monkeypatch
):
    """The disk filling up right after the job folder is in place: the job is stored and queued, so submit
    returns it (it said "Error: cannot append to log.txt", and the user's second submit made a twin job;
    adversarial pass 18)."""
    import errno

    from runner import storage

    def full(path, line):
        raise storage.StorageError(f"cannot append to {path}: No space left on device", errno.ENOSPC)

    monkeypatch.setattr(storage, "append_line", full)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = create_job(f, tiny_gpt2, home=tmp_path / "home")
    assert runner.status(job.dir).state == "queued"
    assert [j.id for j in runner.status(home=tmp_path / "home")] == [job.id]


@pytest.mark.parametrize("landed", [True, False])
def test_a_transient_error_moving_the_job_into_place_is_retried_or_found_done(
    tmp_path, tiny_gpt2, monkeypatch, landed
):
    """A network mount that renamed the submit's temp folder into place but lost the reply (EIO): submit said
    "Error: cannot read or write ...tmp", the job was stored anyway, and the user's second submit made a twin.
    A rename that did not land is tried again, as every other write (adversarial pass 19)."""
    import errno
    import os

    from runner import storage

    real, calls = os.replace, []

    def flaky(src, dst, *args, **kwargs):
        if str(src).endswith(".tmp") and os.path.isdir(src) and not calls:  # the job folder's move
            calls.append(src)
            if landed:
                real(src, dst, *args, **kwargs)
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", flaky)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 8)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    job = create_job(f, tiny_gpt2, home=tmp_path / "home")
    assert calls and runner.status(job.dir).state == "queued"
    assert [j.id for j in runner.status(home=tmp_path / "home")] == [job.id]


@pytest.mark.parametrize("where", [".names", "state"])
def test_an_exclusive_create_that_landed_though_the_mount_lost_the_reply_is_ours(
    tmp_path, tiny_gpt2, monkeypatch, where
):
    """A name claim (or a state record) hard-linked into place, then EIO: the retry found the name taken and
    read our own file as another writer's ("the job name 'k' is claimed by another submit ... run this submit
    again in a moment"; adversarial pass 19). The name is the same file as ours: it is ours."""
    import errno
    import os

    from runner import storage

    real, hits = os.link, []

    def flaky(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if f"/{where}/" in str(dst) and not hits:
            hits.append(dst)
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,) * 8)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    if where == "state":
        job = create_job(f, tiny_gpt2, home=tmp_path / "home", name="k")
        monkeypatch.setattr(os, "link", flaky)
        runner.cancel(job.dir)
        assert hits and runner.status(job.dir).state == "cancelled"
        return
    monkeypatch.setattr(os, "link", flaky)
    job = create_job(f, tiny_gpt2, home=tmp_path / "home", name="k")
    assert hits and [j.id for j in runner.status(home=tmp_path / "home")] == [job.id]


def test_a_prompts_file_that_cannot_be_written_is_named_and_no_job_is_left(tmp_path, tiny_gpt2, monkeypatch):
    """pyarrow's write error names no file ("Error writing bytes to file ... No space left on device"): submit
    says it was prompts.parquet, and stores nothing (adversarial pass 18)."""
    import pyarrow.parquet as pq

    from runner import storage

    def full(self, *args, **kwargs):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    with pytest.raises(
        storage.StorageError, match=r"cannot write .*prompts\.parquet: Error writing bytes .*No space"
    ):
        create_job(f, tiny_gpt2, home=tmp_path / "home")
    monkeypatch.undo()
    assert runner.status(home=tmp_path / "home") == []


def test_an_option_left_at_its_default_reads_as_the_default_and_dtypes_take_their_short_names(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine
):
    """A rerun with --batch-size 8 said "batch_size None (asked: 8)"; `--dtype fp16` was refused though the README
    writes fp16 (new-user walkthrough)."""
    from runner import EngineOptions

    assert [EngineOptions(dtype=d).dtype for d in ("fp32", "fp16", "half", "bf16")] == [
        "float32", "float16", "float16", "bfloat16"
    ]  # fmt: skip
    params, out, lines = GenerationParams(max_new_tokens=2), tmp_path / "out", []
    runner.run(prompts_file, tiny_gpt2, params, output=out, engine=gpt2_engine, echo=None)
    runner.run(prompts_file, tiny_gpt2, params, EngineOptions(batch_size=8), output=out, engine=gpt2_engine,
               echo=lines.append)  # fmt: skip
    (kept,) = [line for line in lines if "keeps the engine options" in line]
    assert "batch_size the default (asked: 8)" in kept


@pytest.mark.slow  # (a real runner process: make test, not test-fast)
def test_a_too_long_prompt_is_said_once_and_a_json_array_file_says_how_to_write_lines(
    tmp_path, tiny_gpt2, capfd
):
    """transformers' "Token indices sequence length is longer ... will result in indexing errors" came above
    runner's own line naming the row; `df.to_json(orient="records")` (one array) said only "got array"
    (new-user walkthrough)."""
    import shutil

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    from workers import run_runner

    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": " ".join(["word"] * 3000)}])
    code, out = run_runner("submit", long, "-m", model, "--home", tmp_path / "home")
    assert (
        code == 1 and out.startswith("Error: no valid rows in") and "prompt: prompt is 6001 tokens" in out
    ), out
    (tmp_path / "arr.json").write_text('[{"prompt": "a"}, {"prompt": "b"}]\n')
    with pytest.raises(InputError, match=r"got array \(one JSON array of rows, .*: add lines=True\)"):
        create_job(tmp_path / "arr.json", tiny_gpt2)


def test_a_job_reads_well_in_a_notebook_cell(tmp_path, tiny_gpt2):
    """It printed as <runner.jobdir.Job object at 0x...> (new-user walkthrough)."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}]), tiny_gpt2, name="night1",
                     home=tmp_path / "home")  # fmt: skip
    assert repr(job) == (f"Job(id={job.id!r}, name='night1', kind='generate', model={tiny_gpt2!r}, "
                         f"folder={str(job.dir)!r})")  # fmt: skip


def test_a_mistyped_job_name_or_id_gets_a_did_you_mean(tmp_path, tiny_gpt2, runner_home):
    """`runner status nigth1` said only "no job 'nigth1' in jobs" (new-user walkthrough): the close names and ids
    are offered, and a reference like none of them points to `runner status`."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home,
                     name="night1")  # fmt: skip
    result = invoke("--home", runner_home, "status", "nigth1")
    assert (
        result.exit_code == 1
        and "no job 'nigth1'" in result.output
        and "did you mean 'night1'?" in result.output
    )
    typo = job.id[:-1] + ("0" if job.id[-1] != "0" else "1")
    with pytest.raises(RunnerError, match=f"did you mean '{job.id}'"):
        runner.open_job(typo, runner_home)
    with pytest.raises(RunnerError, match=r"no job 'zzz' in .* \(`runner status` lists its jobs\)"):
        runner.open_job("zzz", runner_home)
    # `runner run -o out/ja` printed "starting job 2026...", and that id said only "no job ... in ./jobs"
    out = create_job(
        write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi"}]), tiny_gpt2, job_dir=tmp_path / "ja"
    )
    result = invoke("--home", runner_home, "status", out.id)
    assert result.exit_code == 1 and "found by its folder: `runner status FOLDER`" in result.output, (
        result.output
    )


def test_a_dataframes_named_index_is_a_column_as_to_parquet_keeps_it(tiny_gpt2, runner_home):
    """`runner.run(df.set_index("id"))` dropped the index: the ids came back as 1, 2, 3 and the user's were
    nowhere (adversarial pass 21). A named index is a column, as `df.to_parquet()` keeps it; a filtered
    unnamed index is not data (as in a Parquet file)."""
    import pandas as pd

    df = pd.DataFrame({"id": ["q-17", "q-42"], "prompt": ["Hello", "The old man"], "n_words": [1, 3]})
    job = create_job(df.set_index("id"), tiny_gpt2, home=runner_home)
    assert job.prompts().column("id").to_pylist() == ["q-17", "q-42"]
    for filtered in (df.loc[[1, 0]], df.set_axis(["x", "y"])):  # an unnamed index, not a range: no data
        names = create_job(filtered, tiny_gpt2, home=runner_home).prompts().column_names
        assert "__index_level_0__" not in names and "n_words" in names


def test_a_dataframes_named_index_of_1_2_3_is_a_column_too(tiny_gpt2, runner_home):
    """pandas keeps `set_index("番号")` of evenly spaced integers (1, 2, 3 ...) as a RangeIndex, which Arrow
    stores in its metadata only: the 番号 column was nowhere in the results, where one of 1, 2, 5 was kept."""
    import pandas as pd

    for numbers in ([1, 2, 3], [10, 20, 30], [1, 2, 5]):
        df = pd.DataFrame({"番号": numbers, "prompt": ["Hello", "The old man", "Hi"]}).set_index("番号")
        job = create_job(df, tiny_gpt2, home=runner_home)
        assert job.prompts().column("番号").to_pylist() == numbers, numbers
    # a DataFrame is no file: its rows differing from a job's in that folder are said so
    with pytest.raises(RunnerError, match=r"other inputs or settings \(the input's content\)"):
        create_job(df.assign(prompt=["Hi", "Hi", "Hi"]), tiny_gpt2, job_dir=job.dir)


def test_a_parquet_files_named_index_of_1_2_3_is_a_column_too(tmp_path, tiny_gpt2, runner_home):
    """The same RangeIndex written by `df.to_parquet()` is in the file's pandas metadata only: the 番号 column
    was lost on the way through a file as well. It is a column (first, as `reset_index` puts it) where it
    numbers the file's rows; an unnamed one stays no column; a job read before reading 4 reads its file without
    it (`runner repair` rebuilds that job's prompts.parquet as its submit wrote it)."""
    import pandas as pd

    from runner.inputs import PromptReader

    prompts = ["Hello", "The old man", "Hi"]
    for numbers in ([1, 2, 3], [10, 20, 30]):
        path = tmp_path / f"p{numbers[0]}.parquet"
        pd.DataFrame({"番号": numbers, "prompt": prompts}).set_index("番号").to_parquet(path)
        job = create_job(path, tiny_gpt2, home=runner_home)
        assert job.prompts().column("番号").to_pylist() == numbers, numbers
        reader = PromptReader(path)
        assert [r.extra for r in reader.rows()][:2] == [{"番号": numbers[0]}, {"番号": numbers[1]}]
        reader.reading = 3
        assert [r.extra for r in reader.rows()] == [{}, {}, {}]
    pd.DataFrame({"prompt": prompts}).to_parquet(tmp_path / "plain.parquet")
    job = create_job(tmp_path / "plain.parquet", tiny_gpt2, home=runner_home)
    assert (
        job.prompts().column_names
        == create_job(
            write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts]), tiny_gpt2, home=runner_home
        )
        .prompts()
        .column_names
    )


def test_a_dataframe_column_mixing_types_is_an_error_naming_it(tiny_gpt2, runner_home):
    """pyarrow's ArrowInvalid reached the user as a traceback (adversarial pass 21)."""
    import pandas as pd

    df = pd.DataFrame({"prompt": ["Hello", "Hi"], "mix": [1, "x"]})
    with pytest.raises(
        InputError, match=r"the DataFrame: mix: its column 'mix' mixes types .*df\['mix'\]\.astype"
    ):
        create_job(df, tiny_gpt2, home=runner_home)


def test_a_row_giving_temperature_one_samples_and_an_older_job_keeps_its_rules(
    tmp_path, tiny_gpt2, gpt2_engine
):
    import types

    from runner.tasks import _row_params

    rows = [{"id": "g", "prompt": "Hello"}, {"id": "s", "prompt": "Hello", "temperature": 1.0}]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=12, seed=1),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert job.meta["row_sampling"] == "given"
    # a runner from before these rules would decide row s otherwise: the job's layout version keeps it off it
    assert job.meta["format"] >= jobdir.ROW_SAMPLING_FORMAT > jobdir.FORMAT
    plain = create_job(write_jsonl(tmp_path / "q.jsonl", rows[:1]), tiny_gpt2, GenerationParams(max_new_tokens=12),
                       job_dir=tmp_path / "plain")  # fmt: skip
    assert plain.meta["format"] == jobdir.FINGERPRINT_FORMAT  # (its model fingerprint's: pass 250)
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir).set_index("id")
    assert list(df.loc["s", "token_ids"]) != list(df.loc["g", "token_ids"])  # sampled, not the greedy answer
    per_row = _row_params(job, job.prompts())
    assert [per_row(i).do_sample for i in range(2)] == [False, True]
    older = types.SimpleNamespace(
        params=job.params, meta={k: v for k, v in job.meta.items() if k != "row_sampling"}
    )
    per_row = _row_params(older, job.prompts())
    assert [per_row(i).do_sample for i in range(2)] == [False, False]  # as it was made: the row was greedy


def test_truncate_left_keeps_the_bos_token_first(tmp_path, tiny_llama):
    """`--truncate left` kept the last tokens only, so a Llama prompt lost its <s> (the tokenizer's own left
    truncation keeps it): the model read on from the middle of a text that never began (adversarial pass 27)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long = " ".join(f"word{i}" for i in range(2000))
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "long", "prompt": long}])
    job = create_job(f, tiny_llama, GenerationParams(max_new_tokens=16), truncate="left")
    table = job.prompts()
    ids = table.column(next(c for c in table.column_names if "ids" in c)).to_pylist()[0]
    full = tok(long)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == full[len(full) - len(ids) + 1 :]
    assert table.column("prompt_tokens").to_pylist()[0] == len(ids) < len(full)


def test_a_tokenizer_that_appends_eos_does_not_end_the_prompts_with_it(tmp_path, tiny_llama):
    """rinna's Japanese GPT-2s (which the README names) encode "text</s>": every prompt of a generate job ended
    with EOS, and the model was asked to go on after "end of text" (adversarial pass 27; their model card encodes
    prompts without special tokens). The appended EOS is left off; the BOS in front stays."""
    import shutil

    model = tmp_path / "eos-model"
    shutil.copytree(tiny_llama, model)
    conf = json.loads((model / "tokenizer.json").read_text())
    special = {
        "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
        "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
    }
    conf["post_processor"] = {"type": "TemplateProcessing", "special_tokens": special,
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                         {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]}  # fmt: skip
    (model / "tokenizer.json").write_text(json.dumps(conf))
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "東京は"}])
    job = create_job(f, str(model), GenerationParams(max_new_tokens=4))
    ids = job.prompts().column("input_ids").to_pylist()[0]
    assert ids[0] == 1 and ids[-1] != 2, ids


def test_truncate_left_keeps_no_chat_templates_first_token(tmp_path, tiny_llama):
    """A chat rendered by its template is encoded without the tokenizer's special tokens: its first token is the
    template's (SmolLM2's BOS is the role marker <|im_start|>), which kept in front of a cut message made the
    middle of the user's text read as a role (adversarial pass 29). Only the tokenizer's own BOS stays."""
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    long = " ".join(f"word{i}" for i in range(2000))
    f = write_jsonl(tmp_path / "c.jsonl", [{"id": "c", "messages": [{"role": "user", "content": long}]}])
    job = create_job(
        f, tiny_llama, GenerationParams(max_new_tokens=16), truncate="left", chat_template=template
    )
    ids = job.prompts().column("input_ids").to_pylist()[0]
    from transformers import AutoTokenizer

    assert ids[0] != AutoTokenizer.from_pretrained(tiny_llama).bos_token_id


@pytest.mark.parametrize("lost", [False, True], ids=["error", "reply lost"])
def test_a_transient_error_removing_the_empty_output_folder_is_retried(
    tmp_path, tiny_gpt2, monkeypatch, lost
):
    """Submit removes the user's empty -o folder before moving the job in: one transient error there failed
    the whole submit, and a lost reply left the folder gone and the run failed (pass 49)."""
    import errno
    import os

    from runner import storage

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    out = tmp_path / "out"
    out.mkdir()
    real, calls = os.rmdir, []

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            if lost:
                real(path, *args, **kwargs)
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=out)
    assert len(calls) == 2 and job.dir == out and Job.open(out).spec.rows == 1


def _fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on from now (files and folders)."""

    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_a_submitted_job_survives_a_power_cut(tmp_path, tiny_gpt2, monkeypatch):
    """Only job.json and its backup were synced: prompts.parquet (written by pyarrow), errors.jsonl, the job
    folder's entries and the home's entry for it could come back empty or missing after a power cut soon after
    submit, with the input file gone: the job's rows lost (pass 122). All are synced before submit returns."""
    synced = _fsynced(monkeypatch)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": ""}])
    job = create_job(f, tiny_gpt2, home=tmp_path / "home", skip_invalid=True)
    names = [os.path.basename(p) for p in synced]
    assert "prompts.parquet" in names and "errors.jsonl" in names, synced
    home = str(tmp_path / "home")
    folder = os.path.dirname(synced[names.index("prompts.parquet")])  # the job's folder as it is written
    assert folder in synced[names.index("errors.jsonl") :], synced  # its entries, after its files
    assert home in synced[len(synced) - synced[::-1].index(folder) :], (
        synced
    )  # then the home's, after the move
    assert runner.status(job.dir).state == "queued"


def test_a_record_made_by_a_link_is_synced_with_its_folder(tmp_path, monkeypatch):
    """A claim or state record is linked into place: its folder was never synced, so a `runner cancel` that
    said done could be gone after a power cut, and the job ran again (pass 122)."""
    from runner import jobdir

    (tmp_path / "state").mkdir()
    synced = _fsynced(monkeypatch)
    assert jobdir.create_exclusive(tmp_path / "state" / "0001.json", {"state": "cancelled"})
    assert synced[-1] == str(tmp_path / "state"), synced


def test_a_full_disk_at_submit_names_the_job_folder_not_its_temp_one(tmp_path, tiny_gpt2, monkeypatch):
    """A full disk while submit wrote prompts.parquet said "cannot write HOME/.ID.xxxx.tmp/prompts.parquet": a
    folder the user never sees (pass 122). It names the job's folder."""
    import errno

    from runner import storage

    real = storage.arrow_file

    def full(path, mode):
        if mode == "wb" and path.name == "prompts.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)

    monkeypatch.setattr(storage, "arrow_file", full)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    with pytest.raises(storage.StorageError) as e:
        create_job(f, tiny_gpt2, home=tmp_path / "home", name="night")
    said = str(e.value)
    assert ".tmp" not in said and said.startswith(f"cannot write {tmp_path / 'home'}/"), said
    assert said.endswith("/prompts.parquet: No space left on device") and e.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "home").iterdir() if not p.name.startswith(".")] == []


def test_the_seed_an_unseeded_job_drew_asks_for_the_same_job(tmp_path, tiny_gpt2):
    """A job submitted without --seed runs with the seed it drew, which `runner status` shows (seed=N): the same
    command with `--seed N` on its folder (or name) was refused, "seed None, now N" (pass 123). It is the same
    job; another seed is still refused."""
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    params = GenerationParams(max_new_tokens=2, temperature=0.7)
    job = create_job(f, tiny_gpt2, params, job_dir=tmp_path / "out")
    named = create_job(f, tiny_gpt2, params, home=tmp_path / "home", name="night")
    for made, where in (
        (job, {"job_dir": tmp_path / "out"}),
        (named, {"home": tmp_path / "home", "name": "night"}),
    ):
        drawn = made.meta["seed"]
        assert create_job(f, tiny_gpt2, params.replaced(seed=drawn), **where).id == made.id
        with pytest.raises(RunnerError, match=f"seed None, now {drawn + 1}"):
            create_job(f, tiny_gpt2, params.replaced(seed=drawn + 1), **where)
    seeded = create_job(f, tiny_gpt2, params.replaced(seed=5), job_dir=tmp_path / "seeded")
    with pytest.raises(
        RunnerError, match="seed 5, now None"
    ):  # (and the other way round: unseeded asks anew)
        create_job(f, tiny_gpt2, params, job_dir=seeded.dir)


def test_a_move_in_whose_reply_was_lost_is_not_failed_by_a_transient_error_reading_it_back(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Submit's rename of its temp folder into place landed though the mount said EIO (its reply lost); the
    look at whether the job now there is ours met one more transient EIO reading its job.json, which read as
    "not ours": the rename was tried again, found the temp folder gone ("No such file"), and the submit said it
    failed with its job in place (a user then submits it twice). Found by the adversarial pass auditing
    transient errors taken for answers: job.json is read again, as every read of a flaky mount is."""
    import builtins
    import errno
    import io
    import os

    from runner import storage

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    out = tmp_path / "out"
    spec = os.fspath(out / jobdir.JOB_FILE)
    real_replace, real_open, lost = os.replace, builtins.open, []

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.fspath(dst) == os.fspath(out) and not lost:
            lost.append(1)  # done, but the mount's reply was lost
            raise OSError(errno.EIO, "Input/output error", os.fspath(dst))

    def flaky_open(file, *args, **kwargs):
        if lost == [1] and not isinstance(file, int) and os.fspath(file) == spec:
            lost.append(2)  # the first read of the job moved in fails once
            raise OSError(errno.EIO, "Input/output error", spec)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(builtins, "open", flaky_open)
    monkeypatch.setattr(io, "open", flaky_open)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=out)
    assert lost == [1, 2] and job.dir == out and Job.open(out).spec.rows == 1


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({"max_new_tokens": 4}, "params=runner.GenerationParams(max_new_tokens=4)"),
        ({"temperature": 0.8}, "params=runner.GenerationParams(temperature=0.8)"),
        ({"batch_size": 2}, "options=runner.EngineOptions(batch_size=2)"),
        ({"add_eos": True}, "params=runner.ScoreParams(add_eos=True)"),
    ],
)
def test_run_names_the_settings_object_a_setting_given_as_a_keyword_goes_in(prompts_file, tiny_gpt2, tmp_path,
                                                                           given, said):  # fmt: skip
    """`runner.run("p.jsonl", "gpt2", max_new_tokens=64)`, as `model.generate(...)` takes it, said
    "create_job() got an unexpected keyword argument 'max_new_tokens'", a function the user never called."""
    with pytest.raises(TypeError) as e:
        runner.run(prompts_file, tiny_gpt2, output=tmp_path / "out", **given)
    assert said in str(e.value) and "create_job" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match=r"run\(\) got an unexpected keyword argument 'colour'"):
        runner.run(prompts_file, tiny_gpt2, output=tmp_path / "out", colour="red")


def test_run_given_settings_as_its_engine_names_where_they_go_and_makes_no_job(
    prompts_file, tiny_gpt2, tmp_path
):
    """`runner.run(..., engine=runner.EngineOptions(batch_size=8))` (the README names EngineOptions beside
    GenerationParams, not the keyword) made the job, then failed with "'str' object has no attribute 'type'"
    from the batching code (a new user's pass 195)."""
    for given, said in ((runner.EngineOptions(batch_size=1), "options=runner.EngineOptions(...)"),
                        (GenerationParams(max_new_tokens=2), "params=runner.GenerationParams(...)")):  # fmt: skip
        with pytest.raises(TypeError) as e:
            runner.run(prompts_file, tiny_gpt2, output=tmp_path / "out", engine=given)
        assert "engine= takes a loaded engine" in str(e.value) and said in str(e.value)
        assert not (tmp_path / "out").exists()


def test_a_one_row_unit_reads_in_the_singular(tmp_path, tiny_gpt2, gpt2_engine):
    """It said "(rows 1-1 of 1): 1 rows to generate" (new-user walkthrough)."""
    said: list[str] = []
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    runner.run(path, tiny_gpt2, GenerationParams(max_new_tokens=2), output=tmp_path / "job", engine=gpt2_engine,
               echo=said.append)  # fmt: skip
    assert any(line.endswith("(row 1 of 1): 1 row to generate on cpu (float32)") for line in said), said


def test_run_given_settings_not_in_a_settings_object_and_a_job_keyword_names_the_settings_types(
    prompts_file, tiny_gpt2, tmp_path
):
    """`runner.run(..., {"max_new_tokens": 4}, name="x")`: a dict of settings is refused naming the settings
    types, as without the keyword (the keyword check read the dict as a dataclass: "must be called with a
    dataclass type or instance")."""
    with pytest.raises(
        TypeError, match="params must be GenerationParams, ScoreParams or EmbedParams, not dict"
    ):
        runner.run(prompts_file, tiny_gpt2, {"max_new_tokens": 4}, output=tmp_path / "out", name="x")
