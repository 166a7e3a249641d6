"""The report: the results of a run (workloads.Bench.res) printed as Markdown, section by section, and written
as JSON. Reads only `res`, so a saved JSON file can be printed again: `report.print_report(json.load(f))`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_report(res: dict[str, Any]) -> None:
    header(res)
    if res["methods"]:
        methods_table(res)
        ratios(res)
        if res.get("workload") == "fixed":
            fixed_details(res)
            peers(res)
        profile(res)
    if res.get("tasks"):
        tasks_table(res)


def write_json(res: dict[str, Any], path: Path | None, log) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {path}")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def header(res: dict[str, Any]) -> None:
    m, pc, p = res["model"], res["model"]["params"], res["prompts"]
    print()
    print(f"## {m['name']}  ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']:,}; {m['dtype']} on "
          f"{m['device']})")  # fmt: skip
    print(f"prompts: {p['count']} ({p['japanese']} Japanese), {p['prompt_tokens']:,} prompt tokens, lengths "
          f"{p['min']}..{p['max']} (median {p['median']:.0f}){generation_settings(res)}")  # fmt: skip
    print(f"params: all {pc['all'] / 1e6:.1f}M, non-embedding {pc['non_embedding'] / 1e6:.1f}M, roofline count "
          f"(non-embedding + LM head) {pc['flop'] / 1e6:.1f}M -> {2 * pc['flop'] / 1e6:.0f} MFLOP per token")  # fmt: skip
    mm = res.get("matmul")
    if mm:
        print(f"matmul roofline: {mm['peak_flops'] / 1e9:.1f} GFLOP/s ({mm['dtype']}, best square matmul; "
              f"decode-shaped linear with 64 rows: {mm['linear_rows64_flops'] / 1e9:.1f} GFLOP/s)")  # fmt: skip
    if "matmul_end" in res:
        print(f"  (re-measured at the end: {res['matmul_end']['peak_flops'] / 1e9:.1f} GFLOP/s; load average at "
              f"start {res['loadavg_start'][0]:.2f}, at end {res['loadavg_end'][0]:.2f})")  # fmt: skip
    d = res.get("runner_defaults")
    if d:
        print(f"runner defaults: batch_size {d['batch_size']}, max_batch_tokens {d['max_batch_tokens']:,}")


def generation_settings(res: dict[str, Any]) -> str:
    if not res["methods"]:
        return ""
    if res.get("workload") != "realistic":
        return f"; {res['max_new_tokens']} new tokens each, greedy, min_new_tokens = max_new_tokens"
    r = res["realistic"]
    s = r["sampling"]
    lengths = ", ".join(f"{n} x{k}" for n, k in r["answer_lengths"].items())
    return (f"; sampled (temperature {s['temperature']}, top_p {s['top_p']}, a seed per row), EOS allowed, "
            f"max_new_tokens per row: {lengths}")  # fmt: skip


def methods_table(res: dict[str, Any]) -> None:
    print()
    hdr = ("| method | batches | seconds | output tok/s | prompts/s | padding | peak mem | mem above start "
           "| roofline (out tok) | roofline (all tok) | cpu user / sys s | page faults |")  # fmt: skip
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in res["methods"]:
        pad = "n/a" if r["padding_fraction"] is None else f"{r['padding_fraction']:.1%}"
        batches = "n/a" if r["batches"] is None else r["batches"]
        print(f"| {r['name']} | {batches} | {r['seconds']:.1f} | {r['tokens_per_second']:.1f} | "
              f"{r['prompts_per_second']:.2f} | {pad} | {fmt_bytes(r['peak_memory_bytes'])} | "
              f"{fmt_bytes(r['memory_above_start_bytes'])} | {r['roofline_fraction']:.1%} | "
              f"{r['roofline_fraction_all_tokens']:.1%} | {r['cpu_user_seconds']:.0f} / {r['cpu_sys_seconds']:.0f} | "
              f"{r['minor_page_faults'] / 1e6:.1f}M |")  # fmt: skip
    print()
    print(f"memory: {res.get('memory_method', '')}; malloc: {res.get('malloc', 'default')}")
    if res["model"]["device"] == "cpu":
        busy = ", ".join(f"{r['name']} {(r['cpu_user_seconds'] + r['cpu_sys_seconds']) / r['seconds']:.2f}"
                         for r in res["methods"])  # fmt: skip
        print(f"cores busy (cpu s / wall s, threads asked for: {res['machine']['torch_threads']}; well under means "
              f"the machine was shared): {busy}")  # fmt: skip


def ratios(res: dict[str, Any]) -> None:
    if res.get("ratios"):
        print("ratios (output tok/s): " + "; ".join(f"{k} = {v:.2f}x" for k, v in res["ratios"].items()))
    r = res.get("realistic")
    if r and not r["ab_option_present"]:
        print(f"(runner.params.EngineOptions has no field {r['ab_option']}: one runner row, no A/B)")


def fixed_details(res: dict[str, Any]) -> None:
    """Best batch size, targets, greedy agreement, the pipeline's tokenization, the log-prob overhead."""
    print(f"best runner batch size: {res['best_runner']['batch_size']}")
    print("targets: " + "; ".join(f"{k}: {'n/a' if v is None else ('MET' if v else 'NOT MET')}"
                                  for k, v in res["targets"].items()))  # fmt: skip
    if res["matches"]:
        print("greedy agreement (seq = identical prompts, prefix = tokens before first difference, token = equal "
              "positions):")  # fmt: skip
        for k, v in res["matches"].items():
            print(f"  {k}: seq {v['seq']:.1%}, prefix {v['prefix']:.1%}, token {v['token']:.1%}")
    load = res.get("under_load")
    if load:
        print(f"under load: runner (default) beside {load['busy_loops']} busy loop(s) on {load['cores']} cores "
              f"({load['threads']} threads, OpenMP wait: {load['openmp_wait']}) ran at "
              f"{load['throughput_vs_alone']:.0%} of its speed alone; its fair share of the CPU is "
              f"{load['fair_share']:.0%} -> {load['throughput_per_share']:.2f} of proportional")  # fmt: skip
    pipe = next((r for r in res["methods"] if r["name"].startswith("pipeline")), None)
    if pipe is not None:
        print(f"pipeline tokenized the prompts exactly as runner: {pipe['same_prompt_ids_as_runner']}")
    lo = res.get("logprob_overhead")
    if lo:
        print(f"log-prob overhead: runner default {lo['with_seconds']:.2f} s with log_softmax, "
              f"{lo['without_seconds']:.2f} s without -> {lo['measured_fraction']:.1%} measured; microbenchmark "
              f"{lo['microbench_step_seconds'] * 1e3:.2f} ms per step ([{lo['mean_rows_per_step']:.0f} x vocab]) x "
              f"{lo['decode_steps']} steps = {lo['estimated_fraction']:.1%} of runner time")  # fmt: skip


