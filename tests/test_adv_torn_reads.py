"""One torn read (a network mount serving a page dropped or stale, once) of each file a job's readers read, found
by an adversarial sweep (pass 184) through a worker, `runner status`, `load_results`, `runner results --to` and
`runner repair`; commit markers and shards were read again already (tests/test_adv_storage.py). What was found:

* job.json read torn: every command took the job for broken (status, load_results, exports exiting 1, a worker
  leaving the job with "job.json is damaged ... `runner repair`");
* the newest state record read with a changed byte (it fails its checksum): status and workers said broken, and
  `runner repair` recorded a state of its own over the sound record, saying the job had been broken;
* prompts.parquet or errors.jsonl hashed from a torn read: a worker stopped on the job as broken, status said
  the file was damaged, and `runner repair` set the sound file aside in quarantine/ and wrote it again;
* job.backup.json read torn: a worker or repair wrote it again, logging it damaged;
* stats.json read torn by a worker about to add its run: written again with that run alone, the history of
  every earlier run lost;
* a worker's own claim read torn as it committed: the worker took its unit for lost, dropped the rows it had
  computed and computed them again under a new epoch;
* a line of errors.jsonl read torn after its hash had checked: `runner.read_errors` raised a raw
  JSONDecodeError (a traceback); a line read with a changed value was listed as read;
* a model file read torn as a worker checked the model was the job's: the job failed for good ("the model is
  not the one job J was submitted with"); the fingerprint is computed once more first.

Each of these is read once more before it is taken for damage (`jobdir.read_again_if_damaged`); a line of
errors.jsonl is hashed as it is read, so one read other than it hashed is said (run the command again), never
listed.
"""

import json
import os
import shutil
import warnings

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.errors import RunnerError
from runner.jobs import Job, create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=1)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]
BAD = '{"id": "bad", "prompt": 5}'


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """Two jobs of the same 4 rows (and one invalid: errors.jsonl) in units of 2, each with a state record:
    "done" completed, "part" with unit 0 done and unit 1 left."""
    root = tmp_path_factory.mktemp("torn")
    prompts = write_jsonl(root / "p.jsonl", [*ROWS[:2], BAD, *ROWS[2:]])
    out = {}
    for name in ("done", "part"):
        job = create_job(
            prompts, tiny_gpt2, PARAMS, OPTIONS, skip_invalid=True, home=root / name, unit_rows=2
        )
        job.set_state("queued")
        run_job(job, gpt2_engine, echo=None, should_stop=lambda j=job: bool(os.listdir(j.dir / "done")))
        if name == "done":
            run_job(job, gpt2_engine, echo=None)
        out[name] = job.dir
    return out


def copy_of(jobs, name, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(jobs[name], home / jobs[name].name)
    jobdir._HASHED.clear()
    jobdir._BLOCKS.clear()
    return home / jobs[name].name


def changed(obj):
    """The JSON `obj` with one value other than it is: its first whole number, plus one."""
    text = json.dumps(obj)
    digit = next(i for i, c in enumerate(text) if c.isdigit())
    return json.loads(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])


THROUGH = ("read_json", "read_bytes", "file_sha256", "_read_at")


