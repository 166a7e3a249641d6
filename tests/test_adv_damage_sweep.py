"""The full cross-product of damage over a job's files (adversarial pass 236): a small OpenAI Batch job (a refused
line in errors.jsonl, n=2, units of 2 requests) completed, with its exports beside it, and the same job stopped
halfway (a snapshot taken while its worker held a unit: claim, heartbeat, in-flight record, a temp file of a
killed write). For EVERY file there, listed at run time, each damage: truncated to 0 bytes, to half, one byte
flipped in the middle, one at the end, the same file of another job copied over it, an older copy of it (a
rollback), deleted. Then, in order: `runner status`, `runner work` to completion (with `runner repair` where a
message says so), `load_results`, `runner results --to` .parquet and .jsonl and `--format openai`. Each case
holds the promise: no exception but the house's errors, each naming a file; results that come back equal the
undamaged job's exactly (same rows, texts, log-probs, no row twice), and so do the exports' bytes.

tests/test_adv_damage.py, test_adv_parsed_damage.py and test_adv_state_rollback.py single out the cases that
broke; this sweep is the whole matrix, so that what was not singled out is asked too."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import traceback
from pathlib import Path

import pytest
from helpers import write_jsonl

import runner
from runner import EngineOptions, GenerationParams, jobdir, storage
from runner.errors import RunnerError
from runner.jobs import create_job
from runner.results import export_results
from runner.scheduler import work
from runner.worker import run_job

OPTIONS = EngineOptions(batch_size=2)
BAD_LINE = '{"custom_id": "bad", "method": "POST"}'  # refused at submit: errors.jsonl has a line
DAMAGES = ["empty", "half", "flip middle", "flip end", "another job's", "older copy", "deleted"]
# what names a file in a message: a name with its suffix, or a commit's (its done/NAME.json and shards/NAME.parquet)
NAMES_A_FILE = re.compile(r"[\w.*-]+\.(json|jsonl|parquet|txt|tmp)\b|\b\d{5}-\d{8}-\d{4}\b")


def requests(words: str) -> list[str]:
    body = {"model": "m", "max_tokens": 2, "n": 2, "temperature": 1.0}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {**body, "prompt": f"{words} {i} books"}} for i in range(4)]  # fmt: skip
    return [json.dumps(line) for line in lines] + [BAD_LINE]


@dataclasses.dataclass
class Scenario:
    """One job's folder at three points of its life (created, stopped halfway, completed) and its exports."""

    created: Path
    stopped: Path
    completed: Path
    out: Path  # the exports of the completed job: responses.jsonl (+ .errors.jsonl), rows.parquet, rows.jsonl


def dead_owner() -> jobdir.Owner:
    """A worker of this machine whose process is provably gone (this pid, another start time): its claim and
    heartbeat in a snapshot are a killed worker's."""
    me = jobdir.Owner.me("w-killed")
    return jobdir.Owner(me.worker, socket.gethostname(), os.getpid(), me.boot, me.pidns, "0")


def exports(job_dir: Path, out: Path) -> dict[str, bytes]:
    """The exports of a job (`runner results --to`, and `--format openai` to responses.jsonl with its errors file
    beside it) written into `out`: {name: bytes}."""
    out.mkdir(parents=True, exist_ok=True)
    export_results(job_dir, out / "rows.parquet")
    export_results(job_dir, out / "rows.jsonl")
    export_results(job_dir, out / "responses.jsonl", format="openai")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def scenario(root: Path, model: str, engine, words: str, seed: int) -> Scenario:
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
    return Scenario(created, stopped, job.dir, out)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, tiny_gpt2, gpt2_engine):
    model = tmp_path_factory.mktemp("models") / "m"  # "m": the requests' body.model
    shutil.copytree(tiny_gpt2, model)
    ours = scenario(tmp_path_factory.mktemp("ours"), str(model), gpt2_engine, "Every student reads", 11)
    theirs = scenario(tmp_path_factory.mktemp("theirs"), str(model), gpt2_engine, "The old man wrote", 12)
    reference = runner.load_results(ours.completed)
    return ours, theirs, reference, {p.name: p.read_bytes() for p in sorted(ours.out.iterdir())}


def files_of(stage: Path, out: Path | None) -> list[str]:
    """Every file of a job folder (and of its exports), listed now: 'job/...' and 'out/...' paths."""
    found = [f"job/{p.relative_to(stage)}" for p in sorted(stage.rglob("*")) if p.is_file()]
    return found + ([f"out/{p.name}" for p in sorted(out.iterdir())] if out else [])


def source(sc: Scenario, stage: str, rel: str) -> Path | None:
    """The file at `rel` ('job/...' or 'out/...') in a scenario's stage ('created', 'stopped', 'completed')."""
    top, _, rest = rel.partition("/")
    if top == "out":
        return sc.out / rest if stage == "completed" else None
    return getattr(sc, stage) / rest


