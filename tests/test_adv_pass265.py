"""Adversarial pass 265: second reading of pass 259's signals held around a record's create (delivered in the
`finally`, as often as they came) and pass 260's `unreadable` status of one job and results read without the state.

Found, and kept fixed below:
  * `runner watch JOB` (and `runner.watch`) said "no worker is running job J: start one with `runner work ...`"
    and stopped, exit 1, after three polls in a row that could not read the job's folder (a Drive outage of half
    a minute at the default 10 s): an `unreadable` status names no workers, so each such poll was counted as one
    with no live worker, a claim it cannot know (the job's workers on another machine, or in another terminal,
    went on). A poll that does not read now counts neither way; the watch goes on until the folder reads again.
  * A SIGTERM (or SIGHUP) reaching `runner work` just as a record's create without links began to hold signals
    (its handler, raising Terminated, runs as `signal.signal` begins: between holding Ctrl-C and holding
    SIGTERM) left Ctrl-C held for good: the setup was cut off before the `try` that puts handlers back, so a
    Ctrl-C pressed while the finished batches were written (`commit_on_interrupt`: "a second Ctrl-C leaves the
    job as a kill would") went to a list no one reads, as would every later one in a notebook. The handlers are
    now swapped inside the `try`: whichever were, are put back, and what they held is delivered.
  * In a process whose host set its own (C) handler of SIGINT, SIGTERM or SIGHUP before Python started (Python
    embedded: uWSGI's SIGHUP reload, an app with a scripting console), every record created without hard links
    hung for good at full CPU: `signal.signal` gives None for such a handler, and putting None back raises
    TypeError, which the put-back retried forever (it retries what a handler raising meanwhile throws); the host's
    handler was lost besides, Python having no way to set a C handler again. Such a signal is not held now: its
    handler is left as the host set it. (Checked with a 10-line C host: `runner` under it hung in the first
    `_signals_deferred`.)
"""

from __future__ import annotations

import signal

import pytest
from fsfaults import Unreadable
from helpers import reference_run

from runner import EngineOptions, GenerationParams
from runner.jobs import create_job

ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(4)]
PARAMS, OPTIONS = GenerationParams(max_new_tokens=3), EngineOptions(batch_size=2)


@pytest.fixture
def done_job(tmp_path, tiny_gpt2, gpt2_engine, runner_home):
    from runner.scheduler import work

    prompts, _ = reference_run(tmp_path, tiny_gpt2, ROWS, PARAMS, OPTIONS)
    job = create_job(prompts, tiny_gpt2, PARAMS, OPTIONS, home=runner_home, unit_rows=2)
    work(runner_home, engine=gpt2_engine, echo=None)
    return job


def test_watch_through_an_outage_of_several_polls_does_not_say_no_worker_runs_the_job(done_job, runner_home,
                                                                                     monkeypatch):  # fmt: skip
    from runner.background import IDLE_POLLS, watch

    newest = sorted((done_job.dir / "state").glob("*.json"))[-1]
    faults = Unreadable(runner_home, [newest]).install(monkeypatch)
    lines, polls = [], []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == IDLE_POLLS + 2:
            faults.bad.clear()  # the mount serves it again

    final = watch(done_job.dir, runner_home, every=10, echo=lines.append, sleep=sleep)
    assert final.state == "completed", lines
    assert not any("no worker is running" in line for line in lines), lines
    assert len(polls) == IDLE_POLLS + 2


def test_a_sigterm_as_the_signals_begin_to_be_held_leaves_ctrl_c_to_its_handler(monkeypatch):
    from runner import jobdir
    from runner.cli import Terminated, _ctrl_c_stops

    real = signal.signal

    def arriving(sig, handler):  # the SIGTERM comes just as its handler is about to be swapped
        if sig == signal.SIGTERM and getattr(handler, "__module__", None) == jobdir.__name__:
            signal.raise_signal(signal.SIGTERM)
        return real(sig, handler)

    with _ctrl_c_stops() as stop:
        ours = signal.getsignal(signal.SIGINT)
        monkeypatch.setattr(jobdir.signal, "signal", arriving)
        with pytest.raises(Terminated):
            with jobdir._signals_deferred():
                pytest.fail("the body runs with the stop already raised")
        monkeypatch.setattr(jobdir.signal, "signal", real)
        assert signal.getsignal(signal.SIGINT) is ours
        assert stop()
        with pytest.raises(KeyboardInterrupt):  # (the first stop was the SIGTERM: a Ctrl-C now stops at once)
            signal.raise_signal(signal.SIGINT)


def test_a_signal_whose_handler_the_host_set_is_left_to_it(monkeypatch):
    """As Python embedded sees it: SIGHUP's handler was not set from Python (`signal.signal` and `getsignal` say
    None; `signal.signal(SIGHUP, None)` raises TypeError)."""
    from runner import jobdir

    real_signal, real_get = signal.signal, signal.getsignal
    saved = real_get(signal.SIGHUP)
    slot, put_none = {"handler": None}, []

    def host_signal(sig, handler):
        if sig != signal.SIGHUP:
            return real_signal(sig, handler)
        if handler is None:
            put_none.append(1)
            if len(put_none) < 100:  # (then let go: the put-back before the fix retried it forever)
                real_signal(sig, handler)  # TypeError, as Python says it
            return None
        real_signal(sig, handler)
        slot["handler"], old = handler, slot["handler"]
        return old

    monkeypatch.setattr(signal, "signal", host_signal)
    monkeypatch.setattr(
        signal, "getsignal", lambda sig: slot["handler"] if sig == signal.SIGHUP else real_get(sig)
    )
    try:
        with jobdir._signals_deferred():
            pass
        assert not put_none
        assert slot["handler"] is None  # the host's, never replaced
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGHUP, saved)
