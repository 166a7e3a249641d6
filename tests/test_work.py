"""The queue: order, claims (live ones respected, stale ones taken over), deadline, cancel/retry, status."""

import json
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams, RunnerError, jobdir
from runner.job_status import job_status, status_table
from runner.jobdir import Heartbeat, Job, JobState, Owner, read_state, take_unit
from runner.jobs import create_job
from runner.scheduler import queue, work
from runner.worker import JobRun, run_job


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(
        tmp_path / "p.jsonl", ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(6))
    )


def cancel_job(path):
    return jobdir.cancel(Job.open(path))


def retry_job(path):
    return jobdir.retry(Job.open(path))


def set_state(path, state):
    Job.open(path).set_state(JobState(state))


def submit(prompts_file, model, **kw):
    return create_job(
        prompts_file, model, GenerationParams(max_new_tokens=3), runner.EngineOptions(batch_size=2), **kw
    )


def test_queue_order_interrupted_then_priority_then_age(prompts_file, tiny_gpt2, runner_home, monkeypatch):
    ids = iter(f"20260101-00000{i}-aaaaaa" for i in range(9))  # ids sort by creation time; no need to wait
    monkeypatch.setattr(jobdir, "new_job_id", lambda: next(ids))
    monkeypatch.setattr("runner.jobs.new_job_id", lambda: next(ids))
    old = submit(prompts_file, tiny_gpt2)
    urgent = submit(prompts_file, tiny_gpt2, priority=5)
    newer = submit(prompts_file, tiny_gpt2)
    broken = submit(prompts_file, tiny_gpt2, priority=-1)
    take_unit(broken, 0, Owner.me("dead-worker"), -1)  # its worker died holding a unit: no heartbeat
    done = submit(prompts_file, tiny_gpt2)
    set_state(done.dir, "completed")
    assert [c.job.id for c in queue(runner_home)] == [broken.id, urgent.id, old.id, newer.id]


def test_live_claim_is_respected_and_stale_claim_taken_over(
    prompts_file, tiny_gpt2, gpt2_engine, runner_home
):
    job = submit(prompts_file, tiny_gpt2)
    other = Owner.me("other-worker")
    beat = Heartbeat(job, other, ttl=60)
    beat.beat()  # the other worker is alive...
    assert take_unit(job, 0, other, -1) == 0  # ...and holds the job's only unit
    assert queue(runner_home) == []
    said = []
    # Nothing is taken while the other worker's heartbeat is fresh: this worker waits (stopped once it says so).
    assert work(runner_home, echo=said.append, stop=lambda: bool(said), poll=0.2) == []
    assert "the rest is held by worker other-worker" in said[0]
    # The other worker dies: no more heartbeats, its claim goes stale, and the unit is taken over.
    hb = json.loads(beat.path.read_text())
    hb["expires"] = time.time() - 1
    beat.path.write_text(json.dumps(hb))
    summaries = work(runner_home, echo=None)
    assert [s.job_id for s in summaries] == [job.id] and summaries[0].finished
    assert read_state(job.dir).state == "completed"


def test_run_waits_for_a_unit_another_worker_holds_and_takes_it_over_when_it_dies(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine, monkeypatch
):
    """`runner run -o DIR` on a job another live worker shares (a second VM on one Drive folder): once nothing
    is left to claim it waits for the other's units, as `runner work` does, and takes them over if it dies;
    before, it exited 1 with "stopped with 3/6 rows done; run the same command again" while the other was still
    computing (found by adversarial pass 11). Deterministic: the other dies during the first wait."""
    from runner import scheduler

    out = tmp_path / "out"
    job = submit(prompts_file, tiny_gpt2, job_dir=out, unit_rows=3)
    other = Owner.me("other-worker")
    beat = Heartbeat(job, other, ttl=60)
    beat.beat()
    assert take_unit(job, 0, other, -1) == 0  # the other holds rows 0-2
    waits = []

    def the_other_dies(folders, most):
        waits.append(most)
        hb = json.loads(beat.path.read_text())
        beat.path.write_text(json.dumps({**hb, "expires": time.time() - 1}))

    monkeypatch.setattr(scheduler, "_sleep_until_a_commit", the_other_dies)
    params = GenerationParams(max_new_tokens=3)
    again, summary = runner.run(prompts_file, tiny_gpt2, params, runner.EngineOptions(batch_size=2), output=out,
                                engine=gpt2_engine, echo=None)  # fmt: skip
    assert again.id == job.id and len(waits) == 1
    assert summary.finished and summary.done == summary.generated == 6
    assert list(runner.load_results(out)["id"]) == [f"r{i}" for i in range(6)]


def test_run_of_a_job_cancelled_meanwhile_says_retry_not_run_again(prompts_file, tiny_gpt2, runner_home,
                                                                     monkeypatch):  # fmt: skip
    """`runner run FILE` whose job is cancelled from elsewhere (another cell or VM) said "run the same command
    again to carry on", which made a new job and computed every row again (a cancelled job is never carried
    on; adversarial pass 11). It now names `runner retry`, after which the same command carries the job on."""
    from helpers import invoke

    from runner import scheduler

    real = scheduler.run_leased

    def cancelled_first(cand, *args, **kwargs):
        cancel_job(cand.job.dir)  # the user's `runner cancel`, from elsewhere, as the run starts
        return real(cand, *args, **kwargs)

    monkeypatch.setattr(scheduler, "run_leased", cancelled_first)
    args = ["run", prompts_file, "--model", tiny_gpt2, "--max-new-tokens", 3]
    result = invoke(*args)
    (job,) = jobdir.job_folders(runner_home)
    assert result.exit_code == 1 and f"job {job.name} was cancelled with 0/6 rows done" in result.output
    assert (
        f"`runner retry {job}` re-queues it" in result.output
        and "run the same command again" not in result.output
    )
    monkeypatch.setattr(scheduler, "run_leased", real)
    retry_job(job)
    result = invoke(*args)
    assert result.exit_code == 0 and "done: 6/6 rows" in result.output
    assert [p.name for p in jobdir.job_folders(runner_home)] == [job.name]


def test_two_workers_never_run_one_job_at_once(prompts_file, tiny_gpt2, runner_home):
    jobs = [submit(prompts_file, tiny_gpt2) for _ in range(4)]
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(work(runner_home, echo=None, poll=0.2)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = [s.job_id for summaries in results for s in summaries if s.generated]
    assert sorted(ran) == sorted(j.id for j in jobs)  # each job generated by exactly one worker
    for j in jobs:
        df = runner.load_results(j.dir)
        assert list(df["id"]) == [f"r{i}" for i in range(6)]


def test_deadline_stops_between_batches_and_work_resumes(prompts_file, tiny_gpt2, gpt2_engine, runner_home):
    job = submit(prompts_file, tiny_gpt2)
    summary = run_job(job, gpt2_engine, echo=None, deadline=time.time() - 1, shard_rows=1)
    assert not summary.finished and summary.generated == 0
    summaries = work(runner_home, echo=None, deadline=time.time() + 3600)
    assert summaries[0].finished and len(runner.load_results(job.dir)) == 6


def test_a_cancel_landing_as_the_last_rows_are_done_leaves_a_complete_job(tmp_path, tiny_gpt2, monkeypatch):
    """A `runner cancel` that lands after the last row is done, just before the worker records completion:
    run-batch said "was cancelled ... `runner retry` resumes it", then "done: 6/6" and wrote the output, and the
    same command run again refused "job is cancelled" with nothing left to do (pass 51). Now both say the job
    was cancelled after every row was done, and the rerun writes the output again."""
    import runner.worker as worker

    real = worker.JobRun.finish

    def cancelled_as_it_finishes(self, ran):
        if ran:
            cancel_job(self.job.dir)
        return real(self, ran)

    monkeypatch.setattr(worker.JobRun, "finish", cancelled_as_it_finishes)
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": "m", "prompt": f"the old man {i}", "max_tokens": 3, "temperature": 0},
    }) + "\n" for i in range(6)))  # fmt: skip
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", requests, "-o", out, "-m", tiny_gpt2, "--served-model-name", "m"]
    first = invoke(*args)
    said = "was cancelled after every row was done: its results are complete"
    assert first.exit_code == 0 and said in first.output and "runner retry" not in first.output, first.output
    written = out.read_text()
    assert len(written.splitlines()) == 6
    out.unlink()
    again = invoke(*args)
    assert again.exit_code == 0 and said in again.output and out.read_text() == written, again.output


