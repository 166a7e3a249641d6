"""A randomized fault campaign: one job shared by 1-3 real `runner work` processes takes a few hundred faults of
every kind the job folder model (runner/jobdir.py) claims to survive. After each round the job is brought to
completion the way a user would, and every (row, sample) must be in the results exactly once, equal to an
uninterrupted run, while a bystander job in the same home is unaffected.

A round (`Round.play`), in a fresh copy of the prepared jobs:
  1. commands killed half way: `runner cancel` / `runner retry` inside their write of a state record (before its
     link, or without links between its create and its fill), and in some rounds `runner submit` (at a fault
     point, or once its temp folder has reached a random stage); in a bystander round (`by_round`) the
     bystander is run part way (killed) and some of its files damaged (its prompts.parquet too);
  2. 1-3 workers on the job (RUNNER_LEASE_TTL=2, --shard-rows 2) through tests/fsfaults.py: slightly slow
     writes and transient EIO/ENOTCONN on listings, reads and stats in the job folder. Some carry RUNNER_FAULT (they
     SIGKILL themselves at a named point); the test SIGKILLs, SIGSTOPs (until another worker has taken one of
     its units over) and damages files on progress events (commit markers appearing, units starting), never
     on a timer alone; in a reader round (`readers`) the user also reads the results meanwhile; in a bystander
     round half the workers run the whole home (`runner work` without --job);
  3. with the workers gone: torn/garbage/bit-flipped JSON in every metadata file kind, bit flips, truncation and
     deletion of shards, Drive conflict copies; `runner repair` killed at one of its writes;
  4. recovery as a user: in a reader round `runner status`, load_results and exports first (only finished rows,
     each once, or a refusal); `runner status` -> `runner repair` if broken, `runner retry` if cancelled or
     failed -> `runner work` until `runner status` says completed (the user reading and exporting while that
     work or repair runs); the damaged bystander must say what is wrong, never stop the job's work, and come
     back whole through `runner repair` + `runner work`; then the checks (`Round.check`: every reader and export
     exactly once once completed, the same rows as load_results; an export killed before its rename leaves the
     earlier file as it was).

Everything random comes from one seeded generator; a fault that does not land (the worker finished first) is
simply not counted. Rounds go on until TARGET faults have been counted and every kind has landed; each round
leaves ROUND/story.txt (what happened, with every command's output) under the test's tmp_path, and the
summary goes to campaign-summary.txt there (and to stdout: run with -s). CAMPAIGN_TARGET=40 makes a quick
smoke run for the edit loop.

The job's shape comes from environment variables (the defaults are CI's campaign; another shape, another campaign):
  CAMPAIGN_KIND=generate|score|embed  the job's kind (score and embed: one sample a row, results compared on
                                      their own columns: token ids and log-probs, or the vector; floats within
                                      1e-4 of the uninterrupted run, as batching changes their last bits)
  CAMPAIGN_PROMPTS=16                 rows of the job
  CAMPAIGN_SAMPLES=2                  samples a row (-n; generate only)
  CAMPAIGN_UNIT_ROWS=4                rows a unit (4 units of 8 keys)
  CAMPAIGN_SHARD_ROWS=2               the workers' --shard-rows (4 commits a unit)
  CAMPAIGN_MAX_WORKERS=3              at most this many workers at once in a round (1-5)
  CAMPAIGN_REFILL=1                   EngineOptions(continuous_batching=True) (generate)
The progress events the faults wait for ("done" = commit markers) are scaled to the job's number of commits.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import fsfaults
import pyarrow.parquet as pq
import pytest
import workers
from helpers import write_jsonl

import runner
from runner import EmbedParams, EngineOptions, GenerationParams, ScoreParams, jobdir
from runner.jobdir import Job, read_state
from runner.jobs import create_job
from runner.worker import run_job

SEED = int(os.environ.get("CAMPAIGN_SEED", 20261130))  # another seed: another campaign (CI keeps this one)
pytestmark = (
    pytest.mark.slow
)  # real worker processes, a few minutes: `make test` (and CI) runs it, test-fast not

TARGET = int(os.environ.get("CAMPAIGN_TARGET", 200))  # faults counted before the campaign stops
MAX_ROUNDS = 40
TIMEOUT = 120.0  # seconds for any one event to happen (the machine is shared and slow)
POLL = 0.02
# the job's shape (module docstring): by default 4 units of 8 keys; --shard-rows 2 commits 4 times per unit
KIND = os.environ.get("CAMPAIGN_KIND", "generate")
N_PROMPTS = int(os.environ.get("CAMPAIGN_PROMPTS", 16))
N_SAMPLES = int(os.environ.get("CAMPAIGN_SAMPLES", 2)) if KIND == "generate" else 1
UNIT_ROWS = int(os.environ.get("CAMPAIGN_UNIT_ROWS", 4))
SHARD_ROWS = int(os.environ.get("CAMPAIGN_SHARD_ROWS", 2))
MAX_WORKERS = int(os.environ.get("CAMPAIGN_MAX_WORKERS", 3))
REFILL = os.environ.get("CAMPAIGN_REFILL", "0") == "1"
assert KIND in ("generate", "score", "embed") and 1 <= MAX_WORKERS <= 5, (KIND, MAX_WORKERS)
N_UNITS = -(-N_PROMPTS // UNIT_ROWS)
# commits of an uninterrupted run: the "done" events are drawn for the default's 16 and scaled to this
COMMITS = sum(-(-min(UNIT_ROWS, N_PROMPTS - u * UNIT_ROWS) * N_SAMPLES // SHARD_ROWS) for u in range(N_UNITS))
PARAMS = {
    "generate": GenerationParams(
        max_new_tokens=6, temperature=1.0, num_return_sequences=N_SAMPLES, seed=4242
    ),
    "score": ScoreParams(add_eos=True),
    "embed": EmbedParams(),
}[KIND]
# the columns a result is compared on (besides id and sample), by kind
VALUES = {"generate": ("token_ids", "text"), "score": ("token_ids", "logprob", "token_logprobs"),
          "embed": ("num_tokens", "embedding")}  # fmt: skip
BYSTANDER_PARAMS = GenerationParams(max_new_tokens=4, temperature=1.0, seed=77)
OPTIONS = EngineOptions(batch_size=2, continuous_batching=REFILL)
BYSTANDER_OPTIONS = EngineOptions(batch_size=2)
LEASE = {"RUNNER_LEASE_TTL": "2"}
SLOW = 0.005  # seconds per write and listing in the job home (a Drive mount)
# storage.RETRY_DELAYS in the test's processes: runner's, with short first steps (still a minute in all)
RETRY_DELAYS = (0.02, 0.05, 0.1, 0.5, 1, 2, 4, 8, 15, 30)
# chance of a transient EIO/ENOTCONN per listing or read in EIO_DIRS (0.06 made EIO about half of all faults; the
# share went to kills at named points, stops past the lease, killed commands and torn metadata), and per stat: 0.02
# there too made EIO 60-70% of the faults, half of them stats, and the CI seed's campaign 2 rounds instead of 5
EIO_RATE, EIO_STAT_RATE = 0.02, 0.005
# where: the done-set and shards, and the state records and the job folder's own files (job.json, its backup,
# verified.json, stats.json, heartbeats: a transient error reading one must not make the job broken or failed)
EIO_DIRS = ("done", "claims", "shards", "state", "workers", "inflight", ".")
# RUNNER_FAULT points a worker may carry, with the range of the visit it dies at
POINTS = {"after_shard": 4, "before_replace": 20, "before_create": 4, "mid_write": 4, "after_generate": 4}
TORN_KINDS = (
    "marker",
    "claim",
    "seal",
    "state",
    "job",
    "stats",
    "heartbeat",
    "inflight",
    "verified",
)
SHARD_DAMAGE = ("flip", "truncate", "delete")
DAMAGE = (*TORN_KINDS, *SHARD_DAMAGE, "conflict")
# the bystander's damage: as the campaign job's, and its prompts.parquet (`runner repair` writes it again from the
# unchanged input file)
BYSTANDER_DAMAGE = (*DAMAGE, "prompts")
# where `runner cancel` / `runner retry` are killed at rest: inside the exclusive create of their state record
# (before its link; without links after the create, before the fill: an empty record), or at an atomic replace
COMMAND_KILLS = ("before_create:1", "before_create:1", "after_create:1", "before_replace:1")
REPAIR_KILLS = ("before_replace:1", "before_replace:2", "before_replace:3", "before_replace:4", "before_create:1",
                "before_create:2", "after_create:1", "mid_write:1")  # fmt: skip
# a user's `python -c "import runner; runner.load_results(JOB)"` (through the file-system faults, as a worker):
# the rows as JSON, or the RunnerError it refused with; any other exception is a traceback (an anomaly)
READER = r"""
import json, os, sys
cfg = os.environ.get("RUNNER_TEST_FSFAULTS")
if cfg:
    import fsfaults
    cfg = json.loads(cfg)
    fsfaults.FsFaults(cfg.pop("root"), **cfg).install()
import runner
def plain(v):
    return [plain(x) for x in v] if hasattr(v, "__len__") and not isinstance(v, str) else (
        v.item() if hasattr(v, "item") else v)
