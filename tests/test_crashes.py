"""Rows that poison the process: a CUDA device-side assert, or a silent crash in native code. Real worker
processes are run again and again; the bad row ends up in errors.jsonl once, every other row in the results
exactly once, and no good row is ever set aside because of a plain kill."""

import json
import re
import signal
from pathlib import Path

import pytest
from helpers import assert_exactly_once, reference_run
from workers import run_worker

import runner
from runner import EngineOptions, GenerationParams, storage
from runner.crashes import SILENT_CRASHES, InFlight, Suspect, is_device_error
from runner.job_status import job_status
from runner.jobdir import read_state
from runner.jobs import Job, create_job
from runner.results import read_errors
from runner.worker import run_job

pytestmark = pytest.mark.slow  # real worker processes or the demo model: `make test` runs it, test-fast not

N_ROWS = 10
INFLIGHT = "inflight/00000.json"  # the crash record of the job's only unit
PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, seed=7)
OPTIONS = EngineOptions(batch_size=4)
BAD = "r07"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    rows = [{"id": f"r{i:02d}", "prompt": f"The old man said {i} times"} for i in range(N_ROWS)]
    return reference_run(tmp_path_factory.mktemp("crash"), tiny_gpt2, rows, PARAMS, OPTIONS)


@pytest.fixture
def job(tmp_path, reference, tiny_gpt2):
    return create_job(reference[0], tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "home" / "job")


def test_a_device_error_stops_the_worker_and_the_next_runs_set_the_row_aside(job, reference):
    home, fault = job.dir.parent, {"RUNNER_FAULT": f"poison_row:{BAD}"}
    code, out = run_worker(home, env_extra=fault)
    assert code == 1 and "Traceback" not in out, out
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(
            f"Error: the device failed while computing a batch of 4 rows of job {job.id} (CUDA error: device-side "
            "assert triggered); this process cannot use it any more. Finished rows are saved: run `runner work --job "
            f"{job.dir}` (or the same `runner run`) again; it runs those rows one at a time"
        )
    ), out
    assert read_state(job.dir).state == "queued" and runner.status(job.dir).state == "queued (interrupted)"
    assert not list((job.dir / "workers").iterdir())
    record = json.loads((job.dir / INFLIGHT).read_text())
    assert len(record["running"]) == 4 and record["error"].startswith("CUDA error: device-side assert")
    assert_exactly_once(job.dir, reference[1], missing=[r for r in reference[1]["id"] if r >= "r04"])

    # The batch's rows run one at a time: the good ones complete, the bad one fails alone, is set aside at
    # once (a device error alone is conclusive), and the process, whose GPU would now be unusable, stops.
    code, out = run_worker(home, env_extra=fault)
    assert code == 1 and "Traceback" not in out, out
    assert "4 rows were being computed when a worker stopped on a device error" in out
    assert out.strip().splitlines()[-1] == (
        f"Error: row {BAD} (line 8, sample 0) of job {job.id} makes the device fail on its own (CUDA error: "
        "device-side assert triggered); it is set aside as a row error. This process cannot use the device any "
        f"more: run `runner work --job {job.dir}` (or the same `runner run`) again to carry on"
    )
    code, out = run_worker(home, env_extra=fault)
    assert code == 0 and read_state(job.dir).state == "completed", out
    errors = read_errors(job.dir)
    assert [(e["id"], e["stage"], e["error"]) for e in errors] == [(BAD, "generate", "worker_crash")]
    assert "made the device fail when computed alone (CUDA error: device-side assert" in errors[0]["message"]
    assert assert_exactly_once(job.dir, reference[1], missing=[BAD]) == N_ROWS - 1
    assert not (job.dir / INFLIGHT).exists()
    assert job_status(Job.open(job.dir)).errors == 1


def test_a_row_set_aside_moves_no_other_row_into_other_companions(tmp_path, tiny_gpt2):
    """The batches of a unit are planned over all its rows, set-aside ones too: after the culprit is set aside,
    the rows of the batches it was not in run with the companions an uninterrupted run gave them, bit for bit
    (its own batch's rows ran alone, and are said to). Planned without it, the boundaries moved: rows r06 and
    r09 ran one at a time, silently (pass 97)."""
    rows = [
        {"id": f"r{i:02d}", "prompt": f"The old man said {i} times" + " again" * (i % 3)} for i in range(10)
    ]
    (tmp_path / "ref").mkdir()
    _, ref = reference_run(tmp_path / "ref", tiny_gpt2, rows, PARAMS, OPTIONS)
    job = create_job(rows, tiny_gpt2, PARAMS, OPTIONS, job_dir=tmp_path / "home" / "job")
    for fault in (f"poison_row:{BAD}", f"poison_row:{BAD}", None):
        run_worker(job.dir.parent, env_extra={"RUNNER_FAULT": fault} if fault else {})
    assert read_state(job.dir).state == "completed"
    batches = {}
    for marker in sorted((job.dir / "done").glob("*.json")):
        m = json.loads(marker.read_text())
        batches[tuple(r for a, b in m["keys"] for r in range(a, b))] = [b[1] for b in m["batches"]]
    assert batches[(6, 9)] == [2]  # as in the uninterrupted run: one batch of the two
    df = runner.load_results(job.dir).set_index("id")
    for r in ("r06", "r09"):
        want = ref.set_index("id").loc[r]
        assert list(df.loc[r, "token_logprobs"]) == list(want["token_logprobs"])  # bit for bit
    assert assert_exactly_once(job.dir, ref, missing=[BAD]) == N_ROWS - 1


