"""Static batches in fixed slots (runner/graphs.py, `EngineOptions.cuda_graphs`): each row gets exactly what it
gets alone and what the engine's own decode gives it, whatever its companions do, while every slot computes to
the end of the batch. On a CPU the steps run eagerly; on a GPU (gpu_check.sh sets RUNNER_TEST_DEVICE=cuda) they
are recorded as CUDA graphs and replayed, and these same tests check the replays."""

import contextlib
import types

import pytest
import torch
from test_refill import PROMPTS, assert_same, ids_of, rows_that_end_apart

from runner import EngineOptions
from runner import graphs as graphs_mod
from runner.engine import Engine


@pytest.fixture
def static(monkeypatch):
    """Switch an engine to fixed-slot decoding; count the batches and steps that took that path."""

    def install(engine):
        seen = {"batches": 0, "steps": [], "graphs": 0}
        real_init, real_step = graphs_mod.StaticBatch.__init__, graphs_mod.StaticBatch.step

        def init(self, *args, **kwargs):
            seen["batches"] += 1
            real_init(self, *args, **kwargs)

        def step(self, slots, tokens):
            out = real_step(self, slots, tokens)
            seen["steps"].append((self.ids.shape[0], slots.shape[0], self.end))
            seen["graphs"] = max(seen["graphs"], len(self.recorded))
            return out

        monkeypatch.setattr(graphs_mod.StaticBatch, "__init__", init)
        monkeypatch.setattr(graphs_mod.StaticBatch, "step", step)
        monkeypatch.setattr(engine, "static_decode", True)
        return seen

    return install


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_fixed_slots_equal_the_dynamic_decode_and_one_at_a_time(request, monkeypatch, static, engine_name):
    """Rows with their own settings (sampling, penalties, alternatives, prompt log-probs, held EOS) and lengths
    end at different steps by EOS, stop strings and their own max_new_tokens; their slots keep computing. Every
    row equals its run alone and the engine's own (dynamic) decode of the same batch."""
    engine = request.getfixturevalue(engine_name)
    prompts, params, seeds, alone = rows_that_end_apart(engine, monkeypatch)
    dynamic = engine.generate(prompts, params, seeds)
    seen = static(engine)
    got = engine.generate(prompts, params, seeds)
    assert_same(got, alone)
    assert_same(got, dynamic)
    assert {c.finish_reason for c in got} == {"stop", "length"} and any(c.stop_reason for c in got)
    assert seen["batches"] == 1
    slots = {n for n, _, _ in seen["steps"]}
    active = [a for _, a, _ in seen["steps"]]
    assert slots == {len(prompts)} and active[0] == len(prompts) and active[-1] < len(prompts)
    assert len(seen["steps"]) == max(len(c.token_ids) for c in got) - 1


