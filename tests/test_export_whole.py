"""`runner results JOB --to FILE` writes FILE whole: an export that stops part way (disk or Drive quota full,
the VM killed, Ctrl-C) leaves the complete export made earlier, never half of one under the final name, and
says which file it could not write. Found by an adversarial pass (pandas wrote straight to the target). A full
disk is a file-size limit here (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG)."""

import resource
import signal
import subprocess
import sys

import pytest
from helpers import write_jsonl
from workers import ROOT, worker_env

from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.worker import run_job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_export_that_stops_part_way_leaves_no_torn_file(
    suffix, tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times " * 4} for i in range(64)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=8, seed=1),
                     EngineOptions(batch_size=16), home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    out = tmp_path / f"out{suffix}"
    cmd = [sys.executable, "-m", "runner", "--home", str(runner_home), "results", job.id, "--to", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    good = out.read_bytes()
    limit = len(good) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    again = subprocess.run(
        cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT, preexec_fn=small_disk
    )
    assert again.returncode != 0 and "Traceback" not in again.stdout + again.stderr, again.stderr
    # the export failed: the earlier complete file must stand (or no file), never a torn one
    assert out.read_bytes() == good, (len(out.read_bytes()), len(good), again.stderr)
    assert f"cannot write {out}" in again.stderr and "job home" not in again.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left


def _finished_job_and_target(tmp_path, tiny_gpt2, gpt2_engine):
    """A finished job of three rows, and out/answers.jsonl to export it to (its folder made, nothing in it)."""
    rows = [{"id": f"r{i}", "prompt": f"Hello {i}"} for i in range(3)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    out = tmp_path / "out" / "answers.jsonl"
    out.parent.mkdir()
    return job, out


@pytest.mark.parametrize("fmt", ["table", "openai"])
def test_an_export_tidies_what_a_killed_export_of_the_same_file_left(fmt, tmp_path, tiny_gpt2, gpt2_engine,
                                                                     monkeypatch):  # fmt: skip
    """A SIGKILL mid-export leaves its temp file beside the target; the next export of that file removes the
    ones untouched for 10 minutes (not a live export's, not another file's), and flushes its own file to the
    disk before it takes the name."""
    import os
    import time

    import runner
    from runner import storage

    job, out = _finished_job_and_target(tmp_path, tiny_gpt2, gpt2_engine)
    stale, live = out.parent / ".answers.jsonl.0badf00d.tmp", out.parent / ".answers.jsonl.1234abcd.tmp"
    stale_errors = out.parent / ".answers.errors.jsonl.0badf00d.tmp"
    other = out.parent / ".notes.jsonl.0badf00d.tmp"
    for path in (stale, live, stale_errors, other):
        path.write_text("half of an export")
    old = time.time() - 3600
    for path in (stale, stale_errors, other):
        os.utime(path, (old, old))
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd)
    )
    runner.export_results(job.dir, out, format=fmt)
    assert not stale.exists() and live.exists() and other.exists()
    assert not stale_errors.exists() or fmt == "table"
    assert any(storage.is_temp_name(os.path.basename(p)) and ".answers.jsonl." in p for p in synced), synced


def test_an_export_whose_rename_reply_was_lost_is_written(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    """The export's file is in place though the mount lost the rename's reply: said written, not 'cannot write'
    (pass 49); and one transient error is retried."""
    import errno
    import os

    import runner
    from runner import storage

    rows = [{"id": f"r{i}", "prompt": f"Hello {i}"} for i in range(3)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    real, calls = os.replace, []

    def lost_once(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            real(src, dst)
            raise OSError(errno.EIO, "Input/output error")
        if len(calls) == 3:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", lost_once)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    for name in ("a.jsonl", "b.csv"):
        assert runner.export_results(job.dir, tmp_path / name).rows == 3
        assert len((tmp_path / name).read_text().splitlines()) >= 3
    assert len(calls) == 4


def test_an_export_whose_folder_reads_after_a_transient_error_is_written(tmp_path, monkeypatch):
    """Pass 93: one EIO looking at the output's folder (a mount's hiccup) failed a finished run-batch; the job
    folder's reads are retried, and so is this one."""
    import errno
    import os

    from runner import storage
    from runner.results import check_export_pair

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    real, failed = os.stat, []

    def stat(path, *a, **k):
        if os.fspath(path) == os.fspath(tmp_path) and not failed:
            failed.append(path)
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    check_export_pair(tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl")
    assert failed


@pytest.mark.parametrize(("fmt", "point"), [("table", "before_replace"), ("openai", "mid_write")])
def test_a_killed_exports_temp_file_goes_at_the_next_export_of_that_file(fmt, point, tmp_path, tiny_gpt2,
                                                                         gpt2_engine):  # fmt: skip
    """An export SIGKILLed with its file half written leaves a temp file that names its process; the next export
    of that file removes it at once (its process is gone), not 10 minutes later. A live writer's stays."""
    import os

    import runner
    from runner import storage

    job, out = _finished_job_and_target(tmp_path, tiny_gpt2, gpt2_engine)
    cmd = [sys.executable, "-m", "runner", "results", str(job.dir), "--to", str(out), "--format", fmt]
    killed = subprocess.run(
        cmd, capture_output=True, text=True, env=worker_env({"RUNNER_FAULT": point}), cwd=ROOT
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert left and all(f".{os.getpid()}-" not in p.name for p in left), left
    live = out.parent / f".answers.jsonl.{os.getpid()}-{storage.namespace_tag()}.0badf00d.tmp"  # this one's
    live.write_text("a live export's half")
    runner.export_results(job.dir, out, format=fmt)
    assert sorted(p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")) == [live.name]
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("fmt", ["table", "openai"])
def test_an_export_killed_in_a_copy_then_delete_rename_leaves_its_whole_copy_beside_and_the_next_export_mends_it(
    fmt, tmp_path, tiny_gpt2, gpt2_engine
):
    """A mount whose rename copies the bytes, then deletes the source (some FUSE mounts): the rename into the
    file's name is the one step no writer can make atomic there, and a kill during its copy leaves the file cut
    short under its name (which, cut at a line's end, reads as a whole JSONL or CSV file). What a reader is told
    (README): the export exits killed, not 0, and the whole copy, the temp file, stands beside it; the next
    export of that file removes the temp and writes the file whole."""
    from fsfaults import FsFaults, command

    import runner

    job, out = _finished_job_and_target(tmp_path, tiny_gpt2, gpt2_engine)
    # (openai: the errors file is renamed first, the output last)
    faults = FsFaults(
        out.parent, copy_rename=True, kill={"dir": "out", "nth": 1 + (fmt == "openai"), "at": "mid_copy"}
    )
    prefix, env = command(faults)
    cmd = [sys.executable, *prefix, "results", str(job.dir), "--to", str(out), "--format", fmt]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(env), cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (whole,) = [
        p for p in out.parent.iterdir() if p.name.startswith(".answers.jsonl.") and p.name.endswith(".tmp")
    ]
    cut, kept = out.read_bytes(), whole.read_bytes()
    assert 0 < len(cut) < len(kept) and kept.startswith(cut)
    runner.export_results(job.dir, out, format=fmt)
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert out.read_bytes() == kept and len(kept.splitlines()) == 3
