"""Adversarial pass 267: bounded memory and exactly-once for score and embed jobs.

Found, and kept fixed below:
  * An embed job held every vector of a shard's rows before writing it, however long each was: the worker writes a
    shard once its rows hold `SHARD_VALUES` numbers (`_numbers`), but counted a vector as none, so with a hidden
    size of 4,096 a shard of 1,000 rows waited on 4 million floats (~130 MB as Python objects; 10,000 rows with
    --shard-rows, 1.3 GB), four times what a shard of generated tokens may hold, and a kill lost all of it.
  * A generation's alternatives (`logprobs`) were counted as if every step held as many as its first: a step holds
    k, or k + 1 where the chosen token is not among them, so with logprobs=1 a row whose first token was the
    likeliest counted half its alternatives (a shard could hold twice `SHARD_VALUES`). Each step is counted.
"""

from __future__ import annotations

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
