"""The benchmark cannot rot: benchmarks/bench.py runs each workload on the tiny model with very small sizes, and
its report and JSON have the expected rows, with positive numbers (the numbers themselves mean nothing here)."""

import json

import pytest
from workers import ROOT

pytestmark = pytest.mark.slow  # the benchmark harness, not runner: `make test` runs it, the edit loop not


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
    assert seen[1:] == [(False, False), (True, True)]  # after the warm-up: off, then on
    assert [m["name"] for m in res["methods"]] == [
        "runner (continuous_batching=False)",
        "runner (continuous_batching=True)",
    ]
    for m in res["methods"]:
        assert_positive(m, "generated_tokens", "tokens_per_second")
    assert res["ratios"]["runner continuous_batching=True / continuous_batching=False"] > 0


def test_fixed_workload_rows(bench, tiny_gpt2, tmp_path, capsys):
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--num-prompts", 4, "--lp-repeats", 1,
                    "--busy-beside", 1)  # fmt: skip
    names = [m["name"] for m in res["methods"]]
    assert names[:3] == ["runner bs=8", "runner bs=16", "runner (default)"] and names[-3:] == [
        "runner (default) beside 1 busy loop", "pipeline bs=16", "naive generate bs=1"
    ]  # fmt: skip
    assert any("all levers off" in n for n in names)
    load = res["under_load"]  # --threads 1 beside 1 loop: a whole core each on 2+ cores, half of one on 1
    assert load["busy_loops"] == 1 and load["fair_share"] == (1.0 if load["cores"] >= 2 else 0.5)
    assert load["throughput_per_share"] > 0 and load["openmp_wait"] == "GOMP_SPINCOUNT=1000 KMP_BLOCKTIME=0"
    assert "under load: runner (default) beside 1 busy loop(s) on " in capsys.readouterr().out
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


def test_refill_few_shot_prompts_share_their_start(bench, tiny_gpt2, tmp_path, monkeypatch):
    """--few-shot puts one instruction before every prompt: the rows share that start, and the static runs
    with and without shared prompt work (--unshared) agree row for row."""
    import prompts
    import refill

    monkeypatch.setattr(prompts, "FEW_SHOT", "Answer each question in one short sentence, please. " * 3)
    out = tmp_path / "refill.json"
    args = ["--model", tiny_gpt2, "--num-prompts", "4", "--batch-size", "4", "--max-new-tokens", "8",
            "--few-shot", "--unshared", "--json-out", str(out)]  # fmt: skip
    assert refill.main(args) == 0
    res = json.loads(out.read_text())
    assert res["few_shot"] and res["shared_start"] >= 16
    assert res["rows_identical"] == res["unshared_rows_identical"] == 4


def test_refill_natural_lengths_give_every_row_the_same_max_new_tokens(bench, tiny_gpt2, tmp_path):
    """--natural: one max_new_tokens for every row (as `runner submit --max-new-tokens` gives a whole file),
    where the default draws each row's from 8..--max-new-tokens."""
    import refill

    lengths = {}
    for flag in ([], ["--natural"]):
        out = tmp_path / f"refill{len(flag)}.json"
        args = ["--model", tiny_gpt2, "--num-prompts", "6", "--batch-size", "2", "--max-new-tokens", "12",
                "--json-out", str(out), *flag]  # fmt: skip
        assert refill.main(args) == 0
        res = json.loads(out.read_text())
        assert res["natural"] == bool(flag) and res["rows_identical"] == 6
        lengths[bool(flag)] = res["max_new_tokens"]
    assert lengths[True] == [12] * 6 and len(set(lengths[False])) > 1 and max(lengths[False]) <= 12


