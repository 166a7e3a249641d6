#!/usr/bin/env python
"""Throughput benchmark: runner's engine vs `model.generate` one prompt at a time vs `transformers.pipeline`.

One process, one loaded model, one fixed prompt set; every row of a run is timed there, so its ratios are read
from one run (benchmarks/README.md):

  --workload fixed      (default) greedy, exactly --max-new-tokens tokens per prompt (min_new_tokens =
                        max_new_tokens), so every method does the same work; runner's batch-size sweep, its speed
                        levers switched off one at a time, its log-prob cost, token agreement, --profile
  --workload realistic  sampled (temperature 0.8, top_p 0.95, a seed per row), EOS allowed, max_new_tokens per
                        row drawn from 8..--max-new-tokens (default 128); runner as a whole job
  --tasks score,embed   runner.scoring over the same prompts (tokens/s, peak memory); scoring also as a plain
                        transformers script does it
  --tasks structured    constrained decoding (a JSON schema) vs unconstrained on the same prompts, batch 64, the
                        same tokens per row: the ratio of output tok/s

  naive     model.generate(...) one prompt at a time (batch 1, no padding)
  pipeline  transformers.pipeline("text-generation", batch_size=16), left padding
  peers     --peers openvino,ctranslate2: OpenVINO GenAI's continuous-batching pipeline and CTranslate2, each in
            its own venv (benchmarks/peers/setup.sh), on runner's token ids (cpu_peers.py)
  runner    length-sorted, budgeted batches with the engine's defaults (EngineOptions().batch_size,
            batching.default_batch_tokens), including the raw log-prob (log_softmax + gather) runner always computes

The parts: prompts.py (the prompt set, realistic per-row settings), workloads.py (what each workload runs and
compares), runner_paths.py (runner's side), baselines.py (transformers' side), cpu_peers.py (the CPU peers, run
by peers/run_peer.py in their venv), measure.py, profiling.py, report.py.

    python benchmarks/bench.py --model smollm2 --device cpu --json-out benchmarks/results-smollm2.json
    python benchmarks/bench.py --model gpt2-random --device cpu
    python benchmarks/bench.py --model smollm2 --workload realistic --tasks generate,score,embed --num-prompts 32
    python benchmarks/bench.py --model smollm2 --device cuda --batch-sizes 16,64,128,256
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cpu_peers
import report
import workloads
from measure import machine_info, matmul_flops, param_counts, tune_malloc

import runner  # noqa: F401  (before torch starts OpenMP: its thread wait setting, as the `runner` command has)

MODELS = ("smollm2", "gpt2-random", "smollm2-random", "tiny-random")
SHAPES_ENV = (
    "RUNNER_BENCH_SHAPES"  # a folder from --export-shapes: SmolLM2's tokenizer and config, no weights
)
TASKS = ("generate", "score", "embed", "structured")
DEFAULT_NEW_TOKENS = {"fixed": 32, "realistic": 128}
QUICK_NEW_TOKENS = {"fixed": 8, "realistic": 16}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_shapes:
        export_shapes(args.export_shapes)
        return 0
    malloc_tuned = set_up_process(args)
    b = load(args, malloc_tuned)
    if "generate" in args.tasks:
        workloads.roofline(b)
        workloads.WORKLOADS[args.workload](b)
    if "score" in args.tasks:
        workloads.score(b)
    if "embed" in args.tasks:
        workloads.embed(b)
    if "structured" in args.tasks:
        workloads.structured(b)
    if "matmul" in b.res:
        b.res["matmul_end"] = matmul_flops(b.engine.device, b.engine.dtype, True)
        b.res["loadavg_end"] = os.getloadavg()
    report.print_report(b.res)
    report.write_json(b.res, args.json_out, b.log)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2, gpt2-random, smollm2-random, tiny-random (2 small layers: dry runs), or a local model folder",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bf16/fp16 on GPU), float32, bfloat16, float16"
    )
    ap.add_argument(
        "--workload",
        choices=sorted(workloads.WORKLOADS),
        default="fixed",
        help="fixed: greedy, exactly --max-new-tokens each; realistic: sampled, EOS allowed, mixed lengths",
    )
    ap.add_argument(
        "--tasks", default="generate", help=f"comma-separated, of {', '.join(TASKS)} (default generate)"
    )
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="fixed: tokens per prompt (default 32); realistic: the longest answer (default 128)",
    )
    ap.add_argument(
        "--pipeline-batch-size",
        type=int,
        default=16,
        help="batch size of the pipeline and of the plain scoring script",
    )
    ap.add_argument(
        "--batch-sizes", default="8,16,32,64,96,128", help="runner batch sizes to sweep (comma-separated)"
    )
    ap.add_argument(
        "--lp-repeats", type=int, default=2, help="alternating runs with/without log-probs (0: skip)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 8 new tokens, small sweep")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument(
        "--naive-prompts", type=int, default=0, help="naive generate on the first N prompts only (0: all)"
    )
    ap.add_argument(
        "--export-shapes",
        type=Path,
        help=f"write SmolLM2's tokenizer and config (no weights) to this folder and exit; with {SHAPES_ENV} "
        "pointing at it, gpt2-random and smollm2-random need no demo model (a GPU machine without network)",
    )
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument(
        "--peers",
        default="",
        help="fixed workload: CPU peers to add as rows, comma-separated, of openvino, ctranslate2 (default none; "
        "needs bash benchmarks/peers/setup.sh)",
    )
    ap.add_argument(
        "--peers-python",
        help=f"the peers venv's python (default ${cpu_peers.PYTHON_ENV}, else benchmarks/peers/.venv/bin/python)",
    )
    ap.add_argument(
        "--skip-plain-engine", action="store_true", help="skip runner's engine with every speed lever off"
    )
    ap.add_argument(
        "--skip-ablations", action="store_true", help="skip the runs with one speed lever off at a time"
    )
    ap.add_argument(
        "--profile", action="store_true", help="torch.profiler breakdown of the runner default path"
    )
    ap.add_argument(
        "--busy-beside",
        type=int,
        default=0,
        help="fixed workload: also time runner's default path beside N busy-loop processes (a shared machine), "
        "against its fair share of the CPU",
    )
    ap.add_argument("--seed", type=int, default=0, help="init seed of the gpt2-random model")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="default",
        help="tuned: glibc mallopt so freed memory stays in the process (no mmap/munmap page-fault churn "
        "for tensors over 32 MiB); applies to every method of the run",
    )
    ap.add_argument(
        "--profile-batch-size", type=int, default=0, help="batch size to profile (0: runner's default)"
    )
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)  # fmt: skip
    return resolve_args(ap, args)


def resolve_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check the values argparse cannot, and fill the defaults that depend on the workload and --quick."""
    if args.model not in MODELS and not Path(args.model).is_dir():
        ap.error(f"--model must be one of {', '.join(MODELS)} or a model folder, got {args.model!r}")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(TASKS):
        ap.error(
            f"--tasks must be a comma-separated list of {', '.join(TASKS)}, got {','.join(args.tasks)!r}"
        )
    try:
        args.peers = cpu_peers.parse(args.peers)
    except ValueError as e:
        ap.error(str(e))
    if args.peers and not ((args.workload == "fixed" and "generate" in args.tasks) or "score" in args.tasks):
        ap.error("--peers adds rows to the fixed workload and to the score task: use it with --workload fixed "
                 "and --tasks generate, or with --tasks score")  # fmt: skip
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_NEW_TOKENS[args.workload]
    if args.quick:
        args.num_prompts = min(args.num_prompts, 16)
        args.max_new_tokens = min(args.max_new_tokens, QUICK_NEW_TOKENS[args.workload])
        args.batch_sizes = "8,16"
        args.lp_repeats = min(args.lp_repeats, 1)
    return args


