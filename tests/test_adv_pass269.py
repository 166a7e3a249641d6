"""Adversarial pass 269: `runner status`, `runner watch` and `runner.status(JOB)` on a job home kept on a flaky
mount (Google Drive from Colab: transient EIO, stale handles, slow reads). Retries are counted in attempts (the
faults' own count, retry delays of 0 s), never timed.

Found, and kept fixed below:
  * `runner status night1` (a job found by its name) waited through the retries (about a minute a file, twice:
    job.json, then its backup) for every other job of the home whose job.json Drive could not serve: finding the
    name read every job's spec through the retries. Each is now read in one try; one that did not read is waited
    for only where the job sought may be it (no job that read holds the name, or the name's claim in .names does
    not say which does).
  * A job whose job.json does not read was waited for through the retries 2 to 3 times by one `runner status`
    (found by name: 3 times, and its backup 3 times: six minutes of "the file system is not answering"), each
    read of it starting the retries afresh (to find it, to open it, to show its id, name and model). Within one
    look (`runner.status`, each poll of `runner watch`) a file that failed through the retries is tried once more
    at most, and the unreadable job's row shows what its files say at once.
  * `runner status ID` (or NAME) failed, exit 1, "Error: cannot read .../job.json", where the stat of its job.json
    did not answer through the retries (Drive's stale handle), while `runner status` listed the job `unreadable`;
    `runner watch ID` ended so at its first poll, though a poll that does not read is meant to count neither way.
    A folder named by the id, or by the name's claim, whose job.json does not say what it is for now is the job
    now, for its opener to say `unreadable`, as the home's listing does.
  * `runner watch NAME` ended, exit 1, "Error: cannot list HOME" at a poll where the home's listing failed through
    the retries (finding the job by its name lists the home): now an `unreadable` poll, counting neither way.
  * `runner watch JOB` ended with a traceback (OSError: Input/output error) when the home's logs/ folder, where
    it looks for background workers, did not list; on a read-only home (a Drive shared read-only, another user's
    home) it did the same with EROFS as it deleted a gone worker's pid file. The listing goes through the
    retries, a poll where it still fails counts neither way (as a poll whose job does not read), and a pid file
    it cannot delete is left.
  * A symbolic link in the home (`ln -s` of a job folder from elsewhere on Drive) was listed with the id, name
    and model of the job it points to, read through the link that "runner does not follow": that job showed
    twice, once broken; and its line said `runner repair LINK`, which mends the folder it points to and leaves
    the link (a dangling one: "no such folder"); `runner status LINK` said "no job LINK". It is listed under
    its own name, with what to do instead, and named so when looked up.
  * A job whose folder does not read (`unreadable`), or that is broken before its commits are read (no worker
    can run it, a spec copied in), showed DONE/TOTAL 0/0 in the table, `watch` and `runner status --json`
    ("done": 0, "total": 0, "errors": 0), and its report said "0 of 0 done", "0 row errors": a job with no rows,
    none done, no errors, where nothing was counted. Its counts are None now ("?" and "-" in the table, "?" in
    the watch line, null in JSON, "not counted" in the report).
"""

from __future__ import annotations

import json
import os

import pytest
from fsfaults import FsFaults, Unreadable
from helpers import invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, storage
from runner.errors import RunnerError
from runner.jobs import create_job

DELAYS = (0.0,) * 5  # one read through the retries: 6 attempts


class Counted(Unreadable):
    """Unreadable, with each failed attempt counted by (kind, file name)."""

    def __init__(self, root, bad, kinds=("read", "stat", "list")):
        super().__init__(root, bad, kinds)
        self.retry_delays = list(DELAYS)
        self.failed: dict[tuple[str, str], int] = {}

    def _transient(self, path, kind):
        try:
            super()._transient(path, kind)
        except OSError:
            key = (kind, os.path.basename(os.fsdecode(path)))
            self.failed[key] = self.failed.get(key, 0) + 1
            raise


