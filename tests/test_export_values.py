"""Every value of a job's results reaches the user as stored: from `load_results` and from each export type
(adversarial pass 20: an integer passthrough column missing from some rows came back as float64, so ids above
2**53 collided; the JSON exports rounded every float to 10 digits)."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams, ScoreParams
from runner.jobs import create_job
from runner.worker import run_job

IDS = {"a": 12345678901234567, "b": 12345678901234569}  # two ids float64 cannot tell apart
WEIGHT = 0.12345678901234567


@pytest.fixture
def done_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    rows = [
        {"id": "a", "prompt": "the old man", "uid": IDS["a"], "weight": WEIGHT},
        {"id": "b", "prompt": "every student", "uid": IDS["b"], "weight": 1.0},
        {"id": "c", "prompt": "a cat", "weight": None},
    ]  # no uid: the column holds a null
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = create_job(
        tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3, seed=1), home=runner_home
    )
    assert run_job(job, gpt2_engine, echo=None).finished
    return job


def test_an_integer_column_with_a_missing_value_stays_integer(done_job):
    df = runner.load_results(done_job.dir)
    assert (
        str(df["uid"].dtype) == "Int64" and str(df["completion_tokens"].dtype) == "int32"
    )  # no null: as before
    assert df["uid"].tolist()[:2] == [IDS["a"], IDS["b"]] and df["uid"].isna().tolist() == [
        False,
        False,
        True,
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_export_type_keeps_every_digit(done_job, tmp_path, suffix):
    out = tmp_path / f"out{suffix}"
    assert runner.export_results(done_job.dir, out).rows == 3
    stored = runner.load_results(done_job.dir, format="arrow").to_pylist()
    if suffix == ".jsonl":
        got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".json":
        got = json.loads(out.read_text(encoding="utf-8"))
    elif suffix == ".parquet":
        got = pq.read_table(out).to_pylist()
    else:
        got = list(csv.DictReader(out.open(encoding="utf-8-sig")))
        for row in got:
            row["uid"] = int(row["uid"]) if row["uid"] else None
            row["weight"] = float(row["weight"]) if row["weight"] else None
            row["cumulative_logprob"] = float(row["cumulative_logprob"])
            row["token_logprobs"] = json.loads(row["token_logprobs"])
    assert [r["uid"] for r in got] == [IDS["a"], IDS["b"], None]
    assert got[0]["weight"] == WEIGHT and got[2]["weight"] is None
    if suffix != ".parquet":  # float32 as its shortest decimal, not widened to 17 digits
        assert all(len(str(lp)) <= 16 for r in got for lp in r["token_logprobs"]), got[0]["token_logprobs"]
    for have, want in zip(got, stored, strict=True):
        assert have["cumulative_logprob"] == want["cumulative_logprob"]  # every digit, not 10
        # float32 log-probs: the same float32 (JSON writes its shortest decimal, -0.37045, not -0.3704500198364258)
        assert np.array(have["token_logprobs"], np.float32).tolist() == want["token_logprobs"]


def test_a_score_jobs_json_export_keeps_every_digit(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    rows = [{"id": "x", "text": "The quick brown fox jumps over the lazy dog"}]
    job = create_job(write_jsonl(tmp_path / "t.jsonl", rows), tiny_gpt2, ScoreParams(), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    runner.export_results(job.dir, tmp_path / "s.json")
    (got,) = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    (want,) = runner.load_results(job.dir, format="arrow").to_pylist()
    assert [got[k] for k in ("logprob", "mean_logprob", "perplexity")] == [
        want[k] for k in ("logprob", "mean_logprob", "perplexity")
    ]


def test_an_input_column_named_like_an_optional_result_column_passes_through_renamed(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """An input column `sample` of a score job, or `beam_score` / `constraint_complete` of a generation (made by
    beam search and structured output), was written beside the result column of that name: the job completed,
    and its shards could not be read (adversarial pass 21). It passes through as `input_sample` / `input_beam_score`, as `text` always did."""
    rows = [{"id": "a", "text": "The quick brown fox", "sample": 7}]
    job = create_job(write_jsonl(tmp_path / "s.jsonl", rows), tiny_gpt2, ScoreParams(), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir)
    assert df["sample"].tolist() == [0] and df["input_sample"].tolist() == [7]
    rows = [{"id": "b", "prompt": "The old man", "constraint_complete": "mine", "beam_score": 1.5}]
    params = GenerationParams(max_new_tokens=2, num_beams=2, do_sample=False)
    job = create_job(write_jsonl(tmp_path / "g.jsonl", rows), tiny_gpt2, params, home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir)
    assert df["input_beam_score"].tolist() == [1.5] and df["beam_score"].notna().all()
    assert df["input_constraint_complete"].tolist() == ["mine"]


def test_a_column_named_like_a_name_pyarrow_reserves_passes_through(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """`__filename`, `__batch_index` ... are names pyarrow's dataset reader (pq.read_table) adds itself: a
    passthrough column so named made every shard of a completed job unreadable (adversarial pass 21)."""
    rows = [{"id": "a", "prompt": "The old man", "__filename": "notes.txt", "__batch_index": 3}]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir)
    assert df["__filename"].tolist() == ["notes.txt"] and df["__batch_index"].tolist() == [3]
    assert runner.export_results(job.dir, tmp_path / "out.parquet").rows == 1


def test_an_embedding_export_writes_each_float32_as_its_shortest_decimal(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    from runner import EmbedParams

    job = create_job(write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "The quick brown fox"}]), tiny_gpt2,
                     EmbedParams(), home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    want = runner.load_results(job.dir, format="arrow").column("embedding").to_pylist()[0]
    for suffix in (".jsonl", ".csv"):
        runner.export_results(job.dir, tmp_path / f"e{suffix}")
        text = (tmp_path / f"e{suffix}").read_text(encoding="utf-8-sig")
        row = json.loads(text) if suffix == ".jsonl" else next(csv.DictReader(text.splitlines()))
        got = row["embedding"] if suffix == ".jsonl" else json.loads(row["embedding"])
        assert np.array(got, np.float32).tolist() == want and max(len(str(x)) for x in got) <= 16


def test_an_object_column_empty_in_every_row_is_json_text_not_a_traceback(tmp_path, tiny_gpt2, runner_home):
    """`"metadata": {}` in every row of a chunk: Parquet cannot hold a struct of no fields, and submit ended in
    an ArrowNotImplementedError traceback (adversarial pass 21)."""
    rows = [{"id": f"r{i}", "prompt": "Hello", "metadata": {}} for i in range(3)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, home=runner_home)
    assert job.meta["input"]["json_columns"] == ["metadata"]
    assert job.prompts().column("metadata").to_pylist() == ["{}"] * 3


def test_a_renamed_column_does_not_take_the_name_of_another_input_column(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """An input with `text` (named like a result column) and `input_text`: `text` was renamed `input_text` and
    the user's own `input_text` became `input_input_text`, so df["input_text"] held the wrong column
    (adversarial pass 21). The user's `input_text` keeps its name; `text` takes the next free one."""
    rows = [{"id": "a", "prompt": "Translate: source 0", "text": "reference 0", "input_text": "source 0"}]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     home=runner_home)  # fmt: skip
    assert job.meta["input"]["renamed_columns"] == {"text": "input_input_text"}
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir)
    assert df["input_text"].tolist() == ["source 0"] and df["input_input_text"].tolist() == ["reference 0"]


