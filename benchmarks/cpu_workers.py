#!/usr/bin/env python
"""One worker process with every core against `runner work --workers N` (one process per share of the cores),
on one job, as a user runs it: `runner work` end to end (start, model load, the job), in one run, alternately.

On a CPU one process leaves part of its cores idle between its parallel kernels (the decode step's Python runs on
one thread); N processes with a share of the cores each keep them busy, at the price of N copies of the model in
memory. Each variant runs on its own copy of the same job (--num-prompts of bench.py's prompt set, greedy,
exactly --max-new-tokens tokens, units of a quarter of the job so that the workers share it), and the report
gives wall seconds (everything the user waits for), the runs' own compute seconds from stats.json, the ratio,
whether the results are identical, and the load average.

    RUNNER_CACHE=/tmp/rcache python benchmarks/cpu_workers.py --model smollm2 --num-prompts 256 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def make_jobs(model: str, n: int, new_tokens: int, root: Path, names: list[str]) -> None:
    """One job per name, all of the same prompts and settings, `n // 4` rows a unit."""
    from prompts import build_prompts

    from runner.jobs import create_job
    from runner.models import load_tokenizer
    from runner.params import EngineOptions, GenerationParams

    tok = load_tokenizer(model)
    texts = build_prompts(n, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    with open(root / "p.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"r{i:05d}", "prompt": t}, ensure_ascii=False) + "\n")
    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    for name in names:
        create_job(root / "p.jsonl", model, params, EngineOptions(device="cpu"), job_dir=root / name,
                   unit_rows=max(1, n // 4), home=root / "home")  # fmt: skip


def run_work(root: Path, name: str, workers: int) -> tuple[float, list[dict]]:
    """`runner work --job JOB [--workers N]`: (wall seconds, the runs stats.json recorded)."""
    args = [sys.executable, "-m", "runner", "--home", str(root / "home"), "work", "--job", str(root / name)]
    args += ["--workers", str(workers)] if workers > 1 else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"runner work failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, json.loads((root / name / "stats.json").read_text())["runs"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (the demo model) or a model folder")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="processes of the second variant")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    import runner  # noqa: F401  (its OpenMP setting before torch)
    import runner.results
    from runner.models import DEMO_MODEL, resolve_model

    model = resolve_model(DEMO_MODEL) if args.model == "smollm2" else args.model
    cores = len(os.sched_getaffinity(0))
    rows, load = [], [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="cpu-workers-") as tmp:
        root = Path(tmp)
        names = [f"{v}{r}" for r in range(args.repeats) for v in ("one", "many")]
        make_jobs(model, args.num_prompts, args.max_new_tokens, root, names)
        for name in names:
            workers = 1 if name.startswith("one") else args.workers
            wall, runs = run_work(root, name, workers)
            compute = max(r["seconds"] for r in runs)
            rows.append(
                {
                    "variant": name[:-1],
                    "round": int(name[-1]),
                    "workers": workers,
                    "wall_s": round(wall, 2),
                    "compute_s": round(compute, 2),
                    "cpu_threads": sorted({r["cpu_threads"] for r in runs}),
                }
            )
            print(f"{name}: {workers} process(es), wall {wall:.1f} s, compute {compute:.1f} s, threads "
                  f"{rows[-1]['cpu_threads']}", flush=True)  # fmt: skip
        texts = [runner.results.load_results(root / n)["text"].tolist() for n in names]
    load.append(os.getloadavg()[0])
    best = {v: min(r["wall_s"] for r in rows if r["variant"] == v) for v in ("one", "many")}
    compute = {v: min(r["compute_s"] for r in rows if r["variant"] == v) for v in ("one", "many")}
    same = sum(t == texts[0] for t in texts[1:])
    print(f"{cores} cores; {args.workers} processes / 1 process: wall {best['one'] / best['many']:.2f}x, compute "
          f"{compute['one'] / compute['many']:.2f}x; results identical in {same}/{len(texts) - 1} runs; load "
          f"{load[0]:.2f} -> {load[1]:.2f}")  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "cores": cores, "runs": rows, "load": load,
                                                   "identical": same == len(texts) - 1}, indent=2))  # fmt: skip
    return 0 if same == len(texts) - 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