def peers(res: dict[str, Any]) -> None:
    """What each CPU peer row ran (versions, settings, its load and warm-up outside the timed pass), and why a
    requested peer has no row."""
    info = res.get("peers")
    if not info:
        return
    print(f"CPU peers (--peers {','.join(info['requested'])}, run by {info['python']}):")
    for r in (r for r in res["methods"] if r.get("peer")):
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        settings = "; ".join(f"{k} {v}" for k, v in r["settings"].items() if k != "batches")
        print(f"  {r['name']}: {versions}; {settings}; load {r['load_seconds']:.1f} s, warm-up pass "
              f"{r['warmup_seconds']:.1f} s (untimed)")  # fmt: skip
    for note in info["notes"]:
        print(f"  {note}")


def profile(res: dict[str, Any]) -> None:
    prof = res.get("profile")
    if not prof:
        return
    wall, pre = prof["wall_seconds_profiled"], prof["prefill_wall_seconds_profiled"]
    run = next(
        r for r in res["methods"] if r["batch_size"] == prof["batch_size"] and r["name"].startswith("runner")
    )
    print()
    print(f"profile of runner bs={prof['batch_size']} (torch.profiler: {wall:.1f} s wall profiled, of which prefill "
          f"{pre:.1f} s; {prof['op_calls']:,} op calls, {prof['decode_op_calls'] / max(1, prof['decode_steps']):,.0f} "
          f"per decode step):")  # fmt: skip
    print("| bucket | total s | share | prefill s | decode s | decode share |")
    print("|---|---|---|---|---|---|")
    dwall = max(1e-9, wall - pre)
    for k, v in sorted(prof["buckets_seconds"].items(), key=lambda kv: -kv[1]["total"]):
        print(f"| {k} | {v['total']:.2f} | {v['total'] / wall:.1%} | {v['prefill']:.2f} | {v['decode']:.2f} | "
              f"{v['decode'] / dwall:.1%} |")  # fmt: skip
    print("top ops by self time: " + ", ".join(f"{k} {v:.2f}s" for k, v in prof["top_ops_self_seconds"][:10]))
    print(f"prefill (unprofiled): as the engine does it {prof['prefill_engine_seconds']:.2f} s = "
          f"{prof['prefill_engine_seconds'] / run['seconds']:.0%} of the runner run ({run['seconds']:.2f} s); "
          f"one prompt at a time without padding {prof['prefill_unpadded_seconds']:.2f} s")  # fmt: skip


def tasks_table(res: dict[str, Any]) -> None:
    print()
    print("| task | method | batches | seconds | tokens/s | peak mem | mem above start | cpu user / sys s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["tasks"]:
        print(f"| {r['task']} | {r['method']} | {r['batches']} | {r['seconds']:.2f} | {r['tokens_per_second']:.0f} "
              f"| {fmt_bytes(r['peak_memory_bytes'])} | {fmt_bytes(r['memory_above_start_bytes'])} | "
              f"{r['cpu_user_seconds']:.1f} / {r['cpu_sys_seconds']:.1f} |")  # fmt: skip
    print()
    if res.get("task_ratios"):
        print("ratios (tokens/s): " + "; ".join(f"{k} = {v:.2f}x" for k, v in res["task_ratios"].items()))
    if "score_max_abs_diff" in res:
        print(f"score agreement: runner vs plain transformers, max |log-prob difference| "
              f"{res['score_max_abs_diff']:.2e}")  # fmt: skip
    for name, diff in res.get("score_max_abs_diff_peers", {}).items():
        print(f"score agreement: runner vs {name}, max |log-prob difference| {diff:.2e}")
    if "structured" in res:
        st = res["structured"]
        print(f"structured output: {st['overhead']:+.1%} time per token for the JSON schema at batch {st['batch_size']} "
              f"(target <= +15%: {'met' if st['overhead'] <= 0.15 else 'NOT met'}); "
              f"{st['complete_fraction']:.0%} of samples complete within {st['max_new_tokens']} tokens; the constraint's "
              f"own work (masks, matcher updates) {st['constraint_seconds']:.2f} s = {st['constraint_fraction']:.1%} of "
              f"the constrained run; runs (constrained / plain s): "
              + ", ".join(f"{c:.1f} / {p:.1f}" for c, p in st["run_seconds"]))  # fmt: skip
