"""One CPU peer (OpenVINO GenAI, CTranslate2) generating for the benchmark, in the peers' own venv.

benchmarks/cpu_peers.py starts this script with the python of the venv that benchmarks/peers/setup.sh made, so
that no peer is ever a dependency of runner:

    python run_peer.py REQUEST.json RESPONSE.json

REQUEST: {"peer": "openvino" | "ctranslate2", "model_dir": the peer's converted model (setup.sh), "prompts":
[[token id, ...], ...] (runner's own ids, so every method tokenizes identically), "max_new_tokens": N,
"threads": T, "batch_size": B, "precision": "f32" | "bf16" | "f16" (runner's dtype: the peer computes and keeps
its KV cache in the same; absent: f32)}; with "task": "score" (CTranslate2 only), the prompts are scored instead: every
token after the first, given the ones before it, and there is no "max_new_tokens".
RESPONSE: {"outputs": [[generated id, ...], ...] in prompt order (scoring: [[log-prob, ...], ...]), "seconds":
the timed pass, "versions",
"settings", "batches", "load_seconds", "warmup_seconds", "peak_memory_bytes", "memory_above_start_bytes",
"memory_method", "cpu_user_seconds", "cpu_sys_seconds", "minor_page_faults"}.

Greedy, at runner's precision (float32 unless the benchmark ran with --dtype), exactly N new tokens per prompt (EOS cannot end a row early). As for runner's rows, the timed
pass follows one whole warm-up pass over the same prompts. Only the standard library is imported at the top:
tests/fake_peer.py drives this protocol with a generator that needs no peer installed.
"""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: run_peer.py REQUEST.json RESPONSE.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[0]).read_text())
    loaders = SCORERS if req.get("task") == "score" else PEERS
    if req["peer"] not in loaders:
        print(f"unknown peer {req['peer']!r} for {req.get('task', 'generate')}; known: {', '.join(loaders)}",
              file=sys.stderr)  # fmt: skip
        return 2
    t = time.perf_counter()
    generate, versions, settings = loaders[req["peer"]](req)
    res = {"versions": versions, "settings": settings, "load_seconds": time.perf_counter() - t}
    res.update(timed(generate, req["prompts"]))
    res["batches"] = settings.get("batches")
    Path(argv[1]).write_text(json.dumps(res))
    return 0


def timed(generate, prompts: list[list[int]]) -> dict:
    """One warm-up pass, then the timed pass with its peak RSS (VmHWM, reset just before) and CPU time."""
    t = time.perf_counter()
    generate(prompts)
    warmup = time.perf_counter() - t
    reset = reset_peak_rss()
    base, r0 = rss("VmRSS"), resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    outputs = generate(prompts)
    seconds = time.perf_counter() - t
    r1, peak = resource.getrusage(resource.RUSAGE_SELF), rss("VmHWM")
    return {
        "outputs": outputs, "seconds": seconds, "warmup_seconds": warmup, "peak_memory_bytes": peak,
        "memory_above_start_bytes": max(0, peak - base),
        "memory_method": "peak RSS (VmHWM, reset per method)" if reset else "peak RSS of the peer process",
        "cpu_user_seconds": r1.ru_utime - r0.ru_utime, "cpu_sys_seconds": r1.ru_stime - r0.ru_stime,
        "minor_page_faults": r1.ru_minflt - r0.ru_minflt,
    }  # fmt: skip


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss(field: str) -> int:
    """VmRSS or VmHWM of this process in bytes (0 where /proc is missing)."""
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


# --- the peers: each returns (generate(prompts) -> outputs, versions, settings) --------------------------------