def test_a_device_error_in_a_big_batch_is_searched_in_groups(tmp_path, tiny_gpt2):
    """A GPU batch of 1,024 rows run one at a time after a device error is ~30 minutes of rows alone: a batch of
    more than GROUPS_FROM rows runs in groups of GROUPS_FROM first, then only the group that fails row by row
    (never in groups again: pass 99): one restart more (three). Every other row exactly once."""
    rows = [{"id": f"r{i:02d}", "prompt": f"The old man said {i} times"} for i in range(12)]
    options = EngineOptions(batch_size=12)
    (tmp_path / "ref").mkdir()
    _, ref = reference_run(tmp_path / "ref", tiny_gpt2, rows, PARAMS, options)
    job = create_job(rows, tiny_gpt2, PARAMS, options, job_dir=tmp_path / "home" / "job")
    fault, outs = {"RUNNER_FAULT": f"poison_row:{BAD}"}, []
    for _ in range(3):
        code, out = run_worker(job.dir.parent, env_extra=fault)
        assert code == 1 and "Traceback" not in out, out
        outs.append(out)
    assert "it runs those rows in groups of 8, then the group that fails one at a time," in outs[0]
    assert "12 rows were being computed when a worker stopped on a device error" in outs[1]
    assert "running them in groups of 8, then the group that fails one at a time, first" in outs[1]
    # the failing group (8 or 4 rows) runs row by row, and that is what is announced (not the waiting group)
    said = re.search(r"(\d+) rows? w(?:ere|as) being computed when a worker stopped on a device error .*?: running "
                     r"them one at a time first", outs[2])  # fmt: skip
    assert said and int(said.group(1)) in (4, 8), outs[2]
    assert f"row {BAD} (line 8, sample 0) of job {job.id} makes the device fail on its own" in outs[2]
    code, out = run_worker(job.dir.parent, env_extra=fault)
    assert code == 0 and read_state(job.dir).state == "completed", out
    assert re.search(
        r"\d rows? left by an earlier crash still waits?: running them one at a time first \(ids", out
    ), out
    assert [(e["id"], e["error"]) for e in read_errors(job.dir)] == [(BAD, "worker_crash")]
    assert assert_exactly_once(job.dir, ref, missing=[BAD]) == 11


def test_silent_deaths_set_a_row_aside_only_after_it_dies_alone_twice(job, reference):
    """SIGKILL while a row is computed, as a crash in native code does, and as a Colab kill does too. Its batch
    dying twice and the row dying alone once is not enough to set the row aside; dying alone twice is."""
    import shutil

    home, fault = job.dir.parent, {"RUNNER_FAULT": f"poison_kill:{BAD}"}
    code, out = run_worker(home, env_extra=fault)
    assert code == -signal.SIGKILL, out
    code, out = run_worker(home, env_extra=fault)  # most likely a plain kill: the same batch again, first
    assert code == -signal.SIGKILL and "running that batch again first" in out, out
    code, out = run_worker(home, env_extra=fault)  # it died twice: its rows one at a time, first
    assert code == -signal.SIGKILL and "when a worker died again: running them one at a time first" in out
    said = next(line for line in out.splitlines() if "one at a time first" in line)
    assert (
        BAD in said and "log-probs may differ" in said and "a token where two choices were that close" in said
    )  # which rows run alone, and what that may change
    assert json.loads((job.dir / INFLIGHT).read_text())["running"] == [[int(BAD[1:]), 0]]

    # Had those been three Colab kills, the row is fine: it runs alone at the end and completes.
    plain = job.dir.parent.parent / "plain"
    shutil.copytree(home, plain)
    code, out = run_worker(plain)
    assert code == 0 and read_state(plain / "job").state == "completed", out
    assert "being computed alone when a worker died: running them alone again at the end" in out
    assert read_errors(plain / "job") == [] and not (plain / "job" / INFLIGHT).exists()
    assert assert_exactly_once(plain / "job", reference[1]) == N_ROWS

    # The row really crashes workers: it dies alone again, at the very end (every other row is done by
    # then), and the next worker sets it aside and completes the job.
    code, out = run_worker(home, env_extra=fault)
    assert code == -signal.SIGKILL, out
    assert assert_exactly_once(job.dir, reference[1], missing=[BAD]) == N_ROWS - 1
    code, out = run_worker(home, env_extra=fault)
    assert code == 0 and read_state(job.dir).state == "completed", out
    assert f"{N_ROWS}/{N_ROWS} rows (100.0%)" in out and "ETA 0:00:00" in out, out  # the row set aside counts
    errors = read_errors(job.dir)
    assert [(e["id"], e["stage"], e["error"]) for e in errors] == [(BAD, "generate", "worker_crash")]
    assert f"{SILENT_CRASHES} workers died while computing this row alone" in errors[0]["message"]
    assert assert_exactly_once(job.dir, reference[1], missing=[BAD]) == N_ROWS - 1
    assert not (job.dir / INFLIGHT).exists()