try:
    df = runner.load_results(sys.argv[1])
except runner.RunnerError as e:
    out = {"refused": type(e).__name__, "message": str(e)}
else:
    cols = sys.argv[3].split(",")
    out = {"rows": [[i, int(s), *(plain(v) for v in vals)] for i, s, *vals
                    in zip(df["id"], df["sample"], *(df[c] for c in cols))]}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""
SUBMIT_KILLS = ("before_replace:2", "stage:prompts.parquet", "before_replace:3", "stage:.owner.json")
SPIN_RUNS = 25  # a worker that has started the job this many times is spinning
TEMP_DIR = re.compile(r"\..+\.tmp")
# every kind of fault must have landed at least once (rounds go on until then, and until TARGET)
KINDS = ("kill", "point", "stop", "eio", "torn", *SHARD_DAMAGE, "conflict", "submit", "cancel", "retry",
         "repair", "bystander")  # fmt: skip


def done_at(n: int) -> int:
    """A "done" event drawn for the default job's 16 commits, at the same share of this job's."""
    return max(1, round(n * COMMITS / 16))


# --- the prepared jobs and their reference results ----------------------------------------------------------


@dataclass
class Prepared:
    model: str
    job: Path  # the campaign job, submitted, nothing run (copied per round)
    bystander: Path
    ref: dict  # (id, sample) -> [its VALUES] of an uninterrupted run
    bystander_ref: dict
    small: Path  # prompts of the submits that get killed


def plain(v):
    """A result's value as JSON gives it back: lists of Python ints, floats and strings."""
    if hasattr(v, "__len__") and not isinstance(v, str):
        return [plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def same(a, b) -> bool:
    """Equal values; floats (scores, vectors) within 1e-4 (batching changes their last bits)."""
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-4 * (1 + abs(b))
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def result_rows(df, cols: tuple[str, ...] = VALUES[KIND]) -> list:
    """[id, sample, *values] of each row of a results table (`cols`: the values)."""
    return [[i, int(s), *(plain(v) for v in vals)]
            for i, s, *vals in zip(df["id"], df["sample"], *(df[c] for c in cols), strict=True)]  # fmt: skip


def results_by_key(df, cols: tuple[str, ...] = VALUES[KIND]) -> dict:
    return {(i, s): vals for i, s, *vals in result_rows(df, cols)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_gpt2, gpt2_engine):
    root = tmp_path_factory.mktemp("campaign")
    words = "the old man said that every student reads a language model slowly".split()

    def prompts(name, n, field="prompt"):
        return write_jsonl(root / name, ({"id": f"{name[0]}{i:02d}", field: " ".join(words[i % 5 : 2 + i % 11])}
                                         for i in range(n)))  # fmt: skip

    main = prompts("p.jsonl", N_PROMPTS, "prompt" if KIND == "generate" else "text")
    side, small = prompts("b.jsonl", 6), prompts("s.jsonl", 2)
    job = create_job(main, tiny_gpt2, PARAMS, OPTIONS, job_dir=root / "job", unit_rows=UNIT_ROWS)
    bystander = create_job(side, tiny_gpt2, BYSTANDER_PARAMS, BYSTANDER_OPTIONS, job_dir=root / "bystander")
    refs = []
    for name, src, params, options, unit_rows, cols in (
        ("ref", main, PARAMS, OPTIONS, UNIT_ROWS, VALUES[KIND]),
        ("bref", side, BYSTANDER_PARAMS, BYSTANDER_OPTIONS, None, VALUES["generate"]),
    ):
        ref = create_job(src, tiny_gpt2, params, options, job_dir=root / name, unit_rows=unit_rows)
        run_job(ref, gpt2_engine, echo=None)
        refs.append(results_by_key(runner.load_results(ref.dir), cols))
    assert len(refs[0]) == N_PROMPTS * N_SAMPLES and len(refs[1]) == 6
    return Prepared(tiny_gpt2, job.dir, bystander.dir, refs[0], refs[1], small)


# --- damage, as a Drive mount or a crash leaves it ---------------------------------------------------------


def tear(path: Path, rng: random.Random) -> None:
    """A torn or garbage write of a JSON file: cut short, random bytes, zero-filled, empty, JSON of the wrong
    shape (a file created if there was none, as a torn write of a new file), or one digit's low bit flipped (bit
    rot that leaves it valid JSON: a unit, an epoch, a key, a generation, a pid, a seed changed by one)."""
    data = path.read_bytes() if path.exists() else b'{"worker": "w", "unit": 0}\n'
    body = data.rstrip()
    digits = [i for i, b in enumerate(data) if 0x30 <= b <= 0x39]
    choice = rng.randrange(6)
    if choice == 5 and digits:
        new = bytearray(data)
        new[rng.choice(digits)] ^= 1
        path.write_bytes(bytes(new))
        return
    if choice == 0 and len(body) > 1:
        new = body[: rng.randrange(1, len(body))]
    elif choice == 1:
        new = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif choice == 2:
        new = b"\0" * len(data)
    elif choice == 3:
        new = b""
    else:
        new = rng.choice((b"[]", b"null", b'"done"', b"{}", b'{"state": 7, "commits": 3}'))
    path.write_bytes(new)


def flip(path: Path, rng: random.Random) -> None:
    """One bit flipped, same size (bit rot, a bad sync)."""
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def truncate(path: Path, rng: random.Random) -> None:
    """Cut short (a partial upload)."""
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(max(1, path.stat().st_size)))


def conflict_copy(path: Path, rng: random.Random) -> Path:
    """A Drive conflict copy beside the file (`name (1).json`): this file's bytes, or a torn version of them."""
    copy = path.with_name(f"{path.stem} ({rng.randint(1, 3)}){path.suffix}")
    shutil.copyfile(path, copy)
    if rng.random() < 0.3:
        tear(copy, rng)
    return copy


def listing(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []


def read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def temp_dirs(home: Path) -> list[Path]:
    """Temp folders of submits in progress (or killed)."""
    return [home / n for n in listing(home) if TEMP_DIR.fullmatch(n) and (home / n).is_dir()]


# --- processes ---------------------------------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen
    fault: str | None  # its RUNNER_FAULT
    out: Path
    killed: bool = False  # the test SIGKILLed it
    stopped: bool = False  # SIGSTOPped right now
    stopped_at: float = 0.0  # (time.monotonic() then)
    reaped: bool = False
    spun: bool = False  # killed for spinning (a known bug, see `stop_spinners`)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Trigger:
    """An action to take once a progress event has happened `at` times: "done" = commit markers seen in done/,
    "unit" = units started (log lines)."""

    on: str
    at: int
    action: object  # called with the seconds since the event; returns False to be called again
    fired: bool = False
    armed: float | None = None  # when the event happened


@dataclass
class Campaign:
    """Fault counts by kind, what the checks found, and the decks that spread damage over every kind."""

    p: Prepared
    root: Path
    rng: random.Random
    faults: Counter = field(default_factory=Counter)
    torn: Counter = field(default_factory=Counter)  # torn JSON by metadata file kind
    found: Counter = field(default_factory=Counter)  # lost, duplicated, corrupted
    notes: Counter = field(default_factory=Counter)  # outcomes that are fine, worth a count
    anomalies: list = field(default_factory=list)
    decks: dict = field(default_factory=dict)
    starts: int = 0  # processes started

    def draw(self, deck: str, kinds: tuple[str, ...]) -> str:
        """The next kind of a shuffled deck, refilled when empty: every kind comes up, in random order."""
        cards = self.decks.setdefault(deck, [])
        if not cards:
            cards.extend(self.rng.sample(kinds, len(kinds)))
        return cards.pop()

    @property
    def total(self) -> int:
        return sum(self.faults.values())

    def missing(self) -> list[str]:
        """Kinds of faults (and named points, torn file kinds) that have not landed yet."""
        points = [f"point {p}" for p in ("after_shard", "before_replace") if not self.notes[f"point {p}"]]
        return [k for k in KINDS if not self.faults[k]] + points + [k for k in TORN_KINDS if not self.torn[k]]

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items(), key=lambda kv: -kv[1]))
        f = self.found
        return (f"campaign: {self.total} faults ({kinds}) lost {f['lost']} duplicated {f['duplicated']} "
                f"corrupted {f['corrupted']}")  # fmt: skip


# --- one round ---------------------------------------------------------------------------------------------


