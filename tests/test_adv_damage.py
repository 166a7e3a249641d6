"""A damage sweep over a job's small files (adversarial pass 182): every truncation of job.json, its backup, the
newest state record, a commit marker, a claim, a seal, verified.json and stats.json; one-value changes to
job.json and its backup (each field: a digit, a string, removed, another type), one copy changed and both;
each kind of file deleted; and files copied in from another job of the same input. What it found:

* a number of job.json rewritten as its equal of another type (`1.0` as `1`, as JavaScript's JSON writes it;
  `false` as `0`): the job was broken ("does not match its checksum; `runner repair` restores it from
  job.backup.json"), and `runner repair` failed saying the same, for ever: it compared job.json with its backup
  by Python's ==, which takes 1 for 1.0 and for true, and so left the damaged file in place;
* a state record copied in from another job's folder (a `cancel` of a job of the same input, as a new record
  or over one of this job's of the same name) was obeyed without a word: the job read cancelled, and a
  completed job too. A record now names the job it was written for (in its writer token): one of another job
  makes the job broken, naming it, and `runner repair` sets it aside;
* stats.json copied in from another job's folder: `runner status` and `runner report` showed that job's runs
  (speed, peak memory, workers) as this one's. It names its job now: another's is said, not shown.
"""

import json
import shutil

import pytest
from helpers import assert_exactly_once, invoke, prepared_job, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job
from runner.worker import run_job

# damage sweeps of the adversarial passes (~25 s of test time together): `make test` and CI run them, the
# edit loop (`make test-fast`, < 2 min) not
pytestmark = pytest.mark.slow

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2):
    """A job of ROWS not run yet (units of 2 rows), and the results of an uninterrupted run."""
    return prepared_job(tmp_path_factory.mktemp("damage"), tiny_gpt2, ROWS, PARAMS, OPTIONS, unit_rows=2)


@pytest.mark.parametrize(("field", "value"), [("top_p", 1), ("early_stopping", 0), ("temperature", True)])
def test_a_job_json_number_rewritten_as_its_equal_of_another_type_is_restored_by_repair(
    tmp_path, tiny_gpt2, field, value
):
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "j"
    )
    meta = json.loads((job.dir / "job.json").read_text())
    assert meta["params"][field] == value and type(meta["params"][field]) is not type(value)
    meta["params"][field] = value  # (1.0 -> 1, false -> 0: equal in Python, another checksum)
    (job.dir / "job.json").write_text(json.dumps(meta, indent=2))
    status = runner.status(job.dir)
    assert status.state == "broken" and "its checksum" in status.message
    said = invoke("repair", job.dir)
    assert said.exit_code == 0 and "job.json restored from job.backup.json" in said.output, said.output
    assert (job.dir / "job.json").read_bytes() == (job.dir / "job.backup.json").read_bytes()
    assert runner.status(job.dir).state == "queued"


def a_cancel_of_another_job(tmp_path, template):
    """The state record of a `runner cancel` of another job of the same input (another seed)."""
    other = create_job(template.parent / "p.jsonl", jobdir.Job.open(template).spec.model,
                       GenerationParams(max_new_tokens=2, temperature=1.0, seed=12), OPTIONS,
                       job_dir=tmp_path / "other")  # fmt: skip
    runner.cancel(other.dir)
    return other.dir / "state" / "00000001.json"


@pytest.mark.parametrize("where", ["new", "over_its_own"])
def test_a_state_record_copied_in_from_another_job_is_not_obeyed(tmp_path, prepared, gpt2_engine, where):
    template, ref = prepared
    home = tmp_path / "home"
    shutil.copytree(template, home / "job")
    job = jobdir.Job.open(home / "job")
    run_job(job, gpt2_engine, echo=None, should_stop=lambda: any((job.dir / "done").glob("*.json")))
    if where == "over_its_own":  # this job's own record (a cancel and a retry: queued, generation 1) replaced
        runner.cancel(job.dir)
        runner.retry(job.dir)
        name = "00000002.json"
    else:
        name = "00000001.json"
    (job.dir / "state").mkdir(exist_ok=True)
    shutil.copy2(a_cancel_of_another_job(tmp_path, template), job.dir / "state" / name)
    status = runner.status(job.dir)
    assert status.state == "broken" and f"state/{name} was written for job" in status.message, status
    with pytest.raises(runner.RunnerError, match=f"state/{name} was written for job .*runner repair"):
        runner.load_results(job.dir)
    said = invoke("--home", home, "work")
    assert said.exit_code == 1 and "is broken" in said.output and "runner repair" in said.output, said.output
    said = invoke("repair", job.dir)
    assert said.exit_code == 0 and f"state/{name} was another job's state record" in said.output, said.output
    if where == "over_its_own":  # its own retry, lost under the copy: run again, as repair says
        assert runner.status(job.dir).state == "cancelled" and "run it again" in said.output
        runner.retry(job.dir)
    assert invoke("--home", home, "work").exit_code == 0
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, ref)