def test_a_big_batch_that_kills_twice_is_searched_in_groups(tmp_path, tiny_gpt2):
    """A GPU batch of 1,024 rows (or a refill window) that killed two workers ran all its rows alone: half an
    hour. More than GROUPS_FROM keys run in groups of GROUPS_FROM first, the group that kills again key by key:
    five kills on the culprit, every other row exactly once."""
    rows = [{"id": f"r{i:02d}", "prompt": f"The old man said {i} times"} for i in range(12)]
    options = EngineOptions(batch_size=12)
    (tmp_path / "ref").mkdir()
    _, ref = reference_run(tmp_path / "ref", tiny_gpt2, rows, PARAMS, options)
    job = create_job(rows, tiny_gpt2, PARAMS, options, job_dir=tmp_path / "home" / "job")
    home, fault, outs = job.dir.parent, {"RUNNER_FAULT": f"poison_kill:{BAD}"}, []
    for _ in range(5):
        code, out = run_worker(home, env_extra=fault)
        assert code == -signal.SIGKILL, out
        outs.append(out)
    assert "12 rows were being computed when a worker died again: running them in groups of 8, then the group " \
           "that fails one at a time, first" in outs[2]  # fmt: skip
    assert re.search(r"(4|8) rows were being computed when a worker died again: running them one at a time",
                     outs[3]), outs[3]  # fmt: skip
    assert assert_exactly_once(job.dir, ref, complete=False) < 12  # (rows not yet in a shard run again)
    code, out = run_worker(home, env_extra=fault)
    assert code == 0 and read_state(job.dir).state == "completed", out
    assert [(e["id"], e["error"]) for e in read_errors(job.dir)] == [(BAD, "worker_crash")]
    assert assert_exactly_once(job.dir, ref, missing=[BAD]) == 11


def test_two_rows_that_kill_workers_are_both_set_aside_and_the_job_completes(job, reference):
    """Pass 93: a row set aside was only buffered for the unit's next commit, and the in-flight record written
    before the next batch no longer named it; the other bad row then killed the worker before that commit, the
    decision was lost, and the job never finished (12 runs of 12 killed). It is committed at once."""
    home, bad = job.dir.parent, ["r03", BAD]
    codes = []
    while read_state(job.dir).state != "completed" and len(codes) < 12:
        code, out = run_worker(home, env_extra={"RUNNER_FAULT": f"poison_kill:{','.join(bad)}"})
        codes.append(code)
        assert code in (0, -signal.SIGKILL) and "Traceback" not in out, out
    assert read_state(job.dir).state == "completed", codes
    errors = read_errors(job.dir)
    assert sorted((e["id"], e["error"]) for e in errors) == [(b, "worker_crash") for b in bad], errors
    assert assert_exactly_once(job.dir, reference[1], missing=bad) == N_ROWS - 2


def test_a_row_alone_in_its_batch_by_plan_is_not_set_aside_after_two_kills(tmp_path, reference, tiny_gpt2):
    """A batch of one row by plan (`--batch-size 1`, a leftover row, a long prompt alone over the token budget)
    is a batch like any other: two kills while it computes (a Colab reclaim, a VM frozen past its lease) run it
    again, then alone; it completes, no error (adversarial pass 26: it was set aside as a worker_crash)."""
    job = create_job(
        reference[0], tiny_gpt2, PARAMS, EngineOptions(batch_size=1), job_dir=tmp_path / "home" / "job"
    )
    home, fault = job.dir.parent, {"RUNNER_FAULT": f"poison_kill:{BAD}"}
    for _ in range(2):
        code, out = run_worker(home, env_extra=fault)
        assert code == -signal.SIGKILL, out
    code, out = run_worker(home)
    assert code == 0 and read_state(job.dir).state == "completed", out
    assert read_errors(job.dir) == [] and assert_exactly_once(job.dir, reference[1]) == N_ROWS


def _group(*rows, crashes=0):
    return {"keys": [[r, 0] for r in rows], "crashes": crashes}


def _owner(kind):
    """An Owner of this machine: this process ("me", running), one that has ended ("exited"), one stopped
    by SIGSTOP ("stopped", as a worker frozen past its lease), or another that runs ("running"); and the process
    to end afterwards."""
    import subprocess
    import sys
    import time

    from runner.jobdir import Owner, _pid_start

    if kind == "me":
        return Owner.me().as_dict(), None
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = _pid_start(proc.pid)
    if kind == "exited":
        proc.kill()
        proc.wait()
    elif kind == "stopped":
        proc.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{proc.pid}/stat")
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # the signal lands at once; seen here
            time.sleep(0.01)
    return {**Owner.me().as_dict(), "pid": proc.pid, "start": start}, proc


