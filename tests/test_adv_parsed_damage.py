"""Damage that still parses (adversarial pass 187): files of another job copied in whole, with their own
checksums intact, and values changed inside valid JSON. Each is either obeyed as if it never happened (results
equal a clean run's) or said, never silently changing what a job's results hold."""

import json
import re
import shutil

import pytest
from helpers import assert_exactly_once, completed_with_a_row_error, reference_run, write_jsonl

import runner
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.worker import run_job

# damage sweeps of the adversarial passes (~25 s of test time together): `make test` and CI run them, the
# edit loop (`make test-fast`, < 2 min) not
pytestmark = pytest.mark.slow

ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(6)]
PARAMS = GenerationParams(max_new_tokens=3, temperature=0.8, num_return_sequences=2, seed=7)
OPTIONS = EngineOptions(batch_size=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    return reference_run(tmp_path_factory.mktemp("ref"), tiny_gpt2, ROWS, PARAMS, OPTIONS)


def make(root, model, seed: int = 7):
    params = GenerationParams(max_new_tokens=3, temperature=0.8, num_return_sequences=2, seed=seed)
    prompts = write_jsonl(root / f"p{seed}.jsonl", ROWS)
    return create_job(prompts, model, params, OPTIONS, job_dir=root / f"job{seed}", unit_rows=6)


def test_a_crash_record_copied_in_from_another_job_sets_no_row_aside(
    tmp_path, tiny_gpt2, gpt2_engine, reference, monkeypatch
):
    """Another job's in-flight record, as its worker wrote it before computing row r1 alone after a death there
    (a kill now would be r1's second death alone), copied into a job not run yet, same name: the record named
    no job, so this job's r1 was set aside as a worker_crash, unrun, and left out of its results."""
    from runner import worker
    from runner.crashes import InFlight, Suspect

    other, job = make(tmp_path, tiny_gpt2, seed=8), make(tmp_path, tiny_gpt2)
    record, copied = other.dir / "inflight" / "00000.json", job.dir / "inflight" / "00000.json"
    # an older worker's record in the other job: r1's sample 0 died once alone
    InFlight(record, "w-dead").running([], [Suspect([(1, 0)], crashes=1, isolated=True)])
    real = worker.isolating

    def spy(engine, task, keys, *a, **kw):
        if keys == [(1, 0)] and not copied.exists():
            copied.parent.mkdir(exist_ok=True)
            copied.write_bytes(record.read_bytes())
        return real(engine, task, keys, *a, **kw)

    monkeypatch.setattr(worker, "isolating", spy)
    assert run_job(other, gpt2_engine, echo=None).finished
    monkeypatch.setattr(worker, "isolating", real)
    assert copied.exists()
    assert run_job(job, gpt2_engine, echo=None).finished
    assert not runner.read_errors(job.dir)
    assert_exactly_once(job.dir, reference[1])


def test_row_errors_copied_in_from_another_job_set_no_row_aside(tmp_path, tiny_gpt2, gpt2_engine, reference,
                                                                 monkeypatch):  # fmt: skip
    """Another job's commits of row errors alone (its row r1 set aside as a worker_crash: no shard, whose
    metadata would name that job) copied into a job not run yet, same names: they checked out, so this job's r1
    was never computed and the job completed with it as an error. They are refused, and r1 computed."""
    other, job = make(tmp_path, tiny_gpt2, seed=8), make(tmp_path, tiny_gpt2)
    completed_with_a_row_error(other, gpt2_engine, monkeypatch)
    copied = []
    for marker in sorted((other.dir / "done").glob("*.json")):
        if json.loads(marker.read_text())["shard"] is None:
            (job.dir / "done").mkdir(exist_ok=True)
            shutil.copy2(marker, job.dir / "done" / marker.name)
            copied.append(marker.name)
    assert copied
    shown = runner.status(job.dir)
    assert "failed verification" in shown.message and shown.errors == 0
    assert run_job(job, gpt2_engine, echo=None).finished
    assert not runner.read_errors(job.dir)
    assert_exactly_once(job.dir, reference[1])


def stop_after(batches: int):
    """should_stop for run_job: stop once `batches` batches ran (checked before each)."""
    asked = []
    return lambda: asked.append(1) or len(asked) > batches


@pytest.mark.parametrize("pid", ["1e345", "6e26"])  # 12345 and 6626 with their second digit flipped to an 'e'
def test_a_claims_pid_flipped_to_an_e_is_no_traceback(tmp_path, tiny_gpt2, gpt2_engine, reference, pid):
    """A claim's pid with a digit flipped to an 'e' still parses, as an infinite or a huge number: reading the
    claim raised OverflowError (int() of infinity), and `runner status` and `runner work` of the job stopped on
    a traceback. Such a pid tells nothing: the claim is read as its worker's, the job carries on."""
    job = make(tmp_path, tiny_gpt2)
    run_job(job, gpt2_engine, echo=None, shard_rows=2, should_stop=stop_after(1))
    for claim in (job.dir / "claims").glob("*.json"):
        claim.write_text(re.sub(r'"pid": \d+', f'"pid": {pid}', claim.read_text()))
    assert runner.status(job.dir).state == "queued (interrupted)"
    assert run_job(job, gpt2_engine, echo=None).finished
    assert_exactly_once(job.dir, reference[1])


@pytest.mark.parametrize("pid", ["1e345", "6e26"])
def test_a_killed_submits_owner_pid_flipped_to_an_e_is_no_traceback(tmp_path, pid):
    """The temp folder of a killed submit in a job home, its .owner.json's pid flipped to an 'e': every
    `runner work` of the home (and every submit into it) looks whether that submit is gone, and os.kill (or
    int() of infinity) raised OverflowError. It is left for its age to tell, as one whose owner says nothing."""
    from runner import jobdir, storage

    temp = tmp_path / jobdir.submit_temp_name("night1")
    temp.mkdir()
    owner = json.dumps(jobdir.Owner.me("submit").as_dict())
    (temp / ".owner.json").write_text(re.sub(r'"pid": \d+', f'"pid": {pid}', owner))
    assert storage.OWNED_TEMP.fullmatch(temp.name)
    assert jobdir.remove_dead_submits(tmp_path) == 0 and temp.exists()


ODD = [float("inf"), 6e26, -1, [], "x", None]  # what a flipped digit can make a number parse as, and types


def odd_values(folder):
    """(file, path to a value, what it is set to): each number of each JSON file of the job but its spec (one
    odd value each, in turn), each file's checksum taken off onto another field (a renamed key that repeats one
    before it, which JSON reads as that field's value)."""
    at, markers = 0, sorted((folder / "done").glob("*.json"))
    for f in sorted(p for p in folder.rglob("*.json") if p.name not in ("job.json", "job.backup.json")):
        if f in markers[1:]:
            continue  # (one commit marker is enough: they are alike)
        rel, obj = f.relative_to(folder), json.loads(f.read_text())
        stack = [((), obj)]
        while stack:
            path, v = stack.pop()
            if isinstance(v, dict | list):
                stack.extend((path + (k,), v[k]) for k in (v if isinstance(v, dict) else range(len(v))))
            elif isinstance(v, int | float) and not isinstance(v, bool):
                at += 1
                yield rel, path, ODD[at % len(ODD)]
        if "check" in obj:
            yield rel, ("check",), "onto " + next(k for k in obj if k != "check")


def set_odd(path, keys, value) -> None:
    obj = json.loads(path.read_text())
    if keys == (
        "check",
    ):  # "check" renamed onto an earlier field: that field reads as the checksum, none is left
        check, onto = obj.pop("check"), value.removeprefix("onto ")
        path.write_text(json.dumps(obj)[:-1] + f", {json.dumps(onto)}: {json.dumps(check)}}}")
        return
    parent = obj
    for k in keys[:-1]:
        parent = parent[k]
    parent[keys[-1]] = value
    path.write_text(json.dumps(obj))


def test_values_that_parse_but_are_odd_leave_a_job_exactly_once(tmp_path, tiny_gpt2, gpt2_engine, reference):
    """A sweep over a job stopped after two commits: each number of its claims, markers, state record, stats
    and verification cache set to what a flipped digit may make of it (infinite, huge, negative) or to another
    type, and each checksum renamed away: `runner status` reads the job without a traceback, and after `runner
    repair` the job runs to the very results of an uninterrupted run. (A claim's pid of 1e345 stopped both on
    OverflowError.)"""
    from runner import jobdir

    template = make(tmp_path, tiny_gpt2)
    run_job(template, gpt2_engine, echo=None, shard_rows=2, should_stop=stop_after(2))
    cases = list(odd_values(template.dir))
    assert len(cases) > 30
    for i, (rel, keys, value) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        shutil.copytree(template.dir, folder)
        set_odd(folder / rel, keys, value)
        runner.status(folder)
        jobdir.repair(folder)
        assert run_job(jobdir.Job.open(folder), gpt2_engine, echo=None).finished, (rel, keys, value)
        assert not runner.read_errors(folder), (rel, keys, value)
        assert_exactly_once(folder, reference[1])
        shutil.rmtree(folder)
