"""Adversarial pass 254: exactly-once for the job shapes the campaign (test_campaign.py, sampled, -n 2, batch 2)
and test_adv_kinds.py do not kill: continuous batching (rows of 1 to 9 new tokens, own n, stop, seed, choices,
regex, beams leaving and joining a 2-slot window) killed at the named points, killed and Ctrl-C'd in the middle of a
window (at a decode step, or as a row ends and a waiting one is admitted: a launcher wraps Engine.generate), its
Ctrl-C commit killed, cancelled mid-window then retried, a row error in a window retried; `--cuda-graphs` on CPU;
`run-batch` (chat, completions, json_schema, per-request n/seed/stop/logprobs) killed mid-window and run again with
other engine options, and a request's row error retried through a kill; `runner score|embed -o` killed and run
again with another --batch-size. Each must end with the uninterrupted run's rows, each (row, sample) once, every
column equal (floats within 1e-4); a Batch output each custom_id once, each line an openai SDK object.

Found, and kept fixed below:
- A rerun that resumes a job (`runner run -o DIR`, `run-batch`, `runner.run(output=...)`) said which engine options
  it did not apply ("keeps the engine options it was submitted with: batch_size 2 (asked: 3)"), but not one asked
  at its default value: `--no-continuous-batching` (or `--no-cuda-graphs`, `--device auto`) for a job submitted
  with it was dropped without a word, the job going on with continuous batching. The note compared each option
  with the default, not with what was asked; the settings objects now keep the names given to them (`_given`),
  and the CLI no longer counts an absent plain flag (--trust-remote-code) as asked.

Held (pass 254, each case seconds; a cheap sample is kept, all slow): the named points after_generate:2,
after_shard:2, mid_write:3, before_create:3 and before_replace:4 for continuous batching with and without
--cuda-graphs and static --cuda-graphs on CPU; SIGKILL and SIGINT at decode steps 3 and 17 and at row ends 1, 4 and
9 of the same three; Ctrl-C at row end 9/12 or step 25 with shard rows 100, its commit killed at mid_write:1,
after_shard:1, before_replace:1, before_create:2; a cancel at row end 3 or step 10 then retry; poisoned rows a
(n=2), e (stop), f (choices) and h (beams) in a window then retry; run-batch killed at row end 2/5 or step 6 then
run again as it was, with --batch-size 3 --no-continuous-batching, or --batch-size 5; a row error of requests p3,
c2 and c4 (json_schema, n=2) retried through a kill; score and embed killed at after_shard:1, mid_write:1 and
after_generate:1, then run with --batch-size 5; `runner work --workers 2` (continuous batching) with w2 killed at
after_generate:1 or mid_write:2, w1 at after_shard:1; a window killed 2 or 3 times in a row (at row ends 2 then 1,
steps 5, 3, 2; static CUDA graphs at step 4 twice); run-batch frozen at row end 3 or 6 or step 9, cancelled, killed,
exported (each custom_id once, answered ones as the reference), retried and run again. Continuous batching and CPU
CUDA graphs give static batches' rows.
"""

from __future__ import annotations

import signal
import sys

import pytest
import workers
from helpers import CHAT, COMP, batch_request, msgs
from test_adv_kinds import LEASE, copy_job, same_value, write_rows

import runner
from runner import EngineOptions, GenerationParams
from runner.jobdir import read_state
from runner.jobs import create_job

