"""Something of the wrong kind where a job's folder needs a file or a folder (found by an adversarial pass): a
folder at log.txt, at a claim's name or at an in-flight record, a file where claims/ or done/ belongs. That job
is broken and skipped with a `runner repair` hint; `runner work` runs the others (before: it stopped for the
whole home every time, or looped for ever on the blocked claim), and `runner repair` sets the thing aside
in quarantine/ so the job runs again, each row once."""

import contextlib
import os
import socket
import threading

import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams
from runner.jobs import create_job
from runner.scheduler import work

ROWS = [{"id": f"r{i}", "prompt": f"The old man said {i} times"} for i in range(3)]
DAMAGE = [  # (path in the job's folder, what is put there); "+" joins two
    ("log.txt", "dir"),
    ("log.txt", "fifo"),  # opened for append, it would wait for a reader for ever
    ("log.txt", "socket"),
    ("claims/00000-00000001.json", "dir"),
    ("claims/00000-00000001.json", "link"),
    ("claims/00000-00000001.json", "fifo"),
    ("inflight/00000.json", "dir"),
    ("claims", "file"),
    ("done", "file"),
    ("done", "dirlink"),  # pass 10: status said `runner repair`, which failed with the same error for ever
    ("shards", "dirlink"),
    ("quarantine+log.txt", "file+dir"),  # repair must first move the file standing where quarantine/ goes
    ("verified.json", "fifo"),  # a reader opening it would wait for a writer for ever
    ("verified.json", "loop"),
    ("job.json", "dir"),  # status said `runner repair`, which could not read it either (pass 102)
    ("job.json", "fifo"),
    ("job.json", "link"),
    ("job.backup.json", "dir"),
    ("prompts.parquet", "dir"),
]


def _put(path, what, stack):
    """Put a `what` at `path` (whatever was there removed first); `stack` closes what must stay open."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    if what == "dir":
        path.mkdir()
    elif what == "file":
        path.write_text("x\n")
    elif what == "link":
        path.symlink_to(path.parent / "nowhere")
    elif what == "dirlink":  # the folder moved elsewhere, a link left in its place
        elsewhere = path.parent.parent / f"{path.parent.name}-{path.name}-elsewhere"
        elsewhere.mkdir()
        path.symlink_to(elsewhere)
    elif what == "loop":
        path.symlink_to(path.name)
    elif what == "fifo":
        os.mkfifo(path)
        # A reader holds it open, so that a writer that does not check what it opens gets through (and the
        # test fails) instead of blocking the test for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        stack.callback(os.close, fd)
        # And should code under test open it for reading (the bug), a watchdog lets each such reader go after
        # a minute with bytes that are no JSON, so that the test fails instead of hanging. With the code right
        # nothing ever reads it, so the watchdog changes no outcome however slow the machine.
        done = threading.Event()

        def unblock() -> None:
            while not done.wait(60):
                with contextlib.suppress(OSError):
                    w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                    os.write(w, b"not json")
                    os.close(w)

        threading.Thread(target=unblock, daemon=True).start()
        stack.callback(done.set)
    elif what == "socket":
        here = os.getcwd()
        os.chdir(path.parent)  # a socket's path must be short: bind the name from its folder
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path.name)
        finally:
            os.chdir(here)
        stack.callback(sock.close)


def _stop_after(calls: int):
    """A `stop` for work() that ends a worker looping without progress (the bug this file guards against);
    a worker that progresses asks far fewer times."""
    asked = [0]

    def stop() -> bool:
        asked[0] += 1
        return asked[0] > calls

    return stop


@pytest.mark.parametrize(("target", "what"), DAMAGE)
def test_a_damaged_job_is_skipped_and_repair_brings_it_back(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, target, what
):
    params = GenerationParams(max_new_tokens=2)
    victim = create_job(
        write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, params, home=runner_home, name="victim"
    )
    other = create_job(tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home)
    with contextlib.ExitStack() as stack:
        for t, w in zip(target.split("+"), what.split("+"), strict=True):
            _put(victim.dir / t, w, stack)
        # what `runner work` is about to find, `runner status` says first (pass 72: a folder at log.txt showed
        # "queued (interrupted)" while every worker skipped the job as broken)
        spare = target in ("verified.json", "job.backup.json")
        assert runner.status(victim.dir).state == ("queued" if spare else "broken")
        said: list[str] = []
        work(runner_home, engine=gpt2_engine, echo=said.append, stop=_stop_after(500))
        assert runner.status(other.dir).state == "completed"
        if target in ("verified.json", "job.backup.json"):  # a cache of checks, a spare: the job runs
            assert runner.status(victim.dir).state == "completed", said
            return
        assert runner.status(victim.dir).state != "completed"
        assert any(f"job {victim.id} is broken" in s and "runner repair" in s for s in said), said
        report = runner.repair(victim.dir)
    assert report.state_now == "queued"
    assert list((victim.dir / "quarantine").iterdir())  # the thing in the way, kept
    work(runner_home, engine=gpt2_engine, echo=None, stop=_stop_after(500))
    df = runner.load_results(victim.dir)
    assert runner.status(victim.dir).state == "completed" and sorted(df["id"]) == [r["id"] for r in ROWS]


def test_a_folder_named_like_a_weight_file_in_the_model_folder_is_no_damage_to_the_job(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    """A folder `checkpoint.pt/` appearing in the model's folder is not a weight file (and not the job's
    folder being damaged): the job runs."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), str(model), home=runner_home)
    (model / "checkpoint.pt").mkdir()
    said: list[str] = []
    work(runner_home, engine=gpt2_engine, echo=said.append, stop=_stop_after(500))
    assert runner.status(job.dir).state == "completed", said