def load_openvino(req: dict):
    """OpenVINO GenAI's ContinuousBatchingPipeline on CPU, fed token-id tensors (one [1, len] int64 tensor per
    prompt; its generate takes a list of them with one GenerationConfig each). The scheduler takes up to
    batch_size sequences at once; everything else is the pipeline's default (chunked prefill of
    max_num_batched_tokens, KV cache sized by the pipeline). Precision: runner's (`precision`, f32 unless the
    benchmark ran with --dtype) for inference and for the KV cache, asked for explicitly (the CPU plugin may
    otherwise pick bf16 or a u8 KV cache where the CPU allows)."""
    import numpy as np
    import openvino
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.max_num_seqs = req["batch_size"]
    precision = req.get("precision", "f32")
    props = {"INFERENCE_NUM_THREADS": req["threads"], "INFERENCE_PRECISION_HINT": precision,
             "KV_CACHE_PRECISION": precision}  # fmt: skip
    pipe = ov_genai.ContinuousBatchingPipeline(req["model_dir"], sched, "CPU", props)
    n = req["max_new_tokens"]
    config = ov_genai.GenerationConfig()
    config.max_new_tokens, config.min_new_tokens, config.ignore_eos, config.do_sample = n, n, True, False

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        tensors = [openvino.Tensor(np.array([p], dtype=np.int64)) for p in prompts]
        results = pipe.generate(tensors, [config] * len(tensors))
        return [[int(t) for t in r.m_generation_ids[0]] for r in results]

    versions = {"openvino-genai": ov_genai.__version__, "openvino": openvino.__version__}
    settings = {"pipeline": "ContinuousBatchingPipeline", "device": "CPU", "properties": props,
                "scheduler": " ".join(sched.to_string().split()), "batches": None}  # fmt: skip
    return generate, versions, settings


def load_ctranslate2(req: dict):
    """CTranslate2's Generator on CPU in float32: generate_batch over the prompts as token strings (its
    vocabulary.json maps ids to them; it takes no ids), sorted by length and cut into batches of batch_size
    by CTranslate2 itself, the prompt forwarded at once (include_prompt_in_result=False), greedy (top-k 1),
    min_length = max_length = N new tokens."""
    gen, vocab, versions, settings = ctranslate2_generator(req)
    n, bs = req["max_new_tokens"], req["batch_size"]

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        tokens = [[vocab[i] for i in p] for p in prompts]
        results = gen.generate_batch(tokens, max_batch_size=bs, max_length=n, min_length=n, sampling_topk=1,
                                     beam_size=1, include_prompt_in_result=False)  # fmt: skip
        return [list(r.sequences_ids[0]) for r in results]

    return generate, versions, settings


def load_ctranslate2_scorer(req: dict):
    """CTranslate2's Generator.score_batch on CPU in float32: the log-prob of every token after the first given
    the ones before it (its own rule: inputs seq[:-1], targets seq[1:]), the prompts as token strings, sorted by
    length and cut into batches of batch_size by CTranslate2 itself."""
    gen, vocab, versions, settings = ctranslate2_generator(req)
    bs = req["batch_size"]

    def score(seqs: list[list[int]]) -> list[list[float]]:
        results = gen.score_batch(
            [[vocab[i] for i in s] for s in seqs], max_batch_size=bs, max_input_length=0
        )
        return [list(r.log_probs) for r in results]

    return score, versions, settings


# runner's precision -> CTranslate2's compute_type
CT2_TYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def ctranslate2_generator(req: dict):
    """(CTranslate2 Generator on CPU at runner's precision (float32 unless --dtype) with the request's threads,
    its vocabulary (id -> token string), versions, settings) for both of its rows."""
    import ctranslate2

    compute_type = CT2_TYPES[req.get("precision", "f32")]
    gen = ctranslate2.Generator(req["model_dir"], device="cpu", compute_type=compute_type,
                                intra_threads=req["threads"], inter_threads=1)  # fmt: skip
    vocab = json.loads((Path(req["model_dir"]) / "vocabulary.json").read_text(encoding="utf-8"))
    bs = req["batch_size"]
    settings = {"compute_type": compute_type, "intra_threads": req["threads"], "inter_threads": 1,
                "max_batch_size": bs, "batches": -(-len(req["prompts"]) // bs)}  # fmt: skip
    return gen, vocab, {"ctranslate2": ctranslate2.__version__}, settings


PEERS = {"openvino": load_openvino, "ctranslate2": load_ctranslate2}
SCORERS = {"ctranslate2": load_ctranslate2_scorer}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
