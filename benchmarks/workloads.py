"""The workloads: which rows a run measures, in which order, and what it compares. Every row of a run is timed in
the same process on the same loaded model and prompts, so its ratios are read from one run.

* `fixed` (the default): greedy, exactly --max-new-tokens tokens per prompt (min_new_tokens = max_new_tokens),
  so every method does the same work: runner at its default and other batch sizes, with each speed lever off,
  the log-prob overhead, the pipeline and naive generate, the CPU peers of --peers (cpu_peers.py), token
  agreement.
* `realistic`: sampled (temperature 0.8, top_p 0.95, a seed per row), EOS allowed, max_new_tokens per row drawn
  with a fixed seed, so rows finish at different steps: runner as a whole job (`runner run`), once per value of
  the engine option AB_OPTION when EngineOptions has it, then the pipeline and naive generate.
* `score` and `embed` (--tasks): runner.scoring over the same prompts; scoring also as a plain script does it.
* `structured` (--tasks): the same prompts under a JSON schema vs unconstrained, token for token the same work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import baselines
import cpu_peers
import prompts
import runner_paths
from measure import PeakMemory, Usage, compare, linear_flops, matmul_flops, padding_fraction
from profiling import profile_runner
from runner_paths import KERNEL_OF_LEVER, LEVERS, levers_off, plain_transformers, run_runner

# An EngineOptions field (another change may add it): when it exists, the realistic runner row runs per value.
AB_OPTION = "continuous_batching"


@dataclass
class Bench:
    """One benchmark run: the loaded engine, the prompts (texts and runner's token ids), the options, and the
    results so far (`res`, printed by report.py and written as JSON)."""

    args: Any
    engine: Any
    model_dir: str
    texts: list[str]
    ids: list[list[int]]
    res: dict[str, Any]
    counts: dict[str, int]
    log: Any
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)  # generated ids per method (fixed)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.ids]

    def defaults(self, kind: str = "generate") -> tuple[int, int]:
        """runner's default batch size and token budget for a job of KIND on this device."""
        from runner.batching import default_batch_size, default_batch_tokens

        bs, budget = default_batch_size(self.engine), default_batch_tokens(self.engine, kind)
        self.res.setdefault("runner_defaults", {"batch_size": bs, "max_batch_tokens": budget})
        return bs, budget

    def record(self, name, new_tokens, seconds, mem, usage, padding, batches, batch_size, extra=None) -> dict:
        """One generation row (a method): NEW_TOKENS per prompt, in SECONDS, with the memory and CPU use."""
        gen, peak = sum(new_tokens), self.res["matmul"]["peak_flops"]
        prompt_tokens = sum(
            self.lengths[: len(new_tokens)]
        )  # the prompts it ran (naive may run the first few)
        row = {
            "name": name, "batch_size": batch_size, "batches": batches, "seconds": seconds,
            "generated_tokens": gen, "prompt_tokens": prompt_tokens, "tokens_per_second": gen / seconds,
            "prompts_per_second": len(new_tokens) / seconds, "padding_fraction": padding,
            "peak_memory_bytes": mem.peak, "memory_above_start_bytes": max(0, mem.peak - mem.base),
            "roofline_fraction": 2 * self.counts["flop"] * gen / seconds / peak,
            "roofline_fraction_all_tokens": 2 * self.counts["flop"] * (gen + prompt_tokens) / seconds / peak,
            "cpu_user_seconds": usage.user, "cpu_sys_seconds": usage.sys, "minor_page_faults": usage.minflt,
            **(extra or {}),
        }  # fmt: skip
        self.res["methods"].append(row)
        self.res["memory_method"] = mem.method
        pad = "n/a" if padding is None else f"{padding:.1%}"
        self.log(f"  {name}: {seconds:.1f} s, {row['tokens_per_second']:.1f} tok/s, {row['prompts_per_second']:.2f} "
                 f"prompts/s, padding {pad}, peak {mem.peak / 2**20:,.0f} MiB, cpu user {usage.user:.0f} s sys "
                 f"{usage.sys:.0f} s, {usage.minflt:,} page faults")  # fmt: skip
        return row


def roofline(b: Bench) -> None:
    """The device's best matmul FLOP/s (and a decode-shaped linear's), the yardstick of every generation row."""
    b.log("matmul roofline ...")
    dev, cfg = b.engine.device, b.engine.model.config
    mm = matmul_flops(dev, b.engine.dtype, b.args.quick)
    hid = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * hid
    mm["linear_rows64_flops"] = linear_flops(dev, b.engine.dtype, 64, hid, inter)
    b.res["matmul"] = mm
    b.res["loadavg_start"] = os.getloadavg()
    b.log(f"  peak {mm['peak_flops'] / 1e9:.1f} GFLOP/s; decode-shaped linear [64x{hid}]x[{hid}x{inter}] "
          f"{mm['linear_rows64_flops'] / 1e9:.1f} GFLOP/s")  # fmt: skip


# --- fixed: greedy, every prompt exactly --max-new-tokens tokens ------------------------------------------------


def fixed(b: Bench) -> None:
    """runner's batch-size sweep and ablations, its log-prob overhead, the pipeline, naive generate, the CPU
    peers (--peers), --profile, then the comparisons."""
    default_bs, budget = b.defaults()
    runner_sweep(b, default_bs, budget)  # first, so a crash there shows up before the slow naive loop
    ablations(b, default_bs, budget)
    if b.args.busy_beside > 0:
        beside_busy_loops(b, default_bs, budget, b.args.busy_beside)
    if b.args.lp_repeats > 0:
        logprob_overhead(b, default_bs, budget)
    if not b.args.skip_pipeline:
        pipeline_fixed(b)
    if not b.args.skip_naive:
        naive_fixed(b)
    if b.args.peers:
        cpu_peers.run_all(b)
    if b.args.profile:
        b.log("profiling runner default ...")
        bs = b.args.profile_batch_size or default_bs
        b.res["profile"] = profile_runner(b.engine, b.ids, b.args.max_new_tokens, bs, budget)
    fixed_comparisons(b)
    cpu_peers.comparisons(b)


def timed_runner(b: Bench, name: str, batch_size: int, budget: int) -> None:
    with PeakMemory(b.engine.device) as mem, Usage() as use:
        outs, secs, plan = run_runner(b.engine, b.ids, b.args.max_new_tokens, batch_size, budget)
    b.record(
        name, [len(o) for o in outs], secs, mem, use, padding_fraction(b.lengths, plan), len(plan), batch_size
    )
    b.outputs[name] = outs


def runner_sweep(b: Bench, default_bs: int, budget: int) -> None:
    sweep = sorted({default_bs, *(int(x) for x in b.args.batch_sizes.split(",") if x.strip())})
    b.log(f"runner: default batch_size {default_bs}, token budget {budget}; sweep {sweep}")
    # Warm-up: one whole pass, so that every runner row is timed in steady state, as in a long job (the first
    # pass over a new shape also grows the heap: ~0.5M page faults here, 10% of a run).
    run_runner(b.engine, b.ids, b.args.max_new_tokens, default_bs, budget)
    for bs in sweep:
        timed_runner(b, "runner (default)" if bs == default_bs else f"runner bs={bs}", bs, budget)


def ablations(b: Bench, default_bs: int, budget: int) -> None:
    """What each lever is worth, in the same run: the default path with one lever off at a time, then with all
    off (one padded prefill per batch, transformers' DynamicCache, the model's own layers)."""
    runs = [] if b.args.skip_ablations else [(f"runner default without {LEVERS[k]}", (k,)) for k in LEVERS]
    if not b.args.skip_plain_engine:
        runs.append(
            ("runner default, all levers off (one prefill + DynamicCache, stock layers)", tuple(LEVERS))
        )
    for name, which in runs:
        kernel = KERNEL_OF_LEVER.get(which[0])
        if len(which) == 1 and kernel and not b.engine.kernels[kernel]:
            continue  # not in use for this model and device: nothing to switch off
        with levers_off(b.engine, *which):
            timed_runner(b, name, default_bs, budget)


def beside_busy_loops(b: Bench, default_bs: int, budget: int, loops: int) -> None:
    """runner's default path again while LOOPS processes spin on the CPU (as another user's job does on a shared
    machine or a Colab VM). Its fair share: with T threads beside N spinning processes on C cores, the
    scheduler gives it C*T/(T+N) cores at most T; throughput should fall in proportion, not collapse."""
    import subprocess
    import sys

    import torch

    from runner import OPENMP_WAIT_VARS

    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    share = min(threads, cores * threads / (threads + loops)) / min(threads, cores)
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(loops)]
    try:
        timed_runner(b, f"runner (default) beside {loops} busy loop{'s' * (loops > 1)}", default_bs, budget)
    finally:
        for proc in spin:
            proc.kill()
            proc.wait()
    alone = next(m for m in b.res["methods"] if m["name"] == "runner (default)")
    row = b.res["methods"][-1]
    b.res["under_load"] = {
        "busy_loops": loops, "cores": cores, "threads": threads, "fair_share": share,
        "openmp_wait": " ".join(f"{k}={os.environ[k]}" for k in OPENMP_WAIT_VARS if k in os.environ) or "default",
        "throughput_vs_alone": row["tokens_per_second"] / alone["tokens_per_second"],
    }  # fmt: skip
    b.res["under_load"]["throughput_per_share"] = b.res["under_load"]["throughput_vs_alone"] / share


