"""Job states and worker leases: which job is whose, and which job is free to take.

A worker that runs a job holds its lease (`lease.json`: worker, host, pid, heartbeat, expiry, progress) and
renews it from a heartbeat thread. Colab ends a VM with no signal, so a lease is never relied on to be
released: a lease whose expiry has passed is stale and any worker may take the job over. A fresh lease held by
another worker means "leave this job alone", even across two VMs sharing one Drive folder.

Taking a lease is write-then-read-back: after writing its own lease a worker waits a moment and reads the file
again; of two workers racing for one stale lease only the one whose write is there afterwards goes on.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from . import storage
from .errors import RunnerError

LEASE_FILE, STATE_FILE = "lease.json", "state.json"
LEASE_TTL = 120.0  # seconds without a heartbeat before a lease is stale
STATES = ("queued", "running", "completed", "failed", "cancelled")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def read_state(job_dir: Path) -> dict[str, Any]:
    path = job_dir / STATE_FILE
    try:
        return storage.read_json(path) if path.exists() else {"state": "queued"}
    except (RunnerError, ValueError):
        return {"state": "queued"}  # a torn state file: the shards, not this file, say what is done


def set_state(job_dir: Path, state: str, **info: Any) -> None:
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}")
    storage.write_json(job_dir / STATE_FILE, {"state": state, "updated": time.time(), **info})


def read_lease(job_dir: Path) -> dict[str, Any] | None:
    path = job_dir / LEASE_FILE
    if not path.exists():
        return None
    try:
        return storage.read_json(path)
    except (RunnerError, ValueError):
        return None  # torn: treat as no lease; the read-back below settles any race


def lease_is_fresh(lease: dict[str, Any] | None, now: float | None = None) -> bool:
    """A lease counts until it expires, unless its worker ran on this machine and is plainly gone (its pid
    no longer exists): then a restarted `runner work` need not wait for the lease to go stale."""
    if not lease or float(lease.get("expires", 0)) <= (time.time() if now is None else now):
        return False
    return not (lease.get("host") == socket.gethostname() and not _pid_alive(lease.get("pid")))


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume alive and let the expiry decide
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but is not ours to signal
    return True


class Lease:
    """This worker's claim on one job."""

    def __init__(self, job_dir: Path, worker: str, ttl: float = LEASE_TTL, settle: float = 0.5):
        self.job_dir, self.worker, self.ttl, self.settle = job_dir, worker, ttl, settle
        self.info: dict[str, Any] = {}

    def _write(self) -> None:
        now = time.time()
        storage.write_json(
            self.job_dir / LEASE_FILE,
            {"worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now,
             "expires": now + self.ttl, **self.info},
        )  # fmt: skip

    def acquire(self) -> bool:
        """Take the job unless another worker holds a fresh lease on it."""
        current = read_lease(self.job_dir)
        if lease_is_fresh(current) and current.get("worker") != self.worker:
            return False
        self._write()
        time.sleep(self.settle)
        return self.held()

    def held(self) -> bool:
        lease = read_lease(self.job_dir)
        return bool(lease) and lease.get("worker") == self.worker

    def renew(self, **info: Any) -> None:
        self.info.update(info)
        self._write()

    def release(self) -> None:
        if self.held():
            try:
                (self.job_dir / LEASE_FILE).unlink()
            except OSError:
                pass  # it will go stale on its own


class Heartbeat:
    """Renews a lease every `interval` seconds in a background thread until stopped. `lost` turns true when
    another worker has taken the lease (ours had gone stale, say while the VM was suspended) or the job home
    could not be written; the worker then stops after its current batch without writing it."""

    def __init__(self, lease: Lease, interval: float | None = None):
        self.lease = lease
        self.interval = interval if interval is not None else max(1.0, lease.ttl / 4)
        self.lost = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="runner-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.lease.held():
                    self.lost = True
                    return
                self.lease.renew()
            except RunnerError as e:
                self.error, self.lost = e, True
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def cancel_job(job_dir: Path) -> str:
    """Cancel a queued or running job (a running worker stops within seconds, keeping finished rows)."""
    state = read_state(job_dir)["state"]
    if state in ("completed", "cancelled"):
        raise RunnerError(f"job {job_dir.name} is already {state}")
    set_state(job_dir, "cancelled")
    return state


def retry_job(job_dir: Path) -> int:
    """Re-queue a failed or cancelled job (or a completed one with row errors): finished rows are kept,
    rows that failed at run time are tried again. Returns how many row errors were cleared."""
    state = read_state(job_dir)["state"]
    errors_path = job_dir / "errors.jsonl"
    lines = errors_path.read_text(encoding="utf-8").splitlines() if errors_path.exists() else []
    keep = [ln for ln in lines if '"stage": "validate"' in ln]
    cleared = len(lines) - len(keep)
    if state not in ("failed", "cancelled") and not cleared:
        raise RunnerError(
            f"job {job_dir.name} is {state}; only failed or cancelled jobs, or jobs with row errors, can be retried"
        )
    if cleared:
        storage.atomic_write(errors_path, "".join(ln + "\n" for ln in keep))
    set_state(job_dir, "queued", interrupted=True)
    return cleared