@pytest.mark.parametrize("what", ["fifo", "dir"])
def test_a_completed_job_with_something_else_at_a_shard_is_read_and_named_not_hung(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, what
):
    """A FIFO (or a folder) where a completed job's shard was: `runner status`, `load_results` and a lookup of
    another job by name answer (the shard's rows are reported missing) instead of waiting for ever; and a FIFO
    at a job's job.json does not stop another job being found by its name."""
    job, _ = runner.run(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, GenerationParams(max_new_tokens=2),
                        engine=gpt2_engine, echo=None, output=tmp_path / "out")  # fmt: skip
    other = create_job(tmp_path / "p.jsonl", tiny_gpt2, home=runner_home, name="other")
    third = create_job(tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home)
    shard = next((job.dir / "shards").iterdir())
    with contextlib.ExitStack() as stack:
        _put(shard, what, stack)
        _put(third.dir / "job.json", "fifo", stack)  # its backup still marks the folder as a job
        assert runner.status(job.dir).state == "broken"
        with pytest.warns(UserWarning, match="its shard is (missing|not a plain file)"):
            assert len(runner.load_results(job.dir)) == 0
        assert runner.open_job("other", runner_home).dir == other.dir


@pytest.mark.parametrize("what", ["fifo", "link", "socket"])
def test_a_job_whose_spec_and_backup_are_both_of_the_wrong_kind_is_shown_broken(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, what
):
    """job.json and job.backup.json both a FIFO (a link, a socket): the job vanished from `runner status` (adversarial
    pass 104). It is shown broken, saying to submit the file again; the other jobs run."""
    victim = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, home=runner_home)
    other = create_job(tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home)
    with contextlib.ExitStack() as stack:
        for name in ("job.json", "job.backup.json"):
            _put(victim.dir / name, what, stack)
        shown = {s.id: s for s in runner.status(home=runner_home)}
        assert shown[victim.id].state == "broken" and "submit the file again" in shown[victim.id].message
        work(runner_home, engine=gpt2_engine, echo=None, stop=_stop_after(500))
        assert runner.status(other.dir).state == "completed"


def test_a_job_json_that_links_to_another_jobs_is_shown_under_its_own_id(tmp_path, tiny_gpt2, runner_home):
    """A job's job.json replaced by a link to another job's: it was listed broken under the other job's id (two
    rows with one id, and `runner repair ID` acting on the healthy job; adversarial pass 104). Its backup names it."""
    victim = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), tiny_gpt2, home=runner_home)
    other = create_job(tmp_path / "p.jsonl", tiny_gpt2, GenerationParams(max_new_tokens=3), home=runner_home)
    (victim.dir / "job.json").unlink()
    (victim.dir / "job.json").symlink_to(other.dir / "job.json")
    shown = [(s.id, s.state) for s in runner.status(home=runner_home)]
    assert sorted(shown) == sorted([(victim.id, "broken"), (other.id, "queued")]), shown
    runner.repair(victim.dir)
    assert runner.status(victim.dir).state == "queued" and (victim.dir / "job.json").is_file()
    assert not (victim.dir / "job.json").is_symlink() and runner.status(other.dir).state == "queued"
