"""Storage faults the rest of the suite does not inject, found by an adversarial pass:

* a write that fails for good (a full disk or Drive quota: ENOSPC, EDQUOT) while an exclusive file is being
  filled where hard links are not supported (Colab's Drive mount): the file its create made was left empty at
  its name. A `cancel` on a full Drive then showed "a change of state is being written" for two minutes, and
  then the job broken until `runner repair`; a `submit --name` left its name claimed for ten minutes;
* a name claim dated ahead (the clock of the machine whose submit was killed ran ahead, as Drive shows another
  VM's times): the name stayed claimed until that date plus ten minutes, days, while the message said it frees
  itself within ten minutes;
* a shard read back other than it is, once (a torn read on a network mount): the worker quarantined the sound
  commit and computed its rows again, and an export left its rows out. Bytes that do not check are read once
  more before they are taken for damage (`jobdir.read_checked_shard`); so is a commit marker that does not make
  sense as read (`jobdir._read_marker`), and only one that does is kept for the rest of the process.
"""

import errno
import json
import os
import pathlib
import time
import warnings

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.errors import RunnerError
from runner.job_status import job_status
from runner.jobs import Job, create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=2, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def no_links_and_full(monkeypatch, folder: str) -> None:
    """A file system without hard links (os.link: EPERM) whose writes into files under `folder` fail with ENOSPC
    (the disk, or the Drive quota, is full); creating a file still succeeds (an empty file takes no block)."""
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
    monkeypatch.setattr(jobdir, "_LINKS", {})
    real = os.pwrite

    def pwrite(fd, data, at):
        if f"/{folder}/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_cancel_on_a_full_disk_without_links_leaves_the_state_as_it_was(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    with monkeypatch.context() as m:
        no_links_and_full(m, "state")
        result = invoke("--home", runner_home, "cancel", job.id)
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert [p.stat().st_size for p in (job.dir / "state").iterdir() if not p.name.startswith(".")] != [0]
    # an hour later, nothing is left of the failed cancel: the job is queued, not broken
    for p in (job.dir / "state").iterdir():
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    status = job_status(Job.open(job.dir))
    assert (status.state, status.message) == ("queued", None), status
    # space back, the cancel goes through
    result = invoke("--home", runner_home, "cancel", job.id)
    assert result.exit_code == 0, result.output
    assert job_status(Job.open(job.dir)).state == "cancelled"


