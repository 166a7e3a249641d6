"""The job home misbehaving under a whole job: slow, renames that are really copy + delete (killed half way),
and writes that fail for good. Every row ends up in the results exactly once; a shard never counts twice."""

import builtins
import errno
import io
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsfaults import FsFaults, command
from helpers import assert_exactly_once, reference_run
from workers import run_worker

from runner import EngineOptions, GenerationParams
from runner.job_status import job_status
from runner.jobdir import read_state
from runner.jobs import Job, create_job
from runner.results import ORDER, valid_shards
from runner.scheduler import work

slow = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not

N_ROWS = 6
PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, seed=11)
OPTIONS = EngineOptions(batch_size=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(N_ROWS)]
    return reference_run(tmp_path_factory.mktemp("fs"), tiny_gpt2, rows, PARAMS, OPTIONS)


@pytest.fixture
def job(tmp_path, reference, tiny_gpt2):
    return create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "home" / "job")


def counted_keys(job_dir):
    """(row, sample) of every row in counted shards, duplicates kept (load_results would drop them)."""
    keys = []
    for shard in valid_shards(job_dir):
        t = pq.read_table(shard, columns=[ORDER, "sample"])
        keys += zip(t.column(ORDER).to_pylist(), t.column("sample").to_pylist(), strict=True)
    return keys


def assert_counted_once(job_dir, ref, complete=True):
    """No row in two counted shards, the markers agree, and the results are exactly once (helpers)."""
    keys = counted_keys(job_dir)
    assert len(keys) == len(set(keys)), f"a row counts twice: {sorted(keys)}"
    assert job_status(Job.open(job_dir)).done == len(keys)  # what the markers say agrees
    assert assert_exactly_once(job_dir, ref, complete) == len(keys)
    return len(keys)


@slow
def test_a_slow_job_home_still_completes_every_row_once(job, reference, gpt2_engine, monkeypatch):
    home = job.dir.parent
    faults = FsFaults(home, slow=0.25).install(monkeypatch)
    started = time.monotonic()
    # A short lease: its heartbeat renews it every second through the slow mount while the job runs.
    summaries = work(home, engine=gpt2_engine, echo=None, lease_ttl=4, shard_rows=1000)
    took = time.monotonic() - started
    monkeypatch.undo()
    assert summaries[0].finished and read_state(job.dir).state == "completed"
    assert faults.slowed >= 20 and took >= 20 * 0.25  # it really was slow (the heartbeat's writes overlap)
    assert assert_counted_once(job.dir, reference[1]) == N_ROWS


@slow
@pytest.mark.parametrize(
    ("folder", "at"),
    [
        ("shards", "after_copy"),  # a whole shard under its final name, no marker: must not count
        ("done", "after_copy"),  # a whole marker, the temp marker still beside it: must count once
        ("done", "mid_copy"),  # half a marker under its final name: must not count
    ],
)
def test_a_rename_done_as_copy_and_delete_killed_half_way(
    job, reference, gpt2_engine, monkeypatch, folder, at
):
    home = job.dir.parent
    faults = FsFaults(home, copy_rename=True, kill={"dir": folder, "nth": 2, "at": at})
    prefix, env = command(faults)
    code, out = run_worker(home, prefix=prefix, env_extra=env)
    assert code == -signal.SIGKILL, out
    (left,) = [p for p in (job.dir / folder).iterdir() if p.name.startswith(".")]  # never deleted
    before = assert_counted_once(job.dir, reference[1], complete=False)
    assert before == (4 if folder == "done" and at == "after_copy" else 2)

    # Later, the worker that resumes deletes the temp file, which nobody has touched for a while; a fresh
    # one (say, of a worker that still writes) stays.
    os.utime(left, (time.time() - 3600,) * 2)
    fresh = job.dir / folder / ".00042-beef.parquet.0123abcd.tmp"
    fresh.write_bytes(b"still being written")
    FsFaults(home, copy_rename=True).install(monkeypatch)
    summaries = work(home, engine=gpt2_engine, echo=None)
    assert summaries[0].finished and summaries[0].generated == N_ROWS - before
    assert assert_counted_once(job.dir, reference[1]) == N_ROWS
    assert not left.exists() and fresh.exists()