def damaged(data: bytes, damage: str, theirs: Path | None, older: Path | None) -> bytes | None:
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
    return None if damage == "deleted" else data


def said(e: RunnerError, where: str) -> str:
    """A refusal as the user reads it, which must name a file (else the promise is broken)."""
    assert NAMES_A_FILE.search(str(e)), f"{where}: {type(e).__name__} names no file: {e}"
    return f"{where}: {str(e).splitlines()[0][:160]}"


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
            try:
                runner.repair(folder)
            except RunnerError as e:
                return [*notes, said(e, "repair")]
        lines: list[str] = []
        try:
            work(folder.parent, engine=engine, echo=lines.append, shard_rows=2, once=True)
        except RunnerError as e:
            notes.append(said(e, "work"))
        if any("runner repair" in line for line in lines):  # (a job skipped as broken)
            notes.append(f"work: {[line for line in lines if 'runner repair' in line][0][:160]}")
            try:
                runner.repair(folder)
            except RunnerError as e:
                return [*notes, said(e, "repair")]
    return notes


def same_rows(df, reference, complete: bool) -> None:
    """Rows equal the reference's exactly (ids, samples, token ids, texts, finish reasons, log-probs), none
    twice; with `complete`, all of them in the reference's order."""
    keys = list(zip(df["id"], df["sample"].astype(int), strict=True))
    assert len(keys) == len(set(keys)), f"a row twice: {keys}"
    merged = df.merge(reference, on=["id", "sample"], suffixes=("", "_ref"))
    assert len(merged) == len(df), "a row the undamaged job does not have"
    for column in ("token_ids", "token_logprobs"):
        assert [list(v) for v in merged[column]] == [list(v) for v in merged[column + "_ref"]], column
    assert (merged["text"] == merged["text_ref"]).all() and (
        merged["finish_reason"] == merged["finish_reason_ref"]
    ).all()
    if complete:
        assert keys == list(zip(reference["id"], reference["sample"].astype(int), strict=True)), (
            "a row missing"
        )


def read_at_once(folder: Path, out: Path, reference, want: dict[str, bytes]) -> list[str]:
    """The damaged job read before any work or repair (a user loading a completed job's results): rows that
    come back are the undamaged job's (some may be missing, none changed or twice), an export written holds
    only those (the Batch output all of them), else a refusal naming a file."""
    notes = []
    try:
        same_rows(runner.load_results(folder), reference, complete=False)
    except RunnerError as e:
        notes.append(said(e, "load_results at once"))
    for name, how in (("rows.jsonl", "table"), ("responses.jsonl", "openai")):
        try:
            export_results(folder, out / name, format=how)
        except RunnerError as e:
            notes.append(said(e, f"{how} export at once"))
            continue
        got = (out / name).read_bytes().splitlines()
        if how == "openai":
            assert (out / name).read_bytes() == want[name], "a Batch output unlike the undamaged job's"
        assert len(got) == len(set(got)) and set(got) <= set(want[name].splitlines()), (
            f"{name}: a line changed"
        )
    return notes


def ordeal(case: Path, engine, reference, want: dict[str, bytes]) -> str:
    """Status, work (repair where said), load_results and the exports of the damaged job in case/home/job: its
    outcome in a line. An exception that is not RunnerError, or a wrong result, fails (AssertionError)."""
    folder = case / "home" / "job"
    (case / "first").mkdir()
    notes = read_at_once(folder, case / "first", reference, want)
    notes += work_through(folder, engine)
    try:
        df = runner.load_results(folder)
    except RunnerError as e:
        return "; ".join([*notes, said(e, "load_results")])
    completed = runner.status(folder).state == "completed"
    same_rows(df, reference, complete=completed)
    try:
        got = exports(folder, case / "out")
    except RunnerError as e:
        return "; ".join([*notes, said(e, "export")])
    assert got["responses.jsonl"] == want["responses.jsonl"], "the Batch output differs"
    assert got["responses.errors.jsonl"] == want["responses.errors.jsonl"], "the Batch errors differ"
    assert got["rows.jsonl"] == want["rows.jsonl"], "the rows exported differ"
    return "; ".join([*notes, "exact" if completed else f"partial ({len(df)} rows)"])


