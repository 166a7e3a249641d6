"""Adversarial: a worker frozen inside the seal of a unit it takes over (pass 186).

Without hard links a seal (claims/UUUUU-EEEEEEEE.seal.json) is created empty, then filled with the listing its
writer made before. A taker frozen in between (SIGSTOP, a suspended VM) left the empty seal, read as damaged, so
every commit of the old epoch counted: a late commit of the old epoch's worker (frozen itself after its claim
check, before its marker's rename) among them. A worker finding the job's rows all done wrote it completed; then
the taker, continued, filled its seal with the listing it had made before the late commit landed, which left that
commit out: the job, completed, had rows missing (`runner status`: broken). Now a seal found empty is waited
for, then taken over: the frozen writer fills a file no longer at the name. With hard links (the seal linked
into place whole) the same story held already: the finisher seals first, the taker's link fails.

Found too, with hard links: `runner repair` decided the job's state from a read of its commits that sealed
nothing, so a unit taken over during the repair (its taker frozen before its seal) and a late commit landing
meanwhile made it record the job completed, which the taker's seal then undid.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from helpers import ends_exactly_once, taker_frozen_before_its_seal, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobdir import Job, Owner, read_state
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=7)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"s{i}", "prompt": f"The old man said {i}"} for i in range(4)]


def no_links(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("links", [False, True])
def test_a_seal_filled_late_by_a_frozen_taker_never_takes_rows_from_a_completed_job(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, links
):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=tmp_path / "h")
    # worker A does the whole unit in two commits; its second marker is held back: A froze after its claim
    # check, before the marker's rename
    run_job(job, gpt2_engine, echo=None, owner=Owner.me("A"), shard_rows=2)
    ref = runner.load_results(job.dir)
    newest = max((job.dir / "state").iterdir())
    newest.unlink()  # (the completion A wrote: A has not finished yet)
    late = job.dir / "done" / "00000-00000000-0001.json"
    shutil.move(late, tmp_path / "late.json")
    assert read_state(job.dir).state == "queued"

    if not links:
        monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(jobdir, "_LINKS", {})
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.01, 0.02))
    # worker B takes the unit over (A is past its lease) and freezes inside its seal's write: between its create
    # and its fill, or (with links) before its link
    start, release, took = taker_frozen_before_its_seal(job, monkeypatch, "B", 0, at_link=links)
    start()
    seal = job.dir / "claims" / "00000-00000000.seal.json"
    assert (not seal.exists()) if links else seal.stat().st_size == 0
    # A continues: its marker lands, and a worker finds every row done
    shutil.move(tmp_path / "late.json", late)
    run_job(Job.open(job.dir), gpt2_engine, echo=None, owner=Owner.me("C"), shard_rows=2)
    # B continues and fills its seal
    release()
    assert took == [1]
    ends_exactly_once(job.dir, gpt2_engine, ref)


def test_a_repair_as_a_unit_is_taken_over_and_a_late_commit_lands_records_no_completion_a_seal_undoes(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """`runner repair` decided the job's state from a second read of its commits that sealed nothing: a unit
    taken over between its two reads (the taker frozen before its seal) and a superseded worker's late commit
    landing meanwhile counted as done, and repair recorded the job completed; the taker, continued, sealed the
    old epoch with its listing made before that commit, which left it out: the job, completed, had rows
    missing. Repair's state is decided from a sealed read, as a worker's completion is."""
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=tmp_path / "h")
    run_job(job, gpt2_engine, echo=None, owner=Owner.me("A"), shard_rows=2)
    ref = runner.load_results(job.dir)
    max((job.dir / "state").iterdir()).unlink()  # (A has not finished yet)
    late = job.dir / "done" / "00000-00000000-0001.json"
    shutil.move(late, tmp_path / "late.json")
    start, release, _ = taker_frozen_before_its_seal(job, monkeypatch, "B", 0)
    real_read, reads, started = jobdir.read_ledger, [], []

    def read_ledger(j, **kw):
        reads.append(kw.get("seal", False))
        # between repair's sealed read and the next: B takes the unit over, A's late marker lands
        if True in reads[:-1] and not started:
            started.append(start())
            shutil.move(tmp_path / "late.json", late)
        return real_read(j, **kw)

    monkeypatch.setattr(jobdir, "read_ledger", read_ledger)
    runner.repair(job.dir)
    monkeypatch.setattr(jobdir, "read_ledger", real_read)
    assert started
    release()
    ends_exactly_once(job.dir, gpt2_engine, ref)