@slow
@pytest.mark.parametrize(
    ("fail", "fail_from", "message"),
    [
        ("EROFS", None, "Read-only file system (errno 30)"),  # the mount is read-only from the start
        ("ENOSPC", "done", "No space left on device (errno 28)"),  # full after the first shard
    ],
)
def test_a_job_home_that_cannot_be_written_stops_the_worker_cleanly(
    job, reference, gpt2_engine, fail, fail_from, message
):
    home = job.dir.parent
    prefix, env = command(FsFaults(home, fail=fail, fail_from=fail_from))
    code, out = run_worker(home, prefix=prefix, env_extra=env)
    assert code == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert (
        last.startswith("Error: stopped: the job home cannot be written (cannot write ") and message in last
    )
    assert last.endswith(
        f"job {job.id} is consistent and resumes with the next `runner work` (or the same `runner run` again)"
    ), out
    done = assert_counted_once(job.dir, reference[1], complete=False)
    assert done == (2 if fail_from else 0)

    summaries = work(home, engine=gpt2_engine, echo=None)  # the mount is back
    assert summaries[0].finished and summaries[0].generated == N_ROWS - done
    assert read_state(job.dir).state == "completed"
    assert assert_counted_once(job.dir, reference[1]) == N_ROWS


@slow
def test_a_full_local_temp_folder_is_named_as_such_and_the_job_resumes(
    job, reference, gpt2_engine, monkeypatch
):
    """Shards are written on this machine's temp folder first: that disk full (pyarrow's error names no file)
    said "cannot read or write the job home" and nothing of the job's state (adversarial pass 18)."""
    import pyarrow.parquet as parquet

    from runner.storage import StorageError

    real, writes = parquet.write_table, []

    def full_after_one(table, where, **kwargs):
        writes.append(where)
        if len(writes) > 1:
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(table, where, **kwargs)

    monkeypatch.setattr(parquet, "write_table", full_after_one)
    home = job.dir.parent
    with pytest.raises(StorageError) as stopped:
        work(home, engine=gpt2_engine, echo=None, shard_rows=2)
    said = str(stopped.value)
    assert said.startswith(
        "stopped: this machine's temp folder cannot be written (cannot write a results shard in "
    )
    assert "No space left on device" in said and "TMPDIR" in said and f"job {job.id} is consistent" in said
    monkeypatch.undo()
    assert work(home, engine=gpt2_engine, echo=None)[0].finished
    assert assert_exactly_once(job.dir, reference[1]) == N_ROWS


# --- the transient read errors themselves (in-process, no model) ----------------------------------------------

# every way runner reads the job folder that the faults reach, beside open / listdir / scandir (already there):
# name -> (the kind its eio_log line says, a call on a path)
READS = {
    "builtins.open": ("read", lambda p: builtins.open(p, "rb").close()),
    "io.open": ("read", lambda p: io.open(p, encoding="utf-8").close()),  # noqa: UP020 (pathlib calls io.open)
    "Path.read_bytes": ("read", lambda p: Path(p).read_bytes()),
    "os.stat": ("stat", lambda p: os.stat(p)),  # (looked up at the call: the patched one)
    "os.lstat": ("stat", lambda p: os.lstat(p)),
    "os.path.getsize": ("stat", lambda p: os.path.getsize(p)),
    "Path.stat": ("stat", lambda p: Path(p).stat()),
    "Path.exists": ("stat", lambda p: Path(p).exists()),
    "Path.is_file": ("stat", lambda p: Path(p).is_file()),
    "pyarrow.OSFile": ("read", lambda p: pa.OSFile(str(p)).close()),
    "pyarrow.OSFile(bytes)": ("read", lambda p: pa.OSFile(os.fsencode(p), "rb").close()),
    "pyarrow.memory_map": ("read", lambda p: pa.memory_map(str(p)).close()),
    "pq.read_table": ("read", lambda p: pq.read_table(p)),
    "pq.ParquetFile": ("read", lambda p: pq.ParquetFile(p).read()),
    "pq.read_schema": ("read", lambda p: pq.read_schema(p)),
    "pq.read_metadata": ("read", lambda p: pq.read_metadata(p)),
}


