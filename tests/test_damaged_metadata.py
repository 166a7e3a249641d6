"""Damage the job folder's checks must notice rather than obey, found by an adversarial pass:

* a one-bit flip in a commit marker's row-error entry: a marker carries its own checksum (`check`), so the
  damaged marker is quarantined and its rows are computed again. Before, `"sample": 0 -> 2` crashed
  `runner status` and `runner work` with an IndexError, and `"row": 1 -> 3` silently lost row 3;
* a damaged prompts.parquet in a job whose rows carry their own `n`: that job is broken with the reason,
  and `runner status` / `runner work` go on with the others (before: a pyarrow traceback for every job).

The row error comes from a real poisoned row (RUNNER_FAULT=poison_row, as tests/test_crashes.py)."""

import json

import pytest
from helpers import commit_row_error, newest_state_record, prompts_hashing, run_until_done, write_jsonl
from workers import run_runner

import runner
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job

pytestmark = pytest.mark.slow  # real worker processes: `make test` runs it, test-fast not

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=4)
ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(6)]
BAD = "r1"  # row 1 of unit 0 (rows 0-3): it makes the "device" fail whenever it is computed


@pytest.fixture
def errored(tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch):
    """A job stopped right after committing the poisoned row's error: rows 2 and 3 of its unit not done yet."""
    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=4)  # fmt: skip
    commit_row_error(job, gpt2_engine)  # batch 0-3 fails; then its rows run alone: r0 done, r1 fails -> error
    markers = [p for p in sorted((job.dir / "done").iterdir()) if json.loads(p.read_text()).get("errors")]
    assert len(markers) == 1
    marker = markers[0]
    assert [e["row"] for e in json.loads(marker.read_text())["errors"]] == [1]
    assert "check" in json.loads(marker.read_text())
    assert [e["id"] for e in runner.read_errors(job.dir)] == [BAD]
    return job, marker


def flip_in_error(marker, field, old, new):
    """Flip the one bit that turns `"field": old` into `"field": new` inside the errors entry."""
    text = marker.read_bytes()
    at = text.index(b'"errors"')
    needle = f'"{field}": {old}'.encode()
    pos = text.index(needle, at) + len(needle) - 1
    data = bytearray(text)
    assert bin(data[pos] ^ ord(str(new))).count("1") == 1  # a single-bit flip
    data[pos] = ord(str(new))
    marker.write_bytes(bytes(data))


def test_a_flipped_sample_digit_in_a_row_error_is_noticed(errored, runner_home):
    job, marker = errored
    flip_in_error(marker, "sample", 0, 2)
    code, out = run_runner("--home", runner_home, "status", "--json")
    assert "Traceback" not in out and code == 0, out
    assert "1 commit failed verification" in json.loads(out)[0]["message"]
    code, out = run_runner("--home", runner_home, "work", env_extra={"RUNNER_FAULT": f"poison_row:{BAD}"})
    assert "Traceback" not in out, out


def test_a_flipped_row_digit_in_a_row_error_loses_no_row(errored, gpt2_engine):
    job, marker = errored
    flip_in_error(marker, "row", 1, 3)
    run_until_done(job, gpt2_engine)  # the poisoned row still fails, as it would in any run
    ids = sorted(runner.load_results(job.dir)["id"])
    errors = [e["id"] for e in runner.read_errors(job.dir)]
    assert (ids, errors) == (
        ["r0", "r2", "r3", "r4", "r5"],
        [BAD],
    )  # every good row once, the poisoned one failed


def damaged_per_row_n_home(tmp_path, tiny_gpt2, runner_home, damage="truncate"):
    rows = [{"id": "a", "prompt": "hello there", "n": 2}, {"id": "b", "prompt": "the old man"}]
    per_row = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, PARAMS, EngineOptions(),
                         home=runner_home, name="perrow")  # fmt: skip
    other = create_job(write_jsonl(tmp_path / "o.jsonl", [{"id": "c", "prompt": "hello"}]), tiny_gpt2, PARAMS,
                       EngineOptions(), home=runner_home, name="other")  # fmt: skip
    assert json.loads((per_row.dir / "job.json").read_text())["per_row_n"] is True
    path = per_row.dir / "prompts.parquet"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])  # a partial upload / truncated sync of the prompts file
    else:  # a flipped bit in the Parquet footer that pyarrow reports as an OSError without an errno
        path.write_bytes(footer_flip_raising_oserror(path, data))
    return per_row, other


