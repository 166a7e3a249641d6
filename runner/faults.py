"""Named fault points for the kill tests: `RUNNER_FAULT=name` makes the process SIGKILL itself there.

A kill test that only raises an exception proves less than a real SIGKILL, which runs no `finally` and no
`atexit`, exactly like Colab reclaiming a VM. The points sit where a kill is most dangerous: after generating
but before writing, in the middle of copying a shard into the job home, after the shard but before its
completion marker, before the rename of any atomic write (`before_replace`: a marker, a claim's seal...) and
before the link of any exclusive create (`before_create`: a state record, a claim). `row_fault` makes one row
poison the process whenever it is computed (crash isolation, crashes.py). With no RUNNER_FAULT set, each costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "RUNNER_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process if RUNNER_FAULT names this point (optionally `name:N` = from the N-th visit on;
    `name:N:SIGINT` sends that signal instead, as a Ctrl-C there would; `name:N:SIGSTOP:w2` only in worker
    process w2 of `runner work --workers N`)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, rest = wanted.partition(":")
    if point != name:
        return
    nth, _, rest = rest.partition(":")
    sig, _, label = rest.partition(":")
    if label and os.environ.get("RUNNER_WORKER_LABEL") != label:
        return
    count = _visits.get(name, 0) + 1
    _visits[name] = count
    if count >= int(nth or 1):
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


_visits: dict[str, int] = {}


def row_fault(row_ids: list[str]) -> None:
    """Make a row break the process whenever it is computed, in every process (as a row that trips a CUDA
    device-side assert does): `RUNNER_FAULT=poison_row:ID` raises the RuntimeError torch raises then, when
    row ID is in the batch about to be computed; `poison_kill:ID` SIGKILLs the process there instead, like
    a crash in native code."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, rows = wanted.partition(":")  # (ID1,ID2: either of them)
    if point not in ("poison_row", "poison_kill") or not set(rows.split(",")) & set(row_ids):
        return
    if point == "poison_kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(
        "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some "
        "other API call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
        "CUDA_LAUNCH_BLOCKING=1"
    )