# rows of very different lengths (1 to 9 new tokens) and samples: with 2 slots, rows leave and others join mid-window
REFILL_ROWS = [
    {"id": "a", "prompt": "The old man said", "max_tokens": 9, "n": 2},
    {"id": "b", "prompt": "Hello", "max_tokens": 1},
    {"id": "c", "prompt": "Every student", "max_tokens": 3, "temperature": 0},
    {"id": "d", "prompt": "A language model", "max_tokens": 7, "top_p": 0.8, "seed": 9, "logprobs": 2},
    {"id": "e", "prompt": "My friend", "max_tokens": 2, "n": 3, "stop": ["e"]},
    {"id": "f", "prompt": "Is it", "choices": ["yes", "no way"], "n": 2},
    {"id": "g", "prompt": "Count to", "regex": "[0-9]{1,3}", "max_tokens": 5},
    {"id": "h", "prompt": "Once upon a time", "num_beams": 2, "n": 2, "max_tokens": 4},
    {"id": "i", "prompt": "現在も行方不明のまま。", "min_tokens": 2, "max_tokens": 6},
    {"id": "j", "prompt": "The quick brown fox", "max_tokens": 8, "n": 2, "temperature": 1.3},
]
PARAMS = GenerationParams(max_new_tokens=5, temperature=1.0, seed=4242)
SHAPES = {
    "refill": EngineOptions(batch_size=2, continuous_batching=True),
    "refill-graphs": EngineOptions(batch_size=2, continuous_batching=True, cuda_graphs=True),
    "graphs": EngineOptions(batch_size=3, cuda_graphs=True),
    "static": EngineOptions(batch_size=2),
}

# A wrapper of `python -m runner` whose engine sends itself SIGNAL at the Nth decode step (AT=step:N) or as the
# Nth row leaves a running batch, when a waiting row is admitted in its place (AT=finish:N): a kill mid-window.
LAUNCHER = """
import os, signal, sys
import runner.engine as E
what, n = os.environ["P254_AT"].split(":")
sig = getattr(signal, os.environ.get("P254_SIGNAL", "SIGKILL"))
seen = [0]
def hit():
    seen[0] += 1
    if seen[0] == int(n):
        os.kill(os.getpid(), sig)
orig = E.Engine.generate
def generate(self, *a, on_finish=None, on_step=None, **kw):
    def fin(*x):
        if what == "finish":
            hit()
        if on_finish:
            on_finish(*x)
    def step(*x):
        if what == "step":
            hit()
        if on_step:
            on_step(*x)
    return orig(self, *a, on_finish=fin, on_step=step, **kw)
E.Engine.generate = generate
from runner.cli import main
sys.argv[0] = "runner"
main()
"""


class Ref:
    def __init__(self, root, model, shape):
        self.input = write_rows(root / "rows", REFILL_ROWS)
        self.template = create_job(self.input, model, PARAMS, SHAPES[shape], job_dir=root / "template",
                                   unit_rows=6).dir  # fmt: skip
        home, job_dir = copy_job(root / "ref", self.template)
        code, out = workers.run_worker(home, shard_rows=1, env_extra=LEASE, timeout=300)
        assert code == 0 and read_state(job_dir).state == "completed", out
        self.results = runner.load_results(job_dir)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_llama):
    made = {}

    def get(shape):
        if shape not in made:
            made[shape] = Ref(tmp_path_factory.mktemp(shape), tiny_llama, shape)
        return made[shape]

    return get


def same_results(job_dir, want):
    assert read_state(job_dir).state == "completed"
    df = runner.load_results(job_dir)
    keys = list(zip(df["id"], df["sample"].astype(int), strict=True))
    assert len(keys) == len(set(keys)), f"a (row, sample) appears twice: {sorted(keys)}"
    assert keys == list(zip(want["id"], want["sample"].astype(int), strict=True)), "rows missing or added"
    assert list(df.columns) == list(want.columns)
    for got, ref_row in zip(df.to_dict("records"), want.to_dict("records"), strict=True):
        for column in ref_row:
            same_value(got[column], ref_row[column], f"{ref_row['id']}/{ref_row['sample']}: {column}")


def launcher(tmp_path):
    path = tmp_path / "launch.py"
    path.write_text(LAUNCHER)
    return (str(path),)


def finish(home):
    code, out = workers.run_worker(home, shard_rows=1, env_extra=LEASE, timeout=300)
    assert code == 0 and "Traceback" not in out, out
    return out


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("shape", "fault"), [("refill", "mid_write:3"), ("refill-graphs", "after_shard:2"),
                                              ("graphs", "before_create:3")])  # fmt: skip
