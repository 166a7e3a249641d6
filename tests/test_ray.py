"""runner on Ray Data (runner/ray.py), on a real local Ray instance: results equal a local `runner run` of the same
rows with the same seed, invalid rows land in the `error` column, and a checkpointed pipeline that died resumes
without computing its checkpointed ids again.

Ray starts once for the module (2 CPUs, no dashboard). Its actors import runner from this checkout and this
folder (for `Counting`), with the session's model cache, through the runtime environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PROMPTS, reference_run, write_jsonl
from workers import ROOT

import runner
import runner.ray
from runner.params import EmbedParams, ScoreParams
from runner.ray import Generate

# Every test below starts actors on a Ray instance: `make test` runs them, test-fast not.
slow = pytest.mark.slow
# One Ray instance: under `pytest -n`, one process runs this whole module.
pytestmark = pytest.mark.xdist_group("ray")
ACTOR_CPUS = 0.5  # two actors leave a CPU of the 2 for Ray Data's read and write tasks


def test_import_runner_does_not_import_ray():
    code = "import sys, runner, runner.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_a_stage_checks_rows_as_submit_and_keeps_the_result_columns(tmp_path, tiny_gpt2):
    """A stage called directly on a batch (what an actor does with each): a row asking for a column the stage
    lacks is an error row, `outputs=` adds it, an input column named like an output one is kept renamed."""
    import pyarrow as pa

    params = runner.GenerationParams(max_new_tokens=4, seed=1)
    rows = [{"id": "a", "prompt": "Hello", "logprobs": None, "text": "kept"},
            {"id": "b", "prompt": "The quick brown fox", "logprobs": 2, "text": "also kept"}]  # fmt: skip
    _, ref = reference_run(tmp_path, tiny_gpt2, rows, params, runner.EngineOptions())
    batch = pa.Table.from_pylist(rows)
    out = Generate(tiny_gpt2, params)(batch).to_pandas().set_index("id")
    assert out.loc["b", "error"] == ("logprobs: this row asks for top_logprobs, a column this stage does not "
                                     "have: pass outputs=('top_logprobs',) (a stage fixes its columns before "
                                     "it sees rows)")  # fmt: skip
    assert out.loc["a", "input_text"] == "kept" and pd_isna(out.loc["a", "error"])
    out = Generate(tiny_gpt2, params, outputs=("top_logprobs",))(batch).to_pandas()
    assert out["error"].isna().all() and out["input_text"].tolist() == ["kept", "also kept"]
    assert [list(t) for t in out["token_ids"]] == [list(t) for t in ref["token_ids"]]
    assert out["top_logprobs"][0] is None and ref["top_logprobs"][0] is None
    assert [[[e["token_id"] for e in step] for step in out["top_logprobs"][1]]] == [
        [[e["token_id"] for e in step] for step in ref["top_logprobs"][1]]
    ]
    scored = runner.ray.Score(tiny_gpt2)(pa.Table.from_pylist([
        {"id": "t", "text": "Hello there", "context": None, "continuation": None},
        {"id": "e", "text": "  ", "context": None, "continuation": None},
        {"id": "p", "text": None, "context": "The quick", "continuation": ""},
    ])).to_pandas().set_index("id")  # fmt: skip
    assert scored["error"].fillna("").to_dict() == {
        "t": "", "e": "text: text is only whitespace ('  ')",
        "p": "continuation: must be a non-empty string, got an empty string",
    }  # fmt: skip
    assert scored.loc["t", "num_tokens"] == len(scored.loc["t", "token_ids"]) > 0


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


@pytest.fixture(scope="module")
def ray_instance(runner_cache):
    pytest.importorskip("ray.data")
    import ray
    import ray.data

    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": path, "RUNNER_CACHE": str(runner_cache), "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             object_store_memory=256 * 1024**2, configure_logging=False)  # fmt: skip
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ctx.checkpoint_config = None
    ray.shutdown()


@pytest.fixture
def ray_local(ray_instance):
    """The module's Ray instance, once the actors of earlier tests' pipelines have gone."""
    idle(ray_instance)
    return ray_instance


class Counting(Generate):
    """Generate, telling `log` (a folder) which process computed which ids, one file per call, and so that
    the calls spread over the actors: a call waits (up to 2 minutes) until the other actor of the pool has
    started one too. With `fail_at=K`, the K-th call of the run waits until a block is checkpointed under
    `checkpoint`, then says so (`kill-now` in `log`) and waits for the test to kill the pipeline's driver:
    it dies with some blocks written and checkpointed, others not. With `raise_at=K`, that call raises
    instead (the pipeline fails in its driver, which lives on)."""

    def __init__(self, *args, log: str, actors: int = 2, fail_at: int | None = None, checkpoint: str = "",
                 raise_at: int | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.log, self.actors, self.fail_at, self.checkpoint = Path(log), actors, fail_at, Path(checkpoint)
        self.raise_at = raise_at

    def results(self, batch):
        call = self._claim_call()
        _wait_for(lambda: len({p.name.split("-")[0] for p in self.log.glob("*-started")}) >= self.actors)
        # (`raise_at=K`: the K-th call fails, once a block is checkpointed: the pipeline stops with an error)
        if call == self.raise_at:
            _wait_for(lambda: bool(committed_ids(self.checkpoint)))
            raise RuntimeError(f"injected: call {call} of the stage fails")
        if call == self.fail_at:  # the driver is killed (SIGKILL) while this call waits
            _wait_for(lambda: bool(committed_ids(self.checkpoint)))
            (self.log / "kill-now").touch()
            _wait_for(lambda: False, timeout=600)
            raise RuntimeError("the test was to kill this pipeline's driver by now")
        out = super().results(batch)
        ids = [i for i, e in zip(out.column("id").to_pylist(), out.column("error").to_pylist(), strict=True)
               if e is None]  # fmt: skip
        (self.log / f"{os.getpid()}-{call}.json").write_text(json.dumps(sorted(set(ids))))
        return out

    def _claim_call(self) -> int:
        n = 1
        while True:
            try:
                os.close(os.open(self.log / f"call-{n}", os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                n += 1
        (self.log / f"{os.getpid()}-started").touch()
        return n


def idle(ray) -> None:
    """Wait until the actors of pipelines that ended (or died) have gone and every CPU is free again: a dead
    pipeline's actors go when its last references do, and a new pipeline needs their CPUs."""
    import gc

    gc.collect()
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2)
    assert ray.available_resources().get("CPU", 0) >= 2, "actors of an earlier pipeline still hold CPUs"


