"""Adversarial pass 258: the fault campaign in other job shapes (tests/test_campaign.py's CAMPAIGN_* variables:
-n 4 with one-row units, 5 workers, one-row shards, score and embed jobs, continuous batching, odd sizes, and on a
file system without hard links), a couple of seeds each: nothing lost, duplicated or changed.

Found, and kept fixed below:
- The campaign without hard links (`PYTHONPATH=tests/linkless`, as `make test-linkless` runs it) ran its
  `python -m runner` commands with hard links: a `cancel`, `retry` or `repair` it meant to kill between its state
  record's create and fill (`after_create`) ran through instead (0 of 13 such kills landed in two campaigns), so
  the empty record ("a change of state is being written") was never made there. tests/workers.py passed the
  caller's PYTHONPATH on as given, relative; its entries are now made absolute, and those kills land.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import workers
from helpers import write_jsonl

from runner import GenerationParams
from runner.jobs import create_job

LINKLESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linkless")


def test_a_command_of_a_linkless_test_is_killed_between_its_records_create_and_fill(
    tmp_path, tiny_gpt2, monkeypatch
):
    monkeypatch.chdir(workers.ROOT)
    monkeypatch.setenv("PYTHONPATH", os.path.relpath(LINKLESS))  # as `make test-linkless` gives it
    env = workers.worker_env({"RUNNER_FAULT": "after_create:1"})
    assert all(os.path.isabs(p) for p in env["PYTHONPATH"].split(os.pathsep))
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "the old man"}])
    job = create_job(src, tiny_gpt2, GenerationParams(max_new_tokens=2), home=tmp_path / "home")
    proc = subprocess.run([sys.executable, "-m", "runner", "--home", str(tmp_path / "home"), "cancel", job.id],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    record = job.dir / "state" / "00000001.json"
    assert record.exists() and record.stat().st_size == 0  # created, not filled: no links there