class Round:
    def __init__(self, c: Campaign, index: int):
        self.c, self.rng, self.index = c, c.rng, index
        self.dir = c.root / f"round{index:02d}"
        self.home = self.dir / "home"
        self.home.mkdir(parents=True)
        self.jid, self.bid = Job.open(c.p.job).id, Job.open(c.p.bystander).id
        self.job, self.by = self.home / self.jid, self.home / self.bid
        shutil.copytree(c.p.job, self.job)
        shutil.copytree(c.p.bystander, self.by)
        self.workers: list[Worker] = []
        self.outputs: list[tuple[str, str]] = []  # (command, output) of every process, for tracebacks
        self.seen: set[str] = set()  # commit markers ever seen in done/
        self.log_start = self.log_size()
        self.cancelled = False  # a cancel of this round went through
        # (unit, epoch) of each seal damaged: then that epoch's commits all count (its keys may repeat)
        self.torn_seals: set[tuple[int, int]] = set()
        self.fenced: list[tuple[int, int, set[str]]] = []  # (unit, epoch, its markers) of stopped workers
        self.live_broken = False  # the state record or job.json torn while the workers ran
        self.eio_logs = 0
        self.t0 = time.monotonic()
        # a reader round: the user reads and exports the results before and while recovering (load_results, `runner
        # results --to .jsonl/.parquet`), and while the workers run
        self.readers = index == 0 or self.rng.random() < 0.5
        self.reads = 0
        # a bystander round: the bystander job is run part way (killed) and its files are damaged too
        self.by_round = index == 1 or self.rng.random() < 0.4
        self.by_damaged: list[str] = []  # kinds of damage that landed on the bystander
        self.by_torn_seals: set[tuple[int, int]] = set()
        self.partial_export: tuple[Path, bytes] | None = None  # an export of the job before it was completed

    def anomaly(self, what: str) -> None:
        self.c.anomalies.append(f"round {self.index}: {what} (see {self.dir})")

    def note(self, what: str) -> None:
        """A line of this round's story (ROUND/story.txt), for whoever reads a failure."""
        with open(self.dir / "story.txt", "a") as f:
            f.write(f"{time.monotonic() - self.t0:7.2f} {what}\n")

    def play(self) -> None:
        self.t0 = time.monotonic()
        before = self.c.total
        by, readers = self.by_round, self.readers
        steps = [self.commands_before, self.killed_submit if self.index % 3 == 1 else None,
                 self.bystander_before if by else None, self.fault_phase, self.check_fenced, self.commands_after,
                 self.damage_at_rest, self.bystander_at_rest if by else None, self.repairs_at_rest,
                 self.read_before_recovery if readers else None, self.recover,
                 self.recover_bystander if by else None, self.check]  # fmt: skip
        for step in filter(None, steps):
            self.note(f"-- {step.__name__}")
            step()
        # every transient error of the round's processes, the checks' own included: a line "ERRNO KIND PATH" each
        for log in self.dir.glob("eio-*.log"):
            kinds = [line.split()[1] for line in log.read_text().splitlines()]
            self.c.faults["eio"] += len(kinds)
            self.c.notes.update(f"eio by kind: {k}" for k in kinds)
        self.note(f"-- {self.c.total - before} faults")

    # --- processes --------------------------------------------------------------------------------------

    def cli(self, *args: str, fault: str | None = None, eio: bool = False, timeout: float = TIMEOUT):
        """`runner --home HOME ARGS` (RUNNER_FAULT=fault; `eio`: with transient read errors in the job's
        done-set, as the workers have them), to the end: (exit code, output). The output is kept."""
        env = {**LEASE, **({"RUNNER_FAULT": fault} if fault else {})}
        prefix: tuple[str, ...] = ("-m", "runner")
        if eio:
            prefix = (str(fsfaults.HERE),)
            env[fsfaults.ENV] = self.fs_faults(slow=0.0).settings()
        self.c.starts += 1
        self.note(f"runner {' '.join(args)}" + (f" [{fault}]" if fault else ""))
        try:
            proc = subprocess.run(
                [sys.executable, *prefix, "--home", str(self.home), *args], env=workers.worker_env(env),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            self.anomaly(f"`runner {' '.join(args)}` did not end in {timeout:.0f} s:\n{e.stdout}")
            return None, str(e.stdout)
        self.outputs.append((" ".join(args) + (f" [{fault}]" if fault else ""), proc.stdout))
        self.note(f"  -> {proc.returncode}: " + proc.stdout.strip().replace("\n", "\n      | "))
        return proc.returncode, proc.stdout

    def fs_faults(self, slow: float) -> fsfaults.FsFaults:
        """The job home as a Drive mount on a bad day, for one process: `slow` seconds per write and listing,
        transient EIO/ENOTCONN on reads in the job folder (EIO_DIRS; each one logged)."""
        self.eio_logs += 1
        return fsfaults.FsFaults(self.job, slow=slow, eio=EIO_RATE, eio_stat=EIO_STAT_RATE, eio_seed=self.rng.randrange(1 << 30), eio_dirs=EIO_DIRS,
                                 eio_log=str(self.dir / f"eio-{self.eio_logs}.log"),
                                 retry_delays=RETRY_DELAYS)  # fmt: skip

    def launch(self, fault: str | None) -> Worker:
        """A worker on the job through the file-system faults: a little slow, with transient read errors."""
        n = len(self.workers)
        env = {
            **LEASE,
            fsfaults.ENV: self.fs_faults(SLOW).settings(),
            **({"RUNNER_FAULT": fault} if fault else {}),
        }
        out = self.dir / f"worker-{n}.out"
        # in a bystander round, half the workers run the whole home (the damaged bystander too), as `runner work`
        plain = self.by_round and self.rng.random() < 0.5
        with open(out, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, str(fsfaults.HERE), "--home", str(self.home), "work",
                 *(() if plain else ("--job", self.jid)), "--shard-rows", str(SHARD_ROWS)],
                stdout=f, stderr=subprocess.STDOUT, env=workers.worker_env(env),
            )  # fmt: skip
        self.c.starts += 1
        w = Worker(proc, fault, out)
        self.workers.append(w)
        self.note(f"worker {n} (pid {proc.pid}) started [{fault}]" + (" on the whole home" if plain else ""))
        return w

    def pick_fault(self) -> str | None:
        """Most workers carry a named fault point: they SIGKILL themselves at its N-th visit."""
        if self.rng.random() < 0.35:
            return None
        point = self.rng.choice(("after_shard", "after_shard", "before_replace", "before_replace",
                                 "before_create", "mid_write", "after_generate"))  # fmt: skip
        return f"{point}:{self.rng.randint(1, POINTS[point])}"

    def reap(self) -> list[Worker]:
        """Workers that ended since the last look, counted: killed by the test, by their own fault point, or
        ended by themselves."""
        ended = []
        for w in self.workers:
            if w.reaped or w.alive:
                continue
            w.reaped = True
            ended.append(w)
            rc = w.proc.returncode
            out = w.out.read_text()
            self.note(f"worker {self.workers.index(w)} ended: {rc}" + (" (killed)" if w.killed else ""))
            self.outputs.append((f"work [{w.fault}]", out))
            if rc == -signal.SIGKILL:
                if w.spun:
                    pass
                elif w.killed:
                    self.c.faults["kill"] += 1
                elif w.fault:
                    self.c.faults["point"] += 1
                    self.c.notes[f"point {w.fault.split(':')[0]}"] += 1
                else:
                    self.anomaly(f"a worker died by SIGKILL that nobody sent:\n{out}")
            elif rc != 0:
                last = out.strip().splitlines()[-1] if out.strip() else ""
                self.c.notes[f"worker exit {rc}: {last[:120]}"] += 1
        return ended

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.alive and not w.stopped]

    # --- what the job folder shows -----------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return (self.job / "log.txt").stat().st_size
        except FileNotFoundError:
            return 0

    def events(self) -> dict[str, int]:
        self.seen.update(n for n in listing(self.job / "done") if jobdir.COMMIT_RE.fullmatch(n[:-5]))
        with open(self.job / "log.txt", "rb") as f:
            f.seek(self.log_start)
            units = f.read().count(f" to {KIND} on ".encode())
        return {"done": len(self.seen), "unit": units}

    def ledger(self, verify: bool = False) -> jobdir.Ledger | None:
        try:
            return jobdir.read_ledger(Job.open(self.job), verify=verify)
        except runner.RunnerError:
            return None

    def units_left(self) -> list[int]:
        ledger = self.ledger()
        return ledger.unit_left().tolist() if ledger is not None else []

    def newest_claims(self, job: Path | None = None) -> dict[int, int]:
        newest: dict[int, int] = {}
        for n in listing((job or self.job) / "claims"):
            if m := jobdir.CLAIM_RE.fullmatch(n):
                unit, epoch = int(m.group(1)), int(m.group(2))
                newest[unit] = max(newest.get(unit, -1), epoch)
        return newest

    def markers(self, unit: int, epoch: int) -> set[str]:
        prefix = f"{unit:05d}-{epoch:08d}-"
        return {
            n
            for n in listing(self.job / "done")
            if n.startswith(prefix) and jobdir.COMMIT_RE.fullmatch(n[:-5])
        }

    def state(self, job: Path | None = None) -> str:
        try:
            return read_state(job or self.job).state.value
        except runner.RunnerError as e:
            return f"broken ({e})"

    # --- 1. commands killed half way ---------------------------------------------------------------------

    def commands_before(self) -> None:
        """`runner cancel` killed inside its write of a state record leaves the job queued; `runner retry` killed
        there leaves it cancelled (the old state, whole, either way), once or twice; the job is queued after."""
        for _ in range(self.rng.randint(1, 2)):
            self.killed_command(
                "cancel", expect="queued"
            )  # (where the fault is not on its way, it goes through)
            if self.state() == "queued" and self.rng.random() < 0.8:
                self.cli("cancel", self.jid)
            if self.state() == "cancelled":
                self.killed_command("retry", expect="cancelled")
                if self.state() == "cancelled":
                    rc, out = self.cli("retry", self.jid)
                    if rc != 0 or self.state() != "queued":
                        self.anomaly(f"retry after a killed retry did not re-queue the job: {out}")
        if self.state() != "queued":
            self.anomaly(f"after the commands the job is {self.state()}")

    def record(self) -> jobdir.StateRecord | None:
        try:
            return read_state(self.job)
        except runner.RunnerError:
            return None  # torn (damage while the workers run)

    def killed_command(self, command: str, expect: str, at_rest: bool = True) -> str:
        """`runner COMMAND JOB` killed at a fault point (at rest: any of COMMAND_KILLS; while workers run only
        before its record's link): "killed", "done" (the point was not on its way: it went through), "skipped"."""
        before = self.record()
        if before is None:
            return "skipped"  # the command would only say that the state record is damaged
        fault = self.rng.choice(COMMAND_KILLS) if at_rest else "before_create:1"
        rc, out = self.cli(command, self.jid, fault=fault)
        if rc != -signal.SIGKILL:
            return "done" if rc == 0 else "skipped"  # (say, the job was completed): no fault
        self.c.faults[command] += 1
        self.c.notes[f"killed {command} at {fault.split(':')[0]}"] += 1
        after = self.record()
        if after is None and fault.startswith("after_create"):
            # without links: its record created and never filled, "a change of state is being written" until the
            # user repairs the job (every command has ended); then the old state or the command's, whole
            entry = self.status()[self.jid]
            if entry["state"] != "broken" and "being written" not in (entry["message"] or ""):
                self.anomaly(f"a {command} killed inside its record's fill is not reported: {entry}")
            self.expect_ok("repair", self.jid)
            after = self.record()
            target = {"cancel": "cancelled", "retry": "queued"}[command]
            if after is None or after.state.value not in (expect, target):
                self.anomaly(
                    f"killed {command} (empty record), then repair, left state {after} (was {before})"
                )
            return "killed"
        if after is None or (after.state.value, after.generation) != (expect, before.generation):
            self.anomaly(f"killed {command} at {fault} left state {after} (was {before})")
        return "killed"

    def commands_after(self) -> None:
        """With the workers gone: a cancel that goes through, then a retry killed half way (the job stays
        cancelled; the user's retry in `recover` re-queues it)."""
        if self.cancelled or self.rng.random() < 0.6 or self.state() != "queued":
            return
        rc, _ = self.cli("cancel", self.jid)
        self.cancelled = rc == 0
        if self.cancelled:
            self.killed_command(
                "retry", expect="cancelled"
            )  # (a retry that went through: queued, as recover does)

    def killed_submit(self) -> None:
        """`runner submit` killed at a fault point or once its temp folder has reached a random stage: no job
        appears (unless the kill came after the final rename: then the whole job), and the next `runner work`
        deletes the temp folder (checked in `check`)."""
        how = SUBMIT_KILLS[(self.index // 3) % len(SUBMIT_KILLS)]
        args = ["submit", str(self.c.p.small), "-m", self.c.p.model, "--max-new-tokens", "2", "--seed", "3"]
        env = {**LEASE, **({"RUNNER_FAULT": how} if how.startswith("before") else {})}
        self.c.starts += 1
        proc = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(self.home), *args],
                                env=workers.worker_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip
        if how.startswith("stage:"):
            stage = how.split(":", 1)[1]
            end = time.monotonic() + TIMEOUT
            while proc.poll() is None and time.monotonic() < end:
                if any((t / stage).exists() for t in temp_dirs(self.home)):
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        out, _ = proc.communicate(timeout=TIMEOUT)
        self.outputs.append((f"submit [{how}]", out))
        if proc.returncode != -signal.SIGKILL:
            return
        self.c.faults["submit"] += 1
        for path in jobdir.job_folders(self.home):
            if path.name not in (self.jid, self.bid):
                try:
                    Job.open(path)  # killed after its final rename: the whole job, which `runner work` runs
                except runner.RunnerError as e:
                    self.anomaly(f"a killed submit left a damaged job {path.name}: {e}")

    # --- 2. workers, and faults on progress events ----------------------------------------------------------

    def fault_phase(self) -> None:
        rng = self.rng
        n = rng.choice((*range(1, MAX_WORKERS + 1), MAX_WORKERS))
        # the first worker dies between a shard and its marker, or inside an atomic write, every other round
        first = ("after_shard", "before_replace")[self.index % 2]
        self.launch(f"{first}:{rng.randint(1, POINTS[first])}")
        for _ in range(n - 1):
            self.launch(self.pick_fault())
        spare = 2 + (n == 1)  # replacements for workers that die
        triggers = [self.kill_trigger() for _ in range(rng.randint(2, 4))]
        # a stop in every round (alone, a worker's unit is taken over by one that joins), a second at times
        triggers.append(Trigger("unit", rng.randint(1, 3), self.stop_one))
        if n > 1 and rng.random() < 0.5:
            triggers.append(Trigger("done", done_at(rng.randint(4, 12)), self.stop_one))
        triggers += [
            Trigger("done", done_at(rng.randint(2, 15)), self.damage_live) for _ in range(rng.randint(3, 6))
        ]
        triggers.append(Trigger("done", done_at(rng.randint(1, 15)), self.status_live))
        if self.readers:
            triggers += [
                Trigger("done", done_at(rng.randint(2, 14)), self.read_live) for _ in range(rng.randint(1, 2))
            ]
        if rng.random() < 0.15:
            triggers.append(Trigger("done", done_at(rng.randint(4, 12)), self.cancel_live))
        end = time.monotonic() + 4 * TIMEOUT
        while True:
            for w in self.reap():
                if spare and w.proc.returncode == -signal.SIGKILL:
                    spare -= 1
                    self.launch(self.pick_fault())
            if not any(w.alive for w in self.workers):
                break
            seen = self.events()
            for t in triggers:
                if not t.fired and seen[t.on] >= t.at:
                    if t.armed is None:
                        t.armed = time.monotonic()
                        self.note(f"event {t.on} {t.at}: {t.action.__name__}")
                    t.fired = t.action(time.monotonic() - t.armed) is not False
            self.stop_spinners()
            if time.monotonic() > end:
                for w in self.workers:
                    w.proc.kill()
                raise AssertionError(f"round {self.index}: the workers did not finish in {4 * TIMEOUT:.0f} s")
            time.sleep(POLL)
        state = self.state()
        if state not in ("queued", "completed") and not (
            (self.cancelled and state == "cancelled") or (self.live_broken and state.startswith("broken"))
        ):
            self.anomaly(f"after the workers the job is {state}")

    def stop_spinners(self) -> None:
        """Kill a worker that re-runs the job over and over without claiming anything (the bug of
        test_a_worker_takes_again_a_unit_it_claimed_itself, fixed): alone it would spin forever. An anomaly."""
        for w in self.live():
            if w.out.read_text().count("resuming job") >= SPIN_RUNS:
                self.note(f"worker {self.workers.index(w)} spins: killed")
                self.anomaly(
                    f"worker {self.workers.index(w)} re-ran the job {SPIN_RUNS} times without finishing it"
                )
                w.spun = True
                w.proc.kill()

    def kill_trigger(self) -> Trigger:
        if self.rng.random() < 0.6:
            return Trigger("done", done_at(self.rng.randint(2, 14)), self.kill_one)
        return Trigger("unit", self.rng.randint(1, 4), self.kill_one)

    def kill_one(self, waited: float) -> None:
        """SIGKILL a random worker now (Colab reclaiming the VM)."""
        live = self.live()
        if live:
            w = self.rng.choice(live)
            w.killed = True
            w.proc.send_signal(signal.SIGKILL)

    def holder(self, unit: int, epoch: int) -> Worker | None:
        """The live worker whose claim this is."""
        raw = read_json_or_none(self.job / "claims" / jobdir.claim_name(unit, epoch))
        pid = raw.get("pid") if isinstance(raw, dict) else None
        return next((w for w in self.live() if w.proc.pid == pid), None)

    def pending_commits(self) -> list[tuple[Worker, int, int]]:
        """(worker, unit, epoch) of live workers between a shard's rename and its marker (the shard is there,
        its marker not yet), in the newest epoch of the unit."""
        done = set(listing(self.job / "done"))
        newest = self.newest_claims()
        out = []
        for n in listing(self.job / "shards"):
            m = jobdir.COMMIT_RE.fullmatch(n[: -len(".parquet")]) if n.endswith(".parquet") else None
            if m and f"{n[: -len('.parquet')]}.json" not in done:
                unit, epoch = int(m.group(1)), int(m.group(2))
                if newest.get(unit) == epoch and (w := self.holder(unit, epoch)) is not None:
                    out.append((w, unit, epoch))
        return out

    def held_units(self) -> list[tuple[Worker, int, int]]:
        """(worker, unit, epoch): live workers holding the newest claim of a unit that has keys left."""
        left = self.units_left()
        out = []
        for unit, epoch in self.newest_claims().items():
            if unit < len(left) and left[unit] > 0 and (w := self.holder(unit, epoch)) is not None:
                out.append((w, unit, epoch))
        return out

    def stop_one(self, waited: float) -> bool:
        """SIGSTOP a worker holding a unit (a frozen VM, a laptop lid closed) until another worker has taken that
        unit over (a claim of a later epoch appears once its 2 s lease is stale), then SIGCONT it: whatever it
        commits afterwards must not count (`check_fenced`). Preferably a worker caught between a shard and its
        marker (polled for up to 3 s), so that it may commit after the takeover."""
        held = self.pending_commits() or (self.held_units() if waited > 3 else [])
        if not held:
            return waited > 3  # keep looking, then give up: the workers may have finished
        w, unit, epoch = self.rng.choice(held)
        w.proc.send_signal(signal.SIGSTOP)
        w.stopped, w.stopped_at = True, time.monotonic()
        self.note(f"stopped worker {self.workers.index(w)} holding unit {unit} epoch {epoch}")
        try:
            if self.wait_for_takeover(unit, epoch, w.stopped_at):
                self.c.faults["stop"] += 1
        finally:
            w.proc.send_signal(signal.SIGCONT)
            w.stopped = False
            self.note(f"continued worker {self.workers.index(w)}")
        return True

    def wait_for_takeover(self, unit: int, epoch: int, stopped_at: float) -> bool:
        """Until a claim of epoch + 1 appears (and its seal of `epoch`, which `check_fenced` relies on). False
        when no takeover can come: the unit was finished, or the job cancelled or broken meanwhile, or every
        other worker is gone and a new one would stop at a torn job.json (`runner repair` first). A worker that
        joins because no other is left does so once the stopped one's lease has gone stale (a worker started
        before that rightly leaves a unit with a live lease alone)."""
        end = time.monotonic() + TIMEOUT
        next_claim = self.job / "claims" / jobdir.claim_name(unit, epoch + 1)
        helped = False
        while not next_claim.exists():
            left = self.units_left()
            if not next_claim.exists() and (left[unit : unit + 1] == [0] or self.state() != "queued"):
                return False
            self.reap()
            if not self.live() and time.monotonic() - stopped_at > float(LEASE["RUNNER_LEASE_TTL"]):
                if self.live_broken:
                    return False
                if helped:  # the helper ended and nobody took the unit over
                    self.anomaly(f"nobody took over unit {unit} of a stopped worker (units left: {left})")
                    return False
                self.launch(None)  # nobody left to take over: a worker joins, as a user would start one
                helped = True
            if time.monotonic() > end:
                raise AssertionError(f"round {self.index}: nobody took over unit {unit} of a stopped worker")
            time.sleep(0.1)
        seal = self.job / "claims" / jobdir.seal_name(unit, epoch)
        while not seal.exists() and self.live() and time.monotonic() < end:
            time.sleep(POLL)  # the taker seals the stopped worker's epoch right after its claim
        if seal.exists():
            self.fenced.append((unit, epoch, self.markers(unit, epoch)))
        return True

    def check_fenced(self) -> None:
        """A stopped worker's commits made after its unit was taken over (and sealed) do not count."""
        if not self.fenced:
            return
        ledger = self.ledger(verify=False)
        counted = {c.name for c in ledger.commits} if ledger is not None else set()
        for unit, epoch, before in self.fenced:
            seal = read_json_or_none(self.job / "claims" / jobdir.seal_name(unit, epoch))
            accepted = jobdir._seal_commits(seal)
            if accepted is None:  # torn, or a byte changed (its checksum)
                late = {n[:-5] for n in self.markers(unit, epoch) - before}
                self.c.notes["late commits of stopped workers (counted: their seal was torn)"] += len(late)
                continue  # by design a damaged seal accepts every commit of its epoch (keys never count twice)
            # late: every marker the seal does not list (not only those after the test first saw the seal, which
            # missed one landing in between; harness review, pass 110)
            late = {n[:-5] for n in self.markers(unit, epoch)} - accepted
            self.c.notes["late commits of stopped workers (ignored)"] += len(late)
            if late & counted:
                self.anomaly(f"a stopped worker's late commits count: {sorted(late & counted)}")

    def damage_live(self, waited: float) -> None:
        """Damage while the workers run (any kind, as at rest): a torn heartbeat lets a live worker's units be
        taken over, a torn claim its unit; a torn state record or job.json stops the workers (broken job)."""
        if (
            self.by_round and self.rng.random() < 0.3
        ):  # the bystander's files, while whole-home workers run it
            self.damage(self.c.draw("bystander", BYSTANDER_DAMAGE), self.by)
            return
        kind = self.c.draw("live", DAMAGE)
        self.live_broken |= self.damage(kind) and kind in ("state", "job")

    def read_live(self, waited: float) -> None:
        """The user reads the results while the workers run (and the faults land): load_results, or an export."""
        self.rng.choice((self.load_results_py, self.export_jsonl, self.export_parquet))(
            "while the workers run"
        )

    def status_live(self, waited: float) -> None:
        """`runner status` while the workers run: no traceback, exit 0."""
        rc, out = self.cli("status")
        if rc != 0:
            self.anomaly(f"`runner status` during the work exited with {rc}:\n{out}")

    def cancel_live(self, waited: float) -> None:
        """The user cancels while the workers run (at times the cancel is killed inside its write)."""
        if self.rng.random() < 0.5:
            self.cancelled |= self.killed_command("cancel", expect="queued", at_rest=False) == "done"
        else:
            rc, _ = self.cli("cancel", self.jid)
            self.cancelled = self.cancelled or rc == 0
            if (
                rc == 0 and self.rng.random() < 0.5
            ):  # changed their mind at once, the workers still winding down
                if self.rng.random() < 0.5:
                    self.killed_command("retry", expect="cancelled", at_rest=False)
                rc, out = self.cli("retry", self.jid)
                self.c.notes[f"retry right after a live cancel: {rc}"] += 1

    # --- 3. damage at rest ---------------------------------------------------------------------------------

    def damage_at_rest(self) -> None:
        for _ in range(self.rng.randint(14, 18)):
            self.damage(self.c.draw("rest", DAMAGE))

    def bystander_before(self) -> None:
        """The bystander run part way (`runner work --job` killed at a named point, one row a commit), and a few
        of its files damaged, before the campaign job's workers start (their `runner status` sees it too)."""
        rng = self.rng
        fault = rng.choice((f"after_shard:{rng.randint(1, 4)}", f"before_replace:{rng.randint(2, 12)}",
                            f"after_generate:{rng.randint(1, 3)}", f"mid_write:{rng.randint(1, 4)}"))  # fmt: skip
        self.cli("work", "--job", self.bid, "--shard-rows", "1", fault=fault)
        for _ in range(rng.randint(1, 3)):
            self.damage(self.c.draw("bystander", BYSTANDER_DAMAGE), self.by)

    def bystander_at_rest(self) -> None:
        for _ in range(self.rng.randint(1, 4)):
            self.damage(self.c.draw("bystander", BYSTANDER_DAMAGE), self.by)

    def repairs_at_rest(self) -> None:
        """`runner repair` killed at one of its writes, at rest, before the user's recovery (half the rounds)."""
        for _ in range(self.rng.randint(1, 2) if self.rng.random() < 0.5 else 0):
            self.killed_repair(self.jid)

    # --- the user reads and exports the results ---------------------------------------------------------------

    def read_before_recovery(self) -> None:
        """Before recovering, the user looks: `runner status` (table, the job's detail), load_results and exports
        of the job as it is (incomplete, maybe damaged): only finished rows, each once, or a refusal."""
        for args in (("status",), ("status", self.jid)):
            rc, out = self.cli(*args)
            if rc != 0:
                self.anomaly(f"`runner {' '.join(args)}` before recovery exited with {rc}:\n{out}")
        for read in self.rng.sample((self.load_results_py, self.export_jsonl, self.export_parquet), 3):
            read("before recovery")

    def reader_env(self) -> dict[str, str]:
        env = workers.worker_env({**LEASE, "RUNNER_HOME": str(self.home),
                                  fsfaults.ENV: self.fs_faults(slow=0.0).settings()})  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join([str(fsfaults.HERE.parent), env["PYTHONPATH"]])
        return env

    def load_results_py(self, when: str, complete: bool = False, jid: str | None = None) -> list | None:
        """`python -c "import runner; runner.load_results(JOB)"` (READER): the rows (checked), or None when it
        refused (a RunnerError: fine unless the job is `complete`)."""
        jid = jid or self.jid
        self.reads += 1
        out = self.dir / f"load-{self.reads}.json"
        self.c.starts += 1
        self.note(f"load_results({jid}) {when}")
        try:
            proc = subprocess.run([sys.executable, "-c", READER, jid, str(out), ",".join(self.values(jid))],
                                  env=self.reader_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=TIMEOUT)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            self.anomaly(f"load_results {when} did not end in {TIMEOUT:.0f} s:\n{e.stdout}")
            return None
        self.outputs.append((f"load_results {when}", proc.stdout))
        if proc.returncode != 0:
            self.note(f"  -> {proc.returncode}: {proc.stdout.strip()}")
            self.anomaly(f"load_results {when} failed ({proc.returncode}):\n{proc.stdout}")
            return None
        got = json.loads(out.read_text())
        if "refused" in got:
            self.note(f"  -> refused: {got['refused']}: {got['message']}")
            self.c.notes[f"load_results refused {when}"] += 1
            if complete:
                self.anomaly(f"load_results {when} refused a completed job: {got['message']}")
            return None
        self.note(f"  -> {len(got['rows'])} rows")
        self.check_rows(f"load_results {when}", got["rows"], complete, jid)
        return got["rows"]

    def export_jsonl(self, when: str, complete: bool = False, jid: str | None = None) -> list | None:
        return self.export(".jsonl", when, complete, jid)

    def export_parquet(self, when: str, complete: bool = False, jid: str | None = None) -> list | None:
        return self.export(".parquet", when, complete, jid)

    def export(self, suffix: str, when: str, complete: bool, jid: str | None) -> list | None:
        """`runner results JOB --to FILE` (through the transient read errors): the rows it wrote (checked; a
        damaged job's are written and said with exit 1), or None when it refused (fine unless the job is
        `complete`; no file written then)."""
        jid = jid or self.jid
        self.reads += 1
        path = self.dir / f"export-{self.reads}{suffix}"
        rc, out = self.cli("results", jid, "--to", str(path), eio=True)
        partial = rc == 1 and "was written, but without rows the job had" in out  # a damaged job's, said so
        if rc != 0 and not partial:
            self.c.notes[f"export refused {when}"] += 1
            if complete or rc is None or "Traceback" in out:
                self.anomaly(f"`runner results --to {path.name}` {when} exited with {rc}:\n{out}")
            if path.exists():
                self.anomaly(f"`runner results --to {path.name}` {when} refused, and left a file there")
            return None
        if suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = pq.read_table(path).to_pylist()
        rows = [[r["id"], int(r["sample"]), *(plain(r[c]) for c in self.values(jid))] for r in records]
        self.check_rows(f"export {path.name} {when}", rows, complete, jid)
        if not complete and jid == self.jid:
            self.partial_export = (path, path.read_bytes())
        return rows

    def killed_export(self) -> None:
        """Once the job is completed, `runner results --to FILE` over an earlier (partial) export, killed before
        its rename: FILE is the old export, byte for byte; the next export replaces it whole, no temp file left."""
        if self.partial_export is None:
            return
        path, old = self.partial_export
        rc, out = self.cli("results", self.jid, "--to", str(path), fault="before_replace:1")
        if rc != -signal.SIGKILL:
            self.anomaly(
                f"`runner results --to {path.name}` [before_replace:1] was not killed ({rc}):\n{out}"
            )
            return
        self.c.notes["exports killed before their rename"] += 1
        if not path.exists() or path.read_bytes() != old:
            self.anomaly(f"a killed export changed the earlier export {path.name}")
        rc, out = self.cli("results", self.jid, "--to", str(path))
        if rc != 0:
            self.anomaly(f"`runner results --to {path.name}` after a killed one exited with {rc}:\n{out}")
        left = [
            n
            for n in listing(path.parent)
            if n.startswith(f".{path.name}") or (n.startswith(path.name) and n != path.name)
        ]
        if left:
            self.anomaly(f"temp files of a killed export left beside it: {left}")

    def values(self, jid: str) -> tuple[str, ...]:
        """The columns the results of job `jid` are compared on."""
        return VALUES[KIND] if jid == self.jid else VALUES["generate"]

    def check_rows(self, what: str, rows: list, complete: bool, jid: str) -> None:
        """Each (row, sample) at most once (exactly once when `complete`), every value the reference's."""
        ref = self.c.p.ref if jid == self.jid else self.c.p.bystander_ref
        keys = [(i, s) for i, s, *_ in rows]
        dup = len(keys) - len(set(keys))
        bad = sum(1 for i, s, *vals in rows if not same(vals, ref.get((i, s))))
        lost = len(set(ref) - set(keys)) if complete else 0
        self.c.notes["reads checked"] += 1
        if dup or bad or lost:
            self.c.found.update(lost=lost, duplicated=dup, corrupted=bad)
            self.anomaly(f"{what}: {len(rows)} rows, lost {lost}, duplicated {dup}, corrupted {bad}")

    def work_while_reading(self, *args: str, by_may_fail: bool = False) -> None:
        """`runner ARGS` (work, or repair) in the background (through the file-system faults, as the workers), the
        user reading the results at its start and as its commits land; it must end with 0."""
        env = {**LEASE, fsfaults.ENV: self.fs_faults(SLOW).settings()}
        self.reads += 1
        out = self.dir / f"recovery-work-{self.reads}.out"
        self.note(f"runner {' '.join(args)} (in the background, reading meanwhile)")
        self.c.starts += 1
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, str(fsfaults.HERE), "--home", str(self.home), *args],
                                    stdout=f, stderr=subprocess.STDOUT, env=workers.worker_env(env))  # fmt: skip
        reads = [self.load_results_py, self.export_jsonl, self.export_parquet]
        self.rng.shuffle(reads)
        seen, end = self.events()["done"], time.monotonic() + 2 * TIMEOUT
        reads.pop()("as `runner work` starts")
        while proc.poll() is None and time.monotonic() < end:
            now = self.events()["done"]
            if reads and now > seen:
                reads.pop()("while `runner work` runs")
                seen = now
            time.sleep(POLL)
        if proc.poll() is None:
            proc.kill()
            self.anomaly(f"`runner {' '.join(args)}` did not end in {2 * TIMEOUT:.0f} s")
        proc.wait()
        text = out.read_text()
        self.outputs.append((" ".join(args), text))
        self.note(f"  -> {proc.returncode}: " + text.strip().replace("\n", "\n      | "))
        self.expect_exit(args, proc.returncode, text, by_may_fail)

    def damage(self, kind: str, job: Path | None = None) -> bool:
        """Apply one damage of `kind` to a random file of the job (or of the bystander: `job`) and count it; False
        when there was nothing to damage (or a worker moved the file away meanwhile). The bystander's damage
        counts as "bystander"."""
        job = job or self.job
        try:
            landed = self.apply(kind, job)
        except FileNotFoundError:
            return False
        if landed and job != self.job:
            self.by_damaged.append(kind)
            self.c.faults["bystander"] += 1
            self.c.notes[f"bystander damage: {kind}"] += 1
        return landed

    def apply(self, kind: str, job: Path) -> bool:
        rng, main = self.rng, job == self.job
        tag = "" if main else "bystander "
        if kind == "prompts":  # a bit flipped in, or a cut of, prompts.parquet
            path = job / "prompts.parquet"
            (flip if rng.random() < 0.5 else truncate)(path, rng)
            self.note(f"{tag}damaged prompts.parquet")
            return True
        if kind in SHARD_DAMAGE:
            shards = [
                job / "shards" / n for n in listing(job / "shards") if n.endswith(".parquet") and "(" not in n
            ]
            path = rng.choice(shards) if shards else None
            if path is None or (kind != "delete" and path.stat().st_size == 0):
                return False
            {"flip": flip, "truncate": truncate, "delete": lambda p, _: p.unlink()}[kind](path, rng)
            self.note(f"{tag}{kind}: {path.name}")
            self.c.faults[kind] += main
            return True
        if kind == "conflict":
            pool = [
                job / d / n for d in ("done", "claims", "shards") for n in listing(job / d) if "(" not in n
            ]
            pool += [job / "state" / n for n in listing(job / "state") if "(" not in n]
            if not pool:
                return False
            copy = conflict_copy(rng.choice(pool), rng)
            self.note(f"{tag}conflict copy: {copy.relative_to(job)}")
            self.c.faults["conflict"] += main
            return True
        path = self.torn_target(kind, job)
        if path is None:
            return False
        tear(path, rng)
        self.note(f"{tag}torn {kind}: {path.relative_to(job)}")
        if kind == "seal":
            m = jobdir.SEAL_RE.fullmatch(path.name)
            assert m is not None
            (self.torn_seals if main else self.by_torn_seals).add((int(m.group(1)), int(m.group(2))))
        if main:
            self.c.faults["torn"] += 1
            self.c.torn[kind] += 1
        return True

    def torn_target(self, kind: str, job: Path) -> Path | None:
        """The file of this kind to tear: an existing one, or (for kinds a clean run may not leave) a new one."""
        rng = self.rng
        if kind == "state":  # the newest record (the one that counts), or a first one, torn as it lands
            names = [n for n in listing(job / "state") if jobdir._RECORD.fullmatch(n)]
            return job / "state" / (names[-1] if names else jobdir.record_name(1))
        fixed = {
            "job": "job.json",
            "stats": "stats.json",
            "verified": "verified.json",
        }
        if kind in fixed:
            return job / fixed[kind]
        claims = listing(job / "claims")
        if kind == "marker":
            names = [n for n in listing(job / "done") if jobdir.COMMIT_RE.fullmatch(n[:-5])]
            return job / "done" / rng.choice(names) if names else None
        if kind == "claim":
            names = [n for n in claims if jobdir.CLAIM_RE.fullmatch(n)]
            return job / "claims" / rng.choice(names) if names else None
        if kind == "seal":
            names = [n for n in claims if jobdir.SEAL_RE.fullmatch(n)]
            if names:
                return job / "claims" / rng.choice(names)
            newest = self.newest_claims(job)
            if not newest:
                return None
            unit = rng.choice(sorted(newest))
            return job / "claims" / jobdir.seal_name(unit, newest[unit])
        if kind == "heartbeat":
            names = [n for n in listing(job / "workers") if n.endswith(".json") and not n.startswith(".")]
            return (
                job
                / "workers"
                / (rng.choice(names) if names else f"host-{rng.randint(2, 99999)}-abcdef.json")
            )
        if kind == "inflight":
            names = [n for n in listing(job / "inflight") if n.endswith(".json") and not n.startswith(".")]
            return job / "inflight" / (rng.choice(names) if names else f"{rng.randrange(5):05d}.json")
        raise AssertionError(kind)

    # --- 4. recovery, as a user ----------------------------------------------------------------------------

    def status(self, table: bool = False) -> dict:
        """`runner status --json` (and the table and this job's detail, if asked): every job's entry by id
        (broken jobs included)."""
        for args in (("status",), ("status", self.jid), ("status", "--json"))[0 if table else 2 :]:
            rc, out = self.cli(*args)
            if rc != 0:
                self.anomaly(f"`runner {' '.join(args)}` failed:\n{out}")
        # by folder (= the job's id here): a broken job is listed under the id its damaged job.json gives (a flipped
        # digit in "id": a job no command finds by that id); noted, see the report of pass 120
        entries = {Path(e["folder"]).name: e for e in json.loads(out)}
        for folder, e in entries.items():
            if e["id"] != folder:
                self.c.notes[f"status lists job {folder} as {e['id']} ({e['state']})"] += 1
        return entries

    def recover(self, jid: str | None = None) -> None:
        """status -> repair if broken -> retry if cancelled or failed (or completed with row errors) -> work,
        until completed. The first `runner work` takes no --job (as after a fresh start of a Colab session): it
        runs the bystander and deletes the temp folders of killed submits too. (The bystander's, `jid`, after:
        --job.) In a reader round the user reads and exports the results while that `runner work` runs."""
        jid = jid or self.jid
        main = jid == self.jid
        plain_work_done, killed_repair = not main, False
        for step in range(10):
            entries = self.status(table=step == 0 and main)
            entry = entries[jid]
            state = entry["state"]
            if step == 0 and main and self.by_damaged:
                self.check_bystander_reported(entries)
            # without links, a record a killed command left empty shows as the state before it, "being written",
            # for STATE_PATIENCE_SECONDS; every command of the round has ended, so the user repairs it now
            if state == "broken" or "a change of state is being written" in (entry["message"] or ""):
                self.c.notes["repairs"] += 1
                # killed half way first, in half the rounds (the next status and repair carry on; repairs_at_rest
                # kills more)
                if not killed_repair and (not self.readers or self.rng.random() < 0.5):
                    self.killed_repair(jid)
                    killed_repair = True
                    continue
                if self.readers and main:  # the user reads while the repair quarantines and re-queues
                    self.work_while_reading("repair", jid)
                else:
                    self.expect_ok("repair", jid)
            elif state in ("cancelled", "failed") or (state == "completed" and entry["errors"]):
                if state == "failed" or entry["errors"]:
                    self.c.notes[f"{state}: {(entry['message'] or '')[:100]}"] += 1
                self.expect_ok("retry", jid)
            elif state == "completed" and plain_work_done:
                return
            else:
                job = ("--job", jid) if plain_work_done else ()
                # (the plain one beside a damaged bystander may fail that job, saying so: exit 1)
                bystander_may_fail = not plain_work_done and bool(self.by_damaged)
                if self.readers and main:
                    self.work_while_reading(
                        "work", "--shard-rows", str(SHARD_ROWS), *job, by_may_fail=bystander_may_fail
                    )
                else:
                    self.expect_ok(
                        "work",
                        "--shard-rows",
                        str(SHARD_ROWS),
                        *job,
                        eio=True,
                        by_may_fail=bystander_may_fail,
                    )
                if not plain_work_done and self.by_damaged:
                    after = self.status()[jid]["state"]
                    self.c.notes[f"plain work beside a damaged bystander left the job {after}"] += 1
                plain_work_done = True
        self.anomaly(f"the job {jid} was not brought back: {self.status()[jid]}")

    def check_bystander_reported(self, entries: dict) -> None:
        """`runner status` beside a damaged bystander: both listed, the bystander saying what is wrong where its
        job.json, newest state record or prompts.parquet is damaged; the campaign job not blamed for it."""
        by = entries.get(self.bid)
        if by is None:
            self.anomaly(f"`runner status` does not list the damaged bystander ({self.by_damaged})")
            return
        self.c.notes[f"damaged bystander's status: {by['state']}: {(by['message'] or '')[:90]}"] += 1
        # (a completed one's too: its results stand whole, and the message says what reads the file)
        must = {"job", "state", "prompts"}
        if must & set(self.by_damaged) and not by["message"]:
            self.anomaly(f"the bystander ({self.by_damaged}) does not report its damage: {by}")
        mine = entries.get(self.jid)
        if mine is not None and self.bid in (mine["message"] or ""):
            self.anomaly(f"the campaign job's status blames the bystander: {mine}")

    def recover_bystander(self) -> None:
        """The damaged bystander, after the campaign job: `runner repair` (killed half way first, at times), then
        status -> repair / retry / work --job, to completion."""
        # the user reads the damaged bystander first: only good rows, each once, or a refusal
        self.load_results_py("of the damaged bystander", jid=self.bid)
        self.rng.choice((self.export_jsonl, self.export_parquet))("of the damaged bystander", jid=self.bid)
        if self.rng.random() < 0.5:
            self.killed_repair(self.bid)
        self.expect_ok("repair", self.bid)
        self.recover(self.bid)
        self.load_results_py("of the bystander after completion", complete=True, jid=self.bid)
        self.rng.choice((self.export_jsonl, self.export_parquet))("of the bystander after completion", True,
                                                                  self.bid)  # fmt: skip

    def killed_repair(self, jid: str | None = None) -> None:
        """`runner repair` killed at one of its writes: the stored state is the old one or the new one, and a
        cancelled or failed job stays so (repair keeps those states). Without links, one killed between its
        record's create and fill leaves an empty record ("being written"): the next repair must bring the state
        back as the rules say."""
        jid = jid or self.jid
        path = self.home / jid
        old = self.state(path)
        fault = self.rng.choice(REPAIR_KILLS)
        rc, _ = self.cli("repair", jid, fault=fault)
        if rc != -signal.SIGKILL:
            return
        if jid == self.jid:
            self.c.faults["repair"] += 1
        self.c.notes[f"killed repair at {fault.split(':')[0]}"] += 1
        new = self.state(path)
        if new.startswith("broken") and fault.startswith("after_create"):
            self.expect_ok("repair", jid)  # the user's next repair
            new = self.state(path)
        if old in ("cancelled", "failed") and new != old:
            self.anomaly(f"a killed repair ({fault}) turned a {old} job {jid} into {new}")
        elif not old.startswith("broken") and new not in (old, "queued", "completed"):
            self.anomaly(f"a killed repair ({fault}) left job {jid} in state {new} (was {old})")

    def expect_ok(self, *args: str, eio: bool = False, by_may_fail: bool = False) -> None:
        rc, out = self.cli(*args, eio=eio, timeout=2 * TIMEOUT)
        self.expect_exit(args, rc, out, by_may_fail)

    def expect_exit(self, args, rc, out: str, by_may_fail: bool) -> None:
        """0; or with `by_may_fail`, 1 where the bystander alone failed or was broken and skipped (`runner work`
        ends saying which jobs: "Error: 1 job failed: ID (...)", "Error: 1 job is broken and skipped: ID (...)")."""
        if rc == 0:
            return
        last = out.strip().splitlines()[-1] if out.strip() else ""
        said = re.match(r"Error: 1 job (failed|is broken and skipped): (\S+) \(", last)
        if by_may_fail and rc == 1 and said and said[2] == self.bid and self.jid not in last:
            self.c.notes[f"`runner work` failed the damaged bystander: {last[:100]}"] += 1
            return
        self.anomaly(f"`runner {' '.join(args)}` exited with {rc}:\n{out}")

    # --- the checks --------------------------------------------------------------------------------------

    def check(self) -> None:
        """Exactly once and equal to the reference, in load_results and in every counted shard; both jobs
        completed; no traceback anywhere; no temp folder of a killed submit left."""
        found = self.c.found
        df = runner.load_results(self.job)
        lost, dup, bad = compare(df, self.c.p.ref, VALUES[KIND])
        found.update(lost=lost, duplicated=dup, corrupted=bad)
        self.check_commits(self.job, self.c.p.ref, self.torn_seals, "", VALUES[KIND])
        if lost or dup or bad:
            self.anomaly(f"results: lost {lost}, duplicated {dup}, corrupted {bad}")
        by_df = runner.load_results(self.by)
        by_lost, by_dup, by_bad = compare(by_df, self.c.p.bystander_ref, VALUES["generate"])
        if by_lost or by_dup or by_bad:
            found.update(lost=by_lost, duplicated=by_dup, corrupted=by_bad)
            self.anomaly(f"bystander results: lost {by_lost}, duplicated {by_dup}, corrupted {by_bad}")
        if self.by_damaged:
            self.check_commits(
                self.by, self.c.p.bystander_ref, self.by_torn_seals, "bystander: ", VALUES["generate"]
            )
        if self.readers:  # once completed: every reader, exactly once, each the same rows as load_results
            rows = result_rows(df)
            for read in (self.load_results_py, self.export_jsonl, self.export_parquet):
                got = read("after completion", complete=True)
                if got is not None and not same(got, rows):
                    self.anomaly(
                        f"{read.__name__} after completion differs from load_results (rows or order)"
                    )
            self.killed_export()
        statuses = self.status()
        for jid in (self.jid, self.bid):
            s = statuses[jid]
            if (s["state"], s["done"], s["errors"]) != ("completed", s["total"], 0):
                self.anomaly(f"status of {jid} at the end: {s}")
        for command, out in self.outputs:
            if "Traceback" in out:
                self.anomaly(f"`runner {command}` printed a traceback:\n{out}")
        for tmp in temp_dirs(self.home):
            self.anomaly(f"the temp folder of a killed submit was not deleted: {tmp.name}")

    def check_commits(self, job: Path, ref: dict, torn_seals: set, tag: str, cols: tuple[str, ...]) -> None:
        """Every counted shard equal to the reference; a key in two counted commits only where one of them is of
        an epoch whose seal was damaged (harness review, pass 110: any damaged seal in the round excused every
        unit's)."""
        found = self.c.found
        where: dict[
            tuple[str, int], list[tuple[int, int]]
        ] = {}  # key -> (unit, epoch) of each commit holding it
        ledger = jobdir.read_ledger(Job.open(job))
        for commit in ledger.commits:
            if commit.shard:
                t = pq.read_table(job / "shards" / commit.shard, columns=["id", "sample", *cols])
                df = t.to_pandas()
                for key in zip(df["id"], df["sample"].astype(int), strict=True):
                    where.setdefault(key, []).append((commit.unit, commit.epoch))
                rows = results_by_key(df, cols)
                corrupted = sum(1 for k, v in rows.items() if not same(v, ref.get(k)))
                if corrupted:
                    found["corrupted"] += corrupted
                    self.anomaly(
                        f"{tag}counted commit {commit.name}: {corrupted} row(s) differ from the reference"
                    )
        twice = [units for units in where.values() if len(units) > 1]
        excused = sum(len(u) - 1 for u in twice if set(u) & torn_seals)
        overlap = sum(len(u) - 1 for u in twice) - excused
        self.c.notes[f"{tag}keys counted in two commits (torn seal)"] += excused
        if overlap:
            found["duplicated"] += overlap
            self.anomaly(
                f"{tag}{overlap} key(s) counted in two commits, none of an epoch whose seal was damaged"
            )


