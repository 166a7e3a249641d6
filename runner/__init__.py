"""runner: batch generation and scoring for Hugging Face causal LMs, resumable overnight on Colab.

    import runner
    job = runner.submit("prompts.jsonl", model="gpt2", params=runner.GenerationParams(max_new_tokens=64))
    runner.run_job(job)
    df = runner.load_results(job.id)

Heavy libraries (torch, transformers, pyarrow) are imported by the functions that need them, so that
`import runner` and `runner --help` answer at once.
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin only briefly, then sleep: on a shared CPU (Colab, a busy 2-core VM) threads spinning
# at barriers burn the core another process needs (generation beside one busy process ran at 0.11-0.14 of its
# speed alone with libgomp's default spin, 0.41 with ACTIVE), while sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# costs ~15% on an idle machine. A 1,000-iteration spin (~10 us) keeps most of the idle speed and degrades in
# proportion to the CPU it gets (benchmarks/RESULTS.md, "Under load"). libgomp (PyPI torch) reads
# GOMP_SPINCOUNT; Intel OpenMP (some other builds) reads KMP_BLOCKTIME, 0 = sleep at once. Read when torch
# starts its OpenMP runtime, so it takes effect if runner is imported first (the `runner` command and its
# workers always do); a user's own OpenMP wait setting is kept as is.
# OPENMP_WAIT_MISSED: torch (and its OpenMP runtime) was loaded before runner, so the setting came too late
# (engine.py warns on CPU).
OPENMP_WAIT_VARS = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
)  # any of them set: the user's choice
OPENMP_WAIT_MISSED = False
if not set(OPENMP_WAIT_VARS) & set(_os.environ):
    OPENMP_WAIT_MISSED = "torch" in __import__("sys").modules
    _os.environ["GOMP_SPINCOUNT"] = "1000"
    _os.environ["KMP_BLOCKTIME"] = "0"

from .errors import InputError, ModelLoadError, ParamError, RunnerError  # noqa: E402
from .params import EmbedParams, EngineOptions, GenerationParams, ScoreParams  # noqa: E402

__all__ = [
    "EmbedParams",
    "EngineOptions",
    "GenerationParams",
    "InputError",
    "ModelLoadError",
    "ParamError",
    "RunnerError",
    "ScoreParams",
    "__version__",
    "cancel",
    "export_results",
    "generate",
    "load_results",
    "open_job",
    "read_errors",
    "repair",
    "report",
    "retry",
    "run",
    "run_batch",
    "run_job",
    "status",
    "submit",
    "watch",
    "work",
    "work_in_background",
]


def __getattr__(name: str):
    # Lazy: these modules pull in pyarrow/torch only when first used.
    if name == "load_results":
        from .results import load_results

        return load_results
    if name == "submit":
        from .jobs import create_job

        return create_job
    if name == "run_job":
        from .worker import run_job

        return run_job
    if name in ("run", "work"):
        from . import scheduler

        return getattr(scheduler, name)
    if name == "generate":
        from .quick import generate

        return generate
    if name in ("status", "cancel", "retry", "repair", "report", "watch", "work_in_background"):
        from . import api

        return getattr(api, name)
    if name in ("Job", "open_job"):
        from . import jobdir

        return getattr(jobdir, name)
    if name in ("read_errors", "export_results"):
        from . import results

        return getattr(results, name)
    if name == "run_batch":
        from .openai_batch import run_batch

        return run_batch
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
