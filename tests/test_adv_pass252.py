"""Adversarial pass 252: a second reader of the changes of 2026-12-07 (passes 248-251), as a demanding user and as
the fault campaign would attack them.

Found, and kept fixed below:
  * `runner repair` of a job of the first runner (job.json and its backup without a checksum) killed while it
    wrote the first of the two, on a mount whose rename copies the bytes: job.json was left cut short beside the
    backup as the first runner wrote it, and every repair after said "submit the file again", its results out of
    reach for good.
  * `runner results J --to FILE` (and run-batch's export) took FILE for another file than the job's input where
    a stat of either failed once (a Drive mount dropping a request): it wrote the results over the prompts. The
    test of one file, moved to results.py that day, had lost run-batch's check of the path itself;
  * a DataFrame's job (job.json's input "DataFrame (N rows)", not a path) refused an export of that name as "the
    input file of job ...", the description taken for a file of the folder the command ran in.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl
from workers import ROOT, worker_env

import runner
from runner import GenerationParams, jobdir
from runner.jobs import create_job
from runner.worker import run_job

EARLY = Path(__file__).parent / "fixtures" / "old_jobs" / "ba61c53-completed"
EARLY_ID = "20261207-163655-b3cfcf"


def _killed_repair_of_the_first_runners_job(tmp_path: Path) -> Path:
    """A copy of the first runner's job (tests/fixtures/old_jobs), after a `runner repair` SIGKILLed half way
    through the copy of the first file it writes (a mount whose rename copies, then deletes)."""
    from fsfaults import FsFaults, command

    home = tmp_path / "jobs"
    shutil.copytree(EARLY, home)
    faults = FsFaults(home, copy_rename=True, kill={"dir": EARLY_ID, "nth": 1, "at": "mid_copy"})
    prefix, env = command(faults)
    cmd = [sys.executable, *prefix, "--home", str(home), "repair", EARLY_ID]
    killed = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(env), cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return home


@pytest.mark.slow
def test_a_repair_of_the_first_runners_job_killed_between_its_two_writes_is_finished_by_the_next(tmp_path):
    from helpers import invoke

    import runner

    home = _killed_repair_of_the_first_runners_job(tmp_path)
    folder = home / EARLY_ID
    torn = [n for n in (jobdir.JOB_FILE, jobdir.JOB_BACKUP) if jobdir._read_json_or_none(folder / n) is None]
    assert torn, "the kill left both files whole: the test no longer tears one"
    said = " ".join(invoke("--home", home, "status").output.split())
    assert "submit the file again" not in said and "can restore it" in said, said
    out = invoke("--home", home, "repair", EARLY_ID)
    assert out.exit_code == 0, out.output
    for name in (jobdir.JOB_FILE, jobdir.JOB_BACKUP):
        meta = json.loads((folder / name).read_text())
        assert meta["spec_sha256"] == jobdir.spec_checksum(meta) and meta["format"] == 2
    assert list(runner.load_results(folder)["id"]) == ["a", "b", "c"]


@pytest.mark.slow
def test_after_a_killed_repair_a_changed_byte_in_the_first_runners_file_left_is_not_vouched_for(tmp_path):
    """What vouches for the one file left whole is repair's own word that both were the same, for that content:
    a byte changed in it since is damage, not the first runner's job."""
    from helpers import invoke

    home = _killed_repair_of_the_first_runners_job(tmp_path)
    folder = home / EARLY_ID
    (left,) = [n for n in (jobdir.JOB_FILE, jobdir.JOB_BACKUP) if jobdir._read_json_or_none(folder / n)]
    meta = json.loads((folder / left).read_text())
    (folder / left).write_text(json.dumps({**meta, "seed": meta["seed"] + 1}))
    out = invoke("--home", home, "repair", EARLY_ID)
    assert out.exit_code != 0 and "submit the file again" in out.output, out.output
    assert "spec_sha256" not in json.loads((folder / left).read_text())


@pytest.mark.parametrize("target", ["itself", "a hard link"])
def test_an_export_onto_the_jobs_input_file_is_refused_when_a_stat_of_it_fails_once(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch, target
):
    from fsfaults import FsFaults

    (tmp_path / "in").mkdir()
    prompts = write_jsonl(tmp_path / "in" / "p.jsonl", [{"id": "a", "prompt": "hi"}])
    before = prompts.read_bytes()
    job = create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=2, seed=1), home=runner_home)
    assert run_job(job, gpt2_engine, echo=None).finished
    to = prompts
    if target == "a hard link":
        to = tmp_path / "in" / "same.jsonl"
        to.hardlink_to(prompts)
    # every first stat (read, listing) of a file in the input's folder fails, as a Drive mount's may
    FsFaults(tmp_path / "in", eio=1.0, eio_dirs=(".",), retry_delays=[0.0] * 8).install(monkeypatch)
    with pytest.raises(runner.RunnerError, match="is the input file of job"):
        runner.export_results(job.id, to)
    monkeypatch.undo()
    assert prompts.read_bytes() == before


def test_a_dataframe_jobs_description_is_no_input_file_an_export_could_destroy(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """job.json of a DataFrame's job says "DataFrame (N rows)" where a file's job has its absolute path: that
    text, taken for a path in the folder the command ran in, made an export named so "the input file of job"."""
    import pandas as pd

    job = create_job(
        pd.DataFrame({"prompt": ["hi"]}), tiny_gpt2, GenerationParams(max_new_tokens=2), home=runner_home
    )
    described = job.meta["input"]["path"]
    assert described.startswith("DataFrame (")
    monkeypatch.chdir(tmp_path)
    Path(described).write_text("the user's own file\n")
    with pytest.raises((runner.RunnerError, ValueError)) as refused:
        runner.export_results(job.id, described)
    assert "is the input file" not in str(refused.value), refused.value
