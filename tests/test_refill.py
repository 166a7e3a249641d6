"""Continuous batching: waiting rows join the running batch as rows end, and every row still gets exactly what it
gets alone, whatever joined beside it (tokens, text, finish, log-probs, alternatives, prompt log-probs)."""

import json

import pytest
import torch
from helpers import LONG_PROMPTS

import runner
from runner import EngineOptions, GenerationParams
from runner import engine as engine_mod
from runner.batching import encode
from runner.jobs import Job, create_job
from runner.params import _as_recorded
from runner.worker import run_job

PROMPTS = [
    *LONG_PROMPTS,
    "To be, or not to be, that is the question.",
    "The robot",
    "今日は良い天気ですね。明日は雨が降るでしょう。",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]
NEW_TOKENS = [3, 17, 6, 12, 2, 15, 9, 5, 14, 4, 11]  # rows end at very different steps


def ids_of(engine):
    return [encode(engine.tokenizer, t, chat=False) for t in PROMPTS]


def row_params(i, **over):
    """Row i's own settings: sampled or greedy, min_p, penalties, alternatives, prompt log-probs, held EOS, mixed."""
    sampled = i % 3 != 1
    # (a greedy row's top_p / top_k: a row's do_sample false in a job at them, as runner's row_params makes it)
    with _as_recorded():
        return GenerationParams(
            max_new_tokens=NEW_TOKENS[i],
            min_new_tokens=2 if i % 5 == 3 else 0,
            do_sample=sampled,
            temperature=(0.7, 1.0, 1.4)[i % 3] if sampled else 1.0,
            top_p=0.9 if i % 4 == 0 else 1.0,
            top_k=20 if i % 4 == 2 else 0,
            min_p=0.2 if sampled and i % 2 == 0 else 0.0,  # sampled rows with and without min_p
            repetition_penalty=1.3 if i % 4 == 1 else 1.0,
            presence_penalty=0.5 if i % 3 == 2 else 0.0,
            frequency_penalty=0.7 if i % 5 == 1 else 0.0,
            logprobs=(None, 2, 0)[i % 3],
            prompt_logprobs=i % 4 == 3,
            **over,
        )


