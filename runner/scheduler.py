"""The queue: which job a worker takes next, how its outcome settles the job, deadlines, and `run`.

jobs in the home (jobdir.py) -> `queue` (interrupted first, then priority, then age; jobs with no unit free
to claim left out; broken ones skipped) -> `work`: take next -> `run_leased` (engine, fingerprint check,
worker.run_job) -> `settle` (one table from outcome to what happens to the job and the worker).

Everything here is about *which* job runs; how a job runs, unit by unit and fenced, is worker.py.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

from . import jobdir, storage
from .crashes import DeviceError
from .engine import Engine
from .errors import NotOnThisMachine, RunnerError, first_line, on_the_command_line, option
from .jobdir import BrokenJob, Job, JobGone, JobReplaced, JobState, Owner
from .models import ModelUnreadable, NoSuchDevice, job_resumes, missing_model_folder, reading_model
from .progress import counted
from .storage import StorageError
from .worker import SHARD_ROWS, SHARD_SECONDS, RunSummary, run_job


def run(
    input_path: Any,
    model: str,
    params: Any = None,
    options: Any = None,
    *,
    output: Any = None,
    engine: Engine | None = None,
    echo: Callable[[str], None] | None = print,
    stop: Callable[[], bool] | None = None,
    progress_every: float | None = None,
    **job_kwargs: Any,
) -> tuple[Job, RunSummary]:
    """Submit `input_path` as a job (in `output` if given, else in the job home) and work on it to the end,
    or until `stop()` is true (checked between batches). Running it again resumes where it stopped: the job in
    `output`, or the home's job of the same inputs and settings (create_job's `same_in_home`).

    `input_path`: a prompt file (JSONL, CSV, Parquet, .txt), a pandas DataFrame, a list of row dicts or a
    datasets.Dataset, as `runner.submit` takes it; `params` a GenerationParams (ScoreParams, EmbedParams for a
    score or embed job), `options` an EngineOptions. `job_kwargs` are `runner.submit`'s (`name`, `home`,
    `prompt_field`, `template`, `skip_invalid`, `truncate`, `chat`, `chat_template` ...). Returns the job and
    a RunSummary; progress lines go to `echo` (None: silent), every `progress_every` seconds."""
    from .jobs import create_job, submit_warnings

    _settings_go_in_params(params, job_kwargs, engine)
    if stop is not None and not callable(stop):  # (vLLM's and OpenAI's stop=["\n"]: taken for the callback)
        raise TypeError("stop= is the function saying when to stop the work (checked between batches); stop "
                        f"strings go in params=runner.GenerationParams(stop={stop!r})")  # fmt: skip
    job = create_job(input_path, model, params, options, job_dir=output, same_in_home=True, **job_kwargs)
    for line in submit_warnings(job) if echo else ():
        echo(line)
    kept = _kept_options(job, options)
    if kept and echo:
        echo(f"job {job.id} keeps the engine options it was submitted with: {kept}; a new {option('output', None)} "
             f"folder (or {option('name', None)}) runs with the new ones")  # fmt: skip
    done_before = _heal(job, echo)
    # As `runner work --job`: units another live worker holds (a second VM on the job) are waited for, and
    # taken over if it dies, so the run ends when the job does (or at `stop()`), not when nothing is left to claim.
    unrunnable: list[Job] = []
    broken: list[str] = []
    summaries = work(job=job, engine=engine, echo=echo, stop=stop, on_unrunnable=unrunnable.append,
                     on_broken=lambda job_id, folder: broken.append(folder), progress_every=progress_every)  # fmt: skip
    if broken and not summaries:  # (said as met, with why and what brings it back): no "run it again"
        raise RunnerError(f"job {job.id} is broken and did not run (`runner status {shlex.quote(broken[0])}` "
                          "says why and what brings it back)")  # fmt: skip
    last = summaries[-1] if summaries else None
    if last is None or not (last.finished or last.stopped):  # the others ended the job, or it was not queued
        state, p = job.state(), jobdir.job_progress(job)
        # (a job cancelled after its last row was done is complete: run-batch writes its output again)
        if state.state is JobState.FAILED or (state.state is JobState.CANCELLED and not p.complete):
            reason = f": {state.error}" if state.error else ""
            raise RunnerError(f"job {job.id} is {state.state}{reason} (`runner retry "
                              f"{shlex.quote(str(job.dir))}` re-queues it)")  # fmt: skip
        if state.state is JobState.CANCELLED and echo:
            echo(_cancelled_when_done(job.id))
        last = RunSummary(
            job.id, p.done, p.total, 0, 0, 0.0, p.failed, p.complete, unrunnable=bool(unrunnable)
        )
    return job, replace(
        last, generated=sum(s.generated for s in summaries), tokens=sum(s.tokens for s in summaries),
        seconds=sum(s.seconds for s in summaries), done_before=done_before,
    )  # fmt: skip


def _settings_go_in_params(params: Any, job_kwargs: dict[str, Any], engine: Any = None) -> None:
    """`runner.run(..., max_new_tokens=64)`, as `model.generate(...)` takes it, said "create_job() got an
    unexpected keyword argument": name the settings object the setting belongs in. So for settings given as
    `engine=` (a loaded engine's place): `engine=runner.EngineOptions(batch_size=8)` made the job, then failed
    deep in the batching code ("'str' object has no attribute 'type'")."""
    import dataclasses
    import inspect

    from .jobs import create_job
    from .params import refuse_loose_settings, settings_arg

    if dataclasses.is_dataclass(engine):
        arg = settings_arg(type(engine))
        raise TypeError(f"run()'s engine= takes a loaded engine; settings go in {arg}=: "
                        f"runner.run(..., {arg}=runner.{type(engine).__name__}(...))")  # fmt: skip

    # (not a settings object, a dict: create_job refuses it, naming the types)
    accepted = inspect.signature(create_job).parameters
    refuse_loose_settings("run", params, {k: v for k, v in job_kwargs.items() if k not in accepted})


def _kept_options(job: Job, options: Any) -> str:
    """The engine options asked for now (set away from their defaults) that differ from those the job was
    submitted with: a rerun resumes the job as it was, so they do not apply (said, never silently dropped)."""
    from .params import EngineOptions

    if options is None:
        return ""
    given, default, stored = options.to_dict(), EngineOptions().to_dict(), job.meta.get("engine") or {}
    # (one asked at its default counts: --no-continuous-batching for a job submitted with it was not said)
    asked = getattr(options, "_given", frozenset())

    def shown(v: Any) -> str:
        return "the default" if v is None else repr(v)

    return ", ".join(f"{k} {shown(stored.get(k))} (asked: {shown(v)})" for k, v in given.items()
                     if (v != default.get(k) or k in asked) and k in stored and stored[k] != v)  # fmt: skip


def _heal(job: Job, echo: Callable[[str], None] | None) -> bool:
    """A completed job whose results no longer all verify (a shard damaged or lost since): running the same
    command again carries on, as it promises, by repairing the job (jobdir.repair sets the bad commits aside
    and re-queues it), so that this run computes the missing rows again. Returns whether the job is complete
    already, with all its results: nothing to compute."""
    try:
        progress = jobdir.job_progress(job) if job.state().state is JobState.COMPLETED else None
    except BrokenJob:
        return False  # `runner status` says what is wrong; work skips it
    if progress is not None and progress.complete and echo and not on_the_command_line():
        # (a notebook's cell run again printed nothing at all; the command line's closing line says it)
        echo(f"job {job.id} was completed before ({progress.done:,}/{progress.total:,} {job.spec.count_noun}): nothing "
             f"computed; runner.load_results({str(job.dir)!r}) reads its results")  # fmt: skip
    if progress is None or progress.complete:
        return progress is not None
    report = jobdir.repair(job.dir)
    if echo:
        missing = progress.total - progress.done - progress.failed
        echo(f"job {job.id} had completed, but {counted(missing, 'result rows', 'are')} missing or failed verification "
             f"({counted(len(report.quarantined), 'commits')} set aside in quarantine/): computing them again")  # fmt: skip
    return False


@dataclass
class Candidate:
    job: Job
    interrupted: bool  # some of it is done or was claimed: a worker died or stopped in it


def _jobs(home: Any, only: str | Job | None, broken: dict[str, Broken] | None = None) -> list[Job]:
    """The jobs to consider; broken ones are left out (and put in `broken`: folder -> (reason, repairable))."""
    if only:
        job = Job.open(only.dir) if isinstance(only, Job) else jobdir.open_job(only, home)
        if (copy := jobdir.copy_in_home(job)) is not None:  # named by its folder (pass 87)
            _note_broken(broken, job.dir, BrokenJob(copy, repairable=False), job.id)
            return []
        return [job]
    root = home if home is not None else jobdir.default_home()
    out, folders = [], jobdir.job_folders(root)
    for path in folders:
        try:
            out.append(Job.open(path))
        except RunnerError as e:  # broken: it breaks only itself
            if _unreadable(e) and broken is None:
                raise
            _note_broken(broken, path, e)
    copies = jobdir.copies_in_home(out, folders)
    for job in out:
        if job.dir in copies:
            _note_broken(broken, job.dir, BrokenJob(copies[job.dir], repairable=False), job.id)
    return [job for job in out if job.dir not in copies]


def _queued(
    home: Any, only: str | Job | None, broken: dict[str, Broken] | None = None
) -> Iterator[tuple[Job, jobdir.Progress]]:
    """Queued jobs with their standing; cancelled, failed, completed and broken ones are left out (the broken
    ones put in `broken`: folder -> (reason, repairable))."""
    for job in _jobs(home, only, broken):
        try:
            if job.state().state is JobState.QUEUED:
                if (why := job.layout_problem()) is not None:  # as `runner status` shows it
                    raise BrokenJob(why)
                yield job, jobdir.job_progress(job)
        except (BrokenJob, StorageError, OSError) as e:
            if not (isinstance(e, BrokenJob) or _damaged(e, job) or (_unreadable(e) and broken is not None)):
                raise
            # a damaged folder (a file where claims/ belongs...) is broken too; an unreadable one skipped for now
            _note_broken(broken, job.dir, e, job.id)


class Broken(NamedTuple):
    """A broken job the queue met (`runner work` says so once)."""

    why: str
    repairable: bool
    # its newest state record is empty (no links): when that record was made (`_on_its_way`)
    made: float | None
    job_id: str
    # not broken: its folder could not be read through the retries (`_unreadable`); looked at again each round
    unreadable: StorageError | None = None


def _unreadable(e: Exception) -> TypeGuard[StorageError]:
    """A job folder unreadable through the retries (a mount failing for a minute, one folder Drive has not
    synced): not broken, never `runner repair` (pass 65). `runner work` runs the other jobs meanwhile and stops
    on it only when there is nothing else to do."""
    return isinstance(e, StorageError) and e.unreadable_for_now


def _note_broken(
    broken: dict[str, Broken] | None, folder: Any, e: Exception, job_id: str | None = None
) -> None:
    if broken is not None:
        unreadable = e if _unreadable(e) else None
        broken[str(folder)] = Broken(str(e), getattr(e, "repairable", True), getattr(e, "since", None),
                                     job_id or os.path.basename(folder), unreadable)  # fmt: skip


def _broken_line(job_id: str, folder: Any, why: Any, repairable: bool, unreadable: bool = False) -> str:
    """What a worker says of a broken (or for now unreadable) job it skips."""
    if unreadable:
        return f"job {job_id} cannot be read for now ({why}); skipped, and looked at again after each job"
    hint = f" (`runner repair {shlex.quote(str(folder))}` brings it back)" if repairable else ""
    return f"job {job_id} is broken ({why}); skipped{hint}"


def queue(
    home: Any = None, only: str | Job | None = None, broken: dict[str, Broken] | None = None
) -> list[Candidate]:
    """Jobs a worker may take, in the order it takes them: interrupted jobs first, then queued jobs by
    priority (high first), then age. Jobs with no unit free to claim (done, or all held by live workers),
    and cancelled, failed, completed or broken jobs, are left out (broken ones put in `broken`)."""
    out = []
    for job, progress in _queued(home, only, broken):
        if progress.claimable or (progress.complete and not progress.live):
            out.append(Candidate(job, progress.started))
    out.sort(key=lambda c: (not c.interrupted, -c.job.spec.priority, c.job.id))
    return out


def _held_elsewhere(home: Any, only: str | Job | None, me: str) -> list[tuple[Job, float, str, bool]]:
    """(job, earliest heartbeat expiry, worker, whether its rows are all in) of queued jobs whose units left are
    held by others, or whose rows are all in while another worker lives: that worker records the completion,
    or, dead, goes stale within its lease and this one records it. (A worker killed right after its last
    commit, its heartbeat dated days ahead by its clock, left the job "running" for days: every `runner work`
    said "nothing to do" and ended before that heartbeat's lease could run out; adversarial pass 131.)"""
    out = []
    for job, progress in _queued(home, only, {}):  # (broken or unreadable folders: nothing to wait for there)
        others = {w: hb for w, hb in progress.live.items() if w != me}
        if progress.filling:  # a claim still empty (no links): free within CLAIM_FILL_SECONDS unless filled
            out.append(
                (job, time.time() + jobdir.CLAIM_FILL_SECONDS, "? (its claim is still being written)", False)
            )
        elif others:  # (units left all held by them, as a job with one free is a candidate; or none left)
            who, hb = min(others.items(), key=lambda kv: float(kv[1].get("expires", 0)))
            out.append((job, float(hb.get("expires", 0)), _holder_said(who, hb), progress.complete))
    return out


def _holder_said(who: str, hb: dict[str, Any]) -> str:
    """A worker that holds what is left, as the wait names it: one stopped on this machine (SIGSTOP, Ctrl-Z) is
    said so, with how to continue it (the wait said "waiting for it to finish" of a process that could not)."""
    owner = Owner.from_dict(hb)
    if owner is None or not owner.provably_stopped():
        return who
    if owner.traced():  # (kill -CONT does nothing for it)
        return (f"{who}, stopped on this machine by a debugger or tracer (strace, gdb: pid {owner.pid}; it goes on "
                "when the tracer continues it or detaches)")  # fmt: skip
    return f"{who}, stopped on this machine (SIGSTOP or Ctrl-Z: `kill -CONT {owner.pid}` continues it)"


def _stopped(e: StorageError, job: Job) -> StorageError:
    where = "this machine's temp folder" if e.local else "the job home"
    how = "read" if str(e).startswith(("cannot read", "cannot list")) else "written"
    return StorageError(
        f"stopped: {where} cannot be {how} ({e}); job {job.id} is consistent and resumes with the "
        "next `runner work` (or the same `runner run` again)",
        e.errno,
        local=e.local,
    )


def lease_seconds() -> float:
    """How long a worker's claims outlive its last heartbeat: $RUNNER_LEASE_TTL (seconds), else 120. Shorter
    means a dead worker's units are taken over sooner, and a worker frozen that long is taken over too."""
    raw = os.environ.get("RUNNER_LEASE_TTL")
    if not raw:
        return jobdir.LEASE_TTL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 86400:
        raise RunnerError(f"RUNNER_LEASE_TTL must be a number of seconds in [1, 86400], got {raw!r}")
    return value


def local_device() -> str | None:
    """Under torchrun or `accelerate launch` (LOCAL_RANK set), each process uses its own GPU, `cuda:LOCAL_RANK`;
    on a machine without GPUs the job's own device. No collectives: the processes share the job by units."""
    rank = os.environ.get("LOCAL_RANK")
    if rank is None or not rank.isdigit():
        return None
    import torch

    per_process = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(per_process)
    device = f"cuda:{rank}" if torch.cuda.is_available() else None
    make_current(device)
    return device


def make_current(device: str | None) -> None:
    """A worker process on cuda:N (`--gpus` starts one per GPU, torchrun one per LOCAL_RANK) makes it the
    process's current device, as torchrun's own workers do: CUDA calls that name no device (the allocator's, a
    model's own kernels) then land on its GPU, not on cuda:0, and no CUDA context is made there. A device that
    is not there is left to the engine to say."""
    if not (device and device.startswith("cuda:") and device[5:].isdigit()):
        return
    import torch

    if torch.cuda.is_available() and int(device[5:]) < torch.cuda.device_count():
        torch.cuda.set_device(int(device[5:]))


class Engines:
    """Loaded models, reused across jobs: one in memory at a time (or the caller's, for every job)."""

    def __init__(self, engine: Engine | None, device: str | None):
        self.given, self.device = engine, device
        self.loaded: dict[tuple[Any, ...], Engine] = {}

    def options(self, job: Job) -> Any:
        import dataclasses

        opts = job.options
        return dataclasses.replace(opts, device=self.device) if self.device else opts

    def get(self, job: Job) -> Engine:
        if self.given is not None:
            return self.given
        o = self.options(job)
        # the weights the job was submitted for: a model saved over the same folder while this worker ran an
        # earlier job of it is loaded again, not taken from memory (pass 50)
        weights = job.meta.get("model_fingerprint")
        # (cuda_graphs: the engine decides its decode path when it loads; device_map: where accelerate puts the
        # layers, a job of a model too big for one GPU loaded whole on one without it; pass 254)
        key = (job.spec.model, job.spec.revision, weights, o.device, o.dtype, o.trust_remote_code, o.allow_pickle,
               o.cuda_graphs, o.device_map)  # fmt: skip
        if key not in self.loaded:
            if self.loaded:
                self.loaded.clear()
                _release_memory()  # before the next engine reads the GPU's free memory for its token budget
            # (a job of its own --device cuda:N, or runner.work(device=...) from Python)
            make_current(o.device)
            self.loaded[key] = Engine(job.spec.model, o, job.spec.revision)
        return self.loaded[key]


def _release_memory() -> None:
    """Give a dropped engine's memory back: its model and caches (reference cycles included), and the CUDA
    allocator's cached blocks, which the GPU would otherwise count as used."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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
    device: str | None = None,
    on_failed: Callable[[Job], None] | None = None,
    on_unrunnable: Callable[[Job], None] | None = None,
    on_broken: Callable[[str, str], None] | None = None,
    progress_every: float | None = None,
) -> list[RunSummary]:
    """Work through the queue until it is empty, `deadline` (time.time()) is near, or `stop()` is true.
    `job` restricts the worker to one job; `once` stops after one job; `device` overrides the jobs' device
    (`cuda:1` for the second GPU). Several workers may run at once, on one job or many. Returns a summary per
    job run; `on_failed(job)` hears of each job that failed in this run (the model would not load...),
    `on_unrunnable(job)` of each left queued because it needs what this machine lacks (its device, its model
    folder: NotOnThisMachine), `on_broken(job_id, folder)` of each broken job it skipped (said as met), once it
    ends. Progress lines every `progress_every` seconds (None: every 10 s at first, then
    further apart as the run grows old; progress.py)."""
    _check_work_numbers(deadline=deadline, lease_ttl=lease_ttl, shard_rows=shard_rows,
                        shard_seconds=shard_seconds, poll=poll, progress_every=progress_every)  # fmt: skip
    owner = Owner.me()
    engines = Engines(engine, device or local_device())
    lease_ttl = lease_ttl or lease_seconds()
    run_opts = dict(echo=echo, shard_rows=shard_rows, shard_seconds=shard_seconds, deadline=deadline,
                    owner=owner, lease_ttl=lease_ttl, progress_interval=progress_every)  # fmt: skip
    summaries: list[RunSummary] = []
    failed: set[str] = set()
    broken: dict[str, Broken] = {}  # folder -> a broken job met: said once per worker
    unfilled: dict[str, float] = {}  # folder -> when its empty newest state record was made (no links)
    waits_said: set[tuple[str, str]] = set()  # (job, worker holding the rest) waits said
    waited: dict[str, Job] = {}  # jobs waited for, by id: how each ended is said at the end
    # jobs whose run met a file of their folder that did not read through the retries, by id: (the stop that
    # says so, how many jobs had run then); the others run first (`_unread_again`)
    unread: dict[str, tuple[StorageError, int]] = {}
    root = Path(home) if home is not None else jobdir.default_home()
    home_there = job is None and _home_is_there(root)  # (gone later: unmounted, `_check_home_still_there`)
    if job is None:
        jobdir.remove_dead_submits(root)
    while not ((stop and stop()) or (deadline is not None and time.time() >= deadline)):
        cand = _next_or_unread(home, job, failed, broken, unfilled, echo, unread)
        if cand is None:
            if unfilled:
                jobdir.wait_for_state()
            elif not _wait_for_others(home, job, owner.worker, poll, deadline, echo, waits_said, waited):
                if _unread_again(unread, failed, len(summaries)):
                    continue
                _stop_if_unreadable(broken, unread)  # nothing left to run or wait for but what does not read
                if home_there:
                    _check_home_still_there(root)
                break
            continue
        try:
            summary = run_leased(cand, engines, stop, run_opts, echo)
        except (ModelUnreadable, JobReplaced, JobGone, StorageError, NotOnThisMachine, BrokenJob) as e:
            _skipped(e, cand, failed, broken, unread, len(summaries), on_unrunnable, home, echo)
            continue
        now = _state_now(cand.job)
        if now is None:  # said broken by run_leased, after its wait for the state: not again
            broken.setdefault(str(cand.job.dir), Broken("", True, None, cand.job.id))
        if summary is None:
            failed.add(cand.job.id)
            if on_failed is not None and now is JobState.FAILED:
                on_failed(cand.job)
            continue
        summaries.append(summary)
        # (stopped by a cancel: the queue goes on, with that job too if a `runner retry` queued it again since)
        if once or (summary.stopped and not summary.cancelled and now is not JobState.CANCELLED):
            break
    for folder, b in broken.items() if on_broken is not None else ():
        if b.unreadable is None:  # (unreadable for now is not broken)
            on_broken(b.job_id, folder)
    _say_how_waited_jobs_ended(waited, summaries, echo)
    return summaries


def _say_how_waited_jobs_ended(waited: dict[str, Job], summaries: list[RunSummary], echo: Any) -> None:
    """A worker that waited for others' units says how each job it waited for ended, unless its own run said
    so: its last words were "waiting for it to finish", then nothing, or "nothing to do", and the user of that
    terminal could not tell whether the job completed (adversarial pass 143)."""
    from .job_status import job_status

    ended_here = {s.job_id for s in summaries if s.finished}
    for j in waited.values() if echo else ():
        try:
            status = job_status(j)
        # (only informative: a status failing through the retries ended the work on it)
        except RunnerError as e:
            echo(f"job {j.id}: how it ended cannot be read now ({first_line(e)}); `runner status` says")
            continue
        if j.id not in ended_here and status.state in ("completed", "cancelled", "failed"):
            how = "completed by another worker" if status.state == "completed" else f"is {status.state}"
            done = f"{status.done:,}/{status.total:,} {j.spec.count_noun}"
            echo(f"job {j.id} {how}: {done}, {counted(status.errors, 'errors')}")


def _next_candidate(
    home: Any,
    only: str | Job | None,
    failed: set[str],
    broken: dict[str, Broken],
    unfilled: dict[str, float],
    echo: Any,
) -> Candidate | None:
    """The job to take next (None: none now), saying once each broken job met. A folder unreadable for now is
    looked at again each round; when nothing else is left to run or to wait for, it stops the worker
    (`_stop_if_unreadable`, pass 65)."""
    seen = set(broken)
    unread = {f for f in broken if broken[f].unreadable}
    for folder in unread:
        del broken[folder]
    cand = next((c for c in queue(home, only, broken) if c.job.id not in failed), None)
    for folder in [f for f in unfilled if f not in broken]:
        del unfilled[folder]  # its record reads now
    for folder in [f for f in broken if f not in seen or (f in unread and not broken[f].unreadable)]:
        if not _on_its_way(folder, broken, unfilled, echo) and echo:
            b = broken[folder]
            echo(_broken_line(b.job_id, folder, b.why, b.repairable, b.unreadable is not None))
    return cand


def _unread_in_job(e: StorageError) -> bool:
    """A run stopped by a read of the job home failing through the retries (not this machine's temp folder, not a
    write): one file of that job may be what fails, and the other jobs may read. (Where the whole home fails, the
    next look at the queue fails too and stops the worker.)"""
    return (
        _unreadable(e)
        and not e.local
        and isinstance(e.__cause__, StorageError)
        and str(e.__cause__).startswith(("cannot read", "cannot list"))
    )


def _unread_again(unread: dict[str, tuple[StorageError, int]], failed: set[str], ran: int) -> bool:
    """Jobs whose run met a file that did not read are tried once more when nothing else is left, if other jobs
    ran since (the file may read now); whether any is."""
    again = [job_id for job_id, (_, then) in unread.items() if then < ran]
    for job_id in again:
        del unread[job_id]
        failed.discard(job_id)
    return bool(again)


def _next_or_unread(
    home: Any,
    job: Any,
    failed: set[str],
    broken: dict[str, Broken],
    unfilled: dict[str, float],
    echo: Any,
    unread: dict[str, tuple[StorageError, int]],
) -> Candidate | None:
    """`_next_candidate`; where the home as a whole does not read now, the stop of the run it broke says so."""
    try:
        return _next_candidate(home, job, failed, broken, unfilled, echo)
    except StorageError as e:
        if unread and _unreadable(e):
            raise next(iter(unread.values()))[0] from e
        raise


def _skipped(
    e: Exception,
    cand: Candidate,
    failed: set[str],
    broken: dict[str, Broken],
    unread: dict[str, tuple[StorageError, int]],
    ran: int,
    on_unrunnable: Any,
    home: Any,
    echo: Any,
) -> None:
    """`cand`'s run stopped by `e` without a summary: that job is skipped and the others run (re-raised where `e`
    stops the worker). `unread`: the jobs that met a file that does not read; `ran`: how many jobs ran so far."""
    if isinstance(e, StorageError) and not isinstance(e, ModelUnreadable) and not _unread_in_job(e):
        raise e  # (said by run_leased as a stop: the job is consistent)
    failed.add(cand.job.id)
    if isinstance(e, (ModelUnreadable, JobReplaced, JobGone)):
        # that job waits for its model to come back, or its folder holds another job now or is gone
        if echo:
            echo(str(e))
    elif isinstance(e, StorageError):
        # one file of that job that does not read (Drive cannot serve it for hours) held every job of the home
        unread[cand.job.id] = (e, ran)
        if echo:
            echo(f"job {cand.job.id} cannot be read for now ({e.__cause__ or e}); skipped, and looked at again "
                 "once the other jobs have run")  # fmt: skip
    elif isinstance(e, NotOnThisMachine):  # that job waits for a machine that has what it needs
        if on_unrunnable is not None:
            on_unrunnable(cand.job)
        if echo:
            echo(f"job {cand.job.id} stays queued: {e}; {_where_it_runs(cand.job, e, home)}")
    else:  # BrokenJob, said by run_leased; skipped from now on, as those the queue finds broken
        broken.setdefault(str(cand.job.dir), Broken(str(e), e.repairable, None, cand.job.id))


def _check_home_still_there(root: Path) -> None:
    """The home, there when the worker began, is gone now that its queue reads as empty: Google Drive unmounted
    under the worker. The jobs not run yet read as none, and `runner work` ended with exit 0, its last job's end
    the last word, though the next ones were never begun: a stop, said."""
    if not _home_is_there(root, failing=True):
        raise StorageError(f"stopped: the job home {root} is gone (Google Drive unmounted? or the folder moved or "
                           "deleted); its jobs resume with the next `runner work` once it is back", errno.ENOENT)  # fmt: skip


def _home_is_there(root: Path, failing: bool = False) -> bool:
    """Whether the home is a folder; `failing` where its look fails through the retries (not known: not gone)."""
    import stat

    try:  # (a link followed: a home linked to Drive, `ln -s /content/drive/MyDrive/jobs jobs`, dangles once unmounted)
        return storage.retry(lambda: storage.is_there(root, stat.S_ISDIR), f"read {root}")
    except StorageError:
        return failing


def _stop_if_unreadable(broken: dict[str, Broken], unread: dict[str, tuple[StorageError, int]]) -> None:
    """Nothing else to do but a folder unreadable for now: the home is failing, or that folder is; stop. Or a
    job that met a file that does not read (`unread`): the stop of its run says so."""
    if unread and not any(b.unreadable for b in broken.values()):
        raise next(iter(unread.values()))[0]
    if e := next((b.unreadable for b in broken.values() if b.unreadable), None):
        raise StorageError(f"stopped: {e}; nothing in that job is damaged: it carries on with the next `runner "
                           "work` once its folder reads (`runner status` shows it unreadable meanwhile)", e.errno)  # fmt: skip


def _on_its_way(folder: str, broken: dict[str, Broken], unfilled: dict[str, float], echo: Any) -> bool:
    """A job found broken because its newest state record is empty where links are not supported: a `cancel`
    or `retry` writing it now (created, not filled yet), or one killed half way. Until the record is
    STATE_PATIENCE_SECONDS old it is left out of `broken` (so looked at again each round) and said to be waited
    for, not said broken."""
    made = broken[folder].made
    if made is None:
        return False
    if folder not in unfilled:
        unfilled[folder] = made
        if echo:
            echo(_waiting_line(broken[folder].job_id))
    if time.time() - made > jobdir.STATE_PATIENCE_SECONDS:
        del unfilled[folder]
        return False
    del broken[folder]
    return True


def _waiting_line(job_id: str) -> str:
    return (f"job {job_id}: its newest state record is empty (a `runner cancel` or `retry` writing it now, where "
            f"links are not supported, or one killed half way); waiting up to {jobdir.STATE_PATIENCE_SECONDS:.0f} s "
            "for it")  # fmt: skip


def _where_it_runs(job: Job, e: NotOnThisMachine, home: Any) -> str:
    if isinstance(e, NoSuchDevice):  # (a job outside the home, `runner run -o DIR`, by its folder)
        root = Path(home) if home is not None else jobdir.default_home()
        ref = job.id if job.dir == root / job.id else shlex.quote(str(job.dir))
        return (
            f"run it on a machine that has that device, or here with `runner work --job {ref} --device cpu`"
        )
    # (a hint that is a command, `hf download ORG/NAME --revision COMMIT`, ran on into these words)
    end = "" if e.hint.endswith(("?", ".", ";", ":")) else ";"
    return f"{e.hint}{end} `runner work` runs it once it is there"


def _state_now(job: Job) -> JobState | None:
    """The job's state now (while a change of it is being written, the state before it: `state_as_read`); None
    for a broken job (that is said when the queue is looked at again)."""
    try:
        return jobdir.state_as_read(job)[0].state
    except RunnerError:
        return None


def _wait_for_others(
    home: Any,
    job: Any,
    me: str,
    poll: float,
    deadline: float | None,
    echo: Any,
    said: set[tuple[str, str]],
    waited: dict[str, Job] | None = None,
) -> bool:
    """Jobs whose remaining units other live workers hold: wait for them to finish or go stale (a dead
    worker's units are then taken over). False when there is nothing to wait for, or no time. Said once per
    job and holder (`said`): a live holder renews its claim, so a wait "up to N s" said every poll never
    counted down. Each job waited for goes in `waited`, for the end to say how it ended."""
    held = _held_elsewhere(home, job, me)
    if not held:
        return False
    wait = min(poll, max(0.5, min(h[1] for h in held) - time.time()))
    if deadline is not None and time.time() + wait >= deadline:
        return False
    j, expires, who, complete = min(held, key=lambda h: h[1])
    if waited is not None:
        waited[j.id] = j
    if echo and (j.id, who) not in said:
        said.add((j.id, who))
        stale = f"would go stale within {max(0, expires - time.time()):.0f} s and this worker"
        if complete:
            echo(f"job {j.id}: its rows are all in; waiting for worker {who} to record its completion (were it "
                 f"to die, its heartbeat {stale} record it)")  # fmt: skip
        else:
            echo(f"job {j.id}: the rest is held by worker {who}; waiting for it to finish (were it to die, its "
                 f"claim {stale} take the rest over)")  # fmt: skip
    # (a commit, or the job's state recorded: its last worker's word of completion)
    _sleep_until_a_commit([j.dir / sub for j, *_ in held for sub in (jobdir.MARKERS, jobdir.STATES)], wait)
    return True


WAIT_STEP = 1.0  # seconds: how often a waiting worker looks whether a commit landed (one stat per folder)


def _sleep_until_a_commit(folders: list[Any], most: float) -> None:
    """Sleep `most` seconds, or less once a folder of commit markers changes (the other worker committed, maybe
    its last unit: the queue is looked at again then, not up to `poll` seconds later; `runner work --workers N`
    ends when its last worker does)."""

    def stamps() -> list[int | None]:
        out = []
        for folder in folders:
            try:
                out.append(os.stat(folder).st_mtime_ns)
            except OSError:
                out.append(None)
        return out

    # the steady clock: a wall clock stepped back while it slept (NTP, a VM resumed) made this wait that much
    # longer, an hour's step an hour's stall once the holder had died (adversarial pass 131)
    before, end = stamps(), time.monotonic() + most
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(WAIT_STEP, left))
        if stamps() != before:
            return


def _check_work_numbers(deadline: Any, **positive: Any) -> None:
    """`work`'s numeric options, refused up front with the option named (the command line's types check the
    same): a nan deadline or interval compared as "not yet" for ever, and a zero shard never ended."""
    if deadline is not None and not _finite(deadline):
        raise ValueError(f"deadline must be a time.time() value, got {deadline!r}")
    for name, value in positive.items():
        if value is not None and not (_finite(value) and value > 0):
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def run_leased(
    cand: Candidate, engines: Engines, stop: Any, run_opts: dict[str, Any], echo: Any
) -> RunSummary | None:
    """Run one job and settle its outcome: a summary, or None when the job failed (recorded); BrokenJob (said)
    when it is broken."""
    j = cand.job
    starting = f"{'resuming' if cand.interrupted else 'starting'} job {j.id}" + (
        f" ({j.name})" if j.name else ""
    )
    _log(j, starting)
    if echo:
        echo(starting)
    read = None
    halted = _Halted(stop, run_opts["deadline"])
    try:
        # what a failure found from here on is recorded over (never over a newer word)
        read = jobdir.settled_state(j, halted, lambda: echo and echo(_waiting_line(j.id)))
        if (missing := missing_model_folder(j.spec.model, job_resumes(j.id), j.spec.revision)) is not None:
            raise missing

        def load() -> Engine:  # by run_job once there is work, under its heartbeat
            engine = _reading_model(lambda: engines.get(j), j)
            _reading_model(lambda: _check_model(j), j)
            return engine

        summary = run_job(j, None, should_stop=stop, load_engine=load, **run_opts)
    except (ModelUnreadable, JobReplaced, JobGone):  # (not the failure of the job in the folder now)
        raise
    except (StorageError, OSError) as e:
        try:
            jobdir.check_folder_still_there(j, e)
        except StorageError as gone:  # the job home itself is gone (Drive unmounted): the worker stops
            raise _stopped(gone, j) from e
        # something of the wrong kind in this job's folder: this job is broken, not the home
        if _damaged(e, j):
            raise _said_broken(j, BrokenJob(f"its folder is damaged: {e}"), echo) from e
        if isinstance(e, StorageError):  # the job home itself is failing (Drive gone): not the job's fault
            raise _stopped(e, j) from e
        raise
    except (DeviceError, NotOnThisMachine):  # this machine's, not the job's: it stays queued
        raise
    except KeyboardInterrupt as e:  # a second Ctrl-C or a signal: log.txt hears how this run ended too
        _log(j, f"stopped at once: {getattr(e, 'said', 'interrupted')}; its finished batches are kept")
        raise
    except BrokenJob as e:
        raise _said_broken(j, e, echo) from None
    except RunnerError as e:
        if read is not None:
            _settle_failure(j, read, e, echo)
        return None
    return _settle(j, summary, echo, halted)


class _Halted:
    """Whether the worker is to stop now (call it): `stop()` (a Ctrl-C, a signal), or its deadline has come;
    `why()` says which, for the job's log."""

    def __init__(self, stop: Callable[[], bool] | None, deadline: float | None):
        self.stop, self.deadline = stop, deadline

    def __call__(self) -> bool:
        return self.why() is not None

    def why(self) -> str | None:
        if self.stop is not None and self.stop():
            return "asked to stop (Ctrl-C or a signal)"
        if self.deadline is not None and time.time() >= self.deadline:
            return "its --hours/--until deadline came"
        return None


def _damaged(e: Exception, job: Job) -> bool:
    """An OS or storage error saying that something of the wrong kind stands in `job`'s folder (not in its
    model's folder, not anywhere else)."""
    kind = getattr(e, "damaged", False) or (isinstance(e, OSError) and e.errno in storage.DAMAGED)
    return bool(kind) and str(job.dir) in str(e)


def _said_broken(j: Job, e: BrokenJob, echo: Any) -> BrokenJob:
    if echo:
        echo(_broken_line(j.id, j.dir, e, e.repairable))
    return e


def _reading_model(read: Callable[[], Any], j: Job) -> Any:
    return reading_model(read, j.spec.model, job_resumes(j.id))


MODEL_CHANGED = "resuming with a different model is refused"  # (a retry alone would fail the same way)


def _check_model(j: Job) -> None:
    from .jobs import model_unchanged

    try:  # reading the model, not the job: its OS errors are not the job folder's damage
        same = model_unchanged(j)
    except OSError as e:
        raise RunnerError(f"cannot read the model {j.spec.model!r} of job {j.id}: {e}") from e
    if not same:
        from .models import is_hub_model

        # (its repository's newest commit is another snapshot than the job's: fingerprint version 7)
        hub = " (a hub model: a commit was pushed to it since)" if is_hub_model(j.spec.model) else ""
        raise RunnerError(
            f"the model {j.spec.model!r} is not the one job {j.id} was submitted with (its files or config "
            f"changed{hub}); {MODEL_CHANGED}: put that model back, then `runner retry {j.id}`, or submit the file "
            "again as a new job for this one"
        )


def _settle_failure(j: Job, read: jobdir.StateRecord, e: RunnerError, echo: Any) -> None:
    """Record the job's failure over the state read before the failure was found (`read`): a cancel, retry or
    repair recorded since, however long this worker slept before getting here, stands (a retry after the
    user fixed the cause is not undone by what this worker saw before)."""
    if read.state is not JobState.QUEUED or jobdir.write_failed(j.dir, read, str(e)) is None:
        return
    _log(j, f"failed: {e}")  # (its log.txt not taking the line: the failure is recorded, the next job runs)
    if echo:
        echo(f"job {j.id} failed: {e}")


def _settle(j: Job, summary: RunSummary, echo: Any, halted: _Halted) -> RunSummary:
    """What the run's end means, said once: completed, cancelled, others still on it, or stopped."""
    try:
        # (a newest record being written, a `cancel` landing as the run ended, is waited for)
        record = jobdir.settled_state(j, halted, lambda: echo and echo(_waiting_line(j.id)))
        state = record.state
    except BrokenJob as e:  # damaged since, or a change's record never filled (no hard links)
        line = _being_written_line(j, summary) if e.unfilled and not e.waited_out() else None
        if line is not None:
            _log(j, line)
        if echo:
            echo(line or _broken_line(j.id, j.dir, e, e.repairable))
        return summary
    done = f"{summary.done:,}/{summary.total:,} {j.spec.count_noun}"
    if state is JobState.CANCELLED and summary.finished:  # (the cancel landed as the last rows were done)
        line = _cancelled_when_done(j.id)
    elif state is JobState.CANCELLED:
        again = shlex.quote(str(j.dir))
        line = f"job {j.id} was cancelled; its finished rows are kept (`runner retry {again}` resumes it)"
    elif summary.finished and state is JobState.COMPLETED:
        line = f"job {j.id} completed: {done}, {counted(summary.errors, 'errors')}"
    elif summary.finished and _folder_gone(j):  # (a folder gone reads as queued: not a `retry`)
        line = (f"job {j.id}: {done}, {counted(summary.errors, 'errors')} saved; its folder is gone now (Google "
                "Drive unmounted? moved or deleted?), so whether it was recorded completed is not known")  # fmt: skip
    elif summary.finished:  # its completion refused: the state changed as the run ended
        line = (
            f"job {j.id}: {done}, {counted(summary.errors, 'errors')}; not completed: "
            + _changed_as_it_ended(record)
        )
    elif summary.others:
        line = f"job {j.id}: {counted(summary.others, 'other workers', 'are')} computing the rest"
    else:  # said to the user by the command (which knows how it is run again); log.txt hears it here
        line = ""
        _log(j, f"stopped with {done} done" + (f" ({why})" if (why := halted.why()) else ""))
    if line:
        _log(j, line)
        if echo:
            echo(line)
    return summary


def _folder_gone(j: Job) -> bool:
    """Whether the job's folder is not there now (a look that fails through the retries: not known, not gone)."""
    try:
        return storage.kind(j.dir) is None
    except StorageError:
        return False


def _being_written_line(j: Job, summary: RunSummary) -> str:
    """What a run stopped (Ctrl-C, a signal, its deadline: the wait for the state gives way) says where the job's
    newest state record is still empty for less than the patience, no hard links there: a `runner cancel` or
    `runner retry` being written, not a broken job (it was said broken, `runner repair` its cure, and `runner
    work` ended with an error; adversarial pass 209)."""
    return (f"job {j.id}: {summary.done:,}/{summary.total:,} {j.spec.count_noun} saved; a change of its state is "
            "being written (a `runner cancel` or `runner retry`: its state record is still empty); `runner status "
            f"{shlex.quote(str(j.dir))}` says what it became")  # fmt: skip


def _changed_as_it_ended(record: jobdir.StateRecord) -> str:
    """Why a run that did every row did not record the job completed: its state changed as the run ended, by a
    `runner retry` or `repair` (queued again), or by another worker that failed it (a VM with another model)."""
    if record.state is JobState.FAILED:
        return f"another worker failed it as this run ended ({record.error or 'no reason given'})"
    return f"it became {record.state} as this run ended (a `runner retry` or `runner repair`)"


def _cancelled_when_done(job_id: str) -> str:
    return f"job {job_id} was cancelled after every row was done: its results are complete"


def _log(j: Job, line: str) -> None:
    """A line of the job's log.txt, which records how each run went (a failing log write stops nothing)."""
    try:
        j.log(line)
    except RunnerError:
        pass