def test_cancel_then_retry_keeps_finished_rows(prompts_file, tiny_gpt2, gpt2_engine, runner_home):
    job = submit(prompts_file, tiny_gpt2)
    calls = []
    run_job(job, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: calls.append(1) or len(calls) > 1)
    kept = runner.load_results(job.dir)
    assert len(kept) == 2
    assert cancel_job(job.dir) == "queued"
    assert work(runner_home, echo=None) == []  # cancelled jobs are not picked up
    assert job_status(job).state == "cancelled"
    with pytest.raises(RunnerError, match="already cancelled"):
        cancel_job(job.dir)
    retry_job(job.dir)
    summaries = work(runner_home, echo=None)
    assert summaries[0].generated == 4  # only the rows that were not finished
    after = runner.load_results(job.dir)
    assert after.iloc[:2][["id", "text"]].to_json() == kept[["id", "text"]].to_json()
    with pytest.raises(RunnerError, match=r"only failed or cancelled jobs.* mended by `runner repair "):
        retry_job(job.dir)


def test_status_counts_and_table(prompts_file, tiny_gpt2, gpt2_engine, runner_home):
    job = submit(prompts_file, tiny_gpt2, name="nightly")
    calls = []
    run_job(job, gpt2_engine, echo=None, shard_rows=1, should_stop=lambda: calls.append(1) or len(calls) > 2)
    s = job_status(Job.open(job.dir))
    assert (s.done, s.total, s.errors, s.state) == (4, 6, 0, "queued (interrupted)")
    table = status_table([s])
    assert table.splitlines()[0].split() == [
        "JOB",
        "NAME",
        "KIND",
        "STATE",
        "DONE/TOTAL",
        "TOK/S",
        "ETA",
        "ERRORS",
        "WORKERS",
        "MODEL",
    ]
    assert "nightly" in table and "4/6" in table
    assert table.splitlines()[1].split()[1:3] == ["nightly", "generate"] and s.as_dict()["kind"] == "generate"
    stats = Job.open(job.dir).read_stats()["runs"]
    assert s.peak_memory_bytes == stats[-1]["peak_memory_bytes"] > 0  # what the run recorded
    result = invoke("--home", runner_home, "status", "nightly")
    assert f"memory:   peak {s.peak_memory_bytes / 2**30:.2f} GiB" in result.output
    settings = next(ln for ln in result.output.splitlines() if ln.startswith("settings: "))
    assert (
        "min_new_tokens" not in settings and "num_beams" not in settings
    )  # only what differs from the defaults
    assert settings.endswith(f"seed={Job.open(job.dir).seed}")


def test_a_changed_model_is_refused_on_resume(prompts_file, tmp_path, runner_home):
    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    job = submit(prompts_file, str(model))
    cfg = json.loads((model / "config.json").read_text())
    cfg["n_layer"] = 1  # the user re-saved a different model into the same folder
    (model / "config.json").write_text(json.dumps(cfg))
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and "is not the one job" in state.error
    # what to do: a retry alone fails the same way (runner work advised it, over and over: pass 38)
    assert f"put that model back, then `runner retry {job.id}`, or submit the file again" in state.error
    from helpers import invoke

    assert invoke("retry", job.id).exit_code == 0
    result = invoke("work")
    assert result.exit_code == 1 and "a retry alone would fail again: it says what to do" in result.output
    assert "`runner retry JOB` re-queues it" not in result.output


def test_another_transformers_version_resumes_the_job(prompts_file, tmp_path, runner_home, monkeypatch):
    """Colab preinstalls its own transformers, and a new VM may have another: the model is the same, so the job
    resumes (the fingerprint hashed the config as the running transformers serialised it, naming its version
    and defaults: every job failed as "not the one job was submitted with"; adversarial pass 18). The model's
    JSON files saved again by another version (the demo model converted again on a fresh VM) count the same."""
    import transformers.configuration_utils as configuration_utils
    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    job = submit(prompts_file, str(model))
    monkeypatch.setattr(configuration_utils, "__version__", "9.9.9")  # what a config says it is read by
    for name in ("config.json", "generation_config.json"):
        if (model / name).exists():
            saved = json.loads((model / name).read_text())
            saved["transformers_version"] = "9.9.9"
            (model / name).write_text(json.dumps(saved, indent=2))
    assert len(work(runner_home, echo=None)) == 1
    assert read_state(job.dir).state == "completed"


def test_a_transient_read_error_on_the_model_is_retried_not_a_failed_job(
    prompts_file, tiny_gpt2, runner_home, monkeypatch
):
    """One EIO reading the model (a folder on Drive gone for a moment) is retried; one that lasts leaves the job as
    it was, to resume later, never `failed`, and the worker goes on with the other jobs (found by adversarial
    passes 8 and 9: one EIO failed the job until a `runner retry`; a lasting one held the whole queue)."""
    import errno

    import runner.models
    from runner import scheduler, storage

    real, calls = runner.models.model_fingerprint, []

    def fingerprint(*args, failing=1, **kwargs):
        calls.append(1)
        if len(calls) <= failing:
            raise OSError(errno.EIO, "Input/output error", "model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(runner.models, "model_fingerprint", fingerprint)
    job = submit(prompts_file, tiny_gpt2)
    calls.clear()
    assert work(runner_home, echo=None)[0].finished and len(calls) == 2
    job = submit(prompts_file, tiny_gpt2)
    other = create_job(prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=2), name="other")
    real_check, tries = scheduler._check_model, []

    def check(j):  # job's model keeps failing to read; the other job's is fine
        if j.id != job.id:
            return real_check(j)
        tries.append(1)
        raise RunnerError("cannot read the model") from OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(scheduler, "_check_model", check)
    said = []
    summaries = work(runner_home, echo=said.append)
    assert [s.job_id for s in summaries] == [other.id] and summaries[
        0
    ].finished  # the other job ran meanwhile
    assert any(
        f"cannot read the model {tiny_gpt2!r}" in x and f"job {job.id} is as it was" in x for x in said
    )
    assert len(tries) == 3 and read_state(job.dir).state == "queued"


def test_another_checkpoint_saved_over_the_model_folder_is_refused_on_resume(
    prompts_file, tmp_path, runner_home
):
    """A fine-tuning run saving into the same output_dir: same config, same file names and sizes, other
    weights. The job must not resume on them (its results would mix two models)."""
    import shutil

    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model", seed=0)
    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    weights = model / "model.safetensors"
    assert weights.stat().st_size == (other / "model.safetensors").stat().st_size
    job = submit(prompts_file, str(model))
    shutil.copy(other / "model.safetensors", weights)
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and "is not the one job" in state.error


@pytest.mark.parametrize("tuned", ["ln_", "bias"])
def test_a_fine_tune_of_only_the_norms_or_the_biases_saved_over_the_model_is_refused(
    prompts_file, tmp_path, runner_home, tiny_gpt2, tuned
):
    """LN-tuning and BitFit change only small tensors, which 16 pieces of the file missed: the job resumed on
    the new weights and mixed two models without a word (adversarial pass 19). Every tensor is sampled now.
    Here one such tensor, chosen outside the 16 pieces, changes."""
    import struct

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from runner.models import SAMPLE_BYTES, SAMPLES_PER_FILE

    model = tmp_path / "model"
    config = GPT2Config.from_pretrained(tiny_gpt2)
    config.n_embd, config.n_layer, config.n_head = 256, 6, 4
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model / f).write_bytes((Path(tiny_gpt2) / f).read_bytes())
    job = submit(prompts_file, str(model))
    path = model / "model.safetensors"
    raw, size = path.read_bytes(), path.stat().st_size
    (n,) = struct.unpack("<Q", raw[:8])
    windows = [max(0, (size - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1)) for i in range(SAMPLES_PER_FILE)]
    unseen = [name for name, t in json.loads(raw[8 : 8 + n]).items() if tuned in name and name != "__metadata__"
              and not any(w < 8 + n + t["data_offsets"][1] and 8 + n + t["data_offsets"][0] < w + SAMPLE_BYTES
                          for w in windows)]  # fmt: skip
    weights = load_file(path)
    save_file(
        {k: v + 0.01 if k == unseen[0] else v for k, v in weights.items()}, path, metadata={"format": "pt"}
    )
    assert path.stat().st_size == size and path.read_bytes() != raw
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and "is not the one job" in state.error


@pytest.mark.parametrize(
    "layout", ["stale index", "transformers_weights", "transformers_weights in a subfolder"]
)
def test_the_weights_transformers_loads_are_the_ones_fingerprinted(
    prompts_file, tmp_path, runner_home, layout
):
    """A model saved sharded, then unsharded into the same folder, keeps the old index beside model.safetensors
    (transformers removes the old shards, not the index); transformers loads model.safetensors first, and
    config.json's `transformers_weights` before anything. The fingerprint read the index first, so other weights
    saved over model.safetensors resumed the job without a word (pass 50)."""
    import shutil

    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model", seed=0)
    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    if layout == "stale index":
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
        ))  # fmt: skip
        loaded = "model.safetensors"
    else:
        loaded = "weights.safetensors" if layout == "transformers_weights" else "best/weights.safetensors"
        (model / loaded).parent.mkdir(exist_ok=True)
        shutil.move(model / "model.safetensors", model / loaded)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "transformers_weights": loaded}))
        (model / "model.safetensors").write_bytes(b"not loaded")
    job = submit(prompts_file, str(model))
    shutil.copy(other / "model.safetensors", model / loaded)
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and "is not the one job" in state.error