def test_killed_at_a_point_then_resumed(tmp_path, ref, shape, fault):
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    code, out = workers.run_worker(
        home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": fault}, timeout=300
    )
    assert code == -signal.SIGKILL, out
    finish(home)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "at", "sig"), [("refill", "finish:4", "SIGKILL"), ("refill", "step:17", "SIGKILL"),
                                                  ("refill-graphs", "finish:1", "SIGINT")])  # fmt: skip
def test_killed_mid_window_then_resumed(tmp_path, ref, shape, at, sig):
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    code, out = workers.run_worker(home, shard_rows=1, env_extra={**LEASE, "P254_AT": at, "P254_SIGNAL": sig},
                                   prefix=launcher(tmp_path), timeout=300)  # fmt: skip
    if code == 0:
        pytest.skip("not reached")
    assert "Traceback" not in out, out
    finish(home)
    same_results(job_dir, want)


REQUESTS = [
    batch_request("c1", CHAT, {"messages": msgs("Hello there"), "max_tokens": 9, "temperature": 0}),
    batch_request("c2", CHAT, {"messages": msgs("Tell me"), "max_tokens": 1, "temperature": 0.7, "n": 2,
                         "logprobs": True, "top_logprobs": 2}),
    batch_request("p1", COMP, {"prompt": "The old man", "max_tokens": 7, "temperature": 1.3, "logprobs": 2,
                         "frequency_penalty": 1.0}),
    batch_request("p2", COMP, {"prompt": "Every student", "max_tokens": 2, "echo": True, "logprobs": 0}),
    batch_request("bad", COMP, {"prompt": "x", "max_tokens": 4, "top_p": 7}),
    batch_request("p3", COMP, {"prompt": "A language model", "max_tokens": 6, "n": 3, "top_k": 5, "seed": 3}),
    batch_request("c3", CHAT, {"messages": msgs("Count"), "max_completion_tokens": 4, "seed": 3, "stop": ["e"]}),
    batch_request("c4", CHAT, {"messages": msgs("JSON please"), "max_tokens": 8, "n": 2,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                             "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}),
    batch_request("p4", COMP, {"prompt": "Once upon", "max_tokens": 3, "top_p": 0.5}),
]  # fmt: skip


def run_batch(root, model, inp, *extra, env=None, prefix=("-m", "runner")):
    args = ("--home", root / "home", "run-batch", "-i", inp, "-o", root / "o" / "out.jsonl", "-m", model,
            "--served-model-name", "tiny", "--skip-invalid", "--max-new-tokens", "8", *extra)  # fmt: skip
    return workers.run_runner(*args, env_extra={**LEASE, **(env or {})}, prefix=prefix)


def batch_lines(root):
    import json

    from test_adv_kinds import without_ids
    from test_openai_batch import check_output_line

    out = root / "o"
    for line in (out / "out.jsonl").read_text().splitlines():
        check_output_line(json.loads(line))
    return [
        without_ids(x) for f in ("out.jsonl", "out.errors.jsonl") for x in (out / f).read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def batch_ref(tmp_path_factory, tiny_llama):
    from helpers import write_jsonl

    root = tmp_path_factory.mktemp("batch")
    inp = write_jsonl(root / "requests.jsonl", REQUESTS)
    code, out = run_batch(root, tiny_llama, inp, "--batch-size", "2", "--continuous-batching")
    assert code == 0, out
    return inp, batch_lines(root)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("at", "again"), [("finish:5", ("--batch-size", "3", "--no-continuous-batching"))])
def test_run_batch_killed_mid_window_then_run_again(tmp_path, batch_ref, tiny_llama, at, again):
    import json

    inp, want = batch_ref
    first = ("--batch-size", "2", "--continuous-batching")
    code, out = run_batch(tmp_path, tiny_llama, inp, *first, env={"P254_AT": at}, prefix=launcher(tmp_path))
    assert code == -signal.SIGKILL, out
    code, out = run_batch(tmp_path, tiny_llama, inp, *(again or first))
    assert code == 0 and "Traceback" not in out, out
    assert (
        "keeps the engine options it was submitted with: batch_size 2 (asked: 3), continuous_batching True (asked: False)"
        in out
    ), out
    got = batch_lines(tmp_path)
    assert sorted(x["custom_id"] for x in got) == sorted(
        json.loads(x)["custom_id"] for x in inp.read_text().splitlines()
    )
    assert got == want


def wait_stopped(proc):
    from test_adv_workers import proc_state, wait_until

    wait_until(lambda: proc_state(proc.pid) == "T" or proc.poll() is not None, "the worker to stop")
    assert proc.poll() is None, proc.communicate()[0]


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("shape", "at"), [("refill", "finish:3")])
def test_cancelled_mid_window_then_retried(tmp_path, ref, shape, at):
    """A worker frozen mid-window, the job cancelled, the worker thawed (it stops within a step), `runner retry`,
    then work: the reference's rows, each once."""
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    a = workers.start_worker(home, shard_rows=1, env_extra={**LEASE, "P254_AT": at, "P254_SIGNAL": "SIGSTOP"},
                             prefix=launcher(tmp_path))  # fmt: skip
    wait_stopped(a)
    code, out = workers.run_runner("--home", home, "cancel", job_dir)
    assert code == 0, out
    a.send_signal(signal.SIGCONT)
    out_a = a.communicate(timeout=300)[0]
    assert "Traceback" not in out_a, out_a
    assert read_state(job_dir).state == "cancelled", out_a
    code, out = workers.run_runner("--home", home, "retry", job_dir)
    assert code == 0, out
    finish(home)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("shape", "poison"), [("refill", "a")])
