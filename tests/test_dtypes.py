"""Half precision, as a GPU runs it, on CPU: the engine, scoring and embeddings in bfloat16 and float16 on the
tiny models. Batched == unbatched within the dtype's tolerance, every number finite, float32 only where the
engine means it (log-softmax, sampling), and a whole job in half precision writes no NaN.

The tolerance: bfloat16 keeps 8 bits of mantissa, float16 11, so padding that changes the order of a sum
moves a log-prob by ~1e-2 (bf16) / ~2e-3 (fp16) on these models. Greedy tokens may then differ where two
tokens were tied within that tolerance; `assert_close_runs` checks that every divergence is such a tie."""

import math

import pytest
import torch
from helpers import PROMPTS as ENGINE_PROMPTS

import runner
from runner import GenerationParams
from runner.batching import encode
from runner.engine import Engine
from runner.params import EngineOptions, ScoreParams
from runner.scoring import embed_batch, score_batch, tokenize_text

DTYPES = {"bfloat16": 0.08, "float16": 0.02}  # dtype -> log-prob tolerance, batched vs alone

PROMPTS = ENGINE_PROMPTS[:5]


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama"])
def half_engine(request, dtype, test_device):
    return Engine(request.getfixturevalue(request.param), EngineOptions(device=test_device, dtype=dtype))


def assert_close_runs(a, b, tol):
    """Two generations of one prompt agree token by token until, at most, a step where both chosen tokens
    were within `tol` of each other (a tie at this precision); every log-prob is finite and <= 0."""
    for c in (a, b):
        assert all(math.isfinite(x) and x <= 1e-6 for x in c.token_logprobs)
    for i, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids, strict=False)):
        assert abs(a.token_logprobs[i] - b.token_logprobs[i]) < tol, (i, a.token_logprobs, b.token_logprobs)
        if ta != tb:
            return
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason


def test_the_model_really_runs_in_half_precision(half_engine, dtype):
    assert half_engine.dtype == getattr(torch, dtype)
    assert {p.dtype for p in half_engine.model.parameters() if p.is_floating_point()} == {half_engine.dtype}
    ids = encode(half_engine.tokenizer, "Hello", chat=False)
    dev = half_engine.device
    logits, _ = half_engine._forward(torch.tensor([ids], device=dev), torch.ones(1, len(ids), dtype=torch.long, device=dev),
                                     torch.arange(len(ids), device=dev).unsqueeze(0), None, last_only=True)  # fmt: skip
    assert logits.dtype == torch.float32  # picked and log-softmaxed in float32 whatever the model's dtype


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_alone_within_the_dtype(half_engine, dtype, penalty):
    prompts = [encode(half_engine.tokenizer, t, chat=False) for t in PROMPTS]
    params = GenerationParams(max_new_tokens=10, repetition_penalty=penalty, logprobs=3)
    batched = half_engine.generate(prompts, params)
    alone = [half_engine.generate([p], params)[0] for p in prompts]
    for b, a in zip(batched, alone, strict=True):
        assert_close_runs(b, a, DTYPES[dtype])
        for step in b.top_logprobs:
            assert all(math.isfinite(lp) for _, lp, _ in step)


def test_fixed_slots_in_half_precision(half_engine, dtype, monkeypatch):
    """--cuda-graphs' fixed slots (runner/graphs.py) in half precision, as a GPU runs them: rows that end at
    different steps keep their slots computing, and every row is what it is alone within the dtype."""
    from runner import graphs

    prompts = [encode(half_engine.tokenizer, t, chat=False) for t in PROMPTS]
    params = [GenerationParams(max_new_tokens=n, logprobs=2) for n in (10, 3, 7, 1, 5)]
    alone = [half_engine.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)]
    steps = []
    real = graphs.StaticBatch.step
    monkeypatch.setattr(graphs.StaticBatch, "step", lambda self, *a: steps.append(1) or real(self, *a))
    monkeypatch.setattr(half_engine, "static_decode", True)
    for b, a in zip(half_engine.generate(prompts, params), alone, strict=True):
        assert_close_runs(b, a, DTYPES[dtype])
        assert all(math.isfinite(lp) for step in b.top_logprobs for _, lp, _ in step)
    assert len(steps) == 9  # the longest row's 10 tokens: the prefill's, then 9 steps in fixed slots