@pytest.mark.slow
def test_a_gguf_fine_tune_of_only_its_norms_is_refused(prompts_file, tmp_path, runner_home):
    """16 pieces of a GGUF file missed a change to its norms alone: the job resumed on other weights without a
    word (pass 50). Every tensor of the GGUF is sampled now (the table read with the gguf package)."""
    import gguf
    import numpy as np

    from runner.models import SAMPLE_BYTES, SAMPLES_PER_FILE, _gguf_source, model_fingerprint

    path = tmp_path / "model.gguf"
    path.write_bytes(_gguf_source("smollm2-135m-instruct").read_bytes())
    before = {v: model_fingerprint(str(path), None, v) for v in ("5", "6")}
    size = path.stat().st_size
    windows = [max(0, (size - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1)) for i in range(SAMPLES_PER_FILE)]
    norm = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith("norm.weight") and not any(
        w < t.data_offset + t.n_bytes and t.data_offset < w + SAMPLE_BYTES for w in windows))  # fmt: skip
    st = path.stat()
    with open(path, "r+b") as f:  # one norm scaled in place, as a norm-only fine-tune saved over the file
        f.seek(int(norm.data_offset))
        f.write((np.asarray(norm.data, dtype=np.float32) * 1.01).astype(np.float32).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # its times kept, as `cp --preserve=timestamps` does
    assert model_fingerprint(str(path), None, "5") == before["5"]  # (what version 5 missed)
    assert model_fingerprint(str(path), None, "6") != before["6"]


def test_a_weight_file_transformers_does_not_load_changes_nothing(prompts_file, tmp_path, runner_home):
    """A Drive conflict copy "model (1).safetensors" or an optimizer.pt beside the weights is loaded by
    nothing: the job resumes (it failed as "another model", adversarial pass 19)."""
    import shutil

    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    job = submit(prompts_file, str(model))
    shutil.copy(model / "model.safetensors", model / "model (1).safetensors")
    (model / "optimizer.pt").write_bytes(b"state")
    assert len(work(runner_home, echo=None)) == 1 and read_state(job.dir).state == "completed"


def test_status_counts_rows_computed_but_not_saved_yet(prompts_file, tiny_gpt2, runner_home, monkeypatch):
    """Rows are saved every --shard-rows rows or --shard-minutes: status showed "128/400" and a far ETA while
    the worker's log said 384/400 (new-user walkthrough). It shows those rows as computed, not saved (a kill
    loses them), counts them in the ETA, and the worker's progress line says so too."""
    import runner.worker as worker

    beats, seen, lines = [], [], []

    class Recorded(Heartbeat):
        def __post_init__(self):
            super().__post_init__()
            beats.append(self)

    def after_batch(name):
        if name == "after_generate" and not seen:
            beats[-1].beat()  # the next beat, now
            seen.append(job_status(Job.open(job.dir)))

    monkeypatch.setattr(worker, "Heartbeat", Recorded)
    monkeypatch.setattr(worker, "HEARTBEAT_INFO_SECONDS", 0.0)
    monkeypatch.setattr(worker, "fault_point", after_batch)
    job = submit(prompts_file, tiny_gpt2)
    summary = run_job(Job.open(job.dir), echo=lines.append, lease_ttl=60, progress_interval=0.0)
    assert summary.finished
    (status,) = seen
    assert status.done == 0 and status.unsaved == 2 and status.done_text() == "0+2/6"
    assert "0+2/6" in status_table([status])
    assert any("2/6 rows (33.3%, 2 not saved yet)" in line for line in lines), lines
    final = job_status(Job.open(job.dir))
    assert final.unsaved == 0 and final.done_text() == "6/6"


def test_status_right_after_a_commit_counts_its_rows_once(prompts_file, tiny_gpt2, runner_home, monkeypatch):
    """Pass 94: after a commit and until the heartbeat's next beat (up to a quarter of the lease), status counted
    the rows just saved twice, saved and "not saved yet" ("4+4/8" when 4 rows were computed), and its ETA fell to
    nothing. The heartbeat stops counting them before the marker that saves them."""
    import runner.worker as worker
    from runner import jobdir

    beats, batches, seen = [], [], []

    class Recorded(Heartbeat):
        def __post_init__(self):
            super().__post_init__()
            beats.append(self)

    def after_batch(name):
        if name == "after_generate":
            batches.append(1)
            if len(batches) == 2:
                beats[-1].beat()  # the heartbeat thread's beat, now: 4 rows computed, none saved

    real_marker = jobdir.write_marker

    def write_marker(*a, **k):
        seen.append(job_status(Job.open(job.dir)))  # the marker about to be written: its rows are not counted
        real_marker(*a, **k)
        seen.append(job_status(Job.open(job.dir)))  # written: counted once, saved

    monkeypatch.setattr(worker, "Heartbeat", Recorded)
    monkeypatch.setattr(worker, "HEARTBEAT_INFO_SECONDS", 0.0)
    monkeypatch.setattr(worker, "fault_point", after_batch)
    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    job = submit(prompts_file, tiny_gpt2, unit_rows=6)  # batches of 2: a commit after the second
    assert run_job(Job.open(job.dir), echo=None, lease_ttl=60, shard_rows=4).finished
    before, after = seen[:2]
    assert (before.done, before.unsaved) == (0, 0), before.done_text()
    assert (after.done, after.unsaved) == (4, 0), after.done_text()


def test_the_speed_and_eta_count_from_when_the_model_is_loaded(
    prompts_file, tiny_gpt2, runner_home, monkeypatch
):
    """A 3-minute job's first ETAs read 1:08:12, then 0:22:31 (new-user walkthrough): the rates counted the model
    load as computing time. Here the load takes an hour (on the progress clock); the rates do not see it."""
    import runner.progress as progress
    import runner.worker as worker

    hour = [0.0]
    real = time.perf_counter

    class Clock:  # the time module, an hour later once the model is loading
        def __getattr__(self, name):
            return getattr(time, name)

        def perf_counter(self):
            return real() + hour[0]

    monkeypatch.setattr(progress, "time", Clock())
    monkeypatch.setattr(worker, "time", Clock())
    load = worker.JobRun.load_engine

    def slow_load(self):
        hour[0] += 3600.0 if self.engine is None else 0.0
        load(self)

    monkeypatch.setattr(worker.JobRun, "load_engine", slow_load)
    monkeypatch.setattr(worker, "HEARTBEAT_INFO_SECONDS", 0.0)
    lines: list[str] = []
    job = submit(prompts_file, tiny_gpt2)
    summary = run_job(Job.open(job.dir), echo=lines.append, lease_ttl=60, progress_interval=0.0)
    assert (
        summary.finished and summary.tokens_per_second > summary.tokens / 600
    )  # the 'done' line's tok/s too
    (run,) = Job.open(job.dir).read_stats()["runs"]
    assert (
        run["tokens_per_second"] > run["tokens"] / 600 and run["seconds"] > 3600
    )  # (the run: with the load)
    last = [line for line in lines if "rows/s" in line][-1]
    assert "elapsed 1:" in last, last  # the elapsed time is the whole run's
    rows_per_second = float(re.search(r"([\d.,]+) rows/s", last).group(1).replace(",", ""))
    assert rows_per_second > 6 / 600, last  # 6 rows in well under 10 minutes of computing, not in an hour


def test_a_changed_tokenizer_is_refused_on_resume(prompts_file, tmp_path, runner_home):
    """Two vocabulary entries exchanged in tokenizer.json (same size, config and weights untouched): results
    decoded with it would carry other texts for the same token ids."""
    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    job = submit(prompts_file, str(model))
    path = model / "tokenizer.json"
    tj = json.loads(path.read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tj))
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and "is not the one job" in state.error


def test_files_read_at_run_time_count_and_a_backup_copy_does_not(prompts_file, tmp_path, runner_home):
    """generation_config.json's EOS ids end rows at run time: a changed one is refused like a changed
    tokenizer. A backup copy beside the tokenizer (read by nothing) changes nothing."""
    import shutil

    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    first = submit(prompts_file, str(model))
    shutil.copy(model / "tokenizer.json", model / "tokenizer.json.orig")
    assert len(work(runner_home, echo=None)) == 1 and read_state(first.dir).state == "completed"
    second = submit(prompts_file, str(model), name="second")
    path = model / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    cfg["eos_token_id"] = [0, 1]
    path.write_text(json.dumps(cfg))
    assert work(runner_home, echo=None) == []
    state = read_state(second.dir)
    assert state.state == "failed" and "is not the one job" in state.error