def test_refill_ab_script(bench, tiny_gpt2, tmp_path, capsys):
    """benchmarks/refill.py (static batches vs one refilled batch) runs end to end, and every row agrees."""
    import refill

    out = tmp_path / "refill.json"
    args = ["--model", tiny_gpt2, "--num-prompts", "3", "--samples", "2", "--batch-size", "2",
            "--max-new-tokens", "16", "--json-out", str(out)]  # fmt: skip
    assert refill.main(args) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == 6 and res["rows_identical"] == 6 and res["output_tokens"] > 0
    assert 0 < res["refill_decode_steps"] <= res["static_decode_steps"]
    assert (
        res["unshared_rows_identical"] == 6 and res["shared_speedup"] > 0
    )  # the samples' prompts shared or not
    printed = capsys.readouterr().out
    assert "rows identical: 6/6" in printed and "without shared prompt work" in printed


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
    res = json.loads((out / "tiny-random-cpu.json").read_text())
    assert any(m["name"] == "runner (default)" and m["tokens_per_second"] > 0 for m in res["methods"])
    assert " passed" in (out / "tests.log").read_text()
    refill = json.loads((out / "refill-cpu.json").read_text())  # static vs continuous batching
    assert refill["rows"] == refill["rows_identical"] == 8 and "refill exit code: 0" in log
    probe = json.loads((out / "sdpa-cpu.json").read_text())  # attention kernels: torch's choice vs no cuDNN
    assert probe["no-cudnn_rows_identical"] == 8 and probe["no-cudnn_warm_seconds"] > 0
    assert "sdpa probe exit code: 0" in log
    job = json.loads((out / "job-cpu.json").read_text())  # a whole job, SIGKILLed after its first commit
    assert job["exactly_once"] and job["rows"] == 24 and job["kill_landed"]
    assert 0 < job["results_before_resume"] < 24 and "whole job exit code: 0" in log
    tasks = json.loads((out / "score-cpu.json").read_text())  # score and embed at the device's batch sizes
    assert {(t["task"], t["method"]) for t in tasks["tasks"]} >= {("score", "runner"), ("embed", "runner")}
    assert "score/embed exit code: 0" in log
    graphs = json.loads((out / "graphs-cpu.json").read_text())  # static cache vs dynamic vs runner
    assert graphs["static_rows_identical_to_generate"] == 8 and graphs["runner_tok_s"] > 0
    # runner with --cuda-graphs against itself (fixed slots; eager on a CPU): the same rows at each batch size
    assert [(r["batch_size"], r["rows_identical"]) for r in graphs["runner_sweep"]] == [(4, 8), (8, 8)]
    assert "graph probe exit code: 0" in log


# --- CPU peers (--peers): the plumbing, with a fake peer (tests/fake_peer.py) instead of an installed one -------

PEER_ARGS = ("--num-prompts", 4, "--skip-naive", "--skip-pipeline", "--skip-ablations", "--skip-plain-engine",
             "--lp-repeats", 0, "--peers", "openvino,ctranslate2")  # fmt: skip


@pytest.fixture
def fake_peers(tiny_gpt2, tmp_path, monkeypatch):
    """The fake peer instead of run_peer.py, models 'converted' for both peers under a fresh RUNNER_CACHE (the
    marker setup.sh writes last), and the fake told to answer with runner's own default-row tokens."""
    import cpu_peers

    monkeypatch.setattr(cpu_peers, "RUN_PEER", ROOT / "tests" / "fake_peer.py")
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    for peer in cpu_peers.ROWS:
        folder = cpu_peers.export_dir(tiny_gpt2, peer)
        folder.mkdir(parents=True)
        (folder / cpu_peers.EXPORT_MARKER).write_text("{}")
    echo, run_all = tmp_path / "echo.json", cpu_peers.run_all

    def answer_as_runner(b):
        echo.write_text(json.dumps(b.outputs["runner (default)"]))
        run_all(b)

    monkeypatch.setattr(cpu_peers, "run_all", answer_as_runner)
    monkeypatch.setenv("FAKE_PEER_ECHO", str(echo))
    return echo