def test_a_named_submit_on_a_full_disk_without_links_leaves_its_name_free(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    args = (
        "--home",
        runner_home,
        "submit",
        prompts,
        "-m",
        tiny_gpt2,
        "--name",
        "night",
        "--max-new-tokens",
        "2",
    )
    with monkeypatch.context() as m:
        no_links_and_full(m, ".names")
        result = invoke(*args)
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    result = invoke(*args)  # space back: the name is free at once, not in ten minutes
    assert result.exit_code == 0, result.output
    assert job_status(Job.open(runner_home / result.output.split()[-1])).state == "queued"


def test_a_killed_submits_name_claim_dated_days_ahead_frees_itself(tmp_path, tiny_gpt2, runner_home):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    names = runner_home / ".names"
    names.mkdir(parents=True)
    claim = names / "night.0.json"
    # a submit killed on another VM (another boot: only the claim's age can free it), whose clock ran 3 days ahead
    owner = {
        "worker": "vm2-77-abcdef",
        "host": "vm2",
        "pid": 77,
        "boot": "other",
        "pidns": "other",
        "start": "1",
    }
    claim.write_text(json.dumps({"job": "20991231-000000-abcdef", "owner": owner,
                                 "temp": ".20991231-000000-abcdef.77-0badf00d.12345678.tmp"}))  # fmt: skip
    ahead = time.time() + 3 * 86400
    os.utime(claim, (ahead, ahead))
    result = invoke("--home", runner_home, "submit", prompts, "-m", tiny_gpt2, "--name", "night")
    assert result.exit_code == 0, result.output
    job_id = result.output.split()[-1]
    assert job_id != "20991231-000000-abcdef" and (runner_home / job_id / "job.json").is_file()


def test_prompts_unreadable_mid_run_under_an_unchanged_stamp_is_a_broken_job_not_a_traceback(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """prompts.parquet damaged while a worker runs, its size and times as they were (bit rot; a mount that
    keeps stale times): the worker, which hashed it at its start, reads the next unit's rows from it. Before,
    pyarrow's ArrowInvalid went up through `runner work` as a traceback."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=2)  # fmt: skip
    real = jobdir.write_marker

    def write_marker(*args, **kw):  # the first unit's commit lands, then the file's footer rots
        real(*args, **kw)
        path = job.dir / "prompts.parquet"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # "PAR1" -> "PAR0": no Parquet file any more, of the same size
        path.write_bytes(bytes(data))
        stamp = jobdir._stamp(path.stat(), job.spec.prompts_sha256)
        m.setitem(jobdir._HASHED, str(path), stamp)  # its times as the worker's hashing saw them

    with monkeypatch.context() as m:
        m.setattr(jobdir, "write_marker", write_marker)
        m.setattr(jobdir.Verifier, "save", lambda self: None)  # (verified.json keeps the stamp it had)
        result = invoke("--home", runner_home, "work")
    assert result.exit_code == 1, result.output
    assert f"prompts.parquet of job {job.id} is damaged" in result.output and "runner repair" in result.output
    assert "Traceback" not in result.output
    assert list(runner.load_results(job.dir)["id"]) == ["r0", "r1"]  # what was done before is kept
    assert invoke("--home", runner_home, "repair", job.id).exit_code == 0  # written again from p.jsonl
    assert invoke("--home", runner_home, "work").exit_code == 0
    assert list(runner.load_results(job.dir)["id"]) == ["r0", "r1", "r2", "r3"]


def test_prompts_changed_mid_run_under_an_unchanged_stamp_are_not_computed_from(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """As above, but the file still parses: another job's valid prompts.parquet of the same row count (bit rot
    that leaves the Parquet file readable reads the same way). The later units came from the other prompts. A
    worker reads each unit's rows against the blocks of its start hash (storage.CheckedFile): the job is broken
    naming the file, what was done is kept, and with the file put back it completes from the right prompts."""
    mine = write_jsonl(
        tmp_path / "a.jsonl", [{"id": f"r{i}", "prompt": f"Prompt {i} says"} for i in range(4)]
    )
    theirs = write_jsonl(tmp_path / "b.jsonl", [{"id": f"r{i}", "prompt": f"Another {i}"} for i in range(4)])
    job = create_job(mine, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a", unit_rows=2)
    other = create_job(theirs, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "b", unit_rows=2)
    real = jobdir.write_marker

    def write_marker(*args, **kw):
        real(*args, **kw)
        path = job.dir / "prompts.parquet"
        if str(path) in swapped:
            return
        original.append(path.read_bytes())
        path.write_bytes((other.dir / "prompts.parquet").read_bytes())
        swapped[str(path)] = jobdir._stamp(path.stat(), job.spec.prompts_sha256)
        m.setitem(jobdir._HASHED, str(path), swapped[str(path)])  # its times as the worker's hashing saw them

    swapped: dict[str, list] = {}
    original: list[bytes] = []
    with monkeypatch.context() as m:
        m.setattr(jobdir, "write_marker", write_marker)
        m.setattr(jobdir.Verifier, "save", lambda self: None)
        with pytest.raises(RunnerError, match="prompts.parquet of job .* is damaged"):
            run_job(job, gpt2_engine, echo=None)
    status = job_status(job)
    assert status.state == "broken" and "prompts.parquet" in status.message, status
    with pytest.warns(UserWarning, match="is broken"):
        assert list(runner.load_results(job.dir)["prompt"]) == ["Prompt 0 says", "Prompt 1 says"]
    (job.dir / "prompts.parquet").write_bytes(original[0])  # (as `runner repair` writes it again)
    run_job(job, gpt2_engine, echo=None)
    assert list(runner.load_results(job.dir)["prompt"]) == [f"Prompt {i} says" for i in range(4)]


def test_a_torn_read_of_a_units_rows_is_read_again_not_a_broken_job(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A block of prompts.parquet that reads back other than it hashed once (a torn read on a network mount),
    the file whole and sound when hashed again: the unit's rows are read once more and the job carries on."""
    rows = [{"id": f"r{i}", "prompt": f"Prompt {i} says"} for i in range(4)]
    job = create_job(write_jsonl(tmp_path / "a.jsonl", rows), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a",
                     unit_rows=2)  # fmt: skip
    real, torn = runner.storage.CheckedFile._block, []

    def block(self, i):
        if not torn:
            torn.append(i)
            raise runner.storage.ChangedUnderfoot("torn")
        return real(self, i)

    monkeypatch.setattr(runner.storage.CheckedFile, "_block", block)
    run_job(job, gpt2_engine, echo=None)
    assert torn and job_status(job).state == "completed"
    assert list(runner.load_results(job.dir)["prompt"]) == [r["prompt"] for r in rows]


def tear_each_shards_first_read(monkeypatch) -> list[str]:
    """storage.read_bytes returns each shard's bytes with one flipped the first time it is read (a torn read on
    a network mount), whole after; the names torn are listed."""
    real, torn = runner.storage.read_bytes, []

    def read_bytes(path):
        data = real(path)
        if "/shards/" in str(path) and str(path) not in torn:
            torn.append(str(path))
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    monkeypatch.setattr(runner.storage, "read_bytes", read_bytes)
    return torn


def test_a_torn_read_of_a_sound_shard_is_read_again_not_quarantined(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A shard read back other than it is, once (a torn read on a network mount): the worker took its sound
    commit for damage, moved it to quarantine/ and computed its rows again, and an export left its rows out."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a",
                     unit_rows=2)  # fmt: skip
    run_job(job, gpt2_engine, echo=None)
    expected = runner.load_results(job.dir)
    (job.dir / "verified.json").unlink()
    torn = tear_each_shards_first_read(monkeypatch)
    ledger = jobdir.read_ledger(job, seal=True)
    assert len(torn) == 2 and ledger.bad == [] and len(ledger.commits) == 2
    (job.dir / "verified.json").unlink()
    torn.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runner.load_results(job.dir).equals(expected)
    assert len(torn) == 2 and list((job.dir / "quarantine").iterdir()) == []


def test_a_torn_read_of_a_sound_marker_is_read_again_not_quarantined(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A commit marker read back torn, once (its JSON cut short, or a digit other than it is): the worker took the
    sound commit for damage and quarantined it, and a marker that read as JSON but failed its checksum was kept
    as read for the rest of the process, so no later look could find it sound."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a",
                     unit_rows=2)  # fmt: skip
    run_job(job, gpt2_engine, echo=None)
    real, torn = runner.storage.read_json, []

    def read_json(path):
        if "/done/" in str(path) and str(path) not in torn:
            torn.append(str(path))
            text = pathlib.Path(path).read_text()
            if len(torn) == 2:
                return json.loads(text[:9])  # cut short: ValueError
            return {**json.loads(text), "rows": 3}  # a digit other than it is
        return real(path)

    monkeypatch.setattr(runner.storage, "read_json", read_json)
    ledger = jobdir.read_ledger(job, seal=True)
    assert len(torn) == 2 and ledger.bad == [] and len(ledger.commits) == 2
    assert list((job.dir / "quarantine").iterdir()) == []


def test_a_shard_that_reads_back_damaged_twice_is_still_damage(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "a",
                     unit_rows=2)  # fmt: skip
    run_job(job, gpt2_engine, echo=None)
    (job.dir / "verified.json").unlink()
    shard = sorted((job.dir / "shards").iterdir())[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert jobdir.read_ledger(job).bad == [(shard.stem, "its shard does not match its checksum")]


def test_an_export_of_a_completed_job_whose_listing_missed_a_commit_exits_1(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A job completed before `runner results --to` began; the export's listing of done/ missed a commit (a
    mount that shows files late, its listing catching up meanwhile: NFS's cached directories, Drive between two
    VMs), and the status read after it saw all. It wrote 2 of the 4 rows with exit 0, warning that the job had
    "completed while its results were being read": `runner results J --to f && upload f` uploaded half."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=2)  # fmt: skip
    run_job(job, echo=None)
    real, missed = jobdir.scan, []

    def scan(folder, dirs=False):  # the first listing of done/ misses its last marker
        names = real(folder, dirs)
        if os.path.basename(folder) == "done" and not missed:
            missed.append(names.pop())
        return names

    monkeypatch.setattr(jobdir, "scan", scan)
    result = invoke("--home", runner_home, "results", job.id, "--to", tmp_path / "out.jsonl")
    assert missed and result.exit_code == 1, result.output
    assert "2 of its 4 results" in result.output and "load them again" in result.output, result.output
    assert invoke("--home", runner_home, "results", job.id, "--to", tmp_path / "out.jsonl").exit_code == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_a_checked_file_reads_into_any_writable_buffer(tmp_path):
    """CheckedFile.readinto, as io.RawIOBase's takes it, fills any writable bytes-like object by its bytes (an
    array of ints, a memoryview of signed bytes): it raised ValueError ("lvalue and rvalue have different
    structures"), which `Job.read_prompts` would take for a damaged prompts.parquet."""
    import array

    data = bytes(range(256)) * 64
    path = tmp_path / "f"
    path.write_bytes(data)
    blocks: list[bytes] = []
    runner.storage.file_sha256(path, blocks)
    f = runner.storage.CheckedFile(path, blocks)
    ints = array.array("i", [0] * 4)
    assert f.readinto(ints) == 16 and ints.tobytes() == data[:16]
    signed = bytearray(8)
    assert f.readinto(memoryview(signed).cast("b")) == 8 and bytes(signed) == data[16:24]
    f.close()


def test_a_units_rows_of_a_job_without_a_checksum_are_not_read_against_another_jobs_blocks(
    tmp_path, tiny_gpt2
):
    """The blocks a process hashed of prompts.parquet are kept by path (jobdir._BLOCKS). A job stored before
    its prompts.parquet had a checksum, at a path where this process had hashed another job's file (a notebook
    that ran a job in out/x, then one copied from an older run into out/x): its file was read against the other
    file's blocks, hashed again (nothing to check: no checksum), read so once more, and the sound job was
    broken, "prompts.parquet changed while read"."""
    import dataclasses

    rows = [{"id": f"r{i}", "prompt": f"Prompt {i} says"} for i in range(4)]
    first = create_job(
        write_jsonl(tmp_path / "a.jsonl", rows), tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "x"
    )
    assert jobdir.prompts_problem(first, afresh=True) is None  # a worker's start hash: its blocks kept
    blocks = jobdir._BLOCKS[str(first.dir / "prompts.parquet")]
    other = [{"id": f"o{i}", "prompt": f"Other prompt {i} here, longer"} for i in range(4)]
    second = create_job(write_jsonl(tmp_path / "b.jsonl", other), tiny_gpt2, PARAMS, OPTIONS,
                        job_dir=tmp_path / "y")  # fmt: skip
    (first.dir / "prompts.parquet").write_bytes((second.dir / "prompts.parquet").read_bytes())
    old = Job(first.dir, dataclasses.replace(second.spec, prompts_sha256=None))
    assert jobdir._BLOCKS[str(old.dir / "prompts.parquet")] is blocks
    assert list(old.read_rows(0, 4).column("prompt").to_pylist()) == [r["prompt"] for r in other]


def test_an_export_of_a_job_retried_and_completed_again_while_read_exits_0(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """No fault: a job completed with a row error when `runner results --to` began; `runner retry` and a worker
    computed that row and completed it again while the export read the rows. The export is the job as it stood
    (all its rows then), warned of as for a job completed while read, exit 0: it exited 1 saying "the folder
    listed fewer commits than a second look found (a mount that shows files late?)"."""
    from helpers import completed_with_a_row_error, run_until_done

    from runner import results

    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home,
                     unit_rows=2)  # fmt: skip
    completed_with_a_row_error(job, gpt2_engine, monkeypatch)
    real = results.result_parts

    def read_then_retried(
        job_, *ledger, **kw
    ):  # (an export reads the rows a unit at a time: the retry after the last)
        yield from real(job_, *ledger, **kw)
        jobdir.retry(job)  # meanwhile: `runner retry`, then `runner work` computes r1
        run_until_done(job, gpt2_engine)

    monkeypatch.setattr(results, "result_parts", read_then_retried)
    result = invoke("--home", runner_home, "results", job.id, "--to", tmp_path / "out.jsonl")
    assert result.exit_code == 0 and "completed while its results were being read" in result.output, (
        result.output
    )
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
