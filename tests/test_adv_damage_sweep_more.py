"""The damage sweep (tests/damage_sweep.py, pass 236) over what its first matrix did not hold (adversarial pass
238): each file damaged (emptied, halved, a byte flipped in the middle or at the end, another job's copy, an
older copy, deleted, and here the file before it in its folder copied over it: state record 1 over 2), then
status, work (repair where said), load_results and the exports compared exactly with the undamaged job's, over

  * a Batch job cancelled after one commit, then resumed (`runner retry`), at three stages: resumed (its state
    records cancelled, queued), inside the batch its worker ran next (a snapshot taken at the batch's first
    decode step, the progress hook: claim, heartbeat and in-flight record of a worker since killed), and
    completed;
  * a job whose row r1 broke the device: the in-flight record of that death (stage "suspect"), then alone too (a
    row error), completed, then `runner retry`: the retried stage (the retry generation's record, the row
    error's commit) and completed again;
  * a score job, an embed job and a chat job (a Llama with a chat template), stopped halfway and completed;
  * on a home without hard links whose renames are a copy then a delete (a Drive-like mount, tests/fsfaults.py),
    built and swept there: the first sweep's Batch job (stopped, completed) and the resumed one inside a batch.

Cost: the full cross product here is ~1,570 cases (~6 min on 2 cores; run once in pass 238, every case held);
this asks ~490 (~80 s). Every damage of every file where the pass is about it (state/ records, the in-flight
record), and two of the eight damages of every other file, picked by the file's place in the listing
(rotating, so that each damage lands on some commit, claim and metadata file of each stage; `sampled`).

A job that ends not completed passes only where a state record was lost (`checked`): where the newest record,
a `runner retry`'s, is deleted before anything was committed under its generation, nothing in the folder says
it was ever there, and the job reads as it stood before (cancelled, or completed with its row errors), without a
word; what it kept must be the undamaged job's. Where that record is damaged instead, or the one below copied
over it (pass 245), status names it and `runner repair` says to run the retry again."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import fsfaults
import pytest
from damage_sweep import (
    DAMAGES,
    OPTIONS,
    SIBLING,
    Scenario,
    Undamaged,
    batch_scenario,
    dead_owner,
    exports,
    requests,
    sweep,
)
from helpers import commit_row_error, run_until_done, write_jsonl

import runner
from runner import EmbedParams, GenerationParams, ScoreParams, jobdir
from runner.crashes import DeviceError
from runner.jobs import create_job
from runner.worker import JobRun, run_job

# the whole module: `make test-deep` (CI runs it after `make test`, which leaves it out to stay under 15 minutes)
pytestmark = pytest.mark.deep

WHOLE = ("job/state/", "job/inflight/")  # every damage of these
MORE = [*DAMAGES, SIBLING]


def sampled(salt: int):
    """Which damages a file gets: all of them under WHOLE, else two, rotating with the file's place."""

    def damages(i: int, rel: str) -> list[str]:
        if rel.startswith(WHOLE):
            return MORE
        return [MORE[(i + salt) % len(MORE)], MORE[(i + salt + 4) % len(MORE)]]

    return damages


def checked(outcomes: dict[str, str]) -> None:
    """A job left not completed only where its state records were damaged (the retry undone)."""
    loose = [
        f"{k}: {v}" for k, v in outcomes.items() if "not completed" in v and not k.startswith("job/state/")
    ]
    assert not loose, "\n".join(loose)


def halfway(job, engine, owner=None) -> None:
    """One batch committed, then the worker stops between batches."""
    batches: list[int] = []
    run_job(
        job,
        engine,
        echo=None,
        shard_rows=2,
        owner=owner,
        should_stop=lambda: batches.append(1) or len(batches) >= 2,
    )


