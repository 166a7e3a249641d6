"""The queue: which job a worker takes next, leases around it, deadlines, and `run` (submit + work).

jobs in the home -> `queue` (interrupted first, then priority, then age; fresh leases skipped) -> `work`
(lease + heartbeat, state transitions) -> worker.run_job for each job

Everything here is about *which* job runs and *whether* it may; how a job runs is worker.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .crashes import DeviceError
from .engine import Engine
from .errors import RunnerError
from .jobs import Job
from .storage import StorageError
from .worker import SHARD_ROWS, SHARD_SECONDS, RunSummary, run_job, summarize


def run(
    input_path: Any,
    model: str,
    params: Any = None,
    options: Any = None,
    *,
    output: Any = None,
    engine: Engine | None = None,
    echo: Callable[[str], None] | None = print,
    **job_kwargs: Any,
) -> tuple[Job, RunSummary]:
    """Submit `input_path` as a job (in `output` if given, else in the job home) and work on it (with a lease,
    like `runner work --job`) to the end. Running it again with the same `output` resumes where it stopped."""
    from .jobs import create_job
    from .leases import read_state

    job = create_job(input_path, model, params, options, job_dir=output, **job_kwargs)
    summaries = work(job=job, engine=engine, echo=echo, once=True)
    if summaries:
        return job, summaries[0]
    state = read_state(job.dir)
    if state["state"] in ("failed", "cancelled"):
        reason = f": {state['error']}" if state.get("error") else ""
        raise RunnerError(f"job {job.id} is {state['state']}{reason} (`runner retry {job.id}` re-queues it)")
    return job, summarize(job, 0, 0, 0.0, finished=True)


@dataclass
class Candidate:
    job: Job
    state: str
    interrupted: bool


def _jobs(home: Any, only: str | Job | None) -> list[Job]:
    from .jobs import all_jobs, find_job

    if isinstance(only, Job):
        return [Job.open(only.dir)]
    return [Job.open(find_job(only, home))] if only else all_jobs(home)


def queue(home: Any = None, only: str | Job | None = None) -> list[Candidate]:
    """Jobs a worker may take, in the order it takes them: interrupted jobs first (a worker died or stopped
    in them), then queued jobs by priority (high first), then age. Jobs whose lease another worker keeps
    fresh are left out."""
    from .leases import lease_is_fresh, read_lease, read_state

    out = []
    for job in _jobs(home, only):
        state = read_state(job.dir)
        if state["state"] not in ("queued", "running"):
            continue
        if lease_is_fresh(read_lease(job.dir)):
            continue
        interrupted = state["state"] == "running" or bool(state.get("interrupted"))
        out.append(Candidate(job, state["state"], interrupted))
    out.sort(key=lambda c: (not c.interrupted, -int(c.job.meta.get("priority", 0)), c.job.id))
    return out


def _held_elsewhere(home: Any, only: str | None, worker: str) -> list[tuple[str, float, str]]:
    """(job id, lease expiry, worker) of unfinished jobs whose fresh lease belongs to another worker."""
    from .leases import lease_is_fresh, read_lease, read_state

    out = []
    for j in _jobs(home, only):
        lease = read_lease(j.dir)
        if (
            read_state(j.dir)["state"] in ("queued", "running")
            and lease_is_fresh(lease)
            and lease.get("worker") != worker
        ):
            out.append((j.id, float(lease["expires"]), str(lease.get("worker"))))
    return out


def _stopped(e: StorageError, job: Job) -> StorageError:
    return StorageError(
        f"stopped: the job home cannot be written ({e}); job {job.id} is consistent and resumes with the next "
        "`runner work` (or the same `runner run` again)"
    )


def _stop_watch(job: Job, stop: Callable[[], bool] | None, every: float = 5.0) -> Callable[[], bool]:
    """True once `stop()` is, or once the job has been cancelled (state.json looked at every few seconds:
    reading it on Drive for every batch would be wasteful)."""
    from .leases import read_state

    last = [0.0]

    def check() -> bool:
        if stop and stop():
            return True
        now = time.time()
        if now - last[0] > every:
            last[0] = now
            return read_state(job.dir)["state"] == "cancelled"
        return False

    return check


def work(
    home: Any = None,
    *,
    job: str | Job | None = None,
    deadline: float | None = None,
    once: bool = False,
    stop: Callable[[], bool] | None = None,
    echo: Callable[[str], None] | None = print,
    lease_ttl: float | None = None,
    shard_rows: int = SHARD_ROWS,
    shard_seconds: float = SHARD_SECONDS,
    poll: float = 15.0,
    engine: Engine | None = None,
) -> list[RunSummary]:
    """Work through the queue until it is empty, `deadline` (time.time()) is near, or `stop()` is true.
    `job` restricts the worker to one job; `once` stops after one job. Loaded models are reused across jobs."""
    from .engine import load_config
    from .jobs import model_fingerprint
    from .leases import LEASE_TTL, Heartbeat, Lease, new_worker_id, read_state, set_state

    worker = new_worker_id()
    engines: dict[tuple[Any, ...], Engine] = {}
    summaries: list[RunSummary] = []
    tried: set[str] = set()
    while True:
        if (stop and stop()) or (deadline is not None and time.time() >= deadline):
            break
        candidates = [c for c in queue(home, job) if c.job.id not in tried]
        if not candidates:
            held = _held_elsewhere(home, job, worker)
            if not held:
                break
            # Another worker's lease is fresh: it is working, or it died and the lease has yet to go stale
            # (a new Colab VM after a crash). Wait and take the job over when the lease expires.
            wait = min(poll, max(0.5, min(h[1] for h in held) - time.time()))
            if echo:
                j, expires, who = min(held, key=lambda h: h[1])
                echo(f"job {j} is held by worker {who}; waiting up to {max(0, expires - time.time()):.0f} s for its "
                     "lease to be released or to go stale")  # fmt: skip
            if deadline is not None and time.time() + wait >= deadline:
                break
            time.sleep(wait)
            tried = {t for t in tried if t not in {h[0] for h in held}}
            continue
        cand = candidates[0]
        tried.add(cand.job.id)
        lease = Lease(cand.job.dir, worker, ttl=lease_ttl or LEASE_TTL)
        try:
            if not lease.acquire():
                continue
        except StorageError as e:  # a read-only or full mount: nothing was changed, the job is as it was
            raise _stopped(e, cand.job) from e
        j = cand.job
        should_stop = _stop_watch(j, stop)

        try:
            if echo:
                echo(
                    f"{'resuming' if cand.interrupted else 'starting'} job {j.id}"
                    + (f" ({j.meta['name']})" if j.meta.get("name") else "")
                )
            set_state(j.dir, "running", worker=worker)
            with Heartbeat(lease) as beat:
                key = (
                    j.meta["model"],
                    j.options.device,
                    j.options.dtype,
                    j.options.trust_remote_code,
                    j.options.allow_pickle,
                )
                if engine is not None:
                    engines[key] = engine  # the caller's (tests, notebooks): reused for every job
                if key not in engines:
                    engines.clear()  # one model in memory at a time
                    engines[key] = Engine(j.meta["model"], j.options)
                loaded = engines[key]
                fp = model_fingerprint(j.meta["model"], load_config(j.meta["model"], key[3]))
                if fp != j.meta.get("model_fingerprint"):
                    raise RunnerError(
                        f"the model {j.meta['model']!r} is not the one job {j.id} was submitted with (its files or "
                        "config changed); resuming with a different model is refused"
                    )
                summary = run_job(
                    j, loaded, echo=echo, should_stop=lambda w=should_stop, b=beat: w() or b.lost, deadline=deadline,
                    lease=lease, shard_rows=shard_rows, shard_seconds=shard_seconds,
                )  # fmt: skip
                if beat.error is not None:
                    raise beat.error
        except StorageError as e:
            # The job home itself is failing (Drive gone): not the job's fault. Leave it resumable, as far as
            # the file system still lets us, and stop this worker with the message.
            try:
                set_state(j.dir, "queued", interrupted=True)
                lease.release()
            except (RunnerError, OSError):
                pass  # its lease goes stale on its own
            raise _stopped(e, j) from e
        except DeviceError:
            # The GPU is unusable for this process (worker.py wrote what was finished and recorded the rows
            # in flight): not the job's fault. Leave it resumable and stop; the next worker isolates the row.
            try:
                set_state(j.dir, "queued", interrupted=True)
                lease.release()
            except (RunnerError, OSError):
                pass  # its lease goes stale on its own
            raise
        except RunnerError as e:
            set_state(j.dir, "failed", error=str(e))
            lease.release()
            j.log(f"failed: {e}")
            if echo:
                echo(f"job {j.id} failed: {e}")
            continue
        except BaseException:
            # Ctrl-C twice, or a bug: leave the job as interrupted; its shards are consistent by construction.
            set_state(j.dir, "queued", interrupted=True)
            lease.release()
            raise
        summaries.append(summary)
        current = read_state(j.dir)["state"]
        if current == "cancelled":
            lease.release()
            if echo:
                echo(f"job {j.id} was cancelled; its finished rows are kept")
            continue
        if summary.finished:
            set_state(j.dir, "completed", done=summary.done, errors=summary.errors, total=summary.total)
            if echo:
                echo(
                    f"job {j.id} completed: {summary.done:,}/{summary.total:,} rows, {summary.errors} errors"
                )
        else:
            set_state(j.dir, "queued", interrupted=True)
        lease.release()
        if once or not summary.finished:
            break
    return summaries
