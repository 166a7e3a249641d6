"""OpenAI Batch runs and their output files under faults (adversarial pass 208): `run-batch` killed at every
progress event and run again, its job's files damaged between runs, two of them at once. What was found:

* prompts.parquet (where the Batch export reads each request's `model`, endpoint and log-probs asked) changed
  under unchanged times (bit rot, another job's file put in its place with its times), or changed after the
  export checked it: verified.json's stamp was trusted and the file read as it then was, so the export wrote
  the other requests' `model` and log-probs over this job's answers, with exit 0. It is hashed by the export
  (unless this process hashed it: a `run-batch` worker) and read against that hash.
* a request file written as run-batch started (after run_batch hashed it for the seed of requests without
  one, before the submit read it): the job held the new requests under the old file's seed, and the same
  command run again was refused.
* a submit (run-batch's first step) into a folder whose entries fail a look for a moment (a mount): the job
  was stored, then the check that its temp folder was gone raised the mount's raw OSError, a traceback.
"""

import functools
import json

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams, jobdir, storage
from runner.jobdir import BrokenJob, Job
from runner.jobs import create_job
from runner.openai_batch import export
from runner.worker import run_job

OPTIONS = runner.EngineOptions(batch_size=2)


def requests(model, k):
    """4 completions requests answering to `model` with `k` log-prob alternatives."""
    body = {"model": model, "max_tokens": 3, "temperature": 0, "logprobs": k}
    return [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {**body, "prompt": f"The old man {i}"}} for i in range(4)]  # fmt: skip


@pytest.fixture
def two_jobs(tmp_path, tiny_gpt2, gpt2_engine):
    """A completed Batch job (answering as "tiny", 3 alternatives) exported to ref.jsonl by a fresh process's
    look, and the prompts.parquet of a job of the same custom_ids answering as "other" with 1: valid for the
    first, and wrong."""
    mine, theirs = (
        create_job(write_jsonl(tmp_path / f"{name}.jsonl", requests(name, k)), tiny_gpt2,
                   GenerationParams(max_new_tokens=3, seed=1), OPTIONS, job_dir=tmp_path / name,
                   served_model_names=(name,))
        for name, k in (("tiny", 3), ("other", 1))
    )  # fmt: skip
    assert run_job(mine, gpt2_engine, echo=None).finished
    fresh()
    export(Job.open(mine.dir), tmp_path / "ref.jsonl")
    fresh()
    return mine, (theirs.dir / jobdir.PROMPTS).read_bytes()


def fresh():
    """As a new process: nothing hashed by this one (`runner results --format openai` after the run)."""
    jobdir._HASHED.clear()
    jobdir._BLOCKS.clear()


def put_in_place_with_its_stamp(job, data):
    """prompts.parquet's bytes replaced, verified.json stamping the file as it is now (as if nothing had changed:
    bit rot, or a sync tool that keeps times)."""
    path = job.dir / jobdir.PROMPTS
    path.write_bytes(data)
    cache = json.loads((job.dir / "verified.json").read_text())
    st = path.stat()
    cache[jobdir.PROMPTS][:3] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    (job.dir / "verified.json").write_text(json.dumps(cache))