def test_a_completed_jobs_record_replaced_by_another_jobs_cancel_is_repaired_to_completed(
    tmp_path, prepared, gpt2_engine
):
    template, ref = prepared
    shutil.copytree(template, tmp_path / "job")
    job = jobdir.Job.open(tmp_path / "job")
    assert run_job(job, gpt2_engine, echo=None).finished
    (record,) = (job.dir / "state").iterdir()  # the completion
    shutil.copy2(a_cancel_of_another_job(tmp_path, template), record)
    assert runner.status(job.dir).state == "broken"
    assert runner.repair(job.dir).foreign_records == ["state/00000001.json"]
    assert runner.status(job.dir).state == "completed"
    assert_exactly_once(job.dir, ref)


def test_stats_json_copied_in_from_another_job_is_not_shown_as_this_ones(tmp_path, prepared, gpt2_engine):
    template, _ = prepared
    a = jobdir.Job.open(shutil.copytree(template, tmp_path / "a"))
    b = create_job(template.parent / "p.jsonl", a.spec.model, GenerationParams(max_new_tokens=2, seed=12),
                   OPTIONS, job_dir=tmp_path / "b")  # fmt: skip
    assert run_job(b, gpt2_engine, echo=None).finished
    (theirs,) = json.loads((b.dir / "stats.json").read_text())["runs"]
    shutil.copy2(b.dir / "stats.json", a.dir / "stats.json")
    page = runner.report(a.dir, tmp_path / "r.html").read_text()
    assert theirs["worker"] not in page and f"stats.json is job {b.id}" in page
    assert run_job(a, gpt2_engine, echo=None).finished  # its run is recorded as its first, not after theirs
    (run,) = json.loads((a.dir / "stats.json").read_text())["runs"]
    assert (
        run["worker"] != theirs["worker"]
        and runner.status(a.dir).tokens_per_second == run["tokens_per_second"]
    )


def _damaged_record(record, damage: str) -> None:
    data = record.read_bytes()
    if damage == "torn before its writer":
        record.write_bytes(data[: data.index(b'"by"')])
    elif damage == "torn after its writer":
        record.write_bytes(data[: data.index(b'"writer"')])
    elif damage == "first byte flipped":
        record.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    elif damage == "writer flipped":  # still JSON: "cancel" -> "cancem"
        record.write_bytes(data.replace(b'"by": "cancel"', b'"by": "cancem"'))
    else:
        record.unlink()
        record.mkdir()


@pytest.mark.parametrize(
    "damage",
    ["torn before its writer", "torn after its writer", "first byte flipped", "writer flipped", "folder"],
)
def test_repair_of_a_cancel_damaged_past_reading_says_to_cancel_again(tmp_path, tiny_gpt2, damage):
    """A damage sweep over every file of a job at each stage (adversarial pass 194): a cancelled job's record
    torn in half, its first byte flipped (no JSON any more) or a folder in its place was repaired to queued
    without a word, and the next `runner work` ran the job the user had cancelled. Repair said to cancel again
    only where the damaged record still parsed as JSON naming its command. It now reads the command from the
    bytes where they are no JSON, and where nothing tells, says that a cancel or retry may be lost."""
    job = create_job(
        write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "j"
    )
    runner.cancel(job.dir)
    record = job.dir / "state" / "00000001.json"
    _damaged_record(record, damage)
    assert runner.status(job.dir).state == "broken"
    said = invoke("repair", job.dir)
    assert said.exit_code == 0 and "-> queued" in said.output, said.output
    assert (
        f"run `runner cancel {job.dir}` again" in said.output
        or "if you ran `runner cancel` or `runner retry` on this job lately, run it again" in said.output
    ), said.output
