"""The plain helper functions the test files share; the one home for them (fixtures live in conftest.py, real
`runner` processes in workers.py, the tiny models in tiny_models.py).

* input files: `write_jsonl`;
* reference runs and copies of a prepared job: `reference_run`, `fresh_copy`;
* the properties tests assert again and again: `assert_exactly_once` (a job's results against an uninterrupted
  run), `assert_same_completions` (batched == one at a time), `plain_logprobs` (what one unpadded forward
  pass says);
* `ids_of` (prompt texts -> token ids as a job encodes them), `invoke` (a CLI command through click's runner);
* a unit's taker frozen inside its seal, and a job run to its end checked against its reference:
  `taker_frozen_before_its_seal`, `ends_exactly_once`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

# What a CPU engine does (oneDNN kernels, grouped decode, accelerate's map on a machine without a GPU): not asked
# of the engine on a GPU (gpu_check.sh sets RUNNER_TEST_DEVICE), which takes other paths by design.
cpu_only = pytest.mark.skipif(
    os.environ.get("RUNNER_TEST_DEVICE", "cpu") != "cpu", reason="a CPU engine's path"
)

# Prompts of mixed lengths and scripts (one token to ~20, Japanese too), so that padding is exercised.
PROMPTS = [
    "The quick brown fox",
    "Hello",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "A language model reads the whole sentence and then",
    "My friend",
    "現在も行方不明のまま。",
]
# Longer and more varied: the decode-lever and refill tests, where rows must leave the batch at different steps.
LONG_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun",
    *PROMPTS[1:],
    "Once upon a time there was a",
]


def write_jsonl(path: Path, rows: Iterable) -> Path:
    """One line per row, UTF-8: a str or bytes row is written as given (to write broken lines), anything else
    as its JSON (non-ASCII kept as is). Returns `path`."""
    lines = []
    for r in rows:
        line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
        lines.append(line if isinstance(line, bytes) else line.encode("utf-8"))
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def reference_run(root: Path, model: str, rows: list[dict], params, options, unit_rows: int | None = None):
    """Write ROWS to ROOT/p.jsonl and run them as one uninterrupted job (ROOT/reference): the prompts file, and
    the results every interrupted, faulted or shared run of the same prompts must equal."""
    import torch

    import runner
    from runner.jobs import create_job
    from runner.worker import run_job

    prompts = write_jsonl(root / "p.jsonl", rows)
    ref = create_job(prompts, model, params, options, job_dir=root / "reference", unit_rows=unit_rows)
    # on one thread, as the worker processes the tests start compute (a sum over two threads rounds otherwise,
    # and a sampled token can differ: the tests of real workers failed when pytest ran without -n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(ref, echo=None)
    finally:
        torch.set_num_threads(threads)
    return prompts, runner.load_results(ref.dir)


def prepared_job(root: Path, model: str, rows: list[dict], params, options, unit_rows: int | None = None):
    """`reference_run` of ROWS, and a job of the same prompts not run yet (ROOT/template, in units of
    `unit_rows`) for each test to copy (`fresh_copy`): (template folder, reference results)."""
    from runner.jobs import create_job

    prompts, ref = reference_run(root, model, rows, params, options)
    template = create_job(prompts, model, params, options, job_dir=root / "template", unit_rows=unit_rows)
    return template.dir, ref


def fresh_copy(root: Path, template: Path) -> tuple[Path, Path]:
    """A copy of a prepared job folder as the only job of the home ROOT/home: (home, job folder)."""
    home = root / "home"
    home.mkdir(parents=True)
    shutil.copytree(template, home / "job")
    return home, home / "job"


def assert_exactly_once(job_dir, ref, complete: bool = True, missing: Iterable[str] = ()) -> int:
    """The results of JOB_DIR hold each (id, sample) at most once, and each equals the reference run's: token
    ids, text, finish reason, and log-probs within 1e-4 (batches may differ, so float rounding may). With
    `complete`, they are all of the reference's rows but the ids in `missing`, in the reference's order.
    Returns the number of result rows."""
    import pytest

    import runner

    df = runner.load_results(job_dir)
    keys = list(zip(df["id"], df["sample"].astype(int), strict=True))
    assert len(keys) == len(set(keys)), f"a (row, sample) appears twice: {sorted(keys)}"
    merged = df.merge(ref, on=["id", "sample"], suffixes=("", "_ref"))
    assert len(merged) == len(df), "a result row that the reference does not have"
    assert [list(t) for t in merged["token_ids"]] == [list(t) for t in merged["token_ids_ref"]]
    assert (merged["text"] == merged["text_ref"]).all()
    assert (merged["finish_reason"] == merged["finish_reason_ref"]).all()
    for got, want in zip(merged["token_logprobs"], merged["token_logprobs_ref"], strict=True):
        assert list(got) == pytest.approx(list(want), abs=1e-4)
    if complete:
        want = ref[~ref["id"].isin(list(missing))]
        assert keys == list(zip(want["id"], want["sample"].astype(int), strict=True)), "a row is missing"
    return len(df)


def ids_of(engine, texts: list[str]) -> list[list[int]]:
    """Token ids of plain prompts, as a job encodes them (special tokens, no chat template)."""
    from runner.batching import encode

    return [encode(engine.tokenizer, t, chat=False) for t in texts]


def assert_same_completions(batched, single, tol: float = 1e-4) -> None:
    """Completions of one batch equal those of the same prompts generated one at a time: tokens, text and
    finish reason exactly, log-probs within `tol`."""
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in single]
    for b, s in zip(batched, single, strict=True):
        assert max(abs(x - y) for x, y in zip(b.token_logprobs, s.token_logprobs, strict=True)) < tol


def plain_logprobs(engine, ids: list[int]) -> tuple[list[float], list[bool]]:
    """(log P(ids[i] | ids[:i]) for i >= 1, argmax == ids[i]) from one unpadded forward pass of ids[:-1] (the
    last token is only predicted), without position ids or attention mask: the reference for batched ones."""
    import torch

    if len(ids) < 2:
        return [], []  # nothing is predicted
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids[:-1]], device=engine.device)).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    lps = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    greedy = [int(logits[i - 1].argmax()) == ids[i] for i in range(1, len(ids))]
    return lps, greedy


def invoke(*args, input: str | None = None):
    """`runner ARGS...` through click's CliRunner (arguments turned to strings); exceptions are not caught, so an
    unexpected one fails the test with its traceback."""
    from click.testing import CliRunner

    from runner.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def unreadable_by_llguidance(tok, monkeypatch):
    """A stand-in for `tok` that llguidance cannot read (its byte table is refused), so tokens.py falls back to
    decoded text: a fresh object, so the table cached for `tok` itself is not reused."""
    import llguidance.hf

    def refuse(tokenizer, *a, **kw):
        raise ValueError("unsupported tokenizer")

    monkeypatch.setattr(llguidance.hf, "from_tokenizer", refuse)

    class Other:
        is_fast = True
        all_special_ids = tok.all_special_ids
        batch_decode = staticmethod(tok.batch_decode)
        decode = staticmethod(tok.decode)
        convert_ids_to_tokens = staticmethod(tok.convert_ids_to_tokens)

    return Other()


def run_until_done(job, engine, runs: int = 8):
    """Run the job until it finishes, again after each DeviceError (as a user runs `runner work` again after a
    row broke the device); the last run's summary."""
    from runner.crashes import DeviceError
    from runner.worker import run_job

    for _ in range(runs):
        try:
            summary = run_job(job, engine, echo=None)
            if summary.finished:
                return summary
        except DeviceError:
            continue
    raise AssertionError("the job did not finish")