def _wait_for(cond, timeout: float = 120.0) -> None:
    """An event, not a delay: returns as soon as `cond()` holds (the timeout only guards against a hang)."""
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running (a zombie, killed and not reaped yet, computes nothing)."""
    stat = _proc(pid, "stat")
    return bool(stat) and stat.rsplit(b")", 1)[-1].split()[0] != b"Z"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def kill_ray_of(pgid: int) -> None:
    """SIGKILL a driver's process group (its Ray instance: GCS, raylet) and that raylet's workers, which Ray
    starts in process groups of their own (found by RAY_RAYLET_PID in their environment), then wait until every
    one is gone: a worker left running could still write and checkpoint a block after the run that carries on
    has read the checkpoint, and the output would hold that block twice (CI, 2026-12-05: 12 rows)."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    raylets = {str(p) for p in pids if b"raylet" in _proc(p, "cmdline") and _pgid(p) == pgid}
    # (a driver that ended has taken its group along, or most of it)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    marks = {f"RAY_RAYLET_PID={r}".encode() for r in raylets}
    workers = [p for p in pids if marks & set(_proc(p, "environ").split(b"\0"))]
    for p in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    _wait_for(lambda: not any(_alive(p) for p in workers))
    assert not any(_alive(p) for p in workers), "a Ray worker of the killed driver is still running"


