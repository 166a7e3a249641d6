"""Runtime faults and hostile input: OOM, NaN logits, pickle weights, fuzzed JSONL. Nothing is lost."""

import json
import math
import string
import types

import pytest
import torch
from helpers import invoke, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runner
import runner.job_status
from runner import EngineOptions, GenerationParams, InputError, ModelLoadError
from runner.engine import Engine, NumericalError
from runner.inputs import read_prompts
from runner.jobs import create_job
from runner.worker import run_job


@pytest.fixture
def prompts_file(tmp_path):
    rows = ({"id": f"r{i}", "prompt": "The old man said " * (1 + i % 4)} for i in range(8))
    return write_jsonl(tmp_path / "p.jsonl", rows)


def test_out_of_memory_splits_the_batch_and_loses_nothing(
    tmp_path, prompts_file, tiny_gpt2, gpt2_engine, monkeypatch
):
    params = GenerationParams(max_new_tokens=4, temperature=1.0, seed=5)
    ref, _ = runner.run(
        prompts_file, tiny_gpt2, params, output=tmp_path / "ref", engine=gpt2_engine, echo=None
    )
    real = Engine.generate
    sizes = []

    def generate(self, prompts, params, seeds=None, stop=None, **kw):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self._poison in prompts:
            raise torch.OutOfMemoryError("CUDA out of memory even alone")
        return real(self, prompts, params, seeds, stop, **kw)

    monkeypatch.setattr(Engine, "generate", generate)
    gpt2_engine._poison = None
    job = create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "oom")
    summary = run_job(job, gpt2_engine, echo=None)
    assert summary.finished and summary.done == 8 and summary.errors == 0
    assert sizes == [8, 4, 2, 2, 2, 2]  # halved until it fits; the rest starts at the size that worked
    out = runner.load_results(job.dir)
    ref_df = runner.load_results(ref.dir)
    assert out[["id", "text"]].to_json() == ref_df[["id", "text"]].to_json()

    # Rows that cannot fit even alone become row errors; the job still completes with them counted.
    gpt2_engine._poison = job.prompts().column("input_ids")[7].as_py()  # rows r3 and r7 share this prompt
    job2 = create_job(prompts_file, tiny_gpt2, params, job_dir=tmp_path / "oom2")
    summary = run_job(job2, gpt2_engine, echo=None)
    assert summary.finished and summary.done == 6 and summary.errors == 2
    errors = runner.read_errors(job2.dir)
    assert sorted(e["id"] for e in errors) == ["r3", "r7"]
    assert {(e["error"], e["stage"]) for e in errors} == {("out_of_memory", "generate")}
    assert not {"r3", "r7"} & set(runner.load_results(job2.dir)["id"])
    assert runner.job_status.job_status(job2).errors == 2