def commit_row_error(job, engine) -> None:
    """Under RUNNER_FAULT=poison_row:ID, two runs: the batch holding the row breaks the device, then the row
    run alone fails again and is committed as a row error (each run stops with DeviceError)."""
    import pytest

    from runner.crashes import DeviceError
    from runner.worker import run_job

    for _ in range(2):
        with pytest.raises(DeviceError):
            run_job(job, engine, echo=None)


def completed_with_a_row_error(job, engine, monkeypatch):
    """Run the job to its end with row r1 failing (a row error, committed), as `runner work` does; the summary."""
    monkeypatch.setenv("RUNNER_FAULT", "poison_row:r1")
    commit_row_error(job, engine)
    summary = run_until_done(job, engine)
    monkeypatch.delenv("RUNNER_FAULT")
    return summary


def prompts_hashing(monkeypatch):
    """Count the hashings of prompts.parquet from now on: a function returning how many there were."""
    from runner import storage

    hashed, real = [], storage.file_sha256
    monkeypatch.setattr(
        storage, "file_sha256", lambda path, *a, **k: hashed.append(str(path)) or real(path, *a, **k)
    )
    return lambda: len([p for p in hashed if p.endswith("prompts.parquet")])


def newest_state_record(job_dir) -> Path:
    """The job's newest state record, state/SEQ.json (the file damage tests tear), which must exist."""
    records = sorted((Path(job_dir) / "state").glob("*.json"))
    assert records, f"{job_dir} has no state record yet"
    return records[-1]