def logprob_overhead(b: Bench, default_bs: int, budget: int) -> None:
    """runner's default path run alternately with and without its log_softmax, and a micro-benchmark of
    log_softmax + gather per decode step."""
    b.log("log-prob overhead (runner default, with vs without log_softmax) ...")
    n_new = b.args.max_new_tokens
    with_lp, without_lp, calls = [], [], 0
    for _ in range(b.args.lp_repeats):
        _, s, plan = run_runner(b.engine, b.ids, n_new, default_bs, budget)
        with_lp.append(s)
        with runner_paths.no_logprobs() as c:
            _, s, _ = run_runner(b.engine, b.ids, n_new, default_bs, budget)
        calls += c[0]
        without_lp.append(s)
    steps = len(plan) * n_new
    mean_rows = len(b.ids) * n_new / steps
    lsm = runner_paths.logsoftmax_step_seconds(max(1, round(mean_rows)), b.engine.model.config.vocab_size,
                                               b.engine.device)  # fmt: skip
    lo = b.res["logprob_overhead"] = {
        "with_seconds": min(with_lp), "without_seconds": min(without_lp),
        "measured_fraction": (min(with_lp) - min(without_lp)) / min(with_lp), "patched_calls": calls,
        "microbench_step_seconds": lsm, "decode_steps": steps, "mean_rows_per_step": mean_rows,
        "estimated_fraction": lsm * steps / min(with_lp),
    }  # fmt: skip
    b.log(f"  with {lo['with_seconds']:.2f} s, without {lo['without_seconds']:.2f} s -> measured "
          f"{lo['measured_fraction']:.1%}; microbench {lsm * 1e3:.2f} ms/step x {steps} steps -> "
          f"{lo['estimated_fraction']:.1%}")  # fmt: skip


