#!/usr/bin/env python
"""A whole job on a device, as a user runs it from the README, killed and carried on (gpu_check.sh).

The tests on `cuda` run the engine in-process; this runs the product path: `runner submit` (sampled, `-n 2`,
EOS allowed), then

  reference   `runner work` from start to end (the job's own default batch size on that device), timed;
  killed      the same job submitted again; `runner work` killed with SIGKILL as soon as its first batch is
              committed (a progress event, not a timer), then `runner work` again to the end.

and checks the killed run's results are exactly-once (every (id, sample) once, none missing) and says how many
rows equal the reference's token for token (a batch of other companions rounds differently; in float32 they
should all agree). Exit code 1 when exactly-once fails.

    python benchmarks/gpu_job.py --model smollm2-random --device cuda --num-prompts 1024 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from refill import _bench

REPO = Path(__file__).resolve().parents[1]


def runner_cli(
    home: Path, *args: str, check: bool = True, **popen
) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "runner", "--home", str(home), *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and done.returncode != 0:
        sys.exit(f"gpu_job: `runner {' '.join(args)}` failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return done


def submit(home: Path, prompts: Path, model: str, args) -> Path:
    runner_cli(home, "submit", str(prompts), "--model", model, "--max-new-tokens", str(args.max_new_tokens),
               "--temperature", "0.8", "--top-p", "0.95", "-n", "2", "--seed", "7", "--device", args.device,
               "--dtype", args.dtype, "--name", "gpu-job", *(["--batch-size", str(args.batch_size)] if args.batch_size
               else []))  # fmt: skip
    (job,) = [p for p in home.iterdir() if p.is_dir() and p.name[0].isdigit()]
    return job


def commits(job: Path) -> int:
    done = job / "done"
    return len([p for p in done.iterdir() if p.suffix == ".json"]) if done.exists() else 0


def work_to_end(home: Path, shard_rows: int) -> tuple[float, str]:
    start = time.perf_counter()
    out = runner_cli(home, "work", "--shard-rows", str(shard_rows)).stdout
    return time.perf_counter() - start, out


def work_killed_after_first_commit(home: Path, job: Path, shard_rows: int) -> tuple[bool, str]:
    """`runner work`, SIGKILLed once its first shard is committed: (whether the kill landed, its output)."""
    proc = runner_cli(home, "work", "--shard-rows", str(shard_rows), popen=True)
    while commits(job) < 1 and proc.poll() is None:
        time.sleep(0.05)
    landed = proc.poll() is None
    if landed:
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    return landed, out


def compare(job: Path, ref: Path, expected: int) -> dict:
    import runner

    got, want = runner.load_results(job), runner.load_results(ref)
    keys = list(zip(got["id"], got["sample"].astype(int), strict=True))
    merged = got.merge(want, on=["id", "sample"], suffixes=("", "_ref"))
    same = sum(list(a) == list(b) for a, b in zip(merged["token_ids"], merged["token_ids_ref"], strict=True))
    return {
        "rows": len(got), "expected_rows": expected, "duplicates": len(keys) - len(set(keys)),
        "missing": expected - len(set(keys)), "rows_identical_to_reference": same,
        "output_tokens": int(sum(len(t) for t in got["token_ids"])),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, help="(default: the job's own default on that device)")
    ap.add_argument(
        "--shard-rows", type=int, default=256, help="runner work --shard-rows (a commit per shard)"
    )
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)

    from prompts import build_prompts
    from report import write_json
    from transformers import AutoTokenizer

    import runner

    model = _bench().model_folder(argparse.Namespace(model=args.model, seed=0))
    tok = AutoTokenizer.from_pretrained(model)
    texts = build_prompts(args.num_prompts, lambda t: len(tok(t)["input_ids"]))
    res: dict = {"model": args.model, "device": args.device, "dtype": args.dtype, "prompts": len(texts),
                 "samples_per_prompt": 2, "max_new_tokens": args.max_new_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="runner-gpu-job-") as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text(
            "".join(json.dumps({"id": f"p{i:05d}", "prompt": t}) + "\n" for i, t in enumerate(texts))
        )
        ref_home, killed_home = Path(tmp) / "reference", Path(tmp) / "killed"
        ref = submit(ref_home, prompts, model, args)
        res["reference_seconds"], out = work_to_end(ref_home, args.shard_rows)
        res["reference_last_progress"] = ([line for line in out.splitlines() if "tok/s" in line] or [""])[-1]
        print(out[-1500:], flush=True)
        print(runner_cli(ref_home, "status").stdout, flush=True)
        job = submit(killed_home, prompts, model, args)
        res["kill_landed"], out = work_killed_after_first_commit(killed_home, job, args.shard_rows)
        res["commits_before_kill"] = commits(job)
        res["results_before_resume"] = len(runner.load_results(job))
        res["resumed_seconds"], out = work_to_end(killed_home, args.shard_rows)
        print(out[-800:], flush=True)
        res.update(compare(job, ref, 2 * len(texts)))
        log = (ref / "log.txt").read_text() if (ref / "log.txt").exists() else ""
        res["log_generate_lines"] = [line for line in log.splitlines() if " to generate on " in line][:3]
    res["reference_output_tok_s"] = res["output_tokens"] / res["reference_seconds"]
    res["exactly_once"] = (
        res["duplicates"] == 0 and res["missing"] == 0 and res["rows"] == res["expected_rows"]
    )
    print(f"{args.model} on {args.device} ({args.dtype}), {len(texts)} prompts x 2 samples: reference job "
          f"{res['reference_seconds']:.1f} s ({res['reference_output_tok_s']:,.0f} output tok/s incl. start-up); "
          f"killed after {res['commits_before_kill']} commit(s), {res['results_before_resume']} results (kill landed: "
          f"{res['kill_landed']}), carried on in "
          f"{res['resumed_seconds']:.1f} s; exactly-once: {'OK' if res['exactly_once'] else 'FAILED'} "
          f"({res['rows']} rows, {res['duplicates']} duplicated, {res['missing']} missing); rows identical to the "
          f"reference {res['rows_identical_to_reference']}/{res['rows']}", flush=True)  # fmt: skip
    for line in [res["reference_last_progress"], *res["log_generate_lines"]]:
        print("  log:", line)
    write_json(res, args.json_out, print)
    return 0 if res["exactly_once"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