@pytest.mark.parametrize(
    "options",
    [EngineOptions(), EngineOptions(batch_size=2, continuous_batching=True)],
    ids=["static", "refill"],
)
def test_nan_logits_never_reach_the_results(tmp_path, prompts_file, tiny_gpt2, monkeypatch, options):
    engine = Engine(tiny_gpt2)
    bad_prompt = engine.tokenizer("The old man said The old man said The old man said ")["input_ids"]
    real_forward = engine._forward

    def forward(input_ids, attention_mask, position_ids, cache, last_only):
        logits, cache = real_forward(input_ids, attention_mask, position_ids, cache, last_only)
        for r in range(input_ids.shape[0] if last_only else 0):  # prefill: a row with bad_prompt overflows
            row = input_ids[r][attention_mask[r].bool()].tolist()
            if row == bad_prompt:
                logits[r] = float("nan")
        return logits, cache

    monkeypatch.setattr(engine, "_forward", forward)
    # (a start shared with the others would be prefilled apart: the rows' own passes would not hold the prompt)
    monkeypatch.setattr(engine, "share_prefix", False)
    with pytest.raises(NumericalError):
        engine.generate([bad_prompt], GenerationParams(max_new_tokens=2))
    job = create_job(
        prompts_file, tiny_gpt2, GenerationParams(max_new_tokens=3), options, job_dir=tmp_path / "nan"
    )
    summary = run_job(job, engine, echo=None)
    assert summary.finished and summary.errors == 2 and summary.done == 6  # rows r2 and r6 have that prompt
    df = runner.load_results(job.dir)
    assert all(math.isfinite(x) for lps in df["token_logprobs"] for x in lps)
    errors = runner.read_errors(job.dir)
    assert sorted(e["id"] for e in errors) == ["r2", "r6"] and {e["error"] for e in errors} == {
        "numerical_error"
    }


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, prompts_file):
    from tiny_models import build_tiny_gpt2
    from transformers import AutoModelForCausalLM

    path = build_tiny_gpt2(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # how older fine-tuned GPT-2 folders look
    with pytest.raises(
        ModelLoadError, match=r"only pickle-based weights .* EngineOptions\(allow_pickle=True\)"
    ):
        Engine(str(path))
    assert Engine(str(path), EngineOptions(allow_pickle=True)).num_parameters > 0
    # Submit refuses it too, before anything is stored; the command the message suggests then works.
    home = tmp_path / "home"
    result = invoke("--home", home, "run", prompts_file, "-m", path, "--max-new-tokens", 2)
    assert result.exit_code == 1 and "--allow-pickle-weights" in result.output and not home.exists()
    result = invoke(
        "--home", home, "run", prompts_file, "-m", path, "--max-new-tokens", 2, "--allow-pickle-weights"
    )
    assert result.exit_code == 0, result.output


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
rows = st.one_of(
    st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=20)}, optional={"id": st.text(max_size=6) | st.integers()}
    ),
    st.dictionaries(st.sampled_from(["prompt", "id", "messages", "x"]), json_values, max_size=4),
    json_values,
)
raw_lines = st.one_of(
    rows.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=30),
    st.text(alphabet=string.printable, max_size=30).map(str.encode),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(raw_lines, min_size=1, max_size=12))
def test_fuzzed_jsonl_never_crashes_and_every_line_is_accounted_for(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines) + b"\n")
    try:
        ps = read_prompts(path, skip_invalid=True)
        kept, problems = {r.line for r in ps.rows}, {p.line for p in ps.problems}
    except InputError as e:  # no valid row at all: every problem is still reported
        if e.header == "cannot read the prompt file":  # the file as a whole (in another encoding, or a
            # pretty-printed JSON array: its first line is "[" alone): one line
            (problem,) = e.problems
            first = path.read_bytes().split(b"\n")[0].removeprefix(b"\xef\xbb\xbf")
            array = first.decode("utf-8", "replace").strip() == "["
            assert ("one JSON array over many lines" if array else "the file is not UTF-8") in problem.message
            return
        kept, problems = set(), {p.line for p in e.problems}
    assert not kept & problems
    content = path.read_bytes().split(b"\n")[:-1]
    non_blank = {i + 1 for i, ln in enumerate(content) if ln.strip(b" \t\x0b\x0c\xef\xbb\xbf")}
    # Every non-blank line is either kept or reported by its number (a file with no rows at all reports line 0).
    assert non_blank <= kept | problems or problems == {0}


def test_models_that_cannot_run_are_refused_before_queueing(tmp_path, prompts_file, tiny_gpt2, runner_home):
    import shutil

    from transformers import T5Config

    T5Config(vocab_size=100, d_model=8, num_layers=1, num_heads=1, d_ff=8, d_kv=8).save_pretrained(
        tmp_path / "t5"
    )
    with pytest.raises(ModelLoadError, match=r"\(T5Config\) has no causal language-model head"):
        create_job(prompts_file, str(tmp_path / "t5"))
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2, no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer of model"):
        create_job(prompts_file, str(no_tok))
    assert not runner_home.exists() or not any(runner_home.iterdir())  # nothing was queued


# --- fp16 overflow: rows retried in float32 --------------------------------------------------------------


