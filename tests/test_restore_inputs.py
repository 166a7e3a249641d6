"""A damaged prompts.parquet or errors.jsonl (a flipped byte, a truncation) is written again by `runner repair`
from the job's input file, when that file is still there with the bytes submitted and the file written again is
byte for byte the one submit wrote: the night's results are kept and the job carries on. Before, such a job
could only be submitted again and computed anew. Otherwise repair says why not, and nothing changes."""

import json

import pytest
from helpers import assert_exactly_once, invoke, prompts_hashing, reference_run, write_jsonl

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


def test_a_job_broken_by_its_damaged_prompts_file_goes_on_after_the_repair(
    tmp_path, tiny_gpt2, gpt2_engine, reference
):
    """A worker meeting the damaged file leaves the job broken and queued (it failed it, and a `runner retry`
    was needed after the repair: pass 120)."""
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    (job.dir / "prompts.parquet").write_bytes((job.dir / "prompts.parquet").read_bytes()[:100])  # torn
    said: list[str] = []
    work(job=str(job.dir), echo=said.append, engine=gpt2_engine)
    assert runner.status(job.dir).state == "broken", said
    out = invoke("repair", job.dir).output
    assert "prompts.parquet written again" in out and "state queued -> queued" in out, out
    assert "work" in out.splitlines()[-1] and "retry" not in out, out  # the way on
    assert run_job(job, gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, ref)


def test_repair_says_why_when_the_input_file_changed_and_changes_nothing(tmp_path, tiny_gpt2, reference):
    prompts, _ = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    damaged = (job.dir / "prompts.parquet").read_bytes()
    prompts.write_text(prompts.read_text() + json.dumps({"id": "new", "prompt": "hello"}) + "\n")
    result = invoke("repair", job.dir)
    out = result.output
    assert "was not written again" in out and "has changed since it was submitted" in out, out
    assert result.exit_code == 1 and out.splitlines()[-1].startswith(
        "Error: prompts.parquet or errors.jsonl"
    ), out
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


def test_an_openai_batch_job_leaving_sampling_open_is_restored(tmp_path, tiny_gpt2, gpt2_engine):
    """Pass 75: requests without `temperature` (the OpenAI default) are sampled by submit's own rule; job.json
    holds the do_sample submit decided, which read back as given, and every rebuild differed from the file."""
    reqs = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": f"Hello {i}", "max_tokens": 3, **({"n": 2} if i % 2 else {})}}
            for i in range(4)]  # fmt: skip
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    job = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=3), job_dir=tmp_path / "job",
                     served_model_names=("tiny",))  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    before = runner.load_results(job.dir)
    _flip(job.dir / "prompts.parquet")
    report = runner.repair(job.dir)
    assert (report.restored_inputs, report.unrestorable) == (["prompts.parquet"], None)
    assert runner.load_results(job.dir).equals(before)


def test_a_job_stored_before_its_input_settings_were_recorded_is_restored(tmp_path, tiny_gpt2, reference):
    """Pass 75: a job.json of before 2026-12-02 has no served_model_names, chat or skip_invalid in its input: the
    repair ended in a KeyError traceback."""
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    for name in ("job.json", "job.backup.json"):
        meta = json.loads((job.dir / name).read_text())
        for key in ("served_model_names", "chat", "skip_invalid"):
            del meta["input"][key]
        meta["spec_sha256"] = runner.jobdir.spec_checksum(meta)
        (job.dir / name).write_text(json.dumps(meta))
    _flip(job.dir / "prompts.parquet")
    assert runner.repair(job.dir).restored_inputs == ["prompts.parquet"]
    assert run_job(runner.jobdir.Job.open(job.dir), echo=None).finished
    assert_exactly_once(job.dir, ref)


def _per_row_n_job(tmp_path, model):
    rows = [
        {"id": f"r{i}", "prompt": f"The robot {i} dreams of", **({"n": 2} if i < 4 else {})} for i in range(8)
    ]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = create_job(
        path, model, GenerationParams(max_new_tokens=3, seed=3), job_dir=tmp_path / "job", unit_rows=4
    )
    run_job(job, echo=None, should_stop=lambda: any((job.dir / "done").iterdir()))
    return job, path


