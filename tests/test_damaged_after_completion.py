"""Damage that lands after a job completed, found by an adversarial pass:

* a shard damaged since (a bit flip on Drive): running the same `runner run` / `runner run-batch` again used
  to say "done: 0/4 rows" (or "run the same command again" for ever) and never redo the rows, since completed
  jobs are not worked on. The rerun now repairs the job (the commit set aside) and computes the rows again;
* a folder where a state record (or an older version's completed.json or state.json) belongs: `runner work` stopped for every job of the home ("the
  job home cannot be written"). That job is now broken alone, the others run, and `runner repair` sets the
  folder aside."""

import shutil

import pytest
from helpers import newest_state_record, write_jsonl
from workers import run_runner

from runner import EngineOptions, GenerationParams
from runner.jobdir import JobState
from runner.jobs import create_job
from runner.worker import run_job

pytestmark = pytest.mark.slow  # real `runner` processes

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=4)


def flip_shard(folder):
    (shard,) = sorted((folder / "shards").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_runner_run_again_redoes_the_rows_of_a_shard_damaged_after_completion(tmp_path, tiny_gpt2):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    args = ("run", inp, "--model", tiny_gpt2, "--max-new-tokens", "3", "--seed", "11", "-o", tmp_path / "out")
    code, out = run_runner(*args)
    assert code == 0 and "done: 4/4 rows" in out, out
    flip_shard(tmp_path / "out")
    code, out = run_runner(*args)
    assert (
        code == 0 and "4 result rows are missing or failed verification" in out and "done: 4/4 rows" in out
    ), out
    assert len(list((tmp_path / "out" / "quarantine").iterdir())) == 2  # the commit: marker and shard


def test_run_batch_again_writes_the_same_file_after_a_shard_was_damaged(tmp_path, tiny_gpt2):
    reqs = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": f"Every student {i}", "max_tokens": 3, "temperature": 0}}
            for i in range(4)]  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", reqs)
    out_path = tmp_path / "out.jsonl"
    args = ("run-batch", "-i", inp, "-o", out_path, "--model", tiny_gpt2, "--served-model-name", "tiny")
    code, out = run_runner(*args)
    assert code == 0, out
    reference = out_path.read_bytes()
    out_path.unlink()
    flip_shard(tmp_path / "out.jsonl.job")
    code, out = run_runner(*args)
    assert code == 0 and "Traceback" not in out, out
    assert out_path.read_bytes() == reference


@pytest.mark.parametrize("damaged", ["record", "completed.json", "state.json"])
def test_a_folder_where_a_state_file_belongs_breaks_only_its_job(damaged, tmp_path, tiny_gpt2, gpt2_engine,
                                                                 runner_home):  # fmt: skip
    """The newest state record, or (in a job of an older version, which has no records) its state.json or
    completed.json, is a folder."""
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]
    a = create_job(write_jsonl(tmp_path / "a.jsonl", rows), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    run_job(a, gpt2_engine, echo=None)
    assert a.state().state is JobState.COMPLETED
    if damaged == "record":
        path = newest_state_record(a.dir)
        damaged = f"state/{path.name}"
    else:  # as an older version left it: the commands' state.json and the worker's completed.json
        shutil.rmtree(a.dir / "state")
        (a.dir / "state.json").write_text(
            '{"state": "queued", "generation": 0, "error": null, "updated": 1.5}'
        )
        (a.dir / "completed.json").write_text('{"generation": 0, "state_updated": 1.5, "updated": 2.5}')
        assert a.state().state is JobState.COMPLETED  # read as it was written
        path = a.dir / damaged
    path.unlink()
    path.mkdir()  # a folder where the file was
    b = create_job(write_jsonl(tmp_path / "b.jsonl", rows[:2]), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    code, out = run_runner("--home", runner_home, "status", a.id)
    assert "broken" in out and f"{damaged} is not a file" in out and "runner repair" in out, out
    code, out = run_runner("--home", runner_home, "work", "--shard-rows", "2")
    # (and says it skipped it: exit 1, `runner work && next-step` does not go on)
    assert code == 1 and "Traceback" not in out, out
    assert out.strip().splitlines()[-1].startswith(f"Error: 1 job is broken and skipped: {a.id} ("), out
    assert b.state().state is JobState.COMPLETED, out  # a broken job breaks only itself
    code, out = run_runner("--home", runner_home, "repair", a.id)
    assert code == 0, out
    assert (
        a.state().state is JobState.COMPLETED and not path.is_dir()
    )  # set aside (a record may take its place)
    assert any(p.name.endswith(damaged.replace("/", "-")) for p in (a.dir / "quarantine").iterdir())


@pytest.mark.parametrize("lost", ["shards", "done"])
def test_run_again_recomputes_a_completed_job_whose_results_folder_was_lost(lost, tmp_path, tiny_gpt2,
                                                                           gpt2_engine):  # fmt: skip
    """shards/ or done/ deleted (by hand, by a sync client): the rerun recreates it and computes the rows again
    (it used to stop with "the job home cannot be written" on every rerun)."""
    import shutil

    import runner
    from runner import scheduler

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]
    inp, out = write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "out"
    job, s = scheduler.run(inp, tiny_gpt2, PARAMS, OPTIONS, output=out, engine=gpt2_engine, echo=None)
    assert s.finished and s.done == 4
    shutil.rmtree(out / lost)
    job, s = scheduler.run(inp, tiny_gpt2, PARAMS, OPTIONS, output=out, engine=gpt2_engine, echo=None)
    assert s.finished and s.done == 4 and sorted(runner.load_results(out)["id"]) == [r["id"] for r in rows]


def test_a_healed_job_blocks_no_other_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    import shutil

    from runner import scheduler

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]
    inp = write_jsonl(tmp_path / "a.jsonl", rows)
    a, s = scheduler.run(inp, tiny_gpt2, PARAMS, OPTIONS, engine=gpt2_engine, echo=None, home=runner_home,
                         name="a")  # fmt: skip
    shutil.rmtree(a.dir / "shards")
    b = create_job(write_jsonl(tmp_path / "b.jsonl", rows[:2]), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    a, s = scheduler.run(inp, tiny_gpt2, PARAMS, OPTIONS, engine=gpt2_engine, echo=None, home=runner_home,
                         name="a")  # fmt: skip
    assert s.finished and s.done == 4
    scheduler.work(home=runner_home, engine=gpt2_engine, echo=None, once=True)
    assert (a.state().state, b.state().state) == (JobState.COMPLETED, JobState.COMPLETED)