@pytest.mark.parametrize(
    ("record", "first", "last", "culprits"),
    [
        # a batch died silently: most likely a plain kill, so the same batch again, first
        ({"running": [[1, 0], [2, 0]]}, [[1, 2]], [], []),
        # ... a second time, or on a device error: its rows one at a time, first
        ({"running": [[1, 0], [2, 0]], "crashes": 1}, [[1], [2]], [], []),
        ({"running": [[1, 0], [2, 0]], "error": "CUDA error: x"}, [[1], [2]], [], []),
        # a device error in a batch of more than GROUPS_FROM rows: groups of GROUPS_FROM first (the one that
        # fails then runs row by row, never in groups again: pass 99)
        (
            {"running": [[r, 0] for r in range(9)], "error": "CUDA error: x"},
            [list(range(8)), [8]],
            [],
            [],
        ),
        ({"running": [[r, 0] for r in range(8)], "error": "CUDA error: x"}, [[r] for r in range(8)], [], []),
        # ... and so do silent deaths now (a GPU batch, a refill window): a group that kills again goes key by key
        ({"running": [[r, 0] for r in range(9)], "crashes": 1}, [list(range(8)), [8]], [], []),
        ({"running": [[r, 0] for r in range(8)], "crashes": 1}, [[r] for r in range(8)], [], []),
        (
            {"running": [[r, 0] for r in range(8)], "crashes": 1, "isolated": False},
            [[r] for r in range(8)],
            [],
            [],
        ),
        # a row died alone, silently: alone again at the end, the other suspects first
        ({"running": [[2, 0]], "suspects": [_group(3)]}, [[3]], [[2]], []),
        ({"running": [[2, 0]], "isolated": True, "suspects": [_group(3)]}, [[3]], [[2]], []),
        # ... a second time: set aside
        ({"running": [[2, 0]], "crashes": 1}, [], [], [(2, 0)]),
        ({"running": [[2, 0]], "crashes": 1, "isolated": True}, [], [], [(2, 0)]),
        # a batch of one row by plan died: the same batch again, then the row on its own, as any batch
        ({"running": [[2, 0]], "isolated": False}, [[2]], [], []),
        ({"running": [[2, 0]], "isolated": False, "crashes": 1}, [[2]], [], []),
        # its writer is stopped on this machine (frozen past its lease, taken over): no new crash, but the
        # deaths before it still count (the row that died alone once waits at the end: pass 54)
        ({"running": [[2, 0]], "crashes": 1, "isolated": True, "owner": "stopped"}, [], [[2]], []),
        (
            {"running": [[1, 0], [2, 0]], "owner": "stopped", "suspects": [_group(3, crashes=1)]},
            [],
            [[3]],
            [],
        ),
        # ... or it is this very worker (it lost its claim, then took the unit again)
        ({"running": [[2, 0]], "crashes": 1, "isolated": True, "worker": "w"}, [], [[2]], []),
        ({"running": [[1, 0], [2, 0]], "worker": "w"}, [], [], []),
        # ... but one that has ended did die, one that runs without a heartbeat hangs on the row, and a device
        # error counts whoever wrote it
        ({"running": [[2, 0]], "crashes": 1, "isolated": True, "owner": "exited"}, [], [], [(2, 0)]),
        ({"running": [[2, 0]], "crashes": 1, "isolated": True, "owner": "me"}, [], [], [(2, 0)]),
        ({"running": [[2, 0]], "error": "CUDA error: x", "owner": "stopped"}, [], [], [(2, 0)]),
        # a device error alone: set aside at once
        ({"running": [[2, 0]], "error": "CUDA error: x"}, [], [], [(2, 0)]),
        # stopped cleanly between batches: only the suspects are left, with their counts
        ({"running": [], "suspects": [_group(4, crashes=1), _group(5, 6, crashes=1)]}, [[5, 6]], [[4]], []),
        # rows done meanwhile (or unknown) are ignored; a lone survivor of a batch was not alone
        ({"running": [[8, 0], [9, 0]]}, [[8]], [], []),
        ({"running": "garbage"}, [], [], []),
    ],
)
def test_the_isolation_rule(tmp_path, record, first, last, culprits):
    proc = None
    if "owner" in record:
        owner, proc = _owner(record["owner"])
        record = {**record, "owner": owner}
    (tmp_path / INFLIGHT).parent.mkdir()
    (tmp_path / INFLIGHT).write_text(json.dumps({**record, "check": storage.json_checksum(record)}))
    try:
        rec = InFlight(tmp_path / INFLIGHT, "w").recover({(r, 0) for r in range(9)})
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [[r for r, _ in x.keys] for x in rec.first] == first
    assert [[r for r, _ in x.keys] for x in rec.last] == last
    assert [k for k, _ in rec.culprits] == culprits


