"""A damaged prompts.parquet or errors.jsonl (a flipped byte, a truncation) is written again by `runner repair`
from the job's input file, when that file is still there with the bytes submitted and the file written again is
byte for byte the one submit wrote: the night's results are kept and the job carries on. Before, such a job
could only be submitted again and computed anew. Otherwise repair says why not, and nothing changes."""

import json

import pytest
from helpers import assert_exactly_once, invoke, reference_run

import runner
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.scheduler import work
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, num_return_sequences=2, seed=5)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": "the old man said " * (1 + i % 3), "meta": {"i": i}} for i in range(8)]


@pytest.fixture
def reference(tmp_path, tiny_gpt2):
    return reference_run(tmp_path, tiny_gpt2, ROWS, PARAMS, OPTIONS, unit_rows=4)


def _half_done(tmp_path, prompts, model, **kw):
    """A job with its first unit committed and its second not started."""
    job = create_job(prompts, model, PARAMS, OPTIONS, job_dir=tmp_path / "job", unit_rows=4, **kw)
    summary = run_job(job, echo=None, should_stop=lambda: any((job.dir / "done").iterdir()))
    assert not summary.finished and runner.status(job.dir).done == 8
    return job


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def test_repair_writes_a_damaged_prompts_file_again_and_the_job_carries_on(tmp_path, tiny_gpt2, reference):
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    status = runner.status(job.dir)
    assert status.state == "broken" and "runner repair" in status.message, status
    out = invoke("repair", job.dir).output
    assert "prompts.parquet written again from the job's input file" in out, out
    assert "state queued -> queued; 8/16" in out, out
    assert [p.name.endswith("prompts.parquet") for p in (job.dir / "quarantine").iterdir()] == [True]
    assert runner.status(job.dir).state == "queued (interrupted)"
    assert run_job(job, echo=None).finished
    assert_exactly_once(job.dir, ref)


def test_a_job_failed_on_its_damaged_prompts_file_is_retried_after_the_repair(
    tmp_path, tiny_gpt2, gpt2_engine, reference
):
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    (job.dir / "prompts.parquet").write_bytes((job.dir / "prompts.parquet").read_bytes()[:100])  # torn
    said: list[str] = []
    work(job=str(job.dir), echo=said.append, engine=gpt2_engine)
    assert runner.status(job.dir).state == "failed", said
    out = invoke("repair", job.dir).output
    assert "prompts.parquet written again" in out and "state failed -> failed" in out, out
    assert f"runner retry {job.dir}" in out, out  # the way on
    runner.retry(job.dir)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, ref)


def test_repair_says_why_when_the_input_file_changed_and_changes_nothing(tmp_path, tiny_gpt2, reference):
    prompts, _ = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    damaged = (job.dir / "prompts.parquet").read_bytes()
    prompts.write_text(prompts.read_text() + json.dumps({"id": "new", "prompt": "hello"}) + "\n")
    out = invoke("repair", job.dir).output
    assert "cannot be written again" in out and "has changed since it was submitted" in out, out
    assert (job.dir / "prompts.parquet").read_bytes() == damaged
    assert runner.status(job.dir).state == "broken"


def test_repair_writes_a_damaged_errors_file_again(tmp_path, tiny_gpt2, reference):
    prompts, ref = reference
    with_bad = tmp_path / "bad.jsonl"
    with_bad.write_text(prompts.read_text() + "not json\n" + json.dumps({"id": "x"}) + "\n")
    job = create_job(
        with_bad, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "job", unit_rows=4, skip_invalid=True
    )
    refused = list(job.invalid_rows())
    assert len(refused) == 2
    _flip(job.dir / "errors.jsonl", at=0.3)
    with pytest.raises(runner.RunnerError, match="errors.jsonl"):
        list(job.invalid_rows())
    report = runner.repair(job.dir)
    assert report.restored_inputs == ["errors.jsonl"] and report.unrestorable is None
    assert list(runner.jobdir.Job.open(job.dir).invalid_rows()) == refused
    assert run_job(job, echo=None).finished
    assert_exactly_once(job.dir, ref)


def test_a_damaged_spec_and_prompts_file_are_both_restored(tmp_path, tiny_gpt2, reference):
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    (job.dir / "job.json").write_text('{"id": ')  # torn
    report = runner.repair(job.dir)
    assert report.restored_spec and report.restored_inputs == ["prompts.parquet"], report
    assert run_job(runner.jobdir.Job.open(job.dir), echo=None).finished
    assert_exactly_once(job.dir, ref)
