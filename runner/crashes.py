"""Rows that crash workers: what a worker was computing when it died, so that the next one isolates the row.

worker.py, before each batch -> `InFlight.running` -> inflight/UUUUU.json for the unit -> `InFlight.settle`
once the batch's outcome is buffered. The next worker starts with `InFlight.recover`.

Some failures take the process down with them. A CUDA device-side assert (an out-of-range token id in a
custom model, a kernel bug) leaves the CUDA context unusable: every later batch of that process fails too. A
crash in native code kills the process without a word. Re-running the same batch would fail forever, so:

  * Before computing a batch the worker records its (row, sample) keys here, and clears the record once their
    outcome is buffered: a worker that dies in between leaves the record behind.
  * A recognised device error (`is_device_error`) is recorded with the keys; the worker writes the rows it
    has finished and stops with a one-line `DeviceError` (the process cannot use the GPU any more). The next
    worker runs those keys first, one at a time; the one that fails alone with a device error is recorded in
    errors.jsonl as a `worker_crash` (conclusive) and that worker stops too; the one after carries on. A batch
    of more than GROUPS_FROM keys runs first in groups of GROUPS_FROM (a group that fails is at most that
    many, so it runs key by key next): a GPU batch of 1,024 rows is 128 groups and 8 rows alone and one more
    restart, not 1,024 rows alone (about half an hour on a GPU).
  * A silent death (SIGKILL, segfault) proves little, because a Colab kill looks exactly the same, and it is
    by far the likelier of the two. So a batch whose worker died silently runs again first, as a batch (a
    plain kill costs nothing more); only when it kills a second worker do its keys run one at a time
    (`isolated`), a batch of more than GROUPS_FROM keys in groups of GROUPS_FROM first (a GPU batch of 1,024
    rows, a refill window: half an hour of rows alone otherwise), the group that kills a worker once more
    then key by key. A key whose worker died silently while running it isolated goes to the end of the job
    and runs alone once more; dying so a second time (`SILENT_CRASHES`) sets it aside as a `worker_crash`.
So plain kills set a good row aside only if four in a row land while it is computed: twice in its batch, then
alone, then alone again at the very end of the job (five from a batch of more than GROUPS_FROM: once more in
its group). A batch that is one row by plan (`--batch-size 1`, a leftover row, a prompt alone over the token
budget) is a batch like any other: four too; and so is a row run alone because another row of its batch made
the device fail (that failure is no death of its own). A row that really crashes workers silently costs four
restarts (five in a batch of more than GROUPS_FROM), and holds up no other row; one that trips a device error,
two (one with a batch of one row: a device error is conclusive; three when its batch had more than GROUPS_FROM).
A worker that stops cleanly (Ctrl-C, SIGTERM, deadline, an ordinary error) keeps the suspects it has not run
yet and does not count the batch it was computing as a crash. Nor is one counted when the record's writer
provably lives: stopped on this machine (SIGSTOP: frozen past its lease, then taken over), renewing its
heartbeat or settling its batch while the taker waits (continued just before its record was read, or its
heartbeat file damaged), or this very worker; the deaths its batch had before still count.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import storage
from .errors import RunnerError
from .jobdir import LEASE_TTL, Owner, beat_period

SILENT_CRASHES = 2  # silent deaths of workers computing the same keys: a batch is split, a lone key set aside
GROUPS_FROM = 8  # a crashed batch with more keys than this is searched in groups first (`_split`)
# seconds a worker waits, beyond the writer's heartbeat period, for a sign of life from a record's writer that runs
# on this machine without a fresh heartbeat (continued after it was frozen past its lease, or its heartbeat file
# damaged: it renews within a period; one that hangs never does)
THAW_GRACE_SECONDS = 5.0
# seconds: the longest heartbeat period waited for (a lease of an hour beats every 15 minutes)
LONGEST_WAIT = 300.0
# What torch raises once the device is broken for this process (sticky CUDA errors). Out-of-memory errors
# also say "CUDA error" at times; those are not poison: the worker splits the batch and goes on.
DEVICE_ERRORS = (
    "CUDA error",
    "device-side assert",
    "cudaErrorLaunchFailure",
    "CUBLAS_STATUS",
    "illegal memory access",
)

Key = tuple[int, int]  # (row, sample)


class DeviceError(RunnerError):
    """The device failed in a way that leaves this process unable to use it; the job stays resumable."""


def is_device_error(e: BaseException) -> bool:
    """A RuntimeError that poisons the process (device-side assert, illegal memory access, ...), not OOM."""
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    if "out of memory" in text.lower() or "ALLOC_FAILED" in text:
        return False
    return any(marker in text for marker in DEVICE_ERRORS)


def first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Suspect:
    """Keys to run before or after the rest of the job because a worker died while computing them: a batch to
    run again as it was, or one key to run alone."""

    keys: list[Key]
    crashes: int = 0  # workers that died silently while computing exactly these keys together
    isolated: bool = False  # one key run alone because its batch died twice (not a batch of one by plan)


@dataclass
class Recovery:
    """What a dead worker's record means for this run (`InFlight.recover`)."""

    first: list[Suspect] = field(default_factory=list)  # run before anything else
    last: list[Suspect] = field(
        default_factory=list
    )  # keys that died alone once: alone again, after the rest
    culprits: list[tuple[Key, str]] = field(default_factory=list)  # set aside: (key, errors.jsonl message)
    cause: str | None = None  # the device error the dead worker recorded, if any
    retried_batch: bool = False  # `first` starts with a batch that died once, run again as it was
    isolating: list[Key] = field(default_factory=list)  # the dead worker's batch, split up now (announced)


