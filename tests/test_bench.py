"""The benchmark cannot rot: benchmarks/bench.py runs on the tiny model with very small sizes, and its report
and JSON have the expected rows, with positive numbers (the numbers themselves mean nothing here)."""

import json

import pytest
from workers import ROOT


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py as a module (its parts are plain modules beside it), its roofline measured on small
    matrices: seconds saved, and the numbers mean nothing on a busy test machine anyway."""
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(ROOT / "benchmarks"))
        import bench
        import measure

        m.setitem(measure.MATMUL_SIZES, "quick", (256,))
        yield bench


def run_bench(bench, tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*map(str, args), "--quick", "--threads", "1", "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def assert_positive(row, *fields):
    for f in fields:
        assert row[f] > 0, (row.get("name") or row["method"], f, row[f])


def test_fixed_workload_rows(bench, tiny_gpt2, tmp_path):
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--num-prompts", 4, "--lp-repeats", 1)
    names = [m["name"] for m in res["methods"]]
    assert names[:3] == ["runner bs=8", "runner bs=16", "runner (default)"] and names[-2:] == [
        "pipeline bs=16", "naive generate bs=1"
    ]  # fmt: skip
    assert any("all levers off" in n for n in names)
    for m in res["methods"]:
        assert_positive(m, "seconds", "tokens_per_second", "peak_memory_bytes")
        assert m["generated_tokens"] == 4 * 8  # exactly --max-new-tokens each (--quick: 8)
    assert res["matches"]["runner vs naive"]["seq"] >= 0 and res["targets"]["runner >= 6x naive"] in (
        True,
        False,
    )
    assert res["logprob_overhead"]["with_seconds"] > 0
    assert all(m["same_prompt_ids_as_runner"] for m in res["methods"] if m["name"].startswith("pipeline"))
