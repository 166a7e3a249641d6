"""Real `runner` processes for the kill, crash and file-system tests.

They run with this checkout first on PYTHONPATH, so that a test run from a worktree exercises the worktree's
code even when the virtualenv has another checkout installed in editable mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def start_worker(home, *extra, env_extra=None, shard_rows=2, prefix=()) -> subprocess.Popen:
    """`runner --home HOME work --shard-rows N ...`; `prefix` replaces `-m runner` (say, by a wrapper script
    that installs file-system faults first)."""
    return subprocess.Popen(
        [sys.executable, *(prefix or ("-m", "runner")), "--home", str(home), "work", "--shard-rows",
         str(shard_rows), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=worker_env(env_extra), text=True,
    )  # fmt: skip


def run_worker(home, *extra, timeout=120, **kw) -> tuple[int, str]:
    proc = start_worker(home, *extra, **kw)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def reference_run(root: Path, model: str, texts: list[tuple[str, str]], params, options):
    """Write (id, prompt) rows to ROOT/p.jsonl and run them as one uninterrupted job: the prompts file and
    the results every faulted run of the same prompts must equal."""
    import json

    import runner
    from runner.jobs import create_job
    from runner.worker import run_job

    prompts = root / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in texts))
    ref = create_job(prompts, model, params, options, job_dir=root / "reference")
    run_job(ref, echo=None)
    return prompts, runner.load_results(ref.dir)
