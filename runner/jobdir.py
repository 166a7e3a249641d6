"""The job folder: every path in it, its parsed spec, its states, its error log, its claims and its results.

This module is the one place that knows what a job folder holds and what each file means. Everything else
(submit in jobs.py, the run loop in worker.py, the queue in scheduler.py, status.py, results.load_results)
asks it.

    job.json          the spec, written once at submit: model, kind, settings, seed, rows, unit size, checksums
    job.backup.json   a copy of job.json, so `runner repair` can restore a damaged one
    prompts.parquet   the validated prompts (its sha256 is in job.json)
    errors.jsonl      input rows found invalid at submit (--skip-invalid; its sha256 is in job.json); never changed
    state/SSSSSSSS.json  the job's state records, each created exclusively over the one before (see below): queued,
                      cancelled, completed, failed, the retry generation, who recorded it, its own checksum
                      (`check`: a changed byte is noticed, not obeyed), its writer's token (`writer`, new for
                      each record) with the job it was written for (one copied in from another job's folder is
                      not obeyed) and the token of the record it was decided over (`over`: a copy of another of
                      the job's records, as a sync conflict leaves one, is noticed, not obeyed). The newest counts.
                      Workers never record "running": running is a fact about live workers. (Jobs of older
                      versions, before their first record: state.json, completed.json, failed.json.)
    claims/UUUUU-EEEEEEEE.json       the claim of epoch E on unit U (created exclusively: one owner per epoch)
    claims/UUUUU-EEEEEEEE.seal.json  the commits accepted from epoch E, fixed when epoch E+1 takes the unit
    workers/WORKER.json              each worker's heartbeat (and throughput, for status)
    shards/UUUUU-EEEEEEEE-SSSS.parquet, done/UUUUU-EEEEEEEE-SSSS.json   results and their commit markers
                      (a marker: keys, row errors, and each batch's end time, rows, tokens and seconds)
    inflight/UUUUU.json              the batch a worker is computing in a unit (crash isolation)
    quarantine/       shards and markers that failed verification, kept aside
    verified.json     cache of shard checksums already verified (by size and times)
    stats.json, log.txt

The ownership and integrity model, so that exactly-once holds by construction:
  * Work is split into units (row ranges x all samples). A worker owns a unit by creating the next epoch's
    claim file exclusively; a claim is live while its worker's heartbeat is fresh and its process is not
    provably gone (on the same boot and PID namespace, a worker whose process has ended loses its claims at
    once; a stopped one keeps them only until its heartbeat goes stale).
  * Fencing: whoever takes epoch E+1 first seals epoch E: it lists E's commit markers and writes that list
    once. Only the markers of a unit's newest epoch, and those listed in the seals of older ones, count. A
    stale worker (frozen past its lease) that commits after the seal commits nothing: its files are ignored.
    (Where links are not supported a seal is created empty, then filled: one found empty is waited for, then
    taken over, so that a sealer frozen in between never fills in a listing older than what counted meanwhile.)
  * Keyed: a commit names its (row, sample) keys; the done-set is a set of keys, so the same key computed
    twice never counts twice. Results are deterministic given the seed, so copies are identical anyway.
  * Verified: a commit counts only if its shard matches the marker (size, sha256, keys); one that does not is
    quarantined by the next worker and its keys done again.
  * Transient read errors (EIO, ENOTCONN, ESTALE...) are retried and then stop the worker; they never read as
    "not done".
  * Every state change is one atomic file write (or one exclusive create), so a kill at any instant leaves
    the old state or the new one. Row errors live in the commit markers (fenced like results); `retry`
    clears them by raising the retry generation, one state record.
  * State changes are fenced too: each writer (a command, or a worker recording completion or failure)
    decides from the newest record S it read and creates record S+1 exclusively. If another writer took S+1
    first, the state moved on: a command reads again and decides again, a worker's outcome is dropped. So no
    writer that read an older state, however long it slept, ever writes over a newer one. (Where links are not
    supported a record is created empty and then filled: a writer killed in between leaves the job broken
    until `runner repair`, which records the state anew.) A record is read only as its writer wrote it: one
    damaged, or a copy of another record (its token is a record below's, or it names an older record of the
    job, or none, rather than the one below as the one it was decided over), leaves the job broken until
    `runner repair` records the state anew from the records that still read; it is never read as the older
    state it copies. (One decided over a record its writer took back after it read whole, its fill's flush
    failing for good, names a record no other names: it reads, the record that came to the freed name below
    it passed over.)
  * Nothing follows a symbolic link: listings skip links, and a job whose folders are links is broken.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from . import storage
from .errors import RunnerError, first_line
from .faults import fault_point
from .params import EmbedParams, EngineOptions, GenerationParams, ScoreParams
from .progress import counted

T = TypeVar("T")

# job folder layout version (3: state records; an older runner refuses such a job, never misreads it)
FORMAT = 3
# 4: a job some of whose rows give temperature / top_p / top_k (/ min_p: 6), which sample by the rules of params.row_params
# (job.json's "row_sampling"): a runner from before them would decide those rows otherwise, so it refuses the job
ROW_SAMPLING_FORMAT = 4
# 5: a score job some of whose texts are longer than the model's window, scored in rolling windows whose last
# one is a whole window (job.json's WHOLE_LAST_WINDOW): a runner from before would start that one elsewhere
WHOLE_WINDOW_FORMAT = 5
WHOLE_LAST_WINDOW = "whole_last_window"
# 6: a generate job whose settings or some of whose rows give min_p (row rules as 4's): a runner from before min_p
# would call its job.json invalid (a setting it does not know) or fail those rows, so it refuses the job
MIN_P_FORMAT = 6
# 6 too: a job whose model fingerprint is version 7 or later (models.FINGERPRINT_VERSION since 2026-12-06, so every
# job submitted since): a runner from before version 7 computed "7:..." its own way, found another model and recorded
# the job failed, "not the one it was submitted with", under the workers of now sharing the home (adversarial pass
# 250, c2f3724); every runner that reads 6 knows version 7, so such a job is refused by the others
FINGERPRINT_FORMAT = MIN_P_FORMAT
FINGERPRINT_FORMAT_FROM = 7
# 2: state.json, completed.json and failed.json until the job's first state record
READABLE_FORMATS = (2, 3, ROW_SAMPLING_FORMAT, WHOLE_WINDOW_FORMAT, MIN_P_FORMAT)
JOB_FILE, JOB_BACKUP, PROMPTS, INVALID = "job.json", "job.backup.json", "prompts.parquet", "errors.jsonl"
STATE_FILE, STATS_FILE, LOG_FILE, VERIFIED = "state.json", "stats.json", "log.txt", "verified.json"
COMPLETED_FILE, FAILED_FILE = "completed.json", "failed.json"  # outcomes of older versions' jobs, read only
SHARDS, MARKERS, CLAIMS, WORKERS, INFLIGHT, QUARANTINE, STATES = (
    "shards", "done", "claims", "workers", "inflight", "quarantine", "state",
)  # fmt: skip
FOLDERS = (SHARDS, MARKERS, CLAIMS, WORKERS, INFLIGHT, QUARANTINE, STATES)
_RECORD = re.compile(r"^(\d{8})\.json$")  # a state record, state/SEQ.json
ORDER = "_row"  # input order of a row (0-based over valid rows)
LEASE_TTL = 120.0  # seconds without a heartbeat before a worker's claims may be taken over
MAX_LEASE = 86400.0  # the longest lease RUNNER_LEASE_TTL may set
UNIT_ROWS = 1024  # prompts per unit of work (all their samples): what one worker claims at a time
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
COMMIT_RE = re.compile(r"(\d{5,})-(\d{8})-(\d{4,})")
CLAIM_RE = re.compile(r"(\d{5,})-(\d{8})\.json")
SEAL_RE = re.compile(r"(\d{5,})-(\d{8})\.seal\.json")
INFLIGHT_RE = re.compile(r"\d{5,}\.json")  # inflight/UUUUU.json: the record of what a unit's worker computes
KINDS = {"generate": GenerationParams, "score": ScoreParams, "embed": EmbedParams}


class BrokenJob(RunnerError):
    """A job folder whose metadata cannot be read or makes no sense; the job is `broken`, others go on.
    `repairable`: whether `runner repair` can mend it (not a damaged prompts file: that is submitted again).
    `named`: the message already names the job and what brings it back (`naming_broken`). `unfilled`: its newest
    state record is empty on a file system without hard links, where a record is created empty and then filled:
    maybe a `cancel` or `retry` being written (STATE_PATIENCE_SECONDS from `since`), maybe one killed half way."""

    def __init__(
        self, message: str, repairable: bool = True, named: bool = False, since: float | None = None
    ):
        super().__init__(message)
        self.repairable = repairable
        self.named = named
        self.since = since  # `unfilled`: when the empty record was made (its mtime, never later than now)

    @property
    def unfilled(self) -> bool:
        return self.since is not None

    def waited_out(self) -> bool:
        """An empty record (`unfilled`) older than STATE_PATIENCE_SECONDS: no change is on its way, its writer
        was killed half way. Every waiter counts from the record's making, so nobody waits twice as long."""
        return self.since is None or time.time() - self.since > STATE_PATIENCE_SECONDS


@contextlib.contextmanager
def naming_broken(folder: Path) -> Iterator[None]:
    """Around a command on the job in `folder` (results, cancel, retry, report...): a BrokenJob says which job
    is broken and what brings it back, in one line, as `runner status` does, not only which file is damaged."""
    try:
        yield
    except BrokenJob as e:
        if e.named or not e.repairable:  # those say the job and what to do already (submit the file again)
            raise
        if e.unfilled and not e.waited_out():  # no links: a `cancel` or `retry` on its way, as status says
            assert e.since is not None
            raise BrokenJob(
                f"job {_job_id(Path(folder))}: a change of state is being written (its newest state record is "
                f"still empty, made {time.time() - e.since:.0f} s ago); try again in a moment (`runner repair` only "
                f"if it is still empty after {STATE_PATIENCE_SECONDS:.0f} s)", named=True, since=e.since,
            ) from e  # fmt: skip
        hint = f"`runner repair {shlex.quote(str(folder))}` brings it back"
        raise BrokenJob(f"job {_job_id(Path(folder))} is broken ({e}); {hint}", named=True) from e


def _job_id(folder: Path) -> str:
    """The id job.json (or its backup) gives the job in `folder`, else the folder's name."""
    for name in (JOB_FILE, JOB_BACKUP):
        try:
            meta = _read_json_or_none(folder / name) if storage.kind(folder / name) == "file" else None
        except RunnerError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("id"), str):
            return meta["id"]
    return folder.name


class ClaimLost(RunnerError):
    """This worker's claim on a unit was taken over (it was thought dead): its work there is discarded."""


class JobReplaced(RunnerError):
    """The job's folder now holds another job (deleted and the file submitted again to the same folder, as
    `runner run -o DIR` does): this worker's run of the job it opened ends, writing nothing more there."""


class JobGone(RunnerError):
    """The job's folder is gone from where the worker opened it (the user moved or deleted it as it ran): this
    worker's run of it ends, writing nothing more there; the other jobs of the home run on."""


def check_folder_still_there(job: Job, e: Exception | None = None) -> None:
    """Raise JobGone when `job`'s folder (or its job.json) is no longer there, the failure `e` of a write or a
    read in it (None: any sign, a claim found lost) being that. A folder moved or deleted while a worker ran it
    stopped the worker of the whole home with "the job home cannot be written (... No such file or directory);
    job ... resumes with the next `runner work`", its other jobs left undone, the job pointed at a place where
    it no longer is, and its claims, gone with it, said "taken over by another worker" (adversarial pass 202).
    Deleted and submitted again under it by the time it is looked at: JobReplaced (it too stopped the worker of
    the whole home). A look that fails through the retries (the mount is gone, not the folder) raises nothing; the
    folder holding the job gone too (Drive unmounted) raises StorageError: the worker stops, the job resumes."""
    if e is not None and getattr(e, "errno", None) not in (errno.ENOENT, errno.ENOTDIR):
        return
    try:
        missing = _missing_at_every_look(job)
    except RunnerError:
        return
    if not missing:
        # (a failing mount here says nothing: the failure `e` is said as it was)
        with contextlib.suppress(storage.StorageError):
            check_still_this_job(job)
        return
    try:
        folder_there = storage.kind(job.dir) == "dir"
        # the folder holding it gone too: Drive unmounted under the worker (or the home moved away), not one job
        # moved; it was said "moved or deleted", then "nothing to do" with exit 0, the other jobs never run
        home_there = folder_there or storage.retry(
            lambda: storage.is_there(job.dir.parent), f"read {job.dir.parent}"
        )
    except RunnerError:
        folder_there, home_there = False, True
    if not home_there:
        raise storage.StorageError(f"its folder {job.dir.parent} is gone (Google Drive unmounted? or the folder "
                                   "moved or deleted)", errno.ENOENT)  # fmt: skip
    if folder_there:  # (its job.json deleted, not the folder moved)
        raise JobGone(f"job {job.id}: its job.json is gone from {job.dir} (deleted while this worker ran it?): "
                      f"its rows not saved yet are discarded; `runner repair {shlex.quote(str(job.dir))}` "
                      "restores it from job.backup.json")  # fmt: skip
    raise JobGone(
        f"job {job.id}: its folder {job.dir} is gone (moved or deleted while this worker ran it): its rows "
        "not saved yet are discarded and nothing more is written there; moved, it resumes where it is now "
        "(`runner work --job NEW_FOLDER`, or `runner work` of the home it is in)"
    ) from None


GONE_LOOKS = 3  # looks again after the first, at the first retry delays apart (about 2 s in all)


def _missing_at_every_look(job: Job) -> bool:
    """Whether `job`'s folder (or its job.json) is missing at each of 1 + GONE_LOOKS looks spread over a second
    or two: one "no such file" of a mount's flake must not end the worker's run of a job still there, and a
    second look at once is no look (a FUSE mount answers it from the "no such file" it just cached)."""
    for delay in (*storage.RETRY_DELAYS[:GONE_LOOKS], None):
        if storage.kind(job.dir) == "dir" and storage.kind(job.dir / JOB_FILE) is not None:
            return False
        if delay is not None:
            time.sleep(delay)
    return True


def check_still_this_job(job: Job) -> None:
    """Raise JobReplaced when job.json now names another job than `job`. A worker of a job whose folder was
    deleted and submitted again under it wrote its commits over the new job's (same names), claimed its units
    and quarantined its sound shards as another job's: the new job, completed, was left broken (adversarial
    pass 141). A job.json that does not read, or does not match its checksum (a flipped digit of its id), is
    left to the checks that look for damage: it was said to hold "job 2026...1", a job that is nowhere."""
    meta = _read_json_or_none(job.dir / JOB_FILE) if _lexists(job.dir / JOB_FILE) else None
    now = meta.get("id") if _valid_spec(meta) else None
    if isinstance(now, str) and now != job.id:
        raise JobReplaced(
            f"{job.dir} now holds job {now}, not job {job.id} this worker was running (its folder was deleted and "
            f"submitted again?): its run of job {job.id} ends, its rows not saved yet are discarded and job {now} "
            "is left as it is (`runner work` runs it)"
        )


# --- the home and job references -------------------------------------------------------------------------


def default_home() -> Path:
    """$RUNNER_HOME, else ./jobs."""
    return Path(os.environ.get("RUNNER_HOME") or "jobs")


def missing_home(root: str | os.PathLike) -> str:
    """Why a job home holds no job because it is not there at all, or "" when it is a folder: `runner status
    --home /typo` said only "no jobs in /typo", as of an empty home (a mistyped --home, a Drive not mounted yet)."""
    found = storage.kind(root)
    if found == "dir" or (found == "link" and storage.is_there(root, stat.S_ISDIR)):
        return ""
    return "no such folder" if found is None else "not a folder"


def new_job_id() -> str:
    """Time-sortable and unique: 20261122-184455-3f9a1c."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")  # what new_job_id makes (a job home names each folder so)


def check_name(ref: str, what: str = "job id or name") -> str:
    """A job id or name: letters, digits, '-', '_' and '.', at most 100 characters, not starting with '.'."""
    if not isinstance(ref, str) or not NAME_RE.fullmatch(ref):
        raise RunnerError(
            f"invalid {what} {ref!r}: use ASCII letters, digits, '-', '_' and '.' (at most 100 characters, "
            "starting with a letter or digit)"
        )
    return ref


def open_job(ref: str | os.PathLike, home: str | os.PathLike | None = None) -> Job:
    """The job a command names: a job folder path (anything with a '/' or an existing folder holding
    job.json), else a job id or name in `home` (default: $RUNNER_HOME, else ./jobs)."""
    return Job.open(find_job(ref, home))


@contextlib.contextmanager
def opened_job(ref: str | os.PathLike, home: str | os.PathLike | None = None) -> Iterator[Job]:
    """`open_job` for a command on that job (results, errors, cancel, retry, report...): a BrokenJob out of the
    opening or out of the command's own reads names the job and `runner repair` (`naming_broken`)."""
    folder = find_job(ref, home)
    with naming_broken(folder):
        yield Job.open(folder)


def find_job(ref: str | os.PathLike, home: str | os.PathLike | None = None) -> Path:
    """The folder of the job `ref` names (see `open_job`); does not read the job."""
    text = os.fspath(ref)
    path = Path(text)
    bare = os.sep not in text and "/" not in text
    # (a path first: a job.json whose stat fails for good stopped every command on its job, `runner repair` too)
    if not bare or _lexists(path / JOB_FILE) or _lexists(path / JOB_BACKUP):
        if storage.kind(path) not in ("dir", "link"):
            raise RunnerError(f"no job folder {text}{batch_job_hint(path) or input_file_hint(path, home)}")
        if bare:
            _refuse_if_also_in_home(text, path, home)
        return named_folder(path)
    check_name(text)
    root = Path(home) if home is not None else default_home()
    return _in_home(text, root)


def batch_job_hint(path: Path) -> str:
    """ ": it is the output file of `runner run-batch`, whose job folder is OUT.job" for a run-batch's output
    (`runner status out/responses.jsonl`): its job folder is beside it, as README says, and the user named the
    file they know."""
    if storage.kind(path) != "file":  # (a file has a name: "." and "/" have none to put .job after)
        return ""
    beside = path.with_name(path.name + ".job")
    if not _is_job_folder(beside):
        return ""
    return f": it is the output file of `runner run-batch`, whose job folder is {beside}"


def named_folder(path: Path) -> Path:
    """The folder a job path the user typed stands for: a link to a job folder (`ln -s .../out/demo demo`) is
    the user's own name for it, so it stands for the folder it points to. (Links inside a job, and links among
    the jobs of a home, are never followed: `Job.open`, `job_folders`.)"""
    return Path(os.path.realpath(path)) if storage.kind(path) == "link" else path


def _in_home(text: str, root: Path) -> Path:
    """The folder of the job whose id or name is `text` in the home `root`."""
    if _job_folder_for_now(root / text):  # not any folder: HOME/logs of `runner work --background` is no job
        return root / text
    unread: list[Path] = []
    jobs = list(_named(root, unread))
    named = [p for p, spec in jobs if spec.get("name") == text]
    # a folder that did not read at once may hold the name too: read through the retries unless the name's claim
    # says which holds it (`runner status night1` waited minutes for a neighbour Drive could not serve, and a
    # job that does not read was read 3 times through the retries: adversarial pass 269)
    if unread and (holder := _claim_says(root, text)) not in named:
        if not named and holder in unread:
            return holder  # (its opener says it does not read)
        jobs = sorted([*jobs, *_named(root, folders=unread)], key=lambda it: it[0].name)
        named = [p for p, spec in jobs if spec.get("name") == text]
    if not named:  # its job.json damaged: the name's claim still says which job holds it
        named = [p for p in [_name_holder(root, text)] if p is not None]
    ids = {spec.get("id") for p, spec in jobs if p in named}
    if len(named) > 1 and len(ids) == 1 and (root / str(*ids)) in named:
        return root / str(*ids)  # one job, and copies of its folder (`copies_in_home`)
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        ids = ", ".join(p.name for p in named)
        raise RunnerError(f"several jobs are named {text!r}; use the job id ({ids})")
    if missing := missing_home(root):
        raise RunnerError(f"no job {text!r} in {root}: {missing} (a mistyped --home or $RUNNER_HOME?)")
    if (
        storage.kind(root / text) == "link"
    ):  # (`runner status` lists it, broken: "no job" said it was not there)
        raise RunnerError(f"{root / text} is a symbolic link; runner does not follow links in the job home: give "
                          "the folder it points to, or move that folder into the home")  # fmt: skip
    raise RunnerError(
        f"no job {text!r} in {root}{input_file_hint(Path(text), root) or _did_you_mean(text, jobs)}"
    )


def input_path(spec: dict[str, Any]) -> Path | None:
    """The input file a job's spec names, resolved; None where it names none: a file's is its absolute path, and
    "DataFrame (N rows)", "standard input" or "hf:NAME" (`jobs._describe`) are no file of the folder a command
    runs in (an export named so was refused as "the input file of job ...")."""
    given = spec.get("input")
    path = given.get("path") if isinstance(given, dict) else None
    return Path(path).resolve() if isinstance(path, str) and os.path.isabs(path) else None


def input_file_hint(path: Path, home: str | os.PathLike | None = None) -> str:
    """ ": prompts.csv is the input file of job ID (NAME): give the job's id or name" for a command given the
    file a job was submitted from (`runner status prompts.csv`, as `runner run prompts.csv` took it), which said
    "no job 'prompts.csv'" or, from `runner results`, that it is no Parquet file (pass 235)."""
    if storage.kind(path) != "file":
        return ""
    target = path.resolve()
    root = Path(home) if home is not None else default_home()
    jobs = [(p, spec) for p, spec in _named(root) if input_path(spec) == target]
    if not jobs:
        return ""
    shown = ", ".join(p.name + (f" ({spec['name']})" if isinstance(spec.get("name"), str) else "")
                      for p, spec in jobs[:3]) + (f" and {len(jobs) - 3} more" if len(jobs) > 3 else "")  # fmt: skip
    return (
        f": {path} is the input file of job {shown}: give the job's id or name (`runner status` lists them)"
    )


def job_file_hint(path: Path) -> str:
    """ ": it is a shard of job folder J ..." for a file inside a job's folder given as a results file (a shard, a
    quarantined file, prompts.parquet): read as one, it gave some of the job's rows unverified, or its prompts."""
    what = {SHARDS: "a shard (some of its rows, unverified)", QUARANTINE: "a quarantined file"}
    inside: Path | None = None  # the folder of the job's folder the file is in (None: in it)
    for folder in list(Path(os.path.abspath(path)).parents)[:4]:
        said = (
            what.get(inside.name, "") if inside else "its validated prompts" if path.name == PROMPTS else ""
        )
        if said and _is_job_folder(folder):
            return (f": it is {said} of job folder {folder}: give the folder, or the job's id or name, for its "
                    "results (every verified row, in input order)")  # fmt: skip
        inside = folder
    return ""


def _did_you_mean(text: str, jobs: list[tuple[Path, dict[str, Any]]]) -> str:
    """ "; did you mean 'night1'?" for a mistyped job name or id (`runner status` lists them all)."""
    import difflib

    known = [n for p, spec in jobs for n in (p.name, spec.get("name")) if isinstance(n, str)]
    an_id = JOB_ID.fullmatch(text) is not None
    # (two ids of one second share 16 of their 22 characters: an id is close only when a character or two is off)
    close = difflib.get_close_matches(text, known, n=3, cutoff=0.9 if an_id else 0.75)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    if an_id:  # `runner run -o out/ja` printed "starting job 2026...": it is in out/ja
        return (" (a job made with -o FOLDER is found by its folder: `runner status FOLDER`; `runner status` "
                "lists its jobs)")  # fmt: skip
    return " (`runner status` lists its jobs)"


NAMES = ".names"  # in the home: NAME.N.json, the claims on a job name (jobs._claim_name); the newest holds it


def newest_name_claim(folder: Path, name: str) -> int | None:
    """N of the newest claim NAME.N.json on `name` in the home's .names folder, None when there is none."""
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.json")
    numbers = [int(m.group(1)) for n in storage.listdir(folder) if (m := pattern.fullmatch(n))]
    return max(numbers, default=None)


def _name_holder(root: Path, name: str) -> Path | None:
    """The folder of the job the newest claim on `name` records, when that job is there: a job is found by its
    name even when its job.json (where the name is written too) is damaged, so that repair can mend it."""
    folder = root / NAMES
    if storage.kind(folder) != "dir":
        return None
    newest = newest_name_claim(folder, name)
    path = folder / f"{name}.{newest}.json"
    held = _read_json_or_none(path) if newest is not None and storage.kind(path) == "file" else None
    holder = held.get("job") if isinstance(held, dict) else None
    if not isinstance(holder, str) or not NAME_RE.fullmatch(holder) or not _job_folder_for_now(root / holder):
        return None
    return root / holder