def _silent_deaths_to_set_aside(path: Path, record: dict) -> int:
    """Row 1, left to do after RECORD with the rest of its keys: how many workers die silently while computing
    it (each recording what it runs as worker.compute does; the other suspects are done meanwhile) before a
    worker reading the record sets it aside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "check": storage.json_checksum(record)}))
    todo = {tuple(k) for k in record["running"]}
    for deaths in range(10):
        rec = InFlight(path, f"reader{deaths}").recover(todo)
        if rec.culprits:
            return deaths
        (suspect,) = [x for x in rec.first + rec.last if (1, 0) in x.keys]
        todo = set(suspect.keys)
        InFlight(path, f"w{deaths}").running(
            suspect.keys, [], crashes=suspect.crashes, isolated=suspect.isolated
        )
    raise AssertionError("never set aside")


@pytest.mark.parametrize(
    ("record", "deaths"),
    [
        ({"running": [[1, 0], [2, 0]]}, 4 - 1),  # its batch died: that was the first
        ({"running": [[1, 0], [2, 0]], "error": "CUDA error: x"}, 4),  # row 2's device error: none of row 1's
        ({"running": [[r, 0] for r in range(1, 10)], "error": "CUDA error: x"}, 4),  # (in groups first)
        (
            {"running": [[r, 0] for r in range(1, 10)]},
            5 - 1,
        ),  # a batch of 9 died: twice, in its group, alone x2
        ({"running": [[1, 0]], "isolated": False}, 4 - 1),  # a batch of one row by plan
    ],
)
def test_plain_kills_set_a_good_row_aside_only_after_four(tmp_path, record, deaths):
    """The promise of crashes.py: a good row is set aside by plain kills only if four land while it computes.
    A row split out of its batch by another row's device error starts with no death of its own (pass 99: it
    started as if it had died twice, and two kills set it aside)."""
    assert _silent_deaths_to_set_aside(tmp_path / INFLIGHT, record) == deaths


def test_a_changed_in_flight_record_is_not_obeyed(tmp_path):
    """One byte of a dead worker's record changed ("crashes": 0 -> 1) would set a good row aside after a
    single plain kill; a record that does not match its checksum (or has none) counts as torn: the rows run
    again (found by adversarial pass 8)."""
    path = tmp_path / INFLIGHT
    InFlight(path, "dead").running([(2, 0)], [], isolated=True)
    assert InFlight(path, "w").recover({(2, 0)}).last  # as written: alone again, at the end
    path.write_text(path.read_text().replace('"crashes": 0', '"crashes": 1'))
    rec = InFlight(path, "w").recover({(2, 0)})
    assert not rec.culprits and not rec.first and not rec.last


def test_a_record_of_an_older_retry_generation_is_no_evidence(tmp_path):
    """Pass 96: a stop right after a row was set aside left the dead worker's record naming it; after `runner
    retry` (which tries failed rows again) the next worker set it aside again without computing it. A record
    carries its retry generation, and one of an older generation counts for nothing."""
    path = tmp_path / INFLIGHT
    InFlight(path, "dead", generation=0).running([(2, 0)], [], crashes=1, isolated=True)
    assert [k for k, _ in InFlight(path, "w", generation=0).recover({(2, 0)}).culprits] == [(2, 0)]
    rec = InFlight(path, "w", generation=1).recover({(2, 0)})
    assert not rec.culprits and not rec.first and not rec.last


def test_a_job_cancelled_while_a_suspect_computes_keeps_its_deaths(job, gpt2_engine, monkeypatch):
    """Pass 96: a clean stop keeps the suspects and does not count the batch it was computing, but a cancel
    landing while a row that had died alone computed alone again lost that row's count (the unit's last
    settle wrote the suspects without it): it then took four more kills, not one."""
    from runner import jobdir
    from runner import worker as worker_module

    bad = (int(BAD[1:]), 0)
    InFlight(job.dir / INFLIGHT, "dead").running(
        [bad], [], isolated=True
    )  # died alone once: alone at the end
    real = worker_module.JobRun.compute

    def compute(self, unit, keys, wanted, suspect):
        if suspect is not None:  # `runner cancel`, read between its decode steps
            jobdir.cancel(self.job)
            self.cancel_checked = 0.0
        return real(self, unit, keys, wanted, suspect)

    monkeypatch.setattr(worker_module.JobRun, "compute", compute)
    run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert read_state(job.dir).state == "cancelled"
    record = json.loads((job.dir / INFLIGHT).read_text())
    kept = [s for s in record["suspects"] if s["keys"] == [list(bad)]]
    assert kept and kept[0]["crashes"] == 1 and kept[0]["isolated"], record


def test_a_thawed_worker_writes_nothing_back_once_the_taker_finished_the_unit(tmp_path):
    """Pass 96: the taker ran the unit to its end and removed the record; the frozen worker, continued, wrote
    its suspects (with their deaths) back into the finished unit's record, where they would count again if
    those rows were ever to do again."""
    path = tmp_path / INFLIGHT
    frozen = InFlight(path, "frozen", holds=lambda: False)  # (its claim was taken over while it was frozen)
    frozen.running([(1, 0), (2, 0)], [Suspect([(5, 0)], 1, isolated=True)])
    taker = InFlight(path, "taker", holds=lambda: True)
    taker.recover({(r, 0) for r in range(8)})
    taker.running([(5, 0)], [])
    taker.settle([])  # the unit is done: no record
    frozen.settle([Suspect([(5, 0)], 1, isolated=True)])  # continued: its batch ends
    assert not path.exists()


def test_a_thawed_worker_leaves_the_takers_in_flight_record_alone(tmp_path):
    """A worker frozen mid-batch past its lease thaws after another took its unit over and wrote its own
    record of what it computes: the thawed one must neither clear that record as its batch ends nor put its
    own in its place before its next batch (its commit then finds the claim lost). Without the record, a row
    that kills the taker would not be isolated."""
    path = tmp_path / INFLIGHT
    frozen = InFlight(path, "frozen", holds=lambda: False)  # (its claim was taken over)
    frozen.running([(1, 0), (2, 0)], [])
    taker = InFlight(path, "taker", holds=lambda: True)
    assert taker.recover({(1, 0), (2, 0)}).first  # (the frozen one's batch: run again first)
    taker.running([(1, 0), (2, 0)], [])
    frozen.settle([])  # the thawed worker's batch ends
    assert json.loads(path.read_text())["worker"] == "taker"
    frozen.running([(3, 0)], [])  # and it starts the next
    assert json.loads(path.read_text())["running"] == [[1, 0], [2, 0]] and frozen.taken
    taker.settle([])
    assert not path.exists()
    frozen.running([(4, 0)], [Suspect([(5, 0)])])  # removed by the taker: not the frozen one's to write again
    assert not path.exists()
    # frozen after it took the unit, before its first batch: the taker's record is not the one it found
    first = tmp_path / "inflight" / "00002.json"
    late = InFlight(first, "late", holds=lambda: False)
    holder = InFlight(first, "taker", holds=lambda: True)
    holder.running([(6, 0)], [])
    late.running([(6, 0)], [])
    late.settle([])
    assert json.loads(first.read_text())["worker"] == "taker" and late.taken
    # the holder finds a late record of the frozen one's (continued, it wrote before its commit found the claim
    # lost): not a taking over, and the holder's own next record replaces it (pass 54)
    holder.settle([])
    InFlight(first, "late").running([(7, 0)], [])
    holder.running([(8, 0)], [])
    assert json.loads(first.read_text())["running"] == [[8, 0]] and not holder.taken
    # its own record, settled and written again, is no taking over
    own = InFlight(tmp_path / "inflight" / "00001.json", "w")
    own.running([(1, 0)], [])
    own.settle([])
    own.running([(2, 0)], [Suspect([(3, 0)])])
    own.settle([Suspect([(3, 0)])])
    assert json.loads(own.path.read_text())["suspects"] and not own.taken


def test_a_frozen_workers_batch_keeps_the_crashes_it_had(tmp_path, monkeypatch):
    """A batch that killed one worker, run again by another that was frozen past its lease and taken over: the
    frozen worker's batch is no new crash, but the death before it still counts (the batch was planned as a
    fresh one, and each such takeover cost the poison row one more death: pass 54)."""
    from runner.jobdir import Owner

    path = tmp_path / INFLIGHT
    InFlight(path, "frozen", Owner("frozen", "host", 1, None, None, None)).running(
        [(2, 0), (3, 0)], [], crashes=1
    )
    monkeypatch.setattr(Owner, "provably_stopped", lambda self: True)
    rec = InFlight(path, "taker").recover({(r, 0) for r in range(6)})
    assert [(g.keys, g.crashes) for g in rec.first] == [([(2, 0), (3, 0)], 1)] and not rec.retried_batch


def test_a_writer_continued_just_before_its_record_is_read_is_no_crash(tmp_path, monkeypatch):
    """The row died alone once; then a worker running it alone was frozen past its lease and is continued just
    as its taker reads its record: it runs (neither stopped nor dead) and renews its heartbeat a moment later, or
    settles its batch. Its batch is no crash: the row waits at the end, not set aside (pass 54 D2: three plain
    kills and such a thaw set a good row aside). One that runs on without renewing it (hung on the row) still counts, and so does
    a writer elsewhere whose heartbeat stays stale; a writer elsewhere is not waited for."""
    import runner.crashes as crashes

    owner, proc = _owner("running")
    record = {"running": [[2, 0]], "crashes": 1, "isolated": True}

    said = []

    def recover(owner, beats):
        rec = {**record, "owner": owner}
        (tmp_path / INFLIGHT).parent.mkdir(exist_ok=True)
        (tmp_path / INFLIGHT).write_text(json.dumps({**rec, "check": storage.json_checksum(rec)}))
        got = InFlight(tmp_path / INFLIGHT, "w", beats=beats, say=said.append).recover(
            {(r, 0) for r in range(4)}
        )
        return [[r for r, _ in x.keys] for x in got.last], [k for k, _ in got.culprits]

    asked = []
    try:
        monkeypatch.setattr(crashes, "THAW_GRACE_SECONDS", 3600.0)  # (renewed at the 3rd look, however slow)
        assert recover(owner, lambda w: asked.append(w) or len(asked) >= 3) == ([[2]], [])
        assert asked == [owner["worker"]] * 3
        assert said == [
            f"worker {owner['worker']} was computing rows of this unit when it was taken over and still runs, "
            "without a fresh heartbeat: waiting up to 3630 s for a sign of life before its batch counts as a crash"
        ]  # (a quarter of the default lease, 120 s, and the grace)
        # its heartbeat stays stale (a damaged file, renewed only every quarter lease), but it settles its batch:
        # its record is gone, or it wrote its next one (pass 55: four flipped heartbeats set a good row aside)
        path, after = tmp_path / INFLIGHT, {"worker": owner["worker"], "running": [[3, 0]]}
        after = json.dumps({**after, "check": storage.json_checksum(after)})

        def stale_while(settle):  # its heartbeat stays stale; the writer settles its batch at the first look
            looks = []
            return lambda w: (
                looks.append(settle() if not looks else None) or len(looks) > 20 and pytest.fail("hung")
            )

        assert recover(owner, stale_while(path.unlink)) == ([[2]], [])
        # a writer that is this very process is a worker it ran before: over, not waited for (in-process runs)
        me, looks = _owner("me")[0], []
        never = lambda w: looks.append(w) or len(looks) > 20 and pytest.fail("hung")  # noqa: E731
        assert recover(me, never) == ([], [(2, 0)])
        assert recover(owner, stale_while(lambda: path.write_text(after))) == ([[2]], [])
        monkeypatch.setattr(crashes, "THAW_GRACE_SECONDS", 0.0)
        monkeypatch.setattr(crashes, "LONGEST_WAIT", 0.0)  # (half a second: the shortest heartbeat period)
        assert recover(owner, lambda w: False) == ([], [(2, 0)])  # hung: its heartbeat never comes
    finally:
        proc.kill()
        proc.wait()
    monkeypatch.setattr(crashes, "THAW_GRACE_SECONDS", 3600.0)
    elsewhere, asked = {**owner, "boot": "another-machine"}, []
    assert recover(elsewhere, lambda w: asked.append(w) or False) == ([], [(2, 0)]) and len(asked) == 1
    assert recover(elsewhere, lambda w: True) == ([[2]], [])  # its heartbeat is fresh again: it lives
    assert recover(owner, lambda w: True) == ([], [(2, 0)])  # ended: it died whatever its heartbeat says


def test_a_worker_asks_for_the_heartbeat_of_a_records_writer(job, reference):
    """Wiring of the rule above in a real worker: the writer of the record runs on this machine and its heartbeat
    in the job is fresh (continued after its unit was taken over), so the row that died alone once completes."""
    from runner.jobdir import Heartbeat, Owner

    owner, proc = _owner("running")
    try:
        rec = {"running": [[int(BAD[1:]), 0]], "crashes": 1, "isolated": True, "owner": owner}
        rec = {**rec, "worker": owner["worker"]}
        (job.dir / INFLIGHT).parent.mkdir(exist_ok=True)
        (job.dir / INFLIGHT).write_text(json.dumps({**rec, "check": storage.json_checksum(rec)}))
        (job.dir / "workers").mkdir(exist_ok=True)
        Heartbeat(job, Owner.from_dict(owner), ttl=3600.0).beat()
        code, out = run_worker(job.dir.parent)
    finally:
        proc.kill()
        proc.wait()
    assert code == 0 and read_state(job.dir).state == "completed", out
    assert read_errors(job.dir) == [] and assert_exactly_once(job.dir, reference[1]) == N_ROWS


def test_a_clean_stop_keeps_the_suspects_and_does_not_count_a_crash(job, reference, gpt2_engine):
    suspects = [Suspect([(2, 0)], isolated=True), Suspect([(5, 0)], 1, isolated=True)]
    InFlight(job.dir / INFLIGHT, "dead").running([(7, 0)], suspects, isolated=True)
    calls = []
    run_job(job, gpt2_engine, echo=None, should_stop=lambda: calls.append(1) or len(calls) > 1)
    record = json.loads((job.dir / INFLIGHT).read_text())
    # (2, 0) ran; (7, 0) died alone once so it waits at the end with (5, 0); nothing is running now
    assert record["running"] == [] and record["suspects"] == [
        {"keys": [[7, 0]], "crashes": 1, "isolated": True},
        {"keys": [[5, 0]], "crashes": 1, "isolated": True},
    ]
    run_job(job, gpt2_engine, echo=None)
    assert not (job.dir / INFLIGHT).exists() and read_errors(job.dir) == []
    assert assert_exactly_once(job.dir, reference[1]) == N_ROWS


@pytest.mark.parametrize(
    ("error", "poison"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: unspecified launch failure (cudaErrorLaunchFailure)"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...`"), True),
        (RuntimeError("CUDA error: out of memory"), False),  # the batch is split instead
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (ValueError("CUDA error: device-side assert triggered"), False),
    ],
)
def test_errors_that_poison_the_process_are_recognised(error, poison):
    assert is_device_error(error) is poison