def tear_first_read(monkeypatch, suffix: str, how: str, through: tuple[str, ...] = THROUGH) -> list[str]:
    """The first read of the file whose path ends with `suffix` comes back torn, later reads whole: `how` "cut"
    (short: JSON that does not parse, bytes that do not hash), "value" (a value other than it is, or a byte
    flipped) or "not-utf8" (a line's first byte 0xff: `_read_at` only), through the storage functions named in `through` (`_read_at`: the chunks of read_lines); the
    paths torn are listed."""
    torn: list[str] = []
    real_json, real_bytes, real_sha, real_at = (
        storage.read_json, storage.read_bytes, storage.file_sha256, storage._read_at,
    )  # fmt: skip

    def first(path) -> bool:
        if str(path).endswith(suffix) and not torn:
            torn.append(str(path))
            return True
        return False

    def read_json(path):
        data = real_json(path)
        if first(path):
            if how == "cut":
                raise json.JSONDecodeError("torn", "{", 1)
            return changed(data)
        return data

    def read_bytes(path):
        data = real_bytes(path)
        if first(path):
            return data[: len(data) // 2] if how == "cut" else json.dumps(changed(json.loads(data))).encode()
        return data

    def file_sha256(path, *a, **k):
        digest = real_sha(path, *a, **k)
        return ("1" if digest[0] == "0" else "0") + digest[1:] if first(path) else digest

    def read_at(path, offset, size):
        data = real_at(path, offset, size)
        if data and first(path):
            line = data.split(b"\n")[0]
            if how == "not-utf8":
                bad = b"\xff" + line[1:]
            else:
                bad = (
                    line[: len(line) // 2] if how == "cut" else json.dumps(changed(json.loads(line))).encode()
                )
            return bad + data[len(line) :]
        return data

    fakes = {
        "read_json": read_json,
        "read_bytes": read_bytes,
        "file_sha256": file_sha256,
        "_read_at": read_at,
    }
    for name in through:
        monkeypatch.setattr(storage, name, fakes[name])
    return torn


def files(folder):
    """What a reader must leave as it was: every file (the bytes of those no run writes; of a state record its
    word), but the log, heartbeats and caches, and the log's lines that say something was damaged or set aside."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if not p.is_file() or rel in ("log.txt", "verified.json") or rel.startswith("workers/"):
            continue
        if rel.startswith("state/"):
            out[rel] = [json.loads(p.read_bytes()).get(k) for k in ("state", "by", "generation")]
        else:  # (a run writes times into these)
            out[rel] = "there" if rel.startswith(("done/", "claims/", "stats.json")) else p.read_bytes()
    said = ("damaged", "quarantin", "written again", "broken")
    out["log.txt"] = [  # (without their times: the two runs may fall on either side of a second)
        line[20:] for line in (folder / "log.txt").read_text().splitlines() if any(w in line for w in said)
    ]
    return out


def status_of(d, engine, tmp_path):
    s = runner.status(d)
    return s.state, s.done, s.errors, s.message


def worker_on(d, engine, tmp_path):
    s = run_job(Job.open(d), engine, echo=None)
    return s.finished, s.generated, s.done


def loaded(d, engine, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return runner.load_results(d).to_json()


def exported(d, engine, tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    result = invoke("results", d, "--to", out, "--errors-to", errors)
    assert result.exit_code == 0, result.output
    return out.read_text(), errors.read_text()


def repaired(d, engine, tmp_path):
    result = invoke("repair", d)
    assert result.exit_code == 0, result.output
    return result.output.replace(str(d), "JOB")


READERS = {"status": status_of, "worker": worker_on, "load": loaded, "export": exported, "repair": repaired}
CASES = [
    *(
        ("done", "job.json", how, r)
        for how in ("cut", "value")
        for r in ("status", "worker", "load", "export")
    ),
    *(("done", "state/00000002.json", "value", r) for r in ("status", "worker", "repair")),
    *(("done", "prompts.parquet", "value", r) for r in ("status", "worker", "repair")),
    ("part", "prompts.parquet", "value", "worker"),
    *(("done", "errors.jsonl", "value", r) for r in ("export", "repair")),
    *(("done", "job.backup.json", "cut", r) for r in ("worker", "repair")),
]


@pytest.mark.parametrize(("job", "suffix", "how", "reader"), CASES)
def test_one_torn_read_is_read_again_not_taken_for_damage(
    jobs, gpt2_engine, tmp_path, monkeypatch, job, suffix, how, reader
):
    """Each reader gives what it gives on the untorn job, and leaves the job folder as that run does."""
    read = READERS[reader]
    clean = copy_of(jobs, job, tmp_path / "clean")
    want = read(clean, gpt2_engine, tmp_path / "clean")
    d = copy_of(jobs, job, tmp_path / "torn")
    with monkeypatch.context() as m:
        torn = tear_first_read(m, f"/{suffix}", how)
        got = read(d, gpt2_engine, tmp_path / "torn")
    assert torn, f"{suffix} was not read"
    assert got == want
    assert files(d) == files(clean)


def test_a_torn_read_of_its_own_claim_keeps_the_rows_a_worker_computed(
    jobs, gpt2_engine, tmp_path, monkeypatch
):
    """The worker's own new claim, read as it commits, comes back cut short: it took its unit for taken over
    (ClaimLost), dropped its two rows and computed them again under another epoch."""
    d = copy_of(jobs, "part", tmp_path)
    claims = set(os.listdir(d / "claims"))
    with monkeypatch.context() as m:
        torn = tear_first_read(m, "/claims/00001-00000001.json", "cut")
        summary = run_job(Job.open(d), gpt2_engine, echo=None)
    assert torn and "00001-00000001.json" not in claims
    assert (summary.finished, summary.generated) == (True, 2)
    assert sorted(n for n in os.listdir(d / "claims") if n not in claims) == ["00001-00000000.seal.json",
                                                                            "00001-00000001.json"]  # fmt: skip
    assert sorted(os.listdir(d / "done")) == sorted(os.listdir(jobs["done"] / "done"))


@pytest.mark.parametrize("how", ["cut", "value"])
def test_a_torn_read_of_stats_keeps_the_earlier_runs(jobs, gpt2_engine, tmp_path, monkeypatch, how):
    d = copy_of(jobs, "part", tmp_path)
    before = json.loads((d / "stats.json").read_text())["runs"]
    with monkeypatch.context() as m:
        torn = tear_first_read(m, "/stats.json", how)
        run_job(Job.open(d), gpt2_engine, echo=None)
    assert torn
    assert json.loads((d / "stats.json").read_text())["runs"][:-1] == before


@pytest.mark.parametrize("how", ["cut", "value", "not-utf8"])
def test_a_line_of_errors_jsonl_read_torn_is_said_never_listed(jobs, tmp_path, monkeypatch, how):
    """The file hashes whole, then its lines read torn: a traceback (cut; a byte that is not UTF-8, found by a
    second reader), or the line listed as read (value). It is said, and the next read lists the line as it is."""
    d = copy_of(jobs, "done", tmp_path)
    want = runner.read_errors(d)
    with monkeypatch.context() as m:
        torn = tear_first_read(m, "/errors.jsonl", how, through=("_read_at",))
        with pytest.raises(RunnerError, match="run the command again"):
            runner.read_errors(d)
    assert torn
    assert runner.read_errors(d) == want


def test_a_torn_read_of_the_model_does_not_fail_the_job(jobs, gpt2_engine, tmp_path, monkeypatch):
    from runner import models
    from runner.scheduler import work

    d = copy_of(jobs, "part", tmp_path)
    real, torn = models.model_fingerprint, []

    def fingerprint(*args, **kwargs):
        got = real(*args, **kwargs)
        if not torn:
            torn.append(got)
            return got[:-1] + ("0" if got[-1] != "0" else "1")
        return got

    monkeypatch.setattr(models, "model_fingerprint", fingerprint)
    work(d.parent, job=str(d), engine=gpt2_engine, echo=None)
    assert torn and runner.status(d).state == "completed"


@pytest.mark.parametrize("how", ["cut", "value"])
@pytest.mark.parametrize("what", ["heartbeat", "claim"])
def test_a_torn_read_of_a_live_workers_lease_leaves_its_unit_to_it(
    jobs, gpt2_engine, tmp_path, monkeypatch, what, how
):
    """Worker W holds unit 1 and heartbeats; each time another worker looks who is alive, its first read of W's
    heartbeat (or of W's claim) comes back torn, as on a mount whose renames are copies (a heartbeat read while
    W renews it reads cut short or empty) or one that drops a page. W was taken for dead at that one read: the
    other worker took its unit over, and W, computing it, lost its rows (ClaimLost) to compute them again. A
    lease that reads damaged, or a claim that reads as no live worker's, is read once more (adversarial pass
    193)."""
    d = copy_of(jobs, "part", tmp_path)
    job, w = Job.open(d), jobdir.Owner.me("w7-live")
    assert jobdir.take_unit(job, 1, w, jobdir.read_ledger(job).current.get(1, -1)) is not None
    jobdir.Heartbeat(job, w, ttl=600).beat()
    claims = sorted(os.listdir(d / "claims"))
    suffix = f"/workers/{w.worker}.json" if what == "heartbeat" else f"/claims/{claims[-1]}"
    real, torn = jobdir.job_progress, []

    def job_progress(*args, **kwargs):  # (every look: the workers' and the queue's)
        with monkeypatch.context() as m:
            torn.append(tear_first_read(m, suffix, how))
            return real(*args, **kwargs)

    monkeypatch.setattr(jobdir, "job_progress", job_progress)
    summary = run_job(Job.open(d), gpt2_engine, echo=None, owner=jobdir.Owner.me("other"))
    assert any(torn)
    assert sorted(os.listdir(d / "claims")) == claims, "W's unit was taken from it"
    assert summary.generated == 0 and not summary.finished
