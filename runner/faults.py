"""Named fault points for the kill tests: `RUNNER_FAULT=name` makes the process SIGKILL itself there.

A kill test that only raises an exception proves less than a real SIGKILL, which runs no `finally` and no
`atexit`, exactly like Colab reclaiming a VM. The points sit where a kill is most dangerous: after generating
but before writing, in the middle of copying a shard into the job home, and after the shard but before its
completion marker. With no RUNNER_FAULT set, `fault_point` costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "RUNNER_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process if RUNNER_FAULT names this point (optionally `name:N` = at the N-th visit)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    count = _visits.get(name, 0) + 1
    _visits[name] = count
    if count >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_visits: dict[str, int] = {}