def pipeline_fixed(b: Bench) -> None:
    e, pbs, n_new = b.engine, b.args.pipeline_batch_size, b.args.max_new_tokens
    b.log(f"pipeline batch_size={pbs} ...")
    pipe = baselines.make_pipeline(e.model, b.model_dir, e.pad_id, pbs)
    with plain_transformers(e):
        baselines.run_pipeline(pipe, b.texts[:2], 2, list(e.eos_ids), e.pad_id, e.device)  # warm-up
        with PeakMemory(e.device) as mem, Usage() as use:
            outs, p_prompts, secs = baselines.run_pipeline(
                pipe, b.texts, n_new, list(e.eos_ids), e.pad_id, e.device
            )
    p_lengths = [len(pipe.tokenizer(s, add_special_tokens=True)["input_ids"]) for s in b.texts]
    same_inputs = all(q[len(q) - len(p) :] == p for q, p in zip(p_prompts, b.ids, strict=True))
    chunks = [list(range(i, min(i + pbs, len(b.ids)))) for i in range(0, len(b.ids), pbs)]
    b.record(f"pipeline bs={pbs}", [len(o) for o in outs], secs, mem, use, padding_fraction(p_lengths, chunks),
             len(chunks), pbs, {"same_prompt_ids_as_runner": same_inputs})  # fmt: skip
    b.outputs["pipeline"] = outs
    del pipe
    gc.collect()


def naive_fixed(b: Bench) -> None:
    """model.generate one prompt at a time, on all prompts or the first --naive-prompts (its tok/s compares
    as is: every prompt gets the same number of new tokens)."""
    e, n_new = b.engine, b.args.max_new_tokens
    ids = b.ids[: b.args.naive_prompts or len(b.ids)]
    b.log(f"naive model.generate, one prompt at a time ({len(ids)} prompts) ...")
    with plain_transformers(e):
        baselines.run_naive(e.model, ids[:1], 2, list(e.eos_ids), e.pad_id, e.device)  # warm-up
        with PeakMemory(e.device) as mem, Usage() as use:
            outs, secs = baselines.run_naive(e.model, ids, n_new, list(e.eos_ids), e.pad_id, e.device)
    name = "naive generate bs=1" + (f" (first {len(ids)} prompts)" if len(ids) < len(b.ids) else "")
    b.record(name, [len(o) for o in outs], secs, mem, use, 0.0, len(ids), 1)
    b.outputs["naive"] = outs


