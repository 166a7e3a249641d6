"""Adversarial pass 270: the Ray Data path (runner/ray.py) against exactly-once when Ray cuts, retries and resumes.

Found, and kept fixed below:
  * A checkpointed generation pipeline with several samples per row (`num_return_sequences` or a row's `n`) lost
    samples on resume without a word: Ray Data cuts a stage's output into blocks of `target_max_block_size`
    (128 MiB; a batch of top_logprobs over long generations is more, and users lower it), anywhere, so one
    id's samples could land in two blocks, written and checkpointed by two write tasks. The run stopping
    between the two (a write failing, the driver killed), the checkpoint held the id; the restart skipped the
    row, and the samples of the block that was not written were never computed (sample 0 of a row kept, 1 and
    2 gone). In a Ray actor a stage now gives its rows id by id, which Ray only joins, never cuts (one id's
    rows under half a block); one id's rows too big for that, with a checkpoint, fail the batch saying what to
    raise rather than be cut.

Checked, and kept (no defect): an actor SIGKILLed mid-batch (its rows computed, not returned) is replaced by Ray,
which runs the batch again: every (id, sample) once, the tokens of a stage called directly.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl
from test_ray import ray_instance, ray_local  # noqa: F401  (the module's one Ray instance, as test_ray's)

import runner
import runner.ray

pytestmark = pytest.mark.xdist_group("ray")


def _failing_sink(path: str, id_: str):
    """Ray's Parquet sink whose write fails (every try) for a block holding a sample of `id_` other than its
    first: the run stops with the blocks written before it checkpointed, as a killed driver leaves it."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    class Failing(ParquetDatasink):
        def write(self, blocks, ctx):
            blocks = list(blocks)
            for b in blocks:
                if any(
                    i == id_ and s != 0
                    for i, s in zip(b["id"].to_pylist(), b["sample"].to_pylist(), strict=True)
                ):
                    raise RuntimeError(f"injected: the write of a block of {id_}")
            return super().write(blocks, ctx)

    return Failing(path)


