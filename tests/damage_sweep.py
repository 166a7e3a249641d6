"""The machinery of the damage sweeps (tests/test_adv_damage_sweep.py, test_adv_damage_sweep_more.py): a job's
folder at stages of its life, each file of a stage damaged each way in a fresh copy, then what a user does
(`runner status`, `runner work` with `runner repair` where a message says so, `load_results`, the exports) and
the promise checked: no exception but the house's errors, each naming a file; results that come back equal the
undamaged job's exactly (same rows, every column, no row twice), and so do the exports' bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from helpers import write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.errors import RunnerError
from runner.jobs import create_job
from runner.results import export_results
from runner.scheduler import work
from runner.worker import run_job

DAMAGES = ["empty", "half", "flip middle", "flip end", "another job's", "older copy", "deleted"]
# and the file before it in its folder copied over it (state record S-1 over S, as a sync conflict leaves it;
# an older epoch's claim, the commit before's marker or shard)
SIBLING = "its sibling's"
# what names a file in a message: a name with its suffix, or a commit's (its done/NAME.json and shards/NAME.parquet)
NAMES_A_FILE = re.compile(r"[\w.*-]+\.(json|jsonl|parquet|txt|tmp)\b|\b\d{5}-\d{8}-\d{4}\b")


OPTIONS = EngineOptions(batch_size=2)
BAD_LINE = '{"custom_id": "bad", "method": "POST"}'  # refused at submit: errors.jsonl has a line


def requests(words: str) -> list[str]:
    body = {"model": "m", "max_tokens": 2, "n": 2, "temperature": 1.0}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {**body, "prompt": f"{words} {i} books"}} for i in range(4)]  # fmt: skip
    return [json.dumps(line) for line in lines] + [BAD_LINE]


def batch_scenario(root: Path, model: str, engine, words: str, seed: int) -> Scenario:
    """A job of 4 requests (and a refused line) run halfway by a worker then killed (snapshot), then to its end."""
    inputs = write_jsonl(root / "requests.jsonl", requests(words))
    params = GenerationParams(max_new_tokens=2, temperature=1.0, seed=seed)
    job = create_job(inputs, model, params, OPTIONS, job_dir=root / "job", unit_rows=2, skip_invalid=True)
    created, stopped = root / "snap-created", root / "snap-stopped"
    shutil.copytree(job.dir, created)
    batches: list[int] = []

    def snapshot_then_stop() -> bool:
        batches.append(1)
        if len(batches) == 2:  # one batch committed, the next about to be taken: the unit claimed
            shutil.copytree(job.dir, stopped)
        return len(batches) >= 2

    run_job(job, engine, echo=None, shard_rows=2, owner=dead_owner(), should_stop=snapshot_then_stop)
    assert stopped.exists() and list((stopped / "done").glob("*.json"))
    # a write killed before its rename: its temp beside the file
    (stopped / storage.temp_name(stopped / "stats.json").split(os.sep)[-1]).write_bytes(b'{"runs": [')
    assert run_job(job, engine, echo=None, shard_rows=2).finished
    out = root / "out"
    exports(job.dir, out)
    return Scenario({"created": created, "stopped": stopped, "completed": job.dir}, out)


@dataclasses.dataclass
class Scenario:
    """One job's folder at stages of its life ({name: snapshot}, "completed" the last) and its exports; `batch`:
    an OpenAI Batch job (its exports include the `--format openai` output and its errors file)."""

    stages: dict[str, Path]
    out: Path  # the exports of the completed job: rows.parquet, rows.jsonl (+ responses.jsonl, .errors.jsonl)
    batch: bool = True


@dataclasses.dataclass
class Undamaged:
    """What each damaged copy must come back to: the completed job's rows and its exports' bytes."""

    ours: Scenario
    theirs: Scenario  # another job of the same shape: "another job's" copies of its files
    reference: object  # load_results of ours, completed
    want: dict[str, bytes]

    @classmethod
    def of(cls, ours: Scenario, theirs: Scenario) -> Undamaged:
        want = {p.name: p.read_bytes() for p in sorted(ours.out.iterdir())}
        return cls(ours, theirs, runner.load_results(ours.stages["completed"]), want)


def dead_owner() -> jobdir.Owner:
    """A worker of this machine whose process is provably gone (this pid, another start time): its claim and
    heartbeat in a snapshot are a killed worker's. Named as worker ids are (HOST-PID-...): a name without this
    host's tag first reads as a worker of another machine (its young commits "maybe not here yet")."""
    me = jobdir.Owner.me(f"{jobdir.host_tag()}-{os.getpid()}-killed")
    return jobdir.Owner(me.worker, socket.gethostname(), os.getpid(), me.boot, me.pidns, "0")