@pytest.mark.parametrize("version", ["1", "2", "3", "4", "5", "6"])
def test_a_job_fingerprinted_by_an_older_version_still_resumes(prompts_file, tmp_path, runner_home, version):
    """Jobs submitted under an older model fingerprint (1: weight names and sizes, no prefix; 2: and samples of
    their bytes, no tokenizer; 3: and the tokenizer's files) are checked the way they were fingerprinted, not
    refused as another model."""
    from tiny_models import build_tiny_gpt2

    from runner import storage
    from runner.jobdir import spec_checksum
    from runner.models import load_config, model_fingerprint

    model = build_tiny_gpt2(tmp_path / "model")
    job = submit(prompts_file, str(model))
    assert job.meta["model_fingerprint"].startswith("7:")
    meta = {**job.meta, "model_fingerprint": model_fingerprint(str(model), load_config(str(model)), version)}
    assert (":" not in meta["model_fingerprint"]) == (version == "1")
    meta["spec_sha256"] = spec_checksum(meta)
    for name in ("job.json", "job.backup.json"):  # as such a job's folder holds them
        storage.write_json(job.dir / name, meta)
    assert len(work(runner_home, echo=None)) == 1
    assert read_state(job.dir).state == "completed"


def test_a_failing_job_home_stops_the_worker_and_leaves_the_job_resumable(
    prompts_file, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    import runner.storage as storage_module
    from runner.storage import StorageError

    job = submit(prompts_file, tiny_gpt2)
    real = storage_module.publish
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise StorageError(
                "cannot write shards/00001-x.parquet: Transport endpoint is not connected (errno 107)"
            )
        return real(*a, **kw)

    monkeypatch.setattr(storage_module, "publish", failing)
    with pytest.raises(
        StorageError, match=r"stopped: the job home cannot be written .* resumes with the next"
    ):
        work(runner_home, echo=None, engine=gpt2_engine, shard_rows=1)
    assert read_state(job.dir).state == "queued" and job_status(job).state == "queued (interrupted)"
    assert not list(
        (job.dir / "workers").iterdir()
    )  # its heartbeat is gone: the next worker takes over at once
    monkeypatch.setattr(storage_module, "publish", real)
    assert work(runner_home, echo=None, engine=gpt2_engine)[0].finished
    assert list(runner.load_results(job.dir)["id"]) == [f"r{i}" for i in range(6)]


def test_a_cancel_stops_a_running_batch_between_decode_steps(
    prompts_file, tiny_gpt2, gpt2_engine, monkeypatch
):
    """The cancel lands at the third decode step of a batch of 64 new tokens: the worker stops there, keeps
    what was committed before, and says how to resume."""
    import runner.worker as worker_module

    job = create_job(prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=64, min_new_tokens=64),
                     runner.EngineOptions(batch_size=6))  # fmt: skip
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 0.0)
    _run_cancelled_at_the_third_step(job, gpt2_engine)
    retry_job(job.dir)
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished


def test_a_cancel_is_seen_when_the_wall_clock_steps_back(prompts_file, tiny_gpt2, gpt2_engine, monkeypatch):
    """A worker whose wall clock stepped back an hour (NTP on a VM resumed) as a cancel landed went on for that
    hour: the look for a cancel was timed by the wall clock (adversarial pass 111). It is timed by
    time.monotonic (here a fake one, 10 s a call, so that every look is due) and sees the cancel."""
    import types

    import runner.worker as worker_module

    job = create_job(prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=64, min_new_tokens=64),
                     runner.EngineOptions(batch_size=6))  # fmt: skip
    ticks, stepped = [], []
    clock = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    )
    clock.time = lambda: time.time() - (3600 if stepped else 0)
    clock.monotonic = lambda: ticks.append(1) or 10.0 * len(ticks)
    monkeypatch.setattr(worker_module, "time", clock)
    _run_cancelled_at_the_third_step(job, gpt2_engine, then=lambda: stepped.append(True))


def _run_cancelled_at_the_third_step(job, engine, then=lambda: None) -> None:
    """Run JOB (a batch of 64 new tokens) with a cancel landing at its third decode step (then `then()`): the
    worker stops within a few steps, having committed nothing, and the job is cancelled."""
    steps = []

    def hook(module, args, kwargs, output):
        steps.append(1)
        if len(steps) == 3:
            cancel_job(job.dir)
            then()

    handle = engine.model.register_forward_hook(hook, with_kwargs=True)
    try:
        summary = run_job(job, engine, echo=None)
    finally:
        handle.remove()
    assert summary.stopped and summary.generated == 0 and len(steps) < 10  # not 64 steps
    assert job_status(job).state == "cancelled"


def test_a_waiting_worker_looks_again_as_soon_as_the_other_commits(tmp_path, monkeypatch):
    """A worker whose job's last units another worker holds waits for them, but looks at the queue again once a
    commit lands in done/, not `poll` seconds later: `runner work --workers 2` ended up to 15 s after its last
    row (benchmarks/cpu_workers.py). Deterministic: the commit lands during the first sleep."""
    from runner import scheduler

    done = tmp_path / "job" / "done"
    done.mkdir(parents=True)
    os.utime(done, ns=(1, 1))
    slept, land_at = [], [2]

    def sleep(seconds):
        slept.append(seconds)
        if len(slept) in land_at:  # the other worker commits
            os.utime(done, ns=(2, 2))

    clock = [1000.0]
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: (sleep(s), clock.__setitem__(0, clock[0] + s)))
    monkeypatch.setattr(scheduler.time, "time", lambda: clock[0])
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: clock[0])
    held = [(SimpleNamespace(id="job", dir=tmp_path / "job"), clock[0] + 120, "other-worker", False)]
    monkeypatch.setattr(scheduler, "_held_elsewhere", lambda *a: held)
    said, waits = [], set()
    assert scheduler._wait_for_others(None, None, "me", 15.0, None, said.append, waits)
    assert slept == [scheduler.WAIT_STEP] * 2  # not 15 s
    slept.clear()
    land_at.clear()
    assert (
        scheduler._wait_for_others(None, None, "me", 5.0, None, said.append, waits) and sum(slept) == 5.0
    )  # nothing landed
    # said once, not every poll: the holder renews its claim, and "waiting up to 120 s" never counted down
    assert said == ["job job: the rest is held by worker other-worker; waiting for it to finish (were it to die, "
                    "its claim would go stale within 120 s and this worker take the rest over)"]  # fmt: skip


def test_a_wall_clock_stepped_back_does_not_stretch_a_wait(tmp_path, monkeypatch):
    """The wall clock stepped back an hour (NTP, a VM resumed) while a worker waits for another's units: the
    wait still ends after `poll` seconds of sleep, not an hour later (a dead holder's unit waited that long;
    adversarial pass 131, repro_wait_stall.py). Deterministic: fake clocks, no sleeping."""
    from runner import scheduler

    done = tmp_path / "job" / "done"
    done.mkdir(parents=True)
    wall, steady, slept = [1000.0], [50.0], []

    def sleep(seconds):
        if len(slept) > 10_000:
            raise AssertionError("still sleeping")
        slept.append(seconds)
        steady[0] += seconds
        wall[0] += seconds - (3600.0 if len(slept) == 1 else 0.0)  # stepped back an hour during the first

    monkeypatch.setattr(scheduler.time, "sleep", sleep)
    monkeypatch.setattr(scheduler.time, "time", lambda: wall[0])
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: steady[0])
    held = [(SimpleNamespace(id="job", dir=tmp_path / "job"), wall[0] + 120, "other-worker", False)]
    monkeypatch.setattr(scheduler, "_held_elsewhere", lambda *a: held)
    assert scheduler._wait_for_others(None, None, "me", 15.0, None, None, set())
    assert sum(slept) == 15.0  # not 3,615


def test_rows_all_in_and_a_worker_dated_days_ahead_killed_before_completion(
    prompts_file, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """A worker whose clock runs days ahead is killed after the job's last commit, before its word of completion
    (its heartbeat dated days in our future, on another machine: no pid to tell). `runner work` waits for that
    heartbeat's lease (counted from when it first saw it) and records the completion; it said "nothing to do"
    and ended, every time, leaving the job "running" until the clocks met, days later (adversarial pass 131,
    repro_future_lease_unfinished.py). Deterministic: a fake steady clock, no sleeping."""
    from runner import scheduler

    job = submit(prompts_file, tiny_gpt2)
    run_job(job, gpt2_engine, echo=None)
    for record in (job.dir / jobdir.STATES).iterdir():  # its word of completion never written
        record.unlink()
    assert read_state(job.dir).state == "queued" and jobdir.job_progress(job).complete
    real_time = time.time
    monkeypatch.setattr(jobdir.time, "time", lambda: real_time() + 3 * 86400)  # the dead worker's clock
    Heartbeat(job, Owner("dead-worker", "elsewhere", 4242, "another-boot", "pid:[1]", "7"), ttl=60).beat()
    monkeypatch.setattr(jobdir.time, "time", real_time)
    steady = [1000.0]
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: steady.__setitem__(0, steady[0] + s))
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: steady[0])
    said = []
    work(runner_home, engine=gpt2_engine, echo=said.append, poll=15.0)
    assert read_state(job.dir).state == "completed"
    assert 60 <= steady[0] - 1000 <= 60 + 15  # one lease from when it was first seen
    assert any("waiting for worker dead-worker to record its completion" in line for line in said)