def split_words(group: int, samples: int = 1) -> str:
    """How the rows of a batch split up after a crash run, in groups of `group` keys (1: alone), as the worker
    says it (before the next one runs them, and as that one starts); with -n `samples` > 1 a group is of samples,
    not rows."""
    unit = " samples" if samples > 1 else ""
    return (
        "one at a time"
        if group == 1
        else f"in groups of {group}{unit}, then the group that fails one at a time,"
    )


def device_crash_message(cause: str) -> str:
    return (
        f"this row made the device fail when computed alone ({cause}), and the worker had to stop; likely an "
        "out-of-range token id or a bug in the model's kernels (`runner retry` tries it again)"
    )


def silent_crash_message(crashes: int) -> str:
    return (
        f"{crashes} workers died while computing this row alone, with no error message (a crash in native "
        "code, or the system's out-of-memory killer); set aside so that the job can finish"
    )


class InFlight:
    """This worker's in-flight record in one job folder."""

    def __init__(
        self,
        path: Path,
        worker: str,
        owner: Owner | None = None,
        holds: Callable[[], bool] | None = None,
        beats: Callable[[str], bool] | None = None,
        lease: float = LEASE_TTL,
        say: Callable[[str], None] | None = None,
        generation: int = 0,
        job: str | None = None,
    ):
        self.path = Path(path)  # inflight/UUUUU.json: the record of one unit of a job
        # the id of that job, recorded: a record copied in from another job's folder (same unit, same name) is no
        # evidence (pass 187: it set an innocent row aside as a worker_crash, unrun)
        self.job = job
        # the job's retry generation: a record of an older one is no evidence (`runner retry` tries its rows
        # again; a record a stop left after its rows were set aside set them aside again unrun: pass 96)
        self.generation = generation
        self.worker = worker
        self.owner = owner  # recorded, so that a reader can tell a frozen writer from a dead one
        self.holds = holds  # whether this worker still holds the unit (asked when another's record is there)
        self.beats = beats  # whether worker W's heartbeat in the job is fresh now (asked of records' writers)
        self.lease = lease  # this worker's lease (recorded: its heartbeat period is a quarter of it)
        self.say = say  # a line for the log (a wait for a record's writer)
        self._on_disk = storage.kind(self.path) == "file"
        # the checksum of the record this worker expects there (the one it found, then its own; None: none)
        self._expected = _check_of(self._read()) if self._on_disk else None
        self._pending: str | None = None  # the checksum of this worker's record being written (`running`)
        # another worker's record stands where this one's was expected: the unit is that worker's now
        self.taken = False

    def read(self) -> dict[str, Any] | None:
        return self._read() if self._on_disk else None

    def _read(self) -> dict[str, Any] | None:
        try:
            rec = storage.read_json(self.path)
        except ValueError:
            return None  # torn (it is written without fsync): nothing to isolate, the rows simply run again
        except storage.StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise
        if not isinstance(rec, dict) or rec.get("check") != storage.json_checksum(rec):
            return None  # changed since it was written (or a version without the check): as if torn
        return rec

    def recover(self, todo: set[Key]) -> Recovery:
        """Read a dead worker's record (keys no longer to do are ignored) and apply the rule above."""
        out = Recovery()
        rec = self.read()
        if rec is None or int(rec.get("generation", 0)) < self.generation or not self._ours(rec):
            return out
        try:
            recorded = [_key(x) for x in rec.get("running", [])]
            out.cause = rec.get("error") or None
            lives = not out.cause and self._writer_lives(rec)  # its batch is no crash: nothing to isolate
            running = [] if lives else [k for k in recorded if k in todo]
            crashes = int(rec.get("crashes", 0)) + (0 if out.cause else 1)
            alone = len(recorded) == 1 and bool(running)
            # (a record of an older runner has no "isolated": a key alone was always an isolated one then)
            if alone and (out.cause or rec.get("isolated", True)):
                if out.cause:
                    out.culprits.append((running[0], device_crash_message(out.cause)))
                elif crashes >= SILENT_CRASHES:
                    out.culprits.append((running[0], silent_crash_message(crashes)))
                else:
                    out.last.append(Suspect(running, crashes, isolated=True))
            elif out.cause or crashes >= SILENT_CRASHES:  # split up: its keys alone, or in groups first
                out.first.extend(_split(running, silent=not out.cause))
                out.isolating = running
            elif running:
                out.first.append(Suspect(running, crashes))  # most likely a plain kill: the same batch again
                out.retried_batch = True
            seen = set(running)
            entries = list(rec.get("suspects", []))
            if lives and int(rec.get("crashes", 0)):  # its batch is no new crash, but keeps the ones it had
                entries.insert(
                    0, {k: rec[k] for k in ("crashes", "isolated") if k in rec} | {"keys": recorded}
                )
            for entry in entries:
                keys = [k for k in (_key(x) for x in entry["keys"]) if k in todo and k not in seen]
                seen.update(keys)
                if keys:
                    group = Suspect(keys, int(entry["crashes"]), bool(entry.get("isolated", len(keys) == 1)))
                    (out.last if group.isolated and group.crashes else out.first).append(group)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError):
            return Recovery()  # a record from another version: run everything normally
        return out

    def _ours(self, rec: dict[str, Any]) -> bool:
        """The record was written for this job (one of an older runner names none: taken as this job's)."""
        return self.job is None or rec.get("job", self.job) == self.job

    def _writer_lives(self, rec: dict[str, Any]) -> bool:
        """The record's writer did not die: it is this worker (it lost its claim and took the unit again), a
        process stopped on this machine (frozen past its lease by SIGSTOP, taken over; it goes on when
        continued), or one that shows it lives after all (`_shows_life`). Its batch is no crash."""
        if rec.get("worker") == self.worker:
            return True
        writer = Owner.from_dict(rec["owner"]) if "owner" in rec else None
        return writer is not None and (writer.provably_stopped() or self._shows_life(writer, rec))

    def _shows_life(self, writer: Owner, rec: dict[str, Any]) -> bool:
        """The writer's heartbeat is fresh again, or it went on past its batch (its record gone or rewritten):
        it was frozen past its lease (a suspended VM or laptop, SIGSTOP) and continued, or a damaged heartbeat
        file made it look stale. Another process that runs on this machine is waited for, a heartbeat period
        and THAW_GRACE_SECONDS; one that hangs on the row shows nothing, and its batch counts as a crash (pass
        54: a good row was set aside after three plain kills and such a thaw; pass 55: after four flipped
        heartbeats)."""
        if self.beats is None or writer.provably_dead():
            return False
        # (a writer that is this process is a worker it ran before this one: over, however it ended)
        waits = writer.pid != os.getpid() and writer.provably_running()
        wait = _beat_period(rec) + THAW_GRACE_SECONDS if waits else 0.0
        deadline, said = time.monotonic() + wait, False
        while not (self.beats(writer.worker) or self._moved_on(rec, writer)):
            if time.monotonic() >= deadline:
                return False
            if not said and self.say is not None:
                self.say(f"worker {writer.worker} was computing rows of this unit when it was taken over and still "
                         f"runs, without a fresh heartbeat: waiting up to {wait:.0f} s for a sign of life before "
                         "its batch counts as a crash")  # fmt: skip
                said = True
            time.sleep(0.25)
        return True

    def _moved_on(self, rec: dict[str, Any], writer: Owner) -> bool:
        """The record read (`rec`) is gone, or its writer wrote another since: it settled the batch."""
        if storage.kind(self.path) is None:
            return True
        now = self._read()
        return now is not None and now.get("worker") == writer.worker and now["check"] != rec["check"]

    def running(
        self,
        keys: list[Key],
        suspects: list[Suspect],
        *,
        crashes: int = 0,
        isolated: bool = False,
        error: str | None = None,
    ) -> None:
        """Record that `keys` are being computed now (`crashes`: silent deaths of workers computing them
        together before; `isolated`: one key run alone because its batch died twice); `suspects` are still to
        run after them. Written before each batch, so cheap: no fsync (a killed process's writes are in the
        page cache for the next one; only a machine crash could lose it, and then nothing is lost either: the
        rows are run again)."""
        rec: dict[str, Any] = {
            "worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(), "updated": time.time(),
            "lease": self.lease, "generation": self.generation, "running": [list(k) for k in keys],
            "crashes": crashes, "isolated": isolated,
            "suspects": [{"keys": [list(k) for k in s.keys], "crashes": s.crashes, "isolated": s.isolated}
                         for s in suspects],
        }  # fmt: skip
        if self.owner is not None:
            rec["owner"] = self.owner.as_dict()
        if self.job is not None:
            rec["job"] = self.job
        if error:
            rec["error"] = error
        rec["check"] = storage.json_checksum(rec)
        if self._taken_over():
            return
        storage.ensure_dir(self.path.parent)
        # noted before the write: a Ctrl-C raised as the rename returns leaves this record there, and `settle`
        # (which a stop runs) must know it is there and this worker's own (pass 70)
        was = self._on_disk
        self._on_disk, self._pending = True, rec["check"]
        try:
            storage.write_json(self.path, rec, durable=False)
        except Exception:
            # it failed (a full disk): not written, and not to be deleted by the settle that follows
            self._on_disk, self._pending = was, None
            raise
        self._expected, self._pending = rec["check"], None

    def settle(self, suspects: list[Suspect]) -> None:
        """Nothing is being computed: keep only the suspects still to run (no file when none)."""
        if suspects:
            self.running([], suspects)
        elif self._on_disk and not self._taken_over():
            storage.remove(self.path)
            self._on_disk, self._expected, self._pending = False, None, None

    def _taken_over(self) -> bool:
        """True (from then on) once another worker's record stands where this worker expected the one it found
        or its own: this worker was frozen past its lease and its unit taken over, and the record is the
        taker's to keep (its commits will be refused as a lost claim; until then it must not clear the taker's
        record of what it is computing, nor put its own in its place: passes 48, 52). A record that cannot be
        read (gone, torn, a stale listing of a network mount) proves nothing while this one still holds the
        unit (`holds`), and neither does a record of another worker's: that one was frozen, then continued,
        and wrote late; the holder writes over it (pass 54)."""
        if not self.taken:
            now = _check_of(self._read())
            if now is not None and now not in (self._expected, self._pending):
                self.taken = self.holds is None or not self.holds()
                self._expected = now  # (still the holder: its next write replaces the late one)
            elif now is None and self._expected is not None and self.holds is not None:
                # the record it expected is gone: a taker that finished the unit removed it (pass 96: a thawed
                # worker wrote its suspects back into a finished unit), unless this one still holds it
                self.taken = not self.holds()
        return self.taken