def footer_flip_raising_oserror(path, data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for at in range(len(data) - 9, len(data) // 2, -1):
        flipped = bytearray(data)
        flipped[at] ^= 2
        path.write_bytes(bytes(flipped))
        try:
            pq.read_table(path, columns=["n"])
        except pa.ArrowException:
            continue
        except OSError as e:
            if e.errno is None:
                return bytes(flipped)
    raise AssertionError("no flip found")


@pytest.mark.parametrize("damage", ["truncate", "footer"])
def test_a_damaged_per_row_n_prompts_file_breaks_only_its_job(tmp_path, tiny_gpt2, runner_home, damage):
    """(pass 10: a flipped footer, an OSError without an errno from pyarrow, stopped `runner work` for the
    whole home, as if the home were failing)"""
    damaged_per_row_n_home(tmp_path, tiny_gpt2, runner_home, damage)
    code, out = run_runner("--home", runner_home, "status", "--json")
    assert "Traceback" not in out and code == 0, out
    states = {e["name"]: (e["state"], e["message"]) for e in json.loads(out)}
    assert states["other"][0] == "queued"
    state, message = states["perrow"]
    assert (
        state == "broken"
        and "prompts.parquet of job" in message
        and "is damaged" in message
        and "submit the file again" in message
    )
    # (tests/test_restore_inputs.py)
    assert "writes it again from the input file if that is unchanged" in message
    code, out = run_runner("--home", runner_home, "work")
    assert "Traceback" not in out, out
    code, out = run_runner("--home", runner_home, "status", "other", "--json")
    assert '"completed"' in out, out  # the healthy job ran


def test_a_torn_job_json_says_whether_its_backup_can_restore_it(tmp_path, tiny_gpt2, runner_home):
    """A torn job.json: `runner repair` when job.backup.json is sound; when the backup is torn too, status says to
    submit again, not that the backup can restore it (found by a user walkthrough)."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home)
    (job.dir / "job.json").write_text('{"torn')
    message = runner.status(job.dir).message
    assert "its backup job.backup.json can restore it" in message and "runner repair" in message
    (job.dir / "job.backup.json").write_text('{"torn')
    message = runner.status(job.dir).message
    assert (
        "its backup is missing or damaged too; submit the file again" in message and "repair" not in message
    )


def test_a_job_json_with_a_flipped_digit_of_its_id_is_listed_under_its_own_id(
    tmp_path, tiny_gpt2, runner_home
):
    """job.json with one digit of its id flipped fails its checksum; `runner status` listed the job under the
    flipped id, which no command then found ("no job ..."). The backup that holds names it (pass 120)."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}]), tiny_gpt2, home=runner_home)
    meta = json.loads((job.dir / "job.json").read_text())
    flipped = job.id[:-1] + ("0" if job.id[-1] != "0" else "1")
    (job.dir / "job.json").write_text(json.dumps({**meta, "id": flipped}, indent=2))
    (listed,) = runner.status(home=runner_home)
    assert (listed.id, listed.state) == (job.id, "broken") and "checksum" in listed.message, listed
    code, out = run_runner("--home", runner_home, "status", "--json")
    assert code == 0 and [e["id"] for e in json.loads(out)] == [job.id], out
    code, out = run_runner("--home", runner_home, "repair", listed.id)
    assert code == 0 and "job.json restored from job.backup.json" in out, out


def test_results_of_a_job_with_none_yet_and_a_damaged_prompts_file_say_so(tmp_path, tiny_gpt2, runner_home):
    """(pass 10: a raw pyarrow OSError traceback from load_results; the CLI blamed the job home)"""
    per_row, _ = damaged_per_row_n_home(tmp_path, tiny_gpt2, runner_home, "footer")
    with pytest.raises(runner.RunnerError, match=f"prompts.parquet of job {per_row.id} is damaged"):
        runner.load_results(per_row.dir)
    code, out = run_runner("--home", runner_home, "results", per_row.dir)
    assert code == 1 and "Traceback" not in out and "is damaged" in out and "job home" not in out, out


def test_a_torn_state_file_is_named_with_its_job_and_the_repair_by_every_command(tmp_path, tiny_gpt2, gpt2_engine,
                                                                                 runner_home):  # fmt: skip
    """A torn state.json: results, retry, cancel, errors and the report said only "state.json is damaged
    (Unterminated string ...)", naming neither the job nor `runner repair` (status did; found by adversarial
    pass 11). Each now says which job is broken and what brings it back; after the repair all is well."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    runner.cancel(job.dir)
    runner.retry(job.dir)  # queued, generation 1
    run_until_done(job, gpt2_engine)
    state = newest_state_record(job.dir)  # the completion
    state.write_bytes(state.read_bytes()[:15])
    said = f"job {job.id} is broken \\(state/{state.name} is damaged .*\\); `runner repair {job.dir}` brings it back"
    for call in (runner.load_results, runner.read_errors, runner.cancel, runner.retry,
                 lambda ref: runner.report(ref, tmp_path / "r.html")):  # fmt: skip
        with pytest.raises(runner.RunnerError, match=said):
            call(job.dir)
    code, out = run_runner("results", job.dir, "--to", tmp_path / "r.jsonl")
    assert code == 1 and "Traceback" not in out and f"runner repair {job.dir}" in out, out
    code, out = run_runner("repair", job.dir)
    assert code == 0, out
    assert len(runner.load_results(job.dir)) == len(ROWS) and runner.status(job.dir).state == "completed"


def test_a_per_row_n_prompts_file_that_reads_with_another_n_is_not_taken_for_a_smaller_job(
    tmp_path, tiny_gpt2, gpt2_engine
):
    """One flipped bit turned the `n` of rows still to do from 1 into 0 in a prompts.parquet that still parsed:
    their results were "not part of the job", `runner repair` recorded completed 8/12 and load_results gave
    8 rows without a word (pass 36). A prompts file unlike its checksum breaks the job, whatever reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": f"r{i}", "prompt": f"The robot {i} dreams of", **({"n": 2} if i < 4 else {})} for i in range(8)
    ]
    job = create_job(write_jsonl(tmp_path / "in.jsonl", rows), tiny_gpt2,
                     GenerationParams(max_new_tokens=3, seed=3), job_dir=tmp_path / "job", unit_rows=4)  # fmt: skip
    from runner.jobdir import MARKERS

    def one_unit_done():
        return any((job.dir / MARKERS).iterdir())

    summary = runner.run_job(job, gpt2_engine, echo=None, should_stop=one_unit_done, shard_rows=1)
    assert not summary.finished and runner.status(job.dir).done == 8
    path = job.dir / "prompts.parquet"
    table = pq.read_table(path)
    n = table.column("n").to_pylist()
    changed = pa.array(n[:4] + [0] * 4, table.column("n").type)
    table = table.set_column(table.schema.get_field_index("n"), "n", changed)
    pq.write_table(table, path)
    status = runner.status(job.dir)
    assert status.state == "broken" and "prompts.parquet of job" in status.message
    kept = (tmp_path / "in.jsonl").read_bytes()
    (tmp_path / "in.jsonl").unlink()  # the input file gone: nothing to write it again from
    with pytest.raises(runner.RunnerError, match="prompts.parquet of job .* is damaged"):
        runner.repair(job.dir)
    assert runner.status(job.dir).state == "broken"
    (tmp_path / "in.jsonl").write_bytes(kept)  # back: repair writes prompts.parquet again, as submitted
    assert runner.repair(job.dir).restored_inputs == ["prompts.parquet"]
    assert run_until_done(runner.jobdir.Job.open(job.dir), gpt2_engine).finished
    assert len(runner.load_results(job.dir)) == 12


def test_status_polls_do_not_hash_a_per_row_n_prompts_file_each_time(tmp_path, tiny_gpt2, monkeypatch):
    """The check above hashed the whole prompts.parquet on every `runner status` / `watch` poll (pass 39; a
    download of the file each time on Drive): its stamp goes in verified.json, as a shard's does."""
    rows = [{"prompt": f"hello number {i}", "n": 1 + i % 3} for i in range(50)]
    job = create_job(write_jsonl(tmp_path / "in.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "job")  # fmt: skip
    hashings = prompts_hashing(monkeypatch)
    for _ in range(4):
        assert runner.status(job.dir).total == sum(r["n"] for r in rows)
    assert hashings() <= 1
    path = job.dir / "prompts.parquet"
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # changed since: hashed again, and found damaged
    assert runner.status(job.dir).state == "broken"


def test_status_of_a_queued_job_whose_prompts_file_changed_says_broken_before_a_worker_fails_it(
    tmp_path, tiny_gpt2, monkeypatch
):
    """Pass 71: a flipped byte in prompts.parquet of an interrupted job showed "queued (interrupted)" until a
    worker failed the job ("submit the file again"); status now says so first, hashing the file once per change
    (its stamp in verified.json), not on every poll."""
    rows = [{"id": f"r{i}", "prompt": f"hello number {i}"} for i in range(20)]
    job = create_job(write_jsonl(tmp_path / "in.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "job")  # fmt: skip
    hashings = prompts_hashing(monkeypatch)
    for _ in range(3):
        assert runner.status(job.dir).state == "queued"
    assert hashings() <= 1  # (none: stamped at submit)
    path = job.dir / "prompts.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    status = runner.status(job.dir)
    assert status.state == "broken" and "prompts.parquet of job" in status.message, status
    assert "writes it again from the input file" in status.message  # (tests/test_restore_inputs.py)