def exports(job_dir: Path, out: Path, batch: bool = True) -> dict[str, bytes]:
    """The exports of a job (`runner results --to`, and for a Batch job `--format openai` to responses.jsonl
    with its errors file beside it) written into `out`: {name: bytes}."""
    out.mkdir(parents=True, exist_ok=True)
    export_results(job_dir, out / "rows.parquet")
    export_results(job_dir, out / "rows.jsonl")
    if batch:
        export_results(job_dir, out / "responses.jsonl", format="openai")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def files_of(stage: Path, out: Path | None) -> list[str]:
    """Every file of a job folder (and of its exports), listed now: 'job/...' and 'out/...' paths."""
    found = [f"job/{p.relative_to(stage)}" for p in sorted(stage.rglob("*")) if p.is_file()]
    return found + ([f"out/{p.name}" for p in sorted(out.iterdir())] if out else [])


def source(sc: Scenario, stage: str | None, rel: str) -> Path | None:
    """The file at `rel` ('job/...' or 'out/...') in a scenario's stage (None: no such stage)."""
    top, _, rest = rel.partition("/")
    if top == "out":
        return sc.out / rest if stage == "completed" else None
    return sc.stages[stage] / rest if stage in sc.stages else None


def damaged(data: bytes, damage: str, theirs: Path | None, older: Path | None, sibling: Path | None = None
            ) -> bytes | None:  # fmt: skip
    """The bytes `damage` leaves of a file's `data` (None: deleted); `data` itself where it cannot apply."""
    if damage == "empty":
        return b""
    if damage == "half":
        return data[: len(data) // 2]
    if damage.startswith("flip") and data:
        at = len(data) // 2 if damage == "flip middle" else len(data) - 1
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    if damage == "another job's" and theirs is not None and theirs.is_file():
        return theirs.read_bytes()
    if damage == "older copy" and older is not None and older.is_file():
        return older.read_bytes()
    if damage == SIBLING and sibling is not None:
        return sibling.read_bytes()
    return None if damage == "deleted" else data


def said(e: RunnerError, where: str) -> str:
    """A refusal as the user reads it, which must name a file (else the promise is broken)."""
    assert NAMES_A_FILE.search(str(e)), f"{where}: {type(e).__name__} names no file: {e}"
    return f"{where}: {str(e).splitlines()[0][:160]}"


def _repaired(folder: Path, notes: list[str]) -> bool:
    """`runner repair` as a message said: False (and the refusal noted) where it refused."""
    try:
        runner.repair(folder)
    except RunnerError as e:
        notes.append(said(e, "repair"))
        return False
    return True


def work_through(folder: Path, engine) -> list[str]:
    """`runner status`, then `runner work` until the job completes, with `runner repair` where a message says
    so (three rounds at most): what was said on the way."""
    notes: list[str] = []
    for _ in range(3):
        try:
            shown = runner.status(folder)
        except RunnerError as e:
            return [*notes, said(e, "status")]
        if shown.state == "completed" and not shown.message:
            return notes
        if "runner repair" in (shown.message or "") or shown.state == "broken":
            notes.append(f"status: {shown.state}: {(shown.message or '')[:160]}")
            if not _repaired(folder, notes):
                return notes
        lines: list[str] = []
        try:
            work(folder.parent, engine=engine, echo=lines.append, shard_rows=2, once=True)
        except RunnerError as e:
            notes.append(said(e, "work"))
        if any("runner repair" in line for line in lines):  # (a job skipped as broken)
            notes.append(f"work: {[line for line in lines if 'runner repair' in line][0][:160]}")
            if not _repaired(folder, notes):
                return notes
    return notes


def _plain(value) -> str:
    """A cell as comparable text: arrays as lists, floats exactly (NaN equal to NaN)."""
    return repr(value.tolist() if hasattr(value, "tolist") else value)


def same_rows(df, reference, complete: bool) -> None:
    """Rows equal the reference's exactly (ids, samples and every other column: texts, token ids, log-probs,
    scores, vectors), none twice; with `complete`, all of them in the reference's order."""
    keys = list(zip(df["id"], df["sample"].astype(int), strict=True))
    assert len(keys) == len(set(keys)), f"a row twice: {keys}"
    assert list(df.columns) == list(reference.columns), f"other columns: {list(df.columns)}"
    theirs = {k: i for i, k in enumerate(zip(reference["id"], reference["sample"].astype(int), strict=True))}
    assert set(keys) <= set(theirs), f"a row the undamaged job does not have: {set(keys) - set(theirs)}"
    for column in df.columns:
        got, ref = list(df[column]), list(reference[column])
        changed = [k for k, v in zip(keys, got, strict=True) if _plain(v) != _plain(ref[theirs[k]])]
        assert not changed, f"{column} changed in rows {changed}"
    if complete:
        assert keys == list(theirs), "a row missing"


def _partial_export(path: Path, want: bytes) -> None:
    """An export written of a job not whole: its lines are the undamaged job's, none twice."""
    got = path.read_bytes().splitlines()
    assert len(got) == len(set(got)) and set(got) <= set(want.splitlines()), f"{path.name}: a line changed"


def read_at_once(folder: Path, out: Path, undamaged: Undamaged) -> list[str]:
    """The damaged job read before any work or repair (a user loading a completed job's results): rows that
    come back are the undamaged job's (some may be missing, none changed or twice), an export written holds
    only those (the Batch output all of them), else a refusal naming a file."""
    notes, want = [], undamaged.want
    try:
        same_rows(runner.load_results(folder), undamaged.reference, complete=False)
    except RunnerError as e:
        notes.append(said(e, "load_results at once"))
    forms = (("rows.jsonl", "table"), ("responses.jsonl", "openai"))
    for name, how in forms if undamaged.ours.batch else forms[:1]:
        try:
            export_results(folder, out / name, format=how)
        except RunnerError as e:
            notes.append(said(e, f"{how} export at once"))
            continue
        # (a job read as cancelled, its retry's record lost, answers the requests it finished: a subset)
        if how == "openai" and runner.status(folder).state != "cancelled":
            assert (out / name).read_bytes() == want[name], "a Batch output unlike the undamaged job's"
        _partial_export(out / name, want[name])
    return notes


def _errors_back(folder: Path, df, reference) -> str:
    """Where a `runner retry` was undone (its state record lost): the rows missing are exactly the row errors
    counted again, and said so ("" where no row error is counted that the undamaged job has not)."""
    errors = {
        (e["id"], int(e.get("sample") or 0)) for e in runner.read_errors(folder) if e["stage"] != "validate"
    }
    if not errors:
        return ""
    keys = set(zip(df["id"], df["sample"].astype(int), strict=True))
    missing = set(zip(reference["id"], reference["sample"].astype(int), strict=True)) - keys
    assert {r for r, _ in missing} == {r for r, _ in errors}, f"rows missing {missing}, errors {errors}"
    return f", row errors counted again: {sorted(errors)}"


def ordeal(case: Path, engine, undamaged: Undamaged) -> str:
    """Status, work (repair where said), load_results and the exports of the damaged job in case/home/job: its
    outcome in a line. An exception that is not RunnerError, or a wrong result, fails (AssertionError). A job
    that does not end completed (a state record rolled back to "cancelled") must export only the undamaged
    job's lines; its outcome says "not completed"."""
    folder = case / "home" / "job"
    (case / "first").mkdir()
    notes = read_at_once(folder, case / "first", undamaged)
    notes += work_through(folder, engine)
    try:
        df = runner.load_results(folder)
    except RunnerError as e:
        return "; ".join([*notes, said(e, "load_results")])
    state, undone = runner.status(folder).state, _errors_back(folder, df, undamaged.reference)
    same_rows(df, undamaged.reference, complete=state == "completed" and not undone)
    try:
        got = exports(folder, case / "out", undamaged.ours.batch)
    except RunnerError as e:
        return "; ".join([*notes, said(e, "export")])
    if state != "completed" or undone:
        _partial_export(case / "out" / "rows.jsonl", undamaged.want["rows.jsonl"])
        return "; ".join([*notes, f"not completed: {state} ({len(df)} rows{undone})"])
    for name in sorted(set(undamaged.want) - {"rows.parquet"}):  # (its bytes hold when it was written)
        assert got[name] == undamaged.want[name], f"{name} differs"
    return "; ".join([*notes, "exact"])


def one_case(tmp_path: Path, undamaged: Undamaged, stage: str, older: str | None, rel: str, damage: str,
             age: float = 0.0) -> Path | None:  # fmt: skip
    """A fresh copy of the stage with the file at `rel` damaged, dated `age` seconds ago: the case folder (None:
    the damage cannot apply)."""
    ours, theirs = undamaged.ours, undamaged.theirs
    case = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(ours.stages[stage], case / "home" / "job")
    if stage == "completed":
        shutil.copytree(ours.out, case / "out")
    target = case / rel.replace("job/", "home/job/", 1)
    data = target.read_bytes()
    before = [
        p for p in sorted(target.parent.iterdir()) if p.is_file() and p.suffix == target.suffix and p < target
    ]
    after = damaged(
        data, damage, source(theirs, stage, rel), source(ours, older, rel), (before or [None])[-1]
    )
    if after == data:
        shutil.rmtree(case)
        return None
    if after is None:
        target.unlink()
    else:
        target.write_bytes(after)
        os.utime(target, (time.time() - age, time.time() - age))
    return case


def sweep(tmp_path: Path, undamaged: Undamaged, engine, stage: str, older: str | None,
          damages: Callable[[int, str], list[str]], age: float = 0.0) -> dict[str, str]:  # fmt: skip
    """Each file of the scenario's `stage`, damaged each way `damages(i, file)` names, each in a fresh copy
    (`older`: the stage an "older copy" comes from; `age`: how long ago the damage was done): {"file / damage":
    outcome}. The failures are said together."""
    ours = undamaged.ours
    outcomes, failures = {}, []
    for i, rel in enumerate(files_of(ours.stages[stage], ours.out if stage == "completed" else None)):
        for damage in damages(i, rel):
            case = one_case(tmp_path, undamaged, stage, older, rel, damage, age)
            if case is None:
                continue
            started = time.perf_counter()
            try:
                outcome = ordeal(case, engine, undamaged)
                outcomes[f"{rel} / {damage}"] = f"{outcome} ({time.perf_counter() - started:.1f} s)"
            except Exception as e:  # (every case is asked; the failures are said together below)
                tb = "".join(traceback.format_tb(e.__traceback__)[-3:])
                failures.append(f"{rel} / {damage}: {type(e).__name__}: {e}\n{tb}")
            shutil.rmtree(case)
    for what, outcome in outcomes.items():
        print(f"[{stage}] {what}: {outcome}")
    assert not failures, f"{len(failures)} of {len(failures) + len(outcomes)} cases:\n" + "\n".join(failures)
    return outcomes