def test_attention_windows_grow_by_graph_columns(gpt2_engine, static, monkeypatch):
    """A step attends over the first `end` key columns, the next multiple of GRAPH_COLUMNS (one graph each on a
    GPU), never past the batch's capacity (its prompt width + max_new_tokens, what the token budget counted)."""
    from runner import GenerationParams

    monkeypatch.setattr(graphs_mod, "GRAPH_COLUMNS", 4)
    prompts = ids_of(gpt2_engine)[:3]
    width = max(len(p) for p in prompts)
    params = GenerationParams(max_new_tokens=9, min_new_tokens=9)
    dynamic = gpt2_engine.generate(prompts, params)
    seen = static(gpt2_engine)
    assert_same(gpt2_engine.generate(prompts, params), dynamic)
    ends = [end for _, _, end in seen["steps"]]
    cols = range(width, width + 8)  # the columns the 8 decode steps write (the first token is the prefill's)
    assert ends == [min(width + 9, -(-(c + 1) // 4) * 4) for c in cols]
    if (
        gpt2_engine.device.type == "cuda"
    ):  # a graph per window of two steps or more (the first is the warm-up)
        assert seen["graphs"] == sum(ends.count(end) >= 2 for end in set(ends)) >= 1


def test_not_taken_with_continuous_batching_few_new_tokens_or_an_unmergeable_cache(
    gpt2_engine, static, monkeypatch
):
    """Fixed slots need the whole batch at once and one merged cache: rows that join a running batch
    (max_active) and caches transformers keeps (sliding windows...) decode as before."""
    from runner import GenerationParams

    prompts = ids_of(gpt2_engine)[:4]
    params = GenerationParams(max_new_tokens=3)
    seen = static(gpt2_engine)
    gpt2_engine.generate(prompts, params, max_active=2)
    assert seen["batches"] == 0
    gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=graphs_mod.MIN_NEW_TOKENS - 1))
    assert seen["batches"] == 0  # too few new tokens for a graph: not worth the buffers' copy
    monkeypatch.setattr(gpt2_engine, "_merge_caches", False)
    gpt2_engine.generate(prompts, params)
    assert seen["batches"] == 0


def test_the_option_is_checked_and_off_on_a_cpu(tiny_gpt2):
    """cuda_graphs is a GPU lever: on a CPU the engine decodes as always (the tests above switch the fixed
    slots on by hand), and a non-boolean value names the option."""
    from runner.errors import ParamError

    with pytest.raises(ParamError, match="cuda_graphs must be true or false"):
        EngineOptions(cuda_graphs="yes")
    with pytest.warns(RuntimeWarning, match="cuda_graphs is a GPU lever .* not taken on cpu"):
        engine = Engine(tiny_gpt2, EngineOptions(device="cpu", cuda_graphs=True))
    assert not engine.static_decode and not engine.speedups["cuda_graphs"]


class FakeCuda:
    """torch.cuda's graph API as the engine uses it, on a CPU: recording runs the step and then undoes what it
    moved on (the write column, positions and logits; the column it wrote is written again), as a real capture
    runs nothing; a replay runs the recorded step again."""

    def __init__(self, empty: bool = False):
        self.batch, self.recorded, self.replays, self.in_device = None, 0, 0, False
        self.empty = empty  # replays run nothing, as a graph that recorded none of the step's kernels

    @contextlib.contextmanager
    def device(self, device):
        assert device == self.batch.col.device
        self.in_device = True
        yield
        self.in_device = False

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                if not fake.empty:
                    fake.batch._run()

        return Graph()

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        assert stream is not None and self.in_device  # captured on the batch's own GPU and stream
        col, pos, logits = self.batch.col.clone(), self.batch.pos.clone(), self.batch.logits.clone()
        yield
        self.batch.col.copy_(col)
        self.batch.pos.copy_(pos)
        self.batch.logits.copy_(logits)
        self.recorded += 1

    def graph_pool_handle(self):
        return object()

    def Stream(self, device=None):  # noqa: N802
        return types.SimpleNamespace(wait_stream=lambda other: None)

    def current_stream(self, device=None):
        return self.Stream()

    def stream(self, s):
        return contextlib.nullcontext()


def faked_graphs(engine, monkeypatch, empty: bool = False) -> FakeCuda:
    """torch.cuda's graph calls replaced by a FakeCuda, and every StaticBatch recording graphs (on a CPU)."""
    if engine.device.type != "cpu":
        pytest.skip("a CPU stand-in for torch.cuda's graphs; on a GPU the tests above record real ones")
    fake = FakeCuda(empty)
    monkeypatch.setattr(graphs_mod, "GRAPH_COLUMNS", 4)
    for name in ("CUDAGraph", "graph", "graph_pool_handle", "Stream", "current_stream", "stream", "device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    real_init = graphs_mod.StaticBatch.__init__

    def init(self, engine, cache, lens, extra, graphs):
        real_init(self, engine, cache, lens, extra, True)
        fake.batch = self

    monkeypatch.setattr(graphs_mod.StaticBatch, "__init__", init)
    return fake


def test_each_window_is_warmed_up_recorded_then_replayed(gpt2_engine, static, monkeypatch):
    """The graph bookkeeping, with torch.cuda's graph calls faked on a CPU: per attention window the first step
    runs eagerly (the warm-up), the second is recorded and replayed at once, every later one replayed; the
    rows still equal the usual decode (a recording that moved the column on would shift every later token)."""
    from runner import GenerationParams

    prompts = ids_of(gpt2_engine)[:3]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in (13, 5, 9)]
    dynamic = gpt2_engine.generate(prompts, params)
    seen = static(gpt2_engine)
    fake = faked_graphs(gpt2_engine, monkeypatch)
    monkeypatch.setattr(gpt2_engine, "_static_checked", set())
    assert_same(gpt2_engine.generate(prompts, params), dynamic)
    assert gpt2_engine._static_checked == {False, True}  # the first eager step and the first replay
    ends = [end for _, _, end in seen["steps"]]
    windows = {end: ends.count(end) for end in ends}
    assert fake.recorded == sum(n >= 2 for n in windows.values()) >= 2
    assert fake.replays == sum(n - 1 for n in windows.values() if n >= 2)


@pytest.mark.filterwarnings("ignore:cuda_graphs is a GPU lever")
def test_a_worker_loads_the_engine_again_for_a_job_that_differs_in_cuda_graphs(tmp_path, tiny_gpt2):
    """The engine picks its decode path when it loads, so the worker's engine cache tells jobs with and without
    --cuda-graphs apart (a job without must not decode in fixed slots because the one before asked for them)."""
    from runner.jobs import create_job
    from runner.params import GenerationParams
    from runner.scheduler import Engines

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    jobs = [
        create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2),
                   EngineOptions(device="cpu", cuda_graphs=on), job_dir=tmp_path / f"job{on}")
        for on in (False, True)
    ]  # fmt: skip
    engines = Engines(None, None)
    first = engines.get(jobs[0])
    assert engines.get(jobs[0]) is first and engines.get(jobs[1]) is not first