def test_the_announcement_counts_rows_not_samples_and_says_what_waits():
    """With -n 4 a batch of 8 keys is 2 rows of the user's file; suspects an earlier split left waiting are not
    "being computed when a worker died twice" (pass 99)."""
    from types import SimpleNamespace

    from runner.crashes import Recovery
    from runner.worker import JobRun

    said = []
    job = SimpleNamespace(spec=SimpleNamespace(samples=4))
    run = SimpleNamespace(say=said.append, job=job, _alone_note=JobRun._alone_note)
    unit = SimpleNamespace(id=lambda r: f"r{r}")
    batch = [(r, s) for r in (1, 2) for s in range(4)]
    JobRun.announce(run, unit, Recovery(first=[Suspect(batch, 1)], retried_batch=True))
    assert said == ["a worker died while computing a batch of 2 rows (most likely it was killed): running that "
                    "batch again first"]  # fmt: skip
    said.clear()
    split = [Suspect([k]) for k in batch]
    JobRun.announce(run, unit, Recovery(first=split, cause="CUDA error: x", isolating=batch))
    assert said[0].startswith("2 rows were being computed when a worker stopped on a device error (CUDA error: "
                              "x): running them one at a time first (ids r1, r2;")  # fmt: skip
    said.clear()
    JobRun.announce(run, unit, Recovery(first=split[4:], last=[Suspect([(7, 0)], 1, isolated=True)]))
    assert said[0].startswith("1 row left by an earlier crash still waits: running them one at a time first "
                              "(ids r2; their log-probs may differ")  # fmt: skip
    assert said[1:] == [
        "1 row was being computed alone when a worker died: running them alone again at the end"
    ]
    said.clear()  # groups of 8 keys are groups of 8 samples with -n 4
    JobRun.announce(run, unit, Recovery(first=[Suspect(batch)], cause="CUDA error: x", isolating=batch))
    assert said[0].startswith("2 rows were being computed when a worker stopped on a device error (CUDA error: "
                              "x): running them in groups of 8 samples, then the group that fails one at a time, first")  # fmt: skip
    said.clear()  # a batch a clean stop kept (it died once): it runs again as a batch, not one at a time
    JobRun.announce(run, unit, Recovery(first=[Suspect(batch, 1)]))
    assert said == ["2 rows left by an earlier crash still wait: running them first, as they were left"]


