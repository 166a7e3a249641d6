"""Adversarial: exactly-once for the job kinds the campaign (test_campaign.py, a plain generate job) does not run:
score jobs (strided texts and pairs), embed jobs, generate jobs whose rows carry their own settings, and OpenAI
Batch files (chat, completions and embeddings) with their output and error files (pass 199).

Each kind's job runs once uninterrupted by a real `runner work` (the reference); a copy of the same job then
takes a fault and is brought to completion as a user would, and its results must equal the reference's, value
for value (every column, floats within 1e-4), each (row, sample) once; a Batch job's export must be the
reference's export byte for byte, every custom_id once across the output and error files, each output line
an openai SDK object.

Held (pass 199; the cases kept here are a cheap sample, each under 10 s): a worker killed at each named point
(every kind, 5 points), two workers through transient EIO, a worker frozen past its lease at 3 points while
another finishes, 6 kinds of damage (prompts.parquet, errors.jsonl, a shard, a marker, job.json, the state
record) then a `runner repair` killed at its first write and the user's recovery, repair and work through
transient EIO, `runner score|embed -o` and `run-batch` killed at 8 points and run again, a row error retried
through kills, a cancelled Batch job's export, exports while a worker is frozen part done, a killed `runner
submit` of a score job and a Batch file, and a randomized mini-campaign (3 workers with kills, stops and EIO,
6 rounds per kind). Per-row settings came from JSONL, CSV and Parquet, with continuous batching too.
"""

from __future__ import annotations

import json
import math
import shutil
import signal

import pytest
import workers
from helpers import CHAT, COMP, EMB, batch_request, msgs, write_jsonl
from test_adv_workers import proc_state, wait_until
from test_openai_batch import check_output_line

import runner
from runner import EngineOptions, GenerationParams
from runner.jobdir import Job, read_state
from runner.jobs import create_job
from runner.params import EmbedParams, ScoreParams

LONG = " ".join(f"word{i % 37}" for i in range(300))
TEXTS = [
    {"id": "fox", "text": "The quick brown fox", "topic": "animals"},
    {"id": "cat", "text": "吾輩は猫である。名前はまだ無い。"},
    {"id": "pair", "context": "The old man said ", "continuation": "hello"},
    {"id": "long", "text": LONG},
    {"id": "hi", "text": "Hello"},
    {"id": "lm", "text": "A language model reads the whole sentence"},
]
ROWS = [
    {"id": "r0", "prompt": "The old man said", "temperature": 0.7, "max_tokens": 3, "seed": 5},
    {"id": "r1", "prompt": "Hello", "n": 3, "temperature": 1.2, "top_k": 7},
    {"id": "r2", "prompt": "Every student", "max_new_tokens": 6, "temperature": 0},
    {"id": "r3", "prompt": "A language model", "n": 2, "top_p": 0.8, "seed": 9, "logprobs": 2},
    {"id": "r4", "prompt": "My friend", "repetition_penalty": 1.3, "stop": ["e"]},
    {"id": "r5", "prompt": "現在も行方不明のまま。", "min_tokens": 2, "max_tokens": 4, "n": 2},
    {"id": "r6", "prompt": "Is it", "choices": ["yes", "no way"], "n": 2, "temperature": 1.0},
    {"id": "r7", "prompt": "Once upon a time", "num_beams": 2, "n": 2, "max_tokens": 4},
    {
        "id": "r8",
        "prompt": "Count to",
        "regex": "[0-9]{1,3}",
        "prompt_logprobs": True,
        "presence_penalty": 0.5,
    },
    {"id": "r9", "prompt": "The quick brown fox", "do_sample": False, "no_repeat_ngram_size": 2},
]
REQUESTS = [
    batch_request("c1", CHAT, {"messages": msgs("Hello there"), "max_tokens": 5, "temperature": 0}),
    batch_request("c2", CHAT, {"messages": msgs("Tell me"), "max_tokens": 6, "temperature": 0.7, "n": 2,
                         "logprobs": True, "top_logprobs": 2}),
    batch_request("p1", COMP, {"prompt": "The old man", "max_tokens": 5, "temperature": 1.3, "logprobs": 2,
                         "frequency_penalty": 1.0}),
    batch_request("p2", COMP, {"prompt": "Every student", "max_tokens": 4, "echo": True, "logprobs": 0}),
    batch_request("bad", COMP, {"prompt": "x", "max_tokens": 4, "top_p": 7}),
    batch_request("p3", COMP, {"prompt": "A language model", "max_tokens": 6, "n": 3, "top_k": 5, "seed": 3}),
    batch_request("c3", CHAT, {"messages": msgs("Count"), "max_completion_tokens": 4, "seed": 3, "stop": ["e"]}),
]  # fmt: skip
EMBED_REQUESTS = [
    batch_request(f"e{i}", EMB, {"input": t["text"]}) for i, t in enumerate(TEXTS) if "text" in t
]
ROW_PARAMS = GenerationParams(max_new_tokens=5, temperature=1.0, seed=4242)
OPTIONS = EngineOptions(batch_size=2)
# kind -> (input rows, settings, engine options, unit rows, whether it is a Batch file)
KINDS = {
    "score": (TEXTS, ScoreParams(stride=100), OPTIONS, 2, False),
    "embed": (TEXTS[:2] + TEXTS[3:], EmbedParams(), OPTIONS, 2, False),
    "rows": (ROWS, ROW_PARAMS, OPTIONS, 3, False),
    "rows-csv": (ROWS, ROW_PARAMS, OPTIONS, 3, False),
    "rows-parquet": (ROWS, ROW_PARAMS, OPTIONS, 3, False),
    "rows-refill": (ROWS, ROW_PARAMS, EngineOptions(batch_size=3, continuous_batching=True), 5, False),
    "batch": (REQUESTS, GenerationParams(max_new_tokens=8, seed=7), OPTIONS, 2, True),
    "batch-embed": (EMBED_REQUESTS, EmbedParams(), OPTIONS, 2, True),
}
LEASE = {"RUNNER_LEASE_TTL": "2", "OMP_NUM_THREADS": "1"}