def computed(log: Path) -> tuple[list[str], set[str]]:
    """(every id computed, as often as it was; the processes that computed them) from a `Counting` log."""
    ids, pids = [], set()
    for p in log.glob("*-*.json"):
        ids += json.loads(p.read_text())
        pids.add(p.name.split("-")[0])
    return ids, pids


def rows_of(n: int) -> list[dict]:
    return [
        {"id": f"r{i:03d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "topic": i % 7} for i in range(n)
    ]


def assert_same_as(got, ref) -> None:
    """Ray results equal the local run's: same (id, sample) keys, tokens and text exactly, log-probs within 1e-4,
    passthrough kept."""
    got = got.sort_values(["id", "sample"]).reset_index(drop=True)
    ref = ref.sort_values(["id", "sample"]).reset_index(drop=True)
    assert list(zip(got["id"], got["sample"].astype(int), strict=True)) == list(
        zip(ref["id"], ref["sample"].astype(int), strict=True)
    )
    assert [list(t) for t in got["token_ids"]] == [list(t) for t in ref["token_ids"]]
    for col in ("text", "finish_reason", "prompt", "prompt_tokens", "completion_tokens", "topic"):
        assert got[col].tolist() == ref[col].tolist(), col
    for a, b in zip(got["token_logprobs"], ref["token_logprobs"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)
    assert got["cumulative_logprob"].tolist() == pytest.approx(ref["cumulative_logprob"].tolist(), abs=1e-3)


def through_ray(ray, tmp_path, model, rows_file, params, **kw):
    """The rows of `rows_file` through a pool of 2 `Counting` actors: (results DataFrame, processes used)."""
    from ray.data import ActorPoolStrategy

    log = tmp_path / "log"
    log.mkdir()
    ds = ray.data.read_json(str(rows_file)).repartition(8)
    out = runner.ray.apply(
        Counting, ds, model, params, num_cpus=ACTOR_CPUS, batch_size=16, log=str(log),
        map_kwargs={"compute": ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1)}, **kw,
    ).to_pandas()  # fmt: skip
    return out, computed(log)[1]


@slow
def test_tiny_model_on_two_actors_equals_a_local_run_and_invalid_rows_are_error_rows(
    ray_local, tmp_path, tiny_gpt2
):
    rows = rows_of(44)
    params = runner.GenerationParams(max_new_tokens=8, temperature=0.8, num_return_sequences=2, seed=11)
    _, ref = reference_run(tmp_path, tiny_gpt2, rows, params, runner.EngineOptions())
    bad = [
        {"id": "empty", "prompt": "   ", "topic": 1},
        {"id": "hot", "prompt": "x", "temperature": -1.0, "topic": 2},
        {"id": None, "prompt": "no id", "topic": 3},
        {"id": "nothing", "topic": 4},
    ]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows[:20] + bad + rows[20:])
    out, pids = through_ray(ray_local, tmp_path, tiny_gpt2, mixed, params)
    assert len(pids) == 2  # both actors computed rows
    assert_same_as(out[out["error"].isna()], ref)
    errors = out[out["error"].notna()].set_index("topic")["error"].to_dict()
    assert errors == {
        1: "prompt: prompt is only whitespace ('   ')",
        2: "temperature: temperature must be >= 0, got -1.0.",
        3: "id: missing: rows on Ray Data need their own id (results and checkpoints are keyed on it)",
        4: "prompt: missing (each row needs 'prompt' or 'messages'; the row has 'id', 'topic'; prompt_field or "
        "template names the one to use)",
    }
    assert out.columns.tolist() == [*ref.columns[:-1], "settings", "error", "topic"]


def committed_ids(ckpt: Path) -> set[str]:
    """The ids Ray's checkpoint under `ckpt` vouches for (committed files; `.pending.parquet` ones are not)."""
    import pyarrow.parquet as pq

    return {i for p in ckpt.glob("*.parquet") if p.suffixes == [".parquet"]
            for i in pq.read_table(p).column("id").to_pylist()}  # fmt: skip