def test_a_kill_while_a_culprit_is_committed_keeps_the_record_that_sets_it_aside(
    job, gpt2_engine, monkeypatch
):
    """The record of a row that failed alone (the proof) was cleared before its row error was committed: a kill
    in between lost both, and the row ran again in a batch, failed, was split and failed alone again (two more
    stops, pass 100). The record goes only once the decision is on disk."""
    from runner import worker as worker_module
    from runner.crashes import DeviceError

    class Killed(BaseException):
        pass

    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    bad = (int(BAD[1:]), 0)
    with pytest.raises(DeviceError):  # its batch of 4
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    real = worker_module.JobRun.commit

    def commit(self, unit, *a, **k):
        if any(e["error"] == "worker_crash" for e in unit.errors):
            raise Killed  # SIGKILL as the row error's commit begins
        return real(self, unit, *a, **k)

    monkeypatch.setattr(worker_module.JobRun, "commit", commit)
    with pytest.raises(Killed):  # its rows one at a time: BAD fails alone
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    record = json.loads((job.dir / INFLIGHT).read_text())
    assert record["running"] == [list(bad)] and record["error"].startswith("CUDA error"), record
    monkeypatch.setattr(worker_module.JobRun, "commit", real)
    run_job(Job.open(job.dir), gpt2_engine, echo=None)  # set aside from the record: BAD never computed again
    assert [(e["id"], e["error"]) for e in read_errors(job.dir)] == [(BAD, "worker_crash")]
    assert read_state(job.dir).state == "completed"