def test_nanosecond_times_come_back_to_the_nanosecond(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """pandas keeps times in nanoseconds; passed through, they came back in microseconds, so two event times
    1 ns apart were equal and a 1 ns latency was 0 (adversarial pass 21)."""
    import pandas as pd

    df = pd.DataFrame({"prompt": ["a b", "c d"],
                       "event_time": pd.to_datetime([1704067200123456789, 1704067200123456790], unit="ns"),
                       "local": pd.to_datetime([1, 2], unit="ns").tz_localize("Asia/Tokyo"),
                       "latency": pd.to_timedelta([1, 2], unit="ns")})  # fmt: skip
    job = create_job(df, tiny_gpt2, GenerationParams(max_new_tokens=1), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    back = runner.load_results(job.dir)
    for column in ("event_time", "local", "latency"):
        assert back[column].tolist() == df[column].tolist(), column


def test_integers_past_2_63_come_back_as_integers(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    """A hash column (uint64) with a value past 2**63 came back as JSON text in every row: "1", not 1
    (adversarial pass 21)."""
    rows = [{"id": "a", "prompt": "Hello", "minhash": 2**64 - 1}, {"id": "b", "prompt": "Hi", "minhash": 1}]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=1),
                     home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    assert runner.load_results(job.dir)["minhash"].tolist() == [2**64 - 1, 1]
    runner.export_results(job.dir, tmp_path / "out.jsonl")
    assert [json.loads(x)["minhash"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        2**64 - 1,
        1,
    ]


def test_a_csv_cell_with_a_lone_carriage_return_reads_back_as_one_cell(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """A cell holding "a\\rb" (no \\n) was written unquoted: Python's csv, pandas and Excel split the row there, and
    the rows after it shifted (adversarial pass 46). Lines now end in CRLF, as RFC 4180 has it, so such a cell
    is quoted; and a job larger than one chunk of the streamed export keeps its header once and every row."""
    monkeypatch.setattr(runner.results, "EXPORT_CHUNK_ROWS", 16)
    rows = [
        {"id": f"r{i}", "prompt": f"line{i}\rmore", "note": "x\ry" if i % 2 else "plain"} for i in range(50)
    ]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=1),
                     home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    runner.export_results(job.dir, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", encoding="utf-8-sig", newline="") as f:
        back = list(csv.DictReader(f))
    assert [(r["id"], r["prompt"], r["note"]) for r in back] == [
        (x["id"], x["prompt"], x["note"]) for x in rows
    ]
    import pandas as pd

    df = pd.read_csv(tmp_path / "out.csv", encoding="utf-8-sig", keep_default_na=False)
    assert len(df) == 50 and list(df["note"][:2]) == ["plain", "x\ry"]


def test_an_openai_batch_export_is_named_jsonl(done_job, tmp_path):
    """`--format openai --to out.parquet` wrote JSON Lines under that name (and out.errors.parquet) without a
    word (pass 46)."""
    with pytest.raises(runner.RunnerError, match=r"out.parquet: an OpenAI Batch output file is JSON Lines"):
        runner.export_results(done_job.dir, tmp_path / "out.parquet", format="openai")
    assert not (tmp_path / "out.parquet").exists()
    # nor its errors file: `--errors-to x.csv` wrote JSON Lines under that name, where `--to x.csv` was refused
    with pytest.raises(
        runner.RunnerError, match=r"x.csv: an OpenAI Batch error file is JSON Lines: give it a "
    ):
        runner.export_results(
            done_job.dir, tmp_path / "out.jsonl", format="openai", errors_to=tmp_path / "x.csv"
        )
    said = invoke("results", done_job.dir, "--format", "openai", "--to", tmp_path / "out.jsonl", "--errors-to",
                  tmp_path / "x.csv")  # fmt: skip
    assert said.exit_code == 1 and "x.csv: an OpenAI Batch error file is JSON Lines" in said.output, (
        said.output
    )
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "out.jsonl").exists()
    assert runner.export_results(done_job.dir, tmp_path / "out.jsonl", format="openai").rows == 3


def test_nan_and_infinities_in_a_passthrough_column_pass_through(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A float column holding NaN or inf (as Polars, Spark and datasets write them) was refused row by row, "must
    be a finite number" (adversarial pass 46): it is data, kept as stored, and a JSON export writes null."""
    import math

    import pyarrow as pa

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "score": [1.5, float("nan"), float("inf")]}), path)
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=1), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    score = list(runner.load_results(job.dir)["score"])
    assert score[0] == 1.5 and math.isnan(score[1]) and score[2] == float("inf")
    runner.export_results(job.dir, tmp_path / "out.jsonl")
    back = [json.loads(line)["score"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert back == [1.5, None, None]


def test_load_results_of_an_exported_file_reads_again_through_a_transient_error(tmp_path, monkeypatch):
    """`runner.load_results("/content/drive/.../results.parquet")`: one EIO reading the file is read again, not
    an OSError traceback in the notebook."""
    import errno

    import pyarrow as pa
    import pyarrow.parquet as pq

    import runner
    from runner import jobdir, storage

    path = tmp_path / "results.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), path)
    real, failed = jobdir.read_parquet, []

    def read_parquet(source, *args, **kwargs):
        if not failed:
            failed.append(source)
            raise OSError(errno.EIO, "Input/output error", str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,))
    monkeypatch.setattr(jobdir, "read_parquet", read_parquet)
    assert list(runner.load_results(path)["id"]) == ["a", "b"] and failed


def test_a_float32_column_of_a_dataframe_or_parquet_file_keeps_its_type(tmp_path, tiny_gpt2, gpt2_engine,
                                                                         runner_home):  # fmt: skip
    """A float32 passthrough column (a DataFrame's label probabilities, an embedding model's scores) came back
    float64, so every export wrote the widened float, 0.10000000149011612 for the 0.1 the file holds
    (adversarial pass 173); a column's Parquet type is its type in the results, as given."""
    import pandas as pd
    import pyarrow as pa

    df = pd.DataFrame({"text": ["a b", "c d"], "prob": np.array([0.1, 0.7], np.float32),
                       "count": np.array([1, 2], np.int16), "price": [1.10, 2.25]})  # fmt: skip
    job = create_job(df, tiny_gpt2, ScoreParams(), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    table = runner.load_results(job.dir, format="arrow")
    assert table.schema.field("prob").type == pa.float32() and table.schema.field("count").type == pa.int16()
    assert runner.load_results(job.dir)["prob"].tolist() == df["prob"].tolist()
    runner.export_results(job.dir, tmp_path / "out.jsonl")
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prob"] for r in got] == [0.1, 0.7] and [r["price"] for r in got] == [1.10, 2.25]
    runner.export_results(job.dir, tmp_path / "out.csv")
    with open(tmp_path / "out.csv", encoding="utf-8-sig", newline="") as f:
        assert [r["prob"] for r in csv.DictReader(f)] == ["0.1", "0.7"]