def _small_job(tmp_path, model, rows, **kw):
    """A job of `rows` prompts in batches of 2 (`kw`: create_job's)."""
    lines = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(rows))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), model, GenerationParams(max_new_tokens=4),
                      runner.EngineOptions(batch_size=2), **kw)  # fmt: skip


def _without_links(monkeypatch, job):
    """This file system has no hard links (records are created empty, then filled): (the job's state now, the
    place of its next state record)."""
    monkeypatch.setattr(jobdir, "links_supported", lambda folder: False)
    read = jobdir.read_state(job.dir)
    return read, job.dir / jobdir.STATES / jobdir.record_name(read.seq + 1)


def _created_empty(place):
    """A command's state record, created and not filled (yet)."""
    place.parent.mkdir(exist_ok=True)
    place.write_bytes(b"")


def _record_body(read, state, by, generation=None):
    """A command's state record over `read`, as record_state writes it."""
    from runner import storage

    generation = read.generation if generation is None else generation
    body = {**jobdir.StateRecord(state, generation).as_dict(), "updated": time.time(), "by": by,
            "writer": by[0] * 16, "over": read.writer}  # fmt: skip
    body["check"] = storage.json_checksum(body)
    return json.dumps(body)


@pytest.mark.parametrize("unit_rows", [None, 4])
def test_an_empty_newest_state_record_is_a_change_on_its_way_not_a_broken_job(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, unit_rows
):
    """Where links are not supported a state record is created empty, then filled. A `runner cancel` slow (or
    frozen) in between made the worker's cancel check call the job broken, and it dropped the batches it had
    finished (adversarial pass 23: 0 of 200 rows kept); met at a unit boundary (units of 4 rows: the ledger's
    read of the state) or at the finish, it said broken too (pass 25). The worker now goes on with the state it
    read last: once the cancel is filled in, it stops as cancelled and keeps what it finished."""
    import runner.worker as worker_module

    job = _small_job(tmp_path, tiny_gpt2, 20, unit_rows=unit_rows)
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 0.0)
    read, place = _without_links(monkeypatch, job)
    batches, real = [], worker_module.fault_point

    def after(name):
        real(name)
        if name == "after_generate":
            batches.append(name)
            if len(batches) == 1:  # the cancel's record, created, not filled yet
                _created_empty(place)
            if len(batches) == 3:  # two batches later (past a unit boundary) the cancel fills its record in
                place.write_text(_record_body(read, JobState.CANCELLED, "cancel"))

    monkeypatch.setattr(worker_module, "fault_point", after)
    summary = run_job(job, gpt2_engine, echo=None, shard_rows=100)
    assert summary.stopped and job_status(job).state == "cancelled"
    assert (
        6 <= summary.generated < 20 and runner.status(job.dir).done == summary.generated
    )  # its batches kept