def test_a_row_error_in_a_window_retried(tmp_path, ref, shape, poison):
    """A row that breaks the device in a window (committed as a row error after it breaks alone), then `runner
    retry` and work: computed again as the reference computed it (its window's other rows kept theirs)."""
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    for _ in range(8):
        code, out = workers.run_worker(
            home, shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": f"poison_row:{poison}"}
        )
        if code == 0:
            break
    assert code == 0, out
    assert {e["id"] for e in runner.read_errors(job_dir)} == {poison}
    code, out = workers.run_runner("--home", home, "retry", job_dir)
    assert code == 0, out
    finish(home)
    assert not runner.read_errors(job_dir)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("shape", "at", "fault"), [("refill", "finish:9", "mid_write:1")])
def test_ctrl_c_mid_window_its_commit_killed(tmp_path, ref, shape, at, fault):
    """Ctrl-C in the second window of a unit (the first is buffered, not committed: shard rows 100): the finished
    window is written (commit_on_interrupt), that write killed at a point; then work again."""
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    env = {**LEASE, "P254_AT": at, "P254_SIGNAL": "SIGINT", **({"RUNNER_FAULT": fault} if fault else {})}
    code, out = workers.run_worker(
        home, shard_rows=100, env_extra=env, prefix=launcher(tmp_path), timeout=300
    )
    assert "Traceback" not in out, out
    if code == 0:
        pytest.skip("not reached")
    finish(home)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize("poison", ["c4"])