def checkpointed_pipeline(ray, root: Path, model: str, params, log: Path, **kw) -> None:
    """ROOT/in/*.jsonl -> `Counting` (2 actors) -> ROOT/out/*.parquet, checkpointed in ROOT/ckpt by id. On 2 CPUs:
    the 2 actors, Ray's CheckpointFilter actor (1 CPU; a pool of 1, not up to 10) and the read and write tasks
    all fit at once, so nothing waits for a CPU another stage holds."""
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = runner.ray.checkpoint_config(str(root / "ckpt"))
    ctx.checkpoint_config.checkpoint_actor_pool_max_size = 1
    try:
        log.mkdir()
        ds = ray.data.read_json(str(root / "in"), ray_remote_args={"num_cpus": 0.25})
        pool = ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1)
        runner.ray.apply(
            Counting, ds, model, params, num_cpus=0.25, batch_size=6, map_kwargs={"compute": pool},
            log=str(log), actors=1, checkpoint=str(root / "ckpt"), **kw,
        ).write_parquet(str(root / "out"), ray_remote_args={"num_cpus": 0.25})  # fmt: skip
    finally:
        ctx.checkpoint_config = None


def _driver(name: str, tmp_path, model: str, rows: list) -> subprocess.Popen:
    """test_ray.NAME(tmp_path, model) in a process of its own (its Ray its own), over `rows` written to in/ as
    files of six rows each: one block each, read (and filtered) on its own."""
    (tmp_path / "in").mkdir()
    for k in range(0, len(rows), 6):
        write_jsonl(tmp_path / "in" / f"part-{k // 6}.jsonl", rows[k : k + 6])
    code = f"import test_ray; test_ray.{name}({str(tmp_path)!r}, {model!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def dying_driver(root: str, model: str) -> None:
    """A cluster job's driver, in a process of its own (with a Ray instance of its own): the checkpointed
    pipeline, which stops at its 4th call for the test to kill this process and its Ray."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 1024**2)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    params = runner.GenerationParams(**CHECKPOINT_PARAMS)
    checkpointed_pipeline(ray, Path(root), model, params, Path(root) / "run1", fail_at=4)


CHECKPOINT_PARAMS = {"max_new_tokens": 6, "seed": 5}
RAISING_PARAMS = {"max_new_tokens": 5, "seed": 4, "temperature": 0.9}


def raising_driver(root: str, model: str) -> None:
    """A script's driver, in a process of its own (with a Ray instance of its own): the checkpointed pipeline,
    whose stage raises on its 3rd call; the script ends with that error, as a user's does."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 1024**2)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    params = runner.GenerationParams(**RAISING_PARAMS)
    checkpointed_pipeline(ray, Path(root), model, params, Path(root) / "run1", raise_at=3)


@slow
def test_checkpointed_pipeline_whose_driver_was_killed_resumes_without_recomputing(
    ray_local, tmp_path, tiny_gpt2
):
    import pyarrow.parquet as pq

    rows = rows_of(48)
    params = runner.GenerationParams(**CHECKPOINT_PARAMS)
    _, ref = reference_run(tmp_path, tiny_gpt2, rows, params, runner.EngineOptions())
    driver = _driver("dying_driver", tmp_path, tiny_gpt2, rows)  # eight files of six rows: eight blocks
    try:
        _wait_for(lambda: (tmp_path / "run1" / "kill-now").exists() or driver.poll() is not None, timeout=300)
        assert (tmp_path / "run1" / "kill-now").exists(), driver.communicate()[1][-3000:]
    finally:
        kill_ray_of(driver.pid)  # the driver, its Ray instance and its workers, every one gone
        driver.wait()
    committed = committed_ids(tmp_path / "ckpt")
    assert 0 < len(committed) < len(rows)
    checkpointed_pipeline(ray_local, tmp_path, tiny_gpt2, params, tmp_path / "run2")
    again, _ = computed(tmp_path / "run2")
    assert not committed & set(again), "a checkpointed id was computed again"
    # (not `committed | again == every id`: the killed driver's Ray processes outside its process group may still
    # commit a block after `committed` was read, as once under load in CI; then run2 rightly skips it. Nothing
    # lost, nothing twice is checked on the output itself, below)
    assert len(again) == len(set(again)) and set(again) <= {r["id"] for r in rows}
    got = pq.read_table(tmp_path / "out").to_pandas()
    assert sorted(got["id"]) == sorted(r["id"] for r in rows)  # every row once: nothing lost, nothing twice
    assert_same_as(got, ref)
    print(f"checkpointed when the driver was killed: {len(committed)} ids; computed after: {len(again)}")