def fixed_comparisons(b: Bench) -> None:
    """Best batch size, token agreement between the methods, the ratios and whether the targets are met."""
    res, outputs = b.res, b.outputs
    ref = outputs["runner (default)"]
    runner_rows = [m for m in res["methods"] if m["name"].startswith("runner")]
    best = max(runner_rows, key=lambda m: m["tokens_per_second"])
    res["best_runner"] = {"name": best["name"], "batch_size": best["batch_size"]}
    res["matches"] = {  # over the prompts both ran (naive may have run the first --naive-prompts only)
        f"runner vs {o}": compare(ref[: len(outputs[o])], outputs[o])
        for o in ("naive", "pipeline")
        if o in outputs
    }
    if "naive" in outputs and "pipeline" in outputs:
        naive = outputs["naive"]
        res["matches"]["pipeline vs naive"] = compare(outputs["pipeline"][: len(naive)], naive)
    for name, outs in outputs.items():
        if name.startswith("runner") and name != "runner (default)":
            res["matches"][f"{name} vs runner (default)"] = compare(outs, ref)
    run_row = next(m for m in runner_rows if m["name"] == "runner (default)")
    res["ratios"] = baseline_ratios(
        res, [("runner default", run_row), (f"runner best ({best['name']})", best)]
    )
    ratios, have = res["ratios"], {k.split(" / ")[1] for k in res["ratios"]}
    res["targets"] = {
        "runner >= 6x naive": ratios["runner default / naive"] >= 6 if "naive" in have else None,
        "runner >= 1.5x pipeline": ratios["runner default / pipeline"] >= 1.5 if "pipeline" in have else None,
        "runner >= 40% roofline": run_row["roofline_fraction"] >= 0.40,
    }


def baseline_ratios(res: dict, rows: list[tuple[str, dict]]) -> dict[str, float]:
    """Output tok/s of each (label, runner row) over naive generate's and the pipeline's, where they ran."""
    naive = next((m for m in res["methods"] if m["name"].startswith("naive")), None)
    pipe = next((m for m in res["methods"] if m["name"].startswith("pipeline")), None)
    ratios = {}
    for label, row in rows:
        for base, other in (("naive", naive), ("pipeline", pipe)):
            if other:
                ratios[f"{label} / {base}"] = row["tokens_per_second"] / other["tokens_per_second"]
    return ratios


# --- realistic: sampled, EOS allowed, mixed answer lengths ----------------------------------------------------


def ab_variants() -> list[tuple[str, dict[str, bool]]]:
    """(row name, EngineOptions changes) of the realistic runner rows: AB_OPTION off and on when EngineOptions
    has that field, else runner's defaults alone."""
    from runner.params import EngineOptions

    if AB_OPTION not in {f.name for f in dataclasses.fields(EngineOptions)}:
        return [("runner (default)", {})]
    return [(f"runner ({AB_OPTION}={v})", {AB_OPTION: v}) for v in (False, True)]


def realistic(b: Bench) -> None:
    n, cap = len(b.texts), b.args.max_new_tokens
    lengths, seeds = prompts.answer_lengths(n, cap), prompts.row_seeds(n)
    b.res["realistic"] = {"sampling": prompts.SAMPLING, "answer_lengths": dict(sorted(Counter(lengths).items())),
                          "ab_option": AB_OPTION, "ab_option_present": len(ab_variants()) > 1}  # fmt: skip
    b.log(f"realistic: sampled, EOS allowed, max_new_tokens per row {b.res['realistic']['answer_lengths']}")
    b.defaults()
    with tempfile.TemporaryDirectory(prefix="runner-bench-") as tmp:
        runner_jobs(b, Path(tmp), lengths, seeds)
    if not b.args.skip_pipeline:
        pipeline_realistic(b, lengths, seeds)
    if not b.args.skip_naive:
        naive_realistic(b, lengths, seeds)
    realistic_ratios(b)