def test_run_batch_row_error_retried_then_run_again(tmp_path, batch_ref, tiny_llama, poison):
    """run-batch (continuous batching) whose request breaks the device: answered in the error file; `runner retry`
    of its job, killed mid-window once, then run-batch again: the output is the reference's, each custom_id once."""
    import json

    inp, want = batch_ref
    first = ("--batch-size", "2", "--continuous-batching")
    for _ in range(10):
        code, out = run_batch(tmp_path, tiny_llama, inp, *first, env={"RUNNER_FAULT": f"poison_row:{poison}"})
        assert "Traceback" not in out, out
        if code == 0:
            break
    assert code == 0, out
    got = batch_lines(tmp_path)
    assert sorted(x["custom_id"] for x in got) == sorted(
        json.loads(x)["custom_id"] for x in inp.read_text().splitlines()
    )
    errors = [x["custom_id"] for x in got if x["response"]["status_code"] != 200]
    assert poison in errors, got
    code, out = workers.run_runner("--home", tmp_path / "home", "retry", tmp_path / "o" / "out.jsonl.job")
    assert code == 0, out
    code, out = run_batch(
        tmp_path, tiny_llama, inp, *first, env={"P254_AT": "finish:1"}, prefix=launcher(tmp_path)
    )
    assert code == -signal.SIGKILL, out
    code, out = run_batch(tmp_path, tiny_llama, inp, "--batch-size", "4")
    assert code == 0 and "Traceback" not in out, out
    got = batch_lines(tmp_path)
    assert sorted(x["custom_id"] for x in got) == sorted(
        json.loads(x)["custom_id"] for x in inp.read_text().splitlines()
    )
    for g, w in zip(got, want, strict=True):  # (rows of a crashed window ran alone: float rounding)
        same_value(g, w, w["custom_id"])


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("kind", "fault"), [("score", "mid_write:1"), ("embed", "after_shard:1")])
def test_score_and_embed_rerun_with_other_options(tmp_path, tiny_llama, kind, fault):
    from test_adv_kinds import TEXTS

    texts = [t for t in TEXTS if "text" in t] if kind == "embed" else TEXTS
    inp = write_rows(tmp_path / "texts", texts)
    extra = ("--stride", "100") if kind == "score" else ("--skip-invalid",)

    def cmd(root, *opts):
        return ("--home", root / "home", kind, inp, "-m", tiny_llama, "-o", root / "o", *extra, *opts)

    code, out = workers.run_runner(*cmd(tmp_path / "ref", "--batch-size", "2"))
    assert code == 0, out
    want = runner.load_results(tmp_path / "ref" / "o")
    code, out = workers.run_runner(
        *cmd(tmp_path, "--batch-size", "2"), env_extra={**LEASE, "RUNNER_FAULT": fault}
    )
    assert code == -signal.SIGKILL, out
    code, out = workers.run_runner(*cmd(tmp_path, "--batch-size", "5", "--device", "auto"))
    assert code == 0 and "Traceback" not in out, out
    assert "batch_size 2 (asked: 5)" in out, out
    same_results(tmp_path / "o", want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize("shape", ["refill", "graphs"])
def test_an_engine_option_changes_no_row(ref, shape):
    """Continuous batching and CUDA graphs (decoded eagerly on CPU) give each row what static batches do."""
    want = ref("static").results
    got = ref(shape).results
    assert list(zip(got["id"], got["sample"], strict=True)) == list(
        zip(want["id"], want["sample"], strict=True)
    )
    for g, w in zip(got.to_dict("records"), want.to_dict("records"), strict=True):
        for column in w:
            same_value(g[column], w[column], f"{w['id']}/{w['sample']}: {column}")


def test_a_rerun_names_an_engine_option_asked_at_its_default(tmp_path, tiny_llama):
    """`runner run -o DIR --no-continuous-batching` again, for a job submitted with --continuous-batching, resumed
    it with continuous batching and said nothing (only options away from their defaults were named)."""
    from click.testing import CliRunner

    from runner.cli import cli

    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "Hello"}\n{"prompt": "The old man"}\n')
    base = ["run", str(inp), "-m", tiny_llama, "-o", str(tmp_path / "out"), "--max-new-tokens", "3"]

    def note(*extra):
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        return [line for line in result.output.splitlines() if "keeps the engine options" in line]

    assert not note("--continuous-batching", "--cuda-graphs", "--device", "cpu", "--trust-remote-code")
    (kept,) = note("--no-continuous-batching", "--no-cuda-graphs", "--device", "auto")
    assert (
        "device 'cpu' (asked: 'auto'), continuous_batching True (asked: False), cuda_graphs True (asked: False)"
        in kept
    )
    assert not note()  # nothing asked: nothing said (--trust-remote-code left out included)
    assert not note("--continuous-batching", "--device", "cpu")  # as submitted
    lines = []
    runner.run(inp, tiny_llama, GenerationParams(max_new_tokens=3), EngineOptions(continuous_batching=False),
               output=tmp_path / "out", echo=lines.append)  # fmt: skip
    assert [line for line in lines if "continuous_batching True (asked: False)" in line], lines


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize("fault", ["after_shard:1:SIGKILL:w1"])
def test_two_worker_processes_one_killed(tmp_path, ref, fault):
    want = ref("refill").results
    home, job_dir = copy_job(tmp_path, ref("refill").template)
    code, out = workers.run_worker(
        home, "--workers", "2", shard_rows=1, env_extra={**LEASE, "RUNNER_FAULT": fault}
    )
    assert "Traceback" not in out, out
    if read_state(job_dir).state != "completed":
        finish(home)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize(("shape", "ats"), [("refill", ("step:5", "step:3", "step:2"))])
