"""The commands as Python calls: `runner.status`, `runner.cancel`, `runner.retry`, `runner.repair`,
`runner.report`, `runner.watch`, `runner.work_in_background`.

Each takes a job id, name or folder path (and the job home, default $RUNNER_HOME or ./jobs), exactly as the
command line does; cli.py only parses options and prints what these return.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import jobdir, storage
from .job_status import JobStatus, home_status, job_status
from .storage import StorageError

Ref = str | os.PathLike


def status(job: Ref | None = None, home: Ref | None = None) -> JobStatus | list[JobStatus]:
    """One job's status, or every job's in the home (broken ones included, with their reason; one whose folder does
    not read through the retries, `unreadable`, with the file: as the home's listing shows it)."""
    with storage.one_look():  # (a file that did not read through the retries is not waited for twice)
        if job is None:
            return home_status(home)
        path = jobdir.find_job(job, home)
        try:
            return job_status(jobdir.Job.open(path))
        except jobdir.BrokenJob as e:
            from .job_status import broken_status

            return broken_status(path, str(e), repairable=e.repairable)
        except StorageError as e:
            from .job_status import unreadable_or_broken

            return unreadable_or_broken(path, e)


def cancel(job: Ref, home: Ref | None = None) -> str:
    """Cancel a queued or running job; finished rows are kept. Returns the state it was in."""
    with jobdir.opened_job(job, home) as opened:
        return jobdir.cancel(opened).value


def retry(job: Ref, home: Ref | None = None) -> int:
    """Re-queue a failed or cancelled job, or one with row errors. Returns how many rows had errors cleared (a row's -n samples count once)."""
    with jobdir.opened_job(job, home) as opened:
        return jobdir.retry(opened)


def repair(job: Ref, home: Ref | None = None) -> Any:
    """Bring a job back from what is still verifiable (see jobdir.repair); a prompts.parquet (or errors.jsonl)
    unlike its checksum is written again from the input file when that is unchanged (jobs.restore_inputs)."""
    from .jobs import restore_inputs

    return jobdir.repair(jobdir.find_job(job, home), mend_inputs=restore_inputs)


def report(job: Ref, path: Ref = "report.html", home: Ref | None = None) -> Path:
    """Write a job's report, one self-contained HTML page (throughput, lengths, finish reasons, log-probs,
    errors, peak memory, settings, sample outputs), to `path`; returns the path. Works at any point of a
    job's life, before any result too."""
    from .job_report import write_report

    if os.fspath(path) == "":  # (Path("") is ".": writing onto it was retried for a minute as a busy mount)
        raise ValueError("an empty path names no file")
    with jobdir.opened_job(job, home) as opened:
        return write_report(opened, path)


def watch(job: Ref, home: Ref | None = None, every: float = 10.0, echo: Any = print) -> JobStatus:
    """Print the job's status every `every` seconds until it ends (or no worker runs it). Returns the last."""
    from .background import watch as watch_job

    return watch_job(job, home, every, echo)


def work_in_background(args: list[str] | tuple[str, ...] = (), home: Ref | None = None) -> Any:
    """Start `runner work ARGS` as a detached process, its output in HOME/logs/. Returns its pid and log."""
    from .background import start

    return start(args, home)