def test_a_record_never_filled_after_the_run_is_said_broken_once_the_patience_is_over(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """The other side of the wait below: a change's record that stays empty (its command killed half way) is
    said broken, with `runner repair`, once STATE_PATIENCE_SECONDS are over; the rows stay done."""
    import runner.worker as worker_module

    monkeypatch.setattr(jobdir, "STATE_PATIENCE_SECONDS", -1.0)
    job = _small_job(tmp_path, tiny_gpt2, 6)
    _, place = _without_links(monkeypatch, job)
    real_finish = worker_module.JobRun.finish

    def finish(run, ran):
        _created_empty(place)
        return real_finish(run, ran)

    monkeypatch.setattr(worker_module.JobRun, "finish", finish)
    said = []
    work(runner_home, engine=gpt2_engine, echo=said.append)
    assert any(f"job {job.id} is broken" in line and "runner repair" in line for line in said), said
    # waited for once, said once (the queue's next look waited as long again: adversarial pass 30)
    assert (
        sum("waiting up to" in line for line in said) <= 1 and sum("is broken" in line for line in said) == 1
    )
    assert job_status(job).state == "broken"
    assert runner.repair(job.dir) and runner.status(job.dir).done == 6


def test_status_shows_a_change_being_written_as_the_state_before_it_until_the_patience_is_over(
    tmp_path, tiny_gpt2, monkeypatch
):
    """No hard links: a `runner retry` whose record is created, not filled yet. `runner status` called the job
    "broken ... it is empty: a change killed half way" at once, while `runner work` waits for such a record. It
    now shows the state before it, saying a change is being written; broken only once the patience is over."""
    job = _small_job(tmp_path, tiny_gpt2, 4)
    job.set_state(JobState.CANCELLED)
    _, place = _without_links(monkeypatch, job)
    _created_empty(place)
    shown = job_status(job)
    assert shown.state == "cancelled" and "a change of state is being written" in shown.message, shown
    assert runner.status(job.dir).state == "cancelled"
    monkeypatch.setattr(jobdir, "STATE_PATIENCE_SECONDS", -1.0)
    late = job_status(job)
    assert late.state == "broken" and "runner repair" in late.message, late


@pytest.mark.parametrize("probe", ["one transient error", "cannot tell"])
def test_a_links_probe_that_fails_never_makes_a_change_being_written_read_as_damage(
    tmp_path, tiny_gpt2, monkeypatch, probe
):
    """Pass 66: the probe for hard links (an exclusive create, then a link) met one transient EIO, "could not
    tell", counted as links, and a `cancel` being written on a Drive-like mount made the job broken: `runner
    work` skipped it with "runner repair". The probe now retries transient errors, and one that cannot tell
    leaves an empty record a change on its way (broken once the patience is over, as without links)."""
    import errno

    job = _small_job(tmp_path, tiny_gpt2, 4)
    job.set_state(JobState.CANCELLED)
    place = job.dir / jobdir.STATES / jobdir.record_name(jobdir.newest_state_seq(job.dir) + 1)
    _created_empty(place)
    real_open, failed = os.open, []

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    def flaky_open(path, flags, *a, **k):
        if ".links." in os.fspath(path) and flags & os.O_EXCL and (probe == "cannot tell" or not failed):
            failed.append(path)
            raise OSError(errno.EIO if probe != "cannot tell" else errno.EROFS, "the mount says no", path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "open", flaky_open)
    monkeypatch.setattr(runner.storage, "RETRY_DELAYS", (0.0, 0.0))
    shown = job_status(job)
    assert failed and shown.state == "cancelled" and "being written" in shown.message, shown
    assert jobdir.links_supported(place.parent) is (False if probe != "cannot tell" else None)


def test_commands_on_a_job_whose_state_change_is_being_written_say_so_not_repair(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 67: while status showed "a change of state is being written", `runner results`, `report`, `cancel`
    and load_results called the same job broken and sent the user to `runner repair` mid-change. Commands that
    change the state say so; readers read the job as it was before the change (pass 94)."""
    job = _small_job(tmp_path, tiny_gpt2, 4)
    job.set_state(JobState.CANCELLED)
    _, place = _without_links(monkeypatch, job)
    _created_empty(place)
    for command in (("cancel", job.dir), ("retry", job.dir)):
        out = invoke(*command).output
        assert "a change of state is being written" in out and "try again in a moment" in out, (command, out)
        assert "brings it back" not in out and "Traceback" not in out
    result = invoke("results", job.dir)
    assert result.exit_code == 0 and "(0 rows" in result.output, result.output
    assert "brings it back" not in result.output and "Traceback" not in result.output
    with pytest.warns(UserWarning, match="0 of its 4"):
        assert len(runner.load_results(job.dir)) == 0


def test_an_empty_record_dated_far_in_the_future_is_not_a_change_on_its_way_for_ever(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 67: an empty newest record whose mtime is in the future (a writer's clock running ahead, damage)
    counted as made now at every look: status said "being written" for as long as the skew lasted, and a
    worker waited as long. A date past the patience is not believed; a nearer one counts from when this process
    first saw it."""
    job = _small_job(tmp_path, tiny_gpt2, 4)
    job.set_state(JobState.CANCELLED)
    _, place = _without_links(monkeypatch, job)
    _created_empty(place)
    os.utime(place, (time.time() + 3600,) * 2)
    assert job_status(job).state == "broken"
    os.utime(place, (time.time() + 60,) * 2)
    assert job_status(job).state == "cancelled"  # first seen now: on its way
    sighted = {k: v - jobdir.STATE_PATIENCE_SECONDS - 1 for k, v in jobdir._FIRST_SEEN.items()}
    monkeypatch.setattr(jobdir, "_FIRST_SEEN", sighted)  # as if first seen longer ago than the patience
    assert job_status(job).state == "broken"  # waited out, counted from its first sighting


def test_a_newest_state_record_that_goes_between_the_listing_and_the_read_is_listed_again(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Without links an adopter takes an empty record aside by a rename for a moment (`_adopt_unfilled`); a
    reader that listed state/ just before read "00000003.json is not a file" and called a sound job broken
    (pass 61, read from the code). It now lists again and reads what stands."""
    job = _small_job(tmp_path, tiny_gpt2, 4)
    job.set_state(JobState.CANCELLED)
    real, calls = jobdir._record_seqs, []

    def listing(job_dir, names=None):
        calls.append(1)
        seqs = real(job_dir, names)
        return [*seqs, seqs[-1] + 1] if len(calls) == 1 else seqs  # listed, then moved aside before the read

    monkeypatch.setattr(jobdir, "_record_seqs", listing)
    assert jobdir.read_state(job.dir).state is JobState.CANCELLED and len(calls) == 2
    assert job_status(job).state == "cancelled"


def test_a_cancel_being_written_when_the_worker_finishes_is_waited_for_not_said_broken(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """No hard links: a `runner cancel` whose record is created, not filled yet, when the worker finishes the
    job. The worker does not write over it, and `runner work` waits for it (it said "job ... is broken; skipped"
    of a sound job: adversarial pass 23); the job is then cancelled with every row kept."""
    import runner.worker as worker_module

    job = _small_job(tmp_path, tiny_gpt2, 6)
    read, place = _without_links(monkeypatch, job)
    real_finish, waits = worker_module.JobRun.finish, []

    def finish(run, ran):  # the cancel's record appears as the worker ends the job
        _created_empty(place)
        return real_finish(run, ran)

    def wait():
        waits.append(1)
        place.write_text(_record_body(read, JobState.CANCELLED, "cancel"))  # the cancel fills its record in

    monkeypatch.setattr(worker_module.JobRun, "finish", finish)
    monkeypatch.setattr(jobdir, "wait_for_state", wait)
    said = []
    work(runner_home, engine=gpt2_engine, echo=said.append)
    assert waits and not any("broken" in line for line in said), said
    assert any("newest state record is empty" in line and "waiting up to" in line for line in said), said
    assert job_status(job).state == "cancelled" and runner.status(job.dir).done == 6


def test_a_state_record_never_filled_stops_the_worker_with_its_finished_batches_kept(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """Past the patience an empty newest record means a broken job: the worker stops saying so, and what it
    finished since its last commit is committed first, not dropped (adversarial pass 25)."""
    import pyarrow.parquet as pq

    import runner.worker as worker_module

    job = _small_job(tmp_path, tiny_gpt2, 20)
    monkeypatch.setattr(worker_module, "CANCEL_CHECK_SECONDS", 0.0)
    monkeypatch.setattr(jobdir, "STATE_PATIENCE_SECONDS", 0.0)
    _, place = _without_links(monkeypatch, job)
    batches, real = [], worker_module.fault_point

    def after(name):
        real(name)
        if name == "after_generate":
            batches.append(name)
            if len(batches) == 2:  # a change's record, created and never filled (its writer was killed)
                _created_empty(place)

    monkeypatch.setattr(worker_module, "fault_point", after)
    with pytest.raises(jobdir.BrokenJob, match="is damaged"):
        run_job(job, gpt2_engine, echo=None, shard_rows=100)
    kept = sum(pq.read_metadata(p).num_rows for p in (job.dir / jobdir.SHARDS).glob("*.parquet"))
    assert 4 <= kept < 20  # the batches finished before it stopped


def test_a_shard_lost_while_its_worker_runs_is_not_reported_completed(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A shard the worker wrote itself goes (Drive lost it, a sync conflict renamed it) before the worker ends:
    the worker trusted its own commits without a look and wrote "completed" over missing rows (adversarial pass
    26). It now looks at every shard before that word: the job stays queued, and the next run computes the rows
    again, once each."""
    import runner.worker as worker_module

    job = _small_job(tmp_path, tiny_gpt2, 8)
    real, lost = worker_module.JobRun.commit, []

    def commit(run, unit):
        real(run, unit)
        if unit.seq == 2 and not lost:  # after its second commit, the first shard is gone
            lost.append(job.dir / jobdir.SHARDS / f"{jobdir.commit_name(unit.index, unit.epoch, 0)}.parquet")
            lost[0].unlink()

    monkeypatch.setattr(worker_module.JobRun, "commit", commit)
    summary = run_job(job, gpt2_engine, echo=None, shard_rows=4)
    assert not summary.finished and job.state().state is JobState.QUEUED
    monkeypatch.setattr(worker_module.JobRun, "commit", real)
    assert (
        run_job(job, gpt2_engine, echo=None, shard_rows=4).finished
        and job.state().state is JobState.COMPLETED
    )
    df = runner.load_results(job.dir)
    assert sorted(df["id"]) == [f"r{i}" for i in range(8)]


def test_a_retry_being_written_as_a_worker_picks_the_job_is_waited_for(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """No hard links: a `runner retry` whose record is created, not filled yet, when `runner work` picks the job
    up (after its queue scan, before its first read of the state). The worker said the job broken, left it for
    the rest of its run and ended "nothing to do" (adversarial pass 28); it now waits for the record, then runs
    the job to its end."""
    from runner import scheduler

    job = _small_job(tmp_path, tiny_gpt2, 6)
    read, place = _without_links(monkeypatch, job)
    real_queue, waits = scheduler.queue, []

    def queue(*a, **k):
        found = real_queue(*a, **k)
        if found and not place.exists():  # the retry's record lands right after the scan
            _created_empty(place)
        return found

    def wait():
        waits.append(1)
        place.write_text(_record_body(read, JobState.QUEUED, "retry", generation=read.generation + 1))

    monkeypatch.setattr(scheduler, "queue", queue)
    monkeypatch.setattr(jobdir, "wait_for_state", wait)
    said = []
    summaries = work(runner_home, engine=gpt2_engine, echo=said.append)
    assert waits and not any("broken" in line for line in said), said
    assert [s.job_id for s in summaries] == [job.id] and summaries[0].finished, said
    assert job_status(job).state == "completed" and runner.status(job.dir).done == 6


def _flip_to_not_implemented(shard):
    """Flip the first bit (from the footer back) that makes pyarrow call the shard's schema "not implemented"
    (ArrowNotImplementedError: neither OSError nor ValueError)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = shard.read_bytes()
    probe = shard.with_name("probe.bin")
    for pos in range(len(data) - 9, max(0, len(data) - 3000), -1):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            probe.write_bytes(bytes(flipped))
            try:
                pq.read_schema(probe)
            except pa.ArrowNotImplementedError:
                probe.unlink()
                shard.write_bytes(bytes(flipped))
                return
            except Exception:
                pass
    raise AssertionError("no such flip")


def test_a_shard_whose_footer_reads_as_not_implemented_is_set_aside_like_any_damage(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """One flipped bit in a shard's footer can make pyarrow raise ArrowNotImplementedError ("Integers with more
    than 64 bits not implemented"), which the check of the shards' job id did not catch: every `runner work`
    and `runner repair` of the job died with a traceback, for good (adversarial pass 30). The shard is now set
    aside as any damaged one and its rows computed again."""
    job = _small_job(tmp_path, tiny_gpt2, 8, job_dir=tmp_path / "job")
    calls = []
    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=lambda: calls.append(1) or len(calls) > 2)
    shards = sorted((job.dir / jobdir.SHARDS).glob("*.parquet"))
    assert shards and runner.status(job.dir).done < 8
    _flip_to_not_implemented(shards[0])
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None, shard_rows=2).finished
    assert sorted(runner.load_results(job.dir)["id"]) == [f"r{i}" for i in range(8)]
    assert runner.repair(job.dir).state_now == "completed"


def test_an_empty_record_made_long_ago_is_not_waited_for(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """No hard links: the patience counts from the empty record's making (its mtime), not from when each reader
    first saw it: the worker, the end of its run and the queue each waited the whole patience again, twice as
    long as said (adversarial pass 30). A record emptied by a command killed an hour ago is broken at once."""
    from runner import scheduler

    job = _small_job(tmp_path, tiny_gpt2, 4)
    _, place = _without_links(monkeypatch, job)
    _created_empty(place)
    os.utime(place, (time.time() - 3600, time.time() - 3600))
    waits = []
    monkeypatch.setattr(jobdir, "wait_for_state", lambda: waits.append(1))
    said = []
    scheduler.work(runner_home, engine=gpt2_engine, echo=said.append)
    assert not waits and any(f"job {job.id} is broken" in line for line in said), said


def test_a_shard_damaged_before_its_marker_is_not_trusted_for_good(tmp_path, tiny_gpt2, monkeypatch):
    """A byte of a shard flipped after its rename into shards/ and before its marker (a flaky mount's copy, a
    freeze in between): the worker stamped the file as verified in verified.json without reading it, so status
    and repair trusted it for good, the job "completed" and load_results gave 0 of its rows (adversarial pass
    31). Now a shard is read back once it is committed, and stamped only when sound: this one is quarantined and
    its rows computed again in the same run."""
    from helpers import assert_exactly_once, reference_run

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(6)]
    params, options = GenerationParams(max_new_tokens=4), runner.EngineOptions(batch_size=2)
    ref = reference_run(tmp_path, tiny_gpt2, rows, params, options)
    job = create_job(ref[0], tiny_gpt2, params, options, home=tmp_path / "home")
    real, flipped = jobdir.write_marker, []

    def flip_first_shard(job, unit, epoch, seq, marker):
        if not flipped and marker.get("shard"):
            path = job.dir / jobdir.SHARDS / marker["shard"]
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
            flipped.append(marker["shard"])
        return real(job, unit, epoch, seq, marker)

    monkeypatch.setattr(jobdir, "write_marker", flip_first_shard)
    said = []
    assert run_job(job, echo=said.append).finished and flipped
    lost = [line for line in said if "no longer verifies (quarantined)" in line]
    assert len(lost) == 1 and "rows are computed again" in lost[0], said
    assert said[-1].startswith("6/6 rows (100.0%)"), said  # (it read 12/6 rows: the lost ones counted twice)
    assert_exactly_once(job.dir, ref[1])


def test_status_during_a_run_does_not_read_the_shards_the_worker_already_checked(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Every shard is read back once it is committed and stamped in verified.json when sound: with only the
    finish reading them (the fix of pass 31 at first), each `runner status` and `runner watch` poll of a running
    or killed job read and hashed every shard again (adversarial pass 34)."""
    from runner.worker import JobRun

    rows = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(8))
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     runner.EngineOptions(batch_size=2), home=tmp_path / "home", unit_rows=2)  # fmt: skip
    real_open, real_read, reads, seen = JobRun.open_unit, jobdir.read_shard, [], []

    def counted(job, commit):
        reads.append(commit.name)
        return real_read(job, commit)

    def open_unit(self, index, epoch):
        if index == 3:  # three units committed: a status now
            monkeypatch.setattr(jobdir, "read_shard", counted)
            seen.append(runner.status(job.id, tmp_path / "home").done)
            monkeypatch.setattr(jobdir, "read_shard", real_read)
        return real_open(self, index, epoch)

    monkeypatch.setattr(JobRun, "open_unit", open_unit)
    assert run_job(job, echo=None).finished
    # (the stamps are saved as each unit opens: the last unit's commit may be read, no earlier one)
    assert seen == [6] and all(name.startswith("00002-") for name in reads), reads


def test_a_marker_torn_after_it_was_written_is_seen_before_completed(tmp_path, tiny_gpt2, monkeypatch):
    """A commit marker torn on disk after the worker wrote it: its finish re-stat'ed the shards but used the
    markers as it had read or written them, so it wrote "completed" with those rows missing from load_results
    (adversarial pass 35). Every marker is read again before the word."""
    from helpers import assert_exactly_once, reference_run

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(6)]
    params, options = GenerationParams(max_new_tokens=4), runner.EngineOptions(batch_size=2)
    ref = reference_run(tmp_path, tiny_gpt2, rows, params, options)
    job = create_job(ref[0], tiny_gpt2, params, options, home=tmp_path / "home", unit_rows=2)
    real, torn = jobdir.write_marker, []

    def tear_the_first(job, unit, epoch, seq, marker):
        out = real(job, unit, epoch, seq, marker)
        if not torn:
            torn.append(job.dir / jobdir.MARKERS / f"{unit:05d}-{epoch:08d}-{seq:04d}.json")
            torn[0].write_text('{"trunc')
        return out

    monkeypatch.setattr(jobdir, "write_marker", tear_the_first)
    first = run_job(job, echo=None)
    assert torn and not first.finished and read_state(job.dir).state != "completed"
    assert run_job(job, echo=None).finished
    assert_exactly_once(job.dir, ref[1])


def test_a_commit_quarantined_by_another_process_is_taken_off_the_progress(tmp_path, tiny_gpt2, monkeypatch):
    """A commit of this run quarantined elsewhere (another worker's start-up tidy, `runner repair`) vanished
    from the ledger, and its rows, computed again, were counted twice: "34/32 results (106.2%)" (pass 35)."""
    from helpers import assert_exactly_once, reference_run

    from runner.worker import JobRun

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(8)]
    params, options = GenerationParams(max_new_tokens=2), runner.EngineOptions(batch_size=2)
    ref = reference_run(tmp_path, tiny_gpt2, rows, params, options)
    job = create_job(ref[0], tiny_gpt2, params, options, home=tmp_path / "home", unit_rows=2)
    real_open, done = JobRun.open_unit, []

    def open_unit(self, index, epoch):
        if index == 2 and not done:  # unit 0's commit quarantined meanwhile, as by another process
            done.extend(n for n in self.written if n.startswith("00000-"))
            for name in done:
                jobdir.quarantine(self.job, name, "test: quarantined elsewhere")
        return real_open(self, index, epoch)

    monkeypatch.setattr(JobRun, "open_unit", open_unit)
    said = []
    run = run_job(job, echo=said.append)
    assert done and run.finished and run.generated == 10, run
    assert said[-1].startswith("8/8 rows (100.0%)"), said
    assert_exactly_once(job.dir, ref[1])