@slow
def test_score_and_embed_equal_local_jobs(ray_local, tmp_path, tiny_gpt2):
    import numpy as np

    from runner.jobs import create_job
    from runner.worker import run_job

    texts = [{"id": f"t{i}", "text": f"{PROMPTS[i % len(PROMPTS)]} {i}"} for i in range(10)]
    texts.append({"id": "pair", "context": "The quick brown", "continuation": " fox"})
    path = write_jsonl(tmp_path / "t.jsonl", texts)
    for params, stage in ((ScoreParams(), runner.ray.score), (EmbedParams(), runner.ray.embed)):
        if isinstance(params, EmbedParams):
            path = write_jsonl(tmp_path / "e.jsonl", texts[:-1])
        job = create_job(path, tiny_gpt2, params, job_dir=tmp_path / type(params).__name__)
        run_job(job, echo=None)
        ref = runner.load_results(job.dir).sort_values("id").reset_index(drop=True)
        ds = ray_local.data.read_json(str(path))
        got = (
            stage(ds, tiny_gpt2, params, num_cpus=ACTOR_CPUS)
            .to_pandas()
            .sort_values("id")
            .reset_index(drop=True)
        )
        assert got["error"].isna().all() and got.columns.tolist() == [*ref.columns, "error"]
        if isinstance(params, ScoreParams):
            assert got["token_ids"].map(list).tolist() == ref["token_ids"].map(list).tolist()
            assert got["logprob"].tolist() == pytest.approx(ref["logprob"].tolist(), abs=1e-4)
            assert got["is_greedy"].tolist() == ref["is_greedy"].tolist()
        else:
            assert np.allclose(np.stack(got["embedding"]), np.stack(ref["embedding"]), atol=1e-4)


@slow
def test_demo_model_on_two_actors_equals_a_local_run(ray_local, tmp_path):
    rows = rows_of(40)
    params = runner.GenerationParams(max_new_tokens=6, seed=3)
    _, ref = reference_run(tmp_path, "smollm2-135m-instruct", rows, params, runner.EngineOptions())
    out, pids = through_ray(ray_local, tmp_path, "smollm2-135m-instruct", tmp_path / "p.jsonl", params)
    assert len(pids) == 2 and out["error"].isna().all()
    assert_same_as(out, ref)


def test_a_stage_has_the_structured_output_and_beam_columns_of_a_local_job(tmp_path, tiny_gpt2):
    """Constrained rows get constraint_complete and beam rows beam_score, as in a local job's results; a row
    asking for one the stage was not built with is an error row naming its field."""
    import pyarrow as pa

    params = runner.GenerationParams(max_new_tokens=6, seed=1, regex="[ab]{1,3}")
    rows = [
        {"id": "r", "prompt": "Hello", "choices": None},  # from_pylist takes its columns from the first row
        {"id": "c", "prompt": "Hi", "choices": ["yes", "no"]},
    ]
    _, ref = reference_run(tmp_path, tiny_gpt2, rows, params, runner.EngineOptions())
    out = Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows)).to_pandas()
    assert out["constraint_complete"].tolist() == ref["constraint_complete"].tolist()
    assert out["text"].tolist() == ref["text"].tolist()
    beams = runner.GenerationParams(max_new_tokens=4, num_beams=2, num_return_sequences=2)
    brows = [{"id": "b", "prompt": "The old man"}]
    (tmp_path / "b").mkdir()
    _, bref = reference_run(tmp_path / "b", tiny_gpt2, brows, beams, runner.EngineOptions())
    bout = Generate(tiny_gpt2, beams)(pa.Table.from_pylist(brows)).to_pandas()
    assert bout["beam_score"].tolist() == pytest.approx(bref["beam_score"].tolist())
    plain = Generate(tiny_gpt2, runner.GenerationParams(max_new_tokens=2, seed=1))
    asking = plain(pa.Table.from_pylist([{"id": "x", "prompt": "Hi", "regex": "a+"}])).to_pandas()
    assert asking.loc[0, "error"].startswith("response_format: this row asks for constraint")
    # two rows' own schemas in one Arrow batch: each keeps only its own keys (Arrow fills the others with null)
    a = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    b = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    rows = [{"id": "a", "prompt": "Name:", "json_schema": a}, {"id": "b", "prompt": "Age:", "json_schema": b}]
    out = Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows)).to_pandas()
    assert out["error"].isna().all(), out["error"].tolist()