def test_a_refused_restore_of_a_per_row_n_job_says_why(tmp_path, tiny_gpt2):
    """Pass 75: such a job reads its prompts to count its rows, so repair stopped on the damaged file with its
    advice to run repair (the one just run), the reason the file could not be written again lost."""
    job, path = _per_row_n_job(tmp_path, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    path.write_text(path.read_text() + json.dumps({"id": "new", "prompt": "hello"}) + "\n")
    result = invoke("repair", job.dir)
    assert result.exit_code == 1 and "has changed since it was submitted" in result.output, result.output


def test_a_restore_is_said_even_where_log_txt_or_job_json_needed_mending_too(tmp_path, tiny_gpt2):
    """Pass 75: a log.txt that is a folder made a finished restore read as refused ("submit the file again"); a
    torn job.json restored from its backup in a per-row n job was not said."""
    job, _ = _per_row_n_job(tmp_path, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    (job.dir / "log.txt").unlink()
    (job.dir / "log.txt").mkdir()
    (job.dir / "job.json").write_text('{"id": ')
    report = runner.repair(job.dir)
    assert report.restored_spec and report.restored_inputs == ["prompts.parquet"] and not report.unrestorable
    assert report.state_now == "queued"
    assert run_job(runner.jobdir.Job.open(job.dir), echo=None).finished
    assert len(runner.load_results(job.dir)) == 12


def test_status_of_a_read_only_home_hashes_a_prompts_file_once_per_process(tmp_path, tiny_gpt2, monkeypatch):
    """Pass 75: where verified.json cannot be written (a read-only copy of a home, its stamps stale), each poll
    hashed (on a network mount: downloaded) every queued job's prompts.parquet."""
    from runner import jobdir

    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, job_dir=tmp_path / "job")
    (job.dir / "verified.json").unlink()  # copied without its times: the stamp would be stale anyway
    monkeypatch.setattr(jobdir.Verifier, "save", lambda self: None)  # read-only: nothing is written
    hashings = prompts_hashing(monkeypatch)
    for _ in range(3):
        assert runner.status(job.dir).state == "queued"
    assert hashings() == 1


def test_a_missing_prompts_file_is_written_again(tmp_path, tiny_gpt2, reference):
    """Deleted (or a folder in its place), prompts.parquet made the job one to submit again: repair writes it
    again from the input file, as a damaged one."""
    prompts, ref = reference
    job = _half_done(tmp_path, prompts, tiny_gpt2)
    (job.dir / "prompts.parquet").unlink()
    status = runner.status(job.dir)
    assert status.state == "broken" and "prompts.parquet is missing: `runner repair" in status.message, status
    assert status.message.count("runner repair") == 1
    assert runner.repair(job.dir).restored_inputs == ["prompts.parquet"]
    assert run_job(runner.jobdir.Job.open(job.dir), echo=None).finished
    assert_exactly_once(job.dir, ref)
    prompts.unlink()  # and without the input file: a clear refusal, nothing changed
    (job.dir / "prompts.parquet").unlink()
    with pytest.raises(
        runner.RunnerError, match="prompts.parquet is missing.*repair could not: its input .* is not"
    ):
        runner.repair(job.dir)


def test_a_transient_error_reading_a_parquet_input_file_is_read_again_not_taken_for_a_changed_file(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Repair writing a damaged prompts.parquet again from a Parquet input file (on a Drive mount) met one
    transient EIO opening it: read as "not a readable Parquet file", the repair said the input file no longer
    reads as it did and the job could not be repaired (submit it again), and a submit said the file was not
    Parquet. Found by the adversarial pass auditing transient errors taken for answers: the open is tried
    again, and an error that lasts is said as the file system's, never as the file's."""
    import errno
    import os

    import pandas as pd
    import pyarrow.parquet as pq

    from runner import storage

    source = tmp_path / "p.parquet"
    pd.DataFrame([{"id": r["id"], "prompt": r["prompt"]} for r in ROWS]).to_parquet(source)
    job = _half_done(tmp_path, source, tiny_gpt2)
    _flip(job.dir / "prompts.parquet")
    real, failed = pq.ParquetFile, []

    class ParquetFile(real):
        def __init__(self, where, *args, **kwargs):
            if isinstance(where, (str, os.PathLike)) and os.fspath(where) == str(source) and not failed:
                failed.append(where)  # the first open of the input file meets a failing mount, once
                raise OSError(errno.EIO, "Input/output error")
            super().__init__(where, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", ParquetFile)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01,) * 3)
    report = runner.repair(job.dir)
    assert failed and report.restored_inputs == ["prompts.parquet"] and not report.unrestorable, report
    assert run_job(job, echo=None).finished and runner.status(job.dir).state == "completed"