def test_peer_rows_ratios_and_agreement(bench, tiny_gpt2, tmp_path, fake_peers, capsys):
    import sys

    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, *PEER_ARGS, "--peers-python", sys.executable)
    rows = {m["name"]: m for m in res["methods"]}
    assert list(rows) == ["runner bs=8", "runner bs=16", "runner (default)", "openvino-genai cb",
                          "ctranslate2"]  # fmt: skip
    runner = rows["runner (default)"]
    for name in ("openvino-genai cb", "ctranslate2"):
        row = rows[name]
        assert row["generated_tokens"] == 4 * 8 and row["versions"] == {"fake-peer": "1.0"}
        assert_positive(row, "seconds", "tokens_per_second", "peak_memory_bytes", "warmup_seconds")
        # the request carried runner's own token ids, its thread count, default batch size and precision
        assert row["settings"] == {"prompts": 4, "prompt_tokens": res["prompts"]["prompt_tokens"],
                                   "max_new_tokens": 8, "threads": 1, "batch_size": runner["batch_size"],
                                   "precision": "f32", "batches": row["batches"]}  # fmt: skip
        ratio = res["ratios"][f"runner default / {name}"]
        assert ratio == pytest.approx(runner["tokens_per_second"] / row["tokens_per_second"])
    assert rows["openvino-genai cb"]["batches"] is None and rows["ctranslate2"]["batches"] == 1
    assert res["matches"]["runner vs openvino-genai cb"] == {"seq": 1.0, "prefix": 1.0, "token": 1.0}
    assert res["matches"]["runner vs ctranslate2"] == {"seq": 0.0, "prefix": 7 / 8, "token": 7 / 8}
    assert res["peers"]["notes"] == []
    report = capsys.readouterr().out
    for line in ("| openvino-genai cb | n/a |", "| ctranslate2 | 1 |", "runner default / openvino-genai cb = ",
                 "  runner vs ctranslate2: seq 0.0%, prefix 87.5%, token 87.5%",
                 "cores busy (cpu s / wall s, threads asked for: 1; well under means the machine was shared): runner bs=8 ",
                 f"CPU peers (--peers openvino,ctranslate2, run by {sys.executable}):",
                 "  openvino-genai cb: fake-peer 1.0; prompts 4; "):  # fmt: skip
        assert line in report, line


def test_peers_are_asked_for_runners_precision(bench, tiny_gpt2, tmp_path, fake_peers):
    """At equal precision: a bfloat16 run asks each peer for bf16 compute and KV cache (an AMX CPU gives runner
    ~1.7x in bf16; comparing that with a float32 peer would flatter runner)."""
    import sys

    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, *PEER_ARGS, "--peers-python", sys.executable,
                    "--dtype", "bfloat16")  # fmt: skip
    rows = {m["name"]: m for m in res["methods"]}
    assert [rows[n]["settings"]["precision"] for n in ("openvino-genai cb", "ctranslate2")] == [
        "bf16",
        "bf16",
    ]


