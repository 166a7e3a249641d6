"""A beam setting accepted at submit must not break the job at work time."""

from helpers import write_jsonl

import runner
from runner import GenerationParams


def test_a_huge_length_penalty_row_does_not_fail_the_job(tmp_path, tiny_gpt2, gpt2_engine):
    """length_penalty is only checked to be finite. transformers computes `len ** length_penalty` with Python
    numbers: 1000.0 raises OverflowError inside generate, which is neither out-of-memory nor NaN, so it is not
    made a row error: it escapes the worker and takes the whole job (every other row) down with it.
    It should be refused at submit (with its line and field) or become that row's error."""
    rows = [
        {"id": "ok", "prompt": "The old man"},
        {"id": "bad", "prompt": "The old man", "num_beams": 2, "length_penalty": 1000.0},
    ]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    try:
        job, summary = runner.run(f, tiny_gpt2, GenerationParams(max_new_tokens=4), output=tmp_path / "out",
                                  engine=gpt2_engine, echo=None, skip_invalid=True)  # fmt: skip
    except OverflowError as e:
        raise AssertionError(f"the job died of one row's setting: {e!r}") from e
    except runner.RunnerError:
        return  # refused as a whole with a clear message: acceptable
    assert summary.finished
    assert list(runner.load_results(job.dir)["id"]) == ["ok"]