def resumed_scenario(root: Path, model: str, engine, words: str, seed: int) -> Scenario:
    """A Batch job run halfway, cancelled, resumed (`runner retry`), then run to its end by a worker that is
    snapshot at the first decode step of its first batch (and whose process is gone in that snapshot)."""
    params = GenerationParams(max_new_tokens=2, temperature=1.0, seed=seed)
    job = create_job(write_jsonl(root / "requests.jsonl", requests(words)), model, params, OPTIONS,
                     job_dir=root / "job", unit_rows=2, skip_invalid=True)  # fmt: skip
    stages = {name: root / f"snap-{name}" for name in ("cancelled", "resumed", "midbatch")}
    halfway(job, engine)
    runner.cancel(job.dir)
    shutil.copytree(job.dir, stages["cancelled"])
    runner.retry(job.dir)
    shutil.copytree(job.dir, stages["resumed"])
    real = JobRun.stepped

    def stepped(run, tokens: int) -> None:
        if not stages["midbatch"].exists():
            shutil.copytree(job.dir, stages["midbatch"])
        real(run, tokens)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JobRun, "stepped", stepped)
        assert run_job(job, engine, echo=None, shard_rows=2, owner=dead_owner()).finished
    assert list((stages["midbatch"] / "inflight").glob("*.json")), "no in-flight record in the snapshot"
    assert len(list((job.dir / "state").glob("*.json"))) >= 3
    exports(job.dir, root / "out")
    return Scenario({**stages, "completed": job.dir}, root / "out")


@pytest.fixture(scope="module")
def batch_model(tmp_path_factory, tiny_gpt2):
    model = tmp_path_factory.mktemp("models") / "m"  # "m": the requests' body.model
    shutil.copytree(tiny_gpt2, model)
    return str(model)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, batch_model, gpt2_engine):
    made = [resumed_scenario(tmp_path_factory.mktemp(who), batch_model, gpt2_engine, words, seed)
            for who, words, seed in (("ours", "Every student reads", 11), ("theirs", "The old man wrote", 12))]  # fmt: skip
    return Undamaged.of(*made)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "older"), [("resumed", "cancelled"), ("midbatch", "resumed"),
                                              ("completed", "midbatch")])  # fmt: skip
def test_a_cancelled_then_resumed_job_damaged_anywhere_ends_as_undamaged_or_refused_naming_it(
    tmp_path, resumed, gpt2_engine, stage, older
):
    checked(sweep(tmp_path, resumed, gpt2_engine, stage, older, sampled(1)))


ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def retried_scenario(root: Path, model: str, engine, seed: int) -> Scenario:
    """A job of 4 rows (n=2) whose row r1 broke the device (stage "suspect": the in-flight record of that death,
    its worker gone; run on, r1 is computed as any row), then alone too (a row error), completed; then `runner
    retry` (stage "retried") and run to its end."""
    params = GenerationParams(max_new_tokens=2, temperature=1.0, num_return_sequences=2, seed=seed)
    job = create_job(
        write_jsonl(root / "p.jsonl", ROWS), model, params, OPTIONS, job_dir=root / "job", unit_rows=2
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUNNER_FAULT", "poison_row:r1")
        with pytest.raises(DeviceError):  # its batch broke the device: an in-flight record of its death
            run_job(job, engine, echo=None, shard_rows=2, owner=dead_owner())
        shutil.copytree(job.dir, root / "snap-suspect")
        commit_row_error(job, engine)
        run_until_done(job, engine)
    assert runner.read_errors(job.dir)
    shutil.copytree(job.dir, root / "snap-errored")
    assert runner.retry(job.dir) == 1
    shutil.copytree(job.dir, root / "snap-retried")
    assert run_job(job, engine, echo=None, shard_rows=2).finished
    exports(job.dir, root / "out", batch=False)
    stages = {name: root / f"snap-{name}" for name in ("suspect", "errored", "retried")}
    assert list((stages["suspect"] / "inflight").glob("*.json")), "no in-flight record of the death"
    stages["completed"] = job.dir
    return Scenario(stages, root / "out", batch=False)


@pytest.fixture(scope="module")
def retried(tmp_path_factory, tiny_gpt2, gpt2_engine):
    made = [retried_scenario(tmp_path_factory.mktemp(who), tiny_gpt2, gpt2_engine, seed)
            for who, seed in (("ours", 3), ("theirs", 4))]  # fmt: skip
    return Undamaged.of(*made)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "older"), [("suspect", None), ("retried", "errored"), ("completed", "retried")]
)
def test_a_job_retried_after_a_row_error_damaged_anywhere_ends_as_undamaged_or_refused_naming_it(
    tmp_path, retried, gpt2_engine, stage, older
):
    checked(sweep(tmp_path, retried, gpt2_engine, stage, older, sampled(2)))