@pytest.fixture(scope="module")
def half_exact_gpt2(tmp_path_factory, tiny_gpt2):
    """The tiny GPT-2 with weights rounded to float16 values and saved in float32: loaded in float16 and
    upcast, or loaded in float32, it is the same model, so a float32 retry can be compared exactly."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("half-exact") / "gpt2"
    shutil.copytree(tiny_gpt2, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.half().float().save_pretrained(path)
    return str(path)


def _trigger_tokens(job, ids):
    """For each row id, a token id that only that row's prompt contains."""
    table = job.prompts()
    rows = dict(zip(table.column("id").to_pylist(), table.column("input_ids").to_pylist(), strict=True))
    out = []
    for i in ids:
        others = {t for r, toks in rows.items() if r != i for t in toks}
        out.append(next(t for t in rows[i] if t not in others))
    return out


def _overflow_hook(engine, overflow_token, nan_token, calls):
    """At prefill, a row holding `overflow_token` gets inf logits unless the model runs in float32 (an fp16
    overflow); a row holding `nan_token` gets NaN logits in any dtype."""

    def hook(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        if _cache_of(kwargs) is not None:
            return
        calls.append((ids.shape[0], output.logits.dtype))  # one per prefill: (rows, dtype)
        over = (ids == overflow_token).any(-1) & (output.logits.dtype != torch.float32)
        output.logits[over] = float("inf")
        output.logits[(ids == nan_token).any(-1)] = float("nan")

    return engine.model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture
def words_file(tmp_path):
    words = ["apple", "river", "yellow", "morning", "coffee", "library"]
    return write_jsonl(
        tmp_path / "w.jsonl",
        ({"id": f"r{i}", "prompt": f"The old man said {w}"} for i, w in enumerate(words)),
    )


def test_in_float32_restores_every_weight_bit_for_bit(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama, EngineOptions(dtype="bfloat16"))
    tensors = {**dict(engine.model.named_parameters()), **dict(engine.model.named_buffers())}
    before = {n: (t.dtype, t.detach().clone()) for n, t in tensors.items()}
    assert before["model.rotary_emb.inv_freq"][0] == torch.float32  # kept in float32 inside a bf16 model
    prompt = [[5, 6, 7, 8]]
    in_bf16 = engine.generate(prompt, GenerationParams(max_new_tokens=4))
    with engine.in_float32():
        assert {t.dtype for t in engine.model.parameters()} == {torch.float32}
        engine.generate(prompt, GenerationParams(max_new_tokens=4))
    for n, t in {**dict(engine.model.named_parameters()), **dict(engine.model.named_buffers())}.items():
        assert t.dtype == before[n][0] and torch.equal(t, before[n][1]), n
    assert engine.generate(prompt, GenerationParams(max_new_tokens=4)) == in_bf16

    # Out of memory half way through upcasting: what was upcast is put back, and the error reaches the caller.
    real_float, calls = torch.Tensor.float, []

    def float_(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_float(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "float", float_)
    with pytest.raises(torch.OutOfMemoryError), engine.in_float32():
        pass
    monkeypatch.undo()
    for n, t in {**dict(engine.model.named_parameters()), **dict(engine.model.named_buffers())}.items():
        assert t.dtype == before[n][0] and torch.equal(t, before[n][1]), n


def test_fp16_overflow_is_retried_in_float32_and_only_rows_nan_in_float32_are_errors(
    tmp_path, words_file, half_exact_gpt2, monkeypatch
):
    params = GenerationParams(max_new_tokens=6)
    ref, _ = runner.run(words_file, half_exact_gpt2, params, EngineOptions(dtype="float32"),
                        output=tmp_path / "fp32", echo=None)  # fmt: skip
    engine = Engine(half_exact_gpt2, EngineOptions(dtype="float16"))
    # One prefill per batch (no length groups), so the calls below show the batch splits one for one.
    monkeypatch.setattr(engine, "prefill_tokens", 10**9)
    monkeypatch.setattr("runner.engine.PREFILL_MIN_FILL", 0.0)
    overflow, nan = _trigger_tokens(ref, ["r1", "r4"])
    calls = []
    hook = _overflow_hook(engine, overflow, nan, calls)
    job, summary = runner.run(words_file, half_exact_gpt2, params, EngineOptions(dtype="float16"),
                              output=tmp_path / "fp16", engine=engine, echo=None)  # fmt: skip
    hook.remove()
    # The batch of 6 fails (r1, r4 named); the 4 others run together, then r1 and r4 alone, each again in
    # float32: r1 (an fp16 overflow) completes there, r4 (NaN in any precision) becomes a row error.
    f16, f32 = torch.float16, torch.float32
    assert calls == [(6, f16), (4, f16), (1, f16), (1, f32), (1, f16), (1, f32)]
    assert summary.finished and summary.done == 5 and summary.errors == 1
    status = runner.status(job.dir)
    assert status.state == "completed" and status.errors == 1

    df = runner.load_results(job.dir)
    assert sorted(df["id"]) == ["r0", "r1", "r2", "r3", "r5"]
    assert all(math.isfinite(x) for lps in df["token_logprobs"] for x in lps)
    retried = df.set_index("id").loc["r1"]
    expected = runner.load_results(ref.dir).set_index("id").loc["r1"]
    assert list(retried["token_ids"]) == list(expected["token_ids"]) and retried["text"] == expected["text"]
    assert retried["token_logprobs"] == pytest.approx(list(expected["token_logprobs"]), abs=1e-5)

    errors = runner.read_errors(job.dir)
    assert [(e["id"], e["stage"], e["error"]) for e in errors] == [("r4", "generate", "numerical_error")]
    assert "in float16 and again in float32" in errors[0]["message"]
    stats = json.loads((job.dir / "stats.json").read_text())
    assert stats["runs"][-1]["float32_retries"] == 1 and stats["runs"][-1]["dtype"] == "float16"
    assert (
        "row r1 (sample 0): non-finite logits in float16; recomputed in float32"
        in (job.dir / "log.txt").read_text()
    )
    assert {p.dtype for p in engine.model.parameters()} == {torch.float16}  # put back after the retry


def test_a_float32_retry_that_does_not_fit_is_a_row_error(tmp_path, words_file, half_exact_gpt2, monkeypatch):
    import contextlib

    engine = Engine(half_exact_gpt2, EngineOptions(dtype="float16"))
    overflow = _trigger_tokens(create_job(words_file, half_exact_gpt2, job_dir=tmp_path / "probe"), ["r2"])[0]
    hook = _overflow_hook(engine, overflow, -1, [])

    @contextlib.contextmanager
    def no_room():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        yield

    monkeypatch.setattr(engine, "in_float32", no_room)
    job, summary = runner.run(words_file, half_exact_gpt2, GenerationParams(max_new_tokens=3),
                              EngineOptions(dtype="float16"), output=tmp_path / "j", engine=engine, echo=None)  # fmt: skip
    hook.remove()
    assert summary.finished and summary.done == 5 and summary.errors == 1
    (error,) = runner.read_errors(job.dir)
    assert error["id"] == "r2" and error["error"] == "numerical_error"
    assert "does not fit in memory in float32" in error["message"]


def test_nan_prompt_logprobs_are_never_written(tmp_path, words_file, tiny_gpt2):
    """The engine checks the log-prob of each sampled token; a NaN elsewhere in what is written (here a
    prompt position) is caught before the shard."""
    engine = Engine(tiny_gpt2)
    trigger = _trigger_tokens(create_job(words_file, tiny_gpt2, job_dir=tmp_path / "probe"), ["r3"])[0]

    def hook(module, args, kwargs, output):
        if _cache_of(kwargs) is None:
            # the logits that predict the last prompt token: a real position even with left padding
            output.logits[(kwargs["input_ids"] == trigger).any(-1), -2, :] = float("nan")

    handle = engine.model.register_forward_hook(hook, with_kwargs=True)
    params = GenerationParams(max_new_tokens=3, prompt_logprobs=True)
    job, summary = runner.run(words_file, tiny_gpt2, params, output=tmp_path / "j", engine=engine, echo=None)
    handle.remove()
    assert summary.finished and summary.done == 5 and summary.errors == 1
    df = runner.load_results(job.dir)
    assert "r3" not in set(df["id"])
    assert all(math.isfinite(x) for lps in df["prompt_logprobs"] for x in lps[1:])  # the first is null
    (error,) = runner.read_errors(job.dir)
    assert error["id"] == "r3" and "in float32" in error["message"]


def _cache_of(kwargs):
    """The KV cache a forward call got (`cache` in transformers 5, `past_key_values` before): None in prefill."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


@pytest.mark.parametrize("failure", ["nan", "oom"])
def test_a_failed_batch_is_released_before_its_rows_are_computed_again(failure):
    """The retry of a batch that hit NaN/inf logits or ran out of memory runs after the failure's handler: the
    handler's traceback holds the failed computation's frames (on a GPU its KV cache and logits), which would
    stay allocated through the retries and make a batch near the memory budget run out of memory again."""
    import weakref

    from runner.tasks import Isolation, isolating

    alive = []

    def compute(keys):
        assert all(ref() is None for ref in alive), "the failed batch's tensors are still allocated"
        cache = torch.ones(1024)  # what the failing batch had allocated when it failed
        alive.append(weakref.ref(cache))
        if len(keys) > 1:
            raise NumericalError([0]) if failure == "nan" else torch.OutOfMemoryError("CUDA out of memory")
        return [("row", *keys[0])]

    engine = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    got = isolating(engine, compute, [(0, 0), (1, 0), (2, 0)], Isolation())
    assert got == [("row", 0, 0), ("row", 1, 0), ("row", 2, 0)]


def test_a_float32_retry_that_ends_in_a_row_error_is_not_noted_as_recomputed():
    """A row whose float16 logits were NaN, then whose float32 retry came back a row error (its constraint's
    matcher gave up): the worker logged "non-finite logits in float16; recomputed in float32" for a row that
    ended an error (adversarial pass 229). Only keys really recomputed are noted."""
    import contextlib

    from runner.tasks import Isolation, RowError, isolating

    def compute(keys):
        if engine.dtype == torch.float16:
            raise NumericalError([0])
        return [RowError("constraint_error", "gave up") if keys[0][0] == 1 else ("row", *keys[0])]

    @contextlib.contextmanager
    def in_float32():
        engine.dtype = torch.float32
        yield
        engine.dtype = torch.float16

    engine = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16, in_float32=in_float32)
    iso = Isolation()
    got = [isolating(engine, compute, [key], iso)[0] for key in ((0, 0), (1, 0))]
    assert got[0] == ("row", 0, 0) and isinstance(got[1], RowError)
    assert iso.float32_retried == [(0, 0)]


def test_a_numerical_error_names_the_callers_rows(tiny_gpt2, monkeypatch):
    """The engine computes greedy twins once, and a batch's beam rows go through transformers: the rows a
    NumericalError names are still positions in the caller's own keys (it named a twin of the bad row, or the
    key after a beam row, and the split that followed recomputed good rows: pass 53)."""
    from runner.engine import Engine
    from runner.tasks import generate_keys

    engine = Engine(tiny_gpt2)
    a, b = (engine.tokenizer(t)["input_ids"] for t in ("The quick brown fox", "My friend"))

    def nan_for_b(prompts, *args, **kwargs):  # prompt b's logits are NaN, wherever it is in the batch
        raise NumericalError([i for i, p in enumerate(prompts) if p == b])

    monkeypatch.setattr(engine, "_generate", nan_for_b)
    greedy, beam = GenerationParams(max_new_tokens=3), GenerationParams(max_new_tokens=3, num_beams=2)
    with pytest.raises(NumericalError) as e:
        engine.generate([a, a, b, a, b], greedy)
    assert e.value.rows == [2, 4]
    with pytest.raises(NumericalError) as e:
        generate_keys(engine, [(0, 0), (1, 0), (2, 0)], [beam, greedy, greedy], [0, 1, 2], [a, a, b])
    assert e.value.rows == [2]
