"""`runner results JOB --to FILE` writes FILE whole: an export that stops part way (disk or Drive quota full,
the VM killed, Ctrl-C) leaves the complete export made earlier, never half of one under the final name, and
says which file it could not write. Found by an adversarial pass (pandas wrote straight to the target). A full
disk is a file-size limit here (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG)."""

import resource
import signal
import subprocess
import sys

import pytest
from helpers import write_jsonl
from workers import ROOT, worker_env

from runner import EngineOptions, GenerationParams
from runner.jobs import create_job
from runner.worker import run_job

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_an_export_that_stops_part_way_leaves_no_torn_file(
    suffix, tmp_path, tiny_gpt2, gpt2_engine, runner_home
):
    rows = [{"id": f"r{i}", "prompt": f"The old man said {i} times " * 4} for i in range(64)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=8, seed=1),
                     EngineOptions(batch_size=16), home=runner_home)  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    out = tmp_path / f"out{suffix}"
    cmd = [sys.executable, "-m", "runner", "--home", str(runner_home), "results", job.id, "--to", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    good = out.read_bytes()
    limit = len(good) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    again = subprocess.run(
        cmd, capture_output=True, text=True, env=worker_env(), cwd=ROOT, preexec_fn=small_disk
    )
    assert again.returncode != 0 and "Traceback" not in again.stdout + again.stderr, again.stderr
    # the export failed: the earlier complete file must stand (or no file), never a torn one
    assert out.read_bytes() == good, (len(out.read_bytes()), len(good), again.stderr)
    assert f"cannot write {out}" in again.stderr and "job home" not in again.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left