def _job_folder_for_now(p: Path) -> bool:
    """`_is_job_folder`, or a folder whose job.json and backup do not say what they are through the retries (a
    mount failing for now): a job named by its id or name is then found, for its opener to say it does not read,
    as the home's listing shows it (`job_folders`). `runner status ID` failed with "cannot read", and `runner
    watch ID` ended at its first poll, where `runner status` listed the job `unreadable` (pass 269). Looked at
    in one try: the opener reads them through the retries (both waiting, `runner cancel ID` waited twice)."""
    with storage.at_once() as missed:
        try:
            return _is_job_folder(p)
        except storage.StorageError:
            if not missed:  # (denied, damaged: as it is)
                raise
    return storage.kind(p) == "dir"


def _claim_says(root: Path, name: str) -> Path | None:
    """`_name_holder`, or None where the claims do not read (.names failing too: the lookup reads the folders
    that did not read at once, as before, instead of failing)."""
    try:
        return _name_holder(root, name)
    except storage.StorageError:
        return None


def _is_job_folder(p: Path) -> bool:
    """A folder holding job.json or its backup, of any kind (both links or FIFOs: a damaged job, not no job)."""
    return storage.kind(p) == "dir" and (
        storage.kind(p / JOB_FILE) is not None or storage.kind(p / JOB_BACKUP) is not None
    )


def _refuse_if_also_in_home(text: str, path: Path, home: str | os.PathLike | None) -> None:
    """A bare word that is both a job folder here (`runner run -o night1`) and another job's id or name in the
    home: say so rather than pick one."""
    if not NAME_RE.fullmatch(text):
        return
    root = Path(home) if home is not None else default_home()
    try:
        other = _in_home(text, root)
    except RunnerError:
        return
    if other.resolve() != path.resolve():
        raise RunnerError(
            f"{text!r} names both the job folder ./{text} and job {other.name} in {root}: "
            f"say ./{text} for the folder, or the job's id ({other.name})"
        )