def test_a_job_in_fixed_slots_equals_one_without(tmp_path, tiny_gpt2, gpt2_engine, static):
    """The worker's path (planned batches, -n samples sharing a prompt pass, per-row settings from the file) with
    fixed slots: the same results as the usual decode, each sample once, and the batches really took that path."""
    import json

    import runner
    from runner import GenerationParams

    rows = [{"id": f"r{i}", "prompt": t, "max_tokens": n, **({"temperature": 0.5} if i % 2 else {})}
            for i, (t, n) in enumerate(zip(PROMPTS, (3, 9, 5, 12, 2, 7), strict=False))]  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    params = GenerationParams(max_new_tokens=8, temperature=1.1, num_return_sequences=2, seed=3)
    options = EngineOptions(batch_size=4)
    want, _ = runner.run(prompts, tiny_gpt2, params, options, output=tmp_path / "usual", engine=gpt2_engine,
                         echo=None)  # fmt: skip
    seen = static(gpt2_engine)
    got, _ = runner.run(prompts, tiny_gpt2, params, options, output=tmp_path / "fixed", engine=gpt2_engine,
                        echo=None)  # fmt: skip
    assert seen["batches"] == 3  # 6 rows x 2 samples in batches of 4
    cols = ["id", "sample", "text", "token_ids", "finish_reason"]
    a, b = runner.load_results(got.dir), runner.load_results(want.dir)
    assert len(a) == 12 and a[cols].to_json() == b[cols].to_json()
    for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=True):
        assert list(x) == pytest.approx(list(y), abs=1e-4)


@pytest.mark.slow  # (dynamo tracing the whole model: seconds per engine)
@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_a_fixed_slot_step_traces_as_one_graph(request, engine_name, monkeypatch):
    """What a CUDA graph needs of a step, checked without a GPU: torch.compile's tracer (dynamo's `explain`, no
    compiling) takes the whole step (the model's forward over the SlotLayer cache, the mask and the counters) as
    one graph with no break. A break is where Python reads a tensor's value (`.item()`, `if tensor.all()`) or
    shapes a tensor from a Python number it computed, which a capture would do once on the host (a sync it
    refuses) or bake in stale. A transformers release that adds one to the forward fails here first."""
    import torch._dynamo

    engine = request.getfixturevalue(engine_name)
    found = {}
    real = graphs_mod.StaticBatch.step

    def step(self, slots, tokens):
        if not found:
            self.ids.index_copy_(0, slots, tokens)
            self.end = min(self.capacity, graphs_mod._round_up(self.next_col + 1, graphs_mod.GRAPH_COLUMNS))
            found["explained"] = torch._dynamo.explain(self._run)()
            torch._dynamo.reset()
            self.col.fill_(self.next_col)  # as if the traced step had not run: the real one follows
            self.pos.sub_(1)
        return real(self, slots, tokens)

    monkeypatch.setattr(graphs_mod.StaticBatch, "step", step)
    monkeypatch.setattr(engine, "static_decode", True)
    from runner import GenerationParams

    prompts = ids_of(engine)[:3]
    params = GenerationParams(max_new_tokens=4)
    engine.generate(prompts, params)
    explained = found["explained"]
    assert [str(b.reason) for b in explained.break_reasons] == []
    assert explained.graph_count == 1 and explained.op_count > 20