def test_a_row_whose_parser_gives_up_is_an_error_row_of_the_stage(tmp_path, tiny_gpt2):
    """A row whose grammar's matcher gives up mid-sample (a parser limit of llguidance's) is an error row with
    llguidance's word, not a row the model stopped; the row beside it is its local run's."""
    import pyarrow as pa
    from test_structured import WIDE

    params = runner.GenerationParams(max_new_tokens=40, seed=1, regex="[ab]{1,3}")
    rows = [{"id": "w", "prompt": "Hello", "grammar": WIDE}, {"id": "p", "prompt": "Hi", "grammar": None}]
    out = Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows)).to_pandas().set_index("id")
    assert out.loc["w", "error"].startswith("constraint_error: grammar: llguidance's parser gave up at token")
    assert "Current row has 21" in out.loc["w", "error"] and pd_isna(out.loc["w", "text"])
    _, ref = reference_run(tmp_path, tiny_gpt2, rows[1:], params, runner.EngineOptions())
    assert pd_isna(out.loc["p", "error"]) and out.loc["p", "text"] == ref["text"][0]


def test_checkpoint_config_is_keyed_on_the_stage_id_field_not_an_output_column():
    """The results name the ids `id` whatever input column they came from: Ray's `id_column` (one name for the
    input and the results) is refused with the option to use."""
    from runner.errors import ParamError

    with pytest.raises(ParamError, match="checkpoint_config takes id_field='key'"):
        runner.ray.checkpoint_config("/tmp/ckpt", id_column="key")
    assert runner.ray.checkpoint_config("/tmp/ckpt", id_field="key").id_column == "id"


@slow
# (integer ids in the default `id` column take the same path as in `key`: not run a third time, ~60 s of Ray)
@pytest.mark.parametrize("text, key", [(True, "id"), pytest.param(False, "key", marks=pytest.mark.deep)])
def test_integer_ids_and_a_row_without_id_resume_from_a_checkpoint(ray_local, tmp_path, tiny_gpt2, text, key):
    """A stage takes integer ids (text in its results, as in a local job), but Ray's checkpoint filter compared
    the input's integers with the text ids written: every run after the first stopped with a TypeError in
    CheckpointFilter, so a pipeline with integer ids could never resume. A row without id (an error row with a
    null id, checkpointed as null) stopped every run after the first too, text ids or not, as Ray sorted the
    ids written; it has no id to be found by, so each run gives its error row again. With ids in another column
    (`id_field="key"`; the results name it `id`), Ray keyed both sides on `key` and every write failed."""
    import pyarrow.parquet as pq

    rows = [{key: f"{i}" if text else i, "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"} for i in range(12)]
    rows[2][key] = None
    params = runner.GenerationParams(max_new_tokens=2, seed=1)
    ctx = ray_local.data.DataContext.get_current()
    (tmp_path / "in").mkdir()
    out, written = tmp_path / "out", []
    try:
        for k in range(2):  # the first half, then both: the second run finds the first half in the checkpoint
            write_jsonl(tmp_path / "in" / f"part-{k}.jsonl", rows[6 * k : 6 * k + 6])
            ctx.checkpoint_config = runner.ray.checkpoint_config(
                str(tmp_path / "ckpt"), id_field=key, delete_checkpoint_on_success=False
            )
            ctx.checkpoint_config.checkpoint_actor_pool_max_size = 1
            before = set(out.glob("*.parquet"))
            ds = ray_local.data.read_json(str(tmp_path / "in"), ray_remote_args={"num_cpus": 0.25})
            runner.ray.generate(ds, tiny_gpt2, params, num_cpus=ACTOR_CPUS, id_field=key).write_parquet(
                str(out), ray_remote_args={"num_cpus": 0.25}
            )
            new = set(out.glob("*.parquet")) - before
            written.append(sorted(str(i) for p in new for i in pq.read_table(p).column("id").to_pylist()))
    finally:
        ctx.checkpoint_config = None
    assert written == [sorted(["None", *(str(i) for i in range(6) if i != 2)]),
                       sorted(["None", *(str(i) for i in range(6, 12))])]  # fmt: skip