def _named(
    root: Path, unread: list[Path] | None = None, folders: list[Path] | None = None
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Each job folder of the home (or of `folders`) with its job.json, or its backup where job.json is damaged
    (the job still holds its name: found by it, it is shown broken and repair mends it). `unread` given: each
    folder is read in one try, and one that failed for now (a mount's transient error) is put in `unread`
    instead of being waited for through the retries."""
    if folders is None:  # (read at once, each folder of the home: a job's has a spec that reads)
        folders = (
            job_folders(root) if unread is None else [root / n for n in scan(root, dirs=True) if n[0] != "."]
        )
    for path in folders:
        if unread is None:
            meta = spec_or_backup(path)
        else:
            with storage.at_once() as missed:
                meta = spec_or_backup(path)
            if missed:
                unread.append(path)
                continue
        if meta is not None:
            yield path, meta


def spec_or_backup(path: Path) -> dict[str, Any] | None:
    """The job folder's job.json as read, else its backup's, else None. Plain files only: one that is a link to
    another job's job.json is not this folder's (a broken job was listed under the other's id; pass 104)."""
    for name in (JOB_FILE, JOB_BACKUP):
        meta = plain_json(path / name)
        if isinstance(meta, dict):
            return meta
    return None


def plain_json(path: Path) -> Any:
    """The JSON of a plain file; None when it is not one (a link, a folder, gone), unreadable or not JSON."""
    try:
        return storage.read_json(path) if storage.kind(path) == "file" else None
    except (RunnerError, ValueError):
        return None


def job_folders(root: str | os.PathLike) -> list[Path]:
    """Folders of the home that look like jobs (hold job.json or its backup), in name (= age) order. Links
    are not followed; temp folders of submits in progress are not jobs."""
    root = Path(root)
    out = []
    for entry in scan(root, dirs=True):
        if entry.startswith("."):
            continue
        p = root / entry
        try:  # (of any kind: a job whose job.json and backup are links or FIFOs is shown broken, not hidden)
            if _is_job_folder(p):
                out.append(p)
        except storage.StorageError:  # unreadable through the retries: its opener says so (pass 89)
            out.append(p)  # (`runner status`: unreadable), not the whole home's listing
    return out


def copies_in_home(jobs: list[Job], folders: list[Path]) -> dict[Path, str]:
    """Of the home's jobs (opened, of its job `folders`), the folders that hold a job another folder holds too
    (a Drive conflict copy `ID (1)`, `cp -r jobs/ID jobs/backup`), with why: the job belongs to the folder
    named by its id, even broken (repair mends it: pass 81), else to the first one by name; the others are
    copies, which `runner work` computed again and `runner status` listed as the same job twice (pass 78)."""
    by_id: dict[str, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.id, []).append(job)
    names = {p.name for p in folders}
    out: dict[Path, str] = {}
    for job_id, same in by_id.items():
        own = job_id if job_id in names else min(j.dir.name for j in same)
        for job in same:
            if job.dir.name != own:
                out[job.dir] = _copy_line(job.dir, own)
    return out


def own_backup(folder: Path) -> dict[str, Any] | None:
    """The job.backup.json of a folder named by a job id, when it is that job's spec (a plain file): what `runner
    repair` restores job.json from when another job's job.json was copied in. None otherwise."""
    backup = plain_json(folder / JOB_BACKUP)
    named = JOB_ID.fullmatch(folder.name) and isinstance(backup, dict) and backup.get("id") == folder.name
    return backup if named else None


def _copy_line(folder: Path, own: str) -> str:
    """Why `folder` is not run: a copy of job `own`'s folder; or, named by a job id its job.backup.json holds,
    a folder of that job into which `own`'s job.json was copied (deleting it would lose its rows; pass 104)."""
    name = folder.name
    if own_backup(folder) is not None:
        return (f"job {name}'s job.json is job {own}'s (copied in); its own is in job.backup.json: "
                f"`runner repair {shlex.quote(str(folder))}` restores it")  # fmt: skip
    return (f"{name}/ is a copy of the folder {own}/ (the same job): move it out of the job home, or delete it, "
            "so that no worker computes the job twice")  # fmt: skip


def is_copy_in_home(job: Job) -> bool:
    """Whether `job`'s folder is a copy (`copies_in_home`) of the home's folder named by its id."""
    return job.dir.name != job.id and _is_job_folder(job.dir.parent / job.id)


class CopyInHome(BrokenJob):
    """A job folder that is a copy of the home's folder named by its job's id (`copy_in_home`)."""


def copy_in_home(job: Job) -> str | None:
    """Why `job`'s folder, named by its path or folder name (`runner status jobs/backup`, `runner work --job
    backup`), is not to be run: a copy of the folder named by its id beside it (`copies_in_home`), else None.
    The home's listings found such copies; a job named alone was run in its copy (pass 87)."""
    return _copy_line(job.dir, job.id) if is_copy_in_home(job) else None


def linked_entries(root: str | os.PathLike) -> list[str]:
    """Names of symbolic links in the home: never followed, reported by status."""
    root = Path(root)

    def op() -> list[str]:
        try:
            with os.scandir(root) as it:
                return sorted(e.name for e in it if e.is_symlink() and not e.name.startswith("."))
        except FileNotFoundError:
            return []

    return storage.retry(op, f"list {root}")


def _lexists(p: Path) -> bool:
    """A file or folder is there, and is not a link (transient errors retried, never "absent")."""
    return storage.kind(p) in ("file", "dir")


def _is_link(p: Path) -> bool:
    return storage.kind(p) == "link"


def scan(folder: Path, dirs: bool = False) -> list[str]:
    """Names of the plain files (or folders, with `dirs`) in `folder`, sorted; links are skipped, a missing
    folder is empty. Transient errors are retried, others raise StorageError (never "empty")."""

    def op() -> list[str]:
        try:
            with os.scandir(folder) as it:
                return sorted(
                    e.name for e in it
                    if not e.is_symlink() and (e.is_dir(follow_symlinks=False) if dirs else e.is_file(follow_symlinks=False))
                )  # fmt: skip
        except FileNotFoundError as e:
            storage.listed_missing(folder, e)
            return []

    return storage.retry(op, f"list {folder}")


# --- this process, as an owner of claims ----------------------------------------------------------------


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), to tell it from a later one with its pid; None
    where /proc does not tell (no such process, or a /proc of another PID namespace: `_proc_is_ours`)."""
    if not _proc_is_ours():
        return None
    try:
        return _stat_start(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def _proc_is_ours() -> bool:
    """/proc shows this process's PID namespace: /proc/self is its own pid. Under `unshare --pid --fork` without
    --mount-proc (or a /proc of another namespace mounted in) /proc/PID is another process than pid PID is to
    kill(): a live worker whose pid there was a zombie (or a later process) was provably dead."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` on this machine (/proc/PID/stat: "R", "S", "T" stopped...); None where
    /proc does not tell (no such process, no /proc, or a /proc of another PID namespace: `_proc_is_ours`)."""
    if not _proc_is_ours():
        return None
    try:
        return _stat_state(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


# the /proc states of a process that has ended: a zombie (its parent has not waited for it yet), dead
ENDED = ("Z", "X", "x")


def _threads_ended(pid: int) -> bool:
    """Whether process `pid` of this machine, its group leader (main thread) ended (`ENDED`), ended as a whole:
    not where only its main thread ended, others running on (the leader is a zombie then too, with other tasks)."""
    try:
        return os.listdir(f"/proc/{pid}/task") in ([], [str(pid)])
    except (FileNotFoundError, ProcessLookupError):
        return True  # reaped meanwhile
    except OSError:
        # (EIO, EACCES: its threads unknown, a writer thread may be mid-shard; it was taken as reaped)
        return False


def _stat_state(stat: str) -> str | None:
    """The state letter of a /proc/PID/stat text (after the command name, which may hold spaces)."""
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state[0] if state else None


def _stat_start(stat: str) -> str | None:
    """The start time field of a /proc/PID/stat text (after the command name, which may hold spaces)."""
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


# the largest pid a process can have (Linux's PID_MAX_LIMIT, 2**22)
MAX_PID = 1 << 22


def _pid_of(value: Any) -> int:
    """A recorded pid; 0 (nothing can be proved of it) for one no process can have. A digit of a pid flipped to an
    'e' still parses (12345 -> 1e345, infinite: int() raised OverflowError; 6626 -> 6e26: os.kill did), and every
    `runner work`, `runner status` of the job, or submit in the home stopped on a traceback (adversarial pass 187)."""
    try:
        pid = int(value)
    except OverflowError:
        return 0
    return pid if 0 <= pid <= MAX_PID else 0


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: enough to decide whether it can still be alive."""

    worker: str
    host: str
    pid: int
    boot: str | None
    pidns: str | None
    start: str | None

    @classmethod
    def me(cls, worker: str | None = None) -> Owner:
        pid = os.getpid()
        host = socket.gethostname()
        worker = worker or new_worker_id()
        return cls(worker, host, pid, storage.boot_id(), storage.pid_namespace(), _pid_start(pid))

    def as_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "host": self.host, "pid": self.pid, "boot": self.boot,
                "pidns": self.pidns, "start": self.start}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> Owner | None:
        """The owner a claim, heartbeat or record names; None when it is damaged (no worker, a pid not a number)."""
        try:
            return cls(str(d["worker"]), str(d.get("host", "")), _pid_of(d.get("pid", 0)), d.get("boot"),
                       d.get("pidns"), d.get("start"))  # fmt: skip
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def _on_this_machine(self) -> bool:
        """The same boot and PID namespace as this process: its pid means the same process here."""
        return (
            bool(self.boot)
            and self.boot == storage.boot_id()
            and bool(self.pidns)
            and self.pidns == storage.pid_namespace()
            and self.pid > 0
        )

    def provably_dead(self) -> bool:
        """True only when the owner shares this machine's boot and PID namespace and its process is gone
        (or its pid now belongs to a later process, or it ended and waits for its parent to reap it: a zombie).
        Anywhere else only the heartbeat can tell."""
        if not self._on_this_machine():
            return False
        if not storage.pid_exists(self.pid):
            return True
        if self.start is not None and _pid_start(self.pid) not in (None, self.start):
            return True
        return self._ended_here()

    def _ended_here(self) -> bool:
        """The owner's process on this machine ended and is not reaped yet (a zombie: a worker killed -9 whose
        parent, `runner work --workers N` or a notebook, has not waited for it; its lease held its units and it
        showed as running until the lease ran out). Not where only its main thread ended, others running on
        (the group's leader is a zombie then too, with other tasks)."""
        return self._state_here() in ENDED and _threads_ended(self.pid)

    def is_this_process(self) -> bool:
        """This very process (same machine, pid and start time): a notebook kernel that ran an earlier call."""
        return (
            self._on_this_machine()
            and self.pid == os.getpid()
            and self.start is not None
            and self.start == _pid_start(self.pid)
        )

    def provably_stopped(self) -> bool:
        """True only when the owner's process is on this machine now and stopped by a signal (SIGSTOP, SIGTSTP:
        frozen, it goes on once continued), or by its tracer (`traced`). A process that runs but whose heartbeat
        ended (hung) is not. Anywhere else only the heartbeat can tell."""
        return self._state_here() in ("T", "t")

    def traced(self) -> bool:
        """True only when the owner's process is on this machine now and stopped by the debugger or tracer
        attached to it (strace, gdb: /proc's "t"): it goes on when that continues it or lets it go; a SIGCONT
        of anyone else's does nothing for it."""
        return self._state_here() == "t"

    def provably_running(self) -> bool:
        """True only when the owner's process is on this machine now, neither stopped nor ended: it runs, or
        waits on something (a heartbeat may yet come from it)."""
        return self._state_here() not in (None, "T", "t", "Z", "X", "x")

    def _state_here(self) -> str | None:
        """The state letter of the owner's process (/proc/PID/stat) when it is on this machine now: the same
        boot, PID namespace, pid and start time; None anywhere else."""
        if not self._on_this_machine() or self.start is None or not _proc_is_ours():
            return None
        try:
            text = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        return _stat_state(text) if _stat_start(text) == self.start else None


def new_worker_id() -> str:
    return f"{host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"


def host_tag() -> str:
    """This host's name as worker ids carry it (their first part)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


# --- the spec ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """job.json, parsed and checked once."""

    id: str
    name: str | None
    kind: str
    model: str
    params: Any  # GenerationParams, ScoreParams or EmbedParams
    options: EngineOptions
    seed: int
    rows: int
    samples: int
    unit_rows: int
    priority: int
    created: str
    prompts_sha256: str | None
    meta: dict[str, Any] = field(repr=False, compare=False)

    @property
    def total(self) -> int:
        """Result rows the job has when done: each prompt's samples, summed."""
        return int(self.meta.get("results") or self.rows * self.samples)

    @property
    def revision(self) -> str | None:
        """The hub snapshot (commit) the job was submitted on and runs on: None for a folder, a GGUF file, the
        demo model, and jobs submitted before 2026-12-07 (then the model's newest, checked by its fingerprint)."""
        return self.meta.get("model_revision")

    @property
    def count_noun(self) -> str:
        """What progress counts: "rows", or "results" where rows have several samples (`-n`), one result each."""
        return "rows" if self.total == self.rows else "results"

    @property
    def per_row_n(self) -> bool:
        """Some row asks for its own number of samples: (row, sample) keys past a row's n do not exist."""
        return bool(self.meta.get("per_row_n"))

    @property
    def units(self) -> int:
        return -(-self.rows // self.unit_rows)

    def unit_rows_range(self, unit: int) -> range:
        return range(unit * self.unit_rows, min(self.rows, (unit + 1) * self.unit_rows))

    @classmethod
    def parse(cls, meta: Any) -> JobSpec:
        if not isinstance(meta, dict):
            raise BrokenJob("job.json is not a JSON object")
        if _unchecked_early(meta):
            raise BrokenJob("job.json has no checksum: a runner of 2026-11-30 wrote it, before job.json had one; "
                            "`runner repair` adds it where job.backup.json holds the same")  # fmt: skip
        if meta.get("spec_sha256") != spec_checksum(meta):
            raise BrokenJob("job.json does not match its checksum (damaged or edited); `runner repair` restores it "
                            "from job.backup.json")  # fmt: skip
        try:
            fmt = meta["format"]
            if fmt not in READABLE_FORMATS:
                raise _unreadable_format(fmt)
            kind = meta["kind"]
            if kind not in KINDS:
                raise BrokenJob(f"job.json: unknown kind {kind!r}")
            raw = meta["params"]
            params = GenerationParams.from_dict(raw) if kind == "generate" else KINDS[kind](**raw)
            options = EngineOptions(**meta["engine"])
            rows = int(meta["input"]["rows"])
            samples = int(meta.get("samples") or (params.num_return_sequences if kind == "generate" else 1))
            unit_rows = int(meta["unit_rows"])
            if rows < 1 or unit_rows < 1:
                raise BrokenJob("job.json: rows and unit_rows must be >= 1")
            check_name(str(meta["id"]))
            _check_revision(meta.get("model_revision"))
            return cls(
                id=str(meta["id"]), name=meta.get("name"), kind=kind, model=str(meta["model"]), params=params,
                options=options, seed=int(meta["seed"]), rows=rows, samples=samples, unit_rows=unit_rows,
                priority=int(meta.get("priority", 0)), created=str(meta.get("created", "")),
                prompts_sha256=meta.get("prompts_sha256"), meta=meta,
            )  # fmt: skip
        except BrokenJob:
            raise
        except (KeyError, TypeError, ValueError, RunnerError) as e:
            raise BrokenJob(f"job.json is invalid ({_said(e)})") from None


def _check_revision(revision: Any) -> None:
    """A pinned hub snapshot is a commit id: 40 hexadecimal digits (or none)."""
    if revision is not None and not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
        raise BrokenJob(f"job.json: model_revision must be a commit id (40 hex digits), not {revision!r}")


def _said(e: Exception) -> str:
    """What is wrong with a record that is JSON but not what it should be, in words, not Python's (it said
    "KeyError: 'state'"; campaign pass 110)."""
    if isinstance(e, KeyError):
        return f"it has no {e.args[0]!r} field"
    if isinstance(e, (TypeError, AttributeError)):
        return f"a field is of the wrong kind: {e}"
    return str(e)


def _json_kind(value: Any) -> str:
    """`{}`-less JSON said as what it is: "null", "a list", "a string"..."""
    kinds = {type(None): "null", list: "a list", str: "a string", bool: "true or false", int: "a number",
             float: "a number"}  # fmt: skip
    return kinds.get(type(value), type(value).__name__)


def _unreadable_format(fmt: Any) -> BrokenJob:
    versions = f"versions {READABLE_FORMATS[0]}-{READABLE_FORMATS[-1]}"
    # a newer runner made it (another VM with a newer install)
    if type(fmt) is int and fmt > READABLE_FORMATS[-1]:
        return BrokenJob(f"job.json has layout version {fmt}, newer than this runner reads ({versions}): install "
                         "the newer runner here too", repairable=False)  # fmt: skip
    return BrokenJob(f"job.json has layout version {fmt!r}; this runner reads {versions} (submit the file again)",
                     repairable=False)  # fmt: skip


def _unchecked_early(meta: dict[str, Any]) -> bool:
    """Whether job.json is one of the first runner's (layout 2, 2026-11-30, before ece6cf9): no checksum at all.
    Its results read as any job's once `runner repair` adds the checksum (`_checked_early_spec`); they were out
    of reach, the job shown broken as damaged (adversarial pass 250, a real ba61c53 job)."""
    return meta.get("format") == 2 and "spec_sha256" not in meta


def spec_checksum(meta: dict[str, Any]) -> str:
    """sha256 of job.json's content (all but this field), so that a changed byte is noticed, not obeyed."""
    return storage.json_checksum(meta, "spec_sha256")


# --- states ------------------------------------------------------------------------------------------------


class JobState(str, Enum):
    """The states a job shows. Stored in state records: queued, cancelled, completed, failed. Derived: running
    (a live worker holds a unit), broken (its metadata cannot be read)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BROKEN = "broken"

    def __str__(self) -> str:
        return self.value


STORED_STATES = (JobState.QUEUED, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class StateRecord:
    state: JobState = JobState.QUEUED
    generation: int = 0  # bumped by `retry`: row errors committed under older generations no longer count
    error: str | None = None
    updated: float = 0.0
    seq: int = 0  # its place in the job's state records (state/SEQ.json); 0: none yet (or the legacy files)
    by: str | None = None  # who recorded it: cancel, retry, repair, a worker ("completed", "failed")
    writer: str | None = None  # its writer's token: the record after it names the one it was decided over
    # a repair's record decided over the record below it, found empty or damaged (it names none it was over)
    blind: bool = False
    transit: bool = False  # read where an adopter set it aside (`_in_transit`), not at its name
    # the writer of the record it was decided over (None: not said, or a blind repair's)
    over: str | None = None

    def __getitem__(self, key: str) -> Any:  # record["state"], as the JSON reads
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "generation": self.generation, "error": self.error,
                "updated": self.updated}  # fmt: skip


def record_name(seq: int) -> str:
    return f"{seq:08d}.json"


def read_state(job_dir: Path, job_id: str | None = None) -> StateRecord:
    """The job's state: its newest state record, state/SEQ.json (unreadable, invalid or empty: BrokenJob, never
    an older record's guess); with none, what a job of an older runner version stored (`_legacy_state`; none:
    queued). With `job_id`, a newest record written for another job is ForeignRecord."""
    job_dir = Path(job_dir)
    for pause in [*GONE_PAUSES, None]:
        names = _state_names(job_dir)
        seqs = _record_seqs(job_dir, names)
        try:
            newest = _read_record(job_dir, seqs[-1]) if seqs else _legacy_state(job_dir)
            transit = _in_transit(job_dir, newest.seq + 1, newest.writer, names)
            if transit is not None:
                newest = _parse_state(json.loads(transit), record_name(newest.seq + 1), newest.seq + 1)
                newest = replace(newest, transit=True)
            return _late_word_stands(job_dir, _own_record(newest, job_id))
        except _RecordGone as e:
            if pause is None:
                raise BrokenJob(str(e)) from None
            time.sleep(pause)  # listed, then gone: an adopter has it aside for a moment (`_adopt_unfilled`)
    raise AssertionError("unreachable")


def _late_word_stands(job_dir: Path, newest: StateRecord) -> StateRecord:
    """The job's state when its newest record is a repair's decided blind over the one below it (found empty:
    where links are missing, its writer, a `cancel` on a slow mount, had created it and not yet filled it): once
    that record reads, its word stands, as `_late_word` records it; and so it does here too, for a repair killed
    before it could record it (pass 73: the cancel had said "cancelled", and the job then ran to the end).
    A worker's outcome decided over such a record reads so too (`_outcome_over_blind`)."""
    if not newest.blind:
        return _outcome_over_blind(job_dir, newest)
    try:  # (itself a blind repair's record, filled late: the word below it, and so on; pass 76)
        late = _late_word_stands(job_dir, _filled_or_aside(job_dir, newest.seq - 1))
    except BrokenJob:  # still empty, or damaged: nobody's word
        return newest
    if late.writer is None or late.state is JobState.COMPLETED:  # (a completion stands only while complete)
        return newest
    return replace(  # (transit: a word read aside, which a repair records again: pass 91)
        newest, state=late.state, generation=max(late.generation, newest.generation), error=late.error,
        transit=newest.transit or late.transit,
    )  # fmt: skip


def _outcome_over_blind(job_dir: Path, newest: StateRecord) -> StateRecord:
    """The job's state when its newest record is a worker's completion or failure decided over a repair's blind
    record: the worker read the state while the record below that was still empty (no hard links: a `cancel` or
    `retry` between its create and its fill), so once that record reads, its word stands over the outcome too,
    whenever it was filled. The worker looks below after recording (`_late_word_since`), but a cancel filled
    between the two, or a worker killed between them, left the outcome standing: the cancel had said
    "already completed" and the job ended cancelled, or it had said "cancelled" and the job read completed for
    good (adversarial pass 136)."""
    if newest.by not in ("completed", "failed") or newest.over is None or newest.seq < 3:
        return newest
    try:
        below = _read_record(job_dir, newest.seq - 1, wait=False)
    except BrokenJob:  # (damaged, or being written over: what reads below it is said elsewhere)
        return newest
    late = _late_word_stands(job_dir, below) if below.blind and below.writer == newest.over else below
    if late is below:  # no late word below the blind record (or none is blind): the outcome stands
        return newest
    return replace(newest, state=late.state, generation=max(late.generation, newest.generation),
                   error=late.error, transit=newest.transit or late.transit)  # fmt: skip


# Pauses before listing state/ again when its newest record went between the listing and the read
GONE_PAUSES = (0.05, 0.2, 1.0)


class _RecordGone(BrokenJob):
    """A state record listed and then gone: set aside by an adopter (where links are not supported) or deleted."""


def newest_state_seq(job_dir: Path) -> int:
    """The place of the job's newest state record (whatever it holds), 0 when it has none."""
    seqs = _record_seqs(Path(job_dir))
    return seqs[-1] if seqs else 0


def _record_seqs(job_dir: Path, names: list[str] | None = None) -> list[int]:
    names = _state_names(job_dir) if names is None else names
    return sorted(int(m.group(1)) for n in names if (m := _RECORD.match(n)))


def _state_names(job_dir: Path) -> list[str]:
    folder = job_dir / STATES

    def names() -> list[str]:
        try:
            return os.listdir(folder)
        except FileNotFoundError as e:
            storage.listed_missing(folder, e)
            return []  # a job of an older version (or one whose records were all lost)
        except NotADirectoryError:
            raise BrokenJob(f"{STATES}/ is not a folder") from None

    return storage.retry(names, f"list {folder}")


def _in_transit(job_dir: Path, seq: int, over: str | None, names: list[str] | None = None) -> bytes | None:
    """A whole record for `seq`, decided over the record whose writer is `over`, found only where an adopter
    set it aside (`_adopt_unfilled`, without hard links) while nothing is at its own name: the adopter was
    killed (or is slow) before putting it back, and its writer may have read it back at its name and said done
    (pass 61: a cancel, then lost). Its bytes; it stands as if at its name: readers read it there, the next
    writer puts it back first, and so does the temp files' sweep."""
    # (or a repair's decided blind over the record below, found empty: it names none; pass 83)
    found = (data for data, d in _set_aside(job_dir, seq, names) if d["over"] == over or _blind(d, seq))
    return next(found, None)


def _blind(d: dict[str, Any], seq: int) -> bool:
    """Whether the record at `seq` (its JSON) is a repair's decided blind over the one below (StateRecord.blind)."""
    return d.get("by") == "repair" and "over" in d and d["over"] is None and seq >= 2


def _set_aside(
    job_dir: Path, seq: int, names: list[str] | None = None, under_empty: bool = False
) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """The whole records for `seq` (bytes, JSON) an adopter set aside, while nothing is at its own name (with
    `under_empty`: or an empty file, `_filled_or_aside`)."""
    folder = job_dir / STATES
    prefix = f".{record_name(seq)}.{ASIDE}"
    temps = [n for n in (_state_names(job_dir) if names is None else names) if n.startswith(prefix)]
    if not temps or (
        _lexists(folder / record_name(seq)) and not (under_empty and _empty(folder / record_name(seq)))
    ):
        return
    for name in sorted(temps):
        if not storage.is_temp_name(name) or storage.kind(folder / name) != "file":
            continue  # (a link there is no record an adopter set aside: `repair` moves it out, pass 87)
        try:
            data = storage.read_bytes(folder / name)
            d = json.loads(data)
        except ValueError:  # (being written, or torn: its writer was killed before it read it back whole)
            continue
        except storage.StorageError as e:
            if isinstance(e.__cause__, (FileNotFoundError, IsADirectoryError)):
                continue  # put back (or swept) since the listing
            raise
        # (a fill ends with the JSON's last byte: a whole record that fails its check is damaged)
        if (why := _aside_damage(d)) is not None:
            raise BrokenJob(f"{STATES}/{name}, a state record set aside while it was being read (no hard links), "
                            f"is damaged ({why})")  # fmt: skip
        yield data, d


def _aside_damage(d: Any) -> str | None:
    """Why a record set aside (whole JSON) is not what its writer wrote, else None: a flipped byte there was
    read as a torn leftover, and a reported cancel in transit was lost without a word (pass 87)."""
    if not isinstance(d, dict) or not {"check", "over"} <= set(d) or not isinstance(d.get("writer"), str):
        return "it is not a whole state record"
    return _record_damage(d)


def _quarantine_damaged_asides(job: Job) -> str | None:
    """`repair`: the damaged records set aside (`_aside_damage`) moved into quarantine/, said in the job's log;
    the command the last of them says wrote it ("cancel", "retry"; "" when it does not say)."""
    said = None
    for name in scan(job.dir / STATES):
        if not (name.startswith(".") and f".{ASIDE}" in name and storage.is_temp_name(name)):
            continue
        try:
            d = json.loads(storage.read_bytes(job.dir / STATES / name))
        except (ValueError, storage.StorageError):  # torn, or gone: not a record anyone read back whole
            continue
        if (why := _aside_damage(d)) is None:
            continue
        move_aside(job.dir, f"{STATES}/{name}")
        job.log(f"repair: {STATES}/{name}, a state record in transit, is damaged ({why}); set aside in "
                f"{QUARANTINE}/")  # fmt: skip
        by = d.get("by") if isinstance(d, dict) else None
        said = by if by in ("cancel", "retry") else ""
    return said


def _quarantine_foreign_records(job: Job) -> list[str]:
    """`repair`: the state records written for another job (copied in from its folder: `record_job`) moved into
    quarantine/, said in the job's log; their names. What the job's own record at such a name said is lost."""
    moved = []
    for seq in _record_seqs(job.dir):
        try:
            other = record_job(_read_record(job.dir, seq, wait=False))
        except BrokenJob:  # damaged, empty or not a file: the state repair decides over it
            continue
        if other not in (None, job.id):
            name = f"{STATES}/{record_name(seq)}"
            move_aside(job.dir, name)
            job.log(f"repair: {name} was written for job {other} (copied in?); set aside in {QUARANTINE}/")
            moved.append(name)
    return moved


def _quarantine_unread_records(job: Job) -> list[str]:
    """`repair`: the state records below the newest that do not read through the retries (a file Drive cannot serve
    for hours: each reader checks the newest against the one below, so the job did not read) moved into quarantine/,
    said in the job's log; their names. Their word never counts (the newest's does), and a job whose records below
    are gone reads as one whose records below are damaged does. The newest must read (else nothing is moved: the
    home may not read now), and is never moved (the state would roll back to the record below it); nor is one whose
    word may stand over the records above it (`_late_word_stands`): one right below a repair's blind record or a
    worker's outcome, or one above it that does not read whole."""
    seqs = _record_seqs(job.dir)
    unread = []
    for seq in seqs[:-1]:
        try:
            storage.read_bytes(job.dir / STATES / record_name(seq))
        except storage.StorageError as e:
            if e.unreadable_for_now and _word_superseded(job.dir, seq):
                unread.append((seq, first_line(e)))
    if unread:
        storage.read_bytes(job.dir / STATES / record_name(seqs[-1]))
    moved = []
    for seq, why in unread:
        name = f"{STATES}/{record_name(seq)}"
        move_aside(job.dir, name)
        job.log(
            f"repair: {name}, below the newest state record, did not read ({why}); set aside in {QUARANTINE}/"
        )
        moved.append(name)
    return moved


def _word_superseded(job_dir: Path, seq: int) -> bool:
    """Whether the record at `seq + 1` reads whole and the word at `seq` cannot stand over it (`_late_word_stands`):
    it is neither a repair's blind record nor a worker's outcome."""
    try:
        above = _whole_at(job_dir, seq + 1)
    except storage.StorageError:
        return False
    return above is not None and not _blind(above, seq + 1) and above.get("by") not in ("completed", "failed")


def _empty(path: Path) -> bool:
    try:
        return storage.kind(path) == "file" and not storage.read_bytes(path)
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return False
        raise


def _filled_or_aside(job_dir: Path, seq: int) -> StateRecord:
    """The record at `seq` (not waited for), or, where it is empty, the whole record an adopter had set aside
    for that place, decided over the record below: its put-back (a create, then a fill: no hard links) was
    killed between the two, after its writer had read it back and said done (pass 87: a cancel, then lost to a
    repair that recorded queued over the empty record). Read where a repair decided blind over `seq`
    (`_late_word_stands`, `_late_word`): that word stands as if it had been filled late."""
    try:
        return _read_record(job_dir, seq, wait=False)
    except BrokenJob:
        if seq < 1 or not _empty(job_dir / STATES / record_name(seq)):
            raise
        try:
            below = _read_record(job_dir, seq - 1, wait=False) if seq > 1 else _legacy_state(job_dir)
        except BrokenJob:
            below = None
        found = [(data, d) for data, d in _set_aside(job_dir, seq, under_empty=True)
                 if below is not None and d["over"] == below.writer]  # fmt: skip
        if not found:
            raise
        return replace(_parse_state(found[0][1], record_name(seq), seq), transit=True)


def _put_back(job_dir: Path, seq: int, data: bytes) -> None:
    """A record in transit (`_in_transit`) created at its own name, byte for byte (its writer reads it back
    there), unless a record is there by now."""
    create_exclusive_bytes(job_dir / STATES / record_name(seq), data)


def _torn_record(data: bytes) -> bool:
    """Whether a state record's bytes, not empty (an empty one is waited for: `_read_record`), are no whole
    record: read once more before they are taken for damage (a torn read with a changed byte made the job broken
    at that look, and `runner repair` recorded a state over the sound record)."""
    try:
        return bool(data) and _record_damage(json.loads(data)) is not None
    except ValueError:
        return bool(data)


# Pauses before reading again a state record found empty or unreadable (`_read_record`)
REREAD_PAUSES = (0.05, 0.2)


def _read_record(job_dir: Path, seq: int, wait: bool = True) -> StateRecord:
    """The record at `seq`. `wait`: one found empty or unreadable is read again a moment later first (where
    links are not supported its content follows its creation)."""
    name = f"{STATES}/{record_name(seq)}"
    path = job_dir / name
    what = storage.kind(path)
    if what is None:
        raise _RecordGone(f"{name} is not a file (it went while being read)")
    if what != "file":
        raise BrokenJob(f"{name} is not a file")
    pauses = list(REREAD_PAUSES) if wait else []
    while True:
        try:
            data = read_again_if_damaged(lambda: storage.read_bytes(path), _torn_record)
        except storage.StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                raise _RecordGone(f"{name} is not a file (it went while being read)") from None
            raise
        try:
            if not data:
                raise ValueError("it is empty: a change killed half way, or damage")
            d = storage.json_of_bytes(data)
            if (why := _record_damage(d) or _copy_damage(job_dir, seq, d)) is not None:
                raise BrokenJob(f"{name} is damaged ({why})")
            return _parse_state(d, name, seq)
        except ValueError as e:  # not BrokenJob (content of the wrong shape): that is never read again
            if not pauses:
                # without links (or none known: the probe could not tell) an empty record may be on its way
                made = _made_at(path) if not data and links_supported(path.parent) is not True else None
                raise BrokenJob(f"{name} is damaged ({e})", since=made) from None
        time.sleep(pauses.pop(0))


def _made_at(path: Path) -> float:
    """When a file was made, as its mtime says, never later than now or than this process first saw it (another
    machine's clock may run ahead: a record dated in the future counted as new at every look, and never waited
    out; pass 67). Dated past now + STATE_PATIENCE_SECONDS, its date is not believed: as old as the patience.
    A transient error in that look is retried, then raises: read as "made now", a record a command killed half
    way long ago passed for one being written (adversarial pass 198: `runner cancel` said to try again in a
    moment, `runner status` and an export read the state below it as standing, not the job broken)."""
    now = time.time()
    st = _lstat_or_none(path)
    # (gone since it was read)
    if st is None:
        return now
    if st.st_mtime > now + STATE_PATIENCE_SECONDS:
        return now - STATE_PATIENCE_SECONDS - 1
    first = _FIRST_SEEN.setdefault((os.fspath(path), st.st_ino, st.st_mtime_ns), now)
    return min(now, st.st_mtime, first)


# (record, inode, mtime) -> when this process first saw it
_FIRST_SEEN: dict[tuple[str, int, int], float] = {}


# every field a state record has; `check` (its checksum) is absent from the records of an earlier runner
RECORD_FIELDS = frozenset(("state", "generation", "error", "updated", "by", "writer", "over", "check"))


def _record_damage(d: Any) -> str | None:
    """Why a state record's JSON is not what its writer wrote (a flipped byte that left it valid JSON: a retry's
    generation changed, a cancel turned into a queued...), else None."""
    if not isinstance(d, dict):
        return None  # _parse_state says what is wrong with it
    if not set(d) <= RECORD_FIELDS:
        return "it has fields no state record has"
    if storage.fails_its_check(d):
        return "it does not match its checksum"
    return None


def _copy_damage(job_dir: Path, seq: int, d: Any) -> str | None:
    """Why a state record's JSON (whole, passing its check) is not what a writer recorded at `seq`, else None: a
    copy of another of the job's records (a sync conflict, a restore from an old backup, a `cp`), which read as
    the state it copies, a `cancel` undone without a word (adversarial pass 245). A writer's token is new for each
    record, and each record names the one below it (`over`): a copy has the token of the nearest record below
    that reads whole, or of the one that record was decided over, or names another record than the one right
    below it, which itself reads sound (one replaced below a sound record is the damaged one). Nothing is said
    where no record below reads whole, or the nearest is another job's (`record_job`) or an earlier runner's."""
    if not isinstance(d, dict) or "over" not in d or not isinstance(writer := d.get("writer"), str):
        return None
    at, below = _whole_below(job_dir, seq)
    theirs = below.get("writer") if below is not None else None
    # (one of another job's, or of an earlier runner's: `_own_record` says the first, the second names none)
    if not isinstance(theirs, str) or writer.rpartition(":")[0] != theirs.rpartition(":")[0]:
        return None
    under = f"{STATES}/{record_name(at)}"
    if writer == theirs:
        why = f"a copy of {under}, whose writer token it has"
    elif writer == below.get("over"):
        why = f"a copy of an older record: its writer wrote the record {under} was decided over"
    # (decided over another record than the one right below, itself sound: one replaced below is the damaged one;
    # and over an older one of the job's, or none: a copy of one of those, `_names_older`)
    elif (
        at == seq - 1
        and d["over"] != theirs
        and not _blind(d, seq)
        and not _copy_damage(job_dir, at, below)
        and _names_older(job_dir, at, d["over"], writer)
    ):
        why = f"it was not decided over {under}, the record below it, as if copied from an older one"
    else:
        return None
    return f"{why}; a sync conflict, or an old backup restored?"


def _names_older(job_dir: Path, at: int, over: str | None, writer: str) -> bool:
    """Whether a record above `at` not decided over it was decided over none, or over a record of the job below
    `at` (one has `over` as its writer, or was decided over it too): a copy of an older record. Over a token no
    record has, it was decided over a record taken back from `at` after it read whole there (a fill whose flush
    failed for good, `_withdraw`; a mount that lost the file), and the record now at `at` came later to the freed
    name, passed over: its writer decided again (adversarial pass 246: a `retry` recorded over a `cancel` whose
    flush then failed made the job broken, its workers stopped). Records are written once: the answer is kept
    for the process."""
    if over is None:
        return True
    key = (os.fspath(job_dir), at, over, writer)
    if key not in _NAMED_BELOW:
        older = (_whole_at(job_dir, n) for n in reversed(_record_seqs(job_dir)) if n <= at)
        _NAMED_BELOW[key] = any(d is not None and over in (d.get("over"), d.get("writer")) for d in older)
    return _NAMED_BELOW[key]


# (job folder, place, token named, writer token) -> whether a record at or below that place names it (`_names_older`)
_NAMED_BELOW: dict[tuple[str, int, str, str], bool] = {}


def _whole_below(job_dir: Path, seq: int) -> tuple[int, dict[str, Any] | None]:
    """The nearest state record below `seq` that reads whole (`_whole_at`): (its place, its JSON); (0, None) where
    none does. The one right below is looked at first; the others only where it does not, from a listing."""
    if seq > 1 and (d := _whole_at(job_dir, seq - 1)) is not None:
        return seq - 1, d
    for at in reversed(_record_seqs(job_dir) if seq > 2 else []):
        if at < seq - 1 and (d := _whole_at(job_dir, at)) is not None:
            return at, d
    return 0, None


def _whole_at(job_dir: Path, seq: int) -> dict[str, Any] | None:
    """The JSON of the state record at `seq` where it is a file that reads whole and passes its check; else None
    (missing, not a file, empty, torn, damaged). Transient errors are retried, then raise."""
    path = job_dir / STATES / record_name(seq)
    d = _read_json_or_none(path) if storage.kind(path) == "file" else None
    return d if isinstance(d, dict) and _record_damage(d) is None else None


def _parse_state(d: Any, name: str, seq: int) -> StateRecord:
    if not isinstance(d, dict):
        raise BrokenJob(f"{name} is invalid (not a state record: {_json_kind(d)})")
    try:
        if d["state"] not in {s.value for s in JobState}:
            raise ValueError(f"state {d['state']!r} is no job state")
        state = JobState(d["state"])
        if state not in STORED_STATES:
            raise ValueError(f"state {state.value!r} is never stored")
        gen = d.get("generation", 0)
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
            raise ValueError(f"generation {gen!r} is not a count")
        error, by, writer = d.get("error"), d.get("by"), d.get("writer")
        blind = _blind(d, seq)
        over = d.get("over")
        return StateRecord(state, gen, error if isinstance(error, str) else None, float(d.get("updated", 0)), seq,
                           by if isinstance(by, str) else None, writer if isinstance(writer, str) else None,
                           blind, over=over if isinstance(over, str) else None)  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BrokenJob(f"{name} is invalid ({_said(e)})") from None


def record_state(job_dir: Path, read: StateRecord, new: StateRecord, by: str) -> StateRecord | None:
    """Record `new` as the job's next state over `read`, the state its writer decided from: one exclusive
    create of state/SEQ.json with SEQ = read.seq + 1, whole or not at all (a kill at any instant leaves the old
    state or the new one). Returns None when another writer recorded that place first: the state moved on
    since `read`, and the caller reads it again and decides again. So a writer that read an older state never
    writes over a newer one, however long it slept in between (a worker's completion over a `retry`, a
    repair over a `cancel`). Each record names the one it was decided over (`over`: its writer's token)."""
    folder = Path(job_dir) / STATES
    if read.seq == 0:
        _fence_older_runners(Path(job_dir))
    storage.ensure_dir(folder)
    seq, token, now = read.seq + 1, _writer_token(Path(job_dir)), time.time()
    path = folder / record_name(seq)
    if not _stands_at_its_name(Path(job_dir), read.seq, read.writer, read.transit):
        return None  # decided over a record in transit, whose place another record took meanwhile
    transit = _in_transit(Path(job_dir), seq, read.writer)
    if transit is not None:  # another writer's, decided over the same record: it came first
        _put_back(Path(job_dir), seq, transit)
        return None
    body = {**new.as_dict(), "updated": now, "by": by, "writer": token, "over": read.writer}
    body["check"] = storage.json_checksum(body)
    # (not created: a transient error after the create landed, where the retry finds it ours; or, without
    # links, an adopter set ours aside after we read it back, and was killed: ours, in transit, stands)
    if not create_exclusive(path, body) and not _stands_at_its_name(Path(job_dir), seq, token, True):
        return None
    if _passed_over(folder, seq, token) and not _stands_over_blind(Path(job_dir), seq, new):
        return None
    ours = replace(new, updated=now, seq=seq, by=by, writer=token)
    if read.blind and by in ("completed", "failed") and _late_word_since(Path(job_dir), read, ours):
        return None
    return ours


def _writer_token(job_dir: Path) -> str:
    """A new record's writer token: random, after the id of the job its job.json holds ("ID:TOKEN"), so that a
    record copied in from another job's folder is noticed (`record_job`), not obeyed (adversarial pass 182: a
    `cancel` copied in from a job of the same input cancelled this one without a word). In the token, not a field
    of its own: runners that refuse fields no record has read these records as before."""
    meta = _read_json_or_none(job_dir / JOB_FILE) if storage.kind(job_dir / JOB_FILE) == "file" else None
    token = secrets.token_hex(8)
    return f"{meta['id']}:{token}" if _valid_spec(meta) else token


def record_job(record: StateRecord) -> str | None:
    """The id of the job a state record was written for (`_writer_token`); None for a record that does not say
    (an earlier runner's)."""
    job_id, sep, _ = (record.writer or "").rpartition(":")
    return job_id if sep else None


class ForeignRecord(BrokenJob):
    """The job's newest state record was written for another job (copied in from its folder)."""


def _own_record(record: StateRecord, job_id: str | None) -> StateRecord:
    """`record`, unless it says it was written for another job than `job_id` (ForeignRecord)."""
    other = record_job(record)
    if job_id is None or other is None or other == job_id:
        return record
    raise ForeignRecord(f"{STATES}/{record_name(record.seq)} was written for job {other}, not this one (copied in "
                        f"from its folder?); `runner repair` sets it aside")  # fmt: skip


def _late_word_since(job_dir: Path, read: StateRecord, ours: StateRecord) -> bool:
    """A worker's outcome (`ours`) was decided over a repair's blind record (`read`), the record below it still
    empty then (a `cancel` or `retry` frozen between its create and its fill, no hard links). If that record
    reads now, its writer filled it while we decided and may have said done, its word standing over the blind
    record (`_stands_over_blind`): it is recorded again over ours, and our word dropped (True). (Pass 135: a
    cancel that exited 0, then undone by the completion of a worker that had read the state before its fill.)"""
    try:
        late = _late_word_stands(job_dir, _filled_or_aside(job_dir, read.seq - 1))
    except BrokenJob:  # still empty, or damaged: nobody's word
        return False
    if late.writer is None or late.state is JobState.COMPLETED:
        return False
    again = StateRecord(late.state, max(late.generation, ours.generation), late.error)
    record_state(job_dir, ours, again, late.by or "repair")
    return True


def _stands_at_its_name(job_dir: Path, seq: int, writer: str | None, transit: bool) -> bool:
    """Whether the record at `seq` is `writer`'s: with `transit` (it may be where an adopter set it aside), put
    back at its name first, and only if no other record took that place meanwhile (pass 81: a cancel recorded
    there, then a completion decided over the record set aside went over the cancel)."""
    if not transit or not seq:
        return True
    for data, d in _set_aside(job_dir, seq):
        if d["writer"] == writer:
            _put_back(job_dir, seq, data)
            break
    try:  # (empty or missing, it is being put back by another: waited for, pass 253)
        there = json.loads(_read_when_filled(job_dir / STATES / record_name(seq)) or b"null")
    except ValueError:
        return False
    except storage.StorageError as e:
        if isinstance(e.__cause__, IsADirectoryError):
            return False
        raise
    return isinstance(there, dict) and there.get("writer") == writer


def _stands_over_blind(job_dir: Path, seq: int, new: StateRecord) -> bool:
    """Our record at `seq` was passed over by a repair's decided blind (it found ours empty: we were slow to fill
    it): our word stands, as the job reads (`_late_word_stands`), unless it is a completion, while that repair's
    record is the newest (or a worker's outcome decided over it is: it reads as our word, `_outcome_over_blind`),
    or when the records written over it since came once ours was filled."""
    if new.state is JobState.COMPLETED:
        return False
    try:
        blind = _read_record(job_dir, seq + 1, wait=False)
    except BrokenJob:
        return False
    if not blind.blind:
        return False
    # (a worker's outcome decided over the repair's record reads as our word: only the records after it may not)
    first = seq + 2 + _outcome_over(job_dir, seq + 2, blind.writer)
    if newest_state_seq(job_dir) < first:
        return True
    # records were written over the repair's since: ours stood for their writers only if they came after it was
    # filled (pass 76: a cancel written over a retry's late word, then the retry deciding again, undid it)
    folder = job_dir / STATES

    def times() -> list[int] | None:
        try:
            return [os.stat(folder / record_name(n)).st_mtime_ns for n in (seq, first)]
        except FileNotFoundError:
            return None

    # (a transient error is retried, then raises: read as "ours did not stand", the command decided again over
    # those records and applied its word twice, a retry re-queuing a job cancelled after it; pass 189)
    got = storage.retry(times, f"read {folder}")
    return got is not None and got[1] > got[0]


def _outcome_over(job_dir: Path, seq: int, writer: str | None) -> bool:
    """Whether the record at `seq` is a worker's completion or failure decided over `writer`'s record."""
    try:
        record = _read_record(job_dir, seq, wait=False)
    except BrokenJob:  # (none there, damaged or empty)
        return False
    return record.by in ("completed", "failed") and writer is not None and record.over == writer


def _passed_over(folder: Path, seq: int, token: str) -> bool:
    """Whether the record after ours was decided without it: its writer found ours empty (created, not yet
    filled, where links are not supported: we were frozen in between) and a `repair` recorded over it. Our
    change then did not count, and the caller decides again over what the job reads now."""
    after = _read_json_or_none(folder / record_name(seq + 1))  # None: there is none (or it does not read)
    return isinstance(after, dict) and "over" in after and after["over"] != token  # (older records name none)


def _fence_older_runners(job_dir: Path) -> None:
    """Before a job of layout 2 gets its first state record: make it layout 3 (job.json and its backup, the
    backup first), so that an older runner refuses the job rather than read its state.json and ignore the
    records (a cancel made here would not stop its workers, its cancel would not stop ours)."""
    for name in (JOB_BACKUP, JOB_FILE):
        meta = _read_json_or_none(job_dir / name) if _lexists(job_dir / name) else None
        if (
            isinstance(meta, dict)
            and meta.get("format") == 2
            and meta.get("spec_sha256") == spec_checksum(meta)
        ):
            meta["format"] = FORMAT
            meta["spec_sha256"] = spec_checksum(meta)
            storage.write_json(job_dir / name, meta)


def change_state(job: Job, decide: Callable[[StateRecord], StateRecord | None], by: str) -> StateRecord:
    """A command's transition: `decide` maps the state read to the one to record (None: leave it; it may
    raise to refuse), tried again over whatever another writer recorded meanwhile. Returns the state after."""
    while True:
        old = job.state()
        new = decide(old)
        if new is None:
            return old
        done = record_state(job.dir, old, new, by)
        if done is not None:
            return done


def write_completed(job_dir: Path, read: StateRecord) -> StateRecord | None:
    """Completion, recorded by the worker that found every key done or failed after reading the state `read`
    (queued): only over that very record, so a `retry`, `cancel` or `repair` recorded since (while the worker
    read the ledger, or slept) stands, and the worker's word is dropped."""
    return record_state(job_dir, read, StateRecord(JobState.COMPLETED, read.generation), "completed")


def write_failed(job_dir: Path, read: StateRecord, error: str) -> StateRecord | None:
    """A job-level failure (a damaged prompts file, a model that changed), recorded by a worker as
    `write_completed`: a `cancel` landing at that moment stands, a `retry` re-queues past it."""
    return record_state(job_dir, read, StateRecord(JobState.FAILED, read.generation, error), "failed")


def _legacy_state(job_dir: Path) -> StateRecord:
    """A job of an older runner version, before its first state record: state.json (absent: queued), and where
    it says queued, a worker's outcome of the same retry generation over that same state.json (completed.json,
    else failed.json). Read only: the first transition records state/00000001.json over it."""
    record = _stored_state(job_dir)
    for state, name in _legacy_outcomes().items():
        path = Path(job_dir) / name
        if storage.kind(path) not in (None, "file"):
            raise BrokenJob(f"{name} is not a file")
        if record.state is not JobState.QUEUED or not _lexists(path):
            continue
        outcome = _read_json_or_none(path)
        gen = outcome.get("generation") if isinstance(outcome, dict) else None
        read = outcome.get("state_updated", record.updated) if isinstance(outcome, dict) else None
        if type(gen) is int and gen == record.generation and read == record.updated:
            error, updated = outcome.get("error"), outcome.get("updated")
            return StateRecord(state, gen, error if isinstance(error, str) else None,
                               float(updated) if type(updated) is float else 0.0)  # fmt: skip
    return record


def _legacy_outcomes() -> dict[JobState, str]:
    return {JobState.COMPLETED: COMPLETED_FILE, JobState.FAILED: FAILED_FILE}


def _stored_state(job_dir: Path) -> StateRecord:
    path = Path(job_dir) / STATE_FILE
    if not _lexists(path):
        if _is_link(path):
            raise BrokenJob("state.json is a symbolic link")
        return StateRecord()
    if storage.kind(path) != "file":
        raise BrokenJob("state.json is not a file")
    try:
        d = storage.read_json(path)
    except ValueError as e:
        raise BrokenJob(f"state.json is damaged ({e})") from None
    return _parse_state(d, STATE_FILE, 0)


# --- the job handle ------------------------------------------------------------------------------------------


class Job:
    """A job folder with its parsed spec. `Job.open` checks everything a command relies on, or raises
    BrokenJob naming what is wrong."""

    def __init__(self, path: str | os.PathLike, spec: JobSpec):
        self.dir = Path(path)
        self.spec = spec
        self.misplaced: tuple[str, ...] = ()  # its folders that were not folders when opened (inflight/...)
        # the files a worker writes that were something else when opened: (name, what stood there)
        self.not_files: tuple[tuple[str, str], ...] = ()
        # create_job's answer: it stored this job just now (else the job of the same name or folder, file and
        # settings already there, returned as it is)
        self.created = False

    def __fspath__(self) -> str:
        """A Job stands for its folder wherever a path or job reference is taken (`runner.load_results(job)`)."""
        return str(self.dir)

    def __repr__(self) -> str:  # what a notebook cell shows for `job`
        name = f", name={self.name!r}" if self.name else ""
        return f"Job(id={self.id!r}{name}, kind={self.spec.kind!r}, model={self.spec.model!r}, folder={str(self.dir)!r})"

    @classmethod
    def open(cls, path: str | os.PathLike, inputs: bool = True) -> Job:
        """The job in `path` (`inputs` False: even without its prompts.parquet: repair writes it again)."""
        path = Path(path)
        if _is_link(path):
            raise BrokenJob(f"{path} is a symbolic link; runner does not follow links")
        kinds = storage.kinds(path)  # one listing of the folder, not a stat per name
        there = ("file", "dir")
        if kinds.get(JOB_FILE) not in there:
            if kinds.get(JOB_BACKUP) in there:
                raise BrokenJob("job.json is missing (`runner repair` restores it from job.backup.json)")
            if kinds.get(JOB_FILE) or kinds.get(JOB_BACKUP):  # a link, a FIFO...: a job's, damaged
                raise BrokenJob(f"neither {JOB_FILE} nor {JOB_BACKUP} is a file (a link, a FIFO or the like "
                                "stands there); submit the file again", repairable=False)  # fmt: skip
            raise RunnerError(f"{path} is not a runner job folder (no {JOB_FILE})")
        try:  # (read once more before it is taken for damage: a torn read made the job broken for that look)
            meta = read_again_if_damaged(lambda: storage.read_json(path / JOB_FILE), _torn_spec)
        except ValueError as e:
            raise _damaged_spec(path, f"job.json is damaged ({e})") from None
        except storage.StorageError as e:  # a folder there: damage repair sets aside, not a failing mount
            if e.errno not in storage.DAMAGED:
                raise
            raise _damaged_spec(path, "job.json is not a file") from None
        spec = JobSpec.parse(meta)
        for sub in FOLDERS:
            if kinds.get(sub) == "link":
                raise BrokenJob(f"{sub}/ is a symbolic link; runner does not follow links out of the job")
        # not a folder where one belongs (repair sets it aside): the results' folders (claims/: the seals say which
        # commits count) break every command; the others are named by the commands that use them (`misplaced`)
        misplaced = tuple(sub for sub in FOLDERS if sub != QUARANTINE and kinds.get(sub) not in (None, "dir"))
        for sub in misplaced:
            if sub in (SHARDS, MARKERS, CLAIMS):
                raise BrokenJob(f"{sub}/ is not a folder")
        if inputs and kinds.get(PROMPTS) not in there:
            why = {None: "is missing", "link": "is a link"}.get(kinds.get(PROMPTS), "is not a plain file")
            raise BrokenJob(f"prompts.parquet {why}: `runner repair {shlex.quote(str(path))}` writes it again "
                            "from the input file if that is unchanged; else submit the file again",
                            repairable=False)  # fmt: skip
        job = cls(path, spec)
        job.misplaced = misplaced
        job.not_files = tuple((n, kinds[n]) for n in (LOG_FILE, STATS_FILE) if kinds.get(n, "file") != "file")
        return job

    def layout_problem(self) -> str | None:
        """Something of the wrong kind where a worker writes, as the job was opened (a file where inflight/
        belongs, a folder at log.txt): no worker can run the job until `runner repair` sets it aside (pass 72:
        `runner work` skipped such a job as broken while `runner status` showed it waiting to run)."""
        if self.misplaced:
            return f"{self.misplaced[0]}/ is not a folder (no worker can run the job)"
        for name, what in [*self.not_files, *self._blocked_records()]:
            what = {"dir": "a folder", "link": "a symbolic link"}.get(what, "a FIFO, socket or device")
            return f"{name} is {what}, not a file (no worker can run the job)"
        return None

    def _blocked_records(self) -> list[tuple[str, str]]:
        """(name, what stands there) of the claims and in-flight records that are not files: a worker that needs
        that name can never write it (one listing of claims/ and of inflight/)."""
        out = []
        for sub, names in ((CLAIMS, (CLAIM_RE, SEAL_RE)), (INFLIGHT, (INFLIGHT_RE,))):
            for name, what in sorted(storage.kinds(self.dir / sub).items()):
                if what != "file" and any(r.fullmatch(name) for r in names):
                    out.append((f"{sub}/{name}", what))
        return out

    # the spec, for callers that read it through the job
    id = property(lambda self: self.spec.id)
    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    params = property(lambda self: self.spec.params)
    options = property(lambda self: self.spec.options)
    seed = property(lambda self: self.spec.seed)
    samples = property(lambda self: self.spec.samples)
    total = property(lambda self: self.spec.total)
    meta = property(lambda self: self.spec.meta)

    def state(self) -> StateRecord:
        """The job's state (`read_state`). A newest record of another job is one copied in (ForeignRecord),
        unless job.json is now that job's (the folder deleted and that job submitted to it: JobReplaced), or the
        folder's results or name say job.json is the one copied in: the state is then read as before, and what
        checks the results says so (`same_job_as_backup`, verification), as it did before records named a job."""
        try:
            return read_state(self.dir, self.id)
        except ForeignRecord:
            check_still_this_job(self)
            if _other_job_here(self.dir, self.id, _shards_job_ids(self.dir, enough=self.id)) is None:
                raise
            return read_state(self.dir)

    def set_state(
        self, state: JobState, error: str | None = None, generation: int | None = None
    ) -> StateRecord:
        """Record `state` whatever the job reads now (for tools and tests: commands decide from what they read)."""
        return change_state(
            self, lambda old: StateRecord(JobState(state), old.generation if generation is None else generation,
                                          error), "set_state"
        )  # fmt: skip

    def prompts(self) -> Any:
        """The whole prompts table, to look at (workers read a unit's rows at a time); a prompts.parquet that is
        not the file submit wrote is refused, never shown as the job's prompts."""

        why = prompts_problem(self)
        if why:
            raise RunnerError(why)
        return read_parquet(self.dir / PROMPTS)

    def log(self, line: str) -> None:
        """A line of log.txt, timed; labelled by its worker process under `runner work --workers N` (their lines
        interleave there)."""
        label = os.environ.get("RUNNER_WORKER_LABEL")
        storage.append_line(
            self.dir / LOG_FILE, time.strftime("%Y-%m-%d %H:%M:%S ") + (f"[{label}] " if label else "") + line
        )

    def invalid_rows(self) -> Iterator[dict[str, Any]]:
        """Input rows found invalid at submit (errors.jsonl), one at a time (there may be millions). A file that
        is not the one submit wrote (`invalid_problem`) raises BrokenJob: it never reads as fewer or other rows.
        Its lines are hashed as they are read: lines read other than the file hashed a moment before (a torn read
        on a network mount) raise RunnerError once they are all read, saying to run the command again (a line
        cut short went up as a raw JSONDecodeError, a traceback; one with a value changed was listed as read)."""
        if not self.meta["input"].get("invalid"):
            return
        why = invalid_problem(self)
        if why:
            raise BrokenJob(why, repairable=False)
        digest, expected = hashlib.sha256(), self.meta["input"].get("invalid_sha256")
        torn = RunnerError(f"{INVALID} of job {self.id} read back other than it hashed a moment before (a torn "
                           "read on a network mount?); nothing was changed: run the command again")  # fmt: skip
        for line in _lines_or(torn, storage.read_lines(self.dir / INVALID, digest=digest)):
            try:
                row = json.loads(line)
            except ValueError:
                raise torn from None
            yield row
        if expected is not None and digest.hexdigest() != expected:
            raise torn

    def read_stats(self, for_update: bool = False) -> dict[str, Any]:
        """stats.json, or an empty record when it is missing or damaged (it is only informative): one that does
        not match its checksum too (a flipped digit was shown as a run's peak memory or speed; pass 142). A file
        there that did not read, or was damaged, is said in `problem` (the report said "no run has finished
        yet" of a completed job), and so is one of another job (`STATS_FOR`), whose runs were shown as this
        job's (pass 182). `for_update` (a run about to append itself): a file that does not read for
        now (transient errors through the retries) raises its StorageError instead, so that the history of
        earlier runs is not written over with this one."""
        path = self.dir / STATS_FILE
        problem = None
        try:  # (read once more before it is taken for damage: a run wrote a torn read over the whole history)
            stats = read_again_if_damaged(
                lambda: storage.read_json(path) if _lexists(path) else {}, _torn_stats
            )
        except storage.StorageError as e:
            if for_update and e.unreadable_for_now:
                raise
            stats, problem = {}, f"{STATS_FILE} could not be read ({first_line(e)})"
        except (ValueError, RunnerError):
            stats = None
        if isinstance(stats, dict) and storage.fails_its_check(stats):
            stats = None  # (`check` is absent from an earlier runner's stats.json)
        elif isinstance(stats, dict) and stats.get(STATS_FOR, self.id) != self.id:  # copied in: not our runs
            stats, problem = {}, f"{STATS_FILE} is job {stats[STATS_FOR]}'s (copied in from its folder?)"
        runs = stats.get("runs") if isinstance(stats, dict) else None
        if not isinstance(runs, list) and problem is None and stats != {}:
            problem = f"{STATS_FILE} is damaged"
        return {"runs": [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else [],
                "problem": problem}  # fmt: skip

    def absent_mask(self, verifier: Verifier | None = None) -> Any:
        """[rows, samples] bool: keys that are not part of the job (samples past a row's own n), or None
        when every row has the same number of samples. prompts.parquet is checked against its checksum first:
        a damaged `n` would make keys still to do "not part of the job", and the job complete with rows missing
        (pass 36: `runner repair` said completed 8/12). A file as `verifier`'s cache (verified.json) stamped it
        is not hashed again: `runner status` / `watch` poll it (pass 39)."""
        if not self.spec.per_row_n:
            return None
        if getattr(self, "_absent", None) is None:
            import numpy as np

            checker = verifier or Verifier(self)
            if (why := prompts_problem(self, checker)) is not None:
                raise BrokenJob(why, repairable=False)
            checker.save()  # the file's stamp as hashed (only a cache): the next poll does not hash it again
            n = self.read_prompts(lambda path: read_parquet(path, ["n"])).column("n")
            self._absent = np.arange(self.spec.samples)[None, :] >= n.to_numpy()[:, None]
        return self._absent

    def read_prompts(self, op: Callable[[Path], T]) -> T:
        """`op(path of prompts.parquet)`, transient errors retried. A file pyarrow cannot parse is BrokenJob
        (its checksum says why when it has one), never a raw pyarrow error, nor a failing home that stops
        every job (a Parquet footer damaged is an OSError without an errno)."""
        import pyarrow as pa

        path = self.dir / PROMPTS
        try:
            return storage.retry(lambda: op(storage.arrow_file(path)), f"read {path}")
        except (pa.ArrowException, ValueError, KeyError, storage.StorageError) as e:
            if isinstance(e, storage.StorageError) and e.errno is not None:
                raise  # the file system failed, not the file
            why = (  # (hashed again whatever its stamp: bytes that changed under unchanged times no longer parse)
                prompts_problem(self, afresh=True)
                or f"prompts.parquet of job {self.id} is damaged ({first_line(e)}); submit the file again"
            )
            raise BrokenJob(why, repairable=False) from None

    def read_rows(self, start: int, stop: int) -> Any:
        """Rows [start, stop) of prompts.parquet as a table, reading only the row groups that hold them. A file
        pyarrow cannot parse is BrokenJob, as `read_prompts` says (bytes changed under unchanged times after the
        worker hashed it at its start: pyarrow's error went up through `runner work` as a traceback). Where this
        process hashed the file (a worker, at its start), the bytes read are checked against that hash's blocks
        (storage.CheckedFile, `read_checked`): bytes changed under unchanged times that still parse (bit rot in a
        page, another file put in its place with its times) were computed from, silently."""
        return self.read_checked(lambda source: _rows_of(source, start, stop))

    def read_checked(self, op: Callable[[Any], T]) -> T:
        """`op(prompts.parquet)` as `read_prompts` does it, the bytes read checked against the blocks of this
        process's hash of the file (`prompts_problem`; none: as they are). A change found is hashed whole again:
        damage is BrokenJob naming it; a sound file (a torn read, the file put back) is read once more."""
        path = self.dir / PROMPTS
        for last in (False, True):
            try:
                return self.read_prompts(lambda source: op(_checked(path, source)))
            except storage.ChangedUnderfoot as e:
                # (blocks of another file once at this path: a job without a checksum keeps none of its own)
                _BLOCKS.pop(str(path), None)
                if (why := prompts_problem(self, afresh=True)) is not None or last:
                    raise BrokenJob(
                        why or f"prompts.parquet changed while read ({e})", repairable=False
                    ) from None
        raise AssertionError("unreachable")


def _lines_or(torn: RunnerError, lines: Iterator[str]) -> Iterator[str]:
    """`lines`, or `torn` raised where one does not decode: a byte read other than it is may not be UTF-8 (a
    raw UnicodeDecodeError went up from `runner.read_errors`)."""
    try:
        yield from lines
    except UnicodeDecodeError:
        raise torn from None


def _torn_spec(meta: Any) -> bool:
    """Whether job.json as read is no object or fails its checksum (`Job.open` reads it once more first)."""
    return not isinstance(meta, dict) or meta.get("spec_sha256") != spec_checksum(meta)


def _torn_stats(stats: Any) -> bool:
    """Whether stats.json as read is no whole record of runs (`Job.read_stats` reads it once more first)."""
    return not (
        isinstance(stats, dict) and isinstance(stats.get("runs", []), list)
    ) or storage.fails_its_check(stats)


def _checked(path: Path, source: Any) -> Any:
    """prompts.parquet at `path` read against its blocks as this process hashed them, else `source` as it is."""
    blocks = _BLOCKS.get(str(path))
    return source if blocks is None else storage.CheckedFile(path, blocks)


def _rows_of(source: Any, start: int, stop: int) -> Any:
    """Rows [start, stop) of the Parquet file `source` (`Job.read_rows`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source)
    parts, at = [], 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            t = pf.read_row_group(g)
            parts.append(t.slice(max(0, start - at), min(stop, at + n) - max(start, at)))
        at += n
    pf.close()
    return pa.concat_tables(parts) if len(parts) != 1 else parts[0]


# --- claims, seals and heartbeats ---------------------------------------------------------------------------


def claim_name(unit: int, epoch: int) -> str:
    return f"{unit:05d}-{epoch:08d}.json"


def seal_name(unit: int, epoch: int) -> str:
    return f"{unit:05d}-{epoch:08d}.seal.json"


def create_exclusive(path: Path, obj: Any) -> bool:
    """Create `path` holding `obj` as JSON, whole, unless it exists: True if this call created it. The bytes
    go to a temp file first and are hard-linked into place (atomic, and fails if the name exists); where
    links are not supported, O_EXCL creates it and the content follows (a kill in between leaves it empty).
    Each step is retried on its own: a retry never rewrites a file already linked into place."""
    return create_exclusive_bytes(path, _exclusive_json(obj))


def _exclusive_json(obj: Any) -> bytes:
    """The bytes `create_exclusive` writes for `obj` (what a caller that may write them again adopts with)."""
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def create_exclusive_bytes(path: Path, data: bytes) -> bool:
    """`create_exclusive` of `data` as it is."""
    for _ in range(3):
        created = _create_once(path, data)
        if created:  # its name in the folder survives a power cut too, as a replace's does (pass 122)
            storage.fsync_dir(path.parent)
        if created is not None:
            return created
    raise storage.StorageError(f"cannot create {path}: its temp file was removed before it was linked, three "
                               "times", errno.ENOENT)  # fmt: skip


def _create_once(path: Path, data: bytes) -> bool | None:
    """One try of `create_exclusive`; None when the temp file was tidied away as left behind before its link
    (its writer was frozen past the temp files' age): the caller writes it again."""
    tmp = storage.temp_name(path)  # a plain string (see there)
    try:
        # a failure names the file being made, not its temp name (a full disk said "cannot write .../.0003.json.
        # tmp-1a2b...": a name the user never sees)
        storage.retry(lambda: _write_file(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), data),
                      f"create {path}")  # fmt: skip
        fault_point("before_create")  # the whole file is under the temp name; the exclusive name is free
        try:
            linked = storage.retry(lambda: _link_new(tmp, path), f"create {path}")
        except storage.StorageError as e:
            if e.errno == errno.ENOENT and not os.path.lexists(tmp) and os.path.isdir(path.parent):
                return None
            raise
        return linked if linked is not None else _create_then_fill(path, data)
    finally:
        with contextlib.suppress(OSError):  # one left behind is removed as stale later
            os.unlink(tmp)


def _write_file(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(tmp: str, path: Path) -> bool | None:
    """True: linked into place; False: the name exists; None: this file system has no hard links. A link that
    landed though the mount reported an error (its reply lost, then retried) finds the name taken by our own
    file, the one `tmp` is: ours (it read as another writer's)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return _is_ours(tmp, path)
    except OSError as e:
        if e.errno in NO_LINKS:
            return None
        raise


def _is_ours(tmp: str, path: Path) -> bool:
    """Whether the file at `path` is the one `tmp` is. A transient error in that look is retried, not taken for
    "another writer's file": a link that landed though its reply was lost then read as lost (a worker left a unit
    it had claimed, a `submit --name` said another submit held the name; pass 189)."""
    try:
        return storage.retry(
            lambda: os.path.samefile(tmp, path), f"compare {path} with the file linked there"
        )
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return False
        raise


# What link() answers on a file system without hard links: EPERM (POSIX's word for it), EOPNOTSUPP, and ENOSYS
# from a FUSE mount whose daemon has no link operation on Linux before 6.4 (later kernels turn it into EPERM).
NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS})


# How long an empty newest state record is taken for a change on its way where links are not supported (the worker
# and `runner work` go on, or wait, meanwhile); empty for longer, the job is broken (`runner repair`).
STATE_PATIENCE_SECONDS = 120.0
_LINKS: dict[str, bool] = {}  # folder -> whether its file system has hard links (links_supported)


def links_supported(folder: Path) -> bool | None:
    """Whether the file system of `folder` has hard links: probed by linking a fresh temp file (transient
    errors retried), once per folder and process where the probe answers (a link made, or refused as
    unsupported). With links every exclusive file lands whole, so an empty one is damage, never a change on its
    way. None: the probe cannot tell (nothing can be created there now: a read-only copy, a full disk, a mount
    failing through the retries); tried again next time."""
    key = os.fspath(folder)
    if key in _LINKS:
        return _LINKS[key]
    answer = _probe_links(Path(key))
    if answer is not None:
        _LINKS[key] = answer
    return answer


def _probe_links(folder: Path) -> bool | None:
    first, second = storage.temp_name(folder / "links"), storage.temp_name(folder / "links")

    def create() -> None:
        with contextlib.suppress(FileExistsError):  # (its reply lost, retried: the name is ours alone)
            os.close(os.open(first, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    def link() -> bool:
        try:
            os.link(first, second)
        except FileExistsError:
            return True  # made by the try whose reply was lost
        except OSError as e:
            if e.errno in NO_LINKS:
                return False
            raise
        return True

    try:
        storage.retry(create, f"create {first}")
        return storage.retry(link, f"link {first}")
    except storage.StorageError:
        return None
    finally:
        for name in (first, second):
            with contextlib.suppress(OSError):  # one left behind is removed as stale later
                os.unlink(name)


def settled_state(job: Job, stop: Callable[[], bool] | None = None, waiting: Callable[[], None] | None = None
                  ) -> StateRecord:  # fmt: skip
    """The job's state. A newest record found empty where links are not supported (BrokenJob.unfilled: a
    `cancel` or `retry` being written) is read again each STATE_WAIT_SECONDS until it reads, until it is
    STATE_PATIENCE_SECONDS old (BrokenJob.waited_out) or until `stop()`; then BrokenJob. `waiting()` is called
    once, when the wait begins."""
    said = False
    while True:
        try:
            return job.state()
        except BrokenJob as e:
            if not e.unfilled or e.waited_out() or (stop is not None and stop()):
                raise
            if not said and waiting is not None:
                waiting()
            said = True
        wait_for_state()


STATE_WAIT_SECONDS = 1.0


def wait_for_state() -> None:
    """A moment's wait for a state record being written (`settled_state`, `runner work`'s queue)."""
    time.sleep(STATE_WAIT_SECONDS)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Around the create and the fill of a file without links: a Ctrl-C or SIGTERM landing in between would
    leave it empty (the job broken until `runner repair`), so it is held until both are done, then delivered
    to the handler it was meant for, also when they failed (pass 259: a create failing through its retries
    dropped the Ctrl-C pressed meanwhile), as often as each came (two Ctrl-Cs are `runner work`'s "stop at once",
    one its "after the current batch"). (In the main thread only: signals are handled nowhere else.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[Any, Any] = {}
    try:  # (swapped inside: a handler raising as a later swap begins, Terminated, left the earlier ones held for good)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # (not one whose handler the host set, Python embedded: it says None, which cannot be put back)
            if signal.getsignal(sig) is not None:
                previous[sig] = signal.signal(sig, lambda signum, _: held.append(signum))
        yield
    finally:
        _restore_handlers(previous)
        for sig in held:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


def _restore_handlers(previous: dict[Any, Any]) -> None:
    """Put every handler back, even where a signal arriving meanwhile runs its handler (a Ctrl-C put back
    first raises KeyboardInterrupt at the next signal.signal): the others were left holding signals for good,
    a SIGTERM then swallowed for the rest of a notebook kernel's life (pass 125). Raised after all are back."""
    raised: BaseException | None = None
    for sig, handler in previous.items():
        while True:
            try:  # (a pending signal's handler runs as signal.signal begins: setting it again is the same)
                signal.signal(sig, handler)
                break
            except BaseException as e:  # noqa: BLE001 (a signal's handler raised here: KeyboardInterrupt...)
                raised = raised or e
    if raised is not None:
        raise raised


def _create_then_fill(path: Path, data: bytes, adopt: int = 3) -> bool:
    """Without hard links: create the name exclusively, fill it through the descriptor the create gave (a
    retried write rewrites that same file, never whatever is at the name by then), then read it back: the
    name is ours only if our bytes are what it holds. A create whose reply was lost (it landed, then reported
    an error) finds the name taken on its retry, by our own empty file: `_adopt_unfilled` (`adopt` times at
    most: lost replies come in bursts on a flaky mount)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    tries: list[int] = []

    def create() -> int | None:
        tries.append(1)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
        except FileExistsError:
            return None

    with _signals_deferred():
        fd = storage.retry(create, f"create {path}")
        if fd is not None:
            try:
                fault_point("after_create")  # the name is ours and still empty
                storage.retry(lambda: _fill(fd, data), f"write {path}")
            except storage.StorageError:
                _withdraw(path, fd, data)
                raise
            finally:
                os.close(fd)
    if fd is None:  # (the wait for another writer's fill is outside the signals held)
        return adopt > 0 and len(tries) > 1 and _adopt_unfilled(path, data, adopt)
    return _reads_back(path, data)  # a writer that adopted the name meanwhile holds it: ours was set aside


def _withdraw(path: Path, fd: int, data: bytes) -> None:
    """Our create's file at `path` (`fd`), whose fill of `data` failed for good (a full disk or Drive quota, a mount
    turned read-only): taken away, so that the name reads as it did, not as a change being written and then as damage
    (a `cancel` on a full Drive left its record empty: the job broken until `runner repair`; a `submit --name`, its
    name claimed for ten minutes). Another's file found there (an adopter's, `_adopt_unfilled`, while this one waited
    on the mount) is left as it is: its writer may have read it back and said done, and once set aside, a third writer
    could create at the name freed, and the put-back then fail (pass 253: a reported cancel lost). Ours, it is emptied
    (bytes of a fill whose fsync failed, set aside whole, were read as a record in transit: a cancel said failed, then
    in effect) and set aside (one taker wins it), then looked at again there: another's that came in between is put
    back. Inode numbers are not trusted alone (pass 255: some mounts' are not steady from one look to the next, and
    left our empty file at the name; others' are 0 for every file, and took the adopter's for ours): bytes that are no
    beginning of `data` are another's, and a file not ours by its inode number that holds a beginning of `data`
    (`_own_file`) is taken for ours (another's that holds no more is not yet filled, so not read back by its writer).
    Best effort."""
    aside = _aside_name(path)
    try:
        if not _own_file(fd, path, storage.read_bytes(path), data):
            return
        with contextlib.suppress(OSError):  # (bytes that landed, their fsync failed: no record in transit)
            os.ftruncate(fd, 0)
        os.rename(path, aside)
        theirs = storage.read_bytes(aside)
        if theirs and not _own_file(fd, aside, theirs, data):
            _create_then_fill(path, theirs, adopt=1)
        os.unlink(aside)
    except (OSError, RunnerError):
        pass  # (left where it is: an empty record is read as a change on its way, then as damage to repair)


def _own_file(fd: int, path: str | os.PathLike, there: bytes, data: bytes) -> bool:
    """Whether the file at `path`, holding `there`, is the one `fd` is open on, whose fill of `data` failed:
    bytes that are no beginning of `data` are another's, whatever the inode numbers say; the same inode, or
    less than all of `data` (another's of no more is not filled yet: read back by no one), is ours."""
    if not data.startswith(there):
        return False
    return len(there) < len(data) or os.path.samestat(os.fstat(fd), os.lstat(path))


def _fill(fd: int, data: bytes) -> None:
    """All of `data` from the start of the file `fd` is open on (again from the start when tried again)."""
    view, at = memoryview(data), 0
    while at < len(data):
        at += os.pwrite(fd, view[at:], at)
    os.fsync(fd)


def _reads_back(path: Path, data: bytes) -> bool:
    """Whether `path` holds `data`, once filled (`_read_when_filled`): another's file there counts as not ours.
    (Read while empty, between an adopter's put-back's create and its fill, a cancel's record was taken for
    another's, and the cancel decided again over its own record: "already cancelled", exit 1; pass 253.)"""
    return _read_when_filled(path) == data


def _read_when_filled(path: Path) -> bytes | None:
    """The bytes at `path`, waited for through ADOPT_PAUSES while it is missing (an adopter looking at it aside,
    `_adopt_unfilled`) or empty (its put-back, a create, then a fill, as slow as any writer's); None when still
    missing, b"" when still empty."""
    for pause in (*ADOPT_PAUSES, None):
        try:
            there = storage.read_bytes(path)
            if there or pause is None:
                return there
        except storage.StorageError as e:
            if not isinstance(e.__cause__, FileNotFoundError):
                raise
            if pause is None:
                return None
        time.sleep(pause)
    return None


# How long an empty file found at our name after our own create reported an error is given to fill, should it
# be another writer's (it fills at once, signals held; ~13 s leaves a slow mount's write and fsync time): empty
# for longer, it is our create's, landed (or its writer was killed or frozen in between).
ADOPT_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
CLAIM_FILL_SECONDS = sum(ADOPT_PAUSES)  # an empty claim this young is being filled (`claim_is_live`)


def _adopt_unfilled(path: Path, data: bytes, adopt: int) -> bool:
    """After our create raised a transient error, the name is taken. Content appearing there: another writer's
    (False). Empty through ADOPT_PAUSES: taken aside by a rename (one taker wins it), looked at there, removed,
    and the name created afresh. Filled just before the rename: its writer's, put back by an exclusive create
    (never over a record another writer created at the free name meanwhile), False. A writer frozen between
    its create and its fill then fills a file no longer at the name, reads back another's bytes, and drops
    its word. True if the name is ours."""
    for pause in (*ADOPT_PAUSES, None):
        try:
            if storage.retry(lambda: os.stat(path, follow_symlinks=False).st_size, f"read {path}"):
                return False
        except storage.StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return False  # another adopter has it aside: the caller decides again over what stands
            raise
        if pause is not None:
            time.sleep(pause)
    if _put_back_killed(path, data):
        return False  # not our create's: the caller decides again over what stands
    aside = _aside_name(path)
    try:
        storage.retry(lambda: os.rename(path, aside), f"move {path}")
    except storage.StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        if not os.path.lexists(aside):
            return False  # another taker moved it first (ours did, if its reply was lost: then it is aside)
    try:
        theirs = storage.read_bytes(aside)  # filled between our last look and the rename: its writer's
    except storage.StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise
        return False  # put back by another (it was in transit, `_in_transit`): the caller decides again
    if theirs:
        _create_then_fill(path, theirs, adopt=1)  # (its own lost reply: adopted back once)
    storage.remove(aside)
    return not theirs and _create_then_fill(path, data, adopt - 1)


def _put_back_killed(path: Path, data: bytes) -> bool:
    """Whether a whole record decided over the same one as ours (`data`) sits aside for the state record `path`
    (`_set_aside`): the empty file at the name is then its put-back, killed before its fill (`_filled_or_aside`),
    not our landed create. Adopted, it was removed and ours created there, and the reported cancel aside was lost
    (pass 92). One that is `data` itself is not: we are putting it back, and our create's reply was lost (left
    empty at its name, the job read as broken until `runner repair`; pass 253)."""
    record = _RECORD.match(path.name)
    if record is None or path.parent.name != STATES:
        return False  # (not a state record)
    over = json.loads(data).get("over")
    try:
        return any(
            d["over"] == over and aside != data
            for aside, d in _set_aside(path.parent.parent, int(record.group(1)), under_empty=True)
        )
    except BrokenJob:  # a damaged one: no whole record of that place stands aside
        return False


def _aside_name(path: Path) -> str:
    """Where `_adopt_unfilled` sets a file aside: a temp name (`storage.is_temp_name`: swept as one) that says
    so, `.NAME.asideXXX.tmp` (XXX: 3 of ASIDE_LETTERS), for `_in_transit` to find. One not taken when looked at:
    a rename over another aside of the same name would end the record in transit there (3 digits gave 1 in 1,000
    for two asides at once; pass 253)."""
    folder, name = os.path.split(os.fspath(path))
    for _ in range(8):
        mark = "".join(secrets.choice(ASIDE_LETTERS) for _ in range(3))
        aside = os.path.join(folder, f".{name}.{ASIDE}{mark}.tmp")
        if not os.path.lexists(aside):
            break
    return aside


ASIDE = "aside"
# (the temp name's 8 characters: "aside" and 3 of these)
ASIDE_LETTERS = "0123456789abcdefghijklmnopqrstuvwxyz"


def read_again_if_damaged(read: Callable[[], T], damaged: Callable[[T], bool]) -> T:
    """`read()`, done once more when what it gave looks damaged (`damaged(it)`) or does not parse (ValueError): a
    torn read on a network mount (a page dropped or served stale, once) reads back whole the next time, where
    damage reads back the same. The second read's answer stands, whatever it is. Taken for damage at once, one
    such read quarantined a sound commit (pass 183), made a sound job broken, a worker drop a unit it held, a
    repair set a sound prompts.parquet aside and record a state, and a run write stats.json over its history."""
    try:
        first = read()
    except ValueError:
        return read()
    return read() if damaged(first) else first


def _read_json_or_none(path: Path) -> Any:
    """A small metadata file: its JSON, or None when missing or damaged (transient errors still retry)."""
    try:
        return storage.read_json(path)
    except ValueError:
        return None
    except storage.StorageError as e:
        if isinstance(e.__cause__, (FileNotFoundError, IsADirectoryError)):
            return None
        raise


EARLY_BEAT_SECONDS = 5.0
HEARTBEAT_JOIN_SECONDS = 10.0  # how long leaving a job waits for a heartbeat write in progress


@dataclass
class Heartbeat:
    """This worker's heartbeat in one job (workers/WORKER.json), renewed from a thread while it works there.
    Deleting it releases every claim of the worker at once."""

    job: Job
    owner: Owner
    ttl: float = LEASE_TTL
    info: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.path = self.job.dir / WORKERS / f"{self.owner.worker}.json"
        self._key = os.path.abspath(self.path)  # (`_BEATING`)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caller: tuple[int, Any] | None = None  # (thread id, frame) of the `with` that entered it
        # its thread's beats and the worker's own (`beat`): the later one written last
        self._writing = threading.Lock()

    def beat(self, **info: Any) -> None:
        """Renew the lease now, with `info` (figures for `runner status`) updated first."""
        with self._writing:
            self.info.update(info)
            now = time.time()
            record = {**self.owner.as_dict(), "heartbeat": now, "expires": now + self.ttl, **self.info}
            # a changed byte is damage, not a lease (live_workers)
            record["check"] = storage.json_checksum(record)
            storage.write_json(self.path, record, durable=False)

    def _run(self) -> None:
        """Renew the lease every ttl/4; at first sooner (5, 10, 20 s), so that `runner status` soon shows the
        run's speed, not the first decode step's (written at once, worker.update_heartbeat)."""
        beats = 0
        while not self._stop.wait(min(EARLY_BEAT_SECONDS * 2**beats, beat_period(self.ttl))):
            beats += 1
            if not self._within():  # its `with` was left without its exit (a Ctrl-C landing right there)
                self._stop.set()
                _ENDED.add(self.owner.worker)
                self._remove_own()
                return
            try:
                self.beat()
            except RunnerError as e:
                self.error = e
                return
            if self._stop.is_set():
                self._remove_own()  # stopped while it wrote (an interrupted exit did not wait): not left live

    def _within(self) -> bool:
        """Whether the thread that entered is still inside the `with` block (its frame still on that thread's
        stack): a notebook's stop pressed twice can leave the block without running __exit__ at all."""
        if self._caller is None:
            return True  # not entered by a `with` (a test driving _run): nothing to look at
        frame = sys._current_frames().get(self._caller[0])
        while frame is not None:
            if frame is self._caller[1]:
                return True
            frame = frame.f_back
        return False

    def __enter__(self) -> Heartbeat:
        self._caller = (threading.get_ident(), sys._getframe(1))  # the frame running the `with` statement
        storage.ensure_dir(self.job.dir / WORKERS)
        _ENDED.discard(self.owner.worker)
        _BEATING[self._key] = self
        try:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="runner-heartbeat", daemon=True)
            self._thread.start()
        except BaseException:  # a Ctrl-C (a notebook's stop) as it starts: no heartbeat left beating
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        """Stop beating and remove the heartbeat (releasing this worker's claims for the next one at once). The
        stop comes first and again last: a second Ctrl-C landing in here never leaves the thread beating for the
        life of a notebook kernel (pass 68)."""
        try:
            self._stop.set()
            _ENDED.add(self.owner.worker)
            if self._thread is not None:
                self._thread.join(timeout=HEARTBEAT_JOIN_SECONDS)
        finally:
            self._stop.set()
            _ENDED.add(self.owner.worker)
            self._caller = None  # (the frame is not kept alive)
            if _BEATING.get(self._key) is self:
                del _BEATING[self._key]
            self._remove()

    def _remove(self) -> None:
        try:
            storage.remove(self.path)
        except RunnerError:
            pass  # it goes stale on its own

    def _remove_own(self) -> None:
        """From the thread, once stopped: remove the heartbeat, unless the same worker has entered the job again
        since (an exit gave up waiting for this thread, whose write was slow on a network mount): then the
        heartbeat this thread's late write replaced is written again, never deleted (its claims would look
        released)."""
        current = _BEATING.get(self._key)
        if current is None or current is self or current._stop.is_set():
            self._remove()
            return
        try:
            current.beat()
        except RunnerError:
            pass  # its own thread writes it again within a beat period
        if current._stop.is_set():  # it left the job meanwhile (and removed its heartbeat before this write)
            self._remove()


# The heartbeat each heartbeat file of this process stands for now (the newest entered): an older one's thread,
# late, writes that one again rather than deleting the file
_BEATING: dict[str, Heartbeat] = {}

# The workers of this process whose run has ended: a heartbeat of this very process naming one is what an
# interrupted call left (a notebook's stop, pressed twice), never live (pass 68)
_ENDED: set[str] = set()


def beat_period(ttl: float) -> float:
    """The longest a worker of lease `ttl` goes between heartbeats (after its first, sooner ones)."""
    return max(0.5, ttl / 4)


def live_workers(job: Job, now: float | None = None) -> dict[str, dict[str, Any]]:
    """Heartbeats of the job's workers that may be alive: fresh and not provably dead. Each one's "expires"
    is its lease's end as this process judges it (`_lease_left`), "lease" the lease it declares."""
    now = time.time() if now is None else now
    out = {}
    for name in scan(job.dir / WORKERS):
        if not name.endswith(".json") or name.startswith("."):
            continue
        # (read once more before it is taken for damage: a torn read, as a mount whose renames are copies gives
        # while its worker renews it, took a live worker for dead, and its unit was taken from it; pass 193)
        try:
            hb = read_again_if_damaged(
                functools.partial(_read_json_or_none, job.dir / WORKERS / name),
                lambda hb, name=name: _heartbeat_owner(hb, name) is None,
            )
        except storage.StorageError as e:
            # unreadable through the retries as the listing read (a file Drive cannot serve for hours): stale, as
            # damage is. A live worker writes a new file at each beat; a killed one's held its job for as long.
            # (Its units are fenced by their claims' epochs: a worker taken for dead wrongly commits nothing twice.)
            if not e.unreadable_for_now:
                raise
            continue
        # damaged (a flipped digit of "expires" held a dead worker's units for hours): stale
        owner = _heartbeat_owner(hb, name)
        if owner is None:
            continue
        left, lease = _lease_left(job.dir / WORKERS / name, hb, now)
        if owner.worker in _ENDED and owner.is_this_process():
            continue  # an earlier call of this process, interrupted: it works no more
        if left > 0 and not owner.provably_dead():
            out[owner.worker] = {**hb, "expires": now + left, "lease": lease}
    return out


def _heartbeat_owner(hb: Any, name: str) -> Owner | None:
    """The worker a heartbeat read from workers/NAME names; None when it is damaged (not a heartbeat, another
    worker's name, or not matching its checksum)."""
    if not isinstance(hb, dict) or storage.fails_its_check(hb):
        return None
    owner = Owner.from_dict(hb)
    return owner if owner is not None and owner.worker + ".json" == name else None


# seconds a heartbeat's clock may run ahead of this machine's before its times are not believed
SKEW_SLACK = 60.0
_sighted: dict[str, tuple[float, float]] = {}  # heartbeat file -> (its "heartbeat" time, when first seen)


def _lease_left(path: Path, hb: dict[str, Any], now: float) -> tuple[float, float]:
    """(seconds the heartbeat's lease has left by this machine's clock (<= 0: stale; damage is stale), the lease
    it declares). Its times are its writer's clock: a writer whose clock runs ahead (a heartbeat written in our
    future) would hold its lease that much longer, hours after it died, so its lease (expires - heartbeat, at
    most MAX_LEASE) is then counted from when this process first saw that heartbeat, and a beat that changes
    renews it."""
    try:
        expires, beat = float(hb["expires"]), float(hb["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return 0.0, 0.0
    lease = expires - beat
    # damage, not a lease (a beat in our future is no damage: a clock a day ahead, or 5 s ahead with a lease of
    # MAX_LEASE, was taken for damage, so a live worker's units for free; adversarial pass 111)
    if not 0 < lease <= MAX_LEASE:
        return 0.0, 0.0
    if beat <= now + SKEW_SLACK:
        _sighted.pop(str(path), None)
        return expires - now, lease
    seen = _sighted.get(str(path))
    if seen is None or seen[0] != beat:
        seen = _sighted[str(path)] = (beat, time.monotonic())
    return lease - (time.monotonic() - seen[1]), lease


@dataclass
class Claim:
    unit: int
    epoch: int
    owner: Owner | None  # None: the claim file is damaged (its owner is unknown, so it counts as gone)
    # empty: when it was made (`_made_at`). Where links are not supported a claim is created, then filled: empty
    # for CLAIM_FILL_SECONDS, it is a live worker's on its way (pass 102: taken over, a unit computed twice)
    empty_since: float | None = None


# --- commits: markers, shards, verification ------------------------------------------------------------


def commit_name(unit: int, epoch: int, seq: int) -> str:
    return f"{unit:05d}-{epoch:08d}-{seq:04d}"


def key_ranges(flat: list[int]) -> list[list[int]]:
    """Sorted flat keys (row * samples + sample) as [start, stop) runs."""
    runs: list[list[int]] = []
    for k in flat:
        if runs and runs[-1][1] == k:
            runs[-1][1] = k + 1
        else:
            runs.append([k, k + 1])
    return runs


@dataclass
class Commit:
    """A verified (or yet to verify) commit marker: the keys of its shard and its row errors."""

    name: str
    unit: int
    epoch: int
    marker: dict[str, Any]

    @property
    def shard(self) -> str | None:
        return self.marker.get("shard")

    @property
    def written_at(self) -> float | None:
        """When its marker says it was written (in its writer's time zone: workers on several machines), as a
        timestamp; None when the marker has no readable time."""
        import datetime

        try:
            return datetime.datetime.strptime(
                str(self.marker.get("written")), "%Y-%m-%dT%H:%M:%S%z"
            ).timestamp()
        except ValueError:
            return None

    def keys(self) -> Iterator[int]:
        for a, b in self.marker["keys"]:
            yield from range(a, b)


# a row error's field naming the job it was written for: a commit of row errors alone, with no shard (whose metadata
# names the job), copied in from another job's folder set this job's rows aside unrun (adversarial pass 187). In
# each error, not a field of the marker's own: runners that refuse fields no marker has read these as before
ERROR_JOB = "job"
# every field a commit marker has (worker.publish); `check` (its checksum) is absent from older runners' markers
MARKER_FIELDS = frozenset(("format", "unit", "epoch", "seq", "worker", "generation", "shard", "rows", "keys",
                           "errors", "written", "batches", "bytes", "sha256", "check"))  # fmt: skip


def _check_marker(name: str, marker: Any, spec: JobSpec) -> str | None:
    """Why a marker makes no sense for this job (None: it does)."""
    m = COMMIT_RE.fullmatch(name)
    if m is None or not isinstance(marker, dict):
        return "not a commit marker"
    if not set(marker) <= MARKER_FIELDS:
        return "it has fields no marker has"
    if "check" in marker and marker["check"] != marker_checksum(marker):
        return "it does not match its checksum (damaged)"
    unit, epoch = int(m.group(1)), int(m.group(2))
    if marker.get("unit") != unit or marker.get("epoch") != epoch:
        return "its unit/epoch disagree with its name"
    rows = spec.unit_rows_range(unit)
    if not rows:
        return f"unit {unit} is not in the job"
    lo, hi = rows.start * spec.samples, rows.stop * spec.samples
    try:
        keys = marker["keys"]
        n = 0
        for a, b in keys:
            if not (isinstance(a, int) and isinstance(b, int) and lo <= a < b <= hi):
                return "a key is outside its unit"
            n += b - a
        if n != marker["rows"]:
            return "its keys do not add up to its rows"
        shard = marker.get("shard")
        if (shard is None) != (n == 0) or (shard is not None and shard != name + ".parquet"):
            return "its shard name is wrong"
        if shard is not None and not (isinstance(marker["bytes"], int) and isinstance(marker["sha256"], str)):
            return "no size or checksum"
        for e in marker.get("errors", []):
            row, sample = e["row"], e["sample"]
            if e.get(ERROR_JOB, spec.id) != spec.id:
                return f"its row errors were written for job {e[ERROR_JOB]} (copied in from its folder?)"
            if not (
                isinstance(row, int)
                and isinstance(sample, int)
                and row in rows
                and 0 <= sample < spec.samples
            ):
                return "an error is outside its unit"
        if not isinstance(marker.get("generation", 0), int):
            return "bad generation"
    except (KeyError, TypeError, ValueError):
        return "missing or malformed fields"
    return None


class Verifier:
    """Checks shards against their markers: size, sha256 and keys. Results are cached by (size, mtime,
    ctime) in verified.json so a resume does not re-read every shard; any change to a file re-checks it.
    `afresh` (repair) reads every shard whatever the cache says: bytes that changed under unchanged times (bit
    rot, a mount that keeps stale times) are found, and the cache is written again from what was read."""

    def __init__(self, job: Job, afresh: bool = False):
        self.job = job
        self.cache: dict[str, Any] = {}
        self.markers: dict[str, Any] = {}  # commit name -> its marker, as read once by this process
        self.trusted: set[str] = set()  # commits verified or written by this process
        try:
            raw = _read_json_or_none(job.dir / VERIFIED)
        except storage.StorageError as e:
            # only a cache: whatever stands there (a link loop...), or a file that does not read through the retries
            # (one Drive cannot serve for hours held the whole job), start afresh: the shards are read instead
            if not (e.damaged or e.unreadable_for_now):
                raise
            raw = None
        # (another job's: a job.json copied in from another folder must not find this folder's shards vouched for)
        if isinstance(raw, dict) and not afresh and raw.get(VERIFIED_FOR, job.id) == job.id:
            self.cache = raw
        self.dirty = afresh  # (afresh: the cache read is replaced by this one, even where nothing is stamped)

    def check(self, commit: Commit) -> str | None:
        """None if the shard matches its marker, else why not. Transient read errors raise StorageError."""
        if commit.shard is None or commit.name in self.trusted:
            return None
        path = self.job.dir / SHARDS / commit.shard
        # (looked for once more: one "no such file" of a mount's flake took a sound commit for lost, pass 192)
        st = _lstat_or_none(path) or _lstat_or_none(path)
        if st is None:
            return SHARD_MISSING
        import stat as st_mod

        if not st_mod.S_ISREG(st.st_mode):
            return "its shard is not a plain file"
        if st.st_size != commit.marker["bytes"]:
            return f"its shard has {st.st_size} bytes, the marker says {commit.marker['bytes']}"
        stamp = _stamp(st, commit.marker["sha256"])
        if self.cache.get(commit.name) == stamp:
            self.trusted.add(commit.name)
            return None
        why = read_checked_shard(self.job, commit)[1]  # missing now: quarantined by another worker meanwhile
        if why is None:
            self.cache[commit.name] = stamp
            self.trusted.add(commit.name)
            self.dirty = True
        return why

    def remember(self, commit: Commit) -> None:
        """A shard this worker just wrote and committed: read back from the job home and checked once (the
        page cache makes it cheap), then trusted and stamped in the cache like any shard read and found sound,
        so that status and the next worker do not read it again. Stamping what was written without reading it
        back trusted for good whatever befell the file after its bytes were checked (a flipped bit before its
        marker, a flaky mount's copy): the job "completed" with those rows lost (adversarial pass 31). One that
        does not read back sound is left untrusted: the next look at the ledger quarantines it."""
        self.markers[commit.name] = commit.marker
        if commit.shard is None:
            return
        self.trusted.discard(commit.name)
        try:
            self.check(commit)
        except storage.StorageError:
            pass  # a transient read error: checked when the ledger is next read

    def save(self) -> None:
        if self.dirty:
            try:
                self.cache[VERIFIED_FOR] = self.job.id
                storage.write_json(self.job.dir / VERIFIED, self.cache, durable=False)
            except RunnerError:
                pass  # only a cache
            self.dirty = False


VERIFIED_FOR = "job"  # verified.json: the id of the job whose files it vouches for
STATS_FOR = "job"  # stats.json: the id of the job whose runs it lists (absent from an earlier runner's)


def other_job_named(job: Job) -> str | None:
    """Why the job's folder is another job's, as its name in a job home says (a job id), else None: a
    job.json copied in from another job's folder with its backup (pass 79: status showed that job's id and
    settings). Free to check: what its results say is read where they are verified."""
    other = _other_job_here(job.dir, job.id, set())
    if other is not None:
        return f"{other}, but job.json is job {job.id}'s (copied in from its folder?)"
    return copy_in_home(job)


def forget_verified(job: Job, name: str) -> None:
    """Drop a commit's stamp from verified.json: a reader found its shard failing its marker though the stamp
    vouched for it (bytes changed under unchanged times), so the next worker or status reads it again and
    quarantines it. Only a cache: anything in the way (a read-only copy of the job) leaves it as it was."""
    try:
        verifier = Verifier(job)
    except RunnerError:
        return
    verifier.dirty = verifier.cache.pop(name, None) is not None
    verifier.save()


def stamp_prompts(folder: Path, sha256: str) -> None:
    """Record in the verified.json of a job being submitted in `folder` that its prompts.parquet, as it stands,
    was hashed to `sha256` (its stamp: size and times, as `prompts_problem` keeps it), so that `runner status`
    does not hash (on a network mount: download) it again before any worker has. A file system whose renames
    change the times only costs that one hashing."""
    st = storage.retry(lambda: (folder / PROMPTS).stat(), f"read {folder / PROMPTS}")
    storage.write_json(folder / VERIFIED, {PROMPTS: _stamp(st, sha256)}, durable=False)


def _stamp(st: os.stat_result, sha256: str | None) -> list[Any]:
    """What verified.json keeps of a file hashed to `sha256`: its size and times with it (any change to the file
    changes them, and it is hashed again)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256]


def prompts_problem(job: Job, verifier: Verifier | None = None, afresh: bool = False) -> str | None:
    """Why prompts.parquet is not the file submit wrote (its sha256 is in job.json), else None (also for a job
    stored before the checksum was). With a `verifier`, a file whose size and times are as its cache recorded
    is not read again (unless `afresh`: a worker starting on the job, as bytes may change under unchanged
    times), and one read and found sound is recorded there."""
    expected = job.spec.prompts_sha256
    path = job.dir / PROMPTS
    stamp = _stamp(storage.retry(lambda: path.stat(), f"read {path}"), expected)
    if expected is None or (
        not afresh and stamp in (_HASHED.get(str(path)), verifier and verifier.cache.get(PROMPTS))
    ):
        return None
    blocks: list[bytes] = []
    # (hashed twice before it is damage: a torn read stopped a worker, and repair set the sound file aside)
    if read_again_if_damaged(functools.partial(_sha256, path, blocks), lambda d: d != expected) != expected:
        # what vouched for it (bytes changed under unchanged times: a power cut, bit rot) is dropped, so that
        # `runner status` hashes it again and says broken too, not queued for ever (pass 122)
        _HASHED.pop(str(path), None)
        _BLOCKS.pop(str(path), None)
        if verifier is not None:
            verifier.cache.pop(PROMPTS, None)
        forget_verified(job, PROMPTS)
        return (f"prompts.parquet of job {job.id} is damaged (it does not match its checksum): `runner repair "
                f"{shlex.quote(str(job.dir))}` writes it again from the input file if that is unchanged; else "
                "submit the file again")  # fmt: skip
    _HASHED[str(path)], _BLOCKS[str(path)] = stamp, blocks
    if verifier is not None:
        verifier.cache[PROMPTS] = stamp
        verifier.dirty = True
    return None


# prompts.parquet files this process hashed and found sound, with their stamps: where verified.json cannot be
# written (a read-only copy of a home), `runner watch` / status polls still hash each one once (pass 75)
_HASHED: dict[str, list[Any]] = {}
# and the digests of their blocks then, which a unit's rows are read against (`Job.read_rows`)
_BLOCKS: dict[str, list[bytes]] = {}


def invalid_problem(job: Job, verifier: Verifier | None = None) -> str | None:
    """Why errors.jsonl is not the file submit wrote, else None: its sha256 is in job.json (a job stored before
    the checksum was: each line must be a JSON object, as many as job.json counts). `runner repair` writes it
    again from the input file when that is unchanged (jobs.restore_inputs). With a `verifier` (`runner
    status`), a file whose size and times are as its cache recorded is not read again, as prompts.parquet."""
    path = job.dir / INVALID
    st = _lstat_or_none(path) if verifier is not None else None
    stamp = st and _stamp(st, job.meta["input"].get("invalid_sha256"))
    if stamp and verifier.cache.get(INVALID) == stamp:
        return None
    why = _invalid_mismatch(job)
    if why is None:
        if stamp:
            verifier.cache[INVALID], verifier.dirty = stamp, True
        return None
    if verifier is not None:
        verifier.cache.pop(INVALID, None)
    return (f"errors.jsonl of job {job.id} is damaged ({why}): the input lines refused at submit cannot be listed; "
            f"`runner repair {shlex.quote(str(job.dir))}` writes it again from the input file if that is unchanged; "
            f"else submit the file again (its results are in their shards: `runner results {shlex.quote(str(job.dir))} "
            "--to FILE.jsonl` still exports them)")  # fmt: skip


def _invalid_mismatch(job: Job) -> str | None:
    path, read = job.dir / INVALID, job.meta["input"]
    # (looked for once more: one "no such file" of a mount's flake refused every export, pass 192)
    found = storage.kind(path) or storage.kind(path)
    if found != "file":
        return "it is missing" if found is None else f"a {found} stands there, not a file"
    if "invalid_sha256" in read:
        expected = read["invalid_sha256"]  # (hashed twice before it is damage: repair set a sound file aside)
        same = read_again_if_damaged(functools.partial(_sha256, path), lambda d: d != expected) == expected
        return None if same else "it does not match its checksum"
    count = _count_objects(path)
    if count is None:
        return "a line is not a JSON object"
    expected = read.get("invalid")
    return None if count == expected else f"it lists {counted(count, 'lines')}, job.json counts {expected:,}"


def _sha256(path: Path, blocks: list[bytes] | None = None) -> str:
    """storage.file_sha256 of `path`, transient errors retried."""
    return storage.retry(lambda: storage.file_sha256(path, blocks), f"read {path}")


def _count_objects(path: Path) -> int | None:
    """The lines of a JSON-lines file, or None when one is not a JSON object (or not UTF-8)."""
    count = 0
    try:
        for line in storage.read_lines(path):
            if not isinstance(json.loads(line), dict):
                return None
            count += 1
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
        return None
    return count


def read_shard(job: Job, commit: Commit) -> tuple[bytes, str | None]:
    """(the bytes of a commit's shard, None), or (b"", why not) when it is missing or not a plain file.
    Transient read errors raise StorageError."""
    try:
        return storage.read_bytes(job.dir / SHARDS / commit.shard), None
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return b"", SHARD_MISSING
        if isinstance(e.__cause__, IsADirectoryError):  # storage's word for a folder, FIFO... (not a file)
            return b"", "its shard is not a plain file"
        raise


def read_checked_shard(job: Job, commit: Commit) -> tuple[bytes, str | None]:
    """(a commit's shard bytes, None), or (what was read, why they are not what its marker vouches for). Bytes
    that do not check are read once more before they are taken for damage: a torn read on a network mount (a
    page dropped or served stale, once) made a worker quarantine a sound commit and compute its rows again, and
    an export leave them out. Damage reads back the same; a torn read does not. Transient errors raise
    StorageError."""

    def read() -> tuple[bytes, str | None]:
        data, why = read_shard(job, commit)
        return data, why or check_shard_bytes(data, commit, job)

    return read_again_if_damaged(read, lambda got: got[1] is not None and bool(got[0]))


def check_shard_bytes(data: bytes, commit: Commit, job: Job) -> str | None:
    """Why these bytes are not the shard of `job` the marker vouches for (None: they are). A commit copied in
    whole (marker and shard) from another job checks out against its own marker: the job its shard names
    tells it (pass 79: another seed's samples, another file's rows, taken in as this job's)."""
    if hashlib.sha256(data).hexdigest() != commit.marker["sha256"]:
        return "its shard does not match its checksum"
    try:
        table = read_shard_bytes(data, columns=[ORDER, "sample"])
    except Exception as e:  # pyarrow raises its own types on a damaged file
        return f"its shard cannot be read ({type(e).__name__})"
    written_for = (table.schema.metadata or {}).get(b"runner.job")  # (none in an older runner's shards)
    if written_for is not None and written_for.decode("utf-8", "replace") != job.id:
        return f"its shard was written for job {written_for.decode('utf-8', 'replace')} (copied in from its folder?)"
    flat = (table.column(ORDER).to_numpy() * job.samples + table.column("sample").to_numpy()).tolist()
    if sorted(flat) != list(commit.keys()):
        return "its shard holds other keys than its marker"
    return None


def read_shard_bytes(data: bytes, columns: list[str] | None = None) -> Any:
    """A shard's table. Through ParquetFile, not read_table: read_table's dataset reader reserves the names
    `__filename`, `__batch_index` ..., and a passthrough column so named made every shard unreadable."""
    import pyarrow as pa

    return read_parquet(pa.BufferReader(data), columns)


def read_parquet(source: Any, columns: list[str] | None = None) -> Any:
    """A whole Parquet file (a path or a buffer) as one table, whatever its column names (`read_shard_bytes`)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(storage.arrow_file(source)).read(columns=columns)


def _made_under(commit: Commit) -> int:
    """The retry generation a commit's marker says it was made under; -1 where that is no generation (a bool)."""
    g = commit.marker.get("generation", 0)
    return g if type(g) is int and g >= 0 else -1


@dataclass
class Ledger:
    """What a job has done, from its commits: the accepted, verified commits; which keys are done; which
    failed (under the current retry generation); and the commits that failed verification."""

    job: Job
    commits: list[Commit]
    bad: list[tuple[str, str]]  # (commit name, why) of markers/shards that failed verification
    generation: int
    current: dict[int, int]  # unit -> newest epoch
    claim_names: dict[int, str]  # unit -> the file of its newest claim, read at first ask (`claim`)
    # what checked it: its cache spares hashing prompts.parquet again (absent_mask)
    verifier: Verifier | None = None
    _claims: dict[int, Claim] = field(default_factory=dict, repr=False)

    def claim(self, unit: int) -> Claim | None:
        """The unit's newest claim. Read when first asked for: only units with keys left are, so a worker taking
        a unit of a job of 1,000 no longer reads 1,000 claim files (a round trip each on Drive; pass 111)."""
        if unit not in self._claims and unit in self.claim_names:
            self._claims[unit] = _read_claim(self.job.dir / CLAIMS / self.claim_names[unit], unit)
        return self._claims.get(unit)

    def held(self, unit: int, live: dict[str, dict[str, Any]]) -> bool:
        """Whether a live worker holds the unit (`claim_is_live`). A claim that reads as no live worker's is read
        once more first: a torn read of a live worker's claim (a page dropped or served stale, once: its owner
        cut short, or a digit of its name other than it is) made its unit free, and the worker computing it lost
        its rows to a taker (adversarial pass 193)."""
        if claim_is_live(self.claim(unit), live):
            return True
        self._claims.pop(unit, None)
        return claim_is_live(self.claim(unit), live)

    def done_mask(self) -> Any:
        """[rows, samples] bool: keys in accepted, verified shards."""
        import numpy as np

        spec = self.job.spec
        flat = np.zeros(spec.rows * spec.samples, dtype=bool)  # the key grid; absent keys stay False
        for c in self.commits:
            for a, b in c.marker["keys"]:
                flat[a:b] = True
        return flat.reshape(spec.rows, spec.samples)

    def bad_holding_errors(self) -> int:
        """How many commits failing verification (`bad`) may hold row errors of this generation, left out of
        `errors`: their markers say so, or do not read."""
        held = 0
        for name, _ in self.bad:
            marker = (self.verifier.markers.get(name) if self.verifier else None) or {}
            if _check_marker(name, marker, self.job.spec) is not None or (
                marker.get("errors") and marker.get("generation", 0) == self.generation
            ):
                held += 1
        return held

    def lost_rows(self) -> dict[int, tuple[str, str]]:
        """row -> (commit, why) for rows with keys in a commit whose marker reads but whose shard failed
        verification (`bad`), and not done by another commit since: computed, then lost (not never done)."""
        done, samples, lost = self.done_mask().reshape(-1), self.job.spec.samples, {}
        for name, why in self.bad:
            marker = (self.verifier.markers.get(name) if self.verifier else None) or {}
            if _check_marker(name, marker, self.job.spec) is not None:
                continue  # (its keys are not to be trusted)
            for a, b in marker["keys"]:
                lost.update({k // samples: (name, why) for k in range(a, b) if not done[k]})
        return lost

    def errors(self) -> Iterator[dict[str, Any]]:
        """Row errors of the current generation for keys not done since, one per key."""
        done = self.done_mask().reshape(-1)
        seen: set[tuple[int, int]] = set()
        for c in self.commits:
            if c.marker.get("generation", 0) != self.generation:
                continue
            for e in c.marker.get("errors", []):
                key = (e["row"], e["sample"])
                if key in seen or done[e["row"] * self.job.spec.samples + e["sample"]]:
                    continue
                seen.add(key)
                yield {k: v for k, v in e.items() if k != ERROR_JOB}

    def newest_generation(self) -> int:
        """The newest retry generation a counted commit was made under. Never above the state's, whose records
        only go up: a higher one is proof that the record of the `runner retry` that raised it is missing
        (deleted, or an older record copied over it: a sync conflict, a restore from an old backup)."""
        return max([0, *(_made_under(c) for c in self.commits)])

    def newer_than(self, generation: int) -> list[Commit]:
        """The counted commits made under a newer retry generation than `generation` (`newest_generation`)."""
        return [c for c in self.commits if _made_under(c) > generation]

    def failed_mask(self) -> Any:
        import numpy as np

        mask = np.zeros((self.job.spec.rows, self.job.spec.samples), dtype=bool)
        for e in self.errors():
            mask[e["row"], e["sample"]] = True
        return mask

    def left_mask(self) -> Any:
        """[rows, samples] bool: keys of the job neither done nor failed."""
        left = ~(self.done_mask() | self.failed_mask())
        absent = self.job.absent_mask(self.verifier)
        return left if absent is None else left & ~absent

    def unit_left(self) -> Any:
        """[units] int: keys neither done nor failed, per unit."""
        import numpy as np

        spec = self.job.spec
        left = self.left_mask()
        per_row = left.sum(axis=1)
        return np.add.reduceat(per_row, np.arange(0, spec.rows, spec.unit_rows))


def read_ledger(
    job: Job,
    *,
    seal: bool = False,
    verifier: Verifier | None = None,
    verify: bool = True,
    generation: int | None = None,
    unread_bad: bool = False,
) -> Ledger:
    """Read every commit of the job and keep those that count: markers of each unit's newest epoch and those
    listed in the seals of older epochs, whose shards verify. `seal`: fix the seal of each superseded
    epoch that has none (workers do; readers only look). Transient errors raise StorageError; with `unread_bad`
    (repair), a commit whose marker or shard does not read through the retries is bad (UNREAD)."""
    generation = job.state().generation if generation is None else generation
    # the markers listed before the seals are read: a seal written meanwhile still judges the markers listed (a
    # superseded worker's late marker, landing between the two reads, was counted as if its epoch had no seal,
    # then dropped out at the next read; pass 74)
    names = [n[:-5] for n in scan(job.dir / MARKERS) if n.endswith(".json") and COMMIT_RE.fullmatch(n[:-5])]
    claims, seals, current = _read_claims(job)
    by_unit: dict[int, list[tuple[int, str]]] = {}
    for n in names:
        m = COMMIT_RE.fullmatch(n)
        assert m is not None
        unit, epoch = int(m.group(1)), int(m.group(2))
        by_unit.setdefault(unit, []).append((epoch, n))
        current[unit] = max(current.get(unit, -1), epoch)
    verifier = verifier or Verifier(job)
    commits, bad = [], []
    for unit, entries in sorted(by_unit.items()):
        for epoch, n in sorted(entries):
            if epoch < current[unit]:
                accepted = seals.get((unit, epoch))
                if accepted is None and seal:
                    accepted = seal_epoch(job, unit, epoch)
                if accepted is not None and n not in accepted:
                    continue  # committed after its epoch was sealed: a stale worker's, never counted
            try:
                marker, why = _read_marker(job, n, verifier)
                if marker is None and storage.kind(job.dir / MARKERS / f"{n}.json") is None:
                    continue  # moved to quarantine by another worker since the listing
                commit = Commit(n, unit, epoch, marker if isinstance(marker, dict) else {})
                if why is None and verify:
                    why = verifier.check(commit)
            except storage.StorageError as e:
                if not (unread_bad and e.unreadable_for_now):
                    raise
                why = f"{UNREAD} ({first_line(e)})"
            if why is None:
                commits.append(commit)
            else:
                bad.append((n, why))
    if seal:
        verifier.save()
    return Ledger(job, commits, bad, generation, current, claims, verifier)


UNREAD = "it did not read through the retries"  # a commit's marker or shard (`read_ledger`'s `unread_bad`)


def _read_marker(job: Job, name: str, verifier: Verifier) -> tuple[Any, str | None]:
    """(a commit marker as read, None: missing or not JSON; why it makes no sense for the job, or None), the one
    `verifier` keeps if it has it: only a marker that makes sense is kept. One that does not is read once more
    before it is taken for damage: a torn read on a network mount (cut short, or a digit other than it is, once)
    made a worker quarantine a sound commit, and a marker read so was kept as read for the rest of the process,
    so that no later look could find it sound."""
    if (kept := verifier.markers.get(name)) is not None:
        return kept, None
    path = job.dir / MARKERS / f"{name}.json"

    def read() -> tuple[Any, str | None]:
        marker = _read_json_or_none(path)
        return marker, _check_marker(name, marker, job.spec)

    marker, why = read_again_if_damaged(read, lambda got: got[1] is not None)
    if why is None:
        verifier.markers[name] = marker
    return marker, why


def _read_claims(job: Job) -> tuple[dict[int, str], dict[tuple[int, int], set[str] | None], dict[int, int]]:
    """(unit -> the file of its newest claim, (unit, epoch) -> accepted commit names of its seal, unit -> newest
    epoch). A damaged seal accepts every commit of its epoch (counting a commit twice cannot happen: keys)."""
    claims: dict[int, str] = {}
    seals: dict[tuple[int, int], set[str] | None] = {}
    current: dict[int, int] = {}
    for n in scan(job.dir / CLAIMS):
        if m := SEAL_RE.fullmatch(n):
            raw = _read_json_or_none(job.dir / CLAIMS / n)
            seals[(int(m.group(1)), int(m.group(2)))] = _seal_commits(raw)
        elif m := CLAIM_RE.fullmatch(n):
            unit, epoch = int(m.group(1)), int(m.group(2))
            if epoch > current.get(unit, -1):
                current[unit] = epoch
                claims[unit] = n
    # a damaged seal (None) accepts everything: drop it from the map so callers see "no restriction"
    return claims, {k: v for k, v in seals.items() if v is not None}, current


def _read_claim(path: Path, unit: int) -> Claim:
    """The claim at `path` (a name of CLAIM_RE); its owner None when it is damaged, or empty (`empty_since`)."""
    m = CLAIM_RE.fullmatch(path.name)
    assert m is not None and int(m.group(1)) == unit
    raw = _read_json_or_none(path)
    owner = Owner.from_dict(raw) if isinstance(raw, dict) else None
    return Claim(unit, int(m.group(2)), owner, _empty_since(path) if raw is None else None)


def _empty_since(path: Path) -> float | None:
    """When the empty file at `path` was made (`_made_at`), or None when it is not an empty file."""
    st = _lstat_or_none(path)
    return _made_at(path) if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == 0 else None


def seal_epoch(job: Job, unit: int, epoch: int) -> set[str] | None:
    """Fix which commits of a superseded epoch count: the markers there now. Written once (first writer
    wins); returns the seal in force, or None when it is damaged (then every commit of the epoch counts).
    Where links are not supported a seal is created empty, then filled with the listing its writer made before:
    one found empty is waited for, and still empty it is taken over (`_adopt_unfilled`: a writer frozen in
    between then fills a file no longer at the name). Read as damaged, it let every commit of the epoch count, a
    superseded worker's late one too; a worker wrote the job completed on it, and the writer, continued, filled
    the seal with its older listing, which left that commit out: the job, completed, had rows missing (pass 186)."""
    prefix = f"{unit:05d}-{epoch:08d}-"
    path = job.dir / CLAIMS / seal_name(unit, epoch)
    for _ in range(3):
        present = [n[:-5] for n in scan(job.dir / MARKERS) if n.startswith(prefix) and n.endswith(".json")]
        body: dict[str, Any] = {"unit": unit, "epoch": epoch, "commits": present, "sealed": time.time()}
        body["check"] = storage.json_checksum(body)
        data = _exclusive_json(body)
        if create_exclusive_bytes(path, data):
            return set(present)
        raw = _read_json_or_none(path)
        if raw is not None or links_supported(path.parent) is True:
            return _seal_commits(raw)
        if _empty_since(path) is not None:
            if _adopt_unfilled(path, data, 1):
                return set(present)
        elif storage.kind(path) is not None:
            # filled since the read above, or damaged (then every commit of the epoch counts)
            return _seal_commits(_read_json_or_none(path))
        # (filled meanwhile, by its writer or another taker, or aside for a moment: read again)
    return _seal_commits(_read_json_or_none(path))


def _seal_commits(raw: Any) -> set[str] | None:
    """The commit names a seal accepts; None when it is damaged: not a list of names, or (seals written since
    runner carries one) not matching its checksum, so that a changed byte in a name is noticed, not obeyed
    (it would leave a good commit out, or let a stale worker's in)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("commits"), list):
        return None
    if not all(isinstance(n, str) for n in raw["commits"]):
        return None
    if storage.fails_its_check(raw):
        return None
    return set(raw["commits"])


def claim_is_live(claim: Claim | None, live: dict[str, dict[str, Any]]) -> bool:
    """Whether a live worker holds the unit: the claim's owner heartbeats, or the claim is empty for less than
    CLAIM_FILL_SECONDS (being filled; empty for longer, its writer was killed between the create and the fill)."""
    if claim is None:
        return False
    if claim.owner is None:
        return claim.empty_since is not None and time.time() - claim.empty_since < CLAIM_FILL_SECONDS
    return claim.owner.worker in live


def take_unit(job: Job, unit: int, owner: Owner, after: int) -> int | None:
    """Claim epoch `after + 1` of `unit` for `owner` (exclusive create), then seal every older epoch. Returns
    the epoch, or None if another worker claimed it first."""
    epoch = after + 1
    storage.ensure_dir(job.dir / CLAIMS)
    record = {**owner.as_dict(), "unit": unit, "epoch": epoch, "claimed": time.time()}
    path = job.dir / CLAIMS / claim_name(unit, epoch)
    if not create_exclusive(path, record):
        if storage.kind(path) not in ("file", None):  # not a claim: it would block the unit for ever
            raise BrokenJob(f"{path} is not a file; `runner repair` sets it aside")
        return None
    names = scan(job.dir / CLAIMS)
    for e in range(epoch):  # a taker that died before sealing leaves its predecessor to the next one
        if seal_name(unit, e) not in names:
            seal_epoch(job, unit, e)
    return epoch


def still_holds(job: Job, unit: int, epoch: int, worker: str | None = None) -> bool:
    """No later epoch of the unit exists: checked right before each commit. With `worker`, the claim of `epoch`
    must also still be that worker's: in a folder deleted and submitted again under it (`check_still_this_job`),
    or whose claims/ was lost, the claim there is another worker's or none, and a commit would land over the
    other one's of the same name."""
    path = job.dir / CLAIMS / claim_name(unit, epoch + 1)

    def op() -> bool:
        try:
            os.lstat(path)
            return False
        except FileNotFoundError:
            return True

    if not storage.retry(op, f"read {path}"):
        return False
    if worker is None:
        return True
    # (read once more before the unit is taken for lost: a torn read made a worker drop the rows it had computed)
    owner = read_again_if_damaged(
        lambda: _read_claim(job.dir / CLAIMS / claim_name(unit, epoch), unit).owner,
        lambda o: o is None or o.worker != worker,
    )
    return owner is not None and owner.worker == worker


def write_marker(job: Job, unit: int, epoch: int, seq: int, marker: dict[str, Any]) -> None:
    """Write a commit marker with its own checksum (`check`), so that a changed byte in it is noticed, not obeyed.
    Its rename is the job's still (`commit_check`)."""
    storage.ensure_dir(job.dir / MARKERS)  # lost with every marker in it: their rows are simply redone
    path = job.dir / MARKERS / f"{commit_name(unit, epoch, seq)}.json"
    storage.write_json(path, {**marker, "check": marker_checksum(marker)}, check=commit_check(job))


def commit_check(job: Job) -> Callable[[], None]:
    """What a commit's shard and marker check right before their rename into the job folder: that it still holds
    `job` (`check_still_this_job`). A worker paused inside its commit (its claim checked, SIGSTOP, a suspended
    VM) while the folder was deleted and the file submitted again to it wrote its shard or marker over the new
    job's of the same name (unit 0, epoch 0 in both): that commit no longer verified, and the new job, completed,
    was left broken with its rows missing (adversarial pass 153). Seals fence such a late commit within one job,
    not across two."""
    return lambda: check_still_this_job(job)


def marker_checksum(marker: dict[str, Any]) -> str:
    """sha256 of a marker's content (all but its `check` field)."""
    return storage.json_checksum(marker)


SHARD_MISSING = "its shard is missing"
# seconds another host's marker whose shard is not there is left in place by workers: a mount that shows another
# machine's files late (Drive between two VMs) can show its small marker before its shard, which arrives after
SHARD_ARRIVAL_SECONDS = 600.0


def quarantine(job: Job, name: str, why: str, *, waiting: bool = True) -> bool:
    """Move a commit that failed verification (marker and shard) into quarantine/, keeping it for a look;
    False when it was left in place. Another host's marker younger than SHARD_ARRIVAL_SECONDS whose shard is
    missing is left (`waiting`, `shards_in_transit`; `runner repair` sets it aside whatever its age): it does
    not count meanwhile, and its rows are computed again as for any commit that does not verify, but it is not
    taken for damage. On a mount that shows another machine's files late, the marker of a commit just made
    shows before its shard: a worker on another VM moved a sound commit aside, and a job completed meanwhile
    was left with those rows missing (`runner repair` to compute them again) once the shard arrived
    (adversarial pass 132)."""
    if waiting and shards_in_transit(job, [(name, why)]):
        return False
    q = job.dir / QUARANTINE
    storage.ensure_dir(q)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for src in (job.dir / MARKERS / f"{name}.json", job.dir / SHARDS / f"{name}.parquet"):
        try:
            if storage.kind(src) is None:
                continue  # (a link is moved as a link: never followed)
        except storage.StorageError as e:
            if not e.unreadable_for_now:
                raise  # (one that does not stat through the retries, `UNREAD`, is moved all the same)
        try:
            storage.retry(lambda s=src: os.replace(s, q / f"{stamp}-{s.name}"), f"move {src}")
        except storage.StorageError:
            pass  # it stays ignored where it is
    # (only a record: a line that does not land stopped the worker that found the commit with "cannot be written")
    with contextlib.suppress(RunnerError):
        job.log(f"quarantined commit {name}: {why}; its rows are computed again")
    return True


def shards_in_transit(job: Job, bad: list[tuple[str, str]]) -> bool:
    """Whether every commit of `bad` (name, why) is one `quarantine` leaves in place: its shard missing, its
    marker written by a worker on another host and younger than SHARD_ARRIVAL_SECONDS (a shard still on its way
    from another machine; this machine's own shards are here once their markers are); False for none."""
    return bool(bad) and all(
        why == SHARD_MISSING and _in_transit_from_elsewhere(job.dir / MARKERS / f"{name}.json")
        for name, why in bad
    )


def made_elsewhere_lately(job: Job, commits: list[Commit]) -> bool:
    """Whether every commit of `commits` (one at least) was made by a worker on another host, its marker younger
    than SHARD_ARRIVAL_SECONDS (as `shards_in_transit` tells): a mount that shows another machine's files late
    (Drive between two VMs) may show such a commit before a file written there before it (the state record of the
    `runner retry` it was made under)."""
    return bool(commits) and all(
        _in_transit_from_elsewhere(job.dir / MARKERS / f"{c.name}.json") for c in commits
    )


def flight_generations(job: Job) -> dict[str, int]:
    """{inflight/UUUUU.json: the retry generation it was written under} of the job's in-flight records that read
    whole (their checksum holds) and name this job. A worker writes one only under the generation of the state
    record it read (`InFlight`, after that record was created and filled), so one newer than the state's is proof,
    as a commit is, that the record of the `runner retry` that raised it is missing. Claims and heartbeats name
    no generation, and log.txt has no checksum: neither is such proof."""
    folder, out = job.dir / INFLIGHT, {}
    for name, what in sorted(storage.kinds(folder).items()):
        rec = _read_json_or_none(folder / name) if what == "file" and INFLIGHT_RE.fullmatch(name) else None
        # (one of an older runner names no job and has no check: no proof)
        if (
            not isinstance(rec, dict)
            or "check" not in rec
            or storage.fails_its_check(rec)
            or rec.get("job") != job.id
        ):
            continue
        gen = rec.get("generation", 0)
        if type(gen) is int and gen >= 0:
            out[f"{INFLIGHT}/{name}"] = gen
    return out


def flown_elsewhere_lately(job: Job, names: list[str]) -> bool:
    """Whether every in-flight record of `names` (one at least) was written by a worker on another host (or
    another boot) less than SHARD_ARRIVAL_SECONDS ago: a mount that shows another machine's files late may show
    it before the state record its worker read there (`made_elsewhere_lately`)."""
    return bool(names) and all(_flown_from_elsewhere(job.dir / name) for name in names)


def _flown_from_elsewhere(path: Path) -> bool:
    rec = _read_json_or_none(path)
    worker = rec.get("worker") if isinstance(rec, dict) else None
    if not isinstance(worker, str):
        return False
    owner = rec.get("owner")
    boot = owner.get("boot") if isinstance(owner, dict) else None
    elsewhere = worker.rsplit("-", 2)[0] != host_tag() or (bool(boot) and boot != storage.boot_id())
    return elsewhere and _younger_than(path, SHARD_ARRIVAL_SECONDS)


def _in_transit_from_elsewhere(marker: Path) -> bool:
    raw = _read_json_or_none(marker)
    worker = raw.get("worker") if isinstance(raw, dict) else None
    if not isinstance(worker, str):
        return False
    elsewhere = worker.rsplit("-", 2)[0] != host_tag() or _claimed_on_another_machine(marker, worker)
    return elsewhere and _younger_than(marker, SHARD_ARRIVAL_SECONDS)


def _claimed_on_another_machine(marker: Path, worker: str) -> bool:
    """Whether the claim the commit at `marker` was made under is `worker`'s, made on another boot than this
    process's: a machine whose host name is this one's (two VMs named alike, `--hostname worker`), whose files
    this mount may show late all the same (adversarial pass 168: its young marker was set aside at once as this
    machine's own damage). The boot alone tells: a container of this boot (another PID namespace, the host's
    name under `--network host`) writes through this kernel, so its shard is here once its marker is. False
    when the claim does not tell (gone, damaged, another worker's, or from a runner that did not record the
    boot)."""
    m = COMMIT_RE.fullmatch(marker.name[: -len(".json")])
    if m is None:
        return False
    try:
        owner = _read_claim(marker.parent.parent / CLAIMS / claim_name(int(m.group(1)), int(m.group(2))),
                            int(m.group(1))).owner  # fmt: skip
    except (RunnerError, OSError):
        return False
    return (
        owner is not None and owner.worker == worker and bool(owner.boot) and owner.boot != storage.boot_id()
    )


def _younger_than(path: Path, seconds: float) -> bool:
    """The file at `path` was modified less than `seconds` ago; False when it is gone. One dated ahead by more
    than SKEW_SLACK (its writer's clock runs ahead of this one's) is as old as the time since this process
    first saw it: taken for old at once, a marker just written on a VM whose clock ran two minutes ahead was
    set aside before its shard arrived, and the job was left with those rows missing (adversarial pass 141).
    Dated ahead by more than `seconds` it is not believed (a clock days ahead would keep it young for days)."""
    st, now = _lstat_or_none(path), time.time()
    if st is None or st.st_mtime > now + seconds:
        return False
    if st.st_mtime <= now + SKEW_SLACK:
        return now - seconds < st.st_mtime
    return now - _FIRST_SEEN.setdefault((os.fspath(path), st.st_ino, st.st_mtime_ns), now) < seconds


def _lstat_or_none(path: Path) -> os.stat_result | None:
    """os.lstat of `path`, None when there is nothing there; transient read errors retried (then StorageError)."""
    try:
        return storage.retry(lambda: os.lstat(path), f"read {path}")
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


# --- status of a job, as the scheduler and `runner status` need it ----------------------------------------


@dataclass
class Progress:
    """A job's standing from its folder: counts of keys, units left, who works on it."""

    done: int
    failed: int
    total: int
    units_left: list[int]  # units with keys neither done nor failed
    claimable: list[int]  # of those, units no live worker holds
    live: dict[str, dict[str, Any]]  # live workers' heartbeats
    bad: list[tuple[str, str]]
    started: bool  # some commit or claim exists
    # of units_left, those held by a claim still empty (no links)
    filling: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.units_left


def job_progress(job: Job, ledger: Ledger | None = None) -> Progress:
    ledger = ledger or read_ledger(job)
    done = int(ledger.done_mask().sum())
    failed = int(ledger.failed_mask().sum())
    left = [u for u, n in enumerate(ledger.unit_left().tolist()) if n > 0]
    live = live_workers(job)
    claimable = [u for u in left if not ledger.held(u, live)]
    filling = [u for u in left if u not in claimable and (c := ledger.claim(u)) and c.owner is None]
    started = bool(ledger.commits or ledger.claim_names or ledger.bad)
    return Progress(done, failed, job.spec.total, left, claimable, live, ledger.bad, started, filling)


def read_errors(job: Job, ledger: Ledger | None = None) -> list[dict[str, Any]]:
    """Rows that could not be done: invalid input rows (stage validate), then row errors of the current
    retry generation (stage generate / score / embed), each with id, line, stage, error and message."""
    out = list(job.invalid_rows())
    out.extend((ledger or read_ledger(job, generation=state_as_read(job)[0].generation)).errors())
    return out


# --- transitions ------------------------------------------------------------------------------------------


def cancel(job: Job) -> JobState:
    """Cancel a queued or running job (running workers stop between batches, keeping finished rows): one
    state record. Returns the state it was in."""
    was: list[JobState] = []

    def decide(old: StateRecord) -> StateRecord:
        if old.state in (JobState.COMPLETED, JobState.CANCELLED):
            raise RunnerError(f"job {job.id} is already {old.state}")
        was.append(old.state)
        return StateRecord(JobState.CANCELLED, old.generation)

    change_state(job, decide, "cancel")
    return was[-1]


def retry(job: Job) -> int:
    """Re-queue a failed or cancelled job, or one with row errors: finished rows are kept, failed rows are
    tried again. One state record (the retry generation goes up, so older row errors stop counting).
    Returns how many rows had errors cleared (a row's -n samples count once)."""
    cleared: list[int] = []

    def decide(old: StateRecord) -> StateRecord:
        ledger = read_ledger(job, generation=old.generation)
        cleared.append(len({e["row"] for e in ledger.errors()}))
        if old.state not in (JobState.FAILED, JobState.CANCELLED) and not cleared[-1]:
            # (a completed job whose files were damaged is repair's: retry said nothing of it)
            mend = (
                f" (damaged or missing files are mended by `runner repair {job.id}`)"
                if old.state == JobState.COMPLETED
                else ""
            )
            raise RunnerError(
                f"job {job.id} is {old.state}; only failed or cancelled jobs, or jobs with row errors, can be "
                f"retried{mend}"
            )
        # past every generation rows were committed under: where an earlier retry's record is missing (deleted,
        # or an older one copied over it), its generation again counted the row errors committed under it, and
        # this retry re-queued rows it then never ran ("1 row's errors cleared", then nothing computed)
        # (and past the generation a worker's in-flight record names: taken again, its killed batch would count as a
        # crash of this retry's rows)
        made = max([ledger.newest_generation(), *flight_generations(job).values()])
        return StateRecord(JobState.QUEUED, max(old.generation, made) + 1)

    change_state(job, decide, "retry")
    return cleared[-1]


@dataclass
class RepairReport:
    restored_spec: bool = False
    mended_backup: bool = False  # job.backup.json was damaged or missing: written again from job.json
    state_was: str | None = None
    state_now: str | None = None
    quarantined: list[tuple[str, str]] = field(default_factory=list)
    done: int = 0
    total: int = 0
    # the command the damaged newest record says wrote it (unverified): "retry", "cancel"; "" for an empty one;
    # UNKNOWN_WRITER for one that says no writer any more
    damaged_by: str | None = None
    # a damaged record in transit was set aside: the command it says wrote it ("cancel", "retry"; "" unknown)
    damaged_aside: str | None = None
    # the newest record was empty, its writer's whole record set aside beside it (a put-back killed half way):
    # the command that wrote it ("cancel", "retry", ...), whose word repair kept
    aside_word: str | None = None
    restored_inputs: list[str] = field(default_factory=list)  # written again from the input file (jobs.py)
    unrestorable: str | None = None  # why prompts.parquet / errors.jsonl, damaged, could not be written again
    foreign_records: list[str] = field(default_factory=list)  # state records of another job, set aside
    # state records below the newest that did not read through the retries, set aside (`_quarantine_unread_records`)
    unread_records: list[str] = field(default_factory=list)
    # the newest record read, but under a retry generation older than the job's other records or its commits
    # were written under (a retry's record deleted, or an older one copied over it): (what it said, recorded now)
    lost_retry: tuple[int, int] | None = None


# RepairReport.damaged_by of a newest record whose writer does not read at all (bytes that are no record, or no
# file): it may have been any command's
UNKNOWN_WRITER = "unknown"
# the writers a state record names (`by`): the commands, a worker's outcome, repair, Job.set_state
WRITERS = ("cancel", "retry", "completed", "failed", "repair", "set_state")
# a record's writer as its bytes still say it where they are no JSON any more (torn, a brace flipped)
_WRITER_BYTES = re.compile(rb'"by": "(' + b"|".join(w.encode() for w in WRITERS) + rb')"')


def _claimed_writer(job_dir: Path, seq: int) -> str | None:
    """Which command a damaged state record says wrote it ("cancel", "retry"), read from its JSON or, torn or
    flipped past parsing, from its bytes; "" for an empty one (a writer killed between creating and filling it,
    where links are missing: any command); UNKNOWN_WRITER where no writer reads (pass 194: a cancel torn in half,
    its first byte flipped, or a folder in its place, was undone by repair without a word); None for a worker's
    outcome or repair's own record, which repair decides again from the facts."""
    path = job_dir / STATES / record_name(seq)
    what = storage.kind(path) if seq else None
    if what is None:
        return None
    if what != "file":
        return UNKNOWN_WRITER
    data = storage.read_bytes(path)
    if not data:
        return ""
    try:
        d = json.loads(data)
        by = d.get("by") if isinstance(d, dict) else None
        # a copy of another record says that record's writer: what its own said is lost
        if _record_damage(d) is None and _copy_damage(job_dir, seq, d) is not None:
            return UNKNOWN_WRITER
    except ValueError:  # not JSON
        found = _WRITER_BYTES.search(data)
        by = found.group(1).decode() if found else None
    if by not in WRITERS:
        return UNKNOWN_WRITER
    return by if by in ("cancel", "retry") else None


def repair(path: str | os.PathLike, mend_inputs: MendInputs | None = None) -> RepairReport:
    """Bring a job back from whatever is still verifiable: restore job.json from its backup, write a damaged
    prompts.parquet / errors.jsonl again (`mend_inputs`: jobs.restore_inputs), quarantine commits that fail
    verification, seal what a dead taker left unsealed, and set the state from the facts (completed if every
    row is done or failed, else queued so `runner work` redoes what is missing); a cancel or failure whose
    record reads stands (pass 66: a cancel landing as the last row was done became completed)."""
    report = RepairReport()
    job = _mended_folder(Path(path), report)
    if mend_inputs is not None:
        report.restored_inputs, report.unrestorable = mend_inputs(job)
    try:
        Job.open(job.dir)  # prompts.parquet there (written again, or it never went)
        return _repair_state(job, report)
    except BrokenJob as e:  # (a per-row `n` job reads its prompts to count its rows)
        if report.unrestorable:
            raise BrokenJob(f"{e} (repair could not: {report.unrestorable})", repairable=False) from None
        raise


# Writes a job's damaged prompts.parquet / errors.jsonl again: (names written, why not or None)
MendInputs = Callable[[Job], tuple[list[str], str | None]]


def _mended_folder(path: Path, report: RepairReport) -> Job:
    """The job, once what stands where its folders go is set aside and its job.json restored from its backup."""
    # Job.open refuses a job whose folders are links (or files where they belong): they go first
    kinds = storage.kinds(path)  # one listing, as Job.open reads the folder
    misplaced = {
        sub: kinds[sub] for sub in FOLDERS if sub != QUARANTINE and kinds.get(sub) not in (None, "dir")
    }
    for sub in misplaced:
        move_aside(path, sub)
    # job.json as a folder, a FIFO or a link (read through, or not at all): aside, restored from its backup
    spec_aside = kinds.get(JOB_FILE) not in (None, "file") and kinds.get(JOB_BACKUP) == "file"
    if spec_aside:
        move_aside(path, JOB_FILE)
    try:
        job = Job.open(path, inputs=False)
        report.mended_backup = same_job_as_backup(job)
    except CopyInHome:  # nothing in it to mend: it is to go (pass 90: "job.json restored", "run work")
        raise
    except BrokenJob:
        job = _restore_spec(path)
        report.restored_spec = True
    except storage.StorageError as e:
        if not _aside_unreadable_spec(path, e):
            raise
        job = _restore_spec(path)
        report.restored_spec = True
        job.log(f"repair: {JOB_FILE} did not read ({first_line(e)}); set aside in {QUARANTINE}/, restored from "
                f"{JOB_BACKUP}")  # fmt: skip
    for name, kind in misplaced.items():
        what = "a symbolic link" if kind == "link" else "not a folder"
        job.log(f"repair: {name}/ was {what}; set aside in {QUARANTINE}/")
    if spec_aside:
        job.log(f"repair: {JOB_FILE} was not a file; set aside in {QUARANTINE}/, restored from {JOB_BACKUP}")
    return job


def _aside_unreadable_spec(path: Path, e: storage.StorageError) -> bool:
    """job.json did not read through the retries (`e`: a file Drive cannot serve for hours held its job for as long)
    and its backup reads as this folder's job's spec: job.json is set aside in quarantine/, to be restored from the
    backup as a missing one is (`_restore_spec`); whether it was. The backup is read first: where the whole folder
    fails, nothing is moved."""
    if not e.unreadable_for_now or not str(e).startswith(f"cannot read {path / JOB_FILE}:"):
        return False
    try:
        backup = _read_json_or_none(path / JOB_BACKUP) if _lexists(path / JOB_BACKUP) else None
    except storage.StorageError:
        return False  # (job.json's error is said)
    # (and the backup is this folder's job's, as far as its results tell: else job.json is left where it is)
    if not _valid_spec(backup) or _other_job_here(path, backup["id"], _shards_job_ids(path)) is not None:
        return False
    move_aside(path, JOB_FILE)
    return True


def _repair_state(job: Job, report: RepairReport) -> RepairReport:
    """The rest of `repair`, once the job opens: its state, its commits, what stands in the wrong place."""
    report.unread_records = _quarantine_unread_records(job)
    report.damaged_aside = _quarantine_damaged_asides(job)
    report.foreign_records = _quarantine_foreign_records(job)
    try:  # the state repair decides over (a command may record another meanwhile)
        read: StateRecord | None = read_state(job.dir)
        report.state_was, generation = read.state.value, read.generation
    except BrokenJob as e:  # the newest record (or an older version's state.json) is damaged or not a file
        read, report.state_was, generation = None, f"broken ({e})", 0
    over = read or StateRecord(seq=_newest_seq_or_zero(job.dir))
    if read is None:
        report.damaged_by = _claimed_writer(job.dir, over.seq)
    for name in _wrong_kind(job):
        move_aside(job.dir, name)
        job.log(f"repair: {name} was not of its kind (a file or a folder); set aside in {QUARANTINE}/")
        report.mended_backup |= name == JOB_BACKUP and _mend_backup(job, "not a file")
    if read is None:  # what stood in the way is aside now: the record before it, or an older job's state.json
        with contextlib.suppress(BrokenJob):
            read = read_state(job.dir)
            generation = read.generation
    # the word set aside for the empty newest record (its put-back killed), then the newest still readable (a
    # damaged cancel: unknowable)
    aside = _aside_word(job.dir, over.seq) if read is None else None
    last = read or aside or last_good_state(job.dir)
    # never below what the records, the commits and the completion were written under (the newest record torn),
    # nor below the word set aside for it (a retry's)
    generation = max(generation, _last_generation(job), aside.generation if aside is not None else 0)
    read_generation = (
        read.generation if read is not None and not report.state_was.startswith("broken") else generation
    )
    ledger = read_ledger(
        job, seal=True, generation=generation, verifier=Verifier(job, afresh=True), unread_bad=True
    )
    if any(why.startswith(UNREAD) for _, why in ledger.bad):
        # one file Drive cannot serve for hours is set aside and its rows computed again, never a home that does not
        # read now: job.json must read (through the retries) for any commit to be taken for unreadable
        storage.read_json(job.dir / JOB_FILE)
    for name, why in ledger.bad:
        quarantine(job, name, why, waiting=False)
        report.quarantined.append((name, why))
    # sealed, as a worker's completion is: a unit taken over since the read above, its taker not sealed yet, would
    # count a superseded worker's late commit that the taker's seal then leaves out (a completed job missing rows)
    progress = job_progress(job, read_ledger(job, seal=True, generation=generation))
    final = JobState.COMPLETED if progress.complete else JobState.QUEUED
    if final is JobState.QUEUED and last is not None and last.state in (JobState.CANCELLED, JobState.FAILED):
        final = last.state
    # a sound cancel or failure stands, every row done or not (`runner retry` ends it)
    if (sound := read or aside) is not None and sound.state in (JobState.CANCELLED, JobState.FAILED):
        final = sound.state
    error = last.error if last is not None and last.state is final else None  # a failure keeps its reason
    wanted = StateRecord(final, generation, error)
    # (a late word read aside, under a repair's blind record, becomes a record of its own: pass 91)
    must_write = (
        report.state_was.startswith("broken") or bool(report.quarantined) or bool(read and read.transit)
    )
    now = _settle_state(job, wanted, read or over, must_write, broken_top=read is None)
    # a lost retry's generation said once recorded again by this repair: not where a `runner retry` that landed
    # after the state was read (its record read with the others above) stands instead (pass 201)
    if read_generation < generation and now.by == "repair" and now.generation >= generation:
        report.lost_retry = (read_generation, generation)
    if report.damaged_by == "" and _reads(job.dir, over.seq, aside=True):
        report.damaged_by = None  # filled since by its slow writer: its word stood
        if aside is not None and aside.state is now.state and not _reads(job.dir, over.seq):
            report.aside_word = aside.by
    report.state_now, report.done, report.total = now.state.value, progress.done, progress.total
    # Only old temp files: a worker frozen past its lease (a suspended laptop) may still be writing its own,
    # and one deleted under it would stop it with a false "cannot be written" when it wakes.
    remove_stale_temps(job)
    job.log(f"repaired: state {report.state_was} -> {now.state.value}, {counted(len(report.quarantined), 'commits')} "
            f"quarantined, {progress.done:,}/{progress.total:,} result rows done")  # fmt: skip
    return report


def state_before(job_dir: Path, seq: int) -> StateRecord:
    """The state the record below `seq` says (with none, what an older version stored): what a job reads while
    its newest record `seq` is being written. BrokenJob when that record is damaged too: the state is then not
    known (pass 88: a repair killed as it wrote its record over a torn cancel showed "queued")."""
    return _late_word_stands(
        job_dir, _read_record(job_dir, seq - 1, wait=False) if seq > 1 else _legacy_state(job_dir)
    )


def state_as_read(job: Job) -> tuple[StateRecord, float | None]:
    """The job's state for a reader (status, results), and None. While its newest record is being written
    (found empty where links are not supported, for less than STATE_PATIENCE_SECONDS: a `cancel` or `retry` on
    its way, as `runner work` waits for it), the state before it and when that record was made; `runner repair`
    is for one empty for longer."""
    try:
        return job.state(), None
    except BrokenJob as e:
        if not e.unfilled or e.waited_out():
            raise
        return state_before(job.dir, newest_state_seq(job.dir)), e.since


def last_good_state(job_dir: Path) -> StateRecord | None:
    """Below a damaged newest record: the newest record that still reads, else an older version's state.json.
    A record that cannot be read now (a mount's outage outlasting the retries) is not a damaged one: it raises,
    and repair stops, rather than fall back past a `cancel` to queued (pass 40)."""
    older = [
        functools.partial(_read_record, job_dir, seq, wait=False)
        for seq in reversed(_record_seqs(job_dir)[:-1])
    ]
    for read in [*older, functools.partial(_legacy_state, job_dir)]:
        try:
            return _late_word_stands(job_dir, read())  # (a blind repair's record: pass 76)
        except BrokenJob:
            continue
        except storage.StorageError as e:
            if not isinstance(e.__cause__, FileNotFoundError):  # (gone since the listing: the next one down)
                raise
    return None


def _settle_state(
    job: Job, wanted: StateRecord, read: StateRecord, must_write: bool, broken_top: bool = False
) -> StateRecord:
    """Record the repaired state over `read`, the state repair decided from, unless the job reads so already;
    always with `must_write` (the newest record was unreadable, or commits were set aside: a worker's completion
    decided over the ledger before that then finds its place taken). A command (retry, cancel) recorded since
    repair read the state stands; a completion recorded since stands only while the job is complete. Returns
    the state the job reads now. `broken_top`: `read` stands for the newest record, which did not read (if it
    reads now, its writer was only slow to fill it: its word stands)."""
    while True:
        if broken_top and _reads(job.dir, read.seq):
            read, broken_top = replace(read, seq=read.seq - 1), False  # so it counts as recorded since
        if newest_state_seq(job.dir) > read.seq:
            now = read_state(job.dir)
            if now.state is not JobState.COMPLETED or _complete_sealed(job, now.generation):
                return now
            read, must_write = now, True  # decided over the ledger before commits were set aside
            continue
        if not must_write and (read.state, read.generation) == (wanted.state, wanted.generation):
            return read
        done = record_state(job.dir, read, wanted, "repair")
        if done is not None:
            return _late_word(job, done, read.seq) if broken_top else done


def _late_word(job: Job, ours: StateRecord, top: int) -> StateRecord:
    """Repair recorded `ours` over the newest record `top`, which did not read. If it reads now, its writer was
    frozen between creating and filling it (no hard links) and may have said it was done before `ours` existed
    (a cancel, a retry): its word stands, recorded again over ours (a completion only while the job is
    complete; a writer that has decided again over ours meanwhile stands instead)."""
    try:
        late = _filled_or_aside(job.dir, top)
    except BrokenJob:  # still empty or damaged: nobody's word
        return ours
    if late.state is JobState.COMPLETED and not _complete_sealed(job, late.generation):
        return ours
    again = StateRecord(late.state, max(late.generation, ours.generation), late.error)
    done = record_state(job.dir, ours, again, "repair")
    if done is None or not late.transit or not _reads(job.dir, top):
        return done or read_state(job.dir)
    # the word was read aside, and its empty record filled since: a live writer's (frozen between its create and
    # its fill at a name an adopter had freed), whose word came later, and which may take it as standing over
    # our blind record: recorded again over the aside's (pass 91)
    return _late_word(job, done, top)


def _complete_sealed(job: Job, generation: int) -> bool:
    """Whether every key of the job is done or failed, read sealed, as a worker's completion is: a completion
    recorded while `repair` ran stands only so. Unsealed, a unit taken over meanwhile (its taker frozen before its
    seal) counted a superseded worker's late commit for the rows of a commit repair had set aside; the completion
    stood, and the taker's seal, made from its older listing, left that commit out (rows missing; pass 189)."""
    return job_progress(job, read_ledger(job, seal=True, generation=generation)).complete


def _aside_word(job_dir: Path, seq: int) -> StateRecord | None:
    """The whole record set aside for the empty record at `seq`, which stands as its word (`_filled_or_aside`);
    None where there is none (or the record at `seq` reads, or is damaged)."""
    try:
        word = _filled_or_aside(job_dir, seq)
    except BrokenJob:
        return None
    return word if word.transit else None


def _reads(job_dir: Path, seq: int, aside: bool = False) -> bool:
    """Whether the record at `seq` reads (with `aside`: or stands aside for its empty record, `_filled_or_aside`)."""
    try:
        _filled_or_aside(job_dir, seq) if aside else _read_record(job_dir, seq, wait=False)
    except BrokenJob:  # missing, not a file, empty or damaged
        return False
    return True


def _newest_seq_or_zero(job_dir: Path) -> int:
    try:
        return newest_state_seq(job_dir)
    except BrokenJob:  # state/ is not a folder: set aside, the records start again after it
        return 0


def _wrong_kind(job: Job) -> list[str]:
    """Paths in the job's folder (relative) holding something of the wrong kind where runner reads or writes:
    a folder or a link where one of its files belongs, a file or a link where one of its folders belongs, a
    folder where a claim, an in-flight record or a heartbeat goes (it would block that name for ever)."""
    files = (LOG_FILE, STATE_FILE, STATS_FILE, VERIFIED, JOB_BACKUP, *_legacy_outcomes().values())
    out = [n for n in files if _kind_as_read(job.dir / n, "file") not in (None, "file")]
    out += [n for n in FOLDERS if n != QUARANTINE and storage.kind(job.dir / n) not in (None, "dir")]
    for sub in (CLAIMS, INFLIGHT, WORKERS, STATES):
        if storage.kind(job.dir / sub) == "dir":
            names = storage.retry(lambda sub=sub: sorted(os.listdir(job.dir / sub)), f"list {job.dir / sub}")
            out += [
                f"{sub}/{n}" for n in names if _kind_as_read(job.dir / sub / n, "file") not in (None, "file")
            ]
    return out


def _kind_as_read(path: Path, expected: str) -> str | None:
    """storage.kind, or `expected` where it does not stat through the retries: a file Drive cannot serve for hours
    (stats.json, a heartbeat) is left where it is, as whatever needs it finds (repair failed on it)."""
    try:
        return storage.kind(path)
    except storage.StorageError as e:
        if not e.unreadable_for_now:
            raise
        return expected


def move_aside(job_dir: Path, name: str) -> None:
    """Move what stands at the job's path `name` (`_wrong_kind`, a linked folder) into quarantine/."""
    src = job_dir / name
    # (storage.replace: a move that a mount did, then answered with an error, is done; retried as a rename, its
    # source gone, it failed `runner repair`)
    storage.replace(src, _quarantine_name(job_dir, name))


def replace_keeping_old(job_dir: Path, name: str, new: Path) -> None:
    """Put the local file `new` at the job's file `name` in one rename, a copy of the file it replaces kept in
    quarantine/ first (a kill in between leaves the old one in place, as it was)."""
    what = storage.kind(job_dir / name)
    if what == "file":
        storage.publish(job_dir / name, _quarantine_name(job_dir, name))
    elif what is not None:  # a link or a folder in its place
        move_aside(job_dir, name)
    storage.publish(new, job_dir / name)


def _quarantine_name(job_dir: Path, name: str) -> Path:
    """Where `name` of the job goes in quarantine/ (made a folder first: one not a folder moves aside)."""
    q = job_dir / QUARANTINE
    if storage.kind(q) not in (None, "dir"):  # not a folder itself: it moves aside first, under another name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        storage.replace(q, job_dir / f"{QUARANTINE}-{stamp}-not-a-folder")
    storage.ensure_dir(q)
    return q / f"{time.strftime('%Y%m%d-%H%M%S')}-{name.replace('/', '-')}"


def _last_generation(job: Job) -> int:
    """The retry generation of a job whose newest state record is damaged, as far as its other files still
    tell: the newest one its older records, its commits, its in-flight records (`flight_generations`) and an
    older version's files were written under. A
    record that fails its checksum counts for nothing: a flipped digit there would retry rows nobody retried
    (or drop a retry: repair then says which command the record claims to be, to run again)."""
    # (a commit that does not read tells no generation, as a damaged one does not: repair sets both aside)
    gens = [
        read_ledger(job, generation=0, unread_bad=True).newest_generation(),
        *flight_generations(job).values(),
    ]
    records = [f"{STATES}/{record_name(seq)}" for seq in _record_seqs(job.dir)]
    for name in [*records, STATE_FILE, COMPLETED_FILE]:
        record = _read_json_or_none(job.dir / name) if storage.kind(job.dir / name) == "file" else None
        damaged = name in records and _record_damage(record) is not None  # its generation may be the flip
        gens.append(record.get("generation", 0) if isinstance(record, dict) and not damaged else 0)
    return max((g for g in gens if type(g) is int and g >= 0), default=0)


def _damaged_spec(path: Path, why: str) -> BrokenJob:
    """What to do about a damaged job.json: `runner repair` when its backup reads as a spec, else submit again.
    A backup that does not read for now (a mount failing through the retries) raises that StorageError: it was
    "missing or damaged too; submit the file again", where a repair restores the job once the mount is back."""
    try:
        raw = _read_json_or_none(path / JOB_BACKUP) if _lexists(path / JOB_BACKUP) else None
        if _vouched_early_spec(path, None, raw) is not None:  # (a repair of the first runner's job, killed)
            return BrokenJob(
                f"{why}; its backup job.backup.json, as the first runner wrote it, can restore it"
            )
        JobSpec.parse(raw if isinstance(raw, dict) else {})
    except storage.StorageError as e:
        if e.unreadable_for_now:
            raise
        return _backup_gone_too(why)
    except (ValueError, RunnerError):
        return _backup_gone_too(why)
    return BrokenJob(f"{why}; its backup job.backup.json can restore it")


def _backup_gone_too(why: str) -> BrokenJob:
    return BrokenJob(
        f"{why} and its backup is missing or damaged too; submit the file again", repairable=False
    )


def _restore_spec(path: Path) -> Job:
    """job.json and its backup made whole again, as the folder's own job's spec (`_own_spec`), or BrokenJob
    (not repairable) when neither is, or nothing tells which is."""
    current = _read_json_or_none(path / JOB_FILE) if _lexists(path / JOB_FILE) else None
    raw = _read_json_or_none(path / JOB_BACKUP) if _lexists(path / JOB_BACKUP) else None
    early = _checked_early_spec(current, raw)
    specs = [s for s in ([early] if early is not None else [current, raw]) if _valid_spec(s)]
    if not specs and (early := _vouched_early_spec(path, current, raw)) is not None:
        specs = [early] if _valid_spec(early) else []
    if not specs:
        raise BrokenJob(f"{path}: job.json is damaged and its backup is missing or damaged too; submit the "
                        "file again", repairable=False)  # fmt: skip
    shards = _shards_job_ids(path)
    own = specs[0] if len(specs) == 1 or specs[0]["id"] == specs[1]["id"] else _own_spec(path, shards, *specs)
    if own is None:
        raise BrokenJob(f"{path}: job.json is job {current['id']}'s and job.backup.json job {raw['id']}'s, and "
                        "nothing in the folder tells which is its own (no results yet): delete the file of the "
                        "other job, or submit the file again", repairable=False)  # fmt: skip
    other = _other_job_here(path, own["id"], shards)
    if other is not None:
        raise BrokenJob(f"{path}: {other}, but the spec it holds (job.json, job.backup.json) is job {own['id']}'s: "
                        f"put that job's job.json back (a copy from its folder); or, if this folder is job "
                        f"{own['id']}'s and those results were copied in, {_FOREIGN_OUT}; or submit the file again",
                        repairable=False)  # fmt: skip
    if own is early:
        _vouch_for_early(path, own)
    for name, spec in ((JOB_FILE, current), (JOB_BACKUP, raw)):
        if not _same_json(spec, own):
            storage.write_json(path / name, own)
    job = Job.open(path, inputs=False)
    if own is early:
        job.log("repair: job.json and its backup, as a runner of 2026-11-30 wrote them, got their checksum")
    return job


def _checked_early_spec(current: Any, backup: Any) -> dict[str, Any] | None:
    """The first runner's job.json (`_unchecked_early`) with its checksum added, where its backup holds the same
    JSON (the two written apart: a changed byte in one shows as a difference), else None. `_restore_spec` writes
    it to both."""
    if not (isinstance(current, dict) and _unchecked_early(current) and _same_json(current, backup)):
        return None
    return {**current, "spec_sha256": spec_checksum(current)}


# log.txt's line, before repair writes the first runner's job.json and backup with their checksum, that it found
# both the same: its checksum then vouches for the one left whole where a kill cut the other short
EARLY_VOUCHED = (
    "repair: job.json and its backup, as a runner of 2026-11-30 wrote them, hold the same; checksum "
)


def _vouch_for_early(path: Path, checked: dict[str, Any]) -> None:
    """Say in log.txt, before either file is written, that job.json and its backup held the same (`checked`:
    that spec with its checksum). Where the log cannot be written, repair goes on all the same."""
    try:
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + EARLY_VOUCHED + checked["spec_sha256"]
        storage.append_line(path / LOG_FILE, line)
    except RunnerError:
        pass


def _vouched_early_spec(path: Path, current: Any, backup: Any) -> dict[str, Any] | None:
    """The first runner's job.json or backup (`_unchecked_early`) with its checksum added, where a repair said in
    log.txt that both held that very JSON (`_vouch_for_early`) and was killed as it wrote one of them (cut short
    on a mount whose rename copies: every repair after said to submit the file again); else None. A byte
    changed since changes its checksum: not vouched for."""
    left = [s for s in (current, backup) if isinstance(s, dict) and _unchecked_early(s)]
    if not left or storage.kind(path / LOG_FILE) != "file":
        return None
    try:
        lines = storage.read_bytes(path / LOG_FILE).decode("utf-8", "replace").splitlines()
    except RunnerError:
        return None
    said = {line.rsplit(" ", 1)[-1] for line in lines if EARLY_VOUCHED in line}
    for spec in left:
        if spec_checksum(spec) in said:
            return {**spec, "spec_sha256": spec_checksum(spec)}
    return None


def _same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are written alike, as their checksums see them: Python's == takes 1 for 1.0
    and for true, so a job.json whose `1.0` a tool rewrote as `1` (JavaScript's JSON does) read as its backup,
    was left in place, and `runner repair` failed on it, saying to run `runner repair` (adversarial pass 182)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _other_job_here(path: Path, job_id: str, shards: set[str]) -> str | None:
    """What says the folder is another job's than `job_id`: its results' job ids (`shards`, _shards_job_ids), none
    of them `job_id` (where one is, the others are commits copied in, which verification quarantines), or its
    name in a job home (a job id); None when nothing does."""
    if JOB_ID.fullmatch(path.name):  # (in a job home the name vouches for job.json: other results, copied in)
        return None if path.name == job_id else f"its folder is named for job {path.name}"
    if shards and job_id not in shards:
        return f"its results were written for job {min(shards)}"
    return None


# what to do with another job's commits copied into a folder of its own, which nothing else there names
_FOREIGN_OUT = "move those commits out (their done/NAME.json and shards/NAME.parquet)"


def _own_spec(path: Path, shards: set[str], *specs: dict[str, Any]) -> dict[str, Any] | None:
    """Of two jobs' specs found in one folder, the folder's own: the one its results were written for (`shards`,
    _shards_job_ids), else the one its name is (a job home names each folder by its job's id), else the one
    whose prompts checksum its prompts.parquet has; None when nothing tells."""

    def prompts_of() -> set[str]:
        if storage.kind(path / PROMPTS) != "file":
            return set()
        digest = storage.retry(lambda: storage.file_sha256(path / PROMPTS), f"read {path / PROMPTS}")
        matching = [s["id"] for s in specs if s.get("prompts_sha256") == digest]
        return set(matching[:1]) if len(matching) == 1 else set()

    for evidence in (lambda: shards, lambda: {path.name}, prompts_of):
        found = [s for s in specs if s["id"] in evidence()]
        if len(found) == 1:
            return found[0]
    return None


def same_job_as_backup(job: Job) -> bool:
    """Refuse (BrokenJob) a job.json of another job than its backup's: a whole, checksummed job.json copied in
    from another job folder would run this folder's rows with that job's settings. `repair` keeps the one
    the results were written for (`_restore_spec`). Checked by a worker before it runs the job (not by
    `Job.open`: `runner status` opens every job of a home, and on Drive each read is a round trip; it reads a
    queued job's backup alone, `backup_problem`). A backup that is damaged or missing (job.json being this
    folder's) is written again from job.json, said in the job's log: True. Left so, the next damage to job.json
    would lose the job (pass 57)."""

    try:  # (read once more before it is taken for damage and written again)
        backup = _read_backup(job)
    except storage.StorageError:  # unreadable: `repair` is the one that needs it
        return False
    if (why := _backup_of_another_job(job, backup)) is not None:
        raise BrokenJob(why)
    other = _other_job_here(job.dir, job.id, _shards_job_ids(job.dir, enough=job.id))
    if other is not None:
        raise BrokenJob(f"{other}, but job.json is job {job.id}'s: one of them was copied in from another job folder "
                        f"(if the results were, {_FOREIGN_OUT}; `runner repair` says more)")  # fmt: skip
    if (copy := copy_in_home(job)) is not None:
        raise CopyInHome(copy, repairable=False)
    if _valid_spec(backup):
        return False
    return _mend_backup(job, "damaged" if backup is not None else "missing or damaged")


def _read_backup(job: Job) -> Any:
    """job.backup.json as read (read once more where it is no spec), None where it is missing."""

    def read() -> Any:
        return _read_json_or_none(job.dir / JOB_BACKUP) if _lexists(job.dir / JOB_BACKUP) else None

    return read_again_if_damaged(read, lambda b: not _valid_spec(b))


def _backup_of_another_job(job: Job, backup: Any) -> str | None:
    if _valid_spec(backup) and backup["id"] != job.id:
        return (f"job.json is job {job.id}'s, but job.backup.json is job {backup['id']}'s (one of them was copied "
                "in from another job folder)")  # fmt: skip
    return None


def backup_problem(job: Job) -> str | None:
    """Why a worker would refuse the job for its job.backup.json (another job's spec), else None; read only,
    for `runner status` of a queued job (`same_job_as_backup` refuses the same and mends a damaged backup). A
    backup that does not read for now says nothing: the worker does not refuse it either."""
    try:
        return _backup_of_another_job(job, _read_backup(job))
    except storage.StorageError:
        return None


def _mend_backup(job: Job, was: str) -> bool:
    """job.backup.json written again from job.json (whole and checksummed: Job.open read it); False where it
    cannot be written now (a read-only copy of the job, a full disk): tried again next time."""
    if storage.kind(job.dir / JOB_BACKUP) not in (None, "file"):
        return False  # a folder or link there: set aside by `repair` first (_wrong_kind)
    try:
        storage.write_json(job.dir / JOB_BACKUP, job.meta)
    except RunnerError:
        return False
    job.log(f"job.backup.json was {was}: written again from job.json")
    return True


def _valid_spec(meta: Any) -> bool:
    try:
        JobSpec.parse(meta if isinstance(meta, dict) else {})
    except (ValueError, RunnerError):
        return False
    return isinstance(meta.get("id"), str)


def _shards_job_ids(path: Path, enough: str | None = None) -> set[str]:
    """The job ids the folder's first sound results shards (up to 8) were written for (their Parquet metadata).
    Only a shard whose bytes match its commit marker's checksum is evidence: one flipped bit in a footer can
    change the id it reads, and the job was then refused as another job's for good (pass 36), where that shard
    is only a damaged one that verification quarantines and computes again. More than one: commits copied in
    from another job (pass 79), which verification quarantines too. `enough`: the id to stop at, once found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found: set[str] = set()

    for name in [n for n in scan(path / SHARDS) if n.endswith(".parquet")][:8]:
        try:
            marker = _read_json_or_none(path / MARKERS / (name.removesuffix(".parquet") + ".json"))
            # (a marker of an older runner has no `check`: its shard's sha256 still has to match)
            if not isinstance(marker, dict) or marker.get("check", sum_ := marker_checksum(marker)) != sum_:
                continue
            data = storage.read_bytes(path / SHARDS / name)
            if hashlib.sha256(data).hexdigest() != marker.get("sha256"):
                continue
            written_for = (pq.read_schema(pa.BufferReader(data)).metadata or {}).get(b"runner.job")
        except (OSError, ValueError, pa.ArrowException, storage.StorageError):
            # damaged (one flipped bit can make a footer "not implemented": ArrowNotImplementedError, no
            # ValueError); its verification says so
            continue
        if written_for:
            found.add(written_for.decode("utf-8", "replace"))
        if enough in found:
            break
    return found


# --- housekeeping ------------------------------------------------------------------------------------------

TEMP_MAX_AGE = 600.0  # seconds: a temp file untouched this long has no live writer (leases go stale in 120)


def remove_stale_temps(job: Job, max_age: float = TEMP_MAX_AGE) -> int:
    """Delete temp files killed writers left in the job's folders (never followed through links: `scan`
    lists plain files only, and a job whose folders are links is broken before it gets here). A file counts
    as left behind `max_age` after its last change plus the longest lease a live worker of the job declares
    (RUNNER_LEASE_TTL may be an hour: such a worker, frozen for minutes, still owns what it is writing)."""
    removed = 0
    now, job_dir = time.time(), job.dir
    try:
        max_age += max((hb["lease"] for hb in live_workers(job, now).values()), default=0.0)
    except RunnerError:  # workers/ cannot be read: the files are judged by their age alone
        pass
    subs = (SHARDS, MARKERS, CLAIMS, WORKERS, INFLIGHT, STATES, QUARANTINE)  # (a killed repair's copy there)
    if not _keep_in_transit(job_dir):  # (a damaged record in transit stays for `runner repair` to see)
        subs = tuple(sub for sub in subs if sub != STATES)
    for folder in (job_dir, *(job_dir / sub for sub in subs)):
        if not _is_link(folder):
            removed += remove_old_temps(folder, max_age, now)
    return removed


def _keep_in_transit(job_dir: Path) -> bool:
    """A state record in transit (`_in_transit`) is put back at its name before the temp files go. False when
    one is damaged (`_aside_damage`), or stands for an empty record (`_filled_or_aside`): state/'s temp files
    are then left alone."""
    seqs = _record_seqs(job_dir)
    for seq in seqs[-2:]:  # the record a killed put-back left empty, its whole one aside (`_filled_or_aside`)
        with contextlib.suppress(BrokenJob):
            if _filled_or_aside(job_dir, seq).transit:
                return False
    try:
        newest = _read_record(job_dir, seqs[-1], wait=False) if seqs else _legacy_state(job_dir)
    except BrokenJob:  # (no newest record to go over: nothing is in transit over it)
        return True
    try:
        transit = _in_transit(job_dir, newest.seq + 1, newest.writer)
    except BrokenJob:
        return False
    if transit is not None:
        _put_back(job_dir, newest.seq + 1, transit)
    return True


def remove_old_temps(folder: Path, max_age: float = TEMP_MAX_AGE, now: float | None = None) -> int:
    """Delete the temp files in `folder` (not in its subfolders) unchanged for `max_age` seconds: what killed or
    stopped writers left (a writer frozen longer finds its temp file gone and writes it again)."""
    removed, now = 0, time.time() if now is None else now
    for name in scan(folder):
        if not storage.is_temp_name(name):
            continue
        age = _age(folder / name, now)
        if age is None or age < max_age:
            continue
        storage.remove(folder / name)
        removed += 1
    return removed


def _age(path: Path, now: float) -> float | None:
    """Seconds since `path` (not followed if a link) last changed, transient errors retried; None when gone."""
    try:
        return now - storage.retry(lambda: os.lstat(path), f"read {path}").st_mtime
    except storage.StorageError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def submit_temp_name(target: str) -> str:
    """The temp folder a submit builds its job in: `.TARGET.PID-TAG.HEX.tmp`, so that whether its submit is
    still alive can be told from the name alone, even if it was killed before writing anything inside."""
    return storage.owned_temp_name(target)


TAKEN_OVER = ".taken-over"  # a stale submit's temp folder, set aside by the submit taking its claim over


def is_submit_temp(name: str) -> bool:
    return "/" not in name and storage.OWNED_TEMP.fullmatch(name) is not None


def remove_dead_submits(root: str | os.PathLike) -> int:
    """Delete temp folders of submits that were killed: their process is provably gone (same boot and PID
    namespace, pid gone or reused), or a day passed; and those a claim's takeover set aside (`NAME.taken-over`,
    whose submit never moves them in), if deleting them then failed. Returns how many were deleted."""
    root = Path(root)
    removed = 0
    for name in scan(root, dirs=True):
        if name.endswith(TAKEN_OVER) and is_submit_temp(name.removesuffix(TAKEN_OVER)):
            shutil.rmtree(root / name, ignore_errors=True)
            removed += 1
            continue
        m = storage.OWNED_TEMP.fullmatch(name)
        if not m:
            continue
        folder = root / name
        owner = Owner.from_dict(_read_json_or_none(folder / ".owner.json"))
        age = _age(folder, time.time())
        if age is None:
            continue
        if owner is not None:  # (its start time also tells a reused pid)
            gone = m.group(3) == storage.namespace_tag() and owner.provably_dead()
        else:
            gone = storage.writer_gone(m)
        if gone or age > 86400:
            removed += _remove_aside(folder)
    return removed


def _remove_aside(folder: Path) -> int:
    """Remove a dead submit's temp folder: set aside by a rename first (`TAKEN_OVER`: swept as such if the
    removal fails), so that it and its submit's move into the home are one or the other. Its age is the wall
    clock's (its mtime, maybe another machine's), so a step of a day forward takes a live submit's: an rmtree
    at its name that opened it just before that submit renamed it into the home went on deleting inside the
    job stored there (adversarial pass 237). Now that submit finds its folder gone (no job stored: it is run
    again), as after a takeover's fence. 1 when it was removed, 0 when it went meanwhile or stays."""
    aside = folder.with_name(folder.name + TAKEN_OVER)
    try:
        storage.retry(lambda: os.rename(folder, aside), f"set aside {folder}")
    # (gone meanwhile: moved in; or it cannot be renamed now: best effort, as the removal always was)
    except (storage.StorageError, OSError):
        return 0
    shutil.rmtree(aside, ignore_errors=True)
    return 1