def sweep(tmp_path, scenarios, engine, stage: str, damage: str) -> dict[str, str]:
    """Each file of the scenario's `stage` damaged with `damage`, each in a fresh copy: {file: outcome}."""
    ours, theirs, reference, want = scenarios
    older = {"completed": "stopped", "stopped": "created"}[stage]
    outcomes, failures = {}, []
    for i, rel in enumerate(files_of(getattr(ours, stage), ours.out if stage == "completed" else None)):
        case = tmp_path / f"case{i}"
        shutil.copytree(getattr(ours, stage), case / "home" / "job")
        if stage == "completed":
            shutil.copytree(ours.out, case / "out")
        target = case / rel.replace("job/", "home/job/", 1)
        data = target.read_bytes()
        after = damaged(data, damage, source(theirs, stage, rel), source(ours, older, rel))
        if after == data:
            shutil.rmtree(case)
            continue
        target.unlink() if after is None else target.write_bytes(after)
        try:
            outcomes[rel] = ordeal(case, engine, reference, want)
        except Exception as e:  # (every case is asked; the failures are said together below)
            failures.append(
                f"{rel}: {type(e).__name__}: {e}\n{''.join(traceback.format_tb(e.__traceback__)[-3:])}"
            )
        shutil.rmtree(case)
    for rel, outcome in outcomes.items():
        print(f"[{stage} / {damage}] {rel}: {outcome}")
    assert not failures, f"{len(failures)} of {len(failures) + len(outcomes)} cases:\n" + "\n".join(failures)
    return outcomes


# the sweep (~100 s): `make test` and CI run it, the edit loop (`make test-fast`) not
@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("stage", ["completed", "stopped"])
def test_every_file_damaged_every_way_is_repaired_or_refused_naming_it(
    tmp_path, scenarios, gpt2_engine, stage, damage
):
    outcomes = sweep(tmp_path, scenarios, gpt2_engine, stage, damage)
    assert outcomes


ROWS = [{"id": f"r{i}", "prompt": f"Every student reads {i} books"} for i in range(4)]


def two_jobs(tmp_path, model):
    """Two queued jobs of one input file in one home (each in a folder named by its id), another seed each."""
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    made = [create_job(prompts, model, GenerationParams(max_new_tokens=2, temperature=1.0, seed=seed), OPTIONS,
                       home=tmp_path / "home", unit_rows=2) for seed in (1, 2)]  # fmt: skip
    return made


def test_a_queued_jobs_backup_of_another_job_shows_broken_as_work_finds_it(tmp_path, tiny_gpt2, gpt2_engine):
    """job.backup.json replaced by another job's (whole, checksummed): `runner work` skips the job as broken
    (`runner repair` brings it back), but `runner status` showed it "queued (interrupted)" with nothing said, for
    ever. It shows broken, naming the file and `runner repair`, which brings it back."""
    ours, theirs = two_jobs(tmp_path, tiny_gpt2)
    shutil.copy2(theirs.dir / "job.backup.json", ours.dir / "job.backup.json")
    shutil.rmtree(theirs.dir)
    shown = runner.status(ours.dir)
    assert shown.state == "broken" and "job.backup.json is job" in shown.message, shown
    assert "runner repair" in shown.message
    runner.repair(ours.dir)
    assert runner.status(ours.dir).state == "queued"
    assert work(tmp_path / "home", engine=gpt2_engine, echo=None)[0].finished
    assert runner.status(ours.dir).state == "completed"


@pytest.fixture(scope="module")
def completed_batch(tmp_path_factory, tiny_gpt2, gpt2_engine):
    """A completed Batch job of 4 requests (units of 2, commits of 2 results): its folder, as a template."""
    root = tmp_path_factory.mktemp("batch")
    model = root / "m"
    shutil.copytree(tiny_gpt2, model)
    job = create_job(write_jsonl(root / "requests.jsonl", requests("Every student reads")), str(model),
                     GenerationParams(max_new_tokens=2, seed=5), OPTIONS, job_dir=root / "job", unit_rows=2,
                     skip_invalid=True)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None, shard_rows=2).finished
    return job.dir


@pytest.mark.parametrize("damage", ["shard flipped", "marker deleted", "shard deleted, marker young"])
def test_the_batch_export_of_a_completed_job_that_lost_a_commit_names_it(
    tmp_path, completed_batch, damage, monkeypatch
):
    """A completed job's commit damaged (or its marker deleted) since: `runner results --format openai` refused
    ("2 result rows are missing or failed verification") without a word of which file, where `runner status`
    names the commit. It names it now, and where a marker is gone, the unit whose commit done/ lacks; a shard
    said not here yet (its marker young, from another machine) is named too, in both."""
    folder = shutil.copytree(completed_batch, tmp_path / "job")
    shard = sorted((folder / "shards").glob("*.parquet"))[1]
    if damage == "shard deleted, marker young":
        monkeypatch.setattr(jobdir, "host_tag", lambda: "another-vm")  # where what follows runs
        shard.unlink()
        named = shard.stem
    elif damage == "shard flipped":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
        named = f"commit {shard.stem}"
    else:
        (folder / "done" / f"{shard.stem}.json").unlink()
        named = f"done/{shard.stem[:5]}-*.json"
    with pytest.raises(RunnerError, match="result rows are missing") as e:
        export_results(folder, tmp_path / "out.jsonl", format="openai")
    assert named in str(e.value) and "runner repair" in str(e.value), str(e.value)
    assert named in runner.status(folder).message
    assert not (tmp_path / "out.jsonl").exists()