def runner_jobs(b: Bench, tmp: Path, lengths: list[int], seeds: list[int]) -> None:
    """runner as `runner run` runs the prompts (per-row max_tokens and seed), once per variant of ab_variants()
    after a warm-up job over the same prompts with 2 new tokens each (every prefill shape, little decoding)."""
    from runner.params import EngineOptions, GenerationParams

    params = GenerationParams(max_new_tokens=b.args.max_new_tokens, temperature=prompts.TEMPERATURE,
                              top_p=prompts.TOP_P, seed=0)  # fmt: skip
    warm = prompts.realistic_rows(b.texts, [min(2, n) for n in lengths], seeds)
    options = EngineOptions(device=b.args.device, dtype=b.args.dtype)
    runner_paths.run_as_job(b.engine, warm, params, options, tmp / "warm-up")
    rows = prompts.realistic_rows(b.texts, lengths, seeds)
    for i, (name, change) in enumerate(ab_variants()):
        options = EngineOptions(device=b.args.device, dtype=b.args.dtype, **change)
        with PeakMemory(b.engine.device) as mem, Usage() as use:
            new, secs = runner_paths.run_as_job(b.engine, rows, params, options, tmp / f"run{i}")
        b.record(
            name, new, secs, mem, use, None, None, b.res["runner_defaults"]["batch_size"], {"options": change}
        )


def pipeline_realistic(b: Bench, lengths: list[int], seeds: list[int]) -> None:
    e, pbs = b.engine, b.args.pipeline_batch_size
    b.log(f"pipeline batch_size={pbs}, one call per max_new_tokens value ...")
    pipe, eos = baselines.make_pipeline(e.model, b.model_dir, e.pad_id, pbs), list(e.eos_ids)
    with plain_transformers(e):
        baselines.run_pipeline(pipe, b.texts[:2], 2, eos, e.pad_id, e.device)  # warm-up
        with PeakMemory(e.device) as mem, Usage() as use:
            new, secs, batches = baselines.run_pipeline_sampled(pipe, pbs, b.texts, b.ids, lengths, seeds,
                                                                prompts.SAMPLING, eos, e.pad_id, e.device)  # fmt: skip
    b.record(f"pipeline bs={pbs}", new, secs, mem, use, None, batches, pbs)
    del pipe
    gc.collect()


def naive_realistic(b: Bench, lengths: list[int], seeds: list[int]) -> None:
    e = b.engine
    b.log(f"naive model.generate, one prompt at a time ({len(b.ids)} prompts) ...")
    with plain_transformers(e):
        baselines.run_naive(e.model, b.ids[:1], 2, list(e.eos_ids), e.pad_id, e.device)  # warm-up
        with PeakMemory(e.device) as mem, Usage() as use:
            new, secs = baselines.run_naive_sampled(e.model, b.ids, lengths, seeds, prompts.SAMPLING,
                                                    list(e.eos_ids), e.pad_id, e.device)  # fmt: skip
    b.record("naive generate bs=1", new, secs, mem, use, 0.0, len(b.ids), 1)


def realistic_ratios(b: Bench) -> None:
    """Each runner row over the baselines and, with two variants, AB_OPTION on over off."""
    runner_rows = [(m["name"], m) for m in b.res["methods"] if m["name"].startswith("runner")]
    ratios = baseline_ratios(b.res, runner_rows)
    if len(runner_rows) == 2:
        (_, off), (_, on) = runner_rows
        ratios[f"runner {AB_OPTION}=True / {AB_OPTION}=False"] = (
            on["tokens_per_second"] / off["tokens_per_second"]
        )
    b.res["ratios"] = ratios


# --- score and embed ------------------------------------------------------------------------------------------


def record_task(
    b: Bench, task: str, method: str, tokens: int, seconds: float, mem, usage, batches: int
) -> dict:
    row = {
        "task": task, "method": method, "rows": len(b.texts), "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds, "batches": batches, "peak_memory_bytes": mem.peak,
        "memory_above_start_bytes": max(0, mem.peak - mem.base), "cpu_user_seconds": usage.user,
        "cpu_sys_seconds": usage.sys,
    }  # fmt: skip
    b.res["tasks"].append(row)
    b.res["memory_method"] = mem.method
    b.log(f"  {task} / {method}: {seconds:.2f} s, {row['tokens_per_second']:.0f} tok/s, peak "
          f"{mem.peak / 2**20:,.0f} MiB")  # fmt: skip
    return row