def compare(df, ref: dict, cols: tuple[str, ...]) -> tuple[int, int, int]:
    """(lost, duplicated, corrupted) of a results table against the reference."""
    keys = [(i, int(s)) for i, s in zip(df["id"], df["sample"], strict=True)]
    got = results_by_key(df, cols)
    corrupted = sum(1 for k, v in got.items() if not same(v, ref.get(k)))
    return len(set(ref) - set(keys)), len(keys) - len(set(keys)), corrupted


# --- the tests ---------------------------------------------------------------------------------------------


def run_campaign(tmp_path: Path, prepared: Prepared, target: int, max_rounds: int) -> Campaign:
    c = Campaign(prepared, tmp_path, random.Random(SEED))
    t0 = time.monotonic()
    index = 0
    while index < max_rounds and (c.total < target or c.missing()):
        Round(c, index).play()
        index += 1
    line = c.summary()
    details = [line, f"{index} rounds, {c.starts} processes, {time.monotonic() - t0:.0f} s",
               "torn JSON by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(c.torn.items())),
               *(f"note: {k}: {n}" for k, n in sorted(c.notes.items())), *c.anomalies]  # fmt: skip
    print("\n" + "\n".join(details))
    (tmp_path / "campaign-summary.txt").write_text("\n".join(details) + "\n")
    return c