def test_a_shared_prompt_start_in_half_precision(half_engine, dtype):
    """The start all prompts share is prefilled once in half precision too: the engine's check accepts it (a
    batch's rounding, not a wrong position), and every row is what it is alone within the dtype."""
    start = "Answer in one short sentence and do not repeat the question. Be kind, be brief and be exact.\n"
    prompts = [encode(half_engine.tokenizer, start + t, chat=False) for t in PROMPTS]
    params = GenerationParams(max_new_tokens=8)
    half_engine._prefix_checked, half_engine._prefix_memo = False, None
    batched = half_engine.generate(prompts, params)
    assert half_engine._prefix_checked and half_engine.share_prefix
    for b, a in zip(batched, [half_engine.generate([p], params)[0] for p in prompts], strict=True):
        assert_close_runs(b, a, DTYPES[dtype])


def test_seeded_sampling_is_finite_and_per_row(half_engine):
    prompts = [encode(half_engine.tokenizer, t, chat=False) for t in PROMPTS]
    params = GenerationParams(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, top_k=20)
    seeds = list(range(100, 100 + len(prompts)))
    batched = half_engine.generate(prompts, params, seeds)
    again = half_engine.generate(prompts, params, seeds)
    assert [c.token_ids for c in batched] == [c.token_ids for c in again]  # same batch, same seeds: same run
    for c in batched:
        assert all(math.isfinite(x) for x in c.token_logprobs)


def test_scores_batched_equal_alone_and_float32_within_the_dtype(request, half_engine, dtype, test_device):
    seqs = [tokenize_text(half_engine.tokenizer, t) for t in PROMPTS]
    froms = [1] * len(seqs)
    batched = score_batch(half_engine, seqs, froms)
    alone = [score_batch(half_engine, [s], [1])[0] for s in seqs]
    name = "tiny_gpt2" if half_engine.model.config.model_type == "gpt2" else "tiny_llama"
    full = Engine(request.getfixturevalue(name), EngineOptions(device=test_device, dtype="float32"))
    exact = score_batch(full, seqs, froms)
    for b, a, f in zip(batched, alone, exact, strict=True):
        assert b.token_ids == a.token_ids == f.token_ids
        assert all(math.isfinite(x) for x in b.token_logprobs)
        assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=DTYPES[dtype])
        # Against float32: the weights are rounded too, so a looser bound (a bf16 model is another model).
        assert b.token_logprobs == pytest.approx(f.token_logprobs, abs=10 * DTYPES[dtype])


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_batched_equal_alone_within_the_dtype(half_engine, dtype, pooling):
    import numpy as np

    seqs = [tokenize_text(half_engine.tokenizer, t) for t in PROMPTS]
    together = np.array(embed_batch(half_engine, seqs, pooling))
    alone = np.array([embed_batch(half_engine, [s], pooling)[0] for s in seqs])
    assert together.dtype == np.float64 and np.isfinite(together).all()  # float32 vectors, as lists
    scale = np.abs(alone).max()
    assert np.abs(together - alone).max() <= DTYPES[dtype] * max(1.0, scale)