@pytest.mark.slow
def test_a_resumed_pipeline_keeps_every_sample_of_a_row_whose_blocks_were_cut(ray_local, tmp_path, tiny_gpt2):  # noqa: F811
    """Rows of 3 samples each, Ray cutting the stage's output into blocks of 9.5 rows' bytes (in the 4th row's
    samples); the write of a block with that row's later samples fails, the pipeline stops; run again from its
    checkpoint, every row has its 3 samples once, those of an uninterrupted run."""
    import math

    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    rows = [{"id": f"r{i}", "prompt": f"Hello there {i}"} for i in range(8)]
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    params = runner.GenerationParams(max_new_tokens=6, temperature=0.8, num_return_sequences=3, seed=1)
    ref = runner.ray.Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows))
    per_row = ref.nbytes / ref.num_rows  # (what Ray cuts by: bytes, as the rows of a block hold them)
    cut = math.ceil(int(9.5 * per_row) / per_row)
    assert cut % 3, "the cut falls between two rows' samples: pick another size"
    split = rows[cut // 3]["id"]
    ref = ref.to_pandas()
    ctx = ray_local.data.DataContext.get_current()
    target = ctx.target_max_block_size
    said = []
    try:
        ctx.target_max_block_size = int(9.5 * per_row)  # (one batch's output of 24 rows: cut in 3)
        for sink in (_failing_sink(str(tmp_path / "out"), split), ParquetDatasink(str(tmp_path / "out"))):
            ctx.checkpoint_config = runner.ray.checkpoint_config(str(tmp_path / "ckpt"))
            ctx.checkpoint_config.checkpoint_actor_pool_max_size = 1
            ds = ray_local.data.read_json(str(tmp_path / "in"), ray_remote_args={"num_cpus": 0.25})
            out = runner.ray.generate(ds, tiny_gpt2, params, num_cpus=0.5)
            try:
                out.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
            except Exception as e:  # (Ray's error around ours)
                said.append(str(e))
    finally:
        ctx.checkpoint_config, ctx.target_max_block_size = None, target
    assert len(said) == 1 and f"injected: the write of a block of {split}" in said[0]
    got = pq.read_table(tmp_path / "out").to_pandas()
    assert sorted(zip(got["id"], got["sample"], strict=True)) == [
        (r["id"], s) for r in rows for s in range(3)
    ]
    key = ["id", "sample"]
    got, ref = got.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    assert got["token_ids"].map(list).tolist() == ref["token_ids"].map(list).tolist()


def test_in_ray_a_stage_gives_its_rows_id_by_id_and_refuses_rows_of_one_id_too_big_to_stay_whole(tiny_gpt2):
    """What a stage gives Ray for a batch (`_by_id`): a table per id, in order, a row without id alone (an error
    row); rows of one id of half a block or more, with a checkpoint, are refused naming the setting to raise
    (without one, Ray may cut them: nothing is skipped by id on a restart)."""
    pytest.importorskip("ray.data")
    import ray.data

    from runner.ray import _by_id

    rows = [{"id": "a", "prompt": "Hello"}, {"id": None, "prompt": "x"}, {"id": "b", "prompt": "Hi"}]
    params = runner.GenerationParams(max_new_tokens=3, temperature=0.8, num_return_sequences=2, seed=1)
    table = runner.ray.Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows))
    assert [t.column("id").to_pylist() for t in _by_id(table)] == [["a", "a"], [None], ["b", "b"]]
    ctx = ray.data.DataContext.get_current()
    target, config = ctx.target_max_block_size, ctx.checkpoint_config
    try:
        half = table.slice(0, 2).nbytes  # (a's rows)
        ctx.target_max_block_size = 2 * half
        assert len(list(_by_id(table))) == 3
        ctx.checkpoint_config = runner.ray.checkpoint_config("/nonexistent/ckpt")
        said = f"take {half} bytes, half or more of Ray Data's target_max_block_size ({2 * half})"
        with pytest.raises(runner.RunnerError, match=re.escape(said)):
            list(_by_id(table))
    finally:
        ctx.target_max_block_size, ctx.checkpoint_config = target, config


class Killing(runner.ray.Generate):
    """Generate whose first batch of the run (the first call to create `marker`) SIGKILLs its actor once computed:
    the batch dies mid-way, in Ray's hands."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = Path(marker)

    def results(self, batch):
        out = super().results(batch)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return out
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_an_actor_killed_mid_batch_is_replaced_and_its_batch_written_once(ray_local, tmp_path, tiny_gpt2):  # noqa: F811
    rows = [{"id": f"r{i}", "prompt": f"Hello there {i}"} for i in range(8)]
    (tmp_path / "in").mkdir()
    for k in range(2):
        write_jsonl(tmp_path / "in" / f"{k}.jsonl", rows[4 * k : 4 * k + 4])
    params = runner.GenerationParams(max_new_tokens=4, temperature=0.8, num_return_sequences=2, seed=1)
    ref = runner.ray.Generate(tiny_gpt2, params)(pa.Table.from_pylist(rows)).to_pandas()
    ds = ray_local.data.read_json(str(tmp_path / "in"), ray_remote_args={"num_cpus": 0.25})
    out = runner.ray.apply(
        Killing, ds, tiny_gpt2, params, num_cpus=0.5, batch_size=4, marker=str(tmp_path / "k")
    )
    out.write_parquet(str(tmp_path / "out"), ray_remote_args={"num_cpus": 0.25})
    assert (tmp_path / "k").exists()
    key = ["id", "sample"]
    got = pq.read_table(tmp_path / "out").to_pandas().sort_values(key).reset_index(drop=True)
    assert list(zip(got["id"], got["sample"], strict=True)) == [(r["id"], s) for r in rows for s in range(2)]
    ref = ref.sort_values(key).reset_index(drop=True)
    assert got["token_ids"].map(list).tolist() == ref["token_ids"].map(list).tolist()
