"""The full cross-product of damage over a job's files (adversarial pass 236): a small OpenAI Batch job (a refused
line in errors.jsonl, n=2, units of 2 requests) completed, with its exports beside it, and the same job stopped
halfway (a snapshot taken between two batches of a worker holding a unit: claim, heartbeat, a temp file of a
killed write). For EVERY file there, listed at run time, each damage: truncated to 0 bytes, to half, one byte
flipped in the middle, one at the end, the same file of another job copied over it, an older copy of it (a
rollback), deleted. Then, in order: `runner status`, `runner work` to completion (with `runner repair` where a
message says so), `load_results`, `runner results --to` .parquet and .jsonl and `--format openai`. Each case
holds the promise: no exception but the house's errors, each naming a file; results that come back equal the
undamaged job's exactly (same rows, texts, log-probs, no row twice), and so do the exports' bytes.

tests/test_adv_damage.py, test_adv_parsed_damage.py and test_adv_state_rollback.py single out the cases that
broke; this sweep is the whole matrix, so that what was not singled out is asked too. Its machinery is
tests/damage_sweep.py; test_adv_damage_sweep_more.py sweeps state records, row errors retried, the other kinds
of job, a home without hard links, and a snapshot taken inside a batch."""

from __future__ import annotations

import shutil

import pytest
from damage_sweep import DAMAGES, OPTIONS, Undamaged, batch_scenario, requests, sweep
from helpers import write_jsonl

import runner
from runner import GenerationParams, jobdir
from runner.errors import RunnerError
from runner.jobs import create_job
from runner.results import export_results
from runner.scheduler import work
from runner.worker import run_job


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, tiny_gpt2, gpt2_engine):
    model = tmp_path_factory.mktemp("models") / "m"  # "m": the requests' body.model
    shutil.copytree(tiny_gpt2, model)
    ours = batch_scenario(tmp_path_factory.mktemp("ours"), str(model), gpt2_engine, "Every student reads", 11)
    theirs = batch_scenario(
        tmp_path_factory.mktemp("theirs"), str(model), gpt2_engine, "The old man wrote", 12
    )
    return Undamaged.of(ours, theirs)


# the sweep (~100 s of one core): `make test-deep` and CI run it; `make test` keeps the two cases below
@pytest.mark.slow
@pytest.mark.deep
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("stage", ["completed", "stopped"])
def test_every_file_damaged_every_way_is_repaired_or_refused_naming_it(
    tmp_path, scenarios, gpt2_engine, stage, damage
):
    older = {"completed": "stopped", "stopped": "created"}[stage]
    outcomes = sweep(tmp_path, scenarios, gpt2_engine, stage, older, lambda i, rel: [damage])
    assert outcomes


ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def two_jobs(tmp_path, model):
    """Two queued jobs of one input file in one home (each in a folder named by its id), another seed each."""
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    made = [create_job(prompts, model, GenerationParams(max_new_tokens=2, temperature=1.0, seed=seed), OPTIONS,
                       home=tmp_path / "home", unit_rows=2) for seed in (1, 2)]  # fmt: skip
    return made


def test_a_queued_jobs_backup_of_another_job_shows_broken_as_work_finds_it(tmp_path, tiny_gpt2, gpt2_engine):
    """job.backup.json replaced by another job's (whole, checksummed): `runner work` skips the job as broken
    (`runner repair` brings it back), but `runner status` showed it "queued (interrupted)" with nothing said, for
    ever. It shows broken, naming the file and `runner repair`, which brings it back."""
    ours, theirs = two_jobs(tmp_path, tiny_gpt2)
    shutil.copy2(theirs.dir / "job.backup.json", ours.dir / "job.backup.json")
    shutil.rmtree(theirs.dir)
    shown = runner.status(ours.dir)
    assert shown.state == "broken" and "job.backup.json is job" in shown.message, shown
    assert "runner repair" in shown.message
    runner.repair(ours.dir)
    assert runner.status(ours.dir).state == "queued"
    assert work(tmp_path / "home", engine=gpt2_engine, echo=None)[0].finished
    assert runner.status(ours.dir).state == "completed"


@pytest.fixture(scope="module")
def completed_batch(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """A completed Batch job of 4 requests (units of 2, commits of 2 results): its folder, as a template."""
    root = tmp_path_factory.mktemp("batch")
    model = root / "m"
    shutil.copytree(tiny_gpt2, model)
    job = create_job(write_jsonl(root / "requests.jsonl", requests("Every student reads")), str(model),
                     GenerationParams(max_new_tokens=2, seed=5), OPTIONS, job_dir=root / "job", unit_rows=2,
                     skip_invalid=True)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None, shard_rows=2).finished
    return job.dir


@pytest.mark.parametrize("damage", ["shard flipped", "marker deleted", "shard deleted, marker young"])
def test_the_batch_export_of_a_completed_job_that_lost_a_commit_names_it(
    tmp_path, completed_batch, damage, monkeypatch
):
    """A completed job's commit damaged (or its marker deleted) since: `runner results --format openai` refused
    ("2 result rows are missing or failed verification") without a word of which file, where `runner status`
    names the commit. It names it now, and where a marker is gone, the unit whose commit done/ lacks; a shard
    said not here yet (its marker young, from another machine) is named too, in both."""
    folder = shutil.copytree(completed_batch, tmp_path / "job")
    shard = sorted((folder / "shards").glob("*.parquet"))[1]
    if damage == "shard deleted, marker young":
        monkeypatch.setattr(jobdir, "host_tag", lambda: "another-vm")  # where what follows runs
        shard.unlink()
        named = shard.stem
    elif damage == "shard flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        named = f"commit {shard.stem}"
    else:
        (folder / "done" / f"{shard.stem}.json").unlink()
        named = f"done/{shard.stem[:5]}-*.json"
    with pytest.raises(RunnerError, match="result rows are missing") as e:
        export_results(folder, tmp_path / "out.jsonl", format="openai")
    assert named in str(e.value) and "runner repair" in str(e.value), str(e.value)
    assert named in runner.status(folder).message
    assert not (tmp_path / "out.jsonl").exists()