def _job(tmp_path, model, home, name):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(2)]
    return create_job(write_jsonl(tmp_path / f"{name}.jsonl", rows), model, GenerationParams(max_new_tokens=2),
                      EngineOptions(), home=home, name=name)  # fmt: skip


@pytest.fixture
def two_jobs(tmp_path, tiny_gpt2, runner_home):
    """A readable job `alpha` and a job `beta` whose job.json and backup Drive cannot serve (reads fail)."""
    alpha, beta = (_job(tmp_path, tiny_gpt2, runner_home, n) for n in ("alpha", "beta"))
    return alpha, beta, [beta.dir / "job.json", beta.dir / "job.backup.json"]


def test_a_job_found_by_name_does_not_wait_for_a_neighbour_that_does_not_read(two_jobs, runner_home,
                                                                              monkeypatch):  # fmt: skip
    alpha, _, bad = two_jobs
    faults = Counted(runner_home, bad, kinds=("read",)).install(monkeypatch)
    assert runner.status("alpha").state == "queued"
    # each of beta's files tried once, not through the retries (6 attempts each: a minute apiece on Drive)
    assert faults.failed == {("read", "job.json"): 1, ("read", "job.backup.json"): 1}
    faults.kinds, faults.failed = ("read", "stat"), {}  # (their stats failing too: the same)
    assert runner.status("alpha").id == alpha.id
    assert max(faults.failed.values()) == 1, faults.failed


@pytest.mark.parametrize("kinds", [("read",), ("read", "stat")])
@pytest.mark.parametrize("ref", ["beta", "id", None])
def test_a_job_that_does_not_read_is_waited_for_once_by_one_status(
    two_jobs, runner_home, monkeypatch, ref, kinds
):
    _, beta, bad = two_jobs
    faults = Counted(runner_home, bad, kinds=kinds).install(monkeypatch)
    got = runner.status(beta.id if ref == "id" else ref)
    s = got if ref is not None else next(s for s in got if s.folder == str(beta.dir))
    assert s.state == "unreadable" and "job.json" in s.message
    # job.json through the retries once (6 attempts) and a few single tries besides, never twice; its backup
    # never waited for (each was 3 times, found by name); its stats failing too, it was an error, no row
    tried = {
        name: sum(n for (_, f), n in faults.failed.items() if f == name)
        for name in ("job.json", "job.backup.json")
    }
    assert tried["job.json"] < 2 * (len(DELAYS) + 1) and tried["job.backup.json"] <= 3, faults.failed


def test_watch_goes_on_while_the_jobs_files_do_not_say_what_they_are(two_jobs, runner_home, monkeypatch):
    from runner.background import watch

    _, beta, bad = two_jobs
    faults = Unreadable(runner_home, bad).install(
        monkeypatch
    )  # (reads and stats: it ended at its first poll)
    polls, lines = [], []

    def sleep(seconds):
        polls.append(seconds)
        faults.bad.clear()

    final = watch(beta.id, runner_home, every=10, echo=lines.append, sleep=sleep)
    assert " unreadable: ? " in lines[0] and final.state == "queued", lines


def test_watch_goes_on_while_the_homes_logs_do_not_list(two_jobs, runner_home, monkeypatch):
    from runner.background import IDLE_POLLS, watch

    alpha = two_jobs[0]
    (runner_home / "logs").mkdir()
    faults = Unreadable(runner_home, [runner_home / "logs"], kinds=("list",)).install(monkeypatch)
    polls, lines = [], []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == IDLE_POLLS + 2:
            faults.bad.clear()  # the mount lists it again

    final = watch("alpha", runner_home, every=10, echo=lines.append, sleep=sleep)
    # the polls of the outage counted neither way: "no worker" is said after IDLE_POLLS that looked
    assert final.id == alpha.id and "no worker is running" in lines[-1]
    assert len(polls) == IDLE_POLLS + 2 + IDLE_POLLS - 1