def test_score_peer_row_ratio_and_agreement(bench, tiny_gpt2, tmp_path, fake_peers, capsys):
    """--tasks score --peers: CTranslate2 (here the fake, which scores every token 0) becomes a score row on
    runner's own token ids; OpenVINO GenAI, which has no scoring call, leaves a note."""
    import sys

    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--tasks", "score", "--num-prompts", 4, "--peers",
                    "openvino,ctranslate2", "--peers-python", sys.executable)  # fmt: skip
    rows = {r["method"]: r for r in res["tasks"]}
    assert list(rows) == ["runner", "plain transformers bs=16", "ctranslate2 score_batch"]
    peer, ours = rows["ctranslate2 score_batch"], rows["runner"]
    assert peer["tokens"] == ours["tokens"] and peer["versions"] == {"fake-peer": "1.0"}
    assert_positive(peer, "seconds", "tokens_per_second", "peak_memory_bytes")
    settings = {**peer["settings"]}
    assert settings.pop("batch_size") >= 1  # runner's own score batch size
    assert settings == {"prompts": 4, "prompt_tokens": ours["tokens"] + 4, "threads": 1, "precision": "f32",
                        "batches": 1}  # fmt: skip
    ratio = res["task_ratios"]["score: runner / ctranslate2 score_batch"]
    assert ratio == pytest.approx(ours["tokens_per_second"] / peer["tokens_per_second"])
    # the fake's log-probs are all 0: the difference is runner's largest |log-prob|, finite and positive
    assert 0 < res["score_max_abs_diff_peers"]["ctranslate2 score_batch"] < float("inf")
    assert res["peers"]["notes"] == ["openvino: no score row (openvino-genai cb has no scoring call)"]
    assert (
        "score agreement: runner vs ctranslate2 score_batch, max |log-prob difference| "
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("case", "note"),
    [
        ("no venv", "peers skipped: no peers venv at {tmp}/none/python (create it with bash "
                    "benchmarks/peers/setup.sh, or point --peers-python / RUNNER_PEERS_PYTHON at one)"),
        ("no export", "openvino skipped: no converted model at {tmp}/cache/peers/{model}/openvino (run bash "
                      "benchmarks/peers/setup.sh --model {model_dir})"),
        ("peer fails", "openvino failed: run_peer.py exited with 1: KeyError: 'FAKE_PEER_ECHO'"),
    ],
    ids=["no venv", "no export", "peer fails"],
)  # fmt: skip
def test_a_peer_that_cannot_run_leaves_a_note(bench, tiny_gpt2, tmp_path, fake_peers, monkeypatch, capsys, case,
                                              note):  # fmt: skip
    import shutil
    import sys

    import cpu_peers

    python = tmp_path / "none" / "python" if case == "no venv" else sys.executable
    if case == "no export":
        shutil.rmtree(tmp_path / "cache")
    if case == "peer fails":
        monkeypatch.delenv("FAKE_PEER_ECHO")
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, *PEER_ARGS, "--peers-python", python)
    note = note.format(tmp=tmp_path, model=cpu_peers.Path(tiny_gpt2).name, model_dir=tiny_gpt2)
    assert res["peers"]["notes"][0] == note
    assert len(res["peers"]["notes"]) == (1 if case == "no venv" else 2)  # else the same for ctranslate2
    assert not any(m.get("peer") for m in res["methods"])
    assert not any("openvino" in k or "ctranslate2" in k for k in [*res["ratios"], *res["matches"]])
    assert f"  {note}\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peers", "openvino,vllm"], "--peers must be a comma-separated list of openvino, ctranslate2, got "
                                       "'openvino,vllm'"),
        (["--peers", "openvino", "--workload", "realistic"], "--peers adds rows to the fixed workload"),
    ],
)  # fmt: skip
def test_peers_option_errors(bench, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_structured_task_rows_and_ratio(bench, tiny_gpt2, tmp_path, capsys):
    res = run_bench(bench, tmp_path, "--model", tiny_gpt2, "--tasks", "structured", "--num-prompts", 6,
                    "--max-new-tokens", 12)  # fmt: skip
    constrained, plain = res["tasks"]
    assert (constrained["method"], plain["method"]) == (
        "runner, JSON schema",
        "runner, unconstrained (same tokens)",
    )
    assert constrained["tokens"] == plain["tokens"] > 0  # the same work, token for token
    for t in res["tasks"]:
        assert_positive(t, "seconds", "tokens", "tokens_per_second")
    assert res["task_ratios"]["structured: constrained / unconstrained"] > 0
    assert 0 <= res["structured"]["complete_fraction"] <= 1 and res["structured"]["batch_size"] == 64
    out = capsys.readouterr().out
    assert "structured: constrained / unconstrained = " in out and "structured output: " in out


def test_cpu_workers_script(bench, tiny_gpt2, tmp_path, capsys):
    """benchmarks/cpu_workers.py (one worker process against --workers 2) runs end to end, the processes get a
    share of the cores each, and the results are identical."""
    import os

    import cpu_workers

    out = tmp_path / "workers.json"
    args = ["--model", tiny_gpt2, "--num-prompts", "8", "--max-new-tokens", "2", "--repeats", "1",
            "--json-out", str(out)]  # fmt: skip
    assert cpu_workers.main(args) == 0
    res = json.loads(out.read_text())
    cores = len(os.sched_getaffinity(0))
    assert res["identical"] and [r["variant"] for r in res["runs"]] == ["one", "many"]
    assert res["runs"][1]["cpu_threads"] == [max(1, cores // 2)]
    assert "2 processes / 1 process: wall" in capsys.readouterr().out