class Prepared:
    """A kind's job, submitted and not run (`template`), and what an uninterrupted worker made of a copy of it:
    its results and, for a Batch file, its export (output bytes, errors bytes)."""

    def __init__(self, root, model, kind):
        rows, params, options, unit_rows, batch = KINDS[kind]
        self.kind, self.batch = kind, batch
        self.input = write_rows(root / kind, rows)
        served = ("tiny",) if batch else ()
        self.template = create_job(self.input, model, params, options, job_dir=root / "template", unit_rows=unit_rows,
                                   served_model_names=served, skip_invalid=True).dir  # fmt: skip
        home, job_dir = copy_job(root / "ref", self.template)
        code, out = workers.run_worker(home, shard_rows=1, env_extra=LEASE, timeout=300)
        assert code == 0 and read_state(job_dir).state == "completed", out
        self.results = runner.load_results(job_dir)
        self.export = export(job_dir, root / "ref-out") if batch else None
        self.command_ref = None


def write_rows(path, rows):
    """ROWS as PATH.jsonl, or as a CSV (each setting cell as JSON text, a text one as written) or Parquet file
    for kinds named so."""
    import pandas as pd

    if path.name.endswith("-csv"):
        cells = [{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows]
        pd.DataFrame(cells).to_csv(path.with_suffix(".csv"), index=False)
        return path.with_suffix(".csv")
    if path.name.endswith("-parquet"):
        pd.DataFrame(rows).to_parquet(path.with_suffix(".parquet"))
        return path.with_suffix(".parquet")
    return write_jsonl(path.with_suffix(".jsonl"), rows)


def copy_job(root, template):
    home = root / "home"
    home.mkdir(parents=True)
    shutil.copytree(template, home / "job")
    return home, home / "job"


def export(job_dir, folder):
    """`runner results JOB --format openai --to FOLDER/out.jsonl`: (output bytes, errors bytes)."""
    from runner.openai_batch import export as to_openai

    folder.mkdir(exist_ok=True)
    to_openai(Job.open(job_dir), folder / "out.jsonl")
    return (folder / "out.jsonl").read_bytes(), (folder / "out.errors.jsonl").read_bytes()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = Prepared(tmp_path_factory.mktemp(kind), tiny_llama, kind)
        return made[kind]

    return get


def plain(value):
    """A pandas cell as Python values: numpy scalars and arrays (of arrays) as numbers and lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def same_value(got, want, where):
    got, want = plain(got), plain(want)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), where
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for n, (g, w) in enumerate(zip(got, want, strict=True)):
            same_value(g, w, f"{where}[{n}]")
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            same_value(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, where


def assert_same_results(job_dir, p: Prepared, folder=None):
    """The job is completed with the reference's results, every column value for value; a Batch job exports
    the reference's bytes, each custom_id once across its output and error files."""
    assert read_state(job_dir).state == "completed"
    df = runner.load_results(job_dir)
    keys = list(zip(df["id"], df["sample"].astype(int), strict=True))
    assert len(keys) == len(set(keys)), f"a (row, sample) appears twice: {sorted(keys)}"
    assert list(df.columns) == list(p.results.columns)
    want_keys = list(zip(p.results["id"], p.results["sample"].astype(int), strict=True))
    assert keys == want_keys, "rows missing, added or out of order"
    for got, want in zip(df.to_dict("records"), p.results.to_dict("records"), strict=True):
        for column in want:
            same_value(got[column], want[column], f"{want['id']}/{want['sample']}: {column}")
    if p.batch:
        out, errors = export(job_dir, folder)
        ids = [json.loads(x)["custom_id"] for x in (out + errors).decode().splitlines()]
        requests = [json.loads(x)["custom_id"] for x in p.input.read_text().splitlines()]
        assert sorted(ids) == sorted(requests), "a custom_id missing or answered twice"
        assert (out, errors) == p.export
        for line in out.decode().splitlines():
            check_output_line(json.loads(line))


def finish(home, job_dir):
    code, out = workers.run_worker(home, shard_rows=1, env_extra=LEASE, timeout=300)
    assert code == 0 and "Traceback" not in out, out
    return out


# a kill per kind, at a visit past the first (the job is part done); pass 199 ran every kind at each of
# after_generate:2, after_shard:2, mid_write:2, before_replace:3 and before_create:2 (all held)
# (kept to four kinds, one job prepared each, to keep the suite's time: the rest held in the pass)
KILLS = [("score", "after_shard:2"), ("embed", "before_replace:3"), ("rows", "mid_write:2"),
         ("batch", "before_create:2")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fault"), KILLS)
def test_a_worker_killed_at_a_point_then_resumed(tmp_path, prepared, kind, fault):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    code, out = workers.run_worker(
        home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": fault}, timeout=300
    )
    assert code == -signal.SIGKILL, out
    finish(home, job_dir)
    assert_same_results(job_dir, p, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["batch"])
def test_two_workers_through_transient_eio(tmp_path, prepared, kind):
    import fsfaults

    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    procs = []
    for seed in (1, 2):
        faults = fsfaults.FsFaults(job_dir, eio=0.05, eio_stat=0.01, eio_seed=seed, retry_delays=[0.01, 0.02, 0.05,
                                   0.1, 0.5, 1, 2], eio_dirs=("done", "claims", "shards", "state", "workers",
                                   "inflight", "."))  # fmt: skip
        prefix, env = fsfaults.command(faults)
        procs.append(workers.start_worker(home, shard_rows=1, env_extra={**LEASE, **env}, prefix=prefix))
    for proc in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0 and "Traceback" not in out, out
    if read_state(job_dir).state != "completed":
        finish(home, job_dir)
    assert_same_results(job_dir, p, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fault"), [("embed", "after_generate:2:SIGSTOP")])
def test_a_worker_frozen_past_its_lease_while_another_finishes_then_thawed(tmp_path, prepared, kind, fault):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    a = workers.start_worker(home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": fault})
    wait_until(lambda: proc_state(a.pid) == "T" or a.poll() is not None, "A to stop")
    assert a.poll() is None, a.communicate()[0]
    out_b = finish(home, job_dir)
    while a.poll() is None:
        wait_until(lambda: proc_state(a.pid) in ("T", "Z", None) or a.poll() is not None, "A to stop or end")
        a.send_signal(signal.SIGCONT)
        try:
            a.wait(timeout=0.5)
        except Exception:  # noqa: BLE001 (stopped again: continued again)
            pass
    out_a = a.communicate()[0]
    assert a.returncode == 0 and "Traceback" not in out_a, (out_a, out_b)
    assert_same_results(job_dir, p, tmp_path / "out")


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def torn(path):
    """Cut to half (a file created if there was none, as a torn write of a new one)."""
    data = path.read_bytes() if path.exists() else b'{"state": "queued", "generation": 0}'
    path.write_bytes(data[: max(1, len(data) // 2)])


def appended(path, line):
    path.write_bytes((path.read_bytes() if path.exists() else b"") + line)


# what is damaged in a job part done (a worker killed after its second shard), by what
DAMAGE = {
    "prompts": lambda d: flip(d / "prompts.parquet"),
    "errors": lambda d: appended(d / "errors.jsonl", b'{"id": "x"}\n'),
    "shard": lambda d: flip(sorted((d / "shards").glob("*.parquet"))[0]),
    "marker": lambda d: torn(sorted((d / "done").glob("*.json"))[0]),
    "job": lambda d: torn(d / "job.json"),
    "state": lambda d: torn(max((d / "state").glob("*.json"), default=d / "state" / "00000001.json")),
}


def recover(home, job_dir, batch):
    """As a user: status -> repair if broken (the first one killed at its first write) -> retry if failed or
    cancelled -> work, until completed."""
    killed = False
    for _ in range(8):
        state = runner.status(job_dir).state
        if state == "broken" and not killed:
            code, out = workers.run_runner(
                "--home", home, "repair", job_dir, env_extra={"RUNNER_FAULT": "before_replace:1"}
            )
            killed = True
            assert code in (0, -signal.SIGKILL) and "Traceback" not in out, out
        elif state == "broken":
            code, out = workers.run_runner("--home", home, "repair", job_dir)
            assert code == 0 and "Traceback" not in out, out
        elif state in ("failed", "cancelled"):
            code, out = workers.run_runner("--home", home, "retry", job_dir)
            assert code == 0, out
        elif state == "completed" and not batch:
            return
        elif state == "completed":
            # a Batch job's export reads errors.jsonl, checked against job.json: damaged, it refuses, naming
            # `runner repair` (tests/test_openai_batch.py); the user runs that
            try:
                export(job_dir, home.parent / "first-export")
                return
            except runner.RunnerError as e:
                assert "`runner repair " in str(e), e
                code, out = workers.run_runner("--home", home, "repair", job_dir)
                assert code == 0 and "Traceback" not in out, out
        else:
            finish(home, job_dir)
    raise AssertionError(f"not brought back: {runner.status(job_dir)}")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage"), [("score", "job"), ("rows", "marker"), ("batch", "errors")])
def test_damage_then_repair_and_work(tmp_path, prepared, kind, damage):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    code, out = workers.run_worker(home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": "after_shard:2"})
    assert code == -signal.SIGKILL, out
    DAMAGE[damage](job_dir)
    recover(home, job_dir, p.batch)
    assert_same_results(job_dir, p, tmp_path / "out")


# `runner score|embed FILE -o DIR` and `runner run-batch`, killed at a point, then the same command again (pass
# 199 ran each at before_replace:2/4/6, before_create:1/2, mid_write:1, after_shard:1 and after_generate:1)


def command_of(kind, p, model, out):
    common = ("-m", model, "--batch-size", "2")
    if kind in ("score", "embed"):
        return (kind, p.input, *common, "-o", out, *(("--stride", "100") if kind == "score" else ()),
                *(("--skip-invalid",) if kind == "embed" else ()))  # fmt: skip
    return ("run-batch", "-i", p.input, "-o", out / "out.jsonl", *common, "--served-model-name", "tiny",
            "--skip-invalid", "--max-new-tokens", "8")  # fmt: skip


def without_ids(line):
    """A Batch output line without what names its job (ids, the job's creation time)."""
    line = {k: v for k, v in json.loads(line).items() if k != "id"}
    response = {k: v for k, v in line["response"].items() if k != "request_id"}
    response["body"] = {k: v for k, v in response["body"].items() if k not in ("id", "created")}
    return {**line, "response": response}


def command_run(kind, p, model, root, fault=None):
    """The kind's command run in ROOT (killed at `fault`, then run again): its results, and for a Batch file
    its output and error lines (without ids)."""
    out = root / "o"
    args = ("--home", root / "home", *command_of(kind, p, model, out))
    if fault:
        code, said = workers.run_runner(*args, env_extra={"RUNNER_FAULT": fault})
        if code == 0:
            pytest.skip(f"{fault} not reached")
        assert code == -signal.SIGKILL, said
    code, said = workers.run_runner(*args)
    assert code == 0 and "Traceback" not in said, said
    df = runner.load_results(out if kind in ("score", "embed") else out / "out.jsonl.job")
    if not p.batch:
        return df, None
    lines = [
        without_ids(x) for f in ("out.jsonl", "out.errors.jsonl") for x in (out / f).read_text().splitlines()
    ]
    for line in (out / "out.jsonl").read_text().splitlines():
        check_output_line(json.loads(line))
    return df, lines


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fault"), [("batch", "mid_write:1")])
def test_the_kinds_command_killed_at_a_point_then_run_again(tmp_path, prepared, tiny_llama, kind, fault):
    p = prepared(kind)
    if p.command_ref is None:
        p.command_ref = command_run(kind, p, tiny_llama, p.template.parent / "command-ref")
    df, lines = command_run(kind, p, tiny_llama, tmp_path, fault)
    want, want_lines = p.command_ref
    assert list(zip(df["id"], df["sample"], strict=True)) == list(
        zip(want["id"], want["sample"], strict=True)
    )
    for got, ref in zip(df.to_dict("records"), want.to_dict("records"), strict=True):
        for column in ref:
            same_value(got[column], ref[column], f"{ref['id']}: {column}")
    if p.batch:
        assert sorted(x["custom_id"] for x in lines) == sorted(json.loads(x)["custom_id"] for x in
                                                                p.input.read_text().splitlines())  # fmt: skip
        assert lines == want_lines


POISON = {
    "score": "cat",
    "embed": "cat",
    "rows": "r3",
    "rows-csv": "r6",
    "rows-parquet": "r7",
    "rows-refill": "r5",
    "batch": "p3",
    "batch-embed": "e1",
}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "fault"), [("rows", "before_create:1")])
def test_a_row_error_retried_through_kills_is_answered_once(tmp_path, prepared, kind, fault):
    """A row that broke the device (a row error, committed), then `runner retry` and `runner work` each killed
    once at the point: the row is computed again, as the reference computed it, and listed once, no longer as an
    error (a Batch export: an answer, not an error line)."""
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    for _ in range(2):  # the batch breaks, then the row alone: committed as a row error
        code, out = workers.run_worker(
            home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": f"poison_row:{POISON[kind]}"}
        )
        assert code != 0, out
    finish(home, job_dir)
    assert [e["id"] for e in runner.read_errors(job_dir) if e["stage"] != "validate"] == [POISON[kind]]
    if p.batch:
        out, errors = export(job_dir, tmp_path / "before")
        assert POISON[kind] in {json.loads(x)["custom_id"] for x in errors.decode().splitlines()}
    for command in (("retry", job_dir), ("work", "--shard-rows", "1")):
        code, out = workers.run_runner("--home", home, *command, env_extra={**LEASE, "RUNNER_FAULT": fault})
        assert code in (0, -signal.SIGKILL) and "Traceback" not in out, out
    recover(home, job_dir, p.batch)
    if runner.status(job_dir).errors:
        code, out = workers.run_runner("--home", home, "retry", job_dir)
        assert code == 0, out
        finish(home, job_dir)
    assert_same_results(job_dir, p, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "shards"), [("batch", 2)])
def test_a_batch_job_cancelled_part_done_exports_each_request_once_whole_or_as_an_error(
    tmp_path, prepared, kind, shards
):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    code, out = workers.run_worker(
        home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": f"after_shard:{shards}"}
    )
    if code == 0:
        pytest.skip("done before the point")
    code, out = workers.run_runner("--home", home, "cancel", job_dir)
    assert code == 0, out
    code, out = workers.run_runner("--home", home, "results", job_dir, "--format", "openai", "--to",
                                   tmp_path / "c.jsonl")  # fmt: skip
    assert code == 0 and "Traceback" not in out, out
    ref = {x["custom_id"]: x for x in map(without_ids, p.export[0].decode().splitlines())}
    answered = [without_ids(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    failed = [json.loads(x) for x in (tmp_path / "c.errors.jsonl").read_text().splitlines()]
    ids = [x["custom_id"] for x in answered + failed]
    assert sorted(ids) == sorted(json.loads(x)["custom_id"] for x in p.input.read_text().splitlines())
    for line in answered:
        assert line == ref[line["custom_id"]], line["custom_id"]


def faulty(job_dir, seed, rate=0.1):
    import fsfaults

    faults = fsfaults.FsFaults(job_dir, eio=rate, eio_stat=rate / 4, eio_seed=seed,
                               retry_delays=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1],
                               eio_dirs=("done", "claims", "shards", "state", "workers", "inflight", "quarantine", "."))  # fmt: skip
    return fsfaults.command(faults)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "damage", "seed"), [("rows", "shard", 2)])
def test_repair_through_transient_eio(tmp_path, prepared, kind, damage, seed):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    code, out = workers.run_worker(home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": "after_shard:2"})
    assert code == -signal.SIGKILL, out
    DAMAGE[damage](job_dir)
    prefix, env = faulty(job_dir, seed)
    for _ in range(3):
        code, out = workers.run_runner(
            "--home", home, "repair", job_dir, env_extra={**LEASE, **env}, prefix=prefix
        )
        assert "Traceback" not in out, out
        if code == 0:
            break
    prefix, env = faulty(job_dir, seed + 10)
    code, out = workers.run_runner(
        "--home", home, "work", "--shard-rows", "1", env_extra={**LEASE, **env}, prefix=prefix
    )
    assert "Traceback" not in out, out
    recover(home, job_dir, p.batch)
    assert_same_results(job_dir, p, tmp_path / "out")


def exported(path):
    """An exported file's rows as dicts, by its suffix."""
    import pandas as pd

    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    if path.suffix == ".csv":
        return pd.read_csv(path).to_dict("records")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "suffix"), [("score", ".parquet")])
def test_an_export_while_a_worker_is_frozen_part_done_has_each_finished_row_once(
    tmp_path, prepared, kind, suffix
):
    p = prepared(kind)
    home, job_dir = copy_job(tmp_path, p.template)
    a = workers.start_worker(home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": "after_shard:2:SIGSTOP"})
    wait_until(lambda: proc_state(a.pid) == "T" or a.poll() is not None, "A to stop")
    assert a.poll() is None, a.communicate()[0]
    try:
        target = tmp_path / f"x{suffix}"
        code, out = workers.run_runner("--home", home, "results", job_dir, "--to", target)
        assert code == 0 and "Traceback" not in out, out
        rows = exported(target)
    finally:
        a.kill()
        a.communicate()
    want = {(r["id"], int(r["sample"])): r for r in p.results.to_dict("records")}
    keys = [(r["id"], int(r["sample"])) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) <= set(want) and keys, keys
    for row in rows:
        ref = want[(row["id"], int(row["sample"]))]
        for column in ("text", "token_ids", "logprob", "embedding", "token_logprobs"):
            if column in ref:
                same_value(row[column], ref[column], f"{row['id']}: {column}")
