"""Adversarial (pass 189): `runner repair` letting a completion stand from a read of the commits that seals nothing.

Repair decides the job's state from a sealed read (pass 186). But a completion recorded while it ran (a worker's,
decided over the commits before repair set a damaged one aside) was kept if a second read, unsealed, found every
row done (`_settle_state`); and where links are missing, a completion filled late under repair's own record was
recorded again on the same unsealed read (`_late_word`). A unit taken over meanwhile, its taker frozen before its
seal, and a superseded worker's late commit landing then: that read counted the late commit for the rows of the
one set aside, the completion stood, and the taker's seal, made from its older listing, left the commit out: the
job, completed, had rows missing.

The story: worker A did the unit in two commits (rows 0-1, rows 2-3). Worker B, on another machine where A's
second shard had not arrived yet (left in place: in transit), took the unit over and computed rows 2-3 again; B
froze after its claim check, before its marker's rename. A finisher W read every row done (A's commits) and was
about to record the job completed; A's second shard then rotted on disk, and the user ran `runner repair`. While
repair ran: W recorded its completion, worker T took the unit over from B (frozen before its seal), and B's late
commit landed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading

import pytest
from helpers import ends_exactly_once, taker_frozen_before_its_seal, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobdir import Owner, read_state
from runner.jobs import create_job
from runner.worker import run_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=7)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"s{i}", "prompt": f"The old man said {i}"} for i in range(4)]


def no_links(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")


def _late_commit_of_b(job, tmp_path):
    """B's epoch 1 of unit 0 and its commit of rows 2-3 (as A's second, the same results), held back in
    `tmp_path` (B is frozen before its rename); returns (where it waits, where it lands)."""
    assert jobdir.take_unit(job, 0, Owner.me("B"), 0) == 1
    a = job.dir / "done" / "00000-00000000-0001.json"
    marker = json.loads(a.read_text())
    del marker["check"]
    marker.update(epoch=1, seq=0, shard="00000-00000001-0000.parquet", worker=Owner.me("B").worker)
    marker["check"] = jobdir.marker_checksum(marker)
    held = {tmp_path / "late.json": job.dir / "done" / "00000-00000001-0000.json",
            tmp_path / "late.parquet": job.dir / "shards" / "00000-00000001-0000.parquet"}  # fmt: skip
    (tmp_path / "late.json").write_text(json.dumps(marker))
    shutil.copy(job.dir / "shards" / "00000-00000000-0001.parquet", tmp_path / "late.parquet")
    return held


def _rot(path) -> None:
    """A byte of the file changed in place (its size kept): found by a verification afresh only."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _setup(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, links):
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=tmp_path / "h")
    run_job(job, gpt2_engine, echo=None, owner=Owner.me("A"), shard_rows=2)
    ref = runner.load_results(job.dir)
    max((job.dir / "state").iterdir()).unlink()  # (the completion A wrote: W writes it here)
    if not links:
        monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(jobdir, "_LINKS", {})
    monkeypatch.setattr(jobdir, "ADOPT_PAUSES", (0.01, 0.02))
    held = _late_commit_of_b(job, tmp_path)
    # W: every row done, read sealed as a worker's completion is, over the state it read before
    w_read = read_state(job.dir)
    assert jobdir.job_progress(job, jobdir.read_ledger(job, seal=True)).complete
    _rot(job.dir / "shards" / "00000-00000000-0001.parquet")
    return job, ref, held, w_read


@pytest.mark.parametrize("links", [False, True])
def test_a_completion_recorded_during_a_repair_stands_only_on_a_sealed_read(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, links
):
    """`_settle_state`: W's completion, recorded after repair read the state, was kept on an unsealed read."""
    job, ref, held, w_read = _setup(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, links)
    start, release, _ = taker_frozen_before_its_seal(job, monkeypatch, "T", 1)
    real_settle = jobdir._settle_state

    def settle_state(*args, **kwargs):
        # repair has read the commits (A's second set aside) and decided: W records, T takes over, B lands
        assert jobdir.write_completed(job.dir, w_read) is not None
        start()
        for src, dst in held.items():
            shutil.move(src, dst)
        return real_settle(*args, **kwargs)

    monkeypatch.setattr(jobdir, "_settle_state", settle_state)
    report = runner.repair(job.dir)
    monkeypatch.setattr(jobdir, "_settle_state", real_settle)
    assert report.quarantined and report.quarantined[0][0] == "00000-00000000-0001"
    release()
    ends_exactly_once(job.dir, gpt2_engine, ref)


def test_without_links_a_completion_filled_late_under_a_repair_is_recorded_again_only_on_a_sealed_read(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """`_late_word`: W froze between its completion record's create and its fill (no hard links); repair decided
    blind over the empty record (rows 2-3 set aside: queued), then found it filled with W's completion and
    recorded it again on an unsealed read."""
    job, ref, held, w_read = _setup(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch, links=False)
    start, release, _ = taker_frozen_before_its_seal(job, monkeypatch, "T", 1)
    frozen, thaw = threading.Event(), threading.Event()
    real_point, real_late = jobdir.fault_point, jobdir._late_word

    def fault_point(name):
        if name == "after_create" and threading.current_thread().name == "W" and not frozen.is_set():
            frozen.set()
            assert thaw.wait(60)  # W's completion record created, still empty
        return real_point(name)

    def late_word(*args, **kwargs):
        # repair has recorded queued blind over W's empty record: W fills it, T takes over, B's commit lands
        thaw.set()
        w.join(60)
        start()
        for src, dst in held.items():
            shutil.move(src, dst)
        return real_late(*args, **kwargs)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    monkeypatch.setattr(jobdir, "_late_word", late_word)
    w = threading.Thread(target=lambda: jobdir.write_completed(job.dir, w_read), name="W", daemon=True)
    w.start()
    assert frozen.wait(60)
    report = runner.repair(job.dir)
    monkeypatch.setattr(jobdir, "_late_word", real_late)
    assert report.quarantined and report.quarantined[0][0] == "00000-00000000-0001"
    assert thaw.is_set()
    release()
    ends_exactly_once(job.dir, gpt2_engine, ref)