@slow
def test_a_checkpointed_pipeline_of_a_hub_model_finishes_on_the_commit_it_started_on(
    ray_local, tmp_path, tiny_gpt2, monkeypatch
):
    """A checkpointed pipeline of a hub model stops part done (its checkpoint kept); an update of the model is
    pushed; the script runs again: the rows left come from the commit the first rows came from (they came from
    the new one), the checkpoint (with the commit kept in it) read by Ray as before, and deleted with it once
    the run succeeds."""
    import pyarrow.parquet as pq
    from test_adv_model_changes import HUB_ID, SNAPSHOTS, _hub_cache

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    rows, params = rows_of(12), runner.GenerationParams(max_new_tokens=4)
    answers = {}
    for commit in sorted(SNAPSHOTS, reverse=True):  # (refs/main left at the first)
        main.write_text(commit)
        job, _ = runner.run(write_jsonl(tmp_path / f"ref-{commit[0]}.jsonl", rows), HUB_ID, params, echo=None)
        answers[commit] = runner.load_results(job.dir).set_index("id")["text"].to_dict()
    assert answers[min(SNAPSHOTS)] != answers[max(SNAPSHOTS)]
    hub = {
        "HF_HUB_CACHE": os.environ["HF_HUB_CACHE"],
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RUNNER_CACHE": os.environ["RUNNER_CACHE"],
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    ctx = ray_local.data.DataContext.get_current()
    (tmp_path / "in").mkdir()
    out, written = tmp_path / "out", []
    try:
        for k in range(2):  # the first half, kept in the checkpoint; then both after the update
            write_jsonl(tmp_path / "in" / f"part-{k}.jsonl", rows[6 * k : 6 * k + 6])
            ctx.checkpoint_config = runner.ray.checkpoint_config(
                str(tmp_path / "ckpt"), delete_checkpoint_on_success=k == 1
            )
            ctx.checkpoint_config.checkpoint_actor_pool_max_size = 1
            before = set(out.glob("*.parquet"))
            ds = ray_local.data.read_json(str(tmp_path / "in"), ray_remote_args={"num_cpus": 0.25})
            runner.ray.generate(ds, HUB_ID, params, num_cpus=ACTOR_CPUS,
                                map_kwargs={"runtime_env": {"env_vars": hub}}).write_parquet(
                str(out), ray_remote_args={"num_cpus": 0.25})  # fmt: skip
            written.append(pq.read_table(sorted(set(out.glob("*.parquet")) - before)).to_pandas())
            main.write_text(max(SNAPSHOTS))
    finally:
        ctx.checkpoint_config = None
    assert [sorted(w["id"]) for w in written] == [[r["id"] for r in rows[:6]], [r["id"] for r in rows[6:]]]
    got = {i: t for w in written for i, t in zip(w["id"], w["text"], strict=True)}
    assert got == answers[min(SNAPSHOTS)]
    assert not (tmp_path / "ckpt").exists()


@slow
def test_the_stages_of_a_real_pipeline_keep_their_pins_apart(ray_local, tmp_path, tiny_gpt2, monkeypatch):
    """Ray's own logical plan (the other tests stand in for it) says which stages of runner are upstream: a
    checkpointed pipeline generating with a hub model at one commit, scoring with it at another, then with a
    model folder keeps a commit for each hub stage and the folder's fingerprint, and built again after an update
    of the hub model (its restart) gives each actor the same commit (built only: nothing runs)."""
    from test_adv_model_changes import HUB_ID, SNAPSHOTS, _hub_cache

    from runner import models

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    ctx = ray_local.data.DataContext.get_current()
    revisions = []
    try:
        for _ in range(2):
            ctx.checkpoint_config = runner.ray.checkpoint_config(str(tmp_path / "ckpt"))
            ds = ray_local.data.from_items(rows_of(2))
            ds = runner.ray.generate(ds, HUB_ID, revision=first)
            ds = runner.ray.score(ds.rename_columns({"text": "answer"}), HUB_ID, revision=second)
            ds = runner.ray.score(ds, tiny_gpt2)
            op, found = ds._logical_plan.dag, []
            while op.input_dependencies:
                found.append((getattr(op, "fn_constructor_kwargs", None) or {}).get("revision", "-"))
                op = op.input_dependencies[0]
            revisions.append(found)
            main.write_text(second)
    finally:
        ctx.checkpoint_config = None
    assert revisions == [[None, second, "-", first]] * 2
    kept = json.loads((tmp_path / "ckpt" / "_runner" / "pins.json").read_text())
    assert kept["commits"] == {HUB_ID: first, f"{HUB_ID}#2": second}
    assert kept["fingerprints"] == {
        tiny_gpt2: models.model_fingerprint(tiny_gpt2, models.load_config(tiny_gpt2))
    }


@slow
@pytest.mark.deep
def test_a_pipeline_whose_stage_raised_mid_run_resumes_with_row_settings_and_error_rows_once(
    ray_local, tmp_path, tiny_gpt2
):
    """A checkpointed pipeline whose stage raises on its 3rd batch (some blocks written and checkpointed) fails
    in its driver; the same pipeline run again in that driver finishes: rows with their own settings (a
    temperature, n, max_tokens, stop, seed) and integer ids equal an uninterrupted local run, error rows of
    rows with ids are written once, no row is computed twice or lost."""
    import pyarrow.parquet as pq

    settings = [{"temperature": 0.5, "n": 2}, {"max_tokens": 2, "seed": 9}, {"stop": ["e"], "top_k": 4}, {}]
    rows = [{**r, **settings[i % 4]} for i, r in enumerate(rows_of(22))]
    for r in rows[
        16:
    ]:  # (the last file's ids are integers, text in the results; Arrow reads no file of both)
        r["id"] = int(r["id"][1:])
    params = runner.GenerationParams(**RAISING_PARAMS)
    _, ref = reference_run(tmp_path, tiny_gpt2, rows, params, runner.EngineOptions())
    bad = [{"id": "cold", "prompt": "x", "temperature": -1.0, "topic": 100},
           {"id": "blank", "prompt": " ", "topic": 101}]  # fmt: skip
    every = rows[:11] + bad + rows[11:]
    driver = _driver("raising_driver", tmp_path, tiny_gpt2, every)  # four files of six rows: four blocks
    try:
        said = driver.communicate(timeout=300)[1].decode(errors="replace")
    finally:
        kill_ray_of(driver.pid)  # (what its Ray left running, every one gone)
    assert driver.returncode != 0 and "injected: call 3 of the stage fails" in said, said[-3000:]
    committed = committed_ids(tmp_path / "ckpt")
    assert 0 < len(committed) < len(every)
    checkpointed_pipeline(ray_local, tmp_path, tiny_gpt2, params, tmp_path / "run2")
    again, _ = computed(tmp_path / "run2")
    assert not committed & set(again) and len(again) == len(set(again))
    got = pq.read_table(tmp_path / "out").to_pandas()
    assert sorted(got.loc[got["error"].notna(), "id"]) == ["blank", "cold"]
    assert_same_as(got[got["error"].isna()], ref)