def test_fault_campaign(tmp_path, prepared):
    c = run_campaign(tmp_path, prepared, TARGET, MAX_ROUNDS)
    assert not c.anomalies, "\n".join(c.anomalies)
    assert c.total >= TARGET and not c.missing(), (c.summary(), c.missing())
    assert c.found["lost"] == c.found["duplicated"] == c.found["corrupted"] == 0, c.summary()


def test_a_submit_killed_before_writing_anything_leaves_a_temp_folder_the_next_one_deletes(
    tmp_path, prepared
):
    """Found by the campaign (fixed): a submit killed while writing .owner.json left a temp folder nobody deleted
    for an hour (its owner was unknown)."""
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "--home", str(home), "submit", str(prepared.small), "-m", prepared.model],
        env=workers.worker_env({"RUNNER_FAULT": "before_replace:1"}), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert len(temp_dirs(home)) == 1 and not jobdir.job_folders(home)  # no job: good
    jobdir.remove_dead_submits(home)  # what the next `runner submit` and `runner work` do first
    assert temp_dirs(home) == []


def test_a_repair_killed_at_any_write_leaves_a_cancelled_job_cancelled(tmp_path, prepared, gpt2_engine):
    """Found by the campaign (fixed): repair wrote "queued" first (to read the ledger), then the final state;
    killed in between, a cancelled job was left queued and ran again. The job has a damaged shard, so that
    repair has writes to be killed at (it sets the commit aside and writes the state again)."""
    base = shutil.copytree(prepared.job, tmp_path / "base")
    calls = []
    run_job(Job.open(base), gpt2_engine, echo=None, shard_rows=2,
            should_stop=lambda: calls.append(1) or len(calls) > 1)  # fmt: skip
    jobdir.cancel(Job.open(base))
    shard = sorted((base / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    killed = []
    for n, fault in enumerate(("before_replace:1", "before_replace:2", "before_create:1", "before_create:2")):
        home = tmp_path / f"home{n}"
        shutil.copytree(base, home / "job")
        proc = subprocess.run(
            [sys.executable, "-m", "runner", "--home", str(home), "repair", "job"], capture_output=True, text=True,
            env=workers.worker_env({"RUNNER_FAULT": fault}), timeout=TIMEOUT,
        )  # fmt: skip
        if proc.returncode == -signal.SIGKILL:
            killed.append(fault)
        assert read_state(home / "job").state == "cancelled", (fault, proc.stderr)  # old and new: cancelled
    assert "before_create:1" in killed  # at least inside its one state record


def test_a_shard_quarantined_during_verification_is_not_a_storage_failure(
    tmp_path, prepared, gpt2_engine, monkeypatch
):
    """Found by the campaign (fixed): a shard that vanished between its lstat and its read (another worker
    quarantining it) stopped the worker, or `runner status`, as a storage failure."""
    job = Job.open(shutil.copytree(prepared.job, tmp_path / "job"))
    run_job(job, gpt2_engine, echo=None, shard_rows=2)
    (job.dir / "verified.json").unlink()  # no cached checksums: every shard is read
    victim = sorted((job.dir / "shards").iterdir())[0]
    real, moved = builtins.open, []

    def open_(path, *args, **kwargs):
        if (
            Path(path) == victim and not moved
        ):  # another worker quarantines it between this one's lstat and read
            moved.append(path)
            jobdir.quarantine(job, victim.stem, "its shard does not match its checksum")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    ledger = jobdir.read_ledger(job)  # what `runner status` and every worker read
    assert moved and victim.stem not in {c.name for c in ledger.commits}


def test_a_worker_takes_again_a_unit_it_claimed_itself(tmp_path, prepared, gpt2_engine, monkeypatch):
    """Found by the campaign (fixed): a worker never re-claimed a unit whose newest claim was its own (its own
    heartbeat made the claim look held), and `runner work` keeps one worker id across runs: once a commit of a
    unit it had finished was quarantined, it re-ran the job over and over without computing the unit."""
    import runner.scheduler as scheduler

    job = Job.open(shutil.copytree(prepared.job, tmp_path / "job"))
    me = jobdir.Owner.me("worker-1")
    run_job(job, gpt2_engine, echo=None, shard_rows=2, owner=me)  # this worker did every unit, at epoch 0
    flip(job.dir / "shards" / "00000-00000000-0000.parquet", random.Random(1))
    jobdir.repair(job.dir)  # quarantines that commit: 2 keys of unit 0 to do again, the job queued again
    monkeypatch.setattr(scheduler.Owner, "me", classmethod(lambda cls, worker=None: me))  # the same process
    runs = []
    summaries = scheduler.work(job=Job.open(job.dir), engine=gpt2_engine, echo=runs.append, shard_rows=2,
                               stop=lambda: len(runs) > 200)  # (a spinning worker says "resuming" each time)  # fmt: skip
    assert summaries and summaries[-1].finished and len(summaries) == 1, (
        f"{len(summaries)} runs, unit 0 not done"
    )