@pytest.fixture
def three_files(tmp_path):
    """The same small Parquet file in the job's done/ (an eio dir), in its state/ (not one), and outside it."""
    paths = [tmp_path / "home" / "job" / "done" / "a.parquet", tmp_path / "home" / "job" / "state" / "a.parquet",
             tmp_path / "other" / "done" / "a.parquet"]  # fmt: skip
    for path in paths:
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    return paths


def eio_faults(tmp_path, monkeypatch) -> tuple[FsFaults, Path]:
    """Every first access in the job's done/ fails (eio 1.0), logged to the returned file."""
    log = tmp_path / "eio.log"
    faults = FsFaults(tmp_path / "home" / "job", eio=1.0, eio_dirs=("done",), eio_log=str(log))
    return faults.install(monkeypatch), log


@pytest.mark.parametrize("read", READS)
def test_each_read_fails_once_then_succeeds_and_only_in_an_eio_dir(three_files, tmp_path, monkeypatch, read):
    """Each failure is transient (the next access of its kind succeeds) and one per call (what the patched call
    does itself, pyarrow's own opens, realpath's lstat, is not failed again); outside the job folder, or in a
    sub-folder not in eio_dirs, nothing ever fails."""
    faults, log = eio_faults(tmp_path, monkeypatch)
    ours, not_eio, outside = three_files
    kind, call = READS[read]
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            call(ours)
        assert failed.value.errno in (errno.EIO, errno.ENOTCONN)
        call(ours)  # the retry
    for path in (not_eio, outside, str(not_eio), str(outside)):
        for _ in range(3):
            call(path)
    monkeypatch.undo()
    lines = [line.split() for line in log.read_text().splitlines()]
    assert faults.eio_count == len(lines) == 3
    assert all(code in ("EIO", "ENOTCONN") and rest == [kind, str(ours)] for code, *rest in lines), lines


def test_a_missing_file_fails_once_too_then_is_missing(tmp_path, monkeypatch):
    """An existence check (a stat expecting FileNotFoundError) gets its transient error like any stat; the retry
    says the file is missing. Writes through builtins.open are not failed; ParquetFile is still a class."""
    eio_faults(tmp_path, monkeypatch)
    done = tmp_path / "home" / "job" / "done"
    done.mkdir(parents=True)
    with pytest.raises(OSError) as failed:
        os.stat(done / "none.json")
    assert failed.value.errno in (errno.EIO, errno.ENOTCONN)
    with pytest.raises(FileNotFoundError):
        os.stat(done / "none.json")
    with builtins.open(done / "new.json", "w") as f:  # (its first read fails, not its write)
        f.write("{}")
    assert issubclass(pq.ParquetFile, pq.core.ParquetFile)


def test_stats_have_a_chance_of_their_own(three_files, tmp_path, monkeypatch):
    """`eio_stat` (0 here) for stats, `eio` (1) for the rest: the reads still fail once each, no stat does."""
    faults = FsFaults(tmp_path / "home" / "job", eio=1.0, eio_stat=0.0, eio_dirs=("done",)).install(
        monkeypatch
    )
    ours = three_files[0]
    for _ in range(3):
        assert os.stat(ours) and Path(ours).exists() and os.path.getsize(ours)
    with pytest.raises(OSError):
        pq.read_metadata(ours)
    assert pq.read_metadata(ours).num_rows == 3
    assert faults.eio_count == 1