KINDS = {
    "score": (ScoreParams(), "text", {}),
    "embed": (EmbedParams(), "text", {}),
    "chat": (GenerationParams(max_new_tokens=2, temperature=1.0, seed=5), "prompt", {"chat": True}),
}


def kind_scenario(root: Path, model: str, engine, kind: str, words: str) -> Scenario:
    """A job of `kind` over 4 texts (units of 2), run halfway by a worker since killed, then to its end."""
    params, field, extra = KINDS[kind]
    rows = [{"id": f"r{i}", field: f"{words} {i} books"} for i in range(4)]
    job = create_job(write_jsonl(root / "t.jsonl", rows), model, params, OPTIONS, job_dir=root / "job", unit_rows=2,
                     **extra)  # fmt: skip
    shutil.copytree(job.dir, root / "snap-created")
    halfway(job, engine, owner=dead_owner())
    shutil.copytree(job.dir, root / "snap-stopped")
    assert run_job(job, engine, echo=None, shard_rows=2).finished
    exports(job.dir, root / "out", batch=False)
    stages = {"created": root / "snap-created", "stopped": root / "snap-stopped", "completed": job.dir}
    return Scenario(stages, root / "out", batch=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_score_embed_or_chat_job_damaged_anywhere_ends_as_undamaged_or_refused_naming_it(
    tmp_path_factory, tmp_path, request, kind
):
    chat = kind == "chat"
    model = request.getfixturevalue("tiny_llama" if chat else "tiny_gpt2")
    engine = request.getfixturevalue("llama_engine" if chat else "gpt2_engine")
    made = [kind_scenario(tmp_path_factory.mktemp(f"{kind}-{who}"), model, engine, kind, words)
            for who, words in (("ours", "Every student reads"), ("theirs", "The old man wrote"))]  # fmt: skip
    for stage, older in (("completed", "stopped"), ("stopped", "created")):
        (tmp_path / stage).mkdir()
        checked(
            sweep(tmp_path / stage, Undamaged.of(*made), engine, stage, older, sampled(len(kind + stage)))
        )


def drive_like(mp, root: Path) -> None:
    """Under `root`: no hard links (os.link says EPERM, as Colab's Drive mount), renames a copy then a delete."""

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    mp.setattr(jobdir, "_LINKS", {})
    mp.setitem(fsfaults.REAL, "link", link)
    mp.setattr(os, "link", link)
    fsfaults.FsFaults(root, copy_rename=True).install(mp)


@pytest.fixture(scope="module")
def linkless(tmp_path_factory, batch_model, gpt2_engine):
    """The first sweep's Batch job, and the cancelled then resumed one, made in a Drive-like home."""
    root, made = tmp_path_factory.mktemp("linkless"), {"batch": [], "resumed": []}
    with pytest.MonkeyPatch.context() as mp:
        drive_like(mp, root)
        for who, words, seed in (("ours", "Every student reads", 11), ("theirs", "The old man wrote", 12)):
            for name, build in (("batch", batch_scenario), ("resumed", resumed_scenario)):
                (root / name / who).mkdir(parents=True)
                made[name].append(build(root / name / who, batch_model, gpt2_engine, words, seed))
    return {name: Undamaged.of(*pair) for name, pair in made.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("job", "stage", "older"), [("batch", "completed", "stopped"),
                                                     ("batch", "stopped", "created"),
                                                     ("resumed", "midbatch", "resumed")])  # fmt: skip
def test_a_job_on_a_home_without_links_damaged_anywhere_ends_as_undamaged_or_refused_naming_it(
    tmp_path, linkless, gpt2_engine, monkeypatch, job, stage, older
):
    drive_like(monkeypatch, tmp_path)
    # damage found later: an empty state record made just now is a change being filled there (a worker waits
    # jobdir.STATE_PATIENCE_SECONDS for it), one made before is a change killed half way
    age = jobdir.STATE_PATIENCE_SECONDS + 60
    checked(sweep(tmp_path, linkless[job], gpt2_engine, stage, older, sampled(5), age))
