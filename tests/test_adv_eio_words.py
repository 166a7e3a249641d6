"""Adversarial (pass 189): a transient read error in the look that decides whether a command's word stood.

Without hard links a state record is created empty, then filled. A command frozen in between is passed over by a
`runner repair` (blind over its empty record); once filled, its word stands, and whether it still stands for the
records written over the repair's since is decided by their times (`_stands_over_blind`, pass 76). A transient
error there (EIO on a network mount) was read as "our word does not stand": the command decided again over the
records written since and applied its word a second time (a retry re-queued a job cancelled after it; a cancel
undid a retry made after it).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import pytest
from helpers import write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, temperature=1.0, seed=5)
OPTIONS = EngineOptions(batch_size=4)
ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(4)]


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    return create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)


def _no_links(monkeypatch):
    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


def _eio_once_on_records(monkeypatch, armed: threading.Event) -> list:
    """Once `armed` is set, the first os.stat jobdir makes of a state record in the thread named "slow" fails with EIO (a
    network mount's hiccup); the list returned gets the paths it failed."""
    real_stat, failed = os.stat, []

    def stat(path, *a, **k):
        p = os.fspath(path)
        name = os.path.basename(p)
        hit = jobdir._RECORD.match(name) and os.path.basename(os.path.dirname(p)) == jobdir.STATES
        # (a stat of jobdir's own, not one storage's reads make and retry)
        hit = hit and sys._getframe(1).f_globals.get("__name__") == jobdir.__name__
        if hit and armed.is_set() and not failed and threading.current_thread().name == "slow":
            failed.append(p)
            raise OSError(errno.EIO, "Input/output error", p)
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    return failed


# (the slow command, the state before it, what the job reads once its word stands, the user's command after it)
STORIES = [
    ("retry", "cancelled", "queued", "cancel"),  # the user's cancel undone by the retry applied again
    ("cancel", "queued", "cancelled", "retry"),  # the user's retry undone by the cancel applied again
]


@pytest.mark.parametrize(("slow_cmd", "before", "stood", "user_cmd"), STORIES)
def test_a_transient_error_never_has_a_slow_command_undo_the_one_made_after_its_word_stood(
    job, monkeypatch, slow_cmd, before, stood, user_cmd
):
    """As pass 76: a command filled late under a repair's blind record is the job's word; the user's next command
    is recorded over it; the slow one, finding itself passed over, looks whether its word stood for that command
    (it came after its fill). An EIO there read as "it did not": the slow command decided again over the user's
    and applied its word a second time (a retry re-queued a job cancelled after it, a cancel undid a retry)."""
    _no_links(monkeypatch)
    if before == "cancelled":
        runner.cancel(job.dir)
    frozen, wake_fill, at_check, wake_check = (threading.Event() for _ in range(4))
    real_point, real_passed, said = jobdir.fault_point, jobdir._passed_over, []

    def fault_point(name):
        if name == "after_create" and threading.current_thread().name == "slow" and not frozen.is_set():
            frozen.set()
            assert wake_fill.wait(60)  # the slow command's record created, still empty
        return real_point(name)

    def passed_over(folder, seq, token):
        if threading.current_thread().name == "slow" and not at_check.is_set():
            at_check.set()
            assert wake_check.wait(60)  # filled; about to look whether it was passed over
        return real_passed(folder, seq, token)

    monkeypatch.setattr(jobdir, "fault_point", fault_point)
    monkeypatch.setattr(jobdir, "_passed_over", passed_over)
    failed = _eio_once_on_records(monkeypatch, wake_check)
    command = getattr(runner, slow_cmd)
    slow = threading.Thread(target=lambda: said.append(command(job.dir)), name="slow", daemon=True)
    slow.start()
    assert frozen.wait(60)
    assert runner.repair(job.dir).state_now == before  # blind over the slow command's empty record
    wake_fill.set()
    assert at_check.wait(60)
    assert runner.status(job.dir).state == stood  # the slow command's word stands
    getattr(runner, user_cmd)(job.dir)  # the user's command, told it is done
    wake_check.set()
    slow.join(60)
    assert failed, "the EIO was not met"
    assert len(said) == 1  # the slow command returned: done
    assert job.state().state == before
