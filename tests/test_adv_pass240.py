"""Adversarial pass 240: the second reading of pass 237's changes (steady clocks, submits set aside, status of a
queued job's backup, CSV stop cells, the setting columns' note, the CLI's hints)."""

import errno
import os
import shutil

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams, jobdir, storage
from runner.jobs import create_job


@pytest.fixture
def job(tmp_path, tiny_gpt2, runner_home):
    lines = ({"id": f"r{i}", "prompt": f"The old man said {i}"} for i in range(4))
    return create_job(write_jsonl(tmp_path / "p.jsonl", lines), tiny_gpt2, GenerationParams(max_new_tokens=3),
                      runner.EngineOptions(batch_size=2), home=runner_home)  # fmt: skip


def test_the_setting_columns_note_counts_only_the_rows_the_job_holds(tmp_path, tiny_gpt2):
    """--skip-invalid leaves out a row whose setting cell is refused: the note counted it all the same, and said
    'temperature' (2 rows of 1), more rows than the job has."""
    (tmp_path / "p.csv").write_text("id,prompt,temperature\n1,a,0.5\n2,b,hot\n3,c,\n")
    args = ("--home", str(tmp_path / "home"), "submit", str(tmp_path / "p.csv"), "-m", tiny_gpt2)
    result = invoke(*args, "--skip-invalid")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "read as each row's own settings: 'temperature' (1 row of 2)" in said, said


def dead_submit_folder(home):
    """A submit's temp folder whose process is gone from this machine (its pid free), a job half written in it."""
    name = jobdir.submit_temp_name("20260101-000000-abcdef")
    pid = next(p for p in range(2**22 - 3, 2**21, -1) if not storage.pid_exists(p))
    name = name.replace(f".{os.getpid()}-", f".{pid}-")
    folder = home / name
    folder.mkdir()
    (folder / "job.json").write_text("{}")
    return folder


def test_a_sweep_killed_between_setting_aside_and_removing_leaves_nothing_a_later_sweep_keeps(
    job, runner_home, monkeypatch
):
    """`remove_dead_submits` killed after its rename aside (NAME.taken-over), before its removal: the folder is
    no job in the listing or in `runner status`, and the next sweep (any submit's, any `runner work`'s) removes
    it; a second sweeper meanwhile is no harm."""
    folder = dead_submit_folder(runner_home)
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        jobdir.remove_dead_submits(runner_home)
    monkeypatch.setattr(shutil, "rmtree", real)
    aside = [p.name for p in runner_home.iterdir() if p.name.endswith(jobdir.TAKEN_OVER)]
    assert not folder.exists() and aside == [folder.name + jobdir.TAKEN_OVER]
    assert jobdir.job_folders(runner_home) == [job.dir]
    assert [s.id for s in runner.status(home=runner_home)] == [job.id]
    result = invoke("--home", str(runner_home), "status")
    assert result.exit_code == 0 and "taken-over" not in result.output, result.output
    assert jobdir.remove_dead_submits(runner_home) == 1 and jobdir.remove_dead_submits(runner_home) == 0
    assert sorted(p.name for p in runner_home.iterdir()) == [job.dir.name]


def test_status_of_a_queued_job_whose_backup_does_not_read_now_shows_it_queued(job, monkeypatch):
    """job.backup.json failing to read (EIO through the retries): `runner status` reads it for a queued job
    (`backup_problem`) and must neither crash nor call the job broken; a worker does not refuse it either."""
    real = storage.read_json

    def eio(path):
        if os.fspath(path).endswith(jobdir.JOB_BACKUP):
            raise storage.StorageError(f"read {path}: [Errno 5] Input/output error", errno.EIO)
        return real(path)

    monkeypatch.setattr(storage, "read_json", eio)
    status = runner.status(job.dir)
    assert status.state == "queued", status
    assert jobdir.same_job_as_backup(job) is False