def test_a_window_killed_again_and_again(tmp_path, ref, shape, ats):
    """Killed mid-window, then killed again in the batch run again first (its rows then run split, or alone):
    each (row, sample) once, the reference's tokens (log-probs within float rounding)."""
    want = ref(shape).results
    home, job_dir = copy_job(tmp_path, ref(shape).template)
    for at in ats:
        code, out = workers.run_worker(home, shard_rows=1, env_extra={**LEASE, "P254_AT": at},
                                       prefix=launcher(tmp_path), timeout=300)  # fmt: skip
        assert "Traceback" not in out, out
    finish(home)
    same_results(job_dir, want)


@pytest.mark.slow
@pytest.mark.deep  # (`make test` runs the mid-window kills; the rest with the widest sweeps)
@pytest.mark.parametrize("at", ["finish:6"])
def test_run_batch_cancelled_mid_window_exports_each_request_once(tmp_path, batch_ref, tiny_llama, at):
    import json

    inp, want = batch_ref
    args = ("--home", tmp_path / "home", "run-batch", "-i", inp, "-o", tmp_path / "o" / "out.jsonl", "-m", tiny_llama,
            "--served-model-name", "tiny", "--skip-invalid", "--max-new-tokens", "8", "--batch-size", "2",
            "--continuous-batching")  # fmt: skip
    import subprocess

    a = subprocess.Popen([sys.executable, *launcher(tmp_path), *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=workers.ROOT,
                         env=workers.worker_env({**LEASE, "P254_AT": at, "P254_SIGNAL": "SIGSTOP"}))  # fmt: skip
    wait_stopped(a)
    job_dir = tmp_path / "o" / "out.jsonl.job"
    code, out = workers.run_runner("--home", tmp_path / "home", "cancel", job_dir)
    assert code == 0, out
    a.kill()
    a.communicate()
    code, out = workers.run_runner("--home", tmp_path / "home", "results", job_dir, "--format", "openai", "--to",
                                   tmp_path / "c.jsonl")  # fmt: skip
    assert code == 0 and "Traceback" not in out, out
    from test_adv_kinds import without_ids
    from test_openai_batch import check_output_line

    ref = {x["custom_id"]: x for x in want}
    answered = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    failed = [json.loads(x) for x in (tmp_path / "c.errors.jsonl").read_text().splitlines()]
    ids = [x["custom_id"] for x in answered + failed]
    assert sorted(ids) == sorted(json.loads(x)["custom_id"] for x in inp.read_text().splitlines())
    for line in answered:
        check_output_line(line)
        same_value(without_ids(json.dumps(line)), ref[line["custom_id"]], line["custom_id"])
    code, out = workers.run_runner("--home", tmp_path / "home", "retry", job_dir)
    assert code == 0, out
    code, out = run_batch(tmp_path, tiny_llama, inp, "--batch-size", "2", "--continuous-batching")
    assert code == 0 and "Traceback" not in out, out
    assert batch_lines(tmp_path) == want