def test_watch_of_a_job_in_a_read_only_home_leaves_a_gone_workers_pid_file(
    two_jobs, runner_home, monkeypatch
):
    from runner.background import watch

    pid_file = runner_home / "logs" / "work-20261208-000000-aaaaaa.pid"
    pid_file.parent.mkdir()
    pid_file.write_text(f"999999999 - {storage.namespace_tag()}")  # a worker of this machine, gone
    FsFaults(runner_home, fail="EROFS").install(monkeypatch)
    lines = []
    final = watch("alpha", runner_home, every=10, echo=lines.append, sleep=lambda s: None)
    assert final.state == "queued" and "no worker is running" in lines[-1]
    assert pid_file.exists()


def test_a_link_in_the_home_is_listed_under_its_own_name_without_repair(two_jobs, runner_home, tmp_path):
    alpha = two_jobs[0]
    (runner_home / "20261208-000000-aaaaaa").symlink_to(tmp_path / "nowhere")  # dangling
    (runner_home / "20261208-000002-cccccc").symlink_to(alpha.dir)
    (runner_home / "20261208-000001-bbbbbb").write_text("x")  # a file: no job, not listed
    rows = {s.id: s for s in runner.status()}
    assert sorted(rows) == sorted(
        [alpha.id, two_jobs[1].id, "20261208-000000-aaaaaa", "20261208-000002-cccccc"]
    )
    for name in ("20261208-000000-aaaaaa", "20261208-000002-cccccc"):
        assert rows[name].state == "broken" and rows[name].name is None and rows[name].model == "-"
        assert "symbolic link" in rows[name].message and "runner repair" not in rows[name].message
    assert rows[alpha.id].state == "queued"
    # named as the table shows it: it said "no job '20261208-000000-aaaaaa'", as of a folder that is not there
    with pytest.raises(
        RunnerError, match="20261208-000000-aaaaaa is a symbolic link; runner does not follow"
    ):
        runner.status("20261208-000000-aaaaaa")


def test_a_job_whose_rows_were_not_counted_says_so_not_0_of_0(two_jobs, runner_home, monkeypatch, tmp_path):
    alpha, beta, bad = two_jobs
    (alpha.dir / "log.txt").unlink(missing_ok=True)
    (alpha.dir / "log.txt").mkdir()  # broken before its commits are read: no worker can run it
    Unreadable(runner_home, bad, kinds=("read",)).install(monkeypatch)
    for job, state in ((alpha, "broken"), (beta, "unreadable")):
        s = runner.status(job.id)
        assert (s.state, s.done, s.total, s.errors, s.done_text()) == (state, None, None, None, "?")
    table = invoke("status")
    assert table.exit_code == 0 and "0/0" not in table.output, table.output
    rows = json.loads(invoke("status", "--json").output)
    assert {(r["state"], r["done"], r["total"], r["errors"]) for r in rows} == {
        ("broken", None, None, None),
        ("unreadable", None, None, None),
    }
    page = runner.report(alpha.id, tmp_path / "r.html").read_text()
    assert "not counted" in page and "0 of 0" not in page and "0 row errors" not in page


def test_a_job_found_by_name_with_a_neighbour_and_the_names_claims_not_reading(
    two_jobs, runner_home, monkeypatch
):
    alpha, _, bad = two_jobs
    Counted(runner_home, [*bad, runner_home / ".names"]).install(monkeypatch)
    assert (
        runner.status("alpha").id == alpha.id
    )  # (as before this pass: the neighbour read through the retries)


def test_watch_goes_on_while_the_home_does_not_list(two_jobs, runner_home, monkeypatch):
    from runner.background import watch

    alpha = two_jobs[0]
    faults = Unreadable(runner_home, [runner_home], kinds=("list",)).install(monkeypatch)
    polls, lines = [], []

    def sleep(seconds):
        polls.append(seconds)
        if len(polls) == 2:
            faults.bad.clear()  # the mount lists the home again

    final = watch("alpha", runner_home, every=10, echo=lines.append, sleep=sleep)
    assert " alpha unreadable: ? " in lines[0] and "cannot list" in lines[0], lines
    assert final.id == alpha.id and "no worker is running" in lines[-1], lines