def test_finished_slots_stay_inside_the_models_positions(gpt2_engine, static):
    """A row with a long prompt and few new tokens beside one with a short prompt and many: each fits the model's
    positions (tiny GPT-2: 256), but the long row's slot, computing on after it ended, must not run its
    positions past them (GPT-2's position embedding: an index error on a CPU, a device-side assert on a GPU)."""
    from runner import GenerationParams

    prompts = ids_of(gpt2_engine)
    long = [t for p in prompts for t in p][:200]
    rows = [long, prompts[-2][:5]]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in (40, 200)]
    assert all(len(p) + q.max_new_tokens <= 256 for p, q in zip(rows, params, strict=True))
    dynamic = gpt2_engine.generate(rows, params)
    seen = static(gpt2_engine)
    assert_same(gpt2_engine.generate(rows, params), dynamic)
    assert seen["batches"] == 1


def test_a_finished_batch_is_freed_at_once(gpt2_engine, static, monkeypatch):
    """A batch's keys/values (and on a GPU its graphs) go when it ends, not at the next full garbage collection:
    the next batch is sized to the memory they take (batching.MEMORY_SHARE)."""
    import gc
    import weakref

    from runner import GenerationParams

    seen = static(gpt2_engine)
    made, counted_init = [], graphs_mod.StaticBatch.__init__

    def init(self, *args, **kwargs):
        counted_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(graphs_mod.StaticBatch, "__init__", init)
    gc.disable()
    try:
        gpt2_engine.generate(ids_of(gpt2_engine)[:3], GenerationParams(max_new_tokens=4))
        alive = [ref() is not None for ref in made]
    finally:
        gc.enable()
    assert seen["batches"] == 1 and alive == [False]


def test_models_on_eager_attention_decode_as_before(tiny_gpt2, static, monkeypatch):
    """Eager attention adds a 4D mask to the scores: the fixed slots' boolean mask would add 1 where it should
    mask (padded rows silently wrong). Such models (no sdpa for their architecture) keep the engine's decode."""
    import runner.engine as engine_module
    from runner import GenerationParams

    real_load = engine_module.load_model

    def load_eager(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.set_attn_implementation("eager")
        return model

    monkeypatch.setattr(engine_module, "load_model", load_eager)
    engine = Engine(tiny_gpt2, EngineOptions(device="cpu"))
    assert engine.model.config._attn_implementation == "eager"
    prompts = ids_of(engine)[:4]
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    dynamic = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert_same(dynamic, alone)
    seen = static(engine)
    assert_same(engine.generate(prompts, params), dynamic)
    assert seen["batches"] == 0


class FailingCuda(FakeCuda):
    """FakeCuda whose captures fail as torch's do when the step waits for the host (`.item()`, a tensor in an
    `if`): torch.cuda.graph's __exit__ raises from capture_end() with the capture stream still current."""

    def __init__(self):
        super().__init__()
        self.main = self.current = self.Stream()
        self.attempts = 0

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        self.attempts += 1
        self.current = self.Stream()
        col, pos = self.batch.col.clone(), self.batch.pos.clone()
        yield  # (the step ran here: undone, as a capture runs nothing)
        self.batch.col.copy_(col)
        self.batch.pos.copy_(pos)
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def current_stream(self, device=None):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        yield
        self.current = before

    def set_stream(self, s):
        self.current = s


def test_a_failed_capture_decodes_eagerly_and_is_not_tried_again(gpt2_engine, static, monkeypatch):
    """A capture that fails leaves the batch to eager fixed-slot steps (rows as the usual decode), puts back the
    stream torch left switched to the capture's, warns once, and the engine's later batches use its own decode
    instead of failing (and leaking a capture pool) batch after batch."""
    if gpt2_engine.device.type != "cpu":
        pytest.skip("a CPU stand-in for torch.cuda's graphs")
    from runner import GenerationParams

    fake = FailingCuda()
    monkeypatch.setattr(graphs_mod, "GRAPH_COLUMNS", 4)
    for name in (
        "CUDAGraph",
        "graph",
        "graph_pool_handle",
        "Stream",
        "current_stream",
        "stream",
        "set_stream",
        "device",
    ):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name), raising=False)
    prompts = ids_of(gpt2_engine)[:3]
    params = GenerationParams(max_new_tokens=7, min_new_tokens=7)
    dynamic = gpt2_engine.generate(prompts, params)
    seen = static(gpt2_engine)
    real_init = graphs_mod.StaticBatch.__init__

    def init(self, engine, cache, lens, extra, graphs):
        real_init(self, engine, cache, lens, extra, True)
        fake.batch = self

    monkeypatch.setattr(graphs_mod.StaticBatch, "__init__", init)
    with pytest.warns(UserWarning, match="CUDA graph capture failed") as caught:
        assert_same(gpt2_engine.generate(prompts, params), dynamic)
        assert_same(gpt2_engine.generate(prompts, params), dynamic)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert fake.attempts == 1 and fake.current is fake.main
    assert seen["batches"] == 1 and not gpt2_engine.static_decode


