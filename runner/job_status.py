"""What `runner status` shows: one summary per job (state, done/total, tok/s, ETA, errors, workers).

Read-only: counts are keys of the commits that count (jobdir.Ledger), verified through the checksum cache;
a job whose metadata cannot be read shows as `broken` with the reason, and the other jobs are unaffected.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import jobdir, storage
from .errors import RunnerError
from .jobdir import BrokenJob, Job, JobState
from .progress import counted, fmt_duration
from .storage import StorageError

# What a queued job waits for here, by (model, pinned snapshot): each looked at once per `runner status`
Looks = dict[tuple[str, str | None], str | None]


@dataclass
class JobStatus:
    id: str
    name: str | None
    state: str
    # None: not counted (a job broken before its commits were read, or whose folder does not read): 0/0 said
    # the job had no rows, and a broken job's last counts are not kept anywhere to show instead
    done: int | None
    total: int | None
    errors: int | None  # (None too: not counted)
    invalid: int
    tokens_per_second: float | None
    eta_seconds: float | None
    model: str
    created: str
    worker: str | None
    message: str | None
    workers: list[dict[str, Any]] = field(default_factory=list)  # live workers: id, device, tok/s, rows
    folder: str = ""
    # Highest peak memory of any run or live worker: GPU memory allocated on CUDA, resident set size on CPU.
    peak_memory_bytes: int | None = None
    # A completed job's result rows that are missing or fail verification since (a shard lost or damaged):
    # it shows as broken until `runner repair` re-queues them.
    missing: int = 0
    # The hub snapshot (commit) the job runs on, pinned at submit; None for a folder, a GGUF file, the demo.
    model_revision: str | None = None
    # Result rows live workers have computed but not yet saved in the job folder (every --shard-rows rows or
    # --shard-minutes): counted in the ETA; a worker killed now would compute them again.
    unsaved: int = 0
    # The retry generation its counts are of (`runner retry` starts the next): a reader that reads the ledger
    # again (the report) reads it at the same one, so that its errors agree with these counts
    generation: int = 0
    # What the job does: generate, score or embed (None: a broken job whose job.json does not say); the table's
    # rows of a score job and a generate job of one file looked alike
    kind: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def done_text(self) -> str:
        """'128/400', or '128+256/400' while 256 more are computed and not saved yet; '?' where not counted."""
        if self.done is None or self.total is None:
            return "?"
        more = f"+{self.unsaved:,}" if self.unsaved else ""
        return f"{self.done:,}{more}/{self.total:,}"

    @property
    def workers_stopped(self) -> int:
        """How many of its live workers are stopped on this machine (SIGSTOP, Ctrl-Z, a tracer)."""
        return sum(w.get("state") == STOPPED for w in self.workers)

    def workers_text(self) -> str:
        """How many workers are on it: '2', or '2 (1 stopped)' where some are stopped on this machine."""
        stopped = self.workers_stopped
        return f"{len(self.workers)}" + (f" ({stopped} stopped)" if stopped else "")

    @property
    def eta(self) -> str:
        return fmt_duration(self.eta_seconds) if self.eta_seconds is not None else "-"


def broken_status(
    path: Path,
    reason: str,
    job: Job | None = None,
    repairable: bool = True,
    meta: dict[str, Any] | None = None,
) -> JobStatus:
    """A job that cannot be read; what job.json (or its backup, when it did not open) still says of it, or
    `meta` where given (nothing read)."""
    hint = f" (`runner repair {shlex.quote(str(path))}`)" if repairable else ""
    meta = _shown_spec(path, job) if meta is None else meta
    name = meta.get("name") if isinstance(meta.get("name"), str) else None
    # a job in its own folder (-o myscores) is named by its id, not the folder's name (pass 51)
    job_id = meta.get("id") if isinstance(meta.get("id"), str) and meta.get("id") else path.name
    # (a damaged kind may be a list or an object, which `in` a dict cannot look up: status crashed)
    kind = meta.get("kind")
    return JobStatus(id=job_id, name=name, state=JobState.BROKEN.value, done=None, total=None,
                     errors=None, invalid=0, tokens_per_second=None, eta_seconds=None,
                     model=str(meta.get("model") or "-"), created=str(meta.get("created") or ""), worker=None,
                     message=reason + hint, folder=str(path),
                     kind=kind if isinstance(kind, str) and kind in jobdir.KINDS else None)  # fmt: skip


def _shown_spec(path: Path, job: Job | None) -> dict[str, Any]:
    """What a broken job's row shows (id, name, model): job.json as read, unless it fails its checksum and the
    backup holds (a flipped digit of its id showed an id that no command then found; pass 120)."""
    meta = job.meta if job else (jobdir.spec_or_backup(path) or {})
    if meta.get("spec_sha256") == jobdir.spec_checksum(meta):
        return meta
    backup = jobdir.plain_json(path / jobdir.JOB_BACKUP)
    held = isinstance(backup, dict) and backup.get("spec_sha256") == jobdir.spec_checksum(backup)
    return backup if held else meta


def job_status(job: Job, looks: Looks | None = None, verifier: jobdir.Verifier | None = None) -> JobStatus:
    """The job's summary. `looks`: what was found of each model's folder so far in this `runner status` (by
    spec and pinned snapshot; `_waiting_for`), filled as it goes. `verifier`: the shards' checks, shared with a
    caller that reads the ledger again (the report), so that both judge each commit alike, each shard read once."""
    if (other := jobdir.other_job_named(job)) is not None:
        return _foreign_spec(job, other)
    try:
        state, changing = _state(job)
        verifier = verifier or jobdir.Verifier(job)
        if state.state is JobState.QUEUED and (cannot := _cannot_run(job, verifier)) is not None:
            return broken_status(job.dir, cannot[0], job, repairable=cannot[1])
        ledger = jobdir.read_ledger(job, generation=state.generation, verifier=verifier)
        progress = jobdir.job_progress(job, ledger)
        lost = _retry_lost(job, state, ledger)
    except BrokenJob as e:
        return broken_status(job.dir, str(e), job, e.repairable)
    except StorageError as e:
        if not e.damaged:
            raise
        return broken_status(job.dir, f"its folder is damaged: {e}", job)  # a file where claims/ belongs...
    name, message, missing = state.state.value, state.error, 0
    if state.state is JobState.QUEUED:
        name = "running" if progress.live else ("queued (interrupted)" if progress.started else "queued")
        message = None if progress.live else _waiting_for(job, looks) or _all_saved(job, progress)
    if state.state is JobState.COMPLETED and not progress.complete:
        missing = progress.total - progress.done - progress.failed
        name, message = JobState.BROKEN.value, missing_rows(job, progress, missing)
    elif progress.bad:
        message = (f"{counted(len(progress.bad), 'commits')} failed verification; their rows are computed again "
                   "(`runner repair` quarantines them now)")  # fmt: skip
    elif state.state is JobState.COMPLETED:
        message = _inputs_damaged(job, verifier)
    workers, tps, eta, unsaved = _live_figures(progress)
    # a queued job whose live workers are all stopped on this machine makes no progress (it showed "running",
    # with their speed and an ETA, for as long as their lease)
    if state.state is JobState.QUEUED and (stopped := [w for w in workers if w["state"] == STOPPED]):
        name = STOPPED if len(stopped) == len(workers) else name
        message = "; ".join(filter(None, [message, _stopped_said(stopped, progress.live)]))
    message = "; ".join(filter(None, [changing, message, lost])) or None
    runs = job.read_stats()["runs"]
    if not workers:
        tps = _number(runs[-1], "tokens_per_second") if runs else None
    peaks = [_number(r, "peak_memory_bytes") for r in [*runs, *progress.live.values()]]
    peak = max((int(p) for p in peaks if p), default=None)
    return JobStatus(
        id=job.id, name=job.name, state=name, done=progress.done, total=progress.total, errors=progress.failed,
        invalid=int(job.meta.get("input", {}).get("invalid", 0) or 0), tokens_per_second=tps, eta_seconds=eta,
        model=job.spec.model, created=job.spec.created, worker=_named_worker(workers),
        message=message, workers=workers, folder=str(job.dir), peak_memory_bytes=peak, missing=missing,
        model_revision=job.spec.revision,
        unsaved=unsaved, generation=state.generation, kind=job.spec.kind,
    )  # fmt: skip


def _live_figures(progress: Any) -> tuple[list[dict[str, Any]], float | None, float | None, int]:
    """(the live workers' rows, their tok/s, the ETA in seconds, result rows computed and not saved yet). A
    worker stopped on this machine adds no speed: its figures are of before it stopped."""
    workers = [_worker_row(w, hb) for w, hb in sorted(progress.live.items())]
    stopped = {w["worker"] for w in workers if w["state"] == STOPPED}
    tps = sum(w["tokens_per_second"] or 0 for w in workers) or None
    rate = sum(_number(hb, "rows_per_second") or 0 for w, hb in progress.live.items() if w not in stopped)
    left = progress.total - progress.done - progress.failed
    unsaved = min(left, int(sum(_number(hb, "unsaved") or 0 for hb in progress.live.values())))
    return workers, tps, (left - unsaved) / rate if rate > 0 else None, unsaved


def _retry_lost(job: Job, state: jobdir.StateRecord, ledger: jobdir.Ledger) -> str | None:
    """Where rows were committed, or computed (an in-flight record: `jobdir.flight_generations`), under a newer
    retry generation than the job's state says: its records only go up, so the record of the `runner retry` that
    raised it is missing (deleted, or an older record copied over it: a sync conflict, a restore from an old
    backup), and the job reads as it stood before that retry, its row errors counted again (else None). Said
    once the state, read again, still says so: a retry landing between the two reads is no loss. Not while the
    newest record is being written (that retry's may be it: put back by an adopter, no hard links); and where
    that evidence was written lately on another machine, as a record that may not be here yet (a folder synced
    from another VM shows files late, not in order)."""
    flights = jobdir.flight_generations(job)
    made = max([ledger.newest_generation(), *flights.values()])
    if made <= state.generation:
        return None
    now, since = jobdir.state_as_read(job)
    if made <= now.generation or since is not None:
        return None
    newest = f"{jobdir.STATES}/{jobdir.record_name(now.seq)}" if now.seq else "none"
    flown = [name for name, gen in flights.items() if gen > now.generation]
    # (commits are said first, as before: the in-flight record is named only where it alone tells, and the one
    # named is of the generation said, not merely newer than the state's)
    committed = ledger.newest_generation() == made
    what = "rows were committed" if committed else "a worker computed rows"
    where = "" if committed else f" ({next(name for name, gen in flights.items() if gen == made)})"
    said = (f"{what} under retry generation {made}{where}, but its state says {now.generation} (newest state "
            f"record: {newest}): ")  # fmt: skip
    repair = f"`runner repair {shlex.quote(str(job.dir))}` records that generation again"
    commits = ledger.newer_than(now.generation)
    if (not commits or jobdir.made_elsewhere_lately(job, commits)) and (
        not flown or jobdir.flown_elsewhere_lately(job, flown)
    ):
        done = "committed" if committed else "computed"
        return (f"{said}those rows were {done} on another machine minutes ago, and the record of the `runner "
                "retry` they were made under may not be here yet (a folder synced from another machine can show "
                f"files late). Look again in a few minutes; if it does not come, it is missing: {repair}")  # fmt: skip
    return (f"{said}the record of a `runner retry` is missing (deleted, or an older record copied over it); "
            f"{repair}")  # fmt: skip


def _cannot_run(job: Job, verifier: jobdir.Verifier) -> tuple[str, bool] | None:
    """(why, repairable) when no worker can run the queued job, as `runner work` would find: something of the
    wrong kind where a worker writes (a folder at log.txt), a job.backup.json of another job (pass 236: shown
    queued for ever while every worker skipped the job as broken), or prompts.parquet is not the file submit
    wrote (pass 71: status showed "queued (interrupted)" until a worker failed the job). The file is hashed once
    per change (its stamp is kept in verified.json, as workers keep it)."""
    if (why := job.layout_problem() or jobdir.backup_problem(job)) is not None:
        return why, True
    if (why := jobdir.prompts_problem(job, verifier)) is not None:
        return why, False
    verifier.save()
    return None


def missing_rows(job: Job, progress: Any, missing: int) -> str:
    """Why a completed job reads as short of `missing` result rows, and what brings them back, naming the first
    commit that failed verification, else the units done/ holds no commit of (`runner status`, and the OpenAI
    Batch export's refusal). Commits whose
    markers are young and whose shards are not here yet are said as such: a folder synced from another machine
    (Drive between two VMs) can show a commit's marker before its shard, and a `runner repair` then re-queued a
    sound job and set its commit aside (adversarial pass 134)."""
    repair = f"`runner repair {shlex.quote(str(job.dir))}`"
    if jobdir.shards_in_transit(job, progress.bad):
        names = ", ".join(name for name, _ in progress.bad[:3]) + (", ..." if len(progress.bad) > 3 else "")
        return (f"completed, but {counted(missing, 'result rows', 'are')} missing: the shards of "
                f"{counted(len(progress.bad), 'commits')} ({names}) are not here yet, their markers written minutes "
                "ago (a folder synced from another machine can show a marker before its shard). Look again in a few "
                f"minutes; if they do not come, {repair} re-queues the rows")  # fmt: skip
    message = (f"completed, but {counted(missing, 'result rows', 'are')} missing or failed verification ({repair} "
               "re-queues them)")  # fmt: skip
    if progress.bad:  # (what failed says more than a count: another job's results, say)
        message += f"; commit {progress.bad[0][0]}: {progress.bad[0][1]}"
    elif progress.units_left:  # no commit failed: a marker is gone (pass 236: nothing was named)
        units = [f"done/{u:05d}-*.json" for u in progress.units_left[:3]]
        more = ", ..." if len(progress.units_left) > 3 else ""
        message += f"; no commit of their units is in done/ ({', '.join(units)}{more}: deleted?)"
    return message


def _inputs_damaged(job: Job, verifier: jobdir.Verifier) -> str | None:
    """A completed job's prompts.parquet or errors.jsonl (its input lines refused at submit) gone unlike its
    checksum, said: its results stand whole, but an OpenAI Batch export and a `runner retry` read them (each
    hashed once per change, as for a queued job). (A damaged errors.jsonl showed only at the export.)"""
    whys = []
    for name, problem in ((jobdir.PROMPTS, jobdir.prompts_problem), (jobdir.INVALID, jobdir.invalid_problem)):
        if name == jobdir.INVALID and not job.meta["input"].get("invalid"):
            continue
        try:
            whys.append(problem(job, verifier))
        except StorageError as e:  # (a folder where the file belongs, say: the job still shows, and says why)
            if not e.damaged:
                raise
            whys.append(
                f"{name} of job {job.id} is damaged ({e}): `runner repair {shlex.quote(str(job.dir))}`"
            )
    whys = [w for w in whys if w]
    if not whys:
        verifier.save()
        return None
    return f"its results are whole, but {'; and '.join(whys)}"


def _state(job: Job) -> tuple[jobdir.StateRecord, str | None]:
    """The job's state, and None; while its newest record is being written, the state before it with a note
    saying so (`jobdir.state_as_read`)."""
    state, since = jobdir.state_as_read(job)
    return (
        state,
        None if since is None else f"a change of state is being written ({time.time() - since:.0f} s ago)",
    )


def _waiting_for(job: Job, looks: Looks | None = None) -> str | None:
    """Why `runner work` on this machine leaves a queued job as it is (its model folder not here: a Drive not
    mounted yet; or not readable for now), else None. Each model is looked at once per `runner status`
    (`looks`): a model on a Drive mount that stopped answering took a minute of retries for each of its jobs."""
    looks = {} if looks is None else looks
    model = (job.spec.model, job.spec.revision)
    if model not in looks:
        looks[model] = _model_wait(*model)
    return looks[model]


def _model_wait(spec: str, revision: str | None = None) -> str | None:
    """What a queued job of the model `spec` waits for on this machine, else None. A model that does not read
    (through the retries) is said as such: the job's own folder reads, so the job shows queued with its
    progress, not `unreadable` (nor `broken` where its folder is denied), and status, report and load_results go
    on."""
    from .models import ModelUnreadable, missing_model_folder

    try:
        missing = missing_model_folder(spec, revision=revision)
    except ModelUnreadable as e:
        return f"{e}; `runner work` runs it once it reads"
    return f"{missing.said()}; `runner work` runs it once it is there" if missing else None


def _all_saved(job: Job, progress: Any) -> str | None:
    """What a job stopped in its last commit is waiting for: every row's result (or error) saved, the completion
    not recorded yet (a stop between the two); else None."""
    if not progress.total or progress.done + progress.failed < progress.total:
        return None
    return ("every row's result (or error) is saved; `runner work --job "
            f"{shlex.quote(str(job.dir))}` (or the same `runner run`) records it as completed, computing nothing")  # fmt: skip


def _number(record: dict[str, Any], key: str) -> float | None:
    """A number from a heartbeat (written by another process, possibly damaged): None unless finite and >= 0."""
    try:
        value = float(record[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if 0 <= value < float("inf") else None


# A live worker's (and a job's) state where its process is stopped by a signal on this machine
STOPPED = "stopped"
# A job's state where its folder did not read through the retries (a mount failing): shown, not raised
UNREADABLE = "unreadable"


def _named_worker(workers: list[dict[str, Any]]) -> str | None:
    """The live worker a status names (`JobStatus.worker`): a running one where there is one (the first by name
    was named, stopped on this machine, beside another running the job), else the first stopped one."""
    running = [w for w in workers if w["state"] != STOPPED]
    return (running or workers)[0]["worker"] if workers else None


def _worker_row(worker: str, hb: dict[str, Any]) -> dict[str, Any]:
    """A live worker as status shows it: "state" is "stopped" where its process provably is, on this machine
    (SIGSTOP, Ctrl-Z: frozen until continued; `Owner.provably_stopped`), its speed then None (its heartbeat's
    is of before); elsewhere "running", as its heartbeat is all there is to tell (another machine's)."""
    text = {k: hb.get(k) if isinstance(hb.get(k), str) else None for k in ("host", "device")}
    owner = jobdir.Owner.from_dict(hb)
    stopped = owner is not None and owner.provably_stopped()
    return {"worker": worker, **text, "state": STOPPED if stopped else "running",
            "pid": owner.pid if owner is not None else None,
            "tokens_per_second": None if stopped else _number(hb, "tokens_per_second"),
            "rows": _number(hb, "rows")}  # fmt: skip


def _stopped_said(stopped: list[dict[str, Any]], live: dict[str, dict[str, Any]]) -> str:
    """What workers stopped on this machine mean, and how to go on: each holds its units until it is continued
    or its lease ends ("expires": when, as `jobdir.live_workers` judges it; the soonest is said). One stopped by
    a debugger or tracer (strace, gdb) is said so: `kill -CONT`, which it was told too, does nothing for it."""
    traced = [
        w for w in stopped if (o := jobdir.Owner.from_dict(live[w["worker"]])) is not None and o.traced()
    ]
    signalled = [w for w in stopped if w not in traced]
    return "; ".join(
        _frozen_said(group, live, kind) for group, kind in ((signalled, False), (traced, True)) if group
    )


def _frozen_said(stopped: list[dict[str, Any]], live: dict[str, dict[str, Any]], traced: bool) -> str:
    who = ", ".join(f"{w['worker']} (pid {w['pid']})" for w in stopped)
    pids = " ".join(str(w["pid"]) for w in stopped)
    ends = fmt_duration(min((_number(live[w["worker"]], "expires") or 0) for w in stopped) - time.time())
    one = len(stopped) == 1
    if traced:
        how = (f"by a debugger or tracer (strace, gdb; `kill -CONT` does nothing for {'it' if one else 'them'}): "
               f"{'it goes' if one else 'they go'} on when the tracer continues {'it' if one else 'them'} or detaches")  # fmt: skip
    else:
        how = f"(SIGSTOP, or Ctrl-Z in a terminal): `kill -CONT {pids}` continues {'it' if one else 'them'}"
    if one:
        return (f"worker {who} is stopped on this machine {how}; else its units are free for other workers when its "
                f"lease ends, in {ends}")  # fmt: skip
    return (f"workers {who} are stopped on this machine {how}; else their units are free for other workers when "
            f"their leases end (the first, in {ends})")  # fmt: skip


def home_status(home: str | os.PathLike | None = None) -> list[JobStatus]:
    """Every job of the home, oldest first; broken ones (and links, never followed) with their reason."""
    root = Path(home) if home is not None else jobdir.default_home()
    out, jobs, folders = [], [], jobdir.job_folders(root)
    for path in folders:
        try:
            jobs.append(Job.open(path))
            out.append(jobs[-1])
        except StorageError as e:
            out.append(unreadable_or_broken(path, e))
        except RunnerError as e:
            out.append(broken_status(path, str(e), repairable=getattr(e, "repairable", True)))
    copies = jobdir.copies_in_home(jobs, folders)
    # each model's folder looked at once (`_waiting_for`)
    looks: Looks = {}
    out = [_of_home_job(it, copies, looks) if isinstance(it, Job) else it for it in out]
    out += [_link_row(root / name) for name in jobdir.linked_entries(root)]
    return out


def _link_row(path: Path) -> JobStatus:
    """A symbolic link in the home, shown under its own name with nothing read through it: it showed the id of
    the job it points to (listed twice, one row broken), and said `runner repair LINK`, which mends the folder
    it points to and leaves the link (a dangling one: "no such folder")."""
    try:
        to = f" to {os.readlink(path)}"
    except OSError:
        to = ""
    why = (f"a symbolic link in the job home{to}; runner does not follow links: move the job's folder itself "
           "into the home, or delete the link (`runner work --job FOLDER` runs a job where it is)")  # fmt: skip
    return broken_status(path, why, repairable=False, meta={})


def _foreign_spec(job: Job, why: str) -> JobStatus:
    """A folder whose job.json is another job's: a copy of that job's folder (not repairable), or, its own spec
    still in its backup, that own job, shown as itself, which `runner repair` restores (pass 104)."""
    own = jobdir.own_backup(job.dir)
    shown = broken_status(job.dir, why, job, repairable=own is not None)
    if own is None:
        return shown
    return replace(shown, id=job.dir.name, name=own.get("name"), model=str(own.get("model") or "-"))


def _of_home_job(job: Job, copies: dict[Path, str], looks: Looks) -> JobStatus:
    if job.dir in copies:
        return _foreign_spec(job, copies[job.dir])
    try:
        return job_status(job, looks)
    except StorageError as e:
        return unreadable_or_broken(job.dir, e)
    except RunnerError as e:
        return broken_status(job.dir, str(e), repairable=getattr(e, "repairable", True))


def unreadable_or_broken(path: Path, e: StorageError) -> JobStatus:
    """A job whose folder could not be read through the retries (a mount failing for a minute: a transient
    error) is `unreadable` for now, not broken: nothing in it is damaged, and `runner repair` would not help
    (pass 65). A folder whose layout is damaged (a file where a folder belongs), or denied for good, is broken."""
    if e.damaged:
        return broken_status(path, f"its folder is damaged: {e}")
    if not e.unreadable_for_now:  # denied, or the like: no wait brings it back (pass 67)
        return broken_status(path, str(e), repairable=e.repairable)
    with storage.at_once():  # (its id, name and model as its files say at once: they were waited for already)
        shown = broken_status(path, str(e), repairable=False)
    return replace(shown, state=UNREADABLE,
                   message=f"{e} (read again by the next `runner status`)")  # fmt: skip


def status_table(statuses: list[JobStatus]) -> str:
    """A fixed-width table that reads the same in a terminal, a Colab cell and a log file."""
    head = ("JOB", "NAME", "KIND", "STATE", "DONE/TOTAL", "TOK/S", "ETA", "ERRORS", "WORKERS", "MODEL")
    rows = [head]
    for s in statuses:
        rows.append((
            s.id, s.name or "-", s.kind or "-", s.state, s.done_text(),
            f"{s.tokens_per_second:,.1f}" if s.tokens_per_second else "-", s.eta, "-" if s.errors is None else str(s.errors),
            s.workers_text(), s.model,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