def _split(keys: list[Key], silent: bool) -> list[Suspect]:
    """A dead worker's batch split up: more than GROUPS_FROM keys in groups of GROUPS_FROM first (the group that
    fails again then key by key; after silent deaths each group counts as having died once: one death of its own
    splits it), else key by key. A key split out by a device error runs as a batch of one: that error may be
    another key's, no death of its own (pass 99: two kills set it aside, not four)."""
    size = split_size(len(keys))
    if size > 1:
        dead = SILENT_CRASHES - 1 if silent else 0
        return [Suspect(keys[i : i + size], dead) for i in range(0, len(keys), size)]
    return [Suspect([k], isolated=silent) for k in keys]


def split_size(keys: int) -> int:
    """How many keys of a crashed batch of `keys` run together when it is split up (1: alone)."""
    return GROUPS_FROM if keys > GROUPS_FROM else 1


def _beat_period(rec: dict[str, Any]) -> float:
    """How long the record's writer goes between heartbeats at most (`jobdir.beat_period` of its lease), up to
    LONGEST_WAIT."""
    try:
        lease = float(rec.get("lease", LEASE_TTL))
    except (TypeError, ValueError):
        lease = LEASE_TTL
    return min(beat_period(lease if lease > 0 else LEASE_TTL), LONGEST_WAIT)


def _check_of(rec: dict[str, Any] | None) -> str | None:
    return rec.get("check") if rec is not None else None


def _key(entry: Any) -> Key:
    return (int(entry[0]), int(entry[1]))
