"""The benchmark cannot rot: benchmarks/bench.py runs each workload on the tiny model with very small sizes, and
its report and JSON have the expected rows, with positive numbers (the numbers themselves mean nothing here)."""

import json

import pytest
from workers import ROOT


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py as a module (its parts are plain modules beside it), its roofline measured on small
    matrices: seconds saved, and the numbers mean nothing on a busy test machine anyway. The process settings
    it changes are put back afterwards."""
    import torch
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(ROOT / "benchmarks"))
        import bench
        import measure

        m.setitem(measure.MATMUL_SIZES, "quick", (256,))
        yield bench
    torch.set_num_threads(threads)  # what --threads and bench's set-up changed for the whole process
    transformers.logging.set_verbosity(verbosity)


def run_bench(bench, tmp_path, *args) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*map(str, args), "--quick", "--threads", "1", "--json-out", str(out)]) == 0
    return json.loads(out.read_text())


def assert_positive(row, *fields):
    for f in fields:
        assert row[f] > 0, (row.get("name") or row["method"], f, row[f])


def test_realistic_workload_with_score_and_embed_rows(bench, tiny_gpt2, tmp_path, capsys, monkeypatch):
    import workloads

    monkeypatch.setattr(workloads, "AB_OPTION", "no_such_option")  # the one-row path (A/B: the test below)
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--workload", "realistic", "--tasks",
                    "generate,score,embed", "--num-prompts", 6, "--max-new-tokens", 16)  # fmt: skip
    lengths = {int(k): n for k, n in res["realistic"]["answer_lengths"].items()}
    assert lengths.keys() == {8, 16} and sum(lengths.values()) == 6  # mixed answer lengths, seeded
    assert (
        res["realistic"]["sampling"]["temperature"] == 0.8 and res["realistic"]["sampling"]["top_p"] == 0.95
    )
    assert [m["name"] for m in res["methods"]] == [
        "runner (default)",
        "pipeline bs=16",
        "naive generate bs=1",
    ]
    cap = sum(n * k for n, k in lengths.items())
    for m in res["methods"]:
        assert_positive(m, "seconds", "generated_tokens", "tokens_per_second", "peak_memory_bytes")
        assert m["generated_tokens"] <= cap  # each row at most its own max_new_tokens
    assert set(res["ratios"]) == {"runner (default) / naive", "runner (default) / pipeline"}
    assert all(v > 0 for v in res["ratios"].values())
    assert [(t["task"], t["method"]) for t in res["tasks"]] == [
        ("score", "runner"), ("score", "plain transformers bs=16"), ("embed", "runner")
    ]  # fmt: skip
    for t in res["tasks"]:
        assert_positive(t, "seconds", "tokens", "tokens_per_second", "peak_memory_bytes")
    assert res["task_ratios"]["score: runner / plain transformers"] > 0
    assert res["score_max_abs_diff"] < 1e-4  # both score the same tokens
    report = capsys.readouterr().out
    for line in ("| runner (default) | n/a |", "| naive generate bs=1 | 6 |", "| score | runner | 1 |",
                 "| embed | runner | 1 |", "ratios (output tok/s): runner (default) / naive = ",
                 "EngineOptions has no field no_such_option: one runner row"):  # fmt: skip
        assert line in report, line


def test_realistic_runner_rows_per_value_of_the_ab_option(bench, tiny_gpt2, tmp_path, monkeypatch):
    """EngineOptions has the A/B field (continuous_batching): runner runs once with it off and once on, the
    value in the job's options and on the engine while the job runs, and the ratio is reported."""
    import runner.worker

    seen, real = [], runner.worker.run_job

    def run_job(job, engine, **kw):
        seen.append((job.options.continuous_batching, engine.options.continuous_batching))
        return real(job, engine, **kw)

    monkeypatch.setattr(runner.worker, "run_job", run_job)
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--workload", "realistic", "--num-prompts", 4,
                    "--skip-naive", "--skip-pipeline")  # fmt: skip
    assert seen == [(False, False), (False, False), (True, True)]  # the warm-up, then off, then on
    assert [m["name"] for m in res["methods"]] == [
        "runner (continuous_batching=False)",
        "runner (continuous_batching=True)",
    ]
    for m in res["methods"]:
        assert_positive(m, "generated_tokens", "tokens_per_second")
    assert res["ratios"]["runner continuous_batching=True / continuous_batching=False"] > 0


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


def test_naive_on_the_first_prompts_only_compares_over_those(bench, tiny_gpt2, tmp_path):
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--naive-prompts", "3", "--skip-pipeline",
                    "--skip-ablations", "--skip-plain-engine", "--lp-repeats", "0")  # fmt: skip
    naive = next(m for m in res["methods"] if m["name"].startswith("naive"))
    assert naive["name"] == "naive generate bs=1 (first 3 prompts)" and naive["batches"] == 3
    assert res["matches"]["runner vs naive"]["seq"] == 1.0  # greedy, float32: the same tokens on those 3
    assert "runner default / naive" in res["ratios"]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --quick: the one-shot GPU check, end to end on CPU, so that the
    script a GPU session runs first cannot rot (its tests on the device, then the benchmark, table and JSON)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "RUNNER_CACHE": os.environ["RUNNER_CACHE"]}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "check.log").read_text()
    assert "tests exit code: 0" in log and "| runner (default) |" in log
    res = json.loads((out / "gpt2-random-cpu.json").read_text())
    assert any(m["name"] == "runner (default)" and m["tokens_per_second"] > 0 for m in res["methods"])
    assert " passed" in (out / "tests.log").read_text()
