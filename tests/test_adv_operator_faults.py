"""Operator commands (`runner status`, `cancel`, `retry`, `repair`, `results --to`) under faults that combine
(adversarial pass 198): a command killed half way, then the next one meeting a transient read error. What was
found:

* without hard links, a `runner cancel` or `runner retry` killed between the create and the fill of its state
  record leaves it empty: after STATE_PATIENCE_SECONDS the job is broken and `runner repair` brings it back. One
  EIO on the stat that dates that record read as "made just now": `runner cancel` and `runner retry` said "a
  change of state is being written ... try again in a moment", `runner status` showed the state below it as
  standing ("cancelled - a change of state is being written (0 s ago)"), and `runner results --to` exported the
  job as cancelled (exit 0), where each says the job is broken and names `runner repair` without the EIO.
"""

import errno
import os

import pytest
from fsfaults import FsFaults
from helpers import invoke, write_jsonl

from runner import EngineOptions, GenerationParams, jobdir
from runner.jobs import create_job

PARAMS = GenerationParams(max_new_tokens=3, seed=1)
OPTIONS = EngineOptions(batch_size=2)
ROWS = [{"id": f"r{i}", "prompt": f"the old man said {i}"} for i in range(4)]


def _no_links(monkeypatch) -> None:
    """This process on a file system without hard links (as Colab's Drive mount), the faults' link too."""
    import fsfaults

    def link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(jobdir, "_LINKS", {})
    monkeypatch.setitem(fsfaults.REAL, "link", link)
    monkeypatch.setattr(os, "link", link)


@pytest.fixture
def killed_half_way(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """A cancelled job whose `runner retry` was killed, without hard links, between the create and the fill of
    its record: an empty newest record, made long ago (the job is broken, `runner repair` mends it)."""
    _no_links(monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, PARAMS, OPTIONS, home=runner_home)
    job.set_state(jobdir.JobState.CANCELLED)
    empty = job.dir / jobdir.STATES / jobdir.record_name(jobdir.newest_state_seq(job.dir) + 1)
    empty.write_bytes(b"")
    os.utime(empty, (1, 1))
    return job


COMMANDS = {
    "status": (("status",), 0, "broken - state/00000002.json is damaged (it is empty"),
    "cancel": (("cancel",), 1, "is broken (state/00000002.json is damaged (it is empty"),
    "retry": (("retry",), 1, "is broken (state/00000002.json is damaged (it is empty"),
    "export": (("results", "--to", "OUT"), 1, "is broken (state/00000002.json is damaged (it is empty"),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_empty_record_left_long_ago_is_not_taken_for_one_being_written_over_one_eio(
    command, killed_half_way, tmp_path, runner_home, monkeypatch
):
    """Every first read, listing and stat in state/ fails once (EIO or ENOTCONN), the next succeeds: each
    command says what it says without the faults, the job broken and `runner repair` named."""
    job = killed_half_way
    args, code, says = COMMANDS[command]
    args = [tmp_path / "o.parquet" if a == "OUT" else a for a in args]
    args.insert(1, job.id)
    FsFaults(job.dir, eio=1.0, eio_dirs=("state",), retry_delays=[0.0] * 4).install(monkeypatch)
    result = invoke("--home", runner_home, *args)
    assert result.exit_code == code and says in result.output, result.output
    assert "being written" not in result.output and "runner repair" in result.output, result.output
    monkeypatch.undo()
    _no_links(monkeypatch)
    result = invoke("--home", runner_home, "repair", job.id)
    assert result.exit_code == 0 and "state broken (" in result.output and "-> cancelled" in result.output, (
        result.output
    )