def test_prompts_changed_under_their_stamp_are_not_answered_from(two_jobs, tmp_path):
    job, other = two_jobs
    put_in_place_with_its_stamp(job, other)
    with pytest.raises(BrokenJob, match=f"prompts.parquet of job {job.id} is damaged"):
        export(Job.open(job.dir), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_prompts_changed_after_the_export_checked_them_are_not_answered_from(two_jobs, tmp_path, monkeypatch):
    job, other = two_jobs
    path, real, swapped = job.dir / jobdir.PROMPTS, jobdir.prompts_problem, []

    def checked_then_swapped(*args, **kwargs):
        why = real(*args, **kwargs)
        if not swapped:
            swapped.append(path.read_bytes())
            put_in_place_with_its_stamp(job, other)
        return why

    monkeypatch.setattr(jobdir, "prompts_problem", checked_then_swapped)
    with pytest.raises(BrokenJob, match=f"prompts.parquet of job {job.id} is damaged"):
        export(Job.open(job.dir), tmp_path / "out.jsonl")
    assert swapped and not (tmp_path / "out.jsonl").exists()
    monkeypatch.undo()
    path.write_bytes(swapped[0])  # (as `runner repair` writes it again)
    fresh()
    assert export(Job.open(job.dir), tmp_path / "out.jsonl") == (4, 0)
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_a_torn_read_of_the_requests_is_read_again(two_jobs, tmp_path, monkeypatch):
    """A block of prompts.parquet read back other than it hashed, once (a mount's torn read), the file sound."""
    job, _ = two_jobs
    real, torn = storage.CheckedFile._block, []

    def block(self, i):
        if not torn:
            torn.append(i)
            raise storage.ChangedUnderfoot("torn")
        return real(self, i)

    monkeypatch.setattr(storage.CheckedFile, "_block", block)
    assert export(Job.open(job.dir), tmp_path / "out.jsonl") == (4, 0)
    assert torn and (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_a_file_written_as_run_batch_starts_gets_the_seed_of_what_was_read(tmp_path, tiny_gpt2, monkeypatch):
    """Requests without a seed take one from the file's sha256 under run-batch. run_batch hashed the file itself,
    before the submit read it: written in between (a notebook cell saving it as another starts the run), the
    job held the new requests under the old file's seed; the same command run again was refused ("holds a job
    with other inputs or settings (seed A, now B)"), and a run of the file in a clean folder wrote other bytes."""
    from runner import jobs
    from runner.openai_batch import run_batch

    inp = write_jsonl(tmp_path / "in.jsonl", requests("tiny", None))
    later = [{**r, "body": {**r["body"], "temperature": 1.0}} for r in requests("tiny", None)]
    real = jobs.create_job

    @functools.wraps(real)  # (run() checks its keywords against create_job's)
    def written_first(*args, **kwargs):
        write_jsonl(inp, later)
        return real(*args, **kwargs)

    def batch(out):
        return run_batch(inp, out, tiny_gpt2, GenerationParams(max_new_tokens=3), OPTIONS,
                         served_model_names=("tiny",), echo=None)  # fmt: skip

    with monkeypatch.context() as m:
        m.setattr(jobs, "create_job", written_first)
        assert batch(tmp_path / "out.jsonl")[1].finished
    job, summary = batch(tmp_path / "out.jsonl")  # the same command again: the job as it was, nothing to do
    assert summary.finished and summary.generated == 0
    assert batch(tmp_path / "clean.jsonl")[1].finished
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "clean.jsonl").read_bytes()


def test_a_submit_into_a_flaky_folder_stores_its_job_and_says_so(tmp_path, tiny_gpt2, monkeypatch):
    """Every first look at each entry of the folder the job goes in fails once (EIO / ENOTCONN), as a Drive
    mount's do: the submit stores the job, returns it, and leaves nothing else there."""
    from fsfaults import FsFaults

    inp = write_jsonl(tmp_path / "in.jsonl", requests("tiny", None))
    home = tmp_path / "home"
    home.mkdir()
    with monkeypatch.context() as m:
        faults = FsFaults(home, eio=1.0, eio_dirs=(".",), retry_delays=[0.0] * 4)
        faults.install(m)
        job = create_job(inp, tiny_gpt2, GenerationParams(max_new_tokens=3), OPTIONS, job_dir=home / "job",
                         served_model_names=("tiny",))  # fmt: skip
    assert job.created and faults.eio_count
    assert [p.name for p in home.iterdir()] == ["job"]
    again = create_job(inp, tiny_gpt2, GenerationParams(max_new_tokens=3), OPTIONS, job_dir=home / "job",
                       served_model_names=("tiny",))  # fmt: skip
    assert again.id == job.id and not again.created