def test_a_models_own_code_changed_under_a_job_is_refused(prompts_file, tmp_path, runner_home):
    """A --trust-remote-code model computes with the code files its config's auto_map names: another version
    of that code saved over the folder changed results without a word. Other .py files there do not count."""
    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_mine.MyConfig", "AutoModelForCausalLM": "modeling_mine.MyModel"}
    (model / "config.json").write_text(json.dumps({**cfg, "auto_map": auto_map}))
    for name in ("configuration_mine.py", "modeling_mine.py", "train.py"):
        (model / name).write_text("# version 1\n")
    job = submit(prompts_file, str(model))
    (model / "train.py").write_text("# edited: loaded by nothing\n")
    assert runner.jobs.model_unchanged(job)
    (model / "modeling_mine.py").write_text("# version 2\n")
    assert not runner.jobs.model_unchanged(job)


def test_the_log_says_why_a_worker_stopped_early(prompts_file, tiny_gpt2, gpt2_engine, runner_home):
    """log.txt said "stopped with 2/6 rows done (asked to stop, or its deadline)" whichever it was (new-user
    walkthrough, pass 85): it says which."""
    from runner.scheduler import _Halted

    job = submit(prompts_file, tiny_gpt2)
    calls = []
    work(
        runner_home,
        echo=None,
        engine=gpt2_engine,
        shard_rows=1,
        stop=lambda: calls.append(1) or len(calls) > 2,
    )
    log = (job.dir / jobdir.LOG_FILE).read_text()
    assert re.search(r"stopped with [1-5]/6 rows done \(asked to stop \(Ctrl-C or a signal\)\)", log), log
    assert _Halted(None, time.time() - 1).why() == "its --hours/--until deadline came"
    assert _Halted(lambda: True, time.time() - 1).why().startswith("asked to stop")
    assert _Halted(lambda: False, time.time() + 3600).why() is None and not _Halted(None, None)()


def test_status_says_running_while_the_worker_checks_the_shards_before_completing(prompts_file, tiny_gpt2,
                                                                                   gpt2_engine, runner_home,
                                                                                   monkeypatch):  # fmt: skip
    """Between a worker's last commit and its word of completion it reads every shard again (on Drive, many of
    them take a while): `runner status` said "queued (interrupted)" with no worker then (adversarial pass 102)."""
    job = submit(prompts_file, tiny_gpt2, home=runner_home)
    seen, real = [], jobdir.write_completed

    def write_completed(*args, **kwargs):
        seen.append(runner.status(job.dir))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobdir, "write_completed", write_completed)
    assert run_job(job, gpt2_engine, echo=None).finished
    assert [(s.state, len(s.workers)) for s in seen] == [("running", 1)]
    assert runner.status(job.dir).state == "completed" and runner.status(job.dir).workers == []


def test_a_workers_last_progress_line_counts_what_other_workers_did(prompts_file, tiny_gpt2, gpt2_engine,
                                                                    runner_home, monkeypatch):  # fmt: skip
    """Worker A computes unit 0 while worker B computes unit 1 and leaves; A then ends the job. Its last progress
    line counted only its own rows ("3/6 rows (50.0%) ... ETA ?", then "completed: 6/6"; adversarial pass 104)."""
    job = submit(prompts_file, tiny_gpt2, home=runner_home, unit_rows=3)
    real, b_said = jobdir.write_marker, []

    def write_marker(*args, **kwargs):
        real(*args, **kwargs)
        if not b_said:  # A's first commit: B runs the rest meanwhile
            b_said.append("started")
            run_job(Job.open(job.dir), gpt2_engine, echo=b_said.append, owner=Owner.me("B"), shard_rows=1)

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    a_said = []
    assert run_job(job, gpt2_engine, echo=a_said.append, owner=Owner.me("A"), shard_rows=1).finished
    assert any("unit 1" in s for s in b_said) and not any("unit 1" in s for s in a_said), (a_said, b_said)
    last = [s for s in a_said if "rows (" in s][-1]
    assert last.startswith("6/6 rows (100.0%)") and last.endswith("ETA 0:00:00"), a_said