def score(b: Bench) -> None:
    """Every token of every prompt after the first scored given the ones before it (BOS as context): runner's
    batches, then a plain script's (file order, right padding, log_softmax over the whole vocabulary)."""
    from runner.batching import plan_batches
    from runner.scoring import tokenize_text

    e, pbs = b.engine, b.args.pipeline_batch_size
    bs, budget = b.defaults("score")
    seqs = [tokenize_text(e.tokenizer, t) for t in b.texts]
    tokens = sum(len(s) - 1 for s in seqs)
    b.log(f"score: {len(seqs)} texts, {tokens} tokens to score ...")
    runner_paths.score_seqs(e, seqs[:bs], bs, budget)  # warm-up
    with PeakMemory(e.device) as mem, Usage() as use:
        ours, secs = runner_paths.score_seqs(e, seqs, bs, budget)
    batches = len(plan_batches([len(s) for s in seqs], bs, budget, 0))
    runner_row = record_task(b, "score", "runner", tokens, secs, mem, use, batches)
    with plain_transformers(e):
        baselines.score_plain(e.model, seqs[:pbs], pbs, e.pad_id, e.device)  # warm-up
        with PeakMemory(e.device) as mem, Usage() as use:
            plain, secs = baselines.score_plain(e.model, seqs, pbs, e.pad_id, e.device)
    plain_row = record_task(
        b, "score", f"plain transformers bs={pbs}", tokens, secs, mem, use, -(-len(seqs) // pbs)
    )
    b.res["task_ratios"]["score: runner / plain transformers"] = (
        runner_row["tokens_per_second"] / plain_row["tokens_per_second"]
    )
    b.res["score_max_abs_diff"] = max_abs_diff(ours, plain)
    for peer, a in (cpu_peers.scores(b, seqs, bs) if b.args.peers else {}).items():
        name, (mem, use) = cpu_peers.SCORE_ROWS[peer], cpu_peers.usage(a)
        row = record_task(b, "score", name, tokens, a["seconds"], mem, use, a["batches"])
        row.update(peer=peer, versions=a["versions"], settings=a["settings"])
        ratio = runner_row["tokens_per_second"] / row["tokens_per_second"]
        b.res["task_ratios"][f"score: runner / {name}"] = ratio
        b.res.setdefault("score_max_abs_diff_peers", {})[name] = max_abs_diff(ours, a["outputs"])


def max_abs_diff(ours: list[list[float]], theirs: list[list[float]]) -> float:
    """The largest difference between two methods' log-probs of the same tokens (inf if their counts differ)."""
    if [len(x) for x in ours] != [len(y) for y in theirs]:
        return float("inf")
    pairs = (abs(x - y) for p, q in zip(ours, theirs, strict=True) for x, y in zip(p, q, strict=True))
    return max(pairs, default=0.0)


def embed(b: Bench) -> None:
    """A mean-pooled vector per prompt (runner.scoring.embed_batch in runner's batches)."""
    from runner.batching import plan_batches

    e = b.engine
    bs, budget = b.defaults("embed")
    tokens = sum(b.lengths)
    b.log(f"embed: {len(b.ids)} texts, {tokens} tokens ...")
    runner_paths.embed_seqs(e, b.ids[:bs], bs, budget)  # warm-up
    with PeakMemory(e.device) as mem, Usage() as use:
        _, secs = runner_paths.embed_seqs(e, b.ids, bs, budget)
    record_task(b, "embed", "runner", tokens, secs, mem, use, len(plan_batches(b.lengths, bs, budget, 0)))


# --- structured: constrained decoding's cost ----------------------------------------------------------------

# A JSON schema of the kind an extraction job uses: nested object, array, enum, required fields, and bounded
# strings, so that samples go through every part of it (keys, strings, enums, numbers) within a few dozen tokens.
STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "language": {"enum": ["en", "ja", "other"]},
        "topics": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "source": {"type": "object", "properties": {"author": {"type": "string", "maxLength": 30},
                                                    "year": {"type": "integer"}},
                   "required": ["author", "year"]},
    },
    "required": ["title", "language", "topics", "source"],
}  # fmt: skip
STRUCTURED_BATCH = 64  # the batch size the overhead target (<= 15%) is stated at


