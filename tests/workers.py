"""Real `runner` processes for the kill, crash, file-system and many-worker tests (the plain helpers are in
helpers.py).

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
    # the caller's entries made absolute: `PYTHONPATH=tests/linkless` (make test-linkless) was not in effect in
    # `python -m runner` processes (their commands linked their records into place)
    given = filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(os.path.abspath(p) for p in given)])
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


def run_runner(*args, env_extra=None, timeout=300, prefix=("-m", "runner")) -> tuple[int, str]:
    """`python -m runner ARGS...` (or `python PREFIX... ARGS...`, say torchrun) run to its end from the
    repository root: (exit code, stdout and stderr interleaved)."""
    proc = subprocess.run([sys.executable, *prefix, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=worker_env(env_extra), timeout=timeout, cwd=ROOT)  # fmt: skip
    return proc.returncode, proc.stdout