def set_up_process(args: argparse.Namespace) -> bool:
    """Tokenizer threads, glibc malloc (--malloc tuned), torch threads, quiet transformers. Returns whether malloc
    was tuned."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    malloc_tuned = tune_malloc() if args.malloc == "tuned" else False
    if args.malloc == "tuned" and not malloc_tuned:
        print("warning: --malloc tuned: mallopt is not available (not glibc?); running with the default",
              file=sys.stderr)  # fmt: skip
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    return malloc_tuned


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def load(args: argparse.Namespace, malloc_tuned: bool) -> workloads.Bench:
    """Load the model into runner's engine and build the prompt set: the run's Bench, its results header."""
    from prompts import build_prompts

    from runner.batching import encode
    from runner.engine import Engine
    from runner.params import EngineOptions

    model_dir = model_folder(args)
    t = time.perf_counter()
    engine = Engine(model_dir, EngineOptions(device=args.device, dtype=args.dtype))
    log(
        f"loaded {args.model} from {model_dir} on {engine.device} ({engine.dtype}) in {time.perf_counter() - t:.1f} s"
    )
    tok = engine.tokenizer
    texts = build_prompts(args.num_prompts, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]))
    ids = [encode(tok, s, chat=False) for s in texts]
    counts = param_counts(engine.model)
    res = results_header(args, engine, model_dir, texts, ids, counts, malloc_tuned)
    p = res["prompts"]
    log(f"{p['count']} prompts, {p['prompt_tokens']} prompt tokens, lengths {p['min']}..{p['max']} (median "
        f"{p['median']:.0f}), {p['japanese']} Japanese; max_new_tokens {args.max_new_tokens}")  # fmt: skip
    return workloads.Bench(args, engine, model_dir, texts, ids, res, counts, log)


def results_header(args, engine, model_dir, texts, ids, counts, malloc_tuned) -> dict[str, Any]:
    """What every report starts with: the command, the machine, the model, the prompt set."""
    cfg, lengths = engine.model.config, [len(p) for p in ids]
    japanese = sum(bool(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", s)) for s in texts)
    malloc = "tuned (mallopt: mmap_max 0, trim_threshold 2 GiB, top_pad 1 GiB)" if malloc_tuned else "default"
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "model": {"name": args.model, "dir": model_dir, "dtype": str(engine.dtype), "device": str(engine.device),
                  "params": counts, "vocab": cfg.vocab_size, "layers": cfg.num_hidden_layers,
                  "hidden": cfg.hidden_size},
        "prompts": {"count": len(ids), "prompt_tokens": sum(lengths), "min": min(lengths), "max": max(lengths),
                    "median": statistics.median(lengths), "japanese": japanese},
        "workload": args.workload if "generate" in args.tasks else None,
        "max_new_tokens": args.max_new_tokens,
        "malloc": malloc,
        "methods": [],
        "tasks": [],
        "task_ratios": {},
    }  # fmt: skip


# --- the models ---------------------------------------------------------------------------------------------


def model_folder(args: argparse.Namespace) -> str:
    if args.model == "smollm2":
        return smollm2_dir()
    if args.model == "gpt2-random":
        return gpt2_random_dir(args.seed)
    if args.model == "smollm2-random":
        return smollm2_random_dir(args.seed)
    if args.model == "tiny-random":
        return gpt2_random_dir(args.seed, tiny=True)
    return args.model


def smollm2_dir() -> str:
    from runner.models import DEMO_MODEL, resolve_model

    return resolve_model(DEMO_MODEL)


def smollm2_shape() -> str:
    """A folder with SmolLM2's tokenizer and config.json: the exported shapes (SHAPES_ENV) when set, else the
    demo model itself."""
    shapes = os.environ.get(SHAPES_ENV)
    return str(Path(shapes) / "smollm2") if shapes else smollm2_dir()


def export_shapes(dest: Path) -> None:
    """SmolLM2's tokenizer files, config.json and generation_config.json (a few MB) into DEST/smollm2."""
    import shutil

    src, out = Path(smollm2_dir()), dest / "smollm2"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy2(f, out / f.name)
    log(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


def smollm2_random_dir(seed: int) -> str:
    """A SmolLM2-135M-shaped Llama (its config.json: 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49,152)
    with random weights from a fixed seed, saved once as safetensors: the speed of SmolLM2 without its weights,
    so a GPU machine needs only the exported shapes. Its text is noise; the fixed workload forces every token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from runner.models import cache_root

    shape = smollm2_shape()
    target = cache_root() / "bench" / f"smollm2-random-seed{seed}"
    if (target / "config.json").is_file():
        return str(target)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape), dtype=torch.float32).eval()
    _save(model, AutoTokenizer.from_pretrained(shape), target)
    return str(target)


def _save(model: Any, tok: Any, target: Path) -> None:
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


def gpt2_random_dir(seed: int, tiny: bool = False) -> str:
    """A GPT-2-124M-shaped model (GPT2Config() defaults: 12 layers, 12 heads, n_embd 768, n_positions 1024), random
    init with a fixed seed, saved once as safetensors. Tokenizer: SmolLM2's byte-level BPE (49,152 tokens), so
    vocab_size is 49,152 instead of GPT-2's 50,257 (123.7M instead of 124.4M parameters; <1% less compute).
    tiny: 2 layers, 2 heads, n_embd 64 (3.3M parameters, nearly all the embedding), for dry runs of the scripts
    (gpu_check.sh --quick), whose figures mean nothing."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    from runner.models import cache_root

    tok = AutoTokenizer.from_pretrained(smollm2_shape())
    name = "tiny-random" if tiny else "gpt2-random"
    target = cache_root() / "bench" / f"{name}-seed{seed}-v{len(tok)}"
    if (target / "config.json").is_file():
        return str(target)
    cfg = GPT2Config(
        **(dict(n_layer=2, n_head=2, n_embd=64) if tiny else {}),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    _save(model, tok, target)
    return str(target)


if __name__ == "__main__":
    sys.exit(main())