def structured(b: Bench) -> None:
    """The same prompts generated under STRUCTURED_SCHEMA, then unconstrained with each row held to exactly the
    tokens it generated constrained (min_new_tokens = max_new_tokens = that count), so that both runs decode
    the same rows for the same steps and differ only by the constraint; batches of STRUCTURED_BATCH, the two
    alternated (--lp-repeats times, at least once), the fastest of each kept. Reported: the ratio of output
    tok/s, and the time spent in the constraint's own work (masks, matcher updates) inside the constrained
    runs, which a loaded machine disturbs far less than the difference of two wall-clock times."""
    from runner.params import GenerationParams

    e, n_new = b.engine, b.args.max_new_tokens
    batches = [b.ids[i : i + STRUCTURED_BATCH] for i in range(0, len(b.ids), STRUCTURED_BATCH)]
    constrained = GenerationParams(max_new_tokens=n_new, json_schema=STRUCTURED_SCHEMA)
    b.log(
        f"structured: {len(b.ids)} prompts in batches of {STRUCTURED_BATCH}, JSON schema vs unconstrained ..."
    )
    # warm-up on a whole batch: llguidance's view of the tokenizer is built once, the heap grows once
    e.generate(batches[0], GenerationParams(max_new_tokens=4, json_schema=STRUCTURED_SCHEMA))
    runs: dict[str, list[Any]] = {"constrained": [], "plain": []}
    for _ in range(max(1, b.args.lp_repeats)):
        with _constraint_timer() as inside:
            done, secs, mem, use = _timed_batches(
                e, [[constrained] * len(batch) for batch in batches], batches
            )
        runs["constrained"].append((secs, mem, use, done, inside[0]))
        counts = iter([len(c.token_ids) for c in done])
        held = [[GenerationParams(max_new_tokens=k, min_new_tokens=k) for k in [next(counts) for _ in batch]]
                for batch in batches]  # fmt: skip
        runs["plain"].append((*_timed_batches(e, held, batches)[1:], done, 0.0))
        b.log(
            f"  constrained {secs:.1f} s (constraint work {inside[0]:.2f} s), plain {runs['plain'][-1][0]:.1f} s"
        )
    best = {key: min(runs[key], key=lambda r: r[0]) for key in runs}
    rows = {}
    for key, method in (
        ("constrained", "runner, JSON schema"),
        ("plain", "runner, unconstrained (same tokens)"),
    ):
        secs, mem, use, done, _ = best[key]
        tokens = sum(len(c.token_ids) for c in done)
        rows[key] = record_task(b, "structured", method, tokens, secs, mem, use, len(batches))
    done = best["constrained"][3]
    b.res["structured"] = {
        "batch_size": STRUCTURED_BATCH, "max_new_tokens": n_new, "repeats": len(runs["plain"]),
        "complete_fraction": sum(bool(c.constraint_complete) for c in done) / len(done),
        "overhead": rows["plain"]["tokens_per_second"] / rows["constrained"]["tokens_per_second"] - 1,
        "constraint_seconds": best["constrained"][4],
        "constraint_fraction": best["constrained"][4] / best["constrained"][0],
        "run_seconds": [[c[0], p[0]] for c, p in zip(runs["constrained"], runs["plain"], strict=True)],
    }  # fmt: skip
    b.res["task_ratios"]["structured: constrained / unconstrained"] = (
        rows["constrained"]["tokens_per_second"] / rows["plain"]["tokens_per_second"]
    )


@contextlib.contextmanager
def _constraint_timer():
    """Seconds spent in constraints.Constraints.mask and .advance while the block runs (a one-item list)."""
    import time

    from runner.constraints import Constraints

    total = [0.0]
    originals = {name: getattr(Constraints, name) for name in ("mask", "advance")}

    def timed(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t0

        return run

    for name, fn in originals.items():
        setattr(Constraints, name, timed(fn))
    try:
        yield total
    finally:
        for name, fn in originals.items():
            setattr(Constraints, name, fn)


def _timed_batches(
    e: Any, params: list[list[Any]], batches: list[list[list[int]]]
) -> tuple[list, float, Any, Any]:
    """Generate each batch with its rows' `params`: (completions, seconds, PeakMemory, Usage)."""
    import time

    done: list[Any] = []
    with PeakMemory(e.device) as mem, Usage() as use:
        t0 = time.perf_counter()
        for batch, p in zip(batches, params, strict=True):
            done.extend(e.generate(batch, p))
        secs = time.perf_counter() - t0
    return done, secs, mem, use


WORKLOADS = {"fixed": fixed, "realistic": realistic}