def test_a_device_error_is_said_in_rows_of_the_file_with_samples(tmp_path, reference, tiny_gpt2, gpt2_engine,
                                                                 monkeypatch):  # fmt: skip
    """With -n 4 a batch of 12 (row, sample) keys is 3 rows: the stop said "a batch of 12 rows", and groups of 8
    were of samples, not rows. After `runner retry` only the row still to do runs again, and that is what is
    said (it promised groups of 8 for a batch whose 11 companions were done: pass 100)."""
    from runner.crashes import DeviceError

    params = GenerationParams(max_new_tokens=3, temperature=1.0, seed=7, num_return_sequences=4)
    job = create_job(reference[0], tiny_gpt2, params, EngineOptions(batch_size=12), job_dir=tmp_path / "job")
    monkeypatch.setenv("RUNNER_FAULT", f"poison_row:{BAD}")
    with pytest.raises(DeviceError) as stop:
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert "the device failed while computing a batch of 3 rows of job" in str(stop.value)
    assert "it runs those rows in groups of 8 samples, then the group that fails one at a time, and" in str(
        stop.value
    )
    for _ in range(12):  # its samples one at a time, each set aside as it fails alone (one stop each)
        try:
            run_job(Job.open(job.dir), gpt2_engine, echo=None)
            break
        except DeviceError:
            pass
    assert read_state(job.dir).state == "completed"
    assert runner.retry(job.dir) == 1  # one row (its 4 samples)
    with pytest.raises(DeviceError) as stop:
        run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert "a batch of 3 rows (1 of them still to do) of job" in str(stop.value), stop.value
    assert "it runs that row one at a time and sets aside the one that fails" in str(stop.value)