@pytest.mark.parametrize(
    "option, value",
    [("progress_every", float("nan")), ("shard_seconds", float("nan")), ("shard_seconds", 0),
     ("shard_rows", 0), ("lease_ttl", -1.0), ("poll", float("inf")), ("deadline", float("nan")),
     ("progress_every", True)],
)  # fmt: skip
def test_work_refuses_a_number_that_means_nothing_naming_it(runner_home, option, value):
    # (the command line's types refuse these; from Python a nan deadline or interval was "not yet" for ever)
    with pytest.raises(ValueError, match=f"^{option} must be"):
        work(runner_home, echo=None, once=True, **{option: value})


def test_status_of_a_job_stopped_between_its_last_commit_and_its_completion_says_so(
    prompts_file, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """A stop between the last commit and the completion record left `queued (interrupted)` at 6/6 with nothing
    said (pass 125): every row is saved, and the next `runner work` records the completion computing nothing."""
    from runner import worker

    job = submit(prompts_file, tiny_gpt2)

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker.jobdir, "write_completed", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_job(Job.open(job.dir), engine=gpt2_engine, echo=None, lease_ttl=60)
    monkeypatch.undo()
    st = job_status(Job.open(job.dir))
    assert (st.state, st.done, st.total) == ("queued (interrupted)", 6, 6)
    assert st.message.startswith("every row's result (or error) is saved; `runner work --job"), st.message
    assert f"runner work --job {job.dir}` (or the same `runner run`)" in st.message
    computed = []
    monkeypatch.setattr(gpt2_engine, "generate", lambda *a, **k: computed.append(a))
    (summary,) = work(runner_home, engine=gpt2_engine, echo=None, job=job.id)
    assert job_status(Job.open(job.dir)).state == "completed" and computed == [] and summary.finished


def test_work_takes_numpy_numbers(runner_home):
    import numpy as np

    assert work(runner_home, echo=None, once=True, shard_rows=np.int64(5), shard_seconds=np.float64(60)) == []


def test_a_run_that_ends_as_a_retry_lands_does_not_say_completed(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """Every row done, but a `runner retry` of the job's failed rows landed between the worker's last look at the
    state and its completion's record (refused, the job queued again): the run's last line must not say
    "completed" (the same `runner work` then runs the retried rows)."""
    import dataclasses

    from runner import scheduler

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "job")
    summary = run_job(job, gpt2_engine, echo=None)
    assert summary.finished
    queued = dataclasses.replace(jobdir.read_state(job.dir), state=JobState.QUEUED)
    monkeypatch.setattr(jobdir, "settled_state", lambda *a, **k: queued)
    said = []
    scheduler._settle(Job.open(job.dir), summary, said.append, scheduler._Halted(None, None))
    assert said == [
        f"job {job.id}: 1/1 rows, 0 errors; not completed: it became queued as this run ended (a `runner retry` "
        "or `runner repair`)"
    ]
    failed = dataclasses.replace(queued, state=JobState.FAILED, error="model X is not the one submitted")
    monkeypatch.setattr(jobdir, "settled_state", lambda *a, **k: failed)  # another worker failed it meanwhile
    scheduler._settle(Job.open(job.dir), summary, said.append, scheduler._Halted(None, None))
    assert said[1] == (f"job {job.id}: 1/1 rows, 0 errors; not completed: another worker failed it as this run "
                       "ended (model X is not the one submitted)")  # fmt: skip


def test_a_stats_json_that_does_not_read_for_now_is_not_written_over(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """stats.json holds every run's line (speed, device, memory). When it does not read for now (a mount failing
    through the retries), a run leaves its own line out rather than write the file anew with it alone: the
    earlier runs' history is kept (a damaged or absent file still starts a new one)."""
    import errno

    from runner import storage

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hello"}])
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "job")
    run_job(job, gpt2_engine, echo=None, should_stop=lambda: True)  # stops at once: one run's line, no rows
    (first,) = Job.open(job.dir).read_stats()["runs"]
    real = storage.read_json

    def read_json(path):
        if str(path).endswith("stats.json"):
            raise storage.StorageError(f"cannot read {path}: Input/output error", errno.EIO)
        return real(path)

    monkeypatch.setattr(storage, "read_json", read_json)
    assert run_job(Job.open(job.dir), gpt2_engine, echo=None).finished
    monkeypatch.setattr(storage, "read_json", real)
    assert Job.open(job.dir).read_stats()["runs"] == [first]  # the first run's line, not the second's alone
    assert "stats.json not updated" in (job.dir / "log.txt").read_text()


def test_two_runs_ending_at_once_both_keep_their_line_in_stats_json(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """Two workers of one job ending at once (`runner work --workers 2` at the job's end): both read stats.json
    before either wrote it, and the first one's run line was written over. B arrives while A has read the file
    and not yet written it; A goes on once B is there (waiting for the lock, or reading without one)."""
    import threading

    from runner import storage

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hello"}])
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2), job_dir=tmp_path / "job")
    a_reading, b_arrived = threading.Event(), threading.Event()
    real_read, real_take = Job.read_stats, storage._take

    def read_stats(self, for_update=False):
        if for_update and threading.current_thread().name == "A":
            a_reading.set()
            assert b_arrived.wait(timeout=600)
        elif for_update:
            b_arrived.set()
        return real_read(self, for_update)

    def take(fd, fcntl):
        if threading.current_thread().name == "B":
            b_arrived.set()
        return real_take(fd, fcntl)

    monkeypatch.setattr(Job, "read_stats", read_stats)
    monkeypatch.setattr(storage, "_take", take)
    runs = [threading.Thread(target=JobRun(Job.open(job.dir), gpt2_engine, None, 2, 60.0, None, None, None, 120.0,
                                           None).record_stats, name=n) for n in "AB"]  # fmt: skip
    runs[0].start()
    assert a_reading.wait(timeout=600)
    runs[1].start()
    for t in runs:
        t.join()
    assert len(real_read(Job.open(job.dir))["runs"]) == 2


def test_a_worker_that_waited_for_another_says_how_the_job_ended(prompts_file, tiny_gpt2, gpt2_engine,
                                                                  runner_home, monkeypatch):  # fmt: skip
    """Two `runner work` at once on one job: the one that waited for the other's units said "waiting for it to
    finish", then ended with nothing more, or with "nothing to do: no queued or interrupted jobs", never whether
    the job it waited for completed (adversarial pass 143). Deterministic: the other worker's hold is faked and
    gone after one wait; the job is completed meanwhile."""
    from runner import scheduler

    job = submit(prompts_file, tiny_gpt2)
    run_job(job, gpt2_engine, echo=None)  # the other worker's run: completed
    held = [[(job, time.time() + 120, "other-worker", False)], []]
    monkeypatch.setattr(scheduler, "_held_elsewhere", lambda *a: held.pop(0) if held else [])
    monkeypatch.setattr(scheduler, "_sleep_until_a_commit", lambda *a: None)
    said = []
    assert work(runner_home, engine=gpt2_engine, echo=said.append) == []
    assert said[0].startswith(f"job {job.id}: the rest is held by worker other-worker; waiting")
    assert said[1:] == [f"job {job.id} completed by another worker: 6/6 rows, 0 errors"]


def test_a_waited_jobs_end_that_does_not_read_for_now_leaves_the_work_done(prompts_file, tiny_gpt2, gpt2_engine,
                                                                           runner_home, monkeypatch):  # fmt: skip
    """The line on how a waited-for job ended is only informative: its status failing through the retries (a
    Drive mount) made `runner work` end on that error, exit 1, after its work was done and the job completed."""
    import errno

    import runner.job_status as job_status_module
    from runner import scheduler, storage

    job = submit(prompts_file, tiny_gpt2)
    run_job(job, gpt2_engine, echo=None)
    held = [[(job, time.time() + 120, "other-worker", False)], []]
    monkeypatch.setattr(scheduler, "_held_elsewhere", lambda *a: held.pop(0) if held else [])
    monkeypatch.setattr(scheduler, "_sleep_until_a_commit", lambda *a: None)

    def unreadable(*a, **k):
        raise storage.StorageError(f"cannot read {job.dir}/state: Input/output error", errno.EIO)

    monkeypatch.setattr(job_status_module, "job_status", unreadable)
    said = []
    assert work(runner_home, engine=gpt2_engine, echo=said.append) == []
    assert said[1:] == [f"job {job.id}: how it ended cannot be read now (cannot read {job.dir}/state: "
                        "Input/output error); `runner status` says"]  # fmt: skip
