"""Adversarial pass 267: bounded memory and exactly-once for score and embed jobs.

Found, and kept fixed below:
  * An embed job held every vector of a shard's rows before writing it, however long each was: the worker writes a
    shard once its rows hold `SHARD_VALUES` numbers (`_numbers`), but counted a vector as none, so with a hidden
    size of 4,096 a shard of 1,000 rows waited on 4 million floats (~130 MB as Python objects; 10,000 rows with
    --shard-rows, 1.3 GB), four times what a shard of generated tokens may hold, and a kill lost all of it.
  * A generation's alternatives (`logprobs`) were counted as if every step held as many as its first: a step holds
    k, or k + 1 where the chosen token is not among them, so with logprobs=1 a row whose first token was the
    likeliest counted half its alternatives (a shard could hold twice `SHARD_VALUES`). Each step is counted.
  * On a model whose last layer is projected out (OPT-350m: 1,024 hidden values, vectors of 512), the Ray embed
    stage ended every batch in pyarrow's ArrowTypeError ("Size of FixedSizeList is not the same"), and an embed
    job's results before its first shard said vectors of 1,024: both took the width from `hidden_size`.
    `jobs.embedding_dim` reads `word_embed_proj_dim` first (a job submitted before keeps its recorded width).
  * Scoring (`runner score`, `score_texts`) whose first batch had a non-finite row (a float16 overflow, retried
    in float32 later) computed every later batch of the process from [batch, positions, vocab] logits, not a
    chunk of positions at a time: whether the output layer alone gives the model's logits is asked of the first
    batch, bit for bit, and a NaN equals nothing, so the model was taken for one with a softcap, for good. It is
    asked of the rows without a NaN only (none: left open, the model's own logits for that batch).

Held (no change): score (strided long texts and a pair) and embed jobs on units of 5 in batches of 3, killed at
after_generate:3 (mid-shard), after_shard:2 and after_generate:5, then resumed, load back as Arrow tables equal to
an uninterrupted run's, schema and values bit for bit, in float32 and bfloat16; empty, whitespace-only and null
texts and an empty continuation are refused naming line and field, texts over the window are scored in rolling
windows (README) and embed names the row over the window; on CPU in float16, bfloat16 and float32 (tiny GPT-2 and
Llama) scores are the same in batches of 1 and 8, with FLOAT_CHUNK of a few positions, and through the model's own
logits; an empty results table's list types equal a shard's (`item` / `element` names aside).
"""

from __future__ import annotations

import math

import pytest
from helpers import write_jsonl

import runner
import runner.worker as worker
from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.params import EmbedParams
from runner.results import valid_shards
from runner.worker import run_job


def test_an_embed_job_writes_a_shard_once_its_vectors_hold_so_many_numbers(tmp_path, tiny_gpt2, gpt2_engine,
                                                                           monkeypatch):  # fmt: skip
    """Vectors of 64 floats, a shard written once its rows hold 5 vectors' numbers: 12 rows in batches of 2 take
    shards of 6 rows, the third batch reaching it (before: one shard of 12, a vector counted as no numbers)."""
    monkeypatch.setattr(worker, "SHARD_VALUES", 5 * 64)
    rows = [{"id": f"r{i}", "text": f"Every student reads {i}"} for i in range(12)]
    job = create_job(write_jsonl(tmp_path / "t.jsonl", rows), tiny_gpt2, EmbedParams(), EngineOptions(batch_size=2),
                     job_dir=tmp_path / "j")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    sizes = [pq_rows(p) for p in valid_shards(job.dir)]
    assert sizes == [6, 6], sizes
    assert list(runner.load_results(job.dir)["id"]) == [r["id"] for r in rows]


