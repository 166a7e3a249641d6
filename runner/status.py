"""What `runner status` shows: one summary per job (state, done/total, tok/s, ETA, errors) from its folder.

Read-only and cheap: counts come from completion markers, not from reading the shards, so status answers at
once even for a job with many shards on a slow Drive mount.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import storage
from .jobs import Job
from .leases import lease_is_fresh, read_lease, read_state
from .progress import fmt_duration
from .results import iter_errors, valid_shards


@dataclass
class JobStatus:
    id: str
    name: str | None
    state: str
    done: int
    total: int
    errors: int
    invalid: int
    tokens_per_second: float | None
    eta_seconds: float | None
    model: str
    created: str
    worker: str | None
    message: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def eta(self) -> str:
        return fmt_duration(self.eta_seconds) if self.eta_seconds is not None else "-"


def done_count(job: Job) -> int:
    """Result rows in counted shards, summed from their markers."""
    total = 0
    for shard in valid_shards(job.dir):
        marker = storage.read_json(job.dir / "done" / (shard.stem + ".json"))
        total += int(marker["rows"])
    return total


def job_status(job: Job) -> JobStatus:
    state = read_state(job.dir)
    lease = read_lease(job.dir)
    running = lease_is_fresh(lease)
    done = done_count(job)
    errors = sum(1 for e in iter_errors(job.dir) if e.get("stage") != "validate")  # not held: may be millions
    tps = eta = None
    name = state["state"]
    if name == "running" and not running:
        name = "queued"  # its worker died: it is interrupted and the next `runner work` resumes it
    if running and lease:
        tps = lease.get("tokens_per_second")
        rate = lease.get("rows_per_second")
        if rate:
            eta = (job.total - done - errors) / rate
    else:
        stats_path = job.dir / "stats.json"
        if stats_path.exists():
            runs = storage.read_json(stats_path).get("runs", [])
            if runs:
                tps = runs[-1].get("tokens_per_second")
    return JobStatus(
        id=job.id,
        name=job.meta.get("name"),
        state=name
        + (
            " (interrupted)"
            if name == "queued" and (state.get("interrupted") or state["state"] == "running")
            else ""
        ),
        done=done,
        total=job.total,
        errors=errors,
        invalid=int(job.meta["input"].get("invalid", 0)),
        tokens_per_second=tps,
        eta_seconds=eta,
        model=job.meta["model"],
        created=job.meta["created"],
        worker=lease.get("worker") if running and lease else None,
        message=state.get("error"),
    )


def status_table(statuses: list[JobStatus]) -> str:
    """A fixed-width table that reads the same in a terminal, a Colab cell and a log file."""
    head = ("JOB", "NAME", "STATE", "DONE/TOTAL", "TOK/S", "ETA", "ERRORS", "MODEL")
    rows = [head]
    for s in statuses:
        rows.append((
            s.id, s.name or "-", s.state, f"{s.done:,}/{s.total:,}",
            f"{s.tokens_per_second:,.1f}" if s.tokens_per_second else "-", s.eta, str(s.errors), s.model,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
