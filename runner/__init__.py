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

# OpenMP threads that wait by sleeping, not spinning: on a shared CPU (Colab, a busy 2-core VM) spinning
# threads burn the core another process needs, and generation at load 5 ran 3-16x slower with the default
# policy (benchmarks/RESULTS.md, "Under load"). Read once, when torch starts its OpenMP runtime, so it only
# takes effect if runner is imported first (the `runner` command always is); a value already set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