@pytest.fixture(scope="module")
def tiny_opt(tiny_gpt2, tmp_path_factory):
    """A tiny OPT whose last layer is projected out to 32 of its 64 hidden values (as OPT-350m's 1,024 to 512:
    `word_embed_proj_dim`), with tiny_gpt2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    path = tmp_path_factory.mktemp("opt") / "opt"
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2,
                       ffn_dim=64, num_attention_heads=2, max_position_embeddings=128, bos_token_id=0,
                       eos_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_an_embed_jobs_vectors_are_as_wide_as_its_results_say(tmp_path, tiny_opt):
    """The width of an embed job's `embedding` column is its vectors', where a projection follows the last layer
    too: the results of a job not run yet said 64 (hidden_size) where its rows then said 32, and the Ray stage
    ended every batch in ArrowTypeError ("Size of FixedSizeList is not the same")."""
    import pyarrow as pa

    import runner.ray
    from runner.engine import Engine

    rows = [{"id": "a", "text": "The quick brown fox"}, {"id": "b", "text": "A cat"}]
    job = create_job(write_jsonl(tmp_path / "t.jsonl", rows), tiny_opt, EmbedParams(), job_dir=tmp_path / "j")
    with pytest.warns(UserWarning, match="0 of its 2 results"):
        before = runner.load_results(job.dir, format="arrow").schema.field("embedding").type
    assert run_job(job, Engine(tiny_opt, EngineOptions(device="cpu")), echo=None).finished
    after = runner.load_results(job.dir, format="arrow")
    assert before.list_size == after.schema.field("embedding").type.list_size == 32
    out = runner.ray.Embed(tiny_opt, EmbedParams())(pa.Table.from_pylist(rows))
    assert out.column("embedding").to_pylist() == after.column("embedding").to_pylist()


def test_a_first_batch_with_a_non_finite_row_leaves_scoring_a_few_positions_at_a_time(
    tiny_llama, monkeypatch
):
    """Whether the output layer alone gives a model's logits is asked of its first batch scored; a NaN there (a
    float16 overflow) compared unequal to itself, so the engine took its model for one with a softcap and scored
    every later batch from [batch, positions, vocab] logits, its memory bound gone for the rest of the process.
    The question is asked of the rows without a NaN, and left open where there is none."""
    import torch

    from runner import scoring
    from runner.engine import Engine
    from runner.engine import NumericalError as Numerical

    engine = Engine(tiny_llama, EngineOptions(device="cpu"))
    texts = ["The robot looks at the old man", "A small bird talks to my friend"]
    seqs = scoring.tokenize_texts(engine.tokenizer, texts)
    poison = next(t for t in seqs[1] if t not in seqs[0])  # (a token only the second text has)
    embeddings = engine.model.get_input_embeddings().weight
    kept = embeddings[poison].clone()
    with torch.no_grad():
        embeddings[poison] = math.inf  # the second row's states from it on are NaN
        with pytest.raises(Numerical) as e:
            scoring.score_batch(engine, seqs, [1, 1])
        assert e.value.rows == [1] and engine._head_only is True
        embeddings[poison] = kept
        engine._head_only = None
        with pytest.raises(
            Numerical
        ):  # every row non-finite: nothing known, the model's own logits this once
            with monkeypatch.context() as m:
                m.setattr(scoring, "_head_in_chunks", lambda *a: pytest.fail("no row could tell"))
                embeddings[poison] = math.inf
                scoring.score_batch(engine, seqs[1:], [1])
        assert engine._head_only is None
        embeddings[poison] = kept
    chunked = []
    head_in_chunks = scoring._head_in_chunks
    monkeypatch.setattr(scoring, "_head_in_chunks", lambda *a: chunked.append(1) or head_in_chunks(*a))
    scored = scoring.score_batch(engine, seqs, [1, 1])
    assert engine._head_only is True and chunked  # (one call a group of rows of similar length)
    assert scored[1].token_logprobs == pytest.approx(
        scoring.score_batch(engine, seqs[1:], [1])[0].token_logprobs
    )


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_a_shards_numbers_are_counted_as_its_rows_hold_them(tmp_path, tiny_gpt2, gpt2_engine, monkeypatch):
    """What `_numbers` counts of a buffered result is what its written row holds: token ids and log-probs, prompt
    log-probs, and 3 numbers an alternative, each step's (a step holds k alternatives, or k + 1 where the chosen
    token is not among them: with logprobs=1 and top_k=2 about half the steps each). Before, every step was
    counted as long as the first, so the rows whose first token was the likeliest counted half their
    alternatives (a shard could hold twice `SHARD_VALUES`), and those whose first was not, too many."""
    counted: dict[tuple[int, int], int] = {}
    due = worker.JobRun.due

    def counting(self, unit):
        counted.update({(unit.start + g.row, g.sample): worker._numbers(g.completion) for g in unit.results})
        return due(self, unit)

    monkeypatch.setattr(worker.JobRun, "due", counting)
    rows = [{"id": f"r{i}", "prompt": f"Every student reads {i}"} for i in range(4)]
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12, top_k=2, logprobs=1, prompt_logprobs=True,
                              num_return_sequences=2)  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "g.jsonl", rows), tiny_gpt2, params, job_dir=tmp_path / "g")
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.dir)
    held = {
        (int(i[1:]), s): 2 * len(ids) + 3 * sum(map(len, top)) + len(prompt)
        for i, s, ids, top, prompt in zip(
            df["id"], df["sample"], df["token_ids"], df["top_logprobs"], df["prompt_logprobs"], strict=True
        )  # fmt: skip
    }
    assert counted == held
    assert any(
        len(top[0]) < max(map(len, top)) for top in df["top_logprobs"]
    )  # (the case that was miscounted)

    texts = [{"id": r["id"], "text": r["prompt"]} for r in rows]
    embed = create_job(
        write_jsonl(tmp_path / "e.jsonl", texts), tiny_gpt2, EmbedParams(), job_dir=tmp_path / "e"
    )
    counted.clear()
    assert run_job(embed, gpt2_engine, echo=None).finished
    assert counted == {(i, 0): len(v) for i, v in enumerate(runner.load_results(embed.dir)["embedding"])}
