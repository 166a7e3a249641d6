"""Adversarial pass 219: a rename into quarantine/ that a Drive-like mount did, then answered with an error (its
reply lost), as `runner repair` sets aside what stands in the wrong place. What was found:

* `runner repair` of a job with a file where one of its folders goes (or a state record copied in from another
  job) failed, "cannot move .../workers: No such file or directory (errno 2)": its move had been
  done, and the retry of the same rename found its source gone. A rename whose reply was lost is done
  (storage.replace), as the rest of the job folder's renames already took it.

Held (every row once, each the reference's, no traceback; sweeps kept out of the suite): a lost reply or a
transient failure at each rename, link, exclusive create, unlink, mkdir and fsync of a worker's run, with and
without hard links; the same in the worker taking over the unit of a worker frozen past its lease, whose late
marker then lands; the same in `runner retry` and `runner repair` of a cancelled job with a flipped byte in a
shard; the wall clock jumping three hours forward or back at each commit of two workers sharing a job.
"""

from __future__ import annotations

import errno
import os

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams, jobdir
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)


def lost_replies_into_quarantine(monkeypatch) -> list[str]:
    """os.replace into quarantine/ (or of quarantine itself, aside): done, then EIO (the mount's reply lost), once
    per destination. Returns the destinations it happened to."""
    real, lost = os.replace, []

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if f"{os.sep}{jobdir.QUARANTINE}" in os.fspath(dst) and os.fspath(dst) not in lost:
            lost.append(os.fspath(dst))
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    return lost


@pytest.mark.parametrize("quarantine", ["a folder", "a file"])
def test_a_move_aside_whose_reply_was_lost_is_done(tmp_path, tiny_gpt2, monkeypatch, quarantine):
    """A file where workers/ goes (and quarantine/ a file too: it moves aside first): `runner repair` moves it
    into quarantine/, the mount losing each move's reply."""
    rows = [{"id": f"r{i}", "prompt": f"Hello {i}"} for i in range(3)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, PARAMS, job_dir=tmp_path / "job")
    workers, q = job.dir / jobdir.WORKERS, job.dir / jobdir.QUARANTINE
    for folder in (workers, q) if quarantine == "a file" else (workers,):
        if folder.is_dir():
            folder.rmdir()
        folder.write_text("not a folder\n")
    lost = lost_replies_into_quarantine(monkeypatch)
    runner.repair(job.dir)
    monkeypatch.undo()
    assert len(lost) == (2 if quarantine == "a file" else 1), lost
    assert not workers.is_file() and q.is_dir() and runner.status(job.dir).state == "queued"
    assert [p.name for p in q.iterdir() if p.name.endswith("-workers")]