def assert_same(got, alone, tol=1e-4):
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert [c.text for c in got] == [c.text for c in alone]
    assert [(c.finish_reason, c.stop_reason) for c in got] == [
        (c.finish_reason, c.stop_reason) for c in alone
    ]
    for g, a in zip(got, alone, strict=True):
        assert g.token_logprobs == pytest.approx(a.token_logprobs, abs=tol)
        assert (g.top_logprobs is None) == (a.top_logprobs is None)
        if a.top_logprobs is not None:
            assert [[(t, rank) for t, _, rank in step] for step in g.top_logprobs] == [
                [(t, rank) for t, _, rank in step] for step in a.top_logprobs
            ]
        assert (g.prompt_logprobs is None) == (a.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            assert g.prompt_logprobs[0] is None and g.prompt_logprobs[1:] == pytest.approx(
                a.prompt_logprobs[1:], abs=tol
            )


def rows_that_end_apart(engine, monkeypatch):
    """(prompts, params, seeds, each row's completion alone) of rows with their own settings that end at very
    different steps: by their own max_new_tokens, by stop strings taken from two rows' own text (so they are sure
    to occur) and by an EOS (two more of the model's tokens, monkeypatched in) that ends two other rows early."""
    prompts = ids_of(engine)
    params = [row_params(i) for i in range(len(prompts))]
    seeds = [1000 + i for i in range(len(prompts))]
    free = [engine.generate([p], [q], [s])[0] for p, q, s in zip(prompts, params, seeds, strict=True)]
    for i in (3, 8):
        text = free[i].text
        params[i] = row_params(i, stop=[text[len(text) // 2 : len(text) // 2 + 2]])
    eos = [free[1].token_ids[4], free[5].token_ids[6]]
    monkeypatch.setattr(engine, "eos_ids", [*engine.eos_ids, *eos])
    monkeypatch.setattr(engine, "_eos", torch.tensor(engine.eos_ids, device=engine.device))
    alone = [engine.generate([p], [q], [s])[0] for p, q, s in zip(prompts, params, seeds, strict=True)]
    return prompts, params, seeds, alone


@pytest.fixture
def spy(monkeypatch):
    """Per engine call: rows in each decode step, and how many times joiners' caches were joined to a running
    batch."""

    def install(engine):
        seen = {"decode_rows": [], "joins": 0}
        real_forward, real_join = engine._forward, engine._join

        def forward(input_ids, attention_mask, position_ids, cache, last_only):
            if not last_only:
                seen["decode_rows"].append(input_ids.shape[0])
            return real_forward(input_ids, attention_mask, position_ids, cache, last_only)

        def join(*args):
            seen["joins"] += 1
            return real_join(*args)

        monkeypatch.setattr(engine, "_forward", forward)
        monkeypatch.setattr(engine, "_join", join)
        return seen

    return install


# (the Llama-shaped engine in the full suite only: `make test-fast` keeps the GPT-2-shaped one of each cache kind)
@pytest.mark.parametrize("engine_name", ["gpt2_engine", pytest.param("llama_engine", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cache", ["grouped", "merged", "unmergeable"])
def test_refilled_batch_equals_one_at_a_time(request, monkeypatch, spy, engine_name, cache):
    """Rows with their own settings and lengths join a batch of 3 slots as others end (EOS, stop strings, their
    own max_new_tokens): positions, padding and cache rows of joiners must line up exactly, or their tokens
    would differ from a run alone. A model whose cache cannot be merged runs static batches of 3 instead."""
    engine = request.getfixturevalue(engine_name)
    if (
        cache == "merged"
    ):  # one left-padded cache, as on GPUs: joining copies it, cutting columns nobody needs
        monkeypatch.setattr(engine, "_grouped", False)
    elif (
        cache == "unmergeable"
    ):  # e.g. sliding-window layers: transformers' own cache, which cannot be joined
        monkeypatch.setattr(engine, "_merge_caches", False)
    monkeypatch.setattr(engine_mod, "REFILL_SHARE", 0.0)  # join as soon as one slot is free: the most joins
    prompts, params, seeds, alone = rows_that_end_apart(engine, monkeypatch)
    seen = spy(engine)
    got = engine.generate(prompts, params, seeds, max_active=3)
    assert_same(got, alone)
    assert {c.finish_reason for c in got} == {"stop", "length"} and any(c.stop_reason for c in got)
    assert len({len(c.token_ids) for c in got}) > 5  # rows really ended at different steps
    assert max(seen["decode_rows"]) == 3
    assert seen["joins"] > 4 if cache != "unmergeable" else seen["joins"] == 0


def test_a_row_that_ends_frees_its_slot_for_the_next_one(gpt2_engine, spy):
    """With 2 slots, rows 0 (6 tokens) and 1 start; each time a row ends, the next waiting row is prefilled
    (its first token comes from the prefill) and decodes beside row 0 from the next step on. Static batches
    of 2 would decode rows 0 and 1 until row 0 ends, then 2 and 3, then 4."""
    prompts = ids_of(gpt2_engine)[:5]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in (6, 2, 2, 2, 2)]
    seen = spy(gpt2_engine)
    got = gpt2_engine.generate(prompts, params, max_active=2)
    assert [len(c.token_ids) for c in got] == [6, 2, 2, 2, 2]
    # row 0 + one joiner per step pair; row 0 ends with row 3, and row 4 then decodes alone
    assert seen["decode_rows"] == [2, 1, 2, 1, 2, 1]
    assert seen["joins"] == 2
    assert_same(got, [gpt2_engine.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)])


def test_joined_histories_pad_with_a_token_each_row_has_seen():
    """The repetition penalty looks at every id of a row's history: padding added when a wider batch joins
    must repeat a token the row has seen, never a pad id (GPT-2's is EOS) the row alone would not penalise."""
    running = torch.tensor([[7, 7, 8, 9], [5, 6, 6, 2]])  # row 0's prompt was 7 8 9, padded with its 7
    joining = torch.tensor([[3, 3, 3, 4, 1, 2], [9, 8, 7, 6, 5, 4]])
    joined = engine_mod._cat_history(running, joining)
    assert joined.tolist() == [[7, 7, 7, 7, 8, 9], [5, 5, 5, 6, 6, 2], *joining.tolist()]
    assert engine_mod._cat_history(joining, running).tolist() == [*joining.tolist(), *joined[:2].tolist()]


def test_max_active_is_checked(gpt2_engine):
    prompts = ids_of(gpt2_engine)[:2]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_active must be an integer >= 1"):
            gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=2), max_active=bad)


def test_rows_start_longest_first_and_report_as_they_end(gpt2_engine):
    """Rows start most new tokens first (rows 0 and 2), so that the short ones fill the tail: row 3 joins when
    row 2 ends, row 1 last; `on_finish(row, tokens)` hears of each as it ends."""
    prompts = ids_of(gpt2_engine)[:4]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in (5, 1, 3, 2)]
    ended = []
    gpt2_engine.generate(prompts, params, max_active=2, on_finish=lambda r, n: ended.append((r, n)))
    assert ended == [(2, 3), (0, 5), (3, 2), (1, 1)]


@pytest.fixture
def mixed_file(tmp_path):
    p = tmp_path / "mixed.jsonl"
    rows = [
        {"id": f"r{i}", "prompt": t, "max_tokens": n, **({"temperature": 0.5} if i % 2 else {})}
        for i, (t, n) in enumerate(zip(PROMPTS, NEW_TOKENS, strict=True))
    ]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p


def test_a_job_with_continuous_batching_equals_one_without(
    tmp_path, mixed_file, tiny_gpt2, gpt2_engine, monkeypatch
):
    """The worker hands the engine windows of REFILL_BATCHES planned batches with a batch's worth of slots;
    results equal the static job's, and the progress line counts each row as it ends, not each window."""
    params = GenerationParams(max_new_tokens=8, temperature=1.1, num_return_sequences=2, seed=3)
    static, _ = runner.run(mixed_file, tiny_gpt2, params, EngineOptions(batch_size=2), output=tmp_path / "static",
                           engine=gpt2_engine, echo=None)  # fmt: skip
    calls = []
    real = engine_mod.Engine.generate

    def generate(self, prompts, params, seeds=None, stop=None, max_active=None, on_finish=None, on_step=None):
        calls.append((len(prompts), max_active))
        return real(self, prompts, params, seeds, stop, max_active, on_finish, on_step)

    monkeypatch.setattr(engine_mod.Engine, "generate", generate)
    lines = []
    job = create_job(mixed_file, tiny_gpt2, params, EngineOptions(batch_size=2, continuous_batching=True),
                     job_dir=tmp_path / "refill")  # fmt: skip
    summary = run_job(job, gpt2_engine, echo=lines.append, progress_interval=0)
    assert summary.finished and summary.done == 22
    assert calls == [(8, 2), (8, 2), (6, 2)]  # 11 prompts x 2 samples = 11 planned batches of 2: windows of 4
    cols = ["id", "sample", "text", "token_ids", "finish_reason"]
    got, want = runner.load_results(job.dir), runner.load_results(static.dir)
    assert got[cols].to_json() == want[cols].to_json()
    for a, b in zip(got["token_logprobs"], want["token_logprobs"], strict=True):
        assert list(a) == pytest.approx(list(b), abs=1e-4)
    counts = [int(ln.split("/")[0].replace(",", "")) for ln in lines if " results (" in ln and "tok/s" in ln]
    changes = [c for i, c in enumerate(counts) if i == 0 or c != counts[i - 1]]
    assert changes[:23] == list(
        range(0, 23)
    )  # lines from the first decode step on; each sample counted as it ends


def test_a_resumed_continuous_job_equals_an_uninterrupted_one(tmp_path, mixed_file, tiny_gpt2, gpt2_engine):
    """A commit holds whole windows, and a window's schedule (who joins when) depends on its keys alone: after a
    stop, the windows that run are the ones an uninterrupted run ran, down to the last bit of each log-prob."""
    params = GenerationParams(max_new_tokens=8, temperature=1.1, num_return_sequences=2, seed=3)
    options = EngineOptions(batch_size=2, continuous_batching=True)
    ref, _ = runner.run(mixed_file, tiny_gpt2, params, options, output=tmp_path / "ref", engine=gpt2_engine,
                        echo=None)  # fmt: skip
    job = create_job(mixed_file, tiny_gpt2, params, options, job_dir=tmp_path / "cut")
    calls = []
    stop_after_one = lambda: calls.append(1) or len(calls) > 1  # noqa: E731
    summary = run_job(job, gpt2_engine, echo=None, shard_rows=1, should_stop=stop_after_one)
    assert not summary.finished and summary.done == 8  # one window: 4 planned batches of 2
    summary = run_job(Job.open(job.dir), gpt2_engine, echo=None)
    assert summary.finished and summary.generated == 14
    cols = ["id", "sample", "text", "token_ids", "finish_reason", "token_logprobs"]
    assert runner.load_results(job.dir)[cols].to_json() == runner.load_results(ref.dir)[cols].to_json()