def test_a_model_that_does_not_take_the_mask_as_given_decodes_its_own_way(gpt2_engine, static, monkeypatch):
    """The engine's first step in fixed slots is checked against the most padded row alone: a forward that does
    not take the 4D mask as given (here: every column attended, padding included, as a model building ALiBi from
    a 2D mask might) is caught there, the batch is decoded again the engine's own way, and so is every later
    one; a model that takes it passes the check once."""
    from runner import GenerationParams

    prompts = ids_of(gpt2_engine)[:4]
    params = GenerationParams(max_new_tokens=5)
    usual = gpt2_engine.generate(prompts, params)
    seen = static(gpt2_engine)
    monkeypatch.setattr(gpt2_engine, "_static_checked", set())
    assert_same(gpt2_engine.generate(prompts, params), usual)
    assert gpt2_engine._static_checked == {False} and gpt2_engine.static_decode and seen["batches"] == 1
    real_init = graphs_mod.StaticBatch.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.mask.fill_(True)  # padding attended

    monkeypatch.setattr(graphs_mod.StaticBatch, "__init__", init)
    monkeypatch.setattr(gpt2_engine, "_static_checked", set())
    assert_same(gpt2_engine.generate(prompts, params), usual)
    assert not gpt2_engine.static_decode and gpt2_engine._static_checked == set()
    assert seen["batches"] == 2 and len(seen["steps"]) == 4 + 1  # one step in fixed slots, then its own way
    assert_same(gpt2_engine.generate(prompts, params), usual)
    assert seen["batches"] == 2


def test_a_graph_whose_replays_do_nothing_is_caught_at_its_first_replay(gpt2_engine, static, monkeypatch):
    """A graph that recorded none of the step (torch only warns of an empty graph) would leave every later step
    the logits of the one before. The engine's first replayed step is checked against its row alone like its
    first eager one: the batch is decoded again its own way, and so is every later one."""
    from runner import GenerationParams

    prompts = ids_of(gpt2_engine)[:3]
    params = GenerationParams(max_new_tokens=9, min_new_tokens=9)
    usual = gpt2_engine.generate(prompts, params)
    seen = static(gpt2_engine)
    fake = faked_graphs(gpt2_engine, monkeypatch, empty=True)
    monkeypatch.setattr(gpt2_engine, "_static_checked", set())
    assert_same(gpt2_engine.generate(prompts, params), usual)
    assert fake.replays == 1 and seen["batches"] == 1 and not gpt2_engine.static_decode
    assert gpt2_engine._static_checked == {False}