def taker_frozen_before_its_seal(job, monkeypatch, name: str, after: int, at_link: bool = True):
    """Worker NAME's take-over of unit 0 (epoch `after` + 1) in a thread, frozen inside its seal of the epoch
    before: between the seal's create and its fill (where links are missing) and, with `at_link`, already at
    its link (tried first everywhere: where links are missing, it freezes there, before the seal exists).
    Returns (start, release, took): start() runs it until it froze, release() lets it finish, and `took`
    gets the epoch take_unit returned."""
    import threading

    from runner import jobdir
    from runner.jobdir import Job, Owner

    frozen, thaw, took = threading.Event(), threading.Event(), []
    real_fill, real_link = jobdir._fill, jobdir._link_new

    def freeze() -> None:
        if threading.current_thread().name == name:
            frozen.set()
            assert thaw.wait(60)

    def fill(fd, data):
        if b'"commits"' in data:
            freeze()
        real_fill(fd, data)

    def link_new(tmp, path):
        if path.name.endswith(".seal.json"):
            freeze()
        return real_link(tmp, path)

    monkeypatch.setattr(jobdir, "_fill", fill)
    if at_link:
        monkeypatch.setattr(jobdir, "_link_new", link_new)
    t = threading.Thread(target=lambda: took.append(jobdir.take_unit(Job.open(job.dir), 0, Owner.me(name), after)),
                         name=name, daemon=True)  # fmt: skip

    def start() -> None:
        t.start()
        assert frozen.wait(60)

    def release() -> None:
        thaw.set()
        t.join(60)

    return start, release, took


def ends_exactly_once(job_dir, engine, ref) -> None:
    """The job in `job_dir` is completed, or completes when run once more, with the results of `ref`."""
    import runner
    from runner.jobdir import Job, Owner, read_state
    from runner.worker import run_job

    st = runner.status(job_dir)
    assert st.state in ("completed", "queued", "queued (interrupted)"), st
    if st.state != "completed":
        run_job(Job.open(job_dir), engine, echo=None, owner=Owner.me("D"), shard_rows=2)
    assert read_state(job_dir).state == "completed"
    assert_exactly_once(job_dir, ref)


def normalising_copy(model: str, dest: Path, dropped: str) -> Path:
    """A copy of the tiny Llama at `model` whose tokenizer's normalizer deletes `dropped` (as sentencepiece's
    nmt_nfkc deletes control and zero-width characters): a text of only those encodes to no tokens. Loaded as
    a plain fast tokenizer, which keeps tokenizer.json's normalizer (LlamaTokenizer builds its own)."""
    shutil.copytree(model, dest)
    spec = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Replace", "pattern": {"String": dropped}, "content": ""}
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


# A Lark rule `wide` whose matcher gives up a dozen letters in (llguidance's Earley row limit, 2,000 items): a row
# of 2,100 alternatives, each a rule of its own. A grammar uses it after what it matches first.
WIDE_RULES = (
    "wide: "
    + " | ".join(f"c{i}" for i in range(2100))
    + "\n"
    + "".join(f'c{i}: "x" d{i}\nd{i}: "{i}"\n' for i in range(2100))
)


# OpenAI Batch request lines for the tiny test models, served as "tiny" (`run-batch --served-model-name tiny`)
CHAT, COMP, EMB = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


def batch_request(cid: str, url: str, body: dict) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


def msgs(text: str) -> list[dict]:
    """A chat of one user message."""
    return [{"role": "user", "content": text}]


def two_row_job(tmp_path: Path, model: str, home: Path):
    """A queued job of two short prompts, 2 new tokens each: what the state-record tests write records of."""
    from runner import EngineOptions, GenerationParams
    from runner.jobs import create_job

    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(2)]
    return create_job(write_jsonl(tmp_path / "p.jsonl", rows), model, GenerationParams(max_new_tokens=2),
                      EngineOptions(), home=home)  # fmt: skip