def test_a_half_precision_job_writes_finite_results(tiny_llama, dtype, tmp_path, test_device):
    """Generation and scoring jobs end to end in half precision: every row done, every number finite."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"id": "r{i}", "prompt": "{t}"}}\n' for i, t in enumerate(PROMPTS)),
                       encoding="utf-8")  # fmt: skip
    options = EngineOptions(device=test_device, dtype=dtype, batch_size=3)
    params = GenerationParams(max_new_tokens=6, do_sample=True, seed=7, num_return_sequences=2, logprobs=2)
    job, summary = runner.run(prompts, tiny_llama, params, options, output=tmp_path / "gen", echo=None)
    df = runner.load_results(job)
    assert len(df) == 2 * len(PROMPTS) and summary.errors == 0
    assert all(math.isfinite(x) for lps in df["token_logprobs"] for x in lps)
    texts = tmp_path / "t.jsonl"
    texts.write_text(prompts.read_text(encoding="utf-8").replace('"prompt"', '"text"'), encoding="utf-8")
    job, _ = runner.run(texts, tiny_llama, ScoreParams(), options, output=tmp_path / "score", echo=None)
    scores = runner.load_results(job)
    assert len(scores) == len(PROMPTS)
    assert all(math.isfinite(x) for lps in scores["token_logprobs"] for x in lps)


def _what_it_says_of_mixing(job, engine, rows=None):
    """Run `job` (its first `rows` batches, or to the end), a shard per row; the lines it says of mixing."""
    from runner.worker import run_job

    said, batches = [], []
    stop = None if rows is None else (lambda: batches.append(1) or len(batches) > rows)
    run_job(job, engine, echo=said.append, shard_rows=1, should_stop=stop)
    return [line for line in said if "mix the two" in line]


def test_a_job_carried_on_in_another_precision_says_so(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    """Begun on an A100 (auto: bfloat16), carried on on a Colab T4 (auto: float16): the results mix the two
    precisions, which is allowed but said. Each shard records the precision and device kind of its rows."""
    import pyarrow.parquet as pq
    from helpers import write_jsonl

    import runner.worker as worker_module
    from runner.jobs import create_job

    def on(device, dtype, rows=None):
        monkeypatch.setattr(worker_module, "device_kind", lambda engine: device)
        monkeypatch.setattr(worker_module, "dtype_name", lambda engine: dtype)
        return _what_it_says_of_mixing(job, gpt2_engine, rows)

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The old man said {i}"} for i in range(4)])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), EngineOptions(batch_size=1),
                     home=tmp_path / "home")  # fmt: skip
    assert on("NVIDIA A100-SXM4-40GB", "bfloat16", rows=1) == []
    meta = pq.read_schema(next((job.dir / "shards").iterdir())).metadata
    assert (meta[b"runner.dtype"], meta[b"runner.device"]) == (b"bfloat16", b"NVIDIA A100-SXM4-40GB")
    assert on("NVIDIA A100-SXM4-40GB", "bfloat16", rows=1) == []  # the same precision: nothing to say
    assert on("Tesla T4", "float16") == [
        f"job {job.id}: its newest rows were computed in bfloat16 on NVIDIA A100-SXM4-40GB; this worker computes "
        "in float16 on Tesla T4, so its results will mix the two (the same model, other rounding: an answer can "
        "differ where two tokens are nearly tied; submit with EngineOptions(dtype=...) to keep one precision)"
    ]
    assert runner.status(job.dir).state == "completed"


def test_the_note_on_mixed_precisions_survives_a_passing_read_error(
    tmp_path, tiny_gpt2, gpt2_engine, monkeypatch
):
    """A transient error (EIO on a network mount) reading the newest shard's metadata is retried, as every read
    of the job folder is: it left the note on mixed precisions unsaid."""
    import errno

    import pyarrow.parquet as pq
    from helpers import write_jsonl

    import runner.worker as worker_module
    from runner import storage
    from runner.jobs import create_job

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The old man said {i}"} for i in range(3)])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), EngineOptions(batch_size=1),
                     home=tmp_path / "home")  # fmt: skip
    monkeypatch.setattr(worker_module, "dtype_name", lambda engine: "bfloat16")
    assert _what_it_says_of_mixing(job, gpt2_engine, 1) == []
    real, failures = pq.read_schema, [OSError(errno.EIO, "Input/output error")]

    def flaky(path, *args, **kwargs):
        if failures and "shards" in str(path):
            raise failures.pop()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_schema", flaky)
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,))
    monkeypatch.setattr(worker_module, "dtype_name", lambda engine: "float16")
    said = _what_it_says_of_mixing(job, gpt2_engine, 1)
    assert not failures and len(said) == 1 and "computed in bfloat16" in said[0]
    # an error that does not pass (a shard that cannot be read at all) still leaves the note unsaid, nothing more
    failures.extend([OSError(errno.EACCES, "Permission denied")] * 2)
    assert _what_it_says_of_mixing(job, gpt2_engine) == [] and runner.status(job.dir).state == "completed"


def test_a_job_carried_on_with_other_library_versions_says_so(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    """Carried on on a VM with another torch or transformers (Colab's preinstalled ones change): the results
    mix the two, which is allowed but said (nothing named the versions anywhere: pass 50). Each shard
    records them."""
    import pyarrow.parquet as pq
    from helpers import write_jsonl

    import runner.worker as worker_module
    from runner.jobs import create_job

    def on(versions, rows=None):
        monkeypatch.setattr(worker_module, "library_versions", lambda: versions)
        return _what_it_says_of_mixing(job, gpt2_engine, rows)

    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The old man said {i}"} for i in range(3)])
    job = create_job(f, tiny_gpt2, GenerationParams(max_new_tokens=2), EngineOptions(batch_size=1),
                     home=tmp_path / "home")  # fmt: skip
    assert on("torch 2.9.0, transformers 5.0.0", rows=1) == []
    meta = pq.read_schema(next((job.dir / "shards").iterdir())).metadata
    assert meta[b"runner.versions"] == b"torch 2.9.0, transformers 5.0.0"
    assert on("torch 2.9.0, transformers 5.0.0", rows=1) == []  # the same versions: nothing to say
    assert on("torch 2.13.0, transformers 5.24.0") == [
        f"job {job.id}: its newest rows were computed with torch 2.9.0, transformers 5.0.0; this worker has "
        "torch 2.13.0, transformers 5.24.0, so its results will mix the two (the same model and settings; an "
        "answer can differ where two tokens are nearly tied)"
    ]
